//! The console: the page at `/ui` (its assets are compiled into the binary, so a node
//! offline serves it whole), and the cluster view it draws from, `GET /v1/cluster`
//! (every member's status, fetched from their APIs by this node) and
//! `GET /v1/cluster/stream` (the same, again every `interval_ms`, as server-sent
//! events).
//!
//! This node asks each member with the caller's own bearer token, so a token shows
//! of other nodes what it may read of this one (a token is valid cluster-wide). A
//! member that does not answer within [`MEMBER_TIMEOUT`] is listed with its error.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde::Deserialize;

use crate::client::{Client, ClientOptions};
use crate::error::ApiError;
use crate::routes::AppState;

/// How long this node waits for one member's status.
pub const MEMBER_TIMEOUT: Duration = Duration::from_secs(2);
/// Members asked at most (the rest are listed without status).
pub const MEMBERS_MAX: usize = 64;
/// Bounds of the stream's `interval_ms`.
pub const INTERVAL_MS_MIN: u64 = 250;
pub const INTERVAL_MS_MAX: u64 = 60_000;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// Clients of other members' APIs, by (address, token), kept between calls so their
/// connections are reused. Bounded: cleared when full.
#[derive(Default)]
pub(crate) struct MemberClients {
    /// The cluster's CA bundle, for members whose API is HTTPS.
    pub(crate) ca: Option<PathBuf>,
    clients: Mutex<HashMap<(String, Option<String>), Client>>,
}

impl MemberClients {
    pub(crate) fn new(ca: Option<PathBuf>) -> Self {
        Self {
            ca,
            clients: Mutex::default(),
        }
    }

    fn client(&self, base: &str, token: Option<&str>) -> Result<Client, String> {
        let key = (base.to_owned(), token.map(str::to_owned));
        let mut clients = self.clients.lock().unwrap();
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let options = ClientOptions {
            ca: self.ca.clone(),
            token: token.map(str::to_owned),
        };
        let client = Client::with_options(base, &options).map_err(|e| e.to_string())?;
        if clients.len() >= 4 * MEMBERS_MAX {
            clients.clear();
        }
        clients.insert(key, client.clone());
        Ok(client)
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            // Everything the page loads comes from this node; nothing inline runs.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
                ),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// `GET /ui`: the console page.
pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /ui/app.js`.
pub(crate) async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /ui/app.css`.
pub(crate) async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// The caller's bearer token, passed on to the members.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// Every member with its status (this node's read here, the others' from their APIs).
pub(crate) async fn cluster_value(state: &AppState, token: Option<&str>) -> serde_json::Value {
    let this = crate::routes::admin_status(state).await;
    let node_id = this["node_id"].clone();
    let members: Vec<serde_json::Value> = this["replication"]["members"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut nodes = vec![serde_json::json!({
        "node_id": node_id,
        "api": members.iter().find(|m| m["this_node"] == true).and_then(|m| m["api"].as_str()),
        "state": "alive",
        "this_node": true,
        "status": this,
        "error": null,
    })];
    let others: Vec<&serde_json::Value> =
        members.iter().filter(|m| m["this_node"] != true).collect();
    let asks = others.iter().take(MEMBERS_MAX).map(|m| async move {
        let api = m["api"].as_str();
        let (status, error) = match api {
            None => (
                serde_json::Value::Null,
                Some("no API address known".to_owned()),
            ),
            Some(api) => match member_status(state, api, token).await {
                Ok(s) => (s, None),
                Err(e) => (serde_json::Value::Null, Some(e)),
            },
        };
        serde_json::json!({
            "node_id": m["node_id"],
            "api": api,
            "state": m["state"],
            "this_node": false,
            "status": status,
            "error": error,
        })
    });
    nodes.extend(futures_util::future::join_all(asks).await);
    for m in others.iter().skip(MEMBERS_MAX) {
        nodes.push(serde_json::json!({
            "node_id": m["node_id"], "api": m["api"], "state": m["state"], "this_node": false,
            "status": null, "error": format!("not asked: at most {MEMBERS_MAX} members are"),
        }));
    }
    serde_json::json!({
        "generated_ms": asp_store::clock::wall_ms(),
        "node_id": node_id,
        "nodes": nodes,
    })
}

async fn member_status(
    state: &AppState,
    api: &str,
    token: Option<&str>,
) -> Result<serde_json::Value, String> {
    let client = state.member_clients().client(api, token)?;
    match tokio::time::timeout(MEMBER_TIMEOUT, client.status()).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no answer within {} ms",
            MEMBER_TIMEOUT.as_millis()
        )),
    }
}

/// `GET /v1/cluster`.
pub(crate) async fn cluster(State(state): State<AppState>, headers: HeaderMap) -> Response {
    Json(cluster_value(&state, bearer(&headers).as_deref()).await).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamQuery {
    interval_ms: Option<u64>,
}

/// `GET /v1/cluster/stream?interval_ms=N`: an `event: cluster` at once and then every
/// `interval_ms` (default 1000), until the client goes or the node stops.
pub(crate) async fn cluster_stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let interval_ms = q.interval_ms.unwrap_or(1000);
    if !(INTERVAL_MS_MIN..=INTERVAL_MS_MAX).contains(&interval_ms) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "interval_ms must be from {INTERVAL_MS_MIN} to {INTERVAL_MS_MAX}; got {interval_ms}"
            ),
        ));
    }
    let slot = state.stream_slot().map_err(|streams_max| ApiError {
        retry_after_s: Some(5),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!(
                "this node serves at most {streams_max} live streams at once (sse_streams_max); read GET /v1/cluster instead, or retry later"
            ),
        )
    })?;
    let token = bearer(&headers);
    let shutdown = state.shutdown_token();
    let interval = Duration::from_millis(interval_ms);
    let first = true;
    let events = stream::unfold(
        (state, token, shutdown, first, slot),
        move |(state, token, shutdown, first, slot)| async move {
            if !first {
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    () = shutdown.cancelled() => return None,
                }
            }
            let value = tokio::select! {
                v = cluster_value(&state, token.as_deref()) => v,
                () = shutdown.cancelled() => return None,
            };
            let event = SseEvent::default().event("cluster").data(value.to_string());
            Some((
                Ok::<_, Infallible>(event),
                (state, token, shutdown, false, slot),
            ))
        },
    );
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_token_is_passed_on_and_nothing_else() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc.def "),
        );
        assert_eq!(bearer(&h).as_deref(), Some("abc.def"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic Zm9v"),
        );
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn the_page_loads_only_its_own_assets() {
        assert!(INDEX_HTML.contains(r#"src="/ui/app.js""#));
        assert!(INDEX_HTML.contains(r#"href="/ui/app.css""#));
        assert!(!INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"));
    }
}
