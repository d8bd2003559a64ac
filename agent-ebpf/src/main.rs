//! vgpu-agent's uprobes on libcuda. Three programs serve every probed symbol; the attach cookie says which
//! call a hit is (see vgpu-agent-ebpf-common). Entry probes save the arguments per thread, return probes emit
//! one event with the status and the out-parameters; launch probes only bump a per-CPU counter per tgid.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns, bpf_probe_read_user,
    },
    macros::{map, uprobe, uretprobe},
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use vgpu_agent_ebpf_common::{
    CallEvent, InFlightKey, ARGS, DESC_WORDS, FLAG_DESC, FLAG_OUT0, FLAG_OUT1,
};

/// Arguments of calls in flight. LRU: a thread killed inside a call never reaches its return probe, and
/// its entry must not pin a slot forever.
#[map(name = "VGPU_IN_FLIGHT")]
static IN_FLIGHT: LruHashMap<InFlightKey, [u64; ARGS]> = LruHashMap::with_max_entries(16384, 0);

/// 4 MiB: about 30k events of headroom if user space stalls.
#[map(name = "VGPU_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Launches per tgid. Per-CPU so concurrent launchers never contend on one counter.
#[map(name = "VGPU_LAUNCHES")]
static LAUNCHES: PerCpuHashMap<u32, u64> = PerCpuHashMap::with_max_entries(16384, 0);

/// Events lost to a full ring buffer (index 0), so user space knows its view has a hole.
#[map(name = "VGPU_DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

fn cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the helper only reads the attach cookie of the running program from its context.
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) }
}

#[uprobe]
pub fn vgpu_call_entry(ctx: ProbeContext) -> u32 {
    let key = InFlightKey {
        pid_tgid: bpf_get_current_pid_tgid(),
        cookie: cookie(&ctx),
    };
    let mut args = [0u64; ARGS];
    for (i, a) in args.iter_mut().enumerate() {
        *a = ctx.arg(i).unwrap_or(0);
    }
    let _ = IN_FLIGHT.insert(&key, &args, 0);
    0
}

/// Reads a u64 from the caller's memory; 0 when the address is null or unreadable.
fn read_user_u64(addr: u64) -> u64 {
    if addr == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_user checks the address and fails cleanly instead of faulting.
    unsafe { bpf_probe_read_user(addr as *const u64) }.unwrap_or(0)
}

#[uretprobe]
pub fn vgpu_call_return(ctx: RetProbeContext) -> u32 {
    let cookie = cookie(&ctx);
    let pid_tgid = bpf_get_current_pid_tgid();
    let key = InFlightKey { pid_tgid, cookie };
    // SAFETY: the value is copied out before the entry is removed; no other program holds a reference.
    let args = match unsafe { IN_FLIGHT.get(&key) } {
        Some(a) => *a,
        None => return 0, // attached while this call was already running
    };
    let _ = IN_FLIGHT.remove(&key);
    let Some(mut entry) = EVENTS.reserve::<CallEvent>(0) else {
        if let Some(d) = DROPS.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot, only this CPU writes it while this program runs.
            unsafe { *d += 1 };
        }
        warn!(&ctx, "vgpu: event ring buffer full, event dropped");
        return 0;
    };
    let mut ev = CallEvent {
        // SAFETY: plain helper calls without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        cookie,
        ret: ctx.ret::<u64>(),
        args,
        ..CallEvent::default()
    };
    if cookie & FLAG_OUT0 != 0 {
        ev.out0 = read_user_u64(args[0]);
    }
    if cookie & FLAG_OUT1 != 0 {
        ev.out1 = read_user_u64(args[1]);
    }
    if cookie & FLAG_DESC != 0 && args[1] != 0 {
        for i in 0..DESC_WORDS {
            ev.desc[i] = read_user_u64(args[1] + 8 * i as u64);
        }
    }
    entry.write(ev);
    entry.submit(0);
    0
}

#[uprobe]
pub fn vgpu_launch(_ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    match LAUNCHES.get_ptr_mut(&tgid) {
        // SAFETY: this CPU's copy of the value; no other program writes it concurrently.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = LAUNCHES.insert(&tgid, &1, 0);
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
