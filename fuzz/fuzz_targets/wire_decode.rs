//! Feeds arbitrary bytes to the peer protocol decoder: it must never panic, and any
//! frame it accepts must encode back to a frame that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = asp_wire::decode(rest) {
        let mut again = Vec::new();
        asp_wire::encode(&frame, &mut again).expect("a decoded frame encodes");
        let (back, _) = asp_wire::decode(&again).expect("re-encoded frame decodes").expect("whole frame");
        assert_eq!(back, frame);
        rest = &rest[used..];
    }
});
