//! The OpenAPI document, generated from the handlers, and Swagger UI served
//! offline (vendored) at `/docs`.

use actix_web::{web, HttpResponse};
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::auth::accounts::Account;
use crate::auth::routes::{
    self as auth, AuthResponse, ChangePasswordRequest, LoginRequest, RefreshTokenRequest,
    RegisterRequest,
};
use crate::auth::Role;
use crate::http::ops;
use crate::http::problem::{FieldError, Problem, ShortLine};

#[derive(OpenApi)]
#[openapi(
    info(title = "commerce", description = "Event-sourced commerce backend built for flash sales. \
        Every error is an RFC 9457 problem (`application/problem+json`) with a stable `code`."),
    paths(
        ops::healthz, ops::readyz, ops::prometheus_metrics,
        auth::register, auth::login, auth::refresh, auth::logout,
        auth::change_password, auth::me,
    ),
    components(schemas(
        Problem, FieldError, ShortLine,
        Account, Role, AuthResponse, RegisterRequest, LoginRequest, RefreshTokenRequest,
        ChangePasswordRequest,
    )),
    modifiers(&BearerSecurity),
    tags(
        (name = "ops", description = "Health, readiness and metrics"),
        (name = "auth", description = "Accounts, sessions and tokens"),
    )
)]
pub struct ApiDoc;

struct BearerSecurity;

impl utoipa::Modify for BearerSecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new("access_token"))),
        );
    }
}

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .route(
            "/docs",
            web::get().to(|| async {
                HttpResponse::PermanentRedirect()
                    .insert_header(("location", "/docs/"))
                    .finish()
            }),
        )
        .service(SwaggerUi::new("/docs/{_:.*}").url("/api-docs/openapi.json", ApiDoc::openapi()));
}
