//! The `json-map` policy between two real `asp serve` processes cut apart: nested
//! objects merge per path at every depth, and a removal of a parent meets a write
//! below it as docs/CONFLICTS.md says (the write it did not see stays: add-wins).

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use asp_faultnet::Proxy;
use asp_http::client::Client;
use axum::http::{HeaderName, Method};
use bytes::Bytes;
use common::{Node, converge, wait_until};

/// Two nodes, B reaching A through a proxy that can cut it off, both with the
/// json-map namespace `prof`.
struct Pair {
    _dir: tempfile::TempDir,
    a: Node,
    b: Node,
    proxy: Proxy,
}

async fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("asp.toml");
    std::fs::write(&config, "[policies]\nprof = \"json-map\"\n").unwrap();
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
    Pair {
        _dir: dir,
        a,
        b,
        proxy,
    }
}

/// PATCHes `key` of `prof` with `patch`; returns the write's clock reading
/// (physical ms, logical).
async fn patch(c: &Client, key: &str, patch: &str) -> (u64, u64) {
    let r = c
        .send(
            Method::PATCH,
            &format!("/v1/ns/prof/kv/{key}"),
            &[(
                HeaderName::from_static("content-type"),
                "application/merge-patch+json",
            )],
            Bytes::copy_from_slice(patch.as_bytes()),
        )
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(r.status.as_u16(), 200, "PATCH {key} {patch}: {body}");
    let hlc = &body["hlc"];
    (
        hlc["physical_ms"].as_u64().unwrap(),
        hlc["logical"].as_u64().unwrap(),
    )
}

async fn get(c: &Client, key: &str) -> serde_json::Value {
    let r = c
        .send(
            Method::GET,
            &format!("/v1/ns/prof/kv/{key}"),
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 200);
    serde_json::from_slice(&r.body).unwrap()
}

/// Waits until the wall clock has passed `hlc`'s millisecond, so that a write made
/// next, on any node of this machine, reads a later clock (a node's clock never runs
/// behind the wall clock). Not a timing assertion: it only orders two writes.
async fn after(hlc: (u64, u64)) {
    wait_until(
        "the wall clock passes a write's",
        Duration::from_secs(10),
        || async move {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            now_ms > hlc.0
        },
    )
    .await;
}

/// Guards against issue 18: two nodes cut off from each other patched different
/// fields of one nested object; after healing both held only one side's `langs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_patches_written_apart_merge_at_every_depth() {
    let p = pair().await;
    let (a, b) = (p.a.client(), p.b.client());
    p.proxy.partition();
    patch(&a, "ada", r#"{"name":"Ada","langs":{"en":true}}"#).await;
    patch(&b, "ada", r#"{"born":1815,"langs":{"fr":true}}"#).await;
    // Three deep too, and a removal one side made of a field only it had.
    patch(&a, "deep", r#"{"x":{"y":{"a":1,"gone":0}}}"#).await;
    patch(&a, "deep", r#"{"x":{"y":{"gone":null}}}"#).await;
    patch(&b, "deep", r#"{"x":{"y":{"b":[1,{"z":2}]},"w":"b"}}"#).await;
    p.proxy.heal();
    converge(&[&p.a, &p.b], "prof", 5, Duration::from_secs(60)).await;
    for c in [&a, &b] {
        assert_eq!(
            get(c, "ada").await,
            serde_json::json!({"name": "Ada", "born": 1815, "langs": {"en": true, "fr": true}})
        );
        assert_eq!(
            get(c, "deep").await,
            serde_json::json!({"x": {"y": {"a": 1, "b": [1, {"z": 2}]}, "w": "b"}})
        );
    }
}

/// A removal of a parent concurrent with a write below it: the write stays, in both
/// clock orders (add-wins), and the parent shows as an object holding only it — what
/// the removal saw is gone. A removal made after it saw the write takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_parent_against_setting_a_child_keeps_the_child() {
    let p = pair().await;
    let (a, b) = (p.a.client(), p.b.client());
    for key in ["remove-later", "set-later"] {
        patch(&a, key, r#"{"p":{"old":1},"q":3}"#).await;
    }
    converge(&[&p.a, &p.b], "prof", 2, Duration::from_secs(60)).await;
    p.proxy.partition();
    // B sets a child, then A (later) removes the parent.
    let set = patch(&b, "remove-later", r#"{"p":{"new":2}}"#).await;
    after(set).await;
    let remove = patch(&a, "remove-later", r#"{"p":null}"#).await;
    assert!(remove > set, "the removal reads the later clock");
    // A removes the parent, then B (later) sets a child.
    let remove = patch(&a, "set-later", r#"{"p":null}"#).await;
    after(remove).await;
    let set = patch(&b, "set-later", r#"{"p":{"new":2}}"#).await;
    assert!(set > remove, "the set reads the later clock");
    p.proxy.heal();
    converge(&[&p.a, &p.b], "prof", 6, Duration::from_secs(60)).await;
    for c in [&a, &b] {
        for key in ["remove-later", "set-later"] {
            assert_eq!(
                get(c, key).await,
                serde_json::json!({"p": {"new": 2}, "q": 3}),
                "{key}"
            );
        }
    }
    // Now A has seen B's child: its removal takes it, on both.
    patch(&a, "set-later", r#"{"p":null}"#).await;
    converge(&[&p.a, &p.b], "prof", 7, Duration::from_secs(60)).await;
    for c in [&a, &b] {
        assert_eq!(get(c, "set-later").await, serde_json::json!({"q": 3}));
    }
}
