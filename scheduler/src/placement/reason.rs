//! Why a card or node does not fit, with HAMi's reason words in HAMi's check order.

use std::fmt;

/// Per-card reasons, in the order the checks run (HAMi's order), then the node-level ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FitReason {
    CardNotHealth,
    CardTypeMismatch,
    CardUuidMismatch,
    CardTimeSlicingExhausted,
    CardInsufficientMemory,
    CardInsufficientCore,
    ExclusiveDeviceAllocateConflict,
    CardComputeUnitsExhausted,
    NodeInsufficientDevice,
    /// The node carries no usable register annotation: no agent has reported its GPUs.
    NodeUnregistered,
}

impl FitReason {
    pub const COUNT: usize = 10;
    /// Every reason in check order.
    pub const ALL: [FitReason; FitReason::COUNT] = [
        FitReason::CardNotHealth,
        FitReason::CardTypeMismatch,
        FitReason::CardUuidMismatch,
        FitReason::CardTimeSlicingExhausted,
        FitReason::CardInsufficientMemory,
        FitReason::CardInsufficientCore,
        FitReason::ExclusiveDeviceAllocateConflict,
        FitReason::CardComputeUnitsExhausted,
        FitReason::NodeInsufficientDevice,
        FitReason::NodeUnregistered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FitReason::CardNotHealth => "CardNotHealth",
            FitReason::CardTypeMismatch => "CardTypeMismatch",
            FitReason::CardUuidMismatch => "CardUuidMismatch",
            FitReason::CardTimeSlicingExhausted => "CardTimeSlicingExhausted",
            FitReason::CardInsufficientMemory => "CardInsufficientMemory",
            FitReason::CardInsufficientCore => "CardInsufficientCore",
            FitReason::ExclusiveDeviceAllocateConflict => "ExclusiveDeviceAllocateConflict",
            FitReason::CardComputeUnitsExhausted => "CardComputeUnitsExhausted",
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

/// Why one node did not fit: each reason with how many of the node's `total` cards gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMiss {
    pub counts: Vec<(FitReason, u32)>,
    pub total: u32,
}

impl NodeMiss {
    pub fn node_level(reason: FitReason) -> Self {
        NodeMiss {
            counts: vec![(reason, 1)],
            total: 1,
        }
    }

    /// The reasons, once each, in check order.
    pub fn reasons(&self) -> impl Iterator<Item = FitReason> + '_ {
        self.counts.iter().map(|(r, _)| *r)
    }
}

impl fmt::Display for NodeMiss {
    /// HAMi's pod-level text: `1/4 CardInsufficientMemory, 3/4 CardNotHealth`; node-level reasons
    /// stand alone.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (reason, n)) in self.counts.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match reason {
                FitReason::NodeInsufficientDevice | FitReason::NodeUnregistered => {
                    write!(f, "{reason}")?
                }
                _ => write!(f, "{n}/{} {reason}", self.total)?,
            }
        }
        Ok(())
    }
}
