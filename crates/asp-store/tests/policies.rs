//! Conflict policies in the store: the policy registry, CRDT writes and reads, their
//! replication between stores, and what survives reopening, index rebuilds and
//! compaction.

use std::collections::BTreeSet;
use std::path::Path;

use asp_core::crdt::{Change, Context, Policy, Shown, State};
use asp_core::{ContentType, Key, Namespace, NodeId};
use asp_store::{CrdtOp, OpenError, Store, StoreConfig, WriteError, WriteOp};
use bytes::Bytes;

fn ns(name: &str) -> Namespace {
    Namespace::new(name).unwrap()
}

fn key(k: &str) -> Key {
    Key::new(k).unwrap()
}

fn config(dir: &Path, id: u64) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.node_id = NodeId::new(id);
    c
}

async fn op(store: &Store, namespace: &str, k: &str, op: CrdtOp) -> Result<(), WriteError> {
    store
        .write(ns(namespace), vec![WriteOp::crdt(key(k), op)])
        .await
        .map(|_| ())
}

fn counter(store: &Store, namespace: &str, k: &str) -> i128 {
    match store.crdt_state(&ns(namespace), k).unwrap() {
        Some(State::Counter(c)) => c.value(),
        other => panic!("not a counter: {other:?}"),
    }
}

fn members(store: &Store, namespace: &str, k: &str) -> Vec<String> {
    match store.crdt_state(&ns(namespace), k).unwrap() {
        Some(State::Set(s)) => s
            .members()
            .map(|m| String::from_utf8(m.to_vec()).unwrap())
            .collect(),
        None => Vec::new(),
        other => panic!("not a set: {other:?}"),
    }
}

/// Sends every event of `from`'s feed to `to`, as replication would.
async fn sync(from: &Store, to: &Store) {
    let mut reader = from.feed_reader(None, 0);
    loop {
        let events = reader.read(1000).unwrap();
        if events.is_empty() {
            return;
        }
        to.apply_remote(events.into_iter().map(|e| e.event).collect())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_policy_is_set_once_and_refuses_the_wrong_operations() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(config(dir.path(), 1)).unwrap();
    assert_eq!(s.policy(&ns("hits")), Policy::Lww);
    // Increments need a counter namespace.
    let e = op(&s, "hits", "k", CrdtOp::Incr(1)).await.unwrap_err();
    assert!(e.to_string().contains("lww policy"), "{e}");
    s.set_policy(ns("hits"), Policy::Counter).await.unwrap();
    s.set_policy(ns("hits"), Policy::Counter).await.unwrap();
    op(&s, "hits", "k", CrdtOp::Incr(5)).await.unwrap();
    // A plain put, or a set operation, is refused by name; nothing is written.
    let head = s.head().seq;
    let put = WriteOp::put(key("k"), ContentType::Text, Bytes::from_static(b"x"));
    let e = s.write(ns("hits"), vec![put]).await.unwrap_err();
    assert!(e.to_string().contains("plain put"), "{e}");
    let e = op(&s, "hits", "k", CrdtOp::Add(Bytes::from_static(b"m")))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("a set operation"), "{e}");
    assert_eq!(s.head().seq, head);
    // The policy is fixed now that the namespace holds data.
    let e = s.set_policy(ns("hits"), Policy::Set).await.unwrap_err();
    assert!(matches!(e, WriteError::PolicyFixed(_)), "{e}");
    // And so is lww's, for a namespace written under it.
    s.write(
        ns("plain"),
        vec![WriteOp::put(
            key("a"),
            ContentType::Text,
            Bytes::from_static(b"1"),
        )],
    )
    .await
    .unwrap();
    assert!(s.set_policy(ns("plain"), Policy::Counter).await.is_err());
    assert_eq!(s.policies(), vec![(ns("hits"), Policy::Counter)]);
    s.shutdown().await;
    drop(s);
    // Reopened: the policy and the value are kept; a config that disagrees with data
    // refuses to open, one that agrees (or names an empty namespace) is applied.
    let s = Store::open(config(dir.path(), 1)).unwrap();
    assert_eq!(s.policy(&ns("hits")), Policy::Counter);
    assert_eq!(counter(&s, "hits", "k"), 5);
    s.shutdown().await;
    drop(s);
    let mut c = config(dir.path(), 1);
    c.namespace_policies.insert("hits".into(), Policy::Set);
    match Store::open(c) {
        Err(OpenError::Config(m)) => assert!(m.contains("cannot change"), "{m}"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let mut c = config(dir.path(), 1);
    c.namespace_policies.insert("tags".into(), Policy::Set);
    let s = Store::open(c).unwrap();
    assert_eq!(s.policy(&ns("tags")), Policy::Set);
}

#[tokio::test]
async fn counters_replicate_and_sum_exactly_in_any_order() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(config(da.path(), 1)).unwrap();
    let b = Store::open(config(db.path(), 2)).unwrap();
    a.set_policy(ns("c"), Policy::Counter).await.unwrap();
    for i in 0..300 {
        op(&a, "c", "k", CrdtOp::Incr(if i % 3 == 0 { -1 } else { 2 }))
            .await
            .unwrap();
    }
    // B learns the policy from A's events (its namespace is empty), then writes too.
    sync(&a, &b).await;
    assert_eq!(b.policy(&ns("c")), Policy::Counter);
    for _ in 0..200 {
        op(&b, "c", "k", CrdtOp::Incr(3)).await.unwrap();
    }
    // A batch with several increments of one key.
    let batch: Vec<WriteOp> = (0..10)
        .map(|_| WriteOp::crdt(key("k"), CrdtOp::Incr(1)))
        .collect();
    a.write(ns("c"), batch).await.unwrap();
    sync(&b, &a).await;
    sync(&a, &b).await;
    let expected = -100 + 200 * 2 + 200 * 3 + 10;
    assert_eq!(counter(&a, "c", "k"), expected);
    assert_eq!(counter(&b, "c", "k"), expected);
    // Duplicates change nothing.
    sync(&a, &b).await;
    assert_eq!(counter(&b, "c", "k"), expected);
}

#[tokio::test]
async fn a_concurrent_add_wins_over_a_remove_between_stores() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(config(da.path(), 1)).unwrap();
    let b = Store::open(config(db.path(), 2)).unwrap();
    for s in [&a, &b] {
        s.set_policy(ns("s"), Policy::Set).await.unwrap();
    }
    let m = |x: &'static str| Bytes::from_static(x.as_bytes());
    op(&a, "s", "k", CrdtOp::Add(m("x"))).await.unwrap();
    op(&a, "s", "k", CrdtOp::Add(m("y"))).await.unwrap();
    sync(&a, &b).await;
    // A removes x and y; B concurrently adds x again.
    op(&a, "s", "k", CrdtOp::Remove(m("x"))).await.unwrap();
    op(&a, "s", "k", CrdtOp::Remove(m("y"))).await.unwrap();
    op(&b, "s", "k", CrdtOp::Add(m("x"))).await.unwrap();
    sync(&a, &b).await;
    sync(&b, &a).await;
    assert_eq!(members(&a, "s", "k"), vec!["x"]);
    assert_eq!(members(&b, "s", "k"), vec!["x"]);
}

#[tokio::test]
async fn siblings_are_kept_until_a_write_names_them() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(config(da.path(), 1)).unwrap();
    let b = Store::open(config(db.path(), 2)).unwrap();
    for s in [&a, &b] {
        s.set_policy(ns("docs"), Policy::Siblings).await.unwrap();
    }
    let write = |context: Context, v: &'static str| CrdtOp::Write {
        context,
        value: Some((ContentType::Text, Bytes::from_static(v.as_bytes()))),
    };
    op(&a, "docs", "d", write(Context::default(), "from a"))
        .await
        .unwrap();
    op(&b, "docs", "d", write(Context::default(), "from b"))
        .await
        .unwrap();
    sync(&a, &b).await;
    sync(&b, &a).await;
    let values = |s: &Store| -> BTreeSet<String> {
        match s.crdt_state(&ns("docs"), "d").unwrap() {
            Some(State::Siblings(r)) => r
                .siblings()
                .iter()
                .map(|(_, s)| String::from_utf8(s.value.to_vec()).unwrap())
                .collect(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        values(&a),
        BTreeSet::from(["from a".into(), "from b".into()])
    );
    // A write that read both replaces both.
    let Some(State::Siblings(r)) = a.crdt_state(&ns("docs"), "d").unwrap() else {
        unreachable!()
    };
    op(&a, "docs", "d", write(r.context().clone(), "merged"))
        .await
        .unwrap();
    sync(&a, &b).await;
    assert_eq!(values(&b), BTreeSet::from(["merged".into()]));
}

#[tokio::test]
async fn crdt_state_survives_reopen_index_rebuild_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), 1);
    c.segment_bytes_max = 1 << 20;
    c.compaction_retention_ms = 0;
    c.namespace_policies.insert("c".into(), Policy::Counter);
    c.namespace_policies.insert("m".into(), Policy::JsonMap);
    let s = Store::open(c.clone()).unwrap();
    let pad = "p".repeat(200);
    for i in 0..12000 {
        op(&s, "c", &format!("k{}", i % 50), CrdtOp::Incr(1))
            .await
            .unwrap();
        if i % 10 == 0 {
            let fields = vec![
                (
                    vec![format!("f{}", i % 7)],
                    Change::Set(Bytes::from(format!("\"{pad}{i}\""))),
                ),
                (vec!["gone".to_owned()], Change::Remove),
            ];
            op(&s, "m", "doc", CrdtOp::Patch(fields)).await.unwrap();
        }
    }
    let before: Vec<i128> = (0..50)
        .map(|i| counter(&s, "c", &format!("k{i}")))
        .collect();
    assert!(before.iter().all(|&v| v == 240));
    let map = s.crdt_state(&ns("m"), "doc").unwrap();
    let report = s.compact().unwrap();
    assert!(report.segments_removed > 0, "{report:?}");
    let after: Vec<i128> = (0..50)
        .map(|i| counter(&s, "c", &format!("k{i}")))
        .collect();
    assert_eq!(after, before);
    assert_eq!(s.crdt_state(&ns("m"), "doc").unwrap(), map);
    s.shutdown().await;
    drop(s);
    let s = Store::open(c.clone()).unwrap();
    assert_eq!(counter(&s, "c", "k7"), 240);
    s.shutdown().await;
    drop(s);
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let s = Store::open(c).unwrap();
    assert_eq!(counter(&s, "c", "k7"), 240);
    assert_eq!(s.crdt_state(&ns("m"), "doc").unwrap(), map);
    let Some(State::JsonMap(m)) = map else {
        unreachable!()
    };
    assert_eq!(m.fields().count(), 7);
    assert_eq!(m.shown_at(&["gone".to_owned()]), None);
}

/// A patch's changes from `("a.b", Some("1"))` (set), `("a", None)` (remove).
fn patch(changes: &[(&str, Option<&str>)]) -> CrdtOp {
    CrdtOp::Patch(
        changes
            .iter()
            .map(|(path, value)| {
                let change =
                    value.map_or(Change::Remove, |v| Change::Set(Bytes::from(v.to_owned())));
                (path.split('.').map(str::to_owned).collect(), change)
            })
            .collect(),
    )
}

/// A json-map key's shown paths, each as `a.b=text` (`a.b={}` for an object).
fn shown_paths(store: &Store, namespace: &str, k: &str) -> Vec<String> {
    match store.crdt_state(&ns(namespace), k).unwrap() {
        Some(State::JsonMap(m)) => m
            .shown()
            .map(|(path, shown)| match shown {
                Shown::Value(text) => {
                    format!("{}={}", path.join("."), String::from_utf8_lossy(text))
                }
                Shown::Object => format!("{}={{}}", path.join(".")),
            })
            .collect(),
        other => panic!("not a json-map: {other:?}"),
    }
}

/// Guards against issue 18 (a nested object's fields written on two stores apart
/// kept only one side's) at the store: patches of paths replicate and merge per path.
#[tokio::test]
async fn json_map_patches_merge_per_path_between_stores() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(config(da.path(), 1)).unwrap();
    let b = Store::open(config(db.path(), 2)).unwrap();
    for s in [&a, &b] {
        s.set_policy(ns("m"), Policy::JsonMap).await.unwrap();
    }
    op(
        &a,
        "m",
        "doc",
        patch(&[("name", Some("\"Ada\"")), ("langs.en", Some("true"))]),
    )
    .await
    .unwrap();
    op(
        &b,
        "m",
        "doc",
        patch(&[("born", Some("1815")), ("langs.fr", Some("true"))]),
    )
    .await
    .unwrap();
    sync(&a, &b).await;
    sync(&b, &a).await;
    let expected = vec![
        "born=1815",
        "langs={}",
        "langs.en=true",
        "langs.fr=true",
        "name=\"Ada\"",
    ];
    assert_eq!(shown_paths(&a, "m", "doc"), expected);
    assert_eq!(shown_paths(&b, "m", "doc"), expected);
    // A path deeper than the limit, or empty, is refused by name; nothing is written.
    let head = a.head().seq;
    let deep = vec!["x"; asp_core::crdt::PATH_DEPTH_MAX + 1].join(".");
    let e = op(&a, "m", "doc", patch(&[(deep.as_str(), Some("1"))]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("json-map path has 33 fields"), "{e}");
    let e = op(
        &a,
        "m",
        "doc",
        CrdtOp::Patch(vec![(Vec::new(), Change::Remove)]),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("json-map path has 0 fields"), "{e}");
    assert_eq!(a.head().seq, head);
}

#[tokio::test]
async fn events_of_another_policy_are_quarantined() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(config(da.path(), 1)).unwrap();
    let b = Store::open(config(db.path(), 2)).unwrap();
    a.set_policy(ns("n"), Policy::Counter).await.unwrap();
    op(&a, "n", "k", CrdtOp::Incr(1)).await.unwrap();
    b.set_policy(ns("n"), Policy::Set).await.unwrap();
    op(&b, "n", "k", CrdtOp::Add(Bytes::from_static(b"m")))
        .await
        .unwrap();
    let events: Vec<_> = a
        .feed_reader(None, 0)
        .read(10)
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    // Held aside, not applied: the batch is taken and the namespace keeps its state.
    let out = b.apply_remote(events).await.unwrap();
    assert_eq!((out.applied, out.quarantined), (0, 1));
    assert_eq!(members(&b, "n", "k"), vec!["m"]);
    let held = b.held();
    assert_eq!(held.quarantine.len(), 1);
    assert_eq!(held.quarantine[0].policy_here, Policy::Set);
    assert_eq!(held.quarantine[0].policies_of_events, vec![Policy::Counter]);
}

#[tokio::test]
async fn a_crdt_namespace_lists_each_key_once() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(config(da.path(), 1)).unwrap();
    let b = Store::open(config(db.path(), 2)).unwrap();
    a.set_policy(ns("c"), Policy::Counter).await.unwrap();
    for k in ["a", "a b", "ab", "b"] {
        op(&a, "c", k, CrdtOp::Incr(1)).await.unwrap();
    }
    sync(&a, &b).await;
    for k in ["a", "b"] {
        op(&b, "c", k, CrdtOp::Incr(1)).await.unwrap();
    }
    sync(&b, &a).await;
    // Each key has two origins' entries now; a listing shows it once, with its
    // merged state, and pages continue past every entry of a key. (A key lists after
    // the keys it is a prefix of: its entries are `key ‖ 0xFF ‖ origin`.)
    let page = a.scan(&ns("c"), "", None, 2, false).unwrap();
    let keys: Vec<&str> = page.items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, vec!["a b", "ab"]);
    let next = page.next_after.unwrap();
    let page = a.scan(&ns("c"), "", Some(next.as_str()), 10, true).unwrap();
    let keys: Vec<&str> = page.items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, vec!["a", "b"]);
    let state = page.items[0].state.clone().unwrap();
    assert!(matches!(state, State::Counter(c) if c.value() == 2));
    assert!(page.next_after.is_none());
}

/// Guards against a damaged CRDT state reading as a value (HTTP used to decode the
/// listing's state bytes itself and show a failure as `null`): the store decodes its
/// own states, and one that does not decode fails the read with `Corrupt`.
#[tokio::test]
async fn a_damaged_crdt_state_reads_as_an_error() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(config(d.path(), 1)).unwrap();
    s.set_policy(ns("c"), Policy::Counter).await.unwrap();
    op(&s, "c", "hits", CrdtOp::Incr(3)).await.unwrap();
    op(&s, "c", "fine", CrdtOp::Incr(1)).await.unwrap();
    let page = s.scan(&ns("c"), "", None, 10, true).unwrap();
    assert!(
        page.items
            .iter()
            .all(|i| matches!(i.state, Some(State::Counter(_))) && i.value.is_none())
    );
    assert_eq!(
        asp_store::fault::damage_crdt_state(&s, &ns("c"), "hits").unwrap(),
        1
    );
    let corrupt = |e: asp_store::ReadError| {
        assert!(matches!(e, asp_store::ReadError::Corrupt(_)), "{e:?}");
        assert!(e.to_string().contains("\"hits\""), "{e}");
    };
    corrupt(s.crdt_state(&ns("c"), "hits").unwrap_err());
    corrupt(s.scan(&ns("c"), "", None, 10, true).unwrap_err());
    // Keys beside it still read, and a listing without values does not decode states.
    assert_eq!(counter(&s, "c", "fine"), 1);
    assert_eq!(
        s.scan(&ns("c"), "", None, 10, false).unwrap().items.len(),
        2
    );
}

/// A siblings write whose context names versions this node does not hold (read from
/// another node) is refused by the store when it writes, not by a read before it.
#[tokio::test]
async fn a_siblings_write_with_a_context_from_ahead_is_refused() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(config(da.path(), 1)).unwrap();
    let b = Store::open(config(db.path(), 2)).unwrap();
    for s in [&a, &b] {
        s.set_policy(ns("docs"), Policy::Siblings).await.unwrap();
    }
    let write = |context: Context| CrdtOp::Write {
        context,
        value: Some((ContentType::Text, Bytes::from_static(b"v"))),
    };
    op(&a, "docs", "d", write(Context::default()))
        .await
        .unwrap();
    let Some(State::Siblings(r)) = a.crdt_state(&ns("docs"), "d").unwrap() else {
        unreachable!()
    };
    let err = op(&b, "docs", "d", write(r.context().clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, WriteError::ContextAhead(_)), "{err:?}");
    sync(&a, &b).await;
    op(&b, "docs", "d", write(r.context().clone()))
        .await
        .unwrap();
}
