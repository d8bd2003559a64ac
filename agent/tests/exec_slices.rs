//! Issue 18's first case: under `vgpu-agent run --standalone --policy enforce`, two `exec` slices of 4000 and
//! 2000 MiB started from one shell are two containers to the agent (each its own cgroup, bound to its cache by
//! `exec` over the bind socket), so neither is killed while inside its own limit. Before, both sat in the
//! caller's cgroup and were summed: B was killed after 512 MiB.
//! Needs root and uprobes (the agent attaches to the simulated libcuda); skips otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vgpu_integration::{shim_path, sim_dir, Sim};

fn root() -> bool {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn with_sim(sim: &Sim, mut c: Command) -> Command {
    let probe = sim.cmd("nvidia-smi");
    for (k, v) in probe.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

struct Running(std::process::Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_exec_slices_are_two_containers_and_neither_is_killed_inside_its_limit() {
    if !root() {
        eprintln!("skipped: needs root (uprobes, cgroups)");
        return;
    }
    let sim = Sim::new().memory_mib(15360);
    let dir: PathBuf = sim.dir().to_path_buf();
    let bind_sock = dir.join("bind.sock");
    let agent_log = dir.join("agent.log");
    let agent = with_sim(&sim, Command::new(env!("CARGO_BIN_EXE_vgpu-agent")))
        .args([
            "run",
            "--standalone",
            "--policy",
            "enforce",
            "--metrics-addr",
            "off",
        ])
        .args(["--interval-ms", "200", "--pin-dir", "off"])
        .arg("--libcuda")
        .arg(sim_dir().join("libcuda.so.1"))
        .arg("--cache-dir")
        .arg(&dir)
        .arg("--socket")
        .arg(dir.join("agent.sock"))
        .arg("--bind-socket")
        .arg(&bind_sock)
        .arg("--state-file")
        .arg(dir.join("state.json"))
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .unwrap();
    let _agent = Running(agent);
    let t = Instant::now();
    while !bind_sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "agent did not start: {}",
            std::fs::read_to_string(&agent_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let exec = |mib: &str, cache: &Path, args: &[&str]| {
        let mut c = with_sim(&sim, Command::new(env!("CARGO_BIN_EXE_vgpu-agent")));
        c.args(["exec", "--shim"]).arg(shim_path());
        c.args(["--gpumem", mib, "--cache"]).arg(cache);
        c.arg("--bind-socket").arg(&bind_sock);
        c.arg("--").arg(sim_dir().join("cuda_oom")).args(args);
        c
    };
    let mut a = exec("4000", &dir.join("a.cache"), &["-n", "6", "-H", "15000"]);
    let a = Running(
        a.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(3));
    let b = exec("2000", &dir.join("b.cache"), &[]).output().unwrap();
    let b_out = String::from_utf8_lossy(&b.stdout);
    let log = std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert!(
        b.status.success(),
        "B ended with {:?}: {b_out}\nagent: {log}",
        b.status
    );
    assert!(
        b_out.contains("Hit the limit"),
        "B must stop at its own limit: {b_out}"
    );
    assert!(
        !log.contains("killed"),
        "the agent killed a slice inside its limit: {log}"
    );
    drop(a);
}
