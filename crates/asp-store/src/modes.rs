//! Write modes: which node may accept writes to a leader namespace, and the epoch its
//! events carry. The node decides (from the replicated mode records, see
//! `asp-node/src/modes.rs`) and installs a [`WriteGate`]; the writer asks it for every
//! local write, so a write is stamped with the epoch it was accepted under in the same
//! step as the check.

use std::sync::Arc;

use asp_core::{Namespace, NodeId};

use crate::error::WriteError;

/// A leader namespace as this node knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderMode {
    pub epoch: u64,
    pub leader: NodeId,
    /// The leader's API address, when its member record names one (for clients
    /// redirected by `not_leader`).
    pub leader_api: Option<String>,
    /// This node led an earlier epoch of the namespace: it is fenced, not merely a
    /// follower.
    pub fenced: bool,
}

/// A write's `If-Fence`: it applies only if `token` is the newest token of lease `name`
/// in the written namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub name: String,
    pub token: u64,
}

/// What the writer asks before every local write.
pub trait WriteGate: Send + Sync {
    /// `None`: multi-master (every node writes, epoch 0); else the leader mode.
    fn mode(&self, namespace: &Namespace) -> Option<LeaderMode>;
    /// The newest token of lease `name` in `namespace` this node knows (`None`: no such
    /// lease).
    fn newest_token(&self, namespace: &Namespace, name: &str) -> Option<u64>;
}

/// The gate a store holds, once the node installed one.
pub type SharedGate = Arc<dyn WriteGate>;

/// The epoch a local write to `namespace` is stamped with, or why this node may not
/// accept it: a stale fence first (every node knows it), then leadership.
pub(crate) fn admit(
    gate: Option<&SharedGate>,
    namespace: &Namespace,
    me: NodeId,
    fence: Option<&Fence>,
) -> Result<u64, WriteError> {
    if let Some(f) = fence {
        let newest = gate.and_then(|g| g.newest_token(namespace, &f.name));
        if newest != Some(f.token) {
            let message = match newest {
                Some(n) if n > f.token => format!(
                    "If-Fence {}:{} is stale: lease {} of namespace {namespace} has a newer token, {n}",
                    f.name, f.token, f.name
                ),
                Some(n) => format!(
                    "If-Fence {}:{}: no such token; the newest of lease {} is {n}",
                    f.name, f.token, f.name
                ),
                None => format!(
                    "If-Fence {}:{}: namespace {namespace} has no lease named {:?} (on this node)",
                    f.name, f.token, f.name
                ),
            };
            return Err(WriteError::StaleFence { newest, message });
        }
    }
    let Some(mode) = gate.and_then(|g| g.mode(namespace)) else {
        return Ok(0);
    };
    if mode.leader == me && !mode.fenced {
        return Ok(mode.epoch);
    }
    let where_ = mode
        .leader_api
        .as_deref()
        .map(|a| format!(" at {a}"))
        .unwrap_or_default();
    let message = if mode.fenced {
        format!(
            "this node led namespace {namespace} in an earlier epoch and is fenced: node {}{where_} leads epoch {}",
            mode.leader, mode.epoch
        )
    } else {
        format!(
            "namespace {namespace} is in leader mode: write to its leader, node {}{where_} (epoch {})",
            mode.leader, mode.epoch
        )
    };
    Err(WriteError::NotLeader {
        fenced: mode.fenced,
        epoch: mode.epoch,
        leader: mode.leader,
        leader_api: mode.leader_api,
        message,
    })
}
