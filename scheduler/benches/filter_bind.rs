//! Filter + bind latency and throughput on simulated clusters, through the extender's own code
//! path: the kube-scheduler JSON is parsed, placed and answered as JSON (`filter_json`, what the
//! HTTP handler runs; in-process, reading the answer back is left out of the timings, as it is
//! kube-scheduler's work), and bind writes its
//! annotations to an API stub that answers at once (so the figures are the scheduler's own time,
//! not the API server's). Run: `cargo bench -p vgpu-scheduler --bench filter_bind [-- --quick]`.

use serde_json::json;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vgpu_scheduler::extender::wire::{
    ExtenderArgs, ExtenderBindingArgs, ExtenderBindingResult, ExtenderFilterResult,
};
use vgpu_scheduler::extender::Extender;
use vgpu_scheduler::kubeapi::{ClusterApi, PodEvent, PodRef};
use vgpu_scheduler::placement::Config;

/// The API server stand-in: answers each write after `delay_us` (zero: at once, so the figures
/// are the scheduler's own time).
#[derive(Clone, Default)]
struct InstantApi {
    delay_us: Arc<std::sync::atomic::AtomicU64>,
}

impl InstantApi {
    async fn answer(&self) {
        let us = self.delay_us.load(std::sync::atomic::Ordering::Relaxed);
        if us > 0 {
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
    }
}

impl ClusterApi for InstantApi {
    async fn annotate_pod(
        &self,
        _: &PodRef,
        a: std::collections::BTreeMap<String, String>,
        _: Option<&str>,
    ) -> Result<(), String> {
        std::hint::black_box(a);
        self.answer().await;
        Ok(())
    }
    async fn bind_pod(&self, _: &PodRef, _: &str) -> Result<(), String> {
        self.answer().await;
        Ok(())
    }
    async fn record_event(&self, _: PodEvent) -> Result<(), String> {
        Ok(())
    }
}

const GPUS_PER_NODE: usize = 8;
const CARD_TYPES: [(&str, u64); 3] = [
    ("NVIDIA A100-SXM4-80GB", 81920),
    ("NVIDIA H100 80GB HBM3", 81559),
    ("NVIDIA-Tesla T4", 15360),
];

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn node(i: usize) -> k8s_openapi::api::core::v1::Node {
    let (kind, mem) = CARD_TYPES[i % CARD_TYPES.len()];
    let cards: Vec<_> = (0..GPUS_PER_NODE)
        .map(|g| json!({"id": format!("GPU-{i:05}-{g}-0000-0000-000000000000"), "index": g, "count": 10, "devmem": mem, "devcore": 100, "type": kind, "numa": g / 4, "mode": "hami-core", "health": true}))
        .collect();
    serde_json::from_value(json!({"metadata": {"name": format!("node-{i:05}"), "annotations": {"hami.io/node-nvidia-register": serde_json::to_string(&cards).unwrap()}}})).unwrap()
}

/// A pod as kube-scheduler sends it; requests vary like a mixed workload.
fn pod_body(k: usize, names: &str) -> Vec<u8> {
    let gpus = if k.is_multiple_of(10) { 2 } else { 1 };
    let mem = [2000, 4000, 8000, 1000][k % 4];
    let cores = [0, 30, 50, 10][k % 4];
    let mut annotations = serde_json::Map::new();
    if k.is_multiple_of(5) {
        annotations.insert("hami.io/node-scheduler-policy".into(), json!("spread"));
    }
    if k.is_multiple_of(7) {
        annotations.insert("nvidia.com/use-gputype".into(), json!("A100,H100"));
    }
    let pod = json!({"metadata": {"name": format!("pod-{k}"), "namespace": "bench", "uid": format!("uid-{k}"), "annotations": annotations},
                     "spec": {"schedulerName": "vgpu-scheduler", "containers": [{"name": "app", "image": "pytorch/pytorch:2.4.0",
                              "resources": {"limits": {"nvidia.com/gpu": gpus.to_string(), "nvidia.com/gpumem": mem.to_string(), "nvidia.com/gpucores": cores.to_string()}}}]}});
    format!(r#"{{"pod":{pod},"nodenames":{names}}}"#).into_bytes()
}

/// This thread's CPU time: what the scheduler itself spent, without the time other tenants of a
/// shared machine took the core away (wall time is reported beside it).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

struct Row {
    nodes: usize,
    pods: usize,
    filter_p50: f64,
    filter_p99: f64,
    fb_p50: f64,
    fb_p99: f64,
    fb_max: f64,
    cpu_p50: f64,
    cpu_p99: f64,
    pods_per_s: f64,
    placed: usize,
    rss_mib: f64,
    ledger_mib: f64,
}

/// kube-scheduler's side of the extender's HTTP: one keep-alive connection on loopback.
struct HttpClient {
    send: hyper::client::conn::http1::SendRequest<http_body_util::Full<hyper::body::Bytes>>,
}

impl HttpClient {
    fn start(ext: Arc<Extender<InstantApi>>, rt: &tokio::runtime::Runtime) -> Self {
        let addr = serve_http(ext);
        HttpClient {
            send: rt.block_on(connect(addr)),
        }
    }

    fn post(&mut self, rt: &tokio::runtime::Runtime, path: &str, body: Vec<u8>) -> Vec<u8> {
        rt.block_on(post(&mut self.send, path, body))
    }
}

type Conn = hyper::client::conn::http1::SendRequest<http_body_util::Full<hyper::body::Bytes>>;

/// The extender's HTTP server on its own thread and runtime, as in `serve`.
fn serve_http(ext: Arc<Extender<InstantApi>>) -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    // The server gets its own thread and runtime, as in `serve`.
    std::thread::spawn(move || {
        let srv = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        srv.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            let l = axum::serve::ListenerExt::tap_io(l, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(l, vgpu_scheduler::extender::http::router(ext))
                .await
                .unwrap();
        });
    });
    rx.recv().unwrap()
}

async fn connect(addr: std::net::SocketAddr) -> Conn {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn post(send: &mut Conn, path: &str, body: Vec<u8>) -> Vec<u8> {
    use http_body_util::BodyExt;
    let req = hyper::Request::post(path)
        .header("content-type", "application/json")
        .header("host", "127.0.0.1")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec()
}

/// Fills the cluster about a third full through filter and bind, as `run` starts.
fn warm_up(
    ext: &Extender<InstantApi>,
    nodes: usize,
    names_json: &str,
    rt: &tokio::runtime::Runtime,
) -> (usize, VecDeque<String>) {
    let steady = nodes * GPUS_PER_NODE * 10 / 3;
    let mut live = VecDeque::new();
    let warm = steady.min(20_000);
    for k in 0..warm {
        let args: ExtenderArgs = serde_json::from_slice(&pod_body(k, names_json)).unwrap();
        if let Some(n) = ext
            .filter(args)
            .nodenames
            .and_then(|n| n.into_iter().next())
        {
            rt.block_on(ext.bind(ExtenderBindingArgs {
                pod_name: format!("pod-{k}"),
                pod_namespace: "bench".into(),
                pod_uid: format!("uid-{k}"),
                node: n,
            }));
            live.push_back(format!("uid-{k}"));
        }
    }
    (warm, live)
}

/// kube-scheduler's shape: its scheduling cycle sends one filter after another, while each
/// pod's binding cycle runs on its own (here over `BIND_CONNECTIONS` connections), and the API
/// answers each write after `api_delay`. Prints binds per second over the whole run.
fn sustained(nodes: usize, pods: usize, api_delay: Duration, rt: &tokio::runtime::Runtime) {
    const BIND_CONNECTIONS: usize = 32;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || while rx.blocking_recv().is_some() {});
    let api = InstantApi::default();
    let ext = Arc::new(Extender::new(Config::default(), api.clone(), tx));
    for i in 0..nodes {
        ext.node_applied(&node(i));
    }
    let names: Vec<String> = (0..nodes).map(|i| format!("node-{i:05}")).collect();
    let names_json = serde_json::to_string(&names).unwrap();
    let (warm, _) = warm_up(&ext, nodes, &names_json, rt);
    // The warm-up wrote at once; from here the API takes its time.
    api.delay_us.store(
        api_delay.as_micros() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let addr = serve_http(ext.clone());
    let (filter_t, bind_t, wall) = rt.block_on(async move {
        let mut filter_conn = connect(addr).await;
        let mut queues = Vec::new();
        let mut workers = Vec::new();
        for _ in 0..BIND_CONNECTIONS {
            let (q, mut r) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
            let mut conn = connect(addr).await;
            queues.push(q);
            workers.push(tokio::spawn(async move {
                let mut times = Vec::new();
                while let Some(b) = r.recv().await {
                    let t = Instant::now();
                    let r: ExtenderBindingResult =
                        serde_json::from_slice(&post(&mut conn, "/bind", b).await).unwrap();
                    assert!(r.error.is_empty(), "{}", r.error);
                    times.push(t.elapsed());
                }
                times
            }));
        }
        let mut filter_t = Vec::with_capacity(pods);
        let t0 = Instant::now();
        for k in warm..warm + pods {
            let body = pod_body(k, &names_json);
            let t = Instant::now();
            let result: ExtenderFilterResult =
                serde_json::from_slice(&post(&mut filter_conn, "/filter", body).await).unwrap();
            filter_t.push(t.elapsed());
            if let Some(n) = result.nodenames.and_then(|n| n.into_iter().next()) {
                let b = serde_json::to_vec(&json!({"PodName": format!("pod-{k}"), "PodNamespace": "bench", "PodUID": format!("uid-{k}"), "Node": n})).unwrap();
                queues[k % BIND_CONNECTIONS].send(b).unwrap();
            }
        }
        drop(queues);
        let mut bind_t = Vec::new();
        for w in workers {
            bind_t.extend(w.await.unwrap());
        }
        (filter_t, bind_t, t0.elapsed())
    });
    let (mut filter_t, mut bind_t) = (filter_t, bind_t);
    filter_t.sort();
    bind_t.sort();
    println!(
        "| {nodes} x {GPUS_PER_NODE} | {} ms | {pods} | {} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.0} |",
        api_delay.as_millis(),
        bind_t.len(),
        pct(&filter_t, 0.5),
        pct(&filter_t, 0.99),
        pct(&bind_t, 0.5),
        pct(&bind_t, 0.99),
        bind_t.len() as f64 / wall.as_secs_f64()
    );
}

fn run(nodes: usize, pods: usize, rt: &tokio::runtime::Runtime, http: bool) -> Row {
    let rss0 = rss_kib();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // Events are drained elsewhere, as the background writer does in the server.
    std::thread::spawn(move || while rx.blocking_recv().is_some() {});
    let ext = Arc::new(Extender::new(Config::default(), InstantApi::default(), tx));
    for i in 0..nodes {
        ext.node_applied(&node(i));
    }
    let names: Vec<String> = (0..nodes).map(|i| format!("node-{i:05}")).collect();
    let names_json = serde_json::to_string(&names).unwrap();
    // Churn keeps the cluster about a third full: the oldest pods leave as new ones arrive.
    let steady = nodes * GPUS_PER_NODE * 10 / 3;
    let (warm, mut live) = warm_up(&ext, nodes, &names_json, rt);
    let rss_loaded = rss_kib();
    let mut client = http.then(|| HttpClient::start(ext.clone(), rt));

    let (mut filter_t, mut fb_t, mut cpu_t) = (
        Vec::with_capacity(pods),
        Vec::with_capacity(pods),
        Vec::with_capacity(pods),
    );
    let mut placed = 0;
    for k in warm..warm + pods {
        // Built outside the timed span and dropped after it, so the bodies do not pile up in RSS.
        let body = pod_body(k, &names_json);
        let c0 = thread_cpu();
        let t0 = Instant::now();
        // In-process: the body in, the answer's JSON out, as the HTTP handler does; reading the
        // answer back is kube-scheduler's work, left out of the in-process timings (over HTTP
        // the client reads it inside the timed span, as before).
        let (result, t1, untimed): (ExtenderFilterResult, _, _) = match client.as_mut() {
            Some(c) => (
                serde_json::from_slice(&c.post(rt, "/filter", body)).unwrap(),
                Instant::now(),
                (Duration::ZERO, Duration::ZERO),
            ),
            None => {
                let mut out = Vec::new();
                ext.filter_json(&body, &mut out);
                let (t1, c1) = (Instant::now(), thread_cpu());
                let r = serde_json::from_slice(&out).unwrap();
                (r, t1, (t1.elapsed(), thread_cpu() - c1))
            }
        };
        if let Some(n) = result.nodenames.and_then(|n| n.into_iter().next()) {
            let b = serde_json::to_vec(&json!({"PodName": format!("pod-{k}"), "PodNamespace": "bench", "PodUID": format!("uid-{k}"), "Node": n})).unwrap();
            let r: ExtenderBindingResult = match client.as_mut() {
                Some(c) => serde_json::from_slice(&c.post(rt, "/bind", b)).unwrap(),
                None => rt
                    .block_on(ext.bind(serde_json::from_slice::<ExtenderBindingArgs>(&b).unwrap())),
            };
            assert!(r.error.is_empty(), "{}", r.error);
            placed += 1;
            live.push_back(format!("uid-{k}"));
        }
        let t2 = Instant::now();
        cpu_t.push(thread_cpu() - c0 - untimed.1);
        filter_t.push(t1 - t0);
        fb_t.push(t2 - t0 - untimed.0);
        while live.len() > steady {
            ext.pod_deleted(&live.pop_front().unwrap());
        }
    }
    // Back to back, one at a time: the time inside filter and bind only.
    let busy: Duration = fb_t.iter().sum();
    filter_t.sort();
    fb_t.sort();
    cpu_t.sort();
    Row {
        nodes,
        pods,
        filter_p50: pct(&filter_t, 0.5),
        filter_p99: pct(&filter_t, 0.99),
        fb_p50: pct(&fb_t, 0.5),
        fb_p99: pct(&fb_t, 0.99),
        fb_max: fb_t.last().unwrap().as_secs_f64() * 1e3,
        cpu_p50: pct(&cpu_t, 0.5),
        cpu_p99: pct(&cpu_t, 0.99),
        pods_per_s: pods as f64 / busy.as_secs_f64(),
        placed,
        rss_mib: rss_kib() as f64 / 1024.0,
        ledger_mib: rss_loaded.saturating_sub(rss0) as f64 / 1024.0,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--nodes N` runs one size, so its memory figures come from a fresh process.
    let only: Option<usize> = args
        .iter()
        .position(|a| a == "--nodes")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok());
    // `--http`: through the extender's HTTP server on loopback, as kube-scheduler calls it.
    let http = args.iter().any(|a| a == "--http");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // `--sustained MS`: filters one after another and binds concurrently over HTTP, the API
    // answering each write after MS milliseconds; prints binds per second.
    if let Some(ms) = args
        .iter()
        .position(|a| a == "--sustained")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<u64>().ok())
    {
        let nodes = only.unwrap_or(5000);
        let pods = if quick { 500 } else { 5000 };
        println!("Path: HTTP on loopback, filters in sequence, binds concurrent over 32 connections, API answering each write after the given delay\n");
        println!("| nodes x GPUs | API delay | pods | bound | filter p50 | filter p99 | bind p50 | bind p99 | binds/s |");
        println!("|---|---|---|---|---|---|---|---|---|");
        sustained(nodes, pods, Duration::from_millis(ms), &rt);
        return;
    }
    let plan: &[(usize, usize)] = if quick {
        &[(100, 500), (1000, 300), (5000, 100)]
    } else {
        &[(100, 5000), (1000, 3000), (5000, 2000)]
    };
    println!(
        "Path: {}\n",
        if http {
            "HTTP on loopback (axum server, hyper client, one keep-alive connection)"
        } else {
            "in-process (JSON parse, filter, JSON answer; bind)"
        }
    );
    println!("| nodes x GPUs | pods timed | placed | filter p50 | filter p99 | filter+bind p50 | filter+bind p99 | max | CPU p50 | CPU p99 | pods/s | RSS after | RSS for nodes + pods |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &(nodes, pods) in plan.iter().filter(|(n, _)| only.is_none_or(|o| o == *n)) {
        let r = run(nodes, pods, &rt, http);
        // Over HTTP the server runs on another thread, so this thread's CPU time says nothing.
        let cpu = |v: f64| {
            if http {
                "-".to_string()
            } else {
                format!("{v:.3} ms")
            }
        };
        println!(
            "| {} x {GPUS_PER_NODE} | {} | {} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {} | {} | {:.0} | {:.1} MiB | {:.1} MiB |",
            r.nodes,
            r.pods,
            r.placed,
            r.filter_p50,
            r.filter_p99,
            r.fb_p50,
            r.fb_p99,
            r.fb_max,
            cpu(r.cpu_p50),
            cpu(r.cpu_p99),
            r.pods_per_s,
            r.rss_mib,
            r.ledger_mib
        );
    }
}
