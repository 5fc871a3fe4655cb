//! Shares with other clusters (federation): install an accepted share, list them,
//! revoke one. All need `admin`; the shares themselves replicate in `_asp.shares`.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use asp_node::federation::{Installed, ShareError};

use crate::error::ApiError;
use crate::routes::{AppState, path_error};

fn share_error(e: ShareError) -> ApiError {
    match e {
        ShareError::Invalid(m) => ApiError::bad_request("invalid_share", m),
        ShareError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        ShareError::Store(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_failed", m),
    }
}

fn view(i: &Installed, sent: std::collections::BTreeMap<String, u64>) -> serde_json::Value {
    let terms = &i.share.terms;
    let now = asp_store::clock::wall_ms();
    serde_json::json!({
        "id": i.id(),
        "state": i.state(now),
        "role": if i.side.offering { "offered" } else { "accepted" },
        "partner_cluster": i.side.partner_cluster,
        "namespaces": terms.namespaces,
        "ops": terms.ops,
        "sends": i.side.sends(&i.share),
        "receives": i.side.receives(&i.share),
        "require": terms.require,
        "expires_ms": terms.expires_ms,
        "revoked_ms": i.revoked.as_ref().map(|r| r.0),
        "sent_bytes": sent,
    })
}

pub(crate) async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let r = state.replicated()?;
    let f = r.federation();
    let shares: Vec<_> = f.list().iter().map(|i| view(i, f.sent(i.id()))).collect();
    Ok(Json(serde_json::json!({ "cluster": r.cluster_id(), "shares": shares })).into_response())
}

/// Installs an accepted share (the document `asp share accept` wrote) for the cluster.
pub(crate) async fn install(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let r = state.replicated()?;
    if body.len() > asp_tls::share::SHARE_BYTES_MAX {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "a share document is at most {} bytes",
                asp_tls::share::SHARE_BYTES_MAX
            ),
        ));
    }
    let f = r.federation();
    let checked = f
        .check(&body, r.cluster_id(), asp_store::clock::wall_ms())
        .map_err(share_error)?;
    let new = f
        .install(state.store(), &checked)
        .await
        .map_err(share_error)?;
    if new {
        r.audit().record(
            "share_installed",
            None,
            serde_json::json!({
                "id": checked.id(),
                "partner_cluster": checked.side.partner_cluster,
                "role": if checked.side.offering { "offered" } else { "accepted" },
                "namespaces": checked.share.terms.namespaces,
                "ops": checked.share.terms.ops,
                "expires_ms": checked.share.terms.expires_ms,
            }),
        );
    }
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view(&checked, f.sent(checked.id())))).into_response())
}

/// Revokes a share for the whole cluster: links under it close at once. The answer
/// says what the other cluster keeps: everything it received before.
pub(crate) async fn revoke(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = path.map_err(path_error)?;
    let r = state.replicated()?;
    let f = r.federation();
    let revoked = f.revoke(state.store(), &id).await.map_err(share_error)?;
    let sent = f.sent(&id);
    r.audit().record(
        "share_revoked",
        None,
        serde_json::json!({
            "id": id,
            "partner_cluster": revoked.side.partner_cluster,
            "sent_bytes_this_node": sent,
        }),
    );
    let keeps = if revoked.side.sends(&revoked.share) {
        format!(
            "cluster {} keeps what it received before now of {}: asp cannot take back data already sent; nothing more goes to it, and nothing more is taken from it",
            revoked.side.partner_cluster,
            revoked
                .share
                .terms
                .namespaces
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        format!(
            "this share sent nothing to cluster {}; nothing more is taken from it, and what it sent stays here",
            revoked.side.partner_cluster
        )
    };
    let mut out = view(&revoked, sent);
    out["partner_keeps"] = keeps.into();
    Ok(Json(out).into_response())
}
