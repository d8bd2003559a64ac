//! The two shapes of an Event: core v1 and `events.k8s.io/v1` name the same fields differently. The server
//! stores one set of events and serves it in both shapes, as kube-apiserver does, so an event a kube-rs Recorder
//! writes shows in `kubectl describe`.

use serde_json::{json, Map, Value};

use super::resources::Resource;

/// Core v1 Event fields and their `events.k8s.io/v1` names.
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
    ("reportingComponent", "reportingController"),
];

fn rename(obj: &Value, to_new: bool, api_version: &str) -> Value {
    let mut out = Map::new();
    if let Some(m) = obj.as_object() {
        for (k, v) in m {
            let renamed = EVENT_FIELDS.iter().find_map(|(core, new)| {
                if to_new && k == core {
                    Some(*new)
                } else if !to_new && k == new {
                    Some(*core)
                } else {
                    None
                }
            });
            out.insert(renamed.unwrap_or(k).to_string(), v.clone());
        }
    }
    out.insert("apiVersion".into(), json!(api_version));
    out.insert("kind".into(), json!("Event"));
    Value::Object(out)
}

/// The object as a client of `res` sees it.
pub fn to_view(res: &Resource, stored: &Value) -> Value {
    if res.group == "events.k8s.io" {
        rename(stored, true, "events.k8s.io/v1")
    } else {
        stored.clone()
    }
}

/// What is stored for an object a client of `res` sent.
pub fn from_view(res: &Resource, view: Value) -> Value {
    if res.group == "events.k8s.io" {
        rename(&view, false, "v1")
    } else {
        view
    }
}

/// Whether clients of `res` see stored objects unchanged.
pub fn view_is_stored(res: &Resource) -> bool {
    res.group != "events.k8s.io"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_shapes_round_trip() {
        let core = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e"},
                          "involvedObject": {"name": "p"}, "message": "m", "reason": "R"});
        let res = super::super::resources::find("events.k8s.io", "v1", "events").unwrap();
        let v = to_view(res, &core);
        assert_eq!(v["regarding"]["name"], "p");
        assert_eq!(v["note"], "m");
        assert_eq!(v["apiVersion"], "events.k8s.io/v1");
        assert_eq!(from_view(res, v), core);
    }
}
