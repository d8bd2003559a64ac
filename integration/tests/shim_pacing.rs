//! The shim's compute slices against the simulated GPU, where a kernel runs `gridDimX` microseconds and
//! `cuda_launch` reports the kernel time it completed per second of wall time ("busy").
//!
//! Shares are judged against an unlimited run on the same machine, so a slow or loaded CI box moves both sides.
//! The tests run one at a time: they measure time, and two at once would compete for the simulated card and
//! for the CPU.

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use vgpu_integration::{run, Out, Running, Sim};

const WAIT: Duration = Duration::from_secs(30);

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn busy(out: &Out) -> f64 {
    out.assert_ok();
    out.f64_after("overall", "busy")
        .unwrap_or_else(|| panic!("no overall line: {out:#?}"))
}

/// Busy of an unlimited 2 s run (no shim), measured once, with the lock held.
fn baseline() -> f64 {
    static BASE: OnceLock<f64> = OnceLock::new();
    *BASE.get_or_init(|| {
        let sim = Sim::new();
        let b = busy(&sim.run("cuda_launch", &["-s", "2"]));
        assert!(b > 0.8, "the simulated card itself is too slow here: {b}");
        b
    })
}

/// `cuda_launch ARGS` in container `container` with `CUDA_DEVICE_SM_LIMIT=limit` and the given policy, in
/// 50 ms pacing periods (short runs then cover many periods; the default 500 ms period has tests of its own).
fn paced(sim: &Sim, container: &str, limit: &str, policy: &str) -> std::process::Command {
    let mut c = sim.shim_cmd("cuda_launch", container);
    c.env("CUDA_DEVICE_SM_LIMIT", limit)
        .env("GPU_CORE_UTILIZATION_POLICY", policy)
        .env("VGPU_PACING_PERIOD_MS", "50");
    c
}

/// The simulated GPU's one card file.
fn card_file(sim: &Sim) -> std::path::PathBuf {
    let cards: Vec<_> = std::fs::read_dir(sim.card_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cards.len(), 1, "{cards:?}");
    cards[0].clone()
}

/// The pacing period recorded in the card file (header word 3), in ns.
fn card_period_ns(sim: &Sim) -> u64 {
    let bytes = std::fs::read(card_file(sim)).unwrap();
    u64::from_ne_bytes(bytes[24..32].try_into().unwrap())
}

fn assert_share(what: &str, got: f64, base: f64, want: f64, tol: f64, out: &Out) {
    let share = got / base;
    assert!(
        (want - tol..=want + tol).contains(&share),
        "{what}: {share:.3} of unlimited ({got:.3} / {base:.3}), want {want} ± {tol}\n{out:#?}"
    );
}

#[test]
fn force_holds_30_percent_on_an_idle_card() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let out = run(paced(&sim, "f", "30", "force").args(["-s", "2"]));
    assert_share("force 30", busy(&out), base, 0.30, 0.05, &out);
    // Not an average of a free second and an idle one: each whole second holds the share too.
    let s1 = out.f64_after("second 1", "busy").unwrap();
    assert!((0.2..=0.4).contains(&(s1 / base)), "{out:#?}");
}

#[test]
fn every_launch_entry_point_is_paced() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    for args in [
        &["-m", "dlsym", "-a", "ex"][..],
        &["-m", "ptsz", "-a", "coop"],
        &["-m", "proc", "-a", "graph"],
        &["-m", "dlsym", "-a", "kernel", "-n", "2"],
    ] {
        let out = run(paced(&sim, "paths", "30", "force")
            .args(args)
            .args(["-s", "1.5"]));
        assert_share(&format!("{args:?}"), busy(&out), base, 0.30, 0.05, &out);
    }
}

#[test]
fn default_alone_and_disable_run_free() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    for policy in ["default", "disable"] {
        let out = run(paced(&sim, policy, "30", policy).args(["-s", "1.5"]));
        assert!(busy(&out) / base >= 0.9, "{policy}: {out:#?}");
        assert_eq!(out.stderr, "", "{policy}");
    }
}

#[test]
fn bad_sm_limit_or_policy_is_reported_and_not_paced() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    for (limit, policy, message) in [
        ("abc", "force", "abc"),
        ("150", "force", "150"),
        // An unknown policy means `default`: alone on the card, that runs free.
        ("30", "strict", "strict"),
    ] {
        let out = run(paced(&sim, "bad", limit, policy).args(["-s", "1"]));
        assert!(
            busy(&out) / base >= 0.9,
            "{limit} {policy}: not paced: {out:#?}"
        );
        assert!(
            out.stderr.contains(message) && out.stderr.contains("vgpu ERROR"),
            "{limit} {policy}: {}",
            out.stderr
        );
    }
}

#[test]
fn two_containers_at_30_and_50_share_the_card() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let a = Running::spawn(paced(&sim, "a", "30", "force").args(["-s", "2.5"]));
    let b = Running::spawn(paced(&sim, "b", "50", "force").args(["-s", "2.5"]));
    let (a, b) = (a.finish(), b.finish());
    assert_share("container at 30", busy(&a), base, 0.30, 0.07, &a);
    assert_share("container at 50", busy(&b), base, 0.50, 0.07, &b);
}

/// The share is the container's: two processes of one container at 30 get 30 between them.
#[test]
fn processes_of_one_container_share_its_compute_share() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let p1 = Running::spawn(paced(&sim, "one", "30", "force").args(["-s", "2.5"]));
    let p2 = Running::spawn(paced(&sim, "one", "30", "force").args(["-s", "2.5"]));
    let (p1, p2) = (p1.finish(), p2.finish());
    let total = busy(&p1) + busy(&p2);
    assert!(
        (0.23..=0.37).contains(&(total / base)),
        "two processes of a 30% container together got {:.3} of unlimited\n{p1:#?}\n{p2:#?}",
        total / base
    );
}

/// Sleeps until CLOCK_MONOTONIC (the clock the periods are aligned to) is `at_ns` into a period of `period_ns`.
fn sleep_to_phase(period_ns: u64, at_ns: u64) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    let wait = (at_ns + period_ns - now % period_ns) % period_ns;
    std::thread::sleep(Duration::from_nanos(wait));
}

/// Without `VGPU_PACING_PERIOD_MS` the card paces in 500 ms periods (150 ms windows at 30%), and over whole
/// periods the share is the same. Started 300 ms into a period, after the window it will get: what it ran
/// before its first plan is not debt (it once was, and cost it a whole window).
#[test]
fn the_default_500_ms_period_holds_the_share() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let mut c = paced(&sim, "p1s", "30", "force");
    c.env_remove("VGPU_PACING_PERIOD_MS");
    sleep_to_phase(500_000_000, 300_000_000);
    let out = run(c.args(["-s", "3"]));
    assert_share(
        "force 30, 500 ms periods",
        busy(&out),
        base,
        0.30,
        0.05,
        &out,
    );
    assert_eq!(card_period_ns(&sim), 500_000_000);
}

/// A card keeps the period of the first slice on it: a later slice asking for 50 ms adopts the card's 500 ms,
/// says so, and the two windows still do not overlap (each gets its share).
#[test]
fn a_later_slice_adopts_the_cards_period() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let mut first = paced(&sim, "first", "30", "force");
    first
        .env_remove("VGPU_PACING_PERIOD_MS")
        .env("VGPU_LOG", "info");
    let mut a = Running::spawn(first.args(["-s", "4.5"]));
    a.wait_line("second 1", WAIT).expect("the first slice runs");
    let mut later = paced(&sim, "later", "50", "force");
    later.env("VGPU_LOG", "info");
    let b = run(later.args(["-s", "3"]));
    let a = a.finish();
    assert!(
        b.stderr.contains("paces in periods of 500 ms") && b.stderr.contains("asked for 50 ms"),
        "{}",
        b.stderr
    );
    assert_share("first at 30", busy(&a), base, 0.30, 0.06, &a);
    assert_share("later at 50", busy(&b), base, 0.50, 0.07, &b);
    assert_eq!(card_period_ns(&sim), 500_000_000);
}

/// Every container on the node can write the card file: a period no slice could have recorded there is ignored
/// (with a warning) instead of stalling or crashing the launches of every slice on the card.
#[test]
fn a_bad_period_in_the_card_file_is_ignored() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    run(paced(&sim, "first", "30", "force").args(["-s", "0.3"])).assert_ok();
    let card = card_file(&sim);
    let mut bytes = std::fs::read(&card).unwrap();
    bytes[24..32].copy_from_slice(&7u64.to_ne_bytes());
    std::fs::write(&card, &bytes).unwrap();
    let out = run(paced(&sim, "second", "30", "force").args(["-s", "2"]));
    assert_share(
        "force 30 beside a bad period",
        busy(&out),
        base,
        0.30,
        0.05,
        &out,
    );
    assert!(
        out.stderr.contains("invalid pacing period (7 ns)"),
        "{}",
        out.stderr
    );
}

/// `default` runs free alone, falls back to its share while a neighbour wants time, and rises again after.
#[test]
fn default_yields_to_a_neighbour_and_takes_the_card_back() {
    let _g = serial();
    let sim = Sim::new();
    let mut d = Running::spawn(paced(&sim, "d", "30", "default").args(["-s", "5.5"]));
    d.wait_line("second 1", WAIT).expect("default runs");
    let mut f = Running::spawn(paced(&sim, "f", "50", "force").args(["-s", "1.5"]));
    f.wait_line("second 1", WAIT).expect("force runs");
    // NVML's view over the last second, both slices active for all of it.
    let util = sim.smi_process_utilization();
    let (dp, fp) = (d.pid(), f.pid());
    let of = |pid: u32| util.iter().find(|(p, _)| *p == pid).map(|(_, u)| *u);
    assert!(
        of(dp).is_some_and(|u| (20..=40).contains(&u)),
        "default at 30 next to a neighbour: {util:?}"
    );
    assert!(
        of(fp).is_some_and(|u| (40..=60).contains(&u)),
        "force at 50: {util:?}"
    );
    f.finish().assert_ok();
    // Within a second of the neighbour stopping, the default slice has the card again.
    std::thread::sleep(Duration::from_millis(1300));
    let util = sim.smi_process_utilization();
    let alone = util.iter().find(|(p, _)| *p == dp).map(|(_, u)| *u);
    assert!(
        alone.is_some_and(|u| u >= 85),
        "default alone again: {util:?}"
    );
    d.finish().assert_ok();
}

/// A request (8 kernels of 250 us, then a synchronize) arriving while its window is closed waits for the next
/// window, never longer: at 30% of 500 ms periods no request takes much more than the 350 ms gap, and half of
/// them arrive inside a window or wait less. (On the H100 one run had a 700 ms tail: this looks for it.)
#[test]
fn a_request_waits_at_most_one_closed_phase() {
    let _g = serial();
    let sim = Sim::new();
    let mut c = paced(&sim, "svc", "30", "force");
    c.env_remove("VGPU_PACING_PERIOD_MS");
    let out = run(c.args(["-r", "50", "-k", "8", "-u", "250", "-s", "6"]));
    out.assert_ok();
    let max = out.f64_after("requests", "max").expect("a requests line");
    let p50 = out.f64_after("requests", "p50").unwrap();
    assert!(max <= 400.0, "a request waited {max} ms: {out:#?}");
    assert!(p50 <= 200.0, "{out:#?}");
}

/// Launches completed in a `cuda_launch` run.
fn launches(out: &Out) -> f64 {
    out.assert_ok();
    out.f64_after("overall", "launches")
        .unwrap_or_else(|| panic!("no overall line: {out:#?}"))
}

#[test]
fn a_launch_bound_loop_gets_its_share_of_launches() {
    let _g = serial();
    // 2 us kernels behind a fixed amount of CPU work per launch: the CPU sets the rate, the GPU idles most of
    // the time. Under force 30 the loop may launch only inside its windows, so it should reach ~30% of its
    // unlimited rate. The band is wider than the issue's ±5 points: on a 2-core CI machine the CPU's speed
    // moves between the two runs (and the H100 runs are the evidence for the issue).
    let args = ["-u", "2", "-w", "2000", "-s", "3"];
    let sim = Sim::new();
    let free = launches(&sim.run("cuda_launch", &args));
    let out = run(paced(&sim, "lb", "30", "force").args(args));
    assert_share(
        "launch-bound force 30",
        launches(&out),
        free,
        0.30,
        0.08,
        &out,
    );
}

/// Each device is its own card: slices at 60 on device 0 and on device 1 both get 60 (were the devices one
/// card, 60 + 60 would be scaled down to 50 each), and a process paced on device 1 leaves device 0 alone.
#[test]
fn slices_on_two_devices_are_paced_each_on_its_own_card() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new().devices(2);
    let a = Running::spawn(paced(&sim, "d0", "60", "force").args(["-s", "2.5", "-d", "0"]));
    let b = Running::spawn(paced(&sim, "d1", "60", "force").args(["-s", "2.5", "-d", "1"]));
    let (a, b) = (a.finish(), b.finish());
    assert_share("device 0 at 60", busy(&a), base, 0.60, 0.07, &a);
    assert_share("device 1 at 60", busy(&b), base, 0.60, 0.07, &b);
    assert_eq!(
        std::fs::read_dir(sim.card_dir()).unwrap().count(),
        2,
        "one card file per device"
    );
}
