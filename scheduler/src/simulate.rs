//! `vgpu-scheduler simulate FILE`: places the pending vGPU pods of a Kubernetes List (what
//! `kubectl get nodes,pods -A -o yaml` prints) in file order, with the extender's own placement
//! code, so admins can plan capacity and tests can state scenarios as files.

use crate::events;
use crate::placement::ledger::Ledger;
use crate::placement::Config;
use crate::podspec;
use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::{Node, Pod};
use serde::Serialize;

/// One pending pod's outcome. `devices` is the `hami.io/vgpu-devices-to-allocate` the extender
/// would write; `reason` says why a pod was not placed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub pod: String,
    pub node: Option<String>,
    pub devices: Option<String>,
    pub reason: Option<String>,
    /// The chosen node's score before this pod, as `FilteringSucceed` shows it.
    pub score: Option<f64>,
}

/// Objects of a List, a multi-document YAML stream, or a single object; JSON is read as YAML.
pub fn read_objects(text: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(doc)
            .with_context(|| format!("document {} is not valid YAML or JSON", i + 1))?;
        let v: serde_json::Value = serde_json::to_value(v)
            .with_context(|| format!("document {} cannot be read as JSON", i + 1))?;
        if v.is_null() {
            continue;
        }
        match v.get("items").and_then(|x| x.as_array()) {
            Some(items)
                if v.get("kind")
                    .and_then(|k| k.as_str())
                    .is_none_or(|k| k.ends_with("List")) =>
            {
                out.extend(items.iter().cloned())
            }
            _ => out.push(v),
        }
    }
    Ok(out)
}

/// Objects `serve` would skip with a warning: without `strict` simulate skips them too, so it
/// runs on any cluster `serve` runs on; with it the first one is an error.
#[derive(Debug, Default)]
pub struct Warnings {
    pub strict: bool,
    pub list: Vec<String>,
}

impl Warnings {
    fn skip(&mut self, e: anyhow::Error) -> anyhow::Result<()> {
        if self.strict {
            return Err(e);
        }
        self.list.push(format!("{e:#}; skipped"));
        Ok(())
    }
}

/// Splits the objects into nodes and pods; other kinds are skipped.
pub fn nodes_and_pods(
    objects: Vec<serde_json::Value>,
    warnings: &mut Warnings,
) -> anyhow::Result<(Vec<Node>, Vec<Pod>)> {
    let (mut nodes, mut pods) = (Vec::new(), Vec::new());
    for (i, o) in objects.into_iter().enumerate() {
        let name = o
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .unwrap_or("?")
            .to_string();
        match o.get("kind").and_then(|k| k.as_str()) {
            Some("Node") => match serde_json::from_value(o) {
                Ok(n) => nodes.push(n),
                Err(e) => warnings.skip(
                    anyhow::Error::new(e)
                        .context(format!("item {} (Node {name}) is not a valid Node", i + 1)),
                )?,
            },
            Some("Pod") => match serde_json::from_value(o) {
                Ok(p) => pods.push(p),
                Err(e) => warnings.skip(
                    anyhow::Error::new(e)
                        .context(format!("item {} (Pod {name}) is not a valid Pod", i + 1)),
                )?,
            },
            Some(_) => {}
            None => warnings.skip(anyhow::anyhow!("item {} ({name}) has no kind", i + 1))?,
        }
    }
    Ok((nodes, pods))
}

/// Places the pending pods in order; running pods' annotations count as reserved first.
pub fn simulate(
    nodes: &[Node],
    pods: &[Pod],
    cfg: &Config,
    warnings: &mut Warnings,
) -> anyhow::Result<Vec<Outcome>> {
    let mut ledger = Ledger::default();
    let mut names = Vec::new();
    for n in nodes {
        let name = n.metadata.name.clone().unwrap_or_default();
        match podspec::node_devices(n) {
            Ok(Some(devices)) => {
                ledger.upsert_node_cordoned(&name, devices, podspec::node_cordoned(n))
            }
            Ok(None) => {}
            Err(e) => warnings.skip(
                anyhow::Error::new(e).context(format!("node {name}: its GPUs cannot be read")),
            )?,
        }
        names.push(name);
    }
    let mut pending = Vec::new();
    for p in pods {
        let placed = match podspec::pod_placement(p, cfg.default_memory, cfg.default_cores) {
            Ok(placed) => placed,
            Err(e) => {
                warnings.skip(anyhow::anyhow!("pod {}: {e}", podspec::pod_key(p)))?;
                continue;
            }
        };
        if let Some(placement) = placed {
            ledger.record(&podspec::pod_uid(p), placement);
        } else if p.spec.as_ref().is_some_and(|s| s.node_name.is_none())
            && !podspec::pod_finished(p)
        {
            pending.push(p);
        }
    }
    let mut out = Vec::new();
    for p in pending {
        let key = podspec::pod_key(p);
        let req = match podspec::pod_request_with(p, cfg.default_cores) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                out.push(Outcome {
                    pod: key,
                    node: None,
                    devices: None,
                    reason: Some(e.0),
                    score: None,
                });
                continue;
            }
        };
        let d = ledger.place(&podspec::pod_uid(p), &key, &names, &req, cfg);
        out.push(match d.chosen {
            Some((i, _, score)) => {
                let devices = ledger
                    .placement(&podspec::pod_uid(p))
                    .map(|pl| pl.devices.encode());
                Outcome {
                    pod: key,
                    node: Some(names[i].clone()),
                    devices,
                    reason: None,
                    score: Some(score),
                }
            }
            None => {
                let (head, lines) =
                    events::filtering_failed(d.misses.iter().map(|(i, m)| (names[*i].as_str(), m)));
                let reason = if lines.is_empty() {
                    head
                } else {
                    format!("{head}: {}", lines.join("; "))
                };
                Outcome {
                    pod: key,
                    node: None,
                    devices: None,
                    reason: Some(reason),
                    score: None,
                }
            }
        });
    }
    Ok(out)
}

/// Reads, places and renders, as the CLI does.
/// Warnings (objects skipped) are returned beside the output, for standard error.
pub fn run(
    text: &str,
    cfg: &Config,
    json: bool,
    warnings: &mut Warnings,
) -> anyhow::Result<String> {
    let (nodes, pods) = nodes_and_pods(read_objects(text)?, warnings)?;
    if nodes.is_empty() {
        bail!(
            "the file holds no Node objects: include them, e.g. kubectl get nodes,pods -A -o yaml"
        );
    }
    let outcomes = simulate(&nodes, &pods, cfg, warnings)?;
    if json {
        return Ok(serde_json::to_string_pretty(&outcomes)? + "\n");
    }
    let mut s = String::new();
    for o in &outcomes {
        match (&o.node, &o.devices) {
            (Some(n), Some(d)) => s.push_str(&format!(
                "{}: node {n}, devices {d} (node score {:.2})\n",
                o.pod,
                o.score.unwrap_or(0.0)
            )),
            _ => s.push_str(&format!(
                "{}: not placed: {}\n",
                o.pod,
                o.reason.as_deref().unwrap_or("?")
            )),
        }
    }
    let placed = outcomes.iter().filter(|o| o.node.is_some()).count();
    s.push_str(&format!(
        "{placed} of {} pending pods placed\n",
        outcomes.len()
    ));
    Ok(s)
}
