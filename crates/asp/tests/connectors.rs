//! Connectors against the NATS JetStream server (127.0.0.1:4222) and the Redis server
//! (127.0.0.1:6379) every machine runs, with plain clients of each on the other side:
//! changes out with their headers and fields, messages in, `both` without echoes, a
//! SIGKILL in the middle of an ingest, a broker cut off for a while, a webhook receiver
//! that fails before it succeeds, and malformed messages. Every test uses its own
//! stream, subject and key names, and removes them at the end.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use asp_faultnet::Proxy;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use common::{
    Node, connector, eventually, in_side_running, put_json, start, unique, values, wait_until,
};

const NATS: &str = "127.0.0.1:4222";
const REDIS: &str = "redis://127.0.0.1:6379";

/// A test's JetStream subject and stream, and its Redis stream key.
fn names(test: &str, id: &str) -> (String, String, String) {
    (
        format!("asptest.{test}{id}"),
        format!("ASPTEST_{}{id}", test.to_uppercase()),
        format!("asptest:{test}{id}"),
    )
}

/// Removes a test's stream and Redis key.
async fn clean_up(
    js: &jetstream::Context,
    stream: &str,
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
) {
    js.delete_stream(stream).await.unwrap();
    let _: () = redis::cmd("DEL").arg(key).query_async(con).await.unwrap();
}

/// Waits until the in sides of connectors `js` and `rs` run (they create the stream
/// and the consumer group).
async fn both_in_sides_running(node: &Node) {
    in_side_running(node, "js").await;
    in_side_running(node, "rs").await;
}

async fn jetstream() -> jetstream::Context {
    let client = async_nats::connect(NATS)
        .await
        .expect("the NATS server on 127.0.0.1:4222 (with JetStream) runs on every machine");
    jetstream::new(client)
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("the Redis server on 127.0.0.1:6379 runs on every machine")
}

fn nats_connector(
    name: &str,
    direction: &str,
    ns: &str,
    url: &str,
    subject: &str,
    stream: &str,
) -> String {
    format!(
        "[[connectors]]\nname = \"{name}\"\nkind = \"nats\"\ndirection = \"{direction}\"\nnamespace = \"{ns}\"\nurl = \"nats://{url}\"\nsubject = \"{subject}\"\nstream = \"{stream}\"\n\n"
    )
}

fn redis_connector(name: &str, direction: &str, ns: &str, url: &str, stream: &str) -> String {
    format!(
        "[[connectors]]\nname = \"{name}\"\nkind = \"redis-stream\"\ndirection = \"{direction}\"\nnamespace = \"{ns}\"\nurl = \"{url}\"\nstream = \"{stream}\"\n\n"
    )
}

/// Every message of a JetStream stream, in order.
async fn stream_messages(
    js: &jetstream::Context,
    name: &str,
) -> Vec<jetstream::message::StreamMessage> {
    let mut stream = js.get_stream(name).await.unwrap();
    let info = stream.info().await.unwrap().clone();
    let mut out = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if info.state.messages == 0 {
            break;
        }
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push(m);
        }
    }
    out
}

async fn stream_len(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

fn header(m: &jetstream::message::StreamMessage, name: &str) -> String {
    m.headers
        .get(name)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| {
            panic!(
                "message {} has no header {name}: {:?}",
                m.sequence, m.headers
            )
        })
}

/// Every entry of a Redis stream: its id and fields.
async fn redis_entries(
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Vec<(String, HashMap<String, String>)> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(con)
        .await
        .unwrap();
    reply
        .ids
        .into_iter()
        .map(|e| {
            let fields = e
                .map
                .keys()
                .map(|k| (k.clone(), e.get::<String>(k).unwrap()))
                .collect();
            (e.id, fields)
        })
        .collect()
}

async fn redis_len(con: &mut redis::aio::MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("XLEN").arg(key).query_async(con).await.unwrap()
}

async fn xadd(con: &mut redis::aio::MultiplexedConnection, key: &str, fields: &[(&str, &str)]) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    let _: String = cmd.query_async(con).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_go_out_to_jetstream_and_a_redis_stream_with_their_headers() {
    let id = unique();
    let (subject, stream_name, redis_key) = names("out", &id);
    let dir = tempfile::tempdir().unwrap();
    let toml = nats_connector("js", "out", "orders", NATS, &subject, &stream_name)
        + &redis_connector("rs", "out", "orders", REDIS, &redis_key);
    let node = start(&dir.path().join("a"), &toml).await;
    let (node_id, [v1, v2, v3]) = common::out_test_changes(&node).await;

    let js = jetstream().await;
    wait_until(
        "three messages in the stream",
        Duration::from_secs(30),
        || async { stream_len(&js, &stream_name).await >= 3 },
    )
    .await;
    let messages = stream_messages(&js, &stream_name).await;
    assert_eq!(messages.len(), 3, "one message per change of the namespace");
    let expect = [
        (
            format!("{subject}.o-1"),
            "o-1",
            "put",
            &v1,
            &b"{\"qty\":3}"[..],
            Some("application/json"),
        ),
        (
            format!("{subject}.a%20b/é"),
            "a b/é",
            "put",
            &v2,
            b"plain text",
            Some("text/plain"),
        ),
        (format!("{subject}.o-1"), "o-1", "delete", &v3, b"", None),
    ];
    for (m, (subj, key, op, version, payload, ct)) in messages.iter().zip(&expect) {
        assert_eq!(m.subject.as_str(), subj);
        assert_eq!(header(m, "asp-key"), *key);
        assert_eq!(header(m, "asp-op"), *op);
        assert_eq!(
            &header(m, "asp-dot"),
            *version,
            "asp-dot is the change's version"
        );
        assert_eq!(header(m, "asp-origin"), node_id);
        assert_eq!(header(m, "Nats-Msg-Id"), **version);
        assert!(
            header(m, "asp-version").contains('.'),
            "an HLC reading ms.logical"
        );
        assert_eq!(header(m, "asp-cluster"), "default");
        assert_eq!(&m.payload[..], *payload);
        assert_eq!(m.headers.get("content-type").map(|v| v.as_str()), *ct);
    }

    let mut con = redis().await;
    wait_until(
        "three entries in the Redis stream",
        Duration::from_secs(30),
        || {
            let mut con = con.clone();
            let key = redis_key.clone();
            async move { redis_len(&mut con, &key).await >= 3 }
        },
    )
    .await;
    let entries = redis_entries(&mut con, &redis_key).await;
    assert_eq!(entries.len(), 3);
    let fields: Vec<_> = entries.iter().map(|(_, f)| f).collect();
    assert_eq!(fields[0]["key"], "o-1");
    assert_eq!(fields[0]["op"], "put");
    assert_eq!(fields[0]["value"], r#"{"qty":3}"#);
    assert_eq!(fields[0]["dot"], v1);
    assert_eq!(fields[0]["origin"], node_id);
    assert!(fields[0]["version"].contains('.'));
    assert_eq!(fields[1]["key"], "a b/é");
    // A value with no JSON form goes as it is, with its content type.
    assert_eq!(fields[1]["value"], "plain text");
    assert_eq!(fields[1]["content_type"], "text/plain");
    assert!(
        !fields[0].contains_key("content_type"),
        "JSON is the default"
    );
    assert_eq!(fields[2]["op"], "delete");
    assert_eq!(fields[2]["dot"], v3);
    assert!(!fields[2].contains_key("value"));

    // Status: each out side is running, has sent 3, and lags nothing.
    for name in ["js", "rs"] {
        let c = eventually("the out side caught up", async || {
            let c = connector(&node, name).await;
            (c["out"]["lag"] == 0 && c["out"]["messages"] == 3).then_some(c)
        })
        .await;
        assert_eq!(c["out"]["state"], "running", "{c}");
        assert!(c["in"].is_null());
    }
    clean_up(&js, &stream_name, &mut con, &redis_key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ways_take_plain_messages_and_never_echo() {
    let id = unique();
    let (subject, stream_name, redis_key) = names("both", &id);
    let dir = tempfile::tempdir().unwrap();
    let toml = nats_connector("js", "both", "js", NATS, &subject, &stream_name)
        + &redis_connector("rs", "both", "rs", REDIS, &redis_key);
    let node = start(&dir.path().join("a"), &toml).await;
    let js = jetstream().await;
    let mut con = redis().await;
    both_in_sides_running(&node).await;

    const FROM_ASP: usize = 30;
    const FROM_CLIENTS: usize = 40;
    for i in 0..FROM_ASP {
        put_json(&node, "js", &format!("asp-{i}"), &i.to_string()).await;
        put_json(&node, "rs", &format!("asp-{i}"), &i.to_string()).await;
    }
    for i in 0..FROM_CLIENTS {
        js.publish(
            format!("{subject}.client-{i}"),
            Bytes::from(format!("{{\"n\":{i}}}")),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        xadd(
            &mut con,
            &redis_key,
            &[
                ("key", &format!("client-{i}")),
                ("value", &format!("{{\"n\":{i}}}")),
            ],
        )
        .await;
    }
    let total = (FROM_ASP + FROM_CLIENTS) as u64;
    for ns in ["js", "rs"] {
        let got = eventually("every client message in asp", async || {
            let v = values(&node, ns).await;
            (v.len() as u64 == total).then_some(v)
        })
        .await;
        assert_eq!(got["client-7"], r#"{"n":7}"#);
        assert_eq!(got["asp-7"], "7");
    }
    // The in sides have read what asp published back, and dropped it. The out
    // side counts a message once the broker acknowledged it, which can be after
    // the in side already read it back: wait for both.
    for name in ["js", "rs"] {
        eventually("both sides settled", async || {
            let c = connector(&node, name).await;
            (c["in"]["echoes_dropped"] == FROM_ASP
                && c["in"]["messages"] == FROM_CLIENTS
                && c["out"]["messages"] == FROM_ASP
                && c["out"]["lag"] == 0)
                .then_some(())
        })
        .await;
    }
    // Exact counts, after everything settled: asp wrote each change once, and the
    // broker holds each once (no message went round).
    let status = node.client().status().await.unwrap();
    for ns in ["js", "rs"] {
        assert_eq!(common::events(&node.client(), ns).await, total, "{status}");
    }
    assert_eq!(stream_len(&js, &stream_name).await, total);
    assert_eq!(redis_len(&mut con, &redis_key).await, total);
    for name in ["js", "rs"] {
        let c = connector(&node, name).await;
        assert_eq!(c["out"]["messages"], FROM_ASP, "{c}");
        assert_eq!(c["in"]["messages"], FROM_CLIENTS, "{c}");
        assert_eq!(c["in"]["echoes_dropped"], FROM_ASP, "{c}");
        assert_eq!(c["in"]["dead_letters"], 0, "{c}");
    }
    // The positions are stored in the replicated namespace _asp.connectors.
    let positions = values(&node, "_asp.connectors").await;
    assert!(
        positions["js"].contains(&format!("\"position\":\"{}\"", total)),
        "{positions:?}"
    );
    let metrics = String::from_utf8(
        node.client()
            .send(axum::http::Method::GET, "/metrics", &[], Bytes::new())
            .await
            .unwrap()
            .body
            .to_vec(),
    )
    .unwrap();
    assert!(
        metrics.contains(&format!(
            "asp_connector_echoes_dropped_total{{connector=\"js\",side=\"in\"}} {FROM_ASP}"
        )),
        "{metrics}"
    );
    clean_up(&js, &stream_name, &mut con, &redis_key).await;
}

/// ASP_CONNECTOR_INGEST sets the number of messages (default 100,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_in_the_middle_of_an_ingest_applies_every_message_once() {
    let total: u64 = std::env::var("ASP_CONNECTOR_INGEST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let id = unique();
    let (subject, stream_name, redis_key) = names("kill", &id);
    let js = jetstream().await;
    js.get_or_create_stream(stream::Config {
        name: stream_name.clone(),
        subjects: vec![format!("{subject}.>")],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut con = redis().await;
    // The messages are in the brokers before asp starts.
    let mut acks = Vec::new();
    for i in 0..total {
        acks.push(
            js.publish(format!("{subject}.k{i}"), Bytes::from(i.to_string()))
                .await
                .unwrap(),
        );
        if acks.len() == 1000 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
    for chunk in (0..total).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("XADD")
                .arg(&redis_key)
                .arg("*")
                .arg("key")
                .arg(format!("k{i}"))
                .arg("value")
                .arg(i.to_string())
                .ignore();
        }
        let _: () = pipe.query_async(&mut con).await.unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let toml = nats_connector("js", "in", "js", NATS, &subject, &stream_name)
        + &redis_connector("rs", "in", "rs", REDIS, &redis_key);
    let mut node = start(&dir.path().join("a"), &toml).await;
    // Killed five times in the middle of both ingests: each kill lands in a fetch, a
    // write or between a write and the acknowledgement, wherever the ingest was.
    for kill in 1..=5u64 {
        let at = total * kill / 6;
        wait_until("more ingested", Duration::from_secs(300), || async {
            common::events(&node.client(), "js").await > at
                && common::events(&node.client(), "rs").await > at
        })
        .await;
        node.kill();
        node.restart().await;
        let after = (
            common::events(&node.client(), "js").await,
            common::events(&node.client(), "rs").await,
        );
        // (The two ingests run at their own pace: one may be done.)
        assert!(
            after.0 < total || after.1 < total,
            "kill {kill} came after the end of both ingests: {after:?}"
        );
    }
    wait_until(
        "every message ingested",
        Duration::from_secs(600),
        || async {
            connector(&node, "js").await["in"]["lag"] == 0
                && connector(&node, "rs").await["in"]["lag"] == 0
                && common::events(&node.client(), "js").await >= total
                && common::events(&node.client(), "rs").await >= total
        },
    )
    .await;
    // Once each: one event per message (a message applied twice would be two events
    // of its key), every key there with its value.
    for ns in ["js", "rs"] {
        assert_eq!(
            common::events(&node.client(), ns).await,
            total,
            "namespace {ns}"
        );
        let v = values(&node, ns).await;
        assert_eq!(v.len() as u64, total);
        for i in (0..total).step_by(997) {
            assert_eq!(v[&format!("k{i}")], i.to_string());
        }
    }
    clean_up(&js, &stream_name, &mut con, &redis_key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_out_of_reach_for_a_while_loses_nothing() {
    let id = unique();
    let (subject, stream_name, redis_key) = names("cut", &id);
    let nats_proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), NATS.parse().unwrap())
        .await
        .unwrap();
    let redis_proxy = Proxy::start(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:6379".parse().unwrap(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = nats_connector(
        "js",
        "both",
        "js",
        &nats_proxy.local_addr().to_string(),
        &subject,
        &stream_name,
    ) + &redis_connector(
        "rs",
        "both",
        "rs",
        &format!("redis://{}", redis_proxy.local_addr()),
        &redis_key,
    );
    let node = start(&dir.path().join("a"), &toml).await;
    let js = jetstream().await;
    let mut con = redis().await;
    both_in_sides_running(&node).await;
    let mut expected_out = HashSet::new();
    for i in 0..20 {
        for ns in ["js", "rs"] {
            expected_out.insert((ns, put_json(&node, ns, &format!("before-{i}"), "1").await));
        }
    }
    nats_proxy.partition();
    redis_proxy.partition();
    // asp keeps taking writes; the brokers keep taking other clients' messages.
    for i in 0..20 {
        for ns in ["js", "rs"] {
            expected_out.insert((ns, put_json(&node, ns, &format!("during-{i}"), "2").await));
        }
        js.publish(format!("{subject}.client-{i}"), Bytes::from_static(b"3"))
            .await
            .unwrap()
            .await
            .unwrap();
        xadd(
            &mut con,
            &redis_key,
            &[("key", &format!("client-{i}")), ("value", "3")],
        )
        .await;
    }
    wait_until(
        "both connectors saw the cut",
        Duration::from_secs(60),
        || async {
            connector(&node, "js").await["out"]["errors"].as_u64() > Some(0)
                && connector(&node, "rs").await["out"]["errors"].as_u64() > Some(0)
        },
    )
    .await;
    let c = connector(&node, "js").await;
    assert!(c["out"]["last_error"].is_string(), "{c}");
    nats_proxy.heal();
    redis_proxy.heal();
    // Everything asp wrote reaches the brokers (at least once: count distinct dots),
    // everything the clients sent reaches asp, once.
    for ns in ["js", "rs"] {
        eventually("the client messages in asp", async || {
            (values(&node, ns).await.len() == 60).then_some(())
        })
        .await;
    }
    let dots = eventually("every change in JetStream", async || {
        let dots: HashSet<String> = stream_messages(&js, &stream_name)
            .await
            .iter()
            .filter_map(|m| m.headers.get("asp-dot").map(|v| v.as_str().to_owned()))
            .collect();
        (dots.len() == 40).then_some(dots)
    })
    .await;
    for (ns, dot) in &expected_out {
        if *ns == "js" {
            assert!(dots.contains(dot), "{dot} missing from JetStream");
        }
    }
    let dots = eventually("every change in the Redis stream", async || {
        let dots: HashSet<String> = redis_entries(&mut con, &redis_key)
            .await
            .into_iter()
            .filter_map(|(_, f)| f.get("dot").cloned())
            .collect();
        (dots.len() == 40).then_some(dots)
    })
    .await;
    for (ns, dot) in &expected_out {
        if *ns == "rs" {
            assert!(dots.contains(dot), "{dot} missing from the Redis stream");
        }
    }
    for ns in ["js", "rs"] {
        assert_eq!(
            common::events(&node.client(), ns).await,
            60,
            "each client message once"
        );
    }
    clean_up(&js, &stream_name, &mut con, &redis_key).await;
}

/// One delivery a receiver saw: its `webhook-id`, whether its signature holds, the
/// answer's status, the body.
type Delivery = (String, bool, u16, serde_json::Value);

/// A webhook receiver: answers 500 to the first `failures` deliveries, then 200;
/// records every delivery (its `webhook-id`, whether the signature holds, the answer).
#[derive(Clone, Default)]
struct Receiver {
    failures: usize,
    seen: Arc<Mutex<Vec<Delivery>>>,
}

fn verify(secret: &[u8], headers: &axum::http::HeaderMap, body: &[u8]) -> bool {
    use base64::Engine as _;
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let signed = format!("{}.{}.", get("webhook-id"), get("webhook-timestamp"));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut msg = signed.into_bytes();
    msg.extend_from_slice(body);
    get("webhook-signature").split(' ').any(|sig| {
        sig.strip_prefix("v1,")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .is_some_and(|tag| ring::hmac::verify(&key, &msg, &tag).is_ok())
    })
}

async fn receive(
    axum::extract::State(r): axum::extract::State<Receiver>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> axum::http::StatusCode {
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let ok = verify(b"a test secret of 30 characters", &headers, &body);
    let mut seen = r.seen.lock().unwrap();
    let status = if seen.len() < r.failures { 500 } else { 200 };
    seen.push((
        id,
        ok,
        status,
        serde_json::from_slice(&body).unwrap_or_default(),
    ));
    axum::http::StatusCode::from_u16(status).unwrap()
}

async fn serve_receiver(receiver: Receiver) -> std::net::SocketAddr {
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(receiver);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_fails_three_times_gets_the_event_once_signed() {
    let receiver = Receiver {
        failures: 3,
        ..Default::default()
    };
    let addr = serve_receiver(receiver.clone()).await;
    // A second receiver that always fails: after `attempts` the event is a dead letter.
    let broken = Receiver {
        failures: usize::MAX,
        ..Default::default()
    };
    let broken_addr = serve_receiver(broken.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[[connectors]]\nname = \"hook\"\nkind = \"webhook\"\ndirection = \"out\"\nnamespace = \"orders\"\nurl = \"http://{addr}/hook\"\nsecret = \"a test secret of 30 characters\"\n\n\
         [[connectors]]\nname = \"broken\"\nkind = \"webhook\"\ndirection = \"out\"\nnamespace = \"orders\"\nurl = \"http://{broken_addr}/hook\"\nsecret = \"a test secret of 30 characters\"\nattempts = 2\n"
    );
    let node = start(&dir.path().join("a"), &toml).await;
    let version = put_json(&node, "orders", "o-1", r#"{"qty":3}"#).await;
    wait_until("the event delivered", Duration::from_secs(60), || async {
        receiver.seen.lock().unwrap().iter().any(|s| s.2 == 200)
    })
    .await;
    let seen = receiver.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "three failures, then one delivery: {seen:?}");
    assert!(
        seen.iter().all(|s| s.0 == version),
        "the same webhook-id each time: {seen:?}"
    );
    assert!(
        seen.iter().all(|s| s.1),
        "every delivery signed with the secret"
    );
    let delivered: HashSet<_> = seen.iter().filter(|s| s.2 == 200).map(|s| &s.0).collect();
    assert_eq!(delivered.len(), 1, "once, by webhook-id");
    let body = &seen[3].3;
    assert_eq!(body["type"], "asp.put");
    assert_eq!(body["data"]["key"], "o-1");
    assert_eq!(body["data"]["value"]["qty"], 3);
    assert_eq!(body["data"]["dot"], version.as_str());

    let dead = eventually("the dead-letter record", async || {
        values(&node, "orders.dead")
            .await
            .remove(&format!("broken/out/{version}"))
    })
    .await;
    assert!(
        dead.contains("2 attempts failed") && dead.contains("500"),
        "{dead}"
    );
    assert_eq!(broken.seen.lock().unwrap().len(), 2);
    // Failed attempts show in status.
    let c = connector(&node, "hook").await;
    assert!(c["out"]["errors"].as_u64() >= Some(3), "{c}");
    assert!(
        c["out"]["last_error"].as_str().unwrap().contains("500"),
        "{c}"
    );
    assert_eq!(c["out"]["state"], "running", "{c}");
    let c = connector(&node, "broken").await;
    assert_eq!(c["out"]["dead_letters"], 1, "{c}");
    assert!(c["secret"].is_null(), "the secret is not shown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_go_to_the_dead_letter_namespace_with_the_reason() {
    let id = unique();
    let (subject, stream_name, redis_key) = names("bad", &id);
    let dir = tempfile::tempdir().unwrap();
    let toml = nats_connector("js", "in", "js", NATS, &subject, &stream_name)
        + &redis_connector("rs", "in", "rs", REDIS, &redis_key);
    let node = start(&dir.path().join("a"), &toml).await;
    let js = jetstream().await;
    let mut con = redis().await;
    both_in_sides_running(&node).await;
    let publish = |key: &str, payload: &'static [u8], op: Option<&str>| {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(op) = op {
            headers.insert("asp-op", op);
        }
        let js = js.clone();
        let subject = format!("{subject}.{key}");
        async move {
            js.publish_with_headers(subject, headers, Bytes::from_static(payload))
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    publish("bad-json", b"{not json", None).await;
    publish("bad-op", b"1", Some("frobnicate")).await;
    publish("good", b"{\"ok\":true}", None).await;
    xadd(
        &mut con,
        &redis_key,
        &[("key", "bad-json"), ("value", "{not json")],
    )
    .await;
    xadd(&mut con, &redis_key, &[("value", "1")]).await;
    xadd(
        &mut con,
        &redis_key,
        &[("key", "good"), ("value", "{\"ok\":true}")],
    )
    .await;

    for ns in ["js", "rs"] {
        let dead = eventually("two dead letters", async || {
            let v = values(&node, &format!("{ns}.dead")).await;
            (v.len() == 2).then_some(v)
        })
        .await;
        let text: String = dead.values().cloned().collect::<Vec<_>>().join("\n");
        assert!(text.contains("must be JSON"), "{text}");
        let v = eventually("the good message", async || {
            let v = values(&node, ns).await;
            (!v.is_empty()).then_some(v)
        })
        .await;
        assert_eq!(v.len(), 1, "only the good message is data: {v:?}");
        assert_eq!(v["good"], r#"{"ok":true}"#);
    }
    let js_dead = values(&node, "js.dead").await;
    assert!(
        js_dead.values().any(|r| r.contains("frobnicate")),
        "{js_dead:?}"
    );
    let rs_dead = values(&node, "rs.dead").await;
    assert!(
        rs_dead.values().any(|r| r.contains("names no key")),
        "{rs_dead:?}"
    );
    for name in ["js", "rs"] {
        let c = connector(&node, name).await;
        assert_eq!(c["in"]["dead_letters"], 2, "{c}");
        assert_eq!(c["in"]["messages"], 1, "{c}");
    }
    clean_up(&js, &stream_name, &mut con, &redis_key).await;
}

#[test]
fn a_bad_connector_configuration_stops_the_node_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[[connectors]]\nname = \"w\"\nkind = \"webhook\"\ndirection = \"in\"\nnamespace = \"n\"\nurl = \"http://127.0.0.1:1/\"\nsecret = \"0123456789abcdefgh\"\n",
            "a webhook only sends",
        ),
        (
            "[[connectors]]\nname = \"n\"\nkind = \"nats\"\ndirection = \"out\"\nnamespace = \"n\"\nurl = \"nats://127.0.0.1:4222\"\nstream = \"S\"\n",
            "needs subject",
        ),
        (
            "[[connectors]]\nname = \"n\"\nkind = \"kinesis\"\ndirection = \"out\"\nnamespace = \"n\"\nurl = \"x\"\n",
            "unknown variant `kinesis`",
        ),
        (
            "[[connectors]]\nname = \"r\"\nkind = \"redis-stream\"\ndirection = \"in\"\nnamespace = \"_asp.audit\"\nurl = \"redis://127.0.0.1:6379\"\nstream = \"s\"\n",
            "one of asp's own",
        ),
    ];
    for (i, (toml, reason)) in cases.iter().enumerate() {
        let stderr = common::refused_at_start(dir.path(), &i.to_string(), toml);
        assert!(stderr.contains(reason), "case {i}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_writer_refuses_as_too_large_goes_one_message_at_a_time() {
    let id = unique();
    let redis_key = format!("asptest:small{id}");
    let mut con = redis().await;
    for i in 0..50 {
        xadd(
            &mut con,
            &redis_key,
            &[("key", &format!("k{i}")), ("value", &i.to_string())],
        )
        .await;
    }
    // The writer takes at most 10 operations per batch; the connector reads 256.
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[limits]\nbatch_ops_max = 10\n\n{}",
        redis_connector("rs", "in", "rs", REDIS, &redis_key)
    );
    let node = start(&dir.path().join("a"), &toml).await;
    let c = eventually("every message written", async || {
        let c = connector(&node, "rs").await;
        (c["in"]["messages"] == 50).then_some(c)
    })
    .await;
    assert_eq!(c["in"]["dead_letters"], 0, "{c}");
    assert_eq!(common::events(&node.client(), "rs").await, 50);
    assert_eq!(values(&node, "rs").await["k49"], "49");
    let positions = values(&node, "_asp.connectors").await;
    let last = redis_entries(&mut con, &redis_key).await.pop().unwrap().0;
    assert!(positions["rs"].contains(&last), "{positions:?} {last}");
    let _: () = redis::cmd("DEL")
        .arg(&redis_key)
        .query_async(&mut con)
        .await
        .unwrap();
}
