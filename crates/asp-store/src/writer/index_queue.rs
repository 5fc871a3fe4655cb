//! The queue from the log writer to the indexer, bounded by the key updates it holds
//! rather than by groups alone.
//!
//! It was a channel of 8 groups. A group holds up to `group_events_max` events, so in
//! bulk work (catch-up, bootstrap) 8 groups are plenty; in a live stream a group holds
//! one event or a few, and 8 groups were 8 events of slack: the writer blocked handing
//! a group to the indexer whenever the indexer took a little longer over one batch,
//! and every event behind it waited (bench/RESULTS.md, "Tails … hop by hop"). The
//! bound is now `8 × group_events_max` updates (the memory the old bound allowed at
//! its worst) and, loosely, [`GROUPS_MAX`] groups; a group larger than the whole bound
//! still goes when the queue is empty.
//!
//! One mutex holds the queue and its tallies; each side sleeps on a condvar of its own
//! and is woken only when it sleeps. The indexer takes the whole backlog at once. The
//! writer's waits for room are counted (`asp_writer_index_waits`,
//! `asp_writer_index_wait_seconds`): they are time every later write spends waiting.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Groups queued at most, whatever their size (a bound on the replies and namespace
/// states they carry).
pub(super) const GROUPS_MAX: usize = 1024;

struct Queue<T> {
    /// Each group with its weight (its updates, at least 1).
    groups: VecDeque<(T, usize)>,
    updates: usize,
    /// The indexer is gone: nothing more is taken.
    receiver_gone: bool,
    /// The writer is gone: nothing more comes.
    sender_gone: bool,
    /// Whether each side sleeps on its condvar now: the other wakes it only then
    /// (a wake-up is a system call even when nobody sleeps).
    sender_waits: bool,
    receiver_waits: bool,
}

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    /// The writer waits here for room.
    room: Condvar,
    /// The indexer waits here for a group.
    ready: Condvar,
    updates_max: usize,
}

/// The writer's end. Dropping it lets the indexer go once the queue is empty.
pub(super) struct IndexSender<T> {
    shared: Arc<Shared<T>>,
}

/// The indexer's end. Dropping it lets a writer waiting for room go (its send fails).
pub(super) struct IndexReceiver<T> {
    shared: Arc<Shared<T>>,
}

/// A queue that holds at most `updates_max` updates (and [`GROUPS_MAX`] groups),
/// except that one group of any size is taken when it is empty.
pub(super) fn index_queue<T>(updates_max: usize) -> (IndexSender<T>, IndexReceiver<T>) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            groups: VecDeque::new(),
            updates: 0,
            receiver_gone: false,
            sender_gone: false,
            sender_waits: false,
            receiver_waits: false,
        }),
        room: Condvar::new(),
        ready: Condvar::new(),
        updates_max,
    });
    (
        IndexSender {
            shared: shared.clone(),
        },
        IndexReceiver { shared },
    )
}

impl<T> IndexSender<T> {
    /// Queues `msg`, which holds `updates` updates, waiting while the queue is full
    /// (backpressure for the writers). Returns how long it waited for room (zero when
    /// it did not); fails once the indexer is gone.
    pub(super) fn send(&self, msg: T, updates: usize) -> Result<Duration, ()> {
        let weight = updates.max(1);
        let shared = &*self.shared;
        let mut queue = shared.queue.lock().unwrap();
        let full = |q: &Queue<T>| {
            !q.groups.is_empty()
                && (q.groups.len() >= GROUPS_MAX || q.updates + weight > shared.updates_max)
        };
        let mut started = None;
        while !queue.receiver_gone && full(&queue) {
            started.get_or_insert_with(Instant::now);
            queue.sender_waits = true;
            queue = shared.room.wait(queue).unwrap();
        }
        queue.sender_waits = false;
        let waited = started.map_or(Duration::ZERO, |s: Instant| s.elapsed());
        if queue.receiver_gone {
            return Err(());
        }
        queue.updates += weight;
        queue.groups.push_back((msg, weight));
        let wake = queue.receiver_waits;
        drop(queue);
        if wake {
            shared.ready.notify_one();
        }
        Ok(waited)
    }
}

impl<T> Drop for IndexSender<T> {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap().sender_gone = true;
        self.shared.ready.notify_all();
    }
}

impl<T> IndexReceiver<T> {
    /// Every group queued, in order, waiting for at least one; empty once the
    /// writer's end is dropped and the queue is empty.
    pub(super) fn recv_all(&self) -> Vec<T> {
        self.take(usize::MAX)
    }

    /// The next group, waiting for one; `None` once the writer's end is dropped and
    /// the queue is empty.
    #[cfg(test)]
    pub(super) fn recv(&self) -> Option<T> {
        self.take(1).pop()
    }

    /// Up to `most` groups, the oldest first, waiting for one.
    fn take(&self, most: usize) -> Vec<T> {
        let shared = &*self.shared;
        let mut queue = shared.queue.lock().unwrap();
        while queue.groups.is_empty() && !queue.sender_gone {
            queue.receiver_waits = true;
            queue = shared.ready.wait(queue).unwrap();
        }
        queue.receiver_waits = false;
        let q = &mut *queue;
        let n = most.min(q.groups.len());
        let mut taken = Vec::with_capacity(n);
        for (msg, weight) in q.groups.drain(..n) {
            q.updates -= weight;
            taken.push(msg);
        }
        let wake = queue.sender_waits;
        drop(queue);
        if wake {
            shared.room.notify_one();
        }
        taken
    }
}

impl<T> Drop for IndexReceiver<T> {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap().receiver_gone = true;
        self.shared.room.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// Sends groups of the given sizes from a thread of its own, counting those that
    /// went.
    fn sender(
        tx: IndexSender<usize>,
        groups: Vec<usize>,
    ) -> (Arc<AtomicUsize>, std::thread::JoinHandle<()>) {
        let sent = Arc::new(AtomicUsize::new(0));
        let counted = sent.clone();
        let handle = std::thread::spawn(move || {
            for g in groups {
                if tx.send(g, g).is_err() {
                    return;
                }
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        (sent, handle)
    }

    /// Waits (bounded) until `n` groups went, then checks that no more go while the
    /// queue is not drained.
    fn stops_at(sent: &AtomicUsize, n: usize) {
        for _ in 0..1000 {
            if sent.load(Ordering::SeqCst) >= n {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(sent.load(Ordering::SeqCst), n);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(sent.load(Ordering::SeqCst), n, "went past the bound");
    }

    #[test]
    fn one_event_groups_get_far_more_than_eight_places() {
        let (tx, rx) = index_queue::<usize>(100_000);
        let (sent, handle) = sender(tx, vec![1; GROUPS_MAX + 10]);
        stops_at(&sent, GROUPS_MAX);
        for _ in 0..10 {
            rx.recv().unwrap();
        }
        handle.join().unwrap();
        assert_eq!(sent.load(Ordering::SeqCst), GROUPS_MAX + 10);
    }

    #[test]
    fn large_groups_are_bounded_by_their_updates() {
        let (tx, rx) = index_queue::<usize>(1000);
        let (sent, handle) = sender(tx, vec![300; 6]);
        stops_at(&sent, 3);
        assert_eq!(rx.recv(), Some(300));
        stops_at(&sent, 4);
        drop(rx);
        handle.join().unwrap();
    }

    #[test]
    fn a_group_larger_than_the_bound_goes_into_an_empty_queue() {
        let (tx, rx) = index_queue::<usize>(10);
        tx.send(50, 50).unwrap();
        drop(tx);
        assert_eq!(rx.recv_all(), vec![50]);
        assert_eq!(rx.recv_all(), Vec::<usize>::new());
    }

    #[test]
    fn a_writer_waiting_for_room_is_let_go_when_the_indexer_is_gone() {
        let (tx, rx) = index_queue::<usize>(10);
        let (sent, handle) = sender(tx, vec![10, 10, 10]);
        stops_at(&sent, 1);
        drop(rx);
        handle.join().unwrap();
        assert_eq!(sent.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_indexer_takes_the_backlog_in_order_and_the_writer_reports_its_waits() {
        let (tx, rx) = index_queue::<usize>(10);
        // Room for these: no wait.
        for g in [1, 2, 3] {
            assert_eq!(tx.send(g, 3), Ok(Duration::ZERO));
        }
        let taker = std::thread::spawn(move || {
            // Takes once the writer sleeps for room (bounded: 10 s).
            for _ in 0..1000 {
                if rx.shared.queue.lock().unwrap().sender_waits {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(rx.shared.queue.lock().unwrap().sender_waits);
            let first = rx.recv_all();
            (first, rx)
        });
        // Full (9 + 3 > 10): it waits until the indexer takes the backlog.
        let waited = tx.send(4, 3).unwrap();
        let (first, rx) = taker.join().unwrap();
        assert_eq!(first, vec![1, 2, 3]);
        assert!(!waited.is_zero(), "a send that waited reports it");
        drop(tx);
        assert_eq!(rx.recv_all(), vec![4]);
        assert!(rx.recv_all().is_empty());
    }
}
