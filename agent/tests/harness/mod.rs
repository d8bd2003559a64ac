//! What the agent's end-to-end tests share: a stand-in libcuda and client built with gcc, the agent binary
//! started on them, and cgroups standing in for containers, bound over the agent's bind socket.
// Each test crate uses part of this.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use vgpu_contract::cache_layout::{own_pid_namespace, process_start_time, CacheRegion, HeaderInfo};

pub const MIB: u64 = 1 << 20;
/// One agent at a time: they share the machine's CPUs with the build.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: needs root to load eBPF programs");
        return false;
    }
    true
}

pub struct Fixture {
    pub dir: PathBuf,
    pub lib: PathBuf,
    pub client: PathBuf,
    pub cache_dir: PathBuf,
}

impl Fixture {
    pub fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("vgpu-agent-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("lib")).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixture");
        let lib = dir.join("lib/libcuda.so.1");
        let client = dir.join("client");
        let gcc = |args: &[&str]| {
            let st = Command::new("gcc").args(args).status().expect("gcc");
            assert!(st.success(), "gcc {args:?}");
        };
        gcc(&[
            "-O1",
            "-fPIC",
            "-shared",
            "-Wl,-soname,libcuda.so.1",
            "-o",
            lib.to_str().unwrap(),
            src.join("fakecuda.c").to_str().unwrap(),
        ]);
        let rpath = format!("-Wl,-rpath,{}", dir.join("lib").display());
        let libdir = format!("-L{}", dir.join("lib").display());
        gcc(&[
            "-O1",
            "-o",
            client.to_str().unwrap(),
            src.join("client.c").to_str().unwrap(),
            &libdir,
            "-l:libcuda.so.1",
            &rpath,
        ]);
        let cache_dir = dir.join("caches");
        std::fs::create_dir_all(&cache_dir).unwrap();
        Self {
            dir,
            lib,
            client,
            cache_dir,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::env::var_os("VGPU_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub bind_socket: PathBuf,
}

impl Agent {
    /// An agent with no pinned maps (tests stay off the machine's /sys/fs/bpf).
    pub fn start(fx: &Fixture, policy: &str) -> Self {
        Self::start_pinned(fx, policy, Path::new("off"))
    }

    pub fn start_pinned(fx: &Fixture, policy: &str, pin_dir: &Path) -> Self {
        let socket = fx.dir.join("agent.sock");
        let bind_socket = fx.dir.join("bind.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(env!("CARGO_BIN_EXE_vgpu-agent"))
            .args([
                "run",
                "--standalone",
                "--policy",
                policy,
                "--metrics-addr",
                "off",
                "--interval-ms",
                "200",
            ])
            .arg("--libcuda")
            .arg(&fx.lib)
            .arg("--cache-dir")
            .arg(&fx.cache_dir)
            .arg("--socket")
            .arg(&socket)
            .arg("--bind-socket")
            .arg(&bind_socket)
            .arg("--state-file")
            .arg(fx.dir.join("state.json"))
            .arg("--pin-dir")
            .arg(pin_dir)
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(fx.dir.join("agent.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let mut a = Self {
            child,
            socket,
            bind_socket,
        };
        let t = Instant::now();
        while a.try_status().is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "agent did not come up: {}",
                log(fx)
            );
            if let Ok(Some(st)) = a.child.try_wait() {
                panic!("agent exited {st}: {}", log(fx));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        a
    }

    pub fn try_status(&self) -> Option<Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_vgpu-agent"))
            .args(["status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["source"] == "agent").then_some(v)
    }

    /// Sends one request line on the bind socket (as root); returns the reply.
    pub fn request(&self, req: &Value) -> Value {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&self.bind_socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        writeln!(s, "{req}").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    /// Binds `ctr` as `vgpu-agent exec` does: its cgroup, cache file and limit.
    pub fn bind(&self, ctr: &Container) {
        let r = self.request(&ctr.bind_request());
        assert_eq!(r, Value::from("ok"), "bind {}", ctr.cg);
    }

    pub fn status(&self) -> Value {
        self.try_status().expect("status from the agent")
    }

    /// Polls the status until `f` finds what it wants (or 30 s pass: a loaded machine can delay the probes' events
    /// by seconds; waiting longer only costs time when the test fails).
    pub fn wait_for<T>(&self, what: &str, mut f: impl FnMut(&Value) -> Option<T>) -> T {
        let t = Instant::now();
        loop {
            let s = self.status();
            if let Some(v) = f(&s) {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}; last status: {s:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn log(fx: &Fixture) -> String {
    std::fs::read_to_string(fx.dir.join("agent.log")).unwrap_or_default()
}

pub fn cgroup2() -> PathBuf {
    let m = std::fs::read_to_string("/proc/self/mounts").unwrap();
    m.lines()
        .find(|l| l.split(' ').nth(2) == Some("cgroup2"))
        .map(|l| PathBuf::from(l.split(' ').nth(1).unwrap()))
        .unwrap()
}

/// A cgroup standing in for a container, with its cache file (limit in the header, as the shim writes it);
/// the agent takes the limit from [`Agent::bind`].
pub struct Container {
    pub cg_abs: PathBuf,
    pub cg: String,
    pub cache: CacheRegion,
    pub cache_path: PathBuf,
    pub limit: u64,
}

impl Container {
    pub fn new(fx: &Fixture, name: &str, limit: u64) -> Self {
        let cg = format!("/vgpu-agent-test-{name}-{}", std::process::id());
        let cg_abs = cgroup2().join(cg.trim_start_matches('/'));
        let _ = std::fs::create_dir(&cg_abs);
        let dir = fx.cache_dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut info = HeaderInfo::default();
        info.memory_limits[0] = limit;
        let cache_path = dir.join("vgpu.cache");
        let cache = CacheRegion::open_or_create(&cache_path, &info).unwrap();
        Self {
            cg_abs,
            cg,
            cache,
            cache_path,
            limit,
        }
    }

    pub fn bind_request(&self) -> Value {
        serde_json::json!({"bind": {
            "cgroup": self.cg,
            "cache": self.cache_path,
            "memory_limits": {"0": self.limit},
            "sm_limit": 0,
            "policy": "default",
            "pid": std::process::id(),
        }})
    }

    /// Starts the client in this cgroup; returns it with its stdout.
    pub fn spawn(&self, fx: &Fixture, args: &str) -> (Child, BufReader<ChildStdout>) {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec {} {args}",
            self.cg_abs.display(),
            fx.client.display()
        );
        let mut c = Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(c.stdout.take().unwrap());
        (c, out)
    }

    /// What the shim would do for `pid`: claim a slot and charge `bytes`.
    pub fn charge_as_shim(&self, pid: u32, bytes: u64) -> usize {
        let slot = self
            .cache
            .claim(pid, process_start_time(pid).unwrap(), own_pid_namespace())
            .unwrap();
        self.cache.try_charge(slot, 0, bytes, None).unwrap();
        slot
    }

    pub fn of<'a>(&self, status: &'a Value) -> Option<&'a Value> {
        status["containers"]
            .as_array()?
            .iter()
            .find(|c| c["cgroup"] == self.cg.as_str())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Ok(p) = std::fs::read_to_string(self.cg_abs.join("cgroup.procs")) {
            for pid in p.lines().filter_map(|l| l.parse::<i32>().ok()) {
                // SAFETY: only processes this test put in its own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        let _ = std::fs::remove_dir(&self.cg_abs);
    }
}

pub fn wait_line(out: &mut BufReader<ChildStdout>, want: &str) -> Instant {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "client ended before printing {want:?}"
        );
        if line.trim() == want {
            return Instant::now();
        }
    }
}

pub fn pid_entry(c: &Value, pid: u32) -> Option<&Value> {
    c["pids"].as_array()?.iter().find(|p| p["pid"] == pid)
}

pub fn bytes(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}
