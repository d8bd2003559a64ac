//! Device memory per process as the uprobes saw it: every live allocation by handle, so a free subtracts
//! exactly what its allocation added and a process's memory goes with it when it exits.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::ebpf::decode::{Call, Space};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ProcMemory {
    /// Process start time (clock ticks after boot), so a reused pid is never taken for the old process.
    pub start_time: u64,
    pub cgroup_id: u64,
    pub allocations: HashMap<String, u64>,
    pub total: u64,
    pub contexts: u32,
    /// Allocations made while no agent watched may be missing (process older than the agent's probes).
    pub partial: bool,
}

fn key(space: Space, handle: u64) -> String {
    format!("{space:?}:{handle:x}")
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub procs: HashMap<u32, ProcMemory>,
}

impl Ledger {
    /// Applies one call; returns the process's total after it.
    pub fn apply(&mut self, tgid: u32, start_time: u64, cgroup_id: u64, call: Call) -> u64 {
        let p = self.procs.entry(tgid).or_default();
        if p.start_time != start_time && start_time != 0 {
            if p.start_time != 0 {
                // The pid was reused: the old process is gone and took its memory with it.
                *p = ProcMemory::default();
            }
            p.start_time = start_time;
        }
        if cgroup_id != 0 {
            p.cgroup_id = cgroup_id;
        }
        match call {
            Call::Alloc {
                space,
                handle,
                bytes,
            } => {
                // A handle the driver hands out again was freed by a call we did not see: replace it.
                if let Some(old) = p.allocations.insert(key(space, handle), bytes) {
                    p.total -= old;
                }
                p.total += bytes;
            }
            Call::Free { space, handle } => {
                // Unknown handles were allocated before we watched; nothing of ours to subtract.
                if let Some(old) = p.allocations.remove(&key(space, handle)) {
                    p.total -= old;
                }
            }
            Call::CtxCreate { .. } => p.contexts += 1,
            Call::PrimaryCtxRelease { .. } | Call::CtxDestroy { .. } => {
                p.contexts = p.contexts.saturating_sub(1)
            }
        }
        p.total
    }

    /// Forgets processes that exited (`alive(tgid, start_time)` false); returns the tgids dropped.
    pub fn drop_dead(&mut self, mut alive: impl FnMut(u32, u64) -> bool) -> Vec<u32> {
        let dead: Vec<u32> = self
            .procs
            .iter()
            .filter(|(t, p)| !alive(**t, p.start_time))
            .map(|(t, _)| *t)
            .collect();
        for t in &dead {
            self.procs.remove(t);
        }
        dead
    }

    #[cfg(test)]
    pub fn total(&self, tgid: u32) -> u64 {
        self.procs.get(&tgid).map_or(0, |p| p.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Call = Call::Alloc {
        space: Space::DevicePtr,
        handle: 0x1000,
        bytes: 100,
    };

    #[test]
    fn free_subtracts_what_was_allocated() {
        let mut l = Ledger::default();
        l.apply(7, 1, 9, A);
        l.apply(
            7,
            1,
            9,
            Call::Alloc {
                space: Space::MemHandle,
                handle: 0x1000,
                bytes: 50,
            },
        );
        assert_eq!(
            l.total(7),
            150,
            "same handle value in another space is another allocation"
        );
        assert_eq!(
            l.apply(
                7,
                1,
                9,
                Call::Free {
                    space: Space::DevicePtr,
                    handle: 0x1000
                }
            ),
            50
        );
        assert_eq!(
            l.apply(
                7,
                1,
                9,
                Call::Free {
                    space: Space::DevicePtr,
                    handle: 0x1000
                }
            ),
            50,
            "double free"
        );
        assert_eq!(
            l.apply(
                7,
                1,
                9,
                Call::Free {
                    space: Space::DevicePtr,
                    handle: 0x9999
                }
            ),
            50,
            "unknown free"
        );
        l.apply(
            7,
            1,
            9,
            Call::Alloc {
                space: Space::MemHandle,
                handle: 0x1000,
                bytes: 70,
            },
        );
        assert_eq!(l.total(7), 70, "a reissued handle replaces the stale one");
    }

    #[test]
    fn exits_and_reused_pids_drop_memory() {
        let mut l = Ledger::default();
        l.apply(7, 1, 9, A);
        l.apply(8, 1, 9, A);
        assert_eq!(
            l.apply(
                7,
                2,
                9,
                Call::Alloc {
                    space: Space::DevicePtr,
                    handle: 0x2000,
                    bytes: 5
                }
            ),
            5
        );
        assert_eq!(l.drop_dead(|t, _| t != 8), vec![8]);
        assert_eq!(l.total(8), 0);
        assert_eq!(l.total(7), 5);
    }
}
