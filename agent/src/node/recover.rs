//! What a restarted agent picks up from the per-container directories, and what it clears away.
//!
//! Allocate records the device IDs it answered with in the directory (`allocated-ids`) and whom it serves
//! (`owner`: the guess, then the kubelet's answer); the directory itself is not mounted, only its files one by
//! one, so no container sees either. An agent restarted between answering and confirming would otherwise leave
//! that container pending until its shim gives up, and could answer its pod a second time: on start, before the
//! plugin serves, every directory not revoked is counted as answered and confirmed again against PodResources
//! (and its container bound for the ledger). Directories of pods no longer on the node are removed once they
//! are old enough that a lagging watch cannot explain it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use vgpu_contract::container_dir as cd;

use super::allocate::{
    all_containers, declared_policy, limits_lines, mark_served, sealed_placement, settings, Chosen,
};
use super::confirm::{self, Pending};
use super::container_dir::ContainerDir;
use super::Node;

/// Name, in the host directory, of the device IDs Allocate answered with (one per line).
pub const IDS_NAME: &str = "allocated-ids";
/// A directory of a pod the API no longer lists is removed after this long.
pub const STALE_AFTER: Duration = Duration::from_secs(600);

pub fn write_ids(dir: &ContainerDir, ids: &[String]) -> std::io::Result<()> {
    std::fs::write(dir.dir.join(IDS_NAME), ids.join("\n") + "\n")
}

fn read_ids(dir: &Path) -> Option<Vec<String>> {
    let t = std::fs::read_to_string(dir.join(IDS_NAME)).ok()?;
    let ids: Vec<String> = t
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    (!ids.is_empty()).then_some(ids)
}

/// The pod UID and container a directory serves: its owner record, else (a directory made before owners
/// were recorded) its name, `<uid>_<container>` then.
fn owner_of(dir: &Path) -> Option<(String, String)> {
    if let Some(o) = (ContainerDir {
        dir: dir.to_path_buf(),
    })
    .read_owner()
    {
        return Some((o.uid, o.container));
    }
    if dir.join(cd::OWNER_NAME).exists() {
        return None;
    }
    let name = dir.file_name()?.to_str()?;
    let (uid, container) = name.split_once('_')?;
    Some((uid.to_string(), container.to_string()))
}

/// Confirms again every container directory that is not revoked (run once the pod reflector is ready).
pub fn resume(node: &Arc<Node>) {
    // Windows first: a container confirmed again keeps the ones its running processes pace by.
    let n = node.windows.recover_dir(&node.paths.containers_dir);
    if n > 0 {
        tracing::info!("took back the compute windows of {n} container(s) from their limits files");
    }
    let Ok(rd) = std::fs::read_dir(&node.paths.containers_dir) else {
        return;
    };
    let pods = node.pods.state();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((uid, container)) = owner_of(&e.path()) else {
            continue;
        };
        let (uid, container) = (uid.as_str(), container.as_str());
        let Some(ids) = read_ids(&e.path()) else {
            continue;
        };
        let limits = std::fs::read_to_string(e.path().join(cd::LIMITS_NAME)).unwrap_or_default();
        // Revoked stays revoked; a damaged file is not made ready by a restart either.
        let state = vgpu_contract::limits::parse_limits_file(&limits)
            .map_err(|e| e.to_string())
            .and_then(|kv| cd::limits_state(&kv));
        if !matches!(state, Ok(cd::LimitsState::Pending | cd::LimitsState::Ready)) {
            continue;
        }
        let Some(pod) = pods.iter().find(|p| p.metadata.uid.as_deref() == Some(uid)) else {
            continue;
        };
        let sealed = match sealed_placement(pod, &node.name, &node.seal_key) {
            Ok(s) => s,
            Err(why) => {
                tracing::warn!("{name}: not resumed: {why}");
                continue;
            }
        };
        let containers = all_containers(pod);
        let Some(index) = containers.iter().position(|c| c.name == container) else {
            continue;
        };
        let (Some(devices), Ok(policy)) = (sealed.0.get(index), declared_policy(containers[index]))
        else {
            continue;
        };
        let s = settings(devices, policy, &node.config);
        let chosen = Chosen {
            pod: pod.clone(),
            uid: uid.to_string(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            index,
            container: container.to_string(),
            devices: devices.clone(),
            policy,
        };
        tracing::info!("{name}: confirming again after a restart (devices {ids:?})");
        mark_served(node, uid, index);
        let p = Pending {
            chosen,
            ids,
            dir: ContainerDir { dir: e.path() },
            lines: limits_lines(&s),
        };
        confirm::register(node, p);
    }
}

/// Removes the directories of pods that are not on this node any more and have not been touched for
/// [`STALE_AFTER`]. Returns the names removed.
pub fn sweep(node: &Node, now: SystemTime) -> Vec<String> {
    super::windows::release_gone(node);
    let rd = std::fs::read_dir(&node.paths.containers_dir);
    let live: std::collections::HashSet<String> = node
        .pods
        .state()
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    // Containers served for pods now gone need no guard against a second Allocate, and their cgroups are
    // nobody's: the ledger forgets them (a later container could be given the same cgroup path only with
    // another pod UID in it, but nothing should be held to a gone pod's limits).
    node.served
        .lock()
        .unwrap()
        .retain(|(uid, _), _| live.contains(uid));
    node.confirmed
        .lock()
        .unwrap()
        .retain(|(uid, _)| live.contains(uid));
    for cgroup in node.binder.unbind_gone(&|uid| live.contains(uid)) {
        tracing::info!("unbound {cgroup}: its pod is gone from this node");
    }
    let mut removed = vec![];
    let Ok(rd) = rd else {
        return removed;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((uid, _)) = owner_of(&e.path()) else {
            continue;
        };
        if live.contains(&uid) || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let age = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        if age < STALE_AFTER {
            continue;
        }
        match std::fs::remove_dir_all(e.path()) {
            Ok(()) => removed.push(name),
            Err(err) => tracing::warn!("removing {}: {err}", e.path().display()),
        }
    }
    removed
}

/// Sweeps every minute until the process ends.
pub async fn sweep_loop(node: Arc<Node>) {
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        for name in sweep(&node, SystemTime::now()) {
            tracing::info!("removed the directory of a pod gone from this node: {name}");
        }
    }
}
