//! The requests the writer takes from its queue: what the store's faces (client,
//! replication, admin) and compaction send it, each with the channel its answer goes
//! back on.

use super::*;

pub(crate) enum Request {
    Write(WriteRequest),
    Apply(ApplyRequest),
    Relocate(RelocateRequest),
    Cover(CoverRequest),
    Policy(PolicyRequest),
    Collect(CollectRequest),
    Quarantine(QuarantineRequest),
    Shutdown(oneshot::Sender<()>),
}

/// An operator's resolution of a namespace's quarantined events (see [`crate::held`]).
pub(crate) struct QuarantineRequest {
    pub namespace: Namespace,
    pub action: QuarantineAction,
    /// Answered once what it applied or recorded is durable.
    pub reply: oneshot::Sender<Result<QuarantineOutcome, WriteError>>,
}

/// Tombstones compaction collects (see [`asp_core::gc`]): each key's entry, if it is
/// still the given delete, becomes an epitaph (the entry stays, pointing nowhere, and
/// is listed as one) or goes (with its epitaph row and its reconciliation item). A key
/// written since keeps its entry; its stale epitaph row goes. Appends nothing.
pub(crate) struct CollectRequest {
    /// (index key, the tombstone's entry, whether to leave an epitaph)
    pub entries: Vec<(Slice, IndexEntry, bool)>,
    /// Answered once the key index reflects it.
    pub reply: oneshot::Sender<Result<(), WriteError>>,
    /// What the indexer did, counted as it does it.
    pub tally: Arc<CollectTally>,
}

/// Deletes a [`CollectRequest`] collected, and how many of them left an epitaph.
#[derive(Default)]
pub(crate) struct CollectTally {
    pub collected: AtomicU64,
    pub epitaphs: AtomicU64,
}

/// Sets a namespace's conflict policy: refused once the namespace holds data under
/// another one.
pub(crate) struct PolicyRequest {
    pub namespace: Namespace,
    pub policy: Policy,
    pub reply: oneshot::Sender<Result<(), WriteError>>,
}

/// Records compaction copies forward: each appended unchanged (same dot, clock and
/// op) at a new feed position. The key index moves to the copy only if it still points
/// at the old one; a copy whose key was written meanwhile is simply a dead record.
/// Vectors, clocks and reconciliation windows do not change: no version does.
pub(crate) struct RelocateRequest {
    /// Each event with the position of the copy being moved.
    pub records: Vec<(Event, LogPosition)>,
    /// Answered once the copies are acknowledged (durable under `fsync = "always"`)
    /// and in the key index.
    pub reply: oneshot::Sender<Result<(), WriteError>>,
    pub bytes: usize,
}

/// A peer's word that every dot of `vector` is superseded by state this node holds:
/// the dots join the namespace's base (persisted before the answer) and its vector.
pub(crate) struct CoverRequest {
    pub namespace: Namespace,
    pub vector: VersionVector,
    /// Answered once the base file is durable and the namespace's vector, as readers
    /// see it, holds the dots.
    pub reply: oneshot::Sender<Result<(), WriteError>>,
}

/// Events received from a peer, to apply as they are.
pub(crate) struct ApplyRequest {
    pub events: Vec<Event>,
    /// Whether they are reconciliation repairs: the current state of keys on a peer
    /// whose state differs. A repair whose dot this node holds is still applied when
    /// it is newer than what its key holds (see [`Writer::repair_supersedes`]).
    pub repair: bool,
    pub reply: oneshot::Sender<Result<ApplyOutcome, WriteError>>,
    /// As for [`WriteRequest::permit`].
    pub permit: Option<OwnedSemaphorePermit>,
    pub bytes: usize,
}

/// Local writes: one atomic batch of a client's operations in one namespace.
pub(crate) struct WriteRequest {
    pub namespace: Namespace,
    pub ops: Vec<WriteOp>,
    pub reply: oneshot::Sender<Result<Vec<Applied>, WriteError>>,
    /// Holds this request's share of the queue's byte budget until it is answered
    /// (always `Some` once queued).
    pub permit: Option<OwnedSemaphorePermit>,
    pub bytes: usize,
    /// The write's `If-Fence`, checked by the writer with the rest of its admission.
    pub fence: Option<crate::modes::Fence>,
    /// A put into another namespace written in the same log transaction, before the
    /// batch's own events (a connector's source position; see [`crate::Checkpoint`]).
    pub checkpoint: Option<crate::types::Checkpoint>,
}
