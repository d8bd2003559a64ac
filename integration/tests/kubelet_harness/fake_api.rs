//! An in-memory API server with just what the kubelet harness uses: pods (list, watch by `spec.nodeName`,
//! get, status merge patch, delete), nodes (get, create, status merge patch) and events (create).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::watch;

type Key = (String, String, String); // (resource, namespace, name)

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// (resourceVersion, type, resource, object) of every change, for watches.
    history: Vec<(u64, &'static str, String, Value)>,
    uids: u64,
    /// Watches from before this resourceVersion get 410 Gone (as after etcd compaction).
    compacted: u64,
    /// Watches hold their events back while set.
    paused: bool,
    /// Bumped to end every open watch with 410 Gone.
    kicks: u64,
    /// Answer lists and watches as if no field selector had been given.
    ignore_selectors: bool,
}

#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    changed: watch::Sender<u64>,
    pub addr: SocketAddr,
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "reason": reason, "message": message, "code": code});
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// `spec.nodeName=X` (the only selector the harness uses).
fn selected(obj: &Value, selector: Option<&String>) -> bool {
    match selector.and_then(|s| s.split_once('=')) {
        Some(("spec.nodeName", n)) => obj["spec"]["nodeName"].as_str() == Some(n),
        Some(_) => false,
        None => true,
    }
}

impl Inner {
    fn matches_ignoring(&self, obj: &Value, selector: Option<&String>) -> bool {
        self.ignore_selectors || selected(obj, selector)
    }
}

impl FakeApi {
    pub async fn start() -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let api = FakeApi {
            inner: Arc::default(),
            changed: watch::channel(0).0,
            addr,
        };
        let app = axum::Router::new().fallback(handle).with_state(api.clone());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        api
    }

    /// From now on, serve every pod whatever the field selector says (a broken server).
    pub fn ignore_selectors(&self) {
        self.lock().ignore_selectors = true;
    }

    pub fn client(&self) -> kube::Client {
        let cfg = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(cfg).unwrap()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    fn put(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
        mut obj: Value,
        kind: &'static str,
    ) -> Value {
        let mut s = self.lock();
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = (resource.to_string(), ns.to_string(), name.to_string());
        if kind == "DELETED" {
            s.objects.remove(&key);
        } else {
            s.objects.insert(key, obj.clone());
        }
        s.history
            .push((rv, kind, resource.to_string(), obj.clone()));
        drop(s);
        self.changed.send_replace(rv);
        obj
    }

    /// Creates a pod as the API server would (uid, namespace, creationTimestamp unless given).
    pub fn create_pod(&self, mut pod: Value) -> Value {
        let uid = {
            let mut s = self.lock();
            s.uids += 1;
            format!(
                "5d0b2f5a-6f6e-4b6a-9c3e-{:012x}",
                s.uids + (std::process::id() as u64) * 1000
            )
        };
        pod["apiVersion"] = json!("v1");
        pod["kind"] = json!("Pod");
        let m = &mut pod["metadata"];
        m["uid"] = json!(uid);
        if m["namespace"].is_null() {
            m["namespace"] = json!("default");
        }
        if m["creationTimestamp"].is_null() {
            m["creationTimestamp"] = json!(k8s_openapi::jiff::Timestamp::now().to_string());
        }
        let ns = m["namespace"].as_str().unwrap().to_string();
        let name = m["name"].as_str().unwrap().to_string();
        self.put("pods", &ns, &name, pod, "ADDED")
    }

    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(resource.into(), ns.into(), name.into()))
            .cloned()
    }

    pub fn pod(&self, name: &str) -> Option<Value> {
        self.get("pods", "default", name)
    }

    /// Every object of a resource.
    pub fn all(&self, resource: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|(k, _)| k.0 == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A merge patch as a client would send it.
    pub fn patch(&self, resource: &str, ns: &str, name: &str, patch: &Value) -> Option<Value> {
        let mut obj = self.get(resource, ns, name)?;
        json_patch::merge(&mut obj, patch);
        Some(self.put(resource, ns, name, obj, "MODIFIED"))
    }

    /// The object goes away at once (what a delete with grace period 0 does).
    pub fn delete(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let obj = self.get(resource, ns, name)?;
        Some(self.put(resource, ns, name, obj, "DELETED"))
    }

    fn list(&self, resource: &str, selector: Option<&String>) -> Response {
        let s = self.lock();
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|(k, v)| k.0 == resource && s.matches_ignoring(v, selector))
            .map(|(_, v)| v.clone())
            .collect();
        let body = json!({"kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": s.rv.to_string()}, "items": items});
        axum::Json(body).into_response()
    }

    /// Holds watch events back (they are not lost) until `expire_watches`.
    pub fn pause_watches(&self) {
        self.lock().paused = true;
        self.changed.send_modify(|_| {});
    }

    /// Ends every watch with 410 Gone and refuses older resourceVersions, so clients list again, and
    /// resumes watches.
    pub fn expire_watches(&self) {
        let mut s = self.lock();
        s.compacted = s.rv;
        s.kicks += 1;
        s.paused = false;
        drop(s);
        self.changed.send_modify(|_| {});
    }

    fn watch(&self, resource: String, selector: Option<String>, from: u64) -> Response {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
        let api = self.clone();
        let gone = {
            let mut line =
                serde_json::to_vec(&json!({"type": "ERROR", "object": {"kind": "Status",
                "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Expired",
                "message": "too old resource version", "code": 410}}))
                .unwrap();
            line.push(b'\n');
            Bytes::from(line)
        };
        tokio::spawn(async move {
            let mut changed = api.changed.subscribe();
            let mut last = from;
            let kicks = api.lock().kicks;
            if from < api.lock().compacted {
                let _ = tx.send(Ok(gone)).await;
                return;
            }
            loop {
                let (paused, kicked) = {
                    let s = api.lock();
                    (s.paused, s.kicks != kicks)
                };
                if kicked {
                    let _ = tx.send(Ok(gone)).await;
                    return;
                }
                if paused {
                    tokio::select! {
                        r = changed.changed() => if r.is_err() { return },
                        _ = tx.closed() => return,
                    }
                    continue;
                }
                let events: Vec<(u64, &'static str, Value)> = {
                    let s = api.lock();
                    let evs = s
                        .history
                        .iter()
                        .filter(|(rv, _, r, o)| {
                            *rv > last && *r == resource && s.matches_ignoring(o, selector.as_ref())
                        })
                        .map(|(rv, t, _, o)| (*rv, *t, o.clone()))
                        .collect();
                    last = s.rv.max(last);
                    evs
                };
                for (_, t, o) in events {
                    let mut line = serde_json::to_vec(&json!({"type": t, "object": o})).unwrap();
                    line.push(b'\n');
                    if tx.send(Ok(Bytes::from(line))).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Response::new(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }
}

async fn handle(State(api): State<FakeApi>, method: Method, uri: Uri, body: Bytes) -> Response {
    let q = query(&uri);
    let parts: Vec<String> = uri
        .path()
        .trim_matches('/')
        .split('/')
        .map(decode)
        .collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match (method.clone(), parts.as_slice()) {
        (Method::GET, ["api", "v1", "pods"]) => {
            if q.get("watch").map(String::as_str) == Some("true") {
                let from = q
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                api.watch("pods".into(), q.get("fieldSelector").cloned(), from)
            } else {
                api.list("pods", q.get("fieldSelector"))
            }
        }
        (Method::GET, ["api", "v1", "namespaces", ns, res, name]) => match api.get(res, ns, name) {
            Some(o) => axum::Json(o).into_response(),
            None => status(404, "NotFound", &format!("{res} \"{name}\" not found")),
        },
        (Method::PATCH, ["api", "v1", "namespaces", ns, res, name, "status"]) => {
            match api.patch(res, ns, name, &body) {
                Some(o) => axum::Json(o).into_response(),
                None => status(404, "NotFound", &format!("{res} \"{name}\" not found")),
            }
        }
        (Method::DELETE, ["api", "v1", "namespaces", ns, res, name]) => {
            match api.delete(res, ns, name) {
                Some(o) => axum::Json(o).into_response(),
                None => status(404, "NotFound", &format!("{res} \"{name}\" not found")),
            }
        }
        (Method::POST, ["api", "v1", "namespaces", ns, "events"]) => {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or("ev")
                .to_string();
            let o = api.put("events", ns, &name, body, "ADDED");
            (StatusCode::CREATED, axum::Json(o)).into_response()
        }
        (Method::GET, ["api", "v1", "nodes", name]) => match api.get("nodes", "", name) {
            Some(o) => axum::Json(o).into_response(),
            None => status(404, "NotFound", &format!("nodes \"{name}\" not found")),
        },
        (Method::POST, ["api", "v1", "nodes"]) => {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if api.get("nodes", "", &name).is_some() {
                return status(409, "AlreadyExists", "exists");
            }
            let mut o = body;
            o["apiVersion"] = json!("v1");
            o["kind"] = json!("Node");
            let o = api.put("nodes", "", &name, o, "ADDED");
            (StatusCode::CREATED, axum::Json(o)).into_response()
        }
        (Method::PATCH, ["api", "v1", "nodes", name, "status"]) => {
            match api.patch("nodes", "", name, &body) {
                Some(o) => axum::Json(o).into_response(),
                None => status(404, "NotFound", &format!("nodes \"{name}\" not found")),
            }
        }
        _ => status(
            404,
            "NotFound",
            &format!("{method} {uri} is not served by the fake API"),
        ),
    }
}
