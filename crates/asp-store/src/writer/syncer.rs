//! The syncer (thread `asp-syncer`, only under `fsync = "interval:<ms>"`): fsyncs the
//! newest log segment on the interval and publishes the feed head up to what it made
//! durable. The writer acknowledges without waiting for it.

use super::*;

/// Under `fsync = "interval:<ms>"`: fsyncs what has been written, on the interval.
pub(super) fn run_syncer(shared: Arc<Shared>, interval: Duration) {
    let mut progress = shared.progress.lock().unwrap();
    let mut next_sync = Instant::now() + interval;
    loop {
        // The condition variable also wakes each time the indexer advances and on a
        // failure or the writer's stop (the writer does not notify it per commit); only
        // the interval, a stop or a failure ends the wait.
        let now = Instant::now();
        if now < next_sync {
            let (guard, _) = shared
                .progress_changed
                .wait_timeout(progress, next_sync - now)
                .unwrap();
            progress = guard;
        }
        if progress.stopping || shared.health.failure.get().is_some() {
            return;
        }
        if Instant::now() < next_sync {
            continue;
        }
        next_sync = Instant::now() + interval;
        let written = progress.written;
        if written.seq <= progress.synced.seq {
            continue;
        }
        drop(progress);
        // Earlier segments were fsynced when sealed; only the newest can be dirty.
        let segment = shared.log.active();
        let result = segment.file.sync_data();
        shared.metrics.fsyncs.inc();
        progress = shared.progress.lock().unwrap();
        match result {
            Ok(()) => {
                if written.seq > progress.synced.seq {
                    progress.synced = written;
                }
                shared.publish(&progress);
            }
            Err(e) => {
                drop(progress);
                shared.fail(format!("fsync of {}: {e}", segment.path.display()));
                return;
            }
        }
    }
}
