//! The indexer (thread `asp-index`): applies acknowledged groups to the key index, in
//! order, one atomic batch per group, then publishes the indexed head and each
//! namespace's state. Unless `reconcile_window = 0` it starts the window keeper (see
//! [`super::windows`]) and passes it what each group changed.
//!
//! The indexer, the window keeper and the syncer live under `writer/` rather than beside
//! it: they are the writer's threads, started and stopped by it, and they work on the
//! writer's own messages ([`IndexMsg`], [`Update`]), which stay private to this module.

use super::windows::run_window_keeper;
use super::*;

/// The indexer: applies acknowledged groups to the key index, in order.
pub(super) fn run_indexer(shared: Arc<Shared>, rx: IndexReceiver<IndexMsg>) {
    if shared.config.reconcile_window == 0 {
        index_groups(&shared, rx, None);
        return;
    }
    let (window_tx, window_rx) = std_mpsc::sync_channel(WINDOW_QUEUE_MAX);
    let keeper = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("asp-windows".into())
            .spawn(move || run_window_keeper(shared, window_rx))
            .expect("cannot start the window keeper thread")
    };
    index_groups(&shared, rx, Some(window_tx));
    let _ = keeper.join();
}

/// Applies groups as they come, a whole backlog at a time, until the writer drops
/// its end of the channel.
fn index_groups(
    shared: &Shared,
    rx: IndexReceiver<IndexMsg>,
    window_tx: Option<std_mpsc::SyncSender<WindowMsg>>,
) {
    loop {
        let msgs = rx.recv_all();
        if msgs.is_empty() {
            return;
        }
        if shared.health.failure.get().is_some() {
            continue;
        }
        shared.index.wait_for_flushes();
        for msg in &msgs {
            if let Err(e) = apply_to_index(shared, msg, window_tx.as_ref()) {
                shared.fail(format!("writing the key index: {e}"));
                break;
            }
        }
        if shared.health.failure.get().is_some() {
            continue;
        }
        let last = msgs.last().expect("at least one message").head;
        {
            let mut namespaces = shared.indexer.namespaces.write().unwrap();
            for msg in &msgs {
                for (ns, state) in &msg.namespaces {
                    namespaces.insert(ns.clone(), state.clone());
                }
            }
        }
        {
            let mut progress = shared.progress.lock().unwrap();
            progress.indexed = last;
            shared
                .indexer
                .indexed_seq
                .store(last.seq, Ordering::Release);
            shared
                .indexer
                .index_msgs_applied
                .fetch_add(msgs.len() as u64, Ordering::AcqRel);
        }
        shared.progress_changed.notify_all();
        shared.indexer.indexed_tx.send_replace(last.seq);
        for msg in msgs {
            for reply in msg.after_index {
                let _ = reply.send(Ok(()));
            }
            for (reply, outcome) in msg.quarantines {
                let _ = reply.send(Ok(outcome));
            }
        }
    }
}

/// Applies one group to the key index as one atomic batch, and passes the changes of
/// reconciliation items on to the window keeper: each key's item at its old version
/// (if any) gives way to its new one.
fn apply_to_index(
    shared: &Shared,
    msg: &IndexMsg,
    window_tx: Option<&std_mpsc::SyncSender<WindowMsg>>,
) -> Result<(), String> {
    let index = &shared.index;
    let keep_windows = window_tx.is_some();
    let mut batch = index.batch(msg.updates.len() + 2 + 2 * msg.namespaces.len());
    let mut changes = Vec::with_capacity(if keep_windows { msg.updates.len() } else { 0 });
    let mut removed = Vec::new();
    for update in &msg.updates {
        let old = match update.kind {
            UpdateKind::Merge => {
                // An event from a peer may be older than what the key holds.
                let current = index.get(&update.key).map_err(|e| e.to_string())?;
                let current = current.map(|c| c.version());
                if !crate::lww::supersedes(&update.entry.version(), current.as_ref()) {
                    continue;
                }
                Old::Known(current)
            }
            UpdateKind::Overwrite => Old::Unknown,
            UpdateKind::Relocate(from) => {
                // Superseded since compaction read it: the copy is just a dead record.
                let current = index.get(&update.key).map_err(|e| e.to_string())?;
                if current.is_some_and(|c| c.dot == update.entry.dot && c.position == from) {
                    // The version stays: nothing for the reconciliation windows.
                    batch.put(update.key.clone(), &update.entry);
                }
                continue;
            }
            UpdateKind::Collect { epitaph, tally } => {
                let current = index.get(&update.key).map_err(|e| e.to_string())?;
                let Some(c) = current.filter(|c| c.dot == update.entry.dot) else {
                    // Written since: the entry stays; an epitaph row of it is stale.
                    batch.delete_epitaph(update.key.clone());
                    continue;
                };
                // Counted before the commit: a failed commit fails the store.
                let tally = &msg.tallies[tally];
                tally.collected.fetch_add(1, Ordering::Relaxed);
                if epitaph {
                    if !c.is_epitaph() {
                        tally.epitaphs.fetch_add(1, Ordering::Relaxed);
                    }
                    let entry = IndexEntry {
                        position: LogPosition::NONE,
                        ..c
                    };
                    batch.put(update.key.clone(), &entry);
                    batch.put_epitaph(update.key.clone(), &entry);
                } else {
                    batch.delete(update.key.clone());
                    if c.is_epitaph() {
                        // Only epitaphs have a row (a removal is a write in fjall).
                        batch.delete_epitaph(update.key.clone());
                    }
                    if keep_windows {
                        removed.push((update.key.clone(), c.version()));
                    }
                }
                continue;
            }
        };
        batch.put(update.key.clone(), &update.entry);
        if keep_windows {
            changes.push((update.key.clone(), update.entry.version(), old));
        }
    }
    let before = keep_windows.then(|| index.snapshot());
    for (ns, state) in &msg.namespaces {
        batch.set_namespace(ns, state);
    }
    batch.set_applied(msg.head.seq, msg.hlc);
    batch.commit().map_err(|e| e.to_string())?;
    if let (Some(tx), Some(before)) = (window_tx, before) {
        // Gone only while the store stops: nobody reads windows then.
        let number = shared
            .indexer
            .window_messages
            .fetch_add(1, Ordering::AcqRel)
            + 1;
        let _ = tx.send(WindowMsg {
            number,
            seq: msg.head.seq,
            before,
            after: index.snapshot(),
            changes,
            removed,
        });
    }
    Ok(())
}
