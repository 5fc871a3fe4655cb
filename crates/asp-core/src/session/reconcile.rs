//! Reconciliation and handover on one link, as a sans-IO state machine beside
//! [`Session`](super::Session): frames, summaries and ticks go in through `handle_*`
//! and [`Reconciler::step`], frames to send and what happened come out through
//! [`Reconciler::poll_output`]. The store is reached only through [`ReconcileStore`];
//! the runtime (asp-node) drives it over a real link, the simulator drives it directly.
//!
//! One side, the *initiator*, streams the coded symbols of its snapshot of a
//! namespace; the *responder* subtracts its own symbols and peels the difference
//! ([`crate::reconcile`]) until it decodes, then names the keys it needs and sends the
//! keys the initiator lacks; the initiator sends what was named. Both end with a
//! `RepairEnd`. In `Transfer` mode the initiator sends its whole state instead of
//! symbols (the peer holds nothing of it). The frames are in `docs/PROTOCOL.md`.
//!
//! The *handover*: when the peer lacks dots this node compacted out of its feed (or
//! events of its own it lost), the stream to it skips to the feed head and every
//! namespace both replicate is reconciled from snapshots taken after that point.
//!
//! Size: both roles of one exchange (initiator and responder, each in window, full and
//! transfer mode), the anti-entropy check and the handover are steps of one state
//! machine; split the roles into files of their own if either grows further.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use super::{
    ErrorCode, Frame, NEED_PREFIX_BYTES, NamespaceSummary, PROTOCOL_VERSION_MAX,
    RECONCILE_INITIAL_SYMBOLS, ReconcileMode, ReconcileOutcome, credit_size, lists,
};
use crate::reconcile::{Decoder, Extension, Item, ItemKey, Side, Symbol, Window};
use crate::{Event, Key, Namespace, NodeId, RangeSet, VersionVector};

/// Symbols per `ReconcileSymbols` frame, at most.
const SYMBOLS_PER_FRAME: usize = 1024;
/// Events per `Repair` frame, at most (frames are also bounded in bytes).
pub const REPAIR_EVENTS_PER_FRAME: usize = 2048;
/// Keys (and bytes of them) repaired in one direction of one run, at most: a larger
/// difference is repaired by the next run, not held in memory at once. A run cut
/// short claims nothing for the peer's vector and skips no part of the stream.
pub const REPAIR_KEYS_MAX: usize = 1 << 18;
pub const REPAIR_BYTES_MAX: usize = 256 << 20;
/// Symbols a responder accepts in one run, at most (its decoder's memory).
const SYMBOLS_MAX: u64 = 8 << 20;
/// The least a responder grants ahead of the symbols it has received.
const RECONCILE_LOOKAHEAD_MIN: u64 = 128;
/// A `Full` run gives up past this many symbols per item held by both sides.
const FULL_SYMBOLS_PER_ITEM: u64 = 3;
/// Times a failed handover run is queued again before it is left to anti-entropy.
const HANDOVER_RETRIES: u32 = 3;

/// A peer's latest summary, by namespace.
pub type SummaryMap = HashMap<Namespace, NamespaceSummary>;

/// What reconciliation needs of the store. Reads see every write acknowledged before
/// they began (the runtime waits for the key index before a step that may start a
/// run).
pub trait ReconcileStore {
    /// Why a read or a write failed (shown in logs and status).
    type Error: fmt::Display;

    /// The key that hashes keys and versions into reconciliation items.
    fn item_key(&self) -> ItemKey;
    /// Whether this node keeps reconciliation windows (`reconcile_window > 0`).
    fn keeps_windows(&self) -> bool;
    /// This node's summary of every namespace it holds.
    fn summary(&self) -> Vec<NamespaceSummary>;
    /// A namespace's version vector (empty if it holds nothing).
    fn namespace_vector(&self, namespace: &Namespace) -> VersionVector;
    /// Whether the namespace has quarantined events here (its state differs from the
    /// peers' by design until an operator resolves them).
    fn is_quarantined(&self, namespace: &Namespace) -> bool;
    /// The feed head's position.
    fn head_seq(&self) -> u64;
    /// Each namespace's compacted dots (its base).
    fn bases(&self) -> Vec<(Namespace, VersionVector)>;
    /// Whether this node holds events of `peer` that the peer's summary says it lacks
    /// (it lost them), in namespaces `shared` accepts.
    fn holds_lost_events_of<'a>(
        &self,
        peer: NodeId,
        theirs: &dyn Fn(&Namespace) -> Option<&'a VersionVector>,
        shared: &dyn Fn(&Namespace) -> bool,
    ) -> bool;
    /// The namespace's window and the feed position it reflects.
    fn window_snapshot(&self, namespace: &Namespace) -> Result<(Window, u64), Self::Error>;
    /// The namespace's window now.
    fn window(&self, namespace: &Namespace) -> Result<Window, Self::Error>;
    /// The namespace's items and the feed position they reflect.
    fn items_snapshot(&self, namespace: &Namespace) -> Result<(Vec<Item>, u64), Self::Error>;
    /// The namespace's items now.
    fn items(&self, namespace: &Namespace) -> Result<Vec<Item>, Self::Error>;
    /// The current events of the keys whose items start with one of `prefixes`, at
    /// most `keys_max` of them and about `bytes_max` bytes; `true` if cut short.
    fn events_for_items(
        &self,
        namespace: &Namespace,
        prefixes: &[[u8; NEED_PREFIX_BYTES]],
        keys_max: usize,
        bytes_max: usize,
    ) -> Result<(Vec<Event>, bool), Self::Error>;
    /// The namespace's state as events, in key order after `after`: at most
    /// `events_max` and about `bytes_max` bytes; the key to continue after, or `None`
    /// at the end.
    fn state_page(
        &self,
        namespace: &Namespace,
        after: Option<&Key>,
        events_max: usize,
        bytes_max: usize,
    ) -> Result<(Vec<Event>, Option<Key>), Self::Error>;
    /// A peer's word that every dot of `vector` is superseded by state this node now
    /// holds (called once the run's repairs are applied).
    fn cover(&self, namespace: &Namespace, vector: VersionVector) -> Result<(), Self::Error>;
    /// Whether the store acts on [`ReconcileStore::prepare_run`]; if not, the checks
    /// that would call it (a summary per check on the responder) are skipped.
    fn prepares_runs(&self) -> bool {
        false
    }
    /// The namespace's digest differs from a peer's: a run may follow. The store may
    /// get ready to find keys behind items (build a key-hash index in the background).
    fn prepare_run(&self, _namespace: &Namespace) {}
}

/// Why a run started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
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

/// A run that ended, for logs, metrics and status.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub namespace: Namespace,
    pub mode: ReconcileMode,
    pub trigger: Trigger,
    pub outcome: ReconcileOutcome,
    pub symbols: u64,
    pub differences: u64,
    pub keys_repaired: u64,
    pub started: Instant,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// What the runtime does for the reconciler, in order.
#[derive(Debug)]
pub enum Output {
    /// Send a reconciliation frame (other than `Repair`) through the session.
    Send(Frame),
    /// Send repair events of run `id` through the session (charged to credit).
    Repair { id: u32, events: Vec<Event> },
    /// The stream to the peer skips to after this feed position (a handover began):
    /// the positions skipped are acknowledged like any others.
    SkipStream(u64),
    /// Close the link.
    Close { code: ErrorCode, message: String },
    /// Symbols sent or received (for metrics).
    Symbols(u64),
    /// An anti-entropy check found the namespace in sync.
    InSync(Namespace),
    /// A run ended.
    Ended(RunReport),
    /// A run this node started in transfer mode ended (reported before its `Ended`).
    Transferred,
    /// A handover began: `lost` if the peer lost events of its own (else it lacks
    /// compacted ones), with the number of namespaces it reconciles.
    HandoverStarted { lost: bool, namespaces: usize },
    /// A handover's runs are done; `failed` if one failed for good.
    HandoverEnded { failed: bool },
    /// Something worth a log line: a refused run, a handover run given up.
    Notice { warn: bool, message: String },
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
    /// Repair events the peer sent in this run, counted as they arrive.
    repairs_received: u64,
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
    /// Repair events the peer sent in this run, counted as they arrive.
    repairs_received: u64,
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
    /// Repair events sent so far (transfer pages included): sent in `RepairEnd` to a
    /// peer of protocol version 3.
    sent: u64,
    /// This node's vector before its snapshot: sent in `RepairEnd` (empty: none).
    covered: VersionVector,
}

impl Repairs {
    fn new(covered: VersionVector) -> Repairs {
        Repairs {
            queue: VecDeque::new(),
            ready: false,
            sent_end: false,
            sent: 0,
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
}

/// The link's side of a step: what the session allows now.
struct Step {
    credit: i64,
    bytes_max: usize,
}

/// The reconciliation state of one link.
pub struct Reconciler {
    node_id: NodeId,
    /// Namespaces kept from this peer (residency).
    withhold: Option<super::Withhold>,
    /// The peer, once the handshake named it, with the namespaces its Hello lists.
    peer: Option<NodeId>,
    /// The protocol version of the link (3 and later: `RepairEnd` counts repairs).
    peer_version: u16,
    peer_namespaces: Vec<String>,
    /// The namespaces this node replicates (its own configuration).
    namespaces: Vec<String>,
    /// The peer's latest summary.
    summary: Arc<SummaryMap>,
    /// Bytes of repairs per frame, at most.
    batch_bytes_max: usize,
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
    covered_sent: HashMap<Namespace, VersionVector>,
    /// Namespaces whose digest differed from the peer's at the last check: a run
    /// starts when it differs at two checks in a row (a summary taken while the
    /// peer was still applying would otherwise start runs that find nothing).
    differed: HashSet<Namespace>,
    /// Per namespace, the dots one side held and the other lacked at a check where
    /// the digests were equal and the link idle, with the number of the peer's
    /// summary then (see [`anti_entropy_tick`](Self::anti_entropy_tick)).
    lacked: HashMap<Namespace, (VersionVector, u64)>,
    /// Summaries received from the peer.
    summaries: u64,
    /// Per namespace, the peer's own dots this node held and the peer's last summary
    /// lacked: the peer lost them only if its next summary lacks some of them too (a
    /// relayed copy can overtake the summary that holds it).
    lost_suspects: HashMap<Namespace, RangeSet>,
    /// Dots the peer's runs on this link told this node it holds the effect of (the
    /// counterpart of `covered_sent`).
    covered_received: HashMap<Namespace, VersionVector>,
    /// The highest id of a run the peer started on this link (its ids only grow).
    peer_runs_started: Option<u32>,
    outputs: VecDeque<Output>,
}

impl Reconciler {
    /// A reconciler for a link of `node_id`, which replicates `namespaces` (`*` for
    /// all) and sends repairs in frames of at most `batch_bytes_max` bytes.
    pub fn new(node_id: NodeId, namespaces: Vec<String>, batch_bytes_max: usize) -> Reconciler {
        Reconciler {
            node_id,
            peer: None,
            peer_version: PROTOCOL_VERSION_MAX,
            peer_namespaces: Vec::new(),
            namespaces,
            summary: Arc::default(),
            batch_bytes_max: batch_bytes_max.max(1),
            next_id: 0,
            outgoing: None,
            incoming: None,
            queue: VecDeque::new(),
            handover: false,
            skip_to: None,
            handover_retries: 0,
            handover_failed: false,
            covered_sent: HashMap::new(),
            differed: HashSet::new(),
            lacked: HashMap::new(),
            summaries: 0,
            lost_suspects: HashMap::new(),
            covered_received: HashMap::new(),
            peer_runs_started: None,
            outputs: VecDeque::new(),
            withhold: None,
        }
    }

    /// The handshake named the peer, the protocol version of the link and the
    /// namespaces the peer replicates.
    pub fn set_peer(&mut self, peer: NodeId, version: u16, namespaces: Vec<String>) {
        self.peer = Some(peer);
        self.peer_version = version;
        self.peer_namespaces = namespaces;
    }

    /// The next thing for the runtime to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Whether the feed stream must wait (a handover's skip is not sent yet).
    pub fn holds_stream(&self) -> bool {
        self.skip_to.is_some()
    }

    /// Whether there is work to do without waiting for the peer.
    pub fn has_work(&self, credit: i64) -> bool {
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

    /// Queues an anti-entropy run of `namespace` now: the runtime found the peer holds
    /// events this node lacks that no stream will bring (see
    /// [`super::RelayTree`]). Returns whether a run was queued (not when one is queued
    /// or under way, or the namespace is not shared with the peer).
    pub fn request_run(&mut self, namespace: Namespace) -> bool {
        if !self.shared(&namespace) || self.queued(&namespace) {
            return false;
        }
        self.queue.push_back((namespace, Trigger::AntiEntropy));
        true
    }

    /// Whether no run is under way or queued.
    pub fn is_idle(&self) -> bool {
        self.outgoing.is_none() && self.incoming.is_none() && self.queue.is_empty()
    }

    /// Whether the next [`step`](Self::step) may read the store (start a run, or read
    /// a page of a transfer): the runtime then runs it where blocking is allowed, after
    /// the key index reflects every acknowledged write.
    pub fn step_reads_store(&self) -> bool {
        match &self.outgoing {
            None => !self.queue.is_empty(),
            Some(o) => o.mode == ReconcileMode::Transfer && !o.transfer_done,
        }
    }

    /// Whether the next step reads a transfer page past the first (a test may hold
    /// those back).
    pub fn next_is_later_page(&self, credit: i64) -> bool {
        self.outgoing.as_ref().is_some_and(|o| {
            o.mode == ReconcileMode::Transfer
                && !o.transfer_done
                && o.transfer_after.is_some()
                && credit > 0
        })
    }

    /// Whether handling `frame` may read or write the store.
    pub fn frame_touches_store(frame: &Frame) -> bool {
        matches!(
            frame,
            Frame::ReconcileStart { .. }
                | Frame::ReconcileSymbols { .. }
                | Frame::ReconcileEnd { .. }
                | Frame::RepairEnd {
                    covered: Some(_),
                    ..
                }
        )
    }

    fn queued(&self, namespace: &Namespace) -> bool {
        self.queue.iter().any(|(n, _)| n == namespace)
            || self
                .outgoing
                .as_ref()
                .is_some_and(|o| &o.namespace == namespace)
    }

    /// Whether both this node and the peer replicate `namespace` (and the peer may
    /// have it).
    fn shared(&self, namespace: &Namespace) -> bool {
        self.peer.is_some()
            && lists(&self.namespaces, namespace)
            && lists(&self.peer_namespaces, namespace)
            && !self.withheld(namespace)
    }

    fn withheld(&self, namespace: &Namespace) -> bool {
        self.withhold
            .as_ref()
            .is_some_and(|w| w.withholds(namespace))
    }

    /// Namespaces nothing of which goes to this peer (residency), asked at every use.
    pub fn set_withhold(&mut self, withhold: Option<super::Withhold>) {
        self.withhold = withhold;
    }

    fn emit(&mut self, output: Output) {
        self.outputs.push_back(output);
    }

    /// The periodic anti-entropy check: queues a run for every namespace whose digest
    /// differs from the peer's, when this node is the initiator of the pair (the
    /// smaller node id). A run is queued only if the link is `idle` (nothing of its
    /// own in flight) and no run is under way.
    pub fn anti_entropy_tick(&mut self, store: &impl ReconcileStore, idle: bool) {
        let Some(peer) = self.peer else { return };
        if self.node_id > peer {
            // The responder of the pair starts no run, but gets ready for one.
            if idle && self.is_idle() && store.prepares_runs() {
                self.prepare_differing(store);
            }
            return;
        }
        let idle = idle && self.is_idle();
        let mine: SummaryMap = store
            .summary()
            .into_iter()
            .map(|s| (s.namespace.clone(), s))
            .collect();
        let theirs = self.summary.clone();
        let mut names: Vec<Namespace> = mine.keys().cloned().collect();
        names.extend(theirs.keys().cloned());
        names.sort();
        names.dedup();
        for ns in names {
            if !self.shared(&ns) || self.queued(&ns) {
                continue;
            }
            // Quarantined events make the digests differ by design until an operator
            // resolves them; runs would find the difference every time.
            if store.is_quarantined(&ns) {
                continue;
            }
            let digest = |s: Option<&NamespaceSummary>| {
                s.and_then(|s| s.digest.map(|d| d.canonical()))
                    .or(Some(Symbol::default()).filter(|_| s.is_none()))
            };
            let (da, db) = (digest(mine.get(&ns)), digest(theirs.get(&ns)));
            if da.is_some() && da == db {
                self.differed.remove(&ns);
                // Equal states, but one side may still lack dots the other holds
                // that no stream will bring: positions a handover skipped whose
                // covers the peer never recorded (the link closed first, or it
                // crashed), superseded events a machine crash took after they were
                // acknowledged. A run finds no difference and covers them. It starts
                // only when dots lacked at an earlier idle check are still lacked
                // in a later summary of the peer (not events still on their way).
                let vector =
                    |s: Option<&NamespaceSummary>| s.map(|s| s.vector.clone()).unwrap_or_default();
                let (va, vb) = (vector(mine.get(&ns)), vector(theirs.get(&ns)));
                // Dots a run of this link covered are on their way into the other
                // side's vector (its summary or this node's may predate the cover).
                let none = VersionVector::default();
                let sent = self.covered_sent.get(&ns).unwrap_or(&none);
                let received = self.covered_received.get(&ns).unwrap_or(&none);
                let mut lacks = va.difference(&vb).difference(sent);
                lacks.join(&vb.difference(&va).difference(received));
                if !idle || lacks.is_empty() {
                    self.lacked.remove(&ns);
                    if lacks.is_empty() {
                        self.emit(Output::InSync(ns));
                    }
                    continue;
                }
                match self.lacked.get(&ns) {
                    Some((before, seen)) if *seen < self.summaries => {
                        if before.meet(&lacks).is_empty() {
                            self.lacked.insert(ns, (lacks, self.summaries));
                        } else {
                            self.lacked.remove(&ns);
                            self.queue.push_back((ns, Trigger::AntiEntropy));
                        }
                    }
                    Some(_) => {}
                    None => {
                        self.lacked.insert(ns, (lacks, self.summaries));
                    }
                }
                continue;
            }
            // Not while a run or transfer is under way (a bootstrap differs by design
            // until it ends, and an index kept through it would cost each key it brings).
            if idle && store.prepares_runs() {
                store.prepare_run(&ns);
            }
            if idle && !self.differed.insert(ns.clone()) {
                self.differed.remove(&ns);
                self.queue.push_back((ns, Trigger::AntiEntropy));
            }
        }
    }

    /// Tells the store of every shared namespace whose digest differs from the
    /// peer's (see [`ReconcileStore::prepare_run`]), on an idle link with no run in
    /// either direction.
    fn prepare_differing(&self, store: &impl ReconcileStore) {
        if self.summary.is_empty() {
            return;
        }
        for mine in store.summary() {
            let ns = &mine.namespace;
            let Some(theirs) = self.summary.get(ns) else {
                continue;
            };
            let canonical = |s: &NamespaceSummary| s.digest.map(|d| d.canonical());
            if self.shared(ns)
                && canonical(&mine).is_some()
                && canonical(&mine) != canonical(theirs)
            {
                store.prepare_run(ns);
            }
        }
    }

    /// A summary from the peer. If the peer lacks dots this node no longer has in its
    /// feed (compacted), or events of its own that it lost, the handover: the stream
    /// skips to the feed head, and every namespace shared with the peer is reconciled
    /// from snapshots taken after that point, while live events keep flowing by the
    /// stream.
    pub fn handle_summary(&mut self, store: &impl ReconcileStore, summary: Arc<SummaryMap>) {
        self.summary = summary;
        self.summaries += 1;
        if self.handover {
            return;
        }
        let needs = store.bases().iter().any(|(ns, base)| {
            if !self.shared(ns) || base.is_empty() {
                return false;
            }
            let mut theirs = self
                .summary
                .get(ns)
                .map(|s| s.vector.clone())
                .unwrap_or_default();
            if let Some(sent) = self.covered_sent.get(ns) {
                theirs.join(sent);
            }
            !base.is_subset(&theirs)
        });
        // A peer that lacks its own events lost them (restored from an older copy, a
        // crash under fsync = never, a salvage): the stream will not send them again.
        let summary = self.summary.clone();
        let lost = self.peer.is_some_and(|peer| {
            store.holds_lost_events_of(peer, &|ns| summary.get(ns).map(|s| &s.vector), &|ns| {
                self.shared(ns)
            })
        });
        let lost = if lost {
            self.lost_twice(store)
        } else {
            self.lost_suspects.clear();
            false
        };
        if !needs && !lost {
            return;
        }
        let mut names: Vec<Namespace> = store
            .summary()
            .into_iter()
            .map(|s| s.namespace)
            .filter(|ns| self.shared(ns))
            .collect();
        names.sort();
        self.emit(Output::HandoverStarted {
            lost,
            namespaces: names.len(),
        });
        self.handover = true;
        self.skip_to = Some(store.head_seq());
        self.handover_retries = 0;
        self.handover_failed = false;
        self.queue.clear();
        for ns in names {
            self.queue.push_back((ns, Trigger::Handover));
        }
    }

    /// Whether the peer's own dots this node holds that its summary lacks include some
    /// its previous summary lacked too (what is lacked now becomes the next suspects).
    fn lost_twice(&mut self, store: &impl ReconcileStore) -> bool {
        let Some(peer) = self.peer else { return false };
        let mut now = HashMap::new();
        for s in store.summary() {
            if !self.shared(&s.namespace) {
                continue;
            }
            let Some(mine) = s.vector.get(peer) else {
                continue;
            };
            let lacked = match self
                .summary
                .get(&s.namespace)
                .and_then(|t| t.vector.get(peer))
            {
                Some(theirs) => mine.difference(theirs),
                None => mine.clone(),
            };
            if !lacked.is_empty() {
                now.insert(s.namespace, lacked);
            }
        }
        let before = std::mem::replace(&mut self.lost_suspects, now);
        self.lost_suspects.iter().any(|(ns, lacked)| {
            before
                .get(ns)
                .is_some_and(|b| !b.difference(&b.difference(lacked)).is_empty())
        })
    }

    /// Does the next bounded step of work: `can_send` and `credit` are the session's
    /// now.
    pub fn step(&mut self, store: &impl ReconcileStore, can_send: bool, credit: i64, now: Instant) {
        let mut step = Step {
            credit,
            bytes_max: self.batch_bytes_max,
        };
        if can_send && let Some(seq) = self.skip_to.take() {
            self.emit(Output::SkipStream(seq));
        }
        if self.outgoing.is_none() {
            if let Some((ns, trigger)) = self.queue.pop_front() {
                // A peer that holds nothing but its own writes (a new node, perhaps
                // already taking writes) is sent the whole state: decoding a
                // difference as large as the set would cost more.
                let peer_empty = self
                    .summary
                    .get(&ns)
                    .is_none_or(|s| s.vector.iter().all(|(origin, _)| Some(origin) == self.peer));
                let keeps_windows = self.summary.values().all(|s| s.digest.is_some());
                let mode = if trigger == Trigger::Handover && peer_empty {
                    ReconcileMode::Transfer
                } else if store.keeps_windows() && keeps_windows {
                    ReconcileMode::Window
                } else {
                    ReconcileMode::Full
                };
                self.start_outgoing(store, ns, mode, trigger, now);
            } else if self.handover {
                self.handover = false;
                self.emit(Output::HandoverEnded {
                    failed: self.handover_failed,
                });
            }
        } else {
            self.outgoing_step(store, &mut step);
        }
        self.incoming_step(&mut step);
    }

    fn start_outgoing(
        &mut self,
        store: &impl ReconcileStore,
        namespace: Namespace,
        mode: ReconcileMode,
        trigger: Trigger,
        now: Instant,
    ) {
        // The vector is read before the snapshot: every dot in it is then either in
        // the snapshot or superseded by something in it, so a peer that holds the
        // snapshot's state holds the effect of all of them.
        let covered = store.namespace_vector(&namespace);
        let snapshot = match mode {
            ReconcileMode::Window => store.window_snapshot(&namespace).map(|(w, _)| {
                (
                    Source::Window(w.symbols().to_vec()),
                    w.items().max(0) as u64,
                )
            }),
            ReconcileMode::Full => store.items_snapshot(&namespace).map(|(items, _)| {
                let n = items.len() as u64;
                let ext = Extension::new(store.item_key(), items, 0);
                (Source::Scan(Box::new(ext)), n)
            }),
            // Each page is read after every write acknowledged before it: the pages
            // together hold at least the state as of this step.
            ReconcileMode::Transfer => Ok((Source::None, 0)),
        };
        let (source, items) = match snapshot {
            Ok(x) => x,
            Err(e) => {
                self.emit(Output::Ended(RunReport {
                    namespace: namespace.clone(),
                    mode,
                    trigger,
                    outcome: ReconcileOutcome::Failed,
                    symbols: 0,
                    differences: 0,
                    keys_repaired: 0,
                    started: now,
                    error: Some(format!("cannot start: {e}")),
                }));
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
        // Frames name a run by the id its initiator gave it, and both sides start
        // runs: on a version-3 link the node with the smaller id takes odd ids and
        // the other even ones, so that no run of one direction shares an id with a
        // run of the other (a `RepairEnd` for the peer's run was taken for this
        // node's and recorded its covered dots in another namespace).
        self.next_id = self.next_id.wrapping_add(1);
        if self.peer_version >= 3
            && let Some(peer) = self.peer
        {
            let odd = self.node_id < peer;
            if (self.next_id % 2 == 1) != odd {
                self.next_id = self.next_id.wrapping_add(1);
            }
        }
        let id = self.next_id;
        self.emit(Output::Send(Frame::ReconcileStart {
            id,
            namespace: namespace.clone(),
            mode,
            items,
            symbols_max,
        }));
        self.outgoing = Some(Outgoing {
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
            repairs_received: 0,
            peer_ended: false,
            complete: true,
            differences: 0,
            keys_repaired: 0,
            started: now,
        });
    }

    fn outgoing_step(&mut self, store: &impl ReconcileStore, step: &mut Step) {
        let Some(o) = self.outgoing.as_mut() else {
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
                let (id, count) = (o.id, symbols.len() as u64);
                self.emit(Output::Symbols(count));
                self.emit(Output::Send(Frame::ReconcileSymbols {
                    id,
                    first_index: first,
                    symbols,
                }));
                return;
            }
        }
        // Transfer mode: the whole state, page by page, within credit.
        if o.mode == ReconcileMode::Transfer && !o.transfer_done && step.credit > 0 {
            let bytes = (step.credit as usize).min(step.bytes_max);
            let page = store.state_page(
                &o.namespace,
                o.transfer_after.as_ref(),
                REPAIR_EVENTS_PER_FRAME,
                bytes,
            );
            match page {
                Ok((events, next)) => {
                    o.transfer_done = next.is_none();
                    o.transfer_after = next;
                    // Pages go straight out; once read to the end, only RepairEnd is left.
                    o.repairs.ready = o.transfer_done;
                    if !events.is_empty() {
                        let id = o.id;
                        o.repairs.sent += events.len() as u64;
                        step.credit -= events.iter().map(credit_size).sum::<u64>() as i64;
                        self.emit(Output::Repair { id, events });
                    }
                }
                Err(e) => self.fail_outgoing(e.to_string()),
            }
            return;
        }
        let ended = self.send_repairs(true, step);
        if ended {
            self.maybe_finish_outgoing();
        }
    }

    /// Sends the next batch of a run's repairs within credit (`outgoing`: this node's
    /// run, else the peer's), or its `RepairEnd` once none is left; returns whether
    /// the `RepairEnd` went now.
    fn send_repairs(&mut self, outgoing: bool, step: &mut Step) -> bool {
        let (id, namespace, repairs) = if outgoing {
            match self.outgoing.as_mut() {
                Some(o) => (o.id, &o.namespace, &mut o.repairs),
                None => return false,
            }
        } else {
            match self.incoming.as_mut() {
                Some(i) => (i.id, &i.namespace, &mut i.repairs),
                None => return false,
            }
        };
        if !repairs.ready || repairs.sent_end {
            return false;
        }
        if repairs.queue.is_empty() {
            repairs.sent_end = true;
            let covered = Some(repairs.covered.clone()).filter(|v| !v.is_empty());
            if let Some(v) = &covered {
                self.covered_sent
                    .entry(namespace.clone())
                    .or_default()
                    .join(v);
            }
            let repairs = (self.peer_version >= 3).then_some(repairs.sent);
            self.outputs.push_back(Output::Send(Frame::RepairEnd {
                id,
                covered,
                repairs,
            }));
            return true;
        }
        if step.credit > 0 {
            let batch = take_batch(&mut repairs.queue, step.bytes_max);
            repairs.sent += batch.len() as u64;
            step.credit -= batch.iter().map(credit_size).sum::<u64>() as i64;
            self.outputs.push_back(Output::Repair { id, events: batch });
        }
        false
    }

    fn fail_outgoing(&mut self, error: String) {
        if let Some(o) = self.outgoing.take() {
            self.emit(Output::Ended(RunReport {
                namespace: o.namespace.clone(),
                mode: o.mode,
                trigger: o.trigger,
                outcome: ReconcileOutcome::Failed,
                symbols: o.symbols_sent,
                differences: o.differences,
                keys_repaired: o.keys_repaired,
                started: o.started,
                error: Some(error),
            }));
            self.emit(Output::Send(Frame::ReconcileEnd {
                id: o.id,
                outcome: ReconcileOutcome::Failed,
                need: Vec::new(),
            }));
            if o.trigger == Trigger::Handover {
                self.retry_handover(o.namespace);
            }
        }
    }

    /// A run of the handover failed: queue it again, a few times; past that, the
    /// namespace is left to anti-entropy (its stream positions were skipped).
    fn retry_handover(&mut self, namespace: Namespace) {
        if self.handover_retries < HANDOVER_RETRIES {
            self.handover_retries += 1;
            self.queue.push_back((namespace, Trigger::Handover));
        } else {
            self.emit(Output::Notice {
                warn: true,
                message: format!(
                    "a handover run of namespace {namespace} failed again: anti-entropy will repair what it missed"
                ),
            });
            self.handover_failed = true;
        }
    }

    fn maybe_finish_outgoing(&mut self) {
        let done = self
            .outgoing
            .as_ref()
            .is_some_and(|o| o.repairs.sent_end && o.peer_ended);
        if !done {
            return;
        }
        let o = self.outgoing.take().expect("checked");
        if o.mode == ReconcileMode::Transfer {
            self.emit(Output::Transferred);
        }
        if o.trigger == Trigger::Handover && !o.complete {
            // Repairs were cut short: the rest comes from another run.
            self.retry_handover(o.namespace.clone());
        }
        self.emit(Output::Ended(RunReport {
            namespace: o.namespace,
            mode: o.mode,
            trigger: o.trigger,
            outcome: ReconcileOutcome::Decoded,
            symbols: o.symbols_sent,
            differences: o.differences,
            keys_repaired: o.keys_repaired,
            started: o.started,
            error: None,
        }));
    }

    fn incoming_step(&mut self, step: &mut Step) {
        if self.send_repairs(false, step) {
            self.maybe_finish_incoming();
        }
    }

    /// Ends the peer's run that is under way without finishing it: the peer gave it
    /// up (its `ReconcileEnd` says so).
    fn abandon_incoming(&mut self, why: &str) {
        if let Some(i) = self.incoming.take() {
            self.emit(Output::Ended(RunReport {
                namespace: i.namespace,
                mode: i.mode,
                trigger: Trigger::AntiEntropy,
                outcome: ReconcileOutcome::Failed,
                symbols: i.decoder.symbols() as u64,
                differences: i.differences,
                keys_repaired: i.keys_repaired,
                started: i.started,
                error: Some(why.to_owned()),
            }));
        }
    }

    fn maybe_finish_incoming(&mut self) {
        let done = self
            .incoming
            .as_ref()
            .is_some_and(|i| i.repairs.sent_end && i.peer_ended);
        if done {
            let i = self.incoming.take().expect("checked");
            self.emit(Output::Ended(RunReport {
                namespace: i.namespace,
                mode: i.mode,
                trigger: Trigger::AntiEntropy,
                outcome: ReconcileOutcome::Decoded,
                symbols: i.decoder.symbols() as u64,
                differences: i.differences,
                keys_repaired: i.keys_repaired,
                started: i.started,
                error: None,
            }));
        }
    }

    /// Handles a reconciliation frame from the peer (`ReconcileStart`, `…Symbols`,
    /// `…Credit`, `…End` or `RepairEnd`; `Repair` batches go to the store through the
    /// runtime, which reports them with [`repair_received`](Self::repair_received)
    /// and [`repaired`](Self::repaired)). A `RepairEnd` that covers dots must come
    /// after every repair received before it is applied.
    pub fn handle_frame(&mut self, store: &impl ReconcileStore, frame: Frame, now: Instant) {
        match frame {
            Frame::ReconcileStart {
                id,
                namespace,
                mode,
                items,
                symbols_max,
            } => self.start_incoming(store, id, namespace, mode, items, symbols_max, now),
            Frame::ReconcileSymbols {
                id,
                first_index,
                symbols,
            } => self.incoming_symbols(store, id, first_index, symbols),
            Frame::ReconcileCredit { id, symbols } => {
                if let Some(o) = self.outgoing.as_mut()
                    && o.id == id
                {
                    o.symbols_allowed += symbols as u64;
                }
            }
            // Not the answer to this node's run (none awaits one under this id) but
            // the peer's run under way here: the initiator gave it up (ids of the two
            // directions are counted apart, so the answer goes first when both match).
            Frame::ReconcileEnd { id, outcome, .. }
                if self.incoming.as_ref().is_some_and(|i| i.id == id)
                    && !self
                        .outgoing
                        .as_ref()
                        .is_some_and(|o| o.id == id && !o.repairs.ready) =>
            {
                self.abandon_incoming(&format!("the peer gave the run up ({})", outcome.name()));
            }
            Frame::ReconcileEnd { id, outcome, need } => {
                self.outgoing_ended(store, id, outcome, need, now)
            }
            Frame::RepairEnd {
                id,
                covered,
                repairs,
            } => {
                let received = match (&self.outgoing, &self.incoming) {
                    (Some(o), _) if o.id == id => Some(o.repairs_received),
                    (_, Some(i)) if i.id == id => Some(i.repairs_received),
                    _ => None,
                };
                if let (Some(sent), Some(received)) = (repairs, received)
                    && sent != received
                {
                    // A Repair was lost or overtaken: covering now would claim the
                    // effect of events this node never applied.
                    self.emit(Output::Close {
                        code: ErrorCode::Protocol,
                        message: format!(
                            "reconciliation run {id}: RepairEnd counts {sent} repair events, {received} arrived before it"
                        ),
                    });
                    return;
                }
                if let Some(vector) = covered {
                    let ns = match (&self.outgoing, &self.incoming) {
                        (Some(o), _) if o.id == id && o.repairs.ready => Some(o.namespace.clone()),
                        (_, Some(i)) if i.id == id => Some(i.namespace.clone()),
                        _ => None,
                    };
                    if let Some(ns) = ns {
                        self.covered_received
                            .entry(ns.clone())
                            .or_default()
                            .join(&vector);
                        if let Err(e) = store.cover(&ns, vector) {
                            self.emit(Output::Close {
                                code: ErrorCode::Internal,
                                message: format!("cannot record covered dots: {e}"),
                            });
                            return;
                        }
                    }
                }
                if let Some(o) = self.outgoing.as_mut()
                    && o.id == id
                {
                    o.peer_ended = true;
                    self.maybe_finish_outgoing();
                } else if let Some(i) = self.incoming.as_mut()
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

    /// The responder's `ReconcileEnd` for the run this node started.
    fn outgoing_ended(
        &mut self,
        store: &impl ReconcileStore,
        id: u32,
        outcome: ReconcileOutcome,
        need: Vec<[u8; NEED_PREFIX_BYTES]>,
        now: Instant,
    ) {
        let Some(o) = self.outgoing.as_mut() else {
            return;
        };
        if o.id != id || o.repairs.ready {
            return;
        }
        match outcome {
            ReconcileOutcome::Decoded => {
                o.differences += need.len() as u64;
                let found =
                    store.events_for_items(&o.namespace, &need, REPAIR_KEYS_MAX, REPAIR_BYTES_MAX);
                match found {
                    Ok((events, cut)) => {
                        o.repairs.set(events, !cut);
                        o.complete = !cut;
                    }
                    Err(e) => self.fail_outgoing(e.to_string()),
                }
            }
            ReconcileOutcome::Exhausted if o.mode == ReconcileMode::Window => {
                // The difference is larger than the window: again from scans.
                let o = self.outgoing.take().expect("running");
                self.emit(Output::Ended(RunReport {
                    namespace: o.namespace.clone(),
                    mode: o.mode,
                    trigger: o.trigger,
                    outcome,
                    symbols: o.symbols_sent,
                    differences: 0,
                    keys_repaired: 0,
                    started: o.started,
                    error: None,
                }));
                self.start_outgoing(store, o.namespace, ReconcileMode::Full, o.trigger, now);
            }
            other => {
                let o = self.outgoing.take().expect("running");
                self.emit(Output::Ended(RunReport {
                    namespace: o.namespace.clone(),
                    mode: o.mode,
                    trigger: o.trigger,
                    outcome: other,
                    symbols: o.symbols_sent,
                    differences: 0,
                    keys_repaired: 0,
                    started: o.started,
                    error: Some(format!("the peer answered {}", other.name())),
                }));
                if o.trigger == Trigger::Handover {
                    self.retry_handover(o.namespace);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_incoming(
        &mut self,
        store: &impl ReconcileStore,
        id: u32,
        namespace: Namespace,
        mode: ReconcileMode,
        items: u64,
        symbols_max: u64,
        now: Instant,
    ) {
        self.peer_runs_started = Some(id);
        let refuse = |r: &mut Reconciler, why: String| {
            r.emit(Output::Notice {
                warn: false,
                message: format!("refused a reconciliation of namespace {namespace}: {why}"),
            });
            r.emit(Output::Send(Frame::ReconcileEnd {
                id,
                outcome: ReconcileOutcome::Refused,
                need: Vec::new(),
            }));
        };
        // The peer runs one at a time and starts the next only after this node's
        // end of the last one reached it, and after its own `RepairEnd` (or the
        // `ReconcileEnd` that gives it up) went out: on an ordered stream no run is
        // under way here now. One is if the stream repeated or reordered frames;
        // going on would drop the late `RepairEnd` and its covered dots unnoticed.
        if let Some(i) = &self.incoming {
            let message = if i.id == id {
                format!("a second ReconcileStart for run {id}")
            } else {
                format!(
                    "a ReconcileStart of run {id} while run {} is under way",
                    i.id
                )
            };
            self.emit(Output::Close {
                code: ErrorCode::Protocol,
                message,
            });
            return;
        }
        // As this node starts none for it: the states differ by design until an
        // operator resolves the quarantine (a transfer, which only brings state in,
        // goes ahead).
        if mode != ReconcileMode::Transfer && store.is_quarantined(&namespace) {
            return refuse(self, "the namespace has quarantined events here".into());
        }
        // Not a symbol, repair or covered vector of it goes to a peer it is kept from.
        if self.withheld(&namespace) {
            return refuse(self, "its residency rule keeps it from this peer".into());
        }
        // In transfer mode this node sends no state: it covers nothing for the peer.
        let covered = if mode == ReconcileMode::Transfer {
            VersionVector::default()
        } else {
            store.namespace_vector(&namespace)
        };
        let local = match mode {
            ReconcileMode::Window => {
                if !store.keeps_windows() {
                    return refuse(self, "this node keeps no windows".into());
                }
                store
                    .window(&namespace)
                    .map(|w| (Source::Window(w.symbols().to_vec()), 0))
            }
            ReconcileMode::Full => store.items(&namespace).map(|items| {
                let n = items.len() as u64;
                let ext = Extension::new(store.item_key(), items, 0);
                (Source::Scan(Box::new(ext)), n)
            }),
            ReconcileMode::Transfer => Ok((Source::None, 0)),
        };
        let (local, local_items) = match local {
            Ok(x) => x,
            Err(e) => return refuse(self, format!("storage error: {e}")),
        };
        let symbols_max = match &local {
            Source::Window(w) => symbols_max.min(w.len() as u64),
            Source::Scan(_) => symbols_max
                .min(FULL_SYMBOLS_PER_ITEM * (items + local_items) + 1024)
                .min(SYMBOLS_MAX),
            Source::None => 0,
        };
        self.incoming = Some(Incoming {
            id,
            namespace,
            mode,
            local,
            decoder: Decoder::new(store.item_key()),
            symbols_max,
            granted: RECONCILE_INITIAL_SYMBOLS as u64,
            ended: false,
            repairs: Repairs::new(covered),
            repairs_received: 0,
            peer_ended: false,
            differences: 0,
            keys_repaired: 0,
            started: now,
        });
    }

    fn incoming_symbols(
        &mut self,
        store: &impl ReconcileStore,
        id: u32,
        first_index: u64,
        symbols: Vec<Symbol>,
    ) {
        // Symbols of a run the peer never started here came before their
        // `ReconcileStart`: a reordered stream, which would leave both runs waiting.
        // (Ids wrap after 2^32 runs: "later" is within half the range ahead.)
        if self
            .peer_runs_started
            .is_none_or(|last| id != last && id.wrapping_sub(last) < 1 << 31)
        {
            self.emit(Output::Close {
                code: ErrorCode::Protocol,
                message: format!("reconciliation symbols of run {id} before its start"),
            });
            return;
        }
        let Some(i) = self.incoming.as_mut() else {
            return; // Symbols in flight when this node ended or refused the run.
        };
        if i.id != id || i.ended {
            return; // Symbols that were in flight when this node ended the run.
        }
        if first_index != i.decoder.symbols() as u64 {
            let message = format!(
                "reconciliation symbols from index {first_index}, expected {}",
                i.decoder.symbols()
            );
            self.emit(Output::Close {
                code: ErrorCode::Protocol,
                message,
            });
            return;
        }
        let count = symbols.len() as u64;
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
            let credit = if i.granted < received + ahead / 2 {
                let more = (received + ahead - i.granted).min(1 << 20);
                i.granted += more;
                Some(more)
            } else {
                None
            };
            self.emit(Output::Symbols(count));
            if let Some(more) = credit {
                self.emit(Output::Send(Frame::ReconcileCredit {
                    id,
                    symbols: more as u32,
                }));
            }
            return;
        };
        self.emit(Output::Symbols(count));
        let i = self.incoming.as_mut().expect("running");
        i.ended = true;
        if outcome != ReconcileOutcome::Decoded {
            let i = self.incoming.take().expect("running");
            self.emit(Output::Send(Frame::ReconcileEnd {
                id,
                outcome,
                need: Vec::new(),
            }));
            let error = match (failed, outcome) {
                (true, _) => Some(
                    "the peer's symbols are inconsistent with this node's (do both nodes use the same reconcile_key?)"
                        .to_owned(),
                ),
                (false, ReconcileOutcome::Failed) => Some(format!(
                    "not decoded within {received} symbols (nodes with different reconcile_keys end like this too)"
                )),
                _ => None,
            };
            self.emit(Output::Ended(RunReport {
                namespace: i.namespace,
                mode: i.mode,
                trigger: Trigger::AntiEntropy,
                outcome,
                symbols: received,
                differences: 0,
                keys_repaired: 0,
                started: i.started,
                error,
            }));
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
        if crate::mutation::active(crate::mutation::Mutation::ReconcileDropsLocalSide) {
            mine.clear();
        }
        need.sort_unstable();
        need.dedup();
        mine.sort_unstable();
        mine.dedup();
        need.truncate(REPAIR_KEYS_MAX);
        i.differences = (need.len() + mine.len()) as u64;
        let found = store.events_for_items(&i.namespace, &mine, REPAIR_KEYS_MAX, REPAIR_BYTES_MAX);
        match found {
            Ok((events, cut)) => i.repairs.set(events, !cut),
            Err(e) => {
                let message = format!(
                    "cannot read the repairs of namespace {} for the peer: {e}",
                    i.namespace
                );
                i.repairs.set(Vec::new(), false);
                self.emit(Output::Notice {
                    warn: true,
                    message,
                });
            }
        }
        self.emit(Output::Send(Frame::ReconcileEnd { id, outcome, need }));
    }

    /// Counts repair events received for run `id` (before they are applied).
    pub fn repair_received(&mut self, id: u32, events: usize) {
        if let Some(o) = self.outgoing.as_mut()
            && o.id == id
        {
            o.repairs_received += events as u64;
            if o.mode != ReconcileMode::Transfer {
                o.differences += events as u64;
            }
        } else if let Some(i) = self.incoming.as_mut()
            && i.id == id
        {
            i.repairs_received += events as u64;
        }
    }

    /// Counts repair events of run `id` applied.
    pub fn repaired(&mut self, id: u32, applied: usize) {
        if let Some(o) = self.outgoing.as_mut()
            && o.id == id
        {
            o.keys_repaired += applied as u64;
        } else if let Some(i) = self.incoming.as_mut()
            && i.id == id
        {
            i.keys_repaired += applied as u64;
        }
    }
}

/// Takes events off the front of `queue`, up to a frame's worth.
fn take_batch(queue: &mut VecDeque<Event>, bytes_max: usize) -> Vec<Event> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    while let Some(e) = queue.front() {
        let size = credit_size(e);
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
