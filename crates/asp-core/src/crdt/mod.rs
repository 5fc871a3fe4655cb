//! Replicated data types for the conflict policies beyond last-writer-wins, as
//! δ-state CRDTs (Almeida, Shoker, Baquero, "Delta State Replicated Data Types",
//! 2018): a write computes a small *delta* state from the key's current state; the
//! delta is joined into the local state and travels in the event; every receiver joins
//! it into its own. Join is commutative, associative and idempotent, so replicas that
//! receive the same deltas in any order, with any duplicates, end equal.
//!
//! - [`PnCounter`]: per node, the total of its increments and of its decrements; the
//!   value is their difference. A delta carries the writer's new totals.
//! - [`OrSet`]: observed-remove set where a concurrent add wins over a remove. Each add
//!   is tagged with its event's dot; a remove carries the dots it saw.
//! - [`MvRegister`]: the `siblings` policy. A write carries the causal context its
//!   writer read (the token): it replaces exactly the siblings that context covers;
//!   concurrent writes stay side by side.
//! - [`JsonMap`]: a JSON document merged per path, at every depth: last-writer-wins
//!   at one path; a removal or replacement of a path takes what it saw below it, and
//!   a concurrent write below it that it did not see stays (add-wins).
//!
//! States encode to a compact binary form ([`State::encode`], [`State::decode`]);
//! decoding never panics and bounds every count by the input's length. No I/O here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use bytes::Bytes;

use crate::{Dot, Hlc, NodeId, RangeSet, VersionVector};

mod json_map;
#[cfg(test)]
mod tests;

pub use json_map::{Change, JsonMap, PATH_DEPTH_MAX, Shown};

/// How a namespace resolves concurrent writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Policy {
    /// The highest `(hlc, origin)` wins.
    Lww,
    /// Concurrent writes are kept side by side.
    Siblings,
    /// A PN-counter.
    Counter,
    /// An add-wins observed-remove set.
    Set,
    /// A JSON document, last-writer-wins per path at every depth.
    JsonMap,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        Policy::Lww,
        Policy::Siblings,
        Policy::Counter,
        Policy::Set,
        Policy::JsonMap,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Policy::Lww => "lww",
            Policy::Siblings => "siblings",
            Policy::Counter => "counter",
            Policy::Set => "set",
            Policy::JsonMap => "json-map",
        }
    }

    pub fn parse(name: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == name)
    }

    const fn from_tag(tag: u8) -> Option<Policy> {
        match tag {
            0 => Some(Policy::Lww),
            1 => Some(Policy::Siblings),
            2 => Some(Policy::Counter),
            3 => Some(Policy::Set),
            4 => Some(Policy::JsonMap),
            _ => None,
        }
    }

    /// What an event of this policy carries in its `context` field: a marker and the
    /// policy (empty for `lww`). A receiver learns from it how to merge the event.
    pub fn event_context(self) -> Bytes {
        match self {
            Policy::Lww => Bytes::new(),
            p => Bytes::from(vec![EVENT_MARKER, p.tag()]),
        }
    }

    /// The policy an event's `context` names (`lww` for an empty context).
    pub fn of_event(context: &[u8]) -> Option<Policy> {
        match context {
            [] => Some(Policy::Lww),
            [EVENT_MARKER, tag] => Policy::from_tag(*tag).filter(|p| *p != Policy::Lww),
            _ => None,
        }
    }

    const fn tag(self) -> u8 {
        match self {
            Policy::Lww => 0,
            Policy::Siblings => 1,
            Policy::Counter => 2,
            Policy::Set => 3,
            Policy::JsonMap => 4,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The state tag of a counter with reset bases (a counter without keeps tag 2).
const COUNTER_RESET_TAG: u8 = 6;

/// The first byte of the `context` of an event that carries a CRDT state.
const EVENT_MARKER: u8 = 0xC7;

/// Why an operation or an encoded state was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CrdtError {
    #[error("the counter would overflow: {0}")]
    Overflow(String),
    #[error("cannot join a {0} state with a {1} state")]
    Mismatch(Policy, Policy),
    #[error("malformed state: {0}")]
    Malformed(String),
}

/// A PN-counter: per node, the total of its increments and of its decrements; and,
/// for an observed reset, the totals the resets saw.
///
/// A reset sets each node's *base* to the totals its writer held; the value counts
/// only what is above the bases. Bases join by maximum, like the totals, so a reset
/// takes back exactly the increments its writer had seen: an increment concurrent
/// with it (not yet seen) survives it, on every node, whatever the order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PnCounter {
    inc: BTreeMap<NodeId, u64>,
    dec: BTreeMap<NodeId, u64>,
    /// The totals of `inc` and `dec` the newest resets saw (never above them).
    inc_base: BTreeMap<NodeId, u64>,
    dec_base: BTreeMap<NodeId, u64>,
}

impl PnCounter {
    /// The counter's value: every increment minus every decrement, above the bases
    /// of the resets.
    pub fn value(&self) -> i128 {
        let sum = |m: &BTreeMap<NodeId, u64>| m.values().map(|&v| v as i128).sum::<i128>();
        sum(&self.inc) - sum(&self.dec) - sum(&self.inc_base) + sum(&self.dec_base)
    }

    /// The delta of a reset: the bases become the totals seen here, so the value
    /// reads 0 where the reset's writer was; increments it had not seen stay.
    pub fn reset(&self) -> PnCounter {
        // The totals travel with their bases, so that every state, a delta too,
        // holds no base above its total.
        PnCounter {
            inc: self.inc.clone(),
            dec: self.dec.clone(),
            inc_base: self.inc.clone(),
            dec_base: self.dec.clone(),
        }
    }

    /// The delta of `node` adding `amount` (negative: a decrement): its new total.
    pub fn add(&self, node: NodeId, amount: i64) -> Result<PnCounter, CrdtError> {
        let (map, by) = if amount >= 0 {
            (&self.inc, amount as u64)
        } else {
            (&self.dec, amount.unsigned_abs())
        };
        let total = map
            .get(&node)
            .copied()
            .unwrap_or(0)
            .checked_add(by)
            .ok_or_else(|| {
                CrdtError::Overflow(format!("node {node}'s total would pass {}", u64::MAX))
            })?;
        let mut delta = PnCounter::default();
        if amount >= 0 {
            delta.inc.insert(node, total);
        } else {
            delta.dec.insert(node, total);
        }
        Ok(delta)
    }

    pub fn join(&mut self, other: &PnCounter) {
        for (mine, theirs) in [
            (&mut self.inc, &other.inc),
            (&mut self.dec, &other.dec),
            (&mut self.inc_base, &other.inc_base),
            (&mut self.dec_base, &other.dec_base),
        ] {
            for (&node, &v) in theirs {
                let e = mine.entry(node).or_insert(0);
                *e = if crate::mutation::active(crate::mutation::Mutation::CounterJoinAdds) {
                    e.saturating_add(v)
                } else {
                    (*e).max(v)
                };
            }
        }
    }
}

/// The dots a state's causal context covers: a version vector, whose ranges keep it
/// compact when every dot of an origin has been seen.
pub type Context = VersionVector;

/// An add-wins observed-remove set of byte-string members.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrSet {
    /// Each present member with the dots of the adds that keep it.
    entries: BTreeMap<Bytes, BTreeSet<Dot>>,
    /// Every add and remove this state has seen.
    context: Context,
}

impl OrSet {
    /// The members, in byte order.
    pub fn members(&self) -> impl Iterator<Item = &Bytes> {
        self.entries.keys()
    }

    pub fn contains(&self, member: &[u8]) -> bool {
        self.entries.contains_key(member)
    }

    /// The delta of adding `member` by the event `dot`: the new add, replacing the
    /// adds of it seen so far.
    pub fn add(&self, member: Bytes, dot: Dot) -> OrSet {
        let mut context = Context::default();
        context.insert(dot);
        if let Some(dots) = self.entries.get(&member) {
            for &d in dots {
                context.insert(d);
            }
        }
        OrSet {
            entries: BTreeMap::from([(member, BTreeSet::from([dot]))]),
            context,
        }
    }

    /// The delta of removing `member` by the event `dot`: the adds of it seen so far
    /// (an add concurrent with the remove is not among them, and wins).
    pub fn remove(&self, member: &[u8], dot: Dot) -> OrSet {
        let mut context = Context::default();
        context.insert(dot);
        if let Some(dots) = self.entries.get(member) {
            for &d in dots {
                context.insert(d);
            }
        }
        OrSet {
            entries: BTreeMap::new(),
            context,
        }
    }

    pub fn join(&mut self, other: &OrSet) {
        let mut entries = BTreeMap::new();
        let members: BTreeSet<&Bytes> = self.entries.keys().chain(other.entries.keys()).collect();
        for member in members {
            let mine = self.entries.get(member);
            let theirs = other.entries.get(member);
            let keep = |d: &Dot, in_other: Option<&BTreeSet<Dot>>, other_context: &Context| {
                in_other.is_some_and(|s| s.contains(d))
                    || (!other_context.contains(*d)
                        && !crate::mutation::active(
                            crate::mutation::Mutation::SetJoinDropsConcurrentAdds,
                        ))
            };
            let mut dots = BTreeSet::new();
            for d in mine.into_iter().flatten() {
                if keep(d, theirs, &other.context) {
                    dots.insert(*d);
                }
            }
            for d in theirs.into_iter().flatten() {
                if keep(d, mine, &self.context) {
                    dots.insert(*d);
                }
            }
            if !dots.is_empty() {
                entries.insert(member.clone(), dots);
            }
        }
        self.entries = entries;
        self.context.join(&other.context);
    }
}

/// One value of a [`MvRegister`]: what was written, and when (for ordering reads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sibling {
    pub hlc: Hlc,
    pub content_type: u8,
    pub value: Bytes,
}

/// The `siblings` policy's state: the values no write has yet replaced, each under the
/// dot of the event that wrote it, and every dot seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MvRegister {
    values: BTreeMap<Dot, Sibling>,
    context: Context,
}

impl MvRegister {
    /// The current siblings, oldest first (by clock, then dot).
    pub fn siblings(&self) -> Vec<(Dot, &Sibling)> {
        let mut out: Vec<_> = self.values.iter().map(|(d, s)| (*d, s)).collect();
        out.sort_by_key(|(d, s)| (s.hlc, d.origin, d.counter));
        out
    }

    /// The causal context to hand a reader (its token): every dot this state has seen.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The delta of a write by the event `dot` from a writer that read `seen`: it
    /// replaces the siblings `seen` covers. `value: None` is a delete (it replaces them
    /// with nothing).
    pub fn write(seen: &Context, dot: Dot, sibling: Option<Sibling>) -> MvRegister {
        let mut context = seen.clone();
        context.insert(dot);
        MvRegister {
            values: sibling.into_iter().map(|s| (dot, s)).collect(),
            context,
        }
    }

    pub fn join(&mut self, other: &MvRegister) {
        let mut values = BTreeMap::new();
        let keeps_replaced =
            crate::mutation::active(crate::mutation::Mutation::SiblingsJoinKeepsReplaced);
        for (d, s) in &self.values {
            if other.values.contains_key(d) || !other.context.contains(*d) || keeps_replaced {
                values.insert(*d, s.clone());
            }
        }
        for (d, s) in &other.values {
            if self.values.contains_key(d) || !self.context.contains(*d) {
                values.insert(*d, s.clone());
            }
        }
        self.values = values;
        self.context.join(&other.context);
    }
}

/// A key's state under one of the CRDT policies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Counter(PnCounter),
    Set(OrSet),
    Siblings(MvRegister),
    JsonMap(JsonMap),
}

impl State {
    pub fn policy(&self) -> Policy {
        match self {
            State::Counter(_) => Policy::Counter,
            State::Set(_) => Policy::Set,
            State::Siblings(_) => Policy::Siblings,
            State::JsonMap(_) => Policy::JsonMap,
        }
    }

    /// The empty state of `policy` (`None` for `lww`, which keeps no CRDT state).
    pub fn empty(policy: Policy) -> Option<State> {
        match policy {
            Policy::Lww => None,
            Policy::Siblings => Some(State::Siblings(MvRegister::default())),
            Policy::Counter => Some(State::Counter(PnCounter::default())),
            Policy::Set => Some(State::Set(OrSet::default())),
            Policy::JsonMap => Some(State::JsonMap(JsonMap::default())),
        }
    }

    /// Whether the state holds nothing a read would show and nothing a later write
    /// would build on: a set without members, a register without siblings, a map
    /// without fields. Such a key may be collected once every node holds its events
    /// (docs/CONFLICTS.md). A counter never is: its per-node totals are what the next
    /// increment of each node builds on, so dropping them would lose increments.
    pub fn is_removed(&self) -> bool {
        match self {
            State::Counter(_) => false,
            State::Set(s) => s.entries.is_empty(),
            State::Siblings(r) => r.values.is_empty(),
            State::JsonMap(m) => m.shown().next().is_none(),
        }
    }

    /// The state with what no read shows and no later write needs dropped: a
    /// json-map's removed and hidden paths ([`JsonMap::pruned`]; `dots`: those of the
    /// per-origin states this one joins). A set or siblings state keeps only live
    /// entries and a version vector already, and a counter needs all of its totals:
    /// those come back unchanged.
    pub fn pruned(&self, dots: impl IntoIterator<Item = Dot>) -> State {
        match self {
            State::JsonMap(m) => State::JsonMap(m.pruned(dots)),
            other => other.clone(),
        }
    }

    pub fn join(&mut self, other: &State) -> Result<(), CrdtError> {
        match (self, other) {
            (State::Counter(a), State::Counter(b)) => a.join(b),
            (State::Set(a), State::Set(b)) => a.join(b),
            (State::Siblings(a), State::Siblings(b)) => a.join(b),
            (State::JsonMap(a), State::JsonMap(b)) => a.join(b),
            (a, b) => return Err(CrdtError::Mismatch(a.policy(), b.policy())),
        }
        Ok(())
    }

    /// The state's binary form: a policy tag, then the state (little-endian counts
    /// and integers; byte strings with u32 lengths).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.policy().tag()];
        match self {
            State::Counter(c) => {
                // A counter never reset keeps the first layout (tag 2), which every
                // release reads; one with bases is tag 6: the four maps.
                let maps = if c.inc_base.is_empty() && c.dec_base.is_empty() {
                    vec![&c.inc, &c.dec]
                } else {
                    out[0] = COUNTER_RESET_TAG;
                    vec![&c.inc, &c.dec, &c.inc_base, &c.dec_base]
                };
                for map in maps {
                    put_u32(&mut out, map.len());
                    for (node, v) in map {
                        out.extend_from_slice(&node.get().to_le_bytes());
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
            State::Set(s) => {
                put_u32(&mut out, s.entries.len());
                for (member, dots) in &s.entries {
                    put_bytes(&mut out, member);
                    put_u32(&mut out, dots.len());
                    for d in dots {
                        put_dot(&mut out, *d);
                    }
                }
                put_context(&mut out, &s.context);
            }
            State::Siblings(r) => {
                put_u32(&mut out, r.values.len());
                for (d, s) in &r.values {
                    put_dot(&mut out, *d);
                    out.extend_from_slice(&s.hlc.as_raw().to_le_bytes());
                    out.push(s.content_type);
                    put_bytes(&mut out, &s.value);
                }
                put_context(&mut out, &r.context);
            }
            State::JsonMap(m) => {
                // A json-map writes its own tag: 4, 5 or 7, by what the state holds.
                out.clear();
                m.encode_into(&mut out);
            }
        }
        out
    }

    /// Reads a state written by [`State::encode`]; refuses anything else by name.
    pub fn decode(bytes: &[u8]) -> Result<State, CrdtError> {
        let mut r = Reader { bytes, pos: 0 };
        let state = match r.u8()? {
            tag @ (2 | COUNTER_RESET_TAG) => {
                let mut c = PnCounter::default();
                let maps = if tag == 2 {
                    vec![&mut c.inc, &mut c.dec]
                } else {
                    vec![&mut c.inc, &mut c.dec, &mut c.inc_base, &mut c.dec_base]
                };
                for map in maps {
                    let n = r.count(16)?;
                    for _ in 0..n {
                        let node = r.node()?;
                        let v = r.u64()?;
                        map.insert(node, v);
                    }
                }
                for (base, total) in [(&c.inc_base, &c.inc), (&c.dec_base, &c.dec)] {
                    if base
                        .iter()
                        .any(|(n, b)| *b > total.get(n).copied().unwrap_or(0))
                    {
                        return Err(r.err("a reset base above its total"));
                    }
                }
                State::Counter(c)
            }
            3 => {
                let mut s = OrSet::default();
                let n = r.count(8)?;
                for _ in 0..n {
                    let member = Bytes::copy_from_slice(r.bytes()?);
                    let k = r.count(16)?;
                    let mut dots = BTreeSet::new();
                    for _ in 0..k {
                        dots.insert(r.dot()?);
                    }
                    if dots.is_empty() {
                        return Err(r.err("a member without dots"));
                    }
                    s.entries.insert(member, dots);
                }
                s.context = r.context()?;
                State::Set(s)
            }
            1 => {
                let mut m = MvRegister::default();
                let n = r.count(33)?;
                for _ in 0..n {
                    let dot = r.dot()?;
                    let hlc = Hlc::from_raw(r.u64()?);
                    let content_type = r.u8()?;
                    let value = Bytes::copy_from_slice(r.bytes()?);
                    m.values.insert(
                        dot,
                        Sibling {
                            hlc,
                            content_type,
                            value,
                        },
                    );
                }
                m.context = r.context()?;
                State::Siblings(m)
            }
            tag @ (json_map::TAG_FIELDS | json_map::TAG_PATHS | json_map::TAG_SEEN) => {
                State::JsonMap(JsonMap::decode_from(tag, &mut r)?)
            }
            t => return Err(r.err(&format!("unknown policy tag {t}"))),
        };
        if r.pos != bytes.len() {
            return Err(r.err("trailing bytes"));
        }
        Ok(state)
    }
}

/// A causal context's binary form (what a context token carries).
pub fn encode_context(context: &Context) -> Vec<u8> {
    let mut out = Vec::new();
    put_context(&mut out, context);
    out
}

/// Reads [`encode_context`]'s output; refuses anything else.
pub fn decode_context(bytes: &[u8]) -> Result<Context, CrdtError> {
    let mut r = Reader { bytes, pos: 0 };
    let c = r.context()?;
    if r.pos != bytes.len() {
        return Err(r.err("trailing bytes"));
    }
    Ok(c)
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len());
    out.extend_from_slice(b);
}

fn put_dot(out: &mut Vec<u8>, d: Dot) {
    out.extend_from_slice(&d.origin.get().to_le_bytes());
    out.extend_from_slice(&d.counter.to_le_bytes());
}

fn put_context(out: &mut Vec<u8>, c: &Context) {
    let origins: Vec<_> = c.iter().collect();
    put_u32(out, origins.len());
    for (origin, set) in origins {
        out.extend_from_slice(&origin.get().to_le_bytes());
        put_u32(out, set.ranges().len());
        for &(lo, hi) in set.ranges() {
            out.extend_from_slice(&lo.to_le_bytes());
            out.extend_from_slice(&hi.to_le_bytes());
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> CrdtError {
        CrdtError::Malformed(format!("{what} at byte {}", self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CrdtError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| self.err("truncated"))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, CrdtError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, CrdtError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, CrdtError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// A count of entries each at least `min_bytes` long: bounded by what is left.
    fn count(&mut self, min_bytes: usize) -> Result<usize, CrdtError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_bytes) > self.bytes.len() - self.pos {
            return Err(self.err(&format!("{n} entries cannot fit")));
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], CrdtError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn node(&mut self) -> Result<NodeId, CrdtError> {
        NodeId::new(self.u64()?).ok_or_else(|| self.err("node id 0"))
    }

    fn dot(&mut self) -> Result<Dot, CrdtError> {
        let origin = self.node()?;
        let counter = self.u64()?;
        if counter == 0 {
            return Err(self.err("counter 0"));
        }
        Ok(Dot { origin, counter })
    }

    fn context(&mut self) -> Result<Context, CrdtError> {
        let mut c = Context::default();
        let n = self.count(12)?;
        for _ in 0..n {
            let origin = self.node()?;
            let k = self.count(16)?;
            let mut ranges = Vec::with_capacity(k);
            for _ in 0..k {
                let (lo, hi) = (self.u64()?, self.u64()?);
                if lo == 0 || lo > hi {
                    return Err(self.err("a bad range"));
                }
                ranges.push((lo, hi));
            }
            c.insert_set(origin, &RangeSet::from_ranges(ranges));
        }
        Ok(c)
    }
}
