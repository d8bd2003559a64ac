//! The device plugin: `nvidia.com/gpu` offered as `deviceSplitCount` virtual devices per card
//! (`<GPU-UUID>-<n>`), served on a unix socket in the kubelet's device-plugin directory and registered with
//! the kubelet. The kubelet forgets plugins when it restarts (it recreates its socket and empties the
//! directory), so the supervisor watches both sockets and serves and registers again by itself.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use vgpu_kubelet_api::deviceplugin::device_plugin_server::{DevicePlugin, DevicePluginServer};
use vgpu_kubelet_api::deviceplugin::registration_client::RegistrationClient;
use vgpu_kubelet_api::deviceplugin::{
    self as dp, AllocateRequest, AllocateResponse, Device, DevicePluginOptions, Empty,
    ListAndWatchResponse, NumaNode, PreStartContainerRequest, PreStartContainerResponse,
    PreferredAllocationRequest, PreferredAllocationResponse, RegisterRequest, TopologyInfo,
};

use super::{Node, PLUGIN_SOCKET, RESOURCE_NAME};
use crate::gpus::Card;

/// The virtual devices of `cards`, each card's health on each of its slots.
pub fn devices(cards: &[Card], split: u32) -> Vec<Device> {
    cards
        .iter()
        .flat_map(|c| {
            (0..split).map(move |n| Device {
                id: format!("{}-{n}", c.uuid),
                health: if c.healthy {
                    dp::HEALTHY
                } else {
                    dp::UNHEALTHY
                }
                .to_string(),
                topology: Some(TopologyInfo {
                    nodes: vec![NumaNode { id: c.numa as i64 }],
                }),
            })
        })
        .collect()
}

/// What answers the kubelet's calls. Allocate is [`super::allocate`]; the rest is the device list.
pub struct Service {
    pub node: Arc<Node>,
}

type DeviceStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for Service {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let mut rx = self.node.cards.clone();
        let split = self.node.config.device_split_count;
        let stream = async_stream(move |tx| async move {
            loop {
                let list = devices(&rx.borrow_and_update(), split);
                if tx
                    .send(Ok(ListAndWatchResponse { devices: list }))
                    .await
                    .is_err()
                {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn get_preferred_allocation(
        &self,
        _: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        Err(Status::unimplemented(
            "vgpu: GetPreferredAllocation is not offered (the scheduler places vGPUs)",
        ))
    }

    async fn allocate(
        &self,
        req: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let mut out = AllocateResponse::default();
        for c in req.into_inner().container_requests {
            out.container_responses
                .push(super::allocate::allocate_container(&self.node, &c.devices_ids).await?);
        }
        Ok(Response::new(out))
    }

    /// Called by the kubelet just before it starts a container: the answer for its devices is settled first,
    /// so its limits file is ready when its first process reads it. Never refused: a container found on
    /// another pod's devices has a revoked limits file (its shim refuses everything) and its pod is failed.
    async fn pre_start_container(
        &self,
        req: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        super::confirm::settle_ids(&self.node, &req.into_inner().devices_ids).await;
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

fn options() -> DevicePluginOptions {
    DevicePluginOptions {
        pre_start_required: true,
        get_preferred_allocation_available: false,
    }
}

/// A stream fed by a task: the task ends when the kubelet drops the stream.
fn async_stream<F, Fut>(f: F) -> DeviceStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<ListAndWatchResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Registers the plugin with the kubelet listening on `kubelet_sock`.
pub async fn register(kubelet_sock: &Path) -> anyhow::Result<()> {
    let ch = super::unix::channel(kubelet_sock).await?;
    RegistrationClient::new(ch)
        .register(RegisterRequest {
            version: dp::VERSION.to_string(),
            endpoint: PLUGIN_SOCKET.to_string(),
            resource_name: RESOURCE_NAME.to_string(),
            options: Some(options()),
        })
        .await?;
    Ok(())
}

/// Identity of a socket file: a recreated one has another inode (or change time).
fn identity(p: &Path) -> Option<(u64, u64, i64, i64)> {
    std::fs::metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

struct Served {
    stop: tokio::sync::oneshot::Sender<()>,
    socket: Option<(u64, u64, i64, i64)>,
}

fn serve_socket(node: &Arc<Node>, path: &Path) -> anyhow::Result<Served> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", path.display()))?;
    let socket = identity(path);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let svc = DevicePluginServer::new(Service { node: node.clone() });
    let shown = path.display().to_string();
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
        {
            tracing::error!("device plugin on {shown}: {e}");
        }
    });
    Ok(Served { stop, socket })
}

/// Serves the plugin and keeps it registered until `shutdown` fires: whenever the plugin's socket vanishes
/// or the kubelet's socket is recreated, the plugin serves on a fresh socket and registers again.
pub async fn supervise(
    node: Arc<Node>,
    dir: PathBuf,
    tick: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let own = dir.join(PLUGIN_SOCKET);
    let kubelet = dir.join(dp::KUBELET_SOCKET);
    let mut served: Option<Served> = None;
    // The kubelet socket this plugin is registered with; None = registration still due.
    let mut registered_with: Option<(u64, u64, i64, i64)> = None;
    loop {
        let own_now = identity(&own);
        if served
            .as_ref()
            .is_none_or(|s| s.socket != own_now || own_now.is_none())
        {
            if let Some(old) = served.take() {
                tracing::warn!(
                    "the plugin socket {} was removed: serving again",
                    own.display()
                );
                let _ = old.stop.send(());
            }
            match serve_socket(&node, &own) {
                Ok(s) => {
                    served = Some(s);
                    registered_with = None;
                }
                Err(e) => tracing::error!("{e:#}"),
            }
        }
        let kubelet_now = identity(&kubelet);
        if served.is_some() && kubelet_now.is_some() && registered_with != kubelet_now {
            match register(&kubelet).await {
                Ok(()) => {
                    tracing::info!(
                        "registered {RESOURCE_NAME} with the kubelet at {}",
                        kubelet.display()
                    );
                    registered_with = kubelet_now;
                }
                Err(e) => tracing::warn!(
                    "registering with the kubelet at {}: {e:#} (retrying)",
                    kubelet.display()
                ),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.changed() => break,
        }
    }
    if let Some(s) = served {
        let _ = s.stop.send(());
    }
    let _ = std::fs::remove_file(&own);
}
