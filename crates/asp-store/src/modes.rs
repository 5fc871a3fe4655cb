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

/// Answers, per namespace, `None` (multi-master: every node writes, epoch 0) or the
/// namespace's leader mode.
pub type WriteGate = Arc<dyn Fn(&Namespace) -> Option<LeaderMode> + Send + Sync>;

/// The epoch a local write to `namespace` is stamped with, or why this node may not
/// accept it.
pub(crate) fn admit(
    gate: Option<&WriteGate>,
    namespace: &Namespace,
    me: NodeId,
) -> Result<u64, WriteError> {
    let Some(mode) = gate.and_then(|g| g(namespace)) else {
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
