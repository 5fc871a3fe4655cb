//! One peer link: a TCP connection carrying a session.
//!
//! A link task never blocks on the socket while it could be reading: frames go to a
//! separate writer task through a queue, and events are only read from the feed while
//! that queue is short and the peer has granted credit. The rest of what it queues
//! (acknowledgements, credit, heartbeats) is bounded by what the peer sends. So two
//! nodes that both send at full speed cannot deadlock on full socket buffers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Instant;

use asp_core::session::{
    CloseReason, ErrorCode, Frame, Session, SessionConfig, SessionEvent, Withhold,
};
use asp_core::{Event, Namespace, NodeId, VersionVector};
use asp_store::trace::{self, Hop};
use asp_store::{ApplyOutcome, FeedReader, WriteError};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::federation::Rights;
use crate::metrics::RefusalLabels;
use crate::registry::{self, Direction, Inner, error_pair, peer_labels, wall_ms};

mod reconcile;
mod relay;
mod stream;
mod writer;

pub(crate) use stream::Connection;
use stream::{PeerStream, TLS_HANDSHAKE_RECORD, capture_file, upgrade};
use writer::{Writer, write_loop};

/// Events per frame, at most (frames are also bounded in bytes).
const EVENTS_PER_FRAME_MAX: usize = 10_000;
/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// How a link ended, for the dialer.
pub(crate) enum LinkEnd {
    /// Closed cleanly or the connection dropped after it worked.
    Closed,
    /// Another link to the same peer is kept.
    Duplicate,
    Shutdown,
    /// Refused or broken: (code, message) for status.
    Failed((String, String)),
}

/// A received batch being applied: the store's answer, the batch's last feed position
/// and its credit cost.
struct Applying {
    answer: oneshot::Receiver<Result<ApplyOutcome, WriteError>>,
    last_seq: u64,
    bytes: u64,
    /// The reconciliation run of a `Repair` batch (`None`: a feed batch).
    repair: Option<u32>,
}

fn session_config(
    inner: &Inner,
    namespaces: Vec<String>,
    withhold: Withhold,
    federation: Option<asp_core::session::Federation>,
) -> SessionConfig {
    let c = &inner.config;
    SessionConfig {
        node_id: inner.node_id,
        cluster_id: c.cluster_id.clone(),
        labels: c.labels.clone(),
        namespaces,
        version_min: c.version_min,
        version_max: c.version_max,
        heartbeat: c.heartbeat,
        idle_timeout: c.idle_timeout,
        handshake_timeout: c.handshake_timeout,
        credit_window_bytes: c.credit_window_bytes,
        incarnation: inner.incarnation,
        withhold: Some(withhold),
        federation,
    }
}

/// Runs a link until it ends; registers and unregisters it.
pub(crate) async fn run(
    inner: Arc<Inner>,
    stream: Connection,
    direction: Direction,
    address: String,
) -> LinkEnd {
    if let Connection::Tcp(stream) = &stream {
        let _ = stream.set_nodelay(true);
    }
    let (id, close_rx) = registry::register_link(&inner, direction, address.clone());
    let end = match upgrade(&inner, stream, direction, &address).await {
        Ok((stream, identity, rights)) => {
            Link::new(inner.clone(), id, direction, address, identity, rights)
                .drive(stream, close_rx)
                .await
        }
        Err(message) => {
            tracing::warn!(peer = %address, direction = direction.name(), "{message}");
            LinkEnd::Failed(("tls".to_owned(), message))
        }
    };
    let error = match &end {
        LinkEnd::Failed(e) => Some(e.clone()),
        _ => None,
    };
    registry::unregister_link(&inner, id, error);
    end
}

/// Namespaces a periodic summary may hold per `summary_interval` between summaries.
const SUMMARY_NAMESPACES_PER_INTERVAL: usize = 10_000;

struct Link {
    inner: Arc<Inner>,
    id: u64,
    /// When the last summary went out, and how many namespaces it held: a periodic
    /// summary waits one `summary_interval` per 10,000 namespaces (a summary costs
    /// both sides time in proportion to its size).
    last_summary: Option<(tokio::time::Instant, usize)>,
    direction: Direction,
    address: String,
    session: Session,
    peer: Option<NodeId>,
    reader: Option<FeedReader>,
    /// The last feed position sent to the peer.
    sent_through: u64,
    /// Whether the feed has nothing more to send until its head moves.
    caught_up: bool,
    queued: Arc<AtomicUsize>,
    out: mpsc::UnboundedSender<Vec<u8>>,
    /// The socket's write half, shared with the writer task: frames are written from
    /// here directly when nothing is queued, saving a hand-off.
    socket: Option<Arc<OwnedWriteHalf>>,
    /// Received batches in the store's queue, oldest first: acknowledgements go out in
    /// this order.
    applying: std::collections::VecDeque<Applying>,
    reconciler: asp_core::session::Reconciler,
    /// Tests only: a transfer page waits for the configured gate.
    gate_closed: bool,
    end: Option<LinkEnd>,
    /// What the peer's certificate attests (TLS links only).
    certificate: Option<asp_tls::Identity>,
    /// A link to another cluster: what the shares with it allow.
    federated: Option<Rights>,
    /// What this link keeps from the peer (as the session and the reconciler do).
    withhold: Withhold,
    /// Tests only (`ASP_TEST_CAPTURE_DIR`): every frame this link sends, as encoded.
    capture: Option<std::fs::File>,
    /// Relay trees: per namespace, the peer's dots this node lacked at the peer's last
    /// summary, and the origins grafted on this link whose gaps are not filled yet.
    relay_lacks: HashMap<Namespace, VersionVector>,
    grafted: HashSet<NodeId>,
    /// The relay tree's generation when this link last took what it decided for it.
    relay_seen: u64,
    /// Whether event batches are compressed: not while lz4 does not pay.
    compressor: asp_wire::Compressor,
    /// The peer's node id once its Hello is in, for the withhold (placement).
    peer_id: Arc<std::sync::OnceLock<NodeId>>,
    placed: reconcile::PlacedSeen,
}

impl Link {
    fn new(
        inner: Arc<Inner>,
        id: u64,
        direction: Direction,
        address: String,
        certificate: Option<asp_tls::Identity>,
        federated: Option<Rights>,
    ) -> Link {
        // What this node replicates with this peer: its own list, narrowed by the
        // rights of the name the peer's certificate attests — or, with another
        // cluster, by the shares with it.
        // Residency: pinned namespaces go only to peers whose certificate attests the
        // labels their rule requires (see `registry::residency_labels`).
        let residency = inner.residency.withhold_for(registry::residency_labels(
            certificate.as_ref(),
            federated.as_ref(),
        ));
        let peer_id: Arc<std::sync::OnceLock<NodeId>> = Arc::default();
        let (namespaces, withhold, federation, reconciled) = match &federated {
            Some(rights) => {
                // Namespaces shared only towards this cluster are withheld whole
                // (their summaries too); prefixes are checked per event by the
                // session. No reconciliation across clusters: each hashes with its own
                // key, and the feed (with checkpoints) carries every current value.
                let send = rights.send.clone();
                let withhold = Withhold(Arc::new(move |ns| {
                    residency.withholds(ns) || !send.contains_key(ns.as_str())
                }));
                (
                    asp_core::session::intersect(&inner.config.namespaces, &rights.namespaces()),
                    withhold,
                    Some(inner.federation.session_rules(rights)),
                    Vec::new(),
                )
            }
            None => {
                let namespaces = inner
                    .config
                    .namespaces_with(certificate.as_ref().map(|c| c.name.as_str()));
                // Placement: a placed namespace goes only to its holders (the peer is
                // known once its Hello is: nothing is sent before).
                let placement = inner.placement.clone();
                let peer = peer_id.clone();
                let withhold = Withhold(Arc::new(move |ns| {
                    residency.withholds(ns)
                        || peer.get().is_some_and(|p| placement.withholds(ns, *p))
                }));
                (namespaces.clone(), withhold, None, namespaces)
            }
        };
        let config = session_config(&inner, namespaces.clone(), withhold.clone(), federation);
        let session = match direction {
            Direction::Outbound => Session::new(config, Instant::now()),
            Direction::Inbound => Session::accept(config, Instant::now()),
        };
        let mut reconciler = reconcile::new_reconciler(&inner, reconciled);
        reconciler.set_withhold(Some(withhold.clone()));
        let capture = capture_file(
            &inner,
            id,
            certificate
                .as_ref()
                .map_or(address.as_str(), |c| c.name.as_str()),
        );
        // Replaced in `drive`; a closed channel until then.
        let (out, _) = mpsc::unbounded_channel();
        Link {
            inner,
            id,
            direction,
            address,
            session,
            peer: None,
            reader: None,
            sent_through: 0,
            caught_up: false,
            last_summary: None,
            queued: Arc::new(AtomicUsize::new(0)),
            out,
            socket: None,
            applying: std::collections::VecDeque::new(),
            reconciler,
            gate_closed: false,
            end: None,
            certificate,
            federated,
            withhold,
            capture,
            relay_lacks: HashMap::new(),
            grafted: HashSet::new(),
            relay_seen: 0,
            compressor: asp_wire::Compressor::adaptive(),
            peer_id,
            placed: reconcile::PlacedSeen::default(),
        }
    }

    async fn drive(mut self, stream: PeerStream, mut close_rx: oneshot::Receiver<()>) -> LinkEnd {
        // Plain TCP: frames are written from the link task directly when nothing is
        // queued. TLS: always through the writer task (a TLS stream has no `try_write`).
        let (mut rd, wr): (Box<dyn AsyncRead + Unpin + Send>, Writer) = match stream {
            PeerStream::Plain(stream) => {
                let (rd, wr) = stream.into_split();
                let wr = Arc::new(wr);
                self.socket = Some(wr.clone());
                (Box::new(rd), Writer::Plain(wr))
            }
            PeerStream::Tls(stream) => {
                let (rd, wr) = tokio::io::split(*stream);
                (Box::new(rd), Writer::Tls(wr))
            }
            PeerStream::Carried(stream) => {
                let (rd, wr) = tokio::io::split(stream);
                (Box::new(rd), Writer::Carried(wr))
            }
        };
        let drained = Arc::new(Notify::new());
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        self.out = out_tx;
        let writer = tokio::spawn(write_loop(wr, out_rx, self.queued.clone(), drained.clone()));
        let mut head = self.inner.store.subscribe();
        let mut summary_tick = tokio::time::interval(self.inner.config.summary_interval);
        summary_tick.tick().await;
        let ae_interval = self.inner.config.anti_entropy_interval;
        let ae_enabled = !ae_interval.is_zero();
        let mut ae_tick = tokio::time::interval(if ae_enabled {
            ae_interval
        } else {
            std::time::Duration::from_secs(3600)
        });
        ae_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ae_tick.tick().await;
        let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
        let mut close_pending = true;
        let mut shares = self.inner.federation.subscribe();
        shares.mark_unchanged();
        let send_queue_max = self.inner.config.send_queue_bytes_max;

        loop {
            self.flush();
            self.handle_events().await;
            self.take_grafts();
            self.flush();
            if self.session.is_closed() {
                break;
            }
            let room = self.queued.load(Ordering::Acquire) < send_queue_max;
            if room && !self.gate_closed && self.reconciler.has_work(self.session.credit()) {
                self.reconcile_step().await;
                continue;
            }
            if self.session.can_send() && !self.caught_up && !self.reconciler.holds_stream() && room
            {
                self.send_some();
                continue;
            }
            let deadline = self
                .session
                .poll_timeout()
                .map(tokio::time::Instant::from_std);
            let writer_full = self.queued.load(Ordering::Acquire) >= send_queue_max;
            tokio::select! {
                read = rd.read_buf(&mut buf) => match read {
                    Ok(0) => self.session.handle_disconnect("the peer closed the connection"),
                    Ok(_) => self.decode(&mut buf),
                    Err(e) => self.session.handle_disconnect(e.to_string()),
                },
                () = sleep_until(deadline) => self.session.handle_timeout(Instant::now()),
                answer = async { (&mut self.applying.front_mut().expect("checked").answer).await }, if !self.applying.is_empty() => {
                    let done = self.applying.pop_front().expect("checked");
                    self.completed(done, answer.unwrap_or(Err(WriteError::Closed)));
                }
                _ = ae_tick.tick(), if ae_enabled => self.anti_entropy_tick(),
                () = tokio::time::sleep(std::time::Duration::from_millis(10)), if self.gate_closed => {
                    self.gate_closed = false;
                }
                changed = head.changed(), if self.caught_up => {
                    if changed.is_ok() {
                        self.caught_up = false;
                        self.session.set_local_head(head.borrow_and_update().seq);
                    }
                }
                () = drained.notified(), if writer_full => {}
                () = self.inner.relay_changed.notified(), if self.relays_by_tree() => {}
                changed = shares.changed(), if self.federated.is_some() => {
                    if changed.is_ok() {
                        self.check_shares();
                    }
                }
                _ = summary_tick.tick() => {
                    let due = self.last_summary.is_none_or(|(at, namespaces)| {
                        let every = self.inner.config.summary_interval
                            * (namespaces / SUMMARY_NAMESPACES_PER_INTERVAL + 1) as u32;
                        at.elapsed() >= every
                    });
                    if due {
                        self.refresh_summary().await;
                    }
                    self.send_members();
                    self.runs_for_new_holders();
                }
                _ = &mut close_rx, if close_pending => {
                    close_pending = false;
                    self.session.close(ErrorCode::DuplicateLink, "another link between these nodes is kept", Instant::now());
                }
                () = self.inner.shutdown.cancelled() => {
                    self.session.close(ErrorCode::Shutdown, "the node is shutting down", Instant::now());
                }
            }
            if buf.capacity() - buf.len() < READ_CHUNK_BYTES {
                buf.reserve(READ_CHUNK_BYTES);
            }
        }

        // Let the writer send what is queued (the Error frame last), briefly.
        let out = std::mem::replace(&mut self.out, mpsc::unbounded_channel().0);
        drop(out);
        self.socket = None;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), writer).await;
        self.record_sent_bytes();
        self.save_checkpoint();
        self.end.unwrap_or(LinkEnd::Closed)
    }

    /// Encodes and queues every frame the session has to send.
    fn flush(&mut self) {
        while let Some(mut frame) = self.session.poll_transmit() {
            if let Frame::Heartbeat { wall_ms: w, .. } = &mut frame {
                *w = wall_ms();
            }
            let mut bytes = Vec::new();
            if let Err(e) = asp_wire::encode_with(&frame, &mut bytes, &mut self.compressor) {
                self.session.close(
                    ErrorCode::Internal,
                    format!("cannot encode a frame: {e}"),
                    Instant::now(),
                );
                continue;
            }
            if let Some(file) = &mut self.capture {
                use std::io::Write as _;
                let _ = file.write_all(&bytes);
            }
            // With nothing queued, the writer task is idle: write at once, and queue
            // only what the socket does not take.
            let mut from = 0;
            if self.queued.load(Ordering::Acquire) == 0
                && let Some(socket) = &self.socket
            {
                from = socket.try_write(&bytes).unwrap_or(0);
            }
            if from < bytes.len() {
                let rest = if from == 0 {
                    bytes
                } else {
                    bytes[from..].to_vec()
                };
                self.queued.fetch_add(rest.len(), Ordering::AcqRel);
                let _ = self.out.send(rest);
            }
        }
    }

    fn decode(&mut self, buf: &mut Vec<u8>) {
        let mut start = 0;
        let now = Instant::now();
        if !self.session.is_established()
            && self.inner.config.tls.is_none()
            && buf.starts_with(&[TLS_HANDSHAKE_RECORD, 3])
        {
            return self.session.close(
                ErrorCode::Protocol,
                "the peer speaks TLS; this node runs its peer links without TLS (start it with --tls-cert, --tls-key and --tls-ca)",
                now,
            );
        }
        loop {
            let decoded = if self.session.is_established() {
                asp_wire::decode(&buf[start..])
            } else {
                asp_wire::decode_handshake(&buf[start..])
            };
            match decoded {
                Ok(Some((frame, used))) => {
                    start += used;
                    self.session.handle_frame(frame, now);
                }
                Ok(None) => break,
                Err(e) => {
                    self.session.close(ErrorCode::Protocol, e.to_string(), now);
                    break;
                }
            }
        }
        buf.drain(..start);
        if start > 0 {
            self.with_record(|r| r.last_contact = Some(now));
        }
    }

    /// Runs `f` on what the registry keeps of this link's peer (`None` before the
    /// handshake names it).
    fn with_record<T>(&self, f: impl FnOnce(&mut registry::PeerRecord) -> T) -> Option<T> {
        let peer = self.peer?;
        let mut registry = self.inner.registry.lock().unwrap();
        registry.peers.get_mut(&peer).map(f)
    }

    async fn handle_events(&mut self) {
        while let Some(event) = self.session.poll_event() {
            match event {
                SessionEvent::Established(info) => {
                    let peer = info.node_id;
                    match registry::establish(&self.inner, self.id, peer, info.incarnation) {
                        Ok(()) => {}
                        Err(registry::NotKept::Duplicate) => {
                            self.session.close(
                                ErrorCode::DuplicateLink,
                                "another link between these nodes is kept",
                                Instant::now(),
                            );
                            continue;
                        }
                        Err(registry::NotKept::Conflict(message)) => {
                            self.session
                                .close(ErrorCode::NodeConflict, message, Instant::now());
                            continue;
                        }
                    }
                    self.peer = Some(peer);
                    let _ = self.peer_id.set(peer);
                    let takes_prunes = self.relays_by_tree();
                    self.inner.relay.lock().unwrap().link_up(peer, takes_prunes);
                    self.relay_lacks.clear();
                    self.grafted.clear();
                    self.reconciler
                        .set_peer(peer, info.version, info.namespaces.clone());
                    let namespaces = Arc::new(info.namespaces.clone());
                    let certificate = self.certificate.clone();
                    let federated = self.federated.clone();
                    let inbound = self.direction == Direction::Inbound;
                    let withhold = self.withhold.clone();
                    self.with_record(|r| {
                        r.inbound |= inbound;
                        r.federated = federated;
                        r.withhold = Some(withhold);
                        r.namespaces = Some(namespaces);
                        if certificate.is_some() {
                            r.certificate = certificate;
                        }
                    });
                    let checkpoint = self.inner.store.checkpoint(peer);
                    self.reader = Some(self.inner.store.feed_reader(None, checkpoint));
                    self.sent_through = checkpoint;
                    self.caught_up = false;
                    self.refresh_summary().await;
                    self.send_members();
                    tracing::info!(peer = %peer, address = %self.address, direction = self.direction.name(), resume_after = checkpoint, "peer link up");
                }
                SessionEvent::PeerSummary(summary) => {
                    if let (Some(peer), Some(info)) = (self.peer, self.session.peer()) {
                        // What is kept from the peer (residency, a share's
                        // direction) is no namespace it holds back collection in.
                        self.inner.store.note_contact(
                            peer,
                            &info.namespaces,
                            Some(self.withhold.clone()),
                        );
                    }
                    self.inner.store.note_reports(&summary);
                    self.relay_lag(&summary);
                    let summary: registry::PeerSummary = summary
                        .into_iter()
                        .map(|s| (s.namespace.clone(), s))
                        .collect();
                    let summary = Arc::new(summary);
                    self.reconcile_summary(summary.clone());
                    self.with_record(|r| r.summary = summary);
                }
                SessionEvent::Events {
                    last_seq,
                    events,
                    bytes,
                    ..
                } => {
                    if let Some(peer) = self.peer {
                        self.inner
                            .metrics
                            .events_received
                            .get_or_create(&peer_labels(peer))
                            .inc_by(events.len() as u64);
                        self.with_record(|r| r.events_received += events.len() as u64);
                    }
                    trace::mark(Hop::Received, self.inner.node_id, &events);
                    self.enqueue(events, last_seq, bytes, None).await;
                }
                SessionEvent::Repair { id, events, bytes } => {
                    self.repair_received(id, events.len());
                    self.enqueue(events, 0, bytes, Some(id)).await;
                }
                SessionEvent::Reconcile(frame) => self.reconcile_frame(frame).await,
                SessionEvent::Acked { through_seq } => {
                    if self.peer.is_some() {
                        self.with_record(|r| r.acked_seq = r.acked_seq.max(through_seq));
                        self.inner.bump();
                    }
                }
                SessionEvent::PeerHead { .. } => {}
                // Members of another cluster are none of this one's business.
                SessionEvent::Members(members) if self.federated.is_none() => {
                    self.inner.membership.merge(members);
                }
                SessionEvent::Members(_) => {}
                SessionEvent::Closed(reason) => self.closed(reason),
            }
        }
    }

    fn closed(&mut self, reason: CloseReason) {
        let who = self
            .peer
            .map_or_else(|| self.address.clone(), |p| p.to_string());
        // TLS 1.3: a peer that refuses this node's certificate says so in an alert the
        // dialer reads only after its own side of the handshake finished.
        if self.certificate.is_some()
            && self.peer.is_none()
            && reason.by_peer
            && reason.message.contains("alert")
        {
            let message = format!(
                "the peer refused this node's TLS certificate ({}): is it issued by the peer's CA?",
                reason.message
            );
            tracing::warn!(peer = %who, "{message}");
            self.end = Some(LinkEnd::Failed(("tls".to_owned(), message)));
            return;
        }
        // A federated peer that sent what its shares do not allow: in the audit log
        // (once a minute per peer and share set).
        if let Some(rights) = &self.federated
            && !reason.by_peer
            && reason.message.contains(asp_core::session::SHARE_REFUSAL)
        {
            self.inner.audit.record(
                "share_refused",
                Some(&format!(
                    "{} {}",
                    rights.partner_cluster,
                    rights.shares.join(",")
                )),
                serde_json::json!({
                    "partner_cluster": rights.partner_cluster,
                    "shares": rights.shares,
                    "peer": who,
                    "message": reason.message,
                }),
            );
        }
        let end = match reason.code {
            ErrorCode::DuplicateLink => LinkEnd::Duplicate,
            ErrorCode::Shutdown if !reason.by_peer => LinkEnd::Shutdown,
            code => {
                if let Some(peer) = self.peer {
                    self.inner
                        .metrics
                        .link_errors
                        .get_or_create(&peer_labels(peer))
                        .inc();
                }
                let refusal = matches!(
                    code,
                    ErrorCode::VersionMismatch
                        | ErrorCode::ClusterMismatch
                        | ErrorCode::SelfConnection
                        | ErrorCode::ClockSkew
                        | ErrorCode::NodeConflict
                        | ErrorCode::InvalidEvent
                );
                if refusal {
                    if reason.by_peer {
                        tracing::warn!(peer = %who, code = %code, "the peer refused the link: {}", reason.message);
                    } else {
                        tracing::warn!(peer = %who, code = %code, "refused the peer's link: {}", reason.message);
                    }
                } else {
                    tracing::info!(peer = %who, code = %code, by_peer = reason.by_peer, "peer link down: {}", reason.message);
                }
                if code == ErrorCode::Shutdown
                    || (reason.by_peer
                        && code == ErrorCode::Protocol
                        && self.peer.is_some()
                        && reason.message.starts_with("connection lost"))
                {
                    LinkEnd::Closed
                } else {
                    let message = if reason.by_peer {
                        format!("refused by the peer: {}", reason.message)
                    } else {
                        reason.message.clone()
                    };
                    LinkEnd::Failed(error_pair(code, &message))
                }
            }
        };
        if let LinkEnd::Closed = end {
            self.with_record(|r| r.last_error = Some(error_pair(reason.code, &reason.message)));
        }
        self.end = Some(end);
    }

    /// Reads the next events from the feed and sends them, within the peer's credit.
    fn send_some(&mut self) {
        let Some(reader) = self.reader.as_mut() else {
            self.caught_up = true;
            return;
        };
        let budget = (self.session.send_credit() as usize)
            .min(self.inner.config.batch_bytes_max)
            .max(1);
        match reader.read_bytes(EVENTS_PER_FRAME_MAX, budget) {
            Ok(events) => {
                let position = reader.position();
                if position <= self.sent_through {
                    // All read: positions whose events the peer already held go now.
                    let _ = self.session.flush_events(Instant::now());
                    self.caught_up = true;
                    return;
                }
                let traced = trace::traced_counters(events.iter().map(|fe| &fe.event));
                trace::mark_counters(Hop::LinkRead, self.inner.node_id, &traced);
                let events: Vec<Event> = events.into_iter().map(|fe| fe.event).collect();
                let skipped_before = self.session.relay_state().0;
                let (sent, _) = self.session.send_events(
                    self.sent_through + 1,
                    position,
                    events,
                    Instant::now(),
                );
                let count = sent as u64;
                self.sent_through = position;
                if !traced.is_empty() {
                    self.flush();
                    trace::mark_counters(Hop::Sent, self.inner.node_id, &traced);
                }
                if let Some(peer) = self.peer {
                    self.inner
                        .metrics
                        .events_sent
                        .get_or_create(&peer_labels(peer))
                        .inc_by(count);
                    self.with_record(|r| r.events_sent += count);
                    let skipped = self.session.relay_state().0 - skipped_before;
                    if skipped > 0 {
                        self.inner
                            .metrics
                            .events_not_relayed
                            .get_or_create(&peer_labels(peer))
                            .inc_by(skipped);
                    }
                }
            }
            Err(e) => {
                self.session.close(
                    ErrorCode::Internal,
                    format!("reading the feed: {e}"),
                    Instant::now(),
                );
            }
        }
    }

    /// Queues received events (a feed batch, or repairs of run `repair`) into the store.
    async fn enqueue(
        &mut self,
        events: Vec<Event>,
        last_seq: u64,
        bytes: u64,
        repair: Option<u32>,
    ) {
        let entry = |answer| Applying {
            answer,
            last_seq,
            bytes,
            repair,
        };
        let store = self.inner.store.clone();
        let queued = match repair {
            Some(_) => self.busy(store.enqueue_repair(events)).await,
            None => self.busy(store.enqueue_remote(events)).await,
        };
        match queued {
            Ok(answer) => self.applying.push_back(entry(answer)),
            Err(e) => {
                let (_, rx) = oneshot::channel();
                self.completed(entry(rx), Err(e));
            }
        }
    }

    /// Awaits `work` (the store's writer or key index, a blocking read) and keeps the
    /// link alive meanwhile: heartbeats go out every heartbeat interval, and the time
    /// spent not reading is not counted as the peer's silence. Without it a receiver
    /// applying a large transfer went quiet past the idle timeout, its peer closed the
    /// link, and the run was cut off at its end (a debug build under load, 3 s
    /// timeout).
    async fn busy<T>(&mut self, work: impl Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        // Most waits end at once: no timer for them.
        if let Poll::Ready(out) =
            std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await
        {
            return out;
        }
        let since = Instant::now();
        let every = self.inner.config.heartbeat;
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let out = loop {
            tokio::select! {
                out = &mut work => break out,
                _ = beat.tick() => {
                    self.session.keep_alive(Instant::now());
                    self.flush();
                }
            }
        };
        self.session.not_read(since, Instant::now());
        out
    }

    /// Waits, kept alive ([`Self::busy`]), until the key index reflects every event
    /// written so far.
    async fn index_caught_up(&mut self) -> Result<(), asp_store::ReadError> {
        let store = self.inner.store.clone();
        self.busy(store.caught_up()).await
    }

    /// Waits until every received batch is applied (handling each outcome).
    async fn drain_applying(&mut self) {
        while let Some(mut front) = self.applying.pop_front() {
            let answer = self.busy(&mut front.answer).await;
            self.completed(front, answer.unwrap_or(Err(WriteError::Closed)));
        }
    }

    fn completed(&mut self, done: Applying, result: Result<ApplyOutcome, WriteError>) {
        let now = Instant::now();
        let Applying {
            last_seq,
            bytes,
            repair,
            ..
        } = done;
        match result {
            Ok(outcome) => {
                if repair.is_none() {
                    self.relay_delivered(&outcome);
                }
                // Held events are acknowledged like applied ones: they are durable.
                if outcome.parked + outcome.quarantined > 0 {
                    self.with_record(|r| {
                        r.events_parked += outcome.parked as u64;
                        r.events_quarantined += outcome.quarantined as u64;
                    });
                }
                match repair {
                    Some(id) => {
                        self.session.repaired(bytes, now);
                        self.repaired(id, outcome.applied);
                    }
                    None => self.session.applied(last_seq, bytes, now),
                }
            }
            Err(WriteError::InvalidEvent { reason, message }) => {
                self.count_refusal(reason);
                self.session.close(ErrorCode::InvalidEvent, message, now)
            }
            // Only when the held store is full: events are parked otherwise.
            Err(WriteError::ClockSkew(message)) => {
                self.count_refusal("held_full");
                self.session.close(ErrorCode::ClockSkew, message, now)
            }
            Err(WriteError::PolicyFixed(message)) => {
                self.count_refusal("held_full");
                self.session.close(
                    ErrorCode::Internal,
                    format!("cannot apply the peer's events: {message}"),
                    now,
                )
            }
            Err(e) => self.session.close(
                ErrorCode::Internal,
                format!("cannot apply the peer's events: {e}"),
                now,
            ),
        }
    }

    /// Counts a batch of the peer's refused whole, by reason (status and metrics).
    fn count_refusal(&self, reason: &'static str) {
        let Some(peer) = self.peer else { return };
        self.inner
            .metrics
            .batches_refused
            .get_or_create(&RefusalLabels {
                peer: peer.to_string(),
                reason: reason.to_owned(),
            })
            .inc();
        self.with_record(|r| *r.batches_refused.entry(reason).or_default() += 1);
    }

    /// Keeps how far the peer holds this node's feed, so that the next link resumes
    /// there.
    fn save_checkpoint(&self) {
        let Some(peer) = self.peer else { return };
        if let Some(seq) = self.with_record(|r| r.acked_seq) {
            let _ = self.inner.store.save_checkpoint(peer, seq);
        }
    }

    /// A federated link after shares changed: closes at once if its rights are not
    /// what they were (a share revoked, expired or added: the link starts again with
    /// the new rights, if any).
    fn check_shares(&mut self) {
        let (Some(rights), Some(peer)) = (&self.federated, &self.certificate) else {
            return;
        };
        let now = self.inner.federation.rights_for(peer, wall_ms());
        if now.as_ref() == Some(rights) {
            return;
        }
        let message = format!(
            "the shares with cluster {} changed (revoked, expired or added): the link closes",
            rights.partner_cluster
        );
        tracing::info!(peer = %self.address, "{message}");
        self.session
            .close(ErrorCode::Protocol, message, Instant::now());
    }

    /// Adds the bytes sent per namespace since the last call to the peer's record (and
    /// to its share's count, on a federated link).
    fn record_sent_bytes(&mut self) {
        let sent = self.session.take_sent_bytes();
        if sent.is_empty() {
            return;
        }
        if let Some(rights) = &self.federated {
            for (ns, bytes) in &sent {
                if let Some(share) = rights.share_of(ns) {
                    self.inner.federation.count_sent(share, ns, *bytes);
                }
            }
        }
        self.with_record(|r| {
            for (ns, bytes) in sent {
                *r.sent_bytes.entry(ns).or_default() += bytes;
            }
        });
    }

    /// Gossips the members this node knows (not to another cluster).
    fn send_members(&mut self) {
        if self.federated.is_none() {
            self.session.send_members(self.inner.membership.snapshot());
        }
    }

    async fn refresh_summary(&mut self) {
        if !self.session.is_established() {
            return;
        }
        self.record_sent_bytes();
        if self.index_caught_up().await.is_err() {
            return;
        }
        let store = &self.inner.store;
        self.session.set_local_head(store.head().seq);
        let summary = store.summary_for_peers();
        self.last_summary = Some((tokio::time::Instant::now(), summary.len()));
        let left_out_before = self.session.summary_left_out();
        self.session.send_summary(summary, Instant::now());
        let left_out = self.session.summary_left_out();
        if left_out > 0 && left_out_before == 0 {
            tracing::warn!(peer = ?self.peer, namespaces_left_out = left_out, "the peer speaks protocol version 1, which cannot take a summary in parts: it gets only the first part (upgrade it)");
        }
        self.save_checkpoint();
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
