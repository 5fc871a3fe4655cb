//! Behaviour of one store: durability across reopen, recovery from torn and lost
//! writes, conditions and atomic batches, the change feed, group commit.

use std::collections::{BTreeMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use asp_core::{ContentType, Dot, Key, Namespace, NodeId};
use asp_store::{Condition, FsyncMode, OpenError, Store, StoreConfig, WriteError, WriteOp};
use bytes::Bytes;

fn ns(name: &str) -> Namespace {
    Namespace::new(name).unwrap()
}

fn key(k: &str) -> Key {
    Key::new(k).unwrap()
}

fn put(k: &str, v: &str) -> WriteOp {
    WriteOp::put(
        key(k),
        ContentType::Text,
        Bytes::copy_from_slice(v.as_bytes()),
    )
}

fn config(dir: &Path) -> StoreConfig {
    StoreConfig::new(dir)
}

fn open(dir: &Path) -> Store {
    Store::open(config(dir)).unwrap()
}

fn text(store: &Store, namespace: &str, k: &str) -> Option<String> {
    store
        .get(&ns(namespace), k)
        .unwrap()
        .and_then(|s| s.value)
        .map(|v| String::from_utf8(v.bytes.to_vec()).unwrap())
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

/// Every event of the feed, in order, checking that positions are dense.
fn whole_feed(store: &Store) -> Vec<asp_store::FeedEvent> {
    let mut out = Vec::new();
    let mut since = 0;
    loop {
        let page = store.changes(None, since, 1000).unwrap();
        if page.events.is_empty() {
            assert_eq!(page.next, page.head);
            break;
        }
        out.extend(page.events);
        since = page.next;
    }
    for (i, e) in out.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "feed positions must be dense");
    }
    out
}

#[tokio::test]
async fn acknowledged_writes_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (node, applied) = {
        let store = open(dir.path());
        let a = store
            .write(ns("app"), vec![put("a", "1"), put("b", "2")])
            .await
            .unwrap();
        store
            .write(ns("app"), vec![WriteOp::delete(key("b"))])
            .await
            .unwrap();
        store.write(ns("other"), vec![put("a", "x")]).await.unwrap();
        (store.node_id(), a)
    };
    assert_eq!(
        applied[0].dot,
        Dot {
            origin: node,
            counter: 1
        }
    );
    assert_eq!(
        applied[1].dot,
        Dot {
            origin: node,
            counter: 2
        }
    );
    assert!(applied[0].hlc < applied[1].hlc);

    let store = open(dir.path());
    assert_eq!(store.node_id(), node);
    assert_eq!(text(&store, "app", "a").as_deref(), Some("1"));
    let b = store.get(&ns("app"), "b").unwrap().unwrap();
    assert!(b.value.is_none(), "b is a tombstone");
    assert_eq!(text(&store, "other", "a").as_deref(), Some("x"));
    // Counters continue densely per namespace; clocks keep rising.
    let next = store.write(ns("app"), vec![put("c", "3")]).await.unwrap();
    assert_eq!(next[0].dot.counter, 4);
    assert!(next[0].hlc > applied[1].hlc);
    assert_eq!(next[0].seq, 5);
    let other = store.write(ns("other"), vec![put("b", "y")]).await.unwrap();
    assert_eq!(other[0].dot.counter, 2);
    assert_eq!(whole_feed(&store).len(), 6);
}

#[tokio::test]
async fn conditions_make_the_whole_batch_fail_or_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let n = ns("c");
    let v1 = store.write(n.clone(), vec![put("k", "1")]).await.unwrap()[0].dot;

    // If-Match on the current version succeeds.
    let v2 = store
        .write(
            n.clone(),
            vec![put("k", "2").with_condition(Condition::IfVersion(v1))],
        )
        .await
        .unwrap()[0]
        .dot;
    // A stale version fails, and the other operation of the batch is not applied.
    let err = store
        .write(
            n.clone(),
            vec![
                put("other", "x"),
                put("k", "3").with_condition(Condition::IfVersion(v1)),
            ],
        )
        .await
        .unwrap_err();
    match err {
        WriteError::ConditionFailed { index, current, .. } => {
            assert_eq!(index, 1);
            assert_eq!(current, Some(v2));
        }
        e => panic!("unexpected {e:?}"),
    }
    assert_eq!(store.get(&n, "other").unwrap(), None);
    assert_eq!(text(&store, "c", "k").as_deref(), Some("2"));

    // Create-only and must-exist.
    assert!(
        store
            .write(
                n.clone(),
                vec![put("k", "x").with_condition(Condition::IfAbsent)]
            )
            .await
            .is_err()
    );
    assert!(
        store
            .write(
                n.clone(),
                vec![put("new", "x").with_condition(Condition::IfAbsent)]
            )
            .await
            .is_ok()
    );
    assert!(
        store
            .write(
                n.clone(),
                vec![put("nope", "x").with_condition(Condition::IfExists)]
            )
            .await
            .is_err()
    );
    // Later operations of one batch see earlier ones.
    store
        .write(
            n.clone(),
            vec![
                WriteOp::delete(key("k")),
                put("k", "again").with_condition(Condition::IfAbsent),
            ],
        )
        .await
        .unwrap();
    assert_eq!(text(&store, "c", "k").as_deref(), Some("again"));
    // A deleted key does not satisfy IfExists.
    store
        .write(n.clone(), vec![WriteOp::delete(key("new"))])
        .await
        .unwrap();
    assert!(
        store
            .write(
                n.clone(),
                vec![put("new", "x").with_condition(Condition::IfExists)]
            )
            .await
            .is_err()
    );
    // Refused batches consumed no feed positions and no dots.
    let feed = whole_feed(&store);
    let counters: Vec<u64> = feed.iter().map(|e| e.event.dot.counter).collect();
    assert_eq!(counters, (1..=feed.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn bad_batches_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.value_bytes_max = 10;
    cfg.batch_ops_max = 2;
    let store = Store::open(cfg).unwrap();
    let e = store.write(ns("x"), vec![]).await.unwrap_err();
    assert!(e.to_string().contains("at least one"), "{e}");
    let e = store
        .write(ns("x"), vec![put("a", "1"), put("b", "2"), put("c", "3")])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("at most 2"), "{e}");
    let e = store
        .write(ns("x"), vec![put("a", "01234567890")])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("limit is 10"), "{e}");
    assert_eq!(store.head().seq, 0);
}

#[tokio::test]
async fn concurrent_single_writes_share_fsyncs_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut tasks = Vec::new();
    for w in 0..32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                store
                    .write(
                        ns("g"),
                        vec![put(&format!("w{w}-{i}"), &format!("{w}:{i}"))],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.head().seq, 32 * 50);
    for w in 0..32 {
        for i in 0..50 {
            assert_eq!(
                text(&store, "g", &format!("w{w}-{i}")),
                Some(format!("{w}:{i}"))
            );
        }
    }
    let fsyncs = store.metrics().fsyncs.get();
    assert!((1..=32 * 50).contains(&fsyncs), "{fsyncs}");
    let feed = whole_feed(&store);
    let dots: HashSet<Dot> = feed.iter().map(|e| e.event.dot).collect();
    assert_eq!(dots.len(), feed.len(), "no dot twice");
}

#[tokio::test]
async fn torn_tail_is_cut_off_and_the_store_serves() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        for i in 0..10 {
            store
                .write(
                    ns("t"),
                    vec![put(&format!("k{i}"), "v"), put(&format!("j{i}"), "w")],
                )
                .await
                .unwrap();
        }
    }
    let seg = segments(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    // Cut the last record in half, as a power loss in mid-write would.
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    {
        let store = open(dir.path());
        let torn = store
            .recovery()
            .torn_tail
            .clone()
            .expect("a torn tail is reported");
        // The last batch had two records; the intact first one goes too.
        assert_eq!(torn.dropped_records, 1);
        assert_eq!(store.head().seq, 18);
        assert_eq!(
            text(&store, "t", "k9"),
            None,
            "half a batch is never applied"
        );
        assert_eq!(text(&store, "t", "k8").as_deref(), Some("v"));
        let a = store.write(ns("t"), vec![put("after", "1")]).await.unwrap();
        assert_eq!(a[0].seq, 19);
        assert_eq!(a[0].dot.counter, 19);
        assert_eq!(whole_feed(&store).len(), 19);
    }
    // Garbage after the last record (a write that never finished its header).
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&[0x37, 0x13, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
        .unwrap();
    drop(f);
    let store = open(dir.path());
    assert!(store.recovery().torn_tail.is_some());
    assert_eq!(store.head().seq, 19);
    assert_eq!(text(&store, "t", "after").as_deref(), Some("1"));
    assert_eq!(whole_feed(&store).len(), 19);
}

#[tokio::test]
async fn zero_padding_is_not_a_tear() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.write(ns("z"), vec![put("a", "1")]).await.unwrap();
    }
    let seg = segments(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len + 4096)
        .unwrap();
    let store = open(dir.path());
    assert!(store.recovery().torn_tail.is_none());
    assert_eq!(text(&store, "z", "a").as_deref(), Some("1"));
}

#[tokio::test]
async fn lost_index_is_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        for i in 0..100 {
            store
                .write(ns("r"), vec![put(&format!("k{}", i % 7), &i.to_string())])
                .await
                .unwrap();
        }
        store
            .write(ns("r"), vec![WriteOp::delete(key("k3"))])
            .await
            .unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = open(dir.path());
    assert_eq!(store.recovery().replayed_events, 101);
    assert_eq!(text(&store, "r", "k1").as_deref(), Some("99"));
    assert!(store.get(&ns("r"), "k3").unwrap().unwrap().value.is_none());
    let next = store.write(ns("r"), vec![put("x", "y")]).await.unwrap();
    assert_eq!(next[0].dot.counter, 102);
}

#[tokio::test]
async fn index_ahead_of_the_log_is_rebuilt() {
    // Guards against trusting an index that survived a crash which took log writes
    // with it (possible with fsync = "never").
    let dir = tempfile::tempdir().unwrap();
    let saved = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.write(ns("a"), vec![put("k", "old")]).await.unwrap();
    }
    copy_dir(&dir.path().join("log"), saved.path());
    {
        let store = open(dir.path());
        store
            .write(ns("a"), vec![put("k", "new"), put("other", "1")])
            .await
            .unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("log")).unwrap();
    copy_dir(saved.path(), &dir.path().join("log"));
    let store = open(dir.path());
    assert!(store.recovery().index_rebuilt);
    assert_eq!(text(&store, "a", "k").as_deref(), Some("old"));
    assert_eq!(store.get(&ns("a"), "other").unwrap(), None);
    assert_eq!(
        store.write(ns("a"), vec![put("k", "2")]).await.unwrap()[0]
            .dot
            .counter,
        2
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[tokio::test]
async fn segments_rotate_and_reads_span_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes_max = 1 << 20;
    let big = "x".repeat(5000);
    {
        let store = Store::open(cfg.clone()).unwrap();
        for i in 0..800 {
            let n = if i % 3 == 0 { "big" } else { "small" };
            store
                .write(ns(n), vec![put(&format!("k{i}"), &format!("{i}{big}"))])
                .await
                .unwrap();
        }
        assert!(
            store.status().log_segments >= 3,
            "{}",
            store.status().log_segments
        );
        assert_eq!(text(&store, "big", "k0"), Some(format!("0{big}")));
    }
    assert!(segments(dir.path()).len() >= 3);
    let store = Store::open(cfg).unwrap();
    assert_eq!(store.recovery().replayed_events, 0);
    for i in [0, 3, 399, 798] {
        assert_eq!(
            text(&store, "big", &format!("k{i}")),
            Some(format!("{i}{big}"))
        );
    }
    assert_eq!(whole_feed(&store).len(), 800);
    // Namespace-filtered reads skip other namespaces' blocks and miss nothing.
    let mut seen = Vec::new();
    let mut since = 0;
    loop {
        let page = store.changes(Some(&ns("big")), since, 7).unwrap();
        if page.events.is_empty() {
            break;
        }
        seen.extend(page.events.iter().map(|e| e.seq));
        since = page.next;
    }
    let expected: Vec<u64> = (0..800).filter(|i| i % 3 == 0).map(|i| i + 1).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn damage_inside_a_sealed_segment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes_max = 1 << 20;
    {
        let store = Store::open(cfg.clone()).unwrap();
        let v = "y".repeat(10_000);
        for i in 0..300 {
            store
                .write(ns("d"), vec![put(&format!("k{i}"), &v)])
                .await
                .unwrap();
        }
    }
    let first = segments(dir.path()).remove(0);
    std::fs::remove_file(first.with_extension("idx")).unwrap();
    let f = OpenOptions::new().write(true).open(&first).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"garbage!", 5000).unwrap();
    drop(f);
    match Store::open(cfg) {
        Err(OpenError::Corrupt { reason, .. }) => {
            assert!(reason.contains("sealed segment"), "{reason}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a damaged log"),
    }
}

#[tokio::test]
async fn every_fsync_mode_serves_and_persists() {
    for mode in [
        FsyncMode::Always,
        FsyncMode::Interval { ms: 5 },
        FsyncMode::Never,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.fsync = mode;
        {
            let store = Store::open(cfg.clone()).unwrap();
            for i in 0..20 {
                store
                    .write(ns("m"), vec![put(&format!("k{i}"), "v")])
                    .await
                    .unwrap();
            }
            // Interval mode shows events in the feed once fsynced; wait for that.
            let mut rx = store.subscribe();
            while rx.borrow().seq < 20 {
                rx.changed().await.unwrap();
            }
            store.shutdown().await;
            let e = store
                .write(ns("m"), vec![put("late", "v")])
                .await
                .unwrap_err();
            assert!(matches!(e, WriteError::Closed), "{mode}: {e:?}");
        }
        let store = Store::open(cfg).unwrap();
        assert_eq!(store.head().seq, 20, "{mode}");
        assert_eq!(
            store.recovery().replayed_events,
            0,
            "{mode}: a clean stop leaves nothing to replay"
        );
    }
}

#[tokio::test]
async fn scan_lists_live_keys_in_order_with_continuation() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut ops = Vec::new();
    for i in 0..50 {
        ops.push(put(&format!("p/{i:03}"), &i.to_string()));
    }
    ops.push(put("q/1", "other prefix"));
    store.write(ns("s"), ops).await.unwrap();
    store
        .write(ns("s2"), vec![put("p/000", "other namespace")])
        .await
        .unwrap();
    store
        .write(
            ns("s"),
            vec![WriteOp::delete(key("p/010")), WriteOp::delete(key("p/011"))],
        )
        .await
        .unwrap();

    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .scan(&ns("s"), "p/", after.as_deref(), 7, true)
            .unwrap();
        for item in &page.items {
            assert_eq!(
                item.value.as_deref(),
                Some(item.key.as_str()[2..].trim_start_matches('0').as_bytes())
                    .filter(|v| !v.is_empty())
                    .or(Some(b"0".as_slice()))
            );
        }
        keys.extend(page.items.iter().map(|i| i.key.to_string()));
        match page.next_after {
            Some(k) => after = Some(k.to_string()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..50)
        .filter(|i| *i != 10 && *i != 11)
        .map(|i| format!("p/{i:03}"))
        .collect();
    assert_eq!(keys, expected);
}

#[tokio::test]
async fn random_histories_match_a_model_across_reopens() {
    // A small model check: random batches of puts and deletes, reopened at random
    // points, must always read back as a plain map would.
    let dir = tempfile::tempdir().unwrap();
    let mut model: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut cfg = config(dir.path());
    cfg.segment_bytes_max = 1 << 20;
    let mut store = Store::open(cfg.clone()).unwrap();
    for round in 0..400 {
        let n_ops = 1 + next() % 5;
        let mut ops = Vec::new();
        let mut staged = model.clone();
        for _ in 0..n_ops {
            let k = format!("k{}", next() % 40);
            if next() % 4 == 0 {
                ops.push(WriteOp::delete(key(&k)));
                staged.insert(k, None);
            } else {
                let v = format!("{round}-{}", "v".repeat((next() % 600) as usize));
                ops.push(put(&k, &v));
                staged.insert(k, Some(v));
            }
        }
        store.write(ns("model"), ops).await.unwrap();
        model = staged;
        if next() % 50 == 0 {
            drop(store);
            store = Store::open(cfg.clone()).unwrap();
        }
    }
    for (k, v) in &model {
        assert_eq!(&text(&store, "model", k), v, "key {k}");
    }
    let listed: Vec<String> = store
        .scan(&ns("model"), "", None, 1000, false)
        .unwrap()
        .items
        .into_iter()
        .map(|i| i.key.to_string())
        .collect();
    let live: Vec<String> = model
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(listed, live);
}

#[tokio::test]
async fn node_id_is_fixed_for_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.node_id = Some(NodeId::new(0xabc).unwrap());
    assert_eq!(Store::open(cfg.clone()).unwrap().node_id().get(), 0xabc);
    cfg.node_id = Some(NodeId::new(0xdef).unwrap());
    let err = Store::open(cfg).err().unwrap();
    assert!(
        err.to_string().contains("belongs to node 0000000000000abc"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_is_readable_at_once() {
    // The key index is updated after the acknowledgement; reads must still see their
    // own writes, under concurrent load from other writers.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let noise: Vec<_> = (0..4)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..300 {
                    let ops = (0..20)
                        .map(|j| put(&format!("n{w}-{i}-{j}"), "x"))
                        .collect();
                    store.write(ns("rw"), ops).await.unwrap();
                }
            })
        })
        .collect();
    for i in 0..1000 {
        let k = format!("mine{}", i % 17);
        let v = i.to_string();
        store.write(ns("rw"), vec![put(&k, &v)]).await.unwrap();
        if i % 2 == 0 {
            store.caught_up().await.unwrap();
        }
        assert_eq!(
            text(&store, "rw", &k),
            Some(v),
            "write {i} not visible to the reader"
        );
        let listed = store.scan(&ns("rw"), &k, None, 1, false).unwrap();
        assert_eq!(listed.items[0].key.as_str(), k);
    }
    for n in noise {
        n.await.unwrap();
    }
}

/// The list conditions (HTTP's `If-Match` / `If-None-Match` with several tags) are
/// checked by the writer against the state the write replaces, so that a client's
/// conditional write is one call: each case writes once and succeeds or fails whole.
#[tokio::test]
async fn list_conditions_are_checked_when_the_write_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let n = ns("lists");
    let v1 = store.write(n.clone(), vec![put("k", "1")]).await.unwrap()[0].dot;
    let other = store.write(n.clone(), vec![put("o", "1")]).await.unwrap()[0].dot;
    let check = |key: &'static str, condition: Condition, holds: bool| {
        let store = store.clone();
        let n = n.clone();
        async move {
            let result = store
                .write(n, vec![put(key, "x").with_condition(condition.clone())])
                .await;
            match result {
                Ok(_) => assert!(holds, "{condition:?} on {key} held"),
                Err(WriteError::ConditionFailed { .. }) => {
                    assert!(!holds, "{condition:?} on {key} failed")
                }
                Err(e) => panic!("{condition:?} on {key}: {e}"),
            }
        }
    };
    check("k", Condition::IfVersionIn(vec![other]), false).await;
    check("k", Condition::IfVersionIn(vec![]), false).await;
    check("absent", Condition::IfVersionIn(vec![v1]), false).await;
    check("k", Condition::IfVersionNotIn(vec![other, v1]), false).await;
    check("absent", Condition::IfVersionNotIn(vec![v1]), true).await;
    let both = |a, b| Condition::All(vec![a, b]);
    check("k", both(Condition::IfExists, Condition::IfAbsent), false).await;
    check(
        "k",
        both(
            Condition::IfVersionIn(vec![other, v1]),
            Condition::IfVersionNotIn(vec![other]),
        ),
        true,
    )
    .await;
    // k moved on: its first version no longer matches.
    check("k", Condition::IfVersionIn(vec![v1, other]), false).await;
}

/// A checkpoint comes first in its batch's transaction, names the dots the batch got,
/// and is refused when it is not a JSON object or shares the batch's namespace.
#[tokio::test]
async fn a_checkpoint_precedes_its_batch_and_names_its_dots() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .write(ns("data"), vec![put("before", "0")])
        .await
        .unwrap();
    let checkpoint = |value: &str, namespace: &str| asp_store::Checkpoint {
        namespace: ns(namespace),
        key: key("src"),
        value: Bytes::from(value.to_owned()),
    };
    let applied = store
        .write_with_checkpoint(
            ns("data"),
            vec![put("a", "1"), put("b", "2")],
            checkpoint(r#"{"position":"7"}"#, "positions"),
        )
        .await
        .unwrap();
    let record: serde_json::Value =
        serde_json::from_str(&text(&store, "positions", "src").unwrap()).unwrap();
    assert_eq!(record["position"], "7");
    assert_eq!(record["batch"]["namespace"], "data");
    assert_eq!(record["batch"]["origin"], store.node_id().to_string());
    assert_eq!(record["batch"]["first"], applied[0].dot.counter);
    assert_eq!(record["batch"]["count"], 2);
    assert_eq!(applied[1].dot.counter, applied[0].dot.counter + 1);
    let feed = whole_feed(&store);
    let keys: Vec<&str> = feed.iter().map(|e| e.event.key.as_str()).collect();
    assert_eq!(keys, ["before", "src", "a", "b"], "the checkpoint first");
    for (value, namespace) in [
        ("7", "positions"),
        ("not json", "positions"),
        ("{}", "data"),
    ] {
        let refused = store
            .write_with_checkpoint(
                ns("data"),
                vec![put("c", "3")],
                checkpoint(value, namespace),
            )
            .await;
        assert!(
            matches!(refused, Err(WriteError::Invalid(_))),
            "{value} in {namespace}: {refused:?}"
        );
    }
    assert!(text(&store, "data", "c").is_none());
}
