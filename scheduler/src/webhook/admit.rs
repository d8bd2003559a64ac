//! What the admission webhook decides for a new pod's spec: leave it, send it to our scheduler,
//! or refuse it with words that say what to change. Pure, so it is tested without TLS or an API
//! server.
//!
//! A vGPU pod must go through our scheduler: only its bind books the GPU share and writes the
//! sealed placement the agent's Allocate serves. A pod placed by `spec.nodeName` or by another
//! scheduler would either take a share nobody booked or fail at Allocate on the node, so it is
//! refused here, where the user sees why.

use crate::podspec;
use k8s_openapi::api::core::v1::Pod;
use vgpu_contract::annotations as ann;

/// The largest cards the cluster has registered, to refuse requests no node could ever meet.
/// `None` when no GPU node has registered yet: then nothing is refused for size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterLimits {
    pub max_card_mem_mib: Option<u64>,
    pub max_cards_per_node: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not a vGPU pod, or one already naming our scheduler: unchanged.
    Unchanged,
    /// A vGPU pod: set `spec.schedulerName`.
    SetScheduler(String),
    Deny(String),
}

const VGPU_RESOURCES: [&str; 4] = [
    ann::RESOURCE_GPU,
    ann::RESOURCE_GPUMEM,
    ann::RESOURCE_GPUMEM_PERCENTAGE,
    ann::RESOURCE_GPUCORES,
];

fn mentions_vgpu(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let all = spec.map(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
    });
    all.into_iter().flatten().any(|c| {
        let r = c.resources.as_ref();
        [
            r.and_then(|r| r.limits.as_ref()),
            r.and_then(|r| r.requests.as_ref()),
        ]
        .into_iter()
        .flatten()
        .any(|m| VGPU_RESOURCES.iter().any(|k| m.contains_key(*k)))
    })
}

pub fn admit(pod: &Pod, scheduler_name: &str, limits: ClusterLimits) -> Verdict {
    if !mentions_vgpu(pod) {
        return Verdict::Unchanged;
    }
    let key = pod_key(pod);
    let spec = pod.spec.as_ref();
    if let Some(node) = spec.and_then(|s| s.node_name.as_deref()) {
        return Verdict::Deny(format!(
            "vgpu: pod {key} asks for vGPUs but sets spec.nodeName {node:?}: a vGPU pod must be placed by the scheduler {scheduler_name:?}, which books its GPU share. Remove spec.nodeName; to keep it on that node use a nodeSelector on kubernetes.io/hostname: {node:?}"
        ));
    }
    let scheduler = match spec.and_then(|s| s.scheduler_name.as_deref()) {
        None | Some("") | Some("default-scheduler") => None,
        Some(s) if s == scheduler_name => Some(s),
        Some(other) => {
            return Verdict::Deny(format!(
                "vgpu: pod {key} asks for vGPUs but sets spec.schedulerName {other:?}: vGPU pods are placed by {scheduler_name:?}, which books their GPU share. Remove spec.schedulerName (the webhook sets it) or set it to {scheduler_name:?}"
            ))
        }
    };
    let req = match podspec::pod_request(pod) {
        Ok(Some(r)) => r,
        Ok(None) => return Verdict::Unchanged,
        Err(e) => return Verdict::Deny(format!("vgpu: pod {key}: {e}")),
    };
    let names = containers(pod);
    for (c, name) in req.containers.iter().zip(&names) {
        if let (crate::placement::request::MemRequest::MiB(m), Some(max)) =
            (c.mem, limits.max_card_mem_mib)
        {
            if c.gpus > 0 && m > max {
                return Verdict::Deny(format!(
                    "vgpu: pod {key}: container {name:?} asks {m} MiB of {} per vGPU, but the largest registered GPU has {max} MiB",
                    ann::RESOURCE_GPUMEM
                ));
            }
        }
        if let Some(max) = limits.max_cards_per_node {
            if c.gpus > max {
                return Verdict::Deny(format!(
                    "vgpu: pod {key}: container {name:?} asks {} vGPUs, each on its own GPU, but no node has more than {max} GPUs",
                    c.gpus
                ));
            }
        }
    }
    match scheduler {
        None => Verdict::SetScheduler(scheduler_name.to_string()),
        Some(_) => Verdict::Unchanged,
    }
}

/// `namespace/name` for messages; a pod a controller creates has no name before the API server
/// generates one, so its prefix stands in (`ml/trainer-7d9f-*`).
pub fn pod_key(pod: &Pod) -> String {
    match (&pod.metadata.name, &pod.metadata.generate_name) {
        (None, Some(prefix)) if !prefix.is_empty() => format!(
            "{}/{prefix}*",
            pod.metadata.namespace.as_deref().unwrap_or("default")
        ),
        _ => podspec::pod_key(pod),
    }
}

fn containers(pod: &Pod) -> Vec<String> {
    let spec = pod.spec.as_ref();
    let init = spec
        .and_then(|s| s.init_containers.as_ref())
        .into_iter()
        .flatten();
    let main = spec.map(|s| s.containers.iter()).into_iter().flatten();
    init.chain(main).map(|c| c.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    const LIMITS: ClusterLimits = ClusterLimits {
        max_card_mem_mib: Some(15360),
        max_cards_per_node: Some(1),
    };

    #[test]
    fn vgpu_pods_go_to_our_scheduler_and_other_routes_are_refused() {
        let lab = pod(include_str!("../../../deploy/examples/gpumem-pod-a.yaml"));
        assert_eq!(
            admit(&lab, "vgpu-scheduler", LIMITS),
            Verdict::SetScheduler("vgpu-scheduler".into())
        );
        let cpu = pod(
            "metadata: {name: c}\nspec: {containers: [{name: a, resources: {limits: {cpu: 1}}}]}",
        );
        assert_eq!(admit(&cpu, "vgpu-scheduler", LIMITS), Verdict::Unchanged);
        let volcano = pod("metadata: {name: v}\nspec: {schedulerName: volcano, containers: [{name: a, resources: {limits: {nvidia.com/gpu: 1}}}]}");
        assert_eq!(
            admit(&volcano, "vgpu-scheduler", LIMITS),
            Verdict::Deny("vgpu: pod default/v asks for vGPUs but sets spec.schedulerName \"volcano\": vGPU pods are placed by \"vgpu-scheduler\", which books their GPU share. Remove spec.schedulerName (the webhook sets it) or set it to \"vgpu-scheduler\"".into())
        );
        let pinned = pod("metadata: {name: v}\nspec: {nodeName: n1, containers: [{name: a, resources: {requests: {nvidia.com/gpucores: 10}}}]}");
        assert!(matches!(
            admit(&pinned, "vgpu-scheduler", LIMITS),
            Verdict::Deny(m) if m.contains("sets spec.nodeName \"n1\"")
        ));
        let cpu_pinned = pod("metadata: {name: c}\nspec: {nodeName: n1, schedulerName: volcano, containers: [{name: a}]}");
        assert_eq!(
            admit(&cpu_pinned, "vgpu-scheduler", LIMITS),
            Verdict::Unchanged
        );
    }

    #[test]
    fn impossible_requests_are_denied_with_clear_messages() {
        let deny = |limits: &str| {
            match admit(&pod(&format!("metadata: {{name: p, namespace: ml}}\nspec: {{containers: [{{name: app, resources: {{limits: {{{limits}}}}}}}]}}")), "s", LIMITS) {
            Verdict::Deny(m) => m,
            other => panic!("{other:?}"),
        }
        };
        assert_eq!(
            deny("nvidia.com/gpu: 1, nvidia.com/gpumem: 20000"),
            "vgpu: pod ml/p: container \"app\" asks 20000 MiB of nvidia.com/gpumem per vGPU, but the largest registered GPU has 15360 MiB"
        );
        assert_eq!(deny("nvidia.com/gpu: 1, nvidia.com/gpucores: 120"), "vgpu: pod ml/p: container \"app\": nvidia.com/gpucores is 120, want 0 to 100 (percent of one card)");
        assert!(deny(
            "nvidia.com/gpu: 1, nvidia.com/gpumem: 100, nvidia.com/gpumem-percentage: 10"
        )
        .contains("sets both nvidia.com/gpumem and nvidia.com/gpumem-percentage"));
        assert!(deny("nvidia.com/gpumem: 100")
            .contains("sets nvidia.com/gpumem without nvidia.com/gpu"));
        assert!(deny("nvidia.com/gpu: 2")
            .contains("asks 2 vGPUs, each on its own GPU, but no node has more than 1 GPUs"));
        // With no registered GPU the size checks cannot judge, so the pod is let through.
        let big = pod("metadata: {name: p}\nspec: {containers: [{name: app, resources: {limits: {nvidia.com/gpu: 1, nvidia.com/gpumem: 999999}}}]}");
        assert_eq!(
            admit(&big, "s", ClusterLimits::default()),
            Verdict::SetScheduler("s".into())
        );
    }
}
