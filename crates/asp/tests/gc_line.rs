//! Tombstone collection on a line of three real `asp serve` processes, A–B–C, where C
//! reaches B only through a fault proxy.
//!
//! Regression (issue 11, item 1): all three hold 10 keys written at A; C, which had
//! written nothing in the namespace and had not reported on it yet, is cut off and
//! writes 5 of the keys; A deletes all 10. A knew of no C (B knew it only as a peer
//! and passed on only reports), so A collected the deletes without an epitaph, well
//! inside the horizon; once healed, C's older writes reached A through B and the keys
//! were back on A for good, while B and C kept them deleted.
//!
//! Whether C's first report of the namespace reached B before the cut was a race (it
//! went the bad way in 6 of 7 tries); here C's bytes to B are dropped from just before
//! A writes the keys, so it always goes the bad way.

mod common;

use std::time::{Duration, Instant};

use asp_faultnet::{Direction, Proxy};
use asp_http::client::Client;
use axum::http::Method;
use bytes::Bytes;
use common::{Node, converge, digest, events};

const NS: &str = "t";
const KEYS: usize = 10;
const C_WRITES: usize = 5;
const LIMIT: Duration = Duration::from_secs(60);

async fn put(c: &Client, ns: &str, key: &str, value: &str) {
    c.put(ns, key, "text/plain", Bytes::from(value.to_owned()), None)
        .await
        .unwrap();
}

async fn compact(c: &Client) -> serde_json::Value {
    let r = c
        .send(Method::POST, "/v1/admin/compact", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 200);
    serde_json::from_slice(&r.body).unwrap()
}

async fn node_id(c: &Client) -> String {
    c.status().await.unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_owned()
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

/// Whether `peer`'s last summary to `c` showed it holding everything `c` holds of the
/// namespace (its report, which came with that summary, then holds A's deletes).
async fn peer_holds_everything(c: &Client, peer: &str) -> bool {
    let status = c.status().await.unwrap();
    status["replication"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["node_id"] == peer)
        .flat_map(|p| p["namespaces"].as_array().unwrap().iter())
        .any(|n| n["name"] == NS && n["lag_events"] == 0)
}

/// Polls `check` until it holds, or fails with `what` after the limit.
async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < LIMIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How the scenario is judged at A right before the link heals.
#[derive(Clone, Copy)]
enum Horizon {
    /// C was last heard of (its last summary to B, which B passes on) less than the
    /// horizon ago: A waits for C's report and collects nothing.
    Inside,
    /// The 3 s horizon, waited out: C has not been heard of for that long, so
    /// A collects without it and leaves an epitaph for every delete.
    Past,
}

async fn line(horizon: Horizon) {
    let horizon_ms = match horizon {
        Horizon::Inside => 600_000,
        Horizon::Past => 3_000,
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("asp.toml");
    std::fs::write(
        &config,
        format!(
            "[compaction]\ninterval_ms = 0\ntombstone_ttl_ms = 500\ngc_horizon_ms = {horizon_ms}\n\
             [replication]\nanti_entropy_interval_ms = 300\n"
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let a = Node::start(&dir.path().join("a"), &["--config", config]).await;
    let b = Node::start(
        &dir.path().join("b"),
        &["--config", config, "--peer", &a.peer_addr()],
    )
    .await;
    let proxy = Proxy::start(
        "127.0.0.1:0".parse().unwrap(),
        b.peer_addr().parse().unwrap(),
    )
    .await
    .unwrap();
    let c = Node::start(
        &dir.path().join("c"),
        &[
            "--config",
            config,
            "--peer",
            &proxy.local_addr().to_string(),
        ],
    )
    .await;
    let (ca, cb, cc) = (a.client(), b.client(), c.client());
    let (b_id, c_id) = (node_id(&cb).await, node_id(&cc).await);

    // Both links up (a write in another namespace went down the line).
    put(&ca, "warm", "up", "1").await;
    converge(&[&a, &b, &c], "warm", 1, LIMIT).await;
    // From here on C's summaries (and acknowledgements) do not reach B: the keys
    // reach C, but no report of C's on the namespace ever leaves it.
    proxy.set_blackhole(Some(Direction::Forward));
    for i in 0..KEYS {
        put(&ca, NS, &format!("k{i}"), "a").await;
    }
    wait_for("C to hold A's keys", || async {
        events(&cc, NS).await == KEYS as u64
    })
    .await;
    proxy.partition();

    // Cut off, C writes 5 of the keys; then A deletes all 10 (later clocks: they win).
    for i in 0..C_WRITES {
        put(&cc, NS, &format!("k{i}"), "c").await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    for i in 0..KEYS {
        ca.delete(NS, &format!("k{i}"), None).await.unwrap();
    }
    let deleted = Instant::now();
    // B tells A it holds the deletes; the deletes pass the TTL (500 ms).
    wait_for("B's report of the deletes at A", || {
        peer_holds_everything(&ca, &b_id)
    })
    .await;
    tokio::time::sleep_until((deleted + Duration::from_millis(1200)).into()).await;

    // A knows C may write, though it never heard from C: B told it, and when B last
    // heard from C.
    match horizon {
        Horizon::Inside => {
            let report = compact(&ca).await;
            assert_eq!(
                (&report["tombstones_collected"], &report["epitaphs_left"]),
                (&serde_json::json!(0), &serde_json::json!(0)),
                "A collected while C, heard of inside the horizon, may still write: {report}\n{}",
                tombstone_gc(&ca).await
            );
            assert_eq!(
                tombstone_gc(&ca).await["waiting_for"],
                serde_json::json!([c_id])
            );
        }
        Horizon::Past => {
            wait_for("A to count C as away past the horizon", || async {
                tombstone_gc(&ca).await["away"] == serde_json::json!([c_id])
            })
            .await;
            let report = compact(&ca).await;
            assert_eq!(
                (&report["tombstones_collected"], &report["epitaphs_left"]),
                (&serde_json::json!(KEYS), &serde_json::json!(KEYS)),
                "{report}"
            );
        }
    }

    // Healed: C's older writes reach A through B and lose; A's deletes reach C.
    proxy.set_blackhole(None);
    proxy.heal();
    let all = (KEYS + KEYS + C_WRITES) as u64;
    converge(&[&a, &b, &c], NS, all, LIMIT).await;
    wait_for("the same (empty) state on A, B and C", || async {
        let (da, db, dc) = (
            digest(&ca, NS).await,
            digest(&cb, NS).await,
            digest(&cc, NS).await,
        );
        da == db && db == dc
    })
    .await;
    for (name, client) in [("A", &ca), ("B", &cb), ("C", &cc)] {
        for i in 0..KEYS {
            let got = client.get(NS, &format!("k{i}"), None).await.unwrap();
            assert!(got.is_none(), "k{i} is back on {name}");
        }
    }

    // C reported back: A collects what it held back, or drops its epitaphs.
    let counter = match horizon {
        Horizon::Inside => "tombstones_collected",
        Horizon::Past => "epitaphs_dropped",
    };
    let started = Instant::now();
    let mut done = 0;
    while done < KEYS as u64 {
        assert!(started.elapsed() < LIMIT, "{counter}: {done}");
        let report = compact(&ca).await;
        assert_eq!(report["epitaphs_left"], 0, "{report}");
        done += report[counter].as_u64().unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(done, KEYS as u64, "{counter}");
    assert_eq!(
        tombstone_gc(&ca).await["waiting_for"],
        serde_json::json!([])
    );
    for i in 0..KEYS {
        assert!(ca.get(NS, &format!("k{i}"), None).await.unwrap().is_none());
    }
    assert!(digest(&ca, NS).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_behind_a_relay_holds_collection_back_inside_the_horizon() {
    line(Horizon::Inside).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_horizon_the_far_end_collects_with_epitaphs_and_nothing_comes_back() {
    line(Horizon::Past).await;
}
