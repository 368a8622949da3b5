//! Cross-cutting request concerns: the request's tracing span, its id
//! header and HTTP metrics.

use std::rc::Rc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue, USER_AGENT};
use actix_web::middleware::Next;
use actix_web::HttpMessage;
use tracing::field::Empty;
use tracing::Span;
use tracing_actix_web::{DefaultRootSpanBuilder, RequestId, RootSpanBuilder};

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Echoes the request id that tracing-actix-web gave this request, so a
/// client can quote it and an operator can find the request's log lines.
pub async fn request_id_header(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let request_id = request.extensions().get::<RequestId>().copied();
    let mut response = next.call(request).await?;
    if let Some(value) = request_id.and_then(|id| HeaderValue::from_str(&id.to_string()).ok()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    Ok(response)
}

/// A request's route pattern, once found.
#[derive(Clone)]
struct RoutePattern(Option<Rc<str>>);

/// The pattern of the route the request will take, if any. Several
/// middlewares need it and each lookup walks the route table, so the first
/// answer is kept in the request's extensions for the others.
pub fn route_pattern(request: &ServiceRequest) -> Option<Rc<str>> {
    let known = request.extensions().get::<RoutePattern>().cloned();
    if let Some(RoutePattern(pattern)) = known {
        return pattern;
    }
    let pattern: Option<Rc<str>> = request.match_pattern().map(Rc::from);
    request
        .extensions_mut()
        .insert(RoutePattern(pattern.clone()));
    pattern
}

/// tracing-actix-web's root span, built from the route pattern that access
/// control, rate limits, idempotency and the metrics share
/// ([`route_pattern`]): the default span looked it up once more, and read
/// the connection's `Forwarded` headers, on every request, even with the
/// span turned off. It keeps the default span's fields that this service
/// has a use for (method, route, target, user agent, request id, status,
/// error) and names the socket peer as the client (`Forwarded` headers are
/// anyone's to write). It ends as the default span ends.
pub struct RequestSpan;

impl RootSpanBuilder for RequestSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let route = route_pattern(request);
        let request_id = request.extensions().get::<RequestId>().copied();
        tracing::info_span!(
            "HTTP request",
            http.method = %request.method(),
            http.route = route.as_deref().unwrap_or("default"),
            http.target = request.uri().path_and_query().map_or("", |p| p.as_str()),
            http.user_agent = request
                .headers()
                .get(USER_AGENT)
                .and_then(|agent| agent.to_str().ok())
                .unwrap_or(""),
            net.peer.ip = request.peer_addr().map(|peer| peer.ip().to_string()),
            request_id = request_id.map(tracing::field::display),
            http.status_code = Empty,
            otel.status_code = Empty,
            exception.message = Empty,
            exception.details = Empty,
        )
    }

    fn on_request_end<B: MessageBody>(
        span: Span,
        outcome: &Result<ServiceResponse<B>, actix_web::Error>,
    ) {
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}

/// Counts requests by route pattern and status, with latency histograms.
/// Patterns, not raw paths, keep the label set bounded.
pub async fn record_metrics(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let route = route_pattern(&request).map_or_else(|| "unmatched".to_owned(), |p| p.to_string());
    let method = request.method().to_string();
    let response = next.call(request).await;
    let status = match &response {
        Ok(response) => response.status().as_u16(),
        Err(error) => error.as_response_error().status_code().as_u16(),
    };
    let elapsed = started.elapsed().as_secs_f64();
    metrics::counter!("http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(elapsed);
    response
}

/// The request id as text, for event metadata (`correlation_id`).
pub fn request_id_of(request: &actix_web::HttpRequest) -> String {
    request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.to_string())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}
