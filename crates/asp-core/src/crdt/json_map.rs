//! The `json-map` policy's state.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::{CrdtError, Reader, put_bytes, put_dot, put_u32};
use crate::{Hlc, Version};

/// A JSON object merged per top-level field by last-writer-wins. Field values are
/// kept as JSON text (this crate does not parse JSON); `None` marks a removed field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JsonMap {
    fields: BTreeMap<String, (Version, Option<Bytes>)>,
}

impl JsonMap {
    /// The present fields and their JSON text, in name order.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &Bytes)> {
        self.fields
            .iter()
            .filter_map(|(k, (_, v))| v.as_ref().map(|v| (k.as_str(), v)))
    }

    pub fn get(&self, field: &str) -> Option<&Bytes> {
        self.fields.get(field).and_then(|(_, v)| v.as_ref())
    }

    /// The delta of setting (`Some`) or removing (`None`) fields at `version`.
    pub fn patch(
        version: Version,
        changes: impl IntoIterator<Item = (String, Option<Bytes>)>,
    ) -> JsonMap {
        JsonMap {
            fields: changes
                .into_iter()
                .map(|(k, v)| (k, (version, v)))
                .collect(),
        }
    }

    pub fn join(&mut self, other: &JsonMap) {
        for (k, (version, value)) in &other.fields {
            match self.fields.get(k) {
                Some((mine, _))
                    if mine >= version
                        || crate::mutation::active(
                            crate::mutation::Mutation::JsonMapJoinKeepsFirst,
                        ) => {}
                _ => {
                    self.fields.insert(k.clone(), (*version, value.clone()));
                }
            }
        }
    }
}

impl JsonMap {
    /// The state's body in [`super::State::encode`]'s form (after the policy tag).
    pub(super) fn encode_into(&self, out: &mut Vec<u8>) {
        put_u32(out, self.fields.len());
        for (k, (version, value)) in &self.fields {
            put_bytes(out, k.as_bytes());
            out.extend_from_slice(&version.hlc.as_raw().to_le_bytes());
            put_dot(out, version.dot);
            match value {
                Some(v) => {
                    out.push(1);
                    put_bytes(out, v);
                }
                None => out.push(0),
            }
        }
    }

    /// Reads what [`JsonMap::encode_into`] wrote.
    pub(super) fn decode_from(r: &mut Reader<'_>) -> Result<JsonMap, CrdtError> {
        let mut m = JsonMap::default();
        let n = r.count(29)?;
        for _ in 0..n {
            let name = std::str::from_utf8(r.bytes()?)
                .map_err(|_| r.err("a field name that is not UTF-8"))?
                .to_owned();
            let hlc = Hlc::from_raw(r.u64()?);
            let dot = r.dot()?;
            let value = match r.u8()? {
                0 => None,
                1 => Some(Bytes::copy_from_slice(r.bytes()?)),
                f => return Err(r.err(&format!("bad field flag {f}"))),
            };
            m.fields.insert(name, (Version { hlc, dot }, value));
        }
        Ok(m)
    }
}
