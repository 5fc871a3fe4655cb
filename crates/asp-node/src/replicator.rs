//! The replicator: listener, dialers, status (lag, lag gauges) and write concern. The
//! registry of links and peers it reads is in `registry.rs`.
//!
//! Size: status reads every link and record at once, and write concern waits on them;
//! splitting the two would split the one lock order they share.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asp_core::session::lists;
use asp_core::{Namespace, NodeId};
use asp_store::Store;
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::ReplicationConfig;
use crate::link::{self, LinkEnd};
use crate::metrics::{LagLabels, Metrics, PeerLabels};
use crate::registry::{Direction, Inner, LinkState, Links, PeerSummary, ReconcileStats, wall_ms};

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
    /// What the peer's certificate attested on its last TLS link.
    pub certificate: Option<asp_tls::Identity>,
    /// The peer is of another cluster (its last link went by shares): which.
    pub federated: Option<crate::federation::Rights>,
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
    /// What this node's own certificate attests (`None`: peer links are plain TCP).
    pub certificate: Option<asp_tls::Identity>,
    /// Every member of the cluster this node knows (by gossip), itself first.
    pub members: Vec<crate::membership::Member>,
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

/// The replication runtime of one node. Cheap to clone.
#[derive(Clone)]
pub struct Replicator {
    pub(crate) inner: Arc<Inner>,
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
        let audit = Arc::new(crate::audit::Audit::new(store.clone(), store.node_id()));
        let federation = Arc::new(crate::federation::Federation::new(
            store.node_id(),
            config.tls.clone(),
        ));
        let store_node = store.node_id();
        let incarnation = rand::random::<u64>() | 1;
        let membership = Arc::new(crate::membership::Membership::new(
            asp_core::session::MemberEntry {
                node: store_node,
                incarnation,
                heartbeat: 0,
                name: match &config.tls {
                    Some(tls) => tls.current().identity.name.clone(),
                    None => store_node.to_string(),
                },
                api: config.api_address.clone().unwrap_or_default(),
                peer: match &config.advertise {
                    Some(a) => a.clone(),
                    None => listen.map(|a| a.to_string()).unwrap_or_default(),
                },
            },
            config.heartbeat,
        ));
        let modes = Arc::new(crate::modes::Modes::new(store_node, membership.clone()));
        let inner = Arc::new(Inner {
            node_id: store.node_id(),
            incarnation,
            store,
            config,
            listen,
            registry: Mutex::new(Links::default()),
            changed: watch::channel(0).0,
            shutdown,
            metrics: Metrics::default(),
            residency: Arc::default(),
            placement: Arc::new(crate::placement::Placement::new(store_node)),
            audit,
            federation,
            leases: Arc::new(crate::leases::Leases::new(store_node, modes.clone())),
            modes,
            membership,
            relay: Mutex::default(),
            relay_changed: tokio::sync::Notify::new(),
            relay_generation: std::sync::atomic::AtomicU64::new(0),
        });
        let mut tasks = JoinSet::new();
        // Residency rules are known before any link sends anything.
        {
            let (r, s) = (inner.residency.clone(), inner.store.clone());
            tokio::task::spawn_blocking(move || r.reload(&s))
                .await
                .map_err(|e| StartError::Config(e.to_string()))?
                .map_err(StartError::Config)?;
        }
        // Placement rules and members' labels, likewise.
        {
            let (p, s) = (inner.placement.clone(), inner.store.clone());
            tokio::task::spawn_blocking(move || p.reload_labels(&s).and_then(|()| p.reload(&s)))
                .await
                .map_err(|e| StartError::Config(e.to_string()))?
                .map_err(StartError::Config)?;
        }
        // Shares (the partner CAs trusted) and members are known before any link
        // starts; with TLS, this node writes itself into the member list.
        {
            let (f, s) = (inner.federation.clone(), inner.store.clone());
            tokio::task::spawn_blocking(move || f.reload(&s))
                .await
                .map_err(|e| StartError::Config(e.to_string()))?
                .map_err(StartError::Config)?;
            // Membership records matter to federated links, which need TLS, and to
            // placement, which picks holders by labels: a plain node without labels
            // writes nothing (gossip tells members apart, see membership.rs). In the
            // background: after a restart a local write may wait for peers
            // (own_events_wait_ms), which the links started below answer.
            let labels: crate::residency::Labels = inner.config.labels.iter().cloned().collect();
            if inner.config.tls.is_some() || !labels.is_empty() {
                let member = crate::federation::MemberRecord {
                    name: match &inner.config.tls {
                        Some(tls) => tls.current().identity.name.clone(),
                        None => inner.node_id.to_string(),
                    },
                    api: inner.config.api_address.clone(),
                    peer: listen.map(|a| a.to_string()),
                    labels,
                };
                let (f, s) = (inner.federation.clone(), inner.store.clone());
                tasks.spawn(async move {
                    if let Err(e) = f.register(&s, &member).await {
                        tracing::warn!(error = %e, "cannot write this node into the member list");
                    }
                });
            }
        }
        // Leader namespaces: known before any client writes; the writer asks the gate.
        {
            let (m, l, s) = (
                inner.modes.clone(),
                inner.leases.clone(),
                inner.store.clone(),
            );
            tokio::task::spawn_blocking(move || m.reload(&s).and_then(|()| l.reload(&s)))
                .await
                .map_err(|e| StartError::Config(e.to_string()))?
                .map_err(StartError::Config)?;
            inner.store.set_write_gate(Arc::new(crate::leases::Gate {
                modes: inner.modes.clone(),
                leases: inner.leases.clone(),
            }));
        }
        let modes = inner.modes.clone();
        tasks.spawn(crate::follow::follow(
            inner.store.clone(),
            vec![
                crate::federation::ns(crate::modes::MODES_NAMESPACE),
                crate::federation::ns(crate::modes::ELECTIONS_NAMESPACE),
                crate::federation::ns(crate::federation::MEMBERS_NAMESPACE),
            ],
            None,
            "modes",
            inner.shutdown.clone(),
            move |s| modes.answer_asks(s),
        ));
        if !inner.config.failover_after.is_zero() {
            tasks.spawn(crate::modes::failover_loop(
                inner.modes.clone(),
                inner.store.clone(),
                inner.config.failover_after,
                inner.shutdown.clone(),
            ));
        }
        tasks.spawn(crate::expiry::sweep_loop(
            inner.store.clone(),
            inner.modes.clone(),
            inner.leases.clone(),
            inner.shutdown.clone(),
        ));
        tasks.spawn(crate::feed_watch::watch_feed(
            inner.modes.clone(),
            inner.leases.clone(),
            inner.store.clone(),
            inner.shutdown.clone(),
        ));
        // Shares expire with no write: looked at every 5 s besides.
        let federation = inner.federation.clone();
        tasks.spawn(crate::follow::follow(
            inner.store.clone(),
            vec![
                crate::federation::ns(crate::federation::SHARES_NAMESPACE),
                crate::federation::ns(crate::federation::MEMBERS_NAMESPACE),
            ],
            Some(std::time::Duration::from_secs(5)),
            "shares",
            inner.shutdown.clone(),
            move |s| federation.reload(s),
        ));
        // A rule that arrives by replication takes effect at once.
        let residency = inner.residency.clone();
        tasks.spawn(crate::follow::follow(
            inner.store.clone(),
            vec![crate::residency::namespace()],
            None,
            "residency rules",
            inner.shutdown.clone(),
            move |s| residency.reload(s).map(|_| ()),
        ));
        // Placement: rules and members' labels as they arrive; the members heard, every
        // heartbeat.
        let placement = inner.placement.clone();
        tasks.spawn(crate::follow::follow(
            inner.store.clone(),
            vec![
                crate::placement::namespace(),
                crate::federation::ns(crate::federation::MEMBERS_NAMESPACE),
            ],
            None,
            "placement rules",
            inner.shutdown.clone(),
            move |s| {
                placement
                    .reload_labels(s)
                    .and_then(|()| placement.reload(s).map(|_| ()))
            },
        ));
        tasks.spawn(crate::placement::placement_loop(inner.clone()));
        if let Some(listener) = listener {
            tasks.spawn(accept_loop(inner.clone(), listener));
        }
        for address in inner.config.peers.clone() {
            crate::registry::register_dial(&inner, &address);
            tasks.spawn(dial_loop(inner.clone(), address));
        }
        tasks.spawn(lag_loop(inner.clone()));
        tasks.spawn(crate::membership::membership_loop(inner.clone()));
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

    /// The node's audit log.
    pub fn audit(&self) -> Arc<crate::audit::Audit> {
        self.inner.audit.clone()
    }

    /// The shares this node knows (federation with other clusters).
    pub fn federation(&self) -> Arc<crate::federation::Federation> {
        self.inner.federation.clone()
    }

    /// The cluster this node belongs to.
    pub fn cluster_id(&self) -> &str {
        &self.inner.config.cluster_id
    }

    /// The leases this node knows (it decides them where it leads).
    pub fn leases(&self) -> Arc<crate::leases::Leases> {
        self.inner.leases.clone()
    }

    /// The leader namespaces this node knows.
    pub fn modes(&self) -> Arc<crate::modes::Modes> {
        self.inner.modes.clone()
    }

    /// The placement rules this node knows and the holders it picks.
    pub fn placement(&self) -> Arc<crate::placement::Placement> {
        self.inner.placement.clone()
    }

    /// The residency rules this node knows.
    pub fn residency(&self) -> Arc<crate::residency::Residency> {
        self.inner.residency.clone()
    }

    /// This node's labels (attested by its certificate with TLS).
    pub fn labels(&self) -> crate::residency::Labels {
        self.inner.config.labels.iter().cloned().collect()
    }

    /// Per peer ever linked since start: its id, what its certificate attests, and the
    /// bytes of `namespace`'s events sent to it.
    pub fn sent_to_peers(
        &self,
        namespace: &Namespace,
    ) -> Vec<(NodeId, Option<asp_tls::Identity>, u64)> {
        let reg = self.inner.registry.lock().unwrap();
        let mut out: Vec<_> = reg
            .peers
            .iter()
            .map(|(node, r)| {
                (
                    *node,
                    r.certificate.clone(),
                    r.sent_bytes.get(namespace).copied().unwrap_or(0),
                )
            })
            .collect();
        out.sort_by_key(|(n, _, _)| *n);
        out
    }

    /// The address peers can dial (with the port chosen if 0 was configured).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.inner.listen
    }

    /// Whether a link to `node` is up now.
    pub fn linked_to(&self, node: NodeId) -> bool {
        self.inner
            .registry
            .lock()
            .unwrap()
            .established
            .contains_key(&node)
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
        if let Some(tls) = &self.inner.config.tls {
            tls.metrics().register(registry);
        }
    }

    /// Runs a peer link over a byte stream another transport carries (the NATS
    /// transport of `asp-connect`): the same session, frames and guarantees as a TCP
    /// link, without TLS (the carrying transport is trusted as the network is).
    /// `opened` is true on the side that opened the stream (it speaks first). Returns
    /// when the link ends: `Err` with the reason if it failed or was refused (past
    /// `links_max`).
    pub async fn attach(
        &self,
        stream: tokio::io::DuplexStream,
        opened: bool,
        address: String,
    ) -> Result<(), String> {
        if links_full(&self.inner) {
            return Err(format!(
                "refusing a peer link from {address}: {} links already (links_max)",
                self.inner.config.links_max
            ));
        }
        let direction = if opened {
            Direction::Outbound
        } else {
            Direction::Inbound
        };
        match link::run(
            self.inner.clone(),
            link::Connection::Carried(stream),
            direction,
            address,
        )
        .await
        {
            link::LinkEnd::Failed((code, message)) => Err(format!("{code}: {message}")),
            link::LinkEnd::Duplicate => Err("another link to this node is kept".into()),
            _ => Ok(()),
        }
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
                reconcile: {
                    let mut r = record.reconcile.clone();
                    // Only while a link is up: a run does not outlive its link.
                    if link.is_none_or(|l| l.state != LinkState::Active) {
                        r.receiving = None;
                    }
                    r
                },
                certificate: record.certificate.clone(),
                federated: record.federated.clone(),
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
                    certificate: None,
                    federated: None,
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
        for (at, summary, acked_seq, theirs) in lags {
            // What this node sends this peer (its rights by certificate, or the
            // shares with its cluster).
            let peer = &peers[at];
            let ours: Vec<String> = match &peer.federated {
                Some(rights) => rights.send.keys().cloned().collect(),
                None => self
                    .inner
                    .config
                    .namespaces_with(peer.certificate.as_ref().map(|c| c.name.as_str())),
            };
            let labels = crate::registry::residency_labels(
                peer.certificate.as_ref(),
                peer.federated.as_ref(),
            );
            let residency = &self.inner.residency;
            let shared = |ns: &Namespace| {
                lists(&ours, ns)
                    && theirs.as_ref().is_none_or(|t| lists(t, ns))
                    && !residency.withholds(ns, &labels)
            };
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
            certificate: self
                .inner
                .config
                .tls
                .as_ref()
                .map(|t| t.current().identity.clone()),
            members: self.inner.membership.list(),
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

/// Whether this node holds `links_max` links already (one more is refused).
fn links_full(inner: &Inner) -> bool {
    inner.registry.lock().unwrap().links.len() >= inner.config.links_max
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
                if links_full(&inner) {
                    tracing::warn!(peer = %addr, limit = inner.config.links_max, "refusing a peer link: too many links");
                    continue;
                }
                let inner = inner.clone();
                links.spawn(async move {
                    let _ = link::run(
                        inner,
                        link::Connection::Tcp(stream),
                        Direction::Inbound,
                        addr.to_string(),
                    )
                    .await;
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
    dial_loop_until(inner, address, None).await;
}

pub(crate) async fn dial_loop_until(inner: Arc<Inner>, address: String, learned: Option<NodeId>) {
    let mut backoff = inner.config.backoff_min;
    let mut changed = inner.changed.subscribe();
    loop {
        if inner.shutdown.is_cancelled() {
            return;
        }
        if let Some(node) = learned {
            let linked = inner
                .registry
                .lock()
                .unwrap()
                .established
                .contains_key(&node);
            let down = inner
                .membership
                .health(node)
                .is_none_or(|h| h == crate::membership::Health::Down);
            if down && !linked {
                return;
            }
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
                link::run(
                    inner.clone(),
                    link::Connection::Tcp(stream),
                    Direction::Outbound,
                    address.clone(),
                )
                .await
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
            certificate: None,
            federated: None,
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
