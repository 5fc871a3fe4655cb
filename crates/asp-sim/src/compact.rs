//! Compaction as the simulator runs it: superseded records leave the feed (their dots
//! join the base, their positions become gaps, so a peer that lacks them gets a
//! handover), and deletes of the last-writer-wins namespaces are collected by the real
//! rule (`asp_core::gc`, fed by the reports every summary gossips), leaving an epitaph
//! while some node is away past the horizon. What the store does in a compaction
//! run, at once: the survey, the collection through the writer (here between two
//! groups, so in order with writes) and the sync before segments go.
//!
//! Emptied keys of the set, siblings and JSON-map namespaces are collected by the same
//! rule, every entry of a key at once; live keys have every entry replaced by their
//! pruned join when that is smaller (the store writes these as relocated copies).
//!
//! Not modelled: relocation (the store moves the live records of a compacted segment
//! to the head; here they stay where they are) and segment boundaries (here any
//! record old enough may go).

use super::*;

impl Sim {
    /// One compaction run on `node`.
    pub(crate) fn compact(&mut self, node: usize) {
        let wall = self.wall_ms(node);
        let fault = self.config.model_fault;
        let n = &mut self.nodes[node];
        // An fsync in flight: what it writes is not indexed yet, and the sync below
        // must not claim it. Requests queued: the store's collection would be applied
        // behind them (the writer's queue is its order); here it waits for them.
        if !n.up || n.busy || !n.queue.is_empty() {
            return;
        }
        let me = n.id;
        let store = &mut n.store;
        let peers: Vec<NodeId> = store.checkpoints.keys().copied().collect();
        let vectors: Vec<(Namespace, VersionVector)> = store
            .vectors
            .iter()
            .filter(|(ns, _)| policy_of(ns) != Policy::Counter)
            .map(|(ns, v)| (ns.clone(), v.clone()))
            .collect();
        let mut views = BTreeMap::new();
        for (ns, vector) in vectors {
            let view = store.gc.view(&ns, me, &vector, &peers, wall, GC_HORIZON_MS);
            views.insert(ns, view);
        }

        // Deletes that may go, epitaphs that may go, epitaph rows of keys written since.
        let mut collect = Vec::new();
        let mut drop_epitaphs = Vec::new();
        for ((ns, key), (version, value)) in &store.state {
            let Some(view) = views.get(ns) else {
                continue;
            };
            if value.is_some() {
                continue;
            }
            if store.epitaphs.get(&(ns.clone(), key.clone())) == Some(version) {
                if view.complete && view.stable.contains(version.dot) {
                    drop_epitaphs.push((ns.clone(), key.clone()));
                }
                continue;
            }
            if wall.saturating_sub(version.hlc.physical_ms()) > TOMBSTONE_TTL_MS
                && view.stable.contains(version.dot)
            {
                collect.push(((ns.clone(), key.clone()), *version, !view.complete));
            }
        }
        let stale: Vec<(Namespace, Key)> = store
            .epitaphs
            .iter()
            .filter(|(k, v)| store.state.get(k).is_none_or(|(current, _)| current != *v))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            store.epitaphs.remove(&k);
        }
        for k in drop_epitaphs {
            store.epitaphs.remove(&k);
            store.state.remove(&k);
            self.stats.epitaphs_dropped += 1;
        }
        let mut collected_keys = BTreeSet::new();
        // CRDT keys (counters' never) that hold nothing, every entry held by every
        // node and older than the TTL, no node away: all their entries go at once,
        // as the store's compaction collects them.
        type Entries = Vec<((Namespace, Key), Version)>;
        let mut crdt_keys: BTreeMap<(Namespace, Key), Entries> = BTreeMap::new();
        let mut unstable = BTreeSet::new();
        for ((ns, entry), (version, _)) in &store.state {
            if matches!(policy_of(ns), Policy::Lww | Policy::Counter) {
                continue;
            }
            let Some(view) = views.get(ns) else {
                continue;
            };
            let Some((key, _)) = entry.as_str().rsplit_once('#') else {
                continue;
            };
            let key = (ns.clone(), Key::new(key).expect("a valid key"));
            let unstable_too = fault == Some(ModelFault::CrdtCollectsUnstable);
            if !unstable_too
                && (!view.complete
                    || !view.stable.contains(version.dot)
                    || wall.saturating_sub(version.hlc.physical_ms()) <= TOMBSTONE_TTL_MS)
            {
                unstable.insert(key.clone());
            }
            crdt_keys
                .entry(key)
                .or_default()
                .push(((ns.clone(), entry.clone()), *version));
        }
        for (key, entries) in crdt_keys {
            let unstable = unstable.contains(&key);
            if unstable && fault != Some(ModelFault::CrdtPrunesUnstable) {
                continue;
            }
            let (ns, k) = &key;
            let empty = State::empty(policy_of(ns)).expect("a CRDT policy");
            let joined = store.joined(ns, k, empty);
            if !joined.is_removed() {
                // A live key: each entry becomes the pruned join when that is smaller.
                let pruned = joined.pruned(entries.iter().map(|(_, version)| version.dot));
                let pruned = Bytes::from(pruned.encode());
                let now: usize = entries
                    .iter()
                    .filter_map(|(e, _)| store.state.get(e).and_then(|(_, v)| v.as_ref()))
                    .map(Bytes::len)
                    .sum();
                if pruned.len() * entries.len() < now {
                    for (entry, _) in &entries {
                        if let Some((_, value)) = store.state.get_mut(entry) {
                            *value = Some(pruned.clone());
                        }
                    }
                    self.stats.crdt_pruned += 1;
                }
                continue;
            }
            if unstable {
                continue;
            }
            for (entry, version) in entries {
                store.state.remove(&entry);
                store
                    .collected_here
                    .entry(entry.clone())
                    .or_default()
                    .push((version.dot, version.hlc));
                collected_keys.insert(entry);
            }
            self.stats.crdt_collected += 1;
        }
        for (k, version, epitaph) in collect {
            if epitaph {
                store.epitaphs.insert(k.clone(), version);
                self.stats.epitaphs += 1;
            } else {
                store.state.remove(&k);
                self.stats.collected += 1;
            }
            store
                .collected_here
                .entry(k.clone())
                .or_default()
                .push((version.dot, version.hlc));
            collected_keys.insert(k);
        }

        // Records that are dead: not the copy their key's entry points at (the last
        // one with its dot), or of a key collected above. Old enough ones go.
        let mut gone = Vec::new();
        for (k, positions) in store.positions.iter_mut() {
            let entry = store.state.get(k).map(|(v, _)| v.dot);
            let current = positions
                .iter()
                .rposition(|&i| Some(store.feed[i].dot) == entry);
            let collected = collected_keys.contains(k);
            let mut index = 0;
            positions.retain(|&i| {
                let here = index;
                index += 1;
                let e = &store.feed[i];
                let dead = current != Some(here);
                let old = wall.saturating_sub(e.hlc.physical_ms()) > RETENTION_MS;
                if collected || (dead && old) {
                    gone.push(i);
                    false
                } else {
                    true
                }
            });
        }
        store.positions.retain(|_, p| !p.is_empty());
        for i in gone {
            let e = &store.feed[i];
            store.compacted.insert(i);
            store
                .covered
                .entry(e.namespace.clone())
                .or_default()
                .insert(e.dot);
            self.stats.compacted += 1;
        }
        // Nothing was waiting to be indexed (no group in flight): the index is the
        // state again.
        store.indexed = store.state.clone();
        store.indexed_vectors = store.vectors.clone();
        // The index and the base are persisted before any segment goes.
        store.durable = store.feed.len();
        store.checkpoints_synced = store.checkpoints.clone();
        store.covered_synced = store.covered.clone();
        store.epitaphs_synced = store.epitaphs.clone();
    }
}
