//! The wall clock every clock-reading decision uses: hybrid-logical-clock readings of
//! local writes, the `max_clock_skew` check on events from peers and the release of
//! parked events, tombstone-collection reports, and the replication runtime's lag and
//! heartbeats.
//!
//! A test seam: a process-wide offset, zero unless set once at startup (`asp serve`
//! reads `ASP_TEST_CLOCK_OFFSET_MS`), makes a node behave as if its clock ran that far
//! ahead (or behind), so that process tests need no libfaketime.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Shifts this process's wall clock by `ms` (signed). For tests only: a node whose
/// clock runs ahead of its peers'.
pub fn set_test_offset_ms(ms: i64) {
    OFFSET_MS.store(ms, Ordering::Relaxed);
}

/// The offset set with [`set_test_offset_ms`] (0 normally).
pub fn test_offset_ms() -> i64 {
    OFFSET_MS.load(Ordering::Relaxed)
}

/// Milliseconds since the Unix epoch, shifted by the test offset.
pub fn wall_ms() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now.saturating_add_signed(test_offset_ms())
}
