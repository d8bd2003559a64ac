//! Pod and container cgroups in the kubelet's cgroupfs layout, `<root>/kubepods/besteffort/pod<uid>/<id>`,
//! which vgpu-agent's layout parser maps back to pod UID and container ID.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

/// `--cgroup-root`: a cgroup2 directory the harness owns.
#[derive(Debug, Clone)]
pub struct CgroupRoot(pub PathBuf);

impl CgroupRoot {
    pub fn pod_dir(&self, pod_uid: &str) -> PathBuf {
        self.0
            .join("kubepods")
            .join("besteffort")
            .join(format!("pod{pod_uid}"))
    }

    pub fn container_dir(&self, pod_uid: &str, container_id: &str) -> PathBuf {
        self.pod_dir(pod_uid).join(container_id)
    }

    /// Creates the container's cgroup (and the pod's above it).
    pub fn create(&self, pod_uid: &str, container_id: &str) -> anyhow::Result<PathBuf> {
        let dir = self.container_dir(pod_uid, container_id);
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "creating the cgroup {} (is --cgroup-root on a cgroup2 mount, and are we root?)",
                dir.display()
            )
        })?;
        Ok(dir)
    }
}

/// Pids in the cgroup (not in its children).
pub fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Sends `sig` to every process in the cgroup.
pub fn signal_all(dir: &Path, sig: i32) {
    for pid in procs(dir) {
        // SAFETY: kill(2) with a pid read from cgroup.procs; a pid that already exited gives ESRCH.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// SIGKILLs everything in the cgroup (and below), through `cgroup.kill` where the kernel has it.
pub fn kill_all(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        signal_all(dir, libc::SIGKILL);
    }
}

/// Kills what is left in the cgroup, waits for it to empty and removes it.
pub async fn remove(dir: &Path) {
    if !dir.exists() {
        return;
    }
    kill_all(dir);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                if tokio::time::Instant::now() > deadline {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "cgroup not removed: processes remain in it");
                    return;
                }
                kill_all(dir);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Removes a pod's cgroup with its containers' cgroups under it.
pub async fn remove_pod(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove(&e.path()).await;
            }
        }
    }
    remove(dir).await;
}
