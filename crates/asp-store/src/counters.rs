//! Which counters this node may still issue: a durable high-water mark per namespace.
//!
//! A dot `(node, counter)` names one event forever. Under `fsync = "never"` or
//! `"interval"` a machine crash can lose events of this node that peers already hold;
//! if the node then counted on from what its log still holds, it would issue those
//! counters again, and every peer would drop the new events as duplicates — a silent,
//! permanent divergence. So before the writer issues a counter under those modes it
//! makes sure a mark at or above it is durable in the file `counters` (under
//! `"always"` the log is durable before anyone sees a counter, and is its own
//! reservation): counters are reserved in blocks
//! (one append and one `fdatasync` per block, in practice per group that opens one),
//! and after a crash the node goes on after the mark, leaving the unused rest of the
//! block as a gap no event ever fills. A clean shutdown writes the exact marks, so a
//! clean restart leaves no gap.
//!
//! The mark also says which counters a remote event may carry with this node's own
//! origin: none above what this node issued (in this or an earlier life) — a peer
//! holding such a dot means another process runs with this node's id, or a data
//! directory restored from an older copy. Peers' summaries raise the mark: what they
//! hold of this node's own events was issued by an earlier life of it
//! ([`Counters::claim`]).
//!
//! The file: a header (magic, format), then records `len u32 | crc32c(body) u32 |
//! body`, body `namespace (u8 length + bytes) | mark u64`. The last record of a
//! namespace holds its mark. A torn last record is cut (its block was never used: the
//! writer waits for the fsync). Any other damage cannot be trusted: every mark is then
//! raised by [`DAMAGE_JUMP`] above anything the log shows, which is always safe.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use asp_core::Namespace;

use crate::error::OpenError;
use crate::fs::{Fs, FsFile, OpenMode, write_atomically};

const FILE: &str = "counters";
const MAGIC: &[u8; 8] = b"ASPCNTR\0";
const FORMAT: u32 = 1;
const HEADER_BYTES: u64 = 12;
/// Counters reserved at a time beyond what a group needs.
pub(crate) const BLOCK: u64 = 1 << 16;
/// How far every mark jumps when the file is damaged (its marks cannot be trusted).
pub(crate) const DAMAGE_JUMP: u64 = 1 << 32;
/// Peers' claims on this node's counters above this are ignored (and logged): no node
/// issues that many events, and a mark there would leave no room to count.
pub(crate) const CLAIM_MAX: u64 = 1 << 62;
/// The file is rewritten once it holds this many more records than namespaces.
const REWRITE_SLACK: usize = 4096;

/// The durable marks, and the open file they are appended to.
pub(crate) struct Counters {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    file: Box<dyn FsFile>,
    len: u64,
    records: usize,
    /// Per namespace: counters up to here may have been issued (in this life or an
    /// earlier one) and are never issued again.
    floor: HashMap<Namespace, u64>,
    /// Per namespace: the highest counter issued in this life (at open: the highest
    /// the log holds).
    issued: HashMap<Namespace, u64>,
    /// Per namespace: the durable mark (at least the floor and what was issued):
    /// counters up to here may be issued without another fsync.
    reserved: HashMap<Namespace, u64>,
}

impl Counters {
    /// Opens (or creates) the file in `dir`. `log_max` gives, per namespace, the highest
    /// counter of this node's the log (and base) still hold: used only when the file is
    /// damaged or missing in a directory that already holds events.
    pub fn open(
        fs: Arc<dyn Fs>,
        dir: &Path,
        log_max: &HashMap<Namespace, u64>,
    ) -> Result<Counters, OpenError> {
        let path = dir.join(FILE);
        let io_err = |what: &str| {
            let context = format!("{what} {}", path.display());
            move |source| OpenError::Io { context, source }
        };
        let existed = fs.exists(&path).map_err(io_err("cannot look for"))?;
        let mode = if existed {
            OpenMode::Write
        } else {
            OpenMode::CreateNew
        };
        let file = fs.open(&path, mode).map_err(io_err("cannot open"))?;
        let mut counters = Counters {
            fs,
            dir: dir.to_owned(),
            file,
            len: HEADER_BYTES,
            records: 0,
            floor: HashMap::new(),
            issued: log_max.clone(),
            reserved: HashMap::new(),
        };
        let file_len = counters.file.len().map_err(io_err("cannot stat"))?;
        let mut damaged = None;
        if file_len < HEADER_BYTES {
            let mut header = Vec::with_capacity(HEADER_BYTES as usize);
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(&FORMAT.to_le_bytes());
            counters
                .file
                .set_len(0)
                .and_then(|()| counters.file.write_all_at(&header, 0))
                .and_then(|()| counters.file.sync_data())
                .and_then(|()| counters.fs.sync_dir(dir))
                .map_err(io_err("cannot initialise"))?;
            // A directory that holds events but no marks: written by an asp without
            // this file (an upgrade), or the file was lost. What the log holds is all an
            // upgrade ever issued (its own counters came from the log); a lost file
            // cannot be told apart, so the marks start past the log.
            if existed && file_len > 0 {
                damaged = Some("the file is shorter than its header".to_owned());
            }
        } else {
            let mut bytes = vec![0; file_len as usize];
            counters
                .file
                .read_exact_at(&mut bytes, 0)
                .map_err(io_err("cannot read"))?;
            if &bytes[0..8] != MAGIC {
                return Err(OpenError::Corrupt {
                    path,
                    reason: "not an asp counters file (bad magic)".into(),
                });
            }
            let format = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
            if format != FORMAT {
                return Err(OpenError::Corrupt {
                    path,
                    reason: format!(
                        "counters format {format} is not supported (this asp reads {FORMAT})"
                    ),
                });
            }
            let (end, problem) = counters.load(&bytes);
            counters.len = end;
            if let Some((offset, reason, after)) = problem {
                if after {
                    damaged = Some(format!(
                        "{reason} at offset {offset}, with records after it"
                    ));
                } else {
                    tracing::warn!(path = %path.display(), offset, reason, "counters file ends in a torn record; cutting it off");
                }
                counters
                    .file
                    .set_len(end)
                    .and_then(|()| counters.file.sync_data())
                    .map_err(io_err("cannot truncate"))?;
            }
        }
        if let Some(reason) = damaged {
            // Going on past every mark is always safe; counting from the log is not.
            tracing::error!(path = %path.display(), reason, jump = DAMAGE_JUMP, "counters file is damaged; this node's counters go on past a safety gap");
            let mut names: Vec<&Namespace> = log_max.keys().collect();
            names.extend(counters.floor.keys());
            names.sort();
            names.dedup();
            let raised: Vec<(Namespace, u64)> = names
                .into_iter()
                .map(|ns| {
                    let known = counters
                        .floor
                        .get(ns)
                        .copied()
                        .max(log_max.get(ns).copied())
                        .unwrap_or(0);
                    (ns.clone(), known.saturating_add(DAMAGE_JUMP))
                })
                .collect();
            counters
                .rewrite(raised.clone())
                .map_err(io_err("cannot rewrite"))?;
            counters.floor.extend(raised);
        }
        Ok(counters)
    }

    /// Goes on past a safety gap ([`DAMAGE_JUMP`]) in every namespace, durably: after
    /// a salvage lost records that may have been this node's newest events.
    pub fn jump_all(&mut self, log_max: &HashMap<Namespace, u64>) -> io::Result<()> {
        let mut names: Vec<Namespace> = log_max.keys().cloned().collect();
        for ns in self.floor.keys().chain(self.issued.keys()) {
            if !names.contains(ns) {
                names.push(ns.clone());
            }
        }
        let raised: Vec<(Namespace, u64)> = names
            .into_iter()
            .map(|ns| {
                let mark = self.known(&ns).saturating_add(DAMAGE_JUMP);
                (ns, mark)
            })
            .collect();
        if raised.is_empty() {
            return Ok(());
        }
        let mut all = self.reserved.clone();
        all.extend(raised.iter().cloned());
        self.rewrite(all.into_iter().collect())?;
        self.floor.extend(raised);
        Ok(())
    }

    /// Reads the records; returns where the intact ones end and, if something bad
    /// follows, (offset, reason, whether intact records come after it).
    fn load(&mut self, bytes: &[u8]) -> (u64, Option<(u64, &'static str, bool)>) {
        let mut at = HEADER_BYTES as usize;
        while at < bytes.len() {
            match decode_record(&bytes[at..]) {
                Ok((ns, mark, used)) => {
                    self.floor.insert(ns.clone(), mark);
                    self.reserved.insert(ns, mark);
                    self.records += 1;
                    at += used;
                }
                Err(reason) => {
                    let after = (at + 1..bytes.len()).any(|p| decode_record(&bytes[p..]).is_ok());
                    return (at as u64, Some((at as u64, reason, after)));
                }
            }
        }
        (at as u64, None)
    }

    /// The counter this node's next event in `namespace` gets: past everything issued
    /// in this life and every earlier one.
    pub fn next(&self, namespace: &Namespace) -> u64 {
        self.known(namespace).saturating_add(1)
    }

    /// The highest counter of `namespace` that this node issued, in this life or an
    /// earlier one (as far as it knows).
    fn known(&self, namespace: &Namespace) -> u64 {
        let issued = self.issued.get(namespace).copied().unwrap_or(0);
        issued.max(self.floor.get(namespace).copied().unwrap_or(0))
    }

    /// Whether this node may have issued `counter` in `namespace`: a remote event of
    /// this node's own origin with a counter above that is not one of its events.
    pub fn may_have_issued(&self, namespace: &Namespace, counter: u64) -> bool {
        counter <= self.known(namespace)
    }

    /// Makes sure the next `count` counters of each namespace may be issued: marks
    /// below are raised (with a block to spare) in one durable append. On failure
    /// nothing changed in memory (the file may hold a torn record, cut on open).
    pub fn reserve(&mut self, needs: &HashMap<Namespace, u64>) -> io::Result<()> {
        let raised: Vec<(Namespace, u64)> = needs
            .iter()
            .filter_map(|(ns, &count)| {
                let up_to = self.known(ns).saturating_add(count);
                let short = self.reserved.get(ns).is_none_or(|&r| r < up_to);
                short.then(|| (ns.clone(), up_to.saturating_add(BLOCK)))
            })
            .collect();
        if raised.is_empty() {
            return Ok(());
        }
        self.append(&raised)?;
        for (ns, mark) in raised {
            self.reserved.insert(ns, mark);
        }
        Ok(())
    }

    /// Records that counters of `namespace` up to `last` are issued. The caller
    /// reserved them first, unless the log itself is durable before anyone sees them
    /// (`fsync = "always"`).
    pub fn issued(&mut self, namespace: &Namespace, last: u64) {
        let issued = self.issued.entry(namespace.clone()).or_default();
        *issued = (*issued).max(last);
    }

    /// A group that issued counters could not be appended (a full disk): what it
    /// issued goes back to `last`, the highest counter of this node the namespace's
    /// vector holds without it. The reservation stays.
    pub fn take_back(&mut self, namespace: &Namespace, last: u64) {
        if let Some(issued) = self.issued.get_mut(namespace) {
            *issued = (*issued).min(last);
        }
    }

    /// A peer holds this node's own events of `namespace` up to `counter`. If that is
    /// past everything this node knows it issued, an earlier life of it issued them (a
    /// data directory restored from an older copy, or a crash that lost them), or
    /// another process runs with its id: either way they are never issued again.
    /// Returns the highest counter this node knew of before, if the claim raised it.
    pub fn claim(&mut self, namespace: &Namespace, counter: u64) -> io::Result<Option<u64>> {
        let known = self.known(namespace);
        if counter <= known || counter > CLAIM_MAX {
            return Ok(None);
        }
        if self.reserved.get(namespace).is_none_or(|&r| r < counter) {
            self.append(&[(namespace.clone(), counter)])?;
            self.reserved.insert(namespace.clone(), counter);
        }
        self.floor.insert(namespace.clone(), counter);
        Ok(Some(known))
    }

    /// On a clean stop, with everything issued durable in the log: marks go back to
    /// what was issued, so the next start leaves no gap.
    pub fn settle(&mut self) -> io::Result<()> {
        let exact: Vec<(Namespace, u64)> = self
            .reserved
            .keys()
            .map(|ns| (ns.clone(), self.known(ns)))
            .collect();
        if exact.iter().all(|(ns, m)| self.reserved.get(ns) == Some(m)) {
            return Ok(());
        }
        self.rewrite(exact)
    }

    fn append(&mut self, marks: &[(Namespace, u64)]) -> io::Result<()> {
        if self.records > self.reserved.len() + REWRITE_SLACK {
            let mut all = self.reserved.clone();
            all.extend(marks.iter().cloned());
            return self.rewrite(all.into_iter().collect());
        }
        let mut buf = Vec::new();
        for (ns, mark) in marks {
            encode_record(&mut buf, ns, *mark);
        }
        self.file.write_all_at(&buf, self.len)?;
        self.file.sync_data()?;
        self.len += buf.len() as u64;
        self.records += marks.len();
        Ok(())
    }

    /// Replaces the file with one record per namespace (temporary file, fsync,
    /// rename, fsync of the directory).
    fn rewrite(&mut self, marks: Vec<(Namespace, u64)>) -> io::Result<()> {
        let mut buf = Vec::new();
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&FORMAT.to_le_bytes());
        for (ns, mark) in &marks {
            encode_record(&mut buf, ns, *mark);
        }
        write_atomically(self.fs.as_ref(), &self.dir, FILE, &buf)?;
        self.file = self.fs.open(&self.dir.join(FILE), OpenMode::Write)?;
        self.len = buf.len() as u64;
        self.records = marks.len();
        for (ns, mark) in marks {
            self.reserved.insert(ns, mark);
        }
        Ok(())
    }
}

fn encode_record(buf: &mut Vec<u8>, namespace: &Namespace, mark: u64) {
    let name = namespace.as_str().as_bytes();
    let mut body = Vec::with_capacity(1 + name.len() + 8);
    body.push(name.len() as u8);
    body.extend_from_slice(name);
    body.extend_from_slice(&mark.to_le_bytes());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    buf.extend_from_slice(&body);
}

fn decode_record(bytes: &[u8]) -> Result<(Namespace, u64, usize), &'static str> {
    if bytes.len() < 8 {
        return Err("incomplete record");
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    if !(10..=1 + 255 + 8).contains(&len) {
        return Err("bad record length");
    }
    if bytes.len() < 8 + len {
        return Err("incomplete record");
    }
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let body = &bytes[8..8 + len];
    if crc32c::crc32c(body) != crc {
        return Err("checksum mismatch");
    }
    let name_len = body[0] as usize;
    if 1 + name_len + 8 != len {
        return Err("bad record layout");
    }
    let name = std::str::from_utf8(&body[1..1 + name_len]).map_err(|_| "namespace is not UTF-8")?;
    let ns = Namespace::new(name).map_err(|_| "invalid namespace")?;
    let mark = u64::from_le_bytes(body[1 + name_len..].try_into().expect("8 bytes"));
    Ok((ns, mark, 8 + len))
}
