//! Tombstone collection between two real `asp serve` processes: B is cut off (through
//! a fault proxy) past the horizon while A deletes keys B holds and B writes; A
//! collects without B, leaving epitaphs; once healed, no deleted key comes back on
//! either node, B's writes are kept, and the epitaphs go.

mod common;

use std::time::{Duration, Instant};

use asp_faultnet::Proxy;
use asp_http::client::Client;
use axum::http::Method;
use bytes::Bytes;
use common::{Node, converge, digest, wait_until};

const NS: &str = "t";

async fn put(c: &Client, key: &str, value: &str) {
    c.put(NS, key, "text/plain", Bytes::from(value.to_owned()), None)
        .await
        .unwrap();
}

async fn text(c: &Client, key: &str) -> Option<String> {
    let r = c.get(NS, key, None).await.unwrap()?;
    Some(String::from_utf8(r.body.to_vec()).unwrap())
}

async fn compact(c: &Client) -> serde_json::Value {
    let r = c
        .send(Method::POST, "/v1/admin/compact", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 200);
    serde_json::from_slice(&r.body).unwrap()
}

async fn tombstone_gc(c: &Client) -> serde_json::Value {
    let status = c.status().await.unwrap();
    status["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == NS)
        .map(|n| n["tombstone_gc"].clone())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_the_horizon_resurrects_nothing_and_keeps_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("asp.toml");
    std::fs::write(
        &config,
        "[compaction]\ninterval_ms = 0\ntombstone_ttl_ms = 0\ngc_horizon_ms = 2000\n\
         [replication]\nanti_entropy_interval_ms = 300\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let a = Node::start(&dir.path().join("a"), &["--config", config]).await;
    let proxy = Proxy::start(
        "127.0.0.1:0".parse().unwrap(),
        a.peer_addr().parse().unwrap(),
    )
    .await
    .unwrap();
    let b = Node::start(
        &dir.path().join("b"),
        &[
            "--config",
            config,
            "--peer",
            &proxy.local_addr().to_string(),
        ],
    )
    .await;
    let (ca, cb) = (a.client(), b.client());
    let b_id = cb.status().await.unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..300 {
        put(&ca, &format!("k{i}"), "first").await;
    }
    converge(&[&a, &b], NS, 300, Duration::from_secs(30)).await;

    // Both up: A's deletes are collected once B reports holding them.
    for i in 0..100 {
        ca.delete(NS, &format!("k{i}"), None).await.unwrap();
    }
    converge(&[&a, &b], NS, 400, Duration::from_secs(30)).await;
    let started = Instant::now();
    let mut collected = 0;
    while collected < 100 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "collected {collected}"
        );
        collected += compact(&ca).await["tombstones_collected"].as_u64().unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(collected, 100);
    assert_eq!(
        tombstone_gc(&ca).await["waiting_for"],
        serde_json::json!([])
    );

    // B is cut off. It writes k150 before A deletes it and k160 after, and keys of
    // its own; A deletes k100..k199.
    proxy.partition();
    put(&cb, "k150", "b, early").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for i in 100..200 {
        ca.delete(NS, &format!("k{i}"), None).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    put(&cb, "k160", "b, late").await;
    for i in 0..10 {
        put(&cb, &format!("away{i}"), "b").await;
    }

    // Past the horizon A collects without B and leaves epitaphs.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    wait_until("A counts B as away", Duration::from_secs(10), || async {
        tombstone_gc(&ca).await["away"] == serde_json::json!([b_id])
    })
    .await;
    let report = compact(&ca).await;
    assert_eq!(report["tombstones_collected"], 100, "{report}");
    assert_eq!(report["epitaphs_left"], 100, "{report}");

    // Healed: both end with the same keys and values.
    proxy.heal();
    let started = Instant::now();
    loop {
        let (da, db) = (digest(&ca, NS).await, digest(&cb, NS).await);
        if da == db && da.len() == 100 + 1 + 10 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no convergence: {} vs {} live keys",
            da.len(),
            db.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in [&ca, &cb] {
        for i in (0..200).filter(|&i| i != 160) {
            assert_eq!(text(c, &format!("k{i}")).await, None, "k{i}");
        }
        assert_eq!(text(c, "k160").await.as_deref(), Some("b, late"));
        assert_eq!(text(c, "k250").await.as_deref(), Some("first"));
        for i in 0..10 {
            assert_eq!(text(c, &format!("away{i}")).await.as_deref(), Some("b"));
        }
    }

    // B back and holding the deletes: A's epitaphs go (k160's was written over).
    let started = Instant::now();
    let mut dropped = 0;
    while dropped < 99 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "dropped {dropped}"
        );
        dropped += compact(&ca).await["epitaphs_dropped"].as_u64().unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dropped, 99);
    assert_eq!(tombstone_gc(&ca).await["away"], serde_json::json!([]));
    assert_eq!(text(&ca, "k150").await, None);
}
