//! What vgpu-agent's eBPF programs and user space agree on: the probed symbols, the attach cookies that tell
//! the shared programs which call they are in, and the event record on the ring buffer.
//!
//! The eBPF side is deliberately generic: an entry probe saves the raw arguments, the return probe copies the
//! out-parameters the cookie asks for and emits one [`CallEvent`]. What each call means (an allocation of
//! `args[1]` bytes at `*args[0]`, a free of `args[0]`, ...) is decoded in user space, where it is unit-tested.
#![no_std]

/// A call kind in the low 16 bits of an attach cookie.
pub const KIND_MASK: u64 = 0xffff;
/// Return probe: read the u64 that `args[0]` points to into [`CallEvent::out0`] (a returned pointer/handle).
pub const FLAG_OUT0: u64 = 1 << 16;
/// Return probe: read the u64 that `args[1]` points to into [`CallEvent::out1`] (cuMemAllocPitch's pitch).
pub const FLAG_OUT1: u64 = 1 << 17;
/// Return probe: read [`DESC_WORDS`] words at `args[1]` into [`CallEvent::desc`] (an array descriptor).
pub const FLAG_DESC: u64 = 1 << 18;

pub const DESC_WORDS: usize = 5;
pub const ARGS: usize = 5;

/// Call kinds. Stable only within one build (user space and eBPF are built together).
pub mod kind {
    pub const MEM_ALLOC: u64 = 1;
    pub const MEM_ALLOC_PITCH: u64 = 2;
    pub const MEM_ALLOC_MANAGED: u64 = 3;
    pub const MEM_ALLOC_ASYNC: u64 = 4;
    pub const MEM_ALLOC_FROM_POOL_ASYNC: u64 = 5;
    pub const MEM_FREE: u64 = 6;
    pub const MEM_FREE_ASYNC: u64 = 7;
    pub const MEM_CREATE: u64 = 8;
    pub const MEM_RELEASE: u64 = 9;
    pub const ARRAY_CREATE: u64 = 10;
    pub const ARRAY_3D_CREATE: u64 = 11;
    pub const ARRAY_DESTROY: u64 = 12;
    pub const MIPMAPPED_ARRAY_CREATE: u64 = 13;
    pub const MIPMAPPED_ARRAY_DESTROY: u64 = 14;
    pub const CTX_CREATE_V2: u64 = 20;
    pub const CTX_CREATE_V3: u64 = 21;
    pub const CTX_CREATE_V4: u64 = 22;
    pub const PRIMARY_CTX_RETAIN: u64 = 23;
    pub const PRIMARY_CTX_RELEASE: u64 = 24;
    pub const CTX_DESTROY: u64 = 25;
}

use kind::*;

/// Every call probed at entry and return: (exported symbol, cookie).
pub const CALL_PROBES: &[(&str, u64)] = &[
    ("cuMemAlloc_v2", MEM_ALLOC | FLAG_OUT0),
    (
        "cuMemAllocPitch_v2",
        MEM_ALLOC_PITCH | FLAG_OUT0 | FLAG_OUT1,
    ),
    ("cuMemAllocManaged", MEM_ALLOC_MANAGED | FLAG_OUT0),
    ("cuMemAllocAsync", MEM_ALLOC_ASYNC | FLAG_OUT0),
    ("cuMemAllocAsync_ptsz", MEM_ALLOC_ASYNC | FLAG_OUT0),
    (
        "cuMemAllocFromPoolAsync",
        MEM_ALLOC_FROM_POOL_ASYNC | FLAG_OUT0,
    ),
    (
        "cuMemAllocFromPoolAsync_ptsz",
        MEM_ALLOC_FROM_POOL_ASYNC | FLAG_OUT0,
    ),
    ("cuMemFree_v2", MEM_FREE),
    ("cuMemFreeAsync", MEM_FREE_ASYNC),
    ("cuMemFreeAsync_ptsz", MEM_FREE_ASYNC),
    ("cuMemCreate", MEM_CREATE | FLAG_OUT0),
    ("cuMemRelease", MEM_RELEASE),
    ("cuArrayCreate_v2", ARRAY_CREATE | FLAG_OUT0 | FLAG_DESC),
    (
        "cuArray3DCreate_v2",
        ARRAY_3D_CREATE | FLAG_OUT0 | FLAG_DESC,
    ),
    ("cuArrayDestroy", ARRAY_DESTROY),
    (
        "cuMipmappedArrayCreate",
        MIPMAPPED_ARRAY_CREATE | FLAG_OUT0 | FLAG_DESC,
    ),
    ("cuMipmappedArrayDestroy", MIPMAPPED_ARRAY_DESTROY),
    ("cuCtxCreate_v2", CTX_CREATE_V2 | FLAG_OUT0),
    ("cuCtxCreate_v3", CTX_CREATE_V3 | FLAG_OUT0),
    ("cuCtxCreate_v4", CTX_CREATE_V4 | FLAG_OUT0),
    ("cuDevicePrimaryCtxRetain", PRIMARY_CTX_RETAIN | FLAG_OUT0),
    ("cuDevicePrimaryCtxRelease_v2", PRIMARY_CTX_RELEASE),
    ("cuCtxDestroy_v2", CTX_DESTROY),
];

/// Launch symbols: counted per tgid in a per-CPU map (no event), and only when launch probes are on.
pub const LAUNCH_SYMBOLS: &[&str] = &[
    "cuLaunchKernel",
    "cuLaunchKernel_ptsz",
    "cuLaunchKernelEx",
    "cuLaunchKernelEx_ptsz",
    "cuLaunchCooperativeKernel",
    "cuLaunchCooperativeKernel_ptsz",
    "cuGraphLaunch",
    "cuGraphLaunch_ptsz",
];

/// Entry probe programs (one program attached to every symbol, told apart by cookie).
pub const PROG_CALL_ENTRY: &str = "vgpu_call_entry";
pub const PROG_CALL_RETURN: &str = "vgpu_call_return";
pub const PROG_LAUNCH: &str = "vgpu_launch";
pub const MAP_EVENTS: &str = "VGPU_EVENTS";
pub const MAP_LAUNCHES: &str = "VGPU_LAUNCHES";
pub const MAP_DROPS: &str = "VGPU_DROPS";
pub const MAP_IN_FLIGHT: &str = "VGPU_IN_FLIGHT";
/// The maps a restarted agent takes over from its predecessor (pinned on bpffs): the ring buffer with the
/// events it has not read yet, and the calls in flight, so a call whose entry the old programs saw and whose
/// return the new ones see is reported once.
pub const HANDED_OVER_MAPS: &[&str] = &[MAP_EVENTS, MAP_IN_FLIGHT, MAP_LAUNCHES, MAP_DROPS];

/// One probed call that returned, as the return probe saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallEvent {
    /// bpf_ktime_get_ns() at return.
    pub ts_ns: u64,
    /// cgroup v2 id (the inode of the cgroup directory) of the calling task.
    pub cgroup_id: u64,
    pub tgid: u32,
    pub pid: u32,
    /// The attach cookie: kind and flags.
    pub cookie: u64,
    /// The return register: a CUresult in its low 32 bits.
    pub ret: u64,
    /// The first five integer arguments as they were at entry.
    pub args: [u64; ARGS],
    pub out0: u64,
    pub out1: u64,
    pub desc: [u64; DESC_WORDS],
}

/// Key of the saved-arguments map: one call in flight per thread and kind.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlightKey {
    pub pid_tgid: u64,
    pub cookie: u64,
}
