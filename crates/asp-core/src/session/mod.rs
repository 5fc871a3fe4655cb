//! The replication session between two nodes, as a sans-IO state machine: frames and
//! time go in through `handle_*`, frames to send and events for the node come out
//! through `poll_*`. It never reads a clock, a socket or a file; the runtime (asp-node)
//! drives it over a real connection, and tests and the simulator drive it directly.
//!
//! A session is symmetric: each side sends and receives events. On the sending side it
//! keeps a view of what the peer holds (its summary, plus every dot sent to it or
//! received from it) and leaves those events out, which is what stops events from
//! looping around cycles. Credit-based flow control bounds what is in flight: the
//! sender may only send while the peer has granted credit; when it has none it stops,
//! and the runtime resumes reading its feed later, so nothing queues in memory.
//!
//! Size: one state machine — the handshake, every frame's handling and the send side
//! share its fields (state, credit, positions, the peer's view and pruned origins);
//! frames, reconciliation, relay-tree decisions and link rules live in child modules.

mod config;
mod frame;
mod reconcile;
mod relay;
mod rules;

use frame::frame_name;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

pub use frame::{
    ALL_NAMESPACES, ErrorCode, Frame, GOSSIP_BYTES_MAX, Hello, MEMBER_TEXT_BYTES_MAX, MEMBERS_MAX,
    MemberEntry, NEED_PREFIX_BYTES, NamespaceSummary, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
    RECONCILE_INITIAL_SYMBOLS, RELAY_ORIGINS_MAX, REPORTS_MAX, ReconcileMode, ReconcileOutcome,
    SUMMARY_NAMESPACES_MAX, SUMMARY_PART_BYTES, SUMMARY_PART_NAMESPACES_MAX, VectorReport,
    credit_size, summary_parts,
};

pub use config::SessionConfig;
pub use relay::{RELAY_TREE_ORIGINS_MAX, RelayTree};
pub use rules::{Federation, Refuses, SHARE_REFUSAL, Withhold, constant_time_eq, intersect, lists};

pub use reconcile::{
    Output as ReconcileOutput, REPAIR_BYTES_MAX, REPAIR_EVENTS_PER_FRAME, REPAIR_KEYS_MAX,
    ReconcileStore, Reconciler, RunReport, SummaryMap, Trigger,
};

use crate::mutation::{self, Mutation};
use crate::{Event, Namespace, NodeId, VersionVector};

/// Frames waiting to be sent, at most. The runtime drains them after every input, so
/// this only guards against a runtime that stops draining.
const OUTBOX_MAX: usize = 1024;

/// What the node learns about its peer in the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub node_id: NodeId,
    pub version: u16,
    pub labels: Vec<(String, String)>,
    pub namespaces: Vec<String>,
    /// The peer's run (0 if its build does not send one).
    pub incarnation: u64,
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseReason {
    pub code: ErrorCode,
    pub message: String,
    /// Whether the peer closed it (it sent the error) rather than this node.
    pub by_peer: bool,
}

/// What the session tells the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The handshake succeeded.
    Established(PeerInfo),
    /// The peer's summary (the first one, and each refresh).
    PeerSummary(Vec<NamespaceSummary>),
    /// Events to apply. Call [`Session::applied`] once they are durable, in the order
    /// received.
    Events {
        first_seq: u64,
        last_seq: u64,
        events: Vec<Event>,
        /// Their cost against this node's credit, returned by `applied`.
        bytes: u64,
    },
    /// The peer holds durably everything of this node's feed up to `through_seq`.
    Acked {
        through_seq: u64,
    },
    /// The members of the cluster the peer knows.
    Members(Vec<MemberEntry>),
    /// The peer's feed head, from its heartbeat.
    PeerHead {
        head_seq: u64,
    },
    /// A reconciliation frame (`ReconcileStart`, `ReconcileSymbols`, `ReconcileCredit`,
    /// `ReconcileEnd`, `RepairEnd`), for the node's reconciliation driver.
    Reconcile(Frame),
    /// Repair events to apply. Call [`Session::repaired`] once they are applied.
    Repair {
        id: u32,
        events: Vec<Event>,
        bytes: u64,
    },
    Closed(CloseReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Our Hello is sent; waiting for the peer's.
    AwaitHello,
    /// Handshake done; events flow once the peer's first summary is in.
    Established,
    Closed,
}

pub struct Session {
    config: SessionConfig,
    /// The accepting side: its Hello waits for the dialer's.
    accepting: bool,
    state: State,
    peer: Option<PeerInfo>,
    outbox: VecDeque<Frame>,
    events: VecDeque<SessionEvent>,
    started: Instant,
    last_received: Instant,
    last_sent: Instant,
    /// The peer's holdings as far as this node knows: never shrinks within a session.
    peer_view: HashMap<Namespace, VersionVector>,
    have_peer_summary: bool,
    /// Parts of the peer's summary received so far (its `Summary` frame ends it).
    summary_parts: Vec<NamespaceSummary>,
    summary_left_out: usize,
    /// Bytes this node may still send (may dip below zero by one batch).
    send_credit: i64,
    /// Bytes the peer may still send to this node before it exceeds its credit.
    recv_allowance: i64,
    local_head: u64,
    /// The highest feed position sent, so that ranges never go backwards.
    last_sent_seq: u64,
    /// The last feed position the peer sent: its next batch must start right after.
    last_received_seq: Option<u64>,
    /// Where the first batch received on this link began (named in every Ack).
    first_received_seq: Option<u64>,
    /// Where the first batch sent on this link began (checked in every Ack).
    first_sent_seq: Option<u64>,
    /// Bytes of events sent per namespace, not yet taken (for residency's status).
    sent_bytes: HashMap<Namespace, u64>,
    /// Feed positions read but not yet framed because the peer held all their events:
    /// they ride with the next batch, or go alone on [`Session::flush_events`].
    unframed: Option<(u64, u64)>,
    /// Origins whose events the peer asked not to be relayed to it (`Prune`): it gets
    /// them by another path. Never this node's own.
    lazy: HashSet<NodeId>,
    /// Events left out because their origin is in `lazy`.
    relay_skipped: u64,
}

impl Session {
    /// Starts the dialing side's session on a fresh connection; its Hello is queued at
    /// once.
    pub fn new(config: SessionConfig, now: Instant) -> Self {
        let hello = hello_frame(&config);
        let mut session = Session::with_state(config, false, now);
        session.queue(hello, now);
        session
    }

    /// Starts the accepting side's session: it sends its Hello only once the dialer's
    /// has passed every check, so a refused dialer learns nothing about this node — not
    /// its cluster id, node id, labels or namespaces. (A dialer of an earlier build
    /// sends its Hello first too, so it is served unchanged.)
    pub fn accept(config: SessionConfig, now: Instant) -> Self {
        Session::with_state(config, true, now)
    }

    fn with_state(config: SessionConfig, accepting: bool, now: Instant) -> Self {
        Session {
            config,
            accepting,
            state: State::AwaitHello,
            peer: None,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            started: now,
            last_received: now,
            last_sent: now,
            peer_view: HashMap::new(),
            have_peer_summary: false,
            summary_parts: Vec::new(),
            summary_left_out: 0,
            send_credit: 0,
            recv_allowance: 0,
            local_head: 0,
            last_sent_seq: 0,
            last_received_seq: None,
            first_received_seq: None,
            first_sent_seq: None,
            unframed: None,
            sent_bytes: HashMap::new(),
            lazy: HashSet::new(),
            relay_skipped: 0,
        }
    }

    pub fn peer(&self) -> Option<&PeerInfo> {
        self.peer.as_ref()
    }

    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    fn queue(&mut self, frame: Frame, now: Instant) {
        debug_assert!(
            self.outbox.len() < OUTBOX_MAX,
            "the runtime stopped draining frames"
        );
        self.outbox.push_back(frame);
        self.last_sent = now;
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.outbox.pop_front()
    }

    /// The next thing for the node to act on.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// When [`Session::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Closed => None,
            State::AwaitHello => Some(
                (self.started + self.config.handshake_timeout)
                    .min(self.last_received + self.config.idle_timeout),
            ),
            State::Established => Some(
                (self.last_sent + self.config.heartbeat)
                    .min(self.last_received + self.config.idle_timeout),
            ),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Closed => {}
            State::AwaitHello => {
                if now >= self.started + self.config.handshake_timeout {
                    let ms = self.config.handshake_timeout.as_millis();
                    self.close(
                        ErrorCode::HandshakeTimeout,
                        format!("no Hello from the peer within {ms} ms"),
                        now,
                    );
                }
            }
            State::Established => {
                if now >= self.last_received + self.config.idle_timeout {
                    let ms = self.config.idle_timeout.as_millis();
                    self.close(
                        ErrorCode::IdleTimeout,
                        format!("nothing heard from the peer for {ms} ms"),
                        now,
                    );
                } else {
                    self.keep_alive(now);
                }
            }
        }
    }

    /// Queues a heartbeat if one is due, without the idle check: for a runtime busy
    /// waiting on its store, which reads nothing meanwhile (the peer's silence then
    /// proves nothing) but must still be heard by the peer.
    pub fn keep_alive(&mut self, now: Instant) {
        if self.state == State::Established && now >= self.last_sent + self.config.heartbeat {
            let head_seq = self.local_head;
            // The wall clock is not ours to read: the runtime stamps it.
            self.queue(
                Frame::Heartbeat {
                    head_seq,
                    wall_ms: 0,
                },
                now,
            );
        }
    }

    /// The runtime read nothing from the peer from `since` to `now` (it was busy): that
    /// time does not count as the peer's silence. The frames it sent meanwhile wait in
    /// the socket, and the idle timeout must not fire before they are read.
    pub fn not_read(&mut self, since: Instant, now: Instant) {
        if now > since {
            self.last_received = (self.last_received + (now - since)).min(now);
        }
    }

    /// Closes the session from this side: an Error frame naming the reason is queued
    /// as the last frame.
    pub fn close(&mut self, code: ErrorCode, message: impl Into<String>, now: Instant) {
        let message = message.into();
        self.close_telling(code, message.clone(), message, now);
    }

    /// Ends the session, telling the peer `remote` and this node `message`.
    fn close_telling(&mut self, code: ErrorCode, message: String, remote: String, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        self.outbox.clear();
        self.queue(
            Frame::Error {
                code,
                message: remote,
            },
            now,
        );
        self.state = State::Closed;
        self.events.push_back(SessionEvent::Closed(CloseReason {
            code,
            message,
            by_peer: false,
        }));
    }

    /// The connection ended without an Error frame.
    pub fn handle_disconnect(&mut self, detail: impl Into<String>) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        self.events.push_back(SessionEvent::Closed(CloseReason {
            code: ErrorCode::Protocol,
            message: format!("connection lost: {}", detail.into()),
            by_peer: true,
        }));
    }

    pub fn handle_frame(&mut self, frame: Frame, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        self.last_received = now;
        match (self.state, frame) {
            (_, Frame::Error { code, message }) => {
                self.state = State::Closed;
                self.outbox.clear();
                self.events.push_back(SessionEvent::Closed(CloseReason {
                    code,
                    message,
                    by_peer: true,
                }));
            }
            (State::AwaitHello, Frame::Hello(hello)) => self.handle_hello(hello, now),
            (State::AwaitHello, other) => {
                self.close(
                    ErrorCode::Protocol,
                    format!("expected Hello first, got {}", frame_name(&other)),
                    now,
                );
            }
            (State::Established, Frame::Hello(_)) => {
                self.close(ErrorCode::Protocol, "a second Hello", now);
            }
            (State::Established, Frame::SummaryPart(part)) => {
                let held = self.summary_parts.len() + part.len();
                if self.peer.as_ref().is_some_and(|p| p.version < 2) {
                    self.close(
                        ErrorCode::Protocol,
                        "a SummaryPart on a protocol version 1 link",
                        now,
                    );
                } else if held > SUMMARY_NAMESPACES_MAX {
                    let message = format!(
                        "a summary of more than {SUMMARY_NAMESPACES_MAX} namespaces ({held} so far)"
                    );
                    self.close(ErrorCode::Protocol, message, now);
                } else {
                    self.join_peer_view(&part);
                    self.summary_parts.extend(part);
                }
            }
            (State::Established, Frame::Summary(last)) => {
                self.join_peer_view(&last);
                let mut summary = std::mem::take(&mut self.summary_parts);
                if summary.is_empty() {
                    summary = last;
                } else {
                    summary.extend(last);
                }
                // What the peer says of namespaces this node does not replicate with it
                // (its own list, or the peer's rights) is not this node's business.
                summary.retain(|s| self.replicates(&s.namespace));
                self.have_peer_summary = true;
                self.events.push_back(SessionEvent::PeerSummary(summary));
            }
            (
                State::Established,
                Frame::Events {
                    first_seq,
                    last_seq,
                    events,
                },
            ) => {
                self.handle_events(first_seq, last_seq, events, now);
            }
            (
                State::Established,
                Frame::Ack {
                    from_seq,
                    through_seq,
                },
            ) => {
                if self.first_sent_seq != Some(from_seq)
                    && !mutation::active(Mutation::UncheckedStreamOrder)
                {
                    let message = format!(
                        "ack from feed position {from_seq}, but this link's first batch began at {}: a batch was lost or reordered",
                        self.first_sent_seq
                            .map_or("nothing sent".to_owned(), |s| s.to_string())
                    );
                    self.close(ErrorCode::Protocol, message, now);
                } else if through_seq > self.last_sent_seq {
                    self.close(
                        ErrorCode::Protocol,
                        format!(
                            "ack of position {through_seq}, but only {} was sent",
                            self.last_sent_seq
                        ),
                        now,
                    );
                } else {
                    self.events.push_back(SessionEvent::Acked { through_seq });
                }
            }
            (State::Established, Frame::Credit { bytes }) => {
                self.send_credit += bytes as i64;
            }
            (State::Established, Frame::Members(_))
                if self.peer.as_ref().is_some_and(|p| p.version < 4) =>
            {
                self.close(
                    ErrorCode::Protocol,
                    "a Members frame on a link of protocol version 3 or less",
                    now,
                );
            }
            (State::Established, Frame::Members(members)) => {
                self.events.push_back(SessionEvent::Members(members));
            }
            (State::Established, frame @ (Frame::Prune { .. } | Frame::Graft { .. }))
                if self.peer.as_ref().is_some_and(|p| p.version < 5) =>
            {
                let message = format!(
                    "a {} frame on a link of protocol version 4 or less",
                    frame_name(&frame)
                );
                self.close(ErrorCode::Protocol, message, now);
            }
            (State::Established, Frame::Prune { origins }) => {
                let own = self.config.node_id;
                self.lazy.extend(origins.into_iter().filter(|&o| o != own));
            }
            (State::Established, Frame::Graft { origins }) => {
                if origins.is_empty() {
                    self.lazy.clear();
                } else {
                    for origin in origins {
                        self.lazy.remove(&origin);
                    }
                }
            }
            (State::Established, Frame::Heartbeat { head_seq, .. }) => {
                self.events.push_back(SessionEvent::PeerHead { head_seq });
            }
            (State::Established, Frame::Repair { id, events }) => {
                self.handle_repair(id, events, now);
            }
            (State::Established, Frame::ReconcileStart { namespace, .. })
                if !self.replicates(&namespace) =>
            {
                let message = format!(
                    "reconciliation of namespace {namespace}, which this node does not replicate"
                );
                self.close(ErrorCode::Protocol, message, now);
            }
            (
                State::Established,
                Frame::RepairEnd {
                    repairs: Some(_), ..
                },
            ) if self.peer.as_ref().is_some_and(|p| p.version < 3) => {
                self.close(
                    ErrorCode::Protocol,
                    "a RepairEnd with a repair count on a protocol version 1 or 2 link",
                    now,
                );
            }
            (
                State::Established,
                frame @ (Frame::ReconcileStart { .. }
                | Frame::ReconcileSymbols { .. }
                | Frame::ReconcileCredit { .. }
                | Frame::ReconcileEnd { .. }
                | Frame::RepairEnd { .. }),
            ) => {
                self.events.push_back(SessionEvent::Reconcile(frame));
            }
            (State::Closed, _) => {}
        }
    }

    fn handle_hello(&mut self, hello: Hello, now: Instant) {
        let version = self.config.version_max.min(hello.version_max);
        if version < self.config.version_min.max(hello.version_min) {
            let message = format!(
                "no common protocol version: this node speaks {}..={}, the peer {}..={}",
                self.config.version_min,
                self.config.version_max,
                hello.version_min,
                hello.version_max
            );
            return self.close(ErrorCode::VersionMismatch, message, now);
        }
        // The cluster id is what a process must know to pass as a member: compared
        // in constant time, so the time a refusal takes says nothing of how much of it
        // a guess got right.
        // A link to another cluster (through a share) expects that cluster's id.
        let expected = match &self.config.federation {
            Some(f) => f.peer_cluster_id.as_bytes(),
            None => self.config.cluster_id.as_bytes(),
        };
        if !constant_time_eq(hello.cluster_id.as_bytes(), expected) {
            // The peer is told only that its cluster id is not this node's: naming this
            // node's would hand any process that can reach the port what it needs to
            // pass as a member.
            let local = format!(
                "the peer is in cluster {:?}, this node in cluster {:?}",
                hello.cluster_id, self.config.cluster_id
            );
            let remote = format!(
                "cluster id {:?} is not this node's cluster",
                hello.cluster_id
            );
            return self.close_telling(ErrorCode::ClusterMismatch, local, remote, now);
        }
        if hello.node_id == self.config.node_id
            && hello.incarnation != 0
            && self.config.incarnation != 0
            && hello.incarnation != self.config.incarnation
        {
            let message = format!(
                "another process runs with this node's id {} (incarnation {:016x}; this one is {:016x}): a copy of this node's data directory? Give each copy its own data directory with its own node id",
                hello.node_id, hello.incarnation, self.config.incarnation
            );
            return self.close(ErrorCode::NodeConflict, message, now);
        }
        if hello.node_id == self.config.node_id {
            return self.close(
                ErrorCode::SelfConnection,
                format!("node {} connected to itself", hello.node_id),
                now,
            );
        }
        self.peer = Some(PeerInfo {
            node_id: hello.node_id,
            version,
            labels: hello.labels,
            namespaces: hello.namespaces,
            incarnation: hello.incarnation,
        });
        self.state = State::Established;
        if self.accepting {
            let hello = hello_frame(&self.config);
            self.queue(hello, now);
        }
        let window = self.config.credit_window_bytes;
        self.recv_allowance = window as i64;
        self.queue(Frame::Credit { bytes: window }, now);
        self.events.push_back(SessionEvent::Established(
            self.peer.clone().expect("just set"),
        ));
    }

    fn handle_events(
        &mut self,
        first_seq: u64,
        last_seq: u64,
        mut events: Vec<Event>,
        now: Instant,
    ) {
        if first_seq > last_seq || first_seq == 0 {
            return self.close(
                ErrorCode::Protocol,
                format!("bad feed range {first_seq}..={last_seq}"),
                now,
            );
        }
        // Batches cover the sender's feed without gaps or overlaps: an acknowledgement
        // promises everything up to a position, so a batch lost, repeated or reordered
        // on the way must end the link rather than be acknowledged past.
        if let Some(previous) = self.last_received_seq
            && first_seq != previous + 1
            && !mutation::active(Mutation::UncheckedStreamOrder)
        {
            let message = format!(
                "batch starts at feed position {first_seq}, expected {}",
                previous + 1
            );
            return self.close(ErrorCode::Protocol, message, now);
        }
        self.last_received_seq = Some(last_seq);
        let from_seq = *self.first_received_seq.get_or_insert(first_seq);
        if events.len() > 1 && mutation::active(Mutation::DropLastOfBatch) {
            events.pop();
        }
        let Some(bytes) = self.receive(&events, "an event", now) else {
            return;
        };
        self.events.push_back(SessionEvent::Events {
            first_seq,
            last_seq,
            events,
            bytes,
        });
        if mutation::active(Mutation::AckOnReceipt) {
            let ack = Frame::Ack {
                from_seq,
                through_seq: last_seq,
            };
            self.queue(ack, now);
        }
    }

    fn handle_repair(&mut self, id: u32, events: Vec<Event>, now: Instant) {
        if let Some(bytes) = self.receive(&events, "a repair event", now) {
            self.events
                .push_back(SessionEvent::Repair { id, events, bytes });
        }
    }

    /// Checks received events (feed or repair: `what`) against the namespaces this node
    /// replicates and against its credit, and notes that the peer holds them. Returns
    /// their credit cost, or `None` once the link is closed over them.
    fn receive(&mut self, events: &[Event], what: &str, now: Instant) -> Option<u64> {
        let mut bytes = 0;
        for event in events {
            if !self.replicates(&event.namespace) {
                let message = format!(
                    "{what} of namespace {}, which this node does not replicate",
                    event.namespace
                );
                self.close(ErrorCode::Protocol, message, now);
                return None;
            }
            if let Some(reason) = self
                .config
                .federation
                .as_ref()
                .and_then(|f| (f.refuses)(event))
            {
                let message = format!("{what} {SHARE_REFUSAL}: {reason}");
                self.close(ErrorCode::Protocol, message, now);
                return None;
            }
            bytes += credit_size(event);
            // The peer holds what it sends: never send it back.
            self.peer_view
                .entry(event.namespace.clone())
                .or_default()
                .insert(event.dot);
        }
        self.recv_allowance -= bytes as i64;
        // One batch may overdraw; more is a peer that ignores flow control.
        if self.recv_allowance < -(self.config.credit_window_bytes as i64) {
            self.close(
                ErrorCode::FlowControl,
                "the peer sent more than twice its credit",
                now,
            );
            return None;
        }
        Some(bytes)
    }

    /// Whether this node replicates `namespace` (by its own configuration).
    fn replicates(&self, namespace: &Namespace) -> bool {
        lists(&self.config.namespaces, namespace)
    }

    /// Whether the peer wants events of `namespace` (and may have them).
    pub fn peer_wants(&self, namespace: &Namespace) -> bool {
        self.replicates(namespace)
            && !self
                .config
                .withhold
                .as_ref()
                .is_some_and(|w| w.withholds(namespace))
            && self
                .peer
                .as_ref()
                .is_some_and(|p| lists(&p.namespaces, namespace))
    }

    /// Events applied durably, through the sender's position `through_seq`: queues the
    /// acknowledgement and returns `bytes` of credit to the peer.
    pub fn applied(&mut self, through_seq: u64, bytes: u64, now: Instant) {
        if self.state != State::Established {
            return;
        }
        let Some(from_seq) = self.first_received_seq else {
            return; // Nothing was received: nothing to acknowledge.
        };
        self.queue(
            Frame::Ack {
                from_seq,
                through_seq,
            },
            now,
        );
        if bytes > 0 {
            self.recv_allowance += bytes as i64;
            self.queue(
                Frame::Credit {
                    bytes: bytes.min(u32::MAX as u64) as u32,
                },
                now,
            );
        }
    }

    /// Repair events applied: returns their `bytes` of credit to the peer.
    pub fn repaired(&mut self, bytes: u64, now: Instant) {
        if self.state == State::Established && bytes > 0 {
            self.recv_allowance += bytes as i64;
            self.queue(
                Frame::Credit {
                    bytes: bytes.min(u32::MAX as u64) as u32,
                },
                now,
            );
        }
    }

    /// Bytes of credit the peer grants now, for repairs as for events (may be
    /// negative by one batch).
    pub fn credit(&self) -> i64 {
        self.send_credit
    }

    /// Sends repair events for reconciliation `id`, whatever the peer's vector says
    /// (reconciliation found it lacks them), charged to its credit. Call while
    /// [`Session::credit`] is positive.
    pub fn send_repair(&mut self, id: u32, mut events: Vec<Event>, now: Instant) -> u64 {
        if self.state != State::Established {
            return 0;
        }
        if let Some(f) = &self.config.federation {
            events.retain(|e| (f.may_send)(e));
        }
        let mut bytes = 0;
        for event in &events {
            bytes += credit_size(event);
            self.peer_view
                .entry(event.namespace.clone())
                .or_default()
                .insert(event.dot);
        }
        self.send_credit -= bytes as i64;
        self.queue(Frame::Repair { id, events }, now);
        bytes
    }

    /// Queues a reconciliation frame other than `Repair`.
    pub fn send_reconcile(&mut self, frame: Frame, now: Instant) {
        debug_assert!(matches!(
            frame,
            Frame::ReconcileStart { .. }
                | Frame::ReconcileSymbols { .. }
                | Frame::ReconcileCredit { .. }
                | Frame::ReconcileEnd { .. }
                | Frame::RepairEnd { .. }
        ));
        if self.state == State::Established {
            self.queue(frame, now);
        }
    }

    /// Sends this node's summary (after the handshake, and from time to time): in parts
    /// when it is too large for one frame (see [`summary_parts`]). A peer of protocol
    /// version 1 gets only the first part; [`Session::summary_left_out`] says how many
    /// namespaces that left out.
    pub fn send_summary(&mut self, summary: Vec<NamespaceSummary>, now: Instant) {
        if self.state != State::Established {
            return;
        }
        let summary = summary
            .into_iter()
            .filter(|s| self.peer_wants(&s.namespace))
            .collect();
        let mut parts = summary_parts(summary);
        if self.peer.as_ref().is_some_and(|p| p.version < 2) {
            let first = parts.remove(0);
            self.summary_left_out = parts.iter().map(Vec::len).sum();
            self.queue(Frame::Summary(first), now);
            return;
        }
        let last = parts.pop().expect("at least one part");
        for part in parts {
            self.queue(Frame::SummaryPart(part), now);
        }
        self.queue(Frame::Summary(last), now);
    }

    fn count_sent(&mut self, namespace: Namespace, bytes: u64) {
        if bytes > 0 {
            *self.sent_bytes.entry(namespace).or_default() += bytes;
        }
    }

    /// Bytes of events sent per namespace since the last call (for residency's status).
    pub fn take_sent_bytes(&mut self) -> HashMap<Namespace, u64> {
        std::mem::take(&mut self.sent_bytes)
    }

    /// Namespaces left out of the last summary sent, because the peer speaks protocol
    /// version 1 and the summary did not fit one frame.
    pub fn summary_left_out(&self) -> usize {
        self.summary_left_out
    }

    fn join_peer_view(&mut self, summary: &[NamespaceSummary]) {
        for ns in summary {
            self.peer_view
                .entry(ns.namespace.clone())
                .or_default()
                .join(&ns.vector);
        }
    }

    /// Tells the session this node's feed head, for heartbeats.
    pub fn set_local_head(&mut self, head_seq: u64) {
        self.local_head = head_seq;
    }

    /// Whether events may be sent now: the peer's summary is in and it has credit.
    pub fn can_send(&self) -> bool {
        self.state == State::Established && self.have_peer_summary && self.send_credit > 0
    }

    /// Bytes of events the peer accepts now.
    pub fn send_credit(&self) -> u64 {
        self.send_credit.max(0) as u64
    }

    /// Sends the members this node knows, if the link is up and the peer speaks
    /// protocol 4 or later.
    pub fn send_members(&mut self, members: Vec<MemberEntry>) {
        if self.state == State::Established && self.peer.as_ref().is_some_and(|p| p.version >= 4) {
            self.outbox.push_back(Frame::Members(members));
        }
    }

    /// Asks the peer to stop relaying events of `origins` to this node (if it speaks
    /// protocol 5). Returns whether the frame went.
    pub fn send_prune(&mut self, origins: Vec<NodeId>, now: Instant) -> bool {
        self.send_relay(Frame::Prune { origins }, now)
    }

    /// Asks the peer to relay events of `origins` (all, if empty) again.
    pub fn send_graft(&mut self, origins: Vec<NodeId>, now: Instant) -> bool {
        self.send_relay(Frame::Graft { origins }, now)
    }

    fn send_relay(&mut self, frame: Frame, now: Instant) -> bool {
        if !self.peer_relays_by_tree() {
            return false;
        }
        let origins = match &frame {
            Frame::Prune { origins } | Frame::Graft { origins } => origins,
            _ => unreachable!("only Prune and Graft"),
        };
        if origins.len() > RELAY_ORIGINS_MAX {
            // Too many at once: for a graft, all of them; a prune waits for later.
            if matches!(frame, Frame::Graft { .. }) {
                self.queue(Frame::Graft { origins: vec![] }, now);
                return true;
            }
            let mut origins = origins.clone();
            origins.truncate(RELAY_ORIGINS_MAX);
            self.queue(Frame::Prune { origins }, now);
            return true;
        }
        self.queue(frame, now);
        true
    }

    /// Whether the peer speaks protocol 5 (it takes `Prune` and `Graft`).
    pub fn peer_relays_by_tree(&self) -> bool {
        self.state == State::Established && self.peer.as_ref().is_some_and(|p| p.version >= 5)
    }

    /// Events of this node's feed left out because the peer pruned their origin, and
    /// how many origins it pruned now.
    pub fn relay_state(&self) -> (u64, usize) {
        (self.relay_skipped, self.lazy.len())
    }

    /// Sends events read from this node's feed at positions `first_seq..=last_seq`,
    /// leaving out what the peer holds or does not want. Returns how many events were
    /// sent and the bytes charged to the peer's credit. Call only when
    /// [`Session::can_send`].
    ///
    /// Positions whose events were all left out cost nothing and are not framed at
    /// once (a peer that already holds most of the feed would otherwise get a frame
    /// per read); they join the next batch, or go alone on [`Session::flush_events`],
    /// which the runtime calls once it has read all of its feed.
    pub fn send_events(
        &mut self,
        first_seq: u64,
        last_seq: u64,
        events: Vec<Event>,
        now: Instant,
    ) -> (usize, u64) {
        debug_assert!(self.can_send(), "send_events without credit or summary");
        debug_assert!(
            first_seq > self.last_sent_seq && first_seq <= last_seq,
            "feed ranges must move forward"
        );
        let mut bytes = 0;
        let mut out = Vec::with_capacity(events.len());
        // Feed batches come in runs of one namespace: whether the peer wants it (a
        // residency predicate among the rest) and the bytes counted per namespace are
        // worked out once per run, not per event.
        let mut run: Option<(Namespace, bool, u64)> = None;
        for event in events {
            if run.as_ref().is_none_or(|(ns, _, _)| *ns != event.namespace) {
                if let Some((ns, _, sent)) = run.take() {
                    self.count_sent(ns, sent);
                }
                let wants = self.peer_wants(&event.namespace);
                run = Some((event.namespace.clone(), wants, 0));
            }
            let (_, wants, run_bytes) = run.as_mut().expect("just set");
            if !*wants {
                continue;
            }
            // Builds before leader namespaces and TTL keys cannot carry an epoch or an
            // expiry: they get none of those events (docs/MODES.md, "Upgrades").
            if (event.epoch != 0 || event.expires_ms != 0)
                && self.peer.as_ref().is_some_and(|p| p.version < 4)
            {
                continue;
            }
            if self
                .config
                .federation
                .as_ref()
                .is_some_and(|f| !(f.may_send)(&event))
            {
                continue;
            }
            // The peer gets this origin's events by another path (it said so).
            if !self.lazy.is_empty()
                && event.dot.origin != self.config.node_id
                && self.lazy.contains(&event.dot.origin)
            {
                self.relay_skipped += 1;
                continue;
            }
            let view = self.peer_view.entry(event.namespace.clone()).or_default();
            if !view.insert(event.dot) {
                continue;
            }
            let size = credit_size(&event);
            bytes += size;
            *run_bytes += size;
            out.push(event);
        }
        if let Some((ns, _, sent)) = run {
            self.count_sent(ns, sent);
        }
        self.last_sent_seq = last_seq;
        let first_seq = self.unframed.take().map_or(first_seq, |(first, _)| first);
        if out.is_empty() {
            self.unframed = Some((first_seq, last_seq));
            return (0, 0);
        }
        self.send_credit -= bytes as i64;
        let sent = out.len();
        self.frame_events(first_seq, last_seq, out, now);
        (sent, bytes)
    }

    /// Frames the positions [`Session::send_events`] held back, if any, so that the
    /// peer can acknowledge them. Returns whether there were any.
    pub fn flush_events(&mut self, now: Instant) -> bool {
        if self.state != State::Established {
            return false;
        }
        match self.unframed.take() {
            Some((first_seq, last_seq)) => {
                self.frame_events(first_seq, last_seq, Vec::new(), now);
                true
            }
            None => false,
        }
    }

    fn frame_events(&mut self, first_seq: u64, last_seq: u64, events: Vec<Event>, now: Instant) {
        self.first_sent_seq.get_or_insert(first_seq);
        self.queue(
            Frame::Events {
                first_seq,
                last_seq,
                events,
            },
            now,
        );
    }

    /// Flow-control and position counters, for diagnostics: (send credit, receive
    /// allowance, last position received, last position sent).
    #[doc(hidden)]
    pub fn flow_state(&self) -> (i64, i64, Option<u64>, u64) {
        (
            self.send_credit,
            self.recv_allowance,
            self.last_received_seq,
            self.last_sent_seq,
        )
    }

    /// The peer's holdings as this node knows them.
    pub fn peer_view(&self) -> &HashMap<Namespace, VersionVector> {
        &self.peer_view
    }
}

fn hello_frame(config: &SessionConfig) -> Frame {
    Frame::Hello(Hello {
        version_min: config.version_min,
        version_max: config.version_max,
        cluster_id: config.cluster_id.clone(),
        node_id: config.node_id,
        labels: config.labels.clone(),
        namespaces: config.namespaces.clone(),
        heartbeat_ms: config.heartbeat.as_millis().min(u32::MAX as u128) as u32,
        idle_timeout_ms: config.idle_timeout.as_millis().min(u32::MAX as u128) as u32,
        incarnation: config.incarnation,
    })
}

#[cfg(test)]
mod reconcile_tests;
#[cfg(test)]
mod tests;
