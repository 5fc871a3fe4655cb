//! Leader namespaces on real processes: followers refuse writes naming the leader, a
//! promotion fences the old leader, and what the old leader accepted while cut off is
//! kept, merged and listed as divergent.

mod common;

use std::time::Duration;

use asp_faultnet::Proxy;
use asp_http::client::Client;
use axum::http::{Method, StatusCode};
use bytes::Bytes;
use common::{Node, digest, eventually};
use serde_json::{Value, json};

async fn node_id(n: &Node) -> String {
    n.client().status().await.unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

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

async fn put(c: &Client, key: &str, value: &str) -> (StatusCode, Value) {
    call(
        c,
        Method::PUT,
        &format!("/v1/ns/orders/kv/{key}"),
        json!(value),
    )
    .await
}

async fn mode(c: &Client) -> Value {
    call(c, Method::GET, "/v1/ns/orders/mode", Value::Null)
        .await
        .1
}

/// Sets the mode of "orders" on `on` and waits until each of `others` knows its epoch;
/// returns the view `on` answered.
async fn set_mode(on: &Node, others: &[&Node], body: Value) -> Value {
    let (status, view) = call(&on.client(), Method::PUT, "/v1/ns/orders/mode", body).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    for n in others {
        eventually("the mode reaches every node", async || {
            (mode(&n.client()).await["epoch"] == view["epoch"]).then_some(())
        })
        .await;
    }
    view
}

/// A, B and C in a triangle; A's two links go through proxies, so that A can be cut
/// off from both.
async fn triangle(dir: &std::path::Path) -> (Node, Node, Node, Proxy, Proxy) {
    let a = Node::start(&dir.join("a"), &[]).await;
    let to_a_from_b = Proxy::start(
        "127.0.0.1:0".parse().unwrap(),
        a.peer_addr().parse().unwrap(),
    )
    .await
    .unwrap();
    let to_a_from_c = Proxy::start(
        "127.0.0.1:0".parse().unwrap(),
        a.peer_addr().parse().unwrap(),
    )
    .await
    .unwrap();
    let b = Node::start(
        &dir.join("b"),
        &["--peer", &to_a_from_b.local_addr().to_string()],
    )
    .await;
    let c = Node::start(
        &dir.join("c"),
        &[
            "--peer",
            &to_a_from_c.local_addr().to_string(),
            "--peer",
            &b.peer_addr(),
        ],
    )
    .await;
    (a, b, c, to_a_from_b, to_a_from_c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_fences_the_old_leader_and_keeps_its_divergent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c, p1, p2) = triangle(dir.path()).await;
    let (ida, idb) = (node_id(&a).await, node_id(&b).await);

    let view = set_mode(&a, &[&b, &c], json!({"mode": "leader", "leader": ida})).await;
    assert_eq!(view["epoch"], 1);
    assert_eq!(view["this_node"]["role"], "leader");
    for n in [&b, &c] {
        assert_eq!(mode(&n.client()).await["leader"], ida.as_str());
    }
    assert_eq!(put(&a.client(), "k1", "one").await.0, StatusCode::OK);

    // A follower refuses, naming the leader and where its API is.
    let (status, err) = put(&b.client(), "k1", "from b").await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert_eq!(err["error"]["code"], "not_leader");
    assert_eq!(err["error"]["leader"], ida.as_str());
    assert_eq!(err["error"]["leader_api"], a.url());
    assert_eq!(err["error"]["epoch"], 1);

    // A is cut off, and goes on accepting writes: it does not know yet.
    eventually("k1 reaches B", async || {
        b.client()
            .get("orders", "k1", None)
            .await
            .unwrap()
            .map(|_| ())
    })
    .await;
    p1.partition();
    p2.partition();
    for i in 0..5 {
        let (status, body) = put(&a.client(), &format!("tail{i}"), "written by A alone").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    // B is promoted by hand (no voters: the operator's word).
    let (status, view) = call(
        &b.client(),
        Method::POST,
        "/v1/ns/orders/promote",
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["epoch"], 2);
    assert_eq!(view["this_node"]["role"], "leader");
    assert_eq!(put(&b.client(), "k2", "two").await.0, StatusCode::OK);
    eventually("C follows B", async || {
        let (status, err) = put(&c.client(), "k3", "from c").await;
        (status == StatusCode::CONFLICT && err["error"]["leader"] == idb.as_str()).then_some(())
    })
    .await;

    // Healed: A learns epoch 2 and is fenced; its tail reaches everyone, is kept, and
    // is listed as divergent.
    p1.heal();
    p2.heal();
    // (Asked by reads: a write A accepted before it heard would join its tail.)
    eventually("A learns epoch 2", async || {
        (mode(&a.client()).await["this_node"]["role"] == "fenced").then_some(())
    })
    .await;
    let (status, err) = put(&a.client(), "k4", "from a").await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert_eq!(err["error"]["code"], "fenced");
    assert_eq!(err["error"]["leader"], idb.as_str());
    for n in [&a, &b, &c] {
        for i in 0..5 {
            let key = format!("tail{i}");
            eventually("A's tail is kept on every node", async || {
                n.client()
                    .get("orders", &key, None)
                    .await
                    .unwrap()
                    .map(|_| ())
            })
            .await;
        }
        let what = format!("the tail is listed as divergent on {}", n.url());
        let listed = eventually(&what, async || {
            let (_, list) = call(
                &n.client(),
                Method::GET,
                "/v1/ns/orders/divergent",
                Value::Null,
            )
            .await;
            let events = list["events"].as_array().cloned().unwrap_or_default();
            (events.len() == 5).then_some(events)
        })
        .await;
        let mut keys: Vec<&str> = listed.iter().map(|e| e["key"].as_str().unwrap()).collect();
        keys.sort();
        assert_eq!(keys, ["tail0", "tail1", "tail2", "tail3", "tail4"]);
        assert!(listed.iter().all(|e| e["epoch"] == 1));
    }
    eventually("the three nodes converge", async || {
        let d = digest(&a.client(), "orders").await;
        (d == digest(&b.client(), "orders").await && d == digest(&c.client(), "orders").await)
            .then_some(())
    })
    .await;
    // k1 was in line: not listed.
    let (_, list) = call(
        &b.client(),
        Method::GET,
        "/v1/ns/orders/divergent",
        Value::Null,
    )
    .await;
    assert!(!list.to_string().contains("\"k1\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_with_voters_needs_a_majority() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c, p1, p2) = triangle(dir.path()).await;
    let (ida, idb, idc) = (node_id(&a).await, node_id(&b).await, node_id(&c).await);
    let voters = json!({"mode": "leader", "leader": ida, "voters": [ida, idb, idc]});
    set_mode(&a, &[&b, &c], voters).await;
    for n in [&b, &c] {
        assert_eq!(
            mode(&n.client()).await["voters"].as_array().map(Vec::len),
            Some(3)
        );
    }
    assert_eq!(put(&a.client(), "k1", "one").await.0, StatusCode::OK);
    eventually("k1 reaches B and C", async || {
        let on_b = b.client().get("orders", "k1", None).await.unwrap();
        let on_c = c.client().get("orders", "k1", None).await.unwrap();
        (on_b.is_some() && on_c.is_some()).then_some(())
    })
    .await;

    // A is cut off; B, with C's vote, takes epoch 2. Asking A changes nothing: it
    // still leads epoch 1 as far as it knows.
    p1.partition();
    p2.partition();
    let (status, view) = call(
        &a.client(),
        Method::POST,
        "/v1/ns/orders/promote",
        json!({"timeout_ms": 1500}),
    )
    .await;
    assert_eq!((status, view["epoch"].as_u64()), (StatusCode::OK, Some(1)));
    let (status, view) = call(
        &b.client(),
        Method::POST,
        "/v1/ns/orders/promote",
        json!({"timeout_ms": 20000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["this_node"]["role"], "leader");
    assert_eq!(view["epoch"], 2);
    p1.heal();
    p2.heal();
    for n in [&a, &b, &c] {
        eventually("every node knows epoch 2", async || {
            (mode(&n.client()).await["epoch"] == 2).then_some(())
        })
        .await;
    }
    assert_eq!(mode(&a.client()).await["this_node"]["role"], "fenced");
    assert_eq!(mode(&c.client()).await["this_node"]["role"], "follower");

    // With B and C gone, A has one vote of three: no quorum, and nothing changes.
    let (mut b, mut c) = (b, c);
    b.kill();
    c.kill();
    let (status, err) = call(
        &a.client(),
        Method::POST,
        "/v1/ns/orders/promote",
        json!({"timeout_ms": 1500}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert_eq!(err["error"]["code"], "no_quorum");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("1 of 3"),
        "{err}"
    );
    let view = mode(&a.client()).await;
    assert_eq!(
        (view["epoch"].as_u64(), view["this_node"]["role"].as_str()),
        (Some(2), Some("fenced"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_told_one_peer_learns_every_member_and_dials_them() {
    // A line: A <- B <- C <- D. D is told only of C, and may dial whom it learns of.
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[]).await;
    let b = Node::start(&dir.path().join("b"), &["--peer", &a.peer_addr()]).await;
    let c = Node::start(&dir.path().join("c"), &["--peer", &b.peer_addr()]).await;
    let d = Node::start(
        &dir.path().join("d"),
        &["--peer", &c.peer_addr(), "--dial-members"],
    )
    .await;
    let mut ids = Vec::new();
    for n in [&a, &b, &c, &d] {
        ids.push(node_id(n).await);
    }
    ids.sort();
    let status = eventually("D lists all four members, alive", async || {
        let status = d.client().status().await.unwrap();
        let members = status["replication"]["members"].as_array()?.clone();
        let mut seen: Vec<String> = members
            .iter()
            .filter(|m| m["state"] == "alive")
            .map(|m| m["node_id"].as_str().unwrap().to_owned())
            .collect();
        seen.sort();
        (seen == ids).then_some(status)
    })
    .await;
    let members = status["replication"]["members"].as_array().unwrap();
    assert_eq!(members[0]["this_node"], true);
    let ida = node_id(&a).await;
    let a_entry = members
        .iter()
        .find(|m| m["node_id"] == ida.as_str())
        .unwrap();
    assert_eq!(a_entry["api"], a.url());
    assert_eq!(a_entry["peer"], a.peer_addr());
    // D dials A, B and C itself: a link to each, not only to C.
    eventually("D links to every member", async || {
        let status = d.client().status().await.unwrap();
        let active = status["replication"]["peers"]
            .as_array()?
            .iter()
            .filter(|p| p["state"] == "active")
            .count();
        (active == 3).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_voters_fail_over_when_the_leader_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c, p1, p2) = triangle(dir.path()).await;
    let (ida, idb, idc) = (node_id(&a).await, node_id(&b).await, node_id(&c).await);
    let voters = json!({"mode": "leader", "leader": ida, "voters": [ida, idb, idc]});
    set_mode(&a, &[&b, &c], voters).await;
    assert_eq!(put(&a.client(), "before", "1").await.0, StatusCode::OK);
    for n in [&b, &c] {
        eventually("the write and the mode reach B and C", async || {
            let has = n
                .client()
                .get("orders", "before", None)
                .await
                .unwrap()
                .is_some();
            (has && mode(&n.client()).await["epoch"] == 1).then_some(())
        })
        .await;
    }
    // A is cut off and goes on accepting writes: it does not know.
    p1.partition();
    p2.partition();
    let (status, body) = put(&a.client(), "cut-off", "A alone").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Past the failover time (5 s), B or C leads epoch 2 (or later, after a split
    // vote), elected by the two of them.
    let (leader, epoch) = eventually("B or C takes over", async || {
        for (n, id) in [(&b, &idb), (&c, &idc)] {
            let v = mode(&n.client()).await;
            if v["this_node"]["role"] == "leader" {
                return Some((id.clone(), v["epoch"].as_u64().unwrap()));
            }
        }
        None
    })
    .await;
    assert!(epoch >= 2);
    // The new leader takes writes (B or C: a later election may have moved it).
    eventually("a write at the new leader", async || {
        for n in [&b, &c] {
            if put(&n.client(), "after", "2").await.0 == StatusCode::OK {
                return Some(());
            }
        }
        None
    })
    .await;
    p1.heal();
    p2.heal();
    eventually("A learns it is fenced", async || {
        (mode(&a.client()).await["this_node"]["role"] == "fenced").then_some(())
    })
    .await;
    let (status, err) = put(&a.client(), "again", "A").await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("fenced"))
    );
    // The leader of the epoch that fenced A: the one seen above, or (a later election
    // on a busy machine, when heartbeats came late) B or C in a later epoch.
    let fenced_epoch = err["error"]["epoch"].as_u64().unwrap();
    let fenced_by = err["error"]["leader"].as_str().unwrap();
    assert!(fenced_epoch >= epoch, "{err}");
    if fenced_epoch == epoch {
        assert_eq!(fenced_by, leader.as_str(), "{err}");
    } else {
        assert!(fenced_by == idb || fenced_by == idc, "{err}");
    }
    // A's write while cut off is on every node, and listed as divergent. On a
    // timeout, what each node holds and knows is shown.
    let started = std::time::Instant::now();
    for (name, n) in [("A", &a), ("B", &b), ("C", &c)] {
        loop {
            let kept = n
                .client()
                .get("orders", "cut-off", None)
                .await
                .unwrap()
                .is_some();
            let (_, list) = call(
                &n.client(),
                Method::GET,
                "/v1/ns/orders/divergent",
                Value::Null,
            )
            .await;
            let listed = list["events"]
                .as_array()
                .is_some_and(|e| e.len() == 1 && e[0]["key"] == "cut-off");
            if kept && listed {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let mut seen = String::new();
                for (other, m) in [("A", &a), ("B", &b), ("C", &c)] {
                    let (_, l) = call(
                        &m.client(),
                        Method::GET,
                        "/v1/ns/orders/divergent",
                        Value::Null,
                    )
                    .await;
                    let kept = m.client().get("orders", "cut-off", None).await.ok();
                    let kept = kept.flatten().is_some();
                    seen.push_str(&format!(
                        "\n{other}: cut-off kept {kept}; divergent {l}; mode {}",
                        mode(&m.client()).await
                    ));
                }
                panic!("A's lone write is not kept and listed on {name} within 60 s:{seen}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn lease(c: &Client, body: Value) -> (StatusCode, Value) {
    call(c, Method::POST, "/v1/ns/orders/leases", body).await
}

async fn fenced_put(c: &Client, key: &str, fence: &str) -> (StatusCode, Value) {
    let r = c
        .send(
            Method::PUT,
            &format!("/v1/ns/orders/kv/{key}"),
            &[
                (axum::http::header::CONTENT_TYPE, "application/json"),
                (axum::http::HeaderName::from_static("if-fence"), fence),
            ],
            Bytes::from_static(b"\"fenced write\""),
        )
        .await
        .unwrap();
    let v = r.json().unwrap_or(Value::Null);
    (r.status, v)
}

/// Waits until lease job-1 no longer binds on `n` (it expired).
async fn expired(n: &Node) {
    eventually("the lease expires", async || {
        let (_, l) = call(
            &n.client(),
            Method::GET,
            "/v1/ns/orders/leases/job-1",
            Value::Null,
        )
        .await;
        (l["held"] == false).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_tokens_only_grow_and_every_node_refuses_a_stale_fence() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c, _p1, _p2) = triangle(dir.path()).await;
    let ida = node_id(&a).await;
    // A multi-master namespace has no one to decide leases.
    let (status, err) = call(
        &a.client(),
        Method::POST,
        "/v1/ns/free/leases",
        json!({"name": "job-1", "holder": "w1", "ttl_ms": 1000}),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("mode_conflict")),
        "{err}"
    );

    set_mode(&a, &[&b, &c], json!({"mode": "leader", "leader": ida})).await;
    // Only the leader decides.
    let (status, err) = lease(
        &b.client(),
        json!({"name": "job-1", "holder": "w1", "ttl_ms": 1000}),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("not_leader")),
        "{err}"
    );
    assert_eq!(err["error"]["leader_api"], a.url());

    let (status, l1) = lease(
        &a.client(),
        json!({"name": "job-1", "holder": "w1", "ttl_ms": 800}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{l1}");
    let t1 = l1["token"].as_u64().unwrap();
    // Listed (what the console shows) on the leader, and on a follower once it has
    // the record.
    for n in [&a, &c] {
        let listed = eventually("job-1 listed", async || {
            let (status, list) = call(
                &n.client(),
                Method::GET,
                "/v1/ns/orders/leases",
                Value::Null,
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{list}");
            (list["leases"].as_array().unwrap().len() == 1).then_some(list)
        })
        .await;
        assert_eq!(listed["leases"][0]["name"], "job-1", "{listed}");
        assert_eq!(listed["leases"][0]["token"], t1, "{listed}");
        assert_eq!(listed["more"], false, "{listed}");
    }
    let (status, err) = lease(
        &a.client(),
        json!({"name": "job-1", "holder": "w2", "ttl_ms": 800}),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("lease_held")),
        "{err}"
    );
    assert_eq!(err["error"]["holder"], "w1");
    let (status, kept) = call(
        &a.client(),
        Method::POST,
        "/v1/ns/orders/leases/job-1/keepalive",
        json!({"token": t1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{kept}");
    assert!(kept["expires_ms"].as_u64() >= l1["expires_ms"].as_u64());
    let fence1 = format!("job-1:{t1}");
    assert_eq!(
        fenced_put(&a.client(), "f1", &fence1).await.0,
        StatusCode::OK
    );

    // Expired, another holder gets a greater token; released, the first holder again;
    // expired again, the same holder once more: greater every time.
    expired(&a).await;
    let (status, l2) = lease(
        &a.client(),
        json!({"name": "job-1", "holder": "w2", "ttl_ms": 60000}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{l2}");
    let t2 = l2["token"].as_u64().unwrap();
    let (status, _) = call(
        &a.client(),
        Method::DELETE,
        &format!("/v1/ns/orders/leases/job-1?token={t2}"),
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, l3) = lease(
        &a.client(),
        json!({"name": "job-1", "holder": "w1", "ttl_ms": 300}),
    )
    .await;
    let t3 = l3["token"].as_u64().unwrap();
    expired(&a).await;
    let (_, l4) = lease(
        &a.client(),
        json!({"name": "job-1", "holder": "w1", "ttl_ms": 60000}),
    )
    .await;
    let t4 = l4["token"].as_u64().unwrap();
    assert!(t1 < t2 && t2 < t3 && t3 < t4, "{t1} {t2} {t3} {t4}");
    let (status, err) = call(
        &a.client(),
        Method::POST,
        "/v1/ns/orders/leases/job-1/keepalive",
        json!({"token": t1}),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("lease_lost")),
        "{err}"
    );

    // The old token is refused by the store on every node, the leader first.
    let (status, err) = fenced_put(&a.client(), "f2", &fence1).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("stale_fence")),
        "{err}"
    );
    assert_eq!(err["error"]["newest_token"], t4);
    for n in [&b, &c] {
        eventually("a follower refuses the stale fence", async || {
            let (status, err) = fenced_put(&n.client(), "f2", &fence1).await;
            (status == StatusCode::CONFLICT && err["error"]["code"] == "stale_fence").then_some(())
        })
        .await;
    }
    assert_eq!(
        fenced_put(&a.client(), "f3", &format!("job-1:{t4}"))
            .await
            .0,
        StatusCode::OK
    );
    assert!(
        a.client()
            .get("orders", "f2", None)
            .await
            .unwrap()
            .is_none()
    );

    // A new leader's tokens start above anything an earlier epoch issued (once it
    // holds the lease's newest record: leases replicate like data).
    eventually("B knows the newest token", async || {
        let (_, l) = call(
            &b.client(),
            Method::GET,
            "/v1/ns/orders/leases/job-1",
            Value::Null,
        )
        .await;
        (l["token"].as_u64() == Some(t4)).then_some(())
    })
    .await;
    let (status, view) = call(
        &b.client(),
        Method::POST,
        "/v1/ns/orders/promote",
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    let (status, err) = lease(
        &b.client(),
        json!({"name": "job-1", "holder": "w3", "ttl_ms": 1000}),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("lease_held")),
        "{err}"
    );
    let (status, _) = call(
        &b.client(),
        Method::POST,
        "/v1/ns/orders/leases/job-1/keepalive",
        json!({"token": t4}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the holder keeps its lease with the new leader"
    );
    let (_, released) = call(
        &b.client(),
        Method::DELETE,
        &format!("/v1/ns/orders/leases/job-1?token={t4}"),
        Value::Null,
    )
    .await;
    assert_eq!(released["released"], true);
    let (status, l5) = lease(
        &b.client(),
        json!({"name": "job-1", "holder": "w3", "ttl_ms": 1000}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{l5}");
    let t5 = l5["token"].as_u64().unwrap();
    assert!(t5 > t4 && t5 >> 32 == 2, "{t5}");
}

async fn put_with(c: &Client, key: &str, query: &str) -> (StatusCode, Value) {
    call(
        c,
        Method::PUT,
        &format!("/v1/ns/line/kv/{key}?{query}"),
        json!("v"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_concern_counts_nodes_behind_relays() {
    // A line: A <- B <- C. C holds A's writes only through B.
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[]).await;
    let b = Node::start(&dir.path().join("b"), &["--peer", &a.peer_addr()]).await;
    let mut c = Node::start(&dir.path().join("c"), &["--peer", &b.peer_addr()]).await;
    eventually("A knows three members", async || {
        let status = a.client().status().await.unwrap();
        (status["replication"]["members"].as_array()?.len() == 3).then_some(())
    })
    .await;
    let (status, body) = put_with(&a.client(), "three", "replicas=3&timeout_ms=30000").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["replicas"]["acknowledged"], 3, "{body}");
    let (status, body) = put_with(&a.client(), "all", "replicas=all&timeout_ms=30000").await;
    assert_eq!(
        (status, body["replicas"]["wanted"].as_u64()),
        (StatusCode::OK, Some(3)),
        "{body}"
    );
    let (status, body) = put_with(&a.client(), "most", "replicas=majority&timeout_ms=30000").await;
    assert_eq!(
        (status, body["replicas"]["wanted"].as_u64()),
        (StatusCode::OK, Some(2)),
        "{body}"
    );
    let (status, body) = put_with(&a.client(), "bad", "replicas=most").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_query"))
    );
    // C gone: all cannot be met; the write stays.
    c.kill();
    let (status, body) = put_with(&a.client(), "without-c", "replicas=all&timeout_ms=1500").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["code"], "replication_timeout");
    assert_eq!(body["replicas"]["acknowledged"], 2);
    assert!(
        a.client()
            .get("line", "without-c", None)
            .await
            .unwrap()
            .is_some()
    );
}
