//! Identifiers and their validation rules.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The longest namespace name, in bytes.
pub const NAMESPACE_BYTES_MAX: usize = 128;
/// The longest key, in bytes of UTF-8.
pub const KEY_BYTES_MAX: usize = 1024;

/// A node's identity: a nonzero 64-bit number, chosen at random when a data directory
/// is created and kept for its life. Written as 16 lowercase hex digits.
///
/// It is the `origin` of every event the node accepts from clients, and the tie-breaker
/// between events with equal hybrid logical clocks.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(u64);

impl NodeId {
    /// Returns `None` for zero, which is reserved as "no node".
    pub const fn new(raw: u64) -> Option<Self> {
        if raw == 0 { None } else { Some(Self(raw)) }
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// Why a string is not a node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeIdError {
    #[error("a node id is 1 to 16 hex digits (0-9, a-f), got {0:?}")]
    Syntax(String),
    #[error("node id 0 is reserved; choose any other value")]
    Zero,
}

impl FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(NodeIdError::Syntax(s.to_owned()));
        }
        let raw = u64::from_str_radix(s, 16).map_err(|_| NodeIdError::Syntax(s.to_owned()))?;
        NodeId::new(raw).ok_or(NodeIdError::Zero)
    }
}

/// Why a string is not a valid namespace name or key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    #[error("namespace name is empty; use 1 to 128 of the characters A-Z a-z 0-9 _ . -")]
    Empty,
    #[error("namespace name is {len} bytes long; the limit is {NAMESPACE_BYTES_MAX}")]
    TooLong { len: usize },
    #[error("namespace name has {found:?} at byte {index}; only A-Z a-z 0-9 _ . - are allowed")]
    InvalidChar { found: char, index: usize },
}

/// A namespace: the unit of replication and policy. Its name matches
/// `[A-Za-z0-9_.-]{1,128}`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Namespace(Arc<str>);

/// Maps keyed by namespace can be searched with a `&str`.
impl std::borrow::Borrow<str> for Namespace {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Namespace {
    pub fn new(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > NAMESPACE_BYTES_MAX {
            return Err(NameError::TooLong { len: name.len() });
        }
        if let Some((index, found)) = name
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(NameError::InvalidChar { found, index });
        }
        Ok(Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Namespace({:?})", &*self.0)
    }
}

impl FromStr for Namespace {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Namespace::new(s)
    }
}

/// Why a string is not a valid key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("key is empty; a key is 1 to {KEY_BYTES_MAX} bytes of UTF-8")]
    Empty,
    #[error("key is {len} bytes long; the limit is {KEY_BYTES_MAX} bytes of UTF-8")]
    TooLong { len: usize },
}

/// A key within a namespace: 1 to 1024 bytes of UTF-8, any characters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(Box<str>);

impl Key {
    pub fn new(key: &str) -> Result<Self, KeyError> {
        Self::validate(key)?;
        Ok(Self(Box::from(key)))
    }

    /// Checks a key without allocating.
    pub fn validate(key: &str) -> Result<(), KeyError> {
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if key.len() > KEY_BYTES_MAX {
            return Err(KeyError::TooLong { len: key.len() });
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", &*self.0)
    }
}

impl TryFrom<String> for Key {
    type Error = KeyError;

    fn try_from(key: String) -> Result<Self, Self::Error> {
        Self::validate(&key)?;
        Ok(Self(key.into_boxed_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_round_trips_through_text() {
        let id: NodeId = "00000000000000ff".parse().unwrap();
        assert_eq!(id.get(), 255);
        assert_eq!(id.to_string(), "00000000000000ff");
        assert_eq!("ff".parse::<NodeId>().unwrap(), id);
        assert_eq!("0".parse::<NodeId>(), Err(NodeIdError::Zero));
        assert!(matches!(
            "xyz".parse::<NodeId>(),
            Err(NodeIdError::Syntax(_))
        ));
        assert!(matches!(
            "11111111111111111".parse::<NodeId>(),
            Err(NodeIdError::Syntax(_))
        ));
        assert!(matches!("".parse::<NodeId>(), Err(NodeIdError::Syntax(_))));
        assert!(matches!(
            "+1".parse::<NodeId>(),
            Err(NodeIdError::Syntax(_))
        ));
    }

    #[test]
    fn namespace_names_follow_the_documented_pattern() {
        assert!(Namespace::new("orders.v2_eu-1").is_ok());
        assert_eq!(Namespace::new(""), Err(NameError::Empty));
        assert_eq!(
            Namespace::new("a/b"),
            Err(NameError::InvalidChar {
                found: '/',
                index: 1
            })
        );
        assert_eq!(
            Namespace::new("é"),
            Err(NameError::InvalidChar {
                found: 'é',
                index: 0
            })
        );
        assert!(Namespace::new(&"a".repeat(128)).is_ok());
        assert_eq!(
            Namespace::new(&"a".repeat(129)),
            Err(NameError::TooLong { len: 129 })
        );
    }

    #[test]
    fn keys_are_bounded_utf8() {
        assert!(Key::new("a/b c?é").is_ok());
        assert_eq!(Key::new(""), Err(KeyError::Empty));
        assert!(Key::new(&"é".repeat(512)).is_ok());
        assert_eq!(
            Key::new(&"é".repeat(513)),
            Err(KeyError::TooLong { len: 1026 })
        );
    }
}
