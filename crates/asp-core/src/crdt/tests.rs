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
    let replicas: Vec<Replica> = (1..=3).map(|i| Replica::new(i, policy)).collect();
    run_from(replicas, 0, ops, early)
}

/// [`run`] from the given replicas, clock readings starting at `ms`.
fn run_from(
    mut replicas: Vec<Replica>,
    ms: u64,
    ops: &[Op],
    early: &[bool],
) -> (Vec<Replica>, Vec<State>) {
    let mut old_contexts: Vec<Context> = vec![Context::default()];
    let mut deltas = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let r = &mut replicas[op.replica];
        let hlc = Hlc::new(ms + i as u64 / 2, 0);
        let dot = r.dot();
        let delta = match (&r.state, op.kind % 2) {
            // Now and then an observed reset among the increments.
            (State::Counter(c), _) if op.kind % 7 == 0 => State::Counter(c.reset()),
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
            (State::JsonMap(m), _) => {
                // A path one to three deep over two names, so that writes collide at
                // every depth: a value, an object or a removal; now and then with a
                // value at a sibling path in the same patch.
                let depth = 1 + usize::from(op.kind / 2 % 3);
                let path: Vec<String> = (0..depth)
                    .map(|i| ["a", "b"][usize::from(op.kind >> (3 + i)) & 1].to_owned())
                    .collect();
                let change = match (op.kind % 2, op.token) {
                    (0, _) => Change::Set(Bytes::from(format!("{}", op.arg))),
                    (_, 0) => Change::Object,
                    _ => Change::Remove,
                };
                let mut changes = vec![(path.clone(), change)];
                if op.token == 2 {
                    let mut sibling = path;
                    *sibling.last_mut().expect("non-empty") = "c".to_owned();
                    changes.push((sibling, Change::Set(Bytes::from_static(b"[]"))));
                }
                State::JsonMap(m.patch(Version { hlc, dot }, changes))
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
        flip in (any::<usize>(), 1u8..=255),
    ) {
        for policy in CRDTS {
            let (replicas, deltas) = run(policy, &ops, &early);
            for s in replicas.into_iter().map(|r| r.state).chain(deltas) {
                let bytes = s.encode();
                prop_assert_eq!(State::decode(&bytes).unwrap(), s);
                for cut in [0, bytes.len() / 2, bytes.len() - 1] {
                    prop_assert!(State::decode(&bytes[..cut]).is_err());
                }
                // A damaged byte anywhere: refused or read, never a panic, and what is
                // read survives encoding (reaches the json-map decoders' later checks,
                // which garbage stops short of).
                let mut damaged = bytes.clone();
                let at = flip.0 % damaged.len();
                damaged[at] ^= flip.1;
                if let Ok(state) = State::decode(&damaged) {
                    prop_assert_eq!(State::decode(&state.encode()).unwrap(), state);
                }
            }
        }
        let _ = State::decode(&garbage);
    }

    /// Pruning a state that every replica holds changes no read, now or later:
    /// replicas that prune it and replicas that do not write on, hear every later
    /// delta, the old unpruned state again (another node's entry) and every delta
    /// it was made of (old entries a node that lost the pruned ones still holds),
    /// and read the same as replicas that never pruned. (The store prunes only under the
    /// collection rule, which makes "every replica holds it" true: see
    /// `pruning_before_every_replica_holds_a_removal_brings_a_value_back`.)
    #[test]
    fn pruning_a_state_every_replica_holds_changes_no_read(
        before in ops(),
        after in ops(),
        early in prop::collection::vec(any::<bool>(), 40),
        prune in prop::collection::vec(any::<bool>(), 3),
    ) {
        for policy in CRDTS {
            let (replicas, deltas) = run(policy, &before, &early);
            let mut all = State::empty(policy).unwrap();
            for d in &deltas {
                all.join(d).unwrap();
            }
            // Each replica's newest dot: its state holds all of its writes.
            let dots: Vec<Dot> = replicas
                .iter()
                .filter(|r| r.counter > 0)
                .map(|r| Dot { origin: r.id, counter: r.counter })
                .collect();
            let pruned_all = all.pruned(dots.iter().copied());
            prop_assert_eq!(read(&pruned_all), read(&all), "{}", policy);
            let held: Vec<Replica> = replicas
                .into_iter()
                .map(|r| Replica { state: all.clone(), ..r })
                .collect();
            let some_pruned: Vec<Replica> = held
                .iter()
                .zip(&prune)
                .map(|(r, &p)| Replica {
                    state: if p { pruned_all.clone() } else { r.state.clone() },
                    ..r.clone()
                })
                .collect();
            // Later clock readings: every later write was made after its node held
            // everything before.
            let ms = before.len() as u64;
            let (plain, plain_deltas) = run_from(held, ms, &after, &early);
            let (pruned, pruned_deltas) = run_from(some_pruned, ms, &after, &early);
            for (p, q) in plain.into_iter().zip(pruned) {
                let (mut x, mut y) = (p.state, q.state);
                for d in &plain_deltas {
                    x.join(d).unwrap();
                }
                for d in &pruned_deltas {
                    y.join(d).unwrap();
                }
                for d in &deltas {
                    y.join(d).unwrap();
                    prop_assert_eq!(read(&y), read(&x), "{} after an old entry", policy);
                }
                y.join(&all).unwrap();
                prop_assert_eq!(read(&y), read(&x), "{}", policy);
            }
        }
    }

    /// The decoders behind the fuzz target `crdt_state`, in every CI run: arbitrary
    /// bytes after each policy tag (so that the decoder gets past the first byte)
    /// never panic, and whatever decodes survives encoding.
    #[test]
    fn crdt_decoders_never_panic(tag in 0u8..8, body in prop::collection::vec(any::<u8>(), 0..300)) {
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

/// A version at `ms` milliseconds from origin `o` (counter `ms`: unique per origin in
/// these tests).
/// What a read shows of a state: a json-map's document, any other state whole.
fn read(state: &State) -> String {
    match state {
        State::JsonMap(m) => doc(m),
        other => format!("{other:?}"),
    }
}

/// Why the store prunes only states every node holds: a node that pruned a removal
/// before another node held it would let that node's concurrent write to the same
/// path, older by the clock, back (it lost to the removal, which is gone).
#[test]
fn pruning_before_every_replica_holds_a_removal_brings_a_value_back() {
    let set = JsonMap::default().patch(jv(1, 1), changes(&[("a", "1"), ("b", "2")]));
    let mut at_a = joined(&[&set]);
    at_a.join(&at_a.patch(jv(5, 1), changes(&[("a", "-")])));
    assert_eq!(doc(&at_a), r#"{"b":2}"#);
    // B wrote `a` meanwhile, with an older clock reading: the removal wins.
    let at_b = joined(&[&set]).patch(jv(3, 2), changes(&[("a", "9")]));
    assert_eq!(doc(&joined(&[&at_b, &at_a])), r#"{"b":2}"#);
    // Pruned before A held B's write, the removal is gone, and B's `a` is back.
    let pruned = at_a.pruned([jv(5, 1).dot]);
    assert_eq!(doc(&pruned), r#"{"b":2}"#);
    assert_eq!(doc(&joined(&[&at_b, &pruned])), r#"{"a":9,"b":2}"#);
    // What the pruned state dropped stays taken, wherever an old copy comes from:
    // the first patch again, or A's state before the removal.
    assert_eq!(doc(&joined(&[&set, &pruned])), r#"{"b":2}"#);
    // Once every node holds B's write, pruning the join changes nothing.
    let all = joined(&[&at_a, &at_b]);
    let pruned = all.pruned([jv(5, 1).dot, jv(3, 2).dot]);
    for old in [&set, &at_a, &at_b, &all] {
        assert_eq!(doc(&joined(&[old, &pruned])), r#"{"b":2}"#);
    }
}

/// A register kept by one pruning and dropped by a later one (it was removed in
/// between) stays gone when an old copy of the first pruning's state comes back: its
/// pin is of the older floor.
#[test]
fn a_pin_holds_only_for_the_floor_it_was_made_under() {
    let m = JsonMap::default().patch(jv(1, 1), changes(&[("a", "1"), ("b", "2")]));
    let first = m.pruned([jv(1, 1).dot]);
    let mut later = first.clone();
    later.join(&first.patch(jv(2, 2), changes(&[("a", "-")])));
    assert_eq!(doc(&later), r#"{"b":2}"#);
    let second = later.pruned([jv(1, 1).dot, jv(2, 2).dot]);
    assert_eq!(doc(&second), r#"{"b":2}"#);
    assert_eq!(doc(&joined(&[&second, &first])), r#"{"b":2}"#);
    assert_eq!(doc(&joined(&[&second, &first, &m])), r#"{"b":2}"#);
}

/// What a pruned map keeps: the registers of the paths it shows, and a floor.
#[test]
fn a_pruned_map_keeps_only_what_it_shows() {
    let mut m = JsonMap::default().patch(
        jv(1, 1),
        changes(&[("p.x", "1"), ("p.y", "2"), ("q", "3"), ("r.s.t", "4")]),
    );
    m.join(&m.patch(jv(2, 2), changes(&[("p.x", "-"), ("q", "-"), ("r.s", "5")])));
    let pruned = m.pruned([jv(1, 1).dot, jv(2, 2).dot]);
    assert_eq!(doc(&pruned), doc(&m));
    assert_eq!(doc(&m), r#"{"p":{"y":2},"r":{"s":5}}"#);
    let kept: Vec<&[String]> = pruned.paths().collect();
    assert_eq!(kept.len(), 4, "p, p.y, r, r.s: {kept:?}");
    let bytes = State::JsonMap(pruned.clone()).encode();
    assert_eq!(bytes[0], 7);
    assert_eq!(
        State::decode(&bytes).unwrap(),
        State::JsonMap(pruned.clone())
    );
    // A later write under a pruned path, from a node that had seen it all, shows.
    let later = m.patch(jv(3, 2), changes(&[("q", "6"), ("p.x", "7")]));
    assert_eq!(
        doc(&joined(&[&pruned, &later])),
        r#"{"p":{"x":7,"y":2},"q":6,"r":{"s":5}}"#
    );
    // Pruned twice, or joined with an unpruned copy, the same.
    assert_eq!(pruned.pruned([]), pruned);
    assert_eq!(doc(&joined(&[&pruned, &m])), doc(&m));
}

fn jv(ms: u64, o: u64) -> Version {
    Version {
        hlc: Hlc::new(ms, 0),
        dot: Dot {
            origin: node(o),
            counter: ms,
        },
    }
}

/// A change list from `("a.b", "1")` (set), `("a", "{}")` (object), `("a", "-")`
/// (remove).
fn changes(spec: &[(&str, &str)]) -> Vec<(Vec<String>, Change)> {
    spec.iter()
        .map(|(path, change)| {
            let path = path.split('.').map(str::to_owned).collect();
            let change = match *change {
                "{}" => Change::Object,
                "-" => Change::Remove,
                text => Change::Set(Bytes::copy_from_slice(text.as_bytes())),
            };
            (path, change)
        })
        .collect()
}

/// The document a read shows, as compact JSON text (fields in name order).
fn doc(m: &JsonMap) -> String {
    fn object(m: &JsonMap, prefix: &[String]) -> String {
        let fields: Vec<String> = m
            .shown()
            .filter(|(path, _)| path.len() == prefix.len() + 1 && path.starts_with(prefix))
            .map(|(path, shown)| {
                let name = path.last().expect("non-empty");
                match shown {
                    Shown::Value(text) => {
                        format!("{name:?}:{}", std::str::from_utf8(text).unwrap())
                    }
                    Shown::Object => format!("{name:?}:{}", object(m, path)),
                }
            })
            .collect();
        format!("{{{}}}", fields.join(","))
    }
    object(m, &[])
}

/// The join of `deltas`, checked to be the same in both orders.
fn joined(deltas: &[&JsonMap]) -> JsonMap {
    let mut forward = JsonMap::default();
    let mut backward = JsonMap::default();
    for d in deltas {
        forward.join(d);
    }
    for d in deltas.iter().rev() {
        backward.join(d);
    }
    assert_eq!(forward, backward, "join commutes");
    forward
}

#[test]
fn json_map_top_level_fields_merge_by_version_and_removals_stick() {
    let mut m = JsonMap::default();
    m.join(&JsonMap::default().patch(jv(1, 1), changes(&[("a", "1"), ("b", "2")])));
    m.join(&JsonMap::default().patch(jv(3, 2), changes(&[("a", "-")])));
    // Older writes to a removed or newer field lose; other fields merge.
    m.join(&JsonMap::default().patch(jv(2, 1), changes(&[("a", "9"), ("c", "3")])));
    assert_eq!(doc(&m), r#"{"b":2,"c":3}"#);
    assert_eq!(m.shown_at(&["a".to_owned()]), None);
}

/// Guards against issue 18: two nodes cut off from each other patched different
/// fields of one nested object, and after healing one side's field was gone.
#[test]
fn json_map_nested_objects_merge_per_path() {
    let ada = JsonMap::default().patch(
        jv(1, 1),
        changes(&[("name", r#""Ada""#), ("langs", "{}"), ("langs.en", "true")]),
    );
    let born = JsonMap::default().patch(
        jv(1, 2),
        changes(&[("born", "1815"), ("langs", "{}"), ("langs.fr", "true")]),
    );
    let m = joined(&[&ada, &born]);
    assert_eq!(
        doc(&m),
        r#"{"born":1815,"langs":{"en":true,"fr":true},"name":"Ada"}"#
    );
    // Three deep, with the ancestors implied by the patch.
    let deep = JsonMap::default().patch(jv(2, 1), changes(&[("langs.de.dialects", "[1,2]")]));
    let other = JsonMap::default().patch(jv(2, 2), changes(&[("langs.de.native", "false")]));
    let m = joined(&[&m, &deep, &other]);
    assert_eq!(
        doc(&m),
        r#"{"born":1815,"langs":{"de":{"dialects":[1,2],"native":false},"en":true,"fr":true},"name":"Ada"}"#
    );
}

/// Concurrent "remove the parent" and "set a child": the child stays (add-wins),
/// whatever the clocks say, and the parent shows as an object holding it; what the
/// removal saw below the parent is gone. At every depth.
#[test]
fn json_map_remove_parent_against_set_child_keeps_the_child() {
    let base = JsonMap::default().patch(
        jv(1, 1),
        changes(&[("p.old", "1"), ("p.keep", "2"), ("q", "3")]),
    );
    // Both made on `base`, neither seeing the other: in both clock orders.
    for (remove_at, set_at) in [(5, 4), (4, 5)] {
        let remove = base.patch(jv(remove_at, 1), changes(&[("p", "-")]));
        let set = base.patch(jv(set_at, 2), changes(&[("p.new", "4")]));
        let m = joined(&[&base, &remove, &set]);
        assert_eq!(doc(&m), r#"{"p":{"new":4},"q":3}"#, "remove at {remove_at}");
        // The same two writes one level deeper, on that state.
        for (remove_at, set_at) in [(7, 6), (6, 7)] {
            let remove = m.patch(jv(remove_at, 1), changes(&[("p.new", "-")]));
            let set = m.patch(jv(set_at, 2), changes(&[("p.new.x", "5")]));
            assert_eq!(
                doc(&joined(&[&m, &remove, &set])),
                r#"{"p":{"new":{"x":5}},"q":3}"#
            );
        }
    }
    // A removal that saw the child takes it.
    let set = base.patch(jv(6, 2), changes(&[("p.new", "4")]));
    let seen = joined(&[&base, &set]);
    let remove = seen.patch(jv(7, 1), changes(&[("p", "-")]));
    assert_eq!(doc(&joined(&[&seen, &remove])), r#"{"q":3}"#);
    // What it saw of an origin covers that origin's earlier writes too, even when
    // they arrive after it: they happened before the write it saw.
    let early = base.patch(jv(2, 2), changes(&[("p.early", "0")]));
    let mut m = joined(&[&seen, &remove]);
    m.join(&early);
    assert_eq!(doc(&m), r#"{"q":3}"#);
}

/// Concurrent "set the parent to a value" and "set a child": the child stays and the
/// parent is an object, as against a removal. One after the other, the later write
/// replaces what it saw.
#[test]
fn json_map_value_over_object_against_set_child_keeps_the_child() {
    let base = JsonMap::default().patch(jv(1, 1), changes(&[("p.old", "1")]));
    for (scalar_at, set_at) in [(5, 4), (4, 5)] {
        let scalar = base.patch(jv(scalar_at, 1), changes(&[("p", "[0]")]));
        let set = base.patch(jv(set_at, 2), changes(&[("p.new", "2")]));
        assert_eq!(doc(&joined(&[&base, &scalar, &set])), r#"{"p":{"new":2}}"#);
    }
    let scalar = base.patch(jv(4, 1), changes(&[("p", "[0]")]));
    let m = joined(&[&base, &scalar]);
    assert_eq!(doc(&m), r#"{"p":[0]}"#);
    let set = m.patch(jv(5, 2), changes(&[("p.new", "2")]));
    let m = joined(&[&m, &set]);
    assert_eq!(doc(&m), r#"{"p":{"new":2}}"#);
    // Making a path an object keeps its fields when it is one already, and makes it
    // `{}` when it held a value.
    let object = m.patch(jv(6, 1), changes(&[("p", "{}")]));
    assert_eq!(doc(&joined(&[&m, &object])), r#"{"p":{"new":2}}"#);
    let valued = joined(&[&base, &scalar]);
    let object = valued.patch(jv(6, 1), changes(&[("p", "{}")]));
    assert_eq!(doc(&joined(&[&valued, &object])), r#"{"p":{}}"#);
    // At one path, concurrent writes are last-writer-wins.
    let one = base.patch(jv(7, 1), changes(&[("p.old", "7")]));
    let two = base.patch(jv(8, 2), changes(&[("p.old", "8")]));
    assert_eq!(doc(&joined(&[&base, &one, &two])), r#"{"p":{"old":8}}"#);
}

/// `shown_at` says what `shown` shows, at every path of states of every kind.
#[test]
fn json_map_shown_at_agrees_with_shown() {
    let base = JsonMap::default().patch(
        jv(1, 1),
        changes(&[("p.a.x", "1"), ("p.b", "2"), ("q", "3"), ("r.s", "{}")]),
    );
    let remove = base.patch(jv(5, 1), changes(&[("p", "-"), ("q", "-")]));
    let set = base.patch(jv(4, 2), changes(&[("p.a.y", "4")]));
    let scalar = base.patch(jv(6, 3), changes(&[("r", "9")]));
    for m in [
        base.clone(),
        joined(&[&base, &remove]),
        joined(&[&base, &remove, &set]),
        joined(&[&base, &remove, &set, &scalar]),
    ] {
        let shown: Vec<_> = m.shown().map(|(p, s)| (p.to_vec(), s)).collect();
        for path in m.paths() {
            let want = shown.iter().find(|(p, _)| p == path).map(|(_, s)| *s);
            assert_eq!(m.shown_at(path), want, "{path:?} of {}", doc(&m));
        }
    }
}

/// The layout of the release before nesting (tag 4): top-level fields with a version,
/// set (1 and the JSON text) or removed (0).
fn fields_layout(fields: &[(&str, Version, Option<&str>)]) -> Vec<u8> {
    let mut out = vec![4];
    put_u32(&mut out, fields.len());
    for (name, version, value) in fields {
        put_bytes(&mut out, name.as_bytes());
        out.extend_from_slice(&version.hlc.as_raw().to_le_bytes());
        put_dot(&mut out, version.dot);
        match value {
            Some(v) => {
                out.push(1);
                put_bytes(&mut out, v.as_bytes());
            }
            None => out.push(0),
        }
    }
    out
}

/// States written before nesting read the same, join as they did, and are written
/// back byte for byte: a peer of that release still reads them.
#[test]
fn json_map_states_of_the_fields_layout_read_and_join_as_before() {
    let a = fields_layout(&[
        ("langs", jv(2, 1), Some(r#"{"en":true}"#)),
        ("name", jv(1, 1), Some(r#""Ada""#)),
        ("x", jv(3, 1), None),
    ]);
    let b = fields_layout(&[
        ("langs", jv(3, 2), Some(r#"{"fr":true}"#)),
        ("name", jv(1, 2), None),
        ("x", jv(2, 2), Some("1")),
    ]);
    let (State::JsonMap(sa), State::JsonMap(sb)) =
        (State::decode(&a).unwrap(), State::decode(&b).unwrap())
    else {
        panic!("json-map states")
    };
    assert_eq!(State::JsonMap(sa.clone()).encode(), a);
    assert_eq!(State::JsonMap(sb.clone()).encode(), b);
    assert_eq!(doc(&sa), r#"{"langs":{"en":true},"name":"Ada"}"#);
    // Per field, the newer version: what the per-field join gave.
    let m = joined(&[&sa, &sb]);
    assert_eq!(
        State::JsonMap(m.clone()).encode(),
        fields_layout(&[
            ("langs", jv(3, 2), Some(r#"{"fr":true}"#)),
            ("name", jv(1, 2), None),
            ("x", jv(3, 1), None),
        ])
    );
    // An old top-level object is a value whole (the HTTP layer writes its fields out
    // when a patch descends into it).
    assert_eq!(
        m.shown_at(&["langs".to_owned()]),
        Some(Shown::Value(&Bytes::from_static(br#"{"fr":true}"#)))
    );
}

#[test]
fn json_map_writes_the_oldest_layout_that_holds_the_state() {
    let tag = |m: &JsonMap| State::JsonMap(m.clone()).encode()[0];
    let fields = State::decode(&fields_layout(&[("a", jv(1, 1), Some("1"))])).unwrap();
    let State::JsonMap(fields) = fields else {
        panic!("a json-map")
    };
    assert_eq!(tag(&fields), 4);
    // A new write records what it saw (here nothing): tag 5 says it.
    let flat = JsonMap::default().patch(jv(1, 1), changes(&[("a", "1"), ("b", "-")]));
    assert_eq!(tag(&flat), 5);
    let nested = JsonMap::default().patch(jv(2, 1), changes(&[("c.d", "1")]));
    assert_eq!(tag(&nested), 5);
    // Written over, what the write saw is recorded: tag 7. The nested paths stay (as
    // what was taken).
    let mut m = joined(&[&flat, &nested]);
    m.join(&m.patch(jv(3, 1), changes(&[("c", "2")])));
    assert_eq!(doc(&m), r#"{"a":1,"c":2}"#);
    assert_eq!(tag(&m), 7);
    let mut with_fields = m.clone();
    with_fields.join(&fields);
    for state in [fields, flat, nested, m, with_fields] {
        let state = State::JsonMap(state);
        assert_eq!(State::decode(&state.encode()).unwrap(), state);
    }
    // A top-level value without a cut is what a writer makes now; in tag 5, as a
    // peer of the release before may send it, it reads the same and stays tag 5.
    let mut no_cut = vec![5];
    put_u32(&mut no_cut, 1);
    no_cut.push(1);
    put_bytes(&mut no_cut, b"a");
    no_cut.extend_from_slice(&jv(1, 1).hlc.as_raw().to_le_bytes());
    put_dot(&mut no_cut, jv(1, 1).dot);
    no_cut.push(1);
    put_bytes(&mut no_cut, b"1");
    no_cut.push(0);
    assert_eq!(State::decode(&no_cut).unwrap().encode(), no_cut);
}

/// A cut written before writes recorded what they saw (tag 5) keeps taking what it
/// took: every write below its path up to its version, whatever its origin.
#[test]
fn json_map_cuts_of_the_paths_layout_apply_as_before() {
    let mut old = vec![5];
    put_u32(&mut old, 2);
    for (name, kind, cut) in [("p", 0u8, true), ("q", 2, false)] {
        old.push(1);
        put_bytes(&mut old, name.as_bytes());
        old.extend_from_slice(&jv(5, 1).hlc.as_raw().to_le_bytes());
        put_dot(&mut old, jv(5, 1).dot);
        old.push(kind);
        if cut {
            old.push(1);
            old.extend_from_slice(&jv(5, 1).hlc.as_raw().to_le_bytes());
            put_dot(&mut old, jv(5, 1).dot);
        } else {
            old.push(0);
        }
    }
    let State::JsonMap(old) = State::decode(&old).unwrap() else {
        panic!("a json-map")
    };
    assert_eq!(doc(&old), r#"{"q":{}}"#);
    // A write below `p` from another origin, older than the cut: taken.
    let late = JsonMap::default().patch(jv(4, 2), changes(&[("p.x", "1")]));
    assert_eq!(doc(&joined(&[&old, &late])), r#"{"q":{}}"#);
    let later = JsonMap::default().patch(jv(6, 2), changes(&[("p.x", "1")]));
    assert_eq!(doc(&joined(&[&old, &later])), r#"{"p":{"x":1},"q":{}}"#);
}

/// What a tag-7 decoder refuses: origins seen out of order, paths out of order.
#[test]
fn json_map_seen_layout_refuses_what_no_writer_writes() {
    let path = |out: &mut Vec<u8>, name: &[u8], seen: &[(u64, u64)]| {
        out.push(1);
        put_bytes(out, name);
        out.extend_from_slice(&jv(5, 1).hlc.as_raw().to_le_bytes());
        put_dot(out, jv(5, 1).dot);
        out.extend_from_slice(&[0, 0]);
        put_u32(out, seen.len());
        for &(o, c) in seen {
            put_dot(
                out,
                Dot {
                    origin: node(o),
                    counter: c,
                },
            );
        }
        out.extend_from_slice(&0u64.to_le_bytes());
    };
    type Path<'a> = (&'a [u8], &'a [(u64, u64)]);
    let state = |paths: &[Path<'_>]| {
        let mut out = vec![7];
        put_u32(&mut out, paths.len());
        for (name, seen) in paths {
            path(&mut out, name, seen);
        }
        put_u32(&mut out, 0);
        out
    };
    let good = state(&[(b"a", &[(1, 3), (2, 1)]), (b"b", &[])]);
    assert_eq!(State::decode(&good).unwrap().encode(), good);
    for (bad, why) in [
        (
            state(&[(b"a", &[(2, 3), (1, 1)])]),
            "origins seen out of order",
        ),
        (
            state(&[(b"a", &[(2, 3), (2, 4)])]),
            "origins seen out of order",
        ),
        (
            state(&[(b"b", &[(1, 1)]), (b"a", &[])]),
            "paths out of order",
        ),
        (state(&[(b"a", &[(1, 0)])]), "counter"),
    ] {
        let err = State::decode(&bad).unwrap_err().to_string();
        assert!(err.contains(why), "{err}");
    }
}

#[test]
fn json_map_paths_too_deep_or_empty_are_refused_when_decoded() {
    let state = |depth: u8| {
        let mut out = vec![5];
        put_u32(&mut out, 1);
        out.push(depth);
        for _ in 0..depth {
            put_bytes(&mut out, b"a");
        }
        out.extend_from_slice(&jv(1, 1).hlc.as_raw().to_le_bytes());
        put_dot(&mut out, jv(1, 1).dot);
        out.extend_from_slice(&[2, 0]);
        if depth == 0 {
            // What a name would have taken, so that the count fits.
            out.extend_from_slice(&[0; 4]);
        }
        out
    };
    assert!(State::decode(&state(PATH_DEPTH_MAX as u8)).is_ok());
    for depth in [0, PATH_DEPTH_MAX as u8 + 1] {
        let err = State::decode(&state(depth)).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("a path of {depth} fields")),
            "{err}"
        );
    }
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

#[test]
fn a_reset_takes_back_what_it_saw_and_a_concurrent_increment_stays() {
    let (a, b) = (node(1), node(2));
    let mut at_a = PnCounter::default();
    at_a.join(&at_a.add(a, 10).unwrap());
    let mut at_b = at_a.clone();
    at_b.join(&at_b.add(b, -3).unwrap());
    // B resets having seen A's 10 and its own -3; A adds 5 meanwhile, unseen by B.
    let reset = at_b.reset();
    let incr = at_a.add(a, 5).unwrap();
    at_b.join(&reset);
    assert_eq!(at_b.value(), 0);
    at_a.join(&incr);
    for (x, y) in [(&reset, &incr), (&incr, &reset)] {
        let mut c = PnCounter::default();
        c.join(x);
        c.join(y);
        c.join(&at_b);
        c.join(&at_a);
        assert_eq!(
            c.value(),
            5,
            "only the increment the reset had not seen counts"
        );
    }
    // A counter never reset keeps the first layout (tag 2); one with bases is tag 6
    // and round-trips; a base above its total is refused.
    let plain = State::Counter(at_a.clone());
    assert_eq!(plain.encode()[0], 2);
    let mut joined = at_a.clone();
    joined.join(&reset);
    let with_bases = State::Counter(joined);
    let bytes = with_bases.encode();
    assert_eq!(bytes[0], COUNTER_RESET_TAG);
    assert_eq!(State::decode(&bytes).unwrap(), with_bases);
    let mut bad = PnCounter::default();
    bad.join(&PnCounter::default().add(a, 1).unwrap());
    bad.inc_base.insert(a, 2);
    assert!(State::decode(&State::Counter(bad).encode()).is_err());
}
