//! The writer thread: the only read-write connection, and group commit.
//!
//! Requests arrive in order over one bounded queue. The thread blocks for
//! the first, takes whatever else is already queued (up to [`BATCH_MAX`]),
//! and runs them all in ONE transaction. After `COMMIT` returns it runs each
//! message's `on_commit` in submission order (the log hands the message to
//! its delivery step there — no fan-out on this thread — so a socket only
//! ever sees committed messages, in `seq` order) and then wakes the waiters. If the transaction fails, nobody's `on_commit` runs and every
//! waiter gets the error. While one batch commits (an fsync), the next one
//! queues up behind it, so the cost of the fsync is shared by everything
//! that arrived meanwhile.
//!
//! A log's `head` is raised in the same transaction as its messages, and an
//! append whose `seq` is not above the head is refused, so `seq` can neither
//! repeat nor go back under one epoch, whatever crash happens between commits.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::checkpoint::Checkpointer;
use super::{lock, StoreError, StoreOptions, StoredMessage, Touches};

/// Requests per transaction. Bounds the latency a batch adds to the first
/// publish in it and the memory of one batch.
pub(crate) const BATCH_MAX: usize = 1024;

/// How many times the writer yields the CPU, waiting for more requests to
/// join a batch, before it commits what it has. Matters most when the writer
/// shares a core with the request handlers (measured with the server pinned
/// to one core: see the README's figures).
const GATHER_YIELDS: usize = 2;

/// Trim history after this many appended rows (across tenants)...
pub(crate) const TRIM_EVERY: usize = 2048;

/// ...deleting at most this many rows in that pass. More than `TRIM_EVERY`,
/// so trimming keeps up, and bounded, so one batch never stalls on it.
const TRIM_BUDGET: u64 = 8192;

/// Runs on the writer thread after the message's transaction committed.
pub(crate) type OnCommit = Box<dyn FnOnce() + Send>;

/// What the writer thread is asked to do.
pub(crate) enum Request {
    Append {
        message: StoredMessage,
        on_commit: OnCommit,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Any other write (accounts, keys, logs), run in a savepoint.
    Job(Job),
    /// Deletes a log and its messages (an expired channel), in queue order:
    /// appends queued before it are gone with it, later ones start anew.
    Forget(String),
    /// Wakes the writer to write pending `last_used_at` touches.
    Flush,
    /// Commit what came before, then stop; the sender hears when it is done.
    Shutdown(oneshot::Sender<()>),
}

/// A write with a typed answer, erased so one queue carries them all.
pub(crate) struct Job {
    /// Runs inside the batch's transaction; false when it failed (and its
    /// savepoint must be rolled back).
    run: Box<dyn FnOnce(&Connection) -> bool + Send>,
    /// Answers the caller with the commit's outcome (and the job's result).
    finish: Box<dyn FnOnce(Result<(), StoreError>) + Send>,
}

impl Job {
    pub(crate) fn new<T, F, A>(
        f: F,
        after_commit: A,
        done: oneshot::Sender<Result<T, StoreError>>,
    ) -> Job
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        A: FnOnce(&T) + Send + 'static,
    {
        let slot = Arc::new(Mutex::new(None::<Result<T, StoreError>>));
        let run_slot = slot.clone();
        Job {
            run: Box::new(move |conn| {
                let result = f(conn);
                let ok = result.is_ok();
                *lock(&run_slot) = Some(result);
                ok
            }),
            finish: Box::new(move |commit| {
                let result = match (lock(&slot).take(), commit) {
                    // The job's own error is the more precise one.
                    (Some(Err(error)), _) | (_, Err(error)) => Err(error),
                    (Some(Ok(value)), Ok(())) => Ok(value),
                    (None, Ok(())) => Err(StoreError::Internal("write job did not run".into())),
                };
                if let Ok(value) = &result {
                    after_commit(value);
                }
                // The caller may have given up waiting; the write stands.
                let _ = done.send(result);
            }),
        }
    }
}

/// Starts the writer thread; it runs until [`Request::Shutdown`] or until
/// every [`super::Store`] handle is dropped (then it commits what is queued).
pub(crate) fn spawn(
    conn: Connection,
    checkpointer: Checkpointer,
    requests: mpsc::Receiver<Request>,
    touches: Arc<Touches>,
    commit_failures: Arc<AtomicU64>,
    options: &StoreOptions,
) -> Result<(), StoreError> {
    let mut writer = Writer::new(conn, requests, touches, commit_failures, options)?;
    writer.checkpointer = Some(checkpointer);
    std::thread::Builder::new()
        .name("agentcast-store".into())
        .spawn(move || writer.run())?;
    Ok(())
}

struct Writer {
    conn: Connection,
    /// Stopped before the final checkpoint (see [`Writer::finish`]).
    checkpointer: Option<Checkpointer>,
    requests: mpsc::Receiver<Request>,
    touches: Arc<Touches>,
    /// Transactions that failed (each refusing every write in it), for
    /// `agentcast_store_commit_failures_total`.
    commit_failures: Arc<AtomicU64>,
    /// Committed head per tenant, so an append needs no lookup. Emptied when
    /// a transaction fails (it may have cached rows that were rolled back).
    heads: HashMap<String, u64>,
    history_size: u64,
    /// Bytes of bodies kept per tenant (`HISTORY_BYTES`), beside `history_size`.
    history_bytes: u64,
    /// The two bounds of channel logs (names with [`CHANNEL_SEPARATOR`]).
    channel_bounds: (u64, u64),
    /// Tenants that may hold more than `history_size` rows or `history_bytes`.
    trim_dirty: HashSet<String>,
    /// Bytes of bodies each log holds, where known (logs created or measured
    /// since the start): a trim walks a log's newest rows for the byte bound
    /// only when it is over it, not at every pass (with many busy channels
    /// that walk was most of the writer's time).
    log_bytes: HashMap<String, u64>,
    /// Rows appended since the last trim pass.
    appended_since_trim: usize,
}

/// A message or job that ran in the open transaction, waiting for COMMIT.
enum Done {
    Message {
        on_commit: OnCommit,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    Job(Box<dyn FnOnce(Result<(), StoreError>) + Send>),
}

impl Writer {
    fn new(
        conn: Connection,
        requests: mpsc::Receiver<Request>,
        touches: Arc<Touches>,
        commit_failures: Arc<AtomicU64>,
        options: &StoreOptions,
    ) -> Result<Writer, StoreError> {
        // Every log may be over a (possibly lowered) HISTORY_SIZE or
        // HISTORY_BYTES after a restart.
        let trim_dirty = conn
            .prepare("SELECT tenant FROM logs")?
            .query_map([], |row| row.get::<_, String>(0))?
            .collect::<Result<HashSet<_>, _>>()?;
        Ok(Writer {
            conn,
            checkpointer: None,
            requests,
            touches,
            commit_failures,
            heads: HashMap::new(),
            history_size: u64::try_from(options.history_size).unwrap_or(u64::MAX),
            history_bytes: u64::try_from(options.history_bytes).unwrap_or(u64::MAX),
            channel_bounds: (
                u64::try_from(options.channel_history).unwrap_or(u64::MAX),
                u64::try_from(options.channel_history_bytes).unwrap_or(u64::MAX),
            ),
            trim_dirty,
            log_bytes: HashMap::new(),
            appended_since_trim: 0,
        })
    }

    fn run(mut self) {
        while let Some(first) = self.requests.blocking_recv() {
            let mut batch = Vec::new();
            let mut shutdown = None;
            let mut next = Some(first);
            while let Some(request) = next.take() {
                if let Request::Shutdown(done) = request {
                    shutdown = Some(done);
                    break;
                }
                batch.push(request);
                if batch.len() < BATCH_MAX {
                    next = self.gather_next();
                }
            }
            self.commit(batch);
            if let Some(done) = shutdown {
                self.finish();
                let _ = done.send(());
                return;
            }
        }
        self.finish();
    }

    /// The next queued request, if one is there or arrives after giving the
    /// CPU away [`GATHER_YIELDS`] times. Under load the publishers queue more
    /// while we yield, so one commit (one fsync) covers more of them; idle,
    /// a yield returns at once and costs the lone publish nothing.
    fn gather_next(&mut self) -> Option<Request> {
        for _ in 0..GATHER_YIELDS {
            if let Ok(request) = self.requests.try_recv() {
                return Some(request);
            }
            std::thread::yield_now();
        }
        self.requests.try_recv().ok()
    }

    /// Stops taking requests (those still queued are dropped: their callers
    /// see `Closed`), writes pending touches and checkpoints the WAL so the
    /// next start has nothing to replay.
    fn finish(mut self) {
        self.requests.close();
        while self.requests.try_recv().is_ok() {}
        self.commit(Vec::new());
        if let Some(checkpointer) = self.checkpointer.take() {
            checkpointer.stop();
        }
        if let Err(error) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(%error, "store: final checkpoint failed");
        }
        if let Err((_, error)) = self.conn.close() {
            tracing::warn!(%error, "store: closing the database failed");
        }
        tracing::debug!("store writer stopped");
    }

    /// Runs `batch` (and pending touches) in one transaction; see the module doc.
    fn commit(&mut self, batch: Vec<Request>) {
        let touches = self.touches.take();
        if touches.is_empty() && batch.iter().all(|r| matches!(r, Request::Flush)) {
            return;
        }
        if let Err(error) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            let error = StoreError::from(error);
            tracing::error!(%error, "store: cannot begin a transaction");
            self.commit_failures.fetch_add(1, Ordering::Relaxed);
            for request in batch {
                fail(request, &error);
            }
            return;
        }

        let mut done = Vec::with_capacity(batch.len());
        // Heads raised by this batch; they join `self.heads` once committed.
        let mut batch_heads: HashMap<String, u64> = HashMap::new();
        // Set when SQLite rolled the whole transaction back under us (disk
        // full, i/o error): nothing after that point may run.
        let mut lost: Option<StoreError> = None;
        for request in batch {
            if let Some(error) = &lost {
                fail(request, error);
                continue;
            }
            match request {
                Request::Append {
                    message,
                    on_commit,
                    done: waiter,
                } => match self.insert(&message, &mut batch_heads) {
                    Ok(()) => done.push(Done::Message {
                        on_commit,
                        done: waiter,
                    }),
                    Err(error) => {
                        lost = self.lost(&error);
                        let _ = waiter.send(Err(error));
                    }
                },
                Request::Job(job) => match self.run_job(job.run) {
                    Ok(()) => {
                        done.push(Done::Job(job.finish));
                        if self.conn.is_autocommit() {
                            // The job's failure took the transaction with it.
                            lost = Some(StoreError::Io("the transaction was rolled back".into()));
                        }
                    }
                    Err(error) => {
                        lost = self.lost(&error);
                        (job.finish)(Err(error));
                    }
                },
                Request::Forget(name) => match forget(&self.conn, &name) {
                    Ok(()) => {
                        batch_heads.remove(&name);
                        self.heads.remove(&name);
                        self.trim_dirty.remove(&name);
                        self.log_bytes.remove(&name);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "store: forgetting an expired log failed");
                        lost = self.lost(&error);
                    }
                },
                Request::Flush | Request::Shutdown(_) => {}
            }
        }
        if lost.is_none() {
            if let Err(error) = self.write_touches(&touches) {
                tracing::warn!(%error, "store: could not record api key use");
                lost = self.lost(&error);
            }
        }
        if lost.is_none() && self.appended_since_trim >= TRIM_EVERY {
            if let Err(error) = self.trim(&batch_heads) {
                tracing::warn!(%error, "store: trimming history failed");
                lost = self.lost(&error);
            }
        }

        let outcome = match lost {
            Some(error) => Err(error),
            None => self.conn.execute_batch("COMMIT").map_err(StoreError::from),
        };
        match outcome {
            Ok(()) => {
                self.heads.extend(batch_heads);
                let mut waiters = Vec::with_capacity(done.len());
                for entry in done {
                    match entry {
                        Done::Message { on_commit, done } => {
                            if std::panic::catch_unwind(AssertUnwindSafe(on_commit)).is_err() {
                                tracing::error!("store: an on_commit callback panicked");
                            }
                            waiters.push(done);
                        }
                        Done::Job(finish) => finish(Ok(())),
                    }
                }
                for waiter in waiters {
                    let _ = waiter.send(Ok(()));
                }
            }
            Err(error) => {
                tracing::error!(%error, "store: a transaction failed, its writes are refused");
                self.commit_failures.fetch_add(1, Ordering::Relaxed);
                self.rollback();
                self.heads.clear();
                self.log_bytes.clear();
                for entry in done {
                    match entry {
                        Done::Message { done, .. } => {
                            let _ = done.send(Err(error.clone()));
                        }
                        Done::Job(finish) => finish(Err(error.clone())),
                    }
                }
            }
        }
    }

    /// `Some(error)` when `error` ended the whole transaction, not just a statement.
    fn lost(&self, error: &StoreError) -> Option<StoreError> {
        self.conn.is_autocommit().then(|| error.clone())
    }

    fn rollback(&self) {
        if !self.conn.is_autocommit() {
            if let Err(error) = self.conn.execute_batch("ROLLBACK") {
                tracing::error!(%error, "store: rollback failed");
            }
        }
    }

    fn run_job(&self, run: Box<dyn FnOnce(&Connection) -> bool + Send>) -> Result<(), StoreError> {
        self.conn.execute_batch("SAVEPOINT job")?;
        if !run(&self.conn) && !self.conn.is_autocommit() {
            self.conn.execute_batch("ROLLBACK TO job")?;
        }
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("RELEASE job")?;
        }
        Ok(())
    }

    fn insert(
        &mut self,
        message: &StoredMessage,
        batch_heads: &mut HashMap<String, u64>,
    ) -> Result<(), StoreError> {
        let seq = i64::try_from(message.seq)
            .ok()
            .filter(|seq| *seq > 0)
            .ok_or_else(|| StoreError::Invalid(format!("seq {} is out of range", message.seq)))?;
        let head = self.head(&message.tenant, batch_heads)?;
        if message.seq <= head {
            return Err(StoreError::Conflict(format!(
                "seq {} is not above the head {head} of tenant {:?}",
                message.seq, message.tenant
            )));
        }
        match &message.view {
            None => self.insert_row(message, seq)?,
            // The row and its view change stand or fall together.
            Some(view) => {
                self.conn.execute_batch("SAVEPOINT message")?;
                let result = self
                    .insert_row(message, seq)
                    .and_then(|()| view.apply(&self.conn, message));
                if result.is_err() && !self.conn.is_autocommit() {
                    self.conn.execute_batch("ROLLBACK TO message")?;
                }
                if !self.conn.is_autocommit() {
                    self.conn.execute_batch("RELEASE message")?;
                }
                result?;
            }
        }
        match batch_heads.get_mut(&message.tenant) {
            Some(head) => *head = message.seq,
            None => {
                batch_heads.insert(message.tenant.clone(), message.seq);
            }
        }
        let body = u64::try_from(message.body.len()).unwrap_or(u64::MAX);
        match self.log_bytes.get_mut(&message.tenant) {
            Some(bytes) => *bytes = bytes.saturating_add(body),
            // A log without a message yet: its size is known from here on.
            None if head == 0 => {
                self.log_bytes.insert(message.tenant.clone(), body);
            }
            None => {}
        }
        self.appended_since_trim += 1;
        if !self.trim_dirty.contains(&message.tenant) {
            self.trim_dirty.insert(message.tenant.clone());
        }
        Ok(())
    }

    fn insert_row(&self, message: &StoredMessage, seq: i64) -> Result<(), StoreError> {
        let (target_user, target_role) = message.target.columns();
        self.conn
            .prepare_cached(
                "INSERT INTO messages (tenant, seq, id, kind, target_user, target_role, ts_ms, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                message.tenant,
                seq,
                message.id,
                message.kind,
                target_user,
                target_role,
                message.ts_ms,
                message.body,
            ])?;
        Ok(())
    }

    /// The tenant's head as this transaction sees it.
    fn head(
        &mut self,
        tenant: &str,
        batch_heads: &HashMap<String, u64>,
    ) -> Result<u64, StoreError> {
        if let Some(head) = batch_heads.get(tenant).or_else(|| self.heads.get(tenant)) {
            return Ok(*head);
        }
        let head: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT max(head, coalesce((SELECT max(seq) FROM messages WHERE tenant = ?1), 0))
                 FROM logs WHERE tenant = ?1",
            )?
            .query_row([tenant], |row| row.get(0))
            .optional()?;
        let head = head.ok_or_else(|| StoreError::UnknownLog(tenant.to_owned()))?;
        let head = u64::try_from(head).unwrap_or(0);
        self.heads.insert(tenant.to_owned(), head);
        Ok(head)
    }

    /// Records `head` in the log's row. A log's head is the larger of that
    /// row and its newest message, so this is only needed before a trim
    /// deletes rows (which may be all of them, with a bound of 0): not one
    /// UPDATE per log per commit, which for many channels was one per message.
    fn write_head(&self, tenant: &str, head: u64) -> Result<(), StoreError> {
        // Every head here came from a seq already checked to fit an i64.
        self.conn
            .prepare_cached("UPDATE logs SET head = ?2 WHERE tenant = ?1 AND head < ?2")?
            .execute(params![tenant, i64::try_from(head).unwrap_or(i64::MAX)])?;
        Ok(())
    }

    fn write_touches(&self, touches: &HashMap<String, i64>) -> Result<(), StoreError> {
        if touches.is_empty() {
            return Ok(());
        }
        let mut update = self.conn.prepare_cached(
            "UPDATE api_keys SET last_used_at = ?2
             WHERE id = ?1 AND (last_used_at IS NULL OR last_used_at < ?2)",
        )?;
        for (id, at_ms) in touches {
            update.execute(params![id, at_ms])?;
        }
        Ok(())
    }

    /// Deletes rows older than the newest `history_size` (or than those
    /// within `history_bytes`) of the dirty tenants, at most [`TRIM_BUDGET`]
    /// rows; what is left waits for the next pass.
    fn trim(&mut self, batch_heads: &HashMap<String, u64>) -> Result<(), StoreError> {
        self.appended_since_trim = 0;
        let mut budget = TRIM_BUDGET;
        let tenants: Vec<String> = self.trim_dirty.iter().cloned().collect();
        for tenant in tenants {
            if budget == 0 {
                break;
            }
            let head = self.head(&tenant, batch_heads)?;
            let (history_size, history_bytes) = self.bounds(&tenant);
            let by_count = head.saturating_sub(history_size);
            let by_bytes = if self.bytes_of(&tenant)? > history_bytes {
                self.bytes_cutoff(&tenant)?
            } else {
                0
            };
            let cutoff = by_count.max(by_bytes);
            let Some(cutoff) = Some(cutoff).filter(|c| *c > 0) else {
                self.trim_dirty.remove(&tenant);
                continue;
            };
            let oldest: Option<i64> = self
                .conn
                .prepare_cached("SELECT min(seq) FROM messages WHERE tenant = ?1")?
                .query_row([&tenant], |row| row.get(0))?;
            let oldest = oldest.and_then(|seq| u64::try_from(seq).ok());
            let Some(oldest) = oldest.filter(|seq| *seq <= cutoff) else {
                self.trim_dirty.remove(&tenant);
                continue;
            };
            // seqs are unique integers, so this range holds at most `budget` rows.
            let upto = cutoff.min(oldest.saturating_add(budget - 1));
            self.write_head(&tenant, head)?;
            let (deleted, freed) = self.delete_through(&tenant, upto)?;
            if let Some(bytes) = self.log_bytes.get_mut(&tenant) {
                *bytes = bytes.saturating_sub(freed);
            }
            budget = budget.saturating_sub(deleted);
            if upto == cutoff {
                self.trim_dirty.remove(&tenant);
            }
        }
        Ok(())
    }

    /// Bytes of bodies `tenant` holds: remembered, or counted once.
    fn bytes_of(&mut self, tenant: &str) -> Result<u64, StoreError> {
        if let Some(bytes) = self.log_bytes.get(tenant) {
            return Ok(*bytes);
        }
        let bytes: i64 = self
            .conn
            .prepare_cached(
                "SELECT coalesce(sum(octet_length(body)), 0) FROM messages WHERE tenant = ?1",
            )?
            .query_row([tenant], |row| row.get(0))?;
        let bytes = u64::try_from(bytes).unwrap_or(0);
        self.log_bytes.insert(tenant.to_owned(), bytes);
        Ok(bytes)
    }

    /// Deletes the rows of `tenant` up to seq `upto`; returns how many and
    /// the bytes of their bodies.
    fn delete_through(&self, tenant: &str, upto: u64) -> Result<(u64, u64), StoreError> {
        let mut delete = self.conn.prepare_cached(
            "DELETE FROM messages WHERE tenant = ?1 AND seq <= ?2 RETURNING octet_length(body)",
        )?;
        let mut rows = delete.query(params![tenant, i64::try_from(upto).unwrap_or(i64::MAX)])?;
        let (mut deleted, mut bytes) = (0u64, 0u64);
        while let Some(row) = rows.next()? {
            deleted += 1;
            bytes = bytes.saturating_add(u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0));
        }
        Ok((deleted, bytes))
    }

    /// The newest seq of `tenant` the byte bound drops (0: none), walking
    /// the newest `history_size` rows: beyond those the count bound drops
    /// them anyway. `octet_length` is read from the row header, so this does
    /// not load the bodies. The newest row is kept whatever its size, as in
    /// the in-memory log.
    fn bytes_cutoff(&self, tenant: &str) -> Result<u64, StoreError> {
        let (history_size, history_bytes) = self.bounds(tenant);
        let mut newest = self.conn.prepare_cached(
            "SELECT seq, octet_length(body) FROM messages
             WHERE tenant = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let limit = i64::try_from(history_size).unwrap_or(i64::MAX);
        let mut rows = newest.query(params![tenant, limit])?;
        let (mut kept, mut bytes) = (0u64, 0u64);
        while let Some(row) = rows.next()? {
            let (seq, len): (i64, i64) = (row.get(0)?, row.get(1)?);
            kept += 1;
            bytes = bytes.saturating_add(u64::try_from(len).unwrap_or(0));
            if kept > 1 && bytes > history_bytes {
                return Ok(u64::try_from(seq).unwrap_or(0));
            }
        }
        Ok(0)
    }
}

impl Writer {
    /// `(messages, bytes)` kept of the log `name`: a tenant's or a channel's.
    fn bounds(&self, name: &str) -> (u64, u64) {
        if name.contains(super::CHANNEL_SEPARATOR) {
            self.channel_bounds
        } else {
            (self.history_size, self.history_bytes)
        }
    }
}

/// Deletes the log `name` and its messages.
fn forget(conn: &Connection, name: &str) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM messages WHERE tenant = ?1")?
        .execute([name])?;
    conn.prepare_cached("DELETE FROM logs WHERE tenant = ?1")?
        .execute([name])?;
    Ok(())
}

/// Answers a request that will not run.
fn fail(request: Request, error: &StoreError) {
    match request {
        Request::Append { done, .. } => {
            let _ = done.send(Err(error.clone()));
        }
        Request::Job(job) => (job.finish)(Err(error.clone())),
        Request::Flush | Request::Forget(_) => {}
        Request::Shutdown(done) => {
            let _ = done.send(());
        }
    }
}
