//! The window keeper (thread `asp-windows`, started by the indexer unless
//! `reconcile_window = 0`): keeps each namespace's reconciliation symbols and key filter
//! up to date a little behind the indexer, from the index snapshots taken before and
//! after each group. Readers wait on `windows_changed` for it to catch up.

use super::*;
use crate::key_hashes;

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
        shared.window_keeper.windows_changed.notify_all();
    }
}

/// Applies one indexed group's changes to the windows.
fn keep_windows(shared: &Shared, msg: WindowMsg) -> Result<(), String> {
    let item_key = shared.config.item_key;
    let size = shared.config.reconcile_window;
    let mut windows = shared.window_keeper.windows.lock().unwrap();
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
                if let Some(hashes) = digest.hashes.hashes_mut() {
                    hashes.insert(key_hashes::head(&key_hash), key);
                }
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
            let key_hash = item_key.key_hash(key);
            digest
                .window
                .remove(&item_key.item_with_key_hash(&key_hash, key, version));
            if let Some(hashes) = digest.hashes.hashes_mut() {
                hashes.remove(key_hashes::head(&key_hash), key);
            }
        }
    }
    if !windows.indexed.is_empty() {
        windows.fit_key_indexes(shared.config.reconcile_key_index_bytes);
    }
    windows.seq = msg.seq;
    windows.messages = msg.number;
    Ok(())
}
