//! Damage in the feed log: a damaged record followed by later writes is corruption
//! (refused, or salvaged with `salvage`), not a torn tail; a genuine torn tail is still
//! cut; the scrub finds damage in sealed segments.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use asp_core::{ContentType, Key, Namespace};
use asp_store::fault::FaultFs;
use asp_store::{FsyncMode, OpenError, Store, StoreConfig, WriteOp};
use bytes::Bytes;

fn ns(name: &str) -> Namespace {
    Namespace::new(name).unwrap()
}

fn put(k: &str, v: &str) -> WriteOp {
    WriteOp::put(
        Key::new(k).unwrap(),
        ContentType::Text,
        Bytes::copy_from_slice(v.as_bytes()),
    )
}

fn config(dir: &Path) -> StoreConfig {
    let mut cfg = StoreConfig::new(dir);
    cfg.fsync = FsyncMode::Always;
    cfg
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

/// Where the frame that holds byte `at` of a segment begins: frames (`len: u32 |
/// crc32c: u32 | body`) follow the segment's 32-byte header back to back.
fn frame_start(path: &Path, at: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut start = 32;
    loop {
        let mut len = [0u8; 4];
        f.read_exact_at(&mut len, start).unwrap();
        let end = start + 8 + u64::from(u32::from_le_bytes(len));
        if at < end {
            return start;
        }
        start = end;
    }
}

fn flip(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x20;
    f.write_all_at(&b, offset).unwrap();
}

fn present(store: &Store, n: usize) -> Vec<usize> {
    (0..n)
        .filter(|i| store.get(&ns("c"), &format!("k{i}")).unwrap().is_some())
        .collect()
}

/// 2,000 acknowledged writes, one at a time (each its own writer group).
async fn two_thousand_writes(cfg: &StoreConfig) {
    let store = Store::open(cfg.clone()).unwrap();
    for i in 0..2000 {
        store
            .write(ns("c"), vec![put(&format!("k{i}"), &format!("value {i}"))])
            .await
            .unwrap();
    }
}

/// Regression (issue 11): one byte flipped a third of the way into the log made the
/// store cut everything after it as a "torn tail" and start without complaint, with
/// 1,331 of 2,000 acknowledged keys gone. A damaged record followed by later writes
/// is corruption: open refuses, naming the file and the offset; `salvage` then keeps
/// every intact record and reports exactly what was lost.
#[tokio::test]
async fn a_damaged_record_before_later_writes_is_corruption_and_salvage_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    two_thousand_writes(&cfg).await;
    let seg = segments(dir.path()).pop().unwrap();
    let third = std::fs::metadata(&seg).unwrap().len() / 3;
    flip(&seg, third);
    let message = match Store::open(cfg.clone()) {
        Err(e @ OpenError::Corrupt { .. }) => e.to_string(),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(store) => panic!(
            "opened a corrupt log: {} of 2000 keys left",
            present(&store, 2000).len()
        ),
    };
    assert!(message.contains("corrupt"), "{message}");
    assert!(message.contains(&seg.display().to_string()), "{message}");
    assert!(message.contains("offset"), "{message}");
    assert!(message.contains("--salvage"), "{message}");
    // Refused again: nothing was changed by the refusal.
    assert!(Store::open(cfg.clone()).is_err());

    let mut salvage = cfg.clone();
    salvage.salvage = true;
    {
        let store = Store::open(salvage.clone()).unwrap();
        let report = store.recovery().salvage.clone().expect("a salvage report");
        assert_eq!(report.segments.len(), 1);
        let s = &report.segments[0];
        assert_eq!(s.positions_lost.len(), 1, "one record was damaged: {s:?}");
        assert_eq!(s.records_kept, 1999);
        assert!(s.moved_to.exists(), "the damaged file is kept aside");
        assert!(store.recovery().index_rebuilt);
        let kept = present(&store, 2000);
        assert_eq!(kept.len(), 1999, "every intact record is kept");
        let lost = (0..2000).find(|i| !kept.contains(i)).unwrap() as u64;
        assert_eq!(
            s.positions_lost.ranges(),
            &[(lost + 1, lost + 1)],
            "the lost position is the lost key's"
        );
        // The lost dot left the vector: a peer holding it would send it again.
        let vector = store.status().namespaces[0].1.vector.clone();
        assert_eq!(vector.len(), 1999);
        // Its counter could be held by a peer (it was this node's own event): the next
        // write's counter goes on past a gap, never reusing it.
        let after = store.write(ns("c"), vec![put("after", "1")]).await.unwrap();
        assert!(after[0].dot.counter > 1 << 32, "{:?}", after[0].dot);
    }
    // Salvaged once: opens cleanly without --salvage, and --salvage again does nothing.
    let store = Store::open(cfg.clone()).unwrap();
    assert_eq!(present(&store, 2000).len(), 1999);
    assert!(store.get(&ns("c"), "after").unwrap().is_some());
    drop(store);
    let store = Store::open(salvage).unwrap();
    assert!(
        store
            .recovery()
            .salvage
            .as_ref()
            .unwrap()
            .segments
            .is_empty()
    );
}

/// Guards the tear rule: damage inside the last writer group — here its middle
/// sectors lost while its later ones reached the disk — is still a torn tail, cut
/// silently (a warning), with everything before it kept.
#[tokio::test]
async fn a_torn_last_group_is_still_cut_even_with_sectors_lost_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let before_last;
    {
        let store = Store::open(cfg.clone()).unwrap();
        for i in 0..50 {
            store
                .write(ns("c"), vec![put(&format!("k{i}"), "v")])
                .await
                .unwrap();
        }
        before_last = std::fs::metadata(segments(dir.path()).pop().unwrap())
            .unwrap()
            .len();
        // The last group: one batch of 40 records of about 200 bytes.
        let v = "w".repeat(200);
        let ops = (0..40).map(|i| put(&format!("last{i}"), &v)).collect();
        store.write(ns("c"), ops).await.unwrap();
    }
    let seg = segments(dir.path()).pop().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    // Lose two sectors in the middle of the last append; its end is intact.
    f.write_all_at(&[0u8; 1024], before_last + 2048).unwrap();
    drop(f);
    let store = Store::open(cfg).unwrap();
    let torn = store.recovery().torn_tail.clone().expect("a torn tail");
    assert_eq!(torn.offset, before_last);
    assert_eq!(present(&store, 50).len(), 50);
    assert!(store.get(&ns("c"), "last0").unwrap().is_none());
}

/// Regression: damage in a sealed segment went unnoticed until a reader needed the
/// record (opening reads the sidecar, not the records). The scrub reads every record
/// and reports the damaged place.
#[tokio::test]
async fn the_scrub_finds_a_flipped_byte_in_a_sealed_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes_max = 1 << 20;
    {
        let store = Store::open(cfg.clone()).unwrap();
        let v = "s".repeat(10_000);
        for i in 0..250 {
            store
                .write(ns("c"), vec![put(&format!("k{i}"), &v)])
                .await
                .unwrap();
        }
        let clean = store.scrub().unwrap();
        assert!(clean.damage.is_empty(), "{clean:?}");
        assert!(clean.segments >= 3 && clean.records == 250, "{clean:?}");
    }
    let first = segments(dir.path()).remove(0);
    flip(&first, 500_000);
    // The sidecar is intact: the store opens.
    let store = Store::open(cfg).unwrap();
    let report = store.scrub().unwrap();
    assert_eq!(report.damage.len(), 1, "{report:?}");
    assert_eq!(report.damage[0].segment, first);
    assert_eq!(
        report.damage[0].offset,
        frame_start(&first, 500_000),
        "the damaged record's start: {report:?}"
    );
    assert_eq!(store.status().last_scrub, Some(report));
    assert_eq!(store.metrics().scrub_damage.get(), 1);
}

/// Guards salvage's crash safety: a power cut at any step of a salvage, then salvage
/// again, ends in the same log as an uninterrupted salvage; a plain open in between
/// never starts on a half-salvaged log.
#[tokio::test]
async fn salvage_interrupted_at_any_step_finishes_when_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::new(5);
    let mut cfg = config(dir.path());
    cfg.fs = fs.shared();
    cfg.segment_bytes_max = 1 << 20;
    cfg.reconcile_window = 0;
    {
        let store = Store::open(cfg.clone()).unwrap();
        let v = "z".repeat(3000);
        for i in 0..500 {
            store
                .write(ns("c"), vec![put(&format!("k{i}"), &v)])
                .await
                .unwrap();
        }
    }
    // Damage a sealed segment (its sidecar trusted on open) and the active one.
    let mut logs: Vec<_> = fs
        .files()
        .into_iter()
        .filter(|p| {
            p.extension().is_some_and(|e| e == "log")
                && p.parent().is_some_and(|d| d.ends_with("log"))
        })
        .collect();
    logs.sort();
    assert!(logs.len() >= 2);
    for (path, at) in [(&logs[0], 300_000usize), (logs.last().unwrap(), 40_000)] {
        let mut bytes = fs.read(path).unwrap();
        bytes[at] ^= 0x04;
        fs.write_durably(path, &bytes).unwrap();
    }
    let pristine = fs.snapshot();
    let mut salvage = cfg.clone();
    salvage.salvage = true;
    // Uninterrupted, for reference.
    let expected = {
        let store = Store::open(salvage.clone()).unwrap();
        let lost = store.recovery().salvage.as_ref().unwrap().positions_lost();
        assert_eq!(lost, 2, "one record in each damaged segment");
        present(&store, 500)
    };
    assert_eq!(expected.len(), 498);
    let mut step = 0;
    loop {
        fs.restore(&pristine);
        let _ = std::fs::remove_dir_all(dir.path().join("index"));
        fs.cut_after(step);
        let finished = Store::open(salvage.clone()).is_ok() && !fs.is_cut();
        fs.cut();
        fs.reboot();
        if finished {
            break;
        }
        match Store::open(cfg.clone()) {
            Err(e) => {
                let message = e.to_string();
                assert!(message.contains("salvage"), "step {step}: {message}");
            }
            // Only once the salvage is complete (the cut came after it).
            Ok(store) => assert_eq!(present(&store, 500), expected, "step {step}: a plain open"),
        }
        let store = Store::open(salvage.clone())
            .unwrap_or_else(|e| panic!("step {step}: salvage again failed: {e}"));
        assert_eq!(present(&store, 500), expected, "step {step}");
        drop(store);
        let store = Store::open(cfg.clone()).unwrap();
        assert_eq!(present(&store, 500), expected, "step {step}, reopened");
        step += 1;
    }
    assert!(step > 10, "the salvage took only {step} steps");
}
