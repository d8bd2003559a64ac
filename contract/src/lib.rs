//! vgpu's contract between its parts, in one place.
//!
//! - [`env`]: the container environment Allocate sets and the shim reads (HAMi-compatible names).
//! - [`limits`]: parsing of those values (memory sizes, SM percentages, the utilization policy, and the compute
//!   windows the agent places in the limits file).
//! - [`cache_layout`]: the versioned shared-cache file every process of a container charges.
//! - [`card_layout`]: the per-GPU file through which the slices on one card share its time.
//! - [`mapped`]: how those files are created and mapped.
//! - [`container_dir`]: the per-container directory Allocate mounts, with the limits file as root of trust.
//! - [`agent_socket`]: what `vgpu-agent exec` tells the agent about a slice it starts.
//! - `placement_seal` (feature `seal`): the scheduler's HMAC over a placement, checked by Allocate.
//! - [`annotations`] and [`register`]: the node and pod annotations the scheduler and agent exchange.
//!
//! Nothing here does I/O beyond what a layout needs to map a file; every part links this crate.

pub mod agent_socket;
pub mod annotations;
pub mod cache_layout;
pub mod card_layout;
pub mod container_dir;
pub mod cuda_arrays;
pub mod env;
pub mod limits;
pub mod mapped;
#[cfg(feature = "seal")]
pub mod placement_seal;
pub mod register;
