//! seckill: a flash-sale reservation service.
//!
//! A Redis Lua script decides each purchase atomically; winners flow through an outbox stream
//! to RabbitMQ and are persisted to Postgres by the worker. See `DESIGN.md` and the README.

pub mod amqp;
pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod domain;
pub mod events;
pub mod http;
pub mod keys;
pub mod loadtest;
pub mod metrics;
pub mod orders;
pub mod products;
pub mod redis;
pub mod relay;
pub mod reservations;
pub mod soldout;
pub mod startup;
pub mod sweeper;
pub mod telemetry;
pub mod worker;
