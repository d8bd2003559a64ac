//! `vgpu-agent run`: loads and attaches the probes, follows their events, sweeps the node every interval,
//! serves `status` on a root-only unix socket and Prometheus metrics on a port.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;

use crate::ebpf::libcuda_id::{host_shims, Identities, Scan};
use crate::ebpf::probes::{parse_event, Probes};
use crate::ebpf::procs::ProcTable;
use crate::gpus::Gpus;
use crate::ledger::handover::{hand_over_probes, one_agent, save, Predecessor, LINGER};
use crate::ledger::state::{Policy, State};
use crate::observe::report::{AgentInfo, Report};

pub const DEFAULT_CACHE_DIR: &str = "/usr/local/vgpu/containers";

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Run without Kubernetes (no kubelet, no API server): the host view, status and metrics only.
    #[arg(long)]
    pub standalone: bool,
    /// The Kubernetes node side (ignored with --standalone).
    #[command(flatten)]
    pub node: crate::node::NodeArgs,
    /// What to do about a container past its limit.
    #[arg(long, value_enum, default_value = "report")]
    pub policy: Policy,
    /// Probe this libcuda file too (repeatable). The host's driver files and any libcuda a process maps are
    /// found on their own.
    #[arg(long = "libcuda")]
    pub libcuda: Vec<PathBuf>,
    /// Where the containers' shared-cache files are (searched recursively for *.cache).
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    #[arg(long, default_value = crate::observe::status::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where `vgpu-agent exec` registers its slices (mode 0666; the caller is checked by SO_PEERCRED); "off"
    /// for none.
    #[arg(long, default_value = crate::ledger::bind_socket::DEFAULT_BIND_SOCKET)]
    pub bind_socket: PathBuf,
    /// Prometheus metrics address; "off" for none. Default 0.0.0.0:9394, or 127.0.0.1:9394 with
    /// --metrics-detail (docs/security.md).
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Serve per-tenant detail in the metrics: pids, cgroup paths, cache file paths.
    #[arg(long)]
    pub metrics_detail: bool,
    /// Count kernel launches per process (uprobes on cuLaunchKernel & co.). Off by default: a uprobe trap per
    /// launch cost +1.98% per training step on an H200 (vs +0.39% without) and 15 µs per call on a VM
    /// (docs/agent.md).
    #[arg(long)]
    pub launch_probes: bool,
    /// Sweep interval: exited processes dropped, cache files reclaimed and checked, NVML sampled.
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// Rescan /proc/*/maps for new libcuda files this often.
    #[arg(long, default_value_t = 5000)]
    pub libcuda_rescan_ms: u64,
    /// The ledger is saved here so a restarted agent keeps what it saw (nothing lost, nothing counted twice).
    #[arg(long, default_value = "/run/vgpu/agent-state.json")]
    pub state_file: PathBuf,
    /// The cgroup2 mount (default: found in /proc/self/mounts).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Where on bpffs to pin the maps a restarted agent takes over, so calls made while no agent runs are
    /// still counted; "off" for none.
    #[arg(long, default_value = crate::ebpf::pins::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

pub fn run(args: RunArgs) -> i32 {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match rt.block_on(serve(args)) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e:#}");
            1
        }
    }
}

type Shared = Arc<Mutex<(State, Probes)>>;

fn attach(state: &mut State, probes: &mut Probes, path: &Path) {
    match probes.attach_file(path) {
        Ok(true) => {
            tracing::info!("probing {}", path.display());
            state.libcuda_files = probes
                .files()
                .iter()
                .map(|f| f.path.display().to_string())
                .collect();
        }
        Ok(false) => {}
        Err(e) => tracing::warn!("not probing {}: {e:#}", path.display()),
    }
}

/// The host driver's libcuda files and what every process maps (read without the state lock: the files
/// a process maps may be a tenant's).
fn find_libcuda(ids: &mut Identities, args: &RunArgs) -> (Vec<PathBuf>, Scan) {
    let host = ids.refresh_host(&args.libcuda, &host_shims());
    (host, ids.scan(Path::new("/proc")))
}

/// Probes the host's files, flags private ones; returns the pids that map the host's libcuda.
fn take_libcuda(state: &mut State, probes: &mut Probes, host: &[PathBuf], scan: Scan) -> Vec<u32> {
    for p in host {
        attach(state, probes, p);
    }
    state.set_private_libcuda(scan.private);
    scan.users
}

async fn serve(args: RunArgs) -> Result<()> {
    // Two agents on one node would split the pinned ring buffer's events between them and each see half.
    let _lock = one_agent(&args.state_file, Duration::from_secs(30))?;
    let pins = if args.pin_dir.as_os_str() == "off" {
        None
    } else {
        crate::ebpf::pins::prepare(&args.pin_dir, crate::ebpf::probes::object())
            .map_err(|e| {
                tracing::warn!(
                    "maps not pinned, so a restart misses the calls made while no agent runs: {e:#}"
                )
            })
            .ok()
    };
    let pred = Predecessor::find(&args.state_file, pins.as_deref());
    let mut probes = Probes::load(args.launch_probes, pins.as_deref())?;
    let mut state = State::new(
        args.policy,
        args.cache_dir.clone(),
        args.cgroup_root
            .clone()
            .unwrap_or_else(crate::ledger::cgroups::cgroup2_mount),
    );
    state.launch_probes = args.launch_probes;
    pred.restore_into(&mut state, &args.state_file);
    let mut ids = Identities::default();
    let (host, scan) = find_libcuda(&mut ids, &args);
    // Attach before adopting: a process seen mapping libcuda now is older than the probes.
    for pid in take_libcuda(&mut state, &mut probes, &host, scan) {
        state.adopt_running(pid);
    }
    probes.prune_pinned_links();
    pred.end(&probes);
    if probes.files().is_empty() {
        tracing::warn!(
            "no host libcuda file found yet; will probe one installed in the driver directories later (or pass --libcuda)"
        );
    }
    let ring = probes.take_events()?;
    let gpus = Gpus::open();
    state.nvml_status = gpus.error.clone().unwrap_or_else(|| "NVML ok".into());
    tracing::info!(
        "policy {:?}, {}, cache dir {}",
        args.policy,
        state.nvml_status,
        args.cache_dir.display()
    );
    let shared: Shared = Arc::new(Mutex::new((state, probes)));

    // Events: drained as soon as the ring buffer signals, so enforcement acts within milliseconds.
    let ev_shared = shared.clone();
    let events_task = tokio::spawn(async move {
        // SAFETY: the ring buffer owns its fd and moves into the AsyncFd, so the fd stays open for as long as
        // it is registered.
        let mut fd = match unsafe { AsyncFd::register(ring) } {
            Ok(fd) => fd,
            Err(_) => return tracing::error!("could not register the ring buffer with tokio"),
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            // Clear readiness before draining: the kernel wakes a reader only when it had caught up, so an
            // event landing between a drain and a later clear_ready would never be signalled again.
            guard.clear_ready();
            // An event leaves the ring buffer (when `item` drops) only after it is applied and journaled, so an
            // agent dying at any point loses none: at worst the next one reads it twice, which the ledger
            // absorbs (an allocation or free is keyed by its handle).
            let mut g = ev_shared.lock().unwrap();
            while let Some(item) = guard.get_inner_mut().next() {
                if let Some(ev) = parse_event(&item) {
                    g.0.on_event(&ev);
                    g.0.flush_journal();
                }
            }
        }
    });

    // Sweeps run on a thread of their own: /proc scans and NVML calls block.
    let sw_shared = shared.clone();
    let sw_args = args.clone();
    std::thread::spawn(move || sweep_loop(sw_shared, gpus, ids, sw_args));

    if let Some(dir) = args.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    let _ = std::fs::remove_file(&args.socket);
    let listener = tokio::net::UnixListener::bind(&args.socket)
        .with_context(|| args.socket.display().to_string())?;
    // Only root may read the node's view (it names every container's processes).
    std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o600))?;
    let so_shared = shared.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let json = serde_json::to_vec(&snapshot(&so_shared)).unwrap_or_default();
            tokio::spawn(async move {
                let _ = conn.write_all(&json).await;
                let _ = conn.shutdown().await;
            });
        }
    });

    if args.bind_socket.as_os_str() != "off" {
        let l = crate::ledger::bind_socket::listen(&args.bind_socket)
            .with_context(|| args.bind_socket.display().to_string())?;
        let b_shared = shared.clone();
        let apply: crate::ledger::bind_socket::Apply =
            Arc::new(move |op| b_shared.lock().unwrap().0.apply_bind_op(op));
        let root = args
            .cgroup_root
            .clone()
            .unwrap_or_else(crate::ledger::cgroups::cgroup2_mount);
        tokio::spawn(crate::ledger::bind_socket::serve(l, root, apply));
    }

    let detail = args.metrics_detail;
    let metrics_addr = args.metrics_addr.clone().unwrap_or_else(|| {
        // Detail names every tenant's pids and paths: not for the node's network unless asked for.
        if detail {
            "127.0.0.1:9394"
        } else {
            "0.0.0.0:9394"
        }
        .into()
    });
    if metrics_addr != "off" {
        let m_shared = shared.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let s = m_shared.clone();
                async move { crate::observe::metrics::render(&snapshot(&s), detail) }
            }),
        );
        let l = tokio::net::TcpListener::bind(&metrics_addr)
            .await
            .with_context(|| metrics_addr.clone())?;
        if detail && !l.local_addr()?.ip().is_loopback() {
            tracing::warn!(
                "--metrics-detail on {}: every tenant's pids and paths are served to anyone who reaches it",
                l.local_addr()?
            );
        }
        tracing::info!("metrics on http://{}/metrics", l.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
    }

    let kubernetes = if args.standalone {
        None
    } else {
        Some(start_kubernetes(&args, &shared).await?)
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Events not read by now stay in the ring buffer for the successor (pinned) and must not be half
    // applied here: stop reading before the ledger is saved. The reader stops only between batches.
    if let Some(k) = kubernetes {
        stop_kubernetes(k).await;
    }
    events_task.abort();
    let _ = events_task.await;
    // With pinned links nothing is left to hold; links that could not be pinned are held by a child, for a
    // successor to take over when the ring buffer is pinned, else only while the kernel releases them.
    let linger = if pins.is_some() {
        LINGER
    } else {
        std::time::Duration::ZERO
    };
    let holder = hand_over_probes(linger);
    save_state(&shared, &args.state_file, holder, true);
    let _ = std::fs::remove_file(&args.socket);
    if args.bind_socket.as_os_str() != "off" {
        let _ = std::fs::remove_file(&args.bind_socket);
    }
    match holder {
        Some((pid, _)) if !linger.is_zero() => tracing::info!(
            "stopped; process {pid} (vgpu-probe-hold) keeps the probes that could not be pinned attached for up \
             to {} s so the next agent misses no call: it ends when a new agent starts (or `kill {pid}`; \
             `vgpu-agent unpin` removes pinned ones)",
            linger.as_secs()
        ),
        Some((pid, _)) => tracing::info!(
            "stopped; process {pid} (vgpu-probe-hold) releases the probes' links and exits (the kernel takes \
             about 0.2 s per link)"
        ),
        None => tracing::info!("stopped"),
    }
    Ok(())
}

/// Kubernetes mode: the device plugin, the node's registration and Allocate (`crate::node`).
async fn start_kubernetes(args: &RunArgs, shared: &Shared) -> Result<crate::node::Running> {
    let cgroup_root = args
        .cgroup_root
        .clone()
        .unwrap_or_else(crate::ledger::cgroups::cgroup2_mount);
    crate::node::start(
        &args.node,
        cgroup_root,
        Arc::new(LedgerBinder(shared.clone())),
    )
    .await
    .context("starting the Kubernetes node side")
}

async fn stop_kubernetes(k: crate::node::Running) {
    let _ = k.shutdown.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), k.plugin).await;
}

/// The node side binds each container the kubelet confirmed into the ledger: from then on its limits and
/// cgroup are the ones Allocate answered, whatever files inside the container say.
struct LedgerBinder(Shared);

impl crate::node::bind::ContainerBinder for LedgerBinder {
    fn bind(&self, b: crate::ledger::bindings::Binding) {
        let what = b.pod.as_ref().map_or_else(
            || b.cgroup.clone(),
            |p| format!("{}/{} container {:?}", p.namespace, p.name, p.container),
        );
        let cgroup = b.cgroup.clone();
        let mut g = self.0.lock().unwrap();
        match g.0.bind_container(b) {
            Ok(()) => tracing::info!("bound {what} to cgroup {cgroup} (kubelet)"),
            Err(e) => tracing::warn!("could not bind {what} to cgroup {cgroup}: {e}"),
        }
    }

    fn unbind(&self, cgroup: &str) {
        if let Err(e) = self.0.lock().unwrap().0.unbind(cgroup) {
            tracing::warn!("could not unbind {cgroup}: {e}");
        }
    }

    fn unbind_gone(&self, live: &dyn Fn(&str) -> bool) -> Vec<String> {
        self.0.lock().unwrap().0.unbind_allocated_except(live)
    }
}

pub fn snapshot(shared: &Shared) -> Report {
    let g = shared.lock().unwrap();
    let (state, probes) = &*g;
    let mut r = state.report();
    r.agent = Some(AgentInfo {
        pid: std::process::id(),
        policy: format!("{:?}", state.policy).to_lowercase(),
        ebpf_built_with: crate::ebpf::probes::BUILT_WITH.into(),
        libcuda_files: probes
            .files()
            .iter()
            .map(|f| f.path.display().to_string())
            .collect(),
        launch_probes: probes.launch_probes(),
        events: state.events,
        dropped_events: probes.drops(),
        violations: state.violations,
        kills: state.kills.clone(),
        dead_slot_bytes: state.mirror.dead_total,
        nvml: state.nvml_status.clone(),
    });
    r
}

fn save_state(shared: &Shared, path: &Path, holder: Option<(u32, u64)>, clean: bool) {
    let mut g = shared.lock().unwrap();
    save(&mut g.0, path, holder, clean);
}

fn sweep_loop(shared: Shared, gpus: Gpus, mut ids: Identities, args: RunArgs) {
    let interval = Duration::from_millis(args.interval_ms.max(50));
    let mut last_rescan = Instant::now();
    loop {
        std::thread::sleep(interval);
        let procs = ProcTable::scan();
        let samples = gpus.sample();
        let rescan = last_rescan.elapsed() >= Duration::from_millis(args.libcuda_rescan_ms);
        // Tenant files are read without the lock: a slow one must not stop events, status or metrics.
        let bound = shared.lock().unwrap().0.bound_cache_files();
        let reads = crate::ledger::caches::collect(&args.cache_dir, &bound);
        let found = rescan.then(|| find_libcuda(&mut ids, &args));
        let dirty;
        {
            let mut g = shared.lock().unwrap();
            let (state, probes) = &mut *g;
            if let Some((host, scan)) = found {
                take_libcuda(state, probes, &host, scan);
                last_rescan = Instant::now();
            }
            let launches = probes.launch_probes().then(|| probes.launch_counts());
            state.gpus = samples;
            let dead = state.sweep(procs, launches, reads);
            probes.forget_launches(&dead);
            probes.flush_log();
            state.dropped = probes.drops();
            dirty = state.dirty;
        }
        if dirty {
            save_state(&shared, &args.state_file, None, false);
        }
    }
}
