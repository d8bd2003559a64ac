//! The agent's copy of the shared-cache files: every `*.cache` under the cache directory and every bound cache
//! file, read with `pread` into a buffer and validated. A tenant can write, truncate, replace or delete its
//! file at any time, so the agent never maps it (a truncated mapping is SIGBUS), opens it without following
//! symlinks and without blocking (`O_NOFOLLOW|O_NONBLOCK`), takes only regular files, reads a bounded amount,
//! and reads outside the state lock ([`collect`], then [`Mirror::apply`] under it). It never writes a tenant's
//! file: dead processes' slots are left to the shim's own reclaim protocol (see docs/security.md).
//! What the files say is shown, never trusted: limits and the cgroup come from [`crate::ledger::bindings`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vgpu_contract::cache_layout::{
    bytes_in_use, parse_copy, HeaderInfo, SlotView, FILE_BYTES, HEADER_BYTES,
};

use crate::ebpf::procs::ProcTable;

/// A slot with its pid translated to the host's.
#[derive(Debug, Clone)]
pub struct Slot {
    pub view: SlotView,
    pub host_pid: Option<u32>,
    pub charged: u64,
}

/// One cache file as last read.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub header: HeaderInfo,
    pub slots: Vec<SlotView>,
}

pub struct CacheFile {
    pub path: PathBuf,
    /// The header as first seen, for the "rewritten" flag (informational: limits come from the binding).
    pub first_header: HeaderInfo,
    pub header_now: HeaderInfo,
    /// From a kubelet directory name `<podUID>_<container>` (for display only: a tenant can make such a
    /// directory inside its own).
    pub pod_uid: Option<String>,
    pub container_name: Option<String>,
    /// The cgroup of the binding that names this file; None when no binding does.
    pub cgroup: Option<String>,
    /// Live processes' slots.
    pub slots: Vec<Slot>,
    /// Bytes charged by slots whose process is gone (left for the shim to reclaim; not counted as charged).
    pub dead_bytes: u64,
    /// Why the last read failed (truncated, not a regular file, deleted, ...); the previous read is kept.
    pub error: Option<String>,
}

impl CacheFile {
    /// The memory limit the header claims, summed over the devices holding memory (one device's with none
    /// held). Informational: the agent enforces the binding's limit.
    pub fn limit(&self) -> u64 {
        let limits = &self.header_now.memory_limits;
        let held: u64 = (0..limits.len())
            .filter(|&d| self.slots.iter().any(|s| s.view.used[d] > 0))
            .fold(0u64, |a, d| a.saturating_add(limits[d]));
        if held > 0 {
            held
        } else {
            limits.iter().copied().max().unwrap_or(0)
        }
    }
}

/// `<podUID>_<container>` (HAMi's host directory naming, and this agent's before per-answer directories) into
/// its parts.
pub fn parse_pod_dir(name: &str) -> Option<(String, String)> {
    let (uid, ctr) = name.split_once('_')?;
    (uid.len() == 36 && uid.bytes().filter(|b| *b == b'-').count() == 4 && !ctr.is_empty())
        .then(|| (uid.to_string(), ctr.to_string()))
}

/// At most this many cache files are read per pass (a tenant can create files in its own directory).
const MAX_FILES: usize = 4096;

fn find_caches(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if out.len() >= MAX_FILES {
            return;
        }
        let p = e.path();
        // The entry's own type (a symlink is a symlink): never followed into another tree.
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() && depth < 4 {
            find_caches(&p, depth + 1, out);
        } else if t.is_file() && p.extension().is_some_and(|x| x == "cache") {
            out.push(p);
        }
    }
}

/// Opens a tenant-reachable file for reading: no symlink followed, no blocking on a FIFO or device, closed
/// on exec; anything but a regular file is refused.
pub fn open_tenant_file(path: &Path) -> std::io::Result<File> {
    open_tenant_file_mode(path, false)
}

/// [`open_tenant_file`], read-write for the agent's one write (a slot's host pid).
fn open_tenant_file_mode(path: &Path, write: bool) -> std::io::Result<File> {
    let f = File::options()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !f.metadata()?.file_type().is_file() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// Writes one slot's host-pid word (`cache_layout::write_host_pid`: generation-tagged, so a slot that changed
/// owner meanwhile is left alone) through a descriptor opened as [`open_tenant_file`] opens, for writing.
fn tell_host_pid(
    path: &Path,
    slot: usize,
    pid: u32,
    start: u64,
    host: u32,
) -> std::io::Result<bool> {
    let f = open_tenant_file_mode(path, true)?;
    vgpu_contract::cache_layout::write_host_pid(&f, slot, pid, start, host)
}

/// Reads `len` bytes at `offset` or as many as the file has (it may shrink meanwhile).
fn pread_up_to(f: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    let mut n = 0;
    while n < len {
        match f.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

/// One cache file, copied and validated: the header, then the slots up to its (bounded) high-water mark.
pub fn read_cache_file(path: &Path) -> Result<Snapshot, String> {
    let f = open_tenant_file(path).map_err(|e| e.to_string())?;
    let mut bytes = pread_up_to(&f, 0, HEADER_BYTES).map_err(|e| e.to_string())?;
    let want = bytes_in_use(&bytes).min(FILE_BYTES);
    if bytes.len() == HEADER_BYTES && want > HEADER_BYTES {
        let rest =
            pread_up_to(&f, HEADER_BYTES as u64, want - HEADER_BYTES).map_err(|e| e.to_string())?;
        bytes.extend_from_slice(&rest);
    }
    let (header, slots) =
        parse_copy(&bytes).map_err(|why| format!("not a vgpu cache file ({why})"))?;
    Ok(Snapshot { header, slots })
}

/// Reads every cache file under `dir` and every path in `bound` (no lock held: a slow or hostile file
/// delays only this pass). A bound path that no longer exists is reported as deleted.
pub fn collect(dir: &Path, bound: &[PathBuf]) -> Vec<(PathBuf, Result<Snapshot, String>)> {
    let mut found = vec![];
    find_caches(dir, 0, &mut found);
    let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
    found
        .into_iter()
        .chain(bound.iter().cloned())
        .filter(|p| seen.insert(p.clone()))
        .map(|p| {
            let r = read_cache_file(&p).map_err(|e| {
                if e.contains("No such file") {
                    "deleted".to_string()
                } else {
                    e
                }
            });
            (p, r)
        })
        .collect()
}

#[derive(Default)]
pub struct Mirror {
    pub dir: PathBuf,
    pub files: BTreeMap<PathBuf, CacheFile>,
    /// Files under the cache directory that could not be read, with why (not a vgpu cache, a FIFO, ...).
    pub errors: BTreeMap<PathBuf, String>,
    /// Dead slots already counted into `dead_total` (path, slot index, pid, start time).
    dead_seen: HashSet<(PathBuf, usize, u32, u64)>,
    /// Bytes found charged by processes that were gone, each dead slot counted once.
    pub dead_total: u64,
    /// Slots of bound files already told their host pid (path, slot index, pid, start time).
    host_pid_told: HashSet<(PathBuf, usize, u32, u64)>,
}

impl Mirror {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            ..Default::default()
        }
    }

    /// Reads the files now (no process table: every slot's pid untranslated). For `status` without an agent.
    pub fn rescan(&mut self) {
        let reads = collect(&self.dir, &[]);
        self.apply(reads, &ProcTable::default(), &BTreeMap::new());
    }

    /// Reads them again with live processes translated (the view `status` gives without an agent).
    pub fn read_slots(&mut self, procs: &ProcTable) {
        let reads = collect(&self.dir, &[]);
        self.apply(reads, procs, &BTreeMap::new());
    }

    /// Takes in what [`collect`] read. `bound` names each bound file's cgroup. A bound file that failed to
    /// read keeps its last view and says why; an unbound one that is gone is forgotten.
    pub fn apply(
        &mut self,
        reads: Vec<(PathBuf, Result<Snapshot, String>)>,
        procs: &ProcTable,
        bound: &BTreeMap<PathBuf, String>,
    ) {
        let present: HashSet<&PathBuf> = reads.iter().map(|(p, _)| p).collect();
        self.files
            .retain(|p, _| present.contains(p) || bound.contains_key(p));
        self.errors.retain(|p, _| present.contains(p));
        self.dead_seen.retain(|k| present.contains(&k.0));
        self.host_pid_told.retain(|k| present.contains(&k.0));
        for (path, r) in reads {
            let snap = match r {
                Ok(s) => s,
                Err(e) => {
                    if let Some(f) = self.files.get_mut(&path) {
                        f.error = Some(e);
                    } else if bound.contains_key(&path) {
                        self.files
                            .insert(path.clone(), empty_file(path.clone(), Some(e)));
                    } else {
                        if !self.errors.contains_key(&path) {
                            tracing::info!("not reading {}: {e}", path.display());
                        }
                        self.errors.insert(path, e);
                    }
                    continue;
                }
            };
            self.errors.remove(&path);
            let f = self.files.entry(path.clone()).or_insert_with(|| {
                tracing::info!(
                    "reading {} (header limits {}, informational)",
                    path.display(),
                    crate::ledger::state::limits_text(&snap.header.memory_limits)
                );
                let mut f = empty_file(path.clone(), None);
                f.first_header = snap.header.clone();
                f
            });
            if f.error.take().is_some() && f.first_header == HeaderInfo::default() {
                f.first_header = snap.header.clone();
            }
            f.header_now = snap.header;
            f.slots.clear();
            f.dead_bytes = 0;
            for view in snap.slots {
                let host_pid = if view.pid_ns == 0 {
                    procs.alive(view.pid, view.start_time).then_some(view.pid)
                } else {
                    procs.host_pid(view.pid_ns, view.pid, view.start_time)
                };
                let charged = view.used.iter().fold(0u64, |a, u| a.saturating_add(*u));
                // With no process table (status without an agent) nothing can be judged dead.
                if host_pid.is_none() && !procs.by_pid.is_empty() && view.start_time != 0 {
                    f.dead_bytes = f.dead_bytes.saturating_add(charged);
                    let key = (path.clone(), view.index, view.pid, view.start_time);
                    if self.dead_seen.insert(key) {
                        self.dead_total = self.dead_total.saturating_add(charged);
                    }
                    continue;
                }
                // Tell a process in a pid namespace its host pid: a driver that names host pids in NVML shows
                // it no entry under its own pid, and its CUDA context would go uncharged. Only in files the agent
                // bound (it made them), once per slot owner, one generation-tagged word the shim only reads.
                if let (Some(host), true) = (host_pid, bound.contains_key(&path)) {
                    let key = (path.clone(), view.index, view.pid, view.start_time);
                    if host != view.pid && !self.host_pid_told.contains(&key) {
                        match tell_host_pid(&path, view.index, view.pid, view.start_time, host) {
                            Ok(_) => {
                                self.host_pid_told.insert(key);
                            }
                            Err(e) => {
                                tracing::debug!("{}: host pid not recorded: {e}", path.display())
                            }
                        }
                    }
                }
                f.slots.push(Slot {
                    view,
                    host_pid,
                    charged,
                });
            }
        }
        for f in self.files.values_mut() {
            f.cgroup = bound.get(&f.path).cloned();
        }
    }

    /// The cache file at `path`, if read.
    pub fn get(&self, path: &Path) -> Option<&CacheFile> {
        self.files.get(path)
    }
}

fn empty_file(path: PathBuf, error: Option<String>) -> CacheFile {
    let dir_name = path
        .parent()
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let (pod_uid, container_name) = parse_pod_dir(dir_name).unzip();
    CacheFile {
        path,
        first_header: HeaderInfo::default(),
        header_now: HeaderInfo::default(),
        pod_uid,
        container_name,
        cgroup: None,
        slots: vec![],
        dead_bytes: 0,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_contract::cache_layout::{own_pid_namespace, process_start_time, CacheRegion};

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vgpu-mirror-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("ctr")).unwrap();
        d
    }

    #[test]
    fn pod_dirs() {
        assert_eq!(
            parse_pod_dir("5d0b2f5a-6f6e-4b6a-9c3e-0a1b2c3d4e5f_main"),
            Some(("5d0b2f5a-6f6e-4b6a-9c3e-0a1b2c3d4e5f".into(), "main".into()))
        );
        assert_eq!(parse_pod_dir("not_a-pod"), None);
    }

    #[test]
    fn dead_slots_are_not_charged_the_living_are_and_tampering_shows() {
        let d = tmp("dead");
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
        let bound = BTreeMap::from([(p.clone(), "/bound".to_string())]);
        m.apply(collect(&d, &[]), &ProcTable::scan(), &bound);
        assert_eq!(m.errors.len(), 1, "the junk file is reported, not mirrored");
        let f = &m.files[&p];
        assert_eq!(f.slots.len(), 1);
        assert_eq!((f.slots[0].host_pid, f.slots[0].charged), (Some(me), 1000));
        assert_eq!(f.dead_bytes, 500);
        assert_eq!(f.cgroup.as_deref(), Some("/bound"), "from the binding only");
        m.apply(collect(&d, &[]), &ProcTable::scan(), &bound);
        assert_eq!(m.dead_total, 500, "a dead slot is counted once");
        assert_eq!(r.slots().len(), 2, "the agent never writes the file");

        use std::os::unix::fs::FileExt;
        let w = std::fs::File::options().write(true).open(&p).unwrap();
        w.write_all_at(&u64::MAX.to_ne_bytes(), 64).unwrap();
        m.apply(collect(&d, &[]), &ProcTable::scan(), &bound);
        assert_ne!(m.files[&p].header_now, m.files[&p].first_header);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_truncated_fifo_or_symlinked_file_is_skipped_without_blocking_or_crashing() {
        let d = tmp("hostile");
        let p = d.join("ctr/x.cache");
        let r = CacheRegion::open_or_create(&p, &HeaderInfo::default()).unwrap();
        let me = std::process::id();
        r.claim(me, process_start_time(me).unwrap(), own_pid_namespace())
            .unwrap();
        let mut m = Mirror::new(&d);
        let bound = BTreeMap::from([(p.clone(), "/c".to_string())]);
        m.apply(collect(&d, &[]), &ProcTable::scan(), &bound);
        assert_eq!(m.files[&p].slots.len(), 1);
        // Truncated while another process (the shim, here `r`) has it mapped.
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(100)
            .unwrap();
        m.apply(collect(&d, &[]), &ProcTable::scan(), &bound);
        let f = &m.files[&p];
        assert!(
            f.error
                .as_deref()
                .unwrap()
                .contains("shorter than its header"),
            "{:?}",
            f.error
        );
        assert_eq!(f.slots.len(), 1, "the last good view is kept");
        // A FIFO and a symlink at a bound path: refused at once.
        std::fs::remove_file(&p).unwrap();
        let fifo = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
        let t = std::time::Instant::now();
        let e = read_cache_file(&p).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        let e = read_cache_file(&p).unwrap_err();
        assert!(e.contains("symbolic links"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        std::fs::remove_file(&p).unwrap();
        m.apply(
            collect(&d, std::slice::from_ref(&p)),
            &ProcTable::scan(),
            &bound,
        );
        assert_eq!(m.files[&p].error.as_deref(), Some("deleted"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
