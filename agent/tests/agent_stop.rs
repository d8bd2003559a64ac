//! Issue 18: after SIGTERM the agent left a child carrying its command line for up to 120 s, with nothing in the
//! log but "stopped". Without pinned maps no successor can adopt the probes, so the holder only releases them and
//! exits; the log names it; and a log going to a file carries no ANSI colour codes.
//! Needs root and uprobes (the probes attach to the simulated libcuda); skips otherwise.

use std::process::Command;
use std::time::{Duration, Instant};

use vgpu_integration::{sim_dir, Sim};

#[test]
fn a_stopped_agent_says_what_it_leaves_and_leaves_it_briefly() {
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (uprobes)");
        return;
    }
    let sim = Sim::new();
    let dir = sim.dir().to_path_buf();
    let log = dir.join("agent.log");
    let socket = dir.join("agent.sock");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_vgpu-agent"))
        .args([
            "run",
            "--standalone",
            "--metrics-addr",
            "off",
            "--pin-dir",
            "off",
            "--bind-socket",
            "off",
        ])
        .arg("--libcuda")
        .arg(sim_dir().join("libcuda.so.1"))
        .arg("--cache-dir")
        .arg(&dir)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-file")
        .arg(dir.join("state.json"))
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !socket.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "agent did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file: {text}"
    );
    let last = text
        .lines()
        .rev()
        .find(|l| l.contains("stopped"))
        .unwrap_or_else(|| panic!("no stop line: {text}"));
    // With probes attached and nothing pinned, a holder releases them: the log must say so and name it.
    if let Some(pid) = last
        .split("process ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse::<u32>().ok())
    {
        assert!(last.contains("vgpu-probe-hold"), "{last}");
        let t = Instant::now();
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.contains(") Z "))
        {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the probe holder {pid} is still there after 60 s: {last}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
