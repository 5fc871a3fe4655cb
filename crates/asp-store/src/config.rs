//! Store settings, with the defaults a node runs on when nothing is configured.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use asp_core::reconcile::ItemKey;
use asp_core::{Namespace, NodeId};

/// When the writer makes the feed durable with `fdatasync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncMode {
    /// Acknowledge a write only after the log holding it is fsynced (the default).
    Always,
    /// Acknowledge once written to the OS; fsync every `ms` milliseconds. A machine
    /// crash loses at most the last interval of acknowledged writes.
    Interval { ms: u64 },
    /// Never fsync on the write path (only when a segment is sealed and on shutdown).
    /// A process crash loses nothing; a machine crash can lose acknowledged writes.
    Never,
}

/// The longest fsync interval accepted, in milliseconds.
pub const FSYNC_INTERVAL_MS_MAX: u64 = 60_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "fsync mode must be \"always\", \"never\" or \"interval:<ms>\" with 1 <= ms <= {FSYNC_INTERVAL_MS_MAX}; got {0:?}"
)]
pub struct FsyncModeError(pub String);

impl FromStr for FsyncMode {
    type Err = FsyncModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(FsyncMode::Always),
            "never" => Ok(FsyncMode::Never),
            _ => {
                let ms = s
                    .strip_prefix("interval:")
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .filter(|ms| (1..=FSYNC_INTERVAL_MS_MAX).contains(ms))
                    .ok_or_else(|| FsyncModeError(s.to_owned()))?;
                Ok(FsyncMode::Interval { ms })
            }
        }
    }
}

impl fmt::Display for FsyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncMode::Always => f.write_str("always"),
            FsyncMode::Interval { ms } => write!(f, "interval:{ms}"),
            FsyncMode::Never => f.write_str("never"),
        }
    }
}

/// Everything [`crate::Store::open`] needs. Every queue and buffer has its bound here.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Holds the manifest, the feed log and the key index. Created if missing.
    pub data_dir: PathBuf,
    /// The node id for a new data directory (random if `None`). For an existing one it
    /// must match the stored id or be `None`.
    pub node_id: Option<NodeId>,
    pub fsync: FsyncMode,
    /// A log segment is sealed and a new one started once it reaches this size.
    pub segment_bytes_max: u64,
    /// Write requests waiting for the writer, at most.
    pub write_queue_max: usize,
    /// Bytes of values and keys in requests waiting for or inside the writer, at most.
    pub write_queue_bytes_max: usize,
    /// How long a write waits for room in the queue before failing with
    /// [`crate::WriteError::Overloaded`].
    pub write_queue_wait: Duration,
    /// Events the writer puts into one log write, at most.
    pub group_events_max: usize,
    /// Bytes the writer puts into one log write, at most (a larger single request still
    /// goes through alone).
    pub group_bytes_max: usize,
    /// The largest value accepted, in bytes.
    pub value_bytes_max: usize,
    /// Operations in one atomic batch, at most.
    pub batch_ops_max: usize,
    /// Events from peers whose clock reading is further ahead of this node's wall
    /// clock than this are parked (held, not applied) until the wall clock catches up.
    pub max_clock_skew_ms: u64,
    /// Bytes of events received from peers and held (parked or quarantined, in
    /// `held.log` and in memory), at most; past it, a batch that needs holding is
    /// refused as a whole. Default 64 MiB.
    pub held_bytes_max: u64,
    /// The key index's block cache.
    pub index_cache_bytes: u64,
    /// The key index's in-memory write buffer, per keyspace.
    pub index_memtable_bytes: u64,
    /// The key of the hash that turns (key, version) into reconciliation items. Every
    /// node of a cluster must use the same; keep it secret from clients, so that they
    /// cannot choose keys whose items collide.
    pub item_key: ItemKey,
    /// The key of the keyed hash that authenticates context tokens (siblings reads):
    /// the same on every node of a cluster, and separate from `item_key` (one purpose
    /// per key).
    pub context_key: ItemKey,
    /// Reconciliation symbols kept up to date per namespace, at most (each 48 bytes in
    /// memory; a namespace keeps about a quarter as many as it has keys, at least 64).
    /// Differences up to about 70% of its window reconcile without a scan. 0 keeps
    /// none (anti-entropy then scans): keeping them costs about 19% of batch ingest
    /// and, at 10 M keys, ~25 MB more peak memory (bench/RESULTS.md).
    pub reconcile_window: usize,
    /// Memory for indexes from key hashes to keys, over all namespaces. A large
    /// namespace's first anti-entropy run builds one during the pass over its keys it
    /// makes anyway; later runs find the keys behind their decoded items in it instead
    /// of passing over the namespace again (at 1 M keys and d = 1,000, ~0.8 s → ~15
    /// ms). About 50 bytes per key (bench/RESULTS.md); past the budget the namespace
    /// used least recently loses its index. 0 keeps none. Needs windows
    /// (`reconcile_window > 0`).
    pub reconcile_key_index_bytes: usize,
    /// Conflict policies of namespaces (the others are `lww`), applied on open; a
    /// namespace that holds data under another policy refuses to open.
    pub namespace_policies: BTreeMap<String, asp_core::crdt::Policy>,
    /// Compaction ([`crate::Store::compact`]) drops a superseded event only once it is
    /// at least this old (its clock reading against this node's wall clock), so that
    /// change-feed consumers and peers that are behind by less than this still see
    /// every version. Default 7 days.
    pub compaction_retention_ms: u64,
    /// Per-namespace overrides of `compaction_retention_ms` (namespace name → ms).
    pub compaction_namespace_retention_ms: BTreeMap<String, u64>,
    /// When above 0, compaction leaves alone every segment that holds any of the newest
    /// this many bytes of log. 0 (the default) turns the rule off.
    pub compaction_retention_bytes: u64,
    /// A sealed segment is compacted only if at least this fraction of its records are
    /// superseded (or stale copies): below it, copying the live records forward would
    /// rewrite most of the log again and again for little space. Between 0 (exclusive)
    /// and 1; default 0.5.
    pub compaction_dead_ratio: f64,
    /// A delete (tombstone) of an `lww` namespace is collected by compaction only once
    /// it is at least this old and every known node holds it (see
    /// docs/CONFLICTS.md); until then it is kept so that no late event can bring the
    /// key back. `None` never collects tombstones. Default 1 day.
    pub tombstone_ttl_ms: Option<u64>,
    /// A node not heard of (directly or through gossip) for this long stops holding
    /// tombstone collection back: tombstones are then collected from the log, and an
    /// *epitaph* (the key and the delete's version, in the key index) is kept until the
    /// node is back and holds the delete. Default 7 days.
    pub gc_horizon_ms: u64,
    /// After opening a data directory whose node has had peers, local writes wait up
    /// to this long (from the open) for a peer's summary ([`crate::Store::note_reports`]),
    /// so that the node learns which of its own events peers hold before it issues
    /// counters again: a directory restored from an older copy would otherwise reuse
    /// counters of events its peers already hold. Zero (the library's default) never
    /// waits; `asp serve` waits 10 s by default.
    pub own_events_wait: Duration,
    /// The filesystem of the store's own files (the log, `base.vv`, `policies`,
    /// `asp.json`); the real one unless a test puts a fault-injecting one here. The
    /// key index and the `LOCK` file are always on the real filesystem.
    pub fs: Arc<dyn crate::fs::Fs>,
    /// Writes are refused with [`crate::WriteError::NoSpace`] (HTTP 507) while the
    /// filesystem of the data directory has less than this many bytes free, so that
    /// the key index, which cannot take a write back, never meets a full disk first.
    /// 0 turns the guard off. Default 64 MiB.
    pub min_free_bytes: u64,
    /// Open a damaged log anyway: damaged segments are moved to `damaged/`, every
    /// intact record is kept, and the positions lost are recorded (see
    /// docs/ARCHITECTURE.md, *Corruption and salvage*). Without it a damaged log
    /// refuses to open.
    pub salvage: bool,
    /// [`crate::Store::scrub`] reads at most this many bytes per second. Default
    /// 64 MiB/s.
    pub scrub_bytes_per_s: u64,
    /// Test only (feature `mutations`): a deliberate bug this store runs with.
    #[cfg(feature = "mutations")]
    pub mutation: Option<crate::mutation::Mutation>,
}

impl StoreConfig {
    pub const DEFAULT_SEGMENT_BYTES_MAX: u64 = 128 << 20;
    pub const DEFAULT_VALUE_BYTES_MAX: usize = 1 << 20;
    pub const DEFAULT_BATCH_OPS_MAX: usize = 10_000;
    pub const DEFAULT_HELD_BYTES_MAX: u64 = 64 << 20;
    /// A `reconcile_window` for turning windows on: namespaces of up to 64 k keys keep
    /// a quarter of their keys' worth, larger ones 16,384 symbols (768 KiB).
    pub const RECONCILE_WINDOW_ON: usize = 1 << 14;
    pub const DEFAULT_RECONCILE_KEY_INDEX_BYTES: usize = 128 << 20;
    pub const DEFAULT_COMPACTION_RETENTION_MS: u64 = 7 * 24 * 60 * 60 * 1000;
    pub const DEFAULT_COMPACTION_DEAD_RATIO: f64 = 0.5;
    pub const DEFAULT_TOMBSTONE_TTL_MS: u64 = 24 * 60 * 60 * 1000;
    pub const DEFAULT_GC_HORIZON_MS: u64 = 7 * 24 * 60 * 60 * 1000;
    pub const DEFAULT_MIN_FREE_BYTES: u64 = 64 << 20;
    pub const DEFAULT_SCRUB_BYTES_PER_S: u64 = 64 << 20;

    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            node_id: None,
            fsync: FsyncMode::Always,
            segment_bytes_max: Self::DEFAULT_SEGMENT_BYTES_MAX,
            write_queue_max: 4096,
            write_queue_bytes_max: 256 << 20,
            write_queue_wait: Duration::from_secs(5),
            group_events_max: 16_384,
            group_bytes_max: 32 << 20,
            value_bytes_max: Self::DEFAULT_VALUE_BYTES_MAX,
            batch_ops_max: Self::DEFAULT_BATCH_OPS_MAX,
            max_clock_skew_ms: 60_000,
            held_bytes_max: Self::DEFAULT_HELD_BYTES_MAX,
            index_cache_bytes: 32 << 20,
            index_memtable_bytes: 8 << 20,
            item_key: ItemKey::new(*b"asp item key v1!"),
            context_key: ItemKey::new(*b"asp context key!"),
            reconcile_window: Self::RECONCILE_WINDOW_ON,
            reconcile_key_index_bytes: Self::DEFAULT_RECONCILE_KEY_INDEX_BYTES,
            compaction_retention_ms: Self::DEFAULT_COMPACTION_RETENTION_MS,
            compaction_namespace_retention_ms: BTreeMap::new(),
            namespace_policies: BTreeMap::new(),
            compaction_retention_bytes: 0,
            compaction_dead_ratio: Self::DEFAULT_COMPACTION_DEAD_RATIO,
            tombstone_ttl_ms: Some(Self::DEFAULT_TOMBSTONE_TTL_MS),
            gc_horizon_ms: Self::DEFAULT_GC_HORIZON_MS,
            own_events_wait: Duration::ZERO,
            fs: crate::fs::RealFs::shared(),
            min_free_bytes: Self::DEFAULT_MIN_FREE_BYTES,
            salvage: false,
            scrub_bytes_per_s: Self::DEFAULT_SCRUB_BYTES_PER_S,
            #[cfg(feature = "mutations")]
            mutation: None,
        }
    }

    /// How long superseded events of `namespace` are kept before compaction may drop
    /// them.
    pub fn compaction_retention_ms_of(&self, namespace: &str) -> u64 {
        self.compaction_namespace_retention_ms
            .get(namespace)
            .copied()
            .unwrap_or(self.compaction_retention_ms)
    }

    /// Checks the settings against each other; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        let min_segment = 1 << 20;
        if self.segment_bytes_max < min_segment || self.segment_bytes_max > u32::MAX as u64 {
            return Err(format!(
                "segment_bytes_max must be between {min_segment} and {}; got {}",
                u32::MAX,
                self.segment_bytes_max
            ));
        }
        if self.value_bytes_max == 0 || self.value_bytes_max > crate::codec::VALUE_BYTES_LIMIT {
            return Err(format!(
                "value_bytes_max must be between 1 and {}; got {}",
                crate::codec::VALUE_BYTES_LIMIT,
                self.value_bytes_max
            ));
        }
        if self.write_queue_max == 0 || self.group_events_max == 0 || self.batch_ops_max == 0 {
            return Err(
                "write_queue_max, group_events_max and batch_ops_max must be at least 1".into(),
            );
        }
        if self.write_queue_bytes_max < self.value_bytes_max + 2048 {
            return Err(format!(
                "write_queue_bytes_max ({}) must exceed value_bytes_max ({}) so that one write fits",
                self.write_queue_bytes_max, self.value_bytes_max
            ));
        }
        if self.index_memtable_bytes < 1 << 20 {
            return Err("index_memtable_bytes must be at least 1 MiB".into());
        }
        if self.reconcile_window > 1 << 20 {
            return Err(format!(
                "reconcile_window must be between 0 (off) and {}; got {}",
                1 << 20,
                self.reconcile_window
            ));
        }
        if self.reconcile_key_index_bytes > 1 << 40 {
            return Err(format!(
                "reconcile_key_index_bytes must be at most 1 TiB; got {}",
                self.reconcile_key_index_bytes
            ));
        }
        // Written so that NaN fails too.
        if !(self.compaction_dead_ratio > 0.0 && self.compaction_dead_ratio <= 1.0) {
            return Err(format!(
                "compaction_dead_ratio must be above 0 and at most 1; got {}",
                self.compaction_dead_ratio
            ));
        }
        if self.scrub_bytes_per_s == 0 {
            return Err("scrub_bytes_per_s must be at least 1".into());
        }
        if self.gc_horizon_ms == 0 {
            return Err("gc_horizon_ms must be at least 1".into());
        }
        for name in self.compaction_namespace_retention_ms.keys() {
            if let Err(e) = Namespace::new(name) {
                return Err(format!(
                    "compaction_namespace_retention_ms names {name:?}, which is not a valid namespace: {e}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_modes_parse_and_print() {
        for (text, mode) in [
            ("always", FsyncMode::Always),
            ("never", FsyncMode::Never),
            ("interval:25", FsyncMode::Interval { ms: 25 }),
        ] {
            assert_eq!(text.parse::<FsyncMode>().unwrap(), mode);
            assert_eq!(mode.to_string(), text);
        }
        for bad in [
            "",
            "Always",
            "interval",
            "interval:",
            "interval:0",
            "interval:-1",
            "interval:60001",
            "sometimes",
        ] {
            assert!(bad.parse::<FsyncMode>().is_err(), "{bad:?}");
        }
    }
}
