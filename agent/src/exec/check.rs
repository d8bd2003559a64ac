//! The slice's values checked against the card before the command starts, so a typo is an error at once and
//! not a command that runs with every allocation refused.

use crate::observe::report::GpuReport;

/// What the slice will get on each CUDA ordinal the command sees.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    /// `--device` resolved to the card's UUID, when given (for messages: the command gets `--device` as typed).
    pub device_uuid: Option<String>,
    /// Memory limit in MiB per CUDA ordinal (0-based, as the command sees them).
    pub memory_mib: Vec<(u32, u64)>,
}

/// Resolves `--device` and `--gpumem`/`--gpumem-percentage` against the cards NVML lists.
pub fn check(
    gpus: &[GpuReport],
    device: Option<&str>,
    gpumem: Option<u64>,
    gpumem_percentage: Option<u64>,
) -> Result<Checked, String> {
    if gpus.is_empty() {
        return Err("no GPU found through NVML".into());
    }
    let list = || {
        gpus.iter()
            .map(|g| format!("{} {} ({} MiB)", g.index, g.uuid, g.memory_total >> 20))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let chosen: Vec<&GpuReport> = match device {
        None => gpus.iter().collect(),
        Some(d) => {
            let hit = match d.parse::<u32>() {
                Ok(i) => gpus.iter().find(|g| g.index == i),
                Err(_) => gpus.iter().find(|g| g.uuid == d),
            };
            match hit {
                Some(g) => vec![g],
                None => {
                    return Err(format!(
                        "--device {d}: no such GPU; this host has {}",
                        list()
                    ))
                }
            }
        }
    };
    let mut memory_mib = vec![];
    for (ordinal, g) in chosen.iter().enumerate() {
        let total = g.memory_total >> 20;
        let mib = match (gpumem, gpumem_percentage) {
            (Some(0), _) => return Err("--gpumem must be at least 1 MiB".into()),
            (Some(m), _) if m > total => {
                return Err(format!(
                    "--gpumem {m} MiB is more than GPU {} has ({total} MiB); the slice must fit the card",
                    g.index
                ))
            }
            (Some(m), _) => m,
            (None, Some(p)) => total * p / 100,
            (None, None) => continue,
        };
        memory_mib.push((ordinal as u32, mib));
    }
    Ok(Checked {
        device_uuid: device.map(|_| chosen[0].uuid.clone()),
        memory_mib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cards() -> Vec<GpuReport> {
        (0..2)
            .map(|i| GpuReport {
                index: i,
                uuid: format!("GPU-{i}"),
                name: "sim".into(),
                memory_total: 15360 << 20,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn values_past_the_card_or_unknown_devices_are_errors() {
        let g = cards();
        let e = check(&g, None, Some(99_999_999_999_999), None).unwrap_err();
        assert!(e.contains("more than GPU 0 has (15360 MiB)"), "{e}");
        let e = check(&g, Some("3"), Some(4000), None).unwrap_err();
        assert!(e.contains("--device 3: no such GPU"), "{e}");
        assert!(check(&g, Some("GPU-nope"), Some(4000), None).is_err());
        assert!(check(&[], None, Some(4000), None).is_err());
        assert!(check(&g, None, Some(0), None).is_err());
    }

    #[test]
    fn a_chosen_device_is_ordinal_zero_and_percentages_use_its_size() {
        let g = cards();
        let c = check(&g, Some("GPU-1"), None, Some(25)).unwrap();
        assert_eq!(c.device_uuid.as_deref(), Some("GPU-1"));
        assert_eq!(c.memory_mib, [(0, 3840)]);
        let c = check(&g, None, Some(4000), None).unwrap();
        assert_eq!(c.memory_mib, [(0, 4000), (1, 4000)]);
    }
}
