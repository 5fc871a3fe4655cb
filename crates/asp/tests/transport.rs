//! Replication through the machine's NATS server (127.0.0.1:4222): nodes that accept
//! no peer links (`--listen off`) and know no peer link each other through
//! `[replication] transport`, keep replicating through a partition of one of them from
//! NATS, and converge with a node that only speaks TCP to one of them. Each test runs
//! its own cluster id, so that its subjects are its own.

mod common;

use std::time::Duration;

use asp_faultnet::Proxy;
use bytes::Bytes;
use common::{Node, converge, digest};

const NATS: &str = "127.0.0.1:4222";

fn cluster() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// Starts a node whose configuration names the transport at `nats` (an address), in
/// cluster `cluster`, with `extra` flags.
async fn start(dir: &std::path::Path, cluster: &str, nats: &str, extra: &[&str]) -> Node {
    start_with(dir, cluster, nats, "", extra).await
}

/// [`start`], with more configuration (`more`: whole sections, before `[replication]`).
async fn start_with(
    dir: &std::path::Path,
    cluster: &str,
    nats: &str,
    more: &str,
    extra: &[&str],
) -> Node {
    std::fs::create_dir_all(dir.with_extension("conf")).unwrap();
    let path = dir.with_extension("conf").join("asp.toml");
    std::fs::write(
        &path,
        format!(
            "{more}[replication]\ncluster_id = \"{cluster}\"\ntransport = \"nats://{nats}\"\nheartbeat_ms = 200\nidle_timeout_ms = 1500\n"
        ),
    )
    .unwrap();
    let path = path.display().to_string();
    let mut flags = vec!["--config", path.as_str()];
    flags.extend_from_slice(extra);
    Node::start(dir, &flags).await
}

async fn put(node: &Node, key: &str, value: &str) {
    node.client()
        .put(
            "p",
            key,
            "application/json",
            Bytes::from(value.to_owned()),
            None,
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_without_peer_links_replicate_through_nats_and_through_a_partition() {
    let cluster = cluster();
    let dir = tempfile::tempdir().unwrap();
    // B reaches NATS through a proxy the test can cut.
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), NATS.parse().unwrap())
        .await
        .unwrap();
    let a = start(&dir.path().join("a"), &cluster, NATS, &["--listen", "off"]).await;
    let b = start(
        &dir.path().join("b"),
        &cluster,
        &proxy.local_addr().to_string(),
        &["--listen", "off"],
    )
    .await;
    put(&a, "from-a", "1").await;
    put(&b, "from-b", "2").await;
    converge(&[&a, &b], "p", 2, Duration::from_secs(60)).await;
    // The link is a peer link like any: status shows it, over NATS.
    let status = a.client().status().await.unwrap();
    let peers = status["replication"]["peers"].to_string();
    assert!(peers.contains("nats:"), "{peers}");
    let transport = &status["transport"];
    assert_eq!(transport["state"], "connected", "{transport}");
    assert_eq!(transport["connections"], 1, "{transport}");
    let b_id = b.client().status().await.unwrap()["node_id"].clone();
    assert!(
        transport["nodes_heard"].as_array().unwrap().contains(&b_id),
        "{transport}"
    );

    proxy.partition();
    for i in 0..50 {
        put(&a, &format!("a{i}"), &i.to_string()).await;
        put(&b, &format!("b{i}"), &i.to_string()).await;
        put(&a, "both", &format!("\"a{i}\"")).await;
        put(&b, "both", &format!("\"b{i}\"")).await;
    }
    // Cut off: B has none of what A wrote meanwhile, and A's link to B ends (its
    // heartbeats stop; the peer stays listed, down).
    assert!(b.client().get("p", "a49", None).await.unwrap().is_none());
    let started = std::time::Instant::now();
    loop {
        let status = a.client().status().await.unwrap();
        let peers = &status["replication"]["peers"];
        let active = peers
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["state"] == "active");
        if !active {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "A's link over NATS did not end: {peers} {}",
            status["transport"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.heal();
    converge(&[&a, &b], "p", 202, Duration::from_secs(120)).await;
    assert_eq!(
        digest(&a.client(), "p").await,
        digest(&b.client(), "p").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_cluster_converges_over_tcp_and_nats() {
    // A and B link through NATS; C links to B over TCP only (and knows no NATS).
    let cluster = cluster();
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), &cluster, NATS, &["--listen", "off"]).await;
    let b = start(&dir.path().join("b"), &cluster, NATS, &[]).await;
    let c = Node::start(
        &dir.path().join("c"),
        &["--cluster-id", &cluster, "--peer", &b.peer_addr()],
    )
    .await;
    for i in 0..20 {
        put(&a, &format!("a{i}"), "1").await;
        put(&b, &format!("b{i}"), "2").await;
        put(&c, &format!("c{i}"), "3").await;
    }
    converge(&[&a, &b, &c], "p", 60, Duration::from_secs(60)).await;
    let d = digest(&a.client(), "p").await;
    assert_eq!(d.len(), 60);
    assert_eq!(d, digest(&c.client(), "p").await);
}

/// Pages of puts of `k0..k{n}` in namespace `kept`, each value padded.
async fn overwrite(node: &Node, round: u32, n: u32) {
    let pad = "p".repeat(300);
    let ops: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"op":"put","key":"k{i}","value":{{"r":{round},"pad":"{pad}"}}}}"#))
        .collect();
    node.client()
        .batch(
            "kept",
            Bytes::from(format!(r#"{{"ops":[{}]}}"#, ops.join(","))),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_away_past_compaction_catches_up_through_nats() {
    let cluster = cluster();
    let dir = tempfile::tempdir().unwrap();
    let more =
        "[store]\nsegment_bytes_max = 1048576\n[compaction]\ninterval_ms = 0\nretention_ms = 0\n";
    let a = start_with(
        &dir.path().join("a"),
        &cluster,
        NATS,
        more,
        &["--listen", "off"],
    )
    .await;
    let mut b = start_with(
        &dir.path().join("b"),
        &cluster,
        NATS,
        more,
        &["--listen", "off"],
    )
    .await;
    overwrite(&a, 0, 2000).await;
    converge(&[&a, &b], "kept", 2000, Duration::from_secs(60)).await;
    assert_eq!(b.signal(libc::SIGTERM).code(), Some(0));
    // While B is away, A overwrites every key ten times, then compacts: most of what
    // B missed is gone from A's feed.
    for round in 1..=10 {
        overwrite(&a, round, 2000).await;
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
    let report: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert!(report["segments_removed"].as_u64().unwrap() > 0, "{report}");
    b.restart().await;
    converge(&[&a, &b], "kept", 22_000, Duration::from_secs(120)).await;
    assert_eq!(
        digest(&a.client(), "kept").await,
        digest(&b.client(), "kept").await
    );
    // By reconciliation: A's feed no longer held what B missed.
    let status = a.client().status().await.unwrap();
    let peer = &status["replication"]["peers"][0];
    assert!(
        peer["reconcile"]["handovers"].as_u64().unwrap() >= 1,
        "{peer}"
    );
}

#[test]
fn the_transport_refuses_what_it_cannot_do_safely() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[replication]\ntransport = \"nats://127.0.0.1:4222\"\n",
            "cluster_id of your own",
        ),
        (
            "[replication]\ncluster_id = \"x\"\ntransport = \"tcp://h:1\"\n",
            "must be nats://",
        ),
    ];
    for (i, (toml, reason)) in cases.iter().enumerate() {
        let stderr = common::refused_at_start(dir.path(), &i.to_string(), toml);
        assert!(stderr.contains(reason), "case {i}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_the_transport_link_every_pair_and_converge() {
    let cluster = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(start(&dir.path().join(name), &cluster, NATS, &["--listen", "off"]).await);
    }
    for (i, node) in nodes.iter().enumerate() {
        for k in 0..30 {
            put(node, &format!("n{i}-{k}"), &k.to_string()).await;
            put(node, "shared", &format!("\"{i}-{k}\"")).await;
        }
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    converge(&refs, "p", 180, Duration::from_secs(60)).await;
    let d = digest(&nodes[0].client(), "p").await;
    assert_eq!(d.len(), 91);
    for node in &nodes[1..] {
        assert_eq!(digest(&node.client(), "p").await, d);
    }
    // Every node links with both others, through NATS (a link may still be coming up
    // when the data has already gone round through the third node).
    for node in &nodes {
        common::wait_until(
            "two active links through NATS",
            Duration::from_secs(30),
            || async {
                let status = node.client().status().await.unwrap();
                let active = status["replication"]["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|p| {
                        p["state"] == "active"
                            && p["address"].as_str().unwrap_or("").starts_with("nats:")
                    })
                    .count();
                active == 2 && status["transport"]["connections"] == 2
            },
        )
        .await;
    }
}

/// The subject prefix of a cluster on the transport: `asp.t.` and the first 8 bytes of
/// the SHA-256 of its id, in hex (docs/CONNECTORS.md).
fn prefix(cluster: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cluster.as_bytes());
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("asp.t.{hex}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_nodes_subject_ends_no_replication() {
    let cluster = cluster();
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), &cluster, NATS, &["--listen", "off"]).await;
    let b = start(&dir.path().join("b"), &cluster, NATS, &["--listen", "off"]).await;
    put(&a, "before", "1").await;
    converge(&[&a, &b], "p", 1, Duration::from_secs(60)).await;
    // A client that is no node sends each node what a node would not: no headers,
    // unknown connections, a forged open followed by bytes that are no frames, numbers
    // out of order, and hellos that name no node.
    let client = async_nats::connect(NATS).await.unwrap();
    let p = prefix(&cluster);
    for node in [&a, &b] {
        let id = node.client().status().await.unwrap()["node_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let to = format!("{p}.to.{id}");
        let send = |conn: &str, kind: &str, n: Option<u64>, payload: &'static [u8]| {
            let mut h = async_nats::HeaderMap::new();
            h.insert("asp-conn", conn);
            h.insert("asp-from", "00000000000000ff");
            h.insert("asp-kind", kind);
            if let Some(n) = n {
                h.insert("asp-n", n.to_string().as_str());
            }
            client.publish_with_headers(to.clone(), h, Bytes::from_static(payload))
        };
        client
            .publish(to.clone(), Bytes::from_static(b"no headers"))
            .await
            .unwrap();
        send("zz", "data", Some(0), b"not hex").await.unwrap();
        send("1234", "data", Some(0), b"unknown connection")
            .await
            .unwrap();
        send("abcd", "open", None, b"").await.unwrap();
        send("abcd", "data", Some(0), b"\xff\xff\xff\xff not a frame")
            .await
            .unwrap();
        send("beef", "open", None, b"").await.unwrap();
        send("beef", "data", Some(7), b"out of order")
            .await
            .unwrap();
        send("beef", "what", None, b"").await.unwrap();
        client
            .publish(format!("{p}.hello"), Bytes::from_static(b"not a node id"))
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    // Both nodes still replicate both ways.
    put(&a, "after-a", "2").await;
    put(&b, "after-b", "3").await;
    converge(&[&a, &b], "p", 3, Duration::from_secs(60)).await;
    assert_eq!(
        digest(&a.client(), "p").await,
        digest(&b.client(), "p").await
    );
}
