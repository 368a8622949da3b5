//! The commerce server: HTTP API, authentication, configuration, the event
//! store and command execution, and the wiring of projections.
//!
//! `main.rs` only parses the command line; everything else lives here so
//! that tests can build and drive the real application.

pub mod audit;
pub mod auth;
pub mod bench;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod db;
pub mod dedicated;
pub mod event_store;
pub mod http;
pub mod payments;
pub mod rate_limit;
pub mod read_models;
pub mod redis_cache;
pub mod sales;
pub mod scheduler;
pub mod shop;
pub mod startup;
pub mod state;
pub mod telemetry;
