//! The `counter` policy through the HTTP API of real `asp serve` processes: its
//! 64-bit bounds are refused with a 4xx, never wrapped; an observed reset takes back
//! what its node had seen and leaves a concurrent increment standing, on both nodes.

mod common;

use std::time::Duration;

use asp_faultnet::Proxy;
use asp_http::client::Client;
use axum::http::Method;
use bytes::Bytes;
use common::{Node, wait_until};

async fn post(c: &Client, body: &str) -> (u16, serde_json::Value) {
    let r = c
        .send(
            Method::POST,
            "/v1/ns/hits/kv/n",
            &[],
            Bytes::copy_from_slice(body.as_bytes()),
        )
        .await
        .unwrap();
    let answer = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
    (r.status.as_u16(), answer)
}

async fn value(c: &Client) -> Option<String> {
    let r = c
        .send(Method::GET, "/v1/ns/hits/kv/n", &[], Bytes::new())
        .await
        .unwrap();
    (r.status.as_u16() == 200).then(|| String::from_utf8_lossy(&r.body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_are_refused_and_a_reset_keeps_a_concurrent_increment() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("asp.toml");
    std::fs::write(&config, "[policies]\nhits = \"counter\"\n").unwrap();
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

    // The bounds: up to i64::MAX is taken; one more is refused with a 400, and the
    // value stays; a number beyond 64 bits is refused before it is a write; a move
    // back towards zero is taken.
    assert_eq!(
        post(&ca, &format!(r#"{{"incr":{}}}"#, i64::MAX)).await.0,
        200
    );
    let (status, answer) = post(&ca, r#"{"incr":1}"#).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_batch", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outside"),
        "{answer}"
    );
    assert_eq!(value(&ca).await.unwrap(), i64::MAX.to_string());
    let (status, answer) = post(&ca, r#"{"incr":9223372036854775808}"#).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_body", "{answer}");
    assert_eq!(post(&ca, r#"{"reset":false}"#).await.0, 400);
    assert_eq!(post(&ca, r#"{"incr":-1}"#).await.0, 200);
    assert_eq!(value(&ca).await.unwrap(), (i64::MAX - 1).to_string());

    // Back to 0 by a reset, and 10 more that both nodes hold.
    assert_eq!(post(&ca, r#"{"reset":true}"#).await.0, 200);
    assert_eq!(value(&ca).await.unwrap(), "0");
    assert_eq!(post(&ca, r#"{"incr":10}"#).await.0, 200);
    wait_until("B holds 10", Duration::from_secs(60), || async {
        value(&cb).await.as_deref() == Some("10")
    })
    .await;

    // Cut apart: A adds 5, which B has not seen when it resets.
    proxy.partition();
    assert_eq!(post(&ca, r#"{"incr":5}"#).await.0, 200);
    assert_eq!(post(&cb, r#"{"reset":true}"#).await.0, 200);
    assert_eq!(value(&cb).await.unwrap(), "0");
    assert_eq!(value(&ca).await.unwrap(), "15");
    proxy.heal();
    // The reset took back the 10 it saw; the 5 it had not seen stands, on both.
    for (name, c) in [("A", &ca), ("B", &cb)] {
        wait_until(
            &format!("{name} reads 5"),
            Duration::from_secs(60),
            || async { value(c).await.as_deref() == Some("5") },
        )
        .await;
    }
}
