//! The log: the protocol of a stream — `seq`, commit, cache, resume (SPEC
//! §4.3) — behind one handle, [`Log`], with the engines (memory, SQLite;
//! Redis later) behind it.
//!
//! A stream is named by a [`StreamKey`]: each tenant has one, and each of its
//! channels (SPEC §4.4) is just another key, not another code path. For each
//! stream the log keeps a [`StreamLog`] (epoch, committed head, bounded
//! history) that connections are served from, and which only ever holds
//! committed messages.
//!
//! Channels differ in their bounds ([`ChannelBounds`]) and in that they
//! expire: a channel not published to for `CHANNEL_HISTORY_TTL` is forgotten
//! (a new epoch, no history, its engine rows deleted, its subscribers closed
//! with 1012 so they resume and learn `complete:false`), whether a lookup or
//! the sweeper finds it first; a channel that never had a message (one that
//! was only subscribed to) goes after [`UNBORN_GRACE`] once nobody on this
//! node follows it. So no client can grow the streams map by naming channels.
//!
//! A message's path: [`Log::append`] has the engine choose its `seq` (under
//! the stream's *order* lock, which only appends take), serializes it once
//! into an [`Envelope`] and commits it. The committed message then goes, in
//! `seq` order, through ONE delivery step: under the stream's *cache* lock it
//! is pushed into the history and handed to the [`Sink`] (the hub), which
//! queues it for the addressed connections. Only then does `append` return
//! the receipt (the 202). With a durable engine that step is a tokio task fed
//! by the engine's commits, so the store's writer thread never fans out and
//! the order lock (what later appends wait for) is never held during a
//! fan-out; the writer wakes that task through the I/O driver (`doorbell`),
//! and the publisher waits for the delivery, which implies the commit. With
//! the memory engine there is nothing to wait for: the message is committed
//! and delivered at once, under the cache lock.
//!
//! A connection attaches under the same cache lock ([`Log::attach`]) and
//! takes its resume snapshot there, so every committed message is either in
//! its snapshot or delivered to it live — never both, never neither.
//!
//! Locks, always taken in this order: a stream's order lock, its cache lock,
//! then whatever the sink takes. The log never imports the hub: the hub
//! registers itself as the sink.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::auth::Role;

mod cache;
mod doorbell;
mod engine;
mod message;
pub mod redis;

pub use cache::StreamLog;
pub use engine::{Engine, LogStoreKind};
pub use message::{timestamp_with_ms, Envelope, Target};

/// Committed messages waiting for the delivery task. Full, it holds the
/// engine's committer back (backpressure) rather than growing.
const DELIVERY_QUEUE: usize = 4096;

/// Committed messages the delivery task takes in one go.
const DELIVERY_BATCH: usize = 256;

/// How long a channel that never had a message stays once nobody on this
/// node follows it (at most its TTL).
pub const UNBORN_GRACE: Duration = Duration::from_secs(60);

/// The name of a stream: a tenant's log, or one of its channels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamKey {
    pub tenant: Box<str>,
    pub channel: Option<Box<str>>,
}

impl StreamKey {
    /// The tenant's own log.
    pub fn tenant(name: &str) -> Self {
        StreamKey {
            tenant: name.into(),
            channel: None,
        }
    }

    /// One of the tenant's channels.
    pub fn channel(tenant: &str, channel: &str) -> Self {
        StreamKey {
            tenant: tenant.into(),
            channel: Some(channel.into()),
        }
    }

    /// The name the engines keep it under: the tenant, or `tenant#channel`
    /// (tenant names never hold `#`).
    pub fn name(&self) -> String {
        match &self.channel {
            None => self.tenant.to_string(),
            Some(channel) => format!(
                "{}{}{channel}",
                self.tenant,
                crate::store::CHANNEL_SEPARATOR
            ),
        }
    }

    /// The inverse of [`StreamKey::name`].
    pub fn from_name(name: &str) -> Self {
        match name.split_once(crate::store::CHANNEL_SEPARATOR) {
            None => StreamKey::tenant(name),
            Some((tenant, channel)) => StreamKey::channel(tenant, channel),
        }
    }
}

/// What a channel keeps (SPEC §4.4): `CHANNEL_HISTORY` messages, at most
/// `CHANNEL_HISTORY_BYTES` of them, for `CHANNEL_HISTORY_TTL` after its last publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelBounds {
    pub history: usize,
    pub history_bytes: usize,
    pub ttl: Duration,
}

impl From<&crate::config::ChannelSettings> for ChannelBounds {
    fn from(settings: &crate::config::ChannelSettings) -> Self {
        ChannelBounds {
            history: settings.history,
            history_bytes: settings.history_bytes,
            ttl: settings.ttl,
        }
    }
}

impl Default for ChannelBounds {
    /// The settings' defaults: one home for those numbers.
    fn default() -> Self {
        ChannelBounds::from(&crate::config::ChannelSettings::default())
    }
}

/// Why an append was not committed. Nothing of it reached a socket or the history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// The engine refused or failed to commit it (queue full, disk full,
    /// i/o): worth retrying later.
    #[error("the message log is unavailable: {0}")]
    Unavailable(String),
    /// The engine is shut down.
    #[error("the message log is closed")]
    Closed,
    /// The engine will never take it (e.g. a tenant name it cannot hold).
    #[error("{0}")]
    Invalid(String),
}

/// Where committed messages go: the hub, which queues them for connections.
pub trait Sink: Send + Sync + 'static {
    /// Delivers a committed message of `stream`; returns how many
    /// connections it addressed. Called in `seq` order per stream, under the
    /// stream's cache lock: it must not block nor call back into the log.
    fn deliver(&self, stream: &StreamKey, envelope: &Arc<Envelope>) -> usize;
    /// The stream's history changed under its connections (a new epoch, or
    /// messages this node missed and can no longer get): close them with
    /// 1012 so their clients resume. Called under the stream's cache lock.
    fn reset(&self, stream: &StreamKey);
    /// How many of this node's connections a message of `stream` to `target`
    /// would address now (the Redis engine adds the other nodes' counts).
    fn addressed(&self, stream: &StreamKey, target: &Target) -> usize;
}

/// What a resuming connection gets: the frames to replay and the summary frame.
#[derive(Debug)]
pub struct Replay {
    pub entries: Vec<Arc<Envelope>>,
    pub from: u64,
    pub to: u64,
    pub complete: bool,
}

/// A page of a channel's history (`GET /api/v1/channels/:channel/history`).
#[derive(Debug)]
pub struct Page {
    pub epoch: String,
    pub head: u64,
    pub complete: bool,
    pub entries: Vec<Arc<Envelope>>,
}

/// What a connection sees of its stream when it attaches.
#[derive(Debug)]
pub struct Snapshot {
    pub epoch: String,
    pub head: u64,
    /// Present when the client asked to resume.
    pub replay: Option<Replay>,
}

/// The answer to a committed append (SPEC §3: the 202 body).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Receipt {
    pub id: String,
    pub seq: u64,
    pub recipients: usize,
}

/// Clone-able handle to every stream of this node.
#[derive(Clone)]
pub struct Log {
    inner: Arc<Inner>,
}

struct Inner {
    /// Streams appear on first append or attach and live as long as the process.
    streams: RwLock<HashMap<StreamKey, Arc<Stream>>>,
    engine: Engine,
    history_size: usize,
    /// `HISTORY_BYTES`: frame text kept per stream, beside `history_size`.
    history_bytes: usize,
    channels: ChannelBounds,
    sink: Arc<OnceLock<Arc<dyn Sink>>>,
    /// Into the delivery task; only durable engines have one.
    delivery: Option<Committer>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("engine", &self.inner.engine)
            .field("history_size", &self.inner.history_size)
            .finish_non_exhaustive()
    }
}

struct Stream {
    key: StreamKey,
    /// The channel's name, shared by its envelopes; `None` for a tenant log.
    channel: Option<Arc<str>>,
    /// Unix ms of the last publish (or, before the first, of the last
    /// subscribe): a channel expires from it.
    touched_ms: AtomicI64,
    /// The next `seq` a durable engine hands out, held while a message is
    /// queued so that queue order is `seq` order. Never lowered: a seq whose
    /// commit failed after queueing stays a hole, never reused.
    order: Mutex<u64>,
    /// The committed messages, and the lock of delivery and attachment.
    cache: Mutex<StreamLog>,
    /// The engine has this stream's log (with our epoch): known once, so an
    /// append costs no engine round trip to check it.
    stored: AtomicBool,
}

/// The engine's committer's way into the delivery task: its queue, and the
/// bell that wakes it (see [`doorbell`]).
#[derive(Clone)]
struct Committer {
    queue: mpsc::Sender<Delivery>,
    /// None when no socket pair could be made: the queue's own wake-up then.
    bell: Option<Arc<doorbell::Bell>>,
}

impl Committer {
    /// On the engine's committer (the writer thread), never in the runtime.
    fn send(&self, delivery: Delivery) {
        // A gone delivery task (shutdown) drops `done`: the publisher hears `Closed`.
        if self.queue.blocking_send(delivery).is_ok() {
            if let Some(bell) = &self.bell {
                bell.ring();
            }
        }
    }
}

/// A committed message on its way to the delivery task.
struct Delivery {
    stream: Arc<Stream>,
    envelope: Arc<Envelope>,
    /// Hears the recipient count once delivered.
    done: oneshot::Sender<usize>,
}

impl Log {
    /// A log over `engine` keeping `history_size` messages (at most
    /// `history_bytes` of them) per stream in memory. With a durable engine
    /// this starts the delivery task, so call it inside the runtime.
    pub fn new(engine: Engine, history_size: usize, history_bytes: usize) -> Self {
        Log::with_channels(
            engine,
            history_size,
            history_bytes,
            ChannelBounds::default(),
        )
    }

    /// [`Log::new`] with the channels' bounds; starts the sweeper that
    /// forgets idle channels.
    pub fn with_channels(
        engine: Engine,
        history_size: usize,
        history_bytes: usize,
        channels: ChannelBounds,
    ) -> Self {
        let sink: Arc<OnceLock<Arc<dyn Sink>>> = Arc::default();
        let delivery = engine.is_queued().then(|| {
            let (queue, rx) = mpsc::channel(DELIVERY_QUEUE);
            let (bell, door) = match doorbell::pair() {
                Ok((bell, door)) => (Some(Arc::new(bell)), Some(door)),
                Err(error) => {
                    tracing::warn!(%error, "no socket pair for the delivery task's bell; using its queue's wake-up");
                    (None, None)
                }
            };
            tokio::spawn(deliver_committed(rx, door, sink.clone()));
            Committer { queue, bell }
        });
        let inner = Arc::new(Inner {
            streams: RwLock::default(),
            engine,
            history_size,
            history_bytes,
            channels,
            sink,
            delivery,
        });
        // Outside a runtime (a unit test of the memory engine) nothing expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep_channels(Arc::downgrade(&inner)));
        }
        if let Engine::Redis(engine) = &inner.engine {
            tokio::spawn(redis::subscriber(
                (**engine).clone(),
                Arc::downgrade(&inner),
            ));
        }
        Log { inner }
    }

    /// With the Redis engine: whether this node is subscribed and caught up
    /// (always true for the others).
    pub fn ready(&self) -> bool {
        match &self.inner.engine {
            Engine::Redis(engine) => engine.health().ready(),
            _ => true,
        }
    }

    /// Waits (at most `limit`) until [`Log::ready`], so a node serves only
    /// once it holds every stream of the shared Redis.
    pub async fn wait_ready(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.ready() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        true
    }

    /// Where committed messages go from now on (set once; later calls are ignored).
    pub fn set_sink(&self, sink: Arc<dyn Sink>) {
        if self.inner.sink.set(sink).is_err() {
            tracing::warn!("the log already has a sink; ignoring another");
        }
    }

    /// Loads the streams the engine kept (before serving), off the async
    /// threads; returns how many streams and messages it found.
    pub async fn restore(&self) -> Result<(usize, usize), LogError> {
        let engine = self.inner.engine.clone();
        let (history, bytes) = (self.inner.history_size, self.inner.history_bytes);
        let inner = Arc::clone(&self.inner);
        let loaded =
            tokio::task::spawn_blocking(move || engine.load(history, bytes, |k| inner.bounds(k)))
                .await
                .map_err(|e| LogError::Unavailable(format!("log load task failed: {e}")))??;
        let now = now_ms();
        let mut counts = (0, 0);
        let mut streams = self.write_streams();
        for (key, log, touched_ms) in loaded {
            if self
                .inner
                .ttl_ms(&key)
                .is_some_and(|ttl| now - touched_ms >= ttl)
            {
                // Expired while the server was down: forgotten, not loaded.
                if let Engine::Sqlite(store) = &self.inner.engine {
                    let _ = store.forget_log(&key.name());
                }
                continue;
            }
            counts = (counts.0 + 1, counts.1 + log.len());
            let stream = Stream::new(key.clone(), log, true, touched_ms);
            streams.insert(key, Arc::new(stream));
        }
        Ok(counts)
    }

    /// Commits a message to `key`'s stream and delivers it. `Ok` (the 202)
    /// means committed: in the engine, in the history, handed to the sink.
    pub async fn append(
        &self,
        key: &StreamKey,
        kind: &str,
        data: &Value,
        target: Target,
    ) -> Result<Receipt, LogError> {
        let stream = self.stream(key);
        if let Engine::Redis(engine) = &self.inner.engine {
            let id = uuid::Uuid::new_v4().to_string();
            let (ts, ts_ms) = timestamp_with_ms();
            // Redis picks the seq; every node delivers from its subscriber.
            let (head, tail) =
                Envelope::frame_around_seq(stream.channel.as_deref(), kind, data, &id, &ts);
            let limits = self.inner.bounds(key);
            let ttl = self.inner.ttl_ms(key);
            let published = engine
                .publish(key, kind, &target, (&head, &tail), data, ts_ms, limits, ttl)
                .await?;
            stream.touched_ms.store(ts_ms, Ordering::Release);
            // The script counted the other nodes; this node's own count is exact.
            let here = self
                .inner
                .sink
                .get()
                .map_or(0, |sink| sink.addressed(key, &target));
            return Ok(Receipt {
                id,
                seq: published.seq,
                recipients: published.recipients.saturating_add(here),
            });
        }
        if !stream.stored.load(Ordering::Acquire) {
            self.ensure_stored(&stream).await?;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let (ts, ts_ms) = timestamp_with_ms();
        stream.touched_ms.store(ts_ms, Ordering::Release);
        let channel = stream.channel.as_ref();
        let Some(delivery) = &self.inner.delivery else {
            // Memory: committed the moment it is in the history.
            let mut cache = stream.lock_cache();
            let seq = cache.head() + 1;
            let envelope = Arc::new(Envelope::encode_in(
                channel, kind, data, &id, seq, &ts, target,
            ));
            cache.push(Arc::clone(&envelope));
            let recipients = deliver(&self.inner.sink, key, &envelope);
            return Ok(Receipt {
                id,
                seq,
                recipients,
            });
        };
        let (done, delivered) = oneshot::channel();
        let (seq, commit) = {
            let mut next = stream.lock_order();
            let seq = *next;
            let envelope = Arc::new(Envelope::encode_in(
                channel, kind, data, &id, seq, &ts, target,
            ));
            let entry = engine::Entry {
                data,
                id: &id,
                ts_ms,
                envelope: &envelope,
            };
            let on_commit: Box<dyn FnOnce() + Send> = {
                let (delivery, stream, envelope) =
                    (delivery.clone(), Arc::clone(&stream), Arc::clone(&envelope));
                Box::new(move || {
                    delivery.send(Delivery {
                        stream,
                        envelope,
                        done,
                    })
                })
            };
            // `Err`: never queued, so `seq` is free for the next append.
            let commit = self.inner.engine.append(key, entry, on_commit)?;
            *next = seq + 1;
            (seq, commit)
        };
        // A failure leaves `seq` as a hole that nobody saw (no socket, no
        // replay, no head): this process never hands it out again.
        // The delivery is awaited, not the commit: `on_commit` runs only
        // after COMMIT succeeded, so a delivery means committed. Waiting on
        // the commit as well would have the writer thread wake this task,
        // which queues it behind the connections the fan-out woke (see
        // `doorbell`); the delivery task wakes it from the runtime instead.
        match delivered.await {
            Ok(recipients) => Ok(Receipt {
                id,
                seq,
                recipients,
            }),
            // Not delivered: the commit failed (its error), or shutdown.
            Err(_) => {
                commit.await?;
                Err(LogError::Closed)
            }
        }
    }

    /// With the Redis engine, before a connection attaches to `key`: learns
    /// the stream's epoch from Redis (creating its log if new), so a client
    /// that connected before the first publish can resume; and brings this
    /// node up to the head Redis has, so the connection is told (and resumes
    /// from) every message acknowledged before it connected, even one whose
    /// pub/sub copy is still on its way (or its subscription is being
    /// re-made). Redis unreachable: the connection gets what this node has,
    /// after at most the response timeout, and the next one tries again.
    ///
    /// With SQLite, before a subscription to a channel: stores the channel's
    /// log (with the epoch the subscriber is about to be told) if it has
    /// none yet, so that epoch outlives a restart.
    pub async fn prepare(&self, key: &StreamKey) {
        // Boxed: every connection's task holds room for its largest await
        // for as long as it lives, and the Redis round trips are large.
        match &self.inner.engine {
            Engine::Redis(engine) => Box::pin(self.catch_up_with_redis(engine, key)).await,
            Engine::Sqlite(_) if key.channel.is_some() => {
                let stream = self.stream(key);
                if !stream.stored.load(Ordering::Acquire) {
                    // Failing, the subscriber is told the epoch memory has.
                    let _ = Box::pin(self.ensure_stored(&stream)).await;
                }
            }
            _ => {}
        }
    }

    async fn catch_up_with_redis(&self, engine: &redis::RedisLog, key: &StreamKey) {
        let stream = self.stream(key);
        let epoch = stream.lock_cache().epoch().to_owned();
        let Ok((stored, stored_head)) = engine.ensure(key, &epoch).await else {
            return;
        };
        let local_head = {
            let mut cache = stream.lock_cache();
            // Only an unborn stream takes it: messages bring their epoch otherwise.
            if cache.head() == 0 && cache.epoch() != stored {
                cache.adopt(stored.clone(), 0);
            }
            stream.stored.store(true, Ordering::Release);
            (cache.epoch() == stored).then_some(cache.head())
        };
        if let Some(head) = local_head.filter(|head| *head < stored_head) {
            // Racing the subscriber is harmless: a message applies once.
            let _ = redis::fill(engine, &*self.inner, key, &stored, head, stored_head).await;
        }
    }

    /// Attaches a connection to `key`'s stream: runs `join` (the sink
    /// registering it) and takes its snapshot, with resume from `resume`
    /// (since, epoch) for `user` acting as `role`, under the cache lock, so
    /// no commit falls between the two.
    /// A resume without an epoch (a channel's `since` alone) is taken in
    /// whatever epoch the stream has.
    pub fn attach<R, E>(
        &self,
        key: &StreamKey,
        resume: Option<(u64, Option<&str>)>,
        user: &str,
        role: Role,
        join: impl FnOnce() -> Result<R, E>,
    ) -> Result<(R, Snapshot), E> {
        let stream = self.stream(key);
        let cache = stream.lock_cache();
        let joined = join()?;
        if stream.channel.is_some() && cache.head() == 0 {
            // Followed, so not abandoned: the unborn grace starts again.
            stream.touched_ms.store(now_ms(), Ordering::Release);
        }
        let snapshot = Snapshot {
            epoch: cache.epoch().to_owned(),
            head: cache.head(),
            replay: resume.map(|(since, epoch)| {
                cache.resume(since, epoch.unwrap_or(cache.epoch()), user, role)
            }),
        };
        Ok((joined, snapshot))
    }

    /// The stream's `(epoch, head)` now.
    pub fn head(&self, key: &StreamKey) -> (String, u64) {
        let stream = self.stream(key);
        let cache = stream.lock_cache();
        (cache.epoch().to_owned(), cache.head())
    }

    /// The channel's messages after `since` (in `epoch`, or in whatever
    /// epoch it has), oldest first, at most `limit`.
    pub fn page(&self, key: &StreamKey, since: u64, epoch: Option<&str>, limit: usize) -> Page {
        let stream = self.stream(key);
        let cache = stream.lock_cache();
        let replay = cache.page(since, epoch.unwrap_or(cache.epoch()), limit);
        Page {
            epoch: cache.epoch().to_owned(),
            head: cache.head(),
            complete: replay.complete,
            entries: replay.entries,
        }
    }

    /// Channel streams this node holds (for stats and metrics).
    pub fn channel_count(&self) -> usize {
        self.inner
            .streams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .filter(|key| key.channel.is_some())
            .count()
    }

    /// The `seq` the next durable append of `key` gets (memory: head + 1).
    #[cfg(test)]
    pub(crate) fn next_seq(&self, key: &StreamKey) -> u64 {
        let stream = self.stream(key);
        let next = *stream.lock_order();
        match self.inner.delivery {
            Some(_) => next,
            None => stream.lock_cache().head() + 1,
        }
    }

    /// Creates the stream's log in the engine with the epoch memory already
    /// uses (connections may have been told it), then remembers that it exists.
    async fn ensure_stored(&self, stream: &Stream) -> Result<(), LogError> {
        let epoch = stream.lock_cache().epoch().to_owned();
        let (stored_epoch, stored_head) = self.inner.engine.ensure(&stream.key, &epoch).await?;
        let mut next = stream.lock_order();
        let mut cache = stream.lock_cache();
        if stored_epoch != cache.epoch() || stored_head > cache.head() {
            if stream.key.channel.is_none() {
                tracing::warn!(
                    tenant = &*stream.key.tenant,
                    "the engine already had this log; adopting its epoch and head"
                );
            }
            cache.adopt(stored_epoch, stored_head);
        }
        *next = (*next).max(cache.head() + 1);
        stream.stored.store(true, Ordering::Release);
        Ok(())
    }

    /// The stream of `key`, made if new; a channel past its TTL is
    /// forgotten first.
    fn stream(&self, key: &StreamKey) -> Arc<Stream> {
        let stream = self.inner.stream(key);
        self.inner.expire_if_idle(&stream, now_ms());
        stream
    }

    fn write_streams(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<StreamKey, Arc<Stream>>> {
        self.inner.write_streams()
    }
}

impl Inner {
    fn stream(&self, key: &StreamKey) -> Arc<Stream> {
        if let Some(stream) = self
            .streams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return Arc::clone(stream);
        }
        // SQLite logs learn their row on first append, Redis ones their
        // epoch on first connection (`Log::prepare`).
        let stored = matches!(self.engine, Engine::Memory);
        let (history, bytes) = self.bounds(key);
        Arc::clone(self.write_streams().entry(key.clone()).or_insert_with(|| {
            let log = StreamLog::new(history, bytes);
            Arc::new(Stream::new(key.clone(), log, stored, now_ms()))
        }))
    }

    /// A stream this node already holds.
    fn held(&self, key: &StreamKey) -> Option<Arc<Stream>> {
        self.streams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// `(messages, bytes)` the stream's history keeps.
    fn bounds(&self, key: &StreamKey) -> (usize, usize) {
        match key.channel {
            None => (self.history_size, self.history_bytes),
            Some(_) => (self.channels.history, self.channels.history_bytes),
        }
    }

    /// A channel's TTL in ms; `None` for a tenant log, which never expires.
    fn ttl_ms(&self, key: &StreamKey) -> Option<i64> {
        key.channel
            .as_ref()
            .map(|_| i64::try_from(self.channels.ttl.as_millis()).unwrap_or(i64::MAX))
    }

    /// Forgets a channel with messages not published to for its TTL: a new epoch and no history, its engine log deleted, its
    /// subscribers closed with 1012. Returns whether it did.
    fn expire_if_idle(&self, stream: &Stream, now: i64) -> bool {
        let Some(ttl) = self.ttl_ms(&stream.key) else {
            return false;
        };
        if now.saturating_sub(stream.touched_ms.load(Ordering::Acquire)) < ttl {
            return false;
        }
        let mut next = stream.lock_order();
        let mut cache = stream.lock_cache();
        // Looked at again under the locks: a publish may have come in between.
        // A channel without a message has nothing to forget (the sweeper
        // drops it once abandoned).
        if now.saturating_sub(stream.touched_ms.load(Ordering::Acquire)) < ttl || cache.head() == 0
        {
            return false;
        }
        let (history, bytes) = self.bounds(&stream.key);
        *cache = StreamLog::new(history, bytes);
        *next = 1;
        stream.touched_ms.store(now, Ordering::Release);
        let was_stored = stream
            .stored
            .swap(matches!(self.engine, Engine::Memory), Ordering::AcqRel);
        if let (Engine::Sqlite(store), true) = (&self.engine, was_stored) {
            // Queued under the order lock: after every append of the old
            // epoch, before any of the new one.
            if let Err(error) = store.forget_log(&stream.key.name()) {
                tracing::warn!(%error, "could not delete an expired channel's log; the next start does");
            }
        }
        reset(&self.sink, &stream.key);
        true
    }

    /// One pass of the sweeper: expires idle channels, and drops from memory
    /// the channels without a message that nobody here follows and nobody
    /// subscribed to for [`UNBORN_GRACE`] (SQLite: their rows too). Returns
    /// the followed channels without a message, with their epochs: Redis
    /// forgets those after a grace unless told again ([`redis::RedisLog::ensure`]).
    fn sweep(&self, now: i64) -> Vec<(StreamKey, String)> {
        let channels: Vec<Arc<Stream>> = self
            .streams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|stream| stream.channel.is_some())
            .cloned()
            .collect();
        let grace = i64::try_from(UNBORN_GRACE.min(self.channels.ttl).as_millis()).unwrap_or(0);
        let (mut unborn, mut followed) = (Vec::new(), Vec::new());
        for stream in channels {
            self.expire_if_idle(&stream, now);
            let (head, epoch) = {
                let cache = stream.lock_cache();
                (cache.head(), cache.epoch().to_owned())
            };
            if head > 0 {
                continue;
            }
            if self.followers(&stream.key) > 0 {
                followed.push((stream.key.clone(), epoch));
            } else if now.saturating_sub(stream.touched_ms.load(Ordering::Acquire)) >= grace {
                unborn.push(stream.key.clone());
            }
        }
        if unborn.is_empty() {
            return followed;
        }
        let mut streams = self.write_streams();
        for key in unborn {
            // Only if nothing took the stream meanwhile (a publish, a subscribe).
            let Some(stream) = streams.get(&key) else {
                continue;
            };
            if Arc::strong_count(stream) > 1 || stream.lock_cache().head() > 0 {
                continue;
            }
            if let (Engine::Sqlite(store), true) =
                (&self.engine, stream.stored.load(Ordering::Acquire))
            {
                let _ = store.forget_log(&key.name());
            }
            streams.remove(&key);
        }
        followed
    }

    /// This node's connections following `key` (a channel's subscribers).
    fn followers(&self, key: &StreamKey) -> usize {
        self.sink
            .get()
            .map_or(0, |sink| sink.addressed(key, &Target::Broadcast))
    }

    fn write_streams(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<StreamKey, Arc<Stream>>> {
        self.streams.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// The Redis subscriber's way in: messages of every node, applied in seq
/// order per stream, into the same cache and sink as local commits.
impl redis::Apply for Inner {
    fn apply(&self, incoming: redis::Incoming) -> Result<(), u64> {
        let stream = match incoming.stream.channel {
            None => self.stream(&incoming.stream),
            // A channel nobody here follows nor read: not this node's business.
            Some(_) => match self.held(&incoming.stream) {
                Some(stream) => stream,
                None => return Ok(()),
            },
        };
        let mut cache = stream.lock_cache();
        if cache.epoch() != incoming.epoch {
            if cache.head() == 0 {
                // Nothing delivered yet: the first message names the epoch.
                cache.adopt(incoming.epoch, 0);
            } else {
                // Redis lost this log and began another: start over.
                let (history, bytes) = self.bounds(&stream.key);
                *cache = StreamLog::with_epoch(incoming.epoch, history, bytes);
                reset(&self.sink, &stream.key);
            }
        }
        stream.touched_ms.store(incoming.sent_ms, Ordering::Release);
        let (head, seq) = (cache.head(), incoming.envelope.seq);
        if seq <= head {
            return Ok(());
        }
        if seq > head + 1 {
            return Err(head);
        }
        cache.push(Arc::clone(&incoming.envelope));
        deliver(&self.sink, &stream.key, &incoming.envelope);
        Ok(())
    }

    fn resync(&self, key: &StreamKey, epoch: &str, head: u64, entries: Vec<redis::Incoming>) {
        let stream = self.stream(key);
        let mut cache = stream.lock_cache();
        let (history, bytes) = self.bounds(key);
        *cache = StreamLog::restore(
            epoch.to_owned(),
            head,
            entries.into_iter().map(|incoming| incoming.envelope),
            history,
            bytes,
        );
        reset(&self.sink, key);
    }

    fn local_heads(&self) -> Vec<(StreamKey, String, u64)> {
        let streams: Vec<Arc<Stream>> = self
            .streams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        streams
            .iter()
            .filter_map(|stream| {
                let cache = stream.lock_cache();
                (cache.head() > 0)
                    .then(|| (stream.key.clone(), cache.epoch().to_owned(), cache.head()))
            })
            .collect()
    }
}

impl Stream {
    fn new(key: StreamKey, log: StreamLog, stored: bool, touched_ms: i64) -> Self {
        Stream {
            channel: key.channel.as_deref().map(Arc::from),
            touched_ms: AtomicI64::new(touched_ms),
            order: Mutex::new(log.head() + 1),
            cache: Mutex::new(log),
            stored: AtomicBool::new(stored),
            key,
        }
    }

    // Every critical section leaves its state consistent, so a poisoned lock is usable.
    fn lock_order(&self) -> MutexGuard<'_, u64> {
        self.order.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_cache(&self) -> MutexGuard<'_, StreamLog> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn deliver(sink: &OnceLock<Arc<dyn Sink>>, key: &StreamKey, envelope: &Arc<Envelope>) -> usize {
    sink.get().map_or(0, |sink| sink.deliver(key, envelope))
}

fn reset(sink: &OnceLock<Arc<dyn Sink>>, key: &StreamKey) {
    if let Some(sink) = sink.get() {
        sink.reset(key);
    }
}

/// Now in Unix ms, the clock channel expiry runs on.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Expires idle channels and drops abandoned ones, every tenth of the TTL
/// (between 100 ms and a minute), until the log is dropped.
async fn sweep_channels(log: std::sync::Weak<Inner>) {
    let period = match log.upgrade() {
        Some(inner) => {
            (inner.channels.ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(60))
        }
        None => return,
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(inner) = log.upgrade() else {
            return;
        };
        let followed = inner.sweep(now_ms());
        if let Engine::Redis(engine) = &inner.engine {
            for (key, epoch) in followed {
                // Unreachable Redis: the next pass tries again.
                let _ = engine.ensure(&key, &epoch).await;
            }
        }
    }
}

/// The delivery step of durable engines: committed messages, in commit
/// order (`seq` order per stream), into their stream's history and the sink.
/// Consecutive messages of one stream share one take of its cache lock.
async fn deliver_committed(
    mut committed: mpsc::Receiver<Delivery>,
    mut door: Option<doorbell::Door>,
    sink: Arc<OnceLock<Arc<dyn Sink>>>,
) {
    let mut batch = Vec::with_capacity(DELIVERY_BATCH);
    while next_committed(&mut committed, &mut door, &mut batch).await {
        let mut items = batch.drain(..).peekable();
        while let Some(first) = items.next() {
            let stream = Arc::clone(&first.stream);
            let mut cache = stream.lock_cache();
            let mut next = Some(first);
            while let Some(item) = next {
                let recipients = if cache.push(Arc::clone(&item.envelope)) {
                    deliver(&sink, &stream.key, &item.envelope)
                } else {
                    0
                };
                // The publisher may have given up waiting; the message stands.
                let _ = item.done.send(recipients);
                next = items.next_if(|n| Arc::ptr_eq(&n.stream, &stream));
            }
        }
    }
}

/// Fills `batch` with the next committed messages (up to
/// [`DELIVERY_BATCH`]), waiting on the door for them when there is one;
/// false once every committer is gone and the queue is empty.
async fn next_committed(
    committed: &mut mpsc::Receiver<Delivery>,
    door: &mut Option<doorbell::Door>,
    batch: &mut Vec<Delivery>,
) -> bool {
    use mpsc::error::TryRecvError;
    loop {
        let Some(waiting) = door else {
            return committed.recv_many(batch, DELIVERY_BATCH).await > 0;
        };
        while batch.len() < DELIVERY_BATCH {
            match committed.try_recv() {
                Ok(delivery) => batch.push(delivery),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return !batch.is_empty(),
            }
        }
        if !batch.is_empty() {
            return true;
        }
        // Newly armed: look once more, a commit may have come in between.
        if !waiting.arm() && !waiting.wait().await {
            // The bell is gone; the queue tells when its senders are too.
            *door = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::TempDir;
    use crate::store::Store;

    /// Records the thread each delivery ran on.
    #[derive(Default)]
    struct Threads(Mutex<Vec<Option<String>>>);

    impl Sink for Threads {
        fn deliver(&self, _: &StreamKey, _: &Arc<Envelope>) -> usize {
            let name = std::thread::current().name().map(str::to_owned);
            self.0.lock().unwrap().push(name);
            1
        }

        fn reset(&self, _: &StreamKey) {}

        fn addressed(&self, _: &StreamKey, _: &Target) -> usize {
            0
        }
    }

    /// The store's writer thread only commits: the fan-out (the sink) runs
    /// in the log's delivery step, so no commit waits behind a fan-out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durable_commits_are_delivered_off_the_writer_thread_in_seq_order() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        let log = Log::new(Engine::Sqlite(store.clone()), 100, usize::MAX);
        let threads = Arc::new(Threads::default());
        log.set_sink(threads.clone());
        let key = StreamKey::tenant("t");
        let data = serde_json::json!({});
        let publishes = (0..20).map(|_| log.append(&key, "x", &data, Target::Broadcast));
        let receipts = futures_util::future::join_all(publishes).await;
        let mut seqs: Vec<u64> = receipts.iter().map(|r| r.as_ref().unwrap().seq).collect();
        assert!(receipts.iter().all(|r| r.as_ref().unwrap().recipients == 1));
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        let threads = threads.0.lock().unwrap().clone();
        assert_eq!(threads.len(), 20);
        assert!(
            threads
                .iter()
                .all(|t| t.as_deref() != Some("agentcast-store")),
            "{threads:?}"
        );
        let snapshot = log.attach(&key, Some((0, Some(""))), "u", Role::User, || {
            Ok::<_, ()>(())
        });
        assert_eq!(snapshot.unwrap().1.head, 20);
        store.close().await;
    }

    /// Every connection's task keeps room for its largest await for as long
    /// as it lives: `prepare` (Redis round trips, a history fill) must stay
    /// a small future, or idle connections grow (issue 9: 4.8 → 5.2 KiB
    /// each at 19k connections before it was boxed).
    #[tokio::test]
    async fn the_prepare_future_a_connection_task_holds_stays_small() {
        let log = Log::new(Engine::Memory, 100, usize::MAX);
        let key = StreamKey::tenant("t");
        let prepare = log.prepare(&key);
        let size = std::mem::size_of_val(&prepare);
        assert!(size <= 64, "prepare's future is {size} bytes");
        prepare.await;
    }

    /// The publisher waits for the delivery rather than the commit (issue
    /// 9): a commit the engine refuses still answers with the engine's
    /// error, not `Closed`, and delivers nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_commit_answers_with_the_engines_error_and_delivers_nothing() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        let log = Log::new(Engine::Sqlite(store.clone()), 100, usize::MAX);
        let threads = Arc::new(Threads::default());
        log.set_sink(threads.clone());
        let key = StreamKey::tenant("t");
        let data = serde_json::json!({});
        log.append(&key, "x", &data, Target::Broadcast)
            .await
            .unwrap();
        // Seq 2 taken behind the log's back: the log's next append conflicts.
        let taken = crate::store::StoredMessage {
            tenant: "t".into(),
            seq: 2,
            target: crate::store::StoredTarget::Broadcast,
            kind: "x".into(),
            body: "{}".into(),
            id: "elsewhere".into(),
            ts_ms: 0,
            view: None,
        };
        store.append(taken, Box::new(|| {})).await.unwrap();
        let refused = log.append(&key, "x", &data, Target::Broadcast).await;
        assert!(
            matches!(refused, Err(LogError::Unavailable(_))),
            "{refused:?}"
        );
        assert_eq!(threads.0.lock().unwrap().len(), 1, "nothing delivered");
        store.close().await;
    }

    /// Channels expire (issue 10): an idle one is forgotten by the sweeper
    /// (a new epoch, no history, seq from 1 again), and one without a
    /// message that nobody follows is dropped after the unborn grace.
    #[tokio::test]
    async fn an_idle_channel_is_forgotten_and_an_abandoned_empty_one_dropped() {
        let bounds = ChannelBounds {
            ttl: Duration::from_secs(10),
            ..ChannelBounds::default()
        };
        let log = Log::with_channels(Engine::Memory, 100, usize::MAX, bounds);
        let key = StreamKey::channel("t", "task:1");
        let data = serde_json::json!({});
        log.append(&key, "x", &data, Target::Broadcast)
            .await
            .unwrap();
        let (epoch, head) = log.head(&key);
        assert_eq!(head, 1);
        let now = now_ms();
        log.inner.sweep(now + 9_000);
        assert_eq!(log.head(&key), (epoch.clone(), 1), "not idle yet");
        log.inner.sweep(now + 10_000);
        let held = log.inner.held(&key).unwrap();
        let (new_epoch, head) = {
            let cache = held.lock_cache();
            (cache.epoch().to_owned(), cache.head())
        };
        drop(held);
        assert_eq!(head, 0, "forgotten");
        assert_ne!(new_epoch, epoch, "a new epoch");
        assert_eq!(log.channel_count(), 1, "kept for the grace");
        log.inner.sweep(now + 10_000 + 60_000);
        assert_eq!(log.channel_count(), 0, "dropped");
        let receipt = log
            .append(&key, "x", &data, Target::Broadcast)
            .await
            .unwrap();
        assert_eq!(receipt.seq, 1);
        // Tenant logs never expire.
        let tenant = StreamKey::tenant("t");
        log.append(&tenant, "x", &data, Target::Broadcast)
            .await
            .unwrap();
        log.inner.sweep(now + 365 * 86_400_000);
        assert_eq!(log.head(&tenant).1, 1);
    }
}
