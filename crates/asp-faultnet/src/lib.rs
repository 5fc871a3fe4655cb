//! A fault-injecting TCP proxy for integration tests and demos: it sits between two
//! nodes on loopback, forwards every byte it is given, and on request cuts the link
//! (partition), heals it, silently drops one direction (blackhole) or delays each chunk.
//!
//! The proxy never changes, reorders or invents bytes: a byte is either forwarded in
//! order or dropped. It never buffers more than one fixed-size chunk per direction and
//! connection, it never panics on I/O errors, and it never outlives its last handle:
//! every task it spawns ends when the proxy is stopped or dropped.

#![warn(missing_docs)]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::debug;

/// The size of the one buffer each direction of a connection copies through, which
/// bounds the memory a connection can hold no matter how slow the other side reads.
const CHUNK_BYTES: usize = 64 * 1024;

/// How long the accept loop waits after a failed accept before trying again, so that a
/// persistent error such as running out of file descriptors does not spin a core.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(10);

/// The blackhole state as stored in [`Shared::blackhole`]: no direction is dropped.
const BLACKHOLE_NONE: u8 = 0;
/// The blackhole state as stored in [`Shared::blackhole`]: client-to-target bytes are dropped.
const BLACKHOLE_FORWARD: u8 = 1;
/// The blackhole state as stored in [`Shared::blackhole`]: target-to-client bytes are dropped.
const BLACKHOLE_BACKWARD: u8 = 2;
/// The blackhole state as stored in [`Shared::blackhole`]: bytes in both directions are dropped.
const BLACKHOLE_BOTH: u8 = 3;

/// A direction of traffic through the proxy, as seen from the client that connected to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Bytes the client sends towards the target.
    Forward,
    /// Bytes the target sends back towards the client.
    Backward,
    /// Both of the above.
    Both,
}

impl Direction {
    /// Encodes a blackhole setting for storage in an atomic.
    fn encode(direction: Option<Direction>) -> u8 {
        match direction {
            None => BLACKHOLE_NONE,
            Some(Direction::Forward) => BLACKHOLE_FORWARD,
            Some(Direction::Backward) => BLACKHOLE_BACKWARD,
            Some(Direction::Both) => BLACKHOLE_BOTH,
        }
    }

    /// Returns whether a blackhole stored as `encoded` drops the bytes of `self`.
    fn is_dropped_by(self, encoded: u8) -> bool {
        match encoded {
            BLACKHOLE_BOTH => true,
            BLACKHOLE_FORWARD => self == Direction::Forward,
            BLACKHOLE_BACKWARD => self == Direction::Backward,
            _ => false,
        }
    }
}

/// Counters of what a proxy has done since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProxyStats {
    /// Connections accepted so far, including those closed at once during a partition
    /// and those whose target refused them.
    pub connections: u64,
    /// Bytes written to the target (client to target). Blackholed bytes are not counted.
    pub forward_bytes: u64,
    /// Bytes written to the client (target to client). Blackholed bytes are not counted.
    pub backward_bytes: u64,
}

/// A running fault-injecting TCP proxy.
///
/// Cloning is cheap and every clone controls the same proxy. The proxy stops when
/// [`Proxy::stop`] is called on any clone or when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Proxy {
    handle: Arc<Handle>,
}

/// The part of a proxy that only its handles own, so that dropping the last handle is
/// what stops the proxy even though the tasks keep [`Shared`] alive.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    /// Sending `true`, or dropping the sender with the last handle, tells the accept
    /// task to stop listening and to abort every connection.
    shutdown: watch::Sender<bool>,
    /// The accept task, taken by the first call to [`Proxy::stop`] so that it can wait
    /// for every connection to be closed.
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

/// The state shared between the handles, the accept task and the connection tasks.
#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    /// Whether new connections are closed at once instead of being forwarded.
    partitioned: AtomicBool,
    /// A generation number that [`Proxy::partition`] increments; every connection task
    /// watches it and closes its connection on any change. A counter is used rather
    /// than a flag so that a partition followed at once by a heal still cuts every
    /// connection that was open before it.
    cut: watch::Sender<u64>,
    /// The blackholed direction, encoded by [`Direction::encode`].
    blackhole: AtomicU8,
    /// The delay added before forwarding each chunk.
    delay_ns: AtomicU64,
    connections: AtomicU64,
    forward_bytes: AtomicU64,
    backward_bytes: AtomicU64,
    /// Bytes read and then dropped by a blackhole, in either direction. It is not part
    /// of [`ProxyStats`] but is logged when the proxy stops, and lets tests know when a
    /// blackholed write has really been consumed.
    blackholed_bytes: AtomicU64,
}

impl Shared {
    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed))
    }

    fn is_blackholed(&self, direction: Direction) -> bool {
        direction.is_dropped_by(self.blackhole.load(Ordering::Relaxed))
    }

    fn count_forwarded(&self, direction: Direction, length: usize) {
        let counter = match direction {
            Direction::Forward => &self.forward_bytes,
            Direction::Backward | Direction::Both => &self.backward_bytes,
        };
        counter.fetch_add(length as u64, Ordering::Relaxed);
    }

    fn stats(&self) -> ProxyStats {
        ProxyStats {
            connections: self.connections.load(Ordering::Relaxed),
            forward_bytes: self.forward_bytes.load(Ordering::Relaxed),
            backward_bytes: self.backward_bytes.load(Ordering::Relaxed),
        }
    }
}

impl Proxy {
    /// Listens on `listen` (tests pass `127.0.0.1:0`) and forwards every accepted
    /// connection to `target`.
    ///
    /// The proxy starts healed, with no blackhole and no delay. It runs on the current
    /// tokio runtime. Fails only if binding `listen` fails; the target is not contacted
    /// until a client connects.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            partitioned: AtomicBool::new(false),
            cut: watch::Sender::new(0),
            blackhole: AtomicU8::new(BLACKHOLE_NONE),
            delay_ns: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            forward_bytes: AtomicU64::new(0),
            backward_bytes: AtomicU64::new(0),
            blackholed_bytes: AtomicU64::new(0),
        });
        let (shutdown, shutdown_receiver) = watch::channel(false);
        let accept_task = tokio::spawn(accept_connections(
            Arc::clone(&shared),
            listener,
            shutdown_receiver,
        ));
        debug!(%local_addr, %target, "proxy started");
        Ok(Proxy {
            handle: Arc::new(Handle {
                shared,
                local_addr,
                shutdown,
                accept_task: Mutex::new(Some(accept_task)),
            }),
        })
    }

    /// The address the proxy listens on; clients connect here instead of to the target.
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr
    }

    /// Cuts the link: closes every open connection (both sides see EOF or a reset
    /// promptly) and, until [`Proxy::heal`], accepts new connections but closes them at
    /// once without connecting to the target.
    pub fn partition(&self) {
        let shared = &self.handle.shared;
        // The flag is set before the generation moves, so that the accept task, which
        // subscribes to the generation before reading the flag, either sees the flag
        // or sees the generation change: a connection cannot slip through.
        shared.partitioned.store(true, Ordering::SeqCst);
        shared
            .cut
            .send_modify(|generation| *generation = generation.wrapping_add(1));
        debug!(local_addr = %self.handle.local_addr, "proxy partitioned");
    }

    /// Restores normal forwarding for new connections. Connections cut by
    /// [`Proxy::partition`] stay closed; clients have to reconnect.
    pub fn heal(&self) {
        self.handle
            .shared
            .partitioned
            .store(false, Ordering::SeqCst);
        debug!(local_addr = %self.handle.local_addr, "proxy healed");
    }

    /// While set, bytes in the given direction are silently dropped and the connection
    /// stays open: a one-way partition, or a silent two-way one with
    /// [`Direction::Both`]. `None` clears it. Applies at once to open connections.
    pub fn set_blackhole(&self, direction: Option<Direction>) {
        self.handle
            .shared
            .blackhole
            .store(Direction::encode(direction), Ordering::Relaxed);
        debug!(local_addr = %self.handle.local_addr, ?direction, "proxy blackhole set");
    }

    /// Adds a fixed delay before forwarding each chunk (zero means none). Applies at
    /// once to open connections.
    ///
    /// Each direction of a connection forwards its chunks one after the other, so the
    /// delay never reorders bytes; it also limits throughput to one chunk per delay.
    pub fn set_delay(&self, delay: Duration) {
        let delay_ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.handle
            .shared
            .delay_ns
            .store(delay_ns, Ordering::Relaxed);
        debug!(local_addr = %self.handle.local_addr, ?delay, "proxy delay set");
    }

    /// Whether the proxy is partitioned, that is [`Proxy::partition`] was called and
    /// [`Proxy::heal`] was not called since.
    pub fn is_partitioned(&self) -> bool {
        self.handle.shared.partitioned.load(Ordering::SeqCst)
    }

    /// Connections accepted so far, and bytes forwarded in each direction.
    pub fn stats(&self) -> ProxyStats {
        self.handle.shared.stats()
    }

    /// Stops listening and closes every connection, for every clone of this proxy.
    ///
    /// Returns once the listener is closed and every connection task has ended. If
    /// another clone is already stopping the proxy, returns without waiting for it.
    pub async fn stop(self) {
        self.handle.shutdown.send_replace(true);
        let accept_task = self
            .handle
            .accept_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(accept_task) = accept_task
            && let Err(error) = accept_task.await
        {
            debug!(%error, "proxy accept task ended abnormally");
        }
    }
}

/// Accepts connections until the proxy stops, then aborts every connection task and
/// waits for them, which closes their sockets.
async fn accept_connections(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            // This fires both on an explicit stop and when the last handle is dropped,
            // because dropping the sender also counts as a change.
            _ = shutdown.changed() => break,
            // Finished connection tasks are reaped here so that the set does not grow
            // with every connection the proxy has ever had.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    // Subscribing before reading the flag is what makes a concurrent
                    // partition impossible to miss; see `Proxy::partition`.
                    let cut = shared.cut.subscribe();
                    if shared.partitioned.load(Ordering::SeqCst) {
                        debug!(%peer, "proxy partitioned, closing new connection");
                        drop(client);
                        continue;
                    }
                    connections.spawn(serve_connection(Arc::clone(&shared), client, peer, cut));
                }
                Err(error) => {
                    debug!(%error, "proxy accept failed, retrying");
                    tokio::select! {
                        biased;
                        _ = shutdown.changed() => break,
                        () = tokio::time::sleep(ACCEPT_RETRY_DELAY) => {}
                    }
                }
            },
        }
    }
    drop(listener);
    connections.shutdown().await;
    let stats = shared.stats();
    debug!(
        target = %shared.target,
        connections = stats.connections,
        forward_bytes = stats.forward_bytes,
        backward_bytes = stats.backward_bytes,
        blackholed_bytes = shared.blackholed_bytes.load(Ordering::Relaxed),
        "proxy stopped"
    );
}

/// Connects `client` to the target and copies bytes both ways until both sides have
/// closed, either side fails, or a partition cuts the connection. Returning drops both
/// sockets, which is what closes them.
async fn serve_connection(
    shared: Arc<Shared>,
    mut client: TcpStream,
    peer: SocketAddr,
    mut cut: watch::Receiver<u64>,
) {
    let connected = tokio::select! {
        // The sender lives in `shared`, which this task owns, so an error here cannot
        // happen; treating it as a cut anyway is the safe choice.
        _ = cut.changed() => {
            debug!(%peer, "connection cut by partition before reaching the target");
            return;
        }
        connected = TcpStream::connect(shared.target) => connected,
    };
    let mut target = match connected {
        Ok(target) => target,
        Err(error) => {
            debug!(%peer, target = %shared.target, %error, "target refused connection, closing client");
            return;
        }
    };
    // Small writes must not wait for Nagle's algorithm, or the proxy itself would add
    // delays nobody asked for. Failing to set it only costs latency.
    for stream in [&client, &target] {
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%peer, %error, "could not disable Nagle's algorithm");
        }
    }
    let (client_reader, client_writer) = client.split();
    let (target_reader, target_writer) = target.split();
    let forward = copy_chunks(&shared, Direction::Forward, client_reader, target_writer);
    let backward = copy_chunks(&shared, Direction::Backward, target_reader, client_writer);
    tokio::select! {
        _ = cut.changed() => debug!(%peer, "connection cut by partition"),
        copied = async { tokio::try_join!(forward, backward) } => match copied {
            Ok(_) => debug!(%peer, "connection closed by both sides"),
            Err(error) => debug!(%peer, %error, "connection failed"),
        },
    }
}

/// Copies chunks from `reader` to `writer` in one direction until `reader` reaches end
/// of file, which is passed on as a write shutdown, or an error occurs.
///
/// Each chunk is read, delayed, then either written in full or dropped by a blackhole,
/// before the next chunk is read: this is what keeps bytes in order under a delay and
/// what bounds the memory to one chunk.
async fn copy_chunks<R, W>(
    shared: &Shared,
    direction: Direction,
    mut reader: R,
    mut writer: W,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut chunk = vec![0_u8; CHUNK_BYTES];
    loop {
        let length = reader.read(&mut chunk).await?;
        if length == 0 {
            writer.shutdown().await?;
            return Ok(());
        }
        let delay = shared.delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // The blackhole is checked after the delay so that a change made while a chunk
        // was being delayed applies to that chunk too.
        if shared.is_blackholed(direction) {
            shared
                .blackholed_bytes
                .fetch_add(length as u64, Ordering::Relaxed);
            continue;
        }
        writer.write_all(&chunk[..length]).await?;
        shared.count_forwarded(direction, length);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::Ipv4Addr;

    /// The upper bound on any single wait in these tests, so that a bug makes a test
    /// fail instead of hang. Nothing is asserted about how long anything takes.
    const PATIENCE: Duration = Duration::from_secs(5);

    fn loopback() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }

    /// A tiny echo server that counts the connections it has accepted.
    struct EchoServer {
        address: SocketAddr,
        connections: Arc<AtomicU64>,
    }

    impl EchoServer {
        async fn start() -> EchoServer {
            let listener = TcpListener::bind(loopback())
                .await
                .expect("bind echo server");
            let address = listener.local_addr().expect("echo server address");
            let connections = Arc::new(AtomicU64::new(0));
            let counter = Arc::clone(&connections);
            // These tasks end with the test's runtime.
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let (mut reader, mut writer) = stream.split();
                        let _ = tokio::io::copy(&mut reader, &mut writer).await;
                    });
                }
            });
            EchoServer {
                address,
                connections,
            }
        }

        fn connections(&self) -> u64 {
            self.connections.load(Ordering::SeqCst)
        }
    }

    async fn connect(proxy: &Proxy) -> TcpStream {
        tokio::time::timeout(PATIENCE, TcpStream::connect(proxy.local_addr()))
            .await
            .expect("connect timed out")
            .expect("connect to proxy")
    }

    /// Sends `message` and asserts that exactly it comes back.
    async fn assert_echoes(stream: &mut TcpStream, message: &[u8]) {
        stream.write_all(message).await.expect("write");
        let mut echoed = vec![0_u8; message.len()];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut echoed))
            .await
            .expect("echo timed out")
            .expect("read echo");
        assert_eq!(echoed, message);
    }

    /// Asserts that the peer closes `stream`: a read ends with end of file or an error
    /// (a reset) rather than with data.
    async fn assert_closed(stream: &mut TcpStream) {
        let mut buffer = [0_u8; 64];
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut buffer))
            .await
            .expect("connection was not closed");
        match read {
            Ok(0) | Err(_) => {}
            Ok(length) => panic!("expected a closed connection, read {length} bytes"),
        }
    }

    /// Waits until `condition` holds, for counters that are updated just after the
    /// bytes they count have been handed on.
    async fn wait_until(mut condition: impl FnMut() -> bool) {
        tokio::time::timeout(PATIENCE, async {
            while !condition() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("condition never held");
    }

    #[tokio::test]
    async fn bytes_round_trip_through_the_proxy() {
        let echo = EchoServer::start().await;
        let proxy = Proxy::start(loopback(), echo.address).await.expect("start");
        let mut stream = connect(&proxy).await;
        assert_echoes(&mut stream, b"hello through the proxy").await;
        assert_echoes(&mut stream, b"and again").await;
        assert_eq!(echo.connections(), 1);
        proxy.stop().await;
    }

    #[tokio::test]
    async fn partition_closes_open_connections() {
        let echo = EchoServer::start().await;
        let proxy = Proxy::start(loopback(), echo.address).await.expect("start");
        let mut first = connect(&proxy).await;
        let mut second = connect(&proxy).await;
        assert_echoes(&mut first, b"before").await;
        assert_echoes(&mut second, b"before").await;

        proxy.partition();
        assert!(proxy.is_partitioned());
        assert_closed(&mut first).await;
        assert_closed(&mut second).await;
        proxy.stop().await;
    }

    #[tokio::test]
    async fn partition_closes_new_connections_until_heal() {
        let echo = EchoServer::start().await;
        let proxy = Proxy::start(loopback(), echo.address).await.expect("start");
        proxy.partition();

        let mut refused = connect(&proxy).await;
        assert_closed(&mut refused).await;
        wait_until(|| proxy.stats().connections == 1).await;
        assert_eq!(echo.connections(), 0);

        proxy.heal();
        assert!(!proxy.is_partitioned());
        let mut healed = connect(&proxy).await;
        assert_echoes(&mut healed, b"after heal").await;
        // The echo server accepts in arrival order, so having echoed for the healed
        // connection it would have counted the refused one too, had it ever arrived.
        assert_eq!(echo.connections(), 1);
        proxy.stop().await;
    }

    #[tokio::test]
    async fn partition_then_immediate_heal_still_cuts_open_connections() {
        let echo = EchoServer::start().await;
        let proxy = Proxy::start(loopback(), echo.address).await.expect("start");
        let mut stream = connect(&proxy).await;
        assert_echoes(&mut stream, b"before").await;

        proxy.partition();
        proxy.heal();
        assert_closed(&mut stream).await;
        let mut fresh = connect(&proxy).await;
        assert_echoes(&mut fresh, b"after").await;
        proxy.stop().await;
    }

    #[tokio::test]
    async fn forward_blackhole_drops_client_bytes_and_keeps_the_connection_open() {
        let echo = EchoServer::start().await;
        let proxy = Proxy::start(loopback(), echo.address).await.expect("start");
        let mut stream = connect(&proxy).await;
        assert_echoes(&mut stream, b"open").await;

        proxy.set_blackhole(Some(Direction::Forward));
        stream.write_all(b"lost").await.expect("write");
        let shared = Arc::clone(&proxy.handle.shared);
        wait_until(|| shared.blackholed_bytes.load(Ordering::Relaxed) == 4).await;

        proxy.set_blackhole(None);
        // Only the bytes sent after clearing the blackhole come back: the dropped ones
        // never reached the echo server, and the connection survived.
        assert_echoes(&mut stream, b"kept").await;
        wait_until(|| proxy.stats().backward_bytes == 8).await;
        assert_eq!(proxy.stats().forward_bytes, 8);
        assert_eq!(echo.connections(), 1);
        proxy.stop().await;
    }

    #[tokio::test]
    async fn backward_blackhole_drops_target_bytes_and_keeps_the_connection_open() {
        let echo = EchoServer::start().await;
        let proxy = Proxy::start(loopback(), echo.address).await.expect("start");
        let mut stream = connect(&proxy).await;

        proxy.set_blackhole(Some(Direction::Backward));
        stream.write_all(b"ping").await.expect("write");
        let shared = Arc::clone(&proxy.handle.shared);
        wait_until(|| shared.blackholed_bytes.load(Ordering::Relaxed) == 4).await;
        assert_eq!(proxy.stats().forward_bytes, 4);
        assert_eq!(proxy.stats().backward_bytes, 0);

        proxy.set_blackhole(None);
        assert_echoes(&mut stream, b"pong").await;
        proxy.stop().await;
    }

    #[tokio::test]
    async fn delay_delivers_every_byte_in_order() {
        let echo = EchoServer::start().await;
        let proxy = Proxy::start(loopback(), echo.address).await.expect("start");
        proxy.set_delay(Duration::from_millis(2));
        let stream = connect(&proxy).await;
        let (mut reader, mut writer) = stream.into_split();

        // Many small writes, each numbered, so that any reordering or loss shows up.
        let message_count: u32 = 200;
        let sent: Vec<u8> = (0..message_count)
            .flat_map(|index| index.to_be_bytes())
            .collect();
        let expected = sent.clone();
        let sender = tokio::spawn(async move {
            for message in sent.chunks(4) {
                writer.write_all(message).await.expect("write");
            }
            writer
        });
        let mut received = vec![0_u8; expected.len()];
        tokio::time::timeout(PATIENCE, reader.read_exact(&mut received))
            .await
            .expect("delayed bytes timed out")
            .expect("read delayed bytes");
        assert_eq!(received, expected);
        drop(sender.await.expect("sender task"));
        proxy.stop().await;
    }

    #[tokio::test]
    async fn stats_count_connections_and_bytes() {
        let echo = EchoServer::start().await;
        let proxy = Proxy::start(loopback(), echo.address).await.expect("start");
        assert_eq!(proxy.stats(), ProxyStats::default());
        for _ in 0..3 {
            let mut stream = connect(&proxy).await;
            assert_echoes(&mut stream, b"0123456789").await;
        }
        let expected = ProxyStats {
            connections: 3,
            forward_bytes: 30,
            backward_bytes: 30,
        };
        wait_until(|| proxy.stats() == expected).await;
        proxy.stop().await;
    }

    #[tokio::test]
    async fn refused_target_closes_the_client() {
        // Binding and dropping a listener yields a loopback port nothing listens on.
        let unused = TcpListener::bind(loopback()).await.expect("bind");
        let target = unused.local_addr().expect("address");
        drop(unused);

        let proxy = Proxy::start(loopback(), target).await.expect("start");
        let mut stream = connect(&proxy).await;
        assert_closed(&mut stream).await;
        assert_eq!(proxy.stats().connections, 1);
        proxy.stop().await;
    }

    #[tokio::test]
    async fn stop_closes_connections_and_the_listener() {
        let echo = EchoServer::start().await;
        let proxy = Proxy::start(loopback(), echo.address).await.expect("start");
        let address = proxy.local_addr();
        let mut stream = connect(&proxy).await;
        assert_echoes(&mut stream, b"before stop").await;

        proxy.stop().await;
        assert_closed(&mut stream).await;
        assert!(TcpStream::connect(address).await.is_err());
    }

    #[tokio::test]
    async fn dropping_the_last_clone_stops_the_proxy() {
        let echo = EchoServer::start().await;
        let proxy = Proxy::start(loopback(), echo.address).await.expect("start");
        let clone = proxy.clone();
        let mut stream = connect(&proxy).await;
        drop(proxy);
        assert_echoes(&mut stream, b"one clone left").await;

        drop(clone);
        assert_closed(&mut stream).await;
    }
}
