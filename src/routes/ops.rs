//! Operations endpoints: health, stats, Prometheus metrics.

use std::sync::Arc;

use serde_json::json;
use warp::http::header::CONTENT_TYPE;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use super::{with_shared, Shared};
use crate::auth::{bearer, AuthError};
use crate::error::ApiError;

/// GET /health
pub fn health(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("health")
        .and(warp::get())
        .and(with_shared(shared))
        .then(|shared: Arc<Shared>| async move {
            let mut body = json!({
                "status": "ok",
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_s": shared.hub.metrics().uptime().as_secs(),
                "node": shared.node,
            });
            let mut healthy = true;
            if let Some(redis) = &shared.redis {
                let reachable = redis.ping().await.is_ok();
                let subscribed = shared.log.ready();
                healthy = reachable && subscribed;
                body["redis"] = json!(if reachable { "ok" } else { "down" });
                body["subscription"] = json!(if subscribed { "ok" } else { "catching_up" });
            }
            let status = if healthy {
                StatusCode::OK
            } else {
                body["status"] = json!("degraded");
                StatusCode::SERVICE_UNAVAILABLE
            };
            warp::reply::with_status(warp::reply::json(&body), status)
        })
}

/// GET /api/v1/ws/stats
pub fn stats(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "ws" / "stats")
        .and(warp::get())
        .and(with_shared(shared))
        .map(|shared: Arc<Shared>| {
            let m = shared.hub.metrics();
            let (channels, subscriptions) = shared.hub.channel_counts();
            warp::reply::json(&json!({"stats": {
                "total_connections": m.connections_total.get(),
                "current_connections": shared.hub.open_connections(),
                "messages_sent": m.messages_sent.get(),
                "messages_published": m.messages_published.get(),
                "messages_replayed": m.messages_replayed.get(),
                "slow_consumer_disconnects": m.slow_consumer_disconnects.get(),
                "auth_failures": m.auth_failures.get() + m.ws_auth_failures.get(),
                "rate_limited": m.rate_limited.get(),
                "channels": channels,
                "subscriptions": subscriptions,
                "uptime_s": m.uptime().as_secs(),
                "node": shared.node,
            }}))
        })
}

/// GET /metrics
pub fn metrics(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("metrics")
        .and(warp::get())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::header::optional::<String>("accept"))
        .and(with_shared(shared))
        .and_then(
            |authorization: Option<String>, accept: Option<String>, shared: Arc<Shared>| async move {
                if let Some(expected) = &shared.metrics_token {
                    let given = bearer(authorization.as_deref()).unwrap_or("");
                    if !crate::auth::constant_time_eq(
                        given.as_bytes(),
                        expected.expose().as_bytes(),
                    ) {
                        shared.hub.metrics().auth_failures.inc();
                        return Err(warp::reject::custom(ApiError::Unauthorized(
                            AuthError::Invalid,
                        )));
                    }
                }
                let m = shared.hub.metrics();
                let (channels, _) = shared.hub.channel_counts();
                m.channels.set(channels as i64);
                m.log_ready.set(i64::from(shared.log.ready()));
                if let Some(redis) = &shared.redis {
                    // Bounded by the Redis response timeout.
                    m.redis_up.set(i64::from(redis.ping().await.is_ok()));
                }
                let openmetrics = accept
                    .as_deref()
                    .is_some_and(|accept| accept.contains("application/openmetrics-text"));
                let (body, content_type) = if openmetrics {
                    (m.encode(), "application/openmetrics-text; version=1.0.0; charset=utf-8")
                } else {
                    (m.encode_classic(), "text/plain; version=0.0.4; charset=utf-8")
                };
                Ok::<_, Rejection>(warp::reply::with_header(body, CONTENT_TYPE, content_type))
            },
        )
}
