//! What people and dashboards see: `vgpu-agent status`, the report behind it, Prometheus metrics.

pub mod metrics;
pub mod report;
pub mod status;
