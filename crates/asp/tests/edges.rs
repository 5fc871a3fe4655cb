//! Issue 12 ("Edges") with real processes: a write concern no cluster of this node can
//! meet, and a flood of half-open HTTP requests, which leave replication flowing.

mod common;

use std::time::{Duration, Instant};

use axum::http::{Method, header};
use bytes::Bytes;
use common::Node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn linked(node: &Node, peers: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = node.client().status().await.unwrap();
        let active = status["replication"]["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["state"] == "active")
            .count();
        if active >= peers {
            return;
        }
        assert!(Instant::now() < deadline, "not linked: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn put(node: &Node, query: &str) -> asp_http::client::Response {
    node.client()
        .send(
            Method::PUT,
            &format!("/v1/ns/w/kv/key?{query}"),
            &[(header::CONTENT_TYPE, "application/json")],
            Bytes::from_static(b"1"),
        )
        .await
        .unwrap()
}

// Guards against: replicas=N beyond this node and its peers waiting timeout_ms for
// acknowledgements that cannot come, then answering 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_concern_beyond_the_cluster_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[]).await;
    let b = Node::start(&dir.path().join("b"), &["--peer", &a.peer_addr()]).await;
    linked(&a, 1).await;
    linked(&b, 1).await;
    let r = put(&a, "replicas=3&timeout_ms=10000").await;
    let body = r.json().unwrap();
    assert_eq!(r.status.as_u16(), 409, "{body}");
    assert_eq!(body["error"]["code"], "replicas_unreachable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 2 nodes")
    );
    // Nothing was written.
    assert!(a.client().get("w", "key", None).await.unwrap().is_none());
    let r = put(&a, "replicas=2&timeout_ms=20000").await;
    assert_eq!(r.status.as_u16(), 200);
    let r = put(&b, "replicas=2&timeout_ms=20000").await;
    assert_eq!(r.status.as_u16(), 200);
}

// Guards against: half-open HTTP requests held open forever; while they are open,
// writes still replicate and the flood is closed after the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_open_requests_is_closed_and_replication_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("asp.toml");
    std::fs::write(
        &config,
        "[limits]\nheader_read_timeout_ms = 500\nhttp_connections_max = 2000\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let a = Node::start(&dir.path().join("a"), &["--config", config]).await;
    let b = Node::start(&dir.path().join("b"), &["--peer", &a.peer_addr()]).await;
    let mut flood = Vec::new();
    for _ in 0..1000 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", a.port))
            .await
            .unwrap();
        s.write_all(b"PUT /v1/ns/w/kv/x HTTP/1.1\r\nhost: a\r\ncontent-le")
            .await
            .unwrap();
        flood.push(s);
    }
    let r = put(&a, "replicas=2&timeout_ms=20000").await;
    assert_eq!(r.status.as_u16(), 200, "{:?}", r.json());
    assert!(b.client().get("w", "key", None).await.unwrap().is_some());
    for (i, s) in flood.iter_mut().enumerate() {
        let closed = tokio::time::timeout(Duration::from_secs(30), async {
            let mut buf = [0u8; 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "half-open request {i} still open after 30 s"
        );
    }
}
