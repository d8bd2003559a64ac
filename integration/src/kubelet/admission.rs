//! Pod admission as the kubelet's device manager does it: per container (init containers first, in order),
//! per device-plugin resource in its limits, choose device IDs (GetPreferredAllocation when the plugin
//! offers it, else the first free ones in list order; init containers' devices are reused), then Allocate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use vgpu_kubelet_api::deviceplugin as dp;

use super::container::MountSpec;
use super::devices::{ContainerDevices, DeviceManager};
use super::uds::go_error;

/// The kubelet's bound on one device plugin call.
const PLUGIN_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What Allocate gave one container.
#[derive(Debug, Clone, Default)]
pub struct Allocated {
    pub name: String,
    /// Allocate's envs, per resource in name order, each response's keys sorted.
    pub envs: Vec<(String, String)>,
    pub mounts: Vec<MountSpec>,
    /// (resource, device IDs) whose plugin asked for PreStartContainer.
    pub pre_start: Vec<(String, Vec<String>)>,
}

/// Why admission failed, in the kubelet's words: the pod gets `reason` and `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
    pub message: String,
}

impl Rejection {
    fn allocate_failed(err: impl std::fmt::Display) -> Self {
        Self {
            reason: "UnexpectedAdmissionError".into(),
            message: format!("Allocate failed due to {err}, which is unexpected"),
        }
    }
}

/// Init containers first, then the app containers, each with whether it is an init container.
pub fn containers_in_order(pod: &Pod) -> Vec<(bool, &Container)> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    spec.init_containers
        .iter()
        .flatten()
        .map(|c| (true, c))
        .chain(spec.containers.iter().map(|c| (false, c)))
        .collect()
}

/// The container's device-plugin requests: registered resources in its limits, with their counts.
fn requests(devices: &DeviceManager, c: &Container) -> Result<Vec<(String, usize)>, Rejection> {
    let mut out = Vec::new();
    let Some(limits) = c.resources.as_ref().and_then(|r| r.limits.as_ref()) else {
        return Ok(out);
    };
    for (name, q) in limits {
        // Extended resources no plugin registered are left alone, as the kubelet leaves them to the scheduler.
        if !devices.is_registered(name) {
            continue;
        }
        let n: usize = q.0.trim().parse().map_err(|_| {
            Rejection::allocate_failed(format!(
                "the limit {name}={} of container {:?} is not a whole number of devices",
                q.0, c.name
            ))
        })?;
        if n > 0 {
            out.push((name.clone(), n));
        }
    }
    Ok(out)
}

/// Chooses `needed` IDs: first from `reusable` (devices of this pod's init containers), then free ones,
/// asking the plugin's preference when it offers one.
async fn choose(
    devices: &DeviceManager,
    resource: &str,
    needed: usize,
    reusable: &mut Vec<String>,
) -> Result<Vec<String>, Rejection> {
    let mut chosen: Vec<String> = Vec::new();
    while chosen.len() < needed && !reusable.is_empty() {
        chosen.push(reusable.remove(0));
    }
    if chosen.len() == needed {
        return Ok(chosen);
    }
    let free = devices.free(resource);
    let remaining = needed - chosen.len();
    if free.len() < remaining {
        return Err(Rejection::allocate_failed(format!(
            "requested number of devices unavailable for {resource}. Requested: {needed}, Available: {}",
            free.len() + chosen.len()
        )));
    }
    let plugin = devices.plugin(resource);
    if let Some((mut client, _)) = plugin.filter(|(_, o)| o.get_preferred_allocation_available) {
        if free.len() > remaining {
            let req = dp::PreferredAllocationRequest {
                container_requests: vec![dp::ContainerPreferredAllocationRequest {
                    available_device_i_ds: chosen.iter().chain(&free).cloned().collect(),
                    must_include_device_i_ds: chosen.clone(),
                    allocation_size: needed as i32,
                }],
            };
            let resp =
                tokio::time::timeout(PLUGIN_CALL_TIMEOUT, client.get_preferred_allocation(req))
                    .await
                    .map_err(|_| Rejection::allocate_failed("GetPreferredAllocation timed out"))?
                    .map_err(|s| Rejection::allocate_failed(go_error(&s)))?
                    .into_inner();
            // Only IDs that are really free count; the rest is filled in list order below.
            for id in resp
                .container_responses
                .into_iter()
                .flat_map(|r| r.device_i_ds)
            {
                if chosen.len() < needed && free.contains(&id) && !chosen.contains(&id) {
                    chosen.push(id);
                }
            }
        }
    }
    for id in free {
        if chosen.len() == needed {
            break;
        }
        if !chosen.contains(&id) {
            chosen.push(id);
        }
    }
    Ok(chosen)
}

/// One Allocate call for one container's devices of one resource.
async fn allocate(
    devices: &DeviceManager,
    resource: &str,
    ids: &[String],
) -> Result<dp::ContainerAllocateResponse, Rejection> {
    let Some((mut client, _)) = devices.plugin(resource) else {
        return Err(Rejection::allocate_failed(format!(
            "the device plugin of {resource} is not connected (it must register again)"
        )));
    };
    let req = dp::AllocateRequest {
        container_requests: vec![dp::ContainerAllocateRequest {
            devices_ids: ids.to_vec(),
        }],
    };
    let resp = tokio::time::timeout(PLUGIN_CALL_TIMEOUT, client.allocate(req))
        .await
        .map_err(|_| {
            Rejection::allocate_failed(
                "rpc error: code = DeadlineExceeded desc = context deadline exceeded",
            )
        })?
        .map_err(|s| Rejection::allocate_failed(go_error(&s)))?
        .into_inner();
    resp.container_responses.into_iter().next().ok_or_else(|| {
        Rejection::allocate_failed(format!(
            "no containers return in allocation response {{ContainerResponses:[]}} of {resource}"
        ))
    })
}

/// Admits the pod: allocates every container's devices and records them. On failure whatever the pod was
/// given is released.
pub async fn admit(devices: &Arc<DeviceManager>, pod: &Pod) -> Result<Vec<Allocated>, Rejection> {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    devices.add_pod(
        &uid,
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default(),
    );
    let r = admit_containers(devices, pod, &uid).await;
    if r.is_err() {
        devices.release_pod(&uid);
    }
    r
}

async fn admit_containers(
    devices: &Arc<DeviceManager>,
    pod: &Pod,
    uid: &str,
) -> Result<Vec<Allocated>, Rejection> {
    let mut reusable: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut out = Vec::new();
    for (is_init, c) in containers_in_order(pod) {
        let restartable = c.restart_policy.as_deref() == Some("Always");
        let mut record = ContainerDevices {
            name: c.name.clone(),
            devices: BTreeMap::new(),
            listed: !is_init || restartable,
        };
        let mut alloc = Allocated {
            name: c.name.clone(),
            ..Default::default()
        };
        for (resource, needed) in requests(devices, c)? {
            let pool = reusable.entry(resource.clone()).or_default();
            let ids = choose(devices, &resource, needed, pool).await?;
            let resp = allocate(devices, &resource, &ids).await?;
            let mut envs: Vec<_> = resp.envs.into_iter().collect();
            envs.sort();
            alloc.envs.extend(envs);
            alloc
                .mounts
                .extend(resp.mounts.into_iter().map(|m| MountSpec {
                    host_path: m.host_path.into(),
                    container_path: m.container_path.into(),
                    read_only: m.read_only,
                }));
            if devices
                .plugin(&resource)
                .is_some_and(|(_, o)| o.pre_start_required)
            {
                alloc.pre_start.push((resource.clone(), ids.clone()));
            }
            if is_init {
                reusable
                    .entry(resource.clone())
                    .or_default()
                    .extend(ids.iter().cloned());
            }
            tracing::info!(pod = ?pod.metadata.name, container = %c.name, %resource, ?ids, "allocated");
            record.devices.insert(resource, ids);
        }
        devices.record_container(uid, record);
        out.push(alloc);
    }
    Ok(out)
}

/// PreStartContainer for a container whose plugin asked for it, just before it starts.
pub async fn pre_start(devices: &DeviceManager, a: &Allocated) -> Result<(), String> {
    for (resource, ids) in &a.pre_start {
        let Some((mut client, _)) = devices.plugin(resource) else {
            return Err(format!("the device plugin of {resource} is not connected"));
        };
        let req = dp::PreStartContainerRequest {
            devices_ids: ids.clone(),
        };
        tokio::time::timeout(PLUGIN_CALL_TIMEOUT, client.pre_start_container(req))
            .await
            .map_err(|_| format!("PreStartContainer of {resource} timed out"))?
            .map_err(|s| format!("PreStartContainer of {resource}: {}", go_error(&s)))?;
    }
    Ok(())
}
