//! Self-tests of the simulated GPU (no shim): it must behave like the real card for what the shim's tests
//! check, or those tests prove nothing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use vgpu_integration::{run, sim_dir, Running, Sim};

const WAIT: Duration = Duration::from_secs(30);

/// 4000 MiB card, 300 MiB context: 3700 MiB free, so seven 512 MiB chunks fit, the eighth is refused.
#[test]
fn card_fills_up_and_refuses_past_its_memory_on_every_path() {
    let sim = Sim::new().memory_mib(4000);
    let linked = sim.run("cuda_oom", &["-i"]);
    linked.assert_ok();
    assert_eq!(linked.hit_limit(), Some((3584, 2)), "{linked:?}");
    assert!(linked
        .stdout
        .contains("cuMemGetInfo rc=0 total=4000 MiB free=3700 MiB"));
    assert!(linked.stdout.contains("total=4000 MiB free=116 MiB"));
    for mode in ["dlsym", "proc", "ptsz"] {
        let out = sim.run("cuda_oom_dl", &["-m", mode]);
        out.assert_ok();
        assert_eq!(out.hit_limit(), Some((3584, 2)), "{mode}: {out:?}");
    }
    // Every process has exited: the card is empty again.
    assert_eq!(sim.smi_memory(0), (0, 4000));
}

#[test]
fn two_processes_see_each_others_usage() {
    let sim = Sim::new().memory_mib(4000);
    let mut holder = Running::spawn(sim.cmd("cuda_oom").args(["-n", "3", "-H", "-1"]));
    holder
        .wait_line("Holding 1536 MiB", WAIT)
        .expect("holder holds");
    // 4000 - (1536 + 300) - 300 of its own context.
    let other = sim.run("cuda_oom_dl", &["-i"]);
    assert!(
        other.stdout.contains("total=4000 MiB free=1864 MiB"),
        "{other:?}"
    );
    assert_eq!(other.hit_limit(), Some((1536, 2)));
    assert_eq!(sim.smi_memory(0), (1836, 4000));
    holder.kill9();
}

#[test]
fn kill_9_of_a_holder_frees_its_memory() {
    let sim = Sim::new().memory_mib(4000);
    let mut holder = Running::spawn(sim.cmd("cuda_oom").args(["-n", "6", "-H", "-1"]));
    holder
        .wait_line("Holding 3072 MiB", WAIT)
        .expect("holder fills the card");
    let starved = sim.run("cuda_oom", &[]);
    assert!(
        starved.stdout.contains("Hit the limit after 0 MiB: rc=2"),
        "{starved:?}"
    );
    holder.kill9();
    assert_eq!(sim.smi_memory(0), (0, 4000));
    let after = sim.run("cuda_oom", &[]);
    assert_eq!(after.hit_limit(), Some((3584, 2)));
}

#[test]
fn state_is_shared_and_safe_when_many_processes_start_at_once() {
    let sim = Sim::new().memory_mib(8192);
    let procs: Vec<Running> = (0..8)
        .map(|_| {
            Running::spawn(
                sim.cmd("cuda_oom_dl")
                    .args(["-n", "1", "-c", "512", "-H", "-1"]),
            )
        })
        .collect();
    let mut procs = procs;
    for p in &mut procs {
        p.wait_line("Holding 512 MiB", WAIT)
            .expect("each allocates");
    }
    assert_eq!(sim.smi_memory(0), (8 * (512 + 300), 8192));
    assert_eq!(sim.smi_apps().len(), 8);
    for p in procs {
        p.kill9();
    }
    assert_eq!(sim.smi_memory(0), (0, 8192));
}

#[test]
fn cu_get_proc_address_maps_names_versions_and_flags() {
    let sim = Sim::new();
    let q = [
        (
            "cuMemAlloc",
            "12000",
            "0",
            "cuMemAlloc_v2 rc=0 status=0 same=Y",
        ),
        (
            "cuMemAlloc",
            "12000",
            "2",
            "cuMemAlloc_v2 rc=0 status=0 same=Y",
        ),
        ("cuMemGetInfo", "12000", "0", "cuMemGetInfo_v2 rc=0"),
        ("cuMemFree", "11000", "0", "cuMemFree_v2 rc=0"),
        (
            "cuLaunchKernel",
            "12000",
            "0",
            "cuLaunchKernel rc=0 status=0 same=Y",
        ),
        (
            "cuLaunchKernel",
            "12000",
            "2",
            "cuLaunchKernel_ptsz rc=0 status=0 same=Y",
        ),
        (
            "cuLaunchKernelEx",
            "12000",
            "2",
            "cuLaunchKernelEx_ptsz rc=0",
        ),
        ("cuGraphLaunch", "12000", "2", "cuGraphLaunch_ptsz rc=0"),
        ("cuMemAllocAsync", "12000", "2", "cuMemAllocAsync_ptsz rc=0"),
        (
            "cuStreamSynchronize",
            "12000",
            "2",
            "cuStreamSynchronize_ptsz rc=0",
        ),
        ("cuDeviceGetUuid", "11000", "0", "cuDeviceGetUuid rc=0"),
        ("cuDeviceGetUuid", "12000", "0", "cuDeviceGetUuid_v2 rc=0"),
        (
            "cuDevicePrimaryCtxRelease",
            "12000",
            "0",
            "cuDevicePrimaryCtxRelease_v2 rc=0",
        ),
        ("cuGetProcAddress", "11030", "0", "cuGetProcAddress rc=0"),
        ("cuGetProcAddress", "12000", "0", "cuGetProcAddress_v2 rc=0"),
        ("cuMemAllocAsync", "11000", "0", "- rc=500 status=2"),
        ("cuNoSuchFunction", "12000", "0", "- rc=500 status=1"),
    ];
    let args: Vec<&str> = q.iter().flat_map(|(n, v, f, _)| [*n, *v, *f]).collect();
    let out = sim.run("cuda_procaddr", &args);
    out.assert_ok();
    for (line, (n, v, f, want)) in out.stdout.lines().zip(q.iter()) {
        assert!(
            line.starts_with(&format!("{n} {v} {f} -> {want}")),
            "{line}"
        );
    }
    assert_eq!(out.stdout.lines().count(), q.len());
}

#[test]
fn every_allocation_kind_is_charged_and_freed() {
    let sim = Sim::new().memory_mib(4000);
    for mode in ["proc", "ptsz", "dlsym"] {
        let out = sim.run("cuda_allockinds", &["-m", mode]);
        out.assert_ok();
        let alloc: Vec<&str> = out
            .lines_with("")
            .filter(|l| l.contains(" alloc "))
            .collect();
        assert_eq!(alloc.len(), 9, "{out:?}");
        for l in alloc {
            // 256 MiB on top of the 300 MiB context (the mipmap's levels round down to 255).
            assert!(
                l.ends_with("rc=0 used=556 MiB") || l.ends_with("rc=0 used=555 MiB"),
                "{mode}: {l}"
            );
        }
        for l in out.lines_with("").filter(|l| l.contains(" free ")) {
            assert!(l.ends_with("rc=0 used=300 MiB"), "{mode}: {l}");
        }
    }
    let too_big = sim.run("cuda_allockinds", &["-s", "4096"]);
    for l in too_big.lines_with("").filter(|l| l.contains(" alloc ")) {
        assert!(l.contains("rc=2"), "{l}");
    }
}

#[test]
fn nvml_reports_per_process_memory_including_the_context() {
    let sim = Sim::new().memory_mib(4000).context_mib(500);
    let mut a = Running::spawn(sim.cmd("cuda_oom").args(["-n", "2", "-H", "-1"]));
    let mut b = Running::spawn(sim.cmd("cuda_oom_dl").args(["-n", "1", "-H", "-1"]));
    a.wait_line("Holding", WAIT).unwrap();
    b.wait_line("Holding", WAIT).unwrap();
    let mut apps = sim.smi_apps();
    apps.sort();
    let mut want = vec![(a.pid(), 1024 + 500), (b.pid(), 512 + 500)];
    want.sort();
    assert_eq!(apps, want);
    a.kill9();
    assert_eq!(sim.smi_apps(), vec![(b.pid(), 1012)]);
    b.kill9();
    assert!(sim.smi_apps().is_empty());
}

#[test]
fn nvidia_smi_stand_in_prints_the_numbers() {
    let sim = Sim::new().devices(2).memory_mib(4000);
    let mut h = Running::spawn(sim.cmd("cuda_oom").args(["-d", "1", "-n", "1", "-H", "-1"]));
    h.wait_line("Holding", WAIT).unwrap();
    let table = sim.smi(&[]);
    table.assert_ok();
    assert!(table.stdout.contains("0MiB / 4000MiB"), "{}", table.stdout);
    assert!(
        table.stdout.contains("812MiB / 4000MiB"),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("NVIDIA Simulated H100"));
    assert!(table.stdout.contains("Driver Version: 580."));
    let csv = sim.smi(&["--query-gpu=memory.used,memory.total", "--format=csv"]);
    assert_eq!(
        csv.stdout,
        "memory.used [MiB], memory.total [MiB]\n0 MiB, 4000 MiB\n812 MiB, 4000 MiB\n"
    );
    let ids = sim.smi(&["--query-gpu=index,uuid", "--format=csv,noheader"]);
    assert_eq!(
        ids.stdout,
        "0, GPU-5a1c0000-0000-4000-8000-000000000000\n1, GPU-5a1c0000-0000-4000-8000-000000000001\n"
    );
    h.kill9();
}

#[test]
fn launch_client_alone_keeps_the_device_busy() {
    let sim = Sim::new();
    let out = sim.run("cuda_launch", &["-u", "1000", "-s", "2", "-k", "10"]);
    out.assert_ok();
    let busy = out.f64_after("overall", "busy").unwrap();
    assert!(busy > 0.9 && busy <= 1.02, "{out:?}");
    // Every launch entry point and stream kind runs kernels for their stated time.
    for args in [
        &["-m", "ptsz", "-a", "ex", "-n", "2"][..],
        &["-m", "dlsym", "-a", "coop", "-n", "0"],
        &["-a", "graph", "-u", "500"],
    ] {
        let out = sim.run("cuda_launch", &[args, &["-s", "1"]].concat());
        let busy = out.f64_after("overall", "busy").unwrap();
        assert!(busy > 0.85 && busy <= 1.02, "{args:?}: {out:?}");
    }
    let cost = sim.run("cuda_launch", &["-c", "20000"]);
    let ns = cost.f64_after("ns_per_launch", "ns_per_launch").unwrap();
    assert!(ns < 20000.0, "{cost:?}");
}

#[test]
fn two_launch_clients_share_the_device_and_nvml_sees_it() {
    let sim = Sim::new();
    let args = ["-u", "1000", "-s", "3", "-k", "10"];
    let mut a = Running::spawn(sim.cmd("cuda_launch").args(args));
    let mut b = Running::spawn(sim.cmd("cuda_launch").args(args));
    a.wait_line("second 1", WAIT).unwrap();
    b.wait_line("second 1", WAIT).unwrap();
    let util = sim.smi_utilization(0);
    let per_proc = sim.smi_process_utilization();
    let (a_pid, b_pid) = (a.pid(), b.pid());
    let (a, b) = (a.finish(), b.finish());
    let (fa, fb) = (
        a.f64_after("overall", "busy").unwrap(),
        b.f64_after("overall", "busy").unwrap(),
    );
    assert!(
        (0.38..=0.62).contains(&fa) && (0.38..=0.62).contains(&fb),
        "{a:?} {b:?}"
    );
    assert!(fa + fb > 0.9, "{fa} + {fb}");
    assert!(util >= 90, "device utilization {util}");
    for pid in [a_pid, b_pid] {
        let sm = per_proc.iter().find(|(p, _)| *p == pid).map(|(_, s)| *s);
        assert!(
            sm.is_some_and(|s| (35..=65).contains(&s)),
            "{pid}: {per_proc:?}"
        );
    }
    // Idle again: utilization falls to 0 within about a second.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(sim.smi_utilization(0), 0);
}

#[test]
fn device_name_is_the_simulated_h100() {
    let sim = Sim::new();
    let out = run(sim
        .cmd("nvidia-smi")
        .arg("--query-gpu=name")
        .arg("--format=csv,noheader"));
    assert_eq!(out.stdout.trim(), "NVIDIA Simulated H100");
}

/// `script` run by `sh` as pid 1 of a new pid namespace with its own /proc, the outer /proc bound at
/// `host_proc` for the simulated driver (which, like the kernel's, knows every process's host pid).
fn sh_in_pid_namespace(sim: &Sim, script: &str, host_proc: &Path) -> Command {
    std::fs::create_dir_all(host_proc).unwrap();
    let base = sim.cmd("cuda_oom");
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount --bind /proc \"$0\" && exec unshare --pid --fork --mount-proc sh -c \"$1\"")
        .arg(host_proc)
        .arg(script);
    for (k, v) in base.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.env("VGPU_SIM_HOST_PROC", host_proc).env("SIM", sim_dir());
    c
}

/// `VGPU_SIM_NVML_PIDS`: by default NVML names a process in a pid namespace by its own pid to a caller in that
/// namespace (driver 580 on the H200) and by its host pid to the host; `host` names host pids to everyone (the
/// drivers the shim cannot find itself in without the agent's help).
#[test]
fn nvml_names_namespaced_or_host_pids() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED nvml_names_namespaced_or_host_pids: needs root for a pid namespace");
        return;
    }
    // The holder is pid 2 (after sh); NVML is asked from inside once it holds, then the holder is stopped.
    let script = r#""$SIM/cuda_oom" -n 1 -H -1 > holder.out & holder=$!
        until grep -q Holding holder.out 2>/dev/null; do sleep 0.01; done
        echo "holder $holder"
        "$SIM/nvidia-smi" --query-compute-apps=pid,used_memory --format=csv,noheader,nounits
        until [ -e go ]; do sleep 0.01; done
        kill $holder"#;
    for (mode, inside_sees_host_pid) in [("namespace", false), ("host", true)] {
        let sim = Sim::new().context_mib(500);
        let mut c = sh_in_pid_namespace(&sim, script, &sim.dir().join("host-proc"));
        c.current_dir(sim.dir()).env("VGPU_SIM_NVML_PIDS", mode);
        let mut r = Running::spawn(&mut c);
        let holder: u32 = r
            .wait_line("holder ", WAIT)
            .expect("holder started")
            .trim_start_matches("holder ")
            .parse()
            .unwrap();
        let inside = r.wait_line(", 1012", WAIT).expect("NVML lists the holder");
        let inside_pid: u32 = inside.split(',').next().unwrap().trim().parse().unwrap();
        // From the host, the holder is the process whose innermost pid is `holder` in a namespace: its host pid.
        let apps = sim.smi_apps();
        assert_eq!(apps.len(), 1, "{mode}: {apps:?}");
        let host_pid = apps[0].0;
        assert_eq!(apps[0].1, 1012);
        assert_ne!(host_pid, holder, "{mode}: the host sees a host pid");
        let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
        assert_eq!(
            nspid.split_whitespace().last(),
            Some(holder.to_string().as_str()),
            "{mode}: {nspid}"
        );
        let want = if inside_sees_host_pid {
            host_pid
        } else {
            holder
        };
        assert_eq!(inside_pid, want, "{mode}: NVML inside the namespace");
        std::fs::write(sim.dir().join("go"), b"").unwrap();
        r.finish().assert_ok();
    }
}
