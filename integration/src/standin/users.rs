//! Who a request comes from: kube-apiserver's static token file (`--token-auth-file`), else anonymous.

use std::collections::HashMap;
use std::path::Path;

use axum::http::HeaderMap;
use serde_json::{json, Value};

use super::errors::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
}

impl UserInfo {
    pub fn anonymous() -> Self {
        UserInfo {
            username: "system:anonymous".into(),
            uid: String::new(),
            groups: vec!["system:unauthenticated".into()],
        }
    }

    /// As `AdmissionReview.request.userInfo` and `SelfSubjectReview.status.userInfo` carry it.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"username": self.username, "groups": self.groups});
        if !self.uid.is_empty() {
            v["uid"] = json!(self.uid);
        }
        v
    }
}

/// Splits one CSV record, honoring double quotes (`""` inside quotes is a quote).
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

/// Bearer tokens and the users they name.
#[derive(Debug, Clone, Default)]
pub struct Users {
    tokens: HashMap<String, UserInfo>,
}

impl Users {
    /// Parses kube-apiserver's format: `token,user,uid[,"group1,group2"]` per line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tokens = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let f = csv_fields(line);
            if f.len() < 3 {
                return Err(format!(
                    "line {}: expected token,user,uid[,\"group1,group2\"], got {} field(s)",
                    i + 1,
                    f.len()
                ));
            }
            let mut groups: Vec<String> = match f.get(3) {
                Some(g) => g
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
                None => Vec::new(),
            };
            groups.push("system:authenticated".into());
            tokens.insert(
                f[0].trim().to_string(),
                UserInfo {
                    username: f[1].trim().to_string(),
                    uid: f[2].trim().to_string(),
                    groups,
                },
            );
        }
        Ok(Users { tokens })
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("token file {}: {e}", path.display()))
    }

    /// The user a request's `Authorization: Bearer` names; anonymous without one; 401 for a token not in the
    /// file.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<UserInfo, ApiError> {
        let Some(auth) = headers.get(axum::http::header::AUTHORIZATION) else {
            return Ok(UserInfo::anonymous());
        };
        let token = auth
            .to_str()
            .ok()
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(ApiError::unauthorized)?;
        self.tokens
            .get(token)
            .cloned()
            .ok_or_else(ApiError::unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_with_quoted_groups() {
        let u = Users::parse("t1,alice,100,\"vgpu:tenants,dev\"\nt2,bob,101\n").unwrap();
        let alice = &u.tokens["t1"];
        assert_eq!(alice.username, "alice");
        assert_eq!(alice.uid, "100");
        assert_eq!(
            alice.groups,
            ["vgpu:tenants", "dev", "system:authenticated"]
        );
        assert_eq!(u.tokens["t2"].groups, ["system:authenticated"]);
        assert!(Users::parse("only,two\n").is_err());
    }
}
