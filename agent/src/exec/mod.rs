//! `vgpu-agent exec`: runs a command in a GPU slice on this host, without Kubernetes, by giving it the same
//! environment Allocate gives a container (HAMi's variables) and preloading libvgpu.so. The values are checked
//! against the card first; the slice gets a cgroup of its own where the machine allows it and is registered
//! with the node agent, if one runs, from here (never from a file the slice could write).

mod bind;
mod check;
mod runtime_dir;
mod slice_cgroup;

use std::path::{Path, PathBuf};
use std::process::Command;
use vgpu_contract::agent_socket::ExecBinding;
use vgpu_contract::env;
use vgpu_contract::limits::CorePolicy;

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// Memory slice in MiB (per visible GPU).
    #[arg(long, value_name = "MiB", conflicts_with = "gpumem_percentage")]
    pub gpumem: Option<u64>,
    /// Memory slice as a percentage of the card (instead of --gpumem).
    #[arg(long, value_name = "P", value_parser = clap::value_parser!(u64).range(1..=100))]
    pub gpumem_percentage: Option<u64>,
    /// Compute share in percent of the card (0 or 100: no cap).
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u32).range(0..=100))]
    pub gpucores: Option<u32>,
    /// default, force or disable (GPU_CORE_UTILIZATION_POLICY).
    #[arg(long, value_parser = parse_policy)]
    pub policy: Option<CorePolicy>,
    /// The GPU to use: an index or a UUID (default: every GPU, each with the slice).
    #[arg(long, value_name = "INDEX|UUID")]
    pub device: Option<String>,
    /// Shared-cache file: give the same file to several commands to make them one container (a relative path
    /// is taken from the current directory). Default: a new file in your runtime directory.
    #[arg(long, value_name = "FILE")]
    pub cache: Option<PathBuf>,
    /// libvgpu.so to preload (default: beside this binary, then /usr/local/vgpu/libvgpu.so).
    #[arg(long, value_name = "PATH")]
    pub shim: Option<PathBuf>,
    /// Directory of the per-card coordination files (default /var/run/vgpu/cards).
    #[arg(long, value_name = "DIR")]
    pub card_dir: Option<PathBuf>,
    /// The agent's socket for registering the slice (its cgroup, cache and limits).
    #[arg(long, value_name = "PATH", default_value = bind::DEFAULT_BIND_SOCKET, hide = true)]
    pub bind_socket: PathBuf,
    /// The command and its arguments (`--` before them is optional unless the command starts with `-`).
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

fn parse_policy(s: &str) -> Result<CorePolicy, String> {
    CorePolicy::parse(s).map_err(|e| e.to_string())
}

fn find_shim(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return std::fs::canonicalize(p).map_err(|e| format!("--shim {}: {e}", p.display()));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("libvgpu.so")));
    let candidates = beside
        .into_iter()
        .chain([PathBuf::from(env::CONTAINER_DIR).join("libvgpu.so")]);
    for c in candidates {
        if c.exists() {
            return std::fs::canonicalize(&c).map_err(|e| format!("{}: {e}", c.display()));
        }
    }
    Err("libvgpu.so not found beside vgpu-agent or in /usr/local/vgpu; pass --shim PATH".into())
}

/// The environment the command gets (without LD_PRELOAD), in order.
pub fn slice_env(args: &ExecArgs, gpumem_mib: Option<u64>, cache: &Path) -> Vec<(String, String)> {
    let mut vars = Vec::new();
    if let Some(d) = &args.device {
        vars.push((env::CUDA_VISIBLE_DEVICES.to_string(), d.clone()));
    }
    if let Some(m) = gpumem_mib {
        // With one device chosen it is CUDA ordinal 0 in the command; otherwise the slice applies to each.
        let name = if args.device.is_some() {
            format!("{}0", env::MEMORY_LIMIT_PREFIX)
        } else {
            env::MEMORY_LIMIT_ALL.to_string()
        };
        vars.push((name, format!("{m}m")));
    }
    if let Some(c) = args.gpucores {
        vars.push((env::SM_LIMIT.to_string(), c.to_string()));
    }
    if let Some(p) = args.policy {
        vars.push((env::CORE_POLICY.to_string(), p.as_str().to_string()));
    }
    vars.push((env::SHARED_CACHE.to_string(), cache.display().to_string()));
    if let Some(d) = &args.card_dir {
        vars.push((env::CARD_DIR.to_string(), d.display().to_string()));
    }
    vars
}

pub fn run(args: ExecArgs) -> i32 {
    match run_inner(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vgpu-agent exec: {e}");
            125
        }
    }
}

fn run_inner(args: &ExecArgs) -> Result<i32, String> {
    let shim = find_shim(args.shim.as_deref())?;
    let gpus = crate::gpus::Gpus::open();
    let cards: Vec<_> = gpus.sample().into_iter().map(|s| s.gpu).collect();
    let checked = check::check(
        &cards,
        args.device.as_deref(),
        args.gpumem,
        args.gpumem_percentage,
    )
    .map_err(|e| match &gpus.error {
        Some(why) => format!("{e} ({why})"),
        None => e,
    })?;
    let gpumem = checked.memory_mib.first().map(|&(_, m)| m);
    // One absolute path for every process of the slice, whatever directory each runs from.
    let (cache, ours) = match &args.cache {
        Some(c) => (
            std::path::absolute(c).map_err(|e| format!("--cache {}: {e}", c.display()))?,
            false,
        ),
        None => {
            let dir = runtime_dir::for_caller()?;
            let name = format!("{}-{:x}.cache", std::process::id(), random_u64());
            (dir.join(name), true)
        }
    };
    let preload = match std::env::var("LD_PRELOAD") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", shim.display()),
        _ => shim.display().to_string(),
    };
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..]).env("LD_PRELOAD", preload);
    for (k, v) in slice_env(args, gpumem, &cache) {
        cmd.env(k, v);
    }
    tie_to_parent(&mut cmd);
    // SAFETY: geteuid(2) cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let id = format!("{}-{:x}", std::process::id(), random_u64());
    let cgroup = match slice_cgroup::SliceCgroup::create(
        &crate::ledger::cgroups::cgroup2_mount(),
        &id,
        root,
    ) {
        Ok(cg) => {
            cg.enter_on_spawn(&mut cmd);
            Some(cg)
        }
        Err(e) => {
            eprintln!(
                "vgpu-agent exec: no cgroup of its own for this slice ({e}); the agent sees it as part of your \
                 session's cgroup"
            );
            None
        }
    };
    let child = cmd.spawn().map_err(|e| {
        let hint = if args.command[0].starts_with('-') {
            " (options of exec go before the command; put `--` before a command that starts with `-`)"
        } else {
            ""
        };
        format!("{}: {e}{hint}", args.command[0])
    });
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            if let Some(cg) = cgroup {
                cg.remove();
            }
            return Err(e);
        }
    };
    forward_signals_to(child.id());
    if let Some(cg) = &cgroup {
        let binding = ExecBinding {
            cgroup: cg.rel.clone(),
            cache: cache.display().to_string(),
            memory_limits: checked
                .memory_mib
                .iter()
                .map(|&(o, m)| (o, m << 20))
                .collect(),
            sm_limit: args.gpucores.unwrap_or(0),
            policy: args
                .policy
                .unwrap_or(CorePolicy::Default)
                .as_str()
                .to_string(),
            pid: child.id(),
        };
        match bind::bind(&args.bind_socket, binding) {
            bind::Outcome::Bound => {}
            bind::Outcome::NoAgent(_) => {}
            bind::Outcome::Refused(why) => {
                eprintln!("vgpu-agent exec: the agent did not register this slice: {why}")
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("{}: {e}", args.command[0]));
    if let Some(cg) = cgroup {
        bind::unbind(&args.bind_socket, &cg.rel);
        cg.remove();
    }
    if ours {
        let _ = std::fs::remove_file(&cache);
    }
    let status = status?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ (std::process::id() as u64).rotate_left(32);
    }
    u64::from_ne_bytes(b)
}

/// The command dies with us: killing `vgpu-agent exec` (even with SIGKILL) must not leave its workload holding
/// the slice.
fn tie_to_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; pid is our child's.
        unsafe { libc::kill(pid, sig) };
    }
}

/// SIGINT, SIGTERM and SIGHUP sent to us go to the command, which decides how to end (we then exit with it).
fn forward_signals_to(pid: u32) {
    CHILD.store(pid as i32, std::sync::atomic::Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only reads an atomic and calls kill(2).
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ExecArgs,
    }

    #[test]
    fn env_for_one_device_and_for_all() {
        let t = T::parse_from([
            "x",
            "--gpumem",
            "4000",
            "--gpucores",
            "30",
            "--policy",
            "force",
            "--device",
            "1",
            "--",
            "python3",
        ]);
        let v = slice_env(&t.a, Some(4000), Path::new("/tmp/c.cache"));
        let get = |k: &str| v.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CUDA_VISIBLE_DEVICES"), Some("1"));
        assert_eq!(get("CUDA_DEVICE_MEMORY_LIMIT_0"), Some("4000m"));
        assert_eq!(get("CUDA_DEVICE_SM_LIMIT"), Some("30"));
        assert_eq!(get("GPU_CORE_UTILIZATION_POLICY"), Some("force"));
        assert_eq!(get("CUDA_DEVICE_MEMORY_SHARED_CACHE"), Some("/tmp/c.cache"));
        let t = T::parse_from(["x", "--gpumem", "4000", "--", "python3"]);
        let v = slice_env(&t.a, Some(4000), Path::new("/tmp/c.cache"));
        assert!(v
            .iter()
            .any(|(k, v)| k == "CUDA_DEVICE_MEMORY_LIMIT" && v == "4000m"));
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(T::try_parse_from([
            "x",
            "--gpumem",
            "10",
            "--gpumem-percentage",
            "50",
            "--",
            "a"
        ])
        .is_err());
        assert!(T::try_parse_from(["x", "--gpucores", "150", "--", "a"]).is_err());
        assert!(T::try_parse_from(["x", "--policy", "strict", "--", "a"]).is_err());
        assert!(
            T::try_parse_from(["x", "--gpumem", "10"]).is_err(),
            "a command is required"
        );
    }
}
