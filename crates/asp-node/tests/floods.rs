//! Floods of namespaces between in-process nodes over real loopback TCP: a summary of
//! more namespaces than one frame holds goes in parts, and the link stays up.

use std::time::{Duration, Instant};

use asp_core::{ContentType, Key, Namespace, NodeId};
use asp_node::{ReplicationConfig, Replicator};
use asp_store::{FsyncMode, Store, StoreConfig, WriteOp};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

struct TestNode {
    store: Store,
    replicator: Replicator,
    _dir: tempfile::TempDir,
}

async fn node(id: u64, peers: Vec<String>, version_max: u16) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let mut sc = StoreConfig::new(dir.path());
    sc.node_id = NodeId::new(id);
    sc.fsync = FsyncMode::Never;
    let store = Store::open(sc).unwrap();
    let mut rc = ReplicationConfig::new("floods");
    rc.listen = Some("127.0.0.1:0".parse().unwrap());
    rc.peers = peers;
    rc.backoff_min = Duration::from_millis(20);
    rc.backoff_max = Duration::from_millis(200);
    rc.version_max = version_max;
    let replicator = Replicator::start(store.clone(), rc, CancellationToken::new())
        .await
        .unwrap();
    TestNode {
        store,
        replicator,
        _dir: dir,
    }
}

fn namespace(i: usize) -> Namespace {
    Namespace::new(&format!("n{i:06}")).unwrap()
}

/// One write in each of `count` namespaces.
async fn flood(store: &Store, count: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in 0..8 {
        let store = store.clone();
        tasks.spawn(async move {
            for i in (chunk..count).step_by(8) {
                let op = WriteOp::put(
                    Key::new("k").unwrap(),
                    ContentType::Text,
                    Bytes::from(format!("{i}")),
                );
                store.write(namespace(i), vec![op]).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// Waits (bounded) until `b` holds every namespace of `a` with the same vector.
async fn converge(a: &TestNode, b: &TestNode, count: usize, what: &str) {
    let started = Instant::now();
    loop {
        let (sa, sb) = (a.store.summary(), b.store.summary());
        let same = sa.len() == count
            && sb.len() == count
            && sa
                .iter()
                .zip(&sb)
                .all(|(x, y)| x.namespace == y.namespace && x.vector == y.vector);
        if same {
            return;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let peers = b.replicator.status().peers;
            panic!(
                "{what}: {} of {count} namespaces on a, {} on b after {:?}; b's links: {peers:?}",
                sa.len(),
                sb.len(),
                started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Guards against a summary of more than 4,096 namespaces failing to encode, which
/// closed every link and redialled forever: a new peer never converged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_namespaces_replicate_to_a_new_peer() {
    let count: usize = std::env::var("ASP_FLOOD_NAMESPACES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let a = node(1, vec![], asp_core::session::PROTOCOL_VERSION_MAX).await;
    let started = Instant::now();
    flood(&a.store, count).await;
    println!("{count} namespaces written in {:?}", started.elapsed());
    let started = Instant::now();
    let b = node(2, vec![a.addr()], asp_core::session::PROTOCOL_VERSION_MAX).await;
    converge(&a, &b, count, "new peer").await;
    println!("a new peer converged in {:?}", started.elapsed());
    // The link stayed up: one link each way was ever made, none closed with an error.
    let status = b.replicator.status();
    assert_eq!(status.peers.len(), 1, "{:?}", status.peers);
    assert_eq!(status.peers[0].last_error, None, "{:?}", status.peers);
    // The peer's summary arrived whole: it lists every namespace.
    for n in [&a, &b] {
        let peer = &n.replicator.status().peers[0];
        assert_eq!(
            peer.namespaces.len(),
            count,
            "namespaces in the peer's summary"
        );
    }
    for n in [a, b] {
        n.stop().await;
    }
}

/// A peer that speaks only protocol version 1 (no summary parts) gets the first part
/// of the summary; the link stays up and every event still reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_one_peer_gets_one_part_and_every_event() {
    let count = 5_000;
    let a = node(1, vec![], asp_core::session::PROTOCOL_VERSION_MAX).await;
    flood(&a.store, count).await;
    let b = node(2, vec![a.addr()], 1).await;
    converge(&a, &b, count, "version 1 peer").await;
    let status = b.replicator.status();
    assert_eq!(status.peers.len(), 1, "{:?}", status.peers);
    assert_eq!(status.peers[0].last_error, None, "{:?}", status.peers);
    for n in [a, b] {
        n.stop().await;
    }
}

impl TestNode {
    fn addr(&self) -> String {
        self.replicator.listen_addr().unwrap().to_string()
    }

    async fn stop(self) {
        self.replicator.shutdown().await;
        self.store.shutdown().await;
    }
}
