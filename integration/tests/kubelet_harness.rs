//! The kubelet harness against a device plugin of the test's own and an in-memory API server: registration
//! and ListAndWatch, a kubelet restart, admission through Allocate, containers started with exactly
//! Allocate's env and mounts in their own cgroup, pod status, PodResources. Needs root (cgroups, mount
//! namespaces), as CI runs.

#[path = "kubelet_harness/fake_api.rs"]
mod fake_api;
#[path = "kubelet_harness/test_plugin.rs"]
mod test_plugin;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fake_api::FakeApi;
use serde_json::{json, Value};
use test_plugin::{device, Answer, TestPlugin, RESOURCE};
use vgpu_integration::kubelet::runner::DEFAULT_PATH;
use vgpu_integration::kubelet::{uds, Config, Harness};
use vgpu_kubelet_api::deviceplugin as dp;
use vgpu_kubelet_api::podresources::pod_resources_lister_client::PodResourcesListerClient;
use vgpu_kubelet_api::podresources::ListPodResourcesRequest;

const NODE: &str = "node-a";

fn cgroup2_mount() -> PathBuf {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(2) == Some("cgroup2"))
        .and_then(|l| l.split(' ').nth(1))
        .map(PathBuf::from)
        .expect("a cgroup2 mount")
}

/// One node: the fake API, a harness, a plugin and the directories they use.
struct TestNode {
    api: FakeApi,
    harness: Option<Harness>,
    plugin: Arc<TestPlugin>,
    dir: PathBuf,
    cgroup_root: PathBuf,
}

impl TestNode {
    async fn start(devices: usize, answer: Answer) -> Self {
        Self::start_with(devices, answer, true, false).await
    }

    /// `isolated`: a mount namespace and a cgroup per container; without, what a non-root run gets
    /// (`--no-mount-ns`, no `--cgroup-root`).
    async fn start_with(devices: usize, answer: Answer, isolated: bool, pid_ns: bool) -> Self {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "these tests need root (cgroups and mount namespaces), as in CI"
        );
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("kubelet-harness-{tag}"));
        let cgroup_root = cgroup2_mount().join(format!("vgpu-harness-test-{tag}"));
        std::fs::create_dir_all(dir.join("device-plugins")).unwrap();
        let api = FakeApi::start().await;
        let cfg = Config {
            node_name: NODE.into(),
            device_plugin_dir: dir.join("device-plugins"),
            pod_resources_socket: dir.join("pod-resources/kubelet.sock"),
            cgroup_root: isolated.then(|| cgroup_root.clone()),
            run_dir: dir.join("run"),
            mount_ns: isolated,
            container_env: Vec::new(),
            host_ip: "127.0.0.1".into(),
            pid_ns_helper: pid_ns.then(|| PathBuf::from(env!("CARGO_BIN_EXE_kubelet-harness"))),
        };
        let harness = Harness::start(cfg, api.client()).await.unwrap();
        let plugin = TestPlugin::start(&dir.join("device-plugins"), devices, answer);
        TestNode {
            api,
            harness: Some(harness),
            plugin,
            dir,
            cgroup_root,
        }
    }

    fn harness(&self) -> &Harness {
        self.harness.as_ref().unwrap()
    }

    async fn registered(self) -> Self {
        self.plugin.register().await;
        let n = self.plugin.devices.borrow().len();
        until("the harness to hold the plugin's devices", || {
            (self.harness().devices.free(RESOURCE).len() == n).then_some(())
        })
        .await;
        self
    }

    async fn list_pod_resources(
        &self,
    ) -> Vec<(String, String, Vec<(String, String, Vec<String>)>)> {
        let ch = uds::connect(
            &self.dir.join("pod-resources/kubelet.sock"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let r = PodResourcesListerClient::new(ch)
            .list(ListPodResourcesRequest {})
            .await
            .unwrap()
            .into_inner();
        r.pod_resources
            .into_iter()
            .map(|p| {
                let cs = p
                    .containers
                    .into_iter()
                    .flat_map(|c| {
                        c.devices
                            .into_iter()
                            .map(move |d| (c.name.clone(), d.resource_name, d.device_ids))
                    })
                    .collect();
                (p.namespace, p.name, cs)
            })
            .collect()
    }

    fn pod_cgroup(&self, uid: &str) -> PathBuf {
        self.cgroup_root
            .join(format!("kubepods/besteffort/pod{uid}"))
    }

    async fn stop(mut self) {
        if let Some(h) = self.harness.take() {
            h.shutdown(Duration::ZERO).await;
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // Whatever a failed test left: kill the subtree, then remove the cgroups bottom-up.
        let _ = std::fs::write(self.cgroup_root.join("cgroup.kill"), "1");
        std::thread::sleep(Duration::from_millis(50));
        fn rm(d: &Path) {
            if let Ok(es) = std::fs::read_dir(d) {
                for e in es.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        rm(&e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(d);
        }
        rm(&self.cgroup_root);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pod(name: &str, gpus: u32, script: &str) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": NODE,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": "nvidia/cuda:12.4.1-base-ubuntu22.04",
                "command": ["/bin/sh", "-c", script],
                "env": [{"name": "FROM_SPEC", "value": "yes"}],
                "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}},
            }],
        },
    })
}

fn phase(api: &FakeApi, name: &str) -> Option<String> {
    api.pod(name)?["status"]["phase"]
        .as_str()
        .map(str::to_string)
}

/// (container ID, pid of its main process) once the pod's first container runs.
async fn running_container(node: &TestNode, name: &str) -> (String, String, i32) {
    let (uid, id): (String, String) = until(&format!("{name} Running with a container ID"), || {
        let p = node.api.pod(name)?;
        (p["status"]["phase"] == "Running").then_some(())?;
        let id = p["status"]["containerStatuses"][0]["containerID"].as_str()?;
        Some((
            p["metadata"]["uid"].as_str()?.to_string(),
            id.strip_prefix("containerd://")?.to_string(),
        ))
    })
    .await;
    let procs = node.pod_cgroup(&uid).join(&id).join("cgroup.procs");
    let pid = std::fs::read_to_string(&procs)
        .unwrap()
        .lines()
        .next()
        .expect("the container's process is in its cgroup")
        .parse()
        .unwrap();
    (uid, id, pid)
}

fn environ(pid: i32) -> BTreeMap<String, String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap()
        .split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_then_list_and_watch_sets_node_capacity() {
    let node = TestNode::start(4, Answer::default()).await;
    // A plugin of another API version is refused, and counts for nothing.
    let refused = node.plugin.register_as("v1alpha1").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert_eq!(node.harness().devices.registrations(), 0);

    let node = node.registered().await;
    assert_eq!(node.harness().devices.registrations(), 1);
    assert_eq!(node.plugin.calls().list_and_watch, 1);
    let n = until("Node allocatable 4", || {
        let n = node.api.get("nodes", "", NODE)?;
        (n["status"]["allocatable"][RESOURCE] == "4").then_some(n)
    })
    .await;
    assert_eq!(n["status"]["capacity"][RESOURCE], "4");
    assert_eq!(n["metadata"]["labels"]["kubernetes.io/hostname"], NODE);

    // ListAndWatch reports a device unhealthy: allocatable drops, capacity stays.
    node.plugin
        .devices
        .send_modify(|d| d[3] = device("dev-3", false));
    let n = until("Node allocatable 3", || {
        let n = node.api.get("nodes", "", NODE)?;
        (n["status"]["allocatable"][RESOURCE] == "3").then_some(n)
    })
    .await;
    assert_eq!(n["status"]["capacity"][RESOURCE], "4");
    assert_eq!(
        node.harness().devices.free(RESOURCE),
        ["dev-0", "dev-1", "dev-2"]
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_restart_makes_the_plugin_register_again() {
    let mut node = TestNode::start(2, Answer::default())
        .await
        .registered()
        .await;
    let sock = node.dir.join("device-plugins/kubelet.sock");
    let plugin_sock = node.dir.join("device-plugins/test-plugin.sock");
    let before = test_plugin::file_identity(&sock).unwrap();
    until("Node allocatable 2", || {
        (node.api.get("nodes", "", NODE)?["status"]["allocatable"][RESOURCE] == "2").then_some(())
    })
    .await;

    node.harness
        .as_mut()
        .unwrap()
        .restart_kubelet()
        .await
        .unwrap();
    assert_ne!(
        test_plugin::file_identity(&sock).unwrap(),
        before,
        "kubelet.sock is recreated"
    );
    assert!(
        !plugin_sock.exists(),
        "the restart removes the plugins' sockets"
    );
    until("Node allocatable 0 while no plugin is registered", || {
        let n = node.api.get("nodes", "", NODE)?;
        (n["status"]["allocatable"][RESOURCE] == "0" && n["status"]["capacity"][RESOURCE] == "0")
            .then_some(())
    })
    .await;
    assert!(node.harness().devices.free(RESOURCE).is_empty());
    // Until the plugin is back, a pod asking for its resource fails admission, as after a kubelet restart.
    node.api.create_pod(pod("too-early", 1, "exec sleep 60"));
    until("too-early Failed", || {
        (phase(&node.api, "too-early")? == "Failed").then_some(())
    })
    .await;
    assert_eq!(
        node.api.pod("too-early").unwrap()["status"]["message"],
        "Pod was rejected: Allocate failed due to requested number of devices unavailable for nvidia.com/gpu. \
         Requested: 1, Available: 0, which is unexpected"
    );

    // The plugin serves again and registers again: the harness takes the second Register.
    node.plugin.serve();
    node.plugin.register().await;
    assert_eq!(node.harness().devices.registrations(), 2);
    until("the devices back after the restart", || {
        (node.harness().devices.free(RESOURCE).len() == 2).then_some(())
    })
    .await;
    until("Node allocatable 2 again", || {
        (node.api.get("nodes", "", NODE)?["status"]["allocatable"][RESOURCE] == "2").then_some(())
    })
    .await;
    assert_eq!(node.plugin.calls().list_and_watch, 2);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admitted_pod_runs_with_allocate_env_mounts_and_cgroup() {
    let tmp = std::env::temp_dir().join(format!("kubelet-harness-mounts-{}", std::process::id()));
    let host = tmp.join("host");
    let ctr = tmp.join("ctr");
    std::fs::create_dir_all(host.join("cache")).unwrap();
    std::fs::write(host.join("limits"), "CUDA_DEVICE_MEMORY_LIMIT_0=4000m\n").unwrap();
    let limits_in_ctr = ctr.join("usr/local/vgpu/limits");
    let cache_in_ctr = ctr.join("cache");
    let answer = Answer {
        mounts: vec![
            dp::Mount {
                container_path: limits_in_ctr.to_str().unwrap().into(),
                host_path: host.join("limits").to_str().unwrap().into(),
                read_only: true,
            },
            dp::Mount {
                container_path: cache_in_ctr.to_str().unwrap().into(),
                host_path: host.join("cache").to_str().unwrap().into(),
                read_only: false,
            },
        ],
        ..Default::default()
    };
    let node = TestNode::start(2, answer).await.registered().await;
    // No shell: it would add PWD to what the process was given. `sleep` is found through the runtime's PATH.
    let mut p = pod("gpu-pod", 1, "");
    p["spec"]["containers"][0]["command"] = json!(["sleep", "60"]);
    node.api.create_pod(p);
    let (uid, id, pid) = running_container(&node, "gpu-pod").await;

    assert_eq!(id.len(), 64);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    assert_eq!(
        node.plugin.calls().allocate,
        vec![vec!["dev-0".to_string()]]
    );

    // Exactly the env: the runtime's PATH and HOSTNAME, Allocate's, the spec's; nothing of the harness's.
    let want: BTreeMap<String, String> = [
        ("PATH", DEFAULT_PATH),
        ("HOSTNAME", "gpu-pod"),
        ("NVIDIA_VISIBLE_DEVICES", "dev-0"),
        ("CUDA_DEVICE_MEMORY_LIMIT_0", "4000m"),
        ("FROM_SPEC", "yes"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(environ(pid), want);

    // Its cgroup, in the kubelet's cgroupfs layout.
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let rel = node.cgroup_root.strip_prefix(cgroup2_mount()).unwrap();
    let want_cg = format!("0::/{}/kubepods/besteffort/pod{uid}/{id}", rel.display());
    assert!(cg.lines().any(|l| l == want_cg), "{cg} lacks {want_cg}");

    // The mounted file is visible at its container path inside the process only, and read-only there.
    let inside =
        PathBuf::from(format!("/proc/{pid}/root")).join(limits_in_ctr.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::read_to_string(&inside).unwrap(),
        "CUDA_DEVICE_MEMORY_LIMIT_0=4000m\n"
    );
    assert!(
        !limits_in_ctr.exists(),
        "the mount target is made on a tmpfs inside the container's namespace, never on the host"
    );
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&inside)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == limits_in_ctr.to_str())
        .unwrap_or_else(|| panic!("no mount on {} in {mountinfo}", limits_in_ctr.display()));
    assert!(
        line.split(' ')
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "{line}"
    );
    // The read-write mount writes through to the host directory.
    let inside_cache =
        PathBuf::from(format!("/proc/{pid}/root")).join(cache_in_ctr.strip_prefix("/").unwrap());
    std::fs::write(inside_cache.join("slot"), "x").unwrap();
    assert_eq!(
        std::fs::read_to_string(host.join("cache/slot")).unwrap(),
        "x"
    );

    // An exec runs in the container: same env, same mounts, same cgroup.
    let record = vgpu_integration::kubelet::exec::find_record(
        &node.dir.join("run"),
        "default",
        "gpu-pod",
        None,
    )
    .unwrap();
    let out = vgpu_integration::kubelet::exec::command_in(
        &record,
        &[
            "sh".into(),
            "-c".into(),
            format!(
                "cat {}; cat /proc/self/cgroup; env",
                limits_in_ctr.display()
            ),
        ],
    )
    .unwrap()
    .output()
    .unwrap();
    let out = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.starts_with("CUDA_DEVICE_MEMORY_LIMIT_0=4000m\n"),
        "{out}"
    );
    assert!(out.lines().any(|l| l == want_cg), "{out}");
    assert!(
        out.lines().any(|l| l == "NVIDIA_VISIBLE_DEVICES=dev-0"),
        "{out}"
    );

    assert_eq!(
        node.list_pod_resources().await,
        vec![(
            "default".to_string(),
            "gpu-pod".to_string(),
            vec![(
                "app".to_string(),
                RESOURCE.to_string(),
                vec!["dev-0".to_string()]
            )]
        )]
    );

    // Deleted: its processes, cgroups and devices go.
    node.api.delete("pods", "default", "gpu-pod").unwrap();
    until("the process killed", || {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    })
    .await;
    until("the pod's cgroup removed", || {
        (!node.pod_cgroup(&uid).exists()).then_some(())
    })
    .await;
    assert!(node.list_pod_resources().await.is_empty());
    assert_eq!(node.harness().devices.free(RESOURCE).len(), 2);
    assert!(
        vgpu_integration::kubelet::exec::find_record(
            &node.dir.join("run"),
            "default",
            "gpu-pod",
            None
        )
        .is_err(),
        "no exec into an ended container"
    );
    node.stop().await;
    let _ = std::fs::remove_dir_all(&tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_refused_fails_the_pod_with_unexpected_admission_error() {
    let answer = Answer {
        refuse: Some("pod default/forged has no placement by vgpu-scheduler".into()),
        ..Default::default()
    };
    let node = TestNode::start(2, answer).await.registered().await;
    node.api.create_pod(pod("forged", 1, "exec sleep 60"));
    until("forged Failed", || {
        (phase(&node.api, "forged")? == "Failed").then_some(())
    })
    .await;
    let p = node.api.pod("forged").unwrap();
    let want =
        "Allocate failed due to rpc error: code = FailedPrecondition desc = pod default/forged \
                has no placement by vgpu-scheduler, which is unexpected";
    assert_eq!(p["status"]["reason"], "UnexpectedAdmissionError");
    assert_eq!(p["status"]["message"], format!("Pod was rejected: {want}"));
    assert!(
        p["status"]["containerStatuses"].is_null(),
        "no container started: {p}"
    );
    let ev = until("the Warning event", || {
        node.api
            .all("events")
            .into_iter()
            .find(|e| e["involvedObject"]["name"] == "forged")
    })
    .await;
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["reason"], "UnexpectedAdmissionError");
    assert_eq!(ev["message"], want);
    assert!(!node
        .pod_cgroup(p["metadata"]["uid"].as_str().unwrap())
        .exists());
    assert!(node.list_pod_resources().await.is_empty());
    assert_eq!(
        node.harness().devices.free(RESOURCE),
        ["dev-0", "dev-1"],
        "its IDs are released"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_devices_than_free_fail_admission_without_allocate() {
    let node = TestNode::start(2, Answer::default())
        .await
        .registered()
        .await;
    node.api.create_pod(pod("first", 1, "exec sleep 60"));
    running_container(&node, "first").await;
    node.api.create_pod(pod("greedy", 2, "exec sleep 60"));
    until("greedy Failed", || {
        (phase(&node.api, "greedy")? == "Failed").then_some(())
    })
    .await;
    let p = node.api.pod("greedy").unwrap();
    assert_eq!(p["status"]["reason"], "UnexpectedAdmissionError");
    assert_eq!(
        p["status"]["message"],
        "Pod was rejected: Allocate failed due to requested number of devices unavailable for \
         nvidia.com/gpu. Requested: 2, Available: 1, which is unexpected"
    );
    assert_eq!(
        node.plugin.calls().allocate,
        vec![vec!["dev-0".to_string()]]
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_admitted_one_at_a_time_in_creation_order() {
    let answer = Answer {
        delay: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let node = TestNode::start(3, answer).await.registered().await;
    // The three arrive in one list (a re-list after the watch expired), listed by name: a, b, c. Their
    // creation order is b, c, a.
    node.api.pause_watches();
    for (name, t) in [
        ("a-late", "2026-01-01T00:00:10Z"),
        ("b-early", "2026-01-01T00:00:00Z"),
        ("c-mid", "2026-01-01T00:00:05Z"),
    ] {
        let mut p = pod(name, 1, "exec sleep 60");
        p["metadata"]["creationTimestamp"] = json!(t);
        node.api.create_pod(p);
    }
    node.api.expire_watches();
    for name in ["a-late", "b-early", "c-mid"] {
        running_container(&node, name).await;
    }
    let held: BTreeMap<String, Vec<String>> = node
        .list_pod_resources()
        .await
        .into_iter()
        .map(|(_, name, cs)| (name, cs.into_iter().flat_map(|c| c.2).collect()))
        .collect();
    assert_eq!(held["b-early"], ["dev-0"]);
    assert_eq!(held["c-mid"], ["dev-1"]);
    assert_eq!(held["a-late"], ["dev-2"]);
    assert_eq!(
        node.plugin.calls().max_in_flight,
        1,
        "Allocate calls never overlap"
    );

    // Pods arriving one by one are admitted as they come.
    for name in ["a-late", "b-early", "c-mid"] {
        node.api.delete("pods", "default", name);
    }
    until("devices released", || {
        (node.harness().devices.free(RESOURCE).len() == 3).then_some(())
    })
    .await;
    node.api.create_pod(pod("x-second", 0, "exec sleep 60"));
    node.api
        .create_pod(pod("y-first-with-gpu", 1, "exec sleep 60"));
    running_container(&node, "y-first-with-gpu").await;
    assert_eq!(
        node.plugin.calls().allocate.last().unwrap(),
        &vec!["dev-0".to_string()]
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_set_container_states_and_pod_phase() {
    let node = TestNode::start(1, Answer::default())
        .await
        .registered()
        .await;
    node.api.create_pod(pod("ok", 1, "exit 0"));
    node.api
        .create_pod(pod("bad", 0, "echo to-stdout; echo to-stderr >&2; exit 3"));
    until("ok Succeeded", || {
        (phase(&node.api, "ok")? == "Succeeded").then_some(())
    })
    .await;
    until("bad Failed", || {
        (phase(&node.api, "bad")? == "Failed").then_some(())
    })
    .await;
    let ok = &node.api.pod("ok").unwrap()["status"]["containerStatuses"][0];
    assert_eq!(ok["state"]["terminated"]["exitCode"], 0);
    assert_eq!(ok["state"]["terminated"]["reason"], "Completed");
    assert!(ok["containerID"]
        .as_str()
        .unwrap()
        .starts_with("containerd://"));
    let bad = &node.api.pod("bad").unwrap()["status"]["containerStatuses"][0];
    assert_eq!(bad["state"]["terminated"]["exitCode"], 3);
    assert_eq!(bad["state"]["terminated"]["reason"], "Error");
    let log = std::fs::read_to_string(node.dir.join("run/logs/default_bad_app.log")).unwrap();
    assert_eq!(log, "to-stdout\nto-stderr\n");
    // An ended pod's device is free again.
    until("ok's device released", || {
        (node.harness().devices.free(RESOURCE).len() == 1).then_some(())
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_deletion_stops_the_processes_then_removes_the_pod() {
    let node = TestNode::start(1, Answer::default())
        .await
        .registered()
        .await;
    // It takes a second to stop after SIGTERM.
    let mut p = pod(
        "doomed",
        1,
        "trap 'sleep 1; exit 0' TERM; echo trapped; while :; do sleep 0.1; done",
    );
    p["spec"]["terminationGracePeriodSeconds"] = json!(5);
    node.api.create_pod(p);
    let (_, _, pid) = running_container(&node, "doomed").await;
    // A TERM before the trap is set would end it at once.
    let log = node.dir.join("run/logs/default_doomed_app.log");
    until("the trap set", || {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("trapped")
            .then_some(())
    })
    .await;
    node.api.patch(
        "pods",
        "default",
        "doomed",
        &json!({"metadata": {"deletionTimestamp": k8s_openapi::jiff::Timestamp::now().to_string(),
                             "deletionGracePeriodSeconds": 5}}),
    );
    // Another update while it stops must not cut the teardown short.
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.api.patch(
        "pods",
        "default",
        "doomed",
        &json!({"metadata": {"labels": {"touched": "yes"}}}),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        node.api.pod("doomed").is_some(),
        "the pod object stays while its container stops"
    );
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "still in its grace period"
    );
    until("the pod object removed by the kubelet", || {
        node.api.pod("doomed").is_none().then_some(())
    })
    .await;
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "its process is gone before the object"
    );
    assert!(node.list_pod_resources().await.is_empty());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_allocation_is_asked_and_followed() {
    let answer = Answer {
        preferred: Some(vec!["dev-2".into()]),
        ..Default::default()
    };
    let node = TestNode::start(4, answer).await.registered().await;
    node.api.create_pod(pod("picky", 1, "exec sleep 60"));
    running_container(&node, "picky").await;
    {
        let calls = node.plugin.calls();
        assert_eq!(calls.preferred.len(), 1);
        assert_eq!(
            calls.preferred[0].available_device_i_ds,
            ["dev-0", "dev-1", "dev-2", "dev-3"]
        );
        assert_eq!(calls.preferred[0].allocation_size, 1);
        assert_eq!(calls.allocate, vec![vec!["dev-2".to_string()]]);
    }
    node.stop().await;
}

/// The harness process, killed with its containers if the test fails.
struct KillOnDrop(Option<std::process::Child>, PathBuf);

impl KillOnDrop {
    fn id(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::write(self.1.join("cgroup.kill"), "1");
        }
    }
}

/// The binary as the lab runs it: flags, a kubeconfig, SIGHUP for a kubelet restart, SIGTERM to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_restarts_on_sighup_and_cleans_up_on_sigterm() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root, as in CI"
    );
    let api = FakeApi::start().await;
    let dir = std::env::temp_dir().join(format!("kubelet-harness-bin-{}", std::process::id()));
    let cgroup_root = cgroup2_mount().join(format!("vgpu-harness-bin-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("dp")).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{}\n\
             users:\n- name: u\n  user: {{}}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n\
             current-context: x\n",
            api.addr
        ),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_kubelet-harness"))
        .arg("--node-name")
        .arg(NODE)
        .arg("--device-plugin-dir")
        .arg(dir.join("dp"))
        .arg("--pod-resources-socket")
        .arg(dir.join("pr.sock"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cgroup-root")
        .arg(&cgroup_root)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--container-env")
        .arg("FROM_IMAGE=1")
        .stderr(std::fs::File::create(dir.join("harness.log")).unwrap())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(Some(child), cgroup_root.clone());
    until("kubelet.sock", || {
        dir.join("dp/kubelet.sock").exists().then_some(())
    })
    .await;
    let plugin = TestPlugin::start(&dir.join("dp"), 2, Answer::default());
    plugin.follow_kubelet_restarts();
    plugin.register().await;
    until("Node allocatable 2", || {
        (api.get("nodes", "", NODE)?["status"]["allocatable"][RESOURCE] == "2").then_some(())
    })
    .await;

    // SAFETY: kill(2) on the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    until("a second accepted Register and ListAndWatch", || {
        let c = plugin.calls();
        (c.registered == 2 && c.list_and_watch == 2).then_some(())
    })
    .await;
    // Only the new stream can carry this list to the Node.
    plugin
        .devices
        .send_replace((0..3).map(|i| device(&format!("dev-{i}"), true)).collect());
    until("Node allocatable 3 through the new ListAndWatch", || {
        (api.get("nodes", "", NODE)?["status"]["allocatable"][RESOURCE] == "3").then_some(())
    })
    .await;

    let mut p = pod("bin-pod", 1, "");
    p["spec"]["containers"][0]["command"] = json!(["sleep", "60"]);
    api.create_pod(p);
    let id = until("bin-pod Running", || {
        let p = api.pod("bin-pod")?;
        (p["status"]["phase"] == "Running").then_some(())?;
        Some(
            p["status"]["containerStatuses"][0]["containerID"]
                .as_str()?
                .to_string(),
        )
    })
    .await;
    let uid = api.pod("bin-pod").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let pod_cg = cgroup_root.join(format!("kubepods/besteffort/pod{uid}"));
    let cid = id.strip_prefix("containerd://").unwrap();
    let pid: i32 = std::fs::read_to_string(pod_cg.join(cid).join("cgroup.procs"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        environ(pid).get("FROM_IMAGE").map(String::as_str),
        Some("1")
    );

    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut c = child.0.take().unwrap();
    let status = tokio::task::spawn_blocking(move || c.wait().unwrap())
        .await
        .unwrap();
    let log = std::fs::read_to_string(dir.join("harness.log")).unwrap();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the container is stopped"
    );
    assert!(!pod_cg.exists(), "its cgroup is removed");
    let _ = std::fs::remove_dir(cgroup_root.join("kubepods/besteffort"));
    let _ = std::fs::remove_dir(cgroup_root.join("kubepods"));
    let _ = std::fs::remove_dir(&cgroup_root);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_containers_run_first_and_hand_their_devices_on() {
    let node = TestNode::start(2, Answer::default())
        .await
        .registered()
        .await;
    let marker = node.dir.join("init-ran");
    let mut p = pod(
        "with-init",
        1,
        &format!("test -f {} && exec sleep 60", marker.display()),
    );
    p["spec"]["initContainers"] = json!([{
        "name": "init",
        "image": "busybox",
        "command": ["/bin/sh", "-c", format!("sleep 0.2; touch {}", marker.display())],
        "resources": {"limits": {"nvidia.com/gpu": "1"}},
    }]);
    node.api.create_pod(p);
    running_container(&node, "with-init").await;
    let st = &node.api.pod("with-init").unwrap()["status"];
    assert_eq!(
        st["initContainerStatuses"][0]["state"]["terminated"]["exitCode"],
        0
    );
    // The kubelet hands an init container's devices to the next container rather than taking new ones.
    assert_eq!(
        node.plugin.calls().allocate,
        vec![vec!["dev-0".to_string()], vec!["dev-0".to_string()]]
    );
    // PodResources lists the app container holding them, and, as the kubelet's List does (it walks
    // spec.containers), no ordinary init container.
    let held = node.list_pod_resources().await;
    assert_eq!(
        held[0].2,
        vec![(
            "app".to_string(),
            RESOURCE.to_string(),
            vec!["dev-0".to_string()]
        ),]
    );
    assert_eq!(node.harness().devices.free(RESOURCE), ["dev-1"]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_start_container_is_called_when_the_plugin_asks() {
    let answer = Answer {
        pre_start: true,
        ..Default::default()
    };
    let node = TestNode::start(2, answer).await.registered().await;
    node.api.create_pod(pod("prestarted", 1, "exec sleep 60"));
    node.api.create_pod(pod("no-gpu", 0, "exec sleep 60"));
    running_container(&node, "prestarted").await;
    running_container(&node, "no-gpu").await;
    assert_eq!(
        node.plugin.calls().pre_start,
        vec![vec!["dev-0".to_string()]]
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_mount_namespace_or_cgroup_root_the_env_still_holds_and_delete_still_kills() {
    let target =
        std::env::temp_dir().join(format!("kubelet-harness-unmounted-{}", std::process::id()));
    let answer = Answer {
        mounts: vec![dp::Mount {
            container_path: target.to_str().unwrap().into(),
            host_path: "/etc/hostname".into(),
            read_only: true,
        }],
        ..Default::default()
    };
    let node = TestNode::start_with(1, answer, false, false)
        .await
        .registered()
        .await;
    let mut p = pod("plain", 1, "");
    // A child that outlives a plain kill of the main process: the process group takes it too.
    p["spec"]["containers"][0]["command"] = json!(["sh", "-c", "sleep 61 & exec sleep 60"]);
    node.api.create_pod(p);
    until("plain Running", || {
        (phase(&node.api, "plain")? == "Running").then_some(())
    })
    .await;
    let record = vgpu_integration::kubelet::exec::find_record(
        &node.dir.join("run"),
        "default",
        "plain",
        None,
    )
    .unwrap();
    let pid = record.pid as i32;
    assert_eq!(record.cgroup, None);
    assert_eq!(environ(pid)["NVIDIA_VISIBLE_DEVICES"], "dev-0");
    assert!(
        !environ(pid).contains_key("CARGO"),
        "nothing of the harness's env leaks"
    );
    assert!(
        !target.exists(),
        "no mount target is made when mounts are not applied"
    );
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap(),
        own
    );
    let group_of = |pgid: i32| -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            // SAFETY: getpgid(2) on a pid read from /proc; a pid that exited gives -1.
            .filter(|p| unsafe { libc::getpgid(*p) } == pgid)
            .collect()
    };
    let group = until("both processes of the container's group", || {
        let g = group_of(pid);
        (g.len() == 2).then_some(g)
    })
    .await;

    node.api.delete("pods", "default", "plain").unwrap();
    until("the whole group killed", || {
        group
            .iter()
            .all(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true)
            })
            .then_some(())
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_other_nodes_never_run_here_even_if_the_server_sends_them() {
    let node = TestNode::start(1, Answer::default())
        .await
        .registered()
        .await;
    node.api.ignore_selectors();
    node.api.expire_watches();
    let mut other = pod("elsewhere", 1, "exec sleep 60");
    other["spec"]["nodeName"] = json!("node-b");
    node.api.create_pod(other);
    node.api.create_pod(pod("here", 0, "exec sleep 60"));
    running_container(&node, "here").await;
    assert!(phase(&node.api, "elsewhere").is_none(), "not touched");
    assert!(node.plugin.calls().allocate.is_empty());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_pid_namespace_the_container_is_pid_1_and_keeps_its_env_and_exit_code() {
    let node = TestNode::start_with(1, Answer::default(), true, true)
        .await
        .registered()
        .await;
    // `$$` is the shell's pid as it sees it; /proc is the namespace's own.
    node.api.create_pod(pod(
        "isolated",
        1,
        "echo pid=$$ procs=$(ls /proc | grep -c '^[0-9]') gpu=$NVIDIA_VISIBLE_DEVICES; exit 5",
    ));
    until("isolated Failed", || {
        (phase(&node.api, "isolated")? == "Failed").then_some(())
    })
    .await;
    let st = &node.api.pod("isolated").unwrap()["status"]["containerStatuses"][0];
    assert_eq!(st["state"]["terminated"]["exitCode"], 5);
    let log = std::fs::read_to_string(node.dir.join("run/logs/default_isolated_app.log")).unwrap();
    // Its /proc lists only its own: the shell, the command substitution's subshell, `ls` and `grep`.
    assert_eq!(log, "pid=1 procs=4 gpu=dev-0\n");
    node.stop().await;
}
