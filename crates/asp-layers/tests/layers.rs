//! Each crate's dependencies stay within its layer (docs/ARCHITECTURE.md, *Invariants*).
//!
//! The rules are read against `cargo metadata --all-features`, so an optional
//! dependency behind a feature counts too, and only normal dependencies count (a test
//! may use anything). `cargo metadata` resolves features for the whole workspace: a
//! feature another member turns on (async-nats turns on `bytes/serde`) shows as a
//! dependency of every crate that uses `bytes`. So a transitive finding counts only if
//! `cargo tree -p <crate> --all-features -e normal`, which resolves the crate's own build,
//! lists it too.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// How far a rule looks.
#[derive(Clone, Copy)]
enum Reach {
    /// The crate's own `[dependencies]`.
    Direct,
    /// Everything the crate's normal build compiles.
    Transitive,
}

struct Rule {
    krate: &'static str,
    reach: Reach,
    forbidden: &'static [&'static str],
    why: &'static str,
}

/// Runtimes, sockets, files and system calls.
const IO: &[&str] = &[
    "tokio",
    "tokio-util",
    "mio",
    "socket2",
    "async-std",
    "smol",
    "futures-executor",
    "hyper",
    "hyper-util",
    "axum",
    "tower",
    "reqwest",
    "fjall",
    "libc",
    "nix",
    "rustix",
    "tempfile",
];

/// Serialization formats: the outer crates own them.
const FORMATS: &[&str] = &[
    "serde",
    "serde_json",
    "ciborium",
    "rmp-serde",
    "toml",
    "lz4_flex",
];

const RULES: &[Rule] = &[
    Rule {
        krate: "asp-core",
        reach: Reach::Transitive,
        forbidden: IO,
        why: "asp-core does no I/O: no files, sockets, threads or runtime",
    },
    Rule {
        krate: "asp-core",
        reach: Reach::Transitive,
        forbidden: FORMATS,
        why: "asp-core knows no wire or storage format: asp-wire, asp-store and asp-http own them",
    },
    Rule {
        krate: "asp-wire",
        reach: Reach::Transitive,
        forbidden: IO,
        why: "asp-wire is a codec: bytes in, frames out, no runtime and no I/O",
    },
    // Direct only: the binary may reach a library that wraps these one day (a bench
    // crate of its own); what it must not do is take them itself.
    Rule {
        krate: "asp",
        reach: Reach::Direct,
        forbidden: &["negentropy", "hdrhistogram", "asp-faultnet", "asp-sim"],
        why: "the node binary ships no benchmark or test machinery: those live in their own crates",
    },
];

fn metadata() -> Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(&cargo)
        .current_dir(&root)
        .args(["metadata", "--format-version", "1", "--all-features"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} metadata: {e}"));
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON")
}

/// The package graph: id → name, and id → the ids of its normal dependencies.
struct Graph {
    names: BTreeMap<String, String>,
    normal_deps: BTreeMap<String, Vec<String>>,
}

impl Graph {
    fn read(metadata: &Value) -> Graph {
        let names = metadata["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .map(|p| (str_of(&p["id"]), str_of(&p["name"])))
            .collect();
        let normal_deps = metadata["resolve"]["nodes"]
            .as_array()
            .expect("resolve.nodes")
            .iter()
            .map(|node| {
                let deps = node["deps"]
                    .as_array()
                    .expect("deps")
                    .iter()
                    .filter(|dep| {
                        dep["dep_kinds"]
                            .as_array()
                            .expect("dep_kinds")
                            .iter()
                            .any(|k| k["kind"].is_null())
                    })
                    .map(|dep| str_of(&dep["pkg"]))
                    .collect();
                (str_of(&node["id"]), deps)
            })
            .collect();
        Graph { names, normal_deps }
    }

    fn id_of(&self, name: &str) -> String {
        let ids: Vec<_> = self
            .names
            .iter()
            .filter(|(_, n)| *n == name)
            .map(|(id, _)| id.clone())
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "expected one package named {name} in the workspace (a rule names a crate that is gone?)"
        );
        ids.into_iter().next().unwrap()
    }

    /// Every package `from` reaches, with the path that reaches it.
    fn reached(&self, from: &str, reach: Reach) -> BTreeMap<String, Vec<String>> {
        let start = self.id_of(from);
        let mut paths = BTreeMap::new();
        let mut queue = VecDeque::from([(start.clone(), vec![from.to_owned()])]);
        let mut seen = BTreeSet::from([start]);
        while let Some((id, path)) = queue.pop_front() {
            for dep in self.normal_deps.get(&id).into_iter().flatten() {
                if !seen.insert(dep.clone()) {
                    continue;
                }
                let name = self.names[dep].clone();
                let mut dep_path = path.clone();
                dep_path.push(name.clone());
                paths.entry(name).or_insert_with(|| dep_path.clone());
                if matches!(reach, Reach::Transitive) {
                    queue.push_back((dep.clone(), dep_path));
                }
            }
        }
        paths
    }
}

/// The names of the packages `krate`'s own normal build compiles (its features alone,
/// all of them on).
fn own_build(krate: &str) -> BTreeSet<String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(&cargo)
        .current_dir(&root)
        .args(["tree", "-p", krate, "-e", "normal", "--all-features"])
        .args(["--prefix", "none", "--format", "{p}"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} tree: {e}"));
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn str_of(v: &Value) -> String {
    v.as_str().expect("a string").to_owned()
}

#[test]
fn crates_depend_only_on_what_their_layer_allows() {
    let graph = Graph::read(&metadata());
    let mut broken = Vec::new();
    for rule in RULES {
        let reached = graph.reached(rule.krate, rule.reach);
        let own = matches!(rule.reach, Reach::Transitive).then(|| own_build(rule.krate));
        for forbidden in rule.forbidden {
            let in_own_build = own.as_ref().is_none_or(|own| own.contains(*forbidden));
            if let Some(path) = reached.get(*forbidden)
                && in_own_build
            {
                broken.push(format!(
                    "{} depends on {forbidden} ({}): {}",
                    rule.krate,
                    path.join(" -> "),
                    rule.why
                ));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "dependencies that break a layer rule (crates/asp-layers/tests/layers.rs):\n  {}",
        broken.join("\n  ")
    );
}
