//! A fault-injecting, in-memory [`Fs`] for tests: power cuts, `EIO` on `fdatasync`,
//! `ENOSPC`. Not part of the store's interface (hidden from the docs); tests of this
//! crate and of others use it to put a real store on a disk that misbehaves.
//!
//! The model is a strict one, stricter than ext4 or XFS in their default modes:
//!
//! - Per file, what is **durable** is its contents as of its last `fdatasync`;
//!   everything written since lives only in the "page cache".
//! - Per directory entry, what is durable is the entry as of the last sync of its
//!   directory: a file created, renamed or removed and not followed by a directory
//!   sync is back as it was after a power cut. Directories themselves, once created,
//!   are durable.
//! - A **power cut** ([`FaultFs::cut`], or [`FaultFs::cut_after`] a number of
//!   mutating operations) freezes the filesystem: every later operation, reads
//!   included, fails with `EIO`, as the machine is gone. [`FaultFs::reboot`] then keeps
//!   only the durable state, plus the last write since the last sync (if its file was
//!   not synced since), torn: either cut at a random 512-byte sector boundary (prefix
//!   kept), or, one time in four, a random subset of its sectors kept (disks do not
//!   promise to write sectors in order).
//! - `EIO` on the next or on every `fdatasync` ([`FaultFs::fail_syncs`]); a failed
//!   sync makes nothing durable.
//! - A capacity ([`FaultFs::set_capacity`]): a write past it writes what fits and
//!   fails with `ENOSPC`; [`Fs::free_bytes`] says what is left.
//!
//! Every random choice comes from a seeded generator, so a failing seed replays.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::fs::{Fs, FsFile, OpenMode};

const SECTOR: u64 = 512;

/// When `fdatasync` fails with `EIO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncFailure {
    Never,
    /// The next one, then never again.
    Next,
    Every,
}

/// The in-memory filesystem. Clones share one state.
#[derive(Clone, Debug)]
pub struct FaultFs {
    state: Arc<Mutex<State>>,
}

#[derive(Clone, Debug, Default)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Clone, Debug)]
struct State {
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    /// Directory entries as the running system sees them.
    live: BTreeMap<PathBuf, u64>,
    /// Directory entries as a power cut leaves them.
    durable: BTreeMap<PathBuf, u64>,
    dirs: BTreeSet<PathBuf>,
    /// Bumped by every reboot: handles from before it fail.
    generation: u64,
    cut: bool,
    /// Mutating operations left before a power cut.
    cut_countdown: Option<u64>,
    /// (inode, offset, bytes) of the last write since its file's last sync.
    last_write: Option<(u64, u64, Vec<u8>)>,
    sync_failure: SyncFailure,
    /// How long each file `fdatasync` takes (a slow disk).
    sync_delay: std::time::Duration,
    capacity: Option<u64>,
    rng: u64,
    /// Mutating operations so far.
    ops: u64,
    cuts: u64,
}

fn power_off() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file (fault filesystem)", path.display()),
    )
}

impl State {
    fn next_random(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_random() % n }
    }

    /// Counts a mutating operation; fails if the power is (or now goes) off.
    fn mutate(&mut self) -> io::Result<()> {
        self.check()?;
        self.ops += 1;
        if let Some(left) = self.cut_countdown.as_mut() {
            if *left == 0 {
                self.cut_countdown = None;
                self.cut = true;
                self.cuts += 1;
                return Err(power_off());
            }
            *left -= 1;
        }
        Ok(())
    }

    fn check(&self) -> io::Result<()> {
        if self.cut { Err(power_off()) } else { Ok(()) }
    }

    fn used(&self) -> u64 {
        self.inodes.values().map(|i| i.live.len() as u64).sum()
    }

    fn free(&self) -> u64 {
        self.capacity
            .map_or(u64::MAX / 2, |c| c.saturating_sub(self.used()))
    }
}

impl Default for FaultFs {
    fn default() -> Self {
        Self::new(0)
    }
}

impl FaultFs {
    /// An empty filesystem whose random choices follow `seed`.
    pub fn new(seed: u64) -> FaultFs {
        FaultFs {
            state: Arc::new(Mutex::new(State {
                inodes: HashMap::new(),
                next_inode: 1,
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
                dirs: BTreeSet::new(),
                generation: 0,
                cut: false,
                cut_countdown: None,
                last_write: None,
                sync_failure: SyncFailure::Never,
                sync_delay: std::time::Duration::ZERO,
                capacity: None,
                rng: seed,
                ops: 0,
                cuts: 0,
            })),
        }
    }

    /// This filesystem as the store's [`Fs`].
    pub fn shared(&self) -> Arc<dyn Fs> {
        Arc::new(self.clone())
    }

    /// Cuts the power now.
    pub fn cut(&self) {
        let mut s = self.state.lock().unwrap();
        if !s.cut {
            s.cut = true;
            s.cuts += 1;
        }
    }

    /// Cuts the power at the `n`-th mutating operation from now (writes, syncs,
    /// truncations, creations, renames, removals): it and everything after fail.
    pub fn cut_after(&self, n: u64) {
        self.state.lock().unwrap().cut_countdown = Some(n);
    }

    pub fn is_cut(&self) -> bool {
        self.state.lock().unwrap().cut
    }

    /// Mutating operations so far.
    pub fn ops(&self) -> u64 {
        self.state.lock().unwrap().ops
    }

    /// Brings the machine back after a power cut: only durable state stays, plus the
    /// torn last write. Handles opened before fail from now on.
    pub fn reboot(&self) {
        let mut s = self.state.lock().unwrap();
        let torn = s.last_write.take();
        let keep_subset = s.below(4) == 0;
        let entries = s.durable.clone();
        let mut inodes = HashMap::new();
        for &ino in entries.values() {
            let durable = s
                .inodes
                .get(&ino)
                .map(|i| i.durable.clone())
                .unwrap_or_default();
            inodes.insert(
                ino,
                Inode {
                    live: durable.clone(),
                    durable,
                },
            );
        }
        if let Some((ino, offset, bytes)) = torn
            && let Some(inode) = inodes.get_mut(&ino)
        {
            let end = offset + bytes.len() as u64;
            // Sector boundaries inside the write, by absolute file offset.
            let mut cuts = vec![offset];
            let mut b = (offset / SECTOR + 1) * SECTOR;
            while b < end {
                cuts.push(b);
                b += SECTOR;
            }
            cuts.push(end);
            let mut kept: Vec<(u64, u64)> = Vec::new();
            if keep_subset {
                for w in cuts.windows(2) {
                    if s.below(2) == 0 {
                        kept.push((w[0], w[1]));
                    }
                }
            } else {
                let i = s.below(cuts.len() as u64) as usize;
                kept.push((offset, cuts[i]));
            }
            for (from, to) in kept {
                if to <= from {
                    continue;
                }
                let data = &bytes[(from - offset) as usize..(to - offset) as usize];
                if inode.durable.len() < to as usize {
                    inode.durable.resize(to as usize, 0);
                }
                inode.durable[from as usize..to as usize].copy_from_slice(data);
            }
            inode.live = inode.durable.clone();
        }
        s.inodes = inodes;
        s.live = entries;
        s.generation += 1;
        s.cut = false;
        s.cut_countdown = None;
        s.sync_failure = SyncFailure::Never;
    }

    pub fn fail_syncs(&self, failure: SyncFailure) {
        self.state.lock().unwrap().sync_failure = failure;
    }

    /// Makes every file `fdatasync` take `delay` (a slow or busy disk), spent without
    /// holding the filesystem's lock.
    pub fn set_sync_delay(&self, delay: std::time::Duration) {
        self.state.lock().unwrap().sync_delay = delay;
    }

    /// Limits the bytes all files may hold together (`None`: no limit).
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state.lock().unwrap().capacity = bytes;
    }

    /// Bytes all files hold.
    pub fn used_bytes(&self) -> u64 {
        self.state.lock().unwrap().used()
    }

    /// The live contents of a file (for tests that damage files).
    pub fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let s = self.state.lock().unwrap();
        let ino = *s.live.get(path).ok_or_else(|| not_found(path))?;
        Ok(s.inodes[&ino].live.clone())
    }

    /// Replaces a file's contents, durably (for tests that damage files).
    pub fn write_durably(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        let ino = *s.live.get(path).ok_or_else(|| not_found(path))?;
        let inode = s.inodes.get_mut(&ino).expect("entries name inodes");
        inode.live = bytes.to_vec();
        inode.durable = bytes.to_vec();
        Ok(())
    }

    /// A copy of the whole filesystem, for [`FaultFs::restore`].
    pub fn snapshot(&self) -> FaultSnapshot {
        FaultSnapshot(self.state.lock().unwrap().clone())
    }

    /// Puts the filesystem back as `snapshot` found it (handles opened since fail).
    pub fn restore(&self, snapshot: &FaultSnapshot) {
        let mut s = self.state.lock().unwrap();
        let generation = s.generation + 1;
        *s = snapshot.0.clone();
        s.generation = generation;
    }

    /// Every file's path.
    pub fn files(&self) -> Vec<PathBuf> {
        self.state.lock().unwrap().live.keys().cloned().collect()
    }
}

/// A copy of a [`FaultFs`]'s state.
#[derive(Clone, Debug)]
pub struct FaultSnapshot(State);

#[derive(Debug)]
struct FaultFile {
    state: Arc<Mutex<State>>,
    inode: u64,
    generation: u64,
    writable: bool,
}

impl FaultFile {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> io::Result<T>) -> io::Result<T> {
        let mut s = self.state.lock().unwrap();
        s.check()?;
        if s.generation != self.generation || !s.inodes.contains_key(&self.inode) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "a file handle from before a reboot (fault filesystem)",
            ));
        }
        f(&mut s)
    }
}

impl FsFile for FaultFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        self.with(|s| {
            s.mutate()?;
            let len = s.inodes[&self.inode].live.len() as u64;
            let end = offset + buf.len() as u64;
            let growth = end.saturating_sub(len);
            let free = s.free();
            let (n, full) = if growth > free {
                // What fits is written, then the disk is full.
                (buf.len() - (growth - free) as usize, true)
            } else {
                (buf.len(), false)
            };
            let live = &mut s.inodes.get_mut(&self.inode).expect("checked").live;
            let stop = offset as usize + n;
            if live.len() < stop {
                live.resize(stop, 0);
            }
            live[offset as usize..stop].copy_from_slice(&buf[..n]);
            s.last_write = Some((self.inode, offset, buf[..n].to_vec()));
            if full {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            Ok(())
        })
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with(|s| {
            let live = &s.inodes[&self.inode].live;
            let end = offset as usize + buf.len();
            if end > live.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "failed to fill whole buffer",
                ));
            }
            buf.copy_from_slice(&live[offset as usize..end]);
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        let delay = self.state.lock().unwrap().sync_delay;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        self.with(|s| {
            s.mutate()?;
            match s.sync_failure {
                SyncFailure::Never => {}
                SyncFailure::Next => {
                    s.sync_failure = SyncFailure::Never;
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                SyncFailure::Every => return Err(io::Error::from_raw_os_error(libc::EIO)),
            }
            let inode = s.inodes.get_mut(&self.inode).expect("checked");
            inode.durable = inode.live.clone();
            if s.last_write.as_ref().is_some_and(|w| w.0 == self.inode) {
                s.last_write = None;
            }
            Ok(())
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.with(|s| Ok(s.inodes[&self.inode].live.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with(|s| {
            s.mutate()?;
            let live = &mut s.inodes.get_mut(&self.inode).expect("checked").live;
            live.resize(len as usize, 0);
            Ok(())
        })
    }
}

impl Fs for FaultFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        let mut s = self.state.lock().unwrap();
        s.check()?;
        let parent = path.parent().unwrap_or(Path::new("/"));
        let existing = s.live.get(path).copied();
        let inode = match (mode, existing) {
            (OpenMode::Read | OpenMode::Write, Some(ino)) => ino,
            (OpenMode::Read | OpenMode::Write, None) => return Err(not_found(path)),
            (OpenMode::CreateNew, Some(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists (fault filesystem)", path.display()),
                ));
            }
            (OpenMode::Truncate, Some(ino)) => {
                s.mutate()?;
                s.inodes
                    .get_mut(&ino)
                    .expect("entries name inodes")
                    .live
                    .clear();
                ino
            }
            (OpenMode::CreateNew | OpenMode::Truncate, None) => {
                if !s.dirs.contains(parent) {
                    return Err(not_found(parent));
                }
                s.mutate()?;
                let ino = s.next_inode;
                s.next_inode += 1;
                s.inodes.insert(ino, Inode::default());
                s.live.insert(path.to_owned(), ino);
                ino
            }
        };
        Ok(Box::new(FaultFile {
            state: self.state.clone(),
            inode,
            generation: s.generation,
            writable: mode != OpenMode::Read,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        s.check()?;
        let ino = *s.live.get(from).ok_or_else(|| not_found(from))?;
        s.mutate()?;
        s.live.remove(from);
        s.live.insert(to.to_owned(), ino);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        s.check()?;
        if !s.live.contains_key(path) {
            return Err(not_found(path));
        }
        s.mutate()?;
        s.live.remove(path);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        s.mutate()?;
        if s.sync_failure == SyncFailure::Every {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let in_dir = |p: &Path| p.parent() == Some(dir);
        let durable: Vec<_> = s.durable.keys().filter(|p| in_dir(p)).cloned().collect();
        for p in durable {
            s.durable.remove(&p);
        }
        let live: Vec<_> = s
            .live
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        s.durable.extend(live);
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.state.lock().unwrap();
        s.check()?;
        if !s.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        Ok(s.live
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        s.check()?;
        for d in dir.ancestors() {
            s.dirs.insert(d.to_owned());
        }
        Ok(())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let s = self.state.lock().unwrap();
        s.check()?;
        Ok(s.live.contains_key(path) || s.dirs.contains(path))
    }

    fn free_bytes(&self, _dir: &Path) -> io::Result<u64> {
        let s = self.state.lock().unwrap();
        s.check()?;
        Ok(s.free())
    }
}

/// Overwrites every origin's entry of the CRDT key `key` in the key index with bytes
/// that are no state, as a damaged disk or a bug could leave them, so that a test can
/// check that such a state reads as an error, never as a value. Waits for the indexer
/// first; returns how many entries it damaged.
pub fn damage_crdt_state(
    store: &crate::Store,
    namespace: &asp_core::Namespace,
    key: &str,
) -> Result<usize, crate::ReadError> {
    let shared = &store.inner.shared;
    shared.await_index().map_err(crate::ReadError::Failed)?;
    let mut entries = Vec::new();
    shared.index.scan(
        &crate::codec::crdt_key_prefix(namespace.as_str(), key),
        None,
        |k, entry| {
            entries.push((k.to_vec(), entry));
            true
        },
    )?;
    let damaged = bytes::Bytes::from_static(b"\xffnot a state");
    let mut batch = shared.index.batch(entries.len());
    for (k, mut entry) in entries.iter().cloned() {
        entry.value_len = damaged.len() as u32;
        entry.inline = Some(damaged.clone());
        batch.put(k.into(), &entry);
    }
    batch.commit()?;
    Ok(entries.len())
}
