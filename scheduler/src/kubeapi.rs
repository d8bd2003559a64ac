//! The three writes the extender makes to the API server, behind a trait so the extender's logic
//! is tested against a recording fake and the kube-rs implementation against recorded responses.

use k8s_openapi::api::core::v1::{Binding, Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::future::Future;

/// The pod an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent {
    pub pod: PodRef,
    /// `Normal` or `Warning`.
    pub kind: &'static str,
    pub reason: &'static str,
    pub message: String,
}

pub trait ClusterApi: Send + Sync + 'static {
    /// Merges `annotations` (and the `hami.io/vgpu-node` label when given) into the pod.
    fn annotate_pod(
        &self,
        pod: &PodRef,
        annotations: BTreeMap<String, String>,
        node_label: Option<&str>,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// Binds the pod (this UID only) to `node`.
    fn bind_pod(&self, pod: &PodRef, node: &str)
        -> impl Future<Output = Result<(), String>> + Send;

    fn record_event(&self, event: PodEvent) -> impl Future<Output = Result<(), String>> + Send;
}

/// The component name events carry, as `hami-scheduler` does in HAMi.
pub const COMPONENT: &str = "vgpu-scheduler";

#[derive(Clone)]
pub struct KubeApi {
    pub client: Client,
}

fn describe(e: kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("API server refused: {} ({})", s.message, s.reason),
        other => other.to_string(),
    }
}

impl ClusterApi for KubeApi {
    async fn annotate_pod(
        &self,
        pod: &PodRef,
        annotations: BTreeMap<String, String>,
        node_label: Option<&str>,
    ) -> Result<(), String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let mut meta = serde_json::json!({ "annotations": annotations });
        if let Some(node) = node_label {
            meta["labels"] = serde_json::json!({ vgpu_contract::annotations::VGPU_NODE: node });
        }
        api.patch(
            &pod.name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "metadata": meta })),
        )
        .await
        .map(|_| ())
        .map_err(describe)
    }

    async fn bind_pod(&self, pod: &PodRef, node: &str) -> Result<(), String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                // The UID makes the API server refuse the binding if the pod was replaced by a
                // namesake since filter.
                uid: Some(pod.uid.clone()),
                ..Default::default()
            },
            target: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.into()),
                ..Default::default()
            },
        };
        api.create_subresource::<Binding, serde_json::Value>(
            "binding",
            &pod.name,
            &PostParams::default(),
            &binding,
        )
        .await
        .map(|_| ())
        .map_err(describe)
    }

    async fn record_event(&self, e: PodEvent) -> Result<(), String> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &e.pod.namespace);
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", e.pod.name)),
                namespace: Some(e.pod.namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(e.pod.name.clone()),
                namespace: Some(e.pod.namespace.clone()),
                uid: Some(e.pod.uid.clone()),
                ..Default::default()
            },
            reason: Some(e.reason.into()),
            message: Some(e.message),
            type_: Some(e.kind.into()),
            source: Some(EventSource {
                component: Some(COMPONENT.into()),
                host: None,
            }),
            reporting_component: Some(COMPONENT.into()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Default::default()
        };
        api.create(&PostParams::default(), &event)
            .await
            .map(|_| ())
            .map_err(describe)
    }
}
