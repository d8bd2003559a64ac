//! Pod and node annotations (HAMi wire formats). Owned by the scheduler work; see HAMI-NOTES.md.
//!
//! The device-list codec is shared by the scheduler (which writes `vgpu-devices-to-allocate` at
//! filter) and the agent (which reads it at Allocate and writes `vgpu-devices-allocated`), so both
//! sides agree on every byte: `UUID,NVIDIA,<MiB>,<cores>:` per device, `;` per container, containers
//! in pod order with init containers first and an empty `;` for a container without GPUs.

use std::fmt;

/// Resource names a pod's containers request (limits).
pub const RESOURCE_GPU: &str = "nvidia.com/gpu";
pub const RESOURCE_GPUMEM: &str = "nvidia.com/gpumem";
pub const RESOURCE_GPUMEM_PERCENTAGE: &str = "nvidia.com/gpumem-percentage";
pub const RESOURCE_GPUCORES: &str = "nvidia.com/gpucores";
pub const RESOURCE_PRIORITY: &str = "nvidia.com/priority";

/// Pod annotations a user may set.
pub const USE_GPUTYPE: &str = "nvidia.com/use-gputype";
pub const NOUSE_GPUTYPE: &str = "nvidia.com/nouse-gputype";
pub const USE_GPUUUID: &str = "nvidia.com/use-gpuuuid";
pub const NOUSE_GPUUUID: &str = "nvidia.com/nouse-gpuuuid";
pub const NODE_SCHEDULER_POLICY: &str = "hami.io/node-scheduler-policy";
pub const GPU_SCHEDULER_POLICY: &str = "hami.io/gpu-scheduler-policy";

/// Pod annotations written by the scheduler and the agent.
pub const VGPU_NODE: &str = "hami.io/vgpu-node";
pub const VGPU_TIME: &str = "hami.io/vgpu-time";
pub const BIND_PHASE: &str = "hami.io/bind-phase";
pub const BIND_TIME: &str = "hami.io/bind-time";
pub const DEVICES_TO_ALLOCATE: &str = "hami.io/vgpu-devices-to-allocate";
pub const DEVICES_ALLOCATED: &str = "hami.io/vgpu-devices-allocated";

/// Node annotations.
pub const NODE_REGISTER: &str = "hami.io/node-nvidia-register";
pub const NODE_HANDSHAKE: &str = "hami.io/node-handshake";
pub const NODE_LOCK: &str = "hami.io/mutex.lock";
/// Comma list of card UUIDs no new pod may be placed on (HAMi ≥ 2.10); running pods stay.
pub const DEVICE_CORDON: &str = "hami.io/device-cordon";

/// The vendor word HAMi writes in the second field of every NVIDIA device entry.
pub const VENDOR_NVIDIA: &str = "NVIDIA";

/// `hami.io/bind-phase` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindPhase {
    Allocating,
    Success,
    Failed,
}

impl BindPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            BindPhase::Allocating => "allocating",
            BindPhase::Success => "success",
            BindPhase::Failed => "failed",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "allocating" => Some(BindPhase::Allocating),
            "success" => Some(BindPhase::Success),
            "failed" => Some(BindPhase::Failed),
            _ => None,
        }
    }
}

/// One vGPU of one container: which card, how much of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerDevice {
    pub uuid: String,
    /// The vendor word (`NVIDIA`), not the model.
    pub vendor: String,
    pub mem_mib: u64,
    pub cores: u32,
}

impl ContainerDevice {
    pub fn nvidia(uuid: impl Into<String>, mem_mib: u64, cores: u32) -> Self {
        ContainerDevice {
            uuid: uuid.into(),
            vendor: VENDOR_NVIDIA.to_string(),
            mem_mib,
            cores,
        }
    }
}

/// The devices of every container of a pod, in pod order (init containers first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodDevices(pub Vec<Vec<ContainerDevice>>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceListError {
    pub input: String,
    pub reason: String,
}

impl fmt::Display for DeviceListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad device list {:?}: {}", self.input, self.reason)
    }
}

impl std::error::Error for DeviceListError {}

impl PodDevices {
    /// Every device of every container, flattened.
    pub fn devices(&self) -> impl Iterator<Item = &ContainerDevice> {
        self.0.iter().flatten()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Vec::is_empty)
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        for container in &self.0 {
            for d in container {
                out.push_str(&format!(
                    "{},{},{},{}:",
                    d.uuid, d.vendor, d.mem_mib, d.cores
                ));
            }
            out.push(';');
        }
        out
    }

    /// Parses the wire form. An empty string means no containers; every container must be
    /// closed by `;` so a truncated annotation is an error rather than a silently shorter list.
    pub fn decode(input: &str) -> Result<Self, DeviceListError> {
        let err = |reason: String| DeviceListError {
            input: input.to_string(),
            reason,
        };
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Ok(PodDevices::default());
        }
        if !trimmed.ends_with(';') {
            return Err(err("the last container is not closed by ';'".into()));
        }
        let mut containers = Vec::new();
        for chunk in trimmed[..trimmed.len() - 1].split(';') {
            let mut devices = Vec::new();
            if !chunk.is_empty() {
                if !chunk.ends_with(':') {
                    return Err(err(format!("device entry {chunk:?} is not closed by ':'")));
                }
                for entry in chunk[..chunk.len() - 1].split(':') {
                    devices.push(decode_device(entry).map_err(err)?);
                }
            }
            containers.push(devices);
        }
        Ok(PodDevices(containers))
    }
}

fn decode_device(entry: &str) -> Result<ContainerDevice, String> {
    let fields: Vec<&str> = entry.split(',').collect();
    if fields.len() != 4 {
        return Err(format!(
            "device entry {entry:?} has {} fields, want UUID,VENDOR,MiB,cores",
            fields.len()
        ));
    }
    if fields[0].is_empty() {
        return Err(format!("device entry {entry:?} has an empty UUID"));
    }
    let mem_mib = fields[2].parse::<u64>().map_err(|_| {
        format!(
            "device entry {entry:?}: memory {:?} is not a whole number of MiB",
            fields[2]
        )
    })?;
    let cores = fields[3].parse::<u32>().map_err(|_| {
        format!(
            "device entry {entry:?}: cores {:?} is not a whole percentage",
            fields[3]
        )
    })?;
    Ok(ContainerDevice {
        uuid: fields[0].to_string(),
        vendor: fields[1].to_string(),
        mem_mib,
        cores,
    })
}

impl fmt::Display for PodDevices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_annotation_round_trips() {
        let s = "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039,NVIDIA,4000,0:;";
        let pd = PodDevices::decode(s).unwrap();
        assert_eq!(
            pd.0,
            vec![vec![ContainerDevice::nvidia(
                "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039",
                4000,
                0
            )]]
        );
        assert_eq!(pd.encode(), s);
    }

    #[test]
    fn two_gpus_and_an_empty_container_keep_their_places() {
        let pd = PodDevices(vec![
            vec![],
            vec![
                ContainerDevice::nvidia("GPU-a", 4000, 30),
                ContainerDevice::nvidia("GPU-b", 4000, 30),
            ],
        ]);
        let s = pd.encode();
        assert_eq!(s, ";GPU-a,NVIDIA,4000,30:GPU-b,NVIDIA,4000,30:;");
        assert_eq!(PodDevices::decode(&s).unwrap(), pd);
    }

    #[test]
    fn emptied_list_is_one_empty_container() {
        assert_eq!(PodDevices::decode(";").unwrap(), PodDevices(vec![vec![]]));
        assert!(PodDevices::decode("").unwrap().is_empty());
    }

    #[test]
    fn malformed_lists_are_refused_with_the_reason() {
        let e = PodDevices::decode("GPU-a,NVIDIA,4000,0:").unwrap_err();
        assert!(e.reason.contains("not closed by ';'"), "{e}");
        let e = PodDevices::decode("GPU-a,NVIDIA,4000;").unwrap_err();
        assert!(e.reason.contains("not closed by ':'"), "{e}");
        let e = PodDevices::decode("GPU-a,NVIDIA,lots,0:;").unwrap_err();
        assert!(e.reason.contains("memory"), "{e}");
        let e = PodDevices::decode("GPU-a,NVIDIA,4000:;").unwrap_err();
        assert!(e.reason.contains("3 fields"), "{e}");
    }

    #[test]
    fn bind_phase_words() {
        for p in [BindPhase::Allocating, BindPhase::Success, BindPhase::Failed] {
            assert_eq!(BindPhase::parse(p.as_str()), Some(p));
        }
        assert_eq!(BindPhase::parse("Allocating"), None);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn device() -> impl Strategy<Value = ContainerDevice> {
            (
                "GPU-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}",
                any::<u64>(),
                0u32..=100,
            )
                .prop_map(|(uuid, mem_mib, cores)| ContainerDevice::nvidia(uuid, mem_mib, cores))
        }

        proptest! {
            /// Whatever the shape (empty containers included), decode(encode(x)) is x, so the
            /// agent reads exactly what the scheduler wrote.
            #[test]
            fn device_lists_round_trip(pd in prop::collection::vec(prop::collection::vec(device(), 0..4), 0..5)) {
                let pd = PodDevices(pd);
                prop_assert_eq!(PodDevices::decode(&pd.encode()).unwrap(), pd);
            }

            /// Arbitrary text never panics the decoder.
            #[test]
            fn decoding_garbage_fails_cleanly(s in ".{0,64}") {
                let _ = PodDevices::decode(&s);
            }
        }
    }
}
