//! Placement as a pure library: no I/O, no clock, no Kubernetes types. Given the nodes' cards and
//! what is reserved on them, choose a node and cards for a pod, or say why none fit.

pub mod candidates;
pub mod fit;
pub mod hot;
pub mod ledger;
pub mod node;
pub mod policy;
pub mod reason;
pub mod request;
pub mod score;

use fit::{check_pod, fit_pod, NodeFit};
use node::NodeState;
use policy::{GpuPolicy, Policy};
use reason::{FitReason, NodeMiss};
use request::{DefaultMemory, PodRequest};
use score::better;

/// Cluster-wide defaults a pod may override with its annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub default_memory: DefaultMemory,
    /// Cores (percent of a card) of a vGPU whose container sets no gpucores and asks for less than a
    /// whole card (HAMi's `scheduler.defaultCores`, 0 by default).
    pub default_cores: u32,
    /// HAMi's node default is binpack.
    pub node_policy: Policy,
    /// HAMi's card default is spread.
    pub gpu_policy: GpuPolicy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_memory: DefaultMemory::default(),
            default_cores: 0,
            node_policy: Policy::Binpack,
            gpu_policy: GpuPolicy::SPREAD,
        }
    }
}

/// The outcome over a list of candidate nodes; indices refer to that list.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The winner: candidate index, its fit and its score.
    pub chosen: Option<(usize, NodeFit, f64)>,
    /// Every node that fits, with its score (usage before this pod), in candidate order.
    pub fits: Vec<(usize, f64)>,
    pub misses: Vec<(usize, NodeMiss)>,
}

/// Places `req` over `n` candidates, `lookup(i)` giving candidate `i`'s node (absent ones miss
/// as unregistered). The node policy picks among fitting nodes by score; ties keep the earlier
/// candidate.
pub fn choose<'a>(
    n: usize,
    lookup: impl Fn(usize) -> Option<&'a NodeState>,
    req: &PodRequest,
    cfg: &Config,
) -> Decision {
    let node_policy = req.node_policy.unwrap_or(cfg.node_policy);
    let gpu_policy = req.gpu_policy.unwrap_or(cfg.gpu_policy);
    let mut fits = Vec::new();
    let mut misses = Vec::new();
    let mut best: Option<(usize, &NodeState, f64)> = None;
    for i in 0..n {
        let Some(node) = lookup(i) else {
            misses.push((i, NodeMiss::node_level(FitReason::NodeUnregistered)));
            continue;
        };
        let checked = match node.hot.check(req, cfg.default_memory, gpu_policy.mutex) {
            Some(answer) => answer,
            None => check_pod(node, req, cfg.default_memory, gpu_policy),
        };
        match checked {
            Ok(()) => {
                let score = node.hot.score;
                fits.push((i, score));
                if best.is_none_or(|(_, _, b)| better(node_policy, score, b)) {
                    best = Some((i, node, score));
                }
            }
            Err(miss) => misses.push((i, miss)),
        }
    }
    // Picks are built for the winner only; check_pod has already shown they exist.
    let chosen = best.map(|(i, node, score)| {
        let fit = fit_pod(node, req, cfg.default_memory, gpu_policy)
            .expect("a node that passed check_pod fits");
        (i, fit, score)
    });
    Decision {
        chosen,
        fits,
        misses,
    }
}

#[cfg(test)]
mod tests;
