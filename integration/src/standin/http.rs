//! The REST verbs: list, watch, get, create, update, patch, delete and bind, each as kube-apiserver does it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::admission::{self, Admission, Operation};
use super::errors::ApiError;
use super::event_views;
use super::objects::{self, name_of, Part};
use super::patch::{self, PatchKind};
use super::pods;
use super::quantity;
use super::resources::{self, Resource};
use super::routes::{self, Route, Target};
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{resource_version, Store, WriteError};
use super::table;
use super::users::{UserInfo, Users};
use super::watch::{self, WatchSpec};

/// Largest request body accepted.
const BODY_LIMIT: usize = 32 << 20;

pub struct Server {
    pub store: Arc<Store>,
    pub admission: Admission,
    pub users: Users,
    /// `host:port` as clients reach this server, for `/api`'s serverAddressByClientCIDRs.
    pub address: String,
}

pub fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).expect("a JSON value serializes"),
    )
        .into_response()
}

fn ok(v: &Value) -> Response {
    json_response(StatusCode::OK, v)
}

/// The only handler: every request comes here.
pub async fn handle(State(server): State<Arc<Server>>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let response = serve(server, req).await;
    // One line per request (RUST_LOG=vgpu_integration::standin=debug): what a test run did, in order. Refusals
    // other than "not found" (which clients ask for routinely) are logged at info, so a failing run shows them.
    let status = response.status();
    if status != StatusCode::NOT_FOUND && (status.is_client_error() || status.is_server_error()) {
        tracing::info!(%method, %uri, status = status.as_u16(), elapsed = ?started.elapsed(), "refused");
    } else {
        tracing::debug!(%method, %uri, status = status.as_u16(), elapsed = ?started.elapsed());
    }
    response
}

async fn serve(server: Arc<Server>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let user = match server.users.authenticate(&parts.headers) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let path = parts.uri.path().to_string();
    if matches!(path.as_str(), "/healthz" | "/readyz" | "/livez") {
        return (StatusCode::OK, "ok").into_response();
    }
    let body = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::bad_request(format!("cannot read the request body: {e}"))
                .into_response()
        }
    };
    let ctx = Ctx {
        server: &server,
        method: parts.method,
        headers: parts.headers,
        query: query(&parts.uri),
        user,
    };
    match routes::route(&path, &server.address) {
        Ok(Route::Doc(doc)) if ctx.method == Method::GET => ok(&doc),
        Ok(Route::Doc(_)) => {
            ApiError::method_not_allowed(ctx.method.as_str(), &path).into_response()
        }
        Ok(Route::Resource(t)) => match ctx.serve(t, body).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        },
        Err(e) => e.into_response(),
    }
}

fn query(uri: &Uri) -> HashMap<String, String> {
    Query::<HashMap<String, String>>::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

struct Ctx<'a> {
    server: &'a Arc<Server>,
    method: Method,
    headers: HeaderMap,
    query: HashMap<String, String>,
    user: UserInfo,
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// Request bodies must be JSON: the stand-in has no protobuf schemas (typed client-go callers, such as
/// `kubectl create namespace`, send protobuf; `kubectl apply -f` sends JSON).
fn json_body(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .unwrap_or("");
    if ct.contains("protobuf") || ct.contains("cbor") {
        return Err(ApiError::unsupported_body(ct));
    }
    Ok(())
}

fn canonical_quantities(res: &Resource, name: &str, obj: &mut Value) -> Result<(), ApiError> {
    quantity::canonicalize(res.storage, obj).map_err(|e| ApiError::invalid(res, name, e))
}

fn flag(v: Option<&String>) -> bool {
    matches!(v.map(String::as_str), Some("1" | "true" | "True"))
}

/// A body edit: the whole new object (PUT) or a patch of the current one.
enum Edit {
    Put(Value),
    Patch(PatchKind, Bytes),
}

impl Ctx<'_> {
    fn store(&self) -> &Store {
        &self.server.store
    }

    fn dry_run(&self) -> bool {
        self.query.get("dryRun").is_some_and(|v| v == "All")
    }

    fn wants_table(&self) -> bool {
        self.headers
            .get(header::ACCEPT)
            .and_then(|a| a.to_str().ok())
            .is_some_and(|a| a.contains("as=Table"))
    }

    async fn serve(&self, t: Target, body: Bytes) -> Result<Response, ApiError> {
        let res = t.res;
        // A SelfSubjectReview's body says nothing the server reads, and a delete's options are optional (typed
        // client-go callers send both as protobuf), so only other bodies must be JSON.
        if !body.is_empty() && res.plural != "selfsubjectreviews" && self.method != Method::DELETE {
            json_body(&self.headers)?;
        }
        let ns = t.ns.clone().unwrap_or_default();
        if res.create_only {
            return match (&self.method, res.plural) {
                (&Method::POST, "bindings") => {
                    let b = parse_body(&body)?;
                    let pod = name_of(&b).to_string();
                    self.bind(&ns, &pod, b).await
                }
                (&Method::POST, "selfsubjectreviews") => Ok(json_response(
                    StatusCode::CREATED,
                    &json!({
                        "kind": "SelfSubjectReview",
                        "apiVersion": "authentication.k8s.io/v1",
                        "metadata": {"creationTimestamp": objects::now()},
                        "status": {"userInfo": self.user.to_json()},
                    }),
                )),
                _ => Err(ApiError::method_not_allowed(
                    self.method.as_str(),
                    res.plural,
                )),
            };
        }
        let watch = t.watch_path || flag(self.query.get("watch"));
        match (&self.method, t.name.as_deref(), t.sub.as_deref()) {
            (&Method::GET, None, None) if watch => self.watch(res, t.ns, None),
            (&Method::GET, Some(name), None) if t.watch_path => {
                self.watch(res, t.ns, Some(name.to_string()))
            }
            (&Method::GET, None, None) => self.list(res, t.ns.as_deref()),
            (&Method::POST, None, None) => {
                self.require_ns(res, &t.ns)?;
                self.create(res, &ns, parse_body(&body)?).await
            }
            (&Method::DELETE, None, None) => self.delete_collection(res, t.ns.as_deref()),
            (&Method::GET, Some(name), None | Some("status")) => {
                let obj = self.get(res, &ns, name)?;
                Ok(self.object_response(res, StatusCode::OK, &obj))
            }
            (&Method::PUT, Some(name), sub @ (None | Some("status"))) => {
                let part = if sub.is_some() {
                    Part::Status
                } else {
                    Part::Main
                };
                self.update(res, &ns, name, part, Edit::Put(parse_body(&body)?))
                    .await
            }
            (&Method::PATCH, Some(name), sub @ (None | Some("status"))) => {
                let ct = self
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|c| c.to_str().ok())
                    .unwrap_or("");
                let kind = PatchKind::from_content_type(ct)
                    .ok_or_else(|| ApiError::unsupported_media_type(ct))?;
                let part = if sub.is_some() {
                    Part::Status
                } else {
                    Part::Main
                };
                self.update(res, &ns, name, part, Edit::Patch(kind, body))
                    .await
            }
            (&Method::DELETE, Some(name), None) => self.delete(res, &ns, name, &body),
            (&Method::POST, Some(name), Some("binding")) => {
                self.bind(&ns, name, parse_body(&body)?).await
            }
            _ => Err(ApiError::method_not_allowed(
                self.method.as_str(),
                &format!("{}/{}", res.plural, t.sub.as_deref().unwrap_or("")),
            )),
        }
    }

    fn require_ns(&self, res: &Resource, ns: &Option<String>) -> Result<(), ApiError> {
        if res.namespaced && ns.is_none() {
            return Err(ApiError::method_not_allowed(
                "POST",
                &format!("{} without a namespace", res.plural),
            ));
        }
        Ok(())
    }

    fn object_response(&self, res: &Resource, code: StatusCode, stored: &Value) -> Response {
        let view = event_views::to_view(res, stored);
        if self.wants_table() {
            return json_response(code, &table::table(res, &[view], None));
        }
        json_response(code, &view)
    }

    fn get(&self, res: &'static Resource, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        self.store()
            .get(res.storage, ns, name)
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    fn selectors(&self) -> Result<(LabelSelector, FieldSelector), ApiError> {
        let labels = LabelSelector::parse(self.query.get("labelSelector").map_or("", |s| s))
            .map_err(ApiError::bad_request)?;
        let fields = FieldSelector::parse(self.query.get("fieldSelector").map_or("", |s| s))
            .map_err(ApiError::bad_request)?;
        Ok((labels, fields))
    }

    fn list(&self, res: &'static Resource, ns: Option<&str>) -> Result<Response, ApiError> {
        let (labels, fields) = self.selectors()?;
        let (items, rv) = self.store().list(res.storage, ns);
        let items: Vec<Value> = items
            .iter()
            .map(|o| event_views::to_view(res, o))
            .filter(|v| labels.matches(v) && fields.matches(v))
            .collect();
        if self.wants_table() {
            return Ok(ok(&table::table(res, &items, Some(rv))));
        }
        Ok(ok(&json!({
            "kind": res.list_kind(),
            "apiVersion": res.api_version(),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        })))
    }

    fn watch(
        &self,
        res: &'static Resource,
        ns: Option<String>,
        name: Option<String>,
    ) -> Result<Response, ApiError> {
        let (labels, mut fields) = self.selectors()?;
        if let Some(n) = name {
            fields.push_name(&n);
        }
        let from = match self.query.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion {rv:?} is not a resource version"))
            })?),
        };
        let timeout = match self.query.get("timeoutSeconds") {
            None => None,
            Some(s) => Some(Duration::from_secs(s.parse().map_err(|_| {
                ApiError::bad_request(format!("timeoutSeconds {s:?} is not a number"))
            })?)),
        };
        let spec = WatchSpec {
            resource: res,
            namespace: ns,
            labels,
            fields,
            from,
            bookmarks: flag(self.query.get("allowWatchBookmarks")),
            initial_events: flag(self.query.get("sendInitialEvents")),
            timeout,
            as_table: self.wants_table(),
        };
        let body: Body = watch::stream(self.server.store.clone(), spec);
        Ok((
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-cache, private"),
            ],
            body,
        )
            .into_response())
    }

    fn request<'a>(
        &'a self,
        res: &'static Resource,
        op: Operation,
        ns: &'a str,
        name: &'a str,
        old: Option<&'a Value>,
    ) -> admission::Request<'a> {
        admission::Request {
            resource: res,
            operation: op,
            namespace: ns,
            name,
            user: &self.user,
            old,
            dry_run: self.dry_run(),
        }
    }

    /// Whether writes to this resource go through the admission webhooks (pods, as HAMi's webhook registers).
    fn admitted(res: &Resource) -> bool {
        res.storage == "pods"
    }

    async fn create(
        &self,
        res: &'static Resource,
        ns: &str,
        mut obj: Value,
    ) -> Result<Response, ApiError> {
        objects::check_type(res, &mut obj)?;
        if res.namespaced && self.store().get("namespaces", "", ns).is_none() {
            return Err(ApiError::namespace_not_found(ns));
        }
        let name = objects::place_new(res, ns, &mut obj)?;
        let mut obj = event_views::from_view(res, obj);
        if res.storage == "pods" {
            pods::default_pod(&mut obj);
        }
        canonical_quantities(res, &name, &mut obj)?;
        if Self::admitted(res) && !self.server.admission.is_empty() {
            let req = self.request(res, Operation::Create, ns, &name, None);
            obj = self.server.admission.mutate(&req, obj).await?;
            canonical_quantities(res, &name, &mut obj)?;
        }
        objects::prepare_create(res, &mut obj);
        objects::validate(res, &obj)?;
        if Self::admitted(res) && !self.server.admission.is_empty() {
            let req = self.request(res, Operation::Create, ns, &name, None);
            self.server.admission.validate(&req, &obj).await?;
        }
        if self.dry_run() {
            return Ok(self.object_response(res, StatusCode::CREATED, &obj));
        }
        let ns_key = if res.namespaced { ns } else { "" };
        match self.store().create(res.storage, ns_key, &name, obj) {
            Ok(stored) => Ok(self.object_response(res, StatusCode::CREATED, &stored)),
            Err(_) => Err(ApiError::already_exists(res, &name)),
        }
    }

    /// PUT and PATCH: read, edit, admit, then write if the object is still the one read; a write that lost a
    /// race is redone unless the client pinned the resourceVersion.
    async fn update(
        &self,
        res: &'static Resource,
        ns: &str,
        name: &str,
        part: Part,
        edit: Edit,
    ) -> Result<Response, ApiError> {
        loop {
            let Some(current) = self.store().get(res.storage, ns, name) else {
                if let (Edit::Patch(PatchKind::Apply, body), Part::Main) = (&edit, part) {
                    return self.create(res, ns, patch::parse_apply(body)?).await;
                }
                return Err(ApiError::not_found(res, name));
            };
            let current_rv = resource_version(&current).unwrap_or(0);
            let view = event_views::to_view(res, &current);
            let (mut new_view, pinned) = match &edit {
                Edit::Put(body) => {
                    let mut b = body.clone();
                    objects::check_type(res, &mut b)?;
                    let pinned = resource_version(&b).is_some();
                    (b, pinned)
                }
                Edit::Patch(kind, body) => {
                    let pinned =
                        std::str::from_utf8(body).is_ok_and(|s| s.contains("resourceVersion"));
                    (patch::apply(*kind, &view, body)?, pinned)
                }
            };
            if pinned && resource_version(&new_view) != Some(current_rv) {
                return Err(ApiError::stale(res, name));
            }
            objects::check_type(res, &mut new_view)?;
            let mut new = event_views::from_view(res, new_view);
            if res.storage == "pods" {
                pods::default_pod(&mut new);
            }
            canonical_quantities(res, name, &mut new)?;
            let mut new = objects::prepare_update(res, part, &current, new)?;
            if Self::admitted(res) && part == Part::Main && !self.server.admission.is_empty() {
                let req = self.request(res, Operation::Update, ns, name, Some(&current));
                new = self.server.admission.mutate(&req, new).await?;
                canonical_quantities(res, name, &mut new)?;
                new = objects::prepare_update(res, part, &current, new)?;
                objects::validate(res, &new)?;
                self.server.admission.validate(&req, &new).await?;
            } else {
                objects::validate(res, &new)?;
            }
            if !objects::changed(&current, &new) || self.dry_run() {
                return Ok(self.object_response(res, StatusCode::OK, &new));
            }
            match self.store().replace(res.storage, ns, name, current_rv, new) {
                Ok(stored) => return Ok(self.object_response(res, StatusCode::OK, &stored)),
                Err(WriteError::Stale) if pinned => return Err(ApiError::stale(res, name)),
                Err(WriteError::Stale) => continue,
                Err(_) => return Err(ApiError::not_found(res, name)),
            }
        }
    }

    fn delete(
        &self,
        res: &'static Resource,
        ns: &str,
        name: &str,
        body: &[u8],
    ) -> Result<Response, ApiError> {
        // DeleteOptions in another encoding than JSON (protobuf) are read as none.
        let opts: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let current = self.get(res, ns, name)?;
        if let Some(uid) = opts.pointer("/preconditions/uid").and_then(Value::as_str) {
            if current.pointer("/metadata/uid").and_then(Value::as_str) != Some(uid) {
                return Err(ApiError::conflict(
                    res,
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        current
                            .pointer("/metadata/uid")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                    ),
                ));
            }
        }
        let expected = match opts
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
        {
            Some(rv) => Some(rv.parse::<u64>().map_err(|_| ApiError::stale(res, name))?),
            None => None,
        };
        if self.dry_run() {
            return Ok(self.object_response(res, StatusCode::OK, &current));
        }
        let gone = match self.store().delete(res.storage, ns, name, expected) {
            Ok(g) => g,
            Err(WriteError::Stale) => return Err(ApiError::stale(res, name)),
            Err(_) => return Err(ApiError::not_found(res, name)),
        };
        if res.storage == "namespaces" {
            self.empty_namespace(name);
        }
        Ok(self.object_response(res, StatusCode::OK, &gone))
    }

    /// What a deleted namespace held goes with it.
    fn empty_namespace(&self, ns: &str) {
        for r in resources::RESOURCES
            .iter()
            .filter(|r| r.namespaced && !r.create_only)
        {
            let (items, _) = self.store().list(r.storage, Some(ns));
            for o in items {
                let _ = self.store().delete(r.storage, ns, name_of(&o), None);
            }
        }
    }

    fn delete_collection(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
    ) -> Result<Response, ApiError> {
        let (labels, fields) = self.selectors()?;
        let (items, _) = self.store().list(res.storage, ns);
        let mut gone = Vec::new();
        for o in items {
            let view = event_views::to_view(res, &o);
            if !(labels.matches(&view) && fields.matches(&view)) {
                continue;
            }
            let ons = o
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("");
            if self.dry_run() {
                gone.push(view);
            } else if let Ok(g) = self.store().delete(res.storage, ons, name_of(&o), None) {
                gone.push(event_views::to_view(res, &g));
            }
        }
        Ok(ok(&json!({
            "kind": res.list_kind(),
            "apiVersion": res.api_version(),
            "metadata": {"resourceVersion": self.store().current_rv().to_string()},
            "items": gone,
        })))
    }

    /// pods/binding (and the `bindings` collection): sets `spec.nodeName` once, as the scheduler binds.
    async fn bind(&self, ns: &str, pod: &str, binding: Value) -> Result<Response, ApiError> {
        let pods = resources::find("", "v1", "pods").expect("pods are served");
        let binding_res = resources::find("", "v1", "bindings").expect("bindings are served");
        if name_of(&binding) != pod && !name_of(&binding).is_empty() {
            return Err(ApiError::bad_request(format!(
                "the binding names pod {:?} but was sent to pod {pod:?}",
                name_of(&binding)
            )));
        }
        let node = binding
            .pointer("/target/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::invalid(binding_res, pod, "target.name: Required value"))?
            .to_string();
        loop {
            let current = self.get(pods, ns, pod)?;
            if let Some(uid) = binding.pointer("/metadata/uid").and_then(Value::as_str) {
                if current.pointer("/metadata/uid").and_then(Value::as_str) != Some(uid) {
                    return Err(ApiError::conflict(
                        pods,
                        pod,
                        "the pod's UID is not the binding's",
                    ));
                }
            }
            if let Some(on) = current
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            {
                return Err(ApiError {
                    details: Some(json!({"name": pod, "kind": "pods/binding"})),
                    ..ApiError::conflict(
                        pods,
                        pod,
                        &format!("pod {pod} is already assigned to node \"{on}\""),
                    )
                });
            }
            let rv = resource_version(&current).unwrap_or(0);
            let mut new = (*current).clone();
            new["spec"]["nodeName"] = json!(node);
            if let Some(Value::Object(ann)) = binding.pointer("/metadata/annotations") {
                let m = new["metadata"]
                    .as_object_mut()
                    .expect("stored objects have metadata");
                let a = m.entry("annotations").or_insert_with(|| json!({}));
                for (k, v) in ann {
                    a[k] = v.clone();
                }
            }
            let cond = json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null,
                              "lastTransitionTime": objects::now()});
            let conds = new["status"]
                .as_object_mut()
                .map(|s| s.entry("conditions").or_insert_with(|| json!([])));
            if let Some(Value::Array(c)) = conds {
                c.retain(|x| x.get("type").and_then(Value::as_str) != Some("PodScheduled"));
                c.push(cond);
            }
            if self.dry_run() {
                break;
            }
            match self.store().replace("pods", ns, pod, rv, new) {
                Ok(_) => break,
                Err(WriteError::Stale) => continue,
                Err(_) => return Err(ApiError::not_found(pods, pod)),
            }
        }
        Ok(json_response(
            StatusCode::CREATED,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        ))
    }
}
