//! A kubelet for tests: speaks the kubelet's gRPC to device plugins (Registration, ListAndWatch,
//! GetPreferredAllocation, Allocate, PreStartContainer) and serves PodResources, keeps the Node's device
//! capacity, admits the node's pods one at a time in creation order, and starts each container as a host
//! process with exactly the environment and mounts Allocate returned, in a cgroup of the kubelet's
//! cgroupfs layout. Binary: `kubelet-harness`.
//!
//! Departures from a kubelet: images are ignored (the command must exist on the host), containers are not
//! restarted whatever the restart policy, `valueFrom` env entries are not resolved, and the mounts apply in
//! the host's root (there is no container root filesystem).

pub mod admission;
pub mod cgroup;
pub mod container;
pub mod devices;
pub mod node;
pub mod podresources;
pub mod pods;
pub mod registration;
pub mod status;
pub mod uds;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use cgroup::CgroupRoot;
use devices::DeviceManager;
use pods::PodContext;
use registration::RegistrationServerHandle;

/// How the harness is set up (the binary's flags).
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    /// `kubelet.sock` is served here; plugins put their sockets here too.
    pub device_plugin_dir: PathBuf,
    pub pod_resources_socket: PathBuf,
    /// cgroup2 directory under which `kubepods/besteffort/pod<uid>/<id>` go; None leaves containers in the
    /// harness's cgroup.
    pub cgroup_root: Option<PathBuf>,
    /// Logs (`logs/<ns>_<pod>_<container>.log`).
    pub run_dir: PathBuf,
    /// Apply Allocate's mounts in a mount namespace per container (needs root).
    pub mount_ns: bool,
    /// Stands for the image's environment, given before Allocate's and the spec's.
    pub container_env: Vec<(String, String)>,
    /// The node's address in Node and pod status.
    pub host_ip: String,
}

/// A running harness.
pub struct Harness {
    pub devices: Arc<DeviceManager>,
    pub pods: Arc<PodContext>,
    registration: RegistrationServerHandle,
    podresources_stop: Option<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Harness {
    /// Creates the Node if absent, then serves the Registration and PodResources sockets and watches pods.
    pub async fn start(cfg: Config, client: kube::Client) -> anyhow::Result<Self> {
        std::fs::create_dir_all(cfg.run_dir.join("logs"))?;
        if let Some(root) = &cfg.cgroup_root {
            std::fs::create_dir_all(root).map_err(|e| {
                anyhow::anyhow!(
                    "creating the cgroup root {}: {e} (it must lie on a cgroup2 mount, e.g. {}, and needs root)",
                    root.display(),
                    "/sys/fs/cgroup"
                )
            })?;
        }
        node::ensure(&client, &cfg.node_name).await?;
        let devices = DeviceManager::new();
        let registration =
            RegistrationServerHandle::start(&cfg.device_plugin_dir, devices.clone()).await?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let pr = podresources::serve(&cfg.pod_resources_socket, devices.clone(), stop_rx)?;
        let pods = PodContext::new(
            client.clone(),
            devices.clone(),
            cfg.node_name.clone(),
            cfg.cgroup_root.clone().map(CgroupRoot),
            cfg.run_dir.clone(),
            cfg.mount_ns,
            cfg.container_env.clone(),
            cfg.host_ip.clone(),
        );
        let tasks = vec![
            pr,
            tokio::spawn(node::follow(
                client.clone(),
                cfg.node_name.clone(),
                devices.clone(),
                cfg.host_ip.clone(),
            )),
            tokio::spawn(pods::watch_pods(pods.clone())),
        ];
        Ok(Self {
            devices,
            pods,
            registration,
            podresources_stop: Some(stop_tx),
            tasks,
        })
    }

    /// Plays a kubelet restart to the plugins (see [`RegistrationServerHandle::restart`]).
    pub async fn restart_kubelet(&mut self) -> anyhow::Result<()> {
        self.registration.restart().await
    }

    /// Stops every pod (SIGTERM, SIGKILL after `grace`), removes their cgroups and the sockets.
    pub async fn shutdown(mut self, grace: Duration) {
        // Stop admitting first, so no pod starts while the others are torn down.
        for t in &self.tasks[2..] {
            t.abort();
        }
        self.pods.stop_all(grace).await;
        if let Some(tx) = self.podresources_stop.take() {
            let _ = tx.send(());
        }
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        self.registration.shutdown().await;
    }
}
