//! Set reconciliation with a rateless invertible Bloom lookup table (Yang, Gilad and
//! Alizadeh, "Practical Rateless Set Reconciliation", SIGCOMM 2024).
//!
//! Each side holds a set of fixed-size [`Item`]s. Coded symbol `i` of a set is the XOR
//! of the items mapped to it, the XOR of their keyed checksums, and their count. Every
//! item maps to symbol 0 and then to ever sparser indices: index `j` holds a given
//! item with probability about `1 / (1 + j/2)`, so an item lies in about `2 ln(n/2)` of
//! the first `n` symbols. The sequence has no end (it is *rateless*): a sender streams
//! symbols `0, 1, 2, …` and the receiver subtracts its own symbol at each index and
//! peels the difference, until symbol 0 of the difference is empty. About 1.35 symbols
//! per differing item suffice for large differences, whatever the sets' sizes.
//!
//! Three things make this fit a replicated store:
//! - [`Window`] keeps a set's first symbols up to date as items come and go (two
//!   passes of about `2 ln(n/2)` XORs per changed key), so a reconciliation starts
//!   without reading the set; [`Extension`] continues past the window from a scan of
//!   the set, for the rare difference too large for it.
//! - Items, checksums and the index mapping are keyed by a 128-bit [`ItemKey`] shared
//!   by the cluster (items are SipHash-1-3 outputs; checksums a keyed mix of them):
//!   keys are chosen by remote writers, and a writer that cannot compute the hash
//!   cannot craft items that collide in a symbol.
//! - A symbol travels as [`SYMBOL_BYTES`] bytes: the sum, then 30 bits of checksum and
//!   the count modulo 4 in one 32-bit word. A pure symbol's count difference is ±1,
//!   which modulo 4 is still told apart (1 or 3), and its sign says on which side the
//!   item is. A symbol that is not pure passes for pure with probability about 2⁻³¹;
//!   the item such a symbol yields is garbage and is caught downstream (decoded twice,
//!   or not found by the side said to hold it), never silently taken for data.
//!
//! No I/O here: the caller moves symbols and decides what to do with the difference.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::hash::Hasher;

use siphasher::sip128::{Hasher128, SipHasher13};

use crate::Version;

#[cfg(test)]
mod tests;

/// Bytes of an item.
pub const ITEM_BYTES: usize = 32;
/// An element of a reconciled set: in asp, a hash of a key and its current version.
pub type Item = [u8; ITEM_BYTES];
/// Bits of checksum carried by an encoded symbol.
pub const CHECK_BITS: u32 = 30;
const CHECK_MASK: u64 = (1 << CHECK_BITS) - 1;
/// Bytes of one encoded symbol: the item sum, then checksum and count in 32 bits.
pub const SYMBOL_BYTES: usize = ITEM_BYTES + 4;

/// The key of the hash that checksums items and maps them to symbols. Both sides of a
/// reconciliation must use the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItemKey {
    k0: u64,
    k1: u64,
}

impl ItemKey {
    pub fn new(bytes: [u8; 16]) -> ItemKey {
        ItemKey {
            k0: u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
            k1: u64::from_le_bytes(bytes[8..].try_into().expect("8 bytes")),
        }
    }

    /// A key derived from `context` (a cluster's id): the default when no secret key
    /// is configured. Anyone who knows `context` can compute it, so it keeps
    /// clusters apart but does not stop crafted collisions; a secret does.
    pub fn derive(context: &[u8]) -> ItemKey {
        let mut h = SipHasher13::new_with_keys(0x6173_7020_6974_656d, 0x206b_6579_2076_3121);
        h.write(&(context.len() as u64).to_le_bytes());
        h.write(context);
        ItemKey::new(h.finish128().as_bytes())
    }

    /// The item standing for `key` at `version` in a namespace's set: 16 bytes of hash
    /// of the key, then 16 bytes of hash of the key and version. Two nodes holding one
    /// key at different versions differ by two items that share their first half, and
    /// a node finds its own key back from the first bytes of an item.
    pub fn item(&self, key: &[u8], version: &Version) -> Item {
        self.item_with_key_hash(&self.key_hash(key), key, version)
    }

    /// [`ItemKey::item`] when the key's hash ([`ItemKey::key_hash`]) is at hand.
    pub fn item_with_key_hash(&self, key_hash: &[u8; 16], key: &[u8], version: &Version) -> Item {
        let mut out = [0u8; ITEM_BYTES];
        out[..16].copy_from_slice(key_hash);
        // Fixed byte order and a length prefix: every platform hashes the same bytes,
        // and no (key, version) pair reads as another.
        let len = (key.len() as u64).to_le_bytes();
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write(b"v");
        h.write(&len);
        h.write(key);
        h.write(&version.hlc.as_raw().to_le_bytes());
        h.write(&version.dot.origin.get().to_le_bytes());
        h.write(&version.dot.counter.to_le_bytes());
        out[16..].copy_from_slice(&h.finish128().as_bytes());
        out
    }

    /// The first half of every item of `key`.
    pub fn key_hash(&self, key: &[u8]) -> [u8; 16] {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write(b"k");
        h.write(&(key.len() as u64).to_le_bytes());
        h.write(key);
        h.finish128().as_bytes()
    }

    /// The item's checksum (all 64 bits; symbols carry [`CHECK_BITS`] of them) and the
    /// seed of its index mapping.
    ///
    /// Items are themselves keyed hashes, so a keyed mix of their four words (not
    /// linear over XOR, as a checksum must not be) is enough, at a third of SipHash's
    /// cost; the symbol upkeep of every write pays for it twice.
    fn hash(&self, item: &Item) -> (u64, u64) {
        let word = |i: usize| u64::from_le_bytes(item[8 * i..8 * i + 8].try_into().expect("8"));
        let mut h = fmix(word(0) ^ self.k0);
        h = fmix(h ^ word(1));
        h = fmix(h ^ word(2));
        h = fmix(h ^ word(3) ^ self.k1);
        (h, fmix(h ^ 0x6d61_7070_696e_6721))
    }
}

/// A coded symbol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// XOR of the items mapped here.
    pub sum: Item,
    /// XOR of their checksums.
    pub check: u64,
    /// How many items are mapped here (added minus removed).
    pub count: i64,
}

impl Default for Symbol {
    fn default() -> Self {
        Symbol {
            sum: [0; ITEM_BYTES],
            check: 0,
            count: 0,
        }
    }
}

impl Symbol {
    fn toggle(&mut self, item: &Item, check: u64, sign: i64) {
        xor_into(&mut self.sum, item);
        self.check ^= check;
        self.count += sign;
    }

    /// Whether no item is mapped here (as far as the encoded form can tell).
    pub fn is_empty(&self) -> bool {
        self.sum == [0; ITEM_BYTES] && self.check & CHECK_MASK == 0 && self.count & 3 == 0
    }

    /// The symbol as its encoding carries it (checksum truncated, count modulo 4):
    /// compare symbols from the wire with local ones in this form.
    pub fn canonical(&self) -> Symbol {
        Symbol {
            sum: self.sum,
            check: self.check & CHECK_MASK,
            count: self.count & 3,
        }
    }

    /// Appends the symbol's [`SYMBOL_BYTES`]-byte encoding: the sum, then a
    /// little-endian `u32` holding the checksum's low [`CHECK_BITS`] bits above the
    /// count modulo 4.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.sum);
        let word = ((self.check & CHECK_MASK) << 2) as u32 | (self.count & 3) as u32;
        out.extend_from_slice(&word.to_le_bytes());
    }

    /// Reads a symbol from the first [`SYMBOL_BYTES`] bytes of `buf`. The count comes
    /// back modulo 4, the checksum truncated: what [`Decoder`] needs.
    pub fn decode(buf: &[u8]) -> Option<Symbol> {
        let buf = buf.get(..SYMBOL_BYTES)?;
        let word = u32::from_le_bytes(buf[ITEM_BYTES..].try_into().expect("4 bytes"));
        Some(Symbol {
            sum: buf[..ITEM_BYTES].try_into().expect("item bytes"),
            check: u64::from(word >> 2),
            count: i64::from(word & 3),
        })
    }
}

/// The 64-bit finaliser of splitmix64: every input bit affects every output bit.
fn fmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn xor_into(into: &mut Item, item: &Item) {
    for (a, b) in into.chunks_exact_mut(8).zip(item.chunks_exact(8)) {
        let x = u64::from_ne_bytes((&*a).try_into().expect("8 bytes"))
            ^ u64::from_ne_bytes(b.try_into().expect("8 bytes"));
        a.copy_from_slice(&x.to_ne_bytes());
    }
}

/// The indices of the symbols one item is mapped to: 0, then ever sparser, from a
/// generator seeded by the item's keyed hash. After index `i` the gap is drawn so that
/// index `j` is hit with probability about `2 / (j + 2)`: if `u` is uniform in (0, 1],
/// the next index is `i + 1 + floor((i + 1.5)·s)` with `s = 1/sqrt(u) − 1` taken in
/// 32.32 fixed point (so every platform computes the same indices).
#[derive(Clone, Copy, Debug)]
struct Mapping {
    state: u64,
    index: u64,
}

impl Mapping {
    fn new(seed: u64) -> Mapping {
        Mapping {
            state: seed,
            index: 0,
        }
    }

    fn advance(&mut self) -> u64 {
        // splitmix64: every seed gives its own sequence.
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // u in (0, 1] from 24 random bits (single precision is exact for those and
        // cheaper to divide and take roots of); 1/sqrt(u) - 1 in 32.32 fixed point (at
        // most 2^12), then the gap in integers: the step from one index to the next
        // waits only on a multiply.
        let u = ((z >> 40) + 1) as f32 * (1.0 / (1u32 << 24) as f32);
        let spread = ((1.0 / u.sqrt() - 1.0) * (1u64 << 32) as f32) as u64;
        let gap =
            (u128::from(self.index.saturating_mul(2).saturating_add(3)) * u128::from(spread)) >> 33;
        self.index = self
            .index
            .saturating_add(u64::try_from(gap).unwrap_or(u64::MAX))
            .saturating_add(1);
        self.index
    }
}

/// Items a [`Window`] walks side by side.
const LANES: usize = 4;

/// The first symbols of a set, kept up to date as items are added and removed.
#[derive(Clone, Debug)]
pub struct Window {
    key: ItemKey,
    symbols: Vec<Symbol>,
    items: i64,
}

impl Window {
    /// An empty set's first `len` symbols.
    pub fn new(key: ItemKey, len: usize) -> Window {
        Window {
            key,
            symbols: vec![Symbol::default(); len.max(1)],
            items: 0,
        }
    }

    pub fn add(&mut self, item: &Item) {
        self.apply(&[(item, 1)]);
    }

    pub fn remove(&mut self, item: &Item) {
        self.apply(&[(item, -1)]);
    }

    /// Replaces one item by another (a key's old version by its new one).
    pub fn replace(&mut self, old: &Item, new: &Item) {
        self.apply(&[(old, -1), (new, 1)]);
    }

    /// Adds every item, as a cold rebuild does: `LANES` (4) walks at a time, each lane
    /// taking the next item as soon as its walk leaves the window.
    pub fn add_all<'a>(&mut self, items: impl IntoIterator<Item = &'a Item>) {
        let len = self.symbols.len() as u64;
        let mut items = items.into_iter();
        let key = self.key;
        let mut next = |count: &mut i64| {
            items.next().map(|item| {
                *count += 1;
                let (check, seed) = key.hash(item);
                (item, check, Mapping::new(seed))
            })
        };
        let mut count = 0;
        let mut lanes: [Option<(&Item, u64, Mapping)>; LANES] =
            std::array::from_fn(|_| next(&mut count));
        loop {
            let mut busy = false;
            for lane in lanes.iter_mut() {
                let Some((item, check, mapping)) = lane else {
                    continue;
                };
                busy = true;
                self.symbols[mapping.index as usize].toggle(item, *check, 1);
                if mapping.advance() >= len {
                    *lane = next(&mut count);
                }
            }
            if !busy {
                break;
            }
        }
        self.items += count;
    }

    /// Adds (sign 1) or removes (sign -1) up to [`LANES`] items, walking their
    /// mappings side by side: each walk waits on its own previous index, so several
    /// at once keep the processor busy while one waits for memory.
    fn apply(&mut self, items: &[(&Item, i64)]) {
        debug_assert!(items.len() <= LANES);
        let len = self.symbols.len() as u64;
        let mut lanes = [(0u64, Mapping::new(0), 0i64); LANES];
        for (lane, (item, sign)) in lanes.iter_mut().zip(items) {
            let (check, seed) = self.key.hash(item);
            *lane = (check, Mapping::new(seed), *sign);
            self.items += sign;
        }
        let lanes = &mut lanes[..items.len()];
        loop {
            let mut busy = false;
            for (lane, (item, _)) in lanes.iter_mut().zip(items) {
                let (check, mapping, sign) = lane;
                if mapping.index < len {
                    self.symbols[mapping.index as usize].toggle(item, *check, *sign);
                    mapping.advance();
                    busy = true;
                }
            }
            if !busy {
                return;
            }
        }
    }

    /// Adds another window's items to this one: symbols are linear, so windows built
    /// over the parts of a set (on several threads, say) merge into the set's window.
    /// Both must have the same key and length.
    pub fn merge(&mut self, other: &Window) {
        assert_eq!(self.key, other.key, "windows under different keys");
        assert_eq!(
            self.symbols.len(),
            other.symbols.len(),
            "windows of different lengths"
        );
        for (a, b) in self.symbols.iter_mut().zip(&other.symbols) {
            xor_into(&mut a.sum, &b.sum);
            a.check ^= b.check;
            a.count += b.count;
        }
        self.items += other.items;
    }

    /// Builds the window of `items` on up to `threads` threads, each over a share of
    /// them, merged at the end.
    pub fn build(key: ItemKey, len: usize, items: &[Item], threads: usize) -> Window {
        let threads = threads
            .clamp(1, 64)
            .min(items.len().div_ceil(65_536).max(1));
        if threads == 1 {
            let mut w = Window::new(key, len);
            w.add_all(items);
            return w;
        }
        let share = items.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let parts: Vec<_> = items
                .chunks(share)
                .map(|part| {
                    scope.spawn(move || {
                        let mut w = Window::new(key, len);
                        w.add_all(part);
                        w
                    })
                })
                .collect();
            let mut whole = Window::new(key, len);
            for part in parts {
                whole.merge(&part.join().expect("a window builder panicked"));
            }
            whole
        })
    }

    pub fn key(&self) -> ItemKey {
        self.key
    }

    /// The symbols, from index 0.
    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// Items added minus items removed.
    pub fn items(&self) -> i64 {
        self.items
    }
}

/// Symbols past a [`Window`], computed from the whole set: every item's mapping is
/// advanced to the first index asked for, then symbols come one at a time.
pub struct Extension {
    key: ItemKey,
    items: Vec<(Item, u64, Mapping)>,
    /// (next index, item) of every item, smallest index first.
    heap: BinaryHeap<Reverse<(u64, usize)>>,
    next: u64,
}

impl Extension {
    /// Symbols of `items` from index `start` on.
    pub fn new(key: ItemKey, items: impl IntoIterator<Item = Item>, start: u64) -> Extension {
        let mut all = Vec::new();
        let mut heap = BinaryHeap::new();
        for item in items {
            let (check, seed) = key.hash(&item);
            let mut mapping = Mapping::new(seed);
            let mut index = 0;
            while index < start {
                index = mapping.advance();
            }
            heap.push(Reverse((index, all.len())));
            all.push((item, check, mapping));
        }
        Extension {
            key,
            items: all,
            heap,
            next: start,
        }
    }

    /// The next symbol.
    pub fn next_symbol(&mut self) -> Symbol {
        let mut symbol = Symbol::default();
        while let Some(&Reverse((index, i))) = self.heap.peek() {
            if index != self.next {
                break;
            }
            self.heap.pop();
            let (item, check, mapping) = &mut self.items[i];
            symbol.toggle(item, *check, 1);
            self.heap.push(Reverse((mapping.advance(), i)));
        }
        self.next += 1;
        symbol
    }

    pub fn key(&self) -> ItemKey {
        self.key
    }
}

/// Where a decoded item lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Only the peer (the symbols' sender) holds it.
    Remote,
    /// Only this node holds it.
    Local,
}

/// Why decoding stopped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The same item came out of the symbols twice: the peer's symbols are not those
    /// of a set under this key (another key, or corruption).
    #[error("the peer's symbols are inconsistent: an item was decoded twice")]
    Inconsistent,
}

/// Peels the difference between a peer's symbols and ours.
pub struct Decoder {
    key: ItemKey,
    /// Peer's minus ours, per index received, with decoded items taken out.
    diff: Vec<Symbol>,
    /// Indices that may hold exactly one item.
    candidates: Vec<usize>,
    /// (next index past those received, decoded item), smallest first: decoded items
    /// are taken out of symbols that arrive later.
    pending: BinaryHeap<Reverse<(u64, usize)>>,
    decoded: Vec<(Item, u64, Mapping, Side)>,
    seen: HashSet<Item>,
    failed: Option<DecodeError>,
}

impl Decoder {
    pub fn new(key: ItemKey) -> Decoder {
        Decoder {
            key,
            diff: Vec::new(),
            candidates: Vec::new(),
            pending: BinaryHeap::new(),
            decoded: Vec::new(),
            seen: HashSet::new(),
            failed: None,
        }
    }

    /// Takes the peer's next symbol (as decoded from the wire) and ours at the same
    /// index, and peels what it can.
    pub fn push(&mut self, remote: &Symbol, local: &Symbol) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let index = self.diff.len() as u64;
        let mut sum = remote.sum;
        xor_into(&mut sum, &local.sum);
        let mut d = Symbol {
            sum,
            check: (remote.check ^ local.check) & CHECK_MASK,
            count: remote.count.wrapping_sub(local.count) & 3,
        };
        // Items already decoded that map here.
        while let Some(&Reverse((next, i))) = self.pending.peek() {
            if next != index {
                break;
            }
            self.pending.pop();
            let (item, check, mapping, side) = &mut self.decoded[i];
            d.toggle(item, *check & CHECK_MASK, -side_sign(*side));
            d.count &= 3;
            self.pending.push(Reverse((mapping.advance(), i)));
        }
        self.diff.push(d);
        self.candidates.push(index as usize);
        self.peel()
    }

    fn peel(&mut self) -> Result<(), DecodeError> {
        while let Some(at) = self.candidates.pop() {
            let d = self.diff[at];
            let side = match d.count {
                1 => Side::Remote,
                3 => Side::Local,
                _ => continue,
            };
            let (check, seed) = self.key.hash(&d.sum);
            if check & CHECK_MASK != d.check {
                continue;
            }
            if !self.seen.insert(d.sum) {
                self.failed = Some(DecodeError::Inconsistent);
                return Err(DecodeError::Inconsistent);
            }
            let item = d.sum;
            let sign = side_sign(side);
            let mut mapping = Mapping::new(seed);
            let received = self.diff.len() as u64;
            let mut index = 0;
            while index < received {
                let s = &mut self.diff[index as usize];
                s.toggle(&item, check & CHECK_MASK, -sign);
                s.count &= 3;
                if s.count & 1 == 1 {
                    self.candidates.push(index as usize);
                }
                index = mapping.advance();
            }
            self.pending.push(Reverse((index, self.decoded.len())));
            self.decoded.push((item, check, mapping, side));
        }
        Ok(())
    }

    /// Whether the whole difference is decoded: symbol 0, which every item maps to, is
    /// empty once the decoded items are taken out.
    pub fn is_done(&self) -> bool {
        self.failed.is_none() && self.diff.first().is_some_and(Symbol::is_empty)
    }

    /// Symbols received so far.
    pub fn symbols(&self) -> usize {
        self.diff.len()
    }

    /// The items decoded so far, with the side that holds each.
    pub fn items(&self) -> impl Iterator<Item = (&Item, Side)> {
        self.decoded.iter().map(|(item, _, _, side)| (item, *side))
    }
}

fn side_sign(side: Side) -> i64 {
    match side {
        Side::Remote => 1,
        Side::Local => -1,
    }
}
