//! The replicator: listener, dialers, the registry of links, status and write concern.
//!
//! Size: about 1,040 lines of code and 70 of tests; the registry of links is shared
//! state that the listener, the dialers, status and write concern all take the same
//! lock on, so they live beside it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asp_core::session::{ErrorCode, NamespaceSummary, lists};
use asp_core::{Namespace, NodeId};
use asp_store::Store;
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::ReplicationConfig;
use crate::link::{self, LinkEnd};
use crate::metrics::{LagLabels, Metrics, PeerLabels};

/// Why the replicator could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("invalid replication configuration: {0}")]
    Config(String),
    #[error(
        "cannot listen for peers on {addr} (is another asp using it? choose another with --listen): {source}"
    )]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Who opened a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// This node dialed the peer.
    Outbound,
    /// The peer dialed this node.
    Inbound,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// A peer link's state as status shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Dialing, or waiting to dial again after a failure.
    Connecting,
    /// Connected; the handshake is under way.
    Handshaking,
    /// Events flow.
    Active,
    /// Not connected.
    Down,
}

impl LinkState {
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Handshaking => "handshaking",
            LinkState::Active => "active",
            LinkState::Down => "down",
        }
    }
}

/// One namespace's replication lag with one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceLag {
    pub namespace: Namespace,
    /// Events this node holds that the peer does not (as of the peer's last summary).
    pub lag_events: u64,
    /// How long the oldest event the peer lacks has been waiting: the age of the first
    /// event of the namespace after the peer's acknowledged position in this node's
    /// feed (0 when it lags by nothing).
    pub lag_ms: u64,
    /// Events the peer holds that this node does not.
    pub missing_events: u64,
}

/// What this node knows about one peer.
#[derive(Clone, Debug)]
pub struct PeerStatus {
    /// `None` until a handshake told us who is at `address`.
    pub node_id: Option<NodeId>,
    /// The configured address (outbound) or the peer's address (inbound).
    pub address: Option<String>,
    pub direction: Option<Direction>,
    pub state: LinkState,
    pub connected_for: Option<Duration>,
    /// Time since anything was heard from the peer.
    pub last_contact: Option<Duration>,
    /// How the last link ended, if it ended badly.
    pub last_error: Option<(String, String)>,
    /// How far the peer holds this node's feed, durably.
    pub acked_seq: u64,
    pub events_sent: u64,
    pub events_received: u64,
    /// Of the events received, those held: parked (clock too far ahead) and
    /// quarantined (another policy), acknowledged like the applied ones.
    pub events_parked: u64,
    pub events_quarantined: u64,
    /// Batches received from the peer and refused whole (the link closed), by reason:
    /// an event broke a rule (`value_size`, `record_size`, `context`, `crdt_state`,
    /// `dot`) or did not fit in the held store (`held_full`).
    pub batches_refused: Vec<(&'static str, u64)>,
    pub namespaces: Vec<NamespaceLag>,
    pub reconcile: ReconcileStats,
}

/// The replicator's state for status pages.
#[derive(Clone, Debug)]
pub struct ReplicationStatus {
    pub cluster_id: String,
    pub listen: Option<SocketAddr>,
    pub peers: Vec<PeerStatus>,
    /// The latest links that failed before their handshake finished (newest last):
    /// what an operator needs to see a misconfigured peer that dials this node.
    pub refusals: Vec<Refusal>,
    /// This run of this node (random, new at every start; sent in the Hello).
    pub incarnation: u64,
    /// Nodes seen running twice at once (two incarnations of one node id), newest
    /// last: one of each pair was refused.
    pub conflicts: Vec<NodeConflict>,
}

/// Two live processes with one node id: a copied data directory or a cloned machine.
#[derive(Clone, Debug)]
pub struct NodeConflict {
    pub node: NodeId,
    /// The incarnation whose link was kept.
    pub kept: u64,
    /// The incarnation refused, and where its link came from.
    pub refused: u64,
    pub address: String,
    pub message: String,
    pub age: Duration,
}

/// A link that failed its handshake.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub address: String,
    pub direction: Direction,
    pub code: String,
    pub message: String,
    pub age: Duration,
}

/// Refusals kept for status, at most.
const REFUSALS_MAX: usize = 16;
/// Node conflicts kept for status, at most.
const CONFLICTS_MAX: usize = 16;
/// Earlier incarnations remembered per peer, at most.
const SUPERSEDED_MAX: usize = 8;
/// A link heard from this recently is alive: another incarnation of its node arriving
/// meanwhile is a second process, not a restart (a restart takes longer than this,
/// and a live link hears a heartbeat every second).
const LIVE_LINK_WITHIN: Duration = Duration::from_secs(3);

/// A live connection in the registry.
pub(crate) struct LinkEntry {
    pub peer: Option<NodeId>,
    pub direction: Direction,
    pub address: String,
    pub state: LinkState,
    pub since: Instant,
    /// The peer's incarnation (from its Hello; 0 before the handshake or from an
    /// earlier build).
    pub incarnation: u64,
    /// Tells the link to close as a duplicate.
    pub close: Option<oneshot::Sender<()>>,
}

/// A peer's summary by namespace.
pub(crate) type PeerSummary = HashMap<Namespace, NamespaceSummary>;

/// What is remembered about a peer across its links.
#[derive(Default)]
pub(crate) struct PeerRecord {
    pub acked_seq: u64,
    pub last_contact: Option<Instant>,
    pub last_error: Option<(String, String)>,
    /// The peer's last summary, by namespace (shared: the link swaps in a new one).
    pub summary: Arc<PeerSummary>,
    pub events_sent: u64,
    pub events_received: u64,
    pub events_parked: u64,
    pub events_quarantined: u64,
    pub batches_refused: std::collections::BTreeMap<&'static str, u64>,
    pub address: Option<String>,
    pub reconcile: ReconcileStats,
    /// The peer's incarnation last kept (0: unknown).
    pub incarnation: u64,
    /// Its earlier incarnations, newest last: a process never comes back as one.
    pub superseded: Vec<u64>,
    /// The namespaces its last Hello listed (`None` until one arrived): lag counts
    /// only namespaces both nodes replicate.
    pub namespaces: Option<Arc<Vec<String>>>,
}

/// Reconciliation with one peer, for status.
#[derive(Clone, Debug, Default)]
pub struct ReconcileStats {
    /// Runs ended (both directions: started by this node or by the peer).
    pub runs: u64,
    /// Anti-entropy checks that found a namespace in sync (equal digests).
    pub in_sync_checks: u64,
    /// Keys whose state this node took from the peer by reconciliation.
    pub keys_repaired: u64,
    /// Handovers to the peer completed: it lacked events compacted out of this node's
    /// feed, was brought up to date by reconciliation, and the stream skipped ahead.
    pub handovers: u64,
    /// Runs (of this node's) that sent a whole namespace to a peer holding none of it.
    pub transfers: u64,
    pub last: Option<LastReconcile>,
}

/// The last reconciliation run with a peer.
#[derive(Clone, Debug)]
pub struct LastReconcile {
    pub namespace: Namespace,
    pub mode: &'static str,
    pub trigger: &'static str,
    pub outcome: &'static str,
    /// Coded symbols sent (by the initiator) or decoded (by the responder).
    pub symbols: u64,
    /// Keys found to differ.
    pub differences: u64,
    /// Keys this node took from the peer in this run.
    pub keys_repaired: u64,
    pub duration: Duration,
    pub at: Instant,
    pub error: Option<String>,
}

/// What a dialer is doing, for peers not connected yet.
#[derive(Default)]
pub(crate) struct DialRecord {
    pub last_error: Option<(String, String)>,
    pub node: Option<NodeId>,
}

#[derive(Default)]
pub(crate) struct Links {
    pub next_id: u64,
    pub links: HashMap<u64, LinkEntry>,
    /// The link kept for each peer.
    pub established: HashMap<NodeId, u64>,
    pub peers: HashMap<NodeId, PeerRecord>,
    pub dials: HashMap<String, DialRecord>,
    /// (address, direction, code, message, when).
    pub refusals: std::collections::VecDeque<(String, Direction, String, String, Instant)>,
    /// (node, kept, refused, address, message, when).
    pub conflicts: std::collections::VecDeque<(NodeId, u64, u64, String, String, Instant)>,
}

pub(crate) struct Inner {
    pub store: Store,
    pub config: ReplicationConfig,
    pub node_id: NodeId,
    /// This run of the node, sent in every Hello.
    pub incarnation: u64,
    pub listen: Option<SocketAddr>,
    pub registry: Mutex<Links>,
    /// Bumped whenever a peer acknowledges, or a link comes or goes.
    pub changed: watch::Sender<u64>,
    pub shutdown: CancellationToken,
    pub metrics: Metrics,
}

impl Inner {
    pub fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The replication runtime of one node. Cheap to clone.
#[derive(Clone)]
pub struct Replicator {
    inner: Arc<Inner>,
    tasks: Arc<Mutex<Option<JoinSet<()>>>>,
}

impl Replicator {
    /// Starts listening and dialing. Links stop when `shutdown` is cancelled (or
    /// [`Replicator::shutdown`] is called).
    pub async fn start(
        store: Store,
        config: ReplicationConfig,
        shutdown: CancellationToken,
    ) -> Result<Replicator, StartError> {
        config.validate().map_err(StartError::Config)?;
        let listener = match config.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Listen { addr, source })?,
            ),
            None => None,
        };
        let listen = listener.as_ref().and_then(|l| l.local_addr().ok());
        let inner = Arc::new(Inner {
            node_id: store.node_id(),
            incarnation: rand::random::<u64>() | 1,
            store,
            config,
            listen,
            registry: Mutex::new(Links::default()),
            changed: watch::channel(0).0,
            shutdown,
            metrics: Metrics::default(),
        });
        let mut tasks = JoinSet::new();
        if let Some(listener) = listener {
            tasks.spawn(accept_loop(inner.clone(), listener));
        }
        for address in inner.config.peers.clone() {
            inner
                .registry
                .lock()
                .unwrap()
                .dials
                .entry(address.clone())
                .or_default();
            tasks.spawn(dial_loop(inner.clone(), address));
        }
        tasks.spawn(lag_loop(inner.clone()));
        if let Some(addr) = listen {
            tracing::info!(listen = %addr, cluster = %inner.config.cluster_id, peers = ?inner.config.peers, "replication started");
        }
        Ok(Replicator {
            inner,
            tasks: Arc::new(Mutex::new(Some(tasks))),
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The address peers can dial (with the port chosen if 0 was configured).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.inner.listen
    }

    /// Peers that could acknowledge a write (write concern counts only peers' acks):
    /// every node linked with since this process started, and each configured address
    /// not identified yet.
    pub fn peers_known(&self) -> usize {
        let reg = self.inner.registry.lock().unwrap();
        let unidentified = reg
            .dials
            .values()
            .filter(|d| d.node.is_none_or(|n| !reg.peers.contains_key(&n)))
            .count();
        reg.peers.len() + unidentified
    }

    pub fn register_metrics(&self, registry: &mut MetricsRegistry) {
        self.inner.metrics.register(registry);
    }

    /// Closes every link (telling peers why) and stops dialing.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let tasks = self.tasks.lock().unwrap().take();
        if let Some(mut tasks) = tasks {
            let drained = tokio::time::timeout(Duration::from_secs(5), async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tasks.abort_all();
            }
        }
    }

    /// How many nodes hold this node's feed up to `seq` durably: this node plus every
    /// peer that acknowledged it. Waits until `replicas` do or `timeout` passes.
    pub async fn wait_replicas(&self, seq: u64, replicas: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changed = self.inner.changed.subscribe();
        loop {
            changed.borrow_and_update();
            let count = 1 + self
                .inner
                .registry
                .lock()
                .unwrap()
                .peers
                .values()
                .filter(|p| p.acked_seq >= seq)
                .count();
            if count >= replicas {
                return count;
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return count;
            }
        }
    }

    /// Every peer link, configured or accepted, with lag per namespace.
    pub fn status(&self) -> ReplicationStatus {
        let mine: HashMap<Namespace, asp_core::VersionVector> = self
            .inner
            .store
            .status()
            .namespaces
            .into_iter()
            .map(|(ns, s)| (ns, s.vector))
            .collect();
        let reg = self.inner.registry.lock().unwrap();
        let now = Instant::now();
        let mut peers: Vec<PeerStatus> = Vec::new();
        let mut lags = Vec::new();
        let mut seen_addresses = Vec::new();
        for (&node, record) in &reg.peers {
            let link = reg.established.get(&node).and_then(|id| reg.links.get(id));
            if let Some(l) = link {
                seen_addresses.push(l.address.clone());
            }
            let dial = reg.dials.iter().find(|(_, d)| d.node == Some(node));
            let address = link
                .map(|l| l.address.clone())
                .or_else(|| dial.map(|(a, _)| a.clone()))
                .or_else(|| record.address.clone());
            if let Some((a, _)) = dial {
                seen_addresses.push(a.clone());
            }
            peers.push(PeerStatus {
                node_id: Some(node),
                address,
                direction: link.map(|l| l.direction),
                state: link.map_or(
                    if dial.is_some() {
                        LinkState::Connecting
                    } else {
                        LinkState::Down
                    },
                    |l| l.state,
                ),
                connected_for: link.map(|l| now - l.since),
                last_contact: record.last_contact.map(|t| now - t),
                last_error: record.last_error.clone(),
                acked_seq: record.acked_seq,
                events_sent: record.events_sent,
                events_received: record.events_received,
                events_parked: record.events_parked,
                events_quarantined: record.events_quarantined,
                batches_refused: record
                    .batches_refused
                    .iter()
                    .map(|(r, n)| (*r, *n))
                    .collect(),
                namespaces: Vec::new(),
                reconcile: record.reconcile.clone(),
            });
            // Lag is worked out after the registry is let go: with many namespaces it
            // takes a while, and every link touches the registry as frames arrive.
            lags.push((
                peers.len() - 1,
                record.summary.clone(),
                record.acked_seq,
                record.namespaces.clone(),
            ));
        }
        // Configured peers never reached, and links still in their handshake.
        for (address, dial) in &reg.dials {
            if dial.node.is_none_or(|n| !reg.peers.contains_key(&n))
                && !seen_addresses.contains(address)
            {
                let handshaking = reg
                    .links
                    .values()
                    .find(|l| &l.address == address && l.peer.is_none());
                peers.push(PeerStatus {
                    node_id: dial.node,
                    address: Some(address.clone()),
                    direction: Some(Direction::Outbound),
                    state: if handshaking.is_some() {
                        LinkState::Handshaking
                    } else {
                        LinkState::Connecting
                    },
                    connected_for: None,
                    last_contact: None,
                    last_error: dial.last_error.clone(),
                    acked_seq: 0,
                    events_sent: 0,
                    events_received: 0,
                    events_parked: 0,
                    events_quarantined: 0,
                    batches_refused: Vec::new(),
                    namespaces: Vec::new(),
                    reconcile: ReconcileStats::default(),
                });
            }
        }
        let refusals = reg
            .refusals
            .iter()
            .map(|(address, direction, code, message, at)| Refusal {
                address: address.clone(),
                direction: *direction,
                code: code.clone(),
                message: message.clone(),
                age: now - *at,
            })
            .collect();
        let conflicts = reg
            .conflicts
            .iter()
            .map(|(node, kept, refused, address, message, at)| NodeConflict {
                node: *node,
                kept: *kept,
                refused: *refused,
                address: address.clone(),
                message: message.clone(),
                age: now - *at,
            })
            .collect();
        drop(reg);
        let ours = &self.inner.config.namespaces;
        for (at, summary, acked_seq, theirs) in lags {
            let shared =
                |ns: &Namespace| lists(ours, ns) && theirs.as_ref().is_none_or(|t| lists(t, ns));
            peers[at].namespaces = lag(&self.inner.store, &mine, &summary, acked_seq, shared);
        }
        peers.sort_by(|a, b| a.address.cmp(&b.address).then(a.node_id.cmp(&b.node_id)));
        ReplicationStatus {
            cluster_id: self.inner.config.cluster_id.clone(),
            listen: self.inner.listen,
            peers,
            refusals,
            incarnation: self.inner.incarnation,
            conflicts,
        }
    }
}

/// Events of the feed read, at most, to find how old each lagging namespace's oldest
/// unacknowledged event is (one pass for all namespaces).
const LAG_SCAN_EVENTS_MAX: usize = 100_000;

/// Lag per namespace against a peer's last summary, in the namespaces both replicate
/// (`shared`): a namespace the peer does not take never catches up there.
fn lag(
    store: &Store,
    mine: &HashMap<Namespace, asp_core::VersionVector>,
    theirs: &PeerSummary,
    acked_seq: u64,
    shared: impl Fn(&Namespace) -> bool,
) -> Vec<NamespaceLag> {
    let mut out = Vec::new();
    let empty = asp_core::VersionVector::new();
    let mut names: Vec<&Namespace> = mine
        .keys()
        .chain(theirs.keys())
        .filter(|ns| shared(ns))
        .collect();
    names.sort();
    names.dedup();
    let mut lagging: HashMap<Namespace, Option<u64>> = HashMap::new();
    for ns in names {
        let my_vv = mine.get(ns).unwrap_or(&empty);
        let their_vv = theirs.get(ns).map_or(&empty, |s| &s.vector);
        let lag_events = my_vv.difference(their_vv).len();
        let missing_events = their_vv.difference(my_vv).len();
        if lag_events > 0 {
            lagging.insert(ns.clone(), None);
        }
        out.push(NamespaceLag {
            namespace: ns.clone(),
            lag_events,
            lag_ms: 0,
            missing_events,
        });
    }
    if !lagging.is_empty() {
        oldest_unacked(store, acked_seq, &mut lagging);
        for l in &mut out {
            l.lag_ms = lagging.get(&l.namespace).copied().flatten().unwrap_or(0);
        }
    }
    out
}

/// For each namespace of `lagging`, how old (ms) its oldest event after `acked_seq` is:
/// one read of the feed from there, until every namespace is found or
/// [`LAG_SCAN_EVENTS_MAX`] events are read (a namespace not found by then gets the
/// age of the last event read: its own oldest is younger than that).
fn oldest_unacked(store: &Store, acked_seq: u64, lagging: &mut HashMap<Namespace, Option<u64>>) {
    let now_ms = wall_ms();
    let mut left = lagging.len();
    let mut reader = store.feed_reader(None, acked_seq);
    let mut read = 0;
    let mut last_age = 0;
    while left > 0 && read < LAG_SCAN_EVENTS_MAX {
        let Ok(events) = reader.read(4096) else { break };
        if events.is_empty() {
            break;
        }
        read += events.len();
        for e in events {
            last_age = now_ms.saturating_sub(e.event.hlc.physical_ms());
            if let Some(age @ None) = lagging.get_mut(&e.event.namespace) {
                *age = Some(last_age);
                left -= 1;
            }
        }
    }
    if left > 0 {
        for age in lagging.values_mut().filter(|a| a.is_none()) {
            *age = Some(last_age);
        }
    }
}

/// Lag series (`asp_peer_lag_events`, `asp_peer_lag_ms`) per peer, at most: the
/// namespaces that lag most. With a series for every namespace, 100,000 namespaces
/// and three peers made 600,000 series, too many for a scrape.
const LAG_SERIES_PER_PEER: usize = 64;

/// What the lag gauges show: per peer, how many namespaces lag; per series (peer and
/// namespace), events and ms.
type LagGauges = (Vec<(PeerLabels, usize)>, Vec<(LagLabels, u64, u64)>);

/// What the lag gauges show for one status: per peer, the namespaces that lag, and
/// (peer, namespace, events, ms) for the [`LAG_SERIES_PER_PEER`] of each that lag most.
fn lag_gauges(peers: &[PeerStatus]) -> LagGauges {
    let mut per_peer = Vec::new();
    let mut series = Vec::new();
    for peer in peers {
        let Some(node) = peer.node_id else { continue };
        let mut lagging: Vec<&NamespaceLag> = peer
            .namespaces
            .iter()
            .filter(|n| n.lag_events > 0)
            .collect();
        per_peer.push((
            PeerLabels {
                peer: node.to_string(),
            },
            lagging.len(),
        ));
        lagging.sort_by(|a, b| (b.lag_events, &a.namespace).cmp(&(a.lag_events, &b.namespace)));
        for ns in lagging.into_iter().take(LAG_SERIES_PER_PEER) {
            let labels = LagLabels {
                peer: node.to_string(),
                namespace: ns.namespace.to_string(),
            };
            series.push((labels, ns.lag_events, ns.lag_ms));
        }
    }
    (per_peer, series)
}

/// Refreshes the lag gauges every second ([`lag_gauges`]); series of namespaces (and
/// peers) that no longer lag are removed.
async fn lag_loop(inner: Arc<Inner>) {
    let replicator = Replicator {
        inner: inner.clone(),
        tasks: Arc::new(Mutex::new(None)),
    };
    let metrics = &inner.metrics;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut shown: HashSet<LagLabels> = HashSet::new();
    let mut shown_peers: HashSet<PeerLabels> = HashSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = inner.shutdown.cancelled() => return,
        }
        let status = replicator.status();
        let connected = status
            .peers
            .iter()
            .filter(|p| p.node_id.is_some() && p.state == LinkState::Active)
            .count();
        let (per_peer, series) = lag_gauges(&status.peers);
        let mut now_peers = HashSet::new();
        for (labels, lagging) in per_peer {
            metrics
                .lagging_namespaces
                .get_or_create(&labels)
                .set(lagging as i64);
            now_peers.insert(labels);
        }
        let mut now_shown = HashSet::new();
        for (labels, events, ms) in series {
            metrics.lag_events.get_or_create(&labels).set(events as i64);
            metrics.lag_ms.get_or_create(&labels).set(ms as i64);
            now_shown.insert(labels);
        }
        for gone in shown.difference(&now_shown) {
            metrics.lag_events.remove(gone);
            metrics.lag_ms.remove(gone);
        }
        for gone in shown_peers.difference(&now_peers) {
            metrics.lagging_namespaces.remove(gone);
        }
        shown = now_shown;
        shown_peers = now_peers;
        metrics.peers_connected.set(connected as i64);
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    let mut links = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = inner.shutdown.cancelled() => break,
            Some(_) = links.join_next(), if !links.is_empty() => continue,
        };
        match accepted {
            Ok((stream, addr)) => {
                if inner.registry.lock().unwrap().links.len() >= inner.config.links_max {
                    tracing::warn!(peer = %addr, limit = inner.config.links_max, "refusing a peer link: too many links");
                    continue;
                }
                let inner = inner.clone();
                links.spawn(async move {
                    let _ = link::run(inner, stream, Direction::Inbound, addr.to_string()).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a peer link failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Links see the cancellation too; wait for them to say goodbye.
    while links.join_next().await.is_some() {}
}

/// Keeps a link to one configured address: dial, run, back off, dial again.
async fn dial_loop(inner: Arc<Inner>, address: String) {
    let mut backoff = inner.config.backoff_min;
    let mut changed = inner.changed.subscribe();
    loop {
        if inner.shutdown.is_cancelled() {
            return;
        }
        // While a link to the node behind this address exists (it may have dialed us),
        // there is nothing to do.
        let connected = {
            let reg = inner.registry.lock().unwrap();
            reg.dials
                .get(&address)
                .and_then(|d| d.node)
                .is_some_and(|n| reg.established.contains_key(&n))
        };
        if connected {
            changed.borrow_and_update();
            tokio::select! {
                _ = changed.changed() => {}
                () = inner.shutdown.cancelled() => return,
            }
            continue;
        }
        let started = Instant::now();
        let connect =
            tokio::time::timeout(inner.config.connect_timeout, TcpStream::connect(&address));
        let outcome = tokio::select! {
            result = connect => result,
            () = inner.shutdown.cancelled() => return,
        };
        let end = match outcome {
            Ok(Ok(stream)) => {
                link::run(inner.clone(), stream, Direction::Outbound, address.clone()).await
            }
            Ok(Err(e)) => LinkEnd::Failed((
                "connect".into(),
                format!("cannot connect to {address}: {e}"),
            )),
            Err(_) => LinkEnd::Failed((
                "connect".into(),
                format!(
                    "no answer from {address} within {:?}",
                    inner.config.connect_timeout
                ),
            )),
        };
        match end {
            LinkEnd::Duplicate | LinkEnd::Shutdown => backoff = inner.config.backoff_min,
            LinkEnd::Failed(error) => {
                let mut reg = inner.registry.lock().unwrap();
                let dial = reg.dials.entry(address.clone()).or_default();
                if dial.last_error.as_ref() != Some(&error) {
                    tracing::warn!(peer = %address, code = %error.0, "{}", error.1);
                }
                dial.last_error = Some(error);
            }
            LinkEnd::Closed => {}
        }
        // A link that lived a while was healthy: start the backoff over.
        if started.elapsed() > Duration::from_secs(10) {
            backoff = inner.config.backoff_min;
        }
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        let wait = backoff.mul_f64(jitter);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = inner.shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(inner.config.backoff_max);
    }
}

/// Why a link whose handshake succeeded is not kept.
pub(crate) enum NotKept {
    /// Another link to the same peer is kept instead.
    Duplicate,
    /// A second live process runs with the peer's node id (the message says so).
    Conflict(String),
}

/// Registers a link whose handshake succeeded, unless another link to the same peer
/// is kept instead (the caller then closes this one as a duplicate) or the peer is a
/// second live process with a node id already linked (refused as a conflict).
///
/// Both nodes must choose the same link without talking: the one dialed by the node
/// with the smaller id wins; between two links dialed by the same node, the newer.
///
/// A node id names one process at a time: a new incarnation while the link of another
/// is alive, or an incarnation that an earlier one replaced coming back, is a second
/// process with the same identity (a copied data directory). Its events would carry
/// dots the other process issued too, and be dropped as duplicates: refused loudly
/// instead.
pub(crate) fn establish(
    inner: &Inner,
    link_id: u64,
    peer: NodeId,
    incarnation: u64,
) -> Result<(), NotKept> {
    let mut reg = inner.registry.lock().unwrap();
    let me = inner.node_id;
    let dialer = |direction: Direction| {
        if direction == Direction::Outbound {
            me
        } else {
            peer
        }
    };
    let this_direction = reg.links[&link_id].direction;
    let address = reg.links[&link_id].address.clone();
    if let Some(conflict) = incarnation_conflict(&reg, link_id, peer, incarnation) {
        let (kept, message) = conflict;
        tracing::error!(peer = %peer, address = %address, kept = format!("{kept:016x}"), refused = format!("{incarnation:016x}"), "{message}");
        if reg.conflicts.len() == CONFLICTS_MAX {
            reg.conflicts.pop_front();
        }
        reg.conflicts.push_back((
            peer,
            kept,
            incarnation,
            address,
            message.clone(),
            Instant::now(),
        ));
        return Err(NotKept::Conflict(message));
    }
    if let Some(&other_id) = reg.established.get(&peer)
        && other_id != link_id
        && let Some(other) = reg.links.get(&other_id)
    {
        // The other link is of an earlier incarnation gone quiet (checked above): the
        // peer restarted. Otherwise the usual choice between two links.
        let restarted = other.incarnation != incarnation;
        let preferred = me.min(peer);
        let this_dialer = dialer(this_direction);
        let other_dialer = dialer(other.direction);
        let keep_this = restarted
            || this_dialer == other_dialer
            || (this_dialer == preferred && other_dialer != preferred);
        if !keep_this {
            return Err(NotKept::Duplicate);
        }
        if let Some(close) = reg.links.get_mut(&other_id).and_then(|l| l.close.take()) {
            let _ = close.send(());
        }
    }
    reg.established.insert(peer, link_id);
    if let Some(link) = reg.links.get_mut(&link_id) {
        link.peer = Some(peer);
        link.state = LinkState::Active;
        link.incarnation = incarnation;
    }
    let record = reg.peers.entry(peer).or_default();
    record.last_contact = Some(Instant::now());
    record.last_error = None;
    if record.incarnation != incarnation && incarnation != 0 {
        if record.incarnation != 0 {
            if record.superseded.len() == SUPERSEDED_MAX {
                record.superseded.remove(0);
            }
            record.superseded.push(record.incarnation);
        }
        record.incarnation = incarnation;
    }
    if record.acked_seq == 0 {
        record.acked_seq = inner.store.checkpoint(peer);
    }
    if this_direction == Direction::Outbound {
        record.address = Some(address.clone());
        if let Some(dial) = reg.dials.get_mut(&address) {
            dial.node = Some(peer);
            dial.last_error = None;
        }
    }
    drop(reg);
    inner.bump();
    Ok(())
}

/// Whether a link of `peer` at `incarnation` is a second live process with that node
/// id: returns the incarnation kept and what to tell the operator.
fn incarnation_conflict(
    reg: &Links,
    link_id: u64,
    peer: NodeId,
    incarnation: u64,
) -> Option<(u64, String)> {
    if incarnation == 0 {
        return None;
    }
    let record = reg.peers.get(&peer)?;
    let live_other = reg
        .established
        .get(&peer)
        .filter(|&&id| id != link_id)
        .and_then(|id| reg.links.get(id))
        .filter(|l| l.incarnation != 0 && l.incarnation != incarnation)
        .filter(|_| {
            record
                .last_contact
                .is_some_and(|t| t.elapsed() < LIVE_LINK_WITHIN)
        });
    let kept = match live_other {
        Some(other) => other.incarnation,
        None if record.superseded.contains(&incarnation) => record.incarnation,
        None => return None,
    };
    Some((
        kept,
        format!(
            "node {peer} runs as two processes at once (incarnations {kept:016x} and {incarnation:016x}): a copied data directory or a cloned machine; events of both carry the same dots and would be dropped as duplicates, so the second is refused. Stop one of them, or give it its own empty data directory (a new node id)"
        ),
    ))
}

pub(crate) fn register_link(
    inner: &Inner,
    direction: Direction,
    address: String,
) -> (u64, oneshot::Receiver<()>) {
    let (tx, rx) = oneshot::channel();
    let mut reg = inner.registry.lock().unwrap();
    reg.next_id += 1;
    let id = reg.next_id;
    reg.links.insert(
        id,
        LinkEntry {
            peer: None,
            direction,
            address,
            state: LinkState::Handshaking,
            since: Instant::now(),
            incarnation: 0,
            close: Some(tx),
        },
    );
    (id, rx)
}

pub(crate) fn unregister_link(inner: &Inner, link_id: u64, error: Option<(String, String)>) {
    let mut reg = inner.registry.lock().unwrap();
    let link = reg.links.remove(&link_id);
    if let Some(peer) = link.as_ref().and_then(|l| l.peer) {
        if reg.established.get(&peer) == Some(&link_id) {
            reg.established.remove(&peer);
        }
        if let Some(record) = reg.peers.get_mut(&peer) {
            if error.is_some() {
                record.last_error = error.clone();
            }
            let _ = inner.store.save_checkpoint(peer, record.acked_seq);
        }
    } else if let (Some(link), Some(error)) = (link, error) {
        if reg.refusals.len() == REFUSALS_MAX {
            reg.refusals.pop_front();
        }
        reg.refusals.push_back((
            link.address.clone(),
            link.direction,
            error.0.clone(),
            error.1.clone(),
            Instant::now(),
        ));
        if let Some(dial) = reg.dials.get_mut(&link.address) {
            dial.last_error = Some(error);
        }
    }
    drop(reg);
    inner.bump();
}

pub(crate) fn peer_labels(peer: NodeId) -> PeerLabels {
    PeerLabels {
        peer: peer.to_string(),
    }
}

/// The store's wall clock (with its test offset, see `asp_store::clock`).
pub(crate) fn wall_ms() -> u64 {
    asp_store::clock::wall_ms()
}

pub(crate) fn error_pair(code: ErrorCode, message: &str) -> (String, String) {
    (code.name().to_owned(), message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: u64, lags: &[(u64, u64)]) -> PeerStatus {
        PeerStatus {
            node_id: NodeId::new(id),
            address: None,
            direction: None,
            state: LinkState::Active,
            connected_for: None,
            last_contact: None,
            last_error: None,
            acked_seq: 0,
            events_sent: 0,
            events_received: 0,
            events_parked: 0,
            events_quarantined: 0,
            batches_refused: Vec::new(),
            namespaces: lags
                .iter()
                .map(|&(n, lag_events)| NamespaceLag {
                    namespace: Namespace::new(&format!("ns{n}")).unwrap(),
                    lag_events,
                    lag_ms: lag_events * 10,
                    missing_events: 0,
                })
                .collect(),
            reconcile: ReconcileStats::default(),
        }
    }

    /// 100,000 namespaces made a series each per peer; now a peer shows how many lag
    /// and a series for the 64 that lag most, none for those that do not lag.
    #[test]
    fn lag_series_are_the_worst_namespaces_and_bounded() {
        let many: Vec<(u64, u64)> = (0..10_000).map(|n| (n, n % 3 * n)).collect();
        let quiet: Vec<(u64, u64)> = (0..500).map(|n| (n, 0)).collect();
        let (per_peer, series) = lag_gauges(&[peer(1, &many), peer(2, &quiet), peer(3, &[(7, 5)])]);
        let lagging: Vec<usize> = per_peer.iter().map(|(_, n)| *n).collect();
        let expected = many.iter().filter(|(_, l)| *l > 0).count();
        assert_eq!(lagging, vec![expected, 0, 1]);
        assert_eq!(series.len(), LAG_SERIES_PER_PEER + 1);
        let worst = many.iter().map(|(_, l)| *l).max().unwrap();
        assert_eq!(series[0].1, worst);
        assert!(
            series[..LAG_SERIES_PER_PEER]
                .windows(2)
                .all(|w| w[0].1 >= w[1].1)
        );
        let cutoff = series[LAG_SERIES_PER_PEER - 1].1;
        let above = many.iter().filter(|(_, l)| *l > cutoff).count();
        assert!(
            above < LAG_SERIES_PER_PEER,
            "a namespace lagging more was left out"
        );
        let last = &series[LAG_SERIES_PER_PEER];
        assert_eq!(
            (
                last.0.peer.as_str(),
                last.0.namespace.as_str(),
                last.1,
                last.2
            ),
            (NodeId::new(3).unwrap().to_string().as_str(), "ns7", 5, 50)
        );
    }
}
