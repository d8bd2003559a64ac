//! Fitting one pod onto one node: which cards each container gets, or why none fit.

use super::node::{Card, CardUsage, NodeState};
use super::policy::Policy;
use super::reason::{FitReason, NodeMiss};
use super::request::{CardFilter, ContainerRequest, DefaultMemory, PodRequest};
use super::score::card_score;
use vgpu_contract::annotations::{ContainerDevice, PodDevices};

/// One vGPU given to a container: the card (an index into the node's cards) and its share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub card: usize,
    pub mem_mib: u64,
    pub cores: u32,
}

/// A pod's fit on a node: picks per container, in pod order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFit {
    pub picks: Vec<Vec<Pick>>,
}

impl NodeFit {
    pub fn devices(&self, node: &NodeState) -> PodDevices {
        PodDevices(
            self.picks
                .iter()
                .map(|c| {
                    c.iter()
                        .map(|p| {
                            ContainerDevice::nvidia(
                                node.cards[p.card].uuid.clone(),
                                p.mem_mib,
                                p.cores,
                            )
                        })
                        .collect()
                })
                .collect(),
        )
    }
}

/// The checks of one card against one vGPU of a container, in HAMi's order; the first that
/// fails is the card's reason.
pub fn check_card(
    card: &Card,
    used: &CardUsage,
    filter: &CardFilter,
    mem_mib: u64,
    cores: u32,
) -> Result<(), FitReason> {
    if !card.healthy {
        return Err(FitReason::CardNotHealth);
    }
    if !filter.type_ok(&card.kind_lower) {
        return Err(FitReason::CardTypeMismatch);
    }
    if !filter.uuid_ok(&card.uuid) {
        return Err(FitReason::CardUuidMismatch);
    }
    if used.slots >= card.slots {
        return Err(FitReason::CardTimeSlicingExhausted);
    }
    if card.mem_mib.saturating_sub(used.mem_mib) < mem_mib {
        return Err(FitReason::CardInsufficientMemory);
    }
    if card.cores.saturating_sub(used.cores) < cores {
        return Err(FitReason::CardInsufficientCore);
    }
    if cores >= 100 && used.slots > 0 {
        return Err(FitReason::ExclusiveDeviceAllocateConflict);
    }
    if cores == 0 && card.cores > 0 && used.cores >= card.cores {
        return Err(FitReason::CardComputeUnitsExhausted);
    }
    Ok(())
}

/// Card indices in the order `policy` prefers them, given the current usage.
fn card_order(cards: &[Card], usage: &[CardUsage], policy: Policy) -> Vec<usize> {
    let mut order: Vec<(usize, f64)> = cards
        .iter()
        .zip(usage)
        .enumerate()
        .map(|(i, (c, u))| (i, card_score(c, u)))
        .collect();
    // A stable sort keeps card index order among equals, so ties are predictable.
    match policy {
        Policy::Binpack => order.sort_by(|a, b| b.1.total_cmp(&a.1)),
        Policy::Spread => order.sort_by(|a, b| a.1.total_cmp(&b.1)),
    }
    order.into_iter().map(|(i, _)| i).collect()
}

fn fit_container(
    cards: &[Card],
    usage: &[CardUsage],
    req: &ContainerRequest,
    filter: &CardFilter,
    default_mem: DefaultMemory,
    policy: Policy,
) -> Result<Vec<Pick>, NodeMiss> {
    let want = req.gpus as usize;
    if cards.len() < want {
        return Err(NodeMiss::node_level(FitReason::NodeInsufficientDevice));
    }
    let mut picks = Vec::with_capacity(want);
    let mut misses: Vec<(FitReason, u32)> = Vec::new();
    for i in card_order(cards, usage, policy) {
        let card = &cards[i];
        let mem = req.mem.resolve(card.mem_mib, default_mem);
        match check_card(card, &usage[i], filter, mem, req.cores) {
            Ok(()) => {
                picks.push(Pick {
                    card: i,
                    mem_mib: mem,
                    cores: req.cores,
                });
                if picks.len() == want {
                    return Ok(picks);
                }
            }
            Err(r) => match misses.iter_mut().find(|(m, _)| *m == r) {
                Some((_, n)) => *n += 1,
                None => misses.push((r, 1)),
            },
        }
    }
    if misses.is_empty() {
        return Err(NodeMiss::node_level(FitReason::NodeInsufficientDevice));
    }
    misses.sort_by_key(|(r, _)| *r);
    Err(NodeMiss {
        counts: misses,
        total: cards.len() as u32,
    })
}

/// Fits every container of `req` on `node`, each container's vGPUs on distinct cards, later
/// containers seeing what earlier ones took. Nothing is reserved: see `Ledger` for that.
pub fn fit_pod(
    node: &NodeState,
    req: &PodRequest,
    default_mem: DefaultMemory,
    gpu_policy: Policy,
) -> Result<NodeFit, NodeMiss> {
    if node.cards.is_empty() {
        return Err(NodeMiss::node_level(FitReason::NodeUnregistered));
    }
    let mut usage = node.usage.clone();
    let mut picks = Vec::with_capacity(req.containers.len());
    for c in &req.containers {
        if c.gpus == 0 {
            picks.push(Vec::new());
            continue;
        }
        let got = fit_container(&node.cards, &usage, c, &req.filter, default_mem, gpu_policy)?;
        for p in &got {
            usage[p.card].add(p.mem_mib, p.cores);
        }
        picks.push(got);
    }
    Ok(NodeFit { picks })
}
