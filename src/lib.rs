//! seckill: a flash-sale reservation service.
//!
//! A Redis Lua script decides each purchase atomically; winners flow through an outbox stream
//! to RabbitMQ and are persisted to Postgres by the worker; unpaid orders expire and their
//! units go back on sale. The contract (paths, codes, settings, guarantees) is in the README.
//!
//! # Layout
//!
//! Read the files in the order one purchase flows through them: **decide → relay → persist →
//! settle**. Dependencies point the same way, backwards: a later stage uses an earlier one,
//! never the reverse (`reservations`, the core gate, knows nothing of the stages after it).
//!
//! **Decide** (in every `serve` process, one Redis script call per batch of attempts):
//! - [`http::shop`] — the shoppers' routes: product view, purchase token, the purchase itself
//!   (extract the shopper and the body → [`purchase::attempt`] → the answer's status), the
//!   reservation status and its SSE stream. [`http::extract`] authenticates the caller,
//!   parses ids and says who the client is; [`http::limits`] bounds connections and request
//!   bodies at the door, and [`http::extract::ClientSpan`] is what each request's log lines
//!   carry (the client by that rule, the path, never the query); [`http::problem`] turns every
//!   error into problem+json in one place; [`http::fallback`] answers what no route takes
//!   (`405` with `Allow` for a known path, read from the OpenAPI document, else `404`).
//!   [`http::pages`] serves the storefront page (`/`, `/p/{id}`) and the operators' console
//!   (`/console`) from `web/` (files by content hash); [`http::cacheable`] tags the public
//!   answers (`ETag`, `304`); [`http::dev`] is the development sign-in the storefront uses.
//! - [`room`] + `lua/room.lua` — a product's waiting room: joins, the draw at the start,
//!   stock-aware admission ([`http::room`] is its routes; [`pow`] the proof of work to join).
//! - [`purchase`] — the decision's home: an attempt's checks in order, cheapest first
//!   (sold-out memory, product, body, purchase token, recovering), then the [`purchase::Batcher`]
//!   that gathers the attempts on one product arriving while a call is in flight into one
//!   `reserve.lua` call.
//! - [`auth`] — shoppers' JWTs and the short-lived purchase and stream tokens.
//! - [`reservations`] + `lua/` — the Redis gate: `reserve.lua`, the only copy of the purchase
//!   rules, decides one attempt or a batch (window, rate, admission, dedup, stock, outbox) in one
//!   atomic step (under `SECKILL_REDIS_DURABILITY=replicas:N` a win then waits for its replicas,
//!   [`durability::ReplicaWait`]); the reservation lifecycle ([`reservations::Status`]), the
//!   sale's scripts (preheat, pause, retire) and pure decoders of the scripts' replies. Each
//!   product's state carries a [`reservations::Moment`] (epoch, win sequence) that only moves
//!   forward: a state found behind one seen outside Redis went back in time (a failover to a
//!   replica that lagged) and is dropped for a rebuild.
//! - [`soldout`] — the in-memory sold-out answer (no Redis call once a product is gone).
//! - [`events`] — Redis pub/sub: clears sold-out memory, wakes SSE streams.
//! - [`sse`] — the open Server-Sent Events streams: caps per user and process, wake-ups routed
//!   by product and shopper. (Elsewhere "stream" means a Redis stream: a product's outbox.)
//! - [`keys`] — the Redis key schema (one hash tag per product, so scripts run on a cluster).
//!
//! **Relay** (in every `serve` process):
//! - [`relay`] — reads the outbox streams of the products whose sale is live or still draining
//!   (a blocking read, woken by Redis; [`outbox`] wakes it on a cluster), publishes winners with
//!   confirms, records each confirmed winner in Postgres (`relayed`, what a rebuild counts), and
//!   acknowledges an entry only after that; a product that fails is backed off alone.
//! - [`amqp`] — the self-healing RabbitMQ connection, the queue topology, the order message.
//!
//! **Persist** (in `worker`):
//! - [`worker`] — batches of winners into `orders`, idempotently, within each product's stock,
//!   acked after commit; then `confirmed` (or `rejected`) back into Redis through `status.lua`.
//!   A batch Postgres refuses for good is split until the culprits are found.
//! - [`rejections`] — wins that could not become orders (only after Redis lost data): why, and
//!   the `rejection` table.
//! - [`dlq`] — the dead-letter queue: dead-lettering with a reason, `seckill dlq list|replay`.
//!
//! **Settle** (after an order exists):
//! - [`orders`] — pay, cancel, and returning a closed order's unit exactly once.
//! - [`sweeper`] — expires unpaid orders and reconciles units a dead process left unreturned;
//!   retires ended, drained sales from Redis (their keys expire, `lua/retire.lua`).
//! - [`products`] — creating products and loading (or rebuilding) a sale into Redis from
//!   Postgres; [`recovery`] — the preheat's rules, and the watch in every `serve` process that
//!   finds a product Redis lost (or whose Redis went back in time), keeps it `recovering` until
//!   every winner that left Redis is counted in Postgres, and rebuilds it ([`http::admin`] is the operators' face of both, and of the console's live
//!   figures).
//!
//! **Process** (what every stage runs on):
//! - [`cli`] — the `seckill` subcommands; [`config`] — typed settings from the environment;
//!   [`startup`] — builds the application, one function per role (API, relay, worker,
//!   sweeper); [`deps`] — the connections the components share; [`telemetry`] — logs;
//!   [`metrics`] — Prometheus (with the process's CPU, memory and fds, and [`build_info`]:
//!   the version and git commit built); [`redis`] and [`db`] — connecting (and migrating) Redis and
//!   Postgres; [`durability`] — checking that Redis gives what `SECKILL_REDIS_DURABILITY`
//!   asks (at start and for `/readyz`); [`backoff`] — retry delays; [`cache`] — short-lived,
//!   bounded, single-flight answers (product views, misses, readiness); [`domain`] — ids valid by construction;
//!   and `seckill loadtest` (a client tool, private to [`cli`]).
//! - [`drain`] — the shutdown phases every listener sees: not ready (`/readyz` answers
//!   `503 draining`) while still serving, then closing (event streams end with a `close` event).

pub mod amqp;
pub mod auth;
pub mod backoff;
pub mod build_info;
pub mod cache;
pub mod cli;
pub mod config;
pub mod db;
pub mod deps;
pub mod dlq;
pub mod domain;
pub mod drain;
pub mod durability;
pub mod events;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod order_events;
pub mod orders;
pub mod outbox;
pub mod pow;
pub mod products;
pub mod purchase;
pub mod recovery;
pub mod redis;
pub mod rejections;
pub mod relay;
pub mod reservations;
pub mod room;
pub mod soldout;
pub mod sse;
pub mod startup;
pub mod sweeper;
pub mod telemetry;
pub mod tls;
pub mod worker;
