//! The Node object as the kubelet keeps it: created if absent, `Ready`, and capacity/allocatable for each
//! device-plugin resource (capacity counts every device, allocatable the healthy ones).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

use super::devices::{DeviceManager, ResourceCount};
use super::status;

/// Creates the Node if it does not exist.
pub async fn ensure(client: &kube::Client, node: &str) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    if api.get_opt(node).await?.is_some() {
        return Ok(());
    }
    let n = Node {
        metadata: ObjectMeta {
            name: Some(node.to_string()),
            labels: Some(
                [
                    ("kubernetes.io/hostname".to_string(), node.to_string()),
                    ("kubernetes.io/os".to_string(), "linux".to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &n).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("creating the Node {node}"))),
    }
}

fn host_memory_ki() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The status patch: the host's cpu/memory, 110 pods, each device resource, and a Ready condition.
pub fn status_patch(counts: &BTreeMap<String, ResourceCount>, host_ip: &str) -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut capacity = json!({
        "cpu": cpus.to_string(),
        "memory": format!("{}Ki", host_memory_ki()),
        "pods": "110",
    });
    let mut allocatable = capacity.clone();
    for (name, c) in counts {
        capacity[name] = json!(c.capacity.to_string());
        allocatable[name] = json!(c.allocatable.to_string());
    }
    let now = serde_json::to_value(status::now()).unwrap_or(Value::Null);
    json!({"status": {
        "capacity": capacity,
        "allocatable": allocatable,
        "addresses": [{"type": "InternalIP", "address": host_ip}],
        "conditions": [{
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "kubelet is posting ready status",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }],
    }})
}

/// Patches the Node's status whenever the device lists change.
pub async fn follow(
    client: kube::Client,
    node: String,
    devices: Arc<DeviceManager>,
    host_ip: String,
) {
    let api: Api<Node> = Api::all(client.clone());
    let mut changed = devices.subscribe();
    let mut last: Option<BTreeMap<String, ResourceCount>> = None;
    // Resources once reported stay on the Node at zero after their plugin is forgotten (a kubelet restart),
    // as the kubelet's checkpoint keeps them; a merge patch would otherwise leave the stale count.
    let mut reported: BTreeMap<String, ResourceCount> = BTreeMap::new();
    loop {
        let mut counts = devices.counts();
        for name in reported.keys() {
            counts.entry(name.clone()).or_insert(ResourceCount {
                capacity: 0,
                allocatable: 0,
            });
        }
        if last.as_ref() != Some(&counts) {
            let patch = status_patch(&counts, &host_ip);
            match api
                .patch_status(&node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(node = %node, ?counts, "node status written");
                    reported.clone_from(&counts);
                    last = Some(counts);
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => {
                    if let Err(e) = ensure(&client, &node).await {
                        tracing::warn!(error = %format!("{e:#}"), "node not created");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(node = %node, error = %e, "node status not written; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        if changed.changed().await.is_err() {
            return;
        }
    }
}
