//! Recording events off the hot path, once per identical text and pod per window.

use crate::kubeapi::{ClusterApi, PodEvent};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Drops an event identical to one recorded for the same pod within `window`: kube-scheduler
/// retries a pod that fits nowhere every few seconds, and each retry would otherwise create the
/// same Event objects again.
pub struct EventDedup {
    window: Duration,
    seen: HashMap<(String, &'static str, String), Instant>,
}

impl EventDedup {
    pub fn new(window: Duration) -> Self {
        EventDedup {
            window,
            seen: HashMap::new(),
        }
    }

    pub fn admit(&mut self, e: &PodEvent, now: Instant) -> bool {
        let window = self.window;
        if self.seen.len() > 10_000 {
            self.seen.retain(|_, t| now.duration_since(*t) < window);
        }
        let key = (e.pod.uid.clone(), e.reason, e.message.clone());
        match self.seen.get(&key) {
            Some(t) if now.duration_since(*t) < window => false,
            _ => {
                self.seen.insert(key, now);
                true
            }
        }
    }
}

/// Writes queued events to the API in the background, so filter and bind never wait on them.
pub fn spawn_event_writer<A: ClusterApi + Clone>(
    api: A,
    mut rx: mpsc::UnboundedReceiver<PodEvent>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut dedup = EventDedup::new(Duration::from_secs(60));
        while let Some(e) = rx.recv().await {
            if !dedup.admit(&e, Instant::now()) {
                continue;
            }
            let (reason, pod) = (e.reason, format!("{}/{}", e.pod.namespace, e.pod.name));
            if let Err(err) = api.record_event(e).await {
                tracing::warn!(%pod, reason, "recording the event failed: {err}");
            }
        }
    })
}
