//! vgpu-scheduler: places vGPU pods on nodes and cards the way HAMi does, on HAMi's wire formats.
//!
//! - [`placement`]: the pure placement library (fit, reasons, scores, the reservation ledger).
//! - [`podspec`]: reading requests, registrations and placements out of Kubernetes objects.
//! - [`simulate`]: `vgpu-scheduler simulate`, placing the pending pods of a List file.

pub mod events;
pub mod extender;
pub mod kubeapi;
pub mod metrics;
pub mod placement;
pub mod podspec;
pub mod quantity;
pub mod simulate;
pub mod watch;
pub mod webhook;
