//! Collection of CRDT state: a key of a `set`, `siblings` or `json-map` namespace that
//! holds nothing any more goes from the key index (every origin's entry at once) and
//! its records from the log, once every known node holds all of its entries — the
//! rule of `lww` deletes (`gc.rs`). Counters are never collected.
//!
//! `ASP_CRDT_GC_MEMBERS` sets how many set members (map fields) the storage tests add
//! and remove (default 20,000; with 1,000,000 the set test takes about 50 s here and the
//! store's 635 MB went back to 1.43 MB, the map test about 65 s and 912 MB went back
//! to 1.43 MB, against 1.39 MB for a store that never held them: bench/RESULTS.md).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use asp_core::crdt::{Change, Context, Policy, State};
use asp_core::session::{NamespaceSummary, VectorReport};
use asp_core::{ContentType, Dot, Event, Hlc, Key, Namespace, NodeId, Op, VersionVector};
use asp_store::{CompactionReport, CrdtOp, Store, StoreConfig, WriteOp};
use bytes::Bytes;

const ME: u64 = 1;
const PEER: u64 = 2;

fn ns(name: &str) -> Namespace {
    Namespace::new(name).unwrap()
}

fn id(n: u64) -> NodeId {
    NodeId::new(n).unwrap()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// As in `gc.rs`: small segments, no retention, collectable at once; `s` a set,
/// `r` siblings, `c` a counter, `m` a JSON map.
fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.node_id = NodeId::new(ME);
    c.segment_bytes_max = 1 << 20;
    c.compaction_retention_ms = 0;
    c.tombstone_ttl_ms = Some(0);
    c.gc_horizon_ms = 600_000;
    c.compaction_dead_ratio = 0.01;
    c.namespace_policies.insert("s".into(), Policy::Set);
    c.namespace_policies.insert("r".into(), Policy::Siblings);
    c.namespace_policies.insert("c".into(), Policy::Counter);
    c.namespace_policies.insert("m".into(), Policy::JsonMap);
    c
}

async fn compact(store: &Store) -> CompactionReport {
    store.compact_async().await.unwrap()
}

fn member(i: usize) -> Bytes {
    Bytes::from(format!("\"member-{i:07}\""))
}

/// `members` set members over keys of ten each: every one added, then every one
/// removed, in batches of 1,000 operations.
async fn add_then_remove(store: &Store, members: usize) {
    add_then_remove_in(store, "s", members).await;
}

/// The same in the set `s` or the map `m` (a field `f<i>` set to the member's JSON
/// text, then removed).
async fn add_then_remove_in(store: &Store, namespace: &str, members: usize) {
    for remove in [false, true] {
        for chunk in (0..members).collect::<Vec<_>>().chunks(1000) {
            let ops = chunk
                .iter()
                .map(|&i| {
                    let key = Key::new(&format!("k{}", i / 10)).unwrap();
                    let path = vec![format!("f{i}")];
                    let op = match (namespace, remove) {
                        ("s", false) => CrdtOp::Add(member(i)),
                        ("s", true) => CrdtOp::Remove(member(i)),
                        (_, false) => CrdtOp::Patch(vec![(path, Change::Set(member(i)))]),
                        (_, true) => CrdtOp::Patch(vec![(path, Change::Remove)]),
                    };
                    WriteOp::crdt(key, op)
                })
                .collect();
            store.write(ns(namespace), ops).await.unwrap();
        }
    }
}

/// Enough writes to an `lww` namespace to seal the segment holding everything before.
async fn seal(store: &Store) {
    for chunk in (0..1200).collect::<Vec<_>>().chunks(100) {
        let ops = chunk
            .iter()
            .map(|i| {
                WriteOp::put(
                    Key::new(&format!("filler{i}")).unwrap(),
                    ContentType::Text,
                    Bytes::from(vec![b'f'; 1000]),
                )
            })
            .collect();
        store.write(ns("filler"), ops).await.unwrap();
    }
}

fn keys(store: &Store, namespace: &str) -> usize {
    store
        .state_events(&ns(namespace), None, usize::MAX, usize::MAX)
        .unwrap()
        .0
        .len()
}

fn members(store: &Store, k: &str) -> Vec<Bytes> {
    match store.crdt_state(&ns("s"), k).unwrap() {
        Some(State::Set(s)) => s.members().cloned().collect(),
        None => Vec::new(),
        other => panic!("{other:?}"),
    }
}

fn vector(store: &Store, namespace: &str) -> VersionVector {
    store
        .summary()
        .into_iter()
        .find(|s| s.namespace == ns(namespace))
        .map(|s| s.vector)
        .unwrap_or_default()
}

/// The bytes a store's files take on disk (allocated blocks), and of those the index
/// journal's: fjall's write-ahead file, preallocated and mostly unwritten, holds the
/// index's recent writes until its memtables flush — bounded, and shared by every
/// namespace, so not counted as the namespace's.
fn disk_bytes(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut total, mut journal) = (0, 0);
    for entry in std::fs::read_dir(path).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            let (t, j) = disk_bytes(&entry.path());
            total += t;
            journal += j;
        } else {
            total += meta.blocks() * 512;
            if entry.path().extension().is_some_and(|e| e == "jnl") {
                journal += meta.blocks() * 512;
            }
        }
    }
    (total, journal)
}

/// [`disk_bytes`] without the journal.
fn dir_bytes(path: &Path) -> u64 {
    let (total, journal) = disk_bytes(path);
    eprintln!(
        "{}: {total} bytes on disk, {journal} of them the index journal",
        path.display()
    );
    total - journal
}

/// The disk use (log and index tables) of a store that wrote only the filler, and of
/// one that also added and removed `members` set members, each after compaction (run
/// twice: the second run removes the segments the first one's copies sealed).
#[tokio::test]
async fn an_emptied_set_namespace_shrinks_to_the_size_of_an_empty_one() {
    emptied_namespace_shrinks("s").await;
}

/// The same for JSON maps whose every field was removed.
#[tokio::test]
async fn an_emptied_map_namespace_shrinks_to_the_size_of_an_empty_one() {
    emptied_namespace_shrinks("m").await;
}

async fn emptied_namespace_shrinks(namespace: &str) {
    let n: usize = std::env::var("ASP_CRDT_GC_MEMBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let empty_dir = tempfile::tempdir().unwrap();
    let empty = Store::open(config(empty_dir.path())).unwrap();
    seal(&empty).await;
    seal(&empty).await;
    compact(&empty).await;
    compact(&empty).await;
    empty.shutdown().await;
    drop(empty);
    let empty_bytes = dir_bytes(empty_dir.path());

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    add_then_remove_in(&store, namespace, n).await;
    assert_eq!(keys(&store, namespace), n / 10);
    // Every key reads empty, and holds its entry still.
    assert!(
        store
            .crdt_state(&ns(namespace), "k3")
            .unwrap()
            .is_some_and(|s| s.is_removed())
    );
    seal(&store).await;
    let held = vector(&store, namespace);
    let before = dir_bytes(dir.path());
    let first = compact(&store).await;
    assert_eq!(first.tombstones_collected as usize, n / 10, "{first:?}");
    seal(&store).await;
    compact(&store).await;
    // Gone from the index: no key of the namespace is left, none reads back, and
    // the node still holds every dot it wrote.
    assert_eq!(keys(&store, namespace), 0);
    assert!(store.crdt_state(&ns(namespace), "k3").unwrap().is_none());
    assert_eq!(vector(&store, namespace), held);
    store.shutdown().await;
    drop(store);
    let after = dir_bytes(dir.path());
    eprintln!(
        "{namespace}: {n} members (fields) added and removed: {before} bytes before compaction, {after} after; a store without them: {empty_bytes}"
    );
    assert!(
        (after as f64) <= empty_bytes as f64 * 1.10,
        "{after} bytes on disk after collection, {empty_bytes} for a store without them"
    );
    // Reopened: still empty, nothing more to collect.
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(keys(&store, namespace), 0);
    assert_eq!(compact(&store).await.tombstones_collected, 0);
    store.shutdown().await;
}

/// The peer's own report of `vector` as its summary would carry it.
fn peer_report(namespace: &str, vector: VersionVector) -> Vec<NamespaceSummary> {
    vec![NamespaceSummary {
        namespace: ns(namespace),
        max_hlc: Hlc::ZERO,
        vector: vector.clone(),
        digest: None,
        reports: vec![VectorReport {
            node: id(PEER),
            at_ms: now_ms(),
            vector,
        }],
    }]
}

/// The peer's add of `m` to `k` made before it saw anything of this node's: its
/// state holds just that add.
fn peer_add(k: &str, m: Bytes, counter: u64) -> Event {
    let dot = Dot {
        origin: id(PEER),
        counter,
    };
    let State::Set(empty) = State::empty(Policy::Set).unwrap() else {
        unreachable!()
    };
    let state = State::Set(empty.add(m, dot));
    Event {
        namespace: ns("s"),
        key: Key::new(k).unwrap(),
        op: Op::Put {
            content_type: ContentType::OctetStream,
            value: Bytes::from(state.encode()),
        },
        dot,
        hlc: Hlc::new(now_ms() - 5_000, 0),
        context: Policy::Set.event_context(),
        epoch: 0,
        expires_ms: 0,
    }
}

#[tokio::test]
async fn a_key_waits_for_every_node_and_a_late_concurrent_add_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    add_then_remove(&store, 100).await;
    // A peer is known and has reported nothing this node holds: nothing goes.
    let late = peer_add("k4", member(4_000), 1);
    let mut peer_vector = vector(&store, "s");
    peer_vector.insert(late.dot);
    store.note_reports(&peer_report("s", peer_vector));
    seal(&store).await;
    assert_eq!(compact(&store).await.tombstones_collected, 0);
    assert_eq!(keys(&store, "s"), 10);
    // The peer's add, concurrent with the removals, arrives: k4 holds it.
    assert_eq!(
        store
            .apply_remote(vec![late.clone()])
            .await
            .unwrap()
            .applied,
        1
    );
    assert_eq!(members(&store, "k4"), vec![member(4_000)]);
    // Now the peer's report is one this node holds: the nine emptied keys go, k4
    // (not empty) stays with both origins' entries.
    seal(&store).await;
    let report = compact(&store).await;
    assert_eq!(report.tombstones_collected, 9, "{report:?}");
    assert_eq!(keys(&store, "s"), 2);
    assert!(members(&store, "k3").is_empty());
    assert_eq!(members(&store, "k4"), vec![member(4_000)]);
    // A copy of the late add is a duplicate; a removal of it here then empties k4,
    // and the next run collects both of its entries.
    assert_eq!(store.apply_remote(vec![late]).await.unwrap().duplicates, 1);
    let remove = WriteOp::crdt(Key::new("k4").unwrap(), CrdtOp::Remove(member(4_000)));
    store.write(ns("s"), vec![remove]).await.unwrap();
    store.note_reports(&peer_report("s", vector(&store, "s")));
    seal(&store).await;
    let report = compact(&store).await;
    assert_eq!(report.tombstones_collected, 2, "{report:?}");
    assert_eq!(keys(&store, "s"), 0);
    // A new add from the peer, made after it held everything, is kept.
    let again = Event {
        hlc: Hlc::new(now_ms(), 0),
        ..peer_add("k3", member(30), 2)
    };
    assert_eq!(store.apply_remote(vec![again]).await.unwrap().applied, 1);
    assert_eq!(members(&store, "k3"), vec![member(30)]);
    store.shutdown().await;
}

#[tokio::test]
async fn deleted_siblings_go_and_counters_stay() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let key = |k: &str| Key::new(k).unwrap();
    for k in ["a", "b"] {
        let write = CrdtOp::Write {
            context: Context::default(),
            value: Some((ContentType::Text, Bytes::from_static(b"v"))),
        };
        store
            .write(ns("r"), vec![WriteOp::crdt(key(k), write)])
            .await
            .unwrap();
    }
    let Some(State::Siblings(r)) = store.crdt_state(&ns("r"), "a").unwrap() else {
        panic!()
    };
    let delete = CrdtOp::Write {
        context: r.context().clone(),
        value: None,
    };
    store
        .write(ns("r"), vec![WriteOp::crdt(key("a"), delete)])
        .await
        .unwrap();
    for n in [5, -5] {
        store
            .write(ns("c"), vec![WriteOp::crdt(key("n"), CrdtOp::Incr(n))])
            .await
            .unwrap();
    }
    seal(&store).await;
    let report = compact(&store).await;
    assert_eq!(report.tombstones_collected, 1, "{report:?}");
    assert!(store.crdt_state(&ns("r"), "a").unwrap().is_none());
    assert!(store.crdt_state(&ns("r"), "b").unwrap().is_some());
    // A counter at zero keeps its totals: the next increment builds on them.
    assert!(matches!(
        store.crdt_state(&ns("c"), "n").unwrap(),
        Some(State::Counter(c)) if c.value() == 0
    ));
    store.shutdown().await;
}

/// The bytes of every entry's state in `namespace` (each node's entry of each key).
fn entry_bytes(store: &Store, namespace: &str) -> usize {
    store
        .state_events(&ns(namespace), None, usize::MAX, usize::MAX)
        .unwrap()
        .0
        .iter()
        .map(|e| match &e.op {
            Op::Put { value, .. } => value.len(),
            Op::Delete => 0,
        })
        .sum()
}

/// The document a read of map key `k` shows, as `(field, JSON text)`.
fn fields(store: &Store, k: &str) -> Vec<(String, Bytes)> {
    match store.crdt_state(&ns("m"), k).unwrap() {
        Some(State::JsonMap(m)) => m
            .fields()
            .map(|(name, shown)| match shown {
                asp_core::crdt::Shown::Value(text) => (name.to_owned(), text.clone()),
                asp_core::crdt::Shown::Object => (name.to_owned(), Bytes::from_static(b"{}")),
            })
            .collect(),
        None => Vec::new(),
        other => panic!("{other:?}"),
    }
}

/// A map key that still holds a field: its removed fields cost nothing once every
/// node holds their removals. `n` fields are set and removed over keys of ten, and
/// each key keeps one field; after compaction every key's entry is as small as one
/// that only ever held that field but for the pruning's floor and pin (32 bytes a
/// key with one writing node), and the store's disk use is within 10% of such a
/// store's.
#[tokio::test]
async fn removed_fields_of_live_map_keys_stop_costing_space() {
    let n: usize = std::env::var("ASP_CRDT_GC_MEMBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let keep = |store: Store| async move {
        for chunk in (0..n / 10).collect::<Vec<_>>().chunks(1000) {
            let ops = chunk
                .iter()
                .map(|k| {
                    let key = Key::new(&format!("k{k}")).unwrap();
                    let set = Change::Set(Bytes::from_static(b"true"));
                    WriteOp::crdt(key, CrdtOp::Patch(vec![(vec!["keep".into()], set)]))
                })
                .collect();
            store.write(ns("m"), ops).await.unwrap();
        }
    };
    let compacted = |store: Store| async move {
        seal(&store).await;
        let first = compact(&store).await;
        seal(&store).await;
        compact(&store).await;
        first
    };
    let only_dir = tempfile::tempdir().unwrap();
    let only = Store::open(config(only_dir.path())).unwrap();
    keep(only.clone()).await;
    compacted(only.clone()).await;
    let only_entries = entry_bytes(&only, "m");
    only.shutdown().await;
    drop(only);
    let only_bytes = dir_bytes(only_dir.path());

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    add_then_remove_in(&store, "m", n).await;
    keep(store.clone()).await;
    let before = entry_bytes(&store, "m");
    let report = compacted(store.clone()).await;
    assert_eq!(report.crdt_keys_pruned as usize, n / 10, "{report:?}");
    assert_eq!(report.tombstones_collected, 0, "{report:?}");
    let after = entry_bytes(&store, "m");
    eprintln!(
        "entries of the map: {before} bytes before, {after} after; {only_entries} for keys that held only the kept field"
    );
    assert_eq!(after, only_entries + n / 10 * PRUNED_MAP_EXTRA);
    assert_eq!(keys(&store, "m"), n / 10);
    assert_eq!(
        fields(&store, "k7"),
        vec![("keep".to_owned(), Bytes::from_static(b"true"))]
    );
    // Nothing more to prune, and reopened it reads the same.
    assert_eq!(compact(&store).await.crdt_keys_pruned, 0);
    store.shutdown().await;
    drop(store);
    let disk = dir_bytes(dir.path());
    eprintln!(
        "map: {n} fields removed from live keys: {disk} bytes on disk after compaction; a store with only the kept fields: {only_bytes}"
    );
    assert!(
        (disk as f64) <= only_bytes as f64 * 1.10,
        "{disk} bytes on disk, {only_bytes} for a store with only the kept fields"
    );
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(
        fields(&store, "k7"),
        vec![("keep".to_owned(), Bytes::from_static(b"true"))]
    );
    assert_eq!(entry_bytes(&store, "m"), after);
    store.shutdown().await;
}

/// What a pruned map entry with one writing node holds beyond the same document
/// written once (state tag 5): the tag-7 layout's empty seen list and pin for its
/// one path (4 + 8), and a floor of one origin (4 + 16).
const PRUNED_MAP_EXTRA: usize = 4 + 8 + 4 + 16;

/// A set key written by two nodes: the peer's entry holds the 1,000 members it
/// added, all but one of which this node removed since. Until the peer holds the
/// removals, its entry stays as it is; then both entries become the key's join, one
/// member, and read as before.
#[tokio::test]
async fn an_entry_holding_members_removed_since_shrinks_once_every_node_holds_the_removals() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    // The peer's state after its 1,000 adds, each with its own dot; the event is
    // the last add's.
    let State::Set(mut set) = State::empty(Policy::Set).unwrap() else {
        unreachable!()
    };
    for i in 0..1000 {
        let dot = Dot {
            origin: id(PEER),
            counter: i as u64 + 1,
        };
        set.join(&set.add(member(i), dot));
    }
    let added = Event {
        op: Op::Put {
            content_type: ContentType::OctetStream,
            value: Bytes::from(State::Set(set).encode()),
        },
        ..peer_add("k", member(0), 1000)
    };
    assert_eq!(
        store
            .apply_remote(vec![added.clone()])
            .await
            .unwrap()
            .applied,
        1
    );
    let removes = (1..1000)
        .map(|i| WriteOp::crdt(Key::new("k").unwrap(), CrdtOp::Remove(member(i))))
        .collect();
    store.write(ns("s"), removes).await.unwrap();
    assert_eq!(members(&store, "k"), vec![member(0)]);
    let before = entry_bytes(&store, "s");
    // The peer has reported only its own add: nothing changes.
    let mut peer_vector = VersionVector::default();
    peer_vector.insert(added.dot);
    store.note_reports(&peer_report("s", peer_vector));
    seal(&store).await;
    let report = compact(&store).await;
    assert_eq!(report.crdt_keys_pruned, 0, "{report:?}");
    assert_eq!(entry_bytes(&store, "s"), before);
    // It holds the removals: both entries are written again as the one member.
    store.note_reports(&peer_report("s", vector(&store, "s")));
    seal(&store).await;
    let report = compact(&store).await;
    assert_eq!(report.crdt_keys_pruned, 1, "{report:?}");
    let after = entry_bytes(&store, "s");
    eprintln!("set entries: {before} bytes before, {after} after");
    assert!(after * 20 < before, "{after} bytes after, {before} before");
    assert_eq!(keys(&store, "s"), 2, "both nodes' entries stay, smaller");
    assert_eq!(members(&store, "k"), vec![member(0)]);
    // A copy of the peer's old add is a duplicate, and takes nothing back.
    assert_eq!(store.apply_remote(vec![added]).await.unwrap().duplicates, 1);
    assert_eq!(members(&store, "k"), vec![member(0)]);
    assert_eq!(compact(&store).await.crdt_keys_pruned, 0);
    store.shutdown().await;
    drop(store);
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(members(&store, "k"), vec![member(0)]);
    assert_eq!(entry_bytes(&store, "s"), after);
    store.shutdown().await;
}

/// Under fsync = never (or interval) a node can lose, in a machine crash, what it had
/// reported holding, and the stability rule no longer holds: CRDT keys are neither
/// collected nor pruned there (a long simulator sweep under never diverged when they
/// were).
#[tokio::test]
async fn crdt_keys_are_left_alone_unless_fsync_is_always() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.fsync = asp_store::FsyncMode::Never;
    let store = Store::open(c).unwrap();
    add_then_remove(&store, 100).await;
    seal(&store).await;
    let before = keys(&store, "s");
    assert!(before > 0);
    let report = compact(&store).await;
    assert_eq!(report.tombstones_collected, 0, "{report:?}");
    assert_eq!(report.crdt_keys_pruned, 0, "{report:?}");
    assert_eq!(keys(&store, "s"), before, "the emptied keys' entries stay");
    store.shutdown().await;
}
