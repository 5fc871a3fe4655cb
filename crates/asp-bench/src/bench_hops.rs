//! Where the live scenario's time goes (`--trace-hops`): each event's path from its
//! acknowledgement on node A to its appearance in node B's change feed, cut at the hops
//! the store and the links stamp (`asp_store::trace`), and summed up per segment.
//!
//! Two views: the median of each segment over all events (the typical event), and the
//! mean of each segment over the slowest 1% of events by total latency. The means add
//! up to the mean latency of that slowest 1% — which is where the p99's microseconds
//! go. A segment can be negative for a given event (A's feed shows a group before its
//! writers read their acknowledgements, so A's link may read an event before the
//! benchmark stamps its acknowledgement); the sums still hold.

use asp_store::trace::{Hop, Trace};

/// The segments, between consecutive stamps: (name, what it covers).
const SEGMENTS: [(&str, &str); 10] = [
    (
        "ack → A's link read",
        "A's link wakes on its feed head and reads the event",
    ),
    (
        "link read → sent",
        "A's link frames and encodes it and hands it to the socket",
    ),
    (
        "sent → received",
        "loopback TCP, B's link task wakes, reads and decodes",
    ),
    (
        "received → queued",
        "B's store checks the batch and waits for room in its write queue",
    ),
    (
        "queued → taken",
        "in the queue, until B's log writer takes the batch",
    ),
    (
        "taken → gathered",
        "the writer waits for stragglers to join the group",
    ),
    (
        "gathered → written",
        "conditions, encoding, one write(2) to the log",
    ),
    ("written → synced", "B's fdatasync (none under fsync=never)"),
    ("synced → visible", "the feed head is published"),
    ("visible → seen", "the feed subscriber wakes and reads it"),
];

/// Per-event stamps (nanoseconds from the run's base instant), and the summary.
pub struct HopTable {
    /// Events with every stamp.
    traced: usize,
    /// Events with a stamp missing (sent by another path than the live link, e.g. an
    /// anti-entropy run, or stamped in a table slot another event took).
    untraced: usize,
    /// Median of each segment over all traced events, µs.
    median_us: [f64; SEGMENTS.len()],
    /// Mean of each segment over the slowest 1% of traced events, µs.
    tail_mean_us: [f64; SEGMENTS.len()],
    /// Events in the slowest 1%, and their mean and smallest total, µs.
    tail_events: usize,
    tail_total_mean_us: f64,
    tail_total_min_us: f64,
}

impl HopTable {
    /// Builds the table from the acknowledgement and sighting stamps the benchmark
    /// took (`acked[i]`, `seen[i]`, nanoseconds from the base instant plus one; 0: none)
    /// and the dot counter of event `i` (`counters[i]`, 0: not seen).
    pub fn new(trace: &Trace, acked: &[u64], seen: &[u64], counters: &[u64]) -> HopTable {
        let mut rows: Vec<[i64; SEGMENTS.len() + 1]> = Vec::with_capacity(acked.len());
        let mut untraced = 0;
        for i in 0..acked.len() {
            let (ack, sight, counter) = (acked[i], seen[i], counters[i]);
            let hops: Option<Vec<u64>> =
                Hop::ALL.iter().map(|&h| trace.stamp(h, counter)).collect();
            let (Some(hops), true, true, true) = (hops, ack > 0, sight > 0, counter > 0) else {
                untraced += 1;
                continue;
            };
            let mut stamps = Vec::with_capacity(hops.len() + 2);
            stamps.push(ack - 1);
            stamps.extend(hops);
            stamps.push(sight - 1);
            let mut row = [0i64; SEGMENTS.len() + 1];
            for (k, pair) in stamps.windows(2).enumerate() {
                row[k] = pair[1] as i64 - pair[0] as i64;
            }
            row[SEGMENTS.len()] = stamps[stamps.len() - 1] as i64 - stamps[0] as i64;
            rows.push(row);
        }
        let mut median_us = [0.0; SEGMENTS.len()];
        for (k, m) in median_us.iter_mut().enumerate() {
            let mut column: Vec<i64> = rows.iter().map(|r| r[k]).collect();
            column.sort_unstable();
            *m = column.get(column.len() / 2).copied().unwrap_or(0) as f64 / 1e3;
        }
        rows.sort_unstable_by_key(|r| std::cmp::Reverse(r[SEGMENTS.len()]));
        let tail = &rows[..rows.len().div_ceil(100).min(rows.len())];
        let mut tail_mean_us = [0.0; SEGMENTS.len()];
        for (k, m) in tail_mean_us.iter_mut().enumerate() {
            *m = mean(tail.iter().map(|r| r[k])) / 1e3;
        }
        HopTable {
            traced: rows.len(),
            untraced,
            median_us,
            tail_mean_us,
            tail_events: tail.len(),
            tail_total_mean_us: mean(tail.iter().map(|r| r[SEGMENTS.len()])) / 1e3,
            tail_total_min_us: tail.last().map_or(0, |r| r[SEGMENTS.len()]) as f64 / 1e3,
        }
    }

    /// The table, as Markdown, headed by `title`.
    pub fn markdown(&self, title: &str) -> String {
        let mut out = format!(
            "\n{title}: where the time goes ({} events traced, {} not; the slowest 1% are \
             {} events of {:.0} µs and more, {:.0} µs on average)\n\n",
            self.traced,
            self.untraced,
            self.tail_events,
            self.tail_total_min_us,
            self.tail_total_mean_us
        );
        out.push_str("| segment | median µs | slowest 1%: mean µs | what it covers |\n");
        out.push_str("|---|---:|---:|---|\n");
        for (k, (name, covers)) in SEGMENTS.iter().enumerate() {
            out.push_str(&format!(
                "| {name} | {:.0} | {:.0} | {covers} |\n",
                self.median_us[k], self.tail_mean_us[k]
            ));
        }
        out.push_str(&format!(
            "| total | | {:.0} | |\n",
            self.tail_mean_us.iter().sum::<f64>()
        ));
        out
    }
}

fn mean(values: impl Iterator<Item = i64>) -> f64 {
    let (sum, n) = values.fold((0i128, 0u64), |(s, n), v| (s + v as i128, n + 1));
    if n == 0 { 0.0 } else { sum as f64 / n as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use asp_core::{Dot, Event, Hlc, Key, Namespace, NodeId, Op};
    use asp_store::trace;
    use std::time::{Duration, Instant};

    /// Real stamps through the store's trace: one fast event and one slow in the
    /// writer's fsync; the slow one is the slowest 1%, and its segments add up.
    #[test]
    fn segments_add_up_and_the_tail_is_the_slowest() {
        let (a, b) = (
            NodeId::new(0xbe_0001).unwrap(),
            NodeId::new(0xbe_0002).unwrap(),
        );
        let ns = Namespace::new("hops").unwrap();
        let base = Instant::now();
        let t = trace::enable(a, ns.clone(), base, 64);
        let event = |counter| Event {
            namespace: ns.clone(),
            key: Key::new("k").unwrap(),
            op: Op::Delete,
            dot: Dot { origin: a, counter },
            hlc: Hlc::new(1, 0),
            context: Default::default(),
            epoch: 0,
            expires_ms: 0,
        };
        let since = |at: Instant| at.duration_since(base).as_nanos() as u64 + 1;
        let mut acked = Vec::new();
        let mut seen = Vec::new();
        for (counter, fsync) in [(1u64, 0u64), (2, 30)] {
            let e = event(counter);
            acked.push(since(Instant::now()));
            for hop in Hop::ALL {
                let here = if matches!(hop, Hop::LinkRead | Hop::Sent) {
                    a
                } else {
                    b
                };
                if hop == Hop::Synced {
                    std::thread::sleep(Duration::from_millis(fsync));
                }
                trace::mark(hop, here, [&e]);
            }
            seen.push(since(Instant::now()));
        }
        trace::disable();
        let table = HopTable::new(&t, &acked, &seen, &[1, 2]);
        assert_eq!((table.traced, table.untraced, table.tail_events), (2, 0, 1));
        // The slow event's fsync segment holds its 30 ms.
        assert!(
            table.tail_mean_us[7] >= 30_000.0,
            "{:?}",
            table.tail_mean_us
        );
        let sum: f64 = table.tail_mean_us.iter().sum();
        assert!((sum - table.tail_total_mean_us).abs() < 1.0);
        assert!(table.markdown("t").contains("| written → synced |"));
        // An event whose counter was not seen counts as untraced.
        let table = HopTable::new(&t, &acked, &seen, &[1, 0]);
        assert_eq!((table.traced, table.untraced), (1, 1));
    }
}
