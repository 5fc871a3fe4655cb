//! `asp-bench`: measure asp on this machine (`bench`, with Redis and negentropy side by
//! side) or watch three nodes replicate, split and heal (`demo`). Both run nodes in this
//! process through the library crates (asp-store, asp-node, asp-http); the only
//! processes started are Redis servers and, for the `rss` scenario, this binary again.
//! Nothing here ships in the `asp` binary, which links none of it (negentropy,
//! hdrhistogram, the fault proxy).

mod bench;
mod bench_connect;
mod bench_connect2;
mod bench_crdt;
mod bench_gc;
mod bench_handover;
mod bench_hops;
mod bench_jetstream;
mod bench_negentropy;
mod bench_reconcile;
mod bench_redis;
mod bench_replication;
mod demo;
mod plot;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "asp-bench",
    version,
    about = "asp's benchmarks and demo (not part of the asp binary)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure durable ingest and replication on this machine (see bench/RESULTS.md).
    Bench(Box<bench::BenchArgs>),
    /// Measure the connectors against the raw NATS JetStream and Redis Streams clients,
    /// out and in (see bench/RESULTS.md); needs both servers running.
    Connectors(bench_connect::ConnectArgs),
    /// Measure the Kafka, PostgreSQL, AMQP and MQTT connectors against their raw
    /// clients, out and in (see bench/RESULTS.md); starts its own tansu, mosquitto and
    /// PostgreSQL, and uses the machine's RabbitMQ.
    Connectors2(bench_connect2::Connect2Args),
    /// Start a three-node cluster on loopback and show replication, a partition and
    /// its healing.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("asp-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Bench(a) => bench::run(*a).await,
            Command::Connectors(a) => bench_connect::run(a).await,
            Command::Connectors2(a) => bench_connect2::run(a).await,
            Command::Demo(a) => demo::run(a).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("asp-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
