//! API errors: `{"error": {"code": "snake_case", "message": "..."}}` with the matching
//! status. Every code is listed in the OpenAPI document.

use asp_store::{ReadError, WriteError};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_s: Option<u32>,
    /// More fields of the error object (`not_leader` names the leader).
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
            extra: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 409 `not_leader` (or `fenced`), naming the leader.
    pub fn not_leader(
        fenced: bool,
        epoch: u64,
        leader: asp_core::NodeId,
        leader_api: Option<String>,
        message: String,
    ) -> Self {
        let mut extra = serde_json::Map::new();
        extra.insert("leader".into(), leader.to_string().into());
        extra.insert("leader_api".into(), leader_api.into());
        extra.insert("epoch".into(), epoch.into());
        ApiError {
            extra: Some(extra),
            ..ApiError::new(
                StatusCode::CONFLICT,
                if fenced { "fenced" } else { "not_leader" },
                message,
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = serde_json::Map::new();
        error.insert("code".into(), self.code.into());
        error.insert("message".into(), self.message.into());
        for (k, v) in self.extra.unwrap_or_default() {
            error.insert(k, v);
        }
        let body = serde_json::json!({ "error": error });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match &e {
            WriteError::Invalid(m) => ApiError::bad_request("invalid_batch", m.clone()),
            WriteError::TooLarge(m) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                m.clone(),
            ),
            WriteError::ConditionFailed { .. } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                e.to_string(),
            ),
            WriteError::Overloaded { .. } => ApiError {
                retry_after_s: Some(1),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string())
            },
            WriteError::Closed => ApiError {
                retry_after_s: Some(5),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    e.to_string(),
                )
            },
            WriteError::PolicyFixed(m) => {
                ApiError::new(StatusCode::CONFLICT, "policy_fixed", m.clone())
            }
            WriteError::ContextAhead(m) => {
                ApiError::new(StatusCode::CONFLICT, "context_ahead", m.clone())
            }
            WriteError::WrongPolicy(m) => {
                ApiError::new(StatusCode::CONFLICT, "wrong_policy", m.clone())
            }
            WriteError::ClockSkew(m) | WriteError::InvalidEvent { message: m, .. } => {
                ApiError::bad_request("invalid_batch", m.clone())
            }
            WriteError::Storage(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_failed",
                format!("{e}; /healthz says why; restart the node once the disk is fixed"),
            ),
            WriteError::NotLeader {
                fenced,
                epoch,
                leader,
                leader_api,
                message,
            } => ApiError::not_leader(
                *fenced,
                *epoch,
                *leader,
                leader_api.clone(),
                message.clone(),
            ),
            WriteError::StaleFence { newest, message } => {
                let mut extra = serde_json::Map::new();
                extra.insert("newest_token".into(), (*newest).into());
                ApiError {
                    extra: Some(extra),
                    ..ApiError::new(StatusCode::CONFLICT, "stale_fence", message.clone())
                }
            }
            WriteError::NoSpace(m) => ApiError {
                retry_after_s: Some(10),
                ..ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "no_space", m.clone())
            },
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        tracing::error!(error = %e, "read failed");
        match e {
            ReadError::Invalid(m) => ApiError::bad_request("invalid_request", m),
            e @ ReadError::Failed(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_failed",
                e.to_string(),
            ),
            e => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_failed",
                e.to_string(),
            ),
        }
    }
}
