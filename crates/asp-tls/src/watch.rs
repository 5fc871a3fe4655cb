//! Reloading a node's TLS while it runs: the files are read again every poll interval
//! and at once on SIGHUP; a change that loads cleanly replaces the material for new
//! links and connections (those open keep theirs), one that does not is logged and
//! the old material stays.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::Tls;

/// How a reload attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// New material in use.
    Reloaded,
    /// The files had not changed.
    Unchanged,
    /// The files changed but do not load; the old material stays.
    Failed,
}

impl ReloadOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadOutcome::Reloaded => "reloaded",
            ReloadOutcome::Unchanged => "unchanged",
            ReloadOutcome::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

/// `asp_tls_reloads_total{outcome}`: reloads that changed something or failed (polls
/// that found nothing new are not counted; a SIGHUP that finds nothing new is).
#[derive(Clone, Default)]
pub struct ReloadMetrics {
    reloads: Family<OutcomeLabels, Counter>,
}

impl ReloadMetrics {
    pub fn register(&self, registry: &mut Registry) {
        // prometheus-client appends `_total` to a counter's name.
        registry.register(
            "asp_tls_reloads",
            "TLS certificate, key and CA bundle reloads, by outcome (reloaded, unchanged, failed)",
            self.reloads.clone(),
        );
    }

    fn count(&self, outcome: ReloadOutcome) {
        self.reloads
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
    }

    /// Reloads counted with this outcome so far.
    pub fn get(&self, outcome: ReloadOutcome) -> u64 {
        self.reloads
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str().to_owned(),
            })
            .get()
    }
}

/// One reload, logged and counted. `asked`: a SIGHUP (an unchanged result is logged and
/// counted, and a failure is reported again even if the same files failed before).
pub fn reload_once(tls: &Tls, asked: bool) -> ReloadOutcome {
    let metrics = tls.metrics();
    match tls.reload(asked) {
        Ok(true) => {
            let id = &tls.current().identity;
            tracing::info!(
                cert = %tls.paths().cert.display(),
                name = %id.name,
                serial = %id.serial,
                "TLS certificate, key and CA bundle reloaded; new links and connections use them"
            );
            metrics.count(ReloadOutcome::Reloaded);
            ReloadOutcome::Reloaded
        }
        Ok(false) => {
            if asked {
                tracing::info!("SIGHUP: the TLS files have not changed");
                metrics.count(ReloadOutcome::Unchanged);
            }
            ReloadOutcome::Unchanged
        }
        Err(e) => {
            tracing::error!(error = %e, "TLS reload failed; the node keeps its current certificate");
            metrics.count(ReloadOutcome::Failed);
            ReloadOutcome::Failed
        }
    }
}

/// Polls the files every `poll` and reloads on SIGHUP until `shutdown`.
pub async fn watch(tls: Arc<Tls>, poll: Duration, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS files are still polled");
            None
        }
    };
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let asked = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
            () = shutdown.cancelled() => return,
        };
        let tls = tls.clone();
        // File reads and key parsing: off the async threads.
        let _ = tokio::task::spawn_blocking(move || reload_once(&tls, asked)).await;
    }
}
