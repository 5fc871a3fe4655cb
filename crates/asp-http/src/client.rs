//! A small client for the HTTP API, used by the CLI, the tests and the benchmarks.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Characters left as they are in a path segment or query value: RFC 3986 unreserved.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
/// How long a request (not a stream) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error(
        "invalid node URL {0:?}: use http://host:port or https://host:port, for example http://127.0.0.1:7700"
    )]
    InvalidUrl(String),
    #[error("{0}")]
    Tls(String),
    #[error("cannot reach {url}: {detail} (is `asp serve` running there?)")]
    Connect { url: String, detail: String },
    #[error("no answer from {0} within {1:?}")]
    Timeout(String, Duration),
    #[error("{0}")]
    Protocol(String),
    #[error("{status}: {code}: {message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| ClientError::Protocol(format!("answer is not JSON: {e}")))
    }

    /// `Ok(self)` for 2xx and 304, otherwise the API error it carries.
    pub fn ok(self) -> Result<Self, ClientError> {
        if self.status.is_success() || self.status == StatusCode::NOT_MODIFIED {
            return Ok(self);
        }
        let (code, message) = match self.json() {
            Ok(v) => (
                v["error"]["code"].as_str().unwrap_or("unknown").to_owned(),
                v["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            Err(_) => (
                "unknown".into(),
                String::from_utf8_lossy(&self.body).into_owned(),
            ),
        };
        Err(ClientError::Api {
            status: self.status,
            code,
            message,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How a client reaches a node beyond its address.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// The CA bundle (PEM) that signs the node's certificate, for `https://` nodes.
    pub ca: Option<std::path::PathBuf>,
    /// Sent as `Authorization: Bearer TOKEN` with every request.
    pub token: Option<String>,
}

#[derive(Clone)]
pub struct Client {
    base: String,
    http: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    authorization: Option<HeaderValue>,
}

/// Percent-encodes one path segment or query value.
pub fn encode(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

impl Client {
    /// `base` is the node's API address, e.g. `http://127.0.0.1:7700`.
    pub fn new(base: &str) -> Result<Self, ClientError> {
        Client::with_options(base, &ClientOptions::default())
    }

    /// A client of an `http://` or `https://` node, with a CA bundle and a token.
    pub fn with_options(base: &str, options: &ClientOptions) -> Result<Self, ClientError> {
        let trimmed = base.trim_end_matches('/');
        let (https, rest) = match (
            trimmed.strip_prefix("http://"),
            trimmed.strip_prefix("https://"),
        ) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err(ClientError::InvalidUrl(base.to_owned())),
        };
        if rest.is_empty() || rest.contains('/') || trimmed.parse::<axum::http::Uri>().is_err() {
            return Err(ClientError::InvalidUrl(base.to_owned()));
        }
        let roots = match &options.ca {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    ClientError::Tls(format!("cannot read CA bundle {}: {e}", path.display()))
                })?;
                asp_tls::roots(path, &pem).map_err(|e| ClientError::Tls(e.to_string()))?
            }
            None if https => {
                return Err(ClientError::Tls(format!(
                    "{base} is HTTPS: give the CA bundle that signed its certificate (--ca FILE or ASP_CA)"
                )));
            }
            None => std::sync::Arc::new(rustls::RootCertStore::empty()),
        };
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let http = HyperClient::builder(TokioExecutor::new())
            // Below the server's default header read timeout (10 s), which closes
            // idle connections: the pool lets them go first.
            .pool_idle_timeout(Duration::from_secs(5))
            .build(connector);
        let authorization = match &options.token {
            Some(token) => Some(
                HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| {
                    ClientError::Protocol("the token has characters HTTP does not allow".into())
                })?,
            ),
            None => None,
        };
        Ok(Client {
            base: trimmed.to_owned(),
            http,
            authorization,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The path of a key.
    pub fn kv_path(namespace: &str, key: &str) -> String {
        format!("/v1/ns/{}/kv/{}", encode(namespace), encode(key))
    }

    async fn start(
        &self,
        method: Method,
        path: &str,
        headers: &[(HeaderName, &str)],
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = Request::builder().method(method).uri(&url);
        for (name, value) in headers {
            let value = HeaderValue::from_str(value).map_err(|_| {
                ClientError::Protocol(format!("header {name} has characters HTTP does not allow"))
            })?;
            request = request.header(name, value);
        }
        if let Some(auth) = &self.authorization {
            request = request.header(header::AUTHORIZATION, auth.clone());
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.http.request(request).await.map_err(|e| {
            let mut detail = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                detail = format!("{detail}: {s}");
                source = s.source();
            }
            ClientError::Connect {
                url: self.base.clone(),
                detail,
            }
        })
    }

    /// Sends a request and reads the whole answer, whatever its status.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(HeaderName, &str)],
        body: Bytes,
    ) -> Result<Response, ClientError> {
        let work = async {
            let response = self.start(method, path, headers, body).await?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| ClientError::Protocol(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, work)
            .await
            .map_err(|_| ClientError::Timeout(self.base.clone(), REQUEST_TIMEOUT))?
    }

    pub async fn put(
        &self,
        namespace: &str,
        key: &str,
        content_type: &str,
        value: Bytes,
        if_match: Option<&str>,
    ) -> Result<serde_json::Value, ClientError> {
        self.put_expiring(namespace, key, content_type, value, if_match, None)
            .await
    }

    /// [`Client::put`] with a time to live (`?ttl_ms=`), if given.
    pub async fn put_expiring(
        &self,
        namespace: &str,
        key: &str,
        content_type: &str,
        value: Bytes,
        if_match: Option<&str>,
        ttl_ms: Option<u64>,
    ) -> Result<serde_json::Value, ClientError> {
        let mut headers = vec![(header::CONTENT_TYPE, content_type)];
        let if_match = if_match.map(entity_tag);
        if let Some(m) = &if_match {
            headers.push((header::IF_MATCH, m.as_str()));
        }
        let mut path = Self::kv_path(namespace, key);
        if let Some(ttl) = ttl_ms {
            path.push_str(&format!("?ttl_ms={ttl}"));
        }
        self.send(Method::PUT, &path, &headers, value)
            .await?
            .ok()?
            .json()
    }

    /// The value and its answer headers; `None` when the key does not exist.
    pub async fn get(
        &self,
        namespace: &str,
        key: &str,
        accept: Option<&str>,
    ) -> Result<Option<Response>, ClientError> {
        let headers: Vec<_> = accept.map(|a| (header::ACCEPT, a)).into_iter().collect();
        let response = self
            .send(
                Method::GET,
                &Self::kv_path(namespace, key),
                &headers,
                Bytes::new(),
            )
            .await?;
        if response.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        response.ok().map(Some)
    }

    pub async fn delete(
        &self,
        namespace: &str,
        key: &str,
        if_match: Option<&str>,
    ) -> Result<serde_json::Value, ClientError> {
        let if_match = if_match.map(entity_tag);
        let headers: Vec<_> = if_match
            .iter()
            .map(|m| (header::IF_MATCH, m.as_str()))
            .collect();
        self.send(
            Method::DELETE,
            &Self::kv_path(namespace, key),
            &headers,
            Bytes::new(),
        )
        .await?
        .ok()?
        .json()
    }

    /// A namespace's conflict policy; with `set`, sets it first.
    pub async fn policy(
        &self,
        namespace: &str,
        set: Option<&str>,
    ) -> Result<serde_json::Value, ClientError> {
        let path = format!("/v1/ns/{}/policy", encode(namespace));
        let (method, body) = match set {
            Some(p) => (
                Method::PUT,
                Bytes::from(serde_json::json!({ "policy": p }).to_string()),
            ),
            None => (Method::GET, Bytes::new()),
        };
        self.send(method, &path, &[], body).await?.ok()?.json()
    }

    /// Resolves a namespace's quarantined events: `retry` or `discard`.
    pub async fn quarantine(
        &self,
        namespace: &str,
        action: &str,
    ) -> Result<serde_json::Value, ClientError> {
        let path = format!(
            "/v1/admin/quarantine/{}/{}",
            encode(namespace),
            encode(action)
        );
        self.send(Method::POST, &path, &[], Bytes::new())
            .await?
            .ok()?
            .json()
    }

    /// An operation on a key of a counter or set namespace (`{"incr": n}`, `{"add": v}`,
    /// `{"remove": v}`).
    pub async fn operate(
        &self,
        namespace: &str,
        key: &str,
        op: serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        self.send(
            Method::POST,
            &Self::kv_path(namespace, key),
            &[(header::CONTENT_TYPE, "application/json")],
            Bytes::from(op.to_string()),
        )
        .await?
        .ok()?
        .json()
    }

    pub async fn batch(
        &self,
        namespace: &str,
        body: Bytes,
    ) -> Result<serde_json::Value, ClientError> {
        self.post_batch(namespace, body).await?.json()
    }

    /// `POST /v1/ns/{ns}/batch`, its answer checked for an API error.
    async fn post_batch(&self, namespace: &str, body: Bytes) -> Result<Response, ClientError> {
        let path = format!("/v1/ns/{}/batch", encode(namespace));
        self.send(
            Method::POST,
            &path,
            &[(header::CONTENT_TYPE, "application/json")],
            body,
        )
        .await?
        .ok()
    }

    /// A batch whose answer is only counted: how many results it holds, read without
    /// building a JSON tree of them (for bulk loads, where the answer is as long as
    /// the batch).
    pub async fn batch_results(&self, namespace: &str, body: Bytes) -> Result<usize, ClientError> {
        #[derive(serde::Deserialize)]
        struct Answer {
            results: Vec<serde::de::IgnoredAny>,
        }
        let response = self.post_batch(namespace, body).await?;
        let answer: Answer = serde_json::from_slice(&response.body)
            .map_err(|e| ClientError::Protocol(format!("answer is not a batch's: {e}")))?;
        Ok(answer.results.len())
    }

    pub async fn list(
        &self,
        namespace: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        values: bool,
    ) -> Result<serde_json::Value, ClientError> {
        let mut path = format!(
            "/v1/ns/{}/kv?prefix={}&limit={limit}&values={values}",
            encode(namespace),
            encode(prefix)
        );
        if let Some(a) = after {
            path.push_str(&format!("&after={}", encode(a)));
        }
        self.send(Method::GET, &path, &[], Bytes::new())
            .await?
            .ok()?
            .json()
    }

    pub async fn changes(
        &self,
        namespace: &str,
        since: u64,
        limit: usize,
    ) -> Result<serde_json::Value, ClientError> {
        let path = format!(
            "/v1/ns/{}/changes?since={since}&limit={limit}",
            encode(namespace)
        );
        self.send(Method::GET, &path, &[], Bytes::new())
            .await?
            .ok()?
            .json()
    }

    pub async fn status(&self) -> Result<serde_json::Value, ClientError> {
        self.send(Method::GET, "/v1/status", &[], Bytes::new())
            .await?
            .ok()?
            .json()
    }

    /// Opens a live change stream after feed position `since`.
    pub async fn watch(&self, namespace: &str, since: u64) -> Result<EventStream, ClientError> {
        let path = format!("/v1/ns/{}/changes", encode(namespace));
        let since = since.to_string();
        self.stream(&path, &[(HeaderName::from_static("last-event-id"), &since)])
            .await
    }

    /// Opens a stream of Server-Sent Events at `path` (with `Accept:
    /// text/event-stream` and `headers`), e.g. `/v1/cluster/stream`.
    pub async fn stream(
        &self,
        path: &str,
        headers: &[(HeaderName, &str)],
    ) -> Result<EventStream, ClientError> {
        let mut all = vec![(header::ACCEPT, "text/event-stream")];
        all.extend(headers.iter().map(|(n, v)| (n.clone(), *v)));
        let response = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.start(Method::GET, path, &all, Bytes::new()),
        )
        .await
        .map_err(|_| ClientError::Timeout(self.base.clone(), REQUEST_TIMEOUT))??;
        if !response.status().is_success() {
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            }
            .ok()
            .err()
            .unwrap_or(ClientError::Protocol("unexpected answer".into())));
        }
        Ok(EventStream {
            body: response.into_body(),
            buf: Vec::new(),
        })
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// A Server-Sent Events stream being read.
pub struct EventStream {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

/// The longest event accepted.
const EVENT_BYTES_MAX: usize = 64 << 20;

impl EventStream {
    /// The next event (comments and keep-alives skipped); `None` when the server ends
    /// the stream.
    pub async fn next(&mut self) -> Result<Option<ServerEvent>, ClientError> {
        loop {
            if let Some(end) = find_blank_line(&self.buf) {
                let block: Vec<u8> = self.buf.drain(..end.1).collect();
                let text = String::from_utf8_lossy(&block[..end.0]).into_owned();
                if let Some(event) = parse_event(&text) {
                    return Ok(Some(event));
                }
                continue;
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(ClientError::Protocol(format!("stream broke: {e}"))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                        if self.buf.len() > EVENT_BYTES_MAX {
                            return Err(ClientError::Protocol("event larger than 64 MiB".into()));
                        }
                    }
                }
            }
        }
    }
}

/// Finds the end of the first event block: (end of its text, end including the blank
/// line).
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    for i in 0..buf.len() {
        if buf[i..].starts_with(b"\n\n") {
            return Some((i, i + 2));
        }
        if buf[i..].starts_with(b"\r\n\r\n") {
            return Some((i, i + 4));
        }
    }
    None
}

fn parse_event(text: &str) -> Option<ServerEvent> {
    let mut event = ServerEvent {
        id: None,
        event: None,
        data: String::new(),
    };
    let mut has_data = false;
    for line in text.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => event.id = Some(value.to_owned()),
            "event" => event.event = Some(value.to_owned()),
            "data" => {
                if has_data {
                    event.data.push('\n');
                }
                event.data.push_str(value);
                has_data = true;
            }
            _ => {}
        }
    }
    has_data.then_some(event)
}

/// An `If-Match` value: a bare version (`17@9f3c2a0b11d4e5f6`, as answers write it)
/// gets the quotes of an entity tag; anything else is sent as given.
fn entity_tag(m: &str) -> String {
    let m = m.trim();
    if m.parse::<asp_core::Dot>().is_ok() {
        format!("\"{m}\"")
    } else {
        m.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(Client::new("http://127.0.0.1:7700").is_ok());
        assert!(Client::new("http://127.0.0.1:7700/").is_ok());
        assert!(Client::new("127.0.0.1:7700").is_err());
        assert!(Client::new("https://x").is_err(), "HTTPS needs a CA bundle");
        assert!(Client::new("ftp://x").is_err());
        assert!(Client::new("http://").is_err());
        assert!(Client::new("http://a/b").is_err());
    }

    #[test]
    fn keys_are_encoded_as_one_segment() {
        assert_eq!(
            Client::kv_path("ns", "a/b c%é"),
            "/v1/ns/ns/kv/a%2Fb%20c%25%C3%A9"
        );
    }

    #[test]
    fn events_parse() {
        assert_eq!(
            parse_event("id: 5\nevent: change\ndata: {\"a\":1}"),
            Some(ServerEvent {
                id: Some("5".into()),
                event: Some("change".into()),
                data: "{\"a\":1}".into()
            })
        );
        assert_eq!(parse_event(": keep-alive"), None);
    }
}
