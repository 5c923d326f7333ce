//! The two pages a person opens first, served by the binary itself: the storefront (`/`,
//! `/p/{id}`, on the shoppers' listener) and the operators' console (`/console`, on the
//! operators' listener). Plain HTML, CSS and JavaScript from `web/`, embedded at build time;
//! the scripts only call the JSON API, and never put what they receive into the page as HTML.

use actix_web::{HttpResponse, get, http::header, web};

use crate::http::Ctx;

/// Only this origin's own files: no inline script or style, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const SHOP_HTML: &str = include_str!("../../web/shop.html");
const SHOP_JS: &str = include_str!("../../web/shop.js");
const CONSOLE_HTML: &str = include_str!("../../web/console.html");
const CONSOLE_JS: &str = include_str!("../../web/console.js");
const COMMON_JS: &str = include_str!("../../web/common.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");

/// The storefront's pages and files.
pub fn shop_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(shop_index)
        .service(shop_product)
        .service(shop_js)
        .service(common_js)
        .service(style_css);
}

/// The console's page and files.
pub fn console_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(console)
        .service(console_js)
        .service(common_js)
        .service(style_css);
}

fn page(html: String) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(html)
}

fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

/// The storefront page; whether the development login (and paying from the page) is offered,
/// and `SECKILL_CHECKOUT_URL`, are the only things the server fills in (from its settings,
/// never from anything a client sent).
fn storefront(ctx: &Ctx) -> HttpResponse {
    let settings = &ctx.deps.settings;
    let dev = if settings.dev { "1" } else { "0" };
    let checkout = attribute(settings.checkout_url.as_deref().unwrap_or(""));
    page(
        SHOP_HTML
            .replace("{{dev}}", dev)
            .replace("{{checkout}}", &checkout),
    )
}

/// `text` escaped for a double-quoted HTML attribute.
fn attribute(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

#[get("/")]
async fn shop_index(ctx: web::Data<Ctx>) -> HttpResponse {
    storefront(&ctx)
}

/// One product's page: the same document, which reads the id from its own path.
#[get("/p/{id}")]
async fn shop_product(ctx: web::Data<Ctx>) -> HttpResponse {
    storefront(&ctx)
}

#[get("/console")]
async fn console() -> HttpResponse {
    page(CONSOLE_HTML.to_owned())
}

#[get("/assets/shop.js")]
async fn shop_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", SHOP_JS)
}

#[get("/assets/console.js")]
async fn console_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", CONSOLE_JS)
}

#[get("/assets/common.js")]
async fn common_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", COMMON_JS)
}

#[get("/assets/style.css")]
async fn style_css() -> HttpResponse {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_page_or_script_writes_html_from_data() {
        for (name, text) in [
            ("shop.js", SHOP_JS),
            ("console.js", CONSOLE_JS),
            ("common.js", COMMON_JS),
        ] {
            for sink in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
            ] {
                assert!(!text.contains(sink), "{name} uses {sink}");
            }
        }
        for (name, html) in [("shop.html", SHOP_HTML), ("console.html", CONSOLE_HTML)] {
            assert!(!html.contains("<script>"), "{name} has an inline script");
            assert!(!html.contains(" style="), "{name} has an inline style");
            let handler = html.split(" on").skip(1).any(|rest| {
                let attr: String = rest.chars().take_while(char::is_ascii_lowercase).collect();
                !attr.is_empty() && rest[attr.len()..].starts_with('=')
            });
            assert!(!handler, "{name} has an inline event handler");
        }
    }
}
