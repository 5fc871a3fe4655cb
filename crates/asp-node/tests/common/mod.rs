//! What the in-process node tests share: the namespace they write, and reading and
//! comparing two stores' state of it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use asp_core::{Namespace, VersionVector};
use asp_store::Store;

pub fn ns() -> Namespace {
    Namespace::new("t").unwrap()
}

/// Every key's value (tombstones as `None`) and the version that set it.
pub fn state(store: &Store) -> BTreeMap<String, (Option<Vec<u8>>, String)> {
    let mut out = BTreeMap::new();
    let mut after = None;
    loop {
        let (events, next) = store
            .state_events(&ns(), after.as_ref(), 10_000, usize::MAX)
            .unwrap();
        for e in events {
            let value = match &e.op {
                asp_core::Op::Put { value, .. } => Some(value.to_vec()),
                asp_core::Op::Delete => None,
            };
            out.insert(e.key.as_str().to_owned(), (value, format!("{}", e.dot)));
        }
        match next {
            Some(k) => after = Some(k),
            None => return out,
        }
    }
}

pub fn vector(store: &Store) -> VersionVector {
    store
        .summary()
        .into_iter()
        .find(|s| s.namespace == ns())
        .map(|s| s.vector)
        .unwrap_or_default()
}

/// Waits (bounded) until both stores hold the same state and the same vector.
pub async fn converge(a: &Store, b: &Store, what: &str) {
    for _ in 0..1500 {
        if vector(a) == vector(b) && state(a) == state(b) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (sa, sb) = (state(a), state(b));
    let only_a = sa.keys().filter(|k| !sb.contains_key(*k)).count();
    let only_b = sb.keys().filter(|k| !sa.contains_key(*k)).count();
    panic!(
        "{what}: no convergence: {} vs {} keys ({only_a} only on a, {only_b} only on b); vectors {} vs {} dots",
        sa.len(),
        sb.len(),
        vector(a).len(),
        vector(b).len()
    );
}
