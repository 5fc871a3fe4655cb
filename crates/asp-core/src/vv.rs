//! Version vectors with gaps: per origin, the exact set of event counters held, kept as
//! sorted ranges. Events reach a node out of order (through different peers, or a
//! catch-up racing a live push), so "everything up to n" is not enough.

use std::collections::BTreeMap;
use std::fmt;

use crate::{Dot, NodeId};

/// A set of counters (each ≥ 1) stored as sorted, disjoint, non-adjacent inclusive
/// ranges. Dense sets, the common case, take one range.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct RangeSet {
    // Invariant: sorted by start, every range lo <= hi, and ranges neither overlap nor
    // touch (next.lo > prev.hi + 1). `check_invariant` asserts it in tests.
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    pub const fn new() -> Self {
        Self { ranges: Vec::new() }
    }

    /// Builds a set from ranges in any order, overlapping or not. Empty ranges
    /// (`lo > hi`) are ignored.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut set = Self::new();
        for (lo, hi) in ranges {
            set.insert_range(lo, hi);
        }
        set
    }

    /// The set `1..=n`.
    pub fn prefix(n: u64) -> Self {
        let mut set = Self::new();
        if n > 0 {
            set.ranges.push((1, n));
        }
        set
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// How many counters the set holds.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|&(lo, hi)| hi - lo + 1).sum()
    }

    pub fn max(&self) -> Option<u64> {
        self.ranges.last().map(|&(_, hi)| hi)
    }

    /// The largest `n` such that every counter in `1..=n` is held; 0 if 1 is missing.
    pub fn contiguous_prefix(&self) -> u64 {
        match self.ranges.first() {
            Some(&(1, hi)) => hi,
            _ => 0,
        }
    }

    pub fn contains(&self, n: u64) -> bool {
        // Index of the first range starting after n; the range before it may hold n.
        let idx = self.ranges.partition_point(|&(lo, _)| lo <= n);
        idx > 0 && self.ranges[idx - 1].1 >= n
    }

    /// Adds one counter; returns whether it was new.
    pub fn insert(&mut self, n: u64) -> bool {
        // Fast path: the next counter in order extends the last range.
        if let Some(last) = self.ranges.last_mut() {
            if n == last.1.wrapping_add(1) && n != 0 {
                last.1 = n;
                return true;
            }
            if n == last.1.saturating_add(2)
                && crate::mutation::active(crate::mutation::Mutation::RangeSetMergesGap)
            {
                last.1 = n;
                return true;
            }
            if n > last.1.saturating_add(1) {
                self.ranges.push((n, n));
                return true;
            }
        }
        self.insert_range(n, n) == 1
    }

    /// Adds every counter in `lo..=hi`; returns how many were new.
    pub fn insert_range(&mut self, lo: u64, hi: u64) -> u64 {
        if lo > hi {
            return 0;
        }
        // Ranges that overlap or touch [lo, hi] are merged into one.
        let start = self
            .ranges
            .partition_point(|&(_, h)| h.saturating_add(1) < lo);
        let end = self
            .ranges
            .partition_point(|&(l, _)| l <= hi.saturating_add(1));
        let mut already = 0;
        let mut new_lo = lo;
        let mut new_hi = hi;
        for &(l, h) in &self.ranges[start..end] {
            let (ol, oh) = (l.max(lo), h.min(hi));
            if ol <= oh {
                already += oh - ol + 1;
            }
            new_lo = new_lo.min(l);
            new_hi = new_hi.max(h);
        }
        self.ranges.splice(start..end, [(new_lo, new_hi)]);
        (hi - lo + 1) - already
    }

    /// Adds every counter of `other`.
    pub fn union_with(&mut self, other: &RangeSet) {
        if self.ranges.is_empty() {
            self.ranges.clone_from(&other.ranges);
            return;
        }
        for &(lo, hi) in &other.ranges {
            self.insert_range(lo, hi);
        }
    }

    /// The counters in `self` that are not in `other`.
    pub fn difference(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::new();
        let mut j = 0;
        for &(lo, hi) in &self.ranges {
            let mut cur = lo;
            // Skip ranges of `other` wholly below the current position.
            while j < other.ranges.len() && other.ranges[j].1 < cur {
                j += 1;
            }
            let mut k = j;
            while cur <= hi {
                match other.ranges.get(k) {
                    Some(&(olo, ohi)) if olo <= hi => {
                        if olo > cur {
                            out.push((cur, olo - 1));
                        }
                        if ohi >= hi {
                            cur = hi.saturating_add(1);
                            if hi == u64::MAX {
                                break;
                            }
                        } else {
                            cur = ohi + 1;
                            k += 1;
                        }
                    }
                    _ => {
                        out.push((cur, hi));
                        break;
                    }
                }
            }
        }
        RangeSet { ranges: out }
    }

    /// Whether every counter of `self` is in `other`.
    pub fn is_subset(&self, other: &RangeSet) -> bool {
        self.ranges.iter().all(|&(lo, hi)| {
            let idx = other.ranges.partition_point(|&(l, _)| l <= lo);
            idx > 0 && other.ranges[idx - 1].1 >= hi
        })
    }

    /// Every counter, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|&(lo, hi)| lo..=hi)
    }

    #[cfg(test)]
    pub(crate) fn check_invariant(&self) {
        for w in self.ranges.windows(2) {
            assert!(w[1].0 > w[0].1 + 1, "ranges overlap or touch: {self:?}");
        }
        for &(lo, hi) in &self.ranges {
            assert!(lo <= hi, "empty range in {self:?}");
        }
    }
}

impl fmt::Debug for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        f.write_str("}")
    }
}

/// For one namespace on one node: per origin, the counters of the events held.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct VersionVector {
    // Origins with an empty set are never stored, so equal sets compare equal.
    origins: BTreeMap<NodeId, RangeSet>,
}

impl VersionVector {
    pub const fn new() -> Self {
        Self {
            origins: BTreeMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    pub fn contains(&self, dot: Dot) -> bool {
        self.origins
            .get(&dot.origin)
            .is_some_and(|set| set.contains(dot.counter))
    }

    /// Records a dot; returns whether it was new.
    pub fn insert(&mut self, dot: Dot) -> bool {
        self.origins
            .entry(dot.origin)
            .or_default()
            .insert(dot.counter)
    }

    /// Records the counters `lo..=hi` of `origin`; returns how many were new.
    pub fn insert_range(&mut self, origin: NodeId, lo: u64, hi: u64) -> u64 {
        if lo > hi {
            return 0;
        }
        self.origins.entry(origin).or_default().insert_range(lo, hi)
    }

    /// Records every counter of `set` for `origin`.
    pub fn insert_set(&mut self, origin: NodeId, set: &RangeSet) {
        if !set.is_empty() {
            self.origins.entry(origin).or_default().union_with(set);
        }
    }

    pub fn get(&self, origin: NodeId) -> Option<&RangeSet> {
        self.origins.get(&origin)
    }

    pub fn iter(&self) -> impl Iterator<Item = (NodeId, &RangeSet)> {
        self.origins.iter().map(|(&id, set)| (id, set))
    }

    /// The number of dots held, over all origins.
    pub fn len(&self) -> u64 {
        self.origins.values().map(RangeSet::len).sum()
    }

    /// The largest counter held for `origin` (0 if none).
    pub fn max_counter(&self, origin: NodeId) -> u64 {
        self.origins
            .get(&origin)
            .and_then(RangeSet::max)
            .unwrap_or(0)
    }

    /// The least upper bound: every dot held by either.
    pub fn join(&mut self, other: &VersionVector) {
        for (&origin, set) in &other.origins {
            self.insert_set(origin, set);
        }
    }

    /// The dots in `self` that `other` does not hold: what `self` could send `other`.
    pub fn difference(&self, other: &VersionVector) -> VersionVector {
        let mut out = VersionVector::new();
        for (&origin, set) in &self.origins {
            let missing = match other.origins.get(&origin) {
                Some(theirs) => set.difference(theirs),
                None => set.clone(),
            };
            if !missing.is_empty() {
                out.origins.insert(origin, missing);
            }
        }
        out
    }

    /// The greatest lower bound: the dots both hold.
    pub fn meet(&self, other: &VersionVector) -> VersionVector {
        let mut out = VersionVector::new();
        for (&origin, set) in &self.origins {
            if let Some(theirs) = other.origins.get(&origin) {
                let both = set.difference(&set.difference(theirs));
                if !both.is_empty() {
                    out.origins.insert(origin, both);
                }
            }
        }
        out
    }

    /// Whether `other` holds every dot `self` holds.
    pub fn is_subset(&self, other: &VersionVector) -> bool {
        self.origins.iter().all(|(origin, set)| {
            other
                .origins
                .get(origin)
                .is_some_and(|theirs| set.is_subset(theirs))
        })
    }
}

impl fmt::Debug for VersionVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.origins.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn model(set: &RangeSet) -> BTreeSet<u64> {
        set.iter().collect()
    }

    fn counters() -> impl Strategy<Value = Vec<(u64, u64)>> {
        // Small values so that overlaps, adjacency and gaps are all common.
        prop::collection::vec((1u64..60, 0u64..8).prop_map(|(lo, w)| (lo, lo + w)), 0..12)
    }

    fn vv() -> impl Strategy<Value = VersionVector> {
        prop::collection::vec((1u64..4, counters()), 0..4).prop_map(|origins| {
            let mut v = VersionVector::new();
            for (o, ranges) in origins {
                v.insert_set(NodeId::new(o).unwrap(), &RangeSet::from_ranges(ranges));
            }
            v
        })
    }

    #[test]
    fn ranges_merge_when_they_touch() {
        let mut s = RangeSet::new();
        assert!(s.insert(1));
        assert!(s.insert(3));
        assert!(!s.insert(3));
        assert_eq!(s.ranges(), &[(1, 1), (3, 3)]);
        assert!(s.insert(2));
        assert_eq!(s.ranges(), &[(1, 3)]);
        assert_eq!(s.contiguous_prefix(), 3);
        assert_eq!(s.insert_range(2, 10), 7);
        assert_eq!(s.ranges(), &[(1, 10)]);
        assert_eq!(RangeSet::from_ranges([(5, 6)]).contiguous_prefix(), 0);
    }

    #[test]
    fn extremes_do_not_overflow() {
        let mut s = RangeSet::new();
        s.insert(u64::MAX);
        s.insert(u64::MAX - 1);
        assert_eq!(s.ranges(), &[(u64::MAX - 1, u64::MAX)]);
        let d = RangeSet::from_ranges([(1, u64::MAX)]).difference(&s);
        assert_eq!(d.ranges(), &[(1, u64::MAX - 2)]);
        assert!(
            RangeSet::from_ranges([(u64::MAX, u64::MAX)])
                .difference(&s)
                .is_empty()
        );
    }

    proptest! {
        #[test]
        fn range_set_behaves_like_a_set(a in counters(), b in counters(), probes in prop::collection::vec(0u64..80, 0..20)) {
            let sa = RangeSet::from_ranges(a.clone());
            let sb = RangeSet::from_ranges(b.clone());
            sa.check_invariant();
            let ma: BTreeSet<u64> = a.iter().flat_map(|&(lo, hi)| lo..=hi).collect();
            let mb: BTreeSet<u64> = b.iter().flat_map(|&(lo, hi)| lo..=hi).collect();
            prop_assert_eq!(model(&sa), ma.clone());
            prop_assert_eq!(sa.len(), ma.len() as u64);
            for p in probes {
                prop_assert_eq!(sa.contains(p), ma.contains(&p));
            }
            let mut u = sa.clone();
            u.union_with(&sb);
            u.check_invariant();
            prop_assert_eq!(model(&u), ma.union(&mb).copied().collect::<BTreeSet<_>>());
            let d = sa.difference(&sb);
            d.check_invariant();
            prop_assert_eq!(model(&d), ma.difference(&mb).copied().collect::<BTreeSet<_>>());
            prop_assert_eq!(sa.is_subset(&sb), ma.is_subset(&mb));
            let expected_prefix = (1..).take_while(|n| ma.contains(n)).last().unwrap_or(0);
            prop_assert_eq!(sa.contiguous_prefix(), expected_prefix);
        }

        #[test]
        fn single_inserts_match_the_model(ns in prop::collection::vec(1u64..50, 0..80)) {
            let mut s = RangeSet::new();
            let mut m = BTreeSet::new();
            for n in ns {
                prop_assert_eq!(s.insert(n), m.insert(n));
                s.check_invariant();
            }
            prop_assert_eq!(model(&s), m);
        }

        #[test]
        fn join_is_a_semilattice(a in vv(), b in vv(), c in vv()) {
            let join = |x: &VersionVector, y: &VersionVector| { let mut z = x.clone(); z.join(y); z };
            prop_assert_eq!(join(&a, &b), join(&b, &a));
            prop_assert_eq!(join(&join(&a, &b), &c), join(&a, &join(&b, &c)));
            prop_assert_eq!(join(&a, &a), a.clone());
            prop_assert!(a.is_subset(&join(&a, &b)));
        }

        #[test]
        fn meet_holds_exactly_the_dots_both_hold(a in vv(), b in vv(), probes in prop::collection::vec((1u64..4, 0u64..80), 0..30)) {
            let m = a.meet(&b);
            prop_assert_eq!(&m, &b.meet(&a));
            prop_assert!(m.is_subset(&a) && m.is_subset(&b));
            prop_assert_eq!(a.meet(&a), a.clone());
            for (origin, counter) in probes {
                let dot = Dot { origin: NodeId::new(origin).unwrap(), counter };
                prop_assert_eq!(m.contains(dot), a.contains(dot) && b.contains(dot));
            }
            for (_, set) in m.iter() {
                set.check_invariant();
                prop_assert!(!set.is_empty());
            }
        }

        #[test]
        fn difference_is_exactly_what_the_other_lacks(a in vv(), b in vv()) {
            let d = a.difference(&b);
            // Nothing in the difference is held by b, and b plus the difference covers a.
            for (origin, set) in d.iter() {
                for n in set.iter() {
                    let dot = Dot { origin, counter: n };
                    prop_assert!(!b.contains(dot));
                    prop_assert!(a.contains(dot));
                }
            }
            let mut covered = b.clone();
            covered.join(&d);
            prop_assert!(a.is_subset(&covered));
            prop_assert_eq!(d.is_empty(), a.is_subset(&b));
            prop_assert_eq!(a.len(), d.len() + a.difference(&d).len());
        }
    }
}
