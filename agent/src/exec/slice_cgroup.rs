//! A cgroup of the slice's own, so the agent sees each exec slice as a container of its own (two slices
//! started from one shell are not summed) and can bind it to its cache file.
//!
//! Root makes `<cgroup2>/vgpu-exec/<id>`. Another user gets one only inside a subtree delegated to it (its
//! current cgroup's directory writable, as systemd gives a user session's `user@<uid>.service`); otherwise the
//! slice runs in the caller's cgroup and `exec` says so.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct SliceCgroup {
    /// The directory under the cgroup2 mount.
    pub dir: PathBuf,
    /// Its path relative to the mount, starting with `/` (what `/proc/PID/cgroup` shows).
    pub rel: String,
    procs: File,
}

/// The caller's own cgroup2 path, from `/proc/self/cgroup` (`0::/user.slice/...`).
fn own_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

impl SliceCgroup {
    /// Makes the slice's cgroup under `mount` (the cgroup2 mount), named `id`.
    pub fn create(mount: &Path, id: &str, root: bool) -> io::Result<Self> {
        let parent_rel = if root {
            "/vgpu-exec".to_string()
        } else {
            own_cgroup().ok_or_else(|| io::Error::other("no cgroup2 entry in /proc/self/cgroup"))?
        };
        let parent = mount.join(parent_rel.trim_start_matches('/'));
        if root {
            std::fs::create_dir_all(&parent)?;
        }
        let dir = parent.join(id);
        std::fs::create_dir(&dir)?;
        let procs = match File::options().write(true).open(dir.join("cgroup.procs")) {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
        };
        let rel = format!("{}/{id}", parent_rel.trim_end_matches('/'));
        Ok(Self { dir, rel, procs })
    }

    /// Moves the command's process into the cgroup between fork and exec, so nothing it runs is ever outside.
    pub fn enter_on_spawn(&self, cmd: &mut Command) {
        let fd = self.procs.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only calls write(2) on a descriptor
        // opened before the fork, with a static buffer: async-signal-safe, no allocation.
        unsafe {
            cmd.pre_exec(move || {
                // "0" is the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Ends whatever the command left in the cgroup and removes it.
    pub fn remove(self) {
        for _ in 0..50 {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Processes the command left behind (its children outlive it): the slice is over.
                    let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_runs_inside_its_own_cgroup() {
        // SAFETY: getuid(2) cannot fail.
        if unsafe { libc::getuid() } != 0 {
            eprintln!("skipped: needs root to make a cgroup");
            return;
        }
        let mount = crate::ledger::cgroups::cgroup2_mount();
        let id = format!("test-{}", std::process::id());
        let cg = match SliceCgroup::create(&mount, &id, true) {
            Ok(c) => c,
            Err(e) => panic!(
                "root could not make a cgroup under {}: {e}",
                mount.display()
            ),
        };
        assert_eq!(cg.rel, format!("/vgpu-exec/{id}"));
        let mut cmd = Command::new("cat");
        cmd.arg("/proc/self/cgroup");
        cg.enter_on_spawn(&mut cmd);
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let v2 = text.lines().find(|l| l.starts_with("0::")).unwrap_or("");
        assert_eq!(v2, format!("0::{}", cg.rel), "{text}");
        let dir = cg.dir.clone();
        cg.remove();
        assert!(!dir.exists());
    }
}
