//! OpenAPI 3 generated from the handlers (utoipa), served at `/api-docs/openapi.json`, with
//! Swagger UI at `/docs`.

use actix_web::{HttpResponse, get};
use utoipa::{
    Modify, OpenApi,
    openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme},
};
use utoipa_swagger_ui::SwaggerUi;

use crate::http::{admin, dev, export, health, orders, shop};

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "user_jwt",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "stream_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "token",
                "A stream token from POST /api/v1/products/{id}/reservations/me/stream-token \
                 (60 s, this shopper and product only), for EventSource, which cannot send \
                 Authorization. Shoppers' JWTs are refused in the URL.",
            ))),
        );
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "service_token",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "One of SECKILL_SERVICE_TOKENS: the storefront's backend (reads orders, \
                         records payments; cannot create or preheat sales)",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "seckill", description = "Flash-sale reservation service. Errors are application/problem+json with a stable `code`."),
    paths(
        shop::product_view, shop::issue_token, shop::reserve, shop::my_reservation, shop::my_reservation_events, shop::issue_stream_token, dev::dev_token,
        orders::pay, orders::cancel, orders::record_payment, orders::get_order,
        admin::create_product, admin::get_product, admin::overview, admin::preheat, export::product_orders, admin::metrics,
        health::healthz, health::readyz,
    ),
    modifiers(&Security),
    tags(
        (name = "shoppers", description = "On SECKILL_HTTP_ADDR"),
        (name = "orders", description = "On SECKILL_HTTP_ADDR"),
        (name = "backend", description = "On SECKILL_HTTP_ADDR, for the storefront's backend (a service token)"),
        (name = "operators", description = "Only on SECKILL_ADMIN_ADDR"),
        (name = "service", description = "Health on both listeners; /metrics only on SECKILL_ADMIN_ADDR"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI document.
#[get("/api-docs/openapi.json")]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}

/// Swagger UI (assets vendored in the binary).
pub fn swagger() -> SwaggerUi {
    SwaggerUi::new("/docs/{_:.*}").config(utoipa_swagger_ui::Config::from("/api-docs/openapi.json"))
}
