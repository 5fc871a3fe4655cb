//! The writer's changes to the small files beside the log, each in queue order with
//! the groups around it: a peer's cover joins the base vectors (`base.vv`), a policy
//! request sets a namespace's conflict policy (`policies`), and a group's local
//! writes reserve their counters (`counters`) before they are built.

use super::*;

impl Writer {
    /// Joins a covered vector into the namespace's base, durably, and into its
    /// vector. The base file is written here, in queue order, so that the cover takes
    /// effect after every request queued before it. Dots held here (parked or
    /// quarantined) are left out: they are not applied, and a vector claiming them
    /// would make them duplicates when released.
    /// A peer's covered dots, first in their group (see `split_at_covers`). Every
    /// earlier group is in the log; under `fsync = always` it is durable too, else
    /// the log is synced now: the base file must never claim dots whose repairs a
    /// power cut could still take.
    pub(super) fn add_cover(&mut self, g: &mut Group, c: CoverRequest) {
        debug_assert!(self.buf.is_empty(), "a cover starts its group");
        if self.shared.config.fsync != FsyncMode::Always
            && let Err(e) = self.segment.file.sync_data()
        {
            let err = self
                .shared
                .fail(format!("fsync of {}: {e}", self.segment.path.display()));
            let _ = c.reply.send(Err(err));
            return;
        }
        let held = self
            .shared
            .writer
            .held
            .lock()
            .unwrap()
            .dots(&c.namespace, false);
        let vector = if held.is_empty() {
            c.vector
        } else {
            c.vector.difference(&held)
        };
        if let Err(e) = self.cover(g, &c.namespace, &vector) {
            let _ = c.reply.send(Err(e));
            return;
        }
        g.acks.push(Ack {
            reply: Reply::AfterIndex(c.reply),
            _permit: None,
        });
    }

    /// Joins `vector` into the namespace's vector, and the dots of it the vector did
    /// not hold into its base (durably). Dots held already are in the log: in the base
    /// they would survive the loss of their record (a salvage) and make every peer
    /// whose summary lags behind them look like it needs a handover.
    pub(super) fn cover(
        &mut self,
        g: &mut Group,
        namespace: &Namespace,
        vector: &VersionVector,
    ) -> Result<(), WriteError> {
        let vector = &match self.namespaces.get(namespace) {
            Some(state) => vector.difference(&state.vector),
            None => vector.clone(),
        };
        if vector.is_empty() {
            return Ok(());
        }
        let saved = {
            let mut bases = self.shared.maintenance.bases.lock().unwrap();
            let mut next = bases.clone();
            next.by_namespace
                .entry(namespace.clone())
                .or_default()
                .join(vector);
            let saved = next.save(self.shared.config.fs.as_ref(), &self.shared.config.data_dir);
            if saved.is_ok() {
                *bases = next;
            }
            saved
        };
        if let Err(e) = saved {
            // Nothing changed: the old file is intact, and the store can go on.
            let what = format!("writing the base vector file: {e}");
            return Err(if is_no_space(&e) {
                self.shared.no_space(what)
            } else {
                WriteError::Storage(what)
            });
        }
        self.namespaces
            .entry(namespace.clone())
            .or_default()
            .vector
            .join(vector);
        g.touch(namespace);
        Ok(())
    }

    pub(super) fn policy(&self, namespace: &Namespace) -> Policy {
        self.shared.writer.policies.read().unwrap().get(namespace)
    }

    /// Whether `namespace` holds any event.
    fn holds_data(&self, namespace: &Namespace) -> bool {
        self.namespaces
            .get(namespace)
            .is_some_and(|s| !s.vector.is_empty())
    }

    pub(super) fn set_policy(&mut self, p: PolicyRequest) {
        let current = self.policy(&p.namespace);
        let result = if current == p.policy {
            Ok(())
        } else if self.holds_data(&p.namespace) {
            Err(WriteError::PolicyFixed(format!(
                "namespace {} holds data under the {current} policy; a namespace's policy cannot change once it holds data",
                p.namespace
            )))
        } else {
            self.save_policy(&p.namespace, p.policy)
        };
        let _ = p.reply.send(result);
    }

    pub(super) fn save_policy(
        &self,
        namespace: &Namespace,
        policy: Policy,
    ) -> Result<(), WriteError> {
        let mut policies = self.shared.writer.policies.write().unwrap();
        let mut next = policies.clone();
        next.by_namespace.insert(namespace.clone(), policy);
        next.save(self.shared.config.fs.as_ref(), &self.shared.config.data_dir)
            .map_err(|e| {
                let what = format!("writing the policies file: {e}");
                if is_no_space(&e) {
                    self.shared.no_space(what)
                } else {
                    WriteError::Storage(what)
                }
            })?;
        *policies = next;
        Ok(())
    }

    /// The counter this node's next event in `namespace` gets (reserved by
    /// [`Writer::reserve_counters`] before the group is built).
    pub(super) fn next_counter(&self, namespace: &Namespace) -> u64 {
        self.shared.writer.counters.lock().unwrap().next(namespace)
    }

    /// Makes the counters the group's local writes will take durable as reserved
    /// (usually no I/O: counters are reserved in blocks), so that no crash can make
    /// this node issue a counter twice that a client or a peer has seen. Writes that cannot get counters are answered
    /// here and left out of the group.
    pub(super) fn reserve_counters(&mut self, group: Vec<Work>) -> Vec<Work> {
        // Under `fsync = "always"` nobody sees a counter before the log holding it is
        // durable (clients get no answer, peers no feed entry): the log is its own
        // reservation, and a crash can only take back counters nobody saw.
        if self.shared.config.fsync == FsyncMode::Always {
            return group;
        }
        let mut needs: HashMap<Namespace, u64> = HashMap::new();
        for work in &group {
            if let Work::Write(w) = work {
                *needs.entry(w.namespace.clone()).or_default() += w.ops.len() as u64;
                if let Some(c) = &w.checkpoint {
                    *needs.entry(c.namespace.clone()).or_default() += 1;
                }
            }
        }
        if needs.is_empty() {
            return group;
        }
        let reserved = self.shared.writer.counters.lock().unwrap().reserve(&needs);
        let Err(e) = reserved else { return group };
        let what = format!(
            "reserving counters in the counters file of {}: {e}",
            self.shared.config.data_dir.display()
        );
        let err = self.shared.io_failure(what, &e);
        group
            .into_iter()
            .filter_map(|work| match work {
                Work::Write(w) => {
                    let _ = w.reply.send(Err(err.clone()));
                    None
                }
                other => Some(other),
            })
            .collect()
    }
}
