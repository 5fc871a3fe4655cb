//! End-to-end reconciliation between two nodes in this process over loopback TCP: the
//! bootstrap of an empty node from a compacted peer (a handover in transfer mode), and
//! anti-entropy runs repairing differences made behind the protocol's back (the stream
//! is told the peer holds everything, so only reconciliation can find them).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use asp_core::{ContentType, Key, Namespace, NodeId, VersionVector};
use asp_node::{ReplicationConfig, Replicator};
use asp_store::{Store, StoreConfig, WriteOp};
use tokio_util::sync::CancellationToken;

use crate::bench_replication::Values;

const NS: &str = "handover";

fn config(dir: &std::path::Path, id: u64, key_index_bytes: usize) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.reconcile_key_index_bytes = key_index_bytes;
    c.node_id = NodeId::new(id);
    c.compaction_retention_ms = 0;
    c.compaction_dead_ratio = 0.05;
    c.segment_bytes_max = 4 << 20;
    c
}

/// The anti-entropy check's interval (`ASP_BENCH_AE_MS`, 100 ms unless set): a run
/// starts at the second check that finds the digests differ.
fn anti_entropy_interval() -> Duration {
    let ms = std::env::var("ASP_BENCH_AE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    Duration::from_millis(ms)
}

async fn replicator(store: &Store, peers: Vec<String>) -> anyhow::Result<Replicator> {
    let mut rc = ReplicationConfig::new("bench");
    rc.listen = Some("127.0.0.1:0".parse()?);
    rc.peers = peers;
    rc.anti_entropy_interval = anti_entropy_interval();
    rc.summary_interval = Duration::from_millis(100);
    Ok(Replicator::start(store.clone(), rc, CancellationToken::new()).await?)
}

fn vector(store: &Store) -> VersionVector {
    store.namespace_vector(&Namespace::new(NS).unwrap())
}

async fn write(
    store: &Store,
    prefix: &str,
    keys: std::ops::Range<u64>,
    values: &Values,
) -> anyhow::Result<()> {
    let ns = Namespace::new(NS)?;
    let mut ops = Vec::with_capacity(1000);
    for i in keys {
        ops.push(WriteOp::put(
            Key::new(&format!("{prefix}{i:012}"))?,
            ContentType::OctetStream,
            values.get(i),
        ));
        if ops.len() == 1000 {
            store.write(ns.clone(), std::mem::take(&mut ops)).await?;
        }
    }
    if !ops.is_empty() {
        store.write(ns, ops).await?;
    }
    Ok(())
}

/// Waits (bounded) until both hold the same vector; returns how long it took.
async fn converge(a: &Store, b: &Store, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if vector(a) == vector(b) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("no convergence within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct AntiEntropy {
    /// Which of the `diffs` (a namespace's first run builds its key-hash index).
    step: usize,
    d: u64,
    seconds: f64,
    run_ms: u64,
    symbols: u64,
    differences: u64,
    repaired: u64,
}

/// Runs the scenario `repeat` times and returns the report (medians).
pub async fn run(
    base: &std::path::Path,
    keys: u64,
    diffs: &[u64],
    repeat: usize,
    value_bytes: usize,
    key_index_bytes: usize,
) -> anyhow::Result<String> {
    let values = Values::new(value_bytes);
    let mut bootstraps = Vec::new();
    let mut runs: Vec<AntiEntropy> = Vec::new();
    for rep in 0..repeat {
        let dir = base.join(format!("handover-{}-{rep}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let a = Store::open(config(&dir.join("a"), 1, key_index_bytes))?;
        eprintln!("handover: loading {keys} keys, overwriting a tenth, compacting");
        write(&a, "k", 0..keys, &values).await?;
        write(&a, "k", 0..keys / 10, &values).await?;
        let report = a.compact_async().await?;
        if a.base(&Namespace::new(NS)?).is_empty() {
            bail!("compaction removed nothing ({report:?}): no handover to measure");
        }
        let ra = replicator(&a, vec![]).await?;
        let b = Store::open(config(&dir.join("b"), 2, key_index_bytes))?;
        let addr = ra.listen_addr().context("listening")?.to_string();
        let started = Instant::now();
        let rb = replicator(&b, vec![addr]).await?;
        converge(&a, &b, Duration::from_secs(600)).await?;
        let seconds = started.elapsed().as_secs_f64();
        for _ in 0..500 {
            if ra.status().peers.iter().any(|p| p.reconcile.transfers > 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let peer = ra.status().peers.into_iter().next().context("a peer")?;
        if peer.reconcile.transfers != 1 {
            bail!("expected one transfer, status says {:?}", peer.reconcile);
        }
        eprintln!("handover: bootstrap of {keys} keys in {seconds:.2} s");
        bootstraps.push(seconds);
        let (mut ra, mut rb) = (ra, rb);
        let mut next = keys;
        for (step, &d) in diffs.iter().enumerate() {
            ra.shutdown().await;
            rb.shutdown().await;
            // Behind the protocol's back: half the difference on each side, and each
            // told the other holds its whole feed.
            write(&a, "d", next..next + d / 2, &values).await?;
            write(&b, "d", next + d / 2..next + d, &values).await?;
            next += d;
            a.save_checkpoint(NodeId::new(2).expect("nonzero"), a.head().seq)?;
            b.save_checkpoint(NodeId::new(1).expect("nonzero"), b.head().seq)?;
            ra = replicator(&a, vec![]).await?;
            let addr = ra.listen_addr().context("listening")?.to_string();
            let started = Instant::now();
            rb = replicator(&b, vec![addr]).await?;
            converge(&a, &b, Duration::from_secs(600)).await?;
            let seconds = started.elapsed().as_secs_f64();
            // The run is recorded once both RepairEnds are in, just after the states meet.
            for _ in 0..500 {
                if ra.status().peers.iter().any(|p| p.reconcile.last.is_some()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let pa = ra.status().peers.into_iter().next().context("a peer")?;
            let pb = rb.status().peers.into_iter().next().context("a peer")?;
            let last = pa.reconcile.last.context("a run")?;
            runs.push(AntiEntropy {
                step,
                d,
                seconds,
                run_ms: last.duration.as_millis() as u64,
                symbols: last.symbols,
                differences: last.differences,
                repaired: pa.reconcile.keys_repaired + pb.reconcile.keys_repaired,
            });
            let namespace = Namespace::new(NS)?;
            eprintln!(
                "handover: d={d}: repaired in {seconds:.3} s ({} symbols, {} {} run); key-hash indexes: {:?} and {:?} keys, {} and {} bytes",
                last.symbols,
                last.mode,
                last.outcome,
                a.key_index_len(&namespace),
                b.key_index_len(&namespace),
                a.key_index_bytes(),
                b.key_index_bytes()
            );
        }
        ra.shutdown().await;
        rb.shutdown().await;
        drop((ra, rb));
        a.shutdown().await;
        b.shutdown().await;
        drop((a, b));
        let _ = std::fs::remove_dir_all(&dir);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut out = String::new();
    let boot = median(bootstraps.clone());
    out.push_str(&format!(
        "Handover, two nodes in one process over loopback, fsync=always, {value_bytes}-byte values\n\n\
         | bootstrap of an empty node from a compacted peer | {keys} keys | {boot:.2} s | {:.0} keys/s | runs: {} |\n\n",
        keys as f64 / boot,
        bootstraps
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out.push_str(
        "| anti-entropy, d differences behind the protocol's back | until equal (s) | the run (ms) | symbols sent | symbol bytes / (d × 32) | keys differing | keys repaired |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (step, &d) in diffs.iter().enumerate() {
        let of: Vec<&AntiEntropy> = runs.iter().filter(|r| r.step == step).collect();
        let pick = |f: &dyn Fn(&AntiEntropy) -> f64| median(of.iter().map(|r| f(r)).collect());
        out.push_str(&format!(
            "| d = {d} | {:.3} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} |\n",
            pick(&|r| r.seconds),
            pick(&|r| r.run_ms as f64),
            pick(&|r| r.symbols as f64),
            pick(&|r| r.symbols as f64 * 36.0 / (r.d.max(1) as f64 * 32.0)),
            pick(&|r| r.differences as f64),
            pick(&|r| r.repaired as f64),
        ));
    }
    out.push_str(&format!(
        "\nmedian of {repeat} runs; \"until equal\" includes reconnecting and two anti-entropy checks {} ms apart; \
         reconcile_key_index_bytes = {key_index_bytes} (the first run builds the index)\n",
        anti_entropy_interval().as_millis()
    ));
    Ok(out)
}
