//! agentcast: real-time updates for an agent/task platform.
//!
//! Backends and admins publish JSON messages over a small REST API; browsers
//! receive them over one authenticated WebSocket, in order, exactly once, and
//! without losing one across reconnects (each tenant has a log with `seq`,
//! `epoch` and history, and clients resume from it).
//!
//! # Layout
//! - [`config`]: the validated [`config::Settings`] and their rules (a near
//!   leaf every module may import); the binary's `cli` module maps the clap
//!   flags and environment onto it.
//! - [`app`]: binds the listener, builds the server, runs it, drains it.
//! - [`routes`]: warp filters, one per endpoint; [`error`] maps every failure to
//!   the JSON error body. `routes::pages` serves the pages of `static/`, embedded
//!   in the binary; `routes::openapi` serves the OpenAPI document of every
//!   endpoint (`src/routes/openapi.json`, kept honest by `tests/api/openapi.rs`).
//! - [`auth`]: token claims, pinned algorithms, publisher checks (JWT or API key);
//!   `auth::jwks` caches an identity provider's keys (`JWT_JWKS_URL`) and
//!   `auth::mapping` reads its role and tenant claims.
//! - [`accounts`]: the bootstrap admin, signup, login and its failed-login limiter.
//! - [`directory`]: accounts and API keys, in the SQLite store or, in cluster
//!   mode, in the shared Redis.
//! - [`hub`]: the log's sink — tenants, connections, outboxes, fan-out, and
//!   the per-connection [`hub::session`] loop; [`hub::wire`] holds the
//!   server's own frames.
//! - [`log`]: the stream protocol behind one [`log::Log`] handle — `seq`,
//!   commit, `epoch`, history and the resume rule, the message types
//!   ([`log::Envelope`], [`log::Target`]) and [`log::LogError`] — over an
//!   [`log::Engine`] (memory or SQLite).
//! - [`metrics`]: counters and histograms behind `/api/v1/ws/stats` and `/metrics`
//!   (Prometheus names, labels bounded; `deploy/` holds a Grafana dashboard and
//!   alert rules over them).
//! - [`shutdown`]: signals, cancellation and the tracking of live sessions.
//! - [`store`]: the SQLite file — durable tenant logs (one writer thread, group
//!   commit), the views of SPEC §5, accounts, API keys.
//! - The load tool (`agentcast bench`) lives in the binary (`src/bench/`), not
//!   here: a client of the server that uses none of its modules but [`units`].
//! - [`units`]: durations, sizes and switches as flags spell them (a leaf).
//! - [`views`]: where the task and agent lists are read (the store, or Redis).
//!
//! A message's path: `routes::publish` validates it and calls
//! `hub::Hub::publish`, which hands it to `log::Log::append`: the log's engine
//! picks its `seq`, it is serialized once into a `log::Envelope` and queued
//! (the store's writer queue); once its transaction committed, the log's
//! delivery step (off the writer thread) pushes it into the stream's history
//! and hands it to the hub (`log::Sink`), which puts its shared bytes into
//! each addressed `hub::outbox::Outbox`; then the publish is answered 202.
//! Each `hub::session` writes its outbox to its socket. Imports run one way:
//! routes → hub → log → store; the log never imports the hub.

#![forbid(unsafe_code)]

pub mod accounts;
pub mod app;
pub mod auth;
pub mod channels;
pub mod config;
pub mod directory;
pub mod error;
pub mod hub;
pub mod log;
pub mod metrics;
pub mod redis;
pub mod routes;
pub mod shutdown;
pub mod store;
pub mod units;
pub mod views;
