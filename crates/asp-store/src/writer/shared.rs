//! The state the store handle, the writer threads and readers share, and the reads
//! of it that every part needs (an index entry's event or value, a CRDT key's
//! entries, waiting for the index).

use super::*;

/// State shared by the store handle, the writer threads and readers, grouped by who
/// writes it: each group's doc names its writers, and everyone else only reads it.
/// The locks are the fields' own; grouping them changes no locking.
pub(crate) struct Shared {
    // Fixed at open, or synchronised inside: everyone's.
    pub node_id: NodeId,
    pub config: StoreConfig,
    pub log: Log,
    pub index: Index,
    pub metrics: Metrics,
    /// The feed head readers and subscribers see (see [`Shared::publish`]): moved by
    /// the log writer and, under `fsync = "interval:<ms>"`, the syncer.
    pub head_tx: watch::Sender<FeedHead>,
    /// The pipeline's marks: the log writer, the indexer and the syncer each advance
    /// their own under this one mutex; `progress_changed` tells when.
    pub progress: Mutex<Progress>,
    pub progress_changed: Condvar,
    pub writer: ByWriter,
    pub indexer: ByIndexer,
    pub window_keeper: ByWindowKeeper,
    pub peers: FromPeers,
    pub maintenance: Maintenance,
    pub health: Health,
    /// Who may accept local writes to which namespace (see [`crate::modes`]).
    pub gate: RwLock<Option<crate::modes::SharedGate>>,
}

/// What the log writer thread changes; readers and status pages read it.
pub(crate) struct ByWriter {
    /// Each namespace's conflict policy.
    pub policies: RwLock<Policies>,
    /// Which counters this node may still issue (durable marks, see
    /// [`crate::counters`]). The replication face also claims counters here when a
    /// peer's summary shows own events this node had no record of.
    pub counters: Mutex<crate::counters::Counters>,
    /// Events received from peers and held, not applied (see [`crate::held`]).
    pub held: Mutex<Held>,
    /// Mirror of `progress.acked.seq`, so that a read can see without locking what it
    /// must wait for.
    pub acked_seq: AtomicU64,
}

/// What the indexer publishes as it applies acknowledged groups to the key index.
pub(crate) struct ByIndexer {
    /// Each namespace's vector and newest clock reading, as of the indexed head.
    pub namespaces: RwLock<HashMap<Namespace, NamespaceState>>,
    /// Mirror of `progress.indexed.seq`, so that a read can see without locking that
    /// the index is up to date.
    pub indexed_seq: AtomicU64,
    /// Groups the indexer applied, namespace states included (see
    /// [`Writer::roll_back`]).
    pub index_msgs_applied: AtomicU64,
    /// Messages the indexer sent the window keeper (see [`Windows::messages`]).
    pub window_messages: AtomicU64,
    /// The indexed sequence number for async waiters (bumped on failure too, by
    /// whoever fails the store, so that they wake and see it).
    pub indexed_tx: watch::Sender<u64>,
}

/// What the window keeper keeps, a little behind the indexer.
pub(crate) struct ByWindowKeeper {
    /// Each namespace's reconciliation symbols over its keys' current versions and
    /// filter of keys held; `windows_changed` tells when they move.
    pub windows: Mutex<Windows>,
    pub windows_changed: Condvar,
}

/// What peers' word changes: the replication face writes it as summaries and
/// contacts arrive (compaction also notes this node's own vectors in `gc`).
pub(crate) struct FromPeers {
    /// What is known of other nodes' vectors: when tombstones may be collected.
    pub gc: Mutex<asp_core::gc::Gc>,
    /// When peers turned out to hold events of this node it had no record of issuing
    /// (newest last, at most `OWN_EVENTS_FOUND_MAX` of `store/replication.rs`).
    pub own_events_found: Mutex<Vec<crate::store::OwnEventsFound>>,
    /// Whether local writes may take counters: after an open with
    /// `own_events_wait` set and peers known, not until a peer's summary said what it
    /// holds of this node's own events (or the wait ran out).
    pub own_events_learned: watch::Sender<bool>,
}

/// What maintenance runs (compaction and scrub) hold and change.
pub(crate) struct Maintenance {
    /// What the node holds beyond its log (`base.vv`); its lock is held while the file
    /// is replaced, so the file only ever grows. Compaction grows it when it drops
    /// segments, and the log writer when a peer covers dots.
    pub bases: Mutex<Bases>,
    /// Held by a compaction run: one at a time.
    pub compaction: Mutex<()>,
    /// Readers that look a position up in the key index and then read it from the log
    /// hold this for reading, so that compaction, which takes it for writing to drop a
    /// segment, never drops one between the lookup and the read.
    pub segment_gate: RwLock<()>,
    /// Held by a scrub run: one at a time.
    pub scrub_running: Mutex<()>,
    /// The last scrub's report.
    pub last_scrub: Mutex<Option<crate::scrub::ScrubReport>>,
    /// Compaction and scrub runs in progress, for status.
    pub operations: crate::operations::Operations,
}

/// Whether the store can take writes: set by whichever part meets the problem.
pub(crate) struct Health {
    /// Set on the first storage failure (see [`Shared::fail`]); the store then refuses
    /// writes.
    pub failure: OnceLock<String>,
    /// Set while writes are refused for space (see [`Shared::no_space`]).
    pub space_problem: Mutex<Option<String>>,
}

impl Shared {
    /// Whether this store runs with the deliberate bug `m` (feature `mutations`, set
    /// by a test); a constant `false` without the feature.
    #[inline]
    pub fn mutated(&self, m: crate::mutation::Mutation) -> bool {
        #[cfg(feature = "mutations")]
        {
            self.config.mutation == Some(m)
        }
        #[cfg(not(feature = "mutations"))]
        {
            let _ = m;
            false
        }
    }

    pub fn fail(&self, what: String) -> WriteError {
        tracing::error!(error = %what, "storage failure; refusing further writes");
        let _ = self.health.failure.set(what);
        self.progress_changed.notify_all();
        self.indexer.indexed_tx.send_modify(|_| {});
        WriteError::Storage(self.health.failure.get().cloned().unwrap_or_default())
    }

    /// Notes that writes are refused for space (what `/healthz` and status say until
    /// space is back) and returns the error for the refused requests.
    pub fn no_space(&self, what: String) -> WriteError {
        let config = &self.config;
        let free = config
            .fs
            .free_bytes(&config.data_dir)
            .map_or_else(|e| format!("unknown ({e})"), |b| format!("{b} bytes"));
        let message = format!(
            "no space for writes: {what}; free space on the filesystem of {}: {free}. Free some space (or run compaction); writes resume by themselves",
            config.data_dir.display()
        );
        tracing::warn!(error = %message, "write refused for space");
        self.metrics.writes_no_space.inc();
        *self.health.space_problem.lock().unwrap() = Some(message.clone());
        WriteError::NoSpace(message)
    }

    /// An I/O error on the store's own files before anything of the group took
    /// effect: a full disk refuses the group's writes (they may be retried once there
    /// is room), anything else fails the store.
    pub fn io_failure(&self, what: String, e: &std::io::Error) -> WriteError {
        if is_no_space(e) {
            self.no_space(what)
        } else {
            self.fail(what)
        }
    }

    /// A group was appended: whatever kept writes out for space is over.
    pub(super) fn space_regained(&self) {
        let mut problem = self.health.space_problem.lock().unwrap();
        if problem.take().is_some() {
            tracing::info!("writes resumed: there is space again");
        }
    }

    /// Why writes are refused for space, if they are: cleared by the next append, or
    /// as soon as the filesystem has room again (so that a node nobody writes to
    /// does not stay unhealthy).
    pub fn space_problem(&self) -> Option<String> {
        let mut problem = self.health.space_problem.lock().unwrap();
        problem.as_ref()?;
        let config = &self.config;
        let room = config.min_free_bytes.max(SPACE_REGAINED_BYTES);
        if config
            .fs
            .free_bytes(&config.data_dir)
            .is_ok_and(|free| free >= room)
        {
            *problem = None;
        }
        problem.clone()
    }

    pub(super) fn failed(&self) -> Option<WriteError> {
        self.health
            .failure
            .get()
            .map(|f| WriteError::Storage(f.clone()))
    }

    /// The event that set `index_key`'s entry: read from the log where the entry points
    /// (checked against its dot), or, for an epitaph, made again from the entry: a
    /// delete of the key with the entry's dot and clock. The caller holds the segment
    /// gate.
    pub fn entry_event(&self, index_key: &[u8], entry: &IndexEntry) -> Result<Event, ReadError> {
        if !entry.is_epitaph() {
            return self.event_at(entry);
        }
        let bad = |what: String| ReadError::Corrupt(format!("epitaph: {what}"));
        let (namespace, key) =
            codec::split_index_key(index_key).ok_or_else(|| bad("a malformed index key".into()))?;
        let key = std::str::from_utf8(key).map_err(|e| bad(e.to_string()))?;
        Ok(Event {
            namespace: Namespace::new(namespace).map_err(|e| bad(e.to_string()))?,
            key: asp_core::Key::new(key).map_err(|e| bad(e.to_string()))?,
            op: asp_core::Op::Delete,
            dot: entry.dot,
            hlc: entry.hlc,
            context: bytes::Bytes::new(),
            epoch: 0,
            expires_ms: 0,
        })
    }

    /// The event an index entry points at, checked against the entry's dot. The
    /// caller holds the segment gate.
    pub fn event_at(&self, entry: &IndexEntry) -> Result<Event, ReadError> {
        let record = self.log.read_at(entry.position)?;
        if record.event.dot != entry.dot {
            return Err(ReadError::Corrupt(format!(
                "the index points at event {} but the log holds {} there",
                entry.dot, record.event.dot
            )));
        }
        Ok(record.event)
    }

    /// The events behind index entries (`(index key, entry)`), in their order: like
    /// [`Shared::entry_event`] for each, with the log reads of all of them together
    /// ([`crate::log::Log::read_many_at`]). The caller holds the segment gate.
    pub fn entry_events(&self, entries: &[(Vec<u8>, IndexEntry)]) -> Result<Vec<Event>, ReadError> {
        let positions: Vec<codec::LogPosition> = entries
            .iter()
            .filter(|(_, e)| !e.is_epitaph())
            .map(|(_, e)| e.position)
            .collect();
        let mut records = self.log.read_many_at(&positions)?.into_iter();
        let mut out = Vec::with_capacity(entries.len());
        for (index_key, entry) in entries {
            if entry.is_epitaph() {
                out.push(self.entry_event(index_key, entry)?);
                continue;
            }
            let record = records.next().expect("a record per position");
            if record.event.dot != entry.dot {
                return Err(ReadError::Corrupt(format!(
                    "the index points at event {} but the log holds {} there",
                    entry.dot, record.event.dot
                )));
            }
            out.push(record.event);
        }
        Ok(out)
    }

    /// The value of a live index entry: inline, or read from the log. The caller holds
    /// the segment gate.
    pub fn value_of(&self, entry: &IndexEntry) -> Result<bytes::Bytes, ReadError> {
        if let Some(inline) = &entry.inline {
            return Ok(inline.clone());
        }
        match self.event_at(entry)?.op {
            asp_core::Op::Put { value, .. } => Ok(value),
            asp_core::Op::Delete => Err(ReadError::Corrupt(
                "the index points at a delete for a live key".into(),
            )),
        }
    }

    /// Joins every origin's entry of the CRDT key `key` into `state`; returns whether
    /// there was any. The caller holds the segment gate.
    pub fn join_crdt_entries(
        &self,
        namespace: &str,
        key: &str,
        state: &mut State,
    ) -> Result<bool, ReadError> {
        let prefix = codec::crdt_key_prefix(namespace, key);
        let mut entries = Vec::new();
        self.index.scan(&prefix, None, |_, entry| {
            entries.push(entry);
            true
        })?;
        for entry in &entries {
            State::decode(&self.value_of(entry)?)
                .and_then(|s| state.join(&s))
                .map_err(|e| {
                    ReadError::Corrupt(format!(
                        "the stored state of key {key:?} in namespace {namespace} is damaged: {e}"
                    ))
                })?;
        }
        Ok(!entries.is_empty())
    }

    /// Waits until the index reflects every write acknowledged before the call: what
    /// makes reads read-your-writes.
    pub fn await_index(&self) -> Result<(), String> {
        let target = self.writer.acked_seq.load(Ordering::Acquire);
        if self.indexer.indexed_seq.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let mut progress = self.progress.lock().unwrap();
        while progress.indexed.seq < target {
            if let Some(f) = self.health.failure.get() {
                return Err(f.clone());
            }
            progress = self.progress_changed.wait(progress).unwrap();
        }
        Ok(())
    }

    /// Like [`Shared::await_index`], without blocking a thread.
    pub async fn await_index_async(&self) -> Result<(), String> {
        let target = self.writer.acked_seq.load(Ordering::Acquire);
        if self.indexer.indexed_seq.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let mut rx = self.indexer.indexed_tx.subscribe();
        let _ = rx
            .wait_for(|&seq| seq >= target || self.health.failure.get().is_some())
            .await;
        match self.health.failure.get() {
            Some(f) => Err(f.clone()),
            None => Ok(()),
        }
    }

    /// Publishes the feed head: what is acknowledged and, unless fsync is off, durable.
    pub(super) fn publish(&self, progress: &Progress) {
        let visible = match self.config.fsync {
            FsyncMode::Interval { .. } if progress.synced.seq < progress.acked.seq => {
                progress.synced
            }
            _ => progress.acked,
        };
        self.head_tx.send_if_modified(|head| {
            if head.seq < visible.seq {
                *head = visible;
                true
            } else {
                false
            }
        });
        self.metrics.feed_head.set(visible.seq as i64);
    }
}
