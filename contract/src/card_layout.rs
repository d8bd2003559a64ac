//! The card file: one per physical GPU in the node-wide card directory (`VGPU_CARD_DIR`), shared by every
//! slice on that GPU, so their compute windows do not overlap and a `default` slice knows whether anyone else
//! wants the card.
//!
//! # Layout, version 1 (native-endian 64-bit words)
//! ```text
//! header (64 bytes): magic "VGPUCARD" | version | entry count | pacing period (ns; set by a slice that joins
//!   a card with no other live container, followed by every other slice so their windows line up)
//! entry i (64 bytes each, ENTRIES of them) at 64 + 64*i:
//!   0  key: identity of the container (its cache file's device and inode, hashed); 0 = free
//!   8  share percent | policy code << 32
//!   16 last active (CLOCK_MONOTONIC ns): refreshed while a process of the container launches or waits
//!   24 launches (sum reported by the container's processes)
//!   32 nanoseconds its launches were held back
//!   40 debt: nanoseconds the container's work ran past its windows, still to be paid
//!   48 last payment: period index << 24 | microseconds paid out of that period's window
//!   56 overrun record: end of the window (ns, low 40 bits of its period-aligned microseconds) << 24 |
//!      the largest overrun a process of the container measured for it (microseconds)
//! ```
//! The debt is the container's, not a process's: all of its processes launch in the same window, so all of
//! them must be held back while it is paid. One process pays it each period (a compare-and-swap on the
//! payment word); the others read what was paid.
//! Entries are claimed with one compare-and-swap on `key`; an entry idle for [`STALE_NS`] may be taken over.
//! No locks: a process may die at any instruction and the others go on.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

pub const MAGIC: u64 = u64::from_ne_bytes(*b"VGPUCARD");
pub const VERSION: u64 = 1;
pub const ENTRIES: usize = 64;
pub const FILE_BYTES: usize = 64 + ENTRIES * 64;
/// An entry not refreshed for this long belongs to no one.
pub const STALE_NS: u64 = 10_000_000_000;

/// Header word holding the pacing period.
const H_PERIOD: usize = 3;
const E_KEY: usize = 0;
const E_SHARE: usize = 1;
const E_ACTIVE: usize = 2;
const E_LAUNCHES: usize = 3;
const E_THROTTLED: usize = 4;
const E_DEBT: usize = 5;
const E_PAID: usize = 6;
const E_OVERRUN: usize = 7;

/// One entry as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub index: usize,
    pub key: u64,
    pub share: u32,
    pub policy: u32,
    pub last_active_ns: u64,
    pub launches: u64,
    pub throttled_ns: u64,
}

pub struct CardFile {
    ptr: *mut libc::c_void,
    private: Option<Box<[AtomicU64]>>,
}

// SAFETY: all access goes through atomics; the mapping lives as long as the value.
unsafe impl Send for CardFile {}
// SAFETY: as above.
unsafe impl Sync for CardFile {}

impl Drop for CardFile {
    fn drop(&mut self) {
        if self.private.is_none() {
            // SAFETY: ptr came from mmap of FILE_BYTES and nothing borrowed from self outlives it.
            unsafe { libc::munmap(self.ptr, FILE_BYTES) };
        }
    }
}

impl CardFile {
    /// Opens (creating complete if needed) the card file for `uuid` in `dir`.
    pub fn open(dir: &Path, uuid: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{uuid}.card"));
        if !path.exists() {
            let mut buf = vec![0u8; FILE_BYTES];
            buf[0..8].copy_from_slice(&MAGIC.to_ne_bytes());
            buf[8..16].copy_from_slice(&VERSION.to_ne_bytes());
            buf[16..24].copy_from_slice(&(ENTRIES as u64).to_ne_bytes());
            crate::mapped::create_complete(&path, &buf)?;
        }
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&path)?;
        let bad = |why: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {why}", path.display()),
            )
        };
        if f.metadata()?.len() < FILE_BYTES as u64 {
            return Err(bad("too short for a card file"));
        }
        let mut head = [0u8; 16];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0)?;
        if head[0..8] != MAGIC.to_ne_bytes() || head[8..16] != VERSION.to_ne_bytes() {
            return Err(bad("not a version 1 card file"));
        }
        let ptr = crate::mapped::map_shared(&f, FILE_BYTES)?;
        Ok(Self { ptr, private: None })
    }

    /// A card known to this process only (no card directory): pacing still works, uncoordinated.
    pub fn private() -> Self {
        let words: Box<[AtomicU64]> = (0..FILE_BYTES / 8).map(|_| AtomicU64::new(0)).collect();
        let ptr = words.as_ptr() as *mut libc::c_void;
        Self {
            ptr,
            private: Some(words),
        }
    }

    fn period_word(&self) -> &AtomicU64 {
        // SAFETY: header word 3, inside the FILE_BYTES region, 8-byte aligned, alive as long as self.
        unsafe { &*(self.ptr as *const AtomicU64).add(H_PERIOD) }
    }

    /// The card's pacing period in ns (0 until a slice has recorded one).
    pub fn period_ns(&self) -> u64 {
        self.period_word().load(SeqCst)
    }

    /// Settles the card's period as the container in `entry` joins: with no other container live on the card
    /// (every other entry free or stale) it records `wanted`, so a changed setting takes effect once the card
    /// has emptied; otherwise it keeps the recorded one, which every slice then follows. Returns the period.
    /// Two containers joining an empty card at once may record different values; both re-read the period
    /// at every tick, so they agree again within one.
    pub fn settle_period(&self, entry: usize, wanted: u64, now_ns: u64) -> u64 {
        let others_live = (0..ENTRIES)
            .any(|i| i != entry && self.word(i, E_KEY).load(SeqCst) != 0 && !self.stale(i, now_ns));
        let w = self.period_word();
        if !others_live {
            w.store(wanted, SeqCst);
            return wanted;
        }
        match w.compare_exchange(0, wanted, SeqCst, SeqCst) {
            Ok(_) => wanted,
            Err(recorded) => recorded,
        }
    }

    /// Entry `i` has not been refreshed for [`STALE_NS`]: it belongs to no one.
    fn stale(&self, i: usize, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.word(i, E_ACTIVE).load(SeqCst)) > STALE_NS
    }

    fn word(&self, entry: usize, field: usize) -> &AtomicU64 {
        debug_assert!(entry < ENTRIES && field < 8);
        // SAFETY: inside the FILE_BYTES region, 8-byte aligned, alive as long as self.
        unsafe { &*(self.ptr as *const AtomicU64).add(8 + entry * 8 + field) }
    }

    /// The entry of container `key`, claiming one if it has none. None when the card is full.
    pub fn join(&self, key: u64, share: u32, policy: u32, now_ns: u64) -> Option<usize> {
        let share_word = share as u64 | ((policy as u64) << 32);
        let mine = (0..ENTRIES)
            .find(|&i| self.word(i, E_KEY).load(SeqCst) == key)
            .or_else(|| {
                (0..ENTRIES).find(|&i| {
                    let k = self.word(i, E_KEY).load(SeqCst);
                    (k == 0 || self.stale(i, now_ns))
                        && self
                            .word(i, E_KEY)
                            .compare_exchange(k, key, SeqCst, SeqCst)
                            .is_ok()
                })
            })?;
        // Two processes of one container may claim two entries at once: the later entry yields to the earlier.
        let first = (0..ENTRIES)
            .find(|&i| self.word(i, E_KEY).load(SeqCst) == key)
            .unwrap_or(mine);
        if first != mine {
            let _ = self
                .word(mine, E_KEY)
                .compare_exchange(key, 0, SeqCst, SeqCst);
        }
        self.word(first, E_SHARE).store(share_word, SeqCst);
        self.word(first, E_ACTIVE).fetch_max(now_ns, SeqCst);
        Some(first)
    }

    pub fn touch(&self, entry: usize, now_ns: u64) {
        self.word(entry, E_ACTIVE).fetch_max(now_ns, SeqCst);
    }

    pub fn add_stats(&self, entry: usize, launches: u64, throttled_ns: u64) {
        self.word(entry, E_LAUNCHES).fetch_add(launches, SeqCst);
        self.word(entry, E_THROTTLED)
            .fetch_add(throttled_ns, SeqCst);
    }

    /// Reports that this process's work ran `ns` past the container's window that ended at `end_ns`.
    /// Processes of one container drain their queues at once, so the container owes the largest of their
    /// overruns for a window, not their sum: reports for one window are kept as a maximum, which joins the
    /// debt (capped at `cap_ns`) when the first report for a later window arrives.
    pub fn report_overrun(&self, entry: usize, end_ns: u64, ns: u64, cap_ns: u64) {
        let tag = (end_ns / 1000) & ((1 << 40) - 1);
        let us = (ns / 1000).min(0xff_ffff);
        let rec = self.word(entry, E_OVERRUN);
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
                    .word(entry, E_DEBT)
                    .fetch_update(SeqCst, SeqCst, |d| Some((d + owed).min(cap_ns)));
                return;
            }
        }
    }

    /// What period `period`'s window of `len_ns` gives up to the container's debt: paid once per period by the
    /// first process to ask, the same answer for every other.
    pub fn pay_debt(&self, entry: usize, period: u64, len_ns: u64) -> u64 {
        let paid = self.word(entry, E_PAID);
        loop {
            let cur = paid.load(SeqCst);
            if cur >> 24 == period & ((1 << 40) - 1) {
                return (cur & 0xff_ffff) * 1000;
            }
            let debt = self.word(entry, E_DEBT);
            let pay_us = (debt.load(SeqCst).min(len_ns) / 1000).min(0xff_ffff);
            let next = ((period & ((1 << 40) - 1)) << 24) | pay_us;
            if paid.compare_exchange(cur, next, SeqCst, SeqCst).is_ok() {
                let _ =
                    debt.fetch_update(SeqCst, SeqCst, |d| Some(d.saturating_sub(pay_us * 1000)));
                return pay_us * 1000;
            }
        }
    }

    pub fn entries(&self) -> Vec<Entry> {
        (0..ENTRIES)
            .filter_map(|index| {
                let key = self.word(index, E_KEY).load(SeqCst);
                let share = self.word(index, E_SHARE).load(SeqCst);
                (key != 0).then(|| Entry {
                    index,
                    key,
                    share: share as u32,
                    policy: (share >> 32) as u32,
                    last_active_ns: self.word(index, E_ACTIVE).load(SeqCst),
                    launches: self.word(index, E_LAUNCHES).load(SeqCst),
                    throttled_ns: self.word(index, E_THROTTLED).load(SeqCst),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_dedups_and_takes_over_stale() {
        let c = CardFile::private();
        let a = c.join(11, 30, 1, 1_000).unwrap();
        assert_eq!(c.join(11, 30, 1, 2_000), Some(a));
        let b = c.join(22, 50, 1, 2_000).unwrap();
        assert_ne!(a, b);
        assert_eq!(c.entries().len(), 2);
        for k in 100..(100 + ENTRIES as u64 - 2) {
            c.join(k, 1, 0, 3_000).unwrap();
        }
        assert_eq!(c.join(999, 1, 0, 3_000), None, "full");
        // Much later, idle entries are taken over.
        assert!(c.join(999, 1, 0, 3_000 + STALE_NS + 1).is_some());
    }

    #[test]
    fn debt_is_paid_once_per_period_for_the_whole_container() {
        let c = CardFile::private();
        let e = c.join(7, 30, 1, 1).unwrap();
        // Two processes report on window 1 (the larger counts), then a report on window 2 closes window 1 out.
        c.report_overrun(e, 1_000_000_000, 8_000_000, 50_000_000);
        c.report_overrun(e, 1_000_000_000, 3_000_000, 50_000_000);
        assert_eq!(
            c.pay_debt(e, 9, 5_000_000),
            0,
            "nothing owed until the window is closed out"
        );
        c.report_overrun(e, 1_050_000_000, 1_000, 50_000_000);
        assert_eq!(
            c.pay_debt(e, 10, 5_000_000),
            5_000_000,
            "a window pays at most its length"
        );
        assert_eq!(
            c.pay_debt(e, 10, 5_000_000),
            5_000_000,
            "a second process sees the same payment"
        );
        assert_eq!(
            c.pay_debt(e, 11, 5_000_000),
            3_000_000,
            "the rest next period"
        );
        assert_eq!(c.pay_debt(e, 12, 5_000_000), 0);
        c.report_overrun(e, 1_100_000_000, 80_000_000, 50_000_000);
        c.report_overrun(e, 1_150_000_000, 0, 50_000_000);
        assert_eq!(c.pay_debt(e, 13, 60_000_000), 50_000_000, "capped");
    }

    #[test]
    fn the_first_slice_sets_the_period_and_later_ones_adopt_it() {
        let c = CardFile::private();
        let a = c.join(1, 30, 1, 1_000).unwrap();
        assert_eq!(c.settle_period(a, 50_000_000, 1_000), 50_000_000);
        let b = c.join(2, 50, 1, 2_000).unwrap();
        assert_eq!(c.settle_period(b, 1_000_000_000, 2_000), 50_000_000);
        assert_eq!(c.period_ns(), 50_000_000);
        // Once the others are stale, a newcomer's setting takes effect.
        let later = 3_000 + STALE_NS;
        let n = c.join(3, 10, 1, later).unwrap();
        assert_eq!(c.settle_period(n, 200_000_000, later), 200_000_000);
        assert_eq!(c.period_ns(), 200_000_000);
    }

    #[test]
    fn file_round_trip() {
        let d = std::env::temp_dir().join(format!("vgpu-card-{}", std::process::id()));
        let c1 = CardFile::open(&d, "GPU-x").unwrap();
        let c2 = CardFile::open(&d, "GPU-x").unwrap();
        c1.join(5, 30, 1, 10);
        assert_eq!(c2.entries()[0].share, 30);
        c1.settle_period(0, 20_000_000, 10);
        assert_eq!(c2.period_ns(), 20_000_000, "shared through the file");
        std::fs::write(d.join("GPU-bad.card"), b"junk").unwrap();
        assert!(CardFile::open(&d, "GPU-bad").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
