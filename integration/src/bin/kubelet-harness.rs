//! `kubelet-harness`: a kubelet for tests (see `vgpu_integration::kubelet`). SIGHUP plays a kubelet restart
//! to the device plugins; SIGTERM or SIGINT stops every pod's processes and exits.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use vgpu_integration::kubelet::{Config, Harness};

#[derive(Parser, Debug)]
#[command(
    about = "A kubelet for tests: device plugin gRPC, PodResources, pods started as host processes"
)]
struct Args {
    /// The Node this harness is.
    #[arg(long)]
    node_name: String,
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
    /// Logs and state (logs/<namespace>_<pod>_<container>.log).
    #[arg(long)]
    run_dir: PathBuf,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
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
        node_name: a.node_name,
        device_plugin_dir: a.device_plugin_dir,
        pod_resources_socket: a.pod_resources_socket,
        cgroup_root: a.cgroup_root,
        run_dir: a.run_dir,
        mount_ns: !a.no_mount_ns,
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
