//! The HTTP API v1: the router, the state every handler shares, and what every route
//! does first (path checks, the key extractor, bodies with a limit). Handlers live in
//! one file per group of routes.

mod admin;
mod batch;
mod changes;
mod keys;
mod write;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use asp_core::crdt::Policy;
use asp_core::{Dot, Key, Namespace};
use asp_node::Replicator;
use asp_store::Store;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::FutureExt as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// Default limit on a batch request body.
pub const DEFAULT_REQUEST_BYTES_MAX: usize = 16 << 20;
/// Default time a client has to send a request's header.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit on open HTTP connections.
pub const DEFAULT_CONNECTIONS_MAX: usize = 1024;
/// Default limit on live change streams (SSE).
pub const DEFAULT_STREAMS_MAX: usize = 256;

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
    /// Origins a browser may call the API from (`[http] cors_origins`,
    /// `--cors-origin`): each `scheme://host[:port]`, or `*` for any. Empty: no
    /// cross-origin access (no CORS headers at all). Checked by [`cors_origin`].
    pub cors_origins: Vec<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            request_bytes_max: DEFAULT_REQUEST_BYTES_MAX,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            connections_max: DEFAULT_CONNECTIONS_MAX,
            streams_max: DEFAULT_STREAMS_MAX,
            cors_origins: Vec::new(),
        }
    }
}

/// Checks one entry of `cors_origins`: `*`, or an origin as a browser sends it in
/// its `Origin` header — `http` or `https`, `://`, a host, an optional port, and
/// nothing after (no path, no trailing slash).
pub fn cors_origin(origin: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "{origin:?} is not an origin: {why} (write scheme://host[:port], e.g. https://app.example.com or http://localhost:5173, or * for any)"
        ))
    };
    if origin == "*" {
        return Ok(());
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return bad("no scheme");
    };
    if scheme != "http" && scheme != "https" {
        return bad("the scheme must be http or https");
    }
    if rest.contains('/') {
        return bad("nothing may follow the host and port, not even a /");
    }
    let port = if let Some(after) = rest.strip_prefix('[') {
        let Some((address, tail)) = after.split_once(']') else {
            return bad("an IPv6 address needs its closing ]");
        };
        if address.is_empty() || !address.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return bad("the brackets must hold an IPv6 address");
        }
        match tail {
            "" => None,
            t => match t.strip_prefix(':') {
                Some(port) => Some(port),
                None => return bad("only :port may follow the host"),
            },
        }
    } else {
        let (host, port) = match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        };
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            return bad("the host may hold only letters, digits, '.' and '-'");
        }
        port
    };
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return bad("the port must be a number up to 65535");
    }
    if origin.len() > 253 + 16 {
        return bad("too long");
    }
    Ok(())
}

/// The CORS layer for `origins` (already checked), or `None` for none: preflight
/// requests are answered, and the answers to an allowed origin carry its
/// `Access-Control-Allow-Origin`; a request from any other origin gets no CORS
/// headers, so a browser refuses it the response.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderValue, Method};
    use tower_http::cors::{AllowHeaders, AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                Method::GET,
                Method::PUT,
                Method::POST,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers(Any)
            .max_age(Duration::from_secs(600)),
    )
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
    /// Token checks (`None`: the node was started without `[auth]`).
    auth: Option<Arc<crate::auth::NodeAuth>>,
    /// The node's connectors (`None`: none configured).
    connectors: Option<Arc<dyn ConnectorsView>>,
    /// The NATS transport's state for status (`None`: no `[replication] transport`).
    transport: Option<TransportStatusFn>,
    /// Clients of the other members' APIs, for the cluster view.
    member_clients: crate::console::MemberClients,
}

/// What status shows of the NATS transport, read when status is asked for.
pub type TransportStatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the API shows of the node's connectors (`asp-connect` implements it; this
/// crate does not depend on it).
pub trait ConnectorsView: Send + Sync {
    /// Every connector's configuration and state, as `GET /v1/connectors` lists them.
    fn status(&self) -> serde_json::Value;
    fn register_metrics(&self, registry: &mut Registry);
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
                auth: None,
                connectors: None,
                transport: None,
                member_clients: crate::console::MemberClients::new(None),
            }),
        }
    }

    /// The same state with token checks; call before the state is shared.
    pub fn with_auth(mut self, auth: Arc<crate::auth::NodeAuth>) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("with_auth is called before the state is cloned")
            .auth = Some(auth);
        self
    }

    /// The same state showing the node's connectors (`GET /v1/connectors`, status,
    /// metrics); call before the state is shared.
    pub fn with_connectors(mut self, connectors: Arc<dyn ConnectorsView>) -> Self {
        let inner = Arc::get_mut(&mut self.inner)
            .expect("with_connectors is called before the state is cloned");
        connectors.register_metrics(&mut inner.registry);
        inner.connectors = Some(connectors);
        self
    }

    /// The same state showing the NATS transport in status; call before the state is
    /// shared.
    pub fn with_transport(mut self, status: TransportStatusFn) -> Self {
        let inner = Arc::get_mut(&mut self.inner)
            .expect("with_transport is called before the state is cloned");
        inner.transport = Some(status);
        self
    }

    /// The same state asking members whose API is HTTPS with this CA bundle (the
    /// cluster's); call before the state is shared.
    pub fn with_api_ca(mut self, ca: std::path::PathBuf) -> Self {
        let inner = Arc::get_mut(&mut self.inner)
            .expect("with_api_ca is called before the state is cloned");
        inner.member_clients = crate::console::MemberClients::new(Some(ca));
        self
    }

    pub(crate) fn member_clients(&self) -> &crate::console::MemberClients {
        &self.inner.member_clients
    }

    /// A slot of `sse_streams_max` for a live stream, or the limit when none is free.
    pub(crate) fn stream_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, usize> {
        self.inner.streams.clone().try_acquire_owned().map_err(|_| {
            self.inner.streams_refused.inc();
            self.inner.config.streams_max
        })
    }

    pub(crate) fn transport(&self) -> Option<serde_json::Value> {
        self.inner.transport.as_ref().map(|f| f())
    }

    pub(crate) fn connectors(&self) -> Option<&dyn ConnectorsView> {
        self.inner.connectors.as_deref()
    }

    pub(crate) fn replicator(&self) -> Option<&Replicator> {
        self.inner.replicator.as_ref()
    }

    /// The replicator, or the answer of a node that runs without one (503).
    pub(crate) fn replicated(&self) -> Result<&Replicator, ApiError> {
        self.replicator().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "internal",
                "this node runs without replication",
            )
        })
    }

    pub(crate) fn auth(&self) -> Option<&crate::auth::NodeAuth> {
        self.inner.auth.as_deref()
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

/// What `GET /v1/status` answers.
pub(crate) async fn admin_status(state: &AppState) -> serde_json::Value {
    admin::status_value(state).await
}

pub fn router(state: AppState) -> Router {
    let cors = cors_layer(&state.config().cors_origins);
    let router = Router::new()
        .route("/healthz", get(admin::healthz))
        .route("/metrics", get(admin::metrics))
        .route("/v1/status", get(admin::status))
        .route("/v1/cluster", get(crate::console::cluster))
        .route("/v1/cluster/stream", get(crate::console::cluster_stream))
        .route("/ui", get(crate::console::index))
        .route("/ui/", get(crate::console::index))
        .route("/ui/app.js", get(crate::console::app_js))
        .route("/ui/app.css", get(crate::console::app_css))
        .route("/v1/connectors", get(admin::connectors))
        .route("/v1/admin/compact", post(admin::compact))
        .route(
            "/v1/admin/quarantine/{ns}/retry",
            post(admin::quarantine_retry),
        )
        .route(
            "/v1/admin/quarantine/{ns}/discard",
            post(admin::quarantine_discard),
        )
        .route("/v1/admin/scrub", post(admin::scrub))
        .route("/v1/admin/tokens/revoke", post(admin::revoke_token))
        .route(
            "/v1/admin/shares",
            get(crate::shares_api::list).post(crate::shares_api::install),
        )
        .route(
            "/v1/admin/shares/{id}/revoke",
            post(crate::shares_api::revoke),
        )
        .route("/v1/openapi.json", get(admin::openapi))
        .route("/v1/ns/{ns}/kv", get(keys::list_keys))
        .route(
            "/v1/ns/{ns}/kv/",
            get(empty_key).put(empty_key).delete(empty_key),
        )
        .route(
            "/v1/ns/{ns}/kv/{*key}",
            get(keys::get_key)
                .put(keys::put_key)
                .delete(keys::delete_key)
                .post(keys::post_key)
                .patch(keys::patch_key),
        )
        .route(
            "/v1/ns/{ns}/policy",
            get(keys::get_policy).put(keys::put_policy),
        )
        .route(
            "/v1/ns/{ns}/residency",
            get(admin::get_residency).put(admin::put_residency),
        )
        .route(
            "/v1/ns/{ns}/placement",
            get(crate::placement_api::get)
                .put(crate::placement_api::put)
                .delete(crate::placement_api::delete),
        )
        .route(
            "/v1/ns/{ns}/mode",
            get(crate::modes_api::get_mode).put(crate::modes_api::put_mode),
        )
        .route("/v1/ns/{ns}/promote", post(crate::modes_api::promote))
        .route(
            "/v1/ns/{ns}/leases",
            get(crate::leases_api::list).post(crate::leases_api::acquire),
        )
        .route(
            "/v1/ns/{ns}/leases/{name}",
            get(crate::leases_api::get).delete(crate::leases_api::release),
        )
        .route(
            "/v1/ns/{ns}/leases/{name}/keepalive",
            post(crate::leases_api::keepalive),
        )
        .route("/v1/ns/{ns}/divergent", get(crate::modes_api::divergent))
        .route("/v1/ns/{ns}/stats", get(keys::namespace_stats))
        .route("/v1/ns/{ns}/batch", post(batch::batch))
        .route("/v1/ns/{ns}/changes", get(changes::changes))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state);
    // Outermost: a preflight is answered before the token check (a browser sends
    // none with it).
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// Counts answers, refuses malformed percent-encoding, and turns a panic into a 500
/// rather than a dropped connection.
async fn guard(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    // What the request needs, worked out once for the token check and for residency.
    let need = crate::auth::need_of(request.method(), request.uri());
    let checked = crate::auth::check(state.auth(), &need, request.headers());
    let response = if let Some(e) = check_percent_encoding(request.uri().path()) {
        e.into_response()
    } else if let Err(refused) = checked {
        crate::auth::to_response(refused)
    } else if let Some(refused) = need
        .written_namespace()
        .and_then(|ns| crate::residency_api::refuse_write(&state, ns))
    {
        refused.into_response()
    } else if let Some(elsewhere) = crate::placement_api::redirect(&state, request.uri()) {
        elsewhere
    } else {
        if let Ok(Some(verified)) = checked {
            request.extensions_mut().insert(verified);
        }
        // A redirect's hop count is for the nodes, not the handlers.
        if let Some(uri) = crate::placement_api::without_hops(request.uri()) {
            *request.uri_mut() = uri;
        }
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

pub(crate) fn path_error(e: PathRejection) -> ApiError {
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

/// The body of an admin request: a JSON object of at most 4 KiB with only `fields`
/// (an empty body is an empty object); errors say to send `example`.
pub(crate) fn json_object(
    body: &[u8],
    fields: &[&str],
    example: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    const BYTES_MAX: usize = 4096;
    if body.len() > BYTES_MAX {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is at most {BYTES_MAX} bytes"),
        ));
    }
    let bad = |m: String| ApiError::bad_request("invalid_body", m);
    let value = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Object(Default::default())
    } else {
        serde_json::from_slice(body).map_err(|e| bad(format!("send {example}: {e}")))?
    };
    let serde_json::Value::Object(o) = value else {
        return Err(bad(format!("send a JSON object, like {example}")));
    };
    if let Some(k) = o.keys().find(|k| !fields.contains(&k.as_str())) {
        return Err(bad(format!("unknown field {k:?}; send {example}")));
    }
    Ok(o)
}

pub(crate) fn namespace(name: &str) -> Result<Namespace, ApiError> {
    Namespace::new(name).map_err(|e| ApiError::bad_request("invalid_namespace", e.to_string()))
}

fn key(k: &str) -> Result<Key, ApiError> {
    Key::new(k).map_err(|e| ApiError::bad_request("invalid_key", e.to_string()))
}

/// What every handler of `/v1/ns/{ns}/kv/{key}` starts from: the path's namespace
/// and key, checked (`invalid_path`, `invalid_namespace`, `invalid_key`), and the
/// namespace's conflict policy, which decides what the request means (a `PUT` of a
/// siblings namespace adds a sibling; of an lww one, replaces the value).
pub(crate) struct KeyTarget {
    pub ns: Namespace,
    pub key: Key,
    pub policy: Policy,
}

impl FromRequestParts<AppState> for KeyTarget {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Path((ns, k)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(path_error)?;
        let ns = namespace(&ns)?;
        let key = key(&k)?;
        let policy = state.store().policy(&ns);
        Ok(KeyTarget { ns, key, policy })
    }
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
