//! What each connector reports: its state, where it stands against the head of what
//! it reads (lag), its last error and its counters, for `GET /v1/connectors`,
//! `/v1/status` and `/metrics`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use crate::config::Connector;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Labels {
    connector: String,
    side: &'static str,
}

/// The node's connector metrics, one series per connector and side (`in`, `out`).
#[derive(Clone, Default)]
pub(crate) struct Metrics {
    messages: Family<Labels, Counter>,
    duplicates: Family<Labels, Counter>,
    echoes: Family<Labels, Counter>,
    dead_letters: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    lag: Family<Labels, Gauge>,
}

impl Metrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "asp_connector_messages",
            "Messages a connector sent out (side=out) or wrote into asp (side=in)",
            self.messages.clone(),
        );
        registry.register(
            "asp_connector_duplicates_dropped",
            "Messages read again at or before the stored source position, and not applied again",
            self.duplicates.clone(),
        );
        registry.register(
            "asp_connector_echoes_dropped",
            "Messages this cluster published itself, read back and dropped",
            self.echoes.clone(),
        );
        registry.register(
            "asp_connector_dead_letters",
            "Messages written to the connector's dead-letter namespace, with the reason",
            self.dead_letters.clone(),
        );
        registry.register(
            "asp_connector_errors",
            "Connection and delivery failures (each followed by a retry)",
            self.errors.clone(),
        );
        registry.register(
            "asp_connector_lag",
            "Messages between where a connector stands and the head of what it reads",
            self.lag.clone(),
        );
    }
}

/// One side (in or out) of one connector.
pub(crate) struct Side {
    labels: Labels,
    metrics: Metrics,
    state: Mutex<&'static str>,
    last_error: Mutex<Option<(String, u64)>>,
    pub messages: AtomicU64,
    pub duplicates: AtomicU64,
    pub echoes: AtomicU64,
    pub dead_letters: AtomicU64,
    pub errors: AtomicU64,
    position: Mutex<String>,
    head: Mutex<String>,
    lag: AtomicU64,
    /// What a kind shows beyond the common fields (PostgreSQL: its slot).
    detail: Mutex<Option<Value>>,
}

impl Side {
    pub(crate) fn new(connector: &Connector, side: &'static str, metrics: &Metrics) -> Self {
        Side {
            labels: Labels {
                connector: connector.name.clone(),
                side,
            },
            metrics: metrics.clone(),
            state: Mutex::new("starting"),
            last_error: Mutex::new(None),
            messages: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            echoes: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            position: Mutex::new(String::new()),
            head: Mutex::new(String::new()),
            lag: AtomicU64::new(0),
            detail: Mutex::new(None),
        }
    }

    /// Sets what this side shows as `detail` in its status, replacing what it showed
    /// before.
    pub(crate) fn set_detail(&self, detail: Value) {
        *self.detail.lock().unwrap() = Some(detail);
    }

    pub(crate) fn set_state(&self, state: &'static str) {
        *self.state.lock().unwrap() = state;
    }

    pub(crate) fn error(&self, what: impl Into<String>) {
        let what = what.into();
        tracing::warn!(connector = %self.labels.connector, side = self.labels.side, error = %what, "connector failure; retrying");
        // The error before the count, and `json` reads them the other way round: a
        // status that counts an error always shows one.
        *self.last_error.lock().unwrap() = Some((what, asp_store::clock::wall_ms()));
        self.errors.fetch_add(1, Ordering::Release);
        self.metrics.errors.get_or_create(&self.labels).inc();
        self.set_state("retrying");
    }

    pub(crate) fn count(&self, messages: u64) {
        self.messages.fetch_add(messages, Ordering::Relaxed);
        self.metrics
            .messages
            .get_or_create(&self.labels)
            .inc_by(messages);
    }

    pub(crate) fn duplicate(&self, n: u64) {
        self.duplicates.fetch_add(n, Ordering::Relaxed);
        self.metrics
            .duplicates
            .get_or_create(&self.labels)
            .inc_by(n);
    }

    pub(crate) fn echo(&self, n: u64) {
        self.echoes.fetch_add(n, Ordering::Relaxed);
        self.metrics.echoes.get_or_create(&self.labels).inc_by(n);
    }

    pub(crate) fn dead_letter(&self, n: u64) {
        self.dead_letters.fetch_add(n, Ordering::Relaxed);
        self.metrics
            .dead_letters
            .get_or_create(&self.labels)
            .inc_by(n);
    }

    /// Where this side stands, the head of what it reads, and how many messages lie
    /// between (when the source can tell).
    pub(crate) fn at(&self, position: impl ToString, head: impl ToString, lag: u64) {
        *self.position.lock().unwrap() = position.to_string();
        *self.head.lock().unwrap() = head.to_string();
        self.lag.store(lag, Ordering::Relaxed);
        self.metrics
            .lag
            .get_or_create(&self.labels)
            .set(lag.min(i64::MAX as u64) as i64);
    }

    pub(crate) fn json(&self) -> Value {
        let errors = self.errors.load(Ordering::Acquire);
        let error = self.last_error.lock().unwrap().clone();
        let mut v = json!({
            "state": *self.state.lock().unwrap(),
            "position": *self.position.lock().unwrap(),
            "head": *self.head.lock().unwrap(),
            "lag": self.lag.load(Ordering::Relaxed),
            "messages": self.messages.load(Ordering::Relaxed),
            "duplicates_dropped": self.duplicates.load(Ordering::Relaxed),
            "echoes_dropped": self.echoes.load(Ordering::Relaxed),
            "dead_letters": self.dead_letters.load(Ordering::Relaxed),
            "errors": errors,
            "last_error": error.as_ref().map(|(e, _)| e.clone()),
            "last_error_ms": error.map(|(_, at)| at),
        });
        if let Some(detail) = self.detail.lock().unwrap().as_ref() {
            v["detail"] = detail.clone();
        }
        v
    }
}
