//! Tombstone collection between in-process nodes over real loopback TCP: deletes are
//! collected once both nodes hold them; a node cut off past the horizon stops holding
//! collection back, and when it returns it brings back no deleted key and keeps the
//! writes it made while away.

mod common;

use std::time::{Duration, Instant};

use asp_core::{ContentType, Key, NodeId};
use asp_node::{ReplicationConfig, Replicator};
use asp_store::{CompactionReport, Store, StoreConfig, WriteOp};
use bytes::Bytes;
use common::{converge, ns, vector};
use tokio_util::sync::CancellationToken;

const HORIZON_MS: u64 = 1500;

fn store_config(dir: &std::path::Path, id: u64) -> StoreConfig {
    let mut sc = StoreConfig::new(dir);
    sc.node_id = NodeId::new(id);
    sc.segment_bytes_max = 1 << 20;
    sc.compaction_retention_ms = 0;
    sc.compaction_dead_ratio = 0.01;
    sc.tombstone_ttl_ms = Some(0);
    sc.gc_horizon_ms = HORIZON_MS;
    sc
}

async fn start(store: &Store, peers: Vec<String>) -> Replicator {
    let mut rc = ReplicationConfig::new("c");
    rc.listen = Some("127.0.0.1:0".parse().unwrap());
    rc.peers = peers;
    rc.heartbeat = Duration::from_millis(100);
    rc.backoff_min = Duration::from_millis(20);
    rc.backoff_max = Duration::from_millis(200);
    rc.summary_interval = Duration::from_millis(100);
    rc.anti_entropy_interval = Duration::from_millis(200);
    Replicator::start(store.clone(), rc, CancellationToken::new())
        .await
        .unwrap()
}

async fn write(store: &Store, ops: Vec<WriteOp>) {
    for chunk in ops.chunks(1000) {
        store.write(ns(), chunk.to_vec()).await.unwrap();
    }
}

fn put(key: &str, value: &str) -> WriteOp {
    WriteOp::put(
        Key::new(key).unwrap(),
        ContentType::Text,
        Bytes::copy_from_slice(value.as_bytes()),
    )
}

fn del(key: &str) -> WriteOp {
    WriteOp::delete(Key::new(key).unwrap())
}

/// About 1.2 MB of writes: seals the segment holding what came before.
async fn seal(store: &Store, tag: &str) {
    let value = "f".repeat(1000);
    write(
        store,
        (0..1200)
            .map(|i| put(&format!("fill-{tag}-{i}"), &value))
            .collect(),
    )
    .await;
}

async fn compact(store: &Store) -> CompactionReport {
    store.compact_async().await.unwrap()
}

fn value(store: &Store, key: &str) -> Option<String> {
    let state = store.get(&ns(), key).unwrap()?;
    state
        .value
        .map(|v| String::from_utf8(v.bytes.to_vec()).unwrap())
}

/// Waits (bounded) until `store` may collect every delete it holds: the other
/// node's report of holding them has arrived.
async fn wait_stable(store: &Store, what: &str) {
    for _ in 0..500 {
        let gc = store.tombstone_gc().remove(&ns()).unwrap();
        if vector(store).is_subset(&gc.stable) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: {:?}", store.tombstone_gc().get(&ns()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_the_horizon_resurrects_nothing_and_keeps_its_writes() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(store_config(da.path(), 1)).unwrap();
    let b = Store::open(store_config(db.path(), 2)).unwrap();
    let ra = start(&a, vec![]).await;
    let peer_a = ra.listen_addr().unwrap().to_string();
    let rb = start(&b, vec![peer_a.clone()]).await;
    let first = "v".repeat(200);
    write(
        &a,
        (0..1000).map(|i| put(&format!("k{i}"), &first)).collect(),
    )
    .await;
    converge(&a, &b, "first writes").await;

    // Both nodes up: deletes go once both hold them, and the log shrinks.
    write(&a, (0..300).map(|i| del(&format!("k{i}"))).collect()).await;
    seal(&a, "a1").await;
    converge(&a, &b, "first deletes").await;
    wait_stable(&a, "a waits for b's report").await;
    let before = a.status().log_bytes;
    let report = compact(&a).await;
    assert_eq!(report.tombstones_collected, 300, "{report:?}");
    assert_eq!(report.epitaphs_left, 0);
    let after = a.status().log_bytes;
    assert!(after < before, "log bytes {before} -> {after}");
    assert!(a.get(&ns(), "k0").unwrap().is_none());
    wait_stable(&b, "b waits for a's report").await;
    assert_eq!(compact(&b).await.tombstones_collected, 300);
    converge(&a, &b, "after the first collection").await;

    // B is cut off. It writes k700 before A deletes it (so the delete wins) and k800
    // after (so its write wins), plus keys of its own.
    rb.shutdown().await;
    drop(rb);
    write(&b, vec![put("k700", "b, early")]).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut deletes: Vec<WriteOp> = (300..400).map(|i| del(&format!("k{i}"))).collect();
    deletes.extend([del("k700"), del("k800")]);
    write(&a, deletes).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    write(&b, vec![put("k800", "b, late")]).await;
    write(
        &b,
        (0..100).map(|i| put(&format!("away{i}"), "b")).collect(),
    )
    .await;

    // Past the horizon, A collects without B and leaves epitaphs.
    tokio::time::sleep(Duration::from_millis(HORIZON_MS + 500)).await;
    seal(&a, "a2").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let gc = a.tombstone_gc().remove(&ns()).unwrap();
        if gc.away == vec![NodeId::new(2).unwrap()] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A never counted B as away: {gc:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = compact(&a).await;
    assert_eq!(report.tombstones_collected, 102, "{report:?}");
    assert_eq!(report.epitaphs_left, 102);

    // B returns: the feed no longer holds A's deletes; reconciliation brings them.
    let rb = start(&b, vec![peer_a.clone()]).await;
    converge(&a, &b, "after B returned").await;
    for store in [&a, &b] {
        for i in (0..400).chain([700]) {
            assert_eq!(value(store, &format!("k{i}")), None, "k{i}");
        }
        assert_eq!(value(store, "k800").as_deref(), Some("b, late"));
        assert_eq!(value(store, "k900").as_deref(), Some(first.as_str()));
        for i in 0..100 {
            assert_eq!(value(store, &format!("away{i}")).as_deref(), Some("b"));
        }
    }
    assert!(ra.status().peers[0].reconcile.handovers >= 1);

    // With B back and holding the deletes, A's epitaphs go (k800's was overwritten).
    let mut dropped = 0;
    for _ in 0..200 {
        dropped += compact(&a).await.epitaphs_dropped;
        if dropped >= 101 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(dropped, 101);
    // B collects its copies of the deletes too; both end equal, nothing came back.
    seal(&b, "b1").await;
    wait_stable(&b, "b waits for a's report again").await;
    assert_eq!(compact(&b).await.tombstones_collected, 101);
    converge(&a, &b, "after the epitaphs went").await;
    for store in [&a, &b] {
        for i in (0..400).chain([700]) {
            assert!(
                store.get(&ns(), &format!("k{i}")).unwrap().is_none(),
                "k{i}"
            );
        }
        assert_eq!(value(store, "k800").as_deref(), Some("b, late"));
    }
    ra.shutdown().await;
    rb.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}
