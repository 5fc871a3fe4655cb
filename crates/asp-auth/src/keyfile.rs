//! A node's token-signing key on disk: `DATA_DIR/token.key`, PKCS#8 (Ed25519), readable
//! by its owner only, written through a temporary file and a rename.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::token::SigningKey;

/// The key's file name inside a data directory.
pub const TOKEN_KEY_FILE: &str = "token.key";

pub fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_KEY_FILE)
}

/// Reads the key of the node at `data_dir`.
pub fn load(data_dir: &Path) -> Result<SigningKey, String> {
    let path = path_in(data_dir);
    let bytes = std::fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "no token key in {}: start the node there once with `--auth required` (it makes {TOKEN_KEY_FILE})",
                data_dir.display()
            )
        } else {
            format!("cannot read {}: {e}", path.display())
        }
    })?;
    SigningKey::from_pkcs8(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads the key, or makes one if there is none.
pub fn load_or_create(data_dir: &Path) -> Result<(SigningKey, bool), String> {
    let path = path_in(data_dir);
    if path.exists() {
        return load(data_dir).map(|k| (k, false));
    }
    let key = SigningKey::generate().map_err(|e| e.to_string())?;
    let io = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(key.pkcs8()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, &path).map_err(io)?;
    if let Ok(dir) = std::fs::File::open(data_dir) {
        let _ = dir.sync_all();
    }
    Ok((key, true))
}
