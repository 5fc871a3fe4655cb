//! How a node runs its sessions.

use std::time::Duration;

use super::{ALL_NAMESPACES, Federation, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, Withhold};
use crate::NodeId;

/// How a node runs its sessions.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub node_id: NodeId,
    pub cluster_id: String,
    pub labels: Vec<(String, String)>,
    /// Namespaces this node replicates; `*` for all.
    pub namespaces: Vec<String>,
    pub version_min: u16,
    pub version_max: u16,
    /// Send a heartbeat after this long without sending anything.
    pub heartbeat: Duration,
    /// Close the link after this long without hearing anything.
    pub idle_timeout: Duration,
    /// Close the link if the handshake has not finished after this long.
    pub handshake_timeout: Duration,
    /// Bytes of events the peer may have in flight towards this node.
    pub credit_window_bytes: u32,
    /// This run of the node (random, new at every start; see [`super::Hello::incarnation`]).
    pub incarnation: u64,
    /// Namespaces kept from this peer whatever the lists say (residency), asked at
    /// every use: rules may change while the link is up.
    pub withhold: Option<Withhold>,
    /// Set on a link to another cluster (through a share): what it may carry.
    pub federation: Option<Federation>,
}

impl SessionConfig {
    pub fn new(node_id: NodeId, cluster_id: impl Into<String>) -> Self {
        Self {
            node_id,
            cluster_id: cluster_id.into(),
            labels: Vec::new(),
            namespaces: vec![ALL_NAMESPACES.to_owned()],
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            heartbeat: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            credit_window_bytes: 8 << 20,
            incarnation: 0,
            withhold: None,
            federation: None,
        }
    }
}
