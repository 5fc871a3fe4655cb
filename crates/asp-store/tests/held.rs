//! Events from peers that cannot be applied yet are held, not refused with their
//! batch: parked until this node's clock allows them, quarantined until an operator
//! resolves a policy conflict. Everything else of the batch is applied.

use std::path::Path;
use std::time::{Duration, Instant};

use asp_core::crdt::Policy;
use asp_core::{ContentType, Dot, Event, Hlc, Key, Namespace, NodeId, Op, VersionVector};
use asp_store::{CrdtOp, QuarantineAction, Store, StoreConfig, WriteError, WriteOp};
use bytes::Bytes;

fn ns(name: &str) -> Namespace {
    Namespace::new(name).unwrap()
}

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.node_id = NodeId::new(1);
    c
}

fn now_ms() -> u64 {
    asp_store::clock::wall_ms()
}

/// A plain (lww) put from node `origin`.
fn put(namespace: &str, origin: u64, counter: u64, hlc_ms: u64, key: &str) -> Event {
    Event {
        namespace: ns(namespace),
        key: Key::new(key).unwrap(),
        op: Op::Put {
            content_type: ContentType::Text,
            value: Bytes::copy_from_slice(key.as_bytes()),
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

fn value(store: &Store, namespace: &str, key: &str) -> Option<String> {
    store
        .get(&ns(namespace), key)
        .unwrap()
        .and_then(|s| s.value)
        .map(|v| String::from_utf8(v.bytes.to_vec()).unwrap())
}

fn holds(store: &Store, namespace: &str, dot: Dot) -> bool {
    store
        .summary()
        .iter()
        .any(|s| s.namespace == ns(namespace) && s.vector.contains(dot))
}

fn dot(origin: u64, counter: u64) -> Dot {
    Dot {
        origin: NodeId::new(origin).unwrap(),
        counter,
    }
}

/// A store whose namespace `hits` is a counter holding data.
async fn with_counter(dir: &Path, mut c: StoreConfig) -> Store {
    c.data_dir = dir.to_owned();
    let s = Store::open(c).unwrap();
    s.set_policy(ns("hits"), Policy::Counter).await.unwrap();
    s.write(
        ns("hits"),
        vec![WriteOp::crdt(Key::new("home").unwrap(), CrdtOp::Incr(1))],
    )
    .await
    .unwrap();
    s
}

async fn poll(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_batch_is_applied_past_the_events_it_must_hold() {
    // Guards against one event too far ahead, or of another policy, refusing its
    // whole batch: the link then looped on the same batch and nothing else replicated.
    let dir = tempfile::tempdir().unwrap();
    let t = now_ms();
    let batch = vec![
        put("a", 9, 1, t, "a1"),
        put("b", 9, 1, t + 3_600_000, "far"),
        put("hits", 9, 1, t, "home"),
        put("c", 9, 1, t, "c1"),
    ];
    {
        let s = with_counter(dir.path(), config(dir.path())).await;
        let head = s.head().seq;
        let out = s.apply_remote(batch.clone()).await.unwrap();
        assert_eq!(
            (out.applied, out.parked, out.quarantined, out.duplicates),
            (2, 1, 1, 0)
        );
        assert_eq!(
            s.head().seq,
            head + 2,
            "only the applied events are in the feed"
        );
        assert_eq!(value(&s, "a", "a1").as_deref(), Some("a1"));
        assert_eq!(value(&s, "c", "c1").as_deref(), Some("c1"));
        assert_eq!(value(&s, "b", "far"), None);
        assert!(
            !holds(&s, "b", dot(9, 1)),
            "a held dot is not in the vector"
        );
        // Held dots are duplicates, like applied ones.
        let again = s.apply_remote(batch.clone()).await.unwrap();
        assert_eq!((again.applied, again.duplicates), (0, 4));
        let held = s.held();
        assert_eq!((held.events, held.parked.events), (2, 1));
        assert_eq!(held.parked.origins, vec![(NodeId::new(9).unwrap(), 1)]);
        assert_eq!(
            held.parked.next_release_ms,
            Some(t + 3_600_000 - s.config().max_clock_skew_ms)
        );
        let q = &held.quarantine[0];
        assert_eq!(q.namespace, ns("hits"));
        assert_eq!((q.policy_here, q.holds_data), (Policy::Counter, true));
        assert_eq!(q.policies_of_events, vec![Policy::Lww]);
        assert_eq!(q.events, 1);
        assert!(s.is_quarantined(&ns("hits")));
        assert_eq!(s.metrics().events_parked.get(), 1);
        assert_eq!(s.metrics().events_quarantined.get(), 1);
    }
    // Acknowledged means durable: still held after a restart, still duplicates.
    let s = Store::open(config(dir.path())).unwrap();
    let held = s.held();
    assert_eq!((held.parked.events, held.quarantine.len()), (1, 1));
    let again = s.apply_remote(batch).await.unwrap();
    assert_eq!((again.applied, again.duplicates), (0, 4));
}

#[tokio::test]
async fn a_parked_event_is_applied_once_the_clock_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.max_clock_skew_ms = 300;
    let s = Store::open(c).unwrap();
    let ahead = now_ms() + 1_500;
    let out = s
        .apply_remote(vec![put("p", 9, 1, ahead, "k")])
        .await
        .unwrap();
    assert_eq!(out.parked, 1);
    assert_eq!(value(&s, "p", "k"), None);
    // Applied by the writer on its own, about 1.2 s from now.
    poll("the release", Duration::from_secs(20), || {
        value(&s, "p", "k").is_some()
    })
    .await;
    assert!(holds(&s, "p", dot(9, 1)));
    assert_eq!(s.held().events, 0);
    assert_eq!(s.metrics().events_released.get(), 1);
    let feed = s.changes(None, 0, 10).unwrap();
    assert_eq!(feed.events.len(), 1, "in the feed once, so relayed once");
    assert_eq!(feed.events[0].event.hlc, Hlc::new(ahead, 0));
    // Its reading moved this node's clock on, as any applied event does.
    let w = s
        .write(
            ns("p"),
            vec![WriteOp::put(
                Key::new("k").unwrap(),
                ContentType::Text,
                "local",
            )],
        )
        .await
        .unwrap();
    assert!(w[0].hlc > Hlc::new(ahead, 0));
}

#[tokio::test]
async fn a_peer_cover_never_claims_a_held_dot() {
    // Guards against losing a parked event: a reconciliation's covered vector names
    // its dot, and had it joined the vector, the release would drop it as a duplicate.
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.max_clock_skew_ms = 300;
    let s = Store::open(c).unwrap();
    let ahead = now_ms() + 1_500;
    s.apply_remote(vec![put("p", 9, 1, ahead, "k")])
        .await
        .unwrap();
    let mut covered = VersionVector::new();
    covered.insert_range(NodeId::new(9).unwrap(), 1, 1);
    s.cover(ns("p"), covered).await.unwrap();
    assert!(!holds(&s, "p", dot(9, 1)));
    poll("the release", Duration::from_secs(20), || {
        value(&s, "p", "k").is_some()
    })
    .await;
}

#[tokio::test]
async fn a_quarantine_is_retried_once_the_policy_matches_or_discarded() {
    let dir = tempfile::tempdir().unwrap();
    // A peer's counter events; here `tags` was set to `set` (no data) and `hits` is a
    // counter with data, which gets a plain put.
    let peer = tempfile::tempdir().unwrap();
    let mut pc = StoreConfig::new(peer.path());
    pc.node_id = NodeId::new(9);
    let p = Store::open(pc).unwrap();
    p.set_policy(ns("tags"), Policy::Counter).await.unwrap();
    p.write(
        ns("tags"),
        vec![WriteOp::crdt(Key::new("t").unwrap(), CrdtOp::Incr(5))],
    )
    .await
    .unwrap();
    let from_peer: Vec<Event> = p
        .changes(None, 0, 10)
        .unwrap()
        .events
        .into_iter()
        .map(|e| e.event)
        .collect();

    let s = with_counter(dir.path(), config(dir.path())).await;
    s.set_policy(ns("tags"), Policy::Set).await.unwrap();
    let out = s.apply_remote(from_peer.clone()).await.unwrap();
    assert_eq!(out.quarantined, 1);
    let plain = put("hits", 9, 1, now_ms(), "home");
    assert_eq!(
        s.apply_remote(vec![plain.clone()])
            .await
            .unwrap()
            .quarantined,
        1
    );
    let names: Vec<_> = s
        .held()
        .quarantine
        .into_iter()
        .map(|q| q.namespace)
        .collect();
    assert_eq!(names, vec![ns("hits"), ns("tags")]);

    // Retrying while the policy still differs applies nothing.
    let o = s
        .resolve_quarantine(ns("tags"), QuarantineAction::Retry)
        .await
        .unwrap();
    assert_eq!((o.applied, o.still_quarantined), (0, 1));
    // `tags` holds no data here: its policy can still change, and a retry applies.
    s.set_policy(ns("tags"), Policy::Counter).await.unwrap();
    let o = s
        .resolve_quarantine(ns("tags"), QuarantineAction::Retry)
        .await
        .unwrap();
    assert_eq!((o.applied, o.still_quarantined), (1, 0));
    let state = s.crdt_state(&ns("tags"), "t").unwrap().unwrap();
    assert!(matches!(state, asp_core::crdt::State::Counter(c) if c.value() == 5));
    assert!(!s.is_quarantined(&ns("tags")));

    // `hits` holds data: the plain put can only be discarded here.
    let o = s
        .resolve_quarantine(ns("hits"), QuarantineAction::Discard)
        .await
        .unwrap();
    assert_eq!(o.discarded, 1);
    assert!(s.held().quarantine.is_empty());
    assert!(holds(&s, "hits", plain.dot), "discarded dots count as held");
    // Sent again (by the stream or a repair), it is a duplicate, not quarantined again.
    let again = s.apply_remote(vec![plain.clone()]).await.unwrap();
    assert_eq!((again.duplicates, again.quarantined), (1, 0));
    // Nothing to resolve: all zeros.
    let o = s
        .resolve_quarantine(ns("hits"), QuarantineAction::Discard)
        .await
        .unwrap();
    assert_eq!(o, Default::default());
    drop(s);
    let s = Store::open(config(dir.path())).unwrap();
    assert_eq!(s.held().events, 0);
    assert!(holds(&s, "hits", plain.dot));
}

#[tokio::test]
async fn a_full_held_store_refuses_the_batch_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.held_bytes_max = 200;
    let s = Store::open(c).unwrap();
    let t = now_ms();
    let small = put("a", 9, 1, t + 3_600_000, "k");
    assert_eq!(s.apply_remote(vec![small]).await.unwrap().parked, 1);
    let mut big = put("a", 9, 2, t + 3_600_000, "big");
    big.op = Op::Put {
        content_type: ContentType::Text,
        value: Bytes::from(vec![b'x'; 300]),
    };
    let err = s
        .apply_remote(vec![put("a", 9, 3, t, "ok"), big])
        .await
        .unwrap_err();
    match &err {
        WriteError::ClockSkew(m) => {
            assert!(m.contains("max_clock_skew"), "{m}");
            assert!(m.contains("held_bytes_max"), "{m}");
        }
        e => panic!("unexpected {e:?}"),
    }
    assert_eq!(s.head().seq, 0, "nothing of the batch was applied");
    assert_eq!(s.held().full_refusals, 1);
    assert_eq!(s.metrics().held_full_refusals.get(), 1);
}

#[tokio::test]
async fn a_damaged_held_file_is_refused_on_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(config(dir.path())).unwrap();
        let t = now_ms() + 3_600_000;
        s.apply_remote(vec![put("a", 9, 1, t, "k1"), put("a", 9, 2, t, "k2")])
            .await
            .unwrap();
    }
    let path = dir.path().join("held.log");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0xFF;
    std::fs::write(&path, &bytes).unwrap();
    let err = Store::open(config(dir.path())).err().unwrap().to_string();
    assert!(err.contains("corrupt") && err.contains("held.log"), "{err}");
    assert!(err.contains("offset 8"), "{err}");
}

#[tokio::test]
async fn an_empty_namespace_takes_one_policy_from_a_batch_and_quarantines_the_other() {
    // Guards against an empty lww namespace taking a CRDT policy from a batch whose
    // earlier events were plain puts to it, applied too: a plain value in a counter
    // namespace, which no read can join.
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(config(dir.path())).unwrap();
    let mut counter = put("n", 9, 2, now_ms(), "c");
    counter.context = Policy::Counter.event_context();
    counter.op = Op::Put {
        content_type: ContentType::OctetStream,
        value: Bytes::from(
            asp_core::crdt::State::empty(Policy::Counter)
                .unwrap()
                .encode(),
        ),
    };
    let out = s
        .apply_remote(vec![put("n", 9, 1, now_ms(), "plain"), counter])
        .await
        .unwrap();
    assert_eq!((out.applied, out.quarantined), (1, 1));
    assert_eq!(s.policy(&ns("n")), Policy::Lww);
    assert_eq!(value(&s, "n", "plain").as_deref(), Some("plain"));
    assert_eq!(
        s.held().quarantine[0].policies_of_events,
        vec![Policy::Counter]
    );
}
