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
            (State::JsonMap(_), _) => {
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
                State::JsonMap(JsonMap::patch(Version { hlc, dot }, changes))
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
    m.join(&JsonMap::patch(
        jv(1, 1),
        changes(&[("a", "1"), ("b", "2")]),
    ));
    m.join(&JsonMap::patch(jv(3, 2), changes(&[("a", "-")])));
    // Older writes to a removed or newer field lose; other fields merge.
    m.join(&JsonMap::patch(
        jv(2, 1),
        changes(&[("a", "9"), ("c", "3")]),
    ));
    assert_eq!(doc(&m), r#"{"b":2,"c":3}"#);
    assert_eq!(m.shown_at(&["a".to_owned()]), None);
}

/// Guards against issue 18: two nodes cut off from each other patched different
/// fields of one nested object, and after healing one side's field was gone.
#[test]
fn json_map_nested_objects_merge_per_path() {
    let ada = JsonMap::patch(
        jv(1, 1),
        changes(&[("name", r#""Ada""#), ("langs", "{}"), ("langs.en", "true")]),
    );
    let born = JsonMap::patch(
        jv(1, 2),
        changes(&[("born", "1815"), ("langs", "{}"), ("langs.fr", "true")]),
    );
    let m = joined(&[&ada, &born]);
    assert_eq!(
        doc(&m),
        r#"{"born":1815,"langs":{"en":true,"fr":true},"name":"Ada"}"#
    );
    // Three deep, with the ancestors implied by the patch.
    let deep = JsonMap::patch(jv(2, 1), changes(&[("langs.de.dialects", "[1,2]")]));
    let other = JsonMap::patch(jv(2, 2), changes(&[("langs.de.native", "false")]));
    let m = joined(&[&m, &deep, &other]);
    assert_eq!(
        doc(&m),
        r#"{"born":1815,"langs":{"de":{"dialects":[1,2],"native":false},"en":true,"fr":true},"name":"Ada"}"#
    );
}

/// Concurrent "remove the parent" and "set a child": the later version wins, as for
/// any json-map conflict, at every depth.
#[test]
fn json_map_remove_parent_against_set_child_is_last_writer_wins() {
    let base = JsonMap::patch(
        jv(1, 1),
        changes(&[("p.old", "1"), ("p.keep", "2"), ("q", "3")]),
    );
    // The removal is later: the parent is gone, the new child with it.
    let remove = JsonMap::patch(jv(5, 1), changes(&[("p", "-")]));
    let set = JsonMap::patch(jv(4, 2), changes(&[("p.new", "4")]));
    assert_eq!(doc(&joined(&[&base, &remove, &set])), r#"{"q":3}"#);
    // The set is later: the parent comes back holding the new child only; what was
    // written under it before the removal stays removed.
    let remove = JsonMap::patch(jv(4, 1), changes(&[("p", "-")]));
    let set = JsonMap::patch(jv(5, 2), changes(&[("p.new", "4")]));
    let m = joined(&[&base, &remove, &set]);
    assert_eq!(doc(&m), r#"{"p":{"new":4},"q":3}"#);
    // The same two writes one level deeper.
    let remove = JsonMap::patch(jv(6, 1), changes(&[("p.new", "-")]));
    let set = JsonMap::patch(jv(7, 2), changes(&[("p.new.x", "5")]));
    assert_eq!(
        doc(&joined(&[&m, &remove, &set])),
        r#"{"p":{"new":{"x":5}},"q":3}"#
    );
    let remove = JsonMap::patch(jv(7, 1), changes(&[("p.new", "-")]));
    let set = JsonMap::patch(jv(6, 2), changes(&[("p.new.x", "5")]));
    assert_eq!(doc(&joined(&[&m, &remove, &set])), r#"{"p":{},"q":3}"#);
}

/// Concurrent "set the parent to a value" and "set a child": the same rule.
#[test]
fn json_map_value_over_object_is_last_writer_wins() {
    let base = JsonMap::patch(jv(1, 1), changes(&[("p.old", "1")]));
    let scalar = JsonMap::patch(jv(5, 1), changes(&[("p", "[0]")]));
    let set = JsonMap::patch(jv(4, 2), changes(&[("p.new", "2")]));
    assert_eq!(doc(&joined(&[&base, &scalar, &set])), r#"{"p":[0]}"#);
    let scalar = JsonMap::patch(jv(4, 1), changes(&[("p", "[0]")]));
    let set = JsonMap::patch(jv(5, 2), changes(&[("p.new", "2")]));
    assert_eq!(doc(&joined(&[&base, &scalar, &set])), r#"{"p":{"new":2}}"#);
    // Making a path an object keeps its fields when it is one already, and makes it
    // `{}` when it held a value.
    let object = JsonMap::patch(jv(6, 1), changes(&[("p", "{}")]));
    assert_eq!(
        doc(&joined(&[&base, &scalar, &set, &object])),
        r#"{"p":{"new":2}}"#
    );
    let object = JsonMap::patch(jv(6, 1), changes(&[("p", "{}")]));
    assert_eq!(doc(&joined(&[&base, &scalar, &object])), r#"{"p":{}}"#);
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
fn json_map_writes_the_fields_layout_whenever_it_holds_the_state() {
    let tag = |m: &JsonMap| State::JsonMap(m.clone()).encode()[0];
    let flat = JsonMap::patch(jv(1, 1), changes(&[("a", "1"), ("b", "-")]));
    assert_eq!(tag(&flat), 4);
    let nested = JsonMap::patch(jv(2, 1), changes(&[("c.d", "1")]));
    assert_eq!(tag(&nested), 5);
    let object = JsonMap::patch(jv(2, 1), changes(&[("c", "{}")]));
    assert_eq!(tag(&object), 5);
    // Written over, the nested paths stay (as what hides them), and so does tag 5.
    let mut m = joined(&[&flat, &nested]);
    m.join(&JsonMap::patch(jv(3, 1), changes(&[("c", "2")])));
    assert_eq!(doc(&m), r#"{"a":1,"c":2}"#);
    assert_eq!(tag(&m), 5);
    for state in [flat, nested, object, m] {
        let state = State::JsonMap(state);
        assert_eq!(State::decode(&state.encode()).unwrap(), state);
    }
    // A top-level value without a cut is no state a writer makes, but one a peer may
    // send: the fields layout cannot say it, so it stays in tag 5.
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
