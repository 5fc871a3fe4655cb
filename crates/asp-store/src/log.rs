//! The feed: a segmented, append-only log of framed records, the node's durable record
//! of every event it holds and the source of truth for everything else on disk.
//!
//! A segment file `<first seq, 20 digits>.log` starts with a 32-byte header, then
//! frames back to back (see [`crate::codec`]). Only the last segment is ever written.
//! Once it holds `segment_bytes_max` bytes or more, the writer seals it before its next
//! append (so a segment may pass that size by one writer group): fsynced, and given a
//! sidecar `.idx` file holding its sparse index, so that opening a large log reads only
//! the sidecars and the last segment. The byte layouts are in docs/STORAGE.md.
//!
//! The sparse index maps a sequence number to a file position every
//! [`SPARSE_EVERY_BYTES`], and keeps for each such block a small Bloom filter of the
//! namespaces in it, so that a per-namespace change feed skips blocks that cannot hold
//! its events.
//!
//! Size: one file format — the segment and sidecar layouts, opening and scanning a
//! segment (torn tails), and reading it back — kept together so that every offset the
//! format defines is read and written in one file.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use asp_core::RangeSet;
use bytes::Bytes;

use crate::codec::{self, FLAG_TXN_END, FRAME_HEADER_BYTES, Frame, Record};
use crate::error::{OpenError, ReadError};
use crate::fs::{Fs, FsFile, OpenMode, read_all};

pub(crate) const SEGMENT_HEADER_BYTES: u64 = 32;
const SEGMENT_MAGIC: &[u8; 8] = b"ASPFEED\0";
const SEGMENT_FORMAT: u32 = 1;
/// Header flag (bytes 12..16, covered by the header CRC; zero in segments written
/// before it existed): the first record of every append to this segment carries
/// [`FLAG_GROUP_START`](crate::codec::FLAG_GROUP_START), so a tear can be told from
/// corruption by the records alone (see crate::salvage).
pub(crate) const HEADER_GROUPS_MARKED: u32 = 1;
const SIDECAR_MAGIC: &[u8; 8] = b"ASPSIDX\0";
/// A sparse index entry (and a namespace filter) every this many bytes of log.
pub(crate) const SPARSE_EVERY_BYTES: u64 = 64 << 10;
/// Bytes read from a segment at a time.
const READ_CHUNK_BYTES: usize = 256 << 10;
/// [`Log::read_many_at`] reads across a gap this small between two frames rather than
/// make a second call.
const COALESCE_GAP_BYTES: u64 = 4 << 10;

/// How far the feed is visible to readers: every event up to `seq`, which ends at
/// `offset` in segment `segment`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FeedHead {
    pub seq: u64,
    pub(crate) segment: u64,
    pub(crate) offset: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SparseEntry {
    pub seq: u64,
    pub offset: u64,
    pub ns_bloom: u64,
}

/// Two bits of a 64-bit filter for a namespace name.
pub(crate) fn ns_bloom_bits(namespace: &[u8]) -> u64 {
    // FNV-1a: tiny and good enough to spread a handful of names over 64 bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in namespace {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (1 << (h & 63)) | (1 << ((h >> 6) & 63))
}

pub(crate) struct Segment {
    /// The sequence number of its first record; also its name.
    pub base: u64,
    pub path: PathBuf,
    pub file: Box<dyn FsFile>,
    /// Bytes of valid data, header included. Grows only while the segment is active.
    len: AtomicU64,
    /// The last sequence number held (`base - 1` while empty).
    last_seq: AtomicU64,
    sparse: Mutex<Vec<SparseEntry>>,
}

impl Segment {
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }
}

/// What opening the log found and repaired.
#[derive(Debug, Default)]
pub(crate) struct Recovery {
    pub torn_tail: Option<TornTail>,
}

/// An incomplete end of the log, cut off on open.
#[derive(Debug, Clone)]
pub struct TornTail {
    pub segment: PathBuf,
    pub offset: u64,
    pub dropped_bytes: u64,
    /// Whole records dropped because the batch they belonged to was not complete.
    pub dropped_records: u64,
    pub reason: &'static str,
}

pub(crate) struct Log {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    segments: RwLock<Vec<Arc<Segment>>>,
}

pub(crate) fn segment_name(base: u64) -> String {
    format!("{base:020}.log")
}

fn corrupt(path: &Path, reason: impl Into<String>) -> OpenError {
    OpenError::Corrupt {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn io_open(context: impl Into<String>) -> impl FnOnce(io::Error) -> OpenError {
    let context = context.into();
    move |source| OpenError::Io { context, source }
}

impl Log {
    /// Opens (or creates) the log in `dir`, cutting off a torn tail. Between segments
    /// there may be gaps, but only of positions in `removed` (whose segments compaction
    /// removed): any other gap means a lost segment file, and is refused.
    pub fn open(
        fs: &Arc<dyn Fs>,
        dir: &Path,
        removed: &RangeSet,
        strict_tail: bool,
    ) -> Result<(Log, Recovery), OpenError> {
        fs.create_dir_all(dir)
            .map_err(io_open(format!("cannot create {}", dir.display())))?;
        let mut bases = Vec::new();
        for name in fs
            .list(dir)
            .map_err(io_open(format!("cannot list {}", dir.display())))?
        {
            if let Some(stem) = name.strip_suffix(".log") {
                let base = stem
                    .parse::<u64>()
                    .ok()
                    .filter(|b| *b > 0 && stem.len() == 20)
                    .ok_or_else(|| {
                        corrupt(
                            &dir.join(&name),
                            "unexpected file name in the log directory",
                        )
                    })?;
                bases.push(base);
            }
        }
        bases.sort_unstable();

        let mut recovery = Recovery::default();
        let mut segments = Vec::with_capacity(bases.len().max(1));
        // Segments follow each other without gaps, except where compaction removed
        // whole segments: any other gap is a lost segment file.
        let mut expected_base = 1;
        for (i, &base) in bases.iter().enumerate() {
            let path = dir.join(segment_name(base));
            if base < expected_base {
                return Err(corrupt(
                    &path,
                    format!(
                        "segment starts at sequence {base}, but the previous one ends at {}",
                        expected_base - 1
                    ),
                ));
            }
            if base > expected_base
                && !RangeSet::from_ranges([(expected_base, base - 1)]).is_subset(removed)
            {
                let reason = match i {
                    0 => format!(
                        "the log starts at sequence {base}, but compaction removed no segment \
                         before it: a segment file is missing"
                    ),
                    _ => format!(
                        "segment starts at sequence {base}, but the previous one ends at {}, \
                         and compaction removed no segment in between: a segment file is missing",
                        expected_base - 1
                    ),
                };
                return Err(corrupt(&path, reason));
            }
            let last = i + 1 == bases.len();
            let segment = if last {
                let (segment, torn) = open_active(fs.as_ref(), &path, base, strict_tail)?;
                recovery.torn_tail = torn;
                segment
            } else {
                open_sealed(fs.as_ref(), &path, base)?
            };
            expected_base = segment.last_seq() + 1;
            segments.push(Arc::new(segment));
        }
        if segments.is_empty() {
            if let Some(last) = removed.max() {
                return Err(corrupt(
                    dir,
                    format!(
                        "holds no log segment, but compaction removed sequence numbers up to \
                         {last}: the log is missing"
                    ),
                ));
            }
            let segment = create_segment(fs.as_ref(), dir, 1).map_err(io_open(format!(
                "cannot create a log segment in {}",
                dir.display()
            )))?;
            segments.push(Arc::new(segment));
        }
        Ok((
            Log {
                fs: fs.clone(),
                dir: dir.to_owned(),
                segments: RwLock::new(segments),
            },
            recovery,
        ))
    }

    pub fn active(&self) -> Arc<Segment> {
        self.segments
            .read()
            .unwrap()
            .last()
            .cloned()
            .expect("the log always has a segment")
    }

    pub fn first_seq(&self) -> u64 {
        self.segments.read().unwrap()[0].base
    }

    /// The last sequence number written (not necessarily durable or visible).
    pub fn last_seq(&self) -> u64 {
        self.active().last_seq()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.read().unwrap().len()
    }

    pub fn total_bytes(&self) -> u64 {
        self.segments.read().unwrap().iter().map(|s| s.len()).sum()
    }

    /// The head covering everything written so far.
    pub fn written_head(&self) -> FeedHead {
        let active = self.active();
        FeedHead {
            seq: active.last_seq(),
            segment: active.base,
            offset: active.len(),
        }
    }

    /// Writes `buf` (whole frames ending at a batch boundary) at the end of the active
    /// segment and publishes the new end. Only the writer calls this. On an error the
    /// segment's end stays where it was; part of `buf` may be in the file after it
    /// ([`Log::cut_back`] removes it).
    pub fn append(
        &self,
        segment: &Segment,
        buf: &[u8],
        last_seq: u64,
        sparse: &SparseUpdate,
    ) -> io::Result<()> {
        let at = segment.len();
        segment.file.write_all_at(buf, at)?;
        {
            let mut entries = segment.sparse.lock().unwrap();
            if let Some(last) = entries.last_mut() {
                last.ns_bloom |= sparse.current_bloom;
            }
            entries.extend_from_slice(&sparse.new_entries);
        }
        segment.len.store(at + buf.len() as u64, Ordering::Release);
        segment.last_seq.store(last_seq, Ordering::Release);
        Ok(())
    }

    /// Cuts the active segment's file back to its published end: what a failed append
    /// left after it must not stay behind a later append.
    pub fn cut_back(&self, segment: &Segment) -> io::Result<()> {
        segment.file.set_len(segment.len())
    }

    /// Seals the active segment and starts the next one. Whatever the fsync mode, the
    /// sealed segment is fsynced first: a later segment must never exist on disk after
    /// an earlier one that a crash could still tear.
    pub fn rotate(&self) -> io::Result<Arc<Segment>> {
        let old = self.active();
        old.file.sync_data()?;
        write_sidecar(self.fs.as_ref(), &old)?;
        let new = Arc::new(create_segment(
            self.fs.as_ref(),
            &self.dir,
            old.last_seq() + 1,
        )?);
        self.segments.write().unwrap().push(new.clone());
        Ok(new)
    }

    /// Every segment but the active one, oldest first.
    pub fn sealed_segments(&self) -> Vec<Arc<Segment>> {
        let segments = self.segments.read().unwrap();
        segments[..segments.len() - 1].to_vec()
    }

    /// A cursor at the start of `segment`, and the head that ends reading at its end.
    pub fn segment_cursor(&self, segment: &Arc<Segment>) -> (LogCursor, FeedHead) {
        let cursor = LogCursor {
            segment: segment.clone(),
            offset: SEGMENT_HEADER_BYTES,
            next_seq: segment.base,
            target: segment.base,
        };
        let head = FeedHead {
            seq: segment.last_seq(),
            segment: segment.base,
            offset: segment.len(),
        };
        (cursor, head)
    }

    /// Deletes a sealed segment's files, its sidecar first (a crash in between leaves
    /// a segment without its sidecar, which opening rebuilds by scanning, rather than a
    /// stray sidecar), and makes the deletion durable. The segment stays readable, by
    /// the log and by readers that hold it, through its open file until
    /// [`Log::forget_segment`]; nothing opens a segment by path after the log is open.
    pub fn delete_segment_files(&self, segment: &Segment) -> io::Result<()> {
        assert_ne!(
            segment.base,
            self.active().base,
            "the active segment is never removed"
        );
        match self.fs.remove(&segment.path.with_extension("idx")) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.fs.remove(&segment.path)?;
        self.fs.sync_dir(&self.dir)
    }

    /// Drops a deleted segment from the log: seeks and reads by position no longer find
    /// it. Readers that hold it keep reading it.
    pub fn forget_segment(&self, base: u64) {
        self.segments.write().unwrap().retain(|s| s.base != base);
    }

    fn segment_at(&self, base: u64) -> Option<Arc<Segment>> {
        let segments = self.segments.read().unwrap();
        let idx = segments.partition_point(|s| s.base <= base);
        (idx > 0 && segments[idx - 1].base == base).then(|| segments[idx - 1].clone())
    }

    /// The segment after `base`, if any.
    fn segment_after(&self, base: u64) -> Option<Arc<Segment>> {
        let segments = self.segments.read().unwrap();
        let idx = segments.partition_point(|s| s.base <= base);
        segments.get(idx).cloned()
    }

    /// A cursor at the first record with a sequence number `>= seq`. Positions of
    /// removed segments (below the first one, or in a gap) are skipped: the cursor
    /// starts at the next record the log holds.
    pub fn seek(&self, seq: u64) -> LogCursor {
        let segments = self.segments.read().unwrap();
        let mut idx = segments
            .partition_point(|s| s.base <= seq)
            .saturating_sub(1);
        // In a gap after a sealed segment: start at the next one.
        if idx + 1 < segments.len() && segments[idx].last_seq() < seq {
            idx += 1;
        }
        let segment = segments[idx].clone();
        drop(segments);
        let (offset, next_seq) = {
            let sparse = segment.sparse.lock().unwrap();
            let i = sparse.partition_point(|e| e.seq <= seq).saturating_sub(1);
            sparse
                .get(i)
                .map_or((SEGMENT_HEADER_BYTES, segment.base), |e| (e.offset, e.seq))
        };
        LogCursor {
            segment,
            offset,
            next_seq,
            target: seq,
        }
    }

    /// Reads the record of one frame at a known position.
    pub fn read_at(&self, position: codec::LogPosition) -> Result<Record, ReadError> {
        let segment = self.segment_at(position.segment).ok_or_else(|| {
            ReadError::Corrupt(format!("log segment {} is missing", position.segment))
        })?;
        let frame = read_bytes(
            &segment,
            position.offset as u64,
            position.frame_len as usize,
        )?;
        record_of_frame(&segment, position, frame)
    }

    /// Reads the records at `positions`, returned in the same order. Frames of a
    /// segment that lie close together (at most [`COALESCE_GAP_BYTES`] apart, at most
    /// [`READ_CHUNK_BYTES`] in all) are read with one call: a namespace written in key
    /// order is read in key order with a call per run of frames rather than per frame.
    pub fn read_many_at(&self, positions: &[codec::LogPosition]) -> Result<Vec<Record>, ReadError> {
        let mut order: Vec<usize> = (0..positions.len()).collect();
        order.sort_unstable_by_key(|&i| (positions[i].segment, positions[i].offset));
        let mut out: Vec<Option<Record>> = (0..positions.len()).map(|_| None).collect();
        let mut i = 0;
        while i < order.len() {
            let first = positions[order[i]];
            let segment = self.segment_at(first.segment).ok_or_else(|| {
                ReadError::Corrupt(format!("log segment {} is missing", first.segment))
            })?;
            let start = first.offset as u64;
            let mut end = start + first.frame_len as u64;
            let mut j = i + 1;
            while let Some(&k) = order.get(j) {
                let p = positions[k];
                let (from, to) = (p.offset as u64, p.offset as u64 + p.frame_len as u64);
                if p.segment != first.segment
                    || from > end + COALESCE_GAP_BYTES
                    || to.max(end) - start > READ_CHUNK_BYTES as u64
                {
                    break;
                }
                end = end.max(to);
                j += 1;
            }
            let chunk = read_bytes(&segment, start, (end - start) as usize)?;
            for &k in &order[i..j] {
                let p = positions[k];
                let from = (p.offset as u64 - start) as usize;
                let frame = chunk.slice(from..from + p.frame_len as usize);
                out[k] = Some(record_of_frame(&segment, p, frame)?);
            }
            i = j;
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every position is read"))
            .collect())
    }

    /// Reads records from `cursor` up to `head`: at most `limit` records and about
    /// `bytes_max` bytes, only those `filter` wants (told from each record's head, so
    /// the others are never decoded). Returns the records and leaves the cursor after
    /// the last record looked at.
    pub fn read(
        &self,
        cursor: &mut LogCursor,
        head: FeedHead,
        filter: ReadFilter<'_>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<(codec::LogPosition, Record)>, ReadError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let namespace = match filter {
            ReadFilter::Namespace(ns) => Some(ns),
            _ => None,
        };
        let bloom = namespace.map(|ns| ns_bloom_bits(ns.as_bytes()));
        while out.len() < limit && bytes < bytes_max && cursor.next_seq <= head.seq {
            let end = if cursor.segment.base == head.segment {
                head.offset
            } else if cursor.segment.base < head.segment {
                cursor.segment.len()
            } else {
                break;
            };
            if cursor.offset >= end {
                match self.segment_after(cursor.segment.base) {
                    Some(next) if next.base <= head.segment => {
                        cursor.offset = SEGMENT_HEADER_BYTES;
                        cursor.next_seq = next.base;
                        cursor.segment = next;
                        continue;
                    }
                    _ => break,
                }
            }
            if let Some(bits) = bloom {
                // Skip whole blocks whose namespace filter rules this namespace out.
                let sparse = cursor.segment.sparse.lock().unwrap();
                let i = sparse
                    .partition_point(|e| e.offset <= cursor.offset)
                    .saturating_sub(1);
                if let (Some(block), Some(next)) = (sparse.get(i), sparse.get(i + 1))
                    && block.ns_bloom & bits != bits
                    && next.offset <= end
                    && block.offset <= cursor.offset
                {
                    cursor.offset = next.offset;
                    cursor.next_seq = next.seq;
                    continue;
                }
            }
            let want = ((end - cursor.offset) as usize).min(READ_CHUNK_BYTES);
            let chunk = read_bytes(&cursor.segment, cursor.offset, want)?;
            let mut p = 0;
            while p < chunk.len() && out.len() < limit && bytes < bytes_max {
                match codec::check_frame(&chunk[p..]) {
                    Frame::Complete { total } => {
                        let body = chunk.slice(p + FRAME_HEADER_BYTES..p + total);
                        let head_fields =
                            codec::record_head(&body).map_err(|e| corrupt_read(cursor, p, e.0))?;
                        if head_fields.seq != cursor.next_seq {
                            return Err(corrupt_read(cursor, p, "sequence numbers out of order"));
                        }
                        let wanted = head_fields.seq >= cursor.target
                            && filter.wants(head_fields.namespace, head_fields.flags);
                        if wanted {
                            let record = codec::decode_record(&body)
                                .map_err(|e| corrupt_read(cursor, p, e.0))?;
                            bytes += total;
                            let position = codec::LogPosition {
                                segment: cursor.segment.base,
                                offset: (cursor.offset + p as u64) as u32,
                                frame_len: total as u32,
                            };
                            out.push((position, record));
                        }
                        cursor.next_seq += 1;
                        p += total;
                    }
                    Frame::Incomplete { total } if p == 0 => {
                        // One frame larger than a chunk: read exactly that frame.
                        if cursor.offset + total as u64 > end {
                            return Err(corrupt_read(
                                cursor,
                                0,
                                "frame runs past the end of written data",
                            ));
                        }
                        let frame = read_bytes(&cursor.segment, cursor.offset, total)?;
                        if !matches!(codec::check_frame(&frame), Frame::Complete { .. }) {
                            return Err(corrupt_read(cursor, 0, "damaged frame"));
                        }
                        let body = frame.slice(FRAME_HEADER_BYTES..);
                        let record = codec::decode_record(&body)
                            .map_err(|e| corrupt_read(cursor, 0, e.0))?;
                        if record.seq != cursor.next_seq {
                            return Err(corrupt_read(cursor, 0, "sequence numbers out of order"));
                        }
                        let wanted = record.seq >= cursor.target
                            && filter
                                .wants(record.event.namespace.as_str().as_bytes(), record.flags);
                        if wanted {
                            bytes += total;
                            let position = codec::LogPosition {
                                segment: cursor.segment.base,
                                offset: cursor.offset as u32,
                                frame_len: total as u32,
                            };
                            out.push((position, record));
                        }
                        cursor.next_seq += 1;
                        p = total;
                        break;
                    }
                    Frame::Incomplete { .. } => break,
                    Frame::Zero | Frame::Corrupt(_) => {
                        return Err(corrupt_read(cursor, p, "damaged frame inside written data"));
                    }
                }
            }
            cursor.offset += p as u64;
        }
        Ok(out)
    }
}

/// Which records [`Log::read`] returns.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ReadFilter<'a> {
    All,
    /// Those of one namespace.
    Namespace(&'a str),
    /// Those that carry an epoch (leader namespaces), or whose namespace starts with
    /// the prefix.
    EpochOrPrefix(&'a str),
}

impl ReadFilter<'_> {
    fn wants(&self, namespace: &[u8], flags: u8) -> bool {
        match self {
            ReadFilter::All => true,
            ReadFilter::Namespace(ns) => namespace == ns.as_bytes(),
            ReadFilter::EpochOrPrefix(prefix) => {
                flags & codec::FLAG_EPOCH != 0 || namespace.starts_with(prefix.as_bytes())
            }
        }
    }
}

fn corrupt_read(cursor: &LogCursor, p: usize, what: &str) -> ReadError {
    ReadError::Corrupt(format!(
        "{what} at offset {} of {}",
        cursor.offset + p as u64,
        cursor.segment.path.display()
    ))
}

/// The record of `frame`, read at `position` of `segment`: exactly one whole frame.
fn record_of_frame(
    segment: &Segment,
    position: codec::LogPosition,
    frame: Bytes,
) -> Result<Record, ReadError> {
    match codec::check_frame(&frame) {
        Frame::Complete { total } if total == frame.len() => {}
        _ => {
            return Err(ReadError::Corrupt(format!(
                "no valid record at offset {} of {}",
                position.offset,
                segment.path.display()
            )));
        }
    }
    codec::decode_record(&frame.slice(FRAME_HEADER_BYTES..))
        .map_err(|e| ReadError::Corrupt(format!("{e} in {}", segment.path.display())))
}

fn read_bytes(segment: &Segment, offset: u64, len: usize) -> Result<Bytes, ReadError> {
    let mut buf = vec![0; len];
    segment
        .file
        .read_exact_at(&mut buf, offset)
        .map_err(|source| ReadError::Io {
            context: format!("reading {}", segment.path.display()),
            source,
        })?;
    Ok(Bytes::from(buf))
}

/// A reader's position in the log. Cheap to keep between reads, which is what a live
/// change feed does.
#[derive(Clone)]
pub(crate) struct LogCursor {
    segment: Arc<Segment>,
    /// A frame boundary.
    offset: u64,
    /// The sequence number of the record at `offset`.
    next_seq: u64,
    /// Records before this sequence number are skipped.
    target: u64,
}

impl LogCursor {
    /// The sequence number of the next record the cursor will look at.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.max(self.target)
    }
}

/// The writer's changes to the active segment's sparse index for one append.
#[derive(Default)]
pub(crate) struct SparseUpdate {
    /// Namespace bits to add to the segment's last entry.
    pub current_bloom: u64,
    /// Entries that start inside this append.
    pub new_entries: Vec<SparseEntry>,
}

/// Tracks where the writer's next sparse entry falls.
#[derive(Clone)]
pub(crate) struct SparseBuilder {
    last_entry_offset: u64,
}

impl SparseBuilder {
    pub fn for_segment(segment: &Segment) -> Self {
        let last_entry_offset = segment
            .sparse
            .lock()
            .unwrap()
            .last()
            .map_or(SEGMENT_HEADER_BYTES, |e| e.offset);
        Self { last_entry_offset }
    }

    /// Notes a record of `namespace` with sequence `seq` at `offset`.
    pub fn record(&mut self, update: &mut SparseUpdate, seq: u64, offset: u64, namespace: &[u8]) {
        let bits = ns_bloom_bits(namespace);
        if offset - self.last_entry_offset >= SPARSE_EVERY_BYTES {
            self.last_entry_offset = offset;
            update.new_entries.push(SparseEntry {
                seq,
                offset,
                ns_bloom: bits,
            });
        } else if let Some(last) = update.new_entries.last_mut() {
            last.ns_bloom |= bits;
        } else {
            update.current_bloom |= bits;
        }
    }
}

/// The header of a segment whose first sequence number is `base`, written by this
/// version (every append marks its first record).
pub(crate) fn segment_header(base: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    segment_header_with(base, HEADER_GROUPS_MARKED)
}

pub(crate) fn segment_header_with(base: u64, flags: u32) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
    header[0..8].copy_from_slice(SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&SEGMENT_FORMAT.to_le_bytes());
    header[12..16].copy_from_slice(&flags.to_le_bytes());
    header[16..24].copy_from_slice(&base.to_le_bytes());
    let crc = crc32c::crc32c(&header[0..24]);
    header[24..28].copy_from_slice(&crc.to_le_bytes());
    header
}

fn write_header(file: &dyn FsFile, base: u64) -> io::Result<()> {
    file.write_all_at(&segment_header(base), 0)
}

/// Checks a segment header; the error says what is wrong with it.
pub(crate) fn check_header_bytes(header: &[u8], base: u64) -> Result<(), String> {
    if header.len() < SEGMENT_HEADER_BYTES as usize || &header[0..8] != SEGMENT_MAGIC {
        return Err("not an asp log segment (bad magic)".into());
    }
    let crc = u32::from_le_bytes(header[24..28].try_into().unwrap());
    if crc != crc32c::crc32c(&header[0..24]) {
        return Err("segment header checksum mismatch".into());
    }
    let format = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if format != SEGMENT_FORMAT {
        return Err(format!(
            "segment format {format} is not supported (this asp reads {SEGMENT_FORMAT})"
        ));
    }
    let stored = u64::from_le_bytes(header[16..24].try_into().unwrap());
    if stored != base {
        return Err(format!(
            "header says the segment starts at {stored}, its name says {base}"
        ));
    }
    Ok(())
}

/// The flags of a header [`check_header_bytes`] accepted.
pub(crate) fn header_flags(header: &[u8]) -> u32 {
    u32::from_le_bytes(header[12..16].try_into().unwrap())
}

fn check_header(path: &Path, header: &[u8], base: u64) -> Result<(), OpenError> {
    check_header_bytes(header, base).map_err(|reason| corrupt(path, reason))
}

/// Creates a segment file; on failure (a full disk) removes what it created, so that
/// the next attempt can create it again.
fn create_segment(fs: &dyn Fs, dir: &Path, base: u64) -> io::Result<Segment> {
    let path = dir.join(segment_name(base));
    let file = fs.open(&path, OpenMode::CreateNew)?;
    if let Err(e) = write_header(file.as_ref(), base)
        .and_then(|()| file.sync_data())
        .and_then(|()| fs.sync_dir(dir))
    {
        drop(file);
        let _ = fs.remove(&path);
        return Err(io::Error::new(
            e.kind(),
            format!("cannot initialise {}: {e}", path.display()),
        ));
    }
    Ok(Segment {
        base,
        path,
        file,
        len: AtomicU64::new(SEGMENT_HEADER_BYTES),
        last_seq: AtomicU64::new(base - 1),
        sparse: Mutex::new(vec![SparseEntry {
            seq: base,
            offset: SEGMENT_HEADER_BYTES,
            ns_bloom: 0,
        }]),
    })
}

/// The outcome of reading a segment front to back.
struct Scan {
    /// The end of the last complete batch.
    data_end: u64,
    last_seq: u64,
    sparse: Vec<SparseEntry>,
    /// Why the scan stopped before the end of the file, if it did.
    stop: Option<(u64, &'static str)>,
    /// Records after `data_end` that were whole but belong to an unfinished batch.
    records_after_end: u64,
}

fn scan_segment(file: &dyn FsFile, path: &Path, base: u64) -> Result<Scan, OpenError> {
    let file_len = file
        .len()
        .map_err(io_open(format!("cannot stat {}", path.display())))?;
    let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
    if file_len < SEGMENT_HEADER_BYTES {
        return Err(corrupt(path, "shorter than a segment header"));
    }
    file.read_exact_at(&mut header, 0)
        .map_err(io_open(format!("cannot read {}", path.display())))?;
    check_header(path, &header, base)?;

    let mut scan = Scan {
        data_end: SEGMENT_HEADER_BYTES,
        last_seq: base - 1,
        sparse: vec![SparseEntry {
            seq: base,
            offset: SEGMENT_HEADER_BYTES,
            ns_bloom: 0,
        }],
        stop: None,
        records_after_end: 0,
    };
    let mut offset = SEGMENT_HEADER_BYTES;
    let mut seq = base;
    let mut sparse_builder = SparseBuilder {
        last_entry_offset: SEGMENT_HEADER_BYTES,
    };
    let mut pending = SparseUpdate::default();
    // Sparse entries are only kept up to the last complete batch.
    let mut committed_entries = 1;
    let mut chunk = Vec::new();
    'outer: while offset < file_len {
        let want = ((file_len - offset) as usize).min(4 << 20);
        chunk.resize(want, 0);
        file.read_exact_at(&mut chunk, offset)
            .map_err(io_open(format!("cannot read {}", path.display())))?;
        let mut p = 0;
        while p < chunk.len() {
            match codec::check_frame(&chunk[p..]) {
                Frame::Complete { total } => {
                    let body = &chunk[p + FRAME_HEADER_BYTES..p + total];
                    let head = match codec::record_head(body) {
                        Ok(head) if head.seq == seq => head,
                        Ok(_) => {
                            scan.stop = Some((offset + p as u64, "sequence number out of order"));
                            break 'outer;
                        }
                        Err(e) => {
                            scan.stop = Some((offset + p as u64, e.0));
                            break 'outer;
                        }
                    };
                    let at = offset + p as u64;
                    sparse_builder.record(&mut pending, seq, at, head.namespace);
                    scan.records_after_end += 1;
                    p += total;
                    if head.flags & FLAG_TXN_END != 0 {
                        scan.data_end = offset + p as u64;
                        scan.last_seq = seq;
                        scan.records_after_end = 0;
                        // Fold the pending sparse changes in: the batch is complete.
                        if let Some(last) = scan.sparse.last_mut() {
                            last.ns_bloom |= pending.current_bloom;
                        }
                        scan.sparse.append(&mut pending.new_entries);
                        pending.current_bloom = 0;
                        committed_entries = scan.sparse.len();
                    }
                    seq += 1;
                }
                Frame::Incomplete { total } => {
                    if offset + (p + total) as u64 > file_len {
                        scan.stop = Some((
                            offset + p as u64,
                            "incomplete record at the end of the file",
                        ));
                        break 'outer;
                    }
                    if p == 0 {
                        // A frame larger than the chunk: read it whole next time.
                        chunk.resize(total, 0);
                        file.read_exact_at(&mut chunk, offset)
                            .map_err(io_open(format!("cannot read {}", path.display())))?;
                        continue;
                    }
                    break;
                }
                Frame::Zero => {
                    let at = offset + p as u64;
                    if !rest_is_zero(file, at, file_len)
                        .map_err(io_open(format!("cannot read {}", path.display())))?
                    {
                        scan.stop = Some((at, "zero length field followed by data"));
                    }
                    break 'outer;
                }
                Frame::Corrupt(reason) => {
                    scan.stop = Some((offset + p as u64, reason));
                    break 'outer;
                }
            }
        }
        offset += p as u64;
    }
    scan.sparse.truncate(committed_entries);
    Ok(scan)
}

fn rest_is_zero(file: &dyn FsFile, from: u64, to: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// Opens the last segment, cutting off anything after its last complete batch. Damage
/// followed by intact records of a later group is corruption; under `strict_tail`
/// (`fsync = "always"`, where only the last append can be torn) it refuses to open.
fn open_active(
    fs: &dyn Fs,
    path: &Path,
    base: u64,
    strict_tail: bool,
) -> Result<(Segment, Option<TornTail>), OpenError> {
    let file = fs
        .open(path, OpenMode::Write)
        .map_err(io_open(format!("cannot open {}", path.display())))?;
    let file_len = file
        .len()
        .map_err(io_open(format!("cannot stat {}", path.display())))?;
    if file_len < SEGMENT_HEADER_BYTES {
        // A crash while the segment was being created: nothing in it was ever written.
        tracing::warn!(path = %path.display(), bytes = file_len, "log segment was never initialised; recreating it");
        write_header(file.as_ref(), base)
            .and_then(|()| file.set_len(SEGMENT_HEADER_BYTES))
            .and_then(|()| file.sync_data())
            .map_err(io_open(format!("cannot initialise {}", path.display())))?;
    }
    let scan = scan_segment(file.as_ref(), path, base)?;
    let mut torn = None;
    if scan.data_end < file_len {
        let (offset, reason) = scan
            .stop
            .unwrap_or((scan.data_end, "batch without its final record"));
        let dropped_bytes = file_len - scan.data_end;
        let all_zero = rest_is_zero(file.as_ref(), scan.data_end, file_len)
            .map_err(io_open(format!("cannot read {}", path.display())))?;
        if !all_zero && let Some((at, _)) = scan.stop {
            // Damage before the end: a tear only if nothing intact after it starts
            // a later group (see crate::salvage).
            let bytes =
                read_all(fs, path).map_err(io_open(format!("cannot read {}", path.display())))?;
            let survey = crate::salvage::survey(&bytes, base);
            let after = survey.records_after_damage();
            if !survey.is_torn_tail() {
                let message = format!(
                    "corrupt log: the record at offset {at} is damaged ({reason}), but {after} intact records of later writes follow it; a torn write can only be the last one. Start with --salvage to move this segment aside, keep every intact record and fetch the lost ones from peers"
                );
                if strict_tail {
                    return Err(corrupt(path, message));
                }
                tracing::error!(path = %path.display(), "{message}; cutting it as a tail anyway, because under fsync = interval or never a machine crash can leave holes in the unsynced end");
            }
        }
        if !all_zero {
            tracing::warn!(
                path = %path.display(),
                offset,
                dropped_bytes,
                dropped_records = scan.records_after_end,
                reason,
                "log tail was torn (an interrupted write); dropping the incomplete end"
            );
            torn = Some(TornTail {
                segment: path.to_owned(),
                offset: scan.data_end,
                dropped_bytes,
                dropped_records: scan.records_after_end,
                reason,
            });
        }
        file.set_len(scan.data_end)
            .and_then(|()| file.sync_data())
            .map_err(io_open(format!("cannot truncate {}", path.display())))?;
    }
    Ok((
        Segment {
            base,
            path: path.to_owned(),
            file,
            len: AtomicU64::new(scan.data_end),
            last_seq: AtomicU64::new(scan.last_seq),
            sparse: Mutex::new(scan.sparse),
        },
        torn,
    ))
}

/// Opens a sealed segment from its sidecar, or by scanning it if the sidecar is missing
/// or damaged. A sealed segment must be whole: damage in it is an error, not a tear.
fn open_sealed(fs: &dyn Fs, path: &Path, base: u64) -> Result<Segment, OpenError> {
    let file = fs
        .open(path, OpenMode::Write)
        .map_err(io_open(format!("cannot open {}", path.display())))?;
    let file_len = file
        .len()
        .map_err(io_open(format!("cannot stat {}", path.display())))?;
    let (data_end, last_seq, sparse) = match read_sidecar(fs, &path.with_extension("idx"), base) {
        Some(s) if s.0 == file_len => s,
        _ => {
            let scan = scan_segment(file.as_ref(), path, base)?;
            if scan.data_end != file_len {
                let (offset, reason) = scan
                    .stop
                    .unwrap_or((scan.data_end, "batch without its final record"));
                return Err(corrupt(
                    path,
                    format!(
                        "corrupt log: sealed segment is damaged at offset {offset}: {reason}; it cannot be a torn write because later segments exist. Start with --salvage to move it aside, keep every intact record and fetch the lost ones from peers"
                    ),
                ));
            }
            (scan.data_end, scan.last_seq, scan.sparse)
        }
    };
    Ok(Segment {
        base,
        path: path.to_owned(),
        file,
        len: AtomicU64::new(data_end),
        last_seq: AtomicU64::new(last_seq),
        sparse: Mutex::new(sparse),
    })
}

fn write_sidecar(fs: &dyn Fs, segment: &Segment) -> io::Result<()> {
    let sparse = segment.sparse.lock().unwrap().clone();
    let mut out = Vec::with_capacity(40 + sparse.len() * 24);
    out.extend_from_slice(SIDECAR_MAGIC);
    out.extend_from_slice(&SEGMENT_FORMAT.to_le_bytes());
    out.extend_from_slice(&(sparse.len() as u32).to_le_bytes());
    out.extend_from_slice(&segment.last_seq().to_le_bytes());
    out.extend_from_slice(&segment.len().to_le_bytes());
    for e in &sparse {
        out.extend_from_slice(&e.seq.to_le_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.ns_bloom.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let path = segment.path.with_extension("idx");
    let f = fs.open(&path, OpenMode::Truncate)?;
    f.write_all_at(&out, 0)?;
    f.sync_data()
}

/// Returns `(data_end, last_seq, sparse)` if the sidecar is present and intact.
fn read_sidecar(fs: &dyn Fs, path: &Path, base: u64) -> Option<(u64, u64, Vec<SparseEntry>)> {
    let bytes = read_all(fs, path).ok()?;
    if bytes.len() < 36 || &bytes[0..8] != SIDECAR_MAGIC {
        return None;
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap());
    let n = u32::from_le_bytes(body[12..16].try_into().ok()?) as usize;
    if body.len() != 32 + n * 24 || n == 0 {
        return None;
    }
    let last_seq = u64_at(16);
    let data_end = u64_at(24);
    let sparse: Vec<_> = (0..n)
        .map(|i| SparseEntry {
            seq: u64_at(32 + i * 24),
            offset: u64_at(40 + i * 24),
            ns_bloom: u64_at(48 + i * 24),
        })
        .collect();
    (sparse[0].seq == base && last_seq >= base.saturating_sub(1))
        .then_some((data_end, last_seq, sparse))
}
