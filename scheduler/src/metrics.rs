//! The scheduler's allocation metrics under HAMi's current names, labels and units, so HAMi's
//! dashboards read them unchanged: `_bytes` in bytes, core `_ratio`s on a 0-100 scale, the
//! node memory ratio on 0-1, and the constant label `zone="vGPU"` HAMi adds to all of them.
//! These count reservations; what containers really use is the agent's to report (HAMi #977).

use crate::placement::ledger::Ledger;
use std::fmt::Write;

const MIB: u64 = 1 << 20;

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Family {
    name: &'static str,
    help: &'static str,
    lines: Vec<String>,
}

impl Family {
    fn new(name: &'static str, help: &'static str) -> Self {
        Family {
            name,
            help,
            lines: Vec::new(),
        }
    }

    fn push(&mut self, labels: &[(&str, &str)], value: f64) {
        let mut s = format!("{}{{", self.name);
        for (k, v) in labels {
            let _ = write!(s, "{k}=\"{}\",", esc(v));
        }
        let _ = write!(s, "zone=\"vGPU\"}} {value}");
        self.lines.push(s);
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} gauge",
            self.name, self.help, self.name
        );
        for l in &self.lines {
            out.push_str(l);
            out.push('\n');
        }
    }
}

/// The Prometheus text exposition of the ledger, sorted so scrapes diff cleanly.
pub fn render(ledger: &Ledger) -> String {
    let mut mem_limit = Family::new(
        "hami_gpu_memory_limit_bytes",
        "Device memory limit for a certain GPU",
    );
    let mut core_limit = Family::new(
        "hami_gpu_core_limit_ratio",
        "Device core limit for a certain GPU",
    );
    let mut mem_alloc = Family::new(
        "hami_gpu_memory_allocated_bytes",
        "Device memory allocated for a certain GPU",
    );
    let mut shared = Family::new(
        "hami_gpu_shared_count",
        "Number of containers sharing this GPU",
    );
    let mut core_alloc = Family::new(
        "hami_gpu_core_allocated_ratio",
        "Device core allocated for a certain GPU",
    );
    let mut mem_ratio = Family::new(
        "hami_node_gpu_memory_allocated_ratio",
        "GPU Memory Allocated Percentage on a certain GPU",
    );
    let mut vmem = Family::new(
        "hami_vgpu_memory_allocated_bytes",
        "vGPU memory allocated from a container",
    );
    let mut vcore = Family::new(
        "hami_vgpu_core_allocated_ratio",
        "vGPU core allocated from a container",
    );

    let mut nodes: Vec<_> = ledger.nodes().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    for n in nodes {
        for (c, u) in n.cards.iter().zip(&n.usage) {
            let idx = c.index.to_string();
            let base = [
                ("node", n.name.as_str()),
                ("device_uuid", c.uuid.as_str()),
                ("device_index", idx.as_str()),
                ("device_type", c.kind.as_str()),
            ];
            mem_limit.push(&base, (c.mem_mib * MIB) as f64);
            core_limit.push(&base, f64::from(c.cores));
            let cores = u.cores.to_string();
            mem_alloc.push(
                &[
                    base[0],
                    base[1],
                    base[2],
                    ("device_cores", cores.as_str()),
                    base[3],
                ],
                (u.mem_mib * MIB) as f64,
            );
            shared.push(&base, f64::from(u.slots));
            core_alloc.push(&base, f64::from(u.cores));
            if c.mem_mib > 0 {
                mem_ratio.push(&base, u.mem_mib as f64 / c.mem_mib as f64);
            }
        }
    }
    let mut pods: Vec<_> = ledger.placements().map(|(_, p)| p).collect();
    pods.sort_by(|a, b| a.pod.cmp(&b.pod));
    for p in pods {
        let (ns, name) = p.pod.split_once('/').unwrap_or(("", p.pod.as_str()));
        for (ci, container) in p.devices.0.iter().enumerate() {
            let ci = ci.to_string();
            for d in container {
                let labels = [
                    ("namespace", ns),
                    ("node", p.node.as_str()),
                    ("pod", name),
                    ("container_index", ci.as_str()),
                    ("device_uuid", d.uuid.as_str()),
                ];
                vmem.push(&labels, (d.mem_mib * MIB) as f64);
                vcore.push(&labels, f64::from(d.cores));
            }
        }
    }
    let mut out = String::new();
    for f in [
        &mem_limit,
        &core_limit,
        &mem_alloc,
        &shared,
        &core_alloc,
        &mem_ratio,
        &vmem,
        &vcore,
    ] {
        f.render(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::ledger::Placement;
    use vgpu_contract::annotations::PodDevices;
    use vgpu_contract::register::DeviceInfo;

    #[test]
    fn lab_card_with_two_slices() {
        let mut l = Ledger::default();
        let t4 = DeviceInfo {
            id: "GPU-859b".into(),
            count: 10,
            devmem: 15360,
            devcore: 100,
            kind: "NVIDIA-Tesla T4".into(),
            health: true,
            ..Default::default()
        };
        l.upsert_node("hami-workshop", vec![t4]);
        for (uid, pod) in [("a", "default/gpumem-pod-a"), ("b", "default/gpumem-pod-b")] {
            let devices = PodDevices::decode("GPU-859b,NVIDIA,4000,30:;").unwrap();
            l.record(uid, Placement::as_asked(pod, "hami-workshop", devices));
        }
        let text = render(&l);
        let base = r#"node="hami-workshop",device_uuid="GPU-859b",device_index="0",device_type="NVIDIA-Tesla T4",zone="vGPU""#;
        for want in [
            format!("hami_gpu_memory_limit_bytes{{{base}}} 16106127360"),
            format!("hami_gpu_core_limit_ratio{{{base}}} 100"),
            r#"hami_gpu_memory_allocated_bytes{node="hami-workshop",device_uuid="GPU-859b",device_index="0",device_cores="60",device_type="NVIDIA-Tesla T4",zone="vGPU"} 8388608000"#.to_string(),
            format!("hami_gpu_shared_count{{{base}}} 2"),
            format!("hami_gpu_core_allocated_ratio{{{base}}} 60"),
            format!("hami_node_gpu_memory_allocated_ratio{{{base}}} 0.5208333333333334"),
            r#"hami_vgpu_memory_allocated_bytes{namespace="default",node="hami-workshop",pod="gpumem-pod-a",container_index="0",device_uuid="GPU-859b",zone="vGPU"} 4194304000"#.to_string(),
            r#"hami_vgpu_core_allocated_ratio{namespace="default",node="hami-workshop",pod="gpumem-pod-b",container_index="0",device_uuid="GPU-859b",zone="vGPU"} 30"#.to_string(),
            "# TYPE hami_gpu_shared_count gauge".to_string(),
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want}\n{text}");
        }
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
