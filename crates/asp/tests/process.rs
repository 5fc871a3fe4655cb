//! A real `asp serve` process: signals, torn log tails, live feeds across restarts, and
//! the command-line client.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::{BIN, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_finish_and_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut node = Node::start(&data, &[]).await;
        node.client()
            .put("s", "k", "application/json", Bytes::from_static(b"1"), None)
            .await
            .unwrap();
        let status = node.signal(signal);
        assert_eq!(status.code(), Some(0), "signal {signal}: {}", node.log());
        assert!(node.log().contains("stopped cleanly"), "{}", node.log());
    }
    // A clean stop leaves nothing to replay.
    let node = Node::start(&data, &[]).await;
    let status = node.client().status().await.unwrap();
    assert_eq!(status["recovery"]["replayed_events"], 0);
    assert_eq!(status["feed"]["head_seq"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_after_a_crash_is_dropped_logged_and_the_node_serves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let mut node = Node::start(&data, &[]).await;
    let client = node.client();
    for i in 0..50 {
        client
            .put(
                "t",
                &format!("k{i}"),
                "application/json",
                Bytes::from(i.to_string()),
                None,
            )
            .await
            .unwrap();
    }
    node.kill();
    // As after a power loss in mid-write: half a record header and some garbage.
    let segment = std::fs::read_dir(data.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .max()
        .unwrap();
    let garbage = [0x40, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 0x01, 0x99, 0x12];
    std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap()
        .write_all(&garbage)
        .unwrap();
    node.restart().await;
    let log = node.log();
    assert!(
        log.contains("log tail was torn"),
        "the drop must be logged:\n{log}"
    );
    assert!(log.contains("dropped_bytes=11"), "{log}");
    let client = node.client();
    let status = client.status().await.unwrap();
    assert_eq!(status["recovery"]["torn_tail_bytes"], 11);
    for i in 0..50 {
        let v = client
            .get("t", &format!("k{i}"), None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v.body, Bytes::from(i.to_string()));
    }
    let w = client
        .put(
            "t",
            "after",
            "application/json",
            Bytes::from_static(b"true"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(w["seq"], 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_feed_resumes_exactly_once_across_a_killed_and_restarted_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let mut node = Node::start(&data, &[]).await;
    let client = node.client();
    for i in 0..40 {
        client
            .put(
                "live",
                &format!("k{i}"),
                "application/json",
                Bytes::from(i.to_string()),
                None,
            )
            .await
            .unwrap();
    }
    let mut seen: Vec<(u64, String)> = Vec::new();
    let mut stream = client.watch("live", 0).await.unwrap();
    while seen.len() < 15 {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        seen.push((
            e.id.unwrap().parse().unwrap(),
            v["key"].as_str().unwrap().to_owned(),
        ));
    }
    node.kill();
    // The stream ends with the process.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(e)) = stream.next().await {
            let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
            seen.push((
                e.id.unwrap().parse().unwrap(),
                v["key"].as_str().unwrap().to_owned(),
            ));
        }
    })
    .await;
    assert!(end.is_ok(), "the stream did not end when the node died");
    node.restart().await;
    let client = node.client();
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 40..80 {
                client
                    .put(
                        "live",
                        &format!("k{i}"),
                        "application/json",
                        Bytes::from(i.to_string()),
                        None,
                    )
                    .await
                    .unwrap();
            }
        })
    };
    let mut stream = client.watch("live", seen.last().unwrap().0).await.unwrap();
    while seen.len() < 80 {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        seen.push((
            e.id.unwrap().parse().unwrap(),
            v["key"].as_str().unwrap().to_owned(),
        ));
    }
    writer.await.unwrap();
    let keys: Vec<String> = seen.iter().map(|(_, k)| k.clone()).collect();
    assert_eq!(keys, (0..80).map(|i| format!("k{i}")).collect::<Vec<_>>());
    let ids: Vec<u64> = seen.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=80).collect::<Vec<_>>());
}

fn asp(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_client_round_trip_and_clear_failures() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"), &[]).await;
    let url = node.url();
    let base = ["--node", url.as_str(), "--ns", "cli"];
    let run = |extra: &[&str]| {
        let mut args = vec![extra[0]];
        args.extend_from_slice(&base);
        args.extend_from_slice(&extra[1..]);
        asp(&args)
    };
    let out = run(&["put", "user/1", r#"{"name":"ada"}"#]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["key"], "user/1");
    let out = run(&["get", "user/1"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"name":"ada"}"#
    );
    let out = run(&["put", "greeting", "hello"]);
    assert!(out.status.success());
    let out = run(&["get", "greeting"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello");
    let out = run(&["scan"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("greeting\t") && listing.contains("user/1\t"),
        "{listing}"
    );
    let out = run(&["del", "greeting"]);
    assert!(out.status.success());
    let out = run(&["get", "greeting"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let out = asp(&["status", "--node", &url]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["feed"]["head_seq"], 3);
    // Counters: set the policy, add, subtract, read; a second policy is refused.
    let counters = ["--node", url.as_str(), "--ns", "visits"];
    let with = |args: &[&str]| {
        let mut all = vec![args[0]];
        all.extend_from_slice(&counters);
        all.extend_from_slice(&args[1..]);
        asp(&all)
    };
    assert!(with(&["policy", "counter"]).status.success());
    let out = with(&["policy"]);
    let policy: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(policy["policy"], "counter");
    assert!(with(&["incr", "home"]).status.success());
    assert!(with(&["incr", "home", "-3"]).status.success());
    let out = with(&["get", "home"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "-2");
    let out = with(&["policy", "set"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy_fixed"));
    let out = run(&["incr", "user/1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong_policy"));

    // Mistakes get clear answers and failing exit codes.
    let out = asp(&["serve", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
    let out = asp(&["get", "--node", "localhost:7700", "k"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("http://host:port"));
    let out = asp(&[
        "status",
        "--node",
        &format!("http://127.0.0.1:{}", common::free_port()),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
    let out = run(&["put", "bad/ns", "1", "--content-type", "image/png"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported_media_type"));
    let out = asp(&[
        "serve",
        "--data-dir",
        dir.path().join("x").to_str().unwrap(),
        "--fsync",
        "sometimes",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("interval:<ms>"));
    let out = asp(&[
        "serve",
        "--data-dir",
        dir.path().join("node").to_str().unwrap(),
        "--api",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another asp process"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = asp(&[
        "serve",
        "--data-dir",
        dir.path().join("y").to_str().unwrap(),
        "--api",
        &format!("127.0.0.1:{}", node.port),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot listen"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `asp bench` and `asp demo` moved to the asp-bench crate: what used to run them now
/// says, in one line, what to run instead (with the arguments given), runs nothing and
/// exits with 2.
#[test]
fn moved_commands_name_their_new_home_and_exit_two() {
    let check = |args: &[&str], expected: &str| {
        let out = asp(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    };
    check(&["demo"], "cargo run --release -p asp-bench -- demo");
    check(&["bench"], "cargo run --release -p asp-bench -- bench");
    check(
        &["bench", "--scenarios", "reconcile", "--repeat", "1"],
        "cargo run --release -p asp-bench -- bench --scenarios reconcile --repeat 1",
    );
    check(&["demo", "--help"], "-p asp-bench -- demo --help");
    // Hidden: the help lists neither.
    let help = String::from_utf8_lossy(&asp(&["--help"]).stdout).into_owned();
    assert!(!help.contains("bench") && !help.contains("demo"), "{help}");
}
