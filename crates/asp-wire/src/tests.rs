use super::*;
use proptest::prelude::*;

fn node() -> impl Strategy<Value = NodeId> {
    (1u64..=u64::MAX).prop_map(|n| NodeId::new(n).unwrap())
}

fn name() -> impl Strategy<Value = Namespace> {
    "[A-Za-z0-9_.-]{1,20}".prop_map(|s| Namespace::new(&s).unwrap())
}

fn event() -> impl Strategy<Value = Event> {
    (
        name(),
        "\\PC{1,30}",
        prop::option::of((0u8..6, prop::collection::vec(any::<u8>(), 0..200))),
        node(),
        1u64..u64::MAX,
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..10),
        prop_oneof![Just(0u64), 1u64..],
        prop_oneof![Just(0u64), 1u64..],
    )
        .prop_map(
            |(namespace, key, put, origin, counter, hlc, context, epoch, expires)| Event {
                namespace,
                key: Key::new(&key).unwrap(),
                expires_ms: if put.is_some() { expires } else { 0 },
                op: match put {
                    Some((ct, v)) => Op::Put {
                        content_type: ContentType::from_code(ct).unwrap(),
                        value: Bytes::from(v),
                    },
                    None => Op::Delete,
                },
                dot: Dot { origin, counter },
                hlc: Hlc::from_raw(hlc),
                context: Bytes::from(context),
                epoch,
            },
        )
}

fn vector() -> impl Strategy<Value = VersionVector> {
    prop::collection::vec(
        (node(), prop::collection::vec((1u64..1000, 0u64..50), 0..5)),
        0..4,
    )
    .prop_map(|origins| {
        let mut vv = VersionVector::new();
        for (o, ranges) in origins {
            vv.insert_set(
                o,
                &RangeSet::from_ranges(ranges.into_iter().map(|(lo, w)| (lo, lo + w))),
            );
        }
        vv
    })
}

/// A symbol as the wire carries it (checksum 30 bits, count modulo 4).
fn symbol() -> impl Strategy<Value = Symbol> {
    (any::<[u8; 32]>(), any::<u64>(), any::<i64>())
        .prop_map(|(sum, check, count)| Symbol { sum, check, count }.canonical())
}

fn reconcile_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u32>(), name(), 0u8..3, any::<u64>(), any::<u64>()).prop_map(
            |(id, namespace, mode, items, symbols_max)| Frame::ReconcileStart {
                id,
                namespace,
                mode: ReconcileMode::from_code(mode).unwrap(),
                items,
                symbols_max,
            }
        ),
        (
            any::<u32>(),
            any::<u64>(),
            prop::collection::vec(symbol(), 0..50)
        )
            .prop_map(|(id, first_index, symbols)| Frame::ReconcileSymbols {
                id,
                first_index,
                symbols
            }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(id, symbols)| Frame::ReconcileCredit { id, symbols }),
        (
            any::<u32>(),
            0u8..4,
            prop::collection::vec(any::<[u8; NEED_PREFIX_BYTES]>(), 0..50)
        )
            .prop_map(|(id, outcome, need)| Frame::ReconcileEnd {
                id,
                outcome: ReconcileOutcome::from_code(outcome).unwrap(),
                need
            }),
        (any::<u32>(), prop::collection::vec(event(), 0..40))
            .prop_map(|(id, events)| Frame::Repair { id, events }),
        (
            any::<u32>(),
            prop::option::of(vector()),
            prop::option::of(any::<u64>())
        )
            .prop_map(|(id, covered, repairs)| Frame::RepairEnd {
                id,
                covered,
                repairs
            }),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        prop::collection::vec(node(), 0..5).prop_map(|origins| Frame::Prune { origins }),
        prop::collection::vec(node(), 0..5).prop_map(|origins| Frame::Graft { origins }),
        prop::collection::vec(
            (
                node(),
                any::<u64>(),
                any::<u64>(),
                "[a-z0-9.:/]{0,40}",
                "[a-z0-9.:/]{0,40}",
                "[0-9.:]{0,21}"
            ),
            0..5,
        )
        .prop_map(|members| Frame::Members(
            members
                .into_iter()
                .map(
                    |(node, incarnation, heartbeat, name, api, peer)| MemberEntry {
                        node,
                        incarnation,
                        heartbeat,
                        name,
                        api,
                        peer,
                    }
                )
                .collect()
        )),
        (
            any::<u16>(),
            any::<u16>(),
            "[a-z0-9-]{0,30}",
            node(),
            prop::collection::vec(("[a-z]{1,8}", "[a-z]{0,8}"), 0..3),
            prop::collection::vec("[a-z*]{1,10}", 0..4),
            any::<u32>(),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(
                |(
                    version_min,
                    version_max,
                    cluster_id,
                    node_id,
                    labels,
                    namespaces,
                    heartbeat_ms,
                    idle_timeout_ms,
                    incarnation,
                )| Frame::Hello(Hello {
                    version_min,
                    version_max,
                    cluster_id,
                    node_id,
                    labels,
                    namespaces,
                    heartbeat_ms,
                    idle_timeout_ms,
                    incarnation,
                })
            ),
        (1u16..20, "\\PC{0,60}").prop_map(|(c, message)| Frame::Error {
            code: ErrorCode::from_code(c),
            message
        }),
        (
            prop::collection::vec(
                (
                    name(),
                    any::<u64>(),
                    vector(),
                    prop::option::of(symbol()),
                    prop::collection::vec((1u64..100, any::<u64>(), vector()), 0..3)
                ),
                0..4,
            ),
            any::<bool>()
        )
            .prop_map(|(v, part)| (if part {
                Frame::SummaryPart
            } else {
                Frame::Summary
            })(
                v.into_iter()
                    .map(|(namespace, h, vector, digest, reports)| NamespaceSummary {
                        namespace,
                        max_hlc: Hlc::from_raw(h),
                        vector,
                        digest,
                        reports: reports
                            .into_iter()
                            .map(|(node, at_ms, vector)| VectorReport {
                                node: NodeId::new(node).unwrap(),
                                at_ms,
                                vector,
                            })
                            .collect(),
                    })
                    .collect()
            )),
        (
            1u64..1_000_000,
            0u64..1000,
            prop::collection::vec(event(), 0..40)
        )
            .prop_map(|(first_seq, span, events)| Frame::Events {
                first_seq,
                last_seq: first_seq + span,
                events
            }),
        (any::<u64>(), any::<u64>()).prop_map(|(from_seq, through_seq)| Frame::Ack {
            from_seq,
            through_seq
        }),
        any::<u32>().prop_map(|bytes| Frame::Credit { bytes }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(head_seq, wall_ms)| Frame::Heartbeat { head_seq, wall_ms }),
        reconcile_frame(),
    ]
}

proptest! {
    #[test]
    fn decode_inverts_encode(f in frame()) {
        let mut buf = vec![0xEE];
        encode(&f, &mut buf).unwrap();
        let (back, used) = decode(&buf[1..]).unwrap().unwrap();
        prop_assert_eq!(used, buf.len() - 1);
        prop_assert_eq!(back, f);
        // Every strict prefix is incomplete, never an error or a different frame.
        for cut in [0, 1, 3, 4, (buf.len() - 1) / 2, buf.len() - 2] {
            prop_assert_eq!(decode(&buf[1..1 + cut]).unwrap(), None);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn arbitrary_bodies_never_panic(kind in 1u8..15, body in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut frame = ((body.len() + 1) as u32).to_le_bytes().to_vec();
        frame.push(kind);
        frame.extend_from_slice(&body);
        let _ = decode(&frame);
    }
}

#[test]
fn large_batches_are_compressed_and_bounded() {
    let events: Vec<Event> = (1..=2000)
        .map(|i| Event {
            namespace: Namespace::new("n").unwrap(),
            key: Key::new(&format!("key-{i:08}")).unwrap(),
            op: Op::Put {
                content_type: ContentType::Json,
                value: Bytes::from(format!(
                    "{{\"value\":{i},\"pad\":\"aaaaaaaaaaaaaaaaaaaaaaaaa\"}}"
                )),
            },
            dot: Dot {
                origin: NodeId::new(7).unwrap(),
                counter: i,
            },
            hlc: Hlc::new(1000 + i, 0),
            context: Bytes::new(),
            epoch: 0,
            expires_ms: 0,
        })
        .collect();
    let frame = Frame::Events {
        first_seq: 1,
        last_seq: 2000,
        events,
    };
    let mut buf = Vec::new();
    encode(&frame, &mut buf).unwrap();
    let raw: usize = 2000 * 90;
    assert!(buf.len() < raw / 2, "{} bytes: not compressed", buf.len());
    assert_eq!(decode(&buf).unwrap().unwrap().0, frame);
}

#[test]
fn limits_and_garbage_are_refused_by_name() {
    let too_big = ((FRAME_BYTES_MAX + 1) as u32).to_le_bytes();
    assert_eq!(
        decode(&too_big),
        Err(DecodeError::TooLarge(FRAME_BYTES_MAX as u64 + 1))
    );
    let unknown = [1, 0, 0, 0, 99];
    assert_eq!(decode(&unknown), Err(DecodeError::UnknownType(99)));
    // A Hello from something else entirely.
    let mut not_asp = 9u32.to_le_bytes().to_vec();
    not_asp.extend_from_slice(&[TYPE_HELLO, b'H', b'T', b'T', b'P', 0, 0, 0, 0]);
    let e = decode(&not_asp).unwrap_err();
    assert!(e.to_string().contains("magic"), "{e}");
    // A decompression bomb header.
    let mut bomb = Vec::new();
    bomb.push(TYPE_EVENTS);
    bomb.extend_from_slice(&1u64.to_le_bytes());
    bomb.extend_from_slice(&1u64.to_le_bytes());
    bomb.push(COMPRESSION_LZ4);
    bomb.extend_from_slice(&1u32.to_le_bytes());
    bomb.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut framed = (bomb.len() as u32).to_le_bytes().to_vec();
    framed.extend_from_slice(&bomb);
    assert!(
        decode(&framed)
            .unwrap_err()
            .to_string()
            .contains("decompressed")
    );
    // Oversized fields are refused when encoding.
    let hello = Frame::Hello(Hello {
        version_min: 1,
        version_max: 1,
        cluster_id: "x".repeat(300),
        node_id: NodeId::new(1).unwrap(),
        labels: vec![],
        namespaces: vec![],
        heartbeat_ms: 1,
        idle_timeout_ms: 1,
        incarnation: 1,
    });
    assert!(matches!(
        encode(&hello, &mut Vec::new()),
        Err(EncodeError::FieldTooLong { .. })
    ));
}

#[test]
fn a_newer_hello_with_more_fields_still_decodes() {
    let hello = Frame::Hello(Hello {
        version_min: 1,
        version_max: 3,
        cluster_id: "c".into(),
        node_id: NodeId::new(5).unwrap(),
        labels: vec![("region".into(), "eu".into())],
        namespaces: vec!["*".into()],
        heartbeat_ms: 1000,
        idle_timeout_ms: 10_000,
        incarnation: 77,
    });
    let mut buf = Vec::new();
    encode(&hello, &mut buf).unwrap();
    buf.extend_from_slice(&[1, 2, 3, 4]);
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    assert_eq!(decode(&buf).unwrap().unwrap().0, hello);
}

#[test]
fn a_hello_of_an_earlier_build_without_an_incarnation_still_decodes() {
    let hello = Hello {
        version_min: 1,
        version_max: 1,
        cluster_id: "c".into(),
        node_id: NodeId::new(5).unwrap(),
        labels: vec![],
        namespaces: vec!["*".into()],
        heartbeat_ms: 1000,
        idle_timeout_ms: 10_000,
        incarnation: 77,
    };
    let mut buf = Vec::new();
    encode(&Frame::Hello(hello.clone()), &mut buf).unwrap();
    // The first builds ended the Hello at the namespace list.
    buf.truncate(buf.len() - 8);
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    let expected = Hello {
        incarnation: 0,
        ..hello
    };
    assert_eq!(decode(&buf).unwrap().unwrap().0, Frame::Hello(expected));
}

#[test]
fn symbol_and_need_lists_must_fill_their_frames() {
    let frame = Frame::ReconcileSymbols {
        id: 1,
        first_index: 0,
        symbols: vec![Symbol::default(); 3],
    };
    let mut buf = Vec::new();
    encode(&frame, &mut buf).unwrap();
    // Claim four symbols where three are.
    buf[4 + 1 + 4 + 8] = 4;
    let e = decode(&buf).unwrap_err();
    assert!(e.to_string().contains("4 symbols"), "{e}");
    let frame = Frame::ReconcileEnd {
        id: 1,
        outcome: ReconcileOutcome::Decoded,
        need: vec![[7; NEED_PREFIX_BYTES]; 2],
    };
    let mut buf = Vec::new();
    encode(&frame, &mut buf).unwrap();
    buf.pop();
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    let e = decode(&buf).unwrap_err();
    assert!(e.to_string().contains("key hashes"), "{e}");
    // An unknown mode or outcome is named.
    let mut start = Vec::new();
    encode(
        &Frame::ReconcileStart {
            id: 1,
            namespace: Namespace::new("n").unwrap(),
            mode: ReconcileMode::Full,
            items: 1,
            symbols_max: 1,
        },
        &mut start,
    )
    .unwrap();
    start[4 + 1 + 4 + 2] = 9;
    let e = decode(&start).unwrap_err();
    assert!(e.to_string().contains("unknown mode 9"), "{e}");
}

#[test]
fn error_codes_travel_as_their_numbers() {
    // Code 12 (`invalid_event`) is new: a peer that validates every event names the
    // reason with it; an older build shows it as `unknown(12)`.
    for (code, number, name) in [
        (ErrorCode::ClockSkew, 8u16, "clock_skew"),
        (ErrorCode::Internal, 11, "internal"),
        (ErrorCode::InvalidEvent, 12, "invalid_event"),
        (ErrorCode::NodeConflict, 13, "node_conflict"),
    ] {
        let frame = Frame::Error {
            code,
            message: "why".into(),
        };
        let mut bytes = Vec::new();
        encode(&frame, &mut bytes).unwrap();
        // length u32, type u8 (2), then the code as u16 little-endian.
        assert_eq!(bytes[4], 2);
        assert_eq!(u16::from_le_bytes([bytes[5], bytes[6]]), number);
        let (decoded, used) = decode(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(decoded, frame);
        assert_eq!(code.name(), name);
        assert_eq!(code.to_string(), name);
    }
    // A code this build does not know is kept and shown by number.
    let mut bytes = Vec::new();
    let unknown = Frame::Error {
        code: ErrorCode::from_code(14),
        message: String::new(),
    };
    encode(&unknown, &mut bytes).unwrap();
    let (decoded, _) = decode(&bytes).unwrap().unwrap();
    let Frame::Error { code, .. } = decoded else {
        panic!("not an error frame")
    };
    assert_eq!(code, ErrorCode::Other(14));
    assert_eq!(code.to_string(), "unknown(14)");
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// Guards against a small frame making the decoder allocate the decompressed size it
/// claims (up to 64 MiB for 20 bytes) before looking at the data.
#[test]
fn lz4_data_too_short_for_its_claimed_size_is_refused_before_allocating() {
    let mut bomb = vec![TYPE_EVENTS];
    bomb.extend_from_slice(&1u64.to_le_bytes());
    bomb.extend_from_slice(&1u64.to_le_bytes());
    bomb.push(COMPRESSION_LZ4);
    bomb.extend_from_slice(&1u32.to_le_bytes());
    bomb.extend_from_slice(&(EVENTS_RAW_BYTES_MAX as u32).to_le_bytes());
    bomb.extend_from_slice(&[0x1f, 0, 0, 0]);
    let e = decode(&framed(&bomb)).unwrap_err().to_string();
    assert!(e.contains("4 bytes of lz4 data cannot hold"), "{e}");
    // Real, highly compressible batches still decode.
    let events: Vec<Event> = (1..=200)
        .map(|c| Event {
            namespace: Namespace::new("n").unwrap(),
            key: Key::new("k").unwrap(),
            op: Op::Put {
                content_type: ContentType::OctetStream,
                value: Bytes::from(vec![0u8; 60_000]),
            },
            dot: Dot {
                origin: NodeId::new(1).unwrap(),
                counter: c,
            },
            hlc: Hlc::from_raw(c),
            context: Bytes::new(),
            epoch: 0,
            expires_ms: 0,
        })
        .collect();
    let frame = Frame::Events {
        first_seq: 1,
        last_seq: 200,
        events,
    };
    let mut bytes = Vec::new();
    encode(&frame, &mut bytes).unwrap();
    assert!(bytes.len() < 200 * 60_000 / 100, "{}", bytes.len());
    assert_eq!(decode(&bytes).unwrap().unwrap().0, frame);
}

/// Before the handshake only a Hello (or an Error) is read, and no frame larger than
/// a Hello can be: checked from the first five bytes, before the rest arrives.
#[test]
fn only_a_hello_is_read_before_the_handshake() {
    let mut events = vec![TYPE_EVENTS];
    events.extend_from_slice(&[0; 30]);
    let e = decode_handshake(&framed(&events)).unwrap_err().to_string();
    assert!(e.contains("only a Hello"), "{e}");
    // A 16 MiB frame is refused on its length alone.
    let mut big = (FRAME_BYTES_MAX as u32).to_le_bytes().to_vec();
    big.push(TYPE_HELLO);
    let e = decode_handshake(&big).unwrap_err().to_string();
    assert!(e.contains("before the handshake"), "{e}");
    // A Hello at its limits fits.
    let hello = Frame::Hello(Hello {
        version_min: 1,
        version_max: 2,
        cluster_id: "c".repeat(CLUSTER_ID_BYTES_MAX),
        node_id: NodeId::new(1).unwrap(),
        labels: (0..LABELS_MAX)
            .map(|i| (format!("{i:0>256}"), "v".repeat(LABEL_BYTES_MAX)))
            .collect(),
        namespaces: (0..NAMESPACES_MAX).map(|i| format!("{i:0>255}")).collect(),
        heartbeat_ms: 1,
        idle_timeout_ms: 1,
        incarnation: 7,
    });
    let mut bytes = Vec::new();
    encode(&hello, &mut bytes).unwrap();
    assert!(bytes.len() <= HELLO_BYTES_MAX + 4, "{}", bytes.len());
    assert_eq!(decode_handshake(&bytes).unwrap().unwrap().0, hello);
    // An Error (a refusal) is read too; too few bytes wait for more.
    let mut error = Vec::new();
    encode(
        &Frame::Error {
            code: ErrorCode::ClusterMismatch,
            message: "no".into(),
        },
        &mut error,
    )
    .unwrap();
    assert!(decode_handshake(&error).unwrap().is_some());
    assert_eq!(decode_handshake(&error[..4]), Ok(None));
}

/// A batch of `n` events whose values are random (`random`) or all alike.
fn value_batch(n: u64, random: bool) -> Frame {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let events = (1..=n)
        .map(|c| {
            let value: Vec<u8> = (0..200)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    if random { state as u8 } else { b'a' }
                })
                .collect();
            Event {
                namespace: Namespace::new("n").unwrap(),
                key: Key::new(&format!("k{c}")).unwrap(),
                op: Op::Put {
                    content_type: ContentType::Text,
                    value: Bytes::from(value),
                },
                dot: Dot {
                    origin: NodeId::new(1).unwrap(),
                    counter: c,
                },
                hlc: Hlc::new(c, 0),
                context: Bytes::new(),
                epoch: 0,
                expires_ms: 0,
            }
        })
        .collect();
    Frame::Events {
        first_seq: 1,
        last_seq: n,
        events,
    }
}

/// The compression byte of an encoded Events frame (after length, type and positions).
fn compression_of(bytes: &[u8]) -> u8 {
    bytes[4 + 1 + 16]
}

#[test]
fn an_adaptive_link_stops_compressing_what_does_not_shrink_and_tries_again_later() {
    let mut c = Compressor::adaptive();
    let random = value_batch(20, true);
    let alike = value_batch(20, false);
    let encode = |frame: &Frame, c: &mut Compressor| {
        let mut out = Vec::new();
        encode_with(frame, &mut out, c).unwrap();
        let (decoded, used) = decode(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(&decoded, frame);
        compression_of(&out)
    };
    // Random values: tried once (lz4 shrinks keys and headers a little, less than an
    // eighth), then not tried for a pause; the decoded frames are the same either way.
    encode(&random, &mut c);
    for _ in 0..Compressor::PAUSE {
        assert_eq!(encode(&alike, &mut c), 0, "compressed during the pause");
    }
    // After the pause, tried again: values that shrink are compressed.
    assert_eq!(encode(&alike, &mut c), 1);
    assert_eq!(encode(&alike, &mut c), 1);
    // `encode` always tries.
    let mut out = Vec::new();
    encode(&alike, &mut Compressor::always());
    encode_with(&alike, &mut out, &mut Compressor::always()).unwrap();
    assert_eq!(compression_of(&out), 1);
}
