//! When a tombstone may be collected.
//!
//! A delete `d` of an `lww` key must be kept as long as an event that loses to it may
//! still arrive: without it, that event would bring the key back. Which events can lose
//! to `d`? Any event created after its creator received `d` carries a later clock
//! reading (the HLC moves past every reading it receives) and wins. So only events
//! created *before* their creator received `d` can lose to it, and such an event is in
//! its creator's vector from then on.
//!
//! The rule: this node may drop `d` once, for every node `M` that may write in the
//! namespace, it holds a report of `M`'s vector that contains `d`, and its own vector
//! contains that report. It then already applied every event that could lose to `d`
//! (each against `d`, which it still held); any later copy of one is a duplicate by
//! dot. Stability at the direct peers alone is not enough: in a line A–B–C, C's event
//! concurrent with `d` can reach A through B after every direct peer of A holds `d`.
//! So nodes gossip the newest report they know of every node (in their summaries).
//! And they gossip who may write, not only reports: in the same line, C may have
//! written nothing and reported nothing yet when it is cut off; only B knows it (as a
//! link peer), and A, hearing of C from no one, would collect without it. So every
//! node that may write is named in gossip, with an empty vector while no report of it
//! is known (an empty vector is true of every node, and holds collection back).
//!
//! A node not heard of for `gc_horizon_ms` stops holding collection back: it is left
//! out of the rule, and what is collected while it is out leaves an *epitaph* (the
//! key's index entry, pointing at no record). When that node returns, its events that
//! lose to a delete lose to the epitaph, and reconciliation sends it the delete (made
//! again from the epitaph). Once it is back in the rule, its epitaphs go.

use std::collections::{BTreeSet, HashMap};

use crate::session::{REPORTS_MAX, VectorReport};
use crate::{Namespace, NodeId, VersionVector};

/// What is known of other nodes' vectors, per namespace.
pub struct Gc {
    /// When the store opened (wall ms): a node known but not heard of since counts as
    /// heard of then (here; what is gossiped of it says it was not heard of).
    opened_ms: u64,
    namespaces: HashMap<Namespace, HashMap<NodeId, Known>>,
    /// Peers linked with since the store opened: one entry per node (as bounded as the
    /// nodes this node links with).
    contacts: HashMap<NodeId, Contact>,
}

/// The last summary a linked peer sent: it is heard of then in every namespace it
/// replicates, whether or not it holds anything of them yet.
struct Contact {
    at_ms: u64,
    /// The namespaces its Hello listed.
    namespaces: Vec<String>,
    /// Namespaces this node keeps from the peer whatever the lists say (residency,
    /// a share's direction): the peer can neither hold nor write them.
    withhold: Option<crate::session::Withhold>,
}

impl Contact {
    /// Whether the peer replicates `namespace` with this node.
    fn replicates(&self, namespace: &Namespace) -> bool {
        crate::session::lists(&self.namespaces, namespace)
            && !self
                .withhold
                .as_ref()
                .is_some_and(|w| w.withholds(namespace))
    }
}

/// When `node` was last heard of in `namespace`: its newest report, or its last
/// summary if it replicates the namespace; `None` if neither since the store opened.
fn heard_ms(
    known: Option<&Known>,
    contacts: &HashMap<NodeId, Contact>,
    namespace: &Namespace,
    node: NodeId,
) -> Option<u64> {
    let contact = contacts
        .get(&node)
        .filter(|c| c.replicates(namespace))
        .map(|c| c.at_ms);
    known.map(|k| k.heard_ms).max(contact)
}

/// What is known of one node's vector of one namespace.
struct Known {
    /// When the node was last heard of: the newest `at_ms` of any report of it,
    /// membership-only ones included. The horizon counts from here.
    heard_ms: u64,
    /// The newest report with a non-empty vector: what is gossiped on.
    newest: Option<VectorReport>,
    /// The newest report this node's own vector contains (time, vector).
    usable: Option<(u64, VersionVector)>,
    /// A report waiting for this node's vector to contain it.
    pending: Option<(u64, VersionVector)>,
}

impl Known {
    /// Makes the pending report usable once `own` contains it.
    fn promote(&mut self, own: &VersionVector) {
        if self.pending.as_ref().is_some_and(|(_, v)| contains(own, v)) {
            let pending = self.pending.take().expect("checked");
            if self.usable.as_ref().is_none_or(|(t, _)| *t < pending.0) {
                self.usable = Some(pending);
            }
        }
    }
}

/// Which tombstones of a namespace may go now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcView {
    /// The deletes whose dot is here may be collected.
    pub stable: VersionVector,
    /// Whether every known node is in the rule. If not, a collected delete leaves an
    /// epitaph.
    pub complete: bool,
    /// Nodes left out of the rule (not heard of for the horizon).
    pub away: Vec<NodeId>,
    /// Nodes in the rule with no report this node's vector contains yet: they hold
    /// every collection back.
    pub waiting: Vec<NodeId>,
}

impl Gc {
    pub fn new(opened_ms: u64) -> Gc {
        Gc {
            opened_ms,
            namespaces: HashMap::new(),
            contacts: HashMap::new(),
        }
    }

    /// Takes in that `peer`, which replicates `namespaces` (as its Hello listed them)
    /// except what `withhold` keeps from it, sent a summary at `at_ms`.
    pub fn note_contact(
        &mut self,
        peer: NodeId,
        at_ms: u64,
        namespaces: &[String],
        withhold: Option<crate::session::Withhold>,
    ) {
        let contact = self.contacts.entry(peer).or_insert_with(|| Contact {
            at_ms,
            namespaces: Vec::new(),
            withhold: None,
        });
        contact.at_ms = contact.at_ms.max(at_ms);
        if contact.namespaces != namespaces {
            contact.namespaces = namespaces.to_vec();
        }
        contact.withhold = withhold;
    }

    /// `peers` without those kept from `namespace` (residency; a share's direction):
    /// such a peer never holds the namespace and cannot write in it, so it is no node
    /// collection waits for — unless its writes or reports say otherwise (then it
    /// is in the rule through them).
    fn linked(&self, namespace: &Namespace, peers: &[NodeId]) -> Vec<NodeId> {
        peers
            .iter()
            .copied()
            .filter(|p| {
                !self
                    .contacts
                    .get(p)
                    .is_some_and(|c| c.withhold.as_ref().is_some_and(|w| w.withholds(namespace)))
            })
            .collect()
    }

    /// Takes in a report (reports of `me` are ignored: this node knows its own vector,
    /// `own`). A report with an empty vector only says that its node may write in the
    /// namespace and when it was heard of: it never becomes usable (every node's vector
    /// holds the empty one, so it proves nothing) and never displaces a real report.
    pub fn note(
        &mut self,
        namespace: &Namespace,
        me: NodeId,
        own: &VersionVector,
        report: VectorReport,
    ) {
        if report.node == me {
            return;
        }
        let nodes = self.namespaces.entry(namespace.clone()).or_default();
        let known = nodes.entry(report.node).or_insert_with(|| Known {
            heard_ms: report.at_ms,
            newest: None,
            usable: None,
            pending: None,
        });
        let at = report.at_ms;
        known.heard_ms = known.heard_ms.max(at);
        if report.vector.is_empty() {
            return;
        }
        known.promote(own);
        if known.usable.as_ref().is_none_or(|(t, _)| *t < at) {
            if contains(own, &report.vector) {
                known.usable = Some((at, report.vector.clone()));
            } else if known.pending.is_none() {
                known.pending = Some((at, report.vector.clone()));
            }
        }
        if known.newest.as_ref().is_none_or(|n| at > n.at_ms) {
            known.newest = Some(report);
        }
    }

    /// The nodes whose newest report of `namespace` holds every one of `dots` (a node's
    /// vectors only grow: what its newest report holds, it holds). For write concern
    /// through relays.
    pub fn holders(&self, namespace: &Namespace, dots: &[crate::Dot]) -> Vec<NodeId> {
        let Some(nodes) = self.namespaces.get(namespace) else {
            return Vec::new();
        };
        nodes
            .iter()
            .filter(|(_, k)| {
                k.newest
                    .as_ref()
                    .is_some_and(|r| dots.iter().all(|d| r.vector.contains(*d)))
            })
            .map(|(&n, _)| n)
            .collect()
    }

    /// What this node tells its peers of the namespace's other nodes: for every node
    /// it counts as one that may write (see [`Gc::view`]), the newest real report it
    /// holds, or else a membership-only report: an empty vector, at when this node last
    /// heard of that node, or at 0 if it has not since it opened (so that a restart
    /// does not make a node long gone look fresh to every other). A node that may
    /// write but has not reported yet is thereby known beyond its direct peers, who
    /// alone know it from their links. A peer whose Hello left the namespace out and
    /// that never reported on it is not passed on: it sends the namespace to no one
    /// (here it holds collection back until the horizon, as any peer without a
    /// report). Newest first, at most `REPORTS_MAX - 1` (the sender's own report goes
    /// first).
    pub fn gossip(
        &self,
        namespace: &Namespace,
        me: NodeId,
        own: &VersionVector,
        peers: &[NodeId],
    ) -> Vec<VectorReport> {
        let empty = HashMap::new();
        let nodes = self.namespaces.get(namespace).unwrap_or(&empty);
        let elsewhere = |node: &NodeId| {
            !nodes.contains_key(node)
                && self
                    .contacts
                    .get(node)
                    .is_some_and(|c| !c.replicates(namespace))
        };
        let peers = self.linked(namespace, peers);
        let mut out: Vec<VectorReport> = everyone(nodes, me, own, &peers)
            .into_iter()
            .filter(|node| !elsewhere(node))
            .map(|node| match nodes.get(&node) {
                Some(Known {
                    newest: Some(report),
                    ..
                }) => report.clone(),
                known => VectorReport {
                    node,
                    at_ms: heard_ms(known, &self.contacts, namespace, node).unwrap_or(0),
                    vector: VersionVector::new(),
                },
            })
            .collect();
        out.sort_by(|a, b| b.at_ms.cmp(&a.at_ms).then(a.node.cmp(&b.node)));
        out.truncate(REPORTS_MAX - 1);
        out
    }

    /// Which of `namespace`'s tombstones may be collected now. `own` is this node's
    /// vector of the namespace, `peers` every node this node ever linked with.
    pub fn view(
        &mut self,
        namespace: &Namespace,
        me: NodeId,
        own: &VersionVector,
        peers: &[NodeId],
        now_ms: u64,
        horizon_ms: u64,
    ) -> GcView {
        let peers = self.linked(namespace, peers);
        let nodes = self.namespaces.entry(namespace.clone()).or_default();
        let everyone = everyone(nodes, me, own, &peers);
        let mut view = GcView {
            stable: own.clone(),
            complete: true,
            away: Vec::new(),
            waiting: Vec::new(),
        };
        for node in everyone {
            let known = nodes.get_mut(&node);
            let heard_ms = heard_ms(known.as_deref(), &self.contacts, namespace, node)
                .unwrap_or(self.opened_ms);
            if now_ms.saturating_sub(heard_ms) > horizon_ms {
                view.complete =
                    crate::mutation::active(crate::mutation::Mutation::GcAwayLeavesNoEpitaph);
                view.away.push(node);
                continue;
            }
            let usable = known.and_then(|k| {
                k.promote(own);
                k.usable.as_ref().map(|(_, v)| v)
            });
            match usable {
                Some(v) => view.stable = view.stable.meet(v),
                None if crate::mutation::active(
                    crate::mutation::Mutation::GcSkipsUnreportedNodes,
                ) => {}
                None => {
                    view.stable = VersionVector::new();
                    view.waiting.push(node);
                }
            }
        }
        view
    }
}

/// Whether this node's vector `own` contains a report's vector: only then has it
/// applied every event the reporting node held.
fn contains(own: &VersionVector, report: &VersionVector) -> bool {
    report.is_subset(own)
        || crate::mutation::active(crate::mutation::Mutation::GcReportNotContained)
}

/// The nodes that may write in a namespace, this node left out: the origins of its
/// vector, every node a report names, and every node it ever had a link with (`peers`).
fn everyone(
    nodes: &HashMap<NodeId, Known>,
    me: NodeId,
    own: &VersionVector,
    peers: &[NodeId],
) -> BTreeSet<NodeId> {
    let mut everyone: BTreeSet<NodeId> = own.iter().map(|(id, _)| id).collect();
    everyone.extend(nodes.keys().copied());
    everyone.extend(peers.iter().copied());
    everyone.remove(&me);
    everyone
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dot;

    fn id(n: u64) -> NodeId {
        NodeId::new(n).unwrap()
    }

    fn vv(dots: &[(u64, u64)]) -> VersionVector {
        let mut v = VersionVector::new();
        for &(o, hi) in dots {
            v.insert_range(id(o), 1, hi);
        }
        v
    }

    fn report(node: u64, at_ms: u64, vector: VersionVector) -> VectorReport {
        VectorReport {
            node: id(node),
            at_ms,
            vector,
        }
    }

    fn ns() -> Namespace {
        Namespace::new("n").unwrap()
    }

    const H: u64 = 1000;

    #[test]
    fn a_lone_node_may_collect_everything_it_holds() {
        let mut gc = Gc::new(0);
        let own = vv(&[(1, 5)]);
        let view = gc.view(&ns(), id(1), &own, &[], 10, H);
        assert_eq!(view.stable, own);
        assert!(view.complete);
    }

    #[test]
    fn a_peer_a_namespace_is_kept_from_holds_nothing_back() {
        // Node 3 lists every namespace but "n" is kept from it (residency): it cannot
        // hold or write "n", so collection in "n" does not wait for it, and leaves no
        // epitaph; in another namespace it still holds everything back.
        let mut gc = Gc::new(0);
        let own = vv(&[(1, 5)]);
        let kept =
            crate::session::Withhold(std::sync::Arc::new(|ns: &Namespace| ns.as_str() == "n"));
        gc.note_contact(id(3), 10, &["*".to_owned()], Some(kept));
        let view = gc.view(&ns(), id(1), &own, &[id(3)], 20, H);
        assert_eq!(view.stable, own);
        assert!(view.complete && view.waiting.is_empty() && view.away.is_empty());
        assert!(gc.gossip(&ns(), id(1), &own, &[id(3)]).is_empty());
        let other = Namespace::new("other").unwrap();
        let view = gc.view(&other, id(1), &own, &[id(3)], 20, H);
        assert_eq!(view.waiting, vec![id(3)]);
        // Once it has written in "n" (before the rule), it is in the rule again.
        let with_3 = vv(&[(1, 5), (3, 1)]);
        let view = gc.view(&ns(), id(1), &with_3, &[id(3)], 20, H);
        assert_eq!(view.waiting, vec![id(3)]);
    }

    #[test]
    fn a_known_node_without_a_report_holds_everything_back() {
        let mut gc = Gc::new(0);
        let own = vv(&[(1, 5)]);
        let view = gc.view(&ns(), id(1), &own, &[id(2)], 10, H);
        assert!(view.stable.is_empty());
        assert!(view.complete);
        assert_eq!(view.waiting, vec![id(2)]);
        // An origin in the vector counts as known too.
        let own = vv(&[(1, 5), (3, 2)]);
        gc.note(&ns(), id(1), &own, report(2, 5, own.clone()));
        let view = gc.view(&ns(), id(1), &own, &[id(2)], 10, H);
        assert!(view.stable.is_empty());
    }

    #[test]
    fn only_reports_this_node_holds_count() {
        let mut gc = Gc::new(0);
        let own = vv(&[(1, 5), (2, 3)]);
        // Node 2 holds 1..=4 of node 1, and 1..=7 of its own: this node lacks 4..=7 of
        // node 2 (events that could lose to a delete it would otherwise collect).
        gc.note(&ns(), id(1), &own, report(2, 5, vv(&[(1, 4), (2, 7)])));
        let view = gc.view(&ns(), id(1), &own, &[id(2)], 10, H);
        assert!(view.stable.is_empty());
        // Once this node holds them, the report counts: dots of node 1 up to 4.
        let own = vv(&[(1, 5), (2, 7)]);
        let view = gc.view(&ns(), id(1), &own, &[id(2)], 10, H);
        assert_eq!(view.stable, vv(&[(1, 4), (2, 7)]));
        // A later report waits its turn and does not undo the usable one.
        gc.note(&ns(), id(1), &own, report(2, 8, vv(&[(1, 5), (2, 9)])));
        let view = gc.view(&ns(), id(1), &own, &[id(2)], 10, H);
        assert_eq!(view.stable, vv(&[(1, 4), (2, 7)]));
        assert!(view.stable.contains(Dot {
            origin: id(1),
            counter: 4
        }));
    }

    #[test]
    fn a_node_silent_past_the_horizon_is_left_out_and_gossip_carries_the_newest() {
        let mut gc = Gc::new(0);
        let own = vv(&[(1, 5)]);
        gc.note(&ns(), id(1), &own, report(2, 100, vv(&[(1, 5)])));
        gc.note(&ns(), id(1), &own, report(3, 50, vv(&[(1, 2)])));
        gc.note(&ns(), id(1), &own, report(3, 40, vv(&[(1, 1)])));
        assert_eq!(
            gc.gossip(&ns(), id(1), &own, &[]),
            vec![report(2, 100, vv(&[(1, 5)])), report(3, 50, vv(&[(1, 2)]))]
        );
        let view = gc.view(&ns(), id(1), &own, &[], 1000, H);
        assert_eq!(view.stable, vv(&[(1, 2)]), "what 3 was last heard to hold");
        assert!(view.complete);
        let view = gc.view(&ns(), id(1), &own, &[], 1051, H);
        assert_eq!(view.stable, vv(&[(1, 5)]));
        assert!(!view.complete);
        assert_eq!(view.away, vec![id(3)]);
        // Reports of this node itself are not taken.
        gc.note(&ns(), id(1), &own, report(1, 2000, VersionVector::new()));
        assert_eq!(gc.gossip(&ns(), id(1), &own, &[]).len(), 2);
    }

    /// Regression (issue 11, item 1): a node known only as a peer of a relay (it had
    /// not reported on the namespace yet) was not gossiped, so the far end of a line
    /// collected without it.
    #[test]
    fn a_node_known_only_as_a_peer_is_gossiped_and_holds_collection_back_beyond() {
        // B (2) linked with A (1) and C (3); C replicates every namespace, sent its
        // last summary at 50 and has reported nothing of this one.
        let mut b = Gc::new(7);
        b.note_contact(id(3), 50, &["*".to_owned()], None);
        b.note_contact(id(1), 60, &["*".to_owned()], None);
        let own_b = vv(&[(1, 5)]);
        let gossip = b.gossip(&ns(), id(2), &own_b, &[id(1), id(3)]);
        assert_eq!(
            gossip,
            vec![
                report(1, 60, VersionVector::new()),
                report(3, 50, VersionVector::new())
            ],
            "members without a report: empty vectors, heard of at their last summaries"
        );
        // A takes B's summary: B's own report holds all of A's deletes, but C (known
        // from B's gossip alone) holds everything back.
        let mut a = Gc::new(0);
        let own_a = vv(&[(1, 5)]);
        a.note(&ns(), id(1), &own_a, report(2, 60, own_b.clone()));
        for r in gossip {
            a.note(&ns(), id(1), &own_a, r);
        }
        let view = a.view(&ns(), id(1), &own_a, &[id(2)], 100, H);
        assert!(view.stable.is_empty());
        assert!(view.complete);
        assert_eq!(view.waiting, vec![id(3)]);
        // A passes C on, as heard of when B said.
        assert_eq!(
            a.gossip(&ns(), id(1), &own_a, &[id(2)]),
            vec![report(2, 60, own_b), report(3, 50, VersionVector::new())]
        );
        // Past the horizon from then, C is away: collection goes on, leaving epitaphs.
        let view = a.view(&ns(), id(1), &own_a, &[id(2)], 50 + H + 1, H);
        assert!(!view.complete);
        assert_eq!(view.away, vec![id(3)]);
    }

    #[test]
    fn a_node_not_heard_of_since_opening_is_gossiped_as_never_heard_of() {
        // B opened at 5000; C is a peer of old, not linked since.
        let mut b = Gc::new(5000);
        let own = vv(&[(2, 5)]);
        let never = vec![report(3, 0, VersionVector::new())];
        assert_eq!(b.gossip(&ns(), id(2), &own, &[id(3)]), never);
        // Here it holds collection back for the horizon from the opening.
        let view = b.view(&ns(), id(2), &own, &[id(3)], 5000 + H, H);
        assert_eq!(view.waiting, vec![id(3)]);
        // A link from C counts only in the namespaces C replicates; one that leaves
        // this namespace out, it sends to no one: it is not passed on.
        b.note_contact(id(3), 6000, &["other".to_owned()], None);
        assert_eq!(b.gossip(&ns(), id(2), &own, &[id(3)]), vec![]);
        let view = b.view(&ns(), id(2), &own, &[id(3)], 5000 + H, H);
        assert_eq!(view.waiting, vec![id(3)]);
        b.note_contact(id(3), 6001, &["n".to_owned()], None);
        assert_eq!(
            b.gossip(&ns(), id(2), &own, &[id(3)]),
            vec![report(3, 6001, VersionVector::new())]
        );
        // A node that last heard of C at 100 keeps that: a "never" from a node that
        // restarted does not make C look fresh.
        let mut a = Gc::new(0);
        let own = vv(&[(1, 5)]);
        a.note(&ns(), id(1), &own, report(3, 100, vv(&[(1, 2)])));
        a.note(&ns(), id(1), &own, never[0].clone());
        let view = a.view(&ns(), id(1), &own, &[], 100 + H + 1, H);
        assert_eq!(view.away, vec![id(3)]);
    }

    #[test]
    fn an_empty_report_moves_when_a_node_was_heard_of_but_never_displaces_a_real_one() {
        let mut gc = Gc::new(0);
        let own = vv(&[(1, 5)]);
        gc.note(&ns(), id(1), &own, report(2, 100, vv(&[(1, 3)])));
        gc.note(&ns(), id(1), &own, report(2, 900, VersionVector::new()));
        assert_eq!(
            gc.gossip(&ns(), id(1), &own, &[]),
            vec![report(2, 100, vv(&[(1, 3)]))]
        );
        // Heard of at 900: still in the rule at 1500, with its real report.
        let view = gc.view(&ns(), id(1), &own, &[], 100 + H + 500, H);
        assert!(view.complete);
        assert_eq!(view.stable, vv(&[(1, 3)]));
        // A node with nothing but empty reports waits.
        gc.note(&ns(), id(1), &own, report(3, 900, VersionVector::new()));
        let view = gc.view(&ns(), id(1), &own, &[], 1000, H);
        assert!(view.stable.is_empty());
        assert_eq!(view.waiting, vec![id(3)]);
    }
}

/// A model of nodes that replicate lww keys over links, gossip reports and collect
/// deletes by the rule above, in random orders: no deleted key ever comes back.
#[cfg(test)]
mod model {
    use std::collections::BTreeMap;

    use crate::Dot;
    use proptest::prelude::*;

    use super::*;

    /// (clock, origin): the lww order.
    type Version = (u64, u64);

    #[derive(Clone, Debug)]
    struct Ev {
        key: u8,
        delete: bool,
        dot: Dot,
        hlc: u64,
    }

    impl Ev {
        fn version(&self) -> Version {
            (self.hlc, self.dot.origin.get())
        }
    }

    struct Node {
        id: NodeId,
        clock: u64,
        counter: u64,
        vector: VersionVector,
        /// key → the event that set it; a collected delete leaves nothing.
        state: BTreeMap<u8, Ev>,
        /// What this node holds, in arrival order, as its feed (collected deletes
        /// leave a hole, as compaction would).
        feed: Vec<Option<Ev>>,
        gc: Gc,
    }

    #[derive(Clone, Debug)]
    enum Step {
        Write {
            node: usize,
            key: u8,
            delete: bool,
        },
        Deliver {
            link: usize,
            forward: bool,
            max: usize,
        },
        Summarize {
            link: usize,
            forward: bool,
        },
        Collect {
            node: usize,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0..4usize, 0..3u8, any::<bool>())
                .prop_map(|(node, key, delete)| Step::Write { node, key, delete }),
            4 => (0..4usize, any::<bool>(), 1..4usize)
                .prop_map(|(link, forward, max)| Step::Deliver { link, forward, max }),
            3 => (0..4usize, any::<bool>()).prop_map(|(link, forward)| Step::Summarize { link, forward }),
            2 => (0..4usize).prop_map(|node| Step::Collect { node }),
        ]
    }

    fn ns() -> Namespace {
        Namespace::new("m").unwrap()
    }

    struct World {
        nodes: Vec<Node>,
        links: Vec<(usize, usize)>,
        /// Per directed link (index * 2 + direction): how far into the sender's feed.
        cursors: Vec<usize>,
        /// Every event ever written: the reference.
        all: Vec<Ev>,
        now: u64,
    }

    impl World {
        fn new(nodes: usize, links: Vec<(usize, usize)>) -> World {
            let ids: Vec<NodeId> = (1..=nodes as u64)
                .map(|n| NodeId::new(n).unwrap())
                .collect();
            // No node knows anything of another's vector at the start: a node knows
            // its neighbours only as peers it has a link with (the `peers` of
            // `Gc::view`), and hears of the others through gossip.
            let nodes = ids
                .iter()
                .map(|&id| Node {
                    id,
                    clock: 0,
                    counter: 0,
                    vector: VersionVector::new(),
                    state: BTreeMap::new(),
                    feed: Vec::new(),
                    gc: Gc::new(0),
                })
                .collect();
            let cursors = vec![0; links.len() * 2];
            World {
                nodes,
                links,
                cursors,
                all: Vec::new(),
                now: 1,
            }
        }

        fn apply(node: &mut Node, ev: &Ev) {
            node.clock = node.clock.max(ev.hlc);
            if !node.vector.insert(ev.dot) {
                return;
            }
            if node
                .state
                .get(&ev.key)
                .is_none_or(|cur| ev.version() > cur.version())
            {
                node.state.insert(ev.key, ev.clone());
            }
            node.feed.push(Some(ev.clone()));
        }

        fn run(&mut self, step: &Step) {
            self.now += 1;
            let n = self.nodes.len();
            match *step {
                Step::Write { node, key, delete } => {
                    let node = &mut self.nodes[node % n];
                    node.clock += 1;
                    node.counter += 1;
                    let ev = Ev {
                        key,
                        delete,
                        dot: Dot {
                            origin: node.id,
                            counter: node.counter,
                        },
                        hlc: node.clock,
                    };
                    self.all.push(ev.clone());
                    World::apply(node, &ev);
                }
                Step::Deliver { link, forward, max } => {
                    let l = link % self.links.len();
                    let (from, to) = if forward {
                        self.links[l]
                    } else {
                        (self.links[l].1, self.links[l].0)
                    };
                    let cursor = &mut self.cursors[l * 2 + usize::from(forward)];
                    let events: Vec<Ev> = self.nodes[from].feed[*cursor..]
                        .iter()
                        .take(max)
                        .flatten()
                        .cloned()
                        .collect();
                    *cursor = (*cursor + max).min(self.nodes[from].feed.len());
                    for ev in &events {
                        World::apply(&mut self.nodes[to], ev);
                    }
                }
                Step::Summarize { link, forward } => {
                    let l = link % self.links.len();
                    let (from, to) = if forward {
                        self.links[l]
                    } else {
                        (self.links[l].1, self.links[l].0)
                    };
                    let peers = self.peers(from);
                    let sender = &self.nodes[from];
                    // A summary lists only the namespaces its sender holds something
                    // of: until then it carries no reports of this one.
                    let mut reports = Vec::new();
                    if !sender.vector.is_empty() {
                        reports.push(VectorReport {
                            node: sender.id,
                            at_ms: self.now,
                            vector: sender.vector.clone(),
                        });
                        reports.extend(sender.gc.gossip(&ns(), sender.id, &sender.vector, &peers));
                    }
                    let sender_id = sender.id;
                    let receiver = &mut self.nodes[to];
                    receiver
                        .gc
                        .note_contact(sender_id, self.now, &["*".to_owned()], None);
                    for r in reports {
                        receiver.gc.note(&ns(), receiver.id, &receiver.vector, r);
                    }
                }
                Step::Collect { node } => {
                    let now = self.now;
                    let peers = self.peers(node % n);
                    let node = &mut self.nodes[node % n];
                    let view =
                        node.gc
                            .view(&ns(), node.id, &node.vector, &peers, now, u64::MAX / 2);
                    assert!(view.complete);
                    let gone: Vec<u8> = node
                        .state
                        .iter()
                        .filter(|(_, ev)| ev.delete && view.stable.contains(ev.dot))
                        .map(|(&k, _)| k)
                        .collect();
                    for k in gone {
                        let ev = node.state.remove(&k).expect("listed");
                        for slot in &mut node.feed {
                            if slot.as_ref().is_some_and(|e| e.dot == ev.dot) {
                                *slot = None;
                            }
                        }
                    }
                }
            }
        }

        /// The nodes `node` has a link with: its checkpoint peers.
        fn peers(&self, node: usize) -> Vec<NodeId> {
            self.links
                .iter()
                .filter_map(|&(a, b)| {
                    if a == node {
                        Some(self.nodes[b].id)
                    } else if b == node {
                        Some(self.nodes[a].id)
                    } else {
                        None
                    }
                })
                .collect()
        }

        /// What every key reads as at a node: its value's dot, deletes as absent.
        fn live(node: &Node) -> BTreeMap<u8, Dot> {
            node.state
                .iter()
                .filter(|(_, e)| !e.delete)
                .map(|(&k, e)| (k, e.dot))
                .collect()
        }

        /// The lww winner of every key over every event written.
        fn reference(&self) -> BTreeMap<u8, Dot> {
            let mut winners: BTreeMap<u8, &Ev> = BTreeMap::new();
            for ev in &self.all {
                if winners
                    .get(&ev.key)
                    .is_none_or(|w| ev.version() > w.version())
                {
                    winners.insert(ev.key, ev);
                }
            }
            winners
                .into_iter()
                .filter(|(_, e)| !e.delete)
                .map(|(k, e)| (k, e.dot))
                .collect()
        }
    }

    fn check(topology: u8, steps: &[Step]) -> Result<(), TestCaseError> {
        let (nodes, links) = match topology % 3 {
            // A line: what a node hears of the far end, it hears through the middle.
            0 => (3, vec![(0, 1), (1, 2)]),
            1 => (4, vec![(0, 1), (1, 2), (2, 3)]),
            _ => (3, vec![(0, 1), (1, 2), (0, 2)]),
        };
        let mut world = World::new(nodes, links);
        for step in steps {
            world.run(step);
            // At every moment: a key reads as live only with a value that can still
            // win, never with one older than a delete the node already applied.
            let reference = world.reference();
            for node in &world.nodes {
                for (key, dot) in World::live(node) {
                    let ev = world.all.iter().find(|e| e.dot == dot).expect("written");
                    let newest_delete_held = world
                        .all
                        .iter()
                        .filter(|e| e.key == key && e.delete && node.vector.contains(e.dot))
                        .map(Ev::version)
                        .max();
                    prop_assert!(
                        newest_delete_held.is_none_or(|d| d < ev.version()),
                        "node {} reads key {key} as {dot}, older than a delete it holds (reference {:?})",
                        node.id,
                        reference.get(&key)
                    );
                }
            }
        }
        // Then every link delivers everything, with summaries and collections between.
        let link_count = world.links.len();
        for _ in 0..12 {
            for link in 0..link_count {
                for forward in [true, false] {
                    world.run(&Step::Summarize { link, forward });
                    world.run(&Step::Deliver {
                        link,
                        forward,
                        max: usize::MAX / 2,
                    });
                }
            }
            for node in 0..nodes {
                world.run(&Step::Collect { node });
            }
        }
        let reference = world.reference();
        for node in &world.nodes {
            prop_assert_eq!(&World::live(node), &reference, "node {}", node.id);
        }
        Ok(())
    }

    /// Regression (issue 11, item 1): in a line A–B–C where C never wrote before it
    /// writes a key A then deletes, and C's summaries never carried a report of the
    /// namespace, A collected the delete (it knew of no C) and C's older write then
    /// reached A through B and brought the key back.
    #[test]
    fn a_node_that_never_wrote_reached_through_a_relay_holds_collection_back() {
        let (a, c) = (0, 2);
        let (ab, bc) = (0, 1);
        let write = |node, key, delete| Step::Write { node, key, delete };
        let deliver = |link, forward| Step::Deliver {
            link,
            forward,
            max: 100,
        };
        let steps = [
            write(a, 0, false),
            deliver(ab, true),
            // C's summary while it holds nothing of the namespace carries no report.
            Step::Summarize {
                link: bc,
                forward: false,
            },
            deliver(bc, true),
            // C holds the namespace now; it writes before it sends another summary.
            write(c, 0, false),
            // A's clock runs ahead of C's: A's delete is newer than C's write.
            write(a, 1, false),
            write(a, 2, false),
            write(a, 0, true),
            deliver(ab, true),
            // B holds the delete and tells A so (and, with the fix, of C).
            Step::Summarize {
                link: ab,
                forward: false,
            },
            Step::Collect { node: a },
            // C's write reaches A through B.
            deliver(bc, false),
            deliver(ab, false),
        ];
        check(0, &steps).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn no_collected_delete_lets_a_key_come_back(topology in any::<u8>(), steps in prop::collection::vec(step(), 0..150)) {
            check(topology, &steps)?;
        }
    }
}
