//! asp's durable store: the feed log, the key index, the group-commit writer and its
//! threads, recovery and salvage, compaction and tombstone collection, held events,
//! counter reservations and the reconciliation windows. Open one with
//! [`Store::open`]; it is the embeddable library form of a node. Every file it writes
//! is specified byte for byte in `docs/STORAGE.md`.
//!
//! The feed is our own segmented append-only log and the source of truth; the key index
//! (fjall) is derived from it, never fsynced on the write path, and brought up to date
//! from the log when the store opens. Compaction ([`Store::compact`]) copies live
//! events forward and deletes whole segments; `base.vv` records, per namespace, the
//! dots the log no longer holds. See `docs/ARCHITECTURE.md` for the invariants.
//!
//! This crate knows no peer protocol bytes (it deals in `asp-core`'s events, summaries
//! and reports) and no JSON request shapes (its one JSON file is its own manifest,
//! `asp.json`).

mod base;
pub mod clock;
mod codec;
mod compact;
mod config;
pub mod convergence;
mod counters;
mod digest;
mod error;
#[doc(hidden)]
pub mod fault;
mod fs;
#[doc(hidden)]
pub mod fuzz;
mod held;
mod index;
mod key_hashes;
mod log;
mod lww;
mod manifest;
mod metrics;
mod modes;
#[doc(hidden)]
pub mod mutation;
mod operations;
mod policy;
mod queue;
mod salvage;
mod scrub;
mod store;
#[doc(hidden)]
pub mod trace;
mod types;
mod validate;
mod writer;

pub use codec::VALUE_BYTES_LIMIT;
pub use compact::{CompactionError, CompactionReport, TombstoneGc};
pub use config::{FSYNC_INTERVAL_MS_MAX, FsyncMode, FsyncModeError, StoreConfig};
pub use error::{OpenError, ReadError, WriteError};
pub use fs::{Fs, FsFile, OpenMode, RealFs};
pub use held::{
    HeldReason, HeldStatus, ParkedStatus, QuarantineAction, QuarantineOutcome, QuarantineStatus,
};
pub use log::{FeedHead, TornTail};
pub use manifest::FORMAT_VERSION;
pub use manifest::node_id_of;
pub use metrics::Metrics;
pub use modes::{Fence, LeaderMode, SharedGate, WriteGate};
pub use operations::Operation;
pub use salvage::{Damage, SalvageReport, SalvagedSegment};
pub use scrub::{ScrubDamage, ScrubReport};
pub use store::{
    CHANGES_LIMIT_MAX, Expired, ExpiredPage, FeedReader, OwnEventsFound, RecoveryReport,
    SCAN_LIMIT_MAX, Store, StoreStatus, TTL_MS_MAX,
};
pub use types::{
    Applied, ApplyOutcome, ChangesPage, Checkpoint, Condition, CrdtOp, FeedEvent, KeyState,
    NamespaceState, NamespaceStats, ScanItem, ScanPage, Value, WriteKind, WriteOp,
};
