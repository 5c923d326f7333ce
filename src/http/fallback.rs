//! What a request that no route takes is answered: `405 method_not_allowed` with `Allow` when
//! its path is one of this listener's routes under another method, `404 not_found` otherwise.
//! The routes are read from the OpenAPI document, so the answer and the contract agree.

use crate::http::{
    docs::{Routes, listener_doc},
    problem::ApiError,
};
use actix_web::{HttpRequest, HttpResponse, dev::ResourceDef, web};

/// The paths a listener serves and the methods each takes.
pub struct KnownPaths(Vec<(ResourceDef, String)>);

impl KnownPaths {
    /// The operations of the listener's own document ([`listener_doc`]).
    pub fn of(routes: Routes) -> Self {
        let doc = listener_doc(routes);
        let mut known = Vec::new();
        for (path, item) in &doc.paths.paths {
            let methods: Vec<&str> = [
                ("GET", &item.get),
                ("POST", &item.post),
                ("PUT", &item.put),
                ("PATCH", &item.patch),
                ("DELETE", &item.delete),
            ]
            .into_iter()
            .filter(|(_, op)| op.is_some())
            .map(|(method, _)| method)
            .collect();
            if !methods.is_empty() {
                known.push((ResourceDef::new(path.as_str()), methods.join(", ")));
            }
        }
        Self(known)
    }

    /// The `Allow` value for `path`, if this listener serves it.
    pub fn allowed(&self, path: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(def, _)| def.is_match(path))
            .map(|(_, allow)| allow.as_str())
    }
}

/// The default service of a listener.
pub async fn fallback(
    req: HttpRequest,
    known: web::Data<KnownPaths>,
) -> Result<HttpResponse, ApiError> {
    Err(match known.allowed(req.path()) {
        Some(allow) => ApiError::MethodNotAllowed {
            allow: allow.to_owned(),
        },
        None => ApiError::NotFound,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_knows_its_own_paths_and_their_methods() {
        let shop = KnownPaths::of(crate::http::docs::SHOPPERS);
        assert_eq!(shop.allowed("/api/v1/products/7"), Some("GET"));
        assert_eq!(
            shop.allowed("/api/v1/products/7/reservations"),
            Some("POST")
        );
        assert_eq!(shop.allowed("/healthz"), Some("GET"));
        assert_eq!(shop.allowed("/metrics"), None, "skipped");
        assert_eq!(
            shop.allowed("/api/v1/admin/products"),
            None,
            "another listener's"
        );
        assert_eq!(shop.allowed("/api/v1/products"), Some("GET"), "the listing");
        assert_eq!(shop.allowed("/api/v1/products/7/nope"), None);
        // The storefront backend's routes are the shoppers' listener's too.
        assert_eq!(shop.allowed("/api/v1/orders/1"), Some("GET"));
        assert_eq!(shop.allowed("/api/v1/orders/1/payment"), Some("POST"));
        let ops = KnownPaths::of(crate::http::docs::OPERATORS);
        assert_eq!(ops.allowed("/api/v1/admin/products"), Some("POST"));
        assert_eq!(ops.allowed("/metrics"), Some("GET"));
        assert_eq!(ops.allowed("/api/v1/products/7"), None);
    }
}
