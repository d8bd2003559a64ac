//! Allocation, free and memory-query hooks of the driver API.
#![allow(non_snake_case)]

use super::real_fns as r;
use super::reserves;
use super::used;
use crate::cuda::*;
use crate::process::{self, Kind, Process};
use crate::real::{call_real, CU_MISSING};
use crate::{context, log};
use std::ffi::{c_uint, c_ulonglong, c_void};
use vgpu_contract::cache_layout::{OverLimit, MAX_DEVICES};

/// The device of the calling thread's current context.
pub fn current_device() -> Option<usize> {
    let mut dev: CUdevice = -1;
    let rc = call_real!(
        used::cuCtxGetDevice,
        unsafe extern "C" fn(*mut CUdevice) -> CUresult,
        CU_MISSING,
        (&mut dev)
    );
    (rc == CUDA_SUCCESS && dev >= 0 && (dev as usize) < MAX_DEVICES).then_some(dev as usize)
}

/// The refusal line: HAMi's `Device <i> OOM <total> / <limit>`, then what was asked and what holds the room.
pub(crate) fn log_refusal(p: &Process, dev: usize, e: &OverLimit, bytes: u64, what: &str) {
    let why = p
        .cfg
        .refuse_reason
        .as_deref()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    log::error(&format!(
        "Device {dev} OOM {} / {}: {what} of {bytes} bytes refused; the container holds {} bytes on it, {} of them this process's CUDA context{why}",
        e.requested_total,
        e.limit,
        e.requested_total.saturating_sub(bytes),
        p.context_bytes(dev),
    ));
}

/// Charges `bytes` on `dev` (current device if None), makes the allocation with `call`, and records it under
/// the key `key()` reads once it succeeded. Refuses with CUDA_ERROR_OUT_OF_MEMORY past the limit.
fn guarded_alloc(
    kind: Kind,
    dev: Option<usize>,
    bytes: u64,
    what: &str,
    call: impl FnOnce() -> CUresult,
    key: impl FnOnce() -> u64,
) -> CUresult {
    let Some(p) = process::get() else {
        return call();
    };
    let Some(dev) = dev.filter(|d| *d < MAX_DEVICES).or_else(current_device) else {
        return call();
    };
    context::refresh(p, dev, bytes);
    if let Err(e) = p.charge(dev, bytes) {
        log_refusal(p, dev, &e, bytes, what);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let rc = call();
    if rc == CUDA_SUCCESS {
        p.record(kind, key(), dev, bytes);
    } else {
        p.uncharge(dev, bytes);
    }
    rc
}

/// Frees with `call`, then uncharges what the allocation `key` held.
pub(crate) fn guarded_free(kind: Kind, key: u64, call: impl FnOnce() -> CUresult) -> CUresult {
    let rc = call();
    if rc == CUDA_SUCCESS {
        if let Some(p) = process::existing() {
            p.forget(kind, key);
        }
    }
    rc
}

/// # Safety
/// The caller's pointers follow cuda.h's contract for this function.
#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, size: usize) -> CUresult {
    type F = unsafe extern "C" fn(*mut CUdeviceptr, usize) -> CUresult;
    guarded_alloc(
        Kind::DevicePtr,
        None,
        size as u64,
        "cuMemAlloc_v2",
        || call_real!(r::cuMemAlloc_v2, F, CU_MISSING, (dptr, size)),
        // SAFETY: read only after the driver reported success, so it wrote the handle.
        || unsafe { *dptr },
    )
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut CUdeviceptr,
    pitch: *mut usize,
    width: usize,
    height: usize,
    elem: c_uint,
) -> CUresult {
    type F = unsafe extern "C" fn(*mut CUdeviceptr, *mut usize, usize, usize, c_uint) -> CUresult;
    // The pitch is only known afterwards; charge the row width rounded to the 512-byte alignment devices use.
    let estimate = (width as u64).div_ceil(512) * 512 * height as u64;
    guarded_alloc(
        Kind::DevicePtr,
        None,
        estimate,
        "cuMemAllocPitch_v2",
        || {
            call_real!(
                r::cuMemAllocPitch_v2,
                F,
                CU_MISSING,
                (dptr, pitch, width, height, elem)
            )
        },
        // SAFETY: read only after the driver reported success, so it wrote the handle.
        || unsafe { *dptr },
    )
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut CUdeviceptr,
    size: usize,
    flags: c_uint,
) -> CUresult {
    type F = unsafe extern "C" fn(*mut CUdeviceptr, usize, c_uint) -> CUresult;
    guarded_alloc(
        Kind::DevicePtr,
        None,
        size as u64,
        "cuMemAllocManaged",
        || call_real!(r::cuMemAllocManaged, F, CU_MISSING, (dptr, size, flags)),
        // SAFETY: read only after the driver reported success, so it wrote the handle.
        || unsafe { *dptr },
    )
}

hook_pair!(cuMemAllocAsync / cuMemAllocAsync_ptsz(
    dptr: *mut CUdeviceptr, size: usize, stream: CUstream,
) -> CUresult, |real| {
    type F = unsafe extern "C" fn(*mut CUdeviceptr, usize, CUstream) -> CUresult;
    let pool = reserves::device_pool_for_alloc();
    let rc = guarded_alloc(
        Kind::DevicePtr,
        None,
        size as u64,
        "cuMemAllocAsync",
        || call_real!(real, F, CU_MISSING, (dptr, size, stream)),
        // SAFETY: read only after the driver reported success, so it wrote the pointer.
        || unsafe { *dptr },
    );
    reserves::after_pool_alloc(pool);
    rc
});

hook_pair!(cuMemAllocFromPoolAsync / cuMemAllocFromPoolAsync_ptsz(
    dptr: *mut CUdeviceptr, size: usize, pool: *mut c_void, stream: CUstream,
) -> CUresult, |real| {
    type F = unsafe extern "C" fn(*mut CUdeviceptr, usize, *mut c_void, CUstream) -> CUresult;
    reserves::before_pool_alloc(pool);
    let rc = guarded_alloc(
        Kind::DevicePtr,
        None,
        size as u64,
        "cuMemAllocFromPoolAsync",
        || call_real!(real, F, CU_MISSING, (dptr, size, pool, stream)),
        // SAFETY: read only after the driver reported success, so it wrote the pointer.
        || unsafe { *dptr },
    );
    reserves::after_pool_alloc(Some(pool));
    rc
});

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    type F = unsafe extern "C" fn(CUdeviceptr) -> CUresult;
    guarded_free(Kind::DevicePtr, dptr, || {
        call_real!(r::cuMemFree_v2, F, CU_MISSING, (dptr))
    })
}

hook_pair!(cuMemFreeAsync / cuMemFreeAsync_ptsz(dptr: CUdeviceptr, stream: CUstream) -> CUresult, |real| {
    type F = unsafe extern "C" fn(CUdeviceptr, CUstream) -> CUresult;
    let rc = guarded_free(Kind::DevicePtr, dptr, || call_real!(real, F, CU_MISSING, (dptr, stream)));
    // What the free gave back may stay in a pool that keeps memory: charged as that pool's reserve.
    reserves::refresh_kept_pools();
    rc
});

/// # Safety
/// As cuda.h; `prop` points to a CUmemAllocationProp.
#[no_mangle]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut c_ulonglong,
    size: usize,
    prop: *const MemAllocationPropHead,
    flags: c_ulonglong,
) -> CUresult {
    type F = unsafe extern "C" fn(
        *mut c_ulonglong,
        usize,
        *const MemAllocationPropHead,
        c_ulonglong,
    ) -> CUresult;
    // SAFETY: prop is the caller's CUmemAllocationProp (null checked); we read its leading plain fields only.
    let dev = unsafe { prop.as_ref() }
        .filter(|p| p.location_type == CU_MEM_LOCATION_TYPE_DEVICE && p.location_id >= 0)
        .map(|p| p.location_id as usize);
    guarded_alloc(
        Kind::VmmHandle,
        dev,
        size as u64,
        "cuMemCreate",
        || call_real!(r::cuMemCreate, F, CU_MISSING, (handle, size, prop, flags)),
        // SAFETY: read only after the driver reported success, so it wrote the handle.
        || unsafe { *handle },
    )
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuMemRelease(handle: c_ulonglong) -> CUresult {
    type F = unsafe extern "C" fn(c_ulonglong) -> CUresult;
    guarded_free(Kind::VmmHandle, handle, || {
        call_real!(r::cuMemRelease, F, CU_MISSING, (handle))
    })
}

/// Charges an array (or mipmapped array) of `bytes` and creates it with `call`; its handle is what the driver
/// wrote to `arr`.
///
/// # Safety
/// `arr` must be valid for reads once `call` reported success (the caller's out-pointer).
unsafe fn guarded_array(
    kind: Kind,
    what: &str,
    arr: *mut *mut c_void,
    bytes: u64,
    call: impl FnOnce() -> CUresult,
) -> CUresult {
    guarded_alloc(kind, None, bytes, what, call, || {
        // SAFETY: read only after the driver reported success, so it wrote the handle.
        unsafe { *arr as u64 }
    })
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuArrayCreate_v2(
    arr: *mut *mut c_void,
    desc: *const ArrayDescriptor,
) -> CUresult {
    type F = unsafe extern "C" fn(*mut *mut c_void, *const ArrayDescriptor) -> CUresult;
    // SAFETY: desc is the caller's descriptor (null checked).
    let bytes = unsafe { desc.as_ref() }.map_or(0, ArrayDescriptor::bytes);
    let call = || call_real!(r::cuArrayCreate_v2, F, CU_MISSING, (arr, desc));
    // SAFETY: arr is the caller's out-pointer for the handle, as cuda.h requires.
    unsafe { guarded_array(Kind::Array, "cuArrayCreate_v2", arr, bytes, call) }
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuArray3DCreate_v2(
    arr: *mut *mut c_void,
    desc: *const Array3dDescriptor,
) -> CUresult {
    type F = unsafe extern "C" fn(*mut *mut c_void, *const Array3dDescriptor) -> CUresult;
    // SAFETY: desc is the caller's descriptor (null checked).
    let bytes = unsafe { desc.as_ref() }.map_or(0, |d| d.bytes(1));
    let call = || call_real!(r::cuArray3DCreate_v2, F, CU_MISSING, (arr, desc));
    // SAFETY: arr is the caller's out-pointer for the handle, as cuda.h requires.
    unsafe { guarded_array(Kind::Array, "cuArray3DCreate_v2", arr, bytes, call) }
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuArrayDestroy(arr: *mut c_void) -> CUresult {
    type F = unsafe extern "C" fn(*mut c_void) -> CUresult;
    guarded_free(Kind::Array, arr as u64, || {
        call_real!(r::cuArrayDestroy, F, CU_MISSING, (arr))
    })
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuMipmappedArrayCreate(
    arr: *mut *mut c_void,
    desc: *const Array3dDescriptor,
    levels: c_uint,
) -> CUresult {
    type F = unsafe extern "C" fn(*mut *mut c_void, *const Array3dDescriptor, c_uint) -> CUresult;
    // SAFETY: desc is the caller's descriptor (null checked); every level of the chain is charged.
    let bytes = unsafe { desc.as_ref() }.map_or(0, |d| d.bytes(levels));
    let call = || {
        call_real!(
            r::cuMipmappedArrayCreate,
            F,
            CU_MISSING,
            (arr, desc, levels)
        )
    };
    // SAFETY: arr is the caller's out-pointer for the handle, as cuda.h requires.
    unsafe { guarded_array(Kind::Mipmapped, "cuMipmappedArrayCreate", arr, bytes, call) }
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuMipmappedArrayDestroy(arr: *mut c_void) -> CUresult {
    type F = unsafe extern "C" fn(*mut c_void) -> CUresult;
    guarded_free(Kind::Mipmapped, arr as u64, || {
        call_real!(r::cuMipmappedArrayDestroy, F, CU_MISSING, (arr))
    })
}

/// Free and total as the slice sees them: total is the limit, free what is left of it (never more than the
/// card really has free).
pub fn slice_view(dev: usize, real_free: u64, real_total: u64) -> (u64, u64) {
    match process::get().and_then(|p| p.limit(dev).map(|l| (p, l))) {
        Some((p, limit)) => {
            let left = limit.saturating_sub(p.container_used(dev));
            (left.min(real_free), limit.min(real_total))
        }
        None => (real_free, real_total),
    }
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    type F = unsafe extern "C" fn(*mut usize, *mut usize) -> CUresult;
    let rc = call_real!(r::cuMemGetInfo_v2, F, CU_MISSING, (free, total));
    if rc == CUDA_SUCCESS && !free.is_null() && !total.is_null() {
        if let Some(dev) = current_device() {
            if let Some(p) = process::get() {
                context::refresh(p, dev, 0);
            }
            // SAFETY: both pointers were just filled by the driver (non-null checked).
            let (f, t) = unsafe { slice_view(dev, *free as u64, *total as u64) };
            // SAFETY: as above.
            unsafe {
                *free = f as usize;
                *total = t as usize;
            }
        }
    }
    rc
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    type F = unsafe extern "C" fn(*mut usize, CUdevice) -> CUresult;
    let rc = call_real!(r::cuDeviceTotalMem_v2, F, CU_MISSING, (bytes, dev));
    if rc == CUDA_SUCCESS && !bytes.is_null() && (0..MAX_DEVICES as i32).contains(&dev) {
        if let Some(limit) = process::get().and_then(|p| p.limit(dev as usize)) {
            // SAFETY: filled by the driver, non-null checked.
            unsafe { *bytes = limit.min(*bytes as u64) as usize };
        }
    }
    rc
}

/// Refuses a new context on `dev` when the container has no room left for one: a context is device memory
/// too, and without this check a second process of a full container would push it past its slice by a
/// whole context (about 500 MiB for PyTorch on an H100) before its first allocation.
fn context_admitted(dev: CUdevice, what: &str) -> bool {
    let Some(p) = process::get() else { return true };
    if let Some(why) = &p.cfg.revoked {
        log::error(&format!("{what} refused: {why}"));
        return false;
    }
    let Some(dev) = usize::try_from(dev).ok().filter(|d| *d < MAX_DEVICES) else {
        return true;
    };
    let Some(limit) = p.limit(dev) else {
        return true;
    };
    if p.context_bytes(dev) > 0 {
        return true;
    }
    let need = p.region.max_context_bytes();
    let fits = || p.container_used(dev).saturating_add(need) <= limit;
    if fits()
        || (p
            .region
            .reclaim_dead(vgpu_contract::cache_layout::pid_alive)
            > 0
            && fits())
    {
        return true;
    }
    let used = p.container_used(dev);
    log::error(&format!(
        "Device {dev} OOM {} / {limit}: {what} refused: a new CUDA context (about {need} bytes, as measured in this container) does not fit beside the {used} bytes the container holds",
        used + need
    ));
    false
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    if !context_admitted(dev, "cuDevicePrimaryCtxRetain") {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    call_real!(
        r::cuDevicePrimaryCtxRetain,
        unsafe extern "C" fn(*mut CUcontext, CUdevice) -> CUresult,
        CU_MISSING,
        (ctx, dev)
    )
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v2(
    ctx: *mut CUcontext,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    if !context_admitted(dev, "cuCtxCreate_v2") {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    call_real!(
        r::cuCtxCreate_v2,
        unsafe extern "C" fn(*mut CUcontext, c_uint, CUdevice) -> CUresult,
        CU_MISSING,
        (ctx, flags, dev)
    )
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v3(
    ctx: *mut CUcontext,
    params: *mut c_void,
    n: std::ffi::c_int,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    if !context_admitted(dev, "cuCtxCreate_v3") {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    type F = unsafe extern "C" fn(
        *mut CUcontext,
        *mut c_void,
        std::ffi::c_int,
        c_uint,
        CUdevice,
    ) -> CUresult;
    call_real!(
        r::cuCtxCreate_v3,
        F,
        CU_MISSING,
        (ctx, params, n, flags, dev)
    )
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v4(
    ctx: *mut CUcontext,
    params: *mut c_void,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    if !context_admitted(dev, "cuCtxCreate_v4") {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    type F = unsafe extern "C" fn(*mut CUcontext, *mut c_void, c_uint, CUdevice) -> CUresult;
    call_real!(r::cuCtxCreate_v4, F, CU_MISSING, (ctx, params, flags, dev))
}
