//! Pod metadata that only vgpu writes, and who vgpu is. The scheduler's book and the agent's
//! Allocate trust `hami.io/*` and `vgpu.io/*` annotations and the `hami.io/vgpu-node` label, so
//! anyone else adding, changing or removing one could make the book count capacity nobody holds,
//! drop a pod from it, or hand a container another pod's devices.

use k8s_openapi::api::core::v1::Pod;
use std::collections::BTreeMap;
use vgpu_contract::annotations as ann;

/// The accounts that write vgpu's metadata, by the username the API server authenticated
/// (`request.userInfo.username`): nothing a request body says can change who that is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writers {
    pub scheduler: String,
    pub agent: String,
}

impl Writers {
    pub const DEFAULT_SCHEDULER: &'static str = "system:serviceaccount:vgpu-system:vgpu-scheduler";
    pub const DEFAULT_AGENT: &'static str = "system:serviceaccount:vgpu-system:vgpu-agent";

    pub fn trusts(&self, username: &str) -> bool {
        // Exact match: a service account of the same name in another namespace is someone else.
        !username.is_empty() && (username == self.scheduler || username == self.agent)
    }
}

impl Default for Writers {
    fn default() -> Self {
        Writers {
            scheduler: Self::DEFAULT_SCHEDULER.into(),
            agent: Self::DEFAULT_AGENT.into(),
        }
    }
}

const PROTECTED_PREFIXES: [&str; 2] = ["hami.io/", "vgpu.io/"];

/// The `hami.io/` annotations HAMi documents for users to set.
pub const USER_ANNOTATIONS: [&str; 2] = [ann::NODE_SCHEDULER_POLICY, ann::GPU_SCHEDULER_POLICY];

fn has_prefix(key: &str, prefix: &str) -> bool {
    // Keys are validated lowercase by the API server, but the mutating webhook sees them before
    // validation: compare without case so no spelling slips past.
    // Bytes, not a str slice: a key the tenant wrote may put a multi-byte character there.
    key.as_bytes()
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
}

pub fn is_protected_annotation(key: &str) -> bool {
    PROTECTED_PREFIXES.iter().any(|p| has_prefix(key, p))
        && !USER_ANNOTATIONS.iter().any(|u| key.eq_ignore_ascii_case(u))
}

pub fn is_protected_label(key: &str) -> bool {
    key.eq_ignore_ascii_case(ann::VGPU_NODE) || has_prefix(key, "vgpu.io/")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Annotation,
    Label,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    Add,
    Change,
    Remove,
}

/// One protected key whose value a request would set, change or drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub field: Field,
    pub key: String,
    pub edit: Edit,
}

impl Change {
    /// Why the request is refused, and what to do instead.
    pub fn refusal(&self, pod_key: &str, username: &str) -> String {
        let field = match self.field {
            Field::Annotation => "annotation",
            Field::Label => "label",
        };
        let verb = match self.edit {
            Edit::Add => "set",
            Edit::Change => "change",
            Edit::Remove => "remove",
        };
        let fix = match self.edit {
            Edit::Add => "remove it from the pod (or from the template that makes the pod); vgpu writes it when it places the pod",
            Edit::Change | Edit::Remove => "leave it as vgpu wrote it; to place the pod anew, delete it and create it again",
        };
        format!(
            "vgpu: pod {pod_key}: {field} {:?} is written only by the vgpu scheduler and agent, and user {username:?} may not {verb} it: {fix}",
            self.key
        )
    }
}

type Map = BTreeMap<String, String>;

fn diff(
    field: Field,
    old: Option<&Map>,
    new: Option<&Map>,
    protected: fn(&str) -> bool,
) -> Option<Change> {
    let empty = Map::new();
    let (old, new) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
    let change = |key: &String, edit| Change {
        field,
        key: key.clone(),
        edit,
    };
    for (k, v) in new.iter().filter(|(k, _)| protected(k)) {
        match old.get(k) {
            None => return Some(change(k, Edit::Add)),
            Some(o) if o != v => return Some(change(k, Edit::Change)),
            Some(_) => {}
        }
    }
    old.keys()
        .filter(|k| protected(k) && !new.contains_key(*k))
        .map(|k| change(k, Edit::Remove))
        .next()
}

/// The first protected key that differs between `old` (none on CREATE) and `new`.
pub fn first_change(old: Option<&Pod>, new: &Pod) -> Option<Change> {
    let (om, nm) = (old.map(|p| &p.metadata), &new.metadata);
    diff(
        Field::Annotation,
        om.and_then(|m| m.annotations.as_ref()),
        nm.annotations.as_ref(),
        is_protected_annotation,
    )
    .or_else(|| {
        diff(
            Field::Label,
            om.and_then(|m| m.labels.as_ref()),
            nm.labels.as_ref(),
            is_protected_label,
        )
    })
}

/// Whether a user-settable `hami.io/` annotation differs between `old` and `new`.
pub fn user_annotations_changed(old: Option<&Pod>, new: &Pod) -> bool {
    let get = |p: Option<&Pod>, k: &str| {
        p.and_then(|p| p.metadata.annotations.as_ref())
            .and_then(|a| a.get(k))
            .cloned()
    };
    USER_ANNOTATIONS
        .iter()
        .any(|k| get(old, k) != get(Some(new), k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_cover_every_spelling_and_spare_the_documented_user_keys() {
        for k in [
            "hami.io/vgpu-node",
            "HAMI.io/vgpu-node",
            "hami.io/",
            "vgpu.io/placement-seal",
            "Vgpu.IO/devices-sealed",
            "hami.io/node-scheduler-policy-x",
        ] {
            assert!(is_protected_annotation(k), "{k}");
        }
        for k in [
            "hami.io/node-scheduler-policy",
            "hami.io/gpu-scheduler-policy",
            "nvidia.com/use-gputype",
            "example.hami.io/x",
            "hami.io",
            "hami-io/x",
            "hamé.io/x",
            "vgpué",
            "ééééé",
            // Byte 8 falls inside the last character: a str slice there would panic.
            "abcdefgé",
            "",
        ] {
            assert!(!is_protected_annotation(k), "{k}");
        }
        assert!(is_protected_label("hami.io/vgpu-node"));
        assert!(is_protected_label("vgpu.io/anything"));
        assert!(!is_protected_label("app"));
        assert!(!is_protected_label("abcdefgé"));
    }

    #[test]
    fn writers_match_exactly() {
        let w = Writers::default();
        assert!(w.trusts(Writers::DEFAULT_SCHEDULER));
        assert!(w.trusts(Writers::DEFAULT_AGENT));
        for u in [
            "",
            "vgpu-scheduler",
            "system:serviceaccount:vgpu-system:vgpu-scheduler ",
            "system:serviceaccount:other:vgpu-agent",
        ] {
            assert!(!w.trusts(u), "{u:?}");
        }
        let blank = Writers {
            scheduler: String::new(),
            agent: String::new(),
        };
        assert!(!blank.trusts(""), "an anonymous request is nobody's writer");
    }
}
