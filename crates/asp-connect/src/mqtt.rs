//! MQTT 5 (`kind = "mqtt"`): out publishes each change at QoS 1 to `<topic>/<key>`
//! with the asp headers as user properties (retained when `retain` is on), through
//! rumqttc's `v5` client, and waits for every PUBACK of the batch; in subscribes
//! `<topic>/#` at QoS 1 with a persistent session, speaking rumqttc's `v5` packets on a
//! connection of its own (see [`source`]), and acknowledges each message only after its
//! batch is written. MQTT has no source position: the in side drops a redelivered
//! message (the broker's DUP flag) whose id is among the ids of the newest messages
//! applied ([`Progress::Recent`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Filter, Login, Packet, PingReq, PubAck,
    PubAckReason, Publish, PublishProperties, RetainForwardRule, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::nats::key_of_subject as percent_decoded;
use crate::runtime::{Ctx, InMessage, OutMessage, Position, Progress, Sink, Source, Undelivered};

/// The broker's default port.
const DEFAULT_PORT: u16 = 1883;
/// How long connecting (TCP and CONNACK) may take.
const CONNECT_TIMEOUT_S: u64 = 5;
/// How often an idle connection pings the broker.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long the broker keeps the in side's session (its subscription and the messages
/// queued for it) after the connection is gone: a week.
pub const SESSION_EXPIRY_S: u32 = 7 * 24 * 3600;
/// How long a batch may wait for its PUBACKs, and a subscription for its SUBACK.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `fetch` waits for a first message.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// A gap this long in the deliveries ends a fetch early: the broker sends at most its
/// in-flight window, and the rest only after acknowledgements.
const FETCH_GAP: Duration = Duration::from_millis(10);
/// Room for the topic and properties in a packet, beside the value.
const PACKET_OVERHEAD_BYTES: usize = 64 * 1024;
/// Unacknowledged messages the broker may have in flight to the in side (the receive
/// maximum), in batches: the runtime holds two (one written, the next fetched) while
/// it fetches a third. (Mosquitto 2.0 sends a resumed session's queue past it.)
const IN_FLIGHT_BATCHES: usize = 3;

/// Where a `mqtt://[USER:PASSWORD@]HOST[:PORT]` url points.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Broker {
    pub host: String,
    pub port: u16,
    /// User and password, `%XX`-decoded.
    pub login: Option<(String, String)>,
}

/// Reads a connector's url (`mqtt://` or `tcp://`); the error says what is wrong.
pub(crate) fn broker(url: &str) -> Result<Broker, String> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .ok_or_else(|| "url must be mqtt://[USER:PASSWORD@]HOST:PORT".to_owned())?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#']) {
        return Err("url: mqtt://[USER:PASSWORD@]HOST:PORT takes no path or query".into());
    }
    let (login, address) = match rest.rsplit_once('@') {
        Some((userinfo, address)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (
                Some((percent_decoded(user), percent_decoded(password))),
                address,
            )
        }
        None => (None, rest),
    };
    let (host, port) = match address.strip_prefix('[') {
        // [IPv6]:PORT
        Some(v6) => {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| "url: an IPv6 host is [ADDRESS]".to_owned())?;
            (host, after.strip_prefix(':'))
        }
        None => match address.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (address, None),
        },
    };
    if host.is_empty() {
        return Err("url names no host: mqtt://HOST:PORT".into());
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("url: port {p:?} is not 1 to 65535"))?,
        None => DEFAULT_PORT,
    };
    Ok(Broker {
        host: host.to_owned(),
        port,
        login,
    })
}

/// The options every connection of connector `ctx` starts from.
fn options(ctx: &Ctx, client_id: String) -> Result<MqttOptions, String> {
    let c = &ctx.connector;
    let b = broker(&c.url)?;
    let mut o = MqttOptions::new(client_id, b.host, b.port);
    o.set_keep_alive(KEEP_ALIVE)
        .set_connection_timeout(CONNECT_TIMEOUT_S)
        // rumqttc refuses packets over 10 KiB by default: take any value the store does.
        .set_max_packet_size(Some(
            (ctx.store.config().value_bytes_max + PACKET_OVERHEAD_BYTES).min(u32::MAX as usize)
                as u32,
        ));
    if let Some((user, password)) = b.login {
        o.set_credentials(user, password);
    }
    Ok(o)
}

/// Runs the event loop until the broker answers the CONNECT.
async fn connected(events: &mut EventLoop, url: &str) -> Result<ConnAck, String> {
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack),
            Ok(_) => {}
            Err(e) => {
                return Err(format!(
                    "connecting to {}: {e}",
                    crate::config::redacted(url)
                ));
            }
        }
    }
}

/// The topic a key is published to: `<prefix>/<key>`, with what a topic cannot hold
/// literally written `%XX`: the wildcards `+` and `#`, `%`, NUL and the other control
/// characters, DEL, and a `/` that would make an empty level (first, last, or followed
/// by another `/`). Every other character goes as it is; a `/` inside a key adds a
/// level. The `asp-key` property always holds the key as it is.
pub(crate) fn topic_for(prefix: &str, key: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1 + key.len());
    out.push_str(prefix);
    out.push('/');
    let bytes = key.as_bytes();
    for (i, ch) in key.char_indices() {
        // Every byte that needs escaping is ASCII; other characters go as they are.
        let b = if ch.is_ascii() { ch as u8 } else { b'a' };
        let empty_level =
            b == b'/' && (i == 0 || i + 1 == bytes.len() || bytes.get(i + 1) == Some(&b'/'));
        let bad = b < b' ' || b == 0x7f || matches!(b, b'+' | b'#' | b'%') || empty_level;
        if bad {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(ch);
        }
    }
    out
}

/// The id a message is remembered by: a hash of what the broker keeps unchanged when it
/// delivers a message again (topic, payload, user properties with `asp-dot`, content
/// type, correlation data), stable across versions of asp.
fn message_id(p: &Publish) -> u64 {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    let mut part = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    part(&p.topic);
    part(&p.payload);
    if let Some(props) = &p.properties {
        for (name, value) in &props.user_properties {
            part(name.as_bytes());
            part(value.as_bytes());
        }
        part(props.content_type.as_deref().unwrap_or_default().as_bytes());
        part(props.correlation_data.as_deref().unwrap_or_default());
    }
    let digest = h.finish();
    u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"))
}

/// What the out side's event loop reports to `send`.
enum Sent {
    /// A publish went out with this packet id (in the order requested).
    Publish(u16),
    Acked(PubAck),
}

pub(crate) struct MqttSink {
    client: AsyncClient,
    /// The event loop's reports, or the error that ended it.
    reports: tokio::sync::mpsc::Receiver<Result<Sent, String>>,
    /// Polls the event loop between batches too, so that it pings an idle broker.
    task: tokio::task::JoinHandle<()>,
    ctx: Arc<Ctx>,
    /// The largest packet the broker takes (its CONNACK's Maximum Packet Size).
    packet_bytes_max: Option<usize>,
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The out side: a clean session of its own (`asp-<name>-<node>-out`).
pub(crate) async fn sink(ctx: Arc<Ctx>) -> Result<MqttSink, String> {
    let c = &ctx.connector;
    let o = options(&ctx, format!("asp-{}-{}-out", c.name, ctx.node))?;
    let (client, mut events) = AsyncClient::new(o, c.batch);
    let ack = connected(&mut events, &c.url).await?;
    let packet_bytes_max = ack
        .properties
        .and_then(|p| p.max_packet_size)
        .map(|m| m as usize);
    // Two reports per publish of a batch at most, and `send` takes them all before it
    // returns: the task never waits long.
    let (tx, reports) = tokio::sync::mpsc::channel(2 * c.batch + 16);
    let task = tokio::spawn(async move {
        // Polled until the first error, never again: polling after an error would
        // reconnect and resend on its own, behind the runtime's back.
        loop {
            let report = match events.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(Sent::Publish(pkid)),
                Ok(Event::Incoming(Packet::PubAck(ack))) => Ok(Sent::Acked(ack)),
                Ok(_) => continue,
                Err(e) => Err(format!("publishing: {e}")),
            };
            let failed = report.is_err();
            if tx.send(report).await.is_err() || failed {
                return;
            }
        }
    });
    Ok(MqttSink {
        client,
        reports,
        task,
        ctx,
        packet_bytes_max,
    })
}

impl MqttSink {
    /// One change as a publish (its packet id is the event loop's).
    fn publish(&self, m: &OutMessage) -> Publish {
        let c = &self.ctx.connector;
        let mut props = PublishProperties::default();
        for (name, value) in m.headers(&self.ctx.cluster) {
            match name {
                "content-type" => props.content_type = Some(value),
                _ => props.user_properties.push((name.to_owned(), value)),
            }
        }
        let payload = m.value.as_ref().map(|(_, v)| v.clone()).unwrap_or_default();
        let mut p = Publish::new(
            topic_for(&c.topic, &m.key),
            QoS::AtLeastOnce,
            payload,
            Some(props),
        );
        p.retain = c.retain;
        p
    }
}

impl Sink for MqttSink {
    async fn send(&mut self, batch: &[OutMessage]) -> Result<Undelivered, String> {
        let mut undelivered = Vec::new();
        let mut publishes = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            let p = self.publish(m);
            // rumqttc fails the whole connection on a packet over the broker's maximum:
            // such a change is a dead letter instead (2 bytes: the packet id).
            let size = p.size() + 2;
            match self.packet_bytes_max {
                Some(max) if size > max => undelivered.push((
                    i,
                    format!("the message is {size} bytes; the broker takes at most {max}"),
                )),
                _ => publishes.push((i, p)),
            }
        }
        let client = &self.client;
        let reports = &mut self.reports;
        let expected = publishes.len();
        // The batch index of each publish, in the order the event loop sends them.
        let order: Vec<usize> = publishes.iter().map(|(i, _)| *i).collect();
        let push = async {
            for (_, p) in publishes {
                let props = p.properties.unwrap_or_default();
                client
                    .publish_bytes_with_properties(
                        String::from_utf8_lossy(&p.topic).into_owned(),
                        p.qos,
                        p.retain,
                        p.payload,
                        props,
                    )
                    .await
                    .map_err(|e| format!("publishing: {e}"))?;
            }
            Ok::<(), String>(())
        };
        // The event loop sends the requests in order, and gives each QoS 1 publish a
        // packet id as it sends it; the batch is done when every id is acknowledged.
        let drive = async {
            let mut sent = 0usize;
            let mut in_flight: HashMap<u16, usize> = HashMap::new();
            let mut acked = 0usize;
            let mut refused = Vec::new();
            while acked < expected {
                let report = reports
                    .recv()
                    .await
                    .ok_or("the connection's task ended")??;
                match report {
                    Sent::Publish(pkid) => {
                        let index = *order.get(sent).ok_or("more publishes than sent")?;
                        in_flight.insert(pkid, index);
                        sent += 1;
                    }
                    Sent::Acked(ack) => {
                        let Some(index) = in_flight.remove(&ack.pkid) else {
                            continue;
                        };
                        acked += 1;
                        match ack.reason {
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {}
                            // The message itself is refused: a dead letter.
                            PubAckReason::TopicNameInvalid | PubAckReason::PayloadFormatInvalid => {
                                refused.push((
                                    index,
                                    format!("the broker refused it: {:?}", ack.reason),
                                ));
                            }
                            // Not taken now (quota, authorization, an error of the
                            // broker): the batch is sent again after a reconnect.
                            other => {
                                return Err(format!(
                                    "the broker did not take a publish: {other:?}"
                                ));
                            }
                        }
                    }
                }
            }
            Ok(refused)
        };
        let (_, refused) =
            tokio::time::timeout(ACK_TIMEOUT, async { tokio::try_join!(push, drive) })
                .await
                .map_err(|_| format!("no PUBACK for the batch within {ACK_TIMEOUT:?}"))??;
        undelivered.extend(refused);
        undelivered.sort();
        Ok(undelivered)
    }
}

pub(crate) struct MqttSource {
    /// The connection's writing half: PUBACKs go out as soon as `ack` is called, ahead
    /// of anything still to be read.
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    /// What the reading task delivers: messages, or the error that ended it.
    deliveries: tokio::sync::mpsc::Receiver<Result<Publish, String>>,
    /// The reading and the pinging task, ended with the source.
    tasks: [tokio::task::JoinHandle<()>; 2],
    /// `<topic>/`.
    prefix: String,
    /// Messages delivered on this connection (each message's position).
    delivered: u64,
    /// The messages of each batch `fetch` returned and `ack` did not acknowledge yet,
    /// oldest first (the runtime fetches the next batch while it writes one).
    unacked: VecDeque<Vec<Publish>>,
}

impl Drop for MqttSource {
    fn drop(&mut self) {
        // The connection ends with its tasks; the broker keeps the session and delivers
        // what was not acknowledged again, with DUP set.
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Writes `packets` to the broker at once.
async fn write_packets(
    writer: &tokio::sync::Mutex<OwnedWriteHalf>,
    packets: &[Packet],
) -> Result<(), String> {
    let mut buf = BytesMut::new();
    for p in packets {
        p.write(&mut buf, None)
            .map_err(|e| format!("encoding a packet: {e}"))?;
    }
    let mut w = writer.lock().await;
    tokio::time::timeout(ACK_TIMEOUT, w.write_all(&buf))
        .await
        .map_err(|_| format!("the broker took nothing for {ACK_TIMEOUT:?}"))?
        .map_err(|e| format!("writing to the broker: {e}"))
}

/// Reads the next packet (`buf` keeps what was read past it).
async fn read_packet(
    reader: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    packet_bytes_max: u32,
) -> Result<Packet, String> {
    loop {
        match Packet::read(buf, Some(packet_bytes_max)) {
            Ok(p) => return Ok(p),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(n)) => buf.reserve(n),
            Err(e) => return Err(format!("a packet from the broker: {e}")),
        }
        let n = reader
            .read_buf(buf)
            .await
            .map_err(|e| format!("reading from the broker: {e}"))?;
        if n == 0 {
            return Err("the broker closed the connection".into());
        }
    }
}

/// The in side: a persistent session (`asp-<name>-<node>`, clean start off, expiry
/// [`SESSION_EXPIRY_S`]), subscribed to `<topic>/#` at QoS 1.
///
/// It speaks MQTT 5 through rumqttc's packets (`v5::mqttbytes`) on a connection of its
/// own rather than through rumqttc's event loop: that loop handles one request per
/// turn against up to ten packets read, so the PUBACKs of a consumer that acknowledges
/// by hand fall ever further behind a broker that sends faster than asp writes
/// (Mosquitto 2.0 sends a resumed session's whole queue at once, past the receive
/// maximum), and every message applied but not acknowledged comes again after a crash.
/// Here the reading task stops reading when `fetch` falls behind (the broker waits on
/// TCP), and `ack` writes the PUBACKs at once.
pub(crate) async fn source(ctx: Arc<Ctx>, _applied: Progress) -> Result<MqttSource, String> {
    let c = &ctx.connector;
    let b = broker(&c.url)?;
    let url = crate::config::redacted(&c.url);
    let window = (IN_FLIGHT_BATCHES * c.batch).min(u16::MAX as usize);
    let packet_bytes_max =
        (ctx.store.config().value_bytes_max + PACKET_OVERHEAD_BYTES).min(u32::MAX as usize) as u32;
    let stream = tokio::time::timeout(
        Duration::from_secs(CONNECT_TIMEOUT_S),
        tokio::net::TcpStream::connect((b.host.as_str(), b.port)),
    )
    .await
    .map_err(|_| format!("connecting to {url}: no answer in {CONNECT_TIMEOUT_S} s"))?
    .map_err(|e| format!("connecting to {url}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut reader, writer) = stream.into_split();
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let properties = ConnectProperties {
        session_expiry_interval: Some(SESSION_EXPIRY_S),
        receive_maximum: Some(window as u16),
        max_packet_size: Some(packet_bytes_max),
        ..ConnectProperties::new()
    };
    let connect = Connect {
        keep_alive: KEEP_ALIVE.as_secs() as u16,
        client_id: format!("asp-{}-{}", c.name, ctx.node),
        clean_start: false,
        properties: Some(properties),
    };
    let login = b.login.map(|(user, password)| Login::new(user, password));
    write_packets(&writer, &[Packet::Connect(connect, None, login)]).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let answer = tokio::time::timeout(
        Duration::from_secs(CONNECT_TIMEOUT_S),
        read_packet(&mut reader, &mut buf, packet_bytes_max),
    )
    .await
    .map_err(|_| format!("connecting to {url}: no CONNACK in {CONNECT_TIMEOUT_S} s"))??;
    let session_present = match answer {
        Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => a.session_present,
        Packet::ConnAck(a) => return Err(format!("{url} refused the connection: {:?}", a.code)),
        other => return Err(format!("{url} answered CONNECT with {other:?}")),
    };
    // Subscribed on every connection, not only when the session is new: a session can
    // exist without the subscription (a connection lost between CONNACK and SUBACK),
    // and nothing subscribes again by itself. Retained messages come only with a new
    // subscription (retain handling 1), so this is harmless when it exists; the
    // publisher's retain flag is kept (an empty retained message is a delete).
    let filter = format!("{}/#", c.topic);
    let subscribe = Subscribe {
        pkid: 1,
        filters: vec![Filter {
            path: filter.clone(),
            qos: QoS::AtLeastOnce,
            nolocal: false,
            preserve_retain: true,
            retain_forward_rule: RetainForwardRule::OnNewSubscribe,
        }],
        properties: None,
    };
    write_packets(&writer, &[Packet::Subscribe(subscribe)]).await?;
    let (tx, deliveries) = tokio::sync::mpsc::channel(c.batch);
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let heard_ms = Arc::new(std::sync::atomic::AtomicU64::new(
        asp_store::clock::wall_ms(),
    ));
    let heard = heard_ms.clone();
    let errors = tx.clone();
    let reading = tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        loop {
            let packet = match read_packet(&mut reader, &mut buf, packet_bytes_max).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(format!("receiving: {e}"))).await;
                    return;
                }
            };
            heard.store(
                asp_store::clock::wall_ms(),
                std::sync::atomic::Ordering::Relaxed,
            );
            let failure = match packet {
                // Waits while `fetch` is behind: the broker's messages wait in TCP.
                Packet::Publish(p) => match tx.send(Ok(p)).await {
                    Ok(()) => continue,
                    Err(_) => return,
                },
                Packet::SubAck(s) => match s.return_codes.first() {
                    Some(SubscribeReasonCode::Success(_)) => {
                        if let Some(t) = subscribed_tx.take() {
                            let _ = t.send(());
                        }
                        continue;
                    }
                    other => format!("subscribing to {filter}: {other:?}"),
                },
                Packet::Disconnect(d) => format!("the broker disconnected: {:?}", d.reason_code),
                _ => continue,
            };
            let _ = tx.send(Err(failure)).await;
            return;
        }
    });
    let ping_writer = writer.clone();
    let pinging = tokio::spawn(async move {
        loop {
            tokio::time::sleep(KEEP_ALIVE / 2).await;
            let silent_ms = asp_store::clock::wall_ms()
                .saturating_sub(heard_ms.load(std::sync::atomic::Ordering::Relaxed));
            let failure = if silent_ms > 2 * KEEP_ALIVE.as_millis() as u64 {
                format!("nothing from the broker for {silent_ms} ms")
            } else {
                match write_packets(&ping_writer, &[Packet::PingReq(PingReq)]).await {
                    Ok(()) => continue,
                    Err(e) => e,
                }
            };
            let _ = errors.send(Err(failure)).await;
            return;
        }
    });
    let source = MqttSource {
        writer,
        deliveries,
        tasks: [reading, pinging],
        prefix: format!("{}/", c.topic),
        delivered: 0,
        unacked: VecDeque::new(),
    };
    // A new session has nothing queued: the SUBACK comes first, and the side runs only
    // once subscribed. A resumed one may be sending its queue ahead of the SUBACK.
    if !session_present {
        tokio::time::timeout(ACK_TIMEOUT, subscribed)
            .await
            .map_err(|_| format!("no SUBACK for {} within {ACK_TIMEOUT:?}", c.topic))?
            .map_err(|_| format!("subscribing to {}/#: the connection ended", c.topic))?;
    }
    tracing::info!(connector = %c.name, session_present, "subscribed to {}/#", c.topic);
    Ok(source)
}

impl MqttSource {
    fn message(&mut self, p: &Publish) -> InMessage {
        self.delivered += 1;
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let props = p.properties.clone().unwrap_or_default();
        let property = |name: &str| {
            props
                .user_properties
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let mut op = property("asp-op");
        // An empty retained message clears a topic's value: a delete.
        if op.is_none() && p.retain && p.payload.is_empty() {
            op = Some("delete".to_owned());
        }
        let content_type = props
            .content_type
            .clone()
            .or_else(|| property("content-type"));
        let mut fields = vec![
            ("topic".to_owned(), topic.clone()),
            ("qos".to_owned(), (p.qos as u8).to_string()),
            ("retain".to_owned(), p.retain.to_string()),
            ("dup".to_owned(), p.dup.to_string()),
        ];
        if let Some(ct) = &props.content_type {
            fields.push(("content-type".to_owned(), ct.clone()));
        }
        fields.extend(props.user_properties.iter().cloned());
        InMessage {
            position: Position(self.delivered, 0),
            id: message_id(p),
            redelivered: p.dup,
            key: topic.strip_prefix(&self.prefix).map(percent_decoded),
            op,
            content_type,
            value: p.payload.clone(),
            cluster: property("asp-cluster"),
            fields,
        }
    }
}

impl Source for MqttSource {
    async fn fetch(&mut self, max: usize) -> Result<Vec<InMessage>, String> {
        let mut publishes = Vec::new();
        while publishes.len() < max {
            // A first message is waited for up to a second, unless messages wait for
            // their acknowledgement (the broker may hold the rest until then).
            let wait = if publishes.is_empty() && self.unacked.is_empty() {
                FETCH_WAIT
            } else {
                FETCH_GAP
            };
            match tokio::time::timeout(wait, self.deliveries.recv()).await {
                Ok(Some(Ok(p))) => publishes.push(p),
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => return Err("the connection's task ended".into()),
                Err(_) => break,
            }
        }
        let out = publishes.iter().map(|p| self.message(p)).collect();
        if !publishes.is_empty() {
            self.unacked.push_back(publishes);
        }
        Ok(out)
    }

    /// After the batch is written: one PUBACK per QoS 1 message, in the order received
    /// (as MQTT requires), written at once.
    async fn ack(&mut self, batch: &[InMessage]) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        let Some(publishes) = self.unacked.pop_front() else {
            return Ok(());
        };
        let acks: Vec<Packet> = publishes
            .iter()
            .filter(|p| p.qos != QoS::AtMostOnce)
            .map(|p| Packet::PubAck(PubAck::new(p.pkid, None)))
            .collect();
        write_packets(&self.writer, &acks)
            .await
            .map_err(|e| format!("acknowledging: {e}"))
    }

    /// Head: the messages delivered on this connection; lag: those delivered and not
    /// fetched yet (what the broker still holds, MQTT does not tell).
    async fn head(&mut self) -> Option<(String, u64)> {
        Some((self.delivered.to_string(), self.deliveries.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_escape_wildcards_and_empty_levels_and_keep_the_rest() {
        assert_eq!(topic_for("p", "a/b"), "p/a/b");
        assert_eq!(topic_for("p", "a b/é"), "p/a b/é");
        assert_eq!(topic_for("p", "x+y#z"), "p/x%2By%23z");
        assert_eq!(topic_for("p", "/a//b/"), "p/%2Fa%2F/b%2F");
        assert_eq!(topic_for("p", "100%\t\0"), "p/100%25%09%00");
        assert_eq!(topic_for("p", "日本"), "p/日本");
    }

    #[test]
    fn urls_name_host_port_and_login() {
        let b = broker("mqtt://u:p%40ss@h:1884").unwrap();
        assert_eq!(
            b,
            Broker {
                host: "h".into(),
                port: 1884,
                login: Some(("u".into(), "p@ss".into()))
            }
        );
        assert_eq!(broker("tcp://h/").unwrap().port, 1883);
        assert_eq!(broker("mqtt://[::1]:7").unwrap().host, "::1");
        assert!(broker("mqtt://h:0").unwrap_err().contains("port"));
        assert!(broker("mqtt://h:1883/x").unwrap_err().contains("no path"));
        assert!(broker("mqtt://:1883").unwrap_err().contains("no host"));
        assert!(broker("http://h").is_err());
    }

    #[test]
    fn a_message_id_is_its_content_and_properties() {
        let p = |topic: &str, payload: &'static [u8], dot: Option<&str>| {
            let props = PublishProperties {
                user_properties: dot
                    .map(|d| vec![("asp-dot".to_owned(), d.to_owned())])
                    .unwrap_or_default(),
                ..Default::default()
            };
            Publish::new(topic, QoS::AtLeastOnce, payload, Some(props))
        };
        let a = p("t/a", b"1", None);
        let mut again = a.clone();
        again.dup = true;
        again.pkid = 9;
        assert_eq!(
            message_id(&a),
            message_id(&again),
            "DUP and packet id are not part of it"
        );
        assert_ne!(message_id(&a), message_id(&p("t/b", b"1", None)));
        assert_ne!(message_id(&a), message_id(&p("t/a", b"2", None)));
        assert_ne!(
            message_id(&p("t/a", b"1", Some("1@aa"))),
            message_id(&p("t/a", b"1", Some("2@aa")))
        );
        // Parts are length-prefixed: moving a byte from topic to payload changes the id.
        assert_ne!(
            message_id(&p("t/ab", b"", None)),
            message_id(&p("t/a", b"b", None))
        );
    }

    proptest::proptest! {
        /// Any key goes to a topic of non-empty levels without wildcards, and comes back.
        #[test]
        fn any_key_round_trips_through_its_topic(key in "\\PC{1,40}|[ /+#%a-z\t]{1,12}") {
            let topic = topic_for("p", &key);
            for level in topic.split('/') {
                proptest::prop_assert!(!level.is_empty(), "{topic}");
                proptest::prop_assert!(!level.contains(['+', '#', '\0']), "{topic}");
            }
            proptest::prop_assert_eq!(percent_decoded(topic.strip_prefix("p/").unwrap()), key);
        }

        /// Reading any url never panics.
        #[test]
        fn any_url_is_read_or_refused(text in "\\PC{0,40}") {
            let _ = broker(&format!("mqtt://{text}"));
        }
    }
}
