//! The node's inventory for the scheduler: `hami.io/node-nvidia-register` (HAMi's JSON array) and the
//! handshake answer `hami.io/node-handshake: Reported_<time>`, written at start (over whatever a dead agent or
//! an earlier install left), on every change of the cards, and every 30 s.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Node as K8sNode;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::watch;
use vgpu_contract::annotations as ann;
use vgpu_contract::register::{self, card_type_from_nvml_name, DeviceInfo, MODE_HAMI_CORE};

use super::config::NodeConfig;
use super::FIELD_MANAGER;
use crate::gpus::Card;

/// How often the handshake is answered even when nothing changed (HAMi's period).
pub const PERIOD: Duration = Duration::from_secs(30);

pub fn inventory(cards: &[Card], config: &NodeConfig) -> Vec<DeviceInfo> {
    cards
        .iter()
        .map(|c| DeviceInfo {
            id: c.uuid.clone(),
            index: c.index,
            count: config.device_split_count,
            devmem: config.devmem(c.memory_mib),
            devcore: config.devcore(),
            kind: card_type_from_nvml_name(&c.name),
            numa: c.numa,
            mode: MODE_HAMI_CORE.to_string(),
            health: c.healthy,
        })
        .collect()
}

/// Go's `time.DateTime` layout (`2006-01-02 15:04:05`), in UTC: HAMi's scheduler parses it with
/// `time.Parse`, which reads a zoneless time as UTC.
pub fn hami_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn handshake(t: SystemTime) -> String {
    format!("Reported_{}", hami_time(t))
}

/// Writes both annotations with one merge patch (the handshake always fresh).
pub async fn publish(
    client: &kube::Client,
    node: &str,
    devices: &[DeviceInfo],
) -> Result<(), kube::Error> {
    let api: Api<K8sNode> = Api::all(client.clone());
    let patch = serde_json::json!({
        "metadata": { "annotations": {
            ann::NODE_REGISTER: register::encode(devices),
            ann::NODE_HANDSHAKE: handshake(SystemTime::now()),
        }}
    });
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    api.patch(node, &pp, &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Keeps the annotations current until `shutdown`: at once, on every change of `cards`, and every `period`.
pub async fn run(
    client: kube::Client,
    node: String,
    config: NodeConfig,
    mut cards: watch::Receiver<Vec<Card>>,
    period: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_failed = false;
    loop {
        let devices = inventory(&cards.borrow_and_update(), &config);
        match publish(&client, &node, &devices).await {
            Ok(()) => {
                if last_failed {
                    tracing::info!("node {node}: register annotation written again");
                }
                last_failed = false;
            }
            Err(e) => {
                tracing::warn!(
                    "node {node}: writing {}: {e} (retrying)",
                    ann::NODE_REGISTER
                );
                last_failed = true;
            }
        }
        let wait = if last_failed {
            Duration::from_secs(2).min(period)
        } else {
            period
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = cards.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_uses_gos_datetime_layout() {
        let t = UNIX_EPOCH + Duration::from_secs(1_706_000_000);
        assert_eq!(hami_time(t), "2024-01-23 08:53:20");
        assert_eq!(hami_time(UNIX_EPOCH), "1970-01-01 00:00:00");
        // A leap day and the end of a year.
        assert_eq!(
            hami_time(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29 00:00:00"
        );
        assert_eq!(
            hami_time(UNIX_EPOCH + Duration::from_secs(1_735_689_599)),
            "2024-12-31 23:59:59"
        );
        assert!(handshake(t).starts_with("Reported_2024-01-23 "));
    }

    #[test]
    fn inventory_scales_and_names_like_hami() {
        let cards = vec![
            Card {
                uuid: "GPU-a".into(),
                index: 0,
                name: "Tesla T4".into(),
                memory_mib: 15360,
                numa: 1,
                healthy: true,
                reason: None,
            },
            Card {
                uuid: "GPU-b".into(),
                index: 1,
                name: "NVIDIA H200".into(),
                memory_mib: 143771,
                numa: 0,
                healthy: false,
                reason: Some("critical XID 79".into()),
            },
        ];
        let cfg = NodeConfig {
            device_split_count: 4,
            device_memory_scaling: 2.0,
            device_core_scaling: 1.5,
            ..NodeConfig::default()
        };
        assert_eq!(
            register::encode(&inventory(&cards, &cfg)),
            r#"[{"id":"GPU-a","count":4,"devmem":30720,"devcore":150,"type":"NVIDIA-Tesla T4","numa":1,"mode":"hami-core","health":true},{"id":"GPU-b","index":1,"count":4,"devmem":287542,"devcore":150,"type":"NVIDIA H200","mode":"hami-core"}]"#
        );
    }
}
