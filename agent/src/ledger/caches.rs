//! The agent's mirror of the shared-cache files: every `*.cache` under the cache directory, mapped read-write
//! (the agent reclaims dead processes' slots), each bound to the cgroup of the container that uses it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use vgpu_contract::cache_layout::{CacheRegion, HeaderInfo, SlotView};

use crate::ebpf::procs::ProcTable;

/// A slot with its pid translated to the host's.
#[derive(Debug, Clone)]
pub struct Slot {
    pub view: SlotView,
    pub host_pid: Option<u32>,
    pub charged: u64,
}

pub struct CacheFile {
    pub path: PathBuf,
    region: CacheRegion,
    /// The header as first seen: the limits the agent holds the container to, even if the file is rewritten.
    pub first_header: HeaderInfo,
    pub header_now: HeaderInfo,
    /// From a kubelet directory name `<podUID>_<container>`.
    pub pod_uid: Option<String>,
    pub container_name: Option<String>,
    /// The container's cgroup: from a `cgroup` file beside the cache, or learned from a live slot's process.
    pub cgroup: Option<String>,
    pub slots: Vec<Slot>,
    pub reclaimed_bytes: u64,
}

impl CacheFile {
    /// The container's memory limit in bytes over the devices it holds memory on; with nothing charged yet,
    /// one device's limit. A limit set for every ordinal (`CUDA_DEVICE_MEMORY_LIMIT`) must not count once per
    /// ordinal: a one-GPU container would get sixteen slices. 0 = none.
    pub fn limit(&self) -> u64 {
        let limits = &self.first_header.memory_limits;
        let held: u64 = (0..limits.len())
            .filter(|&d| self.slots.iter().any(|s| s.view.used[d] > 0))
            .map(|d| limits[d])
            .sum();
        if held > 0 {
            held
        } else {
            limits.iter().copied().max().unwrap_or(0)
        }
    }

    pub fn header_tampered(&self) -> bool {
        self.header_now != self.first_header
    }
}

/// `<podUID>_<container>` (HAMi's and our host directory naming) into its parts.
pub fn parse_pod_dir(name: &str) -> Option<(String, String)> {
    let (uid, ctr) = name.split_once('_')?;
    (uid.len() == 36 && uid.bytes().filter(|b| *b == b'-').count() == 4 && !ctr.is_empty())
        .then(|| (uid.to_string(), ctr.to_string()))
}

fn find_caches(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() && depth < 4 {
            find_caches(&p, depth + 1, out);
        } else if t.is_file() && p.extension().is_some_and(|x| x == "cache") {
            out.push(p);
        }
    }
}

#[derive(Default)]
pub struct Mirror {
    pub dir: PathBuf,
    pub files: BTreeMap<PathBuf, CacheFile>,
    /// Files that could not be opened, with why (not a vgpu cache, another layout version, ...).
    pub errors: BTreeMap<PathBuf, String>,
}

impl Mirror {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            ..Default::default()
        }
    }

    /// Picks up new cache files and forgets removed ones.
    pub fn rescan(&mut self) {
        let mut found = vec![];
        find_caches(&self.dir, 0, &mut found);
        self.files.retain(|p, _| found.contains(p));
        self.errors.retain(|p, _| found.contains(p));
        for p in found {
            if self.files.contains_key(&p) {
                continue;
            }
            match CacheRegion::open_existing(&p) {
                Ok(region) => {
                    let header = region.header();
                    let dir_name = p
                        .parent()
                        .and_then(|d| d.file_name())
                        .and_then(|n| n.to_str())
                        .unwrap_or("");
                    let (pod_uid, container_name) = parse_pod_dir(dir_name).unzip();
                    let cgroup = p
                        .parent()
                        .and_then(|d| std::fs::read_to_string(d.join("cgroup")).ok())
                        .map(|s| s.trim().to_string())
                        .filter(|s| s.starts_with('/'));
                    tracing::info!(
                        "mirroring {} (limits {})",
                        p.display(),
                        crate::ledger::state::limits_text(&header.memory_limits)
                    );
                    self.errors.remove(&p);
                    self.files.insert(
                        p.clone(),
                        CacheFile {
                            path: p,
                            region,
                            first_header: header.clone(),
                            header_now: header,
                            pod_uid,
                            container_name,
                            cgroup,
                            slots: vec![],
                            reclaimed_bytes: 0,
                        },
                    );
                }
                Err(e) => {
                    self.errors.insert(p, e.to_string());
                }
            }
        }
    }

    /// Reclaims dead processes' slots, then re-reads every file. `procs` is a fresh process table; a process
    /// started after it was taken is looked up again before its slot is judged dead.
    pub fn sweep(&mut self, procs: &ProcTable) -> u64 {
        self.pass(procs, true)
    }

    /// Reads every file without changing any (the view `status` gives without an agent).
    pub fn read_slots(&mut self, procs: &ProcTable) {
        self.pass(procs, false);
    }

    fn pass(&mut self, procs: &ProcTable, reclaim: bool) -> u64 {
        let mut fresh: Option<ProcTable> = None;
        let mut total = 0;
        for f in self.files.values_mut().filter(|_| reclaim) {
            let before = f.region.slots();
            let ns_of: HashMap<(u32, u64), u64> = before
                .iter()
                .map(|s| ((s.pid, s.start_time), s.pid_ns))
                .collect();
            let mut alive = |pid: u32, start: u64| {
                if start == 0 {
                    return true; // still claiming its slot
                }
                let ns = ns_of.get(&(pid, start)).copied().unwrap_or(0);
                let found = |t: &ProcTable| {
                    if ns == 0 {
                        t.alive(pid, start)
                    } else {
                        t.host_pid(ns, pid, start).is_some()
                    }
                };
                found(procs) || found(fresh.get_or_insert_with(ProcTable::scan))
            };
            let freed = f.region.reclaim_dead(&mut alive);
            if freed > 0 {
                tracing::info!(
                    "{}: reclaimed {freed} bytes of dead processes",
                    f.path.display()
                );
            }
            f.reclaimed_bytes += freed;
            total += freed;
        }
        for f in self.files.values_mut() {
            f.header_now = f.region.header();
            f.slots = f
                .region
                .slots()
                .into_iter()
                .map(|view| {
                    let host_pid = if view.pid_ns == 0 {
                        procs.alive(view.pid, view.start_time).then_some(view.pid)
                    } else {
                        procs.host_pid(view.pid_ns, view.pid, view.start_time)
                    };
                    // Tell the shim its host pid: a driver that names host pids in NVML shows a process in a
                    // pid namespace no entry under its own pid, and its CUDA context would go uncharged.
                    if let (true, Some(host)) = (reclaim, host_pid) {
                        f.region.record_host_pid(view.index, view.pid, view.start_time, host);
                    }
                    let charged = view.used.iter().sum();
                    Slot {
                        view,
                        host_pid,
                        charged,
                    }
                })
                .collect();
            if f.cgroup.is_none() {
                f.cgroup = f
                    .slots
                    .iter()
                    .filter_map(|s| procs.by_pid.get(&s.host_pid?))
                    .map(|p| p.cgroup.clone())
                    .next();
            }
        }
        total
    }

    /// The cache file of the container in `cgroup`, by binding or by pod UID.
    pub fn for_cgroup(&self, cgroup: &str, pod_uid: Option<&str>) -> Option<&CacheFile> {
        self.files
            .values()
            .find(|f| f.cgroup.as_deref() == Some(cgroup))
            .or_else(|| {
                let uid = pod_uid?;
                let mut same_pod = self
                    .files
                    .values()
                    .filter(|f| f.cgroup.is_none() && f.pod_uid.as_deref() == Some(uid));
                // Only when unambiguous: with two GPU containers in one pod, the pod UID alone cannot tell them apart.
                let one = same_pod.next()?;
                same_pod.next().is_none().then_some(one)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_contract::cache_layout::{own_pid_namespace, process_start_time};

    #[test]
    fn pod_dirs() {
        assert_eq!(
            parse_pod_dir("5d0b2f5a-6f6e-4b6a-9c3e-0a1b2c3d4e5f_main"),
            Some(("5d0b2f5a-6f6e-4b6a-9c3e-0a1b2c3d4e5f".into(), "main".into()))
        );
        assert_eq!(parse_pod_dir("not_a-pod"), None);
    }

    #[test]
    fn sweep_reclaims_the_dead_keeps_the_living_and_sees_tampering() {
        let d = std::env::temp_dir().join(format!("vgpu-mirror-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("ctr")).unwrap();
        let mut info = HeaderInfo::default();
        info.memory_limits[0] = 1 << 30;
        let p = d.join("ctr/x.cache");
        let r = CacheRegion::open_or_create(&p, &info).unwrap();
        let me = std::process::id();
        let live = r
            .claim(me, process_start_time(me).unwrap(), own_pid_namespace())
            .unwrap();
        r.try_charge(live, 0, 1000, None).unwrap();
        // A process that exited: pid 1's start time never matches this made-up one.
        let dead = r.claim(1, 12345, own_pid_namespace()).unwrap();
        r.try_charge(dead, 0, 500, None).unwrap();
        std::fs::write(d.join("ctr/junk.cache"), b"junk").unwrap();

        let mut m = Mirror::new(&d);
        m.rescan();
        assert_eq!(m.errors.len(), 1, "the junk file is reported, not mirrored");
        assert_eq!(m.sweep(&ProcTable::scan()), 500);
        let f = &m.files[&p];
        assert_eq!(f.slots.len(), 1);
        assert_eq!((f.slots[0].host_pid, f.slots[0].charged), (Some(me), 1000));
        let my_cgroup = ProcTable::scan().by_pid[&me].cgroup.clone();
        assert_eq!(
            f.cgroup.as_deref(),
            Some(my_cgroup.as_str()),
            "bound through its live process"
        );
        assert!(!f.header_tampered());

        // Rewrite the limit in place, as a container that owns its file could.
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.write_all_at(&u64::MAX.to_ne_bytes(), 64).unwrap();
        m.sweep(&ProcTable::scan());
        assert!(m.files[&p].header_tampered());
        assert_eq!(m.files[&p].limit(), 1 << 30, "the first-seen limit holds");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
