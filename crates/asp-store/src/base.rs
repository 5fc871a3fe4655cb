//! Base vectors (`base.vv`): per namespace, the dots this node holds whose events are
//! no longer in its feed log — dropped by compaction as superseded, or declared
//! covered by a peer ([`crate::Store::cover`]) — and the feed positions compaction
//! removed.
//!
//! The log is the source of truth for everything else, but it cannot say what it no
//! longer holds: a key index rebuilt from the log would give each namespace a version
//! vector with holes where the dropped events were, and the node would ask its peers
//! for them again (and be sent events it had already superseded). So the store joins
//! each base into its namespace's vector on every open, after replaying the log.
//!
//! The removed positions let opening the log tell a gap left by compaction from a lost
//! segment file, which is refused.
//!
//! The file is small (range sets) and replaced whole, atomically: temporary file,
//! fsync, rename, fsync of the directory. Layout (integers little-endian):
//!
//! ```text
//! magic "ASPBASE\0" | format u32 | n_namespaces u32
//!   n × ( ns_len u8 | ns | vv_len u32 | version vector (codec::encode_vv) )
//! n_ranges u32 | n × ( first u64 | last u64 )      removed feed positions
//! crc32c u32 of everything before it
//! ```

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use asp_core::{Namespace, RangeSet, VersionVector};

use crate::codec;
use crate::error::OpenError;
use crate::fs::{Fs, read_all, write_atomically};

pub(crate) const BASE_FILE: &str = "base.vv";
const MAGIC: &[u8; 8] = b"ASPBASE\0";
const FORMAT: u32 = 1;

/// What the node holds beyond its log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Bases {
    pub by_namespace: BTreeMap<Namespace, VersionVector>,
    /// Feed positions whose segments compaction removed.
    pub removed: RangeSet,
}

impl Bases {
    /// Reads `base.vv` from `dir`; no file means nothing is held beyond the log.
    pub fn load(fs: &dyn Fs, dir: &Path) -> Result<Bases, OpenError> {
        let path = dir.join(BASE_FILE);
        let bytes = match read_all(fs, &path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Bases::default()),
            Err(source) => {
                return Err(OpenError::Io {
                    context: format!("cannot read {}", path.display()),
                    source,
                });
            }
        };
        Bases::decode(&bytes).map_err(|reason| OpenError::Corrupt {
            path,
            reason: format!(
                "{reason}; this file records the events compaction removed from the log and \
                 cannot be rebuilt from it: restore it from a backup of this data directory"
            ),
        })
    }

    /// Replaces `base.vv` in `dir` with this state.
    pub fn save(&self, fs: &dyn Fs, dir: &Path) -> io::Result<()> {
        write_atomically(fs, dir, BASE_FILE, &self.encode())
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT.to_le_bytes());
        out.extend_from_slice(&(self.by_namespace.len() as u32).to_le_bytes());
        for (namespace, vector) in &self.by_namespace {
            let name = namespace.as_str().as_bytes();
            out.push(name.len() as u8);
            out.extend_from_slice(name);
            let vv = codec::encode_vv(vector);
            out.extend_from_slice(&(vv.len() as u32).to_le_bytes());
            out.extend_from_slice(&vv);
        }
        out.extend_from_slice(&(self.removed.ranges().len() as u32).to_le_bytes());
        for &(first, last) in self.removed.ranges() {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&last.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Bases, String> {
        if bytes.len() < MAGIC.len() + 4 + 4 || &bytes[..MAGIC.len()] != MAGIC {
            return Err("not an asp base vector file (bad magic)".into());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        if stored != crc32c::crc32c(body) {
            return Err("checksum mismatch".into());
        }
        let mut at = MAGIC.len();
        let mut take = |n: usize, what: &str| -> Result<&[u8], String> {
            let end = at
                .checked_add(n)
                .filter(|&end| end <= body.len())
                .ok_or_else(|| format!("truncated {what}"))?;
            let out = &body[at..end];
            at = end;
            Ok(out)
        };
        let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let format = u32_of(take(4, "format")?);
        if format != FORMAT {
            return Err(format!(
                "base vector format {format} is not supported (this asp reads {FORMAT})"
            ));
        }
        let mut bases = Bases::default();
        let n = u32_of(take(4, "namespace count")?);
        for _ in 0..n {
            let len = take(1, "namespace")?[0] as usize;
            let name = std::str::from_utf8(take(len, "namespace")?)
                .ok()
                .and_then(|n| Namespace::new(n).ok())
                .ok_or("a namespace name is not valid")?;
            let vv_len = u32_of(take(4, "version vector")?) as usize;
            let vector = codec::decode_vv(take(vv_len, "version vector")?)
                .map_err(|e| format!("the base of namespace {name}: {e}"))?;
            if bases.by_namespace.insert(name, vector).is_some() {
                return Err("a namespace appears twice".into());
            }
        }
        let n = u32_of(take(4, "removed positions")?);
        for _ in 0..n {
            let first = u64_of(take(8, "removed positions")?);
            let last = u64_of(take(8, "removed positions")?);
            if first == 0 || first > last {
                return Err("a bad range of removed positions".into());
            }
            bases.removed.insert_range(first, last);
        }
        if at != body.len() {
            return Err("trailing bytes".into());
        }
        Ok(bases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::RealFs;
    use asp_core::NodeId;

    fn sample() -> Bases {
        let mut bases = Bases::default();
        let mut vv = VersionVector::new();
        vv.insert_range(NodeId::new(7).unwrap(), 1, 40);
        vv.insert_range(NodeId::new(7).unwrap(), 45, 50);
        vv.insert_range(NodeId::new(9).unwrap(), 3, 3);
        bases
            .by_namespace
            .insert(Namespace::new("app").unwrap(), vv);
        bases
            .by_namespace
            .insert(Namespace::new("empty").unwrap(), VersionVector::new());
        bases.removed.insert_range(1, 99);
        bases.removed.insert_range(200, 250);
        bases
    }

    #[test]
    fn bases_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Bases::load(&RealFs, dir.path()).unwrap(), Bases::default());
        sample().save(&RealFs, dir.path()).unwrap();
        assert_eq!(Bases::load(&RealFs, dir.path()).unwrap(), sample());
    }

    #[test]
    fn every_flipped_bit_and_every_cut_is_refused() {
        let bytes = sample().encode();
        for i in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[i / 8] ^= 1 << (i % 8);
            assert!(Bases::decode(&damaged).is_err(), "bit {i}");
        }
        for cut in 0..bytes.len() {
            assert!(Bases::decode(&bytes[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn a_damaged_file_fails_open_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        sample().save(&RealFs, dir.path()).unwrap();
        let path = dir.path().join(BASE_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let err = Bases::load(&RealFs, dir.path()).unwrap_err();
        assert!(matches!(err, OpenError::Corrupt { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains("base.vv"), "{message}");
        assert!(message.contains("checksum mismatch"), "{message}");
    }
}
