//! What the watchers feed in: nodes' registrations and placed pods' annotations.

use super::Extender;
use crate::kubeapi::ClusterApi;
use crate::placement::ledger::Placement;
use crate::podspec;
use k8s_openapi::api::core::v1::Pod;
use std::collections::HashSet;

impl<A: ClusterApi> Extender<A> {
    pub fn node_applied(&self, node: &k8s_openapi::api::core::v1::Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut st = self.state.lock().unwrap();
        match podspec::node_devices(node) {
            Ok(Some(devices)) => {
                st.ledger
                    .upsert_node_cordoned(&name, devices, podspec::node_cordoned(node))
            }
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
        let placement = match podspec::pod_placement(
            pod,
            self.cfg.default_memory,
            self.cfg.default_cores,
        ) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(pod = %podspec::pod_key(pod), "ignoring the pod's device annotation: {e}");
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
