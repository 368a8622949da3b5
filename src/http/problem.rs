//! The one API error type and its RFC 9457 `application/problem+json` form.
//!
//! Handlers return `ApiError`; each variant maps to one status and one stable
//! `code` here and nowhere else. Server errors keep their cause for the log and
//! show the client nothing about internals.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// One offending input field of a rejected request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A line of a checkout that could not be reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ShortLine {
    pub variant_id: uuid::Uuid,
    pub requested: u32,
    pub available: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `validation_failed`: the request could not be read at all
    /// (malformed JSON, wrong content type, unparsable path or query).
    #[error("{detail}")]
    BadRequest {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// 422 `validation_failed`: well-formed, but values break the rules.
    #[error("{detail}")]
    Validation {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// 401 `unauthorized`: not signed in, or the credentials are not valid.
    #[error("{0}")]
    Unauthorized(String),
    /// 403 `forbidden`: signed in, but the role does not allow it.
    #[error("this action needs a role you do not have")]
    Forbidden,
    /// 404 `not_found`.
    #[error("{0}")]
    NotFound(String),
    /// 405 `method_not_allowed`.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// 409 `conflict`.
    #[error("{0}")]
    Conflict(String),
    /// 409 `insufficient_stock`, with every line that fell short.
    #[error("not enough stock for {} line(s)", lines.len())]
    InsufficientStock { lines: Vec<ShortLine> },
    /// 422 `idempotency_key_reused`: the key was used with another request.
    #[error("this Idempotency-Key was already used for a different request")]
    IdempotencyKeyReused,
    /// 409 `idempotency_in_progress`: the first request with this key is still running.
    #[error("a request with this Idempotency-Key is still being processed")]
    IdempotencyInProgress,
    /// 402 `payment_not_verified`.
    #[error("{0}")]
    PaymentNotVerified(String),
    /// 413 `payload_too_large`.
    #[error("the request body is larger than {limit_bytes} bytes")]
    PayloadTooLarge { limit_bytes: usize },
    /// 429 `rate_limited`.
    #[error("too many requests; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// 503 `unavailable`: a dependency is down or the server is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// 500 `internal`: a bug or an unexpected failure; details go to the log only.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

#[derive(Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lines: Option<Vec<ShortLine>>,
}

impl ApiError {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::BadRequest {
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    pub fn bad_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        let error = FieldError::new(field, message);
        Self::BadRequest {
            detail: format!("{}: {}", error.field, error.message),
            errors: vec![error],
        }
    }

    pub fn invalid(errors: Vec<FieldError>) -> Self {
        let detail = match errors.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            _ => format!("{} fields are invalid", errors.len()),
        };
        Self::Validation { detail, errors }
    }

    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::invalid(vec![FieldError::new(field, message)])
    }

    pub fn not_found(what: &str) -> Self {
        Self::NotFound(format!("{what} not found"))
    }

    pub fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self::Internal(error.into())
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } | Self::Validation { .. } => "validation_failed",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Conflict(_) => "conflict",
            Self::InsufficientStock { .. } => "insufficient_stock",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::IdempotencyInProgress => "idempotency_in_progress",
            Self::PaymentNotVerified(_) => "payment_not_verified",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    fn problem(&self) -> Problem {
        let status = self.status_code();
        let detail = match self {
            Self::Internal(_) => "the server failed to handle this request".to_owned(),
            other => other.to_string(),
        };
        let (errors, lines) = match self {
            Self::BadRequest { errors, .. } | Self::Validation { errors, .. } => {
                (Some(errors.clone()), None)
            }
            Self::InsufficientStock { lines } => (None, Some(lines.clone())),
            _ => (None, None),
        };
        Problem {
            problem_type: format!("/problems/{}", self.code()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            code: self.code(),
            errors,
            lines,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Validation { .. } | Self::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) | Self::InsufficientStock { .. } | Self::IdempotencyInProgress => {
                StatusCode::CONFLICT
            }
            Self::PaymentNotVerified(_) => StatusCode::PAYMENT_REQUIRED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let Self::Internal(cause) = self {
            tracing::error!(error = ?cause, "request failed");
        }
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((header::CONTENT_TYPE, PROBLEM_CONTENT_TYPE));
        if let Self::RateLimited { retry_after_secs } = self {
            response.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
        }
        if let Self::Unauthorized(_) = self {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.json(self.problem())
    }
}

/// The error a status alone implies, for responses that reached us without a
/// problem body (actix's routing, its default extractors, payload limits).
fn error_for_status(status: StatusCode) -> ApiError {
    match status {
        StatusCode::UNAUTHORIZED => ApiError::Unauthorized("sign in first".into()),
        StatusCode::FORBIDDEN => ApiError::Forbidden,
        StatusCode::NOT_FOUND => ApiError::NotFound("no such resource".into()),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge {
            limit_bytes: 256 * 1024,
        },
        StatusCode::SERVICE_UNAVAILABLE => ApiError::Unavailable("try again shortly".into()),
        status if status.is_server_error() => {
            ApiError::Internal(anyhow::anyhow!("unhandled {status} response"))
        }
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::invalid(Vec::new()),
        _ => ApiError::bad_request("the request could not be understood"),
    }
}

/// Guarantees that every error leaving the server is a problem document,
/// whatever produced it.
pub async fn ensure_problem_body(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let response = next.call(request).await?;
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value == HeaderValue::from_static(PROBLEM_CONTENT_TYPE));
    if !status.is_client_error() && !status.is_server_error() || is_problem {
        return Ok(response.map_into_left_body());
    }
    let (request, original) = response.into_parts();
    let mut replacement = error_for_status(status).error_response();
    for (name, value) in original.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            replacement
                .headers_mut()
                .insert(name.clone(), value.clone());
        }
    }
    Ok(ServiceResponse::new(request, replacement).map_into_right_body())
}

/// Maps a unique-constraint violation to a client error at one place instead
/// of matching strings in handlers.
pub trait ResultExt<T> {
    fn on_constraint(
        self,
        constraint: &str,
        to_error: impl FnOnce() -> ApiError,
    ) -> Result<T, ApiError>;
}

impl<T> ResultExt<T> for Result<T, sqlx::Error> {
    fn on_constraint(
        self,
        constraint: &str,
        to_error: impl FnOnce() -> ApiError,
    ) -> Result<T, ApiError> {
        self.map_err(|error| match &error {
            sqlx::Error::Database(db) if db.constraint() == Some(constraint) => to_error(),
            _ => ApiError::internal(error),
        })
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        Self::internal(error)
    }
}

impl ApiError {
    /// A failed command as a problem: the aggregate's refusal through
    /// `rejected`, contention as 503 (retryable), store failures as 500.
    pub fn from_command<E>(
        error: crate::event_store::CommandError<E>,
        rejected: impl FnOnce(E) -> ApiError,
    ) -> Self {
        use crate::event_store::CommandError;
        match error {
            CommandError::Rejected(reason) => rejected(reason),
            CommandError::Contention => {
                Self::Unavailable("the item is in very high demand; try again".into())
            }
            CommandError::Store(cause) => Self::internal(anyhow::anyhow!(cause)),
        }
    }
}
