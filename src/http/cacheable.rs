//! Answers a cache may keep and revalidate: a strong `ETag` over the exact body, and
//! `304 Not Modified` (no body) when the client — a browser, nginx's micro-cache, a CDN —
//! already holds that body (`If-None-Match`, compared weakly as RFC 9110 §13.1.2 says).

use actix_web::{
    HttpMessage, HttpRequest, HttpResponse, HttpResponseBuilder,
    http::{
        StatusCode,
        header::{ETag, EntityTag, IfNoneMatch},
    },
    web::Bytes,
};
use sha2::{Digest, Sha256};

/// The tag of a body: the first 96 bits of its SHA-256, in hex. The same bytes give the same
/// tag in every process, so a cache in front of several `serve` processes revalidates with
/// any of them.
pub fn tag_of(body: &[u8]) -> EntityTag {
    EntityTag::new_strong(hex::encode(&Sha256::digest(body)[..12]))
}

/// Whether the request's `If-None-Match` names `tag` (or is `*`).
pub fn not_modified(req: &HttpRequest, tag: &EntityTag) -> bool {
    match req.get_header::<IfNoneMatch>() {
        Some(IfNoneMatch::Any) => true,
        Some(IfNoneMatch::Items(items)) => items.iter().any(|t| t.weak_eq(tag)),
        None => false,
    }
}

/// `builder`'s answer with `body` tagged `tag`: a `304` with the same headers and no body when
/// the client holds it already, else a `200` with the body.
pub fn answer(
    req: &HttpRequest,
    mut builder: HttpResponseBuilder,
    tag: &EntityTag,
    body: impl Into<Bytes>,
) -> HttpResponse {
    builder.insert_header(ETag(tag.clone()));
    if not_modified(req, tag) {
        return builder.status(StatusCode::NOT_MODIFIED).finish();
    }
    builder.body(body.into())
}

/// A JSON answer anyone may cache, tagged by its bytes.
pub fn json<T: serde::Serialize>(
    req: &HttpRequest,
    cache_control: &str,
    value: &T,
) -> HttpResponse {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut builder = HttpResponse::Ok();
    builder
        .content_type("application/json")
        .insert_header((actix_web::http::header::CACHE_CONTROL, cache_control));
    answer(req, builder, &tag_of(&body), body)
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    #[test]
    fn a_request_naming_the_tag_weakly_or_among_others_is_not_modified() {
        let tag = tag_of(b"{\"remaining\":3}");
        assert_eq!(tag, tag_of(b"{\"remaining\":3}"), "same bytes, same tag");
        assert_ne!(tag, tag_of(b"{\"remaining\":2}"));
        let quoted = format!("\"{}\"", tag.tag());
        for (header, expected) in [
            (quoted.clone(), true),
            (format!("W/{quoted}"), true),
            (format!("\"other\", {quoted}"), true),
            ("*".to_owned(), true),
            ("\"other\"".to_owned(), false),
        ] {
            let req = TestRequest::get()
                .insert_header(("if-none-match", header.as_str()))
                .to_http_request();
            assert_eq!(not_modified(&req, &tag), expected, "{header}");
        }
        assert!(!not_modified(&TestRequest::get().to_http_request(), &tag));
    }

    #[test]
    fn a_not_modified_answer_has_the_tag_and_cache_headers_and_no_body() {
        let body = b"{}".to_vec();
        let tag = tag_of(&body);
        let req = TestRequest::get()
            .insert_header(("if-none-match", format!("\"{}\"", tag.tag())))
            .to_http_request();
        let res = json(&req, "public, max-age=1", &serde_json::json!({}));
        assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
        let header = |name| res.headers().get(name).unwrap().to_str().unwrap();
        assert_eq!(header("cache-control"), "public, max-age=1");
        assert_eq!(header("etag"), format!("\"{}\"", tag.tag()));
        let fresh = json(&TestRequest::get().to_http_request(), "no-cache", &[1]);
        assert_eq!(fresh.status(), StatusCode::OK);
    }
}
