//! A restarted agent: a container answered but not yet confirmed by the previous agent is confirmed at start,
//! one revoked stays revoked, and directories of pods gone from the node are removed once stale.

mod node_support;

use std::time::{Duration, SystemTime};

use node_support::*;
use serde_json::json;

const GPU: &str = "GPU-0fc3eda5-e98b-a25b-5b0d-cf5c855d1448";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_previous_agent_answered_is_confirmed_at_start() {
    let id = format!("{GPU}-1");
    let rig = Rig::start_prepared(
        "resume",
        vec![card(GPU, 0)],
        json!({}),
        |root, api, record| {
            // The previous agent answered Allocate for pod a, then died before the kubelet's record confirmed
            // it (so nothing was written to the pod yet).
            let mut a = pod("a", "uid-a", "2026-01-01T00:00:00Z", &[1]);
            seal_placement(&mut a, &format!("{GPU},NVIDIA,4000,30:;"), "100");
            api.put_pod(a);
            let d = root.join(format!("containers/{id}_0000000000000001"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("owner"),
                "uid=uid-a\nnamespace=default\nname=a\ncontainer=c0\n",
            )
            .unwrap();
            std::fs::write(d.join("limits"), "").unwrap();
            std::fs::write(d.join("allocated-ids"), format!("{id}\n")).unwrap();
            // And one it had revoked (in the directory naming of agents before owner records): never turned
            // ready again.
            let mut b = pod("b", "uid-b", "2026-01-01T00:00:01Z", &[1]);
            seal_placement(&mut b, &format!("{GPU},NVIDIA,2000,0:;"), "101");
            api.put_pod(b);
            let d = root.join("containers/uid-b_c0");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("limits"),
                "VGPU_LIMITS_REASON=x\nVGPU_LIMITS_STATE=revoked\n",
            )
            .unwrap();
            std::fs::write(d.join("allocated-ids"), format!("{GPU}-2\n")).unwrap();
            // And one it had confirmed, running with the first 100 ms of each period of the card: its windows
            // are taken back from its limits file, so a's go around them.
            let d = root.join(format!("containers/{GPU}-5_0000000000000002"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("limits"),
                format!("NVIDIA_VISIBLE_DEVICES={GPU}\nCUDA_DEVICE_SM_LIMIT=20\nVGPU_CORE_WINDOWS_0=500:0+100000\nVGPU_LIMITS_STATE=ready\n"),
            )
            .unwrap();
            record.assign("a", "c0", &[&id]);
            record.assign("b", "c0", &[&format!("{GPU}-2")]);
        },
    )
    .await;
    let l = rig.limits_state("uid-a", "c0", "ready").await;
    assert!(
        l.contains("CUDA_DEVICE_MEMORY_LIMIT_0=4000m\n") && l.contains("CUDA_DEVICE_SM_LIMIT=30\n"),
        "{l}"
    );
    assert!(
        l.contains("VGPU_CORE_WINDOWS_0=500:100000+150000\n"),
        "a's windows after the running container's: {l}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rig
        .limits("uid-b", "c0")
        .ends_with("VGPU_LIMITS_STATE=revoked\n"));
    // a counts as answered: a new Allocate is not given a's placement a second time (b, whose earlier
    // answer was revoked, is the one still waiting).
    let r = rig
        .allocate(&[&format!("{GPU}-3")])
        .await
        .expect("b is waiting");
    assert_eq!(r.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "2000m");
    eventually("a recorded", Duration::from_secs(5), || {
        (rig.api.annotation("a", "hami.io/bind-phase").as_deref() == Some("success")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directories_of_pods_gone_from_the_node_are_removed_once_stale() {
    let rig = Rig::start("sweep", vec![card(GPU, 0)], json!({})).await;
    rig.api
        .put_pod(pod("live", "uid-live", "2026-01-01T00:00:00Z", &[1]));
    rig.synced("live").await;
    let root = rig.containers_dir();
    let old = SystemTime::now() - Duration::from_secs(3600);
    let owned = |uid: &str| format!("uid={uid}\nnamespace=default\nname=x\ncontainer=c0\n");
    for name in [
        "uid-live_c0",
        "uid-gone_c0",
        "uid-young_c0",
        "GPU-1-1_0000000000000001",
        "GPU-1-2_0000000000000002",
    ] {
        std::fs::create_dir_all(root.join(name)).unwrap();
        std::fs::write(root.join(name).join("limits"), "").unwrap();
        // Named by the answer, owned by a pod: the owner record decides.
        match name {
            "GPU-1-1_0000000000000001" => {
                std::fs::write(root.join(name).join("owner"), owned("uid-live"))
            }
            "GPU-1-2_0000000000000002" => {
                std::fs::write(root.join(name).join("owner"), owned("uid-gone2"))
            }
            _ => Ok(()),
        }
        .unwrap();
        if name != "uid-young_c0" {
            std::fs::File::open(root.join(name))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
    }
    let mut removed = vgpu_agent::node::recover::sweep(&rig.running.node, SystemTime::now());
    removed.sort();
    assert_eq!(removed, ["GPU-1-2_0000000000000002", "uid-gone_c0"]);
    assert!(root.join("GPU-1-1_0000000000000001").exists());
    assert!(
        root.join("uid-live_c0").exists(),
        "a live pod's directory stays however old"
    );
    assert!(
        root.join("uid-young_c0").exists(),
        "a fresh one stays: the watch may lag"
    );
}
