//! Redis replication on this machine, measured for side-by-side comparison with asp's own
//! replication in the same benchmark run.
//!
//! Size: one harness — a RESP2 client, the lifecycle of the `redis-server` processes
//! it starts, and the two measurements that share them.
//!
//! Two measurements, each on a fresh pair of `redis-server` processes (a master and a
//! replica) that this module starts itself:
//! - [`redis_catch_up`]: full-sync catch-up. The master is loaded with pipelined `SET`s,
//!   then an empty replica is pointed at it with `REPLICAOF`; the clock runs from
//!   `REPLICAOF` until the replica's `INFO replication` reports `master_link_status:up`
//!   and `master_sync_in_progress:0` and its `DBSIZE` equals the number of keys loaded.
//! - [`redis_live_latency`]: live replication latency. With master and replica in sync,
//!   `SET`s are written to the master open loop at a fixed rate, and for each key the time
//!   from the master's `+OK` to the moment a client subscribed to keyspace notifications
//!   on the replica sees the write is recorded in an HDR histogram.
//!
//! The servers are started as child processes on free loopback ports (found by binding
//! `127.0.0.1:0`; port 6379 is refused outright, so a system Redis there is never
//! touched), each checked to be our own child by the `process_id` it reports. They work
//! in a temporary directory created under the caller's work directory. Servers are
//! stopped (SIGTERM, then SIGKILL if they linger) and the directory is removed when the
//! measurement ends, whether it succeeded, failed, panicked or was cancelled.
//!
//! Both servers of a measurement run with the same persistence settings: with `aof`,
//! `--appendonly yes --appendfsync everysec`; without, `--appendonly no`. In both modes
//! RDB snapshots are disabled (`--save ""`) so that a scheduled background save cannot
//! land in the middle of a run, and `--repl-diskless-sync-delay 0` removes the 5-second
//! wait (Redis 7's default) that a master would otherwise add before a full sync to
//! gather more replicas; the transfer itself stays Redis's default (diskless on the
//! master, through a disk file on the replica).
//!
//! Values are pseudo-random bytes, so that Redis's RDB string compression (LZF) cannot
//! shrink the full-sync transfer below what real data would cost.
//!
//! The Redis client is a minimal RESP2 client written here (commands as arrays of bulk
//! strings; replies parsed with bounded sizes and nesting); no Redis client crate is used.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

/// The server binary, looked up on `PATH`.
const REDIS_SERVER: &str = "redis-server";
/// The port of the system Redis, which this module must never use.
const SYSTEM_REDIS_PORT: u16 = 6379;
/// Attempts (one every [`READY_INTERVAL`]) to get a `PONG` from a fresh server.
const READY_ATTEMPTS: u32 = 400;
/// Pause between readiness attempts.
const READY_INTERVAL: Duration = Duration::from_millis(25);
/// Times a server is started on a new port when it exits during start-up (e.g. because
/// another process took the free port first).
const START_TRIES: u32 = 3;
/// Bound on any single network operation of a request/reply exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on loading the master.
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on waiting for a replica to finish a full sync.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// Interval of `INFO replication` polling while waiting for a sync.
const SYNC_POLL: Duration = Duration::from_millis(2);
/// Bound on waiting for the replica to notify a probe write before a latency run.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Grace period of a latency run beyond its planned duration.
const LIVE_GRACE: Duration = Duration::from_secs(60);
/// Commands per pipelined write when loading, and most writes sent at once when a
/// latency run's writer is behind schedule.
const CHUNK: u64 = 10_000;
/// Largest amount of unparsed input a connection buffers.
const MAX_READ_BUFFER: usize = 64 << 20;
/// Largest bulk string accepted in a reply.
const MAX_BULK: usize = 32 << 20;
/// Largest array accepted in a reply.
const MAX_ARRAY: usize = 1 << 20;
/// Deepest nesting of arrays accepted in a reply.
const MAX_DEPTH: usize = 8;
/// Longest header line (type byte, length or simple string) accepted in a reply.
const MAX_LINE: usize = 64 << 10;
/// Highest latency, in microseconds, the histogram tracks; larger values are clamped.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Keyspace notification channel prefix of database 0.
const KEYSPACE_PREFIX: &[u8] = b"__keyspace@0__:";
/// Key of the write that checks keyspace notifications before a latency run.
const PROBE_KEY: &[u8] = b"bench:probe";

/// Result of a full-sync catch-up run ([`redis_catch_up`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CatchUp {
    /// Keys the replica had to catch up with.
    pub keys: u64,
    /// Size of each value, in bytes.
    pub value_bytes: usize,
    /// Seconds from `REPLICAOF` until the replica was in sync and held every key.
    pub seconds: f64,
}

impl CatchUp {
    /// Keys (one write event each) caught up per second; 0 if no time was measured.
    pub fn events_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.keys as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Value payload caught up per second, in MB (10^6 bytes; keys and protocol overhead
    /// not counted); 0 if no time was measured.
    pub fn mb_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.keys as f64 * self.value_bytes as f64 / self.seconds / 1e6
        } else {
            0.0
        }
    }
}

/// Result of a live replication latency run ([`redis_live_latency`]): time from the
/// master's `+OK` to the write being observed on the replica, in microseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Latency {
    /// Writes measured (every write of the run).
    pub samples: u64,
    /// Median latency, in microseconds.
    pub p50_us: u64,
    /// 99th-percentile latency, in microseconds.
    pub p99_us: u64,
    /// Largest latency, in microseconds.
    pub max_us: u64,
    /// (latency in µs, fraction of writes at or under it), for the plots.
    pub cdf: Vec<(f64, f64)>,
}

/// Full-sync catch-up of a Redis replica.
///
/// Starts a master, loads `keys` keys (`k000000000001`, `k000000000002`, ...) with
/// `value_bytes`-byte pseudo-random values through pipelined `SET`s (10,000 commands per
/// write; loading gives up after 300 s), then starts an empty replica and sends it `REPLICAOF`. The time reported runs
/// from sending `REPLICAOF` until the replica's `INFO replication` says
/// `master_link_status:up` and `master_sync_in_progress:0` and its `DBSIZE` is `keys`
/// (polled every 2 ms; gives up after 120 s with an error that quotes the replica's last
/// state and log).
///
/// With `aof`, both servers run with `--appendonly yes --appendfsync everysec`, otherwise
/// with `--appendonly no`; RDB snapshots are off in both modes (see the module docs). A
/// replica with AOF starts an AOF rewrite once the sync is done; that rewrite is not part
/// of the time measured.
///
/// `progress` is called with the number of keys loaded on the master so far, after each
/// pipelined chunk is acknowledged (ending with `keys`); it is not called during the sync.
///
/// Servers and their temporary directory (created under `work_dir`, which is created if
/// missing) are removed before returning, on success and on error alike.
pub async fn redis_catch_up(
    work_dir: &Path,
    keys: u64,
    value_bytes: usize,
    aof: bool,
    progress: impl Fn(u64),
) -> anyhow::Result<CatchUp> {
    let scratch = Scratch::create(work_dir, "redis-bench")?;
    let master = Server::start(&scratch.path, "master", aof).await?;
    let mut to_master = master.connect().await?;
    load(&mut to_master, keys, value_bytes, &progress)
        .await
        .context("loading the master")?;
    let loaded = dbsize(&mut to_master).await?;
    ensure!(
        loaded == keys,
        "master holds {loaded} keys after loading {keys}"
    );

    let replica = Server::start(&scratch.path, "replica", aof).await?;
    let mut to_replica = replica.connect().await?;
    let port = master.port.to_string();
    let start = Instant::now();
    to_replica
        .call(&[b"REPLICAOF", b"127.0.0.1", port.as_bytes()])
        .await
        .context("REPLICAOF")?;
    wait_in_sync(&mut to_replica, &replica, keys).await?;
    let seconds = start.elapsed().as_secs_f64();

    drop(to_replica);
    drop(to_master);
    drop(replica);
    drop(master);
    drop(scratch);
    Ok(CatchUp {
        keys,
        value_bytes,
        seconds,
    })
}

/// Live replication latency of Redis under a steady write rate.
///
/// Starts a master and a replica, brings them in sync, sets `notify-keyspace-events KEA`
/// on the replica and subscribes a replica client to `__keyspace@0__:*` (`PSUBSCRIBE`).
/// Then writes `events` `SET`s (keys `k000000000001`, ..., `value_bytes`-byte values) to
/// the master open loop at `rate_per_s`: write `i` is scheduled at `i / rate_per_s`
/// seconds from the start and sent when due, whether or not earlier writes have been
/// acknowledged or observed. The run uses three threads on blocking sockets (from
/// tokio's blocking pool; the calling task only awaits them): a writer that sleeps until
/// each write's planned time (`std::thread::sleep`, so writes are paced individually
/// rather than on tokio's 1 ms timer; writes already due together, when the writer fell
/// behind, go out in one pipelined write), a reader of the master's replies, and a reader
/// of the replica's notifications. For every key the latency is the time from reading the
/// master's `+OK` to reading the replica's `set` notification for that key, each stamped
/// right after the socket read that delivered it. The two travel on different
/// connections, so on a busy machine the notification can be read before the `+OK` (the
/// `+OK` reader was not scheduled yet); such a sample counts as 0 µs.
///
/// Redis replicas do emit keyspace notifications for writes they apply from their
/// master (checked on Redis 7.0.15), so the replica is observed through notifications,
/// not by polling `GET`. Each run checks this first with a probe write, and fails with
/// an error (instead of measuring something else) if the replica does not notify it
/// within 10 s.
///
/// Persistence is as in [`redis_catch_up`]. Gives up with an error if the run is not
/// done 60 s after its planned duration (`events / rate_per_s`). Servers and their
/// temporary directory (under `work_dir`) are removed before returning, on success and
/// on error alike.
pub async fn redis_live_latency(
    work_dir: &Path,
    events: u64,
    rate_per_s: u64,
    value_bytes: usize,
    aof: bool,
) -> anyhow::Result<Latency> {
    ensure!(events > 0, "a latency run needs at least one event");
    ensure!(rate_per_s > 0, "a latency run needs a positive rate");
    let n = usize::try_from(events).context("too many events")?;

    let scratch = Scratch::create(work_dir, "redis-bench")?;
    let master = Server::start(&scratch.path, "master", aof).await?;
    let replica = Server::start(&scratch.path, "replica", aof).await?;
    let mut to_replica = replica.connect().await?;
    let port = master.port.to_string();
    to_replica
        .call(&[b"REPLICAOF", b"127.0.0.1", port.as_bytes()])
        .await
        .context("REPLICAOF")?;
    wait_in_sync(&mut to_replica, &replica, 0).await?;
    to_replica
        .call(&[b"CONFIG", b"SET", b"notify-keyspace-events", b"KEA"])
        .await
        .context("enabling keyspace notifications on the replica")?;

    let mut subscriber = replica.connect().await?;
    let mut pattern = KEYSPACE_PREFIX.to_vec();
    pattern.push(b'*');
    let reply = subscriber.call(&[b"PSUBSCRIBE", &pattern]).await?;
    let subscribed = match &reply {
        Reply::Array(Some(items)) => items.first().is_some_and(|k| k.is_bulk(b"psubscribe")),
        _ => false,
    };
    ensure!(subscribed, "unexpected reply to PSUBSCRIBE: {reply:?}");

    let mut to_master = master.connect().await?;
    to_master
        .call(&[b"SET", PROBE_KEY, b"1"])
        .await
        .context("probe write")?;
    let probe_deadline = Instant::now() + PROBE_TIMEOUT;
    loop {
        let message = subscriber.reader.next(probe_deadline).await.map_err(|e| {
            e.context(
                "the replica did not emit a keyspace notification for a replicated \
                     write (is notify-keyspace-events honoured on replicas?)",
            )
        })?;
        if notified_key(&message).is_some_and(|key| key == PROBE_KEY) {
            break;
        }
    }

    // The run itself: three threads with blocking sockets, so that each write leaves at
    // its planned time (std::thread::sleep, not a 1 ms async timer) and the +OK and the
    // notification are each stamped by a thread that was waiting on that socket alone.
    let (master_stream, _) = to_master.into_blocking()?;
    let (subscriber_stream, subscriber_buf) = subscriber.into_blocking()?;
    let ack_stream = master_stream
        .try_clone()
        .context("cloning the master socket")?;
    let pool = value_pool(value_bytes);
    let base = std::time::Instant::now();
    let planned_run =
        Duration::try_from_secs_f64(events as f64 / rate_per_s as f64).unwrap_or(Duration::MAX);
    let deadline = base
        .checked_add(planned_run.saturating_add(LIVE_GRACE))
        .context("latency run too long")?;

    let writer = tokio::task::spawn_blocking(move || {
        write_paced(
            master_stream,
            &pool,
            value_bytes,
            events,
            rate_per_s,
            base,
            deadline,
        )
    });
    let acks = tokio::task::spawn_blocking(move || {
        let mut reader = BlockingReader::new(ack_stream, BytesMut::new());
        let mut ok_at = Vec::with_capacity(n);
        while ok_at.len() < n {
            reader.fill(deadline).with_context(|| {
                format!("master acknowledged {} of {events} writes", ok_at.len())
            })?;
            let now = nanos_since(base);
            while ok_at.len() < n {
                let Some(reply) = take_reply(&mut reader.buf)? else {
                    break;
                };
                ensure!(reply.is_ok(), "SET on the master failed: {reply:?}");
                ok_at.push(now);
            }
        }
        anyhow::Ok(ok_at)
    });
    let observer = tokio::task::spawn_blocking(move || {
        let mut reader = BlockingReader::new(subscriber_stream, subscriber_buf);
        let mut seen_at = vec![u64::MAX; n];
        let mut seen = 0usize;
        while seen < n {
            reader
                .fill(deadline)
                .with_context(|| format!("the replica notified {seen} of {events} writes"))?;
            let now = nanos_since(base);
            while let Some(message) = take_reply(&mut reader.buf)? {
                let Some(index) = notified_key(&message).and_then(key_index) else {
                    continue;
                };
                let slot = index
                    .checked_sub(1)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| seen_at.get_mut(i));
                if let Some(slot) = slot
                    && *slot == u64::MAX
                {
                    *slot = now;
                    seen += 1;
                }
            }
        }
        anyhow::Ok(seen_at)
    });
    let (written, ok_at, seen_at) = tokio::join!(writer, acks, observer);
    written.context("latency writer thread")??;
    let ok_at = ok_at.context("latency acknowledgement thread")??;
    let seen_at = seen_at.context("latency observer thread")??;

    let mut histogram = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)
        .context("creating the latency histogram")?;
    for (ok, seen) in ok_at.iter().zip(&seen_at) {
        histogram.saturating_record(seen.saturating_sub(*ok) / 1_000);
    }

    drop(to_replica);
    drop(replica);
    drop(master);
    drop(scratch);
    Ok(Latency {
        samples: histogram.len(),
        p50_us: histogram.value_at_quantile(0.50),
        p99_us: histogram.value_at_quantile(0.99),
        max_us: histogram.max(),
        cdf: crate::plot::cdf_points(&histogram),
    })
}

/// Writes `SET`s for keys `1..=events` to the master, write `i` (from 0) at `base +
/// i / rate_per_s`, each as soon as it is due and without waiting for any reply; writes
/// that are already due together (the writer fell behind) go out in one pipelined write
/// of at most [`CHUNK`] commands.
fn write_paced(
    mut stream: std::net::TcpStream,
    pool: &[u8],
    value_bytes: usize,
    events: u64,
    rate_per_s: u64,
    base: std::time::Instant,
    deadline: std::time::Instant,
) -> anyhow::Result<()> {
    let planned = |i: u64| {
        Duration::from_nanos(
            u64::try_from(u128::from(i) * 1_000_000_000 / u128::from(rate_per_s))
                .unwrap_or(u64::MAX),
        )
    };
    stream.set_write_timeout(Some(
        deadline
            .saturating_duration_since(base)
            .max(Duration::from_millis(1)),
    ))?;
    let mut out = Vec::new();
    let mut sent = 0u64;
    while sent < events {
        let now = std::time::Instant::now();
        ensure!(
            now < deadline,
            "latency writer timed out after {sent} writes"
        );
        let elapsed = now - base;
        if elapsed < planned(sent) {
            std::thread::sleep(planned(sent) - elapsed);
            continue;
        }
        let mut upto = sent + 1;
        while upto < events && upto < sent + CHUNK && planned(upto) <= elapsed {
            upto += 1;
        }
        out.clear();
        for i in sent..upto {
            encode_set(&mut out, i + 1, value_for(pool, value_bytes, i + 1));
        }
        stream.write_all(&out).context("writing to the master")?;
        sent = upto;
    }
    Ok(())
}

/// Loads keys `1..=keys` into the master through pipelined `SET`s, the writes and the
/// reading of replies running concurrently; calls `progress` after each chunk is
/// acknowledged.
async fn load(
    conn: &mut Conn,
    keys: u64,
    value_bytes: usize,
    progress: &impl Fn(u64),
) -> anyhow::Result<()> {
    let pool = value_pool(value_bytes);
    let deadline = Instant::now() + LOAD_TIMEOUT;
    let Conn { reader, writer } = conn;
    let send = async {
        let mut out = Vec::new();
        let mut next = 1u64;
        while next <= keys {
            let end = keys.min(next + CHUNK - 1);
            out.clear();
            for key in next..=end {
                encode_set(&mut out, key, value_for(&pool, value_bytes, key));
            }
            write_by(writer, &out, deadline).await?;
            next = end + 1;
        }
        anyhow::Ok(())
    };
    let receive = async {
        let mut acked = 0u64;
        while acked < keys {
            let reply = reader
                .next(deadline)
                .await
                .with_context(|| format!("master acknowledged {acked} of {keys} SETs"))?;
            ensure!(reply.is_ok(), "SET failed: {reply:?}");
            acked += 1;
            if acked.is_multiple_of(CHUNK) || acked == keys {
                progress(acked);
            }
        }
        anyhow::Ok(())
    };
    tokio::try_join!(send, receive)?;
    Ok(())
}

/// Polls the replica until it reports a finished sync with an up link and holds
/// `keys` keys, or fails after [`SYNC_TIMEOUT`].
async fn wait_in_sync(conn: &mut Conn, replica: &Server, keys: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let state = match conn.call_raw(&[b"INFO", b"replication"]).await? {
            Reply::Bulk(Some(text)) => {
                let text = String::from_utf8_lossy(&text);
                let link = info_field(&text, "master_link_status");
                let syncing = info_field(&text, "master_sync_in_progress");
                let mut state = format!(
                    "master_link_status:{}, master_sync_in_progress:{}",
                    link.unwrap_or("?"),
                    syncing.unwrap_or("?"),
                );
                if link == Some("up") && syncing == Some("0") {
                    // DBSIZE is refused (-LOADING) while the replica still loads its data.
                    match conn.call_raw(&[b"DBSIZE"]).await? {
                        Reply::Int(n) if u64::try_from(n) == Ok(keys) => return Ok(()),
                        Reply::Int(n) => state.push_str(&format!(", DBSIZE {n} of {keys}")),
                        other => state.push_str(&format!(", DBSIZE: {other:?}")),
                    }
                }
                state
            }
            other => format!("INFO replication: {other:?}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "replica not in sync after {SYNC_TIMEOUT:?} ({state}); replica log ends with:\n{}",
                replica.log_tail()
            );
        }
        tokio::time::sleep(SYNC_POLL).await;
    }
}

/// `DBSIZE` of a server.
async fn dbsize(conn: &mut Conn) -> anyhow::Result<u64> {
    match conn.call(&[b"DBSIZE"]).await? {
        Reply::Int(n) => u64::try_from(n).context("negative DBSIZE"),
        other => bail!("unexpected reply to DBSIZE: {other:?}"),
    }
}

/// The value of `field` in an `INFO` reply (`field:value` lines).
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// The key of a keyspace notification of a `set` event (`pmessage`, pattern, channel,
/// event), if `message` is one.
fn notified_key(message: &Reply) -> Option<&[u8]> {
    let Reply::Array(Some(items)) = message else {
        return None;
    };
    match items.as_slice() {
        [kind, _pattern, Reply::Bulk(Some(channel)), event]
            if kind.is_bulk(b"pmessage") && event.is_bulk(b"set") =>
        {
            channel.strip_prefix(KEYSPACE_PREFIX)
        }
        _ => None,
    }
}

/// The number of a benchmark key (`k000000000042` is 42).
fn key_index(key: &[u8]) -> Option<u64> {
    let digits = key.strip_prefix(b"k")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Nanoseconds elapsed since `base`.
fn nanos_since(base: std::time::Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Pseudo-random bytes (xorshift64*) from which values are cut: each value is a window
/// of `value_bytes` bytes at a key-dependent offset.
pub(crate) fn value_pool(value_bytes: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut pool = Vec::with_capacity(value_bytes + 4096 + 8);
    while pool.len() < value_bytes + 4096 {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        pool.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    pool
}

/// The value of key number `key`: a window of the pool.
pub(crate) fn value_for(pool: &[u8], value_bytes: usize, key: u64) -> &[u8] {
    let offset = (key.wrapping_mul(7919) % 4096) as usize;
    &pool[offset..offset + value_bytes]
}

/// Appends `SET k<key, 12 digits> <value>` to `out`.
fn encode_set(out: &mut Vec<u8>, key: u64, value: &[u8]) {
    let key = format!("k{key:012}");
    encode(out, &[b"SET", key.as_bytes(), value]);
}

/// Appends a command to `out` as a RESP array of bulk strings.
fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes all of `bytes`, failing at `deadline`.
async fn write_by(
    writer: &mut OwnedWriteHalf,
    bytes: &[u8],
    deadline: Instant,
) -> anyhow::Result<()> {
    tokio::time::timeout_at(deadline, writer.write_all(bytes))
        .await
        .map_err(|_| anyhow!("timed out writing to redis"))?
        .context("writing to redis")
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    /// `+...`
    Simple(String),
    /// `-...`
    Error(String),
    /// `:...`
    Int(i64),
    /// `$...`; `None` is the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `*...`; `None` is the null array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// Whether this is `+OK`.
    fn is_ok(&self) -> bool {
        matches!(self, Reply::Simple(s) if s == "OK")
    }

    /// Whether this is a bulk string equal to `text`, ignoring ASCII case.
    fn is_bulk(&self, text: &[u8]) -> bool {
        matches!(self, Reply::Bulk(Some(b)) if b.eq_ignore_ascii_case(text))
    }
}

/// Parses one reply from the start of `buf`: `None` if `buf` holds only part of one,
/// else the reply and the bytes it took.
fn parse(buf: &[u8], depth: usize) -> anyhow::Result<Option<(Reply, usize)>> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some(newline) = buf.iter().position(|&b| b == b'\n') else {
        ensure!(
            buf.len() <= MAX_LINE,
            "RESP line longer than {MAX_LINE} bytes"
        );
        return Ok(None);
    };
    ensure!(
        newline >= 1 && buf[newline - 1] == b'\r',
        "RESP line not ended by CRLF"
    );
    let line = &buf[1..newline - 1];
    let mut used = newline + 1;
    let reply = match kind {
        b'+' => Reply::Simple(String::from_utf8_lossy(line).into_owned()),
        b'-' => Reply::Error(String::from_utf8_lossy(line).into_owned()),
        b':' => Reply::Int(parse_int(line)?),
        b'$' => {
            let len = parse_int(line)?;
            if len == -1 {
                Reply::Bulk(None)
            } else {
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&l| l <= MAX_BULK)
                    .ok_or_else(|| anyhow!("bad RESP bulk length {len}"))?;
                if buf.len() < used + len + 2 {
                    return Ok(None);
                }
                ensure!(
                    &buf[used + len..used + len + 2] == b"\r\n",
                    "RESP bulk string not ended by CRLF"
                );
                let bulk = buf[used..used + len].to_vec();
                used += len + 2;
                Reply::Bulk(Some(bulk))
            }
        }
        b'*' => {
            let len = parse_int(line)?;
            if len == -1 {
                Reply::Array(None)
            } else {
                ensure!(
                    depth < MAX_DEPTH,
                    "RESP arrays nested deeper than {MAX_DEPTH}"
                );
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&l| l <= MAX_ARRAY)
                    .ok_or_else(|| anyhow!("bad RESP array length {len}"))?;
                let mut items = Vec::with_capacity(len.min(1024));
                for _ in 0..len {
                    let Some((item, n)) = parse(&buf[used..], depth + 1)? else {
                        return Ok(None);
                    };
                    items.push(item);
                    used += n;
                }
                Reply::Array(Some(items))
            }
        }
        other => bail!("unexpected RESP type byte {other:#04x}"),
    };
    Ok(Some((reply, used)))
}

/// Parses a RESP integer line.
fn parse_int(line: &[u8]) -> anyhow::Result<i64> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad RESP integer {:?}", String::from_utf8_lossy(line)))
}

/// The reading side of a connection: a bounded buffer of received bytes and the replies
/// parsed from it.
struct RespReader {
    stream: OwnedReadHalf,
    buf: BytesMut,
}

impl RespReader {
    /// The next reply already in the buffer, if a whole one is there.
    fn try_parse(&mut self) -> anyhow::Result<Option<Reply>> {
        take_reply(&mut self.buf)
    }

    /// Reads more bytes into the buffer (at least one), failing at `deadline`, on EOF, or
    /// if the buffer would exceed [`MAX_READ_BUFFER`].
    async fn fill(&mut self, deadline: Instant) -> anyhow::Result<()> {
        ensure!(
            self.buf.len() < MAX_READ_BUFFER,
            "redis reply larger than {MAX_READ_BUFFER} bytes"
        );
        self.buf.reserve(64 << 10);
        let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
            .await
            .map_err(|_| anyhow!("timed out waiting for redis"))?
            .context("reading from redis")?;
        ensure!(n > 0, "redis closed the connection");
        Ok(())
    }

    /// The next reply, reading as needed, failing at `deadline`.
    async fn next(&mut self, deadline: Instant) -> anyhow::Result<Reply> {
        loop {
            if let Some(reply) = self.try_parse()? {
                return Ok(reply);
            }
            self.fill(deadline).await?;
        }
    }
}

/// Takes the first reply off `buf`, if a whole one is there.
fn take_reply(buf: &mut BytesMut) -> anyhow::Result<Option<Reply>> {
    Ok(parse(buf, 0)?.map(|(reply, used)| {
        buf.advance(used);
        reply
    }))
}

/// The reading side of a blocking connection (used by the threads of a latency run).
struct BlockingReader {
    stream: std::net::TcpStream,
    buf: BytesMut,
    chunk: Vec<u8>,
}

impl BlockingReader {
    /// Wraps a blocking socket and the bytes already read from it.
    fn new(stream: std::net::TcpStream, buf: BytesMut) -> BlockingReader {
        BlockingReader {
            stream,
            buf,
            chunk: vec![0; 64 << 10],
        }
    }

    /// Reads more bytes into the buffer (at least one), failing at `deadline`, on EOF, or
    /// if the buffer would exceed [`MAX_READ_BUFFER`].
    fn fill(&mut self, deadline: std::time::Instant) -> anyhow::Result<()> {
        ensure!(
            self.buf.len() < MAX_READ_BUFFER,
            "redis reply larger than {MAX_READ_BUFFER} bytes"
        );
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        ensure!(!left.is_zero(), "timed out waiting for redis");
        self.stream.set_read_timeout(Some(left))?;
        let n = match self.stream.read(&mut self.chunk) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("timed out waiting for redis")
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e).context("reading from redis"),
        };
        ensure!(n > 0, "redis closed the connection");
        self.buf.extend_from_slice(&self.chunk[..n]);
        Ok(())
    }
}

/// A client connection to one server.
struct Conn {
    reader: RespReader,
    writer: OwnedWriteHalf,
}

impl Conn {
    /// Connects to a server on the loopback interface.
    async fn connect(port: u16) -> anyhow::Result<Conn> {
        ensure!(
            port != SYSTEM_REDIS_PORT,
            "refusing to connect to port {SYSTEM_REDIS_PORT}"
        );
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(("127.0.0.1", port)))
            .await
            .map_err(|_| anyhow!("timed out connecting to 127.0.0.1:{port}"))?
            .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
        stream.set_nodelay(true)?;
        let (read, writer) = stream.into_split();
        Ok(Conn {
            reader: RespReader {
                stream: read,
                buf: BytesMut::with_capacity(64 << 10),
            },
            writer,
        })
    }

    /// Sends one command and returns its reply, error replies included.
    async fn call_raw(&mut self, args: &[&[u8]]) -> anyhow::Result<Reply> {
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut out = Vec::new();
        encode(&mut out, args);
        write_by(&mut self.writer, &out, deadline).await?;
        self.reader.next(deadline).await
    }

    /// Turns the connection into a blocking socket, with the bytes already read from it.
    fn into_blocking(self) -> anyhow::Result<(std::net::TcpStream, BytesMut)> {
        let stream = self
            .reader
            .stream
            .reunite(self.writer)
            .map_err(|_| anyhow!("reuniting a connection's halves"))?
            .into_std()?;
        stream.set_nonblocking(false)?;
        Ok((stream, self.reader.buf))
    }

    /// Sends one command and returns its reply; an error reply is an error.
    async fn call(&mut self, args: &[&[u8]]) -> anyhow::Result<Reply> {
        match self.call_raw(args).await? {
            Reply::Error(e) => Err(anyhow!(
                "redis {} failed: {e}",
                String::from_utf8_lossy(args.first().copied().unwrap_or_default())
            )),
            reply => Ok(reply),
        }
    }
}

/// A temporary directory, removed with everything in it when dropped.
pub(crate) struct Scratch {
    pub(crate) path: PathBuf,
}

impl Scratch {
    /// Creates a new, uniquely named directory `<prefix>-<pid>-<time>-<n>` under
    /// `work_dir` (created if missing).
    pub(crate) fn create(work_dir: &Path, prefix: &str) -> anyhow::Result<Scratch> {
        std::fs::create_dir_all(work_dir)
            .with_context(|| format!("creating {}", work_dir.display()))?;
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for attempt in 0..100u32 {
            let path = work_dir.join(format!("{prefix}-{}-{stamp}-{attempt}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Scratch { path }),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", path.display()));
                }
            }
        }
        bail!(
            "no free temporary directory name under {}",
            work_dir.display()
        )
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A `redis-server` child process, stopped when dropped.
struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Server {
    /// Starts a server in `<parent>/<name>` on a free loopback port and waits until it
    /// answers `PING` and reports our child's process id.
    async fn start(parent: &Path, name: &str, aof: bool) -> anyhow::Result<Server> {
        let dir = parent.join(name);
        let mut last_error = None;
        for attempt in 0..START_TRIES {
            let try_dir = dir.join(attempt.to_string());
            std::fs::create_dir_all(&try_dir)
                .with_context(|| format!("creating {}", try_dir.display()))?;
            let server = Server::spawn(try_dir, aof)?;
            match server.wait_ready().await {
                Ok(()) => return Ok(server),
                Err(e) => last_error = Some(e.context(format!("starting the {name}"))),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("could not start the {name}")))
    }

    /// Spawns the process on a free port.
    fn spawn(dir: PathBuf, aof: bool) -> anyhow::Result<Server> {
        let port = free_port()?;
        let mut command = Command::new(REDIS_SERVER);
        command
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(["--save", "", "--repl-diskless-sync-delay", "0"]);
        if aof {
            command.args(["--appendonly", "yes", "--appendfsync", "everysec"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        let child = command
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("running {REDIS_SERVER} (is it installed?)"))?;
        Ok(Server { child, port, dir })
    }

    /// Retries `PING` a bounded number of times; then checks that the server answering
    /// is our child.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        for _ in 0..READY_ATTEMPTS {
            if let Ok(mut conn) = Conn::connect(self.port).await
                && let Ok(reply) = conn.call(&[b"PING"]).await
            {
                ensure!(
                    reply == Reply::Simple("PONG".into()),
                    "unexpected reply to PING: {reply:?}"
                );
                let info = match conn.call(&[b"INFO", b"server"]).await? {
                    Reply::Bulk(Some(text)) => String::from_utf8_lossy(&text).into_owned(),
                    other => bail!("unexpected reply to INFO server: {other:?}"),
                };
                let pid = info_field(&info, "process_id");
                ensure!(
                    pid == Some(self.child.id().to_string().as_str()),
                    "port {} is served by process {pid:?}, not by our redis-server",
                    self.port
                );
                return Ok(());
            }
            tokio::time::sleep(READY_INTERVAL).await;
        }
        bail!(
            "redis-server on port {} not answering PING after {} attempts; log ends with:\n{}",
            self.port,
            READY_ATTEMPTS,
            self.log_tail()
        )
    }

    /// Connects a client.
    async fn connect(&self) -> anyhow::Result<Conn> {
        Conn::connect(self.port).await
    }

    /// The last lines of the server's log, for error messages.
    fn log_tail(&self) -> String {
        log_tail(&self.dir.join("redis.log"))
    }
}

impl Drop for Server {
    /// SIGTERM first, so that the server also stops any child it forked (RDB transfer,
    /// AOF rewrite) before the directory is removed (see [`stop_child`]: a replica
    /// writing its initial AOF after a sync answers SIGTERM with "Writing initial AOF,
    /// can't exit", hence the repeats).
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// Stops a server we started: SIGTERM, again every 100 ms while it does not exit, and
/// SIGKILL after 5 s.
pub(crate) fn stop_child(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        for attempt in 0..500 {
            if attempt % 10 == 0 {
                // SAFETY: kill(2) on our own child, which is not reaped yet (so the
                // pid cannot have been reused), with a valid signal.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The last 20 lines of a server's log file (empty if it cannot be read), for error
/// messages.
pub(crate) fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A loopback port that was free a moment ago (never 6379).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    for _ in 0..10 {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        drop(listener);
        if port != SYSTEM_REDIS_PORT {
            return Ok(port);
        }
    }
    bail!("no free port found")
}
