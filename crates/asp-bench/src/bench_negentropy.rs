//! Set reconciliation with the `negentropy` crate (the Rust implementation of Doug
//! Hoyte's range-based set reconciliation protocol), measured so that it can be compared
//! side by side with asp's own reconciliation on the same id sets.
//!
//! [`run`] plays both parties in the calling thread: it builds and seals a
//! [`NegentropyStorageVector`] for each side, then alternates the initiator and the
//! responder until the initiator has nothing more to say. Every message is counted (bytes
//! each way, round trips), and each side's calls are timed separately with the thread's
//! CPU clock, so that the numbers describe the protocol's own work and not scheduling or
//! a network. Building the storages is timed on its own and not included in the
//! per-side protocol CPU time.
//!
//! Every item gets timestamp 0, so the protocol orders items by id alone, which is the
//! closest match to reconciling a plain set of 32-byte ids.

use std::time::Duration;

use anyhow::{Context as _, bail};
use negentropy::{Id, Negentropy, NegentropyStorageVector};

/// What one negentropy reconciliation cost.
#[derive(Debug)]
pub struct NegentropyRun {
    /// Exchanges between the two sides, counted as round trips: one initiator message and
    /// the responder's answer to it make one.
    pub round_trips: u32,
    /// Bytes of all the initiator's messages, summed.
    pub bytes_initiator: u64,
    /// Bytes of all the responder's messages, summed.
    pub bytes_responder: u64,
    /// Thread CPU time the initiator spent in the protocol (`initiate` and every
    /// `reconcile_with_ids`), storage building excluded.
    pub cpu_initiator: Duration,
    /// Thread CPU time the responder spent in the protocol (every `reconcile`), storage
    /// building excluded.
    pub cpu_responder: Duration,
    /// Thread CPU time to build and seal the initiator's storage from its id list.
    pub build_initiator: Duration,
    /// Thread CPU time to build and seal the responder's storage from its id list.
    pub build_responder: Duration,
    /// Ids the initiator has and the responder lacks, in the order negentropy reported them.
    pub have: Vec<[u8; 32]>,
    /// Ids the responder has and the initiator lacks, in the order negentropy reported them.
    pub need: Vec<[u8; 32]>,
}

/// Reconciles `initiator` against `responder` with negentropy in one thread, alternating
/// the two sides, and measures it.
///
/// Each list holds 32-byte ids without duplicates, in any order. `frame_size_limit` caps
/// the size of each message: `None` means no cap (negentropy's 0); `Some(n)` is passed to
/// negentropy as is, which rejects caps below 4096 bytes.
pub fn run(
    initiator: &[[u8; 32]],
    responder: &[[u8; 32]],
    frame_size_limit: Option<u64>,
) -> anyhow::Result<NegentropyRun> {
    let limit = frame_size_limit.unwrap_or(0);

    let (initiator_storage, build_initiator) = timed(|| build_storage(initiator))?;
    let initiator_storage = initiator_storage.context("building the initiator's storage")?;
    let (responder_storage, build_responder) = timed(|| build_storage(responder))?;
    let responder_storage = responder_storage.context("building the responder's storage")?;

    let mut client = Negentropy::borrowed(&initiator_storage, limit)
        .with_context(|| format!("creating the initiator with frame size limit {limit}"))?;
    let mut server = Negentropy::borrowed(&responder_storage, limit)
        .with_context(|| format!("creating the responder with frame size limit {limit}"))?;

    let mut cpu_initiator = Duration::ZERO;
    let mut cpu_responder = Duration::ZERO;
    let mut bytes_initiator = 0u64;
    let mut bytes_responder = 0u64;
    let mut round_trips = 0u32;
    let mut have_ids: Vec<Id> = Vec::new();
    let mut need_ids: Vec<Id> = Vec::new();

    let (query, spent) = timed(|| client.initiate())?;
    cpu_initiator += spent;
    let mut query = query.context("initiator building its first message")?;

    loop {
        bytes_initiator += query.len() as u64;
        round_trips = round_trips
            .checked_add(1)
            .context("round trip count overflowed u32")?;

        let (answer, spent) = timed(|| server.reconcile(&query))?;
        cpu_responder += spent;
        let answer =
            answer.with_context(|| format!("responder answering message {round_trips}"))?;
        bytes_responder += answer.len() as u64;

        let (next, spent) =
            timed(|| client.reconcile_with_ids(&answer, &mut have_ids, &mut need_ids))?;
        cpu_initiator += spent;
        match next.with_context(|| format!("initiator reading answer {round_trips}"))? {
            Some(next) => query = next,
            None => break,
        }
    }

    Ok(NegentropyRun {
        round_trips,
        bytes_initiator,
        bytes_responder,
        cpu_initiator,
        cpu_responder,
        build_initiator,
        build_responder,
        have: have_ids.into_iter().map(Id::to_bytes).collect(),
        need: need_ids.into_iter().map(Id::to_bytes).collect(),
    })
}

/// One side's sealed storage: every id inserted with timestamp 0, then sorted by seal.
fn build_storage(ids: &[[u8; 32]]) -> anyhow::Result<NegentropyStorageVector> {
    let mut storage = NegentropyStorageVector::with_capacity(ids.len());
    for id in ids {
        storage
            .insert(0, Id::from_byte_array(*id))
            .context("inserting an id into negentropy storage")?;
    }
    storage.seal().context("sealing negentropy storage")?;
    Ok(storage)
}

/// Runs `f` and returns its result with the CPU time this thread spent in it.
fn timed<T>(f: impl FnOnce() -> T) -> anyhow::Result<(T, Duration)> {
    let start = thread_cpu_time()?;
    let value = f();
    let end = thread_cpu_time()?;
    Ok((value, end.saturating_sub(start)))
}

/// CPU time consumed so far by the calling thread (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> anyhow::Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one timespec through a pointer to a live local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    }
    let secs = u64::try_from(ts.tv_sec).context("thread CPU clock seconds are negative")?;
    let nanos = u32::try_from(ts.tv_nsec).context("thread CPU clock nanoseconds out of range")?;
    if nanos >= 1_000_000_000 {
        bail!("thread CPU clock returned {nanos} nanoseconds, not below one second");
    }
    Ok(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// Deterministic pseudo-random 32-byte ids (splitmix64 over a counter), distinct for
    /// all practical purposes.
    struct Ids(u64);

    impl Ids {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn next_id(&mut self) -> [u8; 32] {
            let mut id = [0u8; 32];
            for chunk in id.chunks_exact_mut(8) {
                chunk.copy_from_slice(&self.next_u64().to_le_bytes());
            }
            id
        }

        fn take(&mut self, n: usize) -> Vec<[u8; 32]> {
            (0..n).map(|_| self.next_id()).collect()
        }
    }

    /// Two sides' id lists and the true differences between them.
    struct Sets {
        initiator: Vec<[u8; 32]>,
        responder: Vec<[u8; 32]>,
        only_initiator: Vec<[u8; 32]>,
        only_responder: Vec<[u8; 32]>,
    }

    /// Two sets sharing `shared` ids, each with `only` ids of its own; the own ids are
    /// drawn from the same stream, so they land scattered among the shared ones in id
    /// order.
    fn sets(seed: u64, shared: usize, only: usize) -> Sets {
        let mut ids = Ids(seed);
        let common = ids.take(shared);
        let only_initiator = ids.take(only);
        let only_responder = ids.take(only);
        let mut initiator = common.clone();
        initiator.extend_from_slice(&only_initiator);
        let mut responder = common;
        responder.extend_from_slice(&only_responder);
        // Present the responder's list in a different order than the initiator's.
        responder.reverse();
        Sets {
            initiator,
            responder,
            only_initiator,
            only_responder,
        }
    }

    fn sorted(mut ids: Vec<[u8; 32]>) -> Vec<[u8; 32]> {
        ids.sort_unstable();
        ids
    }

    fn check_differences(limit: Option<u64>) {
        let Sets {
            initiator,
            responder,
            only_initiator,
            only_responder,
        } = sets(7, 10_000, 50);
        let result = run(&initiator, &responder, limit).expect("reconciliation");
        assert!(result.round_trips >= 1);
        assert_eq!(sorted(result.have.clone()), sorted(only_initiator));
        assert_eq!(sorted(result.need.clone()), sorted(only_responder));
        assert_eq!(
            result.have.iter().collect::<HashSet<_>>().len(),
            result.have.len(),
            "have reported an id twice"
        );
        assert_eq!(
            result.need.iter().collect::<HashSet<_>>().len(),
            result.need.len(),
            "need reported an id twice"
        );
        assert!(result.bytes_initiator > 0);
        assert!(result.bytes_responder > 0);
    }

    #[test]
    fn finds_exact_differences_without_frame_limit() {
        check_differences(None);
    }

    #[test]
    fn finds_exact_differences_with_smallest_frame_limit() {
        check_differences(Some(4096));
    }

    #[test]
    fn frame_limit_spreads_the_work_over_more_round_trips() {
        let Sets {
            initiator,
            responder,
            ..
        } = sets(11, 10_000, 50);
        let unlimited = run(&initiator, &responder, None).expect("unlimited");
        let limited = run(&initiator, &responder, Some(4096)).expect("limited");
        assert!(limited.round_trips > unlimited.round_trips);
        // No message exceeds the cap, so neither can the total per round trip.
        assert!(limited.bytes_initiator <= 4096 * u64::from(limited.round_trips));
        assert!(limited.bytes_responder <= 4096 * u64::from(limited.round_trips));
    }

    #[test]
    fn identical_sets_have_no_differences() {
        let ids = Ids(3).take(1_000);
        let result = run(&ids, &ids, None).expect("reconciliation");
        assert_eq!(result.round_trips, 1);
        assert!(result.have.is_empty());
        assert!(result.need.is_empty());
    }

    #[test]
    fn empty_sides_reconcile() {
        let ids = Ids(5).take(100);
        let result = run(&[], &ids, None).expect("empty initiator");
        assert!(result.have.is_empty());
        assert_eq!(sorted(result.need), sorted(ids.clone()));
        let result = run(&ids, &[], None).expect("empty responder");
        assert_eq!(sorted(result.have), sorted(ids));
        assert!(result.need.is_empty());
    }

    #[test]
    fn rejects_a_frame_limit_below_negentropy_minimum() {
        let ids = Ids(9).take(10);
        let err = run(&ids, &ids, Some(100)).expect_err("limit below 4096");
        assert!(
            format!("{err:#}").contains("frame size limit 100"),
            "{err:#}"
        );
    }

    /// One measurement at scale, for the record:
    /// `cargo test --release -p asp-bench bench_negentropy -- --ignored --nocapture`.
    #[test]
    #[ignore = "a release-mode measurement, not a check"]
    fn measure_one_million_ids_per_side() {
        let Sets {
            initiator,
            responder,
            only_initiator,
            only_responder,
        } = sets(42, 999_500, 500);
        assert_eq!(initiator.len(), 1_000_000);
        assert_eq!(responder.len(), 1_000_000);
        for limit in [None, Some(65_536), Some(500_000)] {
            let r = run(&initiator, &responder, limit).expect("reconciliation");
            assert_eq!(sorted(r.have.clone()), sorted(only_initiator.clone()));
            assert_eq!(sorted(r.need.clone()), sorted(only_responder.clone()));
            println!(
                "negentropy 1M/side, 500+500 differences, frame limit {limit:?}: \
                 round_trips={} bytes_initiator={} bytes_responder={} \
                 cpu_initiator={:?} cpu_responder={:?} \
                 build_initiator={:?} build_responder={:?} have={} need={}",
                r.round_trips,
                r.bytes_initiator,
                r.bytes_responder,
                r.cpu_initiator,
                r.cpu_responder,
                r.build_initiator,
                r.build_responder,
                r.have.len(),
                r.need.len(),
            );
        }
    }
}
