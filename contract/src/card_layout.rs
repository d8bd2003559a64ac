//! The card file: one per physical GPU in the node-wide card directory (`VGPU_CARD_DIR`), through which the
//! slices on that GPU line their compute windows up and a `default` slice learns whether anyone else wants the
//! card.
//!
//! Every tenant on the node can write this file, so nothing in it is trusted: a slice reads it with `pread` into
//! its own buffer (never a shared mapping: a truncated file would raise SIGBUS), writes only its own entry with
//! `pwrite`, and takes from others only what cannot hurt it (see the shim's `pacing/peers.rs`). Its own share,
//! policy, period and debt come from its own limits and its own memory, never from here.
//!
//! # Layout, version 2 (native-endian 64-bit words)
//! ```text
//! header (64 bytes): magic "VGPUCARD" | version | entry count | reserved
//! entry i (64 bytes each, ENTRIES of them) at 64 + 64*i:
//!   0  key: identity of the container (its cache file's device and inode, hashed); 0 = never used
//!   8  share percent | policy code << 32
//!   16 last active (CLOCK_MONOTONIC ns): when a process of the container last launched or waited
//!   24 launches (sum reported by the container's processes)
//!   32 nanoseconds its launches were held back
//!   40 the pacing period the container asks for (ns)
//!   48, 56 reserved (0)
//! ```
//! **Liveness is a lock, not a word**: a process using an entry holds an open-file-description lock on its 64
//! bytes for as long as it lives (a write lock while claiming, then a read lock its container's other processes
//! share). The kernel drops it when the process dies, so a dead slice's entry is free at once, and words
//! claiming activity, however fresh or far in the future, make no entry live. A claim takes the write lock
//! without waiting: it fails on an entry someone holds, and succeeds on any other whatever its bytes say.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const MAGIC: u64 = u64::from_ne_bytes(*b"VGPUCARD");
pub const VERSION: u64 = 2;
pub const ENTRIES: usize = 64;
pub const HEADER_BYTES: usize = 64;
pub const ENTRY_BYTES: usize = 64;
pub const FILE_BYTES: usize = HEADER_BYTES + ENTRIES * ENTRY_BYTES;

/// One entry as read (or as its owner writes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    pub index: usize,
    pub key: u64,
    pub share: u32,
    pub policy: u32,
    pub last_active_ns: u64,
    pub launches: u64,
    pub throttled_ns: u64,
    pub period_ns: u64,
}

impl Entry {
    pub fn to_bytes(&self) -> [u8; ENTRY_BYTES] {
        let words = [
            self.key,
            self.share as u64 | (self.policy as u64) << 32,
            self.last_active_ns,
            self.launches,
            self.throttled_ns,
            self.period_ns,
            0,
            0,
        ];
        let mut b = [0u8; ENTRY_BYTES];
        for (i, w) in words.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
        }
        b
    }

    pub fn from_bytes(index: usize, b: &[u8; ENTRY_BYTES]) -> Entry {
        let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Entry {
            index,
            key: w(0),
            share: w(1) as u32,
            policy: (w(1) >> 32) as u32,
            last_active_ns: w(2),
            launches: w(3),
            throttled_ns: w(4),
            period_ns: w(5),
        }
    }
}

/// The header of an empty card file.
pub fn header() -> [u8; HEADER_BYTES] {
    let mut b = [0u8; HEADER_BYTES];
    b[0..8].copy_from_slice(&MAGIC.to_ne_bytes());
    b[8..16].copy_from_slice(&VERSION.to_ne_bytes());
    b[16..24].copy_from_slice(&(ENTRIES as u64).to_ne_bytes());
    b
}

/// The entries with a key in a copy of the whole file, or why the copy is no card file.
pub fn parse(buf: &[u8]) -> Result<Vec<Entry>, String> {
    if buf.len() != FILE_BYTES {
        return Err(format!(
            "{} bytes where a card file has {FILE_BYTES} (truncated or replaced)",
            buf.len()
        ));
    }
    if buf[0..24] != header()[0..24] {
        return Err(format!("not a version {VERSION} card file"));
    }
    Ok((0..ENTRIES)
        .map(|i| {
            let at = entry_offset(i) as usize;
            Entry::from_bytes(i, buf[at..at + ENTRY_BYTES].try_into().expect("64 bytes"))
        })
        .filter(|e| e.key != 0)
        .collect())
}

pub fn entry_offset(i: usize) -> u64 {
    (HEADER_BYTES + i * ENTRY_BYTES) as u64
}

/// An opened card file. Reads copy the whole file out; the only write is a slice's own entry.
pub struct CardFile {
    file: File,
    path: std::path::PathBuf,
    /// Device and inode of the file opened, to notice when another file takes its name.
    id: (u64, u64),
}

/// What a lock on an entry is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Hold {
    /// Claiming: no one else may hold the entry.
    Claim,
    /// Using: shared with the container's other processes.
    Use,
}

impl CardFile {
    /// Opens (creating it complete, mode 0666, if missing) the card file for `uuid` in `dir`, refusing anything
    /// but a regular file with one link and the card's size: see [`crate::mapped::open_shared_file`].
    pub fn open(dir: &Path, uuid: &str) -> io::Result<Self> {
        let mut empty = vec![0u8; FILE_BYTES];
        empty[..HEADER_BYTES].copy_from_slice(&header());
        let file = crate::mapped::open_shared_file(dir, &format!("{uuid}.card"), &empty)?;
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(Self {
            file,
            path: dir.join(format!("{uuid}.card")),
            id: (m.dev(), m.ino()),
        })
    }

    /// Whether the card's name still names the file opened (not removed, renamed over or replaced by a link).
    /// Slices that opened different files would not see each other.
    pub fn still_in_place(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }

    /// A copy of the file as it is now, or why it is no card file (truncated, replaced, damaged).
    pub fn read(&self) -> Result<Vec<Entry>, String> {
        let mut buf = vec![0u8; FILE_BYTES + 1];
        let mut got = 0;
        // One pread normally; a loop only for a short read, bounded by the buffer (one byte more than a card
        // so a file grown past it is seen).
        while got < buf.len() {
            match self.file.read_at(&mut buf[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("cannot read: {e}")),
            }
        }
        buf.truncate(got);
        parse(&buf)
    }

    /// Writes `e` at its own index: the one write a slice makes.
    pub fn write_entry(&self, e: &Entry) -> io::Result<()> {
        self.file.write_all_at(&e.to_bytes(), entry_offset(e.index))
    }

    /// Takes (or converts to) the lock of `hold` on entry `i` without waiting. False if another holds a
    /// conflicting lock.
    pub fn lock(&self, i: usize, hold: Hold) -> bool {
        let kind = match hold {
            Hold::Claim => libc::F_WRLCK,
            Hold::Use => libc::F_RDLCK,
        };
        self.fcntl_lock(i, kind, libc::F_OFD_SETLK).is_some()
    }

    pub fn unlock(&self, i: usize) {
        let _ = self.fcntl_lock(i, libc::F_UNLCK, libc::F_OFD_SETLK);
    }

    /// Whether any process other than this open file holds entry `i` (a live slice). An unlocked entry is
    /// dead whatever its words say.
    pub fn held_by_another(&self, i: usize) -> bool {
        self.fcntl_lock(i, libc::F_WRLCK, libc::F_OFD_GETLK)
            .is_some_and(|t| t != libc::F_UNLCK)
    }

    /// F_OFD_SETLK / F_OFD_GETLK on entry `i`'s bytes: Some(resulting l_type) on success.
    fn fcntl_lock(&self, i: usize, kind: libc::c_int, cmd: libc::c_int) -> Option<libc::c_int> {
        // SAFETY: an all-zero flock is valid (l_pid must be 0 for OFD locks); the fields used are set below.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = entry_offset(i) as libc::off_t;
        fl.l_len = ENTRY_BYTES as libc::off_t;
        // SAFETY: the fd is open for as long as self; fl is a valid flock the call may write.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), cmd, &mut fl) };
        (rc == 0).then_some(fl.l_type as libc::c_int)
    }

    /// The entry of container `key`: joins one a live process of the container holds, else claims a free one
    /// (none held by anyone) and writes `mine` there. None when every entry is held by someone else.
    pub fn join(&self, mine: Entry) -> Option<usize> {
        if let Some(i) = self.join_sibling(mine.key, ENTRIES) {
            return Some(i);
        }
        let claimed = (0..ENTRIES).find(|&i| {
            if !self.lock(i, Hold::Claim) {
                return false;
            }
            let e = Entry { index: i, ..mine };
            if self.write_entry(&e).is_ok() && self.lock(i, Hold::Use) {
                return true;
            }
            self.unlock(i);
            false
        })?;
        // Two processes of one container may claim two entries at once: the later entry yields to the earlier
        // (a sibling converting its claim to a shared hold may take a moment: a few tries).
        for _ in 0..5 {
            if let Some(i) = self.join_sibling(mine.key, claimed) {
                self.unlock(claimed);
                return Some(i);
            }
            if !self
                .read()
                .unwrap_or_default()
                .iter()
                .any(|e| e.key == mine.key && e.index < claimed)
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Some(claimed)
    }

    /// Shares an entry of container `key` below index `below` that a live process holds.
    fn join_sibling(&self, key: u64, below: usize) -> Option<usize> {
        let entries = self.read().unwrap_or_default();
        entries
            .iter()
            .filter(|e| e.key == key && e.index < below && self.held_by_another(e.index))
            .find_map(|e| {
                // The key is re-read under the lock: the entry may have been freed and reclaimed since the copy.
                if self.lock(e.index, Hold::Use) {
                    if self.key_at(e.index) == Some(key) {
                        return Some(e.index);
                    }
                    self.unlock(e.index);
                }
                None
            })
    }

    fn key_at(&self, i: usize) -> Option<u64> {
        let mut w = [0u8; 8];
        self.file.read_exact_at(&mut w, entry_offset(i)).ok()?;
        Some(u64::from_ne_bytes(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "vgpu-card-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn entry(key: u64, share: u32) -> Entry {
        Entry {
            key,
            share,
            policy: 1,
            last_active_ns: 5,
            period_ns: 50_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn entries_round_trip_through_bytes() {
        let e = Entry {
            index: 3,
            key: 7,
            share: 30,
            policy: 1,
            last_active_ns: 11,
            launches: 12,
            throttled_ns: 13,
            period_ns: 500_000_000,
        };
        assert_eq!(Entry::from_bytes(3, &e.to_bytes()), e);
    }

    #[test]
    fn a_copy_of_the_wrong_size_or_header_is_no_card() {
        let mut buf = vec![0u8; FILE_BYTES];
        buf[..HEADER_BYTES].copy_from_slice(&header());
        assert_eq!(parse(&buf), Ok(vec![]));
        assert!(parse(&buf[..100]).unwrap_err().contains("truncated"));
        assert!(parse(&[buf.clone(), vec![0]].concat()).is_err());
        buf[8] = 1;
        assert!(parse(&buf).unwrap_err().contains("version"));
    }

    /// Two open files stand for two processes: OFD locks conflict between open files, not within one.
    #[test]
    fn entries_are_claimed_by_lock_and_freed_when_their_holder_closes() {
        let d = dir();
        let a = CardFile::open(&d, "GPU-x").unwrap();
        let b = CardFile::open(&d, "GPU-x").unwrap();
        let ea = a.join(entry(11, 30)).unwrap();
        assert_eq!(b.read().unwrap()[0].share, 30, "shared through the file");
        assert!(b.held_by_another(ea));
        let eb = b.join(entry(22, 50)).unwrap();
        assert_ne!(ea, eb);
        // A process of container 11 opening its own file shares entry ea.
        let a2 = CardFile::open(&d, "GPU-x").unwrap();
        assert_eq!(a2.join(entry(11, 30)), Some(ea));
        drop(a);
        assert!(b.held_by_another(ea), "its sibling still holds it");
        drop(a2);
        assert!(!b.held_by_another(ea), "dead with its last holder");
        // Words left behind make no claim: a newcomer takes the entry.
        let c = CardFile::open(&d, "GPU-x").unwrap();
        assert_eq!(c.join(entry(33, 10)), Some(ea));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_full_table_refuses_a_newcomer() {
        let d = dir();
        let holders: Vec<CardFile> = (0..ENTRIES as u64)
            .map(|k| {
                let c = CardFile::open(&d, "GPU-y").unwrap();
                assert!(c.join(entry(100 + k, 1)).is_some());
                c
            })
            .collect();
        let late = CardFile::open(&d, "GPU-y").unwrap();
        assert_eq!(late.join(entry(999, 1)), None);
        drop(holders);
        assert!(late.join(entry(999, 1)).is_some());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_put_in_the_cards_place_is_noticed() {
        let d = dir();
        let c = CardFile::open(&d, "GPU-w").unwrap();
        assert!(c.still_in_place());
        std::fs::rename(d.join("GPU-w.card"), d.join("moved")).unwrap();
        std::fs::write(d.join("GPU-w.card"), b"x").unwrap();
        assert!(!c.still_in_place());
        std::fs::remove_file(d.join("GPU-w.card")).unwrap();
        assert!(!c.still_in_place(), "removed");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_truncated_file_reads_as_no_card() {
        let d = dir();
        let c = CardFile::open(&d, "GPU-z").unwrap();
        c.join(entry(1, 30)).unwrap();
        File::options()
            .write(true)
            .open(d.join("GPU-z.card"))
            .unwrap()
            .set_len(10)
            .unwrap();
        assert!(c.read().unwrap_err().contains("truncated"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
