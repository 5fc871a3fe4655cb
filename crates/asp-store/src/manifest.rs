//! The data directory's manifest (`asp.json`) and lock (`LOCK`).
//!
//! The manifest names the on-disk format version and the node id. It is written once,
//! atomically (temporary file, fsync, rename, fsync of the directory), when the
//! directory is created. A directory written by a newer format is refused with an
//! error that says so, rather than misread.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use asp_core::NodeId;
use serde::{Deserialize, Serialize};

use crate::error::OpenError;

/// The data directory format this build writes. Bumped on any incompatible change to
/// the manifest, the log or the index layout; older formats are then migrated on open.
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

pub(crate) fn open(dir: &Path, wanted: Option<NodeId>) -> Result<Manifest, OpenError> {
    let io_err = |what: &str, path: &Path, source: io::Error| OpenError::Io {
        context: format!("{what} {}", path.display()),
        source,
    };
    fs::create_dir_all(dir).map_err(|e| io_err("cannot create data directory", dir, e))?;
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
    let node_id = match fs::read(&path) {
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
            if dir.join("log").exists() || dir.join("index").exists() {
                return Err(OpenError::Corrupt {
                    path,
                    reason: "the directory holds asp data but no manifest; restore asp.json or \
                             start with an empty directory"
                        .into(),
                });
            }
            let node_id = wanted.unwrap_or_else(random_node_id);
            write_new(dir, node_id).map_err(|e| io_err("cannot write manifest in", dir, e))?;
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

fn write_new(dir: &Path, node_id: NodeId) -> io::Result<()> {
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
    write_atomically(dir, MANIFEST, &text)
}

/// Replaces `dir/name` with `bytes` so that a crash leaves either the old or the new
/// file, never a mix.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp: PathBuf = dir.join(format!("{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

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
