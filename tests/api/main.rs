//! Black-box tests against the real app and the real Redis, RabbitMQ and Postgres.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod helpers;
mod services;

mod batching;
mod blackhole;
mod cheap;
mod cluster;
mod connections;
mod dead_letter;
mod durability;
mod events;
mod export;
mod failover;
mod faults;
mod health;
mod http_api;
mod jwks;
mod loadtest;
mod metrics;
mod pages;
mod payment;
mod pipeline;
mod process;
mod rate_limit;
mod rebuild;
mod recovery;
mod relay;
mod reservations;
mod retire;
mod room;
mod scale;
mod sse;
mod tls;
mod worker;
