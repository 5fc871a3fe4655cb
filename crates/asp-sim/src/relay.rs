//! Relay trees on the simulated links: the runtime side of
//! [`asp_core::session::RelayTree`], as `asp-node`'s links run it (`link/relay.rs`).
//! After each batch of a peer's feed is applied, copies of events the node already
//! held prune the peer for their origins; prunes and grafts decided for other links
//! (another link's delivery, another link's end) are taken by those links; a link that
//! goes down grafts the origins whose first copies it brought; and at each of a peer's
//! summaries, dots of the peer the node has lacked since the summary before graft
//! their origins back and queue an anti-entropy run.

use super::*;

impl Sim {
    /// Whether `conn` of `node` takes part in relay trees now: the node runs them and
    /// the peer speaks protocol 5 on an established session.
    fn relays_by_tree(&self, node: usize, conn: u64) -> bool {
        let n = &self.nodes[node];
        n.relay_tree
            && n.links
                .get(&conn)
                .is_some_and(|l| l.established && l.session.peer_relays_by_tree())
    }

    /// A batch of the peer's feed on `conn` was applied: `fresh` are the origins of
    /// events the node did not hold, `duplicate` those of copies it held (each once).
    pub(crate) fn relay_delivered(
        &mut self,
        node: usize,
        conn: u64,
        fresh: &[NodeId],
        duplicate: &[NodeId],
    ) {
        if fresh.is_empty() && duplicate.is_empty() {
            return;
        }
        let n = &self.nodes[node];
        // A link that closed meanwhile went down in the tree already: what it brought
        // is no path any more.
        let Some(link) = n.links.get(&conn).filter(|l| l.established) else {
            return;
        };
        if !n.relay_tree {
            return;
        }
        let peer = self.nodes[link.peer].id;
        let now = self.at(self.now);
        let n = &mut self.nodes[node];
        let link = n.links.get_mut(&conn).expect("checked");
        let prune = n.relay.delivered(peer, fresh, duplicate);
        let others = n.relay.prunes_added();
        if !prune.is_empty() {
            let count = prune.len() as u64;
            if link.session.send_prune(prune, now) {
                self.stats.prunes += count;
                self.trace = fnv(self.trace, b"prune");
            }
            self.relay_wake.insert(node);
        }
        if others {
            self.relay_wake.insert(node);
        }
    }

    /// Sends what the node's tree decided for `conn`'s peer elsewhere: prunes (the
    /// origin's own copy came second, on another link) and grafts (another link went
    /// down). Called each time the link is pumped, as a node's link does on each turn
    /// of its loop.
    pub(crate) fn relay_take(&mut self, node: usize, conn: u64) {
        let n = &self.nodes[node];
        if !n.relay_tree {
            return;
        }
        let Some(link) = n.links.get(&conn).filter(|l| l.established) else {
            return;
        };
        let peer = self.nodes[link.peer].id;
        let relays = self.relays_by_tree(node, conn);
        let now = self.at(self.now);
        let n = &mut self.nodes[node];
        let (grafts, prunes) = (n.relay.take_grafts(peer), n.relay.take_prunes(peer));
        // Taken either way: a peer that does not relay by tree relays everything.
        if !relays {
            return;
        }
        let link = n.links.get_mut(&conn).expect("checked");
        if !prunes.is_empty() {
            let count = prunes.len() as u64;
            if link.session.send_prune(prunes, now) {
                self.stats.prunes += count;
                self.trace = fnv(self.trace, b"prune");
            }
        }
        if !grafts.is_empty() {
            let count = grafts.len() as u64;
            link.grafted.extend(grafts.iter().copied());
            if link.session.send_graft(grafts, now) {
                self.stats.grafts_link_down += count;
                self.trace = fnv(self.trace, b"graft");
            }
        }
    }

    /// `link` of `node` (to `peer`), just dropped: if it was the node's established
    /// link to the peer, the origins whose first copies it brought are grafted on the
    /// links of the peers pruned for them.
    pub(crate) fn relay_link_down(&mut self, node: usize, link: &Link) {
        if !link.established {
            return;
        }
        let n = &mut self.nodes[node];
        // Another established link to the same peer replaced this one (as the node's
        // registry keeps one link per peer): the peer is not gone.
        if n.links
            .values()
            .any(|l| l.peer == link.peer && l.established)
        {
            return;
        }
        let peer = self.nodes[link.peer].id;
        if self.nodes[node].relay.link_down(peer) {
            self.relay_wake.insert(node);
        }
    }

    /// A summary of the peer's on `conn`: dots it holds that the node lacked at its
    /// previous summary too are not on their way. Their origins (those the node has no
    /// established link to) are grafted if the peer was pruned for them, and where the
    /// peer was (now or by an earlier graft), an anti-entropy run fetches what its
    /// stream skipped.
    pub(crate) fn relay_lag(&mut self, node: usize, conn: u64, summary: &[NamespaceSummary]) {
        if !self.relays_by_tree(node, conn) || !self.nodes[node].relay.is_active() {
            return;
        }
        let n = &self.nodes[node];
        let peer = self.nodes[n.links[&conn].peer].id;
        let linked: BTreeSet<NodeId> = n
            .links
            .values()
            .filter(|l| l.established)
            .map(|l| self.nodes[l.peer].id)
            .collect();
        let now = self.at(self.now);
        let n = &mut self.nodes[node];
        let link = n.links.get_mut(&conn).expect("checked");
        let mut lagging: Vec<NodeId> = Vec::new();
        let mut run = Vec::new();
        for s in summary {
            let mine = n
                .store
                .indexed_vectors
                .get(&s.namespace)
                .cloned()
                .unwrap_or_default();
            let lacks = s.vector.difference(&mine);
            let still = link
                .relay_lacks
                .get(&s.namespace)
                .map(|before| before.difference(&mine).meet(&lacks));
            if lacks.is_empty() {
                link.relay_lacks.remove(&s.namespace);
            } else {
                link.relay_lacks.insert(s.namespace.clone(), lacks);
            }
            let Some(still) = still.filter(|v| !v.is_empty()) else {
                continue;
            };
            // An origin the node has a link to sends all its events by it: lacking
            // them is only waiting.
            let origins: Vec<NodeId> = still
                .iter()
                .map(|(o, _)| o)
                .filter(|o| !linked.contains(o))
                .collect();
            if origins.is_empty() {
                continue;
            }
            for origin in n.relay.lagging(peer, &origins) {
                link.grafted.insert(origin);
                lagging.push(origin);
            }
            if origins.iter().any(|o| link.grafted.contains(o)) {
                run.push(s.namespace.clone());
            }
        }
        // Origins no dot of which is lacked any more: their gaps are filled.
        let lacked: BTreeSet<NodeId> = link
            .relay_lacks
            .values()
            .flat_map(|v| v.iter().map(|(o, _)| o))
            .collect();
        link.grafted.retain(|o| lacked.contains(o));
        if !lagging.is_empty() {
            lagging.sort_unstable();
            lagging.dedup();
            let count = lagging.len() as u64;
            if link.session.send_graft(lagging, now) {
                self.stats.grafts_lag += count;
                self.trace = fnv(self.trace, b"graft-lag");
            }
        }
        for namespace in run {
            if link.reconciler.request_run(namespace) {
                self.stats.relay_runs += 1;
                self.trace = fnv(self.trace, b"relay-run");
            }
        }
    }

    /// Pumps every link of the nodes whose trees decided frames for them.
    pub(crate) fn relay_wake(&mut self) -> Result<(), Broken> {
        while let Some(node) = self.relay_wake.pop_first() {
            let conns: Vec<u64> = self.nodes[node].links.keys().copied().collect();
            for conn in conns {
                self.pump(node, conn)?;
            }
        }
        Ok(())
    }
}

/// Follows on `link` the origins its peer pruned, as the session does with the frame
/// it is about to take (a graft counts only on an established session, the only state
/// in which the session takes it; a prune always, which may only widen the set).
pub(crate) fn follow_peer(link: &mut Link, frame: &Frame) {
    match frame {
        Frame::Prune { origins } => link.peer_lazy.extend(origins.iter().copied()),
        Frame::Graft { origins } if link.session.is_established() => {
            if origins.is_empty() {
                link.peer_lazy.clear();
            } else {
                for origin in origins {
                    link.peer_lazy.remove(origin);
                }
            }
        }
        _ => {}
    }
}
