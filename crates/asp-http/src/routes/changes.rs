//! `GET /v1/ns/{ns}/changes`: the change feed, in pages or as a live stream (SSE).

use std::convert::Infallible;
use std::time::Duration;

use asp_core::Namespace;
use asp_store::{FeedEvent, FeedReader};
use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::{AppState, header_str, namespace, path_error, query_error};
use crate::error::ApiError;
use crate::json::{ChangeOut, ChangesOut};

/// Default page size of the change feed.
const CHANGES_LIMIT_DEFAULT: usize = 100;
/// Events read from the log at a time for a live stream.
const SSE_READ_EVENTS: usize = 512;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ChangesParams {
    since: Option<u64>,
    limit: Option<usize>,
    values: Option<bool>,
}

pub(super) async fn changes(
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
