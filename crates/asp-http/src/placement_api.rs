//! `GET/PUT/DELETE /v1/ns/{ns}/placement`, and the answer to a client's request for a
//! placed namespace this node does not serve: 307 to the holder that serves it (see
//! `asp_node::placement::Route`).

use asp_core::Namespace;
use asp_node::placement::{Route, Rule};
use axum::extract::{Path, State, rejection::PathRejection};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::routes::{AppState, namespace, path_error};

/// A rule's body, at most.
const RULE_BYTES_MAX: usize = 4096;

/// What `/placement` answers: the rule, the holders this node picks (by score) with
/// their API addresses, which of them serves clients here, and the members it picks
/// among.
fn view(state: &AppState, ns: &Namespace) -> Result<Response, ApiError> {
    let replicator = state.replicated()?;
    let placement = replicator.placement();
    let own = replicator.node_id();
    let candidates: Vec<serde_json::Value> = placement
        .candidates()
        .into_iter()
        .map(|c| {
            serde_json::json!({
                "node_id": c.node.to_string(),
                "labels": c.labels,
                "api": (!c.api.is_empty()).then_some(c.api),
            })
        })
        .collect();
    let (rule, holders) = match placement.view(ns) {
        Some((rule, holders)) => (Some(rule), holders),
        None => (None, Vec::new()),
    };
    let serves = match placement.route(ns) {
        Route::Here => Some(own.to_string()),
        Route::Elsewhere { node, .. } => Some(node.to_string()),
        Route::Nowhere(_) => None,
    };
    let held_here = rule.is_none() || holders.iter().any(|h| h.node == own);
    let holders: Vec<serde_json::Value> = holders
        .into_iter()
        .map(|h| {
            serde_json::json!({
                "node_id": h.node.to_string(),
                "api": (!h.api.is_empty()).then_some(h.api),
                "this_node": h.node == own,
                // Holders exchange the namespace over direct links only: a holder
                // this node (a holder too) has no link to gets nothing from it.
                "linked": h.node == own || replicator.linked_to(h.node),
                "holder_for_ms": u64::try_from(h.since.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
        })
        .collect();
    Ok(axum::Json(serde_json::json!({
        "namespace": ns.as_str(),
        "replicas": rule.as_ref().map(|r| r.replicas),
        "require": rule.as_ref().map(|r| r.require.clone()),
        "holders": holders,
        "served_by": if rule.is_some() { serves } else { None },
        "held_here": held_here,
        "members": candidates,
    }))
    .into_response())
}

/// Parses `{"replicas": 2, "require": {"zone": "a"}}` (`require` may be left out).
fn parse(body: &[u8]) -> Result<Rule, ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_body", m);
    let example = "send {\"replicas\": 2, \"require\": {\"zone\": \"a\"}}";
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("{example}: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(bad(example.into()));
    };
    if let Some(other) = object.keys().find(|k| *k != "replicas" && *k != "require") {
        return Err(bad(format!(
            "unknown field {other:?}; only \"replicas\" and \"require\""
        )));
    }
    let Some(replicas) = object.get("replicas").and_then(serde_json::Value::as_u64) else {
        return Err(bad(format!(
            "\"replicas\" must be a whole number from 1 to {}",
            asp_node::placement::REPLICAS_MAX
        )));
    };
    let mut require = asp_node::residency::Labels::new();
    match object.get("require") {
        None => {}
        Some(serde_json::Value::Object(labels)) => {
            for (k, v) in labels {
                let Some(v) = v.as_str() else {
                    return Err(bad(format!("label {k}: the value must be a string")));
                };
                require.insert(k.clone(), v.to_owned());
            }
        }
        Some(_) => {
            return Err(bad(
                "\"require\" must be an object of labels, e.g. {\"zone\": \"a\"}".into(),
            ));
        }
    }
    let rule = Rule {
        replicas: u32::try_from(replicas).unwrap_or(u32::MAX),
        require,
    };
    asp_node::placement::check_rule(&rule).map_err(bad)?;
    Ok(rule)
}

pub(crate) async fn get(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    view(&state, &ns)
}

/// Places a namespace, cluster-wide. (An `_asp.` namespace never gets here: the
/// guard refuses clients' admin requests on the node's own namespaces.)
pub(crate) async fn put(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    if body.len() > RULE_BYTES_MAX {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "a placement rule is at most 4 KiB",
        ));
    }
    let rule = parse(&body)?;
    set(&state, &ns, Some(&rule)).await
}

/// Unplaces a namespace, cluster-wide: every node that replicates it holds it again.
pub(crate) async fn delete(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    set(&state, &ns, None).await
}

async fn set(state: &AppState, ns: &Namespace, rule: Option<&Rule>) -> Result<Response, ApiError> {
    let replicator = state.replicated()?;
    replicator
        .placement()
        .set(state.store(), ns, rule)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_failed", e))?;
    replicator.audit().record(
        "placement_set",
        None,
        serde_json::json!({ "namespace": ns.as_str(), "rule": rule }),
    );
    view(state, ns)
}

/// The parts of a namespace's API that go to the node serving it: its keys, batches,
/// change feed and counts. Its settings (policy, mode, residency, placement) and its
/// leases are the same on every node and answered anywhere.
const SERVED_BY_HOLDERS: [&str; 4] = ["kv", "batch", "changes", "stats"];

/// The query parameter a redirect adds to its `Location`: how many times the request
/// was redirected between nodes. A node strips it before it serves the request.
pub(crate) const HOPS_PARAM: &str = "asp_hops";

/// Redirects a request may have had before a node that would redirect it again refuses
/// it: with views that agree one is enough, and a node whose view is behind adds one.
/// More means the nodes disagree on who serves the namespace (a partition, the first
/// seconds after members change) and would send the client round in a loop.
pub(crate) const HOPS_MAX: u32 = 2;

/// The redirects a request had (its `asp_hops`; a value that is no count counts as
/// [`HOPS_MAX`]), and its query without that parameter.
pub(crate) fn split_hops(query: &str) -> (u32, String) {
    let mut hops = 0;
    let mut rest = Vec::new();
    for pair in query.split('&') {
        match hops_of(pair) {
            Some(n) => hops = n.unwrap_or(HOPS_MAX),
            None => rest.push(pair),
        }
    }
    (hops, rest.join("&"))
}

/// For a query pair that is [`HOPS_PARAM`]: its count, if it is one.
fn hops_of(pair: &str) -> Option<Option<u32>> {
    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
    (name == HOPS_PARAM).then(|| value.parse().ok())
}

/// `uri` without [`HOPS_PARAM`], if it has one: what the node serves. Every request
/// with a query comes here: nothing is allocated unless the parameter is there.
pub(crate) fn without_hops(uri: &Uri) -> Option<Uri> {
    let query = uri.query()?;
    if !query.split('&').any(|p| hops_of(p).is_some()) {
        return None;
    }
    let (_, rest) = split_hops(query);
    let path_and_query = if rest.is_empty() {
        uri.path().to_owned()
    } else {
        format!("{}?{rest}", uri.path())
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// For a request to a placed namespace this node does not serve: 307 to the node that
/// does (`Location` the same path and query on its API address, with [`HOPS_PARAM`]
/// counting the redirect), or 409 `no_holder` (nobody can serve it, or the request was
/// redirected [`HOPS_MAX`] times already).
pub(crate) fn redirect(state: &AppState, uri: &Uri) -> Option<Response> {
    let replicator = state.replicator()?;
    let rest = uri.path().strip_prefix("/v1/ns/")?;
    let (ns, rest) = rest.split_once('/')?;
    let part = rest.split('/').next().unwrap_or_default();
    if !SERVED_BY_HOLDERS.contains(&part) {
        return None;
    }
    let ns = Namespace::new(ns).ok()?;
    match replicator.placement().route(&ns) {
        Route::Here => None,
        Route::Elsewhere { node, api } => {
            let (hops, query) = split_hops(uri.query().unwrap_or_default());
            if hops >= HOPS_MAX {
                return Some(
                    ApiError::new(
                        StatusCode::CONFLICT,
                        "no_holder",
                        format!(
                            "namespace {ns}: the nodes disagree on who serves it (this request was redirected {hops} times, and this node would send it on to {node}); \
                             they agree once they hear the same members: retry, or see GET /v1/ns/{ns}/placement on each"
                        ),
                    )
                    .into_response(),
                );
            }
            let sep = if query.is_empty() { "" } else { "&" };
            let target = format!(
                "{}{}?{query}{sep}{HOPS_PARAM}={}",
                api.trim_end_matches('/'),
                uri.path(),
                hops + 1
            );
            let Ok(location) = HeaderValue::from_str(&target) else {
                return Some(
                    ApiError::new(
                        StatusCode::CONFLICT,
                        "no_holder",
                        format!("namespace {ns} is held by {node}, whose API address {api:?} is not a URL"),
                    )
                    .into_response(),
                );
            };
            let mut extra = serde_json::Map::new();
            extra.insert("holder".into(), node.to_string().into());
            extra.insert("holder_api".into(), api.clone().into());
            let mut response = ApiError {
                extra: Some(extra),
                ..ApiError::new(
                    StatusCode::TEMPORARY_REDIRECT,
                    "not_held",
                    format!("namespace {ns} is placed on other nodes: {node} serves it at {api} (follow Location)"),
                )
            }
            .into_response();
            response.headers_mut().insert(header::LOCATION, location);
            Some(response)
        }
        // 409, as `residency` and `replicas_unreachable`: the cluster's state, not this
        // node's health, stands in the way (no member with the labels the rule names).
        Route::Nowhere(why) => Some(
            ApiError::new(
                StatusCode::CONFLICT,
                "no_holder",
                format!("namespace {ns} is placed, but no node can serve it: {why}"),
            )
            .into_response(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hop_count_is_read_and_stripped_and_the_rest_of_the_query_kept() {
        assert_eq!(split_hops(""), (0, String::new()));
        assert_eq!(split_hops("since=3"), (0, "since=3".to_owned()));
        assert_eq!(
            split_hops("replicas=all&asp_hops=1&timeout_ms=5"),
            (1, "replicas=all&timeout_ms=5".to_owned())
        );
        // Not a count: as many as a node takes, so no loop goes on through it.
        assert_eq!(split_hops("asp_hops=x"), (HOPS_MAX, String::new()));
        assert_eq!(split_hops("asp_hops"), (HOPS_MAX, String::new()));
        // A parameter that only starts with the name is another parameter.
        assert_eq!(split_hops("asp_hopsx=1"), (0, "asp_hopsx=1".to_owned()));

        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(without_hops(&uri("/v1/ns/a/kv/k")), None);
        assert_eq!(without_hops(&uri("/v1/ns/a/kv/k?since=1")), None);
        assert_eq!(
            without_hops(&uri("/v1/ns/a/kv/k?asp_hops=1")),
            Some(uri("/v1/ns/a/kv/k"))
        );
        assert_eq!(
            without_hops(&uri("/v1/ns/a/changes?since=4&asp_hops=2")),
            Some(uri("/v1/ns/a/changes?since=4"))
        );
    }
}
