//! Node and GPU scheduler policies. Unknown words are an error, never a silent default
//! (HAMi #1589, #1931: users could not tell why their policy looked ignored).
//!
//! The GPU policy is HAMi v2.10's: one word (`binpack`, `spread`, `mutex`, `topology-aware`,
//! `numa`) or a comma chain (`binpack,numa`, `spread,mutex`). `binpack`, `spread` and `numa` are
//! sort keys in the order written; `mutex` (only idle cards) and `topology-aware` are filters.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Prefer the fullest node or card, keeping others free for large requests.
    Binpack,
    /// Prefer the emptiest node or card, spreading load and blast radius.
    Spread,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Binpack => "binpack",
            Policy::Spread => "spread",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownPolicy(pub String);

impl fmt::Display for UnknownPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown scheduler policy {:?}: want \"binpack\" or \"spread\" (GPU policy also \"mutex\", \"topology-aware\", \"numa\" or a comma chain such as \"binpack,numa\")",
            self.0
        )
    }
}

impl std::error::Error for UnknownPolicy {}

impl FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "binpack" => Ok(Policy::Binpack),
            "spread" => Ok(Policy::Spread),
            other => Err(UnknownPolicy(other.to_string())),
        }
    }
}

/// One key of the order cards are tried in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// Fullest card (by score) first.
    Binpack,
    /// Emptiest card first.
    Spread,
    /// Higher NUMA node first (HAMi sorts ascending and walks from the end).
    Numa,
    /// Idle cards first (HAMi's single-word `mutex` order).
    IdleFirst,
}

/// How cards are ordered and filtered within a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuPolicy {
    /// Sort keys in priority order; after them, the higher card index goes first.
    keys: [Option<SortKey>; 3],
    /// Only cards nobody uses (`ExclusiveDeviceAllocateConflict` otherwise).
    pub mutex: bool,
    /// `topology-aware`: HAMi picks the combination with the best link scores; see
    /// docs/scheduler.md for why this places as the sort keys do.
    pub topology: bool,
}

impl GpuPolicy {
    pub const BINPACK: GpuPolicy = GpuPolicy::single(SortKey::Binpack);
    pub const SPREAD: GpuPolicy = GpuPolicy::single(SortKey::Spread);

    /// A single word: score first, then NUMA, as HAMi's one-word order does.
    const fn single(key: SortKey) -> GpuPolicy {
        GpuPolicy {
            keys: [Some(key), Some(SortKey::Numa), None],
            mutex: false,
            topology: false,
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = SortKey> + '_ {
        self.keys.iter().flatten().copied()
    }
}

impl From<Policy> for GpuPolicy {
    fn from(p: Policy) -> Self {
        match p {
            Policy::Binpack => GpuPolicy::BINPACK,
            Policy::Spread => GpuPolicy::SPREAD,
        }
    }
}

impl FromStr for GpuPolicy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if !s.contains(',') {
            return match s {
                "binpack" => Ok(GpuPolicy::BINPACK),
                "spread" => Ok(GpuPolicy::SPREAD),
                "mutex" => Ok(GpuPolicy {
                    keys: [Some(SortKey::IdleFirst), Some(SortKey::Numa), None],
                    mutex: true,
                    topology: false,
                }),
                // HAMi's one-word order for anything but binpack and mutex is spread's.
                "topology-aware" => Ok(GpuPolicy {
                    topology: true,
                    ..GpuPolicy::SPREAD
                }),
                "numa" => Ok(GpuPolicy {
                    keys: [Some(SortKey::Numa), None, None],
                    mutex: false,
                    topology: false,
                }),
                other => Err(UnknownPolicy(other.to_string())),
            };
        }
        let mut p = GpuPolicy {
            keys: [None; 3],
            mutex: false,
            topology: false,
        };
        let mut n = 0;
        for word in s.split(',').map(str::trim) {
            let key = match word {
                "binpack" => SortKey::Binpack,
                "spread" => SortKey::Spread,
                "numa" => SortKey::Numa,
                "mutex" => {
                    p.mutex = true;
                    continue;
                }
                "topology-aware" => {
                    p.topology = true;
                    continue;
                }
                other => return Err(UnknownPolicy(other.to_string())),
            };
            if !p.keys().any(|k| k == key) {
                p.keys[n] = Some(key);
                n += 1;
            }
        }
        if n == 0 {
            // A chain of filters only: HAMi orders as spread.
            p.keys[0] = Some(SortKey::Spread);
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_words_parse_and_others_are_refused() {
        assert_eq!("binpack".parse::<Policy>(), Ok(Policy::Binpack));
        assert_eq!(" spread ".parse::<Policy>(), Ok(Policy::Spread));
        let e = "Binpak".parse::<Policy>().unwrap_err();
        assert!(e
            .to_string()
            .starts_with("unknown scheduler policy \"Binpak\": want \"binpack\" or \"spread\""));
        assert!("".parse::<Policy>().is_err());
        assert!("mutex".parse::<Policy>().is_err(), "not a node policy");
    }

    #[test]
    fn gpu_policies_and_chains_parse_as_hami_reads_them() {
        let p = |s: &str| s.parse::<GpuPolicy>().unwrap();
        let keys = |s: &str| p(s).keys().collect::<Vec<_>>();
        assert_eq!(keys("binpack"), [SortKey::Binpack, SortKey::Numa]);
        assert_eq!(keys("binpack,numa"), [SortKey::Binpack, SortKey::Numa]);
        assert_eq!(keys("numa,binpack"), [SortKey::Numa, SortKey::Binpack]);
        assert_eq!(
            keys("spread, binpack ,spread"),
            [SortKey::Spread, SortKey::Binpack]
        );
        assert_eq!(keys("numa"), [SortKey::Numa]);
        assert_eq!(keys("mutex"), [SortKey::IdleFirst, SortKey::Numa]);
        assert!(p("mutex").mutex && !p("mutex").topology);
        let chain = p("mutex,topology-aware");
        assert!(chain.mutex && chain.topology);
        assert_eq!(chain.keys().collect::<Vec<_>>(), [SortKey::Spread]);
        assert!(p("topology-aware").topology);
        assert!("binpack,nuam".parse::<GpuPolicy>().is_err());
        assert!("".parse::<GpuPolicy>().is_err());
    }
}
