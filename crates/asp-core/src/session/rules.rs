//! What a link may carry and how a peer is compared: residency's withhold predicate,
//! a federated link's rules, namespace lists, and the constant-time comparison.

use crate::session::ALL_NAMESPACES;
use crate::{Event, Namespace};

/// A predicate over namespaces: `true` means nothing of the namespace goes to the peer.
#[derive(Clone)]
pub struct Withhold(pub std::sync::Arc<dyn Fn(&Namespace) -> bool + Send + Sync>);

impl Withhold {
    pub fn withholds(&self, namespace: &Namespace) -> bool {
        (self.0)(namespace)
    }
}

impl std::fmt::Debug for Withhold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Withhold(..)")
    }
}

/// Whether `a` and `b` are equal, in a time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    // Keep the optimizer from turning the loop into an early exit.
    std::hint::black_box(diff) == 0
}

/// The namespaces of `own` (a node's list: names, or `*`) that `allowed` (a peer's
/// rights: names, or `*`) also covers, as a list of the same kind.
pub fn intersect(own: &[String], allowed: &[String]) -> Vec<String> {
    let all = |l: &[String]| l.iter().any(|n| n == ALL_NAMESPACES);
    match (all(own), all(allowed)) {
        (true, true) => vec![ALL_NAMESPACES.to_owned()],
        (true, false) => allowed.to_vec(),
        (false, true) => own.to_vec(),
        (false, false) => own
            .iter()
            .filter(|n| allowed.contains(n))
            .cloned()
            .collect(),
    }
}

/// Whether a node whose Hello listed `names` replicates `namespace`.
pub fn lists(names: &[String], namespace: &Namespace) -> bool {
    names
        .iter()
        .any(|n| n == ALL_NAMESPACES || n == namespace.as_str())
}

/// A link between two clusters: the peer presents its own cluster's id, and every
/// event either way passes the share's rules (namespace, key prefix, direction,
/// origin).
#[derive(Clone)]
pub struct Federation {
    /// The cluster id the peer must present (the other cluster's).
    pub peer_cluster_id: String,
    /// Whether an event may go to the peer.
    pub may_send: std::sync::Arc<dyn Fn(&Event) -> bool + Send + Sync>,
    /// Why an event from the peer is refused, if it is.
    pub refuses: Refuses,
}

/// What the message of a link closed over an event a share does not allow says (the
/// runtime records such closes in its audit log).
pub const SHARE_REFUSAL: &str = "refused by the share";

/// Why an event from a federated peer is refused (`None`: taken).
pub type Refuses = std::sync::Arc<dyn Fn(&Event) -> Option<String> + Send + Sync>;

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("peer_cluster_id", &self.peer_cluster_id)
            .finish_non_exhaustive()
    }
}
