//! Opening a store ([`Store::open`]): the manifest, salvage, cutting off a torn log
//! tail, replaying the log into the key index, building the reconciliation windows, and
//! starting the writer. Its caller is whoever embeds a node (`asp serve`, tests,
//! benchmarks).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::Instant;

use asp_core::reconcile::Item;
use asp_core::{HlcClock, Namespace, Op};
use fjall::Slice;
use tokio::sync::{Semaphore, watch};

use crate::base::Bases;
use crate::codec::{INLINE_VALUE_BYTES_MAX, IndexEntry};
use crate::config::{FsyncMode, StoreConfig};
use crate::digest::{Digest, Windows};
use crate::error::OpenError;
use crate::held::Held;
use crate::index::Index;
use crate::log::Log;
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::queue::WriteQueue;
use crate::writer::{
    ByIndexer, ByWindowKeeper, ByWriter, FromPeers, Health, Maintenance, Progress, Shared,
};
use crate::{codec, manifest, salvage, writer};

use super::{Inner, RecoveryReport, Store};

/// Events replayed into the index per batch on open.
const REPLAY_BATCH_EVENTS: usize = 20_000;

impl Store {
    /// Opens the store in `config.data_dir`, creating it if needed: cuts off a torn log
    /// tail, brings the key index up to date from the log, and starts the writer.
    pub fn open(config: StoreConfig) -> Result<Store, OpenError> {
        config.validate().map_err(OpenError::Config)?;
        let fs = config.fs.clone();
        let manifest = manifest::open(fs.as_ref(), &config.data_dir, config.node_id)?;
        let mut bases = Bases::load(fs.as_ref(), &config.data_dir)?;
        let marker = config.data_dir.join("log").join(salvage::MARKER);
        let (salvaged, salvage_done) = if config.salvage {
            salvage::salvage(fs.as_ref(), &config.data_dir, &mut bases)?
        } else if fs.exists(&marker).unwrap_or(false) {
            return Err(OpenError::Corrupt {
                path: marker,
                reason:
                    "a salvage of this log was interrupted; start again with --salvage to finish it"
                        .into(),
            });
        } else {
            Default::default()
        };
        let (log, log_recovery) = Log::open(
            &fs,
            &config.data_dir.join("log"),
            &bases.removed,
            config.fsync == FsyncMode::Always,
        )?;
        let index = Index::open(
            &config.data_dir.join("index"),
            config.index_cache_bytes,
            config.index_memtable_bytes,
        )?;
        let mut report = RecoveryReport {
            torn_tail: log_recovery.torn_tail,
            salvage: config.salvage.then_some(salvaged),
            ..RecoveryReport::default()
        };
        let mut state = index.state()?;
        if salvage_done {
            // The lost dots leave the bases first (a cover may have put them there),
            // read from the old index before it goes.
            if let Some(salvaged) = &report.salvage {
                salvage::forget_lost_dots(
                    fs.as_ref(),
                    &config.data_dir,
                    salvaged,
                    &index,
                    state.applied_seq,
                    &mut bases,
                )?;
            }
            // The index may point at records salvage lost: rebuilt from the log, so
            // that the lost dots leave the vectors too.
            tracing::warn!("rebuilding the key index from the salvaged log");
            index.clear()?;
            state = index.state()?;
            report.index_rebuilt = true;
        } else if state.applied_seq > log.last_seq() {
            tracing::warn!(
                index_seq = state.applied_seq,
                log_seq = log.last_seq(),
                "the key index reflects events the log no longer holds (log writes lost in a crash); rebuilding the index from the log"
            );
            index.clear()?;
            state = index.state()?;
            report.index_rebuilt = true;
        }
        let (replayed, hlc) = replay(&log, &index, &mut state)?;
        if report.index_rebuilt {
            let restored = index.restore_epitaphs()?;
            if restored > 0 {
                tracing::info!(restored, "epitaphs put back into the rebuilt key index");
            }
        }
        // The log no longer holds what compaction dropped or peers covered; a vector
        // rebuilt from it would have holes there.
        for (namespace, base) in &bases.by_namespace {
            let ns_state = state.namespaces.entry(namespace.clone()).or_default();
            ns_state.vector.join(base);
        }
        // What this node issued, as far as its log (and base) shows: where counting
        // goes on, unless the counters file says more may have been issued.
        let log_max: HashMap<Namespace, u64> = state
            .namespaces
            .iter()
            .map(|(ns, s)| (ns.clone(), s.vector.max_counter(manifest.node_id)))
            .filter(|(_, max)| *max > 0)
            .collect();
        let mut counters =
            crate::counters::Counters::open(config.fs.clone(), &config.data_dir, &log_max)?;
        if salvage_done {
            // Salvage may have lost this node's newest events of some namespace, which
            // peers may hold: its counters go on past a gap, durably before the marker
            // goes (a crash in between salvages, and jumps, again).
            counters
                .jump_all(&log_max)
                .map_err(|source| OpenError::Io {
                    context: "raising the counters after a salvage".into(),
                    source,
                })?;
            // The rebuilt index must be durable before the marker goes: a crash in
            // between must find the marker and rebuild again.
            index.persist().map_err(OpenError::Index)?;
            salvage::finish(fs.as_ref(), &config.data_dir)?;
        }
        // A node that has had peers learns what they hold of its own events before it
        // issues counters again (bounded by `own_events_wait`): its data directory may
        // be older than what it issued.
        let learned = config.own_events_wait.is_zero() || index.checkpoint_peers().is_empty();
        let mut held = Held::open(config.fs.clone(), &config.data_dir, config.held_bytes_max)?;
        // Held events applied since, or discarded (their dots joined the base), go.
        let dropped = held.drop_applied(|ns, dot| {
            state
                .namespaces
                .get(ns)
                .is_some_and(|s| s.vector.contains(dot))
        });
        if held.len() > 0 || dropped > 0 {
            tracing::info!(
                held = held.len(),
                dropped,
                bytes = held.bytes(),
                "events received from peers and held (parked or quarantined)"
            );
        }
        let digests = build_digests(&index, &config)?;
        index.clamp_checkpoints(log.last_seq())?;
        report.replayed_events = replayed;

        // Whatever survived in the log is treated as durable from here on.
        log.active()
            .file
            .sync_data()
            .map_err(|source| OpenError::Io {
                context: "fsync of the log".into(),
                source,
            })?;
        let mut policies = Policies::load(fs.as_ref(), &config.data_dir)?;
        let mut changed = false;
        for (name, &policy) in &config.namespace_policies {
            let ns = Namespace::new(name)
                .map_err(|e| OpenError::Config(format!("namespace_policies: {e}")))?;
            let current = policies.get(&ns);
            if current == policy {
                continue;
            }
            let holds_data = state
                .namespaces
                .get(&ns)
                .is_some_and(|s| !s.vector.is_empty());
            if holds_data {
                return Err(OpenError::Config(format!(
                    "namespace {ns} is configured with the {policy} policy but holds data under the {current} policy; a namespace's policy cannot change once it holds data"
                )));
            }
            policies.by_namespace.insert(ns, policy);
            changed = true;
        }
        if changed {
            policies
                .save(fs.as_ref(), &config.data_dir)
                .map_err(|source| OpenError::Io {
                    context: "writing the policies file".into(),
                    source,
                })?;
        }
        let head = log.written_head();
        let (head_tx, _) = watch::channel(head);
        let metrics = Metrics::default();
        metrics.feed_head.set(head.seq as i64);
        metrics.held_events.set(held.len() as i64);
        metrics.held_bytes.set(held.bytes() as i64);
        let shared = Arc::new(Shared {
            node_id: manifest.node_id,
            config: config.clone(),
            log,
            index,
            metrics,
            head_tx,
            progress: Mutex::new(Progress {
                written: head,
                synced: head,
                acked: head,
                indexed: head,
                stopping: false,
            }),
            progress_changed: Condvar::new(),
            writer: ByWriter {
                policies: RwLock::new(policies),
                counters: Mutex::new(counters),
                held: Mutex::new(held),
                acked_seq: AtomicU64::new(head.seq),
            },
            indexer: ByIndexer {
                namespaces: RwLock::new(state.namespaces.clone()),
                indexed_seq: AtomicU64::new(head.seq),
                index_msgs_applied: AtomicU64::new(0),
                window_messages: AtomicU64::new(0),
                indexed_tx: watch::channel(head.seq).0,
            },
            window_keeper: ByWindowKeeper {
                windows: Mutex::new(Windows {
                    by_namespace: digests,
                    seq: head.seq,
                    messages: 0,
                    indexed: Default::default(),
                    index_uses: 0,
                }),
                windows_changed: Condvar::new(),
            },
            peers: FromPeers {
                gc: Mutex::new(asp_core::gc::Gc::new(writer::wall_ms())),
                own_events_found: Mutex::new(Vec::new()),
                own_events_learned: watch::channel(learned).0,
            },
            maintenance: Maintenance {
                bases: Mutex::new(bases),
                compaction: Mutex::new(()),
                segment_gate: RwLock::new(()),
                scrub_running: Mutex::new(()),
                last_scrub: Mutex::new(None),
                operations: Default::default(),
            },
            health: Health {
                failure: OnceLock::new(),
                space_problem: Mutex::new(None),
            },
            gate: RwLock::new(None),
        });
        let queue = Arc::new(WriteQueue::new(config.write_queue_max));
        let clock = HlcClock::with_last(hlc, config.max_clock_skew_ms);
        let writer = writer::spawn(shared.clone(), queue.clone(), clock, state.namespaces)
            .map_err(|source| OpenError::Io {
                context: "cannot start the writer thread".into(),
                source,
            })?;
        tracing::info!(
            node_id = %manifest.node_id,
            dir = %config.data_dir.display(),
            feed_head = head.seq,
            replayed,
            "store open"
        );
        Ok(Store {
            inner: Arc::new(Inner {
                shared,
                queue,
                budget: Arc::new(Semaphore::new(config.write_queue_bytes_max)),
                writer: Mutex::new(Some(writer)),
                recovery: report,
                opened: Instant::now(),
                _manifest: manifest,
            }),
        })
    }
}

/// Builds every namespace's reconciliation digest from the key index: one pass over
/// all keys.
fn build_digests(
    index: &Index,
    config: &StoreConfig,
) -> Result<HashMap<Namespace, Digest>, OpenError> {
    if config.reconcile_window == 0 {
        return Ok(HashMap::new());
    }
    let started = Instant::now();
    let mut items: HashMap<String, Vec<Item>> = HashMap::new();
    let mut bad = None;
    index
        .scan(&[], None, |k, entry| match codec::split_index_key(k) {
            Some((namespace, key)) => {
                let item = config.item_key.item(key, &entry.version());
                match items.get_mut(namespace) {
                    Some(v) => v.push(item),
                    None => {
                        items.insert(namespace.to_owned(), vec![item]);
                    }
                }
                true
            }
            None => {
                bad = Some(format!("malformed index key {k:?}"));
                false
            }
        })
        .map_err(|e| OpenError::Corrupt {
            path: "index".into(),
            reason: e.to_string(),
        })?;
    if let Some(reason) = bad {
        return Err(OpenError::Corrupt {
            path: "index".into(),
            reason,
        });
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut digests = HashMap::new();
    let mut keys = 0;
    for (namespace, items) in items {
        let namespace = Namespace::new(&namespace).map_err(|e| OpenError::Corrupt {
            path: "index".into(),
            reason: format!("bad namespace in the key index: {e}"),
        })?;
        keys += items.len();
        let digest = Digest::of(config.item_key, &items, config.reconcile_window, threads);
        digests.insert(namespace, digest);
    }
    tracing::info!(
        keys,
        namespaces = digests.len(),
        ms = started.elapsed().as_millis() as u64,
        "reconciliation windows built"
    );
    Ok(digests)
}

/// Brings the index up to date with the log. Returns how many events were replayed and
/// the newest clock reading seen.
fn replay(
    log: &Log,
    index: &Index,
    state: &mut crate::index::IndexState,
) -> Result<(u64, asp_core::Hlc), OpenError> {
    let mut hlc = state.hlc;
    let target = log.last_seq();
    if state.applied_seq >= target {
        return Ok((0, hlc));
    }
    let started = Instant::now();
    let head = log.written_head();
    let mut cursor = log.seek(state.applied_seq + 1);
    let mut replayed = 0u64;
    let mut next_report = 1_000_000;
    tracing::info!(
        from = state.applied_seq + 1,
        to = target,
        "replaying the log into the key index"
    );
    loop {
        let records = log
            .read(
                &mut cursor,
                head,
                crate::log::ReadFilter::All,
                REPLAY_BATCH_EVENTS,
                64 << 20,
            )
            .map_err(|e| OpenError::Corrupt {
                path: "log".into(),
                reason: e.to_string(),
            })?;
        let Some(last) = records.last() else { break };
        let last_seq = last.1.seq;
        let mut winners: HashMap<Slice, IndexEntry, foldhash::fast::RandomState> =
            HashMap::default();
        let mut touched: Vec<Namespace> = Vec::new();
        for (position, record) in &records {
            let event = &record.event;
            let ns_state = state.namespaces.entry(event.namespace.clone()).or_default();
            ns_state.vector.insert(event.dot);
            ns_state.max_hlc = ns_state.max_hlc.max(event.hlc);
            if !touched.contains(&event.namespace) {
                touched.push(event.namespace.clone());
            }
            hlc = hlc.max(event.hlc);
            let (content_type, value) = match &event.op {
                Op::Put {
                    content_type,
                    value,
                } => (Some(*content_type), Some(value)),
                Op::Delete => (None, None),
            };
            let entry = IndexEntry {
                content_type,
                dot: event.dot,
                hlc: event.hlc,
                seq: record.seq,
                position: *position,
                value_len: value.map_or(0, |v| v.len() as u32),
                inline: value
                    .filter(|v| v.len() <= INLINE_VALUE_BYTES_MAX)
                    .map(|v| bytes::Bytes::copy_from_slice(v)),
                expires_ms: event.expires_ms,
            };
            let key = Slice::from(codec::event_index_key(
                event.namespace.as_str(),
                event.key.as_str(),
                event.dot,
                &event.context,
            ));
            let current = match winners.get(&key) {
                Some(e) => Some(e.version()),
                None => index
                    .get(&key)
                    .map_err(|e| OpenError::Corrupt {
                        path: "index".into(),
                        reason: e.to_string(),
                    })?
                    .map(|e| e.version()),
            };
            // Equal versions are one event twice: a copy compaction relocated. The
            // later copy is the one that stays.
            if crate::lww::supersedes_on_replay(&entry.version(), current.as_ref()) {
                winners.insert(key, entry);
            }
        }
        let mut batch = index.batch(winners.len() + touched.len() + 2);
        for (key, entry) in &winners {
            batch.put(key.clone(), entry);
        }
        for ns in &touched {
            batch.set_namespace(ns, &state.namespaces[ns]);
        }
        batch.set_applied(last_seq, hlc);
        batch.commit()?;
        replayed += records.len() as u64;
        state.applied_seq = last_seq;
        if replayed >= next_report {
            next_report += 1_000_000;
            tracing::info!(replayed, remaining = target - last_seq, "replaying the log");
        }
    }
    tracing::info!(
        replayed,
        ms = started.elapsed().as_millis() as u64,
        "log replay done"
    );
    Ok((replayed, hlc))
}
