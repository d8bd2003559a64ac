//! The kubelet's gRPC APIs: the agent serves `DevicePlugin` and calls `Registration` and `PodResourcesLister`;
//! the kubelet harness in `integration/` serves the other side.

/// Device plugin API v1beta1 (`/var/lib/kubelet/device-plugins/kubelet.sock` and the plugin's own socket).
pub mod deviceplugin {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("v1beta1");

    /// The version string the kubelet accepts at registration.
    pub const VERSION: &str = "v1beta1";
    /// The kubelet's registration socket, relative to the device-plugin directory.
    pub const KUBELET_SOCKET: &str = "kubelet.sock";
    pub const HEALTHY: &str = "Healthy";
    pub const UNHEALTHY: &str = "Unhealthy";
}

/// PodResources API v1 (`/var/lib/kubelet/pod-resources/kubelet.sock`).
pub mod podresources {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("v1");

    pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
}
