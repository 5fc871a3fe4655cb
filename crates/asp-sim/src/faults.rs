//! Faults the seed injects: partitions, resets, clock jumps, slow disks, process and
//! machine crashes, and restarts.

use super::*;
impl Sim {
    pub(crate) fn fault(&mut self) {
        let n = self.config.nodes;
        let a = self.rng.below(n as u64) as usize;
        let mut b = self.rng.below(n as u64) as usize;
        if b == a {
            b = (a + 1) % n;
        }
        let kind = self.rng.below(100);
        self.record(&[kind as u8]);
        match kind {
            // Partitions: symmetric, one-way, flapping, swizzle, isolation.
            0..=24 => {
                let heal = self.rng.range(100 * MS, 3 * SECOND);
                self.schedule(
                    0,
                    Action::Partition {
                        a,
                        b,
                        one_way: kind >= 15,
                        heal_after: heal,
                    },
                );
            }
            25..=29 => {
                for i in 0..6 {
                    self.schedule(
                        i * 150 * MS,
                        Action::Partition {
                            a,
                            b,
                            one_way: false,
                            heal_after: 80 * MS,
                        },
                    );
                }
            }
            30..=34 => {
                // Swizzle: cut every link one by one, restore them in another order.
                let pairs = self.edges.clone();
                let mut order: Vec<usize> = (0..pairs.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, self.rng.below(i as u64 + 1) as usize);
                }
                for (k, &i) in order.iter().enumerate() {
                    let (x, y) = pairs[i];
                    let heal = (pairs.len() as Time + k as Time + 1) * 100 * MS;
                    self.schedule(
                        i as Time * 100 * MS,
                        Action::Partition {
                            a: x,
                            b: y,
                            one_way: false,
                            heal_after: heal,
                        },
                    );
                }
            }
            35..=39 => {
                let heal = self.rng.range(200 * MS, 2 * SECOND);
                for other in 0..n {
                    if other != a {
                        self.schedule(
                            0,
                            Action::Partition {
                                a,
                                b: other,
                                one_way: false,
                                heal_after: heal,
                            },
                        );
                    }
                }
            }
            // Crashes.
            40..=54 => {
                // Half the time, aim at a node with an fsync in flight: the moment a
                // crash tests the most.
                let busy: Vec<usize> = (0..n).filter(|&i| self.nodes[i].busy).collect();
                let a = if !busy.is_empty() && self.rng.chance(500) {
                    busy[self.rng.below(busy.len() as u64) as usize]
                } else {
                    a
                };
                if self.nodes[a].up {
                    let machine = self.rng.chance(500);
                    self.crash(a, machine);
                    let back = self.rng.range(50 * MS, 2 * SECOND);
                    self.schedule(back, Action::Restart { node: a });
                }
            }
            // A connection reset.
            55..=74 => {
                let open: Vec<u64> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.open)
                    .map(|(&id, _)| id)
                    .collect();
                if !open.is_empty() {
                    let conn = open[self.rng.below(open.len() as u64) as usize];
                    let c = self.conns.get_mut(&conn).expect("listed");
                    c.open = false;
                    let (x, y) = (c.a, c.b);
                    self.schedule(0, Action::Disconnect { conn, to: x });
                    self.schedule(0, Action::Disconnect { conn, to: y });
                }
            }
            // Clock trouble: small jumps, and now and then one past the skew limit.
            75..=89 => {
                let jump = self.rng.range(0, 4000) as i64 - 2000;
                self.nodes[a].skew_ms += jump;
            }
            90..=92 => {
                self.nodes[a].skew_ms += 65_000 + self.rng.range(0, 10_000) as i64;
            }
            // A slow disk: for a while the node's writes take hundreds of
            // milliseconds. Its peers run out of credit and hold their events back,
            // while summaries (and the reports they gossip) still flow.
            93..=99 => {
                let until = self.now + self.rng.range(500 * MS, 4 * SECOND);
                self.nodes[a].slow_until = self.nodes[a].slow_until.max(until);
            }
            _ => {}
        }
    }

    pub(crate) fn crash(&mut self, node: usize, machine: bool) {
        self.record(if machine { b"machine" } else { b"process" });
        let n = &mut self.nodes[node];
        n.up = false;
        n.epoch += 1;
        n.busy = false;
        n.queue.clear();
        n.waiting.clear();
        if machine {
            // This node's events past both the durable and the visible feed were seen
            // by no one: their dots may be issued again.
            let from = n.store.durable.max(n.store.visible);
            for e in &n.store.feed[from..] {
                if e.dot.origin == n.id {
                    self.issued.remove(&(e.namespace.clone(), e.dot));
                }
            }
        }
        n.store.crash(machine);
        n.derived.clear();
        n.derived_upto = 0;
        let conns: Vec<u64> = n.links.keys().copied().collect();
        n.links.clear();
        // The relay tree was in memory only: the restarted node's links start unpruned.
        n.relay = RelayTree::new();
        for conn in conns {
            if let Some(c) = self.conns.get_mut(&conn)
                && c.open
            {
                c.open = false;
                let other = if c.a == node { c.b } else { c.a };
                self.schedule(1, Action::Disconnect { conn, to: other });
            }
        }

        if machine && self.config.durability == Durability::Never {
            // `fsync = never` promises nothing across a machine crash: acknowledged
            // writes not yet written back are lost, unless a peer holds them (then they
            // must come back: the peer hands them over). Positions a subscriber read
            // may hold other events afterwards.
            let n = &mut self.nodes[node];
            let durable = n.store.durable;
            n.seen.truncate(durable);
            let (lost, acked): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.acked).into_iter().partition(|w| {
                    w.origin == node && !self.nodes[node].store.holds(w.dot, &w.namespace)
                });
            self.acked = acked;
            self.returning.extend(lost);
            // What no node holds any more (this crash took the last copy) is gone.
            let nodes = &self.nodes;
            let before = self.returning.len();
            self.returning
                .retain(|w| nodes.iter().any(|n| n.store.holds(w.dot, &w.namespace)));
            self.lost_writes += (before - self.returning.len()) as u64;
        }
    }

    pub(crate) fn restart(&mut self, node: usize) -> Result<(), Broken> {
        if self.nodes[node].up {
            return Ok(());
        }
        let wall = self.wall_ms(node);
        let n = &mut self.nodes[node];
        n.up = true;
        n.clock = HlcClock::with_last(n.store.max_hlc_overall(), MAX_SKEW_MS);
        // What the store knew of the others' vectors was in memory only.
        n.store.gc = Gc::new(wall);
        // Nothing acknowledged may be missing from the origin after a restart (its
        // vector was just rebuilt from what survived).
        for w in self.acked.iter().filter(|w| w.origin == node) {
            if !self.nodes[node].store.holds(w.dot, &w.namespace) {
                return Err(Broken::new(
                    Invariant::AckedWriteLost,
                    format!(
                        "node {node} lost acknowledged write {} ({}) in a crash",
                        w.dot, w.namespace
                    ),
                ));
            }
        }
        // Under `fsync = always` a node holds every event it acknowledged, whatever
        // crash came since: each peer's checkpoint for it names positions it
        // acknowledged (those a handover skipped excepted: its covers stand for them;
        // so are those compaction emptied at the peer).
        if self.config.durability == Durability::Always {
            let id = self.nodes[node].id;
            for (p, peer) in self.nodes.iter().enumerate() {
                let Some(&cp) = peer.store.checkpoints.get(&id) else {
                    continue;
                };
                let skipped = self.skipped.get(&(p, node));
                let relay_skipped = self.relay_skipped.get(&(p, node));
                for (i, e) in peer.store.feed[..cp as usize].iter().enumerate() {
                    let seq = i as u64 + 1;
                    if skipped.is_some_and(|r| r.iter().any(|&(lo, hi)| (lo..=hi).contains(&seq))) {
                        continue;
                    }
                    // Left out of the stream because this node pruned the event's
                    // origin on the link: it comes by another path (the tree's first
                    // copies, or an anti-entropy run).
                    if relay_skipped.is_some_and(|s| s.contains(&seq)) {
                        continue;
                    }
                    // A position compaction emptied was sent (and acknowledged) as a
                    // gap, or its event was superseded since: the peer's base holds
                    // it, and a handover covers it.
                    if peer.store.compacted.contains(&i) {
                        continue;
                    }
                    let store = &self.nodes[node].store;
                    if !store.holds(e.dot, &e.namespace) && !store.is_held(e.dot, &e.namespace) {
                        return Err(Broken::new(
                            Invariant::AckedNotHeld,
                            format!(
                                "node {node} acknowledged position {seq} of node {p} ({} in {}) but lacks it after a crash",
                                e.dot, e.namespace
                            ),
                        ));
                    }
                }
            }
        }
        // Nor may a position a subscriber was given hold anything else now.
        self.subscribe(node, true)?;
        let epoch = self.nodes[node].epoch;
        self.schedule(0, Action::WriterWake { node, epoch });
        self.schedule(SECOND, Action::Summaries { node, epoch });
        self.schedule(RELEASE_INTERVAL, Action::Release { node, epoch });
        self.schedule(ANTI_ENTROPY_INTERVAL, Action::AntiEntropy { node, epoch });
        self.schedule_between(
            COMPACT_INTERVAL / 2,
            COMPACT_INTERVAL * 3 / 2,
            Action::Compact {
                node,
                epoch,
                again: true,
            },
        );
        if self.config.durability == Durability::Never {
            self.schedule_between(20 * MS, 500 * MS, Action::Writeback { node, epoch });
        }
        for (a, b) in self.edges.clone() {
            if a == node {
                self.schedule_between(0, 50 * MS, Action::Dial { from: a, to: b });
            }
        }
        Ok(())
    }
}
