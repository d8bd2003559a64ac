//! The shim's compute slices against the simulated GPU, where a kernel runs `gridDimX` microseconds and
//! `cuda_launch` reports the kernel time it completed per second of wall time ("busy").
//!
//! Shares are judged against an unlimited run on the same machine, so a slow or loaded CI box moves both sides.
//! The tests run one at a time: they measure time, and two at once would compete for the simulated card and
//! for the CPU.

use std::fs::File;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use vgpu_contract::card_layout::ENTRIES;
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

/// The pacing periods the card's entries ask for (word 5 of each entry with a key), in ns.
fn card_periods_ns(sim: &Sim) -> Vec<u64> {
    let bytes = std::fs::read(card_file(sim)).unwrap();
    let word = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap());
    (0..ENTRIES)
        .map(|i| 64 + 64 * i)
        .filter(|&e| word(e) != 0)
        .map(|e| word(e + 40))
        .collect()
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
    assert_eq!(card_periods_ns(&sim), vec![500_000_000]);
}

/// Slices on one card pace by the shortest period any live slice there asks for, never a longer one than their
/// own: a 500 ms slice joined by one asking for 50 ms moves to 50 ms (and says so), so the windows line up and
/// each gets its share.
#[test]
fn slices_on_a_card_pace_by_the_shortest_period_asked() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let mut first = paced(&sim, "first", "30", "force");
    first
        .env_remove("VGPU_PACING_PERIOD_MS")
        .env("VGPU_LOG", "info");
    let mut a = Running::spawn(first.args(["-s", "4.5"]));
    a.wait_line("second 1", WAIT).expect("the first slice runs");
    let b = run(paced(&sim, "later", "50", "force").args(["-s", "3"]));
    let a = a.finish();
    assert!(
        a.stderr.contains("pacing in periods of 50 ms") && a.stderr.contains("asked for 500 ms"),
        "{}",
        a.stderr
    );
    assert_share("first at 30", busy(&a), base, 0.30, 0.06, &a);
    assert_share("later at 50", busy(&b), base, 0.50, 0.07, &b);
    let mut periods = card_periods_ns(&sim);
    periods.sort();
    assert_eq!(
        periods,
        vec![50_000_000, 500_000_000],
        "each entry says what its slice asked for"
    );
}

/// Every container on the node can write the card file: a live-looking entry asking for a period no slice
/// could (7 ns) is ignored, with one warning, instead of stalling or crashing the launches of every slice on
/// the card (before the period's check, it aborted them).
#[test]
fn a_bad_period_in_the_card_file_is_ignored() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    run(paced(&sim, "first", "30", "force").args(["-s", "0.3"])).assert_ok();
    let _sq = Squatter::fill(
        &card_file(&sim),
        Fake {
            key: 0xbad0,
            share: 30,
            policy: FORCE,
            active_ns: monotonic_ns(),
            period_ns: 7,
        },
        true,
        1,
    );
    let out = run(paced(&sim, "second", "30", "force").args(["-s", "2"]));
    assert_share(
        "force 30 beside a bad period",
        busy(&out),
        base,
        0.30,
        0.05,
        &out,
    );
    assert_eq!(mentions(&out, "claims period of 7 ns"), 1, "{}", out.stderr);
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

// ---- A hostile card directory. Every tenant on the node can write it: a slice must keep its own share, never
// crash or hang, whatever it finds there; a tenant gets at most its own share by writing into it.

mod hostile_card;
use hostile_card::{
    card_name, entry_key, entry_word, monotonic_ns, plant_at_temporary, write_blank_card, Fake,
    Plant, Scribbler, Squatter, FORCE, MS,
};

/// Waits until the simulated card's file exists with a slice in it; returns its path.
fn wait_for_card(sim: &Sim) -> std::path::PathBuf {
    let path = sim.card_dir().join(card_name(0));
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        if path.is_file() && (0..4).any(|i| entry_key(&path, i) != 0) {
            return path;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no slice joined {}", path.display());
}

/// Counts lines of stderr that mention `needle`: a hostile card is reported, once, not at every tick.
fn mentions(out: &Out, needle: &str) -> usize {
    out.stderr.lines().filter(|l| l.contains(needle)).count()
}

/// The card file cut short under two paced slices (30 and 50): neither dies (a shared mapping raised SIGBUS),
/// neither runs free, and both keep the windows they had, instead of both falling back to the start of the
/// period on top of each other.
#[test]
fn a_truncated_card_file_neither_kills_nor_frees_a_neighbour() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let mut a = Running::spawn(
        paced(&sim, "a", "30", "force")
            .args(SHORT_QUEUE)
            .args(["-s", "2.5"]),
    );
    let card = wait_for_card(&sim);
    let b = Running::spawn(
        paced(&sim, "b", "50", "force")
            .args(SHORT_QUEUE)
            .args(["-s", "2.5"]),
    );
    let deadline = std::time::Instant::now() + WAIT;
    while (0..ENTRIES).filter(|&i| entry_key(&card, i) != 0).count() < 2 {
        assert!(std::time::Instant::now() < deadline, "b never joined");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    // Cut the file while they pace, several times.
    for len in [0u64, 10, 70, 0] {
        File::options()
            .write(true)
            .open(&card)
            .unwrap()
            .set_len(len)
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    a.wait_line("second 1", WAIT).expect("a runs");
    let (a, b) = (a.finish(), b.finish());
    assert_share("force 30, card truncated", busy(&a), base, 0.30, 0.05, &a);
    assert_share("force 50, card truncated", busy(&b), base, 0.50, 0.05, &b);
    assert!(
        mentions(&a, "card") <= 2,
        "reported once, not every tick: {}",
        a.stderr
    );
}

#[test]
fn a_max_debt_word_does_not_stop_a_neighbour() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let n = Running::spawn(paced(&sim, "n", "30", "force").args(["-s", "2.5"]));
    let card = wait_for_card(&sim);
    let max = u64::MAX.to_ne_bytes().to_vec();
    // Words 5 to 7 of its entry: debt, payment and overrun in the first layout.
    let _s = Scribbler::start(
        card,
        (5..8).map(|w| (entry_word(0, w), max.clone())).collect(),
    );
    let out = n.finish();
    assert_share(
        "force 30, debt word at max",
        busy(&out),
        base,
        0.30,
        0.05,
        &out,
    );
}

#[test]
fn activity_in_the_future_does_not_hold_a_default_slice() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    run(paced(&sim, "first", "30", "force").args(["-s", "0.2"])).assert_ok();
    let card = sim.card_dir().join(card_name(0));
    // An entry held as a live slice's, claiming activity an hour from now: never idle, never stale.
    let hour = 3_600_000 * MS;
    let _sq = Squatter::fill(
        &card,
        Fake {
            key: 0xbad0,
            share: 99,
            policy: FORCE,
            active_ns: monotonic_ns() + hour,
            period_ns: 50 * MS,
        },
        false,
        1,
    );
    let out = run(paced(&sim, "d", "30", "default").args(["-s", "2"]));
    assert!(
        busy(&out) / base >= 0.9,
        "default alone beside activity from the future: {:.3}\n{out:#?}",
        busy(&out) / base
    );
}

/// Kernels of 500 us, a synchronize every 4: at most 2 ms of work queued when a window closes. Three slices fill
/// 90% of each period here, and the last one's overrun runs into the first one's window; short queues keep
/// that within the test's band, so what it measures is the fake entries.
const SHORT_QUEUE: [&str; 4] = ["-u", "500", "-k", "4"];

/// A tenant fills every free entry with slices of share 99 that look alive (held, refreshed every 5 ms) while
/// running its own 30% slice. The neighbour that joined before keeps its 30, one arriving at a full table gets
/// its 30 too, and the tenant's own slice gets no more than its 30.
#[test]
fn a_full_table_of_fake_entries_takes_no_share() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let n = Running::spawn(
        paced(&sim, "n", "30", "force")
            .args(SHORT_QUEUE)
            .args(["-s", "3.5"]),
    );
    let card = wait_for_card(&sim);
    let x = Running::spawn(
        paced(&sim, "attacker", "30", "force")
            .args(SHORT_QUEUE)
            .args(["-s", "3"]),
    );
    let deadline = std::time::Instant::now() + WAIT;
    while (0..ENTRIES).filter(|&i| entry_key(&card, i) != 0).count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the attacker never joined"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let sq = Squatter::fill(
        &card,
        Fake {
            key: 0xbad0,
            share: 99,
            policy: FORCE,
            active_ns: monotonic_ns(),
            period_ns: 50 * MS,
        },
        true,
        ENTRIES,
    );
    assert_eq!(sq.taken, ENTRIES - 2, "the table is full");
    let late = run(paced(&sim, "late", "30", "force")
        .args(SHORT_QUEUE)
        .args(["-s", "2"]));
    let (n, x) = (n.finish(), x.finish());
    drop(sq);
    assert_share(
        "neighbour at 30 beside 62 fakes",
        busy(&n),
        base,
        0.30,
        0.05,
        &n,
    );
    assert_share(
        "late neighbour at 30, table full",
        busy(&late),
        base,
        0.30,
        0.05,
        &late,
    );
    assert!(
        busy(&x) / base <= 0.35,
        "the tenant writing the fakes got {:.3}\n{x:#?}",
        busy(&x) / base
    );
}

/// A period word of 5000 ms (the card's period in the first layout; a live-looking entry asking for it in the
/// second) must not make a neighbour that asked for 50 ms wait seconds: it waits at most its own period.
#[test]
fn a_5000_ms_period_word_does_not_lengthen_a_neighbours_wait() {
    let _g = serial();
    let sim = Sim::new();
    run(paced(&sim, "first", "30", "force").args(["-s", "0.2"])).assert_ok();
    let card = sim.card_dir().join(card_name(0));
    let _sq = Squatter::fill(
        &card,
        Fake {
            key: 0xbad0,
            share: 1,
            policy: FORCE,
            active_ns: monotonic_ns(),
            period_ns: 5000 * MS,
        },
        true,
        1,
    );
    let _s = Scribbler::start(card, vec![(24, (5000 * MS).to_ne_bytes().to_vec())]);
    let out = run(
        paced(&sim, "svc", "30", "force").args(["-r", "20", "-k", "4", "-u", "250", "-s", "3"])
    );
    out.assert_ok();
    let max = out.f64_after("requests", "max").expect("a requests line");
    assert!(
        max <= 100.0,
        "a request waited {max} ms in 50 ms periods: {out:#?}"
    );
}

#[test]
fn a_fifo_in_place_of_the_card_or_of_its_temporary_file_blocks_nothing() {
    let _g = serial();
    let base = baseline();
    // In place of the card file.
    let sim = Sim::new();
    let card = sim.card_dir().join(card_name(0));
    let c = std::ffi::CString::new(card.to_str().unwrap()).unwrap();
    // SAFETY: c is a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
    let out = run(paced(&sim, "n", "30", "force").args(["-s", "1.5"]));
    assert_share("force 30, FIFO as card", busy(&out), base, 0.30, 0.05, &out);
    assert!(mentions(&out, "card") == 1, "said once: {}", out.stderr);
    // At the name the card file would be created through.
    let sim = Sim::new();
    let mut cmd = paced(&sim, "n", "30", "force");
    plant_at_temporary(&mut cmd, &sim.card_dir(), Plant::Fifo);
    let out = run(cmd.args(["-s", "1.5"]));
    assert_share(
        "force 30, FIFO at the temporary name",
        busy(&out),
        base,
        0.30,
        0.05,
        &out,
    );
}

/// A symlink in place of the card, to a card-shaped file the tenant controls and then truncates: not followed.
#[test]
fn a_symlink_in_place_of_the_card_is_not_followed() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let evil = sim.dir().join("evil.card");
    write_blank_card(&evil);
    let before = std::fs::read(&evil).unwrap();
    std::os::unix::fs::symlink(&evil, sim.card_dir().join(card_name(0))).unwrap();
    let mut n = Running::spawn(paced(&sim, "n", "30", "force").args(["-s", "2"]));
    n.wait_line("second 1", WAIT).expect("it runs");
    let after = std::fs::read(&evil).unwrap();
    File::options()
        .write(true)
        .open(&evil)
        .unwrap()
        .set_len(0)
        .unwrap();
    let out = n.finish();
    assert_share(
        "force 30, card is a symlink",
        busy(&out),
        base,
        0.30,
        0.05,
        &out,
    );
    assert!(after == before, "the slice wrote through the link");
    assert_eq!(mentions(&out, "card"), 1, "{}", out.stderr);
}

#[test]
fn a_directory_in_place_of_the_card_is_reported_and_paced_alone() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    std::fs::create_dir(sim.card_dir().join(card_name(0))).unwrap();
    let out = run(paced(&sim, "n", "30", "force").args(["-s", "1.5"]));
    assert_share(
        "force 30, directory as card",
        busy(&out),
        base,
        0.30,
        0.05,
        &out,
    );
    assert_eq!(mentions(&out, "card"), 1, "{}", out.stderr);
}

/// A symlink at the temporary name a slice creates its card file through: the file it points to is untouched
/// and the card is a regular file of its own.
#[test]
fn a_planted_temporary_file_symlink_clobbers_nothing() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let victim = sim.dir().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let mut cmd = paced(&sim, "n", "30", "force");
    plant_at_temporary(&mut cmd, &sim.card_dir(), Plant::SymlinkTo(victim.clone()));
    let out = run(cmd.args(["-s", "1.5"]));
    let victim_now = std::fs::read(&victim).unwrap();
    assert!(
        victim_now == b"precious",
        "the file the link points to was written: now {} bytes",
        victim_now.len()
    );
    let card = sim.card_dir().join(card_name(0));
    let meta = std::fs::symlink_metadata(&card).unwrap();
    assert!(meta.file_type().is_file(), "{meta:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o666,
        "every tenant's uid writes its entry"
    );
    assert_share("force 30, planted link", busy(&out), base, 0.30, 0.05, &out);
}

/// The pacing thread cannot start (a user with RLIMIT_NPROC of 1): launches are paced on the launching thread
/// instead of running free.
#[test]
fn launches_are_held_when_the_pacer_thread_cannot_start() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(sim.dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(sim.card_dir(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let mut cmd = paced(&sim, "n", "30", "force");
    hostile_card::without_threads(&mut cmd);
    let out = run(cmd.args(["-s", "2"]));
    assert_share(
        "force 30 without a pacer thread",
        busy(&out),
        base,
        0.30,
        0.05,
        &out,
    );
    assert!(
        out.stderr.contains("cannot start the pacing thread"),
        "the thread was really refused: {}",
        out.stderr
    );
}

/// A tenant moves the card file away and puts a fresh one in its place. A slice that kept using the file it had
/// open would no longer see newcomers, and their windows would overlap: the running slice notices the new file
/// at its name, joins it, and it and the newcomer keep their shares.
#[test]
fn a_card_file_replaced_under_a_running_slice_is_followed() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let mut a = Running::spawn(
        paced(&sim, "a", "30", "force")
            .env("VGPU_LOG", "info")
            .args(["-s", "3.5"]),
    );
    let card = wait_for_card(&sim);
    a.wait_line("second 1", WAIT).expect("it runs");
    std::fs::rename(&card, sim.dir().join("moved.card")).unwrap();
    let fresh = sim.dir().join("fresh.card");
    write_blank_card(&fresh);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::rename(&fresh, &card).unwrap();
    let c = run(paced(&sim, "c", "30", "force").args(["-s", "2"]));
    let a = a.finish();
    assert_share("running slice at 30", busy(&a), base, 0.30, 0.06, &a);
    assert_share("newcomer at 30", busy(&c), base, 0.30, 0.06, &c);
    assert_eq!(
        (0..ENTRIES).filter(|&i| entry_key(&card, i) != 0).count(),
        2,
        "both joined the file now at the card's name: {:?}\n{}\n{}",
        (0..4).map(|i| entry_key(&card, i)).collect::<Vec<_>>(),
        a.stderr,
        c.stderr
    );
}

/// The simulated device 0's UUID (its card file's name without `.card`).
fn sim_uuid() -> String {
    card_name(0).trim_end_matches(".card").to_string()
}

/// Container `name` with a ready limits file as the node's agent writes it (`limit` percent under `policy`,
/// 50 ms periods), with compute windows `VGPU_CORE_WINDOWS_0=<windows>` when given.
fn with_limits_file(
    sim: &Sim,
    name: &str,
    limit: &str,
    policy: &str,
    windows: Option<&str>,
) -> std::process::Command {
    let path = sim.dir().join(format!("{name}.limits"));
    let mut t = format!(
        "# written by vgpu-agent; read by libvgpu.so\nNVIDIA_VISIBLE_DEVICES={}\nCUDA_DEVICE_SM_LIMIT={limit}\n\
         GPU_CORE_UTILIZATION_POLICY={policy}\nCUDA_DEVICE_MEMORY_SHARED_CACHE={}\nVGPU_CARD_DIR={}\n\
         VGPU_PACING_PERIOD_MS=50\n",
        sim_uuid(),
        sim.cache_path(name).display(),
        sim.card_dir().display()
    );
    if let Some(w) = windows {
        t.push_str(&format!("VGPU_CORE_WINDOWS_0={w}\n"));
    }
    t.push_str("VGPU_LIMITS_STATE=ready\n");
    std::fs::write(&path, t).unwrap();
    let mut c = paced(sim, name, limit, policy);
    c.env("VGPU_LIMITS_FILE", &path);
    c
}

/// The card created by the tenant before any slice, every one of its 64 entries held by the tenant's live
/// process claiming 99% and fresh activity.
fn card_held_by_a_tenant(sim: &Sim) -> Squatter {
    let card = sim.card_dir().join(card_name(0));
    write_blank_card(&card);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&card, std::fs::Permissions::from_mode(0o666)).unwrap();
    let sq = Squatter::fill(
        &card,
        Fake {
            key: 0xbad0,
            share: 99,
            policy: FORCE,
            active_ns: monotonic_ns(),
            period_ns: 50 * MS,
        },
        true,
        ENTRIES,
    );
    assert_eq!(sq.taken, ENTRIES, "the tenant holds the whole table");
    sq
}

/// Two honest slices (30 and 40, force) side by side on a card, `windows` giving each its agent windows (or
/// none: placement by the card file). Their busy shares of unlimited.
fn two_honest_slices(sim: &Sim, windows: [Option<&str>; 2]) -> ((f64, Out), (f64, Out)) {
    let base = baseline();
    let a = Running::spawn(
        with_limits_file(sim, "a", "30", "force", windows[0])
            .env("VGPU_LOG", "info")
            .args(SHORT_QUEUE)
            .args(["-s", "3"]),
    );
    let b = Running::spawn(
        with_limits_file(sim, "b", "40", "force", windows[1])
            .env("VGPU_LOG", "info")
            .args(SHORT_QUEUE)
            .args(["-s", "3"]),
    );
    let (a, b) = (a.finish(), b.finish());
    ((busy(&a) / base, a), (busy(&b) / base, b))
}

/// Issue 16: a tenant holds all 64 entries of the card with live locks, claiming 99% each. Two honest slices
/// whose windows the agent placed in their limits files (30% at 0–15 ms and 40% at 15–35 ms of each 50 ms
/// period, as the agent's first fit lays them) pace in exactly those windows: each keeps its share, and
/// together they have their sum (had their windows overlapped, the GPU would be shared inside the overlap and
/// both would fall short). The old build ignored the windows and paced both "outside the table" behind the
/// claims, overlapping (see the next test for the figure).
#[test]
fn a_tenant_holding_every_entry_cannot_move_slices_the_agent_placed() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let _sq = card_held_by_a_tenant(&sim);
    let ((sa, a), (sb, b)) = two_honest_slices(&sim, [Some("50:0+15000"), Some("50:15000+20000")]);
    eprintln!("agent windows, full hostile table: 30% slice {sa:.3}, 40% slice {sb:.3}");
    assert_share("30% slice, agent windows", sa * base, base, 0.30, 0.05, &a);
    assert_share("40% slice, agent windows", sb * base, base, 0.40, 0.05, &b);
    // Overlapping by the 30% the card-file path gives them, they had ~0.42 together (next test); side by side
    // with no tenant at all they have ~0.66 on this simulated card (each ~2 points under, from running two at
    // once), as here.
    assert!(
        sa + sb >= 0.60,
        "together {:.3}: their windows overlapped\n{a:#?}\n{b:#?}",
        sa + sb
    );
    for o in [&a, &b] {
        assert!(
            o.stderr.contains("windows the node's agent placed"),
            "{}",
            o.stderr
        );
    }
}

/// The same two slices with no windows in their limits files (placement by the card file, as off Kubernetes
/// and before issue 16): with the table full, both pace outside it, each placed after the tenant's claims
/// (capped so its window fits: 70–100% and 60–100% of the period), and the two windows overlap for 30% of
/// every period. This documents the weakness the agent's windows close; measured here: the 30% slice at
/// 0.161–0.164 and the 40% slice at 0.258–0.259 (together ~0.42 of the 0.70 they are owed), where with agent
/// windows they get 0.279–0.292 and 0.373–0.384, as without any tenant (0.284 and 0.376).
#[test]
fn without_agent_windows_a_full_table_still_overlaps_two_honest_slices() {
    let _g = serial();
    let sim = Sim::new();
    let _sq = card_held_by_a_tenant(&sim);
    let ((sa, a), (sb, b)) = two_honest_slices(&sim, [None, None]);
    eprintln!("card-file placement, full hostile table: 30% slice {sa:.3}, 40% slice {sb:.3}");
    assert!(
        sa + sb <= 0.60,
        "the card-file path no longer overlaps ({sa:.3} + {sb:.3}): update docs/security.md\n{a:#?}\n{b:#?}"
    );
    for o in [&a, &b] {
        assert!(
            o.stderr.contains("every entry of the card file is held"),
            "{}",
            o.stderr
        );
    }
}

/// `default` with agent windows keeps today's borrowing: alone on an honest card it runs free. Beside a force
/// neighbour hidden by a tenant holding the whole table with idle-looking entries, it cannot tell the card is
/// wanted, so a full table keeps it in its windows, and the neighbour keeps its share (running free, it would
/// run over the neighbour's windows).
#[test]
fn a_default_slice_with_agent_windows_borrows_only_from_a_card_it_can_see() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let alone =
        run(with_limits_file(&sim, "d", "30", "default", Some("50:0+15000")).args(["-s", "1.5"]));
    assert!(busy(&alone) / base >= 0.9, "default alone: {alone:#?}");
    let sim = Sim::new();
    let card = sim.card_dir().join(card_name(0));
    write_blank_card(&card);
    let _sq = Squatter::fill(
        &card,
        Fake {
            key: 0xbad0,
            share: 99,
            policy: FORCE,
            active_ns: 1,
            period_ns: 50 * MS,
        },
        false,
        ENTRIES,
    );
    let d = Running::spawn(
        with_limits_file(&sim, "d", "30", "default", Some("50:0+15000"))
            .env("VGPU_LOG", "info")
            .args(SHORT_QUEUE)
            .args(["-s", "3"]),
    );
    let f = Running::spawn(
        with_limits_file(&sim, "f", "40", "force", Some("50:15000+20000"))
            .args(SHORT_QUEUE)
            .args(["-s", "3"]),
    );
    let (d, f) = (d.finish(), f.finish());
    eprintln!(
        "full idle table: default 30 at {:.3}, hidden force 40 at {:.3}",
        busy(&d) / base,
        busy(&f) / base
    );
    assert_share(
        "hidden force neighbour at 40",
        busy(&f),
        base,
        0.40,
        0.05,
        &d,
    );
    assert_share("default at 30, table full", busy(&d), base, 0.30, 0.05, &d);
}

/// Whatever happens to the card under a slice with agent windows (cut short, rewritten, a max debt word in
/// every entry), it keeps its share: its windows never came from the card.
#[test]
fn agent_windows_survive_a_truncated_card_and_a_max_debt_word() {
    let _g = serial();
    let base = baseline();
    let sim = Sim::new();
    let mut a = Running::spawn(
        with_limits_file(&sim, "a", "30", "force", Some("50:20000+15000"))
            .args(SHORT_QUEUE)
            .args(["-s", "3"]),
    );
    let card = wait_for_card(&sim);
    let max = u64::MAX.to_ne_bytes().to_vec();
    let scribble = Scribbler::start(
        card.clone(),
        (0..ENTRIES)
            .flat_map(|i| (5..8).map(move |w| entry_word(i, w)))
            .map(|off| (off, max.clone()))
            .collect(),
    );
    for len in [0u64, 10, 70, 0] {
        std::thread::sleep(Duration::from_millis(150));
        File::options()
            .write(true)
            .open(&card)
            .unwrap()
            .set_len(len)
            .unwrap();
    }
    a.wait_line("second 1", WAIT).expect("it runs");
    let a = a.finish();
    drop(scribble);
    assert_share(
        "30% slice, card cut and scribbled",
        busy(&a),
        base,
        0.30,
        0.05,
        &a,
    );
}
