//! Events: one change to one key, named by its dot and ordered by its version.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

use crate::{Hlc, Key, Namespace, NodeId};

/// Names one event: the node that accepted it from a client and that node's counter
/// for the namespace. Counters are dense per (origin, namespace): 1, 2, 3, …
///
/// Written as `counter@origin`, for example `17@9f3c2a0b11d4e5f6`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    pub origin: NodeId,
    pub counter: u64,
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.counter, self.origin)
    }
}

impl fmt::Debug for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dot({self})")
    }
}

/// Why a string is not a dot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a version is written counter@origin, like 17@9f3c2a0b11d4e5f6; got {0:?}")]
pub struct DotParseError(pub String);

impl FromStr for Dot {
    type Err = DotParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DotParseError(s.to_owned());
        let (counter, origin) = s.split_once('@').ok_or_else(err)?;
        if counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let counter: u64 = counter.parse().map_err(|_| err())?;
        if counter == 0 {
            return Err(err());
        }
        let origin: NodeId = origin.parse().map_err(|_| err())?;
        Ok(Dot { origin, counter })
    }
}

/// An event's place in the last-writer-wins order: the clock reading first, then the
/// origin as tie-breaker, then the counter (distinct events of one origin never share
/// a reading, so the counter only makes the order total by construction).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Version {
    pub hlc: Hlc,
    pub dot: Dot,
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.hlc, self.dot.origin, self.dot.counter).cmp(&(
            other.hlc,
            other.dot.origin,
            other.dot.counter,
        ))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The media type stored with a value. JSON, CBOR and MessagePack convert into each
/// other on read; the others are served as stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum ContentType {
    OctetStream = 0,
    Json = 1,
    Cbor = 2,
    MsgPack = 3,
    Protobuf = 4,
    Text = 5,
}

impl ContentType {
    pub const ALL: [ContentType; 6] = [
        ContentType::OctetStream,
        ContentType::Json,
        ContentType::Cbor,
        ContentType::MsgPack,
        ContentType::Protobuf,
        ContentType::Text,
    ];

    /// The one-byte code used by storage and wire formats.
    pub const fn code(self) -> u8 {
        self as u8
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => ContentType::OctetStream,
            1 => ContentType::Json,
            2 => ContentType::Cbor,
            3 => ContentType::MsgPack,
            4 => ContentType::Protobuf,
            5 => ContentType::Text,
            _ => return None,
        })
    }

    /// The canonical media type name.
    pub const fn mime(self) -> &'static str {
        match self {
            ContentType::OctetStream => "application/octet-stream",
            ContentType::Json => "application/json",
            ContentType::Cbor => "application/cbor",
            ContentType::MsgPack => "application/msgpack",
            ContentType::Protobuf => "application/x-protobuf",
            ContentType::Text => "text/plain",
        }
    }

    /// Parses a media type's essence (`type/subtype`, no parameters), ignoring ASCII
    /// case. Accepts the common aliases of MessagePack and Protocol Buffers.
    pub fn from_mime_essence(essence: &str) -> Option<Self> {
        let e = essence.trim();
        let is = |name: &str| e.eq_ignore_ascii_case(name);
        Some(if is("application/octet-stream") {
            ContentType::OctetStream
        } else if is("application/json") {
            ContentType::Json
        } else if is("application/cbor") {
            ContentType::Cbor
        } else if is("application/msgpack")
            || is("application/x-msgpack")
            || is("application/vnd.msgpack")
        {
            ContentType::MsgPack
        } else if is("application/x-protobuf")
            || is("application/protobuf")
            || is("application/vnd.google.protobuf")
        {
            ContentType::Protobuf
        } else if is("text/plain") {
            ContentType::Text
        } else {
            return None;
        })
    }

    /// Whether values of this type are structured data that converts to JSON, CBOR and
    /// MessagePack.
    pub const fn is_structured(self) -> bool {
        matches!(
            self,
            ContentType::Json | ContentType::Cbor | ContentType::MsgPack
        )
    }
}

impl fmt::Display for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mime())
    }
}

/// What an event does to its key.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Op {
    Put {
        content_type: ContentType,
        value: Bytes,
    },
    Delete,
}

/// One change to one key, as accepted by its origin and replicated unchanged.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Event {
    pub namespace: Namespace,
    pub key: Key,
    pub op: Op,
    pub dot: Dot,
    pub hlc: Hlc,
    /// The causal context the writer saw; empty except under the `siblings` policy.
    pub context: Bytes,
    /// The namespace's epoch when its origin accepted the event: 0 in a multi-master
    /// namespace; in a leader namespace, the epoch whose leader the origin was (see
    /// docs/MODES.md).
    pub epoch: u64,
    /// When a put's key expires: a clock reading's physical milliseconds (0: never).
    /// Every replica hides the key once its clock reaches this point, and one delete,
    /// ordered just after the put, removes it (see docs/MODES.md, "TTL keys").
    /// Always 0 on deletes.
    pub expires_ms: u64,
}

impl Event {
    pub fn version(&self) -> Version {
        Version {
            hlc: self.hlc,
            dot: self.dot,
        }
    }

    /// Whether this is a put whose key has expired by clock reading `now_ms`.
    pub fn expired_at(&self, now_ms: u64) -> bool {
        self.expires_ms != 0 && now_ms >= self.expires_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_round_trip_through_text() {
        let dot = Dot {
            origin: NodeId::new(0x9f3c).unwrap(),
            counter: 17,
        };
        assert_eq!(dot.to_string(), "17@0000000000009f3c");
        assert_eq!(dot.to_string().parse::<Dot>().unwrap(), dot);
        for bad in [
            "", "17", "@9f", "0@9f", "x@9f", "17@", "17@zz", "-1@9f", "17@0",
        ] {
            assert!(bad.parse::<Dot>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn content_type_codes_and_names_round_trip() {
        for ct in ContentType::ALL {
            assert_eq!(ContentType::from_code(ct.code()), Some(ct));
            assert_eq!(ContentType::from_mime_essence(ct.mime()), Some(ct));
        }
        assert_eq!(ContentType::from_code(6), None);
        assert_eq!(
            ContentType::from_mime_essence("Application/X-MsgPack"),
            Some(ContentType::MsgPack)
        );
        assert_eq!(ContentType::from_mime_essence("image/png"), None);
    }

    #[test]
    fn versions_order_by_clock_then_origin() {
        let v = |ms, origin, counter| Version {
            hlc: Hlc::new(ms, 0),
            dot: Dot {
                origin: NodeId::new(origin).unwrap(),
                counter,
            },
        };
        assert!(v(2, 1, 1) > v(1, 9, 9));
        assert!(v(1, 2, 1) > v(1, 1, 9));
        assert!(v(1, 1, 2) > v(1, 1, 1));
    }
}
