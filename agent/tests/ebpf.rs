//! End-to-end tests with real uprobes: the agent binary attached to a stand-in libcuda (tests/fixture,
//! built here with gcc) while test workloads allocate through it in cgroups of their own.
//! They need root and a kernel with uprobes (CI has both); as another user they skip, saying why.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use vgpu_contract::cache_layout::{own_pid_namespace, process_start_time, CacheRegion, HeaderInfo};

const MIB: u64 = 1 << 20;
/// One agent at a time: they share the machine's CPUs with the build.
static SERIAL: Mutex<()> = Mutex::new(());

fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: needs root to load eBPF programs");
        return false;
    }
    true
}

struct Fixture {
    dir: PathBuf,
    lib: PathBuf,
    client: PathBuf,
    cache_dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Self {
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

struct Agent {
    child: Child,
    socket: PathBuf,
    bind_socket: PathBuf,
}

impl Agent {
    /// An agent with no pinned maps (tests stay off the machine's /sys/fs/bpf).
    fn start(fx: &Fixture, policy: &str) -> Self {
        Self::start_pinned(fx, policy, Path::new("off"))
    }

    fn start_pinned(fx: &Fixture, policy: &str, pin_dir: &Path) -> Self {
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

    fn try_status(&self) -> Option<Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_vgpu-agent"))
            .args(["status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["source"] == "agent").then_some(v)
    }

    /// Sends one request line on the bind socket (as root); returns the reply.
    fn request(&self, req: &Value) -> Value {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&self.bind_socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        writeln!(s, "{req}").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    /// Binds `ctr` as `vgpu-agent exec` does: its cgroup, cache file and limit.
    fn bind(&self, ctr: &Container) {
        let r = self.request(&ctr.bind_request());
        assert_eq!(r, Value::from("ok"), "bind {}", ctr.cg);
    }

    fn status(&self) -> Value {
        self.try_status().expect("status from the agent")
    }

    /// Polls the status until `f` finds what it wants (or 10 s pass).
    fn wait_for<T>(&self, what: &str, mut f: impl FnMut(&Value) -> Option<T>) -> T {
        let t = Instant::now();
        loop {
            let s = self.status();
            if let Some(v) = f(&s) {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}; last status: {s:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
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

fn log(fx: &Fixture) -> String {
    std::fs::read_to_string(fx.dir.join("agent.log")).unwrap_or_default()
}

fn cgroup2() -> PathBuf {
    let m = std::fs::read_to_string("/proc/self/mounts").unwrap();
    m.lines()
        .find(|l| l.split(' ').nth(2) == Some("cgroup2"))
        .map(|l| PathBuf::from(l.split(' ').nth(1).unwrap()))
        .unwrap()
}

/// A cgroup standing in for a container, with its cache file (limit in the header, as the shim writes it);
/// the agent takes the limit from [`Agent::bind`].
struct Container {
    cg_abs: PathBuf,
    cg: String,
    cache: CacheRegion,
    cache_path: PathBuf,
    limit: u64,
}

impl Container {
    fn new(fx: &Fixture, name: &str, limit: u64) -> Self {
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

    fn bind_request(&self) -> Value {
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
    fn spawn(&self, fx: &Fixture, args: &str) -> (Child, BufReader<ChildStdout>) {
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
    fn charge_as_shim(&self, pid: u32, bytes: u64) -> usize {
        let slot = self
            .cache
            .claim(pid, process_start_time(pid).unwrap(), own_pid_namespace())
            .unwrap();
        self.cache.try_charge(slot, 0, bytes, None).unwrap();
        slot
    }

    fn of<'a>(&self, status: &'a Value) -> Option<&'a Value> {
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

fn wait_line(out: &mut BufReader<ChildStdout>, want: &str) -> Instant {
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

fn pid_entry(c: &Value, pid: u32) -> Option<&Value> {
    c["pids"].as_array()?.iter().find(|p| p["pid"] == pid)
}

fn bytes(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[test]
fn processes_with_and_without_the_shim_are_seen_and_a_crash_drops_memory() {
    if !root_or_skip("processes_with_and_without_the_shim_are_seen") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new("seen");
    let ctr = Container::new(&fx, "seen", 4000 * MIB);
    let agent = Agent::start(&fx, "report");
    agent.bind(&ctr);

    let (mut shimmed, mut out1) = ctr.spawn(&fx, "3 64 0 60");
    wait_line(&mut out1, "alloc 2");
    ctr.charge_as_shim(shimmed.id(), 3 * 64 * MIB);
    let (mut bare, mut out2) = ctr.spawn(&fx, "2 64 0 60");
    wait_line(&mut out2, "alloc 1");
    let (p1, p2) = (shimmed.id(), bare.id());

    let c = agent.wait_for("both processes", |s| {
        let c = ctr.of(s)?.clone();
        (bytes(&c["ebpf_bytes"]) == 5 * 64 * MIB && !c["warnings"].as_array()?.is_empty())
            .then_some(c)
    });
    assert_eq!(bytes(&c["charged_bytes"]), 3 * 64 * MIB);
    assert_eq!(bytes(&c["limit_bytes"]), 4000 * MIB);
    assert_eq!(
        bytes(&pid_entry(&c, p1).unwrap()["ebpf_bytes"]),
        3 * 64 * MIB
    );
    assert_eq!(
        bytes(&pid_entry(&c, p1).unwrap()["charged_bytes"]),
        3 * 64 * MIB
    );
    assert!(
        pid_entry(&c, p2).unwrap()["charged_bytes"].is_null(),
        "the bare process has no slot: {c:#}"
    );
    assert_eq!(
        bytes(&pid_entry(&c, p2).unwrap()["ebpf_bytes"]),
        2 * 64 * MIB
    );
    let w = c["warnings"].to_string();
    assert!(
        w.contains(&format!("pid {p2} holds 128 MiB without the shim")),
        "{w}"
    );
    assert!(
        !w.contains(&format!("pid {p1}")),
        "the shimmed process agrees with its slot: {w}"
    );

    // kill -9: its memory leaves the eBPF view and its slot's charge stops counting.
    shimmed.kill().unwrap();
    shimmed.wait().unwrap();
    let c = agent.wait_for("the crash to be noticed", |s| {
        let c = ctr.of(s)?.clone();
        (pid_entry(&c, p1).is_none() && bytes(&c["charged_bytes"]) == 0).then_some(c)
    });
    assert_eq!(bytes(&c["ebpf_bytes"]), 2 * 64 * MIB);
    assert_eq!(
        ctr.cache.slots().len(),
        1,
        "the agent never writes a tenant's file: the shim reclaims the slot on its next refused charge"
    );
    assert_eq!(
        bytes(&agent.status()["agent"]["dead_slot_bytes"]),
        3 * 64 * MIB
    );
    bare.kill().unwrap();
    let _ = bare.wait();
}

fn over_limit(policy: &str) -> (Value, Option<std::process::ExitStatus>, Duration) {
    let fx = Fixture::new(&format!("limit-{policy}"));
    let ctr = Container::new(&fx, policy, 256 * MIB);
    let agent = Agent::start(&fx, policy);
    agent.bind(&ctr);
    // 64 MiB every 400 ms without the shim: the fifth allocation takes it to 320 MiB, past 256.
    let (mut c, mut out) = ctr.spawn(&fx, "5 64 400 30");
    wait_line(&mut out, "alloc 3");
    let t = Instant::now();
    let mut status = None;
    while t.elapsed() < Duration::from_secs(3) {
        if let Some(st) = c.try_wait().unwrap() {
            status = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let waited = t.elapsed();
    let s = agent.status();
    let _ = c.kill();
    let _ = c.wait();
    (s, status, waited)
}

#[test]
fn a_container_over_its_limit_is_killed_within_a_second_under_enforce() {
    if !root_or_skip("a_container_over_its_limit_is_killed_under_enforce") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (s, status, waited) = over_limit("enforce");
    use std::os::unix::process::ExitStatusExt;
    let status = status.unwrap_or_else(|| panic!("not killed; status {s:#}"));
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    // The fifth allocation comes 400 ms after "alloc 3" was read; the kill must follow it within 1 s.
    assert!(
        waited < Duration::from_millis(1400),
        "killed after {waited:?}"
    );
    let kills = s["agent"]["kills"].as_array().unwrap();
    assert_eq!(kills.len(), 1, "{s:#}");
    let ms = kills[0]["latency_ms"].as_f64().unwrap();
    assert!(ms < 1000.0, "kill {ms} ms after the allocation");
    assert_eq!(bytes(&kills[0]["seen_bytes"]), 320 * MIB);
    assert_eq!(s["agent"]["violations"], 1);
}

#[test]
fn a_container_over_its_limit_is_only_flagged_under_report() {
    if !root_or_skip("a_container_over_its_limit_is_only_flagged_under_report") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (s, status, _) = over_limit("report");
    assert!(status.is_none(), "report must not kill: {status:?}");
    assert!(s["agent"]["kills"].as_array().unwrap().is_empty());
    assert_eq!(s["agent"]["violations"], 1);
    let c = s["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["limit_bytes"] == 256 * MIB)
        .unwrap();
    assert_eq!(c["over_limit"], true);
    assert_eq!(bytes(&c["ebpf_bytes"]), 320 * MIB);
    assert!(
        c["warnings"]
            .to_string()
            .contains("over its limit: uprobes see 320 MiB, limit 256 MiB"),
        "{c:#}"
    );
}

#[test]
fn a_tampered_cache_file_is_flagged() {
    if !root_or_skip("a_tampered_cache_file_is_flagged") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new("tamper");
    let ctr = Container::new(&fx, "tamper", 1000 * MIB);
    let agent = Agent::start(&fx, "enforce");
    agent.bind(&ctr);
    let (mut c, mut out) = ctr.spawn(&fx, "4 64 0 60");
    wait_line(&mut out, "alloc 3");
    let slot = ctr.charge_as_shim(c.id(), 4 * 64 * MIB);
    agent.wait_for("agreement", |s| {
        let c = ctr.of(s)?;
        (bytes(&c["ebpf_bytes"]) == 256 * MIB && bytes(&c["charged_bytes"]) == 256 * MIB)
            .then_some(())
    });
    // The container rewrites its own accounting: its slot says nothing is held, its limit says 100 GiB.
    ctr.cache.uncharge(slot, 0, 4 * 64 * MIB);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options()
            .write(true)
            .open(&ctr.cache_path)
            .unwrap();
        f.write_all_at(&(100u64 << 30).to_ne_bytes(), 64).unwrap();
    }
    let w = agent.wait_for("the warnings", |s| {
        let w = ctr.of(s)?["warnings"].to_string();
        (w.contains("cache file charges 0 MiB, uprobes saw 256 MiB")
            && w.contains("header says limits"))
        .then_some(w)
    });
    assert!(
        w.contains("header says limits 102400 MiB, the binding 1000 MiB; the binding's hold"),
        "the binding's limit is named: {w}"
    );
    let s = agent.status();
    assert_eq!(
        bytes(&ctr.of(&s).unwrap()["limit_bytes"]),
        1000 * MIB,
        "the rewritten limit is not taken"
    );
    assert!(
        c.try_wait().unwrap().is_none(),
        "within its real limit: not killed"
    );
    c.kill().unwrap();
    let _ = c.wait();
}

#[test]
fn a_restarted_agent_rebuilds_its_state_without_double_counting() {
    if !root_or_skip("a_restarted_agent_rebuilds_its_state") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new("restart");
    let ctr = Container::new(&fx, "restart", 4000 * MIB);
    let mut agent = Agent::start(&fx, "enforce");
    agent.bind(&ctr);
    // One 64 MiB block every 4 s: the restart happens between the second and the third.
    let (mut c, mut out) = ctr.spawn(&fx, "4 64 4000 60");
    wait_line(&mut out, "alloc 1");
    agent.wait_for("two blocks", |s| {
        (bytes(&ctr.of(s)?["ebpf_bytes"]) == 128 * MIB).then_some(())
    });
    agent.stop();
    let agent = Agent::start(&fx, "enforce");
    let s = agent.status();
    let cs = ctr.of(&s).expect("restored container");
    assert_eq!(
        bytes(&cs["ebpf_bytes"]),
        128 * MIB,
        "restored, not lost: {cs:#}"
    );
    assert_eq!(
        (cs["bound"].as_bool(), bytes(&cs["limit_bytes"])),
        (Some(true), 4000 * MIB),
        "the binding is kept across the restart: {cs:#}"
    );
    wait_line(&mut out, "alloc 3");
    let c2 = agent.wait_for("four blocks", |s| {
        let c = ctr.of(s)?.clone();
        (bytes(&c["ebpf_bytes"]) >= 256 * MIB).then_some(c)
    });
    std::thread::sleep(Duration::from_millis(500));
    let c3 = ctr.of(&agent.status()).unwrap().clone();
    assert_eq!(
        bytes(&c3["ebpf_bytes"]),
        256 * MIB,
        "nothing counted twice: {c2:#}"
    );
    c.kill().unwrap();
    let _ = c.wait();
}

/// A bpf filesystem of the test's own, mounted in its directory, so pins never touch /sys/fs/bpf.
struct BpfFs(PathBuf);

impl BpfFs {
    fn mount(fx: &Fixture) -> Self {
        let dir = fx.dir.join("bpffs");
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount -t bpf bpf {}", dir.display());
        Self(dir)
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Twelve 64 MiB blocks, one every 300 ms, with the agent away for 1.5 s after the second: stopped with
/// SIGTERM (`crash` false) or SIGKILL. Returns the next agent's view of the container once it has seen all
/// twelve (and 500 ms more), and the log.
fn agent_away_while_allocating(name: &str, crash: bool) -> (Value, u32, String) {
    let fx = Fixture::new(name);
    let fs = BpfFs::mount(&fx);
    let pins = fs.0.join("vgpu-agent");
    let ctr = Container::new(&fx, name, 4000 * MIB);
    let mut agent = Agent::start_pinned(&fx, "report", &pins);
    let (mut c, mut out) = ctr.spawn(&fx, "12 64 300 60");
    wait_line(&mut out, "alloc 1");
    let t = Instant::now();
    if crash {
        let _ = agent.child.kill();
        let _ = agent.child.wait();
    } else {
        agent.stop();
        let state: Value =
            serde_json::from_str(&std::fs::read_to_string(fx.dir.join("state.json")).unwrap())
                .unwrap();
        assert!(
            state["holder"].is_null(),
            "pinned links need no holder process: {}",
            state["holder"]
        );
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "with pinned links the agent exits at once, took {:?}",
            t.elapsed()
        );
    }
    std::thread::sleep(Duration::from_millis(1500));
    let agent = Agent::start_pinned(&fx, "report", &pins);
    wait_line(&mut out, "alloc 11");
    let pid = c.id();
    agent.wait_for("all twelve blocks", |s| {
        (bytes(&ctr.of(s)?["ebpf_bytes"]) >= 12 * 64 * MIB).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let cs = ctr.of(&agent.status()).unwrap().clone();
    c.kill().unwrap();
    let _ = c.wait();
    drop(agent);
    // Uninstall: every pin goes.
    let st = Command::new(env!("CARGO_BIN_EXE_vgpu-agent"))
        .args(["unpin", "--pin-dir"])
        .arg(&pins)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!pins.exists(), "unpinned");
    (cs, pid, log(&fx))
}

/// The next agent saw every block exactly once and knows it missed nothing.
fn nothing_missed(name: &str, crash: bool) {
    let (cs, pid, log) = agent_away_while_allocating(name, crash);
    assert!(log.contains("no call missed"), "took over the pins: {log}");
    assert_eq!(
        bytes(&cs["ebpf_bytes"]),
        12 * 64 * MIB,
        "every block once, those allocated while no agent ran included: {cs:#}"
    );
    let p = pid_entry(&cs, pid).expect("client listed");
    assert_eq!(p["partial"], false, "nothing was missed: {p:#}");
}

#[test]
fn calls_made_while_no_agent_runs_are_counted_by_the_next_one() {
    if !root_or_skip("calls_made_while_no_agent_runs_are_counted") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nothing_missed("handover", false);
}

/// The pinned probes keep writing to the pinned ring buffer through a crash, and the journal holds what the
/// dead agent had read since its last save.
#[test]
fn after_a_crash_nothing_is_lost_either() {
    if !root_or_skip("after_a_crash_nothing_is_lost_either") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nothing_missed("crash", true);
}

// ---- A tenant's files cannot steer, crash or freeze the agent (issue 16) ----

/// The cgroup-less directory a tenant controls: a cache file claiming `limit`, beside whatever it plants.
fn planted_cache(fx: &Fixture, name: &str, limit: u64) -> PathBuf {
    let dir = fx.cache_dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut info = HeaderInfo::default();
    info.memory_limits[0] = limit;
    drop(CacheRegion::open_or_create(&dir.join("vgpu.cache"), &info).unwrap());
    dir
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0, "mkfifo");
}

/// Status answers within 1 s, three times over about 1.5 s (several sweeps).
fn answers_promptly(agent: &Agent, fx: &Fixture) {
    for _ in 0..3 {
        let t = Instant::now();
        let s = agent.try_status();
        assert!(
            s.is_some() && t.elapsed() < Duration::from_secs(1),
            "status took {:?} (answered: {}): {}",
            t.elapsed(),
            s.is_some(),
            log(fx)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_cache_file_truncated_while_in_use_does_not_crash_the_agent() {
    if !root_or_skip("a_cache_file_truncated_while_in_use") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new("truncate");
    let ctr = Container::new(&fx, "truncate", 1000 * MIB);
    let mut agent = Agent::start(&fx, "enforce");
    agent.bind(&ctr);
    let (mut c, mut out) = ctr.spawn(&fx, "1 64 0 60");
    wait_line(&mut out, "alloc 0");
    ctr.charge_as_shim(c.id(), 64 * MIB);
    agent.wait_for("the charge", |s| {
        (bytes(&ctr.of(s)?["charged_bytes"]) == 64 * MIB).then_some(())
    });
    // The tenant truncates its file; the shim (here the test's own mapping) still has it mapped.
    std::fs::File::options()
        .write(true)
        .open(&ctr.cache_path)
        .unwrap()
        .set_len(100)
        .unwrap();
    let w = agent.wait_for("the truncation to be noticed", |s| {
        let w = ctr.of(s)?["warnings"].to_string();
        w.contains("shorter than its header").then_some(w)
    });
    assert!(
        w.contains("the binding's limit (1000 MiB) still holds"),
        "{w}"
    );
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "agent alive: {}",
        log(&fx)
    );
    answers_promptly(&agent, &fx);
    c.kill().unwrap();
    let _ = c.wait();
}

#[test]
fn a_fifo_or_symlink_named_cgroup_does_not_freeze_the_agent() {
    if !root_or_skip("a_fifo_or_symlink_named_cgroup") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new("fifo");
    let agent = Agent::start(&fx, "enforce");
    // Planted after the agent started, so a sweep finds them.
    let a = planted_cache(&fx, "fifo", 1000 * MIB);
    mkfifo(&a.join("cgroup"));
    let b = planted_cache(&fx, "symlink", 1000 * MIB);
    mkfifo(&fx.dir.join("elsewhere"));
    std::os::unix::fs::symlink(fx.dir.join("elsewhere"), b.join("cgroup")).unwrap();
    // A FIFO and a symlink named like a cache file, too.
    mkfifo(&a.join("fifo.cache"));
    std::os::unix::fs::symlink(fx.dir.join("elsewhere"), b.join("link.cache")).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    answers_promptly(&agent, &fx);
    let s = agent.status();
    let shown = s["containers"].to_string();
    assert!(
        shown.contains(a.join("vgpu.cache").to_str().unwrap()),
        "the real cache file is still shown: {s:#}"
    );
}

#[test]
fn a_cgroup_file_naming_another_container_kills_nothing() {
    if !root_or_skip("a_cgroup_file_naming_another_container") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new("steer");
    let victim = Container::new(&fx, "victim", 4000 * MIB);
    let agent = Agent::start(&fx, "enforce");
    agent.bind(&victim);
    let (mut c, mut out) = victim.spawn(&fx, "2 64 0 60");
    wait_line(&mut out, "alloc 1");
    // The attacker's directory: a 1 MiB "limit" and a `cgroup` file naming the victim's cgroup.
    let planted = planted_cache(&fx, "attacker", MIB);
    std::fs::write(planted.join("cgroup"), &victim.cg).unwrap();
    let s = agent.wait_for("the victim's memory and the planted file", |s| {
        let seen = bytes(&victim.of(s)?["ebpf_bytes"]) == 128 * MIB;
        let planted_seen = s["containers"]
            .to_string()
            .contains(planted.join("vgpu.cache").to_str().unwrap());
        (seen && planted_seen).then(|| s.clone())
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        c.try_wait().unwrap().is_none(),
        "the victim was killed: {}",
        log(&fx)
    );
    let s2 = agent.status();
    assert!(
        s2["agent"]["kills"].as_array().unwrap().is_empty(),
        "{s2:#}"
    );
    assert_eq!(
        bytes(&victim.of(&s2).unwrap()["limit_bytes"]),
        4000 * MIB,
        "{s:#}"
    );
    c.kill().unwrap();
    let _ = c.wait();
}

#[test]
fn a_deleted_cache_file_is_still_enforced_from_its_binding() {
    if !root_or_skip("a_deleted_cache_file_is_still_enforced") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new("deleted");
    let ctr = Container::new(&fx, "deleted", 256 * MIB);
    let agent = Agent::start(&fx, "enforce");
    agent.bind(&ctr);
    std::fs::remove_file(&ctr.cache_path).unwrap();
    agent.wait_for("the deletion to be noticed", |s| {
        ctr.of(s)?["warnings"]
            .to_string()
            .contains("deleted")
            .then_some(())
    });
    // 64 MiB every 300 ms without the shim: the fifth takes it past 256 MiB.
    let (mut c, mut out) = ctr.spawn(&fx, "5 64 300 30");
    wait_line(&mut out, "alloc 3");
    let t = Instant::now();
    let st = loop {
        if let Some(st) = c.try_wait().unwrap() {
            break Some(st);
        }
        if t.elapsed() > Duration::from_secs(3) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = c.kill();
    let _ = c.wait();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        st.and_then(|s| s.signal()),
        Some(libc::SIGKILL),
        "not killed: {:#}",
        agent.status()
    );
}

#[test]
fn a_bind_request_from_a_user_for_a_cgroup_it_does_not_own_is_refused() {
    if !root_or_skip("a_bind_request_from_a_user_for_a_cgroup_it_does_not_own") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new("peer");
    let helper = fx.dir.join("bindreq");
    let st = Command::new("gcc")
        .args(["-O1", "-o"])
        .arg(&helper)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixture/bindreq.c"))
        .status()
        .unwrap();
    assert!(st.success());
    let theirs = Container::new(&fx, "theirs", 4000 * MIB);
    let mine = Container::new(&fx, "mine", 4000 * MIB);
    const NOBODY: u32 = 65534;
    for p in [mine.cg_abs.as_path(), mine.cache_path.as_path()] {
        std::os::unix::fs::chown(p, Some(NOBODY), None).unwrap();
    }
    let agent = Agent::start(&fx, "enforce");
    let as_nobody = |req: &Value| -> String {
        use std::os::unix::process::CommandExt;
        let out = Command::new(&helper)
            .arg(&agent.bind_socket)
            .arg(req.to_string())
            .uid(NOBODY)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // Someone else's cgroup, with a cache file the user owns: refused, and nothing bound.
    let mut req = theirs.bind_request();
    req["bind"]["cache"] = Value::from(mine.cache_path.to_str().unwrap());
    let r = as_nobody(&req);
    assert!(
        r.contains(&format!("belongs to uid 0, not to uid {NOBODY}")),
        "{r}"
    );
    assert!(
        theirs
            .of(&agent.status())
            .is_none_or(|c| c["bound"] != true),
        "nothing bound"
    );
    // Its own cgroup and cache file: bound. Then root's binding of it cannot be taken over.
    assert_eq!(as_nobody(&mine.bind_request()), "\"ok\"");
    assert_eq!(mine.of(&agent.status()).unwrap()["bound"], true);
    agent.bind(&theirs);
    let unbind = serde_json::json!({"unbind": {"cgroup": theirs.cg}});
    let r = as_nobody(&unbind);
    assert!(r.contains("only that user or root may unbind it"), "{r}");
    assert_eq!(theirs.of(&agent.status()).unwrap()["bound"], true);
}

/// The stand-in libcuda built again as `soname` in a directory of its own (another file: another inode), with
/// a client linked against it.
fn private_build(fx: &Fixture, soname: &str) -> PathBuf {
    let dir = fx.dir.join(format!("private-{soname}"));
    std::fs::create_dir_all(&dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixture");
    let lib = dir.join(soname);
    let client = dir.join("client");
    let gcc = |args: Vec<String>| {
        let st = Command::new("gcc").args(&args).status().expect("gcc");
        assert!(st.success(), "gcc {args:?}");
    };
    gcc(vec![
        "-O1".into(),
        "-fPIC".into(),
        "-shared".into(),
        format!("-Wl,-soname,{soname}"),
        "-o".into(),
        lib.display().to_string(),
        src.join("fakecuda.c").display().to_string(),
    ]);
    gcc(vec![
        "-O1".into(),
        "-o".into(),
        client.display().to_string(),
        src.join("client.c").display().to_string(),
        format!("-L{}", dir.display()),
        format!("-l:{soname}"),
        format!("-Wl,-rpath,{}", dir.display()),
    ]);
    client
}

#[test]
fn a_renamed_or_private_libcuda_is_flagged_and_not_believed() {
    if !root_or_skip("a_renamed_or_private_libcuda_is_flagged") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new("private");
    let ctr = Container::new(&fx, "private", 4000 * MIB);
    let start = |client: &Path| {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec {} 2 64 0 60",
            ctr.cg_abs.display(),
            client.display()
        );
        let mut c = Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(c.stdout.take().unwrap());
        wait_line(&mut out, "alloc 1");
        (c, out)
    };
    // A renamed copy (no "libcuda" in its name) and a libcuda.so.99 of the tenant's own.
    let (mut renamed, _o1) = start(&private_build(&fx, "libnvfoo.so"));
    let (mut own, _o2) = start(&private_build(&fx, "libcuda.so.99"));
    let agent = Agent::start(&fx, "report");
    agent.bind(&ctr);
    let c = agent.wait_for("both flagged", |s| {
        let c = ctr.of(s)?.clone();
        let flagged = |pid: u32| pid_entry(&c, pid).is_some_and(|p| p["private_libcuda"] == true);
        (flagged(renamed.id()) && flagged(own.id())).then_some(c)
    });
    let w = c["warnings"].to_string();
    assert!(
        w.contains("libnvfoo.so, not the host driver's libcuda"),
        "{w}"
    );
    assert!(
        w.contains("libcuda.so.99, not the host driver's libcuda"),
        "{w}"
    );
    let s = agent.status();
    let probed = s["agent"]["libcuda_files"].to_string();
    assert!(
        !probed.contains("libnvfoo") && !probed.contains("libcuda.so.99"),
        "a private file is never probed (its calls are not believed): {probed}"
    );
    assert_eq!(bytes(&c["ebpf_bytes"]), 0, "{c:#}");
    for p in [&mut renamed, &mut own] {
        p.kill().unwrap();
        let _ = p.wait();
    }
}
