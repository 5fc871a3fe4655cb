//! Kafka (`kind = "kafka"`): out produces one record per change to `topic`, keyed by
//! the asp key, with the asp headers as record headers and the value as the record's
//! value (a delete: the headers and a null value, a tombstone), from an idempotent
//! producer that waits for every in-sync replica (`acks=all`). In reads `topic` in a
//! consumer group; the source position is, per partition, the last offset applied,
//! stored with the data it covers. On every assignment each partition starts just
//! after asp's stored offset (not at the group's committed offset), so that neither a
//! rebalance nor a crash loses or doubles a record; offsets are committed to the
//! group only after asp's write, for lag monitoring.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;

use crate::runtime::{Ctx, InMessage, OutMessage, Position, Progress, Sink, Source, Undelivered};

/// How long a request to the brokers (metadata, topic creation, watermarks) waits.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a produced record may wait for its acknowledgement (librdkafka retries
/// within it); past it the batch fails and the runtime reconnects and resends.
const DELIVERY_TIMEOUT_MS: &str = "30000";
/// How long the group waits for a silent member (a killed node) before it gives its
/// partitions to the others.
const SESSION_TIMEOUT_MS: &str = "10000";
/// How long the group waits for a member to rejoin in a rebalance (librdkafka's
/// default is 5 minutes); `fetch` polls every second or so.
const MAX_POLL_INTERVAL_MS: &str = "60000";
/// After a fetch's first record, how long it waits for more before returning.
const FETCH_LINGER: Duration = Duration::from_millis(20);

/// What librdkafka reports besides results: its log, and its errors (kept for status).
struct Cx {
    name: String,
    /// The last error librdkafka reported and whether it said every broker is down.
    last_error: Arc<Mutex<Option<(String, bool)>>>,
    ctx: Option<Arc<Ctx>>,
}

impl Cx {
    fn new(ctx: &Arc<Ctx>, with_ctx: bool) -> Cx {
        Cx {
            name: ctx.connector.name.clone(),
            last_error: Arc::default(),
            ctx: with_ctx.then(|| ctx.clone()),
        }
    }

    fn last_error(&self) -> Option<(String, bool)> {
        self.last_error.lock().unwrap().clone()
    }
}

fn all_brokers_down(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown)
}

impl ClientContext for Cx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                tracing::warn!(connector = %self.name, "librdkafka {fac}: {message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(connector = %self.name, "librdkafka {fac}: {message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(connector = %self.name, "librdkafka {fac}: {message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(connector = %self.name, "librdkafka: {error}: {reason}");
        *self.last_error.lock().unwrap() =
            Some((format!("{error}: {reason}"), all_brokers_down(&error)));
    }
}

impl ConsumerContext for Cx {
    /// Assigns each partition from just after the offset asp stored for it (from its
    /// beginning when asp stored none), instead of the group's committed offset: the
    /// stored offset is written with the data, so it is never ahead of what asp
    /// applied, and the runtime drops what it re-reads. Revocations and errors are
    /// handled as librdkafka's default does.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            rdkafka::consumer::RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let ctx = self.ctx.as_ref().expect("a consumer's context has its Ctx");
                let stored = match crate::runtime::stored_progress(&ctx.store, &ctx.connector) {
                    Ok(Progress::Partitions(map)) => map,
                    Ok(_) => BTreeMap::new(),
                    Err(e) => {
                        // From the beginning: nothing is lost, and the runtime drops
                        // what it applied already (its own progress is in memory).
                        tracing::warn!(connector = %self.name, "reading the stored offsets: {e}; assigning from each partition's beginning");
                        BTreeMap::new()
                    }
                };
                let partitions: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                for (topic, p) in &partitions {
                    let offset = match stored.get(&(*p as u64)) {
                        Some(&o) => Offset::Offset(o as i64 + 1),
                        None => Offset::Beginning,
                    };
                    if let Err(e) = tpl.set_partition_offset(topic, *p, offset) {
                        tracing::warn!(connector = %self.name, "setting partition {p}'s offset: {e}");
                    }
                }
                tracing::info!(connector = %self.name, "assigned partitions {partitions:?}, from asp's stored offsets {stored:?}");
                match cooperative {
                    true => consumer.incremental_assign(tpl),
                    false => consumer.assign(tpl),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(connector = %self.name, "partitions revoked");
                match cooperative {
                    true => consumer.incremental_unassign(tpl),
                    false => consumer.unassign(),
                }
            }
            other => {
                tracing::warn!(connector = %self.name, "rebalance error {other:?}");
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::warn!(connector = %self.name, "applying a rebalance: {e}");
        }
    }
}

/// The settings every client of connector `ctx` shares.
fn client_config(ctx: &Ctx) -> ClientConfig {
    let c = &ctx.connector;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &c.brokers)
        .set("client.id", format!("asp-{}-{}", c.name, ctx.node))
        .set("socket.timeout.ms", "10000")
        .set("reconnect.backoff.max.ms", "2000")
        .set("log.connection.close", "false");
    config
}

/// Creates the topic if it is missing, with the brokers' default partition count and
/// replication factor. Also what shows a broker out of reach before anything else.
async fn ensure_topic(ctx: &Arc<Ctx>) -> Result<(), String> {
    let c = &ctx.connector;
    let admin: AdminClient<Cx> = client_config(ctx)
        .create_with_context(Cx::new(ctx, false))
        .map_err(|e| format!("brokers {}: {e}", c.brokers))?;
    let topic = NewTopic::new(&c.topic, -1, TopicReplication::Fixed(-1));
    let options = AdminOptions::new()
        .request_timeout(Some(REQUEST_TIMEOUT))
        .operation_timeout(Some(REQUEST_TIMEOUT));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .map_err(|e| format!("creating topic {} on {}: {e}", c.topic, c.brokers))?;
    for r in results {
        match r {
            Ok(_) => tracing::info!(connector = %c.name, "created topic {}", c.topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(format!(
                    "creating topic {} on {}: {code}",
                    c.topic, c.brokers
                ));
            }
        }
    }
    Ok(())
}

pub(crate) struct KafkaSink {
    producer: FutureProducer<Cx>,
    /// The producer's [`Cx::last_error`].
    last_error: Arc<Mutex<Option<(String, bool)>>>,
    ctx: Arc<Ctx>,
}

pub(crate) async fn sink(ctx: Arc<Ctx>) -> Result<KafkaSink, String> {
    ensure_topic(&ctx).await?;
    let cx = Cx::new(&ctx, false);
    let last_error = cx.last_error.clone();
    let producer: FutureProducer<Cx> = client_config(&ctx)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Java clients' partitioner: a key goes to the partition they would pick.
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", DELIVERY_TIMEOUT_MS)
        .set("linger.ms", "5")
        .create_with_context(cx)
        .map_err(|e| format!("creating a producer for {}: {e}", ctx.connector.brokers))?;
    Ok(KafkaSink {
        producer,
        last_error,
        ctx,
    })
}

impl KafkaSink {
    /// Why a delivery failed, with what librdkafka said besides.
    fn failure(&self, e: &KafkaError) -> String {
        let c = &self.ctx.connector;
        let mut why = format!("producing to topic {}: {e}", c.topic);
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            why.push_str(&format!(
                " (the producer failed for good: {code}: {reason})"
            ));
        } else if let Some((last, _)) = self.last_error.lock().unwrap().clone() {
            why.push_str(&format!(" (last broker error: {last})"));
        }
        why
    }
}

/// A record error that sending again cannot cure: the record goes to the dead-letter
/// namespace.
fn permanent(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidMessageSize
        )
    )
}

impl Sink for KafkaSink {
    async fn send(&mut self, batch: &[OutMessage]) -> Result<Undelivered, String> {
        let c = &self.ctx.connector;
        let mut deliveries = Vec::with_capacity(batch.len());
        let mut undelivered = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            let mut headers = OwnedHeaders::new_with_capacity(7);
            for (name, value) in m.headers(&self.ctx.cluster) {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                });
            }
            let mut record = FutureRecord::<[u8], [u8]>::to(&c.topic)
                .key(m.key.as_bytes())
                .headers(headers);
            if let Some((_, v)) = &m.value {
                record = record.payload(&v[..]);
            }
            // The producer's queue is bounded: wait for room rather than fail.
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push((i, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err((e, _)) if permanent(&e) => {
                        undelivered.push((i, self.failure(&e)));
                        break;
                    }
                    Err((e, _)) => return Err(self.failure(&e)),
                }
            }
        }
        for (i, delivery) in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) if permanent(&e) => undelivered.push((i, self.failure(&e))),
                Ok(Err((e, _))) => return Err(self.failure(&e)),
                Err(_) => {
                    return Err(format!(
                        "producing to topic {}: the producer stopped",
                        c.topic
                    ));
                }
            }
        }
        undelivered.sort_by_key(|(i, _)| *i);
        Ok(undelivered)
    }
}

pub(crate) struct KafkaSource {
    /// In an `Option` only to be dropped off the async threads (closing a consumer
    /// leaves its group, which waits for the brokers).
    consumer: Option<Arc<StreamConsumer<Cx>>>,
    ctx: Arc<Ctx>,
    /// Per partition, the last offset `fetch` returned (or asp applied at the start).
    last: BTreeMap<i32, i64>,
    heads: Arc<Heads>,
}

pub(crate) async fn source(ctx: Arc<Ctx>, applied: Progress) -> Result<KafkaSource, String> {
    let c = &ctx.connector;
    ensure_topic(&ctx).await?;
    let consumer: StreamConsumer<Cx> = client_config(&ctx)
        .set("group.id", &c.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", SESSION_TIMEOUT_MS)
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", MAX_POLL_INTERVAL_MS)
        .create_with_context(Cx::new(&ctx, true))
        .map_err(|e| format!("creating a consumer for {}: {e}", c.brokers))?;
    consumer
        .subscribe(&[&c.topic])
        .map_err(|e| format!("subscribing to topic {}: {e}", c.topic))?;
    let last = match applied {
        Progress::Partitions(map) => map.into_iter().map(|(p, o)| (p as i32, o as i64)).collect(),
        _ => BTreeMap::new(),
    };
    Ok(KafkaSource {
        consumer: Some(Arc::new(consumer)),
        ctx,
        last,
        heads: Arc::default(),
    })
}

impl Drop for KafkaSource {
    /// Closing a consumer leaves its group, which waits for the group's rebalance
    /// (up to `max.poll.interval.ms` if another member is slow to rejoin): on a thread
    /// of its own, which a stopping node does not wait for.
    fn drop(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            let _ = std::thread::Builder::new()
                .name("kafka-close".into())
                .spawn(move || drop(consumer));
        }
    }
}

/// A record as the runtime takes it.
fn message(m: &BorrowedMessage<'_>) -> InMessage {
    let mut fields = Vec::new();
    if let Some(headers) = m.headers() {
        for h in headers.iter() {
            let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
            fields.push((h.key.to_owned(), value.into_owned()));
        }
    }
    let header = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let key = match m.key() {
        Some(k) => std::str::from_utf8(k).ok().map(str::to_owned),
        None => header("asp-key"),
    };
    // A record without a value is a tombstone: a delete, unless it says otherwise.
    let op = header("asp-op").or_else(|| m.payload().is_none().then(|| "delete".to_owned()));
    let mut in_message = InMessage {
        position: Position(m.partition() as u64, m.offset() as u64),
        key,
        op,
        content_type: header("content-type"),
        value: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
        cluster: header("asp-cluster"),
        ..Default::default()
    };
    if let Some(k) = m.key() {
        fields.push((
            "kafka-key".to_owned(),
            String::from_utf8_lossy(k).into_owned(),
        ));
    }
    in_message.fields = fields;
    in_message
}

impl KafkaSource {
    fn consumer(&self) -> &Arc<StreamConsumer<Cx>> {
        self.consumer.as_ref().expect("taken only on drop")
    }

    /// An error that ends this connection (the runtime reconnects): the brokers are
    /// all out of reach, or the client failed for good.
    fn fatal(&self, e: &KafkaError) -> Option<String> {
        let c = &self.ctx.connector;
        let fatal = matches!(e, KafkaError::MessageConsumptionFatal(_));
        (fatal || all_brokers_down(e))
            .then(|| format!("consuming topic {} from {}: {e}", c.topic, c.brokers))
    }
}

impl Source for KafkaSource {
    async fn fetch(&mut self, max: usize) -> Result<Vec<InMessage>, String> {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(1);
        let consumer = self.consumer().clone();
        let mut out = Vec::new();
        while out.len() < max {
            let now = Instant::now();
            let wait = match out.is_empty() {
                true => deadline.saturating_duration_since(now),
                false => FETCH_LINGER.min(deadline.saturating_duration_since(now)),
            };
            match tokio::time::timeout(wait, consumer.recv()).await {
                Err(_) => break,
                Ok(Ok(m)) => {
                    let m = message(&m);
                    self.last.insert(m.position.0 as i32, m.position.1 as i64);
                    out.push(m);
                }
                Ok(Err(e)) => match self.fatal(&e) {
                    Some(why) if out.is_empty() => return Err(why),
                    Some(_) => break,
                    None => {
                        tracing::debug!(connector = %self.ctx.connector.name, "consuming: {e}")
                    }
                },
            }
        }
        if out.is_empty()
            && let Some((why, true)) = consumer.context().last_error()
        {
            *consumer.context().last_error.lock().unwrap() = None;
            return Err(format!(
                "consuming topic {}: {why}",
                self.ctx.connector.topic
            ));
        }
        Ok(out)
    }

    /// After the batch is written: commits, per partition, the offset after the last
    /// record applied, so that the group's lag shows in Kafka's tools. Only for
    /// monitoring (asp starts from its own stored offsets), so a failed commit (a
    /// partition moved to another member meanwhile) is logged, not an error.
    async fn ack(&mut self, batch: &[InMessage]) -> Result<(), String> {
        let c = &self.ctx.connector;
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        for m in batch {
            let (p, o) = (m.position.0 as i32, m.position.1 as i64 + 1);
            let e = next.entry(p).or_insert(o);
            *e = (*e).max(o);
        }
        if next.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in next {
            if let Err(e) = tpl.add_partition_offset(&c.topic, p, Offset::Offset(o)) {
                tracing::debug!(connector = %c.name, "committing partition {p}: {e}");
            }
        }
        if let Err(e) = self.consumer().commit(&tpl, CommitMode::Async) {
            tracing::debug!(connector = %c.name, "committing offsets: {e}");
        }
        Ok(())
    }

    /// The partitions' high watermarks (`partition:offset,...`), and the records past
    /// what this side read, as the last query found them. The query (a metadata and a
    /// watermark request per partition, up to seconds against a slow broker) runs on a
    /// thread of its own, one at a time, so that it never holds up the ingest: waiting
    /// for it here cost two thirds of the in side's time against tansu.
    async fn head(&mut self) -> Option<(String, u64)> {
        if !self.heads.querying.swap(true, Ordering::AcqRel) {
            let consumer = self.consumer().clone();
            let topic = self.ctx.connector.topic.clone();
            let last = self.last.clone();
            let heads = self.heads.clone();
            tokio::task::spawn_blocking(move || {
                let found = query_heads(&consumer, &topic, &last);
                let mut shown = heads.last.lock().unwrap_or_else(PoisonError::into_inner);
                if found.is_some() {
                    *shown = found;
                }
                heads.querying.store(false, Ordering::Release);
            });
        }
        self.heads
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// What `head` found last, and whether a query is under way.
#[derive(Default)]
struct Heads {
    querying: AtomicBool,
    last: Mutex<Option<(String, u64)>>,
}

/// Queries the brokers for the high watermark of each of `topic`'s partitions.
fn query_heads(
    consumer: &StreamConsumer<Cx>,
    topic: &str,
    last: &BTreeMap<i32, i64>,
) -> Option<(String, u64)> {
    let timeout = Duration::from_secs(2);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).ok()?;
    let t = metadata.topics().iter().find(|t| t.name() == topic)?;
    let mut heads = Vec::new();
    let mut lag = 0u64;
    let mut partitions: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    partitions.sort_unstable();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout).ok()?;
        let next = last.get(&p).map_or(low, |o| o + 1).max(low);
        lag += high.saturating_sub(next).max(0) as u64;
        heads.push(format!("{p}:{high}"));
    }
    Some((heads.join(","), lag))
}
