//! Helpers for vgpu integration tests: the simulated GPU built by `build.rs` (see `simgpu/`), a fresh card per
//! test, and commands that run the sim's clients with or without the shim preloaded.
//!
//! The simulated card (`simgpu/libcuda.c`, `simgpu/libnvml.c`) is configured by `VGPU_SIM_STATE`,
//! `VGPU_SIM_DEVICES`, `VGPU_SIM_MEMORY_MIB` and `VGPU_SIM_CONTEXT_MIB`; a kernel launch runs `gridDimX`
//! microseconds on it, a `cuGraphLaunch` `(uintptr_t)hGraphExec` microseconds.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// Directory holding the simulated `libcuda.so.1`, `libnvidia-ml.so.1`, `nvidia-smi` and the clients
/// `cuda_oom` (linked), `cuda_oom_dl`, `cuda_allockinds`, `cuda_launch`, `cuda_procaddr`, `cuda_fork`.
pub fn sim_dir() -> PathBuf {
    PathBuf::from(env!("VGPU_SIM_DIR"))
}

/// The shim to preload: `VGPU_SHIM_PATH`, else `target/<profile>/libvgpu.so` next to the test binary's
/// `deps/` directory.
pub fn shim_path() -> PathBuf {
    if let Some(p) = std::env::var_os("VGPU_SHIM_PATH") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let p = profile_dir.join("libvgpu.so");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p vgpu-shim` first (or set VGPU_SHIM_PATH)",
        p.display()
    );
    p
}

/// Variables a test must not inherit from the environment it runs in.
const SCRUBBED: &[&str] = &[
    "LD_PRELOAD",
    "CUDA_DEVICE_MEMORY_LIMIT",
    "CUDA_DEVICE_SM_LIMIT",
    "CUDA_DEVICE_MEMORY_SHARED_CACHE",
    "GPU_CORE_UTILIZATION_POLICY",
    "CUDA_DISABLE_CONTROL",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "VGPU_CARD_DIR",
    "VGPU_LIMITS_FILE",
    "VGPU_LOG",
];

/// One simulated node: a temporary directory with the card's state file, the slices' cache files and the card
/// directory. Removed on drop.
pub struct Sim {
    dir: PathBuf,
    devices: u32,
    memory_mib: u64,
    context_mib: u64,
}

impl Default for Sim {
    fn default() -> Self {
        Self::new()
    }
}

impl Sim {
    /// One 16384 MiB device, 300 MiB per context.
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vgpu-sim-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        ));
        std::fs::create_dir_all(dir.join("card")).expect("create sim dir");
        Sim {
            dir,
            devices: 1,
            memory_mib: 16384,
            context_mib: 300,
        }
    }

    /// Set before the first process starts: the first one fixes the card's shape in the state file.
    pub fn devices(mut self, n: u32) -> Self {
        self.devices = n;
        self
    }
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }
    pub fn context_mib(mut self, mib: u64) -> Self {
        self.context_mib = mib;
        self
    }
    pub fn context_bytes(&self) -> u64 {
        self.context_mib << 20
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state")
    }
    /// The shared-cache file of the "container" `name`.
    pub fn cache_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.cache"))
    }
    /// `VGPU_CARD_DIR` shared by all slices of this node.
    pub fn card_dir(&self) -> PathBuf {
        self.dir.join("card")
    }

    /// `prog` (a name in [`sim_dir`], or a path) against this card, without the shim.
    pub fn cmd(&self, prog: &str) -> Command {
        let path = if prog.contains('/') {
            PathBuf::from(prog)
        } else {
            sim_dir().join(prog)
        };
        let mut c = Command::new(path);
        for v in SCRUBBED {
            c.env_remove(v);
        }
        c.env("LD_LIBRARY_PATH", sim_dir())
            .env("VGPU_SIM_STATE", self.state_path())
            .env("VGPU_SIM_DEVICES", self.devices.to_string())
            .env("VGPU_SIM_MEMORY_MIB", self.memory_mib.to_string())
            .env("VGPU_SIM_CONTEXT_MIB", self.context_mib.to_string())
            // A limits file on the host running the tests must not apply.
            .env("VGPU_LIMITS_FILE", self.dir.join("no-limits-file"))
            .env("VGPU_CARD_DIR", self.card_dir());
        c
    }

    /// `prog` in the container `container` under the shim: `LD_PRELOAD` and the container's cache file. Add the
    /// limits with `.env("CUDA_DEVICE_MEMORY_LIMIT", "4000m")` and so on.
    pub fn shim_cmd(&self, prog: &str, container: &str) -> Command {
        let mut c = self.cmd(prog);
        c.env("LD_PRELOAD", shim_path()).env(
            "CUDA_DEVICE_MEMORY_SHARED_CACHE",
            self.cache_path(container),
        );
        c
    }

    /// Runs `prog` (no shim) to completion and returns its output.
    pub fn run(&self, prog: &str, args: &[&str]) -> Out {
        run(self.cmd(prog).args(args))
    }

    /// `nvidia-smi ARGS` of the stand-in, no shim.
    pub fn smi(&self, args: &[&str]) -> Out {
        self.run("nvidia-smi", args)
    }

    /// (memory.used, memory.total) in MiB of device `dev` as nvidia-smi reports it.
    pub fn smi_memory(&self, dev: usize) -> (u64, u64) {
        let out = self.smi(&[
            "--query-gpu=memory.used,memory.total",
            "--format=csv,noheader,nounits",
        ]);
        out.assert_ok();
        let line = out.stdout.lines().nth(dev).expect("a line per device");
        let mut it = line.split(',').map(|s| s.trim().parse::<u64>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    }

    /// (pid, used MiB) per process on any device, from NVML through nvidia-smi.
    pub fn smi_apps(&self) -> Vec<(u32, u64)> {
        let out = self.smi(&[
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ]);
        out.assert_ok();
        out.stdout
            .lines()
            .map(|l| {
                let mut it = l.split(',').map(|s| s.trim());
                (
                    it.next().unwrap().parse().unwrap(),
                    it.next().unwrap().parse().unwrap(),
                )
            })
            .collect()
    }

    /// The slots of the container `name`'s cache file as the agent would read them (empty if it has none).
    pub fn cache_slots(&self, name: &str) -> Vec<vgpu_contract::cache_layout::SlotView> {
        match vgpu_contract::cache_layout::CacheRegion::open_existing(&self.cache_path(name)) {
            Ok(r) => r.slots(),
            Err(_) => Vec::new(),
        }
    }

    /// Device `dev`'s utilization over the last second (NVML's gpu %).
    pub fn smi_utilization(&self, dev: usize) -> u32 {
        let out = self.smi(&[
            "--query-gpu=utilization.gpu",
            "--format=csv,noheader,nounits",
        ]);
        out.assert_ok();
        out.stdout.lines().nth(dev).unwrap().trim().parse().unwrap()
    }

    /// (pid, smUtil) per process over the last second (nvmlDeviceGetProcessUtilization via `nvidia-smi pmon`).
    pub fn smi_process_utilization(&self) -> Vec<(u32, u32)> {
        let out = self.smi(&["pmon", "-c", "1"]);
        out.assert_ok();
        out.stdout
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[1].parse().unwrap(), f[3].parse().unwrap())
            })
            .collect()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A finished process.
#[derive(Debug)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn assert_ok(&self) -> &Self {
        assert!(self.status.success(), "process failed: {self:#?}");
        self
    }
    /// The MiB of the last `Allocated N MiB` line (0 if none).
    pub fn allocated_mib(&self) -> u64 {
        self.stdout
            .lines()
            .rev()
            .find_map(|l| {
                l.strip_prefix("Allocated ")?
                    .strip_suffix(" MiB")?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }
    /// `Hit the limit after N MiB: rc=R` as (N, R).
    pub fn hit_limit(&self) -> Option<(u64, i32)> {
        let l = self
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("Hit the limit after "))?;
        let (mib, rc) = l.split_once(" MiB: rc=")?;
        Some((mib.parse().ok()?, rc.trim().parse().ok()?))
    }
    /// Every `Device D OOM REQUESTED / LIMIT` on stderr (the shim's refusal line) as (D, REQUESTED, LIMIT).
    pub fn oom_lines(&self) -> Vec<(usize, u64, u64)> {
        self.stderr
            .lines()
            .filter_map(|l| {
                let rest = &l[l.find("Device ")? + "Device ".len()..];
                let mut w = rest.split_whitespace();
                let dev = w.next()?.parse().ok()?;
                (w.next()? == "OOM").then_some(())?;
                let req = w.next()?.parse().ok()?;
                (w.next()? == "/").then_some(())?;
                let limit = w.next()?.trim_end_matches(':').parse().ok()?;
                Some((dev, req, limit))
            })
            .collect()
    }
    /// Whether the process ended by itself with status 0 (not by a signal, not killed for taking too long).
    pub fn exited_cleanly(&self) -> bool {
        self.status.code() == Some(0)
    }
    /// Lines of stdout starting with `prefix`.
    pub fn lines_with<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.stdout.lines().filter(move |l| l.starts_with(prefix))
    }
    /// The value after `key` on the first stdout line that starts with `prefix`, as f64
    /// (e.g. `f64_after("overall", "busy")`).
    pub fn f64_after(&self, prefix: &str, key: &str) -> Option<f64> {
        let l = self.lines_with(prefix).next()?;
        let mut it = l.split_whitespace();
        it.find(|w| *w == key)?;
        it.next()?.parse().ok()
    }
}

/// Limit for any one process of a test: nothing here should take longer.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs to completion (killed after [`PROCESS_TIMEOUT`]) and collects the output.
pub fn run(cmd: &mut Command) -> Out {
    Running::spawn(cmd).finish()
}

/// A process started in the background whose stdout is read line by line as it comes.
pub struct Running {
    pub child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    pub fn spawn(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let (tx, rx) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Running {
            child,
            lines: rx,
            seen: Vec::new(),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a stdout line contains `needle`; returns it, or None after `timeout` or at end of output.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if line.contains(needle) {
                return Some(line);
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) -> Out {
        let _ = self.child.kill();
        self.finish()
    }

    /// Waits for exit (killing it after [`PROCESS_TIMEOUT`]) and collects the output.
    pub fn finish(mut self) -> Out {
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        let stderr = self.stderr.join().unwrap_or_default();
        let mut stdout = self.seen.join("\n");
        if !stdout.is_empty() {
            stdout.push('\n');
        }
        Out {
            status,
            stdout,
            stderr,
        }
    }
}

pub mod kubelet;
pub mod standin;
