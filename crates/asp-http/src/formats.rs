//! Payload formats: checking a body against its declared media type, converting
//! between JSON, CBOR and MessagePack, and choosing what to serve from `Accept`.
//!
//! Conversion goes through [`Doc`], a structured value that holds what the three formats
//! share (null, booleans, integers, floats, text, byte strings, arrays, maps with any
//! keys, in order). What a target cannot express (bytes, NaN or non-text map keys in
//! JSON; integers beyond 64 bits in MessagePack; CBOR tags and MessagePack extension
//! types anywhere) is refused with a message that names it, never approximated.

use std::fmt::{self, Write as _};

use asp_core::ContentType;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Serialize, Serializer};

/// Nesting depth accepted in structured values.
const DEPTH_MAX: usize = 128;

/// A structured value, in order, as read from JSON, CBOR or MessagePack.
#[derive(Debug, Clone, PartialEq)]
pub enum Doc {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
    Array(Vec<Doc>),
    Map(Vec<(Doc, Doc)>),
}

/// Why a body is not valid for its media type, or cannot be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the body is not valid {format}: {detail}")]
    Invalid {
        format: &'static str,
        detail: String,
    },
    #[error("the value cannot be represented as {format}: {detail}")]
    NotRepresentable {
        format: &'static str,
        detail: String,
    },
}

fn format_name(ct: ContentType) -> &'static str {
    match ct {
        ContentType::Json => "JSON",
        ContentType::Cbor => "CBOR",
        ContentType::MsgPack => "MessagePack",
        ContentType::Text => "UTF-8 text",
        ContentType::Protobuf => "protobuf",
        ContentType::OctetStream => "bytes",
    }
}

/// Checks that `body` is well formed for `ct`. Protobuf and octet-stream bodies are
/// opaque and always pass.
pub fn validate(ct: ContentType, body: &[u8]) -> Result<(), FormatError> {
    match ct {
        ContentType::Json | ContentType::Cbor | ContentType::MsgPack => parse(ct, body).map(drop),
        ContentType::Text => {
            std::str::from_utf8(body)
                .map(drop)
                .map_err(|e| FormatError::Invalid {
                    format: "UTF-8 text",
                    detail: e.to_string(),
                })
        }
        ContentType::Protobuf | ContentType::OctetStream => Ok(()),
    }
}

/// Reads a structured body.
pub fn parse(ct: ContentType, body: &[u8]) -> Result<Doc, FormatError> {
    let invalid = |detail: String| FormatError::Invalid {
        format: format_name(ct),
        detail,
    };
    match ct {
        ContentType::Json => {
            serde_json::from_slice::<Doc>(body).map_err(|e| invalid(e.to_string()))
        }
        ContentType::Cbor => {
            let mut reader = body;
            let doc: Doc = ciborium::de::from_reader_with_recursion_limit(&mut reader, DEPTH_MAX)
                .map_err(|e| invalid(cbor_error(e)))?;
            if !reader.is_empty() {
                return Err(invalid(format!(
                    "{} bytes after the end of the first item",
                    reader.len()
                )));
            }
            Ok(doc)
        }
        ContentType::MsgPack => {
            let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(body));
            de.set_max_depth(DEPTH_MAX);
            let doc = Doc::deserialize(&mut de).map_err(|e| invalid(e.to_string()))?;
            let used = de.position() as usize;
            if used != body.len() {
                return Err(invalid(format!(
                    "{} bytes after the end of the first item",
                    body.len() - used
                )));
            }
            Ok(doc)
        }
        other => Err(FormatError::NotRepresentable {
            format: format_name(other),
            detail: "only JSON, CBOR and MessagePack are structured".into(),
        }),
    }
}

fn cbor_error<E: fmt::Debug>(e: ciborium::de::Error<E>) -> String {
    match e {
        ciborium::de::Error::Io(e) => format!("truncated input ({e:?})"),
        ciborium::de::Error::Syntax(at) => format!("syntax error at byte {at}"),
        ciborium::de::Error::Semantic(at, msg) => match at {
            Some(at) => format!("{msg} at byte {at}"),
            None => msg,
        },
        ciborium::de::Error::RecursionLimitExceeded => {
            format!("nested deeper than {DEPTH_MAX} levels")
        }
    }
}

/// Writes a structured value in `ct`.
pub fn render(doc: &Doc, ct: ContentType) -> Result<Vec<u8>, FormatError> {
    match ct {
        ContentType::Json => {
            let mut out = String::new();
            write_json(doc, &mut out)?;
            Ok(out.into_bytes())
        }
        ContentType::Cbor => {
            let mut out = Vec::new();
            ciborium::ser::into_writer(doc, &mut out).map_err(|e| {
                FormatError::NotRepresentable {
                    format: "CBOR",
                    detail: e.to_string(),
                }
            })?;
            Ok(out)
        }
        ContentType::MsgPack => {
            check_msgpack(doc)?;
            rmp_serde::to_vec(doc).map_err(|e| FormatError::NotRepresentable {
                format: "MessagePack",
                detail: e.to_string(),
            })
        }
        other => Err(FormatError::NotRepresentable {
            format: format_name(other),
            detail: "only JSON, CBOR and MessagePack are structured".into(),
        }),
    }
}

/// Converts a body from one structured format to another (a copy when they are equal).
pub fn convert(body: &[u8], from: ContentType, to: ContentType) -> Result<Vec<u8>, FormatError> {
    if from == to {
        return Ok(body.to_vec());
    }
    render(&parse(from, body)?, to)
}

fn not_json(detail: &str) -> FormatError {
    FormatError::NotRepresentable {
        format: "JSON",
        detail: detail.into(),
    }
}

fn write_json(doc: &Doc, out: &mut String) -> Result<(), FormatError> {
    match doc {
        Doc::Null => out.push_str("null"),
        Doc::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Doc::Int(i) => write!(out, "{i}").expect("writing to a String"),
        Doc::Float(f) => {
            if !f.is_finite() {
                return Err(not_json("it holds a NaN or infinite number"));
            }
            out.push_str(&serde_json::to_string(f).expect("finite floats serialize"));
        }
        Doc::Text(s) => out.push_str(&serde_json::to_string(s).expect("strings serialize")),
        Doc::Bytes(_) => return Err(not_json("it holds a byte string")),
        Doc::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, out)?;
            }
            out.push(']');
        }
        Doc::Map(entries) => {
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let Doc::Text(k) = k else {
                    return Err(not_json("it holds a map key that is not a string"));
                };
                out.push_str(&serde_json::to_string(k).expect("strings serialize"));
                out.push(':');
                write_json(v, out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn check_msgpack(doc: &Doc) -> Result<(), FormatError> {
    match doc {
        Doc::Int(i) if *i < i64::MIN as i128 || *i > u64::MAX as i128 => {
            Err(FormatError::NotRepresentable {
                format: "MessagePack",
                detail: format!("the integer {i} needs more than 64 bits"),
            })
        }
        Doc::Array(items) => items.iter().try_for_each(check_msgpack),
        Doc::Map(entries) => entries.iter().try_for_each(|(k, v)| {
            check_msgpack(k)?;
            check_msgpack(v)
        }),
        _ => Ok(()),
    }
}

impl Serialize for Doc {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Doc::Null => s.serialize_unit(),
            Doc::Bool(b) => s.serialize_bool(*b),
            Doc::Int(i) => {
                if let Ok(v) = i64::try_from(*i) {
                    s.serialize_i64(v)
                } else if let Ok(v) = u64::try_from(*i) {
                    s.serialize_u64(v)
                } else {
                    s.serialize_i128(*i)
                }
            }
            Doc::Float(f) => s.serialize_f64(*f),
            Doc::Text(t) => s.serialize_str(t),
            Doc::Bytes(b) => s.serialize_bytes(b),
            Doc::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Doc::Map(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Doc {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DocVisitor)
    }
}

struct DocVisitor;

impl<'de> Visitor<'de> for DocVisitor {
    type Value = Doc;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a structured value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Doc, E> {
        Ok(Doc::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Doc, E> {
        Ok(Doc::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Doc, E> {
        Ok(Doc::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Doc, E> {
        Ok(Doc::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Doc, E> {
        i128::try_from(v)
            .map(Doc::Int)
            .map_err(|_| E::custom("integer larger than 2^127"))
    }
    fn visit_f32<E>(self, v: f32) -> Result<Doc, E> {
        Ok(Doc::Float(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Doc, E> {
        Ok(Doc::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Doc, E> {
        Ok(Doc::Text(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Doc, E> {
        Ok(Doc::Text(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Doc, E> {
        Ok(Doc::Bytes(v.to_vec()))
    }
    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Doc, E> {
        Ok(Doc::Bytes(v))
    }
    fn visit_none<E>(self) -> Result<Doc, E> {
        Ok(Doc::Null)
    }
    fn visit_unit<E>(self) -> Result<Doc, E> {
        Ok(Doc::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Doc, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, _: D) -> Result<Doc, D::Error> {
        Err(de::Error::custom(
            "MessagePack extension types are not supported",
        ))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<Doc, A::Error> {
        Err(de::Error::custom("CBOR tags are not supported"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Doc, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Doc::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Doc, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(1024));
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Doc::Map(entries))
    }
}

/// Why a `Content-Type` header is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedMediaType(pub String);

/// Reads a `Content-Type` header. A missing header means `application/octet-stream`.
pub fn content_type_of(header: Option<&str>) -> Result<ContentType, UnsupportedMediaType> {
    let Some(header) = header else {
        return Ok(ContentType::OctetStream);
    };
    let mut parts = header.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    let ct = ContentType::from_mime_essence(essence).ok_or_else(|| {
        UnsupportedMediaType(format!(
            "Content-Type {essence:?} is not supported; use one of {}",
            supported_list()
        ))
    })?;
    for param in parts {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        if name.trim().eq_ignore_ascii_case("charset") {
            let value = value.trim().trim_matches('"');
            if !value.eq_ignore_ascii_case("utf-8") && !value.eq_ignore_ascii_case("utf8") {
                return Err(UnsupportedMediaType(format!(
                    "charset {value:?} is not supported; send UTF-8 and say charset=utf-8 (or nothing)"
                )));
            }
        }
    }
    Ok(ct)
}

pub fn supported_list() -> String {
    ContentType::ALL
        .iter()
        .map(|c| c.mime())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The types a value stored as `stored` can be served as.
pub fn servable(stored: ContentType) -> Vec<ContentType> {
    if stored.is_structured() {
        let mut v = vec![stored];
        v.extend(
            [ContentType::Json, ContentType::Cbor, ContentType::MsgPack]
                .into_iter()
                .filter(|c| *c != stored),
        );
        v
    } else {
        vec![stored]
    }
}

/// Picks the type to serve a value stored as `stored`, given the `Accept` header.
/// Returns `None` when nothing acceptable can be served.
pub fn negotiate(accept: Option<&str>, stored: ContentType) -> Option<ContentType> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Some(stored);
    };
    let candidates = servable(stored);
    // (quality, preference) for each candidate; the stored type wins ties, then the
    // candidates' fixed order.
    let mut best: Option<(u32, usize, ContentType)> = None;
    for (rank, candidate) in candidates.iter().enumerate() {
        let mut quality: Option<(u8, u32)> = None; // (specificity, q in thousandths)
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let mut q = 1000u32;
            for p in parts {
                if let Some((n, v)) = p.split_once('=')
                    && n.trim().eq_ignore_ascii_case("q")
                {
                    q = parse_q(v.trim()).unwrap_or(0);
                }
            }
            let (ty, sub) = candidate.mime().split_once('/').expect("mime has a slash");
            let specificity = if media == "*/*" {
                1
            } else if media.strip_suffix("/*") == Some(ty) {
                2
            } else if ContentType::from_mime_essence(&media) == Some(*candidate)
                || media == format!("{ty}/{sub}")
            {
                3
            } else {
                continue;
            };
            // The most specific matching range decides the quality.
            if quality.is_none_or(|(s, _)| specificity > s) {
                quality = Some((specificity, q));
            }
        }
        if let Some((_, q)) = quality.filter(|&(_, q)| q > 0)
            && best.is_none_or(|(bq, _, _)| q > bq)
        {
            best = Some((q, rank, *candidate));
        }
    }
    best.map(|(_, _, ct)| ct)
}

fn parse_q(v: &str) -> Option<u32> {
    let f: f64 = v.parse().ok()?;
    (0.0..=1.0)
        .contains(&f)
        .then(|| (f * 1000.0).round() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|i| serde_json::json!(i)),
            any::<u64>().prop_map(|i| serde_json::json!(i)),
            (-1e15f64..1e15).prop_map(|f| serde_json::json!(f)),
            "\\PC{0,12}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("\\PC{0,8}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn json_survives_every_format_and_back(v in json_value()) {
            let json = serde_json::to_vec(&v).unwrap();
            for via in [ContentType::Cbor, ContentType::MsgPack] {
                let there = convert(&json, ContentType::Json, via).unwrap();
                validate(via, &there).unwrap();
                let back = convert(&there, via, ContentType::Json).unwrap();
                let round: serde_json::Value = serde_json::from_slice(&back).unwrap();
                prop_assert_eq!(&round, &v);
                // CBOR <-> MessagePack directly, too.
                let other = if via == ContentType::Cbor { ContentType::MsgPack } else { ContentType::Cbor };
                let across = convert(&there, via, other).unwrap();
                let back2: serde_json::Value = serde_json::from_slice(&convert(&across, other, ContentType::Json).unwrap()).unwrap();
                prop_assert_eq!(&back2, &v);
            }
        }

        #[test]
        fn parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            for ct in ContentType::ALL {
                let _ = validate(ct, &bytes);
                if let Ok(doc) = parse(ct, &bytes) {
                    for to in [ContentType::Json, ContentType::Cbor, ContentType::MsgPack] {
                        let _ = render(&doc, to);
                    }
                }
            }
        }
    }

    #[test]
    fn json_key_order_is_kept() {
        let json = br#"{"z":1,"a":[true,null,"x"],"m":{"b":2.5,"a":-3}}"#;
        for via in [ContentType::Cbor, ContentType::MsgPack] {
            let back = convert(
                &convert(json, ContentType::Json, via).unwrap(),
                via,
                ContentType::Json,
            )
            .unwrap();
            assert_eq!(back, json.to_vec());
        }
    }

    #[test]
    fn what_json_cannot_hold_is_refused_by_name() {
        let bytes_cbor = [0x42, 1, 2]; // a CBOR byte string
        let e = convert(&bytes_cbor, ContentType::Cbor, ContentType::Json).unwrap_err();
        assert!(e.to_string().contains("byte string"), "{e}");
        let int_key = [0xa1, 0x01, 0x02]; // {1: 2}
        let e = convert(&int_key, ContentType::Cbor, ContentType::Json).unwrap_err();
        assert!(e.to_string().contains("map key"), "{e}");
        let nan = [0xf9, 0x7e, 0x00];
        let e = convert(&nan, ContentType::Cbor, ContentType::Json).unwrap_err();
        assert!(e.to_string().contains("NaN"), "{e}");
        let tagged = [0xc1, 0x1a, 0, 0, 0, 1]; // tag 1 (epoch time)
        assert!(
            parse(ContentType::Cbor, &tagged)
                .unwrap_err()
                .to_string()
                .contains("tags")
        );
        let big = [0xc2, 0x49, 1, 0, 0, 0, 0, 0, 0, 0, 0]; // 2^64 as a bignum
        let e = convert(&big, ContentType::Cbor, ContentType::MsgPack).unwrap_err();
        assert!(e.to_string().contains("64 bits"), "{e}");
        assert_eq!(
            convert(&big, ContentType::Cbor, ContentType::Json).unwrap(),
            b"18446744073709551616"
        );
        let ext = [0xd4, 0x01, 0x00]; // fixext1
        assert!(
            parse(ContentType::MsgPack, &ext)
                .unwrap_err()
                .to_string()
                .contains("extension")
        );
    }

    #[test]
    fn trailing_bytes_and_bad_text_are_invalid() {
        assert!(validate(ContentType::Json, b"{} x").is_err());
        assert!(validate(ContentType::Cbor, &[0x01, 0x01]).is_err());
        assert!(validate(ContentType::MsgPack, &[0x01, 0x01]).is_err());
        assert!(validate(ContentType::Text, &[0xff]).is_err());
        assert!(validate(ContentType::OctetStream, &[0xff]).is_ok());
        // Depth is bounded: valid documents nested 200 deep (balanced, so that only the
        // depth check can refuse them), and 100 deep, which passes.
        let deep = |levels: usize| {
            [
                (
                    ContentType::Json,
                    ["[".repeat(levels), "]".repeat(levels)]
                        .concat()
                        .into_bytes(),
                ),
                (ContentType::Cbor, [vec![0x81; levels], vec![0xf6]].concat()),
                (
                    ContentType::MsgPack,
                    [vec![0x91; levels], vec![0xc0]].concat(),
                ),
            ]
        };
        for (ct, doc) in deep(200) {
            let err = validate(ct, &doc).unwrap_err().to_string();
            assert!(
                err.contains("recursion limit") || err.contains("deep") || err.contains("depth"),
                "{ct:?}: {err}"
            );
        }
        for (ct, doc) in deep(100) {
            assert!(validate(ct, &doc).is_ok(), "{ct:?} 100 deep");
        }
    }

    #[test]
    fn content_type_headers() {
        assert_eq!(content_type_of(None), Ok(ContentType::OctetStream));
        assert_eq!(
            content_type_of(Some("application/json; charset=UTF-8")),
            Ok(ContentType::Json)
        );
        assert!(content_type_of(Some("application/json; charset=latin1")).is_err());
        assert!(
            content_type_of(Some("application/x-www-form-urlencoded"))
                .unwrap_err()
                .0
                .contains("application/json")
        );
    }

    #[test]
    fn accept_negotiation() {
        use ContentType::*;
        let check = |accept: Option<&str>, stored, want: Option<ContentType>| {
            assert_eq!(
                negotiate(accept, stored),
                want,
                "Accept: {accept:?}, stored {stored:?}"
            );
        };
        check(None, Json, Some(Json));
        check(Some("*/*"), Cbor, Some(Cbor));
        check(Some("application/cbor"), Json, Some(Cbor));
        check(Some("application/x-msgpack"), Json, Some(MsgPack));
        check(
            Some("application/json;q=0.5, application/cbor"),
            Json,
            Some(Cbor),
        );
        check(Some("application/*"), Cbor, Some(Cbor));
        check(Some("text/*"), Text, Some(Text));
        check(Some("application/json"), OctetStream, None);
        check(Some("application/json;q=0"), Json, None);
        check(Some("*/*;q=0.1, application/json;q=0"), Json, Some(Cbor));
        check(Some("image/png"), Json, None);
    }
}
