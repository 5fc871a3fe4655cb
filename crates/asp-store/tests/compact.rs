//! Feed compaction (copy forward, then whole-segment removal), base vectors and
//! `Store::cover`: state, vectors and feeds survive compaction, reopen, an index
//! rebuild and a crash at any step; the ratio, retention and size rules hold segments
//! back; covers are durable and ordered.
//!
//! The change feed after compaction holds every key's current event at least once;
//! after a run that finished (no interrupted run left stale copies) exactly once. A
//! relocated event appears at a new, higher position than before.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use asp_core::{ContentType, Dot, Event, Hlc, Key, Namespace, NodeId, Op, VersionVector};
use asp_store::{CompactionReport, OpenError, Store, StoreConfig, WriteOp};
use bytes::Bytes;

const NODE: u64 = 7;

fn ns(name: &str) -> Namespace {
    Namespace::new(name).unwrap()
}

fn key(k: &str) -> Key {
    Key::new(k).unwrap()
}

/// Small segments, so that they seal quickly; retention off, so that every superseded
/// event may go.
fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.node_id = NodeId::new(NODE);
    c.segment_bytes_max = 1 << 20;
    c.compaction_retention_ms = 0;
    c
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

async fn compact(store: &Store) -> CompactionReport {
    store.compact_async().await.unwrap()
}

/// What every key of a namespace should read: its value, or `None` once deleted.
type Expected = BTreeMap<String, Option<Vec<u8>>>;

fn big_value(k: &str, round: usize) -> Vec<u8> {
    let mut v = format!("{k}:{round}:").into_bytes();
    v.resize(1500, b'x');
    v
}

/// Overwrites `churn` keys `rounds` times (values of 1,500 bytes, read from the log),
/// keeps a few small keys (inlined in the index) churning too, and leaves in the first
/// rounds keys written once and keys deleted once: live values and tombstones in the
/// oldest segment, which compaction must carry forward.
async fn fill(store: &Store, namespace: &str, churn: usize, rounds: usize) -> Expected {
    let mut expected = Expected::new();
    for round in 0..rounds {
        let mut ops = Vec::new();
        let mut set = |k: String, v: Option<Vec<u8>>, ops: &mut Vec<WriteOp>| {
            ops.push(match &v {
                Some(v) => WriteOp::put(key(&k), ContentType::Text, Bytes::from(v.clone())),
                None => WriteOp::delete(key(&k)),
            });
            expected.insert(k, v);
        };
        for i in 0..churn {
            let k = format!("churn-{i}");
            let v = big_value(&k, round);
            set(k, Some(v), &mut ops);
        }
        for i in 0..4 {
            set(
                format!("small-{i}"),
                Some(format!("{round}").into_bytes()),
                &mut ops,
            );
        }
        if round == 0 {
            for i in 0..4 {
                let k = format!("once-{i}");
                let v = big_value(&k, round);
                set(k, Some(v), &mut ops);
                set(
                    format!("gone-{i}"),
                    Some(b"soon deleted".to_vec()),
                    &mut ops,
                );
            }
        }
        if round == 1 {
            for i in 0..4 {
                set(format!("gone-{i}"), None, &mut ops);
            }
        }
        store.write(ns(namespace), ops).await.unwrap();
    }
    expected
}

fn check_state(store: &Store, namespace: &str, expected: &Expected) {
    for (k, want) in expected {
        let state = store
            .get(&ns(namespace), k)
            .unwrap()
            .unwrap_or_else(|| panic!("key {k} is gone"));
        assert_eq!(
            state.value.map(|v| v.bytes.to_vec()),
            *want,
            "key {namespace}/{k}"
        );
    }
}

/// Every event of the feed from position 0, with its position; positions must rise.
fn feed(store: &Store) -> Vec<(u64, Event)> {
    let mut out: Vec<(u64, Event)> = Vec::new();
    let mut since = 0;
    loop {
        let page = store.changes(None, since, 1000).unwrap();
        if page.events.is_empty() {
            assert_eq!(page.next, page.head);
            return out;
        }
        for e in page.events {
            if let Some((last, _)) = out.last() {
                assert!(e.seq > *last, "feed positions must rise");
            }
            out.push((e.seq, e.event));
        }
        since = page.next;
    }
}

/// The dot of each key's current version.
fn current_dots(store: &Store, namespace: &str, expected: &Expected) -> BTreeMap<String, Dot> {
    expected
        .keys()
        .map(|k| {
            let state = store.get(&ns(namespace), k).unwrap().unwrap();
            (k.clone(), state.version.dot)
        })
        .collect()
}

/// The summary once the reconciliation windows reflect every indexed write (its
/// digests are read from them).
fn summary(store: &Store) -> Vec<asp_core::session::NamespaceSummary> {
    if store.config().reconcile_window > 0 {
        store.reconcile_window(&ns("app")).unwrap();
    }
    store.summary()
}

fn vector_of(store: &Store, namespace: &str) -> VersionVector {
    summary(store)
        .into_iter()
        .find(|s| s.namespace == ns(namespace))
        .map(|s| s.vector)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_every_key_and_every_dot_and_shrinks_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let expected = fill(&store, "app", 30, 80).await;
    assert!(store.status().log_segments >= 4, "{:?}", store.status());
    let summary_before = summary(&store);
    let vector_before = vector_of(&store, "app");
    let feed_before = feed(&store);
    let dots_before: BTreeSet<Dot> = feed_before.iter().map(|(_, e)| e.dot).collect();
    let current = current_dots(&store, "app", &expected);
    let status_before = store.status();
    let files_before = segment_files(dir.path());

    let report = compact(&store).await;
    assert!(report.segments_removed >= 2, "{report:?}");
    assert!(report.records_dropped > 0, "{report:?}");
    assert_eq!(report.stale_copies_dropped, 0, "{report:?}");
    // The keys written once and the tombstones in the oldest segment moved.
    assert!(report.records_relocated >= 8, "{report:?}");
    assert!(
        report.log_bytes_after < report.log_bytes_before,
        "{report:?}"
    );
    assert_eq!(report.log_bytes_before, status_before.log_bytes);
    let status = store.status();
    assert!(status.log_bytes < status_before.log_bytes);
    assert_eq!(
        status.log_segments,
        status_before.log_segments - report.segments_removed
    );
    assert_eq!(
        segment_files(dir.path()).len(),
        files_before.len() - report.segments_removed
    );
    assert!(status.feed_first_seq > 1);
    let metrics = store.metrics();
    assert_eq!(metrics.compaction_runs.get(), 1);
    assert_eq!(
        metrics.compaction_segments_removed.get(),
        report.segments_removed as u64
    );
    assert_eq!(
        metrics.compaction_records_relocated.get(),
        report.records_relocated
    );
    assert_eq!(
        metrics.compaction_records_dropped.get(),
        report.records_dropped
    );

    // Every key reads its latest value (or tombstone), at the same version.
    check_state(&store, "app", &expected);
    assert_eq!(current_dots(&store, "app", &expected), current);
    // Vectors, clocks (and digests) are untouched: the namespace still holds every
    // dot ever written.
    assert_eq!(summary(&store), summary_before);
    assert_eq!(vector_of(&store, "app"), vector_before);

    // Each dropped dot is in the base, no current one is, and every dot written is
    // either still in the feed or in the base.
    let base = store.base(&ns("app"));
    assert_eq!(base.len(), report.records_dropped);
    assert_eq!(store.bases(), vec![(ns("app"), base.clone())]);
    assert!(base.is_subset(&vector_before));
    for dot in current.values() {
        assert!(!base.contains(*dot), "current version {dot} is in the base");
    }
    let feed_after = feed(&store);
    let dots_after: BTreeSet<Dot> = feed_after.iter().map(|(_, e)| e.dot).collect();
    assert_eq!(dots_after.len(), feed_after.len(), "an event appears twice");
    for dot in &dots_before {
        assert!(
            dots_after.contains(dot) != base.contains(*dot),
            "dot {dot} must be in exactly one of the feed and the base"
        );
    }
    // The feed from position 0 still yields every key's current event; those that
    // were relocated come at new, later positions.
    for (k, dot) in &current {
        let (seq, event) = feed_after
            .iter()
            .find(|(_, e)| e.dot == *dot)
            .unwrap_or_else(|| panic!("the current event of {k} is not in the feed"));
        let (old_seq, old_event) = feed_before.iter().find(|(_, e)| e.dot == *dot).unwrap();
        assert_eq!(event, old_event, "a relocated event is unchanged");
        assert!(seq >= old_seq);
    }
    let tombstone = feed_after
        .iter()
        .find(|(_, e)| e.key.as_str() == "gone-0")
        .unwrap();
    assert!(matches!(tombstone.1.op, Op::Delete));
    assert!(
        tombstone.0 > feed_before.last().unwrap().0,
        "it was relocated"
    );

    // A scan with values reads the relocated large values too.
    let page = store.scan(&ns("app"), "once-", None, 100, true).unwrap();
    assert_eq!(page.items.len(), 4);
    for item in page.items {
        let want = expected[item.key.as_str()].clone().unwrap();
        assert_eq!(item.value.unwrap().to_vec(), want);
    }

    // Reopened: the same state, vectors and bases, without a replay.
    drop(store);
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(store.recovery().replayed_events, 0);
    check_state(&store, "app", &expected);
    assert_eq!(summary(&store), summary_before);
    assert_eq!(store.base(&ns("app")), base);
    assert_eq!(feed(&store), feed_after);
    // New writes go on from where the log ends.
    let applied = store
        .write(ns("app"), vec![WriteOp::delete(key("churn-0"))])
        .await
        .unwrap();
    assert_eq!(
        applied[0].dot.counter,
        vector_before.max_counter(NodeId::new(NODE).unwrap()) + 1
    );
    assert_eq!(applied[0].seq, feed_after.last().unwrap().0 + 1);
    drop(store);

    // With the key index lost, the rebuild from the log joins the base back in: no
    // hole where the dropped events were.
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let mut vector = vector_before.clone();
    vector.insert(applied[0].dot);
    assert_eq!(vector_of(&store, "app"), vector);
    let mut expected = expected;
    expected.insert("churn-0".into(), None);
    check_state(&store, "app", &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relocation_changes_no_clock_window_or_write_metric() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.reconcile_window = StoreConfig::RECONCILE_WINDOW_ON;
    let store = Store::open(c).unwrap();
    fill(&store, "app", 30, 60).await;
    let summary_before = summary(&store);
    let window = store.reconcile_window(&ns("app")).unwrap();
    let items = store.reconcile_items(&ns("app")).unwrap();
    let events_written = store.metrics().events_written.get();

    let report = compact(&store).await;
    assert!(report.records_relocated > 0, "{report:?}");
    assert_eq!(summary(&store), summary_before);
    assert_eq!(
        store.reconcile_window(&ns("app")).unwrap().symbols(),
        window.symbols()
    );
    assert_eq!(store.reconcile_items(&ns("app")).unwrap(), items);
    assert_eq!(store.metrics().events_written.get(), events_written);
    // A write after compaction gets the next clock reading, as it would have.
    let applied = store
        .write(
            ns("app"),
            vec![WriteOp::put(key("after"), ContentType::Text, "x")],
        )
        .await
        .unwrap();
    assert!(applied[0].hlc > summary_before[0].max_hlc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_keep_reading_while_segments_go() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let expected = fill(&store, "app", 30, 80).await;
    let current = current_dots(&store, "app", &expected);
    let head = store.head().seq;

    // A reader that has started on the oldest segment, and continues after it is
    // deleted.
    let mut before = store.feed_reader(None, 0);
    let mut seen: Vec<(u64, Dot)> = before
        .read(50)
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.event.dot))
        .collect();
    assert_eq!(seen.len(), 50);

    // Readers of the feed and of keys running all through the compaction.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut busy = Vec::new();
    for t in 0..2 {
        let (store, stop, expected) = (store.clone(), stop.clone(), expected.clone());
        busy.push(std::thread::spawn(move || {
            let mut passes = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || passes == 0 {
                if t == 0 {
                    let mut reader = store.feed_reader(None, 0);
                    while !reader.read_bytes(100, 64 << 10).unwrap().is_empty() {}
                    assert!(reader.position() >= head);
                } else {
                    check_state(&store, "app", &expected);
                    store.scan(&ns("app"), "", None, 1000, true).unwrap();
                }
                passes += 1;
            }
        }));
    }
    let report = compact(&store).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for b in busy {
        b.join().unwrap();
    }
    assert!(report.segments_removed >= 2, "{report:?}");
    assert!(
        !segment_files(dir.path())
            .iter()
            .any(|p| p.ends_with(format!("{:020}.log", 1))),
        "the oldest segment is deleted"
    );

    loop {
        let page = before.read(1000).unwrap();
        if page.is_empty() {
            break;
        }
        seen.extend(page.into_iter().map(|e| (e.seq, e.event.dot)));
    }
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
    // It read the old segment to its end, then everything after, relocated copies
    // included: every current event at least once.
    let dots: HashSet<Dot> = seen.iter().map(|&(_, dot)| dot).collect();
    for (k, dot) in &current {
        assert!(dots.contains(dot), "{k}");
    }

    // A reader, or a peer checkpoint, from inside a removed segment starts at the
    // first event the log still holds.
    let first = store.status().feed_first_seq;
    let page = store.changes(None, 3, 10).unwrap();
    assert_eq!(page.events[0].seq, first);
    let peer = NodeId::new(99).unwrap();
    store.save_checkpoint(peer, 3).unwrap();
    let mut reader = store.feed_reader(None, store.checkpoint(peer));
    assert_eq!(reader.read(1).unwrap()[0].seq, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_below_the_dead_ratio_or_within_the_newest_bytes_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    // Each round overwrites 15 keys and adds 15 new ones: sealed segments are about
    // half dead.
    let fill_half_dead = async |store: &Store| {
        for round in 0..70 {
            let mut ops = Vec::new();
            for i in 0..15 {
                let k = format!("churn-{i}");
                let v = big_value(&k, round);
                ops.push(WriteOp::put(key(&k), ContentType::Text, v));
                let k = format!("new-{round}-{i}");
                let v = big_value(&k, round);
                ops.push(WriteOp::put(key(&k), ContentType::Text, v));
            }
            store.write(ns("app"), ops).await.unwrap();
        }
    };
    let open = |ratio: f64, keep_bytes: u64| {
        let mut c = config(dir.path());
        c.compaction_dead_ratio = ratio;
        c.compaction_retention_bytes = keep_bytes;
        Store::open(c).unwrap()
    };
    let store = open(0.75, 0);
    fill_half_dead(&store).await;
    let files = segment_files(dir.path());
    assert!(files.len() >= 3);
    let report = compact(&store).await;
    assert_eq!(report.segments_removed, 0, "{report:?}");
    assert_eq!(report.records_relocated, 0, "{report:?}");
    assert_eq!(segment_files(dir.path()), files);
    let log_bytes = store.status().log_bytes;
    drop(store);

    // Every segment holds part of the newest `log_bytes` bytes.
    let store = open(0.25, log_bytes);
    let report = compact(&store).await;
    assert_eq!(report.segments_removed, 0, "{report:?}");
    assert_eq!(segment_files(dir.path()), files);
    drop(store);

    // Only the active segment is kept by the newest byte; the ratio lets the rest go.
    let store = open(0.25, 1);
    let report = compact(&store).await;
    assert_eq!(report.segments_removed, files.len() - 1, "{report:?}");
    assert!(report.records_relocated > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_events_younger_than_their_retention_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.compaction_retention_ms = StoreConfig::DEFAULT_COMPACTION_RETENTION_MS;
    c.compaction_namespace_retention_ms
        .insert("short".to_owned(), 0);
    let store = Store::open(c.clone()).unwrap();
    let short = fill(&store, "short", 30, 60).await;
    let long = fill(&store, "long", 30, 60).await;
    let long_dots: BTreeSet<Dot> = feed(&store)
        .into_iter()
        .filter(|(_, e)| e.namespace == ns("long"))
        .map(|(_, e)| e.dot)
        .collect();

    let report = compact(&store).await;
    assert!(report.segments_removed >= 1, "{report:?}");
    // No segment holding a superseded event of "long" went: every one of them is
    // still in the feed, and none in the base.
    let after: BTreeSet<Dot> = feed(&store)
        .into_iter()
        .filter(|(_, e)| e.namespace == ns("long"))
        .map(|(_, e)| e.dot)
        .collect();
    assert_eq!(after, long_dots);
    assert!(store.base(&ns("long")).is_empty());
    assert_eq!(store.base(&ns("short")).len(), report.records_dropped);
    check_state(&store, "short", &short);
    check_state(&store, "long", &long);

    // With the default retention for every namespace, nothing is old enough.
    drop(store);
    c.compaction_namespace_retention_ms.clear();
    let store = Store::open(c).unwrap();
    let files = segment_files(dir.path());
    let report = compact(&store).await;
    assert_eq!(report.segments_removed, 0, "{report:?}");
    assert_eq!(segment_files(dir.path()), files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_relocation_and_before_removal_loses_nothing() {
    for rebuild_index in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(config(dir.path())).unwrap();
        let expected = fill(&store, "app", 30, 80).await;
        let summary_before = summary(&store);
        let files = segment_files(dir.path());
        let report = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.compact_stop_after_relocation())
                .await
                .unwrap()
                .unwrap()
        };
        assert!(report.records_relocated > 0, "{report:?}");
        assert_eq!(report.segments_removed, 0);
        // The "crash": the store goes without deleting anything or writing the base.
        drop(store);
        for f in &files {
            assert!(f.exists(), "{}", f.display());
        }
        if rebuild_index {
            // Without the index, the rebuild from the log meets each relocated event
            // twice and must keep the later copy.
            std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        }

        let store = Store::open(config(dir.path())).unwrap();
        check_state(&store, "app", &expected);
        assert_eq!(summary(&store), summary_before);
        assert!(store.bases().is_empty());
        // The relocated events are in the feed twice until the run is finished.
        let dots: Vec<Dot> = feed(&store).into_iter().map(|(_, e)| e.dot).collect();
        let unique: HashSet<Dot> = dots.iter().copied().collect();
        assert_eq!(
            (dots.len() - unique.len()) as u64,
            report.records_relocated,
            "rebuild_index = {rebuild_index}"
        );

        // Compacting again finishes the job: the first copies are stale, not moved again.
        let again = compact(&store).await;
        assert!(again.segments_removed >= 2, "{again:?}");
        assert_eq!(
            again.stale_copies_dropped, report.records_relocated,
            "rebuild_index = {rebuild_index}: {again:?}"
        );
        check_state(&store, "app", &expected);
        assert_eq!(summary(&store), summary_before);
        let dots: Vec<Dot> = feed(&store).into_iter().map(|(_, e)| e.dot).collect();
        let unique: HashSet<Dot> = dots.iter().copied().collect();
        assert_eq!(dots.len(), unique.len());
        drop(store);
        let store = Store::open(config(dir.path())).unwrap();
        check_state(&store, "app", &expected);
        assert_eq!(summary(&store), summary_before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_back_after_its_removal_was_recorded_is_removed_again() {
    // What a crash between writing the base file and deleting the segment leaves: the
    // base already holds the segment's dots, and the segment is still there.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let expected = fill(&store, "app", 30, 80).await;
    let summary_before = summary(&store);
    let first = segment_files(dir.path()).remove(0);
    let saved = std::fs::read(&first).unwrap();
    let report = compact(&store).await;
    assert!(report.segments_removed >= 1);
    let base = store.base(&ns("app"));
    drop(store);
    assert!(!first.exists());
    std::fs::write(&first, saved).unwrap();

    let store = Store::open(config(dir.path())).unwrap();
    check_state(&store, "app", &expected);
    assert_eq!(summary(&store), summary_before);
    let again = compact(&store).await;
    assert_eq!(again.segments_removed, 1, "{again:?}");
    assert_eq!(again.records_relocated, 0, "{again:?}");
    assert_eq!(store.base(&ns("app")), base);
    assert!(!first.exists());
    check_state(&store, "app", &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_segment_or_a_damaged_base_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(config(dir.path())).unwrap();
        fill(&store, "app", 30, 80).await;
        assert!(compact(&store).await.segments_removed > 0);
        fill(&store, "more", 30, 40).await;
    }
    // Compaction removed the oldest segments; a segment missing after them was lost.
    let files = segment_files(dir.path());
    assert!(files.len() >= 2);
    let lost = &files[files.len() - 2];
    let saved = std::fs::read(lost).unwrap();
    std::fs::remove_file(lost).unwrap();
    match Store::open(config(dir.path())) {
        Err(OpenError::Corrupt { reason, .. }) => {
            assert!(reason.contains("missing"), "{reason}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a lost segment went unnoticed"),
    }
    std::fs::write(lost, saved).unwrap();
    drop(Store::open(config(dir.path())).unwrap());

    let base = dir.path().join("base.vv");
    let mut bytes = std::fs::read(&base).unwrap();
    bytes[20] ^= 1;
    std::fs::write(&base, bytes).unwrap();
    match Store::open(config(dir.path())) {
        Err(OpenError::Corrupt { path, reason }) => {
            assert_eq!(path, base);
            assert!(reason.contains("checksum"), "{reason}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a damaged base file went unnoticed"),
    }
}

fn remote(origin: u64, counter: u64, k: &str) -> Event {
    Event {
        namespace: ns("r"),
        key: key(k),
        op: Op::Put {
            content_type: ContentType::Text,
            value: Bytes::from_static(b"v"),
        },
        dot: Dot {
            origin: NodeId::new(origin).unwrap(),
            counter,
        },
        hlc: Hlc::new(1_000, counter as u16),
        context: Bytes::new(),
        epoch: 0,
        expires_ms: 0,
    }
}

fn range(origin: u64, lo: u64, hi: u64) -> VersionVector {
    let mut vv = VersionVector::new();
    vv.insert_range(NodeId::new(origin).unwrap(), lo, hi);
    vv
}

#[tokio::test]
async fn covered_dots_are_held_durably_even_without_events() {
    let dir = tempfile::tempdir().unwrap();
    let covered = range(42, 1, 10);
    {
        let store = Store::open(config(dir.path())).unwrap();
        store.cover(ns("r"), covered.clone()).await.unwrap();
        assert_eq!(vector_of(&store, "r"), covered);
        assert_eq!(store.base(&ns("r")), covered);
        // Covered dots count as held: a peer's copy of one is a duplicate.
        let out = store.apply_remote(vec![remote(42, 3, "k")]).await.unwrap();
        assert_eq!((out.applied, out.duplicates), (0, 1));
    }
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(vector_of(&store, "r"), covered);
    drop(store);
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(vector_of(&store, "r"), covered);
    assert_eq!(store.bases(), vec![(ns("r"), covered)]);
}

#[tokio::test]
async fn cover_takes_effect_after_applies_queued_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    // Queued, not yet answered: the cover below must not overtake it, or these events
    // would be left out as held.
    let first = store
        .enqueue_remote(vec![
            remote(9, 5, "a"),
            remote(9, 6, "b"),
            remote(9, 7, "c"),
        ])
        .await
        .unwrap();
    store.cover(ns("r"), range(9, 1, 10)).await.unwrap();
    let outcome = first.await.unwrap().unwrap();
    assert_eq!((outcome.applied, outcome.duplicates), (3, 0));
    assert_eq!(vector_of(&store, "r"), range(9, 1, 10));
    // After it, covered dots are held.
    let out = store.apply_remote(vec![remote(9, 4, "d")]).await.unwrap();
    assert_eq!((out.applied, out.duplicates), (0, 1));
    assert!(store.get(&ns("r"), "d").unwrap().is_none());
    assert!(store.get(&ns("r"), "a").unwrap().is_some());
}
