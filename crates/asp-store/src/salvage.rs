//! Damage in the feed log: telling a torn tail from corruption, and salvage.
//!
//! Only the last append to the log can be torn (under `fsync = "always"` each append is
//! one writer group, fsynced before the next one starts), and the first record of every
//! append carries [`FLAG_GROUP_START`]. So damage followed by an intact record that
//! starts a group is corruption, and the log refuses to open; damage after which only
//! records of the same, last group are intact is a tear, cut off as before.
//!
//! [`survey`] reads a whole segment and finds every intact record, before and after
//! damaged places: after a damaged frame it looks for the next offset where a frame
//! checks (cheap fields first: a length within the record limit and the bytes left,
//! known flags, a sequence number the damaged bytes could have held; then the CRC).
//!
//! [`salvage`] (`asp serve --salvage`) keeps every intact record of every damaged
//! segment with its sequence number, in new segment files split at the damage, moves
//! the damaged file to `damaged/`, and records the lost positions in `base.vv`'s
//! removed set (which already lets the log have gaps). The store then rebuilds the key
//! index from the log, so the lost dots leave the vectors and anti-entropy brings them
//! back from peers. A marker file (`log/SALVAGE`) makes it crash-safe: while it
//! exists the log refuses to open without `--salvage`, and salvage started again
//! finishes the job from the copies in `damaged/`.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use asp_core::{RangeSet, VersionVector};

use crate::base::Bases;
use crate::codec::{
    self, FLAG_GROUP_START, FLAG_TXN_END, FRAME_HEADER_BYTES, RECORD_BYTES_MAX, RECORD_FLAGS,
};
use crate::error::OpenError;
use crate::fs::{Fs, OpenMode, read_all, write_atomically};
use crate::index::Index;
use crate::log::{
    HEADER_GROUPS_MARKED, SEGMENT_HEADER_BYTES, check_header_bytes, header_flags,
    segment_header_with, segment_name,
};

/// The marker of a salvage under way, in the log directory.
pub(crate) const MARKER: &str = "SALVAGE";
/// Where damaged segment files go, in the data directory.
pub(crate) const DAMAGED_DIR: &str = "damaged";
/// The smallest frame a record can make: the frame header and a record's fixed fields.
const FRAME_BYTES_MIN: usize = FRAME_HEADER_BYTES + 46;

/// A stretch of intact records with consecutive sequence numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub start: u64,
    pub end: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    /// Records that start a writer group, and that end a batch.
    pub group_starts: u64,
    pub batch_ends: u64,
}

/// A damaged stretch of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub offset: u64,
    pub bytes: u64,
    pub reason: &'static str,
}

/// Every intact record of a segment and every damaged stretch.
#[derive(Debug, Default)]
pub(crate) struct Survey {
    pub runs: Vec<Run>,
    pub damage: Vec<Damage>,
    /// The header's flags (zero if the header is damaged).
    pub header_flags: u32,
}

impl Survey {
    /// Whether the damage can only be a torn last append: no intact record after the
    /// first damaged place starts a group. In a segment whose header says every append
    /// is marked, that is the whole rule: a tear may take the one marked record of the
    /// last append and leave later sectors of it intact (a disk need not write sectors
    /// in order). Segments created before appends were marked (header flag clear) may
    /// hold unmarked appends; there, if no intact record carries a mark either, a whole
    /// batch intact after the damage counts as corruption.
    pub fn is_torn_tail(&self) -> bool {
        let Some(first) = self.damage.first() else {
            return true;
        };
        let after = || self.runs.iter().filter(|r| r.start > first.offset);
        let later_group = after().any(|r| r.group_starts > 0);
        if later_group {
            return false;
        }
        if self.header_flags & HEADER_GROUPS_MARKED != 0 {
            return true;
        }
        let marked = self.runs.iter().any(|r| r.group_starts > 0);
        marked || !after().any(|r| r.batch_ends > 0)
    }

    /// Records intact after the first damaged place.
    pub fn records_after_damage(&self) -> u64 {
        let Some(first) = self.damage.first() else {
            return 0;
        };
        self.runs
            .iter()
            .filter(|r| r.start > first.offset)
            .map(|r| r.records)
            .sum()
    }
}

/// The record at `p` if its frame is intact: (frame bytes, flags, seq). `seq_ok` is
/// asked before the checksum is computed.
fn frame_at(bytes: &[u8], p: usize, seq_ok: impl Fn(u64) -> bool) -> Option<(usize, u8, u64)> {
    let header = bytes.get(p..p + FRAME_HEADER_BYTES + 9)?;
    let len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
    if !(FRAME_BYTES_MIN - FRAME_HEADER_BYTES..=RECORD_BYTES_MAX).contains(&len) {
        return None;
    }
    let total = FRAME_HEADER_BYTES + len;
    if p + total > bytes.len() {
        return None;
    }
    let flags = header[8];
    let seq = u64::from_le_bytes(header[9..17].try_into().unwrap());
    if flags & !RECORD_FLAGS != 0 || !seq_ok(seq) {
        return None;
    }
    match codec::check_frame(&bytes[p..p + total]) {
        codec::Frame::Complete { .. } => {}
        _ => return None,
    }
    codec::record_head(&bytes[p + FRAME_HEADER_BYTES..p + total]).ok()?;
    Some((total, flags, seq))
}

/// Finds every intact record of the segment `bytes` (the whole file) whose first
/// sequence number is `base`.
pub(crate) fn survey(bytes: &[u8], base: u64) -> Survey {
    let mut s = Survey::default();
    let len = bytes.len();
    let header_bytes = SEGMENT_HEADER_BYTES as usize;
    if len < header_bytes || check_header_bytes(&bytes[..header_bytes], base).is_err() {
        s.damage.push(Damage {
            offset: 0,
            bytes: len.min(header_bytes) as u64,
            reason: "damaged segment header",
        });
    } else {
        s.header_flags = header_flags(&bytes[..header_bytes]);
    }
    let mut p = header_bytes;
    let mut next_seq = base;
    let mut run: Option<Run> = None;
    while p < len {
        let expected = next_seq;
        let found = if run.is_some() || p == header_bytes {
            frame_at(bytes, p, |seq| seq == expected)
        } else {
            None
        };
        if let Some((total, flags, seq)) = found {
            let r = run.get_or_insert(Run {
                start: p as u64,
                end: p as u64,
                first_seq: seq,
                last_seq: seq,
                records: 0,
                group_starts: 0,
                batch_ends: 0,
            });
            r.end = (p + total) as u64;
            r.last_seq = seq;
            r.records += 1;
            r.group_starts += u64::from(flags & FLAG_GROUP_START != 0);
            r.batch_ends += u64::from(flags & FLAG_TXN_END != 0);
            next_seq = seq + 1;
            p += total;
            continue;
        }
        if bytes[p..].iter().all(|&b| b == 0) {
            // The end of written data (segments may be zero-padded).
            break;
        }
        s.runs.extend(run.take());
        // Resync: the next offset where an intact record with a sequence number the
        // damaged bytes could have held begins.
        let mut q = p + 1;
        let mut resumed = None;
        while q + FRAME_BYTES_MIN <= len {
            let most = expected + ((q - p) / FRAME_BYTES_MIN) as u64 + 1;
            if let Some(hit) = frame_at(bytes, q, |seq| seq >= expected && seq <= most) {
                resumed = Some((q, hit));
                break;
            }
            q += 1;
        }
        let reason = match codec::check_frame(&bytes[p..]) {
            codec::Frame::Complete { .. } => "record out of sequence or malformed",
            codec::Frame::Incomplete { .. } => "record cut short",
            codec::Frame::Zero => "zeros followed by data",
            codec::Frame::Corrupt(reason) => reason,
        };
        let end = resumed.map_or(len, |(q, _)| q);
        s.damage.push(Damage {
            offset: p as u64,
            bytes: (end - p) as u64,
            reason,
        });
        match resumed {
            Some((q, (_, _, seq))) => {
                p = q;
                next_seq = seq;
                run = Some(Run {
                    start: q as u64,
                    end: q as u64,
                    first_seq: seq,
                    last_seq: seq,
                    records: 0,
                    group_starts: 0,
                    batch_ends: 0,
                });
            }
            None => break,
        }
    }
    s.runs.extend(run.filter(|r| r.records > 0));
    s
}

/// What salvage found and did to one damaged segment.
#[derive(Clone, Debug)]
pub struct SalvagedSegment {
    /// The damaged file as it was in the log, and where it is now.
    pub segment: PathBuf,
    pub moved_to: PathBuf,
    pub damage: Vec<Damage>,
    /// Intact records kept, and feed positions lost (records that could not be read).
    pub records_kept: u64,
    pub positions_lost: RangeSet,
    pub bytes_lost: u64,
}

/// What a salvage (`--salvage`, [`StoreConfig::salvage`](crate::StoreConfig)) did; empty if no segment was damaged.
#[derive(Clone, Debug, Default)]
pub struct SalvageReport {
    pub segments: Vec<SalvagedSegment>,
}

impl SalvageReport {
    pub fn positions_lost(&self) -> u64 {
        self.segments.iter().map(|s| s.positions_lost.len()).sum()
    }
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> OpenError {
    move |source| OpenError::Io { context, source }
}

/// One damaged segment a salvage works on, as its marker line records it:
/// `name stamp last_pos is_last`.
struct Job {
    name: String,
    base: u64,
    /// Its copy is `damaged/<name>.<stamp>`.
    stamp: u64,
    /// The last feed position the segment covered.
    last_pos: u64,
    /// Whether it was the last segment (whose torn tail is not kept).
    is_last: bool,
}

impl Job {
    fn line(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.name,
            self.stamp,
            self.last_pos,
            u8::from(self.is_last)
        )
    }

    fn parse(line: &str) -> Option<Job> {
        let mut parts = line.split(' ');
        let name = parts.next()?.to_owned();
        let base = name.strip_suffix(".log")?.parse().ok()?;
        let stamp = parts.next()?.parse().ok()?;
        let last_pos = parts.next()?.parse().ok()?;
        let is_last = parts.next()? == "1";
        Some(Job {
            name,
            base,
            stamp,
            last_pos,
            is_last,
        })
    }
}

/// The records a damaged segment keeps: every run, less (in the last segment) a torn
/// last append after the last damaged place.
fn kept_runs(s: &Survey, is_last: bool) -> Vec<Run> {
    let mut runs = s.runs.clone();
    if is_last {
        let last_damage = s.damage.last().map_or(0, |d| d.offset);
        let later_group = runs
            .iter()
            .any(|r| r.start > last_damage && r.group_starts > 0);
        if !later_group {
            runs.retain(|r| r.start < last_damage);
        }
    }
    runs
}

/// Checks every segment of `data_dir/log` in full (sidecars are not trusted) and
/// salvages the damaged ones; see the module docs. `bases` is updated (and saved) with
/// the positions lost. Returns the report and whether a salvage was done or finished
/// (the caller then rebuilds the key index and calls [`finish`]).
pub(crate) fn salvage(
    fs: &dyn Fs,
    data_dir: &Path,
    bases: &mut Bases,
) -> Result<(SalvageReport, bool), OpenError> {
    let log_dir = data_dir.join("log");
    let damaged_dir = data_dir.join(DAMAGED_DIR);
    fs.create_dir_all(&log_dir)
        .map_err(io_err(format!("cannot create {}", log_dir.display())))?;
    let names = fs
        .list(&log_dir)
        .map_err(io_err(format!("cannot list {}", log_dir.display())))?;
    for name in &names {
        if name.ends_with(".salvage") {
            // A half-written file of an interrupted salvage: written again below.
            let _ = fs.remove(&log_dir.join(name));
        }
    }
    let marker = log_dir.join(MARKER);
    let jobs = match read_all(fs, &marker) {
        // An interrupted salvage: finish what its marker lists.
        Ok(bytes) => String::from_utf8_lossy(&bytes)
            .lines()
            .map(|l| {
                Job::parse(l).ok_or_else(|| OpenError::Corrupt {
                    path: marker.clone(),
                    reason: format!("a malformed line {l:?}; remove the file only if no segment named in it is missing from the log"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let jobs = find_damage(fs, &log_dir, &names)?;
            if jobs.is_empty() {
                return Ok((SalvageReport::default(), false));
            }
            // From here on the log refuses to open without --salvage.
            let text: String = jobs.iter().map(Job::line).collect();
            write_atomically(fs, &log_dir, MARKER, text.as_bytes())
                .map_err(io_err(format!("cannot write {}", marker.display())))?;
            jobs
        }
        Err(e) => return Err(io_err(format!("cannot read {}", marker.display()))(e)),
    };
    fs.create_dir_all(&damaged_dir)
        .map_err(io_err(format!("cannot create {}", damaged_dir.display())))?;
    let mut report = SalvageReport::default();
    for job in jobs {
        let in_log = log_dir.join(&job.name);
        let copy = damaged_dir.join(format!("{}.{}", job.name, job.stamp));
        // Once moved, the copy is the source (a file of the same name in the log may
        // be one this salvage wrote).
        let moved = fs
            .exists(&copy)
            .map_err(io_err(format!("cannot look at {}", copy.display())))?;
        let source = if moved { &copy } else { &in_log };
        let bytes =
            read_all(fs, source).map_err(io_err(format!("cannot read {}", source.display())))?;
        let s = survey(&bytes, job.base);
        let runs = kept_runs(&s, job.is_last);
        let mut lost = RangeSet::new();
        if job.last_pos >= job.base {
            lost.insert_range(job.base, job.last_pos);
        }
        let mut kept = RangeSet::new();
        for r in &runs {
            kept.insert_range(r.first_seq, r.last_seq);
        }
        let lost = lost.difference(&kept);
        // The lost positions first, so that the log may have gaps there.
        if !lost.is_subset(&bases.removed) {
            let mut next = bases.clone();
            next.removed.union_with(&lost);
            next.save(fs, data_dir)
                .map_err(io_err("cannot write base.vv".into()))?;
            *bases = next;
        }
        if !moved {
            fs.rename(&in_log, &copy)
                .and_then(|()| fs.sync_dir(&damaged_dir))
                .and_then(|()| fs.sync_dir(&log_dir))
                .map_err(io_err(format!("cannot move {} aside", in_log.display())))?;
        }
        match fs.remove(&in_log.with_extension("idx")) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io_err(format!(
                    "cannot remove the sidecar of {}",
                    in_log.display()
                ))(e));
            }
        }
        for r in &runs {
            write_run(fs, &log_dir, &bytes, r, s.header_flags)?;
        }
        fs.sync_dir(&log_dir)
            .map_err(io_err(format!("cannot sync {}", log_dir.display())))?;
        let bytes_lost = s.damage.iter().map(|d| d.bytes).sum();
        let records_kept = runs.iter().map(|r| r.records).sum();
        tracing::error!(
            segment = %in_log.display(),
            moved_to = %copy.display(),
            damage = ?s.damage,
            records_kept,
            positions_lost = lost.len(),
            bytes_lost,
            "salvaged a damaged log segment: its intact records are kept; the events at the lost positions come back from peers through anti-entropy"
        );
        report.segments.push(SalvagedSegment {
            segment: in_log,
            moved_to: copy,
            damage: s.damage,
            records_kept,
            positions_lost: lost,
            bytes_lost,
        });
    }
    Ok((report, true))
}

/// Reads every segment in full and lists the damaged ones (a torn tail of the last
/// one is not damage: opening the log cuts it).
fn find_damage(fs: &dyn Fs, log_dir: &Path, names: &[String]) -> Result<Vec<Job>, OpenError> {
    let mut bases: Vec<u64> = names
        .iter()
        .filter_map(|n| n.strip_suffix(".log")?.parse().ok())
        .collect();
    bases.sort_unstable();
    let stamp = crate::writer::wall_ms();
    let mut jobs = Vec::new();
    for (i, &base) in bases.iter().enumerate() {
        let name = segment_name(base);
        let path = log_dir.join(&name);
        let bytes =
            read_all(fs, &path).map_err(io_err(format!("cannot read {}", path.display())))?;
        let s = survey(&bytes, base);
        let is_last = i + 1 == bases.len();
        if s.damage.is_empty() || (is_last && s.is_torn_tail()) {
            continue;
        }
        let last_pos = match bases.get(i + 1) {
            Some(next) => next - 1,
            None => kept_runs(&s, true).last().map_or(base - 1, |r| r.last_seq),
        };
        jobs.push(Job {
            name,
            base,
            stamp,
            last_pos,
            is_last,
        });
    }
    Ok(jobs)
}

/// Writes one run of intact records as a segment of its own: the records unchanged but
/// for the flags of its first (starts a group) and last (ends a batch: a batch of which
/// only part survived keeps that part). Written under a temporary name, fsynced, then
/// renamed into place. The header keeps the damaged segment's flags: records copied
/// from a segment whose appends were not marked are no more marked in the new one.
fn write_run(
    fs: &dyn Fs,
    log_dir: &Path,
    bytes: &[u8],
    run: &Run,
    header_flags: u32,
) -> Result<(), OpenError> {
    let name = segment_name(run.first_seq);
    let tmp = log_dir.join(format!("{name}.salvage"));
    let mut out = segment_header_with(run.first_seq, header_flags).to_vec();
    let mut p = run.start as usize;
    while p < run.end as usize {
        let len = u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
        let total = FRAME_HEADER_BYTES + len;
        let mut frame = bytes[p..p + total].to_vec();
        let mut flags = frame[FRAME_HEADER_BYTES];
        if p == run.start as usize {
            flags |= FLAG_GROUP_START;
        }
        if p + total == run.end as usize {
            flags |= FLAG_TXN_END;
        }
        if flags != frame[FRAME_HEADER_BYTES] {
            frame[FRAME_HEADER_BYTES] = flags;
            let crc =
                crc32c::crc32c_append(crc32c::crc32c(&frame[0..4]), &frame[FRAME_HEADER_BYTES..]);
            frame[4..8].copy_from_slice(&crc.to_le_bytes());
        }
        out.extend_from_slice(&frame);
        p += total;
    }
    let file = fs
        .open(&tmp, OpenMode::Truncate)
        .map_err(io_err(format!("cannot create {}", tmp.display())))?;
    file.write_all_at(&out, 0)
        .and_then(|()| file.sync_data())
        .map_err(io_err(format!("cannot write {}", tmp.display())))?;
    drop(file);
    fs.rename(&tmp, &log_dir.join(&name))
        .map_err(io_err(format!("cannot rename {}", tmp.display())))
}

/// Takes the dots of the records salvage lost out of the base vectors, durably, before
/// the key index is rebuilt from the salvaged log (`indexed_seq` is how far the old
/// index reflects the log).
///
/// A peer's cover ([`crate::Store::cover`]) joins its whole namespace vector into the
/// base, dots whose events are in this node's log included; joined back into the
/// rebuilt vector on open, the base would go on claiming a lost record's dot, and no
/// peer would send it back. The lost records cannot be read, but the old key index
/// still names the event at each lost position that was a key's current version
/// there: those dots leave the bases. A lost event that was not current is
/// superseded by one that is still held or comes back, so a base may keep claiming
/// it. If the old index does not reflect every lost position, the bases are emptied
/// (the vector is then the log's alone; peers cover again what else the node holds).
/// Started again after a crash, this finds the same dots in an index not yet
/// cleared, and none in one rebuilt from the salvaged log.
pub(crate) fn forget_lost_dots(
    fs: &dyn Fs,
    data_dir: &Path,
    report: &SalvageReport,
    index: &Index,
    indexed_seq: u64,
    bases: &mut Bases,
) -> Result<(), OpenError> {
    let mut lost = RangeSet::new();
    for s in &report.segments {
        lost.union_with(&s.positions_lost);
    }
    if lost.is_empty() || bases.by_namespace.is_empty() {
        return Ok(());
    }
    let mut next = bases.clone();
    if lost.max().is_some_and(|max| max > indexed_seq) {
        tracing::warn!(
            indexed_seq,
            lost = ?lost,
            "the key index did not reflect every position salvage lost: the base vectors are dropped, peers cover again what the log no longer shows"
        );
        next.by_namespace.clear();
    } else {
        let mut dots: HashMap<String, VersionVector> = HashMap::new();
        let mut bad = None;
        index
            .scan(&[], None, |k, entry| {
                if !lost.contains(entry.seq) {
                    return true;
                }
                match codec::split_index_key(k) {
                    Some((namespace, _)) => {
                        dots.entry(namespace.to_owned())
                            .or_default()
                            .insert(entry.dot);
                        true
                    }
                    None => {
                        bad = Some(format!("malformed index key {k:?}"));
                        false
                    }
                }
            })
            .map_err(|e| OpenError::Corrupt {
                path: data_dir.join("index"),
                reason: e.to_string(),
            })?;
        if let Some(reason) = bad {
            return Err(OpenError::Corrupt {
                path: data_dir.join("index"),
                reason,
            });
        }
        for (namespace, base) in next.by_namespace.iter_mut() {
            if let Some(lost) = dots.get(namespace.as_str()) {
                *base = base.difference(lost);
            }
        }
        next.by_namespace.retain(|_, base| !base.is_empty());
    }
    if next != *bases {
        next.save(fs, data_dir)
            .map_err(io_err("cannot write base.vv".into()))?;
        tracing::warn!("dots of records salvage lost left the base vectors");
        *bases = next;
    }
    Ok(())
}

/// Ends a salvage once the key index no longer reflects the old log: removes the
/// marker.
pub(crate) fn finish(fs: &dyn Fs, data_dir: &Path) -> Result<(), OpenError> {
    let log_dir = data_dir.join("log");
    match fs.remove(&log_dir.join(MARKER)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("cannot remove the salvage marker".into())(e)),
    }
    fs.sync_dir(&log_dir)
        .map_err(io_err(format!("cannot sync {}", log_dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{EventRef, encode_record};
    use crate::log::segment_header;
    use asp_core::{ContentType, Dot, Hlc, NodeId};

    fn segment(groups: &[&[u64]]) -> Vec<u8> {
        let mut out = segment_header(1).to_vec();
        let mut seq = 1;
        for group in groups {
            for (i, batch_len) in group.iter().enumerate() {
                for j in 0..*batch_len {
                    let mut flags = 0;
                    if i == 0 && j == 0 {
                        flags |= FLAG_GROUP_START;
                    }
                    if j + 1 == *batch_len {
                        flags |= FLAG_TXN_END;
                    }
                    let event = EventRef {
                        namespace: "n",
                        key: "k",
                        put: Some((ContentType::Text, b"value")),
                        dot: Dot {
                            origin: NodeId::new(1).unwrap(),
                            counter: seq,
                        },
                        hlc: Hlc::from_raw(seq),
                        context: b"",
                        epoch: 0,
                        expires_ms: 0,
                    };
                    encode_record(&mut out, seq, flags, &event);
                    seq += 1;
                }
            }
        }
        out
    }

    #[test]
    fn an_intact_segment_is_one_run() {
        let bytes = segment(&[&[2], &[1, 3]]);
        let s = survey(&bytes, 1);
        assert!(s.damage.is_empty());
        assert_eq!(s.runs.len(), 1);
        assert_eq!((s.runs[0].first_seq, s.runs[0].last_seq), (1, 6));
        assert_eq!(s.runs[0].group_starts, 2);
    }

    #[test]
    fn damage_then_a_later_group_is_corruption() {
        let mut bytes = segment(&[&[2], &[1], &[1]]);
        // A byte inside the second group's record.
        let record = (bytes.len() - 32) / 4;
        bytes[32 + 2 * record + 20] ^= 0x40;
        let s = survey(&bytes, 1);
        assert_eq!(s.damage.len(), 1);
        assert_eq!(s.runs.len(), 2);
        assert_eq!((s.runs[1].first_seq, s.runs[1].last_seq), (4, 4));
        assert!(!s.is_torn_tail());
    }

    #[test]
    fn damage_inside_the_last_group_is_a_tear() {
        let mut bytes = segment(&[&[2], &[1, 2]]);
        let record = (bytes.len() - 32) / 5;
        // The last group's first record is lost, its later ones are intact.
        for b in &mut bytes[32 + 2 * record..32 + 3 * record] {
            *b = 0;
        }
        let s = survey(&bytes, 1);
        assert_eq!(s.damage.len(), 1);
        assert_eq!(s.records_after_damage(), 2);
        assert!(s.is_torn_tail());
    }

    /// Regression (seen in the power-cut test): the only append of a new segment, one
    /// write of two batches, torn so that its first sector (and with it the one marked
    /// record) is lost while a later sector with the whole second batch is kept.
    #[test]
    fn a_tear_that_takes_the_only_marked_record_is_a_tear() {
        let mut bytes = segment(&[&[1, 2]]);
        let record = (bytes.len() - 32) / 3;
        for b in &mut bytes[32..32 + record] {
            *b = 0;
        }
        let s = survey(&bytes, 1);
        assert_eq!(s.records_after_damage(), 2);
        assert_eq!(s.runs.iter().map(|r| r.group_starts).sum::<u64>(), 0);
        assert!(s.is_torn_tail());
        // The same bytes in a segment from before appends were marked cannot be told
        // from corruption.
        bytes[..32].copy_from_slice(&segment_header_with(1, 0));
        assert!(!survey(&bytes, 1).is_torn_tail());
    }

    #[test]
    fn unmarked_logs_count_a_later_whole_batch_as_corruption() {
        let mut bytes = segment(&[&[2], &[1], &[1]]);
        // As written before group starts were marked: clear the flag (and fix CRCs),
        // in a header without the flag that says appends are marked.
        bytes[..32].copy_from_slice(&segment_header_with(1, 0));
        let record = (bytes.len() - 32) / 4;
        for i in 0..4 {
            let p = 32 + i * record;
            bytes[p + 8] &= !FLAG_GROUP_START;
            let crc =
                crc32c::crc32c_append(crc32c::crc32c(&bytes[p..p + 4]), &bytes[p + 8..p + record]);
            bytes[p + 4..p + 8].copy_from_slice(&crc.to_le_bytes());
        }
        bytes[32 + 2 * record + 20] ^= 0x40;
        assert!(!survey(&bytes, 1).is_torn_tail());
        let mut torn = bytes.clone();
        torn.truncate(32 + 3 * record + 10);
        assert!(survey(&torn, 1).is_torn_tail());
    }
}
