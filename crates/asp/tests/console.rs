//! The console's data with real processes: `GET /v1/cluster` on one node of three
//! shows every member with its own status, the convergence figures of the writes that
//! reached each node, and a member that stopped with its error; the stream sends the
//! same view; `/ui` is served whole from the binary. (The page itself, in a browser:
//! tests/browser.rs.)

mod common;

use std::time::Duration;

use asp_http::client::ClientError;
use axum::http::Method;
use bytes::Bytes;
use common::{Node, eventually, put_json};

async fn cluster(node: &Node) -> serde_json::Value {
    node.get_json("/v1/cluster").await
}

fn node_of<'a>(view: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {view}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_view_shows_every_member_its_convergence_and_who_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[]).await;
    let b = Node::start(&dir.path().join("b"), &["--peer", &a.peer_addr()]).await;
    let mut c = Node::start(&dir.path().join("c"), &["--peer", &b.peer_addr()]).await;
    let ids = [a.node_id().await, b.node_id().await, c.node_id().await];
    // Writes at the ends of the line: each travels through b.
    for i in 0..10 {
        put_json(&a, "app", &format!("a{i}"), "1").await;
        put_json(&c, "app", &format!("c{i}"), "2").await;
    }
    common::converge(&[&a, &b, &c], "app", 20, Duration::from_secs(30)).await;
    let view = eventually("every member and its status in a's view", async || {
        let v = cluster(&a).await;
        let complete = ids.iter().all(|id| {
            v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["node_id"] == id.as_str() && n["status"].is_object())
        });
        complete.then_some(v)
    })
    .await;
    assert_eq!(view["node_id"], ids[0].as_str());
    assert_eq!(view["nodes"].as_array().unwrap().len(), 3, "{view}");
    let this = node_of(&view, &ids[0]);
    assert_eq!(this["this_node"], true);
    // Each member's status is its own (its node id, its feed).
    for id in &ids {
        let n = node_of(&view, id);
        assert_eq!(n["status"]["node_id"], id.as_str(), "{n}");
        assert!(n["error"].is_null(), "{n}");
    }
    // c received a's ten writes (through b), and says how long they took.
    let at_c = &node_of(&view, &ids[2])["status"]["convergence"];
    assert_eq!(at_c["window_ms"], 300_000);
    let from_a = at_c["origins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["origin"] == ids[0].as_str())
        .unwrap_or_else(|| panic!("{at_c}"));
    assert_eq!(from_a["events"], 10, "{from_a}");
    let (p50, p99, max) = (
        from_a["p50_ms"].as_u64().unwrap(),
        from_a["p99_ms"].as_u64().unwrap(),
        from_a["max_ms"].as_u64().unwrap(),
    );
    assert!(p50 <= p99 && p99 <= max, "{from_a}");
    // A node does not count its own writes.
    let at_a = &node_of(&view, &ids[0])["status"]["convergence"]["origins"];
    assert!(
        at_a.as_array()
            .unwrap()
            .iter()
            .all(|o| o["origin"] != ids[0].as_str()),
        "{at_a}"
    );
    // Namespaces carry their policy and mode.
    let ns = &this["status"]["namespaces"][0];
    assert_eq!(ns["name"], "app");
    assert_eq!(ns["policy"], "lww");
    assert!(ns["mode"].is_object(), "{ns}");

    // The stream: the same view as an event at once.
    let mut stream = a
        .client()
        .stream("/v1/cluster/stream?interval_ms=250", &[])
        .await
        .unwrap();
    let event = stream.next().await.unwrap().expect("an event");
    assert_eq!(event.event.as_deref(), Some("cluster"));
    let streamed: serde_json::Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!(streamed["nodes"].as_array().unwrap().len(), 3);
    let next = stream.next().await.unwrap().expect("a second event");
    assert_eq!(next.event.as_deref(), Some("cluster"));
    drop(stream);

    // A member that stopped: listed, with its error, and no status.
    c.kill();
    let gone = eventually("c listed with an error", async || {
        let v = cluster(&a).await;
        let n = node_of(&v, &ids[2]).clone();
        n["error"].is_string().then_some(n)
    })
    .await;
    assert!(gone["status"].is_null(), "{gone}");

    // Bad intervals are refused with the range.
    for bad in ["interval_ms=10", "interval_ms=600000", "every=1"] {
        let e = a
            .client()
            .send(
                Method::GET,
                &format!("/v1/cluster/stream?{bad}"),
                &[],
                Bytes::new(),
            )
            .await
            .unwrap()
            .ok()
            .unwrap_err();
        match e {
            ClientError::Api { status, code, .. } => {
                assert_eq!(
                    (status.as_u16(), code.as_str()),
                    (400, "invalid_query"),
                    "{bad}"
                )
            }
            e => panic!("{bad}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_page_and_its_assets_come_from_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[]).await;
    // The namespace counts the page shows: keys, deleted keys, value bytes.
    for k in ["x", "y", "z"] {
        put_json(&a, "app", k, "12345").await;
    }
    put_json(&a, "app", "x", "1").await;
    a.client().delete("app", "y", None).await.unwrap();
    let stats = a.get_json("/v1/ns/app/stats").await;
    assert_eq!(
        (
            &stats["keys"],
            &stats["deleted_keys"],
            &stats["value_bytes"],
            &stats["complete"]
        ),
        (
            &serde_json::json!(2),
            &serde_json::json!(1),
            &serde_json::json!(6),
            &serde_json::json!(true)
        ),
        "{stats}"
    );
    assert!(stats["keys_with_siblings"].is_null(), "{stats}");
    // A siblings namespace: two writes without a context leave two siblings; a third
    // key has one value.
    a.client()
        .send(
            Method::PUT,
            "/v1/ns/sib/policy",
            &[],
            Bytes::from_static(br#"{"policy":"siblings"}"#),
        )
        .await
        .unwrap()
        .ok()
        .unwrap();
    for (k, v) in [("s", "1"), ("s", "2"), ("t", "3")] {
        put_json(&a, "sib", k, v).await;
    }
    let stats = a.get_json("/v1/ns/sib/stats").await;
    assert_eq!(stats["keys"], 2, "{stats}");
    assert_eq!(stats["keys_with_siblings"], 1, "{stats}");
    for (path, kind, text) in [
        ("/ui", "text/html", "asp console"),
        ("/ui/app.js", "text/javascript", "/v1/cluster/stream"),
        ("/ui/app.css", "text/css", "--accent"),
    ] {
        let r = a
            .client()
            .send(Method::GET, path, &[], Bytes::new())
            .await
            .unwrap()
            .ok()
            .unwrap();
        assert!(
            r.header("content-type").unwrap().starts_with(kind),
            "{path}"
        );
        assert!(
            r.header("content-security-policy")
                .unwrap()
                .contains("default-src 'self'"),
            "{path}"
        );
        assert!(String::from_utf8_lossy(&r.body).contains(text), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_told_the_advertised_addresses_and_the_view_uses_them() {
    // b binds 127.0.0.1 but tells its members `localhost` names (as a pod tells its
    // DNS name while it binds 0.0.0.0): a lists them, and asks b's status through them.
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[]).await;
    let mut b = Node::start(&dir.path().join("b"), &["--peer", &a.peer_addr()]).await;
    let api = format!("http://localhost:{}", b.port);
    let peer = format!("localhost:{}", b.peer_port);
    b.extra.extend([
        "--advertise-api".into(),
        api.clone(),
        "--advertise-peer".into(),
        peer.clone(),
    ]);
    b.signal(15);
    b.restart().await;
    let b_id = b.node_id().await;
    let member = eventually("b's member record at a", async || {
        let status = a.client().status().await.unwrap();
        status["replication"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["node_id"] == b_id.as_str())
            // a may still hold the record b told it before the restart (its bound
            // address) until the restarted b's first exchange reaches it.
            .filter(|m| m["api"] == api.as_str())
            .cloned()
    })
    .await;
    assert_eq!(member["api"], api.as_str(), "{member}");
    assert_eq!(member["peer"], peer.as_str(), "{member}");
    let view = eventually("b's status through its advertised API", async || {
        let v = cluster(&a).await;
        let n = node_of(&v, &b_id).clone();
        (n["api"] == api.as_str() && n["status"].is_object()).then_some(n)
    })
    .await;
    assert_eq!(view["api"], api.as_str());
    assert_eq!(view["status"]["node_id"], b_id.as_str());
}
