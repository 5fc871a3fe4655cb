//! The writer: the one place that changes the store. This file is the group commit
//! loop: taking a group from the queue, building it (encoding, appending, the index
//! changes) and committing it. The requests it takes are in [`request`]; local writes
//! in [`local`] and [`crdt`]; events from peers in [`remote`]; base vectors, policies
//! and counter reservations in [`metadata`]; undoing a refused group in [`rollback`];
//! the threads behind it in [`indexer`], [`windows`] and [`syncer`]; the state they
//! share with readers in [`shared`].
//!
//! Up to four threads (the first two always). [`spawn`] starts the log writer; the log
//! writer starts the indexer and the syncer; the indexer starts the window keeper:
//!
//! 1. The **log writer** (`asp-writer`) takes every request waiting in the queue,
//!    checks conditions, assigns sequence numbers, dots and clock readings, encodes the
//!    events into one buffer, appends it to the log with one write, makes it durable
//!    with one `fdatasync` (under `fsync = "always"`), publishes the new feed head and
//!    acknowledges the requests.
//! 2. The **indexer** (`asp-index`, [`indexer`]) applies acknowledged groups to the
//!    key index.
//! 3. The **window keeper** (`asp-windows`, [`windows`], unless `reconcile_window = 0`)
//!    keeps each namespace's reconciliation symbols up to date behind the indexer.
//! 4. Under `fsync = "interval:<ms>"`, the **syncer** (`asp-syncer`, [`syncer`]) fsyncs
//!    on the interval.
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
//! Under `fsync = "interval:<ms>"` the writer acknowledges without waiting for the
//! syncer. In every mode the feed shows only events that
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
use asp_core::{Dot, Event, Hlc, HlcClock, Namespace, NodeId, VersionVector};
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
use crate::mutation::Mutation;
use crate::policy::Policies;
use crate::queue::WriteQueue;
use crate::trace::{self, Hop};
use crate::types::{Applied, ApplyOutcome, Condition, CrdtOp, NamespaceState, WriteKind, WriteOp};
use asp_core::crdt::{MvRegister, Policy, Sibling, State};
use asp_core::{ContentType, Version};

mod crdt;
mod index_queue;
mod indexer;
mod local;
mod metadata;
mod remote;
mod request;
mod rollback;
mod shared;
mod syncer;
mod windows;

use crdt::RecentStates;
use index_queue::{IndexReceiver, IndexSender, index_queue};
use indexer::run_indexer;
pub(crate) use request::{
    ApplyRequest, CollectRequest, CollectTally, CoverRequest, PolicyRequest, QuarantineRequest,
    RelocateRequest, Request, WriteRequest,
};
pub(crate) use shared::{
    ByIndexer, ByWindowKeeper, ByWriter, FromPeers, Health, Maintenance, Shared,
};
use syncer::run_syncer;

/// Key updates of acknowledged groups waiting for the indexer, at most, in groups of
/// `group_events_max` events: the memory 8 full groups take (a larger request still
/// goes alone). Few events per group (a live stream) leave room for many groups: see
/// `index_queue.rs`.
const INDEX_QUEUE_GROUPS_OF_UPDATES: usize = 8;
/// Indexed groups waiting for the window keeper, at most (each holds its keys and two
/// index snapshots).
const WINDOW_QUEUE_MAX: usize = 2;
/// With the free-space guard off, a refusal for space is over (for status) once the
/// filesystem has this much free again.
const SPACE_REGAINED_BYTES: u64 = 16 << 20;
/// The longest the writer waits for stragglers before an fsync.
const STRAGGLER_WAIT_MAX: Duration = Duration::from_millis(1);

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
    /// Dot counters of the traced peer events in it, while a hop trace runs (see
    /// [`crate::trace`]).
    traced: Vec<u64>,
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

/// A client operation's clock reading and value (`None`: a delete), as appended.
/// A local event to append: its clock reading, its value (`None`: a delete) and its
/// expiry (0: none).
type LocalEvent<'a> = (Hlc, Option<(ContentType, &'a [u8])>, u64);

impl Group {
    /// Notes that the group changed `namespace` (checked against the last one first:
    /// events of a namespace tend to come together).
    fn touch(&mut self, namespace: &Namespace) {
        if self.touched.last() != Some(namespace) && !self.touched_set.contains(namespace) {
            self.touched_set.insert(namespace.clone());
            self.touched.push(namespace.clone());
        }
    }
}

/// A group being built: what goes into the log buffer and the index.
struct Group {
    start_offset: u64,
    segment_base: u64,
    sparse_update: SparseUpdate,
    updates: Vec<Update>,
    /// Index key -> position in `updates`: one index batch must not hold a key twice.
    positions: HashMap<Slice, usize, foldhash::fast::RandomState>,
    /// Namespaces the group changed, in first-touch order, and the same as a set (a
    /// catch-up batch may touch thousands).
    touched: Vec<Namespace>,
    touched_set: HashSet<Namespace, foldhash::fast::RandomState>,
    acks: Vec<Ack>,
    events: u64,
    relocated: u64,
    /// Where the group's collections count what they did.
    tallies: Vec<Arc<CollectTally>>,
    /// Whether the key index reflected every earlier group when this one began: only
    /// then are repairs of held dots judged against it.
    indexed: bool,
}

/// `works` in parts that each start at a cover (the first part may not): one part when
/// there is no cover after the first work, as almost always.
fn split_at_covers(works: Vec<Work>) -> Vec<Vec<Work>> {
    let mut parts: Vec<Vec<Work>> = vec![Vec::new()];
    for work in works {
        let last = parts.last_mut().expect("never empty");
        if matches!(work, Work::Cover(_)) && !last.is_empty() {
            parts.push(vec![work]);
        } else {
            last.push(work);
        }
    }
    parts
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
    /// Takes `request` into the group (`here`: this node, for the hop trace).
    fn add(&mut self, request: Request, here: NodeId) {
        match request {
            Request::Write(w) => {
                self.events += w.ops.len();
                self.bytes += w.bytes;
                self.requests.push(Work::Write(w));
            }
            Request::Apply(a) => {
                trace::mark(Hop::Taken, here, &a.events);
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
        let (index_tx, index_rx) =
            index_queue(INDEX_QUEUE_GROUPS_OF_UPDATES * self.shared.config.group_events_max.max(1));
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
                group.add(first, self.shared.node_id);
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
            // A peer's covered dots stand for repairs queued before them: each cover
            // starts a group of its own, so that those repairs are in the log (and
            // durable, see `add_cover`) before the base file says they are held.
            for part in split_at_covers(group.requests) {
                if let Some(msg) = self.process(part) {
                    self.commit(msg, &index_tx);
                }
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
                Some(request) => group.add(request, self.shared.node_id),
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
        let mut waited = false;
        while group.requests.len() < self.expected
            && group.events < config.group_events_max
            && group.bytes < config.group_bytes_max
            && group.shutdown.is_empty()
        {
            if !waited {
                waited = true;
                self.shared.metrics.writer_straggler_waits.inc();
            }
            let deadline = (Instant::now() + gap).min(started + STRAGGLER_WAIT_MAX);
            match self.queue.recv_until(deadline) {
                Some(request) => group.add(request, self.shared.node_id),
                None => break,
            }
        }
    }

    /// Makes everything durable on a clean stop, whatever the fsync mode.
    fn finish(&self) {
        if self.shared.health.failure.get().is_some() {
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
        if let Err(e) = self.shared.writer.counters.lock().unwrap().settle() {
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
        let traced = trace::traced_counters(group.iter().flat_map(|work| match work {
            Work::Apply(a) => a.events.as_slice(),
            _ => &[],
        }));
        trace::mark_counters(Hop::Gathered, self.shared.node_id, &traced);
        let group = self.reserve_counters(group);
        if let Some(err) = self.shared.failed() {
            for work in group {
                work.fail(err.clone());
            }
            return None;
        }
        let reads = group.iter().any(|work| match work {
            Work::Write(w) => w.ops.iter().any(WriteOp::reads_index),
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
            .prune(self.shared.indexer.indexed_seq.load(Ordering::Acquire));
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
                Err(e) => {
                    // Nothing changed: the active segment stays, and (on a full disk)
                    // takes the next group once there is room for a new one.
                    let what = format!("sealing log segment {}: {e}", self.segment.path.display());
                    let err = self.shared.io_failure(what, &e);
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
            touched_set: HashSet::default(),
            acks: Vec::with_capacity(group.len()),
            events: 0,
            relocated: 0,
            tallies: Vec::new(),
            indexed: reads,
        };
        for work in group {
            match work {
                Work::Write(w) => {
                    let gate = self.shared.gate.read().unwrap().clone();
                    match crate::modes::admit(
                        gate.as_ref(),
                        &w.namespace,
                        self.shared.node_id,
                        w.fence.as_ref(),
                    ) {
                        Err(e) => {
                            self.shared.metrics.writes_rejected.inc();
                            let _ = w.reply.send(Err(e));
                        }
                        Ok(epoch) => match self.policy(&w.namespace) {
                            Policy::Lww => self.add_local(&mut g, w, wall, epoch),
                            policy => self.add_local_crdt(&mut g, w, wall, policy, epoch),
                        },
                    }
                }
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
        trace::mark_counters(Hop::Written, self.shared.node_id, &traced);
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
            traced,
        })
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
            expires_ms: event.expires_ms,
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
                if crate::lww::wins(&entry.version(), &current.entry.version()) {
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
        let state = self.namespace_state(namespace);
        state.max_hlc = state.max_hlc.max(hlc);
        g.touch(namespace);
    }

    /// The writer's state of a namespace, made if new (without copying the name on
    /// every event of a namespace it knows: this is on every received event's path).
    fn namespace_state(&mut self, namespace: &Namespace) -> &mut NamespaceState {
        if !self.namespaces.contains_key(namespace) {
            self.namespaces
                .insert(namespace.clone(), NamespaceState::default());
        }
        self.namespaces.get_mut(namespace).expect("just made")
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

    fn wait_indexed(&self, seq: u64) {
        let mut progress = self.shared.progress.lock().unwrap();
        while progress.indexed.seq < seq && self.shared.health.failure.get().is_none() {
            progress = self.shared.progress_changed.wait(progress).unwrap();
        }
    }
}

impl Writer {
    /// Makes a group durable (under `fsync = "always"`), acknowledges it, publishes it
    /// in the feed, and hands it to the indexer.
    fn commit(&mut self, mut msg: WrittenGroup, index_tx: &IndexSender<IndexMsg>) {
        if self.shared.mutated(Mutation::VisibleBeforeDurable) {
            let mut progress = self.shared.progress.lock().unwrap();
            progress.acked = msg.index.head;
            self.shared.publish(&progress);
        }
        if self.shared.mutated(Mutation::AckBeforeFsync) {
            for ack in msg
                .acks
                .extract_if(.., |a| matches!(a.reply, Reply::Write(..)))
            {
                if let Reply::Write(tx, applied) = ack.reply {
                    let _ = tx.send(Ok(applied));
                }
            }
        }
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
            // Nobody acknowledged below can be back yet: what waits now is others. Only
            // local writers come back when acknowledged; a peer link sends its next
            // batch when the peer writes it, not when this one is durable, so waiting
            // for it only delays every event of the group (a live stream's events
            // waited up to a millisecond, bench/RESULTS.md).
            let writers = msg
                .acks
                .iter()
                .filter(|a| matches!(a.reply, Reply::Write(..)))
                .count();
            self.expected = writers + self.queue.len();
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
        trace::mark_counters(Hop::Synced, self.shared.node_id, &msg.traced);
        {
            let mut progress = self.shared.progress.lock().unwrap();
            let head = msg.index.head;
            if !matches!(self.shared.config.fsync, FsyncMode::Interval { .. }) {
                progress.synced = head;
            }
            progress.acked = head;
            self.shared
                .writer
                .acked_seq
                .store(head.seq, Ordering::Release);
            self.shared.publish(&progress);
        }
        trace::mark_counters(Hop::Visible, self.shared.node_id, &msg.traced);
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
        let updates = index.updates.len();
        match index_tx.send(index, updates) {
            Ok(waited) if !waited.is_zero() => {
                self.shared.metrics.writer_index_waits.inc();
                let seconds = &self.shared.metrics.writer_index_wait_seconds;
                seconds.inc_by(waited.as_secs_f64());
            }
            Ok(_) => {}
            Err(()) => {
                self.shared.fail("the index thread stopped".into());
            }
        }
        self.index_msgs_sent += 1;
    }
}
