//! This process's slice: its config, its slot in the container's shared cache, what it has allocated.
//! Created on the first hooked call (never at load), rebuilt in a forked child, released at exit.

use crate::config::{self, Config};
use crate::log;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering::*};
use std::sync::Mutex;
use vgpu_contract::cache_layout::{self, CacheRegion, HeaderInfo, OverLimit, MAX_DEVICES};

/// What an allocation handle names, so equal numbers of different kinds never collide.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Kind {
    DevicePtr,
    VmmHandle,
    Array,
    Mipmapped,
    /// What a context's `cuCtxSetLimit` (CU_LIMIT_* code) holds beyond the driver's default; key: the context.
    CtxLimit(u8),
    /// An instantiated graph's memory nodes on one device; key: the graph exec.
    GraphExec(u8),
    /// A loaded module or library; key: its handle.
    Module,
    /// Freed memory a pool keeps reserved; key: the pool.
    PoolKeep,
}

pub struct Process {
    pub pid: u32,
    pub cfg: Config,
    pub region: CacheRegion,
    pub slot: usize,
    allocs: Mutex<HashMap<(Kind, u64), (usize, u64)>>,
    /// Bytes this process holds in allocations, per device (without its context).
    tracked: [AtomicU64; MAX_DEVICES],
    /// Bytes of this process's charge that are its CUDA context, per device.
    context: [AtomicU64; MAX_DEVICES],
    /// When the context was last measured (monotonic ns), per device.
    measured_at: [AtomicU64; MAX_DEVICES],
}

static PROCESS: AtomicPtr<Process> = AtomicPtr::new(std::ptr::null_mut());
/// Set when config says pass everything through; cleared in a forked child so it re-reads its config.
static PASSTHROUGH: AtomicBool = AtomicBool::new(false);
static HANDLERS_REGISTERED: AtomicBool = AtomicBool::new(false);

/// This process's state, creating it on first use; None when control is disabled.
pub fn get() -> Option<&'static Process> {
    let p = PROCESS.load(Acquire);
    if !p.is_null() {
        // SAFETY: a published Process is never freed (a forked child leaks its parent's copy on purpose).
        return Some(unsafe { &*p });
    }
    if PASSTHROUGH.load(Acquire) {
        return None;
    }
    init()
}

/// Whether kernel launches are refused: the agent revoked this container's slice. A launch needs a context,
/// and creating one goes through a hook, so this never is the call that reads the config.
pub fn launches_refused() -> bool {
    get().is_some_and(|p| p.cfg.revoked.is_some())
}

/// This process's state only if something already created it (frees and queries of untouched processes).
pub fn existing() -> Option<&'static Process> {
    let p = PROCESS.load(Acquire);
    // SAFETY: as in get().
    (!p.is_null()).then(|| unsafe { &*p })
}

#[cold]
fn init() -> Option<&'static Process> {
    let (cfg, msgs) = config::from_process();
    for m in &msgs {
        log::error(m);
    }
    if cfg.disabled {
        PASSTHROUGH.store(true, Release);
        log::info("CUDA_DISABLE_CONTROL is set and no limits file exists: no limits enforced");
        return None;
    }
    let mine = Box::into_raw(Box::new(Process::new(cfg)));
    match PROCESS.compare_exchange(std::ptr::null_mut(), mine, AcqRel, Acquire) {
        Ok(_) => {
            register_handlers();
            existing()
        }
        Err(winner) => {
            // Another thread got there first: drop ours (giving its slot back) and use theirs.
            // SAFETY: `mine` came from Box::into_raw above and was never published.
            drop(unsafe { Box::from_raw(mine) });
            // SAFETY: winner is a published, never-freed Process.
            Some(unsafe { &*winner })
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.region.release(self.slot, self.pid);
    }
}

fn header_info(cfg: &Config) -> HeaderInfo {
    let mut info = HeaderInfo {
        sm_limit: cfg.sm_limit.unwrap_or(0),
        policy: cfg.policy.code(),
        ..Default::default()
    };
    for (d, l) in cfg.memory.iter().enumerate() {
        info.memory_limits[d] = l.bytes().unwrap_or(0);
    }
    info
}

impl Process {
    fn new(cfg: Config) -> Self {
        let pid = std::process::id();
        let start = cache_layout::process_start_time(pid).unwrap_or(0);
        let ns = cache_layout::own_pid_namespace();
        let info = header_info(&cfg);
        let shared = match &cfg.cache_path {
            None => {
                log::info("no CUDA_DEVICE_MEMORY_SHARED_CACHE: limits hold for this process alone");
                None
            }
            Some(path) => {
                match CacheRegion::open_or_create(path, &info) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        log::error(&format!("{e}; limits hold for this process alone, not shared with the container"));
                        None
                    }
                }
            }
        };
        let mut claimed = shared.and_then(|r| match r.claim(pid, start, ns) {
            Some(s) => Some((r, s)),
            None => {
                // Every slot is held by a live process or one the next sweep will free: try once after a sweep.
                r.reclaim_dead(cache_layout::pid_alive);
                match r.claim(pid, start, ns) {
                    Some(s) => Some((r, s)),
                    None => {
                        log::error(
                            "shared cache has no free slot; limits hold for this process alone",
                        );
                        None
                    }
                }
            }
        });
        let (region, slot) = claimed.take().unwrap_or_else(|| {
            let r = CacheRegion::private(&info);
            let s = r
                .claim(pid, start, ns)
                .expect("a fresh private region has free slots");
            (r, s)
        });
        Process {
            pid,
            cfg,
            region,
            slot,
            allocs: Mutex::new(HashMap::new()),
            tracked: Default::default(),
            context: Default::default(),
            measured_at: Default::default(),
        }
    }

    /// This process's pid on the host, when the agent has recorded it in our slot.
    pub fn host_pid(&self) -> Option<u32> {
        self.region.host_pid(self.slot)
    }

    pub fn limit(&self, dev: usize) -> Option<u64> {
        self.cfg.memory.get(dev).and_then(|l| l.bytes())
    }

    /// Charges an allocation about to be made; on refusal, frees the charges of dead processes and tries once
    /// more.
    pub fn charge(&self, dev: usize, bytes: u64) -> Result<(), OverLimit> {
        let limit = self.limit(dev);
        match self.region.try_charge(self.slot, dev, bytes, limit) {
            Ok(()) => Ok(()),
            Err(e) => {
                let freed = self.region.reclaim_dead(cache_layout::pid_alive);
                if freed == 0 {
                    return Err(e);
                }
                log::info(&format!(
                    "reclaimed {freed} bytes charged by processes that are gone"
                ));
                self.region.try_charge(self.slot, dev, bytes, limit)
            }
        }
    }

    /// Takes back a charge whose allocation did not happen.
    pub fn uncharge(&self, dev: usize, bytes: u64) {
        self.region.uncharge(self.slot, dev, bytes);
    }

    /// Remembers a successful allocation so its free can uncharge it.
    pub fn record(&self, kind: Kind, key: u64, dev: usize, bytes: u64) {
        self.tracked[dev].fetch_add(bytes, Relaxed);
        let old = self
            .allocs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((kind, key), (dev, bytes));
        if let Some((odev, obytes)) = old {
            // The driver reused a handle we never saw freed: that memory is gone, stop charging it.
            self.tracked[odev].fetch_sub(obytes, Relaxed);
            self.region.uncharge(self.slot, odev, obytes);
        }
    }

    /// Uncharges a freed allocation. Unknown handles (made before the shim was asked) are ignored.
    pub fn forget(&self, kind: Kind, key: u64) {
        let entry = self
            .allocs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(kind, key));
        if let Some((dev, bytes)) = entry {
            self.tracked[dev].fetch_sub(bytes, Relaxed);
            self.region.uncharge(self.slot, dev, bytes);
        }
    }

    /// Bytes recorded under `(kind, key)` (0 if none).
    pub fn held(&self, kind: Kind, key: u64) -> u64 {
        self.allocs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(kind, key))
            .map_or(0, |(_, b)| *b)
    }

    /// Makes `(kind, key)` hold `bytes` on `dev`: growth is charged against the limit (refused past it),
    /// shrinking is uncharged. Returns the bytes held before, to undo with [`Process::set_held_unchecked`].
    pub fn set_held(&self, kind: Kind, key: u64, dev: usize, bytes: u64) -> Result<u64, OverLimit> {
        let old = self.held(kind, key);
        if bytes > old {
            self.charge(dev, bytes - old)?;
        }
        self.set_record(kind, key, dev, old, bytes);
        Ok(old)
    }

    /// As [`Process::set_held`] for memory the device already holds: charged whatever the limit says (it
    /// can only be reported; the next allocation then finds the container full).
    pub fn set_held_unchecked(&self, kind: Kind, key: u64, dev: usize, bytes: u64) {
        let old = self.held(kind, key);
        if bytes > old {
            let _ = self.region.try_charge(self.slot, dev, bytes - old, None);
        }
        self.set_record(kind, key, dev, old, bytes);
    }

    /// Updates the record of `(kind, key)` from `old` to `new` bytes; a shrink is uncharged here, growth was
    /// charged by the caller.
    fn set_record(&self, kind: Kind, key: u64, dev: usize, old: u64, new: u64) {
        if new < old {
            self.region.uncharge(self.slot, dev, old - new);
        }
        self.tracked[dev].fetch_add(new, Relaxed);
        self.tracked[dev].fetch_sub(old, Relaxed);
        let mut allocs = self.allocs.lock().unwrap_or_else(|e| e.into_inner());
        if new == 0 {
            allocs.remove(&(kind, key));
        } else {
            allocs.insert((kind, key), (dev, new));
        }
    }

    /// Every key recorded under `kind` (to release what belongs to a destroyed context or pool).
    pub fn keys_of(&self, kind: Kind) -> Vec<u64> {
        self.allocs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, key)| *key)
            .collect()
    }

    /// Makes the next allocation on `dev` measure the context again (after a call that may have given device
    /// memory back outside any allocation, such as a graph-pool trim).
    pub fn remeasure(&self, dev: usize) {
        if let Some(m) = self.measured_at.get(dev) {
            m.store(0, Relaxed);
        }
    }

    /// Bytes this container holds on `dev` (all of its processes).
    pub fn container_used(&self, dev: usize) -> u64 {
        self.region.device_total(dev)
    }

    pub fn context_bytes(&self, dev: usize) -> u64 {
        self.context[dev].load(Relaxed)
    }

    /// Whether the context should be measured again before charging `bytes` on `dev`: the first time, every
    /// 100 ms, and before every allocation that comes within 10% of the limit (where precision matters).
    pub fn context_due(&self, dev: usize, bytes: u64, now_ns: u64) -> bool {
        let last = self.measured_at[dev].load(Relaxed);
        let near_limit = self
            .limit(dev)
            .is_some_and(|l| self.container_used(dev).saturating_add(bytes) > l - l / 10);
        let due = last == 0 || near_limit || now_ns.saturating_sub(last) >= 100_000_000;
        // One thread measures; the others go on with the last figure.
        due && self.measured_at[dev]
            .compare_exchange(last, now_ns.max(1), Relaxed, Relaxed)
            .is_ok()
    }

    /// Brings the context charge on `dev` to what the device holds for this process beyond its allocations.
    /// `device_used` is the process's used memory as NVML reports it.
    pub fn set_context_from(&self, dev: usize, device_used: u64) {
        let ctx = device_used.saturating_sub(self.tracked[dev].load(Relaxed));
        let old = self.context[dev].swap(ctx, Relaxed);
        if ctx > old {
            // Memory the device already holds: charged whatever the limit says (it can only be reported).
            let _ = self.region.try_charge(self.slot, dev, ctx - old, None);
            self.region.add_context_bytes(self.slot, ctx - old);
        } else if old > ctx {
            self.region.uncharge(self.slot, dev, old - ctx);
            self.region
                .add_context_bytes(self.slot, 0u64.wrapping_sub(old - ctx));
        }
    }
}

fn register_handlers() {
    if HANDLERS_REGISTERED.swap(true, AcqRel) {
        return;
    }
    // SAFETY: plain C function pointers with the signatures atexit/pthread_atfork expect.
    unsafe {
        libc::atexit(at_exit);
        libc::pthread_atfork(None, None, Some(in_forked_child));
    }
}

extern "C" fn at_exit() {
    crate::pacing::report();
    if let Some(p) = existing() {
        if p.pid == std::process::id() {
            p.region.release(p.slot, p.pid);
        }
    }
}

/// The child is a new process with no CUDA state: forget the parent's slot (leaked, not freed: another thread
/// of the parent may have been using it at fork time) and start over on its first call.
extern "C" fn in_forked_child() {
    PROCESS.store(std::ptr::null_mut(), Release);
    PASSTHROUGH.store(false, Release);
    crate::pacing::forked_child();
}

pub use vgpu_contract::mapped::monotonic_ns as now_ns;

#[cfg(test)]
mod tests {
    use super::*;

    fn proc_with(limit_mib: u64) -> Process {
        let (cfg, _) = config::resolve(
            &|k| (k == "CUDA_DEVICE_MEMORY_LIMIT_0").then(|| format!("{limit_mib}m")),
            config::LimitsFile::Absent,
        );
        Process::new(cfg)
    }

    #[test]
    fn charge_record_forget() {
        let p = proc_with(100);
        let mib = 1 << 20;
        p.charge(0, 60 * mib).unwrap();
        p.record(Kind::DevicePtr, 0x1000, 0, 60 * mib);
        let e = p.charge(0, 50 * mib).unwrap_err();
        assert_eq!(e.requested_total, 110 * mib);
        p.forget(Kind::DevicePtr, 0x1000);
        p.forget(Kind::DevicePtr, 0x1000);
        assert_eq!(p.container_used(0), 0);
        p.charge(0, 90 * mib).unwrap();
    }

    #[test]
    fn context_charge_follows_the_device() {
        let p = proc_with(1000);
        let mib = 1 << 20;
        p.charge(0, 100 * mib).unwrap();
        p.record(Kind::DevicePtr, 1, 0, 100 * mib);
        p.set_context_from(0, 400 * mib);
        assert_eq!(p.context_bytes(0), 300 * mib);
        assert_eq!(p.container_used(0), 400 * mib);
        p.set_context_from(0, 350 * mib);
        assert_eq!(p.container_used(0), 350 * mib);
        assert!(p.context_due(0, 0, 5));
        assert!(!p.context_due(0, 0, 6), "rate limited");
        assert!(
            p.context_due(0, 600 * mib, 7),
            "near the limit it is measured again"
        );
    }
}
