//! How long writes of other nodes took to reach this one: for every event from a peer
//! that this node applies for the first time, the time from its origin's clock reading
//! (the HLC's physical part, taken when the write was accepted) to this node's clock
//! when it applied it. Kept per origin over a sliding window (the last
//! [`WINDOW_SLOTS`] × [`SLOT_MS`] ms), in log-scale buckets, so status can give
//! percentiles of the last minutes without keeping each event.
//!
//! The delay is measured across two clocks: skew between them adds to it (or takes
//! from it; a negative delay counts as 0). The console takes, per origin, the slowest
//! node's percentiles as the time a write took to reach every node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use asp_core::NodeId;

/// Width of one slot of the window.
pub const SLOT_MS: u64 = 10_000;
/// Slots in the window: 30 of 10 s, the last five minutes.
pub const WINDOW_SLOTS: usize = 30;
/// Origins tracked at most; past it, the origin heard from longest ago is dropped.
pub const ORIGINS_MAX: usize = 256;
/// Buckets per doubling of the delay (a bucket spans a factor of 2^(1/4), ~19 %).
const STEPS: f64 = 4.0;
/// Buckets: delays from 0 ms to past 2^40 ms (35 years) all land in one.
const BUCKETS: usize = 164;

/// The bucket of a delay in ms: 0 for 0 ms, then a quarter-doubling each.
fn bucket(ms: u64) -> usize {
    if ms == 0 {
        return 0;
    }
    ((((ms as f64) + 1.0).log2() * STEPS).floor() as usize + 1).min(BUCKETS - 1)
}

/// The largest delay a bucket holds (what a percentile in it reports: never less than
/// the true value).
fn bucket_top(b: usize) -> u64 {
    if b == 0 {
        return 0;
    }
    (2f64.powf(b as f64 / STEPS) - 1.0).ceil() as u64
}

#[derive(Clone)]
struct Slot {
    /// Which slot of time (`wall / SLOT_MS`) the counts are of.
    epoch: u64,
    counts: Box<[u32; BUCKETS]>,
    max_ms: u64,
}

struct Origin {
    slots: Vec<Slot>,
    last_ms: u64,
}

/// Percentiles of one origin's delays over the window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginDelays {
    pub origin: NodeId,
    /// Events of the origin applied in the window.
    pub events: u64,
    /// The median and 99th percentile, each the top of its bucket (within ~19 %
    /// above the true value), and the largest delay seen exactly.
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
    /// When (this node's wall ms) the origin's last event was applied.
    pub last_ms: u64,
}

/// Shared by the writer (which records) and status (which reads). Cheap to clone.
#[derive(Clone, Default)]
pub struct Convergence {
    inner: Arc<Mutex<HashMap<NodeId, Origin>>>,
}

impl std::fmt::Debug for Convergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Convergence").finish_non_exhaustive()
    }
}

impl Convergence {
    /// Records delays of events applied at `wall`: `(origin, origin's ms)` each.
    pub fn record(&self, wall: u64, events: impl IntoIterator<Item = (NodeId, u64)>) {
        let epoch = wall / SLOT_MS;
        let mut origins = self.inner.lock().unwrap();
        for (origin, written_ms) in events {
            let ms = wall.saturating_sub(written_ms);
            if !origins.contains_key(&origin) && origins.len() >= ORIGINS_MAX {
                let oldest = origins
                    .iter()
                    .min_by_key(|(_, o)| o.last_ms)
                    .map(|(id, _)| *id);
                if let Some(oldest) = oldest {
                    origins.remove(&oldest);
                }
            }
            let o = origins.entry(origin).or_insert_with(|| Origin {
                slots: vec![
                    Slot {
                        epoch: u64::MAX,
                        counts: Box::new([0; BUCKETS]),
                        max_ms: 0,
                    };
                    WINDOW_SLOTS
                ],
                last_ms: 0,
            });
            o.last_ms = o.last_ms.max(wall);
            let slot = &mut o.slots[epoch as usize % WINDOW_SLOTS];
            if slot.epoch != epoch {
                slot.epoch = epoch;
                slot.counts.fill(0);
                slot.max_ms = 0;
            }
            let b = bucket(ms);
            slot.counts[b] = slot.counts[b].saturating_add(1);
            slot.max_ms = slot.max_ms.max(ms);
        }
    }

    /// Each origin with events in the window ending at `wall`, by origin.
    pub fn snapshot(&self, wall: u64) -> Vec<OriginDelays> {
        let now = wall / SLOT_MS;
        let oldest = now.saturating_sub(WINDOW_SLOTS as u64 - 1);
        let origins = self.inner.lock().unwrap();
        let mut out: Vec<OriginDelays> = origins
            .iter()
            .filter_map(|(id, o)| {
                let mut counts = [0u64; BUCKETS];
                let mut max_ms = 0;
                for s in o
                    .slots
                    .iter()
                    .filter(|s| s.epoch >= oldest && s.epoch <= now)
                {
                    for (c, n) in counts.iter_mut().zip(s.counts.iter()) {
                        *c += u64::from(*n);
                    }
                    max_ms = max_ms.max(s.max_ms);
                }
                let events: u64 = counts.iter().sum();
                if events == 0 {
                    return None;
                }
                let at = |q: f64| {
                    let rank = ((events as f64) * q).ceil().max(1.0) as u64;
                    let mut seen = 0;
                    for (b, c) in counts.iter().enumerate() {
                        seen += c;
                        if seen >= rank {
                            return bucket_top(b).min(max_ms);
                        }
                    }
                    max_ms
                };
                Some(OriginDelays {
                    origin: *id,
                    events,
                    p50_ms: at(0.5),
                    p99_ms: at(0.99),
                    max_ms,
                    last_ms: o.last_ms,
                })
            })
            .collect();
        out.sort_by_key(|d| d.origin);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u64) -> NodeId {
        NodeId::new(n).unwrap()
    }

    #[test]
    fn buckets_grow_by_a_quarter_doubling_and_hold_their_values() {
        let mut last = 0;
        for ms in [0u64, 1, 2, 3, 5, 10, 99, 100, 101, 1000, 60_000, 1 << 30] {
            let b = bucket(ms);
            assert!(b >= last, "{ms}");
            last = b;
            assert!(
                bucket_top(b) >= ms,
                "{ms} above its bucket's top {}",
                bucket_top(b)
            );
            // Within ~19 % (plus rounding for small values).
            assert!(bucket_top(b) as f64 <= ms as f64 * 1.19 + 2.0, "{ms}");
        }
    }

    #[test]
    fn percentiles_come_from_the_window_and_per_origin() {
        let c = Convergence::default();
        let wall = 1_000_000_000;
        // Origin 1: 98 fast events and 2 slow ones; origin 2: one.
        c.record(wall, (0..98).map(|_| (node(1), wall - 10)));
        c.record(wall, [(node(1), wall - 5_000), (node(1), wall - 9_000)]);
        c.record(wall, [(node(2), wall - 300)]);
        let s = c.snapshot(wall);
        assert_eq!(s.len(), 2);
        let one = &s[0];
        assert_eq!(one.origin, node(1));
        assert_eq!(one.events, 100);
        assert!((10..=12).contains(&one.p50_ms), "{one:?}");
        // The 99th of 100 is the 99th value: 5,000 ms (within its bucket).
        assert!((5_000..=5_950).contains(&one.p99_ms), "{one:?}");
        assert_eq!(one.max_ms, 9_000);
        assert_eq!(s[1].events, 1);
        assert!((300..=357).contains(&s[1].p50_ms), "{:?}", s[1]);
        // A delay from a clock ahead counts as 0.
        c.record(wall, [(node(3), wall + 50)]);
        assert_eq!(c.snapshot(wall)[2].max_ms, 0);
        // Five minutes on, the window has moved past them.
        let later = wall + SLOT_MS * WINDOW_SLOTS as u64;
        assert!(c.snapshot(later).is_empty());
        // A slot reused by a later time starts from nothing.
        c.record(later, [(node(1), later - 1)]);
        let s = c.snapshot(later);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].events, 1);
        assert_eq!(s[0].max_ms, 1);
    }

    #[test]
    fn origins_are_bounded() {
        let c = Convergence::default();
        for n in 0..(ORIGINS_MAX as u64 + 10) {
            c.record(1_000 + n, [(node(n + 1), 1_000)]);
        }
        let s = c.snapshot(1_000 + ORIGINS_MAX as u64 + 10);
        assert_eq!(s.len(), ORIGINS_MAX);
        // The first heard from went first.
        assert!(s.iter().all(|d| d.origin > node(10)));
    }
}
