//! Reconciliation between in-process nodes over real loopback TCP: anti-entropy
//! repairs, the handover of a node that was away past compaction, and the bootstrap
//! of an empty node while both sides keep writing.

mod common;

use std::time::Duration;

use asp_core::{ContentType, Key, NodeId};
use asp_node::{ReplicationConfig, Replicator};
use asp_store::{Store, StoreConfig, WriteOp};
use bytes::Bytes;
use common::{converge, ns, state, vector};
use tokio_util::sync::CancellationToken;

fn store_config(dir: &std::path::Path, id: u64) -> StoreConfig {
    let mut sc = StoreConfig::new(dir);
    sc.node_id = NodeId::new(id);
    sc.segment_bytes_max = 1 << 20;
    sc.compaction_retention_ms = 0;
    sc
}

fn replication(peers: Vec<String>) -> ReplicationConfig {
    let mut rc = ReplicationConfig::new("c");
    rc.listen = Some("127.0.0.1:0".parse().unwrap());
    rc.peers = peers;
    rc.heartbeat = Duration::from_millis(100);
    rc.idle_timeout = Duration::from_millis(3000);
    rc.backoff_min = Duration::from_millis(20);
    rc.backoff_max = Duration::from_millis(200);
    rc.summary_interval = Duration::from_millis(100);
    rc.anti_entropy_interval = Duration::from_millis(200);
    rc
}

/// The test-only divergence: each node records that the other holds its whole feed,
/// so that the stream never sends it; only reconciliation can find the difference.
fn hide_feeds_from_each_other(a: &Store, b: &Store) {
    a.save_checkpoint(NodeId::new(2).unwrap(), a.head().seq)
        .unwrap();
    b.save_checkpoint(NodeId::new(1).unwrap(), b.head().seq)
        .unwrap();
}

async fn stop(ra: Replicator, rb: Replicator, a: Store, b: Store) {
    ra.shutdown().await;
    rb.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}

/// Opens a store again once its previous handles are gone (bounded wait).
async fn reopen(dir: &std::path::Path, id: u64) -> Store {
    for _ in 0..200 {
        match Store::open(store_config(dir, id)) {
            Ok(store) => return store,
            Err(asp_store::OpenError::Locked { .. }) => {
                tokio::time::sleep(Duration::from_millis(25)).await
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
    panic!("the store stayed locked");
}

async fn start(store: &Store, peers: Vec<String>) -> Replicator {
    Replicator::start(store.clone(), replication(peers), CancellationToken::new())
        .await
        .unwrap()
}

async fn put_many(store: &Store, keys: impl IntoIterator<Item = String>, value: &str) {
    let mut ops = Vec::new();
    for key in keys {
        ops.push(WriteOp::put(
            Key::new(&key).unwrap(),
            ContentType::Text,
            Bytes::copy_from_slice(value.as_bytes()),
        ));
        if ops.len() == 1000 {
            store.write(ns(), std::mem::take(&mut ops)).await.unwrap();
        }
    }
    if !ops.is_empty() {
        store.write(ns(), ops).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divergence_behind_the_protocols_back_is_repaired_and_counted() {
    divergence_is_repaired(StoreConfig::RECONCILE_WINDOW_ON, "window").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_windows_anti_entropy_works_from_full_scans() {
    divergence_is_repaired(0, "full").await;
}

async fn divergence_is_repaired(window: usize, mode: &str) {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let open = |dir: &std::path::Path, id| {
        let mut sc = store_config(dir, id);
        sc.reconcile_window = window;
        Store::open(sc).unwrap()
    };
    let a = open(da.path(), 1);
    let b = open(db.path(), 2);
    // First 2,000 keys in common, replicated as usual.
    let ra = start(&a, vec![]).await;
    let rb = start(&b, vec![ra.listen_addr().unwrap().to_string()]).await;
    put_many(&a, (0..2000).map(|i| format!("shared{i}")), "s").await;
    converge(&a, &b, "before the divergence").await;
    ra.shutdown().await;
    rb.shutdown().await;
    // Apart, each writes: A 100 keys, B 30, and both write key "both".
    put_many(&a, (0..100).map(|i| format!("a{i}")), "from a").await;
    put_many(&b, (0..30).map(|i| format!("b{i}")), "from b").await;
    put_many(&a, ["both".to_owned()], "a's").await;
    put_many(&b, ["both".to_owned()], "b's").await;
    hide_feeds_from_each_other(&a, &b);
    // Without windows every check on an idle link is a run: checks 1 s apart, so that
    // the run that repaired is still the last one when its figures are read (at 200 ms
    // a test delayed by a loaded machine read the next run's, 0 differences).
    let start_checking = |store: &Store, peers| {
        let mut rc = replication(peers);
        if window == 0 {
            rc.anti_entropy_interval = Duration::from_secs(1);
        }
        Replicator::start(store.clone(), rc, CancellationToken::new())
    };
    let ra = start_checking(&a, vec![]).await.unwrap();
    let rb = start_checking(&b, vec![ra.listen_addr().unwrap().to_string()])
        .await
        .unwrap();
    converge(&a, &b, "after anti-entropy").await;
    assert_eq!(state(&a).len(), 2131);
    // Node 1 (the smaller id) started the run; each side counts what it took.
    let pa = &ra.status().peers[0];
    let pb = &rb.status().peers[0];
    assert_eq!(
        pb.reconcile.keys_repaired, 101,
        "B took A's 100 keys and the lww winner of \"both\""
    );
    assert_eq!(
        pa.reconcile.keys_repaired, 31,
        "A took B's 30 keys and B's version of \"both\""
    );
    let last = pa.reconcile.last.as_ref().expect("a run is recorded");
    assert_eq!(
        (last.mode, last.trigger, last.outcome),
        (mode, "anti_entropy", "decoded")
    );
    // 130 keys one side lacks, and "both" at two versions, seen alike from both sides.
    assert_eq!(last.differences, 132);
    assert_eq!(pb.reconcile.last.as_ref().unwrap().differences, 132);
    // Nothing came through the stream: the checkpoints held it back.
    assert_eq!(pa.events_received + pb.events_received, 0);
    assert_eq!(pa.events_sent + pb.events_sent, 0);
    let runs = ra.status().peers[0].reconcile.runs;
    if mode == "window" {
        // The next checks find the digests equal: no more runs.
        for _ in 0..100 {
            if ra.status().peers[0].reconcile.in_sync_checks >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pa = &ra.status().peers[0];
        assert!(
            pa.reconcile.in_sync_checks >= 2,
            "in-sync checks: {}",
            pa.reconcile.in_sync_checks
        );
        assert_eq!(pa.reconcile.runs, runs);
    } else {
        // Without digests every check on an idle link is a full run: the next one
        // finds nothing to repair.
        for _ in 0..200 {
            if ra.status().peers[0].reconcile.runs > runs {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pa = &ra.status().peers[0];
        assert!(pa.reconcile.runs > runs);
        assert_eq!(pa.reconcile.keys_repaired, 31);
        assert_eq!(pa.reconcile.last.as_ref().unwrap().differences, 0);
    }
    // The counts are exported.
    let mut registry = prometheus_client::registry::Registry::default();
    rb.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("asp_reconcile_keys_repaired_total{peer=\"0000000000000001\"} 101"),
        "{text}"
    );
    stop(ra, rb, a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_away_past_compaction_converges_through_reconciliation() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(store_config(da.path(), 1)).unwrap();
    let b = Store::open(store_config(db.path(), 2)).unwrap();
    let ra = start(&a, vec![]).await;
    let rb = start(&b, vec![ra.listen_addr().unwrap().to_string()]).await;
    put_many(&a, (0..2000).map(|i| format!("k{i}")), "first").await;
    converge(&a, &b, "before the outage").await;
    let sent_before = ra.status().peers[0].events_sent;
    // B goes away; A overwrites its keys over and over, and adds some.
    rb.shutdown().await;
    drop(rb);
    b.shutdown().await;
    drop(b);
    let value = "x".repeat(200);
    for round in 0..6 {
        put_many(
            &a,
            (0..2000).map(|i| format!("k{i}")),
            &format!("{round}{value}"),
        )
        .await;
    }
    put_many(&a, (0..500).map(|i| format!("new{i}")), "new").await;
    let report = a.compact().unwrap();
    assert!(report.segments_removed > 0, "{report:?}");
    assert!(!a.base(&ns()).is_empty());
    // B comes back: the feed no longer holds what it missed.
    let b = reopen(db.path(), 2).await;
    let rb = start(&b, vec![ra.listen_addr().unwrap().to_string()]).await;
    converge(&a, &b, "after the outage").await;
    // B's vector holds every dot A ever wrote (the compacted ones as covered).
    assert_eq!(vector(&b), vector(&a));
    let pa = &ra.status().peers[0];
    assert_eq!(pa.reconcile.handovers, 1);
    // The stream resumed after the snapshot: it did not replay the 12,500 writes B
    // missed (those reached B as 2,500 repaired keys).
    let sent = pa.events_sent - sent_before;
    assert!(sent < 2000, "events sent by the stream: {sent}");
    assert_eq!(rb.status().peers[0].reconcile.keys_repaired, 2500);
    stop(ra, rb, a, b).await;
}

/// Keys in the bootstrap test: 200,000 in the default run (about 20 s in a debug
/// build here); `ASP_BOOTSTRAP_KEYS=1000000` runs the million-key case. That case
/// stalled now and then on builds of 2026-12-02 to 12-07 (B stuck at exactly 227,722
/// keys); after the busy link's heartbeats (`Link::busy`, 2026-12-07) it passed 3 runs
/// in 3, 53–67 s each, too few to call it fixed, and too long for the default run.
fn bootstrap_keys() -> usize {
    std::env::var("ASP_BOOTSTRAP_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_node_bootstraps_while_both_sides_write() {
    let n = bootstrap_keys();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(store_config(da.path(), 1)).unwrap();
    put_many(&a, (0..n).map(|i| format!("k{i:07}")), "v1").await;
    // Half the keys overwritten, some deleted: compaction leaves a feed with holes.
    put_many(&a, (0..n / 2).map(|i| format!("k{i:07}")), "v2").await;
    let deletes: Vec<WriteOp> = (0..100)
        .map(|i| WriteOp::delete(Key::new(&format!("k{:07}", i * 7)).unwrap()))
        .collect();
    a.write(ns(), deletes).await.unwrap();
    let report = a.compact().unwrap();
    assert!(report.records_dropped > 0, "{report:?}");
    let ra = start(&a, vec![]).await;
    let b = Store::open(store_config(db.path(), 2)).unwrap();
    let rb = start(&b, vec![ra.listen_addr().unwrap().to_string()]).await;
    // What B's status shows while it receives the state (the console's progress).
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let rb = rb.clone();
        let watching = watching.clone();
        tokio::spawn(async move {
            let mut most = 0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(p) = rb.status().peers.first()
                    && let Some((keys, _)) = p.reconcile.receiving
                {
                    most = most.max(keys);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            most
        })
    };
    // Writes on both sides while B bootstraps.
    let (wa, wb) = (a.clone(), b.clone());
    let writers = tokio::spawn(async move {
        for round in 0..20 {
            put_many(&wa, (0..50).map(|i| format!("live-a{round}-{i}")), "a").await;
            put_many(&wb, (0..50).map(|i| format!("live-b{round}-{i}")), "b").await;
            // Contested: keys of the bootstrap set, overwritten on A during it.
            put_many(
                &wa,
                (0..10).map(|i| format!("k{:07}", round * 10 + i)),
                "v3",
            )
            .await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    writers.await.unwrap();
    converge(&a, &b, "after the bootstrap").await;
    let sb = state(&b);
    assert_eq!(sb.len(), n + 2000);
    assert_eq!(sb["k0000693"].0, None, "a deleted key stays deleted");
    assert_eq!(sb["k0000001"].0.as_deref(), Some(&b"v3"[..]));
    assert_eq!(sb["live-b19-49"].0.as_deref(), Some(&b"b"[..]));
    // The run is counted when its end reaches A, which can come just after the data
    // converged: poll (bounded) for it. Usually A hands over when B's first summary
    // shows it lacks A's compacted positions; on a loaded machine B's own anti-entropy
    // can start the transfer first (seen in a test run beside a release build), and A
    // then has nothing left to hand over. Either way: one run, by one transfer.
    let counted = |r: &Replicator| {
        let p = &r.status().peers[0];
        (p.reconcile.handovers, p.reconcile.transfers)
    };
    let b_transferred = |r: &Replicator| {
        let p = &r.status().peers[0];
        p.reconcile.runs == 1
            && p.reconcile
                .last
                .as_ref()
                .is_some_and(|l| l.mode == "transfer")
    };
    let one_transfer = || counted(&ra) == (1, 1) || (counted(&ra) == (0, 0) && b_transferred(&rb));
    // On a loaded machine (a debug build, 2 cores shared with other jobs) the end
    // of the run has come more than 10 s after the data: up to 60 s.
    for _ in 0..3000 {
        if one_transfer() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        one_transfer(),
        "one handover, by one transfer; A sees {:#?}; B sees {:#?}",
        ra.status().peers,
        rb.status().peers
    );
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let most = sampler.await.unwrap();
    assert!(most > 0, "B never showed keys being received");
    // Once the run ended, nothing shows as running.
    for _ in 0..3000 {
        if rb.status().peers[0].reconcile.receiving.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rb.status().peers[0].reconcile.receiving, None);
    stop(ra, rb, a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_different_reconcile_keys_fail_their_runs_and_say_why() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(store_config(da.path(), 1)).unwrap();
    let mut other = store_config(db.path(), 2);
    other.item_key = asp_core::reconcile::ItemKey::derive(b"another cluster secret");
    let b = Store::open(other).unwrap();
    put_many(&a, (0..300).map(|i| format!("a{i}")), "from a").await;
    put_many(&b, (0..300).map(|i| format!("b{i}")), "from b").await;
    hide_feeds_from_each_other(&a, &b);
    let ra = start(&a, vec![]).await;
    let rb = start(&b, vec![ra.listen_addr().unwrap().to_string()]).await;
    let mut error = None;
    for _ in 0..300 {
        error = rb.status().peers[0]
            .reconcile
            .last
            .as_ref()
            .and_then(|l| l.error.clone());
        if error.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error = error.expect("the responder records a failed run");
    assert!(error.contains("reconcile_key"), "{error}");
    // Nothing was repaired from garbage.
    assert_eq!(rb.status().peers[0].reconcile.keys_repaired, 0);
    assert_eq!(ra.status().peers[0].reconcile.keys_repaired, 0);
    assert_eq!(state(&b).len(), 300);
    stop(ra, rb, a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_repairs_a_counter_namespace() {
    use asp_core::crdt::{Policy, State};
    use asp_store::CrdtOp;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(store_config(da.path(), 1)).unwrap();
    let b = Store::open(store_config(db.path(), 2)).unwrap();
    for s in [&a, &b] {
        s.set_policy(ns(), Policy::Counter).await.unwrap();
    }
    let incr = |s: &Store, key: String, n: i64| {
        let s = s.clone();
        async move {
            s.write(
                ns(),
                vec![WriteOp::crdt(Key::new(&key).unwrap(), CrdtOp::Incr(n))],
            )
            .await
            .unwrap();
        }
    };
    for i in 0..50 {
        incr(&a, format!("c{}", i % 10), 2).await;
        incr(&b, format!("c{}", i % 7), 3).await;
    }
    hide_feeds_from_each_other(&a, &b);
    let ra = start(&a, vec![]).await;
    let rb = start(&b, vec![ra.listen_addr().unwrap().to_string()]).await;
    converge(&a, &b, "counters after anti-entropy").await;
    let value = |s: &Store, k: &str| match s.crdt_state(&ns(), k).unwrap() {
        Some(State::Counter(c)) => c.value(),
        other => panic!("{other:?}"),
    };
    // c0 got 5 increments of 2 on A and 8 of 3 on B.
    assert_eq!(value(&a, "c0"), 5 * 2 + 8 * 3);
    assert_eq!(value(&b, "c0"), 5 * 2 + 8 * 3);
    assert!(ra.status().peers[0].reconcile.keys_repaired > 0);
    stop(ra, rb, a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_writes_flow_while_a_bootstrap_transfer_is_held() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(store_config(da.path(), 1)).unwrap();
    let value = "v".repeat(300);
    put_many(&a, (0..5000).map(|i| format!("k{i:05}")), &value).await;
    put_many(&a, (0..5000).map(|i| format!("k{i:05}")), &value).await;
    let report = a.compact().unwrap();
    assert!(report.segments_removed > 0, "{report:?}");
    // The transfer sends its first page, then waits for the test.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let mut rc = replication(vec![]);
    rc.transfer_gate = Some(gate.clone());
    let ra = Replicator::start(a.clone(), rc, CancellationToken::new())
        .await
        .unwrap();
    let b = Store::open(store_config(db.path(), 2)).unwrap();
    let rb = start(&b, vec![ra.listen_addr().unwrap().to_string()]).await;
    let held = |s: &Store| state(s).len();
    for _ in 0..500 {
        if held(&b) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held(&b) > 0, "the first page arrives");
    // A live write on A reaches B by the stream while the transfer is held.
    put_many(&a, ["live".to_owned()], "now").await;
    let mut arrived = false;
    for _ in 0..500 {
        if b.get(&ns(), "live").unwrap().is_some() {
            arrived = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        arrived,
        "the live write did not arrive while the transfer was held"
    );
    assert!(
        held(&b) < 5001,
        "the transfer is still held: {} keys",
        held(&b)
    );
    assert_eq!(ra.status().peers[0].reconcile.transfers, 0);
    // Released, the transfer ends and the two converge.
    gate.add_permits(1 << 20);
    converge(&a, &b, "after the held transfer").await;
    assert_eq!(state(&b).len(), 5001);
    stop(ra, rb, a, b).await;
}

/// Regression: a receiver slow to apply (here every fdatasync takes longer than the
/// idle timeout) keeps its link through a transfer. Its link used to wait for the
/// writer in silence: the sender took it for dead, closed the link, and the transfer
/// never counted as ended (the bootstrap test failed that way in CI, under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_slow_to_apply_keeps_its_link_through_a_transfer() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(store_config(da.path(), 1)).unwrap();
    let value = "v".repeat(400);
    put_many(&a, (0..2000).map(|i| format!("k{i:04}")), &value).await;
    put_many(&a, (0..2000).map(|i| format!("k{i:04}")), &value).await;
    let report = a.compact().unwrap();
    assert!(report.records_dropped > 0, "{report:?}");
    let fs = asp_store::fault::FaultFs::new(7);
    let mut sc = store_config(db.path(), 2);
    sc.fs = fs.shared();
    sc.min_free_bytes = 0;
    let b = Store::open(sc).unwrap();
    // From here on B's every fdatasync outlasts the idle timeout.
    fs.set_sync_delay(Duration::from_millis(1500));
    let timeout = Duration::from_millis(1000);
    let mut rc = replication(vec![]);
    rc.idle_timeout = timeout;
    let ra = Replicator::start(a.clone(), rc, CancellationToken::new())
        .await
        .unwrap();
    let mut rc = replication(vec![ra.listen_addr().unwrap().to_string()]);
    rc.idle_timeout = timeout;
    let rb = Replicator::start(b.clone(), rc, CancellationToken::new())
        .await
        .unwrap();
    converge(&a, &b, "after the slow transfer").await;
    let counted = |r: &Replicator| {
        let p = &r.status().peers[0];
        (p.reconcile.handovers, p.reconcile.transfers)
    };
    for _ in 0..1500 {
        if counted(&ra) == (1, 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        counted(&ra),
        (1, 1),
        "one handover by one transfer, on one link; A sees {:#?}",
        ra.status().peers
    );
    fs.set_sync_delay(Duration::ZERO);
    stop(ra, rb, a, b).await;
}

/// Regression (issue 11, item 1): two nodes that hold the same dots in different
/// states stayed different for good: anti-entropy found the difference, but the
/// receiver dropped each repair whose dot it held as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_ends_a_divergence_between_equal_vectors() {
    let (dx, dy) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let x = Store::open(store_config(dx.path(), 1)).unwrap();
    let y = Store::open(store_config(dy.path(), 2)).unwrap();
    // X puts k, then deletes it; Y applies the put, and holds the delete's dot
    // without the delete (as a node does whose state lost it).
    put_many(&x, ["k".to_owned()], "p").await;
    let put = x.feed_reader(Some(ns()), 0).read(10).unwrap();
    assert_eq!(put.len(), 1);
    y.apply_remote(vec![put[0].event.clone()]).await.unwrap();
    x.write(ns(), vec![WriteOp::delete(Key::new("k").unwrap())])
        .await
        .unwrap();
    y.cover(ns(), vector(&x)).await.unwrap();
    assert_eq!(vector(&x), vector(&y));
    assert!(y.get(&ns(), "k").unwrap().unwrap().value.is_some());
    // Linked, with anti-entropy every 200 ms: the stream has nothing to send (the
    // vectors are equal), reconciliation repairs Y.
    let rx = start(&x, vec![]).await;
    let ry = start(&y, vec![rx.listen_addr().unwrap().to_string()]).await;
    converge(&x, &y, "after anti-entropy").await;
    assert!(y.get(&ns(), "k").unwrap().unwrap().value.is_none());
    // The repair is counted when Y's link handles the store's answer, which can come
    // just after the state shows it (seen with three test runs at once): poll, bounded.
    let repaired = || ry.status().peers[0].reconcile.keys_repaired;
    for _ in 0..500 {
        if repaired() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(repaired(), 1);
    stop(rx, ry, x, y).await;
}

// Issue 20, part 5: past 4,096 keys a namespace's runs find their keys through key-hash
// indexes (built when a check finds the digests differ, or by the first run's pass
// over the namespace), and repair the same as a pass would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_namespace_repairs_through_key_hash_indexes() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(store_config(da.path(), 1)).unwrap();
    let b = Store::open(store_config(db.path(), 2)).unwrap();
    let ra = start(&a, vec![]).await;
    let rb = start(&b, vec![ra.listen_addr().unwrap().to_string()]).await;
    put_many(&a, (0..5000).map(|i| format!("shared{i}")), "s").await;
    converge(&a, &b, "before the divergence").await;
    let (mut ra, mut rb) = (ra, rb);
    for round in 0..3 {
        ra.shutdown().await;
        rb.shutdown().await;
        put_many(&a, (0..60).map(|i| format!("a{round}-{i}")), "from a").await;
        put_many(&b, (0..40).map(|i| format!("b{round}-{i}")), "from b").await;
        // Overwrites of keys both hold, on one side each.
        put_many(&a, [format!("shared{round}")], "a's").await;
        put_many(&b, [format!("shared{}", 100 + round)], "b's").await;
        hide_feeds_from_each_other(&a, &b);
        ra = start(&a, vec![]).await;
        rb = start(&b, vec![ra.listen_addr().unwrap().to_string()]).await;
        converge(&a, &b, "after anti-entropy").await;
        assert_eq!(state(&a).len(), 5000 + 100 * (round + 1));
    }
    assert_eq!(state(&a), state(&b));
    let keys = 5300;
    assert_eq!(a.key_index_len(&ns()), Some(keys));
    assert_eq!(b.key_index_len(&ns()), Some(keys));
    // Later runs found their keys in the indexes, on both sides.
    for store in [&a, &b] {
        let mut registry = prometheus_client::registry::Registry::default();
        store.metrics().register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let lookups = text
            .lines()
            .find_map(|l| l.strip_prefix("asp_key_index_lookups_total "))
            .expect("the lookups counter");
        assert!(lookups.parse::<u64>().unwrap() >= 1, "{text}");
    }
    stop(ra, rb, a, b).await;
}
