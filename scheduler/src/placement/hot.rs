//! A node's cards in a few cache lines, kept inline in the ledger's node slots, for the question a
//! filter asks of thousands of nodes: does this simple request fit here, and what is the node's
//! score? Following each node's card and usage lists to the heap cost a cache miss per node and
//! was most of a filter's time at 5,000 nodes. Anything the summary cannot answer exactly (several
//! GPU containers, init containers, UUID filters, types not yet judged, more than
//! [`HOT_CARDS`] cards) goes to the full check in `fit`, which also gives the reasons of a miss.

use super::node::{Card, CardUsage};
use super::reason::{FitReason, NodeMiss};
use super::request::{CardFilter, DefaultMemory, PodRequest};
use super::score::node_score_with;
use std::hash::{Hash, Hasher};

pub const HOT_CARDS: usize = 8;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct HotCard {
    mem_mib: u64,
    used_mem: u64,
    cores: u32,
    used_cores: u32,
    slots: u32,
    used_slots: u32,
    type_hash: u64,
    healthy: bool,
    cordoned: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeHot {
    /// The node's score before the pod (`score::node_score`).
    pub score: f64,
    /// 0 when the node has more cards than fit here: every question goes to the full check.
    n: u8,
    cards: [HotCard; HOT_CARDS],
}

impl Default for NodeHot {
    fn default() -> Self {
        NodeHot {
            score: 0.0,
            n: 0,
            cards: [HotCard::default(); HOT_CARDS],
        }
    }
}

/// The key a card type is judged under in [`CardFilter`]'s memo.
pub fn type_hash(kind_lower: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    kind_lower.hash(&mut h);
    h.finish()
}

impl NodeHot {
    pub fn new(cards: &[Card], usage: &[CardUsage]) -> Self {
        let mut hot = NodeHot {
            score: node_score_with(cards, usage),
            ..Default::default()
        };
        if cards.len() > HOT_CARDS {
            return hot;
        }
        hot.n = cards.len() as u8;
        for ((h, c), u) in hot.cards.iter_mut().zip(cards).zip(usage) {
            *h = HotCard {
                mem_mib: c.mem_mib,
                used_mem: u.mem_mib,
                cores: c.cores,
                used_cores: u.cores,
                slots: c.slots,
                used_slots: u.slots,
                type_hash: type_hash(&c.kind_lower),
                healthy: c.healthy,
                cordoned: c.cordoned,
            };
        }
        hot
    }

    /// What `fit::check_pod` would answer, reasons of a miss included, or `None` when the
    /// summary cannot tell.
    pub fn check(
        &self,
        req: &PodRequest,
        default_mem: DefaultMemory,
        mutex: bool,
    ) -> Option<Result<(), NodeMiss>> {
        if self.n == 0 || req.init > 0 || !simple_filter(&req.filter) {
            return None;
        }
        let mut gpu = req.containers.iter().filter(|c| c.gpus > 0);
        let c = gpu.next()?;
        if gpu.next().is_some() {
            return None;
        }
        let want = c.gpus as usize;
        let n = self.n as usize;
        if n < want {
            return Some(Err(NodeMiss::node_level(FitReason::NodeInsufficientDevice)));
        }
        let typed = !req.filter.use_types.is_empty() || !req.filter.nouse_types.is_empty();
        let mut found = 0;
        let mut misses = [0u32; FitReason::COUNT];
        // The checks of `fit::check_card`, in its order.
        for h in &self.cards[..n] {
            let reason = if !h.healthy {
                FitReason::CardNotHealth
            } else if h.cordoned {
                FitReason::CardCordoned
            } else if typed && !req.filter.type_ok_hashed(h.type_hash)? {
                FitReason::CardTypeMismatch
            } else if h.used_slots >= h.slots {
                FitReason::CardTimeSlicingExhausted
            } else if mutex && h.used_slots > 0 {
                FitReason::ExclusiveDeviceAllocateConflict
            } else {
                let mem = c.mem.resolve(h.mem_mib, default_mem);
                if h.mem_mib.saturating_sub(h.used_mem) < mem {
                    FitReason::CardInsufficientMemory
                } else if h.cores.saturating_sub(h.used_cores) < c.cores {
                    FitReason::CardInsufficientCore
                } else if h.cores == 100 && c.cores == 100 && h.used_slots > 0 {
                    FitReason::ExclusiveDeviceAllocateConflict
                } else if c.cores == 0 && h.cores > 0 && h.used_cores >= h.cores {
                    FitReason::CardComputeUnitsExhausted
                } else {
                    found += 1;
                    if found == want {
                        return Some(Ok(()));
                    }
                    continue;
                }
            };
            misses[reason as usize] += 1;
        }
        if found > 0 {
            misses[FitReason::AllocatedCardsInsufficientRequest as usize] = found as u32;
        }
        Some(Err(NodeMiss::from_counts(misses, n as u32)))
    }
}

fn simple_filter(f: &CardFilter) -> bool {
    f.use_uuids.is_empty() && f.nouse_uuids.is_empty()
}
