//! The scheduler extender: filter reserves in memory, bind writes HAMi's annotations and binds.
//!
//! Filter makes no API call: it chooses and reserves under one lock, so concurrent filters never
//! pick the same free capacity twice, and returns only the chosen node. Bind writes every HAMi
//! annotation in one patch and then creates the Binding. There is no node lock (HAMi's
//! `hami.io/mutex.lock` serialised every pod of a node behind the agent, #1367, #1130): the
//! reservation in the ledger already keeps capacity from being given twice, and a crashed
//! scheduler leaves nothing behind that blocks a node.

mod bind;
mod event_writer;
mod feed;
mod filter;
pub mod http;
pub mod wire;

pub use event_writer::{spawn_event_writer, EventDedup};

use crate::kubeapi::{ClusterApi, PodEvent, PodRef};
use crate::placement::ledger::Ledger;
use crate::placement::Config;
use crate::podspec;
use crate::watch::Readiness;
use crate::webhook::ClusterLimits;
use k8s_openapi::api::core::v1::Pod;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// A reservation made at filter and not yet bound.
#[derive(Debug, Clone)]
struct Pending {
    since: Instant,
    vgpu_time: u64,
    binding: bool,
    /// The binding was accepted: a repeated bind of the pod is answered as done, with no write.
    bound: bool,
}

#[derive(Default)]
struct State {
    ledger: Ledger,
    /// Reservations the pod watch has not yet shown back with their annotations.
    pending: HashMap<String, Pending>,
    last_sweep: Option<Instant>,
}

pub struct Extender<A> {
    state: Mutex<State>,
    /// The last candidate-name list `filter_json` parsed (apart from the ledger's lock, so
    /// parsing a new list never holds up a bind).
    candidates: Mutex<Option<Arc<filter::Candidates>>>,
    cfg: Config,
    api: A,
    events: mpsc::UnboundedSender<PodEvent>,
    /// Set when watchers feed the ledger: filter refuses until they have listed everything.
    readiness: Option<Arc<Readiness>>,
    /// How long a reservation waits for its bind before it is given back (kube-scheduler may
    /// drop a pod between filter and bind, e.g. when a later plugin rejects it).
    pub reservation_ttl: Duration,
    /// The key bind seals each placement with, so the node agent's Allocate serves only what
    /// this scheduler decided. `serve` requires it; without one (tests, simulate) bind writes no seal.
    seal_key: Option<Arc<[u8]>>,
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

impl<A: ClusterApi> Extender<A> {
    /// Events go to `events`; [`spawn_event_writer`] drains them to the API off the hot path.
    pub fn new(cfg: Config, api: A, events: mpsc::UnboundedSender<PodEvent>) -> Self {
        Extender {
            state: Mutex::new(State::default()),
            candidates: Mutex::new(None),
            cfg,
            api,
            events,
            readiness: None,
            reservation_ttl: Duration::from_secs(120),
            seal_key: None,
        }
    }

    pub fn with_seal_key(mut self, key: Vec<u8>) -> Self {
        self.seal_key = Some(key.into());
        self
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
}

#[cfg(test)]
mod json_tests;
#[cfg(test)]
mod tests;
