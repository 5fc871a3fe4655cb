//! `asp-bench demo`: a three-node cluster on loopback, in this process, showing live
//! replication, a partition, and its healing, with the numbers. It removes everything
//! it created when it ends.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use asp_faultnet::Proxy;
use asp_http::client::Client;
use asp_http::{ApiConfig, AppState};
use asp_node::{ReplicationConfig, Replicator};
use asp_store::{Store, StoreConfig};
use bytes::Bytes;
use clap::Args;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct DemoArgs {
    /// Events each node writes in each phase.
    #[arg(long, default_value_t = 200)]
    events: usize,
    /// Keep the nodes' data directory instead of removing it.
    #[arg(long)]
    keep: bool,
}

const NS: &str = "demo";

struct DemoNode {
    name: &'static str,
    store: Store,
    replicator: Replicator,
    client: Client,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl DemoNode {
    async fn start(
        name: &'static str,
        dir: &std::path::Path,
        peers: Vec<String>,
    ) -> anyhow::Result<DemoNode> {
        let mut sc = StoreConfig::new(dir.join(name));
        sc.fsync = asp_store::FsyncMode::Always;
        let store = Store::open(sc)?;
        let mut rc = ReplicationConfig::new("demo");
        rc.listen = Some("127.0.0.1:0".parse()?);
        rc.peers = peers;
        rc.heartbeat = Duration::from_millis(200);
        rc.idle_timeout = Duration::from_millis(1500);
        rc.backoff_min = Duration::from_millis(50);
        rc.backoff_max = Duration::from_millis(500);
        rc.summary_interval = Duration::from_millis(200);
        let shutdown = CancellationToken::new();
        let replicator = Replicator::start(store.clone(), rc, shutdown.child_token()).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = AppState::new(
            store.clone(),
            Some(replicator.clone()),
            ApiConfig::default(),
            addr,
            shutdown.clone(),
        );
        let server = tokio::spawn(asp_http::serve(listener, state));
        Ok(DemoNode {
            name,
            client: Client::new(&format!("http://{addr}"))?,
            store,
            replicator,
            shutdown,
            server,
        })
    }

    fn peer_addr(&self) -> SocketAddr {
        self.replicator.listen_addr().expect("listening")
    }

    async fn events(&self) -> u64 {
        let status = self.client.status().await.unwrap_or_default();
        status["namespaces"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["name"] == NS))
            .and_then(|n| n["events"].as_u64())
            .unwrap_or(0)
    }

    async fn write(&self, phase: &str, count: usize) -> anyhow::Result<()> {
        let ops: Vec<String> = (0..count)
            .map(|i| {
                format!(
                    r#"{{"op":"put","key":"{}/{phase}/{i}","value":{{"by":"{}","n":{i}}}}}"#,
                    self.name, self.name
                )
            })
            .collect();
        // A shared key every node writes: last writer wins, everywhere the same.
        let shared = format!(
            r#"{{"op":"put","key":"shared","value":"written by {} in {phase}"}}"#,
            self.name
        );
        let body = format!(r#"{{"ops":[{},{shared}]}}"#, ops.join(","));
        self.client.batch(NS, Bytes::from(body)).await?;
        Ok(())
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.server.await;
        self.replicator.shutdown().await;
        self.store.shutdown().await;
    }
}

/// Waits until all nodes hold `expected` events; returns how long it took.
async fn converge(nodes: &[&DemoNode], expected: u64, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let mut counts = Vec::new();
        for n in nodes {
            counts.push(n.events().await);
        }
        if counts.iter().all(|&c| c == expected) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            anyhow::bail!("no convergence within {limit:?}: {counts:?} of {expected}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = tempfile_dir()?;
    println!(
        "asp-bench demo: three nodes on loopback, data in {}",
        dir.display()
    );
    let result = demo(&dir, args.events).await;
    if args.keep {
        println!("\nkept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
        println!("\ncleaned up {}", dir.display());
    }
    result.map(|()| ExitCode::SUCCESS)
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("asp-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

async fn demo(dir: &std::path::Path, n: usize) -> anyhow::Result<()> {
    // A is the hub everyone can reach directly; B and C reach A, and C reaches B, each
    // through a proxy the demo can cut.
    let a = DemoNode::start("a", dir, vec![]).await?;
    let b_to_a = Proxy::start("127.0.0.1:0".parse()?, a.peer_addr()).await?;
    let b = DemoNode::start("b", dir, vec![b_to_a.local_addr().to_string()]).await?;
    let c_to_a = Proxy::start("127.0.0.1:0".parse()?, a.peer_addr()).await?;
    let c_to_b = Proxy::start("127.0.0.1:0".parse()?, b.peer_addr()).await?;
    let c = DemoNode::start(
        "c",
        dir,
        vec![
            c_to_a.local_addr().to_string(),
            c_to_b.local_addr().to_string(),
        ],
    )
    .await?;
    let nodes = [&a, &b, &c];
    for node in nodes {
        println!(
            "  node {} = {} (API {}, peers on {})",
            node.name,
            node.store.node_id(),
            node.client.base(),
            node.peer_addr()
        );
    }

    println!("\n1. Live: each node writes {n} events; the others see them arrive.");
    let mut watch = c.client.watch(NS, 0).await?;
    let started = Instant::now();
    a.write("live", n).await?;
    // The first of A's events to reach C's change feed.
    let first = tokio::time::timeout(Duration::from_secs(10), watch.next()).await??;
    let arrival = started.elapsed();
    if let Some(event) = first {
        let v: serde_json::Value = serde_json::from_str(&event.data)?;
        println!(
            "  C's change feed got {} from A {:.1} ms after the write began",
            v["key"],
            arrival.as_secs_f64() * 1000.0
        );
    }
    drop(watch);
    b.write("live", n).await?;
    c.write("live", n).await?;
    let total = 3 * (n as u64 + 1);
    let took = converge(&nodes, total, Duration::from_secs(30)).await?;
    println!("  all three hold {total} events ({took:.1?} after the last write)");
    // Let the nodes exchange fresh summaries, so that lag figures below start true.
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!("\n2. Partition: C is cut off from A and B; both sides keep writing.");
    c_to_a.partition();
    c_to_b.partition();
    a.write("split", n).await?;
    c.write("split", n).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for node in nodes {
        println!("  {} holds {} events", node.name, node.events().await);
    }
    let status = a.replicator.status();
    for peer in &status.peers {
        let lag: Vec<String> = peer
            .namespaces
            .iter()
            .map(|l| {
                format!(
                    "namespace {}: lacks {} of A's events (oldest waiting {} ms); had {} A lacks at last contact",
                    l.namespace, l.lag_events, l.lag_ms, l.missing_events
                )
            })
            .collect();
        let name = if Some(peer.node_id) == Some(Some(b.store.node_id())) {
            "b"
        } else {
            "c"
        };
        println!(
            "  A sees {name}: link {}; {}",
            peer.state.name(),
            lag.join("; ")
        );
    }

    println!("\n3. Heal: the links come back and everything converges.");
    let healed = Instant::now();
    c_to_a.heal();
    c_to_b.heal();
    let total = total + 2 * (n as u64 + 1);
    converge(&nodes, total, Duration::from_secs(60)).await?;
    let took = healed.elapsed();
    let mut values = Vec::new();
    for node in nodes {
        let shared = node
            .client
            .get(NS, "shared", None)
            .await?
            .map(|r| String::from_utf8_lossy(&r.body).into_owned());
        values.push(shared.clone());
        println!(
            "  {} holds {} events; \"shared\" = {}",
            node.name,
            node.events().await,
            shared.unwrap_or_default()
        );
    }
    anyhow::ensure!(
        values.windows(2).all(|w| w[0] == w[1]),
        "the nodes disagree: {values:?}"
    );
    println!(
        "  converged {took:.1?} after healing: {total} events on every node, the same winner for the contested key"
    );

    for node in [a, b, c] {
        node.stop().await;
    }
    for proxy in [b_to_a, c_to_a, c_to_b] {
        proxy.stop().await;
    }
    Ok(())
}
