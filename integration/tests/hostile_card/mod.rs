//! What a hostile tenant does to the card directory, for the pacing tests: it writes whatever it likes into the
//! card file (every tenant can), holds entries as a live slice would, plants links, FIFOs and directories at the
//! names a slice uses, and truncates files.
//!
//! Entry words are written at the byte offsets every layout version has kept (key 0, share | policy << 32 at 8,
//! last activity at 16); the requested period sits at 40 in version 2 (the debt word in version 1), and header
//! word 3 held the card's period in version 1. Writing both lets one test show the attack on either layout.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vgpu_contract::card_layout::{ENTRIES, FILE_BYTES, MAGIC, VERSION};

/// The card file name of simulated device `dev` (the simulated libcuda's UUIDs).
pub fn card_name(dev: u8) -> String {
    format!("GPU-5a1c0000-0000-4000-8000-0000000000{dev:02x}.card")
}

pub const FORCE: u64 = 1;
pub const MS: u64 = 1_000_000;

pub fn monotonic_ns() -> u64 {
    vgpu_contract::mapped::monotonic_ns()
}

fn entry_at(i: usize) -> u64 {
    64 + 64 * i as u64
}

/// A slice entry as a tenant forges it.
#[derive(Clone, Copy)]
pub struct Fake {
    pub key: u64,
    pub share: u64,
    pub policy: u64,
    pub active_ns: u64,
    pub period_ns: u64,
}

impl Fake {
    fn bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        let words = [
            self.key,
            self.share | self.policy << 32,
            self.active_ns,
            0,
            0,
            self.period_ns,
        ];
        for (i, w) in words.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
        }
        b
    }
}

fn open_rw(path: &Path) -> File {
    File::options()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// An OFD write lock on entry `i`: what a live slice holds on its entry. False if someone else holds it.
pub fn lock_entry(f: &File, i: usize) -> bool {
    // SAFETY: a zeroed flock is a valid value; every field used is set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = entry_at(i) as libc::off_t;
    fl.l_len = 64;
    // SAFETY: f is an open file and fl a valid flock.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) == 0 }
}

/// Key of entry `i` as the file says now.
pub fn entry_key(card: &Path, i: usize) -> u64 {
    let mut w = [0u8; 8];
    File::open(card)
        .unwrap()
        .read_at(&mut w, entry_at(i))
        .unwrap();
    u64::from_ne_bytes(w)
}

/// Writes `fake` into every entry that holds no slice now (key 0), holding each as a live slice would, and keeps
/// their activity fresh (when `fresh`) until dropped: a tenant running a process that fills the card's table.
pub struct Squatter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub taken: usize,
}

impl Squatter {
    pub fn fill(card: &Path, fake: Fake, fresh: bool, max: usize) -> Squatter {
        let f = open_rw(card);
        let mut mine = Vec::new();
        for i in 0..ENTRIES {
            if mine.len() == max {
                break;
            }
            if entry_key(card, i) == 0 && lock_entry(&f, i) {
                let fk = Fake {
                    key: fake.key + i as u64,
                    ..fake
                };
                f.write_at(&fk.bytes(), entry_at(i)).unwrap();
                mine.push(i);
            }
        }
        let taken = mine.len();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if fresh {
                    for &i in &mine {
                        let t = monotonic_ns().to_ne_bytes();
                        let _ = f.write_at(&t, entry_at(i) + 16);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(f);
        });
        Squatter {
            stop,
            thread: Some(thread),
            taken,
        }
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Rewrites `bytes` at `offset` of `card` every 2 ms until dropped (a tenant fighting the owner's own writes).
pub struct Scribbler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scribbler {
    pub fn start(card: PathBuf, writes: Vec<(u64, Vec<u8>)>) -> Scribbler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let f = open_rw(&card);
            while !s.load(Ordering::Relaxed) {
                for (off, b) in &writes {
                    let _ = f.write_at(b, *off);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Scribbler {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Scribbler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Offset of word `w` of entry `i`.
pub fn entry_word(i: usize, w: usize) -> u64 {
    entry_at(i) + 8 * w as u64
}

/// A complete, valid-looking card file (this build's magic and version, empty table) at `path`.
pub fn write_blank_card(path: &Path) {
    let mut b = vec![0u8; FILE_BYTES];
    b[0..8].copy_from_slice(&MAGIC.to_ne_bytes());
    b[8..16].copy_from_slice(&VERSION.to_ne_bytes());
    b[16..24].copy_from_slice(&(ENTRIES as u64).to_ne_bytes());
    std::fs::write(path, b).unwrap();
}

/// What a tenant plants at the temporary name a slice of a given pid would create its card file through.
pub enum Plant {
    Fifo,
    SymlinkTo(PathBuf),
}

/// Plants `what` at `dir/.<card name>.<pid>.tmp` in the child between fork and exec, so the name derived from
/// the child's own pid is taken before its first instruction. Paths are prepared here: the child only formats
/// its pid into a stack buffer and makes one system call (no allocation after fork).
pub fn plant_at_temporary(cmd: &mut std::process::Command, dir: &Path, what: Plant) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let prefix = format!("{}/.{}.", dir.display(), card_name(0)).into_bytes();
    let target = match &what {
        Plant::Fifo => None,
        Plant::SymlinkTo(t) => Some(std::ffi::CString::new(t.as_os_str().as_bytes()).unwrap()),
    };
    assert!(prefix.len() < 4000);
    // SAFETY: the closure formats into a stack buffer and calls mkfifo or symlink: async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let mut buf = [0u8; 4096];
            buf[..prefix.len()].copy_from_slice(&prefix);
            let mut n = prefix.len();
            let pid = libc::getpid() as u32;
            let mut digits = [0u8; 10];
            let mut d = 0;
            let mut v = pid;
            loop {
                digits[d] = b'0' + (v % 10) as u8;
                d += 1;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            for i in (0..d).rev() {
                buf[n] = digits[i];
                n += 1;
            }
            buf[n..n + 4].copy_from_slice(b".tmp");
            let path = buf.as_ptr() as *const libc::c_char;
            let rc = match &target {
                None => libc::mkfifo(path, 0o666),
                Some(t) => libc::symlink(t.as_ptr(), path),
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A uid and gid no account on the test machine uses: with RLIMIT_NPROC at 1, its only task is the child.
const LONE_ID: u32 = 3_999_999;

/// Runs the child as [`LONE_ID`] with at most one process of that user: it can start no thread.
pub fn without_threads(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit, setgroups, setgid and setuid are async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(|| {
            let one = libc::rlimit {
                rlim_cur: 1,
                rlim_max: 1,
            };
            if libc::setrlimit(libc::RLIMIT_NPROC, &one) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(LONE_ID) != 0
                || libc::setuid(LONE_ID) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
