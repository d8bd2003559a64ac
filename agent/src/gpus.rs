//! GPUs and their per-process memory through NVML (libnvidia-ml loaded at run time, so the agent starts
//! and works on a machine without a GPU or driver: it then reports no GPUs and says why).

use std::ffi::OsStr;

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct GpuSample {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total: u64,
    pub memory_used: u64,
    /// Percent of time a kernel ran over NVML's last sample period.
    pub utilization: u32,
    /// (host pid, bytes) from nvmlDeviceGetComputeRunningProcesses, CUDA context included.
    pub processes: Vec<(u32, u64)>,
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
                Some(GpuSample {
                    index: i,
                    uuid: d.uuid().unwrap_or_default(),
                    name: d.name().unwrap_or_default(),
                    memory_total: mem.as_ref().map_or(0, |m| m.total),
                    memory_used: mem.as_ref().map_or(0, |m| m.used),
                    utilization: d.utilization_rates().map_or(0, |u| u.gpu),
                    processes,
                })
            })
            .collect()
    }
}
