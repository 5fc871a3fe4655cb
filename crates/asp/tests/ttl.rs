//! TTL keys and keys bound to leases, on real processes: they disappear on every node,
//! and each shows one delete in every node's change feed.

mod common;

use asp_http::client::Client;
use axum::http::{Method, StatusCode};
use bytes::Bytes;
use common::{Node, eventually};
use serde_json::{Value, json};

async fn call(c: &Client, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
    let r = c
        .send(
            method,
            path,
            &[(axum::http::header::CONTENT_TYPE, "application/json")],
            Bytes::from(body.to_string()),
        )
        .await
        .unwrap();
    let v = r.json().unwrap_or(Value::Null);
    (r.status, v)
}

/// The change feed of namespace `ns` on `c`: (op, key, expires_ms) of every event.
async fn feed(c: &Client, ns: &str) -> Vec<(String, String, Option<u64>)> {
    let (status, page) = call(
        c,
        Method::GET,
        &format!("/v1/ns/{ns}/changes?since=0&limit=1000"),
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["op"].as_str().unwrap().to_owned(),
                e["key"].as_str().unwrap().to_owned(),
                e["expires_ms"].as_u64(),
            )
        })
        .collect()
}

fn deletes_of(feed: &[(String, String, Option<u64>)], key: &str) -> usize {
    feed.iter()
        .filter(|(op, k, _)| op == "delete" && k == key)
        .count()
}

async fn listed(c: &Client, ns: &str) -> Vec<String> {
    let (_, page) = call(c, Method::GET, &format!("/v1/ns/{ns}/kv"), Value::Null).await;
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["key"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_keys_disappear_on_all_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[]).await;
    let b = Node::start(&dir.path().join("b"), &["--peer", &a.peer_addr()]).await;
    let c = Node::start(&dir.path().join("c"), &["--peer", &b.peer_addr()]).await;
    let (status, put) = call(
        &b.client(),
        Method::PUT,
        "/v1/ns/cache/kv/session?ttl_ms=1500",
        json!("short-lived"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{put}");
    let expires = put["expires_ms"].as_u64().unwrap();
    assert_eq!(expires, put["hlc"]["physical_ms"].as_u64().unwrap() + 1500);
    let (status, batch) = call(
        &a.client(),
        Method::POST,
        "/v1/ns/cache/batch",
        json!({"ops": [
            {"op": "put", "key": "token", "value": 1, "ttl_ms": 1000},
            {"op": "put", "key": "kept", "value": 2},
        ]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    assert!(batch["results"][0]["expires_ms"].is_u64(), "{batch}");
    assert!(batch["results"][1].get("expires_ms").is_none(), "{batch}");

    for n in [&a, &b, &c] {
        let client = n.client();
        eventually(
            "both expired keys are gone, each deleted once",
            async || {
                let f = feed(&client, "cache").await;
                let puts_seen = f
                    .iter()
                    .filter(|(op, _, e)| op == "put" && e.is_some())
                    .count();
                (puts_seen == 2 && deletes_of(&f, "session") == 1 && deletes_of(&f, "token") == 1)
                    .then_some(())
            },
        )
        .await;
        for key in ["session", "token"] {
            assert!(client.get("cache", key, None).await.unwrap().is_none());
        }
        assert!(client.get("cache", "kept", None).await.unwrap().is_some());
        assert_eq!(listed(&client, "cache").await, ["kept"]);
    }
    // Still once, a while later, everywhere: no node deletes it again.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    for n in [&a, &b, &c] {
        let f = feed(&n.client(), "cache").await;
        assert_eq!(
            (deletes_of(&f, "session"), deletes_of(&f, "token")),
            (1, 1),
            "{f:?}"
        );
    }

    // Bad requests.
    for (method, path, body, code) in [
        (
            Method::PUT,
            "/v1/ns/cache/kv/x?ttl_ms=0",
            json!(1),
            "invalid_query",
        ),
        (
            Method::PUT,
            "/v1/ns/cache/kv/x?ttl_ms=-5",
            json!(1),
            "invalid_query",
        ),
        (
            Method::PUT,
            "/v1/ns/cache/kv/x?ttl_ms=315360000001",
            json!(1),
            "invalid_query",
        ),
        (
            Method::DELETE,
            "/v1/ns/cache/kv/x?ttl_ms=5",
            Value::Null,
            "invalid_query",
        ),
        (
            Method::POST,
            "/v1/ns/cache/batch?ttl_ms=5",
            json!({"ops": [{"op": "put", "key": "k", "value": 1}]}),
            "invalid_query",
        ),
        (
            Method::POST,
            "/v1/ns/cache/batch",
            json!({"ops": [{"op": "delete", "key": "k", "ttl_ms": 5}]}),
            "invalid_batch",
        ),
    ] {
        let (status, err) = call(&a.client(), method, path, body).await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{path}: {err}"
        );
    }
    // Only lww namespaces expire keys.
    let (status, _) = call(
        &a.client(),
        Method::PUT,
        "/v1/ns/tally/policy",
        json!({"policy": "siblings"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, err) = call(
        &a.client(),
        Method::PUT,
        "/v1/ns/tally/kv/x?ttl_ms=100",
        json!(1),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("wrong_policy")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_bound_to_a_lease_vanishes_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[]).await;
    let b = Node::start(&dir.path().join("b"), &["--peer", &a.peer_addr()]).await;
    let ida = a.client().status().await.unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Multi-master: no leases, so nothing to bind to.
    let (status, err) = call(
        &a.client(),
        Method::PUT,
        "/v1/ns/jobs/kv/worker?lease=job-1",
        json!("w1"),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("mode_conflict")),
        "{err}"
    );
    let (status, view) = call(
        &a.client(),
        Method::PUT,
        "/v1/ns/jobs/mode",
        json!({"mode": "leader", "leader": ida}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    eventually("B knows the mode", async || {
        let (_, m) = call(&b.client(), Method::GET, "/v1/ns/jobs/mode", Value::Null).await;
        (m["epoch"] == view["epoch"]).then_some(())
    })
    .await;
    // No such lease yet.
    let (status, err) = call(
        &a.client(),
        Method::PUT,
        "/v1/ns/jobs/kv/worker?lease=job-1",
        json!("w1"),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("lease_lost")),
        "{err}"
    );
    let (status, lease) = call(
        &a.client(),
        Method::POST,
        "/v1/ns/jobs/leases",
        json!({"name": "job-1", "holder": "w1", "ttl_ms": 60000}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{lease}");
    let token = lease["token"].as_u64().unwrap();
    let (status, put) = call(
        &a.client(),
        Method::PUT,
        "/v1/ns/jobs/kv/worker?lease=job-1",
        json!("w1"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{put}");
    // A follower refuses it, naming the leader.
    let (status, err) = call(
        &b.client(),
        Method::PUT,
        "/v1/ns/jobs/kv/other?lease=job-1",
        json!("w1"),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("not_leader")),
        "{err}"
    );
    let (status, _) = call(
        &a.client(),
        Method::PUT,
        "/v1/ns/jobs/kv/unbound",
        json!("stays"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    eventually("B holds the bound key", async || {
        b.client().get("jobs", "worker", None).await.unwrap()
    })
    .await;
    // While the lease holds, the key stays (the leader looks at bindings every second).
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert!(
        a.client()
            .get("jobs", "worker", None)
            .await
            .unwrap()
            .is_some()
    );

    let (status, released) = call(
        &a.client(),
        Method::DELETE,
        &format!("/v1/ns/jobs/leases/job-1?token={token}"),
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{released}");
    for n in [&a, &b] {
        let client = n.client();
        eventually("the bound key is deleted with the lease", async || {
            let f = feed(&client, "jobs").await;
            (deletes_of(&f, "worker") == 1).then_some(())
        })
        .await;
        assert!(client.get("jobs", "worker", None).await.unwrap().is_none());
        assert!(client.get("jobs", "unbound", None).await.unwrap().is_some());
    }
}
