//! Held events: events received from peers that this node acknowledged but cannot
//! apply yet, kept durably outside the feed so that one of them never stops the rest
//! of a peer's stream.
//!
//! - **Parked**: the event's clock reading is more than `max_clock_skew_ms` ahead of
//!   this node's wall clock. Applying it would drag this node's clock (and every later
//!   write's timestamp) ahead; refusing its whole batch stalled everything behind it.
//!   The writer applies it once `wall + max_clock_skew_ms` reaches its reading.
//! - **Quarantined**: the event carries another conflict policy than its namespace
//!   uses here, and the namespace cannot take that policy (it holds data, or its
//!   policy was set). An operator resolves it: sets the policy and retries, or
//!   discards the events on this node (they stay at their origins).
//!
//! Held events are not in the namespace's vector (they are not applied), nor in the
//! feed (so they are not relayed until applied). An event whose dot is held is a
//! duplicate.
//!
//! **File.** `held.log` in the data directory: an 8-byte header (`ASPHELD`, format 1),
//! then records appended and fdatasynced before the batch that holds them is
//! acknowledged. A record (integers little-endian) is `marker "HELD" | len u32 |
//! crc32c(len ++ body) u32 | body`, the body `reason u8 (1 parked, 2 quarantined) |
//! arrival wall-clock ms u64 | the event as a log record body` (codec.rs, seq 0).
//! There are no removal records: the namespace's vector is the truth. On open, a held
//! event whose dot the vector holds (applied since, or discarded, which joins the dot
//! into the base vector) is dropped; a later record of the same dot replaces an
//! earlier one (a parked event found in conflict when released is quarantined).
//! Once the records of events no longer held outweigh the live ones (and 1 MiB), the
//! file is rewritten with the live ones (temporary file, fsync, rename, fsync of the
//! directory), at the start of a writer group, so after the fsync that made the
//! applied events durable in the log.
//!
//! **Damage.** A bad record (marker, length, checksum) with a valid record somewhere
//! after it is corruption: the store refuses to open, naming the file and offset. A
//! bad record with nothing valid after it is a torn write (a crash during the append)
//! and is cut off. A record whose checksum matches but that does not decode is
//! corruption.
//!
//! **Bounds.** Everything held is also in memory; `held_bytes_max` bounds the bytes of
//! their records. A batch that would pass it is refused whole (the refusal it had
//! before events could be held). The file holds at most the live records plus dead
//! ones up to their size (or 1 MiB).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use asp_core::crdt::Policy;
use asp_core::{Dot, Event, Namespace, NodeId, VersionVector};
use bytes::Bytes;

use crate::codec::{self, EventRef, FRAME_HEADER_BYTES, RECORD_BYTES_MAX};
use crate::error::OpenError;
use crate::fs::{Fs, FsFile, OpenMode, read_all, write_atomically};

pub(crate) const HELD_FILE: &str = "held.log";
const HEADER: &[u8; 8] = b"ASPHELD\x01";
const MARKER: [u8; 4] = *b"HELD";
/// Marker, length, checksum.
const RECORD_HEADER_BYTES: usize = 12;
/// Reason, arrival.
const RECORD_PREFIX_BYTES: usize = 1 + 8;
const RECORD_BODY_MAX: usize = RECORD_PREFIX_BYTES + RECORD_BYTES_MAX;
/// Dead records are rewritten away only past this (and past the live ones).
const REWRITE_DEAD_BYTES_MIN: u64 = 1 << 20;
/// Parked events the writer applies in one group, at most.
const RELEASE_EVENTS_MAX: usize = 16_384;

/// Why an event is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeldReason {
    /// Its clock reading is too far ahead; applied once this node's clock allows.
    Parked,
    /// Its policy differs from its namespace's here; an operator resolves it.
    Quarantined,
}

impl HeldReason {
    fn code(self) -> u8 {
        match self {
            HeldReason::Parked => 1,
            HeldReason::Quarantined => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(HeldReason::Parked),
            2 => Some(HeldReason::Quarantined),
            _ => None,
        }
    }
}

/// What an operator does with a namespace's quarantined events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuarantineAction {
    /// Apply those the namespace's policy accepts now (after the policy was set to
    /// theirs); the others stay.
    Retry,
    /// Drop them from this node: their dots join the namespace's base vector, as if
    /// superseded, so that they are not asked for or taken again. Their origins keep
    /// them.
    Discard,
}

/// What resolving a quarantine did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuarantineOutcome {
    /// Events applied (retry).
    pub applied: usize,
    /// Events dropped from this node (discard).
    pub discarded: usize,
    /// Events still quarantined (retry: their policy still differs).
    pub still_quarantined: usize,
}

/// Everything held, for status pages.
#[derive(Clone, Debug, Default)]
pub struct HeldStatus {
    pub events: u64,
    pub bytes: u64,
    pub bytes_max: u64,
    /// Batches refused whole because holding their events would have passed
    /// `held_bytes_max`, since the store opened.
    pub full_refusals: u64,
    pub parked: ParkedStatus,
    /// Per namespace with quarantined events, by name.
    pub quarantine: Vec<QuarantineStatus>,
}

/// Parked events.
#[derive(Clone, Debug, Default)]
pub struct ParkedStatus {
    pub events: u64,
    pub bytes: u64,
    /// When (this node's wall clock, ms since the Unix epoch) the earliest parked
    /// event may be applied.
    pub next_release_ms: Option<u64>,
    /// Events per origin.
    pub origins: Vec<(NodeId, u64)>,
}

/// One namespace's quarantined events.
#[derive(Clone, Debug)]
pub struct QuarantineStatus {
    pub namespace: Namespace,
    /// The namespace's policy on this node.
    pub policy_here: Policy,
    /// Whether the namespace holds applied events here (then its policy cannot
    /// change).
    pub holds_data: bool,
    /// The policies the quarantined events carry.
    pub policies_of_events: Vec<Policy>,
    pub events: u64,
    pub bytes: u64,
    /// Events per origin.
    pub origins: Vec<(NodeId, u64)>,
    /// When the earliest of them arrived (this node's wall clock, ms).
    pub since_ms: u64,
}

struct Entry {
    event: Event,
    reason: HeldReason,
    arrival_ms: u64,
    /// Bytes of its record.
    bytes: u64,
}

/// The held events of a store: in memory, and in `held.log`. Changed only by the
/// writer thread.
pub(crate) struct Held {
    fs: Arc<dyn Fs>,
    path: PathBuf,
    dir: PathBuf,
    file: Box<dyn FsFile>,
    /// Where the next record goes.
    file_len: u64,
    /// Bytes of records (written or pending) of events no longer held.
    dead_bytes: u64,
    /// Bytes of the records of the events held.
    live_bytes: u64,
    bytes_max: u64,
    entries: HashMap<(Namespace, Dot), Entry>,
    /// Parked events by clock reading (physical ms), earliest first.
    parked: BTreeSet<(u64, Namespace, Dot)>,
    quarantined_by_namespace: HashMap<Namespace, usize>,
    /// Records not written yet (see [`Held::sync`]).
    pending: Vec<u8>,
    full_refusals: u64,
}

impl Held {
    /// Reads `held.log` from `dir` (creating it if missing), cutting a torn tail off.
    pub fn open(fs: Arc<dyn Fs>, dir: &Path, bytes_max: u64) -> Result<Held, OpenError> {
        let path = dir.join(HELD_FILE);
        let bytes = match read_all(fs.as_ref(), &path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(OpenError::Io {
                    context: format!("cannot read {}", path.display()),
                    source,
                });
            }
        };
        let corrupt = |reason: String| OpenError::Corrupt {
            path: path.clone(),
            reason: format!(
                "{reason}; it holds events received from peers and not applied yet: restore it from a backup of this data directory, or move it away to drop them (their origins still hold them)"
            ),
        };
        let io_error = |what: &str, source: io::Error| OpenError::Io {
            context: format!("{what} {}", path.display()),
            source,
        };
        if bytes.len() < HEADER.len() {
            // Missing, or cut short while being created (the header is written and
            // fsynced before any record): start an empty file.
            if !HEADER.starts_with(&bytes) {
                return Err(corrupt("not an asp held-events file (bad header)".into()));
            }
            write_atomically(fs.as_ref(), dir, HELD_FILE, HEADER)
                .map_err(|e| io_error("cannot create", e))?;
        } else if bytes[..HEADER.len() - 1] != HEADER[..HEADER.len() - 1] {
            return Err(corrupt("not an asp held-events file (bad header)".into()));
        } else if bytes[HEADER.len() - 1] != HEADER[HEADER.len() - 1] {
            return Err(corrupt(format!(
                "written in format {}, but this asp reads format {}: run a newer asp",
                bytes[HEADER.len() - 1],
                HEADER[HEADER.len() - 1]
            )));
        }
        let file = fs
            .open(&path, OpenMode::Write)
            .map_err(|e| io_error("cannot open", e))?;
        let mut held = Held {
            fs,
            path: path.clone(),
            dir: dir.to_owned(),
            file,
            file_len: HEADER.len() as u64,
            dead_bytes: 0,
            live_bytes: 0,
            bytes_max,
            entries: HashMap::new(),
            parked: BTreeSet::new(),
            quarantined_by_namespace: HashMap::new(),
            pending: Vec::new(),
            full_refusals: 0,
        };
        let mut pos = HEADER.len();
        while pos < bytes.len() {
            let Some(total) = check_record(&bytes[pos..]) else {
                if let Some(next) = find_record(&bytes, pos + 1) {
                    return Err(corrupt(format!(
                        "corrupt record at offset {pos}, followed by a valid record at offset {next} (damage, not a torn write)"
                    )));
                }
                tracing::warn!(
                    file = %path.display(),
                    offset = pos,
                    dropped_bytes = bytes.len() - pos,
                    "cutting off a torn write at the end of the held-events file"
                );
                held.file
                    .set_len(pos as u64)
                    .and_then(|()| held.file.sync_data())
                    .map_err(|e| io_error("cannot cut the torn tail of", e))?;
                break;
            };
            let body = &bytes[pos + RECORD_HEADER_BYTES..pos + total];
            let (event, reason, arrival_ms) = decode_body(body).map_err(|what| {
                corrupt(format!(
                    "corrupt record at offset {pos} (its checksum matches): {what}"
                ))
            })?;
            held.insert(event, reason, arrival_ms, total as u64);
            pos += total;
        }
        held.file_len = pos as u64;
        held.dead_bytes = held.file_len - HEADER.len() as u64 - held.live_bytes;
        Ok(held)
    }

    /// Reads the file again, forgetting what was taken since it was last rewritten
    /// (a group that took events out could not be appended: they are held again), and
    /// drops what `applied` says the node holds. Nothing may be pending.
    pub fn reload(&mut self, applied: impl Fn(&Namespace, Dot) -> bool) -> Result<(), OpenError> {
        debug_assert!(self.pending.is_empty(), "reloaded with records not written");
        let full_refusals = self.full_refusals;
        *self = Held::open(self.fs.clone(), &self.dir, self.bytes_max)?;
        self.full_refusals = full_refusals;
        self.drop_applied(applied);
        Ok(())
    }

    /// Drops every held event `applied` says the node holds (applied since, or
    /// discarded); returns how many.
    pub fn drop_applied(&mut self, applied: impl Fn(&Namespace, Dot) -> bool) -> usize {
        let gone: Vec<(Namespace, Dot)> = self
            .entries
            .keys()
            .filter(|(ns, dot)| applied(ns, *dot))
            .cloned()
            .collect();
        for key in &gone {
            self.remove(key);
        }
        gone.len()
    }

    pub fn contains(&self, namespace: &Namespace, dot: Dot) -> bool {
        // The usual case, on the writer's path for every received event: nothing held.
        !self.entries.is_empty() && self.entries.contains_key(&(namespace.clone(), dot))
    }

    /// Bytes that can still be held.
    pub fn room(&self) -> u64 {
        self.bytes_max.saturating_sub(self.live_bytes)
    }

    pub fn bytes(&self) -> u64 {
        self.live_bytes
    }

    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn note_full_refusal(&mut self) {
        self.full_refusals += 1;
    }

    /// Bytes an event's record takes.
    pub fn record_bytes(event: &Event) -> u64 {
        (RECORD_HEADER_BYTES + RECORD_PREFIX_BYTES + EventRef::from_event(event).body_len()) as u64
    }

    /// Holds an event (replacing any held event with its dot); its record is written
    /// by the next [`Held::sync`].
    pub fn hold(&mut self, event: Event, reason: HeldReason, arrival_ms: u64) {
        let bytes = encode_record(&mut self.pending, &event, reason, arrival_ms);
        self.insert(event, reason, arrival_ms, bytes);
    }

    fn insert(&mut self, event: Event, reason: HeldReason, arrival_ms: u64, bytes: u64) {
        let key = (event.namespace.clone(), event.dot);
        self.remove(&key);
        match reason {
            HeldReason::Parked => {
                self.parked
                    .insert((event.hlc.physical_ms(), key.0.clone(), key.1));
            }
            HeldReason::Quarantined => {
                *self
                    .quarantined_by_namespace
                    .entry(key.0.clone())
                    .or_default() += 1;
            }
        }
        self.live_bytes += bytes;
        self.entries.insert(
            key,
            Entry {
                event,
                reason,
                arrival_ms,
                bytes,
            },
        );
    }

    fn remove(&mut self, key: &(Namespace, Dot)) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        match entry.reason {
            HeldReason::Parked => {
                self.parked
                    .remove(&(entry.event.hlc.physical_ms(), key.0.clone(), key.1));
            }
            HeldReason::Quarantined => {
                if let Some(n) = self.quarantined_by_namespace.get_mut(&key.0) {
                    *n -= 1;
                    if *n == 0 {
                        self.quarantined_by_namespace.remove(&key.0);
                    }
                }
            }
        }
        self.live_bytes -= entry.bytes;
        self.dead_bytes += entry.bytes;
        Some(entry)
    }

    /// Writes the records held since the last call and makes them durable (whatever
    /// the fsync mode: the batch that holds them is acknowledged as durable). Returns
    /// whether there were any.
    pub fn sync(&mut self) -> io::Result<bool> {
        if self.pending.is_empty() {
            return Ok(false);
        }
        self.file.write_all_at(&self.pending, self.file_len)?;
        self.file.sync_data()?;
        self.file_len += self.pending.len() as u64;
        self.pending.clear();
        Ok(true)
    }

    /// The wall-clock time (ms) at which the earliest parked event may be applied.
    pub fn next_release_ms(&self, max_skew_ms: u64) -> Option<u64> {
        self.parked
            .first()
            .map(|(ms, _, _)| ms.saturating_sub(max_skew_ms))
    }

    /// The namespaces of the parked events [`Held::take_due`] would take now.
    pub fn due_namespaces(&self, limit_ms: u64) -> Vec<Namespace> {
        let mut out: Vec<Namespace> = Vec::new();
        for (ms, ns, _) in self.parked.iter().take(RELEASE_EVENTS_MAX) {
            if *ms > limit_ms {
                break;
            }
            if !out.contains(ns) {
                out.push(ns.clone());
            }
        }
        out
    }

    /// Takes the parked events whose clock reading is at most `limit_ms` (at most
    /// [`RELEASE_EVENTS_MAX`]), earliest first, with their arrival times.
    pub fn take_due(&mut self, limit_ms: u64) -> Vec<(Event, u64)> {
        let mut out = Vec::new();
        while out.len() < RELEASE_EVENTS_MAX {
            let Some((ms, ns, dot)) = self.parked.first().cloned() else {
                break;
            };
            if ms > limit_ms {
                break;
            }
            let entry = self.remove(&(ns, dot)).expect("a parked event is held");
            out.push((entry.event, entry.arrival_ms));
        }
        out
    }

    pub fn is_quarantined(&self, namespace: &Namespace) -> bool {
        self.quarantined_by_namespace.contains_key(namespace)
    }

    /// Takes a namespace's quarantined events, oldest arrival first.
    pub fn take_quarantined(&mut self, namespace: &Namespace) -> Vec<(Event, u64)> {
        let mut keys: Vec<(u64, (Namespace, Dot))> = self
            .entries
            .iter()
            .filter(|((ns, _), e)| ns == namespace && e.reason == HeldReason::Quarantined)
            .map(|(k, e)| (e.arrival_ms, k.clone()))
            .collect();
        keys.sort();
        keys.into_iter()
            .filter_map(|(_, key)| self.remove(&key))
            .map(|e| (e.event, e.arrival_ms))
            .collect()
    }

    /// The dots held of a namespace (`quarantined_only`: only those quarantined).
    pub fn dots(&self, namespace: &Namespace, quarantined_only: bool) -> VersionVector {
        let mut out = VersionVector::new();
        for ((ns, dot), e) in &self.entries {
            if ns == namespace && (!quarantined_only || e.reason == HeldReason::Quarantined) {
                out.insert(*dot);
            }
        }
        out
    }

    /// Rewrites the file with only the live records once the dead ones outweigh them
    /// (and 1 MiB). The caller makes sure the events that left were made durable
    /// elsewhere first (or discarded durably). Returns whether it rewrote.
    pub fn compact(&mut self) -> io::Result<bool> {
        if self.dead_bytes < REWRITE_DEAD_BYTES_MIN || self.dead_bytes <= self.live_bytes {
            return Ok(false);
        }
        let mut entries: Vec<&Entry> = self.entries.values().collect();
        entries.sort_by_key(|e| (e.arrival_ms, e.event.namespace.clone(), e.event.dot));
        let mut out = Vec::with_capacity(HEADER.len() + self.live_bytes as usize);
        out.extend_from_slice(HEADER);
        for e in entries {
            encode_record(&mut out, &e.event, e.reason, e.arrival_ms);
        }
        write_atomically(self.fs.as_ref(), &self.dir, HELD_FILE, &out)?;
        self.file = self.fs.open(&self.path, OpenMode::Write)?;
        self.file_len = out.len() as u64;
        self.live_bytes = self.file_len - HEADER.len() as u64;
        self.dead_bytes = 0;
        self.pending.clear();
        Ok(true)
    }

    /// What is held; `namespace_state` tells a namespace's policy here and whether it
    /// holds data.
    pub fn status(
        &self,
        max_skew_ms: u64,
        namespace_state: impl Fn(&Namespace) -> (Policy, bool),
    ) -> HeldStatus {
        let mut parked = ParkedStatus {
            next_release_ms: self.next_release_ms(max_skew_ms),
            ..ParkedStatus::default()
        };
        let mut parked_origins: BTreeMap<NodeId, u64> = BTreeMap::new();
        struct Quarantine {
            events: u64,
            bytes: u64,
            origins: BTreeMap<NodeId, u64>,
            policies: BTreeSet<Policy>,
            since_ms: u64,
        }
        let mut quarantine: BTreeMap<&Namespace, Quarantine> = BTreeMap::new();
        for ((ns, dot), e) in &self.entries {
            match e.reason {
                HeldReason::Parked => {
                    parked.events += 1;
                    parked.bytes += e.bytes;
                    *parked_origins.entry(dot.origin).or_default() += 1;
                }
                HeldReason::Quarantined => {
                    let q = quarantine.entry(ns).or_insert_with(|| Quarantine {
                        events: 0,
                        bytes: 0,
                        origins: BTreeMap::new(),
                        policies: BTreeSet::new(),
                        since_ms: u64::MAX,
                    });
                    q.events += 1;
                    q.bytes += e.bytes;
                    *q.origins.entry(dot.origin).or_default() += 1;
                    q.since_ms = q.since_ms.min(e.arrival_ms);
                    if let Some(p) = Policy::of_event(&e.event.context) {
                        q.policies.insert(p);
                    }
                }
            }
        }
        parked.origins = parked_origins.into_iter().collect();
        let quarantine = quarantine
            .into_iter()
            .map(|(ns, q)| {
                let (policy_here, holds_data) = namespace_state(ns);
                QuarantineStatus {
                    namespace: ns.clone(),
                    policy_here,
                    holds_data,
                    policies_of_events: q.policies.into_iter().collect(),
                    events: q.events,
                    bytes: q.bytes,
                    origins: q.origins.into_iter().collect(),
                    since_ms: q.since_ms,
                }
            })
            .collect();
        HeldStatus {
            events: self.entries.len() as u64,
            bytes: self.live_bytes,
            bytes_max: self.bytes_max,
            full_refusals: self.full_refusals,
            parked,
            quarantine,
        }
    }
}

/// Appends an event's record to `out`; returns its length.
fn encode_record(out: &mut Vec<u8>, event: &Event, reason: HeldReason, arrival_ms: u64) -> u64 {
    let start = out.len();
    out.extend_from_slice(&MARKER);
    out.extend_from_slice(&[0; 8]);
    out.push(reason.code());
    out.extend_from_slice(&arrival_ms.to_le_bytes());
    let mut record = Vec::new();
    codec::encode_record(&mut record, 0, 0, &EventRef::from_event(event));
    out.extend_from_slice(&record[FRAME_HEADER_BYTES..]);
    let len = ((out.len() - start - RECORD_HEADER_BYTES) as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), &out[start + RECORD_HEADER_BYTES..]);
    out[start + 4..start + 8].copy_from_slice(&len);
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    (out.len() - start) as u64
}

/// The length of the whole, intact record at the start of `bytes`, if there is one.
fn check_record(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < RECORD_HEADER_BYTES || bytes[..4] != MARKER {
        return None;
    }
    let len_bytes: [u8; 4] = bytes[4..8].try_into().expect("4 bytes");
    let len = u32::from_le_bytes(len_bytes) as usize;
    if !(RECORD_PREFIX_BYTES..=RECORD_BODY_MAX).contains(&len) {
        return None;
    }
    let total = RECORD_HEADER_BYTES + len;
    let body = bytes.get(RECORD_HEADER_BYTES..total)?;
    let stored = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    (crc32c::crc32c_append(crc32c::crc32c(&len_bytes), body) == stored).then_some(total)
}

/// The offset of the first intact record at or after `from`.
fn find_record(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len().saturating_sub(RECORD_HEADER_BYTES - 1))
        .filter(|&p| bytes[p..p + 4] == MARKER)
        .find(|&p| check_record(&bytes[p..]).is_some())
}

fn decode_body(body: &[u8]) -> Result<(Event, HeldReason, u64), String> {
    let reason =
        HeldReason::from_code(body[0]).ok_or_else(|| format!("unknown reason {}", body[0]))?;
    let arrival_ms = u64::from_le_bytes(body[1..9].try_into().expect("8 bytes"));
    let record = codec::decode_record(&Bytes::copy_from_slice(&body[RECORD_PREFIX_BYTES..]))
        .map_err(|e| e.to_string())?;
    Ok((record.event, reason, arrival_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use asp_core::{ContentType, Hlc, Key, Op};

    fn event(ns: &str, counter: u64, ms: u64, value: &str) -> Event {
        Event {
            namespace: Namespace::new(ns).unwrap(),
            key: Key::new("k").unwrap(),
            op: Op::Put {
                content_type: ContentType::Text,
                value: Bytes::copy_from_slice(value.as_bytes()),
            },
            dot: Dot {
                origin: NodeId::new(7).unwrap(),
                counter,
            },
            hlc: Hlc::new(ms, 0),
            context: Bytes::new(),
            epoch: 0,
            expires_ms: 0,
        }
    }

    fn held_file(dir: &Path) -> PathBuf {
        dir.join(HELD_FILE)
    }

    #[test]
    fn held_events_survive_a_reopen_and_replacements_win() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut h = Held::open(crate::fs::RealFs::shared(), dir.path(), 1 << 20).unwrap();
            h.hold(event("a", 1, 5_000, "x"), HeldReason::Parked, 10);
            h.hold(event("b", 1, 100, "y"), HeldReason::Quarantined, 11);
            h.sync().unwrap();
            // Released, then found in conflict: held again, quarantined.
            let due = h.take_due(5_000);
            assert_eq!(due.len(), 1);
            h.hold(due[0].0.clone(), HeldReason::Quarantined, due[0].1);
            h.sync().unwrap();
        }
        let h = Held::open(crate::fs::RealFs::shared(), dir.path(), 1 << 20).unwrap();
        assert_eq!(h.len(), 2);
        let ns_a = Namespace::new("a").unwrap();
        assert!(h.is_quarantined(&ns_a));
        assert_eq!(h.next_release_ms(0), None);
        assert_eq!(h.dead_bytes, Held::record_bytes(&event("a", 1, 5_000, "x")));
    }

    #[test]
    fn a_torn_tail_is_cut_and_damage_before_valid_records_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut h = Held::open(crate::fs::RealFs::shared(), dir.path(), 1 << 20).unwrap();
            for i in 1..=3 {
                h.hold(event("a", i, 100, "v"), HeldReason::Quarantined, 1);
            }
            h.sync().unwrap();
        }
        let whole = std::fs::read(held_file(dir.path())).unwrap();
        let record = (whole.len() - HEADER.len()) / 3;
        // Every cut inside the last record is a torn write: the first two remain.
        for cut in 1..record {
            std::fs::write(held_file(dir.path()), &whole[..whole.len() - cut]).unwrap();
            let h = Held::open(crate::fs::RealFs::shared(), dir.path(), 1 << 20).unwrap();
            assert_eq!(h.len(), 2, "cut {cut}");
            assert_eq!(
                std::fs::metadata(held_file(dir.path())).unwrap().len() as usize,
                HEADER.len() + 2 * record
            );
        }
        // Every flipped byte of the first record, with two valid ones after it, is
        // corruption, named with its offset.
        for at in HEADER.len()..HEADER.len() + record {
            let mut bad = whole.clone();
            bad[at] ^= 0x40;
            std::fs::write(held_file(dir.path()), &bad).unwrap();
            let err = Held::open(crate::fs::RealFs::shared(), dir.path(), 1 << 20)
                .err()
                .expect("refused");
            let text = err.to_string();
            assert!(text.contains("corrupt"), "{text}");
            assert!(text.contains(&format!("offset {}", HEADER.len())), "{text}");
            assert!(text.contains(HELD_FILE), "{text}");
        }
        // A damaged last record is a torn write.
        let mut bad = whole.clone();
        let last = bad.len() - 3;
        bad[last] ^= 0x40;
        std::fs::write(held_file(dir.path()), &bad).unwrap();
        assert_eq!(
            Held::open(crate::fs::RealFs::shared(), dir.path(), 1 << 20)
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_bad_header_or_a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(held_file(dir.path()), b"ASPHELD\x02").unwrap();
        let err = Held::open(crate::fs::RealFs::shared(), dir.path(), 1 << 20)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("newer asp"), "{err}");
        std::fs::write(held_file(dir.path()), b"NOTHELD!more").unwrap();
        let err = Held::open(crate::fs::RealFs::shared(), dir.path(), 1 << 20)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("bad header"), "{err}");
        // Cut while being created: started again.
        std::fs::write(held_file(dir.path()), b"ASPH").unwrap();
        assert_eq!(
            Held::open(crate::fs::RealFs::shared(), dir.path(), 1 << 20)
                .unwrap()
                .len(),
            0
        );
        assert_eq!(std::fs::read(held_file(dir.path())).unwrap(), HEADER);
    }

    #[test]
    fn dead_records_are_rewritten_away() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Held::open(crate::fs::RealFs::shared(), dir.path(), 64 << 20).unwrap();
        let big = "v".repeat(100_000);
        for i in 1..=30 {
            h.hold(event("a", i, 100 + i, &big), HeldReason::Parked, 1);
        }
        h.hold(event("b", 1, 1, "keep"), HeldReason::Quarantined, 1);
        h.sync().unwrap();
        assert!(!h.compact().unwrap(), "nothing dead yet");
        assert_eq!(h.take_due(u64::MAX).len(), 30);
        assert!(h.compact().unwrap());
        let len = std::fs::metadata(held_file(dir.path())).unwrap().len();
        assert_eq!(len, HEADER.len() as u64 + h.bytes());
        drop(h);
        let h = Held::open(crate::fs::RealFs::shared(), dir.path(), 64 << 20).unwrap();
        assert_eq!(h.len(), 1);
        assert!(h.is_quarantined(&Namespace::new("b").unwrap()));
    }
}
