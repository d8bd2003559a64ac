//! The shared-cache file: one per container, charged by all of its processes, read by the agent from the host.
//!
//! # Layout, version 1 (native-endian, every field an aligned 64-bit word)
//! ```text
//! offset  size   header (HEADER_BYTES)
//! 0       8      magic "VGPUCACH"
//! 8       8      version (low 32 bits) | slot count (high 32 bits)
//! 16      8      high-water mark: slots at or past it were never claimed
//! 24      8      SM limit in percent (0 = none) | policy code << 32   (as the creator saw them; informational)
//! 64      8x16   memory limit per CUDA ordinal in bytes (0 = none; as the creator saw them; informational)
//! 192     8x16   UUID hint per ordinal: first 8 bytes after "GPU-" as written by whoever resolved it (0 = unknown)
//! 512     8x48   pacing debt per ordinal, 3 words each (the container's, shared by its processes; see
//!                `report_overrun`): overrun record (window end, low 40 bits of its µs, << 24 | largest overrun
//!                µs), debt ns still to pay, last payment (period index << 24 | µs paid out of that period)
//! 4096           slot 0, then SLOT_BYTES per slot
//!
//! slot:
//! 0       8      owner: generation << 32 | state, state = 0 free, pid (bit 31 clear) owned, RECLAIMING|pid
//! 8       8      process start time (clock ticks after boot, /proc/PID/stat field 22); 0 while claiming
//! 16      8      pid namespace inode of the owner (so the host can translate the pid)
//! 24      8      kernel launches seen by the shim
//! 32      8      nanoseconds the shim held launches back (pacing)
//! 40      8      bytes of the charge that are the CUDA context (already inside used[])
//! 48      8      host pid of the owner, written by the agent: generation << 32 | host pid (0 = not known yet)
//! 128     8x16   bytes charged per CUDA ordinal
//! ```
//!
//! The host-pid word sat in the zeroed reserve of the first version-1 files, so it needs no new version: a file
//! written before it existed reads as "host pid not known", which is what it was. It carries the owner word's
//! generation so that a pid the agent translated for one process can never be taken by the next owner of the
//! slot (the slot may be freed and claimed again between the agent's read and its write).
//!
//! # Why no lock
//! A process may die at any instruction. Each process writes only its own slot, so the only shared decisions
//! are claiming a free slot and reclaiming a dead one, both single compare-and-swaps on `owner`. A charge is
//! added to the slot first and then checked against the sum of all slots (sequentially consistent), so two
//! racing processes can both be refused but can never both pass the limit. Reclaiming dead processes costs a
//! `/proc` lookup per slot and so happens only when a charge would be refused (or when the agent sweeps).
//!
//! The file is created complete in a temporary file and linked into place, so no reader ever sees a
//! half-written header.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

pub const MAGIC: u64 = u64::from_ne_bytes(*b"VGPUCACH");
pub const VERSION: u32 = 1;
pub const MAX_DEVICES: usize = 16;
pub const SLOTS: usize = 1024;
pub const HEADER_BYTES: usize = 4096;
pub const SLOT_BYTES: usize = 256;
pub const FILE_BYTES: usize = HEADER_BYTES + SLOTS * SLOT_BYTES;

const RECLAIMING: u32 = 1 << 31;
const W: usize = 8;

// Word indices (not byte offsets) inside the header and a slot.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
const H_HIGH_WATER: usize = 2;
const H_SM: usize = 3;
const H_LIMITS: usize = 64 / W;
const H_UUIDS: usize = 192 / W;
const H_PACING: usize = 512 / W;
const P_OVERRUN: usize = 0;
const P_DEBT: usize = 1;
const P_PAID: usize = 2;
const S_OWNER: usize = 0;
const S_START: usize = 1;
const S_PIDNS: usize = 2;
const S_LAUNCHES: usize = 3;
const S_THROTTLED_NS: usize = 4;
const S_CONTEXT: usize = 5;
const S_HOST_PID: usize = 6;
const S_USED: usize = 128 / W;

/// What the creator of the file knew about the container's limits; stored for readers (agent, status).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderInfo {
    pub memory_limits: [u64; MAX_DEVICES],
    pub sm_limit: u32,
    pub policy: u32,
}

#[derive(Debug)]
pub enum CacheError {
    Io(PathBuf, io::Error),
    /// Not a vgpu cache file, or truncated.
    Corrupt(PathBuf, &'static str),
    /// A vgpu cache file of another layout version.
    Version(PathBuf, u32),
}

impl std::fmt::Display for CacheError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(p, e) => write!(f, "shared cache {}: {e}", p.display()),
            Self::Corrupt(p, why) => write!(
                f,
                "shared cache {}: not a vgpu cache file ({why})",
                p.display()
            ),
            Self::Version(p, v) => write!(
                f,
                "shared cache {}: layout version {v}, this build reads version {VERSION}",
                p.display()
            ),
        }
    }
}

impl std::error::Error for CacheError {}

/// A refused charge: what the device would hold in total, against the limit (HAMi's OOM line numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    pub requested_total: u64,
    pub limit: u64,
}

/// A slot as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotView {
    pub index: usize,
    pub pid: u32,
    pub start_time: u64,
    pub pid_ns: u64,
    pub launches: u64,
    pub throttled_ns: u64,
    pub context_bytes: u64,
    pub used: [u64; MAX_DEVICES],
}

/// Backing memory of a region: a shared file mapping, or process-private memory when no usable file exists.
enum Backing {
    Mapped {
        ptr: *mut libc::c_void,
    },
    /// Owns the words `words` points into.
    Private {
        _words: Box<[AtomicU64]>,
    },
}

/// A mapped cache file (or a private stand-in with the same rules).
pub struct CacheRegion {
    words: *const AtomicU64,
    backing: Backing,
    path: Option<PathBuf>,
}

// SAFETY: the region is only ever accessed through atomics; the mapping lives as long as the value.
unsafe impl Send for CacheRegion {}
// SAFETY: as above; all shared access is atomic.
unsafe impl Sync for CacheRegion {}

impl Drop for CacheRegion {
    fn drop(&mut self) {
        if let Backing::Mapped { ptr } = self.backing {
            // SAFETY: ptr came from a successful mmap of FILE_BYTES and no reference outlives self.
            unsafe { libc::munmap(ptr, FILE_BYTES) };
        }
    }
}

fn header_bytes(info: &HeaderInfo) -> Vec<u8> {
    let mut buf = vec![0u8; FILE_BYTES];
    let mut put =
        |word: usize, v: u64| buf[word * W..word * W + W].copy_from_slice(&v.to_ne_bytes());
    put(H_MAGIC, MAGIC);
    put(H_VERSION, VERSION as u64 | ((SLOTS as u64) << 32));
    put(H_HIGH_WATER, 0);
    put(H_SM, info.sm_limit as u64 | ((info.policy as u64) << 32));
    for (i, l) in info.memory_limits.iter().enumerate() {
        put(H_LIMITS + i, *l);
    }
    buf
}

impl CacheRegion {
    /// Opens the container's cache file, creating it complete if it does not exist yet.
    pub fn open_or_create(path: &Path, info: &HeaderInfo) -> Result<Self, CacheError> {
        let io = |e| CacheError::Io(path.to_path_buf(), e);
        match File::options().read(true).write(true).open(path) {
            Ok(f) => Self::map(path, f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                crate::mapped::create_complete(path, &header_bytes(info)).map_err(io)?;
                let f = File::options()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(io)?;
                Self::map(path, f)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Opens an existing cache file (the agent's view); never creates one.
    pub fn open_existing(path: &Path) -> Result<Self, CacheError> {
        let f = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| CacheError::Io(path.to_path_buf(), e))?;
        Self::map(path, f)
    }

    fn map(path: &Path, f: File) -> Result<Self, CacheError> {
        let len = f
            .metadata()
            .map_err(|e| CacheError::Io(path.to_path_buf(), e))?
            .len();
        // Check the size before mapping: touching a mapping past the end of a file raises SIGBUS.
        if len < HEADER_BYTES as u64 {
            return Err(CacheError::Corrupt(
                path.to_path_buf(),
                "shorter than a header",
            ));
        }
        let mut head = [0u8; 16];
        let n = {
            use std::os::unix::fs::FileExt;
            f.read_at(&mut head, 0)
                .map_err(|e| CacheError::Io(path.to_path_buf(), e))?
        };
        if n < 16 || u64::from_ne_bytes(head[..8].try_into().unwrap()) != MAGIC {
            return Err(CacheError::Corrupt(path.to_path_buf(), "bad magic"));
        }
        let ver = u64::from_ne_bytes(head[8..16].try_into().unwrap());
        if ver as u32 != VERSION {
            return Err(CacheError::Version(path.to_path_buf(), ver as u32));
        }
        if (ver >> 32) as usize != SLOTS || len < FILE_BYTES as u64 {
            return Err(CacheError::Corrupt(
                path.to_path_buf(),
                "wrong size for its version",
            ));
        }
        let ptr = crate::mapped::map_shared(&f, FILE_BYTES)
            .map_err(|e| CacheError::Io(path.to_path_buf(), e))?;
        Ok(Self {
            words: ptr as *const AtomicU64,
            backing: Backing::Mapped { ptr },
            path: Some(path.to_path_buf()),
        })
    }

    /// A region in this process's own memory: the same accounting rules, shared with no one. Used when the
    /// container's file is unusable, so the process still holds its own limit.
    pub fn private(info: &HeaderInfo) -> Self {
        let bytes = header_bytes(info);
        let words: Box<[AtomicU64]> = bytes
            .chunks_exact(W)
            .map(|c| AtomicU64::new(u64::from_ne_bytes(c.try_into().unwrap())))
            .collect();
        let ptr = words.as_ptr();
        Self {
            words: ptr,
            backing: Backing::Private { _words: words },
            path: None,
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn is_shared(&self) -> bool {
        matches!(self.backing, Backing::Mapped { .. })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < FILE_BYTES / W);
        // SAFETY: i is within the FILE_BYTES region that stays mapped (or boxed) for the life of self, and the
        // region is 8-byte aligned (page-aligned mapping or a boxed AtomicU64 slice).
        unsafe { &*self.words.add(i) }
    }

    fn slot_word(&self, slot: usize, i: usize) -> &AtomicU64 {
        self.word((HEADER_BYTES + slot * SLOT_BYTES) / W + i)
    }

    pub fn header(&self) -> HeaderInfo {
        let mut memory_limits = [0; MAX_DEVICES];
        for (i, l) in memory_limits.iter_mut().enumerate() {
            *l = self.word(H_LIMITS + i).load(SeqCst);
        }
        let sm = self.word(H_SM).load(SeqCst);
        HeaderInfo {
            memory_limits,
            sm_limit: sm as u32,
            policy: (sm >> 32) as u32,
        }
    }

    /// Records which card a CUDA ordinal is (first 8 bytes of its UUID). Every process writes the same value,
    /// so racing writers cannot disagree.
    pub fn set_uuid_hint(&self, dev: usize, hint: u64) {
        if dev < MAX_DEVICES {
            self.word(H_UUIDS + dev).store(hint, SeqCst);
        }
    }

    fn pacing_word(&self, dev: usize, field: usize) -> &AtomicU64 {
        self.word(H_PACING + dev.min(MAX_DEVICES - 1) * 3 + field)
    }

    /// Reports that a process's work on CUDA ordinal `dev` ran `ns` past the container's window that ended at
    /// `end_ns`. The pacing debt is the container's, kept here and not in the card file (which every tenant on
    /// the node can write): all of its processes launch in the same window, so all of them must be held back
    /// while it is paid. They drain their queues at once, so the container owes the largest of their overruns
    /// for a window, not their sum: reports for one window are kept as a maximum, which joins the debt (capped
    /// at `cap_ns`) when the first report for a later window arrives.
    pub fn report_overrun(&self, dev: usize, end_ns: u64, ns: u64, cap_ns: u64) {
        let tag = (end_ns / 1000) & ((1 << 40) - 1);
        let us = (ns / 1000).min(0xff_ffff);
        let rec = self.pacing_word(dev, P_OVERRUN);
        loop {
            let cur = rec.load(SeqCst);
            let (cur_tag, cur_us) = (cur >> 24, cur & 0xff_ffff);
            if cur_tag == tag {
                if us <= cur_us
                    || rec
                        .compare_exchange(cur, (tag << 24) | us, SeqCst, SeqCst)
                        .is_ok()
                {
                    return;
                }
            } else if cur_tag > tag {
                return; // a report for a window already closed out
            } else if rec
                .compare_exchange(cur, (tag << 24) | us, SeqCst, SeqCst)
                .is_ok()
            {
                let owed = cur_us * 1000;
                let _ = self
                    .pacing_word(dev, P_DEBT)
                    .fetch_update(SeqCst, SeqCst, |d| {
                        Some((d.saturating_add(owed)).min(cap_ns))
                    });
                return;
            }
        }
    }

    /// What period `period`'s window of `len_ns` on ordinal `dev` gives up to the container's debt: paid once
    /// per period by the first process to ask, the same answer for every other. Never more than `len_ns`.
    pub fn pay_debt(&self, dev: usize, period: u64, len_ns: u64) -> u64 {
        let paid = self.pacing_word(dev, P_PAID);
        loop {
            let cur = paid.load(SeqCst);
            if cur >> 24 == period & ((1 << 40) - 1) {
                return ((cur & 0xff_ffff) * 1000).min(len_ns);
            }
            let debt = self.pacing_word(dev, P_DEBT);
            let pay_us = (debt.load(SeqCst).min(len_ns) / 1000).min(0xff_ffff);
            let next = ((period & ((1 << 40) - 1)) << 24) | pay_us;
            if paid.compare_exchange(cur, next, SeqCst, SeqCst).is_ok() {
                let _ =
                    debt.fetch_update(SeqCst, SeqCst, |d| Some(d.saturating_sub(pay_us * 1000)));
                return pay_us * 1000;
            }
        }
    }

    pub fn uuid_hint(&self, dev: usize) -> u64 {
        if dev < MAX_DEVICES {
            self.word(H_UUIDS + dev).load(SeqCst)
        } else {
            0
        }
    }

    fn high_water(&self) -> usize {
        (self.word(H_HIGH_WATER).load(SeqCst) as usize).min(SLOTS)
    }

    /// Claims a free slot for `pid`. None when all slots are taken by live processes.
    pub fn claim(&self, pid: u32, start_time: u64, pid_ns: u64) -> Option<usize> {
        for slot in 0..SLOTS {
            let owner = self.slot_word(slot, S_OWNER);
            let cur = owner.load(SeqCst);
            if cur as u32 != 0 {
                continue;
            }
            let gen = (cur >> 32) + 1;
            if owner
                .compare_exchange(cur, (gen << 32) | pid as u64, SeqCst, SeqCst)
                .is_ok()
            {
                self.word(H_HIGH_WATER).fetch_max(slot as u64 + 1, SeqCst);
                self.slot_word(slot, S_PIDNS).store(pid_ns, SeqCst);
                for k in [S_LAUNCHES, S_THROTTLED_NS, S_CONTEXT, S_HOST_PID] {
                    self.slot_word(slot, k).store(0, SeqCst);
                }
                // Written last: a slot with a start time is fully ours; reclaimers treat 0 as "claiming".
                self.slot_word(slot, S_START).store(start_time, SeqCst);
                return Some(slot);
            }
        }
        None
    }

    /// Gives a slot back (clean process exit). Its charges go with it.
    pub fn release(&self, slot: usize, pid: u32) {
        let owner = self.slot_word(slot, S_OWNER);
        let cur = owner.load(SeqCst);
        if cur as u32 == pid {
            self.clear_slot(slot, cur, pid);
        }
    }

    /// Total charged on `dev` by every slot.
    pub fn device_total(&self, dev: usize) -> u64 {
        (0..self.high_water())
            .map(|s| self.slot_word(s, S_USED + dev).load(SeqCst))
            .sum()
    }

    /// Charges `bytes` on `dev` to `slot` if the container's total stays within `limit`.
    pub fn try_charge(
        &self,
        slot: usize,
        dev: usize,
        bytes: u64,
        limit: Option<u64>,
    ) -> Result<(), OverLimit> {
        let mine = self.slot_word(slot, S_USED + dev);
        mine.fetch_add(bytes, SeqCst);
        let Some(limit) = limit else { return Ok(()) };
        let total = self.device_total(dev);
        if total > limit {
            mine.fetch_sub(bytes, SeqCst);
            return Err(OverLimit {
                requested_total: total,
                limit,
            });
        }
        Ok(())
    }

    pub fn uncharge(&self, slot: usize, dev: usize, bytes: u64) {
        let mine = self.slot_word(slot, S_USED + dev);
        // Saturating: a double free reported by the driver must not wrap the counter.
        let _ = mine.fetch_update(SeqCst, SeqCst, |v| Some(v.saturating_sub(bytes)));
    }

    pub fn add_context_bytes(&self, slot: usize, bytes: u64) {
        self.slot_word(slot, S_CONTEXT).fetch_add(bytes, SeqCst);
    }

    /// The largest CUDA context any live process of the container was measured to hold: what a new process's
    /// context will about take.
    pub fn max_context_bytes(&self) -> u64 {
        (0..self.high_water())
            .filter(|&s| self.slot_word(s, S_OWNER).load(SeqCst) as u32 != 0)
            .map(|s| self.slot_word(s, S_CONTEXT).load(SeqCst))
            .max()
            .unwrap_or(0)
    }

    pub fn add_launches(&self, slot: usize, n: u64) {
        self.slot_word(slot, S_LAUNCHES).fetch_add(n, SeqCst);
    }

    pub fn add_throttled_ns(&self, slot: usize, ns: u64) {
        self.slot_word(slot, S_THROTTLED_NS).fetch_add(ns, SeqCst);
    }

    /// Records the host pid of the process that owns `slot` as `pid` (its pid in its own namespace) started at
    /// `start_time`: the agent's translation, so the shim can find itself in NVML's list when the driver names
    /// host pids. Does nothing (returns false) when the slot has another owner by now.
    pub fn record_host_pid(&self, slot: usize, pid: u32, start_time: u64, host_pid: u32) -> bool {
        if slot >= SLOTS {
            return false;
        }
        let owner = self.slot_word(slot, S_OWNER).load(SeqCst);
        let start = self.slot_word(slot, S_START).load(SeqCst);
        let Some(word) = host_pid_word(owner, start, pid, start_time, host_pid) else {
            return false;
        };
        self.slot_word(slot, S_HOST_PID).store(word, SeqCst);
        true
    }

    /// The host pid the agent recorded for the current owner of `slot`, if it has.
    pub fn host_pid(&self, slot: usize) -> Option<u32> {
        if slot >= SLOTS {
            return None;
        }
        let word = self.slot_word(slot, S_HOST_PID).load(SeqCst);
        let owner = self.slot_word(slot, S_OWNER).load(SeqCst);
        (word != 0 && word >> 32 == owner >> 32 && word as u32 != 0).then_some(word as u32)
    }

    /// Every claimed slot as it is now.
    pub fn slots(&self) -> Vec<SlotView> {
        (0..self.high_water())
            .filter_map(|index| slot_view(index, |i| self.slot_word(index, i).load(SeqCst)))
            .collect()
    }

    /// Frees the slots of processes that are gone. `alive(pid, start_time)` answers for a pid as this region's
    /// processes see it (start_time 0: the owner was still claiming). Returns the bytes given back.
    pub fn reclaim_dead(&self, mut alive: impl FnMut(u32, u64) -> bool) -> u64 {
        let mut freed = 0;
        for slot in 0..self.high_water() {
            let owner = self.slot_word(slot, S_OWNER);
            let cur = owner.load(SeqCst);
            let state = cur as u32;
            if state == 0 {
                continue;
            }
            let pid = state & !RECLAIMING;
            // A reclaimer that died half-way is itself reclaimable; its own start time is unknown here.
            let start = if state & RECLAIMING != 0 {
                0
            } else {
                self.slot_word(slot, S_START).load(SeqCst)
            };
            if alive(pid, start) {
                continue;
            }
            let bytes: u64 = (0..MAX_DEVICES)
                .map(|d| self.slot_word(slot, S_USED + d).load(SeqCst))
                .sum();
            if self.clear_slot(slot, cur, std::process::id()) {
                freed += bytes;
            }
        }
        freed
    }

    /// Takes the slot from `seen` (one CAS: only one clearer wins), zeroes it, frees it.
    fn clear_slot(&self, slot: usize, seen: u64, me: u32) -> bool {
        let owner = self.slot_word(slot, S_OWNER);
        let gen = (seen >> 32) + 1;
        let mark = (gen << 32) | (RECLAIMING | me) as u64;
        if owner.compare_exchange(seen, mark, SeqCst, SeqCst).is_err() {
            return false;
        }
        for d in 0..MAX_DEVICES {
            self.slot_word(slot, S_USED + d).store(0, SeqCst);
        }
        for k in [
            S_START,
            S_PIDNS,
            S_LAUNCHES,
            S_THROTTLED_NS,
            S_CONTEXT,
            S_HOST_PID,
        ] {
            self.slot_word(slot, k).store(0, SeqCst);
        }
        owner.store(gen << 32, SeqCst);
        true
    }
}

/// The host-pid word for a slot whose owner word and start time read `owner` and `start`, if they still name
/// the process (`pid`, `start_time`) that was translated.
fn host_pid_word(owner: u64, start: u64, pid: u32, start_time: u64, host_pid: u32) -> Option<u64> {
    let state = owner as u32;
    let owned = state != 0 && state & RECLAIMING == 0 && state == pid;
    (owned && start == start_time && start != 0 && host_pid != 0)
        .then_some((owner >> 32) << 32 | host_pid as u64)
}

/// [`CacheRegion::record_host_pid`] through a file read and written with `pread`/`pwrite` (for a reader that
/// does not map the file). The slot's owner and start time are read first; a slot claimed again since the
/// caller read it is left alone (and the generation in the word keeps a late write from applying to the next
/// owner). Returns whether the word was written.
pub fn write_host_pid(
    file: &File,
    slot: usize,
    pid: u32,
    start_time: u64,
    host_pid: u32,
) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    if slot >= SLOTS {
        return Ok(false);
    }
    let base = (HEADER_BYTES + slot * SLOT_BYTES) as u64;
    let mut head = [0u8; 16];
    file.read_exact_at(&mut head, base)?;
    let owner = u64::from_ne_bytes(head[..8].try_into().unwrap());
    let start = u64::from_ne_bytes(head[8..].try_into().unwrap());
    match host_pid_word(owner, start, pid, start_time, host_pid) {
        None => Ok(false),
        Some(word) => {
            // One aligned 8-byte write: the shim reads the word with one atomic load.
            file.write_all_at(&word.to_ne_bytes(), base + (S_HOST_PID * W) as u64)?;
            Ok(true)
        }
    }
}

/// Start time of a process in clock ticks after boot (`/proc/PID/stat` field 22), or None if it is gone. A
/// zombie counts as gone: the driver frees a process's memory when it exits, before its parent reaps it.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    if matches!(fields.next(), Some("Z") | Some("X") | Some("x")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Whether the process a slot names still runs, as seen from this pid namespace.
pub fn pid_alive(pid: u32, start_time: u64) -> bool {
    match process_start_time(pid) {
        None => false,
        Some(t) => start_time == 0 || t == start_time,
    }
}

/// Inode of this process's pid namespace.
pub fn own_pid_namespace() -> u64 {
    let path = CString::new("/proc/self/ns/pid").unwrap();
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: path is NUL-terminated and st is a valid out-pointer for stat(2).
    if unsafe { libc::stat(path.as_ptr(), st.as_mut_ptr()) } == 0 {
        // SAFETY: stat returned 0, so it filled st.
        unsafe { st.assume_init() }.st_ino
    } else {
        0
    }
}

/// How many bytes of a cache file hold everything a reader needs, given the header's first bytes (at least
/// 24): the header plus the slots below the high-water mark. For readers that copy the file rather than map
/// it.
pub fn bytes_in_use(header: &[u8]) -> usize {
    let hw = header
        .get(H_HIGH_WATER * W..H_HIGH_WATER * W + W)
        .map_or(0, |b| u64::from_ne_bytes(b.try_into().unwrap()));
    HEADER_BYTES + (hw.min(SLOTS as u64) as usize) * SLOT_BYTES
}

/// The header and claimed slots from a copy of a cache file (read with `pread`, say, by a reader that must
/// not map a file its writer can truncate). Any bytes are accepted: short or foreign data is an error, slots
/// past the end of the copy are left out, and no field is trusted beyond its range.
pub fn parse_copy(bytes: &[u8]) -> Result<(HeaderInfo, Vec<SlotView>), &'static str> {
    let word = |i: usize| -> u64 {
        bytes
            .get(i * W..i * W + W)
            .map_or(0, |b| u64::from_ne_bytes(b.try_into().unwrap()))
    };
    if bytes.len() < HEADER_BYTES {
        return Err("shorter than its header");
    }
    if word(H_MAGIC) != MAGIC {
        return Err("bad magic");
    }
    let ver = word(H_VERSION);
    if ver as u32 != VERSION || (ver >> 32) as usize != SLOTS {
        return Err("another layout version");
    }
    let mut memory_limits = [0; MAX_DEVICES];
    for (i, l) in memory_limits.iter_mut().enumerate() {
        *l = word(H_LIMITS + i);
    }
    let sm = word(H_SM);
    let header = HeaderInfo {
        memory_limits,
        sm_limit: sm as u32,
        policy: (sm >> 32) as u32,
    };
    let in_copy = (bytes.len() - HEADER_BYTES) / SLOT_BYTES;
    let high_water = (word(H_HIGH_WATER).min(SLOTS as u64) as usize).min(in_copy);
    let slot = |s: usize, i: usize| word((HEADER_BYTES + s * SLOT_BYTES) / W + i);
    let slots = (0..high_water)
        .filter_map(|index| slot_view(index, |i| slot(index, i)))
        .collect();
    Ok((header, slots))
}

/// Slot `index` as `word` reads its words (from the mapping, or from a copy), if a process owns it.
fn slot_view(index: usize, word: impl Fn(usize) -> u64) -> Option<SlotView> {
    let owner = word(S_OWNER) as u32;
    if owner == 0 {
        return None;
    }
    let mut used = [0; MAX_DEVICES];
    for (d, u) in used.iter_mut().enumerate() {
        *u = word(S_USED + d);
    }
    Some(SlotView {
        index,
        pid: owner & !RECLAIMING,
        start_time: word(S_START),
        pid_ns: word(S_PIDNS),
        launches: word(S_LAUNCHES),
        throttled_ns: word(S_THROTTLED_NS),
        context_bytes: word(S_CONTEXT),
        used,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_copy_reads_like_the_mapping_and_any_bytes_are_safe() {
        let d = tmpdir();
        let p = d.join("copy.cache");
        let r = CacheRegion::open_or_create(&p, &info(1000)).unwrap();
        let a = r.claim(10, 5, 1).unwrap();
        r.try_charge(a, 3, 600, None).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let n = bytes_in_use(&bytes);
        assert_eq!(n, HEADER_BYTES + SLOT_BYTES);
        let (h, slots) = parse_copy(&bytes[..n]).unwrap();
        assert_eq!(h, r.header());
        assert_eq!(slots, r.slots());
        // A copy cut inside the slots leaves them out; one cut in the header, or foreign bytes, is refused.
        assert_eq!(parse_copy(&bytes[..HEADER_BYTES + 10]).unwrap().1, vec![]);
        assert!(parse_copy(&bytes[..100]).is_err());
        assert!(parse_copy(&vec![0xff; FILE_BYTES]).is_err());
        let mut huge = bytes[..n].to_vec();
        huge[H_HIGH_WATER * W..H_HIGH_WATER * W + W].copy_from_slice(&u64::MAX.to_ne_bytes());
        assert_eq!(
            bytes_in_use(&huge),
            FILE_BYTES,
            "a forged high-water mark stays bounded"
        );
        assert_eq!(parse_copy(&huge).unwrap().1.len(), 1);
        std::fs::remove_file(&p).unwrap();
    }

    use super::*;

    fn info(limit: u64) -> HeaderInfo {
        let mut i = HeaderInfo::default();
        i.memory_limits[0] = limit;
        i
    }

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "vgpu-cache-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn charge_refuse_and_free() {
        let r = CacheRegion::private(&info(1000));
        let a = r.claim(10, 5, 1).unwrap();
        let b = r.claim(11, 5, 1).unwrap();
        assert_ne!(a, b);
        r.try_charge(a, 0, 600, Some(1000)).unwrap();
        let e = r.try_charge(b, 0, 500, Some(1000)).unwrap_err();
        assert_eq!(
            e,
            OverLimit {
                requested_total: 1100,
                limit: 1000
            }
        );
        assert_eq!(
            r.device_total(0),
            600,
            "a refused charge leaves nothing behind"
        );
        r.try_charge(b, 0, 400, Some(1000)).unwrap();
        r.uncharge(a, 0, 600);
        r.uncharge(a, 0, 600);
        assert_eq!(r.device_total(0), 400, "a double free does not wrap");
        assert_eq!(r.device_total(1), 0, "devices are separate");
    }

    #[test]
    fn dead_slots_are_reclaimed_once() {
        let r = CacheRegion::private(&info(1000));
        let a = r.claim(10, 5, 1).unwrap();
        let b = r.claim(11, 5, 1).unwrap();
        r.try_charge(a, 0, 700, Some(1000)).unwrap();
        r.try_charge(b, 0, 200, Some(1000)).unwrap();
        assert_eq!(r.reclaim_dead(|pid, _| pid != 10), 700);
        assert_eq!(r.reclaim_dead(|pid, _| pid != 10), 0);
        assert_eq!(r.device_total(0), 200);
        // The freed slot is claimable again and starts empty.
        assert_eq!(r.claim(12, 7, 1), Some(a));
        assert_eq!(r.slots().len(), 2);
    }

    #[test]
    fn file_is_shared_and_checked() {
        let d = tmpdir();
        let p = d.join("c.cache");
        let _ = std::fs::remove_file(&p);
        let r1 = CacheRegion::open_or_create(&p, &info(1 << 30)).unwrap();
        let r2 = CacheRegion::open_or_create(&p, &info(0)).unwrap();
        assert_eq!(
            r2.header().memory_limits[0],
            1 << 30,
            "the first creator's header stays"
        );
        let s = r1.claim(1, 1, 1).unwrap();
        r1.try_charge(s, 0, 4096, None).unwrap();
        assert_eq!(r2.device_total(0), 4096);

        std::fs::write(d.join("bad.cache"), b"not a cache").unwrap();
        assert!(matches!(
            CacheRegion::open_or_create(&d.join("bad.cache"), &info(0)),
            Err(CacheError::Corrupt(..))
        ));
        let mut other = header_bytes(&info(0));
        other[8] = 9;
        std::fs::write(d.join("v9.cache"), &other).unwrap();
        assert!(matches!(
            CacheRegion::open_or_create(&d.join("v9.cache"), &info(0)),
            Err(CacheError::Version(_, 9))
        ));
        let short = &header_bytes(&info(0))[..HEADER_BYTES + 10];
        std::fs::write(d.join("short.cache"), short).unwrap();
        assert!(matches!(
            CacheRegion::open_or_create(&d.join("short.cache"), &info(0)),
            Err(CacheError::Corrupt(..))
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn racing_threads_never_pass_the_limit() {
        let r = std::sync::Arc::new(CacheRegion::private(&info(10_000)));
        // What the threads hold after a successful charge: must never pass the limit.
        let committed = std::sync::Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let r = r.clone();
                let committed = committed.clone();
                std::thread::spawn(move || {
                    let s = r.claim(100 + t, 1, 1).unwrap();
                    let mut held = 0u64;
                    for i in 0..20_000u64 {
                        let sz = 1 + (i * 7919 + t as u64) % 700;
                        if r.try_charge(s, 0, sz, Some(10_000)).is_ok() {
                            held += sz;
                            assert!(committed.fetch_add(sz, SeqCst) + sz <= 10_000);
                        }
                        if i % 3 == 0 {
                            committed.fetch_sub(held, SeqCst);
                            r.uncharge(s, 0, held);
                            held = 0;
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(r.device_total(0) <= 10_000);
    }

    #[test]
    fn host_pids_follow_their_owner_only() {
        let r = CacheRegion::private(&info(0));
        let a = r.claim(7, 500, 1).unwrap();
        assert_eq!(r.host_pid(a), None);
        assert!(!r.record_host_pid(a, 8, 500, 4242), "another pid");
        assert!(!r.record_host_pid(a, 7, 501, 4242), "another start time");
        assert!(r.record_host_pid(a, 7, 500, 4242));
        assert_eq!(r.host_pid(a), Some(4242));
        // The slot is freed and claimed again by a process with the same namespaced pid and start tick: the
        // word written for the first owner does not carry over.
        r.release(a, 7);
        assert_eq!(r.claim(7, 500, 1), Some(a));
        assert_eq!(r.host_pid(a), None);
        // A late write for the first owner lands with the old generation: ignored.
        let stale_gen = (r.slot_word(a, S_OWNER).load(SeqCst) >> 32) - 2;
        r.slot_word(a, S_HOST_PID)
            .store(stale_gen << 32 | 4242, SeqCst);
        assert_eq!(r.host_pid(a), None);
    }

    #[test]
    fn host_pids_through_pwrite_and_in_old_files() {
        let d = tmpdir().join("hostpid");
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("c.cache");
        let _ = std::fs::remove_file(&p);
        let r = CacheRegion::open_or_create(&p, &info(0)).unwrap();
        let s = r.claim(9, 77, 1).unwrap();
        // A file from before the word existed has zeros there: "not known".
        assert_eq!(r.host_pid(s), None);
        let f = File::options().read(true).write(true).open(&p).unwrap();
        assert!(!write_host_pid(&f, s, 9, 78, 5151).unwrap());
        assert!(write_host_pid(&f, s, 9, 77, 5151).unwrap());
        assert_eq!(r.host_pid(s), Some(5151));
        assert!(!write_host_pid(&f, SLOTS, 9, 77, 5151).unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_zombie_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie once it has exited.
        for _ in 0..200 {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            if s.contains(") Z ") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(process_start_time(pid), None);
        child.wait().unwrap();
    }

    #[test]
    fn own_start_time_is_found() {
        let me = std::process::id();
        let t = process_start_time(me).unwrap();
        assert!(pid_alive(me, t));
        assert!(
            !pid_alive(me, t + 1),
            "a reused pid is not the same process"
        );
    }

    #[test]
    fn pacing_debt_is_paid_once_per_period_for_the_whole_container() {
        let c = CacheRegion::private(&HeaderInfo::default());
        // Two processes report on window 1 (the larger counts), then a report on window 2 closes window 1 out.
        c.report_overrun(0, 1_000_000_000, 8_000_000, 50_000_000);
        c.report_overrun(0, 1_000_000_000, 3_000_000, 50_000_000);
        assert_eq!(
            c.pay_debt(0, 9, 5_000_000),
            0,
            "nothing owed until the window is closed out"
        );
        c.report_overrun(0, 1_050_000_000, 1_000, 50_000_000);
        assert_eq!(
            c.pay_debt(0, 10, 5_000_000),
            5_000_000,
            "a window pays at most its length"
        );
        assert_eq!(
            c.pay_debt(0, 10, 5_000_000),
            5_000_000,
            "a second process sees the same payment"
        );
        assert_eq!(
            c.pay_debt(0, 11, 5_000_000),
            3_000_000,
            "the rest next period"
        );
        assert_eq!(c.pay_debt(0, 12, 5_000_000), 0);
        assert_eq!(c.pay_debt(1, 12, 5_000_000), 0, "each device its own");
        c.report_overrun(0, 1_100_000_000, 80_000_000, 50_000_000);
        c.report_overrun(0, 1_150_000_000, 0, 50_000_000);
        assert_eq!(c.pay_debt(0, 13, 60_000_000), 50_000_000, "capped");
    }
}
