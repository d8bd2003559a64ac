//! The file mechanics the shared layouts (`cache_layout`, `card_layout`) have in common: a file that appears
//! complete or not at all, a shared mapping of it, and ([`open_shared_file`]) a file opened for `pread`/`pwrite`
//! in a directory every tenant can write, where anything at the name may be hostile.

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

/// Opens `dir/name` read-write for `pread`/`pwrite`, in a directory other tenants can write (the card
/// directory): whatever sits at the name may be hostile. Creates the directory (mode 1777, set explicitly: the
/// umask would take the bits every tenant needs) and the file (complete with `contents`, mode 0666 set with
/// fchmod) when missing, without ever opening a path another process could have planted: the file is made
/// unnamed (`O_TMPFILE`) or under a random name with `O_EXCL|O_NOFOLLOW`, and linked into place (losing that race
/// to another creator is fine: its file is as complete as ours). What is opened must be a regular file with one
/// link and exactly `contents.len()` bytes: a symlink (`O_NOFOLLOW`), FIFO (`O_NONBLOCK`, so the open never
/// waits for a writer), directory, device, hard link to another file or truncated file is refused with an
/// error that says which.
pub fn open_shared_file(dir: &Path, name: &str, contents: &[u8]) -> io::Result<File> {
    use std::os::fd::{FromRawFd, OwnedFd};
    if !dir.exists() {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::create_dir(dir) {
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777))?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    let cdir = cstring(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: cdir is NUL-terminated; the result is checked before use.
    let dfd = unsafe {
        libc::open(
            cdir.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: dfd was just opened and is owned here alone.
    let dir_fd = unsafe { OwnedFd::from_raw_fd(dfd) };
    let cname = cstring(name.as_bytes())?;
    let what = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}/{name}: {why}", dir.display()),
        )
    };
    for _ in 0..3 {
        // SAFETY: dir_fd is open, cname NUL-terminated.
        let fd = unsafe {
            libc::openat(
                dir_fd.as_raw_fd(),
                cname.as_ptr(),
                libc::O_RDWR | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOENT) => {
                    create_in(&dir_fd, &cname, name, contents)?;
                    continue;
                }
                Some(libc::ELOOP) => return Err(what("is a symbolic link; not followed".into())),
                Some(libc::EISDIR) => return Err(what("is a directory, not a card file".into())),
                _ => return Err(what(e.to_string())),
            }
        }
        // SAFETY: fd was just opened and is owned here alone.
        let file = unsafe { File::from_raw_fd(fd) };
        let m = file.metadata()?;
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let ft = m.file_type();
        let kind = if ft.is_file() {
            None
        } else if ft.is_fifo() {
            Some("a FIFO")
        } else if ft.is_socket() {
            Some("a socket")
        } else if ft.is_char_device() || ft.is_block_device() {
            Some("a device")
        } else {
            Some("not a regular file")
        };
        if let Some(k) = kind {
            return Err(what(format!("is {k}, not a regular file")));
        }
        if m.nlink() != 1 {
            return Err(what(format!(
                "has {} links (a hard link to another file?)",
                m.nlink()
            )));
        }
        if m.len() != contents.len() as u64 {
            return Err(what(format!(
                "is {} bytes where {} are expected (truncated or replaced)",
                m.len(),
                contents.len()
            )));
        }
        return Ok(file);
    }
    Err(what("keeps disappearing while being opened".into()))
}

fn cstring(b: &[u8]) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(b)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

/// Creates `name` in the directory `dir_fd`, complete with `contents` and mode 0666, never through a path
/// another process could have planted. An existing file at the name is left alone (Ok).
fn create_in(
    dir_fd: &std::os::fd::OwnedFd,
    cname: &std::ffi::CStr,
    name: &str,
    contents: &[u8],
) -> io::Result<()> {
    use std::os::fd::FromRawFd;
    let d = dir_fd.as_raw_fd();
    // SAFETY: d is an open directory; "." names it.
    let fd = unsafe {
        libc::openat(
            d,
            c".".as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o600,
        )
    };
    let (file, tmp_name) = if fd >= 0 {
        // SAFETY: fd was just opened and is owned here alone.
        (unsafe { File::from_raw_fd(fd) }, None)
    } else {
        // No O_TMPFILE on this file system: a random name no one could have guessed, created exclusively.
        let mut r = [0u8; 16];
        // SAFETY: r is a writable buffer of its length.
        if unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) } != r.len() as isize {
            return Err(io::Error::last_os_error());
        }
        let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = cstring(format!(".{name}.{hex}.tmp").as_bytes())?;
        // SAFETY: d is open, tmp NUL-terminated.
        let fd = unsafe {
            libc::openat(
                d,
                tmp.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_RDWR | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        (unsafe { File::from_raw_fd(fd) }, Some(tmp))
    };
    let written = (|| {
        (&file).write_all(contents)?;
        // SAFETY: file is open. Explicit, so the umask cannot take the bits other tenants' uids need.
        if unsafe { libc::fchmod(file.as_raw_fd(), 0o666) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let rc = match &tmp_name {
            Some(tmp) => {
                // SAFETY: d is open; both names NUL-terminated; flags 0 never follow a link.
                unsafe { libc::linkat(d, tmp.as_ptr(), d, cname.as_ptr(), 0) }
            }
            None => {
                // SAFETY: as above; AT_EMPTY_PATH links the open file itself (needs CAP_DAC_READ_SEARCH).
                let rc = unsafe {
                    libc::linkat(
                        file.as_raw_fd(),
                        c"".as_ptr(),
                        d,
                        cname.as_ptr(),
                        libc::AT_EMPTY_PATH,
                    )
                };
                if rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
                    // Without the capability: through /proc, which names this very open file.
                    let proc = cstring(format!("/proc/self/fd/{}", file.as_raw_fd()).as_bytes())?;
                    // SAFETY: proc and cname are NUL-terminated; d is open.
                    unsafe {
                        libc::linkat(
                            libc::AT_FDCWD,
                            proc.as_ptr(),
                            d,
                            cname.as_ptr(),
                            libc::AT_SYMLINK_FOLLOW,
                        )
                    }
                } else {
                    rc
                }
            }
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })();
    if let Some(tmp) = &tmp_name {
        // SAFETY: d is open, tmp NUL-terminated; unlinkat removes the name only, never follows.
        unsafe { libc::unlinkat(d, tmp.as_ptr(), 0) };
    }
    match written {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vgpu-mapped-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn creates_the_directory_sticky_and_the_file_complete_and_shared() {
        let d = dir("create");
        // SAFETY: umask only changes this process's file-creation mask; restored below.
        let old = unsafe { libc::umask(0o077) };
        let f = open_shared_file(&d, "x.card", b"0123456789");
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let f = f.unwrap();
        assert_eq!(f.metadata().unwrap().len(), 10);
        let m = std::fs::metadata(d.join("x.card")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o666, "not the umask's");
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o7777,
            0o1777
        );
        assert_eq!(std::fs::read(d.join("x.card")).unwrap(), b"0123456789");
        // No temporary left behind, and a second open finds the same file.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        let g = open_shared_file(&d, "x.card", b"0123456789").unwrap();
        assert_eq!(g.metadata().unwrap().ino(), m.ino());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_what_is_not_a_whole_regular_file() {
        let d = dir("hostile");
        std::fs::create_dir_all(&d).unwrap();
        let victim = d.join("victim");
        std::fs::write(&victim, b"0123456789").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("link")).unwrap();
        std::fs::hard_link(&victim, d.join("hard")).unwrap();
        std::fs::create_dir(d.join("dir")).unwrap();
        std::fs::write(d.join("short"), b"01").unwrap();
        let fifo = std::ffi::CString::new(d.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: fifo is a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
        for (name, says) in [
            ("link", "symbolic link"),
            ("hard", "links"),
            ("dir", "directory"),
            ("short", "truncated"),
            ("fifo", "FIFO"),
        ] {
            let e = open_shared_file(&d, name, b"0123456789").unwrap_err();
            assert!(e.to_string().contains(says), "{name}: {e}");
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"0123456789");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
