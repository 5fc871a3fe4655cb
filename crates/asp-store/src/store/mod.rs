//! The store handle, [`Store`]: what every caller of the store holds. Its methods are
//! split by the callers they serve, one file each:
//!
//! - [`client`]: the HTTP API's reads and writes of keys, CRDT state and the change
//!   feed (the peer links read the feed through the same [`FeedReader`]);
//! - [`replication`]: the peer links: events from peers, summaries and vector
//!   reports, reconciliation windows and items, checkpoints;
//! - [`admin`]: operators and status pages: conflict policies, held and quarantined
//!   events, status and metrics (compaction and scrub live in [`crate::compact`] and
//!   [`crate::scrub`]);
//! - [`expiry`]: keys whose time to live ran out, for the sweeper;
//! - [`open`]: opening the store, with recovery.
//!
//! This file holds the handle itself and what every face shares: who the store is,
//! waiting for the index, and stopping.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use asp_core::NodeId;
use tokio::sync::{Semaphore, oneshot};

use crate::config::StoreConfig;
use crate::error::{ReadError, WriteError};
use crate::log::TornTail;
use crate::manifest::Manifest;
use crate::queue::WriteQueue;
use crate::salvage;
use crate::types::Applied;
use crate::writer::{Request, Shared};

mod admin;
mod client;
mod expiry;
mod open;
mod replication;

pub use admin::StoreStatus;
pub use client::{CHANGES_LIMIT_MAX, FeedReader, SCAN_LIMIT_MAX, TTL_MS_MAX};
pub use expiry::{Expired, ExpiredPage};
pub use replication::OwnEventsFound;

/// An open store. Cheap to clone; all clones share one writer. When the last clone is
/// dropped the writer finishes what it accepted, fsyncs, and stops.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) shared: Arc<Shared>,
    pub(crate) queue: Arc<WriteQueue<Request>>,
    budget: Arc<Semaphore>,
    writer: Mutex<Option<JoinHandle<()>>>,
    recovery: RecoveryReport,
    /// When the store opened (bounds the wait for peers' word on own events).
    opened: Instant,
    _manifest: Manifest,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue stops the writer once it has made everything accepted
        // durable; wait for that so that the directory is free when drop returns.
        self.queue.close();
        if let Some(handle) = self.writer.lock().unwrap().take() {
            let _ = handle.join();
        }
    }
}

/// What [`Store::open`] had to do to bring the store up to date.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// An incomplete end of the log that was cut off.
    pub torn_tail: Option<TornTail>,
    /// Events replayed from the log into the key index.
    pub replayed_events: u64,
    /// Whether the index had to be rebuilt from scratch.
    pub index_rebuilt: bool,
    /// What `--salvage` did (`None` without it; an empty report if nothing was
    /// damaged).
    pub salvage: Option<salvage::SalvageReport>,
}

impl Store {
    pub fn node_id(&self) -> NodeId {
        self.inner.shared.node_id
    }

    /// Installs who may accept local writes to which namespace (leader namespaces,
    /// see [`crate::LeaderMode`]); every local write asks it, in the writer.
    pub fn set_write_gate(&self, gate: crate::SharedGate) {
        *self.inner.shared.gate.write().unwrap() = Some(gate);
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.shared.config
    }

    pub fn recovery(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    fn closed_or_failed(&self) -> WriteError {
        self.inner
            .shared
            .health
            .failure
            .get()
            .map_or(WriteError::Closed, |f| WriteError::Storage(f.clone()))
    }

    async fn answer(
        &self,
        answer: oneshot::Receiver<Result<Vec<Applied>, WriteError>>,
    ) -> Result<Vec<Applied>, WriteError> {
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(self.closed_or_failed()),
        }
    }

    /// Waits, without blocking a thread, until reads reflect every write acknowledged
    /// before the call. [`Store::get`] and [`Store::scan`] wait for this themselves by
    /// blocking; async callers that must not block call this first.
    pub async fn caught_up(&self) -> Result<(), ReadError> {
        self.inner
            .shared
            .await_index_async()
            .await
            .map_err(ReadError::Failed)
    }

    /// Finishes every accepted write, makes it durable, and stops the writer. Writes
    /// after this fail with [`WriteError::Closed`]. Safe to call more than once.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.queue.send(Request::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let handle = self.inner.writer.lock().unwrap().take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}
