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

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex};

/// Groups queued at most, whatever their size (a bound on the replies and namespace
/// states they carry).
pub(super) const GROUPS_MAX: usize = 1024;

#[derive(Default)]
struct Held {
    groups: usize,
    updates: usize,
    /// The indexer is gone: nothing more is taken.
    closed: bool,
}

struct Bound {
    held: Mutex<Held>,
    room: Condvar,
    updates_max: usize,
}

/// The writer's end.
pub(super) struct IndexSender<T> {
    tx: std_mpsc::Sender<(T, usize)>,
    bound: Arc<Bound>,
}

/// The indexer's end. Dropping it lets a writer waiting for room go (its send fails).
pub(super) struct IndexReceiver<T> {
    rx: std_mpsc::Receiver<(T, usize)>,
    bound: Arc<Bound>,
}

/// A queue that holds at most `updates_max` updates (and [`GROUPS_MAX`] groups),
/// except that one group of any size is taken when it is empty.
pub(super) fn index_queue<T>(updates_max: usize) -> (IndexSender<T>, IndexReceiver<T>) {
    let (tx, rx) = std_mpsc::channel();
    let bound = Arc::new(Bound {
        held: Mutex::new(Held::default()),
        room: Condvar::new(),
        updates_max,
    });
    (
        IndexSender {
            tx,
            bound: bound.clone(),
        },
        IndexReceiver { rx, bound },
    )
}

impl<T> IndexSender<T> {
    /// Queues `msg`, which holds `updates` updates, waiting while the queue is full
    /// (backpressure for the writers). Fails once the indexer is gone.
    pub(super) fn send(&self, msg: T, updates: usize) -> Result<(), ()> {
        let weight = updates.max(1);
        {
            let mut held = self.bound.held.lock().unwrap();
            while !held.closed
                && held.groups > 0
                && (held.groups >= GROUPS_MAX || held.updates + weight > self.bound.updates_max)
            {
                held = self.bound.room.wait(held).unwrap();
            }
            if held.closed {
                return Err(());
            }
            held.groups += 1;
            held.updates += weight;
        }
        self.tx.send((msg, weight)).map_err(|_| ())
    }
}

impl<T> IndexReceiver<T> {
    /// The next group, waiting for one; `None` once the writer's end is dropped and
    /// the queue is empty.
    pub(super) fn recv(&self) -> Option<T> {
        let (msg, weight) = self.rx.recv().ok()?;
        self.taken(weight);
        Some(msg)
    }

    /// The next group if one is queued.
    pub(super) fn try_recv(&self) -> Option<T> {
        let (msg, weight) = self.rx.try_recv().ok()?;
        self.taken(weight);
        Some(msg)
    }

    fn taken(&self, weight: usize) {
        let mut held = self.bound.held.lock().unwrap();
        held.groups -= 1;
        held.updates -= weight;
        drop(held);
        self.bound.room.notify_all();
    }
}

impl<T> Drop for IndexReceiver<T> {
    fn drop(&mut self) {
        self.bound.held.lock().unwrap().closed = true;
        self.bound.room.notify_all();
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
        assert_eq!(rx.try_recv(), Some(50));
        assert_eq!(rx.try_recv(), None);
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
}
