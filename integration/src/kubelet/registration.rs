//! The kubelet's Registration server on `<device-plugin-dir>/kubelet.sock`, and the client side of each
//! registered plugin: GetDevicePluginOptions, then a ListAndWatch stream that keeps the device list.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};
use vgpu_kubelet_api::deviceplugin::device_plugin_client::DevicePluginClient;
use vgpu_kubelet_api::deviceplugin::registration_server::{Registration, RegistrationServer};
use vgpu_kubelet_api::deviceplugin::{Empty, RegisterRequest, KUBELET_SOCKET, VERSION};

use super::devices::{device_from_wire, DeviceManager};
use super::uds;

/// The kubelet dials a registering plugin with this timeout.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// The kubelet's checkpoint file in the device-plugin directory, the one thing a restart leaves there.
const CHECKPOINT: &str = "kubelet_internal_checkpoint";

struct Service {
    dir: PathBuf,
    devices: Arc<DeviceManager>,
}

#[tonic::async_trait]
impl Registration for Service {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        if r.version != VERSION {
            return Err(Status::invalid_argument(format!(
                "requested API version {:?} is not supported by kubelet. Supported versions are [{VERSION:?}]",
                r.version
            )));
        }
        if !valid_extended_resource_name(&r.resource_name) {
            return Err(Status::invalid_argument(format!(
                "invalid name of device plugin socket: {:?} is not an extended resource name (domain/name)",
                r.resource_name
            )));
        }
        let endpoint = self.dir.join(&r.endpoint);
        connect_plugin(&self.devices, &r.resource_name, &endpoint)
            .await
            .map_err(|e| {
                tracing::warn!(resource = %r.resource_name, error = %format!("{e:#}"), "registration failed");
                Status::unavailable(format!("{e:#}"))
            })?;
        Ok(Response::new(Empty {}))
    }
}

/// `domain/name`, the domain not `kubernetes.io` (what the kubelet accepts for a plugin resource).
fn valid_extended_resource_name(name: &str) -> bool {
    match name.split_once('/') {
        Some((domain, rest)) => {
            !domain.is_empty()
                && !rest.is_empty()
                && !rest.contains('/')
                && domain.contains('.')
                && !domain.ends_with("kubernetes.io")
        }
        None => false,
    }
}

/// Dials the plugin, asks its options and starts following its ListAndWatch stream.
async fn connect_plugin(
    devices: &Arc<DeviceManager>,
    resource: &str,
    endpoint: &Path,
) -> anyhow::Result<()> {
    let channel = uds::connect(endpoint, DIAL_TIMEOUT).await?;
    let mut client = DevicePluginClient::new(channel);
    let options = client
        .get_device_plugin_options(Empty {})
        .await
        .map_err(|s| anyhow::anyhow!("GetDevicePluginOptions: {}", uds::go_error(&s)))?
        .into_inner();
    let generation = devices.register(resource, endpoint.to_path_buf(), options, client.clone());
    tracing::info!(resource, endpoint = %endpoint.display(), ?options, "device plugin registered");
    // As the kubelet, ListAndWatch runs after Register has answered: a plugin may wait for that answer
    // before it sends its first list.
    let task = tokio::spawn(follow(
        devices.clone(),
        resource.to_string(),
        generation,
        client,
    ));
    devices.set_watch_task(resource, generation, task.abort_handle());
    Ok(())
}

async fn follow(
    devices: Arc<DeviceManager>,
    resource: String,
    generation: u64,
    mut client: DevicePluginClient<tonic::transport::Channel>,
) {
    let mut stream = match client.list_and_watch(Empty {}).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            tracing::warn!(%resource, error = %uds::go_error(&s), "ListAndWatch refused: devices unhealthy until the plugin registers again");
            devices.disconnected(&resource, generation);
            return;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(msg)) => {
                let list: Vec<_> = msg.devices.iter().map(device_from_wire).collect();
                tracing::info!(
                    %resource,
                    devices = list.len(),
                    healthy = list.iter().filter(|d| d.healthy).count(),
                    "ListAndWatch update"
                );
                if !devices.update_devices(&resource, generation, list) {
                    return;
                }
            }
            Ok(None) => {
                tracing::warn!(%resource, "ListAndWatch stream ended: devices unhealthy until the plugin registers again");
                break;
            }
            Err(s) => {
                tracing::warn!(%resource, error = %uds::go_error(&s), "ListAndWatch stream failed: devices unhealthy until the plugin registers again");
                break;
            }
        }
    }
    devices.disconnected(&resource, generation);
}

/// The Registration server; `restart` plays a kubelet restart.
pub struct RegistrationServerHandle {
    dir: PathBuf,
    devices: Arc<DeviceManager>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RegistrationServerHandle {
    /// Serves `<dir>/kubelet.sock`.
    pub async fn start(dir: &Path, devices: Arc<DeviceManager>) -> anyhow::Result<Self> {
        let mut h = Self {
            dir: dir.to_path_buf(),
            devices,
            stop: None,
            task: None,
        };
        h.serve()?;
        Ok(h)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join(KUBELET_SOCKET)
    }

    fn serve(&mut self) -> anyhow::Result<()> {
        let incoming = uds::bind(&self.socket())?;
        let (tx, rx) = oneshot::channel::<()>();
        let svc = RegistrationServer::new(Service {
            dir: self.dir.clone(),
            devices: self.devices.clone(),
        });
        let socket = self.socket();
        let task = tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(socket = %socket.display(), error = %e, "registration server failed");
            }
        });
        self.stop = Some(tx);
        self.task = Some(task);
        tracing::info!(socket = %self.socket().display(), "registration server listening");
        Ok(())
    }

    async fn stop_serving(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            // A plugin holding a connection open must not keep the old server alive.
            if tokio::time::timeout(Duration::from_secs(2), &mut Box::pin(t))
                .await
                .is_err()
            {
                tracing::warn!("old registration server still draining; dropped");
            }
        }
    }

    /// A kubelet restart as plugins see it: the registration server goes away, every socket in the
    /// directory is removed (the kubelet's start-up cleanup, which plugins watch for), plugins are forgotten,
    /// and a new `kubelet.sock` appears. Assignments survive, as the kubelet's checkpoint keeps them.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        tracing::info!("simulating a kubelet restart");
        self.stop_serving().await;
        self.devices.forget_plugins();
        remove_sockets(&self.dir)?;
        self.serve()
    }

    pub async fn shutdown(mut self) {
        self.stop_serving().await;
        let _ = std::fs::remove_file(self.socket());
    }
}

/// Removes the sockets in `dir`, leaving the checkpoint and anything that is not a socket.
fn remove_sockets(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        if e.file_name() == CHECKPOINT {
            continue;
        }
        if e.file_type()?.is_socket() {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names() {
        assert!(valid_extended_resource_name("nvidia.com/gpu"));
        assert!(!valid_extended_resource_name("gpu"));
        assert!(!valid_extended_resource_name("kubernetes.io/gpu"));
        assert!(!valid_extended_resource_name("nvidia.com/a/b"));
    }
}
