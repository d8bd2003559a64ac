//! The host view: uprobes on every libcuda file, their events decoded, the pins a restarted agent adopts, and
//! the process table the events are attributed through.

pub mod decode;
pub mod libcuda_id;
pub mod pins;
pub mod probes;
pub mod procs;
