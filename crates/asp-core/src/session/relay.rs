//! Relay trees: which peers a node asks to stop relaying which origins' events.
//!
//! Every node sends its own events to every peer. A node that receives an event
//! relays it on to its other peers, which in a mesh means each node receives each
//! event once from its origin and again from nearly every other node. The fix is the
//! one of epidemic broadcast trees (Plumtree, Leitão et al. 2007), per origin: a node
//! that receives a copy of an origin's event it already holds asks the peer that sent
//! the copy to stop relaying that origin to it (`Prune`). What is left, per origin, is
//! a tree along the paths that delivered first. When the tree breaks (a link goes
//! down, or a peer holds events of an origin this node lacks for more than a summary
//! interval), this node asks for them again (`Graft`) and reconciles what the stream
//! skipped.
//!
//! This type only decides; the runtime sends the frames. It keeps per origin:
//! the peer whose copy arrived first most recently (`first`), and the peers this node
//! pruned. Two rules keep a node from pruning its way out of a tree:
//!
//! - the origin itself is never pruned (its own events always go to its peers); when
//!   its copy comes second, the peer whose copy came first is pruned instead (the
//!   origin's direct link brings every one of its events);
//! - a peer is pruned for an origin only while another peer, not pruned, delivered
//!   that origin's last first copy.

use std::collections::{HashMap, HashSet};

use crate::NodeId;

/// Origins a node tracks, at most: past this, no new origin is pruned (its events are
/// relayed by every peer, as without trees).
pub const RELAY_TREE_ORIGINS_MAX: usize = 65_536;

#[derive(Debug, Default)]
pub struct RelayTree {
    /// Per origin, the peer whose copy arrived first, most recently.
    first: HashMap<NodeId, NodeId>,
    /// Per origin, the peers asked to stop relaying it.
    pruned: HashMap<NodeId, HashSet<NodeId>>,
    /// Grafts decided for peers' links, not yet taken by them.
    pending: HashMap<NodeId, Vec<NodeId>>,
    /// Prunes decided for peers' links by another link's delivery, not yet taken.
    pending_prunes: HashMap<NodeId, Vec<NodeId>>,
    prunes_added: bool,
    /// Peers whose links take no `Prune` (an earlier protocol, another cluster): never
    /// pruned, so never counted on as pruned.
    deaf: HashSet<NodeId>,
    /// Whether this node ever pruned a peer (until then, nothing changes how it
    /// replicates).
    active: bool,
}

impl RelayTree {
    pub fn new() -> Self {
        Self::default()
    }

    /// A batch from `peer` was applied: `fresh` are the origins of events this node did
    /// not hold, `duplicate` those of copies it held. Returns the origins to prune on
    /// `peer`'s link (and records them pruned); prunes for other links wait in
    /// [`RelayTree::take_prunes`]. A peer whose link takes no `Prune` (see
    /// [`RelayTree::link_up`]) is never pruned.
    pub fn delivered(
        &mut self,
        peer: NodeId,
        fresh: &[NodeId],
        duplicate: &[NodeId],
    ) -> Vec<NodeId> {
        for &origin in fresh {
            if self.first.len() < RELAY_TREE_ORIGINS_MAX || self.first.contains_key(&origin) {
                self.first.insert(origin, peer);
            }
        }
        let mut prune = Vec::new();
        for &origin in duplicate {
            if fresh.contains(&origin) {
                continue;
            }
            let Some(&first) = self.first.get(&origin) else {
                continue;
            };
            if first == peer {
                continue;
            }
            // The origin's own copy came second: the peer whose copy came first is
            // pruned, as the origin brings all of its events itself.
            let (target, keep) = if origin == peer {
                (first, peer)
            } else {
                (peer, first)
            };
            let pruned = self.pruned.entry(origin).or_default();
            if pruned.contains(&target) || pruned.contains(&keep) || self.deaf.contains(&target) {
                continue;
            }
            pruned.insert(target);
            self.active = true;
            if target == peer {
                prune.push(origin);
            } else {
                self.pending_prunes.entry(target).or_default().push(origin);
                self.prunes_added = true;
            }
        }
        prune
    }

    /// Whether prunes for other links were decided since the last call.
    pub fn prunes_added(&mut self) -> bool {
        std::mem::take(&mut self.prunes_added)
    }

    /// Prunes decided for `peer`'s link by another link's delivery (empty if none).
    pub fn take_prunes(&mut self, peer: NodeId) -> Vec<NodeId> {
        let mut prunes = self.pending_prunes.remove(&peer).unwrap_or_default();
        prunes.sort_unstable();
        prunes.dedup();
        prunes
    }

    /// `peer`'s link went down. Origins whose first copies it delivered lost their
    /// path: every peer pruned for them is grafted again (see
    /// [`RelayTree::take_grafts`]). Returns whether any graft was decided.
    pub fn link_down(&mut self, peer: NodeId) -> bool {
        let orphaned: Vec<NodeId> = self
            .first
            .iter()
            .filter(|&(_, &p)| p == peer)
            .map(|(&o, _)| o)
            .collect();
        for origin in &orphaned {
            self.first.remove(origin);
        }
        for pruned in self.pruned.values_mut() {
            pruned.remove(&peer);
        }
        self.pending.remove(&peer);
        self.pending_prunes.remove(&peer);
        self.deaf.remove(&peer);
        let mut any = false;
        for origin in orphaned {
            if let Some(pruned) = self.pruned.remove(&origin) {
                for p in pruned {
                    self.pending.entry(p).or_default().push(origin);
                    any = true;
                }
            }
        }
        any
    }

    /// `peer` holds events of `origins` that this node has lacked for a while: those it
    /// was pruned for are grafted, and pending prunes of them dropped. Returns them.
    pub fn lagging(&mut self, peer: NodeId, origins: &[NodeId]) -> Vec<NodeId> {
        let mut graft = Vec::new();
        if let Some(prunes) = self.pending_prunes.get_mut(&peer) {
            prunes.retain(|o| !origins.contains(o));
        }
        for &origin in origins {
            if let Some(pruned) = self.pruned.get_mut(&origin)
                && pruned.remove(&peer)
            {
                graft.push(origin);
            }
        }
        graft
    }

    /// Grafts decided for `peer`'s link by another link's end (empty if none).
    pub fn take_grafts(&mut self, peer: NodeId) -> Vec<NodeId> {
        let mut grafts = self.pending.remove(&peer).unwrap_or_default();
        grafts.sort_unstable();
        grafts.dedup();
        grafts
    }

    /// A new link to `peer`: it relays everything, so nothing is pruned on it.
    /// `takes_prunes`: the link takes `Prune` (protocol 5, within the cluster).
    pub fn link_up(&mut self, peer: NodeId, takes_prunes: bool) {
        if takes_prunes {
            self.deaf.remove(&peer);
        } else {
            self.deaf.insert(peer);
        }
        for pruned in self.pruned.values_mut() {
            pruned.remove(&peer);
        }
        self.pending.remove(&peer);
        self.pending_prunes.remove(&peer);
    }

    /// Whether this node ever pruned a peer.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Whether `peer` is pruned for any origin.
    pub fn prunes(&self, peer: NodeId) -> bool {
        self.pruned.values().any(|p| p.contains(&peer))
    }

    /// Origins `peer` is pruned for, sorted.
    pub fn pruned_on(&self, peer: NodeId) -> Vec<NodeId> {
        let mut origins: Vec<NodeId> = self
            .pruned
            .iter()
            .filter(|(_, p)| p.contains(&peer))
            .map(|(&o, _)| o)
            .collect();
        origins.sort_unstable();
        origins
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u64) -> NodeId {
        NodeId::new(i).unwrap()
    }

    #[test]
    fn a_later_copy_prunes_its_sender_but_never_the_origin() {
        let mut t = RelayTree::new();
        // Origin 1's event arrives from 1 itself, then copies from 2 and 3.
        assert!(t.delivered(n(1), &[n(1)], &[]).is_empty());
        assert_eq!(t.delivered(n(2), &[], &[n(1)]), vec![n(1)]);
        assert_eq!(t.delivered(n(3), &[], &[n(1)]), vec![n(1)]);
        // Pruned once: not again.
        assert!(t.delivered(n(2), &[], &[n(1)]).is_empty());
        assert_eq!(t.pruned_on(n(2)), vec![n(1)]);
        assert!(t.is_active());
        // A copy of 1's event from 1, after 4 delivered it first: 1 is the origin and
        // is never pruned; 4 is, on its own link.
        assert!(t.delivered(n(4), &[n(1)], &[]).is_empty());
        assert!(t.delivered(n(1), &[], &[n(1)]).is_empty());
        assert_eq!(t.take_prunes(n(4)), vec![n(1)]);
        assert!(t.take_prunes(n(4)).is_empty());
        assert_eq!(t.pruned_on(n(4)), vec![n(1)]);
    }

    #[test]
    fn the_peer_of_the_last_first_copy_is_never_pruned_while_the_other_is() {
        let mut t = RelayTree::new();
        // Origin 9 is not a peer: 2 delivers first, 3's copy is pruned.
        t.delivered(n(2), &[n(9)], &[]);
        assert_eq!(t.delivered(n(3), &[], &[n(9)]), vec![n(9)]);
        // The prune is in flight: 3 delivers the next event first, and 2's copy comes
        // second. Pruning 2 would leave 9 without a path; it is not pruned.
        t.delivered(n(3), &[n(9)], &[]);
        assert!(t.delivered(n(2), &[], &[n(9)]).is_empty());
        // A peer of an older protocol is never pruned.
        t.link_up(n(4), false);
        assert!(t.delivered(n(4), &[], &[n(9)]).is_empty());
    }

    #[test]
    fn a_link_that_goes_down_grafts_the_peers_pruned_for_its_origins() {
        let mut t = RelayTree::new();
        t.delivered(n(1), &[n(1), n(7)], &[]);
        assert_eq!(t.delivered(n(2), &[], &[n(1), n(7)]), vec![n(1), n(7)]);
        t.delivered(n(3), &[n(8)], &[]);
        assert_eq!(t.delivered(n(2), &[], &[n(8)]), vec![n(8)]);
        assert!(t.link_down(n(1)));
        // 1 delivered origins 1 and 7 first: 2 relays them again. 8 still comes by 3.
        assert_eq!(t.take_grafts(n(2)), vec![n(1), n(7)]);
        assert!(t.take_grafts(n(2)).is_empty());
        assert_eq!(t.pruned_on(n(2)), vec![n(8)]);
        // A peer that lags is grafted for what it was pruned for, once.
        assert_eq!(t.lagging(n(2), &[n(8), n(5)]), vec![n(8)]);
        assert!(t.lagging(n(2), &[n(8)]).is_empty());
        assert!(!t.prunes(n(2)));
    }

    #[test]
    fn a_new_link_starts_unpruned() {
        let mut t = RelayTree::new();
        t.delivered(n(1), &[n(1)], &[]);
        t.delivered(n(2), &[], &[n(1)]);
        assert!(t.prunes(n(2)));
        t.link_up(n(2), true);
        assert!(!t.prunes(n(2)));
    }
}
