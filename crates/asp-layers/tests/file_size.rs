//! A source file over 1,000 lines says why near its top: a file that grows past that is
//! usually two things, and should be split by purpose (docs/ARCHITECTURE.md,
//! *Conventions*). When it is one thing, a line starting with `//! Size:` among its
//! first lines says so, and this test lets it be.

use std::path::{Path, PathBuf};

const LINES_MAX: usize = 1_000;
/// The `//! Size:` line must be among this many first lines.
const REASON_WITHIN_LINES: usize = 40;
const REASON_PREFIX: &str = "//! Size:";

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn source_files_over_1000_lines_say_why() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    for krate in std::fs::read_dir(root.join("crates")).expect("crates/") {
        rust_files(
            &krate.expect("a directory entry").path().join("src"),
            &mut files,
        );
    }
    assert!(
        !files.is_empty(),
        "no source files found under crates/*/src"
    );
    files.sort();
    let mut unexplained = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("a readable source file");
        let lines = text.lines().count();
        let explained = text
            .lines()
            .take(REASON_WITHIN_LINES)
            .any(|l| l.trim_start().starts_with(REASON_PREFIX));
        if lines > LINES_MAX && !explained {
            let shown = path.strip_prefix(&root).unwrap_or(&path);
            unexplained.push(format!("{} ({lines} lines)", shown.display()));
        }
    }
    assert!(
        unexplained.is_empty(),
        "source files over {LINES_MAX} lines without a `{REASON_PREFIX}` line in their first \
         {REASON_WITHIN_LINES} lines saying why (split them by purpose, or say why they are \
         one thing):\n  {}",
        unexplained.join("\n  ")
    );
}
