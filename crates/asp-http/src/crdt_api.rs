//! The HTTP face of the conflict policies beyond `lww` (docs/CONFLICTS.md): a
//! namespace's policy, reads of CRDT keys rendered as JSON, and their operations.
//!
//! - `GET/PUT /v1/ns/{ns}/policy` — `{"policy": "counter"}`; fixed once data exists.
//! - `counter`: `POST .../kv/{key}` `{"incr": n}`; read as a JSON number.
//! - `set`: `POST .../kv/{key}` `{"add": v}` / `{"remove": v}`; read as a sorted JSON
//!   array (members compare by their compact JSON text).
//! - `json-map`: `PATCH .../kv/{key}` with a JSON merge patch (RFC 7396), merged per
//!   path at every depth; read as an object.
//! - `siblings`: `PUT`/`DELETE .../kv/{key}` with the `X-Asp-Context` token of a read
//!   replace exactly what that read saw; without it a PUT adds a sibling. A read of one
//!   sibling serves its value; of several, `300 Multiple Choices` with a JSON listing.

use std::collections::BTreeMap;

use asp_core::crdt::{self, Change, Context, PATH_DEPTH_MAX, Policy, Shown, State};
use asp_core::{ContentType, Key, Namespace};
use asp_store::{CrdtOp, Store, WriteOp};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;

use crate::error::ApiError;

/// The header that carries a siblings read's causal context, and a write's.
pub const CONTEXT_HEADER: &str = "x-asp-context";
/// Bytes of keyed hash that authenticate a context token.
const TOKEN_MAC_BYTES: usize = 12;

/// A token for `context` as read from `namespace`/`key`: the context's bytes and a
/// keyed hash of them with the namespace and key, so that a token cannot be forged
/// or carried to another key.
pub fn context_token(store: &Store, namespace: &Namespace, key: &Key, context: &Context) -> String {
    let mut bytes = crdt::encode_context(context);
    let mac = token_mac(store, namespace, key, &bytes);
    bytes.extend_from_slice(&mac);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn token_mac(
    store: &Store,
    namespace: &Namespace,
    key: &Key,
    context: &[u8],
) -> [u8; TOKEN_MAC_BYTES] {
    let mut data =
        Vec::with_capacity(16 + namespace.as_str().len() + key.as_str().len() + context.len());
    data.extend_from_slice(b"asp context token\0");
    data.extend_from_slice(&(namespace.as_str().len() as u32).to_le_bytes());
    data.extend_from_slice(namespace.as_str().as_bytes());
    data.extend_from_slice(&(key.as_str().len() as u32).to_le_bytes());
    data.extend_from_slice(key.as_str().as_bytes());
    data.extend_from_slice(context);
    let h = store.context_key().key_hash(&data);
    h[..TOKEN_MAC_BYTES].try_into().expect("16 bytes")
}

/// The context of a write's `X-Asp-Context` header (empty without one). A token that
/// does not decode or whose hash is wrong is `invalid_context` (400). One naming
/// versions this node does not hold (read elsewhere, not arrived yet) is the store's
/// to refuse when it writes: `context_ahead` (409).
pub fn write_context(
    store: &Store,
    headers: &HeaderMap,
    namespace: &Namespace,
    key: &Key,
) -> Result<Context, ApiError> {
    let Some(raw) = headers.get(CONTEXT_HEADER) else {
        return Ok(Context::default());
    };
    let invalid = |why: &str| {
        ApiError::bad_request(
            "invalid_context",
            format!(
                "the {CONTEXT_HEADER} header is not a context token of this key: {why}; send the token a read of this key returned, or none to add a sibling"
            ),
        )
    };
    let raw = raw.to_str().map_err(|_| invalid("not ASCII"))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(raw.trim())
        .map_err(|_| invalid("not base64url"))?;
    if bytes.len() < TOKEN_MAC_BYTES {
        return Err(invalid("too short"));
    }
    let (context, mac) = bytes.split_at(bytes.len() - TOKEN_MAC_BYTES);
    // Compared in constant time: how long a refusal takes says nothing of how many
    // bytes of a guess were right.
    let expected = token_mac(store, namespace, key, context);
    if !asp_core::session::constant_time_eq(&expected, mac) {
        return Err(invalid(
            "its signature does not match (forged, damaged, or from another key)",
        ));
    }
    crdt::decode_context(context).map_err(|e| invalid(&e.to_string()))
}

/// `GET` of a key of a CRDT namespace.
pub async fn get(store: &Store, namespace: &Namespace, key: &Key) -> Result<Response, ApiError> {
    store.caught_up().await?;
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "key {:?} does not exist in namespace {namespace}",
                key.as_str()
            ),
        )
    };
    let state = store
        .crdt_state(namespace, key.as_str())?
        .ok_or_else(not_found)?;
    let json = |body: String| {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    };
    Ok(match state {
        State::Counter(c) => json(c.value().to_string()),
        State::Set(s) => {
            let members: Vec<&str> = s
                .members()
                .map(|m| std::str::from_utf8(m).unwrap_or("null"))
                .collect();
            json(format!("[{}]", members.join(",")))
        }
        State::JsonMap(m) => json(json_map_document(&m).to_string()),
        State::Siblings(r) => {
            let token = context_token(store, namespace, key, r.context());
            let siblings = r.siblings();
            let mut response = match siblings.as_slice() {
                [] => return Err(not_found()),
                [(_, one)] => {
                    let ct = ContentType::from_code(one.content_type)
                        .unwrap_or(ContentType::OctetStream);
                    (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, ct.mime())],
                        one.value.clone(),
                    )
                        .into_response()
                }
                many => {
                    let listed = sibling_list(many);
                    (
                        StatusCode::MULTIPLE_CHOICES,
                        [(header::CONTENT_TYPE, "application/json")],
                        serde_json::json!({"siblings": listed, "context": token}).to_string(),
                    )
                        .into_response()
                }
            };
            response.headers_mut().insert(
                CONTEXT_HEADER,
                HeaderValue::from_str(&token).expect("base64url is a valid header"),
            );
            response
        }
    })
}

/// A CRDT key's state as JSON, as a listing with `values=true` shows it: a counter's
/// number, a set's array, a map's object, or `{"siblings": [...], "context": token}`.
pub fn state_json(
    store: &Store,
    namespace: &Namespace,
    key: &Key,
    state: &State,
) -> serde_json::Value {
    let parse = |b: &[u8]| serde_json::from_slice(b).unwrap_or(serde_json::Value::Null);
    match state {
        State::Counter(c) => {
            let v = c.value();
            i64::try_from(v).map_or_else(|_| serde_json::Value::String(v.to_string()), |n| n.into())
        }
        State::Set(s) => serde_json::Value::Array(s.members().map(|m| parse(m)).collect()),
        State::JsonMap(m) => json_map_document(m),
        State::Siblings(r) => serde_json::json!({
            "siblings": sibling_list(&r.siblings()),
            "context": context_token(store, namespace, key, r.context()),
        }),
    }
}

fn sibling_list(siblings: &[(asp_core::Dot, &crdt::Sibling)]) -> Vec<serde_json::Value> {
    siblings
        .iter()
        .map(|(dot, s)| {
            let ct = ContentType::from_code(s.content_type).unwrap_or(ContentType::OctetStream);
            let value = match ct {
                ContentType::Json => {
                    serde_json::from_slice(&s.value).unwrap_or(serde_json::Value::Null)
                }
                _ => match std::str::from_utf8(&s.value) {
                    Ok(t) if ct == ContentType::Text => serde_json::Value::String(t.to_owned()),
                    _ => serde_json::Value::String(
                        base64::engine::general_purpose::STANDARD.encode(&s.value),
                    ),
                },
            };
            serde_json::json!({
                "version": dot.to_string(),
                "content_type": ct.mime(),
                "encoding": match ct {
                    ContentType::Json => "json",
                    ContentType::Text => "text",
                    _ => "base64",
                },
                "value": value,
            })
        })
        .collect()
}

/// The operation a `POST` body names: `{"incr": n}`, `{"reset": true}`, `{"add": v}`
/// or `{"remove": v}`.
pub fn post_op(body: &[u8]) -> Result<CrdtOp, ApiError> {
    let invalid = |why: String| {
        ApiError::bad_request(
            "invalid_body",
            format!(
                "{why}; send {{\"incr\": n}} or {{\"reset\": true}} to a counter, {{\"add\": value}} or {{\"remove\": value}} to a set"
            ),
        )
    };
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("the body is not JSON: {e}")))?;
    let obj = value
        .as_object()
        .filter(|o| o.len() == 1)
        .ok_or_else(|| invalid("the body must be an object with one field".into()))?;
    let (name, arg) = obj.iter().next().expect("one field");
    match name.as_str() {
        "incr" => arg.as_i64().map(CrdtOp::Incr).ok_or_else(|| {
            invalid(format!(
                "incr takes an integer between {} and {}",
                i64::MIN,
                i64::MAX
            ))
        }),
        "reset" if arg == &serde_json::Value::Bool(true) => Ok(CrdtOp::Reset),
        "reset" => Err(invalid("reset takes true: {\"reset\": true}".into())),
        "add" => Ok(CrdtOp::Add(Bytes::from(arg.to_string()))),
        "remove" => Ok(CrdtOp::Remove(Bytes::from(arg.to_string()))),
        other => Err(invalid(format!("unknown operation {other:?}"))),
    }
}

/// A json-map's document: its shown paths as nested JSON objects.
fn json_map_document(map: &crdt::JsonMap) -> serde_json::Value {
    let mut root = serde_json::Map::new();
    // Parents come before their children, so each path's parent is in place.
    'paths: for (path, shown) in map.shown() {
        let (name, parents) = path.split_last().expect("paths are not empty");
        let mut object = &mut root;
        for parent in parents {
            match object.get_mut(parent) {
                Some(serde_json::Value::Object(o)) => object = o,
                _ => continue 'paths,
            }
        }
        let value = match shown {
            Shown::Value(text) => serde_json::from_slice(text).unwrap_or(serde_json::Value::Null),
            Shown::Object => serde_json::Value::Object(serde_json::Map::new()),
        };
        object.insert(name.clone(), value);
    }
    serde_json::Value::Object(root)
}

/// The path changes a JSON merge patch (RFC 7396) makes to a json-map: an object at
/// every path where the patch holds an object, the value (replacing what was below)
/// where it holds anything else, a removal where it holds `null`. The store writes
/// them all at one version; `asp_core::crdt::JsonMap` merges them per path.
pub fn patch_op(
    store: &Store,
    namespace: &Namespace,
    key: &Key,
    body: &[u8],
) -> Result<CrdtOp, ApiError> {
    let patch: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("invalid_patch", format!("the merge patch is not JSON: {e}"))
    })?;
    let serde_json::Value::Object(fields) = patch else {
        return Err(ApiError::bad_request(
            "invalid_patch",
            "a json-map is patched with a JSON object (RFC 7396 merge patch) naming the fields to set, or null to remove",
        ));
    };
    if fields.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_patch",
            "the merge patch changes no field",
        ));
    }
    let current = match store.crdt_state(namespace, key.as_str())? {
        Some(State::JsonMap(m)) => m,
        _ => crdt::JsonMap::default(),
    };
    Ok(CrdtOp::Patch(json_map_changes(&current, fields)?))
}

/// The changes a merge patch (its top-level object) makes to `current`.
fn json_map_changes(
    current: &crdt::JsonMap,
    patch: serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<(Vec<String>, Change)>, ApiError> {
    let mut changes = BTreeMap::new();
    patch_changes(current, &mut Vec::new(), patch, &mut changes)?;
    Ok(changes.into_iter().collect())
}

/// The changes of `patch`, an object of the merge patch at `path`, into `out`.
fn patch_changes(
    current: &crdt::JsonMap,
    path: &mut Vec<String>,
    patch: serde_json::Map<String, serde_json::Value>,
    out: &mut BTreeMap<Vec<String>, Change>,
) -> Result<(), ApiError> {
    for (name, value) in patch {
        path.push(name);
        if path.len() > PATH_DEPTH_MAX {
            return Err(ApiError::bad_request(
                "invalid_patch",
                format!(
                    "the merge patch reaches {} fields deep (at {}); a json-map holds paths up to {PATH_DEPTH_MAX} fields deep: store deeper structure as a value inside an array, or flatten it",
                    path.len(),
                    serde_json::to_string(&path[..PATH_DEPTH_MAX]).expect("strings serialize")
                ),
            ));
        }
        match value {
            serde_json::Value::Null => set(out, path, Change::Remove),
            serde_json::Value::Object(fields) => {
                // A top-level field written before maps nested holds its object as one
                // value: its fields are written out at this patch's version, so that
                // they are kept, and merge per path from now on.
                if let Some(Shown::Value(text)) = current.shown_at(path)
                    && let Ok(serde_json::Value::Object(old)) = serde_json::from_slice(text)
                {
                    write_out(path, old, out);
                }
                out.insert(path.clone(), Change::Object);
                patch_changes(current, path, fields, out)?;
            }
            other => {
                let text = serde_json::to_string(&other).expect("values serialize");
                set(out, path, Change::Set(Bytes::from(text)));
            }
        }
        path.pop();
    }
    Ok(())
}

/// Records a value or a removal at `path`, which replaces whatever this patch wrote
/// below it.
fn set(out: &mut BTreeMap<Vec<String>, Change>, path: &[String], change: Change) {
    out.retain(|p, _| !(p.len() > path.len() && p.starts_with(path)));
    out.insert(path.to_vec(), change);
}

/// The changes that write `object`'s fields out below `path`: objects as paths, down
/// to the depth limit, where an object stays one value.
fn write_out(
    path: &mut Vec<String>,
    object: serde_json::Map<String, serde_json::Value>,
    out: &mut BTreeMap<Vec<String>, Change>,
) {
    for (name, value) in object {
        path.push(name);
        match value {
            serde_json::Value::Object(fields) if path.len() < PATH_DEPTH_MAX => {
                out.insert(path.clone(), Change::Object);
                write_out(path, fields, out);
            }
            serde_json::Value::Null => {}
            other => {
                let text = serde_json::to_string(&other).expect("values serialize");
                out.insert(path.clone(), Change::Set(Bytes::from(text)));
            }
        }
        path.pop();
    }
}

/// A siblings write of a `PUT` (value) or `DELETE` (none).
pub fn sibling_write(key: Key, context: Context, value: Option<(ContentType, Bytes)>) -> WriteOp {
    WriteOp::crdt(key, CrdtOp::Write { context, value })
}

/// `GET /v1/ns/{ns}/policy`'s and `PUT`'s answer.
pub fn policy_body(namespace: &Namespace, policy: Policy) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({"namespace": namespace.as_str(), "policy": policy.name()}).to_string(),
    )
        .into_response()
}

/// The policy a `PUT /v1/ns/{ns}/policy` body names.
pub fn parse_policy(body: &[u8]) -> Result<Policy, ApiError> {
    let names: Vec<&str> = Policy::ALL.iter().map(|p| p.name()).collect();
    let invalid = |why: String| {
        ApiError::bad_request(
            "invalid_body",
            format!(
                "{why}; send {{\"policy\": \"<one of {}>\"}}",
                names.join(", ")
            ),
        )
    };
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("the body is not JSON: {e}")))?;
    if let Some(other) = value
        .as_object()
        .and_then(|o| o.keys().find(|k| *k != "policy"))
    {
        return Err(invalid(format!("unknown field {other:?}")));
    }
    let name = value
        .get("policy")
        .and_then(|p| p.as_str())
        .ok_or_else(|| invalid("no \"policy\" field".into()))?;
    Policy::parse(name).ok_or_else(|| invalid(format!("unknown policy {name:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use asp_core::{Dot, Hlc, NodeId, Version};

    fn version(ms: u64) -> Version {
        Version {
            hlc: Hlc::new(ms, 0),
            dot: Dot {
                origin: NodeId::new(1).unwrap(),
                counter: ms,
            },
        }
    }

    /// `current` patched with `patch` at a newer version, as the document a read shows.
    fn patched(current: &crdt::JsonMap, patch: &str) -> Result<serde_json::Value, ApiError> {
        let serde_json::Value::Object(fields) = serde_json::from_str(patch).unwrap() else {
            panic!("an object")
        };
        let mut m = current.clone();
        m.join(&current.patch(version(100), json_map_changes(current, fields)?));
        Ok(json_map_document(&m))
    }

    #[test]
    fn a_merge_patch_follows_rfc_7396_at_every_depth() {
        let m = crdt::JsonMap::default();
        let doc = patched(&m, r#"{"a":{"b":{"c":1},"d":[{"x":1}]},"e":null}"#).unwrap();
        assert_eq!(
            doc,
            serde_json::json!({"a": {"b": {"c": 1}, "d": [{"x": 1}]}})
        );
        let mut m = crdt::JsonMap::default();
        m.join(
            &crdt::JsonMap::default().patch(
                version(1),
                json_map_changes(
                    &m,
                    serde_json::from_str(r#"{"a":{"b":{"c":1,"k":2}}}"#).unwrap(),
                )
                .unwrap(),
            ),
        );
        // Objects merge, a value replaces an object, null removes, `{}` keeps.
        assert_eq!(
            patched(&m, r#"{"a":{"b":{"c":null,"n":3}}}"#).unwrap(),
            serde_json::json!({"a": {"b": {"k": 2, "n": 3}}})
        );
        assert_eq!(
            patched(&m, r#"{"a":{"b":7}}"#).unwrap(),
            serde_json::json!({"a": {"b": 7}})
        );
        assert_eq!(
            patched(&m, r#"{"a":{}}"#).unwrap(),
            serde_json::json!({"a": {"b": {"c": 1, "k": 2}}})
        );
    }

    /// A top-level field written before maps nested holds its object whole: a patch
    /// that descends into it keeps its fields, and from then on they merge per path.
    #[test]
    fn a_patch_into_an_object_written_whole_keeps_its_fields() {
        // The layout of old data (tag 4, docs/PROTOCOL.md): one field, its
        // version, and its value.
        let text = br#"{"en":true,"old":{"x":1},"gone":2}"#;
        let mut old = vec![4];
        old.extend_from_slice(&1u32.to_le_bytes());
        old.extend_from_slice(&5u32.to_le_bytes());
        old.extend_from_slice(b"langs");
        old.extend_from_slice(&version(1).hlc.as_raw().to_le_bytes());
        old.extend_from_slice(&1u64.to_le_bytes());
        old.extend_from_slice(&1u64.to_le_bytes());
        old.push(1);
        old.extend_from_slice(&(text.len() as u32).to_le_bytes());
        old.extend_from_slice(text);
        let Ok(State::JsonMap(legacy)) = State::decode(&old) else {
            panic!("a json-map state of tag 4")
        };
        assert_eq!(State::JsonMap(legacy.clone()).encode(), old);
        assert_eq!(
            patched(
                &legacy,
                r#"{"langs":{"fr":true,"gone":null,"old":{"y":2}}}"#
            )
            .unwrap(),
            serde_json::json!({"langs": {"en": true, "fr": true, "old": {"x": 1, "y": 2}}})
        );
    }

    #[test]
    fn a_patch_deeper_than_the_limit_is_refused() {
        let deep = |depth: usize| {
            let mut patch = "1".to_owned();
            for _ in 0..depth {
                patch = format!(r#"{{"a":{patch}}}"#);
            }
            patched(&crdt::JsonMap::default(), &patch)
        };
        assert!(deep(PATH_DEPTH_MAX).is_ok());
        let err = deep(PATH_DEPTH_MAX + 1).unwrap_err();
        assert_eq!(
            (err.status, err.code),
            (StatusCode::BAD_REQUEST, "invalid_patch")
        );
        assert!(err.message.contains("33 fields deep"), "{}", err.message);
    }
}
