//! Conflict policies between three real `asp serve` processes: concurrent writes to
//! the same keys while the nodes are cut apart, then healed; every node must end with
//! the documented outcome.

mod common;

use std::time::Duration;

use asp_faultnet::Proxy;
use asp_http::client::Client;
use axum::http::{HeaderName, Method};
use bytes::Bytes;
use common::{Node, converge, events};

async fn send(
    c: &Client,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Bytes) {
    let headers: Vec<(HeaderName, &str)> = headers
        .iter()
        .map(|(n, v)| (HeaderName::from_bytes(n.as_bytes()).unwrap(), *v))
        .collect();
    let r = c
        .send(
            method,
            path,
            &headers,
            Bytes::copy_from_slice(body.as_bytes()),
        )
        .await
        .unwrap();
    (r.status.as_u16(), r.body)
}

async fn ok(c: &Client, method: Method, path: &str, headers: &[(&str, &str)], body: &str) {
    let (status, answer) = send(c, method.clone(), path, headers, body).await;
    assert_eq!(
        status,
        200,
        "{method} {path}: {}",
        String::from_utf8_lossy(&answer)
    );
}

fn json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_on_three_nodes_end_as_each_policy_says() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("asp.toml");
    std::fs::write(
        &config,
        "[policies]\nhits = \"counter\"\ntags = \"set\"\ndocs = \"siblings\"\nprof = \"json-map\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    // A star: B and C reach A through proxies that can cut them off.
    let a = Node::start(&dir.path().join("a"), &["--config", config]).await;
    let to_a = a.peer_addr().parse().unwrap();
    let pb = Proxy::start("127.0.0.1:0".parse().unwrap(), to_a)
        .await
        .unwrap();
    let pc = Proxy::start("127.0.0.1:0".parse().unwrap(), to_a)
        .await
        .unwrap();
    let b = Node::start(
        &dir.path().join("b"),
        &["--config", config, "--peer", &pb.local_addr().to_string()],
    )
    .await;
    let c = Node::start(
        &dir.path().join("c"),
        &["--config", config, "--peer", &pc.local_addr().to_string()],
    )
    .await;
    let nodes = [&a, &b, &c];
    let clients: Vec<Client> = nodes.iter().map(|n| n.client()).collect();
    let json_h = [("content-type", "application/json")];

    // Before the cut: x is in the set, the map has a field, plain has a value.
    ok(
        &clients[0],
        Method::POST,
        "/v1/ns/tags/kv/t",
        &[],
        r#"{"add":"x"}"#,
    )
    .await;
    ok(
        &clients[0],
        Method::PATCH,
        "/v1/ns/prof/kv/p",
        &json_h,
        r#"{"keep":1}"#,
    )
    .await;
    ok(
        &clients[0],
        Method::PUT,
        "/v1/ns/plain/kv/k",
        &json_h,
        r#""before""#,
    )
    .await;
    converge(&nodes, "tags", 1, Duration::from_secs(30)).await;
    converge(&nodes, "prof", 1, Duration::from_secs(30)).await;
    converge(&nodes, "plain", 1, Duration::from_secs(30)).await;

    pb.partition();
    pc.partition();
    // Cut apart, each node writes the same keys.
    for (i, client) in clients.iter().enumerate() {
        let name = ["a", "b", "c"][i];
        ok(
            client,
            Method::PUT,
            "/v1/ns/plain/kv/k",
            &json_h,
            &format!(r#""{name}""#),
        )
        .await;
        ok(
            client,
            Method::PUT,
            "/v1/ns/docs/kv/d",
            &[("content-type", "text/plain")],
            name,
        )
        .await;
        ok(
            client,
            Method::PATCH,
            "/v1/ns/prof/kv/p",
            &json_h,
            &format!(r#"{{"who":"{name}","{name}":true}}"#),
        )
        .await;
        // Clock readings 10 ms apart, so that the lww outcome is the last write.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The set: A removes x, B adds x again, C adds y.
    let set_ops = [r#"{"remove":"x"}"#, r#"{"add":"x"}"#, r#"{"add":"y"}"#];
    for (client, op) in clients.iter().zip(set_ops) {
        ok(client, Method::POST, "/v1/ns/tags/kv/t", &[], op).await;
    }
    // The counter: 1,000 increments spread over the three, some while cut off.
    let mut expected = 0i64;
    for i in 0..1000usize {
        if i == 500 {
            pb.heal();
            pc.heal();
        }
        let by = if i % 10 == 0 { -3 } else { 1 + (i % 4) as i64 };
        expected += by;
        ok(
            &clients[i % 3],
            Method::POST,
            "/v1/ns/hits/kv/n",
            &[],
            &format!(r#"{{"incr":{by}}}"#),
        )
        .await;
    }
    pb.heal();
    pc.heal();
    converge(&nodes, "hits", 1000, Duration::from_secs(60)).await;
    converge(&nodes, "tags", 4, Duration::from_secs(60)).await;
    converge(&nodes, "docs", 3, Duration::from_secs(60)).await;
    converge(&nodes, "prof", 4, Duration::from_secs(60)).await;
    converge(&nodes, "plain", 4, Duration::from_secs(60)).await;

    for client in &clients {
        // counter: the exact sum.
        let (status, body) = send(client, Method::GET, "/v1/ns/hits/kv/n", &[], "").await;
        assert_eq!(status, 200);
        assert_eq!(String::from_utf8_lossy(&body), expected.to_string());
        // set: the concurrent add of x wins over A's remove.
        let (_, body) = send(client, Method::GET, "/v1/ns/tags/kv/t", &[], "").await;
        assert_eq!(json(&body), serde_json::json!(["x", "y"]));
        // siblings: all three writes kept.
        let (status, body) = send(client, Method::GET, "/v1/ns/docs/kv/d", &[], "").await;
        assert_eq!(status, 300);
        let mut values: Vec<String> = json(&body)["siblings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["value"].as_str().unwrap().to_owned())
            .collect();
        values.sort();
        assert_eq!(values, vec!["a", "b", "c"]);
        // json-map: per field, the last writer; fields only one wrote are all kept.
        let (_, body) = send(client, Method::GET, "/v1/ns/prof/kv/p", &[], "").await;
        assert_eq!(
            json(&body),
            serde_json::json!({"a": true, "b": true, "c": true, "keep": 1, "who": "c"})
        );
        // lww: the last write.
        let (_, body) = send(client, Method::GET, "/v1/ns/plain/kv/k", &[], "").await;
        assert_eq!(json(&body), serde_json::json!("c"));
    }
    assert_eq!(events(&clients[1], "hits").await, 1000);
}
