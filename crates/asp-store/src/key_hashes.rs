//! A namespace's keys by the first 8 bytes of their hash ([`ItemKey::key_hash`]), so
//! that an anti-entropy run finds the keys behind its decoded items without a pass over
//! the namespace (issue 20, part 5).
//!
//! Kept in memory, and only for namespaces that needed one: the first run of a large
//! namespace builds it during the scan it does anyway, and the window keeper then adds
//! each new key and takes out each removed one (it hashes every key already). A byte
//! budget (`reconcile_key_index_bytes`) bounds the whole; past it the namespace used
//! least recently loses its index and scans again. Written to disk, the same rows cost
//! 60–75% of ingest (bench/RESULTS.md, "Key-hash rows").
//!
//! An index may hold a key that is gone (removed while a build scanned): every answer
//! is a candidate the caller reads from the key index. It never lacks a key that is
//! there, which is what lets a run trust a miss.
//!
//! [`ItemKey::key_hash`]: asp_core::reconcile::ItemKey::key_hash

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Namespaces with fewer keys than this scan: a pass over them costs under a
/// millisecond, less than the index's upkeep would over time.
pub(crate) const KEY_HASHES_MIN_KEYS: i64 = 4_096;

/// Builds under way at once, at most (each a thread, or a run's own pass, and up to the
/// budget of memory): a namespace past it waits for a later check or run.
pub(crate) const KEY_HASHES_BUILDS_MAX: usize = 2;

/// The first 8 bytes of a key's hash, as the index's key.
pub(crate) fn head(key_hash: &[u8]) -> u64 {
    u64::from_le_bytes(key_hash[..8].try_into().expect("at least 8 bytes"))
}

/// Heads are keyed hashes already: the table uses them as they are.
#[derive(Default)]
pub(crate) struct HeadHasher(u64);

impl Hasher for HeadHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; anything else still hashes, if poorly.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Heads<V> = HashMap<u64, V, BuildHasherDefault<HeadHasher>>;

/// Bytes a table slot costs: a `(u64, u32)` pair padded to 16, and a control byte.
const SLOT_BYTES: usize = 17;

/// One namespace's keys by hash head. Keys live in one arena (a 2-byte length, then the
/// key; keys are at most 1,024 bytes), addressed by offset.
#[derive(Default)]
pub(crate) struct KeyHashes {
    slots: Heads<u32>,
    /// Further keys sharing a head with the one in `slots` (64-bit heads: about one
    /// pair in 10^7 at a million keys).
    more: Heads<Vec<u32>>,
    arena: Vec<u8>,
    /// Arena bytes of keys taken out; the arena is rewritten when they pass half.
    garbage: usize,
    keys: usize,
    /// When a run last used the index (the store's use counter), for eviction.
    pub last_used: u64,
}

impl KeyHashes {
    fn key_at(&self, offset: u32) -> &[u8] {
        let at = offset as usize;
        let len = u16::from_le_bytes([self.arena[at], self.arena[at + 1]]) as usize;
        &self.arena[at + 2..at + 2 + len]
    }

    /// Adds `key` under `head` (nothing if it is there). False if the arena would pass
    /// 4 GiB, which the byte budget keeps far off.
    pub fn insert(&mut self, head: u64, key: &[u8]) -> bool {
        debug_assert!(key.len() <= u16::MAX as usize);
        if let Some(&at) = self.slots.get(&head) {
            if self.key_at(at) == key {
                return true;
            }
            if let Some(more) = self.more.get(&head)
                && more.iter().any(|&o| self.key_at(o) == key)
            {
                return true;
            }
        }
        let Ok(offset) = u32::try_from(self.arena.len()) else {
            return false;
        };
        if self.arena.len() + 2 + key.len() > u32::MAX as usize {
            return false;
        }
        self.arena
            .extend_from_slice(&(key.len() as u16).to_le_bytes());
        self.arena.extend_from_slice(key);
        self.keys += 1;
        match self.slots.entry(head) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(offset);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.more.entry(head).or_default().push(offset);
            }
        }
        true
    }

    /// Takes `key` out from under `head`, if it is there.
    pub fn remove(&mut self, head: u64, key: &[u8]) {
        let Some(&at) = self.slots.get(&head) else {
            return;
        };
        if self.key_at(at) == key {
            match self.more.get_mut(&head).and_then(|m| m.pop()) {
                Some(next) => {
                    self.slots.insert(head, next);
                    if self.more.get(&head).is_some_and(|m| m.is_empty()) {
                        self.more.remove(&head);
                    }
                }
                None => {
                    self.slots.remove(&head);
                }
            }
        } else {
            let Some(more) = self.more.get(&head) else {
                return;
            };
            let Some(i) = more.iter().position(|&o| self.key_at(o) == key) else {
                return;
            };
            let more = self.more.get_mut(&head).expect("just read");
            more.swap_remove(i);
            if more.is_empty() {
                self.more.remove(&head);
            }
        }
        self.keys -= 1;
        self.garbage += 2 + key.len();
        if self.garbage > (1 << 20) && self.garbage > self.arena.len() / 2 {
            self.rewrite();
        }
    }

    /// The keys under `head`.
    pub fn get(&self, head: u64) -> impl Iterator<Item = &[u8]> {
        let first = self.slots.get(&head).copied();
        let more = self.more.get(&head).map(|m| m.as_slice()).unwrap_or(&[]);
        first
            .into_iter()
            .chain(more.iter().copied())
            .map(|o| self.key_at(o))
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.keys
    }

    /// Memory held, approximately (table capacity, arena, collision lists).
    pub fn bytes(&self) -> usize {
        self.slots.capacity() * SLOT_BYTES
            + self.arena.capacity()
            + self
                .more
                .values()
                .map(|m| 32 + 4 * m.capacity())
                .sum::<usize>()
    }

    /// Copies the live keys into a new arena, dropping what removals left.
    fn rewrite(&mut self) {
        let mut next = KeyHashes {
            last_used: self.last_used,
            ..KeyHashes::default()
        };
        next.slots.reserve(self.slots.len());
        next.arena.reserve(self.arena.len() - self.garbage);
        for (&head, &at) in &self.slots {
            next.insert(head, self.key_at(at));
        }
        for (&head, more) in &self.more {
            for &at in more {
                next.insert(head, self.key_at(at));
            }
        }
        *self = next;
    }

    /// Adds every key of `other` (a build's scan) not already here.
    pub fn absorb(&mut self, other: &KeyHashes) {
        self.slots.reserve(other.slots.len());
        for (&head, &at) in &other.slots {
            self.insert(head, other.key_at(at));
        }
        for (&head, more) in &other.more {
            for &at in more {
                self.insert(head, other.key_at(at));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_back_by_head_including_keys_that_share_one() {
        let mut k = KeyHashes::default();
        assert!(k.insert(7, b"a"));
        assert!(k.insert(7, b"b"));
        assert!(k.insert(7, b"a"), "a second insert is a no-op");
        assert!(k.insert(9, b"c"));
        assert_eq!(k.len(), 3);
        let mut seven: Vec<_> = k.get(7).collect();
        seven.sort();
        assert_eq!(seven, vec![&b"a"[..], &b"b"[..]]);
        k.remove(7, b"a");
        assert_eq!(k.get(7).collect::<Vec<_>>(), vec![&b"b"[..]]);
        k.remove(7, b"zz");
        k.remove(8, b"b");
        assert_eq!(k.len(), 2);
        k.remove(7, b"b");
        assert_eq!(k.get(7).count(), 0);
        assert_eq!(k.get(9).collect::<Vec<_>>(), vec![&b"c"[..]]);
    }

    #[test]
    fn removals_past_half_the_arena_rewrite_it_and_lose_no_live_key() {
        let mut k = KeyHashes::default();
        let key = |i: u64| format!("key-{i:0>40}").into_bytes();
        for i in 0..100_000u64 {
            k.insert(i.wrapping_mul(0x9e37_79b9_7f4a_7c15), &key(i));
        }
        let full = k.arena.len();
        for i in (0..100_000u64).filter(|i| i % 3 != 0) {
            k.remove(i.wrapping_mul(0x9e37_79b9_7f4a_7c15), &key(i));
        }
        assert!(
            k.arena.len() < full / 2,
            "rewritten: {} of {full}",
            k.arena.len()
        );
        for i in 0..100_000u64 {
            let found: Vec<_> = k.get(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
            if i % 3 == 0 {
                assert_eq!(found, vec![&key(i)[..]]);
            } else {
                assert!(found.is_empty());
            }
        }
    }

    #[test]
    fn absorbing_a_build_keeps_what_the_keeper_added_meanwhile() {
        let mut kept = KeyHashes::default();
        kept.insert(1, b"new");
        let mut built = KeyHashes::default();
        built.insert(2, b"old");
        built.insert(1, b"new");
        kept.absorb(&built);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept.get(2).collect::<Vec<_>>(), vec![&b"old"[..]]);
    }
}
