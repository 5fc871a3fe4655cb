//! JSON shapes of the API: how versions, clocks, events and values are written.

use asp_core::{ContentType, Dot, Event, Hlc, Op};
use asp_store::{Applied, FeedEvent};
use base64::Engine as _;
use serde::Serialize;
use serde_json::value::RawValue;

pub(crate) const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Serialize)]
pub(crate) struct DotOut {
    pub origin: String,
    pub counter: u64,
}

impl From<Dot> for DotOut {
    fn from(d: Dot) -> Self {
        DotOut {
            origin: d.origin.to_string(),
            counter: d.counter,
        }
    }
}

#[derive(Serialize)]
pub(crate) struct HlcOut {
    pub physical_ms: u64,
    pub logical: u16,
}

impl From<Hlc> for HlcOut {
    fn from(h: Hlc) -> Self {
        HlcOut {
            physical_ms: h.physical_ms(),
            logical: h.logical(),
        }
    }
}

/// The answer to a single-key write.
#[derive(Serialize)]
pub(crate) struct WriteOut<'a> {
    pub namespace: &'a str,
    pub key: &'a str,
    pub version: String,
    pub dot: DotOut,
    pub hlc: HlcOut,
    pub seq: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

impl<'a> WriteOut<'a> {
    pub fn new(namespace: &'a str, key: &'a str, applied: Applied, deleted: bool) -> Self {
        WriteOut {
            namespace,
            key,
            version: applied.dot.to_string(),
            dot: applied.dot.into(),
            hlc: applied.hlc.into(),
            seq: applied.seq,
            deleted,
        }
    }
}

/// A value inside a JSON envelope: JSON values as themselves, text as a string,
/// anything else as base64.
#[derive(Serialize, Default)]
pub(crate) struct ValueOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
}

impl<'a> ValueOut<'a> {
    pub fn new(content_type: ContentType, bytes: &'a [u8]) -> Self {
        match content_type {
            ContentType::Json => {
                if let Ok(raw) = serde_json::from_slice::<&RawValue>(bytes) {
                    return ValueOut {
                        value: Some(raw),
                        ..Default::default()
                    };
                }
            }
            ContentType::Text => {
                if let Ok(text) = std::str::from_utf8(bytes) {
                    return ValueOut {
                        value_text: Some(text),
                        ..Default::default()
                    };
                }
            }
            _ => {}
        }
        ValueOut {
            value_base64: Some(BASE64.encode(bytes)),
            ..Default::default()
        }
    }
}

/// One change-feed entry.
#[derive(Serialize)]
pub(crate) struct ChangeOut<'a> {
    pub seq: u64,
    pub namespace: &'a str,
    pub key: &'a str,
    pub op: &'static str,
    pub version: String,
    pub dot: DotOut,
    pub hlc: HlcOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<&'static str>,
    /// A put with a time to live: when its key expires (clock milliseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// A leader namespace's event: the epoch its origin led.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(flatten)]
    pub value: ValueOut<'a>,
}

impl<'a> ChangeOut<'a> {
    pub fn new(fe: &'a FeedEvent, with_values: bool) -> Self {
        let e: &Event = &fe.event;
        let (op, content_type, value) = match &e.op {
            Op::Put {
                content_type,
                value,
            } => (
                "put",
                Some(content_type.mime()),
                if with_values {
                    ValueOut::new(*content_type, value)
                } else {
                    ValueOut::default()
                },
            ),
            Op::Delete => ("delete", None, ValueOut::default()),
        };
        ChangeOut {
            seq: fe.seq,
            namespace: e.namespace.as_str(),
            key: e.key.as_str(),
            op,
            version: e.dot.to_string(),
            dot: e.dot.into(),
            hlc: e.hlc.into(),
            content_type,
            expires_ms: (e.expires_ms != 0).then_some(e.expires_ms),
            epoch: (e.epoch != 0).then_some(e.epoch),
            value,
        }
    }
}

/// A page of the change feed.
#[derive(Serialize)]
pub(crate) struct ChangesOut<'a> {
    pub namespace: &'a str,
    pub changes: Vec<ChangeOut<'a>>,
    pub next: u64,
    pub head: u64,
}

/// Appends `s` as a JSON string, as serde_json writes it: without a copy of the
/// string when nothing in it needs escaping (serde_json leaves non-ASCII as is).
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    if s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(&serde_json::to_string(s).expect("strings serialize"));
    } else {
        out.push('"');
        out.push_str(s);
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::push_json_str;

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let strings = [
            "",
            "plain/key-01",
            "quo\"te",
            "back\\slash",
            "tab\tnew\nline",
            "\u{1}\u{1f}",
            "\u{7f}",
            "ünï/κλειδί/🔑",
            "</script>",
        ];
        for s in strings {
            let mut out = String::from("x");
            push_json_str(&mut out, s);
            assert_eq!(out[1..], serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }
}
