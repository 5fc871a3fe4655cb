//! Hybrid logical clocks: 48 bits of physical milliseconds since the Unix epoch and
//! 16 bits of logical counter, packed into one `u64` so that comparing two packed
//! values compares the clocks.

use std::fmt;

/// A hybrid logical clock reading.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(u64);

impl Hlc {
    pub const ZERO: Hlc = Hlc(0);
    /// The largest physical part, in milliseconds since the Unix epoch (year 10889).
    pub const PHYSICAL_MS_MAX: u64 = (1 << 48) - 1;

    /// Builds a reading; the physical part is clamped to [`Hlc::PHYSICAL_MS_MAX`].
    pub const fn new(physical_ms: u64, logical: u16) -> Self {
        let physical_ms = if physical_ms > Self::PHYSICAL_MS_MAX {
            Self::PHYSICAL_MS_MAX
        } else {
            physical_ms
        };
        Self((physical_ms << 16) | logical as u64)
    }

    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    pub const fn as_raw(self) -> u64 {
        self.0
    }

    pub const fn physical_ms(self) -> u64 {
        self.0 >> 16
    }

    pub const fn logical(self) -> u16 {
        (self.0 & 0xffff) as u16
    }

    /// The smallest reading greater than `self`. When the logical part is exhausted
    /// the physical part moves one millisecond ahead of the wall clock, as HLC allows.
    const fn successor(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({}.{})", self.physical_ms(), self.logical())
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.logical())
    }
}

/// A remote reading too far in the future, refused so that one node with a broken
/// clock cannot drag everybody's clocks (and every later write's timestamp) ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "remote clock reading {remote} is {ahead_ms} ms ahead of the local wall clock; \
     the limit is max_clock_skew = {max_skew_ms} ms (check NTP on both nodes)"
)]
pub struct ClockSkewError {
    pub remote: Hlc,
    pub ahead_ms: u64,
    pub max_skew_ms: u64,
}

/// A node's hybrid logical clock. Readings it hands out are strictly increasing, even
/// when the wall clock jumps backwards, and stay above every remote reading observed.
///
/// The wall clock is passed in by the caller (milliseconds since the Unix epoch); the
/// clock itself never reads time. To stay monotonic across restarts, the caller seeds
/// it with the largest reading it has stored ([`HlcClock::with_last`]).
#[derive(Debug, Clone)]
pub struct HlcClock {
    last: Hlc,
    max_skew_ms: u64,
}

impl HlcClock {
    pub fn new(max_skew_ms: u64) -> Self {
        Self::with_last(Hlc::ZERO, max_skew_ms)
    }

    pub fn with_last(last: Hlc, max_skew_ms: u64) -> Self {
        Self { last, max_skew_ms }
    }

    /// The largest reading handed out or observed so far.
    pub fn last(&self) -> Hlc {
        self.last
    }

    pub fn max_skew_ms(&self) -> u64 {
        self.max_skew_ms
    }

    /// A reading for a new local event: the wall clock if it has moved past every
    /// reading seen so far, otherwise the successor of the last reading.
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        let wall = Hlc::new(wall_ms, 0);
        let next = if wall > self.last {
            wall
        } else {
            self.last.successor()
        };
        self.last = next;
        next
    }

    /// Takes in a reading from another node so that later local readings exceed it.
    /// Readings more than `max_skew_ms` ahead of `wall_ms` are refused and change
    /// nothing.
    pub fn observe(&mut self, remote: Hlc, wall_ms: u64) -> Result<(), ClockSkewError> {
        let limit = wall_ms.saturating_add(self.max_skew_ms);
        if remote.physical_ms() > limit {
            return Err(ClockSkewError {
                remote,
                ahead_ms: remote.physical_ms() - wall_ms,
                max_skew_ms: self.max_skew_ms,
            });
        }
        if remote > self.last {
            self.last = remote;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn packing_orders_by_physical_then_logical() {
        let a = Hlc::new(10, 65535);
        let b = Hlc::new(11, 0);
        assert!(a < b);
        assert_eq!(a.physical_ms(), 10);
        assert_eq!(a.logical(), 65535);
        assert_eq!(Hlc::new(u64::MAX, 1).physical_ms(), Hlc::PHYSICAL_MS_MAX);
    }

    #[test]
    fn logical_overflow_moves_physical_ahead() {
        let mut clock = HlcClock::with_last(Hlc::new(100, 65535), 0);
        let next = clock.tick(50);
        assert_eq!(next, Hlc::new(101, 0));
    }

    #[test]
    fn refuses_readings_beyond_max_skew() {
        let mut clock = HlcClock::new(60_000);
        assert!(clock.observe(Hlc::new(1_060_000, 0), 1_000_000).is_ok());
        let err = clock
            .observe(Hlc::new(1_060_001, 0), 1_000_000)
            .unwrap_err();
        assert_eq!(err.ahead_ms, 60_001);
        assert_eq!(clock.last(), Hlc::new(1_060_000, 0));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Tick(u64),
        Observe(u64, u16, u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        // Wall readings wander in a small range so that backwards jumps, repeats and
        // logical overflow all happen; a few are huge.
        let wall = prop_oneof![0u64..2_000, Just(Hlc::PHYSICAL_MS_MAX), any::<u64>()];
        prop_oneof![
            wall.clone().prop_map(Step::Tick),
            (0u64..2_100, any::<u16>(), wall).prop_map(|(p, l, w)| Step::Observe(p, l, w)),
        ]
    }

    proptest! {
        #[test]
        fn readings_strictly_increase_and_dominate_observed(steps in prop::collection::vec(step(), 1..400)) {
            let mut clock = HlcClock::new(100);
            let mut last_tick = Hlc::ZERO;
            let mut max_observed = Hlc::ZERO;
            for step in steps {
                match step {
                    Step::Tick(wall) => {
                        let t = clock.tick(wall);
                        prop_assert!(t > last_tick, "tick went from {last_tick:?} to {t:?}");
                        prop_assert!(t > max_observed);
                        // Never behind the wall clock either.
                        prop_assert!(t.physical_ms() >= wall.min(Hlc::PHYSICAL_MS_MAX));
                        last_tick = t;
                    }
                    Step::Observe(p, l, wall) => {
                        let remote = Hlc::new(p, l);
                        match clock.observe(remote, wall) {
                            Ok(()) => max_observed = max_observed.max(remote),
                            Err(e) => prop_assert!(p > wall.saturating_add(100), "{e}"),
                        }
                    }
                }
            }
        }

        #[test]
        fn restart_from_stored_reading_stays_monotonic(before in prop::collection::vec(0u64..5_000, 1..50), after in prop::collection::vec(0u64..5_000, 1..50)) {
            let mut clock = HlcClock::new(0);
            let mut last = Hlc::ZERO;
            for wall in before { last = clock.tick(wall); }
            let mut restarted = HlcClock::with_last(clock.last(), 0);
            for wall in after {
                let t = restarted.tick(wall);
                prop_assert!(t > last);
                last = t;
            }
        }
    }
}
