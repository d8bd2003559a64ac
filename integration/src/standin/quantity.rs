//! Resource quantities in the canonical form the API server stores them in: a client that sends `4000` (kubectl
//! does, for a YAML integer) reads back `"4k"`, and `1024Mi` reads back `1Gi`. Clients that parse quantities
//! must cope with that, so the stand-in does it too.

use serde_json::Value;

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Decimal,
    Binary,
}

const NANO: i128 = 1_000_000_000;

/// Value in billionths (the precision Kubernetes keeps), and the suffix family.
fn parse(s: &str) -> Option<(i128, Format)> {
    let s = s.trim();
    let (neg, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let num_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (num, suffix) = body.split_at(num_end);
    if num.is_empty() || num == "." || num.matches('.').count() > 1 {
        return None;
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    // Exact value in billionths before the suffix; digits past nano are rounded up, as Kubernetes does.
    let mut v: i128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    v = v.checked_mul(NANO)?;
    let mut scale = NANO / 10;
    let mut rest = false;
    for d in frac.bytes() {
        let d = i128::from(d - b'0');
        if scale == 0 {
            rest |= d != 0;
        } else {
            v += d * scale;
            scale /= 10;
        }
    }
    if rest {
        v += 1;
    }
    let (v, format) = match suffix {
        "" => (v, Format::Decimal),
        "n" => (v / NANO + i128::from(v % NANO != 0), Format::Decimal),
        "u" => (
            v / 1_000_000 + i128::from(v % 1_000_000 != 0),
            Format::Decimal,
        ),
        "m" => (v / 1000 + i128::from(v % 1000 != 0), Format::Decimal),
        "k" => (v.checked_mul(1_000)?, Format::Decimal),
        "M" => (v.checked_mul(1_000_000)?, Format::Decimal),
        "G" => (v.checked_mul(NANO)?, Format::Decimal),
        "T" => (v.checked_mul(1_000_000_000_000)?, Format::Decimal),
        "P" => (v.checked_mul(1_000_000_000_000_000)?, Format::Decimal),
        "E" => (v.checked_mul(1_000_000_000_000_000_000)?, Format::Decimal),
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            let n = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
                .iter()
                .position(|x| *x == suffix)
                .expect("matched above") as u32
                + 1;
            (v.checked_mul(1024i128.pow(n))?, Format::Binary)
        }
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().ok()?;
            if exp >= 0 {
                (
                    v.checked_mul(10i128.checked_pow(exp as u32)?)?,
                    Format::Decimal,
                )
            } else {
                let d = 10i128.checked_pow(exp.unsigned_abs())?;
                (v / d + i128::from(v % d != 0), Format::Decimal)
            }
        }
        _ => return None,
    };
    Some((if neg { -v } else { v }, format))
}

fn format(v: i128, f: Format) -> String {
    let (sign, a) = if v < 0 { ("-", -v) } else { ("", v) };
    if a == 0 {
        return "0".into();
    }
    if f == Format::Binary && a >= 1024 * NANO {
        // Whole bytes (rounded up), in the largest binary unit that divides them.
        let whole = a / NANO + i128::from(a % NANO != 0);
        for (n, suffix) in ["Ei", "Pi", "Ti", "Gi", "Mi", "Ki"].iter().enumerate() {
            let unit = 1024i128.pow(6 - n as u32);
            if whole % unit == 0 {
                return format!("{sign}{}{suffix}", whole / unit);
            }
        }
        return format!("{sign}{whole}");
    }
    const UNITS: &[(i128, &str)] = &[
        (1_000_000_000_000_000_000 * NANO, "E"),
        (1_000_000_000_000_000 * NANO, "P"),
        (1_000_000_000_000 * NANO, "T"),
        (1_000_000_000 * NANO, "G"),
        (1_000_000 * NANO, "M"),
        (1000 * NANO, "k"),
        (NANO, ""),
        (1_000_000, "m"),
        (1000, "u"),
        (1, "n"),
    ];
    for (unit, suffix) in UNITS {
        if a % unit == 0 {
            return format!("{sign}{}{suffix}", a / unit);
        }
    }
    unreachable!("every value is a whole number of nano units")
}

/// The canonical form of a quantity given as a JSON string or number; `None` if it is not a quantity.
pub fn canonical(v: &Value) -> Option<String> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let (n, f) = parse(&s)?;
    Some(format(n, f))
}

fn canonicalize_map(m: Option<&mut Value>, path: &str) -> Result<(), String> {
    let Some(Value::Object(m)) = m else {
        return Ok(());
    };
    for (k, v) in m.iter_mut() {
        match canonical(v) {
            Some(c) => *v = Value::String(c),
            None => {
                return Err(format!(
                    "{path}[{k}]: Invalid value: {v}: quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
                ))
            }
        }
    }
    Ok(())
}

/// Rewrites the quantities of a pod's or node's resources in canonical form.
pub fn canonicalize(storage: &str, obj: &mut Value) -> Result<(), String> {
    match storage {
        "pods" => {
            for list in ["containers", "initContainers"] {
                if let Some(Value::Array(cs)) = obj.pointer_mut(&format!("/spec/{list}")) {
                    for (i, c) in cs.iter_mut().enumerate() {
                        for part in ["limits", "requests"] {
                            canonicalize_map(
                                c.pointer_mut(&format!("/resources/{part}")),
                                &format!("spec.{list}[{i}].resources.{part}"),
                            )?;
                        }
                    }
                }
            }
            canonicalize_map(obj.pointer_mut("/spec/overhead"), "spec.overhead")
        }
        "nodes" => {
            canonicalize_map(obj.pointer_mut("/status/capacity"), "status.capacity")?;
            canonicalize_map(obj.pointer_mut("/status/allocatable"), "status.allocatable")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_forms_as_kubernetes_writes_them() {
        let c = |v: Value| canonical(&v).unwrap();
        assert_eq!(c(json!(4000)), "4k");
        assert_eq!(c(json!("4000")), "4k");
        assert_eq!(c(json!(1500)), "1500");
        assert_eq!(c(json!(1)), "1");
        assert_eq!(c(json!(30)), "30");
        assert_eq!(c(json!("0.5")), "500m");
        assert_eq!(c(json!("100m")), "100m");
        assert_eq!(c(json!("1024Mi")), "1Gi");
        assert_eq!(c(json!("1536Mi")), "1536Mi");
        assert_eq!(c(json!("512Ki")), "512Ki");
        assert_eq!(c(json!("1e3")), "1k");
        assert_eq!(c(json!("16Gi")), "16Gi");
        assert_eq!(c(json!(0)), "0");
        assert!(canonical(&json!("lots")).is_none());
        assert!(canonical(&json!("4 GB")).is_none());
    }
}
