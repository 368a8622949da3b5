//! Cross-cutting request concerns: the request's tracing span, its id
//! header and HTTP metrics.

use std::cell::RefCell;
use std::collections::HashSet;
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

/// The paths of one app's static routes (a pattern without parameters),
/// learnt from the route table's answers: a request to one of them needs
/// no walk of the table. The walk tries the routes in order, running a
/// regular expression for each one with parameters, and every route before
/// the one that matches. Only a path that is its own pattern is kept, so
/// the set cannot grow past the number of static routes, whatever paths
/// clients send. One per app, and so per HTTP worker thread: the table
/// never changes once the app is built.
#[derive(Default)]
pub struct StaticRoutes(RefCell<HashSet<Rc<str>>>);

/// The pattern of the route the request will take, if any. Several
/// middlewares need it and each lookup walks the route table, so the first
/// answer is kept in the request's extensions for the others, and a static
/// route's in the app's [`StaticRoutes`] for later requests.
pub fn route_pattern(request: &ServiceRequest) -> Option<Rc<str>> {
    let known = request.extensions().get::<RoutePattern>().cloned();
    if let Some(RoutePattern(pattern)) = known {
        return pattern;
    }
    let static_routes = request.app_data::<StaticRoutes>();
    let remembered =
        static_routes.and_then(|routes| routes.0.borrow().get(request.path()).cloned());
    let pattern = match remembered {
        Some(pattern) => Some(pattern),
        None => {
            let pattern: Option<Rc<str>> = request.match_pattern().map(Rc::from);
            if let (Some(routes), Some(pattern)) = (static_routes, &pattern) {
                if **pattern == *request.path() {
                    routes.0.borrow_mut().insert(pattern.clone());
                }
            }
            pattern
        }
    };
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

    /// Records the outcome on the span, and logs a failure: a server error
    /// at `error`, a refusal (4xx) only at `debug`. A refusal is the
    /// client's business, and a sale refuses by the thousand (`409
    /// insufficient_stock` for each buyer after the sell-out), which
    /// tracing-actix-web's own event logged as a warning each.
    fn on_request_end<B: MessageBody>(
        span: Span,
        outcome: &Result<ServiceResponse<B>, actix_web::Error>,
    ) {
        DefaultRootSpanBuilder::on_request_end(span, outcome);
        let failure = match outcome {
            Ok(response) => response
                .response()
                .error()
                .map(|error| (error.as_response_error(), response.status())),
            Err(error) => {
                let error = error.as_response_error();
                Some((error, error.status_code()))
            }
        };
        match failure {
            Some((error, status)) if status.is_server_error() => {
                tracing::error!(status = status.as_u16(), "request failed: {error:?}");
            }
            Some((error, status)) => {
                tracing::debug!(status = status.as_u16(), "request refused: {error:?}");
            }
            None => {}
        }
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

#[cfg(test)]
mod tests {
    use actix_web::http::StatusCode;
    use actix_web::middleware::from_fn;
    use actix_web::{test, web, App, HttpResponse};

    use super::*;

    /// Answers with the pattern `route_pattern` found, in a header; for
    /// `/remembered`, followed by the static routes the app has learnt.
    async fn show_pattern(
        request: ServiceRequest,
        next: Next<impl MessageBody>,
    ) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
        let mut pattern =
            route_pattern(&request).map_or_else(|| "none".to_owned(), |p| p.to_string());
        if request.path() == "/remembered" {
            let routes = request
                .app_data::<StaticRoutes>()
                .expect("the app has a set");
            let mut remembered: Vec<String> =
                routes.0.borrow().iter().map(|p| p.to_string()).collect();
            remembered.sort();
            pattern = format!("{pattern} {}", remembered.join(" "));
        }
        let mut response = next.call(request).await?;
        let value = HeaderValue::from_str(&pattern).expect("patterns are header-safe");
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-pattern"), value);
        Ok(response)
    }

    #[actix_web::test]
    async fn static_routes_are_remembered_and_nothing_else() {
        let app = test::init_service(
            App::new()
                .app_data(StaticRoutes::default())
                .wrap(from_fn(show_pattern))
                // A parameter route first: it must still win for the paths
                // it matches, and a static path must not be taken for it.
                .route("/items/{id}", web::get().to(HttpResponse::Ok))
                .route("/items/new", web::get().to(HttpResponse::Ok))
                .route("/healthz", web::get().to(HttpResponse::Ok))
                .default_service(web::to(HttpResponse::NotFound)),
        )
        .await;
        let pattern_of = |path: &'static str| {
            let app = &app;
            async move {
                let response =
                    test::call_service(app, test::TestRequest::get().uri(path).to_request()).await;
                let status = response.status();
                let pattern = response
                    .headers()
                    .get("x-pattern")
                    .and_then(|value| value.to_str().ok())
                    .expect("every answer names its pattern")
                    .to_owned();
                (status, pattern)
            }
        };
        for _ in 0..2 {
            assert_eq!(
                pattern_of("/healthz").await,
                (StatusCode::OK, "/healthz".into())
            );
            assert_eq!(
                pattern_of("/items/7").await,
                (StatusCode::OK, "/items/{id}".into())
            );
            assert_eq!(
                pattern_of("/items/new").await,
                (StatusCode::OK, "/items/{id}".into())
            );
            assert_eq!(
                pattern_of("/nowhere").await,
                (StatusCode::NOT_FOUND, "none".into())
            );
        }
        let (_, remembered) = pattern_of("/remembered").await;
        assert_eq!(remembered, "none /healthz");
    }

    /// What ending a request with `response` logs, at `level` and above.
    fn logged_at(level: tracing::Level, response: HttpResponse) -> String {
        #[derive(Clone, Default)]
        struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let request = test::TestRequest::default().to_http_request();
        let outcome = Ok(ServiceResponse::new(request, response));
        tracing::subscriber::with_default(subscriber, || {
            RequestSpan::on_request_end(Span::none(), &outcome);
        });
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[actix_web::test]
    async fn refusals_are_logged_at_debug_and_server_errors_at_error() {
        use crate::http::problem::ApiError;
        use tracing::Level;

        let refused = || HttpResponse::from_error(ApiError::not_found("variant"));
        assert_eq!(logged_at(Level::INFO, refused()), "");
        let at_debug = logged_at(Level::DEBUG, refused());
        assert!(at_debug.contains("DEBUG"), "{at_debug}");
        assert!(at_debug.contains("request refused"), "{at_debug}");
        assert!(at_debug.contains("status=404"), "{at_debug}");

        let failed = HttpResponse::from_error(ApiError::internal(anyhow::anyhow!("disk on fire")));
        let at_error = logged_at(Level::ERROR, failed);
        assert!(at_error.contains("ERROR"), "{at_error}");
        assert!(at_error.contains("request failed"), "{at_error}");
        assert!(at_error.contains("status=500"), "{at_error}");

        assert_eq!(logged_at(Level::TRACE, HttpResponse::Ok().finish()), "");
    }
}
