//! The registry of links and peers, shared by the replicator (which starts links,
//! dials and reports status) and the links (which register themselves, establish
//! their peer and keep its score). Links use this module, never the replicator's:
//! the replicator uses the links, so the dependency runs one way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asp_core::session::{ErrorCode, NamespaceSummary};
use asp_core::{Namespace, NodeId};
use asp_store::Store;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::ReplicationConfig;
use crate::metrics::{Metrics, PeerLabels};

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
    /// What the peer's certificate attests, from its last TLS link.
    pub certificate: Option<asp_tls::Identity>,
    /// Its last link was to another cluster: what the shares allowed.
    pub federated: Option<crate::federation::Rights>,
    /// What its last link keeps from it (residency, placement, a share's direction):
    /// write concern does not count its acknowledgements for those namespaces.
    pub withhold: Option<asp_core::session::Withhold>,
    /// Bytes of events sent to the peer, per namespace (since this process started).
    pub sent_bytes: std::collections::HashMap<asp_core::Namespace, u64>,
    /// It has dialed this node: it chose the path, so gossip never dials it.
    pub inbound: bool,
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
    /// A run in which this node is receiving the peer's keys (a bootstrap's transfer,
    /// a handover, a repair), while it lasts: the keys received so far and since when.
    pub receiving: Option<(u64, Instant)>,
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
    pub residency: Arc<crate::residency::Residency>,
    pub placement: Arc<crate::placement::Placement>,
    pub audit: Arc<crate::audit::Audit>,
    pub federation: Arc<crate::federation::Federation>,
    pub modes: Arc<crate::modes::Modes>,
    pub leases: Arc<crate::leases::Leases>,
    pub membership: Arc<crate::membership::Membership>,
    /// Which peers this node asked to stop relaying which origins (relay trees).
    pub relay: Mutex<asp_core::session::RelayTree>,
    /// Woken when the relay tree decided grafts or prunes for some link.
    pub relay_changed: tokio::sync::Notify,
    /// Bumped (after the tree's change) with every wake of `relay_changed`: a link
    /// looks into the tree only when it moved, not at every turn of its loop.
    pub relay_generation: std::sync::atomic::AtomicU64,
}

impl Inner {
    /// The relay tree decided frames for other links: wakes them.
    pub fn relay_moved(&self) {
        self.relay_generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        self.relay_changed.notify_waiters();
    }

    pub fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
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
    // A run cut off with the previous link is not running on this one.
    record.reconcile.receiving = None;
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

/// Lists `address` among the dials (status shows its last error from then on).
pub(crate) fn register_dial(inner: &Inner, address: &str) {
    inner
        .registry
        .lock()
        .unwrap()
        .dials
        .entry(address.to_owned())
        .or_default();
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
            // Origins whose first copies came by this link: the peers pruned for them
            // relay them again.
            if inner.relay.lock().unwrap().link_down(peer) {
                inner.relay_moved();
            }
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
        // The address's host: a peer that redials comes from new ports.
        let host = link
            .address
            .rsplit_once(':')
            .map_or(link.address.as_str(), |(h, _)| h);
        // One entry a minute per peer host and reason (the message without the port).
        let reason = error.1.replace(&link.address, host);
        inner.audit.record(
            "peer_refused",
            Some(&format!("{host} {} {reason}", error.0)),
            serde_json::json!({
                "address": link.address,
                "direction": link.direction.name(),
                "code": error.0,
                "message": error.1,
            }),
        );
        if let Some(dial) = reg.dials.get_mut(&link.address) {
            dial.last_error = Some(error);
        }
    }
    drop(reg);
    inner.bump();
}

/// The labels a peer counts with for this node's residency rules: what its certificate
/// attests (none on a plain link); for a peer of another cluster, only the labels a
/// share this cluster offered requires of it, never what the other CA attests alone.
pub(crate) fn residency_labels(
    certificate: Option<&asp_tls::Identity>,
    federated: Option<&crate::federation::Rights>,
) -> crate::residency::Labels {
    match (federated, certificate) {
        (Some(rights), _) => rights.attested.clone(),
        (None, Some(c)) => c.labels.clone(),
        (None, None) => crate::residency::Labels::new(),
    }
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
