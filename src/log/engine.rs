//! [`LogStore`]: where tenant logs are kept beyond the in-memory cache,
//! chosen at start (`LOG_STORE`). The hub only calls [`LogStore::append`],
//! [`LogStore::ensure`] and [`LogStore::load`]; its fan-out code does not
//! know which engine answers.
//!
//! - `memory`: nothing to wait for, the hub commits a message at once, under
//!   the tenant lock it already holds. A restart forgets every log (a new epoch).
//! - `sqlite`: the message goes to the store's writer queue; the writer calls
//!   the hub back (`on_commit`) after the group commit that holds it, in
//!   queue order, which is `seq` order because the hub queues under its lock.
//!
//! A Redis engine would slot in as a third variant: the same `Queued` answer,
//! with the callback run after its atomic append.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::TenantLog;
use crate::hub::wire::{Envelope, Target};
use crate::store::{Store, StoreError, StoredMessage, StoredTarget, ViewUpdate};

/// Runs once the message is committed (on the store's writer thread).
pub type OnCommit = Box<dyn FnOnce() + Send>;

/// Resolves when the message's transaction committed (or failed).
pub type Committed = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// The `LOG_STORE` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogStoreKind {
    /// Durable: the SQLite file in DATA_DIR; 202 only after the commit.
    #[default]
    Sqlite,
    /// In memory only: lost on restart (for comparison runs and tests).
    Memory,
}

/// The engine behind the tenant logs. Cloning is cheap.
#[derive(Debug, Clone)]
pub enum LogStore {
    Memory,
    Sqlite(Store),
}

/// What [`LogStore::append`] did with a message.
pub enum Appended {
    /// Nothing to wait for: the caller commits the message now, under the
    /// lock it holds (the callback was not needed and never built).
    Now,
    /// Queued: the engine runs the callback after the commit; await the
    /// future for the outcome (a 202 or a 503).
    Queued(Committed),
}

/// A message as the hub hands it to the engine.
#[derive(Debug)]
pub struct LogEntry<'a> {
    pub tenant: &'a str,
    pub kind: &'a str,
    /// The message's `data`, for the views a `task_update` or `agent_update` changes.
    pub data: &'a serde_json::Value,
    pub id: &'a str,
    pub ts_ms: i64,
    pub envelope: &'a Envelope,
}

impl LogStore {
    /// Whether messages survive a restart (and a publish must wait for them).
    pub fn is_durable(&self) -> bool {
        !matches!(self, LogStore::Memory)
    }

    /// Hands `entry` to the engine. Never blocks: the hub calls this while
    /// holding the tenant lock (so queue order is `seq` order) and the
    /// callback `on_commit()` builds takes that same lock later. `Err` means
    /// the message never got anywhere (queue full, store closed).
    pub fn append(
        &self,
        entry: LogEntry<'_>,
        on_commit: impl FnOnce() -> OnCommit,
    ) -> Result<Appended, StoreError> {
        match self {
            LogStore::Memory => Ok(Appended::Now),
            LogStore::Sqlite(store) => {
                let message = StoredMessage {
                    tenant: entry.tenant.to_owned(),
                    seq: entry.envelope.seq,
                    target: stored_target(&entry.envelope.target),
                    kind: entry.kind.to_owned(),
                    body: entry.envelope.text.as_str().to_owned(),
                    id: entry.id.to_owned(),
                    ts_ms: entry.ts_ms,
                    view: ViewUpdate::of(entry.kind, entry.data),
                };
                let committed = store.try_append(message, on_commit())?;
                Ok(Appended::Queued(Box::pin(committed)))
            }
        }
    }

    /// Makes sure `tenant` has a log in the engine, created with `epoch` if
    /// new; returns the engine's `(epoch, head)` for it.
    pub async fn ensure(&self, tenant: &str, epoch: &str) -> Result<(String, u64), StoreError> {
        match self {
            LogStore::Memory => Ok((epoch.to_owned(), 0)),
            LogStore::Sqlite(store) => store.ensure_log_with_epoch(tenant, epoch.to_owned()).await,
        }
    }

    /// Every stored tenant log, rebuilt with its newest `history` messages
    /// of at most `history_bytes` in all.
    /// Blocking (reads the whole history): call it in `spawn_blocking`.
    pub fn load(
        &self,
        history: usize,
        history_bytes: usize,
    ) -> Result<Vec<(String, TenantLog)>, StoreError> {
        let LogStore::Sqlite(store) = self else {
            return Ok(Vec::new());
        };
        let logs = store.load_logs(history, history_bytes)?;
        Ok(logs
            .into_iter()
            .map(|stored| {
                let loaded_at = Instant::now();
                let envelopes = stored.history.into_iter().map(|message| {
                    Arc::new(Envelope {
                        seq: message.seq,
                        target: target_of(message.target),
                        text: Utf8Bytes::from(message.body),
                        published_at: loaded_at,
                    })
                });
                let log = TenantLog::restore(
                    stored.epoch,
                    stored.head,
                    envelopes,
                    history,
                    history_bytes,
                );
                (stored.tenant, log)
            })
            .collect())
    }
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
