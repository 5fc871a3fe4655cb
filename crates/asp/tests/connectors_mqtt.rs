//! The MQTT connector (`kind = "mqtt"`) against Mosquitto: the machine's broker on
//! 127.0.0.1:1883 for changes out (with retained values) and messages in from plain
//! MQTT 5 and 3.1.1 clients, and `both` without echo; brokers of the test's own
//! (the `mosquitto` binary, on free ports) for a SIGKILL in the middle of an ingest and
//! for a broker restart. Every test uses its own topic prefix and clears what it
//! retained.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{connector, eventually, in_side_running, put, start, unique, values, wait_until};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};

/// The broker every machine runs.
const MOSQUITTO_PORT: u16 = 1883;

fn mqtt_connector(
    name: &str,
    direction: &str,
    ns: &str,
    port: u16,
    topic: &str,
    extra: &str,
) -> String {
    format!(
        "[[connectors]]\nname = \"{name}\"\nkind = \"mqtt\"\ndirection = \"{direction}\"\nnamespace = \"{ns}\"\nurl = \"mqtt://127.0.0.1:{port}\"\ntopic = \"{topic}\"\n{extra}\n"
    )
}

/// A plain MQTT 5 client of the test (rumqttc), its event loop polled by a task that
/// records every message received and counts PUBACKs. It reconnects by itself and
/// subscribes again on every CONNACK.
struct Client5 {
    client: rumqttc::v5::AsyncClient,
    received: Arc<Mutex<Vec<Publish>>>,
    acked: Arc<AtomicUsize>,
    subscribed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Client5 {
    async fn connect(port: u16, id: &str, subscribe: Option<String>) -> Client5 {
        let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        o.set_max_packet_size(Some(1 << 20));
        let (client, mut events) = rumqttc::v5::AsyncClient::new(o, 1000);
        let received = Arc::new(Mutex::new(Vec::new()));
        let acked = Arc::new(AtomicUsize::new(0));
        let subscribed = Arc::new(AtomicBool::new(false));
        let wait = subscribe.is_some();
        let (c, r, a, s) = (
            client.clone(),
            received.clone(),
            acked.clone(),
            subscribed.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(f) = &subscribe {
                            c.try_subscribe(f, QoS::AtLeastOnce).unwrap();
                        }
                    }
                    Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(_))) => {
                        s.store(true, Ordering::SeqCst)
                    }
                    Ok(rumqttc::v5::Event::Incoming(Packet::Publish(p))) => {
                        r.lock().unwrap().push(p)
                    }
                    Ok(rumqttc::v5::Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let c = Client5 {
            client,
            received,
            acked,
            subscribed,
            task,
        };
        if wait {
            wait_until("subscribed", Duration::from_secs(30), || async {
                c.subscribed.load(Ordering::SeqCst)
            })
            .await;
        }
        c
    }

    async fn publish(&self, topic: &str, payload: &str, retain: bool, props: PublishProperties) {
        self.client
            .publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                retain,
                payload.as_bytes().to_vec(),
                props,
            )
            .await
            .unwrap();
    }

    /// Waits until `n` publishes in all were acknowledged.
    async fn acked(&self, n: usize) {
        wait_until(
            "the broker acknowledged",
            Duration::from_secs(120),
            || async { self.acked.load(Ordering::SeqCst) >= n },
        )
        .await;
    }

    fn received(&self) -> Vec<Publish> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Client5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A user property of a message.
fn property(p: &Publish, name: &str) -> Option<String> {
    p.properties
        .as_ref()?
        .user_properties
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
}

fn topic(p: &Publish) -> String {
    String::from_utf8(p.topic.to_vec()).unwrap()
}

fn user_properties(pairs: &[(&str, &str)]) -> PublishProperties {
    PublishProperties {
        user_properties: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// A Mosquitto broker of the test's own, on a free port, with `extra` configuration.
struct Mosquitto {
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    async fn start(dir: &Path, extra: &str) -> Mosquitto {
        std::fs::create_dir_all(dir).unwrap();
        let port = common::free_port();
        let conf = dir.join("mosquitto.conf");
        // `user root`: run as root, mosquitto would otherwise switch to its own user,
        // which cannot write the test's directory (as another user it changes nothing).
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\nlog_dest stderr\n{extra}\n"
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            port,
            conf,
            log: dir.join("mosquitto.log"),
            child: None,
        };
        m.spawn().await;
        m
    }

    /// Starts the broker (again) on its port and waits until it takes connections.
    async fn spawn(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new("mosquitto")
                .arg("-c")
                .arg(&self.conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("the mosquitto binary (apt-get install mosquitto)"),
        );
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "mosquitto exited with {status}:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "mosquitto did not listen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM: the broker saves its state (with persistence on) and exits.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) takes two integers and touches no memory of ours; the pid is
        // our own child's, not yet waited for, so it cannot name another process.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        child.wait().unwrap();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_go_out_with_their_properties_and_stay_as_retained_values() {
    let id = unique();
    let prefix = format!("asptest/out{id}");
    let watcher = Client5::connect(
        MOSQUITTO_PORT,
        &format!("asptest-watch-{id}"),
        Some(format!("{prefix}/#")),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let toml = mqtt_connector(
        "mq",
        "out",
        "orders",
        MOSQUITTO_PORT,
        &prefix,
        "retain = true",
    );
    let node = start(&dir.path().join("a"), &toml).await;
    let node_id = node.client().status().await.unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let v1 = put(&node, "orders", "o-1", "application/json", r#"{"qty":3}"#).await;
    let v2 = put(&node, "orders", "a b/é", "text/plain", "plain text").await;
    // Wildcards and a trailing '/' are escaped in the topic.
    let v3 = put(&node, "orders", "x+y#z/", "application/json", "2").await;
    let v4 = node.client().delete("orders", "o-1", None).await.unwrap()["version"]
        .as_str()
        .unwrap()
        .to_owned();
    put(&node, "other", "x", "application/json", "1").await;

    wait_until("four messages", Duration::from_secs(30), || async {
        watcher.received().len() >= 4
    })
    .await;
    let got = watcher.received();
    assert_eq!(got.len(), 4, "one message per change of the namespace");
    let expect = [
        (
            "o-1",
            "o-1",
            "put",
            &v1,
            &b"{\"qty\":3}"[..],
            Some("application/json"),
        ),
        (
            "a b/é",
            "a b/é",
            "put",
            &v2,
            b"plain text",
            Some("text/plain"),
        ),
        (
            "x%2By%23z%2F",
            "x+y#z/",
            "put",
            &v3,
            b"2",
            Some("application/json"),
        ),
        ("o-1", "o-1", "delete", &v4, b"", None),
    ];
    for (m, (suffix, key, op, dot, payload, ct)) in got.iter().zip(&expect) {
        assert_eq!(topic(m), format!("{prefix}/{suffix}"));
        assert_eq!(m.qos, QoS::AtLeastOnce);
        assert_eq!(property(m, "asp-key").as_deref(), Some(*key));
        assert_eq!(property(m, "asp-op").as_deref(), Some(*op));
        assert_eq!(property(m, "asp-dot").as_ref(), Some(*dot));
        assert_eq!(property(m, "asp-origin"), Some(node_id.clone()));
        assert!(property(m, "asp-version").unwrap().contains('.'));
        assert_eq!(property(m, "asp-cluster").as_deref(), Some("default"));
        assert_eq!(&m.payload[..], *payload);
        let content_type = m.properties.as_ref().unwrap().content_type.as_deref();
        assert_eq!(content_type, *ct, "content type as the MQTT 5 property");
    }
    let c = eventually("the out side caught up", async || {
        let c = connector(&node, "mq").await;
        (c["out"]["lag"] == 0 && c["out"]["messages"] == 4).then_some(c)
    })
    .await;
    assert_eq!(c["out"]["state"], "running", "{c}");
    assert_eq!(c["topic"], prefix.as_str());
    assert_eq!(c["retain"], true);

    // A late subscriber gets each topic's current value: the delete cleared o-1. A
    // marker published after it ends what the broker sends first (the retained values).
    let late = Client5::connect(
        MOSQUITTO_PORT,
        &format!("asptest-late-{id}"),
        Some(format!("{prefix}/#")),
    )
    .await;
    watcher
        .publish(&format!("{prefix}/marker"), "0", false, Default::default())
        .await;
    wait_until("the marker", Duration::from_secs(30), || async {
        late.received()
            .iter()
            .any(|m| topic(m).ends_with("/marker"))
    })
    .await;
    let retained: HashMap<String, Publish> = late
        .received()
        .into_iter()
        .filter(|m| m.retain)
        .map(|m| (topic(&m), m))
        .collect();
    let topics: HashSet<&str> = retained.keys().map(String::as_str).collect();
    assert_eq!(
        topics,
        HashSet::from([
            format!("{prefix}/a b/é").as_str(),
            format!("{prefix}/x%2By%23z%2F").as_str()
        ]),
        "the current values, o-1 deleted"
    );
    let m = &retained[&format!("{prefix}/a b/é")];
    assert_eq!(&m.payload[..], b"plain text");
    assert_eq!(property(m, "asp-dot"), Some(v2));
    // Clears what the test retained.
    for t in topics {
        watcher.publish(t, "", true, Default::default()).await;
    }
    watcher.acked(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_plain_mqtt_5_and_3_1_1_clients_land_in_asp() {
    let id = unique();
    let prefix = format!("asptest/in{id}");
    let dir = tempfile::tempdir().unwrap();
    let toml = mqtt_connector("mq", "in", "m", MOSQUITTO_PORT, &prefix, "");
    let node = start(&dir.path().join("a"), &toml).await;
    in_side_running(&node, "mq").await;

    // MQTT 5: JSON without a content type, text with one, keys escaped and with
    // levels, and a delete by the asp-op property.
    let v5 = Client5::connect(MOSQUITTO_PORT, &format!("asptest-pub5-{id}"), None).await;
    v5.publish(
        &format!("{prefix}/k1"),
        r#"{"n":1}"#,
        false,
        Default::default(),
    )
    .await;
    let text = PublishProperties {
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    v5.publish(&format!("{prefix}/k2"), "hello", false, text)
        .await;
    v5.publish(&format!("{prefix}/a%2Bb"), "3", false, Default::default())
        .await;
    v5.publish(
        &format!("{prefix}/sub/level"),
        "4",
        false,
        Default::default(),
    )
    .await;
    v5.publish(&format!("{prefix}/k3"), "5", false, Default::default())
        .await;
    v5.publish(
        &format!("{prefix}/k3"),
        "",
        false,
        user_properties(&[("asp-op", "delete")]),
    )
    .await;
    v5.acked(6).await;

    // MQTT 3.1.1: no properties at all; an empty retained message is a delete.
    let mut o =
        rumqttc::MqttOptions::new(format!("asptest-pub3-{id}"), "127.0.0.1", MOSQUITTO_PORT);
    o.set_keep_alive(Duration::from_secs(10));
    let (v3, mut events) = rumqttc::AsyncClient::new(o, 100);
    let v3_acked = Arc::new(AtomicUsize::new(0));
    let counter = v3_acked.clone();
    let v3_task = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    let qos1 = rumqttc::QoS::AtLeastOnce;
    v3.publish(format!("{prefix}/v3-k"), qos1, false, r#"{"v":3}"#)
        .await
        .unwrap();
    v3.publish(format!("{prefix}/v3-gone"), qos1, true, "6")
        .await
        .unwrap();
    v3.publish(format!("{prefix}/v3-gone"), qos1, true, "")
        .await
        .unwrap();
    wait_until(
        "3.1.1 publishes acknowledged",
        Duration::from_secs(30),
        || async { v3_acked.load(Ordering::SeqCst) >= 3 },
    )
    .await;
    v3_task.abort();

    let c = eventually("nine messages in", async || {
        let c = connector(&node, "mq").await;
        (c["in"]["messages"] == 9).then_some(c)
    })
    .await;
    assert_eq!(c["in"]["dead_letters"], 0, "{c}");
    assert_eq!(c["in"]["duplicates_dropped"], 0, "{c}");
    let v = values(&node, "m").await;
    let keys: HashSet<&str> = v.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        HashSet::from(["k1", "k2", "a+b", "sub/level", "v3-k"]),
        "k3 and v3-gone deleted: {v:?}"
    );
    assert_eq!(v["k1"], r#"{"n":1}"#);
    assert!(v["k2"].contains("hello"), "{v:?}");
    assert_eq!(v["a+b"], "3");
    assert_eq!(v["v3-k"], r#"{"v":3}"#);
    assert_eq!(common::events(&node.client(), "m").await, 9);
    // The position record counts what was applied and remembers the newest ids.
    let positions = values(&node, "_asp.connectors").await;
    assert!(positions["mq"].contains("\"applied\":9"), "{positions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ways_take_client_messages_and_never_echo() {
    let id = unique();
    let prefix = format!("asptest/both{id}");
    let watcher = Client5::connect(
        MOSQUITTO_PORT,
        &format!("asptest-watch-{id}"),
        Some(format!("{prefix}/#")),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let toml = mqtt_connector("mq", "both", "b", MOSQUITTO_PORT, &prefix, "");
    let node = start(&dir.path().join("a"), &toml).await;
    in_side_running(&node, "mq").await;

    const FROM_ASP: usize = 30;
    const FROM_CLIENTS: usize = 40;
    for i in 0..FROM_ASP {
        put(
            &node,
            "b",
            &format!("asp-{i}"),
            "application/json",
            &i.to_string(),
        )
        .await;
    }
    for i in 0..FROM_CLIENTS {
        watcher
            .publish(
                &format!("{prefix}/client-{i}"),
                &format!("{{\"n\":{i}}}"),
                false,
                Default::default(),
            )
            .await;
    }
    let total = (FROM_ASP + FROM_CLIENTS) as u64;
    let got = eventually("every client message in asp", async || {
        let v = values(&node, "b").await;
        (v.len() as u64 == total).then_some(v)
    })
    .await;
    assert_eq!(got["client-7"], r#"{"n":7}"#);
    assert_eq!(got["asp-7"], "7");
    // The out side counts a message once the broker acknowledged it, which can be
    // after the broker already delivered it back to the in side: wait for both.
    eventually("both sides settled", async || {
        let c = connector(&node, "mq").await;
        (c["in"]["echoes_dropped"] == FROM_ASP
            && c["in"]["messages"] == FROM_CLIENTS
            && c["out"]["messages"] == FROM_ASP
            && c["out"]["lag"] == 0)
            .then_some(())
    })
    .await;
    wait_until(
        "the watcher saw everything",
        Duration::from_secs(30),
        || async { watcher.received().len() as u64 >= total },
    )
    .await;
    // Exact counts, after everything settled: asp wrote each change once, and the
    // broker carried each once (nothing went round).
    assert_eq!(common::events(&node.client(), "b").await, total);
    let c = connector(&node, "mq").await;
    assert_eq!(c["out"]["messages"], FROM_ASP, "{c}");
    assert_eq!(c["in"]["messages"], FROM_CLIENTS, "{c}");
    assert_eq!(c["in"]["echoes_dropped"], FROM_ASP, "{c}");
    assert_eq!(c["in"]["dead_letters"], 0, "{c}");
    let seen = watcher.received();
    assert_eq!(seen.len() as u64, total, "each message once on the broker");
    let from_asp = seen
        .iter()
        .filter(|m| property(m, "asp-cluster").is_some())
        .count();
    assert_eq!(from_asp, FROM_ASP);
}

/// ASP_CONNECTOR_INGEST sets the number of messages (default 20,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_in_the_middle_of_an_ingest_applies_every_message_once() {
    let total: u64 = std::env::var("ASP_CONNECTOR_INGEST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let id = unique();
    let prefix = format!("asptest/kill{id}");
    let dir = tempfile::tempdir().unwrap();
    // Nothing dropped by the broker: no limit on the queue of an offline session, and a
    // large in-flight window.
    let broker = Mosquitto::start(
        &dir.path().join("broker"),
        "max_queued_messages 0\nmax_inflight_messages 1000\n",
    )
    .await;
    // A redelivered message is recognised among the ids of the newest 16 × batch
    // applied. Mosquitto 2.0 resuming a session with a large queue writes it out before
    // it reads a PUBACK again, so a kill in the first moments after a reconnect leaves
    // a few thousand applied messages unacknowledged (4,996 seen once): 16 batches of
    // 1000 keep them in the window (docs: "Limits").
    let toml = mqtt_connector("mq", "in", "k", broker.port, &prefix, "batch = 1000");
    let mut node = start(&dir.path().join("a"), &toml).await;
    in_side_running(&node, "mq").await;
    // The session and its subscription exist: with asp gone, the broker queues every
    // message for it.
    node.kill();
    let publisher = Client5::connect(broker.port, &format!("asptest-pub-{id}"), None).await;
    for i in 0..total {
        publisher
            .publish(
                &format!("{prefix}/k{i}"),
                &i.to_string(),
                false,
                Default::default(),
            )
            .await;
    }
    publisher.acked(total as usize).await;
    node.restart().await;
    // Killed in the middle of the ingest, three times and more until a redelivered
    // duplicate was dropped (at most nine): each kill lands in a fetch, a write, or
    // between a write and its PUBACKs, wherever the ingest was. The broker delivers what
    // was not acknowledged again, with DUP set; only a kill in the last case makes a
    // duplicate, and it lands there about one time in six.
    let mut duplicates = 0;
    let mut kills = 0;
    for kill in 1..=9u64 {
        let at = total * kill / 10;
        let started = Instant::now();
        while common::events(&node.client(), "k").await <= at {
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "not more than {at} ingested: {}",
                connector(&node, "mq").await,
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let dropped = connector(&node, "mq").await["in"]["duplicates_dropped"]
            .as_u64()
            .unwrap();
        if kills >= 3 && duplicates + dropped > 0 {
            break;
        }
        duplicates += dropped;
        node.kill();
        node.restart().await;
        kills += 1;
        let after = common::events(&node.client(), "k").await;
        assert!(
            after < total,
            "kill {kill} came after the end of the ingest"
        );
    }
    // Published after everything: the broker delivers it after every earlier message
    // and every redelivery, so once it is in, nothing is left to come.
    publisher
        .publish(&format!("{prefix}/marker"), "0", false, Default::default())
        .await;
    wait_until(
        "every message ingested",
        Duration::from_secs(600),
        || async { values(&node, "k").await.contains_key("marker") },
    )
    .await;
    duplicates += connector(&node, "mq").await["in"]["duplicates_dropped"]
        .as_u64()
        .unwrap();
    eprintln!("{kills} kills; redelivered duplicates dropped: {duplicates}");
    // Once each: one event per message (a message applied twice would be two events
    // of its key), every key there with its value.
    assert_eq!(common::events(&node.client(), "k").await, total + 1);
    let v = values(&node, "k").await;
    assert_eq!(v.len() as u64, total + 1);
    for i in (0..total).step_by(997) {
        assert_eq!(v[&format!("k{i}")], i.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_nothing_either_way() {
    let id = unique();
    let prefix = format!("asptest/restart{id}");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker").join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut broker = Mosquitto::start(
        &dir.path().join("broker"),
        &format!(
            "persistence true\npersistence_location {}/\nmax_queued_messages 0\n",
            data.display()
        ),
    )
    .await;
    let toml = mqtt_connector("mq", "both", "r", broker.port, &prefix, "retain = true");
    let node = start(&dir.path().join("a"), &toml).await;
    in_side_running(&node, "mq").await;
    let client = Client5::connect(broker.port, &format!("asptest-pub-{id}"), None).await;
    let mut dots = HashMap::new();
    for i in 0..20 {
        let key = format!("before-{i}");
        dots.insert(
            key.clone(),
            put(&node, "r", &key, "application/json", "1").await,
        );
        client
            .publish(
                &format!("{prefix}/client-before-{i}"),
                "1",
                false,
                Default::default(),
            )
            .await;
    }
    client.acked(20).await;
    eventually("the first messages in asp", async || {
        (values(&node, "r").await.len() == 40).then_some(())
    })
    .await;

    // SIGTERM: the broker saves its sessions and retained messages, and exits. asp
    // keeps taking writes meanwhile; status shows the error.
    broker.stop();
    for i in 0..20 {
        let key = format!("during-{i}");
        dots.insert(
            key.clone(),
            put(&node, "r", &key, "application/json", "2").await,
        );
    }
    wait_until(
        "both sides saw the broker go",
        Duration::from_secs(60),
        || async {
            let c = connector(&node, "mq").await;
            c["out"]["errors"].as_u64() > Some(0) && c["in"]["errors"].as_u64() > Some(0)
        },
    )
    .await;
    let c = connector(&node, "mq").await;
    assert!(c["out"]["last_error"].is_string(), "{c}");
    assert!(c["in"]["last_error"].is_string(), "{c}");
    assert_ne!(c["in"]["state"], "running", "{c}");

    // The same broker again, on the same port, with its saved state. The client's
    // messages may come before asp's in side is back: its session queues them.
    broker.spawn().await;
    for i in 0..20 {
        client
            .publish(
                &format!("{prefix}/client-after-{i}"),
                "3",
                false,
                Default::default(),
            )
            .await;
        let key = format!("after-{i}");
        dots.insert(
            key.clone(),
            put(&node, "r", &key, "application/json", "4").await,
        );
    }
    client.acked(40).await;
    eventually("every message in asp", async || {
        (values(&node, "r").await.len() == 100).then_some(())
    })
    .await;
    eventually("the out side caught up", async || {
        let c = connector(&node, "mq").await;
        (c["out"]["state"] == "running" && c["out"]["lag"] == 0 && c["in"]["state"] == "running")
            .then_some(())
    })
    .await;
    assert_eq!(
        common::events(&node.client(), "r").await,
        100,
        "each message once, nothing echoed"
    );
    // Every change of asp is on the broker: each key's retained value carries its dot.
    let late = Client5::connect(
        broker.port,
        &format!("asptest-late-{id}"),
        Some(format!("{prefix}/#")),
    )
    .await;
    client
        .publish(&format!("{prefix}/marker"), "0", false, Default::default())
        .await;
    wait_until("the marker", Duration::from_secs(30), || async {
        late.received()
            .iter()
            .any(|m| topic(m).ends_with("/marker"))
    })
    .await;
    let retained: HashMap<String, Option<String>> = late
        .received()
        .into_iter()
        .filter(|m| m.retain)
        .map(|m| (topic(&m), property(&m, "asp-dot")))
        .collect();
    assert_eq!(retained.len(), 60, "{retained:?}");
    for (key, dot) in &dots {
        assert_eq!(
            retained.get(&format!("{prefix}/{key}")),
            Some(&Some(dot.clone())),
            "{key}"
        );
    }
}
