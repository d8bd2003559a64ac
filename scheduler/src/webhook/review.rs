//! One admission request judged whole: who asks (the API server's `userInfo`), what operation,
//! the pod before and after. The two routes share it and differ in one thing only: the mutating
//! route sets `spec.schedulerName`, the validating route (which sees the object after every
//! mutating webhook ran) refuses a vGPU pod that does not carry it.

use super::admit::{admit, pod_key, ClusterLimits, Verdict};
use super::protected::{self, Writers};
use crate::podspec;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, Operation};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `POST /mutate`: may patch the pod.
    Mutate,
    /// `POST /validate`: allows or refuses, never patches.
    Validate,
}

/// What the webhook is configured with.
pub struct Rules<'a> {
    pub scheduler_name: &'a str,
    pub writers: &'a Writers,
    pub limits: ClusterLimits,
}

pub fn decide(req: &AdmissionRequest<Pod>, rules: &Rules, mode: Mode) -> Verdict {
    if req.kind.kind != "Pod" {
        return Verdict::Deny(format!(
            "vgpu: this webhook judges pods, not {:?}: fix the webhook configuration's rules",
            req.kind.kind
        ));
    }
    let user = req.user_info.username.as_deref().unwrap_or("");
    let (old, new) = match (&req.operation, req.object.as_ref()) {
        (Operation::Create, Some(new)) => (None, new),
        // The API server always sends the old object on UPDATE; without one, every protected
        // key in the new object counts as set by this request.
        (Operation::Update, Some(new)) => (req.old_object.as_ref(), new),
        (Operation::Create | Operation::Update, None) => {
            return Verdict::Deny(format!(
                "vgpu: the request for pod {:?} carries no object to check",
                req.name
            ))
        }
        (Operation::Delete | Operation::Connect, _) => return Verdict::Unchanged,
    };
    let key = pod_key(new);
    if !rules.writers.trusts(user) {
        if let Some(change) = protected::first_change(old, new) {
            return Verdict::Deny(change.refusal(&key, user));
        }
    }
    if req.operation == Operation::Update {
        // The spec's routing fields cannot change after creation; a user may still change a
        // policy annotation on a pending pod, and what they write must be a policy.
        if protected::user_annotations_changed(old, new) {
            if let Err(e) = podspec::pod_request(new) {
                return Verdict::Deny(format!("vgpu: pod {key}: {e}"));
            }
        }
        return Verdict::Unchanged;
    }
    match (admit(new, rules.scheduler_name, rules.limits), mode) {
        (Verdict::SetScheduler(_), Mode::Validate) => {
            let current = new
                .spec
                .as_ref()
                .and_then(|s| s.scheduler_name.as_deref())
                .unwrap_or("");
            Verdict::Deny(format!(
                "vgpu: pod {key} asks for vGPUs but reached validation with spec.schedulerName {current:?}: the vgpu mutating webhook sets it to {:?}, so it did not run or another webhook undid it. Check the MutatingWebhookConfiguration vgpu-scheduler, or set spec.schedulerName: {} in the pod",
                rules.scheduler_name, rules.scheduler_name
            ))
        }
        (v, _) => v,
    }
}
