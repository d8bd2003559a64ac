//! The scheduler's book of nodes and reservations. Pure: the extender wraps it in a lock and feeds
//! it from the watchers, `simulate` feeds it from a file, and the property tests drive it directly.
//! Usage on a card is always the sum of what each placement recorded on it books, so replaying the
//! pods' annotations after a restart rebuilds exactly the same book.
//!
//! What a placement books is bounded by what its pod's spec asked (see [`Ask`]): a device list
//! written by someone else (`hami.io/*` annotations are writable by whoever can patch the pod)
//! can never book more cards, MiB or cores than the spec requests, nor wrap a card's usage.

use super::candidates::NodeNames;
use super::fit::NodeFit;
use super::node::{CardUsage, NodeState};
use super::request::{ContainerRequest, DefaultMemory, MemRequest, PodRequest};
use super::{choose, Config, Decision};
use std::cell::RefCell;
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
    /// How many of the containers (first in `devices`) are init containers.
    pub init: usize,
    /// What the pod's spec asked, container by container: the most each may book.
    pub asked: Vec<Ask>,
}

#[cfg(test)]
impl Placement {
    /// A placement whose spec asked exactly what `devices` hold (no init containers).
    pub fn as_asked(pod: &str, node: &str, devices: PodDevices) -> Self {
        let asked = devices
            .0
            .iter()
            .map(|c| Ask {
                gpus: c.len() as u32,
                mem: MemCap::MiB(c.iter().map(|d| d.mem_mib).max().unwrap_or(0)),
                cores: c.iter().map(|d| d.cores).max().unwrap_or(0),
            })
            .collect();
        Placement {
            pod: pod.into(),
            node: node.into(),
            devices,
            init: 0,
            asked,
        }
    }
}

/// The most one container may book: cards, MiB per card and cores per card, from its spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub gpus: u32,
    pub mem: MemCap,
    pub cores: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemCap {
    MiB(u64),
    /// Of the card the device is on.
    Percent(u32),
}

impl Ask {
    pub fn new(c: &ContainerRequest, default: DefaultMemory) -> Self {
        let mem = match (c.mem, default) {
            (MemRequest::MiB(m), _) | (MemRequest::Default, DefaultMemory::MiB(m)) => {
                MemCap::MiB(m)
            }
            (MemRequest::Percent(p), _) | (MemRequest::Default, DefaultMemory::Percent(p)) => {
                MemCap::Percent(p)
            }
        };
        Ask {
            gpus: c.gpus,
            mem,
            cores: c.cores,
        }
    }

    /// Every container of `req`, in pod order.
    pub fn all(req: &PodRequest, default: DefaultMemory) -> Vec<Ask> {
        req.containers
            .iter()
            .map(|c| Ask::new(c, default))
            .collect()
    }

    fn mem_on(&self, card_mem: u64) -> u64 {
        match self.mem {
            MemCap::MiB(m) => m,
            MemCap::Percent(p) => MemRequest::Percent(p).resolve(card_mem, DefaultMemory::MiB(0)),
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Nodes in slots that stay put while the node exists, so a candidate list can be resolved
    /// to slots once and reused (kube-scheduler sends the same list of thousands of names on
    /// every filter, and hashing each name was a fifth of a filter's time).
    slots: Vec<Option<NodeState>>,
    index: HashMap<String, usize>,
    free: Vec<usize>,
    /// Bumped whenever a name gets or loses a slot: resolved lists from before are stale.
    generation: u64,
    memo: RefCell<CandidateMemo>,
    /// The devices and cordoned UUIDs each node was registered with, to skip rebuilding when
    /// nothing changed.
    registered: HashMap<String, (Vec<DeviceInfo>, Vec<String>)>,
    pods: HashMap<String, Placement>,
    by_node: HashMap<String, HashSet<String>>,
}

/// The last candidate list and the slots its names resolved to.
#[derive(Debug, Default, Clone)]
struct CandidateMemo {
    generation: u64,
    /// The caller's name for `names` (see [`Ledger::place_names_listed`]).
    list_id: Option<u64>,
    names: NodeNames,
    slots: Vec<Option<usize>>,
}

/// A candidate list as filter has it (one buffer, compared in two `memcmp`s, or not at all when
/// the caller names the list) or as a slice.
enum Candidates<'a, S> {
    Names(&'a NodeNames, Option<u64>),
    List(&'a [S]),
}

impl<S: AsRef<str>> Candidates<'_, S> {
    fn len(&self) -> usize {
        match self {
            Candidates::Names(n, _) => n.len(),
            Candidates::List(l) => l.len(),
        }
    }

    fn get(&self, i: usize) -> &str {
        match self {
            Candidates::Names(n, _) => n.get(i),
            Candidates::List(l) => l[i].as_ref(),
        }
    }

    fn same_as(&self, memo: &CandidateMemo) -> bool {
        let memo_id = memo.list_id;
        let memo = &memo.names;
        match self {
            Candidates::Names(_, Some(id)) if memo_id == Some(*id) => true,
            Candidates::Names(n, _) => *n == memo,
            Candidates::List(l) => {
                l.len() == memo.len() && l.iter().zip(memo.iter()).all(|(a, b)| a.as_ref() == b)
            }
        }
    }
}

impl Ledger {
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.index.get(name).and_then(|&i| self.slots[i].as_ref())
    }

    fn node_mut(&mut self, name: &str) -> Option<&mut NodeState> {
        let i = *self.index.get(name)?;
        self.slots[i].as_mut()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeState> {
        self.slots.iter().flatten()
    }

    pub fn node_count(&self) -> usize {
        self.index.len()
    }

    fn insert_node(&mut self, node: NodeState) {
        if let Some(&i) = self.index.get(&node.name) {
            self.slots[i] = Some(node);
            return;
        }
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.index.insert(node.name.clone(), i);
        self.slots[i] = Some(node);
        self.generation += 1;
    }

    /// Runs `f` with the slot of each candidate, resolving the list by hashing only when it
    /// differs from the previous one.
    fn with_slots<S: AsRef<str>, R>(
        &self,
        candidates: Candidates<'_, S>,
        f: impl FnOnce(&[Option<usize>]) -> R,
    ) -> R {
        let mut memo = self.memo.borrow_mut();
        if memo.generation != self.generation || !candidates.same_as(&memo) {
            memo.generation = self.generation;
            memo.names = (0..candidates.len()).map(|i| candidates.get(i)).collect();
            memo.slots = (0..candidates.len())
                .map(|i| self.index.get(candidates.get(i)).copied())
                .collect();
        }
        memo.list_id = match candidates {
            Candidates::Names(_, id) => id,
            Candidates::List(_) => None,
        };
        f(&memo.slots)
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
        self.upsert_node_cordoned(name, devices, Vec::new());
    }

    /// As [`Ledger::upsert_node`], with the UUIDs of the node's `hami.io/device-cordon`.
    pub fn upsert_node_cordoned(
        &mut self,
        name: &str,
        devices: Vec<DeviceInfo>,
        cordoned: Vec<String>,
    ) {
        if self
            .registered
            .get(name)
            .is_some_and(|(d, c)| *d == devices && *c == cordoned)
        {
            return;
        }
        let mut node = NodeState::with_cordon(name, &devices, &cordoned);
        if let Some(uids) = self.by_node.get(name) {
            for uid in uids {
                if let Some(p) = self.pods.get(uid) {
                    apply(&mut node, p, true);
                }
            }
        }
        self.insert_node(node);
        self.registered
            .insert(name.to_string(), (devices, cordoned));
    }

    /// Forgets a node's cards but keeps its pods' records, so the node coming back restores them.
    pub fn remove_node(&mut self, name: &str) {
        if let Some(i) = self.index.remove(name) {
            self.slots[i] = None;
            self.free.push(i);
            self.generation += 1;
        }
        self.registered.remove(name);
    }

    /// Records where a pod's vGPUs are. Recording the same placement again changes nothing;
    /// a different one replaces the old.
    pub fn record(&mut self, uid: &str, placement: Placement) {
        if self.pods.get(uid) == Some(&placement) {
            return;
        }
        self.release(uid);
        let node_name = placement.node.clone();
        if let Some(node) = self.node_mut(&node_name) {
            apply(node, &placement, true);
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
        let node_name = old.node.clone();
        if let Some(node) = self.node_mut(&node_name) {
            apply(node, &old, false);
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
        self.decide_among(Candidates::List(candidates), req, cfg)
    }

    fn decide_among<S: AsRef<str>>(
        &self,
        candidates: Candidates<'_, S>,
        req: &PodRequest,
        cfg: &Config,
    ) -> Decision {
        self.with_slots(candidates, |slots| {
            choose(
                slots.len(),
                |i| slots[i].and_then(|s| self.slots[s].as_ref()),
                req,
                cfg,
            )
        })
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
        self.place_among(uid, pod, Candidates::List(candidates), req, cfg)
    }

    /// [`Ledger::place`] over the names as filter reads them.
    pub fn place_names(
        &mut self,
        uid: &str,
        pod: &str,
        candidates: &NodeNames,
        req: &PodRequest,
        cfg: &Config,
    ) -> Decision {
        self.place_among::<&str>(uid, pod, Candidates::Names(candidates, None), req, cfg)
    }

    /// [`Ledger::place_names`] for a list the caller names with `list_id`: a later call with the
    /// same id promises the same names in the same order, so the list is not compared again.
    pub fn place_names_listed(
        &mut self,
        uid: &str,
        pod: &str,
        candidates: &NodeNames,
        list_id: u64,
        req: &PodRequest,
        cfg: &Config,
    ) -> Decision {
        let c = Candidates::Names(candidates, Some(list_id));
        self.place_among::<&str>(uid, pod, c, req, cfg)
    }

    fn place_among<S: AsRef<str>>(
        &mut self,
        uid: &str,
        pod: &str,
        candidates: Candidates<'_, S>,
        req: &PodRequest,
        cfg: &Config,
    ) -> Decision {
        self.release(uid);
        let decision = self.decide_among(candidates_ref(&candidates), req, cfg);
        if let Some((i, fit, _)) = &decision.chosen {
            let node = candidates.get(*i).to_string();
            let devices = self.devices_for(&node, fit);
            self.record(
                uid,
                Placement {
                    pod: pod.to_string(),
                    node,
                    devices,
                    init: req.init,
                    asked: Ask::all(req, cfg.default_memory),
                },
            );
        }
        decision
    }

    fn devices_for(&self, node: &str, fit: &NodeFit) -> PodDevices {
        fit.devices(self.node(node).expect("the chosen node is in the ledger"))
    }
}

fn candidates_ref<'a, S>(c: &Candidates<'a, S>) -> Candidates<'a, S> {
    match c {
        Candidates::Names(n, id) => Candidates::Names(n, *id),
        Candidates::List(l) => Candidates::List(l),
    }
}

fn apply(node: &mut NodeState, p: &Placement, add: bool) {
    for (card, u) in booking(node, p) {
        if add {
            node.usage[card].add_usage(u);
        } else {
            node.usage[card].sub_usage(u);
        }
    }
    node.refresh();
}

/// What `p` books on each card of `node`: per card, the larger of the busiest init container
/// and the sum of the app containers (HAMi v2.10's peak rule), each device clamped to what its
/// container asked and to the card, devices beyond the ask and on unknown cards dropped.
pub fn booking(node: &NodeState, p: &Placement) -> Vec<(usize, CardUsage)> {
    let mut init_peak: Vec<(usize, CardUsage)> = Vec::new();
    let mut app: Vec<(usize, CardUsage)> = Vec::new();
    let mut clamped = false;
    for (ci, devices) in p.devices.0.iter().enumerate() {
        let Some(ask) = p.asked.get(ci) else {
            clamped |= !devices.is_empty();
            continue;
        };
        let mut taken = 0u32;
        for d in devices {
            let Some(card) = node.card_by_uuid(&d.uuid) else {
                continue;
            };
            if taken >= ask.gpus {
                clamped = true;
                break;
            }
            taken += 1;
            let c = &node.cards[card];
            let mem_cap = ask.mem_on(c.mem_mib).min(c.mem_mib);
            let cores_cap = ask.cores.min(c.cores);
            clamped |= d.mem_mib > mem_cap || d.cores > cores_cap;
            let u = CardUsage {
                slots: 1,
                mem_mib: d.mem_mib.min(mem_cap),
                cores: d.cores.min(cores_cap),
            };
            let (list, is_init) = if ci < p.init {
                (&mut init_peak, true)
            } else {
                (&mut app, false)
            };
            match list.iter_mut().find(|(i, _)| *i == card) {
                Some((_, acc)) if is_init => *acc = acc.max(u),
                Some((_, acc)) => acc.add_usage(u),
                None => list.push((card, u)),
            }
        }
    }
    if clamped {
        tracing::warn!(pod = %p.pod, node = %p.node, "the pod's device annotation claims more than its spec asks; booking only what the spec asks");
    }
    for (card, u) in init_peak {
        match app.iter_mut().find(|(i, _)| *i == card) {
            Some((_, acc)) => *acc = acc.max(u),
            None => app.push((card, u)),
        }
    }
    app
}
