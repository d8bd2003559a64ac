//! The scheduler's seal on a placement: an HMAC-SHA256, keyed by a secret the scheduler and the agents share
//! (a Secret made at install), over what the scheduler decided for one pod.
//!
//! Allocate serves a pod only if its seal verifies, so a placement a user wrote (forged `hami.io/*`
//! annotations), a pod bound with `nodeName` or by another scheduler, or a placement copied from another pod
//! (the pod UID is inside the MAC and is assigned by the API server) is refused, whatever the webhook let in.
//! Annotation: [`SEAL_ANNOTATION`], value `v1:<hex>`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const SEAL_ANNOTATION: &str = "vgpu.io/placement-seal";
/// The device list the seal covers, as the scheduler wrote it at bind (`hami.io/vgpu-devices-to-allocate` is
/// emptied as containers are allocated, so the original is kept here).
pub const SEALED_DEVICES_ANNOTATION: &str = "vgpu.io/devices-sealed";
const VERSION: &str = "v1";

/// The key as both sides take it from the Secret's file: its bytes with surrounding ASCII whitespace removed
/// (a key written by hand or by `echo` ends with a newline the other side may not have).
pub fn key_from_file(raw: &[u8]) -> Vec<u8> {
    raw.trim_ascii().to_vec()
}

/// What the seal covers. Every field is length-prefixed in the MAC input so no two placements share one.
pub struct Placement<'a> {
    pub pod_uid: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub node: &'a str,
    /// `hami.io/vgpu-devices-to-allocate` exactly as written at bind.
    pub devices: &'a str,
    /// `hami.io/bind-time`.
    pub bind_time: &'a str,
}

fn mac(key: &[u8], p: &Placement) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for part in [
        VERSION,
        p.pod_uid,
        p.namespace,
        p.name,
        p.node,
        p.devices,
        p.bind_time,
    ] {
        m.update(&(part.len() as u64).to_le_bytes());
        m.update(part.as_bytes());
    }
    m
}

/// The annotation value for `p`.
pub fn seal(key: &[u8], p: &Placement) -> String {
    let tag = mac(key, p).finalize().into_bytes();
    let mut s = String::with_capacity(3 + 64);
    s.push_str(VERSION);
    s.push(':');
    for b in tag {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Whether `value` is the seal of `p` (constant-time comparison of the tag).
pub fn verify(key: &[u8], p: &Placement, value: &str) -> bool {
    let Some(hex) = value.strip_prefix("v1:") else {
        return false;
    };
    if hex.len() != 64 {
        return false;
    }
    let mut tag = [0u8; 32];
    for (i, t) in tag.iter_mut().enumerate() {
        match u8::from_str_radix(&hex[2 * i..2 * i + 2], 16) {
            Ok(b) => *t = b,
            Err(_) => return false,
        }
    }
    mac(key, p).verify_slice(&tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p<'a>(uid: &'a str, devices: &'a str) -> Placement<'a> {
        Placement {
            pod_uid: uid,
            namespace: "default",
            name: "a",
            node: "n1",
            devices,
            bind_time: "1716199325",
        }
    }

    #[test]
    fn a_seal_verifies_only_for_its_own_pod_and_placement() {
        let k = b"secret";
        let s = seal(k, &p("uid-1", "GPU-a,NVIDIA,4000,0:;"));
        assert!(verify(k, &p("uid-1", "GPU-a,NVIDIA,4000,0:;"), &s));
        assert!(
            !verify(k, &p("uid-2", "GPU-a,NVIDIA,4000,0:;"), &s),
            "copied to another pod"
        );
        assert!(
            !verify(k, &p("uid-1", "GPU-a,NVIDIA,8000,0:;"), &s),
            "devices changed"
        );
        assert!(
            !verify(b"other", &p("uid-1", "GPU-a,NVIDIA,4000,0:;"), &s),
            "other key"
        );
        assert!(!verify(k, &p("uid-1", "GPU-a,NVIDIA,4000,0:;"), "v1:zz"));
        assert!(!verify(k, &p("uid-1", "GPU-a,NVIDIA,4000,0:;"), ""));
    }

    #[test]
    fn the_key_is_read_alike_with_or_without_a_final_newline() {
        assert_eq!(key_from_file(b"abc\n"), key_from_file(b"abc"));
        assert_eq!(key_from_file(b" \tabc \r\n"), b"abc".to_vec());
    }

    #[test]
    fn fields_cannot_be_shifted_between_each_other() {
        let k = b"k";
        let a = Placement {
            namespace: "ab",
            name: "c",
            ..p("u", "d")
        };
        let b = Placement {
            namespace: "a",
            name: "bc",
            ..p("u", "d")
        };
        assert_ne!(seal(k, &a), seal(k, &b));
    }
}
