//! The key index, in fjall: for every (namespace, key) its current version and where the
//! value is, plus the node's metadata: version vectors, the newest clock reading, and
//! the last log sequence number the index reflects.
//!
//! The index is never fsynced on the write path. fjall's journal makes each batch
//! atomic across keyspaces, so after a crash the index holds a prefix of the batches
//! written to it, and `applied_seq` says which: the log is replayed from there. If the
//! index ever reflects more than the log holds (possible only when a machine crash
//! loses unsynced log writes under `fsync = "never"`), it is rebuilt from the log.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;

use asp_core::{Hlc, Namespace, NodeId};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Slice};

use crate::codec::{self, IndexEntry};
use crate::error::{OpenError, ReadError};
use crate::types::NamespaceState;

const INDEX_FORMAT: u32 = 1;
/// Memtables waiting for a flush before the indexer waits for fjall.
const SEALED_MEMTABLES_MAX: usize = 2;
const META_FORMAT: &[u8] = b"format";
const META_APPLIED: &[u8] = b"applied_seq";
const META_HLC: &[u8] = b"hlc";
const META_VV_PREFIX: &[u8] = b"vv/";
const META_NS_HLC_PREFIX: &[u8] = b"nshlc/";
const META_CHECKPOINT_PREFIX: &[u8] = b"peer/";
/// How far a connector has sent this node's feed out (`asp-connect`), by its name.
const META_CONNECTOR_PREFIX: &[u8] = b"connector/";

pub(crate) struct Index {
    db: Database,
    keys: Keyspace,
    meta: Keyspace,
    /// Epitaphs: index key → the entry, for every key whose tombstone was collected
    /// from the log while a node away past the horizon may still hold an older value.
    /// The entries themselves are in `keys`; this keyspace lists them (so compaction
    /// finds them without a scan) and survives an index rebuild, which restores them.
    /// A row whose key has been written since is stale and dropped when next seen.
    epitaphs: Keyspace,
    /// Expiries: `expires_ms (u64 BE) ‖ origin (u64 BE) ‖ counter (u64 BE) ‖ index key`
    /// for every put with a time to live the index took in, in expiry order, so that
    /// the sweeper finds expired keys without a scan. A row whose key has been written
    /// since is stale (its dot is not the key's) and is dropped when next seen.
    expiries: Keyspace,
}

/// One row of the expiry list: a put of `index_key` with dot `dot` expiring then.
pub(crate) struct ExpiryRow {
    pub row: Slice,
    pub expires_ms: u64,
    pub dot: asp_core::Dot,
    pub index_key: Slice,
}

const EXPIRY_ROW_PREFIX: usize = 24;

fn expiry_row(expires_ms: u64, dot: asp_core::Dot, index_key: &[u8]) -> Vec<u8> {
    let mut row = Vec::with_capacity(EXPIRY_ROW_PREFIX + index_key.len());
    row.extend_from_slice(&expires_ms.to_be_bytes());
    row.extend_from_slice(&dot.origin.get().to_be_bytes());
    row.extend_from_slice(&dot.counter.to_be_bytes());
    row.extend_from_slice(index_key);
    row
}

/// What the index remembers about the log it reflects.
pub(crate) struct IndexState {
    pub applied_seq: u64,
    pub hlc: Hlc,
    pub namespaces: HashMap<Namespace, NamespaceState>,
}

fn corrupt(what: impl Into<String>) -> OpenError {
    OpenError::Corrupt {
        path: "index".into(),
        reason: what.into(),
    }
}

impl Index {
    pub fn open(dir: &Path, cache_bytes: u64, memtable_bytes: u64) -> Result<Index, OpenError> {
        // fjall's journal only has to cover memtables not yet flushed: the feed log is
        // the real write-ahead log. A small journal budget bounds how much unflushed
        // data (and so memory) fjall keeps, and how much it replays on open.
        let db = Database::builder(dir)
            .cache_size(cache_bytes)
            .max_journaling_size(64 << 20)
            .open()?;
        let keys = db.keyspace("keys", || {
            KeyspaceCreateOptions::default().max_memtable_size(memtable_bytes)
        })?;
        let meta = db.keyspace("meta", || {
            KeyspaceCreateOptions::default().max_memtable_size(1 << 20)
        })?;
        let epitaphs = db.keyspace("epitaphs", || {
            KeyspaceCreateOptions::default().max_memtable_size(1 << 20)
        })?;
        let expiries = db.keyspace("expiries", || {
            KeyspaceCreateOptions::default().max_memtable_size(4 << 20)
        })?;
        let index = Index {
            db,
            keys,
            meta,
            epitaphs,
            expiries,
        };
        match index.meta.get(META_FORMAT)? {
            None => {
                index.meta.insert(META_FORMAT, INDEX_FORMAT.to_le_bytes())?;
            }
            Some(v) => {
                let format = u32::from_le_bytes(
                    v.as_ref()
                        .try_into()
                        .map_err(|_| corrupt("bad index format field"))?,
                );
                if format != INDEX_FORMAT {
                    return Err(corrupt(format!(
                        "index format {format} is not supported (this asp reads {INDEX_FORMAT})"
                    )));
                }
            }
        }
        Ok(index)
    }

    pub fn state(&self) -> Result<IndexState, OpenError> {
        let u64_of = |v: Option<Slice>, what: &str| -> Result<u64, OpenError> {
            match v {
                None => Ok(0),
                Some(v) => Ok(u64::from_le_bytes(
                    v.as_ref()
                        .try_into()
                        .map_err(|_| corrupt(format!("bad {what}")))?,
                )),
            }
        };
        let applied_seq = u64_of(self.meta.get(META_APPLIED)?, "applied sequence")?;
        let hlc = Hlc::from_raw(u64_of(self.meta.get(META_HLC)?, "clock reading")?);
        let mut namespaces: HashMap<Namespace, NamespaceState> = HashMap::new();
        let name_of = |k: &[u8], prefix: &[u8]| {
            std::str::from_utf8(&k[prefix.len()..])
                .ok()
                .and_then(|n| Namespace::new(n).ok())
                .ok_or_else(|| corrupt("bad namespace in a metadata key"))
        };
        for item in self.meta.prefix(META_VV_PREFIX) {
            let (k, v) = item.into_inner()?;
            let vv = codec::decode_vv(&v).map_err(|e| corrupt(e.to_string()))?;
            namespaces
                .entry(name_of(&k, META_VV_PREFIX)?)
                .or_default()
                .vector = vv;
        }
        for item in self.meta.prefix(META_NS_HLC_PREFIX) {
            let (k, v) = item.into_inner()?;
            let hlc = Hlc::from_raw(u64_of(Some(v), "namespace clock")?);
            namespaces
                .entry(name_of(&k, META_NS_HLC_PREFIX)?)
                .or_default()
                .max_hlc = hlc;
        }
        Ok(IndexState {
            applied_seq,
            hlc,
            namespaces,
        })
    }

    /// Empties the index, to rebuild it from the log.
    pub fn clear(&self) -> Result<(), OpenError> {
        self.keys.clear()?;
        self.meta.clear()?;
        self.expiries.clear()?;
        self.meta.insert(META_FORMAT, INDEX_FORMAT.to_le_bytes())?;
        Ok(())
    }

    /// A consistent view of the index as it is now, for reads later.
    pub fn snapshot(&self) -> fjall::Snapshot {
        self.db.snapshot()
    }

    /// A key's entry as of `snapshot`.
    pub fn get_at(
        &self,
        snapshot: &fjall::Snapshot,
        key: &[u8],
    ) -> Result<Option<IndexEntry>, ReadError> {
        use fjall::Readable;
        match snapshot.get(&self.keys, key)? {
            None => Ok(None),
            Some(v) => IndexEntry::decode(&v)
                .map(Some)
                .map_err(|e| ReadError::Corrupt(format!("index entry: {e}"))),
        }
    }

    /// Visits the entries whose key starts with `prefix` as of `snapshot`, in key order.
    pub fn scan_at(
        &self,
        snapshot: &fjall::Snapshot,
        prefix: &[u8],
        mut visit: impl FnMut(&[u8], IndexEntry),
    ) -> Result<(), ReadError> {
        use fjall::Readable;
        for item in snapshot.prefix(&self.keys, prefix) {
            let (k, v) = item.into_inner()?;
            let entry = IndexEntry::decode(&v)
                .map_err(|e| ReadError::Corrupt(format!("index entry: {e}")))?;
            visit(&k, entry);
        }
        Ok(())
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<IndexEntry>, ReadError> {
        match self.keys.get(key)? {
            None => Ok(None),
            Some(v) => IndexEntry::decode(&v)
                .map(Some)
                .map_err(|e| ReadError::Corrupt(format!("index entry: {e}"))),
        }
    }

    /// Visits entries whose key starts with `prefix`, in key order, after `after` (an
    /// index key) if given, until `visit` returns `false`.
    pub fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        mut visit: impl FnMut(&[u8], IndexEntry) -> bool,
    ) -> Result<(), ReadError> {
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        for item in self.keys.range::<&[u8], _>((start, Bound::Unbounded)) {
            let (k, v) = item.into_inner()?;
            if !k.starts_with(prefix) {
                break;
            }
            let entry = IndexEntry::decode(&v)
                .map_err(|e| ReadError::Corrupt(format!("index entry: {e}")))?;
            if !visit(&k, entry) {
                break;
            }
        }
        Ok(())
    }

    /// Waits while fjall is behind on flushing memtables. fjall itself halts writers in
    /// 100 ms sleeps once four memtables wait for a flush; waiting here in 1 ms steps,
    /// earlier, turns those long stalls into smooth backpressure and bounds memory.
    pub fn wait_for_flushes(&self) {
        let mut waited = 0;
        while self.keys.sealed_memtable_count() >= SEALED_MEMTABLES_MAX && waited < 10_000 {
            std::thread::sleep(std::time::Duration::from_millis(1));
            waited += 1;
        }
    }

    /// The expiry rows due by `until_ms`, after row `after` if given, at most `limit`.
    pub fn expiries(
        &self,
        after: Option<&[u8]>,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<ExpiryRow>, ReadError> {
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let end = (until_ms.saturating_add(1)).to_be_bytes();
        let mut out = Vec::new();
        for item in self
            .expiries
            .range::<&[u8], _>((start, Bound::Excluded(&end[..])))
        {
            let row = item.key()?;
            if row.len() <= EXPIRY_ROW_PREFIX {
                return Err(ReadError::Corrupt("a malformed expiry row".into()));
            }
            let u = |i: usize| u64::from_be_bytes(row[i..i + 8].try_into().unwrap());
            let dot = asp_core::Dot {
                origin: NodeId::new(u(8))
                    .ok_or_else(|| ReadError::Corrupt("an expiry row with origin 0".into()))?,
                counter: u(16),
            };
            out.push(ExpiryRow {
                expires_ms: u(0),
                dot,
                index_key: Slice::from(&row[EXPIRY_ROW_PREFIX..]),
                row,
            });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Drops a stale expiry row (its dot names it, so a newer put's row is never it).
    pub fn remove_expiry(&self, row: &[u8]) -> Result<(), ReadError> {
        Ok(self.expiries.remove(row)?)
    }

    /// The epitaph rows, after the index key `after` if given, at most `limit`.
    pub fn epitaphs(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Slice, IndexEntry)>, ReadError> {
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.epitaphs.range::<&[u8], _>((start, Bound::Unbounded)) {
            let (k, v) = item.into_inner()?;
            let entry =
                IndexEntry::decode(&v).map_err(|e| ReadError::Corrupt(format!("epitaph: {e}")))?;
            out.push((k, entry));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Puts back the epitaphs an index rebuild lost: each key whose entry is missing or
    /// older than its epitaph gets the epitaph again. Returns how many.
    pub fn restore_epitaphs(&self) -> Result<u64, OpenError> {
        let mut restored = 0;
        let mut after: Option<Slice> = None;
        loop {
            let rows = self
                .epitaphs(after.as_deref(), 4096)
                .map_err(|e| corrupt(e.to_string()))?;
            let Some((last, _)) = rows.last() else {
                return Ok(restored);
            };
            after = Some(last.clone());
            for (key, epitaph) in rows {
                let current = self.get(&key).map_err(|e| corrupt(e.to_string()))?;
                if crate::lww::supersedes(&epitaph.version(), current.map(|c| c.version()).as_ref())
                {
                    self.keys.insert(key, epitaph.encode())?;
                    restored += 1;
                }
            }
        }
    }

    /// The nodes this node ever had a replication link with (each has a checkpoint).
    pub fn checkpoint_peers(&self) -> Vec<NodeId> {
        let mut out = Vec::new();
        for item in self.meta.prefix(META_CHECKPOINT_PREFIX) {
            let Ok(k) = item.key() else { continue };
            let id = k[META_CHECKPOINT_PREFIX.len()..]
                .try_into()
                .ok()
                .and_then(|b| NodeId::new(u64::from_be_bytes(b)));
            out.extend(id);
        }
        out
    }

    pub fn checkpoint(&self, peer: NodeId) -> Option<u64> {
        let mut key = META_CHECKPOINT_PREFIX.to_vec();
        key.extend_from_slice(&peer.get().to_be_bytes());
        let v = self.meta.get(key).ok()??;
        Some(u64::from_le_bytes(v.as_ref().try_into().ok()?))
    }

    /// Lowers every checkpoint beyond `head` to it. A checkpoint can only be beyond the
    /// log's end if the log lost its unsynced tail in a crash (fsync = "never" or
    /// "interval"); the positions past it will be reused by new events, which the peer
    /// must still be sent.
    pub fn clamp_checkpoints(&self, head: u64) -> Result<(), fjall::Error> {
        let mut lowered = Vec::new();
        for prefix in [META_CHECKPOINT_PREFIX, META_CONNECTOR_PREFIX] {
            for item in self.meta.prefix(prefix) {
                let (k, v) = item.into_inner()?;
                let seq = v.as_ref().try_into().map(u64::from_le_bytes).unwrap_or(0);
                if seq > head {
                    lowered.push(k);
                }
            }
        }
        for key in lowered {
            tracing::warn!(
                head,
                "a peer's or connector's checkpoint was past the end of the log; lowering it so that what follows is sent"
            );
            self.meta.insert(key, head.to_le_bytes())?;
        }
        Ok(())
    }

    pub fn save_checkpoint(&self, peer: NodeId, seq: u64) -> Result<(), fjall::Error> {
        let mut key = META_CHECKPOINT_PREFIX.to_vec();
        key.extend_from_slice(&peer.get().to_be_bytes());
        self.meta.insert(key, seq.to_le_bytes())
    }

    pub fn connector_position(&self, name: &str) -> Option<u64> {
        let mut key = META_CONNECTOR_PREFIX.to_vec();
        key.extend_from_slice(name.as_bytes());
        let v = self.meta.get(key).ok()??;
        Some(u64::from_le_bytes(v.as_ref().try_into().ok()?))
    }

    pub fn save_connector_position(&self, name: &str, seq: u64) -> Result<(), fjall::Error> {
        let mut key = META_CONNECTOR_PREFIX.to_vec();
        key.extend_from_slice(name.as_bytes());
        self.meta.insert(key, seq.to_le_bytes())
    }

    pub fn batch(&self, capacity: usize) -> IndexBatch<'_> {
        IndexBatch {
            index: self,
            batch: fjall::OwnedWriteBatch::with_capacity(self.db.clone(), capacity)
                .durability(None),
        }
    }

    /// Makes everything written so far durable (on shutdown; never on the write path).
    pub fn persist(&self) -> Result<(), fjall::Error> {
        self.db.persist(PersistMode::SyncAll)
    }

    /// Gives the disk space of removed key entries back at once: flushes the keys'
    /// memtable (where the removals are) and merges every table of the keyspace, so
    /// that the removed entries and their removals leave the files. Blocking, and a
    /// rewrite of the whole keyspace: compaction calls it only after collecting a
    /// large share of the entries (fjall 3.1.13's own, pinned; its compactions would
    /// merge them in time, as writes go on).
    pub fn reclaim_keys(&self) -> Result<(), fjall::Error> {
        self.keys.rotate_memtable_and_wait()?;
        self.keys.major_compact()
    }

    /// How many entries (and removals not yet merged away) the keys keyspace holds,
    /// roughly.
    pub fn approximate_keys(&self) -> usize {
        self.keys.approximate_len()
    }

    pub fn disk_bytes(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }
}

/// One atomic update of the index.
pub(crate) struct IndexBatch<'a> {
    index: &'a Index,
    batch: fjall::OwnedWriteBatch,
}

impl IndexBatch<'_> {
    pub fn put(&mut self, key: Slice, entry: &IndexEntry) {
        if entry.expires_ms != 0 && entry.content_type.is_some() {
            let row = expiry_row(entry.expires_ms, entry.dot, &key);
            self.batch.insert(&self.index.expiries, row, []);
        }
        self.batch.insert(&self.index.keys, key, entry.encode());
    }

    pub fn delete(&mut self, key: Slice) {
        self.batch.remove(&self.index.keys, key);
    }

    pub fn put_epitaph(&mut self, key: Slice, entry: &IndexEntry) {
        self.batch.insert(&self.index.epitaphs, key, entry.encode());
    }

    pub fn delete_epitaph(&mut self, key: Slice) {
        self.batch.remove(&self.index.epitaphs, key);
    }

    pub fn set_applied(&mut self, seq: u64, hlc: Hlc) {
        self.batch
            .insert(&self.index.meta, META_APPLIED, seq.to_le_bytes());
        self.batch
            .insert(&self.index.meta, META_HLC, hlc.as_raw().to_le_bytes());
    }

    pub fn set_namespace(&mut self, namespace: &Namespace, state: &NamespaceState) {
        let mut key = META_VV_PREFIX.to_vec();
        key.extend_from_slice(namespace.as_str().as_bytes());
        self.batch
            .insert(&self.index.meta, key, codec::encode_vv(&state.vector));
        let mut key = META_NS_HLC_PREFIX.to_vec();
        key.extend_from_slice(namespace.as_str().as_bytes());
        self.batch
            .insert(&self.index.meta, key, state.max_hlc.as_raw().to_le_bytes());
    }

    pub fn commit(self) -> Result<(), fjall::Error> {
        self.batch.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_beyond_the_log_are_lowered_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        let (a, b) = (NodeId::new(1).unwrap(), NodeId::new(2).unwrap());
        index.save_checkpoint(a, 10).unwrap();
        index.save_checkpoint(b, 3).unwrap();
        index.clamp_checkpoints(5).unwrap();
        assert_eq!(index.checkpoint(a), Some(5));
        assert_eq!(index.checkpoint(b), Some(3));
    }
}
