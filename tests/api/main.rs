//! Black-box tests against the real application, real Postgres and real
//! Redis. Every test gets a database of its own and a Redis key prefix of
//! its own, so tests run in parallel.

mod access;
mod audit;
mod auth;
mod bench_smoke;
mod catalog;
mod categories;
mod checkout;
mod dashboard;
mod event_store;
mod fake_stripe;
mod helpers;
mod http_shell;
mod idempotency;
mod payments;
mod rate_limits;
mod rebuild;
mod sales;
mod shop_support;
mod stock;
mod upgrades;
mod users;
