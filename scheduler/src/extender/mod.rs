//! The scheduler extender: filter reserves in memory, bind writes HAMi's annotations and binds.
//!
//! Filter makes no API call: it chooses and reserves under one lock, so concurrent filters never
//! pick the same free capacity twice, and returns only the chosen node. Bind writes every HAMi
//! annotation in one patch and then creates the Binding. There is no node lock (HAMi's
//! `hami.io/mutex.lock` serialised every pod of a node behind the agent, #1367, #1130): the
//! reservation in the ledger already keeps capacity from being given twice, and a crashed
//! scheduler leaves nothing behind that blocks a node.

pub mod http;
pub mod wire;

use crate::events;
use crate::kubeapi::{ClusterApi, PodEvent, PodRef};
use crate::placement::ledger::{Ledger, Placement};
use crate::placement::reason::{FitReason, NodeMiss};
use crate::placement::Config;
use crate::podspec;
use crate::watch::Readiness;
use crate::webhook::ClusterLimits;
use k8s_openapi::api::core::v1::Pod;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use vgpu_contract::annotations as ann;
use vgpu_contract::register;
use wire::{
    ExtenderArgs, ExtenderBindingArgs, ExtenderBindingResult, ExtenderFilterResult, NodeList,
};

/// A reservation made at filter and not yet bound.
#[derive(Debug, Clone)]
struct Pending {
    since: Instant,
    vgpu_time: u64,
    binding: bool,
}

#[derive(Default)]
struct State {
    ledger: Ledger,
    pending: HashMap<String, Pending>,
}

pub struct Extender<A> {
    state: Mutex<State>,
    cfg: Config,
    api: A,
    events: mpsc::UnboundedSender<PodEvent>,
    /// Set when watchers feed the ledger: filter refuses until they have listed everything.
    readiness: Option<Arc<Readiness>>,
    /// How long a reservation waits for its bind before it is given back (kube-scheduler may
    /// drop a pod between filter and bind, e.g. when a later plugin rejects it).
    pub reservation_ttl: Duration,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn pod_ref(pod: &Pod) -> PodRef {
    PodRef {
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: podspec::pod_uid(pod),
    }
}

/// Reasons preemption cannot cure: evicting pods frees no card of the wrong type.
fn unresolvable(miss: &NodeMiss) -> bool {
    miss.reasons().all(|r| {
        matches!(
            r,
            FitReason::CardNotHealth
                | FitReason::CardTypeMismatch
                | FitReason::CardUuidMismatch
                | FitReason::NodeInsufficientDevice
                | FitReason::NodeUnregistered
        )
    })
}

impl<A: ClusterApi> Extender<A> {
    /// Events go to `events`; [`spawn_event_writer`] drains them to the API off the hot path.
    pub fn new(cfg: Config, api: A, events: mpsc::UnboundedSender<PodEvent>) -> Self {
        Extender {
            state: Mutex::new(State::default()),
            cfg,
            api,
            events,
            readiness: None,
            reservation_ttl: Duration::from_secs(120),
        }
    }

    pub fn with_readiness(mut self, r: Arc<Readiness>) -> Self {
        self.readiness = Some(r);
        self
    }

    pub fn is_ready(&self) -> bool {
        self.readiness.as_ref().is_none_or(|r| r.is_ready())
    }

    /// The largest card and the most cards on one node, for the webhook's size checks.
    pub fn cluster_limits(&self) -> ClusterLimits {
        let st = self.state.lock().unwrap();
        let mut l = ClusterLimits::default();
        for n in st.ledger.nodes() {
            let healthy = n.cards.iter().filter(|c| c.healthy);
            l.max_cards_per_node = l
                .max_cards_per_node
                .max(Some(healthy.clone().count() as u32));
            l.max_card_mem_mib = l.max_card_mem_mib.max(healthy.map(|c| c.mem_mib).max());
        }
        l
    }

    pub fn api(&self) -> &A {
        &self.api
    }

    fn emit(&self, pod: &PodRef, kind: &'static str, reason: &'static str, message: String) {
        // A closed channel only means nobody records events (tests, simulate): not an error.
        let _ = self.events.send(PodEvent {
            pod: pod.clone(),
            kind,
            reason,
            message,
        });
    }

    /// Runs `f` on the ledger under the lock (for watchers, tests and the benchmark).
    pub fn with_ledger<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> R {
        f(&mut self.state.lock().unwrap().ledger)
    }

    pub fn filter(&self, args: ExtenderArgs) -> ExtenderFilterResult {
        let pod = pod_ref(&args.pod);
        let key = format!("{}/{}", pod.namespace, pod.name);
        if !self.is_ready() {
            return ExtenderFilterResult {
                error: "vgpu-scheduler is still listing nodes and pods from the API server; kube-scheduler will retry".into(),
                ..Default::default()
            };
        }
        let ExtenderArgs {
            pod: pod_obj,
            nodes,
            nodenames,
        } = args;
        let (names, node_objects) = match (nodenames, nodes.as_ref()) {
            (Some(names), _) => (names, None),
            (None, Some(list)) => (
                list.items
                    .iter()
                    .map(|n| {
                        n.pointer("/metadata/name")
                            .and_then(|v| v.as_str())
                            .unwrap_or("")
                            .to_string()
                    })
                    .collect(),
                Some(list),
            ),
            (None, None) => {
                return ExtenderFilterResult {
                    error: "the request carries neither nodes nor nodenames".into(),
                    ..Default::default()
                };
            }
        };
        let pass_through = |names: Vec<String>| match node_objects {
            Some(list) => ExtenderFilterResult {
                nodes: Some(list.clone()),
                ..Default::default()
            },
            None => ExtenderFilterResult {
                nodenames: Some(names),
                ..Default::default()
            },
        };
        let req = match podspec::pod_request(&pod_obj) {
            Ok(Some(r)) => r,
            Ok(None) => return pass_through(names),
            Err(e) => {
                self.emit(&pod, "Warning", events::FILTERING_FAILED, e.0.clone());
                return ExtenderFilterResult {
                    error: format!("pod {key}: {e}"),
                    ..Default::default()
                };
            }
        };

        let (decision, devices) = {
            let mut st = self.state.lock().unwrap();
            self.expire(&mut st);
            if let Some(list) = node_objects {
                refresh_nodes(&mut st.ledger, list);
            }
            let d = st.ledger.place(&pod.uid, &key, &names, &req, &self.cfg);
            match &d.chosen {
                Some(_) => {
                    st.pending.insert(
                        pod.uid.clone(),
                        Pending {
                            since: Instant::now(),
                            vgpu_time: unix_now(),
                            binding: false,
                        },
                    );
                }
                None => {
                    st.pending.remove(&pod.uid);
                }
            }
            let devices = st.ledger.placement(&pod.uid).map(|p| p.devices.encode());
            (d, devices)
        };

        let mut out = ExtenderFilterResult::default();
        for (i, miss) in &decision.misses {
            let target = if unresolvable(miss) {
                &mut out.failed_and_unresolvable_nodes
            } else {
                &mut out.failed_nodes
            };
            target.insert(names[*i].clone(), miss.to_string());
        }
        match decision.chosen {
            Some((i, _, _)) => {
                let chosen = names[i].clone();
                tracing::debug!(pod = %key, node = %chosen, devices = ?devices, "filter reserved");
                let msg = events::filtering_succeed(
                    &chosen,
                    decision.misses.len(),
                    decision.fits.iter().map(|(j, s)| (names[*j].as_str(), *s)),
                );
                self.emit(&pod, "Normal", events::FILTERING_SUCCEED, msg);
                match node_objects {
                    Some(list) => {
                        out.nodes = Some(NodeList {
                            metadata: list.metadata.clone(),
                            items: vec![list.items[i].clone()],
                        })
                    }
                    None => out.nodenames = Some(vec![chosen]),
                }
            }
            None => {
                let (head, lines) = events::filtering_failed(
                    decision.misses.iter().map(|(i, m)| (names[*i].as_str(), m)),
                );
                tracing::info!(pod = %key, "{head}: {}", lines.join("; "));
                self.emit(&pod, "Warning", events::FILTERING_FAILED, head);
                for line in lines {
                    self.emit(&pod, "Warning", events::FILTERING_FAILED, line);
                }
                match node_objects {
                    Some(list) => {
                        out.nodes = Some(NodeList {
                            metadata: list.metadata.clone(),
                            items: vec![],
                        })
                    }
                    None => out.nodenames = Some(vec![]),
                }
            }
        }
        out
    }

    pub async fn bind(&self, args: ExtenderBindingArgs) -> ExtenderBindingResult {
        let pod = PodRef {
            namespace: args.pod_namespace.clone(),
            name: args.pod_name.clone(),
            uid: args.pod_uid.clone(),
        };
        let key = format!("{}/{}", pod.namespace, pod.name);
        let fail = |msg: String| {
            self.emit(&pod, "Warning", events::BINDING_FAILED, msg.clone());
            ExtenderBindingResult { error: msg }
        };
        let (devices, vgpu_time) = {
            let mut st = self.state.lock().unwrap();
            let Some(placement) = st.ledger.placement(&pod.uid).cloned() else {
                return fail(format!(
                    "pod {key} ({}) has no vGPU reservation: it was not filtered by this scheduler or the reservation expired; kube-scheduler will retry",
                    pod.uid
                ));
            };
            if placement.node != args.node {
                return fail(format!(
                    "pod {key} is reserved on node {}, not {}: filter it again",
                    placement.node, args.node
                ));
            }
            let vgpu_time = match st.pending.get_mut(&pod.uid) {
                Some(p) => {
                    p.binding = true;
                    p.vgpu_time
                }
                // Already bound: an idempotent retry writes the same annotations again.
                None => unix_now(),
            };
            (placement.devices.encode(), vgpu_time)
        };

        let annotations = BTreeMap::from([
            (ann::VGPU_NODE.to_string(), args.node.clone()),
            (ann::VGPU_TIME.to_string(), vgpu_time.to_string()),
            (ann::DEVICES_TO_ALLOCATE.to_string(), devices),
            (
                ann::BIND_PHASE.to_string(),
                ann::BindPhase::Allocating.as_str().to_string(),
            ),
            (ann::BIND_TIME.to_string(), unix_now().to_string()),
        ]);
        let result = match self
            .api
            .annotate_pod(&pod, annotations, Some(&args.node))
            .await
        {
            Err(e) => Err((
                format!("pod {key}: writing the vGPU annotations failed: {e}"),
                false,
            )),
            Ok(()) => self.api.bind_pod(&pod, &args.node).await.map_err(|e| {
                (
                    format!("pod {key}: binding to node {} failed: {e}", args.node),
                    true,
                )
            }),
        };
        match result {
            Ok(()) => {
                self.state.lock().unwrap().pending.remove(&pod.uid);
                self.emit(
                    &pod,
                    "Normal",
                    events::BINDING_SUCCEED,
                    events::binding_succeed(&args.node, &key),
                );
                ExtenderBindingResult::default()
            }
            Err((msg, annotated)) => {
                {
                    let mut st = self.state.lock().unwrap();
                    st.pending.remove(&pod.uid);
                    st.ledger.release(&pod.uid);
                }
                if annotated {
                    let phase = BTreeMap::from([(
                        ann::BIND_PHASE.to_string(),
                        ann::BindPhase::Failed.as_str().to_string(),
                    )]);
                    if let Err(e) = self.api.annotate_pod(&pod, phase, None).await {
                        tracing::warn!(pod = %key, "could not mark bind-phase failed: {e}");
                    }
                }
                fail(msg)
            }
        }
    }

    /// Gives back reservations whose bind never came.
    fn expire(&self, st: &mut State) {
        let ttl = self.reservation_ttl;
        let stale: Vec<String> = st
            .pending
            .iter()
            .filter(|(_, p)| !p.binding && p.since.elapsed() > ttl)
            .map(|(u, _)| u.clone())
            .collect();
        for uid in stale {
            st.pending.remove(&uid);
            if let Some(p) = st.ledger.release(&uid) {
                tracing::info!(pod = %p.pod, node = %p.node, "reservation expired without a bind");
            }
        }
    }

    // ---- fed by the watchers ----

    pub fn node_applied(&self, node: &k8s_openapi::api::core::v1::Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut st = self.state.lock().unwrap();
        match podspec::node_devices(node) {
            Ok(Some(devices)) => st.ledger.upsert_node(&name, devices),
            Ok(None) => st.ledger.remove_node(&name),
            Err(e) => {
                tracing::warn!(node = %name, "ignoring the node's GPUs: {e}");
                st.ledger.remove_node(&name);
            }
        }
    }

    /// After a (re)list: forgets nodes the API no longer has.
    pub fn nodes_resynced(&self, seen: &HashSet<String>) {
        let mut st = self.state.lock().unwrap();
        let gone: Vec<String> = st
            .ledger
            .nodes()
            .map(|n| n.name.clone())
            .filter(|n| !seen.contains(n))
            .collect();
        for n in gone {
            st.ledger.remove_node(&n);
        }
    }

    pub fn node_deleted(&self, name: &str) {
        self.state.lock().unwrap().ledger.remove_node(name);
    }

    /// Records a pod's placement from its annotations, or releases it once it has finished.
    /// A pod without annotations leaves a pending reservation alone: the bind that writes them
    /// may still be on its way.
    pub fn pod_applied(&self, pod: &Pod) {
        let uid = podspec::pod_uid(pod);
        let placement = match podspec::pod_placement(pod) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(pod = %podspec::pod_key(pod), "ignoring unreadable device annotation: {e}");
                None
            }
        };
        let mut st = self.state.lock().unwrap();
        match placement {
            Some(p) => {
                st.pending.remove(&uid);
                st.ledger.record(&uid, p);
            }
            None if podspec::pod_finished(pod) => {
                st.pending.remove(&uid);
                st.ledger.release(&uid);
            }
            None => {}
        }
    }

    pub fn pod_deleted(&self, uid: &str) {
        let mut st = self.state.lock().unwrap();
        st.pending.remove(uid);
        st.ledger.release(uid);
    }

    /// After a (re)list: drops recorded pods the API no longer has, keeping pending reservations.
    pub fn pods_resynced(&self, seen: &HashSet<String>) {
        let mut st = self.state.lock().unwrap();
        let gone: Vec<String> = st
            .ledger
            .placements()
            .map(|(u, _)| u.clone())
            .filter(|u| !seen.contains(u) && !st.pending.contains_key(u))
            .collect();
        for uid in gone {
            st.ledger.release(&uid);
        }
    }

    pub fn placement(&self, uid: &str) -> Option<Placement> {
        self.state.lock().unwrap().ledger.placement(uid).cloned()
    }
}

/// In `nodes` mode kube-scheduler sends the Node objects: their register annotations are as fresh
/// as anything the watcher has, so they refresh the ledger (unchanged ones cost a compare).
fn refresh_nodes(ledger: &mut Ledger, list: &NodeList) {
    for n in &list.items {
        let Some(name) = n.pointer("/metadata/name").and_then(|v| v.as_str()) else {
            continue;
        };
        let Some(text) = n
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(ann::NODE_REGISTER))
            .and_then(|v| v.as_str())
        else {
            continue;
        };
        match register::decode(text) {
            Ok(devices) => ledger.upsert_node(name, devices),
            Err(e) => tracing::warn!(node = %name, "ignoring the node's GPUs: {e}"),
        }
    }
}

/// Drops an event identical to one recorded for the same pod within `window`: kube-scheduler
/// retries a pod that fits nowhere every few seconds, and each retry would otherwise create the
/// same Event objects again.
pub struct EventDedup {
    window: Duration,
    seen: HashMap<(String, &'static str, String), Instant>,
}

impl EventDedup {
    pub fn new(window: Duration) -> Self {
        EventDedup {
            window,
            seen: HashMap::new(),
        }
    }

    pub fn admit(&mut self, e: &PodEvent, now: Instant) -> bool {
        let window = self.window;
        if self.seen.len() > 10_000 {
            self.seen.retain(|_, t| now.duration_since(*t) < window);
        }
        let key = (e.pod.uid.clone(), e.reason, e.message.clone());
        match self.seen.get(&key) {
            Some(t) if now.duration_since(*t) < window => false,
            _ => {
                self.seen.insert(key, now);
                true
            }
        }
    }
}

/// Writes queued events to the API in the background, so filter and bind never wait on them.
pub fn spawn_event_writer<A: ClusterApi + Clone>(
    api: A,
    mut rx: mpsc::UnboundedReceiver<PodEvent>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut dedup = EventDedup::new(Duration::from_secs(60));
        while let Some(e) = rx.recv().await {
            if !dedup.admit(&e, Instant::now()) {
                continue;
            }
            let (reason, pod) = (e.reason, format!("{}/{}", e.pod.namespace, e.pod.name));
            if let Err(err) = api.record_event(e).await {
                tracing::warn!(%pod, reason, "recording the event failed: {err}");
            }
        }
    })
}

#[cfg(test)]
mod tests;
