//! A node's physical GPUs and what is reserved on each.

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
    pub healthy: bool,
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
            healthy: d.health,
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
    pub fn add(&mut self, mem_mib: u64, cores: u32) {
        self.slots += 1;
        self.mem_mib += mem_mib;
        self.cores += cores;
    }

    /// Saturating so that a pod recorded twice by mistake can never wrap usage into "free".
    pub fn sub(&mut self, mem_mib: u64, cores: u32) {
        self.slots = self.slots.saturating_sub(1);
        self.mem_mib = self.mem_mib.saturating_sub(mem_mib);
        self.cores = self.cores.saturating_sub(cores);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub name: String,
    pub cards: Vec<Card>,
    pub usage: Vec<CardUsage>,
}

impl NodeState {
    pub fn new(name: impl Into<String>, devices: &[DeviceInfo]) -> Self {
        let cards: Vec<Card> = devices.iter().map(Card::from).collect();
        let usage = vec![CardUsage::default(); cards.len()];
        NodeState {
            name: name.into(),
            cards,
            usage,
        }
    }

    pub fn card_by_uuid(&self, uuid: &str) -> Option<usize> {
        self.cards.iter().position(|c| c.uuid == uuid)
    }
}
