//! Reading the placement library's inputs out of Kubernetes objects: a pod's request (resource
//! limits and annotations), a node's registered cards, and where an already placed pod sits.

use crate::placement::ledger::{Ask, Placement};
use crate::placement::policy::UnknownPolicy;
use crate::placement::request::DefaultMemory;
use crate::placement::request::{CardFilter, ContainerRequest, MemRequest, PodRequest};
use k8s_openapi::api::core::v1::{Container, Node, Pod};
use std::fmt;
use vgpu_contract::annotations as ann;
use vgpu_contract::register::{self, DeviceInfo};

/// A request the scheduler cannot act on, with the words a user needs to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError(pub String);

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RequestError {}

pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// The UID when the pod has one (always, from the API); `namespace/name` otherwise, which is
/// what a hand-written List file gives `simulate`.
pub fn pod_uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_else(|| pod_key(pod))
}

fn containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    let init = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default();
    let main = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    init.iter().chain(main)
}

/// A resource as a whole number, from limits, else requests (HAMi reads limits first).
fn resource(c: &Container, name: &str) -> Result<Option<u64>, RequestError> {
    let r = c.resources.as_ref();
    let q = r
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get(name))
        .or_else(|| {
            r.and_then(|r| r.requests.as_ref())
                .and_then(|l| l.get(name))
        });
    match q {
        None => Ok(None),
        Some(q) => crate::quantity::whole(&q.0).map(Some).ok_or_else(|| {
            RequestError(format!(
                "container {:?}: {name} is {:?}, want a whole number",
                c.name, q.0
            ))
        }),
    }
}

fn resource_present(c: &Container, name: &str) -> bool {
    let r = c.resources.as_ref();
    r.and_then(|r| r.limits.as_ref())
        .is_some_and(|l| l.contains_key(name))
        || r.and_then(|r| r.requests.as_ref())
            .is_some_and(|l| l.contains_key(name))
}

/// `nvidia.com/gpumem` is a count of MiB, but Kubernetes accepts `16Gi` there and means 16 × 2³⁰
/// of them; a binary suffix is always that mistake.
fn check_gpumem_unit(c: &Container) -> Result<(), RequestError> {
    let r = c.resources.as_ref();
    let q = r
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get(ann::RESOURCE_GPUMEM))
        .or_else(|| {
            r.and_then(|r| r.requests.as_ref())
                .and_then(|l| l.get(ann::RESOURCE_GPUMEM))
        });
    let Some(q) = q else { return Ok(()) };
    let text = q.0.trim();
    let Some(suffix) = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
        .into_iter()
        .find(|s| text.ends_with(s))
    else {
        return Ok(());
    };
    let number = text.trim_end_matches(suffix);
    let hint = match (suffix, number.parse::<u64>()) {
        ("Gi", Ok(n)) => format!(" (for {n} GiB write {})", n.saturating_mul(1024)),
        ("Mi", Ok(n)) => format!(" (for {n} MiB write {n})"),
        _ => String::new(),
    };
    Err(RequestError(format!(
        "container {:?}: {} is {text:?}, but its unit is MiB, so that asks for {text} MiB; give a plain number of MiB{hint}",
        c.name,
        ann::RESOURCE_GPUMEM
    )))
}

fn container_request(c: &Container, default_cores: u32) -> Result<ContainerRequest, RequestError> {
    check_gpumem_unit(c)?;
    let gpus = resource(c, ann::RESOURCE_GPU)?;
    let mem = resource(c, ann::RESOURCE_GPUMEM)?;
    let pct = resource(c, ann::RESOURCE_GPUMEM_PERCENTAGE)?;
    let cores = resource(c, ann::RESOURCE_GPUCORES)?;
    let name = &c.name;
    if gpus.unwrap_or(0) == 0 {
        if let Some((what, _)) = [
            (ann::RESOURCE_GPUMEM, mem),
            (ann::RESOURCE_GPUMEM_PERCENTAGE, pct),
            (ann::RESOURCE_GPUCORES, cores),
        ]
        .into_iter()
        .find(|(_, v)| v.is_some())
        {
            return Err(RequestError(format!(
                "container {name:?} sets {what} without {}: say how many vGPUs it needs",
                ann::RESOURCE_GPU
            )));
        }
        return Ok(ContainerRequest::NONE);
    }
    // 0 MiB or 0 % is "unset" in HAMi: the default memory applies.
    let mem = mem.filter(|m| *m > 0);
    let pct_given = pct.is_some();
    let pct = pct.filter(|p| *p > 0);
    let mem = match (mem, pct) {
        (Some(_), Some(_)) => {
            return Err(RequestError(format!(
                "container {name:?} sets both {} and {}: give one",
                ann::RESOURCE_GPUMEM,
                ann::RESOURCE_GPUMEM_PERCENTAGE
            )))
        }
        (Some(m), None) => MemRequest::MiB(m),
        (None, Some(p)) if p > 100 => {
            return Err(RequestError(format!(
                "container {name:?}: {} is {p}, want 0 to 100 (0: the default memory)",
                ann::RESOURCE_GPUMEM_PERCENTAGE
            )))
        }
        (None, Some(p)) => MemRequest::Percent(p as u32),
        (None, None) => MemRequest::Default,
    };
    // HAMi (≥ 2.7) gives a container that asks for whole cards (no gpumem, or a gpumem-percentage
    // of 100) all of each card's compute, so nothing else shares it; gpumem: 0 or a percentage
    // of 0 is an explicit memory request and keeps cores at 0.
    let whole_card = match pct {
        Some(p) => p == 100,
        None => !pct_given && !resource_present(c, ann::RESOURCE_GPUMEM),
    };
    let cores = match cores {
        Some(c) => c,
        None if whole_card => 100,
        None => u64::from(default_cores),
    };
    if cores > 100 {
        return Err(RequestError(format!(
            "container {name:?}: {} is {cores}, want 0 to 100 (percent of one card)",
            ann::RESOURCE_GPUCORES
        )));
    }
    let gpus = u32::try_from(gpus.unwrap_or(0)).map_err(|_| {
        RequestError(format!(
            "container {name:?}: {} is too large",
            ann::RESOURCE_GPU
        ))
    })?;
    Ok(ContainerRequest {
        gpus,
        mem,
        cores: cores as u32,
    })
}

fn policy_annotation<P: std::str::FromStr<Err = UnknownPolicy>>(
    pod: &Pod,
    key: &str,
) -> Result<Option<P>, RequestError> {
    match pod.metadata.annotations.as_ref().and_then(|a| a.get(key)) {
        None => Ok(None),
        Some(v) => v
            .parse::<P>()
            .map(Some)
            .map_err(|e| RequestError(format!("annotation {key}: {e}"))),
    }
}

fn init_count(pod: &Pod) -> usize {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .map_or(0, Vec::len)
}

/// The pod's vGPU request, or `Ok(None)` when it asks for no vGPU at all (no default cores: what the
/// webhook checks).
pub fn pod_request(pod: &Pod) -> Result<Option<PodRequest>, RequestError> {
    pod_request_with(pod, 0)
}

/// As [`pod_request`], a container that sets no gpucores and asks for less than whole cards getting
/// `default_cores` (HAMi's `scheduler.defaultCores`).
pub fn pod_request_with(pod: &Pod, default_cores: u32) -> Result<Option<PodRequest>, RequestError> {
    let containers = containers(pod)
        .map(|c| container_request(c, default_cores))
        .collect::<Result<Vec<_>, _>>()?;
    if !containers.iter().any(|c| c.gpus > 0) {
        return Ok(None);
    }
    let a = pod.metadata.annotations.as_ref();
    let get = |k: &str| a.and_then(|a| a.get(k)).map(String::as_str).unwrap_or("");
    let filter = CardFilter {
        use_types: CardFilter::list(get(ann::USE_GPUTYPE), true),
        nouse_types: CardFilter::list(get(ann::NOUSE_GPUTYPE), true),
        use_uuids: CardFilter::list(get(ann::USE_GPUUUID), false),
        nouse_uuids: CardFilter::list(get(ann::NOUSE_GPUUUID), false),
        ..Default::default()
    };
    Ok(Some(PodRequest {
        containers,
        init: init_count(pod),
        filter,
        node_policy: policy_annotation(pod, ann::NODE_SCHEDULER_POLICY)?,
        gpu_policy: policy_annotation(pod, ann::GPU_SCHEDULER_POLICY)?,
    }))
}

/// The cards a node registered, `Ok(None)` when it carries no register annotation.
pub fn node_devices(node: &Node) -> Result<Option<Vec<DeviceInfo>>, register::RegisterError> {
    match node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ann::NODE_REGISTER))
    {
        None => Ok(None),
        Some(v) => register::decode(v).map(Some),
    }
}

/// The UUIDs in the node's `hami.io/device-cordon` (blanks and stray commas skipped, as HAMi does).
pub fn node_cordoned(node: &Node) -> Vec<String> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ann::DEVICE_CORDON))
        .map(|v| CardFilter::list(v, false))
        .unwrap_or_default()
}

/// A pod that no longer holds its devices: finished, whatever its annotations say.
pub fn pod_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

/// Why a pod's annotations cannot be booked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementError {
    Devices(ann::DeviceListError),
    /// The spec asks for nothing the annotations could stand for, or cannot be read.
    Spec(String),
}

impl fmt::Display for PlacementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlacementError::Devices(e) => write!(f, "{e}"),
            PlacementError::Spec(e) => f.write_str(e),
        }
    }
}

impl From<ann::DeviceListError> for PlacementError {
    fn from(e: ann::DeviceListError) -> Self {
        PlacementError::Devices(e)
    }
}

/// Where a placed pod's vGPUs are, from the annotations the scheduler and agent wrote. The
/// agent's `vgpu-devices-allocated` wins once written; before that the scheduler's
/// `vgpu-devices-to-allocate` says what was reserved.
///
/// Annotations are not proof: anyone who can patch a pod can write them. So a pod is booked only
/// if its spec asks for vGPUs, and never for more than that (the ledger clamps each device to
/// the spec's [`Ask`]); `default_mem` resolves a spec that names no memory.
pub fn pod_placement(
    pod: &Pod,
    default_mem: DefaultMemory,
    default_cores: u32,
) -> Result<Option<Placement>, PlacementError> {
    if pod_finished(pod) {
        return Ok(None);
    }
    let Some(a) = pod.metadata.annotations.as_ref() else {
        return Ok(None);
    };
    let bound = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
    if !bound && a.get(ann::BIND_PHASE).map(String::as_str) == Some(ann::BindPhase::Failed.as_str())
    {
        // A bind that failed before the pod reached a node: its annotations are leftovers of
        // that attempt and hold nothing (a new filter may already have reserved elsewhere).
        return Ok(None);
    }
    let Some(node) = a
        .get(ann::VGPU_NODE)
        .cloned()
        .or_else(|| pod.spec.as_ref().and_then(|s| s.node_name.clone()))
    else {
        return Ok(None);
    };
    let allocated = a
        .get(ann::DEVICES_ALLOCATED)
        .map(|s| ann::PodDevices::decode(s))
        .transpose()?;
    let devices = match allocated {
        Some(d) if !d.is_empty() => d,
        _ => match a.get(ann::DEVICES_TO_ALLOCATE) {
            Some(s) => ann::PodDevices::decode(s)?,
            None => return Ok(None),
        },
    };
    if devices.is_empty() {
        return Ok(None);
    }
    let req = match pod_request_with(pod, default_cores) {
        Ok(Some(r)) => r,
        Ok(None) => {
            return Err(PlacementError::Spec(
                "it carries a vGPU device annotation but its spec asks for no vGPU; not booked"
                    .into(),
            ))
        }
        Err(e) => {
            return Err(PlacementError::Spec(format!(
                "its vGPU request cannot be read ({e}); not booked"
            )))
        }
    };
    Ok(Some(Placement {
        pod: pod_key(pod),
        node,
        devices,
        init: req.init,
        asked: Ask::all(&req, default_mem),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::policy::GpuPolicy;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn lab_pod_reads_as_one_4000_mib_vgpu() {
        let p = pod(include_str!("../../deploy/examples/gpumem-pod-a.yaml"));
        let r = pod_request(&p).unwrap().unwrap();
        // The same pod as the API server returns it: quantities in canonical form.
        let mut from_api = p.clone();
        let limits = from_api.spec.as_mut().unwrap().containers[0]
            .resources
            .as_mut()
            .unwrap()
            .limits
            .as_mut()
            .unwrap();
        limits.insert(
            ann::RESOURCE_GPUMEM.into(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("4k".into()),
        );
        assert_eq!(pod_request(&from_api).unwrap().unwrap(), r);
        assert_eq!(
            r.containers,
            vec![ContainerRequest {
                gpus: 1,
                mem: MemRequest::MiB(4000),
                cores: 0
            }]
        );
    }

    fn with_limits(limits: &str, annotations: &str) -> Pod {
        pod(&format!(
            "metadata: {{name: p, annotations: {{{annotations}}}}}\nspec:\n  initContainers: [{{name: init}}]\n  containers:\n  - name: app\n    resources: {{limits: {{{limits}}}}}\n"
        ))
    }

    #[test]
    fn init_containers_come_first_and_annotations_are_read() {
        let p = with_limits(
            "nvidia.com/gpu: 2, nvidia.com/gpumem-percentage: 50, nvidia.com/gpucores: 30",
            "nvidia.com/use-gputype: 'A100,H100', hami.io/gpu-scheduler-policy: binpack",
        );
        let r = pod_request(&p).unwrap().unwrap();
        assert_eq!(
            r.containers,
            vec![
                ContainerRequest::NONE,
                ContainerRequest {
                    gpus: 2,
                    mem: MemRequest::Percent(50),
                    cores: 30
                }
            ]
        );
        assert_eq!(r.filter.use_types, vec!["a100", "h100"]);
        assert_eq!(r.gpu_policy, Some(GpuPolicy::BINPACK));
        assert_eq!(r.node_policy, None);
    }

    #[test]
    fn impossible_requests_are_refused_with_clear_words() {
        let e = |limits: &str, ann: &str| pod_request(&with_limits(limits, ann)).unwrap_err().0;
        assert!(e(
            "nvidia.com/gpu: 1, nvidia.com/gpumem: 1000, nvidia.com/gpumem-percentage: 10",
            ""
        )
        .contains("sets both nvidia.com/gpumem and nvidia.com/gpumem-percentage"));
        assert!(e("nvidia.com/gpu: 1, nvidia.com/gpucores: 150", "")
            .contains("nvidia.com/gpucores is 150, want 0 to 100"));
        assert!(e("nvidia.com/gpumem: 1000", "")
            .contains("sets nvidia.com/gpumem without nvidia.com/gpu"));
        assert!(e("nvidia.com/gpu: 1, nvidia.com/gpumem: 4GB", "")
            .contains("nvidia.com/gpumem is \"4GB\", want a whole number"));
        assert!(
            e("nvidia.com/gpu: 1, nvidia.com/gpumem-percentage: 101", "").contains("want 0 to 100")
        );
        assert!(
            e("nvidia.com/gpu: 1", "hami.io/node-scheduler-policy: binpak")
                .contains("hami.io/node-scheduler-policy: unknown scheduler policy \"binpak\"")
        );
        assert_eq!(pod_request(&with_limits("cpu: 1", "")).unwrap(), None);
    }

    #[test]
    fn placement_is_read_back_from_annotations() {
        let mut p = with_limits(
            "nvidia.com/gpu: 1",
            "hami.io/vgpu-node: n1, hami.io/vgpu-devices-to-allocate: 'GPU-a,NVIDIA,3000,0:;'",
        );
        let pl = pod_placement(&p, DefaultMemory::default(), 0)
            .unwrap()
            .unwrap();
        assert_eq!(
            (pl.node.as_str(), pl.devices.encode().as_str()),
            ("n1", "GPU-a,NVIDIA,3000,0:;")
        );
        // The agent empties to-allocate as it allocates; allocated then holds the truth.
        let a = p.metadata.annotations.as_mut().unwrap();
        a.insert(ann::DEVICES_TO_ALLOCATE.into(), ";".into());
        a.insert(
            ann::DEVICES_ALLOCATED.into(),
            "GPU-a,NVIDIA,3000,0:;".into(),
        );
        assert_eq!(
            pod_placement(&p, DefaultMemory::default(), 0)
                .unwrap()
                .unwrap()
                .devices
                .encode(),
            "GPU-a,NVIDIA,3000,0:;"
        );
        // Leftovers of a failed bind on a pod that never reached a node hold nothing.
        let mut failed = p.clone();
        let fa = failed.metadata.annotations.as_mut().unwrap();
        fa.insert(ann::BIND_PHASE.into(), "failed".into());
        assert_eq!(
            pod_placement(&failed, DefaultMemory::default(), 0).unwrap(),
            None
        );
        failed.spec.as_mut().unwrap().node_name = Some("n1".into());
        assert!(
            pod_placement(&failed, DefaultMemory::default(), 0)
                .unwrap()
                .is_some(),
            "once on a node, it holds its devices"
        );
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        });
        assert_eq!(
            pod_placement(&p, DefaultMemory::default(), 0).unwrap(),
            None
        );
    }

    /// HAMi's webhook cases for the default of 100 cores ("no memory fields defaults to
    /// exclusive", "exclusive via percentage", "memory size present treated as shareable",
    /// "explicit cores remains unchanged", "non-exclusive percentage").
    #[test]
    fn a_whole_card_request_gets_all_of_its_cores() {
        let c = |limits: &str| {
            pod_request(&with_limits(limits, ""))
                .unwrap()
                .unwrap()
                .containers[1]
        };
        assert_eq!(c("nvidia.com/gpu: 1").cores, 100);
        assert_eq!(
            c("nvidia.com/gpu: 1, nvidia.com/gpumem-percentage: 100").cores,
            100
        );
        assert_eq!(
            c("nvidia.com/gpu: 1, nvidia.com/gpumem-percentage: 50").cores,
            0
        );
        assert_eq!(c("nvidia.com/gpu: 1, nvidia.com/gpumem: 8000").cores, 0);
        assert_eq!(c("nvidia.com/gpu: 1, nvidia.com/gpucores: 30").cores, 30);
        assert_eq!(c("nvidia.com/gpu: 1, nvidia.com/gpucores: 0").cores, 0);
    }

    /// HAMi's `scheduler.defaultCores` (`--default-cores`): cores of a vGPU that sets no gpucores and
    /// shares its card; a whole-card request still gets 100, an explicit value stays, and a placement
    /// read back from annotations is booked at most the default.
    #[test]
    fn default_cores_apply_to_shared_vgpus_without_gpucores() {
        let c = |limits: &str| {
            pod_request_with(&with_limits(limits, ""), 25)
                .unwrap()
                .unwrap()
                .containers[1]
        };
        assert_eq!(c("nvidia.com/gpu: 1, nvidia.com/gpumem: 8000").cores, 25);
        assert_eq!(
            c("nvidia.com/gpu: 1, nvidia.com/gpumem-percentage: 50").cores,
            25
        );
        assert_eq!(c("nvidia.com/gpu: 1").cores, 100);
        assert_eq!(c("nvidia.com/gpu: 1, nvidia.com/gpucores: 0").cores, 0);
        assert_eq!(c("nvidia.com/gpu: 1, nvidia.com/gpucores: 60").cores, 60);
        assert_eq!(
            pod_request(&with_limits(
                "nvidia.com/gpu: 1, nvidia.com/gpumem: 8000",
                ""
            ))
            .unwrap()
            .unwrap()
            .containers[1]
                .cores,
            0,
            "HAMi's default is 0"
        );
    }

    /// "gpumem: 0" and "memory percentage of 0 — treated as unset": the default memory applies,
    /// and the explicit field keeps the card shareable.
    #[test]
    fn zero_memory_means_unset() {
        let c = |limits: &str| {
            pod_request(&with_limits(limits, ""))
                .unwrap()
                .unwrap()
                .containers[1]
        };
        let m = c("nvidia.com/gpu: 1, nvidia.com/gpumem: 0");
        assert_eq!((m.mem, m.cores), (MemRequest::Default, 0));
        let p = c("nvidia.com/gpu: 1, nvidia.com/gpumem-percentage: 0");
        assert_eq!((p.mem, p.cores), (MemRequest::Default, 0));
    }

    #[test]
    fn gpumem_with_a_binary_unit_says_the_unit_is_mib() {
        let e = pod_request(&with_limits(
            "nvidia.com/gpu: 1, nvidia.com/gpumem: 16Gi",
            "",
        ))
        .unwrap_err()
        .0;
        assert!(
            e.contains("its unit is MiB") && e.contains("write 16384"),
            "{e}"
        );
        // The API's canonical form of 4000 (4k) is a plain number of MiB.
        assert!(pod_request(&with_limits("nvidia.com/gpu: 1, nvidia.com/gpumem: 4k", "")).is_ok());
    }

    #[test]
    fn init_containers_are_counted_and_gpu_policy_chains_parse() {
        let r = pod_request(&with_limits(
            "nvidia.com/gpu: 1",
            "hami.io/gpu-scheduler-policy: 'binpack,numa'",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(r.init, 1);
        assert_eq!(r.gpu_policy, Some("binpack,numa".parse().unwrap()));
        assert!(pod_request(&with_limits(
            "nvidia.com/gpu: 1",
            "hami.io/gpu-scheduler-policy: mutex"
        ))
        .is_ok());
    }

    #[test]
    fn device_cordon_is_read_as_hami_reads_it() {
        let n: Node = serde_yaml::from_str(
            "metadata: {name: n, annotations: {hami.io/device-cordon: ' GPU-a,,GPU-b , '}}",
        )
        .unwrap();
        assert_eq!(node_cordoned(&n), vec!["GPU-a", "GPU-b"]);
    }
}
