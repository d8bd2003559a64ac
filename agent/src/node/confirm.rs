//! After Allocate answered: the kubelet's own record (PodResources `List`) says which pod and container hold
//! the device IDs. Allocate's choice is a guess (the kubelet's request names no pod), so the record decides:
//! - it names the pod and container Allocate chose: the limits file turns ready and the pod's annotations say
//!   so (`hami.io/bind-phase: success`);
//! - it names another container whose own sealed placement would have been answered exactly the same (same
//!   cards, memory, cores and policy: pods placed alike, admitted in another order than guessed): the answer
//!   is that container's; the directory's owner, the limits and the annotations are its own, and the pod
//!   Allocate guessed keeps its placement for its own Allocate;
//! - it names another container of the pod Allocate chose, holding all the answer's IDs, and the answer was for
//!   an ordinary init container: the kubelet's record never lists those, and hands their devices on to the next
//!   container; the answer is confirmed as the init container's;
//! - it names a container placed otherwise: the answer cannot be its (its environment was another
//!   placement's), so the limits file is revoked (the shim refuses everything), that pod is failed with the
//!   reason, and the guessed pod keeps its placement.
//!
//! Nothing is written to a pod before the record is in, so a wrong guess leaves no trace to undo. Each answer is
//! resolved once, by the first of: the kubelet's PreStartContainer for the container (the plugin asks for it, so
//! the limits are ready before the container's first process starts), the next Allocate, which first settles
//! every answer the kubelet has recorded since (the kubelet records an answer before it admits the next pod, so
//! a wrong guess never stands in the way of the pod it took), or the answer's watcher, which polls the record.
//! The ledger is then told the container's cgroup, found from the container ID the kubelet reports in the pod's
//! status (again after each restart of the container), never from a file the tenant can write.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use vgpu_kubelet_api::podresources::pod_resources_lister_client::PodResourcesListerClient;
use vgpu_kubelet_api::podresources::ListPodResourcesRequest;

use super::allocate::{self, Chosen};
use super::container_dir::{ContainerDir, Owner, Settings};
use super::{Node, RESOURCE_NAME};
use crate::ledger::bindings::{Binding, PodRef, Source};
use crate::ledger::cgroups::container_of;

/// A container Allocate answered for, waiting for the kubelet's record.
pub struct Pending {
    pub chosen: Chosen,
    pub ids: Vec<String>,
    pub dir: ContainerDir,
    pub lines: Settings,
}

/// Who PodResources says holds some of the IDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub namespace: String,
    pub name: String,
    pub container: String,
    /// Every `nvidia.com/gpu` ID that container holds.
    pub ids: Vec<String>,
}

/// Every container the kubelet records with `nvidia.com/gpu` IDs.
pub async fn holders(socket: &Path) -> anyhow::Result<Vec<Holder>> {
    let ch = super::unix::channel(socket).await?;
    let list = PodResourcesListerClient::new(ch)
        .list(ListPodResourcesRequest {})
        .await?
        .into_inner();
    let mut out = vec![];
    for pr in list.pod_resources {
        for c in pr.containers {
            let ids: Vec<String> = c
                .devices
                .iter()
                .filter(|d| d.resource_name == RESOURCE_NAME)
                .flat_map(|d| d.device_ids.iter().cloned())
                .collect();
            if !ids.is_empty() {
                out.push(Holder {
                    namespace: pr.namespace.clone(),
                    name: pr.name.clone(),
                    container: c.name,
                    ids,
                });
            }
        }
    }
    Ok(out)
}

/// The container holding any of `ids`.
pub fn holder_of<'a>(list: &'a [Holder], ids: &[String]) -> Option<&'a Holder> {
    list.iter().find(|h| h.ids.iter().any(|i| ids.contains(i)))
}

fn same_ids(a: &[String], b: &[String]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort();
    b.sort();
    a == b
}

/// Whether the kubelet's record is exactly what Allocate chose.
pub fn matches(h: &Holder, c: &Chosen, ids: &[String]) -> bool {
    h.namespace == c.namespace
        && h.name == c.name
        && h.container == c.container
        && same_ids(&h.ids, ids)
}

/// The kubelet's `List` walks a pod's `spec.containers` (and, with sidecars, its restartable init containers),
/// never an ordinary init container; the kubelet hands an init container's devices on to the next container of
/// the pod that asks for the same resource. So an answer for such an init container is confirmed when the
/// record shows all of its IDs on another container of the pod Allocate chose (its UID is checked after).
pub fn init_seen_on_its_pod(h: &Holder, c: &Chosen, ids: &[String]) -> bool {
    let unlisted_init = c
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .and_then(|inits| inits.get(c.index))
        .is_some_and(|i| i.restart_policy.as_deref() != Some("Always"));
    unlisted_init
        && h.namespace == c.namespace
        && h.name == c.name
        && h.container != c.container
        && ids.iter().all(|i| h.ids.contains(i))
}

/// Keeps an answer until the kubelet's record resolves it, and watches for that record.
pub fn register(node: &Arc<Node>, p: Pending) {
    let key = p.dir.dir.clone();
    node.pending.lock().unwrap().insert(key.clone(), p);
    let node = node.clone();
    tokio::spawn(async move { watch_record(node, key).await });
}

/// Held while an answer taken out of the pending set is resolved; dropping it tells those waiting for it.
pub struct Settling {
    _done: tokio::sync::watch::Sender<()>,
}

/// Takes an answer out of the pending set: only the first taker resolves it, holding the [`Settling`] until done.
fn take(node: &Node, key: &Path) -> Option<(Pending, Settling)> {
    let p = node.pending.lock().unwrap().remove(key)?;
    let (tx, rx) = tokio::sync::watch::channel(());
    let mut s = node.settling.lock().unwrap();
    // Resolutions already over (their sender gone) are forgotten here.
    s.retain(|(_, rx)| rx.has_changed().is_ok());
    s.push((p.ids.clone(), rx));
    Some((p, Settling { _done: tx }))
}

/// Waits until no answer over any of `ids` is being resolved, or `within` passes.
async fn settled(node: &Node, ids: &[String], within: Duration) -> bool {
    let waits: Vec<_> = node
        .settling
        .lock()
        .unwrap()
        .iter()
        .filter(|(held, _)| held.iter().any(|i| ids.contains(i)))
        .map(|(_, rx)| rx.clone())
        .collect();
    let all = futures::future::join_all(waits.into_iter().map(|mut rx| async move {
        // Err once the sender is dropped: the resolution is over.
        while rx.changed().await.is_ok() {}
    }));
    tokio::time::timeout(within, all).await.is_ok()
}

async fn watch_record(node: Arc<Node>, key: std::path::PathBuf) {
    let deadline = Instant::now() + node.timing.confirm_timeout;
    loop {
        let Some(ids) = node
            .pending
            .lock()
            .unwrap()
            .get(&key)
            .map(|p| p.ids.clone())
        else {
            return;
        };
        match holders(&node.pod_resources).await {
            Ok(list) => {
                if let Some(h) = holder_of(&list, &ids) {
                    if let Some((p, _done)) = take(&node, &key) {
                        resolve(&node, p, Some(h.clone())).await;
                    }
                    return;
                }
            }
            Err(e) => tracing::debug!("PodResources: {e:#}"),
        }
        if Instant::now() >= deadline {
            if let Some((p, _done)) = take(&node, &key) {
                resolve(&node, p, None).await;
            }
            return;
        }
        tokio::time::sleep(node.timing.confirm_poll).await;
    }
}

/// The pending answers `pick` selects that the kubelet's record names, each with what the record says of its
/// IDs, taken out of the pending set: the caller resolves them, holding their [`Settling`]. None when the record
/// does not come within `within`.
async fn take_recorded(
    node: &Node,
    within: Duration,
    pick: impl Fn(&Pending) -> bool,
) -> Vec<(Pending, Holder, Settling)> {
    let wanted: Vec<(std::path::PathBuf, Vec<String>)> = node
        .pending
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, p)| pick(p))
        .map(|(k, p)| (k.clone(), p.ids.clone()))
        .collect();
    if wanted.is_empty() {
        return vec![];
    }
    let list = match tokio::time::timeout(within, holders(&node.pod_resources)).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            tracing::debug!("PodResources: {e:#}");
            return vec![];
        }
        Err(_) => {
            tracing::debug!("PodResources: no answer within {within:?}");
            return vec![];
        }
    };
    wanted
        .into_iter()
        .filter_map(|(key, ids)| {
            let h = holder_of(&list, &ids)?.clone();
            let (p, done) = take(node, &key)?;
            Some((p, h, done))
        })
        .collect()
}

/// Resolves every pending answer the kubelet has recorded by now (called by Allocate before it chooses).
pub async fn settle_recorded(node: &Arc<Node>) {
    for (p, h, _done) in take_recorded(node, Duration::from_secs(2), |_| true).await {
        resolve(node, p, Some(h)).await;
    }
}

/// The kubelet's PreStartContainer, just before it starts a container: every answer over its IDs (an init
/// container and the container it hands its devices to share them) is resolved now if the kubelet has recorded
/// it, and whatever is already being resolved (by a watcher, by an Allocate) is waited for, so the limits file is
/// ready and the pod's annotations written before any process of the container runs.
pub async fn settle_ids(node: &Arc<Node>, ids: &[String]) {
    let recorded = take_recorded(node, Duration::from_secs(5), |p| {
        p.ids.iter().any(|i| ids.contains(i))
    })
    .await;
    for (p, h, done) in recorded {
        // In a task of its own: the wait below is bounded, the resolution is not cut short.
        let node = node.clone();
        tokio::spawn(async move {
            resolve(&node, p, Some(h)).await;
            drop(done);
        });
    }
    // At most 20 s: the kubelet gives PreStartContainer 30.
    if !settled(node, ids, Duration::from_secs(20)).await {
        tracing::warn!(
            "PreStartContainer for {ids:?}: still settling after 20 s; letting the container start"
        );
    }
}

/// What the kubelet's record (or its absence) means for one answer; see the module's text.
async fn resolve(node: &Arc<Node>, p: Pending, holder: Option<Holder>) {
    let label = label_of(&p.chosen);
    let Some(h) = holder else {
        let why = format!(
            "the kubelet's PodResources never recorded devices {:?} (prepared for {label}) within {} s",
            p.ids,
            node.timing.confirm_timeout.as_secs()
        );
        revoke(&p, &why);
        allocate::unserve(node, &p.chosen.uid, p.chosen.index);
        return;
    };
    if matches(&h, &p.chosen, &p.ids) || init_seen_on_its_pod(&h, &p.chosen, &p.ids) {
        confirmed(node, p).await;
        return;
    }
    let why = format!(
        "the kubelet gave devices {:?} to {}/{} container {:?}, but Allocate prepared them for {label}",
        h.ids, h.namespace, h.name, h.container
    );
    match adoptable(node, &h, &p).await {
        Ok(theirs) => {
            tracing::info!(
                "{why}: the answer was the same as for {}; it is theirs",
                label_of(&theirs)
            );
            allocate::unserve(node, &p.chosen.uid, p.chosen.index);
            allocate::mark_served(node, &theirs.uid, theirs.index);
            let lines = allocate::limits_lines(&allocate::settings(
                &theirs.devices,
                theirs.policy,
                &node.config,
            ));
            confirmed(
                node,
                Pending {
                    chosen: theirs,
                    lines,
                    ..p
                },
            )
            .await;
        }
        Err(not) => {
            let why = format!("{why}, and {not}");
            revoke(&p, &why);
            allocate::unserve(node, &p.chosen.uid, p.chosen.index);
            if let Some(wrong) = lookup(node, &h.namespace, &h.name, None).await {
                allocate::fail_pod(node, &wrong, &why).await;
            }
        }
    }
}

fn label_of(c: &Chosen) -> String {
    format!("{}/{} container {:?}", c.namespace, c.name, c.container)
}

fn revoke(p: &Pending, why: &str) {
    tracing::error!("{why}: limits revoked");
    if let Err(e) = p.dir.revoke(why) {
        tracing::error!("revoking {}: {e}", p.dir.dir.display());
    }
}

/// The container the record names, as Allocate would have chosen it, if its answer is the one given.
async fn adoptable(node: &Node, h: &Holder, p: &Pending) -> Result<Chosen, String> {
    let who = format!("{}/{} container {:?}", h.namespace, h.name, h.container);
    if !same_ids(&h.ids, &p.ids) {
        return Err(format!("{who} holds other IDs as well ({:?})", h.ids));
    }
    let pod = lookup(node, &h.namespace, &h.name, None)
        .await
        .ok_or_else(|| format!("{who} is not a pod this node knows"))?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let index = allocate::all_containers(&pod)
        .iter()
        .position(|c| c.name == h.container)
        .ok_or_else(|| format!("{who} has no such container"))?;
    // Claimed by a guess not yet settled is no obstacle: two answers can each have guessed the other's pod
    // (each then settles as the other's). Confirmed is.
    if allocate::is_confirmed(node, &uid, index) {
        return Err(format!("{who} was already answered"));
    }
    let cards = node.cards.borrow().clone();
    let only = |u: &str, i: usize| u != uid || i != index;
    let theirs = match allocate::judge(&pod, &node.name, &node.seal_key, &cards, p.ids.len(), &only)
    {
        allocate::Verdict::Candidate(c) if c.index == index => c,
        allocate::Verdict::Refused(why) => return Err(format!("{who} is refused: {why}")),
        _ => return Err(format!("{who} has no placement waiting for these devices")),
    };
    let ours = allocate::settings(&p.chosen.devices, p.chosen.policy, &node.config);
    let mine = allocate::settings(&theirs.devices, theirs.policy, &node.config);
    if ours != mine {
        return Err(format!(
            "its own placement ({}) is not the one answered ({})",
            vgpu_contract::annotations::PodDevices(vec![theirs.devices.clone()]).encode(),
            vgpu_contract::annotations::PodDevices(vec![p.chosen.devices.clone()]).encode()
        ));
    }
    Ok(theirs)
}

/// The record names `p.chosen`: owner, limits ready, annotations, then the cgroup binding once it runs.
async fn confirmed(node: &Arc<Node>, p: Pending) {
    let label = label_of(&p.chosen);
    let c = &p.chosen;
    // The reflector may not have the pod yet (Allocate may have found it by a direct list): ask the API.
    match lookup(node, &c.namespace, &c.name, Some(&c.uid)).await {
        Some(pod) if pod.metadata.uid.as_deref() == Some(c.uid.as_str()) => {}
        Some(pod) => {
            let why = format!(
                "{}/{} is now another pod (UID {}); Allocate prepared {label} for UID {}",
                c.namespace,
                c.name,
                pod.metadata.uid.as_deref().unwrap_or("?"),
                c.uid
            );
            revoke(&p, &why);
            allocate::fail_pod(node, &pod, &why).await;
            return;
        }
        None => {
            revoke(&p, &format!("{label} no longer exists"));
            return;
        }
    }
    let owner = Owner {
        uid: c.uid.clone(),
        namespace: c.namespace.clone(),
        name: c.name.clone(),
        container: c.container.clone(),
    };
    // Compute windows placed by the agent (issue 16): the one call into `windows`.
    let lines = super::windows::with_windows(node, &p.dir, &c.devices, &p.lines);
    if let Err(e) = p.dir.write_owner(&owner).and_then(|_| p.dir.ready(&lines)) {
        tracing::error!(
            "{label}: writing its limits file: {e}: the container stays capped at nothing"
        );
        return;
    }
    allocate::mark_confirmed(node, &c.uid, c.index);
    tracing::info!("{label}: confirmed by the kubelet, limits ready");
    if let Err(e) = allocate::record(node, c).await {
        tracing::warn!("{label}: recording the allocation on the pod: {e}");
    }
    let node = node.clone();
    tokio::spawn(async move { bind_when_started(&node, &p).await });
}

/// The pod from the reflector, else from the API (the reflector may lag behind what the kubelet saw).
/// With `uid`, a reflector copy of another UID (a pod since replaced, or not yet seen) is not taken.
async fn lookup(node: &Node, namespace: &str, name: &str, uid: Option<&str>) -> Option<Arc<Pod>> {
    if let Some(p) =
        current(node, namespace, name).filter(|p| uid.is_none() || p.metadata.uid.as_deref() == uid)
    {
        return Some(p);
    }
    super::pods::get(&node.client, namespace, name)
        .await
        .ok()
        .map(Arc::new)
}

fn current(node: &Node, namespace: &str, name: &str) -> Option<Arc<Pod>> {
    node.pods.state().into_iter().find(|p| {
        p.metadata.namespace.as_deref() == Some(namespace)
            && p.metadata.name.as_deref() == Some(name)
    })
}

/// The container ID the kubelet reports for `container` of the pod (`containerd://<id>` → `<id>`).
pub fn container_id(pod: &Pod, container: &str) -> Option<String> {
    let st = pod.status.as_ref()?;
    st.init_container_statuses
        .iter()
        .flatten()
        .chain(st.container_statuses.iter().flatten())
        .find(|s| s.name == container)
        .and_then(|s| s.container_id.as_deref())
        .and_then(|id| id.split_once("://").map(|(_, id)| id.to_string()))
        .filter(|id| !id.is_empty())
}

/// The cgroup (relative to `root`) of the container `id` of pod `uid`, in any of the kubelet's layouts and
/// under any kubelet `--cgroup-root` (`/kubepods...`, `/kubelet.slice/kubelet-kubepods.slice/...`).
pub fn find_cgroup(root: &Path, uid: &str, id: &str) -> Option<String> {
    fn walk(root: &Path, rel: &str, depth: usize, uid: &str, id: &str) -> Option<String> {
        let r = container_of(rel);
        if r.container_id.as_deref() == Some(id) && r.pod_uid.as_deref() == Some(uid) {
            return Some(rel.to_string());
        }
        if depth > 6 {
            return None;
        }
        let rd = std::fs::read_dir(root.join(rel.trim_start_matches('/'))).ok()?;
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(found) = walk(root, &format!("{rel}/{name}"), depth + 1, uid, id) {
                return Some(found);
            }
        }
        None
    }
    walk(root, "", 0, uid, id)
}

/// Binds the container to its cgroup once it runs, and again each time the runtime restarts it (a new container
/// ID, so a new cgroup), until its pod leaves the node (then [`super::recover::sweep`] unbinds it).
async fn bind_when_started(node: &Node, p: &Pending) {
    let c = &p.chosen;
    let label = label_of(c);
    let deadline = Instant::now() + node.timing.container_id_timeout;
    // The container ID last seen, and the cgroup bound for it (None: none found).
    let mut seen: Option<(String, Option<String>)> = None;
    loop {
        let pod = current(node, &c.namespace, &c.name)
            .filter(|pod| pod.metadata.uid.as_deref() == Some(c.uid.as_str()));
        if pod.is_none() && seen.is_some() {
            return;
        }
        let id = pod
            .as_deref()
            .and_then(|pod| container_id(pod, &c.container));
        match id {
            Some(id) if seen.as_ref().map(|(s, _)| s) != Some(&id) => {
                let old = seen.take().and_then(|(_, cg)| cg);
                let cgroup = find_cgroup(&node.paths.cgroup_root, &c.uid, &id);
                if let Some(old) = old {
                    tracing::info!("{label}: restarted as {id}; unbinding {old}");
                    node.binder.unbind(&old);
                }
                match &cgroup {
                    Some(cg) => node.binder.bind(binding_of(p, cg.clone())),
                    None => tracing::warn!(
                        "{label} ({id}): no cgroup of it under {}; the ledger attributes it by its processes only",
                        node.paths.cgroup_root.display()
                    ),
                }
                seen = Some((id, cgroup));
            }
            Some(_) => {}
            None if seen.is_none() && Instant::now() >= deadline => {
                tracing::warn!(
                    "{label}: no container ID reported within {} s; not bound",
                    node.timing.container_id_timeout.as_secs()
                );
                return;
            }
            None => {}
        }
        let pause = if seen.is_some() { 2000 } else { 500 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

fn binding_of(p: &Pending, cgroup: String) -> Binding {
    let c = &p.chosen;
    Binding {
        cgroup,
        cache_path: p.dir.cache(),
        memory_limits: c
            .devices
            .iter()
            .enumerate()
            .map(|(ordinal, d)| (ordinal as u32, d.mem_mib << 20))
            .collect(),
        sm_limit: c.devices.first().map_or(0, |d| d.cores),
        policy: c.policy.as_str().to_string(),
        source: Source::Allocate,
        pod: Some(PodRef {
            namespace: c.namespace.clone(),
            name: c.name.clone(),
            uid: c.uid.clone(),
            container: c.container.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5d0b2f5a-6f6e-4b6a-9c3e-0a1b2c3d4e5f";
    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn the_container_cgroup_is_found_under_any_kubelet_root_and_only_under_its_pod() {
        let root = std::env::temp_dir().join(format!("vgpu-findcg-{}", std::process::id()));
        let u = UID.replace('-', "_");
        let layouts = [
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"),
            format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"),
            format!("harness/kubepods/besteffort/pod{UID}/{CID}"),
        ];
        for l in &layouts {
            let _ = std::fs::remove_dir_all(&root);
            // The same container ID under another pod first: never taken.
            std::fs::create_dir_all(root.join(format!(
                "kubepods/besteffort/podffffffff-ffff-ffff-ffff-ffffffffffff/{CID}"
            )))
            .unwrap();
            std::fs::create_dir_all(root.join(l)).unwrap();
            assert_eq!(find_cgroup(&root, UID, CID), Some(format!("/{l}")), "{l}");
            assert_eq!(find_cgroup(&root, UID, &CID.replace('0', "1")), None);
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
