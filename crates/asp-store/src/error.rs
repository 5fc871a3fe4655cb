//! One error type per operation. Each message says what went wrong and, where the user
//! can do something about it, what to do.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use asp_core::{Dot, Key, NodeId};

/// Why [`crate::Store::open`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "data directory {dir} is in use by another asp process (its LOCK file is held); \
         stop that process or choose another --data-dir"
    )]
    Locked { dir: PathBuf },
    #[error(
        "data directory {dir} was written in format {found}, but this asp reads formats up \
         to {supported}; run a newer asp"
    )]
    UnsupportedFormat {
        dir: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "data directory {dir} belongs to node {stored}, not {requested}; drop --node-id or \
         point --data-dir at another directory"
    )]
    NodeIdMismatch {
        dir: PathBuf,
        stored: NodeId,
        requested: NodeId,
    },
    #[error("{path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("invalid store configuration: {0}")]
    Config(String),
    #[error("key index: {0}")]
    Index(#[from] fjall::Error),
}

/// Why a write was not applied. Nothing of a failed batch is applied.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    #[error("{0}")]
    Invalid(String),
    /// A limit was exceeded: value size, operations per batch, bytes per batch.
    #[error("{0}")]
    TooLarge(String),
    #[error("condition failed for operation {index} (key \"{key}\"): {reason}")]
    ConditionFailed {
        index: usize,
        key: Key,
        reason: String,
        /// The key's current version (`None` if absent or deleted).
        current: Option<Dot>,
    },
    /// Events from a peer carry a clock reading too far ahead of this node's, and
    /// there is no room left to hold them until it catches up (`held_bytes_max`).
    #[error("{0}")]
    ClockSkew(String),
    /// An event from a peer breaks a rule every event must keep (see
    /// [`crate::Store::enqueue_remote`]); nothing of its batch is applied. `reason`
    /// names the rule (`value_size`, `record_size`, `context`, `crdt_state`, `dot`),
    /// for counting; the message names the event and the limit.
    #[error("{message}")]
    InvalidEvent {
        reason: &'static str,
        message: String,
    },
    /// A namespace's conflict policy cannot change: it holds data under another one
    /// (or a peer sent events of another policy).
    #[error("{0}")]
    PolicyFixed(String),
    /// An operation that the namespace's conflict policy does not have (an increment
    /// on a set, a plain put on a counter).
    #[error("{0}")]
    WrongPolicy(String),
    /// A siblings write whose context names versions this node does not hold (it was
    /// read from another node and they have not arrived yet).
    #[error("{0}")]
    ContextAhead(String),
    #[error("the writer queue stayed full for {} ms; retry later", waited.as_millis())]
    Overloaded { waited: Duration },
    #[error("the store is shutting down")]
    Closed,
    #[error("storage failure, the store accepts no more writes: {0}")]
    Storage(String),
    /// The data directory's filesystem is full (or below `min_free_bytes`): nothing of
    /// the request was applied, and writes succeed again once space is freed.
    #[error("{0}")]
    NoSpace(String),
    /// A local write to a leader namespace on a node that does not lead its current
    /// epoch (`fenced`: this node led an earlier one). Nothing was applied.
    #[error("{message}")]
    NotLeader {
        fenced: bool,
        epoch: u64,
        leader: asp_core::NodeId,
        leader_api: Option<String>,
        message: String,
    },
    /// A write's `If-Fence` token is not the newest of its lease. Nothing was applied.
    #[error("{message}")]
    StaleFence {
        newest: Option<u64>,
        message: String,
    },
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("key index: {0}")]
    Index(#[from] fjall::Error),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Invalid(String),
    /// The store stopped after a storage failure.
    #[error("storage failure: {0}")]
    Failed(String),
}
