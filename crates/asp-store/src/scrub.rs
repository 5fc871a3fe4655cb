//! The scrub: reads every record of the log and checks its checksum, so that damage in
//! a sealed segment (which is read rarely, and never again on open once it has a
//! sidecar) is found while peers still hold the events, not when a reader needs them.
//! Reads are paced to `scrub_bytes_per_s`. Damage is reported loudly (error log,
//! status, metrics) and tells the operator to restart with `--salvage`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::{self, FRAME_HEADER_BYTES, Frame};
use crate::error::ReadError;
use crate::log::{SEGMENT_HEADER_BYTES, Segment};
use crate::store::Store;
use crate::writer::wall_ms;

/// Bytes read at a time.
const SCRUB_CHUNK_BYTES: usize = 1 << 20;

/// What one scrub run checked and found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    pub started_unix_ms: u64,
    pub finished_unix_ms: u64,
    pub segments: u64,
    pub bytes: u64,
    pub records: u64,
    /// The first damaged place of each damaged segment.
    pub damage: Vec<ScrubDamage>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrubDamage {
    pub segment: PathBuf,
    pub offset: u64,
    pub reason: String,
}

impl Store {
    /// Reads every sealed segment, and the active one up to what is durable, checking
    /// every record's checksum and sequence number, at most `scrub_bytes_per_s`.
    /// Blocking; one run at a time (a second caller waits for the first). The report
    /// is kept for [`Store::status`].
    pub fn scrub(&self) -> Result<ScrubReport, ReadError> {
        let shared = &self.inner.shared;
        let _running = shared.maintenance.scrub_running.lock().unwrap();
        let started = Instant::now();
        let mut report = ScrubReport {
            started_unix_ms: wall_ms(),
            ..ScrubReport::default()
        };
        let mut segments = shared.log.sealed_segments();
        let active = shared.log.active();
        let synced = shared.progress.lock().unwrap().synced;
        let active_end = if synced.segment == active.base {
            synced.offset
        } else {
            SEGMENT_HEADER_BYTES
        };
        segments.push(active.clone());
        let rate = shared.config.scrub_bytes_per_s.max(1);
        let total: u64 = segments.iter().map(|s| s.len()).sum();
        let progress = shared.maintenance.operations.start("scrub", total, "bytes");
        let mut checked = 0;
        for segment in segments {
            progress.done(checked);
            checked += segment.len();
            if let Some(f) = shared.health.failure.get() {
                return Err(ReadError::Failed(f.clone()));
            }
            let end = if segment.base == active.base {
                active_end
            } else {
                segment.len()
            };
            report.segments += 1;
            if let Some(damage) = scrub_segment(&segment, end, &mut report, |bytes| {
                // Pace: never ahead of `rate` bytes per second since the start.
                let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
                let elapsed = started.elapsed();
                if due > elapsed {
                    std::thread::sleep(due - elapsed);
                }
            })? {
                tracing::error!(
                    segment = %damage.segment.display(),
                    offset = damage.offset,
                    reason = %damage.reason,
                    "scrub found a damaged record in the feed log; restart the node with --salvage to keep every intact record and fetch the lost ones from peers"
                );
                shared.metrics.scrub_damage.inc();
                report.damage.push(damage);
            }
        }
        report.finished_unix_ms = wall_ms();
        shared.metrics.scrub_runs.inc();
        tracing::info!(
            segments = report.segments,
            bytes = report.bytes,
            records = report.records,
            damaged = report.damage.len(),
            "scrub finished"
        );
        *shared.maintenance.last_scrub.lock().unwrap() = Some(report.clone());
        Ok(report)
    }

    /// [`Store::scrub`] on a blocking thread.
    pub async fn scrub_async(&self) -> Result<ScrubReport, ReadError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.scrub())
            .await
            .map_err(|e| ReadError::Failed(format!("the scrub panicked: {e}")))?
    }

    /// The last scrub's report, if one ran since the store opened.
    pub fn last_scrub(&self) -> Option<ScrubReport> {
        self.inner
            .shared
            .maintenance
            .last_scrub
            .lock()
            .unwrap()
            .clone()
    }
}

/// Checks one segment up to `end`; returns its first damaged place, if any.
fn scrub_segment(
    segment: &Arc<Segment>,
    end: u64,
    report: &mut ScrubReport,
    mut pace: impl FnMut(u64),
) -> Result<Option<ScrubDamage>, ReadError> {
    let damage = |offset: u64, reason: &str| {
        Ok(Some(ScrubDamage {
            segment: segment.path.clone(),
            offset,
            reason: reason.to_owned(),
        }))
    };
    let read = |buf: &mut [u8], at: u64| {
        segment
            .file
            .read_exact_at(buf, at)
            .map_err(|source| ReadError::Io {
                context: format!("scrubbing {}", segment.path.display()),
                source,
            })
    };
    let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
    read(&mut header, 0)?;
    if let Err(reason) = crate::log::check_header_bytes(&header, segment.base) {
        return damage(0, &reason);
    }
    let mut offset = SEGMENT_HEADER_BYTES;
    let mut seq = segment.base;
    let mut chunk = Vec::new();
    while offset < end {
        let want = ((end - offset) as usize).min(SCRUB_CHUNK_BYTES);
        chunk.resize(want, 0);
        read(&mut chunk, offset)?;
        let mut p = 0;
        while p < chunk.len() {
            match codec::check_frame(&chunk[p..]) {
                Frame::Complete { total } => {
                    let body = &chunk[p + FRAME_HEADER_BYTES..p + total];
                    match codec::decode_record(&bytes::Bytes::copy_from_slice(body)) {
                        Ok(record) if record.seq == seq => {}
                        Ok(_) => return damage(offset + p as u64, "sequence number out of order"),
                        Err(e) => return damage(offset + p as u64, e.0),
                    }
                    seq += 1;
                    report.records += 1;
                    p += total;
                }
                Frame::Incomplete { total } if p == 0 => {
                    if offset + total as u64 > end {
                        return damage(offset, "a record runs past the end of the written data");
                    }
                    chunk.resize(total, 0);
                    read(&mut chunk, offset)?;
                }
                Frame::Incomplete { .. } => break,
                Frame::Zero => return damage(offset + p as u64, "zeros inside written data"),
                Frame::Corrupt(reason) => return damage(offset + p as u64, reason),
            }
        }
        offset += p as u64;
        report.bytes += p as u64;
        pace(report.bytes);
    }
    Ok(None)
}
