//! `asp-bench bench`: durable ingest on this machine, with the machine's own fsync rate
//! measured in the same run for reference.
//!
//! Scenarios (each under every requested fsync mode, repeated and interleaved, medians
//! reported):
//! - `fsync`: 4 KiB write + fdatasync in a loop, the floor any durable write pays;
//! - `single`: 64 concurrent writers through the library, one event per write (group
//!   commit has to gather them);
//! - `batch`: concurrent writers through the library, 1,000-event batches;
//! - `http`: concurrent clients POSTing 1,000-event JSON batches to an in-process server;
//! - `catchup`: replication catch-up: 1,000,000 events written on one node while its
//!   peer is away, then the time until the peer holds them all durably; side by side
//!   with a Redis replica's full sync of the same data (with and without AOF) and a
//!   NATS JetStream mirror's catch-up from its source stream, with one subject and with
//!   a subject per key (bench_jetstream.rs; NATS 2.9 fsyncs no message as it stores it);
//! - `live`: replication latency: writes at 5,000/s on one node, time from each
//!   acknowledgement to its appearance in the peer's change feed; side by side with
//!   a Redis replica (keyspace notifications); with `--trace-hops`, where that time
//!   goes, hop by hop (bench_hops.rs);
//! - `rss`: 10 million events with 10 million distinct keys through batches, reporting
//!   the peak resident memory (VmHWM) of a fresh process that does only that, so that
//!   nothing retained by the other scenarios counts;
//! - `gc`: one compaction of a store whose first half of keys were all deleted, with
//!   tombstone collection off and on (`--batch-events / 2` keys per half).
//!
//! The tables go to stdout; SVG plots of the same figures (latency CDFs, rates) go to
//! `--plots` (see plot.rs).
//!
//! Size: one command — its arguments, the loop over scenarios and repetitions, the
//! tables and plots of what they measured, and the ingest scenarios themselves; the
//! other scenarios live in their own modules.

use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use asp_core::{ContentType, Key, Namespace};
use asp_store::{FsyncMode, Store, StoreConfig, WriteOp};
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};

/// A peer system whose own catch-up the `catchup` scenario times beside asp's.
#[derive(Clone, Copy)]
enum Peer {
    /// A Redis replica's full sync, with or without AOF (bench_redis.rs).
    Redis { aof: bool },
    /// A JetStream mirror of a stream, a subject per key or one subject
    /// (bench_jetstream.rs).
    JetStream { per_key: bool },
}

/// The catch-up scenario's peers, in table order, with their row names.
const CATCH_UP_PEERS: [(&str, Peer); 4] = [
    ("Redis, AOF everysec", Peer::Redis { aof: true }),
    ("Redis, no AOF", Peer::Redis { aof: false }),
    (
        "JetStream mirror, one subject",
        Peer::JetStream { per_key: false },
    ),
    (
        "JetStream mirror, subject per key",
        Peer::JetStream { per_key: true },
    ),
];

#[derive(Args)]
pub struct BenchArgs {
    /// Scenarios to run, comma-separated: fsync, single, batch, http, catchup, live, rss,
    /// reconcile, handover, crdt, gc.
    #[arg(long, default_value = "fsync,single,batch,http", value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Ids per side in the reconcile scenario.
    #[arg(long, default_value_t = 1_000_000)]
    reconcile_items: usize,
    /// Differences between the two sides in the reconcile scenario, comma-separated.
    #[arg(long, default_value = "0,10,1000,10000", value_delimiter = ',')]
    reconcile_diffs: Vec<usize>,
    /// Events of the catchup scenario.
    #[arg(long, default_value_t = 1_000_000)]
    catchup_events: u64,
    /// Events of the live scenario.
    #[arg(long, default_value_t = 20_000)]
    live_events: u64,
    /// Writes per second of the live scenario.
    #[arg(long, default_value_t = 5_000)]
    live_rate: u64,
    /// Stamp each live event at every hop from A's acknowledgement to B's feed and
    /// report where the time goes, per segment (costs a little on the path it
    /// measures: one lock and one clock read per batch and hop).
    #[arg(long)]
    trace_hops: bool,
    /// Where the live scenario's writing node (A) keeps its store (default: beside B's,
    /// under --dir). On another disk, or on tmpfs to stand for another machine's disk,
    /// B's fdatasync no longer queues behind A's on the same device.
    #[arg(long)]
    live_sender_dir: Option<PathBuf>,
    /// Peer links of the catchup and live scenarios: off (plain TCP), on (mutual TLS),
    /// or both, comma-separated (each repetition runs them one after the other).
    #[arg(long, default_value = "off", value_delimiter = ',', value_parser = ["off", "on"])]
    tls: Vec<String>,
    /// How the replication scenarios' two nodes reach each other: `tcp` (a peer link
    /// over loopback), `nats` (through the NATS server of `--nats`), or both.
    #[arg(long, default_value = "tcp", value_delimiter = ',', value_parser = ["tcp", "nats"])]
    via: Vec<String>,
    /// The NATS server of `--via nats`.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Fsync modes to run each scenario under, comma-separated.
    #[arg(long, default_value = "always,never", value_delimiter = ',')]
    fsync: Vec<String>,
    /// Events per run of the single-event scenario.
    #[arg(long, default_value_t = 200_000)]
    single_events: u64,
    /// Events per run of the batch and http scenarios.
    #[arg(long, default_value_t = 2_000_000)]
    batch_events: u64,
    /// Events of the rss scenario (each to a distinct key).
    #[arg(long, default_value_t = 10_000_000)]
    rss_events: u64,
    /// Namespaces the rss scenario spreads its keys over (batch `b` goes to namespace
    /// `b mod N`), to measure what many namespaces cost.
    #[arg(long, default_value_t = 1)]
    rss_namespaces: u64,
    /// Concurrent writers of the single scenario.
    #[arg(long, default_value_t = 64)]
    single_writers: usize,
    /// Concurrent writers of the batch and http scenarios.
    #[arg(long, default_value_t = 16)]
    batch_writers: usize,
    /// Events per batch.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Runs of each (scenario, mode); the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Where to put the stores (a fresh subdirectory per run, removed afterwards).
    #[arg(long, default_value = "./asp-bench-data")]
    dir: PathBuf,
    /// The key index's memtable size, in MiB.
    #[arg(long, default_value_t = (StoreConfig::new(".").index_memtable_bytes >> 20) as u64)]
    index_memtable_mb: u64,
    /// Reconciliation symbols the stores keep per namespace, at most (the store's
    /// default; 0 keeps none, to measure what keeping them costs).
    #[arg(long, default_value_t = StoreConfig::RECONCILE_WINDOW_ON)]
    reconcile_window: usize,
    /// Memory for key-hash indexes (the store's default; 0 keeps none, so that every
    /// anti-entropy run passes over its namespace as before issue 20, part 5).
    #[arg(long, default_value_t = StoreConfig::DEFAULT_RECONCILE_KEY_INDEX_BYTES)]
    reconcile_key_index_bytes: usize,
    /// The batch scenario keeps a key-hash index of its namespace from its first
    /// 4,096 keys on (as after an anti-entropy run), to measure what keeping one costs
    /// ingest: one insert per new key on the window keeper.
    #[arg(long)]
    key_index_kept: bool,
    /// Keys of the handover scenario's namespace.
    #[arg(long, default_value_t = 1_000_000)]
    handover_keys: u64,
    /// Differences made behind the protocol's back in the handover scenario's
    /// anti-entropy runs, comma-separated.
    #[arg(long, default_value = "10,1000,10000", value_delimiter = ',')]
    handover_diffs: Vec<u64>,
    /// Where to write SVG plots of this run's latencies (CDFs) and rates (bars), one
    /// or two per scenario, or `off`.
    #[arg(long, default_value = "bench/plots")]
    plots: String,
    /// Internal: run one rss measurement in this process and print it as JSON.
    #[arg(long, hide = true)]
    rss_child: Option<String>,
}

/// Mutual TLS for the peer links of a run with `--tls on`.
fn bench_tls(
    dir: &std::path::Path,
    tls: &str,
) -> anyhow::Result<Option<std::sync::Arc<asp_tls::Tls>>> {
    if tls != "on" {
        return Ok(None);
    }
    std::fs::create_dir_all(dir)?;
    Ok(Some(crate::bench_replication::bench_tls(dir)?))
}

/// How an asp run is named in the tables (TLS named only when runs differ in it).
/// The (TLS, transport) pairs the replication scenarios run: every `--tls` with every
/// `--via`, except TLS through NATS (not built).
fn variants(args: &BenchArgs) -> Vec<(&str, crate::bench_replication::Via)> {
    let mut out = Vec::new();
    for tls in &args.tls {
        for via in &args.via {
            match via.as_str() {
                "nats" if tls == "on" => {}
                "nats" => out.push((
                    tls.as_str(),
                    crate::bench_replication::Via::Nats(args.nats.clone()),
                )),
                _ => out.push((tls.as_str(), crate::bench_replication::Via::Tcp)),
            }
        }
    }
    out
}

fn via_system(system: String, via: &crate::bench_replication::Via) -> String {
    match via {
        crate::bench_replication::Via::Tcp => system,
        crate::bench_replication::Via::Nats(_) => format!("{system}, through NATS"),
    }
}

fn asp_system(mode: FsyncMode, tls: &str, tls_variants: usize) -> String {
    if tls_variants > 1 || tls == "on" {
        format!("asp, fsync={mode}, TLS {tls}")
    } else {
        format!("asp, fsync={mode}")
    }
}

/// One run's figures.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct RunResult {
    events: u64,
    seconds: f64,
    fsyncs: u64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
    peak_rss_mb: Option<f64>,
    /// The run's latency CDF, for the plots (the rss child does not send it).
    #[serde(skip)]
    cdf: Vec<(f64, f64)>,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
    fn per_fsync(&self) -> Option<f64> {
        (self.fsyncs > 0).then(|| self.events as f64 / self.fsyncs as f64)
    }
}

pub async fn run(mut args: BenchArgs) -> anyhow::Result<ExitCode> {
    // Absolute: the Redis servers start in their own directory and would take a
    // relative `--dir` from there.
    args.dir = std::path::absolute(&args.dir)
        .with_context(|| format!("bench directory {}", args.dir.display()))?;
    if let Some(mode) = &args.rss_child {
        let mode: FsyncMode = mode.parse()?;
        let value = Bytes::from(vec![0x5a; args.value_bytes]);
        let r = lib_batch(&args, mode, value, args.rss_events, true).await?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let modes: Vec<FsyncMode> = args
        .fsync
        .iter()
        .map(|m| m.parse())
        .collect::<Result<_, _>>()?;
    for s in &args.scenarios {
        if ![
            "fsync",
            "single",
            "batch",
            "http",
            "catchup",
            "live",
            "rss",
            "reconcile",
            "handover",
            "crdt",
            "gc",
        ]
        .contains(&s.as_str())
        {
            bail!(
                "unknown scenario {s:?}; choose among fsync, single, batch, http, catchup, live, rss, reconcile, handover, crdt, gc"
            );
        }
    }
    if args.scenarios.iter().any(|s| s == "reconcile")
        && let Some(d) = args
            .reconcile_diffs
            .iter()
            .find(|&&d| d > args.reconcile_items)
    {
        bail!(
            "--reconcile-diffs: a difference of {d} is more than the {} items per side",
            args.reconcile_items
        );
    }
    if args.repeat == 0
        || args.batch_size == 0
        || args.single_writers == 0
        || args.batch_writers == 0
    {
        bail!("--repeat, --batch-size and the writer counts must be at least 1");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let machine = machine_description(&args.dir);
    eprintln!("asp-bench on {machine}");
    eprintln!("bench directory: {}", args.dir.display());
    if let Some(dir) = &args.live_sender_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        eprintln!(
            "live scenario's writing node: {} (on {})",
            dir.display(),
            filesystem_of(dir).unwrap_or_else(|| "unknown filesystem".into())
        );
    }

    // (scenario, label, mode) -> results of each repetition.
    type Row = (&'static str, String, Option<FsyncMode>, Vec<RunResult>);
    let mut table: Vec<Row> = Vec::new();
    let mut record = |key, label: &str, mode: Option<FsyncMode>, r: RunResult| match table
        .iter_mut()
        .find(|(_, l, m, _)| l == label && *m == mode)
    {
        Some((_, _, _, v)) => v.push(r),
        None => table.push((key, label.to_owned(), mode, vec![r])),
    };
    let wants = |s: &str| args.scenarios.iter().any(|x| x == s);
    // (scenario key, scenario, system) -> results of each repetition.
    type ReplicationRow = (&'static str, String, String, Vec<ReplicationResult>);
    let mut replication: Vec<ReplicationRow> = Vec::new();
    let mut record_replication =
        |key, scenario: &str, system: &str, r: ReplicationResult| match replication
            .iter_mut()
            .find(|(_, s, y, _)| s == scenario && y == system)
        {
            Some((_, _, _, v)) => v.push(r),
            None => replication.push((key, scenario.to_owned(), system.to_owned(), vec![r])),
        };
    let values = Arc::new(crate::bench_replication::Values::new(args.value_bytes));
    let value = Bytes::from(
        (0..args.value_bytes)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<_>>(),
    );

    let mut hop_tables: Vec<String> = Vec::new();
    for rep in 0..args.repeat {
        eprintln!("— repetition {} of {}", rep + 1, args.repeat);
        for &mode in &modes {
            if wants("fsync") {
                record(
                    "fsync",
                    "fsync 4 KiB",
                    None,
                    fsync_probe(&args.dir, Duration::from_secs(2))?,
                );
            }
            if wants("single") {
                let r = lib_single(&args, mode, value.clone()).await?;
                record("single", "library, single-event writes", Some(mode), r);
            }
            if wants("batch") {
                let r = lib_batch(&args, mode, value.clone(), args.batch_events, false).await?;
                record("batch", "library, 1,000-event batches", Some(mode), r);
            }
            if wants("http") {
                let r = http_batch(&args, mode, value.clone()).await?;
                record("http", "HTTP batch endpoint", Some(mode), r);
            }
        }
        if wants("catchup") {
            let label = format!(
                "catch-up of {} events",
                fmt_rate(args.catchup_events as f64)
            );
            for &mode in &modes {
                for (tls, via) in variants(&args) {
                    let bar = progress(
                        &format!("loading a node, fsync={mode}"),
                        args.catchup_events,
                    );
                    let seconds = crate::bench_replication::catch_up(
                        &args.dir,
                        mode,
                        bench_tls(&args.dir, tls)?,
                        args.catchup_events,
                        &values,
                        |n| bar.set_position(n),
                        &via,
                    )
                    .await?;
                    bar.finish_and_clear();
                    let r =
                        ReplicationResult::catch_up(args.catchup_events, args.value_bytes, seconds);
                    let system = via_system(asp_system(mode, tls, args.tls.len()), &via);
                    eprintln!(
                        "  {system} catch-up: {} events/s, {:.1} MB/s",
                        fmt_rate(r.events_per_s),
                        r.mb_per_s
                    );
                    record_replication("catchup", &label, &system, r);
                }
            }
            // The peers' own catch-up of the same data.
            for (system, peer) in CATCH_UP_PEERS {
                let bar = progress(&format!("loading for {system}"), args.catchup_events);
                let at = |n| bar.set_position(n);
                let (dir, n, bytes) = (&args.dir, args.catchup_events, args.value_bytes);
                let c = match peer {
                    Peer::Redis { aof } => {
                        crate::bench_redis::redis_catch_up(dir, n, bytes, aof, at).await?
                    }
                    Peer::JetStream { per_key } => {
                        crate::bench_jetstream::jetstream_catch_up(dir, n, bytes, per_key, at)
                            .await?
                    }
                };
                bar.finish_and_clear();
                let r = ReplicationResult {
                    events_per_s: c.events_per_s(),
                    mb_per_s: c.mb_per_s(),
                    ..Default::default()
                };
                eprintln!(
                    "  {system} catch-up: {} keys/s, {:.1} MB/s",
                    fmt_rate(r.events_per_s),
                    r.mb_per_s
                );
                record_replication("catchup", &label, system, r);
            }
        }
        if wants("live") {
            let label = format!("live latency at {} writes/s", args.live_rate);
            for &mode in &modes {
                for (tls, via) in variants(&args) {
                    let (hist, hops) = crate::bench_replication::live_latency(
                        &args.dir,
                        mode,
                        bench_tls(&args.dir, tls)?,
                        crate::bench_replication::LiveLoad {
                            events: args.live_events,
                            rate_per_s: args.live_rate,
                            trace_hops: args.trace_hops,
                            sender_dir: args.live_sender_dir.clone(),
                        },
                        &values,
                        &via,
                    )
                    .await?;
                    let r = ReplicationResult::latency(
                        hist.value_at_quantile(0.5),
                        hist.value_at_quantile(0.99),
                        hist.max(),
                        crate::plot::cdf_points(&hist),
                    );
                    let system = via_system(asp_system(mode, tls, args.tls.len()), &via);
                    eprintln!(
                        "  {system} live latency: p50 {} µs, p99 {} µs, max {} µs",
                        r.p50_us, r.p99_us, r.max_us
                    );
                    if let Some(hops) = hops {
                        let title = format!("{system}, repetition {}", rep + 1);
                        let table = hops.markdown(&title);
                        eprintln!("{table}");
                        hop_tables.push(table);
                    }
                    record_replication("live", &label, &system, r);
                }
            }
            for aof in [true, false] {
                let l = crate::bench_redis::redis_live_latency(
                    &args.dir,
                    args.live_events,
                    args.live_rate,
                    args.value_bytes,
                    aof,
                )
                .await?;
                let r = ReplicationResult::latency(l.p50_us, l.p99_us, l.max_us, l.cdf);
                let system = if aof {
                    "Redis, AOF everysec"
                } else {
                    "Redis, no AOF"
                };
                eprintln!(
                    "  {system} live latency: p50 {} µs, p99 {} µs, max {} µs",
                    r.p50_us, r.p99_us, r.max_us
                );
                record_replication("live", &label, system, r);
            }
        }
    }
    if wants("rss") {
        for &mode in &modes {
            let r = rss_in_child(&args, mode)?;
            record(
                "rss",
                &format!("{} distinct keys (RSS)", fmt_rate(args.rss_events as f64)),
                Some(mode),
                r,
            );
        }
    }

    let mut plots = crate::plot::Plots::new(machine.clone());
    let unit =
        |runs: usize| format!("events/s (median of {runs} runs; whisker: lowest to highest)");
    let mut out = String::new();
    out.push_str(&format!("machine: {machine}\n\n"));
    if !table.is_empty() {
        out.push_str(
            "| scenario | fsync | events/s | events/fsync | p50 | p99 | max | peak RSS |\n",
        );
        out.push_str("|---|---|---:|---:|---:|---:|---:|---:|\n");
    }
    for (key, label, mode, runs) in &table {
        let m = median_run(runs);
        if *key != "rss" {
            let title = format!("{key}: {label}");
            let name = mode.map_or_else(|| label.clone(), |m| format!("fsync={m}"));
            let sample = match *key {
                "fsync" => "one 4 KiB write + fdatasync".to_owned(),
                "single" => "one write call (one event)".to_owned(),
                _ => format!("one write call ({} events)", args.batch_size),
            };
            let series = crate::plot::Series {
                name: name.clone(),
                points: m.cdf.clone(),
            };
            plots.latency(key, &title, &format!("latency of {sample}"), series);
            plots.throughput(
                key,
                &title,
                &unit(runs.len()),
                crate::plot::Bar::of(name, m.rate(), runs.iter().map(RunResult::rate)),
            );
        }
        out.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} |\n",
            mode.map_or("-".into(), |m| m.to_string()),
            fmt_rate(m.rate()),
            m.per_fsync().map_or("-".into(), |v| format!("{v:.0}")),
            fmt_us(m.p50_us),
            fmt_us(m.p99_us),
            fmt_us(m.max_us),
            m.peak_rss_mb.map_or("-".into(), |v| format!("{v:.0} MB")),
        ));
    }
    if !table.is_empty() {
        out.push_str(&format!(
            "\nmedian of {} runs per row (rss: 1 run); latency is per write call (per batch for batch rows, per 4 KiB write+fdatasync for the fsync row)\n",
            args.repeat
        ));
    }
    if !replication.is_empty() {
        out.push_str("\n| replication | system | events/s | MB/s | p50 | p99 | max |\n|---|---|---:|---:|---:|---:|---:|\n");
        for (key, scenario, system, runs) in &replication {
            let mut sorted = runs.clone();
            sorted.sort_by(|a, b| a.sort_key().total_cmp(&b.sort_key()));
            let m = &sorted[sorted.len() / 2];
            let title = format!("{key}: {scenario}");
            if *key == "live" {
                let series = crate::plot::Series {
                    name: system.clone(),
                    points: m.cdf.clone(),
                };
                let x = "time from a write's acknowledgement to its arrival on the replica";
                plots.latency(key, &title, x, series);
            } else {
                let rates = runs.iter().map(|r| r.events_per_s);
                let unit = unit(runs.len()).replace("events/s", "events/s (Redis: keys/s)");
                plots.throughput(
                    key,
                    &title,
                    &unit,
                    crate::plot::Bar::of(system.clone(), m.events_per_s, rates),
                );
            }
            let rate = |v: f64| if v > 0.0 { fmt_rate(v) } else { "-".into() };
            let us = |v: u64| {
                if m.events_per_s > 0.0 {
                    "-".into()
                } else {
                    fmt_us(v)
                }
            };
            out.push_str(&format!(
                "| {scenario} | {system} | {} | {} | {} | {} | {} |\n",
                rate(m.events_per_s),
                if m.mb_per_s > 0.0 {
                    format!("{:.1}", m.mb_per_s)
                } else {
                    "-".into()
                },
                us(m.p50_us),
                us(m.p99_us),
                us(m.max_us),
            ));
        }
        out.push_str(&format!(
            "\nmedian of {} runs per row; values of {} bytes, incompressible\n",
            args.repeat, args.value_bytes
        ));
    }
    for table in &hop_tables {
        out.push_str(table);
    }
    if wants("reconcile") {
        let items = args.reconcile_items;
        let diffs = args.reconcile_diffs.clone();
        let repeat = args.repeat;
        let report =
            tokio::task::spawn_blocking(move || crate::bench_reconcile::run(items, &diffs, repeat))
                .await??;
        out.push('\n');
        out.push_str(&report);
    }
    if wants("handover") {
        let report = crate::bench_handover::run(
            &args.dir,
            args.handover_keys,
            &args.handover_diffs,
            args.repeat,
            args.value_bytes,
            args.reconcile_key_index_bytes,
        )
        .await?;
        out.push('\n');
        out.push_str(&report);
    }
    if wants("crdt") {
        let report = crate::bench_crdt::run(&args.dir, args.batch_events / 4, args.repeat).await?;
        out.push('\n');
        out.push_str(&report);
    }
    if wants("gc") {
        let report = crate::bench_gc::run(&args.dir, args.batch_events / 2, args.repeat).await?;
        out.push('\n');
        out.push_str(&report);
    }
    println!("{out}");
    if args.plots != "off" && plots.is_empty() {
        eprintln!("no plots: reconcile, handover, crdt, gc and rss have none");
    } else if args.plots != "off" {
        eprintln!("writing plots to {}", args.plots);
        for path in plots.write(Path::new(&args.plots))? {
            eprintln!("  {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One replication measurement: a catch-up rate or a latency distribution.
#[derive(Clone, Debug, Default)]
struct ReplicationResult {
    events_per_s: f64,
    mb_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
    cdf: Vec<(f64, f64)>,
}

impl ReplicationResult {
    fn catch_up(events: u64, value_bytes: usize, seconds: f64) -> Self {
        ReplicationResult {
            events_per_s: events as f64 / seconds,
            mb_per_s: events as f64 * value_bytes as f64 / seconds / 1e6,
            ..Default::default()
        }
    }

    fn latency(p50_us: u64, p99_us: u64, max_us: u64, cdf: Vec<(f64, f64)>) -> Self {
        ReplicationResult {
            p50_us,
            p99_us,
            max_us,
            cdf,
            ..Default::default()
        }
    }

    /// Orders runs for the median: by rate, or by p99 for latency runs.
    fn sort_key(&self) -> f64 {
        if self.events_per_s > 0.0 {
            self.events_per_s
        } else {
            self.p99_us as f64
        }
    }
}

/// The run with the median rate (its own latencies go with it).
fn median_run(runs: &[RunResult]) -> RunResult {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    sorted[sorted.len() / 2].clone()
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.0} k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

fn fmt_us(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn progress(label: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{prefix:40} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar
}

fn fresh_dir(base: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dir = base.join(format!("{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(dir)
}

fn store_config(args: &BenchArgs, dir: &Path, mode: FsyncMode) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.fsync = mode;
    c.index_memtable_bytes = args.index_memtable_mb << 20;
    c.reconcile_window = args.reconcile_window;
    c
}

/// 4 KiB writes, each followed by fdatasync, for `duration`.
fn fsync_probe(base: &Path, duration: Duration) -> anyhow::Result<RunResult> {
    let path = base.join(format!("fsync-probe-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let block = vec![0x5au8; 4096];
    let mut hist = histogram();
    let started = Instant::now();
    let mut offset = 0u64;
    let mut n = 0u64;
    while started.elapsed() < duration {
        let t = Instant::now();
        file.write_all_at(&block, offset)?;
        file.sync_data()?;
        hist.saturating_record(t.elapsed().as_micros() as u64);
        offset += 4096;
        n += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    eprintln!(
        "  fsync probe: {n} write+fdatasync in {seconds:.1} s, p99 {} µs",
        hist.value_at_quantile(0.99)
    );
    Ok(RunResult {
        events: n,
        seconds,
        fsyncs: n,
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
        peak_rss_mb: None,
        cdf: crate::plot::cdf_points(&hist),
    })
}

/// Runs `workers` concurrent tasks that claim units `0..units` in turn and call `work`
/// on each (a unit is `per_unit` events), timing each returned future. Returns the merged
/// latency histogram and the wall time.
async fn drive<F, Fut>(
    label: &str,
    workers: usize,
    units: u64,
    per_unit: u64,
    work: F,
) -> anyhow::Result<(Histogram<u64>, f64)>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let bar = progress(label, units * per_unit);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (next, bar, work) = (next.clone(), bar.clone(), work.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            loop {
                let unit = next.fetch_add(1, Ordering::Relaxed);
                if unit >= units {
                    break;
                }
                // Building the request (keys, JSON body) is not part of the latency.
                let request = work(unit);
                let t = Instant::now();
                request.await?;
                hist.saturating_record(t.elapsed().as_micros() as u64);
                bar.inc(per_unit);
            }
            Ok::<_, anyhow::Error>(hist)
        }));
    }
    let mut hist = histogram();
    for t in tasks {
        hist.add(t.await??)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok((hist, seconds))
}

fn result(
    events: u64,
    seconds: f64,
    fsyncs: u64,
    hist: &Histogram<u64>,
    peak_rss_mb: Option<f64>,
) -> RunResult {
    RunResult {
        events,
        seconds,
        fsyncs,
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
        peak_rss_mb,
        cdf: crate::plot::cdf_points(hist),
    }
}

fn report(what: &str, mode: FsyncMode, r: &RunResult) {
    eprintln!(
        "  {what}, fsync={mode}: {} events/s, {} events/fsync, p99 {} µs{}",
        fmt_rate(r.rate()),
        r.per_fsync().map_or("-".into(), |v| format!("{v:.0}")),
        r.p99_us,
        r.peak_rss_mb
            .map_or(String::new(), |m| format!(", peak RSS {m:.0} MB"))
    );
}

/// Closes a store and removes its directory.
async fn discard(store: Store, dir: &Path) -> anyhow::Result<u64> {
    let fsyncs = store.metrics().fsyncs.get();
    store.shutdown().await;
    drop(store);
    std::fs::remove_dir_all(dir)?;
    Ok(fsyncs)
}

fn batch_of(b: u64, batch: u64, value: &Bytes) -> Vec<WriteOp> {
    (0..batch)
        .map(|j| {
            let key = Key::new(&format!("k{:012}", b * batch + j)).expect("valid key");
            WriteOp::put(key, ContentType::OctetStream, value.clone())
        })
        .collect()
}

async fn lib_single(args: &BenchArgs, mode: FsyncMode, value: Bytes) -> anyhow::Result<RunResult> {
    let dir = fresh_dir(&args.dir, "single")?;
    let store = Store::open(store_config(args, &dir, mode))?;
    let ns = Namespace::new("bench")?;
    let total = args.single_events;
    let work = {
        let store = store.clone();
        move |i: u64| {
            let (store, ns) = (store.clone(), ns.clone());
            let ops = batch_of(i, 1, &value);
            async move {
                store.write(ns, ops).await?;
                Ok(())
            }
        }
    };
    let label = format!("single-event writes, fsync={mode}");
    let (hist, seconds) = drive(&label, args.single_writers, total, 1, work).await?;
    let r = result(total, seconds, discard(store, &dir).await?, &hist, None);
    report("single", mode, &r);
    Ok(r)
}

async fn lib_batch(
    args: &BenchArgs,
    mode: FsyncMode,
    value: Bytes,
    total: u64,
    watch_rss: bool,
) -> anyhow::Result<RunResult> {
    let dir = fresh_dir(&args.dir, if watch_rss { "rss" } else { "batch" })?;
    let store = Store::open(store_config(args, &dir, mode))?;
    let ns = Namespace::new("bench")?;
    let batch = args.batch_size as u64;
    let batches = total.div_ceil(batch);
    let kept = args.key_index_kept;
    let namespaces = if watch_rss {
        args.rss_namespaces.max(1)
    } else {
        1
    };
    let done = Arc::new(AtomicU64::new(0));
    let growth = watch_rss.then(|| tokio::spawn(log_growth(done.clone(), batches * batch)));
    let work = {
        let (store, done) = (store.clone(), done.clone());
        move |b: u64| {
            let (store, done) = (store.clone(), done.clone());
            let ns = if namespaces > 1 {
                Namespace::new(&format!("bench{}", b % namespaces)).expect("valid name")
            } else {
                ns.clone()
            };
            let ops = batch_of(b, batch, &value);
            async move {
                store.write(ns.clone(), ops).await?;
                done.fetch_add(batch, Ordering::Relaxed);
                if kept && b % 16 == 15 {
                    // Builds once the namespace is large enough; a no-op after.
                    store.prepare_key_index(&ns);
                }
                Ok(())
            }
        }
    };
    let label = if watch_rss {
        format!("{total} distinct keys, fsync={mode}")
    } else {
        format!("1,000-event batches, fsync={mode}")
    };
    let (hist, seconds) = drive(&label, args.batch_writers, batches, batch, work).await?;
    if kept {
        eprintln!(
            "batch: key-hash index kept: {:?} keys, {} bytes",
            store.key_index_len(&Namespace::new("bench")?),
            store.key_index_bytes()
        );
    }
    if let Some(growth) = growth {
        growth.abort();
    }
    let peak_rss_mb = if watch_rss {
        rss_kb().map(|kb| kb as f64 / 1024.0)
    } else {
        None
    };
    let r = result(
        batches * batch,
        seconds,
        discard(store, &dir).await?,
        &hist,
        peak_rss_mb,
    );
    report("batches", mode, &r);
    Ok(r)
}

async fn http_batch(args: &BenchArgs, mode: FsyncMode, value: Bytes) -> anyhow::Result<RunResult> {
    use base64::Engine as _;
    let dir = fresh_dir(&args.dir, "http")?;
    let store = Store::open(store_config(args, &dir, mode))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let state = asp_http::AppState::new(
        store.clone(),
        None,
        asp_http::ApiConfig::default(),
        addr,
        shutdown.clone(),
    );
    let server = tokio::spawn(asp_http::serve(listener, state));
    let client = asp_http::client::Client::new(&format!("http://{addr}"))?;
    let batch = args.batch_size as u64;
    let batches = args.batch_events.div_ceil(batch);
    let value_b64: Arc<str> = base64::engine::general_purpose::STANDARD
        .encode(&value)
        .into();
    let work = move |b: u64| {
        let client = client.clone();
        let mut body = Vec::with_capacity(batch as usize * (value_b64.len() + 64));
        body.extend_from_slice(b"{\"ops\":[");
        for j in 0..batch {
            if j > 0 {
                body.push(b',');
            }
            let _ = write!(
                body,
                "{{\"op\":\"put\",\"key\":\"k{:012}\",\"value_base64\":\"{value_b64}\"}}",
                b * batch + j
            );
        }
        body.extend_from_slice(b"]}");
        async move {
            let results = client.batch_results("bench", Bytes::from(body)).await?;
            anyhow::ensure!(
                results as u64 == batch,
                "a batch of {batch} answered {results} results"
            );
            Ok(())
        }
    };
    let label = format!("HTTP batches, fsync={mode}");
    let (hist, seconds) = drive(&label, args.batch_writers, batches, batch, work).await?;
    shutdown.cancel();
    let _ = server.await;
    let r = result(
        batches * batch,
        seconds,
        discard(store, &dir).await?,
        &hist,
        None,
    );
    report("http", mode, &r);
    Ok(r)
}

/// Runs the rss scenario in a fresh process of this binary.
fn rss_in_child(args: &BenchArgs, mode: FsyncMode) -> anyhow::Result<RunResult> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let output = std::process::Command::new(exe)
        .arg("bench")
        .arg("--rss-child")
        .arg(mode.to_string())
        .arg("--rss-events")
        .arg(args.rss_events.to_string())
        .arg("--rss-namespaces")
        .arg(args.rss_namespaces.to_string())
        .arg("--batch-writers")
        .arg(args.batch_writers.to_string())
        .arg("--batch-size")
        .arg(args.batch_size.to_string())
        .arg("--value-bytes")
        .arg(args.value_bytes.to_string())
        .arg("--index-memtable-mb")
        .arg(args.index_memtable_mb.to_string())
        .arg("--reconcile-window")
        .arg(args.reconcile_window.to_string())
        .arg("--dir")
        .arg(&args.dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run the rss measurement")?;
    if !output.status.success() {
        bail!("the rss measurement failed ({})", output.status);
    }
    serde_json::from_slice(&output.stdout).context("unreadable rss measurement")
}

/// Logs the ingest rate over each twentieth of `total` events as it passes, with the
/// resident memory then: how ingest holds up as the store grows.
async fn log_growth(done: Arc<AtomicU64>, total: u64) {
    let step = (total / 20).max(1);
    let (mut mark, mut since) = (step, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = done.load(Ordering::Relaxed);
        if now < mark {
            continue;
        }
        let rate = step as f64 / since.elapsed().as_secs_f64();
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap_or(0);
        eprintln!(
            "growth: {now} events: {:.0} k events/s over the last {step}, RSS {} MB",
            rate / 1000.0,
            rss / 1024
        );
        mark += step;
        since = Instant::now();
    }
}

/// The process's peak resident memory so far (VmHWM), in KiB.
fn rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn machine_description(dir: &Path) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0.0, |kb| kb as f64 / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let fs = filesystem_of(dir).unwrap_or_else(|| "unknown filesystem".into());
    format!(
        "{cpu}, {cores} cores, {mem_gb:.0} GiB RAM, Linux {}, bench dir on {fs}",
        kernel.trim()
    )
}

/// The filesystem type and device holding `dir`, from /proc/mounts (longest prefix).
fn filesystem_of(dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && dir.starts_with(f[1]))
                .then(|| (f[1].len(), format!("{} ({})", f[2], f[0])))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, d)| d)
}
