//! Per-hop timestamps of one node's events on their way into a peer's feed, for the
//! benchmark that reports where the live path's time goes (`asp-bench bench --scenarios
//! live --trace-hops`). Off unless that benchmark turns it on: then every hop costs one
//! atomic load.
//!
//! One trace at a time, in one process, of one origin's events in one namespace: the
//! origin node and its peer run in the same process (as in the benchmark), and each hop
//! is stamped once per event (the first time), in a table indexed by the event's dot
//! counter (dense per origin and namespace) modulo its size. Hops of the
//! sending side are stamped only by the origin; hops of the receiving side only by
//! another node, so with more than one peer the receiving stamps are those of whichever
//! peer got the event first.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use asp_core::{Event, Namespace, NodeId};

/// The hops, in the order an event passes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// The origin's link read the event from its feed.
    LinkRead,
    /// The origin's link handed the frame holding it to the socket (or to the link's
    /// writer task, when the socket did not take it whole).
    Sent,
    /// The peer's link decoded the frame holding it.
    Received,
    /// The peer's store queued it for its log writer (after validation and the wait
    /// for room in the write queue's byte budget).
    Queued,
    /// The peer's log writer took the batch from its queue.
    Taken,
    /// The log writer started building the group (after gathering stragglers).
    Gathered,
    /// The group is appended to the log (written, not yet synced).
    Written,
    /// The group's fsync returned (or there was none to wait for).
    Synced,
    /// The group is published: the peer's feed shows it.
    Visible,
}

impl Hop {
    /// Every hop, in order.
    pub const ALL: [Hop; 9] = [
        Hop::LinkRead,
        Hop::Sent,
        Hop::Received,
        Hop::Queued,
        Hop::Taken,
        Hop::Gathered,
        Hop::Written,
        Hop::Synced,
        Hop::Visible,
    ];

    /// Whether the origin stamps it (the rest are stamped by the peer).
    fn at_origin(self) -> bool {
        matches!(self, Hop::LinkRead | Hop::Sent)
    }
}

/// The stamps of one trace.
pub struct Trace {
    origin: NodeId,
    namespace: Namespace,
    base: Instant,
    slots: usize,
    /// `Hop::ALL.len() × slots` stamps: nanoseconds since `base`, plus one (0: none).
    stamps: Box<[AtomicU64]>,
}

impl Trace {
    /// When `hop` was stamped for the event with dot counter `counter`, in nanoseconds
    /// since the trace's base instant; `None` if it was not.
    pub fn stamp(&self, hop: Hop, counter: u64) -> Option<u64> {
        let at = self.stamps[self.slot(hop, counter)].load(Ordering::Acquire);
        at.checked_sub(1)
    }

    fn slot(&self, hop: Hop, counter: u64) -> usize {
        hop as usize * self.slots + (counter % self.slots as u64) as usize
    }

    fn traces(&self, event: &Event) -> bool {
        event.dot.origin == self.origin && event.namespace == self.namespace
    }
}

static ACTIVE: AtomicBool = AtomicBool::new(false);
static CURRENT: RwLock<Option<Arc<Trace>>> = RwLock::new(None);

/// Starts tracing the events of `origin` in `namespace`, with times measured from
/// `base`, in a table of `slots` events (dot counters further apart than that share
/// stamps). Replaces any trace running.
pub fn enable(origin: NodeId, namespace: Namespace, base: Instant, slots: usize) -> Arc<Trace> {
    let slots = slots.max(1);
    let trace = Arc::new(Trace {
        origin,
        namespace,
        base,
        slots,
        stamps: (0..Hop::ALL.len() * slots)
            .map(|_| AtomicU64::new(0))
            .collect(),
    });
    *CURRENT.write().unwrap() = Some(trace.clone());
    ACTIVE.store(true, Ordering::Release);
    trace
}

/// Stops tracing.
pub fn disable() {
    ACTIVE.store(false, Ordering::Release);
    *CURRENT.write().unwrap() = None;
}

/// Whether a trace runs (one atomic load).
#[inline]
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// Stamps `hop` now for each of `events` that the trace follows, on node `here`.
#[inline]
pub fn mark<'a>(hop: Hop, here: NodeId, events: impl IntoIterator<Item = &'a Event>) {
    if active() {
        mark_counters(hop, here, &traced_counters(events));
    }
}

/// The dot counters of those of `events` that the trace follows (none when no trace
/// runs): for stamping later hops with [`mark_counters`] once the events are gone.
pub fn traced_counters<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<u64> {
    if !active() {
        return Vec::new();
    }
    let Some(trace) = current() else {
        return Vec::new();
    };
    events
        .into_iter()
        .filter(|e| trace.traces(e))
        .map(|e| e.dot.counter)
        .collect()
}

/// Stamps `hop` now for the traced events with dot counters `counters`, on `here`
/// (sending hops only on the origin, receiving hops only elsewhere).
#[inline]
pub fn mark_counters(hop: Hop, here: NodeId, counters: &[u64]) {
    if counters.is_empty() || !active() {
        return;
    }
    let Some(trace) = current() else { return };
    if hop.at_origin() != (here == trace.origin) {
        return;
    }
    let now = u64::try_from(trace.base.elapsed().as_nanos())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1);
    for &counter in counters {
        // The first stamp stays.
        let _ = trace.stamps[trace.slot(hop, counter)].compare_exchange(
            0,
            now,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

fn current() -> Option<Arc<Trace>> {
    CURRENT.read().unwrap().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(origin: NodeId, namespace: &str, counter: u64) -> Event {
        Event {
            namespace: Namespace::new(namespace).unwrap(),
            key: asp_core::Key::new("k").unwrap(),
            op: asp_core::Op::Delete,
            dot: asp_core::Dot { origin, counter },
            hlc: asp_core::Hlc::new(1, 0),
            context: Default::default(),
            epoch: 0,
            expires_ms: 0,
        }
    }

    #[test]
    fn stamps_the_traced_events_once_on_the_right_side() {
        // Ids no other test of this crate uses: the trace is the process's.
        let a = NodeId::new(0x7e57_0000_0000_0a0a).unwrap();
        let b = NodeId::new(0x7e57_0000_0000_0b0b).unwrap();
        let trace = enable(a, Namespace::new("traced").unwrap(), Instant::now(), 16);
        let mine = event(a, "traced", 5);
        let theirs = event(b, "traced", 6);
        let elsewhere = event(a, "other", 7);
        // Sending hops count only on the origin, receiving hops only elsewhere.
        mark(Hop::LinkRead, b, [&mine]);
        mark(Hop::Visible, a, [&mine]);
        assert_eq!(trace.stamp(Hop::LinkRead, 5), None);
        assert_eq!(trace.stamp(Hop::Visible, 5), None);
        mark(Hop::LinkRead, a, [&mine, &theirs, &elsewhere]);
        let counters = traced_counters([&mine, &theirs, &elsewhere]);
        assert_eq!(counters, [5]);
        mark_counters(Hop::Visible, b, &counters);
        let first = trace.stamp(Hop::LinkRead, 5).expect("stamped");
        assert!(trace.stamp(Hop::Visible, 5).is_some());
        assert_eq!(
            trace.stamp(Hop::LinkRead, 6),
            None,
            "another origin's event"
        );
        assert_eq!(
            trace.stamp(Hop::LinkRead, 7),
            None,
            "another namespace's event"
        );
        // The first stamp stays.
        std::thread::sleep(std::time::Duration::from_millis(2));
        mark(Hop::LinkRead, a, [&mine]);
        assert_eq!(trace.stamp(Hop::LinkRead, 5), Some(first));
        disable();
        mark(Hop::Sent, a, [&mine]);
        assert_eq!(trace.stamp(Hop::Sent, 5), None, "not after disable");
        assert!(traced_counters([&mine]).is_empty());
    }
}
