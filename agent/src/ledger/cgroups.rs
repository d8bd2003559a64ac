//! cgroup ids (what the uprobes report) to cgroup paths, and cgroup paths to containers.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Who a cgroup belongs to, as far as its path tells.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ContainerRef {
    pub cgroup: String,
    /// Pod UID with dashes, when the path is a kubelet pod's.
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
    /// "containerd", "cri-o", "docker", or None.
    pub runtime: Option<&'static str>,
}

/// Parses the kubelet's systemd and cgroupfs layouts with containerd, CRI-O and docker scopes.
pub fn container_of(cgroup: &str) -> ContainerRef {
    let mut r = ContainerRef {
        cgroup: cgroup.to_string(),
        ..Default::default()
    };
    for part in cgroup.split('/') {
        // systemd: kubepods-burstable-pod1234_5678.slice; cgroupfs: pod1234-5678
        let pod = part
            .strip_suffix(".slice")
            .and_then(|s| s.rsplit('-').next())
            .and_then(|s| s.strip_prefix("pod"))
            .map(|s| s.replace('_', "-"))
            .or_else(|| {
                part.strip_prefix("pod")
                    .filter(|s| s.len() >= 32)
                    .map(str::to_string)
            });
        if let Some(uid) = pod.filter(|u| u.len() >= 32 && cgroup.contains("kubepods")) {
            r.pod_uid = Some(uid);
            continue;
        }
        let scoped = [
            ("cri-containerd-", "containerd"),
            ("crio-", "cri-o"),
            ("docker-", "docker"),
        ]
        .iter()
        .find_map(|(p, rt)| Some((part.strip_prefix(p)?.strip_suffix(".scope")?, *rt)));
        if let Some((id, rt)) = scoped {
            r.container_id = Some(id.to_string());
            r.runtime = Some(rt);
        } else if r.pod_uid.is_some()
            && part.len() == 64
            && part.bytes().all(|b| b.is_ascii_hexdigit())
        {
            // cgroupfs layout: the container id is the bare directory name under the pod.
            r.container_id = Some(part.to_string());
        }
    }
    r
}

/// Where cgroup2 is mounted: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one.
pub fn cgroup2_mount() -> PathBuf {
    std::fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.split(' ').nth(2) == Some("cgroup2"))
                .and_then(|l| l.split(' ').nth(1))
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// Resolves cgroup ids to paths: the id is the inode of the cgroup's directory in cgroup2fs.
pub struct CgroupIds {
    root: PathBuf,
    known: HashMap<u64, String>,
}

impl CgroupIds {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            known: HashMap::new(),
        }
    }

    /// The path of cgroup `id`; `hint` is a cgroup path that probably is it (from /proc/PID/cgroup),
    /// checked before falling back to a walk of the hierarchy.
    pub fn path(&mut self, id: u64, hint: Option<&str>) -> Option<String> {
        if let Some(p) = self.known.get(&id) {
            return Some(p.clone());
        }
        if let Some(h) = hint {
            if self.inode(h) == Some(id) {
                self.known.insert(id, h.to_string());
                return Some(h.to_string());
            }
        }
        self.walk(Path::new(""), 0);
        self.known.get(&id).cloned()
    }

    fn inode(&self, rel: &str) -> Option<u64> {
        std::fs::metadata(self.root.join(rel.trim_start_matches('/')))
            .ok()
            .map(|m| m.ino())
    }

    fn walk(&mut self, rel: &Path, depth: usize) {
        let dir = self.root.join(rel);
        if let Ok(m) = std::fs::metadata(&dir) {
            self.known.insert(m.ino(), format!("/{}", rel.display()));
        }
        // Kubelet hierarchies are about 4 levels deep; stop well before pathological trees.
        if depth > 8 {
            return;
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                self.walk(&rel.join(e.file_name()), depth + 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5d0b2f5a-6f6e-4b6a-9c3e-0a1b2c3d4e5f";
    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn kubelet_layouts() {
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        );
        let r = container_of(&systemd);
        assert_eq!(r.pod_uid.as_deref(), Some(UID));
        assert_eq!(r.container_id.as_deref(), Some(CID));
        assert_eq!(r.runtime, Some("containerd"));

        let crio = format!(
            "/kubepods.slice/kubepods-pod{}.slice/crio-{CID}.scope",
            UID.replace('-', "_")
        );
        assert_eq!(container_of(&crio).runtime, Some("cri-o"));
        assert_eq!(container_of(&crio).pod_uid.as_deref(), Some(UID));

        let cgroupfs = format!("/kubepods/besteffort/pod{UID}/{CID}");
        let r = container_of(&cgroupfs);
        assert_eq!(
            (r.pod_uid.as_deref(), r.container_id.as_deref()),
            (Some(UID), Some(CID))
        );
    }

    #[test]
    fn bare_paths_stay_bare() {
        let r = container_of("/vgpu-test/slice-a");
        assert_eq!(
            r,
            ContainerRef {
                cgroup: "/vgpu-test/slice-a".into(),
                ..Default::default()
            }
        );
        assert_eq!(
            container_of("/user.slice/user-0.slice/session-1.scope").pod_uid,
            None
        );
    }

    #[test]
    fn ids_resolve_to_paths() {
        let d = std::env::temp_dir().join(format!("vgpu-cg-{}", std::process::id()));
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        let ino = std::fs::metadata(d.join("a/b")).unwrap().ino();
        let mut ids = CgroupIds::new(&d);
        assert_eq!(ids.path(ino, Some("/a/wrong")).as_deref(), Some("/a/b"));
        assert_eq!(ids.path(ino, None).as_deref(), Some("/a/b"));
        assert_eq!(ids.path(u64::MAX, None), None);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
