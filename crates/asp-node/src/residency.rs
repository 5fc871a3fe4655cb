//! Residency: a namespace pinned to labels (`{"region": "eu"}`) never leaves for a node
//! whose attested labels do not match, and a node that does not match refuses writes to
//! it.
//!
//! Rules live in the replicated namespace `_asp.residency`, one key per pinned namespace:
//! `ns/<hash>`, where the hash is the first 16 bytes of SHA-256 of the namespace's name,
//! so that the name itself never reaches a node outside the rule (it gets the rule,
//! which it needs to refuse writes, but not which namespace it is for unless a client
//! names it). The value is `{"require": {"k": "v", ...}}`; a delete unpins.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use asp_core::session::Withhold;
use asp_core::{ContentType, Key, Namespace};
use asp_store::{Store, WriteOp};

/// The namespace of residency rules.
pub const RESIDENCY_NAMESPACE: &str = "_asp.residency";

/// Prefixes of the node's own namespaces that hold one namespace's records, followed
/// by that namespace's hash: residency treats them as the namespace itself.
const PER_NAMESPACE: [&str; 3] = [
    crate::modes::DIVERGENT_PREFIX,
    crate::leases::LEASES_PREFIX,
    crate::leases::BOUND_PREFIX,
];

/// Labels a rule requires (all of them, with these values).
pub type Labels = BTreeMap<String, String>;

/// The key of a namespace's rule in [`RESIDENCY_NAMESPACE`].
pub fn rule_key(namespace: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, namespace.as_bytes());
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("ns/{hex}")
}

/// Labels per rule, at most.
pub const RULE_LABELS_MAX: usize = 16;

/// Checks a rule (from the API or the configuration): values as a certificate's labels
/// take them; any key (one no certificate can carry pins the namespace to no node,
/// which is the operator's call).
pub fn check_rule(require: &Labels) -> Result<(), String> {
    if require.len() > RULE_LABELS_MAX {
        return Err(format!("at most {RULE_LABELS_MAX} labels"));
    }
    for (k, v) in require {
        let value_ok = !v.is_empty()
            && v.len() <= 128
            && v.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':')
            });
        if !value_ok {
            return Err(format!(
                "label {k}: the value {v:?} must be 1 to 128 letters, digits, '.', '_', '-', '/' or ':'"
            ));
        }
        if k.len() > 1024 {
            return Err("a label key is at most 1024 bytes".into());
        }
    }
    Ok(())
}

/// Whether `labels` carry every label `require` names, with its value.
pub fn matches(require: &Labels, labels: &Labels) -> bool {
    require.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Labels as `k=v, k=v` (`none` when empty), for messages.
pub fn show(labels: &Labels) -> String {
    if labels.is_empty() {
        return "none".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Default)]
struct Rules {
    /// By rule key (`ns/<hash>`).
    by_key: HashMap<String, Labels>,
    /// Namespaces asked about, with their rule: a hash per name, not per event.
    names: HashMap<Namespace, Option<Labels>>,
}

/// The rules this node knows, refreshed from the store.
#[derive(Default)]
pub struct Residency {
    rules: RwLock<Rules>,
}

pub(crate) fn namespace() -> Namespace {
    Namespace::new(RESIDENCY_NAMESPACE).expect("a valid name")
}

impl Residency {
    /// The rule of `namespace`, if it is pinned.
    pub fn rule(&self, namespace: &Namespace) -> Option<Labels> {
        // What the node keeps of one namespace under its hash (its divergent events,
        // its leases) goes where the namespace goes.
        if let Some(hash) = PER_NAMESPACE
            .iter()
            .find_map(|prefix| namespace.as_str().strip_prefix(prefix))
        {
            let rules = self.rules.read().unwrap();
            return rules.by_key.get(&format!("ns/{hash}")).cloned();
        }
        if namespace.as_str().starts_with("_asp.") {
            return None;
        }
        {
            let rules = self.rules.read().unwrap();
            if rules.by_key.is_empty() {
                return None;
            }
            if let Some(rule) = rules.names.get(namespace) {
                return rule.clone();
            }
        }
        let mut rules = self.rules.write().unwrap();
        let rule = rules.by_key.get(&rule_key(namespace.as_str())).cloned();
        if rules.names.len() > 100_000 {
            rules.names.clear();
        }
        rules.names.insert(namespace.clone(), rule.clone());
        rule
    }

    /// Whether nothing of `namespace` may go to a node with `labels` (the node's own
    /// audit log never goes anywhere).
    pub fn withholds(&self, namespace: &Namespace, labels: &Labels) -> bool {
        namespace.as_str() == crate::audit::AUDIT_NAMESPACE
            || self.rule(namespace).is_some_and(|r| !matches(&r, labels))
    }

    /// The predicate a link to a peer with `labels` (attested by its certificate; none
    /// on a plain link) withholds by.
    pub fn withhold_for(self: &Arc<Self>, labels: Labels) -> Withhold {
        let me = self.clone();
        Withhold(Arc::new(move |ns| me.withholds(ns, &labels)))
    }

    /// Reads every rule from the store again.
    pub fn reload(&self, store: &Store) -> Result<usize, String> {
        let ns = namespace();
        let mut by_key = HashMap::new();
        crate::follow::scan_values(store, &ns, "ns/", |key, value| {
            let Ok(record) = serde_json::from_slice::<serde_json::Value>(value) else {
                return;
            };
            let Ok(require) = serde_json::from_value::<Labels>(record["require"].clone()) else {
                return;
            };
            if !require.is_empty() {
                by_key.insert(key.to_owned(), require);
            }
        })?;
        let n = by_key.len();
        *self.rules.write().unwrap() = Rules {
            by_key,
            names: HashMap::new(),
        };
        Ok(n)
    }

    /// Pins `namespace` to `require` (empty: unpins), cluster-wide: the rule is a write
    /// to [`RESIDENCY_NAMESPACE`], which replicates.
    pub async fn set(
        &self,
        store: &Store,
        namespace: &Namespace,
        require: &Labels,
    ) -> Result<(), String> {
        let key = Key::new(&rule_key(namespace.as_str())).map_err(|e| e.to_string())?;
        let op = if require.is_empty() {
            WriteOp::delete(key)
        } else {
            let record = serde_json::json!({ "require": require });
            WriteOp::put(
                key,
                ContentType::Json,
                serde_json::to_vec(&record).expect("json"),
            )
        };
        store
            .write(self::namespace(), vec![op])
            .await
            .map_err(|e| e.to_string())?;
        self.reload(store)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespaces_own_records_go_where_it_goes() {
        let residency = Residency::default();
        let eu: Labels = [("region".to_owned(), "eu".to_owned())].into();
        residency
            .rules
            .write()
            .unwrap()
            .by_key
            .insert(rule_key("patients"), eu.clone());
        let hash = crate::modes::hash_of("patients");
        let us: Labels = [("region".to_owned(), "us".to_owned())].into();
        for prefix in [crate::modes::DIVERGENT_PREFIX, crate::leases::LEASES_PREFIX] {
            let records = Namespace::new(&format!("{prefix}{hash}")).unwrap();
            assert_eq!(residency.rule(&records), Some(eu.clone()), "{prefix}");
            assert!(residency.withholds(&records, &us), "{prefix}");
            assert!(!residency.withholds(&records, &eu), "{prefix}");
        }
        let other = crate::modes::hash_of("other");
        let leases = Namespace::new(&format!("{}{other}", crate::leases::LEASES_PREFIX)).unwrap();
        assert_eq!(residency.rule(&leases), None);
        assert_eq!(residency.rule(&Namespace::new("_asp.modes").unwrap()), None);
    }
}
