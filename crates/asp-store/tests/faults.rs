//! The store on a disk that misbehaves ([`asp_store::fault::FaultFs`]): power cuts at
//! random moments lose no acknowledged write and show no torn batch; `EIO` on
//! `fdatasync` fails the store without acknowledging the writes it covered; `ENOSPC`
//! refuses writes, leaves nothing behind, and writes resume once space returns.
//!
//! Power cuts: `ASP_POWER_CUTS=20000` runs more of them (default 1,000);
//! `ASP_POWER_SEED=<n>` replays a seed (cut points and torn writes replay; thread
//! interleavings may differ).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use asp_core::crdt::Policy;
use asp_core::{ContentType, Dot, Event, Hlc, Key, Namespace, NodeId, Op};
use asp_store::fault::{FaultFs, SyncFailure};
use asp_store::{
    Checkpoint, CrdtOp, FsyncMode, Store, StoreConfig, WriteError, WriteKind, WriteOp,
};
use bytes::Bytes;

fn ns(name: &str) -> Namespace {
    Namespace::new(name).unwrap()
}

fn put(k: &str, v: &[u8]) -> WriteOp {
    WriteOp::put(
        Key::new(k).unwrap(),
        ContentType::OctetStream,
        Bytes::copy_from_slice(v),
    )
}

fn config(dir: &Path, fs: &FaultFs) -> StoreConfig {
    let mut cfg = StoreConfig::new(dir);
    cfg.fsync = FsyncMode::Always;
    cfg.segment_bytes_max = 1 << 20;
    cfg.fs = fs.shared();
    cfg.compaction_retention_ms = 0;
    cfg.min_free_bytes = 0;
    // Reconciliation windows are rebuilt on every open: not what these tests are about.
    cfg.reconcile_window = 0;
    cfg
}

fn value(store: &Store, namespace: &str, k: &str) -> Option<(Vec<u8>, Dot)> {
    let state = store.get(&ns(namespace), k).unwrap()?;
    Some((state.value?.bytes.to_vec(), state.version.dot))
}

/// splitmix64: the test's own seeded randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A batch of unique keys and their values.
type Batch = Vec<(String, Vec<u8>)>;

/// What the writers were told, and what they tried.
#[derive(Default)]
struct Model {
    /// Unique keys acknowledged (or seen whole after a cut): their value and dot.
    acked: HashMap<String, (Vec<u8>, Dot)>,
    /// Each hot key's newest acknowledged dot: what it holds must be at least as new.
    hot: HashMap<String, Dot>,
    /// Batches of unique keys that were not acknowledged: after a cut each must be
    /// there whole or not at all.
    unacked: Vec<(Batch, Option<u64>)>,
    /// Each writer's newest checkpoint (namespace `cp`, key `w<writer>`): the last key
    /// of its newest batch written with one. Checks that a checkpoint and its batch
    /// are there together or not at all.
    checkpoints: HashMap<u64, String>,
    /// Batches that were not there after a cut: they must never come back.
    lost: Vec<String>,
    /// Keys acknowledged since the last check (always checked).
    recent: std::collections::HashSet<String>,
}

const HOT_KEYS: u64 = 8;

/// One writer's random work until the power goes (or `ops` operations).
async fn work(store: Store, model: Arc<Mutex<Model>>, seed: u64, writer: u64, ops: u64) {
    let mut rng = Rng(seed);
    for n in 0..ops {
        let pad = rng.below(6000) as usize;
        match rng.below(3) {
            0 => {
                let k = format!("hot{}", rng.below(HOT_KEYS));
                let v = vec![b'h'; 100 + pad];
                match store.write(ns("p"), vec![put(&k, &v)]).await {
                    Ok(applied) => {
                        let mut m = model.lock().unwrap();
                        let dot = applied[0].dot;
                        let e = m.hot.entry(k).or_insert(dot);
                        if dot.counter > e.counter {
                            *e = dot;
                        }
                    }
                    Err(_) => return,
                }
            }
            _ => {
                let size = 1 + rng.below(4) as usize;
                let batch: Vec<(String, Vec<u8>)> = (0..size)
                    .map(|i| {
                        let k = format!("u{seed:x}-{writer}-{n}-{i}");
                        let v = format!("{k}:{}", "v".repeat(pad / size)).into_bytes();
                        (k, v)
                    })
                    .collect();
                let ops = batch.iter().map(|(k, v)| put(k, v)).collect();
                // Half the batches carry a checkpoint naming their last key.
                let checkpoint = (rng.below(2) == 0).then(|| Checkpoint {
                    namespace: ns("cp"),
                    key: Key::new(&format!("w{writer}")).unwrap(),
                    value: Bytes::from(
                        serde_json::json!({ "last": batch.last().unwrap().0 }).to_string(),
                    ),
                });
                let written = match &checkpoint {
                    Some(c) => store.write_with_checkpoint(ns("p"), ops, c.clone()).await,
                    None => store.write(ns("p"), ops).await,
                };
                match written {
                    Ok(applied) => {
                        let mut m = model.lock().unwrap();
                        if checkpoint.is_some() {
                            m.checkpoints
                                .insert(writer, batch.last().unwrap().0.clone());
                        }
                        for ((k, v), a) in batch.into_iter().zip(applied) {
                            m.recent.insert(k.clone());
                            m.acked.insert(k, (v, a.dot));
                        }
                    }
                    Err(_) => {
                        let writer = checkpoint.map(|_| writer);
                        model.lock().unwrap().unacked.push((batch, writer));
                        return;
                    }
                }
            }
        }
    }
}

/// Checks a store reopened after a cut against the model; batches found whole become
/// acknowledged (recovery made them durable).
fn verify(store: &Store, model: &mut Model, seed: u64, cycle: u64) {
    let ctx = format!("seed {seed} (ASP_POWER_SEED={seed}), cut {cycle}");
    let status = store.status();
    let vector = status
        .namespaces
        .iter()
        .find(|(n, _)| n.as_str() == "p")
        .map(|(_, s)| s.vector.clone())
        .unwrap_or_default();
    // Every key now and then; otherwise the newest and a sample of the others (a full
    // check after every cut would grow with the square of the cuts).
    let full = cycle.is_multiple_of(100);
    let mut sample = Rng(seed ^ cycle);
    for (k, (v, dot)) in &model.acked {
        if !full
            && !model.recent.contains(k)
            && sample.below(model.acked.len() as u64 / 64 + 1) != 0
        {
            continue;
        }
        let got = value(store, "p", k);
        assert_eq!(
            got.as_ref().map(|(v, d)| (v.len(), *d)),
            Some((v.len(), *dot)),
            "{ctx}: acknowledged key {k} lost or changed"
        );
        assert_eq!(&got.unwrap().0, v, "{ctx}: key {k} holds another value");
        assert!(
            vector.contains(*dot),
            "{ctx}: the vector lacks acknowledged dot {dot} of key {k}"
        );
    }
    for (k, dot) in &model.hot {
        let (_, held) = value(store, "p", k).unwrap_or_else(|| panic!("{ctx}: hot key {k} lost"));
        assert!(
            held.counter >= dot.counter,
            "{ctx}: hot key {k} went back from {dot} to {held}"
        );
        assert!(vector.contains(*dot), "{ctx}: the vector lacks dot {dot}");
    }
    for k in model.lost.iter().filter(|_| full) {
        assert!(
            value(store, "p", k).is_none(),
            "{ctx}: key {k} of a batch lost earlier came back"
        );
    }
    model.recent.clear();
    for (batch, checkpointed) in std::mem::take(&mut model.unacked) {
        let found: Vec<_> = batch
            .iter()
            .map(|(k, v)| (value(store, "p", k), v))
            .collect();
        let present = found.iter().filter(|(got, _)| got.is_some()).count();
        assert!(
            present == 0 || present == batch.len(),
            "{ctx}: an unacknowledged batch is half there ({present} of {})",
            batch.len()
        );
        if let Some(writer) = checkpointed
            && present > 0
        {
            model
                .checkpoints
                .insert(writer, batch.last().unwrap().0.clone());
        }
        for ((got, v), (k, _)) in found.into_iter().zip(&batch) {
            match got {
                Some((got, dot)) => {
                    assert_eq!(&got, v, "{ctx}: key {k}");
                    model.recent.insert(k.clone());
                    model.acked.insert(k.clone(), (got, dot));
                }
                None => model.lost.push(k.clone()),
            }
        }
    }
    for (writer, expected) in &model.checkpoints {
        let got = value(store, "cp", &format!("w{writer}")).map(|(v, _)| {
            let v: serde_json::Value = serde_json::from_slice(&v).unwrap();
            assert_eq!(v["batch"]["namespace"], "p", "the store names the batch");
            v["last"].as_str().unwrap().to_owned()
        });
        assert_eq!(
            got.as_deref(),
            Some(expected.as_str()),
            "{ctx}: writer {writer}'s checkpoint is not the one of its newest batch"
        );
    }
}

/// Guards against acknowledged writes lost to a power cut (what SIGKILL tests cannot
/// show: the page cache survives them), torn batches, and logs that do not reopen
/// after a cut in a rotation, a compaction or a base file replacement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_no_acknowledged_write() {
    let cuts: u64 = std::env::var("ASP_POWER_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let seed: u64 = std::env::var("ASP_POWER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("power cuts: {cuts}, seed {seed} (replay with ASP_POWER_SEED={seed})");
    let mut rng = Rng(seed);
    let mut totals = [0u64; 6];
    let mut cycle = 0;
    // A fresh data directory every EPOCH_CUTS cuts keeps each open (and each index
    // rebuild) cheap, while each epoch still writes several segments.
    while cycle < cuts {
        let epoch = (cuts - cycle).min(EPOCH_CUTS);
        let counts = power_cut_epoch(seed, &mut rng, cycle, epoch).await;
        for (t, c) in totals.iter_mut().zip(counts) {
            *t += c;
        }
        cycle += epoch;
    }
    let [acked, lost, torn, compactions, rebuilds, rotations] = totals;
    println!(
        "{cuts} cuts: {acked} keys acknowledged and all kept, {lost} unacknowledged batches lost whole, {torn} torn tails cut, {compactions} compactions, {rebuilds} index rebuilds, {rotations} segments sealed"
    );
    assert!(acked > cuts, "the cuts left too little written to test");
}

const EPOCH_CUTS: u64 = 50;

/// `cuts` power cuts on one data directory; returns what happened (see the caller).
async fn power_cut_epoch(seed: u64, rng: &mut Rng, first: u64, cuts: u64) -> [u64; 6] {
    // The log is in memory; the key index (real files, fsynced by fjall) goes to a
    // memory filesystem where there is one, so that the cuts are not paced by a disk.
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let fs = FaultFs::new(rng.next());
    let mut model = Model::default();
    let (mut compactions, mut rebuilds, mut torn) = (0, 0, 0);
    for cycle in first..first + cuts {
        let store = Store::open(config(dir.path(), &fs)).unwrap_or_else(|e| {
            panic!(
                "seed {seed} (ASP_POWER_SEED={seed}), cut {cycle}: the store does not reopen: {e}"
            )
        });
        torn += u64::from(store.recovery().torn_tail.is_some());
        verify(&store, &mut model, seed, cycle);

        let shared = Arc::new(Mutex::new(std::mem::take(&mut model)));
        // A cut somewhere in the next few dozen writes, fsyncs, rotations, ...
        fs.cut_after(rng.below(80));
        let mut tasks = Vec::new();
        for writer in 0..3 {
            tasks.push(tokio::spawn(work(
                store.clone(),
                shared.clone(),
                rng.next(),
                writer,
                12,
            )));
        }
        if rng.below(6) == 0 {
            compactions += 1;
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let _ = store.compact_async().await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        fs.cut();
        drop(store);
        model = Arc::into_inner(shared).unwrap().into_inner().unwrap();
        fs.reboot();
        if rng.below(4) == 0 {
            // The key index is not on the faulty disk: sometimes it is lost too.
            rebuilds += 1;
            let _ = std::fs::remove_dir_all(dir.path().join("index"));
        }
    }
    let store = Store::open(config(dir.path(), &fs)).unwrap();
    verify(&store, &mut model, seed, 0);
    let sealed = store.status().log_segments as u64 - 1;
    let removed = store.metrics().compaction_segments_removed.get();
    [
        model.acked.len() as u64,
        model.lost.len() as u64,
        torn,
        compactions,
        rebuilds,
        sealed + removed,
    ]
}

/// Regression: an fdatasync that fails must never acknowledge the writes it covered;
/// the store refuses writes from then on and says why.
#[tokio::test]
async fn eio_on_fdatasync_acknowledges_nothing_and_fails_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::new(7);
    let store = Store::open(config(dir.path(), &fs)).unwrap();
    store
        .write(ns("e"), vec![put("before", b"1")])
        .await
        .unwrap();
    fs.fail_syncs(SyncFailure::Next);
    let err = store
        .write(ns("e"), vec![put("during", b"2")])
        .await
        .expect_err("a write whose fdatasync failed was acknowledged");
    assert!(matches!(err, WriteError::Storage(_)), "{err}");
    // The store does not trust its log any more, even though the next fsync would work.
    let err = store
        .write(ns("e"), vec![put("after", b"3")])
        .await
        .unwrap_err();
    assert!(matches!(err, WriteError::Storage(_)), "{err}");
    let failure = store.status().failure.expect("status says why");
    assert!(failure.contains("fsync"), "{failure}");
    // Reads answer the failure, or not the write: never the write.
    assert!(
        !matches!(store.get(&ns("e"), "during"), Ok(Some(_))),
        "an unacknowledged write is visible"
    );
    assert_eq!(
        store.head().seq,
        1,
        "the feed shows only the acknowledged write"
    );
    fs.cut();
    drop(store);
    fs.reboot();
    let store = Store::open(config(dir.path(), &fs)).unwrap();
    assert_eq!(value(&store, "e", "before").unwrap().0, b"1");
    store
        .write(ns("e"), vec![put("later", b"4")])
        .await
        .unwrap();
}

fn remote_event(origin: u64, counter: u64, k: &str) -> Event {
    Event {
        namespace: ns("r"),
        key: Key::new(k).unwrap(),
        op: Op::Put {
            content_type: ContentType::Text,
            value: Bytes::from_static(b"remote"),
        },
        dot: Dot {
            origin: NodeId::new(origin).unwrap(),
            counter,
        },
        hlc: Hlc::from_raw(1 << 20),
        context: Bytes::new(),
        epoch: 0,
        expires_ms: 0,
    }
}

/// Regression: a full disk failed the store for good (writes refused until a
/// restart, 9,525 acknowledged then `500 storage_failure` on a 40 MB filesystem). Now
/// the failed group leaves nothing behind — not in the log, not in the vectors, clocks
/// or CRDT states — and writes resume once space returns.
#[tokio::test]
async fn enospc_refuses_writes_until_space_returns_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::new(11);
    let mut cfg = config(dir.path(), &fs);
    cfg.namespace_policies.insert("c".into(), Policy::Counter);
    let store = Store::open(cfg.clone()).unwrap();
    let first = store.write(ns("s"), vec![put("a", b"1")]).await.unwrap();
    let incr = |n: i64| WriteOp {
        key: Key::new("n").unwrap(),
        kind: WriteKind::Crdt(CrdtOp::Incr(n)),
        condition: asp_store::Condition::None,
    };
    store.write(ns("c"), vec![incr(5)]).await.unwrap();
    // Room for part of a record: the write lands partly, then the disk is full.
    fs.set_capacity(Some(fs.used_bytes() + 40));
    let big = vec![b'x'; 2000];
    for attempt in 0..3 {
        let err = store
            .write(ns("s"), vec![put("b", &big), put("c", &big)])
            .await
            .unwrap_err();
        assert!(
            matches!(err, WriteError::NoSpace(_)),
            "attempt {attempt}: {err}"
        );
        assert!(err.to_string().contains("free space"), "{err}");
    }
    let err = store.write(ns("c"), vec![incr(100)]).await.unwrap_err();
    assert!(matches!(err, WriteError::NoSpace(_)), "{err}");
    let err = store
        .apply_remote(vec![remote_event(99, 1, "x"), remote_event(99, 2, "y")])
        .await
        .unwrap_err();
    assert!(matches!(err, WriteError::NoSpace(_)), "{err}");
    let why = store
        .status()
        .no_space
        .expect("status says why writes are refused");
    assert!(why.contains("no space"), "{why}");
    assert!(
        store.status().failure.is_none(),
        "a full disk is not a failure"
    );

    fs.set_capacity(None);
    assert!(store.status().no_space.is_none(), "space is back");
    let b = store.write(ns("s"), vec![put("b", b"2")]).await.unwrap();
    assert_eq!(
        b[0].dot.counter,
        first[0].dot.counter + 1,
        "a refused write must not use up dots"
    );
    assert_eq!(
        b[0].seq, 3,
        "a refused write must not use up feed positions"
    );
    store.write(ns("c"), vec![incr(1)]).await.unwrap();
    let outcome = store
        .apply_remote(vec![remote_event(99, 1, "x"), remote_event(99, 2, "y")])
        .await
        .unwrap();
    assert_eq!(
        (outcome.applied, outcome.duplicates),
        (2, 0),
        "refused peer events must not count as held"
    );
    let counter = |store: &Store| match store.crdt_state(&ns("c"), "n").unwrap() {
        Some(asp_core::crdt::State::Counter(c)) => c.value(),
        other => panic!("not a counter: {other:?}"),
    };
    assert_eq!(counter(&store), 6, "a refused increment must not count");
    // Nothing of the refused writes is in the log: a power cut and a reopen read the
    // same, dense feed.
    let head = store.head().seq;
    fs.cut();
    drop(store);
    fs.reboot();
    let store = Store::open(cfg).unwrap();
    assert!(store.recovery().torn_tail.is_none());
    assert_eq!(store.head().seq, head);
    let page = store.changes(None, 0, 100).unwrap();
    let seqs: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>());
    assert_eq!(value(&store, "s", "b").unwrap().0, b"2");
    assert!(value(&store, "s", "c").is_none());
    assert_eq!(counter(&store), 6);
}

/// Regression: with a reserve configured, writes are refused before anything is
/// written (so that the key index, which cannot take a write back, never meets a full
/// disk), and accepted again once space is back.
#[tokio::test]
async fn the_free_space_guard_refuses_writes_below_the_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::new(13);
    let mut cfg = config(dir.path(), &fs);
    cfg.min_free_bytes = 1 << 20;
    let store = Store::open(cfg).unwrap();
    store.write(ns("g"), vec![put("a", b"1")]).await.unwrap();
    fs.set_capacity(Some(fs.used_bytes() + (512 << 10)));
    let used = fs.used_bytes();
    let err = store
        .write(ns("g"), vec![put("b", b"2")])
        .await
        .unwrap_err();
    assert!(matches!(err, WriteError::NoSpace(_)), "{err}");
    assert!(err.to_string().contains("min_free_bytes"), "{err}");
    assert_eq!(fs.used_bytes(), used, "a refused write wrote nothing");
    assert!(store.status().no_space.is_some());
    fs.set_capacity(None);
    assert!(store.status().no_space.is_none());
    let b = store.write(ns("g"), vec![put("b", b"2")]).await.unwrap();
    assert_eq!(b[0].seq, 2);
}

/// Regression: a peer's covered dots were saved (fsynced) at once, before the repairs
/// they stand for were durable. Under `fsync = never` (and under `always`, between the
/// base file and the group's fsync) a power cut then kept the claim and took the
/// events: the node said it held a key it did not, and since a held dot's repair of a
/// key with no entry is dropped (it cannot be told from a collected delete), no peer
/// could give it back.
#[tokio::test]
async fn covered_dots_never_outlive_the_repairs_they_stand_for() {
    for fsync in [FsyncMode::Never, FsyncMode::Always] {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultFs::new(17);
        let mut cfg = config(dir.path(), &fs);
        cfg.fsync = fsync;
        let store = Store::open(cfg.clone()).unwrap();
        let event = remote_event(9, 1, "fresh");
        let dot = event.dot;
        store
            .enqueue_repair(vec![event])
            .await
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        let mut covered = asp_core::VersionVector::default();
        covered.insert(dot);
        store.cover(ns("r"), covered).await.unwrap();
        fs.cut();
        drop(store);
        fs.reboot();
        let store = Store::open(cfg).unwrap();
        let claims = store.namespace_vector(&ns("r")).contains(dot);
        let holds = value(&store, "r", "fresh").is_some();
        assert!(
            !claims || holds,
            "{fsync:?}: after a power cut the store claims {dot} but lacks its key"
        );
        store.shutdown().await;
    }
}
