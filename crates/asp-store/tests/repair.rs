//! Reconciliation repairs ([`Store::enqueue_repair`]) against a store whose vector
//! already holds their dots: applied over an older entry, dropped over a newer one and
//! over a key whose delete was collected; the stream path still drops held dots.
//!
//! Regression (issue 11, item 1): a repair whose dot was held was dropped as a
//! duplicate, so two nodes holding the same dots in different states stayed different
//! for good, however often anti-entropy ran.

use std::time::{SystemTime, UNIX_EPOCH};

use asp_core::{ContentType, Dot, Event, Hlc, Key, Namespace, NodeId, Op, VersionVector};
use asp_store::{ApplyOutcome, Store, StoreConfig, WriteOp};
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

/// Deletes collectable at once (a lone node), small segments.
fn config(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.node_id = NodeId::new(ME);
    c.segment_bytes_max = 1 << 20;
    c.compaction_retention_ms = 0;
    c.tombstone_ttl_ms = Some(0);
    c.compaction_dead_ratio = 0.01;
    c
}

fn put(key: &str, value: &str) -> WriteOp {
    WriteOp::put(
        Key::new(key).unwrap(),
        ContentType::Text,
        Bytes::copy_from_slice(value.as_bytes()),
    )
}

fn event(key: &str, value: Option<&str>, origin: u64, counter: u64, hlc: Hlc) -> Event {
    Event {
        namespace: ns(),
        key: Key::new(key).unwrap(),
        op: match value {
            Some(v) => Op::Put {
                content_type: ContentType::Text,
                value: Bytes::copy_from_slice(v.as_bytes()),
            },
            None => Op::Delete,
        },
        dot: Dot {
            origin: id(origin),
            counter,
        },
        hlc,
        context: Bytes::new(),
        epoch: 0,
        expires_ms: 0,
    }
}

fn value(store: &Store, key: &str) -> Option<String> {
    store
        .get(&ns(), key)
        .unwrap()
        .and_then(|s| s.value)
        .map(|v| String::from_utf8(v.bytes.to_vec()).unwrap())
}

async fn repair(store: &Store, events: Vec<Event>) -> ApplyOutcome {
    store
        .enqueue_repair(events)
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap()
}

async fn stream(store: &Store, events: Vec<Event>) -> ApplyOutcome {
    store
        .enqueue_remote(events)
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_repair_of_a_held_dot_is_merged_by_version_and_never_revives_a_collected_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    // k: put (1:1). gone: put (1:2), delete (1:3), collected below.
    store.write(ns(), vec![put("k", "mine")]).await.unwrap();
    store.write(ns(), vec![put("gone", "old")]).await.unwrap();
    let gone_put = store
        .get(&ns(), "gone")
        .unwrap()
        .expect("just written")
        .version;
    store
        .write(ns(), vec![WriteOp::delete(Key::new("gone").unwrap())])
        .await
        .unwrap();
    // Enough writes to seal the segment holding the delete.
    for chunk in 0..2 {
        let ops = (0..600)
            .map(|i| put(&format!("filler{chunk}-{i}"), &"v".repeat(1000)))
            .collect();
        store.write(ns(), ops).await.unwrap();
    }
    let report = store.compact_async().await.unwrap();
    assert_eq!(report.tombstones_collected, 1, "{report:?}");
    assert!(store.get(&ns(), "gone").unwrap().is_none());

    // The peer's events 2:1 and 2:2 are covered here without being applied: this
    // node's vector holds them, its state does not.
    let mut covered = VersionVector::new();
    covered.insert_range(id(PEER), 1, 2);
    store.cover(ns(), covered).await.unwrap();
    let newer = Hlc::new(now_ms() + 1000, 0);
    let peer_k = event("k", Some("peer's"), PEER, 1, newer);

    // Through the stream a held dot is a duplicate, as ever.
    let out = stream(&store, vec![peer_k.clone()]).await;
    assert_eq!((out.applied, out.duplicates), (0, 1));
    assert_eq!(value(&store, "k").as_deref(), Some("mine"));

    // As a repair it is newer than k's entry: applied.
    let out = repair(&store, vec![peer_k.clone()]).await;
    assert_eq!((out.applied, out.duplicates), (1, 0));
    assert_eq!(value(&store, "k").as_deref(), Some("peer's"));
    // Again: now the entry is the same version, nothing to do.
    let out = repair(&store, vec![peer_k]).await;
    assert_eq!((out.applied, out.duplicates), (0, 1));

    // An older held event as a repair loses to the entry.
    let mine_k = event("k", Some("mine"), ME, 1, Hlc::new(1, 0));
    let out = repair(&store, vec![mine_k]).await;
    assert_eq!((out.applied, out.duplicates), (0, 1));
    assert_eq!(value(&store, "k").as_deref(), Some("peer's"));

    // A held event of a key whose delete was collected here is dropped: the key
    // stays gone. Whatever the event's clock: a key without an entry cannot tell a
    // newer event from one its collected delete superseded (the only kind a node can
    // hold when its vector tells the truth), so it takes neither.
    let old_gone = event("gone", Some("old"), ME, 2, gone_put.hlc);
    let peer_gone = event("gone", Some("peer's"), PEER, 2, newer);
    let out = repair(&store, vec![old_gone, peer_gone]).await;
    assert_eq!((out.applied, out.duplicates), (0, 2));
    assert!(store.get(&ns(), "gone").unwrap().is_none());

    // The same after a restart: the repaired key keeps its repair, the collected
    // key stays collected.
    store.shutdown().await;
    drop(store);
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(value(&store, "k").as_deref(), Some("peer's"));
    assert!(store.get(&ns(), "gone").unwrap().is_none());
    store.shutdown().await;
}
