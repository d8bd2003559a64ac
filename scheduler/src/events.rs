//! The texts of the events the scheduler records on a pod, in HAMi's (and the lab's) words.

use crate::placement::reason::{FitReason, NodeMiss};
use std::collections::BTreeMap;
use std::fmt::Write;

pub const FILTERING_SUCCEED: &str = "FilteringSucceed";
pub const FILTERING_FAILED: &str = "FilteringFailed";
pub const BINDING_SUCCEED: &str = "BindingSucceed";
pub const BINDING_FAILED: &str = "BindingFailed";

/// The API server keeps event messages short; past this the lists end in `...`.
pub const MAX_MESSAGE: usize = 1024;

/// `find fit node(<node>), <k> nodes not fit, <m> nodes fit(<node>:<score>,...)`.
pub fn filtering_succeed<'a>(
    chosen: &str,
    not_fit: usize,
    fits: impl ExactSizeIterator<Item = (&'a str, f64)>,
) -> String {
    let mut s = format!(
        "find fit node({chosen}), {not_fit} nodes not fit, {} nodes fit(",
        fits.len()
    );
    for (i, (name, score)) in fits.enumerate() {
        if s.len() > MAX_MESSAGE - 8 {
            s.push_str("...");
            break;
        }
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{name}:{score:.2}");
    }
    s.push(')');
    s
}

/// `no available node, <N> nodes do not meet`, then one line per reason:
/// `<count> nodes <Reason>(<n1>,<n2>)`, reasons in check order.
pub fn filtering_failed<'a>(
    misses: impl IntoIterator<Item = (&'a str, &'a NodeMiss)>,
) -> (String, Vec<String>) {
    let mut by_reason: BTreeMap<FitReason, Vec<&str>> = BTreeMap::new();
    let mut n = 0;
    for (node, miss) in misses {
        n += 1;
        for r in miss.reasons() {
            by_reason.entry(r).or_default().push(node);
        }
    }
    let lines = by_reason
        .into_iter()
        .map(|(reason, nodes)| {
            let mut s = format!("{} nodes {reason}(", nodes.len());
            for (i, node) in nodes.iter().enumerate() {
                if s.len() > MAX_MESSAGE - 8 {
                    s.push_str("...");
                    break;
                }
                if i > 0 {
                    s.push(',');
                }
                s.push_str(node);
            }
            s.push(')');
            s
        })
        .collect();
    (format!("no available node, {n} nodes do not meet"), lines)
}

/// `Successfully binding node [<node>] to <ns>/<pod>`.
pub fn binding_succeed(node: &str, pod_key: &str) -> String {
    format!("Successfully binding node [{node}] to {pod_key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_texts() {
        assert_eq!(
            filtering_succeed("hami-workshop", 0, [("hami-workshop", 7.2083)].into_iter()),
            "find fit node(hami-workshop), 0 nodes not fit, 1 nodes fit(hami-workshop:7.21)"
        );
        assert_eq!(
            binding_succeed("hami-workshop", "default/oom-test-pod"),
            "Successfully binding node [hami-workshop] to default/oom-test-pod"
        );
    }

    #[test]
    fn failures_are_grouped_by_reason_in_check_order() {
        let mut c = [0; FitReason::COUNT];
        c[FitReason::CardInsufficientMemory as usize] = 2;
        let mem = NodeMiss::from_counts(c, 2);
        let mut c = [0; FitReason::COUNT];
        c[FitReason::CardNotHealth as usize] = 1;
        c[FitReason::CardInsufficientMemory as usize] = 1;
        let both = NodeMiss::from_counts(c, 2);
        // One node's text is sorted as HAMi's GenReason sorts it; the event lines keep check order.
        assert_eq!(
            both.to_string(),
            "1/2 CardInsufficientMemory, 1/2 CardNotHealth"
        );
        let (head, lines) = filtering_failed([("n1", &mem), ("n2", &both)]);
        assert_eq!(head, "no available node, 2 nodes do not meet");
        assert_eq!(
            lines,
            vec![
                "1 nodes CardNotHealth(n2)",
                "2 nodes CardInsufficientMemory(n1,n2)"
            ]
        );
    }

    #[test]
    fn long_lists_are_cut() {
        let names: Vec<String> = (0..500).map(|i| format!("node-{i:04}")).collect();
        let s = filtering_succeed("node-0000", 0, names.iter().map(|n| (n.as_str(), 1.0)));
        assert!(s.len() <= MAX_MESSAGE + 16, "{}", s.len());
        assert!(s.starts_with(
            "find fit node(node-0000), 0 nodes not fit, 500 nodes fit(node-0000:1.00,"
        ));
        assert!(s.ends_with("...)"));
    }
}
