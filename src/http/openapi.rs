//! The OpenAPI document, generated from the handlers, and Swagger UI served
//! offline (vendored) at `/docs`.

use actix_web::{web, HttpResponse};
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::audit;
use crate::auth::accounts::Account;
use crate::auth::routes::{
    self as auth, AuthResponse, ChangePasswordRequest, LoginRequest, RefreshTokenRequest,
    RegisterRequest,
};
use crate::auth::Role;
use crate::catalog::categories::{self, CreateCategoryRequest, UpdateCategoryRequest};
use crate::catalog::products::{
    self, CreateProductRequest, NewVariantRequest, ProductListing, UpdateProductRequest,
    VariantUpdateRequest,
};
use crate::catalog::stock::{
    self, AddStockRequest, Correction, StockLevel, SyncReport, SyncReservedRequest,
    UpdateStockRequest,
};
use crate::http::ops;
use crate::http::paging::PageMeta;
use crate::http::problem::{FieldError, Problem, ShortLine};
use crate::sales;
use crate::shop::{cart, checkout, orders, payment};

#[derive(OpenApi)]
#[openapi(
    info(title = "commerce", description = "Event-sourced commerce backend built for flash sales. \
        Every error is an RFC 9457 problem (`application/problem+json`) with a stable `code`."),
    paths(
        ops::healthz, ops::readyz, ops::prometheus_metrics,
        auth::register, auth::login, auth::refresh, auth::logout,
        auth::change_password, auth::me,
        products::get_products, products::get_product, products::create_product,
        products::update_product, products::delete_product,
        categories::category_tree, categories::category_by_slug, categories::create_category,
        categories::update_category,
        stock::add_stock, stock::update_stock, stock::sync_reserved_stock, stock::get_stock_level,
        cart::add_to_cart, cart::get_cart, cart::update_cart_item, cart::remove_cart_item,
        cart::clear_cart,
        checkout::checkout, payment::create_payment_intent, payment::confirm_payment,
        payment::stripe_webhook, payment::fake_payment,
        orders::my_orders, orders::my_order,
        audit::audit_events, audit::inventory_at, audit::order_history,
        sales::sales_summary, sales::sales_timeseries, sales::sales_top_products,
    ),
    components(schemas(
        Problem, FieldError, ShortLine,
        Account, Role, AuthResponse, RegisterRequest, LoginRequest, RefreshTokenRequest,
        ChangePasswordRequest,
        CreateProductRequest, NewVariantRequest, UpdateProductRequest, VariantUpdateRequest,
        ProductListing, PageMeta, projections::catalog_queries::ListingItem,
        projections::catalog_queries::ProductDetail, projections::catalog_queries::VariantDetail,
        projections::catalog_queries::PublicStock, projections::catalog_queries::CategoryRef,
        projections::catalog_queries::CategoryNode, projections::catalog_queries::CategoryPage,
        CreateCategoryRequest, UpdateCategoryRequest,
        AddStockRequest, UpdateStockRequest, SyncReservedRequest, StockLevel, SyncReport, Correction,
        cart::AddToCart, cart::SetQuantity, cart::CartView, cart::CartItem,
        orders::OrderView, orders::OrderItem, orders::OrderListing,
        payment::PaymentIntentRequest, payment::PaymentIntentResponse, payment::ConfirmPaymentRequest,
        payment::FakePaymentRequest, payment::FakePaymentResponse,
        audit::AuditEvent, audit::EventsPage, audit::InventoryAtTime, audit::OrderState,
        audit::OrderHistory,
        sales::SalesSummary, sales::SalesTimeseries, sales::SalesPoint, sales::Interval,
        sales::TopProducts, sales::TopProduct,
    )),
    modifiers(&BearerSecurity),
    tags(
        (name = "ops", description = "Health, readiness and metrics"),
        (name = "auth", description = "Accounts, sessions and tokens"),
        (name = "catalog", description = "Products: listing, search, detail and admin writes"),
        (name = "categories", description = "The category tree"),
        (name = "stock", description = "Stock levels per variant"),
        (name = "cart", description = "The signed-in customer's cart"),
        (name = "checkout", description = "Orders that hold stock, payment intents and confirmation \
            (each needs an `Idempotency-Key`)"),
        (name = "webhooks", description = "Payment provider events"),
        (name = "fake payments", description = "Paying offline with PAYMENT_PROVIDER=fake"),
        (name = "orders", description = "The signed-in customer's orders"),
        (name = "audit", description = "The event log and what it proves (admin)"),
        (name = "sales", description = "What sold and when, by hour, day and product, in the shop's currency (admin)"),
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
