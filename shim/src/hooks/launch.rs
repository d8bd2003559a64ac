//! Kernel launch hooks: each asks the pacer first ([`crate::pacing::before_launch`]), then launches. The pacer
//! reaches the driver only through [`RealDriver`], handed in here.
#![allow(non_snake_case)]

use super::real_fns as r;
use super::used;
use crate::cuda::*;
use crate::pacing::{self, observe_sync};
use crate::process::launches_refused;
use crate::real::{call_real, CU_MISSING};
use std::ffi::{c_int, c_uint, c_void};

/// The real driver, as the pacing core sees it.
pub struct RealDriver;
pub static DRIVER: RealDriver = RealDriver;

impl pacing::Driver for RealDriver {
    fn current_device(&self) -> usize {
        super::memory::current_device().unwrap_or(0)
    }

    fn device_count(&self) -> Option<usize> {
        let mut n: c_int = 0;
        let rc = call_real!(
            used::cuDeviceGetCount,
            unsafe extern "C" fn(*mut c_int) -> CUresult,
            CU_MISSING,
            (&mut n)
        );
        (rc == CUDA_SUCCESS && n >= 0).then_some(n as usize)
    }

    fn synchronize(&self) -> bool {
        let rc = call_real!(
            r::cuCtxSynchronize,
            unsafe extern "C" fn() -> CUresult,
            CU_MISSING,
            ()
        );
        rc == CUDA_SUCCESS
    }

    fn capturing(&self, stream: usize) -> bool {
        let mut status: c_int = 0;
        let rc = call_real!(
            used::cuStreamIsCapturing,
            unsafe extern "C" fn(CUstream, *mut c_int) -> CUresult,
            CU_MISSING,
            (stream as CUstream, &mut status)
        );
        rc == CUDA_SUCCESS && status != 0
    }

    fn current_context(&self) -> usize {
        let mut ctx: CUcontext = std::ptr::null_mut();
        call_real!(
            used::cuCtxGetCurrent,
            unsafe extern "C" fn(*mut CUcontext) -> CUresult,
            CU_MISSING,
            (&mut ctx)
        );
        ctx as usize
    }

    fn set_current_context(&self, ctx: usize) {
        call_real!(
            used::cuCtxSetCurrent,
            unsafe extern "C" fn(CUcontext) -> CUresult,
            CU_MISSING,
            (ctx as CUcontext)
        );
    }

    fn uuid(&self, dev: usize) -> Option<String> {
        crate::context::cuda_uuid(dev).map(|u| format_uuid(&u))
    }
}

fn before_launch(stream: CUstream) {
    pacing::before_launch(&DRIVER, stream as usize)
}

type LaunchF = unsafe extern "C" fn(
    CUfunction,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    CUstream,
    *mut *mut c_void,
    *mut *mut c_void,
) -> CUresult;
type CoopF = unsafe extern "C" fn(
    CUfunction,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    CUstream,
    *mut *mut c_void,
) -> CUresult;
type ExF =
    unsafe extern "C" fn(*const c_void, CUfunction, *mut *mut c_void, *mut *mut c_void) -> CUresult;
type GraphF = unsafe extern "C" fn(*mut c_void, CUstream) -> CUresult;

hook_pair!(cuLaunchKernel / cuLaunchKernel_ptsz(
    f: CUfunction, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shm: c_uint,
    s: CUstream, p: *mut *mut c_void, e: *mut *mut c_void,
) -> CUresult, |real| {
    if launches_refused() {
        return CUDA_ERROR_NOT_PERMITTED;
    }
    before_launch(s);
    call_real!(real, LaunchF, CU_MISSING, (f, gx, gy, gz, bx, by, bz, shm, s, p, e))
});

hook_pair!(cuLaunchCooperativeKernel / cuLaunchCooperativeKernel_ptsz(
    f: CUfunction, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shm: c_uint,
    s: CUstream, p: *mut *mut c_void,
) -> CUresult, |real| {
    if launches_refused() {
        return CUDA_ERROR_NOT_PERMITTED;
    }
    before_launch(s);
    call_real!(real, CoopF, CU_MISSING, (f, gx, gy, gz, bx, by, bz, shm, s, p))
});

hook_pair!(cuLaunchKernelEx / cuLaunchKernelEx_ptsz(
    config: *const c_void, f: CUfunction, p: *mut *mut c_void, e: *mut *mut c_void,
) -> CUresult, |real| {
    if launches_refused() {
        return CUDA_ERROR_NOT_PERMITTED;
    }
    before_launch(launch_config_stream(config));
    call_real!(real, ExF, CU_MISSING, (config, f, p, e))
});

hook_pair!(cuGraphLaunch / cuGraphLaunch_ptsz(g: *mut c_void, s: CUstream) -> CUresult, |real| {
    if launches_refused() {
        return CUDA_ERROR_NOT_PERMITTED;
    }
    before_launch(s);
    call_real!(real, GraphF, CU_MISSING, (g, s))
});

/// The stream of a `CUlaunchConfig`: after gridDim (3 x u32), blockDim (3 x u32) and sharedMemBytes (u32).
fn launch_config_stream(config: *const c_void) -> CUstream {
    if config.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: config points to the caller's CUlaunchConfig, whose hStream field sits at byte 32 (7 u32 fields,
    // padded to pointer alignment), as cuda.h lays it out.
    unsafe { *(config as *const u8).add(32).cast::<CUstream>() }
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    observe_sync(&DRIVER, || {
        call_real!(
            r::cuCtxSynchronize,
            unsafe extern "C" fn() -> CUresult,
            CU_MISSING,
            ()
        )
    })
}

hook_pair!(cuStreamSynchronize / cuStreamSynchronize_ptsz(s: CUstream) -> CUresult, |real| {
    observe_sync(&DRIVER, || call_real!(real, unsafe extern "C" fn(CUstream) -> CUresult, CU_MISSING, (s)))
});

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(e: *mut c_void) -> CUresult {
    observe_sync(&DRIVER, || {
        call_real!(
            r::cuEventSynchronize,
            unsafe extern "C" fn(*mut c_void) -> CUresult,
            CU_MISSING,
            (e)
        )
    })
}
