//! [`Engine`]: where streams are kept beyond the in-memory cache, chosen at
//! start (`LOG_STORE`). Only [`super::Log`] talks to it; the hub does not
//! know which engine answers.
//!
//! - `memory`: nothing to wait for; the log commits a message at once, under
//!   the stream's cache lock. A restart forgets every log (a new epoch).
//! - `sqlite`: the log picks the `seq` under the stream's order lock and
//!   queues the message on the store's writer, so queue order is `seq` order;
//!   the writer's `on_commit` only hands the committed message to the log's
//!   delivery task, in that order.
//!
//! - `redis` (`REDIS_URL`): the Redis script picks the `seq`; every node,
//!   the publishing one included, delivers from its subscriber (see
//!   [`super::redis`]).

use std::sync::Arc;
use std::time::Instant;

use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{Envelope, LogError, StreamKey, StreamLog, Target};
use crate::store::{Store, StoreError, StoredMessage, StoredTarget, ViewUpdate};

pub use crate::config::LogStoreKind;

/// The engine behind the streams. Cloning is cheap.
#[derive(Debug, Clone)]
pub enum Engine {
    Memory,
    Sqlite(Store),
    Redis(Box<super::redis::RedisLog>),
}

/// Resolves when the message's transaction committed (or failed).
pub(super) type Commit =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;

impl From<StoreError> for LogError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Invalid(text) => LogError::Invalid(text),
            StoreError::Closed => LogError::Closed,
            other => LogError::Unavailable(other.to_string()),
        }
    }
}

impl Engine {
    /// Whether the log picks the `seq` and queues each message on this
    /// engine's committer (SQLite), as opposed to committing at once
    /// (memory) or having the engine pick it (Redis).
    pub fn is_queued(&self) -> bool {
        matches!(self, Engine::Sqlite(_))
    }

    /// Queues a message whose `seq` was just chosen, for a durable engine.
    /// Never blocks: the log calls this under the stream's order lock.
    /// `on_commit` runs (on the writer thread) once the message committed;
    /// it is dropped unrun if it never does. `Err` means it never got
    /// anywhere (queue full, store closed).
    pub(super) fn append(
        &self,
        key: &StreamKey,
        entry: Entry<'_>,
        on_commit: Box<dyn FnOnce() + Send>,
    ) -> Result<Commit, LogError> {
        let Engine::Sqlite(store) = self else {
            return Err(LogError::Invalid("the memory engine queues nothing".into()));
        };
        let message = StoredMessage {
            tenant: key.name(),
            seq: entry.envelope.seq,
            target: stored_target(&entry.envelope.target),
            kind: entry.envelope.kind.to_string(),
            body: entry.envelope.text.as_str().to_owned(),
            id: entry.id.to_owned(),
            ts_ms: entry.ts_ms,
            // Channels change no view: those follow the tenant log (SPEC §5).
            view: match key.channel {
                None => ViewUpdate::of(&entry.envelope.kind, entry.data),
                Some(_) => None,
            },
        };
        Ok(Box::pin(store.try_append(message, on_commit)?))
    }

    /// Makes sure the stream has a log in the engine, created with `epoch`
    /// if new; returns the engine's `(epoch, head)` for it.
    pub(super) async fn ensure(
        &self,
        key: &StreamKey,
        epoch: &str,
    ) -> Result<(String, u64), LogError> {
        match self {
            Engine::Memory => Ok((epoch.to_owned(), 0)),
            Engine::Redis(redis) => redis.ensure(key, epoch).await,
            Engine::Sqlite(store) => Ok(store
                .ensure_log_with_epoch(&key.name(), epoch.to_owned())
                .await?),
        }
    }

    /// Every stored stream, rebuilt with its newest `history` messages of
    /// at most `history_bytes` in all. Blocking (reads the whole history):
    /// call it in `spawn_blocking`.
    /// `bounds` gives a stream's `(messages, bytes)` (the store trims channel
    /// logs by its own channel bounds already). Each stream comes with when
    /// it was last written to (Unix ms).
    pub(super) fn load(
        &self,
        history: usize,
        history_bytes: usize,
        bounds: impl Fn(&StreamKey) -> (usize, usize),
    ) -> Result<Vec<(StreamKey, StreamLog, i64)>, LogError> {
        let Engine::Sqlite(store) = self else {
            return Ok(Vec::new());
        };
        let logs = store.load_logs(history, history_bytes)?;
        Ok(logs
            .into_iter()
            .map(|stored| {
                let loaded_at = Instant::now();
                let key = StreamKey::from_name(&stored.tenant);
                let channel: Option<Arc<str>> = key.channel.as_deref().map(Arc::from);
                let (history, history_bytes) = bounds(&key);
                let envelopes = stored.history.into_iter().map(|message| {
                    Arc::new(Envelope {
                        seq: message.seq,
                        target: target_of(message.target),
                        kind: message.kind.into_boxed_str(),
                        text: Utf8Bytes::from(message.body),
                        published_at: loaded_at,
                        channel: channel.clone(),
                    })
                });
                let log = StreamLog::restore(
                    stored.epoch,
                    stored.head,
                    envelopes,
                    history,
                    history_bytes,
                );
                (key, log, stored.touched_ms)
            })
            .collect())
    }
}

/// What the engine keeps of a message besides its envelope.
#[derive(Debug)]
pub(super) struct Entry<'a> {
    /// The message's `data`, for the views a `task_update` or `agent_update` changes.
    pub data: &'a serde_json::Value,
    pub id: &'a str,
    pub ts_ms: i64,
    pub envelope: &'a Envelope,
}

fn stored_target(target: &Target) -> StoredTarget {
    match target {
        Target::Broadcast => StoredTarget::Broadcast,
        Target::User(user) => StoredTarget::User(user.to_string()),
        Target::Admins => StoredTarget::Admins,
    }
}

fn target_of(stored: StoredTarget) -> Target {
    match stored {
        StoredTarget::Broadcast => Target::Broadcast,
        StoredTarget::User(user) => Target::User(user.into_boxed_str()),
        StoredTarget::Admins => Target::Admins,
    }
}
