use super::wire::*;
use super::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use vgpu_contract::annotations as ann;

const T4: &str = "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039";

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Call {
    Annotate(PodRef, BTreeMap<String, String>, Option<String>),
    Bind(PodRef, String),
}

/// Records every write; binds of pods named in `fail_bind` are refused like an API error.
#[derive(Clone, Default)]
pub(crate) struct FakeApi {
    pub calls: Arc<Mutex<Vec<Call>>>,
    pub fail_bind: Arc<Mutex<HashSet<String>>>,
    pub delay_us: u64,
    pub seq: Arc<AtomicUsize>,
}

impl ClusterApi for FakeApi {
    async fn annotate_pod(
        &self,
        pod: &PodRef,
        a: BTreeMap<String, String>,
        label: Option<&str>,
    ) -> Result<(), String> {
        self.pause().await;
        self.calls
            .lock()
            .unwrap()
            .push(Call::Annotate(pod.clone(), a, label.map(str::to_string)));
        Ok(())
    }
    async fn bind_pod(&self, pod: &PodRef, node: &str) -> Result<(), String> {
        self.pause().await;
        if self.fail_bind.lock().unwrap().contains(&pod.name) {
            return Err("pods \"x\" is forbidden".into());
        }
        self.calls
            .lock()
            .unwrap()
            .push(Call::Bind(pod.clone(), node.to_string()));
        Ok(())
    }
    async fn record_event(&self, _: PodEvent) -> Result<(), String> {
        Ok(())
    }
}

impl FakeApi {
    async fn pause(&self) {
        if self.delay_us > 0 {
            // Varying delays interleave concurrent binds differently from run to run.
            let n = self.seq.fetch_add(1, Ordering::Relaxed) as u64;
            tokio::time::sleep(Duration::from_micros((n * 7919) % self.delay_us)).await;
        }
    }
}

fn register(slots: u32, mem: u64, uuid: &str) -> String {
    format!(
        r#"[{{"id":"{uuid}","count":{slots},"devmem":{mem},"devcore":100,"type":"NVIDIA-Tesla T4","health":true}}]"#
    )
}

fn node_json(name: &str, reg: &str) -> Value {
    json!({"metadata": {"name": name, "annotations": {"hami.io/node-nvidia-register": reg}}, "status": {}})
}

/// A pod as kube-scheduler sends it: from its informer cache, without apiVersion or kind.
fn pod_json(name: &str, uid: &str, limits: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": "default", "uid": uid},
           "spec": {"containers": [{"name": "app", "image": "nvidia/cuda:12.4.1-base-ubuntu22.04", "resources": {"limits": limits}}]},
           "status": {"phase": "Pending"}})
}

/// As kube-scheduler sends it, from the API: quantities in canonical form (4000 is "4k").
fn mib(m: u64) -> Value {
    let q = if m.is_multiple_of(1000) {
        format!("{}k", m / 1000)
    } else {
        m.to_string()
    };
    json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": q})
}

fn new_ext(api: FakeApi) -> (Extender<FakeApi>, mpsc::UnboundedReceiver<PodEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Extender::new(Config::default(), api, tx), rx)
}

fn with_lab_node(ext: &Extender<FakeApi>) {
    let node: k8s_openapi::api::core::v1::Node =
        serde_json::from_value(node_json("hami-workshop", &register(10, 15360, T4))).unwrap();
    ext.node_applied(&node);
}

fn filter(ext: &Extender<FakeApi>, body: Value) -> Value {
    let args: ExtenderArgs = serde_json::from_value(body).unwrap();
    serde_json::to_value(ext.filter(args)).unwrap()
}

async fn bind(ext: &Extender<FakeApi>, name: &str, uid: &str, node: &str) -> Value {
    let args: ExtenderBindingArgs = serde_json::from_value(
        json!({"PodName": name, "PodNamespace": "default", "PodUID": uid, "Node": node}),
    )
    .unwrap();
    serde_json::to_value(ext.bind(args).await).unwrap()
}

fn drain(rx: &mut mpsc::UnboundedReceiver<PodEvent>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push((e.reason.to_string(), e.message));
    }
    out
}

#[tokio::test]
async fn lab_scenario_through_filter_and_bind_with_the_labs_events() {
    let api = FakeApi::default();
    let (ext, mut rx) = new_ext(api.clone());
    with_lab_node(&ext);
    for (name, uid) in [
        ("gpumem-pod-a", "uid-a"),
        ("gpumem-pod-b", "uid-b"),
        ("oom-test-pod", "uid-oom"),
    ] {
        let r = filter(
            &ext,
            json!({"pod": pod_json(name, uid, mib(4000)), "nodenames": ["hami-workshop"]}),
        );
        assert_eq!(r, json!({"nodenames": ["hami-workshop"]}), "{name}");
        assert_eq!(
            bind(&ext, name, uid, "hami-workshop").await,
            json!({"Error": ""})
        );
    }
    let events = drain(&mut rx);
    assert_eq!(
        events[4..].to_vec(),
        vec![
            (
                "FilteringSucceed".into(),
                "find fit node(hami-workshop), 0 nodes not fit, 1 nodes fit(hami-workshop:7.21)"
                    .into()
            ),
            (
                "BindingSucceed".into(),
                "Successfully binding node [hami-workshop] to default/oom-test-pod".into()
            ),
        ]
    );
    let calls = api.calls.lock().unwrap().clone();
    let Call::Annotate(pod, a, label) = &calls[4] else {
        panic!("{calls:?}")
    };
    assert_eq!(pod.name, "oom-test-pod");
    assert_eq!(a[ann::DEVICES_TO_ALLOCATE], format!("{T4},NVIDIA,4000,0:;"));
    assert_eq!(a[ann::VGPU_NODE], "hami-workshop");
    assert_eq!(a[ann::BIND_PHASE], "allocating");
    assert!(a[ann::BIND_TIME].parse::<u64>().unwrap() > 1_700_000_000);
    assert!(a[ann::VGPU_TIME].parse::<u64>().is_ok());
    assert_eq!(label.as_deref(), Some("hami-workshop"));
    assert_eq!(
        calls[5],
        Call::Bind(
            PodRef {
                namespace: "default".into(),
                name: "oom-test-pod".into(),
                uid: "uid-oom".into()
            },
            "hami-workshop".into()
        )
    );

    // A fourth 4000 MiB slice does not fit: failedNodes says why, in HAMi's words.
    let r = filter(
        &ext,
        json!({"pod": pod_json("fourth", "uid-4", mib(4000)), "nodenames": ["hami-workshop"]}),
    );
    assert_eq!(
        r,
        json!({"nodenames": [], "failedNodes": {"hami-workshop": "1/1 CardInsufficientMemory"}})
    );
    assert_eq!(
        drain(&mut rx),
        vec![
            (
                "FilteringFailed".into(),
                "no available node, 1 nodes do not meet".into()
            ),
            (
                "FilteringFailed".into(),
                "1 nodes CardInsufficientMemory(hami-workshop)".into()
            ),
        ]
    );
}

#[tokio::test]
async fn nodes_mode_echoes_the_chosen_node_and_reads_registrations_from_the_request() {
    let (ext, _rx) = new_ext(FakeApi::default());
    let small = node_json("small", &register(10, 2000, "GPU-small"));
    let big = node_json("big", &register(10, 16000, "GPU-big"));
    let plain = json!({"metadata": {"name": "cpu-only"}});
    let body = json!({"pod": pod_json("p", "uid-p", mib(4000)), "nodes": {"metadata": {}, "items": [small, big.clone(), plain]}});
    let r = filter(&ext, body);
    assert_eq!(
        r,
        json!({
            "nodes": {"metadata": {}, "items": [big]},
            "failedNodes": {"small": "1/1 CardInsufficientMemory"},
            "failedAndUnresolvableNodes": {"cpu-only": "NodeUnregistered"}
        })
    );
    assert_eq!(
        ext.placement("uid-p").unwrap().devices.encode(),
        "GPU-big,NVIDIA,4000,0:;"
    );
}

#[tokio::test]
async fn pods_without_vgpus_pass_through_and_bad_requests_fail_clearly() {
    let (ext, mut rx) = new_ext(FakeApi::default());
    with_lab_node(&ext);
    let r = filter(
        &ext,
        json!({"pod": pod_json("cpu", "u1", json!({"cpu": "1"})), "nodenames": ["a", "b"]}),
    );
    assert_eq!(r, json!({"nodenames": ["a", "b"]}));
    let r = filter(
        &ext,
        json!({"pod": pod_json("both", "u2", json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1", "nvidia.com/gpumem-percentage": "5"})), "nodenames": ["hami-workshop"]}),
    );
    assert_eq!(r["error"], "pod default/both: container \"app\" sets both nvidia.com/gpumem and nvidia.com/gpumem-percentage: give one");
    let mut pod = pod_json("typo", "u3", mib(1));
    pod["metadata"]["annotations"] = json!({"hami.io/gpu-scheduler-policy": "bin-pack"});
    let r = filter(&ext, json!({"pod": pod, "nodenames": ["hami-workshop"]}));
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("hami.io/gpu-scheduler-policy: unknown scheduler policy \"bin-pack\""),
        "{r}"
    );
    assert_eq!(drain(&mut rx).len(), 2);
    let r = filter(&ext, json!({"pod": pod_json("x", "u4", mib(1))}));
    assert_eq!(
        r["error"],
        "the request carries neither nodes nor nodenames"
    );
}

#[tokio::test]
async fn bind_refuses_what_filter_did_not_reserve_and_gives_back_on_failure() {
    let api = FakeApi::default();
    let (ext, mut rx) = new_ext(api.clone());
    with_lab_node(&ext);
    let r = bind(&ext, "stranger", "uid-s", "hami-workshop").await;
    assert!(
        r["Error"]
            .as_str()
            .unwrap()
            .contains("pod default/stranger (uid-s) has no vGPU reservation"),
        "{r}"
    );

    filter(
        &ext,
        json!({"pod": pod_json("p", "uid-p", mib(4000)), "nodenames": ["hami-workshop"]}),
    );
    let r = bind(&ext, "p", "uid-p", "elsewhere").await;
    assert_eq!(
        r["Error"],
        "pod default/p is reserved on node hami-workshop, not elsewhere: filter it again"
    );

    api.fail_bind.lock().unwrap().insert("p".into());
    let r = bind(&ext, "p", "uid-p", "hami-workshop").await;
    assert!(
        r["Error"]
            .as_str()
            .unwrap()
            .starts_with("pod default/p: binding to node hami-workshop failed"),
        "{r}"
    );
    assert!(
        ext.placement("uid-p").is_none(),
        "a failed bind gives its reservation back"
    );
    ext.with_ledger(|l| {
        assert_eq!(
            l.node("hami-workshop").unwrap().usage[0],
            Default::default()
        )
    });
    let calls = api.calls.lock().unwrap().clone();
    let Some(Call::Annotate(_, last, None)) = calls.last() else {
        panic!("{calls:?}")
    };
    assert_eq!(last[ann::BIND_PHASE], "failed");
    let ev = drain(&mut rx);
    assert_eq!(ev.last().unwrap().0, "BindingFailed");
}

#[tokio::test]
async fn unbound_reservations_expire() {
    let (mut ext, _rx) = new_ext(FakeApi::default());
    ext.reservation_ttl = Duration::from_millis(0);
    with_lab_node(&ext);
    filter(
        &ext,
        json!({"pod": pod_json("p1", "u1", mib(15000)), "nodenames": ["hami-workshop"]}),
    );
    std::thread::sleep(Duration::from_millis(2));
    // The next filter sweeps the stale reservation first, so the card is free again.
    let r = filter(
        &ext,
        json!({"pod": pod_json("p2", "u2", mib(15000)), "nodenames": ["hami-workshop"]}),
    );
    assert_eq!(r, json!({"nodenames": ["hami-workshop"]}));
    assert!(ext.placement("u1").is_none());
}

#[tokio::test]
async fn state_is_rebuilt_from_annotations_after_a_restart() {
    let api = FakeApi::default();
    let (ext, _rx) = new_ext(api.clone());
    with_lab_node(&ext);
    for i in 0..3 {
        let (name, uid) = (format!("p{i}"), format!("u{i}"));
        filter(
            &ext,
            json!({"pod": pod_json(&name, &uid, mib(3000)), "nodenames": ["hami-workshop"]}),
        );
        assert_eq!(
            bind(&ext, &name, &uid, "hami-workshop").await,
            json!({"Error": ""})
        );
    }
    let before = ext.with_ledger(|l| l.node("hami-workshop").unwrap().usage.clone());

    // A new process sees the pods as the API now holds them: with the patched annotations.
    let (fresh, _rx2) = new_ext(FakeApi::default());
    let mut seen = HashSet::new();
    for c in api.calls.lock().unwrap().iter() {
        if let Call::Annotate(p, a, _) = c {
            let mut pod = pod_json(&p.name, &p.uid, mib(3000));
            pod["metadata"]["annotations"] = serde_json::to_value(a).unwrap();
            pod["spec"]["nodeName"] = json!("hami-workshop");
            let pod: Pod = serde_json::from_value(pod).unwrap();
            fresh.pod_applied(&pod);
            seen.insert(p.uid.clone());
        }
    }
    with_lab_node(&fresh);
    fresh.pods_resynced(&seen);
    assert_eq!(
        fresh.with_ledger(|l| l.node("hami-workshop").unwrap().usage.clone()),
        before
    );
    assert_eq!(before[0].mem_mib, 9000);
    // A 7000 MiB pod no longer fits on the rebuilt book.
    let r = filter(
        &fresh,
        json!({"pod": pod_json("big", "ub", mib(7000)), "nodenames": ["hami-workshop"]}),
    );
    assert_eq!(
        r["failedNodes"]["hami-workshop"],
        "1/1 CardInsufficientMemory"
    );
    // A finished pod gives its share back; a deleted one too.
    let mut done = pod_json("p0", "u0", mib(3000));
    done["status"]["phase"] = json!("Succeeded");
    fresh.pod_applied(&serde_json::from_value(done).unwrap());
    fresh.pod_deleted("u1");
    assert_eq!(
        fresh.with_ledger(|l| l.node("hami-workshop").unwrap().usage[0].mem_mib),
        3000
    );
    fresh.pods_resynced(&HashSet::new());
    assert_eq!(
        fresh.with_ledger(|l| l.node("hami-workshop").unwrap().usage[0].mem_mib),
        0
    );
}

/// Many pods filtered and bound at once on a small cluster: every bound pod's devices, summed per
/// card, stay within the card, and what the ledger holds is exactly what was bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_filter_and_bind_never_double_book() {
    let api = FakeApi {
        delay_us: 500,
        ..Default::default()
    };
    for i in (0..300).step_by(17) {
        api.fail_bind.lock().unwrap().insert(format!("pod-{i}"));
    }
    let (ext, _rx) = new_ext(api.clone());
    let ext = Arc::new(ext);
    let nodes: Vec<String> = (0..3).map(|i| format!("n{i}")).collect();
    for (i, n) in nodes.iter().enumerate() {
        let reg = format!(
            r#"[{{"id":"GPU-{i}a","count":6,"devmem":16000,"devcore":100,"type":"NVIDIA-Tesla T4","health":true}},{{"id":"GPU-{i}b","count":6,"devmem":16000,"devcore":100,"type":"NVIDIA-Tesla T4","health":true}}]"#
        );
        ext.node_applied(&serde_json::from_value(node_json(n, &reg)).unwrap());
    }
    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let ext = ext.clone();
        let nodes = nodes.clone();
        tasks.push(tokio::spawn(async move {
            let (name, uid) = (format!("pod-{i}"), format!("uid-{i}"));
            let limits = json!({"nvidia.com/gpu": (1 + i % 2).to_string(), "nvidia.com/gpumem": (1000 + (i * 37) % 3000).to_string(), "nvidia.com/gpucores": ((i * 13) % 40).to_string()});
            let args: ExtenderArgs = serde_json::from_value(json!({"pod": pod_json(&name, &uid, limits), "nodenames": nodes})).unwrap();
            let r = tokio::task::spawn_blocking({
                let ext = ext.clone();
                move || ext.filter(args)
            })
            .await
            .unwrap();
            if let Some(node) = r.nodenames.and_then(|n| n.into_iter().next()) {
                let b = ExtenderBindingArgs { pod_name: name, pod_namespace: "default".into(), pod_uid: uid, node };
                return ext.bind(b).await.error.is_empty();
            }
            false
        }));
    }
    let mut bound = 0;
    for t in tasks {
        bound += t.await.unwrap() as usize;
    }
    // Each card always has room for two of these vGPUs (2 × 39% cores, 2 × 4000 MiB), so at least
    // 12 vGPUs, six pods even if all were 2-GPU pods, must have been bound.
    assert!(bound >= 6, "the cluster should fill up, took {bound}");

    let calls = api.calls.lock().unwrap().clone();
    let bound_uids: HashSet<String> = calls
        .iter()
        .filter_map(|c| {
            if let Call::Bind(p, _) = c {
                Some(p.uid.clone())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(bound_uids.len(), bound);
    let mut per_card: HashMap<String, (u32, u64, u32)> = HashMap::new();
    for c in &calls {
        if let Call::Annotate(p, a, _) = c {
            if !bound_uids.contains(&p.uid) || !a.contains_key(ann::DEVICES_TO_ALLOCATE) {
                continue;
            }
            for d in ann::PodDevices::decode(&a[ann::DEVICES_TO_ALLOCATE])
                .unwrap()
                .devices()
            {
                let e = per_card.entry(d.uuid.clone()).or_default();
                e.0 += 1;
                e.1 += d.mem_mib;
                e.2 += d.cores;
            }
        }
    }
    for (uuid, (slots, mem, cores)) in &per_card {
        assert!(
            *slots <= 6 && *mem <= 16000 && *cores <= 100,
            "{uuid} over-committed: {slots} slots, {mem} MiB, {cores}% cores"
        );
    }
    ext.with_ledger(|l| {
        let held: HashSet<String> = l.placements().map(|(u, _)| u.clone()).collect();
        assert_eq!(held, bound_uids, "the ledger holds exactly the bound pods");
        for n in l.nodes() {
            for (c, u) in n.cards.iter().zip(&n.usage) {
                assert_eq!(
                    (u.slots, u.mem_mib, u.cores),
                    per_card.get(&c.uuid).copied().unwrap_or_default()
                );
            }
        }
    });
}

#[test]
fn repeated_events_are_recorded_once_per_window() {
    let mut d = EventDedup::new(Duration::from_secs(60));
    let ev = |uid: &str, msg: &str| PodEvent {
        pod: PodRef {
            namespace: "default".into(),
            name: "p".into(),
            uid: uid.into(),
        },
        kind: "Warning",
        reason: "FilteringFailed",
        message: msg.into(),
    };
    let t0 = Instant::now();
    assert!(d.admit(&ev("u1", "no available node, 1 nodes do not meet"), t0));
    assert!(!d.admit(
        &ev("u1", "no available node, 1 nodes do not meet"),
        t0 + Duration::from_secs(5)
    ));
    assert!(
        d.admit(
            &ev("u1", "1 nodes CardInsufficientMemory(n1)"),
            t0 + Duration::from_secs(5)
        ),
        "another text"
    );
    assert!(
        d.admit(
            &ev("u2", "no available node, 1 nodes do not meet"),
            t0 + Duration::from_secs(5)
        ),
        "another pod"
    );
    assert!(
        d.admit(
            &ev("u1", "no available node, 1 nodes do not meet"),
            t0 + Duration::from_secs(61)
        ),
        "after the window"
    );
}

/// A relist that started before a bind and finished after it does not list the just-bound pod:
/// its placement must survive until the watch has shown the pod with its annotations.
#[tokio::test]
async fn a_relist_racing_a_bind_keeps_the_new_placement() {
    let api = FakeApi::default();
    let (ext, _rx) = new_ext(api.clone());
    with_lab_node(&ext);
    filter(
        &ext,
        json!({"pod": pod_json("p", "uid-p", mib(4000)), "nodenames": ["hami-workshop"]}),
    );
    assert_eq!(
        bind(&ext, "p", "uid-p", "hami-workshop").await,
        json!({"Error": ""})
    );
    ext.pods_resynced(&HashSet::new());
    assert!(
        ext.placement("uid-p").is_some(),
        "kept while the watch has not shown the pod"
    );

    let Some(Call::Annotate(_, a, _)) = api.calls.lock().unwrap().first().cloned() else {
        panic!()
    };
    let mut pod = pod_json("p", "uid-p", mib(4000));
    pod["metadata"]["annotations"] = serde_json::to_value(&a).unwrap();
    pod["spec"]["nodeName"] = json!("hami-workshop");
    ext.pod_applied(&serde_json::from_value(pod).unwrap());
    ext.pods_resynced(&HashSet::new());
    assert!(
        ext.placement("uid-p").is_none(),
        "once shown, the API's word decides"
    );
}

#[tokio::test]
async fn bind_seals_the_placement_in_the_same_patch_and_the_seal_verifies() {
    use vgpu_contract::placement_seal::{self as ps, Placement};
    let api = FakeApi::default();
    let (tx, _rx) = mpsc::unbounded_channel();
    let key = b"0123456789abcdef-test-key".to_vec();
    let ext = Extender::new(Config::default(), api.clone(), tx).with_seal_key(key.clone());
    with_lab_node(&ext);
    filter(
        &ext,
        json!({"pod": pod_json("p", "uid-p", mib(4000)), "nodenames": ["hami-workshop"]}),
    );
    assert_eq!(
        bind(&ext, "p", "uid-p", "hami-workshop").await,
        json!({"Error": ""})
    );
    let calls = api.calls.lock().unwrap().clone();
    let Call::Annotate(_, a, _) = &calls[0] else {
        panic!("{calls:?}")
    };
    let devices = format!("{T4},NVIDIA,4000,0:;");
    assert_eq!(a[ann::DEVICES_TO_ALLOCATE], devices);
    assert_eq!(a[ps::SEALED_DEVICES_ANNOTATION], devices);
    let seal = &a[ps::SEAL_ANNOTATION];
    let sealed = Placement {
        pod_uid: "uid-p",
        namespace: "default",
        name: "p",
        node: "hami-workshop",
        devices: &devices,
        bind_time: &a[ann::BIND_TIME],
    };
    assert!(ps::verify(&key, &sealed, seal));
    let copied = Placement {
        pod_uid: "uid-other",
        ..sealed
    };
    assert!(!ps::verify(&key, &copied, seal), "copied to another pod");
    assert!(
        !ps::verify(b"another-key-of-16+", &sealed, seal),
        "other key"
    );
}

#[tokio::test]
async fn without_a_key_bind_writes_no_seal() {
    let api = FakeApi::default();
    let (ext, _rx) = new_ext(api.clone());
    with_lab_node(&ext);
    filter(
        &ext,
        json!({"pod": pod_json("p", "uid-p", mib(4000)), "nodenames": ["hami-workshop"]}),
    );
    bind(&ext, "p", "uid-p", "hami-workshop").await;
    let calls = api.calls.lock().unwrap().clone();
    let Call::Annotate(_, a, _) = &calls[0] else {
        panic!("{calls:?}")
    };
    assert!(!a.contains_key(vgpu_contract::placement_seal::SEAL_ANNOTATION));
}

// ---- forged annotations (issue 16 item 6): the book trusts a pod's spec, not its annotations ----

/// A pod on the node, as the watcher reports it: `limits` from its spec, `allocated` as its
/// `hami.io/vgpu-devices-allocated` says.
fn running_pod(name: &str, limits: Value, allocated: &str) -> Pod {
    let mut pod = pod_json(name, &format!("uid-{name}"), limits);
    pod["metadata"]["annotations"] = json!({
        "hami.io/vgpu-node": "hami-workshop",
        "hami.io/bind-phase": "success",
        "hami.io/vgpu-devices-allocated": allocated,
    });
    pod["spec"]["nodeName"] = json!("hami-workshop");
    pod["status"]["phase"] = json!("Running");
    serde_json::from_value(pod).unwrap()
}

fn fits(ext: &Extender<FakeApi>, uid: &str, mem: u64) -> bool {
    let r = filter(
        ext,
        json!({"pod": pod_json(uid, uid, mib(mem)), "nodenames": ["hami-workshop"]}),
    );
    let placed = r["nodenames"] == json!(["hami-workshop"]);
    ext.pod_deleted(uid);
    placed
}

#[test]
fn a_pod_that_asks_for_no_gpu_books_nothing_whatever_its_annotations_say() {
    let (ext, _rx) = new_ext(FakeApi::default());
    with_lab_node(&ext);
    ext.pod_applied(&running_pod(
        "forger",
        json!({"cpu": "1"}),
        &format!("{T4},NVIDIA,15360,100:;"),
    ));
    assert_eq!(
        ext.with_ledger(|l| l.node("hami-workshop").unwrap().usage[0]),
        Default::default()
    );
    assert!(
        fits(&ext, "real", 4000),
        "a real 4000 MiB pod fits on the empty card"
    );
}

#[test]
fn a_memory_value_near_2_pow_64_cannot_wrap_a_card_into_free_space() {
    let (ext, _rx) = new_ext(FakeApi::default());
    with_lab_node(&ext);
    // Asks 1000 MiB, claims 2^64 - 8000: booked as what it asked.
    ext.pod_applied(&running_pod(
        "wrapper",
        mib(1000),
        &format!("{T4},NVIDIA,{},0:;", u64::MAX - 7999),
    ));
    ext.pod_applied(&running_pod(
        "honest",
        mib(12000),
        &format!("{T4},NVIDIA,12000,0:;"),
    ));
    assert_eq!(
        ext.with_ledger(|l| l.node("hami-workshop").unwrap().usage[0].mem_mib),
        13000
    );
    assert!(
        !fits(&ext, "big", 4000),
        "13000 + 4000 MiB do not fit in 15360"
    );
    assert!(fits(&ext, "small", 2000));
}

#[test]
fn a_device_list_claiming_more_than_the_spec_asks_books_only_the_ask() {
    let (ext, _rx) = new_ext(FakeApi::default());
    let two = r#"[{"id":"GPU-a","count":10,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","health":true},{"id":"GPU-b","index":1,"count":10,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","health":true}]"#;
    ext.node_applied(&serde_json::from_value(node_json("hami-workshop", two)).unwrap());
    // One vGPU of 2000 MiB and 10 cores asked; two whole cards claimed, and a second container.
    ext.pod_applied(&running_pod(
        "greedy",
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "2000", "nvidia.com/gpucores": "10"}),
        "GPU-a,NVIDIA,15360,100:GPU-b,NVIDIA,15360,100:;GPU-b,NVIDIA,15360,100:;",
    ));
    let usage = ext.with_ledger(|l| l.node("hami-workshop").unwrap().usage.clone());
    let booked: Vec<(u32, u64, u32)> = usage
        .iter()
        .map(|u| (u.slots, u.mem_mib, u.cores))
        .collect();
    assert_eq!(booked, vec![(1, 2000, 10), (0, 0, 0)]);
}

/// The burst's `BindingFailed` (issue 15): a pod filtered and bound a second time from a copy older than its
/// binding (a driver or kube-scheduler retry after a lost answer) kept neither its placement nor its
/// annotations: the second filter placed it again, the second bind rewrote `bind-phase: allocating` and the new
/// devices, then the API refused the binding ("already assigned") and the failure path marked the running pod
/// failed. Now the second filter answers the node it holds and the second bind writes nothing.
#[tokio::test]
async fn a_pod_filtered_and_bound_again_keeps_its_placement_and_nothing_is_rewritten() {
    let api = FakeApi::default();
    let (ext, mut rx) = new_ext(api.clone());
    with_lab_node(&ext);
    let second: k8s_openapi::api::core::v1::Node =
        serde_json::from_value(node_json("other", &register(10, 15360, "GPU-2"))).unwrap();
    ext.node_applied(&second);
    let body =
        json!({"pod": pod_json("p", "uid-p", mib(1000)), "nodenames": ["hami-workshop", "other"]});
    let first = filter(&ext, body.clone());
    let node = first["nodenames"][0].as_str().unwrap().to_string();
    assert_eq!(bind(&ext, "p", "uid-p", &node).await["Error"], "");
    let placed = ext.placement("uid-p").unwrap();
    let writes = api.calls.lock().unwrap().len();
    drain(&mut rx);

    // Again, before the pod watch has shown the binding, and again after.
    for seen in [false, true] {
        if seen {
            let mut pod = pod_json("p", "uid-p", mib(1000));
            pod["spec"]["nodeName"] = json!(node);
            pod["metadata"]["annotations"] = json!({
                "hami.io/vgpu-node": node, "hami.io/bind-phase": "success",
                "hami.io/vgpu-devices-allocated": placed.devices.encode(),
                "hami.io/vgpu-devices-to-allocate": ";",
            });
            ext.pod_applied(&serde_json::from_value(pod).unwrap());
        }
        let again = filter(&ext, body.clone());
        assert_eq!(again["nodenames"], json!([node]), "seen={seen}: {again}");
        assert_eq!(
            bind(&ext, "p", "uid-p", &node).await["Error"],
            "",
            "seen={seen}"
        );
        assert_eq!(ext.placement("uid-p").unwrap().devices, placed.devices);
        assert_eq!(
            api.calls.lock().unwrap().len(),
            writes,
            "seen={seen}: no write"
        );
        assert!(
            drain(&mut rx).iter().all(|(r, _)| r != "BindingFailed"),
            "seen={seen}"
        );
    }
    // Another node than the one it holds is not offered.
    let elsewhere = json!({"pod": pod_json("p", "uid-p", mib(1000)),
        "nodenames": [if node == "other" { "hami-workshop" } else { "other" }]});
    let r = filter(&ext, elsewhere);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("already placed on node"),
        "{r}"
    );
}

/// `--default-cores` reaches the device string the node agent serves: a shared vGPU with no gpucores is
/// written with the default's cores, as HAMi writes `scheduler.defaultCores`.
#[tokio::test]
async fn default_cores_are_written_into_the_placement() {
    let api = FakeApi::default();
    let (tx, _rx) = mpsc::unbounded_channel();
    let ext = Extender::new(
        Config {
            default_cores: 30,
            ..Config::default()
        },
        api.clone(),
        tx,
    );
    with_lab_node(&ext);
    let r = filter(
        &ext,
        json!({"pod": pod_json("p", "uid-p", mib(1000)), "nodenames": ["hami-workshop"]}),
    );
    assert_eq!(r["nodenames"], json!(["hami-workshop"]), "{r}");
    assert_eq!(bind(&ext, "p", "uid-p", "hami-workshop").await["Error"], "");
    assert_eq!(
        ext.placement("uid-p").unwrap().devices.encode(),
        format!("{T4},NVIDIA,1000,30:;")
    );
}
