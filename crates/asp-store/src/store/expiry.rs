//! Keys with a time to live: which of them have expired, for the node's sweeper, which
//! writes the one delete that removes each (see docs/MODES.md, *TTL keys*).

use asp_core::{Key, Namespace, Version};

use crate::codec;
use crate::error::ReadError;

use super::Store;

/// A key whose put has expired and is still its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    pub namespace: Namespace,
    pub key: Key,
    /// The expired put's version: what [`crate::WriteKind::Expire`] names.
    pub version: Version,
    pub expires_ms: u64,
}

/// A page of expired keys and where the next page starts (`None`: the list of what
/// expired by now ends here).
pub struct ExpiredPage {
    pub items: Vec<Expired>,
    pub next: Option<Vec<u8>>,
}

impl Store {
    /// Keys expired by this node's clock, in expiry order, after cursor `after` (a
    /// page's `next`), looking at most at `limit` rows. Rows of keys written since
    /// their put are dropped on the way.
    pub fn expired(&self, after: Option<&[u8]>, limit: usize) -> Result<ExpiredPage, ReadError> {
        let shared = &self.inner.shared;
        shared.await_index().map_err(ReadError::Failed)?;
        let now = crate::clock::wall_ms();
        let rows = shared.index.expiries(after, now, limit.max(1))?;
        let next = (rows.len() >= limit.max(1)).then(|| rows.last().map(|r| r.row.to_vec()));
        let mut items = Vec::new();
        for row in rows {
            let entry = shared.index.get(&row.index_key)?;
            let current = entry.filter(|e| {
                e.dot == row.dot && e.content_type.is_some() && e.expires_ms == row.expires_ms
            });
            let Some(entry) = current else {
                shared.index.remove_expiry(&row.row)?;
                continue;
            };
            let Some((namespace, key)) = codec::split_index_key(&row.index_key) else {
                return Err(ReadError::Corrupt(
                    "an expiry row's key is malformed".into(),
                ));
            };
            let (Ok(namespace), Some(key)) = (
                Namespace::new(namespace),
                std::str::from_utf8(key).ok().and_then(|k| Key::new(k).ok()),
            ) else {
                return Err(ReadError::Corrupt(
                    "an expiry row names an invalid key".into(),
                ));
            };
            items.push(Expired {
                namespace,
                key,
                version: entry.version(),
                expires_ms: row.expires_ms,
            });
        }
        Ok(ExpiredPage {
            items,
            next: next.flatten(),
        })
    }
}
