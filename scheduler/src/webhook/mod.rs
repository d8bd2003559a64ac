//! The admission webhooks: the mutating one sends vGPU pods to our scheduler; both refuse pods
//! that would skip it and pod metadata that only vgpu may write.

pub mod admit;
pub mod protected;
pub mod review;
pub mod server;
pub mod tls;

pub use admit::{admit, ClusterLimits, Verdict};
pub use protected::Writers;
pub use review::Mode;

#[cfg(test)]
mod tests;
