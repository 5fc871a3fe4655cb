//! Checks on the shape of the workspace, run with every `cargo test --workspace`; this
//! crate has no code of its own, only tests.
//!
//! - `tests/layers.rs`: each crate's dependencies stay within its layer (docs/
//!   ARCHITECTURE.md, *Invariants*): `asp-core` takes no runtime, I/O, network or
//!   format crate; `asp-wire` no runtime or I/O crate; the `asp` binary none of the
//!   benchmark and test-only crates. It reads `cargo metadata`, so it sees exactly what
//!   cargo builds.
//! - `tests/file_size.rs`: a source file under `crates/*/src/` over 1,000 lines says
//!   why in a `//! Size:` line near its top (docs/ARCHITECTURE.md, *Conventions*).
//!
//! It never runs in a build of the node and is never published.
