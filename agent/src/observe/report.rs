//! What `vgpu-agent status` shows and the metrics export: one serializable snapshot, and its text form.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// "agent" (from the running agent) or "cache-files" (no agent: what the files alone tell).
    pub source: String,
    pub agent: Option<AgentInfo>,
    pub gpus: Vec<GpuReport>,
    pub containers: Vec<ContainerReport>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentInfo {
    pub pid: u32,
    pub policy: String,
    pub ebpf_built_with: String,
    pub libcuda_files: Vec<String>,
    pub launch_probes: bool,
    pub events: u64,
    pub dropped_events: u64,
    pub violations: u64,
    pub kills: Vec<KillRecord>,
    /// Bytes found charged in cache slots of processes that had exited (each slot once). The agent does not
    /// write tenant files: the container's shim reclaims such slots on its next refused charge.
    #[serde(default, alias = "reclaimed_bytes")]
    pub dead_slot_bytes: u64,
    pub nvml: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KillRecord {
    pub pid: u32,
    pub cgroup: String,
    pub seen_bytes: u64,
    pub limit_bytes: u64,
    /// From the allocation that crossed the limit (its uprobe timestamp) to the SIGKILL.
    pub latency_ms: f64,
    pub unix_time: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GpuReport {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total: u64,
    pub memory_used: u64,
    /// Percent of time a kernel ran over NVML's last sample period.
    pub utilization: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContainerReport {
    /// cgroup path, or the cache file's path when no process of it was ever seen.
    pub key: String,
    pub cgroup: Option<String>,
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
    pub container_name: Option<String>,
    pub cache_file: Option<String>,
    /// Kubernetes namespace and pod name, when the node side bound the container.
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub pod_name: Option<String>,
    /// Bound by the node side or `exec`: only then is `limit_bytes` enforced.
    #[serde(default)]
    pub bound: bool,
    /// The limit the binding sets (0: none, or no binding).
    pub limit_bytes: u64,
    /// What the cache file's header claims (informational: the tenant can write it).
    #[serde(default)]
    pub header_limit_bytes: u64,
    pub sm_limit: u32,
    pub charged_bytes: u64,
    pub ebpf_bytes: u64,
    pub nvml_bytes: u64,
    pub launches_per_s: f64,
    /// Sum of its processes' SM utilization (percent of the card) in NVML's latest samples.
    pub sm_util_percent: u32,
    /// When a process of the container last had a kernel on the GPU (unix µs); None: never seen.
    pub last_kernel_unix_us: Option<u64>,
    pub throttled_ms: u64,
    pub over_limit: bool,
    pub pids: Vec<PidReport>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PidReport {
    pub pid: u32,
    pub ebpf_bytes: u64,
    /// None: the process has no slot in the cache file (runs without the shim).
    pub charged_bytes: Option<u64>,
    pub context_bytes: u64,
    pub nvml_bytes: u64,
    pub launches_per_s: f64,
    pub sm_util_percent: u32,
    pub last_kernel_unix_us: Option<u64>,
    /// Older than the agent's probes: allocations made before may be missing from ebpf_bytes.
    pub partial: bool,
    /// Maps a libcuda that is not the host driver's file: its calls are not probed, so its memory is taken
    /// from NVML (docs/security.md).
    #[serde(default)]
    pub private_libcuda: bool,
}

pub fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / (1 << 20) as f64)
}

pub fn render_text(r: &Report) -> String {
    let mut s = String::new();
    match &r.agent {
        Some(a) => s += &format!(
            "vgpu-agent pid {} policy {} | eBPF {} on {} libcuda file(s){} | events {} dropped {} | violations {} kills {} | {}\n",
            a.pid,
            a.policy,
            a.ebpf_built_with,
            a.libcuda_files.len(),
            if a.launch_probes { " +launch probes" } else { "" },
            a.events,
            a.dropped_events,
            a.violations,
            a.kills.len(),
            a.nvml
        ),
        None => s += "no vgpu-agent running: showing what the cache files alone tell\n",
    }
    for n in &r.notes {
        s += &format!("note: {n}\n");
    }
    s += "\nGPU  NAME                           MEM USED/TOTAL MiB   UTIL  UUID\n";
    for g in &r.gpus {
        s += &format!(
            "{:<4} {:<30} {:>8}/{:<10} {:>4}%  {}\n",
            g.index,
            g.name,
            mib(g.memory_used),
            mib(g.memory_total),
            g.utilization,
            g.uuid
        );
    }
    if r.gpus.is_empty() {
        s += "(none)\n";
    }
    s += "\nCONTAINER                                          LIMIT MiB  CHARGED  eBPF     NVML     CORES  SM%  THROTTLED  LAST KERNEL  LAUNCH/s  PIDS\n";
    let now_us = crate::ledger::state::unix_us();
    for c in &r.containers {
        let name = match (&c.pod_uid, &c.container_name) {
            (Some(p), Some(n)) => format!("pod {p} / {n}"),
            _ => c.key.clone(),
        };
        let pids: Vec<String> = c
            .pids
            .iter()
            .map(|p| {
                format!(
                    "{}{}{}{}",
                    p.pid,
                    if p.charged_bytes.is_none() {
                        "(no shim)"
                    } else {
                        ""
                    },
                    if p.partial { "(partial)" } else { "" },
                    if p.private_libcuda {
                        "(private libcuda)"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        s += &format!(
            "{:<50} {:>9}  {:>7}  {:>7}  {:>7}  {:>5}  {:>3}  {:>8.1}s  {:>11}  {:>8.0}  {}\n",
            name,
            match (c.bound, c.limit_bytes, c.header_limit_bytes) {
                (true, 0, _) => "-".into(),
                (true, l, _) => mib(l),
                // Unbound: what the file claims, in parentheses, since nothing enforces it.
                (false, _, 0) => "(unbound)".into(),
                (false, _, h) => format!("({})", mib(h)),
            },
            mib(c.charged_bytes),
            mib(c.ebpf_bytes),
            mib(c.nvml_bytes),
            if c.sm_limit == 0 || c.sm_limit >= 100 {
                "-".into()
            } else {
                format!("{}%", c.sm_limit)
            },
            c.sm_util_percent,
            c.throttled_ms as f64 / 1000.0,
            c.last_kernel_unix_us.map_or("-".into(), |t| format!(
                "{:.1}s ago",
                now_us.saturating_sub(t) as f64 / 1e6
            )),
            c.launches_per_s,
            pids.join(",")
        );
        for w in &c.warnings {
            s += &format!("    WARNING: {w}\n");
        }
    }
    if r.containers.is_empty() {
        s += "(none)\n";
    }
    s
}
