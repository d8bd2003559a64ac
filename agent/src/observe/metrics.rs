//! Prometheus text exposition from a status snapshot: HAMi's names (legacy and current node-monitor ones) so
//! existing dashboards keep working, and vgpu's own beside them. Documented in docs/agent.md.
//!
//! By default nothing per-tenant-sensitive is served: containers are named by HAMi's labels (namespace, pod,
//! container, vdevice_index, device_uuid), and a container without Kubernetes names by an opaque hash of its
//! cgroup. Pids, cgroup paths and cache file paths only with `--metrics-detail` (docs/security.md).

use std::fmt::Write;

use crate::observe::report::{ContainerReport, GpuReport, Report};

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, l: &[(&str, &str)], v: f64) {
        let _ = writeln!(self.0, "{name}{} {v}", labels(l));
    }
}

type GpuFamily = (&'static str, &'static str, bool, fn(&GpuReport) -> f64);
/// A per-container family; its value is None for a container it has nothing true to say about.
type CtrFamily = (
    &'static str,
    &'static str,
    Labels,
    fn(&ContainerReport) -> Option<f64>,
);

#[derive(Clone, Copy)]
enum Labels {
    /// HAMi's legacy per-container labels.
    Legacy,
    /// HAMi's current node-monitor labels.
    Current,
    /// vgpu's own: HAMi's current labels, plus (with detail) the cgroup and cache file.
    Ours,
}

/// A stable name for a container that reveals nothing of its cgroup or files (FNV-1a of the key).
fn opaque(key: &str) -> String {
    let h = key.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    format!("ctr-{:012x}", h >> 16)
}

fn container_labels(
    set: Labels,
    c: &ContainerReport,
    uuid: &str,
    detail: bool,
) -> Vec<(&'static str, String)> {
    let ns = c.namespace.clone().unwrap_or_default();
    let pod = c
        .pod_name
        .clone()
        .or_else(|| c.pod_uid.clone())
        .unwrap_or_default();
    let name = c.container_name.clone().unwrap_or_else(|| {
        if detail {
            c.key.clone()
        } else {
            opaque(&c.key)
        }
    });
    match set {
        Labels::Legacy => vec![
            ("podnamespace", ns),
            ("podname", pod),
            ("ctrname", name),
            ("vdeviceid", "0".into()),
            ("deviceuuid", uuid.into()),
        ],
        Labels::Current | Labels::Ours => {
            let mut l = vec![
                ("namespace", ns),
                ("pod", pod),
                ("container", name),
                ("vdevice_index", "0".into()),
                ("device_uuid", uuid.into()),
            ];
            if detail && matches!(set, Labels::Ours) {
                l.push(("cgroup", c.cgroup.clone().unwrap_or_default()));
                l.push(("cache_file", c.cache_file.clone().unwrap_or_default()));
            }
            l
        }
    }
}

/// The exposition; `detail` adds per-tenant detail (pids, cgroup paths, cache file paths).
pub fn render(r: &Report, detail: bool) -> String {
    let mut o = Out(String::new());
    let gpu_families: [GpuFamily; 5] = [
        (
            "HostGPUMemoryUsage",
            "GPU device memory used (bytes), HAMi legacy name",
            false,
            |g| g.memory_used as f64,
        ),
        (
            "HostCoreUtilization",
            "GPU utilization (percent), HAMi legacy name",
            false,
            |g| g.utilization as f64,
        ),
        (
            "hami_host_gpu_memory_used_bytes",
            "GPU device memory used (bytes)",
            true,
            |g| g.memory_used as f64,
        ),
        (
            "hami_host_gpu_utilization_ratio",
            "GPU utilization (0-1)",
            true,
            |g| g.utilization as f64 / 100.0,
        ),
        (
            "vgpu_host_gpu_memory_total_bytes",
            "GPU device memory total (bytes)",
            true,
            |g| g.memory_total as f64,
        ),
    ];
    for (name, help, current, f) in gpu_families {
        o.family(name, "gauge", help);
        for g in &r.gpus {
            let idx = g.index.to_string();
            let l = if current {
                [
                    ("device_index", idx.as_str()),
                    ("device_uuid", g.uuid.as_str()),
                    ("device_type", g.name.as_str()),
                ]
            } else {
                [
                    ("deviceidx", idx.as_str()),
                    ("deviceuuid", g.uuid.as_str()),
                    ("devicetype", g.name.as_str()),
                ]
            };
            o.sample(name, &l, f(g));
        }
    }

    // Per container. Off Kubernetes the pod fields are empty and the container label names the cgroup.
    let uuid = r.gpus.first().map(|g| g.uuid.clone()).unwrap_or_default();
    let families: [CtrFamily; 14] = [
        (
            "vGPU_device_memory_usage_in_bytes",
            "memory charged in the container's cache (bytes), HAMi legacy name",
            Labels::Legacy,
            |c| Some(c.charged_bytes as f64),
        ),
        (
            "vGPU_device_memory_limit_in_bytes",
            "the container's memory limit (bytes), HAMi legacy name",
            Labels::Legacy,
            |c| Some(c.limit_bytes as f64),
        ),
        (
            "hami_vgpu_memory_used_bytes",
            "memory charged in the container's cache (bytes)",
            Labels::Current,
            |c| Some(c.charged_bytes as f64),
        ),
        (
            "hami_container_device_utilization_ratio",
            "the container's share of the card's SM time in NVML's latest per-process samples (0-1)",
            Labels::Current,
            |c| Some(c.sm_util_percent as f64 / 100.0),
        ),
        (
            "hami_container_last_kernel_elapsed_seconds",
            // Only for containers seen running a kernel: an invented age would read as a real one.
            "seconds since a process of the container last had a kernel on the GPU (NVML samples, launch probes or the shim's counter)",
            Labels::Current,
            |c| {
                c.last_kernel_unix_us
                    .map(|t| crate::ledger::state::unix_us().saturating_sub(t) as f64 / 1e6)
            },
        ),
        (
            "hami_vgpu_memory_limit_bytes",
            "the container's memory limit (bytes)",
            Labels::Current,
            |c| Some(c.limit_bytes as f64),
        ),
        (
            "vgpu_container_ebpf_memory_bytes",
            "device memory the uprobes saw the container's processes hold (bytes)",
            Labels::Ours,
            |c| Some(c.ebpf_bytes as f64),
        ),
        (
            "vgpu_container_charged_memory_bytes",
            "memory charged in the container's cache file (bytes)",
            Labels::Ours,
            |c| Some(c.charged_bytes as f64),
        ),
        (
            "vgpu_container_nvml_memory_bytes",
            "NVML's per-process used memory summed over the container (bytes)",
            Labels::Ours,
            |c| Some(c.nvml_bytes as f64),
        ),
        (
            "vgpu_container_limit_bytes",
            "the container's memory limit (bytes, 0 = none)",
            Labels::Ours,
            |c| Some(c.limit_bytes as f64),
        ),
        (
            "vgpu_container_launches_per_second",
            "kernel launches per second (launch probes on)",
            Labels::Ours,
            |c| Some(c.launches_per_s),
        ),
        (
            "vgpu_container_throttled_seconds",
            "time the shim held the container's launches back",
            Labels::Ours,
            |c| Some(c.throttled_ms as f64 / 1000.0),
        ),
        (
            "vgpu_container_over_limit",
            "1 while the uprobes see the container past its limit",
            Labels::Ours,
            |c| Some(c.over_limit as u8 as f64),
        ),
        (
            "vgpu_container_warnings",
            "number of warnings on the container (see vgpu-agent status)",
            Labels::Ours,
            |c| Some(c.warnings.len() as f64),
        ),
    ];
    for (name, help, set, value) in families {
        o.family(name, "gauge", help);
        for c in &r.containers {
            let Some(v) = value(c) else { continue };
            let l = container_labels(set, c, &uuid, detail);
            let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
            o.sample(name, &l, v);
        }
    }
    if detail {
        o.family(
            "vgpu_process_ebpf_memory_bytes",
            "gauge",
            "device memory the uprobes saw a process hold (bytes)",
        );
    }
    for c in r.containers.iter().filter(|_| detail) {
        for p in &c.pids {
            let pid = p.pid.to_string();
            o.sample(
                "vgpu_process_ebpf_memory_bytes",
                &[("pid", &pid), ("cgroup", &c.key)],
                p.ebpf_bytes as f64,
            );
        }
    }
    if let Some(a) = &r.agent {
        let counters: [(&str, &str, f64); 5] = [
            (
                "vgpu_agent_events_total",
                "uprobe events processed",
                a.events as f64,
            ),
            (
                "vgpu_agent_dropped_events_total",
                "uprobe events lost to a full ring buffer",
                a.dropped_events as f64,
            ),
            (
                "vgpu_agent_violations_total",
                "times a container went past its limit",
                a.violations as f64,
            ),
            (
                "vgpu_agent_kills_total",
                "processes killed under the enforce policy",
                a.kills.len() as f64,
            ),
            (
                "vgpu_agent_dead_slot_bytes_total",
                "bytes found charged in cache slots of exited processes (the shim reclaims them)",
                a.dead_slot_bytes as f64,
            ),
        ];
        for (n, h, v) in counters {
            o.family(n, "counter", h);
            o.sample(n, &[], v);
        }
        o.family("vgpu_agent_libcuda_files", "gauge", "libcuda files probed");
        o.sample(
            "vgpu_agent_libcuda_files",
            &[],
            a.libcuda_files.len() as f64,
        );
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::report::ContainerReport;

    #[test]
    fn container_utilization_is_a_ratio_under_hamis_name() {
        let r = Report {
            containers: vec![ContainerReport {
                key: "/slice-a".into(),
                sm_util_percent: 30,
                limit_bytes: 4000 << 20,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render(&r, true);
        let line = text
            .lines()
            .find(|l| l.starts_with("hami_container_device_utilization_ratio{"))
            .expect("exported");
        assert!(line.ends_with(" 0.3"), "{line}");
        assert!(line.contains("container=\"/slice-a\""), "{line}");
    }

    #[test]
    fn last_kernel_age_is_exported_only_for_containers_seen_running_one() {
        let now = crate::ledger::state::unix_us();
        let r = Report {
            containers: vec![
                ContainerReport {
                    key: "/ran".into(),
                    last_kernel_unix_us: Some(now - 2_500_000),
                    ..Default::default()
                },
                ContainerReport {
                    key: "/idle".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let text = render(&r, true);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("hami_container_last_kernel_elapsed_seconds{"))
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(lines[0].contains("container=\"/ran\""), "{}", lines[0]);
        let v: f64 = lines[0].rsplit(' ').next().unwrap().parse().unwrap();
        assert!((2.4..3.5).contains(&v), "{v}");
    }

    #[test]
    fn without_detail_no_pid_cgroup_or_path_is_served() {
        let r = Report {
            containers: vec![
                ContainerReport {
                    key: "/vgpu-exec/1000/secret-slice".into(),
                    cgroup: Some("/vgpu-exec/1000/secret-slice".into()),
                    cache_file: Some("/run/user/1000/vgpu/secret.cache".into()),
                    limit_bytes: 4000 << 20,
                    pids: vec![crate::observe::report::PidReport {
                        pid: 4242,
                        ebpf_bytes: 1 << 20,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                ContainerReport {
                    key: "/kubepods/x".into(),
                    namespace: Some("team-a".into()),
                    pod_name: Some("trainer-0".into()),
                    container_name: Some("main".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let plain = render(&r, false);
        for secret in ["secret", "4242", "/vgpu-exec", "/run/user", "/kubepods"] {
            assert!(
                !plain.contains(secret),
                "{secret} served without detail:\n{plain}"
            );
        }
        assert!(
            plain.contains("hami_vgpu_memory_limit_bytes{namespace=\"\",pod=\"\",container=\"ctr-")
        );
        assert!(plain.contains("namespace=\"team-a\",pod=\"trainer-0\",container=\"main\""));
        let detail = render(&r, true);
        assert!(
            detail.contains("vgpu_process_ebpf_memory_bytes{pid=\"4242\""),
            "{detail}"
        );
        assert!(detail.contains("cache_file=\"/run/user/1000/vgpu/secret.cache\""));
    }
}
