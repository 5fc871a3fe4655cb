//! The store's counters, exported in Prometheus form by whoever registers them.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Updated by the writer threads; cheap to read at any time.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub events_written: Counter,
    pub bytes_written: Counter,
    pub fsyncs: Counter,
    pub fsync_seconds: Histogram,
    pub group_commit_events: Histogram,
    pub group_commit_requests: Histogram,
    pub feed_head: Gauge,
    pub writer_queue_depth: Gauge,
    /// Times the writer waited for room in the indexer's queue, and the seconds it
    /// waited: every write behind it waited as long.
    pub writer_index_waits: Counter,
    pub writer_index_wait_seconds: Counter<f64, AtomicU64>,
    /// Groups the writer held open for writers acknowledged by the last fsync to come
    /// back (fsync = always; at most a millisecond each).
    pub writer_straggler_waits: Counter,
    pub writes_rejected: Counter,
    /// Compaction runs finished ([`crate::Store::compact`]).
    pub compaction_runs: Counter,
    /// Log segments compaction removed.
    pub compaction_segments_removed: Counter,
    /// Records compaction dropped: superseded events, and stale copies of relocated
    /// ones.
    pub compaction_records_dropped: Counter,
    /// Live records compaction copied forward (not counted in `events_written`).
    pub compaction_records_relocated: Counter,
    /// Deletes collected from the log (see docs/CONFLICTS.md).
    pub tombstones_collected: Counter,
    /// Epitaphs left by collected deletes, and dropped once no longer needed.
    pub epitaphs_left: Counter,
    pub epitaphs_dropped: Counter,
    /// Times peers turned out to hold events of this node that it had no record of
    /// issuing (see `counters.rs`).
    pub own_events_found: Counter,
    /// Key-hash indexes built by anti-entropy runs, and runs that found their keys in
    /// one instead of passing over the namespace (see `key_hashes.rs`).
    pub key_index_builds: Counter,
    pub key_index_lookups: Counter,
    /// Events from peers parked: their clock was too far ahead (see `held.rs`).
    pub events_parked: Counter,
    /// Parked events applied once this node's clock allowed.
    pub events_released: Counter,
    /// Events from peers quarantined: their namespace uses another policy here.
    pub events_quarantined: Counter,
    /// Events held (parked or quarantined) now, and the bytes of their records.
    pub held_events: Gauge,
    pub held_bytes: Gauge,
    /// Batches from peers refused whole because holding their events would have
    /// passed `held_bytes_max`.
    pub held_full_refusals: Counter,
    /// Write requests refused because the filesystem was full or below
    /// `min_free_bytes`.
    pub writes_no_space: Counter,
    /// Scrub runs finished ([`crate::Store::scrub`]), bytes they checked, and damaged
    /// places they found.
    pub scrub_runs: Counter,
    pub scrub_bytes: Counter,
    pub scrub_damage: Counter,
    /// Time from an origin's clock reading to this node applying the event, for
    /// events from peers applied for the first time: over all origins for Prometheus,
    /// and per origin over the last minutes for status (see `convergence.rs`).
    pub replication_delay_seconds: Histogram,
    pub convergence: crate::convergence::Convergence,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            events_written: Counter::default(),
            bytes_written: Counter::default(),
            fsyncs: Counter::default(),
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            group_commit_events: Histogram::new(exponential_buckets(1.0, 2.0, 18)),
            group_commit_requests: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            feed_head: Gauge::default(),
            writer_queue_depth: Gauge::default(),
            writer_index_waits: Counter::default(),
            writer_index_wait_seconds: Counter::default(),
            writer_straggler_waits: Counter::default(),
            writes_rejected: Counter::default(),
            compaction_runs: Counter::default(),
            compaction_segments_removed: Counter::default(),
            compaction_records_dropped: Counter::default(),
            compaction_records_relocated: Counter::default(),
            tombstones_collected: Counter::default(),
            epitaphs_left: Counter::default(),
            epitaphs_dropped: Counter::default(),
            own_events_found: Counter::default(),
            key_index_builds: Counter::default(),
            key_index_lookups: Counter::default(),
            events_parked: Counter::default(),
            events_released: Counter::default(),
            events_quarantined: Counter::default(),
            held_events: Gauge::default(),
            held_bytes: Gauge::default(),
            held_full_refusals: Counter::default(),
            writes_no_space: Counter::default(),
            scrub_runs: Counter::default(),
            scrub_bytes: Counter::default(),
            scrub_damage: Counter::default(),
            replication_delay_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 24)),
            convergence: Default::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "asp_replication_delay_seconds",
            "Time from a write's origin clock reading to this node applying it, for events from peers applied for the first time (across two clocks: skew adds to it)",
            self.replication_delay_seconds.clone(),
        );
        registry.register(
            "asp_events_written",
            "Events appended to the feed log (copies relocated by compaction not included)",
            self.events_written.clone(),
        );
        registry.register(
            "asp_log_bytes_written",
            "Bytes appended to the feed log (records relocated by compaction included)",
            self.bytes_written.clone(),
        );
        registry.register(
            "asp_fsyncs",
            "fdatasync calls on the feed log",
            self.fsyncs.clone(),
        );
        registry.register(
            "asp_fsync_seconds",
            "Duration of each fdatasync of the feed log",
            self.fsync_seconds.clone(),
        );
        registry.register(
            "asp_group_commit_events",
            "Events made durable by one group commit",
            self.group_commit_events.clone(),
        );
        registry.register(
            "asp_group_commit_requests",
            "Write requests acknowledged by one group commit",
            self.group_commit_requests.clone(),
        );
        registry.register(
            "asp_feed_head",
            "Sequence number of the last event visible in the feed",
            self.feed_head.clone(),
        );
        registry.register(
            "asp_writer_queue_depth",
            "Write requests waiting for the writer",
            self.writer_queue_depth.clone(),
        );
        registry.register(
            "asp_writer_index_waits",
            "Times the log writer waited for room in the indexer's queue (the key index fell behind; writes behind it waited too)",
            self.writer_index_waits.clone(),
        );
        registry.register(
            "asp_writer_index_wait_seconds",
            "Seconds the log writer spent waiting for room in the indexer's queue",
            self.writer_index_wait_seconds.clone(),
        );
        registry.register(
            "asp_writer_straggler_waits",
            "Groups the log writer held open (at most 1 ms) for writers acknowledged by the last fsync to come back and join them",
            self.writer_straggler_waits.clone(),
        );
        registry.register(
            "asp_writes_rejected",
            "Write requests refused (failed condition, overload, storage failure)",
            self.writes_rejected.clone(),
        );
        registry.register(
            "asp_compaction_runs",
            "Compaction runs finished",
            self.compaction_runs.clone(),
        );
        registry.register(
            "asp_compaction_segments_removed",
            "Feed log segments removed by compaction",
            self.compaction_segments_removed.clone(),
        );
        registry.register(
            "asp_compaction_records_dropped",
            "Feed log records dropped by compaction (superseded events and stale copies)",
            self.compaction_records_dropped.clone(),
        );
        registry.register(
            "asp_compaction_records_relocated",
            "Live feed log records copied forward by compaction",
            self.compaction_records_relocated.clone(),
        );
        registry.register(
            "asp_tombstones_collected",
            "Deletes collected from the feed log once every known node held them",
            self.tombstones_collected.clone(),
        );
        registry.register(
            "asp_epitaphs_left",
            "Collected deletes that left an epitaph because a node was away past the horizon",
            self.epitaphs_left.clone(),
        );
        registry.register(
            "asp_epitaphs_dropped",
            "Epitaphs dropped once every known node held their delete",
            self.epitaphs_dropped.clone(),
        );
        registry.register(
            "asp_own_events_found",
            "Times peers held events of this node it had no record of issuing (a data directory restored from an older copy, a crash under fsync = never/interval, or another process with this node's id)",
            self.own_events_found.clone(),
        );
        registry.register(
            "asp_key_index_builds",
            "Key-hash indexes built by a namespace's first large anti-entropy run (reconcile_key_index_bytes)",
            self.key_index_builds.clone(),
        );
        registry.register(
            "asp_key_index_lookups",
            "Anti-entropy lookups that found the keys behind decoded items in a key-hash index, without a pass over the namespace",
            self.key_index_lookups.clone(),
        );
        registry.register(
            "asp_events_parked",
            "Events from peers held because their clock was more than max_clock_skew_ms ahead",
            self.events_parked.clone(),
        );
        registry.register(
            "asp_events_released",
            "Parked events applied once this node's clock allowed",
            self.events_released.clone(),
        );
        registry.register(
            "asp_events_quarantined",
            "Events from peers held because their namespace uses another conflict policy here",
            self.events_quarantined.clone(),
        );
        registry.register(
            "asp_held_events",
            "Events held now (parked or quarantined), not applied",
            self.held_events.clone(),
        );
        registry.register(
            "asp_held_bytes",
            "Bytes of the records of the events held now (limit: held_bytes_max)",
            self.held_bytes.clone(),
        );
        registry.register(
            "asp_held_full_refusals",
            "Batches from peers refused whole because holding their events would pass held_bytes_max",
            self.held_full_refusals.clone(),
        );
        registry.register(
            "asp_writes_no_space",
            "Write requests refused because the data directory's filesystem was full or below min_free_bytes",
            self.writes_no_space.clone(),
        );
        registry.register(
            "asp_scrub_runs",
            "Scrub runs finished (every log record's checksum checked)",
            self.scrub_runs.clone(),
        );
        registry.register(
            "asp_scrub_bytes",
            "Bytes of feed log checked by scrubs",
            self.scrub_bytes.clone(),
        );
        registry.register(
            "asp_scrub_damage",
            "Damaged places in the feed log found by scrubs (restart with --salvage)",
            self.scrub_damage.clone(),
        );
    }
}
