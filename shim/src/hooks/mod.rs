//! The one table of hooked symbols. Each hook is a thin `extern "C"` wrapper over the safe modules; each real
//! function is resolved once ([`crate::real::Real`]). The table answers `dlsym` and `cuGetProcAddress`.

use crate::real::Real;
use std::ffi::c_void;

pub struct Hook {
    pub real: &'static Real,
    pub hook: *const c_void,
}

// SAFETY: `hook` is the address of a function in this library: immutable, valid for the process's life.
unsafe impl Sync for Hook {}

/// Defines a hook and its per-thread-default-stream twin (`<name>_ptsz`): the same wrapper around a different
/// real function, which the body names as `$real`.
macro_rules! hook_pair {
    ($plain:ident / $ptsz:ident ( $($arg:ident : $ty:ty),* $(,)? ) -> $ret:ty, |$real:ident| $body:expr) => {
        /// # Safety
        /// As cuda.h.
        #[no_mangle]
        pub unsafe extern "C" fn $plain($($arg: $ty),*) -> $ret {
            let $real = &r::$plain;
            $body
        }
        /// # Safety
        /// As cuda.h.
        #[no_mangle]
        pub unsafe extern "C" fn $ptsz($($arg: $ty),*) -> $ret {
            let $real = &r::$ptsz;
            $body
        }
    };
}

pub mod launch;
pub mod memory;
pub mod nvml;
pub mod reserves;
pub mod resolve;

/// Declares the `Real` for each listed symbol in a module `real_fns`, and the table [`HOOKS`] pairing it with
/// the hook of the same name (which must exist in one of the hook modules).
macro_rules! hook_table {
    ($( $lib:ident : $module:ident :: $name:ident ),* $(,)?) => {
        #[allow(non_upper_case_globals)]
        pub mod real_fns {
            use crate::real::{Lib, Real};
            $(
                pub static $name: Real = Real::new(
                    match std::ffi::CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                        Ok(c) => c,
                        Err(_) => panic!("symbol name"),
                    },
                    Lib::$lib,
                );
            )*
        }
        pub static HOOKS: &[Hook] = &[
            $( Hook { real: &real_fns::$name, hook: $module::$name as *const c_void } ),*
        ];
    };
}

hook_table! {
    Cuda: memory::cuMemAlloc_v2,
    Cuda: memory::cuMemAllocPitch_v2,
    Cuda: memory::cuMemAllocManaged,
    Cuda: memory::cuMemAllocAsync,
    Cuda: memory::cuMemAllocAsync_ptsz,
    Cuda: memory::cuMemAllocFromPoolAsync,
    Cuda: memory::cuMemAllocFromPoolAsync_ptsz,
    Cuda: memory::cuMemFree_v2,
    Cuda: memory::cuMemFreeAsync,
    Cuda: memory::cuMemFreeAsync_ptsz,
    Cuda: memory::cuMemCreate,
    Cuda: memory::cuMemRelease,
    Cuda: memory::cuArrayCreate_v2,
    Cuda: memory::cuArray3DCreate_v2,
    Cuda: memory::cuArrayDestroy,
    Cuda: memory::cuMipmappedArrayCreate,
    Cuda: memory::cuMipmappedArrayDestroy,
    Cuda: memory::cuMemGetInfo_v2,
    Cuda: memory::cuDeviceTotalMem_v2,
    Cuda: memory::cuDevicePrimaryCtxRetain,
    Cuda: memory::cuCtxCreate_v2,
    Cuda: memory::cuCtxCreate_v3,
    Cuda: memory::cuCtxCreate_v4,
    Cuda: reserves::cuCtxSetLimit,
    Cuda: reserves::cuCtxDestroy_v2,
    Cuda: reserves::cuGraphAddMemAllocNode,
    Cuda: reserves::cuGraphDestroy,
    Cuda: reserves::cuGraphInstantiateWithFlags,
    Cuda: reserves::cuGraphInstantiate,
    Cuda: reserves::cuGraphInstantiate_v2,
    Cuda: reserves::cuGraphInstantiateWithParams,
    Cuda: reserves::cuGraphInstantiateWithParams_ptsz,
    Cuda: reserves::cuGraphExecDestroy,
    Cuda: reserves::cuDeviceGraphMemTrim,
    Cuda: reserves::cuModuleLoad,
    Cuda: reserves::cuModuleLoadData,
    Cuda: reserves::cuModuleLoadDataEx,
    Cuda: reserves::cuModuleLoadFatBinary,
    Cuda: reserves::cuModuleUnload,
    Cuda: reserves::cuLibraryLoadData,
    Cuda: reserves::cuLibraryLoadFromFile,
    Cuda: reserves::cuLibraryUnload,
    Cuda: reserves::cuMemPoolCreate,
    Cuda: reserves::cuMemPoolSetAttribute,
    Cuda: reserves::cuMemPoolTrimTo,
    Cuda: reserves::cuMemPoolDestroy,
    Cuda: launch::cuLaunchKernel,
    Cuda: launch::cuLaunchKernel_ptsz,
    Cuda: launch::cuLaunchKernelEx,
    Cuda: launch::cuLaunchKernelEx_ptsz,
    Cuda: launch::cuLaunchCooperativeKernel,
    Cuda: launch::cuLaunchCooperativeKernel_ptsz,
    Cuda: launch::cuGraphLaunch,
    Cuda: launch::cuGraphLaunch_ptsz,
    Cuda: launch::cuCtxSynchronize,
    Cuda: launch::cuStreamSynchronize,
    Cuda: launch::cuStreamSynchronize_ptsz,
    Cuda: launch::cuEventSynchronize,
    Cuda: resolve::cuGetProcAddress,
    Cuda: resolve::cuGetProcAddress_v2,
    Nvml: nvml::nvmlDeviceGetMemoryInfo,
    Nvml: nvml::nvmlDeviceGetMemoryInfo_v2,
}

/// Functions the shim calls itself but does not hook.
#[allow(non_upper_case_globals)]
pub mod used {
    use crate::real::{Lib, Real};
    pub static cuCtxGetDevice: Real = Real::new(c"cuCtxGetDevice", Lib::Cuda);
    pub static cuDeviceGetUuid_v2: Real = Real::new(c"cuDeviceGetUuid_v2", Lib::Cuda);
    pub static cuDeviceGetCount: Real = Real::new(c"cuDeviceGetCount", Lib::Cuda);
    pub static cuCtxGetCurrent: Real = Real::new(c"cuCtxGetCurrent", Lib::Cuda);
    pub static cuCtxSetCurrent: Real = Real::new(c"cuCtxSetCurrent", Lib::Cuda);
    pub static cuStreamIsCapturing: Real = Real::new(c"cuStreamIsCapturing", Lib::Cuda);
    pub static cuCtxGetLimit: Real = Real::new(c"cuCtxGetLimit", Lib::Cuda);
    pub static cuDeviceGetAttribute: Real = Real::new(c"cuDeviceGetAttribute", Lib::Cuda);
    pub static cuDeviceGetMemPool: Real = Real::new(c"cuDeviceGetMemPool", Lib::Cuda);
    pub static cuMemPoolGetAttribute: Real = Real::new(c"cuMemPoolGetAttribute", Lib::Cuda);
    pub static nvmlInit_v2: Real = Real::new(c"nvmlInit_v2", Lib::Nvml);
    pub static nvmlDeviceGetHandleByUUID: Real = Real::new(c"nvmlDeviceGetHandleByUUID", Lib::Nvml);
    pub static nvmlDeviceGetIndex: Real = Real::new(c"nvmlDeviceGetIndex", Lib::Nvml);
    pub static nvmlDeviceGetUUID: Real = Real::new(c"nvmlDeviceGetUUID", Lib::Nvml);
    pub static nvmlDeviceGetComputeRunningProcesses_v3: Real =
        Real::new(c"nvmlDeviceGetComputeRunningProcesses_v3", Lib::Nvml);
}

/// The hook for a symbol name, if we hook it.
pub fn by_name(name: &[u8]) -> Option<&'static Hook> {
    HOOKS.iter().find(|h| h.real.name.to_bytes() == name)
}

/// The hook whose real function lives at `addr` (what cuGetProcAddress hands out).
pub fn by_real_address(addr: *mut c_void) -> Option<&'static Hook> {
    HOOKS
        .iter()
        .find(|h| h.real.lib == crate::real::Lib::Cuda && h.real.get() == addr)
}
