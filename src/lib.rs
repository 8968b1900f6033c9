//! agentcast: real-time updates for an agent/task platform.
//!
//! Backends and admins publish JSON messages over a small REST API; browsers
//! receive them over one authenticated WebSocket, in order, exactly once, and
//! without losing one across reconnects (each tenant has a log with `seq`,
//! `epoch` and history, and clients resume from it).
//!
//! # Layout
//! - [`config`]: flags and environment -> validated [`config::Settings`].
//! - [`app`]: binds the listener, builds the server, runs it, drains it.
//! - [`routes`]: warp filters, one per endpoint; [`error`] maps every failure to
//!   the JSON error body. `routes::pages` serves the pages of `static/`, embedded
//!   in the binary.
//! - [`auth`]: token claims, pinned algorithms, publisher checks (JWT or API key).
//! - [`accounts`]: the bootstrap admin, signup, login and its failed-login limiter.
//! - [`hub`]: the fan-out core — tenants, connections, outboxes, and the
//!   per-connection [`hub::session`] loop; [`hub::wire`] holds the frame shapes.
//! - [`log`]: per-tenant `seq`, `epoch`, history and the resume rule: the
//!   in-memory cache in front of a [`log::LogStore`] (memory or SQLite).
//! - [`metrics`]: counters and histograms behind `/api/v1/ws/stats` and `/metrics`.
//! - [`shutdown`]: signals, cancellation and the tracking of live sessions.
//! - [`store`]: the SQLite file — durable tenant logs (one writer thread, group
//!   commit), the views of SPEC §5, accounts, API keys.
//! - [`bench`]: the load tool (`agentcast bench`).
//!
//! A message's path: `routes::publish` validates it, `hub::Hub::publish` gives it
//! a `seq`, serializes it once into a `hub::wire::Envelope` and hands it to the
//! `log::LogStore` (the store's writer queue); once its transaction committed,
//! it is pushed into the tenant's `log::TenantLog` history and its shared bytes
//! into each addressed `hub::outbox::Outbox`, and the publish is answered 202;
//! each `hub::session` writes its outbox to its socket.

#![forbid(unsafe_code)]

pub mod accounts;
pub mod app;
pub mod auth;
pub mod bench;
pub mod config;
pub mod error;
pub mod hub;
pub mod log;
pub mod metrics;
pub mod routes;
pub mod shutdown;
pub mod store;
