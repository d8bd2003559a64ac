//! `filter_json` (the HTTP path: raw node-name list, answer written straight as JSON) against
//! `filter` (the typed path every other test uses): the same answers, in every request form.

use super::wire::*;
use super::*;
use crate::kubeapi::PodEvent;
use serde_json::{json, Value};

#[derive(Clone, Default)]
struct NullApi;

impl ClusterApi for NullApi {
    async fn annotate_pod(
        &self,
        _: &PodRef,
        _: std::collections::BTreeMap<String, String>,
        _: Option<&str>,
    ) -> Result<(), String> {
        Ok(())
    }
    async fn bind_pod(&self, _: &PodRef, _: &str) -> Result<(), String> {
        Ok(())
    }
    async fn record_event(&self, _: PodEvent) -> Result<(), String> {
        Ok(())
    }
}

fn card(i: usize, g: usize, kind: &str, mem: u64, healthy: bool) -> Value {
    json!({"id": format!("GPU-{i}-{g}"), "index": g, "count": 10, "devmem": mem, "devcore": 100, "type": kind, "health": healthy})
}

fn node_obj(i: usize, name: &str) -> Value {
    let cards: Vec<Value> = match i % 4 {
        0 => (0..2)
            .map(|g| card(i, g, "NVIDIA-Tesla T4", 15360, true))
            .collect(),
        1 => (0..4)
            .map(|g| card(i, g, "NVIDIA A100-SXM4-80GB", 81920, true))
            .collect(),
        2 => vec![card(i, 0, "NVIDIA-Tesla T4", 15360, false)],
        _ => vec![card(i, 0, "NVIDIA-Tesla T4", 4000, true)],
    };
    json!({"metadata": {"name": name, "annotations": {"hami.io/node-nvidia-register": serde_json::to_string(&cards).unwrap()}}})
}

const NAMES: [&str; 8] = [
    "node-a",
    "node-b",
    "node-c",
    "node-d",
    "node-e",
    "node-f",
    "odd\"name",
    "node-\\slash",
];

/// Two extenders over the same cluster: one for each path, so each sees the same state.
fn pair() -> (Extender<NullApi>, Extender<NullApi>) {
    let make = || {
        let (tx, _) = mpsc::unbounded_channel();
        let ext = Extender::new(Config::default(), NullApi, tx);
        for (i, name) in NAMES.iter().enumerate() {
            ext.node_applied(&serde_json::from_value(node_obj(i, name)).unwrap());
        }
        ext
    };
    (make(), make())
}

fn pod(k: usize, limits: Value, annotations: Value) -> Value {
    json!({"metadata": {"name": format!("p{k}"), "namespace": "default", "uid": format!("u{k}"), "annotations": annotations},
           "spec": {"containers": [{"name": "app", "resources": {"limits": limits}}]}})
}

fn typed(ext: &Extender<NullApi>, body: &[u8]) -> Value {
    let result = match serde_json::from_slice::<ExtenderArgs>(body) {
        Ok(args) => ext.filter(args),
        Err(e) => ExtenderFilterResult {
            error: format!("cannot read ExtenderArgs: {e}"),
            ..Default::default()
        },
    };
    serde_json::to_value(result).unwrap()
}

fn fast(ext: &Extender<NullApi>, body: &[u8]) -> Value {
    let mut out = Vec::new();
    ext.filter_json(body, &mut out);
    serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
}

/// The pods every case sends: fits, misses of several kinds, a type filter that only A100s
/// pass, a pod with no vGPU, an invalid request.
fn pods() -> Vec<Value> {
    vec![
        pod(
            0,
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "2000"}),
            json!({}),
        ),
        pod(
            1,
            json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "8000"}),
            json!({}),
        ),
        pod(
            2,
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "20000"}),
            json!({"nvidia.com/use-gputype": "A100"}),
        ),
        pod(
            3,
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "200000"}),
            json!({}),
        ),
        pod(4, json!({"cpu": "1"}), json!({})),
        pod(
            5,
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "-3"}),
            json!({}),
        ),
        pod(
            6,
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000", "nvidia.com/gpucores": "30"}),
            json!({"hami.io/node-scheduler-policy": "spread"}),
        ),
    ]
}

fn same(body: &str) -> Value {
    let (a, b) = pair();
    let want = typed(&a, body.as_bytes());
    // Twice: the second time the name list comes from the cache.
    for _ in 0..2 {
        assert_eq!(fast(&b, body.as_bytes()), want, "{body}");
    }
    want
}

#[test]
fn nodenames_answered_as_the_typed_path_answers() {
    let names =
        serde_json::to_string(&NAMES.iter().chain(&["unregistered"]).collect::<Vec<_>>()).unwrap();
    let mut seen_fail = false;
    let mut seen_unres = false;
    for p in pods() {
        let want = same(&format!(r#"{{"pod":{p},"nodenames":{names}}}"#));
        seen_fail |= want.get("failedNodes").is_some();
        seen_unres |= want.get("failedAndUnresolvableNodes").is_some();
    }
    assert!(seen_fail && seen_unres, "the cases cover both failure maps");
}

#[test]
fn nodes_items_form_answered_as_the_typed_path_answers() {
    let items: Vec<Value> = NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| node_obj(i, n))
        .collect();
    for p in pods() {
        let body =
            json!({"pod": p, "nodes": {"metadata": {"resourceVersion": "7"}, "items": items}})
                .to_string();
        let want = same(&body);
        assert!(want.get("nodenames").is_none(), "{want}");
        // `nodenames: null` beside the objects is the same request.
        let body = json!({"pod": p, "nodenames": null, "nodes": {"items": items}}).to_string();
        same(&body);
    }
}

#[test]
fn unknown_fields_escaped_names_and_empty_lists() {
    let p = pod(
        0,
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "2000"}),
        json!({}),
    );
    // Fields kube-scheduler may add one day, at the top and inside the pod, are skipped.
    let want = same(&format!(
        r#"{{"apiVersion":"x","pod":{p},"extra":{{"a":[1,{{"b":null}}],"c":"\u0041"}},"nodenames":["node-a"],"more":[]}}"#
    ));
    assert_eq!(want, json!({"nodenames": ["node-a"]}));
    // `\u0062` is `b`; the escaped quote and backslash name the odd nodes.
    let want = same(&format!(
        r#"{{"pod":{p},"nodenames":["node-\u0062","odd\"name","node-\\slash","no\"pe"]}}"#
    ));
    assert_eq!(want["nodenames"], json!(["node-b"]));
    assert_eq!(
        want["failedAndUnresolvableNodes"]["no\"pe"],
        json!("NodeUnregistered")
    );
    // Odd names are answered escaped, chosen or failed.
    let want = same(&format!(r#"{{"pod":{p},"nodenames":["odd\"name"]}}"#));
    assert_eq!(
        want,
        json!({"nodenames": [], "failedAndUnresolvableNodes": {"odd\"name": "1/1 CardNotHealth"}})
    );
    let want = same(&format!(
        r#"{{"pod":{p},"nodenames":["node-\\slash", "odd\"name"]}}"#
    ));
    assert_eq!(want["nodenames"], json!(["node-\\slash"]));
    // No candidates: nothing fits, nothing failed.
    assert_eq!(
        same(&format!(r#"{{"pod":{p},"nodenames":[]}}"#)),
        json!({"nodenames": []})
    );
    assert_eq!(
        same(&format!(r#"{{"pod":{p},"nodes":{{"items":[]}}}}"#)),
        json!({"nodes": {"items": []}})
    );
    // A pod with no vGPU passes every candidate, in order, escapes kept.
    let cpu = pod(1, json!({"cpu": "1"}), json!({}));
    assert_eq!(
        same(&format!(
            r#"{{"pod":{cpu},"nodenames":["z","odd\"name","a"]}}"#
        )),
        json!({"nodenames": ["z", "odd\"name", "a"]})
    );
}

#[test]
fn a_changed_list_is_read_again() {
    let (_, ext) = pair();
    let p = |k| {
        pod(
            k,
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "2000"}),
            json!({}),
        )
    };
    let body = |k, names: &str| format!(r#"{{"pod":{},"nodenames":{names}}}"#, p(k));
    assert_eq!(
        fast(&ext, body(0, r#"["node-a"]"#).as_bytes())["nodenames"],
        json!(["node-a"])
    );
    assert_eq!(
        fast(&ext, body(1, r#"["node-b"]"#).as_bytes())["nodenames"],
        json!(["node-b"])
    );
    // The same names spaced differently: parsed again, same answer.
    assert_eq!(
        fast(&ext, body(2, r#"[ "node-b" ]"#).as_bytes())["nodenames"],
        json!(["node-b"])
    );
    assert_eq!(
        fast(&ext, body(3, r#"["nope","node-a"]"#).as_bytes()),
        json!({"nodenames": ["node-a"], "failedAndUnresolvableNodes": {"nope": "NodeUnregistered"}})
    );
    // A node that registers after its name was cached is found.
    ext.node_applied(&serde_json::from_value(node_obj(1, "nope")).unwrap());
    assert_eq!(
        fast(&ext, body(4, r#"["nope","node-a"]"#).as_bytes()),
        json!({"nodenames": ["node-a"]}),
        "nope is registered now: it fits (and misses no more)"
    );
    // The typed path with another list between two of the same list: the ledger's memory of
    // the list is not trusted across it.
    let typed_body = body(6, r#"["node-c","node-a"]"#);
    assert_eq!(
        typed(&ext, typed_body.as_bytes())["nodenames"],
        json!(["node-a"])
    );
    assert_eq!(
        fast(&ext, body(7, r#"["nope","node-a"]"#).as_bytes())["nodenames"],
        json!(["node-a"])
    );
    let a100 = pod(
        5,
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "2000"}),
        json!({"nvidia.com/use-gputype": "A100"}),
    );
    assert_eq!(
        fast(
            &ext,
            format!(r#"{{"pod":{a100},"nodenames":["nope","node-a"]}}"#).as_bytes()
        ),
        json!({"nodenames": ["nope"], "failedAndUnresolvableNodes": {"node-a": "2/2 CardTypeMismatch"}})
    );
}

#[test]
fn bad_requests_answer_in_the_error_field() {
    let (a, b) = pair();
    let p = pod(0, json!({"nvidia.com/gpu": "1"}), json!({}));
    for body in [
        "not json".to_string(),
        format!(r#"{{"pod":{p},"nodenames":["a",7]}}"#),
        format!(r#"{{"pod":{p},"nodenames":"a"}}"#),
        r#"{"nodenames":["a"]}"#.to_string(),
        format!(r#"{{"pod":{p},"nodenames":["a"]"#),
    ] {
        let got = fast(&b, body.as_bytes());
        assert!(
            got["error"]
                .as_str()
                .unwrap()
                .starts_with("cannot read ExtenderArgs"),
            "{body}: {got}"
        );
        assert_eq!(got.as_object().unwrap().len(), 1, "{got}");
        assert!(typed(&a, body.as_bytes())["error"].is_string());
    }
    // Neither form of candidates.
    assert_eq!(
        same(&format!(r#"{{"pod":{p}}}"#)),
        json!({"error": "the request carries neither nodes nor nodenames"})
    );
    // Not ready: refused, whatever the form.
    let (tx, _) = mpsc::unbounded_channel();
    let ext = Extender::new(Config::default(), NullApi, tx)
        .with_readiness(Arc::new(crate::watch::Readiness::default()));
    let got = fast(
        &ext,
        format!(r#"{{"pod":{p},"nodenames":["a"]}}"#).as_bytes(),
    );
    assert!(
        got["error"].as_str().unwrap().contains("still listing"),
        "{got}"
    );
    assert_eq!(got.as_object().unwrap().len(), 1, "{got}");
}
