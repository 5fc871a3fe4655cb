//! asp's data model: node ids, namespaces and keys, hybrid logical clocks, version
//! vectors with gaps, events, and the merge that applies an event to a key's state;
//! the conflict policies' CRDTs ([`crdt`]), set reconciliation ([`reconcile`]) and the
//! sans-IO replication session ([`session`]).
//!
//! This crate does no I/O: no files, no sockets, no clock reads, no threads of its own
//! (the one exception: [`reconcile::Window::build`] may split a cold rebuild over
//! scoped threads, as many as its caller asks for, all joined before it returns). Time
//! is always passed in by the caller, which is what makes deterministic tests and
//! simulation of whole clusters possible. The only byte layouts it defines are values
//! of the data model that must be the same everywhere: a CRDT state and context
//! (stored as an event's value and context), a reconciliation item's hash input and a
//! coded symbol. Framing — the wire, the log, the index, JSON — belongs to
//! `asp-wire`, `asp-store` and `asp-http`; `crates/asp-layers` checks that this crate
//! takes no runtime, I/O or format crate.

mod condition;
pub mod crdt;
mod event;
pub mod gc;
mod hlc;
mod ids;
mod merge;
#[doc(hidden)]
pub mod modes;
pub mod mutation;
pub mod reconcile;
pub mod session;
mod vv;

pub use condition::Condition;
pub use event::{ContentType, Dot, DotParseError, Event, Op, Version};
pub use hlc::{ClockSkewError, Hlc, HlcClock};
pub use ids::{
    KEY_BYTES_MAX, Key, KeyError, NAMESPACE_BYTES_MAX, NameError, Namespace, NodeId, NodeIdError,
};
pub use merge::{LwwRegister, lww_wins};
pub use vv::{RangeSet, VersionVector};
