//! PATCH bodies: JSON patch (RFC 6902), JSON merge patch (RFC 7386), strategic merge patch and server-side apply
//! (taken as a strategic merge of the applied configuration; field ownership is not tracked).

use serde_json::{Map, Value};

use super::errors::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/apply-patch+yaml" => Some(PatchKind::Apply),
            _ => None,
        }
    }
}

/// The applied configuration of a server-side apply: YAML, of which JSON is a subset.
pub fn parse_apply(body: &[u8]) -> Result<Value, ApiError> {
    if let Ok(v) = serde_json::from_slice(body) {
        return Ok(v);
    }
    serde_yaml::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
}

/// `current` with `body` applied.
pub fn apply(kind: PatchKind, current: &Value, body: &[u8]) -> Result<Value, ApiError> {
    let mut doc = current.clone();
    match kind {
        PatchKind::Json => {
            let p: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding JSON patch: {e}")))?;
            json_patch::patch(&mut doc, &p).map_err(|e| ApiError {
                code: 422,
                reason: "Invalid",
                message: format!("the JSON patch could not be applied: {e}"),
                details: None,
            })?;
        }
        PatchKind::Merge => {
            let p: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding merge patch: {e}")))?;
            json_patch::merge(&mut doc, &p);
        }
        PatchKind::Strategic => {
            let p: Value = serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("error decoding strategic merge patch: {e}"))
            })?;
            strategic_merge(&mut doc, &p)?;
        }
        PatchKind::Apply => {
            let p = parse_apply(body)?;
            strategic_merge(&mut doc, &p)?;
        }
    }
    Ok(doc)
}

/// The field that identifies an element of a list merged by key, as Kubernetes' API types declare it
/// (`patchMergeKey`); lists not named here are replaced whole.
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => "containerPort",
        "conditions" | "addresses" => "type",
        "ownerReferences" => "uid",
        "taints" => "key",
        "readinessGates" => "conditionType",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        _ => return None,
    })
}

/// Lists of scalars merged as sets.
fn is_set_list(field: &str) -> bool {
    field == "finalizers"
}

fn directive(v: &Value) -> Option<&str> {
    v.get("$patch").and_then(Value::as_str)
}

/// A copy of `v` without patch directives, for values inserted where nothing existed.
fn strip(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .filter(|e| directive(e) != Some("delete"))
                .map(strip)
                .collect(),
        ),
        other => other.clone(),
    }
}

pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => merge_map(t, p),
        (_, Some(_)) => {
            *target = strip(patch);
            Ok(())
        }
        _ => Err(ApiError::bad_request(
            "a strategic merge patch must be a JSON object",
        )),
    }
}

fn merge_map(target: &mut Map<String, Value>, patch: &Map<String, Value>) -> Result<(), ApiError> {
    if patch.get("$patch").and_then(Value::as_str) == Some("replace") {
        *target = match strip(&Value::Object(patch.clone())) {
            Value::Object(m) => m,
            _ => unreachable!("strip keeps an object an object"),
        };
        return Ok(());
    }
    for (k, v) in patch {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(t)), Value::Array(gone)) = (target.get_mut(field), v) {
                t.retain(|e| !gone.contains(e));
            }
            continue;
        }
        if k.starts_with('$') {
            // $setElementOrder/…, $retainKeys, $patch: ordering and pruning hints this server does not need.
            continue;
        }
        if v.is_null() {
            target.remove(k);
            continue;
        }
        match (target.get_mut(k), v) {
            (Some(Value::Object(t)), Value::Object(p)) => {
                if directive(v) == Some("delete") {
                    target.remove(k);
                } else {
                    merge_map(t, p)?;
                }
            }
            (Some(Value::Array(t)), Value::Array(p)) => {
                if let Some(key) = merge_key(k) {
                    merge_list(t, p, key)?;
                } else if is_set_list(k) {
                    for e in p {
                        if !t.contains(e) {
                            t.push(e.clone());
                        }
                    }
                } else {
                    *t = p.iter().map(strip).collect();
                }
            }
            _ => {
                if directive(v) != Some("delete") {
                    target.insert(k.clone(), strip(v));
                }
            }
        }
    }
    Ok(())
}

fn merge_list(target: &mut Vec<Value>, patch: &[Value], key: &str) -> Result<(), ApiError> {
    if patch.iter().any(|e| directive(e) == Some("replace")) {
        *target = patch
            .iter()
            .filter(|e| directive(e) != Some("replace"))
            .map(strip)
            .collect();
        return Ok(());
    }
    for e in patch {
        let Some(id) = e.get(key) else {
            return Err(ApiError::bad_request(format!(
                "a strategic merge patch list element lacks its merge key {key:?}: {e}"
            )));
        };
        let pos = target.iter().position(|t| t.get(key) == Some(id));
        match (pos, directive(e)) {
            (Some(i), Some("delete")) => {
                target.remove(i);
            }
            (None, Some("delete")) => {}
            (Some(i), _) => {
                if let (Some(t), Some(p)) = (target[i].as_object_mut(), e.as_object()) {
                    merge_map(t, p)?;
                }
            }
            (None, _) => target.push(strip(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({"metadata": {"name": "p", "labels": {"a": "1", "b": "2"}, "finalizers": ["x"]},
               "spec": {"containers": [
                   {"name": "one", "image": "i1", "env": [{"name": "A", "value": "1"}]},
                   {"name": "two", "image": "i2"}],
                        "tolerations": [{"key": "k"}]}})
    }

    #[test]
    fn strategic_merges_containers_and_env_by_name() {
        let p = json!({"metadata": {"labels": {"b": null, "c": "3"}, "finalizers": ["y"]},
                       "spec": {"$setElementOrder/containers": [{"name": "one"}, {"name": "two"}],
                                "containers": [{"name": "one", "env": [{"name": "B", "value": "2"}]},
                                               {"name": "three", "image": "i3"}],
                                "tolerations": [{"key": "z"}]}});
        let out = apply(PatchKind::Strategic, &pod(), p.to_string().as_bytes()).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"a": "1", "c": "3"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["x", "y"]));
        let c = out["spec"]["containers"].as_array().unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0]["image"], "i1");
        assert_eq!(
            c[0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
        );
        assert_eq!(c[2]["name"], "three");
        assert_eq!(out["spec"]["tolerations"], json!([{"key": "z"}]));
        assert!(out["spec"].get("$setElementOrder/containers").is_none());
    }

    #[test]
    fn strategic_delete_directive_removes_one_element() {
        let p = json!({"spec": {"containers": [{"name": "two", "$patch": "delete"}]}});
        let out = apply(PatchKind::Strategic, &pod(), p.to_string().as_bytes()).unwrap();
        let c = out["spec"]["containers"].as_array().unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0]["name"], "one");
    }

    #[test]
    fn merge_patch_replaces_lists() {
        let p = json!({"spec": {"containers": [{"name": "only"}]}});
        let out = apply(PatchKind::Merge, &pod(), p.to_string().as_bytes()).unwrap();
        assert_eq!(out["spec"]["containers"], json!([{"name": "only"}]));
    }
}
