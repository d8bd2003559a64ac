//! `vgpu-agent run`: loads and attaches the probes, follows their events, sweeps the node every interval,
//! serves `status` on a root-only unix socket and Prometheus metrics on a port.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;

use crate::gpus::Gpus;
use crate::ledger::Ledger;
use crate::probes::{host_libcuda_candidates, parse_event, Probes};
use crate::procs::{mapped_libcuda, ProcTable};
use crate::report::{AgentInfo, Report};
use crate::state::{Policy, State};

pub const DEFAULT_CACHE_DIR: &str = "/usr/local/vgpu/containers";

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Run without Kubernetes (no kubelet, no API server): the host view, status and metrics only.
    #[arg(long)]
    pub standalone: bool,
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
    #[arg(long, default_value = crate::status::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Prometheus metrics address; "off" for none.
    #[arg(long, default_value = "0.0.0.0:9394")]
    pub metrics_addr: String,
    /// Count kernel launches per process (uprobes on cuLaunchKernel & co.). Off by default: each launch then
    /// costs about 0.5 us more (see docs/agent.md).
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
    #[arg(long, default_value = crate::pins::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// What a stopping agent leaves for its successor in the state file: the ledger's fields, and the holder.
/// (Spelled out rather than a flattened Ledger: serde's flatten cannot read its integer map keys back.)
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Saved {
    #[serde(default)]
    procs: std::collections::HashMap<u32, crate::ledger::ProcMemory>,
    /// The process holding the stopped agent's probes (pid, start time), see [`hand_over_probes`].
    #[serde(default)]
    holder: Option<(u32, u64)>,
    /// Written by a clean stop, after the last event was applied. A crash leaves the sweep's last save,
    /// which may miss events already taken from the ring buffer unless the journal has them.
    #[serde(default)]
    clean: bool,
    /// Number of the last call in `procs`; the journal's later entries come after it.
    #[serde(default)]
    seq: u64,
    /// The agent kept a journal (so after a crash, this plus the journal is everything it applied).
    #[serde(default)]
    journal: bool,
}

pub fn run(args: RunArgs) -> i32 {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
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

/// Holds `<state file>.lock` (flock) for as long as the returned file lives: one agent per state file. A
/// predecessor still stopping gets `wait` to let go.
fn one_agent(state_file: &Path, wait: Duration) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = state_file.with_extension("lock");
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| d.display().to_string())?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| path.display().to_string())?;
    let t = Instant::now();
    loop {
        // SAFETY: flock on a file descriptor we own; LOCK_NB makes it return at once.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        if t.elapsed() >= wait {
            bail!(
                "another vgpu-agent holds {} (one agent per node and state file)",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

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

/// Finds libcuda files mapped by running processes; returns the pids that map one.
fn rescan_libcuda(state: &mut State, probes: &mut Probes) -> Vec<u32> {
    let mut users = vec![];
    let root = Path::new("/proc");
    for pid in crate::procs::pids(root) {
        let files = mapped_libcuda(root, pid);
        if !files.is_empty() {
            users.push(pid);
        }
        for f in files {
            attach(state, probes, &f);
        }
    }
    users
}

async fn serve(args: RunArgs) -> Result<()> {
    if !args.standalone {
        bail!("only --standalone is available in this build: the Kubernetes side (device plugin, registration) is not part of it yet");
    }
    // Two agents on one node would split the pinned ring buffer's events between them and each see half.
    let _lock = one_agent(&args.state_file, Duration::from_secs(30))?;
    let pins = if args.pin_dir.as_os_str() == "off" {
        None
    } else {
        crate::pins::prepare(&args.pin_dir, crate::probes::object())
            .map_err(|e| {
                tracing::warn!(
                    "maps not pinned, so a restart misses the calls made while no agent runs: {e:#}"
                )
            })
            .ok()
    };
    let saved: Option<Saved> = match std::fs::read_to_string(&args.state_file) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| tracing::warn!("ignoring {}: {e}", args.state_file.display()))
            .ok(),
        Err(_) => None,
    };
    // The predecessor's events since its last save are in the pinned ring buffer if it stopped cleanly and
    // its probes stayed attached until ours are: pinned links, or its probe holder still alive.
    let holder = saved
        .as_ref()
        .and_then(|s| s.holder)
        .filter(|(pid, start)| {
            vgpu_contract::cache_layout::process_start_time(*pid) == Some(*start)
        });
    let links_pinned = pins.as_ref().is_some_and(|d| {
        std::fs::read_dir(d.join("links")).is_ok_and(|mut rd| rd.next().is_some())
    });
    let maps_pinned = pins
        .as_ref()
        .is_some_and(|d| d.join(vgpu_agent_ebpf_common::MAP_EVENTS).exists());
    let clean = saved.as_ref().is_some_and(|s| s.clean || s.journal);
    let seamless = clean && maps_pinned && (links_pinned || holder.is_some());
    let mut probes = Probes::load(args.launch_probes, pins.as_deref())?;
    let mut state = State::new(
        args.policy,
        args.cache_dir.clone(),
        args.cgroup_root
            .clone()
            .unwrap_or_else(crate::cgroups::cgroup2_mount),
    );
    state.launch_probes = args.launch_probes;
    match saved {
        Some(ref saved) => {
            state.restore(
                Ledger {
                    procs: saved.procs.clone(),
                },
                !seamless,
            );
            state.seq = saved.seq;
            let journaled =
                crate::journal::read(&crate::journal::path_for(&args.state_file), saved.seq);
            for e in &journaled {
                state.replay(e);
            }
            if !journaled.is_empty() {
                tracing::info!("replayed {} journaled call(s)", journaled.len());
            }
        }
        None => state.procs = ProcTable::scan(),
    }
    match crate::journal::Journal::open(crate::journal::path_for(&args.state_file)) {
        Ok(j) => state.journal = Some(j),
        Err(e) => {
            tracing::warn!("no journal ({e}): an agent crash loses the calls since the last save")
        }
    }
    // The replayed calls are in the ledger now: save it, which empties the journal for this agent.
    save(&mut state, &args.state_file, None, false);
    for p in args
        .libcuda
        .iter()
        .cloned()
        .chain(host_libcuda_candidates())
    {
        attach(&mut state, &mut probes, &p);
    }
    // Attach before adopting: a process seen mapping libcuda now is older than the probes.
    for pid in rescan_libcuda(&mut state, &mut probes) {
        state.adopt_running(pid);
    }
    probes.prune_pinned_links();
    // Our probes are attached: the predecessor's holder may go (their release takes seconds; a call seen by
    // both meanwhile is reported once, since they share the in-flight map).
    if let Some((pid, _)) = holder {
        // SAFETY: kill(2) on a pid whose start time was just checked to be the holder's.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if seamless {
        tracing::info!(
            "took over from the previous agent ({}): no call missed",
            if links_pinned {
                format!("{} libcuda file(s) with pinned probes", probes.adopted())
            } else {
                format!("probe holder pid {}", holder.map_or(0, |h| h.0))
            }
        );
    } else if saved.is_some() {
        tracing::info!(
            "restored the previous agent's ledger; calls made while no agent watched may be missing, so its \
             processes are marked partial ({})",
            if !clean {
                "it did not stop cleanly"
            } else if !maps_pinned {
                "no pinned maps"
            } else {
                "its probes were gone"
            }
        );
    }
    // Cache files as they are now are the limits the agent holds containers to (a later rewrite is flagged).
    state.mirror.rescan();
    if probes.files().is_empty() {
        tracing::warn!(
            "no libcuda file found yet; will probe any that a process maps (or pass --libcuda)"
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
            // Taken before draining: an event leaves the ring buffer only while this holds the lock, so it
            // is applied and journaled at once (a sweep holding the lock would otherwise leave a drained
            // batch in this task's hands, lost if the agent died then).
            let mut g = ev_shared.lock().unwrap();
            while let Some(item) = guard.get_inner_mut().next() {
                if let Some(ev) = parse_event(&item) {
                    g.0.on_event(&ev);
                }
            }
            g.0.flush_journal();
        }
    });

    // Sweeps run on a thread of their own: /proc scans and NVML calls block.
    let sw_shared = shared.clone();
    let sw_args = args.clone();
    std::thread::spawn(move || sweep_loop(sw_shared, gpus, sw_args));

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

    if args.metrics_addr != "off" {
        let m_shared = shared.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let s = m_shared.clone();
                async move { crate::metrics::render(&snapshot(&s)) }
            }),
        );
        let l = tokio::net::TcpListener::bind(&args.metrics_addr)
            .await
            .with_context(|| args.metrics_addr.clone())?;
        tracing::info!("metrics on http://{}/metrics", l.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Events not read by now stay in the ring buffer for the successor (pinned) and must not be half
    // applied here: stop reading before the ledger is saved. The reader stops only between batches.
    events_task.abort();
    let _ = events_task.await;
    // With pinned links nothing is left to hold; links that could not be pinned are held by a child.
    let holder = hand_over_probes(LINGER);
    save_state(&shared, &args.state_file, holder, true);
    let _ = std::fs::remove_file(&args.socket);
    tracing::info!("stopped");
    Ok(())
}

/// How long the stopped agent's probes stay attached for a successor to take over (it ends this sooner).
const LINGER: Duration = Duration::from_secs(120);

/// Keeps this agent's uprobes attached for `linger` after it exits, in a child holding only their fds;
/// returns the child's (pid, start time).
///
/// Releasing a uprobe's bpf link waits a tasks-trace RCU grace period, one link after another: exiting with
/// ~50 links per libcuda file took ~9 s. With the links held elsewhere this process exits at once, and the
/// probes keep writing to the pinned ring buffer until the successor's are attached and it ends the child.
fn hand_over_probes(linger: Duration) -> Option<(u32, u64)> {
    let mut keep: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|rd| {
            rd.filter_map(|e| {
                let e = e.ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                let t = target.to_string_lossy();
                (t == "anon_inode:bpf_link" || t == "anon_inode:[perf_event]")
                    .then(|| e.file_name().to_str()?.parse().ok())?
            })
            .collect()
        })
        .unwrap_or_default();
    if keep.is_empty() {
        return None;
    }
    keep.sort_unstable();
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    let last_fd = (rl.rlim_cur.min(1 << 20) as i32).max(keep.iter().copied().max().unwrap_or(0));
    let ts = libc::timespec {
        tv_sec: linger.as_secs() as libc::time_t,
        tv_nsec: 0,
    };
    // SAFETY: the child of this multi-threaded process only makes async-signal-safe calls (setsid, close,
    // nanosleep, _exit) on data prepared before the fork.
    let child = unsafe {
        let child = libc::fork();
        if child != 0 {
            child // parent (or fork failed: the links are released at exit as before)
        } else {
            // Out of the agent's session and process group, so a signal meant for the agent spares it.
            libc::setsid();
            // Everything but the probes: a listening socket held here would keep the successor from binding it.
            for fd in 0..=last_fd {
                if keep.binary_search(&fd).is_err() {
                    libc::close(fd);
                }
            }
            libc::nanosleep(&ts, std::ptr::null_mut());
            libc::_exit(0);
        }
    };
    if child <= 0 {
        return None;
    }
    let pid = child as u32;
    Some((pid, vgpu_contract::cache_layout::process_start_time(pid)?))
}

pub fn snapshot(shared: &Shared) -> Report {
    let g = shared.lock().unwrap();
    let (state, probes) = &*g;
    let mut r = state.report();
    r.agent = Some(AgentInfo {
        pid: std::process::id(),
        policy: format!("{:?}", state.policy).to_lowercase(),
        ebpf_built_with: crate::probes::BUILT_WITH.into(),
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
        reclaimed_bytes: state.mirror.files.values().map(|f| f.reclaimed_bytes).sum(),
        nvml: state.nvml_status.clone(),
    });
    r
}

fn save_state(shared: &Shared, path: &Path, holder: Option<(u32, u64)>, clean: bool) {
    let mut g = shared.lock().unwrap();
    save(&mut g.0, path, holder, clean);
}

/// Saves the ledger and empties the journal, under the caller's lock, so no call lands in the journal between
/// the two and is lost.
fn save(state: &mut State, path: &Path, holder: Option<(u32, u64)>, clean: bool) {
    state.dirty = false;
    state.flush_journal();
    let text = serde_json::to_string(&Saved {
        procs: state.ledger.procs.clone(),
        holder,
        clean,
        seq: state.seq,
        journal: state.journal.is_some(),
    })
    .unwrap_or_default();
    if let Some(d) = path.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    // Written aside and renamed, so a crash mid-write never leaves half a ledger.
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .is_err()
    {
        tracing::warn!("could not save {}", path.display());
        return;
    }
    if let Some(j) = state.journal.as_mut() {
        let _ = j.truncate();
    }
}

fn sweep_loop(shared: Shared, gpus: Gpus, args: RunArgs) {
    let interval = Duration::from_millis(args.interval_ms.max(50));
    let mut last_rescan = Instant::now();
    loop {
        std::thread::sleep(interval);
        let procs = ProcTable::scan();
        let samples = gpus.sample();
        let rescan = last_rescan.elapsed() >= Duration::from_millis(args.libcuda_rescan_ms);
        let dirty;
        {
            let mut g = shared.lock().unwrap();
            let (state, probes) = &mut *g;
            if rescan {
                rescan_libcuda(state, probes);
                last_rescan = Instant::now();
            }
            let launches = probes.launch_probes().then(|| probes.launch_counts());
            state.gpus = samples;
            let dead = state.sweep(procs, launches);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_agent_on_the_same_state_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("vgpu-lock-test-{}", std::process::id()));
        let state = dir.join("state.json");
        let first = one_agent(&state, Duration::ZERO).unwrap();
        let e = one_agent(&state, Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(e.contains("another vgpu-agent"), "{e}");
        drop(first);
        assert!(
            one_agent(&state, Duration::ZERO).is_ok(),
            "free once the first is gone"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn saved_state_round_trips_and_reads_the_older_format() {
        let mut l = Ledger::default();
        l.procs.insert(42, Default::default());
        l.procs.get_mut(&42).unwrap().total = 7;
        let text = serde_json::to_string(&Saved {
            procs: l.procs.clone(),
            holder: Some((9, 10)),
            clean: true,
            seq: 5,
            journal: true,
        })
        .unwrap();
        let back: Saved = serde_json::from_str(&text).unwrap();
        assert_eq!(back.holder, Some((9, 10)));
        assert!(back.clean);
        assert_eq!(back.procs[&42].total, 7);
        // A state file from before the hand-over: a bare ledger.
        let old = serde_json::to_string(&l).unwrap();
        let back: Saved = serde_json::from_str(&old).unwrap();
        assert_eq!(back.holder, None);
        assert!(
            !back.clean,
            "an old state file says nothing of how its agent stopped"
        );
        assert_eq!(back.procs[&42].total, 7);
    }
}
