//! Bind: write HAMi's annotations in one patch, then bind; on failure give the reservation back.

use super::wire::{ExtenderBindingArgs, ExtenderBindingResult};
use super::{unix_now, Extender};
use crate::events;
use crate::kubeapi::{ClusterApi, PodRef};
use std::collections::BTreeMap;
use vgpu_contract::annotations as ann;
use vgpu_contract::placement_seal;

impl<A: ClusterApi> Extender<A> {
    pub async fn bind(&self, args: ExtenderBindingArgs) -> ExtenderBindingResult {
        let pod = PodRef {
            namespace: args.pod_namespace.clone(),
            name: args.pod_name.clone(),
            uid: args.pod_uid.clone(),
        };
        let key = format!("{}/{}", pod.namespace, pod.name);
        let fail = |msg: String| {
            self.emit(&pod, "Warning", events::BINDING_FAILED, msg.clone());
            ExtenderBindingResult { error: msg }
        };
        let (devices, vgpu_time) = {
            let mut st = self.state.lock().unwrap();
            let Some(placement) = st.ledger.placement(&pod.uid).cloned() else {
                return fail(format!(
                    "pod {key} ({}) has no vGPU reservation: it was not filtered by this scheduler or the reservation expired; kube-scheduler will retry",
                    pod.uid
                ));
            };
            if placement.node != args.node {
                return fail(format!(
                    "pod {key} is reserved on node {}, not {}: filter it again",
                    placement.node, args.node
                ));
            }
            // A repeated bind (a retry after a lost answer) writes nothing: rewriting the annotations of a
            // pod the node agent may already have served would put it back to "allocating".
            let vgpu_time = match st.pending.get_mut(&pod.uid) {
                Some(p) if p.bound => return ExtenderBindingResult::default(),
                Some(p) if p.binding => {
                    return ExtenderBindingResult {
                        error: format!(
                            "pod {key}: a bind to node {} is already in progress",
                            args.node
                        ),
                    }
                }
                Some(p) => {
                    p.binding = true;
                    p.vgpu_time
                }
                // The pod watch has shown it with its annotations: bound already.
                None => return ExtenderBindingResult::default(),
            };
            (placement.devices.encode(), vgpu_time)
        };

        let bind_time = unix_now().to_string();
        let mut annotations = BTreeMap::from([
            (ann::VGPU_NODE.to_string(), args.node.clone()),
            (ann::VGPU_TIME.to_string(), vgpu_time.to_string()),
            (
                ann::BIND_PHASE.to_string(),
                ann::BindPhase::Allocating.as_str().to_string(),
            ),
        ]);
        if let Some(key) = &self.seal_key {
            let seal = placement_seal::seal(
                key,
                &placement_seal::Placement {
                    pod_uid: &pod.uid,
                    namespace: &pod.namespace,
                    name: &pod.name,
                    node: &args.node,
                    devices: &devices,
                    bind_time: &bind_time,
                },
            );
            annotations.insert(placement_seal::SEAL_ANNOTATION.to_string(), seal);
            annotations.insert(
                placement_seal::SEALED_DEVICES_ANNOTATION.to_string(),
                devices.clone(),
            );
        }
        annotations.insert(ann::DEVICES_TO_ALLOCATE.to_string(), devices);
        annotations.insert(ann::BIND_TIME.to_string(), bind_time);
        let result = match self
            .api
            .annotate_pod(&pod, annotations, Some(&args.node))
            .await
        {
            Err(e) => Err((
                format!("pod {key}: writing the vGPU annotations failed: {e}"),
                false,
            )),
            Ok(()) => self.api.bind_pod(&pod, &args.node).await.map_err(|e| {
                (
                    format!("pod {key}: binding to node {} failed: {e}", args.node),
                    true,
                )
            }),
        };
        match result {
            Ok(()) => {
                // The entry stays (marked binding, so it never expires) until the pod watch
                // reports the pod with its annotations: a relist that races this bind must not
                // drop a placement the API has not shown yet.
                if let Some(p) = self.state.lock().unwrap().pending.get_mut(&pod.uid) {
                    p.bound = true;
                }
                self.emit(
                    &pod,
                    "Normal",
                    events::BINDING_SUCCEED,
                    events::binding_succeed(&args.node, &key),
                );
                ExtenderBindingResult::default()
            }
            Err((msg, annotated)) => {
                {
                    let mut st = self.state.lock().unwrap();
                    st.pending.remove(&pod.uid);
                    st.ledger.release(&pod.uid);
                }
                if annotated {
                    let phase = BTreeMap::from([(
                        ann::BIND_PHASE.to_string(),
                        ann::BindPhase::Failed.as_str().to_string(),
                    )]);
                    if let Err(e) = self.api.annotate_pod(&pod, phase, None).await {
                        tracing::warn!(pod = %key, "could not mark bind-phase failed: {e}");
                    }
                }
                fail(msg)
            }
        }
    }
}
