//! What every connector shares: the out side reads the node's feed in order and hands
//! a sink one bounded batch at a time, moving its saved position only past what the
//! sink took; the in side takes a source's batch, drops what it already applied
//! (at or before the stored source position) and what this cluster published, sends
//! malformed messages to the dead-letter namespace, and writes the rest with the new
//! source position in one atomic step.

use std::sync::Arc;
use std::time::Duration;

use asp_core::{ContentType, Dot, Hlc, Key, Namespace, NodeId, Op};
use asp_store::{Checkpoint, Store, WriteError, WriteOp};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{BACKOFF_MAX, Connector};
use crate::status::Side;

/// The replicated namespace that holds each connector's source position (key: the
/// connector's name), written with the data it covers.
pub const POSITIONS_NAMESPACE: &str = "_asp.connectors";

/// Everything a connector's tasks share.
pub(crate) struct Ctx {
    pub store: Store,
    pub connector: Connector,
    pub cluster: String,
    pub node: NodeId,
    pub shutdown: CancellationToken,
}

/// One change of the connected namespace, as a sink sends it.
#[derive(Clone, Debug)]
pub(crate) struct OutMessage {
    /// Its position in this node's feed.
    pub seq: u64,
    pub key: String,
    /// `None`: a delete.
    pub value: Option<(ContentType, Bytes)>,
    pub dot: Dot,
    pub hlc: Hlc,
}

impl OutMessage {
    pub fn op(&self) -> &'static str {
        if self.value.is_some() {
            "put"
        } else {
            "delete"
        }
    }

    /// The headers every kind sends (as headers or as fields).
    pub fn headers(&self, cluster: &str) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("asp-origin", self.dot.origin.to_string()),
            ("asp-dot", self.dot.to_string()),
            ("asp-version", self.hlc.to_string()),
            ("asp-op", self.op().to_owned()),
            ("asp-key", self.key.clone()),
            ("asp-cluster", cluster.to_owned()),
        ];
        if let Some((ct, _)) = &self.value {
            h.push(("content-type", ct.mime().to_owned()));
        }
        h
    }
}

/// What a sink could not deliver, by index in the batch, with the reason: the
/// runtime writes each to the dead-letter namespace.
pub(crate) type Undelivered = Vec<(usize, String)>;

pub(crate) trait Sink: Send {
    /// Delivers `batch` in order, at least once. `Err`: nothing can be said of the
    /// batch (a connection failure); the runtime reconnects and sends it again.
    fn send(
        &mut self,
        batch: &[OutMessage],
    ) -> impl std::future::Future<Output = Result<Undelivered, String>> + Send;
}

/// A source position: a JetStream stream sequence (`n`, `0`) or a Redis entry id
/// (`ms`, `seq`). Ordered as the source orders its messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Position(pub u64, pub u64);

impl Position {
    pub fn parse(text: &str) -> Option<Position> {
        match text.split_once('-') {
            Some((a, b)) => Some(Position(a.parse().ok()?, b.parse().ok()?)),
            None => Some(Position(text.parse().ok()?, 0)),
        }
    }

    /// `a-b` for Redis, and for any position whose second part is not 0 (PostgreSQL's
    /// (commit LSN, index)), so that the stored record keeps both; `a` otherwise.
    pub fn render(self, redis: bool) -> String {
        if redis || self.1 != 0 {
            format!("{}-{}", self.0, self.1)
        } else {
            self.0.to_string()
        }
    }
}

/// How many message ids of a queue without positions a position record remembers,
/// per message of a batch: a redelivered message is one delivered but not
/// acknowledged, so at most the batches in flight (the source keeps at most two
/// batches unacknowledged).
pub(crate) const RECENT_BATCHES: usize = 4;

/// The same for MQTT: Mosquitto 2.0 resuming a session writes its whole queue before it
/// reads PUBACKs again, so a crash soon after a reconnect can leave several thousand
/// applied messages unacknowledged (5,000 seen in CI with batch 1000, past a window of 4
/// batches). docs/CONNECTORS.md, MQTT, Limits.
pub(crate) const MQTT_RECENT_BATCHES: usize = 16;

/// What an in side has applied, stored in its position record with each batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// A source that orders all its messages (JetStream, Redis Streams, PostgreSQL):
    /// the last position applied.
    Ordered(Option<Position>),
    /// Kafka: per partition (`Position.0`), the last offset applied (`Position.1`).
    Partitions(std::collections::BTreeMap<u64, u64>),
    /// A queue without positions (AMQP, MQTT): how many messages were applied, and the
    /// ids of the most recent ones, oldest first, at most `cap`.
    Recent {
        applied: u64,
        ids: std::collections::VecDeque<u64>,
        cap: usize,
    },
}

impl Progress {
    /// Nothing applied yet, for connector `c`.
    pub fn new(c: &Connector) -> Progress {
        use crate::config::Kind;
        match c.kind {
            Kind::Kafka => Progress::Partitions(Default::default()),
            Kind::Amqp | Kind::Mqtt => Progress::Recent {
                applied: 0,
                ids: Default::default(),
                cap: c.batch
                    * if c.kind == Kind::Mqtt {
                        MQTT_RECENT_BATCHES
                    } else {
                        RECENT_BATCHES
                    },
            },
            _ => Progress::Ordered(None),
        }
    }

    /// The last position of an ordered source.
    pub fn ordered(&self) -> Option<Position> {
        match self {
            Progress::Ordered(p) => *p,
            _ => None,
        }
    }

    /// Whether `m` was applied already.
    pub fn covers(&self, m: &InMessage) -> bool {
        match self {
            Progress::Ordered(p) => p.is_some_and(|p| m.position <= p),
            Progress::Partitions(map) => map
                .get(&m.position.0)
                .is_some_and(|&offset| m.position.1 <= offset),
            Progress::Recent { ids, .. } => m.redelivered && ids.contains(&m.id),
        }
    }

    /// Counts `m` as applied.
    pub fn advance(&mut self, m: &InMessage) {
        match self {
            Progress::Ordered(p) => *p = Some(m.position),
            Progress::Partitions(map) => {
                map.insert(m.position.0, m.position.1);
            }
            Progress::Recent { applied, ids, cap } => {
                *applied += 1;
                ids.push_back(m.id);
                while ids.len() > *cap {
                    ids.pop_front();
                }
            }
        }
    }

    /// The position as status and records show it.
    pub fn render(&self, kind: crate::config::Kind) -> String {
        match self {
            Progress::Ordered(None) => String::new(),
            Progress::Ordered(Some(p)) => p.render(kind == crate::config::Kind::RedisStream),
            Progress::Partitions(map) => map
                .iter()
                .map(|(p, o)| format!("{p}:{o}"))
                .collect::<Vec<_>>()
                .join(","),
            Progress::Recent { applied, .. } => applied.to_string(),
        }
    }

    /// The record's members for this progress.
    fn record(&self, kind: crate::config::Kind, record: &mut serde_json::Value) {
        record["position"] = json!(self.render(kind));
        match self {
            Progress::Ordered(_) => {}
            Progress::Partitions(map) => {
                record["partitions"] = map.iter().map(|(p, o)| (p.to_string(), json!(o))).collect();
            }
            Progress::Recent { applied, ids, .. } => {
                record["applied"] = json!(applied);
                // 8 bytes per id, little-endian, in base64: a quarter of the hex array
                // older records hold (both are read).
                let mut bytes = Vec::with_capacity(ids.len() * 8);
                for id in ids {
                    bytes.extend_from_slice(&id.to_le_bytes());
                }
                record["recent"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
            }
        }
    }

    /// The progress a stored record holds, for connector `c`.
    fn from_record(c: &Connector, v: &serde_json::Value) -> Result<Progress, String> {
        let bad = |what: &str| format!("the stored position of {} has {what}", c.name);
        let mut progress = Progress::new(c);
        match &mut progress {
            Progress::Ordered(p) => {
                let text = v["position"].as_str().unwrap_or_default();
                *p = Some(
                    Position::parse(text)
                        .ok_or_else(|| bad(&format!("{text:?}, not a position")))?,
                );
            }
            Progress::Partitions(map) => {
                let parts = v["partitions"]
                    .as_object()
                    .ok_or_else(|| bad("no partitions"))?;
                for (p, o) in parts {
                    let p = p.parse().map_err(|_| bad(&format!("partition {p:?}")))?;
                    let o = o.as_u64().ok_or_else(|| bad(&format!("offset {o}")))?;
                    map.insert(p, o);
                }
            }
            Progress::Recent { applied, ids, cap } => {
                *applied = v["applied"]
                    .as_u64()
                    .ok_or_else(|| bad("no applied count"))?;
                match &v["recent"] {
                    serde_json::Value::String(text) => {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(text)
                            .ok()
                            .filter(|b| b.len() % 8 == 0)
                            .ok_or_else(|| bad("recent ids that are not base64 of 8-byte ids"))?;
                        for id in bytes.chunks_exact(8) {
                            ids.push_back(u64::from_le_bytes(id.try_into().expect("8 bytes")));
                        }
                    }
                    // Records written before 2026-12: hex strings.
                    serde_json::Value::Array(recent) => {
                        for id in recent {
                            let id = id
                                .as_str()
                                .and_then(|t| u64::from_str_radix(t, 16).ok())
                                .ok_or_else(|| bad(&format!("recent id {id}")))?;
                            ids.push_back(id);
                        }
                    }
                    _ => return Err(bad("no recent ids")),
                }
                while ids.len() > *cap {
                    ids.pop_front();
                }
            }
        }
        Ok(progress)
    }

    /// A message's name in dead-letter keys.
    fn name_of(&self, kind: crate::config::Kind, m: &InMessage) -> String {
        match self {
            Progress::Ordered(_) => m.position.render(kind == crate::config::Kind::RedisStream),
            Progress::Partitions(_) => format!("{}-{}", m.position.0, m.position.1),
            Progress::Recent { .. } => format!("{:016x}", m.id),
        }
    }
}

/// One message read from a source.
#[derive(Clone, Debug, Default)]
pub(crate) struct InMessage {
    /// Where the source keeps it: a JetStream sequence or Redis entry id, a PostgreSQL
    /// LSN, a Kafka (partition, offset), or for queues without positions (AMQP, MQTT)
    /// the order of delivery on this connection.
    pub position: Position,
    /// Queues without positions: a hash of the message's id (or of its content when it
    /// has none), remembered with each batch to drop a redelivered duplicate.
    pub id: u64,
    /// Queues without positions: the source says it delivered this message before.
    pub redelivered: bool,
    /// The key it names (from the subject, a header or a field), as sent.
    pub key: Option<String>,
    /// `put`, `delete`, or what else was sent.
    pub op: Option<String>,
    pub content_type: Option<String>,
    pub value: Bytes,
    /// The `asp-cluster` the message carries: set on what asp published.
    pub cluster: Option<String>,
    /// Every header or field, for the dead-letter record.
    pub fields: Vec<(String, String)>,
}

pub(crate) trait Source: Send {
    /// The next messages after the ones returned before, at most `max`; may wait a
    /// little (about a second) for some, and return none.
    fn fetch(
        &mut self,
        max: usize,
    ) -> impl std::future::Future<Output = Result<Vec<InMessage>, String>> + Send;
    /// Tells the source these are applied (Redis: `XACK`).
    fn ack(
        &mut self,
        batch: &[InMessage],
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
    /// The source's newest position and how many messages lie past `after`, if it
    /// can tell.
    fn head(&mut self) -> impl std::future::Future<Output = Option<(String, u64)>> + Send;
}

/// Exponential backoff with jitter, 100 ms doubling to [`BACKOFF_MAX`]. Shared by
/// reference between a side's supervisor and the loop it runs (which resets it after
/// progress).
pub(crate) struct Backoff(std::sync::atomic::AtomicU32);

impl Backoff {
    pub fn new() -> Self {
        Backoff(std::sync::atomic::AtomicU32::new(0))
    }
    pub fn reset(&self) {
        self.0.store(0, std::sync::atomic::Ordering::Relaxed);
    }
    /// Waits the next delay; `false` if the node is stopping.
    pub async fn wait(&self, shutdown: &CancellationToken) -> bool {
        let tries = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = Duration::from_millis(100).saturating_mul(1 << tries.min(7));
        let base = base.min(BACKOFF_MAX);
        let jitter = rand::random_range(0..=base.as_millis() as u64 / 4);
        let delay = base + Duration::from_millis(jitter);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Keeps one side running until the node stops: `attempt` connects and runs it
/// (`Ok`: the node is stopping; `Err`: why it failed, shown in status), and is tried
/// again after a backoff. The attempt watches the shutdown itself, so that a write in
/// hand is finished.
async fn supervise<F, Fut>(ctx: &Ctx, side: &Side, backoff: &Backoff, attempt: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    while !ctx.shutdown.is_cancelled() {
        side.set_state("connecting");
        match attempt().await {
            Ok(()) => break,
            Err(e) => side.error(e),
        }
        if !backoff.wait(&ctx.shutdown).await {
            break;
        }
    }
    side.set_state("stopped");
}

/// The out side: connects with `connect`, then sends the namespace's changes from the
/// saved feed position on, until the node stops.
pub(crate) async fn run_out<S, F, Fut>(ctx: Arc<Ctx>, side: Arc<Side>, connect: F)
where
    S: Sink,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<S, String>>,
{
    let backoff = Backoff::new();
    let (ctx, side, backoff, connect) = (&*ctx, &*side, &backoff, &connect);
    supervise(ctx, side, backoff, || async move {
        let sink = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            s = connect() => s?,
        };
        side.set_state("running");
        send_feed(ctx, side, sink, backoff).await
    })
    .await;
}

/// Sends the feed until the node stops (`Ok`) or the sink fails (`Err`).
async fn send_feed<S: Sink>(
    ctx: &Ctx,
    side: &Side,
    mut sink: S,
    backoff: &Backoff,
) -> Result<(), String> {
    let c = &ctx.connector;
    let store = &ctx.store;
    let mut position = store.connector_position(&c.name);
    let mut reader = store.feed_reader(None, position);
    let mut heads = store.subscribe();
    let positions_ns = POSITIONS_NAMESPACE;
    // The dots this connector's in side gave the batches it wrote (on any node), from
    // the `batch` member the store adds to each position record: those events came
    // from the source, and sending them back would echo. The newest ranges are kept;
    // a batch's events follow its record closely in every feed.
    let mut ingested = Ingested::default();
    // The newest record's batch may straddle the saved position (a restart in the
    // middle of it): its record is behind the position, so it is read here.
    let positions = Namespace::new(positions_ns).expect("a valid name");
    if let Ok(Some(state)) = store.get(&positions, &c.name)
        && let Some(value) = state.value
        && let Some(range) = ingested_range(&value.bytes, &c.namespace)
    {
        ingested.insert(range);
    }
    loop {
        let events = reader
            .read(c.batch * 4)
            .map_err(|e| format!("reading the feed: {e}"))?;
        if events.is_empty() {
            let head = store.head().seq;
            side.at(position, head, head.saturating_sub(position));
            heads.borrow_and_update();
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                changed = heads.changed() => if changed.is_err() { return Ok(()) },
                // The position of what was read (other namespaces) is saved now and then.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if reader.position() > position {
                position = reader.position();
                store
                    .save_connector_position(&c.name, position)
                    .map_err(|e| format!("saving the position: {e}"))?;
            }
            continue;
        }
        let mut batch = Vec::with_capacity(events.len());
        for fe in &events {
            let e = &fe.event;
            if e.namespace.as_str() == positions_ns {
                if e.key.as_str() == c.name
                    && let Op::Put { value, .. } = &e.op
                    && let Some(range) = ingested_range(value, &c.namespace)
                {
                    ingested.insert(range);
                }
                continue;
            }
            if e.namespace != c.namespace {
                continue;
            }
            if ingested.contains(e.dot.origin, e.dot.counter) {
                continue;
            }
            batch.push(OutMessage {
                seq: fe.seq,
                key: e.key.as_str().to_owned(),
                value: match &e.op {
                    Op::Put {
                        content_type,
                        value,
                    } => Some((*content_type, value.clone())),
                    Op::Delete => None,
                },
                dot: e.dot,
                hlc: e.hlc,
            });
        }
        for chunk in batch.chunks(c.batch) {
            let undelivered = tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                r = sink.send(chunk) => r?,
            };
            for (i, reason) in undelivered {
                let m = &chunk[i];
                dead_letter(
                    ctx,
                    side,
                    &format!("out/{}", m.dot),
                    json!({
                        "key": m.key,
                        "op": m.op(),
                        "dot": m.dot.to_string(),
                        "version": m.hlc.to_string(),
                        "value": m.value.as_ref().map(|(ct, v)| text_or_base64(*ct, v)),
                        "content_type": m.value.as_ref().map(|(ct, _)| ct.mime()),
                    }),
                    &reason,
                )
                .await?;
            }
            side.count(chunk.len() as u64);
            backoff.reset();
            let last = chunk.last().expect("chunks are not empty").seq;
            store
                .save_connector_position(&c.name, last)
                .map_err(|e| format!("saving the position: {e}"))?;
        }
        position = reader.position();
        store
            .save_connector_position(&c.name, position)
            .map_err(|e| format!("saving the position: {e}"))?;
        let head = store.head().seq;
        side.at(position, head, head.saturating_sub(position));
    }
}

/// How many ingested batches the out side remembers (see `send_feed`).
const INGESTED_RANGES_MAX: usize = 4096;

/// The dot ranges of the newest ingested batches, looked up in logarithmic time.
#[derive(Default)]
struct Ingested {
    /// (origin, first counter) → one past the last counter.
    ranges: std::collections::BTreeMap<(NodeId, u64), u64>,
    /// Insertion order, to forget the oldest.
    order: std::collections::VecDeque<(NodeId, u64)>,
}

impl Ingested {
    fn insert(&mut self, (origin, first, count): (NodeId, u64, u64)) {
        if self
            .ranges
            .insert((origin, first), first.saturating_add(count))
            .is_none()
        {
            self.order.push_back((origin, first));
        }
        if self.order.len() > INGESTED_RANGES_MAX
            && let Some(oldest) = self.order.pop_front()
        {
            self.ranges.remove(&oldest);
        }
    }

    fn contains(&self, origin: NodeId, counter: u64) -> bool {
        self.ranges
            .range((origin, 0)..=(origin, counter))
            .next_back()
            .is_some_and(|(_, &end)| counter < end)
    }
}

/// The dots a position record's batch got (`batch` added by the store), if the batch
/// went to `namespace`: (origin, first counter, count).
fn ingested_range(record: &[u8], namespace: &Namespace) -> Option<(NodeId, u64, u64)> {
    let v: serde_json::Value = serde_json::from_slice(record).ok()?;
    let b = &v["batch"];
    if b["namespace"].as_str()? != namespace.as_str() {
        return None;
    }
    let origin = b["origin"].as_str()?.parse().ok()?;
    Some((origin, b["first"].as_u64()?, b["count"].as_u64()?))
}

/// A value for a JSON record: its text when it is text, base64 otherwise.
pub(crate) fn text_or_base64(ct: ContentType, v: &[u8]) -> serde_json::Value {
    use base64::Engine as _;
    match (ct, std::str::from_utf8(v)) {
        (ContentType::Json | ContentType::Text, Ok(t)) => json!(t),
        _ => json!({"base64": base64::engine::general_purpose::STANDARD.encode(v)}),
    }
}

/// Writes one dead-letter record: key `<connector>/<what>`, the message and why.
pub(crate) async fn dead_letter(
    ctx: &Ctx,
    side: &Side,
    what: &str,
    message: serde_json::Value,
    reason: &str,
) -> Result<(), String> {
    let c = &ctx.connector;
    let key = format!("{}/{what}", c.name);
    let record = json!({
        "connector": c.name,
        "kind": c.kind.as_str(),
        "namespace": c.namespace.as_str(),
        "reason": reason,
        "message": message,
        "at_ms": asp_store::clock::wall_ms(),
        "node": ctx.node.to_string(),
    });
    let key = Key::new(&key).map_err(|e| format!("dead-letter key {key:?}: {e}"))?;
    let op = WriteOp::put(
        key,
        ContentType::Json,
        serde_json::to_vec(&record).expect("JSON"),
    );
    write_retrying(ctx, c.dead_letter.clone(), vec![op], None).await?;
    tracing::warn!(connector = %c.name, reason, "a message went to the dead-letter namespace {}", c.dead_letter);
    side.dead_letter(1);
    Ok(())
}

/// Writes, waiting out an overloaded writer; other failures are the caller's.
async fn write_retrying(
    ctx: &Ctx,
    namespace: Namespace,
    ops: Vec<WriteOp>,
    checkpoint: Option<Checkpoint>,
) -> Result<(), String> {
    try_write(ctx, namespace.clone(), ops, checkpoint)
        .await
        .map_err(|e| format!("writing to {namespace}: {e}"))
}

/// [`write_retrying`], with the store's refusal as it is.
async fn try_write(
    ctx: &Ctx,
    namespace: Namespace,
    ops: Vec<WriteOp>,
    checkpoint: Option<Checkpoint>,
) -> Result<(), WriteError> {
    loop {
        let r = match &checkpoint {
            Some(cp) => {
                ctx.store
                    .write_with_checkpoint(namespace.clone(), ops.clone(), cp.clone())
                    .await
            }
            None => ctx.store.write(namespace.clone(), ops.clone()).await,
        };
        match r {
            Ok(_) => return Ok(()),
            Err(WriteError::Overloaded { .. }) if !ctx.shutdown.is_cancelled() => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What connector `c` has applied, as its stored position record says.
pub(crate) fn stored_progress(store: &Store, c: &Connector) -> Result<Progress, String> {
    let ns = Namespace::new(POSITIONS_NAMESPACE).expect("a valid name");
    let Some(state) = store
        .get(&ns, &c.name)
        .map_err(|e| format!("reading the stored position: {e}"))?
    else {
        return Ok(Progress::new(c));
    };
    let Some(value) = state.value else {
        return Ok(Progress::new(c));
    };
    let v: serde_json::Value = serde_json::from_slice(&value.bytes)
        .map_err(|e| format!("the stored position of {} is not JSON: {e}", c.name))?;
    Progress::from_record(c, &v)
}

/// The in side: connects with `connect` (given what was applied), then writes what
/// the source sends until the node stops.
pub(crate) async fn run_in<S, F, Fut>(ctx: Arc<Ctx>, side: Arc<Side>, connect: F)
where
    S: Source,
    F: Fn(Progress) -> Fut,
    Fut: std::future::Future<Output = Result<S, String>>,
{
    let backoff = Backoff::new();
    let (ctx, side, backoff, connect) = (&*ctx, &*side, &backoff, &connect);
    supervise(ctx, side, backoff, || async move {
        let stored = stored_progress(&ctx.store, &ctx.connector)?;
        let source = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            s = connect(stored.clone()) => s?,
        };
        side.set_state("running");
        ingest(ctx, side, source, stored, backoff).await
    })
    .await;
}

async fn ingest<S: Source>(
    ctx: &Ctx,
    side: &Side,
    mut source: S,
    mut progress: Progress,
    backoff: &Backoff,
) -> Result<(), String> {
    let c = &ctx.connector;
    let value_max = ctx.store.config().value_bytes_max;
    let mut polls = 0u32;
    let mut fetched: Option<Vec<InMessage>> = None;
    loop {
        let batch = match fetched.take() {
            Some(batch) => batch,
            None => tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                b = source.fetch(c.batch) => b?,
            },
        };
        polls += 1;
        if (batch.is_empty() || polls.is_multiple_of(16))
            && let Some((head, lag)) = source.head().await
        {
            side.at(progress.render(c.kind), head, lag);
        }
        if batch.is_empty() {
            continue;
        }
        let before = progress.clone();
        let mut ops = Vec::with_capacity(batch.len());
        let mut moved = false;
        for m in &batch {
            if progress.covers(m) {
                side.duplicate(1);
                continue;
            }
            progress.advance(m);
            moved = true;
            if m.cluster.as_deref() == Some(ctx.cluster.as_str()) {
                side.echo(1);
                continue;
            }
            match to_op(m, value_max) {
                Ok(op) => ops.push((m, op)),
                Err(reason) => in_dead_letter(ctx, side, &progress, m, &reason).await?,
            }
        }
        // The batch is written while the next one is fetched (the source's round trip
        // and the store's fsync overlap); it is acknowledged only once written.
        let write = async {
            match moved {
                true => write_batch(ctx, side, &batch, ops, &before, &progress).await,
                false => Ok(()),
            }
        };
        let fetch = async {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => None,
                b = source.fetch(c.batch) => Some(b),
            }
        };
        let (written, next) = tokio::join!(write, fetch);
        written?;
        source.ack(&batch).await?;
        backoff.reset();
        match next {
            // Stopping: the write in hand is done and acknowledged.
            None => return Ok(()),
            Some(next) => fetched = Some(next?),
        }
    }
}

/// Writes one batch's operations with the progress after it (`after`), in one step
/// when the writer takes it. `before` is the progress before `batch`.
async fn write_batch(
    ctx: &Ctx,
    side: &Side,
    batch: &[InMessage],
    ops: Vec<(&InMessage, WriteOp)>,
    before: &Progress,
    after: &Progress,
) -> Result<(), String> {
    let c = &ctx.connector;
    let count = ops.len();
    let whole = match ops.is_empty() {
        true => Ok(()),
        false => {
            let batch_ops = ops.iter().map(|(_, op)| op.clone()).collect();
            let checkpoint = position_record(ctx, after, count)?;
            try_write(ctx, c.namespace.clone(), batch_ops, Some(checkpoint)).await
        }
    };
    match whole {
        Ok(()) => {
            if ops.is_empty() {
                let checkpoint = position_record(ctx, after, 0)?;
                let op = WriteOp::put(checkpoint.key, ContentType::Json, checkpoint.value);
                write_retrying(ctx, checkpoint.namespace, vec![op], None).await?;
            }
            side.count(count as u64);
        }
        // Too large as one batch: one message at a time, each with the progress up to
        // it; a message too large alone is a dead letter.
        Err(WriteError::TooLarge(_)) => {
            let mut progress = before.clone();
            let mut ops = ops.into_iter().peekable();
            for m in batch {
                if progress.covers(m) {
                    continue;
                }
                progress.advance(m);
                let Some((_, op)) = ops.next_if(|(o, _)| std::ptr::eq(*o, m)) else {
                    continue;
                };
                let checkpoint = position_record(ctx, &progress, 1)?;
                match try_write(ctx, c.namespace.clone(), vec![op], Some(checkpoint)).await {
                    Ok(()) => side.count(1),
                    Err(WriteError::TooLarge(reason)) => {
                        in_dead_letter(ctx, side, &progress, m, &reason).await?;
                    }
                    Err(e) => return Err(format!("writing to {}: {e}", c.namespace)),
                }
            }
            let checkpoint = position_record(ctx, after, 0)?;
            let op = WriteOp::put(checkpoint.key, ContentType::Json, checkpoint.value);
            write_retrying(ctx, checkpoint.namespace, vec![op], None).await?;
        }
        Err(e) => return Err(format!("writing to {}: {e}", c.namespace)),
    }
    Ok(())
}

/// The position record of connector `ctx` at `progress`, covering `count` writes.
fn position_record(ctx: &Ctx, progress: &Progress, count: usize) -> Result<Checkpoint, String> {
    let c = &ctx.connector;
    let mut record = json!({
        "count": count,
        "node": ctx.node.to_string(),
        "at_ms": asp_store::clock::wall_ms(),
    });
    progress.record(c.kind, &mut record);
    Ok(Checkpoint {
        namespace: Namespace::new(POSITIONS_NAMESPACE).expect("a valid name"),
        key: Key::new(&c.name).map_err(|e| e.to_string())?,
        value: Bytes::from(serde_json::to_vec(&record).expect("JSON")),
    })
}

/// Writes a message read in that cannot be applied to the dead-letter namespace.
async fn in_dead_letter(
    ctx: &Ctx,
    side: &Side,
    progress: &Progress,
    m: &InMessage,
    reason: &str,
) -> Result<(), String> {
    let name = progress.name_of(ctx.connector.kind, m);
    let message = json!({
        "position": name,
        "key": m.key,
        "op": m.op,
        "content_type": m.content_type,
        "value": text_or_base64(ContentType::Text, &m.value),
        "fields": m.fields.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
    });
    dead_letter(ctx, side, &format!("in/{name}"), message, reason).await
}

/// A message as a write, or why it cannot be one.
fn to_op(m: &InMessage, value_max: usize) -> Result<WriteOp, String> {
    let Some(key) = m.key.as_deref() else {
        return Err("the message names no key".into());
    };
    let key = Key::new(key).map_err(|e| format!("key {key:?}: {e}"))?;
    match m.op.as_deref().unwrap_or("put") {
        "delete" => Ok(WriteOp::delete(key)),
        "put" => {
            if m.value.len() > value_max {
                return Err(format!(
                    "the value is {} bytes; the limit is {value_max} (value_bytes_max)",
                    m.value.len()
                ));
            }
            let ct = match m.content_type.as_deref() {
                Some(h) => asp_http::formats::content_type_of(Some(h)).map_err(|e| e.0)?,
                None => ContentType::Json,
            };
            asp_http::formats::validate(ct, &m.value).map_err(|e| match m.content_type {
                None => format!("{e} (a message without a content type must be JSON)"),
                Some(_) => e.to_string(),
            })?;
            Ok(WriteOp::put(key, ct, m.value.clone()))
        }
        other => Err(format!("op {other:?} is neither put nor delete")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingested_ranges_hold_exactly_their_dots_and_forget_the_oldest() {
        let (a, b): (NodeId, NodeId) = (
            "00000000000000aa".parse().unwrap(),
            "00000000000000bb".parse().unwrap(),
        );
        let mut i = Ingested::default();
        i.insert((a, 10, 5));
        i.insert((b, 12, 1));
        assert!(!i.contains(a, 9));
        assert!(i.contains(a, 10) && i.contains(a, 14));
        assert!(!i.contains(a, 15));
        assert!(!i.contains(b, 10) && i.contains(b, 12) && !i.contains(b, 13));
        for n in 0..INGESTED_RANGES_MAX as u64 {
            i.insert((b, 1000 + n * 10, 2));
        }
        assert!(!i.contains(a, 10), "the oldest range is forgotten");
        assert!(i.contains(b, 1001));
        assert_eq!(i.ranges.len(), INGESTED_RANGES_MAX);
    }

    #[test]
    fn a_record_names_its_batch_only_for_the_connected_namespace() {
        let ns = Namespace::new("orders").unwrap();
        let record = br#"{"position":"7","batch":{"namespace":"orders","origin":"00000000000000aa","first":3,"count":2}}"#;
        let origin: NodeId = "00000000000000aa".parse().unwrap();
        assert_eq!(ingested_range(record, &ns), Some((origin, 3, 2)));
        assert_eq!(
            ingested_range(record, &Namespace::new("other").unwrap()),
            None
        );
        assert_eq!(ingested_range(br#"{"position":"7"}"#, &ns), None);
        assert_eq!(ingested_range(b"not json", &ns), None);
    }

    fn mqtt_connector() -> Connector {
        let config: crate::config::ConnectorConfig = serde_json::from_value(json!({
            "name": "mq", "kind": "mqtt", "direction": "in", "namespace": "k",
            "url": "mqtt://127.0.0.1:1", "topic": "t",
        }))
        .unwrap();
        crate::config::check(&[config]).unwrap().remove(0)
    }

    #[test]
    fn an_mqtt_record_keeps_sixteen_batches_of_ids_and_reads_older_hex_records() {
        let c = mqtt_connector();
        let mut p = Progress::new(&c);
        let total = 20 * c.batch as u64;
        for n in 0..total {
            let m = InMessage {
                id: n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                redelivered: true,
                ..Default::default()
            };
            p.advance(&m);
        }
        let mut record = json!({});
        p.record(c.kind, &mut record);
        let back = Progress::from_record(&c, &record).unwrap();
        assert_eq!(back, p);
        let Progress::Recent { ids, applied, .. } = &back else {
            panic!("{back:?}")
        };
        assert_eq!(*applied, total);
        assert_eq!(ids.len(), MQTT_RECENT_BATCHES * c.batch);
        // The oldest id still held is the one 16 batches back, and a redelivery of it
        // is recognised; one older is not.
        let held = total - (MQTT_RECENT_BATCHES * c.batch) as u64;
        let redelivered = |n: u64| InMessage {
            id: n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            redelivered: true,
            ..Default::default()
        };
        assert!(back.covers(&redelivered(held)));
        assert!(!back.covers(&redelivered(held - 1)));
        // A record of the earlier format: hex strings.
        let old = json!({"position": "2", "applied": 2, "recent": ["000000000000000a", "00000000000000ff"]});
        let Progress::Recent { ids, applied, .. } = Progress::from_record(&c, &old).unwrap() else {
            unreachable!()
        };
        assert_eq!((applied, Vec::from(ids)), (2, vec![10, 255]));
        let broken = json!({"applied": 2, "recent": "AAAA"});
        assert!(Progress::from_record(&c, &broken).is_err());
    }
}
