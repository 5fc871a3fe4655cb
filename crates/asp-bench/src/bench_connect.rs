//! `asp-bench connectors`: asp's connectors (asp-connect) against the official clients
//! they are built on, with the brokers of this machine (NATS JetStream, Redis).
//!
//! Four measurements, each side by side in every round (raw first, then asp, so that a
//! noisy minute hits both), medians over the rounds reported with the ratio asp/raw:
//! - JetStream out: the raw client publishes `--messages` messages to
//!   `<subject>.<key>` with the connector's eight headers (asp-origin, asp-dot,
//!   asp-version, asp-op, asp-key, asp-cluster, content-type, Nats-Msg-Id), in windows
//!   of 256 publishes followed by awaiting their 256 acknowledgements — the pattern the
//!   connector's sink uses — against an out connector sending a store pre-loaded with
//!   as many puts (the pre-load is not timed): from `Connectors::start` until the
//!   stream holds them all (stream info polled every [`POLL_JETSTREAM`]). Both streams
//!   are created before timing; the asp time includes the connector's connecting and
//!   finding its stream, the raw time does not include the client's connecting.
//! - Redis Streams out: pipelines of 256 `XADD`s with the connector's seven fields
//!   against an out connector, until `XLEN` reaches the count.
//! - JetStream in and Redis Streams in: messages published beforehand are written into
//!   a fresh store by an in connector (durably: the store's default fsync), until its
//!   status counts them all; the raw row is the client only reading them (pull
//!   consumer, or `XREADGROUP` + `XACK`), batches of 256, for scale — it writes
//!   nothing, so its ratio is not a like-for-like target.
//!
//! Every stream and key is named after this process and round, and deleted after its
//! measurement (and once more at the end, whatever failed).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use asp_connect::{Connector, ConnectorConfig, Connectors, Direction, Kind};
use asp_core::{ContentType, Key, Namespace};
use asp_store::{Store, StoreConfig, WriteOp};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use tokio_util::sync::CancellationToken;

/// Messages per publish window (raw) and per connector batch (the connector default).
pub(crate) const WINDOW: usize = 256;
/// How often a JetStream stream's length is read while waiting (stream info is a
/// JetStream API request, which costs the server more than a Redis `XLEN`).
const POLL_JETSTREAM: Duration = Duration::from_millis(20);
/// How often a Redis stream's length (`XLEN`) or the connector's status (in this
/// process) is read while waiting: an asp Redis run lasts ~0.4 s at 100,000 messages,
/// where a 20 ms step would be a 5% error.
const POLL: Duration = Duration::from_millis(5);
/// A wait fails when the count has not moved for this long.
pub(crate) const STALL: Duration = Duration::from_secs(30);
/// Puts per pre-load write.
const PRELOAD_BATCH: u64 = 1000;
/// The largest value accepted (NATS's default max_payload is 1 MiB, headers included).
const VALUE_BYTES_MAX: usize = 512 * 1024;
/// The connected namespace.
pub(crate) const NAMESPACE: &str = "bench";
/// The cluster name the connectors stamp on what they publish.
pub(crate) const CLUSTER: &str = "bench";

#[derive(Args)]
pub struct ConnectArgs {
    /// Messages per measurement.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Bytes per value (a JSON string, quotes included).
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Rounds; each runs every measurement raw then asp, and the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The NATS server (with JetStream).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The Redis server.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Where the stores go (a fresh subdirectory per measurement, removed afterwards).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
}

/// The four measurements, in table order.
const ROWS: [&str; 4] = [
    "JetStream out",
    "Redis Streams out",
    "JetStream in",
    "Redis Streams in",
];

pub async fn run(args: ConnectArgs) -> anyhow::Result<ExitCode> {
    // On a worker thread, as the connectors' tasks run: `block_on`'s thread is not one,
    // and a raw client driven from it pays a cross-thread wake-up the connector does not.
    tokio::spawn(run_on_worker(args)).await?
}

async fn run_on_worker(args: ConnectArgs) -> anyhow::Result<ExitCode> {
    if args.messages == 0 || args.rounds == 0 {
        bail!("--messages and --rounds must be at least 1");
    }
    if !(2..=VALUE_BYTES_MAX).contains(&args.value_bytes) {
        bail!(
            "--value-bytes is 2 to {VALUE_BYTES_MAX} (a JSON string with its quotes); got {}",
            args.value_bytes
        );
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let mut brokers = Brokers::connect(&args.nats, &args.redis).await?;
    let versions = brokers.versions().await?;
    eprintln!("asp-bench connectors on {}", machine());
    eprintln!("{versions}");
    eprintln!(
        "{} messages of {} bytes per measurement, {} rounds",
        args.messages, args.value_bytes, args.rounds
    );
    let result = rounds(&args, &mut brokers).await;
    brokers.clean_up().await;
    let rates = result?;

    let mut out = String::new();
    out.push_str(&format!("machine: {}\n{versions}\n\n", machine()));
    out.push_str("| measurement | raw client msgs/s | asp msgs/s | asp/raw |\n");
    out.push_str("|---|---:|---:|---:|\n");
    for (row, name) in ROWS.iter().enumerate() {
        let raw = median(rates.iter().map(|r| r[row].0));
        let asp = median(rates.iter().map(|r| r[row].1));
        let name = if row >= 2 {
            format!("{name} (raw: read only)")
        } else {
            (*name).to_owned()
        };
        out.push_str(&format!(
            "| {name} | {} | {} | {:.2} |\n",
            fmt_rate(raw),
            fmt_rate(asp),
            asp / raw
        ));
    }
    out.push_str(&format!(
        "\nmedian of {} rounds; {} messages of {} bytes (JSON strings) per measurement; \
         the asp out rows exclude the store's pre-load\n\nper round (raw / asp, msgs/s):\n",
        args.rounds, args.messages, args.value_bytes
    ));
    for (row, name) in ROWS.iter().enumerate() {
        let runs: Vec<String> = rates
            .iter()
            .map(|r| format!("{} / {}", fmt_rate(r[row].0), fmt_rate(r[row].1)))
            .collect();
        out.push_str(&format!("- {name}: {}\n", runs.join(", ")));
    }
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// Every round's (raw, asp) rates, per row of [`ROWS`].
async fn rounds(args: &ConnectArgs, brokers: &mut Brokers) -> anyhow::Result<Vec<[(f64, f64); 4]>> {
    let values = JsonValues::new(args.value_bytes);
    let mut rates = Vec::with_capacity(args.rounds);
    for round in 0..args.rounds {
        let bench = Round {
            args,
            values: &values,
            tag: format!("aspbench_{}_{round}", std::process::id()),
        };
        let nats_out = bench.nats_out(brokers).await.context("JetStream out")?;
        let redis_out = bench
            .redis_out(brokers)
            .await
            .context("Redis Streams out")?;
        let nats_in = bench.nats_in(brokers).await.context("JetStream in")?;
        let redis_in = bench.redis_in(brokers).await.context("Redis Streams in")?;
        let r = [nats_out, redis_out, nats_in, redis_in];
        let line: Vec<String> = ROWS
            .iter()
            .zip(&r)
            .map(|(name, (raw, asp))| {
                format!(
                    "{name} {} / {} ({:.2})",
                    fmt_rate(*raw),
                    fmt_rate(*asp),
                    asp / raw
                )
            })
            .collect();
        eprintln!(
            "round {} of {} (raw / asp msgs/s): {}",
            round + 1,
            args.rounds,
            line.join("; ")
        );
        rates.push(r);
    }
    Ok(rates)
}

/// The connections to both brokers, and what this run created there and has not
/// deleted yet.
struct Brokers {
    nats_url: String,
    redis_url: String,
    nats: async_nats::Client,
    js: jetstream::Context,
    redis: MultiplexedConnection,
    streams: Vec<String>,
    keys: Vec<String>,
}

impl Brokers {
    async fn connect(nats_url: &str, redis_url: &str) -> anyhow::Result<Brokers> {
        let nats = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(10)))
            .connect(nats_url)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to NATS at {nats_url} (is nats-server -js running? --nats URL)"
                )
            })?;
        let js = jetstream::new(nats.clone());
        let client = redis::Client::open(redis_url)
            .with_context(|| format!("--redis {redis_url:?} is not a Redis URL"))?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)));
        let mut redis = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to Redis at {redis_url} (is redis-server running? --redis URL)"
                )
            })?;
        redis::cmd("PING")
            .query_async::<()>(&mut redis)
            .await
            .with_context(|| format!("Redis at {redis_url} does not answer PING"))?;
        Ok(Brokers {
            nats_url: nats_url.to_owned(),
            redis_url: redis_url.to_owned(),
            nats,
            js,
            redis,
            streams: Vec::new(),
            keys: Vec::new(),
        })
    }

    /// The servers' versions, as they report them.
    async fn versions(&mut self) -> anyhow::Result<String> {
        let info = self.nats.server_info();
        let server: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.redis)
            .await
            .context("Redis INFO server")?;
        let redis_version = server
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        Ok(format!(
            "NATS {} ({}, JetStream; max_payload {}), Redis {redis_version}",
            info.version, info.go, info.max_payload
        ))
    }

    /// A stream configured as the connector configures it (file storage, subjects
    /// `<subject>.>`), created before timing on both sides.
    async fn create_stream(&mut self, name: &str, subject: &str) -> anyhow::Result<stream::Stream> {
        self.streams.push(name.to_owned());
        self.js
            .create_stream(stream::Config {
                name: name.to_owned(),
                subjects: vec![format!("{subject}.>")],
                ..Default::default()
            })
            .await
            .with_context(|| {
                format!("creating JetStream stream {name} (does the server run JetStream, -js?)")
            })
    }

    async fn delete_stream(&mut self, name: &str) -> anyhow::Result<()> {
        self.js
            .delete_stream(name)
            .await
            .with_context(|| format!("deleting JetStream stream {name}"))?;
        self.streams.retain(|s| s != name);
        Ok(())
    }

    fn note_key(&mut self, key: &str) {
        self.keys.push(key.to_owned());
    }

    async fn delete_key(&mut self, key: &str) -> anyhow::Result<()> {
        redis::cmd("DEL")
            .arg(key)
            .query_async::<()>(&mut self.redis)
            .await
            .with_context(|| format!("DEL {key}"))?;
        self.keys.retain(|k| k != key);
        Ok(())
    }

    async fn xlen(&mut self, key: &str) -> anyhow::Result<u64> {
        redis::cmd("XLEN")
            .arg(key)
            .query_async(&mut self.redis)
            .await
            .with_context(|| format!("XLEN {key}"))
    }

    /// Deletes what a failed run left behind (errors only reported).
    async fn clean_up(&mut self) {
        for name in std::mem::take(&mut self.streams) {
            if let Err(e) = self.js.delete_stream(&name).await {
                eprintln!("asp-bench: could not delete JetStream stream {name}: {e}");
            }
        }
        for key in std::mem::take(&mut self.keys) {
            if let Err(e) = redis::cmd("DEL")
                .arg(&key)
                .query_async::<()>(&mut self.redis)
                .await
            {
                eprintln!("asp-bench: could not delete Redis key {key}: {e}");
            }
        }
    }
}

/// One round's measurements; `tag` makes every name of the round unique.
struct Round<'a> {
    args: &'a ConnectArgs,
    values: &'a JsonValues,
    tag: String,
}

impl Round<'_> {
    fn n(&self) -> u64 {
        self.args.messages
    }

    /// (raw, asp) msgs/s.
    async fn nats_out(&self, brokers: &mut Brokers) -> anyhow::Result<(f64, f64)> {
        let n = self.n();
        // The store is loaded first, so that its background work after the load has
        // the raw run's time to settle before the asp run.
        let bench = BenchStore::open(&self.args.dir, &format!("{}-nats-out", self.tag))?;
        bench.preload(n, self.values).await?;

        let (stream, subject) = (format!("{}_raw_out", self.tag), format!("{}.raw", self.tag));
        brokers.create_stream(&stream, &subject).await?;
        let values: Vec<Bytes> = (0..n).map(|i| self.values.get(i)).collect();
        let origin = format!("{:016x}", 0x9f3c_2a0b_11d4_e5f6u64);
        let started = Instant::now();
        let mut acks = Vec::with_capacity(WINDOW);
        for (i, value) in values.into_iter().enumerate() {
            let key = key_text(i as u64);
            let dot = format!("{}@{origin}", i + 1);
            let mut headers = HeaderMap::new();
            headers.insert("asp-origin", origin.as_str());
            headers.insert("asp-dot", dot.as_str());
            headers.insert(
                "asp-version",
                format!("{}.0", 1_796_400_000_000u64 + i as u64).as_str(),
            );
            headers.insert("asp-op", "put");
            headers.insert("asp-key", key.as_str());
            headers.insert("asp-cluster", CLUSTER);
            headers.insert("content-type", "application/json");
            headers.insert("Nats-Msg-Id", dot.as_str());
            let ack = brokers
                .js
                .publish_with_headers(format!("{subject}.{key}"), headers, value)
                .await
                .with_context(|| format!("publishing to {subject}"))?;
            acks.push(ack);
            if acks.len() == WINDOW {
                for ack in acks.drain(..) {
                    ack.await.context("awaiting a publish acknowledgement")?;
                }
            }
        }
        for ack in acks {
            ack.await.context("awaiting a publish acknowledgement")?;
        }
        let raw = n as f64 / started.elapsed().as_secs_f64();
        brokers.delete_stream(&stream).await?;

        let (stream, subject) = (format!("{}_asp_out", self.tag), format!("{}.asp", self.tag));
        let mut info = brokers.create_stream(&stream, &subject).await?;
        let config = connector(
            Kind::Nats,
            Direction::Out,
            &brokers.nats_url,
            Some(&subject),
            &stream,
        );
        let started = Instant::now();
        let running = bench.start(config)?;
        let seconds = wait_for(n, started, &running, Count::Stream(&mut info)).await?;
        running.stop().await;
        brokers.delete_stream(&stream).await?;
        bench.close().await?;
        Ok((raw, n as f64 / seconds))
    }

    async fn redis_out(&self, brokers: &mut Brokers) -> anyhow::Result<(f64, f64)> {
        let n = self.n();
        let bench = BenchStore::open(&self.args.dir, &format!("{}-redis-out", self.tag))?;
        bench.preload(n, self.values).await?;

        let key = format!("{}:raw-out", self.tag);
        brokers.note_key(&key);
        let values: Vec<Bytes> = (0..n).map(|i| self.values.get(i)).collect();
        let origin = format!("{:016x}", 0x9f3c_2a0b_11d4_e5f6u64);
        let started = Instant::now();
        for (w, window) in values.chunks(WINDOW).enumerate() {
            let mut pipe = redis::pipe();
            for (j, value) in window.iter().enumerate() {
                let i = (w * WINDOW + j) as u64;
                pipe.cmd("XADD")
                    .arg(&key)
                    .arg("*")
                    .arg("key")
                    .arg(key_text(i))
                    .arg("op")
                    .arg("put")
                    .arg("value")
                    .arg(&value[..])
                    .arg("origin")
                    .arg(&origin)
                    .arg("dot")
                    .arg(format!("{}@{origin}", i + 1))
                    .arg("version")
                    .arg(format!("{}.0", 1_796_400_000_000u64 + i))
                    .arg("cluster")
                    .arg(CLUSTER)
                    .ignore();
            }
            pipe.query_async::<()>(&mut brokers.redis)
                .await
                .with_context(|| format!("XADD to {key}"))?;
        }
        let raw = n as f64 / started.elapsed().as_secs_f64();
        brokers.delete_key(&key).await?;

        let key = format!("{}:asp-out", self.tag);
        brokers.note_key(&key);
        let config = connector(
            Kind::RedisStream,
            Direction::Out,
            &brokers.redis_url,
            None,
            &key,
        );
        let started = Instant::now();
        let running = bench.start(config)?;
        let count = Count::Xlen(brokers.redis.clone(), &key);
        let seconds = wait_for(n, started, &running, count).await?;
        running.stop().await;
        brokers.delete_key(&key).await?;
        bench.close().await?;
        Ok((raw, n as f64 / seconds))
    }

    async fn nats_in(&self, brokers: &mut Brokers) -> anyhow::Result<(f64, f64)> {
        let n = self.n();
        // One stream, published before timing, read by both: the raw client first
        // through its own consumer, then the connector through its own.
        let (stream, subject) = (format!("{}_in", self.tag), format!("{}.in", self.tag));
        let handle = brokers.create_stream(&stream, &subject).await?;
        let mut acks = Vec::with_capacity(WINDOW);
        for i in 0..n {
            acks.push(
                brokers
                    .js
                    .publish(format!("{subject}.{}", key_text(i)), self.values.get(i))
                    .await
                    .with_context(|| format!("publishing to {subject}"))?,
            );
            if acks.len() == WINDOW {
                for ack in acks.drain(..) {
                    ack.await.context("awaiting a publish acknowledgement")?;
                }
            }
        }
        for ack in acks {
            ack.await.context("awaiting a publish acknowledgement")?;
        }

        let started = Instant::now();
        let consumer = handle
            .create_consumer(consumer::pull::Config {
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::All,
                filter_subject: format!("{subject}.>"),
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating a consumer on {stream}"))?;
        let mut read = 0u64;
        while read < n {
            let mut batch = consumer
                .fetch()
                .max_messages(WINDOW)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .context("fetching")?;
            let mut last = None;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| anyhow::anyhow!("fetching: {e}"))?;
                read += 1;
                last = Some(m);
            }
            if let Some(m) = last {
                m.ack()
                    .await
                    .map_err(|e| anyhow::anyhow!("acknowledging: {e}"))?;
            }
            if started.elapsed() > STALL + Duration::from_secs(n / 1000) {
                bail!("the raw consumer read {read} of {n} messages");
            }
        }
        let raw = n as f64 / started.elapsed().as_secs_f64();

        let config = connector(
            Kind::Nats,
            Direction::In,
            &brokers.nats_url,
            Some(&subject),
            &stream,
        );
        let asp = self.ingest(config, "nats-in").await?;
        brokers.delete_stream(&stream).await?;
        Ok((raw, asp))
    }

    async fn redis_in(&self, brokers: &mut Brokers) -> anyhow::Result<(f64, f64)> {
        let n = self.n();
        let key = format!("{}:in", self.tag);
        brokers.note_key(&key);
        for start in (0..n).step_by(WINDOW) {
            let mut pipe = redis::pipe();
            for i in start..(start + WINDOW as u64).min(n) {
                pipe.cmd("XADD")
                    .arg(&key)
                    .arg("*")
                    .arg("key")
                    .arg(key_text(i))
                    .arg("value")
                    .arg(&self.values.get(i)[..])
                    .ignore();
            }
            pipe.query_async::<()>(&mut brokers.redis)
                .await
                .with_context(|| format!("XADD to {key}"))?;
        }
        let length = brokers.xlen(&key).await?;
        if length != n {
            bail!("{key} holds {length} entries after {n} XADDs");
        }

        let started = Instant::now();
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg("raw")
            .arg("0")
            .query_async::<()>(&mut brokers.redis)
            .await
            .with_context(|| format!("XGROUP CREATE {key} raw"))?;
        let mut read = 0u64;
        while read < n {
            let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("raw")
                .arg("reader")
                .arg("COUNT")
                .arg(WINDOW)
                .arg("BLOCK")
                .arg(1000)
                .arg("STREAMS")
                .arg(&key)
                .arg(">")
                .query_async(&mut brokers.redis)
                .await
                .with_context(|| format!("XREADGROUP on {key}"))?;
            let ids: Vec<String> = reply
                .into_iter()
                .flat_map(|r| r.keys)
                .flat_map(|k| k.ids)
                .map(|e| e.id)
                .collect();
            if ids.is_empty() {
                bail!("the raw consumer read {read} of {n} entries, then none");
            }
            read += ids.len() as u64;
            redis::cmd("XACK")
                .arg(&key)
                .arg("raw")
                .arg(&ids)
                .query_async::<()>(&mut brokers.redis)
                .await
                .with_context(|| format!("XACK on {key}"))?;
        }
        let raw = n as f64 / started.elapsed().as_secs_f64();

        let config = connector(
            Kind::RedisStream,
            Direction::In,
            &brokers.redis_url,
            None,
            &key,
        );
        let asp = self.ingest(config, "redis-in").await?;
        brokers.delete_key(&key).await?;
        Ok((raw, asp))
    }

    /// An in connector on a fresh store, from start until its status counts every
    /// message written; then the namespace is checked to hold them all.
    async fn ingest(&self, config: ConnectorConfig, what: &str) -> anyhow::Result<f64> {
        let n = self.n();
        let bench = BenchStore::open(&self.args.dir, &format!("{}-{what}", self.tag))?;
        let started = Instant::now();
        let running = bench.start(config)?;
        let seconds = wait_for(n, started, &running, Count::Written).await?;
        running.stop().await;
        bench.store.caught_up().await?;
        let held = bench
            .store
            .namespace_vector(&Namespace::new(NAMESPACE)?)
            .len();
        if held != n {
            bail!(
                "the in connector counted {n} messages, but namespace {NAMESPACE} holds {held} events"
            );
        }
        bench.close().await?;
        Ok(n as f64 / seconds)
    }
}

/// A store in a fresh directory, with the settings `asp-bench bench` uses by default
/// (the store's defaults: fsync always).
pub(crate) struct BenchStore {
    pub(crate) store: Store,
    dir: PathBuf,
}

impl BenchStore {
    pub(crate) fn open(base: &std::path::Path, name: &str) -> anyhow::Result<BenchStore> {
        let dir = base.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let store = Store::open(StoreConfig::new(&dir))
            .with_context(|| format!("opening a store in {}", dir.display()))?;
        Ok(BenchStore { store, dir })
    }

    /// `n` puts of JSON values to namespace [`NAMESPACE`], in batches, then waits for
    /// the index to hold them.
    pub(crate) async fn preload(&self, n: u64, values: &JsonValues) -> anyhow::Result<()> {
        let ns = Namespace::new(NAMESPACE)?;
        for start in (0..n).step_by(PRELOAD_BATCH as usize) {
            let ops = (start..(start + PRELOAD_BATCH).min(n))
                .map(|i| {
                    Ok(WriteOp::put(
                        Key::new(&key_text(i))?,
                        ContentType::Json,
                        values.get(i),
                    ))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            self.store.write(ns.clone(), ops).await?;
        }
        self.store.caught_up().await?;
        Ok(())
    }

    pub(crate) fn start(&self, config: ConnectorConfig) -> anyhow::Result<Running> {
        let connectors = asp_connect::check(&[config]).map_err(anyhow::Error::msg)?;
        Ok(Running::start(&self.store, connectors))
    }

    pub(crate) async fn close(self) -> anyhow::Result<()> {
        self.store.shutdown().await;
        drop(self.store);
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))
    }
}

/// One started connector.
pub(crate) struct Running {
    pub(crate) connectors: Connectors,
    shutdown: CancellationToken,
}

impl Running {
    fn start(store: &Store, connectors: Vec<Connector>) -> Running {
        let shutdown = CancellationToken::new();
        let connectors = Connectors::start(
            store.clone(),
            store.node_id(),
            CLUSTER.to_owned(),
            connectors,
            shutdown.clone(),
        );
        Running {
            connectors,
            shutdown,
        }
    }

    /// A counter of one side (`in` or `out`) of the connector.
    pub(crate) fn side(&self, side: &str, field: &str) -> u64 {
        self.connectors.status()[0][side][field]
            .as_u64()
            .unwrap_or(0)
    }

    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        self.connectors.stopped().await;
    }
}

/// What a wait counts.
pub(crate) enum Count<'a> {
    /// The messages a JetStream stream holds (stream info).
    Stream(&'a mut stream::Stream),
    /// The entries of a Redis stream (`XLEN`).
    Xlen(MultiplexedConnection, &'a str),
    /// The messages the in connector wrote (its status).
    Written,
    /// The messages the out connector sent, each taken by the system (its status).
    Sent,
}

impl Count<'_> {
    async fn get(&mut self, running: &Running) -> anyhow::Result<u64> {
        Ok(match self {
            Count::Stream(s) => {
                s.info()
                    .await
                    .context("reading stream info")?
                    .state
                    .messages
            }
            Count::Xlen(con, key) => redis::cmd("XLEN")
                .arg(*key)
                .query_async(con)
                .await
                .with_context(|| format!("XLEN {key}"))?,
            Count::Written => running.side("in", "messages"),
            Count::Sent => running.side("out", "messages"),
        })
    }

    fn every(&self) -> Duration {
        match self {
            Count::Stream(_) => POLL_JETSTREAM,
            Count::Xlen(..) | Count::Written | Count::Sent => POLL,
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Count::Stream(_) => "messages in the stream",
            Count::Xlen(..) => "entries in the stream",
            Count::Written => "messages written",
            Count::Sent => "messages sent",
        }
    }
}

/// Polls `count` (every [`POLL`] or [`POLL_JETSTREAM`]) until it reaches `n`; returns
/// the seconds since `started` at the poll that saw it. Fails, with the connector's
/// status, when the count stops moving for [`STALL`].
pub(crate) async fn wait_for(
    n: u64,
    started: Instant,
    running: &Running,
    mut count: Count<'_>,
) -> anyhow::Result<f64> {
    let mut last = (0, Instant::now());
    loop {
        let now_count = count.get(running).await?;
        if now_count >= n {
            return Ok(started.elapsed().as_secs_f64());
        }
        if now_count != last.0 {
            last = (now_count, Instant::now());
        } else if last.1.elapsed() > STALL {
            bail!(
                "{now_count} of {n} {}, and no more for {STALL:?}; the connector's status: {}",
                count.what(),
                running.connectors.status()
            );
        }
        tokio::time::sleep(count.every()).await;
    }
}

fn connector(
    kind: Kind,
    direction: Direction,
    url: &str,
    subject: Option<&str>,
    stream: &str,
) -> ConnectorConfig {
    ConnectorConfig {
        subject: subject.map(str::to_owned),
        stream: Some(stream.to_owned()),
        ..ConnectorConfig::new(
            &format!("bench-{}", direction.as_str()),
            kind,
            direction,
            NAMESPACE,
            url,
        )
    }
}

pub(crate) fn key_text(i: u64) -> String {
    format!("k{i:012}")
}

/// JSON string values of exactly `value_bytes` bytes (quotes included), of letters and
/// digits, a different slice of one pseudo-random pool for every message.
pub(crate) struct JsonValues {
    pool: Vec<u8>,
    value_bytes: usize,
}

impl JsonValues {
    const POOL_BYTES: usize = 1 << 20;

    pub(crate) fn new(value_bytes: usize) -> Self {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let pool = (0..Self::POOL_BYTES + value_bytes)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ALPHABET[(state >> 24) as usize % ALPHABET.len()]
            })
            .collect();
        JsonValues { pool, value_bytes }
    }

    pub(crate) fn get(&self, i: u64) -> Bytes {
        let start = (i.wrapping_mul(7919) % Self::POOL_BYTES as u64) as usize;
        let mut v = Vec::with_capacity(self.value_bytes);
        v.push(b'"');
        v.extend_from_slice(&self.pool[start..start + self.value_bytes - 2]);
        v.push(b'"');
        Bytes::from(v)
    }
}

/// The median (of an even count, the upper of the middle two).
pub(crate) fn median(rates: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = rates.collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1} k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

/// The CPU, core count and kernel (`bench.rs` has a fuller description with the
/// filesystem, private to it; stores here live in `--dir`).
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}
