//! Undoing a group that could not be appended (a full disk), and refusing writes
//! before they change anything while free space is below the reserve.

use super::*;

/// The writer's state before a group (see [`Writer::mark`]).
pub(super) struct Mark {
    seq: u64,
    clock: HlcClock,
    sparse: SparseBuilder,
    namespaces: Vec<Namespace>,
    /// Whether the group may take events out of the held store (releases, a
    /// quarantine's retry or discard): undone by reading the held file again.
    takes_held: bool,
}

impl Writer {
    /// The writer's state before a group: all that processing a group changes in the
    /// writer, so that a group that cannot be appended (a full disk) leaves no trace.
    /// Namespace states are not copied (a bootstrapping namespace's vector can be
    /// large): only the names the group's requests name (the only namespaces any
    /// request can touch), whose states [`Writer::roll_back`] takes from the indexer.
    pub(super) fn mark(&self, group: &[Work]) -> Mark {
        // A set: a catch-up batch may name thousands of namespaces.
        fn note<'a>(names: &mut Names<'a>, ns: &'a Namespace) {
            if names.last != Some(ns) && names.seen.insert(ns) {
                names.list.push(ns);
            }
            names.last = Some(ns);
        }
        #[derive(Default)]
        struct Names<'a> {
            list: Vec<&'a Namespace>,
            seen: HashSet<&'a Namespace, foldhash::fast::RandomState>,
            last: Option<&'a Namespace>,
        }
        let mut names = Names::default();
        let mut takes_held = false;
        for work in group {
            match work {
                Work::Write(w) => {
                    if let Some(c) = &w.checkpoint {
                        note(&mut names, &c.namespace);
                    }
                    note(&mut names, &w.namespace)
                }
                Work::Apply(a) => a.events.iter().for_each(|e| note(&mut names, &e.namespace)),
                Work::Cover(c) => note(&mut names, &c.namespace),
                Work::Quarantine(q) => {
                    note(&mut names, &q.namespace);
                    takes_held = true;
                }
                Work::Relocate(_) | Work::Policy(_) | Work::Collect(_) => {}
            }
        }
        // Parked events the group will release touch their namespaces too.
        let limit = wall_ms().saturating_add(self.clock.max_skew_ms());
        let due = self
            .shared
            .writer
            .held
            .lock()
            .unwrap()
            .due_namespaces(limit);
        takes_held |= !due.is_empty();
        let mut namespaces: Vec<Namespace> = names.list.into_iter().cloned().collect();
        for ns in due {
            if !names.seen.contains(&ns) {
                namespaces.push(ns);
            }
        }
        Mark {
            seq: self.seq,
            clock: self.clock.clone(),
            sparse: self.sparse.clone(),
            namespaces,
            takes_held,
        }
    }

    /// Undoes a group that was processed but could not be appended: cuts the segment
    /// back to its end (a partial write must not stay behind the next append) and puts
    /// the writer's state back as [`Writer::mark`] saw it.
    ///
    /// A namespace's state before the group is what the indexer publishes once it
    /// has applied every group sent before: each group hands it the states of the
    /// namespaces it touched, as the writer left them.
    pub(super) fn roll_back(&mut self, mark: Mark) -> std::io::Result<()> {
        self.shared.log.cut_back(&self.segment)?;
        self.crdt_recent.forget_after(mark.seq);
        self.seq = mark.seq;
        self.clock = mark.clock;
        self.sparse = mark.sparse;
        {
            let mut progress = self.shared.progress.lock().unwrap();
            while self
                .shared
                .indexer
                .index_msgs_applied
                .load(Ordering::Acquire)
                < self.index_msgs_sent
                && self.shared.health.failure.get().is_none()
            {
                progress = self.shared.progress_changed.wait(progress).unwrap();
            }
        }
        let indexed = self.shared.indexer.namespaces.read().unwrap();
        for ns in &mark.namespaces {
            match indexed.get(ns) {
                Some(state) => self.namespaces.insert(ns.clone(), state.clone()),
                None => self.namespaces.remove(ns),
            };
        }
        drop(indexed);
        {
            let me = self.shared.node_id;
            let mut counters = self.shared.writer.counters.lock().unwrap();
            for ns in &mark.namespaces {
                let last = self
                    .namespaces
                    .get(ns)
                    .map_or(0, |s| s.vector.max_counter(me));
                counters.take_back(ns, last);
            }
        }
        if mark.takes_held {
            // What the group took out of the held store is still in its file (it is
            // rewritten only at the start of a group).
            let namespaces = &self.namespaces;
            self.shared
                .writer
                .held
                .lock()
                .unwrap()
                .reload(|ns, dot| namespaces.get(ns).is_some_and(|s| s.vector.contains(dot)))
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// The free-space guard: while the data directory's filesystem has less than
    /// `min_free_bytes` free, client writes and peer events are refused before they
    /// change anything (compaction's copies, covers and collections still go: they
    /// are what frees space). One `statvfs` per group.
    pub(super) fn refuse_without_space(&self, group: Vec<Work>) -> Vec<Work> {
        let config = &self.shared.config;
        if config.min_free_bytes == 0 {
            return group;
        }
        let free = match config.fs.free_bytes(&config.data_dir) {
            Ok(free) if free < config.min_free_bytes => free,
            // A filesystem that cannot say is not refused: an append would still
            // fail cleanly.
            _ => return group,
        };
        let mut refused = None;
        group
            .into_iter()
            .filter_map(|work| match work {
                Work::Write(_) | Work::Apply(_) => {
                    let err = refused
                        .get_or_insert_with(|| {
                            self.shared.no_space(format!(
                                "the filesystem of {} has {free} bytes free, below min_free_bytes = {}",
                                config.data_dir.display(),
                                config.min_free_bytes
                            ))
                        })
                        .clone();
                    work.fail(err);
                    None
                }
                other => Some(other),
            })
            .collect()
    }
}
