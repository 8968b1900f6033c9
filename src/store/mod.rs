//! The embedded durable store: one SQLite file, `DATA_DIR/agentcast.db`,
//! holding accounts, API-key hashes, every tenant log's epoch, head and
//! history, and the views (`views.rs`), which change in the same transaction
//! as the message that changes them.
//!
//! [`Store`] is a cheap clone-able handle. Behind it:
//! - one **writer thread** (`writer.rs`) owns the only read-write connection.
//!   Every write reaches it over one bounded queue, in order. It takes
//!   everything queued (up to `BATCH_MAX` = 1024 requests) into a single
//!   transaction, commits it, runs each message's `on_commit` callback in
//!   submission order, and only then answers the waiters: many publishes share
//!   one commit (group commit), and nothing reaches a socket before it is on
//!   disk;
//! - a small pool of **read-only connections**, used inside
//!   `tokio::task::spawn_blocking` so no SQLite call ever runs on an async
//!   worker thread.
//!
//! The in-memory [`crate::log::StreamLog`] is a cache in front of the
//! `messages` table: the store is what survives a restart
//! ([`Store::load_logs`]).
//!
//! Durability (`STORE_SYNC`): by default ([`Durability::Normal`]) commits
//! are not fsynced one by one; the WAL is fsynced at least every
//! `STORE_SYNC_INTERVAL` (1 s) by its own thread (`sync.rs`). A clean stop,
//! a crash or `kill -9` loses nothing acknowledged, a power cut at most the
//! last interval. [`Durability::Full`] fsyncs the WAL on every commit.

mod accounts;
mod api_keys;
mod checkpoint;
mod logs;
mod schema;
mod sync;
mod views;
mod writer;

pub use views::{AgentEntry, TaskEntry, ViewUpdate, Viewer};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::auth::Role;
use crate::config::ChannelSettings;

pub(crate) use accounts::new_user;
pub use accounts::{
    hash_password, hash_password_async, validate_password, validate_username, verify_password,
    verify_password_async, MAX_PASSWORD_BYTES, MIN_PASSWORD_CHARS,
};
pub use api_keys::{hash_api_key, looks_like_api_key, new_api_key};
pub(crate) use api_keys::{new_key_info, MAX_LISTED as MAX_LISTED_KEYS};

use writer::{Job, Request};

/// The file inside `DATA_DIR`.
pub const FILE_NAME: &str = "agentcast.db";

/// Requests the writer queue holds. A publish that finds it full is refused
/// at once with [`StoreError::Busy`] (the route answers 503) rather than
/// waiting: the caller submits while holding its tenant's lock so that queue
/// order is `seq` order, and must not wait there. Each in-flight publish holds
/// one slot, so this is only reached far beyond any sane concurrency.
const WRITE_QUEUE: usize = 8192;

/// Read-only connections, i.e. reads running at once; more wait their turn.
const READERS: usize = 4;

/// Distinct API keys whose `last_used_at` may wait for the next commit; a
/// touch beyond that is dropped (the column is a hint, not an audit log).
const MAX_PENDING_TOUCHES: usize = 4096;

/// API keys kept in the lookup cache; when full it is emptied and refilled.
const MAX_CACHED_KEYS: usize = 1024;

/// Longest tenant name, API key name, or id the store accepts.
const MAX_NAME_BYTES: usize = 256;

/// Why a store call failed. Client-safe text: no secret and no SQL value is
/// ever part of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The writer queue is full, or another process holds the file's lock
    /// longer than the busy timeout. Worth retrying later (HTTP 503).
    #[error("store is busy: {0}")]
    Busy(String),
    /// [`Store::close`] ran, or the writer thread is gone.
    #[error("store is closed")]
    Closed,
    /// A unique value is taken (a username in its tenant), or a `seq` is not
    /// above its log's head.
    #[error("{0}")]
    Conflict(String),
    /// The input breaks a rule (a username's characters, a name's length).
    #[error("{0}")]
    Invalid(String),
    /// A message for a tenant whose log was never created ([`Store::ensure_log`]).
    #[error("no log exists for tenant {0:?}")]
    UnknownLog(String),
    #[error("store disk is full")]
    Full,
    #[error("store i/o error: {0}")]
    Io(String),
    #[error("store file is corrupt: {0}")]
    Corrupt(String),
    #[error("store schema version {found} is newer than this binary supports ({supported})")]
    TooNew { found: u32, supported: u32 },
    #[error("store error: {0}")]
    Internal(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as Code;
        let text = error.to_string();
        match error.sqlite_error_code() {
            Some(Code::DatabaseBusy | Code::DatabaseLocked) => StoreError::Busy(text),
            Some(Code::ConstraintViolation) => StoreError::Conflict(text),
            Some(Code::DiskFull) => StoreError::Full,
            Some(Code::DatabaseCorrupt | Code::NotADatabase) => StoreError::Corrupt(text),
            Some(
                Code::SystemIoFailure
                | Code::CannotOpen
                | Code::ReadOnly
                | Code::PermissionDenied
                | Code::FileLockingProtocolFailed
                | Code::NoLargeFileSupport,
            ) => StoreError::Io(text),
            _ => StoreError::Internal(text),
        }
    }
}

impl From<std::io::Error> for StoreError {
    fn from(error: std::io::Error) -> Self {
        StoreError::Io(error.to_string().to_lowercase())
    }
}

/// How hard a commit holds on to the disk.
///
/// Measured on the 2-core dev box (ext4, ~0.15 ms per fsync), 64 concurrent
/// appenders for 5 s, ~300-byte frames, release build: one tenant, FULL
/// ~100k acks/s (p50 0.5 ms, p99 3.4 ms) vs NORMAL ~160k/s; eight tenants,
/// FULL ~80k/s vs NORMAL ~120k/s. With few publishes in flight FULL is bound
/// by fsync latency (8 in flight ÷ fsync time), which is why NORMAL with a
/// WAL fsync per interval is the default, as Redis (`appendfsync everysec`)
/// and NATS JetStream sync on an interval, not per write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous = FULL`: every commit fsyncs the WAL. An acknowledged
    /// publish survives `kill -9` and power loss.
    Full,
    /// `synchronous = NORMAL` plus an fsync of the WAL every
    /// [`StoreOptions::wal_sync_interval`]: survives a crash or `kill -9`
    /// (and never corrupts); a power cut may drop the commits of the last
    /// interval. Like Redis's `appendfsync everysec`.
    #[default]
    Normal,
}

/// Knobs of [`Store::open_with`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Messages kept per tenant log (`HISTORY_SIZE`); older rows are trimmed
    /// by the writer in bounded steps.
    pub history_size: usize,
    /// Bytes of message bodies kept per tenant log (`HISTORY_BYTES`), beside
    /// `history_size`: whichever is reached first.
    pub history_bytes: usize,
    /// The same two bounds for channel logs (`CHANNEL_HISTORY`,
    /// `CHANNEL_HISTORY_BYTES`): logs whose name holds [`CHANNEL_SEPARATOR`].
    pub channel_history: usize,
    pub channel_history_bytes: usize,
    pub durability: Durability,
    /// How often [`Durability::Normal`] fsyncs the WAL (`STORE_SYNC_INTERVAL`).
    pub wal_sync_interval: Duration,
    /// The WAL's bound, in pages: past it the writer checkpoints by itself
    /// (see `checkpoint.rs`). Not a setting; tests lower it.
    pub wal_bound_pages: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            history_size: 10_000,
            history_bytes: 64 << 20,
            channel_history: ChannelSettings::default().history,
            channel_history_bytes: ChannelSettings::default().history_bytes,
            durability: Durability::Normal,
            wal_sync_interval: Duration::from_secs(1),
            wal_bound_pages: checkpoint::WAL_BOUND_PAGES,
        }
    }
}

/// A published message as the log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub tenant: String,
    pub seq: u64,
    /// Who may see it; survives a restart so replay after one addresses the
    /// same connections as the live delivery did.
    pub target: StoredTarget,
    /// The message `type`, kept so views can be rebuilt from history.
    pub kind: String,
    /// The frame exactly as it goes on the socket (serialized once).
    pub body: String,
    pub id: String,
    pub ts_ms: i64,
    /// What the message changes in the views (a `task_update` or an
    /// `agent_update`), applied in the same transaction as the append.
    pub view: Option<ViewUpdate>,
}

/// The addressees of a stored message inside its tenant, as the columns
/// `target_user` and `target_role` (migration 2) hold them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredTarget {
    /// Every connection of the tenant (both columns NULL).
    Broadcast,
    /// Every connection of one user (`target_user`).
    User(String),
    /// Every admin connection (`target_role = 'admin'`).
    Admins,
}

impl StoredTarget {
    /// The `(target_user, target_role)` column values.
    pub(crate) fn columns(&self) -> (Option<&str>, Option<&str>) {
        match self {
            StoredTarget::Broadcast => (None, None),
            StoredTarget::User(user) => (Some(user), None),
            StoredTarget::Admins => (None, Some("admin")),
        }
    }

    /// Back from the columns. A role other than `admin` cannot be stored
    /// (the schema checks it); a row with both set is read as the user's.
    pub(crate) fn from_columns(user: Option<String>, role: Option<String>) -> StoredTarget {
        match (user, role) {
            (Some(user), _) => StoredTarget::User(user),
            (None, Some(_)) => StoredTarget::Admins,
            (None, None) => StoredTarget::Broadcast,
        }
    }
}

/// One tenant log as found at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedLog {
    /// The log's name: a tenant, or `tenant#channel` (see [`CHANNEL_SEPARATOR`]).
    pub tenant: String,
    pub epoch: String,
    /// The highest `seq` ever committed; the next publish gets `head + 1`.
    pub head: u64,
    /// The newest messages, oldest first.
    pub history: Vec<StoredMessage>,
    /// When the log was last written to (its newest message, else its
    /// creation), Unix ms: channels expire from it.
    pub touched_ms: i64,
}

/// Between the tenant and the channel in the name of a channel's log
/// (`acme#task:7f3a`); tenant names never hold it.
pub const CHANNEL_SEPARATOR: char = '#';

/// An account, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct User {
    /// Opaque and stable: the `sub` of the user's tokens.
    pub id: String,
    pub username: String,
    pub role: Role,
    pub tenant: String,
    #[serde(skip)]
    pub created_at_ms: i64,
}

/// An account with its password hash, for the login check only.
#[derive(Clone)]
pub struct UserRecord {
    pub user: User,
    /// argon2id PHC string.
    pub password_hash: String,
}

impl std::fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRecord")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// An API key's public facts: never the key, never its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub id: String,
    pub tenant: String,
    pub name: String,
    /// The key's first characters (`ak_` and a few more), to recognise it.
    pub prefix: String,
    pub created_at_ms: i64,
    /// Updated in batches by the writer, so it may lag by one commit; a key
    /// served from the lookup cache may show an older value still.
    pub last_used_at_ms: Option<i64>,
}

/// The store handle. Cloning is cheap; every clone talks to the same writer.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.reads.path)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// The writer's queue; bounded by [`WRITE_QUEUE`].
    write_tx: mpsc::Sender<Request>,
    reads: Arc<ReadPool>,
    /// Set by [`Store::close`]: every later call fails with `Closed`.
    closed: AtomicBool,
    /// `last_used_at` updates waiting for the writer's next transaction.
    touches: Arc<Touches>,
    /// Active keys by hash, so an API-key publish needs no SQLite read.
    key_cache: Arc<KeyCache>,
    /// The WAL's periodic fsync ([`Durability::Normal`] only); stops with the last handle.
    wal_sync: Option<sync::WalSync>,
    /// Checkpoints of the checkpointer thread (which the writer owns) that
    /// copied pages.
    background_checkpoints: Arc<AtomicU64>,
    /// `(CHANNEL_HISTORY, CHANNEL_HISTORY_BYTES)`, for loading channel logs.
    channel_bounds: (usize, usize),
    /// Failed writer transactions, counted by the writer thread.
    commit_failures: Arc<AtomicU64>,
}

impl Store {
    /// Opens (creating) `data_dir/agentcast.db` with the default options.
    /// Blocking: call it before the runtime starts or in `spawn_blocking`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(data_dir, StoreOptions::default())
    }

    /// Opens (creating) the store, applies pending migrations and starts the
    /// writer thread. Blocking, like [`Store::open`].
    pub fn open_with(data_dir: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(FILE_NAME);
        let mut conn = Connection::open(&path)?;
        restrict_permissions(&path)?;
        schema::configure_writer(&conn, options.durability, options.wal_bound_pages)?;
        schema::migrate(&mut conn)?;

        let wal_sync = match options.durability {
            Durability::Full => None,
            Durability::Normal => {
                let mut wal = path.clone().into_os_string();
                wal.push("-wal");
                Some(sync::WalSync::spawn(wal.into(), options.wal_sync_interval)?)
            }
        };
        let checkpointer = checkpoint::Checkpointer::spawn(path.clone(), options.durability)?;
        let background_checkpoints = checkpointer.copies();
        let reads = Arc::new(ReadPool::new(path));
        // Open one reader now, so a broken file fails the start, not a request.
        let reader = reads.checkout()?;
        reads.checkin(reader);

        let touches = Arc::new(Touches::default());
        let (write_tx, write_rx) = mpsc::channel(WRITE_QUEUE);
        let commit_failures = Arc::new(AtomicU64::new(0));
        writer::spawn(
            conn,
            checkpointer,
            write_rx,
            touches.clone(),
            commit_failures.clone(),
            &options,
        )?;
        Ok(Store {
            inner: Arc::new(Inner {
                write_tx,
                reads,
                closed: AtomicBool::new(false),
                touches,
                key_cache: Arc::new(KeyCache::default()),
                wal_sync,
                background_checkpoints,
                channel_bounds: (options.channel_history, options.channel_history_bytes),
                commit_failures,
            }),
        })
    }

    /// Transactions of the writer that failed since the start, each refusing
    /// every write in it (a full disk, an I/O error…).
    pub fn commit_failures(&self) -> u64 {
        self.inner.commit_failures.load(Ordering::Relaxed)
    }

    /// Checkpoints of the checkpointer thread that copied pages so far.
    pub fn background_checkpoints(&self) -> u64 {
        self.inner.background_checkpoints.load(Ordering::Relaxed)
    }

    /// How many times the WAL syncer fsynced the WAL so far; `None` with
    /// [`Durability::Full`], where every commit fsyncs it.
    pub fn wal_syncs(&self) -> Option<u64> {
        self.inner.wal_sync.as_ref().map(sync::WalSync::syncs)
    }

    /// Flushes everything queued, stops the writer and checkpoints the WAL
    /// (a clean stop loses nothing acknowledged). Later calls return
    /// [`StoreError::Closed`].
    pub async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let (done_tx, done_rx) = oneshot::channel();
        if self
            .inner
            .write_tx
            .send(Request::Shutdown(done_tx))
            .await
            .is_ok()
        {
            // An error means the writer is already gone: nothing left to wait for.
            let _ = done_rx.await;
        }
        self.inner.reads.close();
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    /// Runs `f` on the writer connection inside the next batch's transaction
    /// (in a savepoint: an `Err` undoes only `f`'s own changes) and answers
    /// once that transaction has committed. `after_commit` runs on the writer
    /// thread after a successful commit, before the caller wakes.
    async fn write<T, F, A>(&self, f: F, after_commit: A) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        A: FnOnce(&T) + Send + 'static,
    {
        self.check_open()?;
        let (done_tx, done_rx) = oneshot::channel();
        let job = Job::new(f, after_commit, done_tx);
        self.inner
            .write_tx
            .send(Request::Job(job))
            .await
            .map_err(|_| StoreError::Closed)?;
        done_rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Runs `f` on a read-only connection in `spawn_blocking`, at most
    /// [`READERS`] at once.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.check_open()?;
        let reads = self.inner.reads.clone();
        let permit = reads
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            reads.with(f)
        })
        .await
        .map_err(|error| StoreError::Internal(format!("store read task failed: {error}")))?
    }
}

/// Read-only connections, opened lazily and reused.
struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection that may be in use at once.
    permits: Arc<Semaphore>,
}

impl ReadPool {
    fn new(path: PathBuf) -> Self {
        ReadPool {
            path,
            idle: Mutex::new(Vec::with_capacity(READERS)),
            permits: Arc::new(Semaphore::new(READERS)),
        }
    }

    /// Runs `f` on a pooled connection. Blocking.
    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.checkout()?;
        let result = f(&conn);
        self.checkin(conn);
        result
    }

    fn checkout(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = lock(&self.idle).pop() {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        schema::configure_reader(&conn)?;
        Ok(conn)
    }

    fn checkin(&self, conn: Connection) {
        if self.permits.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() < READERS {
            idle.push(conn);
        }
    }

    fn close(&self) {
        self.permits.close();
        lock(&self.idle).clear();
    }
}

/// `last_used_at` updates, coalesced per key until the writer's next batch.
#[derive(Default)]
struct Touches {
    pending: Mutex<HashMap<String, i64>>,
}

impl Touches {
    /// Records a use; returns true when the set was empty (the writer needs a nudge).
    fn record(&self, id: &str, at_ms: i64) -> bool {
        let mut pending = lock(&self.pending);
        let was_empty = pending.is_empty();
        if let Some(at) = pending.get_mut(id) {
            *at = at_ms;
        } else if pending.len() < MAX_PENDING_TOUCHES {
            pending.insert(id.to_owned(), at_ms);
        }
        was_empty
    }

    fn take(&self) -> HashMap<String, i64> {
        std::mem::take(&mut *lock(&self.pending))
    }
}

/// Active API keys by hash. A revoke bumps `generation` after its commit, so
/// a lookup that read the row before the revoke cannot put it back.
#[derive(Default)]
struct KeyCache {
    state: Mutex<KeyCacheState>,
}

#[derive(Default)]
struct KeyCacheState {
    generation: u64,
    by_hash: HashMap<[u8; 32], ApiKeyInfo>,
}

impl KeyCache {
    fn get(&self, hash: &[u8; 32]) -> Result<ApiKeyInfo, u64> {
        let state = lock(&self.state);
        state.by_hash.get(hash).cloned().ok_or(state.generation)
    }

    fn insert(&self, hash: [u8; 32], info: ApiKeyInfo, read_at_generation: u64) {
        let mut state = lock(&self.state);
        if state.generation != read_at_generation {
            return;
        }
        if state.by_hash.len() >= MAX_CACHED_KEYS {
            state.by_hash.clear();
        }
        state.by_hash.insert(hash, info);
    }

    fn forget(&self, id: &str) {
        let mut state = lock(&self.state);
        state.generation += 1;
        state.by_hash.retain(|_, info| info.id != id);
    }
}

/// Locks `mutex`, ignoring poisoning: every critical section here leaves the
/// data consistent even if a panic interrupted it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A tenant name or other short label: non-empty, bounded, no control characters.
pub(crate) fn check_name(what: &str, value: &str) -> Result<(), StoreError> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES || value.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "{what} must be 1 to {MAX_NAME_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

/// The file holds password hashes: only its owner may read it. SQLite gives
/// the `-wal` and `-shm` files the same mode.
#[cfg(unix)]
fn restrict_permissions(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) -> Result<(), StoreError> {
    Ok(())
}

#[cfg(test)]
pub(crate) mod testing {
    //! A temporary data dir per test, removed on drop.

    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> Self {
            let path = std::env::temp_dir().join(format!("agentcast-store-{}", super::new_id()));
            std::fs::create_dir_all(&path).expect("temp dir");
            TempDir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
