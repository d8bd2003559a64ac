//! `sched-driver`: kube-scheduler's part in the lab and the burst benchmark, where no kube-scheduler can run.
//!
//! It does what kube-scheduler does with an extender that is `nodeCacheCapable` and owns the vGPU resources:
//! for every pod with our `schedulerName` and no node, POST `filter` (`{"pod", "nodenames"}`), and when nodes
//! come back POST `bind` (`{"PodName", "PodNamespace", "PodUID", "Node"}`) for the first one. A pod that fits
//! nowhere gets kube-scheduler's `FailedScheduling` event with the extender's reasons and is retried with
//! backoff, as kube-scheduler's unschedulable queue does. Several pods are scheduled at once (`--parallel`),
//! which is more than kube-scheduler's one-at-a-time filter and so a harder test of the extender.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::{Event, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;
use tokio::sync::{Mutex, Semaphore};

#[derive(Parser)]
#[command(about = "kube-scheduler's side of the vgpu extender, for tests and benchmarks")]
struct Args {
    /// The extender's URL prefix (kube-scheduler's `urlPrefix`).
    #[arg(long, default_value = "http://127.0.0.1:8888")]
    extender: String,
    #[arg(long, default_value = "vgpu-scheduler")]
    scheduler_name: String,
    /// Pods filtered and bound at once.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

async fn post(client: &Client, url: &str, body: serde_json::Value) -> Result<serde_json::Value> {
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&body)?)))?;
    let resp = client.request(req).await.with_context(|| url.to_string())?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(anyhow!(
            "{url}: HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    Ok(serde_json::from_slice(&bytes)?)
}

struct Driver {
    args: Args,
    http: Client,
    pods: Api<Pod>,
    nodes: Api<Node>,
    kube: kube::Client,
    /// Pods (by UID) being scheduled, waiting for their backoff, or bound, so a watch event does not start
    /// them twice.
    busy: Mutex<HashMap<String, Instant>>,
    slots: Semaphore,
}

impl Driver {
    async fn schedule(&self, pod: &Pod) -> Result<Option<String>> {
        let nodes: Vec<String> = self
            .nodes
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        let base = self.args.extender.trim_end_matches('/');
        let res = post(
            &self.http,
            &format!("{base}/filter"),
            serde_json::json!({"pod": pod, "nodenames": nodes}),
        )
        .await?;
        let fit: Vec<String> = res["nodenames"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let Some(node) = fit.first() else {
            let err = res["error"].as_str().unwrap_or_default();
            let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
            for key in ["failedNodes", "failedAndUnresolvableNodes"] {
                if let Some(m) = res[key].as_object() {
                    for v in m.values() {
                        *reasons
                            .entry(v.as_str().unwrap_or("").to_string())
                            .or_default() += 1;
                    }
                }
            }
            let mut msg = format!("0/{} nodes are available:", nodes.len());
            for (r, n) in &reasons {
                msg.push_str(&format!(" {n} {r}."));
            }
            if !err.is_empty() {
                msg.push_str(&format!(" extender: {err}"));
            }
            self.event(pod, "Warning", "FailedScheduling", &msg).await;
            return Ok(None);
        };
        let res = post(
            &self.http,
            &format!("{base}/bind"),
            serde_json::json!({
                "PodName": pod.metadata.name,
                "PodNamespace": pod.metadata.namespace.as_deref().unwrap_or("default"),
                "PodUID": pod.metadata.uid,
                "Node": node,
            }),
        )
        .await?;
        match res["Error"].as_str() {
            Some(e) if !e.is_empty() => {
                self.event(
                    pod,
                    "Warning",
                    "FailedScheduling",
                    &format!("binding rejected: {e}"),
                )
                .await;
                Ok(None)
            }
            _ => Ok(Some(node.clone())),
        }
    }

    async fn event(&self, pod: &Pod, type_: &str, reason: &str, message: &str) {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let now = chrono_now();
        let ev = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!(
                    "{}.",
                    pod.metadata.name.as_deref().unwrap_or("pod")
                )),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                kind: Some("Pod".into()),
                api_version: Some("v1".into()),
                namespace: Some(ns.clone()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some(type_.into()),
            reporting_component: Some("default-scheduler".into()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            count: Some(1),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(self.kube.clone(), &ns);
        if let Err(e) = api.create(&PostParams::default(), &ev).await {
            eprintln!("sched-driver: event {reason}: {e}");
        }
    }

    fn wants(&self, pod: &Pod) -> bool {
        let spec = pod.spec.as_ref();
        spec.and_then(|s| s.scheduler_name.as_deref()) == Some(self.args.scheduler_name.as_str())
            && spec.and_then(|s| s.node_name.as_deref()).is_none()
            && pod.metadata.deletion_timestamp.is_none()
    }
}

fn chrono_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let kube = kube::Client::try_default()
        .await
        .context("API server (KUBECONFIG)")?;
    let http: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let slots = Semaphore::new(args.parallel.max(1));
    let d = Arc::new(Driver {
        pods: Api::all(kube.clone()),
        nodes: Api::all(kube.clone()),
        kube,
        http,
        args,
        busy: Mutex::new(HashMap::new()),
        slots,
    });
    eprintln!("sched-driver: scheduling pods of {}", d.args.scheduler_name);
    let mut stream = watcher(d.pods.clone(), watcher::Config::default()).boxed();
    while let Some(ev) = stream.next().await {
        let pods = match ev {
            Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p)) => vec![p],
            Ok(_) => continue,
            Err(e) => {
                eprintln!("sched-driver: watch: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        for pod in pods.into_iter().filter(|p| d.wants(p)) {
            let k = key(&pod);
            // By UID: a pod recreated under the same name is a new pod. A pod bound stays here, as in
            // kube-scheduler's cache of assumed pods: a watch event older than its binding (the bind's own
            // annotation patch) must not schedule it a second time.
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if d.busy
                .lock()
                .await
                .insert(uid.clone(), Instant::now())
                .is_some()
            {
                continue;
            }
            let d = d.clone();
            tokio::spawn(async move {
                let mut backoff = Duration::from_millis(500);
                let mut pod = pod;
                loop {
                    let placed = {
                        let _slot = d.slots.acquire().await;
                        d.schedule(&pod).await
                    };
                    match placed {
                        Ok(Some(node)) => {
                            eprintln!("sched-driver: {k} -> {node}");
                            return;
                        }
                        Ok(None) => {}
                        Err(e) => eprintln!("sched-driver: {k}: {e:#}"),
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    // Scheduled by someone else, or deleted, in the meantime: stop.
                    let ns = pod
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into());
                    let api: Api<Pod> = Api::namespaced(d.kube.clone(), &ns);
                    match api
                        .get_opt(pod.metadata.name.as_deref().unwrap_or(""))
                        .await
                    {
                        Ok(Some(p)) if d.wants(&p) => pod = p,
                        _ => break,
                    }
                }
                d.busy.lock().await.remove(&uid);
            });
        }
    }
    Ok(())
}
