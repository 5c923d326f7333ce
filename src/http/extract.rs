//! Extractors: the shopper behind a bearer JWT, the operator behind the admin token, and the
//! client IP (with `X-Forwarded-For` believed only from trusted proxies).

use std::net::IpAddr;

use actix_web::{FromRequest, HttpRequest, dev::Payload, http::header, web};

use crate::{
    config::IpNet,
    domain::{ProductId, UserId},
    http::Ctx,
    http::problem::ApiError,
};

/// Parses a path id; anything but a positive 64-bit integer names no product.
pub fn product_id(raw: &str) -> Result<ProductId, ApiError> {
    ProductId::try_from(raw).map_err(|_| ApiError::ProductNotFound)
}

fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn ctx(req: &HttpRequest) -> Result<&web::Data<Ctx>, ApiError> {
    req.app_data::<web::Data<Ctx>>()
        .ok_or_else(|| ApiError::Unexpected(anyhow::anyhow!("Ctx is not registered")))
}

/// A shopper authenticated by `Authorization: Bearer <JWT>`; anything else is `401`.
#[derive(Debug, Clone, Copy)]
pub struct AuthUser(pub UserId);

impl FromRequest for AuthUser {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready((|| {
            let token = bearer(req).ok_or(ApiError::Unauthorized)?;
            ctx(req)?
                .auth
                .user(token)
                .map(AuthUser)
                .ok_or(ApiError::Unauthorized)
        })())
    }
}

/// An operator authenticated by `Authorization: Bearer <SECKILL_ADMIN_TOKEN>`.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready((|| {
            let token = bearer(req).ok_or(ApiError::Unauthorized)?;
            if ctx(req)?.auth.is_admin(token) {
                Ok(Admin)
            } else {
                Err(ApiError::Unauthorized)
            }
        })())
    }
}

/// The client's address: the peer, or — when the peer is a trusted proxy — the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(
    peer: Option<IpAddr>,
    forwarded_for: Option<&str>,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let peer = peer?;
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let Some(list) = forwarded_for else {
        return Some(peer);
    };
    let mut client = peer;
    for hop in list.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) if is_trusted(ip) => client = ip,
            Ok(ip) => return Some(ip),
            Err(_) => return Some(client),
        }
    }
    Some(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        // An untrusted peer cannot spoof its address.
        assert_eq!(
            client_ip(Some(ip("1.2.3.4")), Some("9.9.9.9"), &trusted),
            Some(ip("1.2.3.4"))
        );
        // A trusted proxy forwards the client; extra hops the client wrote are ignored.
        assert_eq!(
            client_ip(
                Some(ip("10.0.0.5")),
                Some("6.6.6.6, 5.5.5.5, 10.0.0.7"),
                &trusted
            ),
            Some(ip("5.5.5.5"))
        );
        assert_eq!(
            client_ip(Some(ip("10.0.0.5")), None, &trusted),
            Some(ip("10.0.0.5"))
        );
        assert_eq!(
            client_ip(Some(ip("10.0.0.5")), Some("garbage"), &trusted),
            Some(ip("10.0.0.5"))
        );
        assert_eq!(client_ip(None, Some("5.5.5.5"), &trusted), None);
    }
}
