//! Test doubles for the node side's tests: an in-memory API server (pods, nodes, events; merge patches with
//! resourceVersion preconditions; list and watch as kube-rs speaks them, over plain HTTP) and the kubelet's
//! side of the device-plugin and PodResources sockets.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use vgpu_agent::gpus::Card;
use vgpu_agent::ledger::bindings::Binding;
use vgpu_agent::node::bind::ContainerBinder;
use vgpu_contract::container_dir::LimitsState;
use vgpu_contract::placement_seal;
use vgpu_kubelet_api::deviceplugin::registration_server::{Registration, RegistrationServer};
use vgpu_kubelet_api::deviceplugin::{Empty, RegisterRequest};
use vgpu_kubelet_api::podresources::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use vgpu_kubelet_api::podresources::{
    ContainerDevices, ContainerResources, ListPodResourcesRequest, ListPodResourcesResponse,
    PodResources,
};

pub const NODE: &str = "node-1";
pub const KEY: &[u8] = b"test seal key";

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "vgpu-node-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------------------
// The API server.

#[derive(Default)]
struct Db {
    rv: u64,
    pods: BTreeMap<(String, String), Value>,
    nodes: BTreeMap<String, Value>,
    events: Vec<Value>,
    /// (rv, type, object) of every pod change, for watches that resume.
    history: Vec<(u64, String, Value)>,
    /// Precondition failures to inject: pod name → how many patches still get 409.
    conflicts: BTreeMap<String, u32>,
    /// Every write made: (method, path, body).
    writes: Vec<(String, String, Value)>,
}

#[derive(Clone)]
pub struct FakeApi {
    db: Arc<Mutex<Db>>,
    tx: broadcast::Sender<(u64, String, Value)>,
    pub url: String,
}

fn merge(target: &mut Value, patch: &Value) {
    // RFC 7386.
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = json!({});
        }
        let t = target.as_object_mut().unwrap();
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    } else {
        *target = patch.clone();
    }
}

fn reply(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    reply(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3D", "=").replace("%2F", "/")))
        .collect()
}

fn on_node(pod: &Value, selector: Option<&String>) -> bool {
    match selector.and_then(|s| s.strip_prefix("spec.nodeName=")) {
        Some(n) => pod["spec"]["nodeName"].as_str() == Some(n),
        None => true,
    }
}

impl FakeApi {
    pub async fn start() -> Self {
        let (tx, _) = broadcast::channel(1024);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let api = FakeApi {
            db: Arc::new(Mutex::new(Db::default())),
            tx,
            url,
        };
        let app = axum::Router::new()
            .route("/api/v1/pods", axum::routing::get(list_pods))
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}",
                axum::routing::get(get_pod).patch(patch_pod),
            )
            .route(
                "/api/v1/namespaces/{ns}/events",
                axum::routing::post(post_event),
            )
            .route(
                "/api/v1/nodes/{name}",
                axum::routing::get(get_node).patch(patch_node),
            )
            .with_state(api.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        api
    }

    pub fn client(&self) -> kube::Client {
        let cfg = kube::Config::new(self.url.parse().unwrap());
        kube::Client::try_from(cfg).unwrap()
    }

    fn bump(db: &mut Db, obj: &mut Value) -> u64 {
        db.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(db.rv.to_string());
        db.rv
    }

    fn changed(&self, db: &mut Db, kind: &str, pod: &Value) {
        let rv = db.rv;
        db.history.push((rv, kind.to_string(), pod.clone()));
        let _ = self.tx.send((rv, kind.to_string(), pod.clone()));
    }

    pub fn add_node(&self, name: &str, annotations: Value) {
        let mut db = self.db.lock().unwrap();
        let mut n = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": format!("uid-{name}"), "annotations": annotations}});
        Self::bump(&mut db, &mut n);
        db.nodes.insert(name.to_string(), n);
    }

    pub fn node(&self, name: &str) -> Value {
        self.db.lock().unwrap().nodes[name].clone()
    }

    pub fn put_pod(&self, mut pod: Value) {
        let mut db = self.db.lock().unwrap();
        pod["apiVersion"] = json!("v1");
        pod["kind"] = json!("Pod");
        Self::bump(&mut db, &mut pod);
        let key = (
            pod["metadata"]["namespace"].as_str().unwrap().to_string(),
            pod["metadata"]["name"].as_str().unwrap().to_string(),
        );
        let kind = if db.pods.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        db.pods.insert(key, pod.clone());
        self.changed(&mut db, kind, &pod);
    }

    /// Deletes a pod of the default namespace (a DELETED watch event).
    pub fn delete_pod(&self, name: &str) {
        let mut db = self.db.lock().unwrap();
        let Some(mut pod) = db.pods.remove(&("default".to_string(), name.to_string())) else {
            return;
        };
        Self::bump(&mut db, &mut pod);
        self.changed(&mut db, "DELETED", &pod);
    }

    pub fn pod(&self, name: &str) -> Value {
        let db = self.db.lock().unwrap();
        db.pods
            .iter()
            .find(|((_, n), _)| n == name)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn annotation(&self, pod: &str, key: &str) -> Option<String> {
        self.pod(pod)["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_string)
    }

    /// Sets a pod's status (as the kubelet would).
    pub fn set_status(&self, name: &str, status: Value) {
        let mut p = self.pod(name);
        p["status"] = status;
        self.put_pod(p);
    }

    pub fn events(&self) -> Vec<Value> {
        self.db.lock().unwrap().events.clone()
    }

    pub fn writes(&self) -> Vec<(String, String, Value)> {
        self.db.lock().unwrap().writes.clone()
    }

    pub fn conflict_next_patches(&self, pod: &str, n: u32) {
        self.db.lock().unwrap().conflicts.insert(pod.to_string(), n);
    }
}

async fn list_pods(State(api): State<FakeApi>, uri: Uri) -> Response {
    let q = query(&uri);
    let sel = q.get("fieldSelector");
    if q.get("watch").map(String::as_str) != Some("true") {
        let db = api.db.lock().unwrap();
        let items: Vec<Value> = db
            .pods
            .values()
            .filter(|p| on_node(p, sel))
            .cloned()
            .collect();
        return reply(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "PodList",
                    "metadata": {"resourceVersion": db.rv.to_string()}, "items": items}),
        );
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    // Subscribe before reading the history, so nothing falls between the two.
    let mut rx = api.tx.subscribe();
    let backlog: Vec<(u64, String, Value)> = api
        .db
        .lock()
        .unwrap()
        .history
        .iter()
        .filter(|(rv, _, _)| *rv > from)
        .cloned()
        .collect();
    let sel = sel.cloned();
    let (out, body_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        let mut last = from;
        let line = |t: &str, o: &Value| {
            let mut v = serde_json::to_vec(&json!({"type": t, "object": o})).unwrap();
            v.push(b'\n');
            Ok(Bytes::from(v))
        };
        for (rv, t, o) in backlog {
            if on_node(&o, sel.as_ref()) && out.send(line(&t, &o)).await.is_err() {
                return;
            }
            last = rv;
        }
        while let Ok((rv, t, o)) = rx.recv().await {
            if rv <= last || !on_node(&o, sel.as_ref()) {
                continue;
            }
            last = rv;
            if out.send(line(&t, &o)).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(body_rx),
        ))
        .unwrap()
}

async fn get_pod(
    State(api): State<FakeApi>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    match api.db.lock().unwrap().pods.get(&(ns, name.clone())) {
        Some(p) => reply(StatusCode::OK, p),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pods \"{name}\" not found"),
        ),
    }
}

async fn patch_pod(
    State(api): State<FakeApi>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let patch: Value = serde_json::from_slice(&body).unwrap();
    let mut db = api.db.lock().unwrap();
    db.writes
        .push((method.to_string(), uri.path().to_string(), patch.clone()));
    let Some(mut pod) = db.pods.get(&(ns.clone(), name.clone())).cloned() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pods \"{name}\" not found"),
        );
    };
    if let Some(want) = patch["metadata"]["resourceVersion"].as_str() {
        let left = db.conflicts.get(&name).copied().unwrap_or(0);
        if left > 0 {
            db.conflicts.insert(name.clone(), left - 1);
            // Another writer got there first: the pod moves on.
            pod["metadata"]["labels"]["touched"] = json!(left.to_string());
            FakeApi::bump(&mut db, &mut pod);
            db.pods.insert((ns.clone(), name.clone()), pod.clone());
            api.changed(&mut db, "MODIFIED", &pod);
        }
        if pod["metadata"]["resourceVersion"].as_str() != Some(want) {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                &format!("Operation cannot be fulfilled on pods \"{name}\": the object has been modified"),
            );
        }
    }
    merge(&mut pod, &patch);
    FakeApi::bump(&mut db, &mut pod);
    db.pods.insert((ns, name), pod.clone());
    api.changed(&mut db, "MODIFIED", &pod);
    reply(StatusCode::OK, &pod)
}

async fn post_event(
    State(api): State<FakeApi>,
    UrlPath(_ns): UrlPath<String>,
    uri: Uri,
    body: Bytes,
) -> Response {
    let mut ev: Value = serde_json::from_slice(&body).unwrap();
    let mut db = api.db.lock().unwrap();
    db.writes
        .push(("POST".into(), uri.path().to_string(), ev.clone()));
    let n = db.events.len();
    ev["metadata"]["name"] = json!(format!(
        "{}{n}",
        ev["metadata"]["generateName"].as_str().unwrap_or("ev.")
    ));
    FakeApi::bump(&mut db, &mut ev);
    db.events.push(ev.clone());
    reply(StatusCode::CREATED, &ev)
}

async fn get_node(State(api): State<FakeApi>, UrlPath(name): UrlPath<String>) -> Response {
    match api.db.lock().unwrap().nodes.get(&name) {
        Some(n) => reply(StatusCode::OK, n),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("nodes \"{name}\" not found"),
        ),
    }
}

async fn patch_node(
    State(api): State<FakeApi>,
    UrlPath(name): UrlPath<String>,
    uri: Uri,
    body: Bytes,
) -> Response {
    let patch: Value = serde_json::from_slice(&body).unwrap();
    let mut db = api.db.lock().unwrap();
    db.writes
        .push(("PATCH".into(), uri.to_string(), patch.clone()));
    let Some(mut node) = db.nodes.get(&name).cloned() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("nodes \"{name}\" not found"),
        );
    };
    merge(&mut node, &patch);
    FakeApi::bump(&mut db, &mut node);
    db.nodes.insert(name, node.clone());
    reply(StatusCode::OK, &node)
}

// ---------------------------------------------------------------------------------------------------------
// Pods as the vgpu scheduler leaves them.

/// A pod bound to [`NODE`] with one container per entry of `gpus` (each `(count, env policy)`).
pub fn pod(name: &str, uid: &str, created: &str, gpus: &[u64]) -> Value {
    let containers: Vec<Value> = gpus
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut c = json!({"name": format!("c{i}"), "image": "cuda"});
            if *n > 0 {
                c["resources"] = json!({"limits": {"nvidia.com/gpu": n.to_string()}});
            }
            c
        })
        .collect();
    json!({
        "metadata": {"name": name, "namespace": "default", "uid": uid,
                     "creationTimestamp": created, "annotations": {}},
        "spec": {"nodeName": NODE, "containers": containers},
        "status": {"phase": "Pending"}
    })
}

/// What the vgpu scheduler writes at bind: the placement, the phase, and its seal.
pub fn seal_placement(pod: &mut Value, devices: &str, bind_time: &str) {
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    let name = pod["metadata"]["name"].as_str().unwrap().to_string();
    let ns = pod["metadata"]["namespace"].as_str().unwrap().to_string();
    let seal = placement_seal::seal(
        KEY,
        &placement_seal::Placement {
            pod_uid: &uid,
            namespace: &ns,
            name: &name,
            node: NODE,
            devices,
            bind_time,
        },
    );
    let a = &mut pod["metadata"]["annotations"];
    a["hami.io/vgpu-node"] = json!(NODE);
    a["hami.io/vgpu-time"] = json!(bind_time);
    a["hami.io/bind-time"] = json!(bind_time);
    a["hami.io/bind-phase"] = json!("allocating");
    a["hami.io/vgpu-devices-to-allocate"] = json!(devices);
    a["vgpu.io/devices-sealed"] = json!(devices);
    a["vgpu.io/placement-seal"] = json!(seal);
}

pub fn card(uuid: &str, index: u32) -> Card {
    Card {
        uuid: uuid.into(),
        index,
        name: "Tesla T4".into(),
        memory_mib: 15360,
        numa: 0,
        healthy: true,
        reason: None,
    }
}

// ---------------------------------------------------------------------------------------------------------
// The kubelet's side.

struct Reg(mpsc::UnboundedSender<RegisterRequest>);

#[tonic::async_trait]
impl Registration for Reg {
    async fn register(
        &self,
        r: tonic::Request<RegisterRequest>,
    ) -> Result<tonic::Response<Empty>, tonic::Status> {
        let _ = self.0.send(r.into_inner());
        Ok(tonic::Response::new(Empty {}))
    }
}

/// The kubelet's registration socket; dropping it stops the server.
pub struct KubeletRegistration {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub registered: mpsc::UnboundedReceiver<RegisterRequest>,
}

impl KubeletRegistration {
    pub fn serve(path: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        let l = tokio::net::UnixListener::bind(path).unwrap();
        let (tx, registered) = mpsc::unbounded_channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(Reg(tx)))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(l),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        Self {
            stop: Some(stop),
            registered,
        }
    }

    pub async fn next(&mut self, within: Duration) -> RegisterRequest {
        tokio::time::timeout(within, self.registered.recv())
            .await
            .expect("no Register call in time")
            .unwrap()
    }
}

impl Drop for KubeletRegistration {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The kubelet's PodResources record: (namespace, pod, container, device IDs).
#[derive(Clone, Default)]
pub struct Record(pub Arc<Mutex<Vec<Assigned>>>);

/// (namespace, pod, container, device IDs).
type Assigned = (String, String, String, Vec<String>);

impl Record {
    pub fn assign(&self, pod: &str, container: &str, ids: &[&str]) {
        self.0.lock().unwrap().push((
            "default".into(),
            pod.into(),
            container.into(),
            ids.iter().map(|s| s.to_string()).collect(),
        ));
    }
}

#[tonic::async_trait]
impl PodResourcesLister for Record {
    async fn list(
        &self,
        _: tonic::Request<ListPodResourcesRequest>,
    ) -> Result<tonic::Response<ListPodResourcesResponse>, tonic::Status> {
        let mut pods: BTreeMap<(String, String), Vec<ContainerResources>> = BTreeMap::new();
        for (ns, pod, c, ids) in self.0.lock().unwrap().iter() {
            pods.entry((ns.clone(), pod.clone()))
                .or_default()
                .push(ContainerResources {
                    name: c.clone(),
                    devices: vec![ContainerDevices {
                        resource_name: "nvidia.com/gpu".into(),
                        device_ids: ids.clone(),
                    }],
                });
        }
        Ok(tonic::Response::new(ListPodResourcesResponse {
            pod_resources: pods
                .into_iter()
                .map(|((namespace, name), containers)| PodResources {
                    name,
                    namespace,
                    containers,
                })
                .collect(),
        }))
    }
}

pub fn serve_pod_resources(path: &Path, record: Record) {
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PodResourcesListerServer::new(record))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l)),
    );
}

/// Records what the ledger would be told.
#[derive(Default)]
pub struct Bindings(pub Mutex<Vec<Binding>>);

impl ContainerBinder for Bindings {
    fn bind(&self, b: Binding) {
        self.0.lock().unwrap().push(b);
    }
    fn unbind(&self, cgroup: &str) {
        self.0.lock().unwrap().retain(|b| b.cgroup != cgroup);
    }
    fn unbind_gone(&self, live: &dyn Fn(&str) -> bool) -> Vec<String> {
        let mut v = self.0.lock().unwrap();
        let gone: Vec<String> = v
            .iter()
            .filter(|b| b.pod.as_ref().is_some_and(|p| !live(&p.uid)))
            .map(|b| b.cgroup.clone())
            .collect();
        v.retain(|b| !gone.contains(&b.cgroup));
        gone
    }
}

/// Polls `f` until it returns Some, or panics after `within` naming `what`.
pub async fn eventually<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Everything together.

use vgpu_agent::node::{self, config::NodeConfig, Paths, Timing};
use vgpu_kubelet_api::deviceplugin::device_plugin_client::DevicePluginClient;
use vgpu_kubelet_api::deviceplugin::{
    AllocateRequest, ContainerAllocateRequest, ContainerAllocateResponse, PreStartContainerRequest,
};

pub struct Rig {
    pub dir: TempDir,
    pub api: FakeApi,
    pub kubelet: KubeletRegistration,
    pub record: Record,
    pub cards: tokio::sync::watch::Sender<Vec<Card>>,
    pub bindings: Arc<Bindings>,
    pub running: node::Running,
}

impl Rig {
    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.0.join("device-plugins")
    }
    pub fn containers_dir(&self) -> PathBuf {
        self.dir.0.join("containers")
    }
    pub fn cgroup_root(&self) -> PathBuf {
        self.dir.0.join("cgroup")
    }

    /// The API server with [`NODE`] (carrying `node_annotations`), the kubelet's sockets, and the node side.
    pub async fn start(name: &str, cards: Vec<Card>, node_annotations: Value) -> Rig {
        Self::start_prepared(name, cards, node_annotations, |_, _, _| {}).await
    }

    /// As [`Rig::start`], with `prepare` run on the test's root directory, the API and the kubelet's record
    /// before the node side starts (what an earlier agent left behind).
    pub async fn start_prepared(
        name: &str,
        cards: Vec<Card>,
        node_annotations: Value,
        prepare: impl FnOnce(&Path, &FakeApi, &Record),
    ) -> Rig {
        Self::start_polling(
            name,
            cards,
            node_annotations,
            prepare,
            Duration::from_millis(20),
        )
        .await
    }

    /// One card, nothing prepared, the agent polling the kubelet's record every `confirm_poll`.
    pub async fn one_card_polling(name: &str, gpu: &str, confirm_poll: Duration) -> Rig {
        Self::start_polling(
            name,
            vec![card(gpu, 0)],
            json!({}),
            |_, _, _| {},
            confirm_poll,
        )
        .await
    }

    /// As [`Rig::start_prepared`], with the agent polling the kubelet's record every `confirm_poll`.
    pub async fn start_polling(
        name: &str,
        cards: Vec<Card>,
        node_annotations: Value,
        prepare: impl FnOnce(&Path, &FakeApi, &Record),
        confirm_poll: Duration,
    ) -> Rig {
        let dir = TempDir::new(name);
        let api = FakeApi::start().await;
        api.add_node(NODE, node_annotations);
        let plugin_dir = dir.0.join("device-plugins");
        std::fs::create_dir_all(&plugin_dir).unwrap();
        let kubelet = KubeletRegistration::serve(&plugin_dir.join("kubelet.sock"));
        let record = Record::default();
        prepare(&dir.0, &api, &record);
        let pr = dir.0.join("pod-resources.sock");
        serve_pod_resources(&pr, record.clone());
        let (cards_tx, cards_rx) = tokio::sync::watch::channel(cards);
        let bindings = Arc::new(Bindings::default());
        let running = node::start_with(
            node::NodeParts {
                name: NODE.into(),
                config: NodeConfig::default(),
                paths: Paths {
                    containers_dir: dir.0.join("containers"),
                    shim_lib: "/usr/local/vgpu/libvgpu.so".into(),
                    card_dir: dir.0.join("cards"),
                    cgroup_root: dir.0.join("cgroup"),
                },
                seal_key: KEY.to_vec(),
                client: api.client(),
                cards: cards_rx,
                binder: bindings.clone(),
                pod_resources: pr,
                timing: Timing {
                    confirm_timeout: Duration::from_secs(10).max(confirm_poll * 2),
                    confirm_poll,
                    container_id_timeout: Duration::from_secs(10),
                },
            },
            plugin_dir,
            Duration::from_millis(50),
        )
        .await
        .expect("the node side starts");
        Rig {
            dir,
            api,
            kubelet,
            record,
            cards: cards_tx,
            bindings,
            running,
        }
    }

    pub async fn plugin(&self) -> DevicePluginClient<tonic::transport::Channel> {
        let sock = self.plugin_dir().join(node::PLUGIN_SOCKET);
        eventually("the plugin socket", Duration::from_secs(5), || {
            sock.exists().then_some(())
        })
        .await;
        DevicePluginClient::new(node::unix::channel(&sock).await.unwrap())
    }

    /// The kubelet's Allocate for one container.
    /// Waits until the agent has recorded `pod` allocated (`hami.io/bind-phase: success`).
    pub async fn recorded(&self, pod: &str) {
        eventually(&format!("{pod} recorded"), Duration::from_secs(5), || {
            (self.api.annotation(pod, "hami.io/bind-phase").as_deref() == Some("success"))
                .then_some(())
        })
        .await;
    }

    /// The kubelet's PreStartContainer for a container holding `ids`.
    pub async fn pre_start(&self, ids: &[&str]) {
        self.plugin()
            .await
            .pre_start_container(PreStartContainerRequest {
                devices_ids: ids.iter().map(|s| s.to_string()).collect(),
            })
            .await
            .expect("PreStartContainer is never refused");
    }

    /// A one-container, one-GPU pod sealed over `devices`, written and seen by the agent's reflector.
    pub async fn put_sealed(&self, name: &str, uid: &str, devices: &str) {
        let mut p = pod(name, uid, "2026-01-01T00:00:00Z", &[1]);
        seal_placement(&mut p, devices, "100");
        self.api.put_pod(p);
        self.synced(name).await;
    }

    pub async fn allocate(&self, ids: &[&str]) -> Result<ContainerAllocateResponse, tonic::Status> {
        let req = AllocateRequest {
            container_requests: vec![ContainerAllocateRequest {
                devices_ids: ids.iter().map(|s| s.to_string()).collect(),
            }],
        };
        let mut r = self.plugin().await.allocate(req).await?.into_inner();
        assert_eq!(r.container_responses.len(), 1);
        Ok(r.container_responses.remove(0))
    }

    /// Waits until the reflector has seen `pod` at the API's current version.
    pub async fn synced(&self, pod: &str) {
        let want = self.api.pod(pod)["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        let store = self.running.node.pods.clone();
        eventually(
            &format!("the reflector to see {pod}"),
            Duration::from_secs(5),
            || {
                store
                    .state()
                    .iter()
                    .any(|p| {
                        p.metadata.name.as_deref() == Some(pod)
                            && p.metadata.resource_version.as_deref() == Some(want.as_str())
                    })
                    .then_some(())
            },
        )
        .await;
    }

    /// The directories serving `uid`'s `container` (by their owner record, or a name of the older
    /// `<uid>_<container>` form), oldest answer first.
    pub fn dirs_of(&self, uid: &str, container: &str) -> Vec<std::path::PathBuf> {
        let want = format!("uid={uid}\n");
        let mut v: Vec<(String, std::path::PathBuf)> = std::fs::read_dir(self.containers_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let owner = std::fs::read_to_string(e.path().join("owner")).unwrap_or_default();
                (owner.contains(&want) && owner.contains(&format!("container={container}\n")))
                    || e.file_name().to_string_lossy() == format!("{uid}_{container}")
            })
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let serial = name.rsplit('_').next().unwrap_or_default().to_string();
                (serial, e.path())
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// The limits file of the newest directory serving `uid`'s `container`.
    pub fn limits(&self, uid: &str, container: &str) -> String {
        let d = self
            .dirs_of(uid, container)
            .pop()
            .unwrap_or_else(|| panic!("no directory serves {uid} {container}"));
        std::fs::read_to_string(d.join("limits")).unwrap()
    }

    pub async fn limits_state(&self, uid: &str, container: &str, state: &str) -> String {
        let want = format!("VGPU_LIMITS_STATE={state}\n");
        // The contract's reader decides, and the state line is the file's only one.
        let read = |t: &str| {
            vgpu_contract::container_dir::limits_state(
                &vgpu_contract::limits::parse_limits_file(t).ok()?,
            )
            .ok()
        };
        eventually(
            &format!("{uid}_{container} limits {state}"),
            Duration::from_secs(10),
            || {
                self.dirs_of(uid, container).iter().find_map(|d| {
                    let t = std::fs::read_to_string(d.join("limits")).ok()?;
                    let ok = match read(&t)? {
                        LimitsState::Ready => state == "ready",
                        LimitsState::Revoked(_) => state == "revoked",
                        LimitsState::Pending => false,
                    };
                    (ok && t.ends_with(&want)).then_some(t)
                })
            },
        )
        .await
    }
}
