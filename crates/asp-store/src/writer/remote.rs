//! Events from peers: the one judge of what becomes of each (applied, a duplicate,
//! parked, quarantined, or, for a repair of a held dot, applied again), holding and
//! releasing what cannot be applied yet, the quarantine's resolutions, and the checks
//! of a batch as a whole (this node's own origin).

use super::*;

/// What becomes of one event received from a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fate {
    /// Its dot is applied or held here already.
    Duplicate,
    Apply,
    /// Held until this node's clock allows it.
    Park,
    /// Held until an operator resolves its namespace's policy conflict.
    Quarantine,
}

/// What [`Writer::judge`] decided for a batch of events from a peer.
#[derive(Default)]
pub(super) struct Judged {
    fates: Vec<Fate>,
    /// Empty lww namespaces that take the policy of their first events.
    adopt: Vec<(Namespace, Policy)>,
    /// Bytes the held store needs for the batch.
    hold_bytes: u64,
}

impl Writer {
    /// Events from a peer: those already held (applied or held) are left out, those
    /// that cannot be applied yet are held (see [`crate::held`]), the rest are
    /// appended as they are and merged into the index by version. Only a batch whose
    /// events would not fit in the held store is refused, as a whole.
    pub(super) fn add_remote(&mut self, g: &mut Group, a: ApplyRequest, wall: u64) {
        if let Err(e) = self.check_own_origin(&a.events) {
            let _ = a.reply.send(Err(e));
            return;
        }
        let shared = self.shared.clone();
        let mut held = shared.writer.held.lock().unwrap();
        let judged = self.judge(g, &held, &a.events, wall, a.repair);
        if judged.hold_bytes > held.room() {
            held.note_full_refusal();
            shared.metrics.held_full_refusals.inc();
            let err = self.held_full(&held, &a.events, &judged, wall);
            let _ = a.reply.send(Err(err));
            return;
        }
        let arrivals = vec![wall; a.events.len()];
        match self.apply_judged(g, &mut held, &a.events, &arrivals, judged, wall) {
            Ok(outcome) => g.acks.push(Ack {
                reply: Reply::Apply(a.reply, outcome),
                _permit: a.permit,
            }),
            Err(e) => drop(a.reply.send(Err(e))),
        }
    }

    /// Decides, changing nothing, what becomes of each event received from a peer:
    /// the one home of the rules for remote events that get past validation.
    /// `repair`: the events are reconciliation repairs, and one whose dot this node
    /// holds is applied again if it supersedes its key's entry
    /// ([`Writer::repair_supersedes`]) and its policy is the namespace's here.
    fn judge(&self, g: &Group, held: &Held, events: &[Event], wall: u64, repair: bool) -> Judged {
        /// One namespace of the batch: its state here, its policy (as adopted by this
        /// batch), and whether the batch puts data into it (then it can no longer take
        /// another policy). Looked up once per namespace, not once per event.
        struct Slot<'a> {
            namespace: &'a Namespace,
            state: Option<&'a NamespaceState>,
            policy: Policy,
            filled: bool,
        }
        let limit = wall.saturating_add(self.clock.max_skew_ms());
        let mut judged = Judged::default();
        let mut slots: Vec<Slot<'_>> = Vec::new();
        // The slot of each namespace: the last one used first (events of a namespace
        // tend to come together), then a map (a batch may hold thousands).
        let mut slot_of: HashMap<&Namespace, usize, foldhash::fast::RandomState> =
            HashMap::default();
        let mut last = usize::MAX;
        // A dot twice in one batch (a peer's bug) is applied once.
        let mut seen: HashSet<(usize, Dot), foldhash::fast::RandomState> =
            HashSet::with_capacity_and_hasher(events.len(), Default::default());
        for e in events {
            let ns = &e.namespace;
            let at = if slots.get(last).is_some_and(|s| s.namespace == ns) {
                last
            } else {
                *slot_of.entry(ns).or_insert_with(|| {
                    slots.push(Slot {
                        namespace: ns,
                        state: self.namespaces.get(ns),
                        policy: self.policy(ns),
                        filled: false,
                    });
                    slots.len() - 1
                })
            };
            last = at;
            let holds = slots[at].state.is_some_and(|s| s.vector.contains(e.dot))
                && !self.shared.mutated(Mutation::ForgetDedupe);
            let fate = if (events.len() > 1 && !seen.insert((at, e.dot)))
                || held.contains(ns, e.dot)
                || (holds && !(repair && self.repair_supersedes(g, e)))
            {
                Fate::Duplicate
            } else if holds {
                // A repair of a held dot that supersedes its key: never held (its dot
                // is this node's already), applied only under this node's policy.
                match Policy::of_event(&e.context) {
                    Some(policy) if policy == slots[at].policy => Fate::Apply,
                    _ => Fate::Duplicate,
                }
            } else if e.hlc.physical_ms() > limit {
                Fate::Park
            } else {
                let slot = &mut slots[at];
                let fate = match Policy::of_event(&e.context) {
                    Some(policy) if policy == slot.policy => Fate::Apply,
                    // An empty lww namespace takes the policy of its first events, so
                    // that a policy set on one node spreads with its data.
                    Some(policy)
                        if slot.policy == Policy::Lww
                            && !slot.filled
                            && slot.state.is_none_or(|s| s.vector.is_empty()) =>
                    {
                        judged.adopt.push((ns.clone(), policy));
                        slot.policy = policy;
                        Fate::Apply
                    }
                    // Another policy, or (never past validation) no known policy.
                    _ => Fate::Quarantine,
                };
                if fate == Fate::Apply {
                    slot.filled = true;
                }
                fate
            };
            if matches!(fate, Fate::Park | Fate::Quarantine) {
                judged.hold_bytes += Held::record_bytes(e);
            }
            judged.fates.push(fate);
        }
        judged
    }

    /// Carries out what [`Writer::judge`] decided: adopts policies, holds what must be
    /// held (arriving at `arrivals[i]`), appends the rest.
    fn apply_judged(
        &mut self,
        g: &mut Group,
        held: &mut Held,
        events: &[Event],
        arrivals: &[u64],
        judged: Judged,
        wall: u64,
    ) -> Result<ApplyOutcome, WriteError> {
        for (ns, policy) in &judged.adopt {
            self.save_policy(ns, *policy)?;
        }
        let shared = self.shared.clone();
        let metrics = &shared.metrics;
        let mut outcome = ApplyOutcome::default();
        let mut fresh = Vec::with_capacity(events.len());
        for (i, (e, fate)) in events.iter().zip(&judged.fates).enumerate() {
            match fate {
                Fate::Duplicate => {
                    outcome.duplicates += 1;
                    note_origin(&mut outcome.duplicate_origins, e.dot.origin);
                }
                Fate::Park => {
                    held.hold(e.clone(), HeldReason::Parked, arrivals[i]);
                    metrics.events_parked.inc();
                    outcome.parked += 1;
                }
                Fate::Quarantine => {
                    held.hold(e.clone(), HeldReason::Quarantined, arrivals[i]);
                    metrics.events_quarantined.inc();
                    outcome.quarantined += 1;
                }
                Fate::Apply => {
                    // Not new only for a repair of a held dot that supersedes its key.
                    let new = self.namespace_state(&e.namespace).vector.insert(e.dot);
                    if new {
                        note_origin(&mut outcome.fresh_origins, e.dot.origin);
                    }
                    fresh.push((i, new));
                }
            }
        }
        // How long the first copies took to get here (from their origin's clock).
        let delays = fresh
            .iter()
            .filter(|&&(_, new)| new)
            .map(|&(i, _)| (events[i].dot.origin, events[i].hlc.physical_ms()));
        for (_, at) in delays.clone() {
            metrics
                .replication_delay_seconds
                .observe(wall.saturating_sub(at) as f64 / 1000.0);
        }
        metrics.convergence.record(wall, delays);
        let last = fresh.len().saturating_sub(1);
        for (j, &(i, new)) in fresh.iter().enumerate() {
            let e = &events[i];
            // Cannot fail: readings too far ahead were parked.
            let _ = self.clock.observe(e.hlc, wall);
            // An event newer than everything the namespace holds replaces whatever its
            // key holds, so the indexer need not read the key first (the common case
            // in a catch-up, where events come in their origin's clock order).
            let newest = new
                && self
                    .namespaces
                    .get(&e.namespace)
                    .is_some_and(|s| e.hlc > s.max_hlc);
            let kind = if newest {
                UpdateKind::Overwrite
            } else {
                UpdateKind::Merge
            };
            outcome.last_seq = self.append(g, &EventRef::from_event(e), j == last, kind);
            outcome.applied += 1;
            self.touch(g, &e.namespace, e.hlc);
        }
        Ok(outcome)
    }

    /// Why a batch that does not fit in the held store is refused: the refusal it had
    /// before events could be held, saying that the held store is full.
    fn held_full(&self, held: &Held, events: &[Event], judged: &Judged, wall: u64) -> WriteError {
        let full = format!(
            "the events this node holds already take {} of held_bytes_max = {} bytes, and this batch needs {} more, so nothing of it was applied",
            held.bytes(),
            held.bytes_max(),
            judged.hold_bytes
        );
        let first = |want: Fate| {
            events
                .iter()
                .zip(&judged.fates)
                .find(|(_, f)| **f == want)
                .map(|(e, _)| e)
        };
        if let Some(e) = first(Fate::Park) {
            return WriteError::ClockSkew(format!(
                "event {} of namespace {} carries clock {} ms, {} ms ahead of this node's clock (the limit is max_clock_skew = {} ms), and {full}: check NTP on both nodes, or raise held_bytes_max",
                e.dot,
                e.namespace,
                e.hlc.physical_ms(),
                e.hlc.physical_ms() - wall,
                self.clock.max_skew_ms()
            ));
        }
        let e = first(Fate::Quarantine).expect("a batch that needs holding holds something");
        WriteError::PolicyFixed(format!(
            "namespace {} uses the {} policy on this node, but the peer sent an event of another policy ({}), and {full}: configure the same policy on every node, resolve the quarantine, or raise held_bytes_max",
            e.namespace,
            self.policy(&e.namespace),
            e.dot
        ))
    }

    /// The writer's deadline for the release of the earliest parked event (`None`:
    /// nothing parked, or the store failed).
    pub(super) fn release_deadline(&self) -> Option<Instant> {
        if self.shared.health.failure.get().is_some() {
            return None;
        }
        let due_ms = self
            .shared
            .writer
            .held
            .lock()
            .unwrap()
            .next_release_ms(self.clock.max_skew_ms())?;
        // Woken at least once a second, in case the wall clock jumps ahead.
        let wait_ms = due_ms.saturating_sub(wall_ms()).min(1000);
        Some(Instant::now() + Duration::from_millis(wait_ms))
    }

    /// Whether a parked event may be applied at `wall`.
    pub(super) fn release_due_at(&self, wall: u64) -> bool {
        self.shared
            .writer
            .held
            .lock()
            .unwrap()
            .next_release_ms(self.clock.max_skew_ms())
            .is_some_and(|due| due <= wall)
    }

    /// Applies the parked events this node's clock now allows, through the same rules
    /// as any received event (a policy conflict found now quarantines them).
    pub(super) fn release_parked(&mut self, g: &mut Group, wall: u64) {
        let shared = self.shared.clone();
        let mut held = shared.writer.held.lock().unwrap();
        let due = held.take_due(wall.saturating_add(self.clock.max_skew_ms()));
        if due.is_empty() {
            return;
        }
        let (events, arrivals): (Vec<Event>, Vec<u64>) = due.into_iter().unzip();
        let judged = self.judge(g, &held, &events, wall, false);
        match self.apply_judged(g, &mut held, &events, &arrivals, judged, wall) {
            Ok(outcome) => {
                shared
                    .metrics
                    .events_released
                    .inc_by(outcome.applied as u64);
                tracing::info!(
                    applied = outcome.applied,
                    quarantined = outcome.quarantined,
                    "parked events released: this node's clock caught up with theirs"
                );
            }
            Err(e) => {
                // Only saving a policy can fail, before anything changed; trying again
                // at once would fail again.
                shared.fail(format!("applying parked events: {e}"));
            }
        }
    }

    /// Makes the events held by this group durable.
    pub(super) fn sync_held(&self) -> Result<(), WriteError> {
        let mut held = self.shared.writer.held.lock().unwrap();
        let synced = held.sync();
        self.shared.metrics.held_events.set(held.len() as i64);
        self.shared.metrics.held_bytes.set(held.bytes() as i64);
        match synced {
            Ok(_) => Ok(()),
            Err(e) => {
                drop(held);
                Err(self
                    .shared
                    .fail(format!("writing {}: {e}", crate::held::HELD_FILE)))
            }
        }
    }

    /// Rewrites the held store's file without the events that left it. Done at the
    /// start of a group: those applied left in earlier groups, whose log records are
    /// durable by now (under `fsync = "always"`).
    pub(super) fn compact_held(&self) {
        if let Err(e) = self.shared.writer.held.lock().unwrap().compact() {
            // The old file is intact; the next group tries again.
            tracing::warn!(error = %e, "could not rewrite {}", crate::held::HELD_FILE);
        }
    }

    /// An operator's resolution of a namespace's quarantine.
    pub(super) fn resolve_quarantine(&mut self, g: &mut Group, q: QuarantineRequest, wall: u64) {
        let shared = self.shared.clone();
        let mut held = shared.writer.held.lock().unwrap();
        let outcome = match q.action {
            QuarantineAction::Retry => {
                let taken = held.take_quarantined(&q.namespace);
                let (events, arrivals): (Vec<Event>, Vec<u64>) = taken.into_iter().unzip();
                // Those still in conflict are held again (they were held already: no
                // room check).
                let judged = self.judge(g, &held, &events, wall, false);
                match self.apply_judged(g, &mut held, &events, &arrivals, judged, wall) {
                    Ok(o) => QuarantineOutcome {
                        applied: o.applied,
                        still_quarantined: o.quarantined,
                        ..QuarantineOutcome::default()
                    },
                    Err(e) => {
                        for (event, arrival) in events.into_iter().zip(arrivals) {
                            held.hold(event, HeldReason::Quarantined, arrival);
                        }
                        let _ = q.reply.send(Err(e));
                        return;
                    }
                }
            }
            QuarantineAction::Discard => {
                let dots = held.dots(&q.namespace, true);
                if !dots.is_empty() {
                    // The dots join the base vector durably before the events leave:
                    // on open, held events whose dots the vector holds are dropped.
                    if let Err(e) = self.cover(g, &q.namespace, &dots) {
                        let _ = q.reply.send(Err(e));
                        return;
                    }
                }
                QuarantineOutcome {
                    discarded: held.take_quarantined(&q.namespace).len(),
                    ..QuarantineOutcome::default()
                }
            }
        };
        g.acks.push(Ack {
            reply: Reply::Quarantine(q.reply, outcome),
            _permit: None,
        });
    }

    /// A peer's event that carries this node's own origin must be one this node issued
    /// (in this life or an earlier one): a higher counter means another process runs
    /// with this node's id, or a peer is lying. Taking it would make this node issue
    /// that counter again (or overflow at `u64::MAX`).
    fn check_own_origin(&self, events: &[Event]) -> Result<(), WriteError> {
        let me = self.shared.node_id;
        let counters = self.shared.writer.counters.lock().unwrap();
        match events
            .iter()
            .find(|e| e.dot.origin == me && !counters.may_have_issued(&e.namespace, e.dot.counter))
        {
            None => Ok(()),
            Some(e) => Err(WriteError::InvalidEvent {
                reason: "own_origin",
                message: format!(
                    "event {} of namespace {} carries this node's own id, but this node never issued counter {} there (it issued up to {}): another process may be running with this node's id (a copied data directory?), or the peer is broken",
                    e.dot,
                    e.namespace,
                    e.dot.counter,
                    counters.next(&e.namespace) - 1
                ),
            }),
        }
    }

    /// Whether this node holds the dot of any of `events` (repairs of held dots read
    /// the index; others, as in a bootstrap transfer, need not wait for it).
    pub(super) fn holds_any(&self, events: &[Event]) -> bool {
        events.iter().any(|e| {
            self.namespaces
                .get(&e.namespace)
                .is_some_and(|s| s.vector.contains(e.dot))
        })
    }

    /// Whether a repair whose dot this node already holds must be applied anyway: its
    /// key's entry exists and is older. Two nodes can hold the same dots in different
    /// states (a dot covered without its event, or an event applied after the delete
    /// it loses to was collected); dropping such repairs as duplicates would leave
    /// them different for good. A key with no entry had its delete collected here:
    /// anything held of it is older, and applying it would bring the key back. The
    /// writer waited for the index to reflect every earlier group (see `process`); a
    /// key this group already writes, or a dot that became held only within this
    /// group, is left alone (the next anti-entropy run looks again).
    fn repair_supersedes(&self, g: &Group, e: &Event) -> bool {
        let key = codec::event_index_key(e.namespace.as_str(), e.key.as_str(), e.dot, &e.context);
        if !g.indexed || g.positions.contains_key(&key[..]) {
            return false;
        }
        match self.shared.index.get(&key) {
            Ok(current) => {
                crate::lww::repair_supersedes(&e.version(), current.map(|c| c.version()).as_ref())
            }
            Err(err) => {
                tracing::warn!(namespace = %e.namespace, key = e.key.as_str(), error = %err, "cannot read the key index to judge a repair of a held event; it is dropped (the next anti-entropy run tries again)");
                false
            }
        }
    }
}

/// Adds `origin` to `origins` unless it is there (batches hold few origins, in runs).
fn note_origin(origins: &mut Vec<asp_core::NodeId>, origin: asp_core::NodeId) {
    if origins.last() != Some(&origin) && !origins.contains(&origin) {
        origins.push(origin);
    }
}
