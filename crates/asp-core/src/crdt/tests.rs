use super::*;
use crate::Version;
use proptest::prelude::*;

fn node(n: u64) -> NodeId {
    NodeId::new(n).unwrap()
}

/// A replica as a writer sees it: its state and its next dot.
#[derive(Clone)]
struct Replica {
    id: NodeId,
    counter: u64,
    state: State,
}

impl Replica {
    fn new(id: u64, policy: Policy) -> Replica {
        Replica {
            id: node(id),
            counter: 0,
            state: State::empty(policy).unwrap(),
        }
    }

    fn dot(&mut self) -> Dot {
        self.counter += 1;
        Dot {
            origin: self.id,
            counter: self.counter,
        }
    }
}

/// One client operation at one replica, its argument drawn from a small domain so
/// that operations collide.
#[derive(Clone, Debug)]
struct Op {
    replica: usize,
    kind: u8,
    arg: u8,
    /// Siblings: which context the writer holds (0 none, 1 current, 2 an old one).
    token: u8,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        (0usize..3, any::<u8>(), 0u8..4, 0u8..3).prop_map(|(replica, kind, arg, token)| Op {
            replica,
            kind,
            arg,
            token,
        }),
        0..40,
    )
}

/// Runs `ops` as the store would: each computes a delta from its replica's state,
/// joins it there and emits it. Some deltas are delivered to other replicas early
/// (per `early`), so that later operations see partial states, as they do across a
/// network. Returns the replicas and every delta in emission order.
fn run(policy: Policy, ops: &[Op], early: &[bool]) -> (Vec<Replica>, Vec<State>) {
    let mut replicas: Vec<Replica> = (1..=3).map(|i| Replica::new(i, policy)).collect();
    let mut old_contexts: Vec<Context> = vec![Context::default()];
    let mut deltas = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let r = &mut replicas[op.replica];
        let hlc = Hlc::new(i as u64 / 2, 0);
        let dot = r.dot();
        let delta = match (&r.state, op.kind % 2) {
            (State::Counter(c), _) => {
                let amount = i64::from(op.arg) - 1 + i64::from(op.kind % 3) * 5 - 5;
                State::Counter(c.add(r.id, amount).unwrap())
            }
            (State::Set(s), 0) => State::Set(s.add(Bytes::from(vec![op.arg]), dot)),
            (State::Set(s), _) => State::Set(s.remove(&[op.arg], dot)),
            (State::Siblings(m), kind) => {
                let seen = match op.token {
                    0 => Context::default(),
                    1 => m.context().clone(),
                    _ => old_contexts[op.arg as usize % old_contexts.len()].clone(),
                };
                old_contexts.push(m.context().clone());
                let sibling = (kind == 0).then(|| Sibling {
                    hlc,
                    content_type: 0,
                    value: Bytes::from(vec![op.arg]),
                });
                State::Siblings(MvRegister::write(&seen, dot, sibling))
            }
            (State::JsonMap(_), kind) => {
                let value = (kind == 0).then(|| Bytes::from(format!("{}", op.arg)));
                State::JsonMap(JsonMap::patch(
                    Version { hlc, dot },
                    [(format!("f{}", op.arg % 3), value)],
                ))
            }
        };
        r.state.join(&delta).unwrap();
        if early.get(i).copied().unwrap_or(false) {
            let to = (op.replica + 1) % 3;
            replicas[to].state.join(&delta).unwrap();
        }
        deltas.push(delta);
    }
    (replicas, deltas)
}

const CRDTS: [Policy; 4] = [
    Policy::Siblings,
    Policy::Counter,
    Policy::Set,
    Policy::JsonMap,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every replica that receives every delta, in any order and with duplicates,
    /// ends in the same state: the join of all deltas.
    #[test]
    fn replicas_converge_whatever_the_order_and_duplicates(
        ops in ops(),
        early in prop::collection::vec(any::<bool>(), 40),
        orders in prop::collection::vec(prop::collection::vec(0usize..1000, 0..80), 3),
    ) {
        for policy in CRDTS {
            let (replicas, deltas) = run(policy, &ops, &early);
            let mut all = State::empty(policy).unwrap();
            for d in &deltas {
                all.join(d).unwrap();
            }
            for (replica, order) in replicas.into_iter().zip(&orders) {
                let mut state = replica.state;
                // Random extra deliveries (duplicates, any order), then all of them.
                for &i in order {
                    if !deltas.is_empty() {
                        state.join(&deltas[i % deltas.len()]).unwrap();
                    }
                }
                for d in deltas.iter().rev() {
                    state.join(d).unwrap();
                }
                prop_assert_eq!(&state, &all, "{}", policy);
            }
        }
    }

    /// Join is commutative, associative and idempotent on reachable states.
    #[test]
    fn join_is_a_semilattice(
        ops in ops(),
        early in prop::collection::vec(any::<bool>(), 40),
        picks in prop::collection::vec(0usize..1000, 3),
    ) {
        for policy in CRDTS {
            let (replicas, deltas) = run(policy, &ops, &early);
            let mut states: Vec<State> = replicas.into_iter().map(|r| r.state).collect();
            states.extend(deltas);
            let pick = |i: usize| states[picks[i] % states.len()].clone();
            let (a, b, c) = (pick(0), pick(1), pick(2));
            let join = |x: &State, y: &State| {
                let mut z = x.clone();
                z.join(y).unwrap();
                z
            };
            prop_assert_eq!(join(&a, &b), join(&b, &a), "commutative, {}", policy);
            prop_assert_eq!(join(&join(&a, &b), &c), join(&a, &join(&b, &c)), "associative, {}", policy);
            prop_assert_eq!(join(&a, &a), a.clone(), "idempotent, {}", policy);
        }
    }

    /// Every reachable state survives encoding; arbitrary bytes never panic.
    #[test]
    fn encoding_round_trips_and_garbage_is_refused(
        ops in ops(),
        early in prop::collection::vec(any::<bool>(), 40),
        garbage in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        for policy in CRDTS {
            let (replicas, deltas) = run(policy, &ops, &early);
            for s in replicas.into_iter().map(|r| r.state).chain(deltas) {
                let bytes = s.encode();
                prop_assert_eq!(State::decode(&bytes).unwrap(), s);
                for cut in [0, bytes.len() / 2, bytes.len() - 1] {
                    prop_assert!(State::decode(&bytes[..cut]).is_err());
                }
            }
        }
        let _ = State::decode(&garbage);
    }

    /// The decoders behind the fuzz target `crdt_state`, in every CI run: arbitrary
    /// bytes after each policy tag (so that the decoder gets past the first byte)
    /// never panic, and whatever decodes survives encoding.
    #[test]
    fn crdt_decoders_never_panic(tag in 0u8..6, body in prop::collection::vec(any::<u8>(), 0..300)) {
        let bytes = [vec![tag], body.clone()].concat();
        for input in [&bytes[..], &body[..]] {
            if let Ok(state) = State::decode(input) {
                prop_assert_eq!(State::decode(&state.encode()).unwrap(), state);
            }
            if let Ok(context) = decode_context(input) {
                prop_assert_eq!(decode_context(&encode_context(&context)).unwrap(), context);
            }
        }
    }
}

#[test]
fn a_thousand_increments_over_three_replicas_sum_exactly() {
    let mut replicas: Vec<Replica> = (1..=3).map(|i| Replica::new(i, Policy::Counter)).collect();
    let mut deltas = Vec::new();
    let mut expected = 0i128;
    for i in 0..1000u64 {
        let r = &mut replicas[(i % 3) as usize];
        let amount = if i % 7 == 0 { -3 } else { 2 };
        expected += amount as i128;
        let State::Counter(c) = &r.state else {
            unreachable!()
        };
        let delta = State::Counter(c.add(r.id, amount).unwrap());
        r.state.join(&delta).unwrap();
        deltas.push(delta);
    }
    for r in &mut replicas {
        for d in deltas.iter().rev() {
            r.state.join(d).unwrap();
        }
        let State::Counter(c) = &r.state else {
            unreachable!()
        };
        assert_eq!(c.value(), expected);
    }
}

#[test]
fn a_concurrent_add_wins_over_a_remove() {
    let mut a = OrSet::default();
    let add = a.add(
        Bytes::from_static(b"x"),
        Dot {
            origin: node(1),
            counter: 1,
        },
    );
    a.join(&add);
    let mut b = a.clone();
    // A removes x while B, having seen the first add, adds it again.
    let remove = a.remove(
        b"x",
        Dot {
            origin: node(1),
            counter: 2,
        },
    );
    let readd = b.add(
        Bytes::from_static(b"x"),
        Dot {
            origin: node(2),
            counter: 1,
        },
    );
    a.join(&remove);
    b.join(&readd);
    assert!(!a.contains(b"x") && b.contains(b"x"));
    a.join(&readd);
    b.join(&remove);
    assert_eq!(a, b);
    assert!(a.contains(b"x"), "the concurrent add wins");
    // A remove that saw the re-add removes it for good.
    let remove = a.remove(
        b"x",
        Dot {
            origin: node(1),
            counter: 3,
        },
    );
    a.join(&remove);
    b.join(&remove);
    assert!(!a.contains(b"x") && !b.contains(b"x"));
}

#[test]
fn a_write_with_a_token_replaces_exactly_what_it_saw() {
    let s = |v: &'static [u8], ms| {
        Some(Sibling {
            hlc: Hlc::new(ms, 0),
            content_type: 0,
            value: Bytes::from_static(v),
        })
    };
    let dot = |o, c| Dot {
        origin: node(o),
        counter: c,
    };
    let mut a = MvRegister::default();
    // Two writes without a token: two siblings.
    a.join(&MvRegister::write(
        &Context::default(),
        dot(1, 1),
        s(b"one", 1),
    ));
    let concurrent = MvRegister::write(&Context::default(), dot(2, 1), s(b"two", 1));
    a.join(&concurrent);
    assert_eq!(a.siblings().len(), 2);
    // A reader sees both; meanwhile a third write arrives; the reader's write
    // replaces the two it saw and leaves the third.
    let token = a.context().clone();
    let third = MvRegister::write(&Context::default(), dot(3, 1), s(b"three", 2));
    a.join(&third);
    a.join(&MvRegister::write(&token, dot(1, 2), s(b"merged", 3)));
    let values: Vec<&[u8]> = a.siblings().iter().map(|(_, s)| &s.value[..]).collect();
    assert_eq!(values, vec![&b"three"[..], &b"merged"[..]]);
    // A delete with the current token leaves nothing, and a late copy of an old
    // write does not come back.
    let token = a.context().clone();
    a.join(&MvRegister::write(&token, dot(2, 2), None));
    a.join(&concurrent);
    assert!(a.siblings().is_empty());
}

#[test]
fn json_map_fields_merge_by_version_and_removals_stick() {
    let v = |ms, o| Version {
        hlc: Hlc::new(ms, 0),
        dot: Dot {
            origin: node(o),
            counter: ms,
        },
    };
    let b = |s: &'static str| Some(Bytes::from_static(s.as_bytes()));
    let mut m = JsonMap::default();
    m.join(&JsonMap::patch(
        v(1, 1),
        [("a".into(), b("1")), ("b".into(), b("2"))],
    ));
    m.join(&JsonMap::patch(v(3, 2), [("a".into(), None)]));
    // Older writes to a removed or newer field lose; other fields merge.
    m.join(&JsonMap::patch(
        v(2, 1),
        [("a".into(), b("9")), ("c".into(), b("3"))],
    ));
    let fields: Vec<(&str, &[u8])> = m.fields().map(|(k, v)| (k, &v[..])).collect();
    assert_eq!(fields, vec![("b", &b"2"[..]), ("c", &b"3"[..])]);
    assert_eq!(m.get("a"), None);
}

#[test]
fn joining_states_of_different_policies_is_refused() {
    let mut a = State::empty(Policy::Counter).unwrap();
    let b = State::empty(Policy::Set).unwrap();
    assert_eq!(
        a.join(&b),
        Err(CrdtError::Mismatch(Policy::Counter, Policy::Set))
    );
    assert_eq!(State::empty(Policy::Lww), None);
    for p in Policy::ALL {
        assert_eq!(Policy::parse(p.name()), Some(p));
    }
    assert_eq!(Policy::parse("LWW"), None);
}

#[test]
fn counter_overflow_is_refused() {
    let c = PnCounter::default();
    let mut s = c.clone();
    s.join(&c.add(node(1), i64::MAX).unwrap());
    s.join(&s.add(node(1), i64::MAX).unwrap());
    s.join(&s.add(node(1), 1).unwrap());
    assert!(matches!(s.add(node(1), 1), Err(CrdtError::Overflow(_))));
    assert_eq!(s.value(), u64::MAX as i128);
}
