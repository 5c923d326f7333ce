//! OpenAPI 3 generated from the handlers (utoipa), served at `/api-docs/openapi.json`, with
//! Swagger UI at `/docs`.

use actix_web::{HttpResponse, get, web};
use utoipa::{
    Modify, OpenApi,
    openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme},
};
use utoipa_swagger_ui::SwaggerUi;

use crate::http::{admin, dev, export, health, orders, room, shop};

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
        shop::product_view, shop::product_list, shop::issue_token, shop::reserve, shop::my_reservation, shop::my_reservation_events, shop::issue_stream_token, room::room_challenge, room::join_room, room::my_room, room::my_room_events, dev::dev_token,
        orders::pay, orders::cancel, orders::record_payment, orders::get_order,
        admin::create_product, admin::get_product, admin::overview, admin::preheat, export::product_orders, admin::metrics,
        health::healthz, health::readyz,
    ),
    modifiers(&Security, &Links),
    tags(
        (name = "shoppers", description = "On SECKILL_HTTP_ADDR"),
        (name = "orders", description = "On SECKILL_HTTP_ADDR"),
        (name = "backend", description = "On SECKILL_HTTP_ADDR, for the storefront's backend (a service token)"),
        (name = "operators", description = "Only on SECKILL_ADMIN_ADDR"),
        (name = "service", description = "Health on both listeners; /metrics only on SECKILL_ADMIN_ADDR"),
    )
)]
pub struct ApiDoc;

/// Which of the document's operations a listener serves: those tagged with one of `tags`,
/// except the paths in `skip`.
#[derive(Debug, Clone, Copy)]
pub struct Routes {
    pub tags: &'static [&'static str],
    pub skip: &'static [&'static str],
}

/// The shoppers' listener (`SECKILL_HTTP_ADDR`).
pub const SHOPPERS: Routes = Routes {
    tags: &["shoppers", "orders", "backend", "service"],
    skip: &["/metrics"],
};
/// The operators' listener (`SECKILL_ADMIN_ADDR`).
pub const OPERATORS: Routes = Routes {
    tags: &["operators", "service"],
    skip: &[],
};
/// A worker's own listener (`SECKILL_WORKER_ADDR`).
pub const WORKER: Routes = Routes {
    tags: &["service"],
    skip: &[],
};

/// The OpenAPI document of one listener: only the operations it serves (a client, or a fuzzer,
/// reading it finds no route that answers `404` there), and only the tags those use.
pub fn listener_doc(routes: Routes) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    let serves = |op: &Option<utoipa::openapi::path::Operation>| {
        op.as_ref().is_some_and(|op| {
            op.tags
                .iter()
                .flatten()
                .any(|t| routes.tags.contains(&t.as_str()))
        })
    };
    doc.paths.paths.retain(|path, item| {
        if routes.skip.contains(&path.as_str()) {
            return false;
        }
        for op in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
            &mut item.head,
            &mut item.options,
            &mut item.trace,
        ] {
            if !serves(op) {
                *op = None;
            }
        }
        [&item.get, &item.post, &item.put, &item.patch, &item.delete]
            .into_iter()
            .any(Option::is_some)
    });
    if let Some(tags) = doc.tags.as_mut() {
        tags.retain(|t| routes.tags.contains(&t.name.as_str()));
    }
    doc
}

/// A listener's OpenAPI document, rendered once.
pub struct ListenerDoc(pub String);

impl ListenerDoc {
    pub fn new(routes: Routes) -> Self {
        Self(serde_json::to_string(&listener_doc(routes)).unwrap_or_default())
    }
}

/// This listener's OpenAPI document (the whole one where none was given: the handler bench).
#[get("/api-docs/openapi.json")]
pub async fn openapi_json(doc: Option<web::Data<ListenerDoc>>) -> HttpResponse {
    match doc {
        Some(doc) => HttpResponse::Ok()
            .content_type("application/json")
            .body(doc.0.clone()),
        None => HttpResponse::Ok().json(ApiDoc::openapi()),
    }
}

/// OpenAPI links from an answer to the operations it opens (a created product's id to its
/// routes; a purchase token to the purchase; a reservation to its status), so a client — and
/// schemathesis' stateful phase — can follow a sale through.
struct Links;

impl Modify for Links {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{RefOr, link::Link};
        let by_path_id = |op: &str| {
            Link::builder()
                .operation_id(op)
                .parameter("id", "$request.path.id")
                .build()
        };
        let by_created_id = |op: &str| {
            Link::builder()
                .operation_id(op)
                .parameter("id", "$response.body#/product_id")
                .build()
        };
        let mut add = |path: &str, post: bool, status: &str, links: Vec<(&str, Link)>| {
            let Some(item) = openapi.paths.paths.get_mut(path) else {
                return;
            };
            let op = if post { &mut item.post } else { &mut item.get };
            let Some(RefOr::T(response)) = op
                .as_mut()
                .and_then(|op| op.responses.responses.get_mut(status))
            else {
                return;
            };
            for (name, link) in links {
                response.links.insert(name.to_owned(), RefOr::T(link));
            }
        };
        add(
            "/api/v1/admin/products",
            true,
            "201",
            vec![
                ("GetProduct", by_created_id("get_product")),
                ("Preheat", by_created_id("preheat")),
                ("ProductOrders", by_created_id("product_orders")),
            ],
        );
        add(
            "/api/v1/products/{id}/token",
            true,
            "200",
            vec![(
                "Reserve",
                Link::builder()
                    .operation_id("reserve")
                    .parameter("id", "$request.path.id")
                    .request_body(Some(serde_json::json!({"token": "$response.body#/token"})))
                    .build(),
            )],
        );
        add(
            "/api/v1/products/{id}/reservations",
            true,
            "202",
            vec![("MyReservation", by_path_id("my_reservation"))],
        );
        add(
            "/api/v1/products/{id}",
            false,
            "200",
            vec![("IssueToken", by_path_id("issue_token"))],
        );
    }
}

/// Swagger UI (assets vendored in the binary).
pub fn swagger() -> SwaggerUi {
    SwaggerUi::new("/docs/{_:.*}").config(utoipa_swagger_ui::Config::from("/api-docs/openapi.json"))
}
