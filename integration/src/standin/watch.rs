//! Watch streams: newline-delimited `{"type":…,"object":…}` events after a resourceVersion, filtered by
//! namespace and selectors, with bookmarks when asked for.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::errors::ApiError;
use super::event_views::{to_view, view_is_stored};
use super::resources::Resource;
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{Change, ChangeType, Store};

/// How often a watch that asked for bookmarks is told how far it has read.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);

pub struct WatchSpec {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    /// Events after this version; `None` (no resourceVersion, or "0") starts with the current objects as ADDED.
    pub from: Option<u64>,
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: the current objects, then a bookmark marking their end.
    pub initial_events: bool,
    pub timeout: Option<Duration>,
    /// Objects as one-row `meta.k8s.io/v1` Tables (what `kubectl get -w` asks for).
    pub as_table: bool,
}

impl WatchSpec {
    fn selects(&self, view: &Value) -> bool {
        self.labels.matches(view) && self.fields.matches(view)
    }

    fn line(&self, kind: &str, object: &Value) -> Bytes {
        let table;
        let object = if self.as_table && kind != "BOOKMARK" && kind != "ERROR" {
            table = super::table::table(self.resource, std::slice::from_ref(object), None);
            &table
        } else {
            object
        };
        let mut v = serde_json::to_vec(&json!({"type": kind, "object": object}))
            .expect("a JSON value serializes");
        v.push(b'\n');
        Bytes::from(v)
    }

    /// The line a change makes on this watch, if any.
    fn render(&self, c: &Change) -> Option<Bytes> {
        if c.storage != self.resource.storage
            || self
                .namespace
                .as_deref()
                .is_some_and(|ns| ns != c.namespace)
        {
            return None;
        }
        let view = to_view(self.resource, &c.object);
        let now = self.selects(&view);
        let kind = match c.kind {
            ChangeType::Modified => {
                let before = c
                    .previous
                    .as_ref()
                    .is_some_and(|p| self.selects(&to_view(self.resource, p)));
                match (before, now) {
                    (true, true) => ChangeType::Modified,
                    (false, true) => ChangeType::Added,
                    (true, false) => ChangeType::Deleted,
                    (false, false) => return None,
                }
            }
            k if now => k,
            _ => return None,
        };
        if view_is_stored(self.resource) && !self.as_table {
            let mut v = Vec::with_capacity(c.object_json.len() + 40);
            v.extend_from_slice(b"{\"type\":\"");
            v.extend_from_slice(kind.as_str().as_bytes());
            v.extend_from_slice(b"\",\"object\":");
            v.extend_from_slice(&c.object_json);
            v.extend_from_slice(b"}\n");
            Some(Bytes::from(v))
        } else {
            Some(self.line(kind.as_str(), &view))
        }
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        self.line(
            "BOOKMARK",
            &json!({"kind": self.resource.kind, "apiVersion": self.resource.api_version(), "metadata": meta}),
        )
    }
}

/// The response body of a watch; the stream ends at `timeout` or when the client goes away.
pub fn stream(store: Arc<Store>, spec: WatchSpec) -> Body {
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(run(store, spec, tx));
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Body::from_stream(body)
}

async fn run(store: Arc<Store>, spec: WatchSpec, tx: mpsc::Sender<Bytes>) {
    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let mut latest = store.subscribe();
    latest.borrow_and_update();
    let mut cursor = match spec.from {
        Some(rv) if !spec.initial_events => rv,
        _ => {
            let (items, rv) = store.list(
                spec.resource.storage,
                spec.namespace
                    .as_deref()
                    .filter(|_| spec.resource.namespaced),
            );
            for obj in items {
                let view = to_view(spec.resource, &obj);
                if spec.selects(&view) && tx.send(spec.line("ADDED", &view)).await.is_err() {
                    return;
                }
            }
            if spec.initial_events
                && spec.bookmarks
                && tx.send(spec.bookmark(rv, true)).await.is_err()
            {
                return;
            }
            rv
        }
    };
    let mut bookmarked = cursor;
    let mut next_bookmark = Instant::now() + BOOKMARK_EVERY;
    loop {
        latest.borrow_and_update();
        let changes = match store.changes_after(cursor) {
            Ok(c) => c,
            Err(gone) => {
                let status = ApiError::gone(cursor, gone.oldest).status();
                let _ = tx.send(spec.line("ERROR", &status)).await;
                return;
            }
        };
        for c in changes {
            cursor = c.rv;
            if let Some(line) = spec.render(&c) {
                if tx.send(line).await.is_err() {
                    return;
                }
                bookmarked = cursor;
            }
        }
        let far = Instant::now() + Duration::from_secs(86400);
        tokio::select! {
            r = latest.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(next_bookmark) => {
                next_bookmark = Instant::now() + BOOKMARK_EVERY;
                if spec.bookmarks && cursor > bookmarked {
                    if tx.send(spec.bookmark(cursor, false)).await.is_err() { return }
                    bookmarked = cursor;
                }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or(far)) => {
                if spec.bookmarks && cursor > bookmarked {
                    let _ = tx.send(spec.bookmark(cursor, false)).await;
                }
                return;
            }
            _ = tx.closed() => return,
        }
    }
}
