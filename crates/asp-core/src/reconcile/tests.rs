use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

const KEY: ItemKey = ItemKey {
    k0: 0x0123_4567_89ab_cdef,
    k1: 0xfedc_ba98_7654_3210,
};

fn item(n: u64) -> Item {
    // Spread the number over the item so that items differ everywhere.
    let mut out = [0u8; ITEM_BYTES];
    let mut h = SipHasher13::new_with_keys(7, 11);
    h.write_u64(n);
    let a = h.finish128();
    out[..8].copy_from_slice(&a.h1.to_le_bytes());
    out[8..16].copy_from_slice(&a.h2.to_le_bytes());
    out[16..24].copy_from_slice(&n.to_le_bytes());
    out[24..].copy_from_slice(&(!n).to_le_bytes());
    out
}

/// Streams the remote set's symbols (window, then extension) into a decoder against
/// the local set's, until it is done. Returns (remote only, local only, symbols).
fn reconcile(
    remote: &BTreeSet<Item>,
    local: &BTreeSet<Item>,
    window: usize,
) -> (BTreeSet<Item>, BTreeSet<Item>, usize) {
    let mut rw = Window::new(KEY, window);
    remote.iter().for_each(|i| rw.add(i));
    let mut lw = Window::new(KEY, window);
    local.iter().for_each(|i| lw.add(i));
    let mut rx = Extension::new(KEY, remote.iter().copied(), window as u64);
    let mut lx = Extension::new(KEY, local.iter().copied(), window as u64);
    let mut decoder = Decoder::new(KEY);
    let limit = 10 * (remote.len() + local.len()) + 100;
    for i in 0..limit {
        let (r, l) = if i < window {
            (rw.symbols()[i], lw.symbols()[i])
        } else {
            (rx.next_symbol(), lx.next_symbol())
        };
        // Through the wire format, as a peer would send it.
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        assert_eq!(bytes.len(), SYMBOL_BYTES);
        let r = Symbol::decode(&bytes).unwrap();
        decoder.push(&r, &l).unwrap();
        if decoder.is_done() {
            let mut remote_only = BTreeSet::new();
            let mut local_only = BTreeSet::new();
            for (item, side) in decoder.items() {
                let fresh = match side {
                    Side::Remote => remote_only.insert(*item),
                    Side::Local => local_only.insert(*item),
                };
                assert!(fresh);
            }
            return (remote_only, local_only, decoder.symbols());
        }
    }
    panic!("not decoded after {limit} symbols");
}

fn sets(shared: u64, remote_only: u64, local_only: u64) -> (BTreeSet<Item>, BTreeSet<Item>) {
    let common = (0..shared).map(item);
    let r: BTreeSet<Item> = common
        .clone()
        .chain((0..remote_only).map(|n| item(1_000_000 + n)))
        .collect();
    let l: BTreeSet<Item> = common
        .chain((0..local_only).map(|n| item(2_000_000 + n)))
        .collect();
    (r, l)
}

#[test]
fn equal_sets_need_one_symbol() {
    let (r, l) = sets(10_000, 0, 0);
    let (ro, lo, symbols) = reconcile(&r, &l, 1024);
    assert!(ro.is_empty() && lo.is_empty());
    assert_eq!(symbols, 1);
}

#[test]
fn empty_sets_and_one_empty_side() {
    let (ro, lo, _) = reconcile(&BTreeSet::new(), &BTreeSet::new(), 16);
    assert!(ro.is_empty() && lo.is_empty());
    let (r, l) = sets(0, 300, 0);
    let (ro, lo, _) = reconcile(&r, &l, 64);
    assert_eq!(ro, r);
    assert!(lo.is_empty());
    let (ro, lo, _) = reconcile(&l, &r, 64);
    assert!(ro.is_empty());
    assert_eq!(lo, r);
}

#[test]
fn about_one_and_a_half_symbols_per_difference() {
    let (r, l) = sets(20_000, 1_000, 1_000);
    let (ro, lo, symbols) = reconcile(&r, &l, 8192);
    assert_eq!(ro.len(), 1_000);
    assert_eq!(lo.len(), 1_000);
    // The paper's asymptote is 1.35; a fixed seed here lands close to it. A bound
    // loose enough for any reasonable mapping, tight enough to catch a broken one.
    let overhead = symbols as f64 / 2_000.0;
    assert!(
        (1.2..1.7).contains(&overhead),
        "{symbols} symbols for 2,000 differences"
    );
}

#[test]
fn index_mapping_follows_its_density() {
    // Index j should hold an item with probability about 2 / (j + 2).
    let n = 20_000u64;
    let mut hits = vec![0u32; 1_001];
    for i in 0..n {
        let (_, seed) = KEY.hash(&item(i));
        let mut m = Mapping::new(seed);
        let mut index = 0;
        while index <= 1_000 {
            hits[index as usize] += 1;
            index = m.advance();
        }
    }
    for j in [0usize, 1, 2, 10, 100, 1_000] {
        let expected = 2.0 / (j as f64 + 2.0);
        let got = f64::from(hits[j]) / n as f64;
        assert!(
            (got - expected).abs() < 0.15 * expected + 0.005,
            "index {j}: {got:.4} of items, expected {expected:.4}"
        );
    }
}

#[test]
fn window_upkeep_equals_a_rebuild() {
    let mut kept = Window::new(KEY, 512);
    for n in 0..2_000 {
        kept.add(&item(n));
    }
    for n in (0..2_000).step_by(3) {
        kept.remove(&item(n));
    }
    for n in (1..2_000).step_by(3) {
        kept.replace(&item(n), &item(n + 10_000));
    }
    let mut fresh = Window::new(KEY, 512);
    let items: Vec<Item> = (0..2_000)
        .filter(|n| n % 3 == 2)
        .chain((1..2_000).step_by(3).map(|n| n + 10_000))
        .map(item)
        .collect();
    fresh.add_all(&items);
    assert_eq!(kept.symbols(), fresh.symbols());
    assert_eq!(kept.items(), fresh.items());
}

#[test]
fn extension_continues_the_window() {
    let items: Vec<Item> = (0..3_000).map(item).collect();
    let mut long = Window::new(KEY, 600);
    items.iter().for_each(|i| long.add(i));
    let mut ext = Extension::new(KEY, items.iter().copied(), 200);
    for index in 200..600 {
        assert_eq!(ext.next_symbol(), long.symbols()[index], "symbol {index}");
    }
}

#[test]
fn a_peer_under_another_key_is_noticed_or_never_done() {
    let (r, l) = sets(1_000, 20, 20);
    let mut rw = Window::new(ItemKey::new([9; 16]), 256);
    r.iter().for_each(|i| rw.add(i));
    let mut lw = Window::new(KEY, 256);
    l.iter().for_each(|i| lw.add(i));
    let mut decoder = Decoder::new(KEY);
    for i in 0..256 {
        if decoder.push(&rw.symbols()[i], &lw.symbols()[i]).is_err() {
            return;
        }
        assert!(!decoder.is_done(), "decoded a difference that is not one");
    }
}

#[test]
fn symbol_encoding_round_trips_what_decoding_needs() {
    let mut w = Window::new(KEY, 4);
    for n in 0..300 {
        w.add(&item(n));
    }
    let s = w.symbols()[0];
    let mut bytes = Vec::new();
    s.encode(&mut bytes);
    let back = Symbol::decode(&bytes).unwrap();
    assert_eq!(back.sum, s.sum);
    assert_eq!(back.check, s.check & CHECK_MASK);
    assert_eq!(back.count, 300 % 4);
    assert!(Symbol::decode(&bytes[..SYMBOL_BYTES - 1]).is_none());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any two sets, any difference (none, some, all on either side): the decoder finds
    /// exactly the symmetric difference, each item on the right side.
    #[test]
    fn reconciliation_finds_exactly_the_symmetric_difference(
        shared in 0u64..600,
        remote_only in 0u64..200,
        local_only in 0u64..200,
        window in prop_oneof![Just(1usize), Just(16), Just(256), Just(4096)],
        salt in any::<u64>(),
    ) {
        let common = (0..shared).map(|n| item(n ^ (salt << 32)));
        let r: BTreeSet<Item> = common.clone()
            .chain((0..remote_only).map(|n| item(n + 10_000 + (salt << 32))))
            .collect();
        let l: BTreeSet<Item> = common
            .chain((0..local_only).map(|n| item(n + 20_000 + (salt << 32))))
            .collect();
        let (ro, lo, _) = reconcile(&r, &l, window);
        prop_assert_eq!(ro, r.difference(&l).copied().collect::<BTreeSet<_>>());
        prop_assert_eq!(lo, l.difference(&r).copied().collect::<BTreeSet<_>>());
    }
}

#[test]
fn items_share_their_key_half_and_differ_by_version() {
    use crate::{Dot, Hlc, NodeId};
    let v = |counter| Version {
        hlc: Hlc::new(1_700_000_000_000, 0),
        dot: Dot {
            origin: NodeId::new(7).unwrap(),
            counter,
        },
    };
    let a = KEY.item(b"user/1", &v(1));
    let b = KEY.item(b"user/1", &v(2));
    let c = KEY.item(b"user/2", &v(1));
    assert_eq!(a[..16], b[..16]);
    assert_ne!(a[16..], b[16..]);
    assert_ne!(a[..16], c[..16]);
    // Another key gives other items.
    assert_ne!(ItemKey::new([1; 16]).item(b"user/1", &v(1)), a);
    // Pinned: a change here changes every node's items, which is a protocol change.
    let hex: String = a.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "aa7aca884612a30d0fe1ba74e02fba845db5ac2336a4a5c67598100097d9d2aa"
    );
}

#[test]
fn the_index_mapping_is_pinned() {
    // Every node must map an item to the same symbols: a change here is a protocol
    // change.
    let (_, seed) = KEY.hash(&item(1));
    let mut m = Mapping::new(seed);
    let mut indices = vec![0];
    while indices.len() < 12 {
        indices.push(m.advance());
    }
    assert_eq!(
        indices,
        vec![0, 1, 3, 12, 19, 21, 32, 45, 97, 129, 390, 423]
    );
}

#[test]
fn windows_built_in_parts_merge_into_the_whole() {
    let items: Vec<Item> = (0..200_000).map(item).collect();
    let mut one = Window::new(KEY, 512);
    one.add_all(&items);
    let parallel = Window::build(KEY, 512, &items, 3);
    assert_eq!(one.symbols(), parallel.symbols());
    assert_eq!(one.items(), parallel.items());
    let small = Window::build(KEY, 512, &items[..10], 4);
    let mut direct = Window::new(KEY, 512);
    direct.add_all(&items[..10]);
    assert_eq!(small.symbols(), direct.symbols());
}
