//! Feeding the extender's ledger from the API server with kube-rs reflectors: nodes (their
//! register annotations) and the pods we placed (labelled `hami.io/vgpu-node` at bind, as HAMi
//! labels them, so other pods are never listed or kept in memory). A relist after a restart or a
//! lost watch replays every pod's annotations, which rebuilds the book exactly.

use crate::extender::Extender;
use crate::kubeapi::ClusterApi;
use crate::podspec;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use vgpu_contract::annotations as ann;

/// Counts the watchers that finished their first list; filter waits for both, since a filter
/// before the pods are known could give away capacity that running pods hold.
#[derive(Default)]
pub struct Readiness(AtomicU8);

impl Readiness {
    pub const WATCHERS: u8 = 2;

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire) >= Self::WATCHERS
    }

    fn synced(&self, first: &mut bool) {
        if std::mem::take(first) {
            self.0.fetch_add(1, Ordering::AcqRel);
        }
    }
}

pub struct Watchers {
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
}

/// Applies one node event to the extender; `seen` collects names during a relist.
pub fn on_node_event<A: ClusterApi>(
    ext: &Extender<A>,
    ev: &Event<Node>,
    seen: &mut HashSet<String>,
) -> bool {
    match ev {
        Event::Init => seen.clear(),
        Event::InitApply(n) => {
            seen.insert(n.metadata.name.clone().unwrap_or_default());
            ext.node_applied(n);
        }
        Event::Apply(n) => ext.node_applied(n),
        Event::Delete(n) => ext.node_deleted(n.metadata.name.as_deref().unwrap_or_default()),
        Event::InitDone => {
            ext.nodes_resynced(seen);
            return true;
        }
    }
    false
}

/// Applies one pod event to the extender; `seen` collects UIDs during a relist.
pub fn on_pod_event<A: ClusterApi>(
    ext: &Extender<A>,
    ev: &Event<Pod>,
    seen: &mut HashSet<String>,
) -> bool {
    match ev {
        Event::Init => seen.clear(),
        Event::InitApply(p) => {
            seen.insert(podspec::pod_uid(p));
            ext.pod_applied(p);
        }
        Event::Apply(p) => ext.pod_applied(p),
        Event::Delete(p) => ext.pod_deleted(&podspec::pod_uid(p)),
        Event::InitDone => {
            ext.pods_resynced(seen);
            return true;
        }
    }
    false
}

pub fn spawn<A: ClusterApi>(
    client: Client,
    ext: Arc<Extender<A>>,
    ready: Arc<Readiness>,
) -> Watchers {
    let (nodes, node_writer) = reflector::store::<Node>();
    let node_stream = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            // The store keeps only what placement reads: a node's image list and managed
            // fields can be tens of KiB each, times thousands of nodes.
            .modify(|n: &mut Node| {
                n.metadata.managed_fields = None;
                n.status = None;
            }),
    );
    let (e, r) = (ext.clone(), ready.clone());
    tokio::spawn(async move {
        let (mut seen, mut first) = (HashSet::new(), true);
        let mut s = std::pin::pin!(node_stream);
        while let Some(ev) = s.next().await {
            match ev {
                Ok(ev) => {
                    if on_node_event(&e, &ev, &mut seen) {
                        r.synced(&mut first);
                    }
                }
                Err(err) => tracing::warn!("node watch: {err}"),
            }
        }
    });

    let (pods, pod_writer) = reflector::store::<Pod>();
    let cfg = watcher::Config::default().labels(ann::VGPU_NODE);
    let pod_stream = reflector::reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client), cfg)
            .default_backoff()
            .modify(|p: &mut Pod| p.metadata.managed_fields = None),
    );
    tokio::spawn(async move {
        let (mut seen, mut first) = (HashSet::new(), true);
        let mut s = std::pin::pin!(pod_stream);
        while let Some(ev) = s.next().await {
            match ev {
                Ok(ev) => {
                    if on_pod_event(&ext, &ev, &mut seen) {
                        ready.synced(&mut first);
                    }
                }
                Err(err) => tracing::warn!("pod watch: {err}"),
            }
        }
    });
    Watchers { nodes, pods }
}
