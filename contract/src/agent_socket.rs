//! Requests on the agent's bind socket (`/run/vgpu/bind.sock`, mode 0666, served by `vgpu-agent run
//! --bind-socket`; `Status` is refused there: status stays on the root-only `/run/vgpu/agent.sock`).
//!
//! `vgpu-agent exec` registers each slice it starts: the cgroup it made for the slice, the cache file, and the
//! limits it was given, and unbinds it when its command exits. The agent takes a standalone container's limits
//! and cgroup binding from this (and a Kubernetes container's from Allocate), never from a file inside the
//! slice. The agent checks the caller with `SO_PEERCRED`: root may bind any cgroup; another user only a cgroup
//! directory it owns and a cache file it owns (regular file, not a symlink), and only root or the user that
//! made a binding may replace or unbind it. Binding one cgroup twice (two commands sharing a slice) needs as
//! many unbinds. One JSON object per line each way, at most 64 KiB a line; the reply is `"ok"` or
//! `{"error": "what was refused and why"}`.

use std::collections::BTreeMap;

/// Where the agent serves [`Request::Bind`] and [`Request::Unbind`] (mode 0666; callers checked by SO_PEERCRED).
pub const BIND_SOCKET: &str = "/run/vgpu/bind.sock";

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// What `vgpu-agent status` asks.
    Status,
    /// Bind a slice started by `exec`.
    Bind(ExecBinding),
    /// The slice's command has exited: forget the binding.
    Unbind { cgroup: String },
}

/// One exec slice as `exec` started it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecBinding {
    /// cgroup2 path relative to the cgroup2 mount, starting with `/`.
    pub cgroup: String,
    /// Absolute path of the slice's cache file.
    pub cache: String,
    /// Memory limit in bytes per CUDA ordinal (absent: no memory limit on that device).
    pub memory_limits: BTreeMap<u32, u64>,
    /// Compute share in percent (0: none).
    pub sm_limit: u32,
    /// `default`, `force` or `disable`.
    pub policy: String,
    /// The pid `exec` started (the slice's first process), for the log.
    pub pid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok,
    Error(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bind_request_round_trips_and_unknown_fields_are_refused() {
        let b = Request::Bind(ExecBinding {
            cgroup: "/vgpu-exec/1000/a".into(),
            cache: "/run/user/1000/vgpu/a.cache".into(),
            memory_limits: [(0, 4000 << 20)].into(),
            sm_limit: 30,
            policy: "force".into(),
            pid: 42,
        });
        let s = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), b);
        assert!(serde_json::from_str::<Request>(r#"{"bind":{"cgroup":"/a","cache":"/b","memory_limits":{},"sm_limit":0,"policy":"force","pid":1,"x":1}}"#).is_err());
    }
}
