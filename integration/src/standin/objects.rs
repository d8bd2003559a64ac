//! What the API server does to an object besides storing it: system fields on create, the status a new object
//! starts with, and what an update may and may not change.

use serde_json::{json, Map, Value};

use super::errors::ApiError;
use super::pods;
use super::resources::Resource;

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the kernel's random source is readable");
    b
}

/// A random (version 4) UUID.
pub fn uuid_v4() -> String {
    let mut b: [u8; 16] = random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Now, as `metav1.Time` writes it (seconds).
pub fn now() -> String {
    let t = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(t.as_second())
        .map(|t| t.to_string())
        .unwrap_or_else(|_| t.to_string())
}

/// The 5-character suffix `generateName` gets (kube's alphabet: no vowels, no look-alikes).
fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let r: [u8; 5] = random();
    r.iter()
        .map(|x| ALPHABET[*x as usize % ALPHABET.len()] as char)
        .collect()
}

fn meta(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("set to an object above")
}

pub fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// RFC 1123 subdomain, as most names must be.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

/// Checks the request body against the resource it was sent to and fills `apiVersion` and `kind` if absent.
pub fn check_type(res: &Resource, obj: &mut Value) -> Result<(), ApiError> {
    let Some(m) = obj.as_object_mut() else {
        return Err(ApiError::bad_request(format!(
            "the body of a {} request must be a JSON object",
            res.kind
        )));
    };
    let want_av = res.api_version();
    match m.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            m.insert("kind".into(), json!(res.kind));
        }
        Some(k) if k == res.kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the body is a {k}, but the request was sent to {} (a {})",
                res.qualified(),
                res.kind
            )))
        }
    }
    match m.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            m.insert("apiVersion".into(), json!(want_av));
        }
        Some(av) if av == want_av => {}
        Some(av) => {
            return Err(ApiError::bad_request(format!(
                "the body is {av}, but the request was sent to {want_av} {}",
                res.plural
            )))
        }
    }
    Ok(())
}

/// Name and namespace of a new object: the URL's namespace wins if the body has none, a different one is refused;
/// `generateName` gets its suffix.
pub fn place_new(res: &Resource, ns: &str, obj: &mut Value) -> Result<String, ApiError> {
    let m = meta(obj);
    if res.namespaced {
        match m.get("namespace").and_then(Value::as_str) {
            None | Some("") => {
                m.insert("namespace".into(), json!(ns));
            }
            Some(n) if n == ns => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ))
            }
        }
    } else {
        m.remove("namespace");
    }
    let name = match m.get("name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => match m.get("generateName").and_then(Value::as_str) {
            Some(g) if !g.is_empty() => {
                let n = format!("{g}{}", name_suffix());
                m.insert("name".into(), json!(n));
                n
            }
            _ => {
                return Err(ApiError::invalid(
                    res,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ))
            }
        },
    };
    if !valid_name(&name) {
        return Err(ApiError::invalid(
            res,
            &name,
            format!("metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
        ));
    }
    if m.get("resourceVersion")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        return Err(ApiError::bad_request(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    Ok(name)
}

/// System fields of a new object, and the status it starts with.
pub fn prepare_create(res: &Resource, obj: &mut Value) {
    let m = meta(obj);
    m.insert("uid".into(), json!(uuid_v4()));
    m.insert("creationTimestamp".into(), json!(now()));
    m.insert("generation".into(), json!(1));
    m.remove("deletionTimestamp");
    m.remove("deletionGracePeriodSeconds");
    m.remove("managedFields");
    match res.storage {
        "pods" => {
            let qos = pods::qos_class(&obj["spec"]);
            obj["status"] = json!({"phase": "Pending", "qosClass": qos});
        }
        "namespaces" => {
            let name = name_of(obj).to_string();
            let labels = meta(obj).entry("labels").or_insert_with(|| json!({}));
            if let Some(l) = labels.as_object_mut() {
                l.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        _ => {}
    }
}

/// Which part of the object a write is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
}

/// Carries over from `old` what this write may not change, and checks what it must not: the result is what is
/// stored (before its new resourceVersion).
pub fn prepare_update(
    res: &Resource,
    part: Part,
    old: &Value,
    mut new: Value,
) -> Result<Value, ApiError> {
    let name = name_of(old).to_string();
    if name_of(&new) != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({:?}) does not match the name on the URL ({name:?})",
            name_of(&new)
        )));
    }
    let old_ns = old.pointer("/metadata/namespace").cloned();
    let new_ns = new.pointer("/metadata/namespace").cloned();
    if res.namespaced && new_ns.is_some() && new_ns != old_ns {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let old_uid = old.pointer("/metadata/uid").cloned();
    if let Some(uid) = new.pointer("/metadata/uid").and_then(Value::as_str) {
        if Some(uid) != old_uid.as_ref().and_then(Value::as_str) {
            return Err(ApiError::conflict(
                res,
                &name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    old_uid.as_ref().and_then(Value::as_str).unwrap_or("")
                ),
            ));
        }
    }
    {
        let m = meta(&mut new);
        for k in [
            "uid",
            "creationTimestamp",
            "namespace",
            "deletionTimestamp",
            "generation",
        ] {
            match old.pointer(&format!("/metadata/{k}")) {
                Some(v) => {
                    m.insert(k.into(), v.clone());
                }
                None => {
                    m.remove(k);
                }
            }
        }
        m.remove("managedFields");
    }
    match part {
        Part::Main if res.has_status() => match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                new.as_object_mut().map(|m| m.remove("status"));
            }
        },
        Part::Status => {
            match old.get("spec") {
                Some(s) => new["spec"] = s.clone(),
                None => {
                    new.as_object_mut().map(|m| m.remove("spec"));
                }
            }
            if res.storage == "pods" {
                match old.pointer("/metadata/ownerReferences") {
                    Some(o) => meta(&mut new).insert("ownerReferences".into(), o.clone()),
                    None => meta(&mut new).remove("ownerReferences"),
                };
            }
        }
        Part::Main => {}
    }
    if res.storage == "pods" && part == Part::Main {
        let (a, b) = (
            pods::mutable_spec(&old["spec"]),
            pods::mutable_spec(&new["spec"]),
        );
        if a != b {
            return Err(ApiError::invalid(
                res,
                &name,
                "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`, `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing tolerations), `spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative); bind a pod to a node through pods/binding",
            ));
        }
    }
    let spec_changed = old.get("spec") != new.get("spec");
    if spec_changed {
        let gen = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        meta(&mut new).insert("generation".into(), json!(gen + 1));
    }
    Ok(new)
}

/// Whether `new` differs from `old` in anything but the resourceVersion (a write that changes nothing is not
/// stored and makes no event, as on a real server).
pub fn changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        v
    };
    strip(old) != strip(new)
}

/// Minimal validation: what would make the object unusable to the components that read it.
pub fn validate(res: &Resource, obj: &Value) -> Result<(), ApiError> {
    if res.storage == "pods" {
        let name = name_of(obj);
        let containers = obj.pointer("/spec/containers").and_then(Value::as_array);
        match containers {
            None => {
                return Err(ApiError::invalid(
                    res,
                    name,
                    "spec.containers: Required value",
                ))
            }
            Some(cs) if cs.is_empty() => {
                return Err(ApiError::invalid(
                    res,
                    name,
                    "spec.containers: Required value",
                ))
            }
            Some(cs) => {
                for (i, c) in cs.iter().enumerate() {
                    if c.get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .is_empty()
                    {
                        return Err(ApiError::invalid(
                            res,
                            name,
                            format!("spec.containers[{i}].name: Required value"),
                        ));
                    }
                    if c.get("image")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .is_empty()
                    {
                        return Err(ApiError::invalid(
                            res,
                            name,
                            format!("spec.containers[{i}].image: Required value"),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_shape() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, uuid_v4());
    }

    #[test]
    fn now_is_whole_seconds_utc() {
        let t = now();
        assert!(t.ends_with('Z') && t.len() == 20, "{t}");
    }
}
