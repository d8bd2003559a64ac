//! `vgpu-agent exec` and `status` as a workstation user meets them, on the simulated GPU (a 15360 MiB card).

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use vgpu_integration::{shim_path, Sim};

fn agent(sim: &Sim) -> Command {
    // The simulated NVML and nvidia-smi, as `Sim::cmd` sets them up, for the agent binary itself.
    let probe = sim.cmd("nvidia-smi");
    let mut c = Command::new(env!("CARGO_BIN_EXE_vgpu-agent"));
    for (k, v) in probe.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.env(
        "PATH",
        format!(
            "{}:{}",
            vgpu_integration::sim_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    c
}

fn exec(sim: &Sim, args: &[&str]) -> Output {
    agent(sim)
        .arg("exec")
        .arg("--shim")
        .arg(shim_path())
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn root() -> bool {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn values_are_checked_against_the_card_before_the_command_runs() {
    let sim = Sim::new().memory_mib(15360);
    let o = exec(
        &sim,
        &["--gpumem", "99999999999999", "--", "sh", "-c", "echo ran"],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("ran"), "the command ran: {}", text(&o));
    assert!(
        text(&o).contains("more than GPU 0 has (15360 MiB)"),
        "{}",
        text(&o)
    );
    for d in ["3", "GPU-nope"] {
        let o = exec(&sim, &["--gpumem", "4000", "--device", d, "--", "true"]);
        assert!(!o.status.success());
        assert!(
            text(&o).contains(&format!("--device {d}: no such GPU")),
            "{}",
            text(&o)
        );
    }
    let o = exec(&sim, &["--gpumem", "4000", "--device", "0", "--", "true"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_relative_cache_is_one_absolute_file_for_every_process() {
    let sim = Sim::new();
    let o = agent(&sim)
        .current_dir(sim.dir())
        .args(["exec", "--shim"])
        .arg(shim_path())
        .args(["--gpumem", "1000", "--cache", "rel.cache", "--", "sh", "-c"])
        .arg("cd / && echo \"$CUDA_DEVICE_MEMORY_SHARED_CACHE\"")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let got = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(got, sim.dir().join("rel.cache").display().to_string());
}

#[test]
fn the_command_needs_no_double_dash() {
    let sim = Sim::new();
    let o = exec(
        &sim,
        &[
            "--gpumem",
            "4000",
            "nvidia-smi",
            "--query-gpu=memory.total",
            "--format=csv,noheader",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("4000"), "{}", text(&o));
}

#[test]
fn any_user_gets_a_private_runtime_directory() {
    if !root() {
        eprintln!("skipped: needs root to run exec as another user");
        return;
    }
    let sim = Sim::new();
    // Let the unprivileged user reach the simulated card.
    sim.smi(&["-L"]).assert_ok();
    std::fs::set_permissions(sim.state_path(), std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(sim.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run_as = |uid: u32| {
        let mut c = agent(&sim);
        c.env_remove("XDG_RUNTIME_DIR");
        let inner = c.get_program().to_owned();
        let mut s = Command::new("setpriv");
        s.args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
        ]);
        s.arg(inner);
        for (k, v) in c.get_envs() {
            if let Some(v) = v {
                s.env(k, v);
            }
        }
        s.env_remove("XDG_RUNTIME_DIR");
        s.args(["exec", "--shim"])
            .arg(shim_path())
            .args(["--gpumem", "1000", "--", "sh", "-c"])
            .arg("echo \"$CUDA_DEVICE_MEMORY_SHARED_CACHE\"");
        s.output().unwrap()
    };
    // Two users one after the other, root first, as the issue found it: neither is refused.
    for uid in [0u32, 65534, 65533] {
        let o = run_as(uid);
        assert!(o.status.success(), "uid {uid}: {}", text(&o));
        // What a second user met before: the first user's directory, and the shim alone in charge.
        assert!(
            !text(&o).contains("for this process alone"),
            "uid {uid}: {}",
            text(&o)
        );
        let cache = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let dir = std::path::Path::new(&cache).parent().unwrap().to_path_buf();
        let md = std::fs::metadata(&dir).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(md.uid(), uid, "{}", dir.display());
        assert_eq!(md.permissions().mode() & 0o777, 0o700, "{}", dir.display());
    }
}

#[test]
fn status_without_an_agent_shows_the_gpus_and_a_missing_cache_dir() {
    let sim = Sim::new().memory_mib(15360);
    let o = agent(&sim)
        .args(["status", "--json", "--socket"])
        .arg(sim.dir().join("no-agent.sock"))
        .arg("--cache-dir")
        .arg(sim.dir().join("nowhere"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["gpus"].as_array().map(|a| a.len()), Some(1), "{v}");
    assert_eq!(v["gpus"][0]["memory_total"], 15360u64 << 20, "{v}");
    let notes = v["notes"].to_string();
    assert!(
        notes.contains("nowhere") && notes.contains("No such file"),
        "{notes}"
    );
}
