//! NVML memory queries, answered with the slice (what `nvidia-smi` in the container prints).
#![allow(non_snake_case)]

use super::real_fns as r;
use super::used;
use crate::cuda::*;
use crate::hooks::memory::slice_view;
use crate::real::call_real;
use std::ffi::{c_char, c_uint, CStr};
use vgpu_contract::cache_layout::MAX_DEVICES;
use vgpu_contract::env;

/// Which CUDA ordinal an NVML device is, following CUDA_VISIBLE_DEVICES (indices or UUID prefixes) the way
/// CUDA numbers devices; without it, NVML's index. None when CUDA cannot see the device.
pub fn cuda_ordinal(visible: Option<&str>, nvml_index: u32, uuid: &str) -> Option<usize> {
    let Some(list) = visible.map(str::trim).filter(|v| !v.is_empty()) else {
        return Some(nvml_index as usize);
    };
    list.split(',').map(str::trim).position(|e| {
        if let Ok(i) = e.parse::<u32>() {
            i == nvml_index
        } else {
            !e.is_empty() && uuid.starts_with(e)
        }
    })
}

fn ordinal_of(device: NvmlDevice) -> Option<usize> {
    let mut index: c_uint = 0;
    let rc = call_real!(
        used::nvmlDeviceGetIndex,
        unsafe extern "C" fn(NvmlDevice, *mut c_uint) -> NvmlReturn,
        -1,
        (device, &mut index)
    );
    if rc != NVML_SUCCESS {
        return None;
    }
    let mut buf = [0 as c_char; 96];
    let rc = call_real!(
        used::nvmlDeviceGetUUID,
        unsafe extern "C" fn(NvmlDevice, *mut c_char, c_uint) -> NvmlReturn,
        -1,
        (device, buf.as_mut_ptr(), buf.len() as c_uint)
    );
    let uuid = if rc == NVML_SUCCESS {
        // SAFETY: NVML wrote a NUL-terminated string into buf (it is zero-initialised and larger than a UUID).
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    } else {
        String::new()
    };
    let visible = std::env::var(env::CUDA_VISIBLE_DEVICES).ok();
    cuda_ordinal(visible.as_deref(), index, &uuid).filter(|d| *d < MAX_DEVICES)
}

/// The slice's (used, free, total) for an NVML device, given NVML's free and total: used is what the
/// container is charged on it.
fn slice_numbers(device: NvmlDevice, free: u64, total: u64) -> Option<(u64, u64, u64)> {
    let dev = ordinal_of(device)?;
    let p = crate::process::get()?;
    p.limit(dev)?;
    let (f, t) = slice_view(dev, free, total);
    Some((p.container_used(dev), f, t))
}

/// # Safety
/// As nvml.h.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: NvmlDevice,
    mem: *mut NvmlMemory,
) -> NvmlReturn {
    type F = unsafe extern "C" fn(NvmlDevice, *mut NvmlMemory) -> NvmlReturn;
    let rc = call_real!(
        r::nvmlDeviceGetMemoryInfo,
        F,
        NVML_ERROR_UNINITIALIZED,
        (device, mem)
    );
    // SAFETY: filled by NVML on success; null checked.
    if let (NVML_SUCCESS, Some(m)) = (rc, unsafe { mem.as_mut() }) {
        if let Some((u, f, t)) = slice_numbers(device, m.free, m.total) {
            (m.used, m.free, m.total) = (u, f, t);
        }
    }
    rc
}

/// # Safety
/// As nvml.h.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: NvmlDevice,
    mem: *mut NvmlMemoryV2,
) -> NvmlReturn {
    type F = unsafe extern "C" fn(NvmlDevice, *mut NvmlMemoryV2) -> NvmlReturn;
    let rc = call_real!(
        r::nvmlDeviceGetMemoryInfo_v2,
        F,
        NVML_ERROR_UNINITIALIZED,
        (device, mem)
    );
    // SAFETY: filled by NVML on success; null checked.
    if let (NVML_SUCCESS, Some(m)) = (rc, unsafe { mem.as_mut() }) {
        if let Some((u, f, t)) = slice_numbers(device, m.free, m.total) {
            (m.used, m.free, m.total, m.reserved) = (u, f, t, 0);
        }
    }
    rc
}

#[cfg(test)]
mod tests {
    use super::cuda_ordinal;

    #[test]
    fn nvml_to_cuda_ordinals() {
        let u = "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039";
        assert_eq!(cuda_ordinal(None, 3, u), Some(3));
        assert_eq!(cuda_ordinal(Some("2,3"), 3, u), Some(1));
        assert_eq!(cuda_ordinal(Some("1"), 3, u), None);
        assert_eq!(cuda_ordinal(Some("GPU-0000,GPU-859b872c"), 3, u), Some(1));
        assert_eq!(cuda_ordinal(Some(""), 0, u), Some(0));
    }
}
