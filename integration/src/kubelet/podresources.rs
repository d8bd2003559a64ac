//! The kubelet's PodResources v1 `List`: each admitted pod's containers and the device IDs recorded for them.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::oneshot;
use tonic::{Request, Response, Status};
use vgpu_kubelet_api::podresources::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use vgpu_kubelet_api::podresources::{ListPodResourcesRequest, ListPodResourcesResponse};

use super::devices::DeviceManager;
use super::uds;

struct Lister(Arc<DeviceManager>);

#[tonic::async_trait]
impl PodResourcesLister for Lister {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        Ok(Response::new(self.0.list_response()))
    }
}

/// Serves List on `socket` until `stop` fires.
pub fn serve(
    socket: &Path,
    devices: Arc<DeviceManager>,
    stop: oneshot::Receiver<()>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let incoming = uds::bind(socket)?;
    let socket = socket.to_path_buf();
    Ok(tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(PodResourcesListerServer::new(Lister(devices)))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop.await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(socket = %socket.display(), error = %e, "PodResources server failed");
        }
        let _ = std::fs::remove_file(&socket);
    }))
}
