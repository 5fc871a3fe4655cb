//! Reconciliation on a peer link: anti-entropy, and the handover of a peer that needs
//! what this node's feed no longer holds.
//!
//! One side, the *initiator*, streams the coded symbols of its snapshot of a
//! namespace; the *responder* subtracts its own symbols and peels the difference
//! (`asp_core::reconcile`) until it decodes, then names the keys it needs and sends
//! the keys the initiator lacks; the initiator sends what was named. Both end with a
//! `RepairEnd`. In `Transfer` mode the initiator sends its whole state instead of
//! symbols (the peer holds nothing of it). The frames are in `docs/PROTOCOL.md`.
//!
//! Runs are driven from the link task: everything here is a method on [`Link`] that
//! does a bounded step of work and returns.
//!
//! Size: both roles of one exchange (initiator and responder, each in window, full
//! and transfer mode) as steps of one state machine on [`Link`]; split the roles into
//! files of their own if either grows further.

use std::collections::VecDeque;
use std::time::Instant;

use asp_core::reconcile::{Decoder, Extension, Side, Symbol};
use asp_core::session::{
    ErrorCode, Frame, NEED_PREFIX_BYTES, RECONCILE_INITIAL_SYMBOLS, ReconcileMode, ReconcileOutcome,
};
use asp_core::{Event, Key, Namespace, VersionVector};
use asp_store::{ReadError, Store};

use super::Link;
use crate::metrics::ReconcileLabels;
use crate::registry::{LastReconcile, peer_labels};

/// Symbols per `ReconcileSymbols` frame, at most.
const SYMBOLS_PER_FRAME: usize = 1024;
/// Events per `Repair` frame, at most (frames are also bounded in bytes).
const REPAIR_EVENTS_PER_FRAME: usize = 2048;
/// Keys (and bytes of them) repaired in one direction of one run, at most: a larger
/// difference is repaired by the next run, not held in memory at once. A run cut
/// short claims nothing for the peer's vector and skips no part of the stream.
const REPAIR_KEYS_MAX: usize = 1 << 18;
const REPAIR_BYTES_MAX: usize = 256 << 20;
/// Symbols a responder accepts in one run, at most (its decoder's memory).
const SYMBOLS_MAX: u64 = 8 << 20;
/// The least a responder grants ahead of the symbols it has received.
const RECONCILE_LOOKAHEAD_MIN: u64 = 128;
/// A `Full` run gives up past this many symbols per item held by both sides.
const FULL_SYMBOLS_PER_ITEM: u64 = 3;

/// Why a run started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// The periodic anti-entropy check found digests that differ.
    AntiEntropy,
    /// The peer lacks dots this node compacted away: its state is brought up to date
    /// by reconciliation, and the stream then resumes from the snapshots' position.
    Handover,
}

impl Trigger {
    pub fn name(self) -> &'static str {
        match self {
            Trigger::AntiEntropy => "anti_entropy",
            Trigger::Handover => "handover",
        }
    }
}

/// Where an initiator's symbols come from.
enum Source {
    Window(Vec<Symbol>),
    Scan(Box<Extension>),
    None,
}

/// A run this node started.
struct Outgoing {
    id: u32,
    namespace: Namespace,
    mode: ReconcileMode,
    trigger: Trigger,
    source: Source,
    symbols_sent: u64,
    symbols_allowed: u64,
    symbols_max: u64,
    /// Transfer mode: the key to continue after, and whether all was read.
    transfer_after: Option<Key>,
    transfer_done: bool,
    repairs: Repairs,
    peer_ended: bool,
    /// Whether every repair the peer needs was sent (else no part of the stream may
    /// be skipped for this run).
    complete: bool,
    differences: u64,
    keys_repaired: u64,
    started: Instant,
}

/// A run the peer started: this node decodes.
struct Incoming {
    id: u32,
    namespace: Namespace,
    mode: ReconcileMode,
    local: Source,
    decoder: Decoder,
    symbols_max: u64,
    granted: u64,
    ended: bool,
    repairs: Repairs,
    peer_ended: bool,
    differences: u64,
    keys_repaired: u64,
    started: Instant,
}

/// What one side of a run sends after the symbols: repair events, then `RepairEnd`.
struct Repairs {
    /// Events to send; `ready` once the list is complete.
    queue: VecDeque<Event>,
    ready: bool,
    sent_end: bool,
    /// This node's vector before its snapshot: sent in `RepairEnd` (empty: none).
    covered: VersionVector,
}

impl Repairs {
    fn new(covered: VersionVector) -> Repairs {
        Repairs {
            queue: VecDeque::new(),
            ready: false,
            sent_end: false,
            covered,
        }
    }

    /// Whether there is something to send now.
    fn pending(&self, credit: i64) -> bool {
        self.ready && !self.sent_end && (self.queue.is_empty() || credit > 0)
    }

    /// The repairs are known: `events`, or, if they were cut short, `events` with no
    /// claim on the peer's vector.
    fn set(&mut self, events: Vec<Event>, complete: bool) {
        self.queue = events.into();
        self.ready = true;
        if !complete {
            self.covered = VersionVector::default();
        }
    }

    /// Sends the next batch of run `id`'s repairs within credit, or its `RepairEnd`
    /// once none is left; returns whether the `RepairEnd` went now.
    fn send(
        &mut self,
        id: u32,
        namespace: &Namespace,
        session: &mut asp_core::session::Session,
        covered_sent: &mut std::collections::HashMap<Namespace, VersionVector>,
        bytes_max: usize,
        now: Instant,
    ) -> bool {
        if !self.ready || self.sent_end {
            return false;
        }
        if self.queue.is_empty() {
            self.sent_end = true;
            let covered = Some(self.covered.clone()).filter(|v| !v.is_empty());
            if let Some(v) = &covered {
                covered_sent.entry(namespace.clone()).or_default().join(v);
            }
            session.send_reconcile(Frame::RepairEnd { id, covered }, now);
            return true;
        }
        if session.credit() > 0 {
            let batch = take_batch(&mut self.queue, bytes_max);
            session.send_repair(id, batch, now);
        }
        false
    }
}

/// The reconciliation state of one link.
#[derive(Default)]
pub(crate) struct Reconciler {
    next_id: u32,
    outgoing: Option<Outgoing>,
    incoming: Option<Incoming>,
    /// Namespaces waiting for a run this node starts, in order.
    queue: VecDeque<(Namespace, Trigger)>,
    /// A handover's runs are under way.
    handover: bool,
    /// Where the stream to the peer skips to when a handover starts: the feed head
    /// then, which every run's snapshot covers (they are taken after it).
    skip_to: Option<u64>,
    /// Runs of this handover that failed and were queued again.
    handover_retries: u32,
    /// A run of this handover failed for good: anti-entropy repairs what it missed.
    handover_failed: bool,
    /// Compacted dots this node told the peer it now holds the effect of: the peer's
    /// summaries may predate that.
    covered_sent: std::collections::HashMap<Namespace, VersionVector>,
    /// Namespaces whose digest differed from the peer's at the last check: a run
    /// starts when it differs at two checks in a row (a summary taken while the
    /// peer was still applying would otherwise start runs that find nothing).
    differed: std::collections::HashSet<Namespace>,
    /// Tests only: a transfer waits for the configured gate.
    pub gate_closed: bool,
}

impl Reconciler {
    /// Whether the feed stream must wait (a handover's skip is not sent yet).
    pub fn holds_stream(&self) -> bool {
        self.skip_to.is_some()
    }

    /// Whether there is work to do without waiting for the peer.
    pub fn has_work(&self, credit: i64) -> bool {
        if self.gate_closed {
            return false;
        }
        if self.skip_to.is_some() && credit > 0 {
            return true; // The skip is a (free) Events frame, sent with credit > 0.
        }
        if self.handover && self.outgoing.is_none() && self.queue.is_empty() {
            return true;
        }
        let out = self.outgoing.as_ref().is_some_and(|o| {
            (matches!(o.source, Source::Window(_) | Source::Scan(_))
                && !o.repairs.sent_end
                && o.symbols_sent < o.symbols_allowed.min(o.symbols_max))
                || (o.mode == ReconcileMode::Transfer && !o.transfer_done && credit > 0)
                || o.repairs.pending(credit)
        });
        let inc = self
            .incoming
            .as_ref()
            .is_some_and(|i| i.repairs.pending(credit));
        out || inc || (self.outgoing.is_none() && !self.queue.is_empty())
    }

    pub fn is_idle(&self) -> bool {
        self.outgoing.is_none() && self.incoming.is_none() && self.queue.is_empty()
    }

    fn queued(&self, namespace: &Namespace) -> bool {
        self.queue.iter().any(|(n, _)| n == namespace)
            || self
                .outgoing
                .as_ref()
                .is_some_and(|o| &o.namespace == namespace)
    }
}

/// Runs a blocking store call off the async runtime.
async fn blocking<T: Send + 'static>(
    store: &Store,
    f: impl FnOnce(&Store) -> Result<T, ReadError> + Send + 'static,
) -> Result<T, String> {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(format!("store task failed: {e}")),
    }
}

impl Link {
    /// The periodic anti-entropy check: queues a run for every namespace whose digest
    /// differs from the peer's, when this node is the initiator of the pair (the
    /// smaller node id) and the link has nothing of its own in flight.
    pub(super) fn anti_entropy_tick(&mut self) {
        let Some(peer) = self.peer else { return };
        if self.inner.node_id > peer || !self.session.is_established() {
            return;
        }
        let idle = self.caught_up && self.applying.is_empty() && self.reconciler.is_idle();
        let store = &self.inner.store;
        let mine: crate::registry::PeerSummary = store
            .summary()
            .into_iter()
            .map(|s| (s.namespace.clone(), s))
            .collect();
        let theirs = self.with_record(|p| p.summary.clone()).unwrap_or_default();
        let mut names: Vec<Namespace> = mine.keys().cloned().collect();
        names.extend(theirs.keys().cloned());
        names.sort();
        names.dedup();
        for ns in names {
            if !self.session.peer_wants(&ns) || self.reconciler.queued(&ns) {
                continue;
            }
            // Quarantined events make the digests differ by design until an operator
            // resolves them; runs would find the difference every time.
            if store.is_quarantined(&ns) {
                continue;
            }
            let a = mine.get(&ns);
            let b = theirs.get(&ns);
            let digest = |s: Option<&asp_core::session::NamespaceSummary>| {
                s.and_then(|s| s.digest.map(|d| d.canonical()))
                    .or(Some(Symbol::default()).filter(|_| s.is_none()))
            };
            let (da, db) = (digest(a), digest(b));
            if da.is_some() && da == db {
                self.reconciler.differed.remove(&ns);
                self.inner
                    .metrics
                    .reconcile_in_sync
                    .get_or_create(&peer_labels(peer))
                    .inc();
                self.with_record(|r| r.reconcile.in_sync_checks += 1);
                continue;
            }
            if idle && !self.reconciler.differed.insert(ns.clone()) {
                self.reconciler.differed.remove(&ns);
                self.reconciler.queue.push_back((ns, Trigger::AntiEntropy));
            }
        }
    }

    /// On a peer summary: if the peer lacks dots this node no longer has in its feed
    /// (compacted), the handover: the stream skips to the feed head, and every
    /// namespace shared with the peer is reconciled from snapshots taken after that
    /// point, while live events keep flowing by the stream.
    pub(super) fn check_handover(&mut self, summary: &crate::registry::PeerSummary) {
        if self.reconciler.handover {
            return;
        }
        let bases = self.inner.store.bases();
        let needs = bases.iter().any(|(ns, base)| {
            if !self.session.peer_wants(ns) || base.is_empty() {
                return false;
            }
            let mut theirs = summary
                .get(ns)
                .map(|s| s.vector.clone())
                .unwrap_or_default();
            if let Some(sent) = self.reconciler.covered_sent.get(ns) {
                theirs.join(sent);
            }
            !base.is_subset(&theirs)
        });
        // A peer that lacks its own events lost them (restored from an older copy, a
        // crash under fsync = never, a salvage): the stream will not send them again.
        let lost = self.peer.is_some_and(|peer| {
            self.inner.store.holds_lost_events_of(
                peer,
                |ns| summary.get(ns).map(|s| &s.vector),
                |ns| self.session.peer_wants(ns),
            )
        });
        if !needs && !lost {
            return;
        }
        let mut names: Vec<Namespace> = self
            .inner
            .store
            .summary()
            .into_iter()
            .map(|s| s.namespace)
            .filter(|ns| self.session.peer_wants(ns))
            .collect();
        names.sort();
        if lost {
            tracing::warn!(
                peer = ?self.peer,
                namespaces = names.len(),
                "the peer lacks events of its own that this node holds (it lost them: restored from an older copy, or a crash); handing them back by reconciliation"
            );
        } else {
            tracing::info!(
                peer = ?self.peer,
                namespaces = names.len(),
                "the peer lacks events compacted out of this node's feed: handing over by reconciliation"
            );
        }
        self.reconciler.handover = true;
        self.reconciler.skip_to = Some(self.inner.store.head().seq);
        self.reconciler.handover_retries = 0;
        self.reconciler.handover_failed = false;
        self.reconciler.queue.clear();
        for ns in names {
            self.reconciler.queue.push_back((ns, Trigger::Handover));
        }
    }

    /// Does the next bounded step of reconciliation work.
    pub(super) async fn reconcile_step(&mut self) {
        if self.reconciler.skip_to.is_some() && self.session.can_send() {
            self.skip_stream();
        }
        if self.reconciler.outgoing.is_none() {
            if let Some((ns, trigger)) = self.reconciler.queue.pop_front() {
                // A peer that holds nothing but its own writes (a new node, perhaps
                // already taking writes) is sent the whole state: decoding a
                // difference as large as the set would cost more.
                let summary = self.peer_summary(&ns);
                let peer_empty = summary
                    .as_ref()
                    .is_none_or(|v| v.iter().all(|(origin, _)| Some(origin) == self.peer));
                let mode = if trigger == Trigger::Handover && peer_empty {
                    ReconcileMode::Transfer
                } else if self.inner.store.config().reconcile_window > 0
                    && self.peer_keeps_windows()
                {
                    ReconcileMode::Window
                } else {
                    ReconcileMode::Full
                };
                self.start_outgoing(ns, mode, trigger).await;
            } else if self.reconciler.handover {
                self.finish_handover();
            }
        } else {
            self.outgoing_step().await;
        }
        self.incoming_step();
    }

    /// Whether the peer's summaries carry digests (it keeps windows).
    fn peer_keeps_windows(&self) -> bool {
        self.with_record(|r| r.summary.values().all(|s| s.digest.is_some()))
            .unwrap_or(false)
    }

    fn peer_summary(&self, ns: &Namespace) -> Option<VersionVector> {
        self.with_record(|r| r.summary.get(ns).map(|s| s.vector.clone()))
            .flatten()
    }

    async fn start_outgoing(
        &mut self,
        namespace: Namespace,
        mode: ReconcileMode,
        trigger: Trigger,
    ) {
        let store = self.inner.store.clone();
        let _ = store.caught_up().await;
        // The vector is read before the snapshot: every dot in it is then either in
        // the snapshot or superseded by something in it, so a peer that holds the
        // snapshot's state holds the effect of all of them.
        let covered = store.namespace_vector(&namespace);
        let ns = namespace.clone();
        let snapshot = match mode {
            ReconcileMode::Window => {
                blocking(&store, move |s| {
                    let (w, seq) = s.reconcile_snapshot(&ns)?;
                    Ok((
                        Source::Window(w.symbols().to_vec()),
                        w.items().max(0) as u64,
                        seq,
                    ))
                })
                .await
            }
            ReconcileMode::Full => {
                blocking(&store, move |s| {
                    let (items, seq) = s.reconcile_items_at(&ns)?;
                    let n = items.len() as u64;
                    let ext = Extension::new(s.item_key(), items, 0);
                    Ok((Source::Scan(Box::new(ext)), n, seq))
                })
                .await
            }
            ReconcileMode::Transfer => {
                // Each page is read after every write acknowledged before it: the
                // pages together hold at least the state as of this position.
                Ok((Source::None, 0, store.head().seq))
            }
        };
        let (source, items, _snapshot_seq) = match snapshot {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(peer = ?self.peer, namespace = %namespace, "cannot start a reconciliation: {e}");
                self.record_run(
                    &namespace,
                    mode,
                    trigger,
                    ReconcileOutcome::Failed,
                    0,
                    0,
                    0,
                    Instant::now(),
                    Some(e),
                );
                if trigger == Trigger::Handover {
                    self.retry_handover(namespace);
                }
                return;
            }
        };
        let symbols_max = match &source {
            Source::Window(w) => w.len() as u64,
            Source::Scan(_) => FULL_SYMBOLS_PER_ITEM * items + 1024,
            Source::None => 0,
        };
        self.reconciler.next_id = self.reconciler.next_id.wrapping_add(1);
        let id = self.reconciler.next_id;
        self.session.send_reconcile(
            Frame::ReconcileStart {
                id,
                namespace: namespace.clone(),
                mode,
                items,
                symbols_max,
            },
            Instant::now(),
        );
        tracing::debug!(peer = ?self.peer, namespace = %namespace, mode = mode.name(), trigger = trigger.name(), items, "reconciliation started");
        self.reconciler.outgoing = Some(Outgoing {
            id,
            namespace,
            mode,
            trigger,
            source,
            symbols_sent: 0,
            symbols_allowed: RECONCILE_INITIAL_SYMBOLS as u64,
            symbols_max,
            transfer_after: None,
            transfer_done: false,
            repairs: Repairs::new(covered),
            peer_ended: false,
            complete: true,
            differences: 0,
            keys_repaired: 0,
            started: Instant::now(),
        });
    }

    async fn outgoing_step(&mut self) {
        let now = Instant::now();
        let Some(o) = self.reconciler.outgoing.as_mut() else {
            return;
        };
        // Symbols, within the responder's credit.
        let limit = o.symbols_allowed.min(o.symbols_max);
        if !o.repairs.sent_end && !o.repairs.ready && o.symbols_sent < limit {
            let n = ((limit - o.symbols_sent) as usize).min(SYMBOLS_PER_FRAME);
            let first = o.symbols_sent;
            let symbols: Vec<Symbol> = match &mut o.source {
                Source::Window(w) => w[first as usize..first as usize + n].to_vec(),
                Source::Scan(ext) => (0..n).map(|_| ext.next_symbol()).collect(),
                Source::None => Vec::new(),
            };
            if !symbols.is_empty() {
                o.symbols_sent += symbols.len() as u64;
                if let Some(peer) = self.peer {
                    self.inner
                        .metrics
                        .reconcile_symbols
                        .get_or_create(&peer_labels(peer))
                        .inc_by(symbols.len() as u64);
                }
                let id = o.id;
                self.session.send_reconcile(
                    Frame::ReconcileSymbols {
                        id,
                        first_index: first,
                        symbols,
                    },
                    now,
                );
                return;
            }
        }
        // Transfer mode: the whole state, page by page, within credit.
        if o.mode == ReconcileMode::Transfer && !o.transfer_done && self.session.credit() > 0 {
            if o.transfer_after.is_some()
                && let Some(gate) = &self.inner.config.transfer_gate
            {
                match gate.try_acquire() {
                    Ok(permit) => permit.forget(),
                    Err(_) => {
                        // Held by a test: the link loop retries after a while.
                        self.reconciler.gate_closed = true;
                        return;
                    }
                }
            }
            let o = self.reconciler.outgoing.as_mut().expect("checked");
            let ns = o.namespace.clone();
            let after = o.transfer_after.clone();
            let bytes = (self.session.credit() as usize).min(self.inner.config.batch_bytes_max);
            let page = blocking(&self.inner.store, move |s| {
                s.state_events(&ns, after.as_ref(), REPAIR_EVENTS_PER_FRAME, bytes)
            })
            .await;
            let o = self.reconciler.outgoing.as_mut().expect("still running");
            match page {
                Ok((events, next)) => {
                    o.transfer_done = next.is_none();
                    o.transfer_after = next;
                    // Pages go straight out; once read to the end, only RepairEnd is left.
                    o.repairs.ready = o.transfer_done;
                    if !events.is_empty() {
                        self.session.send_repair(o.id, events, now);
                    }
                }
                Err(e) => self.fail_outgoing(e),
            }
            return;
        }
        let reconciler = &mut self.reconciler;
        let o = reconciler.outgoing.as_mut().expect("checked");
        let ended = o.repairs.send(
            o.id,
            &o.namespace,
            &mut self.session,
            &mut reconciler.covered_sent,
            self.inner.config.batch_bytes_max,
            now,
        );
        if ended {
            self.maybe_finish_outgoing();
        }
    }

    fn fail_outgoing(&mut self, error: String) {
        if let Some(o) = self.reconciler.outgoing.take() {
            tracing::warn!(peer = ?self.peer, namespace = %o.namespace, "reconciliation failed: {error}");
            self.record_run(
                &o.namespace,
                o.mode,
                o.trigger,
                ReconcileOutcome::Failed,
                o.symbols_sent,
                o.differences,
                o.keys_repaired,
                o.started,
                Some(error),
            );
            self.session.send_reconcile(
                Frame::ReconcileEnd {
                    id: o.id,
                    outcome: ReconcileOutcome::Failed,
                    need: Vec::new(),
                },
                Instant::now(),
            );
            if o.trigger == Trigger::Handover {
                self.retry_handover(o.namespace);
            }
        }
    }

    /// A run of the handover failed: queue it again, a few times; past that, the
    /// namespace is left to anti-entropy (its stream positions were skipped).
    fn retry_handover(&mut self, namespace: Namespace) {
        if self.reconciler.handover_retries < 3 {
            self.reconciler.handover_retries += 1;
            self.reconciler
                .queue
                .push_back((namespace, Trigger::Handover));
        } else {
            tracing::warn!(peer = ?self.peer, namespace = %namespace, "a handover run failed again: anti-entropy will repair what it missed");
            self.reconciler.handover_failed = true;
        }
    }

    fn maybe_finish_outgoing(&mut self) {
        let done = self
            .reconciler
            .outgoing
            .as_ref()
            .is_some_and(|o| o.repairs.sent_end && o.peer_ended);
        if !done {
            return;
        }
        let o = self.reconciler.outgoing.take().expect("checked");
        if o.mode == ReconcileMode::Transfer {
            self.with_record(|r| r.reconcile.transfers += 1);
        }
        if o.trigger == Trigger::Handover && !o.complete {
            // Repairs were cut short: the rest comes from another run.
            self.retry_handover(o.namespace.clone());
        }
        self.record_run(
            &o.namespace,
            o.mode,
            o.trigger,
            ReconcileOutcome::Decoded,
            o.symbols_sent,
            o.differences,
            o.keys_repaired,
            o.started,
            None,
        );
    }

    /// Skips the stream to where the handover's snapshots start: what lies before is
    /// brought by the runs, what comes after by the stream, at once.
    fn skip_stream(&mut self) {
        let Some(seq) = self.reconciler.skip_to.take() else {
            return;
        };
        if seq > self.sent_through {
            // The positions skipped are acknowledged like any others.
            self.session
                .send_events(self.sent_through + 1, seq, Vec::new(), Instant::now());
            let _ = self.session.flush_events(Instant::now());
            self.sent_through = seq;
            self.reader = Some(self.inner.store.feed_reader(None, seq));
            self.caught_up = false;
            tracing::info!(peer = ?self.peer, resume_after = seq, "handover: the stream resumes after this position while the namespaces are reconciled");
        }
    }

    /// The handover's runs are done.
    fn finish_handover(&mut self) {
        self.reconciler.handover = false;
        if self.reconciler.handover_failed {
            tracing::warn!(peer = ?self.peer, "handover ended with runs that failed");
        } else {
            self.with_record(|r| r.reconcile.handovers += 1);
            tracing::info!(peer = ?self.peer, "handover done");
        }
    }

    fn incoming_step(&mut self) {
        let now = Instant::now();
        let reconciler = &mut self.reconciler;
        let Some(i) = reconciler.incoming.as_mut() else {
            return;
        };
        let ended = i.repairs.send(
            i.id,
            &i.namespace,
            &mut self.session,
            &mut reconciler.covered_sent,
            self.inner.config.batch_bytes_max,
            now,
        );
        if ended {
            self.maybe_finish_incoming();
        }
    }

    fn maybe_finish_incoming(&mut self) {
        let done = self
            .reconciler
            .incoming
            .as_ref()
            .is_some_and(|i| i.repairs.sent_end && i.peer_ended);
        if done {
            let i = self.reconciler.incoming.take().expect("checked");
            self.record_run(
                &i.namespace,
                i.mode,
                Trigger::AntiEntropy,
                ReconcileOutcome::Decoded,
                i.decoder.symbols() as u64,
                i.differences,
                i.keys_repaired,
                i.started,
                None,
            );
        }
    }

    /// Handles a reconciliation frame from the peer.
    pub(super) async fn reconcile_frame(&mut self, frame: Frame) {
        let now = Instant::now();
        match frame {
            Frame::ReconcileStart {
                id,
                namespace,
                mode,
                items,
                symbols_max,
            } => {
                self.start_incoming(id, namespace, mode, items, symbols_max)
                    .await
            }
            Frame::ReconcileSymbols {
                id,
                first_index,
                symbols,
            } => self.incoming_symbols(id, first_index, symbols).await,
            Frame::ReconcileCredit { id, symbols } => {
                if let Some(o) = self.reconciler.outgoing.as_mut()
                    && o.id == id
                {
                    o.symbols_allowed += symbols as u64;
                }
            }
            Frame::ReconcileEnd { id, outcome, need } => {
                let Some(o) = self.reconciler.outgoing.as_mut() else {
                    return;
                };
                if o.id != id || o.repairs.ready {
                    return;
                }
                match outcome {
                    ReconcileOutcome::Decoded => {
                        o.differences += need.len() as u64;
                        let ns = o.namespace.clone();
                        let found = blocking(&self.inner.store, move |s| {
                            s.events_for_items_within(
                                &ns,
                                need.iter().map(|p| &p[..]),
                                REPAIR_KEYS_MAX,
                                REPAIR_BYTES_MAX,
                            )
                        })
                        .await;
                        match found {
                            Ok((events, cut)) => {
                                let o = self.reconciler.outgoing.as_mut().expect("running");
                                o.repairs.set(events, !cut);
                                o.complete = !cut;
                            }
                            Err(e) => self.fail_outgoing(e),
                        }
                    }
                    ReconcileOutcome::Exhausted if o.mode == ReconcileMode::Window => {
                        // The difference is larger than the window: again from scans.
                        let o = self.reconciler.outgoing.take().expect("running");
                        self.record_run(
                            &o.namespace,
                            o.mode,
                            o.trigger,
                            outcome,
                            o.symbols_sent,
                            0,
                            0,
                            o.started,
                            None,
                        );
                        self.start_outgoing(o.namespace, ReconcileMode::Full, o.trigger)
                            .await;
                    }
                    other => {
                        let o = self.reconciler.outgoing.take().expect("running");
                        tracing::warn!(peer = ?self.peer, namespace = %o.namespace, outcome = other.name(), "the peer ended a reconciliation without a result");
                        self.record_run(
                            &o.namespace,
                            o.mode,
                            o.trigger,
                            other,
                            o.symbols_sent,
                            0,
                            0,
                            o.started,
                            Some(format!("the peer answered {}", other.name())),
                        );
                        if o.trigger == Trigger::Handover {
                            self.retry_handover(o.namespace);
                        }
                    }
                }
            }
            Frame::RepairEnd { id, covered } => {
                // Applied after the repairs queued before it (the store orders them).
                if let Some(vector) = covered {
                    let ns = match (&self.reconciler.outgoing, &self.reconciler.incoming) {
                        (Some(o), _) if o.id == id && o.repairs.ready => Some(o.namespace.clone()),
                        (_, Some(i)) if i.id == id => Some(i.namespace.clone()),
                        _ => None,
                    };
                    if let Some(ns) = ns {
                        self.drain_applying().await;
                        if let Err(e) = self.inner.store.cover(ns, vector).await {
                            self.session.close(
                                ErrorCode::Internal,
                                format!("cannot record covered dots: {e}"),
                                now,
                            );
                            return;
                        }
                    }
                }
                if let Some(o) = self.reconciler.outgoing.as_mut()
                    && o.id == id
                {
                    o.peer_ended = true;
                    self.maybe_finish_outgoing();
                } else if let Some(i) = self.reconciler.incoming.as_mut()
                    && i.id == id
                {
                    i.peer_ended = true;
                    if i.mode == ReconcileMode::Transfer {
                        i.repairs.ready = true;
                    }
                    self.maybe_finish_incoming();
                }
            }
            _ => {}
        }
    }

    async fn start_incoming(
        &mut self,
        id: u32,
        namespace: Namespace,
        mode: ReconcileMode,
        items: u64,
        symbols_max: u64,
    ) {
        let refuse = |link: &mut Link, why: &str| {
            tracing::debug!(peer = ?link.peer, namespace = %namespace, "refused a reconciliation: {why}");
            link.session.send_reconcile(
                Frame::ReconcileEnd {
                    id,
                    outcome: ReconcileOutcome::Refused,
                    need: Vec::new(),
                },
                Instant::now(),
            );
        };
        if self.reconciler.incoming.is_some() {
            return refuse(self, "another is under way");
        }
        let store = self.inner.store.clone();
        // As this node starts none for it: the states differ by design until an
        // operator resolves the quarantine (a transfer, which only brings state in,
        // goes ahead).
        if mode != ReconcileMode::Transfer && store.is_quarantined(&namespace) {
            return refuse(self, "the namespace has quarantined events here");
        }
        // In transfer mode this node sends no state: it covers nothing for the peer.
        let covered = if mode == ReconcileMode::Transfer {
            VersionVector::default()
        } else {
            store.namespace_vector(&namespace)
        };
        let ns = namespace.clone();
        let local = match mode {
            ReconcileMode::Window => {
                if store.config().reconcile_window == 0 {
                    return refuse(self, "this node keeps no windows");
                }
                blocking(&store, move |s| {
                    Ok((
                        Source::Window(s.reconcile_window(&ns)?.symbols().to_vec()),
                        0,
                    ))
                })
                .await
            }
            ReconcileMode::Full => {
                blocking(&store, move |s| {
                    let items = s.reconcile_items(&ns)?;
                    let n = items.len() as u64;
                    Ok((
                        Source::Scan(Box::new(Extension::new(s.item_key(), items, 0))),
                        n,
                    ))
                })
                .await
            }
            ReconcileMode::Transfer => Ok((Source::None, 0)),
        };
        let (local, local_items) = match local {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(peer = ?self.peer, namespace = %namespace, "cannot answer a reconciliation: {e}");
                return refuse(self, "storage error");
            }
        };
        let symbols_max = match &local {
            Source::Window(w) => symbols_max.min(w.len() as u64),
            Source::Scan(_) => symbols_max
                .min(FULL_SYMBOLS_PER_ITEM * (items + local_items) + 1024)
                .min(SYMBOLS_MAX),
            Source::None => 0,
        };
        self.reconciler.incoming = Some(Incoming {
            id,
            namespace,
            mode,
            local,
            decoder: Decoder::new(store.item_key()),
            symbols_max,
            granted: RECONCILE_INITIAL_SYMBOLS as u64,
            ended: false,
            repairs: Repairs::new(covered),
            peer_ended: false,
            differences: 0,
            keys_repaired: 0,
            started: Instant::now(),
        });
    }

    async fn incoming_symbols(&mut self, id: u32, first_index: u64, symbols: Vec<Symbol>) {
        let now = Instant::now();
        let Some(i) = self.reconciler.incoming.as_mut() else {
            return;
        };
        if i.id != id || i.ended {
            return; // Symbols that were in flight when this node ended the run.
        }
        if first_index != i.decoder.symbols() as u64 {
            let message = format!(
                "reconciliation symbols from index {first_index}, expected {}",
                i.decoder.symbols()
            );
            return self.session.close(ErrorCode::Protocol, message, now);
        }
        if let Some(peer) = self.peer {
            self.inner
                .metrics
                .reconcile_symbols
                .get_or_create(&peer_labels(peer))
                .inc_by(symbols.len() as u64);
        }
        let mut failed = false;
        for remote in &symbols {
            let index = i.decoder.symbols();
            if index as u64 >= i.symbols_max {
                break;
            }
            let local = match &mut i.local {
                Source::Window(w) => w[index],
                Source::Scan(ext) => ext.next_symbol(),
                Source::None => Symbol::default(),
            };
            if i.decoder.push(remote, &local).is_err() {
                failed = true;
                break;
            }
            if i.decoder.is_done() {
                break;
            }
        }
        let received = i.decoder.symbols() as u64;
        let outcome = if failed {
            Some(ReconcileOutcome::Failed)
        } else if i.decoder.is_done() {
            Some(ReconcileOutcome::Decoded)
        } else if received >= i.symbols_max {
            Some(match i.mode {
                ReconcileMode::Window => ReconcileOutcome::Exhausted,
                _ => ReconcileOutcome::Failed,
            })
        } else {
            None
        };
        let Some(outcome) = outcome else {
            // Keep the stream going with a lookahead of an eighth of what was received
            // (at least 128 symbols): every symbol granted past the point of decoding
            // is wasted, so the lookahead stays a fraction of the run, and grows with
            // it so that a long run on a slow link does not wait on every grant.
            let ahead = (received / 8).max(RECONCILE_LOOKAHEAD_MIN);
            if i.granted < received + ahead / 2 {
                let more = (received + ahead - i.granted).min(1 << 20);
                i.granted += more;
                self.session.send_reconcile(
                    Frame::ReconcileCredit {
                        id,
                        symbols: more as u32,
                    },
                    now,
                );
            }
            return;
        };
        i.ended = true;
        if outcome != ReconcileOutcome::Decoded {
            let i = self.reconciler.incoming.take().expect("running");
            self.session.send_reconcile(
                Frame::ReconcileEnd {
                    id,
                    outcome,
                    need: Vec::new(),
                },
                now,
            );
            let error = match (failed, outcome) {
                (true, _) => Some(
                    "the peer's symbols are inconsistent with this node's (do both nodes use the same reconcile_key?)"
                        .to_owned(),
                ),
                (false, ReconcileOutcome::Failed) => {
                    Some(format!(
                        "not decoded within {received} symbols (nodes with different reconcile_keys end like this too)"
                    ))
                }
                _ => None,
            };
            if let Some(e) = &error {
                tracing::warn!(peer = ?self.peer, namespace = %i.namespace, "reconciliation failed: {e}");
            }
            self.record_run(
                &i.namespace,
                i.mode,
                Trigger::AntiEntropy,
                outcome,
                received,
                0,
                0,
                i.started,
                error,
            );
            return;
        }
        let mut need: Vec<[u8; NEED_PREFIX_BYTES]> = Vec::new();
        let mut mine: Vec<[u8; NEED_PREFIX_BYTES]> = Vec::new();
        for (item, side) in i.decoder.items() {
            let prefix: [u8; NEED_PREFIX_BYTES] = item[..NEED_PREFIX_BYTES]
                .try_into()
                .expect("item is longer");
            match side {
                Side::Remote => need.push(prefix),
                Side::Local => mine.push(prefix),
            }
        }
        need.sort_unstable();
        need.dedup();
        mine.sort_unstable();
        mine.dedup();
        need.truncate(REPAIR_KEYS_MAX);
        i.differences = (need.len() + mine.len()) as u64;
        self.session
            .send_reconcile(Frame::ReconcileEnd { id, outcome, need }, now);
        let ns = i.namespace.clone();
        let found = blocking(&self.inner.store, move |s| {
            s.events_for_items_within(
                &ns,
                mine.iter().map(|p| &p[..]),
                REPAIR_KEYS_MAX,
                REPAIR_BYTES_MAX,
            )
        })
        .await;
        let i = self.reconciler.incoming.as_mut().expect("running");
        match found {
            Ok((events, cut)) => i.repairs.set(events, !cut),
            Err(e) => {
                tracing::warn!(peer = ?self.peer, namespace = %i.namespace, "cannot read repairs: {e}");
                i.repairs.set(Vec::new(), false);
            }
        }
    }

    /// Counts repair events received for run `id` (before they are applied).
    pub(super) fn repair_received(&mut self, id: u32, events: usize) {
        if let Some(o) = self.reconciler.outgoing.as_mut()
            && o.id == id
            && o.mode != ReconcileMode::Transfer
        {
            o.differences += events as u64;
        }
    }

    /// Counts repair events applied for run `id`.
    pub(super) fn repaired(&mut self, id: u32, applied: usize) {
        if let Some(peer) = self.peer {
            self.inner
                .metrics
                .keys_repaired
                .get_or_create(&peer_labels(peer))
                .inc_by(applied as u64);
        }
        self.with_record(|r| r.reconcile.keys_repaired += applied as u64);
        if let Some(o) = self.reconciler.outgoing.as_mut()
            && o.id == id
        {
            o.keys_repaired += applied as u64;
        } else if let Some(i) = self.reconciler.incoming.as_mut()
            && i.id == id
        {
            i.keys_repaired += applied as u64;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record_run(
        &mut self,
        namespace: &Namespace,
        mode: ReconcileMode,
        trigger: Trigger,
        outcome: ReconcileOutcome,
        symbols: u64,
        differences: u64,
        repaired: u64,
        started: Instant,
        error: Option<String>,
    ) {
        let Some(peer) = self.peer else { return };
        self.inner
            .metrics
            .reconcile_runs
            .get_or_create(&ReconcileLabels {
                peer: peer.to_string(),
                outcome: outcome.name().to_owned(),
            })
            .inc();
        let elapsed = started.elapsed();
        tracing::info!(peer = %peer, namespace = %namespace, mode = mode.name(), trigger = trigger.name(), outcome = outcome.name(), symbols, differences, repaired, ms = elapsed.as_millis() as u64, "reconciliation ended");
        self.with_record(|r| {
            r.reconcile.runs += 1;
            r.reconcile.last = Some(LastReconcile {
                namespace: namespace.clone(),
                mode: mode.name(),
                trigger: trigger.name(),
                outcome: outcome.name(),
                symbols,
                differences,
                keys_repaired: repaired,
                duration: elapsed,
                at: Instant::now(),
                error,
            });
        });
    }
}

/// Takes events off the front of `queue`, up to a frame's worth.
fn take_batch(queue: &mut VecDeque<Event>, bytes_max: usize) -> Vec<Event> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    while let Some(e) = queue.front() {
        let size = asp_core::session::credit_size(e);
        if !out.is_empty()
            && (out.len() >= REPAIR_EVENTS_PER_FRAME || bytes + size > bytes_max as u64)
        {
            break;
        }
        bytes += size;
        out.push(queue.pop_front().expect("peeked"));
    }
    out
}
