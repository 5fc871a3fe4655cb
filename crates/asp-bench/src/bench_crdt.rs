//! What a CRDT policy costs a write: the same batches of writes to the same keys, as
//! lww puts and as counter increments, alternating in one run.

use std::time::Instant;

use anyhow::Context;
use asp_core::crdt::Policy;
use asp_core::{ContentType, Key, Namespace};
use asp_store::{CrdtOp, FsyncMode, Store, StoreConfig, WriteOp};
use bytes::Bytes;

/// Events per second for `events` writes over `keys` keys in batches of 1,000 from 8
/// concurrent writers, in a fresh store; `counter` picks increments over puts.
async fn run_one(
    base: &std::path::Path,
    counter: bool,
    events: u64,
    keys: u64,
) -> anyhow::Result<f64> {
    let dir = base.join(format!("crdt-{}-{counter}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let mut c = StoreConfig::new(&dir);
    c.fsync = FsyncMode::Always;
    if counter {
        c.namespace_policies.insert("bench".into(), Policy::Counter);
    }
    let store = Store::open(c).context("opening the bench store")?;
    let ns = Namespace::new("bench")?;
    let started = Instant::now();
    let batches = events / 1000;
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let (store, ns) = (store.clone(), ns.clone());
        tasks.push(tokio::spawn(async move {
            let mut b = w;
            while b < batches {
                let ops = (0..1000u64)
                    .map(|j| {
                        let key = Key::new(&format!("k{:08}", (b * 1000 + j) % keys)).expect("key");
                        if counter {
                            WriteOp::crdt(key, CrdtOp::Incr(1))
                        } else {
                            WriteOp::put(
                                key,
                                ContentType::OctetStream,
                                Bytes::from_static(b"12345678"),
                            )
                        }
                    })
                    .collect();
                store.write(ns.clone(), ops).await?;
                b += 8;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    store.shutdown().await;
    drop(store);
    std::fs::remove_dir_all(&dir)?;
    Ok((batches * 1000) as f64 / seconds)
}

pub async fn run(base: &std::path::Path, events: u64, repeat: usize) -> anyhow::Result<String> {
    let keys = 100_000;
    let (mut lww, mut counter) = (Vec::new(), Vec::new());
    for rep in 0..repeat {
        eprintln!("crdt: repetition {} of {repeat}", rep + 1);
        lww.push(run_one(base, false, events, keys).await?);
        counter.push(run_one(base, true, events, keys).await?);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (l, c) = (median(lww.clone()), median(counter.clone()));
    Ok(format!(
        "Writes by policy: {events} writes over {keys} keys, batches of 1,000 from 8 writers, fsync=always (median of {repeat}, alternating)\n\n\
         | policy | events/s | runs |\n|---|---:|---|\n\
         | lww puts (8-byte values) | {l:.0} | {} |\n\
         | counter increments | {c:.0} | {} |\n\n\
         counter / lww = {:.2}\n",
        lww.iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
        counter
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
        c / l
    ))
}
