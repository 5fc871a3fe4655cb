//! Replication settings.

use std::net::SocketAddr;
use std::time::Duration;

use asp_core::session::{ALL_NAMESPACES, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};

/// The default port for peer links.
pub const DEFAULT_PEER_PORT: u16 = 7800;

/// How a node replicates. Every bound is here.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    /// Nodes of different clusters refuse each other.
    pub cluster_id: String,
    /// Where to accept peer links (`None`: only dial out).
    pub listen: Option<SocketAddr>,
    /// Peers to dial, as `host:port`.
    pub peers: Vec<String>,
    /// Namespaces to replicate; `*` for all.
    pub namespaces: Vec<String>,
    /// `key=value` labels announced to peers.
    pub labels: Vec<(String, String)>,
    /// This node's API address as clients reach it (`http://127.0.0.1:7700`): written
    /// into its member record, so that a follower can name its leader's.
    pub api_address: Option<String>,
    /// The peer address written into this node's member record, when members must
    /// dial another than the one bound (`--advertise-peer`); `None`: the bound one.
    pub advertise: Option<String>,
    /// Dial members learned by gossip that nobody told this node how to reach (off by
    /// default: a topology chosen on purpose — a line through a relay, a proxy — stays
    /// as configured).
    pub dial_members: bool,
    /// A leader namespace with three voters or more fails over once its leader has
    /// been silent this long (zero: never).
    pub failover_after: Duration,
    pub heartbeat: Duration,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    /// Bytes of events a peer may have in flight towards this node.
    pub credit_window_bytes: u32,
    /// Bytes of events per frame, at most.
    pub batch_bytes_max: usize,
    /// Bytes queued for the socket before this node stops reading its feed for a link.
    pub send_queue_bytes_max: usize,
    /// Reconnection backoff: first wait, doubling up to the maximum, with jitter.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Links (dialed and accepted) at most.
    pub links_max: usize,
    /// How often each side re-sends its summary (for lag figures).
    pub summary_interval: Duration,
    /// How often a node compares each namespace's digest with each peer's and, where
    /// they differ on an idle link, reconciles (zero: never).
    pub anti_entropy_interval: Duration,
    /// Relay trees: a node asks a peer that sends it copies of events it already
    /// holds to stop relaying that origin's events (`Prune`), so that a mesh sends
    /// each event about once to each node (see `asp_core::session::RelayTree`). Off:
    /// every node relays every event to every peer that does not show it.
    pub relay_tree: bool,
    /// The protocol versions offered; only tests change them.
    pub version_min: u16,
    pub version_max: u16,
    /// Per peer (by the name its certificate attests; `*`: every other peer), the
    /// namespaces this node replicates with it: names, or `*`. Nothing else of this
    /// node goes to that peer, and a namespace not listed that the peer sends closes the
    /// link. Empty: every peer replicates every namespace of `namespaces`. Needs `tls`.
    pub peer_namespaces: std::collections::BTreeMap<String, Vec<String>>,
    /// TLS for peer links (mutual: a certificate from the cluster CA both ways);
    /// `None`: plain TCP.
    pub tls: Option<std::sync::Arc<asp_tls::Tls>>,
    /// Tests only: when set, a transfer sends each page after the first only once it
    /// takes a permit from this semaphore, so that a test can hold a bootstrap open.
    #[doc(hidden)]
    pub transfer_gate: Option<std::sync::Arc<tokio::sync::Semaphore>>,
}

impl ReplicationConfig {
    /// The namespaces this node replicates with a peer whose certificate names it
    /// `peer` (`None`: a plain link, or no certificate).
    pub fn namespaces_with(&self, peer: Option<&str>) -> Vec<String> {
        let rights = peer
            .and_then(|p| self.peer_namespaces.get(p))
            .or_else(|| self.peer_namespaces.get(ALL_NAMESPACES));
        match rights {
            Some(allowed) => asp_core::session::intersect(&self.namespaces, allowed),
            None => self.namespaces.clone(),
        }
    }

    pub fn new(cluster_id: impl Into<String>) -> Self {
        Self {
            cluster_id: cluster_id.into(),
            listen: None,
            peers: Vec::new(),
            namespaces: vec![ALL_NAMESPACES.to_owned()],
            labels: Vec::new(),
            api_address: None,
            advertise: None,
            dial_members: false,
            failover_after: Duration::from_secs(5),
            heartbeat: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            credit_window_bytes: 16 << 20,
            batch_bytes_max: 1 << 20,
            send_queue_bytes_max: 4 << 20,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            links_max: 256,
            summary_interval: Duration::from_secs(1),
            anti_entropy_interval: Duration::from_secs(60),
            relay_tree: true,
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            transfer_gate: None,
            tls: None,
            peer_namespaces: std::collections::BTreeMap::new(),
        }
    }

    /// Checks the settings; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster_id.is_empty() || self.cluster_id.len() > 256 {
            return Err("cluster_id must be 1 to 256 bytes".into());
        }
        if self.idle_timeout <= self.heartbeat {
            return Err(format!(
                "idle_timeout ({:?}) must be longer than heartbeat ({:?})",
                self.idle_timeout, self.heartbeat
            ));
        }
        if !self.failover_after.is_zero() && self.failover_after < self.heartbeat * 3 {
            return Err(format!(
                "failover_ms ({:?}) must be at least three heartbeats ({:?}), or 0 for no failover: a leader is not gone for missing one",
                self.failover_after,
                self.heartbeat * 3
            ));
        }
        if self.credit_window_bytes < (64 << 10) {
            return Err("credit_window_bytes must be at least 64 KiB".into());
        }
        if self.batch_bytes_max == 0 || self.batch_bytes_max > asp_wire::FRAME_BYTES_MAX / 2 {
            return Err(format!(
                "batch_bytes_max must be between 1 and {}",
                asp_wire::FRAME_BYTES_MAX / 2
            ));
        }
        if !self.peer_namespaces.is_empty() && self.tls.is_none() {
            return Err(
                "peer_namespaces needs TLS: a peer's rights follow the name its certificate attests"
                    .into(),
            );
        }
        for (peer, names) in &self.peer_namespaces {
            for name in names {
                if name != ALL_NAMESPACES && asp_core::Namespace::new(name).is_err() {
                    return Err(format!(
                        "peer_namespaces.{peer}: {name:?} is neither * nor a namespace name"
                    ));
                }
            }
        }
        for peer in &self.peers {
            if peer
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
            {
                return Err(format!("peer {peer:?} is not host:port"));
            }
        }
        Ok(())
    }
}
