//! `vgpu-agent status`: asks the running agent over its unix socket (root only, mode 0600); with no agent,
//! says so and shows what the cache files alone tell.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::ebpf::procs::ProcTable;
use crate::ledger::caches::Mirror;
use crate::observe::report::{render_text, ContainerReport, PidReport, Report};

pub const DEFAULT_SOCKET: &str = "/run/vgpu/agent.sock";

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print the snapshot as JSON.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where the cache files are, for the view without an agent.
    #[arg(long, default_value = crate::run::DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
}

pub fn query(socket: &std::path::Path) -> std::io::Result<Report> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // The agent answers on connect and reads nothing: a request line left unread when it closes would reset
    // the connection (AF_UNIX) before this end has read the answer.
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    serde_json::from_str(&buf).map_err(std::io::Error::other)
}

/// What the cache files say without an agent: limits, charges and live pids; nothing is reclaimed.
pub fn from_cache_files(dir: PathBuf, why: &str) -> Report {
    let dir_note = match std::fs::metadata(&dir) {
        Ok(md) if md.is_dir() => None,
        Ok(_) => Some(format!("--cache-dir {} is not a directory", dir.display())),
        Err(e) => Some(format!(
            "--cache-dir {}: {e} (no slice has run here, or pass the directory its cache files are in)",
            dir.display()
        )),
    };
    let mut m = Mirror::new(dir);
    m.rescan();
    let procs = ProcTable::scan();
    m.read_slots(&procs);
    let containers = m
        .files
        .values()
        .map(|f| ContainerReport {
            key: f
                .cgroup
                .clone()
                .unwrap_or_else(|| f.path.display().to_string()),
            cgroup: f.cgroup.clone(),
            pod_uid: f.pod_uid.clone(),
            container_name: f.container_name.clone(),
            cache_file: Some(f.path.display().to_string()),
            limit_bytes: f.limit(),
            sm_limit: f.first_header.sm_limit,
            charged_bytes: f.slots.iter().map(|s| s.charged).sum(),
            throttled_ms: f
                .slots
                .iter()
                .map(|s| s.view.throttled_ns / 1_000_000)
                .sum(),
            pids: f
                .slots
                .iter()
                .map(|s| PidReport {
                    pid: s.host_pid.unwrap_or(s.view.pid),
                    charged_bytes: Some(s.charged),
                    context_bytes: s.view.context_bytes,
                    ..Default::default()
                })
                .collect(),
            warnings: f
                .slots
                .iter()
                .filter(|s| s.host_pid.is_none())
                .map(|s| {
                    format!(
                        "slot {} (pid {} in its namespace) belongs to a process that is gone",
                        s.view.index, s.view.pid
                    )
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    let mut notes = vec![format!("no agent: {why}")];
    notes.extend(dir_note);
    // The GPUs themselves need no agent: NVML answers anyone allowed to open the device.
    let nvml = crate::gpus::Gpus::open();
    let gpus = nvml.sample().into_iter().map(|s| s.gpu).collect::<Vec<_>>();
    if let Some(e) = &nvml.error {
        notes.push(e.clone());
    }
    notes.extend(
        m.errors
            .iter()
            .map(|(p, e)| format!("{}: {e}", p.display())),
    );
    Report {
        source: "cache-files".into(),
        agent: None,
        gpus,
        containers,
        notes,
    }
}

pub fn run(args: StatusArgs) -> i32 {
    let report = match query(&args.socket) {
        Ok(r) => r,
        Err(e) => from_cache_files(args.cache_dir, &format!("{}: {e}", args.socket.display())),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
    } else {
        print!("{}", render_text(&report));
    }
    0
}
