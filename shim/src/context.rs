//! Measuring what the device holds for this process beyond its allocations (its CUDA context, module code,
//! pool reserves), through NVML's per-process used memory, so the charge matches the device.
//!
//! NVML names a process by its pid, and drivers differ on which: some name the pid as the caller's namespace
//! sees it (driver 580 on the H200), some the host's. Inside a pod (no hostPID) the two differ, so the shim looks
//! for either: the host pid the agent recorded in the process's cache slot (the agent sees host pids; see
//! `cache_layout`'s host-pid word), else its own. Until the agent's first sweep after the process claimed its
//! slot, a driver that names host pids shows the shim no entry of its own and the context is not yet charged
//! (the agent's host-side measurement still counts it).

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

/// The used memory of our entry in NVML's process list: the one named by `host_pid` when the agent has told
/// us it, else the one named by our own `pid`. The host pid goes first: inside a pid namespace our own pid is a
/// small number a host process may also have.
pub fn pick_own_entry(list: &[NvmlProcessInfo], pid: u32, host_pid: Option<u32>) -> Option<u64> {
    let by = |want: u32| {
        list.iter()
            .find(|p| p.pid == want)
            .map(|p| p.used_gpu_memory)
    };
    host_pid.and_then(by).or_else(|| by(pid))
}

/// Bytes NVML says this process (own `pid`, or `host_pid` as the agent translated it) uses on CUDA device `dev`.
pub fn nvml_process_used(dev: usize, pid: u32, host_pid: Option<u32>) -> Option<u64> {
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
    pick_own_entry(&buf[..(n as usize).min(buf.len())], pid, host_pid)
}

/// Re-measures the context charge of `p` on `dev` when it is due (see [`Process::context_due`]).
pub fn refresh(p: &Process, dev: usize, upcoming: u64) {
    if dev >= MAX_DEVICES || p.limit(dev).is_none() || !p.context_due(dev, upcoming, now_ns()) {
        return;
    }
    if let Some(used) = nvml_process_used(dev, p.pid, p.host_pid()) {
        p.set_context_from(dev, used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pid: u32, mib: u64) -> NvmlProcessInfo {
        NvmlProcessInfo {
            pid,
            used_gpu_memory: mib,
            ..Default::default()
        }
    }

    #[test]
    fn own_entry_by_either_pid() {
        let host_naming = [entry(1, 9999), entry(40321, 520)];
        // Inside a pid namespace we are pid 1; the host's pid 1 is someone else's entry.
        assert_eq!(pick_own_entry(&host_naming, 1, Some(40321)), Some(520));
        assert_eq!(pick_own_entry(&host_naming, 7, None), None);
        // A driver naming namespaced pids: our own pid, whatever the agent recorded.
        let ns_naming = [entry(7, 520)];
        assert_eq!(pick_own_entry(&ns_naming, 7, Some(40321)), Some(520));
        assert_eq!(pick_own_entry(&ns_naming, 7, None), Some(520));
    }
}
