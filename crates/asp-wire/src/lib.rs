//! The peer protocol's frame codec: [`encode`] turns an `asp_core::session::Frame` into
//! bytes, [`decode`] turns bytes back, and `decode(encode(x)) == x`. The layout of every
//! frame is specified in `docs/PROTOCOL.md`; this crate is its reference.
//!
//! Every frame is `length: u32 | type: u8 | payload`, little-endian throughout, at most
//! [`FRAME_BYTES_MAX`] bytes. Decoding never panics and never allocates more than the
//! frame's own size allows (decompressed event batches are bounded too): malformed input
//! is a [`DecodeError`] that names what was wrong. This crate does no I/O.
//!
//! Size: one format — each frame's encoder and decoder sit in the same file, in the
//! same order, so that the two halves of every field are read and changed together
//! (the tests and the fuzz harness live elsewhere).

use asp_core::reconcile::{SYMBOL_BYTES, Symbol};
use asp_core::session::{
    ErrorCode, Frame, Hello, MEMBER_TEXT_BYTES_MAX, MEMBERS_MAX, MemberEntry, NEED_PREFIX_BYTES,
    NamespaceSummary, RELAY_ORIGINS_MAX, REPORTS_MAX, ReconcileMode, ReconcileOutcome,
    SUMMARY_PART_NAMESPACES_MAX, VectorReport,
};
use asp_core::{ContentType, Dot, Event, Hlc, Key, Namespace, NodeId, Op, RangeSet, VersionVector};
use bytes::Bytes;

/// The largest frame, length prefix excluded.
pub const FRAME_BYTES_MAX: usize = 16 << 20;
/// The largest event batch once decompressed.
pub const EVENTS_RAW_BYTES_MAX: usize = 4 * FRAME_BYTES_MAX;
/// The first bytes of every Hello.
pub const HELLO_MAGIC: [u8; 4] = *b"ASPR";
/// Bytes of output one byte of LZ4 block data can make, at most (a match length
/// byte of 255).
const LZ4_RATIO_MAX: usize = 255;
/// The largest Hello (every field at its limit), and the largest frame a node reads
/// before the handshake.
pub const HELLO_BYTES_MAX: usize = 1 << 21;
/// Event batches smaller than this are sent uncompressed.
const COMPRESS_MIN_BYTES: usize = 512;

const TYPE_HELLO: u8 = 1;
const TYPE_ERROR: u8 = 2;
const TYPE_SUMMARY: u8 = 3;
/// Protocol version 2: a summary part (same body as a Summary); more follow.
const TYPE_SUMMARY_PART: u8 = 14;
const TYPE_EVENTS: u8 = 4;
const TYPE_ACK: u8 = 5;
const TYPE_CREDIT: u8 = 6;
const TYPE_HEARTBEAT: u8 = 7;
const TYPE_RECONCILE_START: u8 = 8;
const TYPE_RECONCILE_SYMBOLS: u8 = 9;
const TYPE_RECONCILE_CREDIT: u8 = 10;
const TYPE_RECONCILE_END: u8 = 11;
const TYPE_REPAIR: u8 = 12;
const TYPE_REPAIR_END: u8 = 13;
/// `RepairEnd` with its count of repair events (protocol version 3).
const TYPE_REPAIR_END_COUNTED: u8 = 15;
/// `Members` (protocol version 4).
const TYPE_MEMBERS: u8 = 16;
/// `Prune` and `Graft` (protocol version 5).
const TYPE_PRUNE: u8 = 17;
const TYPE_GRAFT: u8 = 18;

const COMPRESSION_NONE: u8 = 0;
const COMPRESSION_LZ4: u8 = 1;

const OP_PUT: u8 = 0;
const OP_DELETE: u8 = 1;
/// Set on the op byte of an event that carries an epoch (a leader namespace's, see
/// docs/MODES.md): eight bytes of epoch follow the value. Protocol version 4 and up.
const OP_EPOCH: u8 = 0x80;
/// Set on the op byte of a put with a time to live: eight bytes of expiry (clock
/// milliseconds) follow the value and the epoch, if any. Protocol version 4 and up.
const OP_EXPIRES: u8 = 0x40;

/// Limits on variable-length fields (bytes or entries).
const CLUSTER_ID_BYTES_MAX: usize = 256;
const LABEL_BYTES_MAX: usize = 256;
const LABELS_MAX: usize = 64;
/// Namespace patterns in a Hello, at most.
const NAMESPACES_MAX: usize = 4096;
const MESSAGE_BYTES_MAX: usize = 4096;
/// Symbols in one `ReconcileSymbols` frame, at most.
pub const SYMBOLS_PER_FRAME_MAX: usize = 65_536;
/// Key hashes in one `ReconcileEnd`'s need list, at most.
pub const NEED_MAX: usize = 1 << 20;

/// Why a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("frame of {0} bytes exceeds the {FRAME_BYTES_MAX}-byte limit")]
    TooLarge(usize),
    #[error("{what} is {len} long; the limit is {max}")]
    FieldTooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("frame length {0} exceeds the {FRAME_BYTES_MAX}-byte limit")]
    TooLarge(u64),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("malformed {frame} frame: {detail}")]
    Malformed { frame: &'static str, detail: String },
}

/// Appends the encoded frame to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    encode_with(frame, out, &mut Compressor::always())
}

/// When a link compresses its event batches: lz4 costs about as much CPU as the rest
/// of encoding a batch, and values that are already compressed or random gain almost
/// nothing from it. A batch that lz4 shrinks by less than an eighth turns compression
/// off for the link's next [`Compressor::PAUSE`] batches, then it is tried again.
#[derive(Clone, Debug)]
pub struct Compressor {
    /// Batches still to send uncompressed.
    skip: u32,
    adaptive: bool,
}

impl Compressor {
    /// Batches sent uncompressed after one that did not pay.
    pub const PAUSE: u32 = 32;

    /// Tries every batch (what [`encode`] does).
    pub fn always() -> Self {
        Compressor {
            skip: 0,
            adaptive: false,
        }
    }

    /// Stops trying for a while after a batch that did not pay.
    pub fn adaptive() -> Self {
        Compressor {
            skip: 0,
            adaptive: true,
        }
    }
}

/// [`encode`], with event batches compressed as `compressor` decides (the receiver
/// reads either form).
pub fn encode_with(
    frame: &Frame,
    out: &mut Vec<u8>,
    compressor: &mut Compressor,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let result = encode_body(frame, out, compressor);
    if let Err(e) = result {
        out.truncate(start);
        return Err(e);
    }
    let len = out.len() - start - 4;
    if len > FRAME_BYTES_MAX {
        out.truncate(start);
        return Err(EncodeError::TooLarge(len));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), EncodeError> {
    if len > max {
        Err(EncodeError::FieldTooLong { what, len, max })
    } else {
        Ok(())
    }
}

fn put_str8(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_vector(out: &mut Vec<u8>, vv: &VersionVector) {
    let origins: Vec<_> = vv.iter().collect();
    out.extend_from_slice(&(origins.len() as u32).to_le_bytes());
    for (origin, set) in origins {
        out.extend_from_slice(&origin.get().to_le_bytes());
        out.extend_from_slice(&(set.ranges().len() as u32).to_le_bytes());
        for &(lo, hi) in set.ranges() {
            out.extend_from_slice(&lo.to_le_bytes());
            out.extend_from_slice(&hi.to_le_bytes());
        }
    }
}

fn put_event(out: &mut Vec<u8>, e: &Event) {
    put_str8(out, e.namespace.as_str());
    put_str16(out, e.key.as_str());
    let flag =
        if e.epoch == 0 { 0 } else { OP_EPOCH } | if e.expires_ms == 0 { 0 } else { OP_EXPIRES };
    match &e.op {
        Op::Put { content_type, .. } => {
            out.push(OP_PUT | flag);
            out.push(content_type.code());
        }
        Op::Delete => {
            out.push(OP_DELETE | flag);
            out.push(0);
        }
    }
    out.extend_from_slice(&e.dot.origin.get().to_le_bytes());
    out.extend_from_slice(&e.dot.counter.to_le_bytes());
    out.extend_from_slice(&e.hlc.as_raw().to_le_bytes());
    put_bytes32(out, &e.context);
    match &e.op {
        Op::Put { value, .. } => put_bytes32(out, value),
        Op::Delete => put_bytes32(out, &[]),
    }
    if e.epoch != 0 {
        out.extend_from_slice(&e.epoch.to_le_bytes());
    }
    if e.expires_ms != 0 {
        out.extend_from_slice(&e.expires_ms.to_le_bytes());
    }
}

fn encode_body(
    frame: &Frame,
    out: &mut Vec<u8>,
    compressor: &mut Compressor,
) -> Result<(), EncodeError> {
    match frame {
        Frame::Hello(h) => {
            out.push(TYPE_HELLO);
            out.extend_from_slice(&HELLO_MAGIC);
            out.extend_from_slice(&h.version_min.to_le_bytes());
            out.extend_from_slice(&h.version_max.to_le_bytes());
            check_len("cluster id", h.cluster_id.len(), CLUSTER_ID_BYTES_MAX)?;
            put_str16(out, &h.cluster_id);
            out.extend_from_slice(&h.node_id.get().to_le_bytes());
            out.extend_from_slice(&h.heartbeat_ms.to_le_bytes());
            out.extend_from_slice(&h.idle_timeout_ms.to_le_bytes());
            check_len("label count", h.labels.len(), LABELS_MAX)?;
            out.extend_from_slice(&(h.labels.len() as u16).to_le_bytes());
            for (k, v) in &h.labels {
                check_len("label", k.len().max(v.len()), LABEL_BYTES_MAX)?;
                put_str16(out, k);
                put_str16(out, v);
            }
            check_len("namespace count", h.namespaces.len(), NAMESPACES_MAX)?;
            out.extend_from_slice(&(h.namespaces.len() as u16).to_le_bytes());
            for n in &h.namespaces {
                check_len("namespace name", n.len(), u8::MAX as usize)?;
                put_str8(out, n);
            }
            // Appended after the fields of the first builds, which ignore it.
            out.extend_from_slice(&h.incarnation.to_le_bytes());
        }
        Frame::Error { code, message } => {
            out.push(TYPE_ERROR);
            out.extend_from_slice(&code.code().to_le_bytes());
            // A long message is cut (at a character boundary) rather than refused.
            let mut end = message.len().min(MESSAGE_BYTES_MAX);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            put_str16(out, &message[..end]);
        }
        Frame::Summary(namespaces) | Frame::SummaryPart(namespaces) => {
            out.push(if matches!(frame, Frame::Summary(_)) {
                TYPE_SUMMARY
            } else {
                TYPE_SUMMARY_PART
            });
            check_len(
                "namespace count",
                namespaces.len(),
                SUMMARY_PART_NAMESPACES_MAX,
            )?;
            out.extend_from_slice(&(namespaces.len() as u16).to_le_bytes());
            for ns in namespaces {
                put_str8(out, ns.namespace.as_str());
                out.extend_from_slice(&ns.max_hlc.as_raw().to_le_bytes());
                put_vector(out, &ns.vector);
                put_digest(out, ns.digest.as_ref());
                check_len("report count", ns.reports.len(), REPORTS_MAX)?;
                out.push(ns.reports.len() as u8);
                for report in &ns.reports {
                    out.extend_from_slice(&report.node.get().to_le_bytes());
                    out.extend_from_slice(&report.at_ms.to_le_bytes());
                    put_vector(out, &report.vector);
                }
            }
        }
        Frame::Events {
            first_seq,
            last_seq,
            events,
        } => {
            out.push(TYPE_EVENTS);
            out.extend_from_slice(&first_seq.to_le_bytes());
            out.extend_from_slice(&last_seq.to_le_bytes());
            put_event_batch(out, events, compressor)?;
        }
        Frame::Ack {
            from_seq,
            through_seq,
        } => {
            out.push(TYPE_ACK);
            out.extend_from_slice(&from_seq.to_le_bytes());
            out.extend_from_slice(&through_seq.to_le_bytes());
        }
        Frame::Credit { bytes } => {
            out.push(TYPE_CREDIT);
            out.extend_from_slice(&bytes.to_le_bytes());
        }
        Frame::Members(members) => {
            out.push(TYPE_MEMBERS);
            check_len("member count", members.len(), MEMBERS_MAX)?;
            out.extend_from_slice(&(members.len() as u16).to_le_bytes());
            for m in members {
                out.extend_from_slice(&m.node.get().to_le_bytes());
                out.extend_from_slice(&m.incarnation.to_le_bytes());
                out.extend_from_slice(&m.heartbeat.to_le_bytes());
                for text in [&m.name, &m.api, &m.peer] {
                    check_len("member name or address", text.len(), MEMBER_TEXT_BYTES_MAX)?;
                    put_str16(out, text);
                }
            }
        }
        Frame::Prune { origins } | Frame::Graft { origins } => {
            out.push(if matches!(frame, Frame::Prune { .. }) {
                TYPE_PRUNE
            } else {
                TYPE_GRAFT
            });
            check_len("origin count", origins.len(), RELAY_ORIGINS_MAX)?;
            out.extend_from_slice(&(origins.len() as u16).to_le_bytes());
            for origin in origins {
                out.extend_from_slice(&origin.get().to_le_bytes());
            }
        }
        Frame::Heartbeat { head_seq, wall_ms } => {
            out.push(TYPE_HEARTBEAT);
            out.extend_from_slice(&head_seq.to_le_bytes());
            out.extend_from_slice(&wall_ms.to_le_bytes());
        }
        Frame::ReconcileStart {
            id,
            namespace,
            mode,
            items,
            symbols_max,
        } => {
            out.push(TYPE_RECONCILE_START);
            out.extend_from_slice(&id.to_le_bytes());
            put_str8(out, namespace.as_str());
            out.push(mode.code());
            out.extend_from_slice(&items.to_le_bytes());
            out.extend_from_slice(&symbols_max.to_le_bytes());
        }
        Frame::ReconcileSymbols {
            id,
            first_index,
            symbols,
        } => {
            out.push(TYPE_RECONCILE_SYMBOLS);
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&first_index.to_le_bytes());
            check_len("symbol count", symbols.len(), SYMBOLS_PER_FRAME_MAX)?;
            out.extend_from_slice(&(symbols.len() as u32).to_le_bytes());
            for symbol in symbols {
                symbol.encode(out);
            }
        }
        Frame::ReconcileCredit { id, symbols } => {
            out.push(TYPE_RECONCILE_CREDIT);
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&symbols.to_le_bytes());
        }
        Frame::ReconcileEnd { id, outcome, need } => {
            out.push(TYPE_RECONCILE_END);
            out.extend_from_slice(&id.to_le_bytes());
            out.push(outcome.code());
            check_len("need count", need.len(), NEED_MAX)?;
            out.extend_from_slice(&(need.len() as u32).to_le_bytes());
            for prefix in need {
                out.extend_from_slice(prefix);
            }
        }
        Frame::Repair { id, events } => {
            out.push(TYPE_REPAIR);
            out.extend_from_slice(&id.to_le_bytes());
            put_event_batch(out, events, compressor)?;
        }
        Frame::RepairEnd {
            id,
            covered,
            repairs,
        } => {
            match repairs {
                Some(count) => {
                    out.push(TYPE_REPAIR_END_COUNTED);
                    out.extend_from_slice(&id.to_le_bytes());
                    out.extend_from_slice(&count.to_le_bytes());
                }
                None => {
                    out.push(TYPE_REPAIR_END);
                    out.extend_from_slice(&id.to_le_bytes());
                }
            }
            match covered {
                Some(vector) => {
                    out.push(1);
                    put_vector(out, vector);
                }
                None => out.push(0),
            }
        }
    }
    Ok(())
}

/// A summary's digest: a presence byte, then the symbol's [`SYMBOL_BYTES`] bytes.
fn put_digest(out: &mut Vec<u8>, digest: Option<&Symbol>) {
    match digest {
        Some(symbol) => {
            out.push(1);
            symbol.encode(out);
        }
        None => out.push(0),
    }
}

/// An event batch: compression, count, (raw length if compressed), events.
fn put_event_batch(
    out: &mut Vec<u8>,
    events: &[Event],
    compressor: &mut Compressor,
) -> Result<(), EncodeError> {
    let mut raw = Vec::new();
    for e in events {
        put_event(&mut raw, e);
    }
    if raw.len() > EVENTS_RAW_BYTES_MAX {
        return Err(EncodeError::TooLarge(raw.len()));
    }
    let large = raw.len() >= COMPRESS_MIN_BYTES;
    let tried = large && compressor.skip == 0;
    if large && !tried {
        compressor.skip -= 1;
    }
    let compressed = tried.then(|| lz4_flex::block::compress(&raw));
    if compressor.adaptive
        && let Some(c) = &compressed
        && c.len() > raw.len() - raw.len() / 8
    {
        compressor.skip = Compressor::PAUSE;
    }
    let compressed = compressed.filter(|c| c.len() < raw.len());
    match compressed {
        Some(c) => {
            out.push(COMPRESSION_LZ4);
            out.extend_from_slice(&(events.len() as u32).to_le_bytes());
            out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
        }
        None => {
            out.push(COMPRESSION_NONE);
            out.extend_from_slice(&(events.len() as u32).to_le_bytes());
            out.extend_from_slice(&raw);
        }
    }
    Ok(())
}

/// Decodes the frame at the start of `buf`. Returns `Ok(None)` while `buf` holds only
/// part of it, otherwise the frame and how many bytes it took. A length over the limit
/// is an error as soon as the prefix is in, so a peer cannot make the reader buffer
/// more than [`FRAME_BYTES_MAX`].
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(DecodeError::TooLarge(len as u64));
    }
    if len == 0 {
        return Err(DecodeError::Malformed {
            frame: "any",
            detail: "empty frame".into(),
        });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let body = &buf[4..4 + len];
    let frame = decode_body(body)?;
    Ok(Some((frame, 4 + len)))
}

/// [`decode`] for a connection whose handshake has not finished: only a Hello (or an
/// Error, a refusal) of at most [`HELLO_BYTES_MAX`] bytes is accepted, checked as soon
/// as the length and the type are in, so a peer nobody knows yet cannot make this
/// node buffer or decompress a large frame.
pub fn decode_handshake(buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len > HELLO_BYTES_MAX {
        return Err(DecodeError::Malformed {
            frame: "handshake",
            detail: format!(
                "a frame of {len} bytes before the handshake; a Hello is at most {HELLO_BYTES_MAX}"
            ),
        });
    }
    if !matches!(buf[4], TYPE_HELLO | TYPE_ERROR) {
        return Err(DecodeError::Malformed {
            frame: "handshake",
            detail: format!(
                "frame type {} before the handshake; only a Hello (or an Error) may come first",
                buf[4]
            ),
        });
    }
    decode(buf)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    frame: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, detail: impl Into<String>) -> DecodeError {
        DecodeError::Malformed {
            frame: self.frame,
            detail: detail.into(),
        }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let out = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(out)
            }
            None => Err(self.err(format!("truncated {what}"))),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn str_of(&mut self, len: usize, what: &str) -> Result<&'a str, DecodeError> {
        let b = self.take(len, what)?;
        std::str::from_utf8(b).map_err(|_| self.err(format!("{what} is not UTF-8")))
    }
    fn str8(&mut self, what: &str) -> Result<&'a str, DecodeError> {
        let len = self.u8(what)? as usize;
        self.str_of(len, what)
    }
    fn str16(&mut self, what: &str, max: usize) -> Result<&'a str, DecodeError> {
        let len = self.u16(what)? as usize;
        if len > max {
            return Err(self.err(format!("{what} is {len} bytes; the limit is {max}")));
        }
        self.str_of(len, what)
    }
    fn node(&mut self, what: &str) -> Result<NodeId, DecodeError> {
        NodeId::new(self.u64(what)?).ok_or_else(|| self.err(format!("{what} is zero")))
    }
    fn namespace(&mut self) -> Result<Namespace, DecodeError> {
        let name = self.str8("namespace")?;
        Namespace::new(name).map_err(|e| self.err(e.to_string()))
    }
    fn vector(&mut self) -> Result<VersionVector, DecodeError> {
        let n = self.u32("vector")? as usize;
        // Each origin takes at least 12 bytes: a count beyond that cannot be real.
        if n > (self.bytes.len() - self.pos) / 12 {
            return Err(self.err("vector origin count exceeds the frame"));
        }
        let mut vv = VersionVector::new();
        for _ in 0..n {
            let origin = self.node("origin")?;
            let ranges = self.u32("ranges")? as usize;
            if ranges > (self.bytes.len() - self.pos) / 16 {
                return Err(self.err("range count exceeds the frame"));
            }
            let mut set = RangeSet::new();
            for _ in 0..ranges {
                let lo = self.u64("range")?;
                let hi = self.u64("range")?;
                if lo == 0 || lo > hi {
                    return Err(self.err(format!("bad range {lo}..={hi}")));
                }
                set.insert_range(lo, hi);
            }
            vv.insert_set(origin, &set);
        }
        Ok(vv)
    }
    fn symbol(&mut self) -> Result<Symbol, DecodeError> {
        let b = self.take(SYMBOL_BYTES, "symbol")?;
        Symbol::decode(b).ok_or_else(|| self.err("truncated symbol"))
    }

    /// An event batch (see `put_event_batch`); the rest of the frame.
    fn event_batch(&mut self) -> Result<Vec<Event>, DecodeError> {
        let compression = self.u8("compression")?;
        let count = self.u32("count")? as usize;
        let raw: Bytes = match compression {
            COMPRESSION_NONE => Bytes::copy_from_slice(&self.bytes[self.pos..]),
            COMPRESSION_LZ4 => {
                let raw_len = self.u32("raw length")? as usize;
                if raw_len > EVENTS_RAW_BYTES_MAX {
                    return Err(self.err(format!("batch of {raw_len} bytes once decompressed; the limit is {EVENTS_RAW_BYTES_MAX}")));
                }
                // Checked before the buffer is allocated: LZ4 turns one input byte
                // into at most 255 output bytes, so a few bytes cannot claim megabytes.
                let compressed = self.bytes.len() - self.pos;
                if raw_len > compressed.saturating_mul(LZ4_RATIO_MAX) + 64 {
                    return Err(self.err(format!(
                        "{compressed} bytes of lz4 data cannot hold {raw_len} bytes"
                    )));
                }
                let mut out = vec![0; raw_len];
                let n = lz4_flex::block::decompress_into(&self.bytes[self.pos..], &mut out)
                    .map_err(|e| self.err(format!("bad lz4 data: {e}")))?;
                if n != raw_len {
                    return Err(self.err(format!(
                        "lz4 data holds {n} bytes, the header says {raw_len}"
                    )));
                }
                Bytes::from(out)
            }
            other => return Err(self.err(format!("unknown compression {other}"))),
        };
        self.pos = self.bytes.len();
        // Each event takes at least 39 bytes: a larger count cannot be real.
        if count > raw.len() / 39 + 1 {
            return Err(self.err(format!("{count} events cannot fit in {} bytes", raw.len())));
        }
        decode_events(&raw, count)
    }

    fn done(&self) -> Result<(), DecodeError> {
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err(self.err(format!(
                "{} bytes after the last field",
                self.bytes.len() - self.pos
            )))
        }
    }
}

fn decode_body(body: &[u8]) -> Result<Frame, DecodeError> {
    let kind = body[0];
    let frame = match kind {
        TYPE_HELLO => "Hello",
        TYPE_ERROR => "Error",
        TYPE_SUMMARY => "Summary",
        TYPE_SUMMARY_PART => "SummaryPart",
        TYPE_EVENTS => "Events",
        TYPE_ACK => "Ack",
        TYPE_CREDIT => "Credit",
        TYPE_HEARTBEAT => "Heartbeat",
        TYPE_MEMBERS => "Members",
        TYPE_PRUNE => "Prune",
        TYPE_GRAFT => "Graft",
        TYPE_RECONCILE_START => "ReconcileStart",
        TYPE_RECONCILE_SYMBOLS => "ReconcileSymbols",
        TYPE_RECONCILE_CREDIT => "ReconcileCredit",
        TYPE_RECONCILE_END => "ReconcileEnd",
        TYPE_REPAIR => "Repair",
        TYPE_REPAIR_END | TYPE_REPAIR_END_COUNTED => "RepairEnd",
        other => return Err(DecodeError::UnknownType(other)),
    };
    let mut r = Reader {
        bytes: &body[1..],
        pos: 0,
        frame,
    };
    match kind {
        TYPE_HELLO => {
            let magic = r.take(4, "magic")?;
            if magic != HELLO_MAGIC {
                return Err(r.err("bad magic: not an asp peer"));
            }
            let version_min = r.u16("version")?;
            let version_max = r.u16("version")?;
            let cluster_id = r.str16("cluster id", CLUSTER_ID_BYTES_MAX)?.to_owned();
            let node_id = r.node("node id")?;
            let heartbeat_ms = r.u32("heartbeat")?;
            let idle_timeout_ms = r.u32("idle timeout")?;
            let n_labels = r.u16("labels")? as usize;
            if n_labels > LABELS_MAX {
                return Err(r.err(format!("{n_labels} labels; the limit is {LABELS_MAX}")));
            }
            let mut labels = Vec::with_capacity(n_labels);
            for _ in 0..n_labels {
                let k = r.str16("label", LABEL_BYTES_MAX)?.to_owned();
                let v = r.str16("label", LABEL_BYTES_MAX)?.to_owned();
                labels.push((k, v));
            }
            let n_ns = r.u16("namespaces")? as usize;
            if n_ns > NAMESPACES_MAX {
                return Err(r.err(format!("{n_ns} namespaces; the limit is {NAMESPACES_MAX}")));
            }
            let mut namespaces = Vec::with_capacity(n_ns);
            for _ in 0..n_ns {
                namespaces.push(r.str8("namespace")?.to_owned());
            }
            // Appended fields: absent in a Hello of an earlier build.
            let incarnation = if r.bytes.len() - r.pos >= 8 {
                r.u64("incarnation")?
            } else {
                0
            };
            // Later versions may append fields to the Hello: ignore what follows.
            Ok(Frame::Hello(Hello {
                incarnation,
                version_min,
                version_max,
                cluster_id,
                node_id,
                labels,
                namespaces,
                heartbeat_ms,
                idle_timeout_ms,
            }))
        }
        TYPE_ERROR => {
            let code = ErrorCode::from_code(r.u16("code")?);
            let message = r.str16("message", MESSAGE_BYTES_MAX)?.to_owned();
            r.done()?;
            Ok(Frame::Error { code, message })
        }
        TYPE_SUMMARY | TYPE_SUMMARY_PART => {
            let n = r.u16("count")? as usize;
            if n > SUMMARY_PART_NAMESPACES_MAX {
                return Err(r.err(format!(
                    "{n} namespaces; the limit is {SUMMARY_PART_NAMESPACES_MAX}"
                )));
            }
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let namespace = r.namespace()?;
                let max_hlc = Hlc::from_raw(r.u64("max hlc")?);
                let vector = r.vector()?;
                let digest = match r.u8("digest flag")? {
                    0 => None,
                    1 => Some(r.symbol()?),
                    other => return Err(r.err(format!("bad digest flag {other}"))),
                };
                let count = r.u8("report count")? as usize;
                if count > REPORTS_MAX {
                    return Err(r.err(format!("{count} reports; the limit is {REPORTS_MAX}")));
                }
                let mut reports = Vec::with_capacity(count);
                for _ in 0..count {
                    let node = r.node("report node")?;
                    let at_ms = r.u64("report time")?;
                    let vector = r.vector()?;
                    reports.push(VectorReport {
                        node,
                        at_ms,
                        vector,
                    });
                }
                out.push(NamespaceSummary {
                    namespace,
                    max_hlc,
                    vector,
                    digest,
                    reports,
                });
            }
            r.done()?;
            Ok(if kind == TYPE_SUMMARY {
                Frame::Summary(out)
            } else {
                Frame::SummaryPart(out)
            })
        }
        TYPE_EVENTS => {
            let first_seq = r.u64("first seq")?;
            let last_seq = r.u64("last seq")?;
            let events = r.event_batch()?;
            Ok(Frame::Events {
                first_seq,
                last_seq,
                events,
            })
        }
        TYPE_ACK => {
            let from_seq = r.u64("from seq")?;
            let through_seq = r.u64("through seq")?;
            r.done()?;
            Ok(Frame::Ack {
                from_seq,
                through_seq,
            })
        }
        TYPE_CREDIT => {
            let bytes = r.u32("bytes")?;
            r.done()?;
            Ok(Frame::Credit { bytes })
        }
        TYPE_HEARTBEAT => {
            let head_seq = r.u64("head seq")?;
            let wall_ms = r.u64("wall clock")?;
            r.done()?;
            Ok(Frame::Heartbeat { head_seq, wall_ms })
        }
        TYPE_MEMBERS => {
            let n = r.u16("members")? as usize;
            if n > MEMBERS_MAX {
                return Err(r.err(format!("{n} members; the limit is {MEMBERS_MAX}")));
            }
            let mut members = Vec::with_capacity(n);
            for _ in 0..n {
                let node = r.node("member")?;
                let incarnation = r.u64("incarnation")?;
                let heartbeat = r.u64("heartbeat")?;
                let name = r.str16("name", MEMBER_TEXT_BYTES_MAX)?.to_owned();
                let api = r.str16("api address", MEMBER_TEXT_BYTES_MAX)?.to_owned();
                let peer = r.str16("peer address", MEMBER_TEXT_BYTES_MAX)?.to_owned();
                members.push(MemberEntry {
                    node,
                    incarnation,
                    heartbeat,
                    name,
                    api,
                    peer,
                });
            }
            r.done()?;
            Ok(Frame::Members(members))
        }
        TYPE_PRUNE | TYPE_GRAFT => {
            let n = r.u16("origins")? as usize;
            if n > RELAY_ORIGINS_MAX {
                return Err(r.err(format!("{n} origins; the limit is {RELAY_ORIGINS_MAX}")));
            }
            let mut origins = Vec::with_capacity(n);
            for _ in 0..n {
                origins.push(r.node("origin")?);
            }
            r.done()?;
            Ok(if kind == TYPE_PRUNE {
                Frame::Prune { origins }
            } else {
                Frame::Graft { origins }
            })
        }
        TYPE_RECONCILE_START => {
            let id = r.u32("id")?;
            let namespace = r.namespace()?;
            let code = r.u8("mode")?;
            let mode = ReconcileMode::from_code(code)
                .ok_or_else(|| r.err(format!("unknown mode {code}")))?;
            let items = r.u64("items")?;
            let symbols_max = r.u64("symbols max")?;
            r.done()?;
            Ok(Frame::ReconcileStart {
                id,
                namespace,
                mode,
                items,
                symbols_max,
            })
        }
        TYPE_RECONCILE_SYMBOLS => {
            let id = r.u32("id")?;
            let first_index = r.u64("first index")?;
            let n = r.u32("count")? as usize;
            if n > SYMBOLS_PER_FRAME_MAX || n * SYMBOL_BYTES != r.bytes.len() - r.pos {
                return Err(r.err(format!(
                    "{n} symbols do not fill the {} bytes left",
                    r.bytes.len() - r.pos
                )));
            }
            let mut symbols = Vec::with_capacity(n);
            for _ in 0..n {
                symbols.push(r.symbol()?);
            }
            r.done()?;
            Ok(Frame::ReconcileSymbols {
                id,
                first_index,
                symbols,
            })
        }
        TYPE_RECONCILE_CREDIT => {
            let id = r.u32("id")?;
            let symbols = r.u32("symbols")?;
            r.done()?;
            Ok(Frame::ReconcileCredit { id, symbols })
        }
        TYPE_RECONCILE_END => {
            let id = r.u32("id")?;
            let code = r.u8("outcome")?;
            let outcome = ReconcileOutcome::from_code(code)
                .ok_or_else(|| r.err(format!("unknown outcome {code}")))?;
            let n = r.u32("need count")? as usize;
            if n > NEED_MAX || n * NEED_PREFIX_BYTES != r.bytes.len() - r.pos {
                return Err(r.err(format!(
                    "{n} key hashes do not fill the {} bytes left",
                    r.bytes.len() - r.pos
                )));
            }
            let mut need = Vec::with_capacity(n);
            for _ in 0..n {
                let b = r.take(NEED_PREFIX_BYTES, "key hash")?;
                need.push(b.try_into().expect("taken to size"));
            }
            r.done()?;
            Ok(Frame::ReconcileEnd { id, outcome, need })
        }
        TYPE_REPAIR => {
            let id = r.u32("id")?;
            let events = r.event_batch()?;
            Ok(Frame::Repair { id, events })
        }
        TYPE_REPAIR_END | TYPE_REPAIR_END_COUNTED => {
            let id = r.u32("id")?;
            let repairs = if kind == TYPE_REPAIR_END_COUNTED {
                Some(r.u64("repair count")?)
            } else {
                None
            };
            let covered = match r.u8("covered flag")? {
                0 => None,
                1 => Some(r.vector()?),
                other => return Err(r.err(format!("bad covered flag {other}"))),
            };
            r.done()?;
            Ok(Frame::RepairEnd {
                id,
                covered,
                repairs,
            })
        }
        _ => unreachable!("types checked above"),
    }
}

fn decode_events(raw: &Bytes, count: usize) -> Result<Vec<Event>, DecodeError> {
    let mut r = Reader {
        bytes: raw,
        pos: 0,
        frame: "Events",
    };
    let mut events = Vec::with_capacity(count);
    for _ in 0..count {
        let namespace = r.namespace()?;
        let key_len = r.u16("key")? as usize;
        let key = r.str_of(key_len, "key")?;
        let key = Key::new(key).map_err(|e| r.err(e.to_string()))?;
        let op = r.u8("op")?;
        let ct = r.u8("content type")?;
        let origin = r.node("origin")?;
        let counter = r.u64("counter")?;
        if counter == 0 {
            return Err(r.err("counter is zero"));
        }
        let hlc = Hlc::from_raw(r.u64("hlc")?);
        let context_len = r.u32("context")? as usize;
        let context_start = r.pos;
        r.take(context_len, "context")?;
        let context = raw.slice(context_start..context_start + context_len);
        let value_len = r.u32("value")? as usize;
        let value_start = r.pos;
        r.take(value_len, "value")?;
        let value = raw.slice(value_start..value_start + value_len);
        let epoch = if op & OP_EPOCH != 0 {
            match r.u64("epoch")? {
                0 => return Err(r.err("an epoch flag with epoch 0")),
                e => e,
            }
        } else {
            0
        };
        let expires_ms = if op & OP_EXPIRES != 0 {
            if op & !(OP_EPOCH | OP_EXPIRES) != OP_PUT {
                return Err(r.err("an expiry on an event that is not a put"));
            }
            match r.u64("expiry")? {
                0 => return Err(r.err("an expiry flag with expiry 0")),
                e => e,
            }
        } else {
            0
        };
        let op = match op & !(OP_EPOCH | OP_EXPIRES) {
            OP_PUT => Op::Put {
                content_type: ContentType::from_code(ct)
                    .ok_or_else(|| r.err(format!("unknown content type {ct}")))?,
                value,
            },
            OP_DELETE if value.is_empty() => Op::Delete,
            OP_DELETE => return Err(r.err("a delete carries a value")),
            other => return Err(r.err(format!("unknown op {other}"))),
        };
        events.push(Event {
            namespace,
            key,
            op,
            dot: Dot { origin, counter },
            hlc,
            context,
            epoch,
            expires_ms,
        });
    }
    r.done()?;
    Ok(events)
}

#[cfg(test)]
mod tests;
