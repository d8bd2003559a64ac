//! Measuring what the device holds for this process beyond its allocations (its CUDA context, module code,
//! pool reserves), through NVML's per-process used memory, so the charge matches the device.
//!
//! NVML reports host pids. Off Kubernetes (and in containers sharing the host pid namespace) that is our pid;
//! inside a pid namespace NVML's list does not name us and the context goes uncharged by the shim (the agent,
//! which sees host pids, reports it).

use crate::cuda::*;
use crate::hooks::used;
use crate::process::{now_ns, Process};
use crate::real::call_real;
use std::ffi::{c_char, c_uint, c_void};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering::*};
use vgpu_contract::cache_layout::MAX_DEVICES;

static NVML_READY: AtomicBool = AtomicBool::new(false);
static NVML_FAILED: AtomicBool = AtomicBool::new(false);
static HANDLES: [AtomicPtr<c_void>; MAX_DEVICES] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_DEVICES];

fn nvml_init() -> bool {
    if NVML_READY.load(Acquire) {
        return true;
    }
    if NVML_FAILED.load(Acquire) {
        return false;
    }
    let rc = call_real!(
        used::nvmlInit_v2,
        unsafe extern "C" fn() -> NvmlReturn,
        -1,
        ()
    );
    let ok = rc == NVML_SUCCESS;
    if ok { &NVML_READY } else { &NVML_FAILED }.store(true, Release);
    ok
}

/// CUDA ordinal -> its UUID string, through the driver.
pub fn cuda_uuid(dev: usize) -> Option<[u8; 16]> {
    let mut uuid = [0u8; 16];
    let rc = call_real!(
        used::cuDeviceGetUuid_v2,
        unsafe extern "C" fn(*mut u8, CUdevice) -> CUresult,
        CUDA_ERROR_NOT_FOUND,
        (uuid.as_mut_ptr(), dev as CUdevice)
    );
    (rc == CUDA_SUCCESS).then_some(uuid)
}

fn nvml_handle(dev: usize) -> Option<*mut c_void> {
    let h = HANDLES[dev].load(Acquire);
    if !h.is_null() {
        return Some(h);
    }
    if !nvml_init() {
        return None;
    }
    let uuid = std::ffi::CString::new(format_uuid(&cuda_uuid(dev)?)).ok()?;
    let mut h: NvmlDevice = std::ptr::null_mut();
    let rc = call_real!(
        used::nvmlDeviceGetHandleByUUID,
        unsafe extern "C" fn(*const c_char, *mut NvmlDevice) -> NvmlReturn,
        -1,
        (uuid.as_ptr(), &mut h)
    );
    if rc != NVML_SUCCESS || h.is_null() {
        return None;
    }
    HANDLES[dev].store(h, Release);
    Some(h)
}

/// Bytes NVML says `pid` uses on CUDA device `dev`.
pub fn nvml_process_used(dev: usize, pid: u32) -> Option<u64> {
    let h = nvml_handle(dev)?;
    let mut buf = [NvmlProcessInfo::default(); 64];
    let mut n: c_uint = buf.len() as c_uint;
    type F = unsafe extern "C" fn(NvmlDevice, *mut c_uint, *mut NvmlProcessInfo) -> NvmlReturn;
    let rc = call_real!(
        used::nvmlDeviceGetComputeRunningProcesses_v3,
        F,
        -1,
        (h, &mut n, buf.as_mut_ptr())
    );
    if rc != NVML_SUCCESS {
        return None;
    }
    buf[..(n as usize).min(buf.len())]
        .iter()
        .find(|p| p.pid == pid)
        .map(|p| p.used_gpu_memory)
}

/// Re-measures the context charge of `p` on `dev` when it is due (see [`Process::context_due`]).
pub fn refresh(p: &Process, dev: usize, upcoming: u64) {
    if dev >= MAX_DEVICES || p.limit(dev).is_none() || !p.context_due(dev, upcoming, now_ns()) {
        return;
    }
    if let Some(used) = nvml_process_used(dev, p.pid) {
        p.set_context_from(dev, used);
    }
}
