//! Leases of a leader namespace: `POST /v1/ns/{ns}/leases`, `GET` and `DELETE
//! /v1/ns/{ns}/leases/{name}`, `POST /v1/ns/{ns}/leases/{name}/keepalive`
//! (docs/MODES.md, *Leases*).

use asp_node::leases::{Lease, LeaseError, TTL_MS_MAX};
use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::routes::{AppState, json_object, namespace, path_error};

fn lease_json(l: &Lease) -> Value {
    json!({
        "name": l.name,
        "holder": l.holder,
        "token": l.token,
        "expires_ms": l.expires_ms,
        "ttl_ms": l.ttl_ms,
        "lock_delay_ms": l.lock_delay_ms,
        "released": l.released,
        "held": l.held_at(asp_store::clock::wall_ms()),
    })
}

pub(crate) fn lease_error(e: LeaseError) -> ApiError {
    match e {
        LeaseError::Invalid(m) => ApiError::bad_request("invalid_body", m),
        e @ LeaseError::MultiMaster(_) => {
            ApiError::new(StatusCode::CONFLICT, "mode_conflict", e.to_string())
        }
        LeaseError::NotLeader { mode, message } => ApiError::not_leader(
            mode.fenced,
            mode.epoch,
            mode.leader,
            mode.leader_api,
            message,
        ),
        LeaseError::Held { lease, message } => {
            let mut extra = serde_json::Map::new();
            extra.insert("holder".into(), lease.holder.into());
            extra.insert("token".into(), lease.token.into());
            extra.insert("expires_ms".into(), lease.expires_ms.into());
            ApiError {
                extra: Some(extra),
                ..ApiError::new(StatusCode::CONFLICT, "lease_held", message)
            }
        }
        LeaseError::Lost(m) => ApiError::new(StatusCode::CONFLICT, "lease_lost", m),
        LeaseError::Superseded(m) => ApiError::new(StatusCode::CONFLICT, "fenced", m),
        LeaseError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
        LeaseError::Store(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_failed", m),
    }
}

fn ms(
    o: &serde_json::Map<String, Value>,
    field: &str,
    min: u64,
    default: Option<u64>,
) -> Result<u64, ApiError> {
    match o.get(field) {
        None if default.is_some() => Ok(default.unwrap_or_default()),
        Some(v) => v
            .as_u64()
            .filter(|&n| (min..=TTL_MS_MAX).contains(&n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_body",
                    format!("{field} is {min} to {TTL_MS_MAX} milliseconds; got {v}"),
                )
            }),
        None => Err(ApiError::bad_request(
            "invalid_body",
            format!("{field} is required"),
        )),
    }
}

/// `{"name": "job-1", "holder": "w1", "ttl_ms": 10000, "lock_delay_ms": 0}` → 201 with
/// the new token, or 409 `lease_held` naming the holder.
pub(crate) async fn acquire(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    let example = r#"{"name": "job-1", "holder": "w1", "ttl_ms": 10000}"#;
    let o = json_object(
        &body,
        &["name", "holder", "ttl_ms", "lock_delay_ms"],
        example,
    )?;
    let text = |field: &str| {
        o.get(field)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .map(str::to_owned)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_body",
                    format!("{field} is a string of 1 to 256 bytes; send {example}"),
                )
            })
    };
    let (name, holder) = (text("name")?, text("holder")?);
    let ttl_ms = ms(&o, "ttl_ms", 1, None)?;
    let lock_delay_ms = ms(&o, "lock_delay_ms", 0, Some(0))?;
    let lease = state
        .replicated()?
        .leases()
        .acquire(state.store(), &ns, &name, &holder, ttl_ms, lock_delay_ms)
        .await
        .map_err(lease_error)?;
    Ok((StatusCode::CREATED, Json(lease_json(&lease))).into_response())
}

/// Leases `GET /v1/ns/{ns}/leases` lists at most.
const LIST_MAX: usize = 1000;

/// `GET /v1/ns/{ns}/leases`: every lease of the namespace this node knows (held,
/// expired or released), by name, at most 1,000 (`more` says whether there were).
pub(crate) async fn list(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    let (leases, more) = state.replicated()?.leases().list(&ns, LIST_MAX);
    Ok(Json(json!({
        "namespace": ns.as_str(),
        "leases": leases.iter().map(lease_json).collect::<Vec<_>>(),
        "more": more,
    }))
    .into_response())
}

pub(crate) async fn get(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((ns, name)) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    match state.replicated()?.leases().get(&ns, &name) {
        Some(l) => Ok(Json(lease_json(&l)).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no lease {name:?} in {ns} (on this node)"),
        )),
    }
}

/// `{"token": N}`: the lease's expiry moves to now + its time to live.
pub(crate) async fn keepalive(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let Path((ns, name)) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    let example = r#"{"token": 4294967297}"#;
    let o = json_object(&body, &["token"], example)?;
    let token = o.get("token").and_then(Value::as_u64).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_body",
            format!("token is the lease's token; send {example}"),
        )
    })?;
    let lease = state
        .replicated()?
        .leases()
        .keepalive(state.store(), &ns, &name, token)
        .await
        .map_err(lease_error)?;
    Ok(Json(lease_json(&lease)).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReleaseParams {
    token: u64,
}

/// `?token=N`: gives the lease up.
pub(crate) async fn release(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<ReleaseParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path((ns, name)) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    let Query(q) = query.map_err(|e| {
        ApiError::bad_request(
            "invalid_query",
            format!("release with ?token=<the lease's token>: {}", e.body_text()),
        )
    })?;
    let lease = state
        .replicated()?
        .leases()
        .release(state.store(), &ns, &name, q.token)
        .await
        .map_err(lease_error)?;
    Ok(Json(lease_json(&lease)).into_response())
}
