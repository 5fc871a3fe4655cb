//! The store's one home for the last-writer-wins decision: whether an event's version
//! replaces what a key's index entry holds. The order itself is
//! [`asp_core::lww_wins`]; every place in the store that picks a key's winner asks
//! here, so that the store's choices cannot drift from the order or from each other.

use asp_core::Version;

/// Whether `incoming` beats `current` under last-writer-wins: both are present.
pub(crate) fn wins(incoming: &Version, current: &Version) -> bool {
    asp_core::lww_wins(incoming, current)
}

/// Whether an event at `incoming` replaces a key's entry at `current` (`None`: the key
/// has no entry, so anything replaces it). Equal versions do not replace: they are the
/// same event.
pub(crate) fn supersedes(incoming: &Version, current: Option<&Version>) -> bool {
    current.is_none_or(|current| wins(incoming, current))
}

/// Like [`supersedes`], for the replay of the log into the key index, where an equal
/// version does replace: it is one event twice, a copy compaction relocated, and the
/// later copy is the one that stays.
pub(crate) fn supersedes_on_replay(incoming: &Version, current: Option<&Version>) -> bool {
    current.is_none_or(|current| current == incoming || wins(incoming, current))
}

/// Like [`supersedes`], for a reconciliation repair of a dot this node already holds,
/// where a key with no entry is not replaced: its delete was collected here, so what
/// the repair carries is older than what this node held, and applying it would bring
/// the key back.
pub(crate) fn repair_supersedes(incoming: &Version, current: Option<&Version>) -> bool {
    current.is_some_and(|current| wins(incoming, current))
}
