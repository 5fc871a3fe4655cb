//! The write concern (`replicas`, `timeout_ms`) and the answer every write gives.

use std::time::Duration;

use asp_core::Namespace;
use asp_node::{Replicas, Replicator};
use asp_store::{CrdtOp, WriteKind, WriteOp};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{AppState, etag, query_error};
use crate::error::ApiError;
use crate::json::WriteOut;

/// Query parameters of a write: the write concern.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WriteParams {
    replicas: Option<String>,
    timeout_ms: Option<u64>,
    ttl_ms: Option<u64>,
    lease: Option<String>,
}

/// How many nodes must hold a write durably before the answer, and how long to wait.
pub(super) struct Concern {
    replicas: Replicas,
    timeout: Duration,
    /// `If-Fence: <lease>:<token>`: the write applies only while `token` is the
    /// newest of the lease (docs/MODES.md, *Leases*).
    pub(super) fence: Option<asp_store::Fence>,
    /// `ttl_ms`: a PUT's key expires this long after it is written.
    pub(super) ttl_ms: Option<u64>,
    /// `lease`: a PUT's key is deleted when this lease ends.
    pub(super) lease: Option<String>,
}

impl Concern {
    /// Refuses `ttl_ms` and `lease` where they do not apply.
    pub(super) fn refuse_ttl(&self, what: &str) -> Result<(), ApiError> {
        if self.ttl_ms.is_some() || self.lease.is_some() {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!(
                    "ttl_ms and lease apply to a PUT of a key of an lww namespace, not to {what}"
                ),
            ));
        }
        Ok(())
    }
}

/// Parses `If-Fence: <lease name>:<token>` (the name may hold ':'; the token is what
/// follows the last one).
fn if_fence(parts: &Parts) -> Result<Option<asp_store::Fence>, ApiError> {
    let mut values = parts.headers.get_all("if-fence").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad = |why: &str| {
        ApiError::bad_request(
            "invalid_header",
            format!("If-Fence is <lease name>:<token>, like job-1:4294967297; {why}"),
        )
    };
    if values.next().is_some() {
        return Err(bad("send one"));
    }
    let text = value
        .to_str()
        .map_err(|_| bad("this one is not visible ASCII"))?;
    let (name, token) = text.rsplit_once(':').ok_or_else(|| bad("no ':'"))?;
    let token: u64 = token
        .trim()
        .parse()
        .map_err(|_| bad("the token is not a whole number"))?;
    let name = name.trim();
    if name.is_empty() || name.len() > asp_node::leases::LEASE_NAME_BYTES_MAX {
        return Err(bad("the lease name is 1 to 256 bytes"));
    }
    Ok(Some(asp_store::Fence {
        name: name.to_owned(),
        token,
    }))
}

const REPLICAS_MAX: usize = 64;
const REPLICA_TIMEOUT_MS_DEFAULT: u64 = 5_000;
const REPLICA_TIMEOUT_MS_MAX: u64 = 60_000;

/// Every write's query (`replicas`, `timeout_ms`), checked: a request asking for more
/// nodes than this node knows of is refused before anything is written.
impl FromRequestParts<AppState> for Concern {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let query = Query::<WriteParams>::from_request_parts(parts, state).await;
        let fence = if_fence(parts)?;
        Ok(Concern {
            fence,
            ..concern(state, query)?
        })
    }
}

fn concern(
    state: &AppState,
    query: Result<Query<WriteParams>, QueryRejection>,
) -> Result<Concern, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let replicas = match q.replicas.as_deref() {
        None => Replicas::Count(1),
        Some("majority") => Replicas::Majority,
        Some("all") => Replicas::All,
        Some(n) => match n.parse::<usize>() {
            Ok(n) if (1..=REPLICAS_MAX).contains(&n) => Replicas::Count(n),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!(
                        "replicas is majority, all, or a number between 1 and {REPLICAS_MAX}; got {n:?}"
                    ),
                ));
            }
        },
    };
    if let Replicas::Count(replicas) = replicas
        && replicas > 1
    {
        let nodes = state
            .inner
            .replicator
            .as_ref()
            .map_or(1, Replicator::members_known);
        if replicas > nodes {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "replicas_unreachable",
                format!(
                    "replicas={replicas} can never be met: at most {nodes} node{} can hold a write (this node and the members it knows: by gossip, configured, or linked to it since it started); ask for replicas={nodes} or fewer, or link more peers first",
                    if nodes == 1 { "" } else { "s" }
                ),
            ));
        }
    }
    if let Some(ttl) = q.ttl_ms
        && !(1..=asp_store::TTL_MS_MAX).contains(&ttl)
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "ttl_ms is between 1 and {} (ten years); got {ttl}",
                asp_store::TTL_MS_MAX
            ),
        ));
    }
    if let Some(lease) = &q.lease
        && (lease.is_empty()
            || lease.len() > asp_node::leases::LEASE_NAME_BYTES_MAX
            || lease.chars().any(char::is_control))
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "lease names a lease of the namespace: 1 to {} bytes without control characters",
                asp_node::leases::LEASE_NAME_BYTES_MAX
            ),
        ));
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
        fence: None,
        ttl_ms: q.ttl_ms,
        lease: q.lease,
    })
}

/// Answers a write once its concern is met: `body` is the write's JSON answer (an
/// object), `dots` its events, `seq` the feed position of its last one. Past the
/// timeout the answer is 504 `replication_timeout`, saying how many nodes hold it; the
/// write stays.
pub(super) async fn answer_write(
    state: &AppState,
    concern: Concern,
    written: (&Namespace, &[asp_core::Dot], u64),
    body: String,
    etag: Option<HeaderValue>,
) -> Response {
    let (ns, dots, seq) = written;
    let replicator = state.inner.replicator.as_ref();
    let (wanted, voters) = match replicator {
        Some(r) => r.resolve_replicas(ns, concern.replicas),
        None => (1, None),
    };
    let mut response = if wanted <= 1 {
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    } else {
        let replicator = replicator.expect("a node without replication wants one replica");
        let held = replicator
            .wait_holding(ns, dots, seq, wanted, voters.as_deref(), concern.timeout)
            .await;
        let replicas = format!(r#"{{"wanted":{wanted},"acknowledged":{held}}}"#);
        if held >= wanted {
            let mut body = body;
            body.truncate(body.len() - 1);
            body.push_str(&format!(r#","replicas":{replicas}}}"#));
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        } else {
            let message = format!(
                "the write is durable on this node but only {held} of {wanted} {} hold it after {} ms; it stays, and replication goes on",
                if voters.is_some() { "voters" } else { "nodes" },
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

/// Applies one operation on one key and answers like every single-key write (with
/// the new version as ETag when `with_etag`).
pub(super) async fn write_one(
    state: &AppState,
    concern: Concern,
    ns: Namespace,
    op: WriteOp,
    with_etag: bool,
) -> Result<Response, ApiError> {
    let mut op = op;
    let key = op.key.clone();
    let deleted = matches!(op.kind, WriteKind::Delete)
        || matches!(&op.kind, WriteKind::Crdt(CrdtOp::Write { value: None, .. }));
    let ttl_ms = match &mut op.kind {
        WriteKind::Put { ttl_ms, .. } => {
            *ttl_ms = concern.ttl_ms.unwrap_or(0);
            concern.ttl_ms
        }
        _ => {
            concern.refuse_ttl("this write")?;
            None
        }
    };
    // A put bound to a lease: only while the lease holds, on the leader.
    let bound = match &concern.lease {
        None => None,
        Some(name) => {
            let replicator = state.replicated()?;
            let token = replicator
                .leases()
                .held_token(&ns, name)
                .map_err(crate::leases_api::lease_error)?;
            Some((replicator, name.clone(), token))
        }
    };
    let applied = state
        .store()
        .write_fenced(ns.clone(), vec![op], concern.fence.clone())
        .await?[0];
    if let Some((replicator, name, token)) = bound {
        let version = asp_core::Version {
            hlc: applied.hlc,
            dot: applied.dot,
        };
        if let Err(e) = replicator
            .leases()
            .bind(state.store(), &ns, &name, token, &key, version)
            .await
        {
            // Unbound, it would outlive the lease: take the put back.
            let _ = asp_node::expire(state.store(), ns.clone(), key.clone(), version).await;
            return Err(crate::leases_api::lease_error(e));
        }
    }
    let mut body =
        serde_json::to_string(&WriteOut::new(ns.as_str(), key.as_str(), applied, deleted))
            .expect("answers serialize");
    if let Some(ttl) = ttl_ms {
        let expires = applied
            .hlc
            .physical_ms()
            .saturating_add(ttl)
            .min(asp_core::Hlc::PHYSICAL_MS_MAX);
        body.truncate(body.len() - 1);
        body.push_str(&format!(r#","expires_ms":{expires}}}"#));
    }
    let etag = with_etag.then(|| etag(applied.dot));
    Ok(answer_write(
        state,
        concern,
        (&ns, &[applied.dot], applied.seq),
        body,
        etag,
    )
    .await)
}
