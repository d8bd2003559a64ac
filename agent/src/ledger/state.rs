//! The agent's view of the node: per-process memory from the uprobes, the containers' bindings (their limits),
//! the cache files as read, NVML; the checks (over the limit, disagreeing with the cache file) and what the
//! policy does about them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use vgpu_agent_ebpf_common::CallEvent;

use crate::ebpf::decode::{decode, Call};
use crate::ebpf::procs::ProcTable;
use crate::gpus::GpuSample;
use crate::ledger::bind_socket::Op;
use crate::ledger::bindings::{Binding, Bindings, Source};
use crate::ledger::book::Ledger;
use crate::ledger::caches::{CacheFile, Mirror, Slot, Snapshot};
use crate::ledger::cgroups::{container_of, CgroupIds};
use crate::observe::report::{ContainerReport, KillRecord, PidReport, Report};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Policy {
    /// Kill the process that takes its container past its limit.
    Enforce,
    /// Log it, count it and show it; kill nothing.
    Report,
}

/// A cache file and the uprobes disagree when they differ by more than this (the shim charges before it
/// calls the driver, so the two views can differ for the length of one call).
pub fn tolerance(a: u64, b: u64) -> u64 {
    (16 << 20).max(a.max(b) / 50)
}

pub struct State {
    pub policy: Policy,
    pub ledger: Ledger,
    pub cgroups: CgroupIds,
    pub cgroup_root: PathBuf,
    /// The only source of a container's limits and of its cache file (see [`crate::ledger::bindings`]).
    pub bindings: Bindings,
    pub mirror: Mirror,
    pub procs: ProcTable,
    pub gpus: Vec<GpuSample>,
    pub nvml_status: String,
    pub events: u64,
    pub dropped: u64,
    pub violations: u64,
    pub kills: Vec<KillRecord>,
    pub libcuda_files: Vec<String>,
    /// Processes mapping a libcuda that is not the host driver's file (its path as they see it): their calls
    /// are not probed, so their memory is taken from NVML.
    pub private_libcuda: HashMap<u32, String>,
    pub launch_probes: bool,
    pub dirty: bool,
    /// Number of the last call applied (the journal numbers its entries with it).
    pub seq: u64,
    pub journal: Option<crate::ledger::journal::Journal>,
    journal_pending: Vec<crate::ledger::journal::Entry>,
    pid_cgroup: HashMap<u32, String>,
    launch_prev: HashMap<u32, u64>,
    launch_rate: HashMap<u32, f64>,
    last_launch_sample: Option<Instant>,
    /// When each process last had a kernel on the GPU (unix µs) and the container it belongs to.
    last_kernel: HashMap<u32, (u64, String)>,
    /// The same for processes that exited, per container, so the container's figure outlives them.
    gone_last_kernel: HashMap<String, u64>,
    /// Each shim slot's launch counter at the previous sweep, by host pid.
    slot_launches: HashMap<u32, u64>,
    over: HashSet<String>,
    killed: HashSet<(u32, u64)>,
    /// Consecutive sweeps a (cgroup, pid) disagreed with its cache file.
    streaks: HashMap<(String, u32), u32>,
    warnings: HashMap<String, Vec<String>>,
}

// CLOCK_MONOTONIC is the clock of bpf_ktime_get_ns: kills are timed from the allocation's uprobe with it.
use vgpu_contract::mapped::monotonic_ns;

impl State {
    pub fn new(policy: Policy, cache_dir: PathBuf, cgroup_root: PathBuf) -> Self {
        Self {
            policy,
            ledger: Ledger::default(),
            cgroups: CgroupIds::new(cgroup_root.clone()),
            cgroup_root,
            bindings: Bindings::default(),
            mirror: Mirror::new(cache_dir),
            procs: ProcTable::default(),
            gpus: vec![],
            nvml_status: String::new(),
            events: 0,
            dropped: 0,
            violations: 0,
            kills: vec![],
            libcuda_files: vec![],
            private_libcuda: HashMap::new(),
            launch_probes: false,
            dirty: false,
            seq: 0,
            journal: None,
            journal_pending: vec![],
            pid_cgroup: HashMap::new(),
            launch_prev: HashMap::new(),
            launch_rate: HashMap::new(),
            last_launch_sample: None,
            last_kernel: HashMap::new(),
            gone_last_kernel: HashMap::new(),
            slot_launches: HashMap::new(),
            over: HashSet::new(),
            killed: HashSet::new(),
            streaks: HashMap::new(),
            warnings: HashMap::new(),
        }
    }

    /// Restores a ledger saved by an earlier run: only processes still alive with the same start time, so a
    /// restart neither loses their memory nor counts it twice. `gap`: calls made since the save may be lost
    /// (no pinned ring buffer kept them), so the restored processes become partial.
    pub fn restore(&mut self, saved: Ledger, gap: bool) {
        let procs = ProcTable::scan();
        for (tgid, mut p) in saved.procs {
            if procs.alive(tgid, p.start_time) {
                p.partial |= gap;
                self.pid_cgroup
                    .insert(tgid, procs.by_pid[&tgid].cgroup.clone());
                self.ledger.procs.insert(tgid, p);
            }
        }
        self.procs = procs;
    }

    /// Processes that already use CUDA when the agent starts and were not restored: their memory before now
    /// is unknown to the uprobes, so they are marked partial.
    pub fn adopt_running(&mut self, tgid: u32) {
        if let Some(p) = self.procs.by_pid.get(&tgid) {
            let e = self.ledger.procs.entry(tgid).or_default();
            if e.start_time == 0 {
                e.start_time = p.start_time;
                e.partial = true;
                self.pid_cgroup.insert(tgid, p.cgroup.clone());
            }
        }
    }

    fn cgroup_of(&mut self, tgid: u32, cgroup_id: u64) -> String {
        if let Some(c) = self.pid_cgroup.get(&tgid) {
            return c.clone();
        }
        let hint = std::fs::read_to_string(format!("/proc/{tgid}/cgroup")).ok();
        let hint = hint.as_deref().and_then(crate::ebpf::procs::parse_cgroup);
        let path = self
            .cgroups
            .path(cgroup_id, hint.as_deref())
            .or(hint)
            .unwrap_or_else(|| format!("cgroup-id:{cgroup_id}"));
        self.pid_cgroup.insert(tgid, path.clone());
        path
    }

    /// Applies one uprobe event; an allocation is checked against its container's limit at once.
    pub fn on_event(&mut self, ev: &CallEvent) {
        self.events += 1;
        let Some(call) = decode(ev) else { return };
        let start = match self.ledger.procs.get(&ev.tgid) {
            Some(p) if p.start_time != 0 => p.start_time,
            _ => vgpu_contract::cache_layout::process_start_time(ev.tgid).unwrap_or(0),
        };
        let cgroup = self.cgroup_of(ev.tgid, ev.cgroup_id);
        self.ledger.apply(ev.tgid, start, ev.cgroup_id, call);
        self.dirty = true;
        self.seq += 1;
        if self.journal.is_some() {
            self.journal_pending.push(crate::ledger::journal::Entry {
                seq: self.seq,
                tgid: ev.tgid,
                start,
                cgroup_id: ev.cgroup_id,
                call,
            });
        }
        if matches!(call, Call::Alloc { .. }) {
            self.check_limit(&cgroup, Some(ev.ts_ns));
        }
    }

    /// Applies a call the previous agent journaled after its last save (no limit check: the next sweep
    /// checks every container).
    pub fn replay(&mut self, e: &crate::ledger::journal::Entry) {
        self.cgroup_of(e.tgid, e.cgroup_id);
        self.ledger.apply(e.tgid, e.start, e.cgroup_id, e.call);
        self.seq = self.seq.max(e.seq);
        self.dirty = true;
    }

    /// Writes the calls applied since the last flush to the journal.
    pub fn flush_journal(&mut self) {
        if let Some(j) = self.journal.as_mut() {
            if let Err(e) = j.append(&self.journal_pending) {
                tracing::warn!(
                    "journal {}: {e}; an agent crash now would lose calls",
                    j.path().display()
                );
            }
        }
        self.journal_pending.clear();
    }

    /// Binds a container (the node side, after the kubelet's record confirmed it; root's word). Its limit
    /// applies from now on, also to what its processes already hold.
    pub fn bind_container(&mut self, b: Binding) -> Result<(), String> {
        let cgroup = b.cgroup.clone();
        self.bindings.bind(b)?;
        self.dirty = true;
        self.check_limit(&cgroup, None);
        Ok(())
    }

    /// Forgets the node side's binding of `cgroup` (its container restarted under another one).
    pub fn unbind(&mut self, cgroup: &str) -> Result<(), String> {
        self.bindings.unbind(cgroup, 0)?;
        self.over.remove(cgroup);
        self.dirty = true;
        Ok(())
    }

    /// Forgets the node side's bindings of pods `live` says are gone from the node; returns their cgroups.
    pub fn unbind_allocated_except(&mut self, live: &dyn Fn(&str) -> bool) -> Vec<String> {
        let gone: Vec<String> = self
            .bindings
            .iter()
            .filter(|b| b.source == Source::Allocate)
            .filter(|b| b.pod.as_ref().is_some_and(|p| !live(&p.uid)))
            .map(|b| b.cgroup.clone())
            .collect();
        for c in &gone {
            if self.bindings.unbind(c, 0).is_ok() {
                self.over.remove(c);
                self.dirty = true;
            }
        }
        gone
    }

    /// A request from the bind socket, its peer already authorized for the paths it names.
    pub fn apply_bind_op(&mut self, op: Op) -> Result<(), String> {
        match op {
            Op::Bind(b) => self.bind_container(b),
            Op::Unbind { cgroup, uid } => {
                self.bindings.unbind(&cgroup, uid)?;
                self.over.remove(&cgroup);
                self.dirty = true;
                Ok(())
            }
        }
    }

    /// The cache files to read besides those under the cache directory: the bound ones.
    pub fn bound_cache_files(&self) -> Vec<PathBuf> {
        self.bindings.iter().map(|b| b.cache_path.clone()).collect()
    }

    /// The cache file of the container in `cgroup`: only the one its binding names.
    /// The host pid of a slot, only when the file is bound and that process is in the bound cgroup: a slot
    /// in a tenant's file naming another container's process says nothing about it.
    fn slot_pid(&self, f: &CacheFile, s: &Slot) -> Option<u32> {
        let pid = s.host_pid?;
        let cgroup = f.cgroup.as_deref()?;
        (self.procs.by_pid.get(&pid)?.cgroup == cgroup).then_some(pid)
    }

    fn file_for(&self, cgroup: &str) -> Option<&CacheFile> {
        self.mirror.get(&self.bindings.get(cgroup)?.cache_path)
    }

    fn bound_map(&self) -> BTreeMap<PathBuf, String> {
        self.bindings
            .iter()
            .map(|b| (b.cache_path.clone(), b.cgroup.clone()))
            .collect()
    }

    /// Takes in the cache files read (outside the lock) by [`crate::ledger::caches::collect`].
    pub fn take_cache_reads(&mut self, reads: Vec<(PathBuf, Result<Snapshot, String>)>) {
        let bound = self.bound_map();
        self.mirror.apply(reads, &self.procs, &bound);
    }

    /// Records which processes map a private libcuda, flagging each newcomer once.
    pub fn set_private_libcuda(&mut self, private: HashMap<u32, String>) {
        for (pid, path) in &private {
            if !self.private_libcuda.contains_key(pid) {
                tracing::warn!(
                    "pid {pid} maps {path}, a libcuda that is not the host driver's: its calls are not probed; \
                     its memory is taken from NVML"
                );
            }
        }
        self.private_libcuda = private;
    }

    /// The start time the agent knows `pid` by (the ledger's, else the process table's), 0 if neither.
    fn start_of(&self, pid: u32) -> u64 {
        self.ledger
            .procs
            .get(&pid)
            .map(|p| p.start_time)
            .or_else(|| self.procs.by_pid.get(&pid).map(|p| p.start_time))
            .unwrap_or(0)
    }

    fn nvml_bytes(&self, pid: u32) -> u64 {
        self.gpus
            .iter()
            .flat_map(|g| g.processes.iter())
            .filter(|(p, _)| *p == pid)
            .fold(0u64, |a, (_, b)| a.saturating_add(*b))
    }

    /// (tgid, bytes held, bytes its cache slot charges minus its context) per process of `cgroup`: held is
    /// what the uprobes saw, or for a process on a private libcuda (whose calls are not probed) what NVML
    /// says it holds, whichever is more.
    fn members(&self, cgroup: &str) -> Vec<(u32, u64, u64)> {
        let file = self.file_for(cgroup);
        let charged_of = |t: u32| {
            file.and_then(|f| f.slots.iter().find(|s| self.slot_pid(f, s) == Some(t)))
                .map_or(0, |s| s.charged.saturating_sub(s.view.context_bytes))
        };
        let mut out: Vec<(u32, u64, u64)> = self
            .ledger
            .procs
            .iter()
            .filter(|(t, _)| self.pid_cgroup.get(t).map(String::as_str) == Some(cgroup))
            .map(|(t, p)| {
                let charged = charged_of(*t);
                // Older than the probes: what its cache slot charges is the better floor.
                let mut seen = if p.partial {
                    p.total.max(charged)
                } else {
                    p.total
                };
                if self.private_libcuda.contains_key(t) {
                    seen = seen.max(self.nvml_bytes(*t));
                }
                (*t, seen, charged)
            })
            .collect();
        for pid in self.private_libcuda.keys() {
            let in_cgroup = self.procs.by_pid.get(pid).map(|p| p.cgroup.as_str()) == Some(cgroup);
            if in_cgroup && !self.ledger.procs.contains_key(pid) {
                out.push((*pid, self.nvml_bytes(*pid), charged_of(*pid)));
            }
        }
        out
    }

    /// Over the limit: log and count once per crossing; under enforce, kill the processes that account for
    /// the excess, those the cache file does not know about first.
    pub fn check_limit(&mut self, cgroup: &str, event_ts: Option<u64>) {
        // A container without a binding has no limit the agent trusts: shown, never killed.
        let Some(limit) = self.bindings.get(cgroup).and_then(Binding::memory_limit) else {
            self.over.remove(cgroup);
            return;
        };
        let mut members = self.members(cgroup);
        members.retain(|(t, _, _)| {
            let start = self.start_of(*t);
            !self.killed.contains(&(*t, start))
        });
        let mut total: u64 = members.iter().map(|m| m.1).sum();
        if total <= limit {
            self.over.remove(cgroup);
            return;
        }
        if self.over.insert(cgroup.to_string()) {
            self.violations += 1;
            tracing::warn!(
                "container {cgroup}: uprobes see {} MiB on the device, limit {} MiB (policy {:?})",
                total >> 20,
                limit >> 20,
                self.policy
            );
        }
        if self.policy != Policy::Enforce {
            return;
        }
        // Largest uncharged share first: a process without the shim, or one whose file under-reports.
        members.sort_by_key(|(_, seen, charged)| {
            std::cmp::Reverse((seen.saturating_sub(*charged), *seen))
        });
        for (tgid, seen, _) in members {
            if total <= limit {
                break;
            }
            let start = self.start_of(tgid);
            // Never signal a pid that now names another process.
            if vgpu_contract::cache_layout::process_start_time(tgid) != Some(start) {
                continue;
            }
            // SAFETY: kill(2) with a pid we just checked names the process that made the allocations.
            let rc = unsafe { libc::kill(tgid as i32, libc::SIGKILL) };
            let latency_ms =
                event_ts.map_or(0.0, |t| monotonic_ns().saturating_sub(t) as f64 / 1e6);
            tracing::warn!(
                "enforce: killed pid {tgid} of {cgroup} holding {} MiB (container at {} MiB, limit {} MiB) {latency_ms:.1} ms after the allocation (rc {rc})",
                seen >> 20,
                total >> 20,
                limit >> 20
            );
            self.killed.insert((tgid, start));
            self.kills.push(KillRecord {
                pid: tgid,
                cgroup: cgroup.to_string(),
                seen_bytes: seen,
                limit_bytes: limit,
                latency_ms,
                unix_time: unix_us() / 1_000_000,
            });
            total -= seen;
        }
    }

    /// The periodic pass: drop exited processes, take in the cache files read, check every container.
    pub fn sweep(
        &mut self,
        procs: ProcTable,
        launches: Option<HashMap<u32, u64>>,
        reads: Vec<(PathBuf, Result<Snapshot, String>)>,
    ) -> Vec<u32> {
        self.procs = procs;
        let dead = self.ledger.drop_dead(|t, s| self.procs.alive(t, s));
        for t in &dead {
            self.pid_cgroup.remove(t);
            self.launch_prev.remove(t);
            self.launch_rate.remove(t);
        }
        self.killed.retain(|(t, s)| self.procs.alive(*t, *s));
        if !dead.is_empty() {
            self.dirty = true;
        }
        for c in self.bindings.drop_vanished(&self.cgroup_root) {
            tracing::info!("unbound {c}: its cgroup is gone");
            self.over.remove(&c);
            self.dirty = true;
        }
        self.take_cache_reads(reads);
        self.note_kernels(launches.as_ref(), unix_us());
        if let Some(counts) = launches {
            let now = Instant::now();
            let dt = self
                .last_launch_sample
                .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
            for (t, n) in &counts {
                let prev = self.launch_prev.insert(*t, *n).unwrap_or(*n);
                if dt > 0.0 {
                    self.launch_rate
                        .insert(*t, n.saturating_sub(prev) as f64 / dt);
                }
            }
            self.last_launch_sample = Some(now);
        }
        let mut cgroups: HashSet<String> = self.pid_cgroup.values().cloned().collect();
        cgroups.extend(self.bindings.iter().map(|b| b.cgroup.clone()));
        for c in &cgroups {
            self.check_limit(c, None);
        }
        self.check_agreement(&cgroups);
        dead
    }

    /// Notes when each process last had a kernel on the GPU, from whichever source saw one: NVML's
    /// per-process samples (any process, ~1/6 s resolution), the launch probes' counters, or the launch
    /// counter the shim keeps in its cache slot while pacing. A container keeps its figure after its
    /// processes exit.
    pub fn note_kernels(&mut self, launches: Option<&HashMap<u32, u64>>, now_us: u64) {
        let mut seen: Vec<(u32, u64)> = self
            .gpus
            .iter()
            .flat_map(|g| g.sm_busy_at.iter().copied())
            .collect();
        if let Some(counts) = launches {
            for (t, n) in counts {
                if self.launch_prev.get(t).is_some_and(|prev| n > prev) {
                    seen.push((*t, now_us));
                }
            }
        }
        let slots: Vec<(u32, u64)> = self
            .mirror
            .files
            .values()
            .flat_map(|f| f.slots.iter().map(move |s| (f, s)))
            .filter_map(|(f, s)| Some((self.slot_pid(f, s)?, s.view.launches)))
            .collect();
        for (pid, launches) in slots {
            let prev = self.slot_launches.insert(pid, launches);
            if prev.is_some_and(|p| launches > p) {
                seen.push((pid, now_us));
            }
        }
        for (pid, at) in seen {
            let Some(cgroup) = self
                .pid_cgroup
                .get(&pid)
                .or_else(|| self.procs.by_pid.get(&pid).map(|p| &p.cgroup))
                .cloned()
            else {
                continue;
            };
            let e = self.last_kernel.entry(pid).or_insert((0, cgroup));
            e.0 = e.0.max(at);
        }
        let procs = &self.procs;
        let gone = &mut self.gone_last_kernel;
        self.last_kernel.retain(|pid, (at, cgroup)| {
            let alive = procs.by_pid.contains_key(pid);
            if !alive {
                let g = gone.entry(cgroup.clone()).or_default();
                *g = (*g).max(*at);
            }
            alive
        });
        self.slot_launches
            .retain(|pid, _| procs.by_pid.contains_key(pid));
    }

    fn check_agreement(&mut self, cgroups: &HashSet<String>) {
        let mut warnings: HashMap<String, Vec<String>> = HashMap::new();
        let mut streaks = HashMap::new();
        for c in cgroups {
            let mut w = vec![];
            let file = self.file_for(c);
            if let (Some(b), Some(f)) = (self.bindings.get(c), file) {
                if let Some(e) = &f.error {
                    w.push(format!(
                        "cache file {}: {e}; the binding's limit ({}) still holds",
                        f.path.display(),
                        b.memory_limit()
                            .map_or("none".into(), |l| format!("{} MiB", l >> 20))
                    ));
                }
                if f.error.is_none() && !header_agrees(&f.header_now.memory_limits, b) {
                    w.push(format!(
                        "cache file {} header says limits {}, the binding {}; the binding's hold",
                        f.path.display(),
                        limits_text(&f.header_now.memory_limits),
                        binding_limits_text(b)
                    ));
                }
            }
            let Some(file) = file else {
                if !w.is_empty() {
                    warnings.insert(c.clone(), w);
                }
                continue;
            };
            let file_pids: HashMap<u32, (u64, u64)> = file
                .slots
                .iter()
                .filter_map(|s| Some((s.host_pid?, (s.charged, s.view.context_bytes))))
                .collect();
            for (tgid, p) in self
                .ledger
                .procs
                .iter()
                .filter(|(t, _)| self.pid_cgroup.get(t) == Some(c))
            {
                if p.partial {
                    continue; // its history before the probes is unknown, so no comparison is fair
                }
                let msg = match file_pids.get(tgid) {
                    None if p.total > 0 => {
                        format!("pid {tgid} holds {} MiB without the shim", p.total >> 20)
                    }
                    Some((charged, ctx)) => {
                        let charged = charged.saturating_sub(*ctx);
                        if charged.abs_diff(p.total) <= tolerance(charged, p.total) {
                            continue;
                        }
                        format!(
                            "pid {tgid}: cache file charges {} MiB, uprobes saw {} MiB (tampered or stale cache?)",
                            charged >> 20,
                            p.total >> 20
                        )
                    }
                    None => continue,
                };
                let key = (c.clone(), *tgid);
                let n = self.streaks.get(&key).copied().unwrap_or(0) + 1;
                streaks.insert(key, n);
                // Twice in a row: one sweep can fall between the shim's charge and the driver call.
                if n >= 2 {
                    w.push(msg);
                }
            }
            if !w.is_empty() {
                warnings.insert(c.clone(), w);
            }
        }
        for (c, ws) in &warnings {
            if self.warnings.get(c) != Some(ws) {
                for w in ws {
                    tracing::warn!("container {c}: {w}");
                }
            }
        }
        self.streaks = streaks;
        self.warnings = warnings;
    }

    pub fn report(&self) -> Report {
        let nvml_of: HashMap<u32, u64> = self
            .gpus
            .iter()
            .flat_map(|g| g.processes.iter().copied())
            .fold(HashMap::new(), |mut m, (p, b)| {
                *m.entry(p).or_default() += b;
                m
            });
        let sm_of: HashMap<u32, u32> = self
            .gpus
            .iter()
            .flat_map(|g| g.sm_util.iter().copied())
            .fold(HashMap::new(), |mut m, (p, u)| {
                *m.entry(p).or_default() += u;
                m
            });
        let mut by_pid: HashMap<u32, PidReport> = HashMap::new();
        for (t, p) in &self.ledger.procs {
            by_pid.insert(
                *t,
                PidReport {
                    pid: *t,
                    ebpf_bytes: p.total,
                    nvml_bytes: nvml_of.get(t).copied().unwrap_or(0),
                    launches_per_s: self.launch_rate.get(t).copied().unwrap_or(0.0),
                    last_kernel_unix_us: self.last_kernel.get(t).map(|k| k.0),
                    partial: p.partial,
                    ..Default::default()
                },
            );
        }
        let mut pid_container: HashMap<u32, String> = self
            .ledger
            .procs
            .keys()
            .map(|t| (*t, self.pid_cgroup.get(t).cloned().unwrap_or_default()))
            .collect();
        let mut reports: BTreeMap<String, ContainerReport> = BTreeMap::new();
        fn get<'a>(
            reports: &'a mut BTreeMap<String, ContainerReport>,
            key: &str,
        ) -> &'a mut ContainerReport {
            reports.entry(key.to_string()).or_insert_with(|| {
                let r = container_of(key);
                ContainerReport {
                    key: key.to_string(),
                    cgroup: key.starts_with('/').then(|| key.to_string()),
                    pod_uid: r.pod_uid,
                    container_id: r.container_id,
                    ..Default::default()
                }
            })
        }
        for f in self.mirror.files.values() {
            let key = f
                .cgroup
                .clone()
                .unwrap_or_else(|| f.path.display().to_string());
            let c = get(&mut reports, &key);
            c.cache_file = Some(f.path.display().to_string());
            c.header_limit_bytes = f.limit();
            c.container_name = f.container_name.clone();
            c.pod_uid = c.pod_uid.clone().or(f.pod_uid.clone());
            if f.cgroup.is_none() {
                c.warnings.push(
                    "no binding: shown only; nothing in this file is enforced or causes a kill"
                        .into(),
                );
            }
            for s in &f.slots {
                // Tenant-written numbers: saturate, never overflow.
                c.charged_bytes = c.charged_bytes.saturating_add(s.charged);
                c.throttled_ms = c
                    .throttled_ms
                    .saturating_add(s.view.throttled_ns / 1_000_000);
                let Some(hp) = self.slot_pid(f, s) else {
                    continue;
                };
                pid_container.insert(hp, key.clone());
                let p = by_pid.entry(hp).or_insert_with(|| PidReport {
                    pid: hp,
                    nvml_bytes: nvml_of.get(&hp).copied().unwrap_or(0),
                    last_kernel_unix_us: self.last_kernel.get(&hp).map(|k| k.0),
                    ..Default::default()
                });
                p.charged_bytes = Some(s.charged);
                p.context_bytes = s.view.context_bytes;
            }
        }
        for b in self.bindings.iter() {
            let c = get(&mut reports, &b.cgroup);
            c.bound = true;
            c.limit_bytes = b.memory_limit().unwrap_or(0);
            c.sm_limit = b.sm_limit;
            c.cache_file = Some(b.cache_path.display().to_string());
            if let Some(p) = &b.pod {
                c.namespace = Some(p.namespace.clone());
                c.pod_name = Some(p.name.clone());
                c.pod_uid = Some(p.uid.clone());
                c.container_name = Some(p.container.clone());
            }
        }
        // NVML-only processes (neither probed nor in a cache file) still belong to their container.
        for (pid, bytes) in &nvml_of {
            if !by_pid.contains_key(pid) {
                if let Some(p) = self.procs.by_pid.get(pid) {
                    pid_container.insert(*pid, p.cgroup.clone());
                    by_pid.insert(
                        *pid,
                        PidReport {
                            pid: *pid,
                            nvml_bytes: *bytes,
                            last_kernel_unix_us: self.last_kernel.get(pid).map(|k| k.0),
                            ..Default::default()
                        },
                    );
                }
            }
        }
        let mut private_warnings: Vec<(String, String)> = vec![];
        for (pid, path) in &self.private_libcuda {
            let Some(proc_) = self.procs.by_pid.get(pid) else {
                continue;
            };
            let key = pid_container
                .entry(*pid)
                .or_insert_with(|| proc_.cgroup.clone())
                .clone();
            by_pid
                .entry(*pid)
                .or_insert_with(|| PidReport {
                    pid: *pid,
                    nvml_bytes: nvml_of.get(pid).copied().unwrap_or(0),
                    ..Default::default()
                })
                .private_libcuda = true;
            private_warnings.push((
                key,
                format!(
                    "pid {pid} maps {path}, not the host driver's libcuda: its calls are not probed, its memory \
                     is counted from NVML"
                ),
            ));
        }
        for (key, w) in private_warnings {
            get(&mut reports, &key).warnings.push(w);
        }
        for (pid, p) in by_pid {
            let key = pid_container.get(&pid).cloned().unwrap_or_default();
            let c = get(&mut reports, &key);
            c.ebpf_bytes += p.ebpf_bytes;
            c.nvml_bytes += p.nvml_bytes;
            c.launches_per_s += p.launches_per_s;
            c.last_kernel_unix_us = c.last_kernel_unix_us.max(p.last_kernel_unix_us);
            let mut p = p;
            p.sm_util_percent = sm_of.get(&p.pid).copied().unwrap_or(0);
            c.sm_util_percent += p.sm_util_percent;
            c.pids.push(p);
        }
        for (key, c) in reports.iter_mut() {
            c.pids.sort_by_key(|p| p.pid);
            c.last_kernel_unix_us = c
                .last_kernel_unix_us
                .max(self.gone_last_kernel.get(key).copied());
            c.over_limit = self.over.contains(key);
            if c.over_limit {
                c.warnings.push(format!(
                    "over its limit: uprobes see {} MiB, limit {} MiB",
                    c.ebpf_bytes >> 20,
                    c.limit_bytes >> 20
                ));
            }
            if let Some(w) = self.warnings.get(key) {
                c.warnings.extend(w.iter().cloned());
            }
        }
        Report {
            source: "agent".into(),
            agent: None,
            gpus: self.gpus.iter().map(|g| g.gpu.clone()).collect(),
            containers: reports.into_values().collect(),
            notes: self
                .mirror
                .errors
                .iter()
                .map(|(p, e)| format!("{}: {e}", p.display()))
                .collect(),
        }
    }
}

pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Whether a header's limits say what the binding says for every device the binding limits.
fn header_agrees(header: &[u64], b: &Binding) -> bool {
    b.memory_limits
        .iter()
        .all(|(d, l)| header.get(*d as usize).is_some_and(|h| h == l))
}

fn binding_limits_text(b: &Binding) -> String {
    let mut l = [0u64; vgpu_contract::cache_layout::MAX_DEVICES];
    for (d, v) in &b.memory_limits {
        if let Some(x) = l.get_mut(*d as usize) {
            *x = *v;
        }
    }
    limits_text(&l)
}

/// The non-zero per-device limits, in MiB, for messages.
/// The memory limits of a cache header for a log line: one figure when every limited device has the same one
/// (a slice set with `CUDA_DEVICE_MEMORY_LIMIT` fills all 16 ordinals), else `device: limit` pairs.
pub fn limits_text(l: &[u64]) -> String {
    let set: Vec<(usize, u64)> = l
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, v)| v != 0)
        .collect();
    match set.as_slice() {
        [] => "none".into(),
        [(_, v), rest @ ..] if rest.iter().all(|(_, w)| w == v) && set.len() > 1 => {
            format!("{} MiB per device", v >> 20)
        }
        [(0, v)] => format!("{} MiB", v >> 20),
        _ => set
            .iter()
            .map(|(i, v)| format!("device {i}: {} MiB", v >> 20))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebpf::procs::Proc;

    #[test]
    fn a_limit_on_every_device_is_said_once() {
        assert_eq!(limits_text(&[4000 << 20; 16]), "4000 MiB per device");
        assert_eq!(limits_text(&[0; 16]), "none");
        let mut one = [0u64; 16];
        one[0] = 4000 << 20;
        assert_eq!(limits_text(&one), "4000 MiB");
        one[1] = 2000 << 20;
        assert_eq!(limits_text(&one), "device 0: 4000 MiB, device 1: 2000 MiB");
    }
    use crate::observe::report::GpuReport;

    fn proc(pid: u32, cgroup: &str) -> Proc {
        Proc {
            pid,
            start_time: 1,
            pid_ns: 1,
            ns_pid: pid,
            cgroup: cgroup.into(),
        }
    }

    fn gpu(busy: &[(u32, u64)]) -> GpuSample {
        GpuSample {
            gpu: GpuReport::default(),
            processes: vec![],
            sm_util: vec![],
            sm_busy_at: busy.to_vec(),
        }
    }

    #[test]
    fn the_last_kernel_comes_from_nvml_or_launch_counters_and_outlives_the_process() {
        let dir = std::env::temp_dir().join(format!("vgpu-state-test-{}", std::process::id()));
        let mut s = State::new(Policy::Report, dir.clone(), dir);
        s.procs = ProcTable::from_procs([proc(10, "/a"), proc(11, "/b")]);
        s.gpus = vec![gpu(&[(10, 1_000)])];
        s.note_kernels(None, 5_000);
        assert_eq!(s.last_kernel.get(&10).map(|k| k.0), Some(1_000));
        assert!(!s.last_kernel.contains_key(&11), "no kernel seen for 11");

        // The launch probes' counter moving is a kernel now; a counter seen for the first time is not.
        s.launch_prev.insert(11, 5);
        s.note_kernels(Some(&HashMap::from([(11, 5)])), 6_000);
        assert!(!s.last_kernel.contains_key(&11), "counter did not move");
        s.note_kernels(Some(&HashMap::from([(11, 9)])), 7_000);
        assert_eq!(s.last_kernel.get(&11).map(|k| k.0), Some(7_000));

        // An older NVML sample never moves the figure back.
        s.gpus = vec![gpu(&[(10, 500)])];
        s.note_kernels(None, 8_000);
        assert_eq!(s.last_kernel.get(&10).map(|k| k.0), Some(1_000));

        // Process 10 exits: its container keeps the figure.
        s.procs = ProcTable::from_procs([proc(11, "/b")]);
        s.gpus = vec![];
        s.note_kernels(None, 9_000);
        assert!(!s.last_kernel.contains_key(&10));
        assert_eq!(s.gone_last_kernel.get("/a"), Some(&1_000));
    }
    fn my_cgroup() -> String {
        ProcTable::scan().by_pid[&std::process::id()].cgroup.clone()
    }

    /// Makes the ledger hold `bytes` for this test process, as the uprobes would.
    fn holds(s: &mut State, bytes: u64) {
        let me = std::process::id();
        s.replay(&crate::ledger::journal::Entry {
            seq: 1,
            tgid: me,
            start: vgpu_contract::cache_layout::process_start_time(me).unwrap(),
            cgroup_id: 0,
            call: Call::Alloc {
                space: crate::ebpf::decode::Space::DevicePtr,
                handle: 0x1000,
                bytes,
            },
        });
    }

    #[test]
    fn only_a_binding_sets_a_limit_and_a_deleted_file_keeps_it() {
        use vgpu_contract::cache_layout::{CacheRegion, HeaderInfo};
        let dir = std::env::temp_dir().join(format!("vgpu-state-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("planted")).unwrap();
        let cg = my_cgroup();
        // A tenant plants a cache file claiming 1 MiB, and a `cgroup` file naming this process's cgroup.
        let mut info = HeaderInfo::default();
        info.memory_limits[0] = 1 << 20;
        let planted = dir.join("planted/x.cache");
        let r = CacheRegion::open_or_create(&planted, &info).unwrap();
        // Its slot names this (other container's) process and charges u64::MAX twice.
        let me = std::process::id();
        let slot = r
            .claim(
                me,
                vgpu_contract::cache_layout::process_start_time(me).unwrap(),
                vgpu_contract::cache_layout::own_pid_namespace(),
            )
            .unwrap();
        r.try_charge(slot, 0, u64::MAX, None).unwrap();
        r.try_charge(slot, 1, u64::MAX, None).unwrap();
        drop(r);
        std::fs::write(dir.join("planted/cgroup"), &cg).unwrap();
        let mut s = State::new(Policy::Report, dir.clone(), "/sys/fs/cgroup".into());
        s.procs = ProcTable::scan();
        holds(&mut s, 64 << 20);
        let sweep = |s: &mut State| {
            let reads = crate::ledger::caches::collect(&dir, &s.bound_cache_files());
            s.sweep(ProcTable::scan(), None, reads);
        };
        sweep(&mut s);
        assert_eq!(s.violations, 0, "the planted file sets no limit");
        let r = s.report();
        let shown = r
            .containers
            .iter()
            .find(|c| c.cache_file.as_deref() == Some(planted.to_str().unwrap()))
            .unwrap();
        assert!(!shown.bound && shown.header_limit_bytes == 1 << 20);
        assert!(shown.warnings[0].starts_with("no binding"), "{shown:?}");
        assert_eq!(shown.charged_bytes, u64::MAX, "saturated, not wrapped");
        assert!(
            shown.pids.is_empty(),
            "a planted slot does not move another container's process: {shown:?}"
        );
        let mine = r.containers.iter().find(|c| c.key == cg).unwrap();
        assert!(mine
            .pids
            .iter()
            .any(|p| p.pid == me && p.charged_bytes.is_none()));

        let own = dir.join("own.cache");
        info.memory_limits[0] = 32 << 20;
        drop(CacheRegion::open_or_create(&own, &info).unwrap());
        s.bind_container(Binding {
            cgroup: cg.clone(),
            cache_path: own.clone(),
            memory_limits: [(0, 32 << 20)].into(),
            sm_limit: 0,
            policy: "default".into(),
            source: crate::ledger::bindings::Source::Allocate,
            pod: None,
        })
        .unwrap();
        assert_eq!(s.violations, 1, "bound at 32 MiB while holding 64 MiB");
        // The tenant deletes its cache file: the binding and its limit stay.
        std::fs::remove_file(&own).unwrap();
        sweep(&mut s);
        sweep(&mut s);
        let r = s.report();
        let c = r.containers.iter().find(|c| c.key == cg).unwrap();
        assert!(c.over_limit && c.limit_bytes == 32 << 20, "{c:?}");
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("deleted; the binding's limit (32 MiB) still holds")),
            "{c:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_node_side_unbinds_only_its_own_bindings_of_gone_pods() {
        let dir = std::env::temp_dir().join(format!("vgpu-unbind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = State::new(Policy::Report, dir.clone(), dir.clone());
        let bind = |cg: &str, source, uid: Option<&str>| Binding {
            cgroup: cg.into(),
            cache_path: dir.join(format!("{}.cache", cg.trim_start_matches('/'))),
            memory_limits: [(0, 32 << 20)].into(),
            sm_limit: 0,
            policy: "default".into(),
            source,
            pod: uid.map(|u| crate::ledger::bindings::PodRef {
                namespace: "ns".into(),
                name: u.into(),
                uid: u.into(),
                container: "c".into(),
            }),
        };
        use crate::ledger::bindings::Source::{Allocate, Exec};
        s.bind_container(bind("/live", Allocate, Some("live")))
            .unwrap();
        s.bind_container(bind("/gone", Allocate, Some("gone")))
            .unwrap();
        s.bind_container(bind("/exec", Exec { uid: 0, pid: 1 }, None))
            .unwrap();
        assert_eq!(s.unbind_allocated_except(&|u| u == "live"), ["/gone"]);
        let left: Vec<_> = s.bindings.iter().map(|b| b.cgroup.as_str()).collect();
        assert_eq!(left, ["/exec", "/live"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
