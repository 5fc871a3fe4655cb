//! Keys with a time to live: reads hide them once expired, on every replica; the
//! sweeper's delete removes the expired put and nothing written after it; the expiry
//! list survives a restart (docs/MODES.md, *TTL keys*).

use std::path::Path;
use std::time::Duration;

use asp_core::{Condition, ContentType, Dot, Event, Hlc, Key, Namespace, NodeId, Op, Version};
use asp_store::{Store, StoreConfig, WriteError, WriteKind, WriteOp};
use bytes::Bytes;

fn ns() -> Namespace {
    Namespace::new("t").unwrap()
}

fn key(k: &str) -> Key {
    Key::new(k).unwrap()
}

fn open(dir: &Path, id: u64) -> Store {
    let mut c = StoreConfig::new(dir);
    c.node_id = NodeId::new(id);
    Store::open(c).unwrap()
}

fn put(k: &str, v: &str) -> WriteOp {
    WriteOp::put(
        key(k),
        ContentType::Text,
        Bytes::copy_from_slice(v.as_bytes()),
    )
}

fn text(store: &Store, k: &str) -> Option<String> {
    store
        .get(&ns(), k)
        .unwrap()
        .and_then(|s| s.value)
        .map(|v| String::from_utf8(v.bytes.to_vec()).unwrap())
}

fn listed(store: &Store) -> Vec<String> {
    let page = store.scan(&ns(), "", None, 100, false).unwrap();
    page.items.iter().map(|i| i.key.to_string()).collect()
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

fn expire(version: Version, k: &str) -> WriteOp {
    WriteOp {
        key: key(k),
        kind: WriteKind::Expire { version },
        condition: Condition::None,
    }
}

/// Waits (at most 10 s) until `k` reads as absent on `store`.
async fn until_hidden(store: &Store, k: &str) {
    for _ in 0..1000 {
        if text(store, k).is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("key {k} never expired");
}

#[tokio::test]
async fn an_expired_key_is_hidden_everywhere_and_deleted_once() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open(da.path(), 1), open(db.path(), 2));
    let applied = a
        .write(
            ns(),
            vec![put("x", "soon gone").with_ttl_ms(30), put("y", "stays")],
        )
        .await
        .unwrap();
    let version = Version {
        hlc: applied[0].hlc,
        dot: applied[0].dot,
    };
    assert_eq!(feed(&a)[0].expires_ms, applied[0].hlc.physical_ms() + 30);
    until_hidden(&a, "x").await;
    assert_eq!(text(&a, "y").as_deref(), Some("stays"));
    assert_eq!(listed(&a), ["y"]);
    // The key's version is still the put: a GET sees no value, the sweeper finds it.
    let page = a.expired(None, 100).unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].version, version);
    assert_eq!(page.items[0].key.as_str(), "x");

    // A replica that receives the put after its expiry never shows it.
    b.apply_remote(feed(&a)).await.unwrap();
    assert_eq!(text(&b, "x"), None);
    assert_eq!(listed(&b), ["y"]);
    assert_eq!(b.expired(None, 100).unwrap().items.len(), 1);

    // The sweeper's delete: one event, ordered just after the put.
    let deleted = a.write(ns(), vec![expire(version, "x")]).await.unwrap();
    assert_eq!(deleted[0].hlc, Hlc::from_raw(version.hlc.as_raw() + 1));
    // Twice is refused: the put is no longer the key's version.
    let again = a.write(ns(), vec![expire(version, "x")]).await;
    assert!(
        matches!(again, Err(WriteError::ConditionFailed { .. })),
        "{again:?}"
    );
    assert!(a.expired(None, 100).unwrap().items.is_empty());
    b.apply_remote(feed(&a)).await.unwrap();
    assert!(b.expired(None, 100).unwrap().items.is_empty());
    for store in [&a, &b] {
        let deletes: Vec<_> = feed(store)
            .into_iter()
            .filter(|e| e.key.as_str() == "x" && e.op == Op::Delete)
            .collect();
        assert_eq!(deletes.len(), 1, "the expiry shows once in the feed");
        let state = store.get(&ns(), "x").unwrap().unwrap();
        assert!(state.value.is_none());
        assert_eq!(state.version.dot, deleted[0].dot);
    }
}

#[tokio::test]
async fn the_expiry_delete_removes_the_put_and_nothing_written_after_it() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open(da.path(), 1), open(db.path(), 2));
    let applied = a
        .write(ns(), vec![put("x", "expiring").with_ttl_ms(1)])
        .await
        .unwrap();
    let version = Version {
        hlc: applied[0].hlc,
        dot: applied[0].dot,
    };
    until_hidden(&a, "x").await;
    let delete = a.write(ns(), vec![expire(version, "x")]).await.unwrap();
    let from_a = feed(&a);
    assert_eq!(from_a.len(), 2);

    // Another node wrote the key after the put (a later clock reading), and B got that
    // write before A's put and delete: the write stays.
    let later = Event {
        namespace: ns(),
        key: key("x"),
        op: Op::Put {
            content_type: ContentType::Text,
            value: Bytes::from_static(b"written after"),
        },
        dot: Dot {
            origin: NodeId::new(3).unwrap(),
            counter: 1,
        },
        // Later than the put, earlier than any reading taken once the put expired.
        hlc: Hlc::from_raw(version.hlc.as_raw() + 2),
        context: Bytes::new(),
        epoch: 0,
        expires_ms: 0,
    };
    b.apply_remote(vec![later.clone()]).await.unwrap();
    b.apply_remote(from_a.clone()).await.unwrap();
    assert_eq!(text(&b, "x").as_deref(), Some("written after"));
    // And in the other order too.
    a.apply_remote(vec![later]).await.unwrap();
    assert_eq!(text(&a, "x").as_deref(), Some("written after"));
    assert_eq!(
        a.get(&ns(), "x").unwrap().unwrap().version.dot,
        b.get(&ns(), "x").unwrap().unwrap().version.dot
    );
    // Nothing is left to sweep: the key's version is no longer an expiring put.
    assert!(a.expired(None, 100).unwrap().items.is_empty());
    assert!(b.expired(None, 100).unwrap().items.is_empty());
    let _ = delete;
}

#[tokio::test]
async fn an_expired_key_is_absent_to_conditions() {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), 1);
    a.write(ns(), vec![put("x", "v").with_ttl_ms(1)])
        .await
        .unwrap();
    until_hidden(&a, "x").await;
    let exists = a
        .write(
            ns(),
            vec![put("x", "w").with_condition(Condition::IfExists)],
        )
        .await;
    assert!(
        matches!(exists, Err(WriteError::ConditionFailed { .. })),
        "{exists:?}"
    );
    a.write(
        ns(),
        vec![put("x", "again").with_condition(Condition::IfAbsent)],
    )
    .await
    .unwrap();
    assert_eq!(text(&a, "x").as_deref(), Some("again"));
    // A put without a time to live replaced it: nothing expires.
    assert!(a.expired(None, 100).unwrap().items.is_empty());
}

#[tokio::test]
async fn the_expiry_list_survives_a_restart_and_bad_ttls_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), 1);
    a.write(ns(), vec![put("x", "v").with_ttl_ms(1)])
        .await
        .unwrap();
    let too_long = a
        .write(
            ns(),
            vec![put("y", "v").with_ttl_ms(asp_store::TTL_MS_MAX + 1)],
        )
        .await;
    assert!(
        matches!(too_long, Err(WriteError::Invalid(_))),
        "{too_long:?}"
    );
    a.shutdown().await;
    drop(a);
    let a = open(d.path(), 1);
    until_hidden(&a, "x").await;
    let page = a.expired(None, 100).unwrap();
    assert_eq!(page.items.len(), 1);
    assert!(page.next.is_none());
}
