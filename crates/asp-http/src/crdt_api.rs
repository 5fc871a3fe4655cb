//! The HTTP face of the conflict policies beyond `lww` (docs/CONFLICTS.md): a
//! namespace's policy, reads of CRDT keys rendered as JSON, and their operations.
//!
//! - `GET/PUT /v1/ns/{ns}/policy` — `{"policy": "counter"}`; fixed once data exists.
//! - `counter`: `POST .../kv/{key}` `{"incr": n}`; read as a JSON number.
//! - `set`: `POST .../kv/{key}` `{"add": v}` / `{"remove": v}`; read as a sorted JSON
//!   array (members compare by their compact JSON text).
//! - `json-map`: `PATCH .../kv/{key}` with a JSON merge patch (RFC 7396); read as an
//!   object.
//! - `siblings`: `PUT`/`DELETE .../kv/{key}` with the `X-Asp-Context` token of a read
//!   replace exactly what that read saw; without it a PUT adds a sibling. A read of one
//!   sibling serves its value; of several, `300 Multiple Choices` with a JSON listing.

use asp_core::crdt::{self, Context, Policy, State};
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
        State::JsonMap(m) => {
            let fields: Vec<String> = m
                .fields()
                .map(|(k, v)| {
                    format!(
                        "{}:{}",
                        serde_json::to_string(k).expect("strings serialize"),
                        std::str::from_utf8(v).unwrap_or("null")
                    )
                })
                .collect();
            json(format!("{{{}}}", fields.join(",")))
        }
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
        State::JsonMap(m) => {
            serde_json::Value::Object(m.fields().map(|(k, v)| (k.to_owned(), parse(v))).collect())
        }
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

/// The operation a `POST` body names: `{"incr": n}`, `{"add": v}` or `{"remove": v}`.
pub fn post_op(body: &[u8]) -> Result<CrdtOp, ApiError> {
    let invalid = |why: String| {
        ApiError::bad_request(
            "invalid_body",
            format!(
                "{why}; send {{\"incr\": n}} to a counter, {{\"add\": value}} or {{\"remove\": value}} to a set"
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
        "add" => Ok(CrdtOp::Add(Bytes::from(arg.to_string()))),
        "remove" => Ok(CrdtOp::Remove(Bytes::from(arg.to_string()))),
        other => Err(invalid(format!("unknown operation {other:?}"))),
    }
}

/// The field changes a JSON merge patch (RFC 7396) makes to a JSON map, each field's
/// new value computed against its current one.
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
        Some(State::JsonMap(m)) => Some(m),
        _ => None,
    };
    let mut changes = Vec::with_capacity(fields.len());
    for (name, value) in fields {
        if value.is_null() {
            changes.push((name, None));
            continue;
        }
        let old = current
            .as_ref()
            .and_then(|m| m.get(&name))
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok());
        let new = merge_patch(old, value);
        changes.push((
            name,
            Some(Bytes::from(
                serde_json::to_string(&new).expect("values serialize"),
            )),
        ));
    }
    Ok(CrdtOp::Patch(changes))
}

/// RFC 7396's MergePatch(target, patch).
fn merge_patch(target: Option<serde_json::Value>, patch: serde_json::Value) -> serde_json::Value {
    match patch {
        serde_json::Value::Object(p) => {
            let mut out = match target {
                Some(serde_json::Value::Object(t)) => t,
                _ => serde_json::Map::new(),
            };
            for (k, v) in p {
                if v.is_null() {
                    out.remove(&k);
                } else {
                    let old = out.remove(&k);
                    out.insert(k, merge_patch(old, v));
                }
            }
            serde_json::Value::Object(out)
        }
        other => other,
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
