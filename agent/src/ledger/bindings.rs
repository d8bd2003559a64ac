//! Which cgroup is which container, with which cache file and limits: the only source of the limits the agent
//! enforces. A binding comes from the node side (Allocate, once the kubelet's record confirms the container) or
//! from `vgpu-agent exec` over the bind socket, never from a file a tenant can write: the `cgroup` file beside
//! a cache and the cache header's limits are at most shown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vgpu_contract::agent_socket::ExecBinding;

/// Who asked for a binding. Root (the node side, or root running exec) may replace any binding; another user
/// only the bindings it made itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Allocate, confirmed against the kubelet's record.
    Allocate,
    /// `vgpu-agent exec`, as the bind socket's peer credentials named it.
    Exec { uid: u32, pid: u32 },
}

impl Source {
    /// The uid that owns the binding (0 for the node side).
    pub fn uid(&self) -> u32 {
        match self {
            Source::Allocate => 0,
            Source::Exec { uid, .. } => *uid,
        }
    }
}

/// The Kubernetes names of a container, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub container: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// cgroup2 path relative to the cgroup2 mount, starting with `/`.
    pub cgroup: String,
    /// The container's cache file, as a host path.
    pub cache_path: PathBuf,
    /// Memory limit in bytes per CUDA ordinal; an ordinal absent (or 0) has none.
    pub memory_limits: BTreeMap<u32, u64>,
    /// Compute share in percent (0: none).
    pub sm_limit: u32,
    /// `default`, `force` or `disable`.
    pub policy: String,
    pub source: Source,
    pub pod: Option<PodRef>,
}

impl Binding {
    /// What the eBPF view (all devices together) is held to: the sum of the per-device limits, None when no
    /// device has one. Exact for a one-GPU container; see docs/agent.md.
    pub fn memory_limit(&self) -> Option<u64> {
        let limits = self.memory_limits.values().filter(|l| **l > 0);
        let sum = limits.fold(0u64, |a, l| a.saturating_add(*l));
        (sum > 0).then_some(sum)
    }

    /// A binding from an exec request, owned by the peer that sent it.
    pub fn from_exec(req: &ExecBinding, peer_uid: u32) -> Self {
        Self {
            cgroup: req.cgroup.clone(),
            cache_path: PathBuf::from(&req.cache),
            memory_limits: req.memory_limits.clone(),
            sm_limit: req.sm_limit,
            policy: req.policy.clone(),
            source: Source::Exec {
                uid: peer_uid,
                pid: req.pid,
            },
            pod: None,
        }
    }

    /// Checks the paths' shape (no `..`, absolute), so a binding can name only what it says.
    pub fn validate(&self) -> Result<(), String> {
        check_cgroup_path(&self.cgroup)?;
        if !plain(&self.cache_path) {
            return Err(format!(
                "cache path {} must be absolute, without `.`, `..` or empty parts",
                self.cache_path.display()
            ));
        }
        if self.sm_limit > 100 {
            return Err(format!("sm_limit {} is over 100 percent", self.sm_limit));
        }
        if !matches!(self.policy.as_str(), "" | "default" | "force" | "disable") {
            return Err(format!(
                "policy {:?}: expected default, force or disable",
                self.policy
            ));
        }
        Ok(())
    }
}

/// Absolute, with no empty, `.` or `..` component and no NUL: the path names what it spells. (Checked on the
/// bytes: `Path::components` quietly drops inner `.` and repeated slashes.)
fn plain(p: &Path) -> bool {
    let b = p.as_os_str().as_encoded_bytes();
    b.len() <= 4096
        && b.first() == Some(&b'/')
        && !b.contains(&0)
        && b[1..]
            .split(|c| *c == b'/')
            .all(|seg| !matches!(seg, b"" | b"." | b".."))
}

pub fn check_cgroup_path(cgroup: &str) -> Result<(), String> {
    if cgroup != "/" && !plain(Path::new(cgroup)) {
        return Err(format!(
            "cgroup {cgroup:?} must start with `/` (relative to the cgroup2 mount), without `.`, `..` or empty parts"
        ));
    }
    Ok(())
}

/// One binding and how many `exec` runs share it (a cache file given to several commands makes them one
/// container; the binding goes with the last of them).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    binding: Binding,
    refs: u32,
}

/// Every binding by cgroup; saved with the agent's state, so a restart keeps them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Bindings {
    by_cgroup: BTreeMap<String, Entry>,
}

impl Bindings {
    /// Binds (or rebinds) a container. A binding owned by another uid is replaced only by root; binding the
    /// same cgroup again counts one more user of it.
    pub fn bind(&mut self, b: Binding) -> Result<(), String> {
        b.validate()?;
        let uid = b.source.uid();
        if let Some(e) = self.by_cgroup.get_mut(&b.cgroup) {
            let owner = e.binding.source.uid();
            if uid != 0 && owner != uid {
                return Err(format!(
                    "cgroup {} is bound by uid {owner}; only that user or root may rebind it",
                    b.cgroup
                ));
            }
            e.refs = if e.binding.source == Source::Allocate || b.source == Source::Allocate {
                1
            } else {
                e.refs.saturating_add(1)
            };
            e.binding = b;
            return Ok(());
        }
        self.by_cgroup.insert(
            b.cgroup.clone(),
            Entry {
                binding: b,
                refs: 1,
            },
        );
        Ok(())
    }

    /// Drops one user of the binding of `cgroup` (`uid` must own it, or be root); returns the binding when it
    /// is gone for good.
    pub fn unbind(&mut self, cgroup: &str, uid: u32) -> Result<Option<Binding>, String> {
        let Some(e) = self.by_cgroup.get_mut(cgroup) else {
            return Err(format!("cgroup {cgroup} is not bound"));
        };
        let owner = e.binding.source.uid();
        if uid != 0 && owner != uid {
            return Err(format!(
                "cgroup {cgroup} is bound by uid {owner}; only that user or root may unbind it"
            ));
        }
        e.refs = e.refs.saturating_sub(1);
        if e.refs > 0 {
            return Ok(None);
        }
        Ok(self.by_cgroup.remove(cgroup).map(|e| e.binding))
    }

    pub fn get(&self, cgroup: &str) -> Option<&Binding> {
        self.by_cgroup.get(cgroup).map(|e| &e.binding)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Binding> {
        self.by_cgroup.values().map(|e| &e.binding)
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.by_cgroup.is_empty()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_cgroup.len()
    }

    /// Forgets exec bindings whose cgroup directory is gone (an exec that died before it could unbind).
    /// Node-side bindings are the node side's to remove.
    pub fn drop_vanished(&mut self, cgroup_root: &Path) -> Vec<String> {
        let gone: Vec<String> = self
            .by_cgroup
            .values()
            .filter(|e| matches!(e.binding.source, Source::Exec { .. }))
            .filter(|e| {
                let dir = cgroup_root.join(e.binding.cgroup.trim_start_matches('/'));
                matches!(std::fs::symlink_metadata(dir), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
            })
            .map(|e| e.binding.cgroup.clone())
            .collect();
        for c in &gone {
            self.by_cgroup.remove(c);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(cgroup: &str, source: Source) -> Binding {
        Binding {
            cgroup: cgroup.into(),
            cache_path: "/run/vgpu/x.cache".into(),
            memory_limits: [(0, 1 << 30), (1, 0)].into(),
            sm_limit: 30,
            policy: "force".into(),
            source,
            pod: None,
        }
    }

    const ALICE: Source = Source::Exec { uid: 1000, pid: 7 };
    const BOB: Source = Source::Exec { uid: 1001, pid: 8 };

    #[test]
    fn only_the_owner_or_root_rebinds_or_unbinds() {
        let mut s = Bindings::default();
        s.bind(b("/a", ALICE)).unwrap();
        let e = s.bind(b("/a", BOB)).unwrap_err();
        assert!(e.contains("bound by uid 1000"), "{e}");
        assert_eq!(s.get("/a").unwrap().source, ALICE, "kept");
        assert!(s.unbind("/a", 1001).is_err());
        assert_eq!(s.len(), 1);
        s.bind(b("/a", Source::Allocate)).unwrap();
        assert!(s.bind(b("/a", ALICE)).is_err(), "a node binding is root's");
        assert_eq!(s.unbind("/a", 0).unwrap().unwrap().source, Source::Allocate);
        assert!(s.get("/a").is_none());
    }

    #[test]
    fn an_exec_binding_shared_by_two_runs_goes_with_the_last() {
        let mut s = Bindings::default();
        s.bind(b("/a", ALICE)).unwrap();
        s.bind(b("/a", ALICE)).unwrap();
        assert_eq!(s.unbind("/a", 1000).unwrap(), None);
        assert!(s.get("/a").is_some());
        assert!(s.unbind("/a", 1000).unwrap().is_some());
        assert!(s.unbind("/a", 1000).is_err(), "nothing left to unbind");
    }

    #[test]
    fn paths_that_could_name_something_else_are_refused() {
        let mut s = Bindings::default();
        for bad in ["a", "/a/../b", "/a/./b", "", "/a//b", "/a/"] {
            assert!(s.bind(b(bad, ALICE)).is_err(), "{bad:?}");
        }
        let mut x = b("/a", ALICE);
        x.cache_path = "/run/vgpu/../etc/x.cache".into();
        assert!(s.bind(x).is_err());
        let mut x = b("/a", ALICE);
        x.cache_path = "rel.cache".into();
        assert!(s.bind(x).is_err());
        let mut x = b("/a", ALICE);
        x.sm_limit = 101;
        assert!(s.bind(x).is_err());
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn the_limit_is_the_sum_of_the_limited_devices() {
        assert_eq!(b("/a", ALICE).memory_limit(), Some(1 << 30));
        let mut x = b("/a", ALICE);
        x.memory_limits = [(0, u64::MAX), (1, 5)].into();
        assert_eq!(x.memory_limit(), Some(u64::MAX), "saturates, never wraps");
        x.memory_limits.clear();
        assert_eq!(x.memory_limit(), None);
    }

    #[test]
    fn bindings_survive_a_save() {
        let mut s = Bindings::default();
        s.bind(b("/a", ALICE)).unwrap();
        s.bind(b("/a", ALICE)).unwrap();
        let back: Bindings = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back.get("/a"), s.get("/a"));
        let mut back = back;
        assert_eq!(
            back.unbind("/a", 1000).unwrap(),
            None,
            "the count is kept too"
        );
    }
}
