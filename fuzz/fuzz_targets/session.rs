//! Drives the replication session (asp-core, sans-IO) with an arbitrary sequence of
//! inputs: frames decoded from the fuzzer's bytes by the real wire codec, timeouts,
//! acknowledgements of what it handed over, local events to send, disconnects. The
//! session must never panic; every frame it sends must encode and decode back to
//! itself; the batches it hands the node must follow each other without gap or
//! overlap; and once closed it hands over nothing more.
#![no_main]

use std::time::{Duration, Instant};

use asp_core::session::{Frame, Hello, Session, SessionConfig, SessionEvent};
use asp_core::{ContentType, Dot, Event, Hlc, Key, Namespace, NodeId, Op};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

const ME: u64 = 1;
const PEER: u64 = 2;

fn peer_hello() -> Frame {
    Frame::Hello(Hello {
        version_min: asp_core::session::PROTOCOL_VERSION_MIN,
        version_max: asp_core::session::PROTOCOL_VERSION_MAX,
        cluster_id: "fuzz".to_owned(),
        node_id: NodeId::new(PEER).unwrap(),
        labels: Vec::new(),
        namespaces: vec!["*".to_owned()],
        heartbeat_ms: 1000,
        idle_timeout_ms: 10_000,
        incarnation: 7,
    })
}

struct Driver {
    session: Session,
    now: Instant,
    /// Batches handed over and not yet acknowledged: (last_seq, bytes).
    unapplied: Vec<(u64, u64)>,
    last_handed: Option<u64>,
    closed: bool,
    local_seq: u64,
}

impl Driver {
    fn drain(&mut self) {
        while let Some(frame) = self.session.poll_transmit() {
            let mut bytes = Vec::new();
            asp_wire::encode(&frame, &mut bytes).expect("a frame the session sends encodes");
            let (back, used) = asp_wire::decode(&bytes)
                .expect("a sent frame decodes")
                .expect("whole frame");
            assert_eq!(used, bytes.len());
            assert_eq!(back, frame, "a sent frame changed on the wire");
        }
        while let Some(event) = self.session.poll_event() {
            assert!(!self.closed, "an event after Closed: {event:?}");
            match event {
                SessionEvent::Events {
                    first_seq,
                    last_seq,
                    bytes,
                    ..
                } => {
                    assert!(first_seq >= 1 && first_seq <= last_seq);
                    if let Some(previous) = self.last_handed {
                        assert_eq!(first_seq, previous + 1, "a batch handed over out of order");
                    }
                    self.last_handed = Some(last_seq);
                    self.unapplied.push((last_seq, bytes));
                }
                SessionEvent::Closed(_) => self.closed = true,
                _ => {}
            }
        }
    }

    fn local_event(&mut self) -> Event {
        self.local_seq += 1;
        Event {
            namespace: Namespace::new("n").unwrap(),
            key: Key::new("k").unwrap(),
            op: Op::Put {
                content_type: ContentType::Text,
                value: Bytes::from_static(b"v"),
            },
            dot: Dot {
                origin: NodeId::new(ME).unwrap(),
                counter: self.local_seq,
            },
            hlc: Hlc::new(self.local_seq, 0),
            context: Bytes::new(),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let mut config = SessionConfig::new(NodeId::new(ME).unwrap(), "fuzz");
    config.incarnation = 3;
    config.credit_window_bytes = 4096;
    let now = Instant::now();
    let mut d = Driver {
        session: Session::new(config, now),
        now,
        unapplied: Vec::new(),
        last_handed: None,
        closed: false,
        local_seq: 0,
    };
    if first & 1 == 0 {
        // Most runs skip the handshake the fuzzer would have to find first.
        d.session.handle_frame(peer_hello(), d.now);
    }
    d.drain();
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        match op % 8 {
            0..=2 => match asp_wire::decode(rest) {
                Ok(Some((frame, used))) => {
                    rest = &rest[used..];
                    d.session.handle_frame(frame, d.now);
                }
                _ => return,
            },
            3 => {
                let step = rest.first().copied().unwrap_or(0);
                rest = rest.get(1..).unwrap_or_default();
                d.now += Duration::from_millis(u64::from(step) * 100);
                d.session.handle_timeout(d.now);
            }
            4 => {
                // The node applied the oldest batches durably, in order.
                let n = (op / 8) as usize % 4 + 1;
                for (last_seq, bytes) in d.unapplied.drain(..n.min(d.unapplied.len())) {
                    d.session.applied(last_seq, bytes, d.now);
                }
            }
            5 => {
                if d.session.can_send() {
                    let n = (op / 8) as usize % 4 + 1;
                    let first_seq = d.local_seq + 1;
                    let events: Vec<Event> = (0..n).map(|_| d.local_event()).collect();
                    d.session.send_events(first_seq, d.local_seq, events, d.now);
                }
            }
            6 => {
                d.session.flush_events(d.now);
                d.session.set_local_head(d.local_seq);
                d.session.send_summary(Vec::new(), d.now);
            }
            _ => {
                if op == 255 {
                    d.session.handle_disconnect("fuzz");
                }
            }
        }
        d.drain();
    }
});
