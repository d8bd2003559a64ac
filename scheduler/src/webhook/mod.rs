//! The mutating admission webhook: sends vGPU pods to our scheduler and refuses impossible ones.

pub mod admit;
pub mod server;
pub mod tls;

pub use admit::{admit, ClusterLimits, Verdict};
