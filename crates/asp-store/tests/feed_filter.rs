//! A feed reader of epochs and a namespace prefix (what the lease and divergence
//! watcher reads): only events that carry an epoch and events of namespaces under the
//! prefix come back, in feed order, and the reader's position passes the rest.

use asp_core::{ContentType, Dot, Event, Hlc, Key, Namespace, NodeId, Op};
use asp_store::{Store, StoreConfig, WriteOp};
use bytes::Bytes;

fn ns(name: &str) -> Namespace {
    Namespace::new(name).unwrap()
}

fn remote(namespace: &str, counter: u64, epoch: u64) -> Event {
    Event {
        namespace: ns(namespace),
        key: Key::new(&format!("r{counter}")).unwrap(),
        op: Op::Put {
            content_type: ContentType::Text,
            value: Bytes::from_static(b"v"),
        },
        dot: Dot {
            origin: NodeId::new(7).unwrap(),
            counter,
        },
        hlc: Hlc::new(1_000, counter as u16),
        context: Bytes::new(),
        epoch,
        expires_ms: 0,
    }
}

#[tokio::test]
async fn only_events_with_an_epoch_or_of_the_prefix_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = StoreConfig::new(dir.path());
    cfg.node_id = NodeId::new(1);
    let store = Store::open(cfg).unwrap();
    let put = |k: &str| {
        vec![WriteOp::put(
            Key::new(k).unwrap(),
            ContentType::Text,
            Bytes::from_static(b"x"),
        )]
    };
    store.write(ns("plain"), put("a")).await.unwrap();
    store.write(ns("_p.leases.x"), put("l1")).await.unwrap();
    store.write(ns("plain"), put("b")).await.unwrap();
    let applied = store
        .enqueue_remote(vec![remote("led", 1, 3), remote("led2", 2, 0)])
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(applied.applied, 2);
    store.write(ns("plain"), put("c")).await.unwrap();
    let head = store.head().seq;
    assert_eq!(head, 6);

    let mut reader = store.feed_reader_of_epochs_and("_p.leases.", 0);
    let got: Vec<(u64, String)> = reader
        .read(100)
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.event.namespace.as_str().to_owned()))
        .collect();
    assert_eq!(
        got,
        vec![(2, "_p.leases.x".to_owned()), (4, "led".to_owned())]
    );
    assert_eq!(reader.position(), head, "the reader passed what it skipped");
    assert!(reader.read(100).unwrap().is_empty());
    // A reader of everything still reads everything.
    let mut all = store.feed_reader(None, 0);
    assert_eq!(all.read(100).unwrap().len(), 6);
    store.shutdown().await;
}
