//! Applying events from peers: deduplication by version vector, merge by version,
//! clock-skew parking, and the summary and checkpoints replication relies on.

use std::path::Path;

use asp_core::{ContentType, Dot, Event, Hlc, Key, Namespace, NodeId, Op};
use asp_store::{Store, StoreConfig, WriteOp};
use bytes::Bytes;

fn ns(name: &str) -> Namespace {
    Namespace::new(name).unwrap()
}

fn open(dir: &Path, id: u64) -> Store {
    let mut c = StoreConfig::new(dir);
    c.node_id = NodeId::new(id);
    Store::open(c).unwrap()
}

fn put(k: &str, v: &str) -> WriteOp {
    WriteOp::put(
        Key::new(k).unwrap(),
        ContentType::Text,
        Bytes::copy_from_slice(v.as_bytes()),
    )
}

fn text(store: &Store, k: &str) -> Option<String> {
    store
        .get(&ns("r"), k)
        .unwrap()
        .and_then(|s| s.value)
        .map(|v| String::from_utf8(v.bytes.to_vec()).unwrap())
}

fn feed(store: &Store) -> Vec<Event> {
    let mut out = Vec::new();
    let mut since = 0;
    loop {
        let page = store.changes(None, since, 1000).unwrap();
        if page.events.is_empty() {
            return out;
        }
        out.extend(page.events.into_iter().map(|e| e.event));
        since = page.next;
    }
}

fn remote(origin: u64, counter: u64, hlc_ms: u64, key: &str, value: &str) -> Event {
    Event {
        namespace: ns("r"),
        key: Key::new(key).unwrap(),
        op: Op::Put {
            content_type: ContentType::Text,
            value: Bytes::copy_from_slice(value.as_bytes()),
        },
        dot: Dot {
            origin: NodeId::new(origin).unwrap(),
            counter,
        },
        hlc: Hlc::new(hlc_ms, 0),
        context: Bytes::new(),
        epoch: 0,
        expires_ms: 0,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn events_copy_over_once_and_only_once() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open(da.path(), 1), open(db.path(), 2));
    a.write(ns("r"), vec![put("x", "1"), put("y", "2")])
        .await
        .unwrap();
    a.write(ns("r"), vec![WriteOp::delete(Key::new("y").unwrap())])
        .await
        .unwrap();
    let events = feed(&a);
    let out = b.apply_remote(events.clone()).await.unwrap();
    assert_eq!((out.applied, out.duplicates, out.last_seq), (3, 0, 3));
    assert_eq!(text(&b, "x").as_deref(), Some("1"));
    assert!(b.get(&ns("r"), "y").unwrap().unwrap().value.is_none());
    // The same events again, in another order: nothing new.
    let mut again = events.clone();
    again.reverse();
    let out = b.apply_remote(again).await.unwrap();
    assert_eq!((out.applied, out.duplicates), (0, 3));
    assert_eq!(feed(&b).len(), 3);
    // B's feed holds A's events unchanged: same dots, same clocks.
    assert_eq!(feed(&b), events);
    assert_eq!(b.summary(), a.summary());
}

#[tokio::test]
async fn concurrent_writes_converge_to_the_same_winner_everywhere() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open(da.path(), 1), open(db.path(), 2));
    for i in 0..20 {
        a.write(ns("r"), vec![put(&format!("k{}", i % 5), &format!("a{i}"))])
            .await
            .unwrap();
        b.write(ns("r"), vec![put(&format!("k{}", i % 5), &format!("b{i}"))])
            .await
            .unwrap();
    }
    let (fa, fb) = (feed(&a), feed(&b));
    b.apply_remote(fa).await.unwrap();
    a.apply_remote(fb).await.unwrap();
    for i in 0..5 {
        let k = format!("k{i}");
        let (va, vb) = (
            a.get(&ns("r"), &k).unwrap().unwrap(),
            b.get(&ns("r"), &k).unwrap().unwrap(),
        );
        assert_eq!(va, vb.clone().with_seq(va.seq), "key {k}");
    }
    assert_eq!(a.summary(), b.summary());
}

trait WithSeq {
    fn with_seq(self, seq: u64) -> Self;
}
impl WithSeq for asp_store::KeyState {
    fn with_seq(mut self, seq: u64) -> Self {
        // Feed positions are local to each node; everything else must agree.
        self.seq = seq;
        self
    }
}

#[tokio::test]
async fn older_events_never_replace_newer_ones_even_after_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let t = now_ms();
    {
        let s = open(dir.path(), 1);
        s.apply_remote(vec![remote(9, 2, t, "k", "new")])
            .await
            .unwrap();
        // Arrives later, but was written earlier: must lose.
        s.apply_remote(vec![remote(9, 1, t - 1000, "k", "old")])
            .await
            .unwrap();
        assert_eq!(text(&s, "k").as_deref(), Some("new"));
        // Gaps and out-of-order arrival are recorded exactly.
        s.apply_remote(vec![remote(8, 5, t, "g5", "5"), remote(8, 3, t, "g3", "3")])
            .await
            .unwrap();
        let summary = s.summary();
        let vv = &summary[0].vector;
        assert_eq!(
            vv.get(NodeId::new(8).unwrap()).unwrap().ranges(),
            &[(3, 3), (5, 5)]
        );
        assert_eq!(vv.get(NodeId::new(9).unwrap()).unwrap().ranges(), &[(1, 2)]);
    }
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let s = open(dir.path(), 1);
    assert_eq!(
        text(&s, "k").as_deref(),
        Some("new"),
        "the replay keeps the merge"
    );
    assert_eq!(
        s.summary()[0]
            .vector
            .get(NodeId::new(8).unwrap())
            .unwrap()
            .ranges(),
        &[(3, 3), (5, 5)]
    );
}

#[tokio::test]
async fn clocks_too_far_ahead_are_parked_and_the_rest_applied() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1);
    let t = now_ms();
    let out = s
        .apply_remote(vec![
            remote(9, 1, t, "ok", "1"),
            remote(9, 2, t + 3_600_000, "ahead", "2"),
        ])
        .await
        .unwrap();
    assert_eq!((out.applied, out.parked), (1, 1));
    assert_eq!(s.head().seq, 1);
    assert_eq!(text(&s, "ok").as_deref(), Some("1"));
    assert_eq!(text(&s, "ahead"), None);
    // The parked reading did not move this node's clock.
    let w = s.write(ns("r"), vec![put("k", "v")]).await.unwrap();
    assert!(w[0].hlc.physical_ms() < t + 3_600_000);
}

#[tokio::test]
async fn local_writes_follow_the_newest_clock_seen() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1);
    // A peer's clock is 30 s ahead (within the 60 s limit).
    let ahead = now_ms() + 30_000;
    s.apply_remote(vec![remote(9, 1, ahead, "k", "remote")])
        .await
        .unwrap();
    let w = s.write(ns("r"), vec![put("k", "local")]).await.unwrap();
    assert!(w[0].hlc > Hlc::new(ahead, 0));
    assert_eq!(
        text(&s, "k").as_deref(),
        Some("local"),
        "a write after the remote one wins"
    );
    assert_eq!(s.summary()[0].max_hlc, w[0].hlc);
}

#[tokio::test]
async fn checkpoints_are_kept_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let peer = NodeId::new(42).unwrap();
    {
        let s = open(dir.path(), 1);
        assert_eq!(s.checkpoint(peer), 0);
        for i in 0..5 {
            s.write(ns("r"), vec![put(&format!("k{i}"), "v")])
                .await
                .unwrap();
        }
        s.save_checkpoint(peer, 4).unwrap();
    }
    assert_eq!(open(dir.path(), 1).checkpoint(peer), 4);
}

#[tokio::test]
async fn checkpoints_past_a_lost_log_tail_are_lowered() {
    // Guards against skipping new events sent to a peer after a crash took the log's
    // unsynced tail (fsync = "never"): the feed positions are reused.
    let dir = tempfile::tempdir().unwrap();
    let peer = NodeId::new(42).unwrap();
    {
        let s = open(dir.path(), 1);
        for i in 0..5 {
            s.write(ns("r"), vec![put(&format!("k{i}"), "v")])
                .await
                .unwrap();
        }
        s.save_checkpoint(peer, 5).unwrap();
    }
    // Lose the last two records, as a machine crash would without fsync.
    let seg = std::fs::read_dir(dir.path().join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    let record = (len - 32) / 5;
    assert_eq!((len - 32) % 5, 0, "five records of one size");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 2 * record)
        .unwrap();
    let s = open(dir.path(), 1);
    assert_eq!(s.head().seq, 3);
    assert!(
        s.checkpoint(peer) <= 3,
        "checkpoint {} past the log's end",
        s.checkpoint(peer)
    );
}

/// Under fsync = always the writer holds a group open (at most 1 ms) for the writers its
/// last fsync acknowledged, who come back with their next write. A peer's batches do
/// not come back when acknowledged (its link sends the next when the peer writes it):
/// waiting for them only delayed every event of a live stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_waits_for_returning_local_writers_but_not_for_a_peers_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1);
    assert_eq!(store.config().fsync, asp_store::FsyncMode::Always);
    // Eight peers' links at once, each applying one batch after another: batches
    // acknowledged together, but a link's next one does not come because of it.
    let t = now_ms();
    let mut tasks = Vec::new();
    for origin in 10..18 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 1..=50 {
                store
                    .apply_remote(vec![remote(origin, i, t, &format!("k{origin}/{i}"), "v")])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        store.metrics().writer_straggler_waits.get(),
        0,
        "peers' batches: nothing to wait for"
    );
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                store
                    .write(ns("r"), vec![put(&format!("w{w}/{i}"), "v")])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        store.metrics().writer_straggler_waits.get() > 0,
        "eight local writers at once: acknowledged together, they come back together"
    );
    store.shutdown().await;
}
