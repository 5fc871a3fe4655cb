//! Tests of the session state machine, driven as a pair over an in-memory link.
//!
//! Size: the tests of one state machine (handshake, frames, credit, summaries, timers);
//! reconciliation's have a file of their own (`reconcile_tests.rs`). Split by topic if
//! it grows further.

use super::*;
use crate::{ContentType, Dot, Hlc, Key, Op};
use bytes::Bytes;
use std::time::Duration;

fn node(n: u64) -> NodeId {
    NodeId::new(n).unwrap()
}

fn config(n: u64) -> SessionConfig {
    SessionConfig::new(node(n), "test")
}

fn event(ns: &str, origin: u64, counter: u64) -> Event {
    Event {
        namespace: Namespace::new(ns).unwrap(),
        key: Key::new(&format!("k{counter}")).unwrap(),
        op: Op::Put {
            content_type: ContentType::Text,
            value: Bytes::from_static(b"value"),
        },
        dot: Dot {
            origin: node(origin),
            counter,
        },
        hlc: Hlc::new(counter, 0),
        context: Bytes::new(),
        epoch: 0,
        expires_ms: 0,
    }
}

/// Two sessions joined by an in-memory wire.
struct Pair {
    a: Session,
    b: Session,
    now: Instant,
    a_events: Vec<SessionEvent>,
    b_events: Vec<SessionEvent>,
}

impl Pair {
    fn new(a: SessionConfig, b: SessionConfig) -> Pair {
        let now = Instant::now();
        let mut pair = Pair {
            a: Session::new(a, now),
            b: Session::accept(b, now),
            now,
            a_events: Vec::new(),
            b_events: Vec::new(),
        };
        pair.pump();
        pair
    }

    /// Moves frames both ways until nothing is left in flight.
    fn pump(&mut self) {
        for _ in 0..100 {
            let mut moved = false;
            while let Some(f) = self.a.poll_transmit() {
                self.b.handle_frame(f, self.now);
                moved = true;
            }
            while let Some(f) = self.b.poll_transmit() {
                self.a.handle_frame(f, self.now);
                moved = true;
            }
            while let Some(e) = self.a.poll_event() {
                self.a_events.push(e);
            }
            while let Some(e) = self.b.poll_event() {
                self.b_events.push(e);
            }
            if !moved {
                return;
            }
        }
        panic!("frames kept flowing");
    }

    fn summaries(&mut self, a: Vec<NamespaceSummary>, b: Vec<NamespaceSummary>) {
        self.a.send_summary(a, self.now);
        self.b.send_summary(b, self.now);
        self.pump();
    }
}

/// A summary of one namespace holding `vector` (no digest, no reports).
fn holding(ns: &str, vector: VersionVector) -> NamespaceSummary {
    NamespaceSummary {
        namespace: Namespace::new(ns).unwrap(),
        max_hlc: Hlc::ZERO,
        vector,
        digest: None,
        reports: Vec::new(),
    }
}

fn closed(events: &[SessionEvent]) -> Option<&CloseReason> {
    events.iter().find_map(|e| match e {
        SessionEvent::Closed(r) => Some(r),
        _ => None,
    })
}

fn delivered(events: &[SessionEvent]) -> Vec<(u64, u64, Vec<Dot>)> {
    events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Events {
                first_seq,
                last_seq,
                events,
                ..
            } => Some((
                *first_seq,
                *last_seq,
                events.iter().map(|e| e.dot).collect(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn handshake_establishes_both_sides() {
    let pair = Pair::new(config(1), config(2));
    assert!(pair.a.is_established() && pair.b.is_established());
    assert_eq!(pair.a.peer().unwrap().node_id, node(2));
    assert_eq!(pair.b.peer().unwrap().version, PROTOCOL_VERSION_MAX);
    assert!(matches!(pair.a_events[0], SessionEvent::Established(_)));
}

#[test]
fn refusals_name_their_reason_on_both_sides() {
    let check = |a: SessionConfig, b: SessionConfig, code: ErrorCode, words: &str| {
        let pair = Pair::new(a, b);
        let ra = closed(&pair.a_events).expect("a closed");
        let rb = closed(&pair.b_events).expect("b closed");
        for r in [ra, rb] {
            assert_eq!(r.code, code);
            assert!(r.message.contains(words), "{:?} lacks {words:?}", r.message);
        }
        // Exactly one side reports the close as coming from the other... or both
        // detected it themselves; either way neither is established.
        assert!(pair.a.is_closed() && pair.b.is_closed());
    };
    let mut old = config(2);
    old.version_min = 7;
    old.version_max = 9;
    check(
        config(1),
        old,
        ErrorCode::VersionMismatch,
        "protocol version",
    );
    check(
        config(1),
        SessionConfig::new(node(2), "other"),
        ErrorCode::ClusterMismatch,
        "cluster",
    );
    check(config(1), config(1), ErrorCode::SelfConnection, "itself");
    // The same id in another run: a copy of this node, not this node.
    let run = |incarnation| SessionConfig {
        incarnation,
        ..config(1)
    };
    check(run(5), run(5), ErrorCode::SelfConnection, "itself");
    check(run(5), run(6), ErrorCode::NodeConflict, "another process");
    // A peer of an earlier build sends no incarnation: only what it can tell.
    check(run(5), run(0), ErrorCode::SelfConnection, "itself");
}

#[test]
fn events_flow_and_acks_come_back() {
    let mut pair = Pair::new(config(1), config(2));
    pair.summaries(vec![], vec![]);
    assert!(pair.a.can_send());
    let (sent, charged) = pair.a.send_events(
        1,
        3,
        vec![event("n", 1, 1), event("n", 1, 2), event("n", 1, 3)],
        pair.now,
    );
    assert_eq!(sent, 3);
    assert!(charged > 0);
    pair.pump();
    assert_eq!(
        delivered(&pair.b_events),
        vec![(
            1,
            3,
            vec![
                Dot {
                    origin: node(1),
                    counter: 1
                },
                Dot {
                    origin: node(1),
                    counter: 2
                },
                Dot {
                    origin: node(1),
                    counter: 3
                }
            ]
        )]
    );
    pair.b.applied(3, charged, pair.now);
    pair.pump();
    assert!(
        pair.a_events
            .contains(&SessionEvent::Acked { through_seq: 3 })
    );
}

#[test]
fn the_vector_filter_stops_echoes_and_known_events() {
    let mut pair = Pair::new(config(1), config(2));
    let mut held = VersionVector::new();
    held.insert(Dot {
        origin: node(3),
        counter: 1,
    });
    pair.summaries(vec![], vec![holding("n", held)]);
    // B sends A an event; A must never send it back.
    pair.b.send_events(1, 1, vec![event("n", 2, 1)], pair.now);
    pair.pump();
    pair.a.send_events(
        1,
        3,
        vec![event("n", 2, 1), event("n", 3, 1), event("n", 3, 2)],
        pair.now,
    );
    pair.pump();
    let got = delivered(&pair.b_events);
    assert_eq!(
        got,
        vec![(
            1,
            3,
            vec![Dot {
                origin: node(3),
                counter: 2
            }]
        )]
    );
    // A range whose events are all filtered is held back until flushed, then
    // travels empty so that acks advance.
    pair.a.send_events(4, 9, vec![event("n", 3, 2)], pair.now);
    pair.pump();
    assert_eq!(delivered(&pair.b_events).len(), 1);
    assert!(pair.a.flush_events(pair.now));
    pair.pump();
    assert_eq!(delivered(&pair.b_events).last().unwrap(), &(4, 9, vec![]));
}

#[test]
fn positions_the_peer_holds_are_coalesced_into_one_frame() {
    let mut pair = Pair::new(config(1), config(2));
    let mut held = VersionVector::new();
    for counter in 1..=100 {
        held.insert(Dot {
            origin: node(3),
            counter,
        });
    }
    pair.summaries(vec![], vec![holding("n", held)]);
    // One read per position, every event already held: nothing is framed yet.
    for seq in 1..=100 {
        assert_eq!(
            pair.a
                .send_events(seq, seq, vec![event("n", 3, seq)], pair.now),
            (0, 0)
        );
    }
    pair.pump();
    assert!(delivered(&pair.b_events).is_empty());
    // The next batch with something to send carries the whole held-back range.
    let (sent, charged) = pair
        .a
        .send_events(101, 101, vec![event("n", 3, 101)], pair.now);
    assert_eq!(sent, 1);
    pair.pump();
    assert_eq!(
        delivered(&pair.b_events),
        vec![(
            1,
            101,
            vec![Dot {
                origin: node(3),
                counter: 101
            }]
        )]
    );
    assert!(!pair.a.flush_events(pair.now), "nothing left to flush");
    // More held positions, then a flush: one empty frame covers them all.
    for seq in 102..=150 {
        pair.a
            .send_events(seq, seq, vec![event("n", 3, seq - 101)], pair.now);
    }
    assert!(pair.a.flush_events(pair.now));
    pair.pump();
    assert_eq!(
        delivered(&pair.b_events).last().unwrap(),
        &(102, 150, vec![])
    );
    assert_eq!(delivered(&pair.b_events).len(), 2);
    // The receiver acknowledges the whole range, and the sender accepts it.
    pair.b.applied(101, charged, pair.now);
    pair.b.applied(150, 0, pair.now);
    pair.pump();
    assert!(closed(&pair.a_events).is_none() && closed(&pair.b_events).is_none());
    assert!(
        pair.a_events
            .contains(&SessionEvent::Acked { through_seq: 150 })
    );
}

#[test]
fn namespaces_not_replicated_are_not_sent() {
    let mut b = config(2);
    b.namespaces = vec!["wanted".into()];
    let mut pair = Pair::new(config(1), b);
    pair.summaries(vec![], vec![]);
    pair.a.send_events(
        1,
        2,
        vec![event("wanted", 1, 1), event("other", 1, 1)],
        pair.now,
    );
    pair.pump();
    let got = delivered(&pair.b_events);
    assert_eq!(got[0].2.len(), 1);
    assert!(pair.b.is_established());
}

#[test]
fn credit_bounds_what_is_in_flight() {
    let mut b = config(2);
    b.credit_window_bytes = 200;
    let mut pair = Pair::new(config(1), b);
    pair.summaries(vec![], vec![]);
    assert_eq!(pair.a.send_credit(), 200);
    let (_, charged) =
        pair.a
            .send_events(1, 3, (1..=3).map(|c| event("n", 1, c)).collect(), pair.now);
    assert!(charged > 200);
    assert!(!pair.a.can_send(), "credit spent");
    pair.pump();
    pair.b.applied(3, charged, pair.now);
    pair.pump();
    assert!(pair.a.can_send(), "credit returned with the ack");
}

#[test]
fn a_peer_ignoring_credit_is_cut_off() {
    let mut b = config(2);
    b.credit_window_bytes = 100;
    let mut pair = Pair::new(config(1), b);
    pair.summaries(vec![], vec![]);
    // Bypass the sender's own check by forging frames.
    for i in 0..10 {
        pair.b.handle_frame(
            Frame::Events {
                first_seq: i + 1,
                last_seq: i + 1,
                events: vec![event("n", 1, i + 1)],
            },
            pair.now,
        );
    }
    pair.pump();
    assert_eq!(closed(&pair.b_events).unwrap().code, ErrorCode::FlowControl);
}

/// A runtime busy on its store (not reading) still sends heartbeats, and the time it
/// spent not reading is not the peer's silence.
#[test]
fn a_busy_runtime_keeps_the_link_alive() {
    let mut a = config(1);
    (a.heartbeat, a.idle_timeout) = (Duration::from_millis(100), Duration::from_millis(1000));
    let mut pair = Pair::new(a, config(2));
    let ms = |n| pair.now + Duration::from_millis(n);
    let (at50, at200, at1500, at1700, at1800, at2500) =
        (ms(50), ms(200), ms(1500), ms(1700), ms(1800), ms(2500));
    // Not due yet: nothing; due: one heartbeat, even past the idle timeout, no close.
    pair.a.keep_alive(at50);
    assert!(pair.a.poll_transmit().is_none());
    pair.a.keep_alive(at1500);
    assert!(matches!(
        pair.a.poll_transmit(),
        Some(Frame::Heartbeat { .. })
    ));
    assert!(!pair.a.is_closed(), "keep_alive makes no idle check");
    // Busy from 200 to 1,700 ms: at 1,800 ms the peer was silent for 300 ms of
    // listening; silent for the whole timeout while listening: closed.
    pair.a.not_read(at200, at1700);
    pair.a.handle_timeout(at1800);
    assert!(!pair.a.is_closed());
    pair.a.handle_timeout(at2500);
    assert!(pair.a.is_closed());
}

#[test]
fn heartbeats_then_idle_timeout() {
    let mut a = config(1);
    a.heartbeat = Duration::from_millis(100);
    a.idle_timeout = Duration::from_millis(1000);
    let mut pair = Pair::new(a, config(2));
    let t0 = pair.now;
    let deadline = pair.a.poll_timeout().unwrap();
    assert_eq!(deadline, t0 + Duration::from_millis(100));
    pair.a.handle_timeout(deadline);
    assert!(matches!(
        pair.a.poll_transmit(),
        Some(Frame::Heartbeat { .. })
    ));
    pair.a.handle_timeout(t0 + Duration::from_millis(1000));
    assert!(pair.a.is_closed());
    assert!(matches!(
        pair.a.poll_transmit(),
        Some(Frame::Error {
            code: ErrorCode::IdleTimeout,
            ..
        })
    ));
}

#[test]
fn a_refused_dialer_learns_nothing_about_the_acceptor() {
    let now = Instant::now();
    let mut acceptor = Session::accept(SessionConfig::new(node(2), "secret-cluster"), now);
    // The acceptor says nothing before the dialer's Hello.
    assert_eq!(acceptor.poll_transmit(), None);
    let mut dialer = Session::new(SessionConfig::new(node(1), "guess"), now);
    while let Some(f) = dialer.poll_transmit() {
        acceptor.handle_frame(f, now);
    }
    let mut sent = Vec::new();
    while let Some(f) = acceptor.poll_transmit() {
        sent.push(format!("{f:?}"));
    }
    assert_eq!(sent.len(), 1, "only the refusal: {sent:?}");
    assert!(sent[0].contains("ClusterMismatch"), "{sent:?}");
    assert!(
        !sent[0].contains("secret-cluster") && !sent[0].contains(&node(2).to_string()),
        "{sent:?}"
    );
    // This node's own record names both clusters.
    let reason = std::iter::from_fn(|| acceptor.poll_event())
        .find_map(|e| match e {
            SessionEvent::Closed(r) => Some(r),
            _ => None,
        })
        .unwrap();
    assert!(reason.message.contains("secret-cluster") && reason.message.contains("guess"));
}

#[test]
fn a_peer_that_sends_its_hello_at_once_is_still_served() {
    // Earlier builds' acceptors did not wait for the dialer's Hello.
    let now = Instant::now();
    let mut a = Session::new(config(1), now);
    let mut b = Session::new(config(2), now);
    for _ in 0..4 {
        while let Some(f) = a.poll_transmit() {
            b.handle_frame(f, now);
        }
        while let Some(f) = b.poll_transmit() {
            a.handle_frame(f, now);
        }
    }
    assert!(a.is_established() && b.is_established());
}

#[test]
fn handshake_times_out_and_frames_before_hello_are_refused() {
    let now = Instant::now();
    let mut s = Session::new(config(1), now);
    s.poll_transmit();
    s.handle_timeout(now + Duration::from_secs(11));
    assert!(s.is_closed());
    let mut s = Session::new(config(1), now);
    s.handle_frame(
        Frame::Ack {
            from_seq: 1,
            through_seq: 1,
        },
        now,
    );
    assert!(s.is_closed());
    let mut closed_reason = None;
    while let Some(e) = s.poll_event() {
        if let SessionEvent::Closed(r) = e {
            closed_reason = Some(r);
        }
    }
    assert_eq!(closed_reason.unwrap().code, ErrorCode::Protocol);
}

#[test]
fn acks_beyond_what_was_sent_are_refused() {
    let mut pair = Pair::new(config(1), config(2));
    pair.summaries(vec![], vec![]);
    pair.a.send_events(1, 5, vec![], pair.now);
    pair.pump();
    pair.a.handle_frame(
        Frame::Ack {
            from_seq: 1,
            through_seq: 6,
        },
        pair.now,
    );
    assert!(pair.a.is_closed());
}

#[test]
fn batches_must_follow_each_other_without_gaps() {
    // Guards against acknowledging past a batch that was lost, repeated or reordered
    // on the way: the receiver closes the link instead.
    for second in [(5, 6), (3, 4), (2, 9)] {
        let mut pair = Pair::new(config(1), config(2));
        pair.summaries(vec![], vec![]);
        pair.b.handle_frame(
            Frame::Events {
                first_seq: 1,
                last_seq: 3,
                events: vec![],
            },
            pair.now,
        );
        pair.b.handle_frame(
            Frame::Events {
                first_seq: second.0,
                last_seq: second.1,
                events: vec![],
            },
            pair.now,
        );
        pair.pump();
        let reason = closed(&pair.b_events).expect("closed");
        assert_eq!(reason.code, ErrorCode::Protocol);
        assert!(reason.message.contains("expected 4"), "{}", reason.message);
    }
    let mut pair = Pair::new(config(1), config(2));
    pair.summaries(vec![], vec![]);
    pair.b.handle_frame(
        Frame::Events {
            first_seq: 10,
            last_seq: 12,
            events: vec![],
        },
        pair.now,
    );
    pair.b.handle_frame(
        Frame::Events {
            first_seq: 13,
            last_seq: 13,
            events: vec![],
        },
        pair.now,
    );
    pair.pump();
    assert!(
        pair.b.is_established(),
        "the first batch may start anywhere; the next follows it"
    );
}

#[test]
fn an_ack_cannot_cover_a_batch_that_was_overtaken() {
    // Regression (found by the simulator, seed 281): a batch that overtook the first
    // batch of a link was taken as the first; its ack then covered positions the
    // receiver never saw, and the sender's checkpoint skipped them for good.
    let mut pair = Pair::new(config(1), config(2));
    pair.summaries(vec![], vec![]);
    pair.a.send_events(1, 3, vec![event("n", 1, 1)], pair.now);
    pair.a.send_events(4, 6, vec![event("n", 1, 2)], pair.now);
    // Deliver the second batch first.
    let mut frames: Vec<Frame> = std::iter::from_fn(|| pair.a.poll_transmit()).collect();
    let second = frames.pop().unwrap();
    pair.b.handle_frame(second, pair.now);
    pair.b.applied(6, 100, pair.now);
    while let Some(f) = pair.b.poll_transmit() {
        pair.a.handle_frame(f, pair.now);
    }
    let events: Vec<SessionEvent> = std::iter::from_fn(|| pair.a.poll_event()).collect();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, SessionEvent::Acked { .. })),
        "no checkpoint past the lost batch: {events:?}"
    );
    assert_eq!(closed(&events).unwrap().code, ErrorCode::Protocol);
    drop(frames);
}

#[test]
fn repairs_ignore_the_peer_vector_and_cost_credit() {
    let mut a_config = config(1);
    a_config.credit_window_bytes = 1000;
    let mut b_config = config(2);
    b_config.credit_window_bytes = 1000;
    let mut pair = Pair::new(a_config, b_config);
    // B claims to hold dot (1, 1): the stream would leave it out, a repair does not.
    let mut held = VersionVector::new();
    held.insert(Dot {
        origin: node(1),
        counter: 1,
    });
    pair.summaries(vec![], vec![holding("n", held)]);
    let before = pair.a.credit();
    let cost = pair.a.send_repair(7, vec![event("n", 1, 1)], pair.now);
    assert_eq!(pair.a.credit(), before - cost as i64);
    pair.pump();
    let (id, events, bytes) = pair
        .b_events
        .iter()
        .find_map(|e| match e {
            SessionEvent::Repair { id, events, bytes } => Some((*id, events.clone(), *bytes)),
            _ => None,
        })
        .expect("the repair arrives");
    assert_eq!((id, events.len(), bytes), (7, 1, cost));
    // Once applied, the credit comes back.
    pair.b.repaired(bytes, pair.now);
    pair.pump();
    assert_eq!(pair.a.credit(), before);
    // Other reconciliation frames reach the node as they are.
    let end = Frame::ReconcileEnd {
        id: 7,
        outcome: ReconcileOutcome::Decoded,
        need: vec![[1; NEED_PREFIX_BYTES]],
    };
    pair.a.send_reconcile(end.clone(), pair.now);
    pair.pump();
    assert!(pair.b_events.contains(&SessionEvent::Reconcile(end)));
    assert!(closed(&pair.b_events).is_none());
}

#[test]
fn reconciling_a_namespace_not_replicated_closes_the_link() {
    let mut b_config = config(2);
    b_config.namespaces = vec!["only".into()];
    let mut pair = Pair::new(config(1), b_config);
    pair.a.send_reconcile(
        Frame::ReconcileStart {
            id: 1,
            namespace: Namespace::new("other").unwrap(),
            mode: ReconcileMode::Window,
            items: 0,
            symbols_max: 16,
        },
        pair.now,
    );
    pair.pump();
    let reason = closed(&pair.b_events).expect("closed");
    assert_eq!(reason.code, ErrorCode::Protocol);
    assert!(
        reason.message.contains("does not replicate"),
        "{}",
        reason.message
    );
}

fn many(count: usize) -> Vec<NamespaceSummary> {
    (0..count)
        .map(|i| holding(&format!("n{i:06}"), VersionVector::new()))
        .collect()
}

/// Guards against a summary of more namespaces than one frame holds (4,096) being sent
/// as one frame that cannot be encoded: it goes in parts, and the peer sees it whole,
/// once, when its last part is in.
#[test]
fn a_large_summary_goes_in_parts_and_arrives_whole() {
    let mut pair = Pair::new(config(1), config(2));
    let count = 3 * SUMMARY_PART_NAMESPACES_MAX + 5;
    pair.a.send_summary(many(count), pair.now);
    let mut frames = Vec::new();
    while let Some(f) = pair.a.poll_transmit() {
        frames.push(f);
    }
    let parts: Vec<usize> = frames
        .iter()
        .map(|f| match f {
            Frame::SummaryPart(p) | Frame::Summary(p) => p.len(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(parts, vec![4096, 4096, 4096, 5]);
    assert!(matches!(frames.last(), Some(Frame::Summary(_))));
    for (i, f) in frames.into_iter().enumerate() {
        pair.b.handle_frame(f, pair.now);
        let summaries: Vec<usize> = std::iter::from_fn(|| pair.b.poll_event())
            .filter_map(|e| match e {
                SessionEvent::PeerSummary(s) => Some(s.len()),
                _ => None,
            })
            .collect();
        // Nothing until the last part; then the whole summary, in order.
        assert_eq!(summaries, if i == 3 { vec![count] } else { vec![] });
    }
    assert!(pair.b.is_established());
}

/// A part is also cut by its bytes: a few namespaces with large vectors.
#[test]
fn summary_parts_are_bounded_in_bytes() {
    let mut big = VersionVector::new();
    for origin in 1..=2_000u64 {
        for c in 0..10 {
            big.insert(Dot {
                origin: node(origin),
                counter: 2 * c + 1,
            });
        }
    }
    let summary: Vec<_> = (0..20)
        .map(|i| holding(&format!("n{i}"), big.clone()))
        .collect();
    let each = summary[0].wire_bytes();
    assert!(each > 300_000, "{each}");
    let parts = summary_parts(summary);
    assert!(parts.len() > 1);
    for part in &parts {
        let bytes: usize = part.iter().map(|s| s.wire_bytes()).sum();
        assert!(part.len() == 1 || bytes <= SUMMARY_PART_BYTES, "{bytes}");
    }
    assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), 20);
}

/// A peer of protocol version 1 cannot read parts: it gets the first part alone, and
/// the session says how many namespaces that left out.
#[test]
fn a_version_one_peer_gets_the_first_part_only() {
    let mut old = config(2);
    old.version_max = 1;
    let mut pair = Pair::new(config(1), old);
    assert_eq!(pair.a.peer().unwrap().version, 1);
    pair.summaries(many(SUMMARY_PART_NAMESPACES_MAX + 10), many(1));
    assert_eq!(pair.a.summary_left_out(), 10);
    let got: Vec<usize> = pair
        .b_events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::PeerSummary(s) => Some(s.len()),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![SUMMARY_PART_NAMESPACES_MAX]);
    assert!(closed(&pair.a_events).is_none() && closed(&pair.b_events).is_none());
}

/// Parts beyond the whole summary's limit close the link (a peer cannot make this
/// node hold an unbounded summary).
#[test]
fn a_summary_without_end_is_bounded() {
    let mut pair = Pair::new(config(1), config(2));
    let part = many(SUMMARY_PART_NAMESPACES_MAX);
    for _ in 0..SUMMARY_NAMESPACES_MAX / SUMMARY_PART_NAMESPACES_MAX {
        pair.b
            .handle_frame(Frame::SummaryPart(part.clone()), pair.now);
    }
    assert!(pair.b.is_established());
    pair.b.handle_frame(Frame::SummaryPart(part), pair.now);
    assert!(!pair.b.is_established());
    let events: Vec<_> = std::iter::from_fn(|| pair.b.poll_event()).collect();
    let reason = closed(&events).expect("closed");
    assert_eq!(reason.code, ErrorCode::Protocol);
    assert!(reason.message.contains("namespaces"), "{}", reason.message);
}

/// A `RepairEnd` with a repair count is version 3: on an older link it closes the
/// link (an older peer never sends one; a newer one sends it only to version 3).
#[test]
fn a_counted_repair_end_on_a_version_two_link_is_a_protocol_error() {
    let mut old = config(2);
    old.version_max = 2;
    let mut pair = Pair::new(config(1), old);
    assert_eq!(pair.b.peer().unwrap().version, 2);
    pair.b.handle_frame(
        Frame::RepairEnd {
            id: 1,
            covered: None,
            repairs: None,
        },
        pair.now,
    );
    assert!(pair.b.is_established());
    pair.b.handle_frame(
        Frame::RepairEnd {
            id: 1,
            covered: None,
            repairs: Some(3),
        },
        pair.now,
    );
    let events: Vec<_> = std::iter::from_fn(|| pair.b.poll_event()).collect();
    let reason = closed(&events).expect("closed");
    assert_eq!(reason.code, ErrorCode::Protocol);
    assert!(
        reason.message.contains("version 1 or 2"),
        "{}",
        reason.message
    );
}

#[test]
fn a_peers_rights_narrow_what_a_session_replicates() {
    let l = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(super::intersect(&l(&["*"]), &l(&["*"])), l(&["*"]));
    assert_eq!(
        super::intersect(&l(&["*"]), &l(&["a", "b"])),
        l(&["a", "b"])
    );
    assert_eq!(
        super::intersect(&l(&["a", "c"]), &l(&["*"])),
        l(&["a", "c"])
    );
    assert_eq!(
        super::intersect(&l(&["a", "c"]), &l(&["a", "b"])),
        l(&["a"])
    );
    assert!(super::intersect(&l(&["c"]), &l(&["a"])).is_empty());
    // A peer's summary of namespaces not replicated with it is dropped, not passed on.
    let mut narrow = config(1);
    narrow.namespaces = l(&["a"]);
    let mut pair = Pair::new(narrow, config(2));
    pair.summaries(
        Vec::new(),
        vec![
            holding("a", VersionVector::new()),
            holding("b", VersionVector::new()),
        ],
    );
    let seen: Vec<String> = pair
        .a_events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::PeerSummary(s) => Some(
                s.iter()
                    .map(|n| n.namespace.to_string())
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(seen, vec!["a".to_owned()]);
}

#[test]
fn constant_time_eq_is_equality() {
    use super::constant_time_eq as eq;
    assert!(eq(b"", b""));
    assert!(eq(b"default", b"default"));
    assert!(!eq(b"default", b"defaulT"));
    assert!(!eq(b"default", b"default\0"));
    assert!(!eq(b"", b"\0"));
    assert!(!eq(b"a", b""));
}

/// A link between clusters "a" and "b": each side sends only namespace `shared` with
/// keys under `k1`, and refuses anything else (and the other cluster's claim to an
/// origin of its own, node 1 on side a).
fn federated(n: u64, own: &str, other: &str) -> SessionConfig {
    let mut c = SessionConfig::new(node(n), own);
    c.namespaces = vec!["shared".into()];
    let allowed = |e: &Event| e.namespace.as_str() == "shared" && e.key.as_str().starts_with("k1");
    c.federation = Some(Federation {
        peer_cluster_id: other.into(),
        may_send: std::sync::Arc::new(allowed),
        refuses: std::sync::Arc::new(move |e: &Event| {
            if !allowed(e) {
                Some("outside the share".into())
            } else if n == 1 && e.dot.origin == node(1) {
                Some("an origin of this cluster".into())
            } else {
                None
            }
        }),
    });
    c
}

#[test]
fn a_link_to_another_cluster_carries_only_what_the_share_allows() {
    // Without federation, two clusters do not meet; with it, each expects the other's id.
    let mut pair = Pair::new(federated(1, "a", "b"), federated(2, "b", "a"));
    assert!(closed(&pair.a_events).is_none(), "{:?}", pair.a_events);
    let mut wrong = Pair::new(federated(1, "a", "c"), federated(2, "b", "a"));
    assert_eq!(
        closed(&wrong.a_events).map(|r| r.code),
        Some(ErrorCode::ClusterMismatch)
    );
    wrong.pump();

    pair.summaries(vec![], vec![]);
    // k1 goes, k2 and k10's sibling under another key do not.
    let (sent, _) = pair.a.send_events(
        1,
        2,
        vec![event("shared", 1, 1), event("shared", 1, 2)],
        pair.now,
    );
    assert_eq!(sent, 1);
    pair.pump();
    assert_eq!(
        delivered(&pair.b_events),
        vec![(
            1,
            2,
            vec![Dot {
                origin: node(1),
                counter: 1
            }]
        )]
    );

    // b sends a's own origin back: a refuses it and closes the link.
    let (sent, _) = pair
        .b
        .send_events(1, 1, vec![event("shared", 1, 1)], pair.now);
    assert_eq!(
        sent, 0,
        "b holds it from a: the view keeps it from going back"
    );
    let mut forged = event("shared", 1, 13);
    forged.key = Key::new("k1x").unwrap();
    pair.b.send_events(2, 2, vec![forged], pair.now);
    pair.pump();
    let reason = closed(&pair.a_events).expect("a closes");
    assert!(
        reason.message.contains("an origin of this cluster"),
        "{reason:?}"
    );
}

#[test]
fn a_pruned_origin_is_not_relayed_until_grafted_but_own_events_always_go() {
    let mut pair = Pair::new(config(1), config(2));
    pair.summaries(vec![], vec![]);
    // B asks A to stop relaying origin 3's events, and (ignored) A's own.
    assert!(pair.b.send_prune(vec![node(3), node(1)], pair.now));
    pair.pump();
    assert_eq!(pair.a.relay_state(), (0, 1));
    pair.a.send_events(
        1,
        3,
        vec![event("n", 3, 1), event("n", 1, 1), event("n", 4, 1)],
        pair.now,
    );
    pair.pump();
    let dots = |o: u64, c: u64| Dot {
        origin: node(o),
        counter: c,
    };
    assert_eq!(
        delivered(&pair.b_events),
        vec![(1, 3, vec![dots(1, 1), dots(4, 1)])]
    );
    assert_eq!(pair.a.relay_state(), (1, 1));
    // Grafted: relayed again.
    assert!(pair.b.send_graft(vec![node(3)], pair.now));
    pair.pump();
    pair.a.send_events(4, 4, vec![event("n", 3, 2)], pair.now);
    pair.pump();
    assert_eq!(
        delivered(&pair.b_events).last().unwrap(),
        &(4, 4, vec![dots(3, 2)])
    );
    // An empty graft undoes every prune.
    pair.b.send_prune(vec![node(3), node(4)], pair.now);
    pair.pump();
    assert_eq!(pair.a.relay_state().1, 2);
    pair.b.send_graft(vec![], pair.now);
    pair.pump();
    assert_eq!(pair.a.relay_state().1, 0);
    assert!(closed(&pair.a_events).is_none());
}

#[test]
fn prune_and_graft_go_only_to_peers_of_protocol_five() {
    let mut old = config(2);
    old.version_max = 4;
    let mut pair = Pair::new(config(1), old);
    pair.summaries(vec![], vec![]);
    assert!(!pair.a.peer_relays_by_tree());
    assert!(!pair.a.send_prune(vec![node(3)], pair.now));
    assert!(!pair.a.send_graft(vec![], pair.now));
    // One sent anyway (a broken peer) closes the link.
    pair.a.queue(
        Frame::Prune {
            origins: vec![node(3)],
        },
        pair.now,
    );
    pair.pump();
    // The version-4 side here is this build offering 4, which still knows the frame:
    // it refuses it by the link's version.
    assert_eq!(closed(&pair.b_events).unwrap().code, ErrorCode::Protocol);
}
