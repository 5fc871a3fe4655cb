//! The node's schedules: compaction and scrub run on their own, again and again, and
//! stop when the node shuts down.

mod common;

use std::time::{Duration, Instant};

use asp_core::{ContentType, Key};
use asp_store::{FsyncMode, Store, StoreConfig, WriteOp};
use bytes::Bytes;
use common::ns;
use tokio_util::sync::CancellationToken;

/// Waits (bounded) until `done` holds.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_compacts_superseded_segments_until_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::new(dir.path());
    config.fsync = FsyncMode::Never;
    config.segment_bytes_max = 1 << 20;
    config.compaction_retention_ms = 0;
    config.compaction_dead_ratio = 0.01;
    let store = Store::open(config).unwrap();
    // Every key written twice: the first round's segments hold only superseded events.
    let value = Bytes::from(vec![7u8; 1000]);
    for _round in 0..2 {
        for chunk in 0..4u64 {
            let ops = (0..1000)
                .map(|i| {
                    let key = Key::new(&format!("k{}", chunk * 1000 + i)).unwrap();
                    WriteOp::put(key, ContentType::OctetStream, value.clone())
                })
                .collect();
            store.write(ns(), ops).await.unwrap();
        }
    }

    let shutdown = CancellationToken::new();
    let schedule = tokio::spawn(asp_node::run_compaction_schedule(
        store.clone(),
        Duration::from_millis(20),
        shutdown.clone(),
    ));
    let metrics = store.metrics();
    wait_until("two scheduled runs", || metrics.compaction_runs.get() >= 2).await;
    assert!(metrics.compaction_segments_removed.get() > 0);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), schedule)
        .await
        .expect("the schedule ends on shutdown")
        .unwrap();
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_scrubs_until_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig::new(dir.path())).unwrap();
    let op = WriteOp::put(
        Key::new("k").unwrap(),
        ContentType::Text,
        Bytes::from_static(b"v"),
    );
    store.write(ns(), vec![op]).await.unwrap();
    let shutdown = CancellationToken::new();
    let schedule = tokio::spawn(asp_node::run_scrub_schedule(
        store.clone(),
        Duration::from_millis(20),
        shutdown.clone(),
    ));
    let metrics = store.metrics();
    wait_until("two scheduled scrubs", || metrics.scrub_runs.get() >= 2).await;
    assert_eq!(metrics.scrub_damage.get(), 0);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), schedule)
        .await
        .expect("the schedule ends on shutdown")
        .unwrap();
    store.shutdown().await;
}
