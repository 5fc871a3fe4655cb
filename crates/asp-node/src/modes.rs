//! Leader namespaces: the epoch records, elections by the voters, the write gate and
//! the list of divergent events (the decisions are `asp_core::modes`; docs/MODES.md).
//!
//! Everything is kept in replicated namespaces, so it travels like data, through
//! relays, and survives restarts:
//! - `_asp.modes`: `ns/<hash>/epoch/<epoch>` → `{"mode", "leader", "voters", "start"}`,
//!   one key per epoch, so that the newest epoch wins whatever the clocks say;
//! - `_asp.elections`: `ns/<hash>/ask/<epoch>/<candidate>` → `{"vector",
//!   "require_caught_up"}` and `ns/<hash>/vote/<epoch>/<voter>` → `{"candidate",
//!   "granted", "reason"}`. A voter writes one answer per epoch, durably, before the
//!   candidate can count it;
//! - `_asp.divergent.<hash>`: `<dot>` → the divergent event's key, epoch and clock. Its
//!   own namespace per namespace so that residency withholds it with the data.
//!
//! `<hash>` is the hash residency rules use: a namespace's name never reaches a node
//! through these records.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use asp_core::modes::{Ask, EpochRecord, History, Standing, VOTERS_MAX, Vote, answer, majority};
use asp_core::{Key, Namespace, NodeId, RangeSet, VersionVector};
use asp_store::{LeaderMode, Store, WriteOp};
use serde_json::{Value, json};

pub const MODES_NAMESPACE: &str = "_asp.modes";
pub const ELECTIONS_NAMESPACE: &str = "_asp.elections";
/// Followed by a namespace's hash: where its divergent events are listed.
pub const DIVERGENT_PREFIX: &str = "_asp.divergent.";

/// The node's own namespaces: always multi-master.
const OWN_PREFIX: &str = "_asp.";

/// The hash that names a namespace in the records (that of residency rules).
pub fn hash_of(namespace: &str) -> String {
    crate::residency::rule_key(namespace)["ns/".len()..].to_owned()
}

pub fn divergent_namespace(namespace: &str) -> Namespace {
    Namespace::new(&format!("{DIVERGENT_PREFIX}{}", hash_of(namespace))).expect("a valid name")
}

fn ns(name: &str) -> Namespace {
    Namespace::new(name).expect("a valid name")
}

/// The namespaces this node holds, by their hash: records name namespaces by hash
/// only, so a node learns which one an election is about from what it holds.
fn names_by_hash(store: &Store) -> HashMap<String, Namespace> {
    store
        .status()
        .namespaces
        .into_iter()
        .map(|(n, _)| (hash_of(n.as_str()), n))
        .collect()
}

fn epoch_key(hash: &str, epoch: u64) -> String {
    format!("ns/{hash}/epoch/{epoch:020}")
}

/// Why a mode change or a promotion did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error("{0}")]
    Invalid(String),
    /// The namespace is multi-master, or this node is not a voter: 409.
    #[error("{0}")]
    Conflict(String),
    /// A majority of the voters did not grant the promotion in time: 409 `no_quorum`.
    #[error("{0}")]
    NoQuorum(String),
    #[error("{0}")]
    Store(String),
}

fn vector_json(v: &VersionVector) -> Value {
    let map: serde_json::Map<String, Value> = v
        .iter()
        .map(|(origin, set)| (origin.to_string(), json!(set.ranges())))
        .collect();
    Value::Object(map)
}

fn vector_of(value: &Value) -> Option<VersionVector> {
    let mut v = VersionVector::new();
    for (origin, ranges) in value.as_object()? {
        let origin: NodeId = origin.parse().ok()?;
        let ranges: Vec<(u64, u64)> = serde_json::from_value(ranges.clone()).ok()?;
        if ranges.iter().any(|&(lo, hi)| lo == 0 || lo > hi) {
            return None;
        }
        v.insert_set(origin, &RangeSet::from_ranges(ranges));
    }
    Some(v)
}

fn nodes_of(value: &Value) -> Option<Vec<NodeId>> {
    value
        .as_array()?
        .iter()
        .map(|v| v.as_str().and_then(|s| s.parse().ok()))
        .collect()
}

fn record_json(r: &EpochRecord, by: NodeId) -> Value {
    json!({
        "mode": if r.leader.is_some() { "leader" } else { "multi-master" },
        "leader": r.leader.map(|l| l.to_string()),
        "voters": r.voters.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
        "start": vector_json(&r.start),
        "by": by.to_string(),
        "at_ms": asp_store::clock::wall_ms(),
    })
}

fn record_of(epoch: u64, value: &Value) -> Option<EpochRecord> {
    let leader = match &value["leader"] {
        Value::Null => None,
        v => Some(v.as_str()?.parse().ok()?),
    };
    Some(EpochRecord {
        epoch,
        leader,
        voters: nodes_of(&value["voters"])?,
        start: vector_of(&value["start"])?,
    })
}

#[derive(Default)]
struct Known {
    /// By namespace hash.
    histories: HashMap<String, History>,
    /// Hashes of the namespaces asked about.
    hashes: HashMap<Namespace, String>,
    /// Members' API addresses (from `_asp.members`).
    apis: HashMap<NodeId, String>,
}

/// The leader namespaces this node knows. Cheap to share.
pub struct Modes {
    node: NodeId,
    known: RwLock<Known>,
    membership: Arc<crate::membership::Membership>,
    /// Feed positions the feed watcher has read past (each once, unless it restarts).
    pub(crate) feed_read: std::sync::atomic::AtomicU64,
    /// Wakes the feed watcher whenever the known epochs are read again: events it could
    /// not yet call divergent or not are then looked at again (a wake while it reads
    /// is kept as the `Notify`'s permit, not lost).
    pub(crate) history_changed: tokio::sync::Notify,
}

impl Modes {
    pub fn new(node: NodeId, membership: Arc<crate::membership::Membership>) -> Self {
        Modes {
            node,
            known: RwLock::default(),
            membership,
            feed_read: Default::default(),
            history_changed: tokio::sync::Notify::new(),
        }
    }

    /// `namespace`'s hash, remembered.
    pub(crate) fn hash(&self, namespace: &Namespace) -> String {
        if let Some(h) = self.known.read().unwrap().hashes.get(namespace) {
            return h.clone();
        }
        let h = hash_of(namespace.as_str());
        let mut known = self.known.write().unwrap();
        if known.hashes.len() > 100_000 {
            known.hashes.clear();
        }
        known.hashes.insert(namespace.clone(), h.clone());
        h
    }

    /// Calls `f` with every epoch of `namespace` this node knows, without copying them
    /// (the write gate asks on every write).
    fn with_history<R>(&self, namespace: &Namespace, f: impl FnOnce(&History) -> R) -> R {
        if namespace.as_str().starts_with(OWN_PREFIX) {
            return f(&History::default());
        }
        let hash = self.hash(namespace);
        let known = self.known.read().unwrap();
        match known.histories.get(&hash) {
            Some(h) => f(h),
            None => f(&History::default()),
        }
    }

    /// Every epoch of `namespace` this node knows.
    pub fn history(&self, namespace: &Namespace) -> History {
        self.with_history(namespace, History::clone)
    }

    /// A member's API address: from gossip, or else from its member record.
    pub fn api_of(&self, node: NodeId) -> Option<String> {
        self.membership
            .api_of(node)
            .or_else(|| self.known.read().unwrap().apis.get(&node).cloned())
    }

    /// The leader mode of `namespace` as the store's writer needs it (`None`:
    /// multi-master).
    pub fn mode(&self, namespace: &Namespace) -> Option<LeaderMode> {
        if self.known.read().unwrap().histories.is_empty() {
            return None;
        }
        let (epoch, leader, fenced) = match self.with_history(namespace, |h| h.standing(self.node))
        {
            Standing::Open => return None,
            Standing::Leader { epoch } => (epoch, self.node, false),
            Standing::Follower { epoch, leader } => (epoch, leader, false),
            Standing::Fenced { epoch, leader } => (epoch, leader, true),
        };
        Some(LeaderMode {
            epoch,
            leader,
            leader_api: self.api_of(leader),
            fenced,
        })
    }

    /// Reads every epoch record and the members' addresses again.
    pub fn reload(&self, store: &Store) -> Result<(), String> {
        let mut records: HashMap<String, Vec<EpochRecord>> = HashMap::new();
        crate::follow::scan_values(store, &ns(MODES_NAMESPACE), "ns/", |key, value| {
            let mut parts = key.split('/').skip(1);
            let (Some(hash), Some("epoch"), Some(epoch), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return;
            };
            let Ok(epoch) = epoch.parse::<u64>() else {
                return;
            };
            let Ok(value) = serde_json::from_slice::<Value>(value) else {
                return;
            };
            if let Some(r) = record_of(epoch, &value) {
                records.entry(hash.to_owned()).or_default().push(r);
            }
        })?;
        let mut apis = HashMap::new();
        crate::follow::scan_values(
            store,
            &ns(crate::federation::MEMBERS_NAMESPACE),
            "node/",
            |key, value| {
                let (Ok(id), Ok(value)) = (
                    key["node/".len()..].parse::<NodeId>(),
                    serde_json::from_slice::<Value>(value),
                ) else {
                    return;
                };
                if let Some(api) = value["api"].as_str() {
                    apis.insert(id, api.to_owned());
                }
            },
        )?;
        let mut known = self.known.write().unwrap();
        known.histories = records
            .into_iter()
            .map(|(h, r)| (h, History::new(r)))
            .collect();
        known.apis = apis;
        drop(known);
        self.history_changed.notify_one();
        Ok(())
    }

    pub(crate) async fn write_record(
        &self,
        store: &Store,
        hash: &str,
        record: &EpochRecord,
    ) -> Result<(), ModeError> {
        let key = epoch_key(hash, record.epoch);
        crate::follow::put_json(
            store,
            ns(MODES_NAMESPACE),
            &key,
            &record_json(record, self.node),
        )
        .await
        .map_err(ModeError::Store)?;
        self.reload(store).map_err(ModeError::Store)
    }

    /// Puts `namespace` in leader mode under `leader` (or back to multi-master with
    /// `None`), as a new epoch. Nothing of the data moves.
    pub async fn set(
        &self,
        store: &Store,
        namespace: &Namespace,
        leader: Option<NodeId>,
        voters: Vec<NodeId>,
    ) -> Result<EpochRecord, ModeError> {
        if namespace.as_str().starts_with(OWN_PREFIX) {
            return Err(ModeError::Invalid(
                "the namespaces of asp itself (_asp.*) stay multi-master".into(),
            ));
        }
        check_voters(&voters)?;
        let history = self.history(namespace);
        let record = EpochRecord {
            epoch: history.epoch() + 1,
            leader,
            voters,
            start: store.namespace_vector(namespace),
        };
        self.write_record(store, &self.hash(namespace), &record)
            .await?;
        Ok(record)
    }

    /// Makes this node the leader of `namespace` in a new epoch: at once if the
    /// namespace has no voters, else once a majority of them grant it (within
    /// `timeout`).
    pub async fn promote(
        &self,
        store: &Store,
        namespace: &Namespace,
        require_caught_up: bool,
        timeout: Duration,
    ) -> Result<EpochRecord, ModeError> {
        self.promote_as(store, namespace, require_caught_up, false, timeout)
            .await
    }

    /// [`Modes::promote`]; `automatic` for a failover, which voters that still hear
    /// the leader refuse.
    async fn promote_as(
        &self,
        store: &Store,
        namespace: &Namespace,
        require_caught_up: bool,
        automatic: bool,
        timeout: Duration,
    ) -> Result<EpochRecord, ModeError> {
        let history = self.history(namespace);
        let Some(current) = history.current().cloned() else {
            return Err(ModeError::Conflict(format!(
                "namespace {namespace} is multi-master; put it in leader mode first (PUT /v1/ns/{namespace}/mode)"
            )));
        };
        if current.leader.is_none() {
            return Err(ModeError::Conflict(format!(
                "namespace {namespace} is multi-master since epoch {}; put it in leader mode first",
                current.epoch
            )));
        }
        if history.standing(self.node)
            == (Standing::Leader {
                epoch: current.epoch,
            })
        {
            return Ok(current);
        }
        let hash = self.hash(namespace);
        // Past every epoch anyone asked for: a split vote is not asked again.
        let epoch = current.epoch.max(self.highest_asked(store, &hash)?) + 1;
        if !current.voters.is_empty() {
            if !current.voters.contains(&self.node) {
                return Err(ModeError::Conflict(format!(
                    "this node is not one of the voters of {namespace}, so it cannot be elected"
                )));
            }
            let ask = Ask {
                epoch,
                candidate: self.node,
                vector: store.namespace_vector(namespace),
                require_caught_up,
                automatic,
            };
            self.elect(store, &hash, &ask, &current.voters, timeout, namespace)
                .await?;
            if self.history(namespace).epoch() >= epoch {
                return Err(ModeError::NoQuorum(format!(
                    "another node took epoch {epoch} of {namespace} meanwhile"
                )));
            }
        }
        let record = EpochRecord {
            epoch,
            leader: Some(self.node),
            voters: current.voters.clone(),
            start: store.namespace_vector(namespace),
        };
        self.write_record(store, &hash, &record).await?;
        tracing::info!(namespace = %namespace, epoch, "promoted: this node leads");
        Ok(record)
    }

    async fn elect(
        &self,
        store: &Store,
        hash: &str,
        ask: &Ask,
        voters: &[NodeId],
        timeout: Duration,
        namespace: &Namespace,
    ) -> Result<(), ModeError> {
        let epoch = ask.epoch;
        let need = majority(voters.len());
        let unheard: Vec<String> = voters
            .iter()
            .filter(|v| self.membership.health(**v) != Some(crate::membership::Health::Alive))
            .map(|v| v.to_string())
            .collect();
        if voters.len() - unheard.len() < need {
            return Err(ModeError::NoQuorum(format!(
                "only {} of {} voters of {namespace} are heard (a majority is {need}); not heard: [{}]",
                voters.len() - unheard.len(),
                voters.len(),
                unheard.join(", ")
            )));
        }
        let record = json!({
            "vector": vector_json(&ask.vector),
            "require_caught_up": ask.require_caught_up,
            "automatic": ask.automatic,
        });
        let key = format!("ns/{hash}/ask/{epoch:020}/{}", self.node);
        crate::follow::put_json(store, ns(ELECTIONS_NAMESPACE), &key, &record)
            .await
            .map_err(ModeError::Store)?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (granted, refused) = self.tally(store, hash, epoch, voters)?;
            if granted.len() >= need {
                return Ok(());
            }
            if voters.len() - refused.len() < need || tokio::time::Instant::now() >= deadline {
                let refused: Vec<String> = refused
                    .iter()
                    .map(|(v, why)| format!("{v}: {why}"))
                    .collect();
                return Err(ModeError::NoQuorum(format!(
                    "{} of {} voters granted epoch {epoch} of {namespace} (a majority is {need}); refused: [{}]; the others did not answer within {} ms",
                    granted.len(),
                    voters.len(),
                    refused.join("; "),
                    timeout.as_millis()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The highest epoch any candidate asked for in the namespace `hash`.
    fn highest_asked(&self, store: &Store, hash: &str) -> Result<u64, ModeError> {
        let mut highest = 0;
        let prefix = format!("ns/{hash}/ask/");
        crate::follow::scan_values(store, &ns(ELECTIONS_NAMESPACE), &prefix, |key, _| {
            if let Some(e) = key[prefix.len()..]
                .split('/')
                .next()
                .and_then(|e| e.parse::<u64>().ok())
            {
                highest = highest.max(e);
            }
        })
        .map_err(ModeError::Store)?;
        Ok(highest)
    }

    /// The voters that granted this node `epoch`, and those that refused it (why).
    #[allow(clippy::type_complexity)]
    fn tally(
        &self,
        store: &Store,
        hash: &str,
        epoch: u64,
        voters: &[NodeId],
    ) -> Result<(Vec<NodeId>, Vec<(NodeId, String)>), ModeError> {
        let (mut granted, mut refused) = (Vec::new(), Vec::new());
        let prefix = format!("ns/{hash}/vote/{epoch:020}/");
        crate::follow::scan_values(store, &ns(ELECTIONS_NAMESPACE), &prefix, |key, value| {
            let Ok(voter) = key[prefix.len()..].parse::<NodeId>() else {
                return;
            };
            let Ok(value) = serde_json::from_slice::<Value>(value) else {
                return;
            };
            if !voters.contains(&voter) {
                return;
            }
            let for_me = value["candidate"].as_str() == Some(self.node.to_string().as_str());
            if for_me && value["granted"] == Value::Bool(true) {
                granted.push(voter);
            } else {
                let why = if for_me {
                    value["reason"].as_str().unwrap_or("refused").to_owned()
                } else {
                    format!(
                        "voted for {}",
                        value["candidate"].as_str().unwrap_or("another")
                    )
                };
                refused.push((voter, why));
            }
        })
        .map_err(ModeError::Store)?;
        Ok((granted, refused))
    }

    /// Answers every request for votes this node has not answered (run on every change
    /// of the elections or the modes).
    pub fn answer_asks(&self, store: &Store) -> Result<(), String> {
        self.reload(store)?;
        let mut asks: Vec<(String, Ask)> = Vec::new();
        let mut answered: HashSet<(String, u64)> = HashSet::new();
        // This node's own asks and votes of elections long decided: deleted.
        let mut stale: Vec<String> = Vec::new();
        let me = self.node.to_string();
        crate::follow::scan_values(store, &ns(ELECTIONS_NAMESPACE), "ns/", |key, value| {
            let parts: Vec<&str> = key.split('/').collect();
            let [_, hash, kind, epoch, node] = parts[..] else {
                return;
            };
            let Ok(epoch) = epoch.parse::<u64>() else {
                return;
            };
            let decided = self
                .known
                .read()
                .unwrap()
                .histories
                .get(hash)
                .is_some_and(|h| h.epoch() > epoch);
            if node == me && decided {
                stale.push(key.to_owned());
                return;
            }
            match kind {
                "vote" if node == me => {
                    answered.insert((hash.to_owned(), epoch));
                }
                "ask" => {
                    let (Ok(candidate), Ok(value)) =
                        (node.parse(), serde_json::from_slice::<Value>(value))
                    else {
                        return;
                    };
                    let Some(vector) = vector_of(&value["vector"]) else {
                        return;
                    };
                    asks.push((
                        hash.to_owned(),
                        Ask {
                            epoch,
                            candidate,
                            vector,
                            require_caught_up: value["require_caught_up"] != Value::Bool(false),
                            automatic: value["automatic"] == Value::Bool(true),
                        },
                    ));
                }
                _ => {}
            }
        })?;
        if !stale.is_empty() {
            let ops = stale
                .iter()
                .take(1000)
                .map(|k| WriteOp::delete(Key::new(k).expect("a valid key")))
                .collect();
            tokio::runtime::Handle::current()
                .block_on(store.write(ns(ELECTIONS_NAMESPACE), ops))
                .map_err(|e| e.to_string())?;
        }
        if asks.is_empty() {
            return Ok(());
        }
        // What this node holds of each namespace asked about.
        let names = names_by_hash(store);
        for (hash, ask) in asks {
            let Some(history) = self.known.read().unwrap().histories.get(&hash).cloned() else {
                continue;
            };
            if ask.epoch <= history.epoch() {
                // Decided: its candidate lost or won, and deletes its ask.
                continue;
            }
            let held = names
                .get(&hash)
                .map(|n| store.namespace_vector(n))
                .unwrap_or_default();
            let hears_leader = history
                .current()
                .and_then(|r| r.leader)
                .and_then(|l| self.membership.health(l))
                == Some(crate::membership::Health::Alive);
            let done = answered.contains(&(hash.clone(), ask.epoch));
            let Some(vote) = answer(&history, self.node, &held, &ask, done, hears_leader) else {
                continue;
            };
            let (granted, reason) = match &vote {
                Vote::Grant => (true, None),
                Vote::Refuse(why) => (false, Some(why.clone())),
            };
            let record = json!({
                "candidate": ask.candidate.to_string(),
                "granted": granted,
                "reason": reason,
                "at_ms": asp_store::clock::wall_ms(),
            });
            let key = format!("ns/{hash}/vote/{:020}/{me}", ask.epoch);
            // On a blocking thread of the runtime (the follow task's): wait for the
            // durable write before the next answer.
            tokio::runtime::Handle::current().block_on(crate::follow::put_json(
                store,
                ns(ELECTIONS_NAMESPACE),
                &key,
                &record,
            ))?;
            answered.insert((hash.clone(), ask.epoch));
            tracing::info!(epoch = ask.epoch, candidate = %ask.candidate, granted, "answered a request for votes");
        }
        Ok(())
    }

    /// Records `event` in its namespace's divergent list if it is divergent by what
    /// this node knows. Returns whether it is listed now, or not divergent for good,
    /// or not divergent yet (no later epoch known).
    pub(crate) async fn note_if_divergent(
        &self,
        store: &Store,
        event: &EpochEvent,
    ) -> Result<Divergence, String> {
        // One look at the history: divergent or not, and whether that is settled.
        let (divergent, closed) = self.with_history(&event.namespace, |h| {
            let records = h.records();
            let closed = records.iter().any(|r| r.epoch == event.epoch)
                && records.iter().any(|r| r.epoch > event.epoch);
            (h.is_divergent(event.epoch, event.dot), closed)
        });
        if event.epoch == 0 || divergent != Some(true) {
            return Ok(if closed || event.epoch == 0 {
                Divergence::Settled
            } else {
                Divergence::NotYet
            });
        }
        let list = divergent_namespace(event.namespace.as_str());
        let key = event.dot.to_string();
        if store.get(&list, &key).map_err(|e| e.to_string())?.is_some() {
            return Ok(Divergence::Listed);
        }
        let record = json!({
            "key": event.key.as_str(),
            "dot": key,
            "epoch": event.epoch,
            "hlc": event.hlc.as_raw(),
            "op": event.op,
            "value_bytes": event.value_bytes,
            "noticed_by": self.node.to_string(),
            "noticed_ms": asp_store::clock::wall_ms(),
        });
        crate::follow::put_json(store, list, &key, &record).await?;
        tracing::warn!(namespace = %event.namespace, dot = %event.dot, epoch = event.epoch, "a divergent event: kept, merged, and listed");
        Ok(Divergence::Listed)
    }

    /// A namespace's mode as `GET /v1/ns/{ns}/mode` shows it.
    pub fn view(&self, namespace: &Namespace) -> Value {
        let history = self.history(namespace);
        let standing = history.standing(self.node);
        let current = history.current();
        let leader = current.and_then(|r| r.leader);
        json!({
            "namespace": namespace.as_str(),
            "mode": if leader.is_some() { "leader" } else { "multi-master" },
            "epoch": history.epoch(),
            "leader": leader.map(|l| l.to_string()),
            "leader_api": leader.and_then(|l| self.api_of(l)),
            "voters": current.map(|r| r.voters.iter().map(|v| v.to_string()).collect::<Vec<_>>()).unwrap_or_default(),
            "this_node": {
                "node_id": self.node.to_string(),
                "role": match standing {
                    Standing::Open => "writer",
                    Standing::Leader { .. } => "leader",
                    Standing::Follower { .. } => "follower",
                    Standing::Fenced { .. } => "fenced",
                },
            },
            "history": history.records().iter().map(|r| json!({
                "epoch": r.epoch,
                "leader": r.leader.map(|l| l.to_string()),
                "voters": r.voters.len(),
            })).collect::<Vec<_>>(),
        })
    }
}

fn check_voters(voters: &[NodeId]) -> Result<(), ModeError> {
    if voters.len() > VOTERS_MAX {
        return Err(ModeError::Invalid(format!("at most {VOTERS_MAX} voters")));
    }
    let distinct: HashSet<_> = voters.iter().collect();
    if distinct.len() != voters.len() {
        return Err(ModeError::Invalid("a voter is listed twice".into()));
    }
    Ok(())
}

/// Fails a leader namespace over when its leader has been silent (no heartbeat
/// reached this node by any path) for `after`: a voter asks the others for the next
/// epoch, after a random wait so that two voters seldom ask at once; those that still
/// hear the leader refuse. Only namespaces with at least three voters fail over.
pub(crate) async fn failover_loop(
    modes: Arc<Modes>,
    store: Store,
    after: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(
        Duration::from_millis(250)
            .min(after / 4)
            .max(Duration::from_millis(10)),
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let silent = |leader: NodeId| {
            modes
                .membership
                .silent_for(leader)
                .unwrap_or_else(|| started.elapsed())
                >= after
        };
        let due: Vec<String> = {
            let known = modes.known.read().unwrap();
            known
                .histories
                .iter()
                .filter_map(|(hash, h)| {
                    let current = h.current()?;
                    let leader = current.leader?;
                    (current.voters.len() >= 3
                        && current.voters.contains(&modes.node)
                        && leader != modes.node
                        && silent(leader))
                    .then(|| hash.clone())
                })
                .collect()
        };
        if due.is_empty() {
            continue;
        }
        let names = names_by_hash(&store);
        for hash in due {
            let Some(namespace) = names.get(&hash) else {
                continue;
            };
            let epoch = modes.history(namespace).epoch();
            let jitter = after.mul_f64(rand::random::<f64>() * 0.5);
            tokio::select! {
                () = tokio::time::sleep(jitter) => {}
                () = shutdown.cancelled() => return,
            }
            // Someone else may have won meanwhile, or the leader come back.
            let history = modes.history(namespace);
            let still = history.epoch() == epoch
                && history
                    .current()
                    .and_then(|r| r.leader)
                    .is_some_and(|l| l != modes.node && silent(l));
            if !still {
                continue;
            }
            tracing::warn!(namespace = %namespace, epoch, "the leader is silent: asking the voters to fail over");
            match modes.promote_as(&store, namespace, true, true, after).await {
                Ok(r) => {
                    tracing::warn!(namespace = %namespace, epoch = r.epoch, "failed over: this node leads")
                }
                Err(e) => {
                    tracing::info!(namespace = %namespace, error = %e, "no failover this time")
                }
            }
        }
    }
}

/// The divergent events listed for `namespace`, oldest key first, at most `limit`
/// after `after` (a dot), and whether more follow.
pub fn divergent_list(
    store: &Store,
    namespace: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<Value>, Option<String>), String> {
    let page = store
        .scan(&divergent_namespace(namespace), "", after, limit, true)
        .map_err(|e| e.to_string())?;
    let items = page
        .items
        .iter()
        .filter_map(|i| i.value.as_ref())
        .filter_map(|v| serde_json::from_slice::<Value>(v).ok())
        .collect();
    Ok((items, page.next_after.map(|k| k.as_str().to_owned())))
}

/// What the divergent list keeps of an event with an epoch (no value: its length).
#[derive(Clone, Debug)]
pub(crate) struct EpochEvent {
    pub namespace: Namespace,
    pub key: Key,
    pub dot: asp_core::Dot,
    pub epoch: u64,
    pub hlc: asp_core::Hlc,
    pub op: &'static str,
    pub value_bytes: usize,
}

impl From<&asp_core::Event> for EpochEvent {
    fn from(event: &asp_core::Event) -> Self {
        let (op, value_bytes) = match &event.op {
            asp_core::Op::Put { value, .. } => ("put", value.len()),
            asp_core::Op::Delete => ("delete", 0),
        };
        EpochEvent {
            namespace: event.namespace.clone(),
            key: event.key.clone(),
            dot: event.dot,
            epoch: event.epoch,
            hlc: event.hlc,
            op,
            value_bytes,
        }
    }
}

/// What [`Modes::note_if_divergent`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Divergence {
    /// Divergent, and in the list.
    Listed,
    /// Not divergent, and this node knows a later epoch: it will not become so.
    Settled,
    /// Not divergent by the epochs known so far: a later epoch may make it so.
    NotYet,
}
