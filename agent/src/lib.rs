//! vgpu-agent by role: `ebpf` (the host view through uprobes), `ledger` (what the agent knows and decides),
//! `observe` (status and metrics), `node` (the Kubernetes node side: device plugin, registration, Allocate),
//! `exec` (a slice on a workstation), `run` (the agent process), `gpus` (NVML).
//! A library so that the node side's tests drive it against in-test kubelet and API servers.

pub mod ebpf;
pub mod exec;
pub mod gpus;
pub mod ledger;
pub mod node;
pub mod observe;
pub mod run;
