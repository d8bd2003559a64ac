//! Allocate against pods served by an in-test API server, confirmed by an in-test PodResources: HAMI-NOTES
//! failures 1 (no node lock: two pending pods both allocate), 2 (the wrong pod is caught and revoked) and 5
//! (forged placements refused, neighbours unchanged), and a two-GPU container.

mod node_support;

use std::time::Duration;

use node_support::*;
use serde_json::json;

const GPU: &str = "GPU-0fc3eda5-e98b-a25b-5b0d-cf5c855d1448";
const GPU2: &str = "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039";

fn dev(uuid: &str, mib: u64, cores: u32) -> String {
    format!("{uuid},NVIDIA,{mib},{cores}:;")
}

fn env(r: &vgpu_kubelet_api::deviceplugin::ContainerAllocateResponse, k: &str) -> String {
    r.envs
        .get(k)
        .cloned()
        .unwrap_or_else(|| panic!("no {k} in {:?}", r.envs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_pending_on_one_node_both_allocate_without_a_lock() {
    let rig = Rig::start("two-pods", vec![card(GPU, 0)], json!({})).await;
    let mut a = pod("a", "uid-a", "2026-01-01T00:00:00Z", &[1]);
    seal_placement(&mut a, &dev(GPU, 4000, 0), "100");
    let mut b = pod("b", "uid-b", "2026-01-01T00:00:01Z", &[1]);
    seal_placement(&mut b, &dev(GPU, 3000, 30), "101");
    // Both bound before either is allocated: HAMi's node lock would hold b until a's Allocate.
    rig.api.put_pod(b);
    rig.api.put_pod(a);
    rig.synced("a").await;
    rig.synced("b").await;

    let ra = rig
        .allocate(&[&format!("{GPU}-3")])
        .await
        .expect("a allocates");
    let rb = rig
        .allocate(&[&format!("{GPU}-7")])
        .await
        .expect("b allocates right after");
    assert_eq!(
        env(&ra, "CUDA_DEVICE_MEMORY_LIMIT_0"),
        "4000m",
        "oldest bind-time first"
    );
    assert_eq!(env(&rb, "CUDA_DEVICE_MEMORY_LIMIT_0"), "3000m");
    assert_eq!(env(&rb, "CUDA_DEVICE_SM_LIMIT"), "30");
    // Nothing is written to a pod before the kubelet's record names it.
    assert_eq!(
        rig.api.annotation("a", "hami.io/bind-phase").as_deref(),
        Some("allocating")
    );

    // The kubelet's record confirms both: each limits file turns ready with its own pod's values.
    rig.record.assign("a", "c0", &[&format!("{GPU}-3")]);
    rig.record.assign("b", "c0", &[&format!("{GPU}-7")]);
    let la = rig.limits_state("uid-a", "c0", "ready").await;
    let lb = rig.limits_state("uid-b", "c0", "ready").await;
    assert!(la.contains("CUDA_DEVICE_MEMORY_LIMIT_0=4000m\n"), "{la}");
    assert!(
        lb.contains("CUDA_DEVICE_MEMORY_LIMIT_0=3000m\n")
            && lb.contains("CUDA_DEVICE_SM_LIMIT=30\n"),
        "{lb}"
    );
    for p in ["a", "b"] {
        rig.recorded(p).await;
    }
    for (p, d) in [("a", dev(GPU, 4000, 0)), ("b", dev(GPU, 3000, 30))] {
        assert_eq!(
            rig.api.annotation(p, "hami.io/bind-phase").as_deref(),
            Some("success")
        );
        assert_eq!(
            rig.api
                .annotation(p, "hami.io/vgpu-devices-to-allocate")
                .as_deref(),
            Some(";")
        );
        assert_eq!(
            rig.api.annotation(p, "hami.io/vgpu-devices-allocated"),
            Some(d)
        );
    }
    // No lock anywhere: nothing was written to the node but its inventory and handshake.
    for (m, path, body) in rig.api.writes() {
        if path.contains("/nodes/") {
            let keys: Vec<_> = body["metadata"]["annotations"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            assert_eq!(
                keys,
                ["hami.io/node-handshake", "hami.io/node-nvidia-register"],
                "{m} {path}"
            );
        }
    }
    assert!(rig.api.node(NODE)["metadata"]["annotations"]["hami.io/mutex.lock"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_write_is_retried_not_lost() {
    let rig = Rig::start("conflict", vec![card(GPU, 0)], json!({})).await;
    let mut a = pod("a", "uid-a", "2026-01-01T00:00:00Z", &[1]);
    seal_placement(&mut a, &dev(GPU, 4000, 0), "100");
    rig.api.put_pod(a);
    rig.synced("a").await;
    rig.api.conflict_next_patches("a", 2);
    rig.allocate(&[&format!("{GPU}-0")])
        .await
        .expect("allocates");
    rig.record.assign("a", "c0", &[&format!("{GPU}-0")]);
    eventually(
        "recorded after two conflicts",
        Duration::from_secs(5),
        || {
            (rig.api.annotation("a", "hami.io/bind-phase").as_deref() == Some("success"))
                .then_some(())
        },
    )
    .await;
    let preconditioned = rig
        .api
        .writes()
        .iter()
        .filter(|(_, p, b)| p.ends_with("/pods/a") && b["metadata"]["resourceVersion"].is_string())
        .count();
    assert_eq!(preconditioned, 3, "two refused, the third applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_on_another_pods_devices_is_revoked_and_the_placement_given_back() {
    let rig = Rig::start("wrong-pod", vec![card(GPU, 0)], json!({})).await;
    let mut a = pod("a", "uid-a", "2026-01-01T00:00:00Z", &[1]);
    seal_placement(&mut a, &dev(GPU, 4000, 0), "100");
    let mut b = pod("b", "uid-b", "2026-01-01T00:00:01Z", &[1]);
    seal_placement(&mut b, &dev(GPU, 8000, 0), "101");
    rig.api.put_pod(a);
    rig.api.put_pod(b);
    rig.synced("a").await;
    rig.synced("b").await;

    // The kubelet admits b first (as after a kubelet restart, its first list sorted by creation second with
    // ties in any order): Allocate guesses a, the first to reach the agent. Their placements differ, so the
    // answer (a's environment) cannot be b's.
    let id = format!("{GPU}-1");
    let r = rig.allocate(&[&id]).await.unwrap();
    assert_eq!(env(&r, "CUDA_DEVICE_MEMORY_LIMIT_0"), "4000m");
    rig.record.assign("b", "c0", &[&id]);
    let l = rig.limits_state("uid-a", "c0", "revoked").await;
    assert!(
        l.contains("VGPU_LIMITS_REASON=")
            && l.contains("default/b container \"c0\"")
            && l.contains("is not the one answered"),
        "{l}"
    );
    assert!(
        !l.contains("CUDA_DEVICE_MEMORY_LIMIT"),
        "no limits on a revoked container: {l}"
    );
    eventually("b failed", Duration::from_secs(5), || {
        (rig.api.annotation("b", "hami.io/bind-phase").as_deref() == Some("failed")).then_some(())
    })
    .await;
    eventually("a's placement given back", Duration::from_secs(5), || {
        (rig.api.annotation("a", "hami.io/bind-phase").as_deref() == Some("allocating")
            && rig.api.annotation("a", "hami.io/vgpu-devices-to-allocate")
                == Some(dev(GPU, 4000, 0)))
        .then_some(())
    })
    .await;
    // The event follows the annotation (fail_pod writes one, then the other).
    eventually("the event on b", Duration::from_secs(5), || {
        rig.api
            .events()
            .iter()
            .any(|e| {
                e["involvedObject"]["name"] == "b"
                    && e["reason"] == "VgpuAllocateRefused"
                    && e["message"]
                        .as_str()
                        .unwrap()
                        .contains("prepared them for default/a")
            })
            .then_some(())
    })
    .await;

    // a's own container comes next and gets its placement; b (failed) is never a candidate again.
    rig.synced("a").await;
    let id2 = format!("{GPU}-2");
    let r = rig.allocate(&[&id2]).await.expect("a allocates");
    assert_eq!(env(&r, "CUDA_DEVICE_MEMORY_LIMIT_0"), "4000m");
    rig.record.assign("a", "c0", &[&id2]);
    rig.limits_state("uid-a", "c0", "ready").await;
    rig.recorded("a").await;
}

/// The burst case (issue 15): pods placed alike on one card, admitted by the kubelet in another order than the
/// agent guessed. The answer was the same for either, so each container gets it as its own: nothing revoked,
/// no pod failed, and the next Allocate (before any poll of the record) already knows whose it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_placed_alike_admitted_out_of_order_each_get_the_answer_as_their_own() {
    // The watcher polls the record only every 30 s: whatever resolves the first answer here is the second
    // Allocate, before it chooses.
    let rig = Rig::one_card_polling("alike", GPU, Duration::from_secs(30)).await;
    for (name, uid) in [("a", "uid-a"), ("b", "uid-b")] {
        rig.put_sealed(name, uid, &dev(GPU, 1000, 0)).await;
    }
    let (id1, id2) = (format!("{GPU}-1"), format!("{GPU}-2"));
    rig.allocate(&[&id1]).await.expect("first answer");
    // The kubelet was admitting b, and records it before it admits a.
    rig.record.assign("b", "c0", &[&id1]);
    let r = rig
        .allocate(&[&id2])
        .await
        .expect("a is still waiting: the first answer was b's");
    assert_eq!(env(&r, "CUDA_DEVICE_MEMORY_LIMIT_0"), "1000m");
    rig.record.assign("a", "c0", &[&id2]);
    // b's container is resolved without the watcher: its limits are ready at once, under its own name.
    let b_dirs = rig.dirs_of("uid-b", "c0");
    assert_eq!(b_dirs.len(), 1, "{b_dirs:?}");
    let lb = std::fs::read_to_string(b_dirs[0].join("limits")).unwrap();
    assert!(
        lb.contains("CUDA_DEVICE_MEMORY_LIMIT_0=1000m\n")
            && lb.ends_with("VGPU_LIMITS_STATE=ready\n"),
        "{lb}"
    );
    assert!(
        std::fs::read_to_string(b_dirs[0].join("allocated-ids"))
            .unwrap()
            .contains(&id1),
        "b holds the first answer's directory"
    );
    rig.recorded("b").await;
    // a's own answer (the second) is resolved by a third Allocate's settling or by its watcher: drive it with
    // one more pod's Allocate.
    let mut c = pod("c", "uid-c", "2026-01-01T00:00:00Z", &[1]);
    seal_placement(&mut c, &dev(GPU, 1000, 0), "100");
    rig.api.put_pod(c);
    rig.synced("c").await;
    rig.allocate(&[&format!("{GPU}-3")]).await.expect("c");
    let la = rig.limits_state("uid-a", "c0", "ready").await;
    assert!(la.contains("CUDA_DEVICE_MEMORY_LIMIT_0=1000m\n"), "{la}");
    assert_eq!(rig.dirs_of("uid-a", "c0").len(), 1);
    for p in ["a", "b"] {
        assert_ne!(
            rig.api.annotation(p, "hami.io/bind-phase").as_deref(),
            Some("failed"),
            "{p}"
        );
    }
    assert!(
        rig.api
            .events()
            .iter()
            .all(|e| e["reason"] != "VgpuAllocateRefused"),
        "{:?}",
        rig.api.events()
    );
}

/// Writes `pod`, lets the agent see it, and asks for `id`: Allocate must refuse it, naming it and `why`.
async fn refusal(rig: &Rig, id: &str, pod: serde_json::Value, why: &str) -> tonic::Status {
    let name = pod["metadata"]["name"].as_str().unwrap().to_string();
    rig.api.put_pod(pod);
    rig.synced(&name).await;
    let e = rig.allocate(&[id]).await.unwrap_err();
    assert!(
        e.message()
            .contains(&format!("default/{name} refused: {why}")),
        "{}",
        e.message()
    );
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_pods_are_refused_with_their_reason_and_neighbours_keep_their_state() {
    let rig = Rig::start("forged", vec![card(GPU, 0)], json!({})).await;
    // A neighbour, allocated and running.
    let mut n = pod("n", "uid-n", "2026-01-01T00:00:00Z", &[1]);
    seal_placement(&mut n, &dev(GPU, 4000, 0), "100");
    rig.api.put_pod(n);
    rig.synced("n").await;
    let id_n = format!("{GPU}-0");
    rig.allocate(&[&id_n]).await.unwrap();
    rig.record.assign("n", "c0", &[&id_n]);
    let n_limits = rig.limits_state("uid-n", "c0", "ready").await;
    // The annotations follow the limits file (the record is written once the file is ready).
    rig.recorded("n").await;
    let n_before = rig.api.pod("n")["metadata"]["annotations"].clone();

    // 1: hami.io/* annotations written by hand, no seal.
    let mut f1 = pod("f1", "uid-f1", "2026-01-01T00:01:00Z", &[1]);
    f1["metadata"]["annotations"] = json!({
        "hami.io/vgpu-node": NODE, "hami.io/bind-phase": "allocating", "hami.io/bind-time": "200",
        "hami.io/vgpu-devices-to-allocate": dev(GPU, 15000, 0)});
    let id = format!("{GPU}-5");
    let e = refusal(&rig, &id, f1, "no placement sealed by the vgpu scheduler").await;
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        rig.api.annotation("f1", "hami.io/bind-phase").as_deref(),
        Some("failed")
    );

    // 2: spec.nodeName set directly, nothing else.
    let f2 = pod("f2", "uid-f2", "2026-01-01T00:02:00Z", &[1]);
    refusal(&rig, &id, f2, "no placement sealed").await;
    assert_eq!(
        rig.api.annotation("f2", "hami.io/bind-phase").as_deref(),
        Some("failed")
    );

    // 3: the neighbour's whole placement and seal copied onto another pod.
    let mut f3 = pod("f3", "uid-f3", "2026-01-01T00:03:00Z", &[1]);
    f3["metadata"]["annotations"] = rig.api.pod("n")["metadata"]["annotations"].clone();
    f3["metadata"]["annotations"]["hami.io/bind-phase"] = json!("allocating");
    f3["metadata"]["annotations"]["hami.io/vgpu-devices-to-allocate"] = json!(dev(GPU, 4000, 0));
    refusal(&rig, &id, f3, "the placement seal").await;
    assert_eq!(
        rig.api.annotation("f3", "hami.io/bind-phase").as_deref(),
        Some("failed")
    );

    // 4: a sealed placement whose memory was raised afterwards.
    let mut f4 = pod("f4", "uid-f4", "2026-01-01T00:04:00Z", &[1]);
    seal_placement(&mut f4, &dev(GPU, 1000, 0), "400");
    f4["metadata"]["annotations"]["vgpu.io/devices-sealed"] = json!(dev(GPU, 15000, 0));
    f4["metadata"]["annotations"]["hami.io/vgpu-devices-to-allocate"] = json!(dev(GPU, 15000, 0));
    refusal(&rig, &id, f4, "the placement seal").await;

    for f in ["f1", "f2", "f3", "f4"] {
        assert!(
            rig.api
                .events()
                .iter()
                .any(|e| e["involvedObject"]["name"] == f
                    && e["reason"] == "VgpuAllocateRefused"
                    && e["type"] == "Warning"),
            "an event on {f}"
        );
        assert!(
            rig.dirs_of(&format!("uid-{f}"), "c0").is_empty(),
            "no directory made for {f}"
        );
    }
    // Nothing of the neighbour changed: annotations, limits file, and no write touched it after its own.
    assert_eq!(rig.api.pod("n")["metadata"]["annotations"], n_before);
    assert_eq!(rig.limits("uid-n", "c0"), n_limits);
    assert!(rig
        .api
        .events()
        .iter()
        .all(|e| e["involvedObject"]["name"] != "n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_gpu_container_gets_both_cards_and_is_bound_to_its_cgroup() {
    let rig = Rig::start("two-gpus", vec![card(GPU, 0), card(GPU2, 1)], json!({})).await;
    let uid = "5d0b2f5a-6f6e-4b6a-9c3e-0a1b2c3d4e5f";
    let mut p = pod("m", uid, "2026-01-01T00:00:00Z", &[0, 2]);
    let devices = format!(";{GPU},NVIDIA,4000,30:{GPU2},NVIDIA,4000,30:;");
    seal_placement(&mut p, &devices, "100");
    p["spec"]["containers"][1]["env"] =
        json!([{"name": "GPU_CORE_UTILIZATION_POLICY", "value": "force"}]);
    rig.api.put_pod(p);
    rig.synced("m").await;

    let ids = [format!("{GPU}-4"), format!("{GPU2}-4")];
    let r = rig.allocate(&[&ids[0], &ids[1]]).await.unwrap();
    assert_eq!(env(&r, "NVIDIA_VISIBLE_DEVICES"), format!("{GPU},{GPU2}"));
    assert_eq!(env(&r, "CUDA_DEVICE_MEMORY_LIMIT_0"), "4000m");
    assert_eq!(env(&r, "CUDA_DEVICE_MEMORY_LIMIT_1"), "4000m");
    assert_eq!(env(&r, "GPU_CORE_UTILIZATION_POLICY"), "force");
    assert_eq!(
        env(&r, "CUDA_DEVICE_MEMORY_SHARED_CACHE"),
        "/usr/local/vgpu/vgpu.cache"
    );
    let dir = rig.dirs_of(uid, "c1").pop().expect("a directory for c1");
    let mounts: Vec<_> = r
        .mounts
        .iter()
        .map(|m| (m.container_path.as_str(), m.host_path.clone(), m.read_only))
        .collect();
    let host = |f: &str| dir.join(f).display().to_string();
    assert_eq!(
        mounts,
        [
            ("/usr/local/vgpu/limits", host("limits"), true),
            (
                "/usr/local/vgpu/libvgpu.so",
                "/usr/local/vgpu/libvgpu.so".to_string(),
                true
            ),
            ("/etc/ld.so.preload", host("ld.so.preload"), true),
            ("/usr/local/vgpu/vgpu.cache", host("vgpu.cache"), false),
            (
                "/var/run/vgpu/cards",
                rig.dir.0.join("cards").display().to_string(),
                false
            ),
        ]
    );
    assert_eq!(
        rig.limits(uid, "c1"),
        "",
        "pending until the kubelet confirms"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("ld.so.preload")).unwrap(),
        "/usr/local/vgpu/libvgpu.so\n"
    );

    rig.record.assign("m", "c1", &[&ids[1], &ids[0]]);
    let l = rig.limits_state(uid, "c1", "ready").await;
    eventually("m recorded", Duration::from_secs(5), || {
        (rig.api.annotation("m", "hami.io/vgpu-devices-allocated") == Some(devices.clone())
            && rig
                .api
                .annotation("m", "hami.io/vgpu-devices-to-allocate")
                .as_deref()
                == Some(";;"))
        .then_some(())
    })
    .await;
    assert_eq!(
        l,
        format!(
            "# written by vgpu-agent; read by libvgpu.so\nNVIDIA_VISIBLE_DEVICES={GPU},{GPU2}\nCUDA_DEVICE_MEMORY_LIMIT_0=4000m\n\
             CUDA_DEVICE_MEMORY_LIMIT_1=4000m\nCUDA_DEVICE_SM_LIMIT=30\n\
             CUDA_DEVICE_MEMORY_SHARED_CACHE=/usr/local/vgpu/vgpu.cache\nGPU_CORE_UTILIZATION_POLICY=force\n\
             VGPU_CARD_DIR=/var/run/vgpu/cards\nVGPU_CORE_WINDOWS_0=500:0+150000\n\
             VGPU_CORE_WINDOWS_1=500:0+150000\nVGPU_LIMITS_STATE=ready\n"
        ),
        "each card's compute windows placed by the agent (a card of its own each here)"
    );

    // The runtime starts the container; the kubelet reports its ID; the ledger is told its cgroup.
    let cid = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let cg = format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{cid}.scope",
        uid.replace('-', "_")
    );
    std::fs::create_dir_all(rig.cgroup_root().join(&cg)).unwrap();
    // A decoy: the same container ID under another pod's cgroup is never taken.
    std::fs::create_dir_all(rig.cgroup_root().join(format!(
        "kubepods.slice/kubepods-podffffffff_ffff_ffff_ffff_ffffffffffff.slice/cri-containerd-{cid}.scope"
    )))
    .unwrap();
    rig.api.set_status(
        "m",
        json!({"phase": "Running", "containerStatuses": [
            {"name": "c0", "ready": true, "restartCount": 0, "image": "cuda", "imageID": "",
             "containerID": "containerd://aaaa"},
            {"name": "c1", "ready": true, "restartCount": 0, "image": "cuda", "imageID": "",
             "containerID": format!("containerd://{cid}")}]}),
    );
    let b = eventually("the binding", Duration::from_secs(10), || {
        rig.bindings.0.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(b.cgroup, format!("/{cg}"));
    assert_eq!(b.cache_path, dir.join("vgpu.cache"));
    assert_eq!(
        b.memory_limits,
        std::collections::BTreeMap::from([(0, 4000 << 20), (1, 4000 << 20)])
    );
    assert_eq!(
        (b.sm_limit, b.policy.as_str(), &b.source),
        (30, "force", &vgpu_agent::ledger::bindings::Source::Allocate)
    );
    let pod = b.pod.as_ref().unwrap();
    assert_eq!((pod.name.as_str(), pod.container.as_str()), ("m", "c1"));
    // The runtime restarts c1: a new container ID, a new cgroup. The ledger follows it.
    let cid2 = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
    let cg2 = cg.replace(cid, cid2);
    std::fs::create_dir_all(rig.cgroup_root().join(&cg2)).unwrap();
    rig.api.set_status(
        "m",
        json!({"phase": "Running", "containerStatuses": [
            {"name": "c0", "ready": true, "restartCount": 0, "image": "cuda", "imageID": "",
             "containerID": "containerd://aaaa"},
            {"name": "c1", "ready": true, "restartCount": 1, "image": "cuda", "imageID": "",
             "containerID": format!("containerd://{cid2}")}]}),
    );
    eventually(
        "the restarted container bound",
        Duration::from_secs(10),
        || {
            let v = rig.bindings.0.lock().unwrap();
            (v.len() == 1 && v[0].cgroup == format!("/{cg2}")).then_some(())
        },
    )
    .await;
    // Once the pod has left the node, the sweep unbinds it.
    rig.api.delete_pod("m");
    eventually(
        "m gone from the agent's view",
        Duration::from_secs(5),
        || {
            rig.running
                .node
                .pods
                .state()
                .iter()
                .all(|p| p.metadata.name.as_deref() != Some("m"))
                .then_some(())
        },
    )
    .await;
    vgpu_agent::node::recover::sweep(&rig.running.node, std::time::SystemTime::now());
    assert!(rig.bindings.0.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_ids_the_plugin_never_offered_are_refused() {
    let rig = Rig::start("bad-ids", vec![card(GPU, 0)], json!({})).await;
    for ids in [
        vec!["GPU-other-1".to_string()],
        vec![format!("{GPU}-10")],
        vec![],
    ] {
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let e = rig.allocate(&refs).await.unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::InvalidArgument,
            "{ids:?}: {}",
            e.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_pods_bound_at_once_allocate_back_to_back_each_with_its_own_placement() {
    let rig = Rig::start("burst", vec![card(GPU, 0), card(GPU2, 1)], json!({})).await;
    for i in 0..20u64 {
        let name = format!("p{i:02}");
        let mut p = pod(&name, &format!("uid-{i:02}"), "2026-01-01T00:00:00Z", &[1]);
        let gpu = if i % 2 == 0 { GPU } else { GPU2 };
        seal_placement(&mut p, &dev(gpu, 100 + i, 0), &(1000 + i).to_string());
        rig.api.put_pod(p);
    }
    rig.synced("p19").await;
    let t = std::time::Instant::now();
    for i in 0..20u64 {
        let gpu = if i % 2 == 0 { GPU } else { GPU2 };
        let id = format!("{gpu}-{}", i / 2);
        let r = rig
            .allocate(&[&id])
            .await
            .unwrap_or_else(|e| panic!("p{i:02}: {}", e.message()));
        // Admitted in bind order, each gets its own placement.
        assert_eq!(
            env(&r, "CUDA_DEVICE_MEMORY_LIMIT_0"),
            format!("{}m", 100 + i)
        );
        assert_eq!(env(&r, "NVIDIA_VISIBLE_DEVICES"), gpu);
        rig.record.assign(&format!("p{i:02}"), "c0", &[&id]);
    }
    eprintln!("20 Allocates in {:?}", t.elapsed());
    for i in 0..20u64 {
        let name = format!("p{i:02}");
        let l = rig
            .limits_state(&format!("uid-{i:02}"), "c0", "ready")
            .await;
        assert!(
            l.contains(&format!("CUDA_DEVICE_MEMORY_LIMIT_0={}m\n", 100 + i)),
            "{name}: {l}"
        );
        rig.recorded(&name).await;
    }
}

/// The plugin asks the kubelet for PreStartContainer, and answers it only once the container's answer is
/// settled: when the kubelet starts the container, its limits file is ready and its pod's annotations say
/// allocated (HAMi writes them at Allocate; here they wait for the kubelet's record, but never for a poll).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_start_settles_the_answer_before_the_container_starts() {
    let rig = Rig::one_card_polling("pre-start", GPU, Duration::from_secs(30)).await;
    let mut plugin = rig.plugin().await;
    let opts = plugin
        .get_device_plugin_options(vgpu_kubelet_api::deviceplugin::Empty {})
        .await
        .unwrap()
        .into_inner();
    assert!(opts.pre_start_required);
    rig.put_sealed("a", "uid-a", &dev(GPU, 4000, 30)).await;
    let id = format!("{GPU}-1");
    rig.allocate(&[&id]).await.unwrap();
    rig.record.assign("a", "c0", &[&id]);
    assert_eq!(rig.limits("uid-a", "c0"), "", "pending until settled");
    rig.pre_start(&[&id]).await;
    // No waiting: PreStart returned, so it is done.
    let l = rig.limits("uid-a", "c0");
    assert!(
        l.contains("CUDA_DEVICE_MEMORY_LIMIT_0=4000m\n")
            && l.ends_with("VGPU_LIMITS_STATE=ready\n"),
        "{l}"
    );
    assert_eq!(
        rig.api.annotation("a", "hami.io/bind-phase").as_deref(),
        Some("success")
    );
}

/// A GPU init container: the kubelet's PodResources `List` never shows it (it walks `spec.containers`), and the
/// kubelet hands its devices on to the app container, whose own Allocate names the same IDs. The record of the
/// app container on those IDs confirms both, each with its own placement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_container_is_confirmed_through_the_container_it_hands_its_devices_to() {
    let rig = Rig::one_card_polling("init", GPU, Duration::from_secs(30)).await;
    let mut p = pod("w", "uid-w", "2026-01-01T00:00:00Z", &[1, 1]);
    let init = p["spec"]["containers"][0].clone();
    p["spec"]["initContainers"] = json!([init]);
    p["spec"]["containers"] = json!([p["spec"]["containers"][1].clone()]);
    seal_placement(
        &mut p,
        &format!("{}{}", dev(GPU, 2000, 0), dev(GPU, 1000, 0)),
        "100",
    );
    rig.api.put_pod(p);
    rig.synced("w").await;
    let id = format!("{GPU}-4");
    let ri = rig.allocate(&[&id]).await.expect("the init container");
    assert_eq!(env(&ri, "CUDA_DEVICE_MEMORY_LIMIT_0"), "2000m");
    let ra = rig
        .allocate(&[&id])
        .await
        .expect("the app container, on the init container's device");
    assert_eq!(env(&ra, "CUDA_DEVICE_MEMORY_LIMIT_0"), "1000m");
    // As the kubelet's List shows it: the app container only.
    rig.record.assign("w", "c1", &[&id]);
    rig.pre_start(&[&id]).await;
    let li = rig.limits("uid-w", "c0");
    let la = rig.limits("uid-w", "c1");
    assert!(
        li.contains("CUDA_DEVICE_MEMORY_LIMIT_0=2000m\n")
            && li.ends_with("VGPU_LIMITS_STATE=ready\n"),
        "init: {li}"
    );
    assert!(
        la.contains("CUDA_DEVICE_MEMORY_LIMIT_0=1000m\n")
            && la.ends_with("VGPU_LIMITS_STATE=ready\n"),
        "app: {la}"
    );
    rig.recorded("w").await;
}

/// PreStartContainer returns only once the answer is settled, whoever settles it: here the answer's watcher
/// polls the record every 2 ms and often takes the answer first, while the kubelet's PreStart comes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_start_waits_for_an_answer_another_path_is_settling() {
    let rig = Rig::one_card_polling("pre-start-race", GPU, Duration::from_millis(2)).await;
    for i in 0..6 {
        let (name, uid) = (format!("r{i}"), format!("uid-r{i}"));
        rig.put_sealed(&name, &uid, &dev(GPU, 1000, 0)).await;
        let id = format!("{GPU}-{i}");
        rig.allocate(&[&id]).await.unwrap();
        rig.record.assign(&name, "c0", &[&id]);
        rig.pre_start(&[&id]).await;
        assert!(
            rig.limits(&uid, "c0")
                .ends_with("VGPU_LIMITS_STATE=ready\n"),
            "{name}"
        );
        assert_eq!(
            rig.api.annotation(&name, "hami.io/bind-phase").as_deref(),
            Some("success"),
            "{name}: recorded before PreStart returned"
        );
    }
}

/// Two guesses each naming the other's pod (pods placed alike, admitted in the other order): each answer
/// settles as the other pod's. The first to settle finds its pod claimed by the second guess, which is not yet
/// settled; that must not count as "already answered" (it did: one pod was revoked and failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_guesses_that_each_name_the_others_pod_both_settle() {
    let rig = Rig::one_card_polling("crosswise", GPU, Duration::from_secs(30)).await;
    for (name, uid) in [("a", "uid-a"), ("b", "uid-b")] {
        rig.put_sealed(name, uid, &dev(GPU, 1000, 0)).await;
    }
    let (id1, id2) = (format!("{GPU}-1"), format!("{GPU}-2"));
    rig.allocate(&[&id1]).await.expect("guessed a");
    rig.allocate(&[&id2]).await.expect("guessed b");
    // The kubelet had admitted them the other way round.
    rig.record.assign("b", "c0", &[&id1]);
    rig.record.assign("a", "c0", &[&id2]);
    for id in [&id1, &id2] {
        rig.pre_start(&[id]).await;
    }
    for (name, uid) in [("a", "uid-a"), ("b", "uid-b")] {
        let l = rig.limits(uid, "c0");
        assert!(l.ends_with("VGPU_LIMITS_STATE=ready\n"), "{name}: {l}");
        assert_eq!(
            rig.api.annotation(name, "hami.io/bind-phase").as_deref(),
            Some("success"),
            "{name}"
        );
    }
    assert!(
        rig.api
            .events()
            .iter()
            .all(|e| e["reason"] != "VgpuAllocateRefused"),
        "{:?}",
        rig.api.events()
    );
}
