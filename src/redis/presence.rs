//! Presence of every node (SPEC §6): each node writes its connection counts
//! to `P:presence:NODE` (a hash that expires after [`NODE_TTL`]) and its
//! heartbeat to `P:nodes`, once a second when they changed and every
//! [`HEARTBEAT`] anyway. Counts are summed over the nodes whose heartbeat is
//! younger than [`NODE_TTL`], so a node killed without closing its
//! connections drops out within 30 s, and a clean connect or close shows on
//! every node within about a second. The publish script counts `recipients`
//! the same way. A node's own connections are counted from its hub, exactly,
//! not from its entry here.

use std::collections::HashMap;
use std::time::Duration;

use super::{presence_field, Redis, RedisError};
use crate::log::redis::NODE_TTL;

/// A node refreshes its heartbeat at least this often.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// How often a changed count is written.
const FLUSH: Duration = Duration::from_secs(1);

/// The counts of this node: presence field -> connections.
pub type Counts = HashMap<String, u64>;

/// Writes this node's `counts()` until `stop`, then removes the node.
pub async fn publish(
    redis: Redis,
    counts: impl Fn() -> Counts + Send + 'static,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut last: Option<Counts> = None;
    let mut last_beat = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(FLUSH);
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut stop => {
                leave(&redis).await;
                return;
            }
        }
        let now = counts();
        if last.as_ref() == Some(&now) && last_beat.elapsed() < HEARTBEAT {
            continue;
        }
        match write(&redis, &now).await {
            Ok(()) => {
                last = Some(now);
                last_beat = tokio::time::Instant::now();
            }
            // Redis is down: the next tick tries again.
            Err(error) => tracing::debug!(%error, "presence not written"),
        }
    }
}

/// Replaces this node's hash with `counts` and refreshes its heartbeat,
/// atomically; drops the heartbeats older than [`NODE_TTL`], which count for
/// nothing, so `P:nodes` does not grow by one node id per restart forever
/// (a default `NODE_ID` has a random suffix).
async fn write(redis: &Redis, counts: &Counts) -> Result<(), RedisError> {
    let keys = redis.keys();
    let key = keys.presence(redis.node());
    let mut pipe = redis::pipe();
    pipe.atomic().del(&key).ignore();
    if !counts.is_empty() {
        let fields: Vec<(&String, &u64)> = counts.iter().collect();
        pipe.hset_multiple(&key, &fields).ignore();
    }
    let now = now_ms();
    pipe.pexpire(&key, NODE_TTL.as_millis() as i64)
        .ignore()
        .zrembyscore(keys.nodes(), "-inf", now - NODE_TTL.as_millis() as i64)
        .ignore()
        .zadd(keys.nodes(), redis.node(), now)
        .ignore();
    let mut commands = redis.commands();
    pipe.query_async::<()>(&mut commands).await?;
    Ok(())
}

/// Removes this node at a clean stop, so its connections leave at once.
async fn leave(redis: &Redis) {
    let keys = redis.keys();
    let mut commands = redis.commands();
    let _: Result<(), _> = redis::pipe()
        .atomic()
        .del(keys.presence(redis.node()))
        .ignore()
        .zrem(keys.nodes(), redis.node())
        .ignore()
        .query_async(&mut commands)
        .await;
}

/// Connections of `user` in `tenant` over every live node but this one
/// (whose own count the caller has exactly, not a second old).
pub async fn user_connections_elsewhere(
    redis: &Redis,
    tenant: &str,
    user: &str,
) -> Result<u64, RedisError> {
    count_elsewhere(redis, &presence_field::user(tenant, user)).await
}

/// Subscribers of `channel` over every live node but this one.
pub async fn channel_subscribers_elsewhere(
    redis: &Redis,
    tenant: &str,
    channel: &str,
) -> Result<u64, RedisError> {
    count_elsewhere(redis, &presence_field::channel(tenant, channel)).await
}

/// The presence field `field` summed over every live node but this one.
async fn count_elsewhere(redis: &Redis, field: &str) -> Result<u64, RedisError> {
    let keys = redis.keys();
    let mut commands = redis.commands();
    let since = now_ms() - NODE_TTL.as_millis() as i64;
    let nodes: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(keys.nodes())
        .arg(since)
        .arg("+inf")
        .query_async(&mut commands)
        .await?;
    if nodes.is_empty() {
        return Ok(0);
    }
    let mut pipe = redis::pipe();
    for node in &nodes {
        pipe.hget(keys.presence(node), field);
    }
    let counts: Vec<Option<u64>> = pipe.query_async(&mut commands).await?;
    let counts = nodes
        .iter()
        .zip(counts)
        .filter(|(node, _)| *node != redis.node())
        .map(|(_, n)| n);
    Ok(counts.flatten().sum())
}

fn now_ms() -> i64 {
    crate::log::timestamp_with_ms().1
}
