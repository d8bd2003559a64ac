//! The card file: one per physical GPU in the node-wide card directory (`VGPU_CARD_DIR`), shared by every
//! slice on that GPU, so their compute windows do not overlap and a `default` slice knows whether anyone else
//! wants the card.
//!
//! # Layout, version 1 (native-endian 64-bit words)
//! ```text
//! header (64 bytes): magic "VGPUCARD" | version | entry count
//! entry i (64 bytes each, ENTRIES of them) at 64 + 64*i:
//!   0  key: identity of the container (its cache file's device and inode, hashed); 0 = free
//!   8  share percent | policy code << 32
//!   16 last active (CLOCK_MONOTONIC ns): refreshed while a process of the container launches or waits
//!   24 launches (sum reported by the container's processes)
//!   32 nanoseconds its launches were held back
//! ```
//! Entries are claimed with one compare-and-swap on `key`; an entry idle for [`STALE_NS`] may be taken over.
//! No locks: a process may die at any instruction and the others go on.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

pub const MAGIC: u64 = u64::from_ne_bytes(*b"VGPUCARD");
pub const VERSION: u64 = 1;
pub const ENTRIES: usize = 64;
pub const FILE_BYTES: usize = 64 + ENTRIES * 64;
/// An entry not refreshed for this long belongs to no one.
pub const STALE_NS: u64 = 10_000_000_000;

const E_KEY: usize = 0;
const E_SHARE: usize = 1;
const E_ACTIVE: usize = 2;
const E_LAUNCHES: usize = 3;
const E_THROTTLED: usize = 4;

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
            let tmp = dir.join(format!(".{uuid}.{}.tmp", std::process::id()));
            let mut f = std::fs::File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o666)
                .open(&tmp)?;
            let mut buf = vec![0u8; FILE_BYTES];
            buf[0..8].copy_from_slice(&MAGIC.to_ne_bytes());
            buf[8..16].copy_from_slice(&VERSION.to_ne_bytes());
            buf[16..24].copy_from_slice(&(ENTRIES as u64).to_ne_bytes());
            let r = f
                .write_all(&buf)
                .and_then(|_| std::fs::hard_link(&tmp, &path));
            let _ = std::fs::remove_file(&tmp);
            match r {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
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
        use std::os::fd::AsRawFd;
        // SAFETY: a regular file of at least FILE_BYTES (checked), mapped shared; valid after the fd closes.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FILE_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
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
                    let stale =
                        now_ns.saturating_sub(self.word(i, E_ACTIVE).load(SeqCst)) > STALE_NS;
                    (k == 0 || stale)
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
    fn file_round_trip() {
        let d = std::env::temp_dir().join(format!("vgpu-card-{}", std::process::id()));
        let c1 = CardFile::open(&d, "GPU-x").unwrap();
        let c2 = CardFile::open(&d, "GPU-x").unwrap();
        c1.join(5, 30, 1, 10);
        assert_eq!(c2.entries()[0].share, 30);
        std::fs::write(d.join("GPU-bad.card"), b"junk").unwrap();
        assert!(CardFile::open(&d, "GPU-bad").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
