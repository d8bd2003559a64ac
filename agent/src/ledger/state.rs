//! The agent's view of the node: per-process memory from the uprobes, the mirrored cache files, NVML; the
//! checks (over the limit, disagreeing with the cache file) and what the policy does about them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use vgpu_agent_ebpf_common::CallEvent;

use crate::ebpf::decode::{decode, Call};
use crate::ebpf::procs::ProcTable;
use crate::gpus::GpuSample;
use crate::ledger::book::Ledger;
use crate::ledger::caches::{CacheFile, Mirror};
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
    pub mirror: Mirror,
    pub procs: ProcTable,
    pub gpus: Vec<GpuSample>,
    pub nvml_status: String,
    pub events: u64,
    pub dropped: u64,
    pub violations: u64,
    pub kills: Vec<KillRecord>,
    pub libcuda_files: Vec<String>,
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
            cgroups: CgroupIds::new(cgroup_root),
            mirror: Mirror::new(cache_dir),
            procs: ProcTable::default(),
            gpus: vec![],
            nvml_status: String::new(),
            events: 0,
            dropped: 0,
            violations: 0,
            kills: vec![],
            libcuda_files: vec![],
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

    fn file_for(&self, cgroup: &str) -> Option<&CacheFile> {
        let pod = container_of(cgroup).pod_uid;
        self.mirror.for_cgroup(cgroup, pod.as_deref())
    }

    /// (tgid, bytes the uprobes saw, bytes its cache slot charges minus its context) per process of `cgroup`.
    fn members(&self, cgroup: &str) -> Vec<(u32, u64, u64)> {
        let file = self.file_for(cgroup);
        self.ledger
            .procs
            .iter()
            .filter(|(t, _)| self.pid_cgroup.get(t).map(String::as_str) == Some(cgroup))
            .map(|(t, p)| {
                let charged = file
                    .and_then(|f| f.slots.iter().find(|s| s.host_pid == Some(*t)))
                    .map_or(0, |s| s.charged.saturating_sub(s.view.context_bytes));
                // Older than the probes: what its cache slot charges is the better floor.
                let seen = if p.partial {
                    p.total.max(charged)
                } else {
                    p.total
                };
                (*t, seen, charged)
            })
            .collect()
    }

    /// Over the limit: log and count once per crossing; under enforce, kill the processes that account for
    /// the excess, those the cache file does not know about first.
    pub fn check_limit(&mut self, cgroup: &str, event_ts: Option<u64>) {
        let Some(limit) = self
            .file_for(cgroup)
            .map(CacheFile::limit)
            .filter(|l| *l > 0)
        else {
            return;
        };
        let mut members = self.members(cgroup);
        members.retain(|(t, _, _)| {
            let start = self.ledger.procs.get(t).map_or(0, |p| p.start_time);
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
            let start = self.ledger.procs.get(&tgid).map_or(0, |p| p.start_time);
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

    /// The periodic pass: drop exited processes, reclaim dead slots, check every container.
    pub fn sweep(&mut self, procs: ProcTable, launches: Option<HashMap<u32, u64>>) -> Vec<u32> {
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
        self.mirror.rescan();
        self.mirror.sweep(&self.procs);
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
        let cgroups: HashSet<String> = self.pid_cgroup.values().cloned().collect();
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
        for s in self.mirror.files.values().flat_map(|f| f.slots.iter()) {
            let Some(pid) = s.host_pid else { continue };
            let prev = self.slot_launches.insert(pid, s.view.launches);
            if prev.is_some_and(|p| s.view.launches > p) {
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
            let Some(file) = self.file_for(c) else {
                continue;
            };
            let mut w = vec![];
            if file.header_tampered() {
                w.push(format!(
                    "cache file {} header changed since first seen (limits {} -> {}); holding the first",
                    file.path.display(),
                    limits_text(&file.first_header.memory_limits),
                    limits_text(&file.header_now.memory_limits)
                ));
            }
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
            c.limit_bytes = f.limit();
            c.sm_limit = f.first_header.sm_limit;
            c.container_name = f.container_name.clone();
            c.pod_uid = c.pod_uid.clone().or(f.pod_uid.clone());
            for s in &f.slots {
                c.charged_bytes += s.charged;
                c.throttled_ms += s.view.throttled_ns / 1_000_000;
                let Some(hp) = s.host_pid else { continue };
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
            if f.header_tampered() && f.cgroup.is_none() {
                c.warnings
                    .push("cache file header changed since first seen".into());
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
}
