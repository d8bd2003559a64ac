//! The manifests an admin applies agree with the binary: the extender URL and verbs, the
//! webhook path and port, and kustomize renders them (where kubectl is installed).

use serde_yaml::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/scheduler");

fn doc(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(format!("{DEPLOY}/{file}")).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

#[test]
fn scheduler_configuration_points_at_the_extender_routes() {
    let cm = &doc("scheduler-config.yaml")[0];
    let cfg: Value = serde_yaml::from_str(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(cfg["kind"], "KubeSchedulerConfiguration");
    assert_eq!(cfg["profiles"][0]["schedulerName"], "vgpu-scheduler");
    let ext = &cfg["extenders"][0];
    assert_eq!(ext["urlPrefix"], "http://127.0.0.1:8888");
    assert_eq!(ext["filterVerb"], "filter");
    assert_eq!(ext["bindVerb"], "bind");
    assert_eq!(ext["nodeCacheCapable"], true);
    let managed: Vec<&str> = ext["managedResources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        managed,
        [
            "nvidia.com/gpu",
            "nvidia.com/gpumem",
            "nvidia.com/gpumem-percentage",
            "nvidia.com/gpucores"
        ]
    );

    let dep = &doc("deployment.yaml")[0];
    assert_eq!(
        dep["spec"]["replicas"], 1,
        "reservations are in memory: one replica only"
    );
    let c = &dep["spec"]["template"]["spec"]["containers"][1];
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--extender-listen=127.0.0.1:8888"));
    assert!(args.contains(&"--scheduler-name=vgpu-scheduler"));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");

    let hook = &doc("webhook.yaml")[0];
    assert_eq!(
        hook["webhooks"][0]["clientConfig"]["service"]["path"],
        "/mutate"
    );
    assert_eq!(hook["webhooks"][0]["admissionReviewVersions"][0], "v1");
}

#[test]
fn kustomize_renders_the_manifests() {
    let Ok(out) = std::process::Command::new("kubectl")
        .args(["kustomize", DEPLOY])
        .output()
    else {
        eprintln!("kubectl not installed: skipped");
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: Value = serde::Deserialize::deserialize(d).unwrap();
            format!(
                "{}/{}",
                v["kind"].as_str().unwrap(),
                v["metadata"]["namespace"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert!(
        kinds.contains(&"RoleBinding/kube-system".to_string()),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"Deployment/vgpu-system".to_string()),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"MutatingWebhookConfiguration/-".to_string()),
        "{kinds:?}"
    );
}
