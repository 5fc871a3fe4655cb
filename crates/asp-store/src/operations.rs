//! Long maintenance runs in progress (compaction, scrub), for status: what runs, since
//! when, and how far it has got. A run registers itself and is gone when its guard is
//! dropped, however it ends.

use std::sync::Mutex;

/// One run in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// `compaction` or `scrub`.
    pub kind: &'static str,
    pub started_unix_ms: u64,
    /// How much is done of `total`, in `unit`s (`segments`, `bytes`).
    pub done: u64,
    pub total: u64,
    pub unit: &'static str,
}

#[derive(Default)]
pub(crate) struct Operations {
    running: Mutex<Vec<(u64, Operation)>>,
    next: Mutex<u64>,
}

/// Removes its run when dropped.
pub(crate) struct Running<'a> {
    operations: &'a Operations,
    id: u64,
}

impl Operations {
    pub(crate) fn start(&self, kind: &'static str, total: u64, unit: &'static str) -> Running<'_> {
        let id = {
            let mut next = self.next.lock().unwrap();
            *next += 1;
            *next
        };
        self.running.lock().unwrap().push((
            id,
            Operation {
                kind,
                started_unix_ms: crate::clock::wall_ms(),
                done: 0,
                total,
                unit,
            },
        ));
        Running {
            operations: self,
            id,
        }
    }

    pub(crate) fn list(&self) -> Vec<Operation> {
        self.running
            .lock()
            .unwrap()
            .iter()
            .map(|(_, o)| o.clone())
            .collect()
    }
}

impl Running<'_> {
    /// Sets how much is done (at most the total).
    pub(crate) fn done(&self, done: u64) {
        if let Some((_, o)) = self
            .operations
            .running
            .lock()
            .unwrap()
            .iter_mut()
            .find(|(id, _)| *id == self.id)
        {
            o.done = done.min(o.total);
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.operations
            .running
            .lock()
            .unwrap()
            .retain(|(id, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_shows_its_progress_until_its_guard_goes() {
        let ops = Operations::default();
        let a = ops.start("compaction", 4, "segments");
        {
            let b = ops.start("scrub", 100, "bytes");
            b.done(250);
            a.done(1);
            let list = ops.list();
            assert_eq!(list.len(), 2);
            assert_eq!(
                (list[0].kind, list[0].done, list[0].total),
                ("compaction", 1, 4)
            );
            assert_eq!((list[1].kind, list[1].done), ("scrub", 100));
        }
        assert_eq!(ops.list().len(), 1);
        drop(a);
        assert!(ops.list().is_empty());
    }
}
