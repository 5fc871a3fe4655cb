//! The simulator's model of `asp-store`: a feed with its durable and visible
//! prefixes, vectors, key states, covered dots, checkpoints and counters, and the view
//! the real reconciler reads it through.

use super::*;
/// A key's state: the winning event's version, and its value (`None` if deleted).
pub(crate) type KeyState = (Version, Option<Bytes>);

/// A model of `asp-store`: the feed, its durable prefix, and what is derived from it.
pub(crate) struct StoreModel {
    pub(crate) feed: Vec<Event>,
    /// `feed[..durable]` survives a machine crash.
    pub(crate) durable: usize,
    /// Readers (peers, subscribers) see `feed[..visible]`.
    pub(crate) visible: usize,
    pub(crate) vectors: BTreeMap<Namespace, VersionVector>,
    pub(crate) max_hlc: BTreeMap<Namespace, Hlc>,
    pub(crate) state: BTreeMap<(Namespace, Key), KeyState>,
    /// What readers other than the writer see (the store's key index, which takes a
    /// group only once it is durable under `fsync = always`): the key states and
    /// vectors of `feed[..indexed_upto]` and of the covers recorded with it. Peers'
    /// summaries and reconciliation read these; the writer's own CRDT writes read
    /// `state`, which holds its group in progress too (the store's recent states).
    pub(crate) indexed: BTreeMap<(Namespace, Key), KeyState>,
    pub(crate) indexed_vectors: BTreeMap<Namespace, VersionVector>,
    pub(crate) indexed_upto: usize,
    /// Per peer: how far it holds this node's feed. Written with the index, which a
    /// machine crash may roll back to the last fsync.
    pub(crate) checkpoints: BTreeMap<NodeId, u64>,
    pub(crate) checkpoints_synced: BTreeMap<NodeId, u64>,
    /// Dots a peer's reconciliation said this node holds the effect of (their events
    /// superseded by state it received): part of the vectors with no event in the
    /// feed, as the store's base. Durable with the group that records them.
    pub(crate) covered: BTreeMap<Namespace, VersionVector>,
    pub(crate) covered_synced: BTreeMap<Namespace, VersionVector>,
    pub(crate) item_key: ItemKey,
    /// Per namespace, the highest counter this node issued in this life, and the
    /// durable mark (`fsync = never` only) below which it may have issued any: after a
    /// crash it counts on from the mark, never reusing a counter peers may hold (the
    /// store's `counters` file).
    pub(crate) issued: BTreeMap<Namespace, u64>,
    pub(crate) marks: BTreeMap<Namespace, u64>,
    /// Feed positions (0-based) whose records compaction removed: superseded events
    /// and collected deletes. Their dots are in `covered` (the store's base), their
    /// positions read as gaps. Compaction syncs, so this survives any crash.
    pub(crate) compacted: BTreeSet<usize>,
    /// Per state key, the feed positions of its events still in the feed, in order:
    /// what compaction looks through (derived, as the store's index is).
    pub(crate) positions: BTreeMap<(Namespace, Key), Vec<usize>>,
    /// Collected deletes that left an epitaph (a node was away past the horizon): the
    /// key's entry stays, as a delete with no record behind it. In the index, so
    /// durable with the sync that records them.
    pub(crate) epitaphs: BTreeMap<(Namespace, Key), Version>,
    pub(crate) epitaphs_synced: BTreeMap<(Namespace, Key), Version>,
    /// Events received but parked (their clock too far ahead of this node's): as
    /// the store's held events, acknowledged, durable, in neither the vector nor the
    /// feed (so not relayed), released once the wall clock catches up. `held_log` is
    /// the file: it has no removal records, so on open what the vector holds goes.
    pub(crate) held: BTreeMap<(Namespace, Dot), Event>,
    pub(crate) held_log: BTreeMap<(Namespace, Dot), Event>,
    /// For the checker: per key, the deletes this node collected (or turned into
    /// epitaphs). Collection is synced, so this survives any crash.
    pub(crate) collected_here: BTreeMap<(Namespace, Key), Vec<(Dot, Hlc)>>,
    /// What this node knows of the others' vectors (the real `asp_core::gc` rule):
    /// memory only, as in the store.
    pub(crate) gc: Gc,
}

/// Merges an event into key states: it takes its key (or its origin's entry of a CRDT
/// key) if it wins there.
fn merge(states: &mut BTreeMap<(Namespace, Key), KeyState>, event: &Event) {
    let value = match &event.op {
        Op::Put { value, .. } => Some(value.clone()),
        Op::Delete => None,
    };
    let version = event.version();
    let key = StoreModel::state_key(event);
    match states.get(&key) {
        Some((current, _)) if !lww_wins(&version, current) => {}
        _ => {
            states.insert(key, (version, value));
        }
    }
}

/// A simulator namespace's conflict policy, by its first letter: `n` last-writer-wins,
/// `c` counter, `s` add-wins set, `v` siblings, `j` JSON map.
pub(crate) fn policy_of(namespace: &Namespace) -> Policy {
    match namespace.as_str().as_bytes()[0] {
        b'c' => Policy::Counter,
        b's' => Policy::Set,
        b'v' => Policy::Siblings,
        b'j' => Policy::JsonMap,
        _ => Policy::Lww,
    }
}

impl StoreModel {
    /// Where an event's state lives: its key, or for an event of a CRDT policy its
    /// origin's entry of the key (the store's `key ‖ 0xFF ‖ origin`; here `key#origin`,
    /// which no key of the simulator's looks like). Each entry holds its origin's
    /// latest view and merges by last-writer-wins like any key.
    pub(crate) fn state_key(event: &Event) -> (Namespace, Key) {
        let key = if event.context.is_empty() {
            event.key.clone()
        } else {
            Key::new(&format!("{}#{}", event.key, event.dot.origin)).expect("a valid key")
        };
        (event.namespace.clone(), key)
    }

    /// A CRDT key's state as a read joins it: every origin's latest view, from
    /// `empty` (the policy's empty state).
    pub(crate) fn joined(&self, namespace: &Namespace, key: &Key, empty: State) -> State {
        let prefix = format!("{key}#");
        let mut joined = empty;
        let first = (namespace.clone(), Key::new(&prefix).expect("a valid key"));
        for ((ns, entry), (_, value)) in self.state.range(first..) {
            if ns != namespace || !entry.as_str().starts_with(&prefix) {
                break;
            }
            if let Some(value) = value
                && let Ok(view) = State::decode(value)
            {
                joined.join(&view).expect("one policy per namespace");
            }
        }
        joined
    }

    /// A set key's members as a read joins them.
    pub(crate) fn set(&self, namespace: &Namespace, key: &Key) -> OrSet {
        match self.joined(namespace, key, State::Set(OrSet::default())) {
            State::Set(set) => set,
            _ => unreachable!("a set namespace"),
        }
    }

    /// A counter key's value as a read joins it.
    pub(crate) fn counter(&self, namespace: &Namespace, key: &Key) -> PnCounter {
        match self.joined(namespace, key, State::Counter(PnCounter::default())) {
            State::Counter(counter) => counter,
            _ => unreachable!("a counter namespace"),
        }
    }

    /// A siblings key's values as a read joins them.
    pub(crate) fn siblings(&self, namespace: &Namespace, key: &Key) -> MvRegister {
        match self.joined(namespace, key, State::Siblings(MvRegister::default())) {
            State::Siblings(register) => register,
            _ => unreachable!("a siblings namespace"),
        }
    }

    /// A JSON-map key's fields as a read joins them.
    pub(crate) fn json_map(&self, namespace: &Namespace, key: &Key) -> JsonMap {
        match self.joined(namespace, key, State::JsonMap(JsonMap::default())) {
            State::JsonMap(map) => map,
            _ => unreachable!("a JSON-map namespace"),
        }
    }

    pub(crate) fn new() -> Self {
        StoreModel {
            feed: Vec::new(),
            durable: 0,
            visible: 0,
            vectors: BTreeMap::new(),
            max_hlc: BTreeMap::new(),
            state: BTreeMap::new(),
            indexed: BTreeMap::new(),
            indexed_vectors: BTreeMap::new(),
            indexed_upto: 0,
            checkpoints: BTreeMap::new(),
            checkpoints_synced: BTreeMap::new(),
            covered: BTreeMap::new(),
            covered_synced: BTreeMap::new(),
            item_key: ItemKey::derive(b"asp-sim"),
            issued: BTreeMap::new(),
            marks: BTreeMap::new(),
            compacted: BTreeSet::new(),
            held: BTreeMap::new(),
            held_log: BTreeMap::new(),
            collected_here: BTreeMap::new(),
            positions: BTreeMap::new(),
            epitaphs: BTreeMap::new(),
            epitaphs_synced: BTreeMap::new(),
            gc: Gc::new(0),
        }
    }

    /// Issues `count` counters for this node's events in `namespace`; returns the
    /// first. Under `fsync = never` they are reserved first: the mark is raised (and
    /// durable) a block beyond them.
    pub(crate) fn issue(
        &mut self,
        namespace: &Namespace,
        id: NodeId,
        count: u64,
        reserve: bool,
    ) -> u64 {
        let held = self.vectors.get(namespace).map_or(0, |v| v.max_counter(id));
        let issued = self.issued.entry(namespace.clone()).or_insert(0);
        let first = (*issued).max(held) + 1;
        *issued = first + count - 1;
        if reserve {
            let mark = self.marks.entry(namespace.clone()).or_insert(0);
            if *mark < first + count - 1 {
                *mark = first + count - 1 + COUNTER_BLOCK;
            }
        }
        first
    }

    /// Records a peer's word that the dots of `vector` are superseded by state held.
    pub(crate) fn cover(
        &mut self,
        namespace: &Namespace,
        vector: &VersionVector,
        claim_held: bool,
    ) {
        // Never a held dot: the peer holds the event, this node does not yet, and a
        // vector claiming it would make the event a duplicate when released.
        let mut held = VersionVector::new();
        for (ns, dot) in self.held.keys() {
            if ns == namespace {
                held.insert(*dot);
            }
        }
        let vector = &if claim_held {
            vector.clone()
        } else {
            vector.difference(&held)
        };
        self.covered
            .entry(namespace.clone())
            .or_default()
            .join(vector);
        self.vectors
            .entry(namespace.clone())
            .or_default()
            .join(vector);
    }

    /// The reconciliation items of a namespace's keys at their current versions.
    pub(crate) fn items(&self, namespace: &Namespace) -> Vec<Item> {
        self.indexed
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|((_, key), (version, _))| self.item_key.item(key.as_str().as_bytes(), version))
            .collect()
    }

    /// A namespace's digest: the first coded symbol of its items, as the store keeps it.
    pub(crate) fn digest(&self, namespace: &Namespace) -> asp_core::reconcile::Symbol {
        let mut window = Window::new(self.item_key, 1);
        window.add_all(&self.items(namespace));
        window.symbols()[0].canonical()
    }

    /// The event a key's state came from: its record in the feed, or for an epitaph
    /// the delete made again from the entry (as the store's `entry_event`).
    pub(crate) fn event_of(
        &self,
        namespace: &Namespace,
        key: &Key,
        version: &Version,
    ) -> Option<Event> {
        if self
            .epitaphs
            .get(&(namespace.clone(), key.clone()))
            .is_some_and(|v| v == version)
        {
            return Some(Event {
                namespace: namespace.clone(),
                key: key.clone(),
                op: Op::Delete,
                dot: version.dot,
                hlc: version.hlc,
                context: Bytes::new(),
                epoch: 0,
                expires_ms: 0,
            });
        }
        self.feed
            .iter()
            .enumerate()
            .rev()
            .find(|(i, e)| {
                e.dot == version.dot && &e.namespace == namespace && !self.compacted.contains(i)
            })
            .map(|(_, e)| e.clone())
    }

    /// The events of `feed[first..last]` still in the feed (compaction leaves gaps).
    pub(crate) fn live(&self, first: usize, last: usize) -> impl Iterator<Item = &Event> {
        (first..last)
            .filter(|i| !self.compacted.contains(i))
            .map(|i| &self.feed[i])
    }

    pub(crate) fn holds(&self, dot: Dot, ns: &Namespace) -> bool {
        self.vectors.get(ns).is_some_and(|v| v.contains(dot))
    }

    /// Makes `feed[..upto]` visible to readers, and hands it to the index.
    pub(crate) fn publish(&mut self, upto: usize) {
        self.visible = self.visible.max(upto);
        for i in self.indexed_upto..self.visible {
            if self.compacted.contains(&i) {
                continue;
            }
            let event = &self.feed[i];
            self.indexed_vectors
                .entry(event.namespace.clone())
                .or_default()
                .insert(event.dot);
            merge(&mut self.indexed, event);
        }
        self.indexed_upto = self.indexed_upto.max(self.visible);
        for (ns, vector) in &self.covered {
            self.indexed_vectors
                .entry(ns.clone())
                .or_default()
                .join(vector);
        }
    }

    /// Appends an event and merges it into its key. Returns its feed position.
    pub(crate) fn append(&mut self, event: Event) -> u64 {
        self.vectors
            .entry(event.namespace.clone())
            .or_default()
            .insert(event.dot);
        let max = self
            .max_hlc
            .entry(event.namespace.clone())
            .or_insert(Hlc::ZERO);
        *max = (*max).max(event.hlc);
        self.positions
            .entry(Self::state_key(&event))
            .or_default()
            .push(self.feed.len());
        merge(&mut self.state, &event);
        self.feed.push(event);
        self.feed.len() as u64
    }

    /// What survives a crash, then a replay of the log.
    pub(crate) fn crash(&mut self, machine: bool) {
        if machine {
            self.feed.truncate(self.durable);
            self.checkpoints = self.checkpoints_synced.clone();
            self.covered = self.covered_synced.clone();
            self.epitaphs = self.epitaphs_synced.clone();
        }
        let len = self.feed.len();
        self.compacted.retain(|&i| i < len);
        // Counting goes on after the mark (no mark: after what the feed holds).
        self.issued = self.marks.clone();
        self.durable = self.feed.len();
        self.visible = self.feed.len();
        let feed = std::mem::take(&mut self.feed);
        self.vectors.clear();
        self.max_hlc.clear();
        self.state.clear();
        self.positions.clear();
        for (i, event) in feed.into_iter().enumerate() {
            if self.compacted.contains(&i) {
                self.feed.push(event);
            } else {
                self.append(event);
            }
        }
        for (ns, vector) in &self.covered {
            self.vectors.entry(ns.clone()).or_default().join(vector);
        }
        // Epitaphs live in the index: each is put back over what the log gives its key
        // when newer (the store's rebuild does the same).
        for ((ns, key), version) in &self.epitaphs {
            let entry = self.state.entry((ns.clone(), key.clone()));
            match entry {
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    if lww_wins(version, &o.get().0) {
                        o.insert((*version, None));
                    }
                }
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert((*version, None));
                }
            }
        }
        let head = self.feed.len() as u64;
        for seq in self.checkpoints.values_mut() {
            *seq = (*seq).min(head);
        }
        self.indexed = self.state.clone();
        self.indexed_vectors = self.vectors.clone();
        self.indexed_upto = self.feed.len();
        // Held events come back from their file, but those the vector holds.
        let vectors = &self.vectors;
        self.held_log
            .retain(|(ns, dot), _| !vectors.get(ns).is_some_and(|v| v.contains(*dot)));
        self.held = self.held_log.clone();
    }

    /// Whether `dot` is held (parked) here.
    pub(crate) fn is_held(&self, dot: Dot, ns: &Namespace) -> bool {
        self.held.contains_key(&(ns.clone(), dot))
    }

    /// [`StoreModel::summary`] with the reports tombstone collection gossips (as the
    /// store's `summary_for_peers`): this node's own first, then what it knows of every
    /// other node that may write.
    pub(crate) fn summary_for_peers(&self, me: NodeId, wall_ms: u64) -> Vec<NamespaceSummary> {
        let peers: Vec<NodeId> = self.checkpoints.keys().copied().collect();
        let mut out = self.summary();
        for ns in &mut out {
            ns.reports.push(VectorReport {
                node: me,
                at_ms: wall_ms,
                vector: ns.vector.clone(),
            });
            ns.reports
                .extend(self.gc.gossip(&ns.namespace, me, &ns.vector, &peers));
        }
        out
    }

    /// Takes in a peer's summary: it was heard of now, and the reports it carries.
    pub(crate) fn note_summary(
        &mut self,
        me: NodeId,
        peer: NodeId,
        wall_ms: u64,
        summary: &[NamespaceSummary],
    ) {
        self.gc.note_contact(
            peer,
            wall_ms,
            &[asp_core::session::ALL_NAMESPACES.to_owned()],
            None,
        );
        let none = VersionVector::new();
        for ns in summary {
            let own = self.indexed_vectors.get(&ns.namespace).unwrap_or(&none);
            for report in &ns.reports {
                self.gc.note(&ns.namespace, me, own, report.clone());
            }
        }
    }

    pub(crate) fn summary(&self) -> Vec<NamespaceSummary> {
        self.indexed_vectors
            .iter()
            .map(|(ns, vector)| NamespaceSummary {
                namespace: ns.clone(),
                max_hlc: self.max_hlc.get(ns).copied().unwrap_or(Hlc::ZERO),
                vector: vector.clone(),
                digest: Some(self.digest(ns)),
                reports: Vec::new(),
            })
            .collect()
    }

    pub(crate) fn max_hlc_overall(&self) -> Hlc {
        self.feed.iter().map(|e| e.hlc).max().unwrap_or(Hlc::ZERO)
    }
}

/// The store model as reconciliation reaches it: reads straight from the model;
/// covered dots are collected and queued to the writer after the call, behind the
/// repairs queued before them (as the node's link drains them first).
pub(crate) struct ModelView<'a> {
    pub(crate) store: &'a StoreModel,
    pub(crate) covers: RefCell<Vec<(Namespace, VersionVector)>>,
}

impl<'a> ModelView<'a> {
    pub(crate) fn new(store: &'a StoreModel) -> Self {
        ModelView {
            store,
            covers: RefCell::new(Vec::new()),
        }
    }

    /// The keys of a namespace with their state, in key order.
    pub(crate) fn keys(
        &self,
        namespace: &Namespace,
    ) -> impl Iterator<Item = (&'a Key, &'a Version)> + 'a {
        let namespace = namespace.clone();
        self.store
            .indexed
            .iter()
            .filter(move |((ns, _), _)| *ns == namespace)
            .map(|((_, key), (version, _))| (key, version))
    }
}

impl ReconcileStore for ModelView<'_> {
    type Error = String;

    fn item_key(&self) -> ItemKey {
        self.store.item_key
    }

    fn keeps_windows(&self) -> bool {
        true
    }

    fn summary(&self) -> Vec<NamespaceSummary> {
        self.store.summary()
    }

    fn namespace_vector(&self, namespace: &Namespace) -> VersionVector {
        self.store
            .indexed_vectors
            .get(namespace)
            .cloned()
            .unwrap_or_default()
    }

    fn is_quarantined(&self, _: &Namespace) -> bool {
        false
    }

    fn head_seq(&self) -> u64 {
        self.store.visible as u64
    }

    fn bases(&self) -> Vec<(Namespace, VersionVector)> {
        self.store
            .covered
            .iter()
            .map(|(ns, v)| (ns.clone(), v.clone()))
            .collect()
    }

    fn holds_lost_events_of<'b>(
        &self,
        peer: NodeId,
        theirs: &dyn Fn(&Namespace) -> Option<&'b VersionVector>,
        shared: &dyn Fn(&Namespace) -> bool,
    ) -> bool {
        self.store.indexed_vectors.iter().any(|(ns, vector)| {
            let Some(mine) = vector.get(peer) else {
                return false;
            };
            shared(ns)
                && theirs(ns)
                    .and_then(|v| v.get(peer))
                    .is_none_or(|t| !mine.is_subset(t))
        })
    }

    fn window_snapshot(&self, namespace: &Namespace) -> Result<(Window, u64), String> {
        Ok((self.window(namespace)?, self.head_seq()))
    }

    fn window(&self, namespace: &Namespace) -> Result<Window, String> {
        Ok(Window::build(
            self.store.item_key,
            64,
            &self.store.items(namespace),
            1,
        ))
    }

    fn items_snapshot(&self, namespace: &Namespace) -> Result<(Vec<Item>, u64), String> {
        Ok((self.store.items(namespace), self.head_seq()))
    }

    fn items(&self, namespace: &Namespace) -> Result<Vec<Item>, String> {
        Ok(self.store.items(namespace))
    }

    fn events_for_items(
        &self,
        namespace: &Namespace,
        prefixes: &[[u8; NEED_PREFIX_BYTES]],
        keys_max: usize,
        _bytes_max: usize,
    ) -> Result<(Vec<Event>, bool), String> {
        let mut out = Vec::new();
        for (key, version) in self.keys(namespace) {
            let item = self.store.item_key.item(key.as_str().as_bytes(), version);
            if prefixes.iter().any(|p| item[..NEED_PREFIX_BYTES] == p[..]) {
                if out.len() == keys_max {
                    return Ok((out, true));
                }
                let event = self
                    .store
                    .event_of(namespace, key, version)
                    .ok_or_else(|| format!("key {key} has no event in the feed"))?;
                out.push(event);
            }
        }
        Ok((out, false))
    }

    fn state_page(
        &self,
        namespace: &Namespace,
        after: Option<&Key>,
        events_max: usize,
        bytes_max: usize,
    ) -> Result<(Vec<Event>, Option<Key>), String> {
        let mut out: Vec<Event> = Vec::new();
        let mut bytes = 0;
        let mut last: Option<&Key> = None;
        for (key, version) in self.keys(namespace) {
            if after.is_some_and(|a| key <= a) {
                continue;
            }
            if !out.is_empty() && (out.len() >= events_max || bytes >= bytes_max as u64) {
                // Continue after the state's key (a CRDT key's entry), not the event's.
                return Ok((out, last.cloned()));
            }
            last = Some(key);
            let event = self
                .store
                .event_of(namespace, key, version)
                .ok_or_else(|| format!("key {key} has no event in the feed"))?;
            bytes += credit_size(&event);
            out.push(event);
        }
        Ok((out, None))
    }

    fn cover(&self, namespace: &Namespace, vector: VersionVector) -> Result<(), String> {
        self.covers.borrow_mut().push((namespace.clone(), vector));
        Ok(())
    }
}
