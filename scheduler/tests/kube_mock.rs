//! The API-server side, through kube-rs `Client` over a mock tower service answering with
//! recorded responses: the writes bind makes, the events, and the watchers rebuilding state.

use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt;
use vgpu_scheduler::extender::{self, Extender};
use vgpu_scheduler::kubeapi::{ClusterApi, KubeApi, PodRef};
use vgpu_scheduler::placement::Config;
use vgpu_scheduler::watch::{self, Readiness};

const T4: &str = "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039";

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    content_type: String,
    body: Value,
}

type Responder = Arc<dyn Fn(&str, &str, &Value) -> (u16, String) + Send + Sync>;

/// A kube Client whose every request is recorded and answered by `respond`.
fn mock_client(respond: Responder) -> (Client, Arc<Mutex<Vec<Seen>>>) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let content_type = req
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            let (status, out) = respond(&method, &uri, &body);
            log.lock().unwrap().push(Seen {
                method,
                uri,
                content_type,
                body,
            });
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(out.into_bytes()))
                    .unwrap(),
            );
        }
    });
    (Client::new(svc, "default"), seen)
}

fn status(code: u16, reason: &str, message: &str) -> (u16, String) {
    (code, json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}).to_string())
}

fn echo_ok(_: &str, _: &str, body: &Value) -> (u16, String) {
    (201, body.to_string())
}

fn lab_pod_ref() -> PodRef {
    PodRef {
        namespace: "default".into(),
        name: "oom-test-pod".into(),
        uid: "3f5d1c2e-uid".into(),
    }
}

#[tokio::test]
async fn the_writes_bind_makes_are_the_requests_the_api_expects() {
    let (client, seen) = mock_client(Arc::new(echo_ok));
    let api = KubeApi { client };
    let pod = lab_pod_ref();
    let a = BTreeMap::from([("hami.io/bind-phase".to_string(), "allocating".to_string())]);
    api.annotate_pod(&pod, a, Some("hami-workshop"))
        .await
        .unwrap();
    api.bind_pod(&pod, "hami-workshop").await.unwrap();
    api.record_event(vgpu_scheduler::kubeapi::PodEvent {
        pod: pod.clone(),
        kind: "Normal",
        reason: "BindingSucceed",
        message: "Successfully binding node [hami-workshop] to default/oom-test-pod".into(),
    })
    .await
    .unwrap();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        (seen[0].method.as_str(), seen[0].uri.as_str()),
        ("PATCH", "/api/v1/namespaces/default/pods/oom-test-pod?")
    );
    assert_eq!(seen[0].content_type, "application/merge-patch+json");
    assert_eq!(
        seen[0].body,
        json!({"metadata": {"annotations": {"hami.io/bind-phase": "allocating"}, "labels": {"hami.io/vgpu-node": "hami-workshop"}}})
    );

    assert_eq!(
        (seen[1].method.as_str(), seen[1].uri.as_str()),
        (
            "POST",
            "/api/v1/namespaces/default/pods/oom-test-pod/binding?"
        )
    );
    assert_eq!(
        seen[1].body,
        json!({"apiVersion": "v1", "kind": "Binding",
               "metadata": {"name": "oom-test-pod", "namespace": "default", "uid": "3f5d1c2e-uid"},
               "target": {"apiVersion": "v1", "kind": "Node", "name": "hami-workshop"}})
    );

    assert_eq!(
        (seen[2].method.as_str(), seen[2].uri.as_str()),
        ("POST", "/api/v1/namespaces/default/events?")
    );
    let e = &seen[2].body;
    assert_eq!(e["reason"], "BindingSucceed");
    assert_eq!(
        e["message"],
        "Successfully binding node [hami-workshop] to default/oom-test-pod"
    );
    assert_eq!(e["type"], "Normal");
    assert_eq!(e["source"]["component"], "vgpu-scheduler");
    assert_eq!(
        e["involvedObject"],
        json!({"apiVersion": "v1", "kind": "Pod", "name": "oom-test-pod", "namespace": "default", "uid": "3f5d1c2e-uid"})
    );
    assert_eq!(e["metadata"]["generateName"], "oom-test-pod.");
}

#[tokio::test]
async fn api_refusals_are_reported_in_plain_words() {
    let (client, _) = mock_client(Arc::new(|_: &str, _: &str, _: &Value| {
        status(409, "Conflict", "Operation cannot be fulfilled on pods/binding \"oom-test-pod\": pod oom-test-pod is already assigned to node \"other\"")
    }));
    let err = KubeApi { client }
        .bind_pod(&lab_pod_ref(), "hami-workshop")
        .await
        .unwrap_err();
    assert_eq!(err, "API server refused: Operation cannot be fulfilled on pods/binding \"oom-test-pod\": pod oom-test-pod is already assigned to node \"other\" (Conflict)");
}

fn register() -> String {
    format!(
        r#"[{{"id":"{T4}","count":10,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","health":true}}]"#
    )
}

fn placed_pod(name: &str, uid: &str, mib: u64) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "uid": uid, "resourceVersion": "7",
                        "labels": {"hami.io/vgpu-node": "hami-workshop"},
                        "annotations": {"hami.io/vgpu-node": "hami-workshop", "hami.io/bind-phase": "success",
                                        "hami.io/vgpu-devices-allocated": format!("{T4},NVIDIA,{mib},0:;")}},
           "spec": {"nodeName": "hami-workshop", "containers": [{"name": "app", "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": mib.to_string()}}}]},
           "status": {"phase": "Running"}})
}

/// The API as a restarted scheduler finds it: the lab's node and two running 4000 MiB pods.
/// The pod watch then reports one of them deleted.
fn recorded_cluster(method: &str, uri: &str, _: &Value) -> (u16, String) {
    assert_eq!(method, "GET", "{uri}");
    let watching = uri.contains("watch=true");
    if uri.starts_with("/api/v1/nodes") {
        if watching {
            return (200, String::new());
        }
        let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "hami-workshop", "resourceVersion": "5",
                          "annotations": {"hami.io/node-nvidia-register": register()}}});
        return (200, json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "5"}, "items": [node]}).to_string());
    }
    assert!(uri.starts_with("/api/v1/pods?"), "{uri}");
    assert!(
        uri.contains("labelSelector=hami.io%2Fvgpu-node"),
        "only our pods are listed: {uri}"
    );
    if watching {
        let deleted =
            json!({"type": "DELETED", "object": placed_pod("gpumem-pod-b", "uid-b", 4000)});
        return (200, format!("{deleted}\n"));
    }
    let items = [
        placed_pod("gpumem-pod-a", "uid-a", 4000),
        placed_pod("gpumem-pod-b", "uid-b", 4000),
    ];
    (200, json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "7"}, "items": items}).to_string())
}

async fn wait_for(mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in 2 s");
}

#[tokio::test]
async fn watchers_rebuild_the_book_from_annotations_and_gate_filter_until_synced() {
    let (client, _) = mock_client(Arc::new(recorded_cluster));
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let ready = Arc::new(Readiness::default());
    let ext = Arc::new(
        Extender::new(
            Config::default(),
            KubeApi {
                client: client.clone(),
            },
            tx,
        )
        .with_readiness(ready.clone()),
    );
    assert!(!ext.is_ready());
    let args = || {
        serde_json::from_value(json!({"pod": {"metadata": {"name": "p", "namespace": "default", "uid": "u"}, "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "8000"}}}]}}, "nodenames": ["hami-workshop"]})).unwrap()
    };
    assert!(
        ext.filter(args()).error.contains("still listing"),
        "filter must wait for the first list"
    );

    let _w = watch::spawn(client, ext.clone(), ready.clone());
    wait_for(|| ready.is_ready()).await;
    // Both pods were listed; then the watch deleted pod b, leaving 4000 MiB reserved.
    wait_for(|| ext.placement("uid-b").is_none()).await;
    assert!(ext.placement("uid-a").is_some());
    ext.with_ledger(|l| assert_eq!(l.node("hami-workshop").unwrap().usage[0].mem_mib, 4000));
    let r = ext.filter(args());
    assert_eq!(
        r.nodenames,
        Some(vec!["hami-workshop".to_string()]),
        "{:?}",
        r
    );
}

/// kube-scheduler's calls over HTTP, through to the API writes: one patch, one binding, events.
#[tokio::test]
async fn filter_and_bind_over_http_reach_the_api() {
    let (client, seen) = mock_client(Arc::new(echo_ok));
    let api = KubeApi { client };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let writer = extender::spawn_event_writer(api.clone(), rx);
    let ext = Arc::new(Extender::new(Config::default(), api, tx));
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({"metadata": {"name": "hami-workshop", "annotations": {"hami.io/node-nvidia-register": register()}}})).unwrap();
    ext.node_applied(&node);
    let app = extender::http::router(ext.clone());

    let call = |path: &str, body: String| {
        let app = app.clone();
        let req = Request::post(path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .unwrap();
        async move {
            let resp = app.oneshot(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let bytes = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            serde_json::from_slice::<Value>(&bytes).unwrap()
        }
    };
    let pod = json!({"metadata": {"name": "oom-test-pod", "namespace": "default", "uid": "3f5d1c2e-uid"},
                     "spec": {"containers": [{"name": "app", "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "4000"}}}]}});
    let r = call(
        "/filter",
        json!({"pod": pod, "nodenames": ["hami-workshop", "cpu-node"]}).to_string(),
    )
    .await;
    assert_eq!(
        r,
        json!({"nodenames": ["hami-workshop"], "failedAndUnresolvableNodes": {"cpu-node": "NodeUnregistered"}})
    );
    let r = call("/bind", r#"{"PodName":"oom-test-pod","PodNamespace":"default","PodUID":"3f5d1c2e-uid","Node":"hami-workshop"}"#.into()).await;
    assert_eq!(r, json!({"Error": ""}));
    // Lower-case keys are not what kube-scheduler sends: refused in the Error field, still HTTP 200.
    let r = call("/bind", r#"{"podName":"x"}"#.into()).await;
    assert!(
        r["Error"].as_str().unwrap().starts_with(
            "cannot read ExtenderBindingArgs (want PodName, PodNamespace, PodUID, Node)"
        ),
        "{r}"
    );
    let r = call("/filter", "not json".into()).await;
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .starts_with("cannot read ExtenderArgs"),
        "{r}"
    );

    // The reservation shows in HAMi's metrics.
    let req = Request::get("/metrics")
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = extender::http::metrics_router(ext.clone())
        .oneshot(req)
        .await
        .unwrap();
    let text = String::from_utf8(
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains(&format!(
            "hami_vgpu_memory_allocated_bytes{{namespace=\"default\",node=\"hami-workshop\",pod=\"oom-test-pod\",container_index=\"0\",device_uuid=\"{T4}\",zone=\"vGPU\"}} 4194304000"
        )),
        "{text}"
    );

    drop(ext);
    drop(app);
    tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .unwrap()
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    let uris: Vec<(&str, &str)> = seen
        .iter()
        .map(|s| (s.method.as_str(), s.uri.as_str()))
        .collect();
    assert!(
        uris.contains(&("PATCH", "/api/v1/namespaces/default/pods/oom-test-pod?")),
        "{uris:?}"
    );
    assert!(
        uris.contains(&(
            "POST",
            "/api/v1/namespaces/default/pods/oom-test-pod/binding?"
        )),
        "{uris:?}"
    );
    let patch = &seen.iter().find(|s| s.method == "PATCH").unwrap().body["metadata"]["annotations"];
    assert_eq!(
        patch["hami.io/vgpu-devices-to-allocate"],
        format!("{T4},NVIDIA,4000,0:;")
    );
    assert_eq!(patch["hami.io/vgpu-node"], "hami-workshop");
    let reasons: Vec<&str> = seen
        .iter()
        .filter(|s| s.uri.contains("/events"))
        .map(|s| s.body["reason"].as_str().unwrap())
        .collect();
    // The unreadable bind names no pod, so it leaves no event.
    assert_eq!(reasons, vec!["FilteringSucceed", "BindingSucceed"]);
}

/// Without nodeCacheCapable, kube-scheduler sends whole Node objects: 2,000 of them weigh several
/// MiB, past axum's default body limit. The answer must still be HTTP 200 with the chosen node.
#[tokio::test]
async fn large_node_lists_are_accepted() {
    let (client, _) = mock_client(Arc::new(echo_ok));
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let ext = Arc::new(Extender::new(Config::default(), KubeApi { client }, tx));
    let padding = "x".repeat(2000);
    let items: Vec<Value> = (0..2000)
        .map(|i| {
            json!({"metadata": {"name": format!("node-{i}"), "annotations": {"hami.io/node-nvidia-register":
                format!(r#"[{{"id":"GPU-{i}","count":10,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","health":true}}]"#)}},
                   "status": {"images": [{"names": [padding.clone()]}]}})
        })
        .collect();
    let pod = json!({"metadata": {"name": "p", "namespace": "default", "uid": "u"},
                     "spec": {"containers": [{"name": "app", "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"}}}]}});
    let body = json!({"pod": pod, "nodes": {"metadata": {}, "items": items}}).to_string();
    assert!(body.len() > 4 << 20, "{}", body.len());
    let req = Request::post("/filter")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
        .unwrap();
    let resp = extender::http::router(ext).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        v["nodes"]["items"].as_array().unwrap().len(),
        1,
        "{}",
        &v.to_string()[..200.min(v.to_string().len())]
    );
    assert_eq!(v["error"], Value::Null);
}
