//! Messages on stderr, in HAMi-core's shape (`[HAMI-core ERROR (pid:1 thread=...)]: ...`, which users grep
//! for) with our own prefix. Written with one write(2) so lines from several threads do not interleave and
//! no Rust stderr lock is taken inside a hooked call.

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
}

/// 0 = not read yet.
static THRESHOLD: AtomicU8 = AtomicU8::new(0);

fn threshold() -> u8 {
    let t = THRESHOLD.load(Relaxed);
    if t != 0 {
        return t;
    }
    let t = match std::env::var(vgpu_contract::env::LOG_LEVEL).as_deref() {
        Ok("off") => 0xff,
        Ok("info") => Level::Info as u8 + 1,
        Ok("error") => Level::Error as u8 + 1,
        _ => Level::Warn as u8 + 1,
    };
    THRESHOLD.store(t, Relaxed);
    t
}

pub fn log(level: Level, msg: &str) {
    let t = threshold();
    if t == 0xff || level as u8 >= t {
        return;
    }
    let name = match level {
        Level::Error => "ERROR",
        Level::Warn => "WARN",
        Level::Info => "INFO",
    };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let line = format!(
        "[vgpu {name} (pid:{} thread={tid})]: {msg}\n",
        std::process::id()
    );
    // SAFETY: writing a valid buffer of its own length to fd 2; a failed write is ignored on purpose (there
    // is nowhere else to report it, and the program must go on).
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

pub fn error(msg: &str) {
    log(Level::Error, msg)
}

pub fn warn(msg: &str) {
    log(Level::Warn, msg)
}

pub fn info(msg: &str) {
    log(Level::Info, msg)
}
