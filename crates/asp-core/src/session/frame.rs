//! The peer protocol's messages as typed values. Their byte layout lives in `asp-wire`
//! and `docs/PROTOCOL.md`; the session below only ever sees these.

use std::fmt;

use crate::reconcile::Symbol;
use crate::{Event, Hlc, Namespace, NodeId, Op, VersionVector};

/// The protocol versions this build speaks. Version 2 adds [`Frame::SummaryPart`]: a
/// summary of more namespaces than one frame holds goes as parts, the last one a
/// `Summary`. A version-1 peer gets one `Summary` of at most one part's worth.
/// Version 3 adds the count of repair events to [`Frame::RepairEnd`] (as a frame of
/// its own type on the wire), so a receiver notices a repair it never got before it
/// records covered dots; a version-2 peer gets the `RepairEnd` without it.
/// Version 4 adds an event's epoch (leader namespaces); a peer of an earlier version
/// gets no event that carries one.
/// Version 5 adds [`Frame::Prune`] and [`Frame::Graft`] (relay trees, see
/// [`super::RelayTree`]); a peer of an earlier version is relayed every event.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
pub const PROTOCOL_VERSION_MAX: u16 = 5;

/// Origins named in one `Prune` or `Graft` frame, at most.
pub const RELAY_ORIGINS_MAX: usize = 1024;

/// Namespaces in one `Summary` or `SummaryPart` frame, at most.
pub const SUMMARY_PART_NAMESPACES_MAX: usize = 4096;
/// A part is closed once its namespaces take about this many bytes on the wire
/// (frames are at most 16 MiB).
pub const SUMMARY_PART_BYTES: usize = 2 << 20;
/// Namespaces in one whole summary (all its parts), at most: a receiver refuses more.
pub const SUMMARY_NAMESPACES_MAX: usize = 1 << 20;

/// The namespace list entry meaning "every namespace".
pub const ALL_NAMESPACES: &str = "*";

/// The first message each side sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version_min: u16,
    pub version_max: u16,
    /// Nodes of different clusters refuse to talk.
    pub cluster_id: String,
    pub node_id: NodeId,
    /// Free-form `key=value` labels (`region=eu`), for residency rules.
    pub labels: Vec<(String, String)>,
    /// Namespaces this node replicates (sends and wants); `*` for all.
    pub namespaces: Vec<String>,
    /// How often this node sends something when idle.
    pub heartbeat_ms: u32,
    /// How long this node waits without hearing from its peer before it gives up.
    pub idle_timeout_ms: u32,
    /// Names this run of the node: random, new at every start (0: not sent, by a peer
    /// of an earlier build). Two live incarnations of one node id are two processes
    /// with one identity — a copied data directory — and are refused
    /// ([`ErrorCode::NodeConflict`]).
    pub incarnation: u64,
}

/// Why a link was closed, as carried by an `Error` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A malformed or unexpected frame.
    Protocol,
    /// No protocol version both sides speak.
    VersionMismatch,
    /// The peers belong to different clusters.
    ClusterMismatch,
    /// A node connected to itself.
    SelfConnection,
    /// Another link between the same two nodes is kept instead.
    DuplicateLink,
    /// Nothing was heard from the peer for its idle timeout.
    IdleTimeout,
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// An event's clock reading is too far ahead of the receiver's wall clock, and the
    /// receiver has no room left to hold it until its clock catches up.
    ClockSkew,
    /// The peer sent more than its credit allowed.
    FlowControl,
    /// The node is shutting down.
    Shutdown,
    /// The receiver could not apply events (storage failure).
    Internal,
    /// Another live process runs with the same node id (a second incarnation: a
    /// copied data directory, a cloned machine).
    NodeConflict,
    /// An event of the batch breaks a rule every event must keep (value or record too
    /// large, unknown context, undecodable CRDT state); nothing of the batch is
    /// applied.
    InvalidEvent,
    /// A code this build does not know (sent by a newer peer).
    Other(u16),
}

impl ErrorCode {
    pub const fn code(self) -> u16 {
        match self {
            ErrorCode::Protocol => 1,
            ErrorCode::VersionMismatch => 2,
            ErrorCode::ClusterMismatch => 3,
            ErrorCode::SelfConnection => 4,
            ErrorCode::DuplicateLink => 5,
            ErrorCode::IdleTimeout => 6,
            ErrorCode::HandshakeTimeout => 7,
            ErrorCode::ClockSkew => 8,
            ErrorCode::FlowControl => 9,
            ErrorCode::Shutdown => 10,
            ErrorCode::Internal => 11,
            ErrorCode::InvalidEvent => 12,
            ErrorCode::NodeConflict => 13,
            ErrorCode::Other(c) => c,
        }
    }

    pub const fn from_code(code: u16) -> Self {
        match code {
            1 => ErrorCode::Protocol,
            2 => ErrorCode::VersionMismatch,
            3 => ErrorCode::ClusterMismatch,
            4 => ErrorCode::SelfConnection,
            5 => ErrorCode::DuplicateLink,
            6 => ErrorCode::IdleTimeout,
            7 => ErrorCode::HandshakeTimeout,
            8 => ErrorCode::ClockSkew,
            9 => ErrorCode::FlowControl,
            10 => ErrorCode::Shutdown,
            11 => ErrorCode::Internal,
            12 => ErrorCode::InvalidEvent,
            13 => ErrorCode::NodeConflict,
            c => ErrorCode::Other(c),
        }
    }

    /// The snake_case name used in logs, status and the HTTP API.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::Protocol => "protocol",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::ClusterMismatch => "cluster_mismatch",
            ErrorCode::SelfConnection => "self_connection",
            ErrorCode::DuplicateLink => "duplicate_link",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::HandshakeTimeout => "handshake_timeout",
            ErrorCode::ClockSkew => "clock_skew",
            ErrorCode::FlowControl => "flow_control",
            ErrorCode::Shutdown => "shutdown",
            ErrorCode::Internal => "internal",
            ErrorCode::InvalidEvent => "invalid_event",
            ErrorCode::NodeConflict => "node_conflict",
            ErrorCode::Other(_) => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Other(c) => write!(f, "unknown({c})"),
            other => f.write_str(other.name()),
        }
    }
}

/// One namespace's state as one node holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceSummary {
    pub namespace: Namespace,
    /// The newest clock reading of any event held in the namespace.
    pub max_hlc: Hlc,
    pub vector: VersionVector,
    /// Symbol 0 of the namespace's reconciliation symbols (every item folded in): two
    /// nodes whose digests are equal hold the same state, whatever their vectors say.
    /// `None` when the node keeps no symbols for it.
    pub digest: Option<Symbol>,
    /// What the sender knows of each node's vector of the namespace, itself first:
    /// gossip that lets every node judge when a tombstone can be collected (see
    /// docs/CONFLICTS.md). At most [`REPORTS_MAX`].
    pub reports: Vec<VectorReport>,
}

impl NamespaceSummary {
    /// About how many bytes this entry takes in a frame (at least as many as it
    /// does), for cutting a summary into parts.
    pub fn wire_bytes(&self) -> usize {
        1 + self.namespace.as_str().len()
            + 8
            + vector_wire_bytes(&self.vector)
            + 1
            + crate::reconcile::SYMBOL_BYTES
            + 1
            + self
                .reports
                .iter()
                .map(VectorReport::wire_bytes)
                .sum::<usize>()
    }
}

/// How many bytes a version vector takes in a frame (see docs/PROTOCOL.md): its entry
/// count, then per node its id and range count and each range's two counters.
fn vector_wire_bytes(v: &VersionVector) -> usize {
    4 + v
        .iter()
        .map(|(_, set)| 12 + 16 * set.ranges().len())
        .sum::<usize>()
}

/// Cuts a summary into parts of at most [`SUMMARY_PART_NAMESPACES_MAX`] namespaces and
/// about [`SUMMARY_PART_BYTES`] bytes each (a part holds at least one namespace).
/// An empty summary is one empty part.
pub fn summary_parts(summary: Vec<NamespaceSummary>) -> Vec<Vec<NamespaceSummary>> {
    let mut parts = Vec::new();
    let mut part = Vec::new();
    let mut bytes = 0;
    for ns in summary {
        let b = ns.wire_bytes();
        if !part.is_empty()
            && (part.len() == SUMMARY_PART_NAMESPACES_MAX || bytes + b > SUMMARY_PART_BYTES)
        {
            parts.push(std::mem::take(&mut part));
            bytes = 0;
        }
        bytes += b;
        part.push(ns);
    }
    parts.push(part);
    parts
}

/// Members in one `Members` frame, at most.
pub const MEMBERS_MAX: usize = 1024;

/// Bytes of a member's name or of an address, at most.
pub const MEMBER_TEXT_BYTES_MAX: usize = 256;

/// One member of a cluster as gossip carries it. A node counts `heartbeat` up once a
/// second while it runs; `incarnation` is new at every start of its process. Of two
/// entries of one node, the one with the greater `(incarnation, heartbeat)` is newer.
/// A member whose entry has not grown for a while is suspect, then down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberEntry {
    pub node: NodeId,
    pub incarnation: u64,
    pub heartbeat: u64,
    /// The name its certificate attests, or its node id without TLS.
    pub name: String,
    /// Its API address as clients reach it (`http://host:port`), or empty.
    pub api: String,
    /// Where it listens for peers (`host:port`), or empty.
    pub peer: String,
}

/// Reports in one namespace's summary, at most.
pub const REPORTS_MAX: usize = 64;

/// Bytes of other nodes' reports a sender puts in one summary, at most (about, by
/// [`VectorReport::wire_bytes`]); a report past it goes membership-only (empty
/// vector). See docs/PROTOCOL.md, *Reports*.
pub const GOSSIP_BYTES_MAX: usize = 4 << 20;

/// A node's vector of one namespace as that node held it at `at_ms` (its wall clock,
/// milliseconds since the Unix epoch). A node's vectors only grow, so of two reports
/// of one node the later holds the earlier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VectorReport {
    pub node: NodeId,
    pub at_ms: u64,
    pub vector: VersionVector,
}

impl VectorReport {
    /// How many bytes this report takes in a summary frame: the node, the time and the
    /// vector. Senders budget the reports they gossip by it.
    pub fn wire_bytes(&self) -> usize {
        8 + 8 + vector_wire_bytes(&self.vector)
    }
}

/// How a reconciliation finds the difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReconcileMode {
    /// Symbols from the window each node keeps up to date on every write.
    Window,
    /// Symbols computed from a scan of the whole namespace: for differences larger
    /// than the window.
    Full,
    /// No symbols: the initiator sends its whole state (the peer holds nothing of it).
    Transfer,
}

impl ReconcileMode {
    pub const fn code(self) -> u8 {
        match self {
            ReconcileMode::Window => 0,
            ReconcileMode::Full => 1,
            ReconcileMode::Transfer => 2,
        }
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(ReconcileMode::Window),
            1 => Some(ReconcileMode::Full),
            2 => Some(ReconcileMode::Transfer),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ReconcileMode::Window => "window",
            ReconcileMode::Full => "full",
            ReconcileMode::Transfer => "transfer",
        }
    }
}

/// How the responder of a reconciliation ended the symbol stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReconcileOutcome {
    /// The difference is decoded; repairs follow.
    Decoded,
    /// The window ran out before the difference decoded: retry in `Full` mode.
    Exhausted,
    /// Decoding failed or hit its limit; nothing is repaired.
    Failed,
    /// The responder will not reconcile this namespace now (busy, not replicated).
    Refused,
}

impl ReconcileOutcome {
    pub const fn code(self) -> u8 {
        match self {
            ReconcileOutcome::Decoded => 0,
            ReconcileOutcome::Exhausted => 1,
            ReconcileOutcome::Failed => 2,
            ReconcileOutcome::Refused => 3,
        }
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(ReconcileOutcome::Decoded),
            1 => Some(ReconcileOutcome::Exhausted),
            2 => Some(ReconcileOutcome::Failed),
            3 => Some(ReconcileOutcome::Refused),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ReconcileOutcome::Decoded => "decoded",
            ReconcileOutcome::Exhausted => "exhausted",
            ReconcileOutcome::Failed => "failed",
            ReconcileOutcome::Refused => "refused",
        }
    }
}

/// A peer protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    /// The sender closes the link after this frame.
    Error {
        code: ErrorCode,
        message: String,
    },
    /// What the sender holds, per namespace. Sent after the handshake and again from
    /// time to time; a receiver only ever adds to its view of the sender. Ends a
    /// summary: with the `SummaryPart`s before it, it names every namespace the sender
    /// holds (of those the receiver wants).
    Summary(Vec<NamespaceSummary>),
    /// Part of a summary; more parts follow, then a `Summary` (protocol version 2).
    SummaryPart(Vec<NamespaceSummary>),
    /// Events read from the sender's feed at positions `first_seq..=last_seq` (events
    /// the receiver already holds or does not want are left out, so the list may be
    /// shorter than the range, or empty).
    Events {
        first_seq: u64,
        last_seq: u64,
        events: Vec<Event>,
    },
    /// The receiver holds, durably, everything of the sender's feed from `from_seq`
    /// through `through_seq` that it wants. `from_seq` is where the first batch it
    /// received on this link began: the sender checks it against the first batch it
    /// sent, so that an acknowledgement can never cover a batch that was lost or
    /// overtaken on the way.
    Ack {
        from_seq: u64,
        through_seq: u64,
    },
    /// The receiver accepts `bytes` more bytes of events (see [`credit_size`]).
    Credit {
        bytes: u32,
    },
    /// The members of the cluster the sender knows, itself first (protocol 4 and up;
    /// never on a link between two clusters). See [`MemberEntry`].
    Members(Vec<MemberEntry>),
    /// The receiver of this frame stops relaying events of these origins to the sender
    /// (protocol 5 and up): the sender receives them first by another path. A node
    /// never stops sending its own events. See [`super::RelayTree`].
    Prune {
        origins: Vec<NodeId>,
    },
    /// The receiver of this frame relays events of these origins to the sender again
    /// (every origin when the list is empty), undoing earlier `Prune`s (protocol 5).
    Graft {
        origins: Vec<NodeId>,
    },
    /// Sent when nothing else was for a heartbeat interval.
    Heartbeat {
        head_seq: u64,
        wall_ms: u64,
    },
    /// The initiator opens reconciliation `id` of `namespace`; in `Window` and `Full`
    /// mode its symbols follow, in `Transfer` mode its state.
    ReconcileStart {
        id: u32,
        namespace: Namespace,
        mode: ReconcileMode,
        /// Items the initiator holds in the namespace.
        items: u64,
        /// The most symbols the initiator will send (its window's length in `Window`
        /// mode): a responder that has not decoded by then ends with `Exhausted`.
        symbols_max: u64,
    },
    /// The initiator's coded symbols `first_index..first_index + symbols.len()`.
    ReconcileSymbols {
        id: u32,
        first_index: u64,
        symbols: Vec<Symbol>,
    },
    /// The responder accepts `symbols` more symbols (the initiator starts with
    /// [`RECONCILE_INITIAL_SYMBOLS`]).
    ReconcileCredit {
        id: u32,
        symbols: u32,
    },
    /// The responder stops the symbol stream. On `Decoded`, `need` lists the key hashes
    /// (first [`NEED_PREFIX_BYTES`] bytes each) of the items only the initiator holds:
    /// it answers with those keys' events.
    ReconcileEnd {
        id: u32,
        outcome: ReconcileOutcome,
        need: Vec<[u8; NEED_PREFIX_BYTES]>,
    },
    /// Events that repair the receiver's state (the current version of keys it lacks
    /// or holds at another version). Charged to the receiver's credit like `Events`.
    Repair {
        id: u32,
        events: Vec<Event>,
    },
    /// The sender has sent all its repairs for `id`. `covered`, when present, is the
    /// sender's vector of the namespace read before its snapshot: the receiver, which
    /// now holds that snapshot's state, adds it to its own vector once the repairs
    /// before this frame are applied (superseded and compacted dots included).
    ///
    /// `repairs` (protocol version 3) is the number of repair events the sender sent
    /// in this run: a receiver that got another number before this frame lost or
    /// reordered a `Repair` and must not record `covered`.
    RepairEnd {
        id: u32,
        covered: Option<VersionVector>,
        repairs: Option<u64>,
    },
}

/// Symbols an initiator may send before the responder's first credit.
pub const RECONCILE_INITIAL_SYMBOLS: u32 = 128;
/// Bytes of a key hash named in a `ReconcileEnd`'s need list.
pub const NEED_PREFIX_BYTES: usize = 8;

/// The bytes an event costs against the receiver's credit: its key, value and context,
/// plus 64 for everything else.
pub fn credit_size(event: &Event) -> u64 {
    let value = match &event.op {
        Op::Put { value, .. } => value.len(),
        Op::Delete => 0,
    };
    64 + event.key.as_str().len() as u64 + value as u64 + event.context.len() as u64
}

/// A frame's name, for messages.
pub(crate) fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello(_) => "Hello",
        Frame::Error { .. } => "Error",
        Frame::Summary(_) => "Summary",
        Frame::SummaryPart(_) => "SummaryPart",
        Frame::Events { .. } => "Events",
        Frame::Ack { .. } => "Ack",
        Frame::Credit { .. } => "Credit",
        Frame::Heartbeat { .. } => "Heartbeat",
        Frame::Members(_) => "Members",
        Frame::Prune { .. } => "Prune",
        Frame::Graft { .. } => "Graft",
        Frame::ReconcileStart { .. } => "ReconcileStart",
        Frame::ReconcileSymbols { .. } => "ReconcileSymbols",
        Frame::ReconcileCredit { .. } => "ReconcileCredit",
        Frame::ReconcileEnd { .. } => "ReconcileEnd",
        Frame::Repair { .. } => "Repair",
        Frame::RepairEnd { .. } => "RepairEnd",
    }
}
