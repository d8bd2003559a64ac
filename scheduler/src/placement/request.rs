//! What a pod asks for, already parsed from its spec and annotations (see `podspec` for that).

use super::policy::{GpuPolicy, Policy};
use std::cell::RefCell;

/// Memory per vGPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemRequest {
    /// `nvidia.com/gpumem`.
    MiB(u64),
    /// `nvidia.com/gpumem-percentage`, of each chosen card.
    Percent(u32),
    /// Neither given: the configured default applies.
    Default,
}

/// What a request carries when it names no memory. HAMi's default is the whole card
/// (`nvidia.com/gpu: 1` alone takes 100%), which surprises users (HAMi #194, #1173), so it is
/// configurable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultMemory {
    MiB(u64),
    Percent(u32),
}

impl Default for DefaultMemory {
    fn default() -> Self {
        DefaultMemory::Percent(100)
    }
}

impl MemRequest {
    /// MiB this request takes on a card of `card_mem` MiB.
    pub fn resolve(self, card_mem: u64, default: DefaultMemory) -> u64 {
        match self {
            MemRequest::MiB(m) => m,
            MemRequest::Percent(p) => percent_of(card_mem, p),
            MemRequest::Default => match default {
                DefaultMemory::MiB(m) => m,
                DefaultMemory::Percent(p) => percent_of(card_mem, p),
            },
        }
    }
}

/// `p`% of `mem`, without overflow whatever a node registered.
fn percent_of(mem: u64, p: u32) -> u64 {
    (u128::from(mem) * u128::from(p) / 100) as u64
}

/// One container's vGPU request. `gpus == 0` marks a container without GPUs, kept so device
/// lists stay aligned with the pod's containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerRequest {
    pub gpus: u32,
    pub mem: MemRequest,
    /// Percent of the card's compute per vGPU; 0 means no cap.
    pub cores: u32,
}

impl ContainerRequest {
    pub const NONE: ContainerRequest = ContainerRequest {
        gpus: 0,
        mem: MemRequest::Default,
        cores: 0,
    };
}

/// `nvidia.com/use-gputype` and friends. Types match as case-insensitive substrings of the card
/// type; UUIDs match exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CardFilter {
    /// Stored lower-cased so the per-card check does no allocation.
    pub use_types: Vec<String>,
    pub nouse_types: Vec<String>,
    pub use_uuids: Vec<String>,
    pub nouse_uuids: Vec<String>,
    /// Verdicts per card type already seen: a cluster has a handful of types but thousands of
    /// cards, and a substring search per card was most of a type-filtered filter's time.
    pub memo: TypeMemo,
}

/// Verdicts by lower-cased type and by its `hot::type_hash`.
#[derive(Debug, Clone, Default)]
pub struct TypeMemo(RefCell<Vec<(String, u64, bool)>>);

/// A cache, not part of what the filter means.
impl PartialEq for TypeMemo {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for TypeMemo {}

impl CardFilter {
    pub fn type_ok(&self, card_type_lower: &str) -> bool {
        if self.use_types.is_empty() && self.nouse_types.is_empty() {
            return true;
        }
        if let Some((_, _, v)) = self
            .memo
            .0
            .borrow()
            .iter()
            .find(|(k, _, _)| k == card_type_lower)
        {
            return *v;
        }
        let hit = |list: &[String]| list.iter().any(|t| card_type_lower.contains(t.as_str()));
        let v = (self.use_types.is_empty() || hit(&self.use_types)) && !hit(&self.nouse_types);
        self.memo.0.borrow_mut().push((
            card_type_lower.to_string(),
            super::hot::type_hash(card_type_lower),
            v,
        ));
        v
    }

    /// The verdict on a type already judged by [`CardFilter::type_ok`], by its hash.
    pub fn type_ok_hashed(&self, hash: u64) -> Option<bool> {
        self.memo
            .0
            .borrow()
            .iter()
            .find(|(_, h, _)| *h == hash)
            .map(|(_, _, v)| *v)
    }

    pub fn uuid_ok(&self, uuid: &str) -> bool {
        let hit = |list: &[String]| list.iter().any(|u| u == uuid);
        (self.use_uuids.is_empty() || hit(&self.use_uuids)) && !hit(&self.nouse_uuids)
    }

    /// Parses a comma list as the annotations carry it, dropping blanks.
    pub fn list(value: &str, lower: bool) -> Vec<String> {
        value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                if lower {
                    s.to_lowercase()
                } else {
                    s.to_string()
                }
            })
            .collect()
    }
}

/// A whole pod's request: containers in pod order (init containers first), its card filter and
/// its policy overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRequest {
    pub containers: Vec<ContainerRequest>,
    /// How many of `containers` are init containers. They run one at a time before the app
    /// containers, so the pod books the larger of their peak and the app containers' sum.
    pub init: usize,
    pub filter: CardFilter,
    pub node_policy: Option<Policy>,
    pub gpu_policy: Option<GpuPolicy>,
}

impl PodRequest {
    pub fn wants_gpus(&self) -> bool {
        self.containers.iter().any(|c| c.gpus > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_resolves_per_card() {
        let d = DefaultMemory::default();
        assert_eq!(MemRequest::MiB(4000).resolve(15360, d), 4000);
        assert_eq!(MemRequest::Percent(50).resolve(15360, d), 7680);
        assert_eq!(MemRequest::Default.resolve(15360, d), 15360);
        assert_eq!(
            MemRequest::Default.resolve(15360, DefaultMemory::MiB(2000)),
            2000
        );
        assert_eq!(
            MemRequest::Default.resolve(15360, DefaultMemory::Percent(25)),
            3840
        );
    }

    #[test]
    fn filters_match_like_hami() {
        let f = CardFilter {
            use_types: CardFilter::list("A100, h100", true),
            nouse_types: CardFilter::list("pcie", true),
            use_uuids: vec![],
            nouse_uuids: CardFilter::list("GPU-bad", false),
            ..Default::default()
        };
        // Twice each: the second answer comes from the memo and must be the same.
        for _ in 0..2 {
            assert!(f.type_ok("nvidia h100 80gb hbm3"));
            assert!(f.type_ok("nvidia-a100-sxm4-40gb"));
            assert!(!f.type_ok("nvidia-a100-pcie-40gb"));
        }
        assert!(!f.type_ok("nvidia-tesla t4"));
        assert!(f.uuid_ok("GPU-good"));
        assert!(!f.uuid_ok("GPU-bad"));
        let only = CardFilter {
            use_uuids: vec!["GPU-a".into()],
            ..Default::default()
        };
        assert!(only.uuid_ok("GPU-a"));
        assert!(!only.uuid_ok("GPU-ab"));
    }
}
