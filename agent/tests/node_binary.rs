//! The agent binary in Kubernetes mode, end to end: `vgpu-agent run` with a kubeconfig pointing at the
//! in-test API server (plain HTTP), the simulated GPU's NVML (two cards), the kubelet's sockets in a temp dir,
//! and a config file. It registers the simulated cards, answers Allocate for a sealed pod, and fills the limits
//! file once PodResources confirms. Needs root (the agent loads its eBPF programs); as another user it skips.

mod node_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use node_support::*;
use serde_json::json;
use vgpu_kubelet_api::deviceplugin::device_plugin_client::DevicePluginClient;
use vgpu_kubelet_api::deviceplugin::{AllocateRequest, ContainerAllocateRequest, Empty};

/// The simulated GPU's NVML, built here from integration/simgpu (as integration/build.rs does).
fn build_sim_nvml(dir: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../integration/simgpu");
    let st = Command::new("gcc")
        .args([
            "-O2",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            "-Wl,-soname,libnvidia-ml.so.1",
            "-o",
        ])
        .arg(dir.join("libnvidia-ml.so.1"))
        .arg(src.join("libnvml.c"))
        .arg(src.join("state.c"))
        .arg("-lpthread")
        .status()
        .expect("gcc");
    assert!(st.success());
    std::os::unix::fs::symlink("libnvidia-ml.so.1", dir.join("libnvidia-ml.so")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_registers_simulated_cards_and_serves_a_sealed_pod() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: the agent loads eBPF programs, which needs root");
        return;
    }
    let dir = TempDir::new("binary");
    let d = |p: &str| dir.0.join(p);
    std::fs::create_dir_all(d("lib")).unwrap();
    std::fs::create_dir_all(d("plugins")).unwrap();
    build_sim_nvml(&d("lib"));
    let api = FakeApi::start().await;
    api.add_node(
        NODE,
        json!({"hami.io/node-handshake": "Requesting_2024-01-23 04:30:04"}),
    );
    std::fs::write(
        d("kubeconfig"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: {}\ncontexts:\n- name: t\n  context:\n    cluster: t\n    user: t\ncurrent-context: t\nusers:\n- name: t\n  user: {{}}\n",
            api.url
        ),
    )
    .unwrap();
    std::fs::write(
        d("seal.key"),
        format!("{}\n", std::str::from_utf8(KEY).unwrap()),
    )
    .unwrap();
    std::fs::write(d("config.yaml"), "deviceSplitCount: 4\n").unwrap();
    let mut kubelet = KubeletRegistration::serve(&d("plugins/kubelet.sock"));
    let record = Record::default();
    serve_pod_resources(&d("pod-resources.sock"), record.clone());

    let log = std::fs::File::create(d("agent.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vgpu-agent"))
        .args([
            "run",
            "--metrics-addr",
            "off",
            "--pin-dir",
            "off",
            "--node-name",
            NODE,
        ])
        .arg("--seal-key-file")
        .arg(d("seal.key"))
        .arg("--config")
        .arg(d("config.yaml"))
        .arg("--device-plugin-dir")
        .arg(d("plugins"))
        .arg("--pod-resources-socket")
        .arg(d("pod-resources.sock"))
        .arg("--containers-dir")
        .arg(d("containers"))
        .arg("--cache-dir")
        .arg(d("containers"))
        .arg("--card-dir")
        .arg(d("cards"))
        .arg("--socket")
        .arg(d("agent.sock"))
        .arg("--state-file")
        .arg(d("state.json"))
        .env("KUBECONFIG", d("kubeconfig"))
        .env("LD_LIBRARY_PATH", d("lib"))
        .env("VGPU_SIM_DEVICES", "2")
        .env("VGPU_SIM_STATE", d("sim-state"))
        .env("VGPU_SIM_LOST_FILE", d("lost"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let agent_log = || std::fs::read_to_string(d("agent.log")).unwrap_or_default();

    let r = tokio::time::timeout(Duration::from_secs(30), kubelet.registered.recv()).await;
    let r = r
        .unwrap_or_else(|_| panic!("no Register from the agent: {}", agent_log()))
        .unwrap();
    assert_eq!(
        (r.resource_name.as_str(), r.endpoint.as_str()),
        ("nvidia.com/gpu", "vgpu-nvidia.sock")
    );

    // The simulated cards, once NVML has been read: two cards of 4 slots each.
    let reg = eventually(
        "both simulated cards registered",
        Duration::from_secs(20),
        || {
            let v = api.node(NODE)["metadata"]["annotations"]["hami.io/node-nvidia-register"]
                .as_str()?
                .to_string();
            let d = vgpu_contract::register::decode(&v).ok()?;
            (d.len() == 2).then_some(d)
        },
    )
    .await;
    assert_eq!(reg[0].id, "GPU-5a1c0000-0000-4000-8000-000000000000");
    assert_eq!(
        (reg[1].index, reg[1].count, reg[1].devmem, reg[1].devcore),
        (1, 4, 16384, 100)
    );
    assert_eq!(reg[0].kind, "NVIDIA Simulated H100");
    assert!(reg.iter().all(|c| c.health && c.mode == "hami-core"));
    let hs = api.node(NODE)["metadata"]["annotations"]["hami.io/node-handshake"].clone();
    assert!(hs.as_str().unwrap().starts_with("Reported_"), "{hs}");

    let sock = d("plugins/vgpu-nvidia.sock");
    let mut plugin = DevicePluginClient::new(vgpu_agent::node::unix::channel(&sock).await.unwrap());
    let mut list = plugin.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(list.message().await.unwrap().unwrap().devices.len(), 8);

    let gpu = &reg[1].id;
    let mut p = pod("lab", "uid-lab", "2026-01-01T00:00:00Z", &[1]);
    seal_placement(&mut p, &format!("{gpu},NVIDIA,4000,30:;"), "100");
    api.put_pod(p);
    let id = format!("{gpu}-2");
    // Right after the pod is written: the agent's watch may lag, and Allocate then asks the API directly.
    let req = AllocateRequest {
        container_requests: vec![ContainerAllocateRequest {
            devices_ids: vec![id.clone()],
        }],
    };
    let answer = match plugin.allocate(req).await {
        Ok(r) => r.into_inner(),
        Err(e) => panic!("Allocate refused: {} {}", e.message(), agent_log()),
    };
    let a = answer.container_responses[0].clone();
    assert_eq!(a.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "4000m");
    assert_eq!(a.envs["NVIDIA_VISIBLE_DEVICES"], *gpu);
    record.assign("lab", "c0", &[&id]);
    let limits = std::path::PathBuf::from(
        &a.mounts
            .iter()
            .find(|m| m.container_path == "/usr/local/vgpu/limits")
            .expect("the limits file is mounted")
            .host_path,
    );
    assert!(limits.starts_with(d("containers")), "{limits:?}");
    let mut text = String::new();
    for _ in 0..500 {
        text = std::fs::read_to_string(&limits).unwrap();
        if !text.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually("the pod recorded", Duration::from_secs(5), || {
        (api.annotation("lab", "hami.io/bind-phase").as_deref() == Some("success")).then_some(())
    })
    .await;
    assert!(
        text.ends_with("VGPU_LIMITS_STATE=ready\n"),
        "{text:?}: {}",
        agent_log()
    );
    assert!(text.contains("CUDA_DEVICE_SM_LIMIT=30\n"), "{text}");

    // The second card is lost (its NVML calls fail): the kubelet is told at once, and so is the scheduler.
    std::fs::write(d("lost"), "1\n").unwrap();
    let next = tokio::time::timeout(Duration::from_secs(15), list.message())
        .await
        .expect("a new device list after the card was lost")
        .unwrap()
        .unwrap();
    let unhealthy: Vec<_> = next
        .devices
        .iter()
        .filter(|d| d.health == "Unhealthy")
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(
        unhealthy,
        (0..4).map(|n| format!("{gpu}-{n}")).collect::<Vec<_>>()
    );
    eventually(
        "the register annotation shows the lost card",
        Duration::from_secs(5),
        || {
            let v = api.node(NODE)["metadata"]["annotations"]["hami.io/node-nvidia-register"]
                .as_str()?
                .to_string();
            let d = vgpu_contract::register::decode(&v).ok()?;
            (d[0].health && !d[1].health).then_some(())
        },
    )
    .await;
    // It comes back: healthy again (a lost handle is not sticky, a critical XID would be).
    std::fs::remove_file(d("lost")).unwrap();
    let back = tokio::time::timeout(Duration::from_secs(15), list.message())
        .await
        .expect("a new device list after the card came back")
        .unwrap()
        .unwrap();
    assert!(back.devices.iter().all(|d| d.health == "Healthy"));

    // SAFETY: kill on the pid of a child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "agent exit {st}: {}", agent_log());
    assert!(
        !sock.exists(),
        "the plugin removes its socket on the way out"
    );
}
