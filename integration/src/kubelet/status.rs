//! What the kubelet writes to the API: pod status (phase, container statuses with their IDs, conditions)
//! and Warning events.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

/// The runtime prefix of container IDs in pod status (the agent strips it to find the cgroup).
pub const RUNTIME: &str = "containerd";

pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn ts(t: &Time) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// One container's state as the harness tracks it.
#[derive(Debug, Clone)]
pub enum State {
    Waiting {
        reason: String,
    },
    Running {
        id: String,
        started: Time,
    },
    Terminated {
        id: Option<String>,
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        message: Option<String>,
        started: Option<Time>,
        finished: Time,
    },
}

#[derive(Debug, Clone)]
pub struct ContainerState {
    pub name: String,
    pub image: String,
    pub state: State,
}

impl ContainerState {
    pub fn waiting(name: &str, image: &str) -> Self {
        Self {
            name: name.to_string(),
            image: image.to_string(),
            state: State::Waiting {
                reason: "PodInitializing".into(),
            },
        }
    }

    pub fn is_terminated(&self) -> bool {
        matches!(self.state, State::Terminated { .. })
    }

    pub fn exit_code(&self) -> Option<i32> {
        match self.state {
            State::Terminated { exit_code, .. } => Some(exit_code),
            _ => None,
        }
    }

    fn to_json(&self) -> Value {
        let id = match &self.state {
            State::Running { id, .. } => Some(id.clone()),
            State::Terminated { id, .. } => id.clone(),
            State::Waiting { .. } => None,
        };
        let running = matches!(self.state, State::Running { .. });
        let state = match &self.state {
            State::Waiting { reason } => json!({"waiting": {"reason": reason}}),
            State::Running { started, .. } => json!({"running": {"startedAt": ts(started)}}),
            State::Terminated {
                id,
                exit_code,
                signal,
                reason,
                message,
                started,
                finished,
            } => {
                let mut t = json!({
                    "exitCode": exit_code,
                    "reason": reason,
                    "finishedAt": ts(finished),
                });
                if let Some(id) = id {
                    t["containerID"] = json!(format!("{RUNTIME}://{id}"));
                }
                if let Some(s) = signal {
                    t["signal"] = json!(s);
                }
                if let Some(m) = message {
                    t["message"] = json!(m);
                }
                if let Some(s) = started {
                    t["startedAt"] = ts(s);
                }
                json!({ "terminated": t })
            }
        };
        let mut v = json!({
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "ready": running,
            "started": running,
            "restartCount": 0,
            "state": state,
        });
        if let Some(id) = id {
            v["containerID"] = json!(format!("{RUNTIME}://{id}"));
        }
        v
    }
}

/// The whole status the kubelet owns, written at once as a merge patch (lists are replaced whole).
#[derive(Debug, Clone)]
pub struct PodState {
    pub phase: &'static str,
    pub init: Vec<ContainerState>,
    pub app: Vec<ContainerState>,
    pub start_time: Time,
    pub host_ip: String,
}

impl PodState {
    pub fn to_patch(&self) -> Value {
        let initialized = self.init.iter().all(|c| c.exit_code() == Some(0));
        let ready = self.phase == "Running"
            && !self.app.is_empty()
            && self
                .app
                .iter()
                .all(|c| matches!(c.state, State::Running { .. }));
        let cond = |t: &str, ok: bool| json!({"type": t, "status": if ok {"True"} else {"False"}, "lastTransitionTime": ts(&now())});
        json!({"status": {
            "phase": self.phase,
            "hostIP": self.host_ip,
            "hostIPs": [{"ip": self.host_ip}],
            "podIP": self.host_ip,
            "podIPs": [{"ip": self.host_ip}],
            "startTime": ts(&self.start_time),
            "conditions": [
                cond("PodScheduled", true),
                cond("Initialized", initialized),
                cond("ContainersReady", ready),
                cond("Ready", ready),
            ],
            "initContainerStatuses": self.init.iter().map(ContainerState::to_json).collect::<Vec<_>>(),
            "containerStatuses": self.app.iter().map(ContainerState::to_json).collect::<Vec<_>>(),
        }})
    }
}

/// Writes the status; a pod deleted meanwhile is not an error.
pub async fn write(api: &Api<Pod>, name: &str, patch: &Value) {
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_not_found() => {}
        Err(e) => tracing::warn!(pod = name, error = %e, "pod status not written"),
    }
}

/// The kubelet's answer to a pod it cannot admit: phase Failed with the reason and message.
/// The status message carries the kubelet's "Pod was rejected: " prefix; the event has the bare message.
pub fn rejected_patch(reason: &str, message: &str) -> Value {
    json!({"status": {
        "phase": "Failed",
        "reason": reason,
        "message": format!("Pod was rejected: {message}"),
        "conditions": null,
        "containerStatuses": null,
        "initContainerStatuses": null,
    }})
}

/// A core/v1 Event about the pod from the kubelet on `node`.
pub async fn event(
    client: &kube::Client,
    pod: &Pod,
    node: &str,
    kind: &str,
    reason: &str,
    message: &str,
) {
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let t = now();
    let ev = Event {
        metadata: ObjectMeta {
            name: Some(format!(
                "{name}.{:x}",
                t.0.as_nanosecond() as u64 ^ u64::from(std::process::id())
            )),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some(kind.into()),
        source: Some(EventSource {
            component: Some("kubelet".into()),
            host: Some(node.into()),
        }),
        reporting_component: Some("kubelet".into()),
        reporting_instance: Some(node.into()),
        first_timestamp: Some(t.clone()),
        last_timestamp: Some(t),
        count: Some(1),
        ..Default::default()
    };
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    if let Err(e) = api.create(&PostParams::default(), &ev).await {
        tracing::warn!(pod = %name, reason, error = %e, "event not recorded");
    }
}
