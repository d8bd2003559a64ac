//! The manifests an admin applies agree with the binary: the extender URL and verbs, the
//! webhook path and port, and kustomize renders them (where kubectl is installed). And they keep
//! their security promises: the webhooks fail closed on CREATE and UPDATE with nothing a tenant
//! controls able to skip them, and each account holds only the rights its program uses.

use serde_yaml::Value;
use std::collections::BTreeSet;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/scheduler");

fn doc(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(format!("{DEPLOY}/{file}")).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// Every document of every file the kustomization lists.
fn all_docs() -> Vec<Value> {
    let k = &doc("kustomization.yaml")[0];
    k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|f| doc(f.as_str().unwrap()))
        .collect()
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn container<'a>(dep: &'a Value, name: &str) -> &'a Value {
    dep["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
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
    for k in [
        "MutatingWebhookConfiguration/-",
        "ValidatingWebhookConfiguration/-",
        "Secret/vgpu-system",
    ] {
        assert!(kinds.contains(&k.to_string()), "{kinds:?}");
    }
    // The token controller fills the Secret only if its ServiceAccount exists first.
    let pos = |k: &str| kinds.iter().position(|x| x == k).unwrap();
    assert!(pos("ServiceAccount/vgpu-system") < pos("Secret/vgpu-system"));
}

#[test]
fn webhooks_fail_closed_on_create_and_update_and_no_pod_can_switch_them_off() {
    let docs = doc("webhook.yaml");
    let mutating = named(&docs, "MutatingWebhookConfiguration", "vgpu-scheduler");
    let validating = named(&docs, "ValidatingWebhookConfiguration", "vgpu-scheduler");
    let mut covered = BTreeSet::new();
    for (cfg, path) in [(mutating, "/mutate"), (validating, "/validate")] {
        for hook in cfg["webhooks"].as_sequence().unwrap() {
            let name = hook["name"].as_str().unwrap();
            assert_eq!(hook["failurePolicy"], "Fail", "{name} must fail closed");
            assert_eq!(hook["clientConfig"]["service"]["path"], path, "{name}");
            assert_eq!(hook["clientConfig"]["service"]["name"], "vgpu-scheduler");
            assert_eq!(hook["admissionReviewVersions"][0], "v1");
            // A pod's own labels must never decide whether it is checked.
            assert!(
                hook.get("objectSelector").is_none(),
                "{name} has an objectSelector"
            );
            // Only namespaces the cluster needs to restart itself are left out, by the label
            // the API server sets from the name.
            let sel = &hook["namespaceSelector"];
            assert!(sel.get("matchLabels").is_none(), "{name}");
            let exprs = sel["matchExpressions"].as_sequence().unwrap();
            assert_eq!(exprs.len(), 1, "{name}");
            assert_eq!(exprs[0]["key"], "kubernetes.io/metadata.name");
            assert_eq!(exprs[0]["operator"], "NotIn");
            assert_eq!(
                strs(&exprs[0]["values"])
                    .into_iter()
                    .collect::<BTreeSet<_>>(),
                BTreeSet::from(["kube-system", "vgpu-system"])
            );
            // A condition may only look at who asks, never at the object a tenant writes.
            for c in hook["matchConditions"].as_sequence().into_iter().flatten() {
                let e = c["expression"].as_str().unwrap();
                assert_eq!(e, "!('system:nodes' in request.userInfo.groups)", "{name}");
            }
            for rule in hook["rules"].as_sequence().unwrap() {
                assert_eq!(strs(&rule["apiGroups"]), [""]);
                assert!(!strs(&rule["apiVersions"]).contains(&"*"));
                for op in strs(&rule["operations"]) {
                    for res in strs(&rule["resources"]) {
                        let conditional = hook.get("matchConditions").is_some();
                        covered.insert((cfg["kind"].as_str().unwrap(), op, res, conditional));
                    }
                }
            }
        }
    }
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        for op in ["CREATE", "UPDATE"] {
            assert!(
                covered.contains(&(kind, op, "pods", false)),
                "{kind} misses {op} of pods unconditionally: {covered:?}"
            );
        }
    }
    assert!(
        covered.contains(&(
            "ValidatingWebhookConfiguration",
            "UPDATE",
            "pods/status",
            true
        )),
        "{covered:?}"
    );
}

/// Each account, by what its bindings grant: (apiGroup, resource) -> verbs.
fn grants(docs: &[Value], account: &str) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for b in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
    {
        let subjects = b["subjects"].as_sequence().unwrap();
        if !subjects
            .iter()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"] == account)
        {
            continue;
        }
        let role = b["roleRef"]["name"].as_str().unwrap();
        if role.starts_with("system:") || role == "extension-apiserver-authentication-reader" {
            // Built into Kubernetes: named, not listed here.
            out.insert((
                "builtin".into(),
                role.into(),
                b["kind"].as_str().unwrap().into(),
            ));
            continue;
        }
        let r = named(docs, b["roleRef"]["kind"].as_str().unwrap(), role);
        for rule in r["rules"].as_sequence().unwrap() {
            for g in strs(&rule["apiGroups"]) {
                for res in strs(&rule["resources"]) {
                    for v in strs(&rule["verbs"]) {
                        out.insert((g.into(), res.into(), v.into()));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn each_account_holds_only_the_rights_its_program_uses() {
    let docs = all_docs();
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        for rule in d["rules"].as_sequence().unwrap() {
            for field in ["apiGroups", "resources", "verbs"] {
                assert!(
                    !strs(&rule[field]).iter().any(|s| s.contains('*')),
                    "{}: a wildcard in {field}",
                    d["metadata"]["name"].as_str().unwrap()
                );
            }
            assert!(rule.get("nonResourceURLs").is_none());
        }
    }
    let t = |g: &str, r: &str, v: &str| (g.to_string(), r.to_string(), v.to_string());
    let extender: BTreeSet<_> = [
        t("", "nodes", "get"),
        t("", "nodes", "list"),
        t("", "nodes", "watch"),
        t("", "pods", "get"),
        t("", "pods", "list"),
        t("", "pods", "watch"),
        t("", "pods", "patch"),
        t("", "pods/binding", "create"),
        t("", "events", "create"),
    ]
    .into();
    assert_eq!(grants(&docs, "vgpu-scheduler"), extender);
    let kube_scheduler: BTreeSet<_> = [
        t("builtin", "system:kube-scheduler", "ClusterRoleBinding"),
        t("builtin", "system:volume-scheduler", "ClusterRoleBinding"),
        t(
            "builtin",
            "extension-apiserver-authentication-reader",
            "RoleBinding",
        ),
    ]
    .into();
    assert_eq!(grants(&docs, "vgpu-kube-scheduler"), kube_scheduler);
    for sa in docs.iter().filter(|d| d["kind"] == "ServiceAccount") {
        assert_eq!(
            sa["automountServiceAccountToken"], false,
            "{:?}: tokens are mounted only where they are used",
            sa["metadata"]["name"]
        );
    }
}

#[test]
fn kube_scheduler_and_the_extender_run_under_different_accounts() {
    let docs = all_docs();
    let dep = named(&docs, "Deployment", "vgpu-scheduler");
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "vgpu-scheduler");
    assert_eq!(
        pod["automountServiceAccountToken"], false,
        "the pod's token would reach every container"
    );
    // With a shared process namespace each container could read the other's token through /proc.
    assert_ne!(pod["shareProcessNamespace"], true);
    let volume = |name: &str| {
        pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let mounts = |c: &Value| -> Vec<(String, String)> {
        c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap().to_string(),
                    m["mountPath"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let projects_pod_token = |v: &Value| {
        v["projected"]["sources"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|s| s.get("serviceAccountToken").is_some())
    };

    let ext = container(dep, "vgpu-scheduler");
    let ext_mounts = mounts(ext);
    let token_mount = ext_mounts
        .iter()
        .find(|(n, _)| projects_pod_token(volume(n)))
        .expect("the extender mounts the pod's projected token");
    assert_eq!(
        token_mount.1,
        "/var/run/secrets/kubernetes.io/serviceaccount"
    );

    let ks = container(dep, "kube-scheduler");
    for (name, _) in mounts(ks) {
        assert!(
            !projects_pod_token(volume(&name)),
            "kube-scheduler mounts the extender's token through {name}"
        );
    }
    // kube-scheduler's token is vgpu-kube-scheduler's, and its kubeconfig reads it where the
    // Secret is mounted.
    let secret = named(&docs, "Secret", "vgpu-kube-scheduler-token");
    assert_eq!(secret["type"], "kubernetes.io/service-account-token");
    assert_eq!(
        secret["metadata"]["annotations"]["kubernetes.io/service-account.name"],
        "vgpu-kube-scheduler"
    );
    let (_, secret_path) = mounts(ks)
        .into_iter()
        .find(|(n, _)| volume(n)["secret"]["secretName"] == "vgpu-kube-scheduler-token")
        .expect("kube-scheduler mounts its token Secret");
    let (_, cfg_path) = mounts(ks)
        .into_iter()
        .find(|(n, _)| volume(n)["configMap"]["name"] == "vgpu-kube-scheduler-kubeconfig")
        .expect("kube-scheduler mounts its kubeconfig");
    let kubeconfig: Value = serde_yaml::from_str(
        named(&docs, "ConfigMap", "vgpu-kube-scheduler-kubeconfig")["data"]["kubeconfig"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        kubeconfig["users"][0]["user"]["tokenFile"],
        format!("{secret_path}/token").as_str()
    );
    assert_eq!(
        kubeconfig["clusters"][0]["cluster"]["certificate-authority"],
        format!("{secret_path}/ca.crt").as_str()
    );
    let cm = named(&docs, "ConfigMap", "vgpu-scheduler-config");
    let cfg: Value = serde_yaml::from_str(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let kubeconfig_path = format!("{cfg_path}/kubeconfig");
    assert_eq!(
        cfg["clientConnection"]["kubeconfig"],
        kubeconfig_path.as_str()
    );
    let args = strs(&ks["command"]);
    for flag in ["--authentication-kubeconfig", "--authorization-kubeconfig"] {
        assert!(
            args.contains(&format!("{flag}={kubeconfig_path}").as_str()),
            "{args:?}"
        );
    }
}

/// The webhook trusts the usernames its flags give: they must be the accounts the manifests
/// create, or the scheduler's own bind would be refused.
#[test]
fn the_webhook_trusts_the_scheduler_account_the_manifests_create() {
    let docs = all_docs();
    let dep = named(&docs, "Deployment", "vgpu-scheduler");
    let args = strs(&container(dep, "vgpu-scheduler")["args"]);
    let flag = |f: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{f}=")))
            .unwrap_or_else(|| panic!("no --{f} in {args:?}"))
            .to_string()
    };
    let ns = dep["metadata"]["namespace"].as_str().unwrap();
    let sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    assert_eq!(
        flag("scheduler-user"),
        format!("system:serviceaccount:{ns}:{sa}")
    );
    assert_eq!(
        flag("agent-user"),
        "system:serviceaccount:vgpu-system:vgpu-agent"
    );
}
