//! The Redis engine (SPEC §6): several nodes share one log per stream.
//!
//! A publish is ONE script ([`publish.lua`](./publish.lua)): Redis picks the
//! `seq`, creates the epoch if absent, appends to the history (trimmed by
//! count and bytes), updates the view and publishes the message to every
//! node on `P:events`. The 202 waits for the script only: Redis executes
//! scripts one at a time, so the order of the pub/sub messages is seq order.
//!
//! Delivery, on every node alike (the publishing node included, so nothing
//! is delivered twice): the [`subscriber`] task reads `P:events` and hands
//! each message to the log, which applies it in seq order per stream. A
//! message past the head + 1 means the node missed some (a message lost on
//! the link, a reconnect): it fetches them from the history first. A stream
//! whose epoch changed (Redis came back empty) starts over: its connections
//! are closed with 1012 so their clients resume and learn `complete:false`.
//!
//! Liveness: the subscriber publishes a probe to itself every
//! [`PROBE_INTERVAL`]; a probe that does not come back within
//! [`PROBE_DEADLINE`] means the subscription is wedged, and the node
//! reconnects, re-subscribes and fills every stream from the history. Until
//! it has, [`ClusterHealth::ready`] is false and `/health` says degraded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::Script;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{Envelope, LogError, StreamKey, Target};
use crate::metrics::Metrics;
use crate::redis::{presence_field, Keys, Redis, RedisError};

/// How often the subscriber checks that its subscription still delivers.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// A probe not back within this is a wedged subscription.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(3);

/// How long a node's heartbeat counts it as alive (presence, recipients).
pub const NODE_TTL: Duration = Duration::from_secs(30);

/// The most messages one history read returns.
const FILL_BATCH: usize = 1000;

impl From<RedisError> for LogError {
    fn from(error: RedisError) -> Self {
        LogError::Unavailable(error.0)
    }
}

fn unavailable(error: redis::RedisError) -> LogError {
    LogError::from(RedisError::from(error))
}

/// Whether this node's view of the Redis logs is whole.
#[derive(Debug, Default)]
pub struct ClusterHealth {
    /// Subscribed, probed and caught up with every stream.
    ready: AtomicBool,
}

impl ClusterHealth {
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }
}

/// The Redis engine: the shared [`Redis`] plus the publish script.
#[derive(Clone)]
pub struct RedisLog {
    redis: Redis,
    publish: Arc<Script>,
    ensure: Arc<Script>,
    health: Arc<ClusterHealth>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for RedisLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLog")
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

/// Creates a stream's log with the given epoch if it has none; returns
/// `{epoch, seq}` as stored. A tenant log joins the set of streams; a
/// channel (ARGV[3], its unborn grace in ms, not '') does not, and while it
/// has no message it lives for that grace after its last ensure.
const ENSURE: &str = r"
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'seq', 0, 'bytes', 0)
  if ARGV[3] == '' then
    redis.call('SADD', KEYS[2], ARGV[2])
  end
end
local stored = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
if ARGV[3] ~= '' and tonumber(stored[2]) == 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return stored
";

/// What a publish needs besides the message (the 202 of SPEC §3 comes from it).
pub(super) struct Published {
    pub seq: u64,
    pub recipients: usize,
}

/// One message as the nodes receive it (and as the history keeps it).
#[derive(Debug)]
pub(super) struct Incoming {
    pub stream: StreamKey,
    pub epoch: String,
    /// When the publishing node sent it (Unix ms), for the pub/sub lag.
    pub sent_ms: i64,
    pub envelope: Arc<Envelope>,
}

impl RedisLog {
    pub fn new(redis: Redis, metrics: Arc<Metrics>) -> Self {
        RedisLog {
            redis,
            publish: Arc::new(Script::new(include_str!("publish.lua"))),
            ensure: Arc::new(Script::new(ENSURE)),
            health: Arc::default(),
            metrics,
        }
    }

    pub fn health(&self) -> &Arc<ClusterHealth> {
        &self.health
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// Runs the publish script: `frame` is the message serialized up to and
    /// after its `seq`, which the script puts in between.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn publish(
        &self,
        key: &StreamKey,
        kind: &str,
        target: &Target,
        frame: (&str, &str),
        data: &serde_json::Value,
        ts_ms: i64,
        limits: (usize, usize),
        ttl_ms: Option<i64>,
    ) -> Result<Published, LogError> {
        let keys = self.redis.keys();
        let stream = Keys::stream_id(key);
        // Channels change no view (SPEC §5 follows the tenant log).
        let view = match key.channel {
            None => ViewArgs::of(kind, data).unwrap_or_default(),
            Some(_) => ViewArgs::default(),
        };
        let presence = match (&key.channel, target) {
            (Some(channel), _) => presence_field::channel(&key.tenant, channel),
            (None, Target::Broadcast) => presence_field::tenant(&key.tenant),
            (None, Target::Admins) => presence_field::admins(&key.tenant),
            (None, Target::User(user)) => presence_field::user(&key.tenant, user),
        };
        let (to, role) = match target {
            Target::Broadcast => ("", ""),
            Target::User(user) => (&**user, ""),
            Target::Admins => ("", "admin"),
        };
        let mut invocation = self.publish.prepare_invoke();
        invocation
            .key(keys.log(&stream))
            .key(keys.history(&stream))
            .key(keys.streams())
            .key(keys.nodes())
            .key(keys.view_index(&key.tenant, view.index))
            .key(keys.view_entry(&key.tenant, view.entry, &view.id))
            .arg(new_epoch())
            .arg(&stream)
            .arg(kind)
            .arg(target_line(target))
            .arg(frame.0)
            .arg(frame.1)
            .arg(limits.0)
            .arg(limits.1)
            .arg(ts_ms)
            .arg(presence)
            .arg(format!("{}:presence:", keys.prefix()))
            .arg(NODE_TTL.as_millis() as u64)
            .arg(view.op)
            .arg(&view.id)
            .arg(to)
            .arg(role)
            .arg(&view.status)
            .arg(&view.query)
            .arg(&view.progress)
            .arg(&view.name)
            .arg(if view.op.is_empty() {
                String::new()
            } else {
                data.to_string()
            })
            .arg(keys.events())
            .arg(self.redis.node())
            .arg(ttl_ms.map_or(String::new(), |ttl| ttl.to_string()));
        let mut commands = self.redis.commands();
        let answer: Result<(String, u64, u64), _> = invocation.invoke_async(&mut commands).await;
        let (_epoch, seq, recipients) = answer.map_err(|e| {
            self.metrics.redis_errors.inc();
            unavailable(e)
        })?;
        Ok(Published {
            seq,
            recipients: usize::try_from(recipients).unwrap_or(usize::MAX),
        })
    }

    /// The stream's `(epoch, head)`, creating its log with `epoch` if it has none.
    pub(super) async fn ensure(
        &self,
        key: &StreamKey,
        epoch: &str,
    ) -> Result<(String, u64), LogError> {
        let keys = self.redis.keys();
        let stream = Keys::stream_id(key);
        // Twice the local grace: the sweeper tells it again for followed
        // channels at least every minute, and a node that dropped an
        // abandoned channel finds the same epoch here for a while.
        let grace = match key.channel {
            None => String::new(),
            Some(_) => (2 * super::UNBORN_GRACE.as_millis()).to_string(),
        };
        let mut commands = self.redis.commands();
        let (epoch, head): (String, u64) = self
            .ensure
            .key(keys.log(&stream))
            .key(keys.streams())
            .arg(epoch)
            .arg(&stream)
            .arg(grace)
            .invoke_async(&mut commands)
            .await
            .map_err(unavailable)?;
        Ok((epoch, head))
    }

    /// Every stream with a log: `(key, epoch, head)`.
    pub(super) async fn heads(&self) -> Result<Vec<(StreamKey, String, u64)>, LogError> {
        let keys = self.redis.keys();
        let mut commands = self.redis.commands();
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(keys.streams())
            .query_async(&mut commands)
            .await
            .map_err(unavailable)?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET").arg(keys.log(id)).arg("epoch").arg("seq");
        }
        let metas: Vec<(Option<String>, Option<u64>)> = if ids.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut commands).await.map_err(unavailable)?
        };
        Ok(ids
            .iter()
            .zip(metas)
            .filter_map(|(id, meta)| match meta {
                (Some(epoch), Some(head)) => Some((Keys::stream_key(id), epoch, head)),
                _ => None,
            })
            .collect())
    }

    /// The `(epoch, head)` of each of `streams` that Redis still has (channels,
    /// which are not in the set of streams).
    pub(super) async fn heads_of(
        &self,
        streams: &[StreamKey],
    ) -> Result<Vec<(StreamKey, String, u64)>, LogError> {
        if streams.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.redis.keys();
        let mut pipe = redis::pipe();
        for key in streams {
            pipe.cmd("HMGET")
                .arg(keys.log(&Keys::stream_id(key)))
                .arg("epoch")
                .arg("seq");
        }
        let mut commands = self.redis.commands();
        let metas: Vec<(Option<String>, Option<u64>)> =
            pipe.query_async(&mut commands).await.map_err(unavailable)?;
        Ok(streams
            .iter()
            .zip(metas)
            .filter_map(|(key, meta)| match meta {
                (Some(epoch), Some(head)) => Some((key.clone(), epoch, head)),
                _ => None,
            })
            .collect())
    }

    /// The history of `key` from `from` to `to` (seqs, inclusive), oldest
    /// first, at most [`FILL_BATCH`] messages.
    pub(super) async fn history(
        &self,
        key: &StreamKey,
        from: u64,
        to: u64,
    ) -> Result<Vec<Incoming>, LogError> {
        let keys = self.redis.keys();
        let mut commands = self.redis.commands();
        let payloads: Vec<Vec<u8>> = redis::cmd("ZRANGE")
            .arg(keys.history(&Keys::stream_id(key)))
            .arg(from)
            .arg(to)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(FILL_BATCH)
            .query_async(&mut commands)
            .await
            .map_err(unavailable)?;
        Ok(payloads
            .into_iter()
            .filter_map(|p| parse_payload(Bytes::from(p)))
            .collect())
    }
}

/// The target as one line of the payload: `b`, `a`, or `u` and the user id
/// as a JSON string (a user id may hold a newline).
fn target_line(target: &Target) -> String {
    match target {
        Target::Broadcast => "b".to_owned(),
        Target::Admins => "a".to_owned(),
        Target::User(user) => format!("u{}", serde_json::Value::from(&**user)),
    }
}

fn parse_target(line: &str) -> Option<Target> {
    match line.as_bytes().first()? {
        b'b' => Some(Target::Broadcast),
        b'a' => Some(Target::Admins),
        b'u' => serde_json::from_str::<String>(&line[1..])
            .ok()
            .map(|user| Target::User(user.into_boxed_str())),
        _ => None,
    }
}

/// Reads a payload: `seq \n epoch \n sent_ms \n stream \n type \n target \n
/// frame`. The frame's bytes are shared, not copied. `None` for anything
/// else (another deployment's junk on our channel is ignored, never a panic).
pub(super) fn parse_payload(payload: Bytes) -> Option<Incoming> {
    let text = std::str::from_utf8(&payload).ok()?;
    let mut lines = text.splitn(7, '\n');
    let seq: u64 = lines.next()?.parse().ok()?;
    let epoch = lines.next()?.to_owned();
    let sent_ms: i64 = lines.next()?.parse().ok()?;
    let stream = Keys::stream_key(lines.next()?);
    let kind: Box<str> = lines.next()?.into();
    let target = parse_target(lines.next()?)?;
    let frame = lines.next()?;
    let start = frame.as_ptr() as usize - text.as_ptr() as usize;
    let text = Utf8Bytes::try_from(payload.slice(start..)).ok()?;
    let channel = stream.channel.as_deref().map(Arc::from);
    Some(Incoming {
        stream,
        epoch,
        sent_ms,
        envelope: Arc::new(Envelope {
            seq,
            target,
            kind,
            text,
            published_at: Instant::now(),
            channel,
        }),
    })
}

fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The view arguments of the publish script; the default changes no view
/// (op `''`, and keys the script never touches).
#[derive(Default)]
struct ViewArgs {
    op: &'static str,
    index: &'static str,
    entry: &'static str,
    id: String,
    status: String,
    query: String,
    progress: String,
    name: String,
}

impl ViewArgs {
    fn of(kind: &str, data: &serde_json::Value) -> Option<ViewArgs> {
        let text = |field: &str| {
            data.get(field)
                .and_then(serde_json::Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let optional = |field: &str| match data.get(field) {
            Some(serde_json::Value::String(s)) => format!("={s}"),
            Some(n @ serde_json::Value::Number(_)) => format!("={n}"),
            _ => String::new(),
        };
        match kind {
            "task_update" => Some(ViewArgs {
                op: "task",
                index: "tasks",
                entry: "task",
                id: text("task_id")?,
                status: text("status")?,
                query: optional("query"),
                progress: optional("progress"),
                name: String::new(),
            }),
            "agent_update" => {
                let id = text("agent_id")?;
                let op = match text("action")?.as_str() {
                    "deleted" => "agent_delete",
                    _ => "agent",
                };
                Some(ViewArgs {
                    op,
                    index: "agents",
                    entry: "agent",
                    id,
                    status: String::new(),
                    query: String::new(),
                    progress: String::new(),
                    name: optional("name"),
                })
            }
            _ => None,
        }
    }
}

/// What the subscriber hands its messages to: the log.
pub(super) trait Apply: Send + Sync + 'static {
    /// Applies a message in seq order; `Err(head)` when messages after `head`
    /// are missing and must be filled from the history first.
    fn apply(&self, incoming: Incoming) -> Result<(), u64>;
    /// The history no longer reaches back to the head + 1: replaces the
    /// stream's cache with `entries` (the newest `HISTORY_SIZE`) and closes
    /// its connections (1012) so they resume.
    fn resync(&self, stream: &StreamKey, epoch: &str, head: u64, entries: Vec<Incoming>);
    /// The local `(epoch, head)` of every stream with messages.
    fn local_heads(&self) -> Vec<(StreamKey, String, u64)>;
}

/// The pub/sub side: subscribe, apply, probe, and start over when the link
/// breaks or wedges. Runs until the log is dropped.
pub(super) async fn subscriber<A: Apply>(engine: RedisLog, log: Weak<A>) {
    let keys = engine.redis.keys().clone();
    let node = engine.redis.node().to_owned();
    let mut backoff = Duration::from_millis(100);
    let mut probes = 0;
    loop {
        engine.health.set(false);
        let session = run_subscription(&engine, &log, &keys, &node, &mut probes).await;
        if log.upgrade().is_none() {
            return;
        }
        match session {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(error) => {
                engine.metrics.redis_errors.inc();
                tracing::warn!(%error, "redis subscription lost; re-subscribing");
            }
        }
        engine.metrics.redis_reconnects.inc();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One subscription, until it breaks (`Err`) or wedges (`Ok`).
async fn run_subscription<A: Apply>(
    engine: &RedisLog,
    log: &Weak<A>,
    keys: &Keys,
    node: &str,
    probes: &mut u64,
) -> Result<(), LogError> {
    let connect = engine.redis.client().get_async_pubsub();
    let mut pubsub = tokio::time::timeout(crate::redis::CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| LogError::Unavailable("redis pub/sub connect timed out".into()))?
        .map_err(unavailable)?;
    let probe_channel = keys.probe(node);
    pubsub.subscribe(keys.events()).await.map_err(unavailable)?;
    pubsub
        .subscribe(&probe_channel)
        .await
        .map_err(unavailable)?;
    let mut messages = pubsub.on_message();
    // Subscribed first, then caught up: whatever was published meanwhile is
    // both in the history and on the way here, and applying it twice is a no-op.
    catch_up(engine, log).await?;
    engine.health.set(true);
    tracing::info!("redis subscription live and caught up");

    let mut ticker = tokio::time::interval(PROBE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outstanding: Option<(u64, Instant)> = None;
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return Err(LogError::Unavailable("redis pub/sub connection closed".into()));
                };
                let Some(log) = log.upgrade() else { return Ok(()) };
                if message.get_channel_name() == probe_channel {
                    let n: u64 = message.get_payload().unwrap_or(0);
                    if outstanding.is_some_and(|(sent, _)| n >= sent) {
                        outstanding = None;
                    }
                    continue;
                }
                let Some(incoming) = parse_payload(Bytes::copy_from_slice(message.get_payload_bytes())) else {
                    tracing::debug!("ignoring a malformed message on the events channel");
                    continue;
                };
                let lag_ms = crate::log::timestamp_with_ms().1 - incoming.sent_ms;
                engine.metrics.redis_pubsub_lag.observe(lag_ms.max(0) as f64 / 1000.0);
                deliver_in_order(engine, &*log, incoming).await?;
            }
            _ = ticker.tick() => {
                if let Some((_, since)) = outstanding {
                    if since.elapsed() > PROBE_DEADLINE {
                        tracing::warn!("redis subscription stopped delivering (probe lost); re-subscribing");
                        return Ok(());
                    }
                    continue;
                }
                *probes += 1;
                let n = *probes;
                let mut commands = engine.redis.commands();
                let sent: Result<u64, _> = redis::cmd("PUBLISH")
                    .arg(&probe_channel)
                    .arg(n)
                    .query_async(&mut commands)
                    .await;
                match sent {
                    Ok(_) => outstanding = Some((n, Instant::now())),
                    // Redis itself is unreachable: the link will tell.
                    Err(error) => {
                        engine.metrics.redis_errors.inc();
                        tracing::debug!(%error, "probe publish failed");
                        outstanding = Some((n, Instant::now()));
                    }
                }
            }
        }
    }
}

/// Applies `incoming`, first filling any gap before it from the history.
async fn deliver_in_order<A: Apply>(
    engine: &RedisLog,
    log: &A,
    incoming: Incoming,
) -> Result<(), LogError> {
    let stream = incoming.stream.clone();
    let epoch = incoming.epoch.clone();
    let seq = incoming.envelope.seq;
    let Err(head) = log.apply(incoming) else {
        return Ok(());
    };
    engine.metrics.redis_gap_fills.inc();
    fill(engine, log, &stream, &epoch, head, seq).await
}

/// Brings `stream` from `head` up to `to` from the history.
pub(super) async fn fill<A: Apply>(
    engine: &RedisLog,
    log: &A,
    stream: &StreamKey,
    epoch: &str,
    mut head: u64,
    to: u64,
) -> Result<(), LogError> {
    while head < to {
        let batch = engine.history(stream, head + 1, to).await?;
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            // Trimmed away since: what the node missed is gone.
            log.resync(stream, epoch, to, Vec::new());
            return Ok(());
        };
        if first.epoch != epoch {
            // Another epoch already: the subscriber will meet its messages.
            return Ok(());
        }
        let (first, last) = (first.envelope.seq, last.envelope.seq);
        if first > head + 1 {
            tracing::warn!(
                tenant = &*stream.tenant,
                missing_from = head + 1,
                "history no longer holds messages this node missed; resyncing the stream"
            );
            log.resync(stream, epoch, last, batch);
        } else {
            for incoming in batch {
                // Consecutive from the history: a refusal is a message already applied.
                let _ = log.apply(incoming);
            }
        }
        head = last;
    }
    Ok(())
}

/// After (re)subscribing: every stream up to its head in Redis; a stream
/// this node has that Redis lost gets a new epoch now, so its connections
/// are told at once instead of at the next publish.
async fn catch_up<A: Apply>(engine: &RedisLog, log: &Weak<A>) -> Result<(), LogError> {
    let mut heads = engine.heads().await?;
    let Some(log) = log.upgrade() else {
        return Ok(());
    };
    let local: std::collections::HashMap<StreamKey, (String, u64)> = log
        .local_heads()
        .into_iter()
        .map(|(key, epoch, head)| (key, (epoch, head)))
        .collect();
    // Channels are not in the set of streams: ask for those this node holds.
    let channels: Vec<StreamKey> = local
        .keys()
        .filter(|key| key.channel.is_some())
        .cloned()
        .collect();
    heads.extend(engine.heads_of(&channels).await?);
    let in_redis: std::collections::HashSet<&StreamKey> =
        heads.iter().map(|(key, _, _)| key).collect();
    for stream in local.keys() {
        if !in_redis.contains(stream) {
            let (epoch, head) = engine.ensure(stream, &new_epoch()).await?;
            tracing::warn!(
                tenant = &*stream.tenant,
                "redis no longer has this log (restarted empty?); it starts over with a new epoch"
            );
            log.resync(stream, &epoch, head, Vec::new());
        }
    }
    for (stream, epoch, head) in heads {
        let from = match local.get(&stream) {
            Some((local_epoch, local_head)) if *local_epoch == epoch => *local_head,
            Some(_) => {
                // Redis has another epoch for it: what this node holds is gone.
                log.resync(&stream, &epoch, 0, Vec::new());
                0
            }
            None => 0,
        };
        if head > from {
            fill(engine, &*log, &stream, &epoch, from, head).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_round_trips_with_its_frame_bytes_shared() {
        let frame = r#"{"type":"x","data":{},"id":"i","seq":7,"ts":"t"}"#;
        let payload = format!("7\nE1\n1234\nacme\nx\nu\"bo\\nb\"\n{frame}");
        let incoming = parse_payload(Bytes::from(payload)).unwrap();
        assert_eq!(incoming.stream, StreamKey::tenant("acme"));
        assert_eq!(incoming.epoch, "E1");
        assert_eq!(incoming.sent_ms, 1234);
        assert_eq!(incoming.envelope.seq, 7);
        assert_eq!(incoming.envelope.target, Target::User("bo\nb".into()));
        assert_eq!(incoming.envelope.text.as_str(), frame);
    }

    #[test]
    fn malformed_payloads_are_refused_not_panicked_on() {
        for junk in [
            "",
            "x",
            "1\ne\nnot-a-number\nt\nk\nb\n{}",
            "1\ne\n1\nt\nk\nz\n{}",
        ] {
            assert!(parse_payload(Bytes::from(junk)).is_none(), "{junk:?}");
        }
    }

    #[test]
    fn target_lines_round_trip() {
        for target in [
            Target::Broadcast,
            Target::Admins,
            Target::User("alice".into()),
            Target::User("a\nb\"c".into()),
        ] {
            assert_eq!(parse_target(&target_line(&target)), Some(target));
        }
    }
}
