//! A sale's orders for the operators and the storefront's backend: a page at a time (keyset
//! pagination, JSON) or every one as CSV, streamed a page at a time so that a sale of a million
//! orders is exported in bounded memory.

use actix_web::{
    HttpRequest, HttpResponse, get,
    http::header,
    web::{self, Bytes},
};
use futures_util::stream;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    domain::ProductId,
    http::{Ctx, extract::OrderReader, extract::product_id, problem::ApiError},
    orders::{self, CSV_HEADER, OrderStatus, OrderView, PAGE_MAX, csv_row},
    products,
};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(product_orders);
}

/// Which orders, and how many at once.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OrdersQuery {
    /// Only orders in this status.
    pub status: Option<OrderStatus>,
    /// The `next` of the previous page (an order id): the orders after it.
    pub after: Option<Uuid>,
    /// Orders per page, 1 to 1000 (default 100; ignored by the CSV export, which sends all).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u64>,
}

/// One page of a product's orders.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrdersPage {
    /// In the order they were created.
    pub orders: Vec<OrderView>,
    /// The `after` of the next page; `null` on the last one.
    pub next: Option<Uuid>,
}

/// Whether the client asked for CSV (`Accept: text/csv`).
fn wants_csv(req: &HttpRequest) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().to_ascii_lowercase().starts_with("text/csv"))
}

/// A product's orders, oldest first: a page of JSON, or with `Accept: text/csv` every
/// matching order as CSV (streamed).
#[utoipa::path(
    params(("id" = String, Path, description = "product id"), OrdersQuery),
    responses(
        (status = 200, description = "A page of orders (`next` is the `after` of the next page, `null` on the last); with `Accept: text/csv`, every matching order as CSV (`text/csv`, a header line, RFC 4180)", body = OrdersPage),
        (status = 400, description = "`bad_request`: an unknown status, a malformed `after`, a `limit` outside 1–1000", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: neither the admin token nor a service token", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`product_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited` (per client address, `SECKILL_ADMIN_IP_RATE`), with `Retry-After`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = []), ("service_token" = [])),
    tag = "operators"
)]
#[get("/api/v1/admin/products/{id}/orders")]
pub async fn product_orders(
    ctx: web::Data<Ctx>,
    _reader: OrderReader,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<OrdersQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    let query = query.into_inner();
    let limit = query.limit.unwrap_or(100);
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be 1 to 1000".into()));
    }
    products::find(&ctx.deps.db, id)
        .await?
        .ok_or(ApiError::ProductNotFound)?;
    if wants_csv(&req) {
        return Ok(csv(ctx, id, query.status, query.after));
    }
    let page = orders::page(&ctx.deps.db, id, query.status, query.after, limit).await?;
    let next = (page.len() as u64 == limit)
        .then(|| page.last().map(|o| o.order_id))
        .flatten();
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(OrdersPage {
            orders: page.iter().map(OrderView::from).collect(),
            next,
        }))
}

/// Where the CSV export stands: the last order sent, and whether the end was reached.
struct Export {
    ctx: web::Data<Ctx>,
    product: ProductId,
    status: Option<OrderStatus>,
    after: Option<Uuid>,
    header: bool,
    done: bool,
}

/// Every matching order as CSV, one page ([`PAGE_MAX`] orders) per chunk: memory stays one page
/// whatever the sale's size. A failure mid-way ends the body early (the client sees a
/// truncated download, never a wrong one: each chunk ends on a line).
fn csv(
    ctx: web::Data<Ctx>,
    product: ProductId,
    status: Option<OrderStatus>,
    after: Option<Uuid>,
) -> HttpResponse {
    let start = Export {
        ctx,
        product,
        status,
        after,
        header: true,
        done: false,
    };
    let body = stream::unfold(start, |mut st| async move {
        if st.done {
            return None;
        }
        let page = match orders::page(&st.ctx.deps.db, st.product, st.status, st.after, PAGE_MAX)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), product_id = st.product.get(), "CSV export cut short");
                st.done = true;
                return Some((Err(ApiError::from(e)), st));
            }
        };
        let mut chunk = String::with_capacity(page.len() * 200 + CSV_HEADER.len());
        if std::mem::take(&mut st.header) {
            chunk.push_str(CSV_HEADER);
        }
        for o in &page {
            chunk.push_str(&csv_row(o));
        }
        st.done = (page.len() as u64) < PAGE_MAX;
        st.after = page.last().map(|o| o.order_id).or(st.after);
        Some((Ok::<_, ApiError>(Bytes::from(chunk)), st))
    });
    HttpResponse::Ok()
        .content_type("text/csv; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((
            header::CONTENT_DISPOSITION,
            format!(
                "attachment; filename=\"product-{}-orders.csv\"",
                product.get()
            ),
        ))
        .streaming(body)
}
