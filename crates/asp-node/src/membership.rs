//! Cluster membership by heartbeat gossip over the peer links: every node counts its
//! own heartbeat up once per `heartbeat` interval and sends the table of members it
//! knows to each peer of its cluster every summary interval; a receiver keeps, per
//! node, the newest entry (greatest `(incarnation, heartbeat)`) and when it last grew.
//! A member whose entry has not grown for `suspect_after` is suspect, past
//! `down_after` down; down members are forgotten after `forget_after`.
//!
//! Our own rather than `foca` or `chitchat`: the links already authenticate peers
//! (mutual TLS, the cluster id), relay transitively, bound memory and reconnect; a
//! second transport (UDP, its own port, its own identity checks) would add a way in
//! and a firewall rule for what is a table of a few hundred bytes per second. What we
//! give up is SWIM's indirect probing: a member is judged by its heartbeat reaching us
//! through any path, which is what failover needs (can anyone still hear the leader?).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asp_core::NodeId;
use asp_core::session::{MEMBER_TEXT_BYTES_MAX, MEMBERS_MAX, MemberEntry};

use crate::registry::Inner;

/// How a member is doing, as this node hears it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Alive,
    Suspect,
    Down,
}

impl Health {
    pub fn name(self) -> &'static str {
        match self {
            Health::Alive => "alive",
            Health::Suspect => "suspect",
            Health::Down => "down",
        }
    }
}

/// One member as `/v1/status` lists it.
#[derive(Clone, Debug)]
pub struct Member {
    pub entry: MemberEntry,
    pub health: Health,
    /// Since its entry last grew (zero for this node).
    pub silent_for: Duration,
    pub this_node: bool,
}

struct Known {
    entry: MemberEntry,
    grew_at: Instant,
}

/// The members this node knows.
pub struct Membership {
    own: Mutex<MemberEntry>,
    table: Mutex<HashMap<NodeId, Known>>,
    pub suspect_after: Duration,
    pub down_after: Duration,
    forget_after: Duration,
}

fn clip(mut s: String) -> String {
    if s.len() > MEMBER_TEXT_BYTES_MAX {
        let mut end = MEMBER_TEXT_BYTES_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

impl Membership {
    /// `heartbeat`: how often this node's entry grows (and peers send theirs).
    pub fn new(own: MemberEntry, heartbeat: Duration) -> Self {
        let own = MemberEntry {
            name: clip(own.name),
            api: clip(own.api),
            peer: clip(own.peer),
            ..own
        };
        Membership {
            own: Mutex::new(own),
            table: Mutex::default(),
            suspect_after: heartbeat * 3,
            down_after: heartbeat * 6,
            forget_after: heartbeat * 600,
        }
    }

    pub fn node(&self) -> NodeId {
        self.own.lock().unwrap().node
    }

    /// One heartbeat of this node.
    pub fn beat(&self) {
        self.own.lock().unwrap().heartbeat += 1;
    }

    /// What gossip sends: this node first, then every member not forgotten (the
    /// freshest first, up to the frame's limit).
    pub fn snapshot(&self) -> Vec<MemberEntry> {
        let now = Instant::now();
        let mut table = self.table.lock().unwrap();
        table.retain(|_, k| now.duration_since(k.grew_at) < self.forget_after);
        let mut others: Vec<&Known> = table.values().collect();
        others.sort_by_key(|k| std::cmp::Reverse(k.grew_at));
        let mut out = Vec::with_capacity(others.len() + 1);
        out.push(self.own.lock().unwrap().clone());
        out.extend(
            others
                .into_iter()
                .take(MEMBERS_MAX - 1)
                .map(|k| k.entry.clone()),
        );
        out
    }

    /// Takes in what a peer sent. Returns the members heard of for the first time.
    pub fn merge(&self, entries: Vec<MemberEntry>) -> Vec<MemberEntry> {
        let me = self.node();
        let now = Instant::now();
        let mut table = self.table.lock().unwrap();
        let mut new = Vec::new();
        for e in entries {
            if e.node == me {
                continue;
            }
            match table.get_mut(&e.node) {
                Some(k) => {
                    if (e.incarnation, e.heartbeat) > (k.entry.incarnation, k.entry.heartbeat) {
                        k.entry = e;
                        k.grew_at = now;
                    }
                }
                None => {
                    if table.len() >= 4 * MEMBERS_MAX {
                        continue;
                    }
                    new.push(e.clone());
                    table.insert(
                        e.node,
                        Known {
                            entry: e,
                            grew_at: now,
                        },
                    );
                }
            }
        }
        new
    }

    fn health_after(&self, silent: Duration) -> Health {
        if silent >= self.down_after {
            Health::Down
        } else if silent >= self.suspect_after {
            Health::Suspect
        } else {
            Health::Alive
        }
    }

    /// How `node` is doing (`None`: never heard of). This node is always alive.
    pub fn health(&self, node: NodeId) -> Option<Health> {
        if node == self.node() {
            return Some(Health::Alive);
        }
        let table = self.table.lock().unwrap();
        table
            .get(&node)
            .map(|k| self.health_after(k.grew_at.elapsed()))
    }

    /// For how long `node`'s entry has not grown (`None`: never heard of).
    pub fn silent_for(&self, node: NodeId) -> Option<Duration> {
        if node == self.node() {
            return Some(Duration::ZERO);
        }
        self.table
            .lock()
            .unwrap()
            .get(&node)
            .map(|k| k.grew_at.elapsed())
    }

    /// A member's API address, if it gossips one.
    pub fn api_of(&self, node: NodeId) -> Option<String> {
        let api = if node == self.node() {
            self.own.lock().unwrap().api.clone()
        } else {
            self.table.lock().unwrap().get(&node)?.entry.api.clone()
        };
        (!api.is_empty()).then_some(api)
    }

    /// Every member, this node first, then by node id.
    pub fn list(&self) -> Vec<Member> {
        let mut out = vec![Member {
            entry: self.own.lock().unwrap().clone(),
            health: Health::Alive,
            silent_for: Duration::ZERO,
            this_node: true,
        }];
        let table = self.table.lock().unwrap();
        let mut others: Vec<Member> = table
            .values()
            .map(|k| {
                let silent = k.grew_at.elapsed();
                Member {
                    entry: k.entry.clone(),
                    health: self.health_after(silent),
                    silent_for: silent,
                    this_node: false,
                }
            })
            .collect();
        others.sort_by_key(|m| m.entry.node);
        out.extend(others);
        out
    }
}

/// Counts this node's heartbeat, and dials members learned by gossip that nobody
/// told this node how to reach: alive, with a peer address, not linked, never dialed
/// (by the configuration or by gossip) and never dialing in (a peer that dialed chose
/// its path: gossip does not go around it, nor around a proxy in between).
pub(crate) async fn membership_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.config.heartbeat);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = inner.shutdown.cancelled() => return,
        }
        inner.membership.beat();
        if !inner.config.dial_members {
            continue;
        }
        let to_dial: Vec<(NodeId, String)> = {
            let reg = inner.registry.lock().unwrap();
            if reg.established.len() >= inner.config.links_max {
                continue;
            }
            inner
                .membership
                .list()
                .into_iter()
                .filter(|m| !m.this_node && m.health == Health::Alive)
                .filter(|m| {
                    m.entry
                        .peer
                        .parse::<SocketAddr>()
                        .is_ok_and(|a| !a.ip().is_unspecified() && a.port() != 0)
                })
                .filter(|m| {
                    let n = m.entry.node;
                    !reg.established.contains_key(&n)
                        && !reg.dials.contains_key(&m.entry.peer)
                        && !reg.dials.values().any(|d| d.node == Some(n))
                        && !reg.peers.get(&n).is_some_and(|p| p.inbound)
                })
                .map(|m| (m.entry.node, m.entry.peer))
                .collect()
        };
        for (node, address) in to_dial {
            crate::registry::register_dial(&inner, &address);
            tracing::info!(peer = %address, node = %node, "dialing a member learned by gossip");
            tokio::spawn(dial_member(inner.clone(), address, node));
        }
    }
}

/// A dial loop for a member learned by gossip: it ends once the member is down (and
/// forgets the address, so that the member is dialed again if it comes back).
async fn dial_member(inner: Arc<Inner>, address: String, node: NodeId) {
    crate::replicator::dial_loop_until(inner.clone(), address.clone(), Some(node)).await;
    inner.registry.lock().unwrap().dials.remove(&address);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(node: u64, incarnation: u64, heartbeat: u64) -> MemberEntry {
        MemberEntry {
            node: NodeId::new(node).unwrap(),
            incarnation,
            heartbeat,
            name: format!("n{node}"),
            api: format!("http://127.0.0.1:{node}"),
            peer: String::new(),
        }
    }

    #[test]
    fn newer_entries_win_and_this_node_is_never_overwritten() {
        let m = Membership::new(entry(1, 5, 0), Duration::from_secs(1));
        assert_eq!(m.merge(vec![entry(2, 1, 7), entry(1, 9, 9)]).len(), 1);
        assert!(m.merge(vec![entry(2, 1, 3)]).is_empty(), "older: ignored");
        let list = m.list();
        assert_eq!(list.len(), 2);
        assert_eq!(
            list[0].entry,
            entry(1, 5, 0),
            "this node keeps its own entry"
        );
        assert_eq!(list[1].entry.heartbeat, 7);
        m.merge(vec![entry(2, 2, 0)]);
        assert_eq!(m.list()[1].entry.incarnation, 2, "a restart is newer");
        assert_eq!(m.health(NodeId::new(2).unwrap()), Some(Health::Alive));
        assert_eq!(m.health(NodeId::new(3).unwrap()), None);
        assert_eq!(
            m.api_of(NodeId::new(2).unwrap()).as_deref(),
            Some("http://127.0.0.1:2")
        );
        m.beat();
        assert_eq!(m.snapshot()[0].heartbeat, 1);
    }

    #[test]
    fn silence_makes_a_member_suspect_then_down() {
        let m = Membership::new(entry(1, 5, 0), Duration::from_millis(10));
        m.merge(vec![entry(2, 1, 1)]);
        std::thread::sleep(Duration::from_millis(70));
        assert_eq!(m.health(NodeId::new(2).unwrap()), Some(Health::Down));
        m.merge(vec![entry(2, 1, 2)]);
        assert_eq!(m.health(NodeId::new(2).unwrap()), Some(Health::Alive));
    }
}
