//! The ways a program finds driver functions other than linking them: `dlsym` on a library handle (the CUDA
//! runtime and nvidia-smi dlopen their libraries) and `cuGetProcAddress` (how the runtime gets every driver
//! entry point since CUDA 11.3). Both answer hooked functions with our hooks.
#![allow(non_snake_case)]

use super::real_fns as r;
use crate::cuda::*;
use crate::real::{call_real, real_dlsym, CU_MISSING};
use std::ffi::{c_char, c_int, c_void, CStr};

/// What our `dlsym` does for every handle but RTLD_NEXT: the real lookup, then our hook if we hook that name.
///
/// # Safety
/// `name` is a NUL-terminated string or null, as for dlsym.
unsafe extern "C" fn vgpu_dlsym_impl(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    // SAFETY: our caller's arguments, passed on unchanged under dlsym's own contract.
    let found = unsafe { real_dlsym(handle, name) };
    if found.is_null() || name.is_null() {
        return found;
    }
    // SAFETY: name is non-null and NUL-terminated (dlsym's contract; the real dlsym just read it).
    let bytes = unsafe { CStr::from_ptr(name) }.to_bytes();
    if !(bytes.starts_with(b"cu") || bytes.starts_with(b"nvml")) {
        return found;
    }
    match super::by_name(bytes) {
        Some(h) => h.hook as *mut c_void,
        None => found,
    }
}

// `dlsym(RTLD_NEXT, ..)` is resolved relative to the caller's own library, which glibc finds from the return
// address. A call through a Rust function would make that address ours, so RTLD_NEXT lookups (malloc
// wrappers, other preloads) would find the wrong symbol; this trampoline jumps to glibc's dlsym with the
// caller's return address untouched, and sends every other handle to vgpu_dlsym_impl.
///
/// # Safety
/// As dlsym.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    std::arch::naked_asm!(
        "cmp rdi, -1",
        "jne 2f",
        "mov rax, qword ptr [rip + {real}]",
        "test rax, rax",
        "jz 2f",
        "jmp rax",
        "2:",
        "jmp {imp}",
        real = sym crate::real::VGPU_REAL_DLSYM,
        imp = sym vgpu_dlsym_impl,
    )
}

/// Elsewhere a plain export: RTLD_NEXT lookups are resolved relative to this library.
///
/// # Safety
/// As dlsym.
#[cfg(not(target_arch = "x86_64"))]
#[no_mangle]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    unsafe { vgpu_dlsym_impl(handle, name) }
}

/// Swaps a driver entry point the driver handed out for our hook of it.
fn swap_for_hook(pfn: *mut *mut c_void) {
    // SAFETY: pfn is the caller's out-pointer, just written by the driver (null checked).
    if let Some(p) = unsafe { pfn.as_mut() } {
        if let Some(h) = super::by_real_address(*p) {
            *p = h.hook as *mut c_void;
        }
    }
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
) -> CUresult {
    type F = unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64) -> CUresult;
    let rc = call_real!(
        r::cuGetProcAddress,
        F,
        CU_MISSING,
        (symbol, pfn, version, flags)
    );
    if rc == CUDA_SUCCESS {
        swap_for_hook(pfn);
    }
    rc
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    type F =
        unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CUresult;
    let rc = call_real!(
        r::cuGetProcAddress_v2,
        F,
        CU_MISSING,
        (symbol, pfn, version, flags, status)
    );
    if rc == CUDA_SUCCESS {
        swap_for_hook(pfn);
    }
    rc
}
