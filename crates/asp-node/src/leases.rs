//! Leases with fencing tokens, decided by a leader namespace's leader (docs/MODES.md,
//! *Leases*).
//!
//! A lease is a record in `_asp.leases.<hash>` (the namespace's own, so residency keeps
//! it where the namespace goes), keyed by its name: holder, token, expiry by the
//! leader's clock, lock delay, and whether it was released. Only the leader of the
//! current epoch writes them, one at a time; every node keeps the newest record of each
//! lease in memory (the leader as it writes, the others from the feed), which is what
//! the writer asks when a write carries `If-Fence`.
//!
//! Tokens grow on every acquisition: within an epoch by one, and a new epoch's leader
//! starts at `epoch << 32 | 1`, above anything an earlier leader may have issued (even
//! in a divergent tail the new one never saw).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use asp_core::{Namespace, NodeId};
use asp_store::{LeaderMode, Store};
use serde::{Deserialize, Serialize};

/// Followed by a namespace's hash: its leases.
pub const LEASES_PREFIX: &str = "_asp.leases.";
/// Bounds of a lease's time to live and lock delay.
pub const TTL_MS_MAX: u64 = 24 * 3600 * 1000;
pub const LEASE_NAME_BYTES_MAX: usize = 256;

/// Followed by a namespace's hash: the keys bound to its leases.
pub const BOUND_PREFIX: &str = "_asp.bound.";

fn leases_namespace(hash: &str) -> Namespace {
    Namespace::new(&format!("{LEASES_PREFIX}{hash}")).expect("a valid name")
}

fn bound_namespace(hash: &str) -> Namespace {
    Namespace::new(&format!("{BOUND_PREFIX}{hash}")).expect("a valid name")
}

/// A key bound to a lease: the put to delete when the lease ends (its token no longer
/// holds: released, expired, or acquired again).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Binding {
    lease: String,
    token: u64,
    namespace: String,
    key: String,
    /// The put's dot, `counter@origin`, and clock reading (raw).
    dot: String,
    hlc: u64,
}

/// A binding's record key: one per (lease, key), of fixed length.
fn binding_key(lease: &str, key: &str) -> String {
    // Sixteen hex digits of SHA-256, as namespace hashes.
    let h = |s: &str| crate::modes::hash_of(s)[..16].to_owned();
    format!("{}/{}", h(lease), h(key))
}

/// One lease, as its record holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    pub token: u64,
    /// By the leader's wall clock, ms since the Unix epoch.
    pub expires_ms: u64,
    pub ttl_ms: u64,
    pub lock_delay_ms: u64,
    pub released: bool,
    /// Counts every write of this lease's record (acquire, keepalive, release): of two
    /// records, the greater `(token, version)` is newer.
    pub version: u64,
}

impl Lease {
    fn newer_than(&self, other: &Lease) -> bool {
        (self.token, self.version) > (other.token, other.version)
    }

    /// Whether it binds now: held, not released, not expired.
    pub fn held_at(&self, now_ms: u64) -> bool {
        !self.released && now_ms < self.expires_ms
    }
}

/// Why a lease operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("{0}")]
    Invalid(String),
    /// Multi-master: 409 `mode_conflict`.
    #[error(
        "namespace {0} is multi-master: leases are decided by a leader; put it in leader mode first (PUT /v1/ns/{0}/mode)"
    )]
    MultiMaster(String),
    /// This node does not lead the namespace: 409 `not_leader` / `fenced`.
    #[error("{message}")]
    NotLeader { mode: LeaderMode, message: String },
    /// A later epoch issued tokens this node has seen before it heard of that epoch:
    /// 409 `fenced`.
    #[error("{0}")]
    Superseded(String),
    /// Someone holds it (or its lock delay runs): 409 `lease_held`.
    #[error("{message}")]
    Held { lease: Lease, message: String },
    /// A keepalive or release with a token that no longer holds: 409 `lease_lost`.
    #[error("{0}")]
    Lost(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Store(String),
}

/// The leases every namespace of this node has.
pub struct Leases {
    node: NodeId,
    modes: Arc<crate::modes::Modes>,
    /// By (namespace hash, name).
    table: RwLock<HashMap<(String, String), Lease>>,
    /// One decision at a time on the leader.
    deciding: tokio::sync::Mutex<()>,
}

impl Leases {
    pub fn new(node: NodeId, modes: Arc<crate::modes::Modes>) -> Self {
        Leases {
            node,
            modes,
            table: RwLock::default(),
            deciding: tokio::sync::Mutex::new(()),
        }
    }

    /// The newest token of lease `name` of `namespace` this node knows (the write gate
    /// asks on every fenced write).
    pub fn newest_token(&self, namespace: &Namespace, name: &str) -> Option<u64> {
        let hash = self.modes.hash(namespace);
        self.table
            .read()
            .unwrap()
            .get(&(hash, name.to_owned()))
            .map(|l| l.token)
    }

    /// The lease as this node knows it.
    pub fn get(&self, namespace: &Namespace, name: &str) -> Option<Lease> {
        let hash = self.modes.hash(namespace);
        self.table
            .read()
            .unwrap()
            .get(&(hash, name.to_owned()))
            .cloned()
    }

    /// The leases of `namespace` this node knows, by name: at most `limit`, and
    /// whether there were more.
    pub fn list(&self, namespace: &Namespace, limit: usize) -> (Vec<Lease>, bool) {
        let hash = self.modes.hash(namespace);
        let table = self.table.read().unwrap();
        let mut leases: Vec<Lease> = table
            .iter()
            .filter(|((h, _), _)| *h == hash)
            .map(|(_, l)| l.clone())
            .collect();
        leases.sort_by(|a, b| a.name.cmp(&b.name));
        let more = leases.len() > limit;
        leases.truncate(limit);
        (leases, more)
    }

    /// Takes in a lease record (from the feed or a scan), if newer than what is known.
    pub fn note(&self, leases_namespace: &str, value: &[u8]) {
        if let (Some(hash), Ok(lease)) = (
            leases_namespace.strip_prefix(LEASES_PREFIX),
            serde_json::from_slice::<Lease>(value),
        ) {
            self.remember(hash, lease);
        }
    }

    fn remember(&self, hash: &str, lease: Lease) {
        let mut table = self.table.write().unwrap();
        let key = (hash.to_owned(), lease.name.clone());
        if table.get(&key).is_none_or(|old| lease.newer_than(old)) {
            table.insert(key, lease);
        }
    }

    /// Reads every lease record of the store.
    pub fn reload(&self, store: &Store) -> Result<(), String> {
        for (ns, _) in store.status().namespaces {
            if ns.as_str().starts_with(LEASES_PREFIX) {
                crate::follow::scan_values(store, &ns, "", |_, value| {
                    self.note(ns.as_str(), value);
                })?;
            }
        }
        Ok(())
    }

    /// The epoch this node leads `namespace` in, or why it may not decide leases.
    fn leading(&self, namespace: &Namespace) -> Result<u64, LeaseError> {
        match self.modes.mode(namespace) {
            None => Err(LeaseError::MultiMaster(namespace.to_string())),
            Some(m) if m.leader == self.node && !m.fenced => Ok(m.epoch),
            Some(mode) => {
                let at = mode
                    .leader_api
                    .as_deref()
                    .map(|a| format!(" at {a}"))
                    .unwrap_or_default();
                let message = format!(
                    "leases of {namespace} are decided by its leader, node {}{at} (epoch {})",
                    mode.leader, mode.epoch
                );
                Err(LeaseError::NotLeader { mode, message })
            }
        }
    }

    async fn save(
        &self,
        store: &Store,
        namespace: &Namespace,
        lease: Lease,
    ) -> Result<Lease, LeaseError> {
        let hash = self.modes.hash(namespace);
        let record = serde_json::to_value(&lease).expect("a lease serializes");
        crate::follow::put_json(store, leases_namespace(&hash), &lease.name, &record)
            .await
            .map_err(LeaseError::Store)?;
        self.remember(&hash, lease.clone());
        Ok(lease)
    }

    /// The lease `name` as this node knows it, if `token` is its token (for a
    /// keepalive or a release).
    fn with_token(
        &self,
        namespace: &Namespace,
        name: &str,
        token: u64,
    ) -> Result<Lease, LeaseError> {
        let lease = self
            .get(namespace, name)
            .ok_or_else(|| LeaseError::NotFound(format!("no lease {name} in {namespace}")))?;
        if lease.token != token {
            return Err(LeaseError::Lost(format!(
                "token {token} does not hold lease {name}: its token is {}",
                lease.token
            )));
        }
        Ok(lease)
    }

    /// Acquires lease `name` for `holder`, if nobody holds it: a new, greater token.
    pub async fn acquire(
        &self,
        store: &Store,
        namespace: &Namespace,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        lock_delay_ms: u64,
    ) -> Result<Lease, LeaseError> {
        check_name(name)?;
        let epoch = self.leading(namespace)?;
        let _one = self.deciding.lock().await;
        // Leadership may have moved while waiting.
        let epoch = epoch.max(self.leading(namespace)?);
        let now = asp_store::clock::wall_ms();
        let current = self.get(namespace, name);
        if let Some(c) = &current {
            if c.held_at(now) {
                return Err(LeaseError::Held {
                    message: format!(
                        "lease {name} is held by {:?} (token {}) for {} ms more",
                        c.holder,
                        c.token,
                        c.expires_ms - now
                    ),
                    lease: c.clone(),
                });
            }
            let delay_ends = c.expires_ms.saturating_add(c.lock_delay_ms);
            if !c.released && now < delay_ends {
                return Err(LeaseError::Held {
                    message: format!(
                        "lease {name} expired {} ms ago; its lock delay keeps it for {} ms more",
                        now - c.expires_ms,
                        delay_ends - now
                    ),
                    lease: c.clone(),
                });
            }
        }
        // A token of a later epoch means a later leader exists, though this node has
        // not heard of its epoch yet: issuing past it would collide with its tokens.
        if let Some(c) = &current
            && c.token >> 32 > epoch
        {
            return Err(LeaseError::Superseded(format!(
                "lease {name} has a token of epoch {}, after this node's epoch {epoch}: a newer leader exists",
                c.token >> 32
            )));
        }
        let floor = (epoch << 32) | 1;
        let token = current.as_ref().map_or(floor, |c| (c.token + 1).max(floor));
        let lease = Lease {
            name: name.to_owned(),
            holder: holder.to_owned(),
            token,
            expires_ms: now + ttl_ms,
            ttl_ms,
            lock_delay_ms,
            released: false,
            version: current.as_ref().map_or(1, |c| c.version + 1),
        };
        self.save(store, namespace, lease).await
    }

    /// Extends a held lease by its time to live.
    pub async fn keepalive(
        &self,
        store: &Store,
        namespace: &Namespace,
        name: &str,
        token: u64,
    ) -> Result<Lease, LeaseError> {
        self.leading(namespace)?;
        let _one = self.deciding.lock().await;
        let now = asp_store::clock::wall_ms();
        let c = self.with_token(namespace, name, token)?;
        if !c.held_at(now) {
            return Err(LeaseError::Lost(format!(
                "token {token} no longer holds lease {name}: {}",
                if c.released {
                    "it was released".to_owned()
                } else {
                    format!("it expired {} ms ago", now - c.expires_ms)
                }
            )));
        }
        let lease = Lease {
            expires_ms: now + c.ttl_ms,
            version: c.version + 1,
            ..c
        };
        self.save(store, namespace, lease).await
    }

    /// Gives a lease up (no lock delay follows a release).
    pub async fn release(
        &self,
        store: &Store,
        namespace: &Namespace,
        name: &str,
        token: u64,
    ) -> Result<Lease, LeaseError> {
        self.leading(namespace)?;
        let _one = self.deciding.lock().await;
        let c = self.with_token(namespace, name, token)?;
        if c.released {
            return Err(LeaseError::Lost(format!(
                "token {token} does not hold lease {name}: it was released"
            )));
        }
        let lease = Lease {
            released: true,
            version: c.version + 1,
            ..c
        };
        self.save(store, namespace, lease).await
    }
}

impl Leases {
    /// The token of lease `name` of `namespace`, if this node leads the namespace and
    /// the lease is held now: what a put bound to the lease (`?lease=`) needs.
    pub fn held_token(&self, namespace: &Namespace, name: &str) -> Result<u64, LeaseError> {
        check_name(name)?;
        self.leading(namespace)?;
        let lease = self.get(namespace, name).ok_or_else(|| {
            LeaseError::Lost(format!("no lease {name} in {namespace}: acquire it first"))
        })?;
        if !lease.held_at(asp_store::clock::wall_ms()) {
            return Err(LeaseError::Lost(format!(
                "lease {name} is not held (token {} {}): acquire it again first",
                lease.token,
                if lease.released {
                    "was released"
                } else {
                    "expired"
                }
            )));
        }
        Ok(lease.token)
    }

    /// Records that the put `version` of `key` goes with lease `name`'s token `token`:
    /// when that token no longer holds, the leader deletes it.
    pub async fn bind(
        &self,
        store: &Store,
        namespace: &Namespace,
        name: &str,
        token: u64,
        key: &asp_core::Key,
        version: asp_core::Version,
    ) -> Result<(), LeaseError> {
        let binding = Binding {
            lease: name.to_owned(),
            token,
            namespace: namespace.to_string(),
            key: key.to_string(),
            dot: version.dot.to_string(),
            hlc: version.hlc.as_raw(),
        };
        let record = serde_json::to_value(&binding).expect("a binding serializes");
        crate::follow::put_json(
            store,
            bound_namespace(&self.modes.hash(namespace)),
            &binding_key(name, key.as_str()),
            &record,
        )
        .await
        .map_err(LeaseError::Store)
    }

    /// On the leader of each namespace: deletes the keys bound to leases that ended,
    /// and their bindings.
    pub async fn sweep_bound(&self, store: &Store) -> Result<(), String> {
        let s = store.clone();
        let bindings = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for ns in s.namespaces_with_prefix(BOUND_PREFIX) {
                crate::follow::scan_values(&s, &ns, "", |k, v| {
                    if let Ok(b) = serde_json::from_slice::<Binding>(v) {
                        out.push((ns.clone(), k.to_owned(), b));
                    }
                })?;
            }
            Ok::<_, String>(out)
        })
        .await
        .map_err(|e| e.to_string())??;
        let now = asp_store::clock::wall_ms();
        for (bound_ns, record_key, b) in bindings {
            let (Ok(namespace), Ok(key), Ok(dot)) = (
                Namespace::new(&b.namespace),
                asp_core::Key::new(&b.key),
                b.dot.parse::<asp_core::Dot>(),
            ) else {
                continue;
            };
            if self.leading(&namespace).is_err() {
                continue;
            }
            let ended = self
                .get(&namespace, &b.lease)
                .is_none_or(|l| l.token != b.token || !l.held_at(now));
            if !ended {
                continue;
            }
            let version = asp_core::Version {
                hlc: asp_core::Hlc::from_raw(b.hlc),
                dot,
            };
            crate::expiry::expire(store, namespace, key, version)
                .await
                .map_err(|e| e.to_string())?;
            let record_key = asp_core::Key::new(&record_key).map_err(|e| e.to_string())?;
            store
                .write(bound_ns, vec![asp_store::WriteOp::delete(record_key)])
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), LeaseError> {
    if name.is_empty() || name.len() > LEASE_NAME_BYTES_MAX || name.chars().any(char::is_control) {
        return Err(LeaseError::Invalid(format!(
            "a lease name is 1 to {LEASE_NAME_BYTES_MAX} bytes without control characters"
        )));
    }
    Ok(())
}

/// What the store's writer asks: modes for leadership, leases for fences.
pub(crate) struct Gate {
    pub modes: Arc<crate::modes::Modes>,
    pub leases: Arc<Leases>,
}

impl asp_store::WriteGate for Gate {
    fn mode(&self, namespace: &Namespace) -> Option<asp_store::LeaderMode> {
        self.modes.mode(namespace)
    }

    fn newest_token(&self, namespace: &Namespace, name: &str) -> Option<u64> {
        self.leases.newest_token(namespace, name)
    }
}
