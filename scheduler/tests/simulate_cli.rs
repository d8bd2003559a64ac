//! `vgpu-scheduler simulate` as an admin runs it, on the lab's scenario.

use serde_json::{json, Value};
use std::process::Command;

const LAB: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/examples/lab3-simulate.yaml"
);
const T4: &str = "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039";

fn simulate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vgpu-scheduler"))
        .arg("simulate")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn lab_scenario_as_json() {
    let (ok, stdout, stderr) = simulate(&[LAB, "--json"]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 12);
    let slice = format!("{T4},NVIDIA,4000,0:;");
    for (i, name) in ["gpumem-pod-a", "gpumem-pod-b", "oom-test-pod"]
        .iter()
        .enumerate()
    {
        assert_eq!(rows[i]["pod"], format!("default/{name}"));
        assert_eq!(rows[i]["node"], "hami-workshop");
        assert_eq!(rows[i]["devices"], slice.as_str());
        assert_eq!(rows[i]["reason"], Value::Null);
    }
    // The third fits with 8000 of 15360 MiB reserved: the lab's score, 10 × (2/10 + 8000/15360).
    assert_eq!(format!("{:.2}", rows[2]["score"].as_f64().unwrap()), "7.21");
    assert_eq!(rows[3]["node"], Value::Null);
    assert_eq!(
        rows[3]["reason"],
        "no available node, 1 nodes do not meet: 1 nodes CardInsufficientMemory(hami-workshop)"
    );
    for r in &rows[4..11] {
        assert_eq!(r["node"], "hami-workshop", "{r}");
    }
    assert_eq!(
        rows[11],
        json!({"pod": "default/small-11", "node": null, "devices": null, "score": null,
               "reason": "no available node, 1 nodes do not meet: 1 nodes CardTimeSlicingExhausted(hami-workshop)"})
    );
}

#[test]
fn text_output_and_a_json_list_from_stdin() {
    let (ok, stdout, _) = simulate(&[LAB]);
    assert!(ok);
    assert!(stdout.contains(&format!("default/oom-test-pod: node hami-workshop, devices {T4},NVIDIA,4000,0:; (node score 7.21)")), "{stdout}");
    assert!(
        stdout.ends_with("10 of 12 pending pods placed\n"),
        "{stdout}"
    );

    // kubectl's JSON form, with a running pod whose annotations already reserve 12000 MiB.
    let list = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "annotations": {
            "hami.io/node-nvidia-register": format!("[{{\"id\":\"{T4}\",\"count\":10,\"devmem\":15360,\"devcore\":100,\"type\":\"NVIDIA-Tesla T4\",\"health\":true}}]")}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "running", "namespace": "ml", "annotations": {
            "hami.io/vgpu-node": "n1", "hami.io/vgpu-devices-allocated": format!("{T4},NVIDIA,12000,0:;")}},
         "spec": {"nodeName": "n1", "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "12000"}}}]}, "status": {"phase": "Running"}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "half", "namespace": "ml"},
         "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem-percentage": "50"}}}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "small", "namespace": "ml"},
         "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "3000"}}}]}}
    ]});
    let mut child = Command::new(env!("CARGO_BIN_EXE_vgpu-scheduler"))
        .args(["simulate", "-", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(list.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["pod"], "ml/half");
    assert_eq!(
        v[0]["reason"],
        "no available node, 1 nodes do not meet: 1 nodes CardInsufficientMemory(n1)"
    );
    assert_eq!(v[1]["devices"], format!("{T4},NVIDIA,3000,0:;"));
}

#[test]
fn bad_input_is_reported_clearly() {
    let dir = std::env::temp_dir().join(format!("vgpu-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.yaml");
    std::fs::write(
        &f,
        "kind: List\nitems:\n  - kind: Pod\n    metadata: {name: p}\n",
    )
    .unwrap();
    let (ok, _, stderr) = simulate(&[f.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("holds no Node objects"), "{stderr}");
    let (ok, _, stderr) = simulate(&[LAB, "--node-policy", "binpak"]);
    assert!(!ok);
    assert!(
        stderr.contains("unknown scheduler policy \"binpak\""),
        "{stderr}"
    );
    let (ok, _, stderr) = simulate(&["/nonexistent.yaml"]);
    assert!(!ok);
    assert!(stderr.contains("cannot read /nonexistent.yaml"), "{stderr}");
    std::fs::write(
        &f,
        "kind: Node\nmetadata: {name: n, annotations: {hami.io/node-nvidia-register: '[{'}}\n",
    )
    .unwrap();
    // As serve does, a node whose GPUs cannot be read is skipped with a warning naming why…
    let (ok, stdout, stderr) = simulate(&[f.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.ends_with("0 of 0 pending pods placed\n"), "{stdout}");
    assert!(
        stderr.contains("node n: its GPUs cannot be read")
            && stderr.contains("hami.io/node-nvidia-register")
            && stderr.contains("skipped"),
        "{stderr}"
    );
    // …and --strict stops there instead.
    let (ok, _, stderr) = simulate(&[f.to_str().unwrap(), "--strict"]);
    assert!(!ok);
    assert!(
        stderr.contains("node n") && stderr.contains("hami.io/node-nvidia-register"),
        "{stderr}"
    );
}

/// `kubectl get nodes,pods -A -o yaml` of a real cluster holds objects simulate cannot use (a
/// typo in a register entry, a pod that is not a valid Pod): they are skipped with a warning and
/// the rest is placed, unless --strict.
#[test]
fn unreadable_objects_are_skipped_with_a_warning_unless_strict() {
    let dir = std::env::temp_dir().join(format!("vgpu-sim-skip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("mixed.yaml");
    std::fs::write(
        &f,
        format!(
            r#"kind: List
items:
- kind: Node
  metadata: {{name: good, annotations: {{hami.io/node-nvidia-register: '[{{"id":"{T4}","count":10,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","health":true}}]'}}}}
- kind: Node
  metadata: {{name: typo, annotations: {{hami.io/node-nvidia-register: '[{{"id":"GPU-x","count":10,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","helth":true}}]'}}}}
- kind: Pod
  metadata: {{name: broken}}
  spec: {{containers: 7}}
- kind: Pod
  metadata: {{name: p}}
  spec: {{containers: [{{name: c, resources: {{limits: {{nvidia.com/gpu: 1, nvidia.com/gpumem: 1000}}}}}}]}}
"#
        ),
    )
    .unwrap();
    let (ok, stdout, stderr) = simulate(&[f.to_str().unwrap(), "--json"]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v[0]["node"], "good", "{stdout}");
    assert!(
        stderr.contains("node typo") && stderr.contains("unknown field \"helth\""),
        "the real cause, not CardNotHealth: {stderr}"
    );
    assert!(
        stderr.contains("(Pod broken) is not a valid Pod"),
        "{stderr}"
    );
    let (ok, _, stderr) = simulate(&[f.to_str().unwrap(), "--strict"]);
    assert!(
        !ok && stderr.contains("(Pod broken) is not a valid Pod"),
        "{stderr}"
    );
}

#[test]
fn default_memory_is_configurable() {
    let dir = std::env::temp_dir().join(format!("vgpu-sim-dm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("whole.yaml");
    let lab = std::fs::read_to_string(LAB).unwrap();
    let node = &lab[..lab.find("  # Step 2.").unwrap()];
    let pod = |name: &str| {
        format!("  - {{apiVersion: v1, kind: Pod, metadata: {{name: {name}}}, spec: {{containers: [{{name: c, resources: {{limits: {{nvidia.com/gpu: 1}}}}}}]}}}}\n")
    };
    std::fs::write(&f, format!("{node}{}{}", pod("whole-1"), pod("whole-2"))).unwrap();
    // With no memory named, HAMi's default takes the whole card, and (HAMi ≥ 2.7) all its cores:
    // only the first such pod fits.
    let (ok, stdout, stderr) = simulate(&[f.to_str().unwrap(), "--json"]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        v[0]["devices"],
        format!("{T4},NVIDIA,15360,100:;"),
        "{stdout}"
    );
    assert_eq!(
        v[1]["reason"],
        "no available node, 1 nodes do not meet: 1 nodes CardInsufficientMemory(hami-workshop)"
    );
    // A smaller default memory does not make the card shareable: the pod asked for a whole card.
    let (_, stdout, _) = simulate(&[f.to_str().unwrap(), "--json", "--default-mem", "256"]);
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v[0]["devices"], format!("{T4},NVIDIA,256,100:;"));
    assert_eq!(
        v[1]["reason"],
        "no available node, 1 nodes do not meet: 1 nodes CardInsufficientCore(hami-workshop)"
    );
    let (_, stdout, _) = simulate(&[f.to_str().unwrap(), "--json", "--default-mem", "25%"]);
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v[0]["devices"], format!("{T4},NVIDIA,3840,100:;"));
    let (ok, _, stderr) = simulate(&[f.to_str().unwrap(), "--default-mem", "150%"]);
    assert!(!ok && stderr.contains("percentage of the card"), "{stderr}");
}

/// Every example pod parses, asks for vGPUs the scheduler accepts, and fits on a node of two
/// A100s and a T4 when placed alone.
#[test]
fn example_pods_are_valid_requests() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
    let node = r#"  - apiVersion: v1
    kind: Node
    metadata:
      name: n1
      annotations:
        hami.io/node-nvidia-register: '[{"id":"GPU-a","count":10,"devmem":81920,"devcore":100,"type":"NVIDIA A100-SXM4-80GB","health":true},{"id":"GPU-b","index":1,"count":10,"devmem":81920,"devcore":100,"type":"NVIDIA A100-SXM4-80GB","health":true},{"id":"GPU-t","index":2,"count":10,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","health":true}]'
"#;
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if !name.ends_with("-pod.yaml") && !name.starts_with("gpumem-pod-") {
            continue;
        }
        let pod = std::fs::read_to_string(&path).unwrap();
        let indented: String = pod
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("    {l}\n"))
            .collect();
        let list = format!("apiVersion: v1\nkind: List\nitems:\n{node}  -\n{indented}");
        let f = std::env::temp_dir().join(format!("vgpu-example-{}-{name}", std::process::id()));
        std::fs::write(&f, list).unwrap();
        let (ok, stdout, stderr) = simulate(&[f.to_str().unwrap(), "--json"]);
        std::fs::remove_file(&f).unwrap();
        assert!(ok, "{name}: {stderr}");
        let v: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 1, "{name}: {stdout}");
        assert_eq!(v[0]["node"], "n1", "{name}: {stdout}");
        if name == "two-gpu-a100-pod.yaml" {
            assert_eq!(
                v[0]["devices"], "GPU-b,NVIDIA,8000,25:GPU-a,NVIDIA,8000,25:;",
                "HAMi takes equal cards highest index first"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 7, "all example pods were checked");
}
