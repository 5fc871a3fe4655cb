//! Write modes of a namespace, as decisions without I/O: the history of its epochs,
//! which of its events are divergent, and how a voter answers a candidate. The node
//! keeps the records in replicated namespaces (`asp-node/src/modes.rs`); the simulator
//! drives the same functions.
//!
//! A namespace starts in epoch 0, multi-master. Every change of mode or leader is a new
//! epoch, one greater than the greatest this node knows, recorded with the vector its
//! leader held when it began (`start`). An event of a leader namespace carries the
//! epoch its origin led. It is *in line* when its origin led that epoch and, if a later
//! epoch exists, the next one's leader held it when it began; otherwise it is
//! *divergent*: written by a leader that had been replaced (or by a node that never
//! led), which the new leader did not have. Divergent events are kept and merged like
//! any other; they are listed so that someone can look at them.

use crate::{Dot, NodeId, VersionVector};

/// Voters per namespace, at most.
pub const VOTERS_MAX: usize = 15;

/// One epoch of a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochRecord {
    pub epoch: u64,
    /// `None`: multi-master from this epoch on.
    pub leader: Option<NodeId>,
    /// The nodes whose majority elects the next leader (empty: promotion is the
    /// operator's word alone).
    pub voters: Vec<NodeId>,
    /// What the epoch's leader (or the node that wrote the record) held when the epoch
    /// began.
    pub start: VersionVector,
}

/// Every epoch of one namespace this node knows, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    records: Vec<EpochRecord>,
}

/// Where this node stands in a leader namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Multi-master (or no record): every node writes, epoch 0.
    Open,
    /// This node leads `epoch`.
    Leader { epoch: u64 },
    /// Another node leads `epoch`; this one never led the namespace.
    Follower { epoch: u64, leader: NodeId },
    /// Another node leads `epoch`; this one led an earlier epoch.
    Fenced { epoch: u64, leader: NodeId },
}

impl History {
    pub fn new(mut records: Vec<EpochRecord>) -> Self {
        records.sort_by_key(|r| r.epoch);
        records.dedup_by_key(|r| r.epoch);
        History { records }
    }

    pub fn records(&self) -> &[EpochRecord] {
        &self.records
    }

    /// The newest epoch's record.
    pub fn current(&self) -> Option<&EpochRecord> {
        self.records.last()
    }

    /// The newest epoch number (0 without a record).
    pub fn epoch(&self) -> u64 {
        self.current().map_or(0, |r| r.epoch)
    }

    /// Where `me` stands.
    pub fn standing(&self, me: NodeId) -> Standing {
        let Some(current) = self.current() else {
            return Standing::Open;
        };
        let Some(leader) = current.leader else {
            return Standing::Open;
        };
        let epoch = current.epoch;
        if leader == me {
            Standing::Leader { epoch }
        } else if self.records.iter().any(|r| r.leader == Some(me)) {
            Standing::Fenced { epoch, leader }
        } else {
            Standing::Follower { epoch, leader }
        }
    }

    /// Whether an event of `epoch` with `dot` is divergent (see the module's text).
    /// `None` when this node cannot tell yet: it knows no record of that epoch.
    pub fn is_divergent(&self, epoch: u64, dot: Dot) -> Option<bool> {
        if epoch == 0 {
            return Some(false);
        }
        let i = self.records.iter().position(|r| r.epoch == epoch)?;
        let record = &self.records[i];
        if record.leader != Some(dot.origin) {
            return Some(true);
        }
        Some(match self.records.get(i + 1) {
            Some(next) => !next.start.contains(dot),
            None => false,
        })
    }
}

/// How many of `voters` make a majority.
pub fn majority(voters: usize) -> usize {
    voters / 2 + 1
}

/// A candidate's request for votes in `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ask {
    pub epoch: u64,
    pub candidate: NodeId,
    /// What the candidate held when it asked.
    pub vector: VersionVector,
    /// Voters refuse a candidate that lacks events they hold.
    pub require_caught_up: bool,
    /// An automatic failover (not an operator's promotion): voters that still hear
    /// the leader refuse it.
    pub automatic: bool,
}

/// A voter's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vote {
    Grant,
    Refuse(String),
}

/// How voter `me` answers `ask`, given the namespace's history, what it holds,
/// whether it has answered anyone in that epoch already (`None`: no answer is due —
/// not a voter, or answered), and whether it still hears the current leader.
pub fn answer(
    history: &History,
    me: NodeId,
    held: &VersionVector,
    ask: &Ask,
    answered_in_epoch: bool,
    hears_leader: bool,
) -> Option<Vote> {
    let current = history.current()?;
    if !current.voters.contains(&me) || answered_in_epoch {
        return None;
    }
    if ask.epoch <= current.epoch {
        return Some(Vote::Refuse(format!(
            "epoch {} is not after the current one, {}",
            ask.epoch, current.epoch
        )));
    }
    if !current.voters.contains(&ask.candidate) {
        return Some(Vote::Refuse(format!(
            "node {} is not a voter of the namespace",
            ask.candidate
        )));
    }
    if ask.automatic && hears_leader && current.leader != Some(ask.candidate) {
        return Some(Vote::Refuse(
            "this voter still hears the leader: no failover".into(),
        ));
    }
    if ask.require_caught_up && !held.is_subset(&ask.vector) {
        let missing = held.difference(&ask.vector).len();
        return Some(Vote::Refuse(format!(
            "the candidate lacks {missing} events this voter holds"
        )));
    }
    Some(Vote::Grant)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u64) -> NodeId {
        NodeId::new(i).unwrap()
    }

    fn dot(origin: u64, counter: u64) -> Dot {
        Dot {
            origin: n(origin),
            counter,
        }
    }

    fn record(epoch: u64, leader: u64, start: &[(u64, u64)]) -> EpochRecord {
        let mut v = VersionVector::new();
        for &(o, hi) in start {
            v.insert_range(n(o), 1, hi);
        }
        EpochRecord {
            epoch,
            leader: Some(n(leader)),
            voters: vec![n(1), n(2), n(3)],
            start: v,
        }
    }

    #[test]
    fn the_old_leaders_tail_is_divergent_and_the_rest_in_line() {
        // Node 1 led epoch 1; node 2 began epoch 2 holding 1's first five events.
        let h = History::new(vec![record(2, 2, &[(1, 5)]), record(1, 1, &[])]);
        assert_eq!(h.is_divergent(1, dot(1, 5)), Some(false));
        assert_eq!(h.is_divergent(1, dot(1, 6)), Some(true), "the tail");
        assert_eq!(h.is_divergent(1, dot(3, 1)), Some(true), "not the leader");
        assert_eq!(h.is_divergent(2, dot(2, 1)), Some(false));
        assert_eq!(h.is_divergent(0, dot(3, 9)), Some(false), "multi-master");
        assert_eq!(h.is_divergent(7, dot(2, 1)), None, "an epoch not known yet");
    }

    #[test]
    fn standing_tells_the_fenced_from_followers() {
        let h = History::new(vec![record(1, 1, &[]), record(2, 2, &[])]);
        assert_eq!(h.standing(n(2)), Standing::Leader { epoch: 2 });
        assert_eq!(
            h.standing(n(1)),
            Standing::Fenced {
                epoch: 2,
                leader: n(2)
            }
        );
        assert_eq!(
            h.standing(n(3)),
            Standing::Follower {
                epoch: 2,
                leader: n(2)
            }
        );
        assert_eq!(History::default().standing(n(1)), Standing::Open);
    }

    #[test]
    fn voters_grant_once_and_only_to_caught_up_candidates() {
        let h = History::new(vec![record(1, 1, &[])]);
        let mut held = VersionVector::new();
        held.insert_range(n(1), 1, 10);
        let mut behind = VersionVector::new();
        behind.insert_range(n(1), 1, 9);
        let ask = |vector: &VersionVector, epoch| Ask {
            epoch,
            candidate: n(2),
            vector: vector.clone(),
            require_caught_up: true,
            automatic: false,
        };
        assert_eq!(
            answer(&h, n(3), &held, &ask(&held, 2), false, false),
            Some(Vote::Grant)
        );
        assert_eq!(answer(&h, n(3), &held, &ask(&held, 2), true, false), None);
        assert!(matches!(
            answer(&h, n(3), &held, &ask(&behind, 2), false, false),
            Some(Vote::Refuse(_))
        ));
        assert!(matches!(
            answer(&h, n(3), &held, &ask(&held, 1), false, false),
            Some(Vote::Refuse(_))
        ));
        assert_eq!(answer(&h, n(9), &held, &ask(&held, 2), false, false), None);
        let mut loose = ask(&behind, 2);
        loose.require_caught_up = false;
        assert_eq!(
            answer(&h, n(3), &held, &loose, false, false),
            Some(Vote::Grant)
        );
        // A failover is refused while the voter hears the leader; an operator's
        // promotion is not.
        let mut auto = ask(&held, 2);
        auto.automatic = true;
        assert!(matches!(
            answer(&h, n(3), &held, &auto, false, true),
            Some(Vote::Refuse(_))
        ));
        assert_eq!(
            answer(&h, n(3), &held, &auto, false, false),
            Some(Vote::Grant)
        );
        assert_eq!(
            answer(&h, n(3), &held, &ask(&held, 2), false, true),
            Some(Vote::Grant)
        );
        assert_eq!(majority(3), 2);
        assert_eq!(majority(4), 3);
    }
}
