//! The store handle: open with recovery, writes through the writer, reads from the
//! key index and the log.
//!
//! Size: the whole public surface of [`Store`] is one `impl`; opening and recovery
//! (`Store::open`, `replay`, `build_digests`) are the part to move out first, into a
//! module of their own.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use asp_core::reconcile::{Item, ItemKey, Symbol, Window};

use crate::digest::{Digest, Windows, namespace_items, window_len};
use asp_core::session::{NamespaceSummary, VectorReport};
use asp_core::{Event, HlcClock, Key, Namespace, NodeId, Op};
use fjall::Slice;
use tokio::sync::{Semaphore, oneshot, watch};

use crate::base::Bases;
use crate::codec::{self, INLINE_VALUE_BYTES_MAX, IndexEntry};
use crate::config::{FsyncMode, StoreConfig};
use crate::error::{OpenError, ReadError, WriteError};
use crate::held::{Held, HeldStatus, QuarantineAction, QuarantineOutcome};
use crate::index::Index;
use crate::log::{FeedHead, Log, LogCursor, TornTail};
use crate::manifest::{self, Manifest};
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::queue::{TrySendError, WriteQueue};
use crate::salvage;
use crate::types::{
    Applied, ApplyOutcome, ChangesPage, FeedEvent, KeyState, NamespaceState, ScanItem, ScanPage,
    Value, WriteKind, WriteOp,
};
use crate::validate;
use crate::writer::{
    self, ApplyRequest, PolicyRequest, Progress, QuarantineRequest, Request, Shared, WriteRequest,
};
use asp_core::crdt::{Policy, State};

/// The most keys one listing returns.
pub const SCAN_LIMIT_MAX: usize = 1000;
/// The most events one change-feed page returns.
pub const CHANGES_LIMIT_MAX: usize = 10_000;
/// Deleted keys a listing steps over before returning a short page.
const SCAN_TOMBSTONES_MAX: usize = 10_000;
/// About this many bytes of events per feed page.
const FEED_PAGE_BYTES_MAX: usize = 4 << 20;
/// Events replayed into the index per batch on open.
const REPLAY_BATCH_EVENTS: usize = 20_000;

/// An open store. Cheap to clone; all clones share one writer. When the last clone is
/// dropped the writer finishes what it accepted, fsyncs, and stops.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) shared: Arc<Shared>,
    pub(crate) queue: Arc<WriteQueue<Request>>,
    budget: Arc<Semaphore>,
    writer: Mutex<Option<JoinHandle<()>>>,
    recovery: RecoveryReport,
    /// When the store opened (bounds the wait for peers' word on own events).
    opened: Instant,
    _manifest: Manifest,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue stops the writer once it has made everything accepted
        // durable; wait for that so that the directory is free when drop returns.
        self.queue.close();
        if let Some(handle) = self.writer.lock().unwrap().take() {
            let _ = handle.join();
        }
    }
}

/// What [`Store::open`] had to do to bring the store up to date.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// An incomplete end of the log that was cut off.
    pub torn_tail: Option<TornTail>,
    /// Events replayed from the log into the key index.
    pub replayed_events: u64,
    /// Whether the index had to be rebuilt from scratch.
    pub index_rebuilt: bool,
    /// What `--salvage` did (`None` without it; an empty report if nothing was
    /// damaged).
    pub salvage: Option<salvage::SalvageReport>,
}

/// A snapshot of the store's state for status pages.
#[derive(Debug, Clone)]
pub struct StoreStatus {
    pub node_id: NodeId,
    pub fsync: FsyncMode,
    pub feed_first_seq: u64,
    /// The last event visible in the feed.
    pub feed_head_seq: u64,
    pub written_seq: u64,
    pub synced_seq: u64,
    pub acked_seq: u64,
    pub indexed_seq: u64,
    pub log_segments: usize,
    pub log_bytes: u64,
    pub index_bytes: u64,
    pub writer_queue_depth: usize,
    pub writer_queue_max: usize,
    pub namespaces: Vec<(Namespace, NamespaceState)>,
    pub failure: Option<String>,
    /// Why writes are refused for space, while they are (HTTP 507).
    pub no_space: Option<String>,
    /// The last scrub since the store opened (see [`Store::scrub`]).
    pub last_scrub: Option<crate::scrub::ScrubReport>,
}

/// The events behind index entries, read for a peer: at most `limit`, and about
/// `bytes_max` bytes (the last event may pass it).
struct EventPage {
    events: Vec<Event>,
    bytes: usize,
    limit: usize,
    bytes_max: usize,
    failure: Option<ReadError>,
}

impl EventPage {
    fn new(limit: usize, bytes_max: usize) -> EventPage {
        EventPage {
            events: Vec::new(),
            bytes: 0,
            limit,
            bytes_max,
            failure: None,
        }
    }

    fn is_full(&self) -> bool {
        self.events.len() >= self.limit || self.bytes >= self.bytes_max
    }

    /// Adds the event behind `index_key`'s entry; `false` (stop the scan) if it cannot
    /// be read. The caller holds the segment gate.
    fn add(&mut self, shared: &Shared, index_key: &[u8], entry: &IndexEntry) -> bool {
        match shared.entry_event(index_key, entry) {
            Ok(event) => {
                self.bytes += asp_core::session::credit_size(&event) as usize;
                self.events.push(event);
                true
            }
            Err(e) => {
                self.failure = Some(e);
                false
            }
        }
    }

    fn finish(self) -> Result<Vec<Event>, ReadError> {
        match self.failure {
            Some(e) => Err(e),
            None => Ok(self.events),
        }
    }
}

/// Findings of own events held by peers kept for status, at most.
pub(crate) const OWN_EVENTS_FOUND_MAX: usize = 16;

/// Peers held events of this node, in one namespace, that it had no record of
/// issuing: its counters went on after them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnEventsFound {
    pub namespace: Namespace,
    /// The highest counter this node knew it had issued.
    pub known: u64,
    /// The highest counter of its own that a peer (or a report it gossiped) held.
    pub held_by_peers: u64,
    /// When (wall ms).
    pub at_ms: u64,
}

/// Bytes of other nodes' reports in one summary, at most (about).
const GOSSIP_BYTES_MAX: usize = 4 << 20;

/// A report's size on the wire (see docs/PROTOCOL.md).
fn report_bytes(report: &VectorReport) -> usize {
    8 + 8
        + 4
        + report
            .vector
            .iter()
            .map(|(_, set)| 12 + 16 * set.ranges().len())
            .sum::<usize>()
}

impl Store {
    /// Opens the store in `config.data_dir`, creating it if needed: cuts off a torn log
    /// tail, brings the key index up to date from the log, and starts the writer.
    pub fn open(config: StoreConfig) -> Result<Store, OpenError> {
        config.validate().map_err(OpenError::Config)?;
        let fs = config.fs.clone();
        let manifest = manifest::open(fs.as_ref(), &config.data_dir, config.node_id)?;
        let mut bases = Bases::load(fs.as_ref(), &config.data_dir)?;
        let marker = config.data_dir.join("log").join(salvage::MARKER);
        let (salvaged, salvage_done) = if config.salvage {
            salvage::salvage(fs.as_ref(), &config.data_dir, &mut bases)?
        } else if fs.exists(&marker).unwrap_or(false) {
            return Err(OpenError::Corrupt {
                path: marker,
                reason:
                    "a salvage of this log was interrupted; start again with --salvage to finish it"
                        .into(),
            });
        } else {
            Default::default()
        };
        let (log, log_recovery) = Log::open(
            &fs,
            &config.data_dir.join("log"),
            &bases.removed,
            config.fsync == FsyncMode::Always,
        )?;
        let index = Index::open(
            &config.data_dir.join("index"),
            config.index_cache_bytes,
            config.index_memtable_bytes,
        )?;
        let mut report = RecoveryReport {
            torn_tail: log_recovery.torn_tail,
            salvage: config.salvage.then_some(salvaged),
            ..RecoveryReport::default()
        };
        let mut state = index.state()?;
        if salvage_done {
            // The index may point at records salvage lost: rebuilt from the log, so
            // that the lost dots leave the vectors too.
            tracing::warn!("rebuilding the key index from the salvaged log");
            index.clear()?;
            state = index.state()?;
            report.index_rebuilt = true;
        } else if state.applied_seq > log.last_seq() {
            tracing::warn!(
                index_seq = state.applied_seq,
                log_seq = log.last_seq(),
                "the key index reflects events the log no longer holds (log writes lost in a crash); rebuilding the index from the log"
            );
            index.clear()?;
            state = index.state()?;
            report.index_rebuilt = true;
        }
        let (replayed, hlc) = replay(&log, &index, &mut state)?;
        if report.index_rebuilt {
            let restored = index.restore_epitaphs()?;
            if restored > 0 {
                tracing::info!(restored, "epitaphs put back into the rebuilt key index");
            }
        }
        // The log no longer holds what compaction dropped or peers covered; a vector
        // rebuilt from it would have holes there.
        for (namespace, base) in &bases.by_namespace {
            let ns_state = state.namespaces.entry(namespace.clone()).or_default();
            ns_state.vector.join(base);
        }
        // What this node issued, as far as its log (and base) shows: where counting
        // goes on, unless the counters file says more may have been issued.
        let log_max: HashMap<Namespace, u64> = state
            .namespaces
            .iter()
            .map(|(ns, s)| (ns.clone(), s.vector.max_counter(manifest.node_id)))
            .filter(|(_, max)| *max > 0)
            .collect();
        let mut counters =
            crate::counters::Counters::open(config.fs.clone(), &config.data_dir, &log_max)?;
        if salvage_done {
            // Salvage may have lost this node's newest events of some namespace, which
            // peers may hold: its counters go on past a gap, durably before the marker
            // goes (a crash in between salvages, and jumps, again).
            counters
                .jump_all(&log_max)
                .map_err(|source| OpenError::Io {
                    context: "raising the counters after a salvage".into(),
                    source,
                })?;
            // The rebuilt index must be durable before the marker goes: a crash in
            // between must find the marker and rebuild again.
            index.persist().map_err(OpenError::Index)?;
            salvage::finish(fs.as_ref(), &config.data_dir)?;
        }
        // A node that has had peers learns what they hold of its own events before it
        // issues counters again (bounded by `own_events_wait`): its data directory may
        // be older than what it issued.
        let learned = config.own_events_wait.is_zero() || index.checkpoint_peers().is_empty();
        let mut held = Held::open(config.fs.clone(), &config.data_dir, config.held_bytes_max)?;
        // Held events applied since, or discarded (their dots joined the base), go.
        let dropped = held.drop_applied(|ns, dot| {
            state
                .namespaces
                .get(ns)
                .is_some_and(|s| s.vector.contains(dot))
        });
        if held.len() > 0 || dropped > 0 {
            tracing::info!(
                held = held.len(),
                dropped,
                bytes = held.bytes(),
                "events received from peers and held (parked or quarantined)"
            );
        }
        let digests = build_digests(&index, &config)?;
        index.clamp_checkpoints(log.last_seq())?;
        report.replayed_events = replayed;

        // Whatever survived in the log is treated as durable from here on.
        log.active()
            .file
            .sync_data()
            .map_err(|source| OpenError::Io {
                context: "fsync of the log".into(),
                source,
            })?;
        let mut policies = Policies::load(fs.as_ref(), &config.data_dir)?;
        let mut changed = false;
        for (name, &policy) in &config.namespace_policies {
            let ns = Namespace::new(name)
                .map_err(|e| OpenError::Config(format!("namespace_policies: {e}")))?;
            let current = policies.get(&ns);
            if current == policy {
                continue;
            }
            let holds_data = state
                .namespaces
                .get(&ns)
                .is_some_and(|s| !s.vector.is_empty());
            if holds_data {
                return Err(OpenError::Config(format!(
                    "namespace {ns} is configured with the {policy} policy but holds data under the {current} policy; a namespace's policy cannot change once it holds data"
                )));
            }
            policies.by_namespace.insert(ns, policy);
            changed = true;
        }
        if changed {
            policies
                .save(fs.as_ref(), &config.data_dir)
                .map_err(|source| OpenError::Io {
                    context: "writing the policies file".into(),
                    source,
                })?;
        }
        let head = log.written_head();
        let (head_tx, _) = watch::channel(head);
        let metrics = Metrics::default();
        metrics.feed_head.set(head.seq as i64);
        metrics.held_events.set(held.len() as i64);
        metrics.held_bytes.set(held.bytes() as i64);
        let shared = Arc::new(Shared {
            node_id: manifest.node_id,
            log,
            index,
            head_tx,
            progress: Mutex::new(Progress {
                written: head,
                synced: head,
                acked: head,
                indexed: head,
                stopping: false,
            }),
            acked_seq: AtomicU64::new(head.seq),
            indexed_seq: AtomicU64::new(head.seq),
            window_messages: AtomicU64::new(0),
            index_msgs_applied: AtomicU64::new(0),
            indexed_tx: watch::channel(head.seq).0,
            progress_changed: Condvar::new(),
            namespaces: RwLock::new(state.namespaces.clone()),
            windows: Mutex::new(Windows {
                by_namespace: digests,
                seq: head.seq,
                messages: 0,
            }),
            windows_changed: Condvar::new(),
            failure: OnceLock::new(),
            space_problem: Mutex::new(None),
            scrub_running: Mutex::new(()),
            last_scrub: Mutex::new(None),
            bases: Mutex::new(bases),
            compaction: Mutex::new(()),
            segment_gate: RwLock::new(()),
            policies: RwLock::new(policies),
            gc: Mutex::new(crate::gc::Gc::new(writer::wall_ms())),
            counters: Mutex::new(counters),
            own_events_found: Mutex::new(Vec::new()),
            own_events_learned: watch::channel(learned).0,
            held: Mutex::new(held),
            metrics,
            config: config.clone(),
        });
        let queue = Arc::new(WriteQueue::new(config.write_queue_max));
        let clock = HlcClock::with_last(hlc, config.max_clock_skew_ms);
        let writer = writer::spawn(shared.clone(), queue.clone(), clock, state.namespaces)
            .map_err(|source| OpenError::Io {
                context: "cannot start the writer thread".into(),
                source,
            })?;
        tracing::info!(
            node_id = %manifest.node_id,
            dir = %config.data_dir.display(),
            feed_head = head.seq,
            replayed,
            "store open"
        );
        Ok(Store {
            inner: Arc::new(Inner {
                shared,
                queue,
                budget: Arc::new(Semaphore::new(config.write_queue_bytes_max)),
                writer: Mutex::new(Some(writer)),
                recovery: report,
                opened: Instant::now(),
                _manifest: manifest,
            }),
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.shared.node_id
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.shared.config
    }

    pub fn recovery(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.shared.metrics
    }

    /// Applies `ops` to `namespace` as one atomic batch and returns, in order, what
    /// each operation became. Returns once the batch is as durable as the fsync mode
    /// promises. Waits for room when the writer is busy; fails with
    /// [`WriteError::Overloaded`] past `write_queue_wait`.
    pub async fn write(
        &self,
        namespace: Namespace,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<Applied>, WriteError> {
        let config = self.config();
        if ops.is_empty() {
            return Err(WriteError::Invalid(
                "a batch needs at least one operation".into(),
            ));
        }
        if ops.len() > config.batch_ops_max {
            return Err(WriteError::TooLarge(format!(
                "a batch holds at most {} operations; this one has {}",
                config.batch_ops_max,
                ops.len()
            )));
        }
        let mut bytes = 0usize;
        for op in &ops {
            let value_len = match &op.kind {
                WriteKind::Put { value, .. } => value.len(),
                WriteKind::Delete => 0,
                WriteKind::Crdt(op) => op.len(),
            };
            if value_len > config.value_bytes_max {
                return Err(WriteError::TooLarge(format!(
                    "the value for key {:?} is {value_len} bytes; the limit is {} (value_bytes_max)",
                    op.key.as_str(),
                    config.value_bytes_max
                )));
            }
            bytes += op.key.as_str().len() + value_len + 64;
        }
        if bytes > config.write_queue_bytes_max {
            return Err(WriteError::TooLarge(format!(
                "the batch is {bytes} bytes; the limit is {} (write_queue_bytes_max)",
                config.write_queue_bytes_max
            )));
        }
        if let Some(f) = self.inner.shared.failure.get() {
            return Err(WriteError::Storage(f.clone()));
        }
        self.await_own_events().await;

        let (reply, answer) = oneshot::channel();
        let mut request = WriteRequest {
            namespace,
            ops,
            reply,
            permit: None,
            bytes,
        };
        // Fast path: room in the budget and the queue right now, no timer needed.
        if let Ok(permit) = self
            .inner
            .budget
            .clone()
            .try_acquire_many_owned(bytes as u32)
        {
            request.permit = Some(permit);
            match self.inner.queue.try_send(Request::Write(request)) {
                Ok(()) => return self.answer(answer).await,
                Err(TrySendError::Closed(_)) => return Err(WriteError::Closed),
                Err(TrySendError::Full(Request::Write(r))) => request = r,
                Err(TrySendError::Full(_)) => unreachable!("only writes are sent here"),
            }
        }
        let wait = config.write_queue_wait;
        let started = Instant::now();
        let enqueue = async {
            if request.permit.is_none() {
                let permit = self
                    .inner
                    .budget
                    .clone()
                    .acquire_many_owned(bytes as u32)
                    .await
                    .map_err(|_| WriteError::Closed)?;
                request.permit = Some(permit);
            }
            self.inner
                .queue
                .send(Request::Write(request))
                .await
                .map_err(|_| WriteError::Closed)
        };
        match tokio::time::timeout(wait, enqueue).await {
            Ok(sent) => sent?,
            Err(_) => {
                self.metrics().writes_rejected.inc();
                return Err(WriteError::Overloaded {
                    waited: started.elapsed(),
                });
            }
        };
        self.answer(answer).await
    }

    /// Waits (once after opening, at most `own_events_wait` from the open) until a
    /// peer's summary told this node which of its own events peers hold, so that it
    /// issues no counter a peer already holds an event under.
    async fn await_own_events(&self) {
        let shared = &self.inner.shared;
        if *shared.own_events_learned.borrow() {
            return;
        }
        let deadline = self.inner.opened + shared.config.own_events_wait;
        let mut rx = shared.own_events_learned.subscribe();
        let learned = tokio::time::timeout_at(deadline.into(), rx.wait_for(|l| *l)).await;
        if learned.is_err() && !shared.own_events_learned.send_replace(true) {
            tracing::warn!(
                waited_ms = shared.config.own_events_wait.as_millis() as u64,
                "no peer answered since the store opened; local writes go on without knowing which of this node's events peers hold (if this data directory was restored from an older copy, reconciliation repairs the keys whose counters collide)"
            );
        }
    }

    /// What peers turned out to hold of this node's own events beyond what it knew it
    /// had issued (newest last).
    pub fn own_events_found(&self) -> Vec<OwnEventsFound> {
        self.inner.shared.own_events_found.lock().unwrap().clone()
    }

    /// Applies events received from a peer: those already held are left out, the rest
    /// are appended to this node's feed as they are (same dots, same clocks) and merged
    /// into each key by version. Returns once they are as durable as the fsync mode
    /// promises, and not before everything held already is.
    ///
    /// Events that cannot be applied yet are *held* (durably, outside the feed) and
    /// counted in the outcome: those whose clock is more than `max_clock_skew_ms`
    /// ahead are parked and applied once this node's clock allows; those of another
    /// conflict policy than their namespace's here are quarantined until an operator
    /// resolves it ([`Store::resolve_quarantine`]). Only when holding them would pass
    /// `held_bytes_max` is the whole call refused ([`WriteError::ClockSkew`] or
    /// [`WriteError::PolicyFixed`]).
    ///
    /// Every event is first checked like a local write (value and record size,
    /// context, CRDT state): one that breaks a rule refuses the whole call
    /// ([`WriteError::InvalidEvent`]) and nothing of it is applied.
    pub async fn apply_remote(&self, events: Vec<Event>) -> Result<ApplyOutcome, WriteError> {
        let answer = self.enqueue_remote(events).await?;
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(self.closed_or_failed()),
        }
    }

    /// Queues events from a peer like [`Store::apply_remote`] and returns at once (or
    /// when the queue has room) with the receiver of the outcome. Requests are applied
    /// in the order they were queued, so a caller can keep several in flight and still
    /// see their outcomes in order. A batch with an event that breaks a rule is refused
    /// here ([`WriteError::InvalidEvent`]), before it reaches the writer.
    pub async fn enqueue_remote(
        &self,
        events: Vec<Event>,
    ) -> Result<oneshot::Receiver<Result<ApplyOutcome, WriteError>>, WriteError> {
        self.enqueue_apply(events, false).await
    }

    /// Queues reconciliation repairs (a peer's current state of keys whose state
    /// differs) like [`Store::enqueue_remote`], with one difference: a repair whose dot
    /// this node already holds is applied anyway if its key's entry is older (so that
    /// two nodes with the same vector but different states converge), and dropped if
    /// its key has no entry (its delete was collected here). Applied repairs of held
    /// dots are appended to the feed again, merged by version, counted as applied.
    pub async fn enqueue_repair(
        &self,
        events: Vec<Event>,
    ) -> Result<oneshot::Receiver<Result<ApplyOutcome, WriteError>>, WriteError> {
        self.enqueue_apply(events, true).await
    }

    async fn enqueue_apply(
        &self,
        events: Vec<Event>,
        repair: bool,
    ) -> Result<oneshot::Receiver<Result<ApplyOutcome, WriteError>>, WriteError> {
        validate::check_remote_events(self.config(), &events)?;
        let bytes: usize = events
            .iter()
            .map(|e| asp_core::session::credit_size(e) as usize)
            .sum::<usize>()
            .min(self.config().write_queue_bytes_max);
        if let Some(f) = self.inner.shared.failure.get() {
            return Err(WriteError::Storage(f.clone()));
        }
        let permit = match self
            .inner
            .budget
            .clone()
            .try_acquire_many_owned(bytes as u32)
        {
            Ok(permit) => permit,
            Err(_) => self
                .inner
                .budget
                .clone()
                .acquire_many_owned(bytes as u32)
                .await
                .map_err(|_| WriteError::Closed)?,
        };
        let (reply, answer) = oneshot::channel();
        let request = ApplyRequest {
            events,
            repair,
            reply,
            permit: Some(permit),
            bytes,
        };
        self.inner
            .queue
            .send(Request::Apply(request))
            .await
            .map_err(|_| WriteError::Closed)?;
        Ok(answer)
    }

    fn closed_or_failed(&self) -> WriteError {
        self.inner
            .shared
            .failure
            .get()
            .map_or(WriteError::Closed, |f| WriteError::Storage(f.clone()))
    }

    /// What this node holds, per namespace: what a peer is told in the handshake.
    /// Reflects every write acknowledged before the call (it waits for the index like a
    /// read does; async callers call [`Store::caught_up`] first).
    pub fn summary(&self) -> Vec<NamespaceSummary> {
        let windows_on = self.config().reconcile_window > 0;
        let digests: HashMap<Namespace, Symbol> = if windows_on {
            // On a storage failure the last state kept is still a true (if old) answer.
            let windows = self
                .caught_up_windows()
                .unwrap_or_else(|_| self.inner.shared.windows.lock().unwrap());
            windows
                .by_namespace
                .iter()
                .filter_map(|(ns, d)| Some((ns.clone(), d.window.symbols().first()?.canonical())))
                .collect()
        } else {
            let _ = self.inner.shared.await_index();
            HashMap::new()
        };
        let mut out: Vec<_> = self
            .inner
            .shared
            .namespaces
            .read()
            .unwrap()
            .iter()
            .map(|(ns, state)| NamespaceSummary {
                namespace: ns.clone(),
                max_hlc: state.max_hlc,
                vector: state.vector.clone(),
                digest: windows_on.then(|| digests.get(ns).copied().unwrap_or_default()),
                reports: Vec::new(),
            })
            .collect();
        out.sort_by(|a, b| a.namespace.cmp(&b.namespace));
        out
    }

    /// What this node holds of `namespace` (every acknowledged write included).
    pub fn namespace_vector(&self, namespace: &Namespace) -> asp_core::VersionVector {
        let _ = self.inner.shared.await_index();
        self.inner
            .shared
            .namespaces
            .read()
            .unwrap()
            .get(namespace)
            .map(|s| s.vector.clone())
            .unwrap_or_default()
    }

    /// [`Store::summary`] with, per namespace, this node's report of its vector and
    /// what it knows of every other node that may write there (its newest report, or
    /// an empty one naming it): what a peer is sent, so that every node learns who may
    /// write and what every other holds (tombstone collection waits for it).
    pub fn summary_for_peers(&self) -> Vec<NamespaceSummary> {
        let mut out = self.summary();
        let now_ms = writer::wall_ms();
        let me = self.inner.shared.node_id;
        let peers = self.inner.shared.index.checkpoint_peers();
        let gc = self.inner.shared.gc.lock().unwrap();
        // Gossip stays within a budget, so that the frame stays far below its limit
        // with thousands of namespaces. A report that does not fit goes as an empty
        // one, which still names its node: the receiver then waits for that node (or,
        // past the horizon, leaves epitaphs) instead of not knowing it at all.
        let mut budget = GOSSIP_BYTES_MAX;
        for ns in &mut out {
            ns.reports.push(VectorReport {
                node: self.inner.shared.node_id,
                at_ms: now_ms,
                vector: ns.vector.clone(),
            });
            for mut report in gc.gossip(&ns.namespace, me, &ns.vector, &peers) {
                if report_bytes(&report) > budget {
                    report.vector = asp_core::VersionVector::new();
                }
                let bytes = report_bytes(&report);
                if bytes > budget {
                    break;
                }
                budget -= bytes;
                ns.reports.push(report);
            }
        }
        out
    }

    /// Takes in what a peer's summary reports of the nodes' vectors (its own among
    /// them): what tombstone collection waits for (see docs/CONFLICTS.md).
    pub fn note_reports(&self, summary: &[NamespaceSummary]) {
        let shared = &self.inner.shared;
        let me = shared.node_id;
        let namespaces = shared.namespaces.read().unwrap();
        let mut gc = shared.gc.lock().unwrap();
        let none = asp_core::VersionVector::new();
        for ns in summary {
            let own = namespaces.get(&ns.namespace).map_or(&none, |s| &s.vector);
            for report in &ns.reports {
                gc.note(&ns.namespace, me, own, report.clone());
            }
        }
        drop(gc);
        drop(namespaces);
        self.note_own_events(summary);
    }

    /// Learns from a peer's summary (its vector and the reports it gossips) which of
    /// this node's own events other nodes hold. Counters past everything this node
    /// knows it issued were issued by an earlier life of it (its data directory was
    /// restored from an older copy, or a crash lost them) or by another process with
    /// its id: they are never issued again (see `counters.rs`), and the node says so.
    fn note_own_events(&self, summary: &[NamespaceSummary]) {
        let shared = &self.inner.shared;
        let me = shared.node_id;
        for ns in summary {
            let held = std::iter::once(&ns.vector)
                .chain(ns.reports.iter().map(|r| &r.vector))
                .map(|v| v.max_counter(me))
                .max()
                .unwrap_or(0);
            if held == 0 {
                continue;
            }
            let claimed = shared.counters.lock().unwrap().claim(&ns.namespace, held);
            match claimed {
                Ok(None) => {}
                Ok(Some(known)) => {
                    tracing::warn!(
                        namespace = %ns.namespace,
                        known,
                        held_by_peers = held,
                        "peers hold events of this node that it has no record of issuing (its data directory is older than what it issued: restored from a copy, or a crash under fsync = never/interval lost them; or another process runs with this node's id); its counters go on after them and reconciliation brings them back"
                    );
                    shared.metrics.own_events_found.inc();
                    let mut found = shared.own_events_found.lock().unwrap();
                    if found.len() == OWN_EVENTS_FOUND_MAX {
                        found.remove(0);
                    }
                    found.push(OwnEventsFound {
                        namespace: ns.namespace.clone(),
                        known,
                        held_by_peers: held,
                        at_ms: writer::wall_ms(),
                    });
                }
                Err(e) => {
                    tracing::error!(namespace = %ns.namespace, error = %e, "cannot record a raised counter mark; local writes may reuse counters peers hold");
                }
            }
        }
        shared.own_events_learned.send_replace(true);
    }

    /// Whether this node holds events of `peer`'s own that `summary` (the peer's)
    /// says it lacks: a node always holds its own events unless it lost them (a data
    /// directory restored from an older copy, a crash under `fsync = never`, a
    /// salvage), and the feed stream will not send them again (the peer acknowledged
    /// them once).
    /// Only namespaces for which `shared` is true count (those both replicate: a
    /// summary leaves the others out).
    pub fn holds_lost_events_of<'a>(
        &self,
        peer: NodeId,
        theirs: impl Fn(&Namespace) -> Option<&'a asp_core::VersionVector>,
        shared: impl Fn(&Namespace) -> bool,
    ) -> bool {
        let namespaces = self.inner.shared.namespaces.read().unwrap();
        namespaces.iter().any(|(ns, state)| {
            let Some(mine) = state.vector.get(peer) else {
                return false;
            };
            if !shared(ns) {
                return false;
            }
            let theirs = theirs(ns).and_then(|v| v.get(peer));
            theirs.is_none_or(|t| !mine.is_subset(t))
        })
    }

    /// Takes in that `peer`, which replicates `namespaces` (its Hello's list), just
    /// sent a summary: it counts as heard of now in those namespaces, whether or not
    /// it holds anything of them yet (tombstone collection waits for such a node; see
    /// docs/CONFLICTS.md).
    pub fn note_contact(&self, peer: NodeId, namespaces: &[String]) {
        let mut gc = self.inner.shared.gc.lock().unwrap();
        gc.note_contact(peer, writer::wall_ms(), namespaces);
    }

    /// The key that turns (key, version) pairs into reconciliation items.
    pub fn item_key(&self) -> ItemKey {
        self.inner.shared.config.item_key
    }

    /// The first reconciliation symbols of `namespace`'s keys at their current versions
    /// (every acknowledged write included), from memory: no scan.
    pub fn reconcile_window(&self, namespace: &Namespace) -> Result<Window, ReadError> {
        self.reconcile_snapshot(namespace).map(|(window, _)| window)
    }

    /// Like [`Store::reconcile_window`], with the feed position the window reflects:
    /// every event up to it, and none after it.
    pub fn reconcile_snapshot(&self, namespace: &Namespace) -> Result<(Window, u64), ReadError> {
        let shared = &self.inner.shared;
        if shared.config.reconcile_window == 0 {
            return Err(ReadError::Invalid(
                "reconciliation windows are off (reconcile_window = 0)".into(),
            ));
        }
        let windows = self.caught_up_windows()?;
        let window = windows.by_namespace.get(namespace).map_or_else(
            || {
                Window::new(
                    shared.config.item_key,
                    window_len(0, shared.config.reconcile_window),
                )
            },
            |d| d.window.clone(),
        );
        Ok((window, windows.seq))
    }

    /// The reconciliation windows once they reflect every acknowledged write (the
    /// keeper runs a little behind the indexer).
    fn caught_up_windows(&self) -> Result<std::sync::MutexGuard<'_, Windows>, ReadError> {
        let shared = &self.inner.shared;
        shared.await_index().map_err(ReadError::Failed)?;
        // The indexer counts a group's message to the keeper before it publishes the
        // group as indexed: every group indexed by now is in this count.
        let messages = shared
            .window_messages
            .load(std::sync::atomic::Ordering::Acquire);
        let mut windows = shared.windows.lock().unwrap();
        while windows.messages < messages {
            if let Some(failure) = shared.failure.get() {
                return Err(ReadError::Failed(failure.clone()));
            }
            windows = shared
                .windows_changed
                .wait_timeout(windows, std::time::Duration::from_millis(100))
                .unwrap()
                .0;
        }
        Ok(windows)
    }

    /// Every item of `namespace` (each key at its current version), read from one
    /// snapshot of the key index after every acknowledged write: for a difference
    /// larger than the window, both sides build their symbols from these instead
    /// ([`Window::build`], then [`asp_core::reconcile::Extension`]). One pass over the
    /// namespace; works whether or not windows are kept.
    pub fn reconcile_items(&self, namespace: &Namespace) -> Result<Vec<Item>, ReadError> {
        self.reconcile_items_at(namespace).map(|(items, _)| items)
    }

    /// Like [`Store::reconcile_items`], with a feed position the items reflect at
    /// least: every event up to it is in them (later ones may be too).
    pub fn reconcile_items_at(&self, namespace: &Namespace) -> Result<(Vec<Item>, u64), ReadError> {
        let shared = &self.inner.shared;
        shared.await_index().map_err(ReadError::Failed)?;
        let seq = shared
            .indexed_seq
            .load(std::sync::atomic::Ordering::Acquire);
        let snapshot = shared.index.snapshot();
        let items = namespace_items(
            &shared.index,
            &snapshot,
            shared.config.item_key,
            namespace.as_str(),
        )?;
        Ok((items, seq))
    }

    /// The events that set the current state (value or tombstone) of the keys of
    /// `namespace` whose items start with one of `prefixes` (4 to 16 bytes of the key
    /// half of an item): what a peer that lacks those items is sent. At most `limit`
    /// events; a prefix shared by several keys yields each of them.
    ///
    /// One pass over the namespace's keys, hashing each: the price of keeping no
    /// index from key hashes to keys (which would double the key index's writes).
    /// Reconciliations that find nothing never call it.
    pub fn events_for_items<'a>(
        &self,
        namespace: &Namespace,
        prefixes: impl IntoIterator<Item = &'a [u8]>,
        limit: usize,
    ) -> Result<Vec<Event>, ReadError> {
        self.events_for_items_within(namespace, prefixes, limit, usize::MAX)
            .map(|(events, _)| events)
    }

    /// [`Store::events_for_items`], stopping once the events' credit sizes reach
    /// `bytes_max`; also says whether it stopped early (`limit` or `bytes_max`), in
    /// which case some keys asked for may be left out.
    pub fn events_for_items_within<'a>(
        &self,
        namespace: &Namespace,
        prefixes: impl IntoIterator<Item = &'a [u8]>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<Event>, bool), ReadError> {
        const SHORTEST: usize = 4;
        let shared = &self.inner.shared;
        let mut wanted: HashMap<[u8; SHORTEST], Vec<&[u8]>> = HashMap::new();
        for prefix in prefixes {
            if !(SHORTEST..=16).contains(&prefix.len()) {
                return Err(ReadError::Invalid(format!(
                    "an item prefix must be {SHORTEST} to 16 bytes; got {}",
                    prefix.len()
                )));
            }
            let head: [u8; SHORTEST] = prefix[..SHORTEST].try_into().expect("checked length");
            wanted.entry(head).or_default().push(prefix);
        }
        shared.await_index().map_err(ReadError::Failed)?;
        if wanted.is_empty() || limit == 0 {
            return Ok((Vec::new(), false));
        }
        let mut page = EventPage::new(limit, bytes_max);
        let mut stopped = false;
        let item_key = shared.config.item_key;
        let prefix = codec::index_prefix(namespace.as_str());
        let _gate = shared.segment_gate.read().unwrap();
        shared.index.scan(&prefix, None, |k, entry| {
            let key = &k[prefix.len()..];
            let hash = item_key.key_hash(key);
            let head: [u8; SHORTEST] = hash[..SHORTEST].try_into().expect("16 bytes");
            let Some(candidates) = wanted.get(&head) else {
                return true;
            };
            if !candidates.iter().any(|p| hash.starts_with(p)) {
                return true;
            }
            if page.is_full() {
                stopped = true;
                return false;
            }
            page.add(shared, k, &entry)
        })?;
        Ok((page.finish()?, stopped))
    }

    /// The events that set the current state of `namespace`'s keys (values and
    /// tombstones), in key order after the key `after`: at most `limit` events and
    /// about `bytes_max` bytes of values. Returns the events and the key to continue
    /// after (`None` at the end). What a peer that holds nothing of the namespace is
    /// sent; pages are read at different moments, each one current.
    pub fn state_events(
        &self,
        namespace: &Namespace,
        after: Option<&Key>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<Event>, Option<Key>), ReadError> {
        let shared = &self.inner.shared;
        shared.await_index().map_err(ReadError::Failed)?;
        let prefix = codec::index_prefix(namespace.as_str());
        let start = after.map(|k| {
            let mut v = prefix.clone();
            v.extend_from_slice(k.as_str().as_bytes());
            v
        });
        let mut page = EventPage::new(limit.max(1), bytes_max);
        let mut more = false;
        let _gate = shared.segment_gate.read().unwrap();
        shared.index.scan(&prefix, start.as_deref(), |k, entry| {
            if page.is_full() {
                more = true;
                return false;
            }
            page.add(shared, k, &entry)
        })?;
        let out = page.finish()?;
        let next = if more {
            out.last().map(|e| e.key.clone())
        } else {
            None
        };
        Ok((out, next))
    }

    /// The feed position through which `peer` is known to hold everything (0 if
    /// unknown): where sending to it resumes.
    pub fn checkpoint(&self, peer: NodeId) -> u64 {
        self.inner.shared.index.checkpoint(peer).unwrap_or(0)
    }

    /// Records how far `peer` holds this node's feed. Not fsynced: losing it only
    /// means re-reading a little of the feed.
    pub fn save_checkpoint(&self, peer: NodeId, seq: u64) -> Result<(), ReadError> {
        Ok(self.inner.shared.index.save_checkpoint(peer, seq)?)
    }

    async fn answer(
        &self,
        answer: oneshot::Receiver<Result<Vec<Applied>, WriteError>>,
    ) -> Result<Vec<Applied>, WriteError> {
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(self.closed_or_failed()),
        }
    }

    /// Waits, without blocking a thread, until reads reflect every write acknowledged
    /// before the call. [`Store::get`] and [`Store::scan`] wait for this themselves by
    /// blocking; async callers that must not block call this first.
    pub async fn caught_up(&self) -> Result<(), ReadError> {
        self.inner
            .shared
            .await_index_async()
            .await
            .map_err(ReadError::Failed)
    }

    /// A namespace's conflict policy (`lww` unless set).
    pub fn policy(&self, namespace: &Namespace) -> Policy {
        self.inner.shared.policies.read().unwrap().get(namespace)
    }

    /// Every namespace whose policy is not `lww`.
    pub fn policies(&self) -> Vec<(Namespace, Policy)> {
        let p = self.inner.shared.policies.read().unwrap();
        p.by_namespace
            .iter()
            .filter(|(_, p)| **p != Policy::Lww)
            .map(|(n, p)| (n.clone(), *p))
            .collect()
    }

    /// Sets a namespace's conflict policy, durably. Refused with
    /// [`WriteError::PolicyFixed`] once the namespace holds data under another policy.
    pub async fn set_policy(&self, namespace: Namespace, policy: Policy) -> Result<(), WriteError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .queue
            .send(Request::Policy(PolicyRequest {
                namespace,
                policy,
                reply,
            }))
            .await
            .map_err(|_| WriteError::Closed)?;
        answer.await.map_err(|_| self.closed_or_failed())?
    }

    /// What this node holds without applying it (see [`Store::apply_remote`]): parked
    /// events and, per namespace, quarantined ones.
    pub fn held(&self) -> HeldStatus {
        let shared = &self.inner.shared;
        let namespaces = shared.namespaces.read().unwrap();
        let holds_data = |ns: &Namespace| namespaces.get(ns).is_some_and(|s| !s.vector.is_empty());
        let held = shared.held.lock().unwrap();
        held.status(shared.config.max_clock_skew_ms, |ns| {
            (self.policy(ns), holds_data(ns))
        })
    }

    /// Whether `namespace` has quarantined events here (its state differs from its
    /// peers' by design until an operator resolves it: anti-entropy leaves it alone).
    pub fn is_quarantined(&self, namespace: &Namespace) -> bool {
        self.inner
            .shared
            .held
            .lock()
            .unwrap()
            .is_quarantined(namespace)
    }

    /// Resolves a namespace's quarantine: applies the events its policy accepts now
    /// ([`QuarantineAction::Retry`], after the policy was set to theirs), or drops them
    /// from this node ([`QuarantineAction::Discard`]; their dots join the namespace's
    /// base vector, so that they are neither asked for nor taken again). Answers once
    /// the change is durable; all zeros when the namespace has nothing quarantined.
    pub async fn resolve_quarantine(
        &self,
        namespace: Namespace,
        action: QuarantineAction,
    ) -> Result<QuarantineOutcome, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .queue
            .send(Request::Quarantine(QuarantineRequest {
                namespace,
                action,
                reply,
            }))
            .await
            .map_err(|_| WriteError::Closed)?;
        answer.await.map_err(|_| self.closed_or_failed())?
    }

    /// The state of a key of a CRDT namespace: the join of every origin's latest
    /// state of it (`None` if nothing was ever written to it).
    pub fn crdt_state(&self, namespace: &Namespace, key: &str) -> Result<Option<State>, ReadError> {
        self.inner.shared.await_index().map_err(ReadError::Failed)?;
        let _gate = self.inner.shared.segment_gate.read().unwrap();
        self.crdt_state_locked(namespace, key)
    }

    /// [`Store::crdt_state`] for a caller that holds the segment gate.
    fn crdt_state_locked(
        &self,
        namespace: &Namespace,
        key: &str,
    ) -> Result<Option<State>, ReadError> {
        let policy = self.policy(namespace);
        let Some(mut state) = State::empty(policy) else {
            return Err(ReadError::Invalid(format!(
                "namespace {namespace} uses the lww policy"
            )));
        };
        let found = self
            .inner
            .shared
            .join_crdt_entries(namespace.as_str(), key, &mut state)?;
        Ok(found.then_some(state))
    }

    /// The current state of a key, including a deleted key's tombstone.
    pub fn get(&self, namespace: &Namespace, key: &str) -> Result<Option<KeyState>, ReadError> {
        let shared = &self.inner.shared;
        shared.await_index().map_err(ReadError::Failed)?;
        let _gate = shared.segment_gate.read().unwrap();
        let Some(entry) = shared
            .index
            .get(&codec::index_key(namespace.as_str(), key))?
        else {
            return Ok(None);
        };
        let value = match entry.content_type {
            None => None,
            Some(content_type) => Some(Value {
                content_type,
                bytes: self.value_of(&entry)?,
            }),
        };
        Ok(Some(KeyState {
            version: entry.version(),
            seq: entry.seq,
            value,
        }))
    }

    fn value_of(&self, entry: &IndexEntry) -> Result<bytes::Bytes, ReadError> {
        self.inner.shared.value_of(entry)
    }

    /// Lists live keys of `namespace` starting with `prefix`, in byte order, after
    /// `after` if given: at most `limit` (capped at [`SCAN_LIMIT_MAX`]).
    pub fn scan(
        &self,
        namespace: &Namespace,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        with_values: bool,
    ) -> Result<ScanPage, ReadError> {
        let limit = limit.clamp(1, SCAN_LIMIT_MAX);
        self.inner.shared.await_index().map_err(ReadError::Failed)?;
        let _gate = with_values.then(|| self.inner.shared.segment_gate.read().unwrap());
        let ns_prefix_len = 1 + namespace.as_str().len();
        let full_prefix = codec::index_key(namespace.as_str(), prefix);
        // A CRDT key has an entry per origin (`key ‖ 0xFF ‖ origin`): listed once, and
        // continued after past all of them.
        let crdt = self.policy(namespace) != Policy::Lww;
        let after_key = after.map(|a| {
            let mut k = codec::index_key(namespace.as_str(), a);
            if crdt {
                k.extend_from_slice(&[codec::CRDT_SEPARATOR; 9]);
            }
            k
        });
        let mut previous: Option<Vec<u8>> = None;
        let mut items = Vec::new();
        let mut more = false;
        let mut last_seen: Option<Vec<u8>> = None;
        let mut tombstones = 0;
        let mut err = None;
        self.inner
            .shared
            .index
            .scan(&full_prefix, after_key.as_deref(), |k, entry| {
                if items.len() == limit {
                    more = true;
                    return false;
                }
                let k = if crdt {
                    let end = k[ns_prefix_len..]
                        .iter()
                        .position(|&b| b == codec::CRDT_SEPARATOR)
                        .map_or(k.len(), |p| ns_prefix_len + p);
                    if previous.as_deref() == Some(&k[..end]) {
                        return true;
                    }
                    previous = Some(k[..end].to_vec());
                    &k[..end]
                } else {
                    k
                };
                let Some(content_type) = entry.content_type else {
                    tombstones += 1;
                    if tombstones >= SCAN_TOMBSTONES_MAX {
                        // A page of nothing but deleted keys: stop here and let the
                        // caller continue from this point.
                        last_seen = Some(k.to_vec());
                        more = true;
                        return false;
                    }
                    return true;
                };
                let key = match std::str::from_utf8(&k[ns_prefix_len..])
                    .ok()
                    .and_then(|s| Key::new(s).ok())
                {
                    Some(key) => key,
                    None => {
                        err = Some(ReadError::Corrupt("index key is not a valid key".into()));
                        return false;
                    }
                };
                let mut state = None;
                let value = if with_values && crdt {
                    match self.crdt_state_locked(namespace, key.as_str()) {
                        Ok(s) => state = s,
                        Err(e) => {
                            err = Some(e);
                            return false;
                        }
                    }
                    None
                } else if with_values {
                    match self.value_of(&entry) {
                        Ok(v) => Some(v),
                        Err(e) => {
                            err = Some(e);
                            return false;
                        }
                    }
                } else {
                    None
                };
                items.push(ScanItem {
                    key,
                    version: entry.version(),
                    seq: entry.seq,
                    content_type,
                    value_len: entry.value_len,
                    value,
                    state,
                });
                true
            })?;
        if let Some(e) = err {
            return Err(e);
        }
        let next_after = if !more {
            None
        } else if let Some(k) = last_seen.filter(|_| items.len() < limit) {
            std::str::from_utf8(&k[ns_prefix_len..])
                .ok()
                .and_then(|s| Key::new(s).ok())
        } else {
            items.last().map(|i| i.key.clone())
        };
        Ok(ScanPage { items, next_after })
    }

    /// A page of the change feed after position `since`: events of `namespace` (or of
    /// every namespace), at most `limit` (capped at [`CHANGES_LIMIT_MAX`]).
    pub fn changes(
        &self,
        namespace: Option<&Namespace>,
        since: u64,
        limit: usize,
    ) -> Result<ChangesPage, ReadError> {
        let mut reader = self.feed_reader(namespace.cloned(), since);
        let events = reader.read(limit)?;
        Ok(ChangesPage {
            events,
            next: reader.position(),
            head: self.head().seq,
        })
    }

    /// A reader of the feed after position `since`, which keeps its place between
    /// reads (what a live subscription uses).
    pub fn feed_reader(&self, namespace: Option<Namespace>, since: u64) -> FeedReader {
        FeedReader {
            shared: self.inner.shared.clone(),
            cursor: self.inner.shared.log.seek(since.saturating_add(1)),
            namespace,
            since,
        }
    }

    /// The last visible feed position, as it changes.
    pub fn subscribe(&self) -> watch::Receiver<FeedHead> {
        self.inner.shared.head_tx.subscribe()
    }

    pub fn head(&self) -> FeedHead {
        *self.inner.shared.head_tx.borrow()
    }

    pub fn status(&self) -> StoreStatus {
        let shared = &self.inner.shared;
        let (written, synced, acked, indexed) = {
            let p = shared.progress.lock().unwrap();
            (p.written.seq, p.synced.seq, p.acked.seq, p.indexed.seq)
        };
        let mut namespaces: Vec<_> = shared
            .namespaces
            .read()
            .unwrap()
            .iter()
            .map(|(ns, state)| (ns.clone(), state.clone()))
            .collect();
        namespaces.sort_by(|a, b| a.0.cmp(&b.0));
        StoreStatus {
            node_id: shared.node_id,
            fsync: shared.config.fsync,
            feed_first_seq: shared.log.first_seq(),
            feed_head_seq: self.head().seq,
            written_seq: written,
            synced_seq: synced,
            acked_seq: acked,
            indexed_seq: indexed,
            log_segments: shared.log.segment_count(),
            log_bytes: shared.log.total_bytes(),
            index_bytes: shared.index.disk_bytes(),
            writer_queue_depth: self.inner.queue.len(),
            writer_queue_max: self.inner.queue.capacity(),
            namespaces,
            failure: shared.failure.get().cloned(),
            no_space: shared.space_problem(),
            last_scrub: shared.last_scrub.lock().unwrap().clone(),
        }
    }

    /// Finishes every accepted write, makes it durable, and stops the writer. Writes
    /// after this fail with [`WriteError::Closed`]. Safe to call more than once.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.queue.send(Request::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let handle = self.inner.writer.lock().unwrap().take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

/// Reads the feed from a position onwards, keeping its place.
pub struct FeedReader {
    shared: Arc<Shared>,
    cursor: LogCursor,
    namespace: Option<Namespace>,
    since: u64,
}

impl FeedReader {
    /// The next events up to the visible head, at most `limit` (capped at
    /// [`CHANGES_LIMIT_MAX`]); empty when caught up.
    pub fn read(&mut self, limit: usize) -> Result<Vec<FeedEvent>, ReadError> {
        self.read_bytes(limit, FEED_PAGE_BYTES_MAX)
    }

    /// Like [`FeedReader::read`], stopping once about `bytes_max` bytes are read (at
    /// least one event, however large).
    pub fn read_bytes(
        &mut self,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<FeedEvent>, ReadError> {
        let head = *self.shared.head_tx.borrow();
        let limit = limit.clamp(1, CHANGES_LIMIT_MAX);
        let records = self.shared.log.read(
            &mut self.cursor,
            head,
            self.namespace.as_ref().map(Namespace::as_str),
            limit,
            bytes_max.clamp(1, FEED_PAGE_BYTES_MAX),
        )?;
        Ok(records
            .into_iter()
            .map(|(_, r)| FeedEvent {
                seq: r.seq,
                event: r.event,
            })
            .collect())
    }

    /// Every feed position up to this one has been read (or skipped as another
    /// namespace's).
    pub fn position(&self) -> u64 {
        (self.cursor.next_seq() - 1).max(self.since)
    }
}

/// Brings the index up to date with the log. Returns how many events were replayed and
/// the newest clock reading seen.
/// Builds every namespace's reconciliation digest from the key index: one pass over
/// all keys.
fn build_digests(
    index: &Index,
    config: &StoreConfig,
) -> Result<HashMap<Namespace, Digest>, OpenError> {
    if config.reconcile_window == 0 {
        return Ok(HashMap::new());
    }
    let started = Instant::now();
    let mut items: HashMap<String, Vec<Item>> = HashMap::new();
    let mut bad = None;
    index
        .scan(&[], None, |k, entry| match codec::split_index_key(k) {
            Some((namespace, key)) => {
                let item = config.item_key.item(key, &entry.version());
                match items.get_mut(namespace) {
                    Some(v) => v.push(item),
                    None => {
                        items.insert(namespace.to_owned(), vec![item]);
                    }
                }
                true
            }
            None => {
                bad = Some(format!("malformed index key {k:?}"));
                false
            }
        })
        .map_err(|e| OpenError::Corrupt {
            path: "index".into(),
            reason: e.to_string(),
        })?;
    if let Some(reason) = bad {
        return Err(OpenError::Corrupt {
            path: "index".into(),
            reason,
        });
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut digests = HashMap::new();
    let mut keys = 0;
    for (namespace, items) in items {
        let namespace = Namespace::new(&namespace).map_err(|e| OpenError::Corrupt {
            path: "index".into(),
            reason: format!("bad namespace in the key index: {e}"),
        })?;
        keys += items.len();
        let digest = Digest::of(config.item_key, &items, config.reconcile_window, threads);
        digests.insert(namespace, digest);
    }
    tracing::info!(
        keys,
        namespaces = digests.len(),
        ms = started.elapsed().as_millis() as u64,
        "reconciliation windows built"
    );
    Ok(digests)
}

fn replay(
    log: &Log,
    index: &Index,
    state: &mut crate::index::IndexState,
) -> Result<(u64, asp_core::Hlc), OpenError> {
    let mut hlc = state.hlc;
    let target = log.last_seq();
    if state.applied_seq >= target {
        return Ok((0, hlc));
    }
    let started = Instant::now();
    let head = log.written_head();
    let mut cursor = log.seek(state.applied_seq + 1);
    let mut replayed = 0u64;
    let mut next_report = 1_000_000;
    tracing::info!(
        from = state.applied_seq + 1,
        to = target,
        "replaying the log into the key index"
    );
    loop {
        let records = log
            .read(&mut cursor, head, None, REPLAY_BATCH_EVENTS, 64 << 20)
            .map_err(|e| OpenError::Corrupt {
                path: "log".into(),
                reason: e.to_string(),
            })?;
        let Some(last) = records.last() else { break };
        let last_seq = last.1.seq;
        let mut winners: HashMap<Slice, IndexEntry, foldhash::fast::RandomState> =
            HashMap::default();
        let mut touched: Vec<Namespace> = Vec::new();
        for (position, record) in &records {
            let event = &record.event;
            let ns_state = state.namespaces.entry(event.namespace.clone()).or_default();
            ns_state.vector.insert(event.dot);
            ns_state.max_hlc = ns_state.max_hlc.max(event.hlc);
            if !touched.contains(&event.namespace) {
                touched.push(event.namespace.clone());
            }
            hlc = hlc.max(event.hlc);
            let (content_type, value) = match &event.op {
                Op::Put {
                    content_type,
                    value,
                } => (Some(*content_type), Some(value)),
                Op::Delete => (None, None),
            };
            let entry = IndexEntry {
                content_type,
                dot: event.dot,
                hlc: event.hlc,
                seq: record.seq,
                position: *position,
                value_len: value.map_or(0, |v| v.len() as u32),
                inline: value
                    .filter(|v| v.len() <= INLINE_VALUE_BYTES_MAX)
                    .map(|v| bytes::Bytes::copy_from_slice(v)),
            };
            let key = Slice::from(codec::event_index_key(
                event.namespace.as_str(),
                event.key.as_str(),
                event.dot,
                &event.context,
            ));
            let current = match winners.get(&key) {
                Some(e) => Some(e.version()),
                None => index
                    .get(&key)
                    .map_err(|e| OpenError::Corrupt {
                        path: "index".into(),
                        reason: e.to_string(),
                    })?
                    .map(|e| e.version()),
            };
            // Equal versions are one event twice: a copy compaction relocated. The
            // later copy is the one that stays.
            if crate::lww::supersedes_on_replay(&entry.version(), current.as_ref()) {
                winners.insert(key, entry);
            }
        }
        let mut batch = index.batch(winners.len() + touched.len() + 2);
        for (key, entry) in &winners {
            batch.put(key.clone(), entry);
        }
        for ns in &touched {
            batch.set_namespace(ns, &state.namespaces[ns]);
        }
        batch.set_applied(last_seq, hlc);
        batch.commit()?;
        replayed += records.len() as u64;
        state.applied_seq = last_seq;
        if replayed >= next_report {
            next_report += 1_000_000;
            tracing::info!(replayed, remaining = target - last_seq, "replaying the log");
        }
    }
    tracing::info!(
        replayed,
        ms = started.elapsed().as_millis() as u64,
        "log replay done"
    );
    Ok((replayed, hlc))
}
