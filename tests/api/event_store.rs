//! The event store and projection runner under concurrency.
