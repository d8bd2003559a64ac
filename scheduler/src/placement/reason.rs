//! Why a card or node does not fit, with HAMi's reason words in HAMi's check order.

use std::fmt;

/// Per-card reasons, in the order the checks run (HAMi's order), then the node-level ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FitReason {
    CardNotHealth,
    CardCordoned,
    CardTypeMismatch,
    CardUuidMismatch,
    CardTimeSlicingExhausted,
    CardInsufficientMemory,
    CardInsufficientCore,
    ExclusiveDeviceAllocateConflict,
    CardComputeUnitsExhausted,
    /// Some cards fit but fewer than the container asked for; counts the ones that fit.
    AllocatedCardsInsufficientRequest,
    NodeInsufficientDevice,
    /// The node carries no usable register annotation: no agent has reported its GPUs.
    NodeUnregistered,
}

impl FitReason {
    pub const COUNT: usize = 12;
    /// Every reason in check order.
    pub const ALL: [FitReason; FitReason::COUNT] = [
        FitReason::CardNotHealth,
        FitReason::CardCordoned,
        FitReason::CardTypeMismatch,
        FitReason::CardUuidMismatch,
        FitReason::CardTimeSlicingExhausted,
        FitReason::CardInsufficientMemory,
        FitReason::CardInsufficientCore,
        FitReason::ExclusiveDeviceAllocateConflict,
        FitReason::CardComputeUnitsExhausted,
        FitReason::AllocatedCardsInsufficientRequest,
        FitReason::NodeInsufficientDevice,
        FitReason::NodeUnregistered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FitReason::CardNotHealth => "CardNotHealth",
            FitReason::CardCordoned => "CardCordoned",
            FitReason::CardTypeMismatch => "CardTypeMismatch",
            FitReason::CardUuidMismatch => "CardUuidMismatch",
            FitReason::CardTimeSlicingExhausted => "CardTimeSlicingExhausted",
            FitReason::CardInsufficientMemory => "CardInsufficientMemory",
            FitReason::CardInsufficientCore => "CardInsufficientCore",
            FitReason::ExclusiveDeviceAllocateConflict => "ExclusiveDeviceAllocateConflict",
            FitReason::CardComputeUnitsExhausted => "CardComputeUnitsExhausted",
            FitReason::AllocatedCardsInsufficientRequest => "AllocatedCardsInsufficientRequest",
            FitReason::NodeInsufficientDevice => "NodeInsufficientDevice",
            FitReason::NodeUnregistered => "NodeUnregistered",
        }
    }
}

impl fmt::Display for FitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one node did not fit: how many of the node's `total` cards gave each reason. A fixed
/// array, not a list: thousands of nodes can miss in one filter, and none of them allocates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMiss {
    counts: [u32; FitReason::COUNT],
    pub total: u32,
}

impl NodeMiss {
    pub fn node_level(reason: FitReason) -> Self {
        let mut counts = [0; FitReason::COUNT];
        counts[reason as usize] = 1;
        NodeMiss { counts, total: 1 }
    }

    /// From per-reason card counts (indexed by `FitReason as usize`) over `total` cards.
    pub fn from_counts(counts: [u32; FitReason::COUNT], total: u32) -> Self {
        NodeMiss { counts, total }
    }

    pub fn count(&self, reason: FitReason) -> u32 {
        self.counts[reason as usize]
    }

    /// The reasons, once each, in check order.
    pub fn reasons(&self) -> impl Iterator<Item = FitReason> + '_ {
        FitReason::ALL
            .into_iter()
            .filter(|r| self.counts[*r as usize] > 0)
    }
}

impl fmt::Display for NodeMiss {
    /// HAMi's pod-level text: `1/4 CardInsufficientMemory, 3/4 CardNotHealth`, the parts sorted
    /// as strings as HAMi's `GenReason` sorts them; node-level reasons stand alone.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .reasons()
            .map(|reason| match reason {
                FitReason::NodeInsufficientDevice | FitReason::NodeUnregistered => {
                    reason.to_string()
                }
                _ => format!("{}/{} {reason}", self.count(reason), self.total),
            })
            .collect();
        parts.sort_unstable();
        f.write_str(&parts.join(", "))
    }
}
