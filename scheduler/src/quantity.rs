//! Kubernetes resource quantities as whole numbers. The API server returns quantities in their
//! canonical form, so the `nvidia.com/gpumem: 4000` a user wrote comes back as `"4k"` and
//! `8000` as `"8k"`: the scheduler must read suffixes exactly as Kubernetes' `Quantity.Value()`
//! does (rounding a fraction up) or every such pod would look malformed.

/// The value of a quantity such as `4000`, `4k`, `1.5k`, `2Ki`, `1e3` or `500m`, rounded up to
/// a whole number; `None` for anything that is not a non-negative quantity.
pub fn whole(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let num = num.strip_prefix('+').unwrap_or(num);
    if num.is_empty() || num.matches('.').count() > 1 || num == "." {
        return None;
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    // value = (int.frac) × base^exp, computed exactly on integers: mantissa / 10^frac_len.
    let digits = format!("{int}{frac}");
    let mantissa: u128 = digits.parse().ok()?;
    let scale = 10u128.checked_pow(frac.len() as u32)?;
    let (mul, div): (u128, u128) = match suffix {
        "" => (1, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().ok()?;
            if exp >= 0 {
                (10u128.checked_pow(exp as u32)?, 1)
            } else {
                (1, 10u128.checked_pow(exp.unsigned_abs())?)
            }
        }
        _ => return None,
    };
    let numerator = mantissa.checked_mul(mul)?;
    let denominator = scale.checked_mul(div)?;
    u64::try_from(numerator.div_ceil(denominator)).ok()
}

#[cfg(test)]
mod tests {
    use super::whole;

    #[test]
    fn canonical_forms_the_api_server_returns() {
        assert_eq!(whole("4000"), Some(4000));
        assert_eq!(whole("4k"), Some(4000));
        assert_eq!(whole("8k"), Some(8000));
        assert_eq!(whole("15360"), Some(15360));
        assert_eq!(whole("1"), Some(1));
        assert_eq!(whole("0"), Some(0));
    }

    #[test]
    fn other_spellings() {
        assert_eq!(whole("1.5k"), Some(1500));
        assert_eq!(whole("2Ki"), Some(2048));
        assert_eq!(whole("1Gi"), Some(1 << 30));
        assert_eq!(whole("1e3"), Some(1000));
        assert_eq!(whole("1E3"), Some(1000));
        assert_eq!(whole("+30"), Some(30));
        // Value() rounds a fraction up.
        assert_eq!(whole("500m"), Some(1));
        assert_eq!(whole("1500m"), Some(2));
        assert_eq!(whole("0.1"), Some(1));
        assert_eq!(whole("25e-1"), Some(3));
    }

    #[test]
    fn not_quantities() {
        for bad in [
            "",
            "-1",
            "abc",
            "4 k",
            "1.2.3",
            ".",
            "4kb",
            "k",
            "1e",
            "99999999999999999999999999Ei",
        ] {
            assert_eq!(whole(bad), None, "{bad:?}");
        }
    }
}
