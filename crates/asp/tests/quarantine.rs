//! One bad namespace blocks nothing: two real `asp serve` processes give namespace
//! `hits` different policies while cut apart (a counter on A, a plain value on B).
//! Once healed, every other namespace replicates both ways, `hits` events wait in
//! each side's quarantine (listed in status with how to resolve it), the link stays
//! up, anti-entropy leaves `hits` alone, and the quarantine is resolved by retry or
//! discard.

mod common;

use std::time::{Duration, Instant};

use asp_faultnet::Proxy;
use asp_http::client::Client;
use axum::http::Method;
use bytes::Bytes;
use common::{BIN, Node};

async fn send(c: &Client, method: Method, path: &str, body: &str) -> (u16, serde_json::Value) {
    let r = c
        .send(method, path, &[], Bytes::copy_from_slice(body.as_bytes()))
        .await
        .unwrap();
    let json = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
    (r.status.as_u16(), json)
}

async fn ok(c: &Client, method: Method, path: &str, body: &str) -> serde_json::Value {
    let (status, json) = send(c, method.clone(), path, body).await;
    assert_eq!(status, 200, "{method} {path}: {json}");
    json
}

async fn put(c: &Client, ns: &str, key: &str) {
    c.put(ns, key, "application/json", Bytes::from_static(b"1"), None)
        .await
        .unwrap();
}

async fn has(c: &Client, ns: &str, key: &str) -> bool {
    c.get(ns, key, None).await.unwrap().is_some()
}

async fn quarantine(c: &Client) -> Vec<serde_json::Value> {
    c.status().await.unwrap()["held"]["quarantine"]
        .as_array()
        .unwrap()
        .clone()
}

async fn peer(c: &Client) -> serde_json::Value {
    c.status().await.unwrap()["replication"]["peers"][0].clone()
}

/// Reconciliation runs that got past the responder's answer, on both nodes.
async fn decoded_runs(a: &Node, b: &Node) -> u64 {
    let mut n = 0;
    for node in [a, b] {
        let r = node
            .client()
            .send(Method::GET, "/metrics", &[], Bytes::new())
            .await
            .unwrap();
        for line in String::from_utf8_lossy(&r.body).lines() {
            if line.starts_with("asp_reconcile_runs_total{")
                && !line.contains("outcome=\"refused\"")
            {
                n += line.rsplit(' ').next().unwrap().parse::<u64>().unwrap();
            }
        }
    }
    n
}

async fn wait(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let (started, limit) = (Instant::now(), Duration::from_secs(30));
    while !done().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_conflict_is_quarantined_and_everything_else_flows() {
    // Guards against a policy conflict in one namespace refusing whole batches: the
    // link looped on `internal: cannot apply the peer's events` and no namespace
    // replicated between the two nodes, in either direction.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("asp.toml");
    std::fs::write(&config, "[replication]\nanti_entropy_interval_ms = 200\n").unwrap();
    let config = config.to_str().unwrap();
    // A has the smaller id: it starts the anti-entropy runs of the pair.
    let a = Node::start(
        &dir.path().join("a"),
        &["--config", config, "--node-id", "0000000000000001"],
    )
    .await;
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
            "--node-id",
            "00000000000000ff",
            "--peer",
            &proxy.local_addr().to_string(),
        ],
    )
    .await;
    let (ca, cb) = (a.client(), b.client());
    wait("the link", async || peer(&cb).await["state"] == "active").await;
    proxy.partition();

    // Cut apart: `hits` becomes a counter on A and a plain value on B (a conflict on
    // both sides); `tags` a counter with data on A and a set with no data on B (a
    // conflict on B only), `marks` the other way round (on A only). Each also writes
    // elsewhere, after the conflicting writes, so that those come first in its feed.
    ok(
        &ca,
        Method::PUT,
        "/v1/ns/hits/policy",
        r#"{"policy":"counter"}"#,
    )
    .await;
    for _ in 0..3 {
        ok(&ca, Method::POST, "/v1/ns/hits/kv/home", r#"{"incr":1}"#).await;
    }
    put(&cb, "hits", "home").await;
    for (writer, other, ns) in [(&ca, &cb, "tags"), (&cb, &ca, "marks")] {
        ok(
            writer,
            Method::PUT,
            &format!("/v1/ns/{ns}/policy"),
            r#"{"policy":"counter"}"#,
        )
        .await;
        ok(
            writer,
            Method::POST,
            &format!("/v1/ns/{ns}/kv/t"),
            r#"{"incr":5}"#,
        )
        .await;
        ok(
            other,
            Method::PUT,
            &format!("/v1/ns/{ns}/policy"),
            r#"{"policy":"set"}"#,
        )
        .await;
    }
    put(&ca, "from-a", "k").await;
    put(&cb, "from-b", "k").await;
    proxy.heal();

    // Everything else flows both ways.
    wait("A's write at B", async || has(&cb, "from-a", "k").await).await;
    wait("B's write at A", async || has(&ca, "from-b", "k").await).await;
    // `hits` is quarantined on each side, listed with what to do.
    wait("A's quarantine", async || quarantine(&ca).await.len() == 2).await;
    wait("B's quarantine", async || quarantine(&cb).await.len() == 2).await;
    let qa = &quarantine(&ca).await[0];
    assert_eq!(qa["namespace"], "hits");
    assert_eq!(qa["policy_here"], "counter");
    assert_eq!(qa["policy_of_events"], serde_json::json!(["lww"]));
    assert_eq!(qa["events"], 1);
    assert_eq!(qa["anti_entropy"], "paused");
    let resolve = qa["resolve"].as_str().unwrap();
    assert!(
        resolve.contains("Set the same policy on every node"),
        "{resolve}"
    );
    assert!(
        resolve.contains("/v1/admin/quarantine/hits/discard"),
        "{resolve}"
    );
    let qb = quarantine(&cb).await;
    assert_eq!(qb[0]["namespace"], "hits");
    assert_eq!(qb[0]["events"], 3);
    assert_eq!(qb[1]["namespace"], "tags");
    assert_eq!(qb[1]["holds_data"], false);
    assert!(
        qb[1]["resolve"]
            .as_str()
            .unwrap()
            .contains("/v1/admin/quarantine/tags/retry"),
        "{}",
        qb[1]["resolve"]
    );
    // The namespaces keep their own state.
    assert_eq!(
        ok(&ca, Method::GET, "/v1/ns/hits/kv/home", "").await,
        serde_json::json!(3)
    );

    // The link stays up and keeps carrying writes; no `internal` loop.
    assert_eq!(peer(&ca).await["state"], "active");
    assert!(peer(&cb).await["events_quarantined"].as_u64().unwrap() >= 4);
    put(&cb, "from-b", "later").await;
    wait("a later write", async || has(&ca, "from-b", "later").await).await;
    for n in [&a, &b] {
        assert!(!n.log().contains("cannot apply"), "{}", n.log());
    }

    // Anti-entropy checks the other namespaces (in sync) and leaves the quarantined
    // ones alone, whose digests differ: A starts no run for those quarantined on A,
    // B refuses those quarantined on B. No run gets to decode.
    let checks = async || {
        peer(&ca).await["reconcile"]["in_sync_checks"]
            .as_u64()
            .unwrap()
    };
    wait("other namespaces in sync", async || checks().await > 0).await;
    let (decoded_before, checks_before) = (decoded_runs(&a, &b).await, checks().await);
    wait("ten more checks", async || {
        checks().await >= checks_before + 10
    })
    .await;
    assert_eq!(
        decoded_runs(&a, &b).await,
        decoded_before,
        "a run reconciled a quarantined namespace"
    );

    // `tags` holds no data on B (`marks` on A): set its policy to the other's, and
    // retry.
    for (c, ns) in [(&cb, "tags"), (&ca, "marks")] {
        let retry = format!("/v1/admin/quarantine/{ns}/retry");
        let (status, answer) = send(c, Method::POST, &retry, "").await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            (
                answer["applied"].clone(),
                answer["still_quarantined"].clone()
            ),
            (0.into(), 1.into())
        );
        ok(
            c,
            Method::PUT,
            &format!("/v1/ns/{ns}/policy"),
            r#"{"policy":"counter"}"#,
        )
        .await;
        assert_eq!(ok(c, Method::POST, &retry, "").await["applied"], 1);
        assert_eq!(
            ok(c, Method::GET, &format!("/v1/ns/{ns}/kv/t"), "").await,
            serde_json::json!(5)
        );
    }
    // `hits` holds data on both: each keeps its own writes and discards the other's
    // (on A with the CLI).
    let answer = ok(&cb, Method::POST, "/v1/admin/quarantine/hits/discard", "").await;
    assert_eq!(answer["discarded"], 3);
    let out = std::process::Command::new(BIN)
        .args(["quarantine", "--node", &a.url(), "--ns", "hits", "discard"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["discarded"], 1);
    assert!(quarantine(&ca).await.is_empty());
    assert!(quarantine(&cb).await.is_empty());
    let (status, answer) = send(&ca, Method::POST, "/v1/admin/quarantine/hits/retry", "").await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["error"]["code"], "not_found");
}
