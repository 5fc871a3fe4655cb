//! The key-hash index (issue 20, part 5): an anti-entropy run's first pass over a large
//! namespace builds it, the window keeper keeps it, and later runs find the keys behind
//! their decoded items in it, with the same answers a pass over the namespace gives.

use std::path::Path;

use asp_core::{ContentType, Event, Key, Namespace, NodeId};
use asp_store::{Store, StoreConfig, WriteOp};
use bytes::Bytes;

fn ns() -> Namespace {
    Namespace::new("big").unwrap()
}

fn open(dir: &Path, index_bytes: usize) -> Store {
    let mut c = StoreConfig::new(dir);
    c.node_id = NodeId::new(1);
    c.reconcile_key_index_bytes = index_bytes;
    Store::open(c).unwrap()
}

fn key(i: u32) -> String {
    format!("key-{i:06}")
}

async fn write(stores: &[&Store], ops: impl Fn() -> Vec<WriteOp>) {
    for s in stores {
        s.write(ns(), ops()).await.unwrap();
    }
}

fn puts(range: std::ops::Range<u32>, value: &str) -> Vec<WriteOp> {
    range
        .map(|i| {
            WriteOp::put(
                Key::new(&key(i)).unwrap(),
                ContentType::Text,
                Bytes::from(format!("{value}{i}")),
            )
        })
        .collect()
}

/// The 8-byte heads (what the protocol names items by) of `keys`.
fn heads(store: &Store, keys: impl IntoIterator<Item = String>) -> Vec<Vec<u8>> {
    keys.into_iter()
        .map(|k| store.item_key().key_hash(k.as_bytes())[..8].to_vec())
        .collect()
}

/// The keys and dots found (the two stores take the same dots, not the same clocks).
fn found(store: &Store, heads: &[Vec<u8>], limit: usize) -> Vec<(String, String)> {
    store
        .events_for_items(&ns(), heads.iter().map(|h| &h[..]), limit)
        .unwrap()
        .into_iter()
        .map(|e: Event| (e.key.as_str().to_string(), format!("{:?}", e.version().dot)))
        .collect()
}

#[tokio::test]
async fn later_runs_find_through_the_index_what_a_pass_over_the_namespace_finds() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let indexed = open(d1.path(), StoreConfig::DEFAULT_RECONCILE_KEY_INDEX_BYTES);
    let scanned = open(d2.path(), 0);
    let both = [&indexed, &scanned];
    for chunk in 0..6 {
        write(&both, || puts(chunk * 1000..(chunk + 1) * 1000, "v")).await;
    }
    assert_eq!(
        indexed.key_index_len(&ns()),
        None,
        "built by a run, not by writes"
    );
    // The first run passes over the namespace and builds the index on the way.
    let first = heads(&indexed, [key(5), key(4321)]);
    assert_eq!(found(&indexed, &first, 100), found(&scanned, &first, 100));
    assert_eq!(indexed.key_index_len(&ns()), Some(6000));
    // Writes after the build: new keys, overwrites, deletes.
    write(&both, || puts(6000..6500, "new")).await;
    write(&both, || puts(100..400, "again")).await;
    write(&both, || {
        (1000..1100)
            .map(|i| WriteOp::delete(Key::new(&key(i)).unwrap()))
            .collect()
    })
    .await;
    assert_eq!(indexed.key_index_len(&ns()), Some(6500));
    let asked: Vec<String> = (6000..6500)
        .step_by(7)
        .chain((100..400).step_by(11))
        .chain((1000..1100).step_by(3))
        .chain((2000..6000).step_by(97))
        .chain((7000..7050).step_by(5)) // never written
        .map(key)
        .collect();
    let asked = heads(&indexed, asked);
    let answer = found(&scanned, &asked, 100_000);
    assert_eq!(answer.len(), 72 + 28 + 34 + 42);
    assert_eq!(found(&indexed, &asked, 100_000), answer);
    // A page cut short holds the same keys either way (key order).
    assert_eq!(found(&indexed, &asked, 10), found(&scanned, &asked, 10));
    assert_eq!(scanned.key_index_len(&ns()), None);
}

#[tokio::test]
async fn an_index_past_its_budget_is_dropped_and_runs_scan_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 64 << 10);
    for chunk in 0..5 {
        store
            .write(ns(), puts(chunk * 1000..(chunk + 1) * 1000, "v"))
            .await
            .unwrap();
    }
    let asked = heads(&store, (0..5000).step_by(50).map(key));
    assert_eq!(found(&store, &asked, 1000).len(), 100);
    assert_eq!(
        store.key_index_len(&ns()),
        None,
        "5,000 keys need more than 64 KiB"
    );
    assert_eq!(found(&store, &asked, 1000).len(), 100);
}

#[tokio::test]
async fn small_namespaces_keep_no_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), StoreConfig::DEFAULT_RECONCILE_KEY_INDEX_BYTES);
    store.write(ns(), puts(0..1000, "v")).await.unwrap();
    let asked = heads(&store, (0..1000).step_by(10).map(key));
    assert_eq!(found(&store, &asked, 1000).len(), 100);
    assert_eq!(store.key_index_len(&ns()), None);
}

#[tokio::test]
async fn a_differing_digest_builds_the_index_before_the_run_comes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), StoreConfig::DEFAULT_RECONCILE_KEY_INDEX_BYTES);
    for chunk in 0..5 {
        store
            .write(ns(), puts(chunk * 1000..(chunk + 1) * 1000, "v"))
            .await
            .unwrap();
    }
    // As an anti-entropy check does: the summary first (it waits for the window keeper,
    // which counts the keys), then the word that the digests differ.
    store.summary();
    store.prepare_key_index(&ns());
    // Built on a thread of its own: wait for it (bounded), then a write after it.
    for _ in 0..1000 {
        if store.key_index_len(&ns()).is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(store.key_index_len(&ns()), Some(5000));
    store.write(ns(), puts(5000..5001, "v")).await.unwrap();
    let asked = heads(&store, [key(5000), key(42)]);
    assert_eq!(found(&store, &asked, 10).len(), 2);
    assert_eq!(store.key_index_len(&ns()), Some(5001));
}
