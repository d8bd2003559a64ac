//! GPUs and their per-process memory through NVML (libnvidia-ml loaded at run time, so the agent starts
//! and works on a machine without a GPU or driver: it then reports no GPUs and says why).

use std::ffi::OsStr;

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;
use serde::Serialize;

use crate::observe::report::GpuReport;

/// One GPU as NVML shows it: what the report prints, plus the per-process figures the agent attributes.
#[derive(Debug, Clone, Serialize)]
pub struct GpuSample {
    pub gpu: GpuReport,
    /// (host pid, bytes) from nvmlDeviceGetComputeRunningProcesses, CUDA context included.
    pub processes: Vec<(u32, u64)>,
    /// (host pid, SM utilization percent): the latest of NVML's per-process samples of the last second.
    pub sm_util: Vec<(u32, u32)>,
    /// (host pid, unix µs): the newest sample of the last second in which the process had a kernel running.
    pub sm_busy_at: Vec<(u32, u64)>,
}

pub struct Gpus {
    nvml: Option<Nvml>,
    pub error: Option<String>,
}

impl Gpus {
    pub fn open() -> Self {
        let mut last = String::new();
        // The default name first; then where GPU operator and driver containers put the library.
        for lib in [
            "libnvidia-ml.so",
            "libnvidia-ml.so.1",
            "/usr/local/nvidia/lib64/libnvidia-ml.so.1",
        ] {
            match Nvml::builder().lib_path(OsStr::new(lib)).init() {
                Ok(nvml) => {
                    return Self {
                        nvml: Some(nvml),
                        error: None,
                    }
                }
                Err(e) => last = format!("NVML unavailable ({lib}: {e})"),
            }
        }
        Self {
            nvml: None,
            error: Some(last),
        }
    }

    pub fn sample(&self) -> Vec<GpuSample> {
        let Some(nvml) = &self.nvml else {
            return vec![];
        };
        let n = nvml.device_count().unwrap_or(0);
        (0..n)
            .filter_map(|i| {
                let d = nvml.device_by_index(i).ok()?;
                let mem = d.memory_info().ok();
                let processes = d
                    .running_compute_processes()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| {
                        (
                            p.pid,
                            if let UsedGpuMemory::Used(b) = p.used_gpu_memory {
                                b
                            } else {
                                0
                            },
                        )
                    })
                    .collect();
                // NVML buffers samples for a while; the last second's are the current ones (timestamps in µs).
                let since = crate::ledger::state::unix_us().saturating_sub(1_000_000);
                let mut latest: std::collections::HashMap<u32, (u64, u32)> = Default::default();
                let mut busy_at: std::collections::HashMap<u32, u64> = Default::default();
                for s in d.process_utilization_stats(since).unwrap_or_default() {
                    let e = latest.entry(s.pid).or_insert((0, 0));
                    if s.timestamp >= e.0 {
                        *e = (s.timestamp, s.sm_util);
                    }
                    if s.sm_util > 0 {
                        let b = busy_at.entry(s.pid).or_default();
                        *b = (*b).max(s.timestamp);
                    }
                }
                Some(GpuSample {
                    gpu: GpuReport {
                        index: i,
                        uuid: d.uuid().unwrap_or_default(),
                        name: d.name().unwrap_or_default(),
                        memory_total: mem.as_ref().map_or(0, |m| m.total),
                        memory_used: mem.as_ref().map_or(0, |m| m.used),
                        utilization: d.utilization_rates().map_or(0, |u| u.gpu),
                    },
                    processes,
                    sm_util: latest.into_iter().map(|(pid, (_, u))| (pid, u)).collect(),
                    sm_busy_at: busy_at.into_iter().collect(),
                })
            })
            .collect()
    }
}

/// A physical GPU as the node side registers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    pub uuid: String,
    pub index: u32,
    /// NVML's name (`NVIDIA H200`).
    pub name: String,
    pub memory_mib: u64,
    pub numa: u32,
    pub healthy: bool,
    /// Why it is unhealthy (an XID, a lost handle), for the log.
    pub reason: Option<String>,
}

/// XIDs that report an application's own fault (a bad kernel, a reset it asked for), not the card's; NVIDIA's
/// device plugin ignores the same ones, so one tenant's crash does not take the card from every neighbour.
const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

pub fn xid_marks_unhealthy(xid: u64) -> bool {
    !APPLICATION_XIDS.contains(&xid)
}

/// The NUMA node of a PCI device from sysfs (`-1`, a machine without NUMA, reads as 0 as in HAMi).
fn numa_of(bus_id: &str) -> u32 {
    // NVML writes the domain with 8 digits (00000000:3B:00.0); sysfs with 4 and in lower case.
    let id = bus_id.to_ascii_lowercase();
    let id = id
        .strip_prefix("0000")
        .filter(|s| s.len() == 12)
        .unwrap_or(&id);
    std::fs::read_to_string(format!("/sys/bus/pci/devices/{id}/numa_node"))
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .unwrap_or(0) as u32
}

fn read_cards(nvml: &Nvml) -> Vec<Card> {
    let n = nvml.device_count().unwrap_or(0);
    (0..n)
        .filter_map(|i| {
            let d = nvml.device_by_index(i).ok()?;
            Some(Card {
                uuid: d.uuid().ok()?,
                index: i,
                name: d.name().unwrap_or_default(),
                memory_mib: d.memory_info().map_or(0, |m| m.total >> 20),
                numa: d.pci_info().map_or(0, |p| numa_of(&p.bus_id)),
                healthy: true,
                reason: None,
            })
        })
        .collect()
}

/// Keeps `tx` holding the node's cards and their health until every receiver is gone: a card whose handle
/// calls fail is unhealthy while they fail (a lost GPU), one that reported a critical XID stays unhealthy until
/// the agent restarts (the card needs a reset). Runs on a thread of its own: NVML calls block.
pub fn watch_cards(tx: tokio::sync::watch::Sender<Vec<Card>>, period: std::time::Duration) {
    use nvml_wrapper::bitmasks::event::EventTypes;
    let nvml = loop {
        match Gpus::open().nvml {
            Some(n) => break n,
            None => {
                tracing::warn!("NVML unavailable: no GPUs to offer the kubelet; retrying in 10 s");
                if tx.is_closed() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_secs(10));
            }
        }
    };
    let mut cards = read_cards(&nvml);
    tracing::info!(
        "{} GPU(s): {}",
        cards.len(),
        cards
            .iter()
            .map(|c| format!("{} {} {} MiB", c.uuid, c.name, c.memory_mib))
            .collect::<Vec<_>>()
            .join(", ")
    );
    tx.send_replace(cards.clone());
    let mut events = nvml.create_event_set().ok();
    for c in &cards {
        let Ok(d) = nvml.device_by_uuid(c.uuid.as_str()) else {
            continue;
        };
        if let Some(set) = events.take() {
            events = match d.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(
                        "no XID events from {} ({e}): health from handle calls only",
                        c.uuid
                    );
                    nvml.create_event_set().ok()
                }
            };
        }
    }
    let mut xid_failed: std::collections::HashMap<String, String> = Default::default();
    while !tx.is_closed() {
        match &events {
            Some(set) => {
                if let Ok(ev) = set.wait(period.as_millis() as u32) {
                    if let (Ok(uuid), Some(xid)) = (ev.device.uuid(), ev.event_data) {
                        let code = match xid {
                            nvml_wrapper::enums::event::XidError::Value(v) => v,
                            nvml_wrapper::enums::event::XidError::Unknown => 999,
                        };
                        if xid_marks_unhealthy(code) {
                            tracing::error!("GPU {uuid}: critical XID {code}: marked unhealthy");
                            xid_failed.insert(uuid, format!("critical XID {code}"));
                        } else {
                            tracing::warn!("GPU {uuid}: XID {code} (an application's fault): card stays healthy");
                        }
                    }
                }
            }
            None => std::thread::sleep(period),
        }
        let mut now = cards.clone();
        for c in &mut now {
            let lost = nvml
                .device_by_uuid(c.uuid.as_str())
                .and_then(|d| d.memory_info())
                .err();
            (c.healthy, c.reason) = match (xid_failed.get(&c.uuid), lost) {
                (Some(r), _) => (false, Some(r.clone())),
                (None, Some(e)) => (false, Some(format!("NVML calls fail: {e}"))),
                (None, None) => (true, None),
            };
        }
        if now != cards {
            for c in &now {
                if !c.healthy {
                    tracing::warn!(
                        "GPU {} unhealthy: {}",
                        c.uuid,
                        c.reason.as_deref().unwrap_or("")
                    );
                }
            }
            cards = now;
            tx.send_replace(cards.clone());
        }
    }
}
