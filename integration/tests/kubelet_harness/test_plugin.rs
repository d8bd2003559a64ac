//! A device plugin for the tests: serves DevicePlugin on its socket in the device-plugin directory,
//! registers with the kubelet, records what the kubelet asks, and registers again when `kubelet.sock` is
//! recreated (a kubelet restart).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use vgpu_integration::kubelet::uds;
use vgpu_kubelet_api::deviceplugin as dp;
use vgpu_kubelet_api::deviceplugin::device_plugin_server::{DevicePlugin, DevicePluginServer};
use vgpu_kubelet_api::deviceplugin::registration_client::RegistrationClient;

pub const RESOURCE: &str = "nvidia.com/gpu";

/// What Allocate answers.
#[derive(Clone, Default)]
pub struct Answer {
    /// Refuse every Allocate with FailedPrecondition and this message.
    pub refuse: Option<String>,
    /// Mounts returned with every answer.
    pub mounts: Vec<dp::Mount>,
    /// GetPreferredAllocation answers these IDs (and the option says it is available) when set.
    pub preferred: Option<Vec<String>>,
    /// The options ask for PreStartContainer.
    pub pre_start: bool,
    /// Allocate takes this long (to see whether the kubelet overlaps calls).
    pub delay: Option<Duration>,
}

#[derive(Default)]
pub struct Calls {
    pub list_and_watch: usize,
    /// Register calls the kubelet accepted.
    pub registered: usize,
    pub allocate: Vec<Vec<String>>,
    pub preferred: Vec<dp::ContainerPreferredAllocationRequest>,
    pub pre_start: Vec<Vec<String>>,
    /// Allocate calls in flight now, and the most seen at once.
    pub in_flight: usize,
    pub max_in_flight: usize,
}

struct Service {
    devices: watch::Receiver<Vec<dp::Device>>,
    answer: Answer,
    calls: Arc<Mutex<Calls>>,
}

#[tonic::async_trait]
impl DevicePlugin for Service {
    async fn get_device_plugin_options(
        &self,
        _: Request<dp::Empty>,
    ) -> Result<Response<dp::DevicePluginOptions>, Status> {
        Ok(Response::new(dp::DevicePluginOptions {
            pre_start_required: self.answer.pre_start,
            get_preferred_allocation_available: self.answer.preferred.is_some(),
        }))
    }

    type ListAndWatchStream =
        Pin<Box<dyn Stream<Item = Result<dp::ListAndWatchResponse, Status>> + Send + 'static>>;

    async fn list_and_watch(
        &self,
        _: Request<dp::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        self.calls.lock().unwrap().list_and_watch += 1;
        let rx = self.devices.clone();
        let s = futures::stream::unfold((rx, true), |(mut rx, first)| async move {
            if !first && rx.changed().await.is_err() {
                return None;
            }
            let devices = rx.borrow_and_update().clone();
            Some((Ok(dp::ListAndWatchResponse { devices }), (rx, false)))
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn get_preferred_allocation(
        &self,
        req: Request<dp::PreferredAllocationRequest>,
    ) -> Result<Response<dp::PreferredAllocationResponse>, Status> {
        let r = req.into_inner();
        self.calls
            .lock()
            .unwrap()
            .preferred
            .extend(r.container_requests.iter().cloned());
        Ok(Response::new(dp::PreferredAllocationResponse {
            container_responses: vec![dp::ContainerPreferredAllocationResponse {
                device_i_ds: self.answer.preferred.clone().unwrap_or_default(),
            }],
        }))
    }

    async fn allocate(
        &self,
        req: Request<dp::AllocateRequest>,
    ) -> Result<Response<dp::AllocateResponse>, Status> {
        let r = req.into_inner();
        {
            let mut c = self.calls.lock().unwrap();
            c.in_flight += 1;
            c.max_in_flight = c.max_in_flight.max(c.in_flight);
        }
        if let Some(d) = self.answer.delay {
            tokio::time::sleep(d).await;
        }
        self.calls.lock().unwrap().in_flight -= 1;
        let mut responses = Vec::new();
        for c in r.container_requests {
            self.calls
                .lock()
                .unwrap()
                .allocate
                .push(c.devices_ids.clone());
            if let Some(msg) = &self.answer.refuse {
                return Err(Status::failed_precondition(msg.clone()));
            }
            let envs: HashMap<String, String> = [
                (
                    "NVIDIA_VISIBLE_DEVICES".to_string(),
                    c.devices_ids.join(","),
                ),
                (
                    "CUDA_DEVICE_MEMORY_LIMIT_0".to_string(),
                    "4000m".to_string(),
                ),
            ]
            .into();
            responses.push(dp::ContainerAllocateResponse {
                envs,
                mounts: self.answer.mounts.clone(),
                ..Default::default()
            });
        }
        Ok(Response::new(dp::AllocateResponse {
            container_responses: responses,
        }))
    }

    async fn pre_start_container(
        &self,
        req: Request<dp::PreStartContainerRequest>,
    ) -> Result<Response<dp::PreStartContainerResponse>, Status> {
        self.calls
            .lock()
            .unwrap()
            .pre_start
            .push(req.into_inner().devices_ids);
        Ok(Response::new(dp::PreStartContainerResponse {}))
    }
}

pub struct TestPlugin {
    pub devices: watch::Sender<Vec<dp::Device>>,
    pub calls: Arc<Mutex<Calls>>,
    dir: PathBuf,
    socket_name: String,
    answer: Answer,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Tells a recreated file from the old one (a new socket may reuse the inode number).
pub fn file_identity(p: &Path) -> Option<(u64, i64, i64)> {
    std::fs::metadata(p)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

pub fn device(id: &str, healthy: bool) -> dp::Device {
    dp::Device {
        id: id.to_string(),
        health: if healthy { dp::HEALTHY } else { dp::UNHEALTHY }.to_string(),
        topology: None,
    }
}

impl TestPlugin {
    /// Serves `<dir>/test-plugin.sock` with `n` healthy devices `dev-0`..; does not register yet.
    pub fn start(dir: &Path, n: usize, answer: Answer) -> Arc<Self> {
        let devices: Vec<_> = (0..n).map(|i| device(&format!("dev-{i}"), true)).collect();
        let p = Arc::new(TestPlugin {
            devices: watch::channel(devices).0,
            calls: Arc::default(),
            dir: dir.to_path_buf(),
            socket_name: "test-plugin.sock".into(),
            answer,
            server: Mutex::new(None),
        });
        p.serve();
        p
    }

    /// Serves (again) on its socket.
    pub fn serve(&self) {
        let incoming = uds::bind(&self.dir.join(&self.socket_name)).unwrap();
        let svc = DevicePluginServer::new(Service {
            devices: self.devices.subscribe(),
            answer: self.answer.clone(),
            calls: self.calls.clone(),
        });
        let t = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        if let Some(old) = self.server.lock().unwrap().replace(t) {
            old.abort();
        }
    }

    /// Register with `version`; the kubelet's answer.
    pub async fn register_as(&self, version: &str) -> Result<(), Status> {
        let ch = uds::connect(&self.dir.join("kubelet.sock"), Duration::from_secs(5))
            .await
            .expect("kubelet.sock answers");
        RegistrationClient::new(ch)
            .register(dp::RegisterRequest {
                version: version.into(),
                endpoint: self.socket_name.clone(),
                resource_name: RESOURCE.into(),
                options: Some(dp::DevicePluginOptions {
                    pre_start_required: self.answer.pre_start,
                    get_preferred_allocation_available: self.answer.preferred.is_some(),
                }),
            })
            .await
            .map(|_| self.calls().registered += 1)
    }

    pub async fn register(&self) {
        self.register_as(dp::VERSION)
            .await
            .expect("Register accepted");
    }

    /// What a plugin does about kubelet restarts: when `kubelet.sock` is recreated, serve again if its own
    /// socket was removed, and register again.
    pub fn follow_kubelet_restarts(self: &Arc<Self>) {
        let p = self.clone();
        tokio::spawn(async move {
            let sock = p.dir.join("kubelet.sock");
            let mut ino = file_identity(&sock);
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let now = file_identity(&sock);
                if now.is_some() && now != ino {
                    ino = now;
                    if !p.dir.join(&p.socket_name).exists() {
                        p.serve();
                    }
                    let _ = p.register_as(dp::VERSION).await;
                }
            }
        });
    }

    pub fn calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().unwrap()
    }
}
