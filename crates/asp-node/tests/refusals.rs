//! A peer's batch with an event that breaks a rule is refused whole, with an Error
//! frame that names the rule, counted per peer and reason in status and metrics.

use std::time::{Duration, Instant};

use asp_core::{ContentType, Key, Namespace, NodeId};
use asp_node::{ReplicationConfig, Replicator};
use asp_store::{Store, StoreConfig, WriteOp};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

async fn node(
    id: u64,
    value_bytes_max: usize,
    peers: Vec<String>,
) -> (Store, Replicator, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut sc = StoreConfig::new(dir.path());
    sc.node_id = NodeId::new(id);
    sc.value_bytes_max = value_bytes_max;
    let store = Store::open(sc).unwrap();
    let mut rc = ReplicationConfig::new("c");
    rc.listen = Some("127.0.0.1:0".parse().unwrap());
    rc.peers = peers;
    rc.heartbeat = Duration::from_millis(100);
    rc.idle_timeout = Duration::from_millis(2000);
    rc.backoff_min = Duration::from_millis(20);
    rc.backoff_max = Duration::from_millis(200);
    rc.summary_interval = Duration::from_millis(100);
    let replicator = Replicator::start(store.clone(), rc, CancellationToken::new())
        .await
        .unwrap();
    (store, replicator, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_over_the_receivers_limit_is_refused_by_name_and_counted() {
    // Guards against events from peers skipping the limits local writes are held to.
    let (a, ra, _da) = node(1, 4 << 20, vec![]).await;
    let (b, rb, _db) = node(2, 1 << 20, vec![ra.listen_addr().unwrap().to_string()]).await;
    let ns = Namespace::new("t").unwrap();
    let put = |k: &str, len: usize| {
        WriteOp::put(
            Key::new(k).unwrap(),
            ContentType::OctetStream,
            Bytes::from(vec![7; len]),
        )
    };
    a.write(ns.clone(), vec![put("big", 2 << 20)])
        .await
        .unwrap();

    let started = Instant::now();
    let refused = loop {
        let status = rb.status();
        let refused: Vec<(&str, u64)> = status
            .peers
            .iter()
            .flat_map(|p| p.batches_refused.clone())
            .collect();
        if !refused.is_empty() {
            break refused;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no refusal counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused[0].0, "value_size");
    assert!(
        b.get(&ns, "big").unwrap().is_none(),
        "nothing of it applied"
    );
    // The sender sees why: the Error frame's code and message.
    let started = Instant::now();
    loop {
        let error = ra.status().peers.iter().find_map(|p| p.last_error.clone());
        if let Some((code, message)) = error {
            assert_eq!(code, "invalid_event");
            assert!(message.contains("value_bytes_max"), "{message}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the sender saw no error"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut registry = prometheus_client::registry::Registry::default();
    rb.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(&format!(
            "asp_peer_batches_refused_total{{peer=\"{}\",reason=\"value_size\"}}",
            a.node_id()
        )),
        "{text}"
    );
    ra.shutdown().await;
    rb.shutdown().await;
}
