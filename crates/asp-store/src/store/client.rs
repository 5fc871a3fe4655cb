//! What the HTTP API's handlers (`asp-http`'s routes) call: writes, reads of keys and
//! listings, CRDT state, and the change feed. The peer links read the feed here too,
//! through [`FeedReader`], [`Store::subscribe`] and [`Store::head`].

use std::sync::Arc;
use std::time::Instant;

use asp_core::crdt::{Policy, State};
use asp_core::{Key, Namespace};
use tokio::sync::{oneshot, watch};

use crate::codec;
use crate::codec::IndexEntry;
use crate::error::{ReadError, WriteError};
use crate::log::{FeedHead, LogCursor};
use crate::queue::TrySendError;
use crate::types::{
    Applied, ChangesPage, FeedEvent, KeyState, NamespaceStats, ScanItem, ScanPage, Value,
    WriteKind, WriteOp,
};
use crate::writer::{Request, Shared, WriteRequest};

use super::Store;

/// The longest time to live a put may ask for: ten years, in milliseconds.
pub const TTL_MS_MAX: u64 = 10 * 365 * 24 * 60 * 60 * 1000;
/// The most keys one listing returns.
pub const SCAN_LIMIT_MAX: usize = 1000;
/// The most events one change-feed page returns.
pub const CHANGES_LIMIT_MAX: usize = 10_000;
/// Deleted keys a listing steps over before returning a short page.
const SCAN_TOMBSTONES_MAX: usize = 10_000;
/// About this many bytes of events per feed page.
const FEED_PAGE_BYTES_MAX: usize = 4 << 20;

impl Store {
    /// Applies `ops` to `namespace` as one atomic batch and returns, in order, what
    /// each operation became. Returns once the batch is as durable as the fsync mode
    /// promises. Waits for room when the writer is busy; fails with
    /// [`WriteError::Overloaded`] past `write_queue_wait`.
    pub async fn write(
        &self,
        namespace: Namespace,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<Applied>, WriteError> {
        self.write_fenced(namespace, ops, None).await
    }

    /// [`Store::write`] with `checkpoint` (a put of its own namespace and key) in the
    /// same atomic step: after a crash either both are in the log or neither is. What a
    /// connector stores its source position with, so that a message is applied once.
    /// The batch's namespace must use the `lww` policy. The checkpoint's value is a JSON
    /// object; the store adds to it the member `batch`, `{"namespace", "origin",
    /// "first", "count"}`: the dots `first..first+count` of `origin` the batch gets.
    pub async fn write_with_checkpoint(
        &self,
        namespace: Namespace,
        ops: Vec<WriteOp>,
        checkpoint: crate::types::Checkpoint,
    ) -> Result<Vec<Applied>, WriteError> {
        if checkpoint.namespace == namespace {
            return Err(WriteError::Invalid(
                "a checkpoint goes to another namespace than its batch".into(),
            ));
        }
        if serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&checkpoint.value)
            .is_err()
        {
            return Err(WriteError::Invalid(
                "a checkpoint's value is a JSON object".into(),
            ));
        }
        self.submit(namespace, ops, None, Some(checkpoint)).await
    }

    /// [`Store::write`], applied only if `fence` names the newest token of its lease
    /// (checked in the writer, in the same step as the write).
    pub async fn write_fenced(
        &self,
        namespace: Namespace,
        ops: Vec<WriteOp>,
        fence: Option<crate::Fence>,
    ) -> Result<Vec<Applied>, WriteError> {
        self.submit(namespace, ops, fence, None).await
    }

    async fn submit(
        &self,
        namespace: Namespace,
        ops: Vec<WriteOp>,
        fence: Option<crate::Fence>,
        checkpoint: Option<crate::types::Checkpoint>,
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
                WriteKind::Put { value, ttl_ms, .. } => {
                    if *ttl_ms > TTL_MS_MAX {
                        return Err(WriteError::Invalid(format!(
                            "the time to live of key {:?} is {ttl_ms} ms; the limit is {TTL_MS_MAX} ms (ten years)",
                            op.key.as_str()
                        )));
                    }
                    value.len()
                }
                WriteKind::Delete | WriteKind::Expire { .. } => 0,
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
        if let Some(c) = &checkpoint {
            if c.value.len() > config.value_bytes_max {
                return Err(WriteError::TooLarge(format!(
                    "the checkpoint is {} bytes; the limit is {} (value_bytes_max)",
                    c.value.len(),
                    config.value_bytes_max
                )));
            }
            bytes += c.key.as_str().len() + c.value.len() + 64;
        }
        if bytes > config.write_queue_bytes_max {
            return Err(WriteError::TooLarge(format!(
                "the batch is {bytes} bytes; the limit is {} (write_queue_bytes_max)",
                config.write_queue_bytes_max
            )));
        }
        if let Some(f) = self.inner.shared.health.failure.get() {
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
            fence,
            checkpoint,
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
        if *shared.peers.own_events_learned.borrow() {
            return;
        }
        let deadline = self.inner.opened + shared.config.own_events_wait;
        let mut rx = shared.peers.own_events_learned.subscribe();
        let learned = tokio::time::timeout_at(deadline.into(), rx.wait_for(|l| *l)).await;
        if learned.is_err() && !shared.peers.own_events_learned.send_replace(true) {
            tracing::warn!(
                waited_ms = shared.config.own_events_wait.as_millis() as u64,
                "no peer answered since the store opened; local writes go on without knowing which of this node's events peers hold (if this data directory was restored from an older copy, reconciliation repairs the keys whose counters collide)"
            );
        }
    }

    /// The state of a key of a CRDT namespace: the join of every origin's latest
    /// state of it (`None` if nothing was ever written to it).
    pub fn crdt_state(&self, namespace: &Namespace, key: &str) -> Result<Option<State>, ReadError> {
        self.inner.shared.await_index().map_err(ReadError::Failed)?;
        let _gate = self.inner.shared.maintenance.segment_gate.read().unwrap();
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
        let _gate = shared.maintenance.segment_gate.read().unwrap();
        let Some(entry) = shared
            .index
            .get(&codec::index_key(namespace.as_str(), key))?
        else {
            return Ok(None);
        };
        // An expired key reads as deleted until its delete arrives.
        let value = match entry.content_type {
            None => None,
            Some(_) if entry.expired_at(self.now_ms(namespace)) => None,
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

    /// The clock reading expiry is judged by for `namespace`: the wall clock, or the
    /// newest reading of any event the namespace holds if that is later (the node's
    /// clock is at least that), so that a node whose wall clock lags still hides a key
    /// once it has seen writes from past the key's expiry.
    pub fn now_ms(&self, namespace: &Namespace) -> u64 {
        let newest = self
            .inner
            .shared
            .indexer
            .namespaces
            .read()
            .unwrap()
            .get(namespace)
            .map_or(0, |s| s.max_hlc.physical_ms());
        crate::clock::wall_ms().max(newest)
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
        let _gate = with_values.then(|| self.inner.shared.maintenance.segment_gate.read().unwrap());
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
        let now = self.now_ms(namespace);
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
                let Some(content_type) = entry.content_type.filter(|_| !entry.expired_at(now))
                else {
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

    /// Counts a namespace's keys from the index: keys that hold a value, keys deleted
    /// (or expired) whose entry is still held, and the bytes of the values held (for a
    /// CRDT namespace, of its entries' states). Stops after `entries_max` index entries;
    /// `complete` says whether it saw them all.
    pub fn namespace_stats(
        &self,
        namespace: &Namespace,
        entries_max: usize,
    ) -> Result<NamespaceStats, ReadError> {
        self.inner.shared.await_index().map_err(ReadError::Failed)?;
        let ns_prefix_len = 1 + namespace.as_str().len();
        let full_prefix = codec::index_key(namespace.as_str(), "");
        let policy = self.policy(namespace);
        let crdt = policy != Policy::Lww;
        let siblings = policy == Policy::Siblings;
        let now = self.now_ms(namespace);
        let mut stats = NamespaceStats {
            complete: true,
            ..NamespaceStats::default()
        };
        let mut entries = 0usize;
        // The key being counted (a CRDT key has an entry per origin) and whether any
        // of its entries holds a value.
        let mut current: Option<(Vec<u8>, bool)> = None;
        let shared = &self.inner.shared;
        let mut failed = None;
        let mut close = |stats: &mut NamespaceStats, key: Option<(Vec<u8>, bool)>| match key {
            Some((k, true)) => {
                stats.keys += 1;
                // A siblings key holds concurrent values when its joined state does.
                if siblings {
                    let key = String::from_utf8_lossy(&k[ns_prefix_len..]);
                    let mut state = State::Siblings(Default::default());
                    match shared.join_crdt_entries(namespace.as_str(), &key, &mut state) {
                        Ok(_) => {
                            if let State::Siblings(r) = &state
                                && r.siblings().len() > 1
                            {
                                stats.keys_with_siblings += 1;
                            }
                        }
                        Err(e) => failed = Some(e),
                    }
                }
            }
            Some((_, false)) => stats.deleted_keys += 1,
            None => {}
        };
        self.inner
            .shared
            .index
            .scan(&full_prefix, None, |k, entry| {
                if entries == entries_max {
                    stats.complete = false;
                    return false;
                }
                entries += 1;
                let k = if crdt {
                    let end = k[ns_prefix_len..]
                        .iter()
                        .position(|&b| b == codec::CRDT_SEPARATOR)
                        .map_or(k.len(), |p| ns_prefix_len + p);
                    &k[..end]
                } else {
                    k
                };
                let live = entry.content_type.is_some() && !entry.expired_at(now);
                if live {
                    stats.value_bytes += u64::from(entry.value_len);
                }
                match &mut current {
                    Some((key, any)) if key.as_slice() == k => *any |= live,
                    _ => {
                        close(&mut stats, current.take());
                        current = Some((k.to_vec(), live));
                    }
                }
                true
            })?;
        close(&mut stats, current.take());
        match failed {
            Some(e) => Err(e),
            None => Ok(stats),
        }
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
            epochs_and_prefix: None,
            since,
        }
    }

    /// A reader of the feed after `since` that returns only events that carry an epoch
    /// (leader namespaces) and events of namespaces starting with `prefix`; the others
    /// are told from their record's head and never decoded.
    pub fn feed_reader_of_epochs_and(&self, prefix: &str, since: u64) -> FeedReader {
        FeedReader {
            epochs_and_prefix: Some(prefix.to_owned()),
            ..self.feed_reader(None, since)
        }
    }

    /// The last visible feed position, as it changes.
    pub fn subscribe(&self) -> watch::Receiver<FeedHead> {
        self.inner.shared.head_tx.subscribe()
    }

    pub fn head(&self) -> FeedHead {
        *self.inner.shared.head_tx.borrow()
    }
}

/// Reads the feed from a position onwards, keeping its place.
pub struct FeedReader {
    shared: Arc<Shared>,
    cursor: LogCursor,
    namespace: Option<Namespace>,
    epochs_and_prefix: Option<String>,
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
        let filter = match (&self.namespace, &self.epochs_and_prefix) {
            (Some(ns), _) => crate::log::ReadFilter::Namespace(ns.as_str()),
            (None, Some(prefix)) => crate::log::ReadFilter::EpochOrPrefix(prefix),
            (None, None) => crate::log::ReadFilter::All,
        };
        let records = self.shared.log.read(
            &mut self.cursor,
            head,
            filter,
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
