//! What the store keeps in memory per namespace for reconciliation: the first coded
//! symbols of its keys at their current versions ([`Window`]s), and a filter of the
//! keys it has ever held, so that the indexer can tell a new key without reading the
//! index.
//!
//! Keeping a window means taking each key's old item out when its version changes, so
//! the indexer must know the old version: a read of the key index. For a key never
//! held there is nothing to take out, and [`KeyFilter`] says so without the read — the
//! common case of a load of new keys, where the reads would otherwise cost about 40%
//! of ingest (measured on the reference machine: 800 k → 470 k events/s). The symbol
//! upkeep itself runs on a thread of its own (the window keeper), off the indexer's.

use std::collections::{BTreeSet, HashMap};

use crate::key_hashes::KeyHashes;

use asp_core::reconcile::{Item, ItemKey, Window};
use asp_core::{Namespace, Version};
use fjall::Slice;

use crate::codec;
use crate::error::ReadError;
use crate::index::Index;

/// The window length for a namespace of `keys` keys: a quarter of them, rounded up to a
/// power of two, between 64 and `max`. Differences up to about a sixth of the keys
/// then reconcile from memory; a larger one is a good part of the namespace, and the
/// scan that serves it costs little next to the data it brings. Small namespaces keep
/// small windows, so many of them fit in memory.
pub(crate) fn window_len(keys: i64, max: usize) -> usize {
    (usize::try_from(keys).unwrap_or(0) / 4)
        .next_power_of_two()
        .max(64)
        .min(max)
}

/// One namespace's reconciliation state: its window and the keys it has held.
pub(crate) struct Digest {
    pub window: Window,
    pub keys: KeyFilter,
    /// Its keys by hash, once a run needed them ([`crate::key_hashes`]).
    pub hashes: KeyIndex,
}

/// Where a namespace's key-hash index stands.
#[derive(Default)]
pub(crate) enum KeyIndex {
    #[default]
    None,
    /// A scan is filling it: the window keeper adds new keys and takes out removed
    /// ones already, but a key the scan has not reached may be missing. The number
    /// names the build, so that a scan finishes only its own: one evicted and started
    /// again missed the keys added while there was none.
    Building(KeyHashes, u64),
    Ready(KeyHashes),
}

impl KeyIndex {
    pub fn hashes(&self) -> Option<&KeyHashes> {
        match self {
            KeyIndex::None => None,
            KeyIndex::Building(h, _) | KeyIndex::Ready(h) => Some(h),
        }
    }

    pub fn hashes_mut(&mut self) -> Option<&mut KeyHashes> {
        match self {
            KeyIndex::None => None,
            KeyIndex::Building(h, _) | KeyIndex::Ready(h) => Some(h),
        }
    }
}

impl Digest {
    /// The digest of a namespace holding `items` (one per key), its window built on
    /// up to `threads` threads.
    pub fn of(item_key: ItemKey, items: &[Item], max: usize, threads: usize) -> Digest {
        let len = window_len(items.len() as i64, max);
        let mut keys = KeyFilter::default();
        for item in items {
            keys.insert(item[..16].try_into().expect("16 bytes"));
        }
        Digest {
            window: Window::build(item_key, len, items, threads),
            keys,
            hashes: KeyIndex::None,
        }
    }
}

/// Every namespace's digest, as of a feed position.
pub(crate) struct Windows {
    pub by_namespace: HashMap<Namespace, Digest>,
    /// The feed position the windows reflect.
    pub seq: u64,
    /// How many of the indexer's messages they reflect: groups that append nothing
    /// (collected deletes) change the windows without moving `seq`.
    pub messages: u64,
    /// Namespaces with a key-hash index (built or building), and a counter of runs
    /// that used one (for evicting the least recently used past the budget).
    pub indexed: BTreeSet<Namespace>,
    pub index_uses: u64,
}

impl Windows {
    /// Drops the key-hash indexes used least recently until they fit in `budget` bytes.
    pub fn fit_key_indexes(&mut self, budget: usize) {
        loop {
            let mut total = 0;
            let mut oldest: Option<(u64, &Namespace)> = None;
            for ns in &self.indexed {
                if let Some(h) = self.by_namespace.get(ns).and_then(|d| d.hashes.hashes()) {
                    total += h.bytes();
                    if oldest.is_none_or(|(used, _)| h.last_used < used) {
                        oldest = Some((h.last_used, ns));
                    }
                }
            }
            if total <= budget {
                return;
            }
            let Some((_, ns)) = oldest else { return };
            let ns = ns.clone();
            self.indexed.remove(&ns);
            if let Some(d) = self.by_namespace.get_mut(&ns) {
                d.hashes = KeyIndex::None;
            }
        }
    }
}

/// Every item of `namespace` (each key at its version) as of `snapshot`.
pub(crate) fn namespace_items(
    index: &Index,
    snapshot: &fjall::Snapshot,
    item_key: ItemKey,
    namespace: &str,
) -> Result<Vec<Item>, ReadError> {
    let prefix = codec::index_prefix(namespace);
    let mut items = Vec::new();
    index.scan_at(snapshot, &prefix, |k, entry| {
        items.push(item_key.item(&k[prefix.len()..], &entry.version()));
    })?;
    Ok(items)
}

/// What one indexed group changed: each key written (its index key) with its new
/// version and, when the indexer had to read it anyway, its old one.
pub(crate) struct WindowMsg {
    pub seq: u64,
    /// The index just before the group was committed: where old versions are read.
    pub before: fjall::Snapshot,
    /// The index just after: where a window that must grow is rebuilt from.
    pub after: fjall::Snapshot,
    pub changes: Vec<(Slice, Version, Old)>,
    /// The message's number (see [`Windows::messages`]).
    pub number: u64,
    /// Keys whose entry went (collected tombstones), with the version they had.
    pub removed: Vec<(Slice, Version)>,
}

/// A key's version before a group, as far as the indexer knows.
pub(crate) enum Old {
    Known(Option<Version>),
    /// Not read: the window keeper reads it from the snapshot if the key may exist.
    Unknown,
}

/// Keys the first layer of a [`KeyFilter`] is sized for; each further layer holds four
/// times more (few layers: an absent key costs one cache line per layer). Small, so
/// that many small namespaces stay small: at 65,536 keys (the first size until issue
/// 20) every namespace holding a key took 80 KiB, 8 GB for 100,000 namespaces.
const FIRST_LAYER_KEYS: u64 = 1 << 8;
const LAYER_GROWTH: u64 = 4;
/// Bits per key and probes per lookup: about 1–2% false positives per layer (a little
/// more than an unblocked filter's 1%) from `LARGE_LAYER_KEYS` keys on.
const BITS_PER_KEY: u64 = 10;
const PROBES: u64 = 7;
/// Layers for fewer keys than this take twice the bits per key (well under 0.1% false
/// positives each), so that the five small layers below it add little to the sum of
/// the layers' false positives that a large namespace's new keys see.
const LARGE_LAYER_KEYS: u64 = 1 << 16;

/// The keys ever added, approximately: a blocked Bloom filter (a key's probes all fall
/// in one 512-bit block, so a lookup costs one cache line per layer) that grows by
/// layers of growing size. `may_contain` is false only for a key never added.
#[derive(Clone, Default)]
pub(crate) struct KeyFilter {
    layers: Vec<Layer>,
}

#[derive(Clone)]
struct Layer {
    bits: Vec<u64>,
    capacity: u64,
    len: u64,
}

impl Layer {
    fn new(capacity: u64) -> Layer {
        // Blocks are picked by a remainder, so their count need not be a power of two
        // (rounding up to one cost up to 2× the memory: ~17 MB more at 10 M keys).
        let bits_per_key = if capacity < LARGE_LAYER_KEYS {
            2 * BITS_PER_KEY
        } else {
            BITS_PER_KEY
        };
        let words = (capacity * bits_per_key).div_ceil(512) * 8;
        Layer {
            bits: vec![0; words as usize],
            capacity,
            len: 0,
        }
    }

    /// The bit positions of a key: double hashing over the key's 128-bit hash.
    /// The bit positions of a key: a block chosen by the first 8 bytes of its hash,
    /// bits within it by double hashing over the last 8.
    fn positions(&self, hash: &[u8; 16]) -> [u64; PROBES as usize] {
        let h1 = u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"));
        let h2 = u64::from_le_bytes(hash[8..].try_into().expect("8 bytes"));
        let blocks = (self.bits.len() / 8) as u64;
        let block = (h1 % blocks) * 512;
        let (a, b) = (h2 & 0xffff_ffff, (h2 >> 32) | 1);
        std::array::from_fn(|i| block + (a.wrapping_add((i as u64).wrapping_mul(b)) & 511))
    }

    fn contains(&self, hash: &[u8; 16]) -> bool {
        self.positions(hash)
            .iter()
            .all(|p| self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }
}

impl KeyFilter {
    /// Adds a key by its hash ([`ItemKey::key_hash`]).
    pub fn insert(&mut self, hash: &[u8; 16]) {
        if self.layers.last().is_none_or(|l| l.len >= l.capacity) {
            let capacity = self
                .layers
                .last()
                .map_or(FIRST_LAYER_KEYS, |l| l.capacity * LAYER_GROWTH);
            self.layers.push(Layer::new(capacity));
        }
        let layer = self.layers.last_mut().expect("just ensured");
        for p in layer.positions(hash) {
            layer.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        layer.len += 1;
    }

    /// False only if the key was never added.
    pub fn may_contain(&self, hash: &[u8; 16]) -> bool {
        self.layers.iter().any(|l| l.contains(hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use asp_core::reconcile::ItemKey;

    fn hash(n: u64) -> [u8; 16] {
        ItemKey::new([3; 16]).key_hash(&n.to_le_bytes())
    }

    #[test]
    fn windows_grow_with_the_namespace_up_to_the_maximum() {
        assert_eq!(window_len(0, 16_384), 64);
        assert_eq!(window_len(1_000, 16_384), 256);
        assert_eq!(window_len(1_000_000, 16_384), 16_384);
        assert_eq!(window_len(1_000_000, 16), 16);
        assert_eq!(window_len(-5, 16_384), 64);
    }

    #[test]
    fn added_keys_are_always_found_and_others_mostly_not() {
        let mut f = KeyFilter::default();
        assert!(!f.may_contain(&hash(1)));
        for n in 0..300_000 {
            f.insert(&hash(n));
        }
        assert!((0..300_000).all(|n| f.may_contain(&hash(n))));
        assert!(f.layers.len() >= 2, "grew by layers");
        let false_positives = (1_000_000..1_100_000)
            .filter(|&n| f.may_contain(&hash(n)))
            .count();
        // About 1-2% per large layer, and there are a few layers.
        assert!(false_positives < 5_000, "{false_positives} of 100,000");
    }

    #[test]
    fn a_small_namespace_keeps_a_small_filter() {
        let bytes = |f: &KeyFilter| f.layers.iter().map(|l| l.bits.len() * 8).sum::<usize>();
        let mut f = KeyFilter::default();
        for n in 0..100 {
            f.insert(&hash(n));
        }
        assert!(bytes(&f) <= 1024, "{} bytes for 100 keys", bytes(&f));
        assert!((0..100).all(|n| f.may_contain(&hash(n))));
        let false_positives = (1_000_000..1_100_000)
            .filter(|&n| f.may_contain(&hash(n)))
            .count();
        assert!(false_positives < 200, "{false_positives} of 100,000");
    }
}
