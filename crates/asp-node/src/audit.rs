//! The node's audit log: the namespace `_asp.audit`, one key per entry
//! (`<wall ms, 13 digits>-<node id>-<n>`), a JSON value `{"at_ms", "node", "kind", ...}`.
//! It stays on the node that wrote it (every link withholds it), so it may name what
//! other nodes must not learn (a pinned namespace, a peer's address). Repeated refusals
//! of one peer for one reason are written at most once a minute, with the count of those
//! left out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use asp_core::{ContentType, Key, Namespace, NodeId};
use asp_store::{Store, WriteOp};

/// The audit log's namespace.
pub const AUDIT_NAMESPACE: &str = "_asp.audit";

/// One entry per (kind, subject) at most this often; the rest are counted.
const REPEAT_WINDOW: Duration = Duration::from_secs(60);
/// Distinct (kind, subject) pairs remembered for the window, at most.
const SUBJECTS_MAX: usize = 10_000;

pub struct Audit {
    store: Store,
    node: NodeId,
    next: AtomicU64,
    /// (kind, subject) → when last written, and how many were left out since.
    recent: Mutex<HashMap<(String, String), (Instant, u64)>>,
}

impl Audit {
    pub fn new(store: Store, node: NodeId) -> Audit {
        Audit {
            store,
            node,
            next: AtomicU64::new(0),
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Writes an entry (in the background: the caller never waits for the disk). With
    /// a `subject`, entries of the same kind and subject are written at most once a
    /// minute.
    pub fn record(&self, kind: &str, subject: Option<&str>, mut detail: serde_json::Value) {
        let mut left_out = 0;
        if let Some(subject) = subject {
            let mut recent = self.recent.lock().unwrap();
            let now = Instant::now();
            let slot = (kind.to_owned(), subject.to_owned());
            match recent.get_mut(&slot) {
                Some((at, skipped)) if now.duration_since(*at) < REPEAT_WINDOW => {
                    *skipped += 1;
                    return;
                }
                Some((at, skipped)) => {
                    left_out = *skipped;
                    *at = now;
                    *skipped = 0;
                }
                None => {
                    if recent.len() >= SUBJECTS_MAX {
                        recent.retain(|_, (at, _)| now.duration_since(*at) < REPEAT_WINDOW);
                    }
                    recent.insert(slot, (now, 0));
                }
            }
        }
        let at_ms = asp_store::clock::wall_ms();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(map) = detail.as_object_mut() {
            map.insert("at_ms".into(), at_ms.into());
            map.insert("node".into(), self.node.to_string().into());
            map.insert("kind".into(), kind.into());
            if left_out > 0 {
                map.insert("repeated_before".into(), left_out.into());
            }
        }
        let Ok(key) = Key::new(&format!("{at_ms:013}-{}-{n:06}", self.node)) else {
            return;
        };
        let op = WriteOp::put(
            key,
            ContentType::Json,
            serde_json::to_vec(&detail).unwrap_or_default(),
        );
        let store = self.store.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let ns = Namespace::new(AUDIT_NAMESPACE).expect("a valid name");
            if let Err(e) = store.write(ns, vec![op]).await {
                tracing::warn!(error = %e, "cannot write the audit log");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repeats_of_one_subject_are_written_once_a_minute_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(asp_store::StoreConfig::new(dir.path())).unwrap();
        let audit = Audit::new(store.clone(), store.node_id());
        for _ in 0..5 {
            audit.record("peer_refused", Some("10.0.0.9 tls"), serde_json::json!({}));
        }
        audit.record("peer_refused", Some("10.0.0.8 tls"), serde_json::json!({}));
        audit.record("token_revoked", None, serde_json::json!({"id": "x"}));
        audit.record("token_revoked", None, serde_json::json!({"id": "y"}));
        let ns = Namespace::new(AUDIT_NAMESPACE).unwrap();
        let mut items = Vec::new();
        for _ in 0..200 {
            items = store.scan(&ns, "", None, 100, true).unwrap().items;
            if items.len() >= 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(items.len(), 4, "{items:?}");
        // A minute later, the next one says how many were left out.
        {
            let mut recent = audit.recent.lock().unwrap();
            for (at, _) in recent.values_mut() {
                *at = at.checked_sub(REPEAT_WINDOW).expect("up for a minute");
            }
        }
        audit.record("peer_refused", Some("10.0.0.9 tls"), serde_json::json!({}));
        for _ in 0..200 {
            items = store.scan(&ns, "", None, 100, true).unwrap().items;
            if items.len() >= 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let last = items
            .iter()
            .filter_map(|i| i.value.as_ref())
            .map(|v| serde_json::from_slice::<serde_json::Value>(v).unwrap())
            .find(|v| v["repeated_before"] == 4);
        assert!(last.is_some(), "{items:?}");
        store.shutdown().await;
    }
}
