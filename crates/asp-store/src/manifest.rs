//! The data directory's manifest (`asp.json`) and lock (`LOCK`).
//!
//! The manifest names the on-disk format version and the node id. It is written once,
//! atomically (temporary file, fsync, rename, fsync of the directory), when the
//! directory is created. A directory written by a newer format is refused with an
//! error that says so, rather than misread.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use asp_core::NodeId;
use serde::{Deserialize, Serialize};

use crate::error::OpenError;
use crate::fs::{Fs, read_all, write_atomically};

/// The data directory format this build writes. Each file in the directory also carries
/// a format number of its own (docs/STORAGE.md, *Versions and upgrades*); all are 1,
/// and no migration exists yet: a change that older files cannot be read under needs
/// a new number here or in that file, and a migration on open.
pub const FORMAT_VERSION: u32 = 1;

const MANIFEST: &str = "asp.json";
const LOCK: &str = "LOCK";

#[derive(Serialize, Deserialize)]
struct ManifestFile {
    format: u32,
    node_id: String,
    created_unix_ms: u64,
}

pub(crate) struct Manifest {
    pub node_id: NodeId,
    /// Held for the life of the store: a second process on the same directory fails to
    /// open instead of corrupting it.
    _lock: File,
}

pub(crate) fn open(fs: &dyn Fs, dir: &Path, wanted: Option<NodeId>) -> Result<Manifest, OpenError> {
    let io_err = |what: &str, path: &Path, source: io::Error| OpenError::Io {
        context: format!("{what} {}", path.display()),
        source,
    };
    // The lock is a real file even under a simulated filesystem: it guards the
    // directory against another process, which only the real one has.
    fs::create_dir_all(dir).map_err(|e| io_err("cannot create data directory", dir, e))?;
    fs.create_dir_all(dir)
        .map_err(|e| io_err("cannot create data directory", dir, e))?;
    let lock_path = dir.join(LOCK);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io_err("cannot open lock file", &lock_path, e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(OpenError::Locked {
                dir: dir.to_owned(),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err("cannot lock", &lock_path, e)),
    }

    let path = dir.join(MANIFEST);
    let node_id = match read_all(fs, &path) {
        Ok(bytes) => {
            let file: ManifestFile =
                serde_json::from_slice(&bytes).map_err(|e| OpenError::Corrupt {
                    path: path.clone(),
                    reason: format!("manifest is not valid: {e}"),
                })?;
            if file.format > FORMAT_VERSION || file.format == 0 {
                return Err(OpenError::UnsupportedFormat {
                    dir: dir.to_owned(),
                    found: file.format,
                    supported: FORMAT_VERSION,
                });
            }
            let stored: NodeId = file.node_id.parse().map_err(|e| OpenError::Corrupt {
                path: path.clone(),
                reason: format!("manifest node id: {e}"),
            })?;
            if let Some(wanted) = wanted
                && wanted != stored
            {
                return Err(OpenError::NodeIdMismatch {
                    dir: dir.to_owned(),
                    stored,
                    requested: wanted,
                });
            }
            stored
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if fs.exists(&dir.join("log")).unwrap_or(true) || dir.join("index").exists() {
                return Err(OpenError::Corrupt {
                    path,
                    reason: "the directory holds asp data but no manifest; restore asp.json or \
                             start with an empty directory"
                        .into(),
                });
            }
            let node_id = wanted.unwrap_or_else(random_node_id);
            write_new(fs, dir, node_id).map_err(|e| io_err("cannot write manifest in", dir, e))?;
            node_id
        }
        Err(e) => return Err(io_err("cannot read", &path, e)),
    };
    Ok(Manifest {
        node_id,
        _lock: lock,
    })
}

fn random_node_id() -> NodeId {
    loop {
        if let Some(id) = NodeId::new(rand::random()) {
            return id;
        }
    }
}

fn write_new(fs: &dyn Fs, dir: &Path, node_id: NodeId) -> io::Result<()> {
    let created_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let file = ManifestFile {
        format: FORMAT_VERSION,
        node_id: node_id.to_string(),
        created_unix_ms,
    };
    let mut text = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
    text.push(b'\n');
    write_atomically(fs, dir, MANIFEST, &text)
}

/// The node id of the data directory at `dir`, read without opening (or locking) the
/// store: for tools that run beside a live node.
pub fn node_id_of(dir: &Path) -> Result<NodeId, String> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            format!(
                "{} is not an asp data directory (no {MANIFEST}); give the --data-dir of a node",
                dir.display()
            )
        } else {
            format!("cannot read {}: {e}", path.display())
        }
    })?;
    let file: ManifestFile = serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not valid: {e}", path.display()))?;
    file.node_id
        .parse()
        .map_err(|e| format!("{}: node id {:?}: {e}", path.display(), file.node_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::RealFs;

    fn open(dir: &Path, wanted: Option<NodeId>) -> Result<Manifest, OpenError> {
        super::open(&RealFs, dir, wanted)
    }

    #[test]
    fn node_id_is_kept_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let id = open(dir.path(), None).unwrap().node_id;
        assert_eq!(open(dir.path(), None).unwrap().node_id, id);
        assert_eq!(open(dir.path(), Some(id)).unwrap().node_id, id);
        let other = NodeId::new(id.get() ^ 1).unwrap();
        assert!(matches!(
            open(dir.path(), Some(other)),
            Err(OpenError::NodeIdMismatch { .. })
        ));
    }

    #[test]
    fn second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _held = open(dir.path(), None).unwrap();
        assert!(matches!(
            open(dir.path(), None),
            Err(OpenError::Locked { .. })
        ));
    }

    #[test]
    fn newer_format_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(MANIFEST),
            br#"{"format": 99, "node_id": "00000000000000aa", "created_unix_ms": 0}"#,
        )
        .unwrap();
        let err = open(dir.path(), None).err().unwrap();
        assert!(matches!(
            err,
            OpenError::UnsupportedFormat { found: 99, .. }
        ));
        assert!(err.to_string().contains("format 99"), "{err}");
    }
}
