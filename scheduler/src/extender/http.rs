//! The extender's HTTP face. Every answer is HTTP 200 with any error in the `error` / `Error`
//! field: kube-scheduler treats a non-200 as the extender failing the whole scheduling cycle.

use super::wire::{ExtenderBindingArgs, ExtenderBindingResult};
use super::Extender;
use crate::kubeapi::ClusterApi;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderName;
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub const MAX_BODY: usize = 512 << 20;

pub fn router<A: ClusterApi>(ext: Arc<Extender<A>>) -> Router {
    Router::new()
        .route("/filter", post(filter::<A>))
        .route("/bind", post(bind::<A>))
        .route("/healthz", get(|| async { "ok" }))
        // Without nodeCacheCapable kube-scheduler sends every candidate Node object: megabytes
        // on a large cluster, far past axum's 2 MiB default. The caller is kube-scheduler on
        // localhost, so the bound is generous.
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(ext)
}

/// `/metrics` alone, for the port Prometheus reaches (filter and bind stay on localhost).
pub fn metrics_router<A: ClusterApi>(ext: Arc<Extender<A>>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::<A>))
        .with_state(ext)
}

/// The size of the last filter answer, to allocate the next one once (5,000 candidates with a
/// third of them failed make an answer of about 100 KiB).
static ANSWER_SIZE: AtomicUsize = AtomicUsize::new(0);

async fn filter<A: ClusterApi>(
    State(ext): State<Arc<Extender<A>>>,
    body: Bytes,
) -> ([(HeaderName, &'static str); 1], Vec<u8>) {
    let mut out = Vec::with_capacity(ANSWER_SIZE.load(Ordering::Relaxed) + 256);
    ext.filter_json(&body, &mut out);
    ANSWER_SIZE.store(out.len(), Ordering::Relaxed);
    ([(CONTENT_TYPE, "application/json")], out)
}

async fn bind<A: ClusterApi>(
    State(ext): State<Arc<Extender<A>>>,
    body: Bytes,
) -> Json<ExtenderBindingResult> {
    match serde_json::from_slice::<ExtenderBindingArgs>(&body) {
        Ok(args) => Json(ext.bind(args).await),
        Err(e) => Json(ExtenderBindingResult {
            error: format!(
                "cannot read ExtenderBindingArgs (want PodName, PodNamespace, PodUID, Node): {e}"
            ),
        }),
    }
}

async fn metrics<A: ClusterApi>(
    State(ext): State<Arc<Extender<A>>>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let text = ext.with_ledger(|l| crate::metrics::render(l));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
}
