//! One admitted pod's life: its init containers one after another, then its app containers together, each
//! started as a process and reported in the pod's status, until they end or the pod is stopped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::Api;
use tokio::sync::watch;

use super::admission::{self, Allocated};
use super::cgroup;
use super::container::{self, ProcessSpec};
use super::exec;
use super::pods::{name_of, ns_of, uid_of, PodContext};
use super::status::{self, ContainerState, PodState, State};

/// The environment a container gets before its own (an image's `ENV PATH` as container runtimes default it).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A started container.
struct Live {
    /// Index in `PodState::init` or `app`.
    index: usize,
    init: bool,
    pgid: i32,
    cgroup: Option<PathBuf>,
    /// The exec record, removed when the container ends.
    record: PathBuf,
}

type Exit = (usize, bool, std::io::Result<std::process::ExitStatus>);

/// Runs the pod's init containers one after another, then its app containers together, until they end or
/// the pod is stopped; then releases everything the pod held.
pub(super) async fn run_pod(
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
    if stop.borrow().is_some() {
        return true;
    }
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
                    record: exec::record_path(&ctx.run_dir, &ns_of(pod), &name, &c.name),
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
    let _ = std::fs::remove_file(&l.record);
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
        pid_ns_helper: ctx.pid_ns_helper.clone(),
        log: ctx.log_path(pod, &c.name),
    };
    if !ctx.mount_ns && !spec.mounts.is_empty() {
        tracing::warn!(container = %c.name, mounts = spec.mounts.len(), "--no-mount-ns: Allocate's mounts are not applied");
    }
    match container::spawn(&spec) {
        Ok(child) => {
            let record = exec::ContainerRecord {
                pid: child.id().unwrap_or(0),
                container_id: id.clone(),
                cgroup: cgroup.clone(),
                env: container::effective_env(&spec.env),
                working_dir: spec.working_dir.clone().unwrap_or_else(|| "/".into()),
                mount_ns: spec.mount_ns,
            };
            let path = exec::record_path(&ctx.run_dir, &ns_of(pod), &name_of(pod), &c.name);
            if let Err(e) = exec::write_record(&path, &record) {
                tracing::warn!(error = %format!("{e:#}"), "exec record not written");
            }
            Ok((id, child, cgroup))
        }
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
