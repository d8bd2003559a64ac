//! Parsing of the limit values in the container contract, shared by the shim, the agent and the scheduler.

use std::fmt;

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub value: String,
    pub why: &'static str,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.value, self.why)
    }
}

impl std::error::Error for ParseError {}

fn err(value: &str, why: &'static str) -> ParseError {
    ParseError {
        value: value.to_string(),
        why,
    }
}

/// A memory limit as HAMi writes it: `4000m` (MiB), `4g` (GiB), `512k` (KiB) or plain bytes; suffixes are
/// binary and case-insensitive. `0` means no limit, as in HAMi. Returns bytes.
pub fn parse_memory(value: &str) -> Result<Option<u64>, ParseError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(err(value, "empty memory limit"));
    }
    let (digits, mult) = match v.as_bytes()[v.len() - 1].to_ascii_lowercase() {
        b'k' => (&v[..v.len() - 1], 1u64 << 10),
        b'm' => (&v[..v.len() - 1], MIB),
        b'g' => (&v[..v.len() - 1], 1u64 << 30),
        b't' => (&v[..v.len() - 1], 1u64 << 40),
        b'0'..=b'9' => (v, 1),
        _ => {
            return Err(err(
                value,
                "expected a number with an optional k, m, g or t suffix",
            ))
        }
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(
            value,
            "expected a number with an optional k, m, g or t suffix",
        ));
    }
    let n: u64 = digits.parse().map_err(|_| err(value, "number too large"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| err(value, "number too large"))?;
    Ok((bytes > 0).then_some(bytes))
}

/// `CUDA_DEVICE_SM_LIMIT`: percent of the card. 0 and 100 mean no cap (HAMi's meaning). Returns the capped
/// percentage, or None for no cap.
pub fn parse_sm_limit(value: &str) -> Result<Option<u32>, ParseError> {
    let v = value.trim();
    let n: u32 = v
        .parse()
        .map_err(|_| err(value, "expected a whole percentage from 0 to 100"))?;
    match n {
        0 | 100 => Ok(None),
        1..=99 => Ok(Some(n)),
        _ => Err(err(value, "a share above 100% of the card is not possible")),
    }
}

/// `VGPU_PACING_PERIOD_MS`: whole milliseconds from 10 to 5000. Returns nanoseconds.
pub fn parse_pacing_period(value: &str) -> Result<u64, ParseError> {
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| err(value, "expected whole milliseconds from 10 to 5000"))?;
    let ns = n.saturating_mul(1_000_000);
    if valid_pacing_period(ns) {
        Ok(ns)
    } else {
        Err(err(
            value,
            "a pacing period must be from 10 to 5000 milliseconds",
        ))
    }
}

/// Whether `ns` is a period [`parse_pacing_period`] could have produced. A card file is writable by every
/// container on the node, so a period read from one is checked before it is used.
pub fn valid_pacing_period(ns: u64) -> bool {
    ns.is_multiple_of(1_000_000) && (10_000_000..=5_000_000_000).contains(&ns)
}

/// `GPU_CORE_UTILIZATION_POLICY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CorePolicy {
    /// Hold the share while another slice on the card wants time; run free while the card is otherwise idle.
    #[default]
    Default,
    /// Hold the share at all times.
    Force,
    /// No pacing at all.
    Disable,
}

impl CorePolicy {
    pub fn parse(value: &str) -> Result<Self, ParseError> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "default" => Ok(Self::Default),
            "force" => Ok(Self::Force),
            "disable" => Ok(Self::Disable),
            _ => Err(err(value, "expected default, force or disable")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Force => "force",
            Self::Disable => "disable",
        }
    }

    pub fn code(self) -> u32 {
        match self {
            Self::Default => 0,
            Self::Force => 1,
            Self::Disable => 2,
        }
    }
}

/// Formats bytes as the `<MiB>m` form Allocate writes into `CUDA_DEVICE_MEMORY_LIMIT_<i>`.
pub fn format_mib(bytes: u64) -> String {
    format!("{}m", bytes / MIB)
}

/// The read-only limits file Allocate mounts beside the preload: `NAME=value` lines with the same names as the
/// environment (`CUDA_DEVICE_MEMORY_LIMIT_0=4000m`, `CUDA_DEVICE_SM_LIMIT=30`). Blank lines and `#` comments
/// are skipped. A line without `=` is an error: a damaged file must not read as "no limits".
pub fn parse_limits_file(text: &str) -> Result<Vec<(String, String)>, ParseError> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| err(line, "limits file line is not NAME=value"))?;
        out.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_forms() {
        assert_eq!(parse_memory("4000m").unwrap(), Some(4000 * MIB));
        assert_eq!(parse_memory("4000M").unwrap(), Some(4_194_304_000));
        assert_eq!(parse_memory("4g").unwrap(), Some(4 << 30));
        assert_eq!(parse_memory("1048576").unwrap(), Some(MIB));
        assert_eq!(parse_memory(" 512k ").unwrap(), Some(512 << 10));
        assert_eq!(parse_memory("0").unwrap(), None);
        for bad in [
            "",
            "m",
            "abc",
            "4x",
            "-4m",
            "4.5g",
            "99999999999999999999",
            "18446744073709551615g",
        ] {
            assert!(parse_memory(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn sm_limit_forms() {
        assert_eq!(parse_sm_limit("30").unwrap(), Some(30));
        assert_eq!(parse_sm_limit("0").unwrap(), None);
        assert_eq!(parse_sm_limit("100").unwrap(), None);
        assert!(parse_sm_limit("150").is_err());
        assert!(parse_sm_limit("abc").is_err());
        assert!(parse_sm_limit("-5").is_err());
    }

    #[test]
    fn pacing_period_forms() {
        assert_eq!(parse_pacing_period(" 50 ").unwrap(), 50_000_000);
        assert_eq!(parse_pacing_period("1000").unwrap(), 1_000_000_000);
        for bad in ["0", "9", "5001", "1s", "", "-50", "18446744073709551615"] {
            assert!(parse_pacing_period(bad).is_err(), "{bad:?}");
        }
        assert!(!valid_pacing_period(0) && !valid_pacing_period(50_000_001));
    }

    #[test]
    fn policy_forms() {
        assert_eq!(CorePolicy::parse("FORCE").unwrap(), CorePolicy::Force);
        assert_eq!(CorePolicy::parse("").unwrap(), CorePolicy::Default);
        assert!(CorePolicy::parse("strict").is_err());
    }

    #[test]
    fn limits_file() {
        let f = "# written by vgpu-agent\nCUDA_DEVICE_MEMORY_LIMIT_0=4000m\n\nCUDA_DEVICE_SM_LIMIT = 30\n";
        let kv = parse_limits_file(f).unwrap();
        assert_eq!(kv[0], ("CUDA_DEVICE_MEMORY_LIMIT_0".into(), "4000m".into()));
        assert_eq!(kv[1], ("CUDA_DEVICE_SM_LIMIT".into(), "30".into()));
        assert!(parse_limits_file("garbage").is_err());
    }
}
