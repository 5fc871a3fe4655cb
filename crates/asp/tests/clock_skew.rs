//! A node whose clock runs ahead blocks nothing: in a line A–B–C of real `asp serve`
//! processes where B's clock runs ahead past `max_clock_skew_ms`, B's own events are
//! parked at A and C while A's and C's writes keep reaching each other through B; once
//! the clocks allow, B's events are applied everywhere and all converge.

mod common;

use std::time::{Duration, Instant};

use asp_http::client::Client;
use bytes::Bytes;
use common::{Node, converge};

const NS: &str = "line";
/// B's clock runs this far ahead; the nodes allow this much skew. B's events wait
/// about the difference (8 s) at A and C.
const OFFSET_MS: &str = "10000";
const SKEW_MS: &str = "2000";

async fn put(c: &Client, key: &str) {
    c.put(NS, key, "text/plain", Bytes::from(key.to_owned()), None)
        .await
        .unwrap();
}

async fn has(c: &Client, key: &str) -> bool {
    c.get(NS, key, None).await.unwrap().is_some()
}

async fn held(c: &Client) -> serde_json::Value {
    c.status().await.unwrap()["held"].clone()
}

async fn wait(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_its_clock_ahead_blocks_nobody_and_converges_once_clocks_allow() {
    // Guards against a clock-skew refusal of B's own events stalling the stream behind
    // them: A and C stopped receiving each other's writes, which B relays.
    let dir = tempfile::tempdir().unwrap();
    let skew = ["--max-clock-skew-ms", SKEW_MS];
    let a = Node::start(&dir.path().join("a"), &skew).await;
    let b = Node::start_with_env(
        &dir.path().join("b"),
        &[&skew[..], &["--peer", &a.peer_addr()]].concat(),
        &[("ASP_TEST_CLOCK_OFFSET_MS", OFFSET_MS)],
    )
    .await;
    let c = Node::start(
        &dir.path().join("c"),
        &[&skew[..], &["--peer", &b.peer_addr()]].concat(),
    )
    .await;
    let (ca, cb, cc) = (a.client(), b.client(), c.client());
    assert!(b.log().contains("ASP_TEST_CLOCK_OFFSET_MS"), "{}", b.log());
    wait("B's two links", Duration::from_secs(30), async || {
        let status = cb.status().await.unwrap();
        status["replication"]["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["state"] == "active")
            .count()
            == 2
    })
    .await;

    // B's write carries B's clock: parked at A and C, listed with B as its origin.
    put(&cb, "b").await;
    let b_id = cb.status().await.unwrap()["node_id"].clone();
    for client in [&ca, &cc] {
        wait("B's event parked", Duration::from_secs(10), async || {
            held(client).await["parked"]["events"] == 1
        })
        .await;
        let parked = held(client).await["parked"].clone();
        assert_eq!(parked["origins"][0]["origin"], b_id, "{parked}");
        assert!(parked["next_release_ms"].as_u64().is_some(), "{parked}");
    }
    // A's and C's writes still reach each other through B, behind B's parked one.
    put(&ca, "a").await;
    put(&cc, "c").await;
    wait("A's write at C", Duration::from_secs(10), async || {
        has(&cc, "a").await
    })
    .await;
    wait("C's write at A", Duration::from_secs(10), async || {
        has(&ca, "c").await
    })
    .await;
    for client in [&ca, &cc] {
        assert!(!has(client, "b").await, "B's event is still parked");
        assert_eq!(held(client).await["parked"]["events"], 1);
    }
    // The links stayed up: no clock_skew refusal.
    for n in [&a, &b, &c] {
        assert!(!n.log().contains("clock_skew"), "{}", n.log());
    }

    // Once A's and C's clocks allow it (about 8 s after B's write), B's event is
    // applied everywhere, and all three converge.
    converge(&[&a, &b, &c], NS, 3, Duration::from_secs(60)).await;
    for client in [&ca, &cc] {
        assert!(has(client, "b").await);
        assert_eq!(held(client).await["events"], 0);
        let metrics = client
            .send(axum::http::Method::GET, "/metrics", &[], Bytes::new())
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        assert!(text.contains("asp_events_released_total 1"), "{text}");
    }
}
