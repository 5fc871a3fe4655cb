//! Node state kept in replicated `_asp.*` namespaces (residency rules, shares,
//! members, modes, elections, leases): reading one whole, writing a record, and
//! reloading it when it changes.

use std::time::Duration;

use asp_core::{ContentType, Key, Namespace, VersionVector};
use asp_store::{Store, WriteOp};

/// Writes `value` as JSON under `key` of `namespace`, durably.
pub(crate) async fn put_json(
    store: &Store,
    namespace: Namespace,
    key: &str,
    value: &serde_json::Value,
) -> Result<(), String> {
    let key = Key::new(key).map_err(|e| e.to_string())?;
    let value = serde_json::to_vec(value).expect("JSON values serialize");
    store
        .write(namespace, vec![WriteOp::put(key, ContentType::Json, value)])
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Calls `each` with every key under `prefix` of `namespace` that holds a value.
pub(crate) fn scan_values(
    store: &Store,
    namespace: &Namespace,
    prefix: &str,
    mut each: impl FnMut(&str, &[u8]),
) -> Result<(), String> {
    let mut after: Option<String> = None;
    loop {
        let page = store
            .scan(namespace, prefix, after.as_deref(), 1000, true)
            .map_err(|e| e.to_string())?;
        for item in &page.items {
            if let Some(value) = &item.value {
                each(item.key.as_str(), value);
            }
        }
        match page.next_after {
            Some(k) => after = Some(k.as_str().to_owned()),
            None => return Ok(()),
        }
    }
}

/// Runs `reload` whenever the vector of one of `namespaces` moves (looked at when the
/// store's feed moves, at most every 100 ms), and at least every `every` if given (for
/// state that changes with time, such as an expiry). `what` names it in the log.
pub(crate) async fn follow<F>(
    store: Store,
    namespaces: Vec<Namespace>,
    every: Option<Duration>,
    what: &'static str,
    shutdown: tokio_util::sync::CancellationToken,
    reload: F,
) where
    F: Fn(&Store) -> Result<(), String> + Clone + Send + 'static,
{
    let mut head = store.subscribe();
    let mut seen: Option<Vec<VersionVector>> = None;
    let mut last_full = tokio::time::Instant::now();
    loop {
        let full = every.is_some_and(|e| last_full.elapsed() >= e);
        if full {
            last_full = tokio::time::Instant::now();
        }
        let (s, last, names, reload) = (
            store.clone(),
            seen.clone(),
            namespaces.clone(),
            reload.clone(),
        );
        // The vector read waits for the index: off the async threads.
        let checked = tokio::task::spawn_blocking(move || {
            let vectors: Vec<VersionVector> = names.iter().map(|n| s.namespace_vector(n)).collect();
            if !full && last.as_ref() == Some(&vectors) {
                return Ok(vectors);
            }
            reload(&s).map(|()| vectors)
        })
        .await;
        match checked {
            Ok(Ok(vectors)) => seen = Some(vectors),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read {what}"),
            Err(_) => {}
        }
        let wait = every.unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = head.changed() => {}
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
