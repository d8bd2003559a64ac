//! Compute slices: holds kernel launches outside the container's window (see [`crate::window`]).
//!
//! The control loop: a monitor thread (started on the first launch of a process whose slice has an SM limit)
//! keeps the container's card entry alive, reads the card every [`TICK_NS`] ([`peers`]: a copy, and only what
//! cannot hurt this slice) and publishes for each device a plan: "free", or the period and the ranges of it
//! where launches may run (one range placed from the card file, or up to eight the node's agent placed in the
//! container's limits file). The plan's words are published under a sequence counter (its one writer is the
//! monitor; a reader that meets a change in progress reads again), so reading a plan takes no lock and no
//! system call. Between ticks it wakes at each window edge and opens or closes the device's gate. A
//! launch reads the gate: open, it goes straight to the driver; closed, it sleeps until the window opens. When no
//! thread can be started, launches are still held: each reads the clock, and the launching threads take turns
//! doing the monitor's work.
//!
//! Work still running when a window closes is measured, not guessed: the first launch held back after a
//! window synchronizes the context (or, when nothing was launched since the program's own last synchronize,
//! takes the end of the work from that one), and the time the GPU kept running past the window end becomes debt
//! that shortens the container's next windows. So the share is GPU time actually used, whatever the kernel sizes.
//! The debt is the container's, kept in its own cache file (shared by its processes, out of other tenants'
//! reach), never in the card file.
//!
//! The core reaches the driver only through [`Driver`], which the launch hooks implement and hand in.
//!
//! Cost: with no SM limit a launch pays one relaxed load. Under a limit, with the gate open: three relaxed
//! atomics, no clock read, no syscall, no lock, no allocation, whatever the clock costs on the machine (on a
//! host whose clocksource has no vDSO path, `clock_gettime` is a system call). A program's synchronize reads
//! the clock only while its window is closed.

use crate::process::{self, now_ns};
use crate::window::{self, Plan, Windows};
use crate::{cuda::*, log};
use std::sync::atomic::{fence, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use std::sync::Mutex;
use vgpu_contract::cache_layout::MAX_DEVICES;
use vgpu_contract::card_layout::Entry;
use vgpu_contract::limits::{CorePolicy, MAX_WINDOW_RANGES};

pub mod peers;
use peers::Membership;

/// What the pacing core needs from the driver. The launch hooks implement it over the real functions and
/// hand it in: the core never reaches into `hooks/`.
pub trait Driver: Sync {
    /// The device of the calling thread's current context (0 when unknown).
    fn current_device(&self) -> usize;
    /// How many devices the process sees, if the driver says.
    fn device_count(&self) -> Option<usize>;
    /// Waits for the current context's work; false if the driver refused.
    fn synchronize(&self) -> bool;
    /// Whether `stream` is being captured into a graph (then nothing may be held or synchronized).
    fn capturing(&self, stream: usize) -> bool;
    fn current_context(&self) -> usize;
    fn set_current_context(&self, ctx: usize);
    /// The UUID string (`GPU-...`) of CUDA device `dev`.
    fn uuid(&self, dev: usize) -> Option<String>;
}

/// How often the monitor re-reads the card and refreshes activity.
pub const TICK_NS: u64 = 5_000_000;

const UNDECIDED: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;
/// Paced with no monitor thread (it could not start): each launch reads the clock, and launching threads take
/// turns doing the monitor's periodic work.
const INLINE: u8 = 3;
/// One thread is deciding; the others wait for it.
const DECIDING: u8 = 4;
static STATE: AtomicU8 = AtomicU8::new(UNDECIDED);
/// 1 when the process sees one device, so the launch path needs no driver call to know it.
static SINGLE_DEVICE: AtomicU8 = AtomicU8::new(0);

/// Plan word: FREE, or WINDOWED with the period and ranges in the device's sequenced words ([`publish`],
/// [`load`]).
const FREE: u64 = 0;
const WINDOWED: u64 = 1;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;

struct DevicePace {
    plan: AtomicU64,
    /// Even while the plan's words are stable, odd while the monitor (their one writer) rewrites them.
    seq: AtomicU64,
    period_ns: AtomicU64,
    ranges_n: AtomicU64,
    /// offset_us << 32 | len_us of each range (5 s, the longest period, is far below 2^32 µs).
    ranges: [AtomicU64; MAX_WINDOW_RANGES],
    /// OPEN inside the window (or with no window), CLOSED outside: set by the monitor at each window edge.
    gate: AtomicU8,
    launches: AtomicU64,
    waiting: AtomicU32,
    throttled_ns: AtomicU64,
    /// The last overrun measured by a held launch (handed to the monitor, which reports it into the
    /// container's cache file), and the end of the window it follows (0 once taken).
    overrun_ns: AtomicU64,
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
    seq: AtomicU64::new(0),
    period_ns: AtomicU64::new(0),
    ranges_n: AtomicU64::new(0),
    ranges: [const { AtomicU64::new(0) }; MAX_WINDOW_RANGES],
    gate: AtomicU8::new(OPEN),
    launches: AtomicU64::new(0),
    waiting: AtomicU32::new(0),
    throttled_ns: AtomicU64::new(0),
    overrun_ns: AtomicU64::new(0),
    overrun_end: AtomicU64::new(0),
    holds: AtomicU64::new(0),
    overrun_total_ns: AtomicU64::new(0),
    drained_for: AtomicU64::new(0),
    windowed_since: AtomicU64::new(0),
    synced_launches: AtomicU64::new(0),
};
static DEVICES: [DevicePace; MAX_DEVICES] = [DP; MAX_DEVICES];

/// Publishes `plan` (None: free) for `d`. Only the monitor writes a plan (or, with no monitor thread, the
/// launching thread that holds the inline monitor's lock), so there is one writer at a time.
fn publish(d: &DevicePace, plan: Option<&Windows>) {
    let s = d.seq.load(Relaxed);
    d.seq.store(s + 1, Relaxed);
    fence(Release);
    if let Some(w) = plan {
        d.period_ns.store(w.period_ns, Relaxed);
        d.ranges_n.store(w.n as u64, Relaxed);
        for (a, r) in d.ranges.iter().zip(w.ranges) {
            a.store(
                (r.0 / 1000) << 32 | (r.1 / 1000).min(u32::MAX as u64),
                Relaxed,
            );
        }
    }
    d.plan
        .store(if plan.is_some() { WINDOWED } else { FREE }, Relaxed);
    d.seq.store(s + 2, Release);
}

/// The plan of `d` as last published (None: free). No lock, no system call: a read that overlapped a publish
/// is made again.
fn load(d: &DevicePace) -> Option<Windows> {
    let mut tries = 0u32;
    loop {
        let s1 = d.seq.load(Acquire);
        if s1 & 1 == 0 {
            let plan = d.plan.load(Relaxed);
            let period_ns = d.period_ns.load(Relaxed);
            let n = d.ranges_n.load(Relaxed) as usize;
            let mut ranges = [(0, 0); MAX_WINDOW_RANGES];
            for (r, a) in ranges.iter_mut().zip(&d.ranges) {
                let v = a.load(Relaxed);
                *r = ((v >> 32) * 1000, (v & u32::MAX as u64) * 1000);
            }
            fence(Acquire);
            if d.seq.load(Relaxed) == s1 {
                return (plan != FREE && period_ns > 0).then_some(Windows {
                    period_ns,
                    n: n.clamp(1, MAX_WINDOW_RANGES),
                    ranges,
                });
            }
        }
        tries += 1;
        if tries < 64 {
            std::hint::spin_loop();
        } else {
            // The writer was preempted mid-publish (a few words): let it finish.
            std::thread::yield_now();
        }
    }
}

/// Where `now` stands against the windows: inside one (Ok: that range's end), or how long until the next one
/// opens (Err).
fn locate(w: &Windows, now: u64) -> Result<u64, u64> {
    let period = w.period_ns;
    let pos = now % period;
    let period_start = now - pos;
    let mut first = None;
    for &(off, len) in w.used() {
        if len == 0 {
            continue;
        }
        first.get_or_insert(off);
        if pos < off {
            return Err(off - pos);
        }
        if pos < off + len {
            return Ok(period_start + off + len);
        }
    }
    Err(period - pos + first.unwrap_or(0))
}

/// Where `now` stands against a plan: Ok if inside a window (or free), else how long until the next one opens.
fn wait_needed(plan: Option<&Windows>, now: u64) -> Result<(), u64> {
    match plan {
        None => Ok(()),
        Some(w) => locate(w, now).map(|_| ()),
    }
}

/// The end of the latest window of `w` that is over at `now`: in this period, or the previous period's last
/// while none of this one's has ended. A window that ends with its period is followed by holds at the
/// start of the next one, before its own window: its overrun is measured then (once read only after the window,
/// within its period, it never was, and a slice placed last in the period ran half again over its share).
fn latest_window_end(w: &Windows, now: u64) -> u64 {
    let period = w.period_ns;
    let pos = now % period;
    let period_start = now - pos;
    let ends = || w.used().iter().map(|r| r.0 + r.1);
    match ends().filter(|&e| e <= pos).max() {
        Some(e) => period_start + e,
        None => (period_start + ends().max().unwrap_or(0)).saturating_sub(period),
    }
}

/// Whether the gate should be open at `now`, and when it next changes (None: never, as things stand).
fn gate_at(plan: Option<&Windows>, now: u64) -> (bool, Option<u64>) {
    let Some(w) = plan else {
        return (true, None);
    };
    if w.len_ns() == 0 {
        return (false, None);
    }
    match locate(w, now) {
        Ok(end) => (true, Some(end)),
        Err(ns) => (false, Some(now + ns)),
    }
}

/// The pacing state of the device the calling thread works on.
#[inline]
fn current_pace(drv: &dyn Driver) -> &'static DevicePace {
    let dev = if SINGLE_DEVICE.load(Relaxed) == 1 {
        0
    } else {
        drv.current_device()
    };
    &DEVICES[dev.min(MAX_DEVICES - 1)]
}

/// Called by every launch hook before the real launch.
#[inline]
pub fn before_launch(drv: &'static dyn Driver, stream: usize) {
    let mut state = STATE.load(Relaxed);
    if state == OFF {
        return;
    }
    if state != ON && state != INLINE {
        state = decide(drv);
        if state == OFF {
            return;
        }
    }
    let d = current_pace(drv);
    d.launches.fetch_add(1, Relaxed);
    if state == INLINE {
        inline_tick(now_ns());
        let open = wait_needed(load(d).as_ref(), now_ns()).is_ok();
        d.gate.store(if open { OPEN } else { CLOSED }, Relaxed);
    }
    if d.gate.load(Relaxed) == CLOSED && !drv.capturing(stream) {
        hold(drv, d);
    }
}

/// A synchronize that waited at least this long saw the GPU still working when it began.
const WAITED_NS: u64 = 20_000;

/// When the program's last synchronize that really waited returned (monotonic ns): the GPU had just finished
/// its work then. Lets the overrun of a window be measured when the program synchronizes by itself.
static SYNC_WAITED_UNTIL: AtomicU64 = AtomicU64::new(0);

/// Wraps a synchronize call of the program to note when the GPU finished, if that was after its window.
/// Inside the window (gate open before and after) there is nothing to note and no clock is read.
pub fn observe_sync(drv: &dyn Driver, call: impl FnOnce() -> CUresult) -> CUresult {
    let state = STATE.load(Relaxed);
    if state != ON && state != INLINE {
        return call();
    }
    let d = current_pace(drv);
    let launched = d.launches.load(Relaxed);
    // Without a monitor thread no one moves the gate at the window's edges: read the clock instead.
    let closed = || {
        if state == INLINE {
            wait_needed(load(d).as_ref(), now_ns()).is_err()
        } else {
            d.gate.load(Relaxed) == CLOSED
        }
    };
    let rc = if closed() {
        let t0 = now_ns();
        let rc = call();
        let t1 = now_ns();
        if t1 - t0 >= WAITED_NS {
            SYNC_WAITED_UNTIL.fetch_max(t1, Relaxed);
        }
        rc
    } else {
        let rc = call();
        if closed() {
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
fn overrun_since(drv: &dyn Driver, end: u64, cap: u64) -> u64 {
    let t0 = now_ns();
    let ok = drv.synchronize();
    let t1 = now_ns();
    if !ok {
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
fn hold(drv: &dyn Driver, d: &DevicePace) {
    let start = now_ns();
    let plan = load(d);
    if wait_needed(plan.as_ref(), start).is_ok() {
        return; // the window has just opened and the monitor has not opened the gate yet
    }
    d.waiting.fetch_add(1, SeqCst);
    // Right after our window closed: measure the overrun once per window, to pay it from the next ones.
    if let Some(w) = &plan {
        let period = w.period_ns;
        let end = latest_window_end(w, start);
        if end > 0 && d.drained_for.swap(end, SeqCst) != end {
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
                overrun_since(drv, since, period)
            };
            // Handed to the monitor, which reports it as the container's debt (its cache file, never the card).
            d.overrun_ns.store(owed, SeqCst);
            d.overrun_end.store(end, SeqCst);
            d.overrun_total_ns.fetch_add(owed, Relaxed);
        }
    }
    let inline = STATE.load(Relaxed) == INLINE;
    loop {
        let now = now_ns();
        if inline {
            // No monitor thread: the held thread keeps the plan current itself while it waits.
            inline_tick(now);
        }
        match wait_needed(load(d).as_ref(), now) {
            Ok(()) => break,
            Err(ns) => sleep_until(now + ns.min(TICK_NS)),
        }
    }
    d.throttled_ns.fetch_add(now_ns() - start, Relaxed);
    d.holds.fetch_add(1, Relaxed);
    d.waiting.fetch_sub(1, SeqCst);
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

/// First launch of the process: pace or not; with a thread that keeps the gates if it can start, else inline.
#[cold]
fn decide(drv: &'static dyn Driver) -> u8 {
    let on = process::get()
        .is_some_and(|p| p.cfg.sm_limit.is_some() && p.cfg.policy != CorePolicy::Disable);
    if !on {
        STATE.store(OFF, Relaxed);
        return OFF;
    }
    if let Err(mut state) = STATE.compare_exchange(UNDECIDED, DECIDING, SeqCst, SeqCst) {
        // Another thread is deciding: wait for its answer (one thread starts the monitor).
        while state == DECIDING {
            std::thread::yield_now();
            state = STATE.load(SeqCst);
        }
        return state;
    }
    SINGLE_DEVICE.store((drv.device_count() == Some(1)) as u8, Relaxed);
    let ctx = drv.current_context();
    let state = if start_thread(move || monitor_thread(drv, ctx)) {
        ON
    } else {
        // Launches must not run free because a thread could not start (RLIMIT_NPROC, a cgroup's pids.max):
        // the launching threads do the monitor's work themselves.
        log::warn(
            "cannot start the pacing thread; launches are paced on the threads that make them (each reads the clock)",
        );
        INLINE_MONITOR.store(
            Box::into_raw(Box::new(Mutex::new(Monitor::new(drv)))),
            SeqCst,
        );
        INLINE
    };
    STATE.store(state, SeqCst);
    state
}

fn start_thread(f: impl FnOnce() + Send + 'static) -> bool {
    std::thread::Builder::new()
        .name("vgpu-pacer".into())
        .spawn(f)
        .is_ok()
}

/// The monitor's state when no thread could start (leaked on purpose: a forked child starts over with a new
/// one, so a lock its parent's thread held at fork never blocks it).
static INLINE_MONITOR: AtomicPtr<Mutex<Monitor>> = AtomicPtr::new(std::ptr::null_mut());

/// The monitor's periodic work done by a launching thread, if it is due and no other thread is doing it.
fn inline_tick(now: u64) {
    let m = INLINE_MONITOR.load(Acquire);
    if m.is_null() {
        return;
    }
    // SAFETY: a published inline monitor is never freed.
    let m = unsafe { &*m };
    if let Ok(mut m) = m.try_lock() {
        if now >= m.next_tick {
            m.tick(now);
            m.next_tick = now + TICK_NS;
        }
    }
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

/// What the monitor keeps per paced device, all in this process's memory.
struct Device {
    card: Membership,
    last_launches: u64,
    last_throttled: u64,
    last_period: u64,
    /// When a process of this container last launched or waited here (what its entry announces).
    last_active: u64,
    /// The windows the node's agent placed for this device (the limits file): when set, the card decides
    /// nothing about where this slice runs.
    agent: Option<Windows>,
    /// The plan last published (so an unchanged plan is not written again).
    published: Option<Option<Windows>>,
}

/// The control loop's state: one per process, owned by the monitor thread (or shared by launching threads).
struct Monitor {
    drv: &'static dyn Driver,
    devices: Vec<Option<Device>>,
    next_tick: u64,
    /// This container's identity on the cards, found once.
    key: Option<u64>,
}

impl Monitor {
    fn new(drv: &'static dyn Driver) -> Self {
        Monitor {
            drv,
            devices: (0..MAX_DEVICES).map(|_| None).collect(),
            next_tick: 0,
            key: None,
        }
    }

    /// Entries kept alive, statistics published, plans recomputed.
    fn tick(&mut self, now: u64) {
        let Some(p) = process::get() else { return };
        let Some(share) = p.cfg.sm_limit else { return };
        let own_period = p.cfg.pacing_period_ns;
        let key = *self.key.get_or_insert_with(|| container_key(p));
        for (dev, d) in DEVICES.iter().enumerate() {
            let launches = d.launches.load(Relaxed);
            let waiting = d.waiting.load(Relaxed) > 0;
            if launches == 0 && !waiting {
                continue;
            }
            let entry = |last_active_ns: u64, period_ns: u64| Entry {
                index: 0,
                key,
                share,
                policy: p.cfg.policy.code(),
                last_active_ns,
                launches: 0,
                throttled_ns: 0,
                period_ns,
            };
            let dv = self.devices[dev].get_or_insert_with(|| {
                let uuid = self.drv.uuid(dev);
                let agent = p
                    .cfg
                    .windows_for(dev, uuid.as_deref())
                    .map(Windows::from_agent);
                if let Some(w) = &agent {
                    log::info(&format!(
                        "device {dev}: pacing in the windows the node's agent placed ({} ms in {} range(s) of each {} ms period); the card file does not move them",
                        w.len_ns() / 1_000_000,
                        w.n,
                        w.period_ns / 1_000_000
                    ));
                }
                let uuid = uuid.unwrap_or_else(|| format!("dev{dev}"));
                let period = agent.map_or(own_period, |w| w.period_ns);
                Device {
                    card: Membership::join(&p.cfg.card_dir, &uuid, entry(now, period), now),
                    last_launches: 0,
                    last_throttled: 0,
                    last_period: period,
                    last_active: now,
                    agent,
                    published: None,
                }
            });
            let throttled = d.throttled_ns.load(Relaxed);
            p.region.add_launches(p.slot, launches - dv.last_launches);
            p.region
                .add_throttled_ns(p.slot, throttled - dv.last_throttled);
            if launches != dv.last_launches || waiting {
                dv.last_active = now;
            }
            dv.last_launches = launches;
            dv.last_throttled = throttled;
            let asked = dv.agent.map_or(own_period, |w| w.period_ns);
            if dv.agent.is_some() {
                dv.card.rejoin(entry(dv.last_active, asked), now);
            }
            let view = dv.card.refresh(
                Entry {
                    launches,
                    throttled_ns: throttled,
                    ..entry(dv.last_active, asked)
                },
                now,
            );
            let (period, plan) = match &dv.agent {
                // The agent's windows: the card only says whether another slice is active.
                Some(aw) => {
                    let card = &dv.card;
                    (
                        aw.period_ns,
                        window::plan_agent(&view.peers, aw, share, p.cfg.policy, now, || {
                            card.crowded()
                        }),
                    )
                }
                None => {
                    let period = peers::period(own_period, &view.peers);
                    if period != dv.last_period {
                        log::info(&format!(
                            "device {dev}: pacing in periods of {} ms, the shortest a slice on the card asks for (this process asked for {} ms)",
                            period / 1_000_000,
                            own_period / 1_000_000
                        ));
                        dv.last_period = period;
                    }
                    let plan = match window::plan(
                        &view.peers,
                        view.me,
                        share,
                        p.cfg.policy,
                        now,
                        period,
                    ) {
                        Plan::Free => None,
                        Plan::Window { offset_ns, len_ns } => {
                            Some(Windows::one(period, offset_ns, len_ns))
                        }
                    };
                    (period, plan)
                }
            };
            let plan = plan.map(|w| {
                // The debt is the container's, in its own cache file (which no other tenant can reach),
                // never in the card.
                let end = d.overrun_end.swap(0, SeqCst);
                if end != 0 {
                    p.region
                        .report_overrun(dev, end, d.overrun_ns.load(SeqCst), period);
                }
                let len = w.len_ns();
                let paid = p.region.pay_debt(dev, now / period, len);
                w.truncated(len.saturating_sub(paid))
            });
            if plan.is_some() && d.plan.load(Relaxed) == FREE {
                d.windowed_since.store(now, SeqCst);
            }
            if dv.published != Some(plan) {
                publish(d, plan.as_ref());
                dv.published = Some(plan);
            }
        }
    }
}

fn monitor_thread(drv: &'static dyn Driver, ctx: usize) {
    // Make the launching thread's context current here too, so driver calls made on its behalf resolve.
    if ctx != 0 {
        drv.set_current_context(ctx);
    }
    // Window edges are kept to within the timer's wake-up latency instead of the default 50 µs slack.
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    let mut m = Monitor::new(drv);
    loop {
        let now = now_ns();
        if now >= m.next_tick {
            m.tick(now);
            m.next_tick = now + TICK_NS;
        }
        let mut wake = m.next_tick;
        for d in &DEVICES {
            let (open, edge) = if d.plan.load(Relaxed) == FREE {
                (true, None)
            } else {
                gate_at(load(d).as_ref(), now)
            };
            d.gate.store(if open { OPEN } else { CLOSED }, Relaxed);
            if let Some(t) = edge {
                wake = wake.min(t);
            }
        }
        sleep_until(wake);
    }
}

/// One line per paced device at exit (info level): what pacing did to this process.
pub fn report() {
    let state = STATE.load(Relaxed);
    if state != ON && state != INLINE {
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
    INLINE_MONITOR.store(std::ptr::null_mut(), SeqCst);
    for d in &DEVICES {
        // A fork taken while the monitor was publishing must not leave the child a change in progress.
        d.seq.store(0, Relaxed);
        d.plan.store(FREE, Relaxed);
        d.gate.store(OPEN, Relaxed);
        d.launches.store(0, Relaxed);
        d.waiting.store(0, Relaxed);
        d.overrun_end.store(0, Relaxed);
        d.synced_launches.store(0, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const MS: u64 = 1_000_000;
    const PERIOD_NS: u64 = 50 * MS;

    fn one(period: u64, off: u64, len: u64) -> Windows {
        Windows::one(period, off, len)
    }

    #[test]
    fn inside_and_outside_the_window() {
        let plan = one(PERIOD_NS, 10 * MS, 15 * MS);
        let plan = Some(&plan);
        assert_eq!(wait_needed(plan, 5 * PERIOD_NS + 12 * MS), Ok(()));
        assert_eq!(wait_needed(plan, 5 * PERIOD_NS + 2 * MS), Err(8 * MS));
        assert_eq!(
            wait_needed(plan, 5 * PERIOD_NS + 30 * MS),
            Err(PERIOD_NS - 30 * MS + 10 * MS)
        );
        assert_eq!(wait_needed(None, 1), Ok(()));
        assert!(
            wait_needed(Some(&one(PERIOD_NS, 0, 0)), 3).is_err(),
            "an empty window holds everything"
        );
    }

    #[test]
    fn the_gate_changes_at_the_window_edges() {
        let plan = one(PERIOD_NS, 10 * MS, 15 * MS);
        let plan = Some(&plan);
        let p0 = 7 * PERIOD_NS;
        assert_eq!(gate_at(plan, p0 + 2 * MS), (false, Some(p0 + 10 * MS)));
        assert_eq!(gate_at(plan, p0 + 10 * MS), (true, Some(p0 + 25 * MS)));
        assert_eq!(gate_at(plan, p0 + 24 * MS), (true, Some(p0 + 25 * MS)));
        assert_eq!(
            gate_at(plan, p0 + 25 * MS),
            (false, Some(p0 + PERIOD_NS + 10 * MS)),
            "closed at its end, until the next period's window"
        );
        assert_eq!(gate_at(None, p0), (true, None));
        assert_eq!(gate_at(Some(&one(PERIOD_NS, 0, 0)), p0), (false, None));
    }

    #[test]
    fn several_ranges_open_and_close_the_gate_each() {
        let w = Windows::from_agent(&vgpu_contract::limits::CoreWindows {
            period_ms: 50,
            ranges: vec![(5_000, 5_000), (20_000, 10_000), (45_000, 5_000)],
        });
        let ws = w;
        let w = Some(&ws);
        let p0 = 3 * PERIOD_NS;
        assert_eq!(gate_at(w, p0 + MS), (false, Some(p0 + 5 * MS)));
        assert_eq!(gate_at(w, p0 + 6 * MS), (true, Some(p0 + 10 * MS)));
        assert_eq!(gate_at(w, p0 + 10 * MS), (false, Some(p0 + 20 * MS)));
        assert_eq!(gate_at(w, p0 + 29 * MS), (true, Some(p0 + 30 * MS)));
        assert_eq!(gate_at(w, p0 + 31 * MS), (false, Some(p0 + 45 * MS)));
        assert_eq!(gate_at(w, p0 + 46 * MS), (true, Some(p0 + 50 * MS)));
        assert_eq!(wait_needed(w, p0 + 12 * MS), Err(8 * MS));
        assert_eq!(latest_window_end(&ws, p0 + 12 * MS), p0 + 10 * MS);
        assert_eq!(latest_window_end(&ws, p0 + 40 * MS), p0 + 30 * MS);
        assert_eq!(
            latest_window_end(&ws, p0 + 2 * MS),
            p0,
            "the previous period's last range"
        );
    }

    #[test]
    fn a_published_plan_reads_back_whole() {
        let d = DP;
        assert_eq!(load(&d), None);
        let w = Windows::from_agent(&vgpu_contract::limits::CoreWindows {
            period_ms: 500,
            ranges: vec![(0, 100_000), (300_000, 50_000)],
        });
        publish(&d, Some(&w));
        assert_eq!(load(&d), Some(w));
        assert_eq!(d.seq.load(Relaxed) % 2, 0);
        publish(&d, None);
        assert_eq!(load(&d), None);
        let big = one(5000 * MS, 3500 * MS, 1499 * MS);
        publish(&d, Some(&big));
        assert_eq!(load(&d), Some(big), "the longest period fits the words");
    }

    /// A reader racing the writer never sees a mix of two plans.
    #[test]
    fn a_plan_read_during_a_publish_is_never_torn() {
        static D: DevicePace = DP;
        let a = one(50 * MS, 0, 15 * MS);
        let b = Windows::from_agent(&vgpu_contract::limits::CoreWindows {
            period_ms: 500,
            ranges: (0..8).map(|i| (i * 60_000, 10_000)).collect(),
        });
        publish(&D, Some(&a));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let writer = std::thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(Relaxed) {
                publish(&D, Some(if i.is_multiple_of(2) { &b } else { &a }));
                i += 1;
            }
        });
        for _ in 0..200_000 {
            let got = load(&D).unwrap();
            assert!(got == a || got == b, "{got:?}");
        }
        stop.store(true, Relaxed);
        writer.join().unwrap();
    }

    #[test]
    fn the_latest_window_end_is_found_across_the_period_boundary() {
        let p0 = 7 * PERIOD_NS;
        let first = one(PERIOD_NS, 0, 15 * MS);
        assert_eq!(latest_window_end(&first, p0 + 20 * MS), p0 + 15 * MS);
        let last = one(PERIOD_NS, 35 * MS, 15 * MS);
        assert_eq!(
            latest_window_end(&last, p0 + 2 * MS),
            p0,
            "held at the start of the next period: the window that just ended"
        );
        let middle = one(PERIOD_NS, 10 * MS, 15 * MS);
        assert_eq!(
            latest_window_end(&middle, p0 + 5 * MS),
            p0 - PERIOD_NS + 25 * MS
        );
        assert_eq!(latest_window_end(&middle, p0 + 30 * MS), p0 + 25 * MS);
        let empty = one(PERIOD_NS, 10 * MS, 0);
        assert_eq!(
            latest_window_end(&empty, p0 + 12 * MS),
            p0 + 10 * MS,
            "an empty window too"
        );
    }

    #[test]
    fn the_longest_period_fits_the_plan() {
        let p = 5000 * MS;
        let plan = one(p, 3500 * MS, 1499 * MS);
        assert_eq!(wait_needed(Some(&plan), 2 * p + 100 * MS), Err(3400 * MS));
        assert_eq!(
            gate_at(Some(&plan), 2 * p + 4000 * MS),
            (true, Some(2 * p + 4999 * MS))
        );
    }
}
