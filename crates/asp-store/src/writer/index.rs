//! The threads behind the log writer: the indexer (acknowledged groups into the key
//! index, in order), the window keeper (reconciliation windows, from index
//! snapshots) and, under `fsync = "interval:<ms>"`, the syncer.

use super::*;

/// The indexer: applies acknowledged groups to the key index, in order.
pub(super) fn run_indexer(shared: Arc<Shared>, rx: std_mpsc::Receiver<IndexMsg>) {
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

/// Applies what the indexer wrote to the reconciliation windows, on a thread of its
/// own: for each key, its item at the old version (read from the index as it was
/// before the group, unless the key filter says the key is new) gives way to its item
/// at the new one.
pub(super) fn run_window_keeper(shared: Arc<Shared>, rx: std_mpsc::Receiver<WindowMsg>) {
    while let Ok(first) = rx.recv() {
        let mut msgs = vec![first];
        while let Ok(m) = rx.try_recv() {
            msgs.push(m);
        }
        for msg in msgs {
            if let Err(e) = keep_windows(&shared, msg) {
                shared.fail(format!("keeping reconciliation windows: {e}"));
                return;
            }
        }
        shared.windows_changed.notify_all();
    }
}

pub(super) fn keep_windows(shared: &Shared, msg: WindowMsg) -> Result<(), String> {
    let item_key = shared.config.item_key;
    let size = shared.config.reconcile_window;
    let mut windows = shared.windows.lock().unwrap();
    let mut added: HashMap<&str, Vec<Item>> = HashMap::new();
    for (index_key, version, old) in &msg.changes {
        let (namespace, key) = codec::split_index_key(index_key)
            .ok_or_else(|| "a malformed key in an index update".to_string())?;
        if !windows.by_namespace.contains_key(namespace) {
            let name = Namespace::new(namespace).map_err(|e| e.to_string())?;
            let empty = Digest::of(item_key, &[], size, 1);
            windows.by_namespace.insert(name, empty);
        }
        let digest = windows.by_namespace.get_mut(namespace).expect("just made");
        let key_hash = item_key.key_hash(key);
        let old = match old {
            Old::Known(old) => *old,
            Old::Unknown if digest.keys.may_contain(&key_hash) => shared
                .index
                .get_at(&msg.before, index_key)
                .map_err(|e| e.to_string())?
                .map(|e| e.version()),
            Old::Unknown => None,
        };
        let new = item_key.item_with_key_hash(&key_hash, key, version);
        match old {
            Some(old) => digest
                .window
                .replace(&item_key.item_with_key_hash(&key_hash, key, &old), &new),
            None => {
                digest.keys.insert(&key_hash);
                added.entry(namespace).or_default().push(new);
            }
        }
    }
    for (namespace, items) in added {
        let window = &mut windows
            .by_namespace
            .get_mut(namespace)
            .expect("made above")
            .window;
        window.add_all(&items);
        // Grown past its window: rebuild it, longer, from the index as of this group.
        let len = window_len(window.items(), size);
        if len > window.symbols().len() {
            let items = namespace_items(&shared.index, &msg.after, item_key, namespace)
                .map_err(|e| e.to_string())?;
            *window = Window::build(item_key, len, &items, 1);
        }
    }
    for (index_key, version) in &msg.removed {
        let (namespace, key) = codec::split_index_key(index_key)
            .ok_or_else(|| "a malformed key in an index update".to_string())?;
        if let Some(digest) = windows.by_namespace.get_mut(namespace) {
            // The key filter keeps the key: it only ever answers "maybe".
            digest.window.remove(&item_key.item(key, version));
        }
    }
    windows.seq = msg.seq;
    windows.messages = msg.number;
    Ok(())
}

pub(super) fn index_groups(
    shared: &Shared,
    rx: std_mpsc::Receiver<IndexMsg>,
    window_tx: Option<std_mpsc::SyncSender<WindowMsg>>,
) {
    while let Ok(first) = rx.recv() {
        let mut msgs = vec![first];
        while let Ok(m) = rx.try_recv() {
            msgs.push(m);
        }
        if shared.failure.get().is_some() {
            continue;
        }
        shared.index.wait_for_flushes();
        for msg in &msgs {
            if let Err(e) = apply_to_index(shared, msg, window_tx.as_ref()) {
                shared.fail(format!("writing the key index: {e}"));
                break;
            }
        }
        if shared.failure.get().is_some() {
            continue;
        }
        let last = msgs.last().expect("at least one message").head;
        {
            let mut namespaces = shared.namespaces.write().unwrap();
            for msg in &msgs {
                for (ns, state) in &msg.namespaces {
                    namespaces.insert(ns.clone(), state.clone());
                }
            }
        }
        {
            let mut progress = shared.progress.lock().unwrap();
            progress.indexed = last;
            shared.indexed_seq.store(last.seq, Ordering::Release);
            shared
                .index_msgs_applied
                .fetch_add(msgs.len() as u64, Ordering::AcqRel);
        }
        shared.progress_changed.notify_all();
        shared.indexed_tx.send_replace(last.seq);
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
pub(super) fn apply_to_index(
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
                if current
                    .as_ref()
                    .is_some_and(|c| !lww_wins(&update.entry.version(), &c.version()))
                {
                    continue;
                }
                Old::Known(current.map(|c| c.version()))
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
        let number = shared.window_messages.fetch_add(1, Ordering::AcqRel) + 1;
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

/// Under `fsync = "interval:<ms>"`: fsyncs what has been written, on the interval.
pub(super) fn run_syncer(shared: Arc<Shared>, interval: Duration) {
    let mut progress = shared.progress.lock().unwrap();
    let mut next_sync = Instant::now() + interval;
    loop {
        // The condition variable also wakes on every commit; only the interval or a
        // stop request ends the wait.
        let now = Instant::now();
        if now < next_sync {
            let (guard, _) = shared
                .progress_changed
                .wait_timeout(progress, next_sync - now)
                .unwrap();
            progress = guard;
        }
        if progress.stopping || shared.failure.get().is_some() {
            return;
        }
        if Instant::now() < next_sync {
            continue;
        }
        next_sync = Instant::now() + interval;
        let written = progress.written;
        if written.seq <= progress.synced.seq {
            continue;
        }
        drop(progress);
        // Earlier segments were fsynced when sealed; only the newest can be dirty.
        let segment = shared.log.active();
        let result = segment.file.sync_data();
        shared.metrics.fsyncs.inc();
        progress = shared.progress.lock().unwrap();
        match result {
            Ok(()) => {
                if written.seq > progress.synced.seq {
                    progress.synced = written;
                }
                shared.publish(&progress);
            }
            Err(e) => {
                drop(progress);
                shared.fail(format!("fsync of {}: {e}", segment.path.display()));
                return;
            }
        }
    }
}
