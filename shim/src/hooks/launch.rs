//! Kernel launch hooks: each asks the pacer first ([`crate::pacing::before_launch`]), then launches.
#![allow(non_snake_case)]

use super::real_fns as r;
use crate::cuda::*;
use crate::pacing::before_launch;
use crate::real::{call_real, CU_MISSING};
use std::ffi::{c_uint, c_void};

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

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shm: c_uint,
    s: CUstream,
    p: *mut *mut c_void,
    e: *mut *mut c_void,
) -> CUresult {
    before_launch();
    call_real!(
        r::cuLaunchKernel,
        LaunchF,
        CU_MISSING,
        (f, gx, gy, gz, bx, by, bz, shm, s, p, e)
    )
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel_ptsz(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shm: c_uint,
    s: CUstream,
    p: *mut *mut c_void,
    e: *mut *mut c_void,
) -> CUresult {
    before_launch();
    call_real!(
        r::cuLaunchKernel_ptsz,
        LaunchF,
        CU_MISSING,
        (f, gx, gy, gz, bx, by, bz, shm, s, p, e)
    )
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchCooperativeKernel(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shm: c_uint,
    s: CUstream,
    p: *mut *mut c_void,
) -> CUresult {
    before_launch();
    call_real!(
        r::cuLaunchCooperativeKernel,
        CoopF,
        CU_MISSING,
        (f, gx, gy, gz, bx, by, bz, shm, s, p)
    )
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchCooperativeKernel_ptsz(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shm: c_uint,
    s: CUstream,
    p: *mut *mut c_void,
) -> CUresult {
    before_launch();
    call_real!(
        r::cuLaunchCooperativeKernel_ptsz,
        CoopF,
        CU_MISSING,
        (f, gx, gy, gz, bx, by, bz, shm, s, p)
    )
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernelEx(
    config: *const c_void,
    f: CUfunction,
    p: *mut *mut c_void,
    e: *mut *mut c_void,
) -> CUresult {
    before_launch();
    call_real!(r::cuLaunchKernelEx, ExF, CU_MISSING, (config, f, p, e))
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernelEx_ptsz(
    config: *const c_void,
    f: CUfunction,
    p: *mut *mut c_void,
    e: *mut *mut c_void,
) -> CUresult {
    before_launch();
    call_real!(r::cuLaunchKernelEx_ptsz, ExF, CU_MISSING, (config, f, p, e))
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch(g: *mut c_void, s: CUstream) -> CUresult {
    before_launch();
    call_real!(r::cuGraphLaunch, GraphF, CU_MISSING, (g, s))
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch_ptsz(g: *mut c_void, s: CUstream) -> CUresult {
    before_launch();
    call_real!(r::cuGraphLaunch_ptsz, GraphF, CU_MISSING, (g, s))
}
