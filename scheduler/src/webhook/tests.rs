//! The webhook as the API server calls it: AdmissionReview JSON for CREATE and UPDATE (and the
//! `status` subresource), with the caller's userInfo, through both routes.

use super::server::{canonical, review, Mode, WebhookState};
use super::{ClusterLimits, Writers};
use serde_json::{json, Value};

const SCHEDULER: &str = "system:serviceaccount:vgpu-system:vgpu-scheduler";
const AGENT: &str = "system:serviceaccount:vgpu-system:vgpu-agent";
const TENANT: &str = "alice@example.com";

fn state() -> WebhookState {
    WebhookState {
        scheduler_name: "vgpu-scheduler".into(),
        writers: Writers {
            scheduler: SCHEDULER.into(),
            agent: AGENT.into(),
        },
        limits: Box::new(|| ClusterLimits {
            max_card_mem_mib: Some(15360),
            max_cards_per_node: Some(1),
        }),
        ready: Box::new(|| true),
    }
}

/// A container as the API server hands it to admission (defaults filled in).
fn container(name: &str, limits: Value) -> Value {
    json!({
        "name": name, "image": "nvidia/cuda:12.4.1-base-ubuntu22.04", "command": ["sleep", "infinity"],
        "resources": {"limits": limits.clone(), "requests": limits},
        "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent"
    })
}

/// The lab's gpumem-pod-a after the API server's defaulting: `schedulerName: default-scheduler`.
fn lab_pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "gpumem-pod-a", "namespace": "ml", "creationTimestamp": null},
        "spec": {
            "containers": [container("app", json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "4k"}))],
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "serviceAccount": "default", "securityContext": {},
            "schedulerName": "default-scheduler", "enableServiceLinks": true, "priority": 0,
            "preemptionPolicy": "PreemptLowerPriority",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {}
    })
}

fn cpu_pod() -> Value {
    let mut p = lab_pod();
    p["metadata"]["name"] = json!("web");
    p["spec"]["containers"] = json!([container("web", json!({"cpu": "1"}))]);
    p
}

/// The lab pod as it is once the scheduler bound it and the agent allocated it.
fn bound_pod() -> Value {
    let mut p = lab_pod();
    p["metadata"]["uid"] = json!("7b0c6a52-1d7e-4a57-9d0e-6f2b9a1c0e11");
    p["metadata"]["resourceVersion"] = json!("4242");
    p["metadata"]["labels"] = json!({"hami.io/vgpu-node": "hami-workshop"});
    p["metadata"]["annotations"] = json!({
        "hami.io/vgpu-node": "hami-workshop",
        "hami.io/vgpu-time": "1764800000",
        "hami.io/bind-time": "1764800000",
        "hami.io/bind-phase": "success",
        "hami.io/vgpu-devices-to-allocate": ";",
        "hami.io/vgpu-devices-allocated": "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039,NVIDIA,4000,0:;",
        "vgpu.io/devices-sealed": "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039,NVIDIA,4000,0:;",
        "vgpu.io/placement-seal": format!("v1:{}", "ab".repeat(32)),
    });
    p["spec"]["schedulerName"] = json!("vgpu-scheduler");
    p["spec"]["nodeName"] = json!("hami-workshop");
    p["status"] = json!({"phase": "Running"});
    p
}

fn user(name: &str) -> Value {
    let groups = if name.starts_with("system:serviceaccount:") {
        json!([
            "system:serviceaccounts",
            "system:serviceaccounts:vgpu-system",
            "system:authenticated"
        ])
    } else {
        json!(["developers", "system:authenticated"])
    };
    json!({"username": name, "uid": "0b7d0b42-5c1e-4c33-a3c4-1f0d7a4f8a10", "groups": groups})
}

fn create(by: &str, pod: Value) -> Value {
    json!({
        "kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"]["name"], "namespace": "ml", "operation": "CREATE",
            "userInfo": user(by), "object": pod, "oldObject": null, "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1", "fieldManager": "kubectl-client-side-apply"}
        }
    })
}

fn update_sub(by: &str, sub: Option<&str>, old: Value, new: Value) -> Value {
    let mut r = json!({
        "kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": "5a3c2b10-7f7e-4b8e-a1f2-2c0e9d4b6a77",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": new["metadata"]["name"], "namespace": "ml", "operation": "UPDATE",
            "userInfo": user(by), "object": new, "oldObject": old, "dryRun": false,
            "options": {"kind": "UpdateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    });
    if let Some(s) = sub {
        r["request"]["subResource"] = json!(s);
        r["request"]["requestSubResource"] = json!(s);
    }
    r
}

fn update(by: &str, old: Value, new: Value) -> Value {
    update_sub(by, None, old, new)
}

fn call(mode: Mode, body: &Value) -> Value {
    canonical(review(&state(), mode, body.to_string().as_bytes()))["response"].clone()
}

/// The answer of both routes, which must agree on every refusal.
fn refused(body: &Value) -> String {
    let mut msgs = Vec::new();
    for mode in [Mode::Mutate, Mode::Validate] {
        let r = call(mode, body);
        assert_eq!(r["allowed"], false, "{mode:?} let it through: {r}");
        assert_eq!(r["uid"], body["request"]["uid"], "{r}");
        msgs.push(r["status"]["message"].as_str().unwrap().to_string());
    }
    assert_eq!(msgs[0], msgs[1]);
    msgs.pop().unwrap()
}

fn allowed(mode: Mode, body: &Value) -> Value {
    let r = call(mode, body);
    assert_eq!(r["allowed"], true, "{mode:?} refused: {r}");
    r
}

fn patch_of(r: &Value) -> Option<Value> {
    use base64::Engine;
    let p = r.get("patch")?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(p).unwrap();
    Some(serde_json::from_slice(&bytes).unwrap())
}

#[test]
fn a_vgpu_pod_with_node_name_is_refused_naming_the_field() {
    let mut p = lab_pod();
    p["spec"]["nodeName"] = json!("hami-workshop");
    let msg = refused(&create(TENANT, p));
    assert!(msg.contains("spec.nodeName"), "{msg}");
    assert!(msg.contains("hami-workshop"), "{msg}");
    assert!(msg.starts_with("vgpu: pod ml/gpumem-pod-a"), "{msg}");
}

#[test]
fn a_vgpu_pod_naming_another_scheduler_is_refused_naming_the_field() {
    for other in ["volcano", "my-scheduler", "vgpu-scheduler-2"] {
        let mut p = lab_pod();
        p["spec"]["schedulerName"] = json!(other);
        let msg = refused(&create(TENANT, p));
        assert!(msg.contains("spec.schedulerName"), "{msg}");
        assert!(
            msg.contains(other) && msg.contains("\"vgpu-scheduler\""),
            "{msg}"
        );
    }
    // Ours by name is fine on both routes, with nothing to patch.
    let mut p = lab_pod();
    p["spec"]["schedulerName"] = json!("vgpu-scheduler");
    for mode in [Mode::Mutate, Mode::Validate] {
        assert_eq!(patch_of(&allowed(mode, &create(TENANT, p.clone()))), None);
    }
}

#[test]
fn an_init_container_asking_for_vgpu_makes_it_a_vgpu_pod() {
    for limits in [
        json!({"nvidia.com/gpu": "1"}),
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem-percentage": "50"}),
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpucores": "30"}),
    ] {
        let mut p = cpu_pod();
        p["spec"]["initContainers"] = json!([container("warmup", limits)]);
        p["spec"]["nodeName"] = json!("gpu-7");
        let msg = refused(&create(TENANT, p.clone()));
        assert!(msg.contains("spec.nodeName"), "{msg}");
        p["spec"]["nodeName"] = Value::Null;
        p["spec"]["schedulerName"] = json!("volcano");
        assert!(refused(&create(TENANT, p)).contains("spec.schedulerName"));
    }
}

#[test]
fn the_mutating_route_sends_vgpu_pods_to_our_scheduler_and_the_validating_route_checks_it_did() {
    let r = allowed(Mode::Mutate, &create(TENANT, lab_pod()));
    assert_eq!(
        patch_of(&r),
        Some(json!([{"op": "add", "path": "/spec/schedulerName", "value": "vgpu-scheduler"}]))
    );
    // The validating webhook sees the object after every mutating webhook: a vGPU pod still
    // on the default scheduler there means ours did not run or was undone.
    let r = call(Mode::Validate, &create(TENANT, lab_pod()));
    assert_eq!(r["allowed"], false, "{r}");
    let msg = r["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("spec.schedulerName") && msg.contains("default-scheduler"),
        "{msg}"
    );
    // A pod with no GPU passes both untouched.
    for mode in [Mode::Mutate, Mode::Validate] {
        assert_eq!(patch_of(&allowed(mode, &create(TENANT, cpu_pod()))), None);
    }
}

/// Issue 16, item 6: a pod with no GPU request carrying the scheduler's annotations and label
/// made the scheduler count 15360 MiB that nobody holds.
#[test]
fn forged_placement_metadata_is_refused_on_create() {
    let mut p = cpu_pod();
    p["metadata"]["labels"] = json!({"hami.io/vgpu-node": "hami-workshop"});
    p["metadata"]["annotations"] = json!({
        "hami.io/vgpu-node": "hami-workshop",
        "hami.io/vgpu-devices-allocated": "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039,NVIDIA,15360,0:;"
    });
    let msg = refused(&create(TENANT, p.clone()));
    assert!(msg.contains("hami.io/"), "{msg}");
    assert!(msg.contains(TENANT), "{msg}");

    // Each one alone, on a GPU pod and on a CPU pod.
    let forged_annotations = [
        "hami.io/vgpu-node",
        "hami.io/vgpu-time",
        "hami.io/bind-phase",
        "hami.io/bind-time",
        "hami.io/vgpu-devices-to-allocate",
        "hami.io/vgpu-devices-allocated",
        "hami.io/mutex.lock",
        "hami.io/anything-new",
        "vgpu.io/placement-seal",
        "vgpu.io/devices-sealed",
    ];
    for base in [lab_pod(), cpu_pod()] {
        for key in forged_annotations {
            let mut p = base.clone();
            p["metadata"]["annotations"] = json!({ key: "x" });
            let msg = refused(&create(TENANT, p));
            assert!(msg.contains(&format!("annotation {key:?}")), "{key}: {msg}");
        }
        let mut p = base.clone();
        p["metadata"]["labels"] = json!({"app": "x", "hami.io/vgpu-node": "hami-workshop"});
        let msg = refused(&create(TENANT, p));
        assert!(msg.contains("label \"hami.io/vgpu-node\""), "{msg}");
    }
}

/// A Deployment's pods are created by the ReplicaSet controller from the user's template: its
/// account is no vgpu writer either, so a forged template is refused too.
#[test]
fn forged_metadata_in_a_template_is_refused_for_the_controller_that_creates_the_pod() {
    let mut p = lab_pod();
    p["metadata"]["annotations"] = json!({"vgpu.io/placement-seal": "v1:00"});
    let msg = refused(&create(
        "system:serviceaccount:kube-system:replicaset-controller",
        p,
    ));
    assert!(msg.contains("vgpu.io/placement-seal"), "{msg}");
}

#[test]
fn annotations_hami_documents_for_users_stay_allowed_on_create() {
    let mut p = lab_pod();
    p["metadata"]["annotations"] = json!({
        "nvidia.com/use-gputype": "Tesla T4,A100",
        "nvidia.com/nouse-gputype": "1080",
        "nvidia.com/use-gpuuuid": "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039",
        "nvidia.com/nouse-gpuuuid": "GPU-0",
        "hami.io/node-scheduler-policy": "spread",
        "hami.io/gpu-scheduler-policy": "binpack",
        "kubectl.kubernetes.io/last-applied-configuration": "{}"
    });
    p["metadata"]["labels"] = json!({"app": "trainer"});
    let r = allowed(Mode::Mutate, &create(TENANT, p));
    assert!(patch_of(&r).is_some());
}

#[test]
fn unknown_policy_words_are_still_refused() {
    for key in [
        "hami.io/node-scheduler-policy",
        "hami.io/gpu-scheduler-policy",
    ] {
        let mut p = lab_pod();
        p["metadata"]["annotations"] = json!({ key: "binpak" });
        let msg = refused(&create(TENANT, p));
        assert!(msg.contains(key) && msg.contains("binpak"), "{msg}");
    }
}

/// Issue 16, item 7: UPDATE was never checked, so a tenant could rewrite its placement (or
/// drop the label that makes the scheduler count it) after the fact.
#[test]
fn a_tenant_cannot_change_add_or_remove_placement_metadata_on_update() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "annotation \"hami.io/vgpu-devices-allocated\"",
            Box::new(|p| {
                p["metadata"]["annotations"]["hami.io/vgpu-devices-allocated"] =
                    json!("GPU-859b872c-0ba2-97b0-10b4-8b7185c55039,NVIDIA,1,0:;")
            }),
        ),
        (
            "annotation \"vgpu.io/placement-seal\"",
            Box::new(|p| {
                p["metadata"]["annotations"]["vgpu.io/placement-seal"] =
                    json!(format!("v1:{}", "cd".repeat(32)))
            }),
        ),
        (
            "annotation \"hami.io/bind-phase\"",
            Box::new(|p| {
                p["metadata"]["annotations"]
                    .as_object_mut()
                    .unwrap()
                    .remove("hami.io/bind-phase");
            }),
        ),
        (
            "annotation \"hami.io/vgpu-devices-to-allocate\"",
            Box::new(|p| {
                p["metadata"]["annotations"]["hami.io/vgpu-devices-to-allocate"] =
                    json!("GPU-1,NVIDIA,4000,0:;")
            }),
        ),
        (
            "label \"hami.io/vgpu-node\"",
            Box::new(|p| {
                p["metadata"]["labels"]
                    .as_object_mut()
                    .unwrap()
                    .remove("hami.io/vgpu-node");
            }),
        ),
        (
            "label \"hami.io/vgpu-node\"",
            Box::new(|p| p["metadata"]["labels"]["hami.io/vgpu-node"] = json!("gpu-9")),
        ),
        (
            "annotation \"hami.io/new-key\"",
            Box::new(|p| p["metadata"]["annotations"]["hami.io/new-key"] = json!("1")),
        ),
        (
            "annotation \"",
            Box::new(|p| {
                p["metadata"].as_object_mut().unwrap().remove("annotations");
            }),
        ),
    ];
    for (what, edit) in &edits {
        let old = bound_pod();
        let mut new = old.clone();
        edit(&mut new);
        for sub in [None, Some("status")] {
            let msg = refused(&update_sub(TENANT, sub, old.clone(), new.clone()));
            assert!(msg.contains(what), "{what} ({sub:?}): {msg}");
            assert!(msg.contains(TENANT), "{msg}");
        }
    }
    // A pending pod: adding the scheduler's label by hand is refused as well.
    let old = {
        let mut p = lab_pod();
        p["spec"]["schedulerName"] = json!("vgpu-scheduler");
        p
    };
    let mut new = old.clone();
    new["metadata"]["labels"] = json!({"hami.io/vgpu-node": "hami-workshop"});
    assert!(refused(&update(TENANT, old, new)).contains("hami.io/vgpu-node"));
}

#[test]
fn the_scheduler_and_the_agent_write_their_metadata_and_namesakes_cannot() {
    // Bind: the scheduler's merge patch on a pending pod.
    let old = {
        let mut p = lab_pod();
        p["metadata"]["uid"] = json!("7b0c6a52-1d7e-4a57-9d0e-6f2b9a1c0e11");
        p["spec"]["schedulerName"] = json!("vgpu-scheduler");
        p
    };
    let mut bound = bound_pod();
    bound["spec"]
        .as_object_mut()
        .unwrap()
        .remove("nodeName")
        .unwrap();
    bound["metadata"]["annotations"]["hami.io/bind-phase"] = json!("allocating");
    for mode in [Mode::Mutate, Mode::Validate] {
        allowed(mode, &update(SCHEDULER, old.clone(), bound.clone()));
    }
    // Allocate: the agent records what it handed out.
    let mut allocated = bound.clone();
    allocated["metadata"]["annotations"]["hami.io/bind-phase"] = json!("success");
    for mode in [Mode::Mutate, Mode::Validate] {
        allowed(mode, &update(AGENT, bound.clone(), allocated.clone()));
    }
    // The same edits by accounts whose names only look like ours.
    for namesake in [
        "vgpu-scheduler",
        "system:serviceaccount:tenant-a:vgpu-scheduler",
        "system:serviceaccount:vgpu-system:vgpu-agent-2",
        "system:serviceaccount:vgpu-system:vgpu-kube-scheduler",
        "system:serviceaccount:vgpu-system:vgpu-schedule",
        "",
    ] {
        let msg = refused(&update(namesake, old.clone(), bound.clone()));
        assert!(msg.contains("hami.io/"), "{namesake}: {msg}");
    }
}

#[test]
fn the_writers_are_the_accounts_given_by_flags() {
    let st = WebhookState {
        writers: Writers {
            scheduler: "system:serviceaccount:gpu:sched".into(),
            agent: "system:serviceaccount:gpu:node-agent".into(),
        },
        ..state()
    };
    let old = bound_pod();
    let mut new = old.clone();
    new["metadata"]["annotations"]["hami.io/bind-phase"] = json!("failed");
    let answer = |by: &str| {
        let body = update(by, old.clone(), new.clone()).to_string();
        canonical(review(&st, Mode::Validate, body.as_bytes()))["response"]["allowed"].clone()
    };
    assert_eq!(answer("system:serviceaccount:gpu:node-agent"), true);
    assert_eq!(answer("system:serviceaccount:gpu:sched"), true);
    assert_eq!(answer(AGENT), false, "the default is replaced, not added");
}

#[test]
fn tenants_keep_every_other_update() {
    let old = bound_pod();
    let mut new = old.clone();
    new["metadata"]["labels"]["team"] = json!("vision");
    new["metadata"]["annotations"]["example.com/owner"] = json!("alice");
    for mode in [Mode::Mutate, Mode::Validate] {
        assert_eq!(
            patch_of(&allowed(mode, &update(TENANT, old.clone(), new.clone()))),
            None
        );
    }
    // The kubelet's status update of a bound vGPU pod (nodeName set, ours as scheduler).
    let mut running = old.clone();
    running["status"] = json!({"phase": "Running", "podIP": "10.0.0.7"});
    allowed(
        Mode::Validate,
        &update_sub("system:node:hami-workshop", Some("status"), old, running),
    );
}

#[test]
fn policy_annotations_a_tenant_changes_on_update_must_still_parse() {
    let old = {
        let mut p = lab_pod();
        p["spec"]["schedulerName"] = json!("vgpu-scheduler");
        p["metadata"]["annotations"] = json!({"hami.io/gpu-scheduler-policy": "spread"});
        p
    };
    let mut ok = old.clone();
    ok["metadata"]["annotations"]["hami.io/gpu-scheduler-policy"] = json!("binpack");
    allowed(Mode::Validate, &update(TENANT, old.clone(), ok));
    let mut bad = old.clone();
    bad["metadata"]["annotations"]["hami.io/gpu-scheduler-policy"] = json!("fastest");
    let msg = refused(&update(TENANT, old, bad));
    assert!(msg.contains("fastest"), "{msg}");
}

#[test]
fn a_request_that_is_not_a_pod_review_is_refused() {
    for body in [
        json!({"garbage": true}),
        json!({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}),
    ] {
        for mode in [Mode::Mutate, Mode::Validate] {
            assert_eq!(call(mode, &body)["allowed"], false);
        }
    }
    // An UPDATE whose old object is missing is judged as if everything in it were new.
    let mut body = update(TENANT, bound_pod(), bound_pod());
    body["request"]["oldObject"] = Value::Null;
    assert!(refused(&body).contains("hami.io/"));
}

/// HAMi's webhook skips pods labelled `hami.io/webhook: ignore` (an objectSelector): a label the
/// tenant writes. Here the label is accepted and changes nothing.
#[test]
fn hamis_ignore_label_does_not_switch_the_checks_off() {
    let mut p = lab_pod();
    p["metadata"]["labels"] = json!({"hami.io/webhook": "ignore"});
    p["spec"]["nodeName"] = json!("hami-workshop");
    assert!(refused(&create(TENANT, p.clone())).contains("spec.nodeName"));
    p["spec"]["nodeName"] = Value::Null;
    p["metadata"]["annotations"] = json!({"hami.io/vgpu-devices-allocated": "GPU-0,NVIDIA,1,0:;"});
    assert!(refused(&create(TENANT, p)).contains("hami.io/vgpu-devices-allocated"));
    let mut cpu = cpu_pod();
    cpu["metadata"]["labels"] = json!({"hami.io/webhook": "ignore"});
    allowed(Mode::Validate, &create(TENANT, cpu));
}

/// An UPDATE carries the pod twice, and a pod may be up to 1.5 MB in etcd: a review near 3 MB must
/// still be judged (an HTTP error would refuse the write under `failurePolicy: Fail`).
#[tokio::test]
async fn a_review_of_two_large_pods_is_answered() {
    use axum::body::{to_bytes, Body};
    use tower::ServiceExt;
    let mut old = bound_pod();
    old["spec"]["containers"][0]["env"] = json!([{"name": "BLOB", "value": "x".repeat(1_400_000)}]);
    let mut new = old.clone();
    new["metadata"]["labels"]["team"] = json!("vision");
    for path in ["/mutate", "/validate"] {
        let body = update(TENANT, old.clone(), new.clone()).to_string();
        assert!(body.len() > 2_800_000);
        let resp = super::server::router(std::sync::Arc::new(state()))
            .oneshot(
                axum::http::Request::post(path)
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let v: Value =
            serde_json::from_slice(&to_bytes(resp.into_body(), usize::MAX).await.unwrap()).unwrap();
        assert_eq!(v["response"]["allowed"], true, "{path}");
    }
}
