//! asp's connectors: a namespace's changes out to the systems people already run, and
//! their messages in, applied once.
//!
//! Each `[[connectors]]` entry of the node's configuration names one namespace, one
//! system and a direction. The out side reads the node's change feed in order and
//! publishes every change with its origin, dot and version (at least once; a consumer
//! dedupes by `asp-dot`), resuming from a position saved per connector. The in side
//! writes each message with the source's position in the same atomic step
//! ([`asp_store::Store::write_with_checkpoint`]), so that a crash neither loses nor
//! doubles one; it drops what this cluster published (no echo in `both`), and writes
//! what it cannot apply, with the reason, to a dead-letter namespace. The positions
//! are in the replicated namespace `_asp.connectors`, so a connector configured on
//! another node resumes where this one stopped. See docs/CONNECTORS.md.

mod amqp;
pub mod config;
mod kafka;
mod mqtt;
mod nats;
mod postgres;
mod redis_stream;
pub mod runtime;
mod status;
pub mod transport;
pub mod webhook;

use std::sync::Arc;

use asp_core::NodeId;
use asp_store::Store;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub use config::{Connector, ConnectorConfig, Direction, Kind, check};
pub use nats::subject_for;
pub use runtime::POSITIONS_NAMESPACE;

use runtime::Ctx;
use status::{Metrics, Side};

struct Running {
    ctx: Arc<Ctx>,
    out: Option<Arc<Side>>,
    r#in: Option<Arc<Side>>,
}

/// The node's running connectors. Cheap to clone.
#[derive(Clone)]
pub struct Connectors {
    running: Arc<Vec<Running>>,
    metrics: Metrics,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Connectors {
    /// Starts every connector (each keeps trying to connect in the background; a
    /// system that is down is an error in its status, not a failed start).
    pub fn start(
        store: Store,
        node: NodeId,
        cluster: String,
        connectors: Vec<Connector>,
        shutdown: CancellationToken,
    ) -> Connectors {
        let metrics = Metrics::default();
        let mut running = Vec::with_capacity(connectors.len());
        let mut tasks = Vec::new();
        for connector in connectors {
            let ctx = Arc::new(Ctx {
                store: store.clone(),
                connector,
                cluster: cluster.clone(),
                node,
                shutdown: shutdown.clone(),
            });
            let c = &ctx.connector;
            tracing::info!(connector = %c.name, kind = c.kind.as_str(), direction = c.direction.as_str(), namespace = %c.namespace, url = %config::redacted(&c.url), "connector starting");
            let out = c
                .direction
                .sends()
                .then(|| Arc::new(Side::new(c, "out", &metrics)));
            let r#in = c
                .direction
                .receives()
                .then(|| Arc::new(Side::new(c, "in", &metrics)));
            if let Some(side) = &out {
                let (ctx2, side) = (ctx.clone(), side.clone());
                tasks.push(match c.kind {
                    Kind::Nats => tokio::spawn(runtime::run_out(ctx2.clone(), side, move || {
                        nats::sink(ctx2.clone())
                    })),
                    Kind::RedisStream => {
                        tokio::spawn(runtime::run_out(ctx2.clone(), side, move || {
                            redis_stream::sink(ctx2.clone())
                        }))
                    }
                    Kind::Webhook => {
                        let reports = side.clone();
                        tokio::spawn(runtime::run_out(ctx2.clone(), side, move || {
                            webhook::sink(ctx2.clone(), reports.clone())
                        }))
                    }
                    Kind::Kafka => tokio::spawn(runtime::run_out(ctx2.clone(), side, move || {
                        kafka::sink(ctx2.clone())
                    })),
                    Kind::Postgres => {
                        let shows = side.clone();
                        tokio::spawn(runtime::run_out(ctx2.clone(), side, move || {
                            postgres::sink(ctx2.clone(), shows.clone())
                        }))
                    }
                    Kind::Amqp => {
                        let confirmed = amqp::ConfirmedThrough::default();
                        tokio::spawn(runtime::run_out(ctx2.clone(), side, move || {
                            amqp::sink(ctx2.clone(), confirmed.clone())
                        }))
                    }
                    Kind::Mqtt => tokio::spawn(runtime::run_out(ctx2.clone(), side, move || {
                        mqtt::sink(ctx2.clone())
                    })),
                });
            }
            if let Some(side) = &r#in {
                let (ctx2, side) = (ctx.clone(), side.clone());
                match c.kind {
                    Kind::Nats => tasks.push(tokio::spawn(runtime::run_in(
                        ctx2.clone(),
                        side,
                        move |at| nats::source(ctx2.clone(), at.ordered()),
                    ))),
                    Kind::RedisStream => tasks.push(tokio::spawn(runtime::run_in(
                        ctx2.clone(),
                        side,
                        move |at| redis_stream::source(ctx2.clone(), at.ordered()),
                    ))),
                    Kind::Kafka => tasks.push(tokio::spawn(runtime::run_in(
                        ctx2.clone(),
                        side,
                        move |at| kafka::source(ctx2.clone(), at),
                    ))),
                    Kind::Postgres => {
                        let shows = side.clone();
                        tasks.push(tokio::spawn(runtime::run_in(
                            ctx2.clone(),
                            side,
                            move |at| postgres::source(ctx2.clone(), shows.clone(), at),
                        )))
                    }
                    Kind::Amqp => tasks.push(tokio::spawn(runtime::run_in(
                        ctx2.clone(),
                        side,
                        move |at| amqp::source(ctx2.clone(), at),
                    ))),
                    Kind::Mqtt => tasks.push(tokio::spawn(runtime::run_in(
                        ctx2.clone(),
                        side,
                        move |at| mqtt::source(ctx2.clone(), at),
                    ))),
                    Kind::Webhook => unreachable!("config::check refuses webhooks in"),
                }
            }
            running.push(Running { ctx, out, r#in });
        }
        Connectors {
            running: Arc::new(running),
            metrics,
            tasks: Arc::new(std::sync::Mutex::new(tasks)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    /// Every connector: its configuration (the secret left out) and each side's state.
    pub fn status(&self) -> Value {
        let list: Vec<Value> = self
            .running
            .iter()
            .map(|r| {
                let c = &r.ctx.connector;
                let mut config = json!({
                    "name": c.name,
                    "kind": c.kind.as_str(),
                    "direction": c.direction.as_str(),
                    "namespace": c.namespace.as_str(),
                    "url": config::redacted(&c.url),
                    "dead_letter": c.dead_letter.as_str(),
                    "batch": c.batch,
                });
                match c.kind {
                    Kind::Nats => {
                        config["subject"] = json!(c.subject);
                        config["stream"] = json!(c.stream);
                    }
                    Kind::RedisStream => {
                        config["stream"] = json!(c.stream);
                        config["group"] = json!(c.group);
                    }
                    Kind::Webhook => config["attempts"] = json!(c.attempts),
                    Kind::Kafka => {
                        config["brokers"] = json!(c.brokers);
                        config["topic"] = json!(c.topic);
                        config["group"] = json!(c.group);
                    }
                    Kind::Postgres => {
                        if c.direction.receives() {
                            config["publication"] = json!(c.publication);
                            config["slot"] = json!(c.slot);
                            config["tables"] = json!(c.tables);
                        }
                        if c.direction.sends() {
                            config["table"] = json!(c.table);
                        }
                    }
                    Kind::Amqp => {
                        config["exchange"] = json!(c.exchange);
                        config["queue"] = json!(c.queue);
                        config["routing_key"] = json!(c.routing_key);
                    }
                    Kind::Mqtt => {
                        config["topic"] = json!(c.topic);
                        config["retain"] = json!(c.retain);
                    }
                }
                config["out"] = r.out.as_ref().map_or(Value::Null, |s| s.json());
                config["in"] = r.r#in.as_ref().map_or(Value::Null, |s| s.json());
                config
            })
            .collect();
        json!(list)
    }

    /// Waits for every connector's tasks after the shutdown token was cancelled.
    pub async fn stopped(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        for t in tasks {
            let _ = t.await;
        }
    }
}

impl asp_http::ConnectorsView for Connectors {
    fn status(&self) -> Value {
        Connectors::status(self)
    }

    fn register_metrics(&self, registry: &mut Registry) {
        Connectors::register_metrics(self, registry)
    }
}
