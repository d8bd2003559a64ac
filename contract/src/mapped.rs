//! The file mechanics the shared layouts (`cache_layout`, `card_layout`) have in common: a file that appears
//! complete or not at all, and a shared mapping of it.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Creates `path` with `contents` unless it exists. The bytes go to a temporary file first, then a hard link
/// puts it in place: a reader never sees a half-written file, and a process killed half-way leaves only its
/// temporary behind. Losing the race to another creator is success (its file is as complete as ours).
pub fn create_complete(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o666)
        .open(&tmp)
        .and_then(|mut f| f.write_all(contents))
        .and_then(|_| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match written {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Maps the first `len` bytes of `file` shared, read-write. The caller has checked that the file is at least
/// `len` long: touching a mapping past the end of its file raises SIGBUS.
pub fn map_shared(file: &File, len: usize) -> io::Result<*mut libc::c_void> {
    // SAFETY: a regular file we hold open, mapped shared; the mapping stays valid after the fd closes.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(ptr)
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock every container on a host shares (and bpf_ktime_get_ns's).
/// Read through the vDSO: no syscall.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
