//! Routes of one namespace's keys: `/v1/ns/{ns}/kv...` and `/v1/ns/{ns}/policy`.

use asp_core::ContentType;
use asp_core::crdt::Policy;
use asp_store::{WriteKind, WriteOp};
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::write::{Concern, write_one};
use super::{
    AppState, KeyTarget, etag, header_str, key, namespace, path_error, query_error, read_body,
};
use crate::crdt_api;
use crate::error::ApiError;
use crate::formats;
use crate::json::ValueOut;
use crate::preconditions::{
    Precondition, condition, parse_if_match, parse_if_none_match, write_preconditions,
};

/// Default page size of a listing.
const LIST_LIMIT_DEFAULT: usize = 100;

pub(super) async fn put_key(
    State(state): State<AppState>,
    target: KeyTarget,
    concern: Concern,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let KeyTarget { ns, key, policy } = target;
    let content_type = formats::content_type_of(header_str(&headers, header::CONTENT_TYPE)?)
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("{} (for example -H 'Content-Type: application/json')", e.0),
            )
        })?;
    let preconditions = write_preconditions(&headers)?;
    let store = state.store();
    let value = read_body(
        &headers,
        body,
        store.config().value_bytes_max,
        "value",
        "value_bytes_max",
    )
    .await?;
    formats::validate(content_type, &value)
        .map_err(|e| ApiError::bad_request("invalid_value", e.to_string()))?;
    if policy != Policy::Lww && (concern.ttl_ms.is_some() || concern.lease.is_some()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "wrong_policy",
            format!(
                "ttl_ms and lease apply to lww namespaces; namespace {ns} uses the {policy} policy"
            ),
        ));
    }
    let op = if policy == Policy::Siblings {
        if !preconditions.is_empty() {
            return Err(siblings_condition());
        }
        let context = crdt_api::write_context(store, &headers, &ns, &key)?;
        crdt_api::sibling_write(key, context, Some((content_type, value)))
    } else {
        WriteOp {
            key,
            kind: WriteKind::Put {
                content_type,
                value,
                ttl_ms: 0,
            },
            condition: condition(preconditions),
        }
    };
    write_one(&state, concern, ns, op, true).await
}

pub(super) async fn delete_key(
    State(state): State<AppState>,
    target: KeyTarget,
    concern: Concern,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let KeyTarget { ns, key, policy } = target;
    let preconditions = match header_str(&headers, header::IF_MATCH)? {
        Some(m) => vec![parse_if_match(m)?],
        None => vec![],
    };
    let op = if policy == Policy::Siblings {
        if !preconditions.is_empty() {
            return Err(siblings_condition());
        }
        let context = crdt_api::write_context(state.store(), &headers, &ns, &key)?;
        crdt_api::sibling_write(key, context, None)
    } else {
        WriteOp {
            key,
            kind: WriteKind::Delete,
            condition: condition(preconditions),
        }
    };
    write_one(&state, concern, ns, op, false).await
}

pub(super) async fn get_key(
    State(state): State<AppState>,
    target: KeyTarget,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let KeyTarget { ns, key, policy } = target;
    let accept = header_str(&headers, header::ACCEPT)?;
    let if_none_match = header_str(&headers, header::IF_NONE_MATCH)?;
    let store = state.store();
    if policy != Policy::Lww {
        return crdt_api::get(store, &ns, &key).await;
    }
    store.caught_up().await?;
    let found = store.get(&ns, key.as_str())?;
    let Some((ks, value)) = found.and_then(|ks| ks.value.clone().map(|v| (ks, v))) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("key {:?} does not exist in namespace {ns}", key.as_str()),
        ));
    };
    let dot = ks.version.dot;
    let not_modified = match if_none_match.map(parse_if_none_match).transpose()? {
        Some(Precondition::Absent) => true,
        Some(Precondition::NoneMatch(dots)) => dots.contains(&dot),
        _ => false,
    };
    if not_modified {
        let mut r = StatusCode::NOT_MODIFIED.into_response();
        r.headers_mut().insert(header::ETAG, etag(dot));
        return Ok(r);
    }
    let Some(serve_as) = formats::negotiate(accept, value.content_type) else {
        let can: Vec<_> = formats::servable(value.content_type)
            .iter()
            .map(|c| c.mime())
            .collect();
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
            format!(
                "this value is stored as {} and can be served as {}; the Accept header allows none of them",
                value.content_type.mime(),
                can.join(", ")
            ),
        ));
    };
    let body = if serve_as == value.content_type {
        value.bytes
    } else {
        Bytes::from(
            formats::convert(&value.bytes, value.content_type, serve_as).map_err(|e| {
                ApiError::new(StatusCode::NOT_ACCEPTABLE, "not_acceptable", e.to_string())
            })?,
        )
    };
    let mime = match serve_as {
        ContentType::Text => "text/plain; charset=utf-8",
        other => other.mime(),
    };
    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    h.insert(header::ETAG, etag(dot));
    h.insert(header::VARY, HeaderValue::from_static("Accept"));
    Ok(response)
}

fn siblings_condition() -> ApiError {
    ApiError::bad_request(
        "invalid_header",
        format!(
            "If-Match / If-None-Match apply to lww namespaces; a siblings write carries the {} token of its read instead",
            crdt_api::CONTEXT_HEADER
        ),
    )
}

/// `POST .../kv/{key}`: an operation of a counter or set namespace.
pub(super) async fn post_key(
    State(state): State<AppState>,
    target: KeyTarget,
    concern: Concern,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let KeyTarget { ns, key, .. } = target;
    let store = state.store();
    let body = read_body(
        &headers,
        body,
        store.config().value_bytes_max,
        "operation",
        "value_bytes_max",
    )
    .await?;
    let op = crdt_api::post_op(&body)?;
    write_one(&state, concern, ns, WriteOp::crdt(key, op), false).await
}

/// `PATCH .../kv/{key}`: a JSON merge patch of a json-map key.
pub(super) async fn patch_key(
    State(state): State<AppState>,
    target: KeyTarget,
    concern: Concern,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let KeyTarget { ns, key, policy } = target;
    let mime =
        header_str(&headers, header::CONTENT_TYPE)?.unwrap_or("application/merge-patch+json");
    let essence = mime.split(';').next().unwrap_or("").trim();
    if essence != "application/merge-patch+json" && essence != "application/json" {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("a PATCH takes application/merge-patch+json (RFC 7396); got {mime}"),
        ));
    }
    let store = state.store();
    if policy != Policy::JsonMap {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "wrong_policy",
            format!(
                "a merge patch needs a json-map namespace; namespace {ns} uses the {policy} policy"
            ),
        ));
    }
    let body = read_body(
        &headers,
        body,
        store.config().value_bytes_max,
        "patch",
        "value_bytes_max",
    )
    .await?;
    let op = crdt_api::patch_op(store, &ns, &key, &body)?;
    write_one(&state, concern, ns, WriteOp::crdt(key, op), false).await
}

pub(super) async fn get_policy(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    let policy = state.store().policy(&ns);
    Ok(crdt_api::policy_body(&ns, policy))
}

/// Index entries `GET /v1/ns/{ns}/stats` counts at most.
pub const STATS_ENTRIES_MAX: usize = 1_000_000;

/// `GET /v1/ns/{ns}/stats`: the namespace's keys, deleted keys still held and value
/// bytes, counted from the index (up to [`STATS_ENTRIES_MAX`] entries; `complete`
/// says whether all were).
pub(super) async fn namespace_stats(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    let store = state.store().clone();
    let counted = {
        let ns = ns.clone();
        tokio::task::spawn_blocking(move || store.namespace_stats(&ns, STATS_ENTRIES_MAX))
            .await
            .map_err(|e| {
                ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("counting keys failed: {e}"),
                )
            })??
    };
    let policy = state.store().policy(&ns);
    Ok(axum::Json(serde_json::json!({
        "namespace": ns.as_str(),
        "policy": policy.to_string(),
        "keys": counted.keys,
        "deleted_keys": counted.deleted_keys,
        "value_bytes": counted.value_bytes,
        "keys_with_siblings": (policy == asp_core::crdt::Policy::Siblings).then_some(counted.keys_with_siblings),
        "complete": counted.complete,
        "entries_max": STATS_ENTRIES_MAX,
    }))
    .into_response())
}

pub(super) async fn put_policy(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    let body = read_body(&headers, body, 4096, "policy", "a 4 KiB limit").await?;
    let policy = crdt_api::parse_policy(&body)?;
    state.store().set_policy(ns.clone(), policy).await?;
    Ok(crdt_api::policy_body(&ns, policy))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListParams {
    prefix: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
    values: Option<bool>,
}

pub(super) async fn list_keys(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    let Query(q) = query.map_err(query_error)?;
    let limit = q.limit.unwrap_or(LIST_LIMIT_DEFAULT);
    if limit == 0 || limit > asp_store::SCAN_LIMIT_MAX {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "limit must be between 1 and {}; got {limit}",
                asp_store::SCAN_LIMIT_MAX
            ),
        ));
    }
    let prefix = q.prefix.unwrap_or_default();
    if prefix.len() > asp_core::KEY_BYTES_MAX {
        return Err(ApiError::bad_request(
            "invalid_query",
            "prefix is longer than the longest key (1024 bytes)",
        ));
    }
    if let Some(after) = &q.after {
        key(after)?;
    }
    let with_values = q.values.unwrap_or(false);
    let store = state.store();
    store.caught_up().await?;
    let page = store.scan(&ns, &prefix, q.after.as_deref(), limit, with_values)?;
    let crdt = store.policy(&ns) != Policy::Lww;
    let items: Vec<serde_json::Value> = page
        .items
        .iter()
        .map(|item| {
            if crdt {
                // A CRDT key lists its merged state as JSON (the entry's own fields
                // describe one node's part of it, so they are left out).
                let mut v = serde_json::json!({"key": item.key.as_str()});
                if let Some(state) = &item.state {
                    v["value"] = crdt_api::state_json(store, &ns, &item.key, state);
                }
                return v;
            }
            let mut v = serde_json::json!({
                "key": item.key.as_str(),
                "version": item.version.dot.to_string(),
                "seq": item.seq,
                "content_type": item.content_type.mime(),
                "size": item.value_len,
            });
            if let Some(bytes) = &item.value {
                let out = serde_json::to_value(ValueOut::new(item.content_type, bytes))
                    .expect("values serialize");
                if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), out) {
                    obj.extend(extra);
                }
            }
            v
        })
        .collect();
    Ok(Json(serde_json::json!({
        "namespace": ns.as_str(),
        "items": items,
        "next_after": page.next_after.as_ref().map(|k| k.as_str()),
    }))
    .into_response())
}
