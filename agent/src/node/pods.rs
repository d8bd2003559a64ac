//! The pods bound to this node, kept by a reflector, and the writes the agent makes to them.

use std::collections::BTreeMap;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};

use super::FIELD_MANAGER;

/// Starts a reflector over the pods whose `spec.nodeName` is `node`; it runs until the process ends and
/// re-lists on its own after a lost watch.
pub fn watch_node_pods(client: kube::Client, node: &str) -> Store<Pod> {
    let api: Api<Pod> = Api::all(client);
    let (reader, writer) = reflector::store();
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = reflector::reflector(writer, watcher(api, cfg)).default_backoff();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p)) => note_arrival(&p),
                Ok(_) => {}
                Err(e) => tracing::warn!("pod watch on this node: {e} (retrying)"),
            }
        }
    });
    reader
}

/// The order in which pods first showed up on this node's watch. The kubelet admits each pod as its own watch of
/// the node delivers it, and every watch of the node's pods delivers the API server's order of their bindings:
/// the order this watch sees (see `allocate::age_key`).
static ARRIVALS: std::sync::LazyLock<
    std::sync::Mutex<(u64, std::collections::HashMap<String, u64>)>,
> = std::sync::LazyLock::new(Default::default);

fn note_arrival(p: &Pod) {
    if let Some(uid) = p.metadata.uid.as_deref() {
        let mut g = ARRIVALS.lock().unwrap();
        if !g.1.contains_key(uid) {
            g.0 += 1;
            let n = g.0;
            g.1.insert(uid.to_string(), n);
            // Bounded: a node holds at most a few hundred pods at once; forget the oldest arrivals.
            if g.1.len() > 65_536 {
                let cut = n.saturating_sub(32_768);
                g.1.retain(|_, v| *v > cut);
            }
        }
    }
}

/// Where the pod came in this node's watch order (`u64::MAX`: not seen by the watch, e.g. found by a list).
pub fn arrival(uid: &str) -> u64 {
    ARRIVALS
        .lock()
        .unwrap()
        .1
        .get(uid)
        .copied()
        .unwrap_or(u64::MAX)
}

pub fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

pub fn pod_label(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// Whether an API error is a failed resourceVersion precondition (409 Conflict).
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Merge-patches `annotations` onto the pod, only if it still has `resource_version` (409 otherwise).
pub async fn patch_annotations(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    resource_version: Option<&str>,
    annotations: &BTreeMap<String, Option<String>>,
) -> Result<Pod, kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut meta = serde_json::json!({ "annotations": annotations });
    if let Some(rv) = resource_version {
        meta["resourceVersion"] = rv.into();
    }
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    api.patch(
        name,
        &pp,
        &Patch::Merge(serde_json::json!({ "metadata": meta })),
    )
    .await
}

pub async fn get(client: &kube::Client, namespace: &str, name: &str) -> Result<Pod, kube::Error> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .get(name)
        .await
}

/// Records a Warning event on the pod (what `kubectl describe pod` shows). Failure to record is logged only:
/// the refusal itself already travelled back through the kubelet.
pub async fn warn_event(client: &kube::Client, pod: &Pod, reason: &str, message: &str) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let ev = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!(
                "{}.",
                pod.metadata.name.as_deref().unwrap_or("pod")
            )),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: pod.metadata.name.clone(),
            namespace: Some(ns.clone()),
            uid: pod.metadata.uid.clone(),
            resource_version: pod.metadata.resource_version.clone(),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some("Warning".into()),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some(FIELD_MANAGER.into()),
            host: None,
        }),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now.clone()),
        count: Some(1),
        ..Default::default()
    };
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    if let Err(e) = api.create(&PostParams::default(), &ev).await {
        tracing::warn!("could not record event {reason} on {}: {e}", pod_label(pod));
    }
}
