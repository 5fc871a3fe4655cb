//! One node id names one node, and a node never issues a counter twice: with real
//! `asp serve` processes, a data directory restored from a backup, a copied data
//! directory started twice, and a crash under `fsync = "never"` that lost the end of
//! the log.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use asp_http::client::Client;
use bytes::Bytes;
use common::{Node, converge};

const NS: &str = "id";

async fn put(c: &Client, key: &str, value: &str) {
    c.put(NS, key, "text/plain", Bytes::from(value.to_owned()), None)
        .await
        .unwrap();
}

async fn text(c: &Client, key: &str) -> Option<String> {
    let r = c.get(NS, key, None).await.unwrap()?;
    Some(String::from_utf8(r.body.to_vec()).unwrap())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Waits until every `(key, value)` reads so on every node.
async fn wait_for_all(nodes: &[(&str, &Node)], wanted: &[(String, String)], limit: Duration) {
    let started = Instant::now();
    loop {
        let mut missing = Vec::new();
        for (name, node) in nodes {
            let c = node.client();
            for (k, v) in wanted {
                if text(&c, k).await.as_deref() != Some(v.as_str()) {
                    missing.push(format!("{name}:{k}"));
                }
            }
        }
        if missing.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "after {limit:?}, {} key(s) still missing or stale: {:?}",
            missing.len(),
            &missing[..missing.len().min(12)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn keys(prefix: &str, n: usize, value: &str) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("{prefix}{i}"), value.to_owned()))
        .collect()
}

/// Anti-entropy off: what a node lost must come back by the handover its peer starts
/// when it sees the node lacks its own events, not by a periodic check.
fn config(dir: &Path) -> String {
    let path = dir.join("asp.toml");
    std::fs::write(&path, "[replication]\nanti_entropy_interval_ms = 0\n").unwrap();
    path.to_str().unwrap().to_owned()
}

/// Regression: 10 writes, a backup of the data directory, 10 more, the backup restored,
/// 5 new writes: the restored node reused the counters of its 10 later writes, so its
/// peer dropped the 5 new ones as duplicates and it never got the 10 back, with no
/// error anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_gets_its_later_writes_back_and_its_new_writes_reach_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut a = Node::start(&dir.path().join("a"), &["--config", &cfg]).await;
    let b = Node::start(
        &dir.path().join("b"),
        &["--config", &cfg, "--peer", &a.peer_addr()],
    )
    .await;
    let ca = a.client();
    let first = keys("before", 10, "1");
    for (k, v) in &first {
        put(&ca, k, v).await;
    }
    converge(&[&a, &b], NS, 10, Duration::from_secs(30)).await;

    assert!(a.signal(libc::SIGTERM).success());
    copy_dir(&a.dir, &dir.path().join("backup"));
    a.restart().await;
    let later = keys("later", 10, "2");
    for (k, v) in &later {
        put(&ca, k, v).await;
    }
    converge(&[&a, &b], NS, 20, Duration::from_secs(30)).await;

    // Restore the backup in place of the directory.
    assert!(a.signal(libc::SIGTERM).success());
    std::fs::remove_dir_all(&a.dir).unwrap();
    copy_dir(&dir.path().join("backup"), &a.dir);
    a.restart().await;
    let new = keys("new", 5, "3");
    for (k, v) in &new {
        put(&ca, k, v).await;
    }

    let mut all = first.clone();
    all.extend(later.iter().cloned());
    all.extend(new.iter().cloned());
    wait_for_all(&[("a", &a), ("b", &b)], &all, Duration::from_secs(60)).await;
    converge(&[&a, &b], NS, 25, Duration::from_secs(30)).await;
    // And it says what happened.
    let status = ca.status().await.unwrap();
    let found = status["own_events_found"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{status:#}");
    assert_eq!(found[0]["known_counter"], 10);
    assert_eq!(found[0]["held_by_peers_counter"], 20);
}

/// Regression: a data directory copied while stopped (a cloned VM) and both copies
/// started, a third node peering with both: each copy kept its own writes, the third
/// node held half of them (the others were dropped as duplicates), and every status
/// said `active` with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_data_directory_started_twice_is_refused_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Node::start(&dir.path().join("a"), &[]).await;
    put(&a.client(), "seed", "0").await;
    assert!(a.signal(libc::SIGTERM).success());
    copy_dir(&a.dir, &dir.path().join("a2"));
    a.restart().await;
    let a2 = Node::start(&dir.path().join("a2"), &[]).await;
    let (ca, ca2) = (a.client(), a2.client());
    assert_eq!(
        ca.status().await.unwrap()["node_id"],
        ca2.status().await.unwrap()["node_id"]
    );
    for (k, v) in keys("first", 5, "a") {
        put(&ca, &k, &v).await;
    }
    for (k, v) in keys("second", 5, "a2") {
        put(&ca2, &k, &v).await;
    }
    let c = Node::start(
        &dir.path().join("c"),
        &["--peer", &a.peer_addr(), "--peer", &a2.peer_addr()],
    )
    .await;
    let cc = c.client();

    // The third node names the conflict; the copy it refused is told why.
    let started = Instant::now();
    let (conflict, refused_side) = loop {
        let status = cc.status().await.unwrap();
        let conflicts = status["replication"]["node_conflicts"].as_array().unwrap();
        let mut refused = None;
        for (name, client) in [("a", &ca), ("a2", &ca2)] {
            let s = client.status().await.unwrap();
            let told = s["replication"]["peers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["last_error"]["code"] == "node_conflict");
            if told {
                refused = Some(name);
            }
        }
        if let (Some(first), Some(name)) = (conflicts.first(), refused) {
            break (first.clone(), name);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no conflict reported: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        conflict["message"]
            .as_str()
            .unwrap()
            .contains("two processes"),
        "{conflict}"
    );
    // The kept copy's writes reach the third node; the refused copy's stay with it,
    // not silently dropped: its link stays refused.
    let kept = if refused_side == "a" {
        "second"
    } else {
        "first"
    };
    let wanted: Vec<(String, String)> = keys(kept, 5, if kept == "first" { "a" } else { "a2" });
    wait_for_all(&[("c", &c)], &wanted, Duration::from_secs(30)).await;
    let other = if kept == "first" { "second" } else { "first" };
    for i in 0..5 {
        assert_eq!(text(&cc, &format!("{other}{i}")).await, None);
    }
}

/// Regression: under `fsync = "never"` a machine crash lost the end of a node's log
/// (events its peer already held); restarted, it issued their counters again, and the
/// peer dropped every new write as a duplicate, silently and for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_lost_the_end_of_its_log_a_node_issues_no_counter_twice() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut a = Node::start(
        &dir.path().join("a"),
        &["--config", &cfg, "--fsync", "never"],
    )
    .await;
    let b = Node::start(
        &dir.path().join("b"),
        &["--config", &cfg, "--peer", &a.peer_addr()],
    )
    .await;
    let ca = a.client();
    let before = keys("k", 100, "1");
    for (k, v) in &before {
        put(&ca, k, v).await;
    }
    converge(&[&a, &b], NS, 100, Duration::from_secs(30)).await;

    // The machine crash: the process dies, and the page cache with what fsync = never
    // had not written out (cut in the middle of a record).
    a.kill();
    let log = std::fs::read_dir(a.dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .max()
        .unwrap();
    let len = std::fs::metadata(&log).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    f.set_len(len * 2 / 3 + 7).unwrap();
    drop(f);
    a.restart().await;
    let after = keys("n", 10, "2");
    for (k, v) in &after {
        put(&ca, k, v).await;
    }
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    wait_for_all(&[("a", &a), ("b", &b)], &all, Duration::from_secs(60)).await;
}
