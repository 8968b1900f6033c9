//! Integration tests of agentcast through real sockets: a server on port 0 per
//! test (see `helpers::spawn_app`), plain HTTP clients and real WebSocket clients.
//!
//! Each module covers one part of SPEC.md:
//! - `http`: the small endpoints (health, stats, metrics), 404/405/426;
//! - `publish`: broadcast, to-user, presence and every error of SPEC §3;
//! - `auth`: both token transports, forged/expired/`none` tokens, in-band refresh;
//! - `ws`: the frames of §4.1–4.2, delivery, isolation, the close codes;
//! - `resume`: ordering, history and resume of §4.3;
//! - `limits`: connection limits, frame floods, slow consumers;
//! - `durability`: the durable log across clean restarts, `kill -9` and a store
//!   that cannot commit (issue 3);
//! - `views`: tasks, agents and analytics (SPEC §5), visibility, restarts;
//! - `task_view`: one task (`GET /api/v1/tasks/:task_id`), with the list's visibility;
//! - `channels`, `cluster_channels`: channels (SPEC §4.4, issue 10) on one node
//!   and across nodes: seq per channel, exact subscribers, replay under load,
//!   authorization, limits, expiry, slow subscribers, restarts, `kill -9`;
//! - `cluster`, `cluster_nodes`: several nodes over one real Redis (SPEC §6): delivery,
//!   Redis outages, the views on every node, a node killed and restarted;
//! - `accounts`: signup, login, refresh, me, the failed-login limiter, restarts;
//! - `api_keys`: the key life cycle, tenants, the WebSocket refusal, admin alerts;
//! - `jwks`: external tokens with keys from a JWK set (issue 11): RS256/ES256 by
//!   `kid`, rotation, the rate limit on unknown `kid`s, provider outages, the
//!   pinned algorithm, role and tenant claim mapping (a local JWKS server);
//! - `hardening_ws`: issue 8 findings on WebSockets and tokens (Ping flood, `iss`/`aud`,
//!   `exp` overflow, refresh role, `nbf`);
//! - `logs`: the real binary's log holds no password, token or key;
//! - `pages`: the embedded pages and assets of §7 (types, ETag, gzip, CSP, 404s);
//! - `cluster_directory`: accounts and API keys shared through Redis by several
//!   nodes (signup, revoke, the bootstrap admin, tenants, Redis down);
//! - `hardening_http`: issue 8's HTTP and account findings (lockout, signup limit,
//!   forged alerts, errors on keep-alive connections, loose validation);
//! - `bench`: the load tool's channel scenarios (issue 10) run against the real
//!   binary, checked through their `--json` figures;
//! - `openapi`: the OpenAPI document (issue 11) against the routes of the source
//!   and a real server: every route documented, every operation served as
//!   documented, undocumented methods 405.
//! - `metrics`: Prometheus names and bounded labels (issue 11), and every metric
//!   the Grafana dashboard and the alert rules in `deploy/` query exists.

mod accounts;
mod api_keys;
mod auth;
mod bench;
mod channels;
mod cluster;
mod cluster_channels;
mod cluster_directory;
mod cluster_nodes;
mod durability;
mod hardening_http;
mod hardening_store;
mod hardening_ws;
mod helpers;
mod http;
mod jwks;
mod limits;
mod logs;
mod metrics;
mod openapi;
mod pages;
mod publish;
mod redis_server;
mod resume;
mod task_view;
mod views;
mod ws;
