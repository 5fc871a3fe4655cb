//! Local writes of last-writer-wins namespaces: a client's batch, its conditions
//! checked against the state it would see, appended with new dots of this node and
//! fresh clock readings. The append of a client's batch ([`Writer::append_ops`]) is
//! shared with CRDT writes (see [`super::crdt`]).

use super::*;

impl Writer {
    /// A client's batch: new dots of this node, fresh clock readings.
    pub(super) fn add_local(&mut self, g: &mut Group, w: WriteRequest, wall: u64, epoch: u64) {
        if let Some((i, op)) = w
            .ops
            .iter()
            .enumerate()
            .find(|(_, op)| matches!(op.kind, WriteKind::Crdt(_)))
        {
            let WriteKind::Crdt(crdt) = &op.kind else {
                unreachable!("found above")
            };
            let err = WriteError::WrongPolicy(format!(
                "operation {i} on key {:?} is a {} operation, but namespace {} uses the lww policy (set its policy first)",
                op.key.as_str(),
                crdt.policy(),
                w.namespace
            ));
            self.shared.metrics.writes_rejected.inc();
            let _ = w.reply.send(Err(err));
            return;
        }
        if let Err(e) = self.check_conditions(&w, g, wall) {
            self.shared.metrics.writes_rejected.inc();
            let _ = w.reply.send(Err(e));
            return;
        }
        let first_counter = self.next_counter(&w.namespace);
        let events: Vec<_> = w
            .ops
            .iter()
            .map(|op| match &op.kind {
                WriteKind::Put {
                    content_type,
                    value,
                    ttl_ms,
                } => {
                    let hlc = self.clock.tick(wall);
                    let expires = match *ttl_ms {
                        0 => 0,
                        ttl => hlc
                            .physical_ms()
                            .saturating_add(ttl)
                            .min(Hlc::PHYSICAL_MS_MAX),
                    };
                    (hlc, Some((*content_type, &value[..])), expires)
                }
                WriteKind::Delete => (self.clock.tick(wall), None, 0),
                // Just after the put it removes (checked to be the key's version), so
                // that it loses to every write after that put, as the put would have.
                WriteKind::Expire { version } => (
                    Hlc::from_raw(version.hlc.as_raw().saturating_add(1)),
                    None,
                    0,
                ),
                WriteKind::Crdt(_) => unreachable!("refused above"),
            })
            .collect();
        if let Some(c) = &w.checkpoint {
            let batch = (&w.namespace, first_counter, w.ops.len() as u64);
            self.append_checkpoint(g, c, batch, wall);
        }
        let applied = self.append_ops(g, &w, first_counter, &events, &[], epoch);
        g.acks.push(Ack {
            reply: Reply::Write(w.reply, applied),
            _permit: w.permit,
        });
    }

    /// Appends a batch's checkpoint, the first record of the batch's transaction (so
    /// not its end): a put of this node in the checkpoint's namespace, its JSON object
    /// with the member `batch` added: `{"namespace", "origin", "first", "count"}`, the
    /// dots the batch gets (so a reader can tell exactly which events it wrote).
    fn append_checkpoint(
        &mut self,
        g: &mut Group,
        c: &crate::types::Checkpoint,
        batch: (&Namespace, u64, u64),
        wall: u64,
    ) {
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&c.value).expect("checked to be a JSON object on submit");
        object.insert(
            "batch".into(),
            serde_json::json!({
                "namespace": batch.0.as_str(),
                "origin": self.shared.node_id.to_string(),
                "first": batch.1,
                "count": batch.2,
            }),
        );
        let value = serde_json::to_vec(&object).expect("JSON");
        let counter = self.next_counter(&c.namespace);
        let dot = Dot {
            origin: self.shared.node_id,
            counter,
        };
        let hlc = self.clock.tick(wall);
        let event = EventRef {
            namespace: c.namespace.as_str(),
            key: c.key.as_str(),
            put: Some((asp_core::ContentType::Json, &value[..])),
            dot,
            hlc,
            context: &[],
            epoch: 0,
            expires_ms: 0,
        };
        self.append(g, &event, false, UpdateKind::Overwrite);
        self.touch(g, &c.namespace, hlc);
        self.namespaces
            .get_mut(&c.namespace)
            .expect("just touched")
            .vector
            .insert_range(dot.origin, counter, counter);
        self.shared
            .writer
            .counters
            .lock()
            .unwrap()
            .issued(&c.namespace, counter);
    }

    /// Appends a client's batch: operation `i` as the event with dot
    /// `first_counter + i` of this node, clock reading and value (`None`: a delete)
    /// `events[i]`. Records the dots in the namespace's vector.
    pub(super) fn append_ops(
        &mut self,
        g: &mut Group,
        w: &WriteRequest,
        first_counter: u64,
        events: &[LocalEvent<'_>],
        context: &[u8],
        epoch: u64,
    ) -> Vec<Applied> {
        let node_id = self.shared.node_id;
        let last = events.len() - 1;
        let mut applied = Vec::with_capacity(events.len());
        let mut hlc = Hlc::ZERO;
        for (i, (op, &(event_hlc, put, expires_ms))) in w.ops.iter().zip(events).enumerate() {
            hlc = hlc.max(event_hlc);
            let dot = Dot {
                origin: node_id,
                counter: first_counter + i as u64,
            };
            let event = EventRef {
                namespace: w.namespace.as_str(),
                key: op.key.as_str(),
                put,
                dot,
                hlc,
                context,
                epoch,
                expires_ms,
            };
            let seq = self.append(g, &event, i == last, UpdateKind::Overwrite);
            applied.push(Applied {
                dot,
                hlc: event_hlc,
                seq,
            });
        }
        self.touch(g, &w.namespace, hlc);
        let last_counter = first_counter + last as u64;
        self.namespaces
            .get_mut(&w.namespace)
            .expect("just touched")
            .vector
            .insert_range(node_id, first_counter, last_counter);
        self.shared
            .writer
            .counters
            .lock()
            .unwrap()
            .issued(&w.namespace, last_counter);
        applied
    }

    /// Checks every condition of a request against the state it would see: earlier
    /// operations of the same request, earlier requests of this group, then the index.
    fn check_conditions(&self, w: &WriteRequest, g: &Group, wall: u64) -> Result<(), WriteError> {
        if !w.ops.iter().any(WriteOp::reads_index) {
            return Ok(());
        }
        // An expired key is absent to conditions, as to reads.
        let now = wall.max(self.clock.last().physical_ms());
        let node_id = self.shared.node_id;
        let first_counter = self.next_counter(&w.namespace);
        // Key -> (dot, live, expired) as left by earlier operations of this request.
        let mut local: HashMap<&str, (Dot, bool, bool)> = HashMap::new();
        for (i, op) in w.ops.iter().enumerate() {
            let expire = match &op.kind {
                WriteKind::Expire { version } => Some(version.dot),
                _ => None,
            };
            if op.reads_index() {
                let key = op.key.as_str();
                let current = match local.get(key) {
                    Some(&state) => Some(state),
                    None => {
                        let ikey = codec::index_key(w.namespace.as_str(), key);
                        match g.positions.get(&ikey[..]) {
                            Some(&p) => {
                                let entry = &g.updates[p].entry;
                                Some((
                                    entry.dot,
                                    entry.content_type.is_some(),
                                    entry.expired_at(now),
                                ))
                            }
                            None => self
                                .shared
                                .index
                                .get(&ikey)
                                .map_err(|e| {
                                    WriteError::Storage(format!("reading the key index: {e}"))
                                })?
                                .map(|e| (e.dot, e.content_type.is_some(), e.expired_at(now))),
                        }
                    }
                };
                if let Some(want) = expire {
                    // The put it removes must still be the key's version.
                    let have = current.filter(|&(_, live, _)| live).map(|(dot, ..)| dot);
                    if have != Some(want) {
                        return Err(WriteError::ConditionFailed {
                            index: i,
                            key: op.key.clone(),
                            reason: format!(
                                "the expired version {want} is no longer the key's version"
                            ),
                            current: have,
                        });
                    }
                }
                let live = current
                    .filter(|&(_, live, expired)| live && !expired)
                    .map(|(dot, ..)| dot);
                let failure = op.condition.check(live).err();
                if let Some(reason) = failure {
                    return Err(WriteError::ConditionFailed {
                        index: i,
                        key: op.key.clone(),
                        reason,
                        current: live,
                    });
                }
            }
            let dot = Dot {
                origin: node_id,
                counter: first_counter + i as u64,
            };
            let (live, expired) = match &op.kind {
                // A time to live is at least 1 ms: not yet expired within its batch.
                WriteKind::Put { .. } => (true, false),
                _ => (false, false),
            };
            local.insert(op.key.as_str(), (dot, live, expired));
        }
        Ok(())
    }
}
