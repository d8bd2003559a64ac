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
