//! Replication benchmarks, run side by side with Redis replication in one `asp-bench`
//! run: catch-up of a peer that was away while events were written, and the latency
//! from a write's acknowledgement on one node to its appearance in another node's
//! change feed. Both nodes run in this process and talk over loopback TCP, as the Redis
//! master and replica do, or through a NATS server (`--via nats`, the transport of
//! `[replication] transport`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use asp_core::{ContentType, Key, Namespace};
use asp_node::{ReplicationConfig, Replicator};
use asp_store::{FsyncMode, Store, StoreConfig, WriteOp};
use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio_util::sync::CancellationToken;

const NS: &str = "bench";

/// Pseudo-random value bytes (so that compression on the wire cannot flatter us; the
/// Redis side uses incompressible values too), a different slice for every event.
pub struct Values {
    pool: Vec<u8>,
    value_bytes: usize,
}

impl Values {
    pub fn new(value_bytes: usize) -> Self {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let pool = (0..(1 << 20) + value_bytes)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        Values { pool, value_bytes }
    }

    pub fn get(&self, i: u64) -> Bytes {
        let start = (i.wrapping_mul(7919) % (1 << 20)) as usize;
        Bytes::copy_from_slice(&self.pool[start..start + self.value_bytes])
    }
}

/// How the two nodes reach each other.
#[derive(Clone, Debug)]
pub enum Via {
    /// A TCP peer link over loopback (the dialer names the other's address).
    Tcp,
    /// The NATS transport (`[replication] transport`) through this server: neither
    /// node listens for peer links.
    Nats(String),
}

struct Side {
    store: Store,
    replicator: Option<Replicator>,
    transport: Option<asp_connect::transport::Transport>,
    shutdown: CancellationToken,
    dir: std::path::PathBuf,
}

impl Side {
    fn open(dir: std::path::PathBuf, mode: FsyncMode) -> anyhow::Result<Side> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let mut c = StoreConfig::new(&dir);
        c.fsync = mode;
        Ok(Side {
            store: Store::open(c)?,
            replicator: None,
            transport: None,
            shutdown: CancellationToken::new(),
            dir,
        })
    }

    async fn replicate(
        &mut self,
        peers: Vec<String>,
        tls: Option<Arc<asp_tls::Tls>>,
        via: &Via,
    ) -> anyhow::Result<String> {
        if let Via::Nats(url) = via {
            // A cluster of this run's own, so that its subjects are its own.
            let cluster = format!("bench-{}", std::process::id());
            let mut rc = ReplicationConfig::new(cluster.clone());
            rc.listen = None;
            let r = Replicator::start(self.store.clone(), rc, self.shutdown.child_token()).await?;
            self.transport = Some(asp_connect::transport::Transport::start(
                r.clone(),
                self.store.node_id(),
                &cluster,
                url.clone(),
                self.shutdown.child_token(),
            ));
            self.replicator = Some(r);
            return Ok(String::new());
        }
        let mut rc = ReplicationConfig::new("bench");
        rc.listen = Some("127.0.0.1:0".parse()?);
        rc.peers = peers;
        rc.tls = tls;
        let r = Replicator::start(self.store.clone(), rc, self.shutdown.child_token()).await?;
        let addr = r.listen_addr().context("listening")?.to_string();
        self.replicator = Some(r);
        Ok(addr)
    }

    async fn close(self) -> anyhow::Result<()> {
        if let Some(t) = self.transport {
            self.shutdown.cancel();
            t.stopped().await;
        }
        if let Some(r) = self.replicator {
            r.shutdown().await;
        }
        self.store.shutdown().await;
        drop(self.store);
        std::fs::remove_dir_all(&self.dir)?;
        Ok(())
    }
}

fn key(prefix: char, i: u64) -> Key {
    Key::new(&format!("{prefix}{i:012}")).expect("valid key")
}

/// Seconds for a node that was away to hold, durably, `events` events written on its
/// peer meanwhile (both with fsync `mode`).
/// Mutual TLS for the benchmark's two nodes: a CA and one node certificate under
/// `base` (made once, reused).
pub fn bench_tls(base: &std::path::Path) -> anyhow::Result<Arc<asp_tls::Tls>> {
    let dir = base.join("bench-certs");
    if !dir.join("node.pem").exists() {
        std::fs::create_dir_all(&dir)?;
        asp_tls::issue::init_ca(&dir, "bench", 30, true)?;
        asp_tls::issue::issue_node(&dir, "node", &[], &[], 30, true)?;
    }
    Ok(asp_tls::Tls::load(asp_tls::TlsPaths {
        cert: dir.join("node.pem"),
        key: dir.join("node.key"),
        ca: dir.join("ca.pem"),
    })?)
}

pub async fn catch_up(
    base: &std::path::Path,
    mode: FsyncMode,
    tls: Option<Arc<asp_tls::Tls>>,
    events: u64,
    values: &Arc<Values>,
    progress: impl Fn(u64),
    via: &Via,
) -> anyhow::Result<f64> {
    let pid = std::process::id();
    let mut a = Side::open(base.join(format!("catchup-a-{pid}")), mode)?;
    let ns = Namespace::new(NS)?;
    let batch = 1000u64;
    let batches = events.div_ceil(batch);
    // Load A with 8 concurrent batch writers, as a busy node would be written.
    let next = Arc::new(AtomicU64::new(0));
    let loaded = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, ns, next, loaded, values) = (
            a.store.clone(),
            ns.clone(),
            next.clone(),
            loaded.clone(),
            values.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    return Ok::<_, anyhow::Error>(());
                }
                let ops = (0..batch)
                    .map(|j| {
                        WriteOp::put(
                            key('c', b * batch + j),
                            ContentType::OctetStream,
                            values.get(b * batch + j),
                        )
                    })
                    .collect();
                store.write(ns.clone(), ops).await?;
                loaded.fetch_add(batch, Ordering::Relaxed);
            }
        }));
    }
    while tasks.iter().any(|t| !t.is_finished()) {
        progress(loaded.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in tasks {
        t.await??;
    }
    progress(loaded.load(Ordering::Relaxed));
    let a_addr = a.replicate(vec![], tls.clone(), via).await?;
    let target = a.store.head().seq;

    let mut b = Side::open(base.join(format!("catchup-b-{pid}")), mode)?;
    let mut head = b.store.subscribe();
    let started = Instant::now();
    b.replicate(vec![a_addr], tls, via).await?;
    let limit = Duration::from_secs(600);
    while head.borrow_and_update().seq < target {
        if started.elapsed() > limit || tokio::time::timeout(limit, head.changed()).await.is_err() {
            bail!("the peer did not catch up within {limit:?}");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    index_waits(&a, &b);
    b.close().await?;
    a.close().await?;
    Ok(seconds)
}

/// Prints how often and how long each side's log writer waited for room in its
/// indexer's queue (every write behind it waited as long): whether the key index
/// bounds the run.
fn index_waits(a: &Side, b: &Side) {
    for (side, store) in [("sending", &a.store), ("receiving", &b.store)] {
        let m = store.metrics();
        eprintln!(
            "    the {side} node's log writer waited for its indexer {} times, {:.1} ms in all",
            m.writer_index_waits.get(),
            m.writer_index_wait_seconds.get() * 1e3
        );
    }
}

/// What a live latency run writes.
pub struct LiveLoad {
    /// Single-event writes.
    pub events: u64,
    /// Writes per second (open loop).
    pub rate_per_s: u64,
    /// Whether to stamp each event at every hop (see bench_hops.rs).
    pub trace_hops: bool,
    /// Where the writing node (A) keeps its store, if not beside B's.
    pub sender_dir: Option<std::path::PathBuf>,
}

/// Latency from a write's acknowledgement on one node to its appearance in the other
/// node's change feed, for `load.events` single-event writes at `load.rate_per_s` (open
/// loop); with `load.trace_hops`, also where that time went.
pub async fn live_latency(
    base: &std::path::Path,
    mode: FsyncMode,
    tls: Option<Arc<asp_tls::Tls>>,
    load: LiveLoad,
    values: &Values,
    via: &Via,
) -> anyhow::Result<(Histogram<u64>, Option<crate::bench_hops::HopTable>)> {
    let LiveLoad {
        events,
        rate_per_s,
        trace_hops,
        sender_dir,
    } = load;
    let pid = std::process::id();
    let a_base = sender_dir.as_deref().unwrap_or(base);
    let mut a = Side::open(a_base.join(format!("live-a-{pid}")), mode)?;
    let a_addr = a.replicate(vec![], tls.clone(), via).await?;
    let mut b = Side::open(base.join(format!("live-b-{pid}")), mode)?;
    b.replicate(vec![a_addr], tls, via).await?;
    let ns = Namespace::new(NS)?;

    // Warm up the link: one write, seen on B.
    a.store
        .write(
            ns.clone(),
            vec![WriteOp::put(
                key('w', 0),
                ContentType::OctetStream,
                values.get(0),
            )],
        )
        .await?;
    let mut head = b.store.subscribe();
    let started = Instant::now();
    while head.borrow_and_update().seq < 1 {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the peer link did not come up");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), head.changed()).await;
    }

    let base_time = Instant::now();
    let n = events as usize;
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let seen: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let counters: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    // Counters are dense per origin and namespace: twice the events is room enough.
    let trace = trace_hops
        .then(|| asp_store::trace::enable(a.store.node_id(), ns.clone(), base_time, 2 * n + 4096));
    let since = move |t: Instant| t.duration_since(base_time).as_nanos() as u64 + 1;

    // B's side: follow its feed and note when each write appears.
    let watcher = {
        let (store, seen, counters) = (b.store.clone(), seen.clone(), counters.clone());
        let mut reader = store.feed_reader(Some(ns.clone()), store.head().seq);
        let mut head = store.subscribe();
        tokio::spawn(async move {
            let mut count = 0;
            while count < n {
                head.borrow_and_update();
                let batch = reader.read(1000)?;
                let now = Instant::now();
                if batch.is_empty() {
                    if tokio::time::timeout(Duration::from_secs(30), head.changed())
                        .await
                        .is_err()
                    {
                        bail!("events stopped arriving after {count} of {n}");
                    }
                    continue;
                }
                for e in batch {
                    if let Some(i) = e
                        .event
                        .key
                        .as_str()
                        .strip_prefix('l')
                        .and_then(|s| s.parse::<usize>().ok())
                    {
                        seen[i].store(
                            now.duration_since(base_time).as_nanos() as u64 + 1,
                            Ordering::Release,
                        );
                        counters[i].store(e.event.dot.counter, Ordering::Release);
                        count += 1;
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        })
    };

    // A's side: one write every 1/rate seconds, each in its own task (open loop). The
    // pacing runs on its own thread and sleeps, so that it takes no CPU from the nodes.
    let interval = Duration::from_secs_f64(1.0 / rate_per_s as f64);
    let runtime = tokio::runtime::Handle::current();
    let pacer = {
        let (store, ns, acked) = (a.store.clone(), ns.clone(), acked.clone());
        let values: Vec<Bytes> = (0..n).map(|i| values.get(i as u64)).collect();
        std::thread::spawn(move || {
            let mut writes = Vec::with_capacity(n);
            for (i, value) in values.into_iter().enumerate() {
                let due = base_time + interval * i as u32;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let (store, ns, acked) = (store.clone(), ns.clone(), acked.clone());
                writes.push(runtime.spawn(async move {
                    store
                        .write(
                            ns,
                            vec![WriteOp::put(
                                key('l', i as u64),
                                ContentType::OctetStream,
                                value,
                            )],
                        )
                        .await?;
                    acked[i].store(since(Instant::now()), Ordering::Release);
                    Ok::<_, anyhow::Error>(())
                }));
            }
            writes
        })
    };
    let writes = tokio::task::spawn_blocking(move || pacer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the pacing thread panicked"))?;
    for w in writes {
        w.await??;
    }
    watcher.await??;
    let load =
        |v: &[AtomicU64]| -> Vec<u64> { v.iter().map(|x| x.load(Ordering::Acquire)).collect() };
    let hops = trace.map(|t| {
        asp_store::trace::disable();
        crate::bench_hops::HopTable::new(&t, &load(&acked), &load(&seen), &load(&counters))
    });
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for i in 0..n {
        let (ack, seen) = (
            acked[i].load(Ordering::Acquire),
            seen[i].load(Ordering::Acquire),
        );
        // The peer may show an event before the writer has read its acknowledgement:
        // that counts as zero, as on the Redis side.
        hist.saturating_record(seen.saturating_sub(ack) / 1000);
    }
    index_waits(&a, &b);
    b.close().await?;
    a.close().await?;
    Ok((hist, hops))
}
