//! The HTTP API v1: routes, handlers and the server loop.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use asp_core::crdt::Policy;
use asp_core::{ContentType, Dot, Key, Namespace};
use asp_node::Replicator;
use asp_store::{Condition, CrdtOp, FeedEvent, FeedReader, Store, WriteKind, WriteOp};
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::FutureExt as _;
use futures_util::stream::{self, Stream};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::crdt_api;
use crate::error::ApiError;
use crate::formats;
use crate::held_api;
use crate::json::{BASE64, ChangeOut, ChangesOut, HlcOut, ValueOut, WriteOut};
use crate::preconditions::{
    Precondition, batch_precondition, parse_if_match, parse_if_none_match, resolve_preconditions,
    write_preconditions,
};

/// Default limit on a batch request body.
pub const DEFAULT_REQUEST_BYTES_MAX: usize = 16 << 20;
/// Default time a client has to send a request's header.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit on open HTTP connections.
pub const DEFAULT_CONNECTIONS_MAX: usize = 1024;
/// Default limit on live change streams (SSE).
pub const DEFAULT_STREAMS_MAX: usize = 256;
/// Default and largest page sizes.
const LIST_LIMIT_DEFAULT: usize = 100;
const CHANGES_LIMIT_DEFAULT: usize = 100;
/// Events read from the log at a time for a live stream.
const SSE_READ_EVENTS: usize = 512;

/// Settings of the HTTP server.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// The largest request body of a batch.
    pub request_bytes_max: usize,
    /// A connection whose request header has not fully arrived this long after the
    /// server began reading it (idle keep-alive time included) is closed.
    pub header_read_timeout: Duration,
    /// Open HTTP connections at most; a connection over it gets a 503 and is closed.
    pub connections_max: usize,
    /// Live change streams (SSE) at most; one more gets `503 too_many_streams`.
    pub streams_max: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            request_bytes_max: DEFAULT_REQUEST_BYTES_MAX,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            connections_max: DEFAULT_CONNECTIONS_MAX,
            streams_max: DEFAULT_STREAMS_MAX,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    code: &'static str,
}

/// Everything a handler needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    store: Store,
    replicator: Option<Replicator>,
    config: ApiConfig,
    registry: Registry,
    http_requests: Family<StatusLabels, Counter>,
    connections_refused: Counter,
    streams_refused: Counter,
    /// One permit per live change stream.
    streams: Arc<tokio::sync::Semaphore>,
    started: Instant,
    listen: SocketAddr,
    shutdown: CancellationToken,
}

impl AppState {
    /// `shutdown` ends live streams and the server when cancelled. Without a
    /// replicator, writes cannot ask for more than one replica.
    pub fn new(
        store: Store,
        replicator: Option<Replicator>,
        config: ApiConfig,
        listen: SocketAddr,
        shutdown: CancellationToken,
    ) -> Self {
        let mut registry = Registry::default();
        store.metrics().register(&mut registry);
        if let Some(r) = &replicator {
            r.register_metrics(&mut registry);
        }
        let http_requests = Family::<StatusLabels, Counter>::default();
        registry.register(
            "asp_http_requests",
            "HTTP requests answered, by status class",
            http_requests.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "asp_http_connections_refused",
            "HTTP connections closed at once because http_connections_max were open",
            connections_refused.clone(),
        );
        let streams_refused = Counter::default();
        registry.register(
            "asp_http_streams_refused",
            "Change streams (SSE) refused because sse_streams_max were live",
            streams_refused.clone(),
        );
        let streams = Arc::new(tokio::sync::Semaphore::new(config.streams_max));
        AppState {
            inner: Arc::new(StateInner {
                store,
                replicator,
                config,
                registry,
                http_requests,
                connections_refused,
                streams_refused,
                streams,
                started: Instant::now(),
                listen,
                shutdown,
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(crate) fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    pub(crate) fn connections_refused(&self) -> Counter {
        self.inner.connections_refused.clone()
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/admin/compact", post(compact))
        .route("/v1/admin/quarantine/{ns}/retry", post(quarantine_retry))
        .route(
            "/v1/admin/quarantine/{ns}/discard",
            post(quarantine_discard),
        )
        .route("/v1/admin/scrub", post(scrub))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/ns/{ns}/kv", get(list_keys))
        .route(
            "/v1/ns/{ns}/kv/",
            get(empty_key).put(empty_key).delete(empty_key),
        )
        .route(
            "/v1/ns/{ns}/kv/{*key}",
            get(get_key)
                .put(put_key)
                .delete(delete_key)
                .post(post_key)
                .patch(patch_key),
        )
        .route("/v1/ns/{ns}/policy", get(get_policy).put(put_policy))
        .route("/v1/ns/{ns}/batch", post(batch))
        .route("/v1/ns/{ns}/changes", get(changes))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Counts answers, refuses malformed percent-encoding, and turns a panic into a 500
/// rather than a dropped connection.
async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let response = if let Some(e) = check_percent_encoding(request.uri().path()) {
        e.into_response()
    } else {
        match AssertUnwindSafe(next.run(request)).catch_unwind().await {
            Ok(response) => response,
            Err(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the request handler failed; this is a bug, please report it",
            )
            .into_response(),
        }
    };
    let code = match response.status().as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    state
        .inner
        .http_requests
        .get_or_create(&StatusLabels { code })
        .inc();
    response
}

fn check_percent_encoding(path: &str) -> Option<ApiError> {
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let ok = bytes.len() > i + 2
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit();
            if !ok {
                return Some(ApiError::bad_request(
                    "invalid_path",
                    format!(
                        "bad percent-encoding at byte {i} of the path: '%' must be followed by two hex digits (write a literal '%' as %25)"
                    ),
                ));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    None
}

async fn route_not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        format!(
            "no route for {method} {}; the API is described at /v1/openapi.json",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{method} is not allowed on {}; see /v1/openapi.json",
            uri.path()
        ),
    )
}

async fn empty_key() -> ApiError {
    ApiError::bad_request(
        "invalid_key",
        "the key is empty; a key is 1 to 1024 bytes of UTF-8",
    )
}

fn path_error(e: PathRejection) -> ApiError {
    ApiError::bad_request(
        "invalid_path",
        format!(
            "{}; percent-encoded path segments must decode to UTF-8",
            e.body_text()
        ),
    )
}

fn query_error(e: QueryRejection) -> ApiError {
    ApiError::bad_request("invalid_query", e.body_text())
}

fn namespace(name: &str) -> Result<Namespace, ApiError> {
    Namespace::new(name).map_err(|e| ApiError::bad_request("invalid_namespace", e.to_string()))
}

fn key(k: &str) -> Result<Key, ApiError> {
    Key::new(k).map_err(|e| ApiError::bad_request("invalid_key", e.to_string()))
}

/// The namespace and key of a `.../ns/{ns}/kv/{key}` path.
fn key_path(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(Namespace, Key), ApiError> {
    let Path((ns, k)) = path.map_err(path_error)?;
    Ok((namespace(&ns)?, key(&k)?))
}

pub(crate) fn header_str(
    headers: &HeaderMap,
    name: header::HeaderName,
) -> Result<Option<&str>, ApiError> {
    match headers.get(&name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| {
            ApiError::bad_request(
                "invalid_header",
                format!("the {name} header is not visible ASCII"),
            )
        }),
    }
}

fn etag(dot: Dot) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{dot}\"")).expect("dots are ASCII")
}

async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    what: &str,
    setting: &str,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the {what} is larger than {limit} bytes ({setting})"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return Err(too_large());
                }
                source = s.source();
            }
            Err(ApiError::bad_request(
                "invalid_body",
                format!("could not read the request body: {e}"),
            ))
        }
    }
}

/// Query parameters of a write: the write concern.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WriteParams {
    replicas: Option<usize>,
    timeout_ms: Option<u64>,
}

/// How many nodes must hold a write durably before the answer, and how long to wait.
struct Concern {
    replicas: usize,
    timeout: Duration,
}

const REPLICAS_MAX: usize = 64;
const REPLICA_TIMEOUT_MS_DEFAULT: u64 = 5_000;
const REPLICA_TIMEOUT_MS_MAX: u64 = 60_000;

fn concern(
    state: &AppState,
    query: Result<Query<WriteParams>, QueryRejection>,
) -> Result<Concern, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let replicas = q.replicas.unwrap_or(1);
    if replicas == 0 || replicas > REPLICAS_MAX {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("replicas must be between 1 and {REPLICAS_MAX}; got {replicas}"),
        ));
    }
    if replicas > 1 {
        let nodes = 1 + state
            .inner
            .replicator
            .as_ref()
            .map_or(0, Replicator::peers_known);
        if replicas > nodes {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "replicas_unreachable",
                format!(
                    "replicas={replicas} can never be met: at most {nodes} node{} can hold a write (this node and the peers it knows: configured, or linked to it since it started); ask for replicas={nodes} or fewer, or link more peers first",
                    if nodes == 1 { "" } else { "s" }
                ),
            ));
        }
    }
    let timeout_ms = q.timeout_ms.unwrap_or(REPLICA_TIMEOUT_MS_DEFAULT);
    if timeout_ms == 0 || timeout_ms > REPLICA_TIMEOUT_MS_MAX {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("timeout_ms must be between 1 and {REPLICA_TIMEOUT_MS_MAX}; got {timeout_ms}"),
        ));
    }
    Ok(Concern {
        replicas,
        timeout: Duration::from_millis(timeout_ms),
    })
}

/// Answers a write once its concern is met: `body` is the write's JSON answer (an
/// object), `seq` the feed position of its last event. Past the timeout the answer is
/// 504 `replication_timeout`, saying how many nodes hold it; the write stays.
async fn answer_write(
    state: &AppState,
    concern: Concern,
    seq: u64,
    body: String,
    etag: Option<HeaderValue>,
) -> Response {
    let mut response = if concern.replicas <= 1 {
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    } else {
        let replicator = state
            .inner
            .replicator
            .as_ref()
            .expect("checked by concern()");
        let held = replicator
            .wait_replicas(seq, concern.replicas, concern.timeout)
            .await;
        let replicas = format!(r#"{{"wanted":{},"acknowledged":{held}}}"#, concern.replicas);
        if held >= concern.replicas {
            let mut body = body;
            body.truncate(body.len() - 1);
            body.push_str(&format!(r#","replicas":{replicas}}}"#));
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        } else {
            let message = format!(
                "the write is durable on this node but only {held} of {} nodes hold it after {} ms; it stays, and replication goes on",
                concern.replicas,
                concern.timeout.as_millis()
            );
            let error = serde_json::json!({"code": "replication_timeout", "message": message});
            let body = format!(r#"{{"error":{error},"write":{body},"replicas":{replicas}}}"#);
            (
                StatusCode::GATEWAY_TIMEOUT,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
    };
    if let Some(etag) = etag {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

async fn put_key(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<WriteParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (ns, key) = key_path(path)?;
    let concern = concern(&state, query)?;
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
    let op = if store.policy(&ns) == Policy::Siblings {
        if !preconditions.is_empty() {
            return Err(siblings_condition());
        }
        let context = crdt_api::write_context(store, &headers, &ns, &key)?;
        crdt_api::sibling_write(key.clone(), context, Some((content_type, value)))
    } else {
        WriteOp {
            key: key.clone(),
            kind: WriteKind::Put {
                content_type,
                value,
            },
            condition: resolve_preconditions(store, &ns, &key, preconditions).await?,
        }
    };
    write_one(&state, concern, ns, op, true).await
}

/// Applies one operation on one key and answers like every single-key write (with
/// the new version as ETag when `with_etag`).
async fn write_one(
    state: &AppState,
    concern: Concern,
    ns: Namespace,
    op: WriteOp,
    with_etag: bool,
) -> Result<Response, ApiError> {
    let key = op.key.clone();
    let deleted = matches!(op.kind, WriteKind::Delete)
        || matches!(&op.kind, WriteKind::Crdt(CrdtOp::Write { value: None, .. }));
    let applied = state.store().write(ns.clone(), vec![op]).await?[0];
    let body = serde_json::to_string(&WriteOut::new(ns.as_str(), key.as_str(), applied, deleted))
        .expect("answers serialize");
    let etag = with_etag.then(|| etag(applied.dot));
    Ok(answer_write(state, concern, applied.seq, body, etag).await)
}

async fn delete_key(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<WriteParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (ns, key) = key_path(path)?;
    let concern = concern(&state, query)?;
    let preconditions = match header_str(&headers, header::IF_MATCH)? {
        Some(m) => vec![parse_if_match(m)?],
        None => vec![],
    };
    let store = state.store();
    let op = if store.policy(&ns) == Policy::Siblings {
        if !preconditions.is_empty() {
            return Err(siblings_condition());
        }
        let context = crdt_api::write_context(store, &headers, &ns, &key)?;
        crdt_api::sibling_write(key.clone(), context, None)
    } else {
        WriteOp {
            key: key.clone(),
            kind: WriteKind::Delete,
            condition: resolve_preconditions(store, &ns, &key, preconditions).await?,
        }
    };
    write_one(&state, concern, ns, op, false).await
}

async fn get_key(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (ns, key) = key_path(path)?;
    let accept = header_str(&headers, header::ACCEPT)?;
    let if_none_match = header_str(&headers, header::IF_NONE_MATCH)?;
    let store = state.store();
    if store.policy(&ns) != Policy::Lww {
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
async fn post_key(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<WriteParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (ns, key) = key_path(path)?;
    let concern = concern(&state, query)?;
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
async fn patch_key(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<WriteParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (ns, key) = key_path(path)?;
    let concern = concern(&state, query)?;
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
    let policy = store.policy(&ns);
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

async fn get_policy(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    let policy = state.store().policy(&ns);
    Ok(crdt_api::policy_body(&ns, policy))
}

async fn put_policy(
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
struct ListParams {
    prefix: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
    values: Option<bool>,
}

async fn list_keys(
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
                if let Some(bytes) = &item.value {
                    let value = asp_core::crdt::State::decode(bytes)
                        .map(|s| crdt_api::state_json(store, &ns, &item.key, &s))
                        .unwrap_or(serde_json::Value::Null);
                    v["value"] = value;
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
    key: String,
    content_type: Option<String>,
    #[serde(borrow)]
    value: Option<&'a RawValue>,
    value_text: Option<String>,
    value_base64: Option<String>,
    if_match: Option<String>,
    if_none_match: Option<String>,
    /// `incr`: the amount.
    by: Option<i64>,
    /// `add` / `remove`: the member, any JSON value.
    #[serde(borrow)]
    member: Option<&'a RawValue>,
}

/// One operation of a batch, and its precondition (checked against the key later).
fn batch_op(i: usize, op: BatchOpIn<'_>) -> Result<(WriteOp, Vec<Precondition>), ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_batch", format!("ops[{i}]: {m}"));
    let key = Key::try_from(op.key).map_err(|e| bad(e.to_string()))?;
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
                    (ContentType::Text, Bytes::from(text))
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
            condition: Condition::None,
        },
        preconditions,
    ))
}

/// A value that is not well formed for its content type: what a PUT of it answers.
fn invalid_value(i: usize, e: formats::FormatError) -> ApiError {
    ApiError::bad_request("invalid_value", format!("ops[{i}]: {e}"))
}

async fn batch(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<WriteParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    let concern = concern(&state, query)?;
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
    let ops = parsed
        .ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| batch_op(i, op))
        .collect::<Result<Vec<_>, _>>()?;
    let mut resolved = Vec::with_capacity(ops.len());
    for (mut op, preconditions) in ops {
        op.condition = resolve_preconditions(store, &ns, &op.key, preconditions).await?;
        resolved.push(op);
    }
    let ops = resolved;
    let keys: Vec<Key> = ops.iter().map(|o| o.key.clone()).collect();
    let applied = store.write(ns.clone(), ops).await?;
    // Written by hand: a 10,000-result answer is on the hot path of bulk loads.
    let mut out = String::with_capacity(64 + applied.len() * 120);
    out.push_str("{\"namespace\":");
    out.push_str(&serde_json::to_string(ns.as_str()).expect("strings serialize"));
    out.push_str(",\"results\":[");
    for (i, (a, k)) in applied.iter().zip(&keys).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(
            &serde_json::to_string(&serde_json::json!({
                "key": k.as_str(),
                "version": a.dot.to_string(),
                "seq": a.seq,
                "hlc": HlcOut::from(a.hlc),
            }))
            .expect("results serialize"),
        );
    }
    out.push_str("]}");
    let last_seq = applied.last().map_or(0, |a| a.seq);
    Ok(answer_write(&state, concern, last_seq, out, None).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangesParams {
    since: Option<u64>,
    limit: Option<usize>,
    values: Option<bool>,
}

async fn changes(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ChangesParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    let Query(q) = query.map_err(query_error)?;
    let with_values = q.values.unwrap_or(true);
    let limit = q.limit.unwrap_or(CHANGES_LIMIT_DEFAULT);
    if limit == 0 || limit > asp_store::CHANGES_LIMIT_MAX {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "limit must be between 1 and {}; got {limit}",
                asp_store::CHANGES_LIMIT_MAX
            ),
        ));
    }
    let wants_stream =
        header_str(&headers, header::ACCEPT)?.is_some_and(|a| a.contains("text/event-stream"));
    let mut since = q.since.unwrap_or(0);
    if wants_stream
        && let Some(last) = header_str(&headers, header::HeaderName::from_static("last-event-id"))?
    {
        since = last.trim().parse().map_err(|_| {
            ApiError::bad_request(
                "invalid_header",
                format!("Last-Event-ID must be a feed position (a number); got {last:?}"),
            )
        })?;
    }
    let store = state.store();
    let head = store.head().seq;
    if since > head {
        return Err(ApiError::bad_request(
            "cursor_ahead",
            format!(
                "cursor {since} is beyond this node's feed head {head}; if the node's data was reset, start again from 0"
            ),
        ));
    }
    if wants_stream {
        let Ok(slot) = state.inner.streams.clone().try_acquire_owned() else {
            state.inner.streams_refused.inc();
            return Err(ApiError {
                retry_after_s: Some(5),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too_many_streams",
                    format!(
                        "this node serves at most {} live change streams at once (sse_streams_max); read the feed in pages (without Accept: text/event-stream) or retry later",
                        state.inner.config.streams_max
                    ),
                )
            });
        };
        return Ok(sse(state.clone(), ns, since, with_values, slot).into_response());
    }
    let page = store.changes(Some(&ns), since, limit)?;
    Ok(Json(ChangesOut {
        namespace: ns.as_str(),
        changes: page
            .events
            .iter()
            .map(|e| ChangeOut::new(e, with_values))
            .collect(),
        next: page.next,
        head: page.head,
    })
    .into_response())
}

struct Live {
    reader: FeedReader,
    head: tokio::sync::watch::Receiver<asp_store::FeedHead>,
    pending: std::collections::VecDeque<FeedEvent>,
    shutdown: CancellationToken,
    with_values: bool,
    done: bool,
    /// Held while the stream lives (`sse_streams_max`).
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// A live stream of the namespace's changes after `since`: every event once, in feed
/// order, each with its feed position as the event id.
fn sse(
    state: AppState,
    ns: Namespace,
    since: u64,
    with_values: bool,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let store = state.store();
    let live = Live {
        reader: store.feed_reader(Some(ns), since),
        head: store.subscribe(),
        pending: Default::default(),
        shutdown: state.inner.shutdown.clone(),
        with_values,
        done: false,
        _slot: slot,
    };
    let events = stream::unfold(live, |mut live| async move {
        if live.done {
            return None;
        }
        loop {
            if let Some(fe) = live.pending.pop_front() {
                let data = serde_json::to_string(&ChangeOut::new(&fe, live.with_values))
                    .expect("changes serialize");
                let event = SseEvent::default()
                    .id(fe.seq.to_string())
                    .event("change")
                    .data(data);
                return Some((Ok(event), live));
            }
            if live.shutdown.is_cancelled() {
                return None;
            }
            // Mark the current head as seen before reading, so that anything
            // published after the read wakes the wait below.
            live.head.borrow_and_update();
            match live.reader.read(SSE_READ_EVENTS) {
                Ok(events) if !events.is_empty() => {
                    live.pending.extend(events);
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    live.done = true;
                    let data =
                        serde_json::json!({"code": "store_failed", "message": e.to_string()})
                            .to_string();
                    return Some((Ok(SseEvent::default().event("error").data(data)), live));
                }
            }
            tokio::select! {
                changed = live.head.changed() => if changed.is_err() { return None },
                () = live.shutdown.cancelled() => return None,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

async fn healthz(State(state): State<AppState>) -> Response {
    let status = state.store().status();
    match (status.failure, status.no_space) {
        (None, None) => Json(serde_json::json!({"status": "ok"})).into_response(),
        (Some(f), _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "failing", "reason": f})),
        )
            .into_response(),
        (None, Some(why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "no_space", "reason": why})),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let store = state.store();
    let status = store.status();
    store
        .metrics()
        .writer_queue_depth
        .set(status.writer_queue_depth as i64);
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &state.inner.registry) {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("encoding metrics: {e}"),
        )
        .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// Compacts the feed now (what `asp serve` also does on its `[compaction]` interval)
/// and answers what was removed.
async fn compact(State(state): State<AppState>) -> Result<Response, ApiError> {
    let report = state.store().compact_async().await.map_err(|e| {
        let code = match e {
            asp_store::CompactionError::Panicked(_) => "internal",
            _ => "store_failed",
        };
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            code,
            format!("compaction failed: {e}"),
        )
    })?;
    Ok(Json(serde_json::json!({
        "segments_removed": report.segments_removed,
        "records_dropped": report.records_dropped,
        "stale_copies_dropped": report.stale_copies_dropped,
        "records_relocated": report.records_relocated,
        "tombstones_collected": report.tombstones_collected,
        "epitaphs_left": report.epitaphs_left,
        "epitaphs_dropped": report.epitaphs_dropped,
        "log_bytes_before": report.log_bytes_before,
        "log_bytes_after": report.log_bytes_after,
        "duration_ms": report.duration.as_millis() as u64,
    }))
    .into_response())
}

async fn quarantine_retry(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    held_api::resolve_quarantine(state.store(), ns, asp_store::QuarantineAction::Retry).await
}

async fn quarantine_discard(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    held_api::resolve_quarantine(state.store(), ns, asp_store::QuarantineAction::Discard).await
}

async fn status(State(state): State<AppState>) -> Response {
    let store = state.store();
    // Like a read, status reflects every acknowledged write (after a storage failure,
    // the last indexed state is still a true, if old, answer).
    let _ = store.caught_up().await;
    let s = store.status();
    let gc = store.tombstone_gc();
    let namespaces: Vec<serde_json::Value> = s
        .namespaces
        .iter()
        .map(|(ns, state)| {
            // Nodes that hold collection back (no report yet) or are left out of it
            // (away past the horizon: collected deletes leave epitaphs).
            let tombstone_gc = gc.get(ns).map(|g| {
                let ids = |v: &[asp_core::NodeId]| -> Vec<String> {
                    v.iter().map(ToString::to_string).collect()
                };
                serde_json::json!({"stable_events": g.stable.len(), "waiting_for": ids(&g.waiting), "away": ids(&g.away)})
            });
            let origins: Vec<serde_json::Value> = state
                .vector
                .iter()
                .map(|(origin, set)| serde_json::json!({"origin": origin.to_string(), "events": set.len(), "ranges": set.ranges()}))
                .collect();
            let base = store.base(ns);
            // Per origin, how much compaction took out of the feed: the floor is the
            // highest counter compacted (its events are held, as state, not as feed).
            let compacted: Vec<serde_json::Value> = base
                .iter()
                .map(|(origin, set)| serde_json::json!({"origin": origin.to_string(), "events": set.len(), "floor": set.max()}))
                .collect();
            serde_json::json!({
                "name": ns.as_str(),
                "events": state.vector.len(),
                "compacted_events": base.len(),
                "compacted": compacted,
                "max_hlc": HlcOut::from(state.max_hlc),
                "origins": origins,
                "tombstone_gc": tombstone_gc,
            })
        })
        .collect();
    let recovery = store.recovery();
    let replication = state
        .inner
        .replicator
        .as_ref()
        .map(|r| replication_status(&r.status()));
    Json(serde_json::json!({
        "node_id": s.node_id.to_string(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.inner.started.elapsed().as_secs(),
        "api": {"listen": state.inner.listen.to_string()},
        "data_dir": store.config().data_dir.display().to_string(),
        "fsync": s.fsync.to_string(),
        "feed": {
            "first_seq": s.feed_first_seq,
            "head_seq": s.feed_head_seq,
            "written_seq": s.written_seq,
            "synced_seq": s.synced_seq,
            "acked_seq": s.acked_seq,
            "indexed_seq": s.indexed_seq,
        },
        "log": {"segments": s.log_segments, "bytes": s.log_bytes},
        "index": {"bytes": s.index_bytes},
        "writer": {"queue_depth": s.writer_queue_depth, "queue_max": s.writer_queue_max},
        "recovery": {
            "torn_tail_bytes": recovery.torn_tail.as_ref().map(|t| t.dropped_bytes),
            "replayed_events": recovery.replayed_events,
            "index_rebuilt": recovery.index_rebuilt,
            "salvage": recovery.salvage.as_ref().map(salvage_json),
        },
        "scrub": s.last_scrub.as_ref().map(scrub_json),
        "no_space": s.no_space,
        "namespaces": namespaces,
        "own_events_found": store.own_events_found().iter().map(|f| serde_json::json!({
            "namespace": f.namespace.as_str(),
            "known_counter": f.known,
            "held_by_peers_counter": f.held_by_peers,
            "at_ms": f.at_ms,
        })).collect::<Vec<_>>(),
        "held": held_api::status_json(&store.held(), asp_store::clock::wall_ms()),
        "replication": replication,
        "failure": s.failure,
    }))
    .into_response()
}

/// What `--salvage` did, for status.
fn salvage_json(r: &asp_store::SalvageReport) -> serde_json::Value {
    let segments: Vec<serde_json::Value> = r
        .segments
        .iter()
        .map(|s| {
            serde_json::json!({
                "segment": s.segment.display().to_string(),
                "moved_to": s.moved_to.display().to_string(),
                "damage": s.damage.iter().map(|d| serde_json::json!({"offset": d.offset, "bytes": d.bytes, "reason": d.reason})).collect::<Vec<_>>(),
                "records_kept": s.records_kept,
                "positions_lost": s.positions_lost.ranges(),
                "bytes_lost": s.bytes_lost,
            })
        })
        .collect();
    serde_json::json!({"positions_lost": r.positions_lost(), "segments": segments})
}

/// A scrub report, for status and `POST /v1/admin/scrub`.
fn scrub_json(r: &asp_store::ScrubReport) -> serde_json::Value {
    serde_json::json!({
        "started_unix_ms": r.started_unix_ms,
        "finished_unix_ms": r.finished_unix_ms,
        "segments": r.segments,
        "bytes": r.bytes,
        "records": r.records,
        "damage": r.damage.iter().map(|d| serde_json::json!({
            "segment": d.segment.display().to_string(),
            "offset": d.offset,
            "reason": d.reason,
        })).collect::<Vec<_>>(),
        "action": (!r.damage.is_empty()).then_some("the feed log is damaged: restart the node with --salvage to keep every intact record and fetch the lost ones from peers"),
    })
}

/// Checks every record of the feed log now (what `asp serve` also does on
/// `scrub_interval_ms`) and answers what it found.
async fn scrub(State(state): State<AppState>) -> Result<Response, ApiError> {
    let report = state.store().scrub_async().await?;
    Ok(Json(scrub_json(&report)).into_response())
}

fn replication_status(r: &asp_node::ReplicationStatus) -> serde_json::Value {
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
    let peers: Vec<serde_json::Value> = r
        .peers
        .iter()
        .map(|p| {
            serde_json::json!({
                "node_id": p.node_id.map(|n| n.to_string()),
                "address": p.address,
                "direction": p.direction.map(|d| d.name()),
                "state": p.state.name(),
                "connected_ms": ms(p.connected_for),
                "last_contact_ms_ago": ms(p.last_contact),
                "last_error": p.last_error.as_ref().map(|(code, message)| serde_json::json!({"code": code, "message": message})),
                "acked_seq": p.acked_seq,
                "events_sent": p.events_sent,
                "events_received": p.events_received,
                "events_parked": p.events_parked,
                "events_quarantined": p.events_quarantined,
                "batches_refused": p.batches_refused.iter().map(|(r, n)| (r.to_string(), serde_json::json!(n))).collect::<serde_json::Map<_, _>>(),
                "namespaces": p.namespaces.iter().map(|n| serde_json::json!({
                    "name": n.namespace.as_str(),
                    "lag_events": n.lag_events,
                    "lag_ms": n.lag_ms,
                    "missing_events": n.missing_events,
                })).collect::<Vec<_>>(),
                "reconcile": {
                    "runs": p.reconcile.runs,
                    "in_sync_checks": p.reconcile.in_sync_checks,
                    "keys_repaired": p.reconcile.keys_repaired,
                    "handovers": p.reconcile.handovers,
                    "transfers": p.reconcile.transfers,
                    "last": p.reconcile.last.as_ref().map(|l| serde_json::json!({
                        "namespace": l.namespace.as_str(),
                        "mode": l.mode,
                        "trigger": l.trigger,
                        "outcome": l.outcome,
                        "symbols": l.symbols,
                        "differences": l.differences,
                        "keys_repaired": l.keys_repaired,
                        "duration_ms": l.duration.as_millis() as u64,
                        "ms_ago": l.at.elapsed().as_millis() as u64,
                        "error": l.error,
                    })),
                },
            })
        })
        .collect();
    let refusals: Vec<serde_json::Value> = r
        .refusals
        .iter()
        .map(|f| {
            serde_json::json!({
                "address": f.address,
                "direction": f.direction.name(),
                "code": f.code,
                "message": f.message,
                "ms_ago": f.age.as_millis() as u64,
            })
        })
        .collect();
    let conflicts: Vec<serde_json::Value> = r
        .conflicts
        .iter()
        .map(|c| {
            serde_json::json!({
                "node_id": c.node.to_string(),
                "kept_incarnation": format!("{:016x}", c.kept),
                "refused_incarnation": format!("{:016x}", c.refused),
                "address": c.address,
                "message": c.message,
                "ms_ago": c.age.as_millis() as u64,
            })
        })
        .collect();
    serde_json::json!({
        "cluster_id": r.cluster_id,
        "listen": r.listen.map(|a| a.to_string()),
        "incarnation": format!("{:016x}", r.incarnation),
        "peers": peers,
        "refusals": refusals,
        "node_conflicts": conflicts,
    })
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::DOCUMENT,
    )
        .into_response()
}
