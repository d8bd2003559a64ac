//! Prometheus text exposition from a status snapshot: HAMi's names (legacy and current node-monitor ones) so
//! existing dashboards keep working, and vgpu's own beside them. Documented in docs/agent.md.

use std::fmt::Write;

use crate::report::{GpuReport, Report};

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", esc(v))).collect();
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

pub fn render(r: &Report) -> String {
    let mut o = Out(String::new());
    let gpu_families: [(&str, &str, bool, fn(&GpuReport) -> f64); 5] = [
        ("HostGPUMemoryUsage", "GPU device memory used (bytes), HAMi legacy name", false, |g| g.memory_used as f64),
        ("HostCoreUtilization", "GPU utilization (percent), HAMi legacy name", false, |g| g.utilization as f64),
        ("hami_host_gpu_memory_used_bytes", "GPU device memory used (bytes)", true, |g| g.memory_used as f64),
        ("hami_host_gpu_utilization_ratio", "GPU utilization (0-1)", true, |g| g.utilization as f64 / 100.0),
        ("vgpu_host_gpu_memory_total_bytes", "GPU device memory total (bytes)", true, |g| g.memory_total as f64),
    ];
    for (name, help, current, f) in gpu_families {
        o.family(name, "gauge", help);
        for g in &r.gpus {
            let idx = g.index.to_string();
            let l = if current {
                [("device_index", idx.as_str()), ("device_uuid", g.uuid.as_str()), ("device_type", g.name.as_str())]
            } else {
                [("deviceidx", idx.as_str()), ("deviceuuid", g.uuid.as_str()), ("devicetype", g.name.as_str())]
            };
            o.sample(name, &l, f(g));
        }
    }

    // Per container. Off Kubernetes the pod fields are empty and the cgroup label names the container.
    let ctr_labels = |c: &crate::report::ContainerReport| -> Vec<(&'static str, String)> {
        vec![
            ("podnamespace", String::new()),
            ("podname", c.pod_uid.clone().unwrap_or_default()),
            ("ctrname", c.container_name.clone().unwrap_or_else(|| c.key.clone())),
            ("vdeviceid", "0".into()),
            ("deviceuuid", r.gpus.first().map(|g| g.uuid.clone()).unwrap_or_default()),
        ]
    };
    let ctr_current = |c: &crate::report::ContainerReport| -> Vec<(&'static str, String)> {
        vec![
            ("namespace", String::new()),
            ("pod", c.pod_uid.clone().unwrap_or_default()),
            ("container", c.container_name.clone().unwrap_or_else(|| c.key.clone())),
            ("vdevice_index", "0".into()),
            ("device_uuid", r.gpus.first().map(|g| g.uuid.clone()).unwrap_or_default()),
        ]
    };
    let ours = |c: &crate::report::ContainerReport| -> Vec<(&'static str, String)> {
        vec![
            ("cgroup", c.cgroup.clone().unwrap_or_default()),
            ("pod_uid", c.pod_uid.clone().unwrap_or_default()),
            ("container", c.container_name.clone().unwrap_or_default()),
            ("cache_file", c.cache_file.clone().unwrap_or_default()),
        ]
    };
    type LabelFn<'a> = &'a dyn Fn(&crate::report::ContainerReport) -> Vec<(&'static str, String)>;
    let families: Vec<(&str, &str, LabelFn, Box<dyn Fn(&crate::report::ContainerReport) -> f64>)> = vec![
        ("vGPU_device_memory_usage_in_bytes", "memory charged in the container's cache (bytes), HAMi legacy name", &ctr_labels, Box::new(|c| c.charged_bytes as f64)),
        ("vGPU_device_memory_limit_in_bytes", "the container's memory limit (bytes), HAMi legacy name", &ctr_labels, Box::new(|c| c.limit_bytes as f64)),
        ("hami_vgpu_memory_used_bytes", "memory charged in the container's cache (bytes)", &ctr_current, Box::new(|c| c.charged_bytes as f64)),
        ("hami_vgpu_memory_limit_bytes", "the container's memory limit (bytes)", &ctr_current, Box::new(|c| c.limit_bytes as f64)),
        ("vgpu_container_ebpf_memory_bytes", "device memory the uprobes saw the container's processes hold (bytes)", &ours, Box::new(|c| c.ebpf_bytes as f64)),
        ("vgpu_container_charged_memory_bytes", "memory charged in the container's cache file (bytes)", &ours, Box::new(|c| c.charged_bytes as f64)),
        ("vgpu_container_nvml_memory_bytes", "NVML's per-process used memory summed over the container (bytes)", &ours, Box::new(|c| c.nvml_bytes as f64)),
        ("vgpu_container_limit_bytes", "the container's memory limit (bytes, 0 = none)", &ours, Box::new(|c| c.limit_bytes as f64)),
        ("vgpu_container_launches_per_second", "kernel launches per second (launch probes on)", &ours, Box::new(|c| c.launches_per_s)),
        ("vgpu_container_throttled_seconds", "time the shim held the container's launches back", &ours, Box::new(|c| c.throttled_ms as f64 / 1000.0)),
        ("vgpu_container_over_limit", "1 while the uprobes see the container past its limit", &ours, Box::new(|c| c.over_limit as u8 as f64)),
        ("vgpu_container_warnings", "number of warnings on the container (see vgpu-agent status)", &ours, Box::new(|c| c.warnings.len() as f64)),
    ];
    for (name, help, lf, vf) in &families {
        o.family(name, "gauge", help);
        for c in &r.containers {
            let l = lf(c);
            let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
            o.sample(name, &l, vf(c));
        }
    }
    o.family("vgpu_process_ebpf_memory_bytes", "gauge", "device memory the uprobes saw a process hold (bytes)");
    for c in &r.containers {
        for p in &c.pids {
            let pid = p.pid.to_string();
            o.sample("vgpu_process_ebpf_memory_bytes", &[("pid", &pid), ("cgroup", &c.key)], p.ebpf_bytes as f64);
        }
    }
    if let Some(a) = &r.agent {
        let counters: [(&str, &str, f64); 5] = [
            ("vgpu_agent_events_total", "uprobe events processed", a.events as f64),
            ("vgpu_agent_dropped_events_total", "uprobe events lost to a full ring buffer", a.dropped_events as f64),
            ("vgpu_agent_violations_total", "times a container went past its limit", a.violations as f64),
            ("vgpu_agent_kills_total", "processes killed under the enforce policy", a.kills.len() as f64),
            ("vgpu_agent_reclaimed_bytes_total", "bytes reclaimed from dead processes' cache slots", a.reclaimed_bytes as f64),
        ];
        for (n, h, v) in counters {
            o.family(n, "counter", h);
            o.sample(n, &[], v);
        }
        o.family("vgpu_agent_libcuda_files", "gauge", "libcuda files probed");
        o.sample("vgpu_agent_libcuda_files", &[], a.libcuda_files.len() as f64);
    }
    o.0
}
