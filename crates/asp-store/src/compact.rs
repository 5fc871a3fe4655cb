//! Compaction of the feed log: copy forward, then remove whole segments.
//!
//! The key index holds log positions, so a segment cannot be rewritten in place: the
//! index's positions would have to change in the same crash-atomic step as the file,
//! and fjall and the log cannot make one step. Instead, for each sealed segment that
//! is mostly dead, compaction
//!
//! 1. copies its live records (each key's current version) forward through the writer,
//!    unchanged, to new feed positions; the indexer moves a key's position to the copy
//!    only if the key still points at the old one;
//! 2. makes the copies durable (fsync of the log, persist of the index);
//! 3. records the dots of the superseded records it drops in their namespace's base
//!    vector (`base.vv`, see [`crate::base`]) and the segment's positions as removed,
//!    durably;
//! 4. only then deletes the segment and its sidecar.
//!
//! A crash at any point leaves a store that opens to the same state: before step 4 the
//! old segment is still there (its dead records are simply read again, and replay
//! prefers the later of two copies of one event), after it everything it held is in
//! the log elsewhere or in the base.
//!
//! A record is *live* when the key index points at it, a *stale copy* when the index
//! points at another copy of the same event (left by an earlier, interrupted run), and
//! *superseded* otherwise. Superseded records younger than their namespace's retention
//! keep their whole segment.
//!
//! Size: one pass with its collection rules — copying forward, the base, and which
//! deletes and emptied CRDT keys may go — share the per-segment walk and its views.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use asp_core::crdt::Policy;
use asp_core::{Event, Namespace, Op, VersionVector};
use fjall::Slice;
use tokio::sync::oneshot;

use crate::codec::{self, IndexEntry, LogPosition, Record};
use crate::error::{ReadError, WriteError};
use crate::log::Segment;
use crate::store::Store;
use crate::writer::{
    CollectRequest, CollectTally, CoverRequest, RelocateRequest, Request, Shared, wall_ms,
};
use asp_core::gc::GcView;

/// Records read from a segment at a time.
const READ_BATCH_RECORDS: usize = 4096;
/// Bytes read from a segment at a time, about.
const READ_BATCH_BYTES: usize = 4 << 20;
/// Tombstones in one collection request, at most.
const COLLECT_ENTRIES_MAX: usize = 4096;
/// Records in one relocation request, at most (and at most `group_events_max`).
const RELOCATE_RECORDS_MAX: usize = 4096;
/// Bytes in one relocation request, about (and at most `group_bytes_max`); a single
/// larger record goes alone.
const RELOCATE_BYTES_MAX: usize = 4 << 20;

/// What one [`Store::compact`] run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// Sealed segments deleted.
    pub segments_removed: usize,
    /// Superseded records dropped; their dots are now in their namespace's base.
    pub records_dropped: u64,
    /// Stale copies dropped: records an earlier, interrupted run had already copied
    /// forward (their events are still in the log).
    pub stale_copies_dropped: u64,
    /// Live records copied forward to new feed positions.
    pub records_relocated: u64,
    /// Deletes (of `lww` keys) collected from the log: every known node holds them
    /// and they are older than `tombstone_ttl_ms` (see docs/CONFLICTS.md); and the
    /// per-node entries of emptied CRDT keys collected by the same rule, one each.
    pub tombstones_collected: u64,
    /// Live CRDT keys whose entries were written again smaller: every known node
    /// holds all of them, so each now holds their join without what no read shows
    /// (a json-map's removed paths, a set's members removed since an entry was
    /// written). See docs/CONFLICTS.md, "Inside a live key".
    pub crdt_keys_pruned: u64,
    /// Of those, the ones that left an epitaph because some node was away past the
    /// horizon.
    pub epitaphs_left: u64,
    /// Epitaphs dropped: the node they waited for holds their delete now.
    pub epitaphs_dropped: u64,
    /// Bytes of log before and after the run (writes during the run included).
    pub log_bytes_before: u64,
    pub log_bytes_after: u64,
    pub duration: Duration,
}

/// Where tombstone collection of a namespace stands ([`Store::tombstone_gc`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TombstoneGc {
    /// Deletes whose dot is here may be collected once older than the TTL.
    pub stable: VersionVector,
    /// Nodes not heard of for the horizon: collection goes on without them and leaves
    /// epitaphs.
    pub away: Vec<asp_core::NodeId>,
    /// Nodes whose report this node does not hold yet: they hold collection back.
    pub waiting: Vec<asp_core::NodeId>,
}

/// Why [`Store::compact`] stopped. Whatever it finished before the error stays done;
/// nothing is ever half removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompactionError {
    /// Reading a segment or the key index failed.
    #[error("compaction: {0}")]
    Read(#[from] ReadError),
    /// The writer refused to copy records forward (the store is closing or failed).
    #[error("compaction: copying records forward: {0}")]
    Relocate(WriteError),
    /// The writer refused to collect deletes (the store is closing or failed).
    #[error("compaction: collecting deletes: {0}")]
    Collect(WriteError),
    #[error("compaction: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("compaction: persisting the key index: {0}")]
    Index(#[from] fjall::Error),
    /// The compaction thread panicked (a bug; the store is as the run left it).
    #[error("compaction: the compaction task failed: {0}")]
    Panicked(String),
    /// The store stopped after a storage failure.
    #[error("compaction: storage failure: {0}")]
    Failed(String),
}

/// The fewest entries a run must collect before it merges the key index's tables
/// (and only if they are a quarter of its entries or more).
const RECLAIM_ENTRIES_MIN: u64 = 10_000;

/// How the records of one segment stand against the key index.
#[derive(Default)]
struct Survey {
    records: u64,
    live: u64,
    stale: u64,
    superseded: u64,
    /// Deletes collected (by this survey or before): dead records.
    collectable: u64,
    /// Deletes this survey collected from the key index, and how many of them left
    /// an epitaph.
    collected: u64,
    epitaphs: u64,
    /// Live CRDT keys this survey wrote again smaller.
    pruned: u64,
    /// A superseded record is younger than its namespace's retention, or the index
    /// does not know a key of the segment: the segment stays.
    keep: bool,
}

/// Every index entry of one CRDT key: (index key, entry).
type KeyEntries = Vec<(Vec<u8>, IndexEntry)>;

enum Standing {
    Live,
    StaleCopy,
    Superseded,
    /// A live delete that may be collected now: its key and entry, and whether it
    /// leaves an epitaph.
    Collectable(Vec<u8>, IndexEntry, bool),
    /// The newest state of a CRDT key that may be collected now: the key holds
    /// nothing (see [`asp_core::crdt::State::is_removed`]) and every node holds all of
    /// its entries, which are listed here (index key, entry) to go together.
    CollectableState(KeyEntries),
    /// A live CRDT key whose entries may be written again smaller: each of its
    /// entries' events (with the position of its record), its value now the pruned
    /// join of them all. They go to the writer together, as one transaction.
    PrunableState(Vec<(Event, LogPosition)>),
    /// A delete already collected: its key's entry is an epitaph or gone (or a CRDT
    /// key's state, collected with every entry of its key).
    Collected,
    /// The key index has no entry for the key: not expected, so never dropped.
    Unknown,
}

impl Store {
    /// Compacts the feed log: every sealed segment whose records are at least
    /// `compaction_dead_ratio` dead, and whose superseded records are all older than
    /// their namespace's retention (and, with `compaction_retention_bytes`, that lies
    /// wholly before the newest that many bytes of log), has its live records copied
    /// forward and is deleted, oldest first. The dots of the superseded events it drops
    /// go to their namespace's base vector ([`Store::base`]).
    ///
    /// Blocks for the whole run (async callers use `spawn_blocking`); runs beside
    /// writes, reads, change feeds and replication. Concurrent calls run one after the
    /// other.
    ///
    /// Change feeds see each relocated event again at its new position; consumers
    /// dedupe by dot. A feed that starts at a removed position starts at the next one
    /// the log holds.
    pub fn compact(&self) -> Result<CompactionReport, CompactionError> {
        self.compact_with(false)
    }

    /// [`Store::compact`] on a blocking thread of the tokio runtime, for async callers.
    pub async fn compact_async(&self) -> Result<CompactionReport, CompactionError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.compact())
            .await
            .unwrap_or_else(|e| Err(CompactionError::Panicked(e.to_string())))
    }

    /// For crash tests: like [`Store::compact`], but stops after the live records of
    /// the first segment to compact are copied forward, durable and indexed — before
    /// its dots go to the base and before it is deleted — as a crash there would.
    #[doc(hidden)]
    pub fn compact_stop_after_relocation(&self) -> Result<CompactionReport, CompactionError> {
        self.compact_with(true)
    }

    /// Per namespace, the dots this node holds that its log no longer does: dropped by
    /// compaction, or covered ([`Store::cover`]). Sorted by namespace.
    pub fn bases(&self) -> Vec<(Namespace, VersionVector)> {
        self.inner
            .shared
            .maintenance
            .bases
            .lock()
            .unwrap()
            .by_namespace
            .iter()
            .map(|(ns, vv)| (ns.clone(), vv.clone()))
            .collect()
    }

    /// Where tombstone collection stands in each namespace whose deletes are
    /// collected (`lww` namespaces held; none when collection is off).
    pub fn tombstone_gc(&self) -> BTreeMap<Namespace, TombstoneGc> {
        self.collecting(wall_ms())
            .views
            .into_iter()
            .map(|(namespace, view)| {
                let gc = TombstoneGc {
                    stable: view.stable,
                    away: view.away,
                    waiting: view.waiting,
                };
                (namespace, gc)
            })
            .collect()
    }

    /// The base vector of one namespace (empty if it has none).
    pub fn base(&self, namespace: &Namespace) -> VersionVector {
        self.inner
            .shared
            .maintenance
            .bases
            .lock()
            .unwrap()
            .by_namespace
            .get(namespace)
            .cloned()
            .unwrap_or_default()
    }

    /// Records that every dot of `vector` is superseded by state this node holds (what
    /// a peer says of events this node will never need): the dots join `namespace`'s
    /// base and its version vector, so they are never asked for or applied again.
    /// Applied in queue order, after every write and [`Store::enqueue_remote`] request
    /// queued before it; returns once the base is durable and [`Store::summary`] shows
    /// the dots. The namespace need not hold any event yet.
    pub async fn cover(
        &self,
        namespace: Namespace,
        vector: VersionVector,
    ) -> Result<(), WriteError> {
        if vector.is_empty() {
            return Ok(());
        }
        let shared = &self.inner.shared;
        if let Some(f) = shared.health.failure.get() {
            return Err(WriteError::Storage(f.clone()));
        }
        let (reply, answer) = oneshot::channel();
        let request = Request::Cover(CoverRequest {
            namespace,
            vector,
            reply,
        });
        self.inner
            .queue
            .send(request)
            .await
            .map_err(|_| WriteError::Closed)?;
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(closed_or_failed(shared)),
        }
    }

    fn compact_with(
        &self,
        stop_after_relocation: bool,
    ) -> Result<CompactionReport, CompactionError> {
        let started = Instant::now();
        let shared = &self.inner.shared;
        let _running = shared
            .maintenance
            .compaction
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut report = CompactionReport {
            log_bytes_before: shared.log.total_bytes(),
            ..CompactionReport::default()
        };
        // Whether a record is live is read from the key index, which must reflect
        // every record of the segments looked at.
        shared.await_index().map_err(CompactionError::Failed)?;
        let indexed = shared.indexer.indexed_seq.load(Ordering::Acquire);
        let now_ms = wall_ms();
        let collecting = self.collecting(now_ms);
        // Every segment is surveyed, the active one too: deletes are collected from
        // the key index wherever their record is (so that two nodes that hold the
        // same deletes drop them from their index, and their reconciliation items, at
        // about the same time); only candidates for removal go on to be compacted.
        let removable: std::collections::BTreeSet<u64> =
            candidates(shared).iter().map(|s| s.base).collect();
        let mut segments = shared.log.sealed_segments();
        segments.push(shared.log.active());
        let progress =
            shared
                .maintenance
                .operations
                .start("compaction", segments.len() as u64, "segments");
        for (done, segment) in segments.into_iter().enumerate() {
            progress.done(done as u64);
            let candidate = removable.contains(&segment.base);
            if candidate && (segment.last_seq() > indexed || segment.last_seq() < segment.base)
                || !candidate && collecting.views.is_empty()
            {
                continue;
            }
            let survey = self.survey(&segment, &collecting, now_ms, indexed)?;
            report.tombstones_collected += survey.collected;
            report.crdt_keys_pruned += survey.pruned;
            report.epitaphs_left += survey.epitaphs;
            shared.metrics.tombstones_collected.inc_by(survey.collected);
            shared.metrics.epitaphs_left.inc_by(survey.epitaphs);
            if !candidate {
                continue;
            }
            let dead = survey.stale + survey.superseded + survey.collectable;
            if survey.keep
                || survey.records == 0
                || (dead as f64) < shared.config.compaction_dead_ratio * survey.records as f64
            {
                tracing::debug!(
                    segment = segment.base,
                    records = survey.records,
                    live = survey.live,
                    dead,
                    kept_by_retention = survey.keep,
                    "compaction leaves a segment"
                );
                continue;
            }
            let moved = self.copy_forward(&segment, &collecting, now_ms)?;
            report.records_relocated += moved.relocated;
            shared
                .metrics
                .compaction_records_relocated
                .inc_by(moved.relocated);
            // The copies must outlive the segment: fsync them (earlier segments were
            // fsynced when sealed, so the active one is the only one to sync), and
            // persist the index so that it points at them without a replay.
            let active = shared.log.active();
            // A failed fsync may have dropped written pages: the store cannot trust
            // its log from here, as when the writer's fsync fails.
            active.file.sync_data().map_err(|source| {
                let context = format!("fsync of {}", active.path.display());
                shared.fail(format!("{context}: {source}"));
                CompactionError::Io { context, source }
            })?;
            shared.index.persist()?;
            if stop_after_relocation {
                break;
            }
            {
                let mut bases = shared.maintenance.bases.lock().unwrap();
                let mut next = bases.clone();
                for (namespace, dots) in &moved.dropped {
                    next.by_namespace
                        .entry(namespace.clone())
                        .or_default()
                        .join(dots);
                }
                next.removed.insert_range(segment.base, segment.last_seq());
                next.save(shared.config.fs.as_ref(), &shared.config.data_dir)
                    .map_err(|source| CompactionError::Io {
                        context: "writing the base vector file".into(),
                        source,
                    })?;
                *bases = next;
            }
            shared
                .log
                .delete_segment_files(&segment)
                .map_err(|source| CompactionError::Io {
                    context: format!("deleting {}", segment.path.display()),
                    source,
                })?;
            {
                // No reader is between an index lookup and the log read it leads to.
                let _gate = shared.maintenance.segment_gate.write().unwrap();
                shared.log.forget_segment(segment.base);
            }
            report.segments_removed += 1;
            report.records_dropped += moved.superseded + moved.collected;
            report.stale_copies_dropped += moved.stale;
            let metrics = &shared.metrics;
            metrics.compaction_segments_removed.inc();
            metrics
                .compaction_records_dropped
                .inc_by(moved.superseded + moved.collected + moved.stale);
            tracing::info!(
                segment = segment.base,
                relocated = moved.relocated,
                dropped = moved.superseded,
                stale_copies = moved.stale,
                collected_deletes = moved.collected,
                "compaction removed a log segment"
            );
        }
        // Collected entries leave the index as removals, and pruned ones are
        // overwritten: either frees its space only when the LSM merges the new
        // records with the tables holding the old entries. After a run that collected
        // or pruned a large share of the keys, that is done at once.
        let collected =
            report.tombstones_collected - report.epitaphs_left + report.crdt_keys_pruned;
        if collected >= RECLAIM_ENTRIES_MIN
            && collected as usize * 4 >= shared.index.approximate_keys()
        {
            let started = Instant::now();
            shared.index.reclaim_keys()?;
            tracing::info!(
                collected,
                ms = started.elapsed().as_millis() as u64,
                "compaction merged the key index's tables after collecting"
            );
        }
        if !stop_after_relocation {
            report.epitaphs_dropped = self.sweep_epitaphs(&collecting)?;
            shared
                .metrics
                .epitaphs_dropped
                .inc_by(report.epitaphs_dropped);
        }
        shared.metrics.compaction_runs.inc();
        report.log_bytes_after = shared.log.total_bytes();
        report.duration = started.elapsed();
        Ok(report)
    }

    /// Copies the live records of `segment` forward and collects the dots of the
    /// superseded ones. The standing of each record is read again here: a record live
    /// when surveyed may have been superseded since. One that is now superseded but
    /// too young to drop is copied anyway (its copy is a dead record, kept).
    fn copy_forward(
        &self,
        segment: &Arc<Segment>,
        collecting: &Collecting,
        now_ms: u64,
    ) -> Result<Moved, CompactionError> {
        let shared = &self.inner.shared;
        let records_max = RELOCATE_RECORDS_MAX.min(shared.config.group_events_max);
        let bytes_max = RELOCATE_BYTES_MAX.min(shared.config.group_bytes_max);
        let mut moved = Moved::default();
        let mut batch: Vec<(Event, LogPosition)> = Vec::new();
        let mut batch_bytes = 0;
        read_segment(shared, segment, |position, record| {
            let event = record.event;
            let copy = match standing(shared, &event, position, collecting, now_ms)? {
                // A collection that did not take (the key was written in the
                // same group): still live.
                Standing::Live
                | Standing::Unknown
                | Standing::Collectable(..)
                | Standing::CollectableState(_)
                | Standing::PrunableState(_) => true,
                Standing::StaleCopy => {
                    moved.stale += 1;
                    false
                }
                standing @ (Standing::Superseded | Standing::Collected)
                    if old_enough(shared, &event, now_ms) =>
                {
                    match standing {
                        Standing::Collected => moved.collected += 1,
                        _ => moved.superseded += 1,
                    }
                    moved
                        .dropped
                        .entry(event.namespace.clone())
                        .or_default()
                        .insert(event.dot);
                    false
                }
                Standing::Superseded | Standing::Collected => true,
            };
            if copy {
                batch_bytes += position.frame_len as usize;
                batch.push((event, position));
                if batch.len() >= records_max || batch_bytes >= bytes_max {
                    moved.relocated += batch.len() as u64;
                    self.relocate(std::mem::take(&mut batch), batch_bytes)?;
                    batch_bytes = 0;
                }
            }
            Ok(true)
        })?;
        if !batch.is_empty() {
            moved.relocated += batch.len() as u64;
            self.relocate(batch, batch_bytes)?;
        }
        Ok(moved)
    }

    /// Which deletes and CRDT states this run may collect: per namespace (but
    /// counters), the view of what every known node holds (see [`asp_core::gc`]).
    fn collecting(&self, now_ms: u64) -> Collecting {
        let shared = &self.inner.shared;
        let mut collecting = Collecting {
            views: HashMap::new(),
            ttl_ms: 0,
        };
        let Some(ttl_ms) = shared.config.tombstone_ttl_ms else {
            // No views: nothing may be collected.
            return collecting;
        };
        collecting.ttl_ms = ttl_ms;
        let peers = shared.index.checkpoint_peers();
        let vectors: Vec<(Namespace, VersionVector)> = shared
            .indexer
            .namespaces
            .read()
            .unwrap()
            .iter()
            .map(|(ns, state)| (ns.clone(), state.vector.clone()))
            .collect();
        let policies = shared.writer.policies.read().unwrap();
        let mut gc = shared.peers.gc.lock().unwrap();
        for (namespace, vector) in vectors {
            // lww deletes and CRDT states (not counters': see `crdt_state`).
            if policies.get(&namespace) == Policy::Counter {
                continue;
            }
            let view = gc.view(
                &namespace,
                shared.node_id,
                &vector,
                &peers,
                now_ms,
                shared.config.gc_horizon_ms,
            );
            if !view.away.is_empty() {
                tracing::debug!(namespace = %namespace, away = ?view.away, "nodes away past the horizon: collected deletes leave epitaphs");
            }
            collecting.views.insert(namespace, view);
        }
        collecting
    }

    /// Reads a whole segment (the active one up to `indexed`), judges each record
    /// against the key index and collects the deletes that may go: their key's entry
    /// becomes an epitaph or goes, through the writer (ordered with writes to the same
    /// keys). A segment that must stay is read to its end only when deletes are being
    /// collected.
    fn survey(
        &self,
        segment: &Arc<Segment>,
        collecting: &Collecting,
        now_ms: u64,
        indexed: u64,
    ) -> Result<Survey, CompactionError> {
        let shared = &self.inner.shared;
        let mut survey = Survey::default();
        let mut entries = Vec::new();
        // CRDT keys already sent this survey (each origin's record names its key).
        let mut states_sent: std::collections::HashSet<Vec<u8>> = Default::default();
        read_segment(shared, segment, |position, record| {
            if record.seq > indexed {
                return Ok(false);
            }
            survey.records += 1;
            match standing(shared, &record.event, position, collecting, now_ms)? {
                Standing::Live => survey.live += 1,
                standing @ (Standing::Superseded | Standing::Collected) => {
                    match standing {
                        Standing::Collected => survey.collectable += 1,
                        _ => survey.superseded += 1,
                    }
                    // A collected delete's record stays in the feed for the
                    // namespace's retention, like a superseded one.
                    if !old_enough(shared, &record.event, now_ms) {
                        survey.keep = true;
                    }
                }
                Standing::Collectable(key, entry, epitaph) => {
                    survey.collectable += 1;
                    entries.push((Slice::from(key), entry, epitaph));
                    if entries.len() >= COLLECT_ENTRIES_MAX {
                        self.collect(std::mem::take(&mut entries), &mut survey)?;
                    }
                }
                Standing::CollectableState(key_entries) => {
                    survey.collectable += 1;
                    let (first, _) = &key_entries[0];
                    let prefix = first[..first.len() - 8].to_vec();
                    if states_sent.insert(prefix) {
                        // All of a key's entries go in one request: the writer applies
                        // it as one index batch, so no read sees part of the key.
                        if entries.len() + key_entries.len() > COLLECT_ENTRIES_MAX {
                            self.collect(std::mem::take(&mut entries), &mut survey)?;
                        }
                        entries.extend(
                            key_entries
                                .into_iter()
                                .map(|(k, e)| (Slice::from(k), e, false)),
                        );
                    }
                }
                Standing::PrunableState(records) => {
                    survey.live += 1;
                    let prefix = codec::crdt_key_prefix(
                        record.event.namespace.as_str(),
                        record.event.key.as_str(),
                    );
                    if states_sent.insert(prefix) {
                        let bytes = records.iter().map(|(_, p)| p.frame_len as usize).sum();
                        // One request, one transaction in the log: on every replay
                        // either all of the key's entries hold the pruned join or none.
                        self.relocate(records, bytes)?;
                        survey.pruned += 1;
                    }
                }
                Standing::StaleCopy => survey.stale += 1,
                Standing::Unknown => survey.keep = true,
            }
            // Staying whatever else it holds: read on only to collect deletes.
            Ok(!(survey.keep && collecting.views.is_empty()))
        })?;
        if !entries.is_empty() {
            self.collect(entries, &mut survey)?;
        }
        Ok(survey)
    }

    /// Sends deletes to collect to the writer and counts those that went (a key
    /// written meanwhile keeps its entry).
    fn collect(
        &self,
        entries: Vec<(Slice, IndexEntry, bool)>,
        survey: &mut Survey,
    ) -> Result<(), CompactionError> {
        let tally = self.send_collect(entries)?;
        survey.collected += tally.collected.load(Ordering::Relaxed);
        survey.epitaphs += tally.epitaphs.load(Ordering::Relaxed);
        Ok(())
    }

    /// Drops the epitaphs no longer needed (every known node holds their delete) and
    /// epitaph rows of keys written since. Returns how many epitaphs went.
    fn sweep_epitaphs(&self, collecting: &Collecting) -> Result<u64, CompactionError> {
        let shared = &self.inner.shared;
        let mut dropped = 0;
        let mut after: Option<Slice> = None;
        loop {
            let rows = shared
                .index
                .epitaphs(after.as_deref(), COLLECT_ENTRIES_MAX)?;
            let Some((last, _)) = rows.last() else {
                return Ok(dropped);
            };
            after = Some(last.clone());
            let mut entries = Vec::new();
            for (key, row) in rows {
                let current = shared.index.get(&key)?;
                let goes = match &current {
                    Some(c) if c.dot == row.dot && c.is_epitaph() => {
                        let view = codec::split_index_key(&key)
                            .and_then(|(ns, _)| collecting.views.get(ns));
                        view.is_some_and(|v| v.complete && v.stable.contains(c.dot))
                    }
                    // The key was written since: only the row goes.
                    _ => true,
                };
                if goes {
                    entries.push((key, row, false));
                }
            }
            if !entries.is_empty() {
                // Counted by the indexer: epitaphs it dropped (not stale rows).
                let tally = self.send_collect(entries)?;
                dropped += tally.collected.load(Ordering::Relaxed);
            }
        }
    }

    /// Sends a collection to the writer and waits until the index reflects it; returns
    /// what it did.
    fn send_collect(
        &self,
        entries: Vec<(Slice, IndexEntry, bool)>,
    ) -> Result<Arc<CollectTally>, CompactionError> {
        let tally = Arc::new(CollectTally::default());
        let tally_for_writer = tally.clone();
        self.ask_writer(|reply| {
            Request::Collect(CollectRequest {
                entries,
                reply,
                tally: tally_for_writer,
            })
        })
        .map_err(CompactionError::Collect)?;
        Ok(tally)
    }

    /// Sends records to the writer to append again, and waits until they are
    /// acknowledged and indexed.
    fn relocate(
        &self,
        records: Vec<(Event, LogPosition)>,
        bytes: usize,
    ) -> Result<(), CompactionError> {
        self.ask_writer(|reply| {
            Request::Relocate(RelocateRequest {
                records,
                reply,
                bytes,
            })
        })
        .map_err(CompactionError::Relocate)
    }

    /// Queues the request `make` builds around its reply channel, and waits for the
    /// answer.
    fn ask_writer(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), WriteError>>) -> Request,
    ) -> Result<(), WriteError> {
        let (reply, answer) = oneshot::channel();
        block_on(self.inner.queue.send(make(reply))).map_err(|_| WriteError::Closed)?;
        match block_on(answer) {
            Ok(result) => result,
            Err(_) => Err(closed_or_failed(&self.inner.shared)),
        }
    }
}

/// What copying one segment forward did.
#[derive(Default)]
struct Moved {
    relocated: u64,
    stale: u64,
    superseded: u64,
    /// Records of collected deletes dropped.
    collected: u64,
    /// The dots of the superseded records dropped, per namespace.
    dropped: BTreeMap<Namespace, VersionVector>,
}

/// Reads `segment`'s records in order, passing each to `visit` until it answers
/// `false`.
fn read_segment(
    shared: &Shared,
    segment: &Arc<Segment>,
    mut visit: impl FnMut(LogPosition, Record) -> Result<bool, CompactionError>,
) -> Result<(), CompactionError> {
    let (mut cursor, head) = shared.log.segment_cursor(segment);
    loop {
        let records = shared.log.read(
            &mut cursor,
            head,
            crate::log::ReadFilter::All,
            READ_BATCH_RECORDS,
            READ_BATCH_BYTES,
        )?;
        if records.is_empty() {
            return Ok(());
        }
        for (position, record) in records {
            if !visit(position, record)? {
                return Ok(());
            }
        }
    }
}

/// The sealed segments the size rule allows, oldest first.
fn candidates(shared: &Shared) -> Vec<Arc<Segment>> {
    let mut sealed = shared.log.sealed_segments();
    let keep_bytes = shared.config.compaction_retention_bytes;
    if keep_bytes > 0 {
        // Keep every segment holding any of the newest `keep_bytes` bytes.
        let mut newer_bytes = shared.log.active().len();
        let mut allowed = sealed.len();
        for (i, segment) in sealed.iter().enumerate().rev() {
            if newer_bytes < keep_bytes {
                allowed = i;
            }
            newer_bytes += segment.len();
        }
        sealed.truncate(allowed);
    }
    sealed
}

fn standing(
    shared: &Shared,
    event: &Event,
    position: LogPosition,
    collecting: &Collecting,
    now_ms: u64,
) -> Result<Standing, ReadError> {
    let key = codec::event_index_key(
        event.namespace.as_str(),
        event.key.as_str(),
        event.dot,
        &event.context,
    );
    let collectable = || collecting.may_collect(event, now_ms);
    Ok(match shared.index.get(&key)? {
        // Only collection removes the entry of an lww key (and an index rebuild would
        // have indexed this record again): the key's last event was a delete, now
        // collected, and any put before it was superseded by it.
        None if event.context.is_empty() => match event.op {
            Op::Delete => Standing::Collected,
            Op::Put { .. } => Standing::Superseded,
        },
        // Likewise, only collection removes a CRDT key's entries (all at once).
        None if Policy::of_event(&event.context).is_some() => Standing::Collected,
        None => Standing::Unknown,
        Some(entry) if entry.dot != event.dot => Standing::Superseded,
        Some(entry) if entry.is_epitaph() => Standing::Collected,
        Some(entry) if entry.position == position && !event.context.is_empty() => {
            match collecting.crdt_state(shared, event, now_ms)? {
                Some(CrdtDecision::Collect(entries)) => Standing::CollectableState(entries),
                Some(CrdtDecision::Prune(records)) => Standing::PrunableState(records),
                None => Standing::Live,
            }
        }
        Some(entry) if entry.position == position => match collectable() {
            Some(epitaph) => Standing::Collectable(key, entry, epitaph),
            None => Standing::Live,
        },
        Some(_) => Standing::StaleCopy,
    })
}

/// Which deletes one compaction run may collect.
pub(crate) struct Collecting {
    /// Per namespace (counters' left out): which events every known node holds.
    views: HashMap<Namespace, GcView>,
    ttl_ms: u64,
}

impl Collecting {
    /// Whether `event` is a delete that may be collected now; if so, whether it leaves
    /// an epitaph.
    fn may_collect(&self, event: &Event, now_ms: u64) -> Option<bool> {
        if !matches!(event.op, Op::Delete) || !event.context.is_empty() {
            return None;
        }
        let view = self.views.get(&event.namespace)?;
        if now_ms.saturating_sub(event.hlc.physical_ms()) < self.ttl_ms {
            return None;
        }
        view.stable.contains(event.dot).then_some(!view.complete)
    }

    /// What may be done now with the CRDT key of `event` (one of its per-origin
    /// states), when every entry's dot is held by every known node (the rule of `lww`
    /// deletes), every entry is older than the TTL, and no node is away past the
    /// horizon. Any event of the key this node has not seen was then made by a node
    /// that held all of these entries, so its state carries what they removed (or, if
    /// that node pruned, none of what the removals hid), and any copy of these is a
    /// duplicate by dot. So:
    ///
    /// - a key whose joined state holds nothing
    ///   ([`asp_core::crdt::State::is_removed`]) loses every entry;
    /// - a key that holds something has each entry written again as the join of all
    ///   of them, pruned ([`asp_core::crdt::State::pruned`]), when that takes less
    ///   room than the entries do now. Every entry, not just one: an entry left as it
    ///   was could hold an older write that only a pruned removal hid.
    ///
    /// A node away leaves CRDT keys alone (an epitaph would have to keep the very
    /// context collection removes), as does a counter (its per-node totals are what
    /// increments build on).
    fn crdt_state(
        &self,
        shared: &Shared,
        event: &Event,
        now_ms: u64,
    ) -> Result<Option<CrdtDecision>, ReadError> {
        // Only under fsync = always: a node that loses what it reported holding (a
        // machine crash under `never` or `interval`) breaks the stability rule, and a
        // long simulator sweep under `never` found divergences from collecting and
        // pruning CRDT keys then (docs/CONFLICTS.md, "Deletes, and when they are
        // collected").
        if shared.config.fsync != crate::config::FsyncMode::Always {
            return Ok(None);
        }
        let Some(view) = self.views.get(&event.namespace) else {
            return Ok(None);
        };
        if !view.complete
            || !matches!(Policy::of_event(&event.context), Some(p) if p != Policy::Counter && p != Policy::Lww)
        {
            return Ok(None);
        }
        let prefix = codec::crdt_key_prefix(event.namespace.as_str(), event.key.as_str());
        let mut entries = Vec::new();
        let mut fits = true;
        shared.index.scan(&prefix, None, |k, entry| {
            fits = view.stable.contains(entry.dot)
                && !entry.is_epitaph()
                && now_ms.saturating_sub(entry.hlc.physical_ms()) >= self.ttl_ms;
            entries.push((k.to_vec(), entry));
            fits
        })?;
        if !fits || entries.is_empty() {
            return Ok(None);
        }
        // A state that does not decode is never collected (reads report it).
        let mut state = None::<asp_core::crdt::State>;
        let mut bytes_now = 0;
        for (_, entry) in &entries {
            let value = shared.value_of(entry)?;
            bytes_now += value.len();
            let Ok(one) = asp_core::crdt::State::decode(&value) else {
                return Ok(None);
            };
            match &mut state {
                None => state = Some(one),
                Some(s) => {
                    if s.join(&one).is_err() {
                        return Ok(None);
                    }
                }
            }
        }
        let Some(state) = state else {
            return Ok(None);
        };
        if state.is_removed() {
            return Ok(Some(CrdtDecision::Collect(entries)));
        }
        let pruned = state.pruned(entries.iter().map(|(_, entry)| entry.dot));
        let pruned = bytes::Bytes::from(pruned.encode());
        if pruned.len() * entries.len() >= bytes_now {
            return Ok(None);
        }
        let mut records = Vec::with_capacity(entries.len());
        for (_, entry) in &entries {
            let mut event = shared.event_at(entry)?;
            let Op::Put { content_type, .. } = event.op else {
                return Ok(None);
            };
            event.op = Op::Put {
                content_type,
                value: pruned.clone(),
            };
            records.push((event, entry.position));
        }
        Ok(Some(CrdtDecision::Prune(records)))
    }
}

/// What compaction may do with a CRDT key ([`Collecting::crdt_state`]).
enum CrdtDecision {
    /// The key holds nothing: every entry goes (index key, entry).
    Collect(KeyEntries),
    /// Each entry's event, with the position of its record, to write again with the
    /// key's pruned state.
    Prune(Vec<(Event, LogPosition)>),
}

/// Whether a superseded event is past its namespace's retention.
fn old_enough(shared: &Shared, event: &Event, now_ms: u64) -> bool {
    let retention_ms = shared
        .config
        .compaction_retention_ms_of(event.namespace.as_str());
    now_ms.saturating_sub(event.hlc.physical_ms()) >= retention_ms
}

fn closed_or_failed(shared: &Shared) -> WriteError {
    shared
        .health
        .failure
        .get()
        .map_or(WriteError::Closed, |f| WriteError::Storage(f.clone()))
}

/// Runs a future to completion on this thread. Compaction blocks its caller and talks
/// to the writer through async channels; this works on any thread, in a runtime or
/// not (tokio's own blocking receive refuses to run inside one).
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use asp_core::{ContentType, Key};

    use super::*;
    use crate::codec::IndexEntry;
    use crate::config::StoreConfig;
    use crate::types::WriteOp;

    fn entry(store: &Store) -> IndexEntry {
        let key = codec::index_key("app", "k");
        store.inner.shared.index.get(&key).unwrap().unwrap()
    }

    fn event_at(store: &Store, position: LogPosition) -> Event {
        store.inner.shared.log.read_at(position).unwrap().event
    }

    async fn relocate(store: &Store, event: Event, from: LogPosition) {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.relocate(vec![(event, from)], 0))
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_compaction_in_progress_shows_how_far_it_has_got() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig::new(dir.path());
        config.segment_bytes_max = 1 << 20;
        config.compaction_retention_ms = 0;
        let store = Store::open(config).unwrap();
        let namespace = Namespace::new("app").unwrap();
        // Three rounds over the same keys: whole segments of superseded values.
        for round in 0..3 {
            for chunk in 0..10 {
                let ops = (0..100)
                    .map(|i| {
                        WriteOp::put(
                            Key::new(&format!("k{chunk}-{i}")).unwrap(),
                            ContentType::Text,
                            format!("{round}").repeat(1500),
                        )
                    })
                    .collect();
                store.write(namespace.clone(), ops).await.unwrap();
            }
        }
        store.caught_up().await.unwrap();
        assert!(store.operations().is_empty());
        // A reader in the segment gate holds compaction at its first segment drop.
        let gate = store.inner.shared.maintenance.segment_gate.read().unwrap();
        let running = {
            let store = store.clone();
            std::thread::spawn(move || store.compact().unwrap())
        };
        let mut seen = None;
        for _ in 0..6000 {
            if let Some(op) = store.operations().into_iter().next() {
                seen = Some(op);
                break;
            }
            assert!(
                !running.is_finished(),
                "compaction ended without showing itself"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let Some(seen) = seen else {
            drop(gate);
            panic!("no compaction shown in 30 s");
        };
        assert_eq!((seen.kind, seen.unit), ("compaction", "segments"));
        assert!(seen.total >= 4, "{seen:?}");
        assert!(seen.done < seen.total, "{seen:?}");
        drop(gate);
        let report = running.join().unwrap();
        assert!(report.segments_removed > 0, "{report:?}");
        assert!(store.operations().is_empty(), "gone once it ended");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_takes_over_only_from_the_copy_the_index_points_at() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        let namespace = Namespace::new("app").unwrap();
        let put = |v: &str| WriteOp::put(Key::new("k").unwrap(), ContentType::Text, v.repeat(100));
        store
            .write(namespace.clone(), vec![put("a")])
            .await
            .unwrap();
        store.caught_up().await.unwrap();
        let old = entry(&store);
        store
            .write(namespace.clone(), vec![put("b")])
            .await
            .unwrap();
        store.caught_up().await.unwrap();
        let current = entry(&store);
        let events_written = store.metrics().events_written.get();

        // A copy of a superseded version, and a copy of the current version sent as
        // if from a position the index does not hold: the index stays.
        relocate(&store, event_at(&store, old.position), old.position).await;
        relocate(&store, event_at(&store, current.position), old.position).await;
        assert_eq!(entry(&store), current);
        assert_eq!(store.head().seq, 4, "both copies were appended");

        // From the position the index holds: it moves to the copy, same version.
        relocate(&store, event_at(&store, current.position), current.position).await;
        let moved = entry(&store);
        assert_eq!(moved.version(), current.version());
        assert_ne!(moved.position, current.position);
        assert_eq!(moved.seq, 5);
        assert_eq!(
            event_at(&store, moved.position),
            event_at(&store, current.position)
        );
        let value = store.get(&namespace, "k").unwrap().unwrap().value.unwrap();
        assert_eq!(value.bytes, "b".repeat(100));
        assert_eq!(store.metrics().events_written.get(), events_written);
    }
}
