//! asp's replication runtime: the tokio tasks that carry the sans-IO session of
//! `asp-core` over real TCP connections. A [`Replicator`] listens for peers, dials the
//! configured ones (reconnecting with exponential backoff and jitter), keeps one link
//! per pair of nodes, sends each peer what it lacks from this node's feed — its own
//! writes and everything it relays — and applies what peers send through the store.
//!
//! The session decides what to send and when, the store decides what an event does.
//! This crate moves bytes, keeps score (link states, acknowledgements, lag) for status
//! pages and write concern, and drives reconciliation on a link (`reconcile.rs`): when
//! to start a run (the anti-entropy tick, the handover check on a peer's summary) and
//! its bounded steps, around `asp-core`'s reconciliation structures (`Window`,
//! `Decoder`).
//!
//! It also runs the node's compaction and scrub schedules
//! ([`run_compaction_schedule`], [`run_scrub_schedule`]): the store does either only
//! when asked.

pub mod audit;
mod concern;
mod config;
mod expiry;
pub mod federation;
mod feed_watch;
mod follow;
pub mod leases;
mod link;
pub mod membership;
mod metrics;
pub mod modes;
pub mod placement;
mod registry;
mod replicator;
pub mod residency;
mod schedule;

pub use concern::Replicas;
pub use config::{DEFAULT_PEER_PORT, ReplicationConfig};
pub use expiry::expire;
pub use registry::{Direction, LastReconcile, LinkState, ReconcileStats};
pub use replicator::{
    NamespaceLag, PeerStatus, Refusal, ReplicationStatus, Replicator, StartError,
};
pub use schedule::{DEFAULT_COMPACTION_INTERVAL_MS, run_compaction_schedule, run_scrub_schedule};
