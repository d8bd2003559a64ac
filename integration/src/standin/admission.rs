//! Admission webhooks called as kube-apiserver calls them: an `admission.k8s.io/v1` AdmissionReview POSTed to
//! each mutating webhook in turn (its JSONPatch applied), then to each validating one; any `allowed: false`
//! refuses the request. A webhook that cannot be reached refuses it too (failurePolicy Fail).

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::resources::Resource;
use super::users::UserInfo;

/// How long one webhook call may take (kube-apiserver's default `timeoutSeconds`).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
        }
    }
    fn options_kind(self) -> &'static str {
        match self {
            Operation::Create => "CreateOptions",
            Operation::Update => "UpdateOptions",
        }
    }
}

/// A webhook as given on the command line: `[NAME=]URL`.
#[derive(Debug, Clone)]
pub struct WebhookSpec {
    pub name: String,
    pub url: String,
}

impl std::str::FromStr for WebhookSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, url) = match s.split_once('=') {
            Some((n, u)) if !n.contains('/') && !n.contains(':') => (n.to_string(), u.to_string()),
            _ => (String::new(), s.to_string()),
        };
        let uri: axum::http::Uri = url
            .parse()
            .map_err(|e| format!("webhook URL {url:?} is not a URL: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "webhook URL {url:?} must be http:// or https://HOST[:PORT]/PATH"
            ));
        }
        let name = if name.is_empty() {
            uri.host().unwrap_or("webhook").to_string()
        } else {
            name
        };
        Ok(WebhookSpec { name, url })
    }
}

struct Webhook {
    name: String,
    /// Path and query to POST to, on `client`'s base URL.
    path: String,
    client: kube::Client,
}

impl Webhook {
    fn new(spec: &WebhookSpec, ca: Option<&PathBuf>) -> anyhow::Result<Self> {
        let uri: axum::http::Uri = spec.url.parse()?;
        let base: axum::http::Uri = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("http"),
            uri.authority().map(|a| a.as_str()).unwrap_or("")
        )
        .parse()?;
        let mut config = kube::Config::new(base);
        config.root_cert_file = ca.cloned();
        config.read_timeout = Some(CALL_TIMEOUT);
        // A webhook is called once per request, as kube-apiserver does; a retry could apply a mutation twice.
        config.default_retry = false;
        let client = kube::Client::try_from(config)?;
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let sep = if pq.contains('?') { '&' } else { '?' };
        Ok(Webhook {
            name: spec.name.clone(),
            path: format!("{pq}{sep}timeout=10s"),
            client,
        })
    }

    /// The webhook's `response`, checked to answer this review.
    async fn call(&self, review: &Value, uid: &str) -> Result<Value, ApiError> {
        let failed = |why: String| {
            ApiError::internal(format!(
                "failed calling webhook \"{}\": failed to call webhook: {why}",
                self.name
            ))
        };
        let req = axum::http::Request::post(&self.path)
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(serde_json::to_vec(review).expect("a JSON value serializes"))
            .map_err(|e| failed(e.to_string()))?;
        let text = tokio::time::timeout(CALL_TIMEOUT, self.client.request_text(req))
            .await
            .map_err(|_| failed(format!("no answer within {CALL_TIMEOUT:?}")))?
            .map_err(|e| failed(e.to_string()))?;
        let answer: Value = serde_json::from_str(&text)
            .map_err(|e| failed(format!("the answer is not JSON ({e}): {text:.200}")))?;
        let response = answer
            .get("response")
            .cloned()
            .ok_or_else(|| failed("the AdmissionReview answer has no response".into()))?;
        if response.get("uid").and_then(Value::as_str) != Some(uid) {
            return Err(failed(format!(
                "expected response.uid={uid:?}, got {:?}",
                response.get("uid")
            )));
        }
        Ok(response)
    }

    fn refusal(&self, response: &Value) -> ApiError {
        let status = response.get("status");
        let s = |k: &str| {
            status
                .and_then(|st| st.get(k))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let code = status
            .and_then(|st| st.get("code"))
            .and_then(Value::as_u64)
            .and_then(|c| u16::try_from(c).ok());
        ApiError::denied(&self.name, code, &s("message"), &s("reason"))
    }
}

/// What a webhook is told about the request.
pub struct Request<'a> {
    pub resource: &'static Resource,
    pub operation: Operation,
    pub namespace: &'a str,
    pub name: &'a str,
    pub user: &'a UserInfo,
    pub old: Option<&'a Value>,
    pub dry_run: bool,
}

pub struct Admission {
    mutating: Vec<Webhook>,
    validating: Vec<Webhook>,
    exempt: Vec<String>,
}

fn new_uid() -> String {
    super::objects::uuid_v4()
}

impl Admission {
    /// Needs a tokio runtime: the clients start their connection pools.
    pub fn new(
        mutating: &[WebhookSpec],
        validating: &[WebhookSpec],
        ca: Option<&PathBuf>,
    ) -> anyhow::Result<Self> {
        let build = |specs: &[WebhookSpec]| {
            specs
                .iter()
                .map(|s| Webhook::new(s, ca))
                .collect::<anyhow::Result<Vec<_>>>()
        };
        Ok(Admission {
            mutating: build(mutating)?,
            validating: build(validating)?,
            exempt: Vec::new(),
        })
    }

    /// Pods in these namespaces skip the webhooks.
    pub fn exempting(mut self, namespaces: Vec<String>) -> Self {
        self.exempt = namespaces;
        self
    }

    fn skips(&self, req: &Request<'_>) -> bool {
        req.resource.namespaced && self.exempt.iter().any(|n| n == req.namespace)
    }

    pub fn is_empty(&self) -> bool {
        self.mutating.is_empty() && self.validating.is_empty()
    }

    fn review(req: &Request<'_>, object: &Value, uid: &str) -> Value {
        let r = req.resource;
        let kind = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let resource = json!({"group": r.group, "version": r.version, "resource": r.plural});
        let mut request = json!({
            "uid": uid,
            "kind": kind,
            "resource": resource,
            "requestKind": kind,
            "requestResource": resource,
            "name": req.name,
            "operation": req.operation.as_str(),
            "userInfo": req.user.to_json(),
            "object": object,
            "oldObject": req.old.cloned().unwrap_or(Value::Null),
            "dryRun": req.dry_run,
            "options": {"kind": req.operation.options_kind(), "apiVersion": "meta.k8s.io/v1"},
        });
        if r.namespaced {
            request["namespace"] = json!(req.namespace);
        }
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
    }

    /// Runs the mutating webhooks over `object`: the object as they left it, or the refusal.
    pub async fn mutate(&self, req: &Request<'_>, mut object: Value) -> Result<Value, ApiError> {
        if self.skips(req) {
            return Ok(object);
        }
        for hook in &self.mutating {
            let uid = new_uid();
            let response = hook.call(&Self::review(req, &object, &uid), &uid).await?;
            if response.get("allowed").and_then(Value::as_bool) != Some(true) {
                return Err(hook.refusal(&response));
            }
            let Some(patch) = response.get("patch").and_then(Value::as_str) else {
                continue;
            };
            let bad = |why: String| {
                ApiError::internal(format!(
                    "failed calling webhook \"{}\": its patch cannot be applied: {why}",
                    hook.name
                ))
            };
            if let Some(t) = response.get("patchType").and_then(Value::as_str) {
                if t != "JSONPatch" {
                    return Err(bad(format!("patchType {t:?} is not JSONPatch")));
                }
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(patch)
                .map_err(|e| bad(format!("not base64: {e}")))?;
            let p: json_patch::Patch = serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("not a JSON patch: {e}")))?;
            json_patch::patch(&mut object, &p).map_err(|e| bad(e.to_string()))?;
        }
        Ok(object)
    }

    /// Runs the validating webhooks: Ok, or the first refusal.
    pub async fn validate(&self, req: &Request<'_>, object: &Value) -> Result<(), ApiError> {
        if self.skips(req) {
            return Ok(());
        }
        for hook in &self.validating {
            let uid = new_uid();
            let response = hook.call(&Self::review(req, object, &uid), &uid).await?;
            if response.get("allowed").and_then(Value::as_bool) != Some(true) {
                return Err(hook.refusal(&response));
            }
        }
        Ok(())
    }
}
