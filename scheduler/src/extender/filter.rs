//! Filter: choose a node and cards for the pod and reserve them, in one step under the lock.

use super::wire::{ExtenderArgs, ExtenderArgsRaw, ExtenderFilterResult, NodeList, NodeNames};
use super::{pod_ref, unix_now, Extender, Pending, State};
use crate::events;
use crate::kubeapi::{ClusterApi, PodRef};
use crate::placement::ledger::Ledger;
use crate::placement::reason::{FitReason, NodeMiss};
use crate::placement::request::CardFilter;
use crate::podspec;
use k8s_openapi::api::core::v1::Pod;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vgpu_contract::annotations as ann;
use vgpu_contract::register;

const NOT_READY: &str =
    "vgpu-scheduler is still listing nodes and pods from the API server; kube-scheduler will retry";
const NO_CANDIDATES: &str = "the request carries neither nodes nor nodenames";

/// The last candidate list filter saw: its raw JSON, its names, and each name as a JSON string.
pub(super) struct Candidates {
    /// Unique per parsed list, so the ledger need not compare the names again.
    id: u64,
    raw: Box<str>,
    names: NodeNames,
    quoted: NodeNames,
}

fn error_result(error: String) -> ExtenderFilterResult {
    ExtenderFilterResult {
        error,
        ..Default::default()
    }
}

/// `s` as a JSON string, quotes included.
fn write_quoted(out: &mut String, s: &str) {
    // Node names are DNS names: nothing to escape, but an odd one is still written correctly.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).expect("writing JSON to memory"));
    }
}

fn write_joined<'a>(out: &mut Vec<u8>, items: impl Iterator<Item = &'a str>) {
    for (k, item) in items.enumerate() {
        if k > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item.as_bytes());
    }
}

/// `{"error":"..."}`, as [`ExtenderFilterResult`] serialises with only its error set.
fn write_error(out: &mut Vec<u8>, error: &str) {
    out.extend_from_slice(b"{\"error\":");
    serde_json::to_writer(&mut *out, error).expect("writing JSON to memory");
    out.push(b'}');
}

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

/// What filter decided, before it is written out (as [`ExtenderFilterResult`] or straight as JSON).
enum Outcome {
    Error(String),
    /// The pod asks for no vGPU: every candidate passes.
    PassThrough,
    Decided(Decided),
}

struct Decided {
    /// The chosen candidate's index.
    chosen: Option<usize>,
    /// Each missing candidate's index and the index of its text in `texts`, in candidate order.
    misses: Vec<(usize, u32)>,
    /// The distinct miss texts (thousands of nodes can miss for the same reasons: every T4 for
    /// an A100-only pod, so each text is built once) and whether preemption cannot cure them.
    texts: Vec<(String, bool)>,
}

impl<A: ClusterApi> Extender<A> {
    pub fn filter(&self, args: ExtenderArgs) -> ExtenderFilterResult {
        let pod = pod_ref(&args.pod);
        if !self.is_ready() {
            return error_result(NOT_READY.into());
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
            (None, None) => return error_result(NO_CANDIDATES.into()),
        };
        let d = match self.decide_filter(&pod, &pod_obj, &names, None, node_objects) {
            Outcome::Error(e) => return error_result(e),
            Outcome::PassThrough => {
                return match node_objects {
                    Some(list) => ExtenderFilterResult {
                        nodes: Some(list.clone()),
                        ..Default::default()
                    },
                    None => ExtenderFilterResult {
                        nodenames: Some(names.iter().map(str::to_string).collect()),
                        ..Default::default()
                    },
                }
            }
            Outcome::Decided(d) => d,
        };
        let mut out = ExtenderFilterResult::default();
        for &(i, t) in &d.misses {
            let (text, unresolvable) = &d.texts[t as usize];
            let target = if *unresolvable {
                &mut out.failed_and_unresolvable_nodes
            } else {
                &mut out.failed_nodes
            };
            target.insert(names.get(i).to_string(), text.clone());
        }
        match node_objects {
            Some(list) => {
                out.nodes = Some(NodeList {
                    metadata: list.metadata.clone(),
                    items: d
                        .chosen
                        .map(|i| list.items[i].clone())
                        .into_iter()
                        .collect(),
                })
            }
            None => {
                out.nodenames = Some(
                    d.chosen
                        .map(|i| names.get(i).to_string())
                        .into_iter()
                        .collect(),
                )
            }
        }
        out
    }

    /// Filter as the HTTP server calls it: the request body in, the `ExtenderFilterResult` JSON
    /// written to `out`. The same answer as [`Extender::filter`], without its allocations: the
    /// node-name list is parsed only when it differs from the last one, and the answer is
    /// written straight from the decision, each name already quoted and each distinct miss text
    /// escaped once.
    pub fn filter_json(&self, body: &[u8], out: &mut Vec<u8>) {
        let args = match serde_json::from_slice::<ExtenderArgsRaw>(body) {
            Ok(a) => a,
            Err(e) => return write_error(out, &format!("cannot read ExtenderArgs: {e}")),
        };
        let Some(raw) = args.nodenames else {
            // Whole Node objects (no nodeCacheCapable), or neither: the general path.
            let result = self.filter(ExtenderArgs {
                pod: args.pod,
                nodes: args.nodes,
                nodenames: None,
            });
            serde_json::to_writer(&mut *out, &result).expect("writing JSON to memory");
            return;
        };
        let pod = pod_ref(&args.pod);
        if !self.is_ready() {
            return write_error(out, NOT_READY);
        }
        let names = match self.candidates(raw.get()) {
            Ok(n) => n,
            Err(e) => {
                return write_error(out, &format!("cannot read ExtenderArgs: nodenames: {e}"))
            }
        };
        let d = match self.decide_filter(&pod, &args.pod, &names.names, Some(names.id), None) {
            Outcome::Error(e) => return write_error(out, &e),
            Outcome::PassThrough => {
                out.extend_from_slice(b"{\"nodenames\":[");
                write_joined(out, (0..names.quoted.len()).map(|i| names.quoted.get(i)));
                out.extend_from_slice(b"]}");
                return;
            }
            Outcome::Decided(d) => d,
        };
        out.extend_from_slice(b"{\"nodenames\":[");
        if let Some(i) = d.chosen {
            out.extend_from_slice(names.quoted.get(i).as_bytes());
        }
        out.push(b']');
        let texts: Vec<String> = d
            .texts
            .iter()
            .map(|(t, _)| serde_json::to_string(t).expect("writing JSON to memory"))
            .collect();
        for (key, unresolvable) in [("failedNodes", false), ("failedAndUnresolvableNodes", true)] {
            let mut first = true;
            for &(i, t) in &d.misses {
                if d.texts[t as usize].1 != unresolvable {
                    continue;
                }
                if first {
                    out.extend_from_slice(b",\"");
                    out.extend_from_slice(key.as_bytes());
                    out.extend_from_slice(b"\":{");
                    first = false;
                } else {
                    out.push(b',');
                }
                out.extend_from_slice(names.quoted.get(i).as_bytes());
                out.push(b':');
                out.extend_from_slice(texts[t as usize].as_bytes());
            }
            if !first {
                out.push(b'}');
            }
        }
        out.push(b'}');
    }

    /// The candidate list for `raw` (a JSON array of names): the last one when the bytes are the
    /// same, else parsed and kept for the next filter.
    fn candidates(&self, raw: &str) -> Result<Arc<Candidates>, serde_json::Error> {
        if let Some(c) = self.candidates.lock().unwrap().as_ref() {
            if *c.raw == *raw {
                return Ok(c.clone());
            }
        }
        // Parsed outside the lock; a concurrent filter with another list just parses its own.
        let names: NodeNames = serde_json::from_str(raw)?;
        let mut quoted = NodeNames::default();
        let mut buf = String::new();
        for n in names.iter() {
            buf.clear();
            write_quoted(&mut buf, n);
            quoted.push(&buf);
        }
        static LISTS: AtomicU64 = AtomicU64::new(0);
        let c = Arc::new(Candidates {
            id: LISTS.fetch_add(1, Ordering::Relaxed),
            raw: raw.into(),
            names,
            quoted,
        });
        *self.candidates.lock().unwrap() = Some(c.clone());
        Ok(c)
    }

    /// Chooses and reserves, records the pending reservation and emits the events; the answer
    /// is left to the caller to write.
    fn decide_filter(
        &self,
        pod: &PodRef,
        pod_obj: &Pod,
        names: &NodeNames,
        list_id: Option<u64>,
        node_objects: Option<&NodeList>,
    ) -> Outcome {
        let key = format!("{}/{}", pod.namespace, pod.name);
        let req = match podspec::pod_request_with(pod_obj, self.cfg.default_cores) {
            Ok(Some(r)) => r,
            Ok(None) => return Outcome::PassThrough,
            Err(e) => {
                self.emit(pod, "Warning", events::FILTERING_FAILED, e.0.clone());
                return Outcome::Error(format!("pod {key}: {e}"));
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
                return match names.iter().position(|n| n == node) {
                    Some(i) => Outcome::Decided(Decided {
                        chosen: Some(i),
                        misses: vec![],
                        texts: vec![],
                    }),
                    None => Outcome::Error(format!(
                        "pod {key} is already placed on node {node}, which is not among the candidates"
                    )),
                };
            }
            let d = match list_id {
                Some(id) => st
                    .ledger
                    .place_names_listed(&pod.uid, &key, names, id, &req, &self.cfg),
                None => st
                    .ledger
                    .place_names(&pod.uid, &key, names, &req, &self.cfg),
            };
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

        let mut texts: Vec<(String, bool)> = Vec::new();
        // The distinct misses, beside `texts`, to find a miss's text without building it.
        let mut seen: Vec<&NodeMiss> = Vec::new();
        let mut misses = Vec::with_capacity(decision.misses.len());
        for (i, miss) in &decision.misses {
            let t = match seen.iter().position(|m| *m == miss) {
                Some(t) => t,
                None => {
                    seen.push(miss);
                    texts.push((miss.to_string(), unresolvable(miss)));
                    texts.len() - 1
                }
            };
            misses.push((*i, t as u32));
        }
        match decision.chosen {
            Some((i, _, _)) => {
                let chosen = names.get(i);
                tracing::debug!(pod = %key, node = %chosen, devices = ?devices, "filter reserved");
                let msg = events::filtering_succeed(
                    chosen,
                    decision.misses.len(),
                    decision.fits.iter().map(|(j, s)| (names.get(*j), *s)),
                );
                self.emit(pod, "Normal", events::FILTERING_SUCCEED, msg);
            }
            None => {
                let (head, lines) = events::filtering_failed(
                    decision.misses.iter().map(|(i, m)| (names.get(*i), m)),
                );
                tracing::info!(pod = %key, "{head}: {}", lines.join("; "));
                self.emit(pod, "Warning", events::FILTERING_FAILED, head);
                for line in lines {
                    self.emit(pod, "Warning", events::FILTERING_FAILED, line);
                }
            }
        }
        Outcome::Decided(Decided {
            chosen: decision.chosen.map(|(i, _, _)| i),
            misses,
            texts,
        })
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
