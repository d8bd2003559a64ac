//! HAMi's node knobs, read from the file the DaemonSet mounts from a ConfigMap (`--config`).
//!
//! YAML, camelCase keys as in HAMi's `device-config.yaml`, either at the top level or under `nvidia:` (so
//! HAMi's own file works unchanged; its other `nvidia:` keys are ignored):
//! ```yaml
//! deviceSplitCount: 10      # vGPUs per card (slots), at least 1
//! deviceMemoryScaling: 1    # > 1 oversubscribes memory: registered devmem = MiB × this
//! deviceCoreScaling: 1      # registered devcore = 100 × this
//! ```

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeConfig {
    pub device_split_count: u32,
    pub device_memory_scaling: f64,
    pub device_core_scaling: f64,
    /// vgpu's own: the period (ms) of every card in which the agent places compute windows (10 to 5000).
    pub pacing_period_ms: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            device_split_count: 10,
            device_memory_scaling: 1.0,
            device_core_scaling: 1.0,
            pacing_period_ms: vgpu_contract::env::DEFAULT_PACING_PERIOD_MS,
        }
    }
}

/// HAMi's `nvidia:` section: its other keys are HAMi's business and are ignored.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Knobs {
    device_split_count: Option<u32>,
    device_memory_scaling: Option<f64>,
    device_core_scaling: Option<f64>,
}

/// The file: the knobs at the top level, or HAMi's `nvidia:` section. Unknown top-level keys are refused so
/// a misspelt knob does not silently keep its default.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    device_split_count: Option<u32>,
    device_memory_scaling: Option<f64>,
    device_core_scaling: Option<f64>,
    pacing_period_ms: Option<u64>,
    nvidia: Option<Knobs>,
}

impl NodeConfig {
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the node config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("node config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let f: File = serde_yaml::from_str(text).context(
            "not the expected YAML (keys: deviceSplitCount, deviceMemoryScaling, deviceCoreScaling, \
             at the top level or under nvidia:; pacingPeriodMs at the top level)",
        )?;
        let n = f.nvidia.unwrap_or_default();
        let d = Self::default();
        let c = Self {
            device_split_count: f
                .device_split_count
                .or(n.device_split_count)
                .unwrap_or(d.device_split_count),
            device_memory_scaling: f
                .device_memory_scaling
                .or(n.device_memory_scaling)
                .unwrap_or(d.device_memory_scaling),
            device_core_scaling: f
                .device_core_scaling
                .or(n.device_core_scaling)
                .unwrap_or(d.device_core_scaling),
            pacing_period_ms: f.pacing_period_ms.unwrap_or(d.pacing_period_ms),
        };
        if !vgpu_contract::limits::valid_pacing_period(c.pacing_period_ms.saturating_mul(1_000_000))
        {
            bail!(
                "pacingPeriodMs is {}: it must be from 10 to 5000 milliseconds",
                c.pacing_period_ms
            );
        }
        if c.device_split_count == 0 {
            bail!("deviceSplitCount is 0: a card needs at least one slot (HAMi's default is 10)");
        }
        for (name, v) in [
            ("deviceMemoryScaling", c.device_memory_scaling),
            ("deviceCoreScaling", c.device_core_scaling),
        ] {
            if !v.is_finite() || v <= 0.0 {
                bail!("{name} is {v}: it must be a positive number (1 = the card as it is)");
            }
        }
        Ok(c)
    }

    /// Schedulable memory of a card of `mib` MiB.
    pub fn devmem(&self, mib: u64) -> u64 {
        (mib as f64 * self.device_memory_scaling) as u64
    }

    pub fn devcore(&self) -> u32 {
        (100.0 * self.device_core_scaling) as u32
    }

    /// Memory scaling above 1 lets slices add up to more than the card (HAMi sets `CUDA_OVERSUBSCRIBE`).
    pub fn oversubscribed(&self) -> bool {
        self.device_memory_scaling > 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_hamis() {
        let c = NodeConfig::parse("").unwrap();
        assert_eq!(c, NodeConfig::default());
        assert_eq!(c.device_split_count, 10);
        assert_eq!((c.devmem(15360), c.devcore()), (15360, 100));
        assert!(!c.oversubscribed());
    }

    #[test]
    fn top_level_and_hami_section_are_read() {
        let c = NodeConfig::parse("deviceSplitCount: 4\ndeviceMemoryScaling: 1.5\n").unwrap();
        assert_eq!(c.device_split_count, 4);
        assert_eq!(c.devmem(1000), 1500);
        assert!(c.oversubscribed());
        let hami = "nvidia:\n  resourceCountName: nvidia.com/gpu\n  deviceSplitCount: 3\n  deviceCoreScaling: 2\n  defaultMemory: 0\n";
        let c = NodeConfig::parse(hami).unwrap();
        assert_eq!((c.device_split_count, c.devcore()), (3, 200));
        assert_eq!(c.device_memory_scaling, 1.0);
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        let e = format!(
            "{:#}",
            NodeConfig::parse("deviceSplitCount: 0").unwrap_err()
        );
        assert!(e.contains("deviceSplitCount"), "{e}");
        let e = format!(
            "{:#}",
            NodeConfig::parse("deviceMemoryScaling: -1").unwrap_err()
        );
        assert!(e.contains("deviceMemoryScaling"), "{e}");
        let e = format!(
            "{:#}",
            NodeConfig::parse("deviceSplitcount: 5").unwrap_err()
        );
        assert!(e.contains("deviceSplitcount"), "misspelt key named: {e}");
        assert!(NodeConfig::parse("deviceSplitCount: many").is_err());
        assert!(NodeConfig::parse("pacingPeriodMs: 5").is_err());
        assert_eq!(
            NodeConfig::parse("pacingPeriodMs: 50")
                .unwrap()
                .pacing_period_ms,
            50
        );
    }
}
