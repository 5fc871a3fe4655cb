//! Deliberate bugs in the store, switched on per store by a test to prove that the
//! store's tests notice each of them (`tests/mutations.rs`). Only with the cargo
//! feature `mutations`; without it [`StoreConfig::mutation`](crate::StoreConfig) does
//! not exist and every hook (`Shared::mutated`, in the writer) is a constant
//! `false` the compiler removes.

/// A deliberate bug in the store's writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// Local writes are acknowledged before the fsync that makes them durable: a power
    /// cut then takes writes their clients were told are safe.
    AckBeforeFsync,
    /// The feed head moves (for subscribers, peers and `changes`) before the fsync: a
    /// reader can see a position that a power cut then takes away.
    VisibleBeforeDurable,
    /// An event from a peer whose dot the namespace already holds is applied again.
    ForgetDedupe,
}
