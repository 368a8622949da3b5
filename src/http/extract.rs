//! Request extractors whose every failure is a problem response naming the
//! offending field: JSON bodies, query strings and path parameters.

use std::future::Future;
use std::pin::Pin;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::web::BytesMut;
use actix_web::{FromRequest, HttpRequest};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use super::problem::ApiError;

/// Bodies are limited to 256 KiB unless a route installs its own `BodyLimit`.
pub const DEFAULT_BODY_LIMIT: usize = 256 * 1024;

/// A per-route (or per-scope) body size limit, installed as app data.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

fn body_limit(request: &HttpRequest) -> usize {
    request
        .app_data::<BodyLimit>()
        .map_or(DEFAULT_BODY_LIMIT, |limit| limit.0)
}

/// A JSON body (`application/json` or any `+json` type).
pub struct Json<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for Json<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(request: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let checked = check_json_content_type(request).map(|()| body_limit(request));
        let declared_length = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<usize>().ok());
        let mut payload = payload.take();
        Box::pin(async move {
            let limit = checked?;
            if declared_length.is_some_and(|length| length > limit) {
                return Err(ApiError::PayloadTooLarge { limit_bytes: limit });
            }
            let mut body = BytesMut::new();
            while let Some(chunk) = payload.next().await {
                let chunk = chunk
                    .map_err(|e| ApiError::bad_request(format!("could not read body: {e}")))?;
                if body.len() + chunk.len() > limit {
                    return Err(ApiError::PayloadTooLarge { limit_bytes: limit });
                }
                body.extend_from_slice(&chunk);
            }
            parse_json(&body).map(Json)
        })
    }
}

fn check_json_content_type(request: &HttpRequest) -> Result<(), ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(ApiError::bad_field(
            "content-type",
            format!("expected application/json, got {:?}", content_type),
        ))
    }
}

/// Parses JSON, telling malformed documents (400) from wrong values (422).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if has_nul_escape(body) {
        return Err(ApiError::invalid_field("body", NO_NUL));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let field = field_name(error.path());
        let inner = error.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                ApiError::invalid_field(field, strip_position(&inner))
            }
            _ => ApiError::bad_request(format!("malformed JSON: {inner}")),
        }
    })?;
    deserializer
        .end()
        .map_err(|error| ApiError::bad_request(format!("malformed JSON: {error}")))?;
    Ok(value)
}

/// Postgres text cannot hold the NUL character, so a value carrying one
/// would fail deep inside (a 500, or a projection stuck on the event that
/// holds it) instead of being refused here.
const NO_NUL: &str = "text must not contain the NUL character (\\u0000)";

/// Whether a JSON text holds the escape `\u0000` (the only way JSON can
/// carry a NUL), not counting an escaped backslash followed by `u0000`.
fn has_nul_escape(json: &[u8]) -> bool {
    const ESCAPE: &[u8] = b"\\u0000";
    json.windows(ESCAPE.len()).enumerate().any(|(at, window)| {
        window == ESCAPE
            && json[..at]
                .iter()
                .rev()
                .take_while(|&&byte| byte == b'\\')
                .count()
                % 2
                == 0
    })
}

/// Refuses a URL whose path or query carries a NUL character (`%00`), for
/// the reason of [`NO_NUL`]. A middleware, since path parameters reach the
/// handlers through actix's own extractor.
pub async fn refuse_nul_in_url(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let url = request
        .uri()
        .path_and_query()
        .map_or("", |url| url.as_str());
    if url.contains("%00") {
        let refusal = ApiError::bad_request("the URL must not contain the NUL character (%00)");
        return Ok(request.error_response(refusal).map_into_right_body());
    }
    next.call(request)
        .await
        .map(ServiceResponse::map_into_left_body)
}

fn field_name(path: &serde_path_to_error::Path) -> String {
    let text = path.to_string();
    if text == "." {
        "body".to_owned()
    } else {
        text
    }
}

/// serde_json appends "at line 1 column 9" to data errors; the field name
/// says more to an API client.
fn strip_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(index) => text[..index].to_owned(),
        None => text,
    }
}

/// A query string; unknown or malformed values are a 400 naming the parameter.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned> FromRequest for Query<T> {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(parse_query(request.query_string()).map(Query))
    }
}

pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let deserializer = serde_urlencoded::Deserializer::new(url_pairs(query));
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let field = field_name(error.path());
        ApiError::bad_field(field, error.into_inner().to_string())
    })
}

fn url_pairs(query: &str) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(query.as_bytes())
}

/// How path-parameter failures (a malformed id, say) are reported.
pub fn path_config() -> actix_web::web::PathConfig {
    actix_web::web::PathConfig::default()
        .error_handler(|error, _| ApiError::bad_field("path", error.to_string()).into())
}
