//! The `reconcile` scenario of `asp-bench bench`: asp's rateless IBLT (`asp_core::reconcile`)
//! side by side with the `negentropy` crate on the same sets.
//!
//! Two sides of `items` 32-byte random ids each share all but `d` of them (`d/2` only
//! on each side, scattered). For each `d`, repeated and interleaved:
//! - asp: each side's first symbols are kept by a [`Window`] (built once per set, as a
//!   node keeps them on every write; the build time is reported as the cold rebuild).
//!   The responder streams its symbols, the initiator subtracts its own and peels until
//!   done. Bytes: the request (namespace, item count, the initiator's symbol 0 for the
//!   in-sync check), the symbols sent in frames of up to [`FRAME_SYMBOLS`] up to the frame in
//!   which decoding completed (the model: the stop arrives before the next frame
//!   leaves; on a real link what is in flight meanwhile comes on top), and the
//!   initiator's stop message naming the responder's items it lacks by a
//!   [`NEED_PREFIX`]-byte prefix. CPU: each side's own thread CPU time.
//! - negentropy: the crate's own protocol from sealed vector storages (building them is
//!   not counted), one thread, both sides alternating.
//!
//! Both must find exactly the true difference, or the scenario fails.

use std::time::Duration;

use anyhow::{Context, bail};
use asp_core::reconcile::{
    Decoder, Extension, ITEM_BYTES, Item, ItemKey, SYMBOL_BYTES, Side, Symbol, Window,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Symbols each side keeps up to date.
pub const WINDOW: usize = 1 << 14;
/// Symbols per frame of the stream, at most; the first frames are smaller (16, 16, 32)
/// so that a small difference does not wait for, or pay for, a full frame.
pub const FRAME_SYMBOLS: usize = 64;
const FIRST_FRAME_SYMBOLS: usize = 16;
/// Bytes by which the stop message names each item the initiator needs: a prefix of
/// the item, which starts with the key's hash; the responder sends every key whose
/// hash starts so (a rare extra key costs a little data, never correctness).
pub const NEED_PREFIX: usize = 4;
/// Bytes of a frame's header (length, type, request id).
const FRAME_HEADER: u64 = 4 + 1 + 4;

/// Thread CPU time so far.
fn thread_cpu() -> Duration {
    crate::bench_negentropy::thread_cpu_time().expect("the thread CPU clock")
}

/// One asp reconciliation.
#[derive(Clone, Debug)]
pub struct AspRun {
    pub round_trips: u32,
    pub symbols: usize,
    pub bytes_initiator: u64,
    pub bytes_responder: u64,
    pub cpu_initiator: Duration,
    pub cpu_responder: Duration,
}

/// The sets of one difference size.
pub struct Sets {
    pub initiator: Vec<Item>,
    pub responder: Vec<Item>,
    /// The differences, sorted.
    pub only_initiator: Vec<Item>,
    pub only_responder: Vec<Item>,
}

impl Sets {
    /// Fails unless `have` (the initiator's own) and `need` (the responder's) are
    /// exactly the sets' difference, in any order.
    fn check(&self, system: &str, mut have: Vec<Item>, mut need: Vec<Item>) -> anyhow::Result<()> {
        have.sort_unstable();
        need.sort_unstable();
        if have != self.only_initiator || need != self.only_responder {
            bail!(
                "{system} found {} + {} differences, not the {} + {}",
                have.len(),
                need.len(),
                self.only_initiator.len(),
                self.only_responder.len()
            );
        }
        Ok(())
    }
}

/// `items` per side, `d` of them different (scattered: random ids).
pub fn sets(items: usize, d: usize, seed: u64) -> Sets {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut random = || {
        let mut item = [0u8; ITEM_BYTES];
        rng.fill(&mut item[..]);
        item
    };
    let mut only_initiator: Vec<Item> = (0..d / 2).map(|_| random()).collect();
    let mut only_responder: Vec<Item> = (0..d - d / 2).map(|_| random()).collect();
    let shared = items - d.div_ceil(2).max(d / 2);
    let mut initiator: Vec<Item> = (0..shared).map(|_| random()).collect();
    let mut responder = initiator.clone();
    initiator.extend_from_slice(&only_initiator);
    responder.extend_from_slice(&only_responder);
    // Pad the smaller side so both hold `items` (d odd).
    while initiator.len() < items {
        let extra = random();
        initiator.push(extra);
        responder.push(extra);
    }
    only_initiator.sort_unstable();
    only_responder.sort_unstable();
    Sets {
        initiator,
        responder,
        only_initiator,
        only_responder,
    }
}

/// Builds a window of `items` on this thread, returning it and the CPU time it took.
pub fn build(key: ItemKey, items: &[Item]) -> (Window, Duration) {
    let started = thread_cpu();
    let w = Window::build(key, WINDOW, items, 1);
    (w, thread_cpu() - started)
}

/// Wall time to build a window of `items` on every core, as a store does on open.
pub fn build_parallel(key: ItemKey, items: &[Item]) -> Duration {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = std::time::Instant::now();
    let w = Window::build(key, WINDOW, items, threads);
    let spent = started.elapsed();
    assert_eq!(w.items(), items.len() as i64);
    spent
}

/// Reconciles the initiator's window against the responder's; checks the result.
pub fn asp_run(initiator: &Window, responder: &Window, sets: &Sets) -> anyhow::Result<AspRun> {
    let key = initiator.key();
    // Request: namespace (up to 64 B), item count, symbol 0 for the in-sync check.
    let mut request = Vec::new();
    let cpu = thread_cpu();
    request.extend_from_slice(&[0u8; 16]);
    request.extend_from_slice(&(initiator.items() as u64).to_le_bytes());
    initiator.symbols()[0].encode(&mut request);
    let mut cpu_initiator = thread_cpu() - cpu;
    let mut bytes_initiator = FRAME_HEADER + request.len() as u64;

    // Responder: in sync if symbol 0 matches; else stream frames until stopped.
    let cpu = thread_cpu();
    let theirs = Symbol::decode(&request[24..]).context("request symbol")?;
    let in_sync = {
        let ours = responder.symbols()[0];
        let mut bytes = Vec::new();
        ours.encode(&mut bytes);
        Symbol::decode(&bytes) == Some(theirs)
    };
    let mut cpu_responder = thread_cpu() - cpu;
    let mut bytes_responder = FRAME_HEADER + 1;
    if in_sync {
        if !sets.only_initiator.is_empty() || !sets.only_responder.is_empty() {
            bail!("asp: symbol 0 matched but the sets differ");
        }
        return Ok(AspRun {
            round_trips: 1,
            symbols: 1,
            bytes_initiator,
            bytes_responder,
            cpu_initiator,
            cpu_responder,
        });
    }

    let mut decoder = Decoder::new(key);
    let mut sent = 0;
    let mut frame = Vec::with_capacity(FRAME_SYMBOLS * SYMBOL_BYTES);
    // Past the window, each side continues from a scan of its whole set.
    let mut extensions: Option<(Extension, Extension)> = None;
    let limit = 4 * (sets.initiator.len() + sets.responder.len()) + WINDOW;
    loop {
        if sent >= limit {
            bail!("asp: not decoded after {limit} symbols");
        }
        let cpu = thread_cpu();
        frame.clear();
        let end = sent + sent.clamp(FIRST_FRAME_SYMBOLS, FRAME_SYMBOLS);
        for index in sent..end {
            if index < WINDOW {
                responder.symbols()[index].encode(&mut frame);
            } else {
                let (theirs, _) = extensions.get_or_insert_with(|| {
                    (
                        Extension::new(key, sets.responder.iter().copied(), WINDOW as u64),
                        Extension::new(key, sets.initiator.iter().copied(), WINDOW as u64),
                    )
                });
                theirs.next_symbol().encode(&mut frame);
            }
        }
        cpu_responder += thread_cpu() - cpu;
        bytes_responder += FRAME_HEADER + frame.len() as u64;

        let cpu = thread_cpu();
        let mut done = false;
        for (i, chunk) in frame.chunks_exact(SYMBOL_BYTES).enumerate() {
            let remote = Symbol::decode(chunk).context("symbol")?;
            let index = sent + i;
            let ours = if index < WINDOW {
                initiator.symbols()[index]
            } else {
                extensions
                    .as_mut()
                    .expect("made with the responder's")
                    .1
                    .next_symbol()
            };
            decoder.push(&remote, &ours)?;
            if decoder.is_done() {
                done = true;
                break;
            }
        }
        cpu_initiator += thread_cpu() - cpu;
        sent = end;
        if done {
            break;
        }
    }
    // Stop: the items the initiator needs (the responder's own), by item.
    let mut need = Vec::new();
    let mut have = Vec::new();
    for (item, side) in decoder.items() {
        match side {
            Side::Remote => need.push(*item),
            Side::Local => have.push(*item),
        }
    }
    bytes_initiator += FRAME_HEADER + 4 + (need.len() * NEED_PREFIX) as u64;
    sets.check("asp", have, need)?;
    Ok(AspRun {
        round_trips: 1,
        symbols: decoder.symbols(),
        bytes_initiator,
        bytes_responder,
        cpu_initiator,
        cpu_responder,
    })
}

/// Upkeep per write: replaces `writes` items of a window (one removal and one
/// addition each, as a key's new version replaces its old one). Returns CPU per write.
pub fn upkeep(window: &mut Window, items: &[Item], writes: usize, seed: u64) -> Duration {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fresh = [0u8; ITEM_BYTES];
    let started = thread_cpu();
    for i in 0..writes {
        let old = &items[i % items.len()];
        rng.fill(&mut fresh[..]);
        window.replace(old, &fresh);
    }
    let spent = thread_cpu() - started;
    spent / writes as u32
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Runs the scenario: for each difference size, `repeat` runs of asp and negentropy,
/// interleaved. Returns the markdown report.
pub fn run(items: usize, diffs: &[usize], repeat: usize) -> anyhow::Result<String> {
    let key = ItemKey::new(*b"asp-bench-key-16");
    let mut out = String::new();
    out.push_str(&format!(
        "Reconciliation of {items} ids of 32 B per side (medians of {repeat})\n\n"
    ));
    out.push_str(
        "| d | system | round trips | bytes → | bytes ← | total | × minimum (d × 32 B) | symbols / d | CPU initiator | CPU responder |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut rebuilds = Vec::new();
    let mut parallel_rebuilds = Vec::new();
    let mut negentropy_builds = Vec::new();
    let mut upkeeps = Vec::new();
    for &d in diffs {
        if d > items {
            bail!("a difference of {d} is more than the {items} items per side");
        }
        eprintln!("reconcile: d = {d}: building sets and windows");
        let sets = sets(items, d, d as u64 + 1);
        let (initiator, t1) = build(key, &sets.initiator);
        let (responder, t2) = build(key, &sets.responder);
        rebuilds.push(t1);
        rebuilds.push(t2);
        parallel_rebuilds.push(build_parallel(key, &sets.initiator));
        let mut asp = Vec::new();
        let mut neg = Vec::new();
        for rep in 0..repeat {
            eprintln!("reconcile: d = {d}: run {} of {repeat}", rep + 1);
            let mut run_neg = || -> anyhow::Result<()> {
                let r = crate::bench_negentropy::run(&sets.initiator, &sets.responder, None)?;
                sets.check("negentropy", r.have.clone(), r.need.clone())?;
                negentropy_builds.push(r.build_initiator);
                negentropy_builds.push(r.build_responder);
                neg.push(r);
                Ok(())
            };
            if rep % 2 == 0 {
                asp.push(asp_run(&initiator, &responder, &sets)?);
                run_neg()?;
            } else {
                run_neg()?;
                asp.push(asp_run(&initiator, &responder, &sets)?);
            }
        }
        let minimum = (d * ITEM_BYTES) as f64;
        let ratio = |total: u64| {
            if d == 0 {
                "—".to_string()
            } else {
                format!("{:.2}", total as f64 / minimum)
            }
        };
        let a_rt = median(asp.iter().map(|r| r.round_trips).collect());
        let a_in = median(asp.iter().map(|r| r.bytes_initiator).collect());
        let a_out = median(asp.iter().map(|r| r.bytes_responder).collect());
        let a_sym = median(asp.iter().map(|r| r.symbols).collect());
        let a_ci = median(asp.iter().map(|r| r.cpu_initiator).collect());
        let a_cr = median(asp.iter().map(|r| r.cpu_responder).collect());
        out.push_str(&format!(
            "| {d} | asp (RIBLT) | {a_rt} | {a_in} | {a_out} | {} | {} | {} | {} | {} |\n",
            a_in + a_out,
            ratio(a_in + a_out),
            if d == 0 {
                "—".to_string()
            } else {
                format!("{:.2}", a_sym as f64 / d as f64)
            },
            ms(a_ci),
            ms(a_cr)
        ));
        let n_rt = median(neg.iter().map(|r| r.round_trips).collect());
        let n_in = median(neg.iter().map(|r| r.bytes_initiator).collect());
        let n_out = median(neg.iter().map(|r| r.bytes_responder).collect());
        let n_ci = median(neg.iter().map(|r| r.cpu_initiator).collect());
        let n_cr = median(neg.iter().map(|r| r.cpu_responder).collect());
        out.push_str(&format!(
            "| {d} | negentropy | {n_rt} | {n_in} | {n_out} | {} | {} | — | {} | {} |\n",
            n_in + n_out,
            ratio(n_in + n_out),
            ms(n_ci),
            ms(n_cr)
        ));
        let mut scratch = responder.clone();
        upkeeps.push(upkeep(&mut scratch, &sets.responder, 200_000, d as u64));
    }
    out.push_str(&format!(
        "\nasp keeps a window of {WINDOW} symbols per set ({} KiB in memory): cold rebuild from {items} items {} CPU on one thread (median of {}), {} wall on {} threads (median of {}); negentropy's storage build and seal for comparison: {}; upkeep {:.0} ns per write (one removal + one addition; median of {} runs of 200,000).\n",
        WINDOW * std::mem::size_of::<Symbol>() / 1024,
        ms(median(rebuilds.clone())),
        rebuilds.len(),
        ms(median(parallel_rebuilds.clone())),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        parallel_rebuilds.len(),
        ms(median(negentropy_builds.clone())),
        median(upkeeps.clone()).as_secs_f64() * 1e9,
        upkeeps.len()
    ));
    Ok(out)
}
