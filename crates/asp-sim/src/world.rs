//! The world: its nodes, links and connections, the scheduler's actions, and each
//! node's writer (group commit, fsyncs, acknowledgements) and client writes.

use super::*;
#[derive(Clone, Debug)]
pub(crate) enum Action {
    ClientWrite {
        node: usize,
    },
    WriterWake {
        node: usize,
        epoch: u64,
    },
    FsyncDone {
        node: usize,
        epoch: u64,
        written: usize,
        group: u64,
    },
    Deliver {
        conn: u64,
        to: usize,
        frame: Vec<u8>,
    },
    Disconnect {
        conn: u64,
        to: usize,
    },
    SessionTimer {
        node: usize,
        conn: u64,
    },
    Dial {
        from: usize,
        to: usize,
    },
    Summaries {
        node: usize,
        epoch: u64,
    },
    /// The writer's look at its held events.
    Release {
        node: usize,
        epoch: u64,
    },
    /// A compaction run; `again`: the periodic one, which schedules the next.
    Compact {
        node: usize,
        epoch: u64,
        again: bool,
    },
    AntiEntropy {
        node: usize,
        epoch: u64,
    },
    /// Under `fsync = never`: the OS writes what was written back to disk.
    Writeback {
        node: usize,
        epoch: u64,
    },
    Subscribe {
        node: usize,
    },
    Fault,
    Partition {
        a: usize,
        b: usize,
        one_way: bool,
        heal_after: Time,
    },
    Heal {
        a: usize,
        b: usize,
    },
    Restart {
        node: usize,
    },
    Check,
}

pub(crate) struct Scheduled {
    pub(crate) at: Time,
    pub(crate) seq: u64,
    pub(crate) action: Action,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Earliest first (BinaryHeap is a max-heap).
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

pub(crate) enum Request {
    Local {
        namespace: Namespace,
        ops: Vec<(Key, Option<Bytes>)>,
        /// A compare-and-set (one operation only): the writer checks it against the
        /// key's state at the request's turn; if it fails, nothing is written.
        condition: Condition,
    },
    Remote {
        conn: u64,
        last_seq: u64,
        bytes: u64,
        events: Vec<Event>,
    },
    /// Repair events of reconciliation run `id`.
    Repair {
        conn: u64,
        id: u32,
        bytes: u64,
        events: Vec<Event>,
    },
    /// A peer's covered dots, recorded after the repairs queued before them, unless
    /// the link closed meanwhile (as the node's link records them only after it
    /// drained those repairs).
    Cover {
        conn: u64,
        namespace: Namespace,
        vector: VersionVector,
    },
}

pub(crate) enum Ack {
    Local(Vec<AckedWrite>),
    Remote {
        conn: u64,
        last_seq: u64,
        bytes: u64,
    },
    Repair {
        conn: u64,
        id: u32,
        bytes: u64,
        applied: usize,
    },
}

#[derive(Clone, Debug)]
/// One add or remove of a set namespace, as the reference keeps it.
pub(crate) struct SetOp {
    pub(crate) member: Bytes,
    pub(crate) add: bool,
    /// The dots of the key's adds its node had seen (its own, for an add).
    pub(crate) seen: BTreeSet<Dot>,
}

/// A write of a siblings namespace, as the reference sees it.
pub(crate) struct SiblingOp {
    /// What it wrote (`None`: a delete).
    pub(crate) value: Option<Bytes>,
    /// Every dot of the key its node had seen, its own included (the checker's own
    /// account, from the events in that node's feed).
    pub(crate) seen: BTreeSet<Dot>,
}

/// A JSON-map patch's changes: each at a path (field names from the top down).
pub(crate) type FieldChanges = Vec<(Vec<String>, asp_core::crdt::Change)>;

/// A JSON-map patch, as the reference keeps it.
pub(crate) struct FieldOp {
    pub(crate) changes: FieldChanges,
    /// Every dot of the key's patches its node had seen, its own included (the
    /// checker's own account, from the events in that node's feed).
    pub(crate) seen: BTreeSet<Dot>,
}

pub(crate) struct AckedWrite {
    pub(crate) origin: usize,
    pub(crate) namespace: Namespace,
    pub(crate) dot: Dot,
}

pub(crate) struct Link {
    pub(crate) peer: usize,
    pub(crate) session: Session,
    /// The real reconciliation state machine, over the store model.
    pub(crate) reconciler: Reconciler,
    /// The last feed position sent to the peer.
    pub(crate) sent_through: u64,

    /// When a session timer is scheduled.
    pub(crate) timer_at: Option<Time>,
    /// Whether the handshake completed (the node's link knows its peer from then on).
    pub(crate) established: bool,
    /// Relay trees: per namespace, the peer's dots this node lacked at the peer's last
    /// summary, and the origins grafted on this link whose gaps are not filled yet.
    pub(crate) relay_lacks: BTreeMap<Namespace, VersionVector>,
    pub(crate) grafted: BTreeSet<NodeId>,
    /// The origins the peer pruned on this link (the session's own set, followed from
    /// the `Prune` and `Graft` frames it takes): their events are left out of what the
    /// link sends, their positions acknowledged all the same.
    pub(crate) peer_lazy: BTreeSet<NodeId>,
}

pub(crate) struct Node {
    pub(crate) id: NodeId,
    pub(crate) up: bool,
    /// Bumped on each crash: actions of an earlier life are ignored.
    pub(crate) epoch: u64,
    pub(crate) skew_ms: i64,
    pub(crate) clock: HlcClock,
    pub(crate) store: StoreModel,
    pub(crate) queue: VecDeque<Request>,
    pub(crate) busy: bool,
    /// Acknowledgements waiting for the fsync in flight.
    pub(crate) waiting: Vec<Ack>,
    pub(crate) links: BTreeMap<u64, Link>,
    /// The change-feed subscriber: its cursor and every dot it was given, by position.
    /// The client keeps them across the node's crashes.
    pub(crate) seen: Vec<Dot>,
    pub(crate) write_counter: u64,
    /// Until when its disk is slow (a fault).
    pub(crate) slow_until: Time,
    /// The dots of `store.feed[..derived_upto]`, kept by the checker to compare with
    /// the store's vectors without rereading the whole feed each time. A plain set, not
    /// a `VersionVector`: the check must not share the code it checks.
    pub(crate) derived: BTreeMap<Namespace, BTreeSet<Dot>>,
    pub(crate) derived_upto: usize,
    /// Whether this node runs relay trees (its `relay_tree` setting).
    pub(crate) relay_tree: bool,
    /// Which peers this node asked to stop relaying which origins: in memory only.
    pub(crate) relay: RelayTree,
}

pub(crate) struct Conn {
    pub(crate) a: usize,
    pub(crate) b: usize,
    pub(crate) open: bool,
    /// The time the last frame in each direction (to a, to b) is delivered.
    pub(crate) last_delivery: [Time; 2],
    /// Frames sent into a partition, per direction: TCP keeps retransmitting them, so
    /// they arrive, in order, once the partition heals, unless the connection is given
    /// up first (an idle timeout).
    pub(crate) held: [Vec<Vec<u8>>; 2],
}

pub(crate) struct Sim {
    pub(crate) config: Config,
    pub(crate) rng: Rng,
    pub(crate) now: Time,
    pub(crate) seq: u64,
    pub(crate) step: u64,
    pub(crate) trace: u64,
    pub(crate) queue: BinaryHeap<Scheduled>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) conns: BTreeMap<u64, Conn>,
    pub(crate) next_conn: u64,
    /// blocked[from][to]: frames from `from` to `to` are dropped.
    pub(crate) blocked: Vec<Vec<bool>>,
    /// Pairs `(dialer, listener)` that keep a link.
    pub(crate) edges: Vec<(usize, usize)>,
    pub(crate) namespaces: Vec<Namespace>,
    pub(crate) keys: Vec<Key>,
    pub(crate) acked: Vec<AckedWrite>,
    pub(crate) appended: u64,
    pub(crate) chaos: bool,
    pub(crate) base: Instant,
    pub(crate) group_counter: u64,
    pub(crate) stats: ReconcileStats,
    /// Acknowledged writes a machine crash under `fsync = never` took from their
    /// origin while a peer held them: they must come back by the end.
    pub(crate) returning: Vec<AckedWrite>,
    /// Acknowledged writes a machine crash under `fsync = never` took from every node.
    pub(crate) lost_writes: u64,
    /// Every dot issued, with the key and clock of its event: a dot is never issued
    /// twice.
    pub(crate) issued: BTreeMap<(Namespace, Dot), (Key, Hlc)>,
    /// Feed positions of a node that a handover skipped on its stream to a peer, by
    /// (sender, receiver): acknowledged without their events, which the handover's
    /// covers stand for.
    pub(crate) skipped: BTreeMap<(usize, usize), Vec<(u64, u64)>>,
    /// Feed positions of a node whose events its stream to a peer left out because
    /// the peer pruned their origin, by (sender, receiver): acknowledged without their
    /// events, which come by another path.
    pub(crate) relay_skipped: BTreeMap<(usize, usize), BTreeSet<u64>>,
    /// The amount of each increment of a counter namespace, by dot.
    pub(crate) increments: BTreeMap<(Namespace, Dot), i64>,
    /// Each add or remove of a set namespace, by dot: the key, the member, whether
    /// it adds, and the adds of the key its node had seen (the reference's own
    /// account, from the events in that node's feed, not from the set's state).
    pub(crate) set_ops: BTreeMap<(Namespace, Dot), SetOp>,
    /// Each write of a siblings namespace, by dot.
    pub(crate) sibling_ops: BTreeMap<(Namespace, Dot), SiblingOp>,
    /// Each patch of a JSON-map namespace, by dot: the fields it set or removed.
    pub(crate) field_ops: BTreeMap<(Namespace, Dot), FieldOp>,
    /// Nodes whose relay trees decided frames for their links: each of their links is
    /// pumped (and takes what is decided for it) once the current action is done.
    pub(crate) relay_wake: BTreeSet<usize>,
}

/// What reconciliation did in a run.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReconcileStats {
    /// Runs that ended, on either side, whatever the outcome.
    pub runs: u64,
    /// Runs that decoded their difference.
    pub decoded: u64,
    /// Keys found different by decoded runs.
    pub differences: u64,
    /// Handovers started.
    pub handovers: u64,
    /// Records compaction removed from feeds (superseded events, collected deletes).
    pub compacted: u64,
    /// Deletes collected outright, and collected with an epitaph (a node away past
    /// the horizon); epitaphs dropped once every node holds their delete.
    pub collected: u64,
    pub epitaphs: u64,
    /// Keys of CRDT namespaces collected (every entry of each), once emptied.
    pub crdt_collected: u64,
    /// Live keys of CRDT namespaces whose entries were replaced by their pruned join.
    pub crdt_pruned: u64,
    pub epitaphs_dropped: u64,
    /// Received events parked (their clock too far ahead), and released later.
    pub parked: u64,
    pub released: u64,
    /// Conditional client writes that passed, and that failed (nothing written).
    pub conditions_passed: u64,
    pub conditions_failed: u64,
    /// Relay trees: origins sent in `Prune` frames, and in `Graft` frames (after a
    /// link went down, and after a peer's summaries showed a lag), and anti-entropy
    /// runs the lag check queued.
    pub prunes: u64,
    pub grafts_link_down: u64,
    pub grafts_lag: u64,
    pub relay_runs: u64,
}

pub(crate) fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    let mut h = hash;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The links of a world, as (dialer, listener): a line or a star (one path between
/// any two nodes, so nothing covers for a link that loses data), a ring with random
/// chords, or a full mesh.
pub(crate) fn topology(rng: &mut Rng, n: usize) -> Vec<(usize, usize)> {
    let mut edges: Vec<(usize, usize)> = Vec::new();
    let mut add = |a: usize, b: usize| {
        if a != b
            && !edges
                .iter()
                .any(|&(x, y)| (x, y) == (a, b) || (x, y) == (b, a))
        {
            edges.push((a, b));
        }
    };
    match rng.below(4) {
        0 => (1..n).for_each(|i| add(i - 1, i)),
        1 => (1..n).for_each(|i| add(i, 0)),
        2 => {
            (0..n).for_each(|i| add(i, (i + 1) % n));
            for _ in 0..rng.below(n as u64) {
                add(rng.below(n as u64) as usize, rng.below(n as u64) as usize);
            }
        }
        _ => (0..n).for_each(|a| (a + 1..n).for_each(|b| add(a, b))),
    }
    edges
}

impl Sim {
    pub(crate) fn new(seed: u64, config: Config) -> Self {
        let mut rng = Rng::new(seed);
        let n = config.nodes;
        let nodes = (0..n)
            .map(|i| Node {
                id: NodeId::new((i as u64 + 1) * 0x1000 + rng.below(0xfff)).expect("nonzero"),
                up: true,
                epoch: 0,
                skew_ms: rng.range(0, 2000) as i64 - 1000,
                clock: HlcClock::new(MAX_SKEW_MS),
                store: StoreModel::new(),
                queue: VecDeque::new(),
                busy: false,
                waiting: Vec::new(),
                links: BTreeMap::new(),
                seen: Vec::new(),
                write_counter: 0,
                slow_until: 0,
                derived: BTreeMap::new(),
                derived_upto: 0,
                relay_tree: false,
                relay: RelayTree::new(),
            })
            .collect::<Vec<Node>>();
        let mut nodes = nodes;
        // Relay trees, from a generator of their own (so that a seed's faults and
        // writes are the same either way): on every node for most seeds, on none for
        // some, on some nodes only for others.
        let mut relay = Rng::new(seed ^ 0x7265_6c61_7974_7265);
        let mode = relay.below(10);
        for node in &mut nodes {
            node.relay_tree = match config.relay_tree {
                Some(on) => on,
                None if mode == 0 => false,
                None if mode == 1 => relay.chance(500),
                None => true,
            };
        }
        let edges = topology(&mut rng, n);
        // Two last-writer-wins namespaces, a counter and an add-wins set.
        let namespaces = ["ns0", "ns1", "c0", "s0", "v0", "j0"]
            .iter()
            .map(|name| Namespace::new(name).expect("valid"))
            .collect();
        let keys = (0..HOT_KEYS + COLD_KEYS)
            .map(|i| Key::new(&format!("k{i}")).expect("valid"))
            .collect();
        Sim {
            config,
            rng,
            now: 0,
            seq: 0,
            step: 0,
            trace: 0xcbf2_9ce4_8422_2325,
            queue: BinaryHeap::new(),
            nodes,
            conns: BTreeMap::new(),
            next_conn: 1,
            blocked: vec![vec![false; n]; n],
            edges,
            namespaces,
            keys,
            acked: Vec::new(),
            appended: 0,
            chaos: true,
            base: Instant::now(),
            group_counter: 0,
            stats: ReconcileStats::default(),
            returning: Vec::new(),
            lost_writes: 0,
            issued: BTreeMap::new(),
            skipped: BTreeMap::new(),
            relay_skipped: BTreeMap::new(),
            increments: BTreeMap::new(),
            set_ops: BTreeMap::new(),
            sibling_ops: BTreeMap::new(),
            field_ops: BTreeMap::new(),
            relay_wake: BTreeSet::new(),
        }
    }

    pub(crate) fn at(&self, t: Time) -> Instant {
        self.base + Duration::from_micros(t)
    }

    pub(crate) fn schedule(&mut self, delay: Time, action: Action) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at: self.now + delay,
            seq: self.seq,
            action,
        });
    }

    pub(crate) fn schedule_between(&mut self, lo: Time, hi: Time, action: Action) {
        let delay = self.rng.range(lo, hi);
        self.schedule(delay, action);
    }

    pub(crate) fn wall_ms(&self, node: usize) -> u64 {
        ((self.now / MS) as i64 + 1_700_000_000_000 + self.nodes[node].skew_ms).max(0) as u64
    }

    pub(crate) fn record(&mut self, bytes: &[u8]) {
        self.trace = fnv(self.trace, bytes);
    }

    pub(crate) fn run(&mut self) -> Result<(), Broken> {
        let n = self.config.nodes;
        // The cluster formed before the run: each node had a link with its neighbours
        // once (so each waits for them in tombstone collection, as a store does for
        // the peers it holds checkpoints of), and its store opened now.
        for (a, b) in self.edges.clone() {
            for (me, peer) in [(a, b), (b, a)] {
                let id = self.nodes[peer].id;
                let store = &mut self.nodes[me].store;
                store.checkpoints.insert(id, 0);
                store.checkpoints_synced.insert(id, 0);
            }
        }
        for i in 0..n {
            let wall = self.wall_ms(i);
            self.nodes[i].store.gc = Gc::new(wall);
            self.schedule_between(0, 10 * MS, Action::ClientWrite { node: i });
            self.schedule(SECOND, Action::Summaries { node: i, epoch: 0 });
            self.schedule(RELEASE_INTERVAL, Action::Release { node: i, epoch: 0 });
            self.schedule_between(
                COMPACT_INTERVAL / 2,
                COMPACT_INTERVAL * 3 / 2,
                Action::Compact {
                    node: i,
                    epoch: 0,
                    again: true,
                },
            );
            self.schedule(
                ANTI_ENTROPY_INTERVAL,
                Action::AntiEntropy { node: i, epoch: 0 },
            );
            self.schedule_between(MS, 50 * MS, Action::Subscribe { node: i });
            if self.config.durability == Durability::Never {
                self.schedule_between(20 * MS, 500 * MS, Action::Writeback { node: i, epoch: 0 });
            }
        }
        for (a, b) in self.edges.clone() {
            self.schedule_between(0, 5 * MS, Action::Dial { from: a, to: b });
        }
        self.schedule(50 * MS, Action::Fault);
        self.schedule(100 * MS, Action::Check);

        // Chaos: client writes and faults.
        while self.step < self.config.steps {
            self.process_one()?;
        }
        // Healing: faults stop, everything comes back, no more writes.
        self.chaos = false;
        for row in &mut self.blocked {
            row.iter_mut().for_each(|b| *b = false);
        }
        self.release_held();
        for i in 0..n {
            self.nodes[i].skew_ms = self.rng.range(0, 200) as i64 - 100;
            if !self.nodes[i].up {
                self.schedule(0, Action::Restart { node: i });
            }
        }
        // Events stamped by a clock that ran more than the skew limit ahead are refused
        // until the receivers' clocks catch up with them; the limit starts from there.
        let slowest = (0..n).map(|i| self.wall_ms(i)).min().unwrap_or(0);
        let newest = (0..n)
            .map(|i| self.nodes[i].store.max_hlc_overall().physical_ms())
            .max()
            .unwrap_or(0);
        let wait_ms = newest.saturating_sub(slowest + MAX_SKEW_MS);
        let deadline = self.now + wait_ms * MS + self.config.heal_limit.as_micros() as Time;
        loop {
            if self.converged(true) {
                return self.final_checks();
            }
            if self.now > deadline || self.queue.is_empty() {
                // Same dots, different states: the checks say which keys.
                if self.converged(false) {
                    return self.final_checks();
                }
                return Err(Broken::new(
                    Invariant::NoConvergence,
                    format!(
                        "no convergence within {:?} of simulated time after healing: {}",
                        self.config.heal_limit,
                        self.describe()
                    ),
                ));
            }
            self.process_one()?;
        }
    }

    pub(crate) fn describe(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let held: u64 = n.store.vectors.values().map(|v| v.len()).sum();
                let links: Vec<String> = n
                    .links
                    .values()
                    .map(|l| {
                        format!(
                            "->{} est={} send={} flow={:?} sent={}/{} skew={}",
                            l.peer,
                            l.session.is_established(),
                            l.session.can_send(),
                            l.session.flow_state(),
                            l.sent_through,
                            n.store.visible,
                            n.skew_ms
                        )
                    })
                    .collect();
                // What this node lacks of what the others hold, per namespace.
                let mut lacks = String::new();
                for other in &self.nodes {
                    for (ns, v) in &other.store.vectors {
                        let mine = n.store.vectors.get(ns).cloned().unwrap_or_default();
                        let missing = v.difference(&mine);
                        if !missing.is_empty() && !lacks.contains(&format!("{ns}:")) {
                            lacks.push_str(&format!(" {ns}:{missing:?}"));
                        }
                    }
                }
                format!(
                    "node {i} up={} busy={} queue={} feed={} held={held} lacks=[{}] links=[{}]",
                    n.up,
                    n.busy,
                    n.queue.len(),
                    n.store.feed.len(),
                    lacks.trim(),
                    links.join(", ")
                )
            })
            .collect::<Vec<_>>()
            .join("\n  ")
    }

    pub(crate) fn process_one(&mut self) -> Result<(), Broken> {
        let Some(next) = self.queue.pop() else {
            return Err(Broken::new(Invariant::Stalled, "nothing left to do"));
        };
        self.now = next.at;
        self.step += 1;
        let now = self.now;
        self.record(&now.to_le_bytes());
        self.record(&[action_tag(&next.action)]);
        if self.config.log {
            eprintln!(
                "{:>12.6} s  step {:>7}  {}",
                now as f64 / SECOND as f64,
                self.step,
                describe_action(&next.action)
            );
        }
        match next.action {
            Action::ClientWrite { node } => self.client_write(node),
            Action::WriterWake { node, epoch } => {
                if self.nodes[node].up && self.nodes[node].epoch == epoch {
                    self.writer_wake(node)?;
                }
            }
            Action::FsyncDone {
                node,
                epoch,
                written,
                group,
            } => {
                if self.nodes[node].up && self.nodes[node].epoch == epoch {
                    self.record(&group.to_le_bytes());
                    self.fsync_done(node, written)?;
                }
            }
            Action::Deliver { conn, to, frame } => self.deliver(conn, to, frame)?,
            Action::Disconnect { conn, to } => {
                if let Some(link) = self.nodes[to].links.get_mut(&conn) {
                    link.session.handle_disconnect("the connection broke");
                    self.pump(to, conn)?;
                }
            }
            Action::SessionTimer { node, conn } => {
                let now = self.at(self.now);
                if let Some(link) = self.nodes[node].links.get_mut(&conn) {
                    link.timer_at = None;
                    if link.session.poll_timeout().is_some_and(|t| t <= now) {
                        link.session.handle_timeout(now);
                    }
                    self.pump(node, conn)?;
                }
            }
            Action::Dial { from, to } => self.dial(from, to)?,
            Action::Summaries { node, epoch } => {
                if self.nodes[node].up && self.nodes[node].epoch == epoch {
                    let conns: Vec<u64> = self.nodes[node].links.keys().copied().collect();
                    let wall = self.wall_ms(node);
                    let n = &self.nodes[node];
                    let summary = n.store.summary_for_peers(n.id, wall);
                    let now = self.at(self.now);
                    for conn in conns {
                        if let Some(link) = self.nodes[node].links.get_mut(&conn) {
                            link.session.send_summary(summary.clone(), now);
                        }
                        self.pump(node, conn)?;
                    }
                    self.schedule(SECOND, Action::Summaries { node, epoch });
                }
            }
            Action::Compact { node, epoch, again } => {
                if self.nodes[node].up && self.nodes[node].epoch == epoch {
                    self.compact(node);
                    if again {
                        self.schedule_between(
                            COMPACT_INTERVAL / 2,
                            COMPACT_INTERVAL * 3 / 2,
                            Action::Compact { node, epoch, again },
                        );
                    }
                }
            }
            Action::Release { node, epoch } => {
                if self.nodes[node].up && self.nodes[node].epoch == epoch {
                    if !self.nodes[node].store.held.is_empty() {
                        self.schedule(0, Action::WriterWake { node, epoch });
                    }
                    self.schedule(RELEASE_INTERVAL, Action::Release { node, epoch });
                }
            }
            Action::AntiEntropy { node, epoch } => {
                if self.nodes[node].up && self.nodes[node].epoch == epoch {
                    self.anti_entropy(node)?;
                    self.schedule(ANTI_ENTROPY_INTERVAL, Action::AntiEntropy { node, epoch });
                }
            }
            Action::Writeback { node, epoch } => {
                if self.nodes[node].up && self.nodes[node].epoch == epoch {
                    let store = &mut self.nodes[node].store;
                    store.durable = store.feed.len();
                    store.checkpoints_synced = store.checkpoints.clone();
                    self.schedule_between(20 * MS, 500 * MS, Action::Writeback { node, epoch });
                }
            }
            Action::Subscribe { node } => {
                self.subscribe(node, false)?;
                self.schedule_between(5 * MS, 100 * MS, Action::Subscribe { node });
            }
            Action::Fault => {
                if self.chaos {
                    self.fault();
                    self.schedule_between(20 * MS, 300 * MS, Action::Fault);
                }
            }
            Action::Partition {
                a,
                b,
                one_way,
                heal_after,
            } => {
                if self.chaos {
                    self.blocked[a][b] = true;
                    if !one_way {
                        self.blocked[b][a] = true;
                    }
                    self.schedule(heal_after, Action::Heal { a, b });
                }
            }
            Action::Heal { a, b } => {
                self.blocked[a][b] = false;
                self.blocked[b][a] = false;
                self.release_held();
            }
            Action::Restart { node } => self.restart(node)?,
            Action::Check => {
                self.check_vectors()?;
                self.check_bounds()?;
                self.schedule(100 * MS, Action::Check);
            }
        }
        self.relay_wake()
    }
}

pub(crate) fn action_tag(action: &Action) -> u8 {
    match action {
        Action::ClientWrite { .. } => 1,
        Action::WriterWake { .. } => 2,
        Action::FsyncDone { .. } => 3,
        Action::Deliver { .. } => 4,
        Action::Disconnect { .. } => 5,
        Action::SessionTimer { .. } => 6,
        Action::Dial { .. } => 7,
        Action::Summaries { .. } => 8,
        Action::Subscribe { .. } => 9,
        Action::Fault => 10,
        Action::Partition { .. } => 11,
        Action::Heal { .. } => 12,
        Action::Restart { .. } => 13,
        Action::Check => 14,
        Action::AntiEntropy { .. } => 15,
        Action::Writeback { .. } => 16,
        Action::Compact { .. } => 17,
        Action::Release { .. } => 18,
    }
}

/// One line for the step log; a delivered frame is shown decoded, not as bytes.
pub(crate) fn describe_action(action: &Action) -> String {
    let Action::Deliver { conn, to, frame } = action else {
        return format!("{action:?}");
    };
    let what = match asp_wire::decode(frame) {
        Ok(Some((
            Frame::Events {
                first_seq,
                last_seq,
                events,
            },
            _,
        ))) => format!("Events {first_seq}..={last_seq} ({} events)", events.len()),
        Ok(Some((Frame::Summary(summaries), _))) => {
            format!("Summary ({} namespaces)", summaries.len())
        }
        Ok(Some((Frame::Hello(_), _))) => "Hello".to_string(),
        Ok(Some((other, _))) => format!("{other:?}"),
        Ok(None) => "a truncated frame".to_string(),
        Err(e) => format!("an undecodable frame: {e}"),
    };
    format!("Deliver {{ conn: {conn}, to: {to} }} {what}")
}
