//! AMQP 0-9-1 (`kind = "amqp"`, RabbitMQ) through lapin, whose own connection recovery
//! is not used: a failure ends the connection and the runtime connects again, which
//! declares everything anew. Out publishes each change to a durable topic exchange with
//! routing key `<routing_key>.<key>`, persistent, and a batch counts as sent only when
//! the broker confirmed every message of it (publisher confirms). In consumes a durable
//! queue (bound to the exchange with `<routing_key>.#` when one is given) as its only
//! consumer, with manual acknowledgements sent after the batch's write. A queue has no
//! positions: a message's identity is its `message_id` (or a hash of its content), and
//! the runtime drops a redelivered message whose identity is among the most recent ones
//! applied ([`Progress::Recent`]).

use std::collections::VecDeque;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind,
};

use crate::runtime::{Ctx, InMessage, OutMessage, Position, Progress, Sink, Source, Undelivered};

/// The heartbeat asked of the broker when the URL names none: a silent broker or a
/// half-open connection is noticed within about two of these.
const HEARTBEAT_SECS: u16 = 10;
/// How long opening a connection (TCP and the AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the broker has to confirm a whole batch once it is published.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `fetch` waits for a first message.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// A gap this long in the deliveries ends a fetch early: the broker sends at most the
/// prefetch window, and a trickle of messages should not wait for a full batch.
const FETCH_GAP: Duration = Duration::from_millis(10);
/// The longest routing key AMQP carries (a short string).
const ROUTING_KEY_BYTES_MAX: usize = 255;
/// `delivery_mode` of a message the broker writes to disk.
const PERSISTENT: u8 = 2;

/// Opens a connection to the connector's broker; `role` names it in the broker's list
/// of connections.
async fn connect(ctx: &Ctx, role: &str) -> Result<Connection, String> {
    let c = &ctx.connector;
    let shown = crate::config::redacted(&c.url);
    let mut uri: AMQPUri = c.url.parse().map_err(|e| format!("url {shown}: {e}"))?;
    uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
    uri.query
        .connection_timeout
        .get_or_insert(CONNECT_TIMEOUT.as_millis() as u64);
    let name = format!("asp {} {role} ({})", c.name, ctx.node);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(format!("connecting to {shown}: {e}")),
        Err(_) => Err(format!(
            "connecting to {shown}: no answer within {CONNECT_TIMEOUT:?}"
        )),
    }
}

/// Declares the connector's exchange: a durable topic exchange, made if missing (an
/// existing one of another type or durability is refused by the broker).
async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<(), String> {
    channel
        .exchange_declare(
            short(exchange),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("declaring exchange {exchange:?} (topic, durable): {e}"))
}

/// A name the configuration checked (at most 255 bytes) as an AMQP short string.
fn short(name: &str) -> ShortString {
    ShortString::try_new(name).unwrap_or_else(|_| {
        let mut end = ROUTING_KEY_BYTES_MAX;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        ShortString::from(&name[..end])
    })
}

/// The routing key a key is published with: `<prefix>.<key>`, as it is. In a topic
/// exchange's routing key no character is special but `.`, which separates words: a
/// `.` in a key adds words (empty ones too), and `*` and `#` are wildcards only in
/// binding keys, so a queue bound with `<prefix>.#` gets every key. AMQP carries at
/// most 255 bytes: a longer routing key is cut at the last character that fits (the
/// `asp-key` header always holds the whole key).
pub fn routing_key_for(prefix: &str, key: &str) -> String {
    let mut out = format!("{prefix}.{key}");
    if out.len() > ROUTING_KEY_BYTES_MAX {
        let mut end = ROUTING_KEY_BYTES_MAX;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

pub(crate) struct AmqpSink {
    /// Held so the connection stays open (dropping it closes it).
    _connection: Connection,
    channel: Channel,
    ctx: Arc<Ctx>,
    confirmed: ConfirmedThrough,
}

/// Connects, declares the exchange and turns publisher confirms on.
pub(crate) async fn sink(ctx: Arc<Ctx>, confirmed: ConfirmedThrough) -> Result<AmqpSink, String> {
    let connection = connect(&ctx, "out").await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("opening a channel: {e}"))?;
    declare_exchange(&channel, &ctx.connector.exchange).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("turning publisher confirms on: {e}"))?;
    Ok(AmqpSink {
        _connection: connection,
        channel,
        ctx,
        confirmed,
    })
}

/// The properties of one change: `message_id` the dot, persistent, the content type
/// of a put, and the `asp-*` headers.
fn properties(m: &OutMessage, cluster: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in m.headers(cluster) {
        if name != "content-type" {
            headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
        }
    }
    let mut p = BasicProperties::default()
        .with_message_id(short(&m.dot.to_string()))
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers);
    if let Some((ct, _)) = &m.value {
        p = p.with_content_type(ct.mime().into());
    }
    p
}

/// The feed position through which a batch that failed was confirmed, in order. The
/// runtime sends a failed batch again whole; the next attempt skips that prefix, so
/// that a batch goes through even when the broker takes only part of it at a time (a
/// queue that refuses messages when full, `x-overflow = reject-publish`, nacks the
/// rest). One per connector, kept across reconnections by its supervisor; lost on a
/// restart: then the batch goes again whole.
pub(crate) type ConfirmedThrough = Arc<std::sync::Mutex<Option<u64>>>;

impl Sink for AmqpSink {
    async fn send(&mut self, batch: &[OutMessage]) -> Result<Undelivered, String> {
        let c = &self.ctx.connector;
        let through = *self
            .confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let skip = batch
            .iter()
            .take_while(|m| through.is_some_and(|t| m.seq <= t))
            .count();
        let rest = &batch[skip..];
        let mut confirms = Vec::with_capacity(rest.len());
        for m in rest {
            let payload = m.value.as_ref().map(|(_, v)| &v[..]).unwrap_or_default();
            let confirm = self
                .channel
                .basic_publish(
                    short(&c.exchange),
                    short(&routing_key_for(&c.routing_key, &m.key)),
                    BasicPublishOptions::default(),
                    payload,
                    properties(m, &self.ctx.cluster),
                )
                .await
                .map_err(|e| format!("publishing to exchange {:?}: {e}", c.exchange))?;
            confirms.push(confirm);
        }
        // The batch is sent when every message of it is confirmed. A nack (the broker
        // could not take one) fails the batch, which is sent again on a new connection,
        // from the first message not confirmed.
        let mut acked = 0;
        let confirmed = async {
            for (i, confirm) in confirms.into_iter().enumerate() {
                match confirm.await {
                    Ok(Confirmation::Ack(_)) => acked += 1,
                    Ok(Confirmation::Nack(_)) => {
                        return Err(format!(
                            "the broker refused (nack) message {} of the batch, dot {}",
                            skip + i + 1,
                            rest[i].dot
                        ));
                    }
                    Ok(Confirmation::NotRequested) => {
                        return Err("publisher confirms are off on this channel".into());
                    }
                    Err(e) => return Err(format!("waiting for the broker's confirm: {e}")),
                }
            }
            Ok(())
        };
        let result = match tokio::time::timeout(CONFIRM_TIMEOUT, confirmed).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the broker did not confirm the batch within {CONFIRM_TIMEOUT:?}"
            )),
        };
        match result {
            Ok(()) => {
                *self
                    .confirmed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None
            }
            Err(e) => {
                if acked > 0 {
                    *self
                        .confirmed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some(rest[acked - 1].seq);
                }
                return Err(e);
            }
        }
        Ok(Vec::new())
    }
}

pub(crate) struct AmqpSource {
    _connection: Connection,
    /// The channel the consumer receives on and acknowledges through.
    channel: Channel,
    /// Another channel for the queue's length: an error there leaves the consumer be.
    info: Channel,
    consumer: Consumer,
    ctx: Arc<Ctx>,
    /// Messages applied before this connection (the stored count).
    applied_before: u64,
    /// Deliveries on this connection so far: the position of the last one.
    delivered: u64,
    /// The last delivery tag of each batch `fetch` returned and `ack` did not
    /// acknowledge yet, oldest first (the runtime fetches the next batch while it
    /// writes one).
    unacked: VecDeque<u64>,
}

/// Connects, declares the queue (durable) and its binding, and consumes it with
/// manual acknowledgements, at most two batches unacknowledged, as its only consumer.
pub(crate) async fn source(ctx: Arc<Ctx>, applied: Progress) -> Result<AmqpSource, String> {
    let c = &ctx.connector;
    let connection = connect(&ctx, "in").await?;
    let open = || async {
        connection
            .create_channel()
            .await
            .map_err(|e| format!("opening a channel: {e}"))
    };
    let mut channel = open().await?;
    let info = open().await?;
    let declared = channel
        .queue_declare(
            short(&c.queue),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await;
    if let Err(e) = declared {
        // A queue made with arguments of its own (a quorum queue, a length limit) is
        // refused as "inequivalent" and the channel closed: it is used as it is, once a
        // passive declaration on a new channel finds it.
        channel = open().await?;
        declare_passive(&channel, &c.queue)
            .await
            .map_err(|_| format!("declaring queue {:?} (durable): {e}", c.queue))?;
    }
    if !c.exchange.is_empty() {
        declare_exchange(&channel, &c.exchange).await?;
        let binding = format!("{}.#", c.routing_key);
        channel
            .queue_bind(
                short(&c.queue),
                short(&c.exchange),
                short(&binding),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                format!(
                    "binding queue {:?} to exchange {:?} with {binding:?}: {e}",
                    c.queue, c.exchange
                )
            })?;
    }
    // Two batches: the one being written and the next one being fetched. This bounds
    // what a crash leaves unacknowledged, hence what the broker redelivers.
    let prefetch = u16::try_from(2 * c.batch).unwrap_or(u16::MAX);
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| format!("setting the prefetch to {prefetch}: {e}"))?;
    // Exclusive: while the broker still holds a previous connection of ours (it has not
    // noticed it is gone yet), consuming is refused and tried again after a backoff, so
    // the messages that connection held are redelivered before anything newer is
    // applied (see `Progress::Recent`).
    let tag = format!("asp-{}-{}", c.name, ctx.node);
    let consumer = channel
        .basic_consume(
            short(&c.queue),
            short(&tag),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("consuming queue {:?}: {e}", c.queue))?;
    let applied_before = match applied {
        Progress::Recent { applied, .. } => applied,
        _ => 0,
    };
    Ok(AmqpSource {
        _connection: connection,
        channel,
        info,
        consumer,
        ctx,
        applied_before,
        delivered: 0,
        unacked: VecDeque::new(),
    })
}

/// Finds queue `queue` as it is (a passive declaration): its counts, or an error if it
/// is missing.
async fn declare_passive(channel: &Channel, queue: &str) -> lapin::Result<lapin::Queue> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(short(queue), passive, FieldTable::default())
        .await
}

/// A header's value as text.
fn text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        other => format!("{other:?}"),
    }
}

/// A message's identity, for dropping a redelivered duplicate: the first 8 bytes of the
/// SHA-256 of its `message_id` when it has one, else of its routing key, headers and
/// body (each length-prefixed, so that no two messages hash the same text).
pub fn message_identity(
    message_id: Option<&str>,
    routing_key: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> u64 {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    let mut part = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    match message_id {
        Some(id) => {
            part(b"message_id");
            part(id.as_bytes());
        }
        None => {
            part(b"content");
            part(routing_key.as_bytes());
            for (name, value) in headers {
                part(name.as_bytes());
                part(value.as_bytes());
            }
            part(body);
        }
    }
    let digest = h.finish();
    u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"))
}

impl AmqpSource {
    /// A delivery as the runtime reads it.
    fn message(&mut self, d: &lapin::message::Delivery) -> InMessage {
        let c = &self.ctx.connector;
        self.delivered += 1;
        let p = &d.properties;
        let headers: Vec<(String, String)> = p
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), text(v)))
                    .collect()
            })
            .unwrap_or_default();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.as_str() == name)
                .map(|(_, v)| v.clone())
        };
        let routing_key = d.routing_key.as_str();
        let message_id = p.message_id().as_ref().map(|s| s.as_str());
        let key = header("asp-key").or_else(|| {
            Some(
                routing_key
                    .strip_prefix(&format!("{}.", c.routing_key))
                    .unwrap_or(routing_key)
                    .to_owned(),
            )
        });
        let content_type = p
            .content_type()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .or_else(|| header("content-type"));
        let id = message_identity(message_id, routing_key, &headers, &d.data);
        let mut fields = vec![
            ("exchange".to_owned(), d.exchange.as_str().to_owned()),
            ("routing_key".to_owned(), routing_key.to_owned()),
        ];
        fields.extend(message_id.map(|m| ("message_id".to_owned(), m.to_owned())));
        fields.extend(
            content_type
                .clone()
                .map(|ct| ("content_type".to_owned(), ct)),
        );
        let (op, cluster) = (header("asp-op"), header("asp-cluster"));
        fields.extend(headers);
        InMessage {
            position: Position(self.delivered, 0),
            id,
            redelivered: d.redelivered,
            key: key.filter(|k| !k.is_empty()),
            op,
            content_type,
            value: Bytes::copy_from_slice(&d.data),
            cluster,
            fields,
        }
    }
}

impl Source for AmqpSource {
    async fn fetch(&mut self, max: usize) -> Result<Vec<InMessage>, String> {
        let mut out = Vec::new();
        let mut last_tag = None;
        while out.len() < max {
            let wait = match out.is_empty() {
                true => FETCH_WAIT,
                false => FETCH_GAP,
            };
            let Ok(next) = tokio::time::timeout(wait, self.consumer.next()).await else {
                break;
            };
            let d = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(format!("consuming: {e}")),
                None => return Err("the broker ended the consumer".into()),
            };
            out.push(self.message(&d));
            last_tag = Some(d.delivery_tag);
        }
        self.unacked.extend(last_tag);
        Ok(out)
    }

    /// After the batch's write: one acknowledgement of every delivery up to the batch's
    /// last (`multiple`).
    async fn ack(&mut self, _batch: &[InMessage]) -> Result<(), String> {
        if let Some(tag) = self.unacked.pop_front() {
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| format!("acknowledging to the broker: {e}"))?;
        }
        Ok(())
    }

    /// The queue's ready messages (not those delivered and unacknowledged) are the lag.
    async fn head(&mut self) -> Option<(String, u64)> {
        let c = &self.ctx.connector;
        let q = declare_passive(&self.info, &c.queue).await.ok()?;
        let ready = u64::from(q.message_count());
        let head = self.applied_before + self.delivered + ready;
        Some((head.to_string(), ready))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_carry_the_key_as_it_is_and_fit_amqp() {
        assert_eq!(routing_key_for("orders", "o-1"), "orders.o-1");
        assert_eq!(routing_key_for("orders", "a.b*#"), "orders.a.b*#");
        assert_eq!(routing_key_for("orders", ".a..b."), "orders..a..b.");
        let long = "é".repeat(300);
        let rk = routing_key_for("p", &long);
        assert!(rk.len() <= ROUTING_KEY_BYTES_MAX && rk.len() >= ROUTING_KEY_BYTES_MAX - 1);
        assert!(rk.starts_with("p.é"));
    }

    #[test]
    fn an_identity_is_the_message_id_or_else_the_whole_content() {
        let h = |name: &str, value: &str| vec![(name.to_owned(), value.to_owned())];
        let a = message_identity(None, "rk.a", &h("x", "1"), b"body");
        assert_eq!(a, message_identity(None, "rk.a", &h("x", "1"), b"body"));
        for other in [
            message_identity(None, "rk.b", &h("x", "1"), b"body"),
            message_identity(None, "rk.a", &h("x", "2"), b"body"),
            message_identity(None, "rk.a", &h("x", "1"), b"bodz"),
            message_identity(None, "rk.a", &h("x1", ""), b"body"),
            message_identity(Some("rk.a"), "", &[], b""),
        ] {
            assert_ne!(a, other);
        }
        // With a message_id, the content does not count.
        assert_eq!(
            message_identity(Some("m-1"), "rk.a", &[], b"1"),
            message_identity(Some("m-1"), "rk.b", &h("x", "1"), b"2")
        );
    }
}
