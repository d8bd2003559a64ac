//! The device plugin over real unix sockets: registration with the kubelet, the ListAndWatch stream and its
//! health changes, registering again by itself when the kubelet restarts, and the node's annotations
//! (HAMI-NOTES failure 3: a stale handshake or register annotation is overwritten at start).

mod node_support;

use std::time::{Duration, SystemTime};

use node_support::*;
use serde_json::json;
use vgpu_kubelet_api::deviceplugin::Empty;

const GPU: &str = "GPU-0fc3eda5-e98b-a25b-5b0d-cf5c855d1448";
const GPU2: &str = "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_lists_slots_with_health_and_registers_again_after_a_kubelet_restart() {
    let mut rig = Rig::start("plugin", vec![card(GPU, 0), card(GPU2, 1)], json!({})).await;
    let r = rig.kubelet.next(Duration::from_secs(5)).await;
    assert_eq!(
        (
            r.version.as_str(),
            r.endpoint.as_str(),
            r.resource_name.as_str()
        ),
        ("v1beta1", "vgpu-nvidia.sock", "nvidia.com/gpu")
    );

    let mut stream = rig
        .plugin()
        .await
        .list_and_watch(Empty {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let ids: Vec<&str> = first.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids.len(), 20, "10 slots per card (deviceSplitCount)");
    assert_eq!(ids[0], format!("{GPU}-0"));
    assert_eq!(ids[19], format!("{GPU2}-9"));
    assert!(first.devices.iter().all(|d| d.health == "Healthy"));

    // The second card fails (a critical XID, a lost handle): a new list is sent at once.
    let mut sick = card(GPU2, 1);
    sick.healthy = false;
    sick.reason = Some("critical XID 79".into());
    rig.cards.send_replace(vec![card(GPU, 0), sick]);
    let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a new list after the health change")
        .unwrap()
        .unwrap();
    let health = |prefix: &str| {
        next.devices
            .iter()
            .filter(|d| d.id.starts_with(prefix))
            .map(|d| d.health.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(health(GPU), ["Healthy"; 10]);
    assert_eq!(health(GPU2), ["Unhealthy"; 10]);
    let health_of = eventually(
        "the register annotation to follow",
        Duration::from_secs(5),
        || {
            let n = rig.api.node(NODE);
            let v = n["metadata"]["annotations"]["hami.io/node-nvidia-register"]
                .as_str()?
                .to_string();
            let d = vgpu_contract::register::decode(&v).unwrap();
            let h: Vec<(String, bool)> = d.into_iter().map(|d| (d.id, d.health)).collect();
            (!h[1].1).then_some(h)
        },
    )
    .await;
    assert_eq!(
        health_of,
        [(GPU.to_string(), true), (GPU2.to_string(), false)]
    );

    // The kubelet restarts: it empties the directory (the plugin's socket too) and makes a new kubelet.sock.
    drop(stream);
    let dir = rig.plugin_dir();
    let old = std::mem::replace(
        &mut rig.kubelet,
        KubeletRegistration::serve(&dir.join("restarting.sock")),
    );
    drop(old);
    std::fs::remove_file(dir.join("kubelet.sock")).unwrap();
    std::fs::remove_file(dir.join("vgpu-nvidia.sock")).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    rig.kubelet = KubeletRegistration::serve(&dir.join("kubelet.sock"));
    let again = rig.kubelet.next(Duration::from_secs(5)).await;
    assert_eq!(again.resource_name, "nvidia.com/gpu");
    assert!(
        dir.join("vgpu-nvidia.sock").exists(),
        "the plugin serves again"
    );
    let mut stream = rig
        .plugin()
        .await
        .list_and_watch(Empty {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().devices.len(), 20);

    // Only the kubelet's socket recreated (the plugin's left alone): registered again too.
    drop(stream);
    rig.kubelet = KubeletRegistration::serve(&dir.join("kubelet.sock"));
    let third = rig.kubelet.next(Duration::from_secs(5)).await;
    assert_eq!(third.endpoint, "vgpu-nvidia.sock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_register_and_handshake_are_overwritten_at_start() {
    // What a dead agent (another GPU, unhealthy) and a scheduler's old request left on the node.
    let stale = json!({
        "hami.io/node-nvidia-register": r#"[{"id":"GPU-gone","count":10,"devmem":1,"devcore":100,"type":"NVIDIA-old"}]"#,
        "hami.io/node-handshake": "Requesting_2024-01-23 04:30:04",
        "other/keep": "yes",
    });
    let rig = Rig::start("stale", vec![card(GPU, 0)], stale).await;
    // Written before start_with returned: nothing stale survives the agent's start.
    let a = &rig.api.node(NODE)["metadata"]["annotations"];
    assert_eq!(
        a["hami.io/node-nvidia-register"],
        format!(
            r#"[{{"id":"{GPU}","count":10,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","mode":"hami-core","health":true}}]"#
        )
    );
    let hs = a["hami.io/node-handshake"].as_str().unwrap();
    let now = vgpu_agent::node::registration::hami_time(SystemTime::now());
    assert!(hs.starts_with("Reported_"), "{hs}");
    assert_eq!(
        &hs["Reported_".len().."Reported_".len() + 13],
        &now[..13],
        "{hs} is now ({now})"
    );
    assert_eq!(
        a["other/keep"], "yes",
        "a merge patch leaves other annotations"
    );
    let patch = rig
        .api
        .writes()
        .into_iter()
        .find(|(_, p, _)| p.contains(&format!("/nodes/{NODE}?")))
        .unwrap();
    assert_eq!(patch.0, "PATCH");
    assert!(patch.1.contains("fieldManager=vgpu-agent"), "{}", patch.1);
}
