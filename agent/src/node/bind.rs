//! What the ledger is told about a container once the kubelet confirmed it: its cgroup (from what the kubelet
//! and the runtime report) and the limits it holds. The ledger (`ledger/bindings.rs`, being added separately)
//! implements [`ContainerBinder`]; until then `run.rs` logs the binding.

use std::path::PathBuf;

/// The pod and container a binding is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub container: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The container's cgroup path, relative to the cgroup2 mount (`/kubepods.slice/...`).
    pub cgroup: String,
    /// Host path of the container's shared-cache file.
    pub cache_path: PathBuf,
    /// (GPU UUID, bytes) per device, in CUDA ordinal order.
    pub limits: Vec<(String, u64)>,
    /// Percent of the card; 0 = no cap.
    pub sm_limit: u32,
    /// `default`, `force` or `disable`.
    pub policy: String,
    /// Who vouched for the cgroup: `kubelet` (PodResources and the pod's container status).
    pub source: &'static str,
    pub pod: PodRef,
}

pub trait ContainerBinder: Send + Sync {
    fn bind(&self, binding: Binding);
}
