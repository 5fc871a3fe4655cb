//! Tests of the pages of events sent to peers: every key once, frames read together
//! as read alone.

use super::*;
use crate::{StoreConfig, WriteOp};
use asp_core::ContentType;

/// Keys `k0000`..`k1999` written in key order, then a few rewritten and deleted
/// out of order: the log holds runs of adjacent frames and stragglers.
async fn written(dir: &std::path::Path) -> (Store, Namespace) {
    let store = Store::open(StoreConfig::new(dir)).unwrap();
    let ns = Namespace::new("paged").unwrap();
    for chunk in 0..4 {
        let ops: Vec<WriteOp> = (chunk * 500..(chunk + 1) * 500)
            .map(|i| {
                WriteOp::put(
                    Key::new(&format!("k{i:04}")).unwrap(),
                    ContentType::Text,
                    bytes::Bytes::from(format!("value {i} ").repeat(20)),
                )
            })
            .collect();
        store.write(ns.clone(), ops).await.unwrap();
    }
    let mut ops: Vec<WriteOp> = (0..2000)
        .step_by(37)
        .map(|i| {
            WriteOp::put(
                Key::new(&format!("k{i:04}")).unwrap(),
                ContentType::Text,
                bytes::Bytes::from(format!("second {i}")),
            )
        })
        .collect();
    ops.extend(
        (5..2000)
            .step_by(101)
            .map(|i| WriteOp::delete(Key::new(&format!("k{i:04}")).unwrap())),
    );
    store.write(ns.clone(), ops).await.unwrap();
    (store, ns)
}

#[tokio::test]
async fn pages_of_the_state_hold_every_key_once_as_reading_one_by_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ns) = written(dir.path()).await;
    // Small pages by count and by bytes, so that reads end mid-gathering.
    // The byte sizes between them end the last page at every point of a gathering
    // (read at the end of the namespace, some of it may not fit).
    let sizes = (3000..12_000).step_by(97).map(|b| (5000, b));
    for (limit, bytes_max) in [(1, usize::MAX), (300, usize::MAX), (5000, 10_000), (7, 1)]
        .into_iter()
        .chain(sizes)
    {
        let mut after: Option<Key> = None;
        let mut seen = Vec::new();
        loop {
            let (events, next) = store
                .state_events(&ns, after.as_ref(), limit, bytes_max)
                .unwrap();
            assert!(!events.is_empty(), "a page with nothing before the end");
            assert!(events.len() <= limit);
            seen.extend(events);
            match next {
                Some(k) => after = Some(k),
                None => break,
            }
        }
        assert_eq!(seen.len(), 2000, "limit {limit}, bytes {bytes_max}");
        for (i, event) in seen.iter().enumerate() {
            assert_eq!(event.key.as_str(), format!("k{i:04}"));
        }
        if limit == 5000 && bytes_max != 10_000 {
            continue;
        }
        for (i, event) in seen.iter().enumerate() {
            assert_eq!(event.key.as_str(), format!("k{i:04}"));
            let state = store.get(&ns, event.key.as_str()).unwrap().unwrap();
            assert_eq!(event.dot, state.version.dot, "{}", event.key.as_str());
            match (&event.op, &state.value) {
                (asp_core::Op::Put { value, .. }, Some(v)) => assert_eq!(value, &v.bytes),
                (asp_core::Op::Delete, None) => {}
                other => panic!("{}: {other:?}", event.key.as_str()),
            }
        }
    }
}

#[tokio::test]
async fn many_frames_read_together_are_the_frames_read_alone_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ns) = written(dir.path()).await;
    let shared = &store.inner.shared;
    let mut positions = Vec::new();
    shared
        .index
        .scan(&codec::index_prefix(ns.as_str()), None, |_, entry| {
            if !entry.is_epitaph() {
                positions.push(entry.position);
            }
            true
        })
        .unwrap();
    // Out of order, with repeats.
    positions.reverse();
    positions.extend(positions.clone().into_iter().step_by(3));
    let _gate = shared.maintenance.segment_gate.read().unwrap();
    let together = shared.log.read_many_at(&positions).unwrap();
    assert_eq!(together.len(), positions.len());
    for (p, r) in positions.iter().zip(&together) {
        assert_eq!(shared.log.read_at(*p).unwrap().event.dot, r.event.dot);
    }
    // A position a byte short of its frame is damage, not a shorter record.
    let mut bad = positions.clone();
    bad[10].frame_len -= 1;
    let err = shared.log.read_many_at(&bad).unwrap_err();
    assert!(matches!(err, ReadError::Corrupt(_)), "{err}");
}
