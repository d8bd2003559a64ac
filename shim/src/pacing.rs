//! Compute slices: holds kernel launches outside the container's window (see [`crate::window`]).
//!
//! The control loop: a monitor thread (started on the first launch of a process whose slice has an SM limit)
//! keeps the container's card entry alive, reads the card every [`TICK_NS`] and publishes for each device a
//! plan word ("free", or the card's period and the window's offset and length in it). Between ticks it wakes at each
//! window edge and opens or closes the device's gate. A launch reads the gate: open, it goes straight to the
//! driver; closed, it sleeps until the window opens.
//!
//! Work still running when a window closes is measured, not guessed: the first launch held back after a
//! window synchronizes the context (or, when nothing was launched since the program's own last synchronize,
//! takes the end of the work from that one), and the time the GPU kept running past the window end becomes debt
//! that shortens the container's next windows. So the share is GPU time actually used, whatever the kernel sizes.
//!
//! Cost: with no SM limit a launch pays one relaxed load. Under a limit, with the gate open: three relaxed
//! atomics, no clock read, no syscall, no lock, no allocation, whatever the clock costs on the machine (on a
//! host whose clocksource has no vDSO path, `clock_gettime` is a system call). A program's synchronize reads
//! the clock only while its window is closed.

use crate::hooks::used;
use crate::process::{self, now_ns};
use crate::real::call_real;
use crate::window::{self, Plan};
use crate::{cuda::*, log};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use vgpu_contract::cache_layout::MAX_DEVICES;
use vgpu_contract::card_layout::CardFile;
use vgpu_contract::limits::{valid_pacing_period, CorePolicy};

/// How often the monitor re-reads the card and refreshes activity.
pub const TICK_NS: u64 = 5_000_000;

const UNDECIDED: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNDECIDED);
static MONITOR_STARTED: AtomicBool = AtomicBool::new(false);
/// 1 when the process sees one device, so the launch path needs no driver call to know it.
static SINGLE_DEVICE: AtomicU8 = AtomicU8::new(0);

/// Plan word: 0 = free; else WINDOWED | period_ms << 48 | offset_us << 24 | len_us (len_us may be 0: nothing
/// this period). The period travels in the word so a launch needs nothing else to place itself; 15 bits of
/// milliseconds and 24 of microseconds hold the longest period the contract allows (5 s).
const FREE: u64 = 0;
const WINDOWED: u64 = 1 << 63;
const US_MASK: u64 = (1 << 24) - 1;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;

struct DevicePace {
    plan: AtomicU64,
    /// OPEN inside the window (or with no window), CLOSED outside: set by the monitor at each window edge.
    gate: AtomicU8,
    launches: AtomicU64,
    waiting: AtomicU32,
    throttled_ns: AtomicU64,
    /// The last overrun measured by a held launch, and the end of the window it follows.
    debt_ns: AtomicU64,
    overrun_end: AtomicU64,
    /// Launches held back, and the overrun they measured in total (for the exit report).
    holds: AtomicU64,
    overrun_total_ns: AtomicU64,
    /// End of the window whose overrun was measured last (so it is measured once).
    drained_for: AtomicU64,
    /// When the plan last went from free to windowed: work launched before then ran free, not past a window.
    windowed_since: AtomicU64,
    /// The launch count when the program's last successful synchronize began: when nothing was launched since,
    /// the program has been waiting for no work of ours, and a held launch need not ask the GPU.
    synced_launches: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const DP: DevicePace = DevicePace {
    plan: AtomicU64::new(FREE),
    gate: AtomicU8::new(OPEN),
    launches: AtomicU64::new(0),
    waiting: AtomicU32::new(0),
    throttled_ns: AtomicU64::new(0),
    debt_ns: AtomicU64::new(0),
    overrun_end: AtomicU64::new(0),
    holds: AtomicU64::new(0),
    overrun_total_ns: AtomicU64::new(0),
    drained_for: AtomicU64::new(0),
    windowed_since: AtomicU64::new(0),
    synced_launches: AtomicU64::new(0),
};
static DEVICES: [DevicePace; MAX_DEVICES] = [DP; MAX_DEVICES];

fn encode(period_ns: u64, offset_ns: u64, len_ns: u64) -> u64 {
    WINDOWED
        | ((period_ns / 1_000_000) << 48)
        | (((offset_ns / 1000) & US_MASK) << 24)
        | ((len_ns / 1000) & US_MASK)
}

/// Period, offset and length of the window in ns, from a non-free plan word.
fn decode(plan: u64) -> (u64, u64, u64) {
    (
        ((plan & !WINDOWED) >> 48) * 1_000_000,
        ((plan >> 24) & US_MASK) * 1000,
        (plan & US_MASK) * 1000,
    )
}

/// Where `now` stands against a window: Ok if inside, else how long until the next one opens.
fn wait_needed(plan: u64, now: u64) -> Result<(), u64> {
    if plan == FREE {
        return Ok(());
    }
    let (period, off, len) = decode(plan);
    let pos = now % period;
    if pos >= off && pos < off + len {
        Ok(())
    } else if pos < off {
        Err(off - pos)
    } else {
        Err(period - pos + off)
    }
}

/// Whether the gate should be open at `now`, and when it next changes (None: never, as things stand).
fn gate_at(plan: u64, now: u64) -> (bool, Option<u64>) {
    if plan == FREE {
        return (true, None);
    }
    let (period, off, len) = decode(plan);
    if len == 0 {
        return (false, None);
    }
    let period_start = now - now % period;
    match wait_needed(plan, now) {
        Ok(()) => (true, Some(period_start + off + len)),
        Err(ns) => (false, Some(now + ns)),
    }
}

/// The pacing state of the device the calling thread works on.
#[inline]
fn current_pace() -> &'static DevicePace {
    let dev = if SINGLE_DEVICE.load(Relaxed) == 1 {
        0
    } else {
        crate::hooks::memory::current_device().unwrap_or(0)
    };
    &DEVICES[dev.min(MAX_DEVICES - 1)]
}

/// Called by every launch hook before the real launch.
#[inline]
pub fn before_launch(stream: CUstream) {
    match STATE.load(Relaxed) {
        OFF => return,
        ON => {}
        _ => {
            if !decide() {
                return;
            }
        }
    }
    let d = current_pace();
    d.launches.fetch_add(1, Relaxed);
    if d.gate.load(Relaxed) == CLOSED && !capturing(stream) {
        hold(d);
    }
}

/// A synchronize that waited at least this long saw the GPU still working when it began.
const WAITED_NS: u64 = 20_000;

/// When the program's last synchronize that really waited returned (monotonic ns): the GPU had just finished
/// its work then. Lets the overrun of a window be measured when the program synchronizes by itself.
static SYNC_WAITED_UNTIL: AtomicU64 = AtomicU64::new(0);

/// Wraps a synchronize call of the program to note when the GPU finished, if that was after its window.
/// Inside the window (gate open before and after) there is nothing to note and no clock is read.
pub fn observe_sync(call: impl FnOnce() -> CUresult) -> CUresult {
    if STATE.load(Relaxed) != ON {
        return call();
    }
    let d = current_pace();
    let launched = d.launches.load(Relaxed);
    let rc = if d.gate.load(Relaxed) == CLOSED {
        let t0 = now_ns();
        let rc = call();
        let t1 = now_ns();
        if t1 - t0 >= WAITED_NS {
            SYNC_WAITED_UNTIL.fetch_max(t1, Relaxed);
        }
        rc
    } else {
        let rc = call();
        if d.gate.load(Relaxed) == CLOSED {
            // Began inside the window and returned after it closed: the GPU was busy until about now.
            SYNC_WAITED_UNTIL.fetch_max(now_ns(), Relaxed);
        }
        rc
    };
    if rc == CUDA_SUCCESS {
        d.synced_launches.fetch_max(launched, Relaxed);
    }
    rc
}
/// How long the GPU kept working past the window that ended at `end`, measured now (at `t0`, before any
/// further launch). Either our own synchronize waits (the GPU was still busy: it finished when it returns),
/// or the program's own synchronize already waited after `end`, or the GPU was idle and nothing is owed.
/// Capped at one period (`cap`), so a long stall never starves a slice for long.
fn overrun_since(end: u64, cap: u64) -> u64 {
    let t0 = now_ns();
    let rc = call_real!(
        crate::hooks::real_fns::cuCtxSynchronize,
        unsafe extern "C" fn() -> CUresult,
        CUDA_ERROR_NOT_FOUND,
        ()
    );
    let t1 = now_ns();
    if rc != CUDA_SUCCESS {
        return 0;
    }
    let finished = if t1 - t0 >= WAITED_NS {
        t1
    } else {
        SYNC_WAITED_UNTIL.load(Relaxed)
    };
    finished.saturating_sub(end).min(cap)
}

#[cold]
fn hold(d: &DevicePace) {
    let start = now_ns();
    let plan = d.plan.load(Relaxed);
    if wait_needed(plan, start).is_ok() {
        return; // the window has just opened and the monitor has not opened the gate yet
    }
    d.waiting.fetch_add(1, SeqCst);
    // Right after our window closed: measure the overrun once per window, to pay it from the next ones.
    if plan != FREE {
        let (period, off, len) = decode(plan);
        let pos = start % period;
        let end = start - pos + off + len;
        if pos >= off + len && d.drained_for.swap(end, SeqCst) != end {
            // A process that ran free until its first plan (its start, or a neighbour's arrival under
            // `default`) owes only what ran past that moment, not everything since the window it never had.
            let since = end.max(d.windowed_since.load(SeqCst));
            // This launch is counted already. With nothing launched since the program last synchronized, the
            // work is done and its own synchronize said when; asking the GPU instead misreads a slow call after
            // a long sleep as work, and charged a request-serving slice whole windows it never used.
            let owed = if d.launches.load(SeqCst) - 1 <= d.synced_launches.load(SeqCst) {
                SYNC_WAITED_UNTIL
                    .load(Relaxed)
                    .saturating_sub(since)
                    .min(period)
            } else {
                overrun_since(since, period)
            };
            // Handed to the monitor, which reports it on the container's card entry.
            d.overrun_end.store(end, SeqCst);
            d.debt_ns.store(owed, SeqCst);
            d.overrun_total_ns.fetch_add(owed, Relaxed);
        }
    }
    loop {
        let now = now_ns();
        match wait_needed(d.plan.load(Relaxed), now) {
            Ok(()) => break,
            Err(ns) => sleep_until(now + ns.min(TICK_NS)),
        }
    }
    d.throttled_ns.fetch_add(now_ns() - start, Relaxed);
    d.holds.fetch_add(1, Relaxed);
    d.waiting.fetch_sub(1, SeqCst);
}

/// Launches into a stream being captured into a graph do not run now: they are not held, and nothing may
/// synchronize while a capture is open.
fn capturing(stream: CUstream) -> bool {
    let mut status: std::ffi::c_int = 0;
    let rc = call_real!(
        used::cuStreamIsCapturing,
        unsafe extern "C" fn(CUstream, *mut std::ffi::c_int) -> CUresult,
        CUDA_ERROR_NOT_FOUND,
        (stream, &mut status)
    );
    rc == CUDA_SUCCESS && status != 0
}

fn sleep_until(t: u64) {
    let ts = libc::timespec {
        tv_sec: (t / 1_000_000_000) as i64,
        tv_nsec: (t % 1_000_000_000) as i64,
    };
    // SAFETY: ts is a valid timespec; a null remainder is allowed with TIMER_ABSTIME.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
}

/// First launch of the process: pace or not, and start the monitor if so.
#[cold]
fn decide() -> bool {
    let on = process::get()
        .is_some_and(|p| p.cfg.sm_limit.is_some() && p.cfg.policy != CorePolicy::Disable);
    if !on {
        STATE.store(OFF, Relaxed);
        return false;
    }
    let mut n: std::ffi::c_int = 0;
    let rc = call_real!(
        used::cuDeviceGetCount,
        unsafe extern "C" fn(*mut std::ffi::c_int) -> CUresult,
        CUDA_ERROR_NOT_FOUND,
        (&mut n)
    );
    SINGLE_DEVICE.store((rc == CUDA_SUCCESS && n == 1) as u8, Relaxed);
    if !MONITOR_STARTED.swap(true, SeqCst) {
        let ctx = current_context();
        if std::thread::Builder::new()
            .name("vgpu-pacer".into())
            .spawn(move || monitor(ctx))
            .is_err()
        {
            log::error("cannot start the pacing thread: compute limit not enforced");
            STATE.store(OFF, Relaxed);
            return false;
        }
    }
    STATE.store(ON, Relaxed);
    true
}

fn current_context() -> usize {
    let mut ctx: CUcontext = std::ptr::null_mut();
    call_real!(
        used::cuCtxGetCurrent,
        unsafe extern "C" fn(*mut CUcontext) -> CUresult,
        CUDA_ERROR_NOT_FOUND,
        (&mut ctx)
    );
    ctx as usize
}

/// Identity of this container on the card: its cache file (device, inode), or this process alone.
fn container_key(p: &process::Process) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match p
        .region
        .path()
        .and_then(|path| std::fs::metadata(path).ok())
    {
        Some(m) => {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino()).hash(&mut h)
        }
        None => ("pid", p.pid, p.region.path().is_none()).hash(&mut h),
    }
    h.finish() | 1
}

struct Joined {
    card: CardFile,
    entry: usize,
    last_launches: u64,
    last_throttled: u64,
}

fn join(dev: usize, p: &process::Process, key: u64, share: u32) -> Option<Joined> {
    let uuid = crate::context::cuda_uuid(dev)
        .map(|u| format_uuid(&u))
        .unwrap_or_else(|| format!("dev{dev}"));
    let card = CardFile::open(&p.cfg.card_dir, &uuid).unwrap_or_else(|e| {
        log::warn(&format!(
            "card directory {}: {e}; pacing this container without coordinating with other slices",
            p.cfg.card_dir.display()
        ));
        CardFile::private()
    });
    let entry = card.join(key, share, p.cfg.policy.code(), now_ns());
    if entry.is_none() {
        log::error("the card's slice table is full; pacing this container alone");
    }
    let (card, entry) = match entry {
        Some(e) => (card, e),
        None => {
            let c = CardFile::private();
            let e = c.join(key, share, p.cfg.policy.code(), now_ns())?;
            (c, e)
        }
    };
    let period_ns = card_period(
        card.settle_period(entry, p.cfg.pacing_period_ns, now_ns()),
        p,
    );
    if period_ns != p.cfg.pacing_period_ns {
        log::info(&format!(
            "card {uuid} paces in periods of {} ms, set by a slice already on it (this process asked for {} ms)",
            period_ns / 1_000_000,
            p.cfg.pacing_period_ns / 1_000_000
        ));
    }
    Some(Joined {
        card,
        entry,
        last_launches: 0,
        last_throttled: 0,
    })
}

/// The period to pace by, given what the card records: this process's own when the card holds none or one no
/// vgpu slice could have written (a bad value there must not stall or crash every launch on the card).
fn card_period(recorded: u64, p: &process::Process) -> u64 {
    if valid_pacing_period(recorded) {
        return recorded;
    }
    if recorded != 0 && !BAD_PERIOD_REPORTED.swap(true, Relaxed) {
        log::warn(&format!(
            "the card file holds an invalid pacing period ({recorded} ns); using {} ms",
            p.cfg.pacing_period_ns / 1_000_000
        ));
    }
    p.cfg.pacing_period_ns
}
static BAD_PERIOD_REPORTED: AtomicBool = AtomicBool::new(false);

fn monitor(ctx: usize) {
    // Make the launching thread's context current here too, so driver calls made on its behalf resolve.
    if ctx != 0 {
        call_real!(
            used::cuCtxSetCurrent,
            unsafe extern "C" fn(CUcontext) -> CUresult,
            CUDA_ERROR_NOT_FOUND,
            (ctx as CUcontext)
        );
    }
    let Some(p) = process::get() else { return };
    if p.cfg.sm_limit.is_none() {
        return;
    }
    let key = container_key(p);
    // Window edges are kept to within the timer's wake-up latency instead of the default 50 µs slack.
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    let mut joined: Vec<Option<Joined>> = (0..MAX_DEVICES).map(|_| None).collect();
    let mut next_tick = 0;
    loop {
        let now = now_ns();
        if now >= next_tick {
            tick(&mut joined, p, key, now);
            next_tick = now + TICK_NS;
        }
        let mut wake = next_tick;
        for d in &DEVICES {
            let (open, edge) = gate_at(d.plan.load(Relaxed), now);
            d.gate.store(if open { OPEN } else { CLOSED }, Relaxed);
            if let Some(t) = edge {
                wake = wake.min(t);
            }
        }
        sleep_until(wake);
    }
}

/// The monitor's periodic work: card entries kept alive, statistics published, plans recomputed.
fn tick(joined: &mut [Option<Joined>], p: &process::Process, key: u64, now: u64) {
    let Some(share) = p.cfg.sm_limit else { return };
    for (dev, d) in DEVICES.iter().enumerate() {
        let launches = d.launches.load(Relaxed);
        if launches == 0 && d.waiting.load(Relaxed) == 0 {
            continue;
        }
        if joined[dev].is_none() {
            joined[dev] = join(dev, p, key, share);
        }
        let Some(j) = joined[dev].as_mut() else {
            continue;
        };
        let throttled = d.throttled_ns.load(Relaxed);
        if launches != j.last_launches || d.waiting.load(Relaxed) > 0 {
            j.card.touch(j.entry, now);
        }
        j.card.add_stats(
            j.entry,
            launches - j.last_launches,
            throttled - j.last_throttled,
        );
        p.region.add_launches(p.slot, launches - j.last_launches);
        p.region
            .add_throttled_ns(p.slot, throttled - j.last_throttled);
        j.last_launches = launches;
        j.last_throttled = throttled;
        // Re-read each tick: the card's period may have been settled by another slice joining at the same time.
        let period = card_period(j.card.period_ns(), p);
        let plan = match window::plan(&j.card.entries(), j.entry, p.cfg.policy, now, period) {
            Plan::Free => FREE,
            Plan::Window { offset_ns, len_ns } => {
                let end = d.overrun_end.swap(0, SeqCst);
                if end != 0 {
                    j.card
                        .report_overrun(j.entry, end, d.debt_ns.load(SeqCst), period);
                }
                let paid = j.card.pay_debt(j.entry, now / period, len_ns);
                encode(period, offset_ns, len_ns.saturating_sub(paid))
            }
        };
        if plan != FREE && d.plan.load(Relaxed) == FREE {
            d.windowed_since.store(now, SeqCst);
        }
        d.plan.store(plan, Relaxed);
    }
}

/// One line per paced device at exit (info level): what pacing did to this process.
pub fn report() {
    if STATE.load(Relaxed) != ON {
        return;
    }
    for (dev, d) in DEVICES.iter().enumerate() {
        let launches = d.launches.load(Relaxed);
        if launches > 0 {
            log::info(&format!(
                "pacing device {dev}: {launches} launches, {} held back for {} ms in total, {} ms of overrun past windows measured",
                d.holds.load(Relaxed),
                d.throttled_ns.load(Relaxed) / 1_000_000,
                d.overrun_total_ns.load(Relaxed) / 1_000_000
            ));
        }
    }
}

/// In a forked child: no monitor thread exists; start over on its first launch.
pub fn forked_child() {
    STATE.store(UNDECIDED, Relaxed);
    MONITOR_STARTED.store(false, Relaxed);
    for d in &DEVICES {
        d.plan.store(FREE, Relaxed);
        d.gate.store(OPEN, Relaxed);
        d.launches.store(0, Relaxed);
        d.waiting.store(0, Relaxed);
        d.debt_ns.store(0, Relaxed);
        d.synced_launches.store(0, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const MS: u64 = 1_000_000;
    const PERIOD_NS: u64 = 50 * MS;

    #[test]
    fn inside_and_outside_the_window() {
        let plan = encode(PERIOD_NS, 10 * MS, 15 * MS);
        assert_eq!(wait_needed(plan, 5 * PERIOD_NS + 12 * MS), Ok(()));
        assert_eq!(wait_needed(plan, 5 * PERIOD_NS + 2 * MS), Err(8 * MS));
        assert_eq!(
            wait_needed(plan, 5 * PERIOD_NS + 30 * MS),
            Err(PERIOD_NS - 30 * MS + 10 * MS)
        );
        assert_eq!(wait_needed(FREE, 1), Ok(()));
        assert!(
            wait_needed(encode(PERIOD_NS, 0, 0), 3).is_err(),
            "an empty window holds everything"
        );
    }

    #[test]
    fn the_gate_changes_at_the_window_edges() {
        let plan = encode(PERIOD_NS, 10 * MS, 15 * MS);
        let p0 = 7 * PERIOD_NS;
        assert_eq!(gate_at(plan, p0 + 2 * MS), (false, Some(p0 + 10 * MS)));
        assert_eq!(gate_at(plan, p0 + 10 * MS), (true, Some(p0 + 25 * MS)));
        assert_eq!(gate_at(plan, p0 + 24 * MS), (true, Some(p0 + 25 * MS)));
        assert_eq!(
            gate_at(plan, p0 + 25 * MS),
            (false, Some(p0 + PERIOD_NS + 10 * MS)),
            "closed at its end, until the next period's window"
        );
        assert_eq!(gate_at(FREE, p0), (true, None));
        assert_eq!(gate_at(encode(PERIOD_NS, 0, 0), p0), (false, None));
    }

    #[test]
    fn the_longest_period_fits_the_plan_word() {
        let p = 5000 * MS;
        let plan = encode(p, 3500 * MS, 1499 * MS);
        assert_eq!(decode(plan), (p, 3500 * MS, 1499 * MS));
        assert_eq!(wait_needed(plan, 2 * p + 100 * MS), Err(3400 * MS));
        assert_eq!(
            gate_at(plan, 2 * p + 4000 * MS),
            (true, Some(2 * p + 4999 * MS))
        );
    }
}
