//! vgpu's contract between its parts, in one place.
//!
//! - [`env`]: the container environment Allocate sets and the shim reads (HAMi-compatible names).
//! - [`limits`]: parsing of those values (memory sizes, SM percentages, the utilization policy).
//! - [`cache_layout`]: the versioned shared-cache file every process of a container charges.
//! - [`card_layout`]: the per-GPU file through which the slices on one card share its time.
//! - [`mapped`]: how those files are created and mapped.
//! - [`annotations`] and [`register`]: the node and pod annotations the scheduler and agent exchange.
//!
//! Nothing here does I/O beyond what a layout needs to map a file; every part links this crate.

pub mod annotations;
pub mod cache_layout;
pub mod card_layout;
pub mod cuda_arrays;
pub mod env;
pub mod limits;
pub mod mapped;
pub mod register;
