//! The Kubernetes node side of `vgpu-agent run`: the device plugin the kubelet calls, the node's inventory
//! annotations the scheduler reads, and Allocate as the root of trust for every container's limits.
//!
//! - [`config`]: HAMi's node knobs (`deviceSplitCount`, memory and core scaling) from the mounted ConfigMap.
//! - [`plugin`]: the `DevicePlugin` gRPC service on its unix socket, registration with the kubelet and
//!   re-registration when the kubelet restarts.
//! - [`registration`]: `hami.io/node-nvidia-register` and the handshake on the Node object.
//! - [`pods`]: the pods bound to this node (a reflector), and the kube calls on them.
//! - [`allocate`]: which pod an Allocate is for (sealed placements only, no lock) and its answer.
//! - [`container_dir`]: the per-container host directory Allocate mounts.
//! - [`confirm`]: the kubelet's PodResources record checked after Allocate; the limits file filled or revoked,
//!   and the container bound to its cgroup.
//! - [`bind`]: what the ledger is told about a confirmed container.
//! - [`recover`]: a restarted agent confirms again what it had answered; directories of gone pods removed.
//! - [`windows`]: where each container's compute windows lie on its cards (written into its limits file).

pub mod allocate;
pub mod bind;
pub mod config;
pub mod confirm;
pub mod container_dir;
pub mod plugin;
pub mod pods;
pub mod recover;
pub mod registration;
pub mod unix;
pub mod windows;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::Store;
use tokio::sync::watch;

use crate::gpus::Card;

/// The resource the plugin offers the kubelet (HAMi's name, so pods written for it work unchanged).
pub const RESOURCE_NAME: &str = vgpu_contract::annotations::RESOURCE_GPU;
/// The plugin's socket, in the device-plugin directory.
pub const PLUGIN_SOCKET: &str = "vgpu-nvidia.sock";
/// Field manager of every write the agent makes to the API.
pub const FIELD_MANAGER: &str = "vgpu-agent";

#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// This node's name in the API (the DaemonSet sets NODE_NAME from spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The kubelet's device-plugin directory (its kubelet.sock, and this plugin's socket).
    #[arg(long, default_value = "/var/lib/kubelet/device-plugins")]
    pub device_plugin_dir: PathBuf,
    /// The kubelet's PodResources socket: Allocate is confirmed against its record.
    #[arg(long, default_value = vgpu_kubelet_api::podresources::DEFAULT_SOCKET)]
    pub pod_resources_socket: PathBuf,
    /// Node knobs (YAML: deviceSplitCount, deviceMemoryScaling, deviceCoreScaling; see docs/agent.md).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Host root of the per-container directories Allocate mounts.
    #[arg(long, default_value = "/usr/local/vgpu/containers")]
    pub containers_dir: PathBuf,
    /// Host path of libvgpu.so, mounted read-only into every container.
    #[arg(long, default_value = "/usr/local/vgpu/libvgpu.so")]
    pub shim_lib: PathBuf,
    /// Host directory of the per-card files every slice on the node shares.
    #[arg(long, default_value = vgpu_contract::env::DEFAULT_CARD_DIR)]
    pub card_dir: PathBuf,
    /// The HMAC key the scheduler seals placements with (a Secret mounted into both). Required off
    /// --standalone: without it no placement can be trusted.
    #[arg(long)]
    pub seal_key_file: Option<PathBuf>,
}

/// Where Allocate puts and finds things on the host.
#[derive(Debug, Clone)]
pub struct Paths {
    pub containers_dir: PathBuf,
    pub shim_lib: PathBuf,
    pub card_dir: PathBuf,
    pub cgroup_root: PathBuf,
}

/// Everything the node side shares between the plugin, Allocate and its confirmations.
pub struct Node {
    pub name: String,
    pub config: config::NodeConfig,
    pub paths: Paths,
    pub seal_key: Vec<u8>,
    pub client: kube::Client,
    pub pods: Store<Pod>,
    pub cards: watch::Receiver<Vec<Card>>,
    pub binder: Arc<dyn bind::ContainerBinder>,
    pub pod_resources: PathBuf,
    pub timing: Timing,
    /// Where each container's compute windows lie on its cards.
    pub windows: windows::WindowBook,
    /// (pod UID, container index) answered by this agent, with how many answers claim it (a guess not yet
    /// settled, or a confirmed answer): a container must not be served twice, and two wrong guesses can each
    /// claim the other's pod for a moment.
    served: Mutex<HashMap<(String, usize), u32>>,
    /// The containers whose answer the kubelet's record confirmed.
    confirmed: Mutex<HashSet<(String, usize)>>,
    /// Answers the kubelet has not yet recorded, by directory: each is resolved once, by whichever of its
    /// watcher or the next Allocate sees the record first.
    pending: Mutex<HashMap<PathBuf, confirm::Pending>>,
    /// Answers taken out of `pending` and being resolved: their IDs, and a receiver that sees the resolution
    /// end (its sender is dropped). PreStartContainer waits for these too, whoever took them.
    settling: Mutex<Vec<(Vec<String>, tokio::sync::watch::Receiver<()>)>>,
    /// Serialises this agent's own Allocate handling (the kubelet calls one at a time anyway); nothing on
    /// the API side is locked.
    allocating: tokio::sync::Mutex<()>,
}

/// How long the node side waits for things it does not control.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// For the kubelet's PodResources record after Allocate answered.
    pub confirm_timeout: Duration,
    pub confirm_poll: Duration,
    /// For the runtime's container ID after the record confirmed the container.
    pub container_id_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            confirm_timeout: Duration::from_secs(120),
            confirm_poll: Duration::from_millis(200),
            container_id_timeout: Duration::from_secs(600),
        }
    }
}

pub struct NodeParts {
    pub name: String,
    pub config: config::NodeConfig,
    pub paths: Paths,
    pub seal_key: Vec<u8>,
    pub client: kube::Client,
    pub cards: watch::Receiver<Vec<Card>>,
    pub binder: Arc<dyn bind::ContainerBinder>,
    pub pod_resources: PathBuf,
    pub timing: Timing,
}

impl Node {
    /// Starts the pod reflector and returns the node once its first list is in.
    pub async fn start(p: NodeParts) -> Result<Arc<Self>> {
        let pods = pods::watch_node_pods(p.client.clone(), &p.name);
        tokio::time::timeout(Duration::from_secs(60), pods.wait_until_ready())
            .await
            .context("the API server did not list this node's pods within 60 s")?
            .context("the pod reflector stopped")?;
        Ok(Arc::new(Self {
            name: p.name,
            config: p.config,
            paths: p.paths,
            seal_key: p.seal_key,
            client: p.client,
            pods,
            cards: p.cards,
            binder: p.binder,
            pod_resources: p.pod_resources,
            timing: p.timing,
            windows: windows::WindowBook::new(p.config.pacing_period_ms),
            served: Mutex::new(HashMap::new()),
            confirmed: Mutex::new(HashSet::new()),
            pending: Mutex::new(HashMap::new()),
            settling: Mutex::new(Vec::new()),
            allocating: tokio::sync::Mutex::new(()),
        }))
    }
}

/// Reads the seal key, refusing an empty or missing one with what to do.
pub fn read_seal_key(path: Option<&std::path::Path>) -> Result<Vec<u8>> {
    let path = path.context(
        "--seal-key-file is required in Kubernetes mode: mount the scheduler's placement-seal Secret \
         and pass its path (or run with --standalone)",
    )?;
    let key =
        std::fs::read(path).with_context(|| format!("reading the seal key {}", path.display()))?;
    let trimmed = vgpu_contract::placement_seal::key_from_file(&key);
    anyhow::ensure!(
        !trimmed.is_empty(),
        "the seal key {} is empty: the scheduler's Secret must hold the key",
        path.display()
    );
    Ok(trimmed)
}

/// The node side's tasks; dropping or sending `true` on `shutdown` stops the plugin and the registration.
pub struct Running {
    pub node: Arc<Node>,
    pub shutdown: watch::Sender<bool>,
    pub plugin: tokio::task::JoinHandle<()>,
}

/// Starts the node side from the command line: NVML cards, the API client, then [`start_with`].
pub async fn start(
    args: &NodeArgs,
    cgroup_root: PathBuf,
    binder: Arc<dyn bind::ContainerBinder>,
) -> Result<Running> {
    let name = args
        .node_name
        .clone()
        .filter(|n| !n.is_empty())
        .context("the node's name is unknown: pass --node-name or set NODE_NAME (the DaemonSet sets it from spec.nodeName)")?;
    let config = config::NodeConfig::load(args.config.as_deref())?;
    let seal_key = read_seal_key(args.seal_key_file.as_deref())?;
    let client = kube::Client::try_default().await.context(
        "no Kubernetes API: set KUBECONFIG or run in a pod with a service account (or pass --standalone)",
    )?;
    let (tx, cards) = watch::channel(vec![]);
    std::thread::spawn(move || crate::gpus::watch_cards(tx, Duration::from_secs(5)));
    start_with(
        NodeParts {
            name,
            config,
            paths: Paths {
                containers_dir: args.containers_dir.clone(),
                shim_lib: args.shim_lib.clone(),
                card_dir: args.card_dir.clone(),
                cgroup_root,
            },
            seal_key,
            client,
            cards,
            binder,
            pod_resources: args.pod_resources_socket.clone(),
            timing: Timing::default(),
        },
        args.device_plugin_dir.clone(),
        Duration::from_millis(500),
    )
    .await
}

/// Starts the node side from its parts: the node's annotations written (over any stale ones) before
/// anything else, the pod reflector, then the device plugin, checked every `tick`.
pub async fn start_with(
    parts: NodeParts,
    device_plugin_dir: PathBuf,
    tick: Duration,
) -> Result<Running> {
    let devices = registration::inventory(&parts.cards.borrow(), &parts.config);
    registration::publish(&parts.client, &parts.name, &devices)
        .await
        .with_context(|| {
            format!(
                "writing {} on node {}: does the node exist, and may the agent's service account patch nodes?",
                vgpu_contract::annotations::NODE_REGISTER,
                parts.name
            )
        })?;
    let (shutdown, stop) = watch::channel(false);
    tokio::spawn(registration::run(
        parts.client.clone(),
        parts.name.clone(),
        parts.config,
        parts.cards.clone(),
        registration::PERIOD,
        stop.clone(),
    ));
    let node = Node::start(parts).await?;
    recover::resume(&node);
    tokio::spawn(recover::sweep_loop(node.clone()));
    std::fs::create_dir_all(&device_plugin_dir)
        .with_context(|| format!("creating {}", device_plugin_dir.display()))?;
    let plugin = tokio::spawn(plugin::supervise(
        node.clone(),
        device_plugin_dir,
        tick,
        stop,
    ));
    Ok(Running {
        node,
        shutdown,
        plugin,
    })
}
