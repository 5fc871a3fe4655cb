//! asp's replication runtime: the tokio tasks that carry the sans-IO session of
//! `asp-core` over real TCP connections. A [`Replicator`] listens for peers, dials the
//! configured ones (reconnecting with exponential backoff and jitter), keeps one link
//! per pair of nodes, sends each peer what it lacks from this node's feed — its own
//! writes and everything it relays — and applies what peers send through the store.
//!
//! Nothing here decides what replication means: the session decides what to send and
//! when, the store decides what an event does. This crate moves bytes and keeps score
//! (link states, acknowledgements, lag) for status pages and write concern. It also
//! runs the node's compaction schedule ([`run_compaction_schedule`]): the store compacts
//! only when asked.

mod compaction;
mod config;
mod link;
mod metrics;
mod replicator;

pub use compaction::{DEFAULT_COMPACTION_INTERVAL_MS, run_compaction_schedule};
pub use config::{DEFAULT_PEER_PORT, ReplicationConfig};
pub use replicator::{
    Direction, LastReconcile, LinkState, NamespaceLag, PeerStatus, ReconcileStats, Refusal,
    ReplicationStatus, Replicator, StartError,
};
