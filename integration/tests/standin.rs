//! The stand-in API server against the real clients: kube-rs (CRUD, watcher/reflector, the four patch types,
//! conflicts, binding, admission webhooks, token users) and kubectl (apply, get, annotate, describe).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Event as CoreEvent, Namespace, Node, Pod};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use serde_json::{json, Value};
use vgpu_integration::standin::{Config, Standin, Users, WebhookSpec};

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn server() -> Standin {
    Standin::start(local(), Config::default()).await.unwrap()
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "lab"}},
        "spec": {"containers": [{"name": "app", "image": "busybox:1.36",
                                 "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "4000"}}}]}
    }))
    .unwrap()
}

/// The API error a kube-rs call failed with.
fn api_err<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> Box<kube::core::Status> {
    match r {
        Err(kube::Error::Api(s)) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_through_kube_rs() {
    let s = server().await;
    let pods: Api<Pod> = Api::namespaced(s.client(None), "default");
    let created = pods
        .create(&PostParams::default(), &pod("a"))
        .await
        .unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    assert_eq!(uid.len(), 36, "uid is a UUID: {uid}");
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(
        created.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    let spec = created.spec.as_ref().unwrap();
    assert_eq!(spec.scheduler_name.as_deref(), Some("default-scheduler"));
    let limits = spec.containers[0]
        .resources
        .as_ref()
        .unwrap()
        .limits
        .as_ref()
        .unwrap();
    assert_eq!(
        limits["nvidia.com/gpumem"].0, "4k",
        "quantities are stored canonical, as kube-apiserver does"
    );

    let dup = api_err(pods.create(&PostParams::default(), &pod("a")).await);
    assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"));

    let got = pods.get("a").await.unwrap();
    assert_eq!(got.metadata.uid.as_deref(), Some(uid.as_str()));
    pods.create(&PostParams::default(), &pod("b"))
        .await
        .unwrap();
    let list = pods.list(&ListParams::default()).await.unwrap();
    let names: Vec<_> = list
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);

    let mut edited = got.clone();
    edited
        .metadata
        .labels
        .get_or_insert_default()
        .insert("tier".into(), "gpu".into());
    let replaced = pods
        .replace("a", &PostParams::default(), &edited)
        .await
        .unwrap();
    assert_ne!(
        replaced.metadata.resource_version,
        got.metadata.resource_version
    );
    let sel = pods
        .list(&ListParams::default().labels("tier in (gpu,cpu)"))
        .await
        .unwrap();
    assert_eq!(sel.items.len(), 1);
    let sel = pods
        .list(&ListParams::default().fields("metadata.name=b"))
        .await
        .unwrap();
    assert_eq!(sel.items[0].metadata.name.as_deref(), Some("b"));

    pods.delete("a", &DeleteParams::default()).await.unwrap();
    let gone = api_err(pods.get("a").await);
    assert_eq!((gone.code, gone.reason.as_str()), (404, "NotFound"));
    assert_eq!(gone.message, "pods \"a\" not found");

    let elsewhere: Api<Pod> = Api::namespaced(s.client(None), "nowhere");
    let e = api_err(elsewhere.create(&PostParams::default(), &pod("c")).await);
    assert_eq!(
        (e.code, e.message.as_str()),
        (404, "namespaces \"nowhere\" not found")
    );
    let nss: Api<Namespace> = Api::all(s.client(None));
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "nowhere"}})).unwrap(),
    )
    .await
    .unwrap();
    elsewhere
        .create(&PostParams::default(), &pod("c"))
        .await
        .unwrap();

    let nodes: Api<Node> = Api::all(s.client(None));
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1"},
        "status": {"capacity": {"nvidia.com/gpu": 10}, "allocatable": {"memory": "16Gi"}}}))
    .unwrap();
    let n = nodes.create(&PostParams::default(), &node).await.unwrap();
    assert_eq!(
        n.status.unwrap().capacity.unwrap()["nvidia.com/gpu"].0,
        "10"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_sees_added_modified_deleted() {
    let s = server().await;
    let pods: Api<Pod> = Api::namespaced(s.client(None), "default");
    pods.create(&PostParams::default(), &pod("before"))
        .await
        .unwrap();
    let (reader, writer) = reflector::store::<Pod>();
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = events.clone();
    let stream = reflector(writer, watcher(pods.clone(), watcher::Config::default()))
        .default_backoff()
        .try_for_each(move |e| {
            let line = match &e {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => format!(
                    "apply {} {:?}",
                    p.metadata.name.as_deref().unwrap(),
                    p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("step"))
                        .cloned()
                ),
                watcher::Event::Delete(p) => {
                    format!("delete {}", p.metadata.name.as_deref().unwrap())
                }
                _ => return futures::future::ready(Ok(())),
            };
            seen.lock().unwrap().push(line);
            futures::future::ready(Ok(()))
        });
    let task = tokio::spawn(stream);
    reader.wait_until_ready().await.unwrap();
    assert!(reader
        .get(&reflector::ObjectRef::new("before").within("default"))
        .is_some());

    pods.create(&PostParams::default(), &pod("p"))
        .await
        .unwrap();
    pods.patch(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"step": "2"}}})),
    )
    .await
    .unwrap();
    pods.delete("p", &DeleteParams::default()).await.unwrap();
    let want = ["apply p None", "apply p Some(\"2\")", "delete p"];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = events.lock().unwrap().clone();
        let tail: Vec<&String> = got
            .iter()
            .filter(|l| l.ends_with(" p") || l.contains(" p "))
            .collect();
        if tail.len() >= want.len() {
            assert_eq!(tail, want, "all events: {got:?}");
            break;
        }
        assert!(Instant::now() < deadline, "events seen: {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reader
        .get(&reflector::ObjectRef::new("p").within("default"))
        .is_none());
    assert_eq!(reader.state().len(), 1);
    task.abort();
}

/// A watch on `spec.nodeName=n1` (as a kubelet's) sees an unbound pod appear when it is bound there, and go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_watch_sees_pod_arrive_on_binding() {
    let s = server().await;
    let pods: Api<Pod> = Api::namespaced(s.client(None), "default");
    let all: Api<Pod> = Api::all(s.client(None));
    let created = pods
        .create(&PostParams::default(), &pod("w"))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();
    let mut stream = all
        .watch(
            &WatchParams::default()
                .fields("spec.nodeName=n1")
                .timeout(20),
            &rv,
        )
        .await
        .unwrap()
        .boxed();
    pods.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"x": "1"}}})),
    )
    .await
    .unwrap();
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "w"},
                         "target": {"apiVersion": "v1", "kind": "Node", "name": "n1"}});
    pods.create_subresource::<Value, Value>("binding", "w", &PostParams::default(), &binding)
        .await
        .unwrap();
    pods.delete("w", &DeleteParams::default()).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            WatchEvent::Added(p) => {
                assert_eq!(p.spec.unwrap().node_name.as_deref(), Some("n1"));
                kinds.push("ADDED")
            }
            WatchEvent::Deleted(_) => kinds.push("DELETED"),
            WatchEvent::Modified(_) => kinds.push("MODIFIED"),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(
        kinds,
        ["ADDED", "DELETED"],
        "the annotation patch before binding is not this watch's business"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_patch_type() {
    let s = server().await;
    let pods: Api<Pod> = Api::namespaced(s.client(None), "default");
    let mut p = pod("p");
    p.spec.as_mut().unwrap().containers[0].env = Some(vec![serde_json::from_value(
        json!({"name": "A", "value": "1"}),
    )
    .unwrap()]);
    pods.create(&PostParams::default(), &p).await.unwrap();

    let merged = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": null, "m": "1"}}})),
        )
        .await
        .unwrap();
    let labels = merged.metadata.labels.unwrap();
    assert_eq!(
        (labels.get("app"), labels.get("m").map(String::as_str)),
        (None, Some("1"))
    );

    // Strategic: the container list is merged by name, so the limits stay; the same body as a merge patch
    // replaces the list, dropping them, which a pod may not do.
    let image = json!({"spec": {"containers": [{"name": "app", "image": "busybox:1.37"}]}});
    let e = api_err(
        pods.patch("p", &PatchParams::default(), &Patch::Merge(image.clone()))
            .await,
    );
    assert_eq!(e.code, 422, "{}", e.message);
    let sp = pods
        .patch("p", &PatchParams::default(), &Patch::Strategic(image))
        .await
        .unwrap();
    let c = &sp.spec.as_ref().unwrap().containers[0];
    assert_eq!(c.image.as_deref(), Some("busybox:1.37"));
    assert_eq!(c.env.as_ref().unwrap()[0].name, "A");
    assert!(
        c.resources.as_ref().unwrap().limits.is_some(),
        "fields the patch does not name stay"
    );
    // A node's conditions merge by type.
    let nodes: Api<Node> = Api::all(s.client(None));
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "n1"}, "status": {"conditions": [
                {"type": "Ready", "status": "False"}, {"type": "MemoryPressure", "status": "False"}]}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let n = nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            ),
        )
        .await
        .unwrap();
    let conds: Vec<(String, String)> = n
        .status
        .unwrap()
        .conditions
        .unwrap()
        .into_iter()
        .map(|c| (c.type_, c.status))
        .collect();
    assert_eq!(
        conds,
        [
            ("Ready".to_string(), "True".to_string()),
            ("MemoryPressure".to_string(), "False".to_string())
        ]
    );

    let jp: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/labels/m", "value": "1"},
        {"op": "add", "path": "/metadata/annotations", "value": {"j": "yes"}}
    ]))
    .unwrap();
    let j = pods
        .patch("p", &PatchParams::default(), &Patch::Json::<()>(jp))
        .await
        .unwrap();
    assert_eq!(j.metadata.annotations.unwrap()["j"], "yes");
    let failing: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/metadata/labels/m", "value": "2"}]))
            .unwrap();
    let e = api_err(
        pods.patch("p", &PatchParams::default(), &Patch::Json::<()>(failing))
            .await,
    );
    assert_eq!(e.code, 422);

    // Server-side apply creates what is missing and merges into what exists.
    let ssa = PatchParams::apply("standin-test");
    let applied = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q"},
                         "spec": {"containers": [{"name": "app", "image": "busybox:1.36"}]}});
    let q = pods
        .patch("q", &ssa, &Patch::Apply(&applied))
        .await
        .unwrap();
    assert_eq!(q.status.unwrap().phase.as_deref(), Some("Pending"));
    let again =
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q", "labels": {"s": "a"}}});
    let q = pods.patch("q", &ssa, &Patch::Apply(&again)).await.unwrap();
    assert_eq!(q.metadata.labels.unwrap()["s"], "a");
    assert_eq!(q.spec.unwrap().containers.len(), 1);

    // The status subresource writes status only; the main resource cannot write status.
    let st = pods
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}, "spec": {"nodeName": "sneaky"}})),
        )
        .await
        .unwrap();
    assert_eq!(st.status.unwrap().phase.as_deref(), Some("Running"));
    assert_eq!(st.spec.unwrap().node_name, None);
    let main = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Failed"}})),
        )
        .await
        .unwrap();
    assert_eq!(main.status.unwrap().phase.as_deref(), Some("Running"));
    // A pod's node is set by binding, not by an update.
    let e = api_err(
        pods.patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": "n9"}})),
        )
        .await,
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_resource_version_is_conflict() {
    let s = server().await;
    let pods: Api<Pod> = Api::namespaced(s.client(None), "default");
    let first = pods
        .create(&PostParams::default(), &pod("p"))
        .await
        .unwrap();
    pods.patch(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}})),
    )
    .await
    .unwrap();
    let mut stale = first.clone();
    stale
        .metadata
        .labels
        .get_or_insert_default()
        .insert("v".into(), "stale".into());
    let e = api_err(pods.replace("p", &PostParams::default(), &stale).await);
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(
        e.message.contains("the object has been modified"),
        "{}",
        e.message
    );
    let old_rv = first.metadata.resource_version.unwrap();
    let e = api_err(
        pods.patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": old_rv, "labels": {"v": "3"}}})),
        )
        .await,
    );
    assert_eq!(e.code, 409);
    let now = pods.get("p").await.unwrap();
    assert_eq!(
        now.metadata.labels.unwrap()["v"],
        "2",
        "a refused write changes nothing"
    );
    // The current version is accepted.
    let rv = now.metadata.resource_version.unwrap();
    pods.patch(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"resourceVersion": rv, "labels": {"v": "4"}}})),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_sets_the_node_once() {
    let s = server().await;
    let pods: Api<Pod> = Api::namespaced(s.client(None), "default");
    pods.create(&PostParams::default(), &pod("p"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("q"))
        .await
        .unwrap();
    let bind = |pod: &str, node: &str| {
        json!({"apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": pod, "annotations": {"hami.io/bind-phase": "allocating"}},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node}})
    };
    let ok: Value = pods
        .create_subresource("binding", "p", &PostParams::default(), &bind("p", "n1"))
        .await
        .unwrap();
    assert_eq!(ok["status"], "Success");
    let p = pods.get("p").await.unwrap();
    assert_eq!(p.spec.as_ref().unwrap().node_name.as_deref(), Some("n1"));
    assert_eq!(
        p.metadata.annotations.as_ref().unwrap()["hami.io/bind-phase"],
        "allocating"
    );
    let conds = p.status.unwrap().conditions.unwrap();
    assert!(conds
        .iter()
        .any(|c| c.type_ == "PodScheduled" && c.status == "True"));
    let e = api_err(
        pods.create_subresource::<Value, Value>(
            "binding",
            "p",
            &PostParams::default(),
            &bind("p", "n2"),
        )
        .await,
    );
    assert_eq!(e.code, 409);
    assert!(
        e.message.contains("already assigned to node \"n1\""),
        "{}",
        e.message
    );

    // The `bindings` collection, as older schedulers post to.
    let req = axum::http::Request::post("/api/v1/namespaces/default/bindings")
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&bind("q", "n2")).unwrap())
        .unwrap();
    s.client(None).request_text(req).await.unwrap();
    assert_eq!(
        pods.get("q")
            .await
            .unwrap()
            .spec
            .unwrap()
            .node_name
            .as_deref(),
        Some("n2")
    );
}

/// A webhook server for tests: answers each AdmissionReview with `answer(request)` and keeps the requests.
struct Hook {
    addr: SocketAddr,
    reviews: Arc<Mutex<Vec<Value>>>,
}

async fn hook(answer: fn(&Value) -> Value) -> Hook {
    let reviews = Arc::new(Mutex::new(Vec::new()));
    let kept = reviews.clone();
    let app = axum::Router::new().route(
        "/admit",
        axum::routing::post(move |axum::Json(review): axum::Json<Value>| {
            let kept = kept.clone();
            async move {
                let req = review["request"].clone();
                kept.lock().unwrap().push(req.clone());
                let mut response = answer(&req);
                response["uid"] = req["uid"].clone();
                axum::Json(json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(local()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Hook { addr, reviews }
}

fn set_scheduler(req: &Value) -> Value {
    let mut ops =
        vec![json!({"op": "replace", "path": "/spec/schedulerName", "value": "vgpu-scheduler"})];
    if req["operation"] == "UPDATE" {
        ops.push(json!({"op": "add", "path": "/metadata/labels/updated-by", "value": req["userInfo"]["username"]}));
    }
    let patch = base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&ops).unwrap());
    json!({"allowed": true, "patchType": "JSONPatch", "patch": patch})
}

fn refuse_big(req: &Value) -> Value {
    let mem = &req["object"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpumem"];
    if mem == "4k" {
        let user = req["userInfo"]["username"].as_str().unwrap();
        json!({"allowed": false, "status": {"code": 403, "message": format!("{user} may not ask for {}", mem.as_str().unwrap())}})
    } else {
        json!({"allowed": true})
    }
}

fn tokens() -> Users {
    Users::parse("sched-token,system:serviceaccount:kube-system:vgpu-scheduler,1\ntenant-token,alice,2,\"tenants\"\n").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_mutate_and_refuse_with_the_user() {
    let mutate = hook(set_scheduler).await;
    let validate = hook(refuse_big).await;
    let config = Config {
        mutating_webhooks: vec![format!("vgpu-webhook=http://{}/admit", mutate.addr)
            .parse()
            .unwrap()],
        validating_webhooks: vec![format!("http://{}/admit", validate.addr)
            .parse::<WebhookSpec>()
            .unwrap()],
        users: tokens(),
        ..Config::default()
    };
    let s = Standin::start(local(), config).await.unwrap();
    let tenant: Api<Pod> = Api::namespaced(s.client(Some("tenant-token")), "default");
    let sched: Api<Pod> = Api::namespaced(s.client(Some("sched-token")), "default");

    let mut small = pod("small");
    small.spec.as_mut().unwrap().containers[0]
        .resources
        .as_mut()
        .unwrap()
        .limits
        .as_mut()
        .unwrap()
        .insert(
            "nvidia.com/gpumem".into(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("2000".into()),
        );
    let created = tenant.create(&PostParams::default(), &small).await.unwrap();
    assert_eq!(
        created.spec.as_ref().unwrap().scheduler_name.as_deref(),
        Some("vgpu-scheduler")
    );
    let review = mutate.reviews.lock().unwrap()[0].clone();
    assert_eq!(review["operation"], "CREATE");
    assert_eq!(
        review["kind"],
        json!({"group": "", "version": "v1", "kind": "Pod"})
    );
    assert_eq!(review["resource"]["resource"], "pods");
    assert_eq!(review["namespace"], "default");
    assert_eq!(review["name"], "small");
    assert_eq!(review["userInfo"]["username"], "alice");
    assert_eq!(
        review["userInfo"]["groups"],
        json!(["tenants", "system:authenticated"])
    );
    assert_eq!(
        review["object"]["spec"]["schedulerName"], "default-scheduler",
        "the webhook sees the defaults"
    );
    assert!(review["oldObject"].is_null());
    assert_eq!(review["uid"].as_str().unwrap().len(), 36);
    let validated = validate.reviews.lock().unwrap()[0].clone();
    assert_eq!(
        validated["object"]["spec"]["schedulerName"], "vgpu-scheduler",
        "validation sees the mutation"
    );

    // An update goes through the webhooks too, with the old object and the updating user.
    let updated = sched
        .patch(
            "small",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        updated.metadata.labels.unwrap()["updated-by"],
        "system:serviceaccount:kube-system:vgpu-scheduler"
    );
    let review = mutate.reviews.lock().unwrap().last().unwrap().clone();
    assert_eq!(review["operation"], "UPDATE");
    assert_eq!(review["oldObject"]["metadata"]["name"], "small");
    assert!(review["oldObject"]["metadata"]["annotations"]
        .get("a")
        .is_none());

    let e = api_err(tenant.create(&PostParams::default(), &pod("big")).await);
    assert_eq!(e.code, 403);
    assert_eq!(
        e.message,
        format!(
            "admission webhook \"{}\" denied the request: alice may not ask for 4k",
            validate.addr.ip()
        )
    );
    assert!(
        api_err(tenant.get("big").await).code == 404,
        "a refused pod is not stored"
    );

    // Anonymous requests are allowed and named so; an unknown token is not.
    let anon: Api<Pod> = Api::namespaced(s.client(None), "default");
    anon.create(&PostParams::default(), &{
        let mut p = small.clone();
        p.metadata.name = Some("anon".into());
        p
    })
    .await
    .unwrap();
    let review = mutate.reviews.lock().unwrap().last().unwrap().clone();
    assert_eq!(review["userInfo"]["username"], "system:anonymous");
    let bad: Api<Pod> = Api::namespaced(s.client(Some("nope")), "default");
    assert_eq!(api_err(bad.get("small").await).code, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_webhook_fails_closed() {
    let dead = std::net::TcpListener::bind(local()).unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let config = Config {
        mutating_webhooks: vec![format!("vgpu=http://{addr}/admit").parse().unwrap()],
        ..Config::default()
    };
    let s = Standin::start(local(), config).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(s.client(None), "default");
    let e = api_err(pods.create(&PostParams::default(), &pod("p")).await);
    assert_eq!(e.code, 500);
    assert!(
        e.message.contains("failed calling webhook \"vgpu\""),
        "{}",
        e.message
    );
}

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        // kubectl keeps its discovery cache under $HOME: the test's directory, not the user's or the crate's.
        .env(
            "HOME",
            kubeconfig
                .parent()
                .expect("the kubeconfig is in a directory"),
        )
        .args(args)
        .output()
        .expect("kubectl is installed");
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The server process, killed when the test ends, passing or not.
struct Server(Option<vgpu_integration::Running>);

impl Server {
    fn spawn(cmd: &mut Command) -> Server {
        Server(Some(vgpu_integration::Running::spawn(cmd)))
    }
    fn first_line(&mut self) -> String {
        self.0
            .as_mut()
            .unwrap()
            .wait_line("", Duration::from_secs(20))
            .expect("kube-standin prints its port")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.kill9();
        }
    }
}

fn repo_file(rel: &str) -> String {
    format!("{}/../{rel}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn kubectl_against_the_binary() {
    let dir = tempfile_dir();
    let kc = dir.join("kubeconfig");
    let tokens_file = dir.join("tokens.csv");
    std::fs::write(&tokens_file, "admin-token,admin,0,\"system:masters\"\n").unwrap();
    let mut server = Server::spawn(
        Command::new(env!("CARGO_BIN_EXE_kube-standin"))
            .args(["--listen", "127.0.0.1:0", "--kubeconfig-out"])
            .arg(&kc)
            .arg("--token-auth-file")
            .arg(&tokens_file)
            .args(["--kubeconfig-token", "admin-token"]),
    );
    let port = server.first_line();
    let port: u16 = port.trim().parse().expect("the first line is the port");
    assert!(std::fs::read_to_string(&kc)
        .unwrap()
        .contains(&format!("http://127.0.0.1:{port}")));

    let out = kubectl(
        &kc,
        &[
            "apply",
            "-f",
            &repo_file("deploy/examples/gpumem-pod-a.yaml"),
        ],
    );
    assert_eq!(out.trim(), "pod/gpumem-pod-a created");
    // Applied again, the pod is unchanged: kubectl sends `4000` where the server holds `4k` (so it says
    // "configured", as against a real server), and the server stores nothing new.
    let rv = |kc: &std::path::Path| {
        kubectl(
            kc,
            &[
                "get",
                "pod",
                "gpumem-pod-a",
                "-o",
                "jsonpath={.metadata.resourceVersion}",
            ],
        )
    };
    let before = rv(&kc);
    kubectl(
        &kc,
        &[
            "apply",
            "-f",
            &repo_file("deploy/examples/gpumem-pod-a.yaml"),
        ],
    );
    assert_eq!(rv(&kc), before);
    let out = kubectl(
        &kc,
        &[
            "get",
            "pod",
            "gpumem-pod-a",
            "-o",
            "jsonpath={.status.phase} {.spec.containers[0].resources.limits.nvidia\\.com/gpumem}",
        ],
    );
    assert_eq!(out, "Pending 4k");
    kubectl(
        &kc,
        &["annotate", "pod", "gpumem-pod-a", "hami.io/vgpu-node=node1"],
    );
    let out = kubectl(
        &kc,
        &[
            "get",
            "pod",
            "gpumem-pod-a",
            "-o",
            "jsonpath={.metadata.annotations.hami\\.io/vgpu-node}",
        ],
    );
    assert_eq!(out, "node1");
    kubectl(&kc, &["label", "pod", "gpumem-pod-a", "lab=3"]);
    let out = kubectl(&kc, &["get", "pods", "-l", "lab=3", "-o", "name"]);
    assert_eq!(out.trim(), "pod/gpumem-pod-a");
    // kubectl (client-go) sends no credentials over plain HTTP, so it is anonymous here; kube-rs sends the
    // kubeconfig's token (checked below).
    let out = kubectl(
        &kc,
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
    );
    assert_eq!(out, "system:anonymous");

    // An event as a scheduler records it (events.k8s.io/v1) shows in describe, read back as a core v1 event.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let kubeconfig = kube::config::Kubeconfig::read_from(&kc).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let review = axum::http::Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
            .header("content-type", "application/json")
            .body(br#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#.to_vec())
            .unwrap();
        let review: Value = serde_json::from_str(&client.request_text(review).await.unwrap()).unwrap();
        assert_eq!(review["status"]["userInfo"]["username"], "admin");
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let p = pods.get("gpumem-pod-a").await.unwrap();
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "default");
        let ev = json!({"metadata": {"generateName": "gpumem-pod-a."},
            "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": "vgpu-scheduler",
            "reportingInstance": "vgpu-scheduler-0", "action": "Binding", "reason": "BindingSucceed", "type": "Normal",
            "note": "Successfully binding node [node1] to default/gpumem-pod-a",
            "regarding": {"kind": "Pod", "namespace": "default", "name": "gpumem-pod-a",
                          "uid": p.metadata.uid, "apiVersion": "v1"}});
        events.create(&PostParams::default(), &serde_json::from_value(ev).unwrap()).await.unwrap();
        let core: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
        let listed = core.list(&ListParams::default().fields("involvedObject.name=gpumem-pod-a")).await.unwrap();
        assert_eq!(listed.items[0].message.as_deref(), Some("Successfully binding node [node1] to default/gpumem-pod-a"));
        let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "gpumem-pod-a"},
                             "target": {"kind": "Node", "name": "node1"}});
        pods.create_subresource::<Value, Value>("binding", "gpumem-pod-a", &PostParams::default(), &binding)
            .await
            .unwrap();
    });
    let out = kubectl(&kc, &["describe", "pod", "gpumem-pod-a"]);
    assert!(out.contains("BindingSucceed"), "{out}");
    assert!(
        out.contains("Successfully binding node [node1] to default/gpumem-pod-a"),
        "{out}"
    );
    assert!(out.contains("hami.io/vgpu-node: node1"), "{out}");
    let wide = kubectl(&kc, &["get", "pods", "-o", "wide"]);
    let row = wide
        .lines()
        .find(|l| l.starts_with("gpumem-pod-a"))
        .expect(&wide);
    assert!(
        row.split_whitespace().any(|c| c == "node1"),
        "NODE column: {wide}"
    );

    let node = dir.join("node.yaml");
    std::fs::write(&node, "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n  annotations:\n    hami.io/node-handshake: Requesting_2026.01.01 00:00:00\nstatus:\n  capacity:\n    nvidia.com/gpu: 10\n").unwrap();
    kubectl(&kc, &["apply", "-f", node.to_str().unwrap()]);
    let yaml = kubectl(&kc, &["get", "nodes", "-o", "yaml"]);
    assert!(
        yaml.contains("hami.io/node-handshake: Requesting_2026.01.01 00:00:00"),
        "{yaml}"
    );
    assert!(yaml.contains("nvidia.com/gpu: \"10\""), "{yaml}");
    kubectl(&kc, &["delete", "pod", "gpumem-pod-a"]);
    let out = kubectl(&kc, &["get", "pods", "-o", "name"]);
    assert_eq!(out.trim(), "");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "standin-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// 1,000 pods created while 20 watches run: every watch sees every pod, in resourceVersion order. A correctness
/// check under load (it prints the time taken; it asserts no timing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_creates_under_twenty_watches() {
    const PODS: usize = 1000;
    const WATCHES: usize = 20;
    let s = server().await;
    let all: Api<Pod> = Api::all(s.client(None));
    let start_rv = all
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut watchers = Vec::new();
    for _ in 0..WATCHES {
        let stream = all
            .watch(&WatchParams::default().timeout(120), &start_rv)
            .await
            .unwrap();
        watchers.push(tokio::spawn(async move {
            let mut stream = stream.boxed();
            let mut names = Vec::with_capacity(PODS);
            let mut last_rv = 0u64;
            while names.len() < PODS {
                match stream.next().await {
                    Some(Ok(WatchEvent::Added(p))) => {
                        let rv: u64 = p.metadata.resource_version.unwrap().parse().unwrap();
                        assert!(rv > last_rv, "events in resourceVersion order");
                        last_rv = rv;
                        names.push(p.metadata.name.unwrap());
                    }
                    Some(Ok(WatchEvent::Bookmark(_))) => {}
                    other => panic!("unexpected {other:?} after {} pods", names.len()),
                }
            }
            names
        }));
    }
    let t0 = Instant::now();
    let pods: Api<Pod> = Api::namespaced(s.client(None), "default");
    let creates = futures::stream::iter(0..PODS)
        .map(|i| {
            let pods = pods.clone();
            async move {
                pods.create(&PostParams::default(), &pod(&format!("load-{i}")))
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(32)
        .count()
        .await;
    assert_eq!(creates, PODS);
    let mut counts = HashMap::new();
    for w in watchers {
        let names = tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .unwrap()
            .unwrap();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), PODS, "each pod seen once");
        *counts.entry(names.len()).or_insert(0) += 1;
    }
    assert_eq!(counts, HashMap::from([(PODS, WATCHES)]));
    println!(
        "{PODS} creates seen by {WATCHES} watches in {:?}",
        t0.elapsed()
    );
}

/// A watch from a version older than the kept history is told 410 Gone, and kube-rs's watcher recovers by
/// listing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_old_watch_is_gone() {
    let s = Standin::start(
        local(),
        Config {
            history: 5,
            ..Config::default()
        },
    )
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(s.client(None), "default");
    let first = pods
        .create(&PostParams::default(), &pod("p0"))
        .await
        .unwrap();
    for i in 1..10 {
        pods.create(&PostParams::default(), &pod(&format!("p{i}")))
            .await
            .unwrap();
    }
    let rv = first.metadata.resource_version.unwrap();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.next().await {
        Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
    let (reader, writer) = reflector::store::<Pod>();
    let task = tokio::spawn(
        reflector(writer, watcher(pods.clone(), watcher::Config::default()))
            .default_backoff()
            .for_each(|_| async {}),
    );
    reader.wait_until_ready().await.unwrap();
    assert_eq!(reader.state().len(), 10);
    task.abort();
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with openssl: (dir, ca.pem, tls.pem, tls.key).
fn certificates() -> (std::path::PathBuf, [std::path::PathBuf; 3]) {
    let dir = tempfile_dir();
    let p = |n: &str| dir.join(n);
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: Vec<Vec<String>> = vec![
        [
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=standin-test-ca",
            ],
        ]
        .concat(),
        [
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "tls.key",
                "-out",
                "tls.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "tls.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    for args in steps {
        let out = Command::new("openssl")
            .current_dir(&dir)
            .args(&args)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (dir.clone(), [p("ca.pem"), p("tls.pem"), p("tls.key")])
}

/// Over HTTPS, with a https webhook: the webhook is reached through --webhook-ca, and kubectl (which sends its
/// token only over TLS) acts as the token's user: `auth whoami` names it and the webhook sees it.
#[test]
fn https_server_and_webhook_with_kubectl_users() {
    let (dir, [ca, cert, key]) = certificates();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The webhook, over TLS with the same certificate.
    let reviews = Arc::new(Mutex::new(Vec::<Value>::new()));
    let hook_addr = rt.block_on(async {
        let kept = reviews.clone();
        let app = axum::Router::new().route(
            "/validate",
            axum::routing::post(move |axum::Json(review): axum::Json<Value>| {
                let kept = kept.clone();
                async move {
                    let req = review["request"].clone();
                    kept.lock().unwrap().push(req.clone());
                    let user = req["userInfo"]["username"].as_str().unwrap_or("").to_string();
                    let allowed = user != "tenant";
                    axum::Json(json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                        "response": {"uid": req["uid"], "allowed": allowed,
                                     "status": {"message": format!("{user} may not create pods here")}}}))
                }
            }),
        );
        let tcp = tokio::net::TcpListener::bind(local()).await.unwrap();
        let listener = vgpu_integration::standin::tls::TlsListener::new(
            tcp,
            vgpu_integration::standin::tls::server_config(&cert, &key).unwrap(),
        )
        .unwrap();
        let addr = axum::serve::Listener::local_addr(&listener).unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    });
    let tokens = dir.join("tokens.csv");
    std::fs::write(
        &tokens,
        "admin-token,admin,0\ntenant-token,tenant,1,\"tenants\"\n",
    )
    .unwrap();
    let kc_admin = dir.join("admin.kubeconfig");
    let mut server = Server::spawn(
        Command::new(env!("CARGO_BIN_EXE_kube-standin"))
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-private-key-file")
            .arg(&key)
            .arg("--kubeconfig-ca")
            .arg(&ca)
            .arg("--kubeconfig-out")
            .arg(&kc_admin)
            .args(["--kubeconfig-token", "admin-token"])
            .arg("--token-auth-file")
            .arg(&tokens)
            .arg("--validating-webhook")
            .arg(format!(
                "tenancy=https://127.0.0.1:{}/validate",
                hook_addr.port()
            ))
            .arg("--webhook-ca")
            .arg(&ca),
    );
    server.first_line();
    let kc_tenant = dir.join("tenant.kubeconfig");
    std::fs::write(
        &kc_tenant,
        std::fs::read_to_string(&kc_admin)
            .unwrap()
            .replace("admin-token", "tenant-token"),
    )
    .unwrap();

    let whoami = |kc: &std::path::Path| {
        kubectl(
            kc,
            &[
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username}",
            ],
        )
    };
    assert_eq!(whoami(&kc_admin), "admin");
    assert_eq!(whoami(&kc_tenant), "tenant");
    let pod_a = repo_file("deploy/examples/gpumem-pod-a.yaml");
    assert_eq!(
        kubectl(&kc_admin, &["apply", "-f", &pod_a]).trim(),
        "pod/gpumem-pod-a created"
    );
    let out = Command::new("kubectl")
        .env("KUBECONFIG", &kc_tenant)
        .env("HOME", &dir)
        .args([
            "apply",
            "-f",
            &repo_file("deploy/examples/gpumem-pod-b.yaml"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "admission webhook \"tenancy\" denied the request: tenant may not create pods here"
        ),
        "{stderr}"
    );
    let users: Vec<String> = reviews
        .lock()
        .unwrap()
        .iter()
        .map(|r| r["userInfo"]["username"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(users, ["admin", "tenant"]);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// kube-rs's event Recorder (events.k8s.io/v1: create, then a merge patch for the series) against the server,
/// read back through core v1 as `kubectl describe` reads events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_events_read_back_as_core_events() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    use kube::Resource;
    let s = server().await;
    let pods: Api<Pod> = Api::namespaced(s.client(None), "default");
    let p = pods
        .create(&PostParams::default(), &pod("p"))
        .await
        .unwrap();
    let recorder = Recorder::new(
        s.client(None),
        Reporter {
            controller: "vgpu-scheduler".into(),
            instance: Some("vgpu-scheduler-0".into()),
        },
    );
    let ev = Event {
        type_: EventType::Normal,
        reason: "FilteringSucceed".into(),
        note: Some("Successfully filtered to following nodes: [node1]".into()),
        action: "Filtering".into(),
        secondary: None,
    };
    let reference = p.object_ref(&());
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();
    let core: Api<CoreEvent> = Api::namespaced(s.client(None), "default");
    let uid = p.metadata.uid.unwrap();
    let listed = core
        .list(&ListParams::default().fields(&format!(
            "involvedObject.name=p,involvedObject.namespace=default,involvedObject.kind=Pod,involvedObject.uid={uid}"
        )))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1, "{:?}", listed.items);
    let e = &listed.items[0];
    assert_eq!(e.reason.as_deref(), Some("FilteringSucceed"));
    assert_eq!(
        e.message.as_deref(),
        Some("Successfully filtered to following nodes: [node1]")
    );
    assert_eq!(e.reporting_component.as_deref(), Some("vgpu-scheduler"));
    assert_eq!(e.series.as_ref().map(|s| s.count), Some(Some(2)));
}

fn allow(_: &Value) -> Value {
    json!({"allowed": true})
}

/// Optimistic concurrency holds under a race, with a webhook call between each writer's read and its write: of
/// 20 writers that read the same version, exactly one wins and the rest get 409; 20 unpinned merge patches
/// racing each other all land (none lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_one_wins_none_lost() {
    let hook = hook(allow).await;
    let config = Config {
        mutating_webhooks: vec![format!("http://{}/admit", hook.addr).parse().unwrap()],
        ..Config::default()
    };
    let s = Standin::start(local(), config).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(s.client(None), "default");
    let read = pods
        .create(&PostParams::default(), &pod("p"))
        .await
        .unwrap();
    let tries = (0..20).map(|i| {
        let (pods, mut mine) = (pods.clone(), read.clone());
        mine.metadata.annotations =
            Some([("hami.io/mutex.lock".to_string(), format!("owner-{i}"))].into());
        tokio::spawn(async move { pods.replace("p", &PostParams::default(), &mine).await })
    });
    let mut won = 0;
    for t in tries {
        match t.await.unwrap() {
            Ok(_) => won += 1,
            Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won, 1);

    let patches = (0..20).map(|i| {
        let pods = pods.clone();
        tokio::spawn(async move {
            pods.patch(
                "p",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {format!("l{i}"): "x"}}})),
            )
            .await
            .unwrap()
        })
    });
    futures::future::join_all(patches).await;
    let labels = pods.get("p").await.unwrap().metadata.labels.unwrap();
    assert_eq!(labels.len(), 21, "app and l0..l19: {labels:?}");
}

/// A label-selected watch sees an object leave its selection as DELETED and come back as ADDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selected_watch_sees_objects_enter_and_leave() {
    let s = server().await;
    let pods: Api<Pod> = Api::namespaced(s.client(None), "default");
    let p = pods
        .create(&PostParams::default(), &pod("p"))
        .await
        .unwrap();
    let rv = p.metadata.resource_version.unwrap();
    let mut stream = pods
        .watch(&WatchParams::default().labels("app=lab").timeout(20), &rv)
        .await
        .unwrap()
        .boxed();
    let set = |v: &str| Patch::Merge(json!({"metadata": {"labels": {"app": v}}}));
    pods.patch("p", &PatchParams::default(), &set("other"))
        .await
        .unwrap();
    pods.patch("p", &PatchParams::default(), &set("lab"))
        .await
        .unwrap();
    pods.patch(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"a": "1"}}})),
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match e {
            WatchEvent::Added(_) => seen.push("ADDED"),
            WatchEvent::Modified(_) => seen.push("MODIFIED"),
            WatchEvent::Deleted(_) => seen.push("DELETED"),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(seen, ["DELETED", "ADDED", "MODIFIED"]);
}

/// kube-rs's watcher in streaming-list mode (`sendInitialEvents=true`): the current objects, then the bookmark
/// that ends them, then changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_watcher() {
    let s = server().await;
    let pods: Api<Pod> = Api::namespaced(s.client(None), "default");
    pods.create(&PostParams::default(), &pod("a"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("b"))
        .await
        .unwrap();
    let (reader, writer) = reflector::store::<Pod>();
    let task = tokio::spawn(
        reflector(
            writer,
            watcher(pods.clone(), watcher::Config::default().streaming_lists()),
        )
        .default_backoff()
        .for_each(|_| async {}),
    );
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reader.state().len(), 2);
    pods.create(&PostParams::default(), &pod("c"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while reader.state().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the watch after the initial events delivers the new pod"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
}
