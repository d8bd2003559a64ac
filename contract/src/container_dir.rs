//! The per-container directory the agent owns on the host and Allocate mounts into the container.
//!
//! Host side: `<containers root>/<podUID>_<container>/` (HAMi's layout), created by the agent at Allocate,
//! owned by root, never writable through the container except the cache file. Container side, each entry is
//! its own bind mount, so a tenant can neither unlink nor replace any of them (a mount point is busy):
//!
//! | container path | host file | mode |
//! |---|---|---|
//! | `/usr/local/vgpu/limits` | `<dir>/limits` | read-only |
//! | `/usr/local/vgpu/libvgpu.so` | the agent's copy of the shim | read-only |
//! | `/etc/ld.so.preload` | `<dir>/ld.so.preload` | read-only |
//! | `/usr/local/vgpu/vgpu.cache` | `<dir>/vgpu.cache` | read-write |
//! | `/var/run/vgpu/cards` | the node's card directory | read-write (shared by every slice: hostile input) |
//!
//! **The limits file is the root of trust.** Allocate creates it *empty* (a bind mount needs the file to exist
//! when the container is created) and fills it in place (same inode, so the read-only bind sees it) only once
//! the kubelet's own record (PodResources) confirms which pod and container hold the devices. Its lines are the
//! environment's `NAME=value` keys ([`crate::env`]) plus [`LIMITS_STATE`]. The shim reads it as follows:
//! - file absent: not under Kubernetes; the environment is the contract (HAMi's behaviour).
//! - empty, or no [`LIMITS_STATE`] line yet: pending; wait up to [`PENDING_WAIT_MS`], then refuse every
//!   allocation with a clear message (fail closed).
//! - `VGPU_LIMITS_STATE=ready`: the values are the ceiling; the environment may only lower them.
//! - `VGPU_LIMITS_STATE=revoked`: the container is not on its own devices (or its pod was refused): refuse
//!   every allocation and launch, and log the `VGPU_LIMITS_REASON` line.

/// Key of the state line in the limits file: [`STATE_READY`] or [`STATE_REVOKED`].
pub const LIMITS_STATE: &str = "VGPU_LIMITS_STATE";
/// Key of the reason line written with [`STATE_REVOKED`].
pub const LIMITS_REASON: &str = "VGPU_LIMITS_REASON";
pub const STATE_READY: &str = "ready";
pub const STATE_REVOKED: &str = "revoked";
/// How long a shim waits for a pending limits file before it refuses everything.
pub const PENDING_WAIT_MS: u64 = 30_000;

/// Names inside the host directory.
pub const LIMITS_NAME: &str = "limits";
pub const PRELOAD_NAME: &str = "ld.so.preload";
pub const CACHE_NAME: &str = "vgpu.cache";

/// Paths inside the container.
pub const CONTAINER_LIMITS: &str = "/usr/local/vgpu/limits";
pub const CONTAINER_SHIM: &str = "/usr/local/vgpu/libvgpu.so";
pub const CONTAINER_PRELOAD: &str = "/etc/ld.so.preload";
pub const CONTAINER_CACHE: &str = "/usr/local/vgpu/vgpu.cache";
pub const CONTAINER_CARD_DIR: &str = "/var/run/vgpu/cards";

/// Host directory name of a container: `<podUID>_<container>`. Both parts come from the API server (the pod's
/// UID) and the pod spec (a DNS label), so neither holds a `/`; anything else is refused.
pub fn host_dir_name(pod_uid: &str, container: &str) -> Option<String> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && s != "."
            && s != ".."
    };
    (ok(pod_uid) && ok(container)).then(|| format!("{pod_uid}_{container}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_names_cannot_escape_the_root() {
        assert_eq!(
            host_dir_name("8f1c-22", "app").as_deref(),
            Some("8f1c-22_app")
        );
        assert_eq!(host_dir_name("../x", "app"), None);
        assert_eq!(host_dir_name("uid", "a/b"), None);
        assert_eq!(host_dir_name("..", "app"), None);
        assert_eq!(host_dir_name("", "app"), None);
    }
}
