//! A node whose log was damaged, salvaged, and linked to a peer that holds everything:
//! the records salvage could not keep come back from the peer.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use asp_core::{ContentType, Key, NodeId};
use asp_node::{ReplicationConfig, Replicator};
use asp_store::{Store, StoreConfig, WriteOp};
use bytes::Bytes;
use common::{converge, ns, state, vector};
use tokio_util::sync::CancellationToken;

fn store_config(dir: &std::path::Path, id: u64) -> StoreConfig {
    let mut sc = StoreConfig::new(dir);
    sc.node_id = NodeId::new(id);
    sc
}

fn replication(peers: Vec<String>) -> ReplicationConfig {
    let mut rc = ReplicationConfig::new("c");
    rc.listen = Some("127.0.0.1:0".parse().unwrap());
    rc.peers = peers;
    rc.heartbeat = Duration::from_millis(100);
    rc.backoff_min = Duration::from_millis(20);
    rc.backoff_max = Duration::from_millis(200);
    rc.summary_interval = Duration::from_millis(100);
    rc.anti_entropy_interval = Duration::from_millis(200);
    rc
}

async fn start(store: &Store, peers: Vec<String>) -> Replicator {
    Replicator::start(store.clone(), replication(peers), CancellationToken::new())
        .await
        .unwrap()
}

/// Guards the promise of `--salvage`: what it loses leaves the vectors, so peers send
/// it back, and the node ends up with every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_salvaged_node_gets_its_lost_records_back_from_a_peer() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(store_config(da.path(), 1)).unwrap();
    let b = Store::open(store_config(db.path(), 2)).unwrap();
    let ra = start(&a, vec![]).await;
    let rb = start(&b, vec![ra.listen_addr().unwrap().to_string()]).await;
    for i in 0..300 {
        let op = WriteOp::put(
            Key::new(&format!("k{i}")).unwrap(),
            ContentType::Text,
            Bytes::from(format!("v{i}")),
        );
        a.write(ns(), vec![op]).await.unwrap();
    }
    converge(&a, &b, "before the damage").await;
    ra.shutdown().await;
    rb.shutdown().await;
    a.shutdown().await;
    drop((ra, rb, a));

    let segment = da.path().join("log").join(format!("{:020}.log", 1));
    let len = std::fs::metadata(&segment).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segment)
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, len / 3).unwrap();
    f.write_all_at(&[byte[0] ^ 0x01], len / 3).unwrap();
    drop(f);

    let mut cfg = store_config(da.path(), 1);
    cfg.salvage = true;
    let mut tries = 0;
    let a = loop {
        match Store::open(cfg.clone()) {
            Ok(store) => break store,
            Err(asp_store::OpenError::Locked { .. }) if tries < 400 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(25)).await
            }
            Err(e) => panic!("salvage: {e}"),
        }
    };
    let lost = a.recovery().salvage.as_ref().unwrap().positions_lost();
    assert_eq!(lost, 1);
    assert_eq!(state(&a).len(), 299);
    assert_eq!(vector(&a).len(), 299, "the lost dot left the vector");
    let ra = start(&a, vec![]).await;
    let rb = start(&b, vec![ra.listen_addr().unwrap().to_string()]).await;
    converge(&a, &b, "after the salvage").await;
    assert_eq!(state(&a).len(), 300, "every key is back");
    ra.shutdown().await;
    rb.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}
