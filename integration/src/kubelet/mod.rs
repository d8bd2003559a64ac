//! A kubelet for tests: speaks the kubelet's gRPC to device plugins (Registration, ListAndWatch,
//! GetPreferredAllocation, Allocate, PreStartContainer) and serves PodResources, keeps the Node's device
//! capacity, admits the node's pods one at a time in creation order, and starts each container as a host
//! process with exactly the environment and mounts Allocate returned, in a cgroup of the kubelet's
//! cgroupfs layout. Binary: `kubelet-harness`.
//!
//! Departures from a kubelet: images are ignored (the command must exist on the host), containers are not
//! restarted whatever the restart policy, `valueFrom` env entries are not resolved, and the mounts apply in
//! the host's root (there is no container root filesystem).
//!
//! One node, as the lab runs it (root; the cgroup root must lie on the cgroup2 mount, which is
//! `/sys/fs/cgroup/unified` on a hybrid host):
//! `kubelet-harness --node-name n1 --kubeconfig K --device-plugin-dir D/dp --pod-resources-socket D/pr.sock
//! --cgroup-root /sys/fs/cgroup/vgpu-test-1 --run-dir D/run --container-env LD_LIBRARY_PATH=<sim dir>`.
//! SIGHUP plays a kubelet restart, SIGTERM stops every pod; `kubelet-harness exec --run-dir D/run
//! default/POD -- nvidia-smi` runs a command inside a running container.

pub mod admission;
pub mod cgroup;
pub mod container;
pub mod devices;
pub mod exec;
pub mod node;
pub mod pid1;
pub mod podresources;
pub mod pods;
pub mod registration;
pub mod runner;
pub mod status;
pub mod uds;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

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
    /// The `kubelet-harness` binary: when set (and `mount_ns`), each container gets a pid namespace of its
    /// own, started through `kubelet-harness pid1`; None keeps containers in the host's pid namespace.
    pub pid_ns_helper: Option<PathBuf>,
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
        anyhow::ensure!(
            cfg.pid_ns_helper.is_none() || cfg.mount_ns,
            "a pid namespace per container needs its mount namespace (for its /proc): drop --no-mount-ns"
        );
        if let Some(root) = &cfg.cgroup_root {
            std::fs::create_dir_all(root).map_err(|e| {
                anyhow::anyhow!(
                    "creating the cgroup root {}: {e} (it must lie on a cgroup2 mount, e.g. {}, and needs root)",
                    root.display(),
                    "/sys/fs/cgroup"
                )
            })?;
        }
        // The API server may be starting alongside (the lab and the burst start everything at once).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while let Err(e) = node::ensure(&client, &cfg.node_name).await {
            if tokio::time::Instant::now() > deadline {
                return Err(
                    e.context("the API server did not answer for 30 s (check --kubeconfig)")
                );
            }
            tracing::info!(error = %format!("{e:#}"), "API server not reachable yet; retrying");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let devices = DeviceManager::new();
        let registration =
            RegistrationServerHandle::start(&cfg.device_plugin_dir, devices.clone()).await?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let pr = podresources::serve(&cfg.pod_resources_socket, devices.clone(), stop_rx)?;
        let pods = PodContext::new(client.clone(), devices.clone(), &cfg);
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
