//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the matching status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for 429/503 answers.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    /// 400 naming `field`: "invalid `field`: msg".
    pub fn invalid(field: &str, msg: impl std::fmt::Display) -> Self {
        Self::bad_request(Some(field), format!("invalid `{field}`: {msg}"))
    }

    /// 400: the request is wrong; `param` names the field.
    pub fn bad_request(param: Option<&str>, message: impl Into<String>) -> Self {
        Self { param: param.map(str::to_string), ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message) }
    }

    pub fn model_not_found(model: &str, served: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{model}` does not exist; this server serves `{served}`"),
            )
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    pub fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "Incorrect or missing API key: send the key given to `infer serve --api-key` as `Authorization: Bearer KEY` (or `x-api-key: KEY`)",
            )
        }
    }

    pub fn too_many_requests(message: impl Into<String>) -> Self {
        Self { code: Some("rate_limit_exceeded"), retry_after: Some(1), ..Self::new(StatusCode::TOO_MANY_REQUESTS, "requests", message) }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { retry_after: Some(1), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message) }
    }

    /// A status of the caller's choosing (415, 403, ...).
    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, "invalid_request_error", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<infer_core::Error> for ApiError {
    fn from(e: infer_core::Error) -> Self {
        use infer_core::Error as E;
        match &e {
            E::InvalidParameter { name, msg } => Self::bad_request(Some(name), format!("invalid `{name}`: {msg}")),
            E::ContextOverflow { .. } => Self::bad_request(None, e.to_string()).with_code("context_length_exceeded"),
            E::Tokenizer(_) | E::Template(_) | E::Constraint(_) => Self::bad_request(None, e.to_string()),
            E::CacheFull { .. } => Self::unavailable(e.to_string()),
            _ => Self::internal(e.to_string()),
        }
    }
}
