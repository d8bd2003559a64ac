//! kube-scheduler's extender JSON, byte for byte (k8s.io/kube-scheduler/extender/v1).
//! `ExtenderArgs` and `ExtenderFilterResult` carry lower-case JSON tags; the binding types have
//! none in Go, so their keys are the capitalised field names. Go reads answers case-insensitively,
//! serde does not, so requests are parsed with exactly the keys kube-scheduler writes.

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
pub struct ExtenderArgs {
    pub pod: Pod,
    /// Sent when the extender is not `nodeCacheCapable`: whole Node objects, kept as JSON so the
    /// chosen one is echoed back unchanged.
    #[serde(default)]
    pub nodes: Option<NodeList>,
    /// Sent when the extender is `nodeCacheCapable`.
    #[serde(default)]
    pub nodenames: Option<NodeNames>,
}

pub use crate::placement::candidates::NodeNames;

/// [`ExtenderArgs`] as the HTTP filter reads it: the node-name list is kept as the raw JSON it
/// arrived as, borrowed from the body, so a list identical to the last one (kube-scheduler sends
/// the same thousands of names with every pod) is recognised by one byte comparison instead of
/// being parsed again. Unknown fields are skipped, as in [`ExtenderArgs`].
#[derive(Debug, Deserialize)]
pub struct ExtenderArgsRaw<'a> {
    pub pod: Pod,
    #[serde(default)]
    pub nodes: Option<NodeList>,
    #[serde(default, borrow)]
    pub nodenames: Option<&'a serde_json::value::RawValue>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct NodeList {
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub metadata: serde_json::Value,
    #[serde(default)]
    pub items: Vec<serde_json::Value>,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ExtenderFilterResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodenames: Option<Vec<String>>,
    #[serde(
        default,
        rename = "failedNodes",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub failed_nodes: BTreeMap<String, String>,
    #[serde(
        default,
        rename = "failedAndUnresolvableNodes",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub failed_and_unresolvable_nodes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct ExtenderBindingArgs {
    #[serde(rename = "PodName")]
    pub pod_name: String,
    #[serde(rename = "PodNamespace")]
    pub pod_namespace: String,
    #[serde(rename = "PodUID")]
    pub pod_uid: String,
    #[serde(rename = "Node")]
    pub node: String,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExtenderBindingResult {
    #[serde(rename = "Error")]
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_read_in_order_escapes_included() {
        let n: NodeNames = serde_json::from_str(r#"["a", "node-\u0062", "", "c\"d"]"#).unwrap();
        assert_eq!(n.iter().collect::<Vec<_>>(), ["a", "node-b", "", "c\"d"]);
        assert_eq!(n.len(), 4);
        let empty: NodeNames = serde_json::from_str("[]").unwrap();
        assert!(empty.is_empty());
        assert!(serde_json::from_str::<NodeNames>(r#"["a", 7]"#).is_err());
        let from_value: ExtenderArgs =
            serde_json::from_value(serde_json::json!({"pod": {}, "nodenames": ["x", "y"]}))
                .unwrap();
        assert_eq!(from_value.nodenames.unwrap().get(1), "y");
    }
}
