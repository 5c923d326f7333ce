//! The order worker: RabbitMQ → Postgres in batches, idempotently, acking only after commit.
//!
//! [`process_batch`] is one step (testable without a broker): one transaction, in which
//! [`plan`] decides each winner, earliest win first: a new order while its product has units
//! free (`stock - sold`); already decided (its order or rejection exists: a redelivery); or
//! `rejected` — no unit left, or its shopper already holds an order for the product (both only
//! possible after Redis lost data). Usually (`persist_unlocked`) the batch waits for no lock
//! until its last statement: it inserts the orders in one statement and then adds them to
//! `product.sold` only if that stays within the stock, so the batches of one product (several
//! consumers, several workers) queue on its row only for that update and the commit. A batch
//! that path cannot decide alone (a win to reject, an order that exists) is rolled back and
//! decided with its products locked first (`persist_locked`). After the commit every status
//! is recorded in Redis through `status.lua`.
//!
//! [`Worker::run`] is the loop around it: prefetch-bounded consumer, batching, backoff while
//! Postgres, Redis or RabbitMQ is down (holding the batch: no ack/nack storms), reconnection.
//! A batch refused for good ([`classify`]: SQLSTATE class 22 or 23) is split ([`bisect`])
//! until the messages refused on their own are found; those, and unreadable messages, go to
//! the dead-letter queue one by one with their reason ([`crate::dlq`]), and the rest of the
//! batch is persisted: one bad message never wedges the queue.
//!
//! Here: `persist` persists a batch ([`plan`], [`process_batch`]); `poison` handles what
//! Postgres refuses for good ([`classify`], [`bisect`]); `consumer` is the loop ([`Worker`]).

mod consumer;
mod persist;
mod poison;

pub use consumer::Worker;
pub use persist::{BatchOutcome, Fate, Known, plan, process_batch};
pub use poison::{Failure, Poison, bisect, classify, is_permanent_sqlstate};
