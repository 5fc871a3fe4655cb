//! The sweeper: writes the one delete that removes each expired key, and the deletes
//! of keys bound to a lease that ended (docs/MODES.md, *TTL keys*).
//!
//! Reads hide an expired key on every node as soon as its clock reaches the expiry;
//! the delete is what makes the change feed show it, once. One node writes it, so that
//! it appears once: in a leader namespace the leader (of the epoch when it sweeps), in
//! a multi-master namespace the put's origin. The delete names the put's version and
//! orders just after it ([`asp_store::WriteKind::Expire`]), so it removes that put and
//! nothing written after it, whichever node's write reaches a replica first.

use std::sync::Arc;
use std::time::Duration;

use asp_core::{Key, Namespace, NodeId, Version};
use asp_store::{Condition, Store, WriteError, WriteKind, WriteOp};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How often the sweeper looks.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Expiry rows looked at per page.
const PAGE_ROWS: usize = 512;
/// Keys bound to leases are looked at every this many sweeps (once a second).
const BOUND_SWEEP_TICKS: u64 = 4;
/// Deletes in flight at once (the writer commits them in groups).
const IN_FLIGHT_MAX: usize = 64;

/// Writes the delete of `key` that removes the put `version`, if that put is still the
/// key's version. Returns whether it wrote one.
pub async fn expire(
    store: &Store,
    namespace: Namespace,
    key: Key,
    version: Version,
) -> Result<bool, WriteError> {
    let op = WriteOp {
        key,
        kind: WriteKind::Expire { version },
        condition: Condition::None,
    };
    match store.write(namespace, vec![op]).await {
        Ok(_) => Ok(true),
        // Written since, or no longer this node's to remove: nothing to do.
        Err(WriteError::ConditionFailed { .. } | WriteError::NotLeader { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether this node writes the delete of an expired put of `namespace` by `origin`.
fn sweeps(modes: &crate::modes::Modes, me: NodeId, namespace: &Namespace, origin: NodeId) -> bool {
    match modes.mode(namespace) {
        Some(m) => m.leader == me && !m.fenced,
        None => origin == me,
    }
}

/// One pass over what expired by now: returns how many deletes it wrote.
pub(crate) async fn sweep_once(
    store: &Store,
    modes: &crate::modes::Modes,
    me: NodeId,
) -> Result<u64, String> {
    let mut after: Option<Vec<u8>> = None;
    let mut written = 0;
    let mut tasks = JoinSet::new();
    loop {
        let page = {
            let s = store.clone();
            let a = after.clone();
            tokio::task::spawn_blocking(move || s.expired(a.as_deref(), PAGE_ROWS))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?
        };
        for item in page.items {
            if !sweeps(modes, me, &item.namespace, item.version.dot.origin) {
                continue;
            }
            while tasks.len() >= IN_FLIGHT_MAX {
                written += joined(tasks.join_next().await);
            }
            let s = store.clone();
            tasks.spawn(async move { expire(&s, item.namespace, item.key, item.version).await });
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    while let Some(r) = tasks.join_next().await {
        written += joined(Some(r));
    }
    Ok(written)
}

fn joined(r: Option<Result<Result<bool, WriteError>, tokio::task::JoinError>>) -> u64 {
    match r {
        Some(Ok(Ok(true))) => 1,
        Some(Ok(Err(e))) => {
            tracing::warn!(error = %e, "cannot write the delete of an expired key; trying again later");
            0
        }
        _ => 0,
    }
}

/// Sweeps expired keys and the keys of ended leases until shut down.
pub(crate) async fn sweep_loop(
    store: Store,
    modes: Arc<crate::modes::Modes>,
    leases: Arc<crate::leases::Leases>,
    shutdown: CancellationToken,
) {
    let me = store.node_id();
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        match sweep_once(&store, &modes, me).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "expired keys deleted"),
            Err(e) => tracing::warn!(error = %e, "cannot look for expired keys"),
        }
        ticks += 1;
        if ticks.is_multiple_of(BOUND_SWEEP_TICKS)
            && let Err(e) = leases.sweep_bound(&store).await
        {
            tracing::warn!(error = %e, "cannot delete the keys of ended leases");
        }
    }
}
