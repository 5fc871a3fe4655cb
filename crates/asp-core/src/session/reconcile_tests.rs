//! The reconciler between two in-memory stores, frames passed by hand so that a test
//! can hold one back.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::reconcile::Output;
use super::*;
use crate::reconcile::{Item, ItemKey, Window};
use crate::{ContentType, Dot, Event, Hlc, Key, Namespace, NodeId, Op, VersionVector};

fn node(n: u64) -> NodeId {
    NodeId::new(n).unwrap()
}

fn ns() -> Namespace {
    Namespace::new("ns").unwrap()
}

fn event(origin: u64, counter: u64) -> Event {
    Event {
        namespace: ns(),
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
    }
}

/// One namespace's keys, each at its latest event, and the dots held.
#[derive(Default)]
struct MemStore {
    keys: RefCell<BTreeMap<Key, Event>>,
    vector: RefCell<VersionVector>,
    /// What peers' `RepairEnd`s covered.
    covered: RefCell<VersionVector>,
}

impl MemStore {
    fn with(events: impl IntoIterator<Item = Event>) -> MemStore {
        let store = MemStore::default();
        for e in events {
            store.apply(e);
        }
        store
    }

    fn apply(&self, e: Event) {
        self.vector.borrow_mut().insert(e.dot);
        let mut keys = self.keys.borrow_mut();
        if keys
            .get(&e.key)
            .is_none_or(|c| crate::lww_wins(&e.version(), &c.version()))
        {
            keys.insert(e.key.clone(), e);
        }
    }

    fn item_list(&self) -> Vec<Item> {
        self.keys
            .borrow()
            .values()
            .map(|e| self.item_key().item(e.key.as_str().as_bytes(), &e.version()))
            .collect()
    }
}

impl ReconcileStore for MemStore {
    type Error = String;

    fn item_key(&self) -> ItemKey {
        ItemKey::derive(b"reconcile tests")
    }
    fn keeps_windows(&self) -> bool {
        true
    }
    fn summary(&self) -> Vec<NamespaceSummary> {
        vec![NamespaceSummary {
            namespace: ns(),
            max_hlc: Hlc::ZERO,
            vector: self.vector.borrow().clone(),
            digest: Some(self.window(&ns()).unwrap().symbols()[0].canonical()),
            reports: Vec::new(),
        }]
    }
    fn namespace_vector(&self, _: &Namespace) -> VersionVector {
        self.vector.borrow().clone()
    }
    fn is_quarantined(&self, _: &Namespace) -> bool {
        false
    }
    fn head_seq(&self) -> u64 {
        0
    }
    fn bases(&self) -> Vec<(Namespace, VersionVector)> {
        Vec::new()
    }
    fn holds_lost_events_of<'a>(
        &self,
        _: NodeId,
        _: &dyn Fn(&Namespace) -> Option<&'a VersionVector>,
        _: &dyn Fn(&Namespace) -> bool,
    ) -> bool {
        false
    }
    fn window_snapshot(&self, namespace: &Namespace) -> Result<(Window, u64), String> {
        Ok((self.window(namespace)?, 0))
    }
    fn window(&self, _: &Namespace) -> Result<Window, String> {
        Ok(Window::build(self.item_key(), 64, &self.item_list(), 1))
    }
    fn items_snapshot(&self, namespace: &Namespace) -> Result<(Vec<Item>, u64), String> {
        Ok((self.items(namespace)?, 0))
    }
    fn items(&self, _: &Namespace) -> Result<Vec<Item>, String> {
        Ok(self.item_list())
    }
    fn events_for_items(
        &self,
        _: &Namespace,
        prefixes: &[[u8; NEED_PREFIX_BYTES]],
        _: usize,
        _: usize,
    ) -> Result<(Vec<Event>, bool), String> {
        let key = self.item_key();
        let found = self
            .keys
            .borrow()
            .values()
            .filter(|e| {
                let item = key.item(e.key.as_str().as_bytes(), &e.version());
                prefixes.iter().any(|p| item[..NEED_PREFIX_BYTES] == p[..])
            })
            .cloned()
            .collect();
        Ok((found, false))
    }
    fn state_page(
        &self,
        _: &Namespace,
        after: Option<&Key>,
        _: usize,
        _: usize,
    ) -> Result<(Vec<Event>, Option<Key>), String> {
        let page = self
            .keys
            .borrow()
            .values()
            .filter(|e| after.is_none_or(|a| &e.key > a))
            .cloned()
            .collect();
        Ok((page, None))
    }
    fn cover(&self, _: &Namespace, vector: VersionVector) -> Result<(), String> {
        self.covered.borrow_mut().join(&vector);
        self.vector.borrow_mut().join(&vector);
        Ok(())
    }
}

/// What a side sent, in order: a frame, or a `Repair` batch.
enum Sent {
    Frame(Frame),
    Repair(u32, Vec<Event>),
}

struct Side {
    reconciler: Reconciler,
    store: MemStore,
    closed: Option<String>,
}

impl Side {
    fn new(id: u64, peer: u64, version: u16, events: Vec<Event>) -> Side {
        let mut reconciler = Reconciler::new(node(id), vec!["ns".into()], 1 << 20);
        reconciler.set_peer(node(peer), version, vec!["ns".into()]);
        Side {
            reconciler,
            store: MemStore::with(events),
            closed: None,
        }
    }

    /// Steps the reconciler and collects what it sends.
    fn step(&mut self, now: Instant) -> Vec<Sent> {
        self.reconciler.step(&self.store, true, 1 << 30, now);
        let mut sent = Vec::new();
        while let Some(output) = self.reconciler.poll_output() {
            match output {
                Output::Send(frame) => sent.push(Sent::Frame(frame)),
                Output::Repair { id, events } => sent.push(Sent::Repair(id, events)),
                Output::Close { message, .. } => self.closed = Some(message),
                _ => {}
            }
        }
        sent
    }

    fn receive(&mut self, sent: Sent, now: Instant) {
        match sent {
            Sent::Frame(frame) => self.reconciler.handle_frame(&self.store, frame, now),
            Sent::Repair(id, events) => {
                self.reconciler.repair_received(id, events.len());
                let n = events.len();
                events.into_iter().for_each(|e| self.store.apply(e));
                self.reconciler.repaired(id, n);
            }
        }
    }
}

/// A holds ten keys, B five of them; A (the lower id) starts an anti-entropy run.
/// Frames go back and forth until both are quiet; `hold` picks a `Repair` from A to B
/// to deliver only after everything A sends after it.
fn run(version: u16, hold: impl Fn(&Sent) -> bool) -> (Side, Side) {
    let now = Instant::now();
    let mut a = Side::new(1, 2, version, (1..=10).map(|c| event(1, c)).collect());
    let mut b = Side::new(2, 1, version, (1..=5).map(|c| event(1, c)).collect());
    let theirs: SummaryMap = b
        .store
        .summary()
        .into_iter()
        .map(|s| (s.namespace.clone(), s))
        .collect();
    a.reconciler.handle_summary(&a.store, Arc::new(theirs));
    // A run starts when the digests differ at two checks in a row.
    a.reconciler.anti_entropy_tick(&a.store, true);
    a.reconciler.anti_entropy_tick(&a.store, true);
    let mut held = Vec::new();
    for _ in 0..100 {
        let from_a = a.step(now);
        let from_b = b.step(now);
        if from_a.is_empty() && from_b.is_empty() {
            break;
        }
        for sent in from_a {
            if held.is_empty() && hold(&sent) {
                held.push(sent);
            } else {
                b.receive(sent, now);
            }
        }
        for sent in from_b {
            a.receive(sent, now);
        }
    }
    for sent in held {
        b.receive(sent, now);
    }
    (a, b)
}

fn a_repair(sent: &Sent) -> bool {
    matches!(sent, Sent::Repair(..))
}

#[test]
fn a_run_brings_the_lacking_side_every_key() {
    let (_, b) = run(PROTOCOL_VERSION_MAX, |_| false);
    assert_eq!(b.closed, None);
    assert_eq!(b.store.keys.borrow().len(), 10);
    assert!(b.store.covered.borrow().contains(Dot {
        origin: node(1),
        counter: 10
    }));
}

// Guards against: a Repair overtaken by its RepairEnd going unnoticed, so the receiver
// covers dots whose events it never applied (then drops them as held when they come).
#[test]
fn a_repair_end_that_overtakes_its_repairs_covers_nothing_and_closes_the_link() {
    let (_, b) = run(PROTOCOL_VERSION_MAX, a_repair);
    let closed = b.closed.expect("the link is closed");
    assert!(
        closed.contains("RepairEnd counts 5 repair events, 0 arrived"),
        "{closed}"
    );
    assert!(b.store.covered.borrow().is_empty());
}

// What version 3 mends: on a version-2 link the receiver cannot tell, and covers the
// missing keys' dots before their events arrive.
#[test]
fn on_a_version_2_link_the_overtaken_repair_goes_unnoticed() {
    let (_, b) = run(2, a_repair);
    assert_eq!(b.closed, None);
    assert!(b.store.covered.borrow().contains(Dot {
        origin: node(1),
        counter: 10
    }));
}
