//! Feeds arbitrary bytes to the JSON, CBOR and MessagePack readers and converters of
//! the HTTP API: no panic, whatever the input.
#![no_main]

use asp_core::ContentType;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for ct in ContentType::ALL {
        let _ = asp_http::formats::validate(ct, data);
        if let Ok(doc) = asp_http::formats::parse(ct, data) {
            for to in [ContentType::Json, ContentType::Cbor, ContentType::MsgPack] {
                let _ = asp_http::formats::render(&doc, to);
            }
        }
    }
});
