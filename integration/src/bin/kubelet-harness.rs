//! `kubelet-harness`: a kubelet for tests (see `vgpu_integration::kubelet`). SIGHUP plays a kubelet restart
//! to the device plugins; SIGTERM or SIGINT stops every pod's processes and exits.
//! `kubelet-harness exec --run-dir D NAMESPACE/POD [-c CONTAINER] -- CMD...` runs a command in a running
//! container (its env, mount namespace, cgroup), as `kubectl exec` would.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use vgpu_integration::kubelet::{self, Config, Harness};

#[derive(Parser, Debug)]
#[command(
    about = "A kubelet for tests: device plugin gRPC, PodResources, pods started as host processes",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: Args,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Run a command in a running container, as `kubectl exec` would.
    Exec(ExecArgs),
    /// (internal) First process of a container's pid namespace: runs the command as its pid 1.
    #[command(hide = true)]
    Pid1 {
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(clap::Args, Debug)]
struct ExecArgs {
    /// The harness's --run-dir.
    #[arg(long)]
    run_dir: PathBuf,
    /// NAMESPACE/POD, or POD in namespace default.
    pod: String,
    /// The container (needed when the pod runs several).
    #[arg(short = 'c', long)]
    container: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct Args {
    /// The Node this harness is (required to serve).
    #[arg(long)]
    node_name: Option<String>,
    /// Directory of kubelet.sock and the plugins' sockets.
    #[arg(long, default_value = "/var/lib/kubelet/device-plugins")]
    device_plugin_dir: PathBuf,
    /// The PodResources socket to serve.
    #[arg(long, default_value = "/var/lib/kubelet/pod-resources/kubelet.sock")]
    pod_resources_socket: PathBuf,
    /// kubeconfig of the API server (default: KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// cgroup2 directory for pod cgroups (kubepods/besteffort/pod<uid>/<containerID> under it); without it
    /// containers stay in the harness's cgroup.
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Logs and state (logs/<namespace>_<pod>_<container>.log, containers/ for exec; required to serve).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Do not bind-mount Allocate's mounts in a per-container mount namespace (for non-root runs).
    #[arg(long)]
    no_mount_ns: bool,
    /// NAME=VALUE given to every container before Allocate's and the spec's env (stands for the image's
    /// env, e.g. LD_LIBRARY_PATH of the simulated GPU). Repeatable.
    #[arg(long = "container-env", value_name = "NAME=VALUE")]
    container_env: Vec<String>,
    /// The node's address in Node and pod status.
    #[arg(long, default_value = "127.0.0.1")]
    host_ip: String,
    /// Give each container a pid namespace of its own (as pods without hostPID have); needs the mount
    /// namespace.
    #[arg(long)]
    pid_ns: bool,
    /// Grace given to containers at shutdown before SIGKILL, in seconds.
    #[arg(long, default_value_t = 5)]
    shutdown_grace: u64,
}

async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig and no KUBECONFIG, ~/.kube/config or in-cluster config")?,
    };
    Ok(kube::Client::try_from(config)?)
}

fn exec(e: ExecArgs) -> anyhow::Result<()> {
    let (ns, pod) = e.pod.split_once('/').unwrap_or(("default", &e.pod));
    let record = kubelet::exec::find_record(&e.run_dir, ns, pod, e.container.as_deref())?;
    let status = kubelet::exec::command_in(&record, &e.command)?
        .status()
        .with_context(|| format!("running {:?} in {ns}/{pod}", e.command))?;
    use std::os::unix::process::ExitStatusExt;
    std::process::exit(
        status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
    );
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        // Before any runtime thread exists: pid1 forks.
        Some(Cmd::Pid1 { command }) => {
            std::process::exit(kubelet::pid1::run(&command)?);
        }
        Some(Cmd::Exec(e)) => exec(e),
        None => serve(cli.serve),
    }
}

// Two workers: twenty harnesses share a host in the burst benchmark, and a kubelet's work here is small.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn serve(a: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let (Some(node_name), Some(run_dir)) = (a.node_name, a.run_dir) else {
        anyhow::bail!(
            "--node-name and --run-dir are required to serve (or use the exec subcommand)"
        );
    };
    let container_env = a
        .container_env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--container-env {kv:?} is not NAME=VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = Config {
        node_name,
        device_plugin_dir: a.device_plugin_dir,
        pod_resources_socket: a.pod_resources_socket,
        cgroup_root: a.cgroup_root,
        run_dir,
        mount_ns: !a.no_mount_ns,
        pid_ns_helper: if a.pid_ns {
            Some(std::env::current_exe().context("locating this binary for --pid-ns")?)
        } else {
            None
        },
        container_env,
        host_ip: a.host_ip,
    };
    let client = client(a.kubeconfig.as_ref()).await?;
    let mut harness = Harness::start(cfg, client).await?;
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Err(e) = harness.restart_kubelet().await {
                    tracing::error!(error = %format!("{e:#}"), "kubelet restart failed");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    harness
        .shutdown(Duration::from_secs(a.shutdown_grace))
        .await;
    Ok(())
}
