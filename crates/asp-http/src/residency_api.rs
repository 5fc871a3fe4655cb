//! `GET/PUT /v1/ns/{ns}/residency`, and the refusal of writes to a pinned namespace on
//! a node outside its rule (409 `residency`).

use asp_core::Namespace;
use asp_node::residency::{Labels, matches, show};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::routes::AppState;

/// What `/residency` answers: the rule, this node, and every peer linked since start
/// with whether it may hold the namespace and the bytes of its events sent to it.
pub(crate) fn view(state: &AppState, ns: &Namespace) -> Response {
    let replicator = match state.replicated() {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let residency = replicator.residency();
    let rule = residency.rule(ns);
    let here = replicator.labels();
    let may = |labels: &Labels| rule.as_ref().is_none_or(|r| matches(r, labels));
    let peers: Vec<serde_json::Value> = replicator
        .sent_to_peers(ns)
        .into_iter()
        .map(|(node, cert, bytes)| {
            let labels = cert.as_ref().map(|c| c.labels.clone()).unwrap_or_default();
            serde_json::json!({
                "node_id": node.to_string(),
                "name": cert.as_ref().map(|c| c.name.clone()),
                "labels": labels,
                "attested": cert.is_some(),
                "may_hold": may(&labels),
                "bytes_sent": bytes,
            })
        })
        .collect();
    axum::Json(serde_json::json!({
        "namespace": ns.as_str(),
        "require": rule,
        "this_node": {
            "node_id": state.store().node_id().to_string(),
            "labels": here,
            "may_hold": may(&here),
        },
        "peers": peers,
    }))
    .into_response()
}

/// Parses `{"require": {"k": "v", ...}}` (an empty object unpins).
pub(crate) fn parse(body: &[u8]) -> Result<Labels, ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_body", m);
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("send {{\"require\": {{\"region\": \"eu\"}}}}: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(bad("send {\"require\": {\"region\": \"eu\"}}".into()));
    };
    if let Some(other) = object.keys().find(|k| *k != "require") {
        return Err(bad(format!("unknown field {other:?}; only \"require\"")));
    }
    let Some(require) = object.get("require").and_then(|r| r.as_object()) else {
        return Err(bad(
            "\"require\" must be an object of labels, e.g. {\"region\": \"eu\"} ({} unpins)".into(),
        ));
    };
    let mut labels = Labels::new();
    for (k, v) in require {
        let Some(v) = v.as_str() else {
            return Err(bad(format!("label {k}: the value must be a string")));
        };
        labels.insert(k.clone(), v.to_owned());
    }
    asp_node::residency::check_rule(&labels).map_err(bad)?;
    Ok(labels)
}

/// 409 `residency` when this node may not hold `ns` (its labels are outside the rule).
pub(crate) fn refuse_write(state: &AppState, ns: &str) -> Option<ApiError> {
    let replicator = state.replicator()?;
    let ns = Namespace::new(ns).ok()?;
    let rule = replicator.residency().rule(&ns)?;
    let here = replicator.labels();
    if matches(&rule, &here) {
        return None;
    }
    Some(ApiError::new(
        StatusCode::CONFLICT,
        "residency",
        format!(
            "namespace {ns} may be held only by nodes labelled {}; this node's labels are {}",
            show(&rule),
            show(&here)
        ),
    ))
}
