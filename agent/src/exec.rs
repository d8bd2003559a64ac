//! `vgpu-agent exec`: runs a command in a GPU slice on this host, without Kubernetes, by giving it the same
//! environment Allocate gives a container (HAMi's variables) and preloading libvgpu.so.

use std::path::{Path, PathBuf};
use std::process::Command;
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
    /// Shared-cache file: give the same file to several commands to make them one container.
    #[arg(long, value_name = "FILE")]
    pub cache: Option<PathBuf>,
    /// libvgpu.so to preload (default: beside this binary, then /usr/local/vgpu/libvgpu.so).
    #[arg(long, value_name = "PATH")]
    pub shim: Option<PathBuf>,
    /// Directory of the per-card coordination files (default /var/run/vgpu/cards).
    #[arg(long, value_name = "DIR")]
    pub card_dir: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
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

/// Total MiB of the card, from nvidia-smi (the real one, or the simulated GPU's).
fn card_total_mib(device: Option<&str>) -> Result<u64, String> {
    let mut cmd = Command::new("nvidia-smi");
    cmd.args(["--query-gpu=memory.total", "--format=csv,noheader,nounits"]);
    if let Some(d) = device {
        cmd.args(["-i", d]);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("--gpumem-percentage needs nvidia-smi to size the card: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .trim_end_matches("MiB")
        .trim();
    first
        .parse()
        .map_err(|_| format!("cannot read the card's memory from nvidia-smi: {text:?}"))
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
    let gpumem = match (args.gpumem, args.gpumem_percentage) {
        (Some(0), _) => return Err("--gpumem must be at least 1 MiB".into()),
        (Some(m), _) => Some(m),
        (None, Some(p)) => Some(card_total_mib(args.device.as_deref())? * p / 100),
        (None, None) => None,
    };
    // A cache of our own unless the caller names one; removed afterwards so nothing stale is left.
    let (cache, ours) = match &args.cache {
        Some(c) => (c.clone(), false),
        None => {
            let dir = std::env::temp_dir().join("vgpu-exec");
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            (dir.join(format!("{}.cache", std::process::id())), true)
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
    let status = cmd.spawn().and_then(|mut child| {
        forward_signals_to(child.id());
        child.wait()
    });
    let status = status.map_err(|e| format!("{}: {e}", args.command[0]));
    if ours {
        let _ = std::fs::remove_file(&cache);
    }
    let status = status?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
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
