//! Crash safety of a real `asp serve` process: SIGKILL at random moments while clients
//! write, restart, and check that nothing acknowledged is lost and the feed is whole.
//! Replay a run with ASP_TEST_SEED=<seed printed on failure>.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Node, Rng, seed, whole_feed};

/// What the writers were told was done: key -> acknowledged value; and, for keys written
/// more than once, the values that were attempted but not acknowledged.
#[derive(Default)]
struct Ledger {
    acked: BTreeMap<String, String>,
    in_doubt: BTreeMap<String, HashSet<String>>,
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
                        l.in_doubt.entry(k.clone()).or_default().insert(v.clone());
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
                        for (k, v) in attempt {
                            l.in_doubt.get_mut(&k).unwrap().remove(&v);
                            l.acked.insert(k, v);
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
    for (key, value) in &ledger.acked {
        let got = client.get("crash", key, None).await.unwrap();
        let got = got.map(|r| String::from_utf8(r.body.to_vec()).unwrap());
        // The stored value is the acknowledged one, or a later write of the same key
        // whose answer was lost in a crash.
        let ok = got.as_deref() == Some(value.as_str())
            || got
                .as_ref()
                .is_some_and(|g| ledger.in_doubt.get(key).is_some_and(|d| d.contains(g)));
        assert!(
            ok,
            "seed {seed}: key {key} acknowledged as {value}, reads {got:?}"
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
