//! [`ApiError`] and the one place that turns it, or any warp rejection, into
//! `{"error":{"code","message"}}` with the right status (SPEC §3).
//!
//! Client errors carry their text; internal errors are logged once here and
//! answered with a bare 500, so no detail of them reaches a client.

use std::convert::Infallible;

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Rejection, Reply};

use crate::auth::AuthError;
use crate::directory::DirectoryError;
use crate::log::LogError;
use crate::views::ViewError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(AuthError),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The resource exists already (a taken username).
    #[error("{0}")]
    Conflict(String),
    #[error("body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    /// Valid JSON that breaks the rules; the message names the field.
    #[error("{0}")]
    Unprocessable(String),
    #[error("this path is a WebSocket endpoint: send an Upgrade request")]
    UpgradeRequired,
    #[error("too many requests")]
    TooManyRequests { retry_after_s: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl warp::reject::Reject for ApiError {}

/// The one mapping of the log's errors: a message the log could not commit
/// is a 503 (nothing of it was published; retry), one it never will a 422.
impl From<LogError> for ApiError {
    fn from(error: LogError) -> Self {
        match error {
            LogError::Invalid(text) => ApiError::Unprocessable(text),
            LogError::Unavailable(_) | LogError::Closed => ApiError::Unavailable(
                "the message log is unavailable; nothing was published, retry later".into(),
            ),
        }
    }
}

/// The one mapping of the views' errors: a list that could not be read is
/// a 503 (the detail is logged, never shown).
impl From<ViewError> for ApiError {
    fn from(error: ViewError) -> Self {
        tracing::warn!(%error, "view read failed");
        ApiError::Unavailable("the view store is unavailable; retry later".into())
    }
}

/// The one mapping of the directory's errors (accounts and API keys): a
/// directory that cannot answer now (Redis down, the store busy) is a 503,
/// never a 500 or a 401 that would tell a valid credential it is wrong.
impl From<DirectoryError> for ApiError {
    fn from(error: DirectoryError) -> Self {
        match error {
            DirectoryError::Conflict(text) => ApiError::Conflict(text),
            DirectoryError::Invalid(text) => ApiError::Unprocessable(text),
            DirectoryError::Unavailable(_) => ApiError::Unavailable(
                "accounts and api keys are unavailable right now; retry later".into(),
            ),
            DirectoryError::Internal(text) => ApiError::Internal(text),
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Unprocessable(_) => "validation_failed",
            ApiError::UpgradeRequired => "upgrade_required",
            ApiError::TooManyRequests { .. } => "rate_limited",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn into_response(self) -> Response {
        let message = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                "internal server error".to_owned()
            }
            other => other.to_string(),
        };
        let body = json!({"error": {"code": self.code(), "message": message}});
        let mut response =
            warp::reply::with_status(warp::reply::json(&body), self.status()).into_response();
        if let ApiError::TooManyRequests { retry_after_s } = self {
            response.headers_mut().insert(
                warp::http::header::RETRY_AFTER,
                warp::http::HeaderValue::from(retry_after_s.max(1)),
            );
        }
        response
    }
}

impl ApiError {
    /// A store failure as the client sees it: 409 for a taken value, 422 for a
    /// broken rule, 503 when the store is busy or closing, else a bare 500.
    pub fn from_store(error: crate::store::StoreError) -> ApiError {
        use crate::store::StoreError;
        match error {
            StoreError::Conflict(message) => ApiError::Conflict(message),
            StoreError::Invalid(message) => ApiError::Unprocessable(message),
            StoreError::Busy(_) | StoreError::Closed => {
                ApiError::Unavailable("the store is busy, try again".to_owned())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        ApiError::into_response(self)
    }
}

/// The `recover` of the whole route tree: every rejection becomes the JSON error.
pub async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    Ok(from_rejection(&rejection).into_response())
}

fn from_rejection(rejection: &Rejection) -> ApiError {
    use warp::reject;
    if let Some(error) = rejection.find::<ApiError>() {
        return error.clone();
    }
    if let Some(e) = rejection.find::<reject::InvalidQuery>() {
        return ApiError::BadRequest(format!("invalid query string: {e}"));
    }
    if let Some(e) = rejection.find::<reject::MissingHeader>() {
        return ApiError::BadRequest(e.to_string());
    }
    if let Some(e) = rejection.find::<reject::InvalidHeader>() {
        return ApiError::BadRequest(e.to_string());
    }
    if rejection.find::<reject::LengthRequired>().is_some() {
        return ApiError::BadRequest("a Content-Length header is required".to_owned());
    }
    if rejection.find::<reject::PayloadTooLarge>().is_some() {
        return ApiError::BadRequest("body is too large".to_owned());
    }
    if rejection.find::<reject::UnsupportedMediaType>().is_some() {
        return ApiError::UnsupportedMediaType;
    }
    // Last: these lose to any more specific reason another route gave.
    if rejection.find::<reject::MethodNotAllowed>().is_some() {
        return ApiError::MethodNotAllowed;
    }
    if rejection.is_not_found() {
        return ApiError::NotFound;
    }
    ApiError::Internal(format!("unhandled rejection: {rejection:?}"))
}
