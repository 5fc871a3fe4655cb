//! Feeds arbitrary bytes to the CRDT state and causal-context decoders: they never
//! panic, whatever decodes survives encoding again, and decoded states can be read and
//! joined (with themselves, and with a state decoded from the other half of the input)
//! without panicking.
#![no_main]

use asp_core::crdt::{State, decode_context, encode_context};
use libfuzzer_sys::fuzz_target;

fn check(bytes: &[u8]) -> Option<State> {
    if let Ok(context) = decode_context(bytes) {
        let again = decode_context(&encode_context(&context)).expect("an encoded context decodes");
        assert_eq!(again, context, "a context changed through encoding");
    }
    let state = State::decode(bytes).ok()?;
    let again = State::decode(&state.encode()).expect("an encoded state decodes");
    assert_eq!(again, state, "a state changed through encoding");
    read(&state);
    let mut joined = state.clone();
    joined.join(&state).expect("a state joins its own policy");
    read(&joined);
    Some(state)
}

fn read(state: &State) {
    match state {
        State::Counter(c) => {
            let _ = c.value();
        }
        State::Set(s) => {
            let _ = s.members().count();
        }
        State::Siblings(r) => {
            let _ = r.siblings();
        }
        State::JsonMap(m) => {
            let _ = m.fields().count();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let (a, b) = data.split_at(data.len() / 2);
    if let (Some(mut a), Some(b)) = (check(a), check(b)) {
        // Different policies refuse to join; the same policy joins.
        let same = a.policy() == b.policy();
        assert_eq!(a.join(&b).is_ok(), same);
        read(&a);
    }
});
