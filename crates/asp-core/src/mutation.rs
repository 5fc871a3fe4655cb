//! Deliberate bugs in product code, switched on by the simulator (asp-sim) to prove
//! that it notices each of them. Only with the cargo feature `mutations`, which only
//! asp-sim turns on; without it `active` is a constant `false` and every hook
//! compiles away. The switch is per thread: the simulator runs a world on one thread,
//! and other tests in the same process are unaffected.

/// A deliberate bug in the product code the simulator runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// `lww_wins` compares only the clocks' milliseconds and lets the incoming write
    /// win a tie, so replicas that receive concurrent writes in different orders keep
    /// different winners.
    LwwTieGoesToArrival,
    /// The session acknowledges a batch as soon as it arrives, before the node has
    /// made it durable: a crash then loses events the sender will never send again.
    AckOnReceipt,
    /// The session hands the node a batch without its last event, and the
    /// acknowledgement covers it anyway.
    DropLastOfBatch,
    /// The session skips its checks that each batch follows the previous one and that
    /// an acknowledgement starts at the first batch sent, so a lost or reordered batch
    /// can be acknowledged past.
    UncheckedStreamOrder,
    /// `lww_wins` is inverted: the first writer wins. Every replica still picks the
    /// same winner, so replicas agree; only a reference model of last-writer-wins
    /// notices.
    LwwFirstWriterWins,
    /// `RangeSet::insert` merges a counter into the last range across a gap of one
    /// counter, so a vector claims a dot it lacks.
    RangeSetMergesGap,
    /// The responder of a reconciliation run sends none of the keys the initiator
    /// lacks, yet still tells it which dots it now holds the effect of.
    ReconcileDropsLocalSide,
    /// `PnCounter::join` adds the two sides' totals of a node instead of taking the
    /// larger: a state joined with one that already holds it counts it twice.
    CounterJoinAdds,
    /// `OrSet::join` keeps only the adds both sides hold: an add one side has not
    /// seen yet is dropped, as if removed.
    SetJoinDropsConcurrentAdds,
    /// Tombstone collection counts a node's report as soon as it arrives, without
    /// waiting for this node's own vector to contain it: a delete goes before every
    /// event that loses to it has been applied here, and such an event brings the key
    /// back when it arrives.
    GcReportNotContained,
    /// Tombstone collection leaves a node with no report out of the rule instead of
    /// waiting for it: its older writes bring collected keys back.
    GcSkipsUnreportedNodes,
    /// A node away past the horizon is left out of the rule, but collection does not
    /// leave epitaphs for it: its older writes bring collected keys back when it
    /// returns.
    GcAwayLeavesNoEpitaph,
    /// `MvRegister::join` keeps a value the other side has already replaced (its
    /// context holds the value's dot) when that side's entry came from another origin:
    /// an overwritten sibling comes back.
    SiblingsJoinKeepsReplaced,
    /// `JsonMap::join` keeps the register it holds at a path whatever the other side's
    /// version: the first value a replica hears of at each path stays.
    JsonMapJoinKeepsFirst,
    /// `Condition::check` lets an `IfVersion` condition pass whatever the key's
    /// current version: a compare-and-set overwrites a write it never saw.
    ConditionIgnoresVersion,
}

#[cfg(feature = "mutations")]
thread_local! {
    static ACTIVE: std::cell::Cell<Option<Mutation>> = const { std::cell::Cell::new(None) };
}

/// Switches `mutation` on (or every mutation off) for this thread.
#[cfg(feature = "mutations")]
pub fn set(mutation: Option<Mutation>) {
    ACTIVE.with(|a| a.set(mutation));
}

/// Whether `mutation` is switched on for this thread.
#[inline]
pub(crate) fn active(mutation: Mutation) -> bool {
    #[cfg(feature = "mutations")]
    {
        ACTIVE.with(|a| a.get()) == Some(mutation)
    }
    #[cfg(not(feature = "mutations"))]
    {
        let _ = mutation;
        false
    }
}
