//! The store's side of reconciliation: windows kept per write match a rebuild from the
//! index, and two stores that diverged find their difference from the windows alone and
//! repair it with the events the other side lacks.

use std::path::Path;

use asp_core::reconcile::{Decoder, Extension, Side, Symbol, Window};
use asp_core::{ContentType, Key, Namespace, NodeId};
use asp_store::{Store, StoreConfig, WriteOp};
use bytes::Bytes;

fn ns() -> Namespace {
    Namespace::new("r").unwrap()
}

fn open(dir: &Path, id: u64) -> Store {
    let mut c = StoreConfig::new(dir);
    c.node_id = NodeId::new(id);
    c.reconcile_window = 1024;
    Store::open(c).unwrap()
}

fn put(k: &str, v: &str) -> WriteOp {
    WriteOp::put(
        Key::new(k).unwrap(),
        ContentType::Text,
        Bytes::copy_from_slice(v.as_bytes()),
    )
}

/// Every key of the namespace with its version and value (tombstones included).
fn state(store: &Store, keys: &[String]) -> Vec<(String, String)> {
    keys.iter()
        .filter_map(|k| {
            store.get(&ns(), k).unwrap().map(|s| {
                let value = s.value.map_or("<deleted>".to_string(), |v| {
                    String::from_utf8(v.bytes.to_vec()).unwrap()
                });
                (k.clone(), format!("{:?} {value}", s.version))
            })
        })
        .collect()
}

async fn copy_feed(from: &Store, to: &Store) {
    let mut since = 0;
    loop {
        let page = from.changes(None, since, 1000).unwrap();
        if page.events.is_empty() {
            return;
        }
        to.apply_remote(page.events.into_iter().map(|e| e.event).collect())
            .await
            .unwrap();
        since = page.next;
    }
}

/// Reconciles `initiator` against `responder` as the protocol does: the responder's
/// symbols are decoded against the initiator's, then each side is sent the events
/// of the keys it lacks. Returns (events to the initiator, events to the responder).
async fn reconcile(initiator: &Store, responder: &Store) -> (usize, usize) {
    let mine = initiator.reconcile_window(&ns()).unwrap();
    let theirs = responder.reconcile_window(&ns()).unwrap();
    let mut decoder = Decoder::new(initiator.item_key());
    for (i, (t, m)) in theirs.symbols().iter().zip(mine.symbols()).enumerate() {
        let mut wire = Vec::new();
        t.encode(&mut wire);
        decoder.push(&Symbol::decode(&wire).unwrap(), m).unwrap();
        if decoder.is_done() {
            break;
        }
        assert!(
            i + 1 < mine.symbols().len(),
            "difference larger than the window"
        );
    }
    assert!(decoder.is_done());
    let mut need = Vec::new();
    let mut have = Vec::new();
    for (item, side) in decoder.items() {
        match side {
            // The stop message names the responder's items by 4 bytes.
            Side::Remote => need.push(item[..4].to_vec()),
            Side::Local => have.push(item[..16].to_vec()),
        }
    }
    let to_initiator = responder
        .events_for_items(&ns(), need.iter().map(|p| &p[..]), 100_000)
        .unwrap();
    let to_responder = initiator
        .events_for_items(&ns(), have.iter().map(|p| &p[..]), 100_000)
        .unwrap();
    // As a sender does on a link: leave out what the receiver's vector says it holds
    // (a key changed on one side only is then shipped one way, not both).
    let held = |store: &Store| {
        store
            .summary()
            .into_iter()
            .find(|s| s.namespace == ns())
            .map(|s| s.vector)
            .unwrap_or_default()
    };
    let (to_initiator_vv, to_responder_vv) = (held(initiator), held(responder));
    let to_initiator: Vec<_> = to_initiator
        .into_iter()
        .filter(|e| !to_initiator_vv.contains(e.dot))
        .collect();
    let to_responder: Vec<_> = to_responder
        .into_iter()
        .filter(|e| !to_responder_vv.contains(e.dot))
        .collect();
    let (a, b) = (to_initiator.len(), to_responder.len());
    initiator.apply_remote(to_initiator).await.unwrap();
    responder.apply_remote(to_responder).await.unwrap();
    (a, b)
}

#[tokio::test]
async fn diverged_stores_repair_each_other_from_their_windows() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path(), 1);
    let b = open(db.path(), 2);
    let mut keys: Vec<String> = (0..2_000).map(|i| format!("k{i}")).collect();
    for chunk in keys.chunks(100) {
        a.write(ns(), chunk.iter().map(|k| put(k, "v0")).collect())
            .await
            .unwrap();
    }
    copy_feed(&a, &b).await;
    assert_eq!(
        a.reconcile_window(&ns()).unwrap().symbols(),
        b.reconcile_window(&ns()).unwrap().symbols(),
        "same state, same symbols"
    );

    // Behind the protocol's back: each side writes what the other never hears of.
    for i in 0..30 {
        keys.push(format!("a-only{i}"));
    }
    a.write(
        ns(),
        (0..30).map(|i| put(&format!("a-only{i}"), "a")).collect(),
    )
    .await
    .unwrap();
    a.write(
        ns(),
        (0..20)
            .map(|i| put(&format!("k{i}"), "a-updated"))
            .collect(),
    )
    .await
    .unwrap();
    for i in 0..25 {
        keys.push(format!("b-only{i}"));
    }
    b.write(
        ns(),
        (0..25).map(|i| put(&format!("b-only{i}"), "b")).collect(),
    )
    .await
    .unwrap();
    b.write(
        ns(),
        (100..110)
            .map(|i| WriteOp::delete(Key::new(&format!("k{i}")).unwrap()))
            .collect(),
    )
    .await
    .unwrap();
    // Both change one key: the later write must win on both sides.
    a.write(ns(), vec![put("k500", "a-late")]).await.unwrap();
    b.write(ns(), vec![put("k500", "b-later")]).await.unwrap();
    assert_ne!(state(&a, &keys), state(&b, &keys));

    let (to_b, to_a) = reconcile(&b, &a).await;
    assert_eq!(to_b, 30 + 20 + 1, "a's new keys, updates and k500");
    assert_eq!(to_a, 25 + 10 + 1, "b's new keys, deletes and k500");
    assert_eq!(state(&a, &keys), state(&b, &keys));
    let winner = a.get(&ns(), "k500").unwrap().unwrap().value.unwrap();
    assert_eq!(&winner.bytes[..], b"b-later");
    assert_eq!(
        a.reconcile_window(&ns()).unwrap().symbols(),
        b.reconcile_window(&ns()).unwrap().symbols()
    );
    // In sync now: the next reconciliation finds nothing.
    assert_eq!(reconcile(&b, &a).await, (0, 0));
}

#[tokio::test]
async fn the_window_kept_on_writes_equals_the_one_rebuilt_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let kept = {
        let s = open(dir.path(), 1);
        for round in 0..5 {
            s.write(
                ns(),
                (0..300)
                    .map(|i| put(&format!("k{}", (i * 7 + round) % 500), "v"))
                    .collect(),
            )
            .await
            .unwrap();
            s.write(
                ns(),
                vec![WriteOp::delete(Key::new(&format!("k{round}")).unwrap())],
            )
            .await
            .unwrap();
        }
        let w = s.reconcile_window(&ns()).unwrap();
        s.shutdown().await;
        w
    };
    let s = open(dir.path(), 1);
    let rebuilt = s.reconcile_window(&ns()).unwrap();
    assert_eq!(kept.symbols(), rebuilt.symbols());
    // The items read from a snapshot give the same symbols, and more past the window.
    let items = s.reconcile_items(&ns()).unwrap();
    assert_eq!(items.len(), 500);
    let from_items = Window::build(s.item_key(), kept.symbols().len(), &items, 2);
    assert_eq!(from_items.symbols(), kept.symbols());
    let mut more = Extension::new(s.item_key(), items.iter().copied(), 0);
    for symbol in kept.symbols() {
        assert_eq!(&more.next_symbol(), symbol);
    }
    assert_eq!(kept.items(), rebuilt.items());
    assert_eq!(kept.items(), 500, "one item per key, tombstones included");
    assert_eq!(
        kept.symbols().len(),
        128,
        "grew from 64 symbols to a quarter of the keys"
    );
}

#[tokio::test]
async fn item_prefixes_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1);
    let too_long = [0u8; 17];
    let err = s
        .events_for_items(&ns(), [&too_long[..]], 10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("4 to 16 bytes"), "{err}");
    assert!(s.events_for_items(&ns(), [&[1u8; 3][..]], 10).is_err());
    assert!(
        s.events_for_items(&ns(), [&[1u8; 4][..]], 10)
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn windows_are_on_by_default_and_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let on = Store::open(StoreConfig::new(dir.path())).unwrap();
    on.write(ns(), vec![put("k", "v")]).await.unwrap();
    assert_eq!(on.reconcile_window(&ns()).unwrap().items(), 1);
    let digest = on.summary()[0].digest.expect("a digest with windows on");
    assert_eq!(digest.count, 1);
    on.shutdown().await;
    drop(on);
    let mut config = StoreConfig::new(dir.path());
    config.reconcile_window = 0;
    let s = Store::open(config).unwrap();
    assert_eq!(s.summary()[0].digest, None);
    let err = s.reconcile_window(&ns()).unwrap_err().to_string();
    assert!(err.contains("reconcile_window = 0"), "{err}");
    // Repair still finds keys by their items.
    let hash = s.item_key().key_hash(b"k");
    assert_eq!(
        s.events_for_items(&ns(), [&hash[..4]], 10).unwrap().len(),
        1
    );
}
