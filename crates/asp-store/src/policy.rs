//! Each namespace's conflict policy, kept in the file `policies` of the data
//! directory: one `namespace policy` line per namespace that is not `lww`, written
//! whole (temporary file, fsync, rename, fsync of the directory) whenever it changes.
//! A namespace's policy is fixed once it holds data.

use std::collections::BTreeMap;
use std::path::Path;

use asp_core::Namespace;
use asp_core::crdt::Policy;

use crate::error::OpenError;
use crate::fs::{Fs, read_all, write_atomically};

const FILE: &str = "policies";
const HEADER: &str = "# asp namespace policies v1";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Policies {
    pub by_namespace: BTreeMap<Namespace, Policy>,
}

impl Policies {
    pub fn get(&self, namespace: &Namespace) -> Policy {
        self.by_namespace
            .get(namespace)
            .copied()
            .unwrap_or(Policy::Lww)
    }

    pub fn load(fs: &dyn Fs, dir: &Path) -> Result<Policies, OpenError> {
        let path = dir.join(FILE);
        let text = match read_all(fs, &path) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|_| OpenError::Corrupt {
                path: path.clone(),
                reason: "not UTF-8 text".into(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Policies::default()),
            Err(source) => {
                return Err(OpenError::Io {
                    context: format!("reading {}", path.display()),
                    source,
                });
            }
        };
        let corrupt = |reason: String| OpenError::Corrupt {
            path: path.clone(),
            reason,
        };
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(corrupt(format!("the first line is not {HEADER:?}")));
        }
        let mut out = Policies::default();
        for (i, line) in lines.enumerate() {
            let (name, policy) = line
                .split_once(' ')
                .ok_or_else(|| corrupt(format!("line {}: expected `namespace policy`", i + 2)))?;
            let namespace =
                Namespace::new(name).map_err(|e| corrupt(format!("line {}: {e}", i + 2)))?;
            let policy = Policy::parse(policy)
                .ok_or_else(|| corrupt(format!("line {}: unknown policy {policy:?}", i + 2)))?;
            out.by_namespace.insert(namespace, policy);
        }
        Ok(out)
    }

    pub fn save(&self, fs: &dyn Fs, dir: &Path) -> std::io::Result<()> {
        let mut text = format!("{HEADER}\n");
        for (ns, policy) in &self.by_namespace {
            if *policy != Policy::Lww {
                text.push_str(&format!("{ns} {policy}\n"));
            }
        }
        write_atomically(fs, dir, FILE, text.as_bytes())
    }
}
