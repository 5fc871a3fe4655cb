//! The `json-map` policy's state: a JSON document merged per path, at every depth.
//!
//! Each path (the field names from the top of the document down) holds a
//! last-writer-wins register: a value (the JSON text of a scalar or an array), an
//! object marker, or a removal, with the version of the write that put it there. A
//! write that sets a path to a value or removes it also records what it *saw* below
//! the path: per origin, the highest counter of the dots written there in the state
//! it was made on. Those writes, and every earlier write of the same origins (each
//! origin's counters follow its own order), happened before it and are taken by it;
//! a write it did not see stays. So a concurrent "remove the parent" and "set a
//! child" keep the child, whatever the clocks say (add-wins), and the parent shows
//! as an object holding it: a path with a shown descendant is an object.
//!
//! Join is per path: the newer register wins, what was seen joins by maximum per
//! origin. This is a product of semilattices, so replicas that hear the same patches
//! end equal, whatever the order. Concurrent writes at the same path are decided by
//! the later version (last-writer-wins), at every depth (docs/CONFLICTS.md,
//! "json-map").
//!
//! States written before writes recorded what they saw (tags 4 and 5) carry a *cut*
//! instead: the version of the write, which takes everything below the path with a
//! version up to it. Such cuts keep applying as they did.
//!
//! This crate does not parse JSON: values are kept as JSON text, and the HTTP layer
//! turns merge patches into path changes and shown paths into a document.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;

use super::{CrdtError, Reader, put_bytes, put_dot, put_u32};
use crate::{Dot, Hlc, NodeId, Version};

/// The deepest path a json-map holds: 32 field names. A patch that reaches deeper is
/// refused where it enters (the HTTP layer), a state that holds one where it is
/// decoded.
pub const PATH_DEPTH_MAX: usize = 32;

/// The state tag of a map every path of which is a top-level field holding a value
/// or a removal: the layout of the release before nesting, still written whenever it
/// can say all there is, so that peers of that release read such states.
pub(super) const TAG_FIELDS: u8 = 4;
/// The state tag of the nested layout with cuts only (the release before writes
/// recorded what they saw); still written when no path records anything seen.
pub(super) const TAG_PATHS: u8 = 5;
/// The state tag of the nested layout whose paths record what their writes saw.
pub(super) const TAG_SEEN: u8 = 7;

/// A JSON document merged per path (see the module's docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JsonMap {
    paths: BTreeMap<Vec<String>, Register>,
    /// What pruning dropped ([`JsonMap::pruned`]): per origin, a counter up to which
    /// every write is taken, wherever it is, unless its register is *pinned* by the
    /// pruning that made this floor (or one that knew as much). Joined by maximum per
    /// origin.
    floor: BTreeMap<NodeId, u64>,
}

/// What one path holds.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Register {
    version: Version,
    kind: Kind,
    /// A cut of a state written before writes recorded what they saw: what was
    /// written below the path at a version up to this one is gone.
    cut: Option<Version>,
    /// Per origin, the highest counter the writes that set this path to a value or
    /// removed it saw at or below it: what they took (joined by maximum).
    seen: BTreeMap<NodeId, u64>,
    /// Kept by a pruning: the sum of that pruning's floor (0: not pinned). The floor
    /// does not take it while the state's floor sums to the same: floors of prunings
    /// grow with the stable point, so a floor that sums higher was made later, by a
    /// pruning that kept this register again if it was still shown.
    pin: u64,
}

impl Register {
    /// Whether a write at `version` below this path was taken by a write here.
    fn takes(&self, version: Version) -> bool {
        self.cut.is_some_and(|cut| version <= cut)
            || self
                .seen
                .get(&version.dot.origin)
                .is_some_and(|&counter| version.dot.counter <= counter)
    }

    fn shows(&self) -> bool {
        self.kind != Kind::Removed
    }

    /// What this register shows by itself, when `live` and nothing below it shows.
    fn own(&self, live: bool) -> Option<Shown<'_>> {
        match (&self.kind, live) {
            (_, false) | (Kind::Removed, _) => None,
            (Kind::Value(text), true) => Some(Shown::Value(text)),
            (Kind::Object, true) => Some(Shown::Object),
        }
    }

    /// Whether `floor` (a pruning's, summing to `floor_sum`) takes this register.
    fn under(&self, floor: &BTreeMap<NodeId, u64>, floor_sum: u64) -> bool {
        (self.pin == 0 || self.pin != floor_sum)
            && floor
                .get(&self.version.dot.origin)
                .is_some_and(|&counter| self.version.dot.counter <= counter)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// The JSON text of a value that is not an object: a scalar or an array (arrays
    /// are replaced whole).
    Value(Bytes),
    /// The path is an object; its fields are the paths one deeper.
    Object,
    Removed,
}

/// One change a patch makes at one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Set the path to this JSON text (not an object), replacing what was below it
    /// that the write saw.
    Set(Bytes),
    /// Make the path an object, keeping its fields if it is one already.
    Object,
    /// Remove the path and everything below it that the write saw.
    Remove,
}

/// What a read shows at a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shown<'a> {
    /// JSON text. Normally a scalar or an array; a top-level field written by the
    /// release before nesting may hold an object's text whole.
    Value(&'a Bytes),
    /// An object, whose fields are the shown paths one deeper.
    Object,
}

impl JsonMap {
    /// Every shown path and what it shows, parents before their children (paths in
    /// order of their field names).
    ///
    /// A path's register is *live* when every ancestor has a register and none of
    /// them took it. A path shows as an object when a live register below it holds
    /// a value or an object; otherwise as its own register, if live and not removed.
    pub fn shown(&self) -> impl Iterator<Item = (&[String], Shown<'_>)> {
        // (path, register, live, has a live shown descendant)
        let floor_sum = sum(&self.floor);
        let mut walked: Vec<(&[String], &Register, bool, bool)> =
            Vec::with_capacity(self.paths.len());
        // Indexes into `walked` of the ancestors of the path at hand, top first.
        let mut chain: Vec<usize> = Vec::with_capacity(PATH_DEPTH_MAX);
        for (path, register) in &self.paths {
            while let Some(&top) = chain.last() {
                let above = walked[top].0;
                if above.len() < path.len() && path.starts_with(above) {
                    break;
                }
                chain.pop();
            }
            let live = chain.len() + 1 == path.len()
                && !register.under(&self.floor, floor_sum)
                && !chain.iter().any(|&i| walked[i].1.takes(register.version));
            if live && register.shows() {
                // Mark the ancestors, from the nearest up, until one already is.
                for &i in chain.iter().rev() {
                    if walked[i].3 {
                        break;
                    }
                    walked[i].3 = true;
                }
            }
            chain.push(walked.len());
            walked.push((path.as_slice(), register, live, false));
        }
        walked
            .into_iter()
            .filter_map(|(path, register, live, below)| {
                let shown = if below {
                    Some(Shown::Object)
                } else {
                    register.own(live)
                };
                shown.map(|shown| (path, shown))
            })
    }

    /// Every path that holds a register, shown or not.
    #[cfg(test)]
    pub(super) fn paths(&self) -> impl Iterator<Item = &[String]> {
        self.paths.keys().map(Vec::as_slice)
    }

    /// The shown top-level fields, in name order (none: the document is `{}`).
    pub fn fields(&self) -> impl Iterator<Item = (&str, Shown<'_>)> {
        self.shown()
            .filter(|(path, _)| path.len() == 1)
            .map(|(path, shown)| (path[0].as_str(), shown))
    }

    /// What a read shows at `path` (`None`: nothing, the path is not in the
    /// document). Walks the path's ancestors and the paths below it only.
    pub fn shown_at(&self, path: &[String]) -> Option<Shown<'_>> {
        if path.is_empty() {
            return None;
        }
        let floor_sum = sum(&self.floor);
        let mut chain: Vec<&Register> = Vec::with_capacity(PATH_DEPTH_MAX);
        for depth in 1..path.len() {
            chain.push(self.paths.get(&path[..depth])?);
        }
        let register = self.paths.get(path)?;
        let live = !register.under(&self.floor, floor_sum)
            && !chain.iter().any(|a| a.takes(register.version));
        // The paths below, with a chain of their own from `path` down.
        chain.push(register);
        let mut names: Vec<&[String]> = vec![path];
        let below = self
            .paths
            .range::<[String], _>((Bound::Excluded(path), Bound::Unbounded));
        for (q, r) in below {
            if !q.starts_with(path) {
                break;
            }
            while let Some(&last) = names.last() {
                if last.len() < q.len() && q.starts_with(last) {
                    break;
                }
                names.pop();
                chain.pop();
            }
            let complete = path.len() + names.len() - 1 == q.len() - 1;
            if complete
                && r.shows()
                && !r.under(&self.floor, floor_sum)
                && !chain.iter().any(|a| a.takes(r.version))
            {
                return Some(Shown::Object);
            }
            names.push(q);
            chain.push(r);
        }
        register.own(live)
    }

    /// What the writes at `path` and below saw and were, per origin: what a write
    /// made on this state that sets `path` to a value or removes it takes.
    fn seen_at_and_below(&self, path: &[String]) -> BTreeMap<NodeId, u64> {
        let mut seen: BTreeMap<NodeId, u64> = BTreeMap::new();
        let at_and_below = self
            .paths
            .range::<[String], _>((Bound::Included(path), Bound::Unbounded))
            .take_while(|(q, _)| q.starts_with(path));
        for (_, r) in at_and_below {
            note(&mut seen, r.version.dot);
            join_max(&mut seen, &r.seen);
        }
        seen
    }

    /// The delta of a patch made at `version` on this state: each change at its
    /// path, and an object at every ancestor of a changed path. A value or a removal
    /// records what this state held at and below its path: what it takes. A path
    /// that is both changed and an ancestor of another change keeps its own change
    /// (a caller should not send both: the HTTP layer never does).
    ///
    /// Paths must be non-empty and at most [`PATH_DEPTH_MAX`] deep: the HTTP layer and
    /// the store refuse others before they get here (a bug if one does).
    pub fn patch(
        &self,
        version: Version,
        changes: impl IntoIterator<Item = (Vec<String>, Change)>,
    ) -> JsonMap {
        let mut paths = BTreeMap::new();
        let object = || Register {
            version,
            kind: Kind::Object,
            cut: None,
            seen: BTreeMap::new(),
            pin: 0,
        };
        for (path, change) in changes {
            assert!(
                !path.is_empty() && path.len() <= PATH_DEPTH_MAX,
                "json-map paths are checked where they enter"
            );
            for depth in 1..path.len() {
                if !paths.contains_key(&path[..depth]) {
                    paths.insert(path[..depth].to_vec(), object());
                }
            }
            let register = match change {
                Change::Object => object(),
                Change::Set(text) => Register {
                    kind: Kind::Value(text),
                    seen: self.seen_at_and_below(&path),
                    ..object()
                },
                Change::Remove => Register {
                    kind: Kind::Removed,
                    seen: self.seen_at_and_below(&path),
                    ..object()
                },
            };
            paths.insert(path, register);
        }
        JsonMap {
            paths,
            floor: BTreeMap::new(),
        }
    }

    /// Per path: the register with the newer version wins (of the same one, the
    /// higher pin); cuts take the newer, what was seen joins by maximum per
    /// origin, and so do floors.
    pub fn join(&mut self, other: &JsonMap) {
        join_max(&mut self.floor, &other.floor);
        for (path, theirs) in &other.paths {
            match self.paths.get_mut(path) {
                Some(mine) => {
                    // Equal versions with different kinds only meet in states no
                    // writer made (one event writes a path once); the kind breaks the
                    // tie so that join stays commutative even then.
                    if (theirs.version, &theirs.kind) > (mine.version, &mine.kind)
                        && !crate::mutation::active(
                            crate::mutation::Mutation::JsonMapJoinKeepsFirst,
                        )
                    {
                        mine.version = theirs.version;
                        mine.kind = theirs.kind.clone();
                        mine.pin = theirs.pin;
                    } else if (theirs.version, &theirs.kind) == (mine.version, &mine.kind) {
                        mine.pin = mine.pin.max(theirs.pin);
                    }
                    mine.cut = mine.cut.max(theirs.cut);
                    join_max(&mut mine.seen, &theirs.seen);
                }
                None => {
                    self.paths.insert(path.clone(), theirs.clone());
                }
            }
        }
    }

    /// The same document with only the registers of the paths it shows, pinned, and
    /// a floor that takes every write of the state that is not kept: what a write
    /// removed, replaced or took goes, and so does what each write saw. Reads are
    /// unchanged, now and after any join (the floor takes an old copy of what was
    /// dropped wherever it comes back from). Compaction writes this form once every
    /// node holds every state of the key (docs/CONFLICTS.md, "Inside a live key"):
    /// from then on a write this node has not seen has, for its origin, a counter
    /// above the floor, and was not seen by anything dropped.
    ///
    /// `dots` are those of the per-origin states this one joins: each such state
    /// holds every earlier write of its origin, so the floor takes all of them too —
    /// also a write that lost at its path and is in no register any more.
    ///
    /// A state that holds cuts of the layouts before tag 7 is kept whole: a cut takes
    /// by clock, including writes not yet made.
    pub fn pruned(&self, dots: impl IntoIterator<Item = Dot>) -> JsonMap {
        if self.paths.values().any(|r| r.cut.is_some()) {
            return self.clone();
        }
        let mut floor = self.floor.clone();
        for dot in dots {
            note(&mut floor, dot);
        }
        for r in self.paths.values() {
            note(&mut floor, r.version.dot);
            join_max(&mut floor, &r.seen);
        }
        let pin = sum(&floor).max(1);
        let shown: Vec<&[String]> = self.shown().map(|(path, _)| path).collect();
        let paths = shown
            .into_iter()
            .map(|path| {
                let r = &self.paths[path];
                let kept = Register {
                    version: r.version,
                    kind: r.kind.clone(),
                    cut: None,
                    seen: BTreeMap::new(),
                    pin,
                };
                (path.to_vec(), kept)
            })
            .collect();
        JsonMap { paths, floor }
    }

    /// Whether the layout of tag 4 (top-level fields, each a value or a removal, with
    /// the version that cut it) holds all of this state.
    fn fits_fields_layout(&self) -> bool {
        self.paths.iter().all(|(path, r)| {
            path.len() == 1
                && r.kind != Kind::Object
                && r.cut == Some(r.version)
                && r.seen.is_empty()
                && r.pin == 0
        }) && self.floor.is_empty()
    }
}

impl JsonMap {
    /// Appends the state's binary form, state tag included: tag 4 (the fields layout)
    /// when it holds the whole state, else tag 5 (the paths layout) when no path
    /// records what its writes saw, else tag 7 (the paths layout with what was seen).
    /// docs/PROTOCOL.md gives all three.
    pub(super) fn encode_into(&self, out: &mut Vec<u8>) {
        if self.fits_fields_layout() {
            out.push(TAG_FIELDS);
            put_u32(out, self.paths.len());
            for (path, r) in &self.paths {
                put_bytes(out, path[0].as_bytes());
                put_version(out, r.version);
                match &r.kind {
                    Kind::Value(text) => {
                        out.push(1);
                        put_bytes(out, text);
                    }
                    _ => out.push(0),
                }
            }
            return;
        }
        let with_seen = !self.floor.is_empty()
            || self
                .paths
                .values()
                .any(|r| !r.seen.is_empty() || r.pin != 0);
        out.push(if with_seen { TAG_SEEN } else { TAG_PATHS });
        put_u32(out, self.paths.len());
        for (path, r) in &self.paths {
            out.push(path.len() as u8);
            for name in path {
                put_bytes(out, name.as_bytes());
            }
            put_version(out, r.version);
            match &r.kind {
                Kind::Removed => out.push(0),
                Kind::Value(text) => {
                    out.push(1);
                    put_bytes(out, text);
                }
                Kind::Object => out.push(2),
            }
            match r.cut {
                None => out.push(0),
                Some(cut) => {
                    out.push(1);
                    put_version(out, cut);
                }
            }
            if with_seen {
                put_seen(out, &r.seen);
                out.extend_from_slice(&r.pin.to_le_bytes());
            }
        }
        if with_seen {
            put_seen(out, &self.floor);
        }
    }

    /// Reads the body of a state of tag `tag` (4, 5 or 7) that
    /// [`JsonMap::encode_into`] wrote.
    pub(super) fn decode_from(tag: u8, r: &mut Reader<'_>) -> Result<JsonMap, CrdtError> {
        let mut m = JsonMap::default();
        if tag == TAG_FIELDS {
            // Name length, version, flag.
            let n = r.count(29)?;
            for _ in 0..n {
                let name = name(r)?;
                let version = version(r)?;
                let kind = match r.u8()? {
                    0 => Kind::Removed,
                    1 => Kind::Value(Bytes::copy_from_slice(r.bytes()?)),
                    f => return Err(r.err(&format!("bad field flag {f}"))),
                };
                let register = Register {
                    version,
                    kind,
                    cut: Some(version),
                    seen: BTreeMap::new(),
                    pin: 0,
                };
                m.paths.insert(vec![name], register);
            }
            return Ok(m);
        }
        // Depth, one name's length, version, kind, cut flag.
        let n = r.count(31)?;
        for _ in 0..n {
            let depth = usize::from(r.u8()?);
            if depth == 0 || depth > PATH_DEPTH_MAX {
                return Err(r.err(&format!(
                    "a path of {depth} fields (1 to {PATH_DEPTH_MAX} allowed)"
                )));
            }
            let mut path = Vec::with_capacity(depth);
            for _ in 0..depth {
                path.push(name(r)?);
            }
            let version = version(r)?;
            let kind = match r.u8()? {
                0 => Kind::Removed,
                1 => Kind::Value(Bytes::copy_from_slice(r.bytes()?)),
                2 => Kind::Object,
                k => return Err(r.err(&format!("bad path kind {k}"))),
            };
            let cut = match r.u8()? {
                0 => None,
                1 => Some(self::version(r)?),
                f => return Err(r.err(&format!("bad cut flag {f}"))),
            };
            let (seen, pin) = if tag == TAG_SEEN {
                (self::seen(r)?, r.u64()?)
            } else {
                (BTreeMap::new(), 0)
            };
            if tag == TAG_SEEN && m.paths.last_key_value().is_some_and(|(p, _)| *p >= path) {
                return Err(r.err("paths out of order"));
            }
            let register = Register {
                version,
                kind,
                cut,
                seen,
                pin,
            };
            m.paths.insert(path, register);
        }
        if tag == TAG_SEEN {
            m.floor = seen(r)?;
        }
        Ok(m)
    }
}

/// The sum of a floor's counters (saturating): what a pin records.
fn sum(floor: &BTreeMap<NodeId, u64>) -> u64 {
    floor.values().fold(0, |a, &c| a.saturating_add(c))
}

/// Per origin, the higher counter.
fn join_max(mine: &mut BTreeMap<NodeId, u64>, theirs: &BTreeMap<NodeId, u64>) {
    for (&origin, &counter) in theirs {
        note(mine, Dot { origin, counter });
    }
}

/// Raises `dot`'s origin to at least its counter.
fn note(seen: &mut BTreeMap<NodeId, u64>, dot: Dot) {
    let c = seen.entry(dot.origin).or_default();
    *c = (*c).max(dot.counter);
}

/// A u32 count, then per origin (increasing) its counter, as a dot.
fn put_seen(out: &mut Vec<u8>, seen: &BTreeMap<NodeId, u64>) {
    put_u32(out, seen.len());
    for (&origin, &counter) in seen {
        put_dot(out, Dot { origin, counter });
    }
}

fn seen(r: &mut Reader<'_>) -> Result<BTreeMap<NodeId, u64>, CrdtError> {
    let mut seen = BTreeMap::new();
    // An origin and a counter.
    let n = r.count(16)?;
    for _ in 0..n {
        let dot = r.dot()?;
        if seen.last_key_value().is_some_and(|(&o, _)| o >= dot.origin) {
            return Err(r.err("origins seen out of order"));
        }
        seen.insert(dot.origin, dot.counter);
    }
    Ok(seen)
}

fn put_version(out: &mut Vec<u8>, version: Version) {
    out.extend_from_slice(&version.hlc.as_raw().to_le_bytes());
    put_dot(out, version.dot);
}

fn version(r: &mut Reader<'_>) -> Result<Version, CrdtError> {
    let hlc = Hlc::from_raw(r.u64()?);
    let dot = r.dot()?;
    Ok(Version { hlc, dot })
}

fn name(r: &mut Reader<'_>) -> Result<String, CrdtError> {
    Ok(std::str::from_utf8(r.bytes()?)
        .map_err(|_| r.err("a field name that is not UTF-8"))?
        .to_owned())
}
