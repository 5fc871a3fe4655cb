//! Deterministic simulation of an asp cluster, for tests.
//!
//! The crate's modules: `world` (nodes, links, the scheduler's actions), `writer` (each
//! node's client writes, compare-and-set, group commit and held events), `net`
//! (sessions, reconcilers and frames in flight), `compact` (compaction and tombstone
//! collection), `faults` (what the seed injects), `model` (the store model and the
//! reconciler's view of it) and `check` (the subscriber and the invariants). They share
//! one state, `world::Sim`, that every action reads and writes.
//!
//! One thread runs N nodes from a `u64` seed. Each node runs, on every link, the real
//! replication session and the real reconciler of `asp-core` (every frame goes through
//! the real `asp-wire` codec), and the real merge, version vectors, hybrid logical
//! clocks, CRDT joins, tombstone-collection rule (`asp_core::gc`) and compare-and-set
//! check (`asp_core::Condition`); the store is a model of `asp-store` with its
//! durable/visible split: a feed of events, a durable prefix advanced by fsyncs that
//! take simulated time (under `fsync = never`, by the OS writing back now and then), the
//! writer's group commit, an index that takes a group once it is durable (what peers
//! and reconciliation read), covered and compacted dots as the store's base, counters
//! issued past a durable mark, held (parked) events, epitaphs, and the reconciliation
//! items and digests of its key states. Time, the network, clocks and faults are all
//! driven by the seed, so a seed replays exactly: the same seed gives the same trace
//! hash.
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
//! slow disks; clock skew and jumps, some beyond `max_clock_skew`, whose events peers
//! hold until their own clocks catch up.
//!
//! Relay trees (protocol 5; `relay` mirrors `asp-node`'s links): on every node for
//! most seeds, off for some, on some nodes only for others (`Config::relay_tree`). A
//! node prunes peers that relay copies it holds, grafts them back when a link goes
//! down or a peer's summaries show a lag, and then queues an anti-entropy run; its
//! tree is in memory only, and starts empty after a crash.
//!
//! Namespaces: `ns0` and `ns1` last-writer-wins (some writes compare-and-set), `c0` a
//! counter, `s0` an add-wins set, `v0` siblings, `j0` a JSON map. Each event of a CRDT
//! namespace carries its node's whole view of the key, which replaces that node's
//! entry (as the store's CRDT writes do). Each node compacts now and then: superseded
//! records leave the feed (gaps, and handovers for peers that lack them), and deletes
//! go by the collection rule, as epitaphs while a node is away past the horizon.
//!
//! Invariants, checked as the run goes and at the end: no event applied twice; a node's
//! version vector is exactly the dots of its feed and of its base; no acknowledged
//! write lost; under `fsync = always`, a node holds after any crash every position of a
//! peer's feed it acknowledged (but those a handover skipped, compaction emptied or
//! the peer's relay tree left out);
//! no dot issued for two events that could have been seen; a node that collected a
//! delete never takes an older write for its key; a compare-and-set passes exactly
//! when its key is at the version it names; a change feed never changes what it
//! delivered at a position; queues stay within their bounds; and once faults stop and
//! the network heals, every node converges to the same state within a bounded simulated
//! time, with each key's state the write a reference last-writer-wins (written out in
//! the checker) picks from the key's events on every node, and under `fsync = always`
//! every counter the sum of its surviving increments, every set, siblings key and JSON
//! map what the checker's own account of each node's writes says.
//!
//! What the simulation does not cover (see docs/ARCHITECTURE.md for why the store is a
//! model): the real store's files and threads (its own power-cut and mutation tests),
//! relocation by compaction, quarantine, the tokio runtime of `asp-node` (mirrored
//! here), HTTP.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use asp_core::crdt::{JsonMap, MvRegister, OrSet, PnCounter, Policy, Sibling, State};
use asp_core::gc::Gc;
use asp_core::reconcile::{Item, ItemKey, Window};
use asp_core::session::{
    ErrorCode, Frame, NEED_PREFIX_BYTES, NamespaceSummary, ReconcileOutput, ReconcileStore,
    Reconciler, RelayTree, Session, SessionConfig, SessionEvent, SummaryMap, VectorReport,
    credit_size,
};
use asp_core::{
    Condition, ContentType, Dot, Event, Hlc, HlcClock, Key, Namespace, NodeId, Op, Version,
    VersionVector, lww_wins,
};
use bytes::Bytes;

mod check;
mod compact;
pub mod election;
mod faults;
mod model;
mod net;
mod relay;
mod world;
mod writer;

use model::*;
pub use world::ReconcileStats;
use world::*;

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
/// Events a node holds back (parked) at most (as `held_bytes_max`).
const HELD_MAX: usize = 4_096;
/// How often a node looks for held events now due (the store's writer wakes at
/// least once a second while something is parked).
const RELEASE_INTERVAL: Time = 250 * MS;
/// Keys most writes go to, and keys written now and then.
const HOT_KEYS: usize = 16;
const COLD_KEYS: usize = 16;
/// How often each node compacts (and collects tombstones), on average.
const COMPACT_INTERVAL: Time = 900 * MS;
/// Superseded records stay in the feed this long (as a namespace's retention).
const RETENTION_MS: u64 = 2_000;
/// Deletes younger than this stay (as `tombstone_ttl_ms`).
const TOMBSTONE_TTL_MS: u64 = 300;
/// A node not heard of this long stops holding collection back (as `gc_horizon_ms`):
/// short enough that partitions and crashes outlast it.
const GC_HORIZON_MS: u64 = 2_500;

/// How writes are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge after fsync; survives machine crashes.
    Always,
    /// Acknowledge once written; survives process crashes only.
    Never,
}

/// A deliberate bug in the product code the simulator runs (asp-core's merge, vectors,
/// session, reconciliation, CRDT joins, collection rule and condition check), switched
/// on through asp-core's `mutations` feature, to prove that the
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
    /// A peer's cover joins held (parked) dots into the vector: the held event is a
    /// duplicate when released and is dropped, and the write it carried is lost to
    /// this node.
    CoverClaimsHeld,
    /// Compaction collects an emptied CRDT key without waiting for every node to
    /// hold its entries: a late event made before its node saw the removals brings
    /// removed members (values, fields) back.
    CrdtCollectsUnstable,
    /// Compaction prunes a live CRDT key without waiting for every node to hold its
    /// entries: a json-map removal is forgotten while a node still holds the older
    /// value it removed, and the value comes back.
    CrdtPrunesUnstable,
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
    /// Relay trees (`relay_tree` of `ReplicationConfig`) on every node (`Some(true)`),
    /// on none (`Some(false)`), or as the seed picks (`None`): on every node for most
    /// seeds, off for some, on some nodes only for others.
    pub relay_tree: Option<bool>,
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
            relay_tree: None,
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
    /// Nodes that ran relay trees.
    pub relay_tree_nodes: usize,
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
    /// After a machine crash under `fsync = always`, a node lacks an event at a feed
    /// position of a peer that it acknowledged (outside a handover's skip).
    AckedNotHeld,
    /// A node issued a dot that an earlier, different event already carries.
    DotReused,
    /// A queue or the credit outgrew its bound.
    Bounds,
    /// The nodes did not reach the same dots within the heal limit.
    NoConvergence,
    /// The nodes hold the same dots but different key states.
    Divergence,
    /// A key's state is not the write last-writer-wins picks from its events.
    WrongWinner,
    /// A counter's value is not the sum of the increments whose events survived.
    CounterSum,
    /// A set's members are not those with an add that no remove observed.
    AddWins,
    /// A node that holds a collected delete reads its key at an older write.
    Resurrection,
    /// A siblings key's values are not those of the writes no other write had seen.
    Siblings,
    /// A JSON-map field is not what the newest patch naming it left.
    JsonFields,
    /// A compare-and-set passed on a key not at the version it named, or failed on
    /// one that was.
    Condition,
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
            relay_tree_nodes: sim.nodes.iter().filter(|n| n.relay_tree).count(),
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
            if let Some(on) = config.relay_tree {
                replay_env.push_str(&format!(" ASP_SIM_RELAY_TREE={}", u8::from(on)));
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
