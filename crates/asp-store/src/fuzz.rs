//! Entry points for the fuzz targets in `fuzz/` (not part of the store's API). They
//! reach the private record codec so that arbitrary bytes can be fed to every decoder
//! the store reads its own files with.

use bytes::Bytes;

use crate::codec::{
    EventRef, FRAME_HEADER_BYTES, Frame, IndexEntry, check_frame, decode_record, decode_vv,
    encode_record, encode_vv, record_fits, record_head,
};

/// Feeds `data` to every decoder of `codec.rs`, both as a log region (frames walked
/// from the start, as recovery does) and as a bare record body, index entry and
/// version vector. Panics only on a bug: a decoder that panics, or a decoded value
/// that does not survive encoding again.
pub fn record_codec(data: &[u8]) {
    // As a log region: walk the frames the way a scan does.
    let mut rest = data;
    while let Frame::Complete { total } = check_frame(rest) {
        record_body(&Bytes::copy_from_slice(&rest[FRAME_HEADER_BYTES..total]));
        rest = &rest[total..];
    }
    // As a bare body, which a checksum would otherwise keep the decoder from seeing.
    record_body(&Bytes::copy_from_slice(data));
    if let Ok(entry) = IndexEntry::decode(data) {
        assert_eq!(
            IndexEntry::decode(&entry.encode()).as_ref(),
            Ok(&entry),
            "an index entry changed through encoding"
        );
    }
    if let Ok(vv) = decode_vv(data) {
        assert_eq!(
            decode_vv(&encode_vv(&vv)).as_ref(),
            Ok(&vv),
            "a version vector changed through encoding"
        );
    }
}

fn record_body(body: &Bytes) {
    let head = record_head(body);
    let Ok(record) = decode_record(body) else {
        return;
    };
    let head = head.expect("a record that decodes has a readable head");
    assert_eq!(head.seq, record.seq);
    assert_eq!(head.namespace, record.event.namespace.as_str().as_bytes());
    let event = EventRef::from_event(&record.event);
    if !record_fits(&event) {
        // The writer never appends such a record, and a scan refuses its frame.
        return;
    }
    let mut framed = Vec::new();
    encode_record(&mut framed, record.seq, record.flags, &event);
    assert_eq!(
        check_frame(&framed),
        Frame::Complete {
            total: framed.len()
        },
        "an encoded record does not frame"
    );
    let again = decode_record(&Bytes::copy_from_slice(&framed[FRAME_HEADER_BYTES..]))
        .expect("an encoded record decodes");
    assert_eq!(again, record, "a record changed through encoding");
}
