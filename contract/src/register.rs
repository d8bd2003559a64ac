//! The node register annotation `hami.io/node-nvidia-register`. Owned by the scheduler work.
//!
//! HAMi ≥ 2.8 writes a JSON array; fields at their zero value are omitted (Go's `omitempty`), so a
//! missing `health` reads as unhealthy, exactly as HAMi reads it. Older releases wrote
//! `UUID,count,devmem,devcore,type,numa,health[,index,mode]:` per device, which [`decode`] accepts
//! too so a mixed-version cluster keeps scheduling.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One physical GPU as the agent registers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeviceInfo {
    pub id: String,
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub index: u32,
    /// Slots: how many vGPUs may share the card (HAMi's deviceSplitCount).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub count: u32,
    /// Schedulable memory in MiB (already multiplied by the memory scaling).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub devmem: u64,
    /// Schedulable compute, 100 per card times the core scaling.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub devcore: u32,
    #[serde(default, rename = "type", skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub numa: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mode: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub health: bool,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}
fn is_false(v: &bool) -> bool {
    !*v
}

/// HAMi's device mode for cards shared through the preload library.
pub const MODE_HAMI_CORE: &str = "hami-core";

/// HAMi prefixes the NVML name with `NVIDIA-` when it lacks the vendor word.
pub fn card_type_from_nvml_name(name: &str) -> String {
    if name.to_ascii_uppercase().contains("NVIDIA") {
        name.to_string()
    } else {
        format!("NVIDIA-{name}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterError {
    pub reason: String,
}

impl fmt::Display for RegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad {} annotation: {}",
            crate::annotations::NODE_REGISTER,
            self.reason
        )
    }
}

impl std::error::Error for RegisterError {}

/// The JSON array form HAMi ≥ 2.8 writes.
pub fn encode(devices: &[DeviceInfo]) -> String {
    serde_json::to_string(devices).expect("DeviceInfo always serialises")
}

/// Reads either form: a JSON array, or the legacy colon-separated string.
pub fn decode(input: &str) -> Result<Vec<DeviceInfo>, RegisterError> {
    let trimmed = input.trim();
    if trimmed.starts_with('[') {
        return decode_json(trimmed);
    }
    decode_legacy(trimmed)
}

/// The keys HAMi's `DeviceInfo` has. Go matches them case-insensitively, so we do too; any other
/// key is a typo (`helth`) that would otherwise read as "field absent", e.g. an unhealthy card.
const JSON_FIELDS: [&str; 13] = [
    "id",
    "index",
    "count",
    "devmem",
    "devcore",
    "type",
    "numa",
    "mode",
    "migProfiles",
    "migtemplate",
    "health",
    "devicevendor",
    "custominfo",
];

fn decode_json(text: &str) -> Result<Vec<DeviceInfo>, RegisterError> {
    let entries: Vec<serde_json::Map<String, serde_json::Value>> = serde_json::from_str(text)
        .map_err(|e| RegisterError {
            reason: format!("JSON array: {e}"),
        })?;
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let n = i + 1;
        let mut known = serde_json::Map::with_capacity(entry.len());
        for (key, value) in entry {
            let Some(field) = JSON_FIELDS.iter().find(|f| f.eq_ignore_ascii_case(&key)) else {
                return Err(RegisterError {
                    reason: format!(
                        "entry {n} has an unknown field {key:?} (known: {})",
                        JSON_FIELDS.join(", ")
                    ),
                });
            };
            known.insert((*field).to_string(), value);
        }
        let id = match known.get("id") {
            Some(serde_json::Value::String(id)) if !id.is_empty() => id.clone(),
            _ => {
                return Err(RegisterError {
                    reason: format!("entry {n} has no \"id\" (the card's UUID)"),
                })
            }
        };
        let d = serde_json::from_value(serde_json::Value::Object(known)).map_err(|e| {
            RegisterError {
                reason: format!("entry {n} ({id}): {e}"),
            }
        })?;
        out.push(d);
    }
    Ok(out)
}

/// `UUID,count,devmem,devcore,type,numa,health[,index,mode]:` per device.
pub fn encode_legacy(devices: &[DeviceInfo]) -> String {
    devices
        .iter()
        .map(|d| {
            format!(
                "{},{},{},{},{},{},{},{},{}:",
                d.id, d.count, d.devmem, d.devcore, d.kind, d.numa, d.health, d.index, d.mode
            )
        })
        .collect()
}

pub fn decode_legacy(input: &str) -> Result<Vec<DeviceInfo>, RegisterError> {
    let mut out = Vec::new();
    for entry in input.split(':').filter(|e| !e.trim().is_empty()) {
        let f: Vec<&str> = entry.split(',').map(str::trim).collect();
        if f.len() < 7 {
            return Err(RegisterError {
                reason: format!("legacy entry {entry:?} has {} fields, want at least 7 (UUID,count,devmem,devcore,type,numa,health)", f.len()),
            });
        }
        let num = |i: usize, what: &str| -> Result<u64, RegisterError> {
            f[i].parse::<u64>().map_err(|_| RegisterError {
                reason: format!("legacy entry {entry:?}: {what} {:?} is not a number", f[i]),
            })
        };
        let health = match f[6] {
            "true" => true,
            "false" => false,
            other => {
                return Err(RegisterError {
                    reason: format!(
                        "legacy entry {entry:?}: health {other:?} is neither true nor false"
                    ),
                })
            }
        };
        let index = if f.len() > 7 && !f[7].is_empty() {
            num(7, "index")? as u32
        } else {
            0
        };
        out.push(DeviceInfo {
            id: f[0].to_string(),
            count: num(1, "count")? as u32,
            devmem: num(2, "devmem")?,
            devcore: num(3, "devcore")? as u32,
            kind: f[4].to_string(),
            numa: num(5, "numa")? as u32,
            health,
            index,
            mode: f.get(8).map(|s| s.to_string()).unwrap_or_default(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v100() -> DeviceInfo {
        DeviceInfo {
            id: "GPU-0055".into(),
            index: 0,
            count: 10,
            devmem: 32768,
            devcore: 100,
            kind: "NVIDIA-Tesla V100-PCIE-32GB".into(),
            numa: 1,
            mode: MODE_HAMI_CORE.into(),
            health: true,
        }
    }

    #[test]
    fn json_omits_zero_fields_like_hami() {
        let s = encode(&[v100()]);
        assert_eq!(
            s,
            r#"[{"id":"GPU-0055","count":10,"devmem":32768,"devcore":100,"type":"NVIDIA-Tesla V100-PCIE-32GB","numa":1,"mode":"hami-core","health":true}]"#
        );
        assert_eq!(decode(&s).unwrap(), vec![v100()]);
    }

    #[test]
    fn missing_health_reads_as_unhealthy() {
        let d =
            decode(r#"[{"id":"GPU-x","index":1,"count":4,"devmem":1000,"devcore":100}]"#).unwrap();
        assert!(!d[0].health);
        assert_eq!(d[0].index, 1);
    }

    #[test]
    fn legacy_form_is_read() {
        let d = decode("GPU-a,10,15360,100,NVIDIA-Tesla T4,0,true:GPU-b,10,15360,100,NVIDIA-Tesla T4,0,false,1,hami-core:").unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].devmem, 15360);
        assert!(d[0].health);
        assert!(!d[1].health);
        assert_eq!(d[1].index, 1);
        assert_eq!(d[1].mode, "hami-core");
        assert_eq!(decode(&encode_legacy(&d)).unwrap(), d);
    }

    #[test]
    fn bad_input_names_the_problem() {
        assert!(decode("[{").unwrap_err().reason.contains("JSON"));
        // A typo must not read as "health absent", i.e. an unhealthy card.
        let e = decode(r#"[{"id":"GPU-a","count":4,"devmem":1000,"devcore":100,"helth":true}]"#)
            .unwrap_err();
        assert!(e.reason.contains("unknown field \"helth\""), "{e}");
        let e = decode(r#"[{"count":4,"devmem":1000,"health":true}]"#).unwrap_err();
        assert!(e.reason.contains("no \"id\""), "{e}");
        let e = decode(r#"[{"id":"GPU-a","health":"true"}]"#).unwrap_err();
        assert!(e.reason.contains("entry 1 (GPU-a)"), "{e}");
        // Go matches keys case-insensitively, and HAMi's other fields are accepted.
        let d = decode(r#"[{"ID":"GPU-a","Health":true,"devicevendor":"NVIDIA","custominfo":{}}]"#)
            .unwrap();
        assert!(d[0].health && d[0].id == "GPU-a");
        assert!(decode("GPU-a,10,15360:")
            .unwrap_err()
            .reason
            .contains("3 fields"));
        assert!(decode("GPU-a,10,lots,100,T4,0,true:")
            .unwrap_err()
            .reason
            .contains("devmem"));
        assert!(decode("GPU-a,10,1,100,T4,0,yes:")
            .unwrap_err()
            .reason
            .contains("health"));
    }

    #[test]
    fn nvml_names_get_the_vendor_prefix() {
        assert_eq!(card_type_from_nvml_name("Tesla T4"), "NVIDIA-Tesla T4");
        assert_eq!(
            card_type_from_nvml_name("NVIDIA H100 80GB HBM3"),
            "NVIDIA H100 80GB HBM3"
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn device() -> impl Strategy<Value = DeviceInfo> {
            (
                "GPU-[0-9a-f]{8}",
                0u32..16,
                0u32..64,
                0u64..200_000,
                0u32..400,
                "((NVIDIA[- ])?[A-Za-z0-9][A-Za-z0-9 -]{0,18}[A-Za-z0-9])?",
                0u32..4,
                prop_oneof![Just(String::new()), Just(MODE_HAMI_CORE.to_string())],
                any::<bool>(),
            )
                .prop_map(
                    |(id, index, count, devmem, devcore, kind, numa, mode, health)| DeviceInfo {
                        id,
                        index,
                        count,
                        devmem,
                        devcore,
                        kind,
                        numa,
                        mode,
                        health,
                    },
                )
        }

        proptest! {
            #[test]
            fn json_round_trips(devs in prop::collection::vec(device(), 0..8)) {
                prop_assert_eq!(decode(&encode(&devs)).unwrap(), devs);
            }

            /// The legacy form has no escaping and its reader trims fields: it round-trips for
            /// the types agents write (no ',' or ':', no outer spaces), which is all the
            /// generator makes.
            #[test]
            fn legacy_round_trips(devs in prop::collection::vec(device(), 1..8)) {
                prop_assert_eq!(decode(&encode_legacy(&devs)).unwrap(), devs);
            }

            #[test]
            fn decoding_garbage_fails_cleanly(s in ".{0,80}") {
                let _ = decode(&s);
            }
        }
    }
}
