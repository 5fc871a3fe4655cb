//! A node never issues a counter twice: not after a crash that lost the end of its log,
//! not after its data directory went back to an older copy, not because a peer sent an
//! event of its own origin it never issued.

use std::path::Path;
use std::time::Duration;

use asp_core::session::{NamespaceSummary, VectorReport};
use asp_core::{ContentType, Dot, Event, Hlc, Key, Namespace, NodeId, Op, VersionVector};
use asp_store::{Store, StoreConfig, WriteError, WriteOp};
use bytes::Bytes;

const ME: u64 = 7;

fn ns() -> Namespace {
    Namespace::new("c").unwrap()
}

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.node_id = NodeId::new(ME);
    c
}

fn put(k: &str) -> WriteOp {
    WriteOp::put(
        Key::new(k).unwrap(),
        ContentType::Text,
        Bytes::from_static(b"v"),
    )
}

async fn write_one(store: &Store, k: &str) -> Dot {
    store.write(ns(), vec![put(k)]).await.unwrap()[0].dot
}

fn own_event(counter: u64, key: &str) -> Event {
    Event {
        namespace: ns(),
        key: Key::new(key).unwrap(),
        op: Op::Put {
            content_type: ContentType::Text,
            value: Bytes::from_static(b"from a peer"),
        },
        dot: Dot {
            origin: NodeId::new(ME).unwrap(),
            counter,
        },
        hlc: Hlc::new(1_000, 0),
        context: Bytes::new(),
        epoch: 0,
        expires_ms: 0,
    }
}

/// Copies a live store's files as a machine crash would find them on disk (the key
/// index left out: a crash can leave it anywhere, and it is rebuilt from the log).
fn crash_copy(from: &Path, to: &Path) {
    for entry in walk(from) {
        let rel = entry.strip_prefix(from).unwrap();
        if rel.starts_with("index") || rel == Path::new("LOCK") {
            continue;
        }
        let target = to.join(rel);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &target).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Regression: under fsync = never a crash lost the end of the log, and the node then
/// issued the lost events' counters again (peers, which held the lost events, dropped
/// the new ones as duplicates: a silent, permanent divergence).
#[tokio::test]
async fn counters_of_events_a_crash_lost_are_never_issued_again() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let crashed = dir.path().join("crashed");
    let mut c = config(&live);
    c.fsync = "never".parse().unwrap();
    let store = Store::open(c).unwrap();
    let mut issued = 0;
    for i in 0..200 {
        issued = issued.max(write_one(&store, &format!("k{i}")).await.counter);
    }
    assert_eq!(issued, 200);
    crash_copy(&live, &crashed);
    // The crash lost the unsynced end of the log: cut it in the middle of a record.
    let log = walk(&crashed.join("log"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap();
    let len = std::fs::metadata(&log).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    f.set_len(len * 2 / 3 + 7).unwrap();
    drop(f);

    let mut c = config(&crashed);
    c.fsync = "never".parse().unwrap();
    let reopened = Store::open(c).unwrap();
    let held = reopened.summary()[0]
        .vector
        .max_counter(NodeId::new(ME).unwrap());
    assert!(held < 200, "the cut lost events (holds up to {held})");
    let next = write_one(&reopened, "after").await;
    assert!(
        next.counter > issued,
        "counter {} was issued before the crash (up to {issued})",
        next.counter
    );
    // The lost events are this node's own: when a peer sends them back, they are taken.
    let outcome = reopened
        .apply_remote(vec![own_event(held + 1, "lost")])
        .await
        .unwrap();
    assert_eq!(outcome.applied, 1);
    drop(store);
}

fn never(dir: &Path) -> StoreConfig {
    let mut c = config(dir);
    c.fsync = "never".parse().unwrap();
    c
}

#[tokio::test]
async fn a_clean_restart_goes_on_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(never(dir.path())).unwrap();
    for i in 0..10 {
        write_one(&store, &format!("k{i}")).await;
    }
    store.shutdown().await;
    drop(store);
    let store = Store::open(never(dir.path())).unwrap();
    assert_eq!(write_one(&store, "next").await.counter, 11);
}

/// Under `fsync = "always"` nobody sees a counter before the log holding it is
/// durable, so a crash takes back only counters nobody saw: no gap.
#[tokio::test]
async fn under_fsync_always_a_crash_leaves_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let crashed = dir.path().join("crashed");
    let store = Store::open(config(&live)).unwrap();
    for i in 0..10 {
        write_one(&store, &format!("k{i}")).await;
    }
    crash_copy(&live, &crashed);
    let reopened = Store::open(config(&crashed)).unwrap();
    assert_eq!(write_one(&reopened, "next").await.counter, 11);
    drop(store);
}

/// Regression: an event from a peer that carried this node's own origin with a counter
/// it never issued moved its next counter (and at `u64::MAX` the next write overflowed).
#[tokio::test]
async fn a_peer_event_with_this_nodes_origin_and_a_counter_it_never_issued_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    write_one(&store, "a").await;
    for counter in [2, 1_000, u64::MAX] {
        let err = store
            .apply_remote(vec![own_event(counter, "forged")])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, WriteError::InvalidEvent { reason: "own_origin", message } if message.contains("never issued")),
            "{err}"
        );
    }
    assert!(store.get(&ns(), "forged").unwrap().is_none());
    assert_eq!(write_one(&store, "b").await.counter, 2);
    // Its own event it did issue is a duplicate, as any held dot.
    let outcome = store.apply_remote(vec![own_event(1, "a")]).await.unwrap();
    assert_eq!(outcome.duplicates, 1);
}

fn summary_holding(counter: u64) -> Vec<NamespaceSummary> {
    let mut vector = VersionVector::new();
    vector.insert_range(NodeId::new(ME).unwrap(), 1, counter);
    let peer = NodeId::new(99).unwrap();
    vector.insert_range(peer, 1, 3);
    vec![NamespaceSummary {
        namespace: ns(),
        max_hlc: Hlc::new(1_000, 0),
        vector: vector.clone(),
        digest: None,
        reports: vec![VectorReport {
            node: peer,
            at_ms: 1,
            vector,
        }],
    }]
}

/// Regression: a node whose data directory went back to an older copy (a backup
/// restored) issued again the counters of the events it wrote after the copy, which
/// its peers hold: they dropped its new writes, and it never got the old ones back.
#[tokio::test]
async fn a_restored_node_learns_what_peers_hold_of_it_before_it_issues_counters() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.own_events_wait = Duration::from_secs(30);
    let store = Store::open(c.clone()).unwrap();
    for i in 0..10 {
        write_one(&store, &format!("k{i}")).await;
    }
    // It has had a peer.
    store.save_checkpoint(NodeId::new(99).unwrap(), 0).unwrap();
    store.shutdown().await;
    drop(store);

    // Restarted (say, from a copy taken back then): a local write waits for a peer.
    let store = Store::open(c).unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { write_one(&store, "new").await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !writer.is_finished(),
        "the write waits for a peer's summary"
    );
    // The peer holds this node's events up to 25: ten of them are news to it.
    store.note_reports(&summary_holding(25));
    let dot = writer.await.unwrap();
    assert_eq!(dot.counter, 26);
    let found = store.own_events_found();
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].known, found[0].held_by_peers), (10, 25));
    // Those events are this node's own: taken when they come back.
    let outcome = store
        .apply_remote(vec![own_event(15, "from-before")])
        .await
        .unwrap();
    assert_eq!(outcome.applied, 1);
    // The raised floor is durable.
    store.shutdown().await;
    drop(store);
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(write_one(&store, "later").await.counter, 27);
}

#[tokio::test]
async fn a_node_without_peers_never_waits_and_one_that_hears_none_waits_only_so_long() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.own_events_wait = Duration::from_millis(300);
    let store = Store::open(c.clone()).unwrap();
    // Never had a peer: no wait at all (the deadline would show as a timeout here).
    tokio::time::timeout(Duration::from_millis(250), write_one(&store, "a"))
        .await
        .expect("no wait without peers");
    store.save_checkpoint(NodeId::new(99).unwrap(), 0).unwrap();
    store.shutdown().await;
    drop(store);
    let store = Store::open(c).unwrap();
    // No peer answers: the write goes on once the wait runs out.
    let dot = tokio::time::timeout(Duration::from_secs(20), write_one(&store, "b"))
        .await
        .expect("the wait for peers is bounded");
    assert_eq!(dot.counter, 2);
}

#[tokio::test]
async fn a_damaged_counters_file_makes_counters_jump_past_a_safety_gap() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(never(dir.path())).unwrap();
    for i in 0..5 {
        write_one(&store, &format!("k{i}")).await;
    }
    store.shutdown().await;
    drop(store);
    let path = dir.path().join("counters");
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 12 + 8, "holds a record");
    // Damage the first record's body, then append a whole record after it.
    let record = bytes[12..].to_vec();
    bytes[12 + 9] ^= 0xff;
    bytes.extend_from_slice(&record);
    std::fs::write(&path, &bytes).unwrap();
    let store = Store::open(never(dir.path())).unwrap();
    let next = write_one(&store, "after").await.counter;
    assert!(next > 1 << 32, "jumped past the gap: {next}");
    // A torn last record is only cut.
    store.shutdown().await;
    drop(store);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[9, 0, 0]);
    std::fs::write(&path, &bytes).unwrap();
    let store = Store::open(never(dir.path())).unwrap();
    assert_eq!(write_one(&store, "again").await.counter, next + 1);
}
