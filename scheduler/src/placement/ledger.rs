//! The scheduler's book of nodes and reservations. Pure: the extender wraps it in a lock and feeds
//! it from the watchers, `simulate` feeds it from a file, and the property tests drive it directly.
//! Usage on a card is always the sum of the placements recorded on it, so replaying the pods'
//! annotations after a restart rebuilds exactly the same book.

use super::fit::NodeFit;
use super::node::NodeState;
use super::request::PodRequest;
use super::{choose, Config, Decision};
use std::collections::{HashMap, HashSet};
use vgpu_contract::annotations::PodDevices;
use vgpu_contract::register::DeviceInfo;

/// Where a pod's vGPUs are, keyed by pod UID in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// `namespace/name`, for messages.
    pub pod: String,
    pub node: String,
    pub devices: PodDevices,
}

#[derive(Debug, Default, Clone)]
pub struct Ledger {
    nodes: HashMap<String, NodeState>,
    /// The devices each node was registered with, to skip rebuilding when nothing changed.
    registered: HashMap<String, Vec<DeviceInfo>>,
    pods: HashMap<String, Placement>,
    by_node: HashMap<String, HashSet<String>>,
}

impl Ledger {
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeState> {
        self.nodes.values()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn placement(&self, uid: &str) -> Option<&Placement> {
        self.pods.get(uid)
    }

    pub fn placements(&self) -> impl Iterator<Item = (&String, &Placement)> {
        self.pods.iter()
    }

    /// Registers or re-registers a node's cards. Reservations on it are re-applied, so a card
    /// that vanished stops counting and one that returns counts again.
    pub fn upsert_node(&mut self, name: &str, devices: Vec<DeviceInfo>) {
        if self.registered.get(name) == Some(&devices) {
            return;
        }
        let mut node = NodeState::new(name, &devices);
        if let Some(uids) = self.by_node.get(name) {
            for uid in uids {
                if let Some(p) = self.pods.get(uid) {
                    apply(&mut node, &p.devices, true);
                }
            }
        }
        self.nodes.insert(name.to_string(), node);
        self.registered.insert(name.to_string(), devices);
    }

    /// Forgets a node's cards but keeps its pods' records, so the node coming back restores them.
    pub fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
        self.registered.remove(name);
    }

    /// Records where a pod's vGPUs are. Recording the same placement again changes nothing;
    /// a different one replaces the old.
    pub fn record(&mut self, uid: &str, placement: Placement) {
        if self.pods.get(uid) == Some(&placement) {
            return;
        }
        self.release(uid);
        if let Some(node) = self.nodes.get_mut(&placement.node) {
            apply(node, &placement.devices, true);
        }
        self.by_node
            .entry(placement.node.clone())
            .or_default()
            .insert(uid.to_string());
        self.pods.insert(uid.to_string(), placement);
    }

    /// Frees a pod's reservation; returns what it held.
    pub fn release(&mut self, uid: &str) -> Option<Placement> {
        let old = self.pods.remove(uid)?;
        if let Some(node) = self.nodes.get_mut(&old.node) {
            apply(node, &old.devices, false);
        }
        if let Some(set) = self.by_node.get_mut(&old.node) {
            set.remove(uid);
            if set.is_empty() {
                self.by_node.remove(&old.node);
            }
        }
        Some(old)
    }

    /// Chooses without reserving.
    pub fn decide<S: AsRef<str>>(
        &self,
        candidates: &[S],
        req: &PodRequest,
        cfg: &Config,
    ) -> Decision {
        choose(candidates, |n| self.nodes.get(n), req, cfg)
    }

    /// Chooses and, when a node fits, reserves it for `uid` in the same step. A pod placed again
    /// (kube-scheduler retrying) first gives back what it held, whether or not it fits again.
    pub fn place<S: AsRef<str>>(
        &mut self,
        uid: &str,
        pod: &str,
        candidates: &[S],
        req: &PodRequest,
        cfg: &Config,
    ) -> Decision {
        self.release(uid);
        let decision = self.decide(candidates, req, cfg);
        if let Some((i, fit, _)) = &decision.chosen {
            let node = candidates[*i].as_ref();
            let devices = self.devices_for(node, fit);
            self.record(
                uid,
                Placement {
                    pod: pod.to_string(),
                    node: node.to_string(),
                    devices,
                },
            );
        }
        decision
    }

    fn devices_for(&self, node: &str, fit: &NodeFit) -> PodDevices {
        fit.devices(&self.nodes[node])
    }
}

fn apply(node: &mut NodeState, devices: &PodDevices, add: bool) {
    for d in devices.devices() {
        if let Some(i) = node.card_by_uuid(&d.uuid) {
            if add {
                node.usage[i].add(d.mem_mib, d.cores);
            } else {
                node.usage[i].sub(d.mem_mib, d.cores);
            }
        }
    }
}
