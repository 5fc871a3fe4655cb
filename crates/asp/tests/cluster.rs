//! Replication between real `asp serve` processes on loopback.

mod common;

use std::time::{Duration, Instant};

use asp_faultnet::Proxy;
use bytes::Bytes;
use common::{Node, converge, digest, events, wait_until};

fn batch_body(prefix: &str, from: usize, to: usize) -> Bytes {
    let ops: Vec<String> = (from..to)
        .map(|i| {
            format!(r#"{{"op":"put","key":"{prefix}{i}","value":{{"i":{i},"by":"{prefix}"}}}}"#)
        })
        .collect();
    Bytes::from(format!(r#"{{"ops":[{}]}}"#, ops.join(",")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_of_three_with_writes_at_both_ends_ends_identical() {
    let dir = tempfile::tempdir().unwrap();
    let b = Node::start(&dir.path().join("b"), &[]).await;
    let a = Node::start(&dir.path().join("a"), &["--peer", &b.peer_addr()]).await;
    let c = Node::start(&dir.path().join("c"), &["--peer", &b.peer_addr()]).await;
    let write = |client: asp_http::client::Client, who: &'static str| async move {
        for round in 0..20 {
            // Fresh keys in batches, plus keys both ends fight over.
            client
                .batch("line", batch_body(who, round * 25, round * 25 + 25))
                .await
                .unwrap();
            for k in 0..5 {
                client
                    .put(
                        "line",
                        &format!("shared{k}"),
                        "application/json",
                        Bytes::from(format!("\"{who}{round}\"")),
                        None,
                    )
                    .await
                    .unwrap();
            }
            client
                .delete("line", &format!("{who}{}", round * 25), None)
                .await
                .unwrap();
        }
    };
    let (wa, wc) = (
        tokio::spawn(write(a.client(), "a")),
        tokio::spawn(write(c.client(), "c")),
    );
    wa.await.unwrap();
    wc.await.unwrap();
    // 20 rounds x (25 puts + 5 puts + 1 delete) at each end.
    converge(&[&a, &b, &c], "line", 2 * 20 * 31, Duration::from_secs(60)).await;
    let (da, db, dc) = (
        digest(&a.client(), "line").await,
        digest(&b.client(), "line").await,
        digest(&c.client(), "line").await,
    );
    assert_eq!(da.len(), 2 * 20 * 24 + 5);
    assert_eq!(da, db);
    assert_eq!(db, dc);
    // B relays: it holds a link to each end, and the ends only know B.
    let status = a.client().status().await.unwrap();
    assert_eq!(status["replication"]["peers"].as_array().unwrap().len(), 1);
    assert_eq!(status["replication"]["peers"][0]["state"], "active");
    let status = b.client().status().await.unwrap();
    assert_eq!(status["replication"]["peers"].as_array().unwrap().len(), 2);
    // Metrics name each peer.
    let metrics = b
        .client()
        .send(axum::http::Method::GET, "/metrics", &[], Bytes::new())
        .await
        .unwrap();
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    for name in [
        "asp_replication_events_received_total{peer=",
        "asp_replication_events_sent_total{peer=",
        "asp_peers_connected",
    ] {
        assert!(text.contains(name), "metrics lack {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_receiving_comes_back_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[]).await;
    let mut b = Node::start(&dir.path().join("b"), &["--peer", &a.peer_addr()]).await;
    // B acknowledged some writes of its own before it dies.
    for i in 0..50 {
        b.client()
            .put(
                "k",
                &format!("b{i}"),
                "application/json",
                Bytes::from(i.to_string()),
                None,
            )
            .await
            .unwrap();
    }
    let writer = {
        let client = a.client();
        tokio::spawn(async move {
            for round in 0..40 {
                client
                    .batch("k", batch_body("a", round * 250, round * 250 + 250))
                    .await
                    .unwrap();
            }
        })
    };
    // Kill B while A's events stream in.
    let started = Instant::now();
    while events(&b.client(), "k").await < 2_000 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "B received nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.kill();
    writer.await.unwrap();
    b.restart().await;
    converge(&[&a, &b], "k", 10_000 + 50, Duration::from_secs(60)).await;
    assert_eq!(
        digest(&a.client(), "k").await,
        digest(&b.client(), "k").await
    );
    let v = b.client().get("k", "b49", None).await.unwrap().unwrap();
    assert_eq!(&v.body[..], b"49");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_while_both_sides_write_heals_into_one_state() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[]).await;
    let proxy = Proxy::start(
        "127.0.0.1:0".parse().unwrap(),
        a.peer_addr().parse().unwrap(),
    )
    .await
    .unwrap();
    let b = Node::start(
        &dir.path().join("b"),
        &["--peer", &proxy.local_addr().to_string()],
    )
    .await;
    a.client()
        .put(
            "p",
            "seed",
            "application/json",
            Bytes::from_static(b"0"),
            None,
        )
        .await
        .unwrap();
    converge(&[&a, &b], "p", 1, Duration::from_secs(30)).await;
    proxy.partition();
    for i in 0..200 {
        a.client()
            .put(
                "p",
                &format!("k{}", i % 30),
                "application/json",
                Bytes::from(format!("\"a{i}\"")),
                None,
            )
            .await
            .unwrap();
        b.client()
            .put(
                "p",
                &format!("k{}", i % 30),
                "application/json",
                Bytes::from(format!("\"b{i}\"")),
                None,
            )
            .await
            .unwrap();
    }
    // While cut off, each side sees only its own writes, and says so.
    assert_eq!(events(&a.client(), "p").await, 201);
    assert_eq!(events(&b.client(), "p").await, 201);
    wait_until(
        "B reports its link to A as not active",
        Duration::from_secs(10),
        || async {
            let status = b.client().status().await.unwrap();
            status["replication"]["peers"][0]["state"] != "active"
        },
    )
    .await;
    proxy.heal();
    converge(&[&a, &b], "p", 401, Duration::from_secs(60)).await;
    assert_eq!(
        digest(&a.client(), "p").await,
        digest(&b.client(), "p").await
    );
    assert!(
        proxy.stats().connections >= 2,
        "the link was re-established"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_away_while_100000_events_are_written_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[]).await;
    let mut b = Node::start(&dir.path().join("b"), &["--peer", &a.peer_addr()]).await;
    a.client()
        .put(
            "big",
            "first",
            "application/json",
            Bytes::from_static(b"1"),
            None,
        )
        .await
        .unwrap();
    converge(&[&a, &b], "big", 1, Duration::from_secs(30)).await;
    assert_eq!(b.signal(libc::SIGTERM).code(), Some(0));
    for round in 0..100 {
        a.client()
            .batch("big", batch_body("e", round * 1000, round * 1000 + 1000))
            .await
            .unwrap();
    }
    b.restart().await;
    converge(&[&a, &b], "big", 100_001, Duration::from_secs(120)).await;
    let (da, db) = (
        digest(&a.client(), "big").await,
        digest(&b.client(), "big").await,
    );
    assert_eq!(da.len(), 100_001);
    assert_eq!(da, db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_cluster_or_protocol_version_is_refused_and_shown_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[]).await;
    let other = Node::start(
        &dir.path().join("other"),
        &["--peer", &a.peer_addr(), "--cluster-id", "elsewhere"],
    )
    .await;
    let future = Node::start(
        &dir.path().join("future"),
        &["--peer", &a.peer_addr(), "--protocol-versions", "7-9"],
    )
    .await;
    other
        .client()
        .put("x", "k", "application/json", Bytes::from_static(b"1"), None)
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let sa = a.client().status().await.unwrap();
        let so = other.client().status().await.unwrap();
        let sf = future.client().status().await.unwrap();
        let refused_at_a: Vec<String> = sa["replication"]["refusals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["code"].as_str().unwrap().to_owned())
            .collect();
        let other_err = so["replication"]["peers"][0]["last_error"]["code"].clone();
        let future_err = sf["replication"]["peers"][0]["last_error"]["code"].clone();
        if refused_at_a.iter().any(|c| c == "cluster_mismatch")
            && refused_at_a.iter().any(|c| c == "version_mismatch")
            && other_err == "cluster_mismatch"
            && future_err == "version_mismatch"
        {
            let message = so["replication"]["peers"][0]["last_error"]["message"]
                .as_str()
                .unwrap();
            // The refused dialer is not told the cluster id it would need.
            assert!(
                message.contains("\"elsewhere\"") && !message.contains("default"),
                "{message}"
            );
            // The node that refused records both.
            let record = sa["replication"]["refusals"].to_string();
            assert!(
                record.contains("elsewhere") && record.contains("default"),
                "{record}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "refusals not shown:\n{sa}\n{so}\n{sf}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Logged on both sides.
    assert!(a.log().contains("cluster_mismatch") && other.log().contains("cluster_mismatch"));
    assert!(a.log().contains("version_mismatch") && future.log().contains("version_mismatch"));
    assert_eq!(
        events(&a.client(), "x").await,
        0,
        "nothing crosses a refused link"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_concern_waits_for_replicas_or_says_how_many_hold_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[]).await;
    let proxy = Proxy::start(
        "127.0.0.1:0".parse().unwrap(),
        a.peer_addr().parse().unwrap(),
    )
    .await
    .unwrap();
    let b = Node::start(
        &dir.path().join("b"),
        &["--peer", &proxy.local_addr().to_string()],
    )
    .await;
    let client = a.client();
    let put = |q: &'static str| {
        let client = client.clone();
        async move {
            client
                .send(
                    axum::http::Method::PUT,
                    &format!("/v1/ns/w/kv/key?{q}"),
                    &[(axum::http::header::CONTENT_TYPE, "application/json")],
                    Bytes::from_static(b"1"),
                )
                .await
                .unwrap()
        }
    };
    // A counts B toward a write concern once B has linked (before that, replicas=2
    // is more than A knows it can meet, and is refused at once).
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.status().await.unwrap()["replication"]["peers"][0]["state"] != "active" {
        assert!(Instant::now() < deadline, "B never linked to A");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = put("replicas=2&timeout_ms=20000").await;
    assert_eq!(r.status.as_u16(), 200, "{:?}", r.body);
    assert_eq!(r.json().unwrap()["replicas"]["acknowledged"], 2);
    assert!(
        b.client().get("w", "key", None).await.unwrap().is_some(),
        "B holds it when A answers"
    );
    proxy.partition();
    let r = put("replicas=2&timeout_ms=300").await;
    assert_eq!(r.status.as_u16(), 504);
    let v = r.json().unwrap();
    assert_eq!(v["error"]["code"], "replication_timeout");
    assert_eq!(v["replicas"]["acknowledged"], 1);
    assert!(v["write"]["version"].is_string());
    assert!(
        client.get("w", "key", None).await.unwrap().is_some(),
        "the write stays"
    );
    let r = put("replicas=0").await;
    assert_eq!(r.status.as_u16(), 400);
    proxy.heal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_away_past_compaction_is_brought_back_by_reconciliation() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("asp.toml");
    std::fs::write(
        &config,
        "[store]\nsegment_bytes_max = 1048576\n\
         [compaction]\ninterval_ms = 0\nretention_ms = 0\n\
         [replication]\nanti_entropy_interval_ms = 500\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let a = Node::start(&dir.path().join("a"), &["--config", config]).await;
    let mut b = Node::start(
        &dir.path().join("b"),
        &["--config", config, "--peer", &a.peer_addr()],
    )
    .await;
    a.client()
        .batch("kept", batch_body("k", 0, 2000))
        .await
        .unwrap();
    converge(&[&a, &b], "kept", 2000, Duration::from_secs(30)).await;
    assert_eq!(b.signal(libc::SIGTERM).code(), Some(0));
    // While B is away, A overwrites every key ten times (sealing segments), then
    // compacts: the superseded events B missed are gone from A's feed.
    let pad = "p".repeat(300);
    for round in 0..10 {
        let ops: Vec<String> = (0..2000)
            .map(|i| {
                format!(r#"{{"op":"put","key":"k{i}","value":{{"r":{round},"pad":"{pad}"}}}}"#)
            })
            .collect();
        a.client()
            .batch(
                "kept",
                Bytes::from(format!(r#"{{"ops":[{}]}}"#, ops.join(","))),
            )
            .await
            .unwrap();
    }
    let answer = a
        .client()
        .send(
            axum::http::Method::POST,
            "/v1/admin/compact",
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    let report: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert!(report["segments_removed"].as_u64().unwrap() > 0, "{report}");
    assert!(report["log_bytes_after"].as_u64() < report["log_bytes_before"].as_u64());
    b.restart().await;
    // B ends with A's state and A's whole vector (22,000 events), though A's feed no
    // longer holds most of them.
    converge(&[&a, &b], "kept", 22_000, Duration::from_secs(60)).await;
    assert_eq!(
        digest(&a.client(), "kept").await,
        digest(&b.client(), "kept").await
    );
    let status = a.client().status().await.unwrap();
    let peer = &status["replication"]["peers"][0];
    assert!(
        peer["reconcile"]["handovers"].as_u64().unwrap() >= 1,
        "{peer}"
    );
    let ns = status["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "kept")
        .unwrap()
        .clone();
    assert!(ns["compacted_events"].as_u64().unwrap() > 0, "{ns}");
    let floor = ns["compacted"][0]["floor"].as_u64().unwrap();
    assert!(floor > 0 && floor <= 22_000, "{ns}");
    assert!(a.log().contains("handover done"), "{}", a.log());
}
