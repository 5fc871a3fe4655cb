//! The schedules of a running node. The store compacts and scrubs only when asked
//! (`Store::compact`, `Store::scrub`, or `POST /v1/admin/compact|scrub`); a node asks
//! every interval, until it shuts down.

use std::time::Duration;

use asp_store::Store;
use tokio_util::sync::CancellationToken;

/// How often a node compacts its feed unless configured otherwise
/// (`[compaction] interval_ms`).
pub const DEFAULT_COMPACTION_INTERVAL_MS: u64 = 10 * 60 * 1000;

/// Compacts the feed every `every`, the first time one interval after the start, until
/// `shutdown` is cancelled. A run in progress when `shutdown` is cancelled finishes
/// first (a compaction stops only between segments), so await the returned future (or
/// its task) before shutting the store down.
///
/// `every` must not be zero: a configured interval of 0 means "never", and then no
/// schedule is started at all.
pub async fn run_compaction_schedule(store: Store, every: Duration, shutdown: CancellationToken) {
    every_interval(every, shutdown, || async {
        match store.compact_async().await {
            Ok(report)
                if report.segments_removed > 0
                    || report.tombstones_collected > 0
                    || report.crdt_keys_pruned > 0
                    || report.epitaphs_dropped > 0 =>
            {
                tracing::info!(
                    segments_removed = report.segments_removed,
                    records_dropped = report.records_dropped,
                    records_relocated = report.records_relocated,
                    tombstones_collected = report.tombstones_collected,
                    crdt_keys_pruned = report.crdt_keys_pruned,
                    epitaphs_left = report.epitaphs_left,
                    epitaphs_dropped = report.epitaphs_dropped,
                    log_bytes_before = report.log_bytes_before,
                    log_bytes_after = report.log_bytes_after,
                    ms = report.duration.as_millis() as u64,
                    "feed compacted"
                )
            }
            Ok(_) => tracing::debug!("compaction: nothing to remove"),
            Err(e) => tracing::warn!("{e}"),
        }
    })
    .await
}

/// Scrubs the sealed segments of the feed log every `every` (`[store]
/// scrub_interval_ms`), the first time one interval after the start, until `shutdown`
/// is cancelled; damage is logged (and counted) by the scrub itself. `every` must not
/// be zero, as for [`run_compaction_schedule`].
pub async fn run_scrub_schedule(store: Store, every: Duration, shutdown: CancellationToken) {
    every_interval(every, shutdown, || async {
        if let Err(e) = store.scrub_async().await {
            tracing::warn!("scrub: {e}");
        }
    })
    .await
}

/// Runs `work` every `every`, the first time one interval after the start, until
/// `shutdown` is cancelled. A run longer than the interval is not followed by a burst
/// of catch-up runs; a run in progress when `shutdown` comes finishes first.
async fn every_interval<F, Fut>(every: Duration, shutdown: CancellationToken, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    assert!(
        !every.is_zero(),
        "an interval of zero means no schedule; start none"
    );
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        work().await;
    }
}
