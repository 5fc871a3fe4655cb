//! Replication through a NATS server (`[replication] transport = "nats://HOST:PORT"`):
//! for nodes that cannot dial each other (edge sites behind NAT, hub and spoke) but
//! can all reach one NATS server.
//!
//! Each pair of nodes on the transport runs an ordinary peer link (the session, its
//! frames, checkpoints, reconciliation, reports, membership) over a byte stream that
//! NATS carries: the bytes of each direction go as numbered messages to the receiving
//! node's subject. A lost, reordered or doubled message (a NATS disconnection) ends
//! the connection, as a broken TCP connection would; the link's own catch-up makes the
//! next connection whole. So the transport has every guarantee of a TCP link: the same
//! dots, vectors and conflict policies, nothing applied twice, and a node away for days
//! catches up from its peers' feeds, or by reconciliation past their compaction.
//!
//! Subjects, under `asp.t.<cluster>` (the cluster id hashed):
//! - `.hello`: each node says it is there once a second (its node id);
//! - `.to.<node>`: everything sent to `<node>`, with headers `asp-conn` (the
//!   connection's id), `asp-from` (the sender), `asp-kind` (`open`, `data` or `close`)
//!   and `asp-n` (a data message's number in its direction, from 0).
//!
//! Of two nodes, the one with the smaller id opens the connection when it hears the
//! other's hello; the link layer keeps one link per pair of nodes whatever the
//! transports (so a mixed cluster, some pairs over TCP, converges like any topology).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asp_core::NodeId;
use asp_node::Replicator;
use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often a node says it is there.
const HELLO_INTERVAL: Duration = Duration::from_secs(1);
/// The most bytes one data message carries (NATS's default limit is 1 MiB).
const CHUNK_BYTES: usize = 64 * 1024;
/// Bytes queued for one connection's link before the connection is given up (the
/// link's credit window bounds what a peer sends unacknowledged well below this).
const QUEUE_BYTES_MAX: usize = 64 << 20;
/// Bytes buffered between a link and the transport, each way.
const PIPE_BYTES: usize = 256 * 1024;
/// The most connections the transport keeps (one per other node).
const CONNECTIONS_MAX: usize = 256;
/// The longest a node waits before opening a connection again after one failed.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The transport's state, for status.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TransportStatus {
    pub url: String,
    /// `connecting`, `connected`, `disconnected` (NATS reconnects on its own).
    pub state: String,
    /// Nodes heard on the transport in the last 10 s.
    pub nodes_heard: Vec<String>,
    /// Connections open now.
    pub connections: usize,
    /// Connections ended because a message went missing or came twice.
    pub broken: u64,
    pub last_error: Option<String>,
}

/// The running transport. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    status: Arc<Mutex<TransportStatus>>,
    heard: Arc<Mutex<HashMap<NodeId, Instant>>>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Transport {
    /// Starts the transport: connects (and keeps reconnecting) to `url`, and links this
    /// node to every node heard on it. A NATS server that is down is a state, not a
    /// failed start.
    pub fn start(
        replicator: Replicator,
        node: NodeId,
        cluster: &str,
        url: String,
        shutdown: CancellationToken,
    ) -> Transport {
        let status = Arc::new(Mutex::new(TransportStatus {
            url: crate::config::redacted(&url),
            state: "connecting".into(),
            ..Default::default()
        }));
        let heard = Arc::new(Mutex::new(HashMap::new()));
        let prefix = format!("asp.t.{}", cluster_token(cluster));
        let task = tokio::spawn(run(
            replicator,
            node,
            prefix,
            url,
            shutdown,
            status.clone(),
            heard.clone(),
        ));
        Transport {
            status,
            heard,
            task: Arc::new(Mutex::new(Some(task))),
        }
    }

    pub fn status(&self) -> TransportStatus {
        let mut s = self.status.lock().unwrap().clone();
        let now = Instant::now();
        let mut heard: Vec<String> = self
            .heard
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, at)| now.duration_since(**at) < Duration::from_secs(10))
            .map(|(n, _)| n.to_string())
            .collect();
        heard.sort();
        s.nodes_heard = heard;
        s
    }

    /// Waits for the transport to stop after the shutdown token was cancelled.
    pub async fn stopped(&self) {
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// The cluster id as one subject token: the first 8 bytes of its SHA-256, in hex.
fn cluster_token(cluster: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cluster.as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One connection as the dispatcher sees it.
struct Conn {
    peer: NodeId,
    /// The next data message number expected from the peer.
    next_in: u64,
    to_link: mpsc::UnboundedSender<Bytes>,
    /// Bytes sent to the link and not yet written to its pipe.
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

/// What the dispatcher learns from the connection tasks.
enum Ended {
    Conn { id: u64, peer: NodeId, failed: bool },
}

struct Shared {
    client: async_nats::Client,
    replicator: Replicator,
    node: NodeId,
    prefix: String,
    status: Arc<Mutex<TransportStatus>>,
    ended: mpsc::UnboundedSender<Ended>,
}

async fn run(
    replicator: Replicator,
    node: NodeId,
    prefix: String,
    url: String,
    shutdown: CancellationToken,
    status: Arc<Mutex<TransportStatus>>,
    heard: Arc<Mutex<HashMap<NodeId, Instant>>>,
) {
    let backoff = crate::runtime::Backoff::new();
    // Connect (the client reconnects by itself once connected).
    let client = loop {
        let status_cb = status.clone();
        let connect = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let status = status_cb.clone();
                async move {
                    let mut s = status.lock().unwrap();
                    match event {
                        async_nats::Event::Connected => s.state = "connected".into(),
                        async_nats::Event::Disconnected => s.state = "disconnected".into(),
                        other => s.last_error = Some(other.to_string()),
                    }
                }
            })
            .connect(url.as_str());
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = connect => c,
        };
        match connected {
            Ok(c) => break c,
            Err(e) => {
                status.lock().unwrap().last_error = Some(format!("connecting to {url}: {e}"));
                if !backoff.wait(&shutdown).await {
                    return;
                }
            }
        }
    };
    let mine = format!("{prefix}.to.{node}");
    let hello = format!("{prefix}.hello");
    let subscribed = async {
        let a = client.subscribe(mine.clone()).await?;
        let b = client.subscribe(hello.clone()).await?;
        Ok::<_, async_nats::SubscribeError>(futures_util::stream::select(a, b))
    };
    let mut inbox = match subscribed.await {
        Ok(s) => s,
        Err(e) => {
            status.lock().unwrap().last_error = Some(format!("subscribing on {url}: {e}"));
            return;
        }
    };
    tracing::info!(url = %crate::config::redacted(&url), subject = %mine, "replicating through NATS");
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        client: client.clone(),
        replicator,
        node,
        prefix: prefix.clone(),
        status: status.clone(),
        ended: ended_tx,
    });
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    // Per other node: the connection open with it, and when to try again after a
    // failed one (with the failures in a row).
    let mut open_with: HashMap<NodeId, u64> = HashMap::new();
    let mut retry: HashMap<NodeId, (Instant, u32)> = HashMap::new();
    let mut tick = tokio::time::interval(HELLO_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                let _ = client.publish(hello.clone(), Bytes::from(node.to_string())).await;
            }
            Some(ended) = ended_rx.recv() => {
                let Ended::Conn { id, peer, failed } = ended;
                conns.remove(&id);
                if open_with.get(&peer) == Some(&id) {
                    open_with.remove(&peer);
                }
                if failed {
                    let failures = retry.get(&peer).map_or(0, |r| r.1) + 1;
                    let wait = Duration::from_millis(500)
                        .saturating_mul(1 << failures.min(6))
                        .min(RETRY_MAX);
                    retry.insert(peer, (Instant::now() + wait, failures));
                } else {
                    retry.remove(&peer);
                }
                status.lock().unwrap().connections = conns.len();
            }
            message = inbox.next() => {
                let Some(message) = message else { break };
                if message.subject.as_str() == hello {
                    let Ok(peer) = std::str::from_utf8(&message.payload).unwrap_or("").parse::<NodeId>() else {
                        continue;
                    };
                    if peer == node {
                        continue;
                    }
                    let new = heard.lock().unwrap().insert(peer, Instant::now()).is_none();
                    if new && peer < node {
                        // A node just heard of that opens connections to this one: say
                        // hello now rather than at the next tick (up to a second).
                        let _ = client.publish(hello.clone(), Bytes::from(node.to_string())).await;
                    }
                    let due = retry.get(&peer).is_none_or(|r| Instant::now() >= r.0);
                    if node < peer && !open_with.contains_key(&peer) && due && conns.len() < CONNECTIONS_MAX {
                        let id: u64 = rand::random();
                        let (tx, rx) = mpsc::unbounded_channel();
                        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                        conns.insert(id, Conn { peer, next_in: 0, to_link: tx, queued: queued.clone() });
                        open_with.insert(peer, id);
                        publish(&shared, peer, id, "open", None, Bytes::new()).await;
                        tokio::spawn(connection(shared.clone(), id, peer, true, rx, queued));
                    }
                    status.lock().unwrap().connections = conns.len();
                    continue;
                }
                handle(&shared, &mut conns, &mut open_with, message).await;
                status.lock().unwrap().connections = conns.len();
            }
        }
    }
    // The links see the node's shutdown themselves; say goodbye on each connection.
    for (id, conn) in conns.drain() {
        publish(&shared, conn.peer, id, "close", None, Bytes::new()).await;
    }
    let _ = client.flush().await;
}

/// A message to this node: a connection opened, data, or a close.
async fn handle(
    shared: &Arc<Shared>,
    conns: &mut HashMap<u64, Conn>,
    open_with: &mut HashMap<NodeId, u64>,
    message: async_nats::Message,
) {
    let Some(headers) = &message.headers else {
        return;
    };
    let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
    let (Some(id), Some(from), Some(kind)) = (
        get("asp-conn").and_then(|v| u64::from_str_radix(&v, 16).ok()),
        get("asp-from").and_then(|v| v.parse::<NodeId>().ok()),
        get("asp-kind"),
    ) else {
        tracing::debug!("a message without the transport's headers on this node's subject");
        return;
    };
    match kind.as_str() {
        "open" => {
            if conns.contains_key(&id) || conns.len() >= CONNECTIONS_MAX {
                return;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            conns.insert(
                id,
                Conn {
                    peer: from,
                    next_in: 0,
                    to_link: tx,
                    queued: queued.clone(),
                },
            );
            open_with.insert(from, id);
            tokio::spawn(connection(shared.clone(), id, from, false, rx, queued));
        }
        "data" => {
            let Some(conn) = conns.get_mut(&id) else {
                // A connection that ended here: tell the sender.
                publish(shared, from, id, "close", None, Bytes::new()).await;
                return;
            };
            let n = get("asp-n").and_then(|v| v.parse::<u64>().ok());
            let in_order = n == Some(conn.next_in) && conn.peer == from;
            let len = message.payload.len();
            let room =
                conn.queued.load(std::sync::atomic::Ordering::Acquire) + len <= QUEUE_BYTES_MAX;
            if in_order && room {
                conn.queued
                    .fetch_add(len, std::sync::atomic::Ordering::AcqRel);
                if conn.to_link.send(message.payload).is_err() {
                    // The connection is ending here; its close is on the way.
                    return;
                }
            }
            if !in_order || !room {
                tracing::warn!(peer = %from, expected = conn.next_in, got = ?n, "a NATS transport connection lost a message (or its link fell behind); closing it");
                shared.status.lock().unwrap().broken += 1;
                conns.remove(&id);
                publish(shared, from, id, "close", None, Bytes::new()).await;
                return;
            }
            conn.next_in += 1;
        }
        "close" => {
            // Dropping the sender ends the connection's link (it reads the end).
            conns.remove(&id);
        }
        _ => {}
    }
}

async fn publish(
    shared: &Shared,
    to: NodeId,
    id: u64,
    kind: &str,
    n: Option<u64>,
    payload: Bytes,
) -> bool {
    let mut headers = HeaderMap::new();
    headers.insert("asp-conn", format!("{id:x}").as_str());
    headers.insert("asp-from", shared.node.to_string().as_str());
    headers.insert("asp-kind", kind);
    if let Some(n) = n {
        headers.insert("asp-n", n.to_string().as_str());
    }
    let subject = format!("{}.to.{to}", shared.prefix);
    match shared
        .client
        .publish_with_headers(subject, headers, payload)
        .await
    {
        Ok(()) => true,
        Err(e) => {
            shared.status.lock().unwrap().last_error = Some(format!("publishing: {e}"));
            false
        }
    }
}

/// One connection: a link over a pipe whose other end this task feeds from NATS and
/// drains to NATS.
async fn connection(
    shared: Arc<Shared>,
    id: u64,
    peer: NodeId,
    opened: bool,
    mut from_peer: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
) {
    let (link_end, pipe) = tokio::io::duplex(PIPE_BYTES);
    let replicator = shared.replicator.clone();
    let link = tokio::spawn(async move {
        replicator
            .attach(link_end, opened, format!("nats:{peer}"))
            .await
    });
    let (mut rd, mut wr) = tokio::io::split(pipe);
    let outbound = {
        let shared = shared.clone();
        async move {
            let mut n = 0u64;
            let mut buf = BytesMut::with_capacity(CHUNK_BYTES);
            loop {
                buf.reserve(CHUNK_BYTES);
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let chunk = buf.split().freeze();
                        if !publish(&shared, peer, id, "data", Some(n), chunk).await {
                            return;
                        }
                        n += 1;
                    }
                }
            }
        }
    };
    let inbound = async move {
        while let Some(bytes) = from_peer.recv().await {
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
            queued.fetch_sub(bytes.len(), std::sync::atomic::Ordering::AcqRel);
        }
        let _ = wr.shutdown().await;
    };
    // Either way ending ends the connection: the link sees the pipe close.
    tokio::select! {
        _ = outbound => {}
        _ = inbound => {}
    }
    let result = link.await.unwrap_or_else(|e| Err(e.to_string()));
    let failed = result.is_err();
    if let Err(reason) = &result {
        tracing::debug!(peer = %peer, reason, "a link over NATS ended");
        shared.status.lock().unwrap().last_error = Some(format!("link with {peer}: {reason}"));
    }
    publish(&shared, peer, id, "close", None, Bytes::new()).await;
    let _ = shared.ended.send(Ended::Conn { id, peer, failed });
}
