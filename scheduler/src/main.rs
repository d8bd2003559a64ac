use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use vgpu_scheduler::placement::policy::{GpuPolicy, Policy};
use vgpu_scheduler::placement::request::DefaultMemory;
use vgpu_scheduler::placement::Config;

#[derive(Parser)]
#[command(
    name = "vgpu-scheduler",
    version,
    about = "Places vGPU pods on nodes and GPUs (HAMi-compatible extender and webhook)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Place the pending pods of a Kubernetes List (YAML or JSON) in order and print where each goes.
    Simulate {
        /// The file, e.g. from `kubectl get nodes,pods -A -o yaml`; `-` reads standard input.
        file: PathBuf,
        /// Print a JSON array of {pod, node, devices, reason, score}.
        #[arg(long)]
        json: bool,
        /// Stop at the first object that cannot be read, instead of skipping it with a warning
        /// as `serve` does.
        #[arg(long)]
        strict: bool,
        #[command(flatten)]
        placement: PlacementArgs,
    },
    /// Run the extender (filter, bind) and the admission webhook against the cluster.
    Serve(Box<ServeArgs>),
}

#[derive(Args)]
struct ServeArgs {
    /// Where kube-scheduler reaches the extender (plain HTTP). Loopback by default: kube-scheduler
    /// runs in the same pod, and nothing else should be able to ask for binds.
    #[arg(long, default_value = "127.0.0.1:8888")]
    extender_listen: std::net::SocketAddr,
    /// Where Prometheus scrapes the allocation metrics (HAMi's names), plain HTTP.
    #[arg(long, default_value = "0.0.0.0:9395")]
    metrics_listen: std::net::SocketAddr,
    /// Where the API server reaches the admission webhook (HTTPS).
    #[arg(long, default_value = "0.0.0.0:8443")]
    webhook_listen: std::net::SocketAddr,
    /// PEM certificate chain for the webhook; without it and --tls-key the webhook is off.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The schedulerName the webhook gives vGPU pods (the KubeSchedulerConfiguration profile).
    #[arg(long, default_value = "vgpu-scheduler")]
    scheduler_name: String,
    /// The username (as the API server authenticates it) of this extender's service account: the
    /// webhook lets it alone write hami.io/* and vgpu.io/* pod metadata, with --agent-user.
    #[arg(long, default_value = vgpu_scheduler::webhook::Writers::DEFAULT_SCHEDULER, value_parser = parse_username)]
    scheduler_user: String,
    /// The username of the node agents' service account (they record Allocate on the pod).
    #[arg(long, default_value = vgpu_scheduler::webhook::Writers::DEFAULT_AGENT, value_parser = parse_username)]
    agent_user: String,
    /// The placement-seal key (a Secret shared with the node agents): bind seals each placement
    /// with it and the agent's Allocate serves only sealed ones. The key is the file's bytes as they are.
    #[arg(long)]
    seal_key_file: PathBuf,
    /// Seconds a filter's reservation waits for its bind before it is given back.
    #[arg(long, default_value_t = 120)]
    reservation_ttl: u64,
    #[command(flatten)]
    placement: PlacementArgs,
}

#[derive(Args, Clone)]
struct PlacementArgs {
    /// Node policy when a pod sets no hami.io/node-scheduler-policy.
    #[arg(long, default_value = "binpack", value_parser = parse_policy)]
    node_policy: Policy,
    /// GPU policy when a pod sets no hami.io/gpu-scheduler-policy: binpack, spread, mutex,
    /// topology-aware, numa, or a comma chain such as binpack,numa.
    #[arg(long, default_value = "spread", value_parser = parse_gpu_policy)]
    gpu_policy: GpuPolicy,
    /// Memory per vGPU when a container sets neither gpumem nor gpumem-percentage: MiB (`2048`)
    /// or a percentage of the card (`100%`, HAMi's default).
    #[arg(long, default_value = "100%", value_parser = parse_default_memory)]
    default_mem: DefaultMemory,
    /// Cores (percent of a card) of a vGPU whose container sets no gpucores and asks for less than
    /// a whole card (HAMi's scheduler.defaultCores); a whole-card request still gets 100.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
    default_cores: u32,
}

impl PlacementArgs {
    fn config(&self) -> Config {
        Config {
            default_memory: self.default_mem,
            default_cores: self.default_cores,
            node_policy: self.node_policy,
            gpu_policy: self.gpu_policy,
        }
    }
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    s.parse()
        .map_err(|e: vgpu_scheduler::placement::policy::UnknownPolicy| e.to_string())
}

fn parse_username(s: &str) -> Result<String, String> {
    if s.trim().is_empty() || s.trim() != s {
        return Err(format!(
            "{s:?} is not a username: give it as the API server names it, e.g. system:serviceaccount:vgpu-system:vgpu-scheduler"
        ));
    }
    Ok(s.to_string())
}

fn parse_gpu_policy(s: &str) -> Result<GpuPolicy, String> {
    s.parse()
        .map_err(|e: vgpu_scheduler::placement::policy::UnknownPolicy| e.to_string())
}

fn parse_default_memory(s: &str) -> Result<DefaultMemory, String> {
    let bad = || format!("{s:?} is neither MiB (2048) nor a percentage of the card (1% to 100%)");
    match s.strip_suffix('%') {
        Some(p) => match p.trim().parse::<u32>() {
            Ok(p) if (1..=100).contains(&p) => Ok(DefaultMemory::Percent(p)),
            _ => Err(bad()),
        },
        None => match s.trim().parse::<u64>() {
            Ok(m) if m > 0 => Ok(DefaultMemory::MiB(m)),
            _ => Err(bad()),
        },
    }
}

/// Shortest key accepted: an HMAC-SHA256 key much shorter than the hash adds nothing but guessability.
const MIN_SEAL_KEY_BYTES: usize = 16;

fn read_seal_key(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let key = std::fs::read(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the placement-seal key {}: {e}; mount the seal Secret there or pass --seal-key-file",
            path.display()
        )
    })?;
    // Read as the agents read it (contract::placement_seal::key_from_file), so both sides MAC with one key.
    let key = vgpu_contract::placement_seal::key_from_file(&key);
    if key.len() < MIN_SEAL_KEY_BYTES {
        anyhow::bail!(
            "the placement-seal key {} has {} bytes; it needs at least {MIN_SEAL_KEY_BYTES} (e.g. `head -c 32 /dev/urandom`)",
            path.display(),
            key.len()
        );
    }
    Ok(key)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use std::sync::Arc;
    use vgpu_scheduler::extender::{self, Extender};
    use vgpu_scheduler::kubeapi::KubeApi;
    use vgpu_scheduler::watch::{self, Readiness};
    use vgpu_scheduler::webhook::server::{self as webhook, WebhookState};

    let seal_key = read_seal_key(&args.seal_key_file)?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the API server: {e}"))?;
    let api = KubeApi {
        client: client.clone(),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    extender::spawn_event_writer(api.clone(), rx);
    let ready = Arc::new(Readiness::default());
    let mut ext = Extender::new(args.placement.config(), api, tx)
        .with_readiness(ready.clone())
        .with_seal_key(seal_key);
    ext.reservation_ttl = std::time::Duration::from_secs(args.reservation_ttl);
    let ext = Arc::new(ext);
    let _watchers = watch::spawn(client, ext.clone(), ready);

    let ext_listener = tokio::net::TcpListener::bind(args.extender_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.extender_listen))?;
    tracing::info!(addr = %args.extender_listen, "extender listening");
    // No Nagle delay on small answers (kube-scheduler's Go client sets TCP_NODELAY on its side too).
    let ext_listener = axum::serve::ListenerExt::tap_io(ext_listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let extender_srv = axum::serve(ext_listener, extender::http::router(ext.clone()));
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.metrics_listen))?;
    let metrics_app = extender::http::metrics_router(ext.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_listener, metrics_app).await {
            tracing::error!("metrics server stopped: {e}");
        }
    });

    match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = vgpu_scheduler::webhook::tls::server_config(&cert, &key)?;
            let st = Arc::new(WebhookState {
                scheduler_name: args.scheduler_name,
                writers: vgpu_scheduler::webhook::Writers {
                    scheduler: args.scheduler_user,
                    agent: args.agent_user,
                },
                limits: Box::new({
                    let ext = ext.clone();
                    move || ext.cluster_limits()
                }),
                ready: Box::new(move || ext.is_ready()),
            });
            let l = tokio::net::TcpListener::bind(args.webhook_listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.webhook_listen))?;
            tracing::info!(addr = %args.webhook_listen, "webhook listening (TLS)");
            tokio::select! {
                r = extender_srv => r?,
                r = webhook::serve_tls(l, tls, webhook::router(st)) => r?,
            }
        }
        _ => {
            tracing::warn!("no --tls-cert/--tls-key: the admission webhook is off");
            extender_srv.await?;
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VGPU_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Simulate {
            file,
            json,
            strict,
            placement,
        } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
            };
            let mut warnings = vgpu_scheduler::simulate::Warnings {
                strict,
                ..Default::default()
            };
            let out =
                vgpu_scheduler::simulate::run(&text, &placement.config(), json, &mut warnings)
                    .map_err(|e| anyhow::anyhow!("{}: {e:#}", file.display()))?;
            for w in &warnings.list {
                tracing::warn!("{}: {w}", file.display());
            }
            print!("{out}");
        }
        Command::Serve(args) => tokio::runtime::Runtime::new()?.block_on(serve(*args))?,
    }
    Ok(())
}
