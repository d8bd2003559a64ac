//! What the agent knows and decides: the per-container book of memory seen by eBPF and charged in the cache
//! files, the policy applied to it, and the state a restarted agent takes over (journal, handover).

pub mod bind_socket;
pub mod bindings;
pub mod book;
pub mod caches;
pub mod cgroups;
pub mod handover;
pub mod journal;
pub mod state;
