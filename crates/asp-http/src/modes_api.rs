//! Leader namespaces: `GET/PUT /v1/ns/{ns}/mode`, `POST /v1/ns/{ns}/promote` and
//! `GET /v1/ns/{ns}/divergent` (docs/MODES.md).

use std::time::Duration;

use asp_core::NodeId;
use asp_node::modes::ModeError;
use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::error::ApiError;
use crate::routes::{AppState, json_object, path_error};

/// A promotion waits at most this long for votes unless the request says otherwise.
const PROMOTE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
const PROMOTE_TIMEOUT_MS_MAX: u64 = 120_000;

fn mode_error(e: ModeError) -> ApiError {
    match e {
        ModeError::Invalid(m) => ApiError::bad_request("invalid_body", m),
        ModeError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "mode_conflict", m),
        ModeError::NoQuorum(m) => ApiError::new(StatusCode::CONFLICT, "no_quorum", m),
        ModeError::Store(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_failed", m),
    }
}

fn namespace(path: Result<Path<String>, PathRejection>) -> Result<asp_core::Namespace, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    crate::routes::namespace(&ns)
}

fn node_id(v: &Value, what: &str) -> Result<NodeId, ApiError> {
    v.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_body",
            format!("{what} is a node id: 16 hex digits, as /v1/status shows it; got {v}"),
        )
    })
}

pub(crate) async fn get_mode(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let ns = namespace(path)?;
    Ok(Json(state.replicated()?.modes().view(&ns)).into_response())
}

/// `{"mode": "leader", "leader": "<node id>", "voters": [...]}` or
/// `{"mode": "multi-master"}`: a new epoch, cluster-wide.
pub(crate) async fn put_mode(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let ns = namespace(path)?;
    let example = r#"{"mode": "leader", "leader": "<node id>", "voters": ["<node id>", ...]}"#;
    let o = json_object(&body, &["mode", "leader", "voters"], example)?;
    let (leader, voters) = match o.get("mode").and_then(Value::as_str) {
        Some("leader") => {
            let leader = node_id(o.get("leader").unwrap_or(&Value::Null), "leader")?;
            let voters = match o.get("voters") {
                None => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| node_id(v, "each voter"))
                    .collect::<Result<Vec<_>, _>>()?,
                Some(other) => {
                    return Err(ApiError::bad_request(
                        "invalid_body",
                        format!("voters is a list of node ids; got {other}"),
                    ));
                }
            };
            (Some(leader), voters)
        }
        Some("multi-master") => {
            if o.len() > 1 {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "a multi-master namespace has no leader and no voters: send {\"mode\": \"multi-master\"}",
                ));
            }
            (None, Vec::new())
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("mode is \"leader\" or \"multi-master\"; send {example}"),
            ));
        }
    };
    let m = state.replicated()?.modes();
    let record = m
        .set(state.store(), &ns, leader, voters)
        .await
        .map_err(mode_error)?;
    if let Some(r) = state.replicator() {
        r.audit().record(
            "mode_set",
            None,
            serde_json::json!({
                "namespace": ns.as_str(),
                "epoch": record.epoch,
                "leader": record.leader.map(|l| l.to_string()),
            }),
        );
    }
    Ok(Json(m.view(&ns)).into_response())
}

/// `{"require_caught_up": true, "timeout_ms": 10000}` (both optional): this node leads
/// in a new epoch, once a majority of the voters grant it.
pub(crate) async fn promote(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let ns = namespace(path)?;
    let example = r#"{"require_caught_up": true, "timeout_ms": 10000}"#;
    let o = json_object(&body, &["require_caught_up", "timeout_ms"], example)?;
    let require_caught_up = match o.get("require_caught_up") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("require_caught_up is true or false; got {other}"),
            ));
        }
    };
    let timeout_ms = match o.get("timeout_ms") {
        None | Some(Value::Null) => PROMOTE_TIMEOUT_MS_DEFAULT,
        Some(v) => v
            .as_u64()
            .filter(|&t| (1..=PROMOTE_TIMEOUT_MS_MAX).contains(&t))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_body",
                    format!("timeout_ms is 1 to {PROMOTE_TIMEOUT_MS_MAX}; got {v}"),
                )
            })?,
    };
    let m = state.replicated()?.modes();
    let record = m
        .promote(
            state.store(),
            &ns,
            require_caught_up,
            Duration::from_millis(timeout_ms),
        )
        .await
        .map_err(mode_error)?;
    if let Some(r) = state.replicator() {
        r.audit().record(
            "promoted",
            None,
            serde_json::json!({ "namespace": ns.as_str(), "epoch": record.epoch }),
        );
    }
    Ok(Json(m.view(&ns)).into_response())
}

/// `?after=<dot>&limit=N`: the divergent events listed for the namespace.
pub(crate) async fn divergent(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<std::collections::HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let ns = namespace(path)?;
    let mut after = None;
    let mut limit = 1000usize;
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    for (k, v) in query {
        match k.as_str() {
            "after" => after = Some(v),
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|l| (1..=10_000).contains(l))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_query",
                            format!("limit is 1 to 10000; got {v:?}"),
                        )
                    })?;
            }
            other => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown parameter {other:?}; this endpoint takes after and limit"),
                ));
            }
        }
    }
    let m = state.replicated()?.modes();
    let (events, next_after) =
        asp_node::modes::divergent_list(state.store(), ns.as_str(), after.as_deref(), limit)
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_failed", e))?;
    let view = m.view(&ns);
    Ok(Json(serde_json::json!({
        "namespace": ns.as_str(),
        "epoch": view["epoch"],
        "events": events,
        "next_after": next_after,
    }))
    .into_response())
}
