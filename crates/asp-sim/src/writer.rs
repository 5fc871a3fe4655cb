//! Each node's writer as the simulator runs it: client writes (lww values, counter
//! increments, set adds and removes), the group commit that appends local writes,
//! received batches, repairs and covers, the fsync (or the OS's writeback) and the
//! acknowledgements after it.

use super::*;
use asp_core::crdt::Change;

/// What a node had seen of a key, as the checker counts it: the union of what the
/// operations of the key's events in its feed had seen (`ops`: the checker's record of
/// one kind of operation, by dot).
fn seen_by<T>(
    store: &StoreModel,
    ops: &BTreeMap<(Namespace, Dot), T>,
    namespace: &Namespace,
    key: &Key,
    seen: impl Fn(&T) -> &BTreeSet<Dot>,
) -> BTreeSet<Dot> {
    store
        .feed
        .iter()
        .filter(|e| &e.namespace == namespace && &e.key == key)
        .filter_map(|e| ops.get(&(namespace.clone(), e.dot)))
        .flat_map(|o| seen(o).iter().copied())
        .collect()
}

/// A node that collected a delete never takes, for its key, a write that loses to it:
/// the rule let the delete go only once no such write could still arrive (or left an
/// epitaph it loses to). Checked as each received event is applied, against the
/// reference order.
pub(crate) fn no_resurrection(
    node: usize,
    store: &StoreModel,
    key: &(Namespace, Key),
) -> Result<(), Broken> {
    let Some(deletes) = store.collected_here.get(key) else {
        return Ok(());
    };
    let Some((version, Some(_))) = store.state.get(key) else {
        return Ok(());
    };
    let read = check::rank(version.hlc, version.dot);
    if let Some((dot, hlc)) = deletes.iter().find(|(d, h)| read < check::rank(*h, *d)) {
        return Err(Broken::new(
            Invariant::Resurrection,
            format!(
                "node {node} took {} ({}) for {} of {}, older than the delete {dot} ({hlc}) it collected",
                version.dot, version.hlc, key.1, key.0
            ),
        ));
    }
    Ok(())
}

/// Adds `origin` to `origins` unless it is there.
fn note_origin(origins: &mut Vec<NodeId>, origin: NodeId) {
    if !origins.contains(&origin) {
        origins.push(origin);
    }
}

impl Sim {
    pub(crate) fn client_write(&mut self, node: usize) {
        if self.chaos {
            let delay = self.rng.range(MS, 15 * MS);
            self.schedule(delay, Action::ClientWrite { node });
        } else {
            return;
        }
        if !self.nodes[node].up || self.nodes[node].queue.len() >= WRITE_QUEUE_MAX {
            return;
        }
        // Half the writes go to the two last-writer-wins namespaces (the first two),
        // half to the four CRDT ones.
        let pick = if self.rng.chance(500) {
            self.rng.below(2)
        } else {
            2 + self.rng.below(self.namespaces.len() as u64 - 2)
        };
        let namespace = self.namespaces[pick as usize].clone();
        let ops = (0..self.rng.range(1, 4))
            .map(|_| {
                // Most writes go to the hot keys; the cold ones are written now and
                // then, so that their deletes stay long enough to be collected.
                let cold = self.rng.chance(200);
                let key = if cold {
                    self.keys
                        [HOT_KEYS + self.rng.below((self.keys.len() - HOT_KEYS) as u64) as usize]
                        .clone()
                } else {
                    self.keys[self.rng.below(HOT_KEYS as u64) as usize].clone()
                };
                self.nodes[node].write_counter += 1;
                if policy_of(&namespace) == Policy::Siblings {
                    // A write (`=value`) or a delete (`!`) that replaces what it read.
                    let op = if self.rng.chance(200) {
                        "!".to_owned()
                    } else {
                        format!("=n{node}-{}", self.nodes[node].write_counter)
                    };
                    return (key, Some(Bytes::from(op)));
                }
                if policy_of(&namespace) == Policy::JsonMap {
                    // A patch of one or two paths, one to three deep over few names so
                    // that writes collide at every depth (and a removal or a value at
                    // a parent meets writes below it): set (`f0.a=value`), removed
                    // (`f0.a!`) or made an object (`f0.a{}`), separated by `;`. As in
                    // a JSON merge patch, no path of one change lies under another's.
                    let mut changes: Vec<(String, String)> = Vec::new();
                    for _ in 0..self.rng.range(1, 3) {
                        let depth = self.rng.range(1, 4);
                        let path: Vec<String> = (0..depth)
                            .map(|d| {
                                let names: &[&str] = if d == 0 {
                                    &["f0", "f1", "f2"]
                                } else {
                                    &["a", "b"]
                                };
                                names[self.rng.below(names.len() as u64) as usize].to_owned()
                            })
                            .collect();
                        let path = path.join(".");
                        let nested = |a: &str, b: &str| {
                            a == b
                                || a.starts_with(&format!("{b}."))
                                || b.starts_with(&format!("{a}."))
                        };
                        if changes.iter().any(|(other, _)| nested(other, &path)) {
                            continue;
                        }
                        let change = match self.rng.below(10) {
                            0 | 1 => "!".to_owned(),
                            2 => "{}".to_owned(),
                            _ => format!("=\"n{node}-{}\"", self.nodes[node].write_counter),
                        };
                        changes.push((path, change));
                    }
                    let patch: Vec<String> = changes.into_iter().map(|(p, c)| p + &c).collect();
                    return (key, Some(Bytes::from(patch.join(";"))));
                }
                if policy_of(&namespace) == Policy::Set {
                    // Add or remove one of four members.
                    let sign = if self.rng.chance(600) { '+' } else { '-' };
                    let member = self.rng.below(4);
                    return (key, Some(Bytes::from(format!("{sign}m{member}"))));
                }
                if policy_of(&namespace) == Policy::Counter {
                    // An increment or a decrement, never 0.
                    let amount = self.rng.range(1, 8) as i64 - 3;
                    let amount = if amount <= 0 { amount - 1 } else { amount };
                    return (key, Some(Bytes::from(amount.to_string())));
                }
                let value = (!self.rng.chance(if cold { 400 } else { 150 }))
                    .then(|| Bytes::from(format!("n{node}-{}", self.nodes[node].write_counter)));
                (key, value)
            })
            .collect::<Vec<_>>();
        // Now and then a last-writer-wins write is a compare-and-set of one key: the
        // client read the key from this node (what the index shows) and writes only
        // if it is still at that version (or still absent).
        let mut ops = ops;
        let mut condition = Condition::None;
        if policy_of(&namespace) == Policy::Lww && self.rng.chance(250) {
            ops.truncate(1);
            let store = &self.nodes[node].store;
            condition = match store.indexed.get(&(namespace.clone(), ops[0].0.clone())) {
                Some((version, Some(_))) => Condition::IfVersion(version.dot),
                _ => Condition::IfAbsent,
            };
        }
        self.nodes[node].queue.push_back(Request::Local {
            namespace,
            ops,
            condition,
        });
        let epoch = self.nodes[node].epoch;
        self.schedule(0, Action::WriterWake { node, epoch });
    }

    /// The writer: takes what is queued, appends it, and acknowledges after the fsync
    /// (`always`) or at once (`never`).
    pub(crate) fn writer_wake(&mut self, node: usize) -> Result<(), Broken> {
        let wall = self.wall_ms(node);
        let due = self.nodes[node]
            .store
            .held
            .values()
            .any(|e| e.hlc.physical_ms() <= wall + MAX_SKEW_MS);
        if self.nodes[node].busy || (self.nodes[node].queue.is_empty() && !due) {
            return Ok(());
        }
        // A slow disk under `fsync = never`: the writes themselves stall.
        if self.config.durability == Durability::Never && self.now < self.nodes[node].slow_until {
            let epoch = self.nodes[node].epoch;
            self.schedule_between(50 * MS, 200 * MS, Action::WriterWake { node, epoch });
            return Ok(());
        }
        let fault = self.config.model_fault;
        let wall = self.wall_ms(node);
        // Held events now due go first, in this group.
        self.release_held_events(node, wall)?;
        let take = self.nodes[node].queue.len().min(GROUP_MAX);
        let group: Vec<Request> = self.nodes[node].queue.drain(..take).collect();
        let mut acks = Vec::new();
        for request in group {
            match request {
                Request::Local {
                    namespace,
                    ops,
                    condition,
                } => {
                    if condition != Condition::None
                        && !self.condition_holds(node, &namespace, &ops[0].0, &condition)?
                    {
                        self.stats.conditions_failed += 1;
                        continue;
                    }
                    if condition != Condition::None {
                        self.stats.conditions_passed += 1;
                    }
                    let n = &mut self.nodes[node];
                    let reserve = self.config.durability == Durability::Never;
                    let first = if fault == Some(ModelFault::ReuseCounters) {
                        n.store
                            .vectors
                            .get(&namespace)
                            .map_or(0, |v| v.max_counter(n.id))
                            + 1
                    } else {
                        n.store.issue(&namespace, n.id, ops.len() as u64, reserve)
                    };
                    let mut written = Vec::new();
                    for (i, (key, value)) in ops.into_iter().enumerate() {
                        let dot = Dot {
                            origin: n.id,
                            counter: first + i as u64,
                        };
                        let hlc = n.clock.tick(wall);
                        let mut context = Bytes::new();
                        let op = match value {
                            // A counter's increment: the event carries this node's
                            // whole view of the key with it (as the store's CRDT
                            // writes do), which replaces this node's entry.
                            Some(amount) if policy_of(&namespace) == Policy::Counter => {
                                let amount: i64 = std::str::from_utf8(&amount)
                                    .ok()
                                    .and_then(|a| a.parse().ok())
                                    .expect("the simulator's own amount");
                                let mut view = n.store.counter(&namespace, &key);
                                let delta = view.add(n.id, amount).expect("small totals");
                                view.join(&delta);
                                self.increments.insert((namespace.clone(), dot), amount);
                                context = Policy::Counter.event_context();
                                Op::Put {
                                    content_type: ContentType::OctetStream,
                                    value: Bytes::from(State::Counter(view).encode()),
                                }
                            }
                            // A siblings write or delete: it replaces what this node's
                            // view holds (its context), with every dot of the key this
                            // node had seen recorded for the reference.
                            Some(op) if policy_of(&namespace) == Policy::Siblings => {
                                let value = (op[0] == b'=').then(|| op.slice(1..));
                                let mut view = n.store.siblings(&namespace, &key);
                                let delta = MvRegister::write(
                                    view.context(),
                                    dot,
                                    value.clone().map(|value| Sibling {
                                        hlc,
                                        content_type: ContentType::Text.code(),
                                        value,
                                    }),
                                );
                                view.join(&delta);
                                let mut seen =
                                    seen_by(&n.store, &self.sibling_ops, &namespace, &key, |o| {
                                        &o.seen
                                    });
                                seen.insert(dot);
                                self.sibling_ops
                                    .insert((namespace.clone(), dot), SiblingOp { value, seen });
                                context = Policy::Siblings.event_context();
                                Op::Put {
                                    content_type: ContentType::OctetStream,
                                    value: Bytes::from(State::Siblings(view).encode()),
                                }
                            }
                            // A JSON-map patch: each path it names takes its value, goes,
                            // or becomes an object, at this event's version.
                            Some(op) if policy_of(&namespace) == Policy::JsonMap => {
                                let path = |p: &str| p.split('.').map(str::to_owned).collect();
                                let changes: FieldChanges = std::str::from_utf8(&op)
                                    .expect("the simulator's own patch")
                                    .split(';')
                                    .map(|change| match change.split_once('=') {
                                        Some((p, value)) => (
                                            path(p),
                                            Change::Set(Bytes::copy_from_slice(value.as_bytes())),
                                        ),
                                        None => match change.strip_suffix('!') {
                                            Some(p) => (path(p), Change::Remove),
                                            None => (
                                                path(change.trim_end_matches("{}")),
                                                Change::Object,
                                            ),
                                        },
                                    })
                                    .collect();
                                let mut view = n.store.json_map(&namespace, &key);
                                let delta = view.patch(Version { hlc, dot }, changes.clone());
                                view.join(&delta);
                                let mut seen =
                                    seen_by(&n.store, &self.field_ops, &namespace, &key, |o| {
                                        &o.seen
                                    });
                                seen.insert(dot);
                                self.field_ops
                                    .insert((namespace.clone(), dot), FieldOp { changes, seen });
                                context = Policy::JsonMap.event_context();
                                Op::Put {
                                    content_type: ContentType::OctetStream,
                                    value: Bytes::from(State::JsonMap(view).encode()),
                                }
                            }
                            // An add or remove of a set: the same, with the adds of the
                            // key this node has seen recorded for the reference.
                            Some(op) if policy_of(&namespace) == Policy::Set => {
                                let add = op[0] == b'+';
                                let member = op.slice(1..);
                                let mut view = n.store.set(&namespace, &key);
                                let delta = if add {
                                    view.add(member.clone(), dot)
                                } else {
                                    view.remove(&member, dot)
                                };
                                view.join(&delta);
                                let mut seen =
                                    seen_by(&n.store, &self.set_ops, &namespace, &key, |o| &o.seen);
                                if add {
                                    seen.insert(dot);
                                }
                                self.set_ops
                                    .insert((namespace.clone(), dot), SetOp { member, add, seen });
                                context = Policy::Set.event_context();
                                Op::Put {
                                    content_type: ContentType::OctetStream,
                                    value: Bytes::from(State::Set(view).encode()),
                                }
                            }
                            Some(value) => Op::Put {
                                content_type: ContentType::Text,
                                value,
                            },
                            None => Op::Delete,
                        };
                        let issued = (key.clone(), hlc);
                        if let Some(earlier) = self.issued.insert((namespace.clone(), dot), issued)
                        {
                            return Err(Broken::new(
                                Invariant::DotReused,
                                format!(
                                    "node {node} issued {dot} ({namespace}) for {key} at {hlc}; it was issued before for {} at {}",
                                    earlier.0, earlier.1
                                ),
                            ));
                        }
                        let event = Event {
                            namespace: namespace.clone(),
                            key,
                            op,
                            dot,
                            hlc,
                            context,
                            epoch: 0,
                            expires_ms: 0,
                        };
                        written.push(AckedWrite {
                            origin: node,
                            namespace: namespace.clone(),
                            dot,
                        });
                        n.store.append(event);
                        self.appended += 1;
                    }
                    acks.push(Ack::Local(written));
                }
                Request::Remote {
                    conn,
                    last_seq,
                    bytes,
                    events,
                } => {
                    // Relay trees: the origins of the events new to this node and of
                    // those it held (or holds back) already, each once, as the
                    // store's writer reports them. Held copies dropped while parking
                    // count too.
                    let (mut fresh, mut duplicate) = (Vec::new(), Vec::new());
                    let store = &self.nodes[node].store;
                    for e in &events {
                        if store.holds(e.dot, &e.namespace) || store.is_held(e.dot, &e.namespace) {
                            note_origin(&mut duplicate, e.dot.origin);
                        }
                    }
                    let Some(events) = self.park_skewed(node, conn, events, wall)? else {
                        continue;
                    };
                    for event in events {
                        let n = &self.nodes[node];
                        let held = n.store.holds(event.dot, &event.namespace);
                        if n.store.is_held(event.dot, &event.namespace) {
                            continue;
                        }
                        if held && fault != Some(ModelFault::ForgetDedupe) {
                            // Also a dot twice in one batch.
                            note_origin(&mut duplicate, event.dot.origin);
                            continue;
                        }
                        if held {
                            return Err(Broken::new(
                                Invariant::AppliedTwice,
                                format!("node {node} applied event {} twice", event.dot),
                            ));
                        }
                        note_origin(&mut fresh, event.dot.origin);
                        self.apply_received(node, event, wall)?;
                    }
                    self.relay_delivered(node, conn, &fresh, &duplicate);
                    acks.push(Ack::Remote {
                        conn,
                        last_seq,
                        bytes,
                    });
                }
                Request::Repair {
                    conn,
                    id,
                    bytes,
                    events,
                } => {
                    let Some(events) = self.park_skewed(node, conn, events, wall)? else {
                        continue;
                    };
                    // The current state of keys the peer found different. A dot held
                    // already is applied again (no vector change) when the key's
                    // entry is older, as the store's judge does; dropped when the
                    // entry is as new or newer, or when the key has none (the store
                    // cannot tell that from a collected delete).
                    let mut applied = 0;
                    for event in events {
                        let n = &self.nodes[node];
                        if n.store.is_held(event.dot, &event.namespace) {
                            continue;
                        }
                        if n.store.holds(event.dot, &event.namespace) {
                            let key = StoreModel::state_key(&event);
                            let older =
                                n.store.state.get(&key).is_some_and(|(current, _)| {
                                    lww_wins(&event.version(), current)
                                });
                            if !older {
                                continue;
                            }
                        }
                        self.apply_received(node, event, wall)?;
                        applied += 1;
                    }
                    acks.push(Ack::Repair {
                        conn,
                        id,
                        bytes,
                        applied,
                    });
                }
                Request::Cover {
                    conn,
                    namespace,
                    vector,
                } => {
                    if self.nodes[node].links.contains_key(&conn) {
                        let claim_held = fault == Some(ModelFault::CoverClaimsHeld);
                        self.nodes[node]
                            .store
                            .cover(&namespace, &vector, claim_held);
                    }
                }
            }
        }
        let written = self.nodes[node].store.feed.len();
        if fault == Some(ModelFault::VisibleBeforeDurable) {
            // Readers hear of the events at once, as they would of durable ones.
            self.nodes[node].store.publish(written);
            self.subscriber_reads(node);
            let conns: Vec<u64> = self.nodes[node].links.keys().copied().collect();
            for conn in conns {
                self.pump(node, conn)?;
            }
        }
        match self.config.durability {
            Durability::Always => {
                if fault == Some(ModelFault::AckBeforeFsync) {
                    let local: Vec<Ack> = acks
                        .extract_if(.., |a| matches!(a, Ack::Local(_)))
                        .collect();
                    self.acknowledge(node, local)?;
                }
                self.nodes[node].waiting = acks;
                self.nodes[node].busy = true;
                self.group_counter += 1;
                let latency = if self.now < self.nodes[node].slow_until {
                    self.rng.range(150 * MS, 600 * MS)
                } else if self.rng.chance(20) {
                    self.rng.range(2 * MS, 20 * MS)
                } else {
                    self.rng.range(50, 400)
                };
                let epoch = self.nodes[node].epoch;
                let group = self.group_counter;
                self.schedule(
                    latency,
                    Action::FsyncDone {
                        node,
                        epoch,
                        written,
                        group,
                    },
                );
            }
            Durability::Never => {
                // Durable only once the OS writes the pages back (`Writeback`), but a
                // group that records covered dots first syncs the log (the repairs
                // they stand for), then saves the base file.
                let store = &mut self.nodes[node].store;
                store.publish(written);
                if store.covered != store.covered_synced {
                    store.durable = written;
                    store.checkpoints_synced = store.checkpoints.clone();
                    store.covered_synced = store.covered.clone();
                }
                self.subscriber_reads(node);
                self.acknowledge(node, acks)?;
                if !self.nodes[node].queue.is_empty() {
                    let epoch = self.nodes[node].epoch;
                    self.schedule_between(10, 100, Action::WriterWake { node, epoch });
                }
            }
        }
        Ok(())
    }

    /// Checks a compare-and-set against the key's state as the writer sees it now
    /// (`Condition::check`, the store's own rule), and the result against the
    /// checker's own reading: the newest write of the key in this node's feed by the
    /// reference order, live if it is a put.
    pub(crate) fn condition_holds(
        &self,
        node: usize,
        namespace: &Namespace,
        key: &Key,
        condition: &Condition,
    ) -> Result<bool, Broken> {
        let store = &self.nodes[node].store;
        let live = match store.state.get(&(namespace.clone(), key.clone())) {
            Some((version, Some(_))) => Some(version.dot),
            _ => None,
        };
        let holds = condition.check(live).is_ok();
        let newest = store
            .feed
            .iter()
            .filter(|e| &e.namespace == namespace && &e.key == key)
            .max_by_key(|e| check::rank(e.hlc, e.dot));
        let reference = newest.and_then(|e| matches!(e.op, Op::Put { .. }).then_some(e.dot));
        let expected = match condition {
            Condition::IfVersion(want) => reference == Some(*want),
            Condition::IfAbsent => reference.is_none(),
            _ => unreachable!("the simulator asks only these"),
        };
        if holds != expected {
            return Err(Broken::new(
                Invariant::Condition,
                format!(
                    "node {node}: a write to {key} of {ns} on condition {condition:?} {} but the key is {}",
                    if holds { "passed" } else { "failed" },
                    reference.map_or("absent or deleted".to_owned(), |d| format!("at {d}")),
                    ns = namespace
                ),
            ));
        }
        Ok(holds)
    }

    /// Parks the events of a received batch whose clock is past the skew limit of
    /// this node's wall clock (the store's held events) and returns the others; or,
    /// when that would hold more than `HELD_MAX` events, refuses the batch (closing its
    /// link, as the store refuses it whole when `held_bytes_max` would pass) and
    /// returns `None`.
    pub(crate) fn park_skewed(
        &mut self,
        node: usize,
        conn: u64,
        events: Vec<Event>,
        wall: u64,
    ) -> Result<Option<Vec<Event>>, Broken> {
        let ahead = |e: &Event| e.hlc.physical_ms() > wall + MAX_SKEW_MS;
        let parked = events.iter().filter(|e| ahead(e)).count();
        if parked == 0 {
            return Ok(Some(events));
        }
        let store = &self.nodes[node].store;
        if store.held.len() + parked > HELD_MAX {
            let e = events.iter().find(|e| ahead(e)).expect("counted");
            let message = format!(
                "event {} is {} ms ahead, and the held store is full",
                e.dot,
                e.hlc.physical_ms() - wall
            );
            let now = self.at(self.now);
            if let Some(link) = self.nodes[node].links.get_mut(&conn) {
                link.session.close(ErrorCode::ClockSkew, message, now);
                self.pump(node, conn)?;
            }
            return Ok(None);
        }
        let store = &mut self.nodes[node].store;
        let mut rest = Vec::with_capacity(events.len() - parked);
        for event in events {
            if !ahead(&event) {
                rest.push(event);
                continue;
            }
            let k = (event.namespace.clone(), event.dot);
            if store.holds(event.dot, &event.namespace) || store.held.contains_key(&k) {
                continue;
            }
            store.held_log.insert(k.clone(), event.clone());
            store.held.insert(k, event);
            self.stats.parked += 1;
        }
        Ok(Some(rest))
    }

    /// Applies an event received from a peer (or released from the held ones): the
    /// clock observes it, it joins the feed, and a key whose delete this node collected
    /// must not take it if it is older.
    fn apply_received(&mut self, node: usize, event: Event, wall: u64) -> Result<(), Broken> {
        let n = &mut self.nodes[node];
        let _ = n.clock.observe(event.hlc, wall);
        let key = StoreModel::state_key(&event);
        n.store.append(event);
        no_resurrection(node, &n.store, &key)?;
        self.appended += 1;
        Ok(())
    }

    /// Applies the held events whose clock this node's wall clock has caught up
    /// with, as received events (one the vector holds meanwhile is a duplicate).
    pub(crate) fn release_held_events(&mut self, node: usize, wall: u64) -> Result<(), Broken> {
        let n = &self.nodes[node];
        let due: Vec<(Namespace, Dot)> = n
            .store
            .held
            .iter()
            .filter(|(_, e)| e.hlc.physical_ms() <= wall + MAX_SKEW_MS)
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            let n = &mut self.nodes[node];
            let event = n.store.held.remove(&k).expect("listed");
            if n.store.holds(event.dot, &event.namespace) {
                continue;
            }
            self.apply_received(node, event, wall)?;
            self.stats.released += 1;
        }
        Ok(())
    }

    pub(crate) fn fsync_done(&mut self, node: usize, written: usize) -> Result<(), Broken> {
        let n = &mut self.nodes[node];
        n.store.durable = n.store.durable.max(written);
        n.store.publish(written);
        n.store.checkpoints_synced = n.store.checkpoints.clone();
        n.store.covered_synced = n.store.covered.clone();
        n.busy = false;
        self.subscriber_reads(node);
        let n = &mut self.nodes[node];
        let acks = std::mem::take(&mut n.waiting);
        self.acknowledge(node, acks)?;
        let epoch = self.nodes[node].epoch;
        self.schedule(0, Action::WriterWake { node, epoch });
        // New events are visible: every link may send.
        let conns: Vec<u64> = self.nodes[node].links.keys().copied().collect();
        for conn in conns {
            self.pump(node, conn)?;
        }
        Ok(())
    }

    pub(crate) fn acknowledge(&mut self, node: usize, acks: Vec<Ack>) -> Result<(), Broken> {
        let now = self.at(self.now);
        for ack in acks {
            match ack {
                Ack::Local(writes) => {
                    for w in &writes {
                        self.record(&w.dot.counter.to_le_bytes());
                    }
                    self.acked.extend(writes);
                }
                Ack::Remote {
                    conn,
                    last_seq,
                    bytes,
                } => {
                    if let Some(link) = self.nodes[node].links.get_mut(&conn) {
                        link.session.applied(last_seq, bytes, now);
                        self.pump(node, conn)?;
                    }
                }
                Ack::Repair {
                    conn,
                    id,
                    bytes,
                    applied,
                } => {
                    if let Some(link) = self.nodes[node].links.get_mut(&conn) {
                        link.session.repaired(bytes, now);
                        link.reconciler.repaired(id, applied);
                        self.pump(node, conn)?;
                    }
                }
            }
        }
        if self.config.durability == Durability::Never {
            let conns: Vec<u64> = self.nodes[node].links.keys().copied().collect();
            for conn in conns {
                self.pump(node, conn)?;
            }
        }
        Ok(())
    }
}
