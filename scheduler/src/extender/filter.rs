//! Filter: choose a node and cards for the pod and reserve them, in one step under the lock.

use super::wire::{ExtenderArgs, ExtenderFilterResult, NodeList, NodeNames};
use super::{pod_ref, unix_now, Extender, Pending, State};
use crate::events;
use crate::kubeapi::ClusterApi;
use crate::placement::ledger::Ledger;
use crate::placement::reason::{FitReason, NodeMiss};
use crate::placement::request::CardFilter;
use crate::podspec;
use std::time::{Duration, Instant};
use vgpu_contract::annotations as ann;
use vgpu_contract::register;

/// Reasons preemption cannot cure: evicting pods frees no card of the wrong type.
fn unresolvable(miss: &NodeMiss) -> bool {
    miss.reasons().all(|r| {
        matches!(
            r,
            FitReason::CardNotHealth
                | FitReason::CardCordoned
                | FitReason::CardTypeMismatch
                | FitReason::CardUuidMismatch
                | FitReason::NodeInsufficientDevice
                | FitReason::NodeUnregistered
        )
    })
}

impl<A: ClusterApi> Extender<A> {
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
        let (names, node_objects): (NodeNames, _) = match (nodenames, nodes.as_ref()) {
            (Some(names), _) => (names, None),
            (None, Some(list)) => (
                list.items
                    .iter()
                    .map(|n| {
                        n.pointer("/metadata/name")
                            .and_then(|v| v.as_str())
                            .unwrap_or("")
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
        let pass_through = |names: NodeNames| match node_objects {
            Some(list) => ExtenderFilterResult {
                nodes: Some(list.clone()),
                ..Default::default()
            },
            None => ExtenderFilterResult {
                nodenames: Some(names.iter().map(str::to_string).collect()),
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
            // A pod this scheduler has bound (or is binding) keeps its placement. A second filter comes from
            // a copy of the pod older than its binding (a retry after a lost answer, a watch that lags):
            // placing it again would rewrite the annotations the node agent serves from.
            let committed = st
                .ledger
                .placement(&pod.uid)
                .filter(|_| st.pending.get(&pod.uid).is_none_or(|p| p.binding))
                .map(|p| p.node.clone());
            if let Some(node) = committed {
                return held_on(&node, &key, &names, node_objects);
            }
            let d = st
                .ledger
                .place_names(&pod.uid, &key, &names, &req, &self.cfg);
            match &d.chosen {
                Some(_) => {
                    st.pending.insert(
                        pod.uid.clone(),
                        Pending {
                            since: Instant::now(),
                            vgpu_time: unix_now(),
                            binding: false,
                            bound: false,
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
        // Thousands of nodes can miss for the same reasons (every T4 for an A100-only pod):
        // each distinct text is built once.
        let mut texts: Vec<(&NodeMiss, String, bool)> = Vec::new();
        for (i, miss) in &decision.misses {
            let (text, unresolvable) = match texts.iter().find(|(m, _, _)| *m == miss) {
                Some((_, t, u)) => (t.clone(), *u),
                None => {
                    let t = miss.to_string();
                    let u = unresolvable(miss);
                    texts.push((miss, t.clone(), u));
                    (t, u)
                }
            };
            let target = if unresolvable {
                &mut out.failed_and_unresolvable_nodes
            } else {
                &mut out.failed_nodes
            };
            target.insert(names.get(*i).to_string(), text);
        }
        match decision.chosen {
            Some((i, _, _)) => {
                let chosen = names.get(i).to_string();
                tracing::debug!(pod = %key, node = %chosen, devices = ?devices, "filter reserved");
                let msg = events::filtering_succeed(
                    &chosen,
                    decision.misses.len(),
                    decision.fits.iter().map(|(j, s)| (names.get(*j), *s)),
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
                    decision.misses.iter().map(|(i, m)| (names.get(*i), m)),
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

    /// Gives back reservations whose bind never came.
    fn expire(&self, st: &mut State) {
        let ttl = self.reservation_ttl;
        // At most once a second: pending can hold every pod bound since the watch last caught
        // up, and this runs on every filter.
        let every = ttl.min(Duration::from_secs(1));
        if st.last_sweep.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        st.last_sweep = Some(Instant::now());
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
}

/// The answer for a pod already placed on `node`: that node alone, or none if it is not a candidate.
fn held_on(
    node: &str,
    key: &str,
    names: &NodeNames,
    node_objects: Option<&NodeList>,
) -> ExtenderFilterResult {
    let listed = names.iter().any(|n| n == node);
    if !listed {
        return ExtenderFilterResult {
            error: format!(
                "pod {key} is already placed on node {node}, which is not among the candidates"
            ),
            ..Default::default()
        };
    }
    match node_objects {
        Some(list) => ExtenderFilterResult {
            nodes: Some(NodeList {
                metadata: list.metadata.clone(),
                items: list
                    .items
                    .iter()
                    .filter(|n| n.pointer("/metadata/name").and_then(|v| v.as_str()) == Some(node))
                    .cloned()
                    .collect(),
            }),
            ..Default::default()
        },
        None => ExtenderFilterResult {
            nodenames: Some(vec![node.to_string()]),
            ..Default::default()
        },
    }
}

/// In `nodes` mode kube-scheduler sends the Node objects: their register annotations are as fresh
/// as anything the watcher has, so they refresh the ledger (unchanged ones cost a compare).
fn refresh_nodes(ledger: &mut Ledger, list: &NodeList) {
    for n in &list.items {
        let Some(name) = n.pointer("/metadata/name").and_then(|v| v.as_str()) else {
            continue;
        };
        let annotations = n.pointer("/metadata/annotations");
        let get = |key: &str| {
            annotations
                .and_then(|a| a.get(key))
                .and_then(|v| v.as_str())
        };
        let Some(text) = get(ann::NODE_REGISTER) else {
            continue;
        };
        let cordoned = get(ann::DEVICE_CORDON)
            .map(|v| CardFilter::list(v, false))
            .unwrap_or_default();
        match register::decode(text) {
            Ok(devices) => ledger.upsert_node_cordoned(name, devices, cordoned),
            Err(e) => tracing::warn!(node = %name, "ignoring the node's GPUs: {e}"),
        }
    }
}
