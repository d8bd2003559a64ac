//! Binpack or spread, at node and at GPU level. Unknown words are an error, never a silent default
//! (HAMi #1589, #1931: users could not tell why their policy looked ignored).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Prefer the fullest node or card, keeping others free for large requests.
    Binpack,
    /// Prefer the emptiest node or card, spreading load and blast radius.
    Spread,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Binpack => "binpack",
            Policy::Spread => "spread",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownPolicy(pub String);

impl fmt::Display for UnknownPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown scheduler policy {:?}: want \"binpack\" or \"spread\"",
            self.0
        )
    }
}

impl std::error::Error for UnknownPolicy {}

impl FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "binpack" => Ok(Policy::Binpack),
            "spread" => Ok(Policy::Spread),
            other => Err(UnknownPolicy(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_words_parse_and_others_are_refused() {
        assert_eq!("binpack".parse::<Policy>(), Ok(Policy::Binpack));
        assert_eq!(" spread ".parse::<Policy>(), Ok(Policy::Spread));
        let e = "Binpak".parse::<Policy>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown scheduler policy \"Binpak\": want \"binpack\" or \"spread\""
        );
        assert!("".parse::<Policy>().is_err());
    }
}
