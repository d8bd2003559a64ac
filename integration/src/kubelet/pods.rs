//! The pod side of the kubelet: watch the node's pods, admit them one at a time in creation order, run
//! each admitted pod's containers as processes, report their status, and tear a deleted pod down.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;

use super::admission;
use super::cgroup::CgroupRoot;
use super::devices::DeviceManager;
use super::runner;
use super::status;

/// The kubelet's default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// What the pod workers share.
pub struct PodContext {
    pub client: kube::Client,
    pub devices: Arc<DeviceManager>,
    pub node: String,
    pub cgroups: Option<CgroupRoot>,
    pub run_dir: PathBuf,
    pub mount_ns: bool,
    /// Stands for the image's environment: given first, so Allocate's and the spec's entries override it.
    pub container_env: Vec<(String, String)>,
    pub host_ip: String,
    /// See [`super::Config::pid_ns_helper`].
    pub pid_ns_helper: Option<PathBuf>,
    workers: Mutex<HashMap<String, Worker>>,
}

struct Worker {
    /// None while running; Some(grace) asks the worker to stop its containers within grace.
    stop: watch::Sender<Option<Duration>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub(super) fn uid_of(p: &Pod) -> Option<String> {
    p.metadata.uid.clone()
}

pub(super) fn ns_of(p: &Pod) -> String {
    p.metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into())
}

pub(super) fn name_of(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

fn grace_of(p: &Pod) -> Duration {
    p.metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            p.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .map(|s| Duration::from_secs(s.max(0) as u64))
        .unwrap_or(DEFAULT_GRACE)
}

impl PodContext {
    pub fn new(
        client: kube::Client,
        devices: Arc<DeviceManager>,
        cfg: &super::Config,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            devices,
            node: cfg.node_name.clone(),
            cgroups: cfg.cgroup_root.clone().map(CgroupRoot),
            run_dir: cfg.run_dir.clone(),
            mount_ns: cfg.mount_ns,
            container_env: cfg.container_env.clone(),
            host_ip: cfg.host_ip.clone(),
            pid_ns_helper: cfg.pid_ns_helper.clone(),
            workers: Mutex::default(),
        })
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Worker>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the pod's containers (SIGTERM, then SIGKILL after `grace`) and waits until its processes,
    /// cgroups and devices are gone.
    pub async fn stop_pod(&self, uid: &str, grace: Duration) {
        let task = {
            let mut w = self.workers();
            let Some(worker) = w.get_mut(uid) else {
                return;
            };
            let _ = worker.stop.send(Some(grace));
            worker.task.take()
        };
        if let Some(t) = task {
            let _ = t.await;
        }
        self.workers().remove(uid);
    }

    /// Stops every pod (the harness is shutting down).
    pub async fn stop_all(&self, grace: Duration) {
        let uids: Vec<String> = self.workers().keys().cloned().collect();
        futures::future::join_all(uids.iter().map(|u| self.stop_pod(u, grace))).await;
    }

    pub(super) fn log_path(&self, pod: &Pod, container: &str) -> PathBuf {
        self.run_dir
            .join("logs")
            .join(format!("{}_{}_{}.log", ns_of(pod), name_of(pod), container))
    }
}

/// Watches the node's pods until the stream ends (it does not: the watcher re-lists on errors).
pub async fn watch_pods(ctx: Arc<PodContext>) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node));
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut seen = Seen::default();
    let mut listing: Option<Vec<Pod>> = None;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => listing = Some(Vec::new()),
            Ok(Event::InitApply(p)) => listing.get_or_insert_with(Vec::new).push(p),
            Ok(Event::InitDone) => {
                let mut pods = listing.take().unwrap_or_default();
                // Pods gone while the watch was down are deleted pods.
                let present: HashSet<String> = pods.iter().filter_map(uid_of).collect();
                let gone: Vec<String> = seen
                    .pods
                    .iter()
                    .filter(|u| !present.contains(*u))
                    .cloned()
                    .collect();
                for uid in gone {
                    seen.forget(&uid);
                    spawn_stop(&ctx, uid, Duration::ZERO);
                }
                // The kubelet admits a batch of pods sorted by creation time.
                pods.sort_by(|a, b| {
                    a.metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0)
                        .cmp(&b.metadata.creation_timestamp.as_ref().map(|t| t.0))
                });
                for p in pods {
                    on_apply(&ctx, &mut seen, p).await;
                }
            }
            Ok(Event::Apply(p)) => on_apply(&ctx, &mut seen, p).await,
            Ok(Event::Delete(p)) => {
                if let Some(uid) = uid_of(&p) {
                    seen.forget(&uid);
                    spawn_stop(&ctx, uid, Duration::ZERO);
                }
            }
            Err(e) => tracing::warn!(error = %e, "pod watch failed; retrying"),
        }
    }
}

fn spawn_stop(ctx: &Arc<PodContext>, uid: String, grace: Duration) {
    let ctx = ctx.clone();
    tokio::spawn(async move { ctx.stop_pod(&uid, grace).await });
}

/// The pods the watch loop has handled, and those being torn down after a graceful delete.
#[derive(Default)]
struct Seen {
    pods: HashSet<String>,
    terminating: HashSet<String>,
}

impl Seen {
    fn forget(&mut self, uid: &str) {
        self.pods.remove(uid);
        self.terminating.remove(uid);
    }
}

async fn on_apply(ctx: &Arc<PodContext>, seen: &mut Seen, pod: Pod) {
    let Some(uid) = uid_of(&pod) else {
        return;
    };
    // The field selector should have kept other nodes' pods out; a server that ignores it must not make
    // this node run them.
    if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(ctx.node.as_str()) {
        tracing::warn!(pod = %name_of(&pod), "ignoring a pod of another node (the API server ignored spec.nodeName=)");
        return;
    }
    let deleting = pod.metadata.deletion_timestamp.is_some();
    if seen.pods.contains(&uid) {
        // Our own status writes during the teardown come back as updates: one teardown per pod.
        if deleting && seen.terminating.insert(uid.clone()) {
            // Graceful deletion: stop the containers, then remove the object as the kubelet does.
            let ctx = ctx.clone();
            tokio::spawn(async move {
                ctx.stop_pod(&uid, grace_of(&pod)).await;
                finalize_delete(&ctx, &pod).await;
            });
        }
        return;
    }
    seen.pods.insert(uid.clone());
    if deleting {
        finalize_delete(ctx, &pod).await;
        return;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if !matches!(phase, None | Some("Pending")) {
        // Ended, or started by an earlier harness whose processes are gone: not ours to run.
        tracing::info!(pod = %name_of(&pod), ?phase, "not admitting a pod past Pending");
        return;
    }
    admit_and_start(ctx, pod).await;
}

async fn finalize_delete(ctx: &PodContext, pod: &Pod) {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns_of(pod));
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&name_of(pod), &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_not_found() || s.code == 409 => {}
        Err(e) => tracing::warn!(pod = %name_of(pod), error = %e, "final delete failed"),
    }
}

/// Admission (one pod at a time: the caller awaits this before the next pod) and the start of its worker.
async fn admit_and_start(ctx: &Arc<PodContext>, pod: Pod) {
    let uid = uid_of(&pod).unwrap_or_default();
    let name = name_of(&pod);
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns_of(&pod));
    let allocs = match admission::admit(&ctx.devices, &pod).await {
        Ok(a) => a,
        Err(r) => {
            tracing::warn!(pod = %name, reason = %r.reason, message = %r.message, "pod rejected");
            status::write(&api, &name, &status::rejected_patch(&r.reason, &r.message)).await;
            status::event(
                &ctx.client,
                &pod,
                &ctx.node,
                "Warning",
                &r.reason,
                &r.message,
            )
            .await;
            return;
        }
    };
    tracing::info!(pod = %name, "admitted");
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(runner::run_pod(ctx.clone(), pod, allocs, rx));
    ctx.workers().insert(
        uid,
        Worker {
            stop: tx,
            task: Some(task),
        },
    );
}
