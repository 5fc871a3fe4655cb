//! Federation: links to another cluster through a *share* (see `asp_tls::share`), and
//! who is a member of this cluster.
//!
//! Installed shares live in the replicated namespace `_asp.shares` (`share/<id>`: the
//! signed document; `revoked/<id>`: who revoked it and when), so that every node of the
//! cluster trusts the other cluster's CA for peer links while an accepted, unexpired,
//! unrevoked share names it, and stops at once when it no longer does. A link whose
//! peer certificate comes from a partner CA is *federated*: it expects the partner's
//! cluster id, carries only the namespaces (and key prefixes) of the shares with that
//! partner, each in the directions their operations grant, and refuses events whose
//! origin is a member of this cluster (another cluster cannot write under our names).
//!
//! Membership: every node writes `node/<id>` into `_asp.members` when it starts; that
//! namespace replicates inside the cluster and never across a share.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use asp_core::session::Federation as SessionFederation;
use asp_core::{ContentType, Event, Key, Namespace, NodeId};
use asp_store::{Store, WriteOp};
use asp_tls::share::{Share, SharedNamespace, Side};
use tokio::sync::watch;

/// Installed shares and their revocations.
pub const SHARES_NAMESPACE: &str = "_asp.shares";
/// What a node writes about itself into the member list.
#[derive(Clone, Debug)]
pub struct MemberRecord {
    /// The name its certificate attests (its node id on a plain node).
    pub name: String,
    /// Its API address as clients reach it.
    pub api: Option<String>,
    /// Where it listens for peers.
    pub peer: Option<String>,
    /// Its labels (placement picks holders by them).
    pub labels: crate::residency::Labels,
}

/// The members of this cluster, one key per node.
pub const MEMBERS_NAMESPACE: &str = "_asp.members";
/// Shares installed on a cluster, at most.
pub const SHARES_MAX: usize = 1024;

pub(crate) fn ns(name: &str) -> Namespace {
    Namespace::new(name).expect("a valid name")
}

/// Why a share cannot be installed or revoked.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// A bad document, or one that is not for this cluster (400/409 in the API).
    #[error("{0}")]
    Invalid(String),
    #[error("share {0} is not installed on this cluster")]
    NotFound(String),
    #[error("{0}")]
    Store(String),
}

/// A share as installed here.
#[derive(Clone, Debug)]
pub struct Installed {
    pub share: Share,
    pub side: Side,
    /// The partner CA's subject name, DER (matched against a peer's issuer).
    partner_subject: Vec<u8>,
    /// `(at_ms, node)` if revoked.
    pub revoked: Option<(u64, String)>,
}

impl Installed {
    pub fn id(&self) -> &str {
        &self.share.terms.id
    }

    /// Whether it carries anything now (not revoked, not expired).
    pub fn is_active(&self, now_ms: u64) -> bool {
        self.state(now_ms) == "active"
    }

    /// `active`, `revoked` or `expired`.
    pub fn state(&self, now_ms: u64) -> &'static str {
        if self.revoked.is_some() {
            "revoked"
        } else if self.share.terms.expires_ms <= now_ms {
            "expired"
        } else {
            "active"
        }
    }
}

/// What a federated link may carry, from the shares with its peer's cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rights {
    pub shares: Vec<String>,
    pub partner_cluster: String,
    /// Namespace → key prefixes this node sends to the peer ("" = every key).
    pub send: BTreeMap<String, Vec<String>>,
    /// Namespace → key prefixes this node takes from the peer.
    pub receive: BTreeMap<String, Vec<String>>,
    /// Namespace → the first share naming it (what bytes sent are counted under).
    pub share_by_namespace: BTreeMap<String, String>,
    /// The peer's labels that count for this cluster's residency rules: only those a
    /// share this cluster offered requires (its own signed terms), never what the
    /// other CA attests on its own.
    pub attested: crate::residency::Labels,
}

fn under(prefixes: Option<&Vec<String>>, key: &str) -> bool {
    prefixes.is_some_and(|p| p.iter().any(|p| key.starts_with(p.as_str())))
}

impl Rights {
    /// Every namespace the link carries, either way.
    pub fn namespaces(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .send
            .keys()
            .chain(self.receive.keys())
            .cloned()
            .collect();
        all.sort();
        all.dedup();
        all
    }

    pub fn may_send(&self, event: &Event) -> bool {
        under(self.send.get(event.namespace.as_str()), event.key.as_str())
    }

    /// The share the namespace goes by (for counting what was sent), if any.
    pub fn share_of(&self, namespace: &Namespace) -> Option<&str> {
        self.share_by_namespace
            .get(namespace.as_str())
            .map(String::as_str)
    }
}

#[derive(Default)]
struct State {
    installed: Vec<Installed>,
    members: HashSet<NodeId>,
}

/// The shares and members this node knows, refreshed from the store.
pub struct Federation {
    node: NodeId,
    tls: Option<Arc<asp_tls::Tls>>,
    state: RwLock<State>,
    /// Moves whenever the set of active shares changes: federated links check their
    /// rights again.
    generation: watch::Sender<u64>,
    /// Bytes of events sent under each share, by namespace, since this node started.
    sent: Mutex<HashMap<String, BTreeMap<String, u64>>>,
}

impl Federation {
    pub fn new(node: NodeId, tls: Option<Arc<asp_tls::Tls>>) -> Federation {
        Federation {
            node,
            tls,
            state: RwLock::new(State::default()),
            generation: watch::channel(0).0,
            sent: Mutex::new(HashMap::new()),
        }
    }

    /// A receiver that changes whenever shares change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Every share installed here, revoked and expired ones too.
    pub fn list(&self) -> Vec<Installed> {
        self.state.read().unwrap().installed.clone()
    }

    /// Whether `origin` is a member of this cluster.
    pub fn is_member(&self, origin: NodeId) -> bool {
        origin == self.node || self.state.read().unwrap().members.contains(&origin)
    }

    /// Bytes sent under `share`, per namespace.
    pub fn sent(&self, share: &str) -> BTreeMap<String, u64> {
        self.sent
            .lock()
            .unwrap()
            .get(share)
            .cloned()
            .unwrap_or_default()
    }

    pub(crate) fn count_sent(&self, share: &str, namespace: &Namespace, bytes: u64) {
        let mut sent = self.sent.lock().unwrap();
        if !sent.contains_key(share) && sent.len() >= SHARES_MAX {
            return;
        }
        *sent
            .entry(share.to_owned())
            .or_default()
            .entry(namespace.as_str().to_owned())
            .or_default() += bytes;
    }

    /// The rights of a peer whose certificate is `peer` (not from this cluster's CA):
    /// `None` if no active share names its CA.
    pub fn rights_for(&self, peer: &asp_tls::Identity, now_ms: u64) -> Option<Rights> {
        let state = self.state.read().unwrap();
        let mut rights = Rights::default();
        for i in &state.installed {
            if !i.is_active(now_ms) || i.partner_subject != peer.issuer {
                continue;
            }
            if !rights.partner_cluster.is_empty()
                && rights.partner_cluster != i.side.partner_cluster
            {
                continue; // Two shares with one CA under two cluster ids: the first wins.
            }
            rights.partner_cluster = i.side.partner_cluster.clone();
            rights.shares.push(i.id().to_owned());
            let terms = &i.share.terms;
            // Residency of the share: the accepting cluster's nodes get the namespaces
            // only if their certificates attest the labels it requires.
            let labels_ok =
                !i.side.offering || crate::residency::matches(&terms.require, &peer.labels);
            if i.side.offering && labels_ok {
                rights
                    .attested
                    .extend(terms.require.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            for SharedNamespace { ns, prefix } in &terms.namespaces {
                rights
                    .share_by_namespace
                    .entry(ns.clone())
                    .or_insert_with(|| i.id().to_owned());
                if i.side.sends(&i.share) && labels_ok {
                    rights
                        .send
                        .entry(ns.clone())
                        .or_default()
                        .push(prefix.clone());
                }
                if i.side.receives(&i.share) {
                    rights
                        .receive
                        .entry(ns.clone())
                        .or_default()
                        .push(prefix.clone());
                }
            }
        }
        (!rights.shares.is_empty()).then_some(rights)
    }

    /// The session's rules for a link with these rights.
    pub fn session_rules(self: &Arc<Self>, rights: &Rights) -> SessionFederation {
        let send = rights.clone();
        let receive = rights.clone();
        let me = self.clone();
        SessionFederation {
            peer_cluster_id: rights.partner_cluster.clone(),
            may_send: Arc::new(move |e: &Event| send.may_send(e)),
            refuses: Arc::new(move |e: &Event| {
                let prefixes = receive.receive.get(e.namespace.as_str());
                if prefixes.is_none() {
                    return Some(format!(
                        "namespace {} is not shared for writing into this cluster",
                        e.namespace
                    ));
                }
                if !under(prefixes, e.key.as_str()) {
                    return Some(format!(
                        "key {:?} of namespace {} is outside the shared prefixes",
                        e.key.as_str(),
                        e.namespace
                    ));
                }
                if me.is_member(e.dot.origin) {
                    return Some(format!(
                        "origin {} is a node of this cluster: another cluster cannot send changes under its name",
                        e.dot.origin
                    ));
                }
                None
            }),
        }
    }

    /// Writes this node into the member list (it replicates in the cluster), again
    /// only when its record changed (a new API address, say).
    pub async fn register(&self, store: &Store, member: &MemberRecord) -> Result<(), String> {
        let key = format!("node/{}", self.node);
        let members = ns(MEMBERS_NAMESPACE);
        let held = store.get(&members, &key).map_err(|e| e.to_string())?;
        let since = held
            .as_ref()
            .and_then(|s| s.value.as_ref())
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v.bytes).ok());
        if let Some(old) = &since
            && old["name"].as_str() == Some(member.name.as_str())
            && old["api"].as_str() == member.api.as_deref()
            && old["peer"].as_str() == member.peer.as_deref()
            && serde_json::from_value::<crate::residency::Labels>(old["labels"].clone())
                .unwrap_or_default()
                == member.labels
        {
            return Ok(());
        }
        let since_ms = since
            .as_ref()
            .and_then(|o| o["since_ms"].as_u64())
            .unwrap_or_else(asp_store::clock::wall_ms);
        let record = serde_json::json!({
            "name": member.name,
            "api": member.api,
            "peer": member.peer,
            "labels": member.labels,
            "since_ms": since_ms,
        });
        let op = WriteOp::put(
            Key::new(&key).map_err(|e| e.to_string())?,
            ContentType::Json,
            serde_json::to_vec(&record).expect("json"),
        );
        store
            .write(members, vec![op])
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    fn own_ca(&self) -> Option<Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>> {
        self.tls.as_ref().map(|t| t.current().own_ca.clone())
    }

    /// Checks a share document for this cluster: both signatures, one CA is this
    /// cluster's, the cluster id on this side is `cluster_id`, not expired.
    pub fn check(
        &self,
        bytes: &[u8],
        cluster_id: &str,
        now_ms: u64,
    ) -> Result<Installed, ShareError> {
        let share = Share::parse(bytes).map_err(|e| ShareError::Invalid(e.to_string()))?;
        let own = self.own_ca().ok_or_else(|| {
            ShareError::Invalid(
                "shares need TLS on peer links: start the node with --tls-cert, --tls-key and --tls-ca".into(),
            )
        })?;
        if share.acceptance.is_none() {
            return Err(ShareError::Invalid(
                "this share is not accepted yet: the other cluster countersigns it with `asp share accept --ca-dir`".into(),
            ));
        }
        let side = share.seen_from(&own).ok_or_else(|| {
            ShareError::Invalid("neither CA of this share is this node's cluster CA".into())
        })?;
        if side.own_cluster != cluster_id {
            return Err(ShareError::Invalid(format!(
                "this share is for cluster {:?} on this side; this node is in cluster {cluster_id:?}",
                side.own_cluster
            )));
        }
        if side.partner_cluster == cluster_id {
            return Err(ShareError::Invalid(
                "both sides of this share have this cluster's id".into(),
            ));
        }
        if share.terms.expires_ms <= now_ms {
            return Err(ShareError::Invalid("this share has expired".into()));
        }
        let partner_subject = asp_tls::share::subject_of(&side.partner_ca)
            .map_err(|e| ShareError::Invalid(e.to_string()))?;
        Ok(Installed {
            share,
            side,
            partner_subject,
            revoked: None,
        })
    }

    /// Installs a checked share for the whole cluster.
    pub async fn install(&self, store: &Store, installed: &Installed) -> Result<bool, ShareError> {
        let id = installed.id().to_owned();
        {
            let state = self.state.read().unwrap();
            if let Some(old) = state.installed.iter().find(|i| i.id() == id) {
                if old.revoked.is_some() {
                    return Err(ShareError::Invalid(format!(
                        "share {id} was revoked on this cluster; make a new one"
                    )));
                }
                return Ok(false);
            }
            if state.installed.len() >= SHARES_MAX {
                return Err(ShareError::Invalid(format!(
                    "{SHARES_MAX} shares are installed; revoke old ones"
                )));
            }
        }
        let op = WriteOp::put(
            Key::new(&format!("share/{id}")).map_err(|e| ShareError::Store(e.to_string()))?,
            ContentType::Json,
            serde_json::to_vec(&installed.share.document).expect("json"),
        );
        store
            .write(ns(SHARES_NAMESPACE), vec![op])
            .await
            .map_err(|e| ShareError::Store(e.to_string()))?;
        self.reload(store).map_err(ShareError::Store)?;
        Ok(true)
    }

    /// Revokes a share for the whole cluster: federated links under it close.
    pub async fn revoke(&self, store: &Store, id: &str) -> Result<Installed, ShareError> {
        let found = self
            .list()
            .into_iter()
            .find(|i| i.id() == id)
            .ok_or_else(|| ShareError::NotFound(id.to_owned()))?;
        if found.revoked.is_none() {
            let record = serde_json::json!({
                "at_ms": asp_store::clock::wall_ms(),
                "node": self.node.to_string(),
            });
            let op = WriteOp::put(
                Key::new(&format!("revoked/{id}")).map_err(|e| ShareError::Store(e.to_string()))?,
                ContentType::Json,
                serde_json::to_vec(&record).expect("json"),
            );
            store
                .write(ns(SHARES_NAMESPACE), vec![op])
                .await
                .map_err(|e| ShareError::Store(e.to_string()))?;
            self.reload(store).map_err(ShareError::Store)?;
        }
        self.list()
            .into_iter()
            .find(|i| i.id() == id)
            .ok_or_else(|| ShareError::NotFound(id.to_owned()))
    }

    /// Reads shares and members from the store again; trusts the CAs of active shares
    /// and tells links when that set changed.
    pub fn reload(&self, store: &Store) -> Result<(), String> {
        let now = asp_store::clock::wall_ms();
        let mut revoked: HashMap<String, (u64, String)> = HashMap::new();
        let mut documents: Vec<Vec<u8>> = Vec::new();
        crate::follow::scan_values(store, &ns(SHARES_NAMESPACE), "", |key, value| {
            if let Some(id) = key.strip_prefix("revoked/") {
                let v: serde_json::Value = serde_json::from_slice(value).unwrap_or_default();
                revoked.insert(
                    id.to_owned(),
                    (
                        v["at_ms"].as_u64().unwrap_or(0),
                        v["node"].as_str().unwrap_or("").to_owned(),
                    ),
                );
            } else if key.starts_with("share/") {
                documents.push(value.to_vec());
            }
        })?;
        let mut members = HashSet::new();
        crate::follow::scan_values(store, &ns(MEMBERS_NAMESPACE), "node/", |key, _| {
            if let Some(id) = key.strip_prefix("node/").and_then(|n| n.parse().ok()) {
                members.insert(id);
            }
        })?;
        let mut installed = Vec::new();
        if let Some(own) = self.own_ca() {
            for doc in documents {
                let share = match Share::parse(&doc) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "an installed share does not verify; ignored");
                        continue;
                    }
                };
                let Some(side) = share.seen_from(&own) else {
                    continue;
                };
                let Ok(partner_subject) = asp_tls::share::subject_of(&side.partner_ca) else {
                    continue;
                };
                let revoked = revoked.get(&share.terms.id).cloned();
                installed.push(Installed {
                    share,
                    side,
                    partner_subject,
                    revoked,
                });
            }
        }
        installed.sort_by(|a, b| a.id().cmp(b.id()));
        let active = |list: &[Installed]| -> Vec<String> {
            list.iter()
                .filter(|i| i.is_active(now))
                .map(|i| i.id().to_owned())
                .collect()
        };
        let partners: Vec<Vec<u8>> = installed
            .iter()
            .filter(|i| i.is_active(now))
            .map(|i| i.side.partner_ca.clone())
            .collect();
        let changed = {
            let mut state = self.state.write().unwrap();
            let changed = active(&state.installed) != active(&installed);
            state.installed = installed;
            state.members = members;
            changed
        };
        if let Some(tls) = &self.tls {
            tls.set_partners(partners).map_err(|e| e.to_string())?;
        }
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use asp_tls::issue::{init_ca, issue_node};
    use asp_tls::share;
    use std::path::Path;

    fn org(dir: &Path, node: &str, labels: &[(&str, &str)]) -> Arc<asp_tls::Tls> {
        init_ca(dir, "t", 30, false).unwrap();
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        issue_node(dir, node, &labels, &[], 30, false).unwrap();
        asp_tls::Tls::load(asp_tls::TlsPaths {
            cert: dir.join(format!("{node}.pem")),
            key: dir.join(format!("{node}.key")),
            ca: dir.join("ca.pem"),
        })
        .unwrap()
    }

    fn accepted(
        a: &Path,
        b: &Path,
        ns: &[&str],
        ops: &[&str],
        require: &[(&str, &str)],
    ) -> Vec<u8> {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        let terms = share::Terms {
            id: share::new_id(),
            cluster: "org-a".into(),
            ca: read(&a.join("ca.pem")),
            peer_ca: read(&b.join("ca.pem")),
            namespaces: ns.iter().map(|n| share::parse_shared(n).unwrap()).collect(),
            ops: ops.iter().map(|o| (*o).into()).collect(),
            require: require
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            created_ms: 1,
            expires_ms: u64::MAX,
        };
        let offer = share::offer(&terms, &read(&a.join("ca.key"))).unwrap();
        let doc = share::accept(&offer, "org-b", &read(&b.join("ca.key")), 2).unwrap();
        serde_json::to_vec(&doc).unwrap()
    }

    fn install(f: &Federation, doc: &[u8], cluster: &str) -> Result<(), ShareError> {
        let i = f.check(doc, cluster, 10)?;
        f.state.write().unwrap().installed.push(i);
        Ok(())
    }

    #[test]
    fn rights_follow_the_shares_side_direction_prefix_and_labels() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ta = org(a.path(), "a1", &[]);
        let tb = org(b.path(), "b1", &[("region", "eu")]);
        issue_node(b.path(), "b2", &[], &[], 30, false).unwrap();
        let node = |n| NodeId::new(n).unwrap();
        let fa = Federation::new(node(1), Some(ta.clone()));
        let fb = Federation::new(node(2), Some(tb.clone()));
        let both = accepted(a.path(), b.path(), &["orders"], &["read", "write"], &[]);
        let read_eu = accepted(
            a.path(),
            b.path(),
            &["catalog:pub/"],
            &["read"],
            &[("region", "eu")],
        );
        // Each side installs under its own cluster id only.
        assert!(matches!(
            install(&fa, &both, "org-b"),
            Err(ShareError::Invalid(_))
        ));
        for doc in [&both, &read_eu] {
            install(&fa, doc, "org-a").unwrap();
            install(&fb, doc, "org-b").unwrap();
        }
        let cert = |dir: &Path, name: &str| {
            let pem = std::fs::read(dir.join(format!("{name}.pem"))).unwrap();
            let der = asp_tls::parse_certs("c", dir, &pem).unwrap();
            asp_tls::Identity::of(&der[0]).unwrap()
        };
        // a's view of b1 (attests region=eu): orders both ways, catalog pub/ out only.
        let r = fa.rights_for(&cert(b.path(), "b1"), 10).unwrap();
        assert_eq!(r.partner_cluster, "org-b");
        assert_eq!(r.send.get("orders"), Some(&vec![String::new()]));
        assert_eq!(r.send.get("catalog"), Some(&vec!["pub/".to_owned()]));
        assert_eq!(r.receive.keys().collect::<Vec<_>>(), ["orders"]);
        assert_eq!(r.attested.get("region").map(String::as_str), Some("eu"));
        // b2 attests no region: catalog does not go to it, and it counts for nothing.
        let r2 = fa.rights_for(&cert(b.path(), "b2"), 10).unwrap();
        assert!(!r2.send.contains_key("catalog") && r2.attested.is_empty());
        // b's view of a1: it sends orders only, takes orders and catalog pub/.
        let rb = fb.rights_for(&cert(a.path(), "a1"), 10).unwrap();
        assert_eq!(rb.send.keys().collect::<Vec<_>>(), ["orders"]);
        assert_eq!(rb.receive.get("catalog"), Some(&vec!["pub/".to_owned()]));
        // A member's certificate is no partner's.
        assert!(fa.rights_for(&cert(a.path(), "a1"), 10).is_none());
        // Expired: nothing.
        assert!(fa.rights_for(&cert(b.path(), "b1"), u64::MAX).is_none());

        // The session's rules on a's side: prefixes, direction, and no origin of a.
        let rules = Arc::new(fa).session_rules(&r);
        let ev = |ns: &str, key: &str, origin: u64| Event {
            namespace: Namespace::new(ns).unwrap(),
            key: Key::new(key).unwrap(),
            op: asp_core::Op::Delete,
            dot: asp_core::Dot {
                origin: node(origin),
                counter: 1,
            },
            hlc: asp_core::Hlc::new(1, 0),
            context: bytes::Bytes::new(),
            epoch: 0,
            expires_ms: 0,
        };
        assert!((rules.may_send)(&ev("catalog", "pub/x", 1)));
        assert!(!(rules.may_send)(&ev("catalog", "priv/x", 1)));
        assert!(!(rules.may_send)(&ev("secret", "x", 1)));
        assert!((rules.refuses)(&ev("orders", "x", 7)).is_none());
        let why = |e| (rules.refuses)(&e).unwrap();
        assert!(why(ev("catalog", "pub/x", 7)).contains("not shared for writing"));
        assert!(why(ev("orders", "x", 1)).contains("a node of this cluster"));
    }
}
