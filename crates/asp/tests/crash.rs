//! Crash safety of a real `asp serve` process: SIGKILL at random moments while clients
//! write, restart, and check that nothing acknowledged is lost and the feed is whole.
//! Replay a run with ASP_TEST_SEED=<seed printed on failure>.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Node, Rng, seed, whole_feed};

/// What the writers were told was done: key -> the last acknowledged value; and the
/// values sent after it (or, for a key never acknowledged, ever) whose answer never
/// came. Each key has one writer, which writes it one request at a time, so "after"
/// is well defined.
#[derive(Default)]
struct Ledger {
    acked: BTreeMap<String, String>,
    in_doubt: BTreeMap<String, HashSet<String>>,
}

impl Ledger {
    /// A write of `key` is about to be sent.
    fn attempt(&mut self, key: &str, value: &str) {
        self.in_doubt
            .entry(key.to_owned())
            .or_default()
            .insert(value.to_owned());
    }

    /// A write of `key` was acknowledged: what was in doubt before it is older, and
    /// may no longer be read.
    fn acknowledge(&mut self, key: &str, value: &str) {
        self.in_doubt.remove(key);
        self.acked.insert(key.to_owned(), value.to_owned());
    }

    /// Whether `key` may read `got` after a crash: the acknowledged value, or a later
    /// write whose answer was lost; for a key never acknowledged, nothing or one of
    /// its writes. Nothing older, nothing else.
    fn allows(&self, key: &str, got: Option<&str>) -> bool {
        let later = |g: &str| self.in_doubt.get(key).is_some_and(|d| d.contains(g));
        match (self.acked.get(key), got) {
            (Some(acked), Some(g)) => g == acked || later(g),
            (Some(_), None) => false,
            (None, Some(g)) => later(g),
            (None, None) => true,
        }
    }
}

/// Guards against a ledger that accepted a value sent *before* the acknowledged one
/// (a rollback to an older write passed as "in doubt").
#[test]
fn the_ledger_accepts_only_the_acknowledged_value_or_a_later_one() {
    let mut l = Ledger::default();
    l.attempt("k", "1");
    l.attempt("k", "2"); // its answer was lost
    l.attempt("k", "3");
    l.acknowledge("k", "3");
    l.attempt("k", "4"); // sent after the acknowledgement, answer lost
    l.attempt("fresh", "a"); // never acknowledged
    assert!(l.allows("k", Some("3")));
    assert!(l.allows("k", Some("4")));
    assert!(
        !l.allows("k", Some("2")),
        "older than the acknowledged value"
    );
    assert!(
        !l.allows("k", Some("1")),
        "older than the acknowledged value"
    );
    assert!(!l.allows("k", Some("5")), "never written");
    assert!(!l.allows("k", None), "an acknowledged key vanished");
    assert!(l.allows("fresh", None));
    assert!(l.allows("fresh", Some("a")));
    assert!(!l.allows("fresh", Some("b")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_repeated_sigkill() {
    let seed = seed();
    eprintln!("crash test seed: {seed} (replay with ASP_TEST_SEED={seed})");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let mut node = Node::start(&data, &["--fsync", "always"]).await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (client, ledger, stop) = (node.client(), ledger.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ (w + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                // Mostly new keys, sometimes an overwrite of a hot key, sometimes a batch.
                let choice = rng.below(10);
                let attempt: Vec<(String, String)> = if choice < 6 {
                    vec![(format!("w{w}/{i}"), format!("{{\"w\":{w},\"i\":{i}}}"))]
                } else if choice < 8 {
                    vec![(format!("w{w}/hot"), i.to_string())]
                } else {
                    (0..3)
                        .map(|j| (format!("w{w}/b{i}-{j}"), format!("[{i},{j}]")))
                        .collect()
                };
                {
                    let mut l = ledger.lock().unwrap();
                    for (k, v) in &attempt {
                        l.attempt(k, v);
                    }
                }
                let result = if attempt.len() == 1 {
                    let (k, v) = &attempt[0];
                    client
                        .put("crash", k, "application/json", Bytes::from(v.clone()), None)
                        .await
                        .map(drop)
                } else {
                    let ops: Vec<String> = attempt
                        .iter()
                        .map(|(k, v)| format!(r#"{{"op":"put","key":"{k}","value":{v}}}"#))
                        .collect();
                    client
                        .batch(
                            "crash",
                            Bytes::from(format!(r#"{{"ops":[{}]}}"#, ops.join(","))),
                        )
                        .await
                        .map(drop)
                };
                match result {
                    Ok(()) => {
                        let mut l = ledger.lock().unwrap();
                        for (k, v) in &attempt {
                            l.acknowledge(k, v);
                        }
                    }
                    // The node is down (or going down): the write is in doubt; try the
                    // next one after a pause.
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }));
    }

    let mut rng = Rng(seed);
    let kills = 12;
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
        let before = ledger.lock().unwrap().acked.len();
        node.kill();
        tokio::time::sleep(Duration::from_millis(rng.below(100))).await;
        node.restart().await;
        eprintln!("kill {}: {before} keys acknowledged so far", k + 1);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    // One more kill with the writers quiet, then check everything.
    node.kill();
    node.restart().await;

    let client = node.client();
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(
        ledger.acked.len() > 200,
        "too few writes to mean anything: {}",
        ledger.acked.len()
    );
    let keys: BTreeSet<&String> = ledger.acked.keys().chain(ledger.in_doubt.keys()).collect();
    for key in keys {
        let got = client.get("crash", key, None).await.unwrap();
        let got = got.map(|r| String::from_utf8(r.body.to_vec()).unwrap());
        assert!(
            ledger.allows(key, got.as_deref()),
            "seed {seed}: key {key} acknowledged as {:?}, in doubt after that {:?}, reads {got:?}",
            ledger.acked.get(key),
            ledger.in_doubt.get(key)
        );
    }

    // The feed: positions dense from 1, each event once, counters of the one origin dense.
    let feed = whole_feed(&client, "crash").await;
    let status = client.status().await.unwrap();
    assert_eq!(
        feed.len() as u64,
        status["feed"]["head_seq"].as_u64().unwrap(),
        "seed {seed}"
    );
    let mut versions = HashSet::new();
    for (i, change) in feed.iter().enumerate() {
        assert_eq!(
            change["seq"].as_u64().unwrap(),
            i as u64 + 1,
            "seed {seed}: gap or duplicate in the feed at {i}"
        );
        assert_eq!(
            change["dot"]["counter"].as_u64().unwrap(),
            i as u64 + 1,
            "seed {seed}: counters must be dense"
        );
        assert!(
            versions.insert(change["version"].as_str().unwrap().to_owned()),
            "seed {seed}: event twice"
        );
    }
    // Every acknowledged write is in the feed.
    let in_feed: HashSet<(String, String)> = feed
        .iter()
        .map(|c| {
            (
                c["key"].as_str().unwrap().to_owned(),
                c["value"].to_string(),
            )
        })
        .collect();
    for (key, value) in &ledger.acked {
        let canonical = serde_json::from_str::<serde_json::Value>(value)
            .unwrap()
            .to_string();
        assert!(
            in_feed.contains(&(key.clone(), canonical)),
            "seed {seed}: {key}={value} acknowledged but not in the feed"
        );
    }
    eprintln!(
        "{} keys acknowledged, {} events in the feed, {kills} kills",
        ledger.acked.len(),
        feed.len()
    );
}
