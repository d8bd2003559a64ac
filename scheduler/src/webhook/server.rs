//! Serving the webhooks over TLS: `POST /mutate` and `POST /validate` take an AdmissionReview
//! for pods (CREATE and UPDATE, the pod and its `status` subresource).

pub use super::review::Mode;
use super::review::{decide, Rules};
use super::{ClusterLimits, Verdict, Writers};
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::core::DynamicObject;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::Service;

/// What the webhook needs at each call: our scheduler's name, the accounts that write vgpu's
/// pod metadata, and the cluster's current limits.
pub struct WebhookState {
    pub scheduler_name: String,
    pub writers: Writers,
    pub limits: Box<dyn Fn() -> ClusterLimits + Send + Sync>,
    /// Whether the extender has listed nodes and pods (the pod's readiness probe).
    pub ready: Box<dyn Fn() -> bool + Send + Sync>,
}

/// The API server sends at most about 3 MiB in a review (an UPDATE holds the pod twice, each up to
/// etcd's 1.5 MiB); axum's default of 2 MiB would answer 413, which fails the pod write closed.
const MAX_REVIEW_BYTES: usize = 8 << 20;

pub fn router(state: Arc<WebhookState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .with_state(state)
}

async fn readyz(State(st): State<Arc<WebhookState>>) -> (axum::http::StatusCode, &'static str) {
    if (st.ready)() {
        (axum::http::StatusCode::OK, "ok")
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "still listing nodes and pods",
        )
    }
}

async fn mutate(State(st): State<Arc<WebhookState>>, body: Bytes) -> Json<serde_json::Value> {
    Json(canonical(review(&st, Mode::Mutate, &body)))
}

async fn validate(State(st): State<Arc<WebhookState>>, body: Bytes) -> Json<serde_json::Value> {
    Json(canonical(review(&st, Mode::Validate, &body)))
}

/// kube-core writes the patch as an array of byte values; Go reads that too, but the form the
/// API documents (and every other webhook sends) is a base64 string, so that is what goes out.
pub fn canonical(review: AdmissionReview<DynamicObject>) -> serde_json::Value {
    use base64::Engine;
    let mut v = serde_json::to_value(review).expect("an AdmissionReview serialises");
    if let Some(patch) = v.pointer_mut("/response/patch") {
        if let Some(bytes) = patch.as_array().map(|a| {
            a.iter()
                .filter_map(|b| b.as_u64())
                .map(|b| b as u8)
                .collect::<Vec<u8>>()
        }) {
            *patch =
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
    }
    v
}

/// The answer to one AdmissionReview, as the API server sent it.
pub fn review(st: &WebhookState, mode: Mode, body: &[u8]) -> AdmissionReview<DynamicObject> {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return AdmissionResponse::invalid(format!("cannot read the AdmissionReview: {e}"))
                .into_review()
        }
    };
    let req: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            return AdmissionResponse::invalid(format!("the AdmissionReview has no request: {e}"))
                .into_review()
        }
    };
    let resp = AdmissionResponse::from(&req);
    let rules = Rules {
        scheduler_name: &st.scheduler_name,
        writers: &st.writers,
        limits: (st.limits)(),
    };
    match decide(&req, &rules, mode) {
        Verdict::Unchanged => resp.into_review(),
        Verdict::Deny(msg) => resp.deny(msg).into_review(),
        Verdict::SetScheduler(name) => {
            // "add" replaces the member when present, so one op covers both cases.
            let patch: json_patch::Patch = serde_json::from_value(
                serde_json::json!([{"op": "add", "path": "/spec/schedulerName", "value": name}]),
            )
            .expect("a literal JSON patch");
            match resp.with_patch(patch) {
                Ok(r) => r.into_review(),
                Err(e) => AdmissionResponse::from(&req)
                    .deny(format!("vgpu: cannot encode the patch: {e}"))
                    .into_review(),
            }
        }
    }
}

/// Accepts TLS connections and serves `app` on each, until the listener fails.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let app = app.clone();
        // Each handshake runs in its own task so one slow client cannot stall the others.
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| app.clone().call(req));
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
}
