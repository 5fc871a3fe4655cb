//! Local writes of CRDT namespaces: each operation's delta joined into the key's state
//! as this node holds it (the index plus what the writer appended and the indexer has
//! not applied yet), the result appended as the node's new state of the key.

use super::*;

/// The states of CRDT keys the writer appended and the indexer may not have applied
/// yet, by key (`crdt_key_prefix`), so that a CRDT write sees them without waiting for
/// the indexer. Entries leave once the indexed position passes theirs.
#[derive(Default)]
pub(super) struct RecentStates {
    by_key: HashMap<Vec<u8>, Vec<(u64, bytes::Bytes)>>,
    order: std::collections::VecDeque<(u64, Vec<u8>)>,
}

impl RecentStates {
    /// Records the state appended at `seq` for the entry `index_key` (`prefix ‖ origin`).
    pub(super) fn add(&mut self, seq: u64, index_key: &[u8], state: bytes::Bytes) {
        let prefix = index_key[..index_key.len() - 8].to_vec();
        self.by_key
            .entry(prefix.clone())
            .or_default()
            .push((seq, state));
        self.order.push_back((seq, prefix));
    }

    /// Forgets what the index holds: everything at or before `indexed`.
    pub(super) fn prune(&mut self, indexed: u64) {
        while let Some((seq, _)) = self.order.front() {
            if *seq > indexed {
                break;
            }
            let (_, prefix) = self.order.pop_front().expect("peeked");
            if let Some(states) = self.by_key.get_mut(&prefix) {
                states.retain(|(s, _)| *s > indexed);
                if states.is_empty() {
                    self.by_key.remove(&prefix);
                }
            }
        }
    }

    /// Forgets the states appended after `seq` (a group that was rolled back).
    pub(super) fn forget_after(&mut self, seq: u64) {
        while let Some((s, _)) = self.order.back() {
            if *s <= seq {
                break;
            }
            let (s, prefix) = self.order.pop_back().expect("peeked");
            if let Some(states) = self.by_key.get_mut(&prefix) {
                states.retain(|(at, _)| *at < s);
                if states.is_empty() {
                    self.by_key.remove(&prefix);
                }
            }
        }
    }

    pub(super) fn states(&self, prefix: &[u8]) -> impl Iterator<Item = &bytes::Bytes> {
        self.by_key
            .get(prefix)
            .into_iter()
            .flatten()
            .map(|(_, state)| state)
    }
}

impl Writer {
    /// A batch on a namespace of a CRDT policy: each operation's delta is joined into
    /// the key's state as this node holds it, and the event carries the result (this
    /// node's whole view of the key), which replaces this node's entry of the key.
    pub(super) fn add_local_crdt(
        &mut self,
        g: &mut Group,
        w: WriteRequest,
        wall: u64,
        policy: Policy,
        epoch: u64,
    ) {
        let node_id = self.shared.node_id;
        let first_counter = self.next_counter(&w.namespace);
        let refuse = |w: WriteRequest, err: WriteError, metrics: &crate::metrics::Metrics| {
            metrics.writes_rejected.inc();
            let _ = w.reply.send(Err(err));
        };
        if w.checkpoint.is_some() {
            let err = WriteError::WrongPolicy(format!(
                "namespace {} uses the {policy} policy; a write with a checkpoint (a connector's) needs lww",
                w.namespace
            ));
            return refuse(w, err, &self.shared.metrics);
        }
        // First every state, so that a refused operation leaves nothing behind.
        let mut states: HashMap<String, State> = HashMap::new();
        let mut encoded_states: Vec<(Hlc, bytes::Bytes)> = Vec::with_capacity(w.ops.len());
        let mut clock = self.clock.clone();
        for (i, op) in w.ops.iter().enumerate() {
            let key = op.key.as_str();
            let crdt = match &op.kind {
                WriteKind::Crdt(c) if c.policy() == policy => c,
                _ => {
                    let what = match &op.kind {
                        WriteKind::Crdt(c) => format!("a {} operation", c.policy()),
                        WriteKind::Put { .. } => "a plain put".to_owned(),
                        WriteKind::Delete => "a plain delete".to_owned(),
                        WriteKind::Expire { .. } => "an expiry".to_owned(),
                    };
                    let err = WriteError::WrongPolicy(format!(
                        "operation {i} on key {key:?} is {what}, but namespace {} uses the {policy} policy",
                        w.namespace
                    ));
                    return refuse(w, err, &self.shared.metrics);
                }
            };
            if op.condition != Condition::None {
                let err = WriteError::Invalid(format!(
                    "operation {i}: conditions apply to lww namespaces (a siblings write carries its context instead)"
                ));
                return refuse(w, err, &self.shared.metrics);
            }
            if let CrdtOp::Patch(changes) = crdt
                && let Some((path, _)) = changes.iter().find(|(path, _)| {
                    path.is_empty() || path.len() > asp_core::crdt::PATH_DEPTH_MAX
                })
            {
                let err = WriteError::Invalid(format!(
                    "operation {i} on key {key:?}: a json-map path has {} fields; 1 to {} are allowed",
                    path.len(),
                    asp_core::crdt::PATH_DEPTH_MAX
                ));
                return refuse(w, err, &self.shared.metrics);
            }
            if let CrdtOp::Write { context, .. } = crdt
                && !self
                    .namespaces
                    .get(&w.namespace)
                    .map_or(context.is_empty(), |held| context.is_subset(&held.vector))
            {
                let err = WriteError::ContextAhead(format!(
                    "operation {i} on key {key:?}: its context names versions this node does not hold yet (it was read from another node): retry once they arrive, or write where you read"
                ));
                return refuse(w, err, &self.shared.metrics);
            }
            let dot = Dot {
                origin: node_id,
                counter: first_counter + i as u64,
            };
            let hlc = clock.tick(wall);
            if !states.contains_key(key) {
                match self.merged_state(&w.namespace, key, policy) {
                    Ok(state) => {
                        states.insert(key.to_owned(), state);
                    }
                    Err(err) => return refuse(w, err, &self.shared.metrics),
                }
            }
            let state = states.get_mut(key).expect("just ensured");
            let delta = match (crdt, &*state) {
                (CrdtOp::Incr(n), State::Counter(c)) => {
                    let delta = c.add(node_id, *n).and_then(|d| {
                        // The value a read shows stays a 64-bit integer (as this
                        // node sees it; see docs/CONFLICTS.md for concurrent ones).
                        // Concurrent increments merged may have passed the bounds
                        // already: then only a move towards zero is taken.
                        let mut after = c.clone();
                        after.join(&d);
                        let (was, is) = (c.value(), after.value());
                        let inside = |v: i128| i64::try_from(v).is_ok();
                        if !inside(is) && (inside(was) || is.abs() > was.abs()) {
                            return Err(asp_core::crdt::CrdtError::Overflow(format!(
                                "the value would be {}, outside {}..={}",
                                after.value(),
                                i64::MIN,
                                i64::MAX
                            )));
                        }
                        Ok(d)
                    });
                    match delta {
                        Ok(d) => State::Counter(d),
                        Err(e) => {
                            let err =
                                WriteError::Invalid(format!("operation {i} on key {key:?}: {e}"));
                            return refuse(w, err, &self.shared.metrics);
                        }
                    }
                }
                (CrdtOp::Reset, State::Counter(c)) => State::Counter(c.reset()),
                (CrdtOp::Add(m), State::Set(s)) => State::Set(s.add(m.clone(), dot)),
                (CrdtOp::Remove(m), State::Set(s)) => State::Set(s.remove(m, dot)),
                (CrdtOp::Write { context, value }, State::Siblings(_)) => {
                    State::Siblings(MvRegister::write(
                        context,
                        dot,
                        value.as_ref().map(|(ct, v)| Sibling {
                            hlc,
                            content_type: ct.code(),
                            value: v.clone(),
                        }),
                    ))
                }
                (CrdtOp::Patch(changes), State::JsonMap(m)) => {
                    State::JsonMap(m.patch(Version { hlc, dot }, changes.iter().cloned()))
                }
                _ => unreachable!("operation and state checked against the policy"),
            };
            if let Err(e) = state.join(&delta) {
                return refuse(w, WriteError::Storage(e.to_string()), &self.shared.metrics);
            }
            let encoded = bytes::Bytes::from(state.encode());
            if encoded.len() > self.shared.config.value_bytes_max {
                let err = WriteError::TooLarge(format!(
                    "key {key:?} would hold a {policy} state of {} bytes; the limit is {} (value_bytes_max)",
                    encoded.len(),
                    self.shared.config.value_bytes_max
                ));
                return refuse(w, err, &self.shared.metrics);
            }
            encoded_states.push((hlc, encoded));
        }
        self.clock = clock;
        let events: Vec<_> = encoded_states
            .iter()
            .map(|(hlc, state)| (*hlc, Some((ContentType::OctetStream, &state[..])), 0))
            .collect();
        let applied = self.append_ops(
            g,
            &w,
            first_counter,
            &events,
            &policy.event_context(),
            epoch,
        );
        g.acks.push(Ack {
            reply: Reply::Write(w.reply, applied),
            _permit: w.permit,
        });
    }

    /// A CRDT key's state as this node holds it: the join of its origins' entries in
    /// the index and of the states appended since the indexed position (the index may
    /// already hold some of them too: joining twice changes nothing).
    pub(super) fn merged_state(
        &self,
        namespace: &Namespace,
        key: &str,
        policy: Policy,
    ) -> Result<State, WriteError> {
        let shared = &self.shared;
        let mut state = State::empty(policy).expect("a CRDT policy");
        let corrupt = |what: String| WriteError::Storage(format!("key {key:?}: {what}"));
        {
            let _gate = shared.maintenance.segment_gate.read().unwrap();
            shared
                .join_crdt_entries(namespace.as_str(), key, &mut state)
                .map_err(|e| corrupt(e.to_string()))?;
        }
        let prefix = codec::crdt_key_prefix(namespace.as_str(), key);
        for v in self.crdt_recent.states(&prefix) {
            let s = State::decode(v).map_err(|e| corrupt(e.to_string()))?;
            state.join(&s).map_err(|e| corrupt(e.to_string()))?;
        }
        Ok(state)
    }
}
