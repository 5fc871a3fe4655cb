//! Replication counters, exported in Prometheus form.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LagLabels {
    pub peer: String,
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusalLabels {
    pub peer: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReconcileLabels {
    pub peer: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Metrics {
    pub reconcile_runs: Family<ReconcileLabels, Counter>,
    pub reconcile_in_sync: Family<PeerLabels, Counter>,
    pub keys_repaired: Family<PeerLabels, Counter>,
    pub reconcile_symbols: Family<PeerLabels, Counter>,
    pub peers_connected: Gauge,
    pub events_sent: Family<PeerLabels, Counter>,
    pub events_received: Family<PeerLabels, Counter>,
    pub link_errors: Family<PeerLabels, Counter>,
    pub relay_prunes: Family<PeerLabels, Counter>,
    pub relay_grafts: Family<PeerLabels, Counter>,
    pub events_not_relayed: Family<PeerLabels, Counter>,
    pub batches_refused: Family<RefusalLabels, Counter>,
    pub lag_events: Family<LagLabels, Gauge>,
    pub lag_ms: Family<LagLabels, Gauge>,
    pub lagging_namespaces: Family<PeerLabels, Gauge>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "asp_peers_connected",
            "Peer links established",
            self.peers_connected.clone(),
        );
        registry.register(
            "asp_replication_events_sent",
            "Events sent to each peer",
            self.events_sent.clone(),
        );
        registry.register(
            "asp_replication_events_received",
            "Events received from each peer (duplicates included)",
            self.events_received.clone(),
        );
        registry.register(
            "asp_peer_link_errors",
            "Peer links that ended with an error",
            self.link_errors.clone(),
        );
        registry.register(
            "asp_relay_prunes",
            "Origins this node asked each peer to stop relaying (relay trees)",
            self.relay_prunes.clone(),
        );
        registry.register(
            "asp_relay_grafts",
            "Graft frames this node sent each peer (relay trees: a path broke or lagged)",
            self.relay_grafts.clone(),
        );
        registry.register(
            "asp_replication_events_not_relayed",
            "Events left out for each peer because it pruned their origin (relay trees)",
            self.events_not_relayed.clone(),
        );
        registry.register(
            "asp_peer_batches_refused",
            "Batches of events from each peer refused whole, by reason: an event broke a rule (value_size, record_size, context, crdt_state, dot) or did not fit in the held store (held_full)",
            self.batches_refused.clone(),
        );
        registry.register(
            "asp_reconcile_runs",
            "Reconciliations with each peer, by outcome",
            self.reconcile_runs.clone(),
        );
        registry.register(
            "asp_reconcile_in_sync",
            "Anti-entropy checks that found a namespace's digest equal to the peer's",
            self.reconcile_in_sync.clone(),
        );
        registry.register(
            "asp_reconcile_keys_repaired",
            "Keys whose state this node took from each peer by reconciliation",
            self.keys_repaired.clone(),
        );
        registry.register(
            "asp_reconcile_symbols",
            "Coded symbols exchanged with each peer (sent and received)",
            self.reconcile_symbols.clone(),
        );
        registry.register(
            "asp_peer_lag_events",
            "Events this node holds that the peer does not, per lagging namespace (the 64 that lag most per peer; a namespace that catches up leaves)",
            self.lag_events.clone(),
        );
        registry.register(
            "asp_peer_lag_ms",
            "How old the oldest event is that the peer lacks, per lagging namespace (the same series as asp_peer_lag_events)",
            self.lag_ms.clone(),
        );
        registry.register(
            "asp_peer_lagging_namespaces",
            "Namespaces in which the peer lacks events this node holds (all of them, not only those with a series)",
            self.lagging_namespaces.clone(),
        );
    }
}
