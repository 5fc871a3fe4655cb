//! The checker: a change-feed subscriber on each node, and the invariants checked as
//! the run goes and at the end (vectors against plain sets of dots, the reference
//! last-writer-wins, bounds, convergence).

use super::*;
impl Sim {
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
        // position otherwise.
        let from = if full {
            0
        } else {
            n.seen.len().saturating_sub(1)
        };
        for (i, dot) in n.seen.iter().enumerate().skip(from) {
            if n.store.feed[i].dot != *dot {
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
        type Rank = (u64, u16, u64, u64);
        let rank = |e: &Event| -> Rank {
            (
                e.hlc.physical_ms(),
                e.hlc.logical(),
                e.dot.origin.get(),
                e.dot.counter,
            )
        };
        let store = &self.nodes[0].store;
        // Per key, or per origin's entry of a counter's key.
        let mut winners: BTreeMap<(Namespace, Key), &Event> = BTreeMap::new();
        for e in self.nodes.iter().flat_map(|n| &n.store.feed) {
            let w = winners.entry(StoreModel::state_key(e)).or_insert(e);
            if rank(e) > rank(w) {
                *w = e;
            }
        }
        for ((ns, key), w) in winners {
            let held = store
                .state
                .get(&(ns.clone(), key.clone()))
                .map(|(v, _)| v.dot);
            if held != Some(w.dot) {
                return Err(Broken::new(
                    Invariant::WrongWinner,
                    format!(
                        "key {key} of {ns} holds {}; last-writer-wins picks {}",
                        held.map_or("nothing".to_owned(), |d| d.to_string()),
                        w.dot
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
        let mut expected: BTreeMap<(&Namespace, &Key), i128> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for e in self.nodes.iter().flat_map(|n| &n.store.feed) {
            if let Some(amount) = self.increments.get(&(e.namespace.clone(), e.dot))
                && seen.insert((&e.namespace, e.dot))
            {
                *expected.entry((&e.namespace, &e.key)).or_default() += *amount as i128;
            }
        }
        let store = &self.nodes[0].store;
        for ((ns, key), sum) in expected {
            let value = store.counter(ns, key).value();
            if value != sum {
                return Err(Broken::new(
                    Invariant::CounterSum,
                    format!("counter {key} of {ns} reads {value}; its increments add up to {sum}"),
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
        // Per key: the surviving ops with their dots, each once.
        let mut ops: BTreeMap<(&Namespace, &Key), Vec<(Dot, &SetOp)>> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for e in self.nodes.iter().flat_map(|n| &n.store.feed) {
            if let Some(op) = self.set_ops.get(&(e.namespace.clone(), e.dot))
                && seen.insert((&e.namespace, e.dot))
            {
                ops.entry((&e.namespace, &e.key))
                    .or_default()
                    .push((e.dot, op));
            }
        }
        let store = &self.nodes[0].store;
        for ((ns, key), ops) in ops {
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
            let remote: u64 = n
                .queue
                .iter()
                .map(|r| match r {
                    Request::Remote { bytes, .. } | Request::Repair { bytes, .. } => *bytes,
                    Request::Local { .. } | Request::Cover { .. } => 0,
                })
                .sum();
            let bound = 2 * CREDIT_WINDOW as u64 * n.links.len().max(1) as u64;
            if remote > bound {
                return Err(Broken::new(
                    Invariant::Bounds,
                    format!(
                        "node {i} queued {remote} bytes of peer events; credit bounds it to {bound}"
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
            .all(|n| n.up && !n.busy && n.queue.is_empty())
            && self.nodes.iter().all(|n| {
                n.store.vectors == first.store.vectors
                    && n.store.visible == n.store.feed.len()
                    && (!and_states || n.store.state == first.store.state)
            })
    }

    pub(crate) fn final_checks(&mut self) -> Result<(), Broken> {
        self.check_vectors()?;
        let first = &self.nodes[0].store.state;
        for (i, n) in self.nodes.iter().enumerate() {
            if &n.store.state != first {
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
                    .filter(|k| first.get(*k) != n.store.state.get(*k))
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
                return Err(Broken::new(
                    Invariant::Divergence,
                    format!(
                        "node {i} holds the same events as node 0 but a different state: {}",
                        differ.join("; ")
                    ),
                ));
            }
        }
        self.check_winners()?;
        self.check_counters()?;
        self.check_sets()?;
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
