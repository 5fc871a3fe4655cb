//! What a token block allows: namespaces (patterns), operations, a key prefix and an
//! expiry. A request is allowed by a token when every block allows it.

use serde::{Deserialize, Serialize};

/// Namespace patterns per block, at most.
pub const PATTERNS_MAX: usize = 64;
/// A key prefix, at most (bytes; keys are at most 1,024).
pub const PREFIX_BYTES_MAX: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Read values, list keys, follow change feeds.
    Read,
    /// Write and delete.
    Write,
    /// Policies, compaction, scrub, quarantine, status, revocation, residency, shares.
    Admin,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Result<Op, String> {
        match s.trim() {
            "read" => Ok(Op::Read),
            "write" => Ok(Op::Write),
            "admin" => Ok(Op::Admin),
            other => Err(format!("operation {other:?}: use read, write or admin")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    /// Namespace patterns: `*` (every namespace, and the node-wide admin endpoints), a
    /// name, or a name prefix ending in `*`.
    pub ns: Vec<String>,
    pub ops: Vec<Op>,
    /// Only keys that start with this (empty: every key).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Not valid after this time (milliseconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
}

/// Which keys a request touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keys<'a> {
    /// One key.
    Key(&'a str),
    /// Keys under a prefix (a listing).
    Prefix(&'a str),
    /// Possibly any key of the namespace (a change feed, a policy).
    Any,
    /// Keys the caller checks one by one afterwards (a batch's): not checked here.
    EachChecked,
}

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access<'a> {
    /// `None`: node-wide (compaction, scrub, status), allowed only by the pattern `*`.
    pub namespace: Option<&'a str>,
    pub op: Op,
    pub keys: Keys<'a>,
}

/// Why a block does not allow a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    /// Past its expiry: the token no longer authenticates (401).
    Expired { expired_ms: u64 },
    /// Valid, but out of scope (403).
    OutOfScope(String),
}

fn pattern_ok(p: &str) -> bool {
    if p == "*" {
        return true;
    }
    let name = p.strip_suffix('*').unwrap_or(p);
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether a namespace pattern covers `namespace` (`None`: node-wide).
pub fn pattern_matches(pattern: &str, namespace: Option<&str>) -> bool {
    match (pattern, namespace) {
        ("*", _) => true,
        (_, None) => false,
        (p, Some(ns)) => match p.strip_suffix('*') {
            Some(prefix) => ns.starts_with(prefix),
            None => p == ns,
        },
    }
}

impl Scope {
    pub fn validate(&self) -> Result<(), String> {
        if self.ns.is_empty() {
            return Err("name at least one namespace pattern (--ns)".into());
        }
        if self.ns.len() > PATTERNS_MAX {
            return Err(format!("at most {PATTERNS_MAX} namespace patterns"));
        }
        for p in &self.ns {
            if !pattern_ok(p) {
                return Err(format!(
                    "namespace pattern {p:?}: use *, a namespace name, or a name prefix ending in *"
                ));
            }
        }
        if self.ops.is_empty() {
            return Err("name at least one operation (--ops read,write,admin)".into());
        }
        if self.prefix.len() > PREFIX_BYTES_MAX {
            return Err(format!("a key prefix is at most {PREFIX_BYTES_MAX} bytes"));
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a scope serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Scope, String> {
        let scope: Scope = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        scope.validate()?;
        Ok(scope)
    }

    /// Whether this block allows `access` at `now_ms`.
    pub fn allows(&self, access: &Access<'_>, now_ms: u64) -> Result<(), Denied> {
        if let Some(expires) = self.expires_ms
            && now_ms > expires
        {
            return Err(Denied::Expired {
                expired_ms: expires,
            });
        }
        if !self.ops.contains(&access.op) {
            return Err(Denied::OutOfScope(format!(
                "the token does not allow {} (it allows {})",
                access.op.name(),
                self.ops
                    .iter()
                    .map(|o| o.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !self.ns.iter().any(|p| pattern_matches(p, access.namespace)) {
            return Err(Denied::OutOfScope(match access.namespace {
                Some(ns) => format!(
                    "the token does not cover namespace {ns:?} (it covers {})",
                    self.ns.join(", ")
                ),
                None => "node-wide operations need a token for namespace pattern *".into(),
            }));
        }
        let within = match access.keys {
            Keys::Key(k) | Keys::Prefix(k) => k.starts_with(&self.prefix),
            Keys::Any => self.prefix.is_empty(),
            Keys::EachChecked => true,
        };
        if !within {
            return Err(Denied::OutOfScope(match access.keys {
                Keys::Any => format!(
                    "the token covers only keys starting with {:?}; this request may touch any key",
                    self.prefix
                ),
                _ => format!("the token covers only keys starting with {:?}", self.prefix),
            }));
        }
        Ok(())
    }
}
