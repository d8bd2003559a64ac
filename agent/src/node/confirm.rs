//! After Allocate answered: the kubelet's own record (PodResources `List`) says which pod and container hold
//! the device IDs. Only when it names the pod and container Allocate chose does the limits file turn ready;
//! otherwise it is revoked (the shim refuses everything), the pod really on those devices is failed with the
//! reason, and the placement Allocate took goes back to its own pod. The ledger is then told the container's
//! cgroup, found from the container ID the kubelet reports in the pod's status, never from a file the tenant
//! can write.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use vgpu_kubelet_api::podresources::pod_resources_lister_client::PodResourcesListerClient;
use vgpu_kubelet_api::podresources::ListPodResourcesRequest;

use super::allocate::{self, Chosen};
use super::bind::{Binding, PodRef};
use super::container_dir::{ContainerDir, Settings};
use super::{Node, RESOURCE_NAME};
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

/// Asks the kubelet which container holds any of `ids`.
pub async fn holder_of(socket: &Path, ids: &[String]) -> anyhow::Result<Option<Holder>> {
    let ch = super::unix::channel(socket).await?;
    let list = PodResourcesListerClient::new(ch)
        .list(ListPodResourcesRequest {})
        .await?
        .into_inner();
    for pr in list.pod_resources {
        for c in pr.containers {
            let held: Vec<String> = c
                .devices
                .iter()
                .filter(|d| d.resource_name == RESOURCE_NAME)
                .flat_map(|d| d.device_ids.iter().cloned())
                .collect();
            if held.iter().any(|h| ids.contains(h)) {
                return Ok(Some(Holder {
                    namespace: pr.namespace,
                    name: pr.name,
                    container: c.name,
                    ids: held,
                }));
            }
        }
    }
    Ok(None)
}

/// Whether the kubelet's record is exactly what Allocate chose.
pub fn matches(h: &Holder, c: &Chosen, ids: &[String]) -> bool {
    let mut a = h.ids.clone();
    let mut b = ids.to_vec();
    a.sort();
    b.sort();
    h.namespace == c.namespace && h.name == c.name && h.container == c.container && a == b
}

pub async fn run(node: Arc<Node>, p: Pending) {
    let label = format!(
        "{}/{} container {:?}",
        p.chosen.namespace, p.chosen.name, p.chosen.container
    );
    let deadline = Instant::now() + node.timing.confirm_timeout;
    let holder = loop {
        match holder_of(&node.pod_resources, &p.ids).await {
            Ok(Some(h)) => break Some(h),
            Ok(None) => {}
            Err(e) => tracing::debug!("PodResources: {e:#}"),
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(node.timing.confirm_poll).await;
    };
    let Some(h) = holder else {
        let why = format!(
            "the kubelet's PodResources never recorded devices {:?} (prepared for {label}) within {} s",
            p.ids,
            node.timing.confirm_timeout.as_secs()
        );
        tracing::warn!("{why}: limits revoked");
        if let Err(e) = p.dir.revoke(&why) {
            tracing::error!("revoking {}: {e}", p.dir.dir.display());
        }
        return;
    };
    let why = if !matches(&h, &p.chosen, &p.ids) {
        format!(
            "the kubelet gave devices {:?} to {}/{} container {:?}, but Allocate prepared them for {label}",
            h.ids, h.namespace, h.name, h.container
        )
    } else {
        // The reflector may not have the pod yet (Allocate may have found it by a direct list): ask the API.
        match lookup(
            &node,
            &p.chosen.namespace,
            &p.chosen.name,
            Some(&p.chosen.uid),
        )
        .await
        {
            Some(pod) if pod.metadata.uid.as_deref() == Some(p.chosen.uid.as_str()) => {
                match p.dir.ready(&p.lines) {
                    Ok(()) => tracing::info!("{label}: confirmed by the kubelet, limits ready"),
                    Err(e) => {
                        tracing::error!(
                            "{label}: writing its limits file: {e}: the container stays capped at nothing"
                        );
                        return;
                    }
                }
                bind_when_started(&node, &p).await;
                return;
            }
            Some(pod) => format!(
                "{}/{} is now another pod (UID {}); Allocate prepared {label} for UID {}",
                p.chosen.namespace,
                p.chosen.name,
                pod.metadata.uid.as_deref().unwrap_or("?"),
                p.chosen.uid
            ),
            None => format!("{label} no longer exists"),
        }
    };
    tracing::error!("{why}: limits revoked");
    if let Err(e) = p.dir.revoke(&why) {
        tracing::error!("revoking {}: {e}", p.dir.dir.display());
    }
    if let Some(wrong) = lookup(&node, &h.namespace, &h.name, None).await {
        allocate::fail_pod(&node, &wrong, &why).await;
    }
    let same_pod = h.namespace == p.chosen.namespace && h.name == p.chosen.name;
    if !same_pod {
        // The chosen pod's own container is still to come: give its placement back.
        allocate::unserve(&node, &p.chosen.uid, p.chosen.index);
        if let Err(e) = allocate::record(&node, &p.chosen, false).await {
            tracing::warn!("giving the placement back to {label}: {e}");
        }
    }
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

async fn bind_when_started(node: &Node, p: &Pending) {
    let c = &p.chosen;
    let deadline = Instant::now() + node.timing.container_id_timeout;
    loop {
        let started = current(node, &c.namespace, &c.name)
            .filter(|pod| pod.metadata.uid.as_deref() == Some(c.uid.as_str()))
            .and_then(|pod| container_id(&pod, &c.container));
        if let Some(id) = started {
            let Some(cgroup) = find_cgroup(&node.paths.cgroup_root, &c.uid, &id) else {
                tracing::warn!(
                    "{}/{} container {:?} ({id}): no cgroup of it under {}; the ledger attributes it by its processes only",
                    c.namespace, c.name, c.container, node.paths.cgroup_root.display()
                );
                return;
            };
            node.binder.bind(Binding {
                cgroup,
                cache_path: p.dir.cache(),
                limits: c
                    .devices
                    .iter()
                    .map(|d| (d.uuid.clone(), d.mem_mib << 20))
                    .collect(),
                sm_limit: c.devices.first().map_or(0, |d| d.cores),
                policy: c.policy.as_str().to_string(),
                source: "kubelet",
                pod: PodRef {
                    namespace: c.namespace.clone(),
                    name: c.name.clone(),
                    uid: c.uid.clone(),
                    container: c.container.clone(),
                },
            });
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                "{}/{} container {:?}: no container ID reported within {} s; not bound",
                c.namespace,
                c.name,
                c.container,
                node.timing.container_id_timeout.as_secs()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
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
