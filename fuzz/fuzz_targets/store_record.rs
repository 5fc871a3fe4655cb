//! Feeds arbitrary bytes to the store's record codec (log frames, record bodies, key
//! index entries, version vectors): no decoder panics, and whatever decodes survives
//! encoding again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    asp_store::fuzz::record_codec(data);
});
