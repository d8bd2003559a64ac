//! End-to-end tests with real uprobes: the agent binary attached to a stand-in libcuda (tests/fixture,
//! built here with gcc) while test workloads allocate through it in cgroups of their own.
//! They need root and a kernel with uprobes (CI has both); as another user they skip, saying why.

mod harness;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use serde_json::Value;

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
