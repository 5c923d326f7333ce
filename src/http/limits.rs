//! Limits at the door against hostile traffic: open connections per client address and in
//! total, and how long a request body may take to arrive.
//!
//! **Connections.** [`Connections::open`] runs for every accepted TCP connection of the
//! shoppers' listener (actix's `on_connect`, before any request): it counts the connection
//! under its peer's [`client_key`] (an IPv4 address or an IPv6 /64; trusted proxies are not
//! counted per address) and in the process-wide total, and puts the resulting [`ConnSlot`] in
//! the connection's data. The slot gives its counts back when actix drops the connection, so
//! the map holds only addresses with a connection open: its size is bounded by the open
//! connections. A connection that found its address (or the process) full gets one fast
//! answer to its first request from [`limit_connections`] — `429 too_many_connections` or
//! `503 at_capacity`, with `Connection: close` — and is closed.
//!
//! **Bodies.** [`body_deadline`] gives every request body `SECKILL_BODY_TIMEOUT_MS` from the
//! request's head to arrive whole. Past it the read fails, and whatever the handler answered is
//! replaced by `408 body_timeout` with `Connection: close`. A body left unread (an early answer
//! such as a `401`, or the `408`) is kept alive until the answer is written, so actix closes the
//! connection after a bounded linger (`client_disconnect_timeout`) instead of draining a chunked
//! body for as long as a client cares to trickle it.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    future::Future,
    net::IpAddr,
    pin::Pin,
    rc::Rc,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use actix_web::{
    Error, HttpMessage, ResponseError,
    body::{BodySize, BoxBody, MessageBody},
    dev::{Payload, ServiceRequest, ServiceResponse},
    error::PayloadError,
    middleware::Next,
    web::Bytes,
};
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

use crate::{
    http::{
        extract::{TrustedProxies, client_key},
        problem::ApiError,
    },
    metrics::Metrics,
};

/// Whether a new connection may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Its client address already holds `SECKILL_MAX_CONNECTIONS_PER_IP` connections.
    AddressFull,
    /// The process already holds `SECKILL_MAX_CONNECTIONS` connections.
    ProcessFull,
}

/// Open connections of one listener, per client address and in total (shared by its workers).
pub struct Connections {
    per_address: u32,
    total_cap: u32,
    trusted: TrustedProxies,
    open: Mutex<HashMap<IpAddr, u32>>,
    total: AtomicU32,
    metrics: Option<Arc<Metrics>>,
}

impl Connections {
    pub fn new(per_address: u32, total: u32, trusted: TrustedProxies) -> Self {
        Self {
            per_address,
            total_cap: total,
            trusted,
            open: Mutex::default(),
            total: AtomicU32::new(0),
            metrics: None,
        }
    }

    /// Keeps `seckill_connections_open` and `seckill_connections_refused_total` current.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Counts a new connection from `peer`; the slot gives the counts back when dropped.
    pub fn open(self: &Arc<Self>, peer: Option<IpAddr>) -> ConnSlot {
        let total = self.total.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        let key = peer
            .map(|ip| ip.to_canonical())
            .filter(|ip| !self.trusted.contains(*ip))
            .map(client_key);
        let from_address = key.map_or(0, |key| {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            let count = open.entry(key).or_insert(0);
            *count = count.saturating_add(1);
            *count
        });
        let admission = if from_address > self.per_address {
            Admission::AddressFull
        } else if total > self.total_cap {
            Admission::ProcessFull
        } else {
            Admission::Admitted
        };
        if let Some(m) = &self.metrics {
            m.connections_open.inc();
        }
        ConnSlot {
            conns: self.clone(),
            key,
            admission,
        }
    }

    /// Connections open now.
    pub fn total(&self) -> u32 {
        self.total.load(Ordering::Acquire)
    }

    /// Client addresses with a connection open now (the size of the map).
    pub fn addresses(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn close(&self, key: Option<IpAddr>) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(key) = key {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(count) = open.get_mut(&key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    open.remove(&key);
                }
            }
        }
        if let Some(m) = &self.metrics {
            m.connections_open.dec();
        }
    }
}

/// One open connection's place in [`Connections`]; lives in the connection's data.
pub struct ConnSlot {
    conns: Arc<Connections>,
    key: Option<IpAddr>,
    pub admission: Admission,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.conns.close(self.key);
    }
}

/// For `HttpServer::on_connect`: counts the connection and stores its [`ConnSlot`].
pub fn on_connect(
    conns: &Arc<Connections>,
    io: &dyn std::any::Any,
    data: &mut actix_web::dev::Extensions,
) {
    let peer = io
        .downcast_ref::<actix_web::rt::net::TcpStream>()
        .and_then(|s| s.peer_addr().ok())
        .map(|a| a.ip());
    data.insert(conns.open(peer));
}

/// Answers the first request of a connection that was over a cap when it opened, and closes it.
pub async fn limit_connections(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let refused = req.conn_data::<ConnSlot>().and_then(|slot| {
        let (err, reason) = match slot.admission {
            Admission::Admitted => return None,
            Admission::AddressFull => (ApiError::TooManyConnections, "per_ip"),
            Admission::ProcessFull => (ApiError::AtCapacity, "total"),
        };
        if let Some(m) = &slot.conns.metrics {
            m.connections_refused.with_label_values(&[reason]).inc();
        }
        Some(err)
    });
    if let Some(err) = refused {
        let (req, _) = req.into_parts();
        return Ok(ServiceResponse::new(req, err.error_response()));
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

/// How long a request body may take to arrive whole, counted from the request's head
/// (`SECKILL_BODY_TIMEOUT_MS`); app data of both listeners.
#[derive(Clone)]
pub struct BodyTimeout {
    pub limit: Duration,
    pub metrics: Arc<Metrics>,
}

/// A request body and what became of it, shared by the stream the handler reads and
/// [`body_deadline`].
struct BodyState {
    payload: RefCell<Payload>,
    deadline: Instant,
    timed_out: Cell<bool>,
    /// Read to its end (or to a transport error): nothing is left on the connection.
    finished: Cell<bool>,
}

/// The body as the handler sees it: the real one, until the deadline.
struct TimedPayload {
    state: Rc<BodyState>,
    /// Armed the first time the body is not all there yet (most bodies arrive with their head).
    sleep: Option<Pin<Box<Sleep>>>,
}

fn timed_out() -> PayloadError {
    PayloadError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "request body timeout",
    ))
}

impl Stream for TimedPayload {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let state = &this.state;
        if state.timed_out.get() {
            return Poll::Ready(Some(Err(timed_out())));
        }
        let polled = Pin::new(&mut *state.payload.borrow_mut()).poll_next(cx);
        match polled {
            Poll::Ready(Some(Ok(chunk))) => Poll::Ready(Some(Ok(chunk))),
            Poll::Ready(end) => {
                state.finished.set(true);
                Poll::Ready(end)
            }
            Poll::Pending => {
                let deadline = state.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        state.timed_out.set(true);
                        Poll::Ready(Some(Err(timed_out())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

/// An answer that keeps an unread request body alive until it is written (see the module
/// docs: actix then closes the connection rather than drain the body).
struct HoldBody {
    body: BoxBody,
    _unread: Rc<BodyState>,
}

impl MessageBody for HoldBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_next(cx)
    }
}

/// An error answer that holds the unread body (as [`HoldBody`] does) until it is written.
struct HoldError {
    inner: Error,
    unread: Rc<BodyState>,
}

impl std::fmt::Debug for HoldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.inner, f)
    }
}

impl std::fmt::Display for HoldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.inner, f)
    }
}

impl ResponseError for HoldError {
    fn status_code(&self) -> actix_web::http::StatusCode {
        self.inner.as_response_error().status_code()
    }

    fn error_response(&self) -> actix_web::HttpResponse {
        let unread = self.unread.clone();
        self.inner.error_response().map_body(|_, body| {
            BoxBody::new(HoldBody {
                body,
                _unread: unread,
            })
        })
    }
}

/// Bounds how long a request body may take to arrive ([`BodyTimeout`]); see the module docs.
pub async fn body_deadline(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let timeout = req.app_data::<BodyTimeout>().cloned();
    let payload = req.take_payload();
    let Some(timeout) = timeout.filter(|_| !matches!(payload, Payload::None)) else {
        req.set_payload(payload);
        return Ok(next.call(req).await?.map_into_boxed_body());
    };
    let state = Rc::new(BodyState {
        payload: RefCell::new(payload),
        deadline: Instant::now() + timeout.limit,
        timed_out: Cell::new(false),
        finished: Cell::new(false),
    });
    req.set_payload(Payload::from(Box::pin(TimedPayload {
        state: state.clone(),
        sleep: None,
    })
        as Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>>));
    let answer = next.call(req).await;
    let timed_out = state.timed_out.get();
    if timed_out {
        timeout.metrics.body_timeouts.inc();
    }
    let unread = (!state.finished.get()).then_some(state);
    match answer {
        Ok(res) => {
            let mut res = res.map_into_boxed_body();
            if timed_out {
                let (req, _) = res.into_parts();
                res = ServiceResponse::new(req, ApiError::BodyTimeout.error_response());
            }
            if let Some(unread) = unread {
                res = res.map_body(|_, body| {
                    BoxBody::new(HoldBody {
                        body,
                        _unread: unread,
                    })
                });
            }
            Ok(res)
        }
        // An error (the request deadline's `503`) is answered by actix from the error itself.
        Err(err) => {
            let err = if timed_out {
                ApiError::BodyTimeout.into()
            } else {
                err
            };
            Err(match unread {
                Some(unread) => HoldError { inner: err, unread }.into(),
                None => err,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn a_connection_past_its_address_cap_is_refused_and_closing_one_makes_room() {
        let conns = Arc::new(Connections::new(2, 100, TrustedProxies::default()));
        let a = conns.open(ip("192.0.2.1"));
        let b = conns.open(ip("192.0.2.1"));
        let c = conns.open(ip("192.0.2.1"));
        let other = conns.open(ip("192.0.2.2"));
        assert_eq!(
            [a.admission, b.admission, c.admission, other.admission],
            [
                Admission::Admitted,
                Admission::Admitted,
                Admission::AddressFull,
                Admission::Admitted
            ]
        );
        drop(c);
        drop(a);
        assert_eq!(conns.open(ip("192.0.2.1")).admission, Admission::Admitted);
    }

    #[test]
    fn an_ipv6_slash_64_is_one_address_and_ipv4_mapped_is_ipv4() {
        let conns = Arc::new(Connections::new(1, 100, TrustedProxies::default()));
        let _a = conns.open(ip("2001:db8:1:2::1"));
        assert_eq!(
            conns.open(ip("2001:db8:1:2:ffff::2")).admission,
            Admission::AddressFull
        );
        assert_eq!(
            conns.open(ip("2001:db8:1:3::1")).admission,
            Admission::Admitted
        );
        let _v4 = conns.open(ip("192.0.2.1"));
        assert_eq!(
            conns.open(ip("::ffff:192.0.2.1")).admission,
            Admission::AddressFull
        );
    }

    #[test]
    fn the_total_counts_every_connection_and_trusted_proxies_have_no_address_cap() {
        let trusted = TrustedProxies(vec!["10.0.0.0/8".parse().unwrap()].into());
        let conns = Arc::new(Connections::new(1, 3, trusted));
        let held: Vec<_> = (0..3).map(|_| conns.open(ip("10.0.0.1"))).collect();
        assert!(held.iter().all(|s| s.admission == Admission::Admitted));
        assert_eq!(conns.open(ip("10.0.0.1")).admission, Admission::ProcessFull);
        assert_eq!(conns.open(None).admission, Admission::ProcessFull);
        drop(held);
        assert_eq!(conns.total(), 0);
        assert_eq!(conns.open(ip("192.0.2.9")).admission, Admission::Admitted);
    }

    #[test]
    fn the_address_map_holds_only_addresses_with_a_connection_open() {
        let conns = Arc::new(Connections::new(4, 100_000, TrustedProxies::default()));
        let slots: Vec<_> = (0..1_000_u32)
            .map(|i| conns.open(Some(IpAddr::from(i.to_be_bytes()))))
            .collect();
        assert_eq!((conns.addresses(), conns.total()), (1_000, 1_000));
        drop(slots);
        assert_eq!((conns.addresses(), conns.total()), (0, 0));
    }
}
