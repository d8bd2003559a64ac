//! The pod side of the kubelet: watch the node's pods, admit them one at a time in creation order, run
//! each admitted pod's containers as processes, report their status, and tear a deleted pod down.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;

use super::admission::{self, Allocated};
use super::cgroup::{self, CgroupRoot};
use super::container::{self, ProcessSpec};
use super::devices::DeviceManager;
use super::status::{self, ContainerState, PodState, State};

/// The environment a container gets before its own (an image's `ENV PATH` as container runtimes default it).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
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
    workers: Mutex<HashMap<String, Worker>>,
}

struct Worker {
    /// None while running; Some(grace) asks the worker to stop its containers within grace.
    stop: watch::Sender<Option<Duration>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn uid_of(p: &Pod) -> Option<String> {
    p.metadata.uid.clone()
}

fn ns_of(p: &Pod) -> String {
    p.metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into())
}

fn name_of(p: &Pod) -> String {
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
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: kube::Client,
        devices: Arc<DeviceManager>,
        node: String,
        cgroups: Option<CgroupRoot>,
        run_dir: PathBuf,
        mount_ns: bool,
        container_env: Vec<(String, String)>,
        host_ip: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            devices,
            node,
            cgroups,
            run_dir,
            mount_ns,
            container_env,
            host_ip,
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

    fn log_path(&self, pod: &Pod, container: &str) -> PathBuf {
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
    let mut seen: HashSet<String> = HashSet::new();
    let mut listing: Option<Vec<Pod>> = None;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => listing = Some(Vec::new()),
            Ok(Event::InitApply(p)) => listing.get_or_insert_with(Vec::new).push(p),
            Ok(Event::InitDone) => {
                let mut pods = listing.take().unwrap_or_default();
                // Pods gone while the watch was down are deleted pods.
                let present: HashSet<String> = pods.iter().filter_map(uid_of).collect();
                for uid in seen
                    .iter()
                    .filter(|u| !present.contains(*u))
                    .cloned()
                    .collect::<Vec<_>>()
                {
                    seen.remove(&uid);
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
                    seen.remove(&uid);
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

async fn on_apply(ctx: &Arc<PodContext>, seen: &mut HashSet<String>, pod: Pod) {
    let Some(uid) = uid_of(&pod) else {
        return;
    };
    let deleting = pod.metadata.deletion_timestamp.is_some();
    if seen.contains(&uid) {
        if deleting {
            // Graceful deletion: stop the containers, then remove the object as the kubelet does.
            let ctx = ctx.clone();
            tokio::spawn(async move {
                ctx.stop_pod(&uid, grace_of(&pod)).await;
                finalize_delete(&ctx, &pod).await;
            });
        }
        return;
    }
    seen.insert(uid.clone());
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
    let task = tokio::spawn(run_pod(ctx.clone(), pod, allocs, rx));
    ctx.workers().insert(
        uid,
        Worker {
            stop: tx,
            task: Some(task),
        },
    );
}

/// A started container.
struct Live {
    /// Index in `PodState::init` or `app`.
    index: usize,
    init: bool,
    pgid: i32,
    cgroup: Option<PathBuf>,
}

type Exit = (usize, bool, std::io::Result<std::process::ExitStatus>);

/// Runs the pod's init containers one after another, then its app containers together, until they end or
/// the pod is stopped; then releases everything the pod held.
async fn run_pod(
    ctx: Arc<PodContext>,
    pod: Pod,
    allocs: Vec<Allocated>,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let uid = uid_of(&pod).unwrap_or_default();
    let name = name_of(&pod);
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns_of(&pod));
    let spec = pod.spec.clone().unwrap_or_default();
    let init: Vec<Container> = spec.init_containers.clone().unwrap_or_default();
    let app: Vec<Container> = spec.containers.clone();
    let image = |c: &Container| c.image.clone().unwrap_or_default();
    let mut st = PodState {
        phase: "Pending",
        init: init
            .iter()
            .map(|c| ContainerState::waiting(&c.name, &image(c)))
            .collect(),
        app: app
            .iter()
            .map(|c| ContainerState::waiting(&c.name, &image(c)))
            .collect(),
        start_time: status::now(),
        host_ip: ctx.host_ip.clone(),
    };
    if init.is_empty() {
        for c in &mut st.app {
            c.state = State::Waiting {
                reason: "ContainerCreating".into(),
            };
        }
    }
    status::write(&api, &name, &st.to_patch()).await;

    let mut stopped = false;
    for i in 0..init.len() {
        stopped = run_group(
            &ctx,
            &pod,
            &api,
            &mut st,
            &[(true, i)],
            &init,
            &app,
            &allocs,
            &mut stop,
        )
        .await;
        if stopped || st.init[i].exit_code() != Some(0) {
            break;
        }
    }
    let init_ok = st.init.iter().all(|c| c.exit_code() == Some(0));
    if !stopped && init_ok {
        let group: Vec<(bool, usize)> = (0..app.len()).map(|i| (false, i)).collect();
        run_group(
            &ctx, &pod, &api, &mut st, &group, &init, &app, &allocs, &mut stop,
        )
        .await;
    }
    st.phase = if init_ok && st.app.iter().all(|c| c.exit_code() == Some(0)) {
        "Succeeded"
    } else {
        "Failed"
    };
    status::write(&api, &name, &st.to_patch()).await;
    if let Some(root) = &ctx.cgroups {
        cgroup::remove_pod(&root.pod_dir(&uid)).await;
    }
    ctx.devices.release_pod(&uid);
    tracing::info!(pod = %name, phase = st.phase, "pod ended");
}

/// Starts the group's containers, writes their status, and waits for all of them (or for a stop). Returns
/// whether the pod was stopped.
#[allow(clippy::too_many_arguments)]
async fn run_group(
    ctx: &PodContext,
    pod: &Pod,
    api: &Api<Pod>,
    st: &mut PodState,
    group: &[(bool, usize)],
    init: &[Container],
    app: &[Container],
    allocs: &[Allocated],
    stop: &mut watch::Receiver<Option<Duration>>,
) -> bool {
    let uid = uid_of(pod).unwrap_or_default();
    let name = name_of(pod);
    let mut live: Vec<Live> = Vec::new();
    let mut waits = FuturesUnordered::new();
    for &(is_init, i) in group {
        let c = if is_init { &init[i] } else { &app[i] };
        // allocs follows init containers, then app containers.
        let alloc = &allocs[if is_init { i } else { init.len() + i }];
        let slot = if is_init {
            &mut st.init[i]
        } else {
            &mut st.app[i]
        };
        match start(ctx, pod, &uid, c, alloc).await {
            Ok((id, child, cgroup)) => {
                let pgid = child.id().map(|p| p as i32).unwrap_or(0);
                tracing::info!(pod = %name, container = %c.name, id = %id, pid = pgid, "container started");
                slot.state = State::Running {
                    id,
                    started: status::now(),
                };
                live.push(Live {
                    index: i,
                    init: is_init,
                    pgid,
                    cgroup,
                });
                let mut child = child;
                waits.push(async move { (i, is_init, child.wait().await) });
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(pod = %name, container = %c.name, error = %msg, "container not started");
                slot.state = State::Terminated {
                    id: None,
                    exit_code: 128,
                    signal: None,
                    reason: "StartError".into(),
                    message: Some(msg),
                    started: None,
                    finished: status::now(),
                };
            }
        }
    }
    if group.iter().any(|(is_init, _)| !is_init) && !live.is_empty() {
        st.phase = "Running";
    }
    status::write(api, &name, &st.to_patch()).await;

    let mut stopped = false;
    while !waits.is_empty() {
        tokio::select! {
            Some(exit) = waits.next() => {
                on_exit(st, &mut live, exit).await;
                status::write(api, &name, &st.to_patch()).await;
            }
            r = stop.changed(), if !stopped => {
                let grace = match r {
                    Ok(()) => stop.borrow().unwrap_or(Duration::ZERO),
                    Err(_) => Duration::ZERO,
                };
                stopped = true;
                for l in &live {
                    signal(l, libc::SIGTERM);
                }
                let deadline = tokio::time::Instant::now() + grace;
                while !waits.is_empty() {
                    match tokio::time::timeout_at(deadline, waits.next()).await {
                        Ok(Some(exit)) => on_exit(st, &mut live, exit).await,
                        Ok(None) => break,
                        Err(_) => {
                            for l in &live {
                                signal(l, libc::SIGKILL);
                            }
                            while let Some(exit) = waits.next().await {
                                on_exit(st, &mut live, exit).await;
                            }
                        }
                    }
                }
                status::write(api, &name, &st.to_patch()).await;
            }
        }
    }
    stopped
}

fn signal(l: &Live, sig: i32) {
    if let Some(cg) = &l.cgroup {
        cgroup::signal_all(cg, sig);
    }
    if l.pgid > 0 {
        // SAFETY: kill(2) on the process group the container's process leads (process_group(0) at spawn).
        unsafe {
            libc::kill(-l.pgid, sig);
        }
    }
}

/// The main process ended: as when a container's init process exits, the rest of the container goes too.
async fn on_exit(st: &mut PodState, live: &mut Vec<Live>, (index, init, r): Exit) {
    let Some(pos) = live.iter().position(|l| l.index == index && l.init == init) else {
        return;
    };
    let l = live.remove(pos);
    if l.pgid > 0 {
        // SAFETY: as in `signal`; the group may already be gone.
        unsafe {
            libc::kill(-l.pgid, libc::SIGKILL);
        }
    }
    if let Some(cg) = &l.cgroup {
        cgroup::remove(cg).await;
    }
    let slot = if init {
        &mut st.init[index]
    } else {
        &mut st.app[index]
    };
    let (id, started) = match &slot.state {
        State::Running { id, started } => (Some(id.clone()), Some(started.clone())),
        _ => (None, None),
    };
    let (exit_code, signal) = match &r {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            match (s.code(), s.signal()) {
                (Some(c), _) => (c, None),
                (None, Some(sig)) => (128 + sig, Some(sig)),
                _ => (255, None),
            }
        }
        Err(_) => (255, None),
    };
    slot.state = State::Terminated {
        id,
        exit_code,
        signal,
        reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
        message: r.err().map(|e| format!("waiting for the process: {e}")),
        started,
        finished: status::now(),
    };
}

/// Starts one container: its ID, cgroup, environment and mounts.
async fn start(
    ctx: &PodContext,
    pod: &Pod,
    uid: &str,
    c: &Container,
    alloc: &Allocated,
) -> anyhow::Result<(String, tokio::process::Child, Option<PathBuf>)> {
    admission::pre_start(&ctx.devices, alloc)
        .await
        .map_err(anyhow::Error::msg)?;
    let id = container::new_container_id();
    let cgroup = match &ctx.cgroups {
        Some(root) => Some(root.create(uid, &id)?),
        None => None,
    };
    let spec = ProcessSpec {
        argv: c
            .command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .cloned()
            .collect(),
        env: container_env(ctx, pod, c, alloc),
        working_dir: c.working_dir.as_ref().map(PathBuf::from),
        mounts: alloc.mounts.clone(),
        cgroup: cgroup.clone(),
        mount_ns: ctx.mount_ns,
        log: ctx.log_path(pod, &c.name),
    };
    match container::spawn(&spec) {
        Ok(child) => Ok((id, child, cgroup)),
        Err(e) => {
            if let Some(cg) = &cgroup {
                cgroup::remove(cg).await;
            }
            Err(e)
        }
    }
}

/// The container's environment in the order a runtime applies it (later wins): PATH and HOSTNAME, the
/// stand-in for the image's env, Allocate's envs, then the pod spec's env (so a spec entry overrides a
/// device plugin's, as in Kubernetes). `valueFrom` entries are not resolved.
pub fn container_env(
    ctx: &PodContext,
    pod: &Pod,
    c: &Container,
    alloc: &Allocated,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("HOSTNAME".to_string(), name_of(pod)),
    ];
    env.extend(ctx.container_env.iter().cloned());
    env.extend(alloc.envs.iter().cloned());
    env.extend(
        c.env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?))),
    );
    env
}
