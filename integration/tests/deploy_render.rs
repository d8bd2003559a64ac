//! The one apply (`kubectl apply -k deploy/`), checked offline: kustomize renders it, every object
//! validates against the schemas of the supported Kubernetes versions (kubernetes-validate), and
//! the rendered DaemonSet mounts every path the agent and its Allocate use. Also the images'
//! recipes name what the manifests run, and the Grafana dashboard queries metrics the parts export.
//!
//! kubectl and kubernetes-validate come from scripts/setup.sh; without them these tests skip, except
//! under VGPU_REQUIRE_DEPLOY_TOOLS=1 (scripts/test.sh sets it) where a missing tool fails them.

use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Kubernetes versions vgpu supports, each validated strictly (docs/install.md says the same).
const SUPPORTED: [&str; 4] = ["1.32.0", "1.33.0", "1.34.0", "1.35.0"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// Whether `check` (a shell command) finds the tool `name`.
fn tool_by(name: &str, check: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", check])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("VGPU_REQUIRE_DEPLOY_TOOLS").as_deref() != Ok("1"),
            "{name} is not installed; scripts/setup.sh installs it"
        );
        eprintln!("{name} not installed: skipped");
    }
    found
}

fn tool(name: &str) -> bool {
    tool_by(name, &format!("command -v {name}"))
}

/// kubernetes-validate, run as a Python module (pip may put its script off PATH).
fn validator() -> bool {
    tool_by(
        "kubernetes-validate",
        "python3 -c 'import kubernetes_validate'",
    )
}

fn kustomize(dir: &str) -> String {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(repo().join(dir))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// The rendered one apply, or None where kubectl is missing (and allowed to be).
fn rendered() -> Option<Vec<Value>> {
    tool("kubectl").then(|| docs(&kustomize("deploy")))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(s)
        .collect()
}

fn seq(v: &Value) -> &Vec<Value> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn by_name<'a>(list: &'a Value, name: &str) -> &'a Value {
    seq(list)
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list:?}"))
}

/// kubernetes-validate on `text` for one version: (success, what it said).
fn validate(text: &str, version: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("vgpu-deploy-render-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("rendered-{version}.yaml"));
    std::fs::write(&file, text).unwrap();
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "-k",
            version,
        ])
        .arg(&file)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn every_rendered_object_validates_against_the_supported_kubernetes_versions() {
    if !tool("kubectl") || !validator() {
        return;
    }
    let text = kustomize("deploy");
    for v in SUPPORTED {
        let (ok, said) = validate(&text, v);
        assert!(ok, "deploy/ against Kubernetes {v}:\n{said}");
        assert!(!said.contains("Couldn't find schema"), "{v}: {said}");
    }
    // The validator is strict, not a formality: one misspelt field fails the whole render.
    let broken = text.replacen("hostPID: true", "hostPid: true", 1);
    assert_ne!(broken, text);
    let (ok, said) = validate(&broken, SUPPORTED[0]);
    assert!(!ok && said.contains("hostPid"), "{said}");

    // With cert-manager: the same, plus cert-manager's two kinds, which no Kubernetes schema has.
    let cm = kustomize("deploy/with-cert-manager");
    for v in SUPPORTED {
        let (ok, said) = validate(&cm, v);
        assert!(ok, "deploy/with-cert-manager against {v}:\n{said}");
        let unknown: BTreeSet<&str> = said
            .lines()
            .filter_map(|l| l.split("Couldn't find schema for kind ").nth(1))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(
            unknown.is_subset(&BTreeSet::from(["Certificate", "Issuer"])),
            "{unknown:?}"
        );
    }
}

#[test]
fn one_apply_installs_each_part_once_in_its_namespace() {
    let Some(docs) = rendered() else { return };
    let mut seen = BTreeSet::new();
    for d in &docs {
        let id = (
            s(&d["kind"]).to_string(),
            d["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            s(&d["metadata"]["name"]).to_string(),
        );
        assert!(seen.insert(id.clone()), "{id:?} twice");
        let cluster_scoped = [
            "Namespace",
            "ClusterRole",
            "ClusterRoleBinding",
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
        ]
        .contains(&id.0.as_str());
        match (cluster_scoped, id.1.as_str()) {
            (true, ns) => assert_eq!(ns, "", "{id:?}"),
            // kube-scheduler reads the client-CA ConfigMap there.
            (false, "kube-system") => assert_eq!(id.0, "RoleBinding", "{id:?}"),
            (false, ns) => assert_eq!(ns, "vgpu-system", "{id:?}"),
        }
        assert_eq!(
            d["metadata"]["labels"]["app.kubernetes.io/part-of"], "vgpu",
            "{id:?}"
        );
    }
    let namespaces: Vec<_> = docs.iter().filter(|d| d["kind"] == "Namespace").collect();
    assert_eq!(namespaces.len(), 1);
    assert_eq!(namespaces[0]["metadata"]["name"], "vgpu-system");
    // The agent is privileged with host paths: Pod Security Admission must let it in.
    assert_eq!(
        namespaces[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    for (kind, name) in [
        ("DaemonSet", "vgpu-agent"),
        ("Deployment", "vgpu-scheduler"),
        ("Job", "vgpu-bootstrap"),
        ("ConfigMap", "vgpu-config"),
        ("MutatingWebhookConfiguration", "vgpu-scheduler"),
        ("ValidatingWebhookConfiguration", "vgpu-scheduler"),
    ] {
        named(&docs, kind, name);
    }
    // Metrics Services: the agents' (HAMi's node monitor port) and the scheduler's.
    let metrics_port = |svc: &str| -> (i64, String) {
        let svc = named(&docs, "Service", svc);
        let p = by_name(&svc["spec"]["ports"], "metrics");
        (p["port"].as_i64().unwrap(), s(&p["targetPort"]).into())
    };
    assert_eq!(metrics_port("vgpu-agent-metrics"), (9394, "metrics".into()));
    assert_eq!(
        named(&docs, "Service", "vgpu-agent-metrics")["spec"]["clusterIP"],
        "None",
        "one endpoint per agent"
    );
    assert_eq!(metrics_port("vgpu-scheduler"), (9395, "metrics".into()));
    // Secrets the pods mount are made at install, not shipped: no key or certificate in the render.
    for d in docs.iter().filter(|d| d["kind"] == "Secret") {
        assert_eq!(d["type"], "kubernetes.io/service-account-token", "{d:?}");
    }

    // deploy/with-cert-manager/ lists the same parts: the same objects but for what cert-manager
    // changes.
    let cm = docs_of("deploy/with-cert-manager");
    let ids = |d: &[Value]| -> BTreeSet<String> {
        d.iter()
            .filter(|d| !s(&d["apiVersion"]).starts_with("cert-manager.io/"))
            .map(|d| format!("{}/{}", s(&d["kind"]), s(&d["metadata"]["name"])))
            .collect()
    };
    assert_eq!(ids(&docs), ids(&cm));
    let job_env = |d: &[Value]| {
        let job = named(d, "Job", "vgpu-bootstrap");
        let c = &job["spec"]["template"]["spec"]["containers"][0];
        s(&by_name(&c["env"], "VGPU_BOOTSTRAP_CERT")["value"]).to_string()
    };
    assert_eq!(job_env(&docs), "self-signed");
    assert_eq!(job_env(&cm), "cert-manager");
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        let w = named(&cm, kind, "vgpu-scheduler");
        assert_eq!(
            w["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
            "vgpu-system/vgpu-scheduler-tls"
        );
        let cert = named(&cm, "Certificate", "vgpu-scheduler-tls");
        assert_eq!(cert["spec"]["secretName"], "vgpu-scheduler-tls");
    }
}

fn docs_of(dir: &str) -> Vec<Value> {
    docs(&kustomize(dir))
}

/// The agent container's flags as `--name` -> value.
fn flags(c: &Value) -> BTreeMap<String, String> {
    strs(&c["args"])
        .iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| match a.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (a.to_string(), String::new()),
        })
        .collect()
}

struct Mount {
    path: String,
    host: Option<String>,
    secret: Option<String>,
    config_map: Option<String>,
    read_only: bool,
    propagation: String,
    volume: Value,
}

fn mounts(pod: &Value, c: &Value) -> Vec<Mount> {
    seq(&c["volumeMounts"])
        .iter()
        .map(|m| {
            let v = by_name(&pod["volumes"], s(&m["name"]));
            Mount {
                path: s(&m["mountPath"]).into(),
                host: v["hostPath"]["path"].as_str().map(Into::into),
                secret: v["secret"]["secretName"].as_str().map(Into::into),
                config_map: v["configMap"]["name"].as_str().map(Into::into),
                read_only: m["readOnly"] == true,
                propagation: m["mountPropagation"].as_str().unwrap_or("None").into(),
                volume: v.clone(),
            }
        })
        .collect()
}

/// The mount whose path holds `p` (the deepest one), if any.
fn holding<'a>(ms: &'a [Mount], p: &str) -> Option<&'a Mount> {
    ms.iter()
        .filter(|m| Path::new(p).starts_with(&m.path))
        .max_by_key(|m| m.path.len())
}

#[test]
fn the_daemonset_mounts_every_path_the_agent_and_allocate_use() {
    let Some(docs) = rendered() else { return };
    let ds = named(&docs, "DaemonSet", "vgpu-agent");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = by_name(&pod["containers"], "agent");
    let f = flags(agent);
    assert_eq!(s(&agent["args"][0]), "run");
    assert!(!f.contains_key("standalone"), "Kubernetes mode: {f:?}");
    assert_eq!(f["policy"], "enforce");
    let ms = mounts(pod, agent);

    // Paths the agent hands to the kubelet or shares with tenant containers: a hostPath mounted at
    // the same path, writable (the agent creates files there).
    for flag in [
        "device-plugin-dir",
        "containers-dir",
        "shim-lib",
        "card-dir",
        "cache-dir",
    ] {
        let p = &f[flag];
        let m = holding(&ms, p).unwrap_or_else(|| panic!("--{flag}={p} is not mounted"));
        assert_eq!(
            m.host.as_deref(),
            Some(m.path.as_str()),
            "--{flag}={p}: Allocate hands the kubelet host paths, so {} must be the host's {}",
            m.path,
            m.path
        );
        assert!(!m.read_only, "--{flag}={p}");
    }
    // Allocate's card directory is the contract's, on the host (/var/run is /run there).
    assert_eq!(
        Path::new("/var/run").join(Path::new(&f["card-dir"]).strip_prefix("/run").unwrap()),
        Path::new(vgpu_contract::env::DEFAULT_CARD_DIR)
    );
    // The agent's own state: on the host, so a restarted agent finds it.
    for flag in [
        "socket",
        "bind-socket",
        "state-file",
        "pod-resources-socket",
    ] {
        let p = &f[flag];
        let m = holding(&ms, p).unwrap_or_else(|| panic!("--{flag}={p} is not mounted"));
        assert!(m.host.is_some(), "--{flag}={p} is not on the host");
    }
    assert_eq!(
        holding(&ms, &f["pod-resources-socket"])
            .unwrap()
            .host
            .as_deref(),
        Some("/var/lib/kubelet/pod-resources")
    );
    // Pins on the host's bpffs, shared both ways so pins made inside are the host's.
    let bpf = holding(&ms, &f["pin-dir"]).expect("--pin-dir is not mounted");
    assert_eq!(bpf.host.as_deref(), Some("/sys/fs/bpf"));
    assert_eq!(bpf.propagation, "Bidirectional");
    let cg = holding(&ms, "/sys/fs/cgroup").expect("cgroup2 not mounted");
    assert_eq!(cg.host.as_deref(), Some("/sys/fs/cgroup"));
    assert!(cg.read_only);
    // The seal key is the scheduler's: the same Secret and key.
    let seal = holding(&ms, &f["seal-key-file"]).expect("--seal-key-file is not mounted");
    assert_eq!(seal.secret.as_deref(), Some("vgpu-seal-key"));
    assert!(seal.read_only);
    let key_path = Path::new(&f["seal-key-file"])
        .strip_prefix(&seal.path)
        .unwrap();
    let item = seq(&seal.volume["secret"]["items"])
        .iter()
        .find(|i| Path::new(s(&i["path"])) == key_path)
        .expect("the key file is an item of the Secret");
    assert_eq!(item["key"], "key");
    // The node knobs come from vgpu-config, under a key the ConfigMap has, with HAMi's names.
    let cfg = holding(&ms, &f["config"]).expect("--config is not mounted");
    assert_eq!(cfg.config_map.as_deref(), Some("vgpu-config"));
    let key = Path::new(&f["config"]).strip_prefix(&cfg.path).unwrap();
    let cm = named(&docs, "ConfigMap", "vgpu-config");
    let knobs: Value =
        serde_yaml::from_str(s(&cm["data"][key.to_str().unwrap()])).expect("agent.yaml");
    let names: BTreeSet<&str> = knobs
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "deviceSplitCount",
            "deviceMemoryScaling",
            "deviceCoreScaling"
        ])
    );

    // The driver's libraries, on every common layout, reached through one read-only host mount that
    // creates nothing on the host and sees the GPU Operator's late mount.
    let host = holding(&ms, "/host/usr/lib64").expect("/host is not mounted");
    assert_eq!(host.path, "/host");
    assert_eq!(host.host.as_deref(), Some("/"));
    assert!(host.read_only);
    assert_eq!(host.propagation, "HostToContainer");
    assert_eq!(host.volume["hostPath"]["type"], "Directory");
    let script =
        std::fs::read_to_string(repo().join("deploy/images/vgpu-prepare-host.sh")).unwrap();
    // (driver root, library directory): the GPU Operator's root, and the host's own.
    for layout in [
        "run/nvidia/driver:usr/lib/x86_64-linux-gnu",
        ":usr/lib/x86_64-linux-gnu",
        ":usr/lib64",
        ":usr/local/nvidia/lib64",
    ] {
        assert!(script.contains(layout), "prepare-host misses {layout}");
    }
    // ...and NVML is found where prepare-host links it.
    let env = &agent["env"];
    let ld = s(&by_name(env, "LD_LIBRARY_PATH")["value"]);
    let links = holding(&ms, ld).expect("LD_LIBRARY_PATH is not mounted");
    assert!(links.volume.get("emptyDir").is_some());
    assert!(script.contains(&format!("LINKS=\"$R{ld}\"")), "{ld}");
    // The driver's libcuda is probed from the start, from the link prepare-host makes beside NVML.
    assert_eq!(Path::new(&f["libcuda"]), Path::new(ld).join("libcuda.so.1"));
    assert!(script.contains("ln -s \"${cuda#\"$R\"}\" \"$LINKS/libcuda.so.1\""));
    // No hostPath other than these (each is a promise to the node's admin).
    let hosts: BTreeSet<&str> = seq(&pod["volumes"])
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(
        hosts,
        BTreeSet::from([
            "/",
            "/run/vgpu",
            "/sys/fs/bpf",
            "/sys/fs/cgroup",
            "/usr/local/vgpu",
            "/var/lib/kubelet/device-plugins",
            "/var/lib/kubelet/pod-resources",
        ])
    );

    // prepare-host puts the shim where --shim-lib says and makes the card directory, both on the
    // host paths the agent's mounts name.
    let init = by_name(&pod["initContainers"], "prepare-host");
    assert_eq!(strs(&init["command"]), ["/usr/local/bin/vgpu-prepare-host"]);
    let init_ms = mounts(pod, init);
    for p in [&f["shim-lib"], &f["card-dir"], &format!("{ld}/x")] {
        let m = holding(&init_ms, p).unwrap_or_else(|| panic!("prepare-host cannot write {p}"));
        assert!(!m.read_only, "{p}");
        assert_eq!(
            m.volume,
            holding(&ms, p).unwrap().volume,
            "{p}: not the agent's volume"
        );
    }
    assert!(script.contains("HOST_VGPU=\"$R/usr/local/vgpu\""));
    assert_eq!(f["shim-lib"], "/usr/local/vgpu/libvgpu.so");
    assert!(script.contains(&format!("CARDS=\"$R{}\"", f["card-dir"])));

    // What the node side needs of the pod itself.
    assert_eq!(pod["hostPID"], true);
    assert_eq!(agent["securityContext"]["privileged"], true);
    assert_eq!(pod["serviceAccountName"], "vgpu-agent");
    assert_eq!(pod["automountServiceAccountToken"], true);
    assert_eq!(
        by_name(env, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let port = by_name(&agent["ports"], "metrics")["containerPort"]
        .as_i64()
        .unwrap();
    assert!(f["metrics-addr"].ends_with(&format!(":{port}")));
}

/// Each account's rules: (apiGroup, resource, verb, resourceNames).
fn grants(docs: &[Value], account: &str) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for b in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
    {
        if !seq(&b["subjects"])
            .iter()
            .any(|x| x["kind"] == "ServiceAccount" && x["name"] == account)
        {
            continue;
        }
        let role = named(docs, s(&b["roleRef"]["kind"]), s(&b["roleRef"]["name"]));
        for r in seq(&role["rules"]) {
            let names = r
                .get("resourceNames")
                .map(|n| strs(n).join(","))
                .unwrap_or_default();
            for g in strs(&r["apiGroups"]) {
                for res in strs(&r["resources"]) {
                    for v in strs(&r["verbs"]) {
                        out.insert((g.into(), res.into(), v.into(), names.clone()));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn the_agent_and_the_bootstrap_hold_only_the_rights_they_use() {
    let Some(docs) = rendered() else { return };
    let t = |g: &str, r: &str, v: &str, n: &str| (g.into(), r.into(), v.into(), n.into());
    assert_eq!(
        grants(&docs, "vgpu-agent"),
        BTreeSet::from([
            t("", "nodes", "get", ""),
            t("", "nodes", "patch", ""),
            t("", "pods", "get", ""),
            t("", "pods", "list", ""),
            t("", "pods", "watch", ""),
            t("", "pods", "patch", ""),
            t("", "events", "create", ""),
        ])
    );
    let hooks = "admissionregistration.k8s.io";
    assert_eq!(
        grants(&docs, "vgpu-bootstrap"),
        BTreeSet::from([
            t("", "secrets", "get", "vgpu-seal-key,vgpu-scheduler-tls"),
            t("", "secrets", "create", ""),
            t(
                hooks,
                "mutatingwebhookconfigurations",
                "get",
                "vgpu-scheduler"
            ),
            t(
                hooks,
                "mutatingwebhookconfigurations",
                "patch",
                "vgpu-scheduler"
            ),
            t(
                hooks,
                "validatingwebhookconfigurations",
                "get",
                "vgpu-scheduler"
            ),
            t(
                hooks,
                "validatingwebhookconfigurations",
                "patch",
                "vgpu-scheduler"
            ),
        ])
    );
    // The bootstrap's Secret rights are in vgpu-system only.
    let rb = named(&docs, "RoleBinding", "vgpu-bootstrap");
    assert_eq!(rb["metadata"]["namespace"], "vgpu-system");
    // The webhook trusts the agent's writes by the account the DaemonSet runs as.
    let ds = named(&docs, "DaemonSet", "vgpu-agent");
    let dep = named(&docs, "Deployment", "vgpu-scheduler");
    let ext = by_name(
        &dep["spec"]["template"]["spec"]["containers"],
        "vgpu-scheduler",
    );
    let f = flags(ext);
    assert_eq!(
        f["agent-user"],
        format!(
            "system:serviceaccount:{}:{}",
            s(&ds["metadata"]["namespace"]),
            s(&ds["spec"]["template"]["spec"]["serviceAccountName"])
        )
    );
    // Tokens only where a pod asks for them.
    for sa in docs.iter().filter(|d| d["kind"] == "ServiceAccount") {
        assert_eq!(sa["automountServiceAccountToken"], false, "{sa:?}");
    }
}

#[test]
fn the_scheduler_takes_its_knobs_from_vgpu_config_and_shares_the_seal_key() {
    let Some(docs) = rendered() else { return };
    let cm = named(&docs, "ConfigMap", "vgpu-config");
    let data = cm["data"].as_mapping().unwrap();
    for k in [
        "defaultMem",
        "defaultCores",
        "nodeSchedulerPolicy",
        "gpuSchedulerPolicy",
        "agent.yaml",
    ] {
        assert!(data.contains_key(k), "vgpu-config has no {k}");
    }
    let dep = named(&docs, "Deployment", "vgpu-scheduler");
    let pod = &dep["spec"]["template"]["spec"];
    let ext = by_name(&pod["containers"], "vgpu-scheduler");
    // Every $(VAR) in the args is an env var from a vgpu-config key that exists: the kubelet leaves
    // an undefined one as the literal text, which the scheduler would then refuse at start.
    let env = &ext["env"];
    let mut used = BTreeSet::new();
    for a in strs(&ext["args"]) {
        let Some((flag, rest)) = a.split_once("=$(") else {
            continue;
        };
        let var = rest.strip_suffix(')').unwrap();
        let from = &by_name(env, var)["valueFrom"]["configMapKeyRef"];
        assert_eq!(from["name"], "vgpu-config", "{a}");
        let key = s(&from["key"]);
        let value = s(&cm["data"][key]);
        used.insert(key);
        match flag {
            "--node-policy" | "--gpu-policy" => {
                assert!(["binpack", "spread"].contains(&value), "{key}: {value}")
            }
            "--default-mem" => assert!(
                value
                    .strip_suffix('%')
                    .unwrap_or(value)
                    .parse::<u32>()
                    .is_ok(),
                "{key}: {value}"
            ),
            "--default-cores" => assert!(
                value.parse::<u32>().is_ok_and(|c| c <= 100),
                "{key}: {value}"
            ),
            other => panic!("{other} takes a vgpu-config key the test does not know"),
        }
    }
    assert_eq!(
        used,
        BTreeSet::from([
            "defaultMem",
            "defaultCores",
            "nodeSchedulerPolicy",
            "gpuSchedulerPolicy"
        ])
    );
    // The same seal key as the agents.
    let f = flags(ext);
    let ms = mounts(pod, ext);
    let seal = holding(&ms, &f["seal-key-file"]).expect("--seal-key-file is not mounted");
    assert_eq!(seal.secret.as_deref(), Some("vgpu-seal-key"));
    let tls = holding(&ms, &f["tls-cert"]).expect("--tls-cert is not mounted");
    assert_eq!(tls.secret.as_deref(), Some("vgpu-scheduler-tls"));
}

#[test]
fn the_images_carry_what_the_manifests_run() {
    let read = |f: &str| std::fs::read_to_string(repo().join("deploy/images").join(f)).unwrap();
    let agent = read("agent.Dockerfile");
    let scheduler = read("scheduler.Dockerfile");
    // Runtime stages copy (source in the build stage or the repo) to these paths.
    let copies = |df: &str| -> BTreeSet<String> {
        df.lines()
            .filter_map(|l| l.strip_prefix("COPY "))
            .filter_map(|l| l.split_whitespace().last().map(String::from))
            .collect()
    };
    let a = copies(&agent);
    for p in [
        "/usr/local/bin/vgpu-agent",
        "/usr/local/bin/vgpu-prepare-host",
        "/opt/vgpu/lib/libvgpu.so",
    ] {
        assert!(a.contains(p), "agent image lacks {p}: {a:?}");
    }
    let sc = copies(&scheduler);
    for p in [
        "/usr/local/bin/vgpu-scheduler",
        "/usr/local/bin/vgpu-bootstrap",
    ] {
        assert!(sc.contains(p), "scheduler image lacks {p}: {sc:?}");
    }
    // Both build with the toolchain CI pins.
    let pinned = std::fs::read_to_string(repo().join("rust-toolchain.toml")).unwrap();
    let channel = pinned
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    for df in [&agent, &scheduler] {
        assert!(
            df.contains(&format!("rust:{channel}")),
            "not on Rust {channel}"
        );
    }
    let Some(docs) = rendered() else { return };
    let ds = named(&docs, "DaemonSet", "vgpu-agent");
    let init = by_name(
        &ds["spec"]["template"]["spec"]["initContainers"],
        "prepare-host",
    );
    assert!(a.contains(s(&init["command"][0])));
    let job = named(&docs, "Job", "vgpu-bootstrap");
    let c = &job["spec"]["template"]["spec"]["containers"][0];
    assert!(sc.contains(s(&c["command"][0])));
    assert!(s(&c["image"]).contains("vgpu-scheduler"));
}

#[test]
fn the_dashboard_queries_only_metrics_the_agent_and_scheduler_export() {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/vgpu-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(dash["title"].is_string());
    let exported = ["agent/src/observe/metrics.rs", "scheduler/src/metrics.rs"]
        .map(|f| std::fs::read_to_string(repo().join(f)).unwrap())
        .join("\n");
    let mut exprs = vec![];
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 8, "{exprs:?}");
    let mut names = BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find(|c: char| c.is_ascii_lowercase()) {
            rest = &rest[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let word = &rest[..end];
            if word.starts_with("hami_") || word.starts_with("vgpu_") {
                names.insert(word.to_string());
            }
            rest = &rest[end..];
        }
    }
    for n in &names {
        assert!(
            exported.contains(&format!("\"{n}\"")),
            "the dashboard queries {n}, which neither part exports"
        );
    }
    // Reservations and use side by side (HAMI-NOTES failure 10): both parts are on it.
    assert!(names
        .iter()
        .any(|n| n.starts_with("hami_vgpu_memory_allocated")));
    assert!(names.contains("hami_vgpu_memory_used_bytes"));
}

/// A stand-in API server for vgpu-bootstrap: Secrets in vgpu-system and the two webhook
/// configurations, with GET, POST (create) and PATCH (JSON patch), over plain HTTP on loopback.
mod fake_api {
    use serde_json::{json, Value};
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    pub const TOKEN: &str = "bootstrap-test-token";
    const SECRETS: &str = "/api/v1/namespaces/vgpu-system/secrets";

    #[derive(Default)]
    pub struct State {
        pub objects: BTreeMap<String, Value>,
        /// (method, path) of every request, in order.
        pub log: Vec<(String, String)>,
        /// Paths answered with this status instead (a hostile API server).
        pub fail: BTreeMap<String, u16>,
    }

    pub fn start(state: Arc<Mutex<State>>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or("").to_string();
                let path = parts.next().unwrap_or("").to_string();
                let (mut len, mut auth) = (0, String::new());
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    match k.to_ascii_lowercase().as_str() {
                        "content-length" => len = v.trim().parse().unwrap(),
                        "authorization" => auth = v.trim().to_string(),
                        _ => {}
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let (code, answer) = if auth != format!("Bearer {TOKEN}") {
                    (401, json!({"kind": "Status", "code": 401}))
                } else {
                    handle(&mut state.lock().unwrap(), &method, &path, &body)
                };
                let text = answer.to_string();
                let _ = write!(
                    conn,
                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        addr
    }

    fn handle(s: &mut State, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        s.log.push((method.into(), path.into()));
        if let Some(code) = s.fail.get(path) {
            return (*code, json!({"kind": "Status", "code": code}));
        }
        let not_found = (404, json!({"kind": "Status", "code": 404}));
        match method {
            "GET" => match s.objects.get(path) {
                Some(o) => (200, o.clone()),
                None => not_found,
            },
            "POST" if path == SECRETS => {
                let o: Value = serde_json::from_slice(body).unwrap();
                let at = format!("{SECRETS}/{}", o["metadata"]["name"].as_str().unwrap());
                if s.objects.contains_key(&at) {
                    return (409, json!({"kind": "Status", "code": 409}));
                }
                s.objects.insert(at, o.clone());
                (201, o)
            }
            "PATCH" => {
                let Some(o) = s.objects.get_mut(path) else {
                    return not_found;
                };
                let p: json_patch::Patch = serde_json::from_slice(body).unwrap();
                let mut next = o.clone();
                match json_patch::patch(&mut next, &p) {
                    Ok(()) => {
                        *o = next.clone();
                        (200, next)
                    }
                    Err(e) => (422, json!({"kind": "Status", "message": e.to_string()})),
                }
            }
            _ => (405, json!({})),
        }
    }
}

struct Bootstrap {
    state: std::sync::Arc<std::sync::Mutex<fake_api::State>>,
    api: String,
    dir: PathBuf,
}

impl Bootstrap {
    /// The API server holding the rendered webhook configurations, as after `kubectl apply`.
    fn new(docs: &[Value], tag: &str) -> Self {
        let mut st = fake_api::State::default();
        for (kind, res) in [
            (
                "MutatingWebhookConfiguration",
                "mutatingwebhookconfigurations",
            ),
            (
                "ValidatingWebhookConfiguration",
                "validatingwebhookconfigurations",
            ),
        ] {
            st.objects.insert(
                format!("/apis/admissionregistration.k8s.io/v1/{res}/vgpu-scheduler"),
                serde_json::to_value(named(docs, kind, "vgpu-scheduler")).unwrap(),
            );
        }
        let state = std::sync::Arc::new(std::sync::Mutex::new(st));
        let api = fake_api::start(state.clone());
        let dir = std::env::temp_dir().join(format!("vgpu-bootstrap-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sa")).unwrap();
        std::fs::write(dir.join("sa/token"), fake_api::TOKEN).unwrap();
        std::fs::write(dir.join("sa/ca.crt"), "unused over http").unwrap();
        Bootstrap { state, api, dir }
    }

    /// Runs the script as the Job does (env from the rendered Job, plus the stand-in's address).
    fn run(&self, job_env: &[(String, String)]) -> (bool, String) {
        let out = Command::new("sh")
            .arg(repo().join("deploy/images/vgpu-bootstrap.sh"))
            .envs(job_env.iter().map(|(k, v)| (k, v)))
            .env("VGPU_API", &self.api)
            .env("VGPU_SA_DIR", self.dir.join("sa"))
            .env("TMPDIR", &self.dir)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), said)
    }

    fn object(&self, path: &str) -> Option<serde_json::Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    fn secret(&self, name: &str) -> Option<serde_json::Value> {
        self.object(&format!("/api/v1/namespaces/vgpu-system/secrets/{name}"))
    }

    fn writes(&self) -> Vec<(String, String)> {
        let st = self.state.lock().unwrap();
        st.log.iter().filter(|(m, _)| m != "GET").cloned().collect()
    }
}

fn b64_decode(s: &str) -> Vec<u8> {
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn job_env(docs: &[Value]) -> Vec<(String, String)> {
    let job = named(docs, "Job", "vgpu-bootstrap");
    seq(&job["spec"]["template"]["spec"]["containers"][0]["env"])
        .iter()
        .map(|e| (s(&e["name"]).to_string(), s(&e["value"]).to_string()))
        .collect()
}

#[test]
fn the_bootstrap_makes_the_seal_key_and_the_webhook_certificate_once() {
    let Some(docs) = rendered() else { return };
    if !tool("curl") || !tool("jq") || !tool("openssl") {
        return;
    }
    let b = Bootstrap::new(&docs, "fresh");
    let (ok, said) = b.run(&job_env(&docs));
    assert!(ok, "{said}");

    // The seal key: random, 32 bytes as hex text (the agent trims whitespace, the scheduler does not).
    let seal = b.secret("vgpu-seal-key").expect("no vgpu-seal-key");
    let key = b64_decode(seal["data"]["key"].as_str().unwrap());
    assert_eq!(key.len(), 64, "{key:?}");
    assert!(key.iter().all(u8::is_ascii_hexdigit));

    // The webhook's certificate, signed by the CA both webhooks now trust, for the Service's name.
    let tls = b
        .secret("vgpu-scheduler-tls")
        .expect("no vgpu-scheduler-tls");
    assert_eq!(tls["type"], "kubernetes.io/tls");
    let file = |k: &str| {
        let p = b.dir.join(k);
        std::fs::write(&p, b64_decode(tls["data"][k].as_str().unwrap())).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (ca, crt, key) = (file("ca.crt"), file("tls.crt"), file("tls.key"));
    let (ok, said) = openssl(&["verify", "-CAfile", &ca, &crt]);
    assert!(ok, "{said}");
    let (_, sans) = openssl(&["x509", "-in", &crt, "-noout", "-ext", "subjectAltName"]);
    let svc = named(&docs, "Service", "vgpu-scheduler");
    for hook in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        for w in seq(&named(&docs, hook, "vgpu-scheduler")["webhooks"]) {
            let s_ = &w["clientConfig"]["service"];
            assert_eq!(s_["name"], svc["metadata"]["name"]);
            let host = format!("{}.{}.svc", s(&s_["name"]), s(&s_["namespace"]));
            assert!(sans.contains(&format!("DNS:{host}")), "{sans}");
        }
    }
    let (_, cert_pub) = openssl(&["x509", "-in", &crt, "-noout", "-pubkey"]);
    let (_, key_pub) = openssl(&["pkey", "-in", &key, "-pubout"]);
    assert_eq!(cert_pub, key_pub, "tls.key is not the certificate's key");
    for res in [
        "mutatingwebhookconfigurations",
        "validatingwebhookconfigurations",
    ] {
        let cfg = b
            .object(&format!(
                "/apis/admissionregistration.k8s.io/v1/{res}/vgpu-scheduler"
            ))
            .unwrap();
        let hooks = cfg["webhooks"].as_array().unwrap();
        assert!(!hooks.is_empty());
        for w in hooks {
            assert_eq!(
                w["clientConfig"]["caBundle"], tls["data"]["ca.crt"],
                "{res}"
            );
        }
    }

    // Again (every apply recreates the Job): nothing is made or changed.
    let before = b.writes().len();
    let (ok, said) = b.run(&job_env(&docs));
    assert!(ok, "{said}");
    assert_eq!(b.writes().len(), before, "{:?}", b.writes());
    assert_eq!(b.secret("vgpu-seal-key").unwrap(), seal);
    assert_eq!(b.secret("vgpu-scheduler-tls").unwrap(), tls);
}

#[test]
fn with_cert_manager_the_bootstrap_makes_the_seal_key_only() {
    let Some(_) = rendered() else { return };
    if !tool("curl") || !tool("jq") || !tool("openssl") {
        return;
    }
    let docs = docs_of("deploy/with-cert-manager");
    let b = Bootstrap::new(&docs, "cert-manager");
    let (ok, said) = b.run(&job_env(&docs));
    assert!(ok, "{said}");
    assert!(b.secret("vgpu-seal-key").is_some());
    assert!(b.secret("vgpu-scheduler-tls").is_none());
    assert_eq!(
        b.writes(),
        [(
            "POST".to_string(),
            "/api/v1/namespaces/vgpu-system/secrets".to_string()
        )]
    );
}

#[test]
fn the_bootstrap_stops_and_says_why_when_it_cannot_do_its_part() {
    let Some(docs) = rendered() else { return };
    if !tool("curl") || !tool("jq") || !tool("openssl") {
        return;
    }
    // A certificate Secret made by hand without its CA: the webhooks cannot be told what to trust.
    let b = Bootstrap::new(&docs, "no-ca");
    b.state.lock().unwrap().objects.insert(
        "/api/v1/namespaces/vgpu-system/secrets/vgpu-scheduler-tls".into(),
        serde_json::json!({"kind": "Secret", "data": {"tls.crt": "eA==", "tls.key": "eA=="}}),
    );
    let (ok, said) = b.run(&job_env(&docs));
    assert!(!ok);
    assert!(
        said.contains("has no ca.crt") && said.contains("delete it"),
        "{said}"
    );
    // Refused by RBAC: the status is named, and nothing is patched.
    let b = Bootstrap::new(&docs, "forbidden");
    b.state.lock().unwrap().fail.insert(
        "/api/v1/namespaces/vgpu-system/secrets/vgpu-seal-key".into(),
        403,
    );
    let (ok, said) = b.run(&job_env(&docs));
    assert!(!ok);
    assert!(said.contains("vgpu-seal-key: HTTP 403"), "{said}");
    assert!(b.writes().is_empty(), "{:?}", b.writes());
}

/// A binary of the workspace, next to the test binary's `deps/` (scripts/test.sh builds the
/// workspace first); None where it was not built (a lone `cargo test -p vgpu-integration`).
fn workspace_bin(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent()?.parent()?.join(name);
    if !p.exists() {
        assert!(
            std::env::var("VGPU_REQUIRE_DEPLOY_TOOLS").as_deref() != Ok("1"),
            "{} is missing: cargo build --workspace first",
            p.display()
        );
        eprintln!("{} not built: skipped", p.display());
        return None;
    }
    Some(p)
}

/// The flags `--help` of `bin sub` lists.
fn help_flags(bin: &Path, sub: &str) -> BTreeSet<String> {
    let out = Command::new(bin).args([sub, "--help"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == '=')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(['.', ']']).to_string())
        .collect()
}

/// kube-scheduler's flags are its own; vgpu-scheduler's must be ones `serve` has (the agent's are
/// parsed by its own CLI in agent/src/main.rs).
#[test]
fn the_scheduler_runs_with_flags_it_has() {
    let Some(docs) = rendered() else { return };
    let Some(bin) = workspace_bin("vgpu-scheduler") else {
        return;
    };
    let known = help_flags(&bin, "serve");
    assert!(known.contains("--seal-key-file"), "{known:?}");
    let dep = named(&docs, "Deployment", "vgpu-scheduler");
    let ext = by_name(
        &dep["spec"]["template"]["spec"]["containers"],
        "vgpu-scheduler",
    );
    let args = strs(&ext["args"]);
    assert_eq!(args[0], "serve");
    for flag in flags(ext).keys() {
        assert!(
            known.contains(&format!("--{flag}")),
            "vgpu-scheduler serve has no --{flag}: {known:?}"
        );
    }
}
