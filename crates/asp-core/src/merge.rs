//! Merging events into a key's state. Every merge here is a join: commutative,
//! associative and idempotent, so replicas that receive the same events in any order,
//! with any duplicates, end in the same state.

use crate::Version;

/// Whether an incoming event's version replaces the current one under last-writer-wins.
pub fn lww_wins(incoming: &Version, current: &Version) -> bool {
    if crate::mutation::active(crate::mutation::Mutation::LwwTieGoesToArrival) {
        return incoming.hlc.physical_ms() >= current.hlc.physical_ms();
    }
    if crate::mutation::active(crate::mutation::Mutation::LwwFirstWriterWins) {
        return incoming < current;
    }
    incoming > current
}

/// A key's state under the `lww` policy: the version of the winning event and its
/// payload. A delete wins like any write and leaves a tombstone (`value: None`), so a
/// late, older write cannot bring the key back.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LwwRegister<V> {
    pub version: Version,
    pub value: Option<V>,
}

impl<V> LwwRegister<V> {
    /// The join of two states: the one with the higher version.
    pub fn join(self, other: Self) -> Self {
        if lww_wins(&other.version, &self.version) {
            other
        } else {
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dot, Hlc, NodeId};
    use proptest::prelude::*;

    fn register() -> impl Strategy<Value = LwwRegister<u8>> {
        // Narrow ranges make equal clocks and equal origins common.
        (
            0u64..4,
            0u16..3,
            1u64..4,
            1u64..4,
            prop::option::of(any::<u8>()),
        )
            .prop_map(|(ms, logical, origin, counter, value)| LwwRegister {
                version: Version {
                    hlc: Hlc::new(ms, logical),
                    dot: Dot {
                        origin: NodeId::new(origin).unwrap(),
                        counter,
                    },
                },
                value,
            })
    }

    /// Two events with the same dot are the same event; generated data must respect
    /// that, as real events do.
    fn consistent(regs: &[&LwwRegister<u8>]) -> bool {
        regs.iter().all(|a| {
            regs.iter().all(|b| {
                a.version.dot != b.version.dot || (a.version == b.version && a.value == b.value)
            })
        })
    }

    proptest! {
        #[test]
        fn lww_join_is_commutative(a in register(), b in register()) {
            prop_assume!(consistent(&[&a, &b]));
            prop_assert_eq!(a.clone().join(b.clone()), b.join(a));
        }

        #[test]
        fn lww_join_is_associative(a in register(), b in register(), c in register()) {
            prop_assume!(consistent(&[&a, &b, &c]));
            let left = a.clone().join(b.clone()).join(c.clone());
            let right = a.join(b.join(c));
            prop_assert_eq!(left, right);
        }

        #[test]
        fn lww_join_is_idempotent(a in register(), b in register()) {
            prop_assume!(consistent(&[&a, &b]));
            prop_assert_eq!(a.clone().join(a.clone()), a.clone());
            let ab = a.clone().join(b.clone());
            prop_assert_eq!(ab.clone().join(b), ab);
        }

        #[test]
        fn replicas_agree_whatever_the_order_and_duplicates(
            events in prop::collection::vec(register(), 1..12),
            seed in any::<u64>(),
        ) {
            let refs: Vec<_> = events.iter().collect();
            prop_assume!(consistent(&refs));
            // A second replica sees a shuffled copy with every event delivered twice.
            let mut delivery: Vec<_> = events.iter().chain(events.iter()).cloned().collect();
            let mut state = seed;
            for i in (1..delivery.len()).rev() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                delivery.swap(i, (state >> 33) as usize % (i + 1));
            }
            let fold = |evs: Vec<LwwRegister<u8>>| evs.into_iter().reduce(LwwRegister::join).unwrap();
            prop_assert_eq!(fold(events.clone()), fold(delivery));
        }
    }
}
