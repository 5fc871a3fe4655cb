//! The writer: the one place that changes the store.
//!
//! Two threads form a pipeline:
//!
//! 1. The **log writer** (`asp-writer`) takes every request waiting in the queue,
//!    checks conditions, assigns sequence numbers, dots and clock readings, encodes the
//!    events into one buffer, appends it to the log with one write, makes it durable
//!    with one `fdatasync` (under `fsync = "always"`), publishes the new feed head and
//!    acknowledges the requests.
//! 2. The **indexer** (`asp-index`) applies acknowledged groups to the key index.
//!
//! Keeping the key index off the acknowledgement path means a write waits for its fsync
//! and little else. Reads stay read-your-writes: a read first waits until the index
//! reflects everything acknowledged when the read began (usually no wait at all; at
//! most one index batch). The index never reflects anything that is not yet durable,
//! so no read can see a write that a crash could take back.
//!
//! Group commit needs callers to pile up while an fsync runs. Closed-loop writers come
//! back a few microseconds after their acknowledgement, just after the next group has
//! been taken, and would otherwise settle into two half-size cohorts that alternate.
//! So before an fsync the writer waits for them while they keep arriving (each within
//! half an fsync of the last, at most 1 ms in all).
//!
//! Under `fsync = "interval:<ms>"` a third thread fsyncs on the interval and the writer
//! acknowledges without waiting for it. In every mode the feed shows only events that
//! are acknowledged and (unless `fsync = "never"`) durable: a peer or subscriber must
//! never see an event that a crash could take back.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use asp_core::reconcile::{Item, Window};

use crate::digest::{Digest, Old, WindowMsg, Windows, namespace_items, window_len};
use asp_core::{Dot, Event, Hlc, HlcClock, Namespace, NodeId, VersionVector, lww_wins};
use fjall::Slice;
use tokio::sync::{OwnedSemaphorePermit, oneshot, watch};

use crate::base::Bases;
use crate::codec::{
    self, EventRef, FLAG_GROUP_START, FLAG_TXN_END, INLINE_VALUE_BYTES_MAX, IndexEntry, LogPosition,
};
use crate::config::{FsyncMode, StoreConfig};
use crate::error::{ReadError, WriteError};
use crate::fs::is_no_space;
use crate::held::{Held, HeldReason, QuarantineAction, QuarantineOutcome};
use crate::index::Index;
use crate::log::{FeedHead, Log, Segment, SparseBuilder, SparseUpdate};
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::queue::WriteQueue;
use crate::types::{Applied, ApplyOutcome, Condition, CrdtOp, NamespaceState, WriteKind, WriteOp};
use asp_core::crdt::{JsonMap, MvRegister, Policy, Sibling, State};
use asp_core::{ContentType, Version};

/// Acknowledged groups waiting for the indexer, at most (each holds at most
/// `group_events_max` events, or one larger request).
const INDEX_QUEUE_MAX: usize = 8;
/// Indexed groups waiting for the window keeper, at most (each holds its keys and two
/// index snapshots).
const WINDOW_QUEUE_MAX: usize = 2;
/// With the free-space guard off, a refusal for space is over (for status) once the
/// filesystem has this much free again.
const SPACE_REGAINED_BYTES: u64 = 16 << 20;
/// The longest the writer waits for stragglers before an fsync.
const STRAGGLER_WAIT_MAX: Duration = Duration::from_millis(1);

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

/// Tombstones compaction collects (see [`crate::gc`]): each key's entry, if it is
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

/// A queued request the writer works on.
enum Work {
    Write(WriteRequest),
    Apply(ApplyRequest),
    Relocate(RelocateRequest),
    Cover(CoverRequest),
    Policy(PolicyRequest),
    Collect(CollectRequest),
    Quarantine(QuarantineRequest),
}

pub(crate) struct WriteRequest {
    pub namespace: Namespace,
    pub ops: Vec<WriteOp>,
    pub reply: oneshot::Sender<Result<Vec<Applied>, WriteError>>,
    /// Holds this request's share of the queue's byte budget until it is answered
    /// (always `Some` once queued).
    pub permit: Option<OwnedSemaphorePermit>,
    pub bytes: usize,
}

/// Progress of the pipeline, guarded by one mutex.
#[derive(Default)]
pub(crate) struct Progress {
    /// Appended to the log.
    pub written: FeedHead,
    /// Made durable.
    pub synced: FeedHead,
    /// Acknowledged to the writers.
    pub acked: FeedHead,
    /// Applied to the key index.
    pub indexed: FeedHead,
    pub stopping: bool,
}

/// State shared by the store handle, the writer threads and readers.
pub(crate) struct Shared {
    pub node_id: NodeId,
    pub config: StoreConfig,
    pub log: Log,
    pub index: Index,
    pub head_tx: watch::Sender<FeedHead>,
    pub progress: Mutex<Progress>,
    pub progress_changed: Condvar,
    /// Each namespace's vector and newest clock reading, as of the indexed head.
    pub namespaces: RwLock<HashMap<Namespace, NamespaceState>>,
    /// Each namespace's reconciliation symbols over its keys' current versions and
    /// filter of keys held (kept by the window keeper, a little behind the indexer);
    /// `windows_changed` tells when.
    pub windows: Mutex<Windows>,
    pub windows_changed: Condvar,
    /// Set on the first storage failure; the store then refuses writes.
    pub failure: OnceLock<String>,
    /// Set while writes are refused for space (see [`Shared::no_space`]).
    pub space_problem: Mutex<Option<String>>,
    /// Held by a scrub run: one at a time.
    pub scrub_running: Mutex<()>,
    /// The last scrub's report.
    pub last_scrub: Mutex<Option<crate::scrub::ScrubReport>>,
    /// What the node holds beyond its log (`base.vv`); its lock is held while the file
    /// is replaced, so the file only ever grows.
    pub bases: Mutex<Bases>,
    /// Held by a compaction run: one at a time.
    pub compaction: Mutex<()>,
    /// Readers that look a position up in the key index and then read it from the log
    /// hold this for reading, so that compaction, which takes it for writing to drop a
    /// segment, never drops one between the lookup and the read.
    pub segment_gate: RwLock<()>,
    /// Each namespace's conflict policy (the writer changes it, readers read it).
    pub policies: RwLock<Policies>,
    /// What is known of other nodes' vectors: when tombstones may be collected.
    pub gc: Mutex<crate::gc::Gc>,
    /// Which counters this node may still issue (durable marks, see
    /// [`crate::counters`]).
    pub counters: Mutex<crate::counters::Counters>,
    /// When peers turned out to hold events of this node it had no record of issuing
    /// (newest last, at most [`crate::store::OWN_EVENTS_FOUND_MAX`]).
    pub own_events_found: Mutex<Vec<crate::store::OwnEventsFound>>,
    /// Whether local writes may take counters: after an open with
    /// `own_events_wait` set and peers known, not until a peer's summary said what it
    /// holds of this node's own events (or the wait ran out).
    pub own_events_learned: watch::Sender<bool>,
    /// Events received from peers and held, not applied (see [`crate::held`]); the
    /// writer changes them, status pages read them.
    pub held: Mutex<Held>,
    pub metrics: Metrics,
    /// Mirrors of `progress.acked.seq` and `progress.indexed.seq`, so that a read can
    /// see without locking that the index is up to date.
    pub acked_seq: AtomicU64,
    pub indexed_seq: AtomicU64,
    /// Groups the indexer applied, namespace states included (see
    /// [`Writer::roll_back`]).
    pub index_msgs_applied: AtomicU64,
    /// Messages the indexer sent the window keeper (see [`Windows::messages`]).
    pub window_messages: AtomicU64,
    /// The indexed sequence number for async waiters (bumped on failure too, so that
    /// they wake and see it).
    pub indexed_tx: watch::Sender<u64>,
}

impl Shared {
    pub fn fail(&self, what: String) -> WriteError {
        tracing::error!(error = %what, "storage failure; refusing further writes");
        let _ = self.failure.set(what);
        self.progress_changed.notify_all();
        self.indexed_tx.send_modify(|_| {});
        WriteError::Storage(self.failure.get().cloned().unwrap_or_default())
    }

    /// Notes that writes are refused for space (what `/healthz` and status say until
    /// space is back) and returns the error for the refused requests.
    pub fn no_space(&self, what: String) -> WriteError {
        let config = &self.config;
        let free = config
            .fs
            .free_bytes(&config.data_dir)
            .map_or_else(|e| format!("unknown ({e})"), |b| format!("{b} bytes"));
        let message = format!(
            "no space for writes: {what}; free space on the filesystem of {}: {free}. Free some space (or run compaction); writes resume by themselves",
            config.data_dir.display()
        );
        tracing::warn!(error = %message, "write refused for space");
        self.metrics.writes_no_space.inc();
        *self.space_problem.lock().unwrap() = Some(message.clone());
        WriteError::NoSpace(message)
    }

    /// A group was appended: whatever kept writes out for space is over.
    fn space_regained(&self) {
        let mut problem = self.space_problem.lock().unwrap();
        if problem.take().is_some() {
            tracing::info!("writes resumed: there is space again");
        }
    }

    /// Why writes are refused for space, if they are: cleared by the next append, or
    /// as soon as the filesystem has room again (so that a node nobody writes to
    /// does not stay unhealthy).
    pub fn space_problem(&self) -> Option<String> {
        let mut problem = self.space_problem.lock().unwrap();
        problem.as_ref()?;
        let config = &self.config;
        let room = config.min_free_bytes.max(SPACE_REGAINED_BYTES);
        if config
            .fs
            .free_bytes(&config.data_dir)
            .is_ok_and(|free| free >= room)
        {
            *problem = None;
        }
        problem.clone()
    }

    fn failed(&self) -> Option<WriteError> {
        self.failure.get().map(|f| WriteError::Storage(f.clone()))
    }

    /// The event that set `index_key`'s entry: read from the log where the entry points
    /// (checked against its dot), or, for an epitaph, made again from the entry: a
    /// delete of the key with the entry's dot and clock. The caller holds the segment
    /// gate.
    pub fn entry_event(&self, index_key: &[u8], entry: &IndexEntry) -> Result<Event, ReadError> {
        if !entry.is_epitaph() {
            return self.event_at(entry);
        }
        let bad = |what: String| ReadError::Corrupt(format!("epitaph: {what}"));
        let (namespace, key) =
            codec::split_index_key(index_key).ok_or_else(|| bad("a malformed index key".into()))?;
        let key = std::str::from_utf8(key).map_err(|e| bad(e.to_string()))?;
        Ok(Event {
            namespace: Namespace::new(namespace).map_err(|e| bad(e.to_string()))?,
            key: asp_core::Key::new(key).map_err(|e| bad(e.to_string()))?,
            op: asp_core::Op::Delete,
            dot: entry.dot,
            hlc: entry.hlc,
            context: bytes::Bytes::new(),
        })
    }

    /// The event an index entry points at, checked against the entry's dot. The
    /// caller holds the segment gate.
    pub fn event_at(&self, entry: &IndexEntry) -> Result<Event, ReadError> {
        let record = self.log.read_at(entry.position)?;
        if record.event.dot != entry.dot {
            return Err(ReadError::Corrupt(format!(
                "the index points at event {} but the log holds {} there",
                entry.dot, record.event.dot
            )));
        }
        Ok(record.event)
    }

    /// The value of a live index entry: inline, or read from the log. The caller holds
    /// the segment gate.
    pub fn value_of(&self, entry: &IndexEntry) -> Result<bytes::Bytes, ReadError> {
        if let Some(inline) = &entry.inline {
            return Ok(inline.clone());
        }
        match self.event_at(entry)?.op {
            asp_core::Op::Put { value, .. } => Ok(value),
            asp_core::Op::Delete => Err(ReadError::Corrupt(
                "the index points at a delete for a live key".into(),
            )),
        }
    }

    /// Joins every origin's entry of the CRDT key `key` into `state`; returns whether
    /// there was any. The caller holds the segment gate.
    pub fn join_crdt_entries(
        &self,
        namespace: &str,
        key: &str,
        state: &mut State,
    ) -> Result<bool, ReadError> {
        let prefix = codec::crdt_key_prefix(namespace, key);
        let mut entries = Vec::new();
        self.index.scan(&prefix, None, |_, entry| {
            entries.push(entry);
            true
        })?;
        for entry in &entries {
            State::decode(&self.value_of(entry)?)
                .and_then(|s| state.join(&s))
                .map_err(|e| ReadError::Corrupt(format!("key {key:?}: {e}")))?;
        }
        Ok(!entries.is_empty())
    }

    /// Waits until the index reflects every write acknowledged before the call: what
    /// makes reads read-your-writes.
    pub fn await_index(&self) -> Result<(), String> {
        let target = self.acked_seq.load(Ordering::Acquire);
        if self.indexed_seq.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let mut progress = self.progress.lock().unwrap();
        while progress.indexed.seq < target {
            if let Some(f) = self.failure.get() {
                return Err(f.clone());
            }
            progress = self.progress_changed.wait(progress).unwrap();
        }
        Ok(())
    }

    /// Like [`Shared::await_index`], without blocking a thread.
    pub async fn await_index_async(&self) -> Result<(), String> {
        let target = self.acked_seq.load(Ordering::Acquire);
        if self.indexed_seq.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let mut rx = self.indexed_tx.subscribe();
        let _ = rx
            .wait_for(|&seq| seq >= target || self.failure.get().is_some())
            .await;
        match self.failure.get() {
            Some(f) => Err(f.clone()),
            None => Ok(()),
        }
    }

    /// Publishes the feed head: what is acknowledged and, unless fsync is off, durable.
    fn publish(&self, progress: &Progress) {
        let visible = match self.config.fsync {
            FsyncMode::Interval { .. } if progress.synced.seq < progress.acked.seq => {
                progress.synced
            }
            _ => progress.acked,
        };
        self.head_tx.send_if_modified(|head| {
            if head.seq < visible.seq {
                *head = visible;
                true
            } else {
                false
            }
        });
        self.metrics.feed_head.set(visible.seq as i64);
    }
}

/// A group that is in the log and waits to be made durable and acknowledged.
struct WrittenGroup {
    acks: Vec<Ack>,
    /// Events appended, relocated copies included.
    events: u64,
    /// Of `events`, copies relocated by compaction.
    relocated: u64,
    bytes: u64,
    /// What the indexer does with it once acknowledged.
    index: IndexMsg,
}

/// A group's changes to the key index.
struct IndexMsg {
    updates: Vec<Update>,
    namespaces: Vec<(Namespace, NamespaceState)>,
    head: FeedHead,
    hlc: Hlc,
    /// Answered once the group is in the index and its namespace states are visible.
    after_index: Vec<oneshot::Sender<Result<(), WriteError>>>,
    /// Resolved quarantines, answered like `after_index` (a discard changes vectors
    /// only, which readers see once the indexer published them).
    quarantines: Vec<QuarantineReply>,
    /// Counters of the group's collections (see [`UpdateKind::Collect`]).
    tallies: Vec<Arc<CollectTally>>,
}

/// One key's new index entry.
struct Update {
    key: Slice,
    entry: IndexEntry,
    kind: UpdateKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum UpdateKind {
    /// Overwrite (local writes, which always carry the highest version).
    Overwrite,
    /// Compare with the current entry and keep the higher version (events from peers).
    Merge,
    /// A relocated copy: take it only if the entry still points at the copy at this
    /// position (the version is the same; only the position moves).
    Relocate(LogPosition),
    /// A collected tombstone (see [`CollectRequest`]): an epitaph or gone; what it did
    /// is counted in the message's `tallies[tally]`.
    Collect { epitaph: bool, tally: usize },
}

struct Ack {
    reply: Reply,
    _permit: Option<OwnedSemaphorePermit>,
}

enum Reply {
    Write(
        oneshot::Sender<Result<Vec<Applied>, WriteError>>,
        Vec<Applied>,
    ),
    Apply(
        oneshot::Sender<Result<ApplyOutcome, WriteError>>,
        ApplyOutcome,
    ),
    /// Answered by the indexer, once the group is in the key index (relocations and
    /// covers, which are no client's writes).
    AfterIndex(oneshot::Sender<Result<(), WriteError>>),
    /// Answered by the indexer, like `AfterIndex`.
    Quarantine(
        oneshot::Sender<Result<QuarantineOutcome, WriteError>>,
        QuarantineOutcome,
    ),
}

type QuarantineReply = (
    oneshot::Sender<Result<QuarantineOutcome, WriteError>>,
    QuarantineOutcome,
);

impl Reply {
    fn fail(self, err: WriteError) {
        match self {
            Reply::Write(tx, _) => drop(tx.send(Err(err))),
            Reply::Apply(tx, _) => drop(tx.send(Err(err))),
            Reply::AfterIndex(tx) => drop(tx.send(Err(err))),
            Reply::Quarantine(tx, _) => drop(tx.send(Err(err))),
        }
    }
}

impl Work {
    fn fail(self, err: WriteError) {
        match self {
            Work::Write(w) => drop(w.reply.send(Err(err))),
            Work::Apply(a) => drop(a.reply.send(Err(err))),
            Work::Relocate(r) => drop(r.reply.send(Err(err))),
            Work::Cover(c) => drop(c.reply.send(Err(err))),
            Work::Policy(p) => drop(p.reply.send(Err(err))),
            Work::Collect(c) => drop(c.reply.send(Err(err))),
            Work::Quarantine(q) => drop(q.reply.send(Err(err))),
        }
    }
}

/// What becomes of one event received from a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Its dot is applied or held here already.
    Duplicate,
    Apply,
    /// Held until this node's clock allows it.
    Park,
    /// Held until an operator resolves its namespace's policy conflict.
    Quarantine,
}

/// What [`Writer::judge`] decided for a batch of events from a peer.
#[derive(Default)]
struct Judged {
    fates: Vec<Fate>,
    /// Empty lww namespaces that take the policy of their first events.
    adopt: Vec<(Namespace, Policy)>,
    /// Bytes the held store needs for the batch.
    hold_bytes: u64,
}

/// A client operation's clock reading and value (`None`: a delete), as appended.
type LocalEvent<'a> = (Hlc, Option<(ContentType, &'a [u8])>);

/// The states of CRDT keys the writer appended and the indexer may not have applied
/// yet, by key (`crdt_key_prefix`), so that a CRDT write sees them without waiting for
/// the indexer. Entries leave once the indexed position passes theirs.
#[derive(Default)]
struct RecentStates {
    by_key: HashMap<Vec<u8>, Vec<(u64, bytes::Bytes)>>,
    order: std::collections::VecDeque<(u64, Vec<u8>)>,
}

impl RecentStates {
    /// Records the state appended at `seq` for the entry `index_key` (`prefix ‖ origin`).
    fn add(&mut self, seq: u64, index_key: &[u8], state: bytes::Bytes) {
        let prefix = index_key[..index_key.len() - 8].to_vec();
        self.by_key
            .entry(prefix.clone())
            .or_default()
            .push((seq, state));
        self.order.push_back((seq, prefix));
    }

    /// Forgets what the index holds: everything at or before `indexed`.
    fn prune(&mut self, indexed: u64) {
        while let Some((seq, _)) = self.order.front() {
            if *seq > indexed {
                break;
            }
            let (_, prefix) = self.order.pop_front().expect("peeked");
            if let Some(states) = self.by_key.get_mut(&prefix) {
                states.retain(|(s, _)| *s > indexed);
                if states.is_empty() {
                    self.by_key.remove(&prefix);
                }
            }
        }
    }

    /// Forgets the states appended after `seq` (a group that was rolled back).
    fn forget_after(&mut self, seq: u64) {
        while let Some((s, _)) = self.order.back() {
            if *s <= seq {
                break;
            }
            let (s, prefix) = self.order.pop_back().expect("peeked");
            if let Some(states) = self.by_key.get_mut(&prefix) {
                states.retain(|(at, _)| *at < s);
                if states.is_empty() {
                    self.by_key.remove(&prefix);
                }
            }
        }
    }

    fn states(&self, prefix: &[u8]) -> impl Iterator<Item = &bytes::Bytes> {
        self.by_key
            .get(prefix)
            .into_iter()
            .flatten()
            .map(|(_, state)| state)
    }
}

/// The writer's state before a group (see [`Writer::mark`]).
struct Mark {
    seq: u64,
    clock: HlcClock,
    sparse: SparseBuilder,
    namespaces: Vec<Namespace>,
    /// Whether the group may take events out of the held store (releases, a
    /// quarantine's retry or discard): undone by reading the held file again.
    takes_held: bool,
}

/// A group being built: what goes into the log buffer and the index.
struct Group {
    start_offset: u64,
    segment_base: u64,
    sparse_update: SparseUpdate,
    updates: Vec<Update>,
    /// Index key -> position in `updates`: one index batch must not hold a key twice.
    positions: HashMap<Slice, usize, foldhash::fast::RandomState>,
    touched: Vec<Namespace>,
    acks: Vec<Ack>,
    events: u64,
    relocated: u64,
    /// Where the group's collections count what they did.
    tallies: Vec<Arc<CollectTally>>,
    /// Whether the key index reflected every earlier group when this one began: only
    /// then are repairs of held dots judged against it.
    indexed: bool,
}

/// Lets the writer's short waits for stragglers end on time: the default 50 µs timer
/// slack is as long as the waits themselves.
fn set_fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and affects only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// Adds a collection to a group. A key that already has an update in the group is left
/// alone: the indexer reads the key's current entry from the index, which would not
/// show that update (compaction sees the entry unchanged and keeps the record).
fn add_collect(g: &mut Group, c: CollectRequest) {
    let tally = g.tallies.len();
    g.tallies.push(c.tally);
    for (key, entry, epitaph) in c.entries {
        if g.positions.contains_key(&key[..]) {
            continue;
        }
        g.positions.insert(key.clone(), g.updates.len());
        let kind = UpdateKind::Collect { epitaph, tally };
        g.updates.push(Update { key, entry, kind });
    }
    g.acks.push(Ack {
        reply: Reply::AfterIndex(c.reply),
        _permit: None,
    });
}

pub(crate) fn wall_ms() -> u64 {
    crate::clock::wall_ms()
}

/// Starts the writer threads. The returned handle finishes when the request channel
/// closes or a shutdown request arrives, after everything accepted is durable.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    queue: Arc<WriteQueue<Request>>,
    clock: HlcClock,
    namespaces: HashMap<Namespace, NamespaceState>,
) -> std::io::Result<JoinHandle<()>> {
    let segment = shared.log.active();
    let writer = Writer {
        sparse: SparseBuilder::for_segment(&segment),
        segment,
        seq: shared.log.last_seq(),
        shared,
        queue,
        clock,
        namespaces,
        buf: Vec::new(),
        fsync_avg: Duration::from_micros(500),
        expected: 0,
        index_msgs_sent: 0,
        crdt_recent: RecentStates::default(),
    };
    std::thread::Builder::new()
        .name("asp-writer".into())
        .spawn(move || writer.run())
}

struct Writer {
    shared: Arc<Shared>,
    queue: Arc<WriteQueue<Request>>,
    clock: HlcClock,
    /// Every dot written (including those not yet indexed) and the newest clock
    /// reading, per namespace.
    namespaces: HashMap<Namespace, NamespaceState>,
    /// The last sequence number assigned.
    seq: u64,
    segment: Arc<Segment>,
    sparse: SparseBuilder,
    buf: Vec<u8>,
    /// Smoothed fsync duration, which bounds the wait for stragglers.
    fsync_avg: Duration,
    /// States of CRDT keys appended but perhaps not indexed yet.
    crdt_recent: RecentStates,
    /// Requests expected in the next group: those acknowledged by the last fsync (who
    /// will be back) plus those that were already waiting when it finished.
    expected: usize,
    /// Groups handed to the indexer (see [`Writer::roll_back`]).
    index_msgs_sent: u64,
}

/// What the writer collected for one group.
#[derive(Default)]
struct Collected {
    requests: Vec<Work>,
    events: usize,
    bytes: usize,
    shutdown: Vec<oneshot::Sender<()>>,
}

impl Collected {
    fn add(&mut self, request: Request) {
        match request {
            Request::Write(w) => {
                self.events += w.ops.len();
                self.bytes += w.bytes;
                self.requests.push(Work::Write(w));
            }
            Request::Apply(a) => {
                self.events += a.events.len();
                self.bytes += a.bytes;
                self.requests.push(Work::Apply(a));
            }
            Request::Relocate(r) => {
                self.events += r.records.len();
                self.bytes += r.bytes;
                self.requests.push(Work::Relocate(r));
            }
            Request::Cover(c) => self.requests.push(Work::Cover(c)),
            Request::Policy(p) => self.requests.push(Work::Policy(p)),
            Request::Collect(c) => self.requests.push(Work::Collect(c)),
            Request::Quarantine(q) => self.requests.push(Work::Quarantine(q)),
            Request::Shutdown(reply) => self.shutdown.push(reply),
        }
    }
}

impl Writer {
    fn run(mut self) {
        let (index_tx, index_rx) = std_mpsc::sync_channel(INDEX_QUEUE_MAX);
        let indexer = {
            let shared = self.shared.clone();
            std::thread::Builder::new()
                .name("asp-index".into())
                .spawn(move || run_indexer(shared, index_rx))
                .expect("cannot start the index thread")
        };
        let syncer = match self.shared.config.fsync {
            FsyncMode::Interval { ms } => {
                let shared = self.shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name("asp-syncer".into())
                        .spawn(move || run_syncer(shared, Duration::from_millis(ms)))
                        .expect("cannot start the fsync thread"),
                )
            }
            _ => None,
        };
        set_fine_timer_slack();

        let mut shutdown_replies = Vec::new();
        loop {
            // While events are parked, wake for the earliest one's release.
            let first = match self.release_deadline() {
                None => match self.queue.recv() {
                    Some(first) => Some(first),
                    None => break,
                },
                Some(deadline) => match self.queue.recv_until(deadline) {
                    Some(first) => Some(first),
                    None if self.queue.is_closed() => break,
                    None => None,
                },
            };
            let mut group = Collected::default();
            if let Some(first) = first {
                group.add(first);
                self.drain(&mut group);
                if self.shared.config.fsync == FsyncMode::Always && group.shutdown.is_empty() {
                    self.gather_stragglers(&mut group);
                }
            }
            self.shared
                .metrics
                .writer_queue_depth
                .set(self.queue.len() as i64);
            let stop = !group.shutdown.is_empty();
            shutdown_replies.append(&mut group.shutdown);
            if let Some(msg) = self.process(group.requests) {
                self.commit(msg, &index_tx);
            }
            if stop {
                break;
            }
        }

        // Refuse whatever arrived after the shutdown request.
        self.queue.close();
        while let Some(request) = self.queue.try_recv() {
            match request {
                Request::Write(w) => Work::Write(w).fail(WriteError::Closed),
                Request::Apply(a) => Work::Apply(a).fail(WriteError::Closed),
                Request::Relocate(r) => Work::Relocate(r).fail(WriteError::Closed),
                Request::Cover(c) => Work::Cover(c).fail(WriteError::Closed),
                Request::Policy(p) => Work::Policy(p).fail(WriteError::Closed),
                Request::Collect(c) => Work::Collect(c).fail(WriteError::Closed),
                Request::Quarantine(q) => Work::Quarantine(q).fail(WriteError::Closed),
                Request::Shutdown(reply) => shutdown_replies.push(reply),
            }
        }
        drop(index_tx);
        let _ = indexer.join();
        {
            let mut progress = self.shared.progress.lock().unwrap();
            progress.stopping = true;
        }
        self.shared.progress_changed.notify_all();
        if let Some(syncer) = syncer {
            let _ = syncer.join();
        }
        self.finish();
        for reply in shutdown_replies {
            let _ = reply.send(());
        }
    }

    /// Takes what is already waiting, up to the group limits.
    fn drain(&mut self, group: &mut Collected) {
        let config = &self.shared.config;
        while group.events < config.group_events_max
            && group.bytes < config.group_bytes_max
            && group.shutdown.is_empty()
        {
            match self.queue.try_recv() {
                Some(request) => group.add(request),
                None => break,
            }
        }
    }

    /// Waits for the writers acknowledged by the last fsync to come back, so that they
    /// join this group rather than form a cohort of their own. The wait goes on while
    /// they keep arriving, each within half an fsync of the previous one, up to
    /// [`STRAGGLER_WAIT_MAX`] in all. A lone sequential writer never waits.
    fn gather_stragglers(&mut self, group: &mut Collected) {
        let config = &self.shared.config;
        let started = Instant::now();
        let gap = self.fsync_avg / 2;
        while group.requests.len() < self.expected
            && group.events < config.group_events_max
            && group.bytes < config.group_bytes_max
            && group.shutdown.is_empty()
        {
            let deadline = (Instant::now() + gap).min(started + STRAGGLER_WAIT_MAX);
            match self.queue.recv_until(deadline) {
                Some(request) => group.add(request),
                None => break,
            }
        }
    }

    /// Makes everything durable on a clean stop, whatever the fsync mode.
    fn finish(&self) {
        if self.shared.failure.get().is_some() {
            return;
        }
        if let Err(e) = self.segment.file.sync_data() {
            self.shared.fail(format!(
                "fsync of {} at shutdown: {e}",
                self.segment.path.display()
            ));
            return;
        }
        if let Err(e) = self.shared.index.persist() {
            tracing::warn!(error = %e, "could not persist the key index at shutdown; it will be rebuilt from the log");
        }
        // Everything issued is durable now: the next start may go on right after it.
        if let Err(e) = self.shared.counters.lock().unwrap().settle() {
            tracing::warn!(error = %e, "could not settle the counters file at shutdown; the next start leaves a gap in this node's counters");
        }
        let mut progress = self.shared.progress.lock().unwrap();
        progress.synced = progress.written;
        self.shared.publish(&progress);
    }

    /// Checks, encodes and appends a group; returns it for the fsync and the
    /// acknowledgements, or `None` if nothing of it needs either.
    fn process(&mut self, group: Vec<Work>) -> Option<WrittenGroup> {
        let wall = wall_ms();
        if group.is_empty() && !self.release_due_at(wall) {
            return None;
        }
        if let Some(err) = self.shared.failed() {
            for work in group {
                work.fail(err.clone());
            }
            return None;
        }
        let group = self.reserve_counters(group);
        if let Some(err) = self.shared.failed() {
            for work in group {
                work.fail(err.clone());
            }
            return None;
        }
        let reads = group.iter().any(|work| match work {
            Work::Write(w) => w.ops.iter().any(|op| op.condition != Condition::None),
            Work::Apply(a) => a.repair && self.holds_any(&a.events),
            Work::Relocate(_)
            | Work::Cover(_)
            | Work::Policy(_)
            | Work::Collect(_)
            | Work::Quarantine(_) => false,
        });
        if reads {
            // Conditions and repairs read the index, which must reflect every earlier
            // write.
            self.wait_indexed(self.seq);
        }
        // CRDT writes read the index too, plus the states the indexer has not
        // applied yet, which the writer keeps until it has.
        self.crdt_recent
            .prune(self.shared.indexed_seq.load(Ordering::Acquire));
        let group = self.refuse_without_space(group);
        if group.is_empty() && !self.release_due_at(wall) {
            return None;
        }
        if self.segment.len() >= self.shared.config.segment_bytes_max {
            match self.shared.log.rotate() {
                Ok(segment) => {
                    self.sparse = SparseBuilder::for_segment(&segment);
                    self.segment = segment;
                }
                Err(e) if is_no_space(&e) => {
                    // Nothing changed: the active segment stays, and takes the next
                    // group once there is room for a new one.
                    let err = self.shared.no_space(format!(
                        "sealing log segment {}: {e}",
                        self.segment.path.display()
                    ));
                    for work in group {
                        work.fail(err.clone());
                    }
                    return None;
                }
                Err(e) => {
                    let err = self.shared.fail(format!(
                        "sealing log segment {}: {e}",
                        self.segment.path.display()
                    ));
                    for work in group {
                        work.fail(err.clone());
                    }
                    return None;
                }
            }
        }

        self.compact_held();
        self.buf.clear();
        let mark = self.mark(&group);
        let mut g = Group {
            start_offset: self.segment.len(),
            segment_base: self.segment.base,
            sparse_update: SparseUpdate::default(),
            updates: Vec::new(),
            positions: HashMap::default(),
            touched: Vec::new(),
            acks: Vec::with_capacity(group.len()),
            events: 0,
            relocated: 0,
            tallies: Vec::new(),
            indexed: reads,
        };
        for work in group {
            match work {
                Work::Write(w) => match self.policy(&w.namespace) {
                    Policy::Lww => self.add_local(&mut g, w, wall),
                    policy => self.add_local_crdt(&mut g, w, wall, policy),
                },
                Work::Apply(a) => self.add_remote(&mut g, a, wall),
                Work::Relocate(r) => self.add_relocated(&mut g, r),
                Work::Cover(c) => self.add_cover(&mut g, c),
                Work::Policy(p) => self.set_policy(p),
                Work::Collect(c) => add_collect(&mut g, c),
                Work::Quarantine(q) => self.resolve_quarantine(&mut g, q, wall),
            }
        }
        self.release_parked(&mut g, wall);
        // Events held by this group are acknowledged with it: durable first.
        if let Err(err) = self.sync_held() {
            for ack in g.acks {
                ack.reply.fail(err.clone());
            }
            return None;
        }
        if g.acks.is_empty() && self.buf.is_empty() {
            return None;
        }

        if !self.buf.is_empty()
            && let Err(e) =
                self.shared
                    .log
                    .append(&self.segment, &self.buf, self.seq, &g.sparse_update)
        {
            let what = format!("appending to {}: {e}", self.segment.path.display());
            let err = if is_no_space(&e) {
                match self.roll_back(mark) {
                    Ok(()) => self.shared.no_space(what),
                    Err(undo) => self.shared.fail(format!(
                        "{what}; then cutting the partial write back failed: {undo}"
                    )),
                }
            } else {
                self.shared.fail(what)
            };
            for ack in g.acks {
                ack.reply.fail(err.clone());
            }
            return None;
        }
        if !self.buf.is_empty() {
            self.shared.space_regained();
        }
        let head = FeedHead {
            seq: self.seq,
            segment: g.segment_base,
            offset: g.start_offset + self.buf.len() as u64,
        };
        self.shared.progress.lock().unwrap().written = head;
        let namespaces = g
            .touched
            .into_iter()
            .map(|ns| {
                let state = self.namespaces[&ns].clone();
                (ns, state)
            })
            .collect();
        Some(WrittenGroup {
            acks: g.acks,
            events: g.events,
            relocated: g.relocated,
            bytes: self.buf.len() as u64,
            index: IndexMsg {
                updates: g.updates,
                namespaces,
                head,
                hlc: self.clock.last(),
                after_index: Vec::new(),
                quarantines: Vec::new(),
                tallies: g.tallies,
            },
        })
    }

    /// The writer's state before a group: all that processing a group changes in the
    /// writer, so that a group that cannot be appended (a full disk) leaves no trace.
    /// Namespace states are not copied (a bootstrapping namespace's vector can be
    /// large): only the names the group's requests name (the only namespaces any
    /// request can touch), whose states [`Writer::roll_back`] takes from the indexer.
    fn mark(&self, group: &[Work]) -> Mark {
        fn note<'a>(names: &mut Vec<&'a Namespace>, ns: &'a Namespace) {
            if !names.contains(&ns) {
                names.push(ns);
            }
        }
        let mut names: Vec<&Namespace> = Vec::new();
        let mut takes_held = false;
        for work in group {
            match work {
                Work::Write(w) => note(&mut names, &w.namespace),
                Work::Apply(a) => a.events.iter().for_each(|e| note(&mut names, &e.namespace)),
                Work::Cover(c) => note(&mut names, &c.namespace),
                Work::Quarantine(q) => {
                    note(&mut names, &q.namespace);
                    takes_held = true;
                }
                Work::Relocate(_) | Work::Policy(_) | Work::Collect(_) => {}
            }
        }
        let mut namespaces: Vec<Namespace> = names.into_iter().cloned().collect();
        // Parked events the group will release touch their namespaces too.
        let limit = wall_ms().saturating_add(self.clock.max_skew_ms());
        for ns in self.shared.held.lock().unwrap().due_namespaces(limit) {
            takes_held = true;
            if !namespaces.contains(&ns) {
                namespaces.push(ns);
            }
        }
        Mark {
            seq: self.seq,
            clock: self.clock.clone(),
            sparse: self.sparse.clone(),
            namespaces,
            takes_held,
        }
    }

    /// Undoes a group that was processed but could not be appended: cuts the segment
    /// back to its end (a partial write must not stay behind the next append) and puts
    /// the writer's state back as [`Writer::mark`] saw it.
    ///
    /// A namespace's state before the group is what the indexer publishes once it
    /// has applied every group sent before: each group hands it the states of the
    /// namespaces it touched, as the writer left them.
    fn roll_back(&mut self, mark: Mark) -> std::io::Result<()> {
        self.shared.log.cut_back(&self.segment)?;
        self.crdt_recent.forget_after(mark.seq);
        self.seq = mark.seq;
        self.clock = mark.clock;
        self.sparse = mark.sparse;
        {
            let mut progress = self.shared.progress.lock().unwrap();
            while self.shared.index_msgs_applied.load(Ordering::Acquire) < self.index_msgs_sent
                && self.shared.failure.get().is_none()
            {
                progress = self.shared.progress_changed.wait(progress).unwrap();
            }
        }
        let indexed = self.shared.namespaces.read().unwrap();
        for ns in &mark.namespaces {
            match indexed.get(ns) {
                Some(state) => self.namespaces.insert(ns.clone(), state.clone()),
                None => self.namespaces.remove(ns),
            };
        }
        drop(indexed);
        {
            let me = self.shared.node_id;
            let mut counters = self.shared.counters.lock().unwrap();
            for ns in &mark.namespaces {
                let last = self
                    .namespaces
                    .get(ns)
                    .map_or(0, |s| s.vector.max_counter(me));
                counters.take_back(ns, last);
            }
        }
        if mark.takes_held {
            // What the group took out of the held store is still in its file (it is
            // rewritten only at the start of a group).
            let namespaces = &self.namespaces;
            self.shared
                .held
                .lock()
                .unwrap()
                .reload(|ns, dot| namespaces.get(ns).is_some_and(|s| s.vector.contains(dot)))
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// The free-space guard: while the data directory's filesystem has less than
    /// `min_free_bytes` free, client writes and peer events are refused before they
    /// change anything (compaction's copies, covers and collections still go: they
    /// are what frees space). One `statvfs` per group.
    fn refuse_without_space(&self, group: Vec<Work>) -> Vec<Work> {
        let config = &self.shared.config;
        if config.min_free_bytes == 0 {
            return group;
        }
        let free = match config.fs.free_bytes(&config.data_dir) {
            Ok(free) if free < config.min_free_bytes => free,
            // A filesystem that cannot say is not refused: an append would still
            // fail cleanly.
            _ => return group,
        };
        let mut refused = None;
        group
            .into_iter()
            .filter_map(|work| match work {
                Work::Write(_) | Work::Apply(_) => {
                    let err = refused
                        .get_or_insert_with(|| {
                            self.shared.no_space(format!(
                                "the filesystem of {} has {free} bytes free, below min_free_bytes = {}",
                                config.data_dir.display(),
                                config.min_free_bytes
                            ))
                        })
                        .clone();
                    work.fail(err);
                    None
                }
                other => Some(other),
            })
            .collect()
    }

    /// Appends one event to the group's buffer and index changes; returns its feed
    /// position.
    fn append(
        &mut self,
        g: &mut Group,
        event: &EventRef<'_>,
        txn_end: bool,
        kind: UpdateKind,
    ) -> u64 {
        self.seq += 1;
        let offset = g.start_offset + self.buf.len() as u64;
        let before = self.buf.len();
        let mut flags = if txn_end { FLAG_TXN_END } else { 0 };
        if self.buf.is_empty() {
            // The first record of this group's one append.
            flags |= FLAG_GROUP_START;
        }
        codec::encode_record(&mut self.buf, self.seq, flags, event);
        self.sparse.record(
            &mut g.sparse_update,
            self.seq,
            offset,
            event.namespace.as_bytes(),
        );
        let (content_type, value) = match event.put {
            Some((ct, value)) => (Some(ct), Some(value)),
            None => (None, None),
        };
        let entry = IndexEntry {
            content_type,
            dot: event.dot,
            hlc: event.hlc,
            seq: self.seq,
            position: LogPosition {
                segment: g.segment_base,
                offset: offset as u32,
                frame_len: (self.buf.len() - before) as u32,
            },
            value_len: value.map_or(0, |v| v.len() as u32),
            inline: value
                .filter(|v| v.len() <= INLINE_VALUE_BYTES_MAX)
                .map(bytes::Bytes::copy_from_slice),
        };
        let key = codec::event_index_key(event.namespace, event.key, event.dot, event.context);
        if !event.context.is_empty()
            && let Some((_, value)) = event.put
        {
            self.crdt_recent
                .add(self.seq, &key, bytes::Bytes::copy_from_slice(value));
        }
        let key = Slice::from(key);
        match g.positions.get(&key[..]) {
            // Two events for one key in one group: the index gets the winner.
            Some(&p) => {
                let current = &mut g.updates[p];
                if lww_wins(&entry.version(), &current.entry.version()) {
                    current.entry = entry;
                    current.kind = kind;
                }
            }
            None => {
                g.positions.insert(key.clone(), g.updates.len());
                g.updates.push(Update { key, entry, kind });
            }
        }
        g.events += 1;
        self.seq
    }

    fn touch(&mut self, g: &mut Group, namespace: &Namespace, hlc: Hlc) {
        let state = self.namespaces.entry(namespace.clone()).or_default();
        state.max_hlc = state.max_hlc.max(hlc);
        if !g.touched.contains(namespace) {
            g.touched.push(namespace.clone());
        }
    }

    /// A client's batch: new dots of this node, fresh clock readings.
    fn add_local(&mut self, g: &mut Group, w: WriteRequest, wall: u64) {
        if let Some((i, op)) = w
            .ops
            .iter()
            .enumerate()
            .find(|(_, op)| matches!(op.kind, WriteKind::Crdt(_)))
        {
            let WriteKind::Crdt(crdt) = &op.kind else {
                unreachable!("found above")
            };
            let err = WriteError::WrongPolicy(format!(
                "operation {i} on key {:?} is a {} operation, but namespace {} uses the lww policy (set its policy first)",
                op.key.as_str(),
                crdt.policy(),
                w.namespace
            ));
            self.shared.metrics.writes_rejected.inc();
            let _ = w.reply.send(Err(err));
            return;
        }
        if let Err(e) = self.check_conditions(&w, g) {
            self.shared.metrics.writes_rejected.inc();
            let _ = w.reply.send(Err(e));
            return;
        }
        let first_counter = self.next_counter(&w.namespace);
        let events: Vec<_> = w
            .ops
            .iter()
            .map(|op| {
                let put = match &op.kind {
                    WriteKind::Put {
                        content_type,
                        value,
                    } => Some((*content_type, &value[..])),
                    WriteKind::Delete => None,
                    WriteKind::Crdt(_) => unreachable!("refused above"),
                };
                (self.clock.tick(wall), put)
            })
            .collect();
        let applied = self.append_ops(g, &w, first_counter, &events, &[]);
        g.acks.push(Ack {
            reply: Reply::Write(w.reply, applied),
            _permit: w.permit,
        });
    }

    /// Appends a client's batch: operation `i` as the event with dot
    /// `first_counter + i` of this node, clock reading and value (`None`: a delete)
    /// `events[i]`. Records the dots in the namespace's vector.
    fn append_ops(
        &mut self,
        g: &mut Group,
        w: &WriteRequest,
        first_counter: u64,
        events: &[LocalEvent<'_>],
        context: &[u8],
    ) -> Vec<Applied> {
        let node_id = self.shared.node_id;
        let last = events.len() - 1;
        let mut applied = Vec::with_capacity(events.len());
        let mut hlc = Hlc::ZERO;
        for (i, (op, &(event_hlc, put))) in w.ops.iter().zip(events).enumerate() {
            hlc = event_hlc;
            let dot = Dot {
                origin: node_id,
                counter: first_counter + i as u64,
            };
            let event = EventRef {
                namespace: w.namespace.as_str(),
                key: op.key.as_str(),
                put,
                dot,
                hlc,
                context,
            };
            let seq = self.append(g, &event, i == last, UpdateKind::Overwrite);
            applied.push(Applied { dot, hlc, seq });
        }
        self.touch(g, &w.namespace, hlc);
        let last_counter = first_counter + last as u64;
        self.namespaces
            .get_mut(&w.namespace)
            .expect("just touched")
            .vector
            .insert_range(node_id, first_counter, last_counter);
        self.shared
            .counters
            .lock()
            .unwrap()
            .issued(&w.namespace, last_counter);
        applied
    }

    /// Events from a peer: those already held (applied or held) are left out, those
    /// that cannot be applied yet are held (see [`crate::held`]), the rest are
    /// appended as they are and merged into the index by version. Only a batch whose
    /// events would not fit in the held store is refused, as a whole.
    fn add_remote(&mut self, g: &mut Group, a: ApplyRequest, wall: u64) {
        if let Err(e) = self.check_own_origin(&a.events) {
            let _ = a.reply.send(Err(e));
            return;
        }
        let shared = self.shared.clone();
        let mut held = shared.held.lock().unwrap();
        let judged = self.judge(g, &held, &a.events, wall, a.repair);
        if judged.hold_bytes > held.room() {
            held.note_full_refusal();
            shared.metrics.held_full_refusals.inc();
            let err = self.held_full(&held, &a.events, &judged, wall);
            let _ = a.reply.send(Err(err));
            return;
        }
        let arrivals = vec![wall; a.events.len()];
        match self.apply_judged(g, &mut held, &a.events, &arrivals, judged, wall) {
            Ok(outcome) => g.acks.push(Ack {
                reply: Reply::Apply(a.reply, outcome),
                _permit: a.permit,
            }),
            Err(e) => drop(a.reply.send(Err(e))),
        }
    }

    /// Decides, changing nothing, what becomes of each event received from a peer:
    /// the one home of the rules for remote events that get past validation.
    /// `repair`: the events are reconciliation repairs, and one whose dot this node
    /// holds is applied again if it supersedes its key's entry
    /// ([`Writer::repair_supersedes`]) and its policy is the namespace's here.
    fn judge(&self, g: &Group, held: &Held, events: &[Event], wall: u64, repair: bool) -> Judged {
        let limit = wall.saturating_add(self.clock.max_skew_ms());
        let mut judged = Judged::default();
        let mut seen: HashSet<(&Namespace, Dot), foldhash::fast::RandomState> =
            HashSet::with_capacity_and_hasher(events.len(), Default::default());
        // The batch's namespaces: their policy here (as adopted by this batch), and
        // whether the batch puts data into them (then they can no longer take one).
        let mut namespaces: Vec<(&Namespace, Policy, bool)> = Vec::new();
        for e in events {
            let ns = &e.namespace;
            let holds = self
                .namespaces
                .get(ns)
                .is_some_and(|s| s.vector.contains(e.dot));
            let fate = if !seen.insert((ns, e.dot))
                || held.contains(ns, e.dot)
                || (holds && !(repair && self.repair_supersedes(g, e)))
            {
                Fate::Duplicate
            } else if holds {
                // A repair of a held dot that supersedes its key: never held (its dot
                // is this node's already), applied only under this node's policy.
                match Policy::of_event(&e.context) {
                    Some(policy) if policy == self.policy(ns) => Fate::Apply,
                    _ => Fate::Duplicate,
                }
            } else if e.hlc.physical_ms() > limit {
                Fate::Park
            } else {
                let at = match namespaces.iter().position(|(n, _, _)| *n == ns) {
                    Some(at) => at,
                    None => {
                        namespaces.push((ns, self.policy(ns), false));
                        namespaces.len() - 1
                    }
                };
                let (_, here, filled) = namespaces[at];
                let fate = match Policy::of_event(&e.context) {
                    Some(policy) if policy == here => Fate::Apply,
                    // An empty lww namespace takes the policy of its first events, so
                    // that a policy set on one node spreads with its data.
                    Some(policy) if here == Policy::Lww && !filled && !self.holds_data(ns) => {
                        judged.adopt.push((ns.clone(), policy));
                        namespaces[at].1 = policy;
                        Fate::Apply
                    }
                    // Another policy, or (never past validation) no known policy.
                    _ => Fate::Quarantine,
                };
                if fate == Fate::Apply {
                    namespaces[at].2 = true;
                }
                fate
            };
            if matches!(fate, Fate::Park | Fate::Quarantine) {
                judged.hold_bytes += Held::record_bytes(e);
            }
            judged.fates.push(fate);
        }
        judged
    }

    /// Carries out what [`Writer::judge`] decided: adopts policies, holds what must be
    /// held (arriving at `arrivals[i]`), appends the rest.
    fn apply_judged(
        &mut self,
        g: &mut Group,
        held: &mut Held,
        events: &[Event],
        arrivals: &[u64],
        judged: Judged,
        wall: u64,
    ) -> Result<ApplyOutcome, WriteError> {
        for (ns, policy) in &judged.adopt {
            self.save_policy(ns, *policy)?;
        }
        let metrics = &self.shared.metrics;
        let mut outcome = ApplyOutcome::default();
        let mut fresh = Vec::with_capacity(events.len());
        for (i, (e, fate)) in events.iter().zip(&judged.fates).enumerate() {
            match fate {
                Fate::Duplicate => outcome.duplicates += 1,
                Fate::Park => {
                    held.hold(e.clone(), HeldReason::Parked, arrivals[i]);
                    metrics.events_parked.inc();
                    outcome.parked += 1;
                }
                Fate::Quarantine => {
                    held.hold(e.clone(), HeldReason::Quarantined, arrivals[i]);
                    metrics.events_quarantined.inc();
                    outcome.quarantined += 1;
                }
                Fate::Apply => {
                    // Not new only for a repair of a held dot that supersedes its key.
                    let new = self
                        .namespaces
                        .entry(e.namespace.clone())
                        .or_default()
                        .vector
                        .insert(e.dot);
                    fresh.push((i, new));
                }
            }
        }
        let last = fresh.len().saturating_sub(1);
        for (j, &(i, new)) in fresh.iter().enumerate() {
            let e = &events[i];
            // Cannot fail: readings too far ahead were parked.
            let _ = self.clock.observe(e.hlc, wall);
            // An event newer than everything the namespace holds replaces whatever its
            // key holds, so the indexer need not read the key first (the common case
            // in a catch-up, where events come in their origin's clock order).
            let newest = new
                && self
                    .namespaces
                    .get(&e.namespace)
                    .is_some_and(|s| e.hlc > s.max_hlc);
            let kind = if newest {
                UpdateKind::Overwrite
            } else {
                UpdateKind::Merge
            };
            outcome.last_seq = self.append(g, &EventRef::from_event(e), j == last, kind);
            outcome.applied += 1;
            self.touch(g, &e.namespace, e.hlc);
        }
        Ok(outcome)
    }

    /// Why a batch that does not fit in the held store is refused: the refusal it had
    /// before events could be held, saying that the held store is full.
    fn held_full(&self, held: &Held, events: &[Event], judged: &Judged, wall: u64) -> WriteError {
        let full = format!(
            "the events this node holds already take {} of held_bytes_max = {} bytes, and this batch needs {} more, so nothing of it was applied",
            held.bytes(),
            held.bytes_max(),
            judged.hold_bytes
        );
        let first = |want: Fate| {
            events
                .iter()
                .zip(&judged.fates)
                .find(|(_, f)| **f == want)
                .map(|(e, _)| e)
        };
        if let Some(e) = first(Fate::Park) {
            return WriteError::ClockSkew(format!(
                "event {} of namespace {} carries clock {} ms, {} ms ahead of this node's clock (the limit is max_clock_skew = {} ms), and {full}: check NTP on both nodes, or raise held_bytes_max",
                e.dot,
                e.namespace,
                e.hlc.physical_ms(),
                e.hlc.physical_ms() - wall,
                self.clock.max_skew_ms()
            ));
        }
        let e = first(Fate::Quarantine).expect("a batch that needs holding holds something");
        WriteError::PolicyFixed(format!(
            "namespace {} uses the {} policy on this node, but the peer sent an event of another policy ({}), and {full}: configure the same policy on every node, resolve the quarantine, or raise held_bytes_max",
            e.namespace,
            self.policy(&e.namespace),
            e.dot
        ))
    }

    /// The writer's deadline for the release of the earliest parked event (`None`:
    /// nothing parked, or the store failed).
    fn release_deadline(&self) -> Option<Instant> {
        if self.shared.failure.get().is_some() {
            return None;
        }
        let due_ms = self
            .shared
            .held
            .lock()
            .unwrap()
            .next_release_ms(self.clock.max_skew_ms())?;
        // Woken at least once a second, in case the wall clock jumps ahead.
        let wait_ms = due_ms.saturating_sub(wall_ms()).min(1000);
        Some(Instant::now() + Duration::from_millis(wait_ms))
    }

    /// Whether a parked event may be applied at `wall`.
    fn release_due_at(&self, wall: u64) -> bool {
        self.shared
            .held
            .lock()
            .unwrap()
            .next_release_ms(self.clock.max_skew_ms())
            .is_some_and(|due| due <= wall)
    }

    /// Applies the parked events this node's clock now allows, through the same rules
    /// as any received event (a policy conflict found now quarantines them).
    fn release_parked(&mut self, g: &mut Group, wall: u64) {
        let shared = self.shared.clone();
        let mut held = shared.held.lock().unwrap();
        let due = held.take_due(wall.saturating_add(self.clock.max_skew_ms()));
        if due.is_empty() {
            return;
        }
        let (events, arrivals): (Vec<Event>, Vec<u64>) = due.into_iter().unzip();
        let judged = self.judge(g, &held, &events, wall, false);
        match self.apply_judged(g, &mut held, &events, &arrivals, judged, wall) {
            Ok(outcome) => {
                shared
                    .metrics
                    .events_released
                    .inc_by(outcome.applied as u64);
                tracing::info!(
                    applied = outcome.applied,
                    quarantined = outcome.quarantined,
                    "parked events released: this node's clock caught up with theirs"
                );
            }
            Err(e) => {
                // Only saving a policy can fail, before anything changed; trying again
                // at once would fail again.
                shared.fail(format!("applying parked events: {e}"));
            }
        }
    }

    /// Makes the events held by this group durable.
    fn sync_held(&self) -> Result<(), WriteError> {
        let mut held = self.shared.held.lock().unwrap();
        let synced = held.sync();
        self.shared.metrics.held_events.set(held.len() as i64);
        self.shared.metrics.held_bytes.set(held.bytes() as i64);
        match synced {
            Ok(_) => Ok(()),
            Err(e) => {
                drop(held);
                Err(self
                    .shared
                    .fail(format!("writing {}: {e}", crate::held::HELD_FILE)))
            }
        }
    }

    /// Rewrites the held store's file without the events that left it. Done at the
    /// start of a group: those applied left in earlier groups, whose log records are
    /// durable by now (under `fsync = "always"`).
    fn compact_held(&self) {
        if let Err(e) = self.shared.held.lock().unwrap().compact() {
            // The old file is intact; the next group tries again.
            tracing::warn!(error = %e, "could not rewrite {}", crate::held::HELD_FILE);
        }
    }

    /// An operator's resolution of a namespace's quarantine.
    fn resolve_quarantine(&mut self, g: &mut Group, q: QuarantineRequest, wall: u64) {
        let shared = self.shared.clone();
        let mut held = shared.held.lock().unwrap();
        let outcome = match q.action {
            QuarantineAction::Retry => {
                let taken = held.take_quarantined(&q.namespace);
                let (events, arrivals): (Vec<Event>, Vec<u64>) = taken.into_iter().unzip();
                // Those still in conflict are held again (they were held already: no
                // room check).
                let judged = self.judge(g, &held, &events, wall, false);
                match self.apply_judged(g, &mut held, &events, &arrivals, judged, wall) {
                    Ok(o) => QuarantineOutcome {
                        applied: o.applied,
                        still_quarantined: o.quarantined,
                        ..QuarantineOutcome::default()
                    },
                    Err(e) => {
                        for (event, arrival) in events.into_iter().zip(arrivals) {
                            held.hold(event, HeldReason::Quarantined, arrival);
                        }
                        let _ = q.reply.send(Err(e));
                        return;
                    }
                }
            }
            QuarantineAction::Discard => {
                let dots = held.dots(&q.namespace, true);
                if !dots.is_empty() {
                    // The dots join the base vector durably before the events leave:
                    // on open, held events whose dots the vector holds are dropped.
                    if let Err(e) = self.cover(g, &q.namespace, &dots) {
                        let _ = q.reply.send(Err(e));
                        return;
                    }
                }
                QuarantineOutcome {
                    discarded: held.take_quarantined(&q.namespace).len(),
                    ..QuarantineOutcome::default()
                }
            }
        };
        g.acks.push(Ack {
            reply: Reply::Quarantine(q.reply, outcome),
            _permit: None,
        });
    }

    /// A peer's event that carries this node's own origin must be one this node issued
    /// (in this life or an earlier one): a higher counter means another process runs
    /// with this node's id, or a peer is lying. Taking it would make this node issue
    /// that counter again (or overflow at `u64::MAX`).
    fn check_own_origin(&self, events: &[Event]) -> Result<(), WriteError> {
        let me = self.shared.node_id;
        let counters = self.shared.counters.lock().unwrap();
        match events
            .iter()
            .find(|e| e.dot.origin == me && !counters.may_have_issued(&e.namespace, e.dot.counter))
        {
            None => Ok(()),
            Some(e) => Err(WriteError::InvalidEvent {
                reason: "own_origin",
                message: format!(
                    "event {} of namespace {} carries this node's own id, but this node never issued counter {} there (it issued up to {}): another process may be running with this node's id (a copied data directory?), or the peer is broken",
                    e.dot,
                    e.namespace,
                    e.dot.counter,
                    counters.next(&e.namespace) - 1
                ),
            }),
        }
    }

    /// Whether this node holds the dot of any of `events` (repairs of held dots read
    /// the index; others, as in a bootstrap transfer, need not wait for it).
    fn holds_any(&self, events: &[Event]) -> bool {
        events.iter().any(|e| {
            self.namespaces
                .get(&e.namespace)
                .is_some_and(|s| s.vector.contains(e.dot))
        })
    }

    /// Whether a repair whose dot this node already holds must be applied anyway: its
    /// key's entry exists and is older. Two nodes can hold the same dots in different
    /// states (a dot covered without its event, or an event applied after the delete
    /// it loses to was collected); dropping such repairs as duplicates would leave
    /// them different for good. A key with no entry had its delete collected here:
    /// anything held of it is older, and applying it would bring the key back. The
    /// writer waited for the index to reflect every earlier group (see `process`); a
    /// key this group already writes, or a dot that became held only within this
    /// group, is left alone (the next anti-entropy run looks again).
    fn repair_supersedes(&self, g: &Group, e: &Event) -> bool {
        let key = codec::event_index_key(e.namespace.as_str(), e.key.as_str(), e.dot, &e.context);
        if !g.indexed || g.positions.contains_key(&key[..]) {
            return false;
        }
        match self.shared.index.get(&key) {
            Ok(current) => current.is_some_and(|c| lww_wins(&e.version(), &c.version())),
            Err(err) => {
                tracing::warn!(namespace = %e.namespace, key = e.key.as_str(), error = %err, "cannot read the key index to judge a repair of a held event; it is dropped (the next anti-entropy run tries again)");
                false
            }
        }
    }

    /// Copies compaction moves forward: appended as they are, touching no vector,
    /// clock or namespace state.
    fn add_relocated(&mut self, g: &mut Group, r: RelocateRequest) {
        let last = r.records.len().saturating_sub(1);
        for (i, (event, from)) in r.records.iter().enumerate() {
            let kind = UpdateKind::Relocate(*from);
            self.append(g, &EventRef::from_event(event), i == last, kind);
            g.relocated += 1;
        }
        g.acks.push(Ack {
            reply: Reply::AfterIndex(r.reply),
            _permit: None,
        });
    }

    /// Joins a covered vector into the namespace's base, durably, and into its
    /// vector. The base file is written here, in queue order, so that the cover takes
    /// effect after every request queued before it. Dots held here (parked or
    /// quarantined) are left out: they are not applied, and a vector claiming them
    /// would make them duplicates when released.
    fn add_cover(&mut self, g: &mut Group, c: CoverRequest) {
        let held = self.shared.held.lock().unwrap().dots(&c.namespace, false);
        let vector = if held.is_empty() {
            c.vector
        } else {
            c.vector.difference(&held)
        };
        if let Err(e) = self.cover(g, &c.namespace, &vector) {
            let _ = c.reply.send(Err(e));
            return;
        }
        g.acks.push(Ack {
            reply: Reply::AfterIndex(c.reply),
            _permit: None,
        });
    }

    /// Joins `vector` into the namespace's base (durably) and its vector.
    fn cover(
        &mut self,
        g: &mut Group,
        namespace: &Namespace,
        vector: &VersionVector,
    ) -> Result<(), WriteError> {
        let saved = {
            let mut bases = self.shared.bases.lock().unwrap();
            let mut next = bases.clone();
            next.by_namespace
                .entry(namespace.clone())
                .or_default()
                .join(vector);
            let saved = next.save(self.shared.config.fs.as_ref(), &self.shared.config.data_dir);
            if saved.is_ok() {
                *bases = next;
            }
            saved
        };
        if let Err(e) = saved {
            // Nothing changed: the old file is intact, and the store can go on.
            let what = format!("writing the base vector file: {e}");
            return Err(if is_no_space(&e) {
                self.shared.no_space(what)
            } else {
                WriteError::Storage(what)
            });
        }
        self.namespaces
            .entry(namespace.clone())
            .or_default()
            .vector
            .join(vector);
        if !g.touched.contains(namespace) {
            g.touched.push(namespace.clone());
        }
        Ok(())
    }

    fn policy(&self, namespace: &Namespace) -> Policy {
        self.shared.policies.read().unwrap().get(namespace)
    }

    /// Whether `namespace` holds any event.
    fn holds_data(&self, namespace: &Namespace) -> bool {
        self.namespaces
            .get(namespace)
            .is_some_and(|s| !s.vector.is_empty())
    }

    fn set_policy(&mut self, p: PolicyRequest) {
        let current = self.policy(&p.namespace);
        let result = if current == p.policy {
            Ok(())
        } else if self.holds_data(&p.namespace) {
            Err(WriteError::PolicyFixed(format!(
                "namespace {} holds data under the {current} policy; a namespace's policy cannot change once it holds data",
                p.namespace
            )))
        } else {
            self.save_policy(&p.namespace, p.policy)
        };
        let _ = p.reply.send(result);
    }

    fn save_policy(&self, namespace: &Namespace, policy: Policy) -> Result<(), WriteError> {
        let mut policies = self.shared.policies.write().unwrap();
        let mut next = policies.clone();
        next.by_namespace.insert(namespace.clone(), policy);
        next.save(self.shared.config.fs.as_ref(), &self.shared.config.data_dir)
            .map_err(|e| {
                let what = format!("writing the policies file: {e}");
                if is_no_space(&e) {
                    self.shared.no_space(what)
                } else {
                    WriteError::Storage(what)
                }
            })?;
        *policies = next;
        Ok(())
    }

    /// A batch on a namespace of a CRDT policy: each operation's delta is joined into
    /// the key's state as this node holds it, and the event carries the result (this
    /// node's whole view of the key), which replaces this node's entry of the key.
    fn add_local_crdt(&mut self, g: &mut Group, w: WriteRequest, wall: u64, policy: Policy) {
        let node_id = self.shared.node_id;
        let first_counter = self.next_counter(&w.namespace);
        let refuse = |w: WriteRequest, err: WriteError, metrics: &crate::metrics::Metrics| {
            metrics.writes_rejected.inc();
            let _ = w.reply.send(Err(err));
        };
        // First every state, so that a refused operation leaves nothing behind.
        let mut states: HashMap<String, State> = HashMap::new();
        let mut encoded_states: Vec<(Hlc, bytes::Bytes)> = Vec::with_capacity(w.ops.len());
        let mut clock = self.clock.clone();
        for (i, op) in w.ops.iter().enumerate() {
            let key = op.key.as_str();
            let crdt = match &op.kind {
                WriteKind::Crdt(c) if c.policy() == policy => c,
                _ => {
                    let what = match &op.kind {
                        WriteKind::Crdt(c) => format!("a {} operation", c.policy()),
                        WriteKind::Put { .. } => "a plain put".to_owned(),
                        WriteKind::Delete => "a plain delete".to_owned(),
                    };
                    let err = WriteError::WrongPolicy(format!(
                        "operation {i} on key {key:?} is {what}, but namespace {} uses the {policy} policy",
                        w.namespace
                    ));
                    return refuse(w, err, &self.shared.metrics);
                }
            };
            if op.condition != Condition::None {
                let err = WriteError::Invalid(format!(
                    "operation {i}: conditions apply to lww namespaces (a siblings write carries its context instead)"
                ));
                return refuse(w, err, &self.shared.metrics);
            }
            let dot = Dot {
                origin: node_id,
                counter: first_counter + i as u64,
            };
            let hlc = clock.tick(wall);
            if !states.contains_key(key) {
                match self.merged_state(&w.namespace, key, policy) {
                    Ok(state) => {
                        states.insert(key.to_owned(), state);
                    }
                    Err(err) => return refuse(w, err, &self.shared.metrics),
                }
            }
            let state = states.get_mut(key).expect("just ensured");
            let delta = match (crdt, &*state) {
                (CrdtOp::Incr(n), State::Counter(c)) => match c.add(node_id, *n) {
                    Ok(d) => State::Counter(d),
                    Err(e) => {
                        let err = WriteError::Invalid(format!("operation {i} on key {key:?}: {e}"));
                        return refuse(w, err, &self.shared.metrics);
                    }
                },
                (CrdtOp::Add(m), State::Set(s)) => State::Set(s.add(m.clone(), dot)),
                (CrdtOp::Remove(m), State::Set(s)) => State::Set(s.remove(m, dot)),
                (CrdtOp::Write { context, value }, State::Siblings(_)) => {
                    State::Siblings(MvRegister::write(
                        context,
                        dot,
                        value.as_ref().map(|(ct, v)| Sibling {
                            hlc,
                            content_type: ct.code(),
                            value: v.clone(),
                        }),
                    ))
                }
                (CrdtOp::Patch(fields), State::JsonMap(_)) => {
                    State::JsonMap(JsonMap::patch(Version { hlc, dot }, fields.iter().cloned()))
                }
                _ => unreachable!("operation and state checked against the policy"),
            };
            if let Err(e) = state.join(&delta) {
                return refuse(w, WriteError::Storage(e.to_string()), &self.shared.metrics);
            }
            let encoded = bytes::Bytes::from(state.encode());
            if encoded.len() > self.shared.config.value_bytes_max {
                let err = WriteError::TooLarge(format!(
                    "key {key:?} would hold a {policy} state of {} bytes; the limit is {} (value_bytes_max)",
                    encoded.len(),
                    self.shared.config.value_bytes_max
                ));
                return refuse(w, err, &self.shared.metrics);
            }
            encoded_states.push((hlc, encoded));
        }
        self.clock = clock;
        let events: Vec<_> = encoded_states
            .iter()
            .map(|(hlc, state)| (*hlc, Some((ContentType::OctetStream, &state[..]))))
            .collect();
        let applied = self.append_ops(g, &w, first_counter, &events, &policy.event_context());
        g.acks.push(Ack {
            reply: Reply::Write(w.reply, applied),
            _permit: w.permit,
        });
    }

    /// A CRDT key's state as this node holds it: the join of its origins' entries in
    /// the index and of the states appended since the indexed position (the index may
    /// already hold some of them too: joining twice changes nothing).
    fn merged_state(
        &self,
        namespace: &Namespace,
        key: &str,
        policy: Policy,
    ) -> Result<State, WriteError> {
        let shared = &self.shared;
        let mut state = State::empty(policy).expect("a CRDT policy");
        let corrupt = |what: String| WriteError::Storage(format!("key {key:?}: {what}"));
        {
            let _gate = shared.segment_gate.read().unwrap();
            shared
                .join_crdt_entries(namespace.as_str(), key, &mut state)
                .map_err(|e| corrupt(e.to_string()))?;
        }
        let prefix = codec::crdt_key_prefix(namespace.as_str(), key);
        for v in self.crdt_recent.states(&prefix) {
            let s = State::decode(v).map_err(|e| corrupt(e.to_string()))?;
            state.join(&s).map_err(|e| corrupt(e.to_string()))?;
        }
        Ok(state)
    }

    /// The counter this node's next event in `namespace` gets (reserved by
    /// [`Writer::reserve_counters`] before the group is built).
    fn next_counter(&self, namespace: &Namespace) -> u64 {
        self.shared.counters.lock().unwrap().next(namespace)
    }

    /// Makes the counters the group's local writes will take durable as reserved
    /// (usually no I/O: counters are reserved in blocks), so that no crash can make
    /// this node issue a counter twice that a client or a peer has seen. Writes that cannot get counters are answered
    /// here and left out of the group.
    fn reserve_counters(&mut self, group: Vec<Work>) -> Vec<Work> {
        // Under `fsync = "always"` nobody sees a counter before the log holding it is
        // durable (clients get no answer, peers no feed entry): the log is its own
        // reservation, and a crash can only take back counters nobody saw.
        if self.shared.config.fsync == FsyncMode::Always {
            return group;
        }
        let mut needs: HashMap<Namespace, u64> = HashMap::new();
        for work in &group {
            if let Work::Write(w) = work {
                *needs.entry(w.namespace.clone()).or_default() += w.ops.len() as u64;
            }
        }
        if needs.is_empty() {
            return group;
        }
        let reserved = self.shared.counters.lock().unwrap().reserve(&needs);
        let Err(e) = reserved else { return group };
        let err = if e.raw_os_error() == Some(libc::ENOSPC) {
            WriteError::NoSpace(format!(
                "no space left to reserve counters in {}: free space on its filesystem; writes resume once there is room",
                self.shared.config.data_dir.display()
            ))
        } else {
            self.shared.fail(format!(
                "writing the counters file in {}: {e}",
                self.shared.config.data_dir.display()
            ))
        };
        group
            .into_iter()
            .filter_map(|work| match work {
                Work::Write(w) => {
                    let _ = w.reply.send(Err(err.clone()));
                    None
                }
                other => Some(other),
            })
            .collect()
    }

    /// Checks every condition of a request against the state it would see: earlier
    /// operations of the same request, earlier requests of this group, then the index.
    fn check_conditions(&self, w: &WriteRequest, g: &Group) -> Result<(), WriteError> {
        if w.ops.iter().all(|op| op.condition == Condition::None) {
            return Ok(());
        }
        let node_id = self.shared.node_id;
        let first_counter = self.next_counter(&w.namespace);
        // Key -> (dot, live) as left by earlier operations of this request.
        let mut local: HashMap<&str, (Dot, bool)> = HashMap::new();
        for (i, op) in w.ops.iter().enumerate() {
            if op.condition != Condition::None {
                let key = op.key.as_str();
                let current = match local.get(key) {
                    Some(&state) => Some(state),
                    None => {
                        let ikey = codec::index_key(w.namespace.as_str(), key);
                        match g.positions.get(&ikey[..]) {
                            Some(&p) => {
                                let entry = &g.updates[p].entry;
                                Some((entry.dot, entry.content_type.is_some()))
                            }
                            None => self
                                .shared
                                .index
                                .get(&ikey)
                                .map_err(|e| {
                                    WriteError::Storage(format!("reading the key index: {e}"))
                                })?
                                .map(|e| (e.dot, e.content_type.is_some())),
                        }
                    }
                };
                let live = current.filter(|&(_, live)| live).map(|(dot, _)| dot);
                let failure = match (op.condition, live) {
                    (Condition::IfVersion(want), Some(have)) if want == have => None,
                    (Condition::IfVersion(want), Some(have)) => Some(format!(
                        "expected version {want}, the current version is {have}"
                    )),
                    (Condition::IfVersion(want), None) => Some(format!(
                        "expected version {want}, but the key does not exist"
                    )),
                    (Condition::IfExists, None) => Some("the key does not exist".to_owned()),
                    (Condition::IfAbsent, Some(have)) => {
                        Some(format!("the key exists at version {have}"))
                    }
                    _ => None,
                };
                if let Some(reason) = failure {
                    return Err(WriteError::ConditionFailed {
                        index: i,
                        key: op.key.clone(),
                        reason,
                        current: live,
                    });
                }
            }
            let dot = Dot {
                origin: node_id,
                counter: first_counter + i as u64,
            };
            local.insert(
                op.key.as_str(),
                (dot, matches!(op.kind, WriteKind::Put { .. })),
            );
        }
        Ok(())
    }

    fn wait_indexed(&self, seq: u64) {
        let mut progress = self.shared.progress.lock().unwrap();
        while progress.indexed.seq < seq && self.shared.failure.get().is_none() {
            progress = self.shared.progress_changed.wait(progress).unwrap();
        }
    }
}

impl Writer {
    /// Makes a group durable (under `fsync = "always"`), acknowledges it, publishes it
    /// in the feed, and hands it to the indexer.
    fn commit(&mut self, msg: WrittenGroup, index_tx: &std_mpsc::SyncSender<IndexMsg>) {
        // A group that wrote nothing (only events already held) needs no fsync: every
        // earlier group was made durable before this one was taken.
        if self.shared.config.fsync == FsyncMode::Always && msg.bytes > 0 {
            let started = Instant::now();
            let synced = self.segment.file.sync_data();
            let took = started.elapsed();
            self.shared.metrics.fsyncs.inc();
            self.shared
                .metrics
                .fsync_seconds
                .observe(took.as_secs_f64());
            self.fsync_avg = (self.fsync_avg * 7 + took) / 8;
            // Nobody acknowledged below can be back yet: what waits now is others.
            self.expected = msg.acks.len() + self.queue.len();
            if let Err(e) = synced {
                self.shared
                    .fail(format!("fsync of {}: {e}", self.segment.path.display()));
            }
        }
        if let Some(err) = self.shared.failed() {
            for ack in msg.acks {
                ack.reply.fail(err.clone());
            }
            return;
        }
        {
            let mut progress = self.shared.progress.lock().unwrap();
            let head = msg.index.head;
            if !matches!(self.shared.config.fsync, FsyncMode::Interval { .. }) {
                progress.synced = head;
            }
            progress.acked = head;
            self.shared.acked_seq.store(head.seq, Ordering::Release);
            self.shared.publish(&progress);
        }
        // Relocated copies are no new events: they count only as log bytes.
        let metrics = &self.shared.metrics;
        let events = msg.events - msg.relocated;
        let requests = msg
            .acks
            .iter()
            .filter(|a| !matches!(a.reply, Reply::AfterIndex(_) | Reply::Quarantine(..)))
            .count();
        metrics.events_written.inc_by(events);
        metrics.bytes_written.inc_by(msg.bytes);
        if requests > 0 {
            metrics.group_commit_events.observe(events as f64);
            metrics.group_commit_requests.observe(requests as f64);
        }
        let mut index = msg.index;
        for ack in msg.acks {
            match ack.reply {
                Reply::Write(tx, applied) => drop(tx.send(Ok(applied))),
                Reply::Apply(tx, outcome) => drop(tx.send(Ok(outcome))),
                Reply::AfterIndex(tx) => index.after_index.push(tx),
                Reply::Quarantine(tx, outcome) => index.quarantines.push((tx, outcome)),
            }
        }
        // Blocks when the indexer is behind: backpressure for the writers.
        if index_tx.send(index).is_err() {
            self.shared.fail("the index thread stopped".into());
        }
        self.index_msgs_sent += 1;
    }
}

/// The indexer: applies acknowledged groups to the key index, in order.
fn run_indexer(shared: Arc<Shared>, rx: std_mpsc::Receiver<IndexMsg>) {
    if shared.config.reconcile_window == 0 {
        index_groups(&shared, rx, None);
        return;
    }
    let (window_tx, window_rx) = std_mpsc::sync_channel(WINDOW_QUEUE_MAX);
    let keeper = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("asp-windows".into())
            .spawn(move || run_window_keeper(shared, window_rx))
            .expect("cannot start the window keeper thread")
    };
    index_groups(&shared, rx, Some(window_tx));
    let _ = keeper.join();
}

/// Applies what the indexer wrote to the reconciliation windows, on a thread of its
/// own: for each key, its item at the old version (read from the index as it was
/// before the group, unless the key filter says the key is new) gives way to its item
/// at the new one.
fn run_window_keeper(shared: Arc<Shared>, rx: std_mpsc::Receiver<WindowMsg>) {
    while let Ok(first) = rx.recv() {
        let mut msgs = vec![first];
        while let Ok(m) = rx.try_recv() {
            msgs.push(m);
        }
        for msg in msgs {
            if let Err(e) = keep_windows(&shared, msg) {
                shared.fail(format!("keeping reconciliation windows: {e}"));
                return;
            }
        }
        shared.windows_changed.notify_all();
    }
}

fn keep_windows(shared: &Shared, msg: WindowMsg) -> Result<(), String> {
    let item_key = shared.config.item_key;
    let size = shared.config.reconcile_window;
    let mut windows = shared.windows.lock().unwrap();
    let mut added: HashMap<&str, Vec<Item>> = HashMap::new();
    for (index_key, version, old) in &msg.changes {
        let (namespace, key) = codec::split_index_key(index_key)
            .ok_or_else(|| "a malformed key in an index update".to_string())?;
        if !windows.by_namespace.contains_key(namespace) {
            let name = Namespace::new(namespace).map_err(|e| e.to_string())?;
            let empty = Digest::of(item_key, &[], size, 1);
            windows.by_namespace.insert(name, empty);
        }
        let digest = windows.by_namespace.get_mut(namespace).expect("just made");
        let key_hash = item_key.key_hash(key);
        let old = match old {
            Old::Known(old) => *old,
            Old::Unknown if digest.keys.may_contain(&key_hash) => shared
                .index
                .get_at(&msg.before, index_key)
                .map_err(|e| e.to_string())?
                .map(|e| e.version()),
            Old::Unknown => None,
        };
        let new = item_key.item_with_key_hash(&key_hash, key, version);
        match old {
            Some(old) => digest
                .window
                .replace(&item_key.item_with_key_hash(&key_hash, key, &old), &new),
            None => {
                digest.keys.insert(&key_hash);
                added.entry(namespace).or_default().push(new);
            }
        }
    }
    for (namespace, items) in added {
        let window = &mut windows
            .by_namespace
            .get_mut(namespace)
            .expect("made above")
            .window;
        window.add_all(&items);
        // Grown past its window: rebuild it, longer, from the index as of this group.
        let len = window_len(window.items(), size);
        if len > window.symbols().len() {
            let items = namespace_items(&shared.index, &msg.after, item_key, namespace)
                .map_err(|e| e.to_string())?;
            *window = Window::build(item_key, len, &items, 1);
        }
    }
    for (index_key, version) in &msg.removed {
        let (namespace, key) = codec::split_index_key(index_key)
            .ok_or_else(|| "a malformed key in an index update".to_string())?;
        if let Some(digest) = windows.by_namespace.get_mut(namespace) {
            // The key filter keeps the key: it only ever answers "maybe".
            digest.window.remove(&item_key.item(key, version));
        }
    }
    windows.seq = msg.seq;
    windows.messages = msg.number;
    Ok(())
}

fn index_groups(
    shared: &Shared,
    rx: std_mpsc::Receiver<IndexMsg>,
    window_tx: Option<std_mpsc::SyncSender<WindowMsg>>,
) {
    while let Ok(first) = rx.recv() {
        let mut msgs = vec![first];
        while let Ok(m) = rx.try_recv() {
            msgs.push(m);
        }
        if shared.failure.get().is_some() {
            continue;
        }
        shared.index.wait_for_flushes();
        for msg in &msgs {
            if let Err(e) = apply_to_index(shared, msg, window_tx.as_ref()) {
                shared.fail(format!("writing the key index: {e}"));
                break;
            }
        }
        if shared.failure.get().is_some() {
            continue;
        }
        let last = msgs.last().expect("at least one message").head;
        {
            let mut namespaces = shared.namespaces.write().unwrap();
            for msg in &msgs {
                for (ns, state) in &msg.namespaces {
                    namespaces.insert(ns.clone(), state.clone());
                }
            }
        }
        {
            let mut progress = shared.progress.lock().unwrap();
            progress.indexed = last;
            shared.indexed_seq.store(last.seq, Ordering::Release);
            shared
                .index_msgs_applied
                .fetch_add(msgs.len() as u64, Ordering::AcqRel);
        }
        shared.progress_changed.notify_all();
        shared.indexed_tx.send_replace(last.seq);
        for msg in msgs {
            for reply in msg.after_index {
                let _ = reply.send(Ok(()));
            }
            for (reply, outcome) in msg.quarantines {
                let _ = reply.send(Ok(outcome));
            }
        }
    }
}

/// Applies one group to the key index as one atomic batch, and passes the changes of
/// reconciliation items on to the window keeper: each key's item at its old version
/// (if any) gives way to its new one.
fn apply_to_index(
    shared: &Shared,
    msg: &IndexMsg,
    window_tx: Option<&std_mpsc::SyncSender<WindowMsg>>,
) -> Result<(), String> {
    let index = &shared.index;
    let keep_windows = window_tx.is_some();
    let mut batch = index.batch(msg.updates.len() + 2 + 2 * msg.namespaces.len());
    let mut changes = Vec::with_capacity(if keep_windows { msg.updates.len() } else { 0 });
    let mut removed = Vec::new();
    for update in &msg.updates {
        let old = match update.kind {
            UpdateKind::Merge => {
                // An event from a peer may be older than what the key holds.
                let current = index.get(&update.key).map_err(|e| e.to_string())?;
                if current
                    .as_ref()
                    .is_some_and(|c| !lww_wins(&update.entry.version(), &c.version()))
                {
                    continue;
                }
                Old::Known(current.map(|c| c.version()))
            }
            UpdateKind::Overwrite => Old::Unknown,
            UpdateKind::Relocate(from) => {
                // Superseded since compaction read it: the copy is just a dead record.
                let current = index.get(&update.key).map_err(|e| e.to_string())?;
                if current.is_some_and(|c| c.dot == update.entry.dot && c.position == from) {
                    // The version stays: nothing for the reconciliation windows.
                    batch.put(update.key.clone(), &update.entry);
                }
                continue;
            }
            UpdateKind::Collect { epitaph, tally } => {
                let current = index.get(&update.key).map_err(|e| e.to_string())?;
                let Some(c) = current.filter(|c| c.dot == update.entry.dot) else {
                    // Written since: the entry stays; an epitaph row of it is stale.
                    batch.delete_epitaph(update.key.clone());
                    continue;
                };
                // Counted before the commit: a failed commit fails the store.
                let tally = &msg.tallies[tally];
                tally.collected.fetch_add(1, Ordering::Relaxed);
                if epitaph {
                    if !c.is_epitaph() {
                        tally.epitaphs.fetch_add(1, Ordering::Relaxed);
                    }
                    let entry = IndexEntry {
                        position: LogPosition::NONE,
                        ..c
                    };
                    batch.put(update.key.clone(), &entry);
                    batch.put_epitaph(update.key.clone(), &entry);
                } else {
                    batch.delete(update.key.clone());
                    if c.is_epitaph() {
                        // Only epitaphs have a row (a removal is a write in fjall).
                        batch.delete_epitaph(update.key.clone());
                    }
                    if keep_windows {
                        removed.push((update.key.clone(), c.version()));
                    }
                }
                continue;
            }
        };
        batch.put(update.key.clone(), &update.entry);
        if keep_windows {
            changes.push((update.key.clone(), update.entry.version(), old));
        }
    }
    let before = keep_windows.then(|| index.snapshot());
    for (ns, state) in &msg.namespaces {
        batch.set_namespace(ns, state);
    }
    batch.set_applied(msg.head.seq, msg.hlc);
    batch.commit().map_err(|e| e.to_string())?;
    if let (Some(tx), Some(before)) = (window_tx, before) {
        // Gone only while the store stops: nobody reads windows then.
        let number = shared.window_messages.fetch_add(1, Ordering::AcqRel) + 1;
        let _ = tx.send(WindowMsg {
            number,
            seq: msg.head.seq,
            before,
            after: index.snapshot(),
            changes,
            removed,
        });
    }
    Ok(())
}

/// Under `fsync = "interval:<ms>"`: fsyncs what has been written, on the interval.
fn run_syncer(shared: Arc<Shared>, interval: Duration) {
    let mut progress = shared.progress.lock().unwrap();
    let mut next_sync = Instant::now() + interval;
    loop {
        // The condition variable also wakes on every commit; only the interval or a
        // stop request ends the wait.
        let now = Instant::now();
        if now < next_sync {
            let (guard, _) = shared
                .progress_changed
                .wait_timeout(progress, next_sync - now)
                .unwrap();
            progress = guard;
        }
        if progress.stopping || shared.failure.get().is_some() {
            return;
        }
        if Instant::now() < next_sync {
            continue;
        }
        next_sync = Instant::now() + interval;
        let written = progress.written;
        if written.seq <= progress.synced.seq {
            continue;
        }
        drop(progress);
        // Earlier segments were fsynced when sealed; only the newest can be dirty.
        let segment = shared.log.active();
        let result = segment.file.sync_data();
        shared.metrics.fsyncs.inc();
        progress = shared.progress.lock().unwrap();
        match result {
            Ok(()) => {
                if written.seq > progress.synced.seq {
                    progress.synced = written;
                }
                shared.publish(&progress);
            }
            Err(e) => {
                drop(progress);
                shared.fail(format!("fsync of {}: {e}", segment.path.display()));
                return;
            }
        }
    }
}
