//! The client libraries' own test suites, against this build's `asp` binary: the
//! Python client and the Python peer-protocol follower (pytest, in a venv under
//! target/tmp with a pinned pytest; the follower's suite includes receiving 100,000
//! events from a real node and matching its digest, `ASP_FOLLOWER_EVENTS` lowers it),
//! and the TypeScript client (`npm ci`, then node's test runner). Each suite starts
//! its own `asp serve` processes on free ports.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PYTEST: &str = "pytest==9.2.0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(what: &str, command: &mut Command) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_python_client_and_follower_pass_their_tests_against_this_build() {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-venv");
    let python = venv.join("bin/python");
    let has_pytest = Command::new(&python)
        .args([
            "-c",
            "import pytest, sys; sys.exit(pytest.__version__ != '9.2.0')",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !has_pytest {
        run(
            "python3 -m venv",
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
        );
        run(
            "pip install pytest",
            Command::new(&python).args(["-m", "pip", "install", "--quiet", PYTEST]),
        );
    }
    let dir = repo().join("clients/python");
    let out = run(
        "pytest clients/python",
        Command::new(&python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
            .current_dir(&dir)
            .env("PYTHONPATH", &dir)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("ASP_BIN", env!("CARGO_BIN_EXE_asp")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // Every test ran: none skipped for a missing binary or module.
    assert!(!text.contains("skipped"), "{text}");
    eprintln!("{}", text.lines().last().unwrap_or_default());
}

#[test]
fn the_typescript_client_passes_its_tests_against_this_build() {
    let dir = repo().join("clients/ts");
    run(
        "npm ci",
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir),
    );
    let out = run(
        "npm test",
        Command::new("npm")
            .arg("test")
            .current_dir(&dir)
            .env("ASP_BIN", env!("CARGO_BIN_EXE_asp")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("# fail 0"), "{text}");
    eprintln!(
        "{}",
        text.lines()
            .filter(|l| l.starts_with("# pass"))
            .collect::<String>()
    );
}
