//! Placement: which members of the cluster hold a namespace (`{"replicas": 2,
//! "require": {"zone": "a"}}`), so that a cluster can hold more than one machine.
//!
//! Rules live in the replicated namespace `_asp.placement`, one key per placed
//! namespace (`ns/<name>`). Every node picks a namespace's holders by itself, the
//! same way: rendezvous hashing (highest random weight) over the members it hears
//! (gossip, not down) whose labels match `require`; the `replicas` with the highest
//! scores hold it. Nodes that hear the same members pick the same holders, and a
//! member coming or going moves only the namespaces it ranks in.
//!
//! What placement changes:
//! - a link sends a placed namespace's events, summaries and runs only to a peer the
//!   sender counts among its holders (the link's withhold, as residency's). A new
//!   holder is brought up to date by anti-entropy (a transfer when it is empty); a
//!   node that is no longer a holder still sends what it holds to the holders;
//! - the API answers a request for a namespace this node does not serve with a 307
//!   to the holder that has held it longest as this node saw it (see [`Route`]).
//!
//! A node that stops holding a namespace keeps its copy: it is neither served nor
//! updated, and nothing drops it yet (docs/DEPLOY.md, *Placement*). Members' labels
//! come from their records in `_asp.members` (written when a node has labels), its
//! own from its configuration.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use asp_core::{ContentType, Key, Namespace, NodeId};
use asp_store::{Store, WriteOp};

use crate::membership::Health;
use crate::residency::{Labels, matches, show};

/// The namespace of placement rules.
pub const PLACEMENT_NAMESPACE: &str = "_asp.placement";

/// Holders per namespace, at most.
pub const REPLICAS_MAX: u32 = 64;

/// Placement rules a node takes in, at most (more are left out, with a warning).
pub const RULES_MAX: usize = 100_000;

/// A namespace's placement.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rule {
    /// How many members hold it.
    pub replicas: u32,
    /// Labels a holder must carry (all of them, with these values).
    #[serde(default)]
    pub require: Labels,
}

/// Checks a rule from the API or the configuration.
pub fn check_rule(rule: &Rule) -> Result<(), String> {
    if rule.replicas == 0 || rule.replicas > REPLICAS_MAX {
        return Err(format!(
            "replicas must be 1 to {REPLICAS_MAX} (got {})",
            rule.replicas
        ));
    }
    crate::residency::check_rule(&rule.require)
}

/// A member that may hold placed namespaces, as this node hears it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub node: NodeId,
    pub labels: Labels,
    /// Its API address (`http://host:port`), or empty.
    pub api: String,
}

/// Where a client's request for a namespace goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// This node serves it (not placed, or this node holds it).
    Here,
    /// Another member serves it.
    Elsewhere { node: NodeId, api: String },
    /// Nobody can: why.
    Nowhere(String),
}

/// A holder as [`Placement::view`] shows it.
#[derive(Clone, Debug)]
pub struct Holder {
    pub node: NodeId,
    pub api: String,
    /// Since this node counts it among the holders.
    pub since: Instant,
}

struct Placed {
    rule: Rule,
    /// Highest score first.
    holders: Vec<NodeId>,
    /// When each holder became one, as this node saw it.
    since: HashMap<NodeId, Instant>,
}

#[derive(Default)]
struct State {
    placed: HashMap<Namespace, Placed>,
    /// By node id.
    candidates: Vec<Candidate>,
}

impl State {
    /// A candidate's API address (empty: none gossiped, or not a candidate).
    fn api_of(&self, node: NodeId) -> String {
        self.candidates
            .binary_search_by_key(&node, |c| c.node)
            .map(|i| self.candidates[i].api.clone())
            .unwrap_or_default()
    }
}

/// The placement rules this node knows and the holders it picks.
pub struct Placement {
    own: NodeId,
    /// Whether any rule is known: withholding costs nothing without.
    any: AtomicBool,
    state: RwLock<State>,
    /// Bumped whenever any namespace's holders change.
    generation: AtomicU64,
    /// Labels of members as their records in `_asp.members` say.
    member_labels: RwLock<HashMap<NodeId, Labels>>,
}

pub(crate) fn namespace() -> Namespace {
    Namespace::new(PLACEMENT_NAMESPACE).expect("a valid name")
}

/// The key of a namespace's rule in [`PLACEMENT_NAMESPACE`].
pub fn rule_key(namespace: &Namespace) -> String {
    format!("ns/{namespace}")
}

/// A member's score for a namespace: the highest `replicas` scores hold it. The same
/// on every node and every build (SHA-256, not a process-seeded hash).
pub fn score(namespace: &Namespace, node: NodeId) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"asp.placement\0");
    ctx.update(namespace.as_str().as_bytes());
    ctx.update(&[0]);
    ctx.update(&node.get().to_be_bytes());
    let digest = ctx.finish();
    u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"))
}

/// The holders of `namespace` under `rule` among `candidates`: highest score first.
pub fn pick(namespace: &Namespace, rule: &Rule, candidates: &[Candidate]) -> Vec<NodeId> {
    let mut ranked: Vec<(u64, NodeId)> = candidates
        .iter()
        .filter(|c| matches(&rule.require, &c.labels))
        .map(|c| (score(namespace, c.node), c.node))
        .collect();
    ranked.sort_by(|a, b| b.cmp(a));
    ranked
        .into_iter()
        .take(rule.replicas as usize)
        .map(|(_, n)| n)
        .collect()
}

impl Placement {
    pub fn new(own: NodeId) -> Self {
        Placement {
            own,
            any: AtomicBool::new(false),
            state: RwLock::default(),
            generation: AtomicU64::new(0),
            member_labels: RwLock::default(),
        }
    }

    /// The rule of `namespace`, if it is placed.
    pub fn rule(&self, namespace: &Namespace) -> Option<Rule> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let state = self.state.read().unwrap();
        state.placed.get(namespace).map(|p| p.rule.clone())
    }

    /// The holders of `namespace` (highest score first), if it is placed.
    pub fn holders(&self, namespace: &Namespace) -> Option<Vec<NodeId>> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let state = self.state.read().unwrap();
        state.placed.get(namespace).map(|p| p.holders.clone())
    }

    /// Whether nothing of `namespace` goes to `peer`: it is placed and `peer` is not
    /// among its holders.
    pub fn withholds(&self, namespace: &Namespace, peer: NodeId) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let state = self.state.read().unwrap();
        state
            .placed
            .get(namespace)
            .is_some_and(|p| !p.holders.contains(&peer))
    }

    /// Where a client's request for `namespace` goes. Among the holders, the one this
    /// node has counted as a holder longest (ties: the higher score) serves: a member
    /// that just became a holder may not have the namespace yet, one that held it
    /// before has it. This node serves if it is a holder and none has held it longer.
    pub fn route(&self, namespace: &Namespace) -> Route {
        if !self.any.load(Ordering::Acquire) {
            return Route::Here;
        }
        let state = self.state.read().unwrap();
        let Some(placed) = state.placed.get(namespace) else {
            return Route::Here;
        };
        if placed.holders.is_empty() {
            return Route::Nowhere(format!(
                "no member this node hears carries the labels its placement requires ({})",
                show(&placed.rule.require)
            ));
        }
        let since = |node: &NodeId| placed.since.get(node).copied();
        let oldest = placed.holders.iter().filter_map(since).min();
        if placed.holders.contains(&self.own) && since(&self.own) <= oldest {
            return Route::Here;
        }
        let mut servers: Vec<(Instant, usize, NodeId)> = placed
            .holders
            .iter()
            .enumerate()
            .filter(|(_, n)| **n != self.own)
            .filter_map(|(rank, n)| Some((since(n)?, rank, *n)))
            .collect();
        servers.sort();
        for (_, _, node) in servers {
            let api = state.api_of(node);
            if !api.is_empty() {
                return Route::Elsewhere { node, api };
            }
        }
        if placed.holders.contains(&self.own) {
            // Every holder that has held it longer has no API address: serve.
            return Route::Here;
        }
        Route::Nowhere(format!(
            "its holders ({}) gossip no API address (start them with --advertise-api)",
            placed
                .holders
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    /// The rule of `namespace` and its holders with their API addresses, for the API.
    pub fn view(&self, namespace: &Namespace) -> Option<(Rule, Vec<Holder>)> {
        let state = self.state.read().unwrap();
        let placed = state.placed.get(namespace)?;
        let holders = placed
            .holders
            .iter()
            .map(|n| Holder {
                node: *n,
                api: state.api_of(*n),
                since: placed.since.get(n).copied().unwrap_or_else(Instant::now),
            })
            .collect();
        Some((placed.rule.clone(), holders))
    }

    /// Bumped whenever any placed namespace's holders change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The placed namespaces `node` holds.
    pub fn held_by(&self, node: NodeId) -> Vec<Namespace> {
        let state = self.state.read().unwrap();
        state
            .placed
            .iter()
            .filter(|(_, p)| p.holders.contains(&node))
            .map(|(ns, _)| ns.clone())
            .collect()
    }

    /// The members this node picks holders among, by node id.
    pub fn candidates(&self) -> Vec<Candidate> {
        self.state.read().unwrap().candidates.clone()
    }

    /// Takes in the members this node hears (by gossip; down members left out): holders
    /// are picked again if they changed. Returns whether they did.
    pub fn set_candidates(&self, mut candidates: Vec<Candidate>) -> bool {
        candidates.sort_by_key(|c| c.node);
        candidates.dedup_by_key(|c| c.node);
        let mut state = self.state.write().unwrap();
        if state.candidates == candidates {
            return false;
        }
        state.candidates = candidates;
        if repick(&mut state, Instant::now()) {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        true
    }

    /// Takes in the rules (replacing those known).
    pub fn set_rules(&self, rules: HashMap<Namespace, Rule>) {
        let mut state = self.state.write().unwrap();
        let now = Instant::now();
        state.placed.retain(|ns, _| rules.contains_key(ns));
        for (ns, rule) in rules {
            match state.placed.get_mut(&ns) {
                Some(p) => p.rule = rule,
                None => {
                    state.placed.insert(
                        ns,
                        Placed {
                            rule,
                            holders: Vec::new(),
                            since: HashMap::new(),
                        },
                    );
                }
            }
        }
        if repick(&mut state, now) {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        self.any.store(!state.placed.is_empty(), Ordering::Release);
    }

    /// Reads every rule from the store again.
    pub fn reload(&self, store: &Store) -> Result<usize, String> {
        let mut rules = HashMap::new();
        let mut over = 0usize;
        crate::follow::scan_values(store, &namespace(), "ns/", |key, value| {
            let Some(ns) = key.strip_prefix("ns/").and_then(|n| Namespace::new(n).ok()) else {
                return;
            };
            let Ok(rule) = serde_json::from_slice::<Rule>(value) else {
                return;
            };
            if check_rule(&rule).is_err() {
                return;
            }
            if rules.len() >= RULES_MAX {
                over += 1;
                return;
            }
            rules.insert(ns, rule);
        })?;
        if over > 0 {
            tracing::warn!(
                left_out = over,
                max = RULES_MAX,
                "more placement rules than a node takes in: the rest are not applied"
            );
        }
        let n = rules.len();
        self.set_rules(rules);
        Ok(n)
    }

    /// Reads members' labels from their records in `_asp.members`.
    pub fn reload_labels(&self, store: &Store) -> Result<(), String> {
        let mut labels = HashMap::new();
        crate::follow::scan_values(
            store,
            &crate::federation::ns(crate::federation::MEMBERS_NAMESPACE),
            "node/",
            |key, value| {
                let Some(node) = key
                    .strip_prefix("node/")
                    .and_then(|n| n.parse::<NodeId>().ok())
                else {
                    return;
                };
                let Ok(record) = serde_json::from_slice::<serde_json::Value>(value) else {
                    return;
                };
                if let Ok(l) = serde_json::from_value::<Labels>(record["labels"].clone()) {
                    labels.insert(node, l);
                }
            },
        )?;
        *self.member_labels.write().unwrap() = labels;
        Ok(())
    }

    /// Places `namespace` by `rule` (`None`: unplaces it), cluster-wide: the rule is a
    /// write to [`PLACEMENT_NAMESPACE`], which replicates.
    pub async fn set(
        &self,
        store: &Store,
        namespace: &Namespace,
        rule: Option<&Rule>,
    ) -> Result<(), String> {
        let key = Key::new(&rule_key(namespace)).map_err(|e| e.to_string())?;
        let op = match rule {
            None => WriteOp::delete(key),
            Some(rule) => WriteOp::put(
                key,
                ContentType::Json,
                serde_json::to_vec(rule).expect("json"),
            ),
        };
        store
            .write(self::namespace(), vec![op])
            .await
            .map_err(|e| e.to_string())?;
        self.reload(store)?;
        Ok(())
    }
}

/// Picks every placed namespace's holders again; a holder kept keeps its `since`.
/// Returns whether any namespace's holders changed.
fn repick(state: &mut State, now: Instant) -> bool {
    let State { placed, candidates } = state;
    let mut changed = false;
    for (ns, p) in placed.iter_mut() {
        let holders = pick(ns, &p.rule, candidates);
        p.since.retain(|n, _| holders.contains(n));
        for n in &holders {
            p.since.entry(*n).or_insert(now);
        }
        changed |= p.holders != holders;
        p.holders = holders;
    }
    changed
}

/// Every heartbeat: the members this node hears (not down), with their labels and
/// API addresses, become the candidates holders are picked among.
pub(crate) async fn placement_loop(inner: Arc<crate::registry::Inner>) {
    let mut tick = tokio::time::interval(inner.config.heartbeat);
    let own_labels: Labels = inner.config.labels.iter().cloned().collect();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = inner.shutdown.cancelled() => return,
        }
        let candidates = candidates_of(&inner, &own_labels);
        if inner.placement.set_candidates(candidates) {
            tracing::debug!("placement: the members changed, holders picked again");
            inner.bump();
        }
    }
}

fn candidates_of(inner: &crate::registry::Inner, own_labels: &Labels) -> Vec<Candidate> {
    let labels = inner.placement.member_labels.read().unwrap();
    inner
        .membership
        .list()
        .into_iter()
        .filter(|m| m.health != Health::Down)
        .map(|m| Candidate {
            node: m.entry.node,
            labels: if m.this_node {
                own_labels.clone()
            } else {
                labels.get(&m.entry.node).cloned().unwrap_or_default()
            },
            api: m.entry.api,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u64) -> NodeId {
        NodeId::new(n).unwrap()
    }

    fn members(n: u64) -> Vec<Candidate> {
        (1..=n)
            .map(|i| Candidate {
                node: node(i),
                labels: [(
                    "zone".to_owned(),
                    if i % 2 == 0 { "a" } else { "b" }.to_owned(),
                )]
                .into(),
                api: format!("http://10.0.0.{i}:7700"),
            })
            .collect()
    }

    fn rule(replicas: u32) -> Rule {
        Rule {
            replicas,
            require: Labels::new(),
        }
    }

    fn names(n: usize) -> Vec<Namespace> {
        (0..n)
            .map(|i| Namespace::new(&format!("ns{i}")).unwrap())
            .collect()
    }

    #[test]
    fn holders_spread_over_members_and_match_the_labels_required() {
        let all = members(5);
        let mut held = HashMap::<NodeId, usize>::new();
        for ns in names(300) {
            let holders = pick(&ns, &rule(2), &all);
            assert_eq!(holders.len(), 2);
            assert_ne!(holders[0], holders[1]);
            for h in holders {
                *held.entry(h).or_default() += 1;
            }
        }
        // 600 holdings over 5 members: 120 each on average.
        for (n, count) in &held {
            assert!((80..=160).contains(count), "{n}: {count} of 600");
        }
        let zoned = Rule {
            replicas: 3,
            require: [("zone".to_owned(), "a".to_owned())].into(),
        };
        for ns in names(20) {
            let holders = pick(&ns, &zoned, &all);
            // Only 2 and 4 are in zone a.
            let mut sorted = holders.clone();
            sorted.sort();
            assert_eq!(sorted, vec![node(2), node(4)], "{ns}");
        }
    }

    #[test]
    fn a_member_leaving_moves_only_the_namespaces_it_held() {
        let all = members(5);
        let without_3: Vec<Candidate> = all.iter().filter(|c| c.node != node(3)).cloned().collect();
        let mut moved = 0;
        for ns in names(200) {
            let before = pick(&ns, &rule(2), &all);
            let after = pick(&ns, &rule(2), &without_3);
            if before.contains(&node(3)) {
                moved += 1;
                let kept: Vec<_> = before.iter().filter(|n| **n != node(3)).collect();
                assert!(kept.iter().all(|n| after.contains(n)), "{ns}");
            } else {
                assert_eq!(before, after, "{ns}");
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn links_withhold_placed_namespaces_from_members_that_do_not_hold_them() {
        let placement = Placement::new(node(1));
        let ns = Namespace::new("orders").unwrap();
        let other = Namespace::new("other").unwrap();
        assert!(!placement.withholds(&ns, node(2)));
        placement.set_candidates(members(5));
        placement.set_rules([(ns.clone(), rule(2))].into());
        let holders = placement.holders(&ns).unwrap();
        for i in 1..=5 {
            assert_eq!(
                placement.withholds(&ns, node(i)),
                !holders.contains(&node(i))
            );
            assert!(!placement.withholds(&other, node(i)));
        }
        placement.set_rules(HashMap::new());
        assert!(!placement.withholds(&ns, node(holders[0].get() % 5 + 1)));
        assert_eq!(placement.route(&ns), Route::Here);
    }

    #[test]
    fn requests_go_to_the_holder_that_held_the_namespace_longest() {
        let all = members(5);
        let ns = names(200)
            .into_iter()
            .find(|ns| {
                let h = pick(ns, &rule(2), &all);
                !h.contains(&node(1)) && h.contains(&node(5))
            })
            .unwrap();
        let holders = pick(&ns, &rule(2), &all);
        let stays = *holders.iter().find(|n| **n != node(5)).unwrap();
        // Node 1 does not hold it: it sends clients to the higher-ranked holder.
        let placement = Placement::new(node(1));
        placement.set_candidates(all.clone());
        placement.set_rules([(ns.clone(), rule(2))].into());
        let api = |n: NodeId| format!("http://10.0.0.{}:7700", n.get());
        assert_eq!(
            placement.route(&ns),
            Route::Elsewhere {
                node: holders[0],
                api: api(holders[0])
            }
        );
        // Node 5 goes: its successor is newer than the holder that stays, which
        // serves, on node 1 and on the successor alike.
        let without_5: Vec<Candidate> = all.iter().filter(|c| c.node != node(5)).cloned().collect();
        std::thread::sleep(std::time::Duration::from_millis(2));
        placement.set_candidates(without_5.clone());
        let now_holders = placement.holders(&ns).unwrap();
        assert!(now_holders.contains(&stays));
        assert_eq!(
            placement.route(&ns),
            Route::Elsewhere {
                node: stays,
                api: api(stays)
            }
        );
        let successor = *now_holders.iter().find(|n| **n != stays).unwrap();
        let at_successor = Placement::new(successor);
        at_successor.set_candidates(all);
        at_successor.set_rules([(ns.clone(), rule(2))].into());
        std::thread::sleep(std::time::Duration::from_millis(2));
        at_successor.set_candidates(without_5);
        if successor != node(1) {
            assert_eq!(
                at_successor.route(&ns),
                Route::Elsewhere {
                    node: stays,
                    api: api(stays)
                }
            );
        }
        let at_stays = Placement::new(stays);
        at_stays.set_candidates(members(5));
        at_stays.set_rules([(ns.clone(), rule(2))].into());
        assert_eq!(at_stays.route(&ns), Route::Here);
    }

    #[test]
    fn no_matching_member_is_a_clear_refusal_and_bad_rules_are_refused() {
        let placement = Placement::new(node(1));
        placement.set_candidates(members(3));
        let ns = Namespace::new("orders").unwrap();
        let rule = Rule {
            replicas: 2,
            require: [("zone".to_owned(), "z".to_owned())].into(),
        };
        placement.set_rules([(ns.clone(), rule)].into());
        assert!(matches!(placement.route(&ns), Route::Nowhere(m) if m.contains("zone=z")));
        assert!(
            check_rule(&super::Rule {
                replicas: 0,
                require: Labels::new()
            })
            .is_err()
        );
        assert!(
            check_rule(&super::Rule {
                replicas: 65,
                require: Labels::new()
            })
            .is_err()
        );
        assert!(
            check_rule(&super::Rule {
                replicas: 64,
                require: Labels::new()
            })
            .is_ok()
        );
    }
}
