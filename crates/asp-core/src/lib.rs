//! asp's data model: node ids, namespaces and keys, hybrid logical clocks, version
//! vectors with gaps, events, and the merge that applies an event to a key's state.
//!
//! This crate does no I/O: no files, no sockets, no threads, no clock reads. Time is
//! always passed in by the caller, which is what makes deterministic tests and
//! simulation of whole clusters possible. It does not know any wire or storage format
//! either: those belong to `asp-wire`, `asp-store` and `asp-http`.

pub mod crdt;
mod event;
mod hlc;
mod ids;
mod merge;
#[doc(hidden)]
pub mod mutation;
pub mod reconcile;
pub mod session;
mod vv;

pub use event::{ContentType, Dot, DotParseError, Event, Op, Version};
pub use hlc::{ClockSkewError, Hlc, HlcClock};
pub use ids::{
    KEY_BYTES_MAX, Key, KeyError, NAMESPACE_BYTES_MAX, NameError, Namespace, NodeId, NodeIdError,
};
pub use merge::{LwwRegister, lww_wins};
pub use vv::{RangeSet, VersionVector};
