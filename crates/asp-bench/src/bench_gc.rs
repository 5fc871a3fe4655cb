//! What tombstone collection frees and what it costs: the same store contents (keys
//! written, then all deleted, then as many live keys again) compacted with collection
//! on and off, alternating in one run.

use std::time::Instant;

use anyhow::Context;
use asp_core::{ContentType, Key, Namespace};
use asp_store::{FsyncMode, Store, StoreConfig, WriteOp};
use bytes::Bytes;

struct GcRun {
    compact_s: f64,
    collected: u64,
    log_before: u64,
    log_after: u64,
    index_after: u64,
    live_keys: usize,
}

async fn write_all(
    store: &Store,
    ns: &Namespace,
    prefix: &str,
    keys: u64,
    delete: bool,
) -> anyhow::Result<()> {
    let value = Bytes::from(vec![0x5a; 100]);
    let mut b = 0;
    while b < keys {
        let ops = (b..(b + 1000).min(keys))
            .map(|i| {
                let key = Key::new(&format!("{prefix}{i:08}")).expect("key");
                if delete {
                    WriteOp::delete(key)
                } else {
                    WriteOp::put(key, ContentType::OctetStream, value.clone())
                }
            })
            .collect();
        store.write(ns.clone(), ops).await?;
        b += 1000;
    }
    Ok(())
}

async fn run_one(base: &std::path::Path, collect: bool, keys: u64) -> anyhow::Result<GcRun> {
    let dir = base.join(format!("gc-{}-{collect}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let mut c = StoreConfig::new(&dir);
    c.fsync = FsyncMode::Interval { ms: 10 };
    c.segment_bytes_max = 16 << 20;
    c.compaction_retention_ms = 0;
    c.tombstone_ttl_ms = collect.then_some(0);
    let store = Store::open(c).context("opening the bench store")?;
    let ns = Namespace::new("bench")?;
    write_all(&store, &ns, "gone-", keys, false).await?;
    write_all(&store, &ns, "gone-", keys, true).await?;
    write_all(&store, &ns, "kept-", keys, false).await?;
    let log_before = store.status().log_bytes;
    let started = Instant::now();
    let report = store.compact_async().await?;
    let compact_s = started.elapsed().as_secs_f64();
    let live_keys = store
        .state_events(&ns, None, usize::MAX, usize::MAX)?
        .0
        .len();
    let status = store.status();
    store.shutdown().await;
    drop(store);
    std::fs::remove_dir_all(&dir)?;
    Ok(GcRun {
        compact_s,
        collected: report.tombstones_collected,
        log_before,
        log_after: status.log_bytes,
        index_after: status.index_bytes,
        live_keys,
    })
}

pub async fn run(base: &std::path::Path, keys: u64, repeat: usize) -> anyhow::Result<String> {
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for rep in 0..repeat {
        eprintln!("gc: repetition {} of {repeat}", rep + 1);
        off.push(run_one(base, false, keys).await?);
        on.push(run_one(base, true, keys).await?);
    }
    let mb = |b: u64| b as f64 / 1e6;
    let row = |name: &str, runs: &mut Vec<GcRun>| {
        runs.sort_by(|a, b| a.compact_s.total_cmp(&b.compact_s));
        let m = &runs[runs.len() / 2];
        format!(
            "| {name} | {:.2} | {:.1} → {:.1} | {:.1} | {} | {} |\n",
            m.compact_s,
            mb(m.log_before),
            mb(m.log_after),
            mb(m.index_after),
            m.collected,
            m.live_keys,
        )
    };
    Ok(format!(
        "Tombstone collection: {keys} keys written (100-byte values), all deleted, then {keys} other keys written; one compaction (median of {repeat} by compaction time, alternating)\n\n\
         | collection | compaction s | log MB before → after | index MB after | deletes collected | keys in the index |\n|---|---:|---:|---:|---:|---:|\n{}{}",
        row("off (deletes kept)", &mut off),
        row("on (TTL 0, no peers)", &mut on),
    ))
}
