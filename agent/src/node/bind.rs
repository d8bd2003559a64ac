//! What the ledger is told about a container once the kubelet confirmed it: the ledger's own
//! [`Binding`](crate::ledger::bindings::Binding) (cgroup from what the kubelet and the runtime report, limits from
//! the sealed placement, source [`Allocate`](crate::ledger::bindings::Source::Allocate)), again for each restart
//! of the container, and when its pod has left the node, that the binding goes. `run.rs` implements [`ContainerBinder`] over the ledger; tests record.

use crate::ledger::bindings::Binding;

pub trait ContainerBinder: Send + Sync {
    fn bind(&self, binding: Binding);
    /// Forgets the node side's binding of `cgroup` (its container was restarted under another cgroup).
    fn unbind(&self, cgroup: &str);
    /// Forgets the bindings the node side made for pods whose UID `live` does not hold; returns their cgroups.
    fn unbind_gone(&self, live: &dyn Fn(&str) -> bool) -> Vec<String>;
}
