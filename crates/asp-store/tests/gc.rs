//! Tombstone collection: deletes leave the log (and the key index) once every known
//! node holds them and they are older than the TTL; a node silent past the horizon is
//! left out and collection then leaves epitaphs; no late or duplicated event brings a
//! deleted key back.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use asp_core::session::{NamespaceSummary, VectorReport};
use asp_core::{ContentType, Dot, Event, Hlc, Key, Namespace, NodeId, Op, VersionVector};
use asp_store::{CompactionReport, Store, StoreConfig, WriteOp};
use bytes::Bytes;

const ME: u64 = 1;
const PEER: u64 = 2;

fn ns() -> Namespace {
    Namespace::new("t").unwrap()
}

fn id(n: u64) -> NodeId {
    NodeId::new(n).unwrap()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Small segments, no retention, deletes collectable at once, a 2 s horizon.
fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.node_id = NodeId::new(ME);
    c.segment_bytes_max = 1 << 20;
    c.compaction_retention_ms = 0;
    c.tombstone_ttl_ms = Some(0);
    c.gc_horizon_ms = 2_000;
    // Compact segments with any dead records: collected deletes among live filler.
    c.compaction_dead_ratio = 0.01;
    c
}

async fn compact(store: &Store) -> CompactionReport {
    store.compact_async().await.unwrap()
}

async fn put_range(store: &Store, prefix: &str, n: usize, value_len: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let ops = chunk
            .iter()
            .map(|i| {
                let mut v = format!("{prefix}{i}:").into_bytes();
                v.resize(value_len, b'v');
                WriteOp::put(
                    Key::new(&format!("{prefix}{i}")).unwrap(),
                    ContentType::Text,
                    Bytes::from(v),
                )
            })
            .collect();
        store.write(ns(), ops).await.unwrap();
    }
}

async fn delete_range(store: &Store, prefix: &str, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let ops = chunk
            .iter()
            .map(|i| WriteOp::delete(Key::new(&format!("{prefix}{i}")).unwrap()))
            .collect();
        store.write(ns(), ops).await.unwrap();
    }
}

/// Enough writes to seal the segment holding everything before them.
async fn seal(store: &Store) {
    put_range(store, "filler", 1200, 1000).await;
}

fn vector(store: &Store) -> VersionVector {
    store
        .summary()
        .into_iter()
        .find(|s| s.namespace == ns())
        .map(|s| s.vector)
        .unwrap_or_default()
}

/// The peer's summary as it would arrive: its own report of `vector` at `at_ms`.
fn peer_report(vector: VersionVector, at_ms: u64) -> Vec<NamespaceSummary> {
    vec![NamespaceSummary {
        namespace: ns(),
        max_hlc: Hlc::ZERO,
        vector: vector.clone(),
        digest: None,
        reports: vec![VectorReport {
            node: id(PEER),
            at_ms,
            vector,
        }],
    }]
}

fn peer_put(key: &str, counter: u64, hlc: Hlc) -> Event {
    Event {
        namespace: ns(),
        key: Key::new(key).unwrap(),
        op: Op::Put {
            content_type: ContentType::Text,
            value: Bytes::from_static(b"from the peer"),
        },
        dot: Dot {
            origin: id(PEER),
            counter,
        },
        hlc,
        context: Bytes::new(),
        epoch: 0,
        expires_ms: 0,
    }
}

fn value(store: &Store, key: &str) -> Option<Vec<u8>> {
    store
        .get(&ns(), key)
        .unwrap()
        .and_then(|s| s.value)
        .map(|v| v.bytes.to_vec())
}

/// The events that set the namespace's keys (values and deletes).
fn state_len(store: &Store) -> usize {
    store
        .state_events(&ns(), None, usize::MAX, usize::MAX)
        .unwrap()
        .0
        .len()
}

#[tokio::test]
async fn a_lone_node_collects_its_deletes_and_the_log_shrinks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    put_range(&store, "k", 10_000, 200).await;
    delete_range(&store, "k", 10_000).await;
    seal(&store).await;
    let held = vector(&store);
    let before = store.status().log_bytes;
    let report = compact(&store).await;
    assert_eq!(report.tombstones_collected, 10_000, "{report:?}");
    assert_eq!(report.epitaphs_left, 0);
    let after = store.status().log_bytes;
    // 10,000 puts of 200 bytes and their deletes went (the filler stays).
    assert!(
        before - after > 10_000 * 200,
        "log bytes {before} -> {after}"
    );
    // Gone from the index too: only the filler is left, and nothing reads back.
    assert_eq!(state_len(&store), 1200);
    assert_eq!(value(&store, "k7"), None);
    assert!(store.get(&ns(), "k7").unwrap().is_none());
    // The node still holds every dot it ever wrote.
    assert_eq!(vector(&store), held);
    // A duplicate of an old put (a late copy from a peer's feed) is refused by dot.
    let stale = Event {
        dot: Dot {
            origin: id(ME),
            counter: 7,
        },
        ..peer_put("k6", 1, Hlc::new(1, 0))
    };
    let outcome = store.apply_remote(vec![stale]).await.unwrap();
    assert_eq!((outcome.applied, outcome.duplicates), (0, 1));
    assert_eq!(value(&store, "k6"), None);
    // The same after a restart.
    store.shutdown().await;
    drop(store);
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(state_len(&store), 1200);
    assert_eq!(vector(&store), held);
    assert_eq!(compact(&store).await.tombstones_collected, 0);
    store.shutdown().await;
}

#[tokio::test]
async fn deletes_wait_for_every_known_node_and_for_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.tombstone_ttl_ms = Some(60_000);
    let store = Store::open(c).unwrap();
    put_range(&store, "k", 100, 100).await;
    delete_range(&store, "k", 100).await;
    seal(&store).await;
    // Younger than the TTL: kept, carried forward.
    let report = compact(&store).await;
    assert_eq!(report.tombstones_collected, 0, "{report:?}");
    store.shutdown().await;
    drop(store);

    let store = Store::open(config(dir.path())).unwrap();
    // The peer has written an event this node has not received: a put of k5 made
    // before the peer saw the delete (an older clock), which must lose to it.
    let late = peer_put("k5", 1, Hlc::new(now_ms() - 10_000, 0));
    let mut peer_vector = vector(&store);
    peer_vector.insert(late.dot);
    store.note_reports(&peer_report(peer_vector.clone(), now_ms()));
    let gc = store.tombstone_gc().remove(&ns()).unwrap();
    assert!(gc.stable.is_empty(), "{gc:?}");
    assert_eq!(gc.waiting, vec![id(PEER)]);
    let report = compact(&store).await;
    assert_eq!(report.tombstones_collected, 0, "{report:?}");
    // The late event arrives: it loses to the delete this node still holds ...
    let outcome = store.apply_remote(vec![late.clone()]).await.unwrap();
    assert_eq!(outcome.applied, 1);
    assert_eq!(value(&store, "k5"), None);
    // ... and now the peer's report is one this node holds: the deletes go.
    seal(&store).await;
    let report = compact(&store).await;
    assert_eq!(report.tombstones_collected, 100, "{report:?}");
    assert_eq!(report.epitaphs_left, 0);
    // Another copy of the late event is a duplicate: nothing comes back.
    let outcome = store.apply_remote(vec![late]).await.unwrap();
    assert_eq!(outcome.duplicates, 1);
    assert_eq!(value(&store, "k5"), None);
    assert!(store.get(&ns(), "k5").unwrap().is_none());
    store.shutdown().await;
}

#[tokio::test]
async fn a_node_away_past_the_horizon_leaves_epitaphs_that_hold_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    put_range(&store, "k", 100, 100).await;
    // The peer was last heard of long ago, holding the puts.
    store.note_reports(&peer_report(vector(&store), now_ms() - 60_000));
    delete_range(&store, "k", 100).await;
    let deleted_at = store.get(&ns(), "k3").unwrap().unwrap().version;
    seal(&store).await;
    let gc = store.tombstone_gc().remove(&ns()).unwrap();
    assert_eq!(gc.away, vec![id(PEER)]);
    let report = compact(&store).await;
    assert_eq!(report.tombstones_collected, 100, "{report:?}");
    assert_eq!(report.epitaphs_left, 100);
    // The deletes left the log but not the node: they read as deleted, with their
    // versions, and are still sent to peers (made again from the epitaphs).
    let state = store.get(&ns(), "k3").unwrap().unwrap();
    assert_eq!((state.version, state.value.is_none()), (deleted_at, true));
    let events = store
        .state_events(&ns(), None, usize::MAX, usize::MAX)
        .unwrap()
        .0;
    let k3 = events.iter().find(|e| e.key.as_str() == "k3").unwrap();
    assert_eq!((k3.op.clone(), k3.version()), (Op::Delete, deleted_at));

    // The peer comes back with what it wrote while away: a put of k3 from before it
    // could know of the delete (older) loses; a put of k4 made after it wins.
    let older = peer_put("k3", 1, Hlc::new(deleted_at.hlc.physical_ms() - 1, 0));
    let newer = peer_put("k4", 2, Hlc::new(now_ms() + 5, 0));
    let outcome = store.apply_remote(vec![older, newer]).await.unwrap();
    assert_eq!(outcome.applied, 2);
    assert_eq!(value(&store, "k3"), None);
    assert_eq!(value(&store, "k4").as_deref(), Some(&b"from the peer"[..]));

    // Epitaphs survive a restart.
    store.shutdown().await;
    drop(store);
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(value(&store, "k3"), None);
    assert_eq!(store.get(&ns(), "k3").unwrap().unwrap().version, deleted_at);

    // Once the peer reports holding the deletes (and this node holds its writes),
    // the epitaphs go: all but k4's, which was written again.
    store.note_reports(&peer_report(vector(&store), now_ms()));
    let report = compact(&store).await;
    assert_eq!(report.epitaphs_dropped, 99, "{report:?}");
    assert!(store.get(&ns(), "k3").unwrap().is_none());
    assert_eq!(value(&store, "k4").as_deref(), Some(&b"from the peer"[..]));
    assert_eq!(compact(&store).await.epitaphs_dropped, 0);
    store.shutdown().await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[tokio::test]
async fn epitaphs_survive_an_index_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let saved = tempfile::tempdir().unwrap();
    let deleted_at = {
        let store = Store::open(config(dir.path())).unwrap();
        put_range(&store, "k", 100, 100).await;
        store.note_reports(&peer_report(vector(&store), now_ms() - 60_000));
        delete_range(&store, "k", 100).await;
        seal(&store).await;
        assert_eq!(compact(&store).await.epitaphs_left, 100);
        let deleted_at = store.get(&ns(), "k3").unwrap().unwrap().version;
        store.shutdown().await;
        deleted_at
    };
    copy_dir(&dir.path().join("log"), saved.path());
    {
        // Writes the log then loses (as a crash under fsync = "never" could): the
        // index is ahead of the log and is rebuilt from it.
        let store = Store::open(config(dir.path())).unwrap();
        put_range(&store, "later", 10, 10).await;
        store.shutdown().await;
    }
    std::fs::remove_dir_all(dir.path().join("log")).unwrap();
    copy_dir(saved.path(), &dir.path().join("log"));
    let store = Store::open(config(dir.path())).unwrap();
    assert!(store.recovery().index_rebuilt);
    // The log holds neither the puts (superseded) nor the deletes (collected): only
    // the epitaphs say the keys were deleted, and when.
    let k3 = store
        .get(&ns(), "k3")
        .unwrap()
        .expect("the epitaph is back");
    assert_eq!((k3.version, k3.value), (deleted_at, None));
    let older = peer_put("k3", 1, Hlc::new(deleted_at.hlc.physical_ms() - 1, 0));
    store.apply_remote(vec![older]).await.unwrap();
    assert_eq!(value(&store, "k3"), None);
    store.shutdown().await;
}

fn digest(store: &Store) -> Option<asp_core::reconcile::Symbol> {
    store
        .summary()
        .into_iter()
        .find(|s| s.namespace == ns())
        .and_then(|s| s.digest)
}

#[tokio::test]
async fn deletes_in_the_active_segment_leave_the_index_and_the_digest_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    put_range(&store, "k", 100, 10).await;
    delete_range(&store, "k", 50).await;
    let report = compact(&store).await;
    assert_eq!(report.tombstones_collected, 50, "{report:?}");
    assert_eq!(report.segments_removed, 0);
    assert!(store.get(&ns(), "k3").unwrap().is_none());
    assert_eq!(state_len(&store), 50);
    // The reconciliation window dropped the deletes' items: it equals the one built
    // from the index when the store opens again.
    let kept = digest(&store);
    assert!(kept.is_some());
    store.shutdown().await;
    drop(store);
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(digest(&store), kept);
    assert!(store.get(&ns(), "k3").unwrap().is_none());
    // Their records go with their segment, later.
    seal(&store).await;
    let report = compact(&store).await;
    assert_eq!(report.tombstones_collected, 0, "{report:?}");
    assert_eq!(
        report.records_dropped, 100,
        "50 puts and 50 deletes: {report:?}"
    );
    assert!(store.get(&ns(), "k3").unwrap().is_none());
    assert_eq!(
        value(&store, "k60").as_deref().map(|v| &v[..4]),
        Some(&b"k60:"[..])
    );
    store.shutdown().await;
}
