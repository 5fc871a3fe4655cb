//! Events from peers are checked like local writes before they reach the writer: a
//! batch with one event that breaks a rule is refused whole, naming the rule.

use std::path::Path;

use asp_core::crdt::{Policy, State};
use asp_core::{ContentType, Dot, Event, Hlc, Key, Namespace, NodeId, Op};
use asp_store::{Store, StoreConfig, VALUE_BYTES_LIMIT, WriteError};
use bytes::Bytes;

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.node_id = NodeId::new(1);
    c
}

fn event(counter: u64, key: &str, value: Bytes, context: Bytes) -> Event {
    Event {
        namespace: Namespace::new("v").unwrap(),
        key: Key::new(key).unwrap(),
        op: Op::Put {
            content_type: ContentType::OctetStream,
            value,
        },
        dot: Dot {
            origin: NodeId::new(9).unwrap(),
            counter,
        },
        hlc: Hlc::new(asp_store::clock::wall_ms(), 0),
        context,
        epoch: 0,
        expires_ms: 0,
    }
}

fn plain(counter: u64, key: &str) -> Event {
    event(counter, key, Bytes::from_static(b"ok"), Bytes::new())
}

/// The refusal of a batch holding a good event and then `bad`: its rule, and the
/// message (which must name the event's dot).
async fn refusal(store: &Store, bad: Event) -> (&'static str, String) {
    let dot = bad.dot;
    let head = store.head().seq;
    let err = store
        .apply_remote(vec![plain(100, "good"), bad])
        .await
        .unwrap_err();
    assert_eq!(store.head().seq, head, "nothing of the batch was applied");
    assert!(
        store
            .get(&Namespace::new("v").unwrap(), "good")
            .unwrap()
            .is_none()
    );
    match err {
        WriteError::InvalidEvent { reason, message } => {
            assert!(message.contains(&dot.to_string()), "{message}");
            (reason, message)
        }
        e => panic!("unexpected {e:?}"),
    }
}

#[tokio::test]
async fn every_rule_refuses_the_whole_batch_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    // The largest values any node may allow, so that a record can pass the log's limit
    // with a value within the value limit.
    c.value_bytes_max = VALUE_BYTES_LIMIT;
    c.write_queue_bytes_max = 4 * VALUE_BYTES_LIMIT;
    let s = Store::open(c).unwrap();
    let counter = Policy::Counter.event_context();
    let cases: Vec<(&str, Event, &str)> = vec![
        (
            "a value over value_bytes_max",
            event(
                1,
                "big",
                Bytes::from(vec![0; VALUE_BYTES_LIMIT + 1]),
                Bytes::new(),
            ),
            "value_bytes_max",
        ),
        (
            "a record over the log's limit",
            event(
                1,
                "rec",
                Bytes::from(vec![0; VALUE_BYTES_LIMIT]),
                Bytes::from(vec![0xC7; 100_000]),
            ),
            "log's records are at most",
        ),
        (
            "an unknown context",
            event(
                1,
                "ctx",
                Bytes::from_static(b"x"),
                Bytes::from_static(&[1, 2, 3]),
            ),
            "no policy marker",
        ),
        (
            "an undecodable counter state",
            event(1, "crdt", Bytes::from_static(b"garbage"), counter.clone()),
            "no counter state",
        ),
        (
            "a set state marked counter",
            event(
                1,
                "mixed",
                Bytes::from(State::empty(Policy::Set).unwrap().encode()),
                counter.clone(),
            ),
            "carries a set state",
        ),
        (
            "a delete marked counter",
            Event {
                op: Op::Delete,
                ..event(1, "del", Bytes::new(), counter.clone())
            },
            "written as states",
        ),
        ("counter 0", plain(0, "zero"), "counter 0"),
    ];
    let mut reasons = Vec::new();
    for (what, bad, says) in cases {
        let (reason, message) = refusal(&s, bad).await;
        assert!(message.contains(says), "{what}: {message}");
        reasons.push(reason);
    }
    assert_eq!(
        reasons,
        vec![
            "value_size",
            "record_size",
            "context",
            "crdt_state",
            "crdt_state",
            "crdt_state",
            "dot"
        ]
    );
    // A valid CRDT state of the marked policy passes.
    let state = Bytes::from(State::empty(Policy::Counter).unwrap().encode());
    let out = s
        .apply_remote(vec![event(1, "fine", state, counter)])
        .await
        .unwrap();
    assert_eq!(out.applied, 1);
}

#[tokio::test]
async fn an_event_past_the_record_limit_is_refused_not_cut_on_restart() {
    // Guards against the failure issue 11 describes: an event larger than the log's
    // record limit was appended, fsynced and acknowledged, then read as damage; on the
    // next open the active segment was cut there, and every later acknowledged record
    // went with it.
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(config(dir.path())).unwrap();
        let huge = event(
            1,
            "huge",
            Bytes::from(vec![0; VALUE_BYTES_LIMIT + (128 << 10)]),
            Bytes::new(),
        );
        let err = s.apply_remote(vec![huge]).await.unwrap_err();
        assert!(
            matches!(
                err,
                WriteError::InvalidEvent {
                    reason: "value_size",
                    ..
                }
            ),
            "{err:?}"
        );
        s.apply_remote(vec![plain(2, "after")]).await.unwrap();
        assert_eq!(s.head().seq, 1);
    }
    let s = Store::open(config(dir.path())).unwrap();
    assert!(s.recovery().torn_tail.is_none());
    assert_eq!(s.head().seq, 1);
    let after = s.get(&Namespace::new("v").unwrap(), "after").unwrap();
    assert!(after.is_some_and(|k| k.value.is_some()));
}
