//! Device memory a program takes without an allocation call, charged like an allocation (refused with
//! CUDA_ERROR_OUT_OF_MEMORY past the limit, uncharged when given back):
//!
//! - **context limits** (`cuCtxSetLimit`): the malloc heap and printf FIFO at their size, the stack at its size
//!   times the threads the device can hold resident (SMs x threads per SM), each beyond the value the context had
//!   when the shim first saw it (the driver's default, already inside the measured context);
//! - **graph memory nodes**: the sum of a graph's `cuGraphAddMemAllocNode` sizes per device, charged when the
//!   graph is instantiated (the driver reserves their addresses there and backs them at launch; charging at
//!   instantiation refuses before anything runs) and uncharged at `cuGraphExecDestroy`;
//! - **module and library loads**: what the load took from the device, as the driver's own free memory
//!   (`cuMemGetInfo`, unhooked) before and after it. No driver call lists a module's globals (`cuModuleGetGlobal`
//!   needs each name), so the free-memory difference is the only measure that covers globals, constant banks and
//!   code alike. Another process allocating or freeing on the card during the load skews it; the context
//!   measurement (NVML's figure minus what is charged) corrects the sum at its next run either way. A load past
//!   the limit is undone (`cuModuleUnload` / `cuLibraryUnload`) and refused;
//! - **memory pools that keep freed memory** (`CU_MEMPOOL_ATTR_RELEASE_THRESHOLD` above 0): the pool's reserved
//!   minus used bytes, as the driver reports them (`cuMemPoolGetAttribute`), charged after every asynchronous
//!   free and trim. Without it, memory freed into one pool stayed on the device uncharged and a second pool
//!   could allocate the slice again. A threshold above the limit is passed to the driver as the limit.
//!
//! Whatever a driver takes later than these calls (lazy module loading, a graph pool grown at launch) is device
//! memory of the process and shows up in the context measurement.
#![allow(non_snake_case)]

use super::memory::{current_device, guarded_free, log_refusal};
use super::real_fns as r;
use super::used;
use crate::cuda::*;
use crate::process::{self, Kind};
use crate::real::{call_real, CU_MISSING};
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void};
use std::sync::Mutex;
use vgpu_contract::cache_layout::MAX_DEVICES;

const CU_LIMIT_STACK_SIZE: c_int = 0;
const CU_LIMIT_MALLOC_HEAP_SIZE: c_int = 2;
const CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: c_int = 16;
const CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: c_int = 39;
const CU_MEMPOOL_ATTR_RELEASE_THRESHOLD: c_int = 4;
const CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT: c_int = 5;
const CU_MEMPOOL_ATTR_USED_MEM_CURRENT: c_int = 7;

/// Byte offsets in `CUmemPoolProps` (and so in `CUDA_MEM_ALLOC_NODE_PARAMS`, which starts with one) of the
/// location type and id, and of `bytesize` in `CUDA_MEM_ALLOC_NODE_PARAMS`.
const PROPS_LOCATION_TYPE: usize = 8;
const PROPS_LOCATION_ID: usize = 12;
const NODE_BYTESIZE: usize = 104;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device a `CUmemPoolProps` (or a struct starting with one) names, if it names a device.
///
/// # Safety
/// `props` is null or points to at least 16 readable bytes laid out as `CUmemPoolProps`.
unsafe fn props_device(props: *const c_void) -> Option<usize> {
    if props.is_null() {
        return None;
    }
    let b = props as *const u8;
    // SAFETY: both fields lie within the first 16 bytes the caller vouched for; read unaligned to be safe.
    let (ty, id) = unsafe {
        (
            (b.add(PROPS_LOCATION_TYPE) as *const c_int).read_unaligned(),
            (b.add(PROPS_LOCATION_ID) as *const c_int).read_unaligned(),
        )
    };
    (ty == CU_MEM_LOCATION_TYPE_DEVICE && id >= 0 && (id as usize) < MAX_DEVICES)
        .then_some(id as usize)
}

fn current_context() -> u64 {
    let mut ctx: CUcontext = std::ptr::null_mut();
    let rc = call_real!(
        used::cuCtxGetCurrent,
        unsafe extern "C" fn(*mut CUcontext) -> CUresult,
        CU_MISSING,
        (&mut ctx)
    );
    if rc == CUDA_SUCCESS {
        ctx as u64
    } else {
        0
    }
}

fn device_attribute(dev: usize, attr: c_int) -> Option<u64> {
    let mut v: c_int = 0;
    let rc = call_real!(
        used::cuDeviceGetAttribute,
        unsafe extern "C" fn(*mut c_int, c_int, CUdevice) -> CUresult,
        CU_MISSING,
        (&mut v, attr, dev as CUdevice)
    );
    (rc == CUDA_SUCCESS && v > 0).then_some(v as u64)
}

// ---- context limits ----

/// Device bytes a context limit of `value` takes on `dev`.
fn limit_bytes(dev: usize, limit: c_int, value: u64) -> u64 {
    if limit == CU_LIMIT_STACK_SIZE {
        let resident = device_attribute(dev, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .unwrap_or(1)
            .saturating_mul(
                device_attribute(dev, CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR)
                    .unwrap_or(1),
            );
        value.saturating_mul(resident)
    } else {
        value
    }
}

/// The bytes each (context, limit) took before the shim charged anything for it: inside the context's own
/// measurement already.
static LIMIT_BASELINE: Mutex<Vec<((u64, c_int), u64)>> = Mutex::new(Vec::new());

fn limit_baseline(ctx: u64, dev: usize, limit: c_int) -> u64 {
    if let Some((_, b)) = lock(&LIMIT_BASELINE)
        .iter()
        .find(|(k, _)| *k == (ctx, limit))
    {
        return *b;
    }
    let mut v: usize = 0;
    let rc = call_real!(
        used::cuCtxGetLimit,
        unsafe extern "C" fn(*mut usize, c_int) -> CUresult,
        CU_MISSING,
        (&mut v, limit)
    );
    let b = if rc == CUDA_SUCCESS {
        limit_bytes(dev, limit, v as u64)
    } else {
        0
    };
    lock(&LIMIT_BASELINE).push(((ctx, limit), b));
    b
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuCtxSetLimit(limit: c_int, value: usize) -> CUresult {
    type F = unsafe extern "C" fn(c_int, usize) -> CUresult;
    let real = || call_real!(r::cuCtxSetLimit, F, CU_MISSING, (limit, value));
    if !(CU_LIMIT_STACK_SIZE..=CU_LIMIT_MALLOC_HEAP_SIZE).contains(&limit) {
        return real();
    }
    let (Some(p), Some(dev)) = (process::get(), current_device()) else {
        return real();
    };
    let ctx = current_context();
    let kind = Kind::CtxLimit(limit as u8);
    let want =
        limit_bytes(dev, limit, value as u64).saturating_sub(limit_baseline(ctx, dev, limit));
    crate::context::refresh(p, dev, want.saturating_sub(p.held(kind, ctx)));
    let old = match p.set_held(kind, ctx, dev, want) {
        Ok(old) => old,
        Err(e) => {
            log_refusal(p, dev, &e, want - p.held(kind, ctx), "cuCtxSetLimit");
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
    };
    let rc = real();
    if rc != CUDA_SUCCESS {
        p.set_held_unchecked(kind, ctx, dev, old);
    }
    rc
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: CUcontext) -> CUresult {
    type F = unsafe extern "C" fn(CUcontext) -> CUresult;
    let rc = call_real!(r::cuCtxDestroy_v2, F, CU_MISSING, (ctx));
    if rc == CUDA_SUCCESS {
        if let Some(p) = process::existing() {
            for limit in CU_LIMIT_STACK_SIZE..=CU_LIMIT_MALLOC_HEAP_SIZE {
                p.forget(Kind::CtxLimit(limit as u8), ctx as u64);
            }
        }
        lock(&LIMIT_BASELINE).retain(|((c, _), _)| *c != ctx as u64);
    }
    rc
}

// ---- graph memory nodes ----

/// Bytes of memory nodes per graph and device, added as nodes are; charged when the graph is instantiated.
static GRAPH_NODES: Mutex<Vec<(u64, [u64; MAX_DEVICES])>> = Mutex::new(Vec::new());

/// # Safety
/// As cuda.h; `params` points to a `CUDA_MEM_ALLOC_NODE_PARAMS`.
#[no_mangle]
pub unsafe extern "C" fn cuGraphAddMemAllocNode(
    node: *mut *mut c_void,
    graph: *mut c_void,
    deps: *const *mut c_void,
    ndeps: usize,
    params: *mut c_void,
) -> CUresult {
    type F = unsafe extern "C" fn(
        *mut *mut c_void,
        *mut c_void,
        *const *mut c_void,
        usize,
        *mut c_void,
    ) -> CUresult;
    let rc = call_real!(
        r::cuGraphAddMemAllocNode,
        F,
        CU_MISSING,
        (node, graph, deps, ndeps, params)
    );
    if rc != CUDA_SUCCESS || params.is_null() {
        return rc;
    }
    // SAFETY: the driver accepted params as a CUDA_MEM_ALLOC_NODE_PARAMS, which holds the pool props and then
    // bytesize at NODE_BYTESIZE.
    let (dev, bytes) = unsafe {
        (
            props_device(params),
            ((params as *const u8).add(NODE_BYTESIZE) as *const u64).read_unaligned(),
        )
    };
    if let Some(dev) = dev.or_else(current_device) {
        let mut graphs = lock(&GRAPH_NODES);
        let key = graph as u64;
        match graphs.iter_mut().find(|(g, _)| *g == key) {
            Some((_, sizes)) => sizes[dev] = sizes[dev].saturating_add(bytes),
            None => {
                let mut sizes = [0; MAX_DEVICES];
                sizes[dev] = bytes;
                graphs.push((key, sizes));
            }
        }
    }
    rc
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuGraphDestroy(graph: *mut c_void) -> CUresult {
    type F = unsafe extern "C" fn(*mut c_void) -> CUresult;
    let rc = call_real!(r::cuGraphDestroy, F, CU_MISSING, (graph));
    if rc == CUDA_SUCCESS {
        lock(&GRAPH_NODES).retain(|(g, _)| *g != graph as u64);
    }
    rc
}

/// Charges the memory nodes of `graph` per device, instantiates it with `call`, and records the charge under
/// the exec handle `exec` receives.
///
/// # Safety
/// `exec` must be readable once `call` reported success (the caller's out-pointer).
unsafe fn guarded_instantiate(
    graph: *mut c_void,
    exec: *mut *mut c_void,
    what: &str,
    call: impl FnOnce() -> CUresult,
) -> CUresult {
    let sizes = lock(&GRAPH_NODES)
        .iter()
        .find(|(g, _)| *g == graph as u64)
        .map(|(_, s)| *s);
    let (Some(p), Some(sizes)) = (process::get(), sizes) else {
        return call();
    };
    let mut charged: Vec<(usize, u64)> = Vec::new();
    for (dev, &bytes) in sizes.iter().enumerate().filter(|(_, b)| **b > 0) {
        crate::context::refresh(p, dev, bytes);
        if let Err(e) = p.charge(dev, bytes) {
            log_refusal(p, dev, &e, bytes, what);
            for (d, b) in charged {
                p.uncharge(d, b);
            }
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        charged.push((dev, bytes));
    }
    let rc = call();
    if rc == CUDA_SUCCESS {
        // SAFETY: written by the driver on success.
        let key = unsafe { *exec } as u64;
        for (dev, bytes) in charged {
            p.record(Kind::GraphExec(dev as u8), key, dev, bytes);
        }
    } else {
        for (d, b) in charged {
            p.uncharge(d, b);
        }
    }
    rc
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    exec: *mut *mut c_void,
    graph: *mut c_void,
    flags: c_ulonglong,
) -> CUresult {
    type F = unsafe extern "C" fn(*mut *mut c_void, *mut c_void, c_ulonglong) -> CUresult;
    let call = || {
        call_real!(
            r::cuGraphInstantiateWithFlags,
            F,
            CU_MISSING,
            (exec, graph, flags)
        )
    };
    // SAFETY: exec is the caller's out-pointer, as cuda.h requires.
    unsafe { guarded_instantiate(graph, exec, "cuGraphInstantiateWithFlags", call) }
}

/// The CUDA 10 entry point (same arguments as `_v2`), still exported for programs built against it.
///
/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiate(
    exec: *mut *mut c_void,
    graph: *mut c_void,
    err_node: *mut *mut c_void,
    log: *mut c_char,
    log_size: usize,
) -> CUresult {
    type F = unsafe extern "C" fn(
        *mut *mut c_void,
        *mut c_void,
        *mut *mut c_void,
        *mut c_char,
        usize,
    ) -> CUresult;
    let call = || {
        call_real!(
            r::cuGraphInstantiate,
            F,
            CU_MISSING,
            (exec, graph, err_node, log, log_size)
        )
    };
    // SAFETY: exec is the caller's out-pointer, as cuda.h requires.
    unsafe { guarded_instantiate(graph, exec, "cuGraphInstantiate", call) }
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiate_v2(
    exec: *mut *mut c_void,
    graph: *mut c_void,
    err_node: *mut *mut c_void,
    log: *mut c_char,
    log_size: usize,
) -> CUresult {
    type F = unsafe extern "C" fn(
        *mut *mut c_void,
        *mut c_void,
        *mut *mut c_void,
        *mut c_char,
        usize,
    ) -> CUresult;
    let call = || {
        call_real!(
            r::cuGraphInstantiate_v2,
            F,
            CU_MISSING,
            (exec, graph, err_node, log, log_size)
        )
    };
    // SAFETY: exec is the caller's out-pointer, as cuda.h requires.
    unsafe { guarded_instantiate(graph, exec, "cuGraphInstantiate_v2", call) }
}

hook_pair!(cuGraphInstantiateWithParams / cuGraphInstantiateWithParams_ptsz(
    exec: *mut *mut c_void, graph: *mut c_void, params: *mut c_void,
) -> CUresult, |real| {
    type F = unsafe extern "C" fn(*mut *mut c_void, *mut c_void, *mut c_void) -> CUresult;
    let call = || call_real!(real, F, CU_MISSING, (exec, graph, params));
    // SAFETY: exec is the caller's out-pointer, as cuda.h requires.
    unsafe { guarded_instantiate(graph, exec, "cuGraphInstantiateWithParams", call) }
});

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuGraphExecDestroy(exec: *mut c_void) -> CUresult {
    type F = unsafe extern "C" fn(*mut c_void) -> CUresult;
    let rc = call_real!(r::cuGraphExecDestroy, F, CU_MISSING, (exec));
    if rc == CUDA_SUCCESS {
        if let Some(p) = process::existing() {
            for dev in 0..MAX_DEVICES {
                p.forget(Kind::GraphExec(dev as u8), exec as u64);
            }
        }
    }
    rc
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGraphMemTrim(dev: CUdevice) -> CUresult {
    type F = unsafe extern "C" fn(CUdevice) -> CUresult;
    let rc = call_real!(r::cuDeviceGraphMemTrim, F, CU_MISSING, (dev));
    // The graph pool gave memory back: what the context measurement counted of it goes with the next one.
    if let (CUDA_SUCCESS, Some(p), Ok(d)) = (rc, process::existing(), usize::try_from(dev)) {
        p.remeasure(d);
    }
    rc
}

// ---- modules and libraries ----

/// The driver's own free memory on the current device (unhooked).
fn real_free() -> Option<u64> {
    let (mut free, mut total) = (0usize, 0usize);
    type F = unsafe extern "C" fn(*mut usize, *mut usize) -> CUresult;
    let rc = call_real!(r::cuMemGetInfo_v2, F, CU_MISSING, (&mut free, &mut total));
    (rc == CUDA_SUCCESS).then_some(free as u64)
}

/// Loads with `load`; charges what the load took from the device under the handle in `out`, or, past the
/// limit, unloads it with `unload` and refuses.
///
/// # Safety
/// `out` must be readable once `load` reported success (the caller's out-pointer for the handle).
unsafe fn guarded_load(
    out: *mut *mut c_void,
    what: &str,
    load: impl FnOnce() -> CUresult,
    unload: impl FnOnce(*mut c_void) -> CUresult,
) -> CUresult {
    let (Some(p), Some(dev)) = (process::get(), current_device()) else {
        return load();
    };
    let before = real_free();
    let rc = load();
    if rc != CUDA_SUCCESS {
        return rc;
    }
    // SAFETY: written by the driver on success.
    let handle = unsafe { *out };
    let took = match (before, real_free()) {
        (Some(b), Some(a)) => b.saturating_sub(a),
        _ => 0,
    };
    if took == 0 {
        return rc;
    }
    if let Err(e) = p.charge(dev, took) {
        log_refusal(p, dev, &e, took, what);
        let _ = unload(handle);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    p.record(Kind::Module, handle as u64, dev, took);
    rc
}

type ModUnloadF = unsafe extern "C" fn(*mut c_void) -> CUresult;

fn module_unload(m: *mut c_void) -> CUresult {
    call_real!(r::cuModuleUnload, ModUnloadF, CU_MISSING, (m))
}

fn library_unload(l: *mut c_void) -> CUresult {
    call_real!(r::cuLibraryUnload, ModUnloadF, CU_MISSING, (l))
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoad(m: *mut *mut c_void, path: *const c_char) -> CUresult {
    type F = unsafe extern "C" fn(*mut *mut c_void, *const c_char) -> CUresult;
    let load = || call_real!(r::cuModuleLoad, F, CU_MISSING, (m, path));
    // SAFETY: m is the caller's out-pointer.
    unsafe { guarded_load(m, "cuModuleLoad", load, module_unload) }
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(m: *mut *mut c_void, image: *const c_void) -> CUresult {
    type F = unsafe extern "C" fn(*mut *mut c_void, *const c_void) -> CUresult;
    let load = || call_real!(r::cuModuleLoadData, F, CU_MISSING, (m, image));
    // SAFETY: m is the caller's out-pointer.
    unsafe { guarded_load(m, "cuModuleLoadData", load, module_unload) }
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    m: *mut *mut c_void,
    image: *const c_void,
    n: c_uint,
    opts: *mut c_int,
    vals: *mut *mut c_void,
) -> CUresult {
    type F = unsafe extern "C" fn(
        *mut *mut c_void,
        *const c_void,
        c_uint,
        *mut c_int,
        *mut *mut c_void,
    ) -> CUresult;
    let load = || {
        call_real!(
            r::cuModuleLoadDataEx,
            F,
            CU_MISSING,
            (m, image, n, opts, vals)
        )
    };
    // SAFETY: m is the caller's out-pointer.
    unsafe { guarded_load(m, "cuModuleLoadDataEx", load, module_unload) }
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadFatBinary(
    m: *mut *mut c_void,
    fatbin: *const c_void,
) -> CUresult {
    type F = unsafe extern "C" fn(*mut *mut c_void, *const c_void) -> CUresult;
    let load = || call_real!(r::cuModuleLoadFatBinary, F, CU_MISSING, (m, fatbin));
    // SAFETY: m is the caller's out-pointer.
    unsafe { guarded_load(m, "cuModuleLoadFatBinary", load, module_unload) }
}

type LibLoadTail = (
    *mut c_int,
    *mut *mut c_void,
    c_uint,
    *mut c_int,
    *mut *mut c_void,
    c_uint,
);

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuLibraryLoadData(
    lib: *mut *mut c_void,
    code: *const c_void,
    jit_opts: *mut c_int,
    jit_vals: *mut *mut c_void,
    n_jit: c_uint,
    lib_opts: *mut c_int,
    lib_vals: *mut *mut c_void,
    n_lib: c_uint,
) -> CUresult {
    type F = unsafe extern "C" fn(
        *mut *mut c_void,
        *const c_void,
        *mut c_int,
        *mut *mut c_void,
        c_uint,
        *mut c_int,
        *mut *mut c_void,
        c_uint,
    ) -> CUresult;
    let t: LibLoadTail = (jit_opts, jit_vals, n_jit, lib_opts, lib_vals, n_lib);
    let load = || {
        call_real!(
            r::cuLibraryLoadData,
            F,
            CU_MISSING,
            (lib, code, t.0, t.1, t.2, t.3, t.4, t.5)
        )
    };
    // SAFETY: lib is the caller's out-pointer.
    unsafe { guarded_load(lib, "cuLibraryLoadData", load, library_unload) }
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuLibraryLoadFromFile(
    lib: *mut *mut c_void,
    path: *const c_char,
    jit_opts: *mut c_int,
    jit_vals: *mut *mut c_void,
    n_jit: c_uint,
    lib_opts: *mut c_int,
    lib_vals: *mut *mut c_void,
    n_lib: c_uint,
) -> CUresult {
    type F = unsafe extern "C" fn(
        *mut *mut c_void,
        *const c_char,
        *mut c_int,
        *mut *mut c_void,
        c_uint,
        *mut c_int,
        *mut *mut c_void,
        c_uint,
    ) -> CUresult;
    let t: LibLoadTail = (jit_opts, jit_vals, n_jit, lib_opts, lib_vals, n_lib);
    let load = || {
        call_real!(
            r::cuLibraryLoadFromFile,
            F,
            CU_MISSING,
            (lib, path, t.0, t.1, t.2, t.3, t.4, t.5)
        )
    };
    // SAFETY: lib is the caller's out-pointer.
    unsafe { guarded_load(lib, "cuLibraryLoadFromFile", load, library_unload) }
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(m: *mut c_void) -> CUresult {
    guarded_free(Kind::Module, m as u64, || module_unload(m))
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuLibraryUnload(lib: *mut c_void) -> CUresult {
    guarded_free(Kind::Module, lib as u64, || library_unload(lib))
}

// ---- memory pools ----

/// Pools whose release threshold is above 0 (they keep freed memory), with their device.
static KEEPING_POOLS: Mutex<Vec<(u64, usize)>> = Mutex::new(Vec::new());
/// Devices of the pools this process created.
static POOL_DEVICES: Mutex<Vec<(u64, usize)>> = Mutex::new(Vec::new());

fn pool_attribute(pool: u64, attr: c_int) -> Option<u64> {
    let mut v: u64 = 0;
    type F = unsafe extern "C" fn(*mut c_void, c_int, *mut c_void) -> CUresult;
    let rc = call_real!(
        used::cuMemPoolGetAttribute,
        F,
        CU_MISSING,
        (pool as *mut c_void, attr, (&mut v as *mut u64).cast())
    );
    (rc == CUDA_SUCCESS).then_some(v)
}

/// Charges what `pool` keeps reserved beyond its allocations in use.
fn refresh_kept(pool: u64, dev: usize) {
    let Some(p) = process::existing() else { return };
    let reserved = pool_attribute(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT);
    let used = pool_attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT);
    if let (Some(r), Some(u)) = (reserved, used) {
        p.set_held_unchecked(Kind::PoolKeep, pool, dev, r.saturating_sub(u));
    }
}

fn keeping_pool(pool: u64) -> Option<usize> {
    lock(&KEEPING_POOLS)
        .iter()
        .find(|(p, _)| *p == pool)
        .map(|(_, d)| *d)
}

/// Re-reads every pool that keeps memory (after a free, which may have moved memory into one).
pub fn refresh_kept_pools() {
    let pools = lock(&KEEPING_POOLS).clone();
    for (pool, dev) in pools {
        refresh_kept(pool, dev);
    }
}

/// Before an allocation from `pool`: what the pool keeps may be reused by it, so its reserve charge is
/// dropped here and measured again afterwards ([`after_pool_alloc`]); other pools' reserves stay charged.
pub fn before_pool_alloc(pool: *mut c_void) {
    let pool = pool as u64;
    if let (Some(dev), Some(p)) = (keeping_pool(pool), process::existing()) {
        p.set_held_unchecked(Kind::PoolKeep, pool, dev, 0);
    }
}

pub fn after_pool_alloc(pool: Option<*mut c_void>) {
    if let Some(pool) = pool.map(|p| p as u64) {
        if let Some(dev) = keeping_pool(pool) {
            refresh_kept(pool, dev);
        }
    }
}

/// The current device's pool (what `cuMemAllocAsync` allocates from), with its reserve charge dropped as in
/// [`before_pool_alloc`], when it keeps memory.
pub fn device_pool_for_alloc() -> Option<*mut c_void> {
    if lock(&KEEPING_POOLS).is_empty() {
        return None;
    }
    let dev = current_device()?;
    let mut pool: *mut c_void = std::ptr::null_mut();
    let rc = call_real!(
        used::cuDeviceGetMemPool,
        unsafe extern "C" fn(*mut *mut c_void, CUdevice) -> CUresult,
        CU_MISSING,
        (&mut pool, dev as CUdevice)
    );
    (rc == CUDA_SUCCESS && keeping_pool(pool as u64).is_some()).then(|| {
        before_pool_alloc(pool);
        pool
    })
}

/// # Safety
/// As cuda.h; `props` points to a `CUmemPoolProps`.
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolCreate(pool: *mut *mut c_void, props: *const c_void) -> CUresult {
    type F = unsafe extern "C" fn(*mut *mut c_void, *const c_void) -> CUresult;
    let rc = call_real!(r::cuMemPoolCreate, F, CU_MISSING, (pool, props));
    if rc == CUDA_SUCCESS && !pool.is_null() {
        // SAFETY: props was accepted by the driver as a CUmemPoolProps; pool was written on success.
        if let Some(dev) = unsafe { props_device(props) } {
            lock(&POOL_DEVICES).push((unsafe { *pool } as u64, dev));
        }
    }
    rc
}

fn pool_device(pool: u64) -> Option<usize> {
    lock(&POOL_DEVICES)
        .iter()
        .find(|(p, _)| *p == pool)
        .map(|(_, d)| *d)
        .or_else(current_device)
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolSetAttribute(
    pool: *mut c_void,
    attr: c_int,
    value: *mut c_void,
) -> CUresult {
    type F = unsafe extern "C" fn(*mut c_void, c_int, *mut c_void) -> CUresult;
    if attr != CU_MEMPOOL_ATTR_RELEASE_THRESHOLD || value.is_null() {
        return call_real!(r::cuMemPoolSetAttribute, F, CU_MISSING, (pool, attr, value));
    }
    let (Some(p), Some(dev)) = (process::get(), pool_device(pool as u64)) else {
        return call_real!(r::cuMemPoolSetAttribute, F, CU_MISSING, (pool, attr, value));
    };
    // SAFETY: for this attribute value points to a cuuint64_t (cuda.h).
    let asked = unsafe { (value as *const u64).read_unaligned() };
    // A pool never needs to keep more than the whole slice; the caller's own value is left as it was.
    let mut threshold = p.limit(dev).map_or(asked, |l| asked.min(l));
    let rc = call_real!(
        r::cuMemPoolSetAttribute,
        F,
        CU_MISSING,
        (pool, attr, (&mut threshold as *mut u64).cast())
    );
    if rc == CUDA_SUCCESS {
        let key = pool as u64;
        {
            let mut keeping = lock(&KEEPING_POOLS);
            keeping.retain(|(k, _)| *k != key);
            if threshold > 0 {
                keeping.push((key, dev));
            }
        }
        refresh_kept(key, dev);
    }
    rc
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolTrimTo(pool: *mut c_void, keep: usize) -> CUresult {
    type F = unsafe extern "C" fn(*mut c_void, usize) -> CUresult;
    let rc = call_real!(r::cuMemPoolTrimTo, F, CU_MISSING, (pool, keep));
    if let (CUDA_SUCCESS, Some(dev)) = (rc, keeping_pool(pool as u64)) {
        refresh_kept(pool as u64, dev);
    }
    rc
}

/// # Safety
/// As cuda.h.
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolDestroy(pool: *mut c_void) -> CUresult {
    type F = unsafe extern "C" fn(*mut c_void) -> CUresult;
    let rc = call_real!(r::cuMemPoolDestroy, F, CU_MISSING, (pool));
    if rc == CUDA_SUCCESS {
        let key = pool as u64;
        lock(&KEEPING_POOLS).retain(|(k, _)| *k != key);
        lock(&POOL_DEVICES).retain(|(k, _)| *k != key);
        if let Some(p) = process::existing() {
            p.forget(Kind::PoolKeep, key);
        }
    }
    rc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_props_name_their_device() {
        let mut props = [0u8; 88];
        props[PROPS_LOCATION_TYPE..PROPS_LOCATION_TYPE + 4].copy_from_slice(&1i32.to_ne_bytes());
        props[PROPS_LOCATION_ID..PROPS_LOCATION_ID + 4].copy_from_slice(&3i32.to_ne_bytes());
        // SAFETY: 88 readable bytes.
        assert_eq!(unsafe { props_device(props.as_ptr().cast()) }, Some(3));
        props[PROPS_LOCATION_TYPE] = 2; // host memory
                                        // SAFETY: as above.
        assert_eq!(unsafe { props_device(props.as_ptr().cast()) }, None);
        // SAFETY: null is allowed.
        assert_eq!(unsafe { props_device(std::ptr::null()) }, None);
    }
}
