//! The checker: a change-feed subscriber on each node, and the invariants checked as
//! the run goes and at the end (vectors against plain sets of dots, the reference
//! last-writer-wins, bounds, convergence).

use super::*;
use asp_core::crdt::{Change, Shown};

/// The reference order of writes: the newest clock reading, then the larger origin,
/// then the larger counter. Written out here, apart from `lww_wins` and `Version`'s
/// order, so that a bug there cannot hide itself.
pub(crate) fn rank(hlc: Hlc, dot: Dot) -> (u64, u16, u64, u64) {
    (
        hlc.physical_ms(),
        hlc.logical(),
        dot.origin.get(),
        dot.counter,
    )
}

/// Whether two nodes' key states read the same: equal entries, where a delete
/// (a tombstone or an epitaph) and no entry at all count as equal. Two nodes collect a
/// delete at different times, and one that sees a node away past the horizon (a clock
/// behind by more than the horizon is enough) keeps an epitaph that another collected
/// outright; both read the key as deleted, and no write older than the delete can
/// reach either (the `Resurrection` check).
///
/// Keys of the set, siblings and JSON-map namespaces compare by what a read of the
/// whole key shows (the join of its entries): one node may have collected an emptied
/// key (every entry gone) that another still holds, or hold only the entries written
/// since, and both read the same.
pub(crate) fn same_reads(
    a: &BTreeMap<(Namespace, Key), KeyState>,
    b: &BTreeMap<(Namespace, Key), KeyState>,
) -> bool {
    if a == b {
        return true;
    }
    let collectable = |ns: &Namespace| {
        matches!(
            policy_of(ns),
            Policy::Set | Policy::Siblings | Policy::JsonMap
        )
    };
    let split = |m: &BTreeMap<(Namespace, Key), KeyState>| {
        let mut plain = BTreeMap::new();
        let mut crdt: BTreeMap<(Namespace, String), BTreeMap<Key, KeyState>> = BTreeMap::new();
        for ((ns, entry), state) in m {
            match entry.as_str().rsplit_once('#') {
                Some((key, _)) if collectable(ns) => {
                    crdt.entry((ns.clone(), key.to_owned()))
                        .or_default()
                        .insert(entry.clone(), state.clone());
                }
                _ => {
                    plain.insert((ns.clone(), entry.clone()), state.clone());
                }
            }
        }
        (plain, crdt)
    };
    let ((plain_a, crdt_a), (plain_b, crdt_b)) = (split(a), split(b));
    if !same_plain_reads(&plain_a, &plain_b) {
        return false;
    }
    let keys: BTreeSet<&(Namespace, String)> = crdt_a.keys().chain(crdt_b.keys()).collect();
    keys.into_iter().all(|k| {
        let (x, y) = (crdt_a.get(k), crdt_b.get(k));
        x == y || crdt_read(&k.0, x) == crdt_read(&k.0, y)
    })
}

/// What a read of a CRDT key shows, from its entries (none: an empty state).
fn crdt_read(namespace: &Namespace, entries: Option<&BTreeMap<Key, KeyState>>) -> String {
    let mut state = State::empty(policy_of(namespace)).expect("a CRDT policy");
    for (_, value) in entries.into_iter().flat_map(|e| e.values()) {
        if let Some(value) = value
            && let Ok(view) = State::decode(value)
        {
            state.join(&view).expect("one policy per namespace");
        }
    }
    match &state {
        State::Set(s) => format!("{:?}", s.members().collect::<Vec<_>>()),
        State::Siblings(r) => format!("{:?}", r.siblings()),
        State::JsonMap(m) => format!("{:?}", m.shown().collect::<Vec<_>>()),
        State::Counter(c) => format!("{}", c.value()),
    }
}

/// [`same_reads`] of the keys of the `lww` and counter namespaces.
fn same_plain_reads(
    a: &BTreeMap<(Namespace, Key), KeyState>,
    b: &BTreeMap<(Namespace, Key), KeyState>,
) -> bool {
    if a == b {
        return true;
    }
    // Both in key order: walk them side by side.
    let (mut a, mut b) = (a.iter().peekable(), b.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return true,
            (Some((_, x)), None) => {
                if x.1.is_some() {
                    return false;
                }
                a.next();
            }
            (None, Some((_, y))) => {
                if y.1.is_some() {
                    return false;
                }
                b.next();
            }
            (Some((ka, x)), Some((kb, y))) => match ka.cmp(kb) {
                std::cmp::Ordering::Equal => {
                    if x != y {
                        return false;
                    }
                    a.next();
                    b.next();
                }
                std::cmp::Ordering::Less => {
                    if x.1.is_some() {
                        return false;
                    }
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    if y.1.is_some() {
                        return false;
                    }
                    b.next();
                }
            },
        }
    }
}

pub(crate) fn same_entry(a: Option<&KeyState>, b: Option<&KeyState>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b,
        (Some((_, value)), None) | (None, Some((_, value))) => value.is_none(),
        (None, None) => true,
    }
}

/// Per key, the client operations whose events some node holds at the end, each once
/// (by dot), with their events, in the order the feeds hold them: what the CRDT checks
/// count (`ops` is the checker's record of one kind of operation, by dot).
fn surviving<'a, T>(
    nodes: &'a [Node],
    ops: &'a BTreeMap<(Namespace, Dot), T>,
) -> BTreeMap<(&'a Namespace, &'a Key), Vec<(&'a Event, &'a T)>> {
    let mut out: BTreeMap<(&Namespace, &Key), Vec<(&Event, &T)>> = BTreeMap::new();
    let mut once = BTreeSet::new();
    for e in nodes.iter().flat_map(|n| &n.store.feed) {
        if let Some(op) = ops.get(&(e.namespace.clone(), e.dot))
            && once.insert((&e.namespace, e.dot))
        {
            out.entry((&e.namespace, &e.key)).or_default().push((e, op));
        }
    }
    out
}

impl Sim {
    /// Every delete some node collected (or turned into an epitaph), by key.
    pub(crate) fn collected(&self) -> BTreeMap<&(Namespace, Key), Vec<(Dot, Hlc)>> {
        let mut out: BTreeMap<&(Namespace, Key), Vec<(Dot, Hlc)>> = BTreeMap::new();
        for n in &self.nodes {
            for (k, deletes) in &n.store.collected_here {
                out.entry(k).or_default().extend(deletes.iter().copied());
            }
        }
        out
    }

    pub(crate) fn subscribe(&mut self, node: usize, full: bool) -> Result<(), Broken> {
        let n = &mut self.nodes[node];
        if !n.up {
            return Ok(());
        }
        // Whatever was delivered at a position must still be there, unchanged.
        if n.seen.len() > n.store.feed.len() {
            return Err(Broken::new(
                Invariant::FeedChanged,
                format!(
                    "node {node}'s feed lost positions a subscriber was given: it saw {} events, the feed now holds {}",
                    n.seen.len(),
                    n.store.feed.len()
                ),
            ));
        }
        // Positions change only in a crash: a full check after each restart, the newest
        // position otherwise. Compaction may empty a position (a gap), never refill it.
        let from = if full {
            0
        } else {
            n.seen.len().saturating_sub(1)
        };
        for (i, dot) in n.seen.iter().enumerate().skip(from) {
            if n.store.feed[i].dot != *dot && !n.store.compacted.contains(&i) {
                return Err(Broken::new(
                    Invariant::FeedChanged,
                    format!(
                        "node {node}'s feed position {} changed after a subscriber read it: {} then {}",
                        i + 1,
                        dot,
                        n.store.feed[i].dot
                    ),
                ));
            }
        }
        self.subscriber_reads(node);
        Ok(())
    }

    /// A subscriber is woken as events become visible and reads them at once.
    pub(crate) fn subscriber_reads(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        for i in n.seen.len()..n.store.visible {
            n.seen.push(n.store.feed[i].dot);
        }
    }

    /// A version vector must be exactly the dots of the feed and those a peer's
    /// reconciliation covered.
    pub(crate) fn check_vectors(&mut self) -> Result<(), Broken> {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            // A crash may have cut the feed: derive again from the start.
            if n.derived_upto > n.store.feed.len() {
                n.derived.clear();
                n.derived_upto = 0;
            }
            for e in &n.store.feed[n.derived_upto..] {
                n.derived
                    .entry(e.namespace.clone())
                    .or_default()
                    .insert(e.dot);
            }
            n.derived_upto = n.store.feed.len();
            let empty = BTreeSet::new();
            for (ns, vv) in &n.store.vectors {
                let mut held = std::borrow::Cow::Borrowed(n.derived.get(ns).unwrap_or(&empty));
                if let Some(covered) = n.store.covered.get(ns) {
                    let held = held.to_mut();
                    for (origin, counters) in covered.iter() {
                        held.extend(counters.iter().map(|counter| Dot { origin, counter }));
                    }
                }
                if let Some(dot) = held.iter().find(|d| !vv.contains(**d)) {
                    return Err(Broken::new(
                        Invariant::VectorMismatch,
                        format!(
                            "node {i}'s vector for {ns} misses dot {dot} its feed (or a cover) holds"
                        ),
                    ));
                }
                if vv.len() != held.len() as u64 {
                    return Err(Broken::new(
                        Invariant::VectorMismatch,
                        format!(
                            "node {i}'s vector for {ns} claims {} dots; its feed holds {}",
                            vv.len(),
                            held.len()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Each key's state is the write a reference last-writer-wins picks from every
    /// event of the key any node holds: the newest clock reading, then the larger
    /// origin, then the larger counter. Written out here, apart from `lww_wins` and
    /// `Version`'s order, so that a bug there cannot hide itself.
    pub(crate) fn check_winners(&self) -> Result<(), Broken> {
        let rank = |e: &Event| rank(e.hlc, e.dot);
        let store = &self.nodes[0].store;
        let collected = self.collected();
        // Per key, or per origin's entry of a counter's key.
        let mut winners: BTreeMap<(Namespace, Key), &Event> = BTreeMap::new();
        for e in self.nodes.iter().flat_map(|n| &n.store.feed) {
            let w = winners.entry(StoreModel::state_key(e)).or_insert(e);
            if rank(e) > rank(w) {
                *w = e;
            }
        }
        for ((ns, key), w) in winners {
            let entry = store.state.get(&(ns.clone(), key.clone()));
            let held = entry.map(|(v, _)| v.dot);
            // A delete that won may have been collected: the key has no entry, or an
            // older delete that reached this node after the collection (a node that
            // collected cannot tell it from any older event, and reconciliation may
            // leave it where it went); either reads as deleted.
            // So may a CRDT key's entry, with every other entry of its key, once the
            // key held nothing.
            let collected = (matches!(w.op, Op::Delete) || !w.context.is_empty())
                && collected
                    .get(&(ns.clone(), key.clone()))
                    .is_some_and(|d| d.iter().any(|(dot, _)| *dot == w.dot));
            let reads_deleted = entry.is_none_or(|(_, value)| value.is_none());
            if held != Some(w.dot) && !(reads_deleted && collected) {
                return Err(Broken::new(
                    Invariant::WrongWinner,
                    format!(
                        "key {key} of {ns} holds {}; last-writer-wins picks {} at {}{}",
                        entry.map_or("nothing".to_owned(), |(v, value)| format!(
                            "{} at {}{}",
                            v.dot,
                            v.hlc,
                            if value.is_none() { " (a delete)" } else { "" }
                        )),
                        w.dot,
                        w.hlc,
                        if matches!(w.op, Op::Delete) {
                            " (a delete)"
                        } else {
                            ""
                        }
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Each counter is the sum of the increments whose events some node holds at the
    /// end (under `fsync = always` every acknowledged one is among them). Under `fsync
    /// = never` a node that lost its latest view of a key in a machine crash and
    /// counts on from an older one masks what it lost (a known gap of the store's
    /// CRDT writes, see bench/RESULTS.md): only the nodes' agreement is checked there.
    pub(crate) fn check_counters(&self) -> Result<(), Broken> {
        if self.config.durability != Durability::Always {
            return Ok(());
        }
        let store = &self.nodes[0].store;
        for ((ns, key), increments) in surviving(&self.nodes, &self.increments) {
            let sum: i128 = increments.iter().map(|(_, a)| **a as i128).sum();
            let counter = store.counter(ns, key);
            let value = counter.value();
            if value != sum {
                // Per origin, the increments and decrements the reference counts.
                let mut by_origin: BTreeMap<NodeId, (i64, i64, Vec<Dot>)> = BTreeMap::new();
                for &(e, &amount) in &increments {
                    let o = by_origin.entry(e.dot.origin).or_default();
                    if amount >= 0 {
                        o.0 += amount;
                    } else {
                        o.1 -= amount;
                    }
                    o.2.push(e.dot);
                }
                return Err(Broken::new(
                    Invariant::CounterSum,
                    format!(
                        "counter {key} of {ns} reads {value} ({counter:?}); its increments add up to {sum} (per origin, increments, decrements and dots: {by_origin:?})"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Each set holds exactly the members with an add that no remove observed (add
    /// wins over a concurrent remove), over the events some node holds at the end;
    /// under `fsync = always` only, for the reason counters are.
    pub(crate) fn check_sets(&self) -> Result<(), Broken> {
        if self.config.durability != Durability::Always {
            return Ok(());
        }
        let store = &self.nodes[0].store;
        for ((ns, key), ops) in surviving(&self.nodes, &self.set_ops) {
            let ops: Vec<(Dot, &SetOp)> = ops.into_iter().map(|(e, op)| (e.dot, op)).collect();
            let members: BTreeSet<&Bytes> = ops.iter().map(|(_, op)| &op.member).collect();
            let set = store.set(ns, key);
            for member in members {
                let observed: BTreeSet<Dot> = ops
                    .iter()
                    .filter(|(_, op)| !op.add && op.member == *member)
                    .flat_map(|(_, op)| op.seen.iter().copied())
                    .collect();
                let expected = ops
                    .iter()
                    .any(|(dot, op)| op.add && op.member == *member && !observed.contains(dot));
                if set.contains(member) != expected {
                    return Err(Broken::new(
                        Invariant::AddWins,
                        format!(
                            "set {key} of {ns} {} {}; its adds and removes say it should {}",
                            if expected { "lacks" } else { "holds" },
                            String::from_utf8_lossy(member),
                            if expected { "hold it" } else { "not" }
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// At the end, no node that holds a collected delete reads its key at an older
    /// write. (During the run a node may: a peer's cover can claim the delete's dot
    /// while the event that superseded it waits parked here, and a cover from this
    /// node passes the claim on with the older state; the parked event's release
    /// settles it. The strict rule during the run is checked where events are applied:
    /// a node that collected a delete never takes an older write for its key.)
    pub(crate) fn check_resurrection(&self) -> Result<(), Broken> {
        for (k, deletes) in self.collected() {
            let (ns, key) = k;
            for (i, n) in self.nodes.iter().enumerate() {
                let Some((version, Some(_))) = n.store.state.get(k) else {
                    continue;
                };
                let read = rank(version.hlc, version.dot);
                if let Some((dot, hlc)) = deletes
                    .iter()
                    .find(|(dot, hlc)| read < rank(*hlc, *dot) && n.store.holds(*dot, ns))
                {
                    return Err(Broken::new(
                        Invariant::Resurrection,
                        format!(
                            "node {i} reads {key} of {ns} at {} ({}), older than the delete {dot} ({hlc}) it holds and some node collected",
                            version.dot, version.hlc
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Each siblings key holds exactly the values written by writes no other write had
    /// seen (a write replaces what its node had seen of the key, a delete replaces it
    /// with nothing), over the events some node holds at the end; under `fsync =
    /// always` only, for the reason counters are.
    pub(crate) fn check_siblings(&self) -> Result<(), Broken> {
        if self.config.durability != Durability::Always {
            return Ok(());
        }
        let store = &self.nodes[0].store;
        for ((ns, key), ops) in surviving(&self.nodes, &self.sibling_ops) {
            let ops: Vec<(Dot, &SiblingOp)> = ops.into_iter().map(|(e, op)| (e.dot, op)).collect();
            let expected: BTreeSet<(Dot, &Bytes)> = ops
                .iter()
                .filter(|(dot, _)| {
                    !ops.iter()
                        .any(|(other, o)| other != dot && o.seen.contains(dot))
                })
                .filter_map(|(dot, op)| op.value.as_ref().map(|v| (*dot, v)))
                .collect();
            let register = store.siblings(ns, key);
            let held: BTreeSet<(Dot, &Bytes)> = register
                .siblings()
                .into_iter()
                .map(|(dot, sibling)| (dot, &sibling.value))
                .collect();
            if held != expected {
                let show = |s: &BTreeSet<(Dot, &Bytes)>| {
                    s.iter()
                        .map(|(d, v)| format!("{d}={}", String::from_utf8_lossy(v)))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                return Err(Broken::new(
                    Invariant::Siblings,
                    format!(
                        "siblings key {key} of {ns} holds [{}]; the writes no other write saw are [{}]",
                        show(&held),
                        show(&expected)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Each JSON-map key's document is what applying every patch in the reference
    /// order leaves, one after the other, as a JSON merge patch applies (a plain tree
    /// here, apart from the per-path registers the nodes join), over the events some
    /// node holds at the end; under `fsync = always` only, for the reason counters are.
    /// Each json-map key reads as its patches say (docs/CONFLICTS.md, "json-map"),
    /// judged from the reference's own account of what each patch's node had seen:
    /// at one path the latest write wins; a write is taken by a value or a removal
    /// at an ancestor path from a patch that had seen it; a path shows as an object
    /// when a write below it that is not taken holds a value or an object, else as
    /// its latest write if that is not taken and not a removal.
    pub(crate) fn check_json_maps(&self) -> Result<(), Broken> {
        if self.config.durability != Durability::Always {
            return Ok(());
        }
        let store = &self.nodes[0].store;
        for ((ns, key), patches) in surviving(&self.nodes, &self.field_ops) {
            // Per path, every write to it: (rank, dot, change, what its patch saw).
            type Write<'a> = ((u64, u16, u64, u64), Dot, Change, &'a BTreeSet<Dot>);
            let mut writes: BTreeMap<Vec<String>, Vec<Write<'_>>> = BTreeMap::new();
            for (e, op) in &patches {
                // A patch's own writes: its changes, and an object at each ancestor of
                // a changed path that the patch does not change itself.
                let mut own: BTreeMap<Vec<String>, Change> = BTreeMap::new();
                for (path, change) in &op.changes {
                    for depth in 1..path.len() {
                        own.entry(path[..depth].to_vec()).or_insert(Change::Object);
                    }
                    own.insert(path.clone(), change.clone());
                }
                for (path, change) in own {
                    let write = (rank(e.hlc, e.dot), e.dot, change, &op.seen);
                    writes.entry(path).or_default().push(write);
                }
            }
            let taken = |path: &[String], dot: Dot| {
                (1..path.len()).any(|depth| {
                    writes[&path[..depth]].iter().any(|(_, by, change, seen)| {
                        *by != dot && !matches!(change, Change::Object) && seen.contains(&dot)
                    })
                })
            };
            // The latest write of each path, if not taken.
            let live: BTreeMap<&[String], &Change> = writes
                .iter()
                .filter_map(|(path, ws)| {
                    let (_, dot, change, _) = ws.iter().max_by_key(|w| w.0).expect("a write");
                    (!taken(path, *dot)).then_some((path.as_slice(), change))
                })
                .collect();
            let mut expected = Tree::new();
            for path in writes.keys() {
                let below = live.iter().any(|(q, change)| {
                    q.len() > path.len() && q.starts_with(path) && !matches!(change, Change::Remove)
                });
                let shown = if below {
                    Change::Object
                } else {
                    match live.get(path.as_slice()) {
                        Some(Change::Remove) | None => continue,
                        Some(change) => (*change).clone(),
                    }
                };
                apply_change(&mut expected, path, &shown);
            }
            let map = store.json_map(ns, key);
            let mut held = Tree::new();
            let mut objects: BTreeSet<&[String]> = BTreeSet::new();
            for (path, shown) in map.shown() {
                // A read builds the document parents first (as the HTTP layer does):
                // a shown path under a parent not shown as an object is lost there.
                if path.len() > 1 && !objects.contains(&path[..path.len() - 1]) {
                    return Err(Broken::new(
                        Invariant::JsonFields,
                        format!(
                            "JSON-map key {key} of {ns} shows {path:?} but not its parent as an object"
                        ),
                    ));
                }
                if shown == Shown::Object {
                    objects.insert(path);
                }
                let change = match shown {
                    Shown::Value(text) => Change::Set(text.clone()),
                    Shown::Object => Change::Object,
                };
                apply_change(&mut held, path, &change);
            }
            if held != expected {
                return Err(Broken::new(
                    Invariant::JsonFields,
                    format!(
                        "JSON-map key {key} of {ns} holds {held:?}; its patches say {expected:?}"
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn check_bounds(&self) -> Result<(), Broken> {
        for (i, n) in self.nodes.iter().enumerate() {
            let local = n
                .queue
                .iter()
                .filter(|r| matches!(r, Request::Local { .. }))
                .count();
            if local > WRITE_QUEUE_MAX {
                return Err(Broken::new(
                    Invariant::Bounds,
                    format!(
                        "node {i}'s write queue holds {local} client requests; the bound is {WRITE_QUEUE_MAX}"
                    ),
                ));
            }
            // Per connection (a closed one's batches stay queued and are applied; its
            // successor has credit of its own): credit bounds what each may queue.
            // (The store's `write_queue_bytes_max` bounds the whole queue; not
            // modelled.)
            let mut remote: BTreeMap<u64, u64> = BTreeMap::new();
            for r in &n.queue {
                if let Request::Remote { conn, bytes, .. } | Request::Repair { conn, bytes, .. } = r
                {
                    *remote.entry(*conn).or_default() += *bytes;
                }
            }
            let bound = 2 * CREDIT_WINDOW as u64;
            if let Some((conn, bytes)) = remote.iter().find(|(_, b)| **b > bound) {
                return Err(Broken::new(
                    Invariant::Bounds,
                    format!(
                        "node {i} queued {bytes} bytes of peer events from connection {conn}; credit bounds it to {bound}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Every node up and idle, with the same dots (`and_states`: and the same key
    /// states). Equal dots with different states can be a passing moment (a crash
    /// took events whose dots a peer's cover still claims; anti-entropy repairs
    /// them), so the run waits for both and judges states only at the limit.
    pub(crate) fn converged(&self, and_states: bool) -> bool {
        let first = &self.nodes[0];
        self.nodes
            .iter()
            .all(|n| n.up && !n.busy && n.queue.is_empty() && n.store.held.is_empty())
            && self.nodes.iter().all(|n| {
                n.store.vectors == first.store.vectors
                    && n.store.visible == n.store.feed.len()
                    && (!and_states || same_reads(&n.store.state, &first.store.state))
            })
    }

    pub(crate) fn final_checks(&mut self) -> Result<(), Broken> {
        self.check_vectors()?;
        let first = &self.nodes[0].store.state;
        for (i, n) in self.nodes.iter().enumerate() {
            if !same_reads(&n.store.state, first) {
                let show = |v: Option<&KeyState>| {
                    v.map_or("nothing".to_string(), |(version, value)| {
                        format!(
                            "{} at {}{}",
                            version.dot,
                            version.hlc,
                            if value.is_none() { " (deleted)" } else { "" }
                        )
                    })
                };
                let differ: Vec<String> = first
                    .keys()
                    .chain(n.store.state.keys())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .filter(|k| !same_entry(first.get(*k), n.store.state.get(*k)))
                    .take(3)
                    .map(|k| {
                        // Where each side holds the other's winning dot from: its
                        // feed, or only a peer's cover.
                        let whence = |store: &StoreModel, other: Option<&KeyState>| {
                            other.map_or(String::new(), |(v, _)| {
                                let in_feed = store
                                    .feed
                                    .iter()
                                    .any(|e| e.dot == v.dot && e.namespace == k.0);
                                let covered =
                                    store.covered.get(&k.0).is_some_and(|c| c.contains(v.dot));
                                format!(" (holds {}: in feed {in_feed}, covered {covered})", v.dot)
                            })
                        };
                        format!(
                            "{}/{}: node 0 {}{}, node {i} {}{}",
                            k.0,
                            k.1,
                            show(first.get(k)),
                            whence(&self.nodes[0].store, n.store.state.get(k)),
                            show(n.store.state.get(k)),
                            whence(&n.store, first.get(k)),
                        )
                    })
                    .collect();
                // What tombstone collection waits for on each side.
                let mut gc = Vec::new();
                for j in [0, i] {
                    let store = &self.nodes[j].store;
                    let me = self.nodes[j].id;
                    let peers: Vec<NodeId> = store.checkpoints.keys().copied().collect();
                    let wall = self.wall_ms(j);
                    let mut g = Gc::new(0);
                    std::mem::swap(&mut g, &mut self.nodes[j].store.gc);
                    for (ns, vector) in &self.nodes[j].store.vectors {
                        let view = g.view(ns, me, vector, &peers, wall, GC_HORIZON_MS);
                        gc.push(format!(
                            "node {j} {ns}: waiting for {:?}, away {:?}, stable {:?}",
                            view.waiting, view.away, view.stable
                        ));
                    }
                    std::mem::swap(&mut g, &mut self.nodes[j].store.gc);
                }
                return Err(Broken::new(
                    Invariant::Divergence,
                    format!(
                        "node {i} holds the same events as node 0 but a different state: {}; {}",
                        differ.join("; "),
                        gc.join("; ")
                    ),
                ));
            }
        }
        self.check_resurrection()?;
        self.check_winners()?;
        self.check_counters()?;
        self.check_sets()?;
        self.check_siblings()?;
        self.check_json_maps()?;
        // Every acknowledged write is held everywhere.
        let state = &self.nodes[0].store;
        for w in self.acked.iter().chain(&self.returning) {
            if !state.holds(w.dot, &w.namespace) {
                return Err(Broken::new(
                    Invariant::AckedWriteMissing,
                    format!(
                        "acknowledged write {} ({}) of node {} is held by no node after healing",
                        w.dot, w.namespace, w.origin
                    ),
                ));
            }
        }
        for i in 0..self.nodes.len() {
            self.subscribe(i, true)?;
        }
        Ok(())
    }
}

/// A JSON document as the JSON-map check builds it: each field a value or an object.
type Tree = BTreeMap<String, JsonNode>;

#[derive(Debug, PartialEq, Eq)]
enum JsonNode {
    Value(Bytes),
    Object(Tree),
}

/// One change of a merge patch, applied in place: its ancestors become objects (a
/// value or nothing there is replaced by `{}`), then the path is set, removed, or made
/// an object (kept if it is one).
fn apply_change(tree: &mut Tree, path: &[String], change: &Change) {
    let Some((name, parents)) = path.split_last() else {
        return;
    };
    let mut object = tree;
    for parent in parents {
        object = object_at(object, parent);
    }
    match change {
        Change::Set(text) => {
            object.insert(name.clone(), JsonNode::Value(text.clone()));
        }
        Change::Remove => {
            object.remove(name);
        }
        Change::Object => {
            object_at(object, name);
        }
    }
}

/// The object at `name` in `tree`, made one if it is not.
fn object_at<'a>(tree: &'a mut Tree, name: &str) -> &'a mut Tree {
    let node = tree
        .entry(name.to_owned())
        .or_insert_with(|| JsonNode::Object(Tree::new()));
    if let JsonNode::Value(_) = node {
        *node = JsonNode::Object(Tree::new());
    }
    match node {
        JsonNode::Object(o) => o,
        JsonNode::Value(_) => unreachable!("made an object above"),
    }
}
