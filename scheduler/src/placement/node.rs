//! A node's physical GPUs and what is reserved on each.

use super::hot::NodeHot;
use vgpu_contract::register::DeviceInfo;

/// One physical GPU as registered, with the lower-cased type kept for the filter check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    pub uuid: String,
    pub index: u32,
    pub kind: String,
    pub kind_lower: String,
    pub slots: u32,
    pub mem_mib: u64,
    pub cores: u32,
    pub numa: u32,
    pub healthy: bool,
    /// Named in the node's `hami.io/device-cordon`: running pods stay, new ones go elsewhere.
    pub cordoned: bool,
}

impl From<&DeviceInfo> for Card {
    fn from(d: &DeviceInfo) -> Self {
        Card {
            uuid: d.id.clone(),
            index: d.index,
            kind: d.kind.clone(),
            kind_lower: d.kind.to_lowercase(),
            slots: d.count,
            mem_mib: d.devmem,
            cores: d.devcore,
            numa: d.numa,
            healthy: d.health,
            cordoned: false,
        }
    }
}

/// Reservations on one card: slots, MiB and percent of compute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CardUsage {
    pub slots: u32,
    pub mem_mib: u64,
    pub cores: u32,
}

impl CardUsage {
    /// Saturating: a forged or corrupt figure can pin a card as full, never wrap it to free.
    pub fn add(&mut self, mem_mib: u64, cores: u32) {
        self.add_usage(CardUsage {
            slots: 1,
            mem_mib,
            cores,
        });
    }

    pub fn add_usage(&mut self, u: CardUsage) {
        self.slots = self.slots.saturating_add(u.slots);
        self.mem_mib = self.mem_mib.saturating_add(u.mem_mib);
        self.cores = self.cores.saturating_add(u.cores);
    }

    /// Saturating so that a pod recorded twice by mistake can never wrap usage into "free".
    pub fn sub_usage(&mut self, u: CardUsage) {
        self.slots = self.slots.saturating_sub(u.slots);
        self.mem_mib = self.mem_mib.saturating_sub(u.mem_mib);
        self.cores = self.cores.saturating_sub(u.cores);
    }

    /// Field by field, the larger of the two (an init container's peak against the app's sum).
    pub fn max(self, o: CardUsage) -> CardUsage {
        CardUsage {
            slots: self.slots.max(o.slots),
            mem_mib: self.mem_mib.max(o.mem_mib),
            cores: self.cores.max(o.cores),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeState {
    pub name: String,
    pub cards: Vec<Card>,
    pub usage: Vec<CardUsage>,
    /// The summary filter reads first; [`NodeState::refresh`] after changing `usage`.
    pub hot: NodeHot,
}

/// HAMi schedules NVIDIA pods only on entries whose type names the vendor; others (another
/// vendor's devices in the same annotation) are not cards for us.
pub fn is_nvidia(d: &DeviceInfo) -> bool {
    d.kind.to_ascii_lowercase().contains("nvidia")
}

impl NodeState {
    pub fn new(name: impl Into<String>, devices: &[DeviceInfo]) -> Self {
        Self::with_cordon(name, devices, &[])
    }

    /// `cordoned`: UUIDs from the node's `hami.io/device-cordon`.
    pub fn with_cordon(
        name: impl Into<String>,
        devices: &[DeviceInfo],
        cordoned: &[String],
    ) -> Self {
        let cards: Vec<Card> = devices
            .iter()
            .filter(|d| is_nvidia(d))
            .map(|d| Card {
                cordoned: cordoned.contains(&d.id),
                ..Card::from(d)
            })
            .collect();
        let usage = vec![CardUsage::default(); cards.len()];
        let hot = NodeHot::new(&cards, &usage);
        NodeState {
            name: name.into(),
            cards,
            usage,
            hot,
        }
    }

    pub fn refresh(&mut self) {
        self.hot = NodeHot::new(&self.cards, &self.usage);
    }

    pub fn card_by_uuid(&self, uuid: &str) -> Option<usize> {
        self.cards.iter().position(|c| c.uuid == uuid)
    }
}
