//! `POST /v1/ns/{ns}/batch`: many operations of one namespace, applied atomically.

use std::borrow::Cow;
use std::fmt::Write as _;

use asp_core::{ContentType, Key};
use asp_store::{CrdtOp, WriteKind, WriteOp};
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::write::{Concern, answer_write};
use super::{AppState, header_str, namespace, path_error, read_body};
use crate::error::ApiError;
use crate::formats;
use crate::json::{BASE64, push_json_str};
use crate::preconditions::{
    Precondition, batch_precondition, condition, parse_if_match, parse_if_none_match,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchIn<'a> {
    #[serde(borrow)]
    ops: Vec<BatchOpIn<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchOpIn<'a> {
    op: &'a str,
    /// Borrowed from the body unless it holds escapes: a bulk load's keys are copied
    /// once, into the write.
    #[serde(borrow)]
    key: Cow<'a, str>,
    content_type: Option<String>,
    #[serde(borrow)]
    value: Option<&'a RawValue>,
    #[serde(borrow)]
    value_text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    value_base64: Option<Cow<'a, str>>,
    if_match: Option<String>,
    if_none_match: Option<String>,
    /// `incr`: the amount.
    by: Option<i64>,
    /// `add` / `remove`: the member, any JSON value.
    #[serde(borrow)]
    member: Option<&'a RawValue>,
    /// `put`: the key expires this long after it is written.
    ttl_ms: Option<u64>,
}

/// One operation of a batch, with its preconditions folded into its condition, and
/// its key as the request gave it (for the answer).
fn batch_op<'a>(i: usize, op: BatchOpIn<'a>) -> Result<(WriteOp, Cow<'a, str>), ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_batch", format!("ops[{i}]: {m}"));
    let key = Key::new(&op.key).map_err(|e| bad(e.to_string()))?;
    // Both, like the headers: if_match first (RFC 9110 §13.2.2).
    let mut preconditions = Vec::new();
    if let Some(m) = op.if_match.as_deref() {
        preconditions.push(
            batch_precondition(m, parse_if_match, Precondition::Match)
                .map_err(|e| bad(e.message))?,
        );
    }
    if let Some(n) = op.if_none_match.as_deref() {
        preconditions.push(
            batch_precondition(n, parse_if_none_match, Precondition::NoneMatch)
                .map_err(|e| bad(e.message))?,
        );
    }
    let declared = match op.content_type.as_deref() {
        None => None,
        Some(ct) => Some(formats::content_type_of(Some(ct)).map_err(|e| bad(e.0))?),
    };
    let has_value = op.value.is_some() || op.value_text.is_some() || op.value_base64.is_some();
    if !matches!(op.op, "incr") && op.by.is_some() {
        return Err(bad("\"by\" belongs to incr".into()));
    }
    if !matches!(op.op, "add" | "remove") && op.member.is_some() {
        return Err(bad("\"member\" belongs to add and remove".into()));
    }
    let ttl_ms = match op.ttl_ms {
        Some(_) if op.op != "put" => return Err(bad("\"ttl_ms\" belongs to put".into())),
        Some(t) if !(1..=asp_store::TTL_MS_MAX).contains(&t) => {
            return Err(bad(format!(
                "ttl_ms is between 1 and {} (ten years); got {t}",
                asp_store::TTL_MS_MAX
            )));
        }
        t => t.unwrap_or(0),
    };
    let kind = match op.op {
        "incr" | "add" | "remove"
            if has_value || declared.is_some() || !preconditions.is_empty() =>
        {
            return Err(bad(format!(
                "{} takes no value, content_type or condition",
                op.op
            )));
        }
        "incr" => WriteKind::Crdt(CrdtOp::Incr(
            op.by
                .ok_or_else(|| bad("incr needs \"by\": an integer".into()))?,
        )),
        "add" | "remove" => {
            let raw = op
                .member
                .ok_or_else(|| bad(format!("{} needs \"member\": a JSON value", op.op)))?;
            // Members compare by their compact JSON text.
            let member: serde_json::Value =
                serde_json::from_str(raw.get()).map_err(|e| bad(format!("member: {e}")))?;
            let member = Bytes::from(member.to_string());
            WriteKind::Crdt(if op.op == "add" {
                CrdtOp::Add(member)
            } else {
                CrdtOp::Remove(member)
            })
        }
        "delete" => {
            if op.value.is_some()
                || op.value_text.is_some()
                || op.value_base64.is_some()
                || declared.is_some()
            {
                return Err(bad("a delete takes no value and no content_type".into()));
            }
            WriteKind::Delete
        }
        "put" => {
            let (content_type, value) = match (op.value, op.value_text, op.value_base64) {
                (Some(raw), None, None) => {
                    if declared.is_some_and(|d| d != ContentType::Json) {
                        return Err(bad("\"value\" holds JSON; use value_text or value_base64 for other content types".into()));
                    }
                    // The same check as a PUT's body: parsing the batch only skipped
                    // over the value, at any depth.
                    formats::validate(ContentType::Json, raw.get().as_bytes())
                        .map_err(|e| invalid_value(i, e))?;
                    (
                        ContentType::Json,
                        Bytes::copy_from_slice(raw.get().as_bytes()),
                    )
                }
                (None, Some(text), None) => {
                    if declared.is_some_and(|d| d != ContentType::Text) {
                        return Err(bad("\"value_text\" is for text/plain; use value_base64 for other content types".into()));
                    }
                    (ContentType::Text, Bytes::from(text.into_owned()))
                }
                (None, None, Some(b64)) => {
                    let bytes = BASE64
                        .decode(b64.as_bytes())
                        .map_err(|e| bad(format!("value_base64 is not valid base64: {e}")))?;
                    let ct = declared.unwrap_or(ContentType::OctetStream);
                    formats::validate(ct, &bytes).map_err(|e| invalid_value(i, e))?;
                    (ct, Bytes::from(bytes))
                }
                (None, None, None) => {
                    return Err(bad(
                        "a put needs one of value, value_text or value_base64".into()
                    ));
                }
                _ => {
                    return Err(bad(
                        "give only one of value, value_text and value_base64".into()
                    ));
                }
            };
            WriteKind::Put {
                content_type,
                value,
                ttl_ms,
            }
        }
        other => {
            return Err(bad(format!(
                "op must be \"put\", \"delete\", \"incr\", \"add\" or \"remove\", got {other:?}"
            )));
        }
    };
    Ok((
        WriteOp {
            key,
            kind,
            condition: condition(preconditions),
        },
        op.key,
    ))
}

/// A value that is not well formed for its content type: what a PUT of it answers.
fn invalid_value(i: usize, e: formats::FormatError) -> ApiError {
    ApiError::bad_request("invalid_value", format!("ops[{i}]: {e}"))
}

pub(super) async fn batch(
    State(state): State<AppState>,
    verified: Option<axum::Extension<asp_auth::Verified>>,
    path: Result<Path<String>, PathRejection>,
    concern: Result<Concern, ApiError>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    let concern = concern?;
    concern.refuse_ttl("a batch (give ttl_ms per operation)")?;
    let ct = header_str(&headers, header::CONTENT_TYPE)?;
    if formats::content_type_of(ct).ok() != Some(ContentType::Json) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "a batch is a JSON document: send Content-Type: application/json",
        ));
    }
    let limit = state.inner.config.request_bytes_max;
    let body = read_body(&headers, body, limit, "batch", "request_bytes_max").await?;
    let parsed: BatchIn<'_> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request("invalid_batch", format!("the batch is not valid: {e}"))
    })?;
    let store = state.store();
    if parsed.ops.len() > store.config().batch_ops_max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "a batch holds at most {} operations; this one has {}",
                store.config().batch_ops_max,
                parsed.ops.len()
            ),
        ));
    }
    let mut ops = Vec::with_capacity(parsed.ops.len());
    let mut keys = Vec::with_capacity(parsed.ops.len());
    for (i, op) in parsed.ops.into_iter().enumerate() {
        let (op, key) = batch_op(i, op)?;
        ops.push(op);
        keys.push(key);
    }
    let ttls: Vec<u64> = ops
        .iter()
        .map(|o| match o.kind {
            WriteKind::Put { ttl_ms, .. } => ttl_ms,
            _ => 0,
        })
        .collect();
    // A token limited to a key prefix: every key of the batch within it, or nothing
    // is written.
    if let Some(axum::Extension(verified)) = &verified {
        for key in &keys {
            if let Err(refused) =
                crate::auth::allows_key(verified, ns.as_str(), asp_auth::Op::Write, key)
            {
                return Ok(crate::auth::to_response(refused));
            }
        }
    }
    let applied = store
        .write_fenced(ns.clone(), ops, concern.fence.clone())
        .await?;
    // Written by hand, keys in the order serde_json writes an object's: a
    // 10,000-result answer is on the hot path of bulk loads.
    let mut out = String::with_capacity(64 + applied.len() * 128);
    out.push_str("{\"namespace\":");
    push_json_str(&mut out, ns.as_str());
    out.push_str(",\"results\":[");
    for (i, (a, k)) in applied.iter().zip(&keys).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('{');
        if ttls[i] != 0 {
            let expires_ms = a
                .hlc
                .physical_ms()
                .saturating_add(ttls[i])
                .min(asp_core::Hlc::PHYSICAL_MS_MAX);
            let _ = write!(out, "\"expires_ms\":{expires_ms},");
        }
        let _ = write!(
            out,
            "\"hlc\":{{\"logical\":{},\"physical_ms\":{}}},\"key\":",
            a.hlc.logical(),
            a.hlc.physical_ms()
        );
        push_json_str(&mut out, k);
        let _ = write!(out, ",\"seq\":{},\"version\":\"{}\"}}", a.seq, a.dot);
    }
    out.push_str("]}");
    let last_seq = applied.last().map_or(0, |a| a.seq);
    let dots: Vec<asp_core::Dot> = applied.iter().map(|a| a.dot).collect();
    Ok(answer_write(&state, concern, (&ns, &dots, last_seq), out, None).await)
}
