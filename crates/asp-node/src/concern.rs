//! Write concern: how many nodes hold a write durably, counted from direct peers'
//! acknowledgements and from the reports that travel through relays.

use std::time::Duration;

use asp_core::{Namespace, NodeId};

use crate::Replicator;

/// What a write's `replicas` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replicas {
    Count(usize),
    Majority,
    All,
}

impl Replicator {
    /// Waits until `replicas` nodes (this one included) have acknowledged feed position
    /// `seq` as durable, or `timeout` passes; returns how many have. Only directly
    /// linked peers acknowledge; see [`Replicator::wait_holding`] for relays.
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

    /// How many nodes `want` asks of a write to `namespace`, and the nodes that count
    /// (`None`: any node). `majority` in a leader namespace with voters is a majority
    /// of the voters, and only voters count; elsewhere a majority of the members this
    /// node knows. `all` is every member this node knows.
    ///
    /// A placed namespace is held by its holders only: they alone count, and `all` and
    /// `majority` are of them (a leader namespace's voters still decide `majority`).
    pub fn resolve_replicas(
        &self,
        namespace: &Namespace,
        want: Replicas,
    ) -> (usize, Option<Vec<NodeId>>) {
        // A placed namespace: its holders are the nodes, and only they count.
        let (members, counted) = match self.inner.placement.holders(namespace) {
            Some(holders) => (holders.len(), Some(holders)),
            None => (self.members_known(), None),
        };
        match want {
            Replicas::Count(n) => (n, counted),
            Replicas::All => (members, counted),
            Replicas::Majority => {
                let history = self.inner.modes.history(namespace);
                match history.current() {
                    Some(r) if r.leader.is_some() && !r.voters.is_empty() => (
                        asp_core::modes::majority(r.voters.len()),
                        Some(r.voters.clone()),
                    ),
                    _ => (asp_core::modes::majority(members), counted),
                }
            }
        }
    }

    /// The nodes this node knows of: members by gossip, or at least itself and the
    /// peers it knows (configured or linked).
    pub fn members_known(&self) -> usize {
        self.inner
            .membership
            .list()
            .len()
            .max(1 + self.peers_known())
    }

    /// Waits until `replicas` nodes (this one included) hold a write durably — the
    /// dots `dots` of `namespace`, ending at this node's feed position `seq` — or
    /// `timeout` passes; returns how many do. A node counts once its acknowledgement
    /// of `seq` arrived (a direct peer), or once its newest report, which travels
    /// through relays, holds every dot. With `voters`, only they count. A peer its link
    /// withholds the namespace from (residency, placement, a share's direction) never
    /// counts by its acknowledgement: it acknowledges feed positions, and the
    /// namespace's events within them never went to it.
    pub async fn wait_holding(
        &self,
        namespace: &Namespace,
        dots: &[asp_core::Dot],
        seq: u64,
        replicas: usize,
        voters: Option<&[NodeId]>,
        timeout: Duration,
    ) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changed = self.inner.changed.subscribe();
        loop {
            changed.borrow_and_update();
            let mut holders: std::collections::HashSet<NodeId> = self
                .inner
                .registry
                .lock()
                .unwrap()
                .peers
                .iter()
                .filter(|(_, p)| {
                    p.acked_seq >= seq
                        && !p.withhold.as_ref().is_some_and(|w| w.withholds(namespace))
                })
                .map(|(&n, _)| n)
                .collect();
            holders.insert(self.inner.node_id);
            holders.extend(self.inner.store.nodes_holding(namespace, dots));
            let count = match voters {
                Some(v) => holders.iter().filter(|n| v.contains(n)).count(),
                None => holders.len(),
            };
            if count >= replicas {
                return count;
            }
            // Acknowledgements wake this at once; reports come with summaries (about
            // once a second), so look again every 50 ms as well.
            let next = deadline.min(tokio::time::Instant::now() + Duration::from_millis(50));
            let _ = tokio::time::timeout_at(next, changed.changed()).await;
            if tokio::time::Instant::now() >= deadline {
                return count;
            }
        }
    }
}
