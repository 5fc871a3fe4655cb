//! The network side of a node: dialing, sessions and their reconcilers, frames in
//! flight with delays, partitions and hostile streams.

use super::*;
impl Sim {
    pub(crate) fn session_config(&self, node: usize) -> SessionConfig {
        let mut c = SessionConfig::new(self.nodes[node].id, "sim");
        c.heartbeat = Duration::from_millis(200);
        c.idle_timeout = Duration::from_millis(1500);
        c.handshake_timeout = Duration::from_millis(1500);
        c.credit_window_bytes = CREDIT_WINDOW;
        c
    }

    pub(crate) fn dial(&mut self, from: usize, to: usize) -> Result<(), Broken> {
        let retry = self.rng.range(50 * MS, 500 * MS);
        if !self.nodes[from].up {
            return Ok(()); // The restart dials again.
        }
        let connected = self.nodes[from].links.values().any(|l| l.peer == to);
        if connected {
            self.schedule(retry, Action::Dial { from, to });
            return Ok(());
        }
        if !self.nodes[to].up || self.blocked[from][to] || self.blocked[to][from] {
            self.schedule(retry, Action::Dial { from, to });
            return Ok(());
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            conn,
            Conn {
                a: from,
                b: to,
                open: true,
                last_delivery: [0, 0],
                held: [Vec::new(), Vec::new()],
            },
        );
        let now = self.at(self.now);
        for (me, peer) in [(from, to), (to, from)] {
            let session = if me == from {
                Session::new(self.session_config(me), now)
            } else {
                Session::accept(self.session_config(me), now)
            };
            let id = self.nodes[me].id;
            self.nodes[me].links.insert(
                conn,
                Link {
                    peer,
                    session,
                    reconciler: Reconciler::new(
                        id,
                        vec![asp_core::session::ALL_NAMESPACES.to_owned()],
                        REPAIR_FRAME_BYTES,
                    ),
                    sent_through: 0,
                    timer_at: None,
                    established: false,
                    relay_lacks: BTreeMap::new(),
                    grafted: BTreeSet::new(),
                    peer_lazy: BTreeSet::new(),
                },
            );
        }
        self.pump(from, conn)?;
        self.pump(to, conn)?;
        Ok(())
    }

    /// Runs a link after its session changed: frames out, events in, feed reading.
    pub(crate) fn pump(&mut self, node: usize, conn: u64) -> Result<(), Broken> {
        self.relay_take(node, conn);
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            let Some(link) = self.nodes[node].links.get_mut(&conn) else {
                return Ok(());
            };
            if let Some(frame) = link.session.poll_transmit() {
                let mut bytes = Vec::new();
                asp_wire::encode(&frame, &mut bytes).map_err(|e| {
                    Broken::new(Invariant::Protocol, format!("encoding a frame: {e}"))
                })?;
                let peer = link.peer;
                self.transmit(conn, node, peer, bytes);
                counts[0] += 1;
                continue;
            }
            let Some(link) = self.nodes[node].links.get_mut(&conn) else {
                return Ok(());
            };
            if let Some(event) = link.session.poll_event() {
                self.session_event(node, conn, event)?;
                counts[1] += 1;
                continue;
            }
            // Reconciliation work that needs nothing from the peer.
            let n = &mut self.nodes[node];
            let Some(link) = n.links.get_mut(&conn) else {
                return Ok(());
            };
            let credit = link.session.credit();
            if link.session.is_established() && link.reconciler.has_work(credit) {
                let can_send = link.session.can_send();
                let now = self.at(self.now);
                self.reconcile(node, conn, |r, store| r.step(store, can_send, credit, now));
                counts[3] += 1;
                continue;
            }
            // Send from the feed while the peer has credit.
            let n = &mut self.nodes[node];
            let Some(link) = n.links.get_mut(&conn) else {
                return Ok(());
            };
            if link.session.can_send()
                && !link.reconciler.holds_stream()
                && (link.sent_through as usize) < n.store.visible
            {
                let first = link.sent_through as usize;
                let mut budget = link.session.send_credit();
                let mut last = first;
                let mut sent = 0;
                while last < n.store.visible && sent < FRAME_EVENTS_MAX {
                    // A position compaction emptied costs nothing.
                    if !n.store.compacted.contains(&last) {
                        let cost = credit_size(&n.store.feed[last]);
                        if sent > 0 && cost > budget {
                            break;
                        }
                        budget = budget.saturating_sub(cost);
                        sent += 1;
                    }
                    last += 1;
                }
                let events: Vec<Event> = n.store.live(first, last).cloned().collect();
                if !link.peer_lazy.is_empty() {
                    // What the session leaves out for the peer's prunes.
                    let lazy: Vec<u64> = (first..last)
                        .filter(|i| !n.store.compacted.contains(i))
                        .filter(|&i| {
                            let origin = n.store.feed[i].dot.origin;
                            origin != n.id && link.peer_lazy.contains(&origin)
                        })
                        .map(|i| i as u64 + 1)
                        .collect();
                    if !lazy.is_empty() {
                        let peer = link.peer;
                        self.relay_skipped
                            .entry((node, peer))
                            .or_default()
                            .extend(lazy);
                    }
                }
                let now = self.base + Duration::from_micros(self.now);
                link.session
                    .send_events(first as u64 + 1, last as u64, events, now);
                link.sent_through = last as u64;
                counts[2] += 1;
                continue;
            }
            // All read: positions whose events the peer already held go now.
            if link.sent_through as usize == n.store.visible
                && link
                    .session
                    .flush_events(self.base + Duration::from_micros(self.now))
            {
                continue;
            }
            // Keep the session's timer scheduled.
            let deadline = link.session.poll_timeout();
            if let Some(deadline) = deadline {
                let at = deadline.saturating_duration_since(self.base).as_micros() as Time;
                if link.timer_at.is_none_or(|t| at < t) {
                    link.timer_at = Some(at);
                    let delay = at.saturating_sub(self.now);
                    self.schedule(delay, Action::SessionTimer { node, conn });
                }
            }
            return Ok(());
        }
        Err(Broken::new(
            Invariant::Runaway,
            format!(
                "node {node} link {conn} kept producing output: {counts:?} (frames, events, batches, reconciliation steps)"
            ),
        ))
    }

    pub(crate) fn session_event(
        &mut self,
        node: usize,
        conn: u64,
        event: SessionEvent,
    ) -> Result<(), Broken> {
        let now = self.at(self.now);
        match event {
            SessionEvent::Established(info) => {
                let Some(peer) = self.nodes.iter().position(|n| n.id == info.node_id) else {
                    return Err(Broken::new(
                        Invariant::Protocol,
                        format!("node {node} established with unknown {}", info.node_id),
                    ));
                };
                let wall = self.wall_ms(node);
                let n = &mut self.nodes[node];
                let checkpoint = n.store.checkpoints.get(&info.node_id).copied().unwrap_or(0);
                let summary = n.store.summary_for_peers(n.id, wall);
                let link = n.links.get_mut(&conn).expect("link exists");
                if link.peer != peer {
                    return Err(Broken::new(
                        Invariant::Protocol,
                        format!(
                            "node {node} link {conn}: expected node {}, met {peer}",
                            link.peer
                        ),
                    ));
                }
                link.sent_through = checkpoint.min(n.store.visible as u64);
                // A new link relays everything, both ways.
                link.established = true;
                link.relay_lacks.clear();
                link.grafted.clear();
                let takes_prunes = link.session.peer_relays_by_tree();
                n.relay.link_up(info.node_id, takes_prunes);
                link.reconciler
                    .set_peer(info.node_id, info.version, info.namespaces.clone());
                link.session.send_summary(summary, now);
            }
            SessionEvent::Events {
                last_seq,
                events,
                bytes,
                ..
            } => {
                self.nodes[node].queue.push_back(Request::Remote {
                    conn,
                    last_seq,
                    bytes,
                    events,
                });
                let epoch = self.nodes[node].epoch;
                self.schedule(0, Action::WriterWake { node, epoch });
            }
            SessionEvent::Acked { through_seq } => {
                let n = &mut self.nodes[node];
                let peer = n.links[&conn].peer;
                let id = self.nodes[peer].id;
                let n = &mut self.nodes[node];
                let cp = n.store.checkpoints.entry(id).or_insert(0);
                *cp = (*cp).max(through_seq);
                if *cp > n.store.visible as u64 {
                    return Err(Broken::new(
                        Invariant::CheckpointPastFeed,
                        format!(
                            "node {node} holds a checkpoint {cp} past its visible feed {}",
                            n.store.visible
                        ),
                    ));
                }
            }
            SessionEvent::Members(_) => {}
            SessionEvent::PeerHead { .. } => {}
            SessionEvent::PeerSummary(summary) => {
                let wall = self.wall_ms(node);
                if let Some(peer) = self.nodes[node].links.get(&conn).map(|l| l.peer) {
                    let peer = self.nodes[peer].id;
                    let n = &mut self.nodes[node];
                    n.store.note_summary(n.id, peer, wall, &summary);
                    // Now and then a compaction runs just after a summary: what a
                    // report allows is acted on before anything else arrives.
                    if self.rng.chance(600) {
                        let epoch = n.epoch;
                        self.schedule_between(
                            0,
                            2 * MS,
                            Action::Compact {
                                node,
                                epoch,
                                again: false,
                            },
                        );
                    }
                }
                self.relay_lag(node, conn, &summary);
                let summary: SummaryMap = summary
                    .into_iter()
                    .map(|s| (s.namespace.clone(), s))
                    .collect();
                let summary = Arc::new(summary);
                self.reconcile(node, conn, |r, store| r.handle_summary(store, summary));
            }
            SessionEvent::Reconcile(frame) => {
                self.reconcile(node, conn, |r, store| r.handle_frame(store, frame, now));
            }
            SessionEvent::Repair { id, events, bytes } => {
                if let Some(link) = self.nodes[node].links.get_mut(&conn) {
                    link.reconciler.repair_received(id, events.len());
                }
                self.nodes[node].queue.push_back(Request::Repair {
                    conn,
                    id,
                    bytes,
                    events,
                });
                let epoch = self.nodes[node].epoch;
                self.schedule(0, Action::WriterWake { node, epoch });
            }
            SessionEvent::Closed(reason) => {
                self.record(reason.code.name().as_bytes());
                if matches!(
                    reason.code,
                    ErrorCode::VersionMismatch
                        | ErrorCode::ClusterMismatch
                        | ErrorCode::SelfConnection
                ) {
                    return Err(Broken::new(
                        Invariant::Protocol,
                        format!(
                            "node {node}: unexpected refusal {}: {}",
                            reason.code, reason.message
                        ),
                    ));
                }
                // Let what this side queued (its Error frame) leave first.
                self.flush_closed(node, conn);
            }
        }
        Ok(())
    }

    /// Runs `f` on a link's reconciler over the node's store model, then does what it
    /// asked for: covered dots go to the writer (behind the repairs queued before
    /// them), frames into the session.
    pub(crate) fn reconcile(
        &mut self,
        node: usize,
        conn: u64,
        f: impl FnOnce(&mut Reconciler, &ModelView),
    ) {
        let n = &mut self.nodes[node];
        let Some(link) = n.links.get_mut(&conn) else {
            return;
        };
        let view = ModelView::new(&n.store);
        f(&mut link.reconciler, &view);
        let covers = view.covers.into_inner();
        if !covers.is_empty() {
            for (namespace, vector) in covers {
                n.queue.push_back(Request::Cover {
                    conn,
                    namespace,
                    vector,
                });
            }
            let epoch = n.epoch;
            self.schedule(0, Action::WriterWake { node, epoch });
        }
        let now = self.at(self.now);
        let mut ended = Vec::new();
        let mut skipped = Vec::new();
        let n = &mut self.nodes[node];
        let Some(link) = n.links.get_mut(&conn) else {
            return;
        };
        while let Some(output) = link.reconciler.poll_output() {
            match output {
                ReconcileOutput::Send(frame) => link.session.send_reconcile(frame, now),
                ReconcileOutput::Repair { id, events } => {
                    link.session.send_repair(id, events, now);
                }
                ReconcileOutput::SkipStream(seq) => {
                    if seq > link.sent_through {
                        skipped.push((link.peer, link.sent_through + 1, seq));
                        // The positions skipped are acknowledged like any others.
                        link.session
                            .send_events(link.sent_through + 1, seq, Vec::new(), now);
                        let _ = link.session.flush_events(now);
                        link.sent_through = seq;
                    }
                }
                ReconcileOutput::Close { code, message } => link.session.close(code, message, now),
                ReconcileOutput::Ended(run) => ended.push(run),
                ReconcileOutput::HandoverStarted { .. } => self.stats.handovers += 1,
                ReconcileOutput::Symbols(_)
                | ReconcileOutput::InSync(_)
                | ReconcileOutput::Transferred
                | ReconcileOutput::HandoverEnded { .. }
                | ReconcileOutput::Notice { .. } => {}
            }
        }
        for (peer, lo, hi) in skipped {
            self.skipped.entry((node, peer)).or_default().push((lo, hi));
        }
        for run in ended {
            self.record(run.outcome.name().as_bytes());
            self.stats.runs += 1;
            if run.outcome == asp_core::session::ReconcileOutcome::Decoded {
                self.stats.decoded += 1;
                self.stats.differences += run.differences;
            }
        }
    }

    /// The periodic anti-entropy check on every link of `node`.
    pub(crate) fn anti_entropy(&mut self, node: usize) -> Result<(), Broken> {
        let conns: Vec<u64> = self.nodes[node].links.keys().copied().collect();
        for conn in conns {
            let n = &self.nodes[node];
            let Some(link) = n.links.get(&conn) else {
                continue;
            };
            if !link.session.is_established() {
                continue;
            }
            // Nothing of the link's own in flight: the feed sent, nothing received
            // waiting in the writer.
            let applying = n.queue.iter().any(|r| {
                matches!(r, Request::Remote { conn: c, .. } | Request::Repair { conn: c, .. } if *c == conn)
            }) || n.waiting.iter().any(|a| {
                matches!(a, Ack::Remote { conn: c, .. } | Ack::Repair { conn: c, .. } if *c == conn)
            });
            let idle = link.sent_through as usize == n.store.visible && !applying;
            self.reconcile(node, conn, |r, store| r.anti_entropy_tick(store, idle));
            self.pump(node, conn)?;
        }
        Ok(())
    }

    /// A side closed its session: send its last frames, drop the link, tell the other
    /// side, and let the dialer try again.
    pub(crate) fn flush_closed(&mut self, node: usize, conn: u64) {
        let Some(mut link) = self.nodes[node].links.remove(&conn) else {
            return;
        };
        self.relay_link_down(node, &link);
        while let Some(frame) = link.session.poll_transmit() {
            let mut bytes = Vec::new();
            if asp_wire::encode(&frame, &mut bytes).is_ok() {
                self.transmit(conn, node, link.peer, bytes);
            }
        }
        let now = self.now;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let mut disconnect = None;
        if c.open {
            c.open = false;
            let to = link.peer;
            let dir = if to == c.a { 0 } else { 1 };
            let at = c.last_delivery[dir].max(now) + 1;
            disconnect = Some((at - now, to));
        }
        let (a, b) = (c.a, c.b);
        if let Some((delay, to)) = disconnect {
            self.schedule(delay, Action::Disconnect { conn, to });
        }
        if self.nodes[node].up && node == a {
            self.schedule_between(20 * MS, 300 * MS, Action::Dial { from: a, to: b });
        }
    }

    pub(crate) fn transmit(&mut self, conn: u64, from: usize, to: usize, frame: Vec<u8>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let dir = if to == c.a { 0 } else { 1 };
        if self.blocked[from][to] || !c.held[dir].is_empty() {
            // TCP keeps a stream whole across a partition: the frame waits (behind
            // any already waiting) until the path heals or a side gives up.
            c.held[dir].push(frame);
            return;
        }
        let delay = if self.rng.chance(10) {
            self.rng.range(20 * MS, 200 * MS)
        } else {
            self.rng.range(100, 3 * MS)
        };
        let mut at = (self.now + delay).max(c.last_delivery[dir] + 1);
        if self.chaos && self.rng.chance(1) {
            // A hostile stream: this frame is held back and the ones after it overtake
            // it; the connection may well be reset before it arrives.
            at = self.now + self.rng.range(50 * MS, 300 * MS);
        } else {
            c.last_delivery[dir] = at;
        }
        let repeat = self.chaos && self.rng.chance(1);
        let frame2 = repeat.then(|| frame.clone());
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            action: Action::Deliver { conn, to, frame },
        });
        if let Some(frame) = frame2 {
            self.seq += 1;
            self.queue.push(Scheduled {
                at: at + 1,
                seq: self.seq,
                action: Action::Deliver { conn, to, frame },
            });
        }
    }

    /// Sends on what partitions held, where the path is open again.
    pub(crate) fn release_held(&mut self) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            for dir in 0..2 {
                let c = &self.conns[&id];
                let (to, from) = if dir == 0 { (c.a, c.b) } else { (c.b, c.a) };
                if c.held[dir].is_empty() || self.blocked[from][to] {
                    continue;
                }
                let frames =
                    std::mem::take(&mut self.conns.get_mut(&id).expect("listed").held[dir]);
                for frame in frames {
                    self.transmit(id, from, to, frame);
                }
            }
        }
    }

    pub(crate) fn deliver(&mut self, conn: u64, to: usize, bytes: Vec<u8>) -> Result<(), Broken> {
        if !self.nodes[to].up {
            return Ok(());
        }
        let now = self.at(self.now);
        if !self.nodes[to].links.contains_key(&conn) {
            return Ok(());
        }
        match asp_wire::decode(&bytes) {
            Ok(Some((frame, used))) if used == bytes.len() => {
                self.record(&[frame_tag(&frame)]);
                let link = self.nodes[to].links.get_mut(&conn).expect("checked");
                relay::follow_peer(link, &frame);
                link.session.handle_frame(frame, now);
            }
            other => {
                return Err(Broken::new(
                    Invariant::Protocol,
                    format!("a frame did not decode back: {other:?}"),
                ));
            }
        }
        self.pump(to, conn)
    }
}

pub(crate) fn frame_tag(frame: &Frame) -> u8 {
    match frame {
        Frame::Hello(_) => 1,
        Frame::Error { .. } => 2,
        Frame::Summary(_) => 3,
        Frame::SummaryPart(_) => 14,
        Frame::Events { .. } => 4,
        Frame::Ack { .. } => 5,
        Frame::Credit { .. } => 6,
        Frame::Heartbeat { .. } => 7,
        Frame::ReconcileStart { .. } => 8,
        Frame::ReconcileSymbols { .. } => 9,
        Frame::ReconcileCredit { .. } => 10,
        Frame::ReconcileEnd { .. } => 11,
        Frame::Repair { .. } => 12,
        Frame::RepairEnd { repairs: None, .. } => 13,
        Frame::RepairEnd {
            repairs: Some(_), ..
        } => 15,
        Frame::Members(_) => 16,
        Frame::Prune { .. } => 17,
        Frame::Graft { .. } => 18,
    }
}
