//! The kubelet's device manager: each registered resource's devices and health, and which pod container
//! holds which device IDs (what PodResources reports).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tonic::transport::Channel;
use vgpu_kubelet_api::deviceplugin::device_plugin_client::DevicePluginClient;
use vgpu_kubelet_api::deviceplugin::{DevicePluginOptions, HEALTHY};
use vgpu_kubelet_api::podresources as pr;

/// One device as the plugin's latest ListAndWatch message gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: String,
    pub healthy: bool,
}

/// A resource a plugin registered.
#[derive(Debug)]
pub struct Resource {
    /// Bumped by each registration: a ListAndWatch stream of an older one must not write any more.
    pub generation: u64,
    pub endpoint: PathBuf,
    pub options: DevicePluginOptions,
    pub devices: Vec<Device>,
    pub client: Option<DevicePluginClient<Channel>>,
    watch_task: Option<AbortHandle>,
}

/// Devices held by one container, per resource, in the order the plugin was asked for them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerDevices {
    pub name: String,
    pub devices: BTreeMap<String, Vec<String>>,
    /// Whether PodResources `List` shows it: the kubelet lists a pod's app containers (and, with sidecars,
    /// its restartable init containers), never its ordinary init containers.
    pub listed: bool,
}

/// An admitted pod, until it ends or is deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDevices {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub containers: Vec<ContainerDevices>,
}

/// Counts for the Node's status: capacity counts every device, allocatable only the healthy ones (as the
/// kubelet reports them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceCount {
    pub capacity: usize,
    pub allocatable: usize,
}

#[derive(Default)]
struct State {
    resources: BTreeMap<String, Resource>,
    /// Admitted pods in admission order.
    pods: Vec<PodDevices>,
    registrations: u64,
    generation: u64,
}

/// Shared by the registration server, admission and PodResources.
pub struct DeviceManager {
    state: Mutex<State>,
    /// Bumped on every change of resources or health: the node status follows it.
    changed: watch::Sender<u64>,
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl DeviceManager {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not stop the harness from reporting what it holds.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Receives a new value whenever the resources or their health change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// How many `Register` calls were accepted since the start.
    pub fn registrations(&self) -> u64 {
        self.lock().registrations
    }

    /// Replaces the resource's plugin (a re-registration supersedes the old one); returns the generation its
    /// ListAndWatch stream must present.
    pub fn register(
        &self,
        resource: &str,
        endpoint: PathBuf,
        options: DevicePluginOptions,
        client: DevicePluginClient<Channel>,
    ) -> u64 {
        let mut s = self.lock();
        s.registrations += 1;
        s.generation += 1;
        let generation = s.generation;
        let devices = match s.resources.remove(resource) {
            Some(old) => {
                if let Some(t) = old.watch_task {
                    t.abort();
                }
                old.devices
            }
            None => Vec::new(),
        };
        s.resources.insert(
            resource.to_string(),
            Resource {
                generation,
                endpoint,
                options,
                devices,
                client: Some(client),
                watch_task: None,
            },
        );
        drop(s);
        self.notify();
        generation
    }

    /// Keeps the ListAndWatch task of `generation` so a later registration or a restart can stop it.
    pub fn set_watch_task(&self, resource: &str, generation: u64, task: AbortHandle) {
        let mut s = self.lock();
        match s.resources.get_mut(resource) {
            Some(r) if r.generation == generation => r.watch_task = Some(task),
            _ => task.abort(),
        }
    }

    /// A ListAndWatch message: the full device list. Ignored when a newer registration replaced the stream.
    pub fn update_devices(&self, resource: &str, generation: u64, devices: Vec<Device>) -> bool {
        let mut s = self.lock();
        let Some(r) = s.resources.get_mut(resource) else {
            return false;
        };
        if r.generation != generation {
            return false;
        }
        r.devices = devices;
        drop(s);
        self.notify();
        true
    }

    /// The plugin's stream ended: its devices stay known but none is healthy until it registers again
    /// (the kubelet's behaviour while a plugin is gone).
    pub fn disconnected(&self, resource: &str, generation: u64) {
        let mut s = self.lock();
        let Some(r) = s.resources.get_mut(resource) else {
            return;
        };
        if r.generation != generation {
            return;
        }
        r.client = None;
        r.watch_task = None;
        for d in &mut r.devices {
            d.healthy = false;
        }
        drop(s);
        self.notify();
    }

    /// A kubelet restart: plugins are forgotten, but their resources stay known with no device (capacity
    /// zero, and a pod asking for one fails admission) until they register again, and the assignments stay:
    /// what the kubelet rebuilds from its checkpoint.
    pub fn forget_plugins(&self) {
        let mut s = self.lock();
        for r in s.resources.values_mut() {
            if let Some(t) = r.watch_task.take() {
                t.abort();
            }
            r.client = None;
            r.devices.clear();
        }
        drop(s);
        self.notify();
    }

    /// Whether a plugin registered `resource` (only those are allocated through a plugin).
    pub fn is_registered(&self, resource: &str) -> bool {
        self.lock().resources.contains_key(resource)
    }

    /// The resource's devices in ListAndWatch order.
    pub fn devices(&self, resource: &str) -> Vec<Device> {
        self.lock()
            .resources
            .get(resource)
            .map(|r| r.devices.clone())
            .unwrap_or_default()
    }

    /// The plugin's client and options, while it is connected.
    pub fn plugin(
        &self,
        resource: &str,
    ) -> Option<(DevicePluginClient<Channel>, DevicePluginOptions)> {
        let s = self.lock();
        let r = s.resources.get(resource)?;
        Some((r.client.clone()?, r.options))
    }

    /// Healthy IDs of `resource` that no admitted pod holds, in list order.
    pub fn free(&self, resource: &str) -> Vec<String> {
        let s = self.lock();
        let held: BTreeSet<&str> = s
            .pods
            .iter()
            .flat_map(|p| &p.containers)
            .filter_map(|c| c.devices.get(resource))
            .flatten()
            .map(String::as_str)
            .collect();
        s.resources
            .get(resource)
            .map(|r| {
                r.devices
                    .iter()
                    .filter(|d| d.healthy && !held.contains(d.id.as_str()))
                    .map(|d| d.id.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Starts the record of a pod being admitted (it holds nothing yet).
    pub fn add_pod(&self, uid: &str, namespace: &str, name: &str) {
        let mut s = self.lock();
        if s.pods.iter().any(|p| p.uid == uid) {
            return;
        }
        s.pods.push(PodDevices {
            uid: uid.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            containers: Vec::new(),
        });
    }

    /// Records what a container of an admitted pod holds (an empty map for one without devices).
    pub fn record_container(&self, uid: &str, container: ContainerDevices) {
        let mut s = self.lock();
        if let Some(p) = s.pods.iter_mut().find(|p| p.uid == uid) {
            p.containers.retain(|c| c.name != container.name);
            p.containers.push(container);
        }
    }

    /// Releases everything the pod holds and drops it from PodResources.
    pub fn release_pod(&self, uid: &str) -> bool {
        let mut s = self.lock();
        let before = s.pods.len();
        s.pods.retain(|p| p.uid != uid);
        before != s.pods.len()
    }

    /// The pods admitted and not yet ended or deleted, with what they hold.
    pub fn pods(&self) -> Vec<PodDevices> {
        self.lock().pods.clone()
    }

    /// Per registered resource: capacity and allocatable.
    pub fn counts(&self) -> BTreeMap<String, ResourceCount> {
        self.lock()
            .resources
            .iter()
            .map(|(name, r)| {
                (
                    name.clone(),
                    ResourceCount {
                        capacity: r.devices.len(),
                        allocatable: r.devices.iter().filter(|d| d.healthy).count(),
                    },
                )
            })
            .collect()
    }

    /// PodResources v1 `List`.
    pub fn list_response(&self) -> pr::ListPodResourcesResponse {
        pr::ListPodResourcesResponse {
            pod_resources: self
                .pods()
                .into_iter()
                .map(|p| pr::PodResources {
                    name: p.name,
                    namespace: p.namespace,
                    containers: p
                        .containers
                        .into_iter()
                        .filter(|c| c.listed)
                        .map(|c| pr::ContainerResources {
                            name: c.name,
                            devices: c
                                .devices
                                .into_iter()
                                .map(|(resource_name, device_ids)| pr::ContainerDevices {
                                    resource_name,
                                    device_ids,
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// Parses a ListAndWatch device.
pub fn device_from_wire(d: &vgpu_kubelet_api::deviceplugin::Device) -> Device {
    Device {
        id: d.id.clone(),
        healthy: d.health == HEALTHY,
    }
}
