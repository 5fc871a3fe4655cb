//! Events this node received from peers and holds without applying them: their part
//! of `/v1/status`, and the endpoints that resolve a namespace's quarantine.

use asp_core::Namespace;
use asp_store::{HeldStatus, QuarantineAction, QuarantineStatus};
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The `held` object of `/v1/status`.
pub(crate) fn status_json(held: &HeldStatus, now_ms: u64) -> serde_json::Value {
    let origins = |o: &[(asp_core::NodeId, u64)]| -> Vec<serde_json::Value> {
        o.iter()
            .map(|(node, events)| serde_json::json!({"origin": node.to_string(), "events": events}))
            .collect()
    };
    let quarantine: Vec<serde_json::Value> = held
        .quarantine
        .iter()
        .map(|q| {
            serde_json::json!({
                "namespace": q.namespace.as_str(),
                "policy_here": q.policy_here.name(),
                "policy_of_events": q.policies_of_events.iter().map(|p| p.name()).collect::<Vec<_>>(),
                "holds_data": q.holds_data,
                "events": q.events,
                "bytes": q.bytes,
                "origins": origins(&q.origins),
                "since_ms": q.since_ms,
                "anti_entropy": "paused",
                "resolve": resolve(q),
            })
        })
        .collect();
    let next = held.parked.next_release_ms;
    serde_json::json!({
        "events": held.events,
        "bytes": held.bytes,
        "bytes_max": held.bytes_max,
        "full_refusals": held.full_refusals,
        "parked": {
            "events": held.parked.events,
            "bytes": held.parked.bytes,
            "next_release_ms": next,
            "next_release_in_ms": next.map(|n| n.saturating_sub(now_ms)),
            "origins": origins(&held.parked.origins),
        },
        "quarantine": quarantine,
    })
}

/// How an operator resolves a namespace's quarantine, in a sentence or three.
fn resolve(q: &QuarantineStatus) -> String {
    let ns = q.namespace.as_str();
    let theirs = q.policies_of_events.first().map_or("their", |p| p.name());
    let how = if q.holds_data {
        format!(
            "{ns} holds data here, so its policy cannot change: choose which node's writes to keep, and discard the others' on the nodes that quarantined them (POST /v1/admin/quarantine/{ns}/discard, or asp quarantine --ns {ns} discard); their origins keep them."
        )
    } else {
        format!(
            "{ns} holds no data here: set its policy to {theirs} (PUT /v1/ns/{ns}/policy, or asp policy --ns {ns} {theirs}), then retry (POST /v1/admin/quarantine/{ns}/retry, or asp quarantine --ns {ns} retry); or discard them (POST /v1/admin/quarantine/{ns}/discard)."
        )
    };
    format!(
        "Namespace {ns} uses the {} policy here, but {} events from peers carry the {theirs} policy. Set the same policy on every node. {how} Anti-entropy of {ns} is paused until then.",
        q.policy_here.name(),
        q.events,
    )
}

/// `POST /v1/admin/quarantine/{ns}/{retry|discard}`.
pub(crate) async fn resolve_quarantine(
    store: &asp_store::Store,
    ns: Namespace,
    action: QuarantineAction,
) -> Result<Response, ApiError> {
    let outcome = store.resolve_quarantine(ns.clone(), action).await?;
    if outcome == Default::default() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "namespace {ns} has no quarantined events on this node (GET /v1/status lists them under held.quarantine)"
            ),
        ));
    }
    let body = match action {
        QuarantineAction::Retry => serde_json::json!({
            "namespace": ns.as_str(),
            "applied": outcome.applied,
            "still_quarantined": outcome.still_quarantined,
        }),
        QuarantineAction::Discard => serde_json::json!({
            "namespace": ns.as_str(),
            "discarded": outcome.discarded,
        }),
    };
    Ok(Json(body).into_response())
}
