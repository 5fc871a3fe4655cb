//! The store's public request and answer types.

use asp_core::{ContentType, Dot, Event, Hlc, Key, Namespace, Version, VersionVector};
use bytes::Bytes;

/// One operation of an atomic batch.
#[derive(Clone, Debug)]
pub struct WriteOp {
    pub key: Key,
    pub kind: WriteKind,
    pub condition: Condition,
}

#[derive(Clone, Debug)]
pub enum WriteKind {
    Put {
        content_type: ContentType,
        value: Bytes,
        /// Time to live in milliseconds (0: none): the key expires this long after the
        /// put's clock reading (lww namespaces only; see docs/MODES.md, "TTL keys").
        ttl_ms: u64,
    },
    Delete,
    /// The delete that removes an expired key: applied only while the key's current
    /// version is `version` (a put with an expiry), and given the clock reading just
    /// after that version's, so that it replaces that put and nothing written after it.
    Expire {
        version: Version,
    },
    /// An operation on a key of a namespace whose policy is not `lww`.
    Crdt(CrdtOp),
}

/// An operation of one of the CRDT policies (`asp_core::crdt`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrdtOp {
    /// `counter`: add this (negative: subtract).
    Incr(i64),
    /// `counter`: an observed reset: the value becomes 0 as this node sees it;
    /// increments concurrent with it (not seen here yet) stay.
    Reset,
    /// `set`: add a member.
    Add(Bytes),
    /// `set`: remove a member (the adds this node has seen of it).
    Remove(Bytes),
    /// `siblings`: write a value (`None`: delete) replacing the siblings `context`
    /// covers (an empty context replaces nothing: a new sibling).
    Write {
        context: asp_core::crdt::Context,
        value: Option<(ContentType, Bytes)>,
    },
    /// `json-map`: changes at paths of the document (field names from the top down,
    /// 1 to `asp_core::crdt::PATH_DEPTH_MAX` deep), as a merge patch makes them
    /// (`asp_core::crdt::JsonMap::patch`).
    Patch(Vec<(Vec<String>, asp_core::crdt::Change)>),
}

impl CrdtOp {
    /// The policy this operation belongs to.
    pub fn policy(&self) -> asp_core::crdt::Policy {
        use asp_core::crdt::Policy;
        match self {
            CrdtOp::Incr(_) | CrdtOp::Reset => Policy::Counter,
            CrdtOp::Add(_) | CrdtOp::Remove(_) => Policy::Set,
            CrdtOp::Write { .. } => Policy::Siblings,
            CrdtOp::Patch(_) => Policy::JsonMap,
        }
    }

    /// Bytes it carries, for the queue's budget.
    pub fn len(&self) -> usize {
        match self {
            CrdtOp::Incr(_) | CrdtOp::Reset => 8,
            CrdtOp::Add(m) | CrdtOp::Remove(m) => m.len(),
            CrdtOp::Write { value, context } => {
                value.as_ref().map_or(0, |(_, v)| v.len()) + 24 * context.iter().count()
            }
            CrdtOp::Patch(changes) => changes
                .iter()
                .map(|(path, change)| {
                    // A byte a change at least, so that no patch counts as empty.
                    let value = match change {
                        asp_core::crdt::Change::Set(text) => text.len(),
                        _ => 1,
                    };
                    path.iter().map(String::len).sum::<usize>() + value
                })
                .sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub use asp_core::Condition;

impl WriteOp {
    pub fn put(key: Key, content_type: ContentType, value: impl Into<Bytes>) -> Self {
        WriteOp {
            key,
            kind: WriteKind::Put {
                content_type,
                value: value.into(),
                ttl_ms: 0,
            },
            condition: Condition::None,
        }
    }

    pub fn delete(key: Key) -> Self {
        WriteOp {
            key,
            kind: WriteKind::Delete,
            condition: Condition::None,
        }
    }

    pub fn crdt(key: Key, op: CrdtOp) -> Self {
        WriteOp {
            key,
            kind: WriteKind::Crdt(op),
            condition: Condition::None,
        }
    }

    /// A put whose key expires `ttl_ms` after it is written (no effect on other kinds).
    pub fn with_ttl_ms(mut self, ttl: u64) -> Self {
        if let WriteKind::Put { ttl_ms, .. } = &mut self.kind {
            *ttl_ms = ttl;
        }
        self
    }

    pub fn with_condition(mut self, condition: Condition) -> Self {
        self.condition = condition;
        self
    }

    /// Whether the writer must read the key's current version to apply it: a
    /// condition, or an expiry (which removes only the put it names).
    pub(crate) fn reads_index(&self) -> bool {
        self.condition != Condition::None || matches!(self.kind, WriteKind::Expire { .. })
    }
}

/// A JSON put written in the same log transaction as a batch
/// ([`crate::Store::write_with_checkpoint`]), before the batch's events: a reader of the
/// whole feed meets it first, with every event of the batch right after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub namespace: Namespace,
    pub key: Key,
    pub value: Bytes,
}

/// What one applied operation became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    pub dot: Dot,
    pub hlc: Hlc,
    /// Its position in this node's feed.
    pub seq: u64,
}

/// A stored value and its media type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    pub content_type: ContentType,
    pub bytes: Bytes,
}

/// A key's current state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyState {
    pub version: Version,
    /// The feed position of the event that set this state (compaction may move the
    /// event to a later position; its version stays).
    pub seq: u64,
    /// `None` for a deleted key (a tombstone).
    pub value: Option<Value>,
}

/// One entry of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanItem {
    pub key: Key,
    pub version: Version,
    pub seq: u64,
    pub content_type: ContentType,
    pub value_len: u32,
    /// Present when the listing asked for values, for a key of an `lww` namespace.
    pub value: Option<Bytes>,
    /// Present when the listing asked for values, for a key of a CRDT namespace: the
    /// key's merged state, decoded (a state that does not decode fails the listing).
    pub state: Option<asp_core::crdt::State>,
}

/// What [`crate::Store::namespace_stats`] counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceStats {
    /// Keys that hold a value.
    pub keys: u64,
    /// Keys deleted or expired whose entry is still held (until collected).
    pub deleted_keys: u64,
    /// Bytes of the values (CRDT states) held.
    pub value_bytes: u64,
    /// In a `siblings` namespace, keys holding concurrent values now (0 in others).
    pub keys_with_siblings: u64,
    /// Whether every entry was counted (false: the count stopped at its limit).
    pub complete: bool,
}

/// A page of a listing. `next_after` is set when there may be more keys: pass it as
/// `after` to continue.
#[derive(Clone, Debug, Default)]
pub struct ScanPage {
    pub items: Vec<ScanItem>,
    pub next_after: Option<Key>,
}

/// An event and its position in the feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedEvent {
    pub seq: u64,
    pub event: Event,
}

/// A page of the change feed. `next` is the cursor to continue from: every feed
/// position up to it has been looked at. `head` is the last visible position.
#[derive(Clone, Debug)]
pub struct ChangesPage {
    pub events: Vec<FeedEvent>,
    pub next: u64,
    pub head: u64,
}

/// What applying a peer's events did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Events appended to this node's feed.
    pub applied: usize,
    /// Events this node already held (applied, parked or quarantined), left out.
    pub duplicates: usize,
    /// Events held until this node's clock catches up with theirs (more than
    /// `max_clock_skew_ms` ahead); applied then, by the writer.
    pub parked: usize,
    /// Events held because their namespace uses another conflict policy here; applied
    /// or discarded by an operator ([`crate::Store::resolve_quarantine`]).
    pub quarantined: usize,
    /// The feed position of the last event appended (0 if none).
    pub last_seq: u64,
    /// The origins of events new to this node, each once (relay trees: see
    /// `asp_core::session::RelayTree`).
    pub fresh_origins: Vec<asp_core::NodeId>,
    /// The origins of events this node already held, each once.
    pub duplicate_origins: Vec<asp_core::NodeId>,
}

/// What a node holds of one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceState {
    /// Every dot held.
    pub vector: VersionVector,
    /// The newest clock reading of any event held.
    pub max_hlc: Hlc,
}
