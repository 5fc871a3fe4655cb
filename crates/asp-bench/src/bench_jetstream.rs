//! NATS JetStream mirror catch-up on this machine, measured for side-by-side comparison
//! with asp's catch-up in the same benchmark run (the `catchup` scenario).
//!
//! Each measurement starts its own `nats-server -js` child process on a free loopback
//! port (never 4222, so the machine's NATS server is not touched), with its store in a
//! temporary directory under the caller's work directory. A source stream (file
//! storage, subjects `src.>`) is loaded with one message per key — a `value_bytes`-byte
//! pseudo-random payload on subject `src.k<key, 12 digits>` (`per_key`) or on the one
//! subject `src.all` — published in windows of 256 followed by awaiting their
//! acknowledgements. The clock then runs from
//! the request creating an empty mirror stream of it (file storage) until the mirror's
//! stream info counts every message (read every [`POLL`]).
//!
//! A subject per key is how a keyed data model maps onto JetStream (its own key-value
//! buckets use `$KV.<bucket>.<key>`), and the mirror then keeps per-subject state for
//! every key; one subject is JetStream's fastest case, a plain log.
//!
//! Durability: NATS 2.9's file store writes every message to its block files without an
//! fsync per message (it syncs in the background; a per-message sync is not offered
//! before 2.10), so this compares with asp at `fsync=never` and with Redis without AOF.
//!
//! The server is stopped (SIGTERM, repeated, then SIGKILL after 5 s) and the directory removed
//! when the measurement ends, whether it succeeded, failed, panicked or was cancelled.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use tokio::time::Instant;

use crate::bench_redis::{
    CatchUp, Scratch, free_port, log_tail, stop_child, value_for, value_pool,
};

/// The server binary, looked up on `PATH`.
const NATS_SERVER: &str = "nats-server";
/// The port of the machine's NATS server, which this module must never use.
const SYSTEM_NATS_PORT: u16 = 4222;
/// Publishes in flight before their acknowledgements are awaited.
const WINDOW: usize = 256;
/// How often the mirror's length is read (a JetStream API request).
const POLL: Duration = Duration::from_millis(20);
/// Gives up when the mirror's length has not moved for this long.
const STALL: Duration = Duration::from_secs(30);
/// Attempts (one every [`READY_INTERVAL`]) to reach a fresh server's JetStream API.
const READY_ATTEMPTS: u32 = 400;
/// Pause between readiness attempts.
const READY_INTERVAL: Duration = Duration::from_millis(25);
/// The source and mirror streams.
const SOURCE: &str = "SRC";
const MIRROR: &str = "MIR";

/// Full catch-up of an empty JetStream mirror from a source stream of `keys` messages
/// of `value_bytes` bytes, each on its own subject (`per_key`) or all on one (see the
/// module docs). `progress` is called with the number of messages loaded so far, after
/// each acknowledged window; not during the catch-up.
pub async fn jetstream_catch_up(
    work_dir: &Path,
    keys: u64,
    value_bytes: usize,
    per_key: bool,
    progress: impl Fn(u64),
) -> anyhow::Result<CatchUp> {
    ensure!(keys > 0, "a JetStream catch-up needs at least one message");
    let scratch = Scratch::create(work_dir, "nats-bench")?;
    let server = Server::start(&scratch.path).await?;
    let js = server.jetstream().await?;

    let mut source = js
        .create_stream(stream::Config {
            name: SOURCE.to_owned(),
            subjects: vec!["src.>".to_owned()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the source stream")?;
    let pool = value_pool(value_bytes);
    let mut acks = Vec::with_capacity(WINDOW);
    for key in 0..keys {
        let value = Bytes::copy_from_slice(value_for(&pool, value_bytes, key));
        let subject = if per_key {
            format!("src.k{key:012}")
        } else {
            "src.all".to_owned()
        };
        let ack = js
            .publish(subject, value)
            .await
            .context("publishing to the source stream")?;
        acks.push(ack);
        if acks.len() == WINDOW || key + 1 == keys {
            for ack in acks.drain(..) {
                ack.await
                    .context("awaiting a publish acknowledgement from the source stream")?;
            }
            progress(key + 1);
        }
    }
    let loaded = source
        .info()
        .await
        .context("source stream info")?
        .state
        .messages;
    ensure!(
        loaded == keys,
        "the source stream holds {loaded} messages after loading {keys}"
    );

    let start = Instant::now();
    let mut mirror = js
        .create_stream(stream::Config {
            name: MIRROR.to_owned(),
            storage: stream::StorageType::File,
            mirror: Some(stream::Source {
                name: SOURCE.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .context("creating the mirror stream")?;
    let (mut last, mut moved) = (0, Instant::now());
    loop {
        let held = mirror
            .info()
            .await
            .context("mirror stream info")?
            .state
            .messages;
        if held >= keys {
            break;
        }
        if held != last {
            (last, moved) = (held, Instant::now());
        } else if moved.elapsed() > STALL {
            bail!(
                "the JetStream mirror stopped at {held} of {keys} messages for {STALL:?}; \
                 server log ends with:\n{}",
                server.log_tail()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    drop(server);
    drop(scratch);
    Ok(CatchUp {
        keys,
        value_bytes,
        seconds,
    })
}

/// A `nats-server -js` child process, stopped when dropped.
struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Server {
    /// Starts a server with its store in `<parent>/nats` on a free loopback port.
    async fn start(parent: &Path) -> anyhow::Result<Server> {
        let dir = parent.join("nats");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut port = free_port()?;
        while port == SYSTEM_NATS_PORT {
            port = free_port()?;
        }
        let child = Command::new(NATS_SERVER)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg("-sd")
            .arg(dir.join("store"))
            .arg("-l")
            .arg(dir.join("nats.log"))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("running {NATS_SERVER} (is it installed?)"))?;
        Ok(Server { child, port, dir })
    }

    /// A JetStream context on this server, once it takes connections (bounded retries;
    /// the error quotes the server's log).
    async fn jetstream(&self) -> anyhow::Result<jetstream::Context> {
        let url = format!("nats://127.0.0.1:{}", self.port);
        let mut last_error = String::new();
        for _ in 0..READY_ATTEMPTS {
            match async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(2))
                .request_timeout(Some(Duration::from_secs(30)))
                .connect(&url)
                .await
            {
                // The server opens its client port after starting JetStream. (The
                // account info request is not usable as a check: this client cannot
                // parse NATS 2.9's answer.)
                Ok(client) => return Ok(jetstream::new(client)),
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(READY_INTERVAL).await;
        }
        bail!(
            "nats-server on port {} takes no connection after {READY_ATTEMPTS} attempts \
             (last error: {last_error}); log ends with:\n{}",
            self.port,
            self.log_tail()
        )
    }

    /// The last lines of the server's log, for error messages.
    fn log_tail(&self) -> String {
        log_tail(&self.dir.join("nats.log"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}
