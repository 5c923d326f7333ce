//! The two pages a person opens first, served by the binary itself: the storefront (`/`,
//! `/p/{id}`, on the shoppers' listener) and the operators' console (`/console`, on the
//! operators' listener). Plain HTML, CSS and JavaScript from `web/`, embedded at build time;
//! the scripts only call the JSON API, and never put what they receive into the page as HTML.
//! The pages name their files by content hash (`/assets/shop.<hash>.js`), which a browser or a
//! CDN keeps for a year; the pages themselves are revalidated (`ETag`, `304`) on every load.

use std::sync::OnceLock;

use actix_web::{
    HttpRequest, HttpResponse, get,
    http::header::{self, EntityTag},
    web,
};

use crate::http::{Ctx, cacheable, problem::ApiError};

/// Only this origin's own files: no inline script or style, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const SHOP_HTML: &str = include_str!("../../web/shop.html");
const SHOP_JS: &str = include_str!("../../web/shop.js");
const CONSOLE_HTML: &str = include_str!("../../web/console.html");
const CONSOLE_JS: &str = include_str!("../../web/console.js");
const COMMON_JS: &str = include_str!("../../web/common.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");
const POW_JS: &str = include_str!("../../web/pow.js");

const JS: &str = "text/javascript; charset=utf-8";

/// A file the pages load, by its plain name.
struct Asset {
    file: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: [Asset; 5] = [
    Asset {
        file: "shop.js",
        content_type: JS,
        body: SHOP_JS,
    },
    Asset {
        file: "console.js",
        content_type: JS,
        body: CONSOLE_JS,
    },
    Asset {
        file: "common.js",
        content_type: JS,
        body: COMMON_JS,
    },
    Asset {
        file: "style.css",
        content_type: "text/css; charset=utf-8",
        body: STYLE_CSS,
    },
    Asset {
        file: "pow.js",
        content_type: JS,
        body: POW_JS,
    },
];

const SHOP_FILES: [&str; 4] = ["shop.js", "common.js", "style.css", "pow.js"];
const CONSOLE_FILES: [&str; 3] = ["console.js", "common.js", "style.css"];

/// A hashed name never changes content, so it may be kept for a year without asking again.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// Each asset's tag and content-hashed name (`shop.<12 hex>.js`), computed once per process
/// from the bytes built into the binary: every process of one build names them alike.
struct Named {
    tag: EntityTag,
    hashed: String,
}

fn named() -> &'static [Named; 5] {
    static NAMED: OnceLock<[Named; 5]> = OnceLock::new();
    NAMED.get_or_init(|| {
        ASSETS.each_ref().map(|a| {
            let tag = cacheable::tag_of(a.body.as_bytes());
            let (stem, ext) = a.file.rsplit_once('.').unwrap_or((a.file, ""));
            let hashed = format!("{stem}.{}.{ext}", &tag.tag()[..12]);
            Named { tag, hashed }
        })
    })
}

/// The storefront's and the console's documents with their files' hashed names, made once.
fn shop_template() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| with_hashed_assets(SHOP_HTML))
}

fn console_page() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| with_hashed_assets(CONSOLE_HTML))
}

/// `html` with every `/assets/<file>` replaced by the file's hashed name.
fn with_hashed_assets(html: &str) -> String {
    ASSETS
        .iter()
        .zip(named())
        .fold(html.to_owned(), |page, (a, n)| {
            page.replace(
                &format!("\"/assets/{}\"", a.file),
                &format!("\"/assets/{}\"", n.hashed),
            )
        })
}

/// The storefront's pages and files.
pub fn shop_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(shop_index)
        .service(shop_product)
        .service(shop_asset);
}

/// The console's page and files.
pub fn console_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(console).service(console_asset);
}

/// A page: revalidated on every load (`no-cache`), so a new release shows at once, and
/// answered `304` without a body while it has not changed.
fn page(req: &HttpRequest, html: String) -> HttpResponse {
    let tag = cacheable::tag_of(html.as_bytes());
    let mut builder = HttpResponse::Ok();
    builder
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-cache"));
    cacheable::answer(req, builder, &tag, html)
}

/// `file` if this listener serves it: by its hashed name, kept for a year; by its plain name
/// (older pages, hand-made links), revalidated like a page.
fn asset(req: &HttpRequest, file: &str, served: &[&str]) -> Result<HttpResponse, ApiError> {
    let (a, n, cache) = ASSETS
        .iter()
        .zip(named())
        .filter(|(a, _)| served.contains(&a.file))
        .find_map(|(a, n)| {
            if n.hashed == file {
                Some((a, n, IMMUTABLE))
            } else if a.file == file {
                Some((a, n, "no-cache"))
            } else {
                None
            }
        })
        .ok_or(ApiError::NotFound)?;
    let mut builder = HttpResponse::Ok();
    builder
        .content_type(a.content_type)
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::CACHE_CONTROL, cache));
    Ok(cacheable::answer(req, builder, &n.tag, a.body))
}

/// The storefront page; whether the development login (and paying from the page) is offered,
/// and `SECKILL_CHECKOUT_URL`, are the only things the server fills in (from its settings,
/// never from anything a client sent).
fn storefront(req: &HttpRequest, ctx: &Ctx) -> HttpResponse {
    let settings = &ctx.deps.settings;
    let dev = if settings.dev { "1" } else { "0" };
    let checkout = attribute(settings.checkout_url.as_deref().unwrap_or(""));
    page(
        req,
        shop_template()
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
async fn shop_index(req: HttpRequest, ctx: web::Data<Ctx>) -> HttpResponse {
    storefront(&req, &ctx)
}

/// One product's page: the same document, which reads the id from its own path.
#[get("/p/{id}")]
async fn shop_product(req: HttpRequest, ctx: web::Data<Ctx>) -> HttpResponse {
    storefront(&req, &ctx)
}

#[get("/console")]
async fn console(req: HttpRequest) -> HttpResponse {
    page(&req, console_page().to_owned())
}

#[get("/assets/{file}")]
async fn shop_asset(req: HttpRequest, file: web::Path<String>) -> Result<HttpResponse, ApiError> {
    asset(&req, &file, &SHOP_FILES)
}

#[get("/assets/{file}")]
async fn console_asset(
    req: HttpRequest,
    file: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    asset(&req, &file, &CONSOLE_FILES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pages_name_every_file_by_its_content_hash() {
        for html in [SHOP_HTML, CONSOLE_HTML] {
            let page = with_hashed_assets(html);
            for a in &ASSETS {
                assert!(
                    !page.contains(&format!("\"/assets/{}\"", a.file)),
                    "{} by its plain name",
                    a.file
                );
            }
        }
        let shop = with_hashed_assets(SHOP_HTML);
        for n in named().iter().filter(|n| !n.hashed.starts_with("console")) {
            assert!(shop.contains(&n.hashed), "{}", n.hashed);
        }
        let hashed = &named()[0].hashed;
        assert!(
            hashed.starts_with("shop.") && hashed.ends_with(".js") && hashed.len() == 20,
            "{hashed}"
        );
    }

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
