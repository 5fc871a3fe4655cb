//! The `json-map` policy's state: a JSON document merged per path, at every depth.
//!
//! Each path (the field names from the top of the document down) holds a
//! last-writer-wins register: a value (the JSON text of a scalar or an array), an
//! object marker, or a removal, with the version of the write that put it there. Each
//! path also keeps a *cut*: the newest version that set it to a value or removed it.
//! Such a write replaces everything below the path, so a path is shown only if its
//! version is newer than every ancestor's cut (and every ancestor is an object).
//! Join is per path: the newer register wins, cuts take the newer. This is a product
//! of semilattices, so replicas that hear the same patches end equal, whatever the
//! order. Concurrent writes at different paths both stay; at the same path, or a
//! write under a path that another write replaced, the later version wins — the same
//! rule at every depth, and the rule the policy applied to top-level fields before
//! nesting existed (docs/CONFLICTS.md, "json-map").
//!
//! This crate does not parse JSON: values are kept as JSON text, and the HTTP layer
//! turns merge patches into path changes and shown paths into a document.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::{CrdtError, Reader, put_bytes, put_dot, put_u32};
use crate::{Hlc, Version};

/// The deepest path a json-map holds: 32 field names. A patch that reaches deeper is
/// refused where it enters (the HTTP layer), a state that holds one where it is
/// decoded.
pub const PATH_DEPTH_MAX: usize = 32;

/// The state tag of a map every path of which is a top-level field holding a value
/// or a removal: the layout of the release before nesting, still written whenever it
/// can say all there is, so that peers of that release read such states.
pub(super) const TAG_FIELDS: u8 = 4;
/// The state tag of the nested layout.
pub(super) const TAG_PATHS: u8 = 5;

/// A JSON document merged per path by last-writer-wins (see the module's docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JsonMap {
    paths: BTreeMap<Vec<String>, Register>,
}

/// What one path holds.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Register {
    version: Version,
    kind: Kind,
    /// The newest version that set this path to a value or removed it: what was
    /// written below the path before then is gone.
    cut: Option<Version>,
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
    /// Set the path to this JSON text (not an object), replacing what was below it.
    Set(Bytes),
    /// Make the path an object, keeping its fields if it is one already.
    Object,
    /// Remove the path and everything below it.
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
    pub fn shown(&self) -> impl Iterator<Item = (&[String], Shown<'_>)> {
        self.paths
            .keys()
            .filter_map(|path| self.shown_at(path).map(|s| (path.as_slice(), s)))
    }

    /// The shown top-level fields, in name order (none: the document is `{}`).
    pub fn fields(&self) -> impl Iterator<Item = (&str, Shown<'_>)> {
        self.shown()
            .filter(|(path, _)| path.len() == 1)
            .map(|(path, shown)| (path[0].as_str(), shown))
    }

    /// What a read shows at `path` (`None`: nothing, the path is not in the
    /// document).
    pub fn shown_at(&self, path: &[String]) -> Option<Shown<'_>> {
        if path.is_empty() {
            return None;
        }
        let mut cut: Option<Version> = None;
        for depth in 1..=path.len() {
            let register = self.paths.get(&path[..depth])?;
            if cut.is_some_and(|cut| register.version <= cut) {
                return None;
            }
            cut = cut.max(register.cut);
            match (&register.kind, depth == path.len()) {
                (Kind::Removed, _) => return None,
                (Kind::Object, true) => return Some(Shown::Object),
                (Kind::Value(text), true) => return Some(Shown::Value(text)),
                (Kind::Object, false) => {}
                // A value's version is at most its own cut, which hides what is below;
                // checked anyway for states no writer made.
                (Kind::Value(_), false) => return None,
            }
        }
        unreachable!("the loop returns at the last depth")
    }

    /// The delta of a patch made at `version`: each change at its path, and an object
    /// at every ancestor of a changed path. A path that is both changed and an
    /// ancestor of another change keeps its own change (a caller should not send
    /// both: the HTTP layer never does).
    ///
    /// Paths must be non-empty and at most [`PATH_DEPTH_MAX`] deep: the HTTP layer and
    /// the store refuse others before they get here (a bug if one does).
    pub fn patch(
        version: Version,
        changes: impl IntoIterator<Item = (Vec<String>, Change)>,
    ) -> JsonMap {
        let mut paths = BTreeMap::new();
        for (path, change) in changes {
            assert!(
                !path.is_empty() && path.len() <= PATH_DEPTH_MAX,
                "json-map paths are checked where they enter"
            );
            for depth in 1..path.len() {
                if !paths.contains_key(&path[..depth]) {
                    paths.insert(
                        path[..depth].to_vec(),
                        Register {
                            version,
                            kind: Kind::Object,
                            cut: None,
                        },
                    );
                }
            }
            let (kind, cut) = match change {
                Change::Set(text) => (Kind::Value(text), Some(version)),
                Change::Object => (Kind::Object, None),
                Change::Remove => (Kind::Removed, Some(version)),
            };
            paths.insert(path, Register { version, kind, cut });
        }
        JsonMap { paths }
    }

    /// Per path: the register with the newer version wins; cuts take the newer.
    pub fn join(&mut self, other: &JsonMap) {
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
                    }
                    mine.cut = mine.cut.max(theirs.cut);
                }
                None => {
                    self.paths.insert(path.clone(), theirs.clone());
                }
            }
        }
    }

    /// Whether the layout of tag 4 (top-level fields, each a value or a removal, with
    /// the version that cut it) holds all of this state.
    fn fits_fields_layout(&self) -> bool {
        self.paths
            .iter()
            .all(|(path, r)| path.len() == 1 && r.kind != Kind::Object && r.cut == Some(r.version))
    }
}

impl JsonMap {
    /// Appends the state's binary form, state tag included: tag 4 (the fields layout) when
    /// it holds the whole state, else tag 5 (the paths layout). docs/PROTOCOL.md
    /// gives both.
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
        out.push(TAG_PATHS);
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
        }
    }

    /// Reads the body of a state of tag `tag` (4 or 5) that [`JsonMap::encode_into`]
    /// wrote.
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
            m.paths.insert(path, Register { version, kind, cut });
        }
        Ok(m)
    }
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
