//! What the API server does to a pod besides storing it: the defaults its spec gets when decoded (before
//! admission, so webhooks see them), its QoS class, and the spec fields an update may still change.

use serde_json::{json, Value};

fn image_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        "IfNotPresent"
    } else {
        match last.split_once(':') {
            None => "Always",
            Some((_, "latest")) => "Always",
            Some(_) => "IfNotPresent",
        }
    }
}

fn default_containers(list: Option<&mut Value>) {
    let Some(Value::Array(cs)) = list else { return };
    for c in cs.iter_mut().filter_map(Value::as_object_mut) {
        let image = c
            .get("image")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        c.entry("imagePullPolicy")
            .or_insert_with(|| json!(image_pull_policy(&image)));
        c.entry("terminationMessagePath")
            .or_insert_with(|| json!("/dev/termination-log"));
        c.entry("terminationMessagePolicy")
            .or_insert_with(|| json!("File"));
        c.entry("resources").or_insert_with(|| json!({}));
        if let Some(Value::Array(ports)) = c.get_mut("ports") {
            for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                p.entry("protocol").or_insert_with(|| json!("TCP"));
            }
        }
        // A limit without a request requests the limit (as the API's defaulting does).
        let limits = c.get("resources").and_then(|r| r.get("limits")).cloned();
        if let (Some(Value::Object(limits)), Some(res)) = (
            limits,
            c.get_mut("resources").and_then(Value::as_object_mut),
        ) {
            let req = res.entry("requests").or_insert_with(|| json!({}));
            if let Some(req) = req.as_object_mut() {
                for (k, v) in limits {
                    req.entry(k).or_insert(v);
                }
            }
        }
    }
}

/// The defaults a pod's spec gets when it is decoded, before admission (the webhook sees them).
pub fn default_pod(obj: &mut Value) {
    if !obj.get("spec").is_some_and(Value::is_object) {
        return;
    }
    let spec = &mut obj["spec"];
    default_containers(spec.get_mut("containers"));
    default_containers(spec.get_mut("initContainers"));
    let s = spec.as_object_mut().expect("checked to be an object");
    for (k, v) in [
        ("restartPolicy", json!("Always")),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("securityContext", json!({})),
        ("enableServiceLinks", json!(true)),
        ("preemptionPolicy", json!("PreemptLowerPriority")),
        ("priority", json!(0)),
        ("serviceAccountName", json!("default")),
    ] {
        s.entry(k).or_insert(v);
    }
    let sa = s
        .get("serviceAccountName")
        .cloned()
        .unwrap_or(json!("default"));
    s.entry("serviceAccount").or_insert(sa);
}

/// QoS class as the API server computes it for `status.qosClass`.
pub fn qos_class(spec: &Value) -> &'static str {
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut any = false;
    let mut guaranteed = true;
    for c in &containers {
        let req = c.pointer("/resources/requests");
        let lim = c.pointer("/resources/limits");
        for r in ["cpu", "memory"] {
            let q = req.and_then(|x| x.get(r));
            let l = lim.and_then(|x| x.get(r));
            any |= q.is_some() || l.is_some();
            if l.is_none() || q != l {
                guaranteed = false;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// A pod's spec fields that an update may change (everything else is fixed once created).
pub fn mutable_spec(spec: &Value) -> Value {
    let mut s = spec.clone();
    if let Some(m) = s.as_object_mut() {
        for k in [
            "activeDeadlineSeconds",
            "tolerations",
            "schedulingGates",
            "terminationGracePeriodSeconds",
        ] {
            m.remove(k);
        }
        for list in ["containers", "initContainers"] {
            if let Some(Value::Array(cs)) = m.get_mut(list) {
                for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                    c.remove("image");
                }
            }
        }
    }
    s
}
