//! Relay trees on a peer link: the runtime side of [`asp_core::session::RelayTree`].
//! After each batch from the peer is applied, copies of events this node already held
//! prune the peer for their origins; grafts decided elsewhere (another link went down)
//! go out; and at each of the peer's summaries, dots of the peer this node has lacked
//! since the summary before graft their origins back and start an anti-entropy run
//! (what the peer's stream skipped while pruned comes by no stream).

use std::time::Instant;

use asp_core::NodeId;
use asp_core::session::NamespaceSummary;
use asp_store::ApplyOutcome;

use super::Link;
use crate::registry::peer_labels;

impl Link {
    /// Whether this link takes part in relay trees: on, a link within the cluster (a
    /// share's link carries only what the share allows, so it is no path to rely on),
    /// with a peer that speaks protocol 5.
    pub(super) fn relays_by_tree(&self) -> bool {
        self.inner.config.relay_tree
            && self.federated.is_none()
            && self.session.peer_relays_by_tree()
    }

    /// A batch of the peer's was applied: copies of events already held prune the
    /// peer for their origins.
    pub(super) fn relay_delivered(&mut self, outcome: &ApplyOutcome) {
        let Some(peer) = self.peer else { return };
        if !self.inner.config.relay_tree || self.federated.is_some() {
            return;
        }
        if outcome.fresh_origins.is_empty() && outcome.duplicate_origins.is_empty() {
            return;
        }
        let (prune, others) = {
            let mut tree = self.inner.relay.lock().unwrap();
            let prune = tree.delivered(peer, &outcome.fresh_origins, &outcome.duplicate_origins);
            (prune, tree.prunes_added())
        };
        if others {
            self.inner.relay_moved();
        }
        if !prune.is_empty() {
            tracing::debug!(peer = %peer, origins = ?prune, "relay tree: pruned");
            self.count_relay(true, prune.len());
            self.session.send_prune(prune, Instant::now());
        }
    }

    /// Counts prunes (origins) or grafts (frames) sent to the peer.
    fn count_relay(&self, prune: bool, n: usize) {
        let Some(peer) = self.peer else { return };
        let family = if prune {
            &self.inner.metrics.relay_prunes
        } else {
            &self.inner.metrics.relay_grafts
        };
        family.get_or_create(&peer_labels(peer)).inc_by(n as u64);
    }

    /// Sends the grafts another link's end decided for this peer.
    pub(super) fn take_grafts(&mut self) {
        let Some(peer) = self.peer else { return };
        if !self.inner.config.relay_tree {
            return;
        }
        let generation = self
            .inner
            .relay_generation
            .load(std::sync::atomic::Ordering::Acquire);
        if generation == self.relay_seen {
            return;
        }
        self.relay_seen = generation;
        let (grafts, prunes) = {
            let mut tree = self.inner.relay.lock().unwrap();
            (tree.take_grafts(peer), tree.take_prunes(peer))
        };
        // Taken either way: a peer of an earlier protocol or another cluster's relays
        // everything already.
        if !self.relays_by_tree() {
            return;
        }
        if !prunes.is_empty() {
            tracing::debug!(peer = %peer, origins = ?prunes, "relay tree: pruned (the origin's own copy came second)");
            self.count_relay(true, prunes.len());
            self.session.send_prune(prunes, Instant::now());
        }
        if !grafts.is_empty() {
            tracing::debug!(peer = %peer, origins = ?grafts, "relay tree: grafted (a link went down)");
            self.count_relay(false, 1);
            self.grafted.extend(grafts.iter().copied());
            self.session.send_graft(grafts, Instant::now());
        }
    }

    /// A summary of the peer's: dots it holds that this node lacked at its previous
    /// summary too are not on their way. Their origins are grafted if the peer was
    /// pruned for them, and where the peer was (now or by an earlier graft), an
    /// anti-entropy run fetches what its stream skipped.
    pub(super) fn relay_lag(&mut self, summary: &[NamespaceSummary]) {
        let Some(peer) = self.peer else { return };
        if !self.relays_by_tree() {
            return;
        }
        // Nothing can come of it unless this peer is pruned for something, or was
        // grafted with a gap to fill (a peer pruned later waits one summary more).
        if !self.inner.relay.lock().unwrap().prunes(peer) && self.grafted.is_empty() {
            self.relay_lacks.clear();
            return;
        }
        let mut lagging: Vec<NodeId> = Vec::new();
        let mut run = Vec::new();
        for s in summary {
            let mine = self.inner.store.namespace_vector(&s.namespace);
            let lacks = s.vector.difference(&mine);
            let still = self
                .relay_lacks
                .get(&s.namespace)
                .map(|before| before.difference(&mine).meet(&lacks));
            if lacks.is_empty() {
                self.relay_lacks.remove(&s.namespace);
            } else {
                self.relay_lacks.insert(s.namespace.clone(), lacks);
            }
            let Some(still) = still.filter(|v| !v.is_empty()) else {
                continue;
            };
            // An origin this node has a link to sends all its events by it (a node
            // never stops sending its own): lacking them is only waiting.
            let origins: Vec<NodeId> = {
                let registry = self.inner.registry.lock().unwrap();
                still
                    .iter()
                    .map(|(o, _)| o)
                    .filter(|o| !registry.established.contains_key(o))
                    .collect()
            };
            if origins.is_empty() {
                continue;
            }
            let mut skipped = false;
            {
                let mut tree = self.inner.relay.lock().unwrap();
                for origin in tree.lagging(peer, &origins) {
                    self.grafted.insert(origin);
                    lagging.push(origin);
                }
            }
            for origin in &origins {
                skipped |= self.grafted.contains(origin);
            }
            if skipped {
                run.push(s.namespace.clone());
            }
        }
        // Origins no dot of which is lacked any more: their gaps are filled.
        let lacked: std::collections::HashSet<NodeId> = self
            .relay_lacks
            .values()
            .flat_map(|v| v.iter().map(|(o, _)| o))
            .collect();
        self.grafted.retain(|o| lacked.contains(o));
        if !lagging.is_empty() {
            lagging.sort_unstable();
            lagging.dedup();
            tracing::debug!(peer = %peer, origins = ?lagging, "relay tree: grafted (the peer holds what this node lacks)");
            self.count_relay(false, 1);
            self.session.send_graft(lagging, Instant::now());
        }
        for namespace in run {
            if self.reconciler.request_run(namespace.clone()) {
                tracing::debug!(peer = %peer, namespace = %namespace, "relay tree: reconciling what a pruned stream skipped");
            }
        }
    }
}
