//! Deterministic simulation of an asp cluster, for tests.
//!
//! Size: one world — its scheduler, nodes, store model, network and checker — shares
//! one state that every action reads and writes; the renovation (issue 13) replaces
//! the store model with the real store, and the model's part of this file with it.
//!
//! One thread runs N nodes from a `u64` seed. Each node runs, on every link, the real
//! replication session and the real reconciler of `asp-core` (every frame goes through
//! the real `asp-wire` codec), and the real merge, version vectors and hybrid logical
//! clocks; the store is a model of `asp-store` with its durable/volatile split: a feed
//! of events, a durable prefix advanced by fsyncs that take simulated time (under
//! `fsync = never`, by the OS writing back now and then), the writer's group commit,
//! covered dots as the store's base, counters issued past a durable mark, and the
//! reconciliation items and digests of its key states. Time, the network, clocks and
//! faults are all driven by the seed, so a seed replays exactly: the same seed gives
//! the same trace hash.
//!
//! Topologies: a line or a star (leader-follower; one path between any two nodes, so
//! nothing covers for a link that loses data), a ring with random chords, a full mesh.
//!
//! Faults: frame delay (with spikes); partitions (symmetric, one-way, flapping,
//! "swizzle", isolating a node) that hold a stream's frames back until they heal, as
//! TCP does, unless a side gives up first (idle timeout); connection resets, which lose
//! whatever was in flight; a hostile stream now and then (a frame repeated, or held
//! back while later ones overtake it: the session must notice, never acknowledge past
//! a gap); process crashes (keep what was written) and machine crashes (keep only what
//! was fsynced, or under `fsync = never` written back: acknowledged writes a peer held
//! must come back, by handover), half of them aimed at a node with an fsync in flight;
//! clock skew and jumps, some beyond `max_clock_skew`, which peers must refuse.
//!
//! Invariants, checked as the run goes and at the end: no event applied twice; a node's
//! version vector is exactly the dots of its feed and of its covers; no acknowledged
//! write lost; a change feed never changes or loses what it delivered at a position;
//! queues stay within their bounds; and once faults stop and the network heals, every
//! node converges to the same state within a bounded simulated time (counted from when
//! the receivers' clocks have caught up with the newest event: events stamped by a
//! clock that ran past the skew limit are refused until then), with each key's state
//! the write a reference last-writer-wins (written out in the checker) picks from the
//! key's events on every node.
//!
//! What the simulation does not cover: the real store's files and threads (see the
//! store's own crash and torn-tail tests), conflict policies other than lww,
//! conditional writes, compaction and tombstone collection, held events; the tokio
//! runtime of `asp-node` (mirrored here: reading the feed from a peer's checkpoint
//! within credit, applying received batches and repairs and acknowledging them in order
//! once durable, the anti-entropy tick), HTTP.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use asp_core::reconcile::{Item, ItemKey, Window};
use asp_core::session::{
    ErrorCode, Frame, NEED_PREFIX_BYTES, NamespaceSummary, ReconcileOutput, ReconcileStore,
    Reconciler, Session, SessionConfig, SessionEvent, SummaryMap, credit_size,
};
use asp_core::{
    ContentType, Dot, Event, Hlc, HlcClock, Key, Namespace, NodeId, Op, Version, VersionVector,
    lww_wins,
};
use bytes::Bytes;

/// Simulated time, in microseconds.
type Time = u64;

const MS: Time = 1_000;
const SECOND: Time = 1_000_000;
/// Remote clocks further ahead than this are refused (as `max_clock_skew_ms`).
const MAX_SKEW_MS: u64 = 60_000;
/// Client requests waiting in a node's writer, at most (as `write_queue_max`).
const WRITE_QUEUE_MAX: usize = 64;
/// Requests the writer takes into one group, at most.
const GROUP_MAX: usize = 64;
/// Events per frame, at most.
const FRAME_EVENTS_MAX: usize = 256;
/// Credit each node grants each peer.
const CREDIT_WINDOW: u32 = 64 << 10;
/// Counters reserved at a time under `fsync = never` (as the store's `counters`).
const COUNTER_BLOCK: u64 = 1 << 16;
/// How often each node checks its links' digests (as `anti_entropy_interval_ms`).
const ANTI_ENTROPY_INTERVAL: Time = 700 * MS;
/// Bytes of repairs per frame, at most (as `batch_bytes_max`).
const REPAIR_FRAME_BYTES: usize = 16 << 10;

/// How writes are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge after fsync; survives machine crashes.
    Always,
    /// Acknowledge once written; survives process crashes only.
    Never,
}

/// A deliberate bug in the product code the simulator runs (asp-core's merge and
/// session), switched on through asp-core's `mutations` feature, to prove that the
/// simulator catches it. The store's bugs live in asp-store's own switch and are
/// caught by its fault-injecting tests (`crates/asp-store/tests/mutations.rs`): the
/// store here is a model.
pub use asp_core::mutation::Mutation;

/// A deliberate fault in the simulator's *store model*: not product code. These prove
/// that the checker sees the invariants the store must keep (an acknowledged write
/// lost, an event applied twice, a feed position that changed), which product
/// mutations in the session and merge do not reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFault {
    /// Client writes are acknowledged before their fsync.
    AckBeforeFsync,
    /// An event whose dot is already held is applied again.
    ForgetDedupe,
    /// Events show in the feed (to subscribers and peers) before they are durable.
    VisibleBeforeDurable,
    /// Counters are issued from what the feed holds, without the durable mark: after
    /// a machine crash under `fsync = never` a node issues again counters its peers
    /// hold, and they drop the new events as duplicates: the nodes never agree.
    ReuseCounters,
}

/// Switches asp-core's mutation on for this thread while a world runs, and off again
/// however the run ends.
struct CoreMutation;

impl CoreMutation {
    fn on(mutation: Option<Mutation>) -> Self {
        asp_core::mutation::set(mutation);
        CoreMutation
    }
}

impl Drop for CoreMutation {
    fn drop(&mut self) {
        asp_core::mutation::set(None);
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub nodes: usize,
    /// Actions processed while faults and client writes go on.
    pub steps: u64,
    pub durability: Durability,
    pub mutation: Option<Mutation>,
    /// A fault in the store model (see [`ModelFault`]).
    pub model_fault: Option<ModelFault>,
    /// Simulated time allowed for convergence after the faults stop.
    pub heal_limit: Duration,
    /// Print every action to stderr as it runs (for replaying one seed).
    pub log: bool,
}

impl Config {
    pub fn new(nodes: usize, steps: u64, durability: Durability) -> Self {
        Config {
            nodes,
            steps,
            durability,
            mutation: None,
            model_fault: None,
            heal_limit: Duration::from_secs(120),
            log: false,
        }
    }
}

/// What a successful run did.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// A hash of every action processed and its effect: equal for equal seeds.
    pub trace_hash: u64,
    /// Actions processed, chaos and healing together.
    pub steps: u64,
    /// Events appended to feeds, all nodes together.
    pub events: u64,
    /// Client writes acknowledged.
    pub acked_writes: u64,
    /// Simulated time at the end.
    pub simulated: Duration,
    pub reconcile: ReconcileStats,
    /// Acknowledged writes machine crashes under `fsync = never` took from every node
    /// (that mode promises nothing across one).
    pub lost_writes: u64,
}

/// Which guarantee a failed run broke, so that a test can tell one bug from another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invariant {
    /// An event whose dot a node already held was applied again.
    AppliedTwice,
    /// A node's version vector is not exactly the dots of its feed.
    VectorMismatch,
    /// An acknowledged client write is missing from its origin after a restart.
    AckedWriteLost,
    /// After healing, an acknowledged client write is held by no node.
    AckedWriteMissing,
    /// A feed position a subscriber read changed or disappeared.
    FeedChanged,
    /// A peer's checkpoint passed the feed visible to it.
    CheckpointPastFeed,
    /// A queue or the credit outgrew its bound.
    Bounds,
    /// The nodes did not reach the same dots within the heal limit.
    NoConvergence,
    /// The nodes hold the same dots but different key states.
    Divergence,
    /// A key's state is not the write last-writer-wins picks from its events.
    WrongWinner,
    /// A session did something no correct peer or node can cause (an unexpected
    /// refusal, an undecodable frame, an unknown peer).
    Protocol,
    /// A link kept producing output without end.
    Runaway,
    /// The world ran out of things to do.
    Stalled,
}

/// A broken invariant, as the run finds it.
struct Broken {
    invariant: Invariant,
    message: String,
}

impl Broken {
    fn new(invariant: Invariant, message: impl Into<String>) -> Self {
        Broken {
            invariant,
            message: message.into(),
        }
    }
}

/// A broken invariant, with what is needed to replay it.
#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub step: u64,
    pub invariant: Invariant,
    pub message: String,
    /// The replay command's environment beyond the seed.
    replay_env: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} failed at step {} ({:?}): {}\n  replay (ASP_SIM_LOG=1 prints every step): ASP_SIM_SEED={}{} cargo test --release -p asp-sim --test sim replay_one_seed -- --nocapture",
            self.seed, self.step, self.invariant, self.message, self.seed, self.replay_env
        )
    }
}

/// Runs one simulated world.
pub fn run(seed: u64, config: &Config) -> Result<Outcome, Failure> {
    let _mutation = CoreMutation::on(config.mutation);
    let mut sim = Sim::new(seed, config.clone());
    match sim.run() {
        Ok(()) => Ok(Outcome {
            trace_hash: sim.trace,
            steps: sim.step,
            events: sim.appended,
            acked_writes: sim.acked.len() as u64,
            simulated: Duration::from_micros(sim.now),
            reconcile: sim.stats,
            lost_writes: sim.lost_writes,
        }),
        Err(Broken { invariant, message }) => {
            let mut replay_env = String::new();
            if config.durability == Durability::Never {
                replay_env.push_str(" ASP_SIM_NEVER=1");
            }
            if config.steps != 10_000 {
                replay_env.push_str(&format!(" ASP_SIM_STEPS={}", config.steps));
            }
            if let Some(m) = config.mutation {
                replay_env.push_str(&format!(" ASP_SIM_MUTATION={m:?}"));
            }
            if let Some(f) = config.model_fault {
                replay_env.push_str(&format!(" ASP_SIM_MODEL_FAULT={f:?}"));
            }
            Err(Failure {
                seed,
                step: sim.step,
                invariant,
                message,
                replay_env,
            })
        }
    }
}

/// A small deterministic generator (xorshift64*), seeded by splitmix64.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability `per_mille / 1000`.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

#[derive(Clone, Debug)]
enum Action {
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

struct Scheduled {
    at: Time,
    seq: u64,
    action: Action,
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

/// A key's state: the winning event's version, and its value (`None` if deleted).
type KeyState = (Version, Option<Bytes>);

/// A model of `asp-store`: the feed, its durable prefix, and what is derived from it.
struct StoreModel {
    feed: Vec<Event>,
    /// `feed[..durable]` survives a machine crash.
    durable: usize,
    /// Readers (peers, subscribers) see `feed[..visible]`.
    visible: usize,
    vectors: BTreeMap<Namespace, VersionVector>,
    max_hlc: BTreeMap<Namespace, Hlc>,
    state: BTreeMap<(Namespace, Key), KeyState>,
    /// Per peer: how far it holds this node's feed. Written with the index, which a
    /// machine crash may roll back to the last fsync.
    checkpoints: BTreeMap<NodeId, u64>,
    checkpoints_synced: BTreeMap<NodeId, u64>,
    /// Dots a peer's reconciliation said this node holds the effect of (their events
    /// superseded by state it received): part of the vectors with no event in the
    /// feed, as the store's base. Durable with the group that records them.
    covered: BTreeMap<Namespace, VersionVector>,
    covered_synced: BTreeMap<Namespace, VersionVector>,
    item_key: ItemKey,
    /// Per namespace, the highest counter this node issued in this life, and the
    /// durable mark (`fsync = never` only) below which it may have issued any: after a
    /// crash it counts on from the mark, never reusing a counter peers may hold (the
    /// store's `counters` file).
    issued: BTreeMap<Namespace, u64>,
    marks: BTreeMap<Namespace, u64>,
}

impl StoreModel {
    fn new() -> Self {
        StoreModel {
            feed: Vec::new(),
            durable: 0,
            visible: 0,
            vectors: BTreeMap::new(),
            max_hlc: BTreeMap::new(),
            state: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            checkpoints_synced: BTreeMap::new(),
            covered: BTreeMap::new(),
            covered_synced: BTreeMap::new(),
            item_key: ItemKey::derive(b"asp-sim"),
            issued: BTreeMap::new(),
            marks: BTreeMap::new(),
        }
    }

    /// Issues `count` counters for this node's events in `namespace`; returns the
    /// first. Under `fsync = never` they are reserved first: the mark is raised (and
    /// durable) a block beyond them.
    fn issue(&mut self, namespace: &Namespace, id: NodeId, count: u64, reserve: bool) -> u64 {
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
    fn cover(&mut self, namespace: &Namespace, vector: &VersionVector) {
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
    fn items(&self, namespace: &Namespace) -> Vec<Item> {
        self.state
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|((_, key), (version, _))| self.item_key.item(key.as_str().as_bytes(), version))
            .collect()
    }

    /// A namespace's digest: the first coded symbol of its items, as the store keeps it.
    fn digest(&self, namespace: &Namespace) -> asp_core::reconcile::Symbol {
        let mut window = Window::new(self.item_key, 1);
        window.add_all(&self.items(namespace));
        window.symbols()[0].canonical()
    }

    /// The event a key's state came from (always in the feed: the state is derived
    /// from it).
    fn event_of(&self, namespace: &Namespace, version: &Version) -> Option<&Event> {
        self.feed
            .iter()
            .rev()
            .find(|e| e.dot == version.dot && &e.namespace == namespace)
    }

    fn holds(&self, dot: Dot, ns: &Namespace) -> bool {
        self.vectors.get(ns).is_some_and(|v| v.contains(dot))
    }

    /// Appends an event and merges it into its key. Returns its feed position.
    fn append(&mut self, event: Event) -> u64 {
        self.vectors
            .entry(event.namespace.clone())
            .or_default()
            .insert(event.dot);
        let max = self
            .max_hlc
            .entry(event.namespace.clone())
            .or_insert(Hlc::ZERO);
        *max = (*max).max(event.hlc);
        let value = match &event.op {
            Op::Put { value, .. } => Some(value.clone()),
            Op::Delete => None,
        };
        let version = event.version();
        let key = (event.namespace.clone(), event.key.clone());
        match self.state.get(&key) {
            Some((current, _)) if !lww_wins(&version, current) => {}
            _ => {
                self.state.insert(key, (version, value));
            }
        }
        self.feed.push(event);
        self.feed.len() as u64
    }

    /// What survives a crash, then a replay of the log.
    fn crash(&mut self, machine: bool) {
        if machine {
            self.feed.truncate(self.durable);
            self.checkpoints = self.checkpoints_synced.clone();
            self.covered = self.covered_synced.clone();
        }
        // Counting goes on after the mark (no mark: after what the feed holds).
        self.issued = self.marks.clone();
        self.durable = self.feed.len();
        self.visible = self.feed.len();
        let feed = std::mem::take(&mut self.feed);
        self.vectors.clear();
        self.max_hlc.clear();
        self.state.clear();
        for event in feed {
            self.append(event);
        }
        for (ns, vector) in &self.covered {
            self.vectors.entry(ns.clone()).or_default().join(vector);
        }
        let head = self.feed.len() as u64;
        for seq in self.checkpoints.values_mut() {
            *seq = (*seq).min(head);
        }
    }

    fn summary(&self) -> Vec<NamespaceSummary> {
        self.vectors
            .iter()
            .map(|(ns, vector)| NamespaceSummary {
                namespace: ns.clone(),
                max_hlc: self.max_hlc.get(ns).copied().unwrap_or(Hlc::ZERO),
                vector: vector.clone(),
                digest: Some(self.digest(ns)),
                // Nor does it collect tombstones.
                reports: Vec::new(),
            })
            .collect()
    }

    fn max_hlc_overall(&self) -> Hlc {
        self.feed.iter().map(|e| e.hlc).max().unwrap_or(Hlc::ZERO)
    }
}

/// The store model as reconciliation reaches it: reads straight from the model;
/// covered dots are collected and queued to the writer after the call, behind the
/// repairs queued before them (as the node's link drains them first).
struct ModelView<'a> {
    store: &'a StoreModel,
    covers: RefCell<Vec<(Namespace, VersionVector)>>,
}

impl<'a> ModelView<'a> {
    fn new(store: &'a StoreModel) -> Self {
        ModelView {
            store,
            covers: RefCell::new(Vec::new()),
        }
    }

    /// The keys of a namespace with their state, in key order.
    fn keys(&self, namespace: &Namespace) -> impl Iterator<Item = (&'a Key, &'a Version)> + 'a {
        let namespace = namespace.clone();
        self.store
            .state
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
            .vectors
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
        self.store.vectors.iter().any(|(ns, vector)| {
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
                    .event_of(namespace, version)
                    .ok_or_else(|| format!("key {key} has no event in the feed"))?;
                out.push(event.clone());
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
        for (key, version) in self.keys(namespace) {
            if after.is_some_and(|a| key <= a) {
                continue;
            }
            if !out.is_empty() && (out.len() >= events_max || bytes >= bytes_max as u64) {
                let last = out.last().expect("not empty").key.clone();
                return Ok((out, Some(last)));
            }
            let event = self
                .store
                .event_of(namespace, version)
                .ok_or_else(|| format!("key {key} has no event in the feed"))?;
            bytes += credit_size(event);
            out.push(event.clone());
        }
        Ok((out, None))
    }

    fn cover(&self, namespace: &Namespace, vector: VersionVector) -> Result<(), String> {
        self.covers.borrow_mut().push((namespace.clone(), vector));
        Ok(())
    }
}

enum Request {
    Local {
        namespace: Namespace,
        ops: Vec<(Key, Option<Bytes>)>,
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

enum Ack {
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
struct AckedWrite {
    origin: usize,
    namespace: Namespace,
    dot: Dot,
}

struct Link {
    peer: usize,
    session: Session,
    /// The real reconciliation state machine, over the store model.
    reconciler: Reconciler,
    /// The last feed position sent to the peer.
    sent_through: u64,
    /// When a session timer is scheduled.
    timer_at: Option<Time>,
}

struct Node {
    id: NodeId,
    up: bool,
    /// Bumped on each crash: actions of an earlier life are ignored.
    epoch: u64,
    skew_ms: i64,
    clock: HlcClock,
    store: StoreModel,
    queue: VecDeque<Request>,
    busy: bool,
    /// Acknowledgements waiting for the fsync in flight.
    waiting: Vec<Ack>,
    links: BTreeMap<u64, Link>,
    /// The change-feed subscriber: its cursor and every dot it was given, by position.
    /// The client keeps them across the node's crashes.
    seen: Vec<Dot>,
    write_counter: u64,
    /// The dots of `store.feed[..derived_upto]`, kept by the checker to compare with
    /// the store's vectors without rereading the whole feed each time. A plain set, not
    /// a `VersionVector`: the check must not share the code it checks.
    derived: BTreeMap<Namespace, BTreeSet<Dot>>,
    derived_upto: usize,
}

struct Conn {
    a: usize,
    b: usize,
    open: bool,
    /// The time the last frame in each direction (to a, to b) is delivered.
    last_delivery: [Time; 2],
    /// Frames sent into a partition, per direction: TCP keeps retransmitting them, so
    /// they arrive, in order, once the partition heals, unless the connection is given
    /// up first (an idle timeout).
    held: [Vec<Vec<u8>>; 2],
}

struct Sim {
    config: Config,
    rng: Rng,
    now: Time,
    seq: u64,
    step: u64,
    trace: u64,
    queue: BinaryHeap<Scheduled>,
    nodes: Vec<Node>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    /// blocked[from][to]: frames from `from` to `to` are dropped.
    blocked: Vec<Vec<bool>>,
    /// Pairs `(dialer, listener)` that keep a link.
    edges: Vec<(usize, usize)>,
    namespaces: Vec<Namespace>,
    keys: Vec<Key>,
    acked: Vec<AckedWrite>,
    appended: u64,
    chaos: bool,
    base: Instant,
    group_counter: u64,
    stats: ReconcileStats,
    /// Acknowledged writes a machine crash under `fsync = never` took from their
    /// origin while a peer held them: they must come back by the end.
    returning: Vec<AckedWrite>,
    /// Acknowledged writes a machine crash under `fsync = never` took from every node.
    lost_writes: u64,
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
}

fn fnv(hash: u64, bytes: &[u8]) -> u64 {
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
fn topology(rng: &mut Rng, n: usize) -> Vec<(usize, usize)> {
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
    fn new(seed: u64, config: Config) -> Self {
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
                derived: BTreeMap::new(),
                derived_upto: 0,
            })
            .collect();
        let edges = topology(&mut rng, n);
        let namespaces = (0..2)
            .map(|i| Namespace::new(&format!("ns{i}")).expect("valid"))
            .collect();
        let keys = (0..16)
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
        }
    }

    fn at(&self, t: Time) -> Instant {
        self.base + Duration::from_micros(t)
    }

    fn schedule(&mut self, delay: Time, action: Action) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at: self.now + delay,
            seq: self.seq,
            action,
        });
    }

    fn schedule_between(&mut self, lo: Time, hi: Time, action: Action) {
        let delay = self.rng.range(lo, hi);
        self.schedule(delay, action);
    }

    fn wall_ms(&self, node: usize) -> u64 {
        ((self.now / MS) as i64 + 1_700_000_000_000 + self.nodes[node].skew_ms).max(0) as u64
    }

    fn record(&mut self, bytes: &[u8]) {
        self.trace = fnv(self.trace, bytes);
    }

    fn run(&mut self) -> Result<(), Broken> {
        let n = self.config.nodes;
        for i in 0..n {
            self.schedule_between(0, 10 * MS, Action::ClientWrite { node: i });
            self.schedule(SECOND, Action::Summaries { node: i, epoch: 0 });
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
            if self.converged() {
                return self.final_checks();
            }
            if self.now > deadline || self.queue.is_empty() {
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

    fn describe(&self) -> String {
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
                format!(
                    "node {i} up={} busy={} queue={} feed={} held={held} links=[{}]",
                    n.up,
                    n.busy,
                    n.queue.len(),
                    n.store.feed.len(),
                    links.join(", ")
                )
            })
            .collect::<Vec<_>>()
            .join("\n  ")
    }

    fn process_one(&mut self) -> Result<(), Broken> {
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
                    let summary = self.nodes[node].store.summary();
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
        Ok(())
    }

    fn client_write(&mut self, node: usize) {
        if self.chaos {
            let delay = self.rng.range(MS, 15 * MS);
            self.schedule(delay, Action::ClientWrite { node });
        } else {
            return;
        }
        if !self.nodes[node].up || self.nodes[node].queue.len() >= WRITE_QUEUE_MAX {
            return;
        }
        let namespace =
            self.namespaces[self.rng.below(self.namespaces.len() as u64) as usize].clone();
        let ops = (0..self.rng.range(1, 4))
            .map(|_| {
                let key = self.keys[self.rng.below(self.keys.len() as u64) as usize].clone();
                self.nodes[node].write_counter += 1;
                let value = (!self.rng.chance(150))
                    .then(|| Bytes::from(format!("n{node}-{}", self.nodes[node].write_counter)));
                (key, value)
            })
            .collect();
        self.nodes[node]
            .queue
            .push_back(Request::Local { namespace, ops });
        let epoch = self.nodes[node].epoch;
        self.schedule(0, Action::WriterWake { node, epoch });
    }

    /// The writer: takes what is queued, appends it, and acknowledges after the fsync
    /// (`always`) or at once (`never`).
    fn writer_wake(&mut self, node: usize) -> Result<(), Broken> {
        if self.nodes[node].busy || self.nodes[node].queue.is_empty() {
            return Ok(());
        }
        let fault = self.config.model_fault;
        let wall = self.wall_ms(node);
        let take = self.nodes[node].queue.len().min(GROUP_MAX);
        let group: Vec<Request> = self.nodes[node].queue.drain(..take).collect();
        let mut acks = Vec::new();
        for request in group {
            match request {
                Request::Local { namespace, ops } => {
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
                        let op = match value {
                            Some(value) => Op::Put {
                                content_type: ContentType::Text,
                                value,
                            },
                            None => Op::Delete,
                        };
                        let event = Event {
                            namespace: namespace.clone(),
                            key,
                            op,
                            dot,
                            hlc,
                            context: Bytes::new(),
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
                    if self.refuse_skewed(node, conn, &events, wall)? {
                        continue;
                    }
                    let n = &mut self.nodes[node];
                    for event in events {
                        let held = n.store.holds(event.dot, &event.namespace);
                        if held && fault != Some(ModelFault::ForgetDedupe) {
                            continue;
                        }
                        if held {
                            return Err(Broken::new(
                                Invariant::AppliedTwice,
                                format!("node {node} applied event {} twice", event.dot),
                            ));
                        }
                        let _ = n.clock.observe(event.hlc, wall);
                        n.store.append(event);
                        self.appended += 1;
                    }
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
                    if self.refuse_skewed(node, conn, &events, wall)? {
                        continue;
                    }
                    // The current state of keys the peer found different: a dot held
                    // already is the same event (the model holds one state per dot).
                    let n = &mut self.nodes[node];
                    let mut applied = 0;
                    for event in events {
                        if n.store.holds(event.dot, &event.namespace) {
                            continue;
                        }
                        let _ = n.clock.observe(event.hlc, wall);
                        n.store.append(event);
                        self.appended += 1;
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
                        self.nodes[node].store.cover(&namespace, &vector);
                    }
                }
            }
        }
        let written = self.nodes[node].store.feed.len();
        if fault == Some(ModelFault::VisibleBeforeDurable) {
            // Readers hear of the events at once, as they would of durable ones.
            self.nodes[node].store.visible = written;
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
                let latency = if self.rng.chance(20) {
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
                // Durable only once the OS writes the pages back (`Writeback`); the
                // covered dots' base file is fsynced when written.
                self.nodes[node].store.visible = written;
                self.nodes[node].store.covered_synced = self.nodes[node].store.covered.clone();
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

    /// Refuses a batch (closing its link) if an event's clock is past the skew limit
    /// of this node's wall clock; returns whether it did.
    fn refuse_skewed(
        &mut self,
        node: usize,
        conn: u64,
        events: &[Event],
        wall: u64,
    ) -> Result<bool, Broken> {
        let Some(e) = events
            .iter()
            .find(|e| e.hlc.physical_ms() > wall + MAX_SKEW_MS)
        else {
            return Ok(false);
        };
        let message = format!("event {} is {} ms ahead", e.dot, e.hlc.physical_ms() - wall);
        let now = self.at(self.now);
        if let Some(link) = self.nodes[node].links.get_mut(&conn) {
            link.session.close(ErrorCode::ClockSkew, message, now);
            self.pump(node, conn)?;
        }
        Ok(true)
    }

    fn fsync_done(&mut self, node: usize, written: usize) -> Result<(), Broken> {
        let n = &mut self.nodes[node];
        n.store.durable = n.store.durable.max(written);
        n.store.visible = n.store.visible.max(written);
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

    fn acknowledge(&mut self, node: usize, acks: Vec<Ack>) -> Result<(), Broken> {
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

    fn session_config(&self, node: usize) -> SessionConfig {
        let mut c = SessionConfig::new(self.nodes[node].id, "sim");
        c.heartbeat = Duration::from_millis(200);
        c.idle_timeout = Duration::from_millis(1500);
        c.handshake_timeout = Duration::from_millis(1500);
        c.credit_window_bytes = CREDIT_WINDOW;
        c
    }

    fn dial(&mut self, from: usize, to: usize) -> Result<(), Broken> {
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
            let session = Session::new(self.session_config(me), now);
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
                },
            );
        }
        self.pump(from, conn)?;
        self.pump(to, conn)?;
        Ok(())
    }

    /// Runs a link after its session changed: frames out, events in, feed reading.
    fn pump(&mut self, node: usize, conn: u64) -> Result<(), Broken> {
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
                while last < n.store.visible && last - first < FRAME_EVENTS_MAX {
                    let cost = credit_size(&n.store.feed[last]);
                    if last > first && cost > budget {
                        break;
                    }
                    budget = budget.saturating_sub(cost);
                    last += 1;
                }
                let events = n.store.feed[first..last].to_vec();
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

    fn session_event(&mut self, node: usize, conn: u64, event: SessionEvent) -> Result<(), Broken> {
        let now = self.at(self.now);
        match event {
            SessionEvent::Established(info) => {
                let Some(peer) = self.nodes.iter().position(|n| n.id == info.node_id) else {
                    return Err(Broken::new(
                        Invariant::Protocol,
                        format!("node {node} established with unknown {}", info.node_id),
                    ));
                };
                let n = &mut self.nodes[node];
                let checkpoint = n.store.checkpoints.get(&info.node_id).copied().unwrap_or(0);
                let summary = n.store.summary();
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
            SessionEvent::PeerHead { .. } => {}
            SessionEvent::PeerSummary(summary) => {
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
    fn reconcile(&mut self, node: usize, conn: u64, f: impl FnOnce(&mut Reconciler, &ModelView)) {
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
    fn anti_entropy(&mut self, node: usize) -> Result<(), Broken> {
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
    fn flush_closed(&mut self, node: usize, conn: u64) {
        let Some(mut link) = self.nodes[node].links.remove(&conn) else {
            return;
        };
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

    fn transmit(&mut self, conn: u64, from: usize, to: usize, frame: Vec<u8>) {
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
    fn release_held(&mut self) {
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

    fn deliver(&mut self, conn: u64, to: usize, bytes: Vec<u8>) -> Result<(), Broken> {
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

    fn subscribe(&mut self, node: usize, full: bool) -> Result<(), Broken> {
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
    fn subscriber_reads(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        for i in n.seen.len()..n.store.visible {
            n.seen.push(n.store.feed[i].dot);
        }
    }

    fn fault(&mut self) {
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
            _ => {}
        }
    }

    fn crash(&mut self, node: usize, machine: bool) {
        self.record(if machine { b"machine" } else { b"process" });
        let n = &mut self.nodes[node];
        n.up = false;
        n.epoch += 1;
        n.busy = false;
        n.queue.clear();
        n.waiting.clear();
        n.store.crash(machine);
        n.derived.clear();
        n.derived_upto = 0;
        let conns: Vec<u64> = n.links.keys().copied().collect();
        n.links.clear();
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

    fn restart(&mut self, node: usize) -> Result<(), Broken> {
        if self.nodes[node].up {
            return Ok(());
        }
        let n = &mut self.nodes[node];
        n.up = true;
        n.clock = HlcClock::with_last(n.store.max_hlc_overall(), MAX_SKEW_MS);
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
        // Nor may a position a subscriber was given hold anything else now.
        self.subscribe(node, true)?;
        let epoch = self.nodes[node].epoch;
        self.schedule(0, Action::WriterWake { node, epoch });
        self.schedule(SECOND, Action::Summaries { node, epoch });
        self.schedule(ANTI_ENTROPY_INTERVAL, Action::AntiEntropy { node, epoch });
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

    /// A version vector must be exactly the dots of the feed and those a peer's
    /// reconciliation covered.
    fn check_vectors(&mut self) -> Result<(), Broken> {
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
    fn check_winners(&self) -> Result<(), Broken> {
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
        let mut winners: BTreeMap<(&Namespace, &Key), &Event> = BTreeMap::new();
        for e in self.nodes.iter().flat_map(|n| &n.store.feed) {
            let w = winners.entry((&e.namespace, &e.key)).or_insert(e);
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

    fn check_bounds(&self) -> Result<(), Broken> {
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

    fn converged(&self) -> bool {
        let first = &self.nodes[0];
        self.nodes
            .iter()
            .all(|n| n.up && !n.busy && n.queue.is_empty())
            && self.nodes.iter().all(|n| {
                n.store.vectors == first.store.vectors && n.store.visible == n.store.feed.len()
            })
    }

    fn final_checks(&mut self) -> Result<(), Broken> {
        self.check_vectors()?;
        let first = &self.nodes[0].store.state;
        for (i, n) in self.nodes.iter().enumerate() {
            if &n.store.state != first {
                return Err(Broken::new(
                    Invariant::Divergence,
                    format!("node {i} holds the same events as node 0 but a different state"),
                ));
            }
        }
        self.check_winners()?;
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

fn action_tag(action: &Action) -> u8 {
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
    }
}

/// One line for the step log; a delivered frame is shown decoded, not as bytes.
fn describe_action(action: &Action) -> String {
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

fn frame_tag(frame: &Frame) -> u8 {
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
        Frame::RepairEnd { repairs: Some(_), .. } => 15,
    }
}
