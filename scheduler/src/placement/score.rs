//! Scores: how full a node or card is, on HAMi's scale, so the figures in `FilteringSucceed`
//! read the same as HAMi's (the lab's `hami-workshop:7.21` is two 4000 MiB slices of a 10-slot
//! 15360 MiB T4: 10 × (2/10 + 8000/15360 + 0/100)).

use super::node::{Card, CardUsage, NodeState};
use super::policy::Policy;

fn ratio(used: f64, total: f64) -> f64 {
    if total > 0.0 {
        used / total
    } else {
        0.0
    }
}

/// 10 × (used slots/slots + used cores/cores + used MiB/MiB) over all the node's cards, before
/// the pod being placed is counted.
pub fn node_score(node: &NodeState) -> f64 {
    node_score_with(&node.cards, &node.usage)
}

pub fn node_score_with(cards: &[Card], usage: &[CardUsage]) -> f64 {
    // Integer sums, three divisions: this runs for every fitting candidate node.
    let (mut us, mut ts, mut uc, mut tc, mut um, mut tm) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for (c, u) in cards.iter().zip(usage) {
        us += u64::from(u.slots);
        ts += u64::from(c.slots);
        uc += u64::from(u.cores);
        tc += u64::from(c.cores);
        um = um.saturating_add(u.mem_mib);
        tm = tm.saturating_add(c.mem_mib);
    }
    10.0 * (ratio(us as f64, ts as f64) + ratio(uc as f64, tc as f64) + ratio(um as f64, tm as f64))
}

/// A card's score with one vGPU of `mem_mib` and `cores` added, in HAMi's float32 so cards that
/// tie in HAMi tie here (the tie then goes to the higher index, as in HAMi).
pub fn card_score_with(card: &Card, usage: &CardUsage, mem_mib: u64, cores: u32) -> f32 {
    if card.slots == 0 || card.cores == 0 || card.mem_mib == 0 {
        return 0.0;
    }
    let slots = usage.slots.saturating_add(1) as f32 / card.slots as f32;
    let cores = usage.cores.saturating_add(cores) as f32 / card.cores as f32;
    let mem = usage.mem_mib.saturating_add(mem_mib) as f32 / card.mem_mib as f32;
    10.0 * (slots + cores + mem)
}

/// Whether score `a` beats `b` under `policy`; ties keep the earlier candidate.
pub fn better(policy: Policy, a: f64, b: f64) -> bool {
    match policy {
        Policy::Binpack => a > b,
        Policy::Spread => a < b,
    }
}
