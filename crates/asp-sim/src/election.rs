//! Deterministic simulation of leader namespaces: epochs, elections by voters
//! (promotions by hand and automatic failover), fencing and the divergent tail, under
//! partitions, delays, duplicates, crashes and clock drift, from a seed.
//!
//! Each node runs the decisions of `asp_core::modes` — [`History`], [`answer`],
//! [`majority`] — as `asp-node/src/modes.rs` does, over a model of what the node keeps
//! in replicated namespaces: epoch records, asks, votes, data events and heartbeats are
//! records a node writes durably and floods to every node it can reach (as relaying
//! does), held back by a partition until it heals (as a TCP stream is), delivered late
//! or twice. What this does not run: the real store, sessions and wire, which the
//! cluster simulation (`run`) and the process tests cover.
//!
//! Invariants: no two nodes accept writes in one epoch; no two leaders are ever
//! recorded for one epoch; a node's epoch never goes back; lease tokens grow within an
//! epoch and every epoch's are above every earlier epoch's (a stale leader that saw a
//! later epoch's token issues none); no accepted write is lost;
//! once healed and quiet, every node knows the same epochs, classifies every event as
//! in line or divergent the same way, and every event acknowledged by a majority of the
//! voters is in line.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use asp_core::modes::{Ask, EpochRecord, History, Standing, Vote, answer, majority};
use asp_core::{Dot, NodeId, VersionVector};

use crate::Rng;

/// One world's settings.
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    pub nodes: usize,
    pub steps: u64,
    /// Simulated ms a voter waits for the leader's heartbeat before it asks.
    pub failover_ms: u64,
}

impl ElectionConfig {
    pub fn new(nodes: usize, steps: u64) -> Self {
        ElectionConfig {
            nodes,
            steps,
            failover_ms: 500,
        }
    }
}

/// What a world did, for the sweep's totals.
#[derive(Clone, Debug, Default)]
pub struct ElectionOutcome {
    pub epochs: u64,
    pub automatic: u64,
    pub by_hand: u64,
    pub refused_asks: u64,
    pub writes: u64,
    pub divergent: u64,
    pub majority_acked: u64,
    pub tokens: u64,
}

#[derive(Clone, Debug)]
enum Rec {
    Epoch(EpochRecord),
    Ask(Ask),
    Vote {
        epoch: u64,
        voter: NodeId,
        candidate: NodeId,
        granted: bool,
    },
    Data {
        dot: Dot,
        epoch: u64,
    },
    Beat {
        node: NodeId,
        beat: u64,
    },
    /// A lease token issued by a leader (one lease, acquired over and over).
    Lease {
        token: u64,
    },
}

impl Rec {
    /// Identity for de-duplication (a record is written once, delivered any times).
    fn id(&self) -> String {
        match self {
            Rec::Epoch(r) => format!("e{}", r.epoch),
            Rec::Ask(a) => format!("a{}/{}", a.epoch, a.candidate),
            Rec::Vote { epoch, voter, .. } => format!("v{epoch}/{voter}"),
            Rec::Data { dot, .. } => format!("d{dot}"),
            Rec::Beat { node, beat } => format!("b{node}/{beat}"),
            Rec::Lease { token } => format!("l{token}"),
        }
    }
}

struct Node {
    id: NodeId,
    up: bool,
    /// Its clock's rate, per mille of true time (drift), and offset.
    rate: u64,
    offset: u64,
    epochs: BTreeMap<u64, EpochRecord>,
    asks: BTreeMap<(u64, NodeId), Ask>,
    votes: BTreeMap<(u64, NodeId), (NodeId, bool)>,
    answered: BTreeSet<u64>,
    held: VersionVector,
    epochs_of: HashMap<Dot, u64>,
    seen: HashSet<String>,
    counter: u64,
    beat: u64,
    /// Per node, the local time its heartbeat last grew, and the beat.
    heard: HashMap<NodeId, (u64, u64)>,
    /// An election it runs: the epoch, and the local time it gives up.
    running: Option<(u64, u64)>,
    highest_epoch_seen: u64,
    /// The newest epoch it knew at the end of its last turn.
    last_epoch: u64,
    /// The newest lease token it knows.
    newest_token: u64,
}

impl Node {
    fn history(&self) -> History {
        History::new(self.epochs.values().cloned().collect())
    }
    fn local(&self, now: u64) -> u64 {
        self.offset + now * self.rate / 1000
    }
}

struct Msg {
    at: u64,
    from: usize,
    to: usize,
    rec: Rec,
}

struct World {
    rng: Rng,
    now: u64,
    nodes: Vec<Node>,
    voters: Vec<NodeId>,
    /// Pairs that cannot talk (both directions); messages between them wait.
    cut: HashSet<(usize, usize)>,
    inflight: Vec<Msg>,
    /// Every write accepted: dot → (epoch, writer).
    accepted: BTreeMap<Dot, u64>,
    /// Epoch → the node that accepted writes in it.
    writer_of_epoch: HashMap<u64, NodeId>,
    /// Epoch → the leader its record names, as first written.
    leader_of_epoch: HashMap<u64, Option<NodeId>>,
    /// Writes a majority of the voters held while the writer's epoch was current.
    majority_acked: HashSet<Dot>,
    out: ElectionOutcome,
    failover_ms: u64,
    /// Epoch → the greatest lease token issued in it.
    tokens_of_epoch: BTreeMap<u64, u64>,
}

fn fail(seed: u64, now: u64, what: String) -> Result<ElectionOutcome, String> {
    Err(format!(
        "election seed {seed} at t={now} ms: {what}\n  replay: ASP_SIM_ELECTION_SEED={seed} cargo test --release -p asp-sim --test election"
    ))
}

impl World {
    fn cut(&self, a: usize, b: usize) -> bool {
        self.cut.contains(&(a.min(b), a.max(b)))
    }

    /// Node `i` writes `rec` (durably) and floods it.
    fn write(&mut self, i: usize, rec: Rec) {
        self.learn(i, rec.clone());
        for to in 0..self.nodes.len() {
            if to != i {
                self.send(i, to, rec.clone());
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, rec: Rec) {
        let delay = if self.rng.chance(50) {
            self.rng.range(50, 400)
        } else {
            self.rng.range(1, 20)
        };
        let dup = self.rng.chance(20);
        self.inflight.push(Msg {
            at: self.now + delay,
            from,
            to,
            rec: rec.clone(),
        });
        if dup {
            self.inflight.push(Msg {
                at: self.now + delay + self.rng.range(1, 100),
                from,
                to,
                rec,
            });
        }
    }

    /// Node `i` takes in a record (its own or a peer's); relays what is new to it.
    fn learn(&mut self, i: usize, rec: Rec) -> bool {
        let now = self.now;
        let n = &mut self.nodes[i];
        if !n.seen.insert(rec.id()) {
            return false;
        }
        match &rec {
            Rec::Epoch(r) => {
                n.highest_epoch_seen = n.highest_epoch_seen.max(r.epoch);
                n.epochs.insert(r.epoch, r.clone());
            }
            Rec::Ask(a) => {
                n.highest_epoch_seen = n.highest_epoch_seen.max(a.epoch);
                n.asks.insert((a.epoch, a.candidate), a.clone());
            }
            Rec::Vote {
                epoch,
                voter,
                candidate,
                granted,
            } => {
                n.votes.insert((*epoch, *voter), (*candidate, *granted));
            }
            Rec::Data { dot, epoch } => {
                n.held.insert(*dot);
                n.epochs_of.insert(*dot, *epoch);
            }
            Rec::Lease { token } => {
                n.newest_token = n.newest_token.max(*token);
            }
            Rec::Beat { node, beat } => {
                let local = n.local(now);
                let e = n.heard.entry(*node).or_insert((local, 0));
                if *beat > e.1 {
                    *e = (local, *beat);
                }
            }
        }
        true
    }

    fn deliver(&mut self) {
        let now = self.now;
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.inflight.len() {
            let m = &self.inflight[i];
            // Held back by a partition or a crashed receiver (the sender sends again
            // once it is back, as anti-entropy would), else delivered when due.
            if m.at <= now && !self.cut(m.from, m.to) && self.nodes[m.to].up {
                due.push(self.inflight.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|m| (m.at, m.from, m.to));
        for m in due {
            if self.learn(m.to, m.rec.clone()) {
                // Relay: what a node learns, its peers learn from it.
                for to in 0..self.nodes.len() {
                    if to != m.to && to != m.from && self.rng.chance(300) {
                        self.send(m.to, to, m.rec.clone());
                    }
                }
            }
        }
    }

    fn hears(&self, i: usize, node: NodeId) -> bool {
        let n = &self.nodes[i];
        if node == n.id {
            return true;
        }
        let local = n.local(self.now);
        n.heard
            .get(&node)
            .is_some_and(|&(at, _)| local.saturating_sub(at) < self.failover_ms * 3 / 5)
    }

    /// Voter `i` answers every ask it has not answered.
    fn answer_asks(&mut self, i: usize) {
        let asks: Vec<Ask> = self.nodes[i].asks.values().cloned().collect();
        for ask in asks {
            let n = &self.nodes[i];
            let history = n.history();
            if ask.epoch <= history.epoch() {
                continue;
            }
            let leader = history.current().and_then(|r| r.leader);
            let hears = leader.is_some_and(|l| self.hears(i, l));
            let answered = n.answered.contains(&ask.epoch);
            let Some(vote) = answer(&history, n.id, &n.held, &ask, answered, hears) else {
                continue;
            };
            let granted = vote == Vote::Grant;
            if !granted {
                self.out.refused_asks += 1;
            }
            let voter = n.id;
            if std::env::var_os("ASP_SIM_LOG").is_some() {
                eprintln!(
                    "t={} {voter} answers {} for epoch {}: {vote:?} (holds {:?}, asked with {:?})",
                    self.now, ask.candidate, ask.epoch, n.held, ask.vector
                );
            }
            self.nodes[i].answered.insert(ask.epoch);
            self.write(
                i,
                Rec::Vote {
                    epoch: ask.epoch,
                    voter,
                    candidate: ask.candidate,
                    granted,
                },
            );
        }
    }

    fn start_election(&mut self, i: usize, automatic: bool) {
        let n = &self.nodes[i];
        if n.running.is_some() || !self.voters.contains(&n.id) {
            return;
        }
        let history = n.history();
        if history.standing(n.id)
            == (Standing::Leader {
                epoch: history.epoch(),
            })
        {
            return;
        }
        let epoch = history.epoch().max(n.highest_epoch_seen) + 1;
        let ask = Ask {
            epoch,
            candidate: n.id,
            vector: n.held.clone(),
            require_caught_up: true,
            automatic,
        };
        let deadline = n.local(self.now) + self.failover_ms;
        self.nodes[i].running = Some((epoch, deadline));
        if automatic {
            self.out.automatic += 1;
        } else {
            self.out.by_hand += 1;
        }
        self.write(i, Rec::Ask(ask));
    }

    fn tally(&mut self, i: usize) -> Result<(), String> {
        let Some((epoch, deadline)) = self.nodes[i].running else {
            return Ok(());
        };
        let n = &self.nodes[i];
        let history = n.history();
        if history.epoch() >= epoch || n.local(self.now) >= deadline {
            self.nodes[i].running = None;
            return Ok(());
        }
        let granted = self
            .voters
            .iter()
            .filter(|v| n.votes.get(&(epoch, **v)) == Some(&(n.id, true)))
            .count();
        if granted < majority(self.voters.len()) {
            return Ok(());
        }
        let record = EpochRecord {
            epoch,
            leader: Some(n.id),
            voters: self.voters.clone(),
            start: n.held.clone(),
        };
        let id = n.id;
        self.nodes[i].running = None;
        match self.leader_of_epoch.get(&epoch) {
            Some(&other) if other != Some(id) => {
                return Err(format!(
                    "two leaders recorded for epoch {epoch}: {other:?} and {id}"
                ));
            }
            _ => {}
        }
        self.leader_of_epoch.insert(epoch, Some(id));
        self.out.epochs += 1;
        if std::env::var_os("ASP_SIM_LOG").is_some() {
            let grants: Vec<NodeId> = self
                .voters
                .iter()
                .copied()
                .filter(|v| self.nodes[i].votes.get(&(epoch, *v)) == Some(&(id, true)))
                .collect();
            eprintln!(
                "t={} {id} leads epoch {epoch}, granted by {grants:?}, start {:?}",
                self.now, self.nodes[i].held
            );
        }
        self.write(i, Rec::Epoch(record));
        Ok(())
    }

    fn client_write(&mut self, i: usize) -> Result<(), String> {
        let n = &self.nodes[i];
        let history = n.history();
        let Standing::Leader { epoch } = history.standing(n.id) else {
            return Ok(());
        };
        if let Some(&w) = self.writer_of_epoch.get(&epoch)
            && w != n.id
        {
            return Err(format!(
                "two nodes accepted writes in epoch {epoch}: {w} and {}",
                n.id
            ));
        }
        let id = n.id;
        self.writer_of_epoch.insert(epoch, id);
        self.nodes[i].counter += 1;
        let dot = Dot {
            origin: id,
            counter: self.nodes[i].counter,
        };
        self.accepted.insert(dot, epoch);
        if std::env::var_os("ASP_SIM_LOG").is_some() {
            eprintln!("t={} {id} writes {dot} in epoch {epoch}", self.now);
        }
        self.out.writes += 1;
        self.write(i, Rec::Data { dot, epoch });
        Ok(())
    }

    /// The leader issues the lease's next token (as `asp-node/src/leases.rs` does).
    /// Tokens grow within an epoch, and every token of an epoch is above every token
    /// of the epochs before it.
    fn issue_token(&mut self, i: usize) -> Result<(), String> {
        let n = &self.nodes[i];
        let Standing::Leader { epoch } = n.history().standing(n.id) else {
            return Ok(());
        };
        if n.newest_token >> 32 > epoch {
            // A newer epoch issued tokens: this leader is stale (as leases.rs refuses).
            return Ok(());
        }
        let token = (n.newest_token + 1).max((epoch << 32) | 1);
        if let Some((&e, &t)) = self.tokens_of_epoch.range(..epoch).next_back()
            && t >= token
        {
            return Err(format!(
                "epoch {epoch} issued token {token}, not above epoch {e}'s {t}"
            ));
        }
        if let Some((&e, &t)) = self.tokens_of_epoch.range(epoch + 1..).next()
            && t <= token
        {
            return Err(format!(
                "epoch {epoch} issued token {token}, not below epoch {e}'s {t}"
            ));
        }
        if self
            .tokens_of_epoch
            .get(&epoch)
            .is_some_and(|&t| t >= token)
        {
            return Err(format!(
                "epoch {epoch} issued token {token} twice or backwards"
            ));
        }
        self.tokens_of_epoch.insert(epoch, token);
        self.out.tokens += 1;
        self.write(i, Rec::Lease { token });
        Ok(())
    }

    /// Writes a majority of the voters held before any of them answered an ask for a
    /// later epoch: what a write concern of a majority of voters may acknowledge (a
    /// voter that answered for a later epoch no longer counts for an earlier one).
    fn note_majority_acks(&mut self) {
        for (&dot, &epoch) in &self.accepted {
            if self.majority_acked.contains(&dot) {
                continue;
            }
            let holders = self
                .nodes
                .iter()
                .filter(|n| {
                    self.voters.contains(&n.id)
                        && n.held.contains(dot)
                        && n.answered.iter().next_back().is_none_or(|&a| a <= epoch)
                })
                .count();
            if holders >= majority(self.voters.len()) {
                self.majority_acked.insert(dot);
                if std::env::var_os("ASP_SIM_LOG").is_some() {
                    let who: Vec<String> = self
                        .nodes
                        .iter()
                        .filter(|n| n.held.contains(dot))
                        .map(|n| {
                            format!(
                                "{} answered {:?} epochs {:?}",
                                n.id,
                                n.answered,
                                n.epochs.keys().collect::<Vec<_>>()
                            )
                        })
                        .collect();
                    eprintln!(
                        "t={} {dot} (epoch {epoch}) held by a majority: {who:?}",
                        self.now
                    );
                }
            }
        }
    }
}

/// Runs one world from `seed`.
pub fn run_election(seed: u64, config: &ElectionConfig) -> Result<ElectionOutcome, String> {
    let mut rng = Rng::new(seed ^ 0xE1EC_7105);
    let nodes: Vec<Node> = (0..config.nodes)
        .map(|i| Node {
            id: NodeId::new(0x1000 + i as u64).expect("non-zero"),
            up: true,
            rate: rng.range(900, 1100),
            offset: rng.below(1_000_000),
            epochs: BTreeMap::new(),
            asks: BTreeMap::new(),
            votes: BTreeMap::new(),
            answered: BTreeSet::new(),
            held: VersionVector::new(),
            epochs_of: HashMap::new(),
            seen: HashSet::new(),
            counter: 0,
            beat: 0,
            heard: HashMap::new(),
            running: None,
            highest_epoch_seen: 0,
            last_epoch: 0,
            newest_token: 0,
        })
        .collect();
    let voters: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
    let mut w = World {
        rng,
        now: 0,
        nodes,
        voters: voters.clone(),
        cut: HashSet::new(),
        inflight: Vec::new(),
        accepted: BTreeMap::new(),
        writer_of_epoch: HashMap::new(),
        leader_of_epoch: HashMap::new(),
        majority_acked: HashSet::new(),
        out: ElectionOutcome::default(),
        failover_ms: config.failover_ms,
        tokens_of_epoch: BTreeMap::new(),
    };
    // Epoch 1: node 0 leads, set by an operator.
    let first = EpochRecord {
        epoch: 1,
        leader: Some(voters[0]),
        voters: voters.clone(),
        start: VersionVector::new(),
    };
    w.leader_of_epoch.insert(1, Some(voters[0]));
    w.write(0, Rec::Epoch(first));
    for step in 0..config.steps {
        let quiet = step >= config.steps * 3 / 4;
        w.now += w.rng.range(1, 10);
        if !quiet {
            // Faults.
            if w.rng.chance(8) {
                let a = w.rng.below(config.nodes as u64) as usize;
                let b = w.rng.below(config.nodes as u64) as usize;
                if a != b {
                    w.cut.insert((a.min(b), a.max(b)));
                }
            }
            if w.rng.chance(4) {
                // Isolate one node.
                let a = w.rng.below(config.nodes as u64) as usize;
                for b in 0..config.nodes {
                    if a != b {
                        w.cut.insert((a.min(b), a.max(b)));
                    }
                }
            }
            if w.rng.chance(10) {
                w.cut.clear();
            }
            if w.rng.chance(2) {
                let a = w.rng.below(config.nodes as u64) as usize;
                w.nodes[a].up = !w.nodes[a].up;
                w.nodes[a].running = None;
            }
        } else {
            w.cut.clear();
            for n in &mut w.nodes {
                n.up = true;
            }
        }
        // Each node's own work.
        for i in 0..config.nodes {
            if !w.nodes[i].up {
                continue;
            }
            if w.rng.chance(100) {
                w.nodes[i].beat += 1;
                let (node, beat) = (w.nodes[i].id, w.nodes[i].beat);
                w.write(i, Rec::Beat { node, beat });
            }
            w.answer_asks(i);
            if let Err(e) = w.tally(i) {
                return fail(seed, w.now, e);
            }
            if !quiet
                && w.rng.chance(30)
                && let Err(e) = w.client_write(i)
            {
                return fail(seed, w.now, e);
            }
            if !quiet
                && w.rng.chance(10)
                && let Err(e) = w.issue_token(i)
            {
                return fail(seed, w.now, e);
            }

            // Failover: the leader silent past failover_ms, by this node's clock.
            let history = w.nodes[i].history();
            if let Some(leader) = history.current().and_then(|r| r.leader)
                && leader != w.nodes[i].id
            {
                let local = w.nodes[i].local(w.now);
                let silent = w.nodes[i]
                    .heard
                    .get(&leader)
                    .is_none_or(|&(at, _)| local.saturating_sub(at) >= w.failover_ms);
                if silent && w.rng.chance(50) {
                    w.start_election(i, true);
                }
            }
            if !quiet && w.rng.chance(1) {
                w.start_election(i, false);
            }
            let epoch = w.nodes[i].history().epoch();
            let last = w.nodes[i].last_epoch;
            if epoch < last {
                return fail(
                    seed,
                    w.now,
                    format!("node {i}'s epoch went back from {last} to {epoch}"),
                );
            }
            w.nodes[i].last_epoch = epoch;
        }
        w.deliver();
        w.note_majority_acks();
    }
    // Heal and let everything arrive: every node re-sends what it knows (anti-entropy).
    w.cut.clear();
    for round in 0..3 {
        for i in 0..config.nodes {
            let recs: Vec<Rec> = all_records(&w.nodes[i]);
            for to in 0..config.nodes {
                if to != i {
                    for r in &recs {
                        w.send(i, to, r.clone());
                    }
                }
            }
        }
        w.now += 1000 * (round + 1);
        w.deliver();
    }
    // No accepted write lost; every node knows every epoch.
    let reference = w.nodes[0].history();
    for (i, n) in w.nodes.iter().enumerate() {
        for dot in w.accepted.keys() {
            if !n.held.contains(*dot) {
                return fail(seed, w.now, format!("node {i} lost accepted write {dot}"));
            }
        }
        if n.history() != reference {
            return fail(
                seed,
                w.now,
                format!("node {i} knows other epochs than node 0"),
            );
        }
    }
    // Every node classifies every event alike; majority-acknowledged writes are in line.
    for (&dot, &epoch) in &w.accepted {
        let verdicts: Vec<Option<bool>> = w
            .nodes
            .iter()
            .map(|n| n.history().is_divergent(epoch, dot))
            .collect();
        if verdicts.iter().any(|v| *v != verdicts[0]) {
            return fail(
                seed,
                w.now,
                format!("nodes disagree on whether {dot} is divergent: {verdicts:?}"),
            );
        }
        if verdicts[0] == Some(true) {
            w.out.divergent += 1;
            if w.majority_acked.contains(&dot) {
                return fail(
                    seed,
                    w.now,
                    format!(
                        "{dot}, held by a majority of the voters in its epoch {epoch}, is divergent"
                    ),
                );
            }
        }
    }
    w.out.majority_acked = w.majority_acked.len() as u64;
    // One leader of the newest epoch, and it is that epoch's recorded leader.
    let leaders: Vec<usize> = (0..config.nodes)
        .filter(|&i| {
            matches!(
                w.nodes[i].history().standing(w.nodes[i].id),
                Standing::Leader { .. }
            )
        })
        .collect();
    if leaders.len() > 1 {
        return fail(
            seed,
            w.now,
            format!("nodes {leaders:?} all think they lead"),
        );
    }
    Ok(w.out)
}

fn all_records(n: &Node) -> Vec<Rec> {
    let mut out: Vec<Rec> = n.epochs.values().cloned().map(Rec::Epoch).collect();
    out.extend(n.asks.values().cloned().map(Rec::Ask));
    out.extend(
        n.votes
            .iter()
            .map(|(&(epoch, voter), &(candidate, granted))| Rec::Vote {
                epoch,
                voter,
                candidate,
                granted,
            }),
    );
    out.extend(
        n.epochs_of
            .iter()
            .map(|(&dot, &epoch)| Rec::Data { dot, epoch }),
    );
    out
}
