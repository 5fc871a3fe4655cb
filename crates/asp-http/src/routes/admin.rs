//! Node-wide routes: health, metrics, status, the OpenAPI document and the admin
//! operations (compaction, scrub, quarantine).

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{AppState, namespace, path_error};
use crate::error::ApiError;
use crate::held_api;
use crate::json::HlcOut;

pub(super) async fn healthz(State(state): State<AppState>) -> Response {
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

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
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
pub(super) async fn compact(State(state): State<AppState>) -> Result<Response, ApiError> {
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
        "crdt_keys_pruned": report.crdt_keys_pruned,
        "epitaphs_left": report.epitaphs_left,
        "epitaphs_dropped": report.epitaphs_dropped,
        "log_bytes_before": report.log_bytes_before,
        "log_bytes_after": report.log_bytes_after,
        "duration_ms": report.duration.as_millis() as u64,
    }))
    .into_response())
}

pub(super) async fn quarantine_retry(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    held_api::resolve_quarantine(state.store(), ns, asp_store::QuarantineAction::Retry).await
}

pub(super) async fn quarantine_discard(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    held_api::resolve_quarantine(state.store(), ns, asp_store::QuarantineAction::Discard).await
}

pub(super) async fn status(State(state): State<AppState>) -> Response {
    Json(status_value(&state).await).into_response()
}

/// What `GET /v1/status` answers (also a part of `GET /v1/cluster`).
pub(crate) async fn status_value(state: &AppState) -> serde_json::Value {
    let store = state.store();
    // Like a read, status reflects every acknowledged write (after a storage failure,
    // the last indexed state is still a true, if old, answer).
    let _ = store.caught_up().await;
    let s = store.status();
    let gc = store.tombstone_gc();
    let replicator = state.replicator();
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
                "policy": store.policy(ns).to_string(),
                "mode": replicator.map(|r| r.modes().view(ns)),
                "residency": replicator.and_then(|r| r.residency().rule(ns)),
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
    let replication = replicator.map(|r| replication_status(&r.status()));
    let wall = asp_store::clock::wall_ms();
    let convergence: Vec<serde_json::Value> = store
        .metrics()
        .convergence
        .snapshot(wall)
        .iter()
        .map(|d| {
            serde_json::json!({
                "origin": d.origin.to_string(),
                "events": d.events,
                "p50_ms": d.p50_ms,
                "p99_ms": d.p99_ms,
                "max_ms": d.max_ms,
                "last_ms_ago": wall.saturating_sub(d.last_ms),
            })
        })
        .collect();
    serde_json::json!({
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
        "operations": store.operations().iter().map(|o| serde_json::json!({
            "kind": o.kind,
            "started_unix_ms": o.started_unix_ms,
            "done": o.done,
            "total": o.total,
            "unit": o.unit,
        })).collect::<Vec<_>>(),
        "no_space": s.no_space,
        "namespaces": namespaces,
        "own_events_found": store.own_events_found().iter().map(|f| serde_json::json!({
            "namespace": f.namespace.as_str(),
            "known_counter": f.known,
            "held_by_peers_counter": f.held_by_peers,
            "at_ms": f.at_ms,
        })).collect::<Vec<_>>(),
        "held": held_api::status_json(&store.held(), wall),
        "convergence": {
            "window_ms": asp_store::convergence::SLOT_MS * asp_store::convergence::WINDOW_SLOTS as u64,
            "origins": convergence,
        },
        "replication": replication,
        "connectors": state.connectors().map(|c| c.status()).unwrap_or_else(|| serde_json::json!([])),
        "transport": state.transport(),
        "failure": s.failure,
    })
}

/// `GET /v1/connectors`: every connector of this node, its configuration (no
/// secrets) and, per side, its state, position, lag, last error and counters.
pub(super) async fn connectors(State(state): State<AppState>) -> Response {
    let list = state
        .connectors()
        .map(|c| c.status())
        .unwrap_or_else(|| serde_json::json!([]));
    Json(serde_json::json!({ "connectors": list })).into_response()
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
pub(super) async fn scrub(State(state): State<AppState>) -> Result<Response, ApiError> {
    let report = state.store().scrub_async().await?;
    Ok(Json(scrub_json(&report)).into_response())
}

/// What a certificate attests, for status.
fn certificate_json(id: &asp_tls::Identity) -> serde_json::Value {
    serde_json::json!({
        "name": id.name,
        "labels": id.labels,
        "serial": id.serial,
        "not_after_ms": id.not_after.saturating_mul(1000),
    })
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
                "certificate": p.certificate.as_ref().map(certificate_json),
                "federation": p.federated.as_ref().map(|f| serde_json::json!({
                    "cluster": f.partner_cluster,
                    "shares": f.shares,
                    "sends": f.send,
                    "receives": f.receive,
                })),
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
                    "receiving": p.reconcile.receiving.map(|(keys, since)| serde_json::json!({
                        "keys": keys,
                        "running_ms": since.elapsed().as_millis() as u64,
                    })),
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
        "tls": r.certificate.as_ref().map(certificate_json),
        "members": r.members.iter().map(|m| serde_json::json!({
            "node_id": m.entry.node.to_string(),
            "name": m.entry.name,
            "api": (!m.entry.api.is_empty()).then_some(&m.entry.api),
            "peer": (!m.entry.peer.is_empty()).then_some(&m.entry.peer),
            "state": m.health.name(),
            "silent_ms": m.silent_for.as_millis() as u64,
            "this_node": m.this_node,
            "incarnation": format!("{:016x}", m.entry.incarnation),
        })).collect::<Vec<_>>(),
    })
}

pub(super) async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::DOCUMENT,
    )
        .into_response()
}

/// Revokes a token (and every token narrowed from it) cluster-wide: the revocation is a
/// write to `_asp.auth`, which replicates like any other; each node refuses the token
/// as soon as it holds it.
pub(super) async fn revoke_token(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let parsed: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("send {{\"id\": \"<token id>\"}}: {e}"),
        )
    })?;
    let Some(id) = parsed.get("id").and_then(|v| v.as_str()) else {
        return Err(ApiError::bad_request(
            "invalid_body",
            "send {\"id\": \"<token id>\"} (asp token create prints the id; asp token show TOKEN too)",
        ));
    };
    if !asp_auth::is_token_id(id) {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("{id:?} is not a token id (32 lowercase hex digits)"),
        ));
    }
    let store = state.store();
    let record = serde_json::json!({
        "revoked_ms": asp_store::clock::wall_ms(),
        "by": store.node_id().to_string(),
    });
    let ns = asp_core::Namespace::new(asp_auth::AUTH_NAMESPACE).expect("a valid name");
    let key = asp_core::Key::new(&asp_auth::revoked_key(id)).expect("a valid key");
    let applied = store
        .write(
            ns,
            vec![asp_store::WriteOp::put(
                key,
                asp_core::ContentType::Json,
                serde_json::to_vec(&record).expect("json"),
            )],
        )
        .await?;
    if let Some(r) = state.replicator() {
        r.audit()
            .record("token_revoked", None, serde_json::json!({ "id": id }));
    }
    Ok(Json(serde_json::json!({
        "id": id,
        "revoked": true,
        "seq": applied.first().map_or(0, |a| a.seq),
    }))
    .into_response())
}

pub(super) async fn get_residency(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    Ok(crate::residency_api::view(&state, &ns))
}

/// Pins a namespace to labels (`{"require": {...}}`; `{}` unpins), cluster-wide.
pub(super) async fn put_residency(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(path_error)?;
    let ns = namespace(&ns)?;
    if ns.as_str().starts_with(asp_auth::RESERVED_PREFIX) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the node's own namespaces (_asp.) go to every node",
        ));
    }
    if body.len() > 4096 {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "a residency rule is at most 4 KiB",
        ));
    }
    let require = crate::residency_api::parse(&body)?;
    let replicator = state.replicated()?;
    replicator
        .residency()
        .set(state.store(), &ns, &require)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_failed", e))?;
    replicator.audit().record(
        "residency_set",
        None,
        serde_json::json!({ "namespace": ns.as_str(), "require": require }),
    );
    Ok(crate::residency_api::view(&state, &ns))
}
