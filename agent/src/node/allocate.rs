//! Allocate: which pod a request is for, and the answer.
//!
//! The kubelet's Allocate carries only device IDs. No lock: the scheduler seals each placement it makes
//! (`contract::placement_seal`), and a pod is a candidate only if its seal verifies for this node. Among the
//! candidates whose next unserved GPU container asks for as many GPUs as the request has IDs, the first in the
//! kubelet's admission order is taken (see `age_key`). That is a guess, checked against the kubelet's own record
//! ([`super::confirm`]) before anything is written to a pod: the container the record names gets the answer's
//! limits if its own placement is the one answered, else none, and the guessed pod keeps its placement.
//!
//! The pod's progress is recorded once confirmed, with optimistic concurrency (resourceVersion precondition,
//! retried on 409), so two pods on one node are allocated at API speed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use tonic::Status;
use vgpu_contract::annotations::{self as ann, BindPhase, ContainerDevice, PodDevices};
use vgpu_contract::container_dir as cd;
use vgpu_contract::env;
use vgpu_contract::limits::CorePolicy;
use vgpu_contract::placement_seal::{self, SEALED_DEVICES_ANNOTATION, SEAL_ANNOTATION};
use vgpu_kubelet_api::deviceplugin::{ContainerAllocateResponse, Mount};

use super::config::NodeConfig;
use super::container_dir::{cache_header, ContainerDir, Owner, Settings};
use super::pods::{self, annotation, pod_label};
use super::{Node, Paths};
use crate::gpus::Card;

/// Event reason when Allocate refuses a pod.
pub const REFUSED_REASON: &str = "VgpuAllocateRefused";
const MIB: u64 = 1 << 20;

/// A container of a sealed placement, chosen for one Allocate.
#[derive(Debug, Clone)]
pub struct Chosen {
    pub pod: Arc<Pod>,
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Index in init containers followed by containers (the device list's order).
    pub index: usize,
    pub container: String,
    pub devices: Vec<ContainerDevice>,
    pub policy: CorePolicy,
}

/// What a pod on this node is to one Allocate.
#[derive(Debug)]
pub enum Verdict {
    Candidate(Chosen),
    /// Sealed for this node, but nothing of it fits this request now.
    NotNow,
    /// Asks for GPUs here without a placement this agent can trust: the reason says why.
    Refused(String),
    /// No GPUs, finished, or already refused.
    NotOurs,
}

/// Init containers first, then containers: the order of the device lists.
pub fn all_containers(pod: &Pod) -> Vec<&Container> {
    pod.spec
        .as_ref()
        .map(|s| {
            s.init_containers
                .iter()
                .flatten()
                .chain(s.containers.iter())
                .collect()
        })
        .unwrap_or_default()
}

/// How many `nvidia.com/gpu` the container asks for (limits; extended resources have requests = limits).
pub fn gpus_of(c: &Container) -> u64 {
    let r = c.resources.as_ref();
    r.and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get(ann::RESOURCE_GPU))
        .or_else(|| {
            r.and_then(|r| r.requests.as_ref())
                .and_then(|l| l.get(ann::RESOURCE_GPU))
        })
        .and_then(|q| q.0.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

pub fn declared_policy(c: &Container) -> Result<CorePolicy, String> {
    let v = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == env::CORE_POLICY)
        .and_then(|e| e.value.as_deref());
    match v {
        None => Ok(CorePolicy::Default),
        Some(v) => CorePolicy::parse(v).map_err(|_| {
            format!(
                "container {:?} sets {}={v:?}: use default, force or disable",
                c.name,
                env::CORE_POLICY
            )
        }),
    }
}

/// The device list the scheduler sealed for `pod` on `node`, if the seal verifies; else why not.
pub fn sealed_placement(pod: &Pod, node: &str, key: &[u8]) -> Result<PodDevices, String> {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let placed_on = annotation(pod, ann::VGPU_NODE);
    if placed_on.is_some_and(|n| n != node) {
        return Err(format!(
            "{} names node {:?} but the pod is bound to {node:?}: not a placement the vgpu scheduler made for this node",
            ann::VGPU_NODE,
            placed_on.unwrap_or("")
        ));
    }
    let (Some(seal), Some(sealed_text), Some(bind_time), Some(_)) = (
        annotation(pod, SEAL_ANNOTATION),
        annotation(pod, SEALED_DEVICES_ANNOTATION),
        annotation(pod, ann::BIND_TIME),
        placed_on,
    ) else {
        return Err(format!(
            "no placement sealed by the vgpu scheduler ({SEAL_ANNOTATION}, {SEALED_DEVICES_ANNOTATION}, {}, {}): \
             GPU pods must be scheduled by the vgpu scheduler; hami.io/* annotations set by hand, spec.nodeName \
             set directly or another scheduler cannot place vGPUs",
            ann::VGPU_NODE,
            ann::BIND_TIME
        ));
    };
    let placement = placement_seal::Placement {
        pod_uid: uid,
        namespace,
        name,
        node,
        devices: sealed_text,
        bind_time,
    };
    if !placement_seal::verify(key, &placement, seal) {
        return Err(format!(
            "the placement seal ({SEAL_ANNOTATION}) does not verify: the placement was changed after the \
             scheduler sealed it, copied from another pod, or sealed with another key than this node's"
        ));
    }
    PodDevices::decode(sealed_text)
        .map_err(|e| format!("the sealed device list is unreadable: {e}"))
}

/// Judges one pod of this node for a request of `n_ids` devices. `served` says whether this agent already
/// answered a container (its patch may not be in the reflector yet).
pub fn judge(
    pod: &Arc<Pod>,
    node: &str,
    key: &[u8],
    cards: &[Card],
    n_ids: usize,
    served: &dyn Fn(&str, usize) -> bool,
) -> Verdict {
    let spec_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let containers = all_containers(pod);
    if spec_node != Some(node) || containers.iter().all(|c| gpus_of(c) == 0) {
        return Verdict::NotOurs;
    }
    if matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Verdict::NotOurs;
    }
    let phase = annotation(pod, ann::BIND_PHASE).and_then(BindPhase::parse);
    if matches!(phase, Some(BindPhase::Success | BindPhase::Failed)) {
        return Verdict::NotOurs;
    }
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let refuse = |why: &str| Verdict::Refused(why.to_string());
    let sealed = match sealed_placement(pod, node, key) {
        Ok(s) => s,
        Err(why) => return Verdict::Refused(why),
    };
    if phase != Some(BindPhase::Allocating) {
        return Verdict::NotNow;
    }
    if sealed.0.len() != containers.len() {
        return refuse(&format!(
            "the sealed device list has {} container entries, the pod has {} containers",
            sealed.0.len(),
            containers.len()
        ));
    }
    for (c, devs) in containers.iter().zip(&sealed.0) {
        if devs.len() as u64 != gpus_of(c) {
            return refuse(&format!(
                "container {:?} asks for {} GPU(s) but its sealed placement has {}",
                c.name,
                gpus_of(c),
                devs.len()
            ));
        }
        if let Some(d) = devs
            .iter()
            .find(|d| !cards.iter().any(|k| k.uuid == d.uuid))
        {
            return refuse(&format!(
                "the placement names GPU {} which this node does not have",
                d.uuid
            ));
        }
    }
    let to_allocate = match annotation(pod, ann::DEVICES_TO_ALLOCATE).map(PodDevices::decode) {
        Some(Ok(t)) => t,
        Some(Err(e)) => return refuse(&format!("{}: {e}", ann::DEVICES_TO_ALLOCATE)),
        None => return Verdict::NotNow,
    };
    if to_allocate.0.len() != sealed.0.len()
        || to_allocate
            .0
            .iter()
            .zip(&sealed.0)
            .any(|(t, s)| !t.is_empty() && t != s)
    {
        return refuse(&format!(
            "{} no longer matches the sealed placement",
            ann::DEVICES_TO_ALLOCATE
        ));
    }
    let Some(index) =
        (0..sealed.0.len()).find(|&i| !to_allocate.0[i].is_empty() && !served(&uid, i))
    else {
        return Verdict::NotNow;
    };
    if sealed.0[index].len() != n_ids {
        return Verdict::NotNow;
    }
    let policy = match declared_policy(containers[index]) {
        Ok(p) => p,
        Err(e) => return refuse(&e),
    };
    Verdict::Candidate(Chosen {
        pod: pod.clone(),
        uid,
        namespace,
        name,
        index,
        container: containers[index].name.clone(),
        devices: sealed.0[index].clone(),
        policy,
    })
}

/// The kubelet's admission order: the order the pods reached this node's watch (`pods::arrival`), then creation
/// time (seconds), then `hami.io/bind-time`, then UID (a stable order for anything still equal). The kubelet
/// admits each pod as its own watch delivers it, and every watch of the node's pods delivers the API server's
/// order of their bindings; only a batch (the kubelet's first list after it starts) is sorted by creation
/// time, with ties in any order. A pod this agent found by a list, not its watch, comes after those it saw.
fn age_key(c: &Chosen) -> (u64, i64, u64, String) {
    let bind = annotation(&c.pod, ann::BIND_TIME)
        .and_then(|t| t.parse().ok())
        .unwrap_or(u64::MAX);
    let created = c
        .pod
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(i64::MAX, |t| t.0.as_second());
    (super::pods::arrival(&c.uid), created, bind, c.uid.clone())
}

/// Picks the candidate for a request; the pods refused, with their reasons, when there is none.
pub fn choose(
    pods: &[Arc<Pod>],
    node: &str,
    key: &[u8],
    cards: &[Card],
    n_ids: usize,
    served: &dyn Fn(&str, usize) -> bool,
) -> Result<Chosen, Vec<(Arc<Pod>, String)>> {
    let mut candidates = vec![];
    let mut refused = vec![];
    for p in pods {
        match judge(p, node, key, cards, n_ids, served) {
            Verdict::Candidate(c) => candidates.push(c),
            Verdict::Refused(why) => {
                // Only the pods this request could be for: one with a container of that many GPUs.
                if all_containers(p).iter().any(|c| gpus_of(c) == n_ids as u64) {
                    refused.push((p.clone(), why));
                }
            }
            Verdict::NotNow | Verdict::NotOurs => {}
        }
    }
    candidates.sort_by_key(age_key);
    if candidates.len() > 1 && tracing::enabled!(tracing::Level::DEBUG) {
        let keys: Vec<String> = candidates
            .iter()
            .map(|c| {
                let (arrival, created, bind, _) = age_key(c);
                format!("{}/{} {arrival}:{created}:{bind}", c.namespace, c.name)
            })
            .collect();
        tracing::debug!("Allocate candidates in order: {}", keys.join(", "));
    }
    candidates.into_iter().next().ok_or(refused)
}

/// The settings of a container, in the environment's keys; the limits file holds the same plus the card dir.
pub fn settings(devices: &[ContainerDevice], policy: CorePolicy, config: &NodeConfig) -> Settings {
    let mut s = vec![(
        env::NVIDIA_VISIBLE_DEVICES.to_string(),
        devices
            .iter()
            .map(|d| d.uuid.as_str())
            .collect::<Vec<_>>()
            .join(","),
    )];
    for (i, d) in devices.iter().enumerate() {
        s.push((
            format!("{}{i}", env::MEMORY_LIMIT_PREFIX),
            format!("{}m", d.mem_mib),
        ));
    }
    s.push((
        env::SM_LIMIT.to_string(),
        devices.first().map_or(0, |d| d.cores).to_string(),
    ));
    s.push((
        env::SHARED_CACHE.to_string(),
        cd::CONTAINER_CACHE.to_string(),
    ));
    s.push((env::CORE_POLICY.to_string(), policy.as_str().to_string()));
    if config.oversubscribed() {
        s.push(("CUDA_OVERSUBSCRIBE".to_string(), "true".to_string()));
    }
    Settings(s)
}

/// The limits file's lines: the settings plus the card directory.
pub fn limits_lines(settings: &Settings) -> Settings {
    let mut s = settings.clone();
    s.0.push((
        env::CARD_DIR.to_string(),
        cd::CONTAINER_CARD_DIR.to_string(),
    ));
    s
}

/// Allocate's answer for one container: its settings as environment, and the mounts of its directory.
pub fn answer(settings: &Settings, dir: &ContainerDir, paths: &Paths) -> ContainerAllocateResponse {
    let m = |container: &str, host: &std::path::Path, ro: bool| Mount {
        container_path: container.to_string(),
        host_path: host.display().to_string(),
        read_only: ro,
    };
    ContainerAllocateResponse {
        envs: settings.0.iter().cloned().collect(),
        mounts: vec![
            m(cd::CONTAINER_LIMITS, &dir.limits(), true),
            m(cd::CONTAINER_SHIM, &paths.shim_lib, true),
            m(cd::CONTAINER_PRELOAD, &dir.preload(), true),
            m(cd::CONTAINER_CACHE, &dir.cache(), false),
            m(cd::CONTAINER_CARD_DIR, &paths.card_dir, false),
        ],
        ..Default::default()
    }
}

/// The annotations that record container `index` as allocated (once the kubelet's record confirmed it). The
/// lists keep one entry per container; the phase is success when none is left to allocate.
pub fn progress(
    sealed: &PodDevices,
    to_allocate: &PodDevices,
    index: usize,
) -> BTreeMap<String, Option<String>> {
    let mut to = to_allocate.clone();
    to.0[index] = vec![];
    let allocated = PodDevices(
        to.0.iter()
            .zip(&sealed.0)
            .map(|(t, s)| if t.is_empty() { s.clone() } else { vec![] })
            .collect(),
    );
    let done = to.0.iter().all(Vec::is_empty);
    let phase = if done {
        BindPhase::Success
    } else {
        BindPhase::Allocating
    };
    BTreeMap::from([
        (ann::DEVICES_TO_ALLOCATE.to_string(), Some(to.encode())),
        (ann::DEVICES_ALLOCATED.to_string(), Some(allocated.encode())),
        (
            ann::BIND_PHASE.to_string(),
            Some(phase.as_str().to_string()),
        ),
    ])
}

/// Writes [`progress`] onto the pod with its resourceVersion as precondition, re-reading it on a conflict.
pub async fn record(node: &Node, c: &Chosen) -> Result<(), String> {
    let mut pod: Pod = (*c.pod).clone();
    for _ in 0..8 {
        if pod.metadata.uid.as_deref() != Some(c.uid.as_str()) {
            return Err(format!("pod {}/{} was replaced", c.namespace, c.name));
        }
        let parse = |k: &str| {
            PodDevices::decode(annotation(&pod, k).unwrap_or("")).map_err(|e| e.to_string())
        };
        // Re-verified: the pod may have been rewritten since it was judged.
        let sealed = sealed_placement(&pod, &node.name, &node.seal_key)?;
        let to = parse(ann::DEVICES_TO_ALLOCATE)?;
        if to.0.len() != sealed.0.len() || c.index >= sealed.0.len() {
            return Err(format!(
                "{} of {}/{} changed shape",
                ann::DEVICES_TO_ALLOCATE,
                c.namespace,
                c.name
            ));
        }
        if to.0[c.index].is_empty() {
            // Already recorded (an agent restarted after recording confirms again): nothing to write.
            return Ok(());
        }
        let patch = progress(&sealed, &to, c.index);
        match pods::patch_annotations(
            &node.client,
            &c.namespace,
            &c.name,
            pod.metadata.resource_version.as_deref(),
            &patch,
        )
        .await
        {
            Ok(_) => return Ok(()),
            Err(e) if pods::is_conflict(&e) => {
                pod = pods::get(&node.client, &c.namespace, &c.name)
                    .await
                    .map_err(|e| format!("re-reading {}/{}: {e}", c.namespace, c.name))?;
            }
            Err(e) => return Err(format!("patching {}/{}: {e}", c.namespace, c.name)),
        }
    }
    Err(format!(
        "{}/{} kept changing under 8 attempts to record its allocation",
        c.namespace, c.name
    ))
}

/// Sets `hami.io/bind-phase: failed` on a pod and records why. Only that pod is written.
pub async fn fail_pod(node: &Node, pod: &Pod, reason: &str) {
    let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
        return;
    };
    let patch = BTreeMap::from([(
        ann::BIND_PHASE.to_string(),
        Some(BindPhase::Failed.as_str().to_string()),
    )]);
    if let Err(e) = pods::patch_annotations(&node.client, ns, name, None, &patch).await {
        tracing::warn!("could not mark {ns}/{name} failed: {e}");
    }
    pods::warn_event(&node.client, pod, REFUSED_REASON, reason).await;
}

/// Checks that every ID is one this plugin offers; returns how many there are.
fn check_ids(ids: &[String], cards: &[Card], split: u32) -> Result<usize, Status> {
    for id in ids {
        let ok = id.rsplit_once('-').is_some_and(|(uuid, n)| {
            cards.iter().any(|c| c.uuid == uuid) && n.parse::<u32>().is_ok_and(|n| n < split)
        });
        if !ok {
            return Err(Status::invalid_argument(format!(
                "vgpu: device ID {id:?} is not one this node's plugin offers (<GPU-UUID>-<n>)"
            )));
        }
    }
    if ids.is_empty() {
        return Err(Status::invalid_argument("vgpu: Allocate named no devices"));
    }
    Ok(ids.len())
}

/// One container's Allocate: settle what the kubelet recorded since the last one, choose, prepare a directory,
/// answer; the kubelet's record confirms the choice after ([`super::confirm`]).
pub async fn allocate_container(
    node: &Arc<Node>,
    ids: &[String],
) -> Result<ContainerAllocateResponse, Status> {
    let _one = node.allocating.lock().await;
    let cards = node.cards.borrow().clone();
    let n = check_ids(ids, &cards, node.config.device_split_count)?;
    super::confirm::settle_recorded(node).await;
    let served = |uid: &str, i: usize| is_served(node, uid, i);
    let mut chosen = choose(
        &node.pods.state(),
        &node.name,
        &node.seal_key,
        &cards,
        n,
        &served,
    );
    if chosen.is_err() {
        // The kubelet may have seen the pod's binding before this agent's watch did: ask the API directly.
        match list_node_pods(node).await {
            Ok(fresh) => {
                chosen = choose(&fresh, &node.name, &node.seal_key, &cards, n, &served);
            }
            Err(e) => tracing::warn!("listing this node's pods: {e}"),
        }
    }
    let c = match chosen {
        Ok(c) => c,
        Err(refused) => {
            let mut msg = format!(
                "vgpu: no pod placed on node {} by the vgpu scheduler is waiting for {n} GPU(s)",
                node.name
            );
            for (pod, why) in &refused {
                msg.push_str(&format!("; {} refused: {why}", pod_label(pod)));
                tracing::warn!("Allocate: {} refused: {why}", pod_label(pod));
                fail_pod(node, pod, why).await;
            }
            if refused.is_empty() {
                msg.push_str(" (was the pod scheduled by the vgpu scheduler? its hami.io/bind-phase must be allocating)");
            }
            return Err(Status::failed_precondition(msg));
        }
    };
    let label = format!("{}/{} container {:?}", c.namespace, c.name, c.container);
    let dir = ContainerDir::for_allocation(&node.paths.containers_dir, ids)
        .map_err(|e| Status::internal(format!("vgpu: {label}: {e}")))?;
    let limits: Vec<u64> = c.devices.iter().map(|d| d.mem_mib * MIB).collect();
    let sm = c.devices.first().map_or(0, |d| d.cores);
    let guess = Owner {
        uid: c.uid.clone(),
        namespace: c.namespace.clone(),
        name: c.name.clone(),
        container: c.container.clone(),
    };
    std::fs::create_dir_all(&node.paths.card_dir)
        .and_then(|_| dir.create(&cache_header(&limits, sm, c.policy.code())))
        .and_then(|_| dir.write_owner(&guess))
        .and_then(|_| super::recover::write_ids(&dir, ids))
        .map_err(|e| {
            Status::internal(format!(
                "vgpu: preparing {} for {label}: {e} (is the host path writable by the agent?)",
                dir.dir.display()
            ))
        })?;
    let s = settings(&c.devices, c.policy, &node.config);
    let resp = answer(&s, &dir, &node.paths);
    mark_served(node, &c.uid, c.index);
    tracing::info!(
        "Allocate {ids:?} -> {label} (until the kubelet's record says otherwise): {}",
        PodDevices(vec![c.devices.clone()]).encode()
    );
    super::confirm::register(
        node,
        super::confirm::Pending {
            chosen: c,
            ids: ids.to_vec(),
            dir,
            lines: limits_lines(&s),
        },
    );
    Ok(resp)
}

/// Whether container `index` of pod `uid` was answered by this agent (pending or confirmed).
pub fn is_served(node: &Node, uid: &str, index: usize) -> bool {
    node.served
        .lock()
        .unwrap()
        .contains_key(&(uid.to_string(), index))
}

/// One more answer claims container `index` of pod `uid`.
pub fn mark_served(node: &Node, uid: &str, index: usize) {
    *node
        .served
        .lock()
        .unwrap()
        .entry((uid.to_string(), index))
        .or_default() += 1;
}

/// One answer less claims it (the kubelet's record gave that answer to another container, or never came).
pub fn unserve(node: &Node, uid: &str, index: usize) {
    let mut s = node.served.lock().unwrap();
    let key = (uid.to_string(), index);
    if let Some(n) = s.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            s.remove(&key);
        }
    }
}

/// Whether the kubelet's record confirmed an answer for container `index` of pod `uid`.
pub fn is_confirmed(node: &Node, uid: &str, index: usize) -> bool {
    node.confirmed
        .lock()
        .unwrap()
        .contains(&(uid.to_string(), index))
}

pub fn mark_confirmed(node: &Node, uid: &str, index: usize) {
    node.confirmed
        .lock()
        .unwrap()
        .insert((uid.to_string(), index));
}

async fn list_node_pods(node: &Node) -> Result<Vec<Arc<Pod>>, kube::Error> {
    let api: kube::Api<Pod> = kube::Api::all(node.client.clone());
    let lp = kube::api::ListParams::default().fields(&format!("spec.nodeName={}", node.name));
    Ok(tokio::time::timeout(Duration::from_secs(10), api.list(&lp))
        .await
        .map_err(|_| kube::Error::Service("listing pods timed out after 10 s".into()))??
        .items
        .into_iter()
        .map(Arc::new)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const KEY: &[u8] = b"k";

    fn card(uuid: &str) -> Card {
        Card {
            uuid: uuid.into(),
            index: 0,
            name: "T4".into(),
            memory_mib: 15360,
            numa: 0,
            healthy: true,
            reason: None,
        }
    }

    /// A pod on n1 with containers asking for `gpus`, sealed over `devices` unless `seal` is false.
    fn pod(gpus: &[u64], devices: &str, seal: bool, extra: serde_json::Value) -> Arc<Pod> {
        let containers: Vec<_> = gpus
            .iter()
            .enumerate()
            .map(|(i, n)| {
                serde_json::json!({"name": format!("c{i}"),
                "resources": {"limits": {"nvidia.com/gpu": n.to_string()}}})
            })
            .collect();
        let mut a = serde_json::json!({
            "hami.io/vgpu-node": "n1", "hami.io/bind-time": "7", "hami.io/bind-phase": "allocating",
            "hami.io/vgpu-devices-to-allocate": devices, "vgpu.io/devices-sealed": devices,
        });
        if seal {
            a["vgpu.io/placement-seal"] = placement_seal::seal(
                KEY,
                &placement_seal::Placement {
                    pod_uid: "u",
                    namespace: "ns",
                    name: "p",
                    node: "n1",
                    devices,
                    bind_time: "7",
                },
            )
            .into();
        }
        for (k, v) in extra.as_object().into_iter().flatten() {
            a[k] = v.clone();
        }
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "ns", "uid": "u", "annotations": a},
                "spec": {"nodeName": "n1", "containers": containers}
            }))
            .unwrap(),
        )
    }

    fn never(_: &str, _: usize) -> bool {
        false
    }

    fn verdict(p: &Arc<Pod>, n: usize) -> Verdict {
        judge(p, "n1", KEY, &[card("GPU-a"), card("GPU-b")], n, &never)
    }

    fn refused(v: Verdict) -> String {
        match v {
            Verdict::Refused(r) => r,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_sealed_placement_is_a_candidate_for_its_own_count_only() {
        let p = pod(
            &[1, 2],
            "GPU-a,NVIDIA,100,0:;GPU-a,NVIDIA,100,0:GPU-b,NVIDIA,100,0:;",
            true,
            serde_json::json!({}),
        );
        let Verdict::Candidate(c) = verdict(&p, 1) else {
            panic!()
        };
        assert_eq!((c.index, c.container.as_str()), (0, "c0"));
        assert!(
            matches!(verdict(&p, 2), Verdict::NotNow),
            "its next container has 1 GPU"
        );
        let served = |_: &str, i: usize| i == 0;
        let Verdict::Candidate(c) =
            judge(&p, "n1", KEY, &[card("GPU-a"), card("GPU-b")], 2, &served)
        else {
            panic!()
        };
        assert_eq!((c.index, c.devices.len()), (1, 2));
    }

    #[test]
    fn unsealed_or_altered_placements_are_refused_with_the_reason() {
        let d = "GPU-a,NVIDIA,100,0:;";
        assert!(
            refused(verdict(&pod(&[1], d, false, serde_json::json!({})), 1))
                .contains("no placement sealed")
        );
        let raised = pod(
            &[1],
            d,
            true,
            serde_json::json!({"vgpu.io/devices-sealed": "GPU-a,NVIDIA,9999,0:;"}),
        );
        assert!(refused(verdict(&raised, 1)).contains("does not verify"));
        let moved = pod(
            &[1],
            d,
            true,
            serde_json::json!({"hami.io/vgpu-node": "n2"}),
        );
        assert!(refused(verdict(&moved, 1)).contains("names node \"n2\""));
        let edited = pod(
            &[1],
            d,
            true,
            serde_json::json!({"hami.io/vgpu-devices-to-allocate": "GPU-b,NVIDIA,100,0:;"}),
        );
        assert!(refused(verdict(&edited, 1)).contains("no longer matches"));
        let policy = {
            let p = pod(&[1], d, true, serde_json::json!({}));
            let mut p = (*p).clone();
            p.spec.as_mut().unwrap().containers[0].env =
                Some(vec![k8s_openapi::api::core::v1::EnvVar {
                    name: "GPU_CORE_UTILIZATION_POLICY".into(),
                    value: Some("turbo".into()),
                    ..Default::default()
                }]);
            Arc::new(p)
        };
        assert!(refused(verdict(&policy, 1)).contains("use default, force or disable"));
    }

    #[test]
    fn a_placement_on_a_card_this_node_lacks_or_with_the_wrong_count_is_refused() {
        let other = pod(&[1], "GPU-zz,NVIDIA,100,0:;", true, serde_json::json!({}));
        assert!(refused(verdict(&other, 1)).contains("GPU-zz"));
        let short = pod(&[2], "GPU-a,NVIDIA,100,0:;", true, serde_json::json!({}));
        assert!(refused(verdict(&short, 1))
            .contains("asks for 2 GPU(s) but its sealed placement has 1"));
    }

    #[test]
    fn finished_or_failed_pods_are_not_ours() {
        let d = "GPU-a,NVIDIA,100,0:;";
        for phase in ["success", "failed"] {
            let p = pod(
                &[1],
                d,
                false,
                serde_json::json!({"hami.io/bind-phase": phase}),
            );
            assert!(matches!(verdict(&p, 1), Verdict::NotOurs), "{phase}");
        }
    }

    #[test]
    fn progress_keeps_one_entry_per_container() {
        let sealed = PodDevices::decode(";GPU-a,NVIDIA,100,0:;GPU-b,NVIDIA,200,10:;").unwrap();
        let p = progress(&sealed, &sealed, 1);
        assert_eq!(
            p[ann::DEVICES_TO_ALLOCATE].as_deref(),
            Some(";;GPU-b,NVIDIA,200,10:;")
        );
        assert_eq!(
            p[ann::DEVICES_ALLOCATED].as_deref(),
            Some(";GPU-a,NVIDIA,100,0:;;")
        );
        assert_eq!(p[ann::BIND_PHASE].as_deref(), Some("allocating"));
        let half = PodDevices::decode(";;GPU-b,NVIDIA,200,10:;").unwrap();
        let p = progress(&sealed, &half, 2);
        assert_eq!(p[ann::DEVICES_TO_ALLOCATE].as_deref(), Some(";;;"));
        assert_eq!(
            p[ann::DEVICES_ALLOCATED].as_deref(),
            Some(sealed.encode().as_str())
        );
        assert_eq!(p[ann::BIND_PHASE].as_deref(), Some("success"));
    }

    #[test]
    fn the_answer_sets_hamis_environment_and_the_container_directory() {
        let devs = [
            ContainerDevice::nvidia("GPU-a", 4000, 30),
            ContainerDevice::nvidia("GPU-b", 2000, 30),
        ];
        let over = NodeConfig {
            device_memory_scaling: 1.5,
            ..NodeConfig::default()
        };
        let s = settings(&devs, CorePolicy::Force, &over);
        let env: Vec<(&str, &str)> = s.0.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            env,
            [
                ("NVIDIA_VISIBLE_DEVICES", "GPU-a,GPU-b"),
                ("CUDA_DEVICE_MEMORY_LIMIT_0", "4000m"),
                ("CUDA_DEVICE_MEMORY_LIMIT_1", "2000m"),
                ("CUDA_DEVICE_SM_LIMIT", "30"),
                (
                    "CUDA_DEVICE_MEMORY_SHARED_CACHE",
                    "/usr/local/vgpu/vgpu.cache"
                ),
                ("GPU_CORE_UTILIZATION_POLICY", "force"),
                ("CUDA_OVERSUBSCRIBE", "true"),
            ]
        );
        let plain = settings(&devs[..1], CorePolicy::Default, &NodeConfig::default());
        assert!(plain.0.iter().all(|(k, _)| k != "CUDA_OVERSUBSCRIBE"));
        assert_eq!(
            limits_lines(&plain).0.last().unwrap(),
            &(
                "VGPU_CARD_DIR".to_string(),
                "/var/run/vgpu/cards".to_string()
            )
        );
        let paths = Paths {
            containers_dir: PathBuf::from("/c"),
            shim_lib: PathBuf::from("/opt/libvgpu.so"),
            card_dir: PathBuf::from("/var/run/vgpu/cards"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        };
        let dir =
            ContainerDir::for_allocation(&paths.containers_dir, &["GPU-a-0".to_string()]).unwrap();
        let r = answer(&plain, &dir, &paths);
        assert_eq!(r.envs.len(), plain.0.len());
        let d = dir.dir.display().to_string();
        assert!(d.starts_with("/c/GPU-a-0_"), "{d}");
        let m: Vec<_> = r
            .mounts
            .iter()
            .map(|m| (m.container_path.as_str(), m.host_path.as_str(), m.read_only))
            .collect();
        assert_eq!(
            m,
            [
                ("/usr/local/vgpu/limits", &*format!("{d}/limits"), true),
                ("/usr/local/vgpu/libvgpu.so", "/opt/libvgpu.so", true),
                ("/etc/ld.so.preload", &*format!("{d}/ld.so.preload"), true),
                (
                    "/usr/local/vgpu/vgpu.cache",
                    &*format!("{d}/vgpu.cache"),
                    false
                ),
                ("/var/run/vgpu/cards", "/var/run/vgpu/cards", false),
            ]
        );
    }
}
