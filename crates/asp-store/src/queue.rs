//! The bounded queue between callers, which are async, and the writer thread, which
//! blocks. Callers wait for a free slot asynchronously (or give up after
//! `write_queue_wait`); the writer waits for work with a deadline, which group commit
//! needs to gather stragglers for tens of microseconds.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tokio::sync::Semaphore;

pub(crate) struct WriteQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    /// One permit per free slot.
    slots: Arc<Semaphore>,
    capacity: usize,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
    /// Whether the consumer sleeps on `ready` (so producers know to wake it).
    consumer_waiting: bool,
}

pub(crate) enum TrySendError<T> {
    Full(T),
    Closed(T),
}

impl<T> WriteQueue<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::with_capacity(capacity.min(1024)),
                closed: false,
                consumer_waiting: false,
            }),
            ready: Condvar::new(),
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.state.lock().unwrap().items.len()
    }

    /// Queues `item` if a slot is free right now.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        match self.slots.try_acquire() {
            Ok(permit) => {
                permit.forget();
                self.push(item)
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => Err(TrySendError::Full(item)),
            Err(tokio::sync::TryAcquireError::Closed) => Err(TrySendError::Closed(item)),
        }
    }

    /// Queues `item`, waiting for a free slot. Gives the item back if the queue closes.
    pub async fn send(&self, item: T) -> Result<(), T> {
        match self.slots.acquire().await {
            Ok(permit) => {
                permit.forget();
                self.push(item).map_err(|e| match e {
                    TrySendError::Full(i) | TrySendError::Closed(i) => i,
                })
            }
            Err(_) => Err(item),
        }
    }

    fn push(&self, item: T) -> Result<(), TrySendError<T>> {
        let mut state = self.state.lock().unwrap();
        if state.closed {
            drop(state);
            self.slots.add_permits(1);
            return Err(TrySendError::Closed(item));
        }
        state.items.push_back(item);
        let wake = state.consumer_waiting;
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// The next item, waiting as long as it takes; `None` once closed and empty.
    pub fn recv(&self) -> Option<T> {
        let mut state = self.state.lock().unwrap();
        loop {
            if let Some(item) = state.items.pop_front() {
                drop(state);
                self.slots.add_permits(1);
                return Some(item);
            }
            if state.closed {
                return None;
            }
            state.consumer_waiting = true;
            state = self.ready.wait(state).unwrap();
            state.consumer_waiting = false;
        }
    }

    /// The next item if one arrives before `deadline`.
    pub fn recv_until(&self, deadline: Instant) -> Option<T> {
        let mut state = self.state.lock().unwrap();
        loop {
            if let Some(item) = state.items.pop_front() {
                drop(state);
                self.slots.add_permits(1);
                return Some(item);
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                return None;
            }
            state.consumer_waiting = true;
            state = self.ready.wait_timeout(state, deadline - now).unwrap().0;
            state.consumer_waiting = false;
        }
    }

    pub fn try_recv(&self) -> Option<T> {
        let item = self.state.lock().unwrap().items.pop_front();
        if item.is_some() {
            self.slots.add_permits(1);
        }
        item
    }

    /// Whether [`WriteQueue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.state.lock().unwrap().closed
    }

    /// Refuses further items; what is queued can still be received.
    pub fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.slots.close();
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn bounded_fifo_that_closes() {
        let q = Arc::new(WriteQueue::new(2));
        q.try_send(1).ok().unwrap();
        q.send(2).await.unwrap();
        assert!(matches!(q.try_send(3), Err(TrySendError::Full(3))));
        // A waiting sender gets in once a slot frees.
        let q2 = q.clone();
        let waiting = tokio::spawn(async move { q2.send(3).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(q.recv(), Some(1));
        waiting.await.unwrap().unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(
            q.recv_until(Instant::now() + Duration::from_millis(1)),
            Some(2)
        );
        q.close();
        assert!(matches!(q.try_send(4), Err(TrySendError::Closed(4))));
        assert_eq!(q.send(5).await, Err(5));
        assert_eq!(q.recv(), Some(3));
        assert_eq!(q.recv(), None);
        assert_eq!(q.recv_until(Instant::now() + Duration::from_secs(5)), None);
    }

    #[test]
    fn deadline_passes_without_items() {
        let q: WriteQueue<u8> = WriteQueue::new(1);
        let started = Instant::now();
        assert_eq!(q.recv_until(started + Duration::from_millis(5)), None);
        assert!(q.try_recv().is_none());
    }
}
