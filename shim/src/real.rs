//! Resolving the real driver and NVML functions, once each.
//!
//! The shim exports the hooked names itself, so `dlsym(RTLD_NEXT, ..)` from here would find the next
//! definition after us in the global scope, which misses a libcuda that was `dlopen`ed without RTLD_GLOBAL
//! (what the CUDA runtime does). So every real function is looked up on the library's own handle, with the
//! real `dlsym` (ours answers hooked names with hooks).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::Acquire, Ordering::Release};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Lib {
    Cuda,
    Nvml,
}

impl Lib {
    fn soname(self) -> &'static CStr {
        match self {
            Lib::Cuda => c"libcuda.so.1",
            Lib::Nvml => c"libnvidia-ml.so.1",
        }
    }
}

type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

/// glibc's dlsym, found with dlvsym so that our own `dlsym` export is skipped. Read by the dlsym trampoline.
pub static VGPU_REAL_DLSYM: AtomicUsize = AtomicUsize::new(0);

/// Resolves glibc's dlsym. Runs from the library constructor: one symbol lookup, no file, no thread.
pub fn init_real_dlsym() {
    if VGPU_REAL_DLSYM.load(Acquire) != 0 {
        return;
    }
    for ver in [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17"] {
        // SAFETY: both strings are NUL-terminated literals; dlvsym has no other preconditions.
        let p = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), ver.as_ptr()) };
        if !p.is_null() {
            VGPU_REAL_DLSYM.store(p as usize, Release);
            return;
        }
    }
}

/// The real dlsym.
///
/// # Safety
/// `name` is null or a NUL-terminated string, and `handle` a dlopen handle or pseudo-handle, as for dlsym.
pub unsafe fn real_dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    init_real_dlsym();
    let f = VGPU_REAL_DLSYM.load(Acquire);
    if f == 0 {
        return std::ptr::null_mut();
    }
    // SAFETY: f is glibc's dlsym (resolved above); handle and name come from our caller unchanged.
    unsafe { std::mem::transmute::<usize, DlsymFn>(f)(handle, name) }
}

static HANDLES: [AtomicPtr<c_void>; 2] = [
    AtomicPtr::new(std::ptr::null_mut()),
    AtomicPtr::new(std::ptr::null_mut()),
];

/// A handle on the loaded library: the one the program already loaded if any, else loads it. Loading is
/// harmless here: we only get asked once the program is calling into that library.
pub fn handle(lib: Lib) -> *mut c_void {
    let slot = &HANDLES[lib as usize];
    let h = slot.load(Acquire);
    if !h.is_null() {
        return h;
    }
    let name = lib.soname().as_ptr();
    // SAFETY: name is a NUL-terminated literal; dlopen is thread-safe.
    let mut h = unsafe { libc::dlopen(name, libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if h.is_null() {
        // SAFETY: as above.
        h = unsafe { libc::dlopen(name, libc::RTLD_NOW | libc::RTLD_LOCAL) };
    }
    if !h.is_null() {
        slot.store(h, Release);
    }
    h
}

/// One real function, resolved on first use.
pub struct Real {
    pub name: &'static CStr,
    pub lib: Lib,
    ptr: AtomicPtr<c_void>,
}

impl Real {
    pub const fn new(name: &'static CStr, lib: Lib) -> Self {
        Self {
            name,
            lib,
            ptr: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// The real function's address, or null if the library does not have it.
    pub fn get(&self) -> *mut c_void {
        let p = self.ptr.load(Acquire);
        if !p.is_null() {
            return p;
        }
        let h = handle(self.lib);
        if h.is_null() {
            return p;
        }
        // SAFETY: h is a dlopen handle and the name a NUL-terminated literal.
        let p = unsafe { real_dlsym(h, self.name.as_ptr()) };
        if !p.is_null() {
            self.ptr.store(p, Release);
        }
        p
    }
}

/// Calls the real function `$real` (a [`Real`]) as type `$ty`, or returns `$missing` when it does not exist.
macro_rules! call_real {
    ($real:expr, $ty:ty, $missing:expr, ($($arg:expr),*)) => {{
        let p = $real.get();
        if p.is_null() {
            $missing
        } else {
            // SAFETY: p was resolved by name from the library that defines it with exactly this C signature
            // (cuda.h / nvml.h); the arguments are the caller's, passed through unchanged or checked.
            unsafe { std::mem::transmute::<*mut std::ffi::c_void, $ty>(p)($($arg),*) }
        }
    }};
}
pub(crate) use call_real;

pub const CU_MISSING: c_int = crate::cuda::CUDA_ERROR_NOT_FOUND;
