//! Fitting one pod onto one node: which cards each container gets, or why none fit.

use super::node::{Card, CardUsage, NodeState};
use super::policy::{GpuPolicy, SortKey};
use super::reason::{FitReason, NodeMiss};
use super::request::{CardFilter, ContainerRequest, DefaultMemory, PodRequest};
use super::score::card_score_with;
use std::cmp::Ordering;
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
    mutex: bool,
    mem_mib: u64,
    cores: u32,
) -> Result<(), FitReason> {
    if !card.healthy {
        return Err(FitReason::CardNotHealth);
    }
    if card.cordoned {
        return Err(FitReason::CardCordoned);
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
    if mutex && used.slots > 0 {
        return Err(FitReason::ExclusiveDeviceAllocateConflict);
    }
    if card.mem_mib.saturating_sub(used.mem_mib) < mem_mib {
        return Err(FitReason::CardInsufficientMemory);
    }
    if card.cores.saturating_sub(used.cores) < cores {
        return Err(FitReason::CardInsufficientCore);
    }
    // 100 cores means "the whole card" only on a card that registers 100: with a core scaling
    // of 2 (devcore 200) two 100-core pods share it.
    if card.cores == 100 && cores == 100 && used.slots > 0 {
        return Err(FitReason::ExclusiveDeviceAllocateConflict);
    }
    if cores == 0 && card.cores > 0 && used.cores >= card.cores {
        return Err(FitReason::CardComputeUnitsExhausted);
    }
    Ok(())
}

/// Most nodes have at most this many cards; larger ones spill to the heap.
const INLINE_CARDS: usize = 16;

/// HAMi's card order: ascending by the policy's keys, then by index; it walks the list from the
/// end, so `walk_order` is the reverse and the first `gpus` fitting cards in it are taken.
fn hami_cmp(
    policy: &GpuPolicy,
    cards: &[Card],
    usage: &[CardUsage],
    a: &(usize, f32),
    b: &(usize, f32),
) -> Ordering {
    for key in policy.keys() {
        let o = match key {
            SortKey::Binpack => a.1.total_cmp(&b.1),
            SortKey::Spread => b.1.total_cmp(&a.1),
            SortKey::Numa => cards[a.0].numa.cmp(&cards[b.0].numa),
            SortKey::IdleFirst => usage[b.0].slots.cmp(&usage[a.0].slots),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.0.cmp(&b.0)
}

/// Fits one container: every card is checked (so a miss can count reasons over all of them),
/// then the `gpus` first fitting cards in HAMi's walk order are taken, in that order.
/// Allocates only for what it returns, since this runs for every card of every candidate node.
fn fit_container(
    cards: &[Card],
    usage: &[CardUsage],
    req: &ContainerRequest,
    filter: &CardFilter,
    default_mem: DefaultMemory,
    policy: GpuPolicy,
    out: Option<&mut Vec<Pick>>,
) -> Result<(), NodeMiss> {
    let want = req.gpus as usize;
    if cards.len() < want {
        return Err(NodeMiss::node_level(FitReason::NodeInsufficientDevice));
    }
    let mut inline = [(0usize, 0f32); INLINE_CARDS];
    let mut spill = Vec::new();
    let mut n_fit = 0;
    let mut misses = [0u32; FitReason::COUNT];
    for (i, card) in cards.iter().enumerate() {
        let mem = req.mem.resolve(card.mem_mib, default_mem);
        match check_card(card, &usage[i], filter, policy.mutex, mem, req.cores) {
            // Only asked whether it fits: reasons matter only when it does not, and the order
            // only when picks are built, so the first `want` fitting cards settle it.
            Ok(()) if out.is_none() => {
                n_fit += 1;
                if n_fit == want {
                    return Ok(());
                }
            }
            Ok(()) => {
                let entry = (i, card_score_with(card, &usage[i], mem, req.cores));
                if n_fit < INLINE_CARDS {
                    inline[n_fit] = entry;
                } else {
                    if spill.is_empty() {
                        spill.extend_from_slice(&inline);
                    }
                    spill.push(entry);
                }
                n_fit += 1;
            }
            Err(r) => misses[r as usize] += 1,
        }
    }
    if n_fit < want {
        if n_fit > 0 {
            misses[FitReason::AllocatedCardsInsufficientRequest as usize] = n_fit as u32;
        }
        if misses.iter().all(|n| *n == 0) {
            return Err(NodeMiss::node_level(FitReason::NodeInsufficientDevice));
        }
        return Err(NodeMiss::from_counts(misses, cards.len() as u32));
    }
    if let Some(out) = out {
        let fits = if spill.is_empty() {
            &mut inline[..n_fit]
        } else {
            &mut spill[..]
        };
        fits.sort_unstable_by(|a, b| hami_cmp(&policy, cards, usage, b, a));
        for &(i, _) in &fits[..want] {
            let mem = req.mem.resolve(cards[i].mem_mib, default_mem);
            out.push(Pick {
                card: i,
                mem_mib: mem,
                cores: req.cores,
            });
        }
    }
    Ok(())
}

/// Fits every container of `req` on `node`, each container's vGPUs on distinct cards. As in
/// HAMi, each init container sees only what the node already holds (they run one at a time),
/// and each app container also sees what the earlier app containers took. Nothing is
/// reserved: see `Ledger` for that.
pub fn fit_pod(
    node: &NodeState,
    req: &PodRequest,
    default_mem: DefaultMemory,
    gpu_policy: impl Into<GpuPolicy>,
) -> Result<NodeFit, NodeMiss> {
    let mut picks = Vec::with_capacity(req.containers.len());
    fit_pod_into(node, req, default_mem, gpu_policy.into(), Some(&mut picks))?;
    Ok(NodeFit { picks })
}

/// Whether `req` fits on `node`, without building the picks.
pub fn check_pod(
    node: &NodeState,
    req: &PodRequest,
    default_mem: DefaultMemory,
    gpu_policy: impl Into<GpuPolicy>,
) -> Result<(), NodeMiss> {
    fit_pod_into(node, req, default_mem, gpu_policy.into(), None)
}

fn fit_pod_into(
    node: &NodeState,
    req: &PodRequest,
    default_mem: DefaultMemory,
    gpu_policy: GpuPolicy,
    mut picks: Option<&mut Vec<Vec<Pick>>>,
) -> Result<(), NodeMiss> {
    if node.cards.is_empty() {
        return Err(NodeMiss::node_level(FitReason::NodeUnregistered));
    }
    let init = req.init.min(req.containers.len());
    let app_gpu_containers = req.containers[init..].iter().filter(|c| c.gpus > 0).count();
    // Only a pod with several GPU app containers needs a scratch copy of the usage: each later
    // one must see what the earlier ones took. Picks are needed for that too.
    let mut scratch = (app_gpu_containers > 1).then(|| node.usage.clone());
    let mut local = Vec::new();
    for (i, c) in req.containers.iter().enumerate() {
        if c.gpus == 0 {
            if let Some(p) = picks.as_deref_mut() {
                p.push(Vec::new());
            }
            continue;
        }
        let is_init = i < init;
        let usage = match &scratch {
            Some(s) if !is_init => s.as_slice(),
            _ => &node.usage,
        };
        let need_picks = picks.is_some() || (scratch.is_some() && !is_init);
        local.clear();
        fit_container(
            &node.cards,
            usage,
            c,
            &req.filter,
            default_mem,
            gpu_policy,
            need_picks.then_some(&mut local),
        )?;
        if let (Some(u), false) = (scratch.as_mut(), is_init) {
            for p in &local {
                u[p.card].add(p.mem_mib, p.cores);
            }
        }
        if let Some(p) = picks.as_deref_mut() {
            p.push(local.clone());
        }
    }
    Ok(())
}
