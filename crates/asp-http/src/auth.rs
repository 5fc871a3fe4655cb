//! Who may do what through the API: what each request needs (from its method and path),
//! the bearer-token check when `[auth] required`, and the namespaces reserved for the
//! node itself (`_asp.`), which no client writes.

use std::collections::HashMap;
use std::sync::Arc;

use asp_auth::{Access, AuthError, KeyBook, Keys, Op, Verified};
use asp_core::{Namespace, NodeId};
use asp_store::Store;
use axum::extract::Query;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use crate::error::ApiError;

/// `[auth]`.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// Requests need a valid bearer token (`/healthz` and `/v1/openapi.json` never do).
    pub required: bool,
    /// `/metrics` without a token (with `required`).
    pub metrics_open: bool,
}

/// A node's token verification: its own key, and the cluster's keys and revocations
/// as replicated into `_asp.auth`.
pub struct NodeAuth {
    node: NodeId,
    public: [u8; 32],
    store: Store,
    pub config: AuthConfig,
    cache: asp_auth::VerifyCache,
}

impl NodeAuth {
    pub fn new(node: NodeId, public: [u8; 32], store: Store, config: AuthConfig) -> Arc<NodeAuth> {
        Arc::new(NodeAuth {
            node,
            public,
            store,
            config,
            cache: asp_auth::VerifyCache::default(),
        })
    }
}

/// The JSON a node publishes under `key/<node id>` of `_asp.auth`.
pub fn public_key_record(public: &[u8; 32]) -> serde_json::Value {
    serde_json::json!({
        "ed25519": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public),
    })
}

fn auth_namespace() -> Namespace {
    Namespace::new(asp_auth::AUTH_NAMESPACE).expect("a valid name")
}

impl KeyBook for NodeAuth {
    fn public_key(&self, node: u64) -> Option<Vec<u8>> {
        if node == self.node.get() {
            return Some(self.public.to_vec());
        }
        let state = self
            .store
            .get(&auth_namespace(), &asp_auth::public_key_key(node))
            .ok()??;
        let value = state.value?;
        let record: serde_json::Value = serde_json::from_slice(&value.bytes).ok()?;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(record["ed25519"].as_str()?)
            .ok()
            .filter(|k| k.len() == 32)
    }

    fn revoked(&self, id: &str) -> bool {
        // A lookup that fails counts as revoked: a token is never let through because
        // the store could not say.
        match self
            .store
            .get(&auth_namespace(), &asp_auth::revoked_key(id))
        {
            Ok(Some(state)) => state.value.is_some(),
            Ok(None) => false,
            Err(_) => true,
        }
    }
}

/// What a request needs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// Nothing: health, the API document, unknown paths (404 either way).
    Open,
    /// Open unless `[auth] required` and not `metrics_open`; then node-wide read.
    Metrics,
    Access {
        namespace: Option<String>,
        op: Op,
        keys: NeedKeys,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NeedKeys {
    Key(String),
    Prefix(String),
    Any,
    /// The handler checks each key (a batch).
    EachInBody,
}

fn decode(segment: &str) -> Option<String> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// What `method` on `uri` needs. Paths that do not parse need nothing here: the router
/// answers them (404, 405, 400).
pub(crate) fn need_of(method: &Method, uri: &Uri) -> Need {
    let path = uri.path();
    let reading = matches!(*method, Method::GET | Method::HEAD);
    let access = |namespace: Option<String>, op, keys| Need::Access {
        namespace,
        op,
        keys,
    };
    match path {
        "/healthz" | "/v1/openapi.json" | "/ui" | "/ui/" | "/ui/app.js" | "/ui/app.css" => {
            return Need::Open;
        }
        "/metrics" => return Need::Metrics,
        "/v1/status" | "/v1/connectors" | "/v1/cluster" | "/v1/cluster/stream" => {
            return access(None, Op::Read, NeedKeys::Any);
        }
        "/v1/admin/compact"
        | "/v1/admin/scrub"
        | "/v1/admin/tokens/revoke"
        | "/v1/admin/shares" => {
            return access(None, Op::Admin, NeedKeys::Any);
        }
        _ => {}
    }
    if path.starts_with("/v1/admin/shares/") {
        return access(None, Op::Admin, NeedKeys::Any);
    }
    if let Some(rest) = path.strip_prefix("/v1/admin/quarantine/") {
        let ns = rest.split('/').next().and_then(decode);
        return match ns {
            Some(ns) => access(Some(ns), Op::Admin, NeedKeys::Any),
            None => Need::Open,
        };
    }
    let Some(rest) = path.strip_prefix("/v1/ns/") else {
        return Need::Open;
    };
    let Some((ns, rest)) = rest.split_once('/') else {
        return Need::Open;
    };
    let Some(ns) = decode(ns) else {
        return Need::Open;
    };
    let ns = Some(ns);
    let op = if reading { Op::Read } else { Op::Write };
    match rest {
        "kv" => {
            let prefix = Query::<HashMap<String, String>>::try_from_uri(uri)
                .ok()
                .and_then(|q| q.0.get("prefix").cloned())
                .unwrap_or_default();
            access(ns, Op::Read, NeedKeys::Prefix(prefix))
        }
        "policy" | "mode" | "placement" if reading => access(ns, Op::Read, NeedKeys::Any),
        // Counts over every key: a token must read them all.
        "stats" if reading => access(ns, Op::Read, NeedKeys::Prefix(String::new())),
        "policy" | "residency" | "placement" | "mode" | "promote" => {
            access(ns, Op::Admin, NeedKeys::Any)
        }
        "divergent" => access(ns, Op::Read, NeedKeys::Any),
        "leases" if reading => access(ns, Op::Read, NeedKeys::Any),
        "leases" => access(ns, Op::Write, NeedKeys::Any),
        _ if rest.starts_with("leases/") && reading => access(ns, Op::Read, NeedKeys::Any),
        _ if rest.starts_with("leases/") => access(ns, Op::Write, NeedKeys::Any),
        "batch" => access(ns, Op::Write, NeedKeys::EachInBody),
        "changes" => access(ns, Op::Read, NeedKeys::Any),
        _ => match rest.strip_prefix("kv/").map(decode) {
            Some(Some(key)) => access(ns, op, NeedKeys::Key(key)),
            _ => Need::Open,
        },
    }
}

impl Need {
    /// The namespace the request writes data to (key writes and batches), if any.
    pub(crate) fn written_namespace(&self) -> Option<&str> {
        match self {
            Need::Access {
                namespace: Some(ns),
                op: Op::Write,
                ..
            } => Some(ns),
            _ => None,
        }
    }
}

fn unauthenticated(message: impl Into<String>) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"asp\""),
    );
    response
}

fn forbidden(message: impl Into<String>) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message).into_response()
}

fn now_ms() -> u64 {
    asp_store::clock::wall_ms()
}

/// The bearer token of a request's `Authorization` header.
fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let refuse = |m: &str| AuthError::Unauthenticated(m.to_owned());
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(refuse(
            "this node requires a bearer token: send Authorization: Bearer TOKEN (asp token create)",
        ));
    };
    let value = value
        .to_str()
        .map_err(|_| refuse("the Authorization header is not text"))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(token.trim()),
        _ => Err(refuse("the Authorization header must be Bearer TOKEN")),
    }
}

/// Checks a request: writes to reserved namespaces are refused always; with `[auth]
/// required`, the token must cover what the request needs. Returns the verified token
/// for handlers that check more (a batch's keys).
pub(crate) fn check(
    auth: Option<&NodeAuth>,
    need: &Need,
    headers: &HeaderMap,
) -> Result<Option<Verified>, AuthError> {
    if let Need::Access {
        namespace: Some(ns),
        op: Op::Write | Op::Admin,
        ..
    } = need
        && ns.starts_with(asp_auth::RESERVED_PREFIX)
    {
        return Err(AuthError::Forbidden(format!(
            "namespace {ns:?} is the node's own (names starting with {:?} are reserved); clients cannot write it",
            asp_auth::RESERVED_PREFIX
        )));
    }
    let Some(auth) = auth.filter(|a| a.config.required) else {
        return Ok(None);
    };
    let (namespace, op, keys) = match need {
        Need::Open => return Ok(None),
        Need::Metrics if auth.config.metrics_open => return Ok(None),
        Need::Metrics => (None, Op::Read, Keys::Any),
        Need::Access {
            namespace,
            op,
            keys,
        } => (
            namespace.as_deref(),
            *op,
            match keys {
                NeedKeys::Key(k) => Keys::Key(k),
                NeedKeys::Prefix(p) => Keys::Prefix(p),
                NeedKeys::Any => Keys::Any,
                // Every key is checked by the handler (`allows_key`).
                NeedKeys::EachInBody => Keys::EachChecked,
            },
        ),
    };
    let token = bearer(headers)?;
    let verified = asp_auth::verify_with(token, auth, Some(&auth.cache))?;
    let access = Access {
        namespace,
        op,
        keys,
    };
    verified.allows(&access, now_ms())?;
    Ok(Some(verified))
}

/// Whether a verified token allows `op` on `key` of `namespace` (a batch's keys).
pub(crate) fn allows_key(
    verified: &Verified,
    namespace: &str,
    op: Op,
    key: &str,
) -> Result<(), AuthError> {
    verified.allows(
        &Access {
            namespace: Some(namespace),
            op,
            keys: Keys::Key(key),
        },
        now_ms(),
    )
}

/// The API's answer to a refusal.
pub(crate) fn to_response(e: AuthError) -> Response {
    match e {
        AuthError::Unauthenticated(m) => unauthenticated(m),
        AuthError::Forbidden(m) => forbidden(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(method: Method, uri: &str) -> Need {
        need_of(&method, &uri.parse().unwrap())
    }

    fn access(ns: Option<&str>, op: Op, keys: NeedKeys) -> Need {
        Need::Access {
            namespace: ns.map(str::to_owned),
            op,
            keys,
        }
    }

    #[test]
    fn every_route_needs_what_it_does() {
        assert_eq!(need(Method::GET, "/healthz"), Need::Open);
        assert_eq!(need(Method::GET, "/v1/openapi.json"), Need::Open);
        assert_eq!(need(Method::GET, "/metrics"), Need::Metrics);
        assert_eq!(
            need(Method::GET, "/v1/status"),
            access(None, Op::Read, NeedKeys::Any)
        );
        for p in [
            "/v1/admin/compact",
            "/v1/admin/scrub",
            "/v1/admin/tokens/revoke",
            "/v1/admin/shares",
            "/v1/admin/shares/0123456789abcdef/revoke",
        ] {
            assert_eq!(
                need(Method::POST, p),
                access(None, Op::Admin, NeedKeys::Any)
            );
        }
        assert_eq!(
            need(Method::POST, "/v1/admin/quarantine/a%2Db/retry"),
            access(Some("a-b"), Op::Admin, NeedKeys::Any)
        );
        assert_eq!(
            need(Method::GET, "/v1/ns/o/kv/eu%2F1"),
            access(Some("o"), Op::Read, NeedKeys::Key("eu/1".into()))
        );
        assert_eq!(
            need(Method::GET, "/v1/ns/o/kv/a/b"),
            access(Some("o"), Op::Read, NeedKeys::Key("a/b".into()))
        );
        for m in [Method::PUT, Method::DELETE, Method::POST, Method::PATCH] {
            assert_eq!(
                need(m, "/v1/ns/o/kv/k"),
                access(Some("o"), Op::Write, NeedKeys::Key("k".into()))
            );
        }
        assert_eq!(
            need(Method::GET, "/v1/ns/o/kv?prefix=eu%2F&limit=3"),
            access(Some("o"), Op::Read, NeedKeys::Prefix("eu/".into()))
        );
        assert_eq!(
            need(Method::GET, "/v1/ns/o/kv"),
            access(Some("o"), Op::Read, NeedKeys::Prefix(String::new()))
        );
        assert_eq!(
            need(Method::GET, "/v1/ns/o/policy"),
            access(Some("o"), Op::Read, NeedKeys::Any)
        );
        assert_eq!(
            need(Method::PUT, "/v1/ns/o/policy"),
            access(Some("o"), Op::Admin, NeedKeys::Any)
        );
        assert_eq!(
            need(Method::POST, "/v1/ns/o/batch"),
            access(Some("o"), Op::Write, NeedKeys::EachInBody)
        );
        assert_eq!(
            need(Method::GET, "/v1/ns/o/changes?since=3"),
            access(Some("o"), Op::Read, NeedKeys::Any)
        );
        assert_eq!(need(Method::GET, "/nowhere"), Need::Open);
    }
}
