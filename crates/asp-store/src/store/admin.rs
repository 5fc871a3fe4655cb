//! What operators and status pages call (`asp-http`'s admin routes, the `asp` command
//! line): conflict policies, held and quarantined events, status and metrics.
//! Compaction and scrub, also admin work, live with their machinery in
//! [`crate::compact`] and [`crate::scrub`].

use asp_core::crdt::Policy;
use asp_core::{Namespace, NodeId};
use tokio::sync::oneshot;

use crate::config::FsyncMode;
use crate::error::WriteError;
use crate::held::{HeldStatus, QuarantineAction, QuarantineOutcome};
use crate::metrics::Metrics;
use crate::types::NamespaceState;
use crate::writer::{PolicyRequest, QuarantineRequest, Request};

use super::{OwnEventsFound, Store};

/// A snapshot of the store's state for status pages.
#[derive(Debug, Clone)]
pub struct StoreStatus {
    pub node_id: NodeId,
    pub fsync: FsyncMode,
    pub feed_first_seq: u64,
    /// The last event visible in the feed.
    pub feed_head_seq: u64,
    pub written_seq: u64,
    pub synced_seq: u64,
    pub acked_seq: u64,
    pub indexed_seq: u64,
    pub log_segments: usize,
    pub log_bytes: u64,
    pub index_bytes: u64,
    pub writer_queue_depth: usize,
    pub writer_queue_max: usize,
    pub namespaces: Vec<(Namespace, NamespaceState)>,
    pub failure: Option<String>,
    /// Why writes are refused for space, while they are (HTTP 507).
    pub no_space: Option<String>,
    /// The last scrub since the store opened (see [`Store::scrub`]).
    pub last_scrub: Option<crate::scrub::ScrubReport>,
}

impl Store {
    /// Compaction and scrub runs in progress, with how far each has got.
    pub fn operations(&self) -> Vec<crate::Operation> {
        self.inner.shared.maintenance.operations.list()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.shared.metrics
    }

    /// What peers turned out to hold of this node's own events beyond what it knew it
    /// had issued (newest last).
    pub fn own_events_found(&self) -> Vec<OwnEventsFound> {
        self.inner
            .shared
            .peers
            .own_events_found
            .lock()
            .unwrap()
            .clone()
    }

    /// A namespace's conflict policy (`lww` unless set).
    pub fn policy(&self, namespace: &Namespace) -> Policy {
        self.inner
            .shared
            .writer
            .policies
            .read()
            .unwrap()
            .get(namespace)
    }

    /// Every namespace whose policy is not `lww`.
    pub fn policies(&self) -> Vec<(Namespace, Policy)> {
        let p = self.inner.shared.writer.policies.read().unwrap();
        p.by_namespace
            .iter()
            .filter(|(_, p)| **p != Policy::Lww)
            .map(|(n, p)| (n.clone(), *p))
            .collect()
    }

    /// Sets a namespace's conflict policy, durably. Refused with
    /// [`WriteError::PolicyFixed`] once the namespace holds data under another policy.
    pub async fn set_policy(&self, namespace: Namespace, policy: Policy) -> Result<(), WriteError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .queue
            .send(Request::Policy(PolicyRequest {
                namespace,
                policy,
                reply,
            }))
            .await
            .map_err(|_| WriteError::Closed)?;
        answer.await.map_err(|_| self.closed_or_failed())?
    }

    /// What this node holds without applying it (see [`Store::apply_remote`]): parked
    /// events and, per namespace, quarantined ones.
    pub fn held(&self) -> HeldStatus {
        let shared = &self.inner.shared;
        let namespaces = shared.indexer.namespaces.read().unwrap();
        let holds_data = |ns: &Namespace| namespaces.get(ns).is_some_and(|s| !s.vector.is_empty());
        let held = shared.writer.held.lock().unwrap();
        held.status(shared.config.max_clock_skew_ms, |ns| {
            (self.policy(ns), holds_data(ns))
        })
    }

    /// Whether `namespace` has quarantined events here (its state differs from its
    /// peers' by design until an operator resolves it: anti-entropy leaves it alone).
    pub fn is_quarantined(&self, namespace: &Namespace) -> bool {
        self.inner
            .shared
            .writer
            .held
            .lock()
            .unwrap()
            .is_quarantined(namespace)
    }

    /// Resolves a namespace's quarantine: applies the events its policy accepts now
    /// ([`QuarantineAction::Retry`], after the policy was set to theirs), or drops them
    /// from this node ([`QuarantineAction::Discard`]; their dots join the namespace's
    /// base vector, so that they are neither asked for nor taken again). Answers once
    /// the change is durable; all zeros when the namespace has nothing quarantined.
    pub async fn resolve_quarantine(
        &self,
        namespace: Namespace,
        action: QuarantineAction,
    ) -> Result<QuarantineOutcome, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .queue
            .send(Request::Quarantine(QuarantineRequest {
                namespace,
                action,
                reply,
            }))
            .await
            .map_err(|_| WriteError::Closed)?;
        answer.await.map_err(|_| self.closed_or_failed())?
    }

    /// The namespaces this node holds whose names start with `prefix` (cheap: no
    /// vector is copied).
    pub fn namespaces_with_prefix(&self, prefix: &str) -> Vec<asp_core::Namespace> {
        self.inner
            .shared
            .indexer
            .namespaces
            .read()
            .unwrap()
            .keys()
            .filter(|ns| ns.as_str().starts_with(prefix))
            .cloned()
            .collect()
    }

    pub fn status(&self) -> StoreStatus {
        let shared = &self.inner.shared;
        let (written, synced, acked, indexed) = {
            let p = shared.progress.lock().unwrap();
            (p.written.seq, p.synced.seq, p.acked.seq, p.indexed.seq)
        };
        let mut namespaces: Vec<_> = shared
            .indexer
            .namespaces
            .read()
            .unwrap()
            .iter()
            .map(|(ns, state)| (ns.clone(), state.clone()))
            .collect();
        namespaces.sort_by(|a, b| a.0.cmp(&b.0));
        StoreStatus {
            node_id: shared.node_id,
            fsync: shared.config.fsync,
            feed_first_seq: shared.log.first_seq(),
            feed_head_seq: self.head().seq,
            written_seq: written,
            synced_seq: synced,
            acked_seq: acked,
            indexed_seq: indexed,
            log_segments: shared.log.segment_count(),
            log_bytes: shared.log.total_bytes(),
            index_bytes: shared.index.disk_bytes(),
            writer_queue_depth: self.inner.queue.len(),
            writer_queue_max: self.inner.queue.capacity(),
            namespaces,
            failure: shared.health.failure.get().cloned(),
            no_space: shared.space_problem(),
            last_scrub: shared.maintenance.last_scrub.lock().unwrap().clone(),
        }
    }
}
