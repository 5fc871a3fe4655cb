//! The feed watcher: follows this node's feed for events with an epoch (divergent
//! events to list, see [`Modes::note_if_divergent`]) and lease records, with one reader
//! for the node's life.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use asp_store::Store;

use crate::modes::{Divergence, EpochEvent, Modes};

/// Events with an epoch not yet known divergent or not (no later epoch known) that the
/// watcher keeps to look at again when the known epochs change; past this, the oldest
/// are let go (the leader of any later epoch lists them when they reach it).
const UNDECIDED_MAX: usize = 10_000;

/// How many feed positions [`watch_feed`] may pass without saving where it is.
const DIVERGENT_POS_SAVE_EVERY: u64 = 1_000_000;

/// Follows this node's feed: lists every divergent event it applies (see
/// [`Modes::note_if_divergent`]) and takes in every lease record. Its position is kept
/// in `divergent.pos` in the data directory, so a restart looks again at no more than
/// the last page.
///
/// An event of the newest epoch this node knows is not divergent yet: if a later
/// epoch whose start lacks it comes, it is. Such events are kept (at most
/// [`UNDECIDED_MAX`]) and looked at again whenever the known epochs change, so an
/// old leader lists its own divergent tail once it learns of the new epoch.
pub(crate) async fn watch_feed(
    modes: Arc<Modes>,
    leases: Arc<crate::leases::Leases>,
    store: Store,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let path = store.config().data_dir.join("divergent.pos");
    let mut pos: u64 = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let mut head = store.subscribe();
    // One reader for the node's life: it keeps its place past the events it skips, so
    // a head change reads only what is new. (Starting a reader again from the last
    // position that had a wanted event re-read the whole feed since then at every
    // write: a bootstrap of 1 M keys took 1.5× as long.)
    // Only lease records and events with an epoch: the rest are skipped unread.
    let mut reader = Some(store.feed_reader_of_epochs_and(crate::leases::LEASES_PREFIX, pos));
    let mut saved = pos;
    let mut undecided: VecDeque<EpochEvent> = VecDeque::new();
    loop {
        while let Some(mut r) = reader.take() {
            let from = r.position();
            // Reads wait for the disk: off the async threads.
            let Ok((r, page)) = tokio::task::spawn_blocking(move || {
                let page = r.read(1000);
                (r, page)
            })
            .await
            else {
                // The blocking pool is gone: the runtime is shutting down.
                return;
            };
            let page = match page {
                Ok(p) => p,
                Err(e) => {
                    // Dropped: the next head change starts a reader at `pos` again.
                    tracing::warn!(error = %e, "cannot read the feed for divergent events and leases");
                    break;
                }
            };
            modes
                .feed_read
                .fetch_add(r.position().saturating_sub(from), Ordering::Relaxed);
            reader = Some(r);
            for fe in &page {
                // Lease records: every node knows the newest token of each lease.
                if fe
                    .event
                    .namespace
                    .as_str()
                    .starts_with(crate::leases::LEASES_PREFIX)
                    && let asp_core::Op::Put { value, .. } = &fe.event.op
                {
                    leases.note(fe.event.namespace.as_str(), value);
                }
                if fe.event.epoch != 0 {
                    let event = EpochEvent::from(&fe.event);
                    if not_yet(&modes, &store, &event).await {
                        if undecided.len() == UNDECIDED_MAX {
                            undecided.pop_front();
                        }
                        undecided.push_back(event);
                    }
                }
            }
            pos = reader.as_ref().map_or(pos, |r| r.position());
            // Saved after a page that held events, and after every million skipped
            // (so a restart does not read far again), not at every write.
            if !page.is_empty() || pos >= saved.saturating_add(DIVERGENT_POS_SAVE_EVERY) {
                let tmp = path.with_extension("pos.tmp");
                if std::fs::write(&tmp, pos.to_string()).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                    saved = pos;
                }
            }
            if page.is_empty() {
                break;
            }
        }
        if reader.is_none() {
            // A read failed: start over from the last position read.
            reader = Some(store.feed_reader_of_epochs_and(crate::leases::LEASES_PREFIX, pos));
        }
        tokio::select! {
            _ = head.changed() => {}
            () = modes.history_changed.notified() => {
                look_again(&modes, &store, &mut undecided).await;
            }
            () = shutdown.cancelled() => return,
        }
    }
}

/// Lists `event` if it is divergent; whether it is to be looked at again (not
/// divergent yet, or the list could not be written).
async fn not_yet(modes: &Modes, store: &Store, event: &EpochEvent) -> bool {
    match modes.note_if_divergent(store, event).await {
        Ok(Divergence::Listed | Divergence::Settled) => false,
        Ok(Divergence::NotYet) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list a divergent event");
            true
        }
    }
}

/// Looks again at the events that were not divergent yet: lists those that now are,
/// lets go of those now settled, keeps the rest.
async fn look_again(modes: &Modes, store: &Store, undecided: &mut VecDeque<EpochEvent>) {
    let mut kept = VecDeque::with_capacity(undecided.len());
    for event in undecided.drain(..) {
        if not_yet(modes, store, &event).await {
            kept.push_back(event);
        }
    }
    *undecided = kept;
}

#[cfg(test)]
mod tests {
    use super::*;
    use asp_core::{Key, NodeId};
    use asp_store::WriteOp;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    fn ns(name: &str) -> asp_core::Namespace {
        asp_core::Namespace::new(name).unwrap()
    }

    /// A store, its node's modes and leases (the write gate installed), and the feed
    /// watcher running.
    fn watched(
        dir: &std::path::Path,
    ) -> (
        Store,
        Arc<Modes>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let store = Store::open(asp_store::StoreConfig::new(dir)).unwrap();
        let node = store.node_id();
        let membership = Arc::new(crate::membership::Membership::new(
            asp_core::session::MemberEntry {
                node,
                incarnation: 1,
                heartbeat: 0,
                name: "n".into(),
                api: String::new(),
                peer: String::new(),
            },
            Duration::from_secs(1),
        ));
        let modes = Arc::new(Modes::new(node, membership));
        let leases = Arc::new(crate::leases::Leases::new(node, modes.clone()));
        store.set_write_gate(Arc::new(crate::leases::Gate {
            modes: modes.clone(),
            leases: leases.clone(),
        }));
        let shutdown = CancellationToken::new();
        let watcher = tokio::spawn(watch_feed(
            modes.clone(),
            leases,
            store.clone(),
            shutdown.clone(),
        ));
        (store, modes, shutdown, watcher)
    }

    async fn put(store: &Store, namespace: &str, key: &str) {
        let op = WriteOp::put(
            Key::new(key).unwrap(),
            asp_core::ContentType::Json,
            b"1".to_vec(),
        );
        store.write(ns(namespace), vec![op]).await.unwrap();
    }

    /// Waits (bounded) until the watcher has read up to the head.
    async fn read_up(store: &Store, modes: &Modes) {
        let head = store.head().seq;
        for _ in 0..5000 {
            if modes.feed_read.load(Ordering::Relaxed) >= head {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the watcher did not read up to {head}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_feed_watcher_reads_each_event_once_however_often_it_wakes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, modes, shutdown, watcher) = watched(dir.path());
        // Writes without an epoch or a lease, each waited out by the watcher: none is
        // what it looks for, and each wakes it.
        let writes = 300;
        for i in 0..writes {
            put(&store, "app", &format!("k{i}")).await;
            read_up(&store, &modes).await;
        }
        let head = store.head().seq;
        assert!(head >= writes, "{head}");
        // Before the watcher kept its reader, each wake read again from the last event
        // it wanted (here, the start): about 45,000 reads for 300 writes.
        assert_eq!(modes.feed_read.load(Ordering::Relaxed), head);
        shutdown.cancel();
        watcher.await.unwrap();
    }

    /// A leader cut off goes on writing in its epoch; when it learns of a later epoch
    /// whose start lacks those writes, it lists them itself (they were read, and not
    /// divergent, before).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_old_leader_lists_its_own_tail_once_it_learns_of_the_next_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, modes, shutdown, watcher) = watched(dir.path());
        let orders = ns("orders");
        let first = modes
            .set(&store, &orders, Some(store.node_id()), vec![])
            .await
            .unwrap();
        assert_eq!(first.epoch, 1);
        put(&store, "orders", "before").await;
        let start = store.namespace_vector(&orders);
        put(&store, "orders", "cut-off").await;
        read_up(&store, &modes).await;
        let (listed, _) = crate::modes::divergent_list(&store, "orders", None, 10).unwrap();
        assert!(listed.is_empty(), "{listed:?}");
        // Epoch 2 under another leader, begun without the cut-off write.
        let other = NodeId::new(if store.node_id().get() == 7 { 8 } else { 7 }).unwrap();
        let second = asp_core::modes::EpochRecord {
            epoch: 2,
            leader: Some(other),
            voters: vec![],
            start,
        };
        modes
            .write_record(&store, &modes.hash(&orders), &second)
            .await
            .unwrap();
        let mut listed = Vec::new();
        for _ in 0..5000 {
            listed = crate::modes::divergent_list(&store, "orders", None, 10)
                .unwrap()
                .0;
            if !listed.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let keys: Vec<_> = listed.iter().map(|v| v["key"].clone()).collect();
        assert_eq!(keys, vec![serde_json::json!("cut-off")], "{listed:?}");
        shutdown.cancel();
        watcher.await.unwrap();
    }
}
