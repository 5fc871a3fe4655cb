//! What the peer links (`asp-node`'s link and reconciler) call: applying events from
//! peers, summaries and the vector reports they gossip, reconciliation windows and
//! items, the events behind them, and per-peer checkpoints.

use std::collections::HashMap;

use asp_core::reconcile::{Item, ItemKey, Symbol, Window};
use asp_core::session::{GOSSIP_BYTES_MAX, NamespaceSummary, VectorReport};
use asp_core::{Event, Key, Namespace, NodeId};
use tokio::sync::oneshot;

use crate::codec::IndexEntry;
use crate::digest::{KeyIndex, Windows, namespace_items, window_len};
use crate::error::{ReadError, WriteError};
use crate::key_hashes::{self, KeyHashes};
use crate::types::ApplyOutcome;
use crate::writer::{ApplyRequest, Request, Shared};
use crate::{codec, validate, writer};

use super::Store;

/// Index entries [`EventPage`] gathers before it reads their events together.
const PAGE_READS_AT_ONCE: usize = 256;

/// The events behind index entries, read for a peer: at most `limit`, and about
/// `bytes_max` bytes (the last event may pass it). Entries are gathered and their
/// events read [`PAGE_READS_AT_ONCE`] at a time ([`Shared::entry_events`]); those read
/// past a full page are left out ([`EventPage::finish`] says so).
struct EventPage {
    events: Vec<Event>,
    pending: Vec<(Vec<u8>, IndexEntry)>,
    /// The keys' and values' bytes of `pending`.
    pending_bytes: usize,
    bytes: usize,
    limit: usize,
    bytes_max: usize,
    /// Events were read past a full page and left out.
    overflowed: bool,
    failure: Option<ReadError>,
}

impl EventPage {
    fn new(limit: usize, bytes_max: usize) -> EventPage {
        EventPage {
            events: Vec::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            bytes: 0,
            limit,
            bytes_max,
            overflowed: false,
            failure: None,
        }
    }

    /// Full, counting only events already read (up to [`PAGE_READS_AT_ONCE`] entries
    /// gathered since may still be left out).
    fn is_full(&self) -> bool {
        self.overflowed || self.events.len() >= self.limit || self.bytes >= self.bytes_max
    }

    /// Gathers `index_key`'s entry, reading the gathered events when there are enough;
    /// `false` (stop the scan) if they cannot be read. The caller holds the segment
    /// gate.
    fn add(&mut self, shared: &Shared, index_key: &[u8], entry: &IndexEntry) -> bool {
        self.pending.push((index_key.to_vec(), entry.clone()));
        // Values' sizes are known from the entries: enough gathered to fill the page is
        // read at once, so that a small page reads little past its end.
        self.pending_bytes += index_key.len() + entry.value_len as usize;
        if self.pending.len() >= PAGE_READS_AT_ONCE
            || self.events.len() + self.pending.len() >= self.limit
            || self.bytes + self.pending_bytes >= self.bytes_max
        {
            self.read_pending(shared);
        }
        self.failure.is_none()
    }

    fn read_pending(&mut self, shared: &Shared) {
        if self.pending.is_empty() || self.failure.is_some() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        match shared.entry_events(&pending) {
            Ok(events) => {
                for event in events {
                    if self.is_full() {
                        self.overflowed = true;
                        break;
                    }
                    self.bytes += asp_core::session::credit_size(&event) as usize;
                    self.events.push(event);
                }
            }
            Err(e) => self.failure = Some(e),
        }
    }

    /// Reads what is gathered; returns the events and whether some were left out for
    /// want of room. The caller holds the segment gate.
    fn finish(mut self, shared: &Shared) -> Result<(Vec<Event>, bool), ReadError> {
        self.read_pending(shared);
        match self.failure {
            Some(e) => Err(e),
            None => Ok((self.events, self.overflowed)),
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

impl Store {
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
        if let Some(f) = self.inner.shared.health.failure.get() {
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
        let traced = crate::trace::traced_counters(&events);
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
        crate::trace::mark_counters(crate::trace::Hop::Queued, self.node_id(), &traced);
        Ok(answer)
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
                .unwrap_or_else(|_| self.inner.shared.window_keeper.windows.lock().unwrap());
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
            .indexer
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
            .indexer
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
        let gc = self.inner.shared.peers.gc.lock().unwrap();
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
                if report.wire_bytes() > budget {
                    report.vector = asp_core::VersionVector::new();
                }
                let bytes = report.wire_bytes();
                if bytes > budget {
                    break;
                }
                budget -= bytes;
                ns.reports.push(report);
            }
        }
        out
    }

    /// The other nodes that, by their newest reports (which travel through relays),
    /// hold every one of `dots` of `namespace`: for write concern.
    pub fn nodes_holding(&self, namespace: &Namespace, dots: &[asp_core::Dot]) -> Vec<NodeId> {
        self.inner
            .shared
            .peers
            .gc
            .lock()
            .unwrap()
            .holders(namespace, dots)
    }

    /// Takes in what a peer's summary reports of the nodes' vectors (its own among
    /// them): what tombstone collection waits for (see docs/CONFLICTS.md).
    pub fn note_reports(&self, summary: &[NamespaceSummary]) {
        let shared = &self.inner.shared;
        let me = shared.node_id;
        let namespaces = shared.indexer.namespaces.read().unwrap();
        let mut gc = shared.peers.gc.lock().unwrap();
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
            let claimed = shared
                .writer
                .counters
                .lock()
                .unwrap()
                .claim(&ns.namespace, held);
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
                    let mut found = shared.peers.own_events_found.lock().unwrap();
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
        shared.peers.own_events_learned.send_replace(true);
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
        let namespaces = self.inner.shared.indexer.namespaces.read().unwrap();
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
    pub fn note_contact(
        &self,
        peer: NodeId,
        namespaces: &[String],
        withhold: Option<asp_core::session::Withhold>,
    ) {
        let mut gc = self.inner.shared.peers.gc.lock().unwrap();
        gc.note_contact(peer, writer::wall_ms(), namespaces, withhold);
    }

    /// The key that turns (key, version) pairs into reconciliation items.
    pub fn item_key(&self) -> ItemKey {
        self.inner.shared.config.item_key
    }

    /// The key that authenticates context tokens (not the reconciliation key).
    pub fn context_key(&self) -> ItemKey {
        self.inner.shared.config.context_key
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
            .indexer
            .window_messages
            .load(std::sync::atomic::Ordering::Acquire);
        let mut windows = shared.window_keeper.windows.lock().unwrap();
        while windows.messages < messages {
            if let Some(failure) = shared.health.failure.get() {
                return Err(ReadError::Failed(failure.clone()));
            }
            windows = shared
                .window_keeper
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
            .indexer
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
        let item_key = shared.config.item_key;
        let prefix = codec::index_prefix(namespace.as_str());
        let matches = |key: &[u8]| -> bool {
            let hash = item_key.key_hash(key);
            let head: [u8; SHORTEST] = hash[..SHORTEST].try_into().expect("16 bytes");
            wanted
                .get(&head)
                .is_some_and(|c| c.iter().any(|p| hash.starts_with(p)))
        };
        let mut page = EventPage::new(limit, bytes_max);
        let mut stopped = false;
        if let Some(keys) = self.keys_by_hash(namespace, &wanted)? {
            let _gate = shared.maintenance.segment_gate.read().unwrap();
            let mut index_key = prefix.clone();
            for key in keys.iter().filter(|k| matches(k)) {
                index_key.truncate(prefix.len());
                index_key.extend_from_slice(key);
                // A key removed since the index took it in is not there: skipped.
                let Some(entry) = shared.index.get(&index_key)? else {
                    continue;
                };
                if page.is_full() {
                    stopped = true;
                    break;
                }
                if !page.add(shared, &index_key, &entry) {
                    break;
                }
            }
            let (events, overflowed) = page.finish(shared)?;
            return Ok((events, stopped || overflowed));
        }
        // Only a build this call started is this call's to finish (another may be
        // under way on `prepare_key_index`'s thread).
        let (mut build, build_id) = match self.start_key_index(namespace) {
            Some((hashes, id)) => (Some(hashes), Some(id)),
            None => (None, None),
        };
        let budget = shared.config.reconcile_key_index_bytes;
        let _gate = shared.maintenance.segment_gate.read().unwrap();
        let scanned = shared.index.scan(&prefix, None, |k, entry| {
            let key = &k[prefix.len()..];
            let hash = item_key.key_hash(key);
            if let Some(hashes) = &mut build {
                // Past the budget alone it could not be kept: the scan goes on without.
                if !hashes.insert(key_hashes::head(&hash), key) || hashes.bytes() > budget {
                    build = None;
                }
            }
            if stopped {
                // Full: the scan goes on only to finish the index.
                return build.is_some();
            }
            let head: [u8; SHORTEST] = hash[..SHORTEST].try_into().expect("16 bytes");
            let Some(candidates) = wanted.get(&head) else {
                return true;
            };
            if !candidates.iter().any(|p| hash.starts_with(p)) {
                return true;
            }
            if page.is_full() {
                stopped = true;
                return build.is_some();
            }
            page.add(shared, k, &entry)
        });
        let failed = scanned.is_err() || page.failure.is_some();
        if let Some(id) = build_id {
            self.finish_key_index(namespace, id, if failed { None } else { build });
        }
        scanned?;
        let (events, overflowed) = page.finish(shared)?;
        Ok((events, stopped || overflowed))
    }

    /// Builds `namespace`'s key-hash index on a thread of its own, if it is large enough
    /// to want one and has none: called when a peer's digest differs from this node's,
    /// so that the run that follows finds its keys without a pass over the namespace.
    pub fn prepare_key_index(&self, namespace: &Namespace) {
        let Some((mut hashes, id)) = self.start_key_index(namespace) else {
            return;
        };
        let store = self.clone();
        let name = namespace.clone();
        let spawned = std::thread::Builder::new()
            .name("asp-key-index".into())
            .spawn(move || {
                let shared = &store.inner.shared;
                let item_key = shared.config.item_key;
                let budget = shared.config.reconcile_key_index_bytes;
                let prefix = codec::index_prefix(name.as_str());
                let mut whole = true;
                let scanned = shared.index.scan(&prefix, None, |k, _| {
                    let key = &k[prefix.len()..];
                    let hash = item_key.key_hash(key);
                    whole = hashes.insert(key_hashes::head(&hash), key) && hashes.bytes() <= budget;
                    whole
                });
                let built = (scanned.is_ok() && whole).then_some(hashes);
                store.finish_key_index(&name, id, built);
            });
        if spawned.is_err() {
            // No thread: the run builds it during its own pass.
            self.finish_key_index(namespace, id, None);
        }
    }

    /// How many keys `namespace`'s key-hash index holds; `None` while it has no index
    /// ready (see `reconcile_key_index_bytes`).
    pub fn key_index_len(&self, namespace: &Namespace) -> Option<usize> {
        let windows = self.inner.shared.window_keeper.windows.lock().unwrap();
        match &windows.by_namespace.get(namespace)?.hashes {
            KeyIndex::Ready(hashes) => Some(hashes.len()),
            _ => None,
        }
    }

    /// Memory held by key-hash indexes over all namespaces, approximately.
    pub fn key_index_bytes(&self) -> usize {
        let windows = self.inner.shared.window_keeper.windows.lock().unwrap();
        windows
            .indexed
            .iter()
            .filter_map(|ns| Some(windows.by_namespace.get(ns)?.hashes.hashes()?.bytes()))
            .sum()
    }

    /// The keys of `namespace` whose hashes start with a wanted head (in key order),
    /// from its key-hash index, or `None` if it has none ready or a wanted prefix is
    /// shorter than an index head.
    fn keys_by_hash(
        &self,
        namespace: &Namespace,
        wanted: &HashMap<[u8; 4], Vec<&[u8]>>,
    ) -> Result<Option<Vec<Vec<u8>>>, ReadError> {
        let shared = &self.inner.shared;
        if shared.config.reconcile_window == 0 || shared.config.reconcile_key_index_bytes == 0 {
            return Ok(None);
        }
        if wanted.values().flatten().any(|p| p.len() < 8) {
            return Ok(None);
        }
        // Caught up, the index holds every key the key index held at `await_index`.
        let mut windows = self.caught_up_windows()?;
        windows.index_uses += 1;
        let uses = windows.index_uses;
        let Some(digest) = windows.by_namespace.get_mut(namespace) else {
            return Ok(None);
        };
        let KeyIndex::Ready(hashes) = &mut digest.hashes else {
            return Ok(None);
        };
        hashes.last_used = uses;
        let mut keys: Vec<Vec<u8>> = wanted
            .values()
            .flatten()
            .flat_map(|p| hashes.get(key_hashes::head(p)))
            .map(|k| k.to_vec())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        shared.metrics.key_index_lookups.inc();
        Ok(Some(keys))
    }

    /// Marks `namespace`'s key-hash index as building and returns the index for the
    /// caller's scan to fill and the build's number, if the namespace is large enough
    /// to want one and has none.
    fn start_key_index(&self, namespace: &Namespace) -> Option<(KeyHashes, u64)> {
        let shared = &self.inner.shared;
        if shared.config.reconcile_window == 0 || shared.config.reconcile_key_index_bytes == 0 {
            return None;
        }
        let mut windows = shared.window_keeper.windows.lock().unwrap();
        let building = windows
            .indexed
            .iter()
            .filter(|ns| {
                windows
                    .by_namespace
                    .get(*ns)
                    .is_some_and(|d| matches!(d.hashes, KeyIndex::Building(..)))
            })
            .count();
        if building >= key_hashes::KEY_HASHES_BUILDS_MAX {
            return None;
        }
        let digest = windows.by_namespace.get_mut(namespace)?;
        if !matches!(digest.hashes, KeyIndex::None)
            || digest.window.items() < key_hashes::KEY_HASHES_MIN_KEYS
        {
            return None;
        }
        windows.index_uses += 1;
        let id = windows.index_uses;
        let digest = windows.by_namespace.get_mut(namespace).expect("read above");
        digest.hashes = KeyIndex::Building(KeyHashes::default(), id);
        windows.indexed.insert(namespace.clone());
        Some((KeyHashes::default(), id))
    }

    /// Joins build `id`, finished (`None`: given up), with what the window keeper added
    /// meanwhile, and marks the index ready.
    fn finish_key_index(&self, namespace: &Namespace, id: u64, built: Option<KeyHashes>) {
        let shared = &self.inner.shared;
        let mut windows = shared.window_keeper.windows.lock().unwrap();
        windows.index_uses += 1;
        let uses = windows.index_uses;
        let Some(digest) = windows.by_namespace.get_mut(namespace) else {
            return;
        };
        if !matches!(digest.hashes, KeyIndex::Building(_, building) if building == id) {
            // Evicted meanwhile (and perhaps started again: not this call's build).
            return;
        }
        match (built, std::mem::take(&mut digest.hashes)) {
            (Some(built), KeyIndex::Building(mut kept, _)) => {
                kept.absorb(&built);
                kept.last_used = uses;
                digest.hashes = KeyIndex::Ready(kept);
                shared.metrics.key_index_builds.inc();
                windows.fit_key_indexes(shared.config.reconcile_key_index_bytes);
            }
            _ => {
                windows.indexed.remove(namespace);
            }
        }
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
        let _gate = shared.maintenance.segment_gate.read().unwrap();
        shared.index.scan(&prefix, start.as_deref(), |k, entry| {
            if page.is_full() {
                more = true;
                return false;
            }
            page.add(shared, k, &entry)
        })?;
        let (out, overflowed) = page.finish(shared)?;
        let next = if more || overflowed {
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

    /// The feed position through which connector `name` has sent this node's feed out
    /// (0 if never).
    pub fn connector_position(&self, name: &str) -> u64 {
        self.inner
            .shared
            .index
            .connector_position(name)
            .unwrap_or(0)
    }

    /// Records how far connector `name` has sent the feed out. Not fsynced: losing it
    /// means sending a little of the feed again (the sink dedupes by dot).
    pub fn save_connector_position(&self, name: &str, seq: u64) -> Result<(), ReadError> {
        Ok(self.inner.shared.index.save_connector_position(name, seq)?)
    }
}

#[cfg(test)]
mod key_index_tests {
    use super::*;
    use crate::{StoreConfig, WriteOp};
    use asp_core::ContentType;

    /// 5,000 keys into `ns`: past the size where namespaces get an index.
    async fn write_keys(store: &Store, ns: &Namespace) {
        let ops: Vec<WriteOp> = (0..5000)
            .map(|i| {
                WriteOp::put(
                    Key::new(&format!("k{i}")).unwrap(),
                    ContentType::Text,
                    bytes::Bytes::from_static(b"v"),
                )
            })
            .collect();
        store.write(ns.clone(), ops).await.unwrap();
    }

    // Guards against: a build evicted while it scanned, then started again, being
    // finished by the first scan; keys added while the namespace had no index would
    // be missing from an index marked ready, and runs trust its misses.
    #[tokio::test]
    async fn an_evicted_build_does_not_finish_the_one_started_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        let ns = Namespace::new("big").unwrap();
        write_keys(&store, &ns).await;
        store.summary();
        let (first, first_id) = store.start_key_index(&ns).expect("large enough");
        {
            // Evicted, as the budget does.
            let mut windows = store.inner.shared.window_keeper.windows.lock().unwrap();
            windows.by_namespace.get_mut(&ns).unwrap().hashes = KeyIndex::None;
            windows.indexed.remove(&ns);
        }
        let (_, second_id) = store.start_key_index(&ns).expect("none again");
        store.finish_key_index(&ns, first_id, Some(first));
        assert_eq!(
            store.key_index_len(&ns),
            None,
            "not the first scan's to finish"
        );
        store.finish_key_index(&ns, second_id, Some(KeyHashes::default()));
        assert_eq!(store.key_index_len(&ns), Some(0));
    }

    // Guards against: a thread (and up to the budget of memory) per namespace whose
    // digest differs, all at once.
    #[tokio::test]
    async fn at_most_two_builds_run_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        let names: Vec<Namespace> = (0..3)
            .map(|i| Namespace::new(&format!("big{i}")).unwrap())
            .collect();
        for ns in &names {
            write_keys(&store, ns).await;
        }
        store.summary();
        let (_, first) = store.start_key_index(&names[0]).expect("a first build");
        let (_, _second) = store.start_key_index(&names[1]).expect("a second build");
        assert!(store.start_key_index(&names[2]).is_none(), "a third waits");
        store.finish_key_index(&names[0], first, Some(KeyHashes::default()));
        assert!(
            store.start_key_index(&names[2]).is_some(),
            "one finished: room again"
        );
    }
}

#[cfg(test)]
mod page_tests;
