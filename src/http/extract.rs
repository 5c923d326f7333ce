//! Extractors: the shopper behind a bearer JWT, the operator behind the admin token, and the
//! client IP (with `X-Forwarded-For` believed only from trusted proxies).

use std::net::{IpAddr, Ipv6Addr};

use actix_web::{
    Error, FromRequest, HttpMessage, HttpRequest,
    body::MessageBody,
    dev::{Payload, ServiceRequest, ServiceResponse},
    http::header,
    web,
};
use futures_util::future::{Either, LocalBoxFuture};
use std::future::{Ready, ready};
use tracing::Span;
use tracing_actix_web::{DefaultRootSpanBuilder, RequestId, RootSpanBuilder};

use crate::{
    auth::UserCheck,
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
    type Future = MaybeLater<Self>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        shopper(req, |user| Ok(AuthUser(user)))
    }
}

/// An extractor's answer: now, or once a fetch of the login's keys is done.
type MaybeLater<T> =
    Either<Ready<Result<T, ApiError>>, LocalBoxFuture<'static, Result<T, ApiError>>>;

/// The shopper a bearer JWT names, then `done` with them: answered at once for a token the
/// keys verify (or one they refuse); a token naming a `kid` the login's JWKS does not hold
/// waits for one fetch of it ([`crate::auth::Auth::user_after_fetch`]).
fn shopper<T: 'static>(
    req: &HttpRequest,
    done: impl FnOnce(UserId) -> Result<T, ApiError> + 'static,
) -> MaybeLater<T> {
    let Some(token) = bearer(req) else {
        return Either::Left(ready(Err(ApiError::Unauthorized)));
    };
    let ctx = match ctx(req) {
        Ok(ctx) => ctx,
        Err(e) => return Either::Left(ready(Err(e))),
    };
    // Verified once: a refused token is answered now, and only an unknown `kid` waits.
    let kid = match ctx.auth.check_user(token) {
        UserCheck::Valid(user) => return Either::Left(ready(done(user))),
        UserCheck::Invalid => return Either::Left(ready(Err(ApiError::Unauthorized))),
        UserCheck::UnknownKid(kid) => kid,
    };
    let (ctx, token) = (ctx.clone(), token.to_owned());
    Either::Right(Box::pin(async move {
        let user = ctx
            .auth
            .user_after_fetch(&token, &kid)
            .await
            .ok_or(ApiError::Unauthorized)?;
        done(user)
    }))
}

/// Who a bearer token is, by `check` (`None`: nobody this route takes): `401` without one.
fn bearer_matching<T>(
    req: &HttpRequest,
    check: impl FnOnce(&crate::auth::Auth, &str) -> Option<T>,
) -> Result<T, ApiError> {
    let token = bearer(req).ok_or(ApiError::Unauthorized)?;
    check(&ctx(req)?.auth, token).ok_or(ApiError::Unauthorized)
}

/// An operator authenticated by `Authorization: Bearer <SECKILL_ADMIN_TOKEN>`.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(bearer_matching(req, |auth, token| {
            auth.is_admin(token).then_some(Admin)
        }))
    }
}

/// The storefront's backend, authenticated by `Authorization: Bearer <one of
/// SECKILL_SERVICE_TOKENS>`: it reads orders and records payments, nothing else.
#[derive(Debug, Clone, Copy)]
pub struct Service;

impl FromRequest for Service {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(bearer_matching(req, |auth, token| {
            auth.is_service(token).then_some(Service)
        }))
    }
}

/// Who may cancel an order: its shopper (a JWT), or the storefront's backend (a service token).
#[derive(Debug, Clone, Copy)]
pub struct Canceller(pub crate::orders::Closer);

impl FromRequest for Canceller {
    type Error = ApiError;
    type Future = MaybeLater<Self>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        use crate::orders::Closer;
        if let (Some(token), Ok(ctx)) = (bearer(req), ctx(req))
            && ctx.auth.is_service(token)
        {
            return Either::Left(ready(Ok(Canceller(Closer::Backend))));
        }
        shopper(req, |user| Ok(Canceller(Closer::Shopper(user))))
    }
}

/// An operator or the storefront's backend: who may read a sale's orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderReader {
    Admin,
    Service,
}

impl FromRequest for OrderReader {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(bearer_matching(req, |auth, token| {
            // Both compared, whichever matches, so timing does not say which door it is.
            match (auth.is_admin(token), auth.is_service(token)) {
                (true, _) => Some(OrderReader::Admin),
                (_, true) => Some(OrderReader::Service),
                _ => None,
            }
        }))
    }
}

/// The client's address: the TCP peer, or — when the peer is a trusted proxy — the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy. `forwarded_for` holds every
/// `X-Forwarded-For` line of the request in order: several lines are one list, as if joined by
/// commas (RFC 9110 §5.3), so a client cannot hide behind a second line. An entry that is not
/// an address ends the walk at the last trusted hop. IPv4-mapped IPv6 addresses are IPv4.
pub fn client_ip(
    peer: Option<IpAddr>,
    forwarded_for: &[&str],
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let peer = peer?.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let mut client = peer;
    for hop in forwarded_for.iter().rev().flat_map(|line| line.rsplit(',')) {
        match hop.trim().parse::<IpAddr>().map(|ip| ip.to_canonical()) {
            Ok(ip) if is_trusted(ip) => client = ip,
            Ok(ip) => return Some(ip),
            Err(_) => return Some(client),
        }
    }
    Some(client)
}

/// [`client_ip`] of a request (a line that is not ASCII counts as an entry that is not an
/// address).
pub fn request_client_ip(req: &HttpRequest, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = req.peer_addr().map(|a| a.ip());
    let peer_trusted = peer.is_some_and(|ip| trusted.iter().any(|net| net.contains(ip)));
    if !peer_trusted {
        return peer.map(|ip| ip.to_canonical());
    }
    let lines: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    client_ip(peer, &lines, trusted)
}

/// Who a client is for the per-client limits: an IPv4 address, or an IPv6 address's /64 (one
/// subscriber commonly holds a whole /64, so per address it could mint 2^64 identities).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
    }
}

/// The peers whose `X-Forwarded-For` is believed (`SECKILL_TRUSTED_PROXIES`); app data of
/// both listeners, so the limits and the logs read a client's address by one rule.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(pub std::sync::Arc<[IpNet]>);

impl TrustedProxies {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(ip))
    }

    /// The client's address of a request ([`request_client_ip`]).
    pub fn client_ip(&self, req: &HttpRequest) -> Option<IpAddr> {
        request_client_ip(req, &self.0)
    }
}

/// The route pattern a request matched (`/api/v1/products/{id}/reservations`; `None`: none):
/// found once, by [`ClientSpan`], and kept in the request's extensions.
#[derive(Debug, Clone)]
pub struct RoutePattern(pub Option<String>);

/// The root span of every request (tracing-actix-web): what each log line inside a request
/// carries. `http.client_ip` follows [`request_client_ip`]'s rule — not actix's
/// `realip_remote_addr`, which believes any `Forwarded`/`X-Forwarded-For` header from anyone —
/// and `http.target` is the path without the query (the default span records the query, which
/// may hold an event stream's `?token=`).
pub struct ClientSpan;

impl RootSpanBuilder for ClientSpan {
    fn on_request_start(req: &ServiceRequest) -> Span {
        let client_ip = req
            .app_data::<TrustedProxies>()
            .cloned()
            .unwrap_or_default()
            .client_ip(req.request())
            .map(|ip| ip.to_string())
            .unwrap_or_default();
        let method = req.method().as_str();
        // Matched once per request (a walk over the routes' patterns): the span reads it here,
        // the metrics read it back from the extensions.
        let pattern = req.match_pattern();
        let route = pattern.as_deref().unwrap_or("default");
        let request_id = req
            .extensions()
            .get::<RequestId>()
            .map(ToString::to_string)
            .unwrap_or_default();
        let header = |name: header::HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let span = tracing::info_span!(
            "HTTP request",
            http.method = %method,
            http.route = %route,
            http.flavor = ?req.version(),
            http.host = %header(header::HOST),
            http.client_ip = %client_ip,
            http.user_agent = %header(header::USER_AGENT),
            // The path alone: a query may hold a credential (an event stream's `?token=`).
            http.target = %req.path(),
            http.status_code = tracing::field::Empty,
            otel.name = %format!("{method} {route}"),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            request_id = %request_id,
            exception.message = tracing::field::Empty,
            exception.details = tracing::field::Empty,
        );
        req.extensions_mut().insert(RoutePattern(pattern));
        span
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
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
            client_ip(Some(ip("1.2.3.4")), &["9.9.9.9"], &trusted),
            Some(ip("1.2.3.4"))
        );
        // A trusted proxy forwards the client; extra hops the client wrote are ignored.
        assert_eq!(
            client_ip(
                Some(ip("10.0.0.5")),
                &["6.6.6.6, 5.5.5.5, 10.0.0.7"],
                &trusted
            ),
            Some(ip("5.5.5.5"))
        );
        assert_eq!(
            client_ip(Some(ip("10.0.0.5")), &[], &trusted),
            Some(ip("10.0.0.5"))
        );
        assert_eq!(
            client_ip(Some(ip("10.0.0.5")), &["garbage"], &trusted),
            Some(ip("10.0.0.5"))
        );
        assert_eq!(client_ip(None, &["5.5.5.5"], &trusted), None);
    }

    #[test]
    fn every_forwarded_line_counts_in_order_right_to_left() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer = Some(ip("10.0.0.5"));
        // The client put a line of its own first; the proxies appended theirs after it.
        assert_eq!(
            client_ip(
                peer,
                &["6.6.6.6", "5.5.5.5, 10.0.0.7", "10.0.0.8"],
                &trusted
            ),
            Some(ip("5.5.5.5"))
        );
        // A later line is nearer the server than an earlier one.
        assert_eq!(
            client_ip(peer, &["5.5.5.5", "7.7.7.7"], &trusted),
            Some(ip("7.7.7.7"))
        );
        // Only trusted hops: the left-most of them.
        assert_eq!(
            client_ip(peer, &["10.0.0.9", "10.0.0.8"], &trusted),
            Some(ip("10.0.0.9"))
        );
        // Garbage (or an empty line) stops the walk at the last trusted hop.
        assert_eq!(
            client_ip(peer, &["5.5.5.5", "", "10.0.0.8"], &trusted),
            Some(ip("10.0.0.8"))
        );
        assert_eq!(
            client_ip(peer, &["5.5.5.5, 1.2.3.4:80"], &trusted),
            Some(ip("10.0.0.5"))
        );
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4_for_trust_and_identity() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(
            client_ip(Some(ip("::ffff:10.0.0.5")), &["::ffff:5.5.5.5"], &trusted),
            Some(ip("5.5.5.5"))
        );
        assert_eq!(
            client_ip(Some(ip("::ffff:1.2.3.4")), &[], &trusted),
            Some(ip("1.2.3.4"))
        );
        assert_eq!(client_key(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_slash_64_and_ipv4_by_address() {
        let key = client_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd"));
        assert_eq!(key, ip("2001:db8:1:2::"));
        assert_eq!(client_key(ip("2001:db8:1:2::1")), key);
        assert_eq!(client_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")), key);
        assert_ne!(client_key(ip("2001:db8:1:3::1")), key);
        assert_eq!(client_key(ip("::1")), ip("::"));
        assert_eq!(client_key(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_ne!(client_key(ip("192.0.2.7")), client_key(ip("192.0.2.8")));
    }

    #[test]
    fn a_request_reads_every_forwarded_line_only_from_a_trusted_peer() {
        use actix_web::test::TestRequest;
        let trusted: Vec<IpNet> = vec!["127.0.0.1".parse().unwrap()];
        let req = |peer: &str| {
            TestRequest::default()
                .peer_addr(peer.parse().unwrap())
                .append_header(("x-forwarded-for", "6.6.6.6"))
                .append_header(("x-forwarded-for", "5.5.5.5"))
                .to_http_request()
        };
        assert_eq!(
            request_client_ip(&req("127.0.0.1:4000"), &trusted),
            Some(ip("5.5.5.5"))
        );
        assert_eq!(
            request_client_ip(&req("192.0.2.1:4000"), &trusted),
            Some(ip("192.0.2.1"))
        );
    }

    /// Records every new span's `http.client_ip`.
    struct CaptureClientIp(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CaptureClientIp {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Visit<'a>(&'a mut Vec<String>);
            impl tracing::field::Visit for Visit<'_> {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    if field.name() == "http.client_ip" {
                        self.0.push(format!("{value:?}"));
                    }
                }
            }
            attrs.record(&mut Visit(&mut self.0.lock().unwrap()));
        }
    }

    #[test]
    fn the_logs_client_ip_follows_the_same_rule_as_the_limits() {
        use actix_web::test::TestRequest;
        use tracing_subscriber::layer::SubscriberExt;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(CaptureClientIp(seen.clone()));
        let trusted = TrustedProxies(vec!["127.0.0.1".parse().unwrap()].into());
        tracing::subscriber::with_default(subscriber, || {
            for peer in ["127.0.0.1:4000", "192.0.2.1:4000"] {
                let req = TestRequest::default()
                    .peer_addr(peer.parse().unwrap())
                    .app_data(trusted.clone())
                    // actix's realip_remote_addr would believe this one from anyone.
                    .append_header(("forwarded", "for=203.0.113.9"))
                    .append_header(("x-forwarded-for", "6.6.6.6"))
                    .append_header(("x-forwarded-for", "5.5.5.5"))
                    .to_srv_request();
                drop(ClientSpan::on_request_start(&req));
            }
        });
        assert_eq!(*seen.lock().unwrap(), ["5.5.5.5", "192.0.2.1"]);
    }
}
