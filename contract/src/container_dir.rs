//! The per-container directory the agent owns on the host and Allocate mounts into the container.
//!
//! Host side: `<containers root>/<first device ID>_<serial>/` ([`allocation_dir_name`]), one per Allocate answer,
//! created by the agent, owned by root, never writable through the container except the cache file. The name
//! says which answer it is, not which pod: the kubelet's Allocate does not name the pod, so the agent can only
//! learn it afterwards (PodResources), and a directory named after a guess would lie when the guess was wrong.
//! The pod and container it serves are recorded beside it in [`OWNER_NAME`] (never mounted).
//!
//! Container side, each entry is its own bind mount, so a tenant can neither unlink nor replace any of them (a mount point is busy):
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
//! environment's `NAME=value` keys ([`crate::env`]) plus [`LIMITS_STATE`], written with [`render_limits`] and
//! read with [`limits_state`]. Whenever anything is at [`CONTAINER_LIMITS`], it is the file (the
//! `VGPU_LIMITS_FILE` variable only names one off Kubernetes). The shim reads it as follows:
//! - file absent: not under Kubernetes; the environment is the contract (HAMi's behaviour).
//! - empty, or no [`LIMITS_STATE`] line yet: pending; wait up to [`PENDING_WAIT_MS`], then refuse every
//!   allocation with a clear message (fail closed).
//! - `VGPU_LIMITS_STATE=ready`: the values are the ceiling; the environment may only tighten them (memory and
//!   share lower, policy towards force, period shorter); the cache file and card directory are the file's
//!   (without a cache line: [`CACHE_NAME`] beside the limits file; without a card line: the default). Every
//!   value the file names must parse, and a second state line or an unknown state is a damaged file: both
//!   refuse every allocation.
//! - `VGPU_LIMITS_STATE=revoked`: the container is not on its own devices (or its pod was refused): refuse
//!   every allocation and launch, and log the `VGPU_LIMITS_REASON` line.

/// Prefix of the compute-window keys of the limits file: `VGPU_CORE_WINDOWS_<cuda ordinal>=<period_ms>:<start_us>+<len_us>,...`
/// (format and bounds in [`crate::limits::parse_core_windows`]). The agent places every container with a
/// compute share on a card in ranges of one period that no other container on that card holds; the shim then
/// paces that device inside exactly those ranges, whatever the card file says. A file-only key: no
/// environment variable sets or moves windows (the environment may still lower the share, which shortens them).
pub const CORE_WINDOWS_PREFIX: &str = "VGPU_CORE_WINDOWS_";

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

/// What a limits file says about the container, from its [`LIMITS_STATE`] line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitsState {
    /// Empty, or no state line yet: Allocate has not confirmed the pod and container.
    Pending,
    Ready,
    /// With the [`LIMITS_REASON`] line (empty when the file has none).
    Revoked(String),
}

/// The state of a parsed limits file (`NAME=value` pairs, see [`crate::limits::parse_limits_file`]). A state
/// value other than [`STATE_READY`] and [`STATE_REVOKED`] is an error: a damaged file must not read as ready.
pub fn limits_state(kv: &[(String, String)]) -> Result<LimitsState, String> {
    let reason = kv
        .iter()
        .rev()
        .find(|(k, _)| k == LIMITS_REASON)
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let mut states = kv.iter().filter(|(k, _)| k == LIMITS_STATE);
    let Some((_, first)) = states.next() else {
        return Ok(LimitsState::Pending);
    };
    // Two state lines are a damaged file whatever they say: no reading of it may pick the laxer one.
    if states.next().is_some() {
        return Err(format!("{LIMITS_STATE} appears more than once"));
    }
    match first.as_str() {
        STATE_READY => Ok(LimitsState::Ready),
        STATE_REVOKED => Ok(LimitsState::Revoked(reason)),
        other => Err(format!(
            "{LIMITS_STATE}={other:?}: expected {STATE_READY} or {STATE_REVOKED}"
        )),
    }
}

/// The text of a limits file: `values` as `NAME=value` lines, then the state line (and the reason of a
/// revocation). What the agent writes in place of the empty file once PodResources confirmed the container.
pub fn render_limits(values: &[(&str, String)], state: &LimitsState) -> String {
    let mut out = String::from("# written by vgpu-agent; read by libvgpu.so\n");
    for (k, v) in values {
        out.push_str(&format!("{k}={v}\n"));
    }
    match state {
        LimitsState::Pending => {}
        LimitsState::Ready => out.push_str(&format!("{LIMITS_STATE}={STATE_READY}\n")),
        LimitsState::Revoked(reason) => {
            // One line: a newline in the reason would end it and start a line of its own.
            let reason = reason.replace(['\n', '\r'], " ");
            out.push_str(&format!("{LIMITS_REASON}={reason}\n"));
            out.push_str(&format!("{LIMITS_STATE}={STATE_REVOKED}\n"));
        }
    }
    out
}

/// Host directory name of one Allocate answer: `<first device ID>_<serial>` (the serial in hex, unique on the
/// node: the agent takes it from the clock and never reuses one). The device ID is the plugin's own
/// (`<GPU-UUID>-<n>`); anything else than a plain name is refused, so the name cannot leave the root.
pub fn allocation_dir_name(first_id: &str, serial: u64) -> Option<String> {
    let ok = !first_id.is_empty()
        && first_id.len() <= 200
        && first_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && first_id != "."
        && first_id != "..";
    ok.then(|| format!("{first_id}_{serial:016x}"))
}

/// Name, in the host directory, of the record of the pod and container it serves (`uid=`, `namespace=`,
/// `name=`, `container=` lines): the guess Allocate made, replaced by the kubelet's answer once known.
pub const OWNER_NAME: &str = "owner";

#[cfg(test)]
mod tests {
    use super::*;

    fn state_of(text: &str) -> Result<LimitsState, String> {
        limits_state(&crate::limits::parse_limits_file(text).unwrap())
    }

    #[test]
    fn limits_file_states() {
        assert_eq!(state_of(""), Ok(LimitsState::Pending));
        assert_eq!(
            state_of("CUDA_DEVICE_MEMORY_LIMIT_0=4000m\n"),
            Ok(LimitsState::Pending)
        );
        assert_eq!(
            state_of("VGPU_LIMITS_STATE=ready\n"),
            Ok(LimitsState::Ready)
        );
        assert_eq!(
            state_of("VGPU_LIMITS_STATE=revoked\nVGPU_LIMITS_REASON=not on its devices\n"),
            Ok(LimitsState::Revoked("not on its devices".into()))
        );
        assert!(state_of("VGPU_LIMITS_STATE=Ready\n").is_err());
        assert!(state_of("VGPU_LIMITS_STATE=ready\nVGPU_LIMITS_STATE=revoked\n").is_err());
    }

    #[test]
    fn rendered_files_read_back() {
        let values = [("CUDA_DEVICE_MEMORY_LIMIT_0", "4000m".to_string())];
        let ready = render_limits(&values, &LimitsState::Ready);
        let kv = crate::limits::parse_limits_file(&ready).unwrap();
        assert_eq!(kv[0], ("CUDA_DEVICE_MEMORY_LIMIT_0".into(), "4000m".into()));
        assert_eq!(limits_state(&kv), Ok(LimitsState::Ready));
        let revoked = render_limits(
            &values,
            &LimitsState::Revoked("a\nVGPU_LIMITS_STATE=ready".into()),
        );
        assert_eq!(
            state_of(&revoked),
            Ok(LimitsState::Revoked("a VGPU_LIMITS_STATE=ready".into())),
            "a reason cannot smuggle in a line of its own"
        );
    }

    #[test]
    fn directory_names_cannot_escape_the_root() {
        assert_eq!(
            allocation_dir_name("GPU-8f1c-22-3", 0x1f).as_deref(),
            Some("GPU-8f1c-22-3_000000000000001f")
        );
        assert_eq!(allocation_dir_name("../x", 1), None);
        assert_eq!(allocation_dir_name("a/b", 1), None);
        assert_eq!(allocation_dir_name("..", 1), None);
        assert_eq!(allocation_dir_name("", 1), None);
    }
}
