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

/// Most ranges one device's compute windows may hold ([`parse_core_windows`]).
pub const MAX_WINDOW_RANGES: usize = 8;

/// Where a container's compute windows lie in each period of one card, as the agent placed them: a limits-file
/// value only (`VGPU_CORE_WINDOWS_<cuda ordinal>`, see [`crate::container_dir::CORE_WINDOWS_PREFIX`]), never
/// an environment variable. Text form: `<period_ms>:<start_us>+<len_us>[,<start_us>+<len_us>...]`, e.g.
/// `500:0+150000` (the first 150 ms of each 500 ms period) or `500:0+100000,300000+50000`.
///
/// What [`parse_core_windows`] returns always holds: the period is one [`parse_pacing_period`] accepts; 1 to
/// [`MAX_WINDOW_RANGES`] ranges, each at least 1 µs long, ascending, not overlapping, all inside the period (so
/// their total is at most the period).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreWindows {
    pub period_ms: u64,
    /// (start, length) in microseconds from the start of each period.
    pub ranges: Vec<(u64, u64)>,
}

impl CoreWindows {
    pub fn period_us(&self) -> u64 {
        self.period_ms * 1000
    }

    /// Total length of the ranges in microseconds.
    pub fn total_us(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// The text form [`parse_core_windows`] reads.
    pub fn render(&self) -> String {
        let ranges: Vec<String> = self
            .ranges
            .iter()
            .map(|(s, l)| format!("{s}+{l}"))
            .collect();
        format!("{}:{}", self.period_ms, ranges.join(","))
    }
}

/// Parses a `VGPU_CORE_WINDOWS_<i>` value (see [`CoreWindows`]). Everything is bounded before it is used: the
/// text's length, each number's digits, the number of ranges, and every range against the period and its
/// neighbours. Anything else is an error (the shim then treats the limits file as damaged).
pub fn parse_core_windows(value: &str) -> Result<CoreWindows, ParseError> {
    const FORM: &str = "expected <period_ms>:<start_us>+<len_us>[,<start_us>+<len_us>...]";
    let v = value.trim();
    // 8 ranges of two 7-digit numbers, the separators and a 4-digit period: well under 160 bytes.
    if v.len() > 160 {
        return Err(err(value, "compute windows longer than 160 bytes"));
    }
    let number = |s: &str, most: usize| -> Result<u64, ParseError> {
        if s.is_empty() || s.len() > most || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(value, FORM));
        }
        s.parse().map_err(|_| err(value, FORM))
    };
    let (period, list) = v.split_once(':').ok_or_else(|| err(value, FORM))?;
    let period_ms = number(period, 4)?;
    if !valid_pacing_period(period_ms * 1_000_000) {
        return Err(err(
            value,
            "the windows' period must be from 10 to 5000 milliseconds",
        ));
    }
    let period_us = period_ms * 1000;
    let mut ranges = Vec::new();
    let mut end = 0u64;
    for part in list.split(',') {
        if ranges.len() == MAX_WINDOW_RANGES {
            return Err(err(value, "more than 8 compute window ranges"));
        }
        let (start, len) = part.split_once('+').ok_or_else(|| err(value, FORM))?;
        let (start, len) = (number(start, 7)?, number(len, 7)?);
        if len == 0 {
            return Err(err(value, "a compute window range of no length"));
        }
        if start < end {
            return Err(err(
                value,
                "compute window ranges must be in order and must not overlap",
            ));
        }
        end = start + len;
        if end > period_us {
            return Err(err(value, "a compute window range ends after its period"));
        }
        ranges.push((start, len));
    }
    Ok(CoreWindows { period_ms, ranges })
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
    fn core_windows_forms() {
        let w = parse_core_windows(" 500:0+150000 ").unwrap();
        assert_eq!(w.period_ms, 500);
        assert_eq!(w.ranges, vec![(0, 150_000)]);
        assert_eq!(w.total_us(), 150_000);
        let two = parse_core_windows("500:0+100000,300000+50000").unwrap();
        assert_eq!(two.ranges, vec![(0, 100_000), (300_000, 50_000)]);
        assert_eq!(parse_core_windows(&two.render()).unwrap(), two);
        let full = parse_core_windows("50:0+25000,25000+25000").unwrap();
        assert_eq!(full.total_us(), 50_000, "adjacent ranges fill the period");
        let eight = (0..8)
            .map(|i| format!("{}+1000", i * 5000))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            parse_core_windows(&format!("50:{eight}"))
                .unwrap()
                .ranges
                .len(),
            8
        );
    }

    /// What a hostile or damaged file could hold there: every one refused, none panics.
    #[test]
    fn core_windows_hostile_text_is_refused() {
        let nine = (0..9)
            .map(|i| format!("{}+1000", i * 5000))
            .collect::<Vec<_>>()
            .join(",");
        let long = format!("500:{}", "0".repeat(200));
        for bad in [
            "",
            ":",
            "500",
            "500:",
            "500:0",
            "500:+5",
            "500:0+",
            "500:0+0",
            "500:-1+5",
            "500:0+-5",
            "500:0x10+5",
            "500: 0+5",
            "500:0+5,",
            "500:,0+5",
            "500:0+5,,10+5",
            "500:0+5;10+5",
            "9:0+5",
            "5001:0+5",
            "0:0+5",
            "-500:0+5",
            "18446744073709551616:0+5",
            "500:0+18446744073709551615",
            "500:18446744073709551615+1",
            "500:9999999+9999999",
            "500:0+500001",
            "500:499999+2",
            "500:400000+100001",
            "500:0+300000,200000+300000",
            "500:100000+1000,0+1000",
            "500:0+1000,0+1000",
            "500:0+1000,500+1000",
            "500:0+1000:2000+1000",
            "500:0+1000+2000",
            "500:0+1e3",
            "500:0+１０",
            &nine,
            &format!("50:{nine}"),
            &long,
        ] {
            assert!(
                parse_core_windows(bad).is_err(),
                "{bad:?} should be refused: {:?}",
                parse_core_windows(bad)
            );
        }
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
