//! A tenant's files cannot steer, crash or freeze the agent, and a user cannot bind what it does not own (issue
//! 16): end-to-end with the real agent and uprobes, as in ebpf.rs. They need root; as another user they skip.

mod harness;

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use serde_json::Value;
use vgpu_contract::cache_layout::{CacheRegion, HeaderInfo};

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
