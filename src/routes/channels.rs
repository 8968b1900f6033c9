//! The channel endpoints (SPEC §3, §4.4): publish to one channel, its head
//! and subscribers, and a page of its history. A channel name in a path is
//! percent-decoded and must follow the rule of [`crate::channels::valid_name`]
//! (422 otherwise); the tenant always comes from the credential.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use super::body::json_body;
use super::publish::{publish, publisher, reader, Destination, PublishBody};
use super::{with_shared, Shared};
use crate::auth::{Principal, Role};
use crate::error::ApiError;

/// Messages a history page returns without `?limit=`, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// POST /api/v1/ws/channel/:channel
pub fn channel_publish(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "ws" / "channel" / String)
        .and(warp::post())
        .and(publisher(shared.clone()))
        .and(json_body(shared.max_message_bytes))
        .and(with_shared(shared))
        .and_then(
            |channel: String, principal: Principal, body: PublishBody, shared: Arc<Shared>| async move {
                let channel = channel_name(&channel)?;
                let to = Destination::Channel(channel);
                Ok::<_, Rejection>(publish(&shared, &principal, body, to).await)
            },
        )
}

/// GET /api/v1/ws/channel/:channel
pub fn channel_info(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "ws" / "channel" / String)
        .and(warp::get())
        .and(publisher(shared.clone()))
        .and(with_shared(shared))
        .and_then(
            |channel: String, principal: Principal, shared: Arc<Shared>| async move {
                let channel = channel_name(&channel)?;
                let tenant = principal.tenant();
                // The epoch told here stays the channel's (SPEC §4.4): stored first.
                shared.hub.prepare_channel(tenant, &channel).await;
                let (epoch, seq, here) = shared.hub.channel_info(tenant, &channel);
                let elsewhere = match &shared.redis {
                    Some(redis) => crate::redis::presence::channel_subscribers_elsewhere(
                        redis, tenant, &channel,
                    )
                    .await
                    .map_err(|e| ApiError::from(crate::log::LogError::from(e)))?
                        as usize,
                    None => 0,
                };
                Ok::<_, Rejection>(warp::reply::json(&json!({
                    "channel": channel,
                    "epoch": epoch,
                    "seq": seq,
                    "subscribers": here.saturating_add(elsewhere),
                })))
            },
        )
}

/// GET /api/v1/channels/:channel/history?since=S&epoch=E&limit=N
pub fn channel_history(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "channels" / String / "history")
        .and(warp::get())
        .and(reader(shared.clone()))
        .and(warp::query::<HashMap<String, String>>())
        .and(with_shared(shared))
        .and_then(
            |channel: String,
             principal: Principal,
             query: HashMap<String, String>,
             shared: Arc<Shared>| async move {
                let channel = channel_name(&channel)?;
                if let Principal::User(claims) = &principal {
                    let allowed = crate::channels::may_subscribe(
                        claims.role == Role::Admin,
                        claims.channels.as_deref(),
                        &shared.channels.user_channels,
                        &channel,
                    );
                    if !allowed {
                        return Err(warp::reject::custom(ApiError::Forbidden(
                            "this token may not read this channel",
                        )));
                    }
                }
                let page = PageQuery::parse(&query)?;
                let tenant = principal.tenant();
                shared.hub.prepare_channel(tenant, &channel).await;
                let page = shared.hub.channel_history(
                    tenant,
                    &channel,
                    page.since,
                    page.epoch.as_deref(),
                    page.limit,
                );
                // The frames are JSON already: written as they are, not re-encoded.
                let mut body = serde_json::to_string(&json!({
                    "channel": channel,
                    "epoch": page.epoch,
                    "head": page.head,
                    "complete": page.complete,
                }))
                .unwrap_or_default();
                body.pop();
                body.push_str(",\"messages\":[");
                for (i, envelope) in page.entries.iter().enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    body.push_str(envelope.text.as_str());
                }
                body.push_str("]}");
                let reply = warp::reply::with_header(body, "content-type", "application/json");
                Ok::<_, Rejection>(warp::reply::with_status(reply, StatusCode::OK))
            },
        )
}

/// `since`, `epoch` and `limit` of a history request.
struct PageQuery {
    since: u64,
    epoch: Option<String>,
    limit: usize,
}

impl PageQuery {
    fn parse(query: &HashMap<String, String>) -> Result<PageQuery, Rejection> {
        let invalid = |message: &str| warp::reject::custom(ApiError::Unprocessable(message.into()));
        let since = match query.get("since") {
            None => 0,
            Some(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|_| invalid("since must be a non-negative integer"))?,
        };
        let epoch = match query.get("epoch") {
            None => None,
            Some(epoch) if !epoch.is_empty() && epoch.len() <= 64 => Some(epoch.clone()),
            Some(_) => return Err(invalid("epoch must be 1 to 64 bytes")),
        };
        let limit = match query.get("limit") {
            None => DEFAULT_LIMIT,
            Some(text) => text
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| invalid("limit must be an integer from 1 to 1000"))?,
        };
        Ok(PageQuery {
            since,
            epoch,
            limit,
        })
    }
}

/// A channel path segment: percent-decoded, a channel name (else 422).
fn channel_name(segment: &str) -> Result<String, Rejection> {
    let decoded = percent_encoding::percent_decode_str(segment).decode_utf8();
    match decoded {
        Ok(name) if crate::channels::valid_name(&name) => Ok(name.into_owned()),
        _ => Err(warp::reject::custom(ApiError::Unprocessable(
            "channel must match ^[a-z][a-z0-9_-]{0,31}:[A-Za-z0-9_.:@=-]{1,128}$".into(),
        ))),
    }
}
