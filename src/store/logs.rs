//! Tenant logs on disk: the epoch and head of each log, its history, and
//! the append path into the writer's group commit.

use std::future::Future;

use rusqlite::{params, Connection};
use tokio::sync::{mpsc::error::TrySendError, oneshot};

use super::writer::Request;
use super::{
    check_name, new_id, now_ms, LoadedLog, Store, StoreError, StoredMessage, StoredTarget,
};

impl Store {
    /// Every log's epoch and head and its newest `history` messages whose
    /// bodies hold at most `history_bytes` in all (the newest one always),
    /// oldest first, read in one snapshot; channel logs by the store's
    /// channel bounds instead. Blocking: meant for start-up, in
    /// `spawn_blocking`.
    pub fn load_logs(
        &self,
        history: usize,
        history_bytes: usize,
    ) -> Result<Vec<LoadedLog>, StoreError> {
        self.check_open()?;
        let bounds = Bounds {
            tenant: (history, history_bytes),
            channel: self.inner.channel_bounds,
        };
        self.inner.reads.with(|conn| load(conn, &bounds))
    }

    /// Deletes the log `name` (an expired channel) with its messages, after
    /// the appends queued before and before those queued after. Does not
    /// wait: a full queue or a closed store leaves the rows, which the next
    /// start forgets again if they are still expired.
    pub fn forget_log(&self, name: &str) -> Result<(), StoreError> {
        self.check_open()?;
        match self
            .inner
            .write_tx
            .try_send(Request::Forget(name.to_owned()))
        {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(StoreError::Busy("the write queue is full".into())),
            Err(TrySendError::Closed(_)) => Err(StoreError::Closed),
        }
    }

    /// The tenant's `(epoch, head)`, creating its log with a fresh random
    /// epoch if it has none. The epoch is never changed afterwards.
    pub async fn ensure_log(&self, tenant: &str) -> Result<(String, u64), StoreError> {
        self.ensure_log_with_epoch(tenant, new_id()).await
    }

    /// Like [`Store::ensure_log`], but a log created now gets `epoch`: the
    /// log may already have told connections of a new tenant an epoch before
    /// its first publish creates the log. An existing log keeps its own.
    pub async fn ensure_log_with_epoch(
        &self,
        tenant: &str,
        epoch: String,
    ) -> Result<(String, u64), StoreError> {
        check_name("tenant", tenant)?;
        check_name("epoch", &epoch)?;
        let tenant = tenant.to_owned();
        self.write(move |conn| ensure(conn, &tenant, &epoch), |_| {})
            .await
    }

    /// Queues `message` for the writer. Its place in the queue is taken now,
    /// synchronously: call this while holding whatever lock assigned the
    /// `seq`, and the writer commits and calls back in `seq` order.
    ///
    /// `on_commit` runs on the writer thread right after the transaction
    /// holding the message commits (keep it short: it delays the next batch),
    /// before the returned future resolves. If the message is refused or its
    /// transaction fails, `on_commit` is dropped without being called and the
    /// future resolves with the error. A full queue refuses at once with
    /// [`StoreError::Busy`]; dropping the future does not withdraw the message.
    pub fn append(
        &self,
        message: StoredMessage,
        on_commit: Box<dyn FnOnce() + Send>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let queued = self.try_append(message, on_commit);
        async move {
            match queued {
                Ok(committed) => committed.await,
                Err(error) => Err(error),
            }
        }
    }

    /// [`Store::append`] that tells at once whether the message was queued:
    /// `Err` means it never reached the writer (queue full, store closed),
    /// so the caller may hand its `seq` out again; `Ok` is the commit's outcome.
    pub fn try_append(
        &self,
        message: StoredMessage,
        on_commit: Box<dyn FnOnce() + Send>,
    ) -> Result<impl Future<Output = Result<(), StoreError>> + Send + 'static, StoreError> {
        self.check_open()?;
        let (done_tx, done_rx) = oneshot::channel();
        let request = Request::Append {
            message,
            on_commit,
            done: done_tx,
        };
        match self.inner.write_tx.try_send(request) {
            Ok(()) => Ok(async move { done_rx.await.unwrap_or(Err(StoreError::Closed)) }),
            Err(TrySendError::Full(_)) => Err(StoreError::Busy("the write queue is full".into())),
            Err(TrySendError::Closed(_)) => Err(StoreError::Closed),
        }
    }
}

fn ensure(conn: &Connection, tenant: &str, epoch: &str) -> Result<(String, u64), StoreError> {
    conn.prepare_cached(
        "INSERT INTO logs (tenant, epoch, head, created_at) VALUES (?1, ?2, 0, ?3)
         ON CONFLICT (tenant) DO NOTHING",
    )?
    .execute(params![tenant, epoch, now_ms()])?;
    let (epoch, head): (String, i64) = conn
        .prepare_cached(
            "SELECT epoch, max(head, coalesce((SELECT max(seq) FROM messages WHERE tenant = ?1), 0))
             FROM logs WHERE tenant = ?1",
        )?
        .query_row([tenant], |row| Ok((row.get(0)?, row.get(1)?)))?;
    Ok((epoch, to_u64(head)))
}

/// `(messages, bytes)` loaded per tenant log and per channel log.
struct Bounds {
    tenant: (usize, usize),
    channel: (usize, usize),
}

fn load(conn: &Connection, bounds: &Bounds) -> Result<Vec<LoadedLog>, StoreError> {
    // One read transaction: every log from the same snapshot.
    let tx = conn.unchecked_transaction()?;
    let mut logs: Vec<LoadedLog> = tx
        .prepare(
            "SELECT tenant, epoch,
                    max(head, coalesce((SELECT max(seq) FROM messages m WHERE m.tenant = logs.tenant), 0)),
                    max(created_at, coalesce((SELECT max(ts_ms) FROM messages m WHERE m.tenant = logs.tenant), 0))
             FROM logs ORDER BY tenant",
        )?
        .query_map([], |row| {
            Ok(LoadedLog {
                tenant: row.get(0)?,
                epoch: row.get(1)?,
                head: to_u64(row.get(2)?),
                history: Vec::new(),
                touched_ms: row.get(3)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut newest = tx.prepare(
        "SELECT seq, target_user, target_role, kind, body, id, ts_ms FROM messages
         WHERE tenant = ?1 ORDER BY seq DESC LIMIT ?2",
    )?;
    for log in &mut logs {
        let tenant = log.tenant.clone();
        let (history, history_bytes) = if tenant.contains(super::CHANNEL_SEPARATOR) {
            bounds.channel
        } else {
            bounds.tenant
        };
        let limit = i64::try_from(history).unwrap_or(i64::MAX);
        // Newest first, so the byte bound stops the read (the writer trims
        // lazily: the table may hold more than the bounds allow).
        let (mut kept, mut bytes) = (0usize, 0usize);
        log.history = newest
            .query_map(params![log.tenant, limit], |row| {
                Ok(StoredMessage {
                    tenant: tenant.clone(),
                    seq: to_u64(row.get(0)?),
                    target: StoredTarget::from_columns(row.get(1)?, row.get(2)?),
                    kind: row.get(3)?,
                    body: row.get(4)?,
                    id: row.get(5)?,
                    ts_ms: row.get(6)?,
                    view: None,
                })
            })?
            .take_while(|row| {
                let Ok(message) = row else { return true };
                kept += 1;
                bytes = bytes.saturating_add(message.body.len());
                kept == 1 || bytes <= history_bytes
            })
            .collect::<Result<_, _>>()?;
        log.history.reverse();
    }
    drop(newest);
    tx.finish()?;
    Ok(logs)
}

/// Stored seqs and heads are checked non-negative by the schema.
fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use super::super::testing::TempDir;
    use super::super::writer::{BATCH_MAX, TRIM_EVERY};
    use super::super::{Store, StoreOptions};
    use super::*;

    fn message(tenant: &str, seq: u64) -> StoredMessage {
        StoredMessage {
            tenant: tenant.to_owned(),
            seq,
            target: match seq % 3 {
                0 => StoredTarget::User("bob".to_owned()),
                1 => StoredTarget::Admins,
                _ => StoredTarget::Broadcast,
            },
            kind: "notification".to_owned(),
            body: format!(r#"{{"type":"notification","data":{{}},"seq":{seq}}}"#),
            id: format!("id-{seq}"),
            ts_ms: 1_700_000_000_000 + i64::try_from(seq).unwrap(),
            view: None,
        }
    }

    fn noop() -> Box<dyn FnOnce() + Send> {
        Box::new(|| {})
    }

    fn store_in(dir: &TempDir, history_size: usize) -> Store {
        Store::open_with(
            dir.path(),
            StoreOptions {
                history_size,
                ..StoreOptions::default()
            },
        )
        .unwrap()
    }

    async fn append_all(store: &Store, tenant: &str, seqs: std::ops::RangeInclusive<u64>) {
        let pending: Vec<_> = seqs
            .map(|seq| store.append(message(tenant, seq), noop()))
            .collect();
        for result in futures_util::future::join_all(pending).await {
            result.unwrap();
        }
    }

    #[test]
    fn opening_twice_is_idempotent() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(store.load_logs(10, usize::MAX).unwrap().is_empty());
    }

    #[tokio::test]
    async fn ensure_log_creates_the_epoch_once() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        let (epoch, head) = store.ensure_log("acme").await.unwrap();
        assert_eq!(head, 0);
        append_all(&store, "acme", 1..=3).await;
        assert_eq!(store.ensure_log("acme").await.unwrap(), (epoch.clone(), 3));
        store.close().await;
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.ensure_log("acme").await.unwrap(), (epoch, 3));
        let (other, _) = store.ensure_log("globex").await.unwrap();
        assert_ne!(other, store.ensure_log("acme").await.unwrap().0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_commit_and_call_back_in_submission_order() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        store.ensure_log("acme").await.unwrap();
        // As the log does: take the seq and submit under one lock, await outside it.
        let next = Arc::new(Mutex::new(0u64));
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let acked = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (store, next, delivered, acked) = (
                    store.clone(),
                    next.clone(),
                    delivered.clone(),
                    acked.clone(),
                );
                tokio::spawn(async move {
                    for _ in 0..50 {
                        let committed = {
                            let mut head = next.lock().unwrap();
                            *head += 1;
                            let seq = *head;
                            let delivered = delivered.clone();
                            store.append(
                                message("acme", seq),
                                Box::new(move || delivered.lock().unwrap().push(seq)),
                            )
                        };
                        committed.await.unwrap();
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(acked.load(Ordering::Relaxed), 3200);
        let delivered = delivered.lock().unwrap().clone();
        assert_eq!(delivered, (1..=3200).collect::<Vec<_>>());
        let logs = store.load_logs(10_000, usize::MAX).unwrap();
        assert_eq!(logs[0].head, 3200);
        assert_eq!(logs[0].history.len(), 3200);
    }

    #[tokio::test]
    async fn on_commit_runs_before_the_ack() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        store.ensure_log("acme").await.unwrap();
        let called = Arc::new(AtomicU64::new(0));
        let flag = called.clone();
        store
            .append(
                message("acme", 1),
                Box::new(move || {
                    flag.store(1, Ordering::SeqCst);
                }),
            )
            .await
            .unwrap();
        assert_eq!(called.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_append_never_calls_back_and_spares_its_batch() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        store.ensure_log("acme").await.unwrap();
        append_all(&store, "acme", 1..=2).await;
        let called = Arc::new(AtomicU64::new(0));
        let callback = |called: &Arc<AtomicU64>| -> Box<dyn FnOnce() + Send> {
            let called = called.clone();
            Box::new(move || {
                called.fetch_add(1, Ordering::SeqCst);
            })
        };
        // Submitted together, so they most likely share one transaction.
        let repeat = store.append(message("acme", 2), callback(&called));
        let unknown = store.append(message("nobody", 1), callback(&called));
        let next = store.append(message("acme", 3), callback(&called));
        assert!(matches!(repeat.await, Err(StoreError::Conflict(_))));
        assert!(matches!(unknown.await, Err(StoreError::UnknownLog(_))));
        next.await.unwrap();
        assert_eq!(called.load(Ordering::SeqCst), 1);
        assert_eq!(store.ensure_log("acme").await.unwrap().1, 3);
    }

    #[tokio::test]
    async fn load_logs_after_reopen_has_the_head_and_the_newest_messages() {
        let dir = TempDir::new();
        let store = store_in(&dir, 1000);
        let (epoch, _) = store.ensure_log("acme").await.unwrap();
        store.ensure_log("empty").await.unwrap();
        append_all(&store, "acme", 1..=25).await;
        store.close().await;

        let store = store_in(&dir, 1000);
        let logs = store.load_logs(10, usize::MAX).unwrap();
        assert_eq!(logs.len(), 2);
        let acme = &logs[0];
        assert_eq!(
            (acme.tenant.as_str(), acme.epoch.as_str()),
            ("acme", &*epoch)
        );
        assert_eq!(acme.head, 25);
        assert_eq!(
            acme.history.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (16..=25).collect::<Vec<_>>()
        );
        assert_eq!(acme.history[2], message("acme", 18));
        assert_eq!((logs[1].head, logs[1].history.len()), (0, 0));
    }

    #[tokio::test]
    async fn trim_keeps_the_newest_history_size_rows() {
        let dir = TempDir::new();
        let store = store_in(&dir, 100);
        store.ensure_log("acme").await.unwrap();
        store.ensure_log("small").await.unwrap();
        append_all(&store, "small", 1..=10).await;
        // Enough rows to pass the trim threshold a few times.
        for chunk in 0..6u64 {
            append_all(&store, "acme", chunk * 1000 + 1..=(chunk + 1) * 1000).await;
        }
        let logs = store.load_logs(usize::MAX, usize::MAX).unwrap();
        let acme = &logs[0];
        assert_eq!(acme.head, 6000);
        // Trimming runs every TRIM_EVERY rows, so up to that many may wait.
        assert!(acme.history.len() >= 100, "{}", acme.history.len());
        assert!(acme.history.len() <= 100 + TRIM_EVERY + BATCH_MAX);
        assert_eq!(acme.history.last().map(|m| m.seq), Some(6000));
        let small = &logs[1];
        assert_eq!(small.history.len(), 10);
    }

    #[tokio::test]
    async fn trim_and_load_keep_the_newest_history_bytes() {
        let dir = TempDir::new();
        let options = |history_bytes| StoreOptions {
            history_size: 10_000,
            history_bytes,
            ..StoreOptions::default()
        };
        let store = Store::open_with(dir.path(), options(usize::MAX)).unwrap();
        store.ensure_log("acme").await.unwrap();
        // Bodies of ~1 KiB; a budget of 100 of them by bytes, far under the count.
        let padded = |seq: u64| StoredMessage {
            body: format!("{:0>1024}", seq),
            ..message("acme", seq)
        };
        let body_len = padded(1).body.len();
        let pending: Vec<_> = (1..=200)
            .map(|seq| store.append(padded(seq), noop()))
            .collect();
        for result in futures_util::future::join_all(pending).await {
            result.unwrap();
        }
        store.close().await;

        // Reopened with a byte bound: the load obeys it before any trim ran...
        let store = Store::open_with(dir.path(), options(100 * body_len)).unwrap();
        let loaded = store.load_logs(10_000, 100 * body_len).unwrap();
        assert_eq!(
            loaded[0].history.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (101..=200).collect::<Vec<_>>()
        );
        assert_eq!(loaded[0].head, 200);
        // ...and the writer's trim deletes what is beyond it.
        let pending: Vec<_> = (201..=200 + TRIM_EVERY as u64)
            .map(|seq| store.append(padded(seq), noop()))
            .collect();
        for result in futures_util::future::join_all(pending).await {
            result.unwrap();
        }
        let all = store.load_logs(usize::MAX, usize::MAX).unwrap();
        let kept = all[0].history.len();
        assert!(kept >= 100, "{kept}");
        assert!(
            kept <= 100 + BATCH_MAX,
            "trimmed by bytes: {kept} rows left"
        );
        assert_eq!(
            all[0].history.last().map(|m| m.seq),
            Some(200 + TRIM_EVERY as u64)
        );
    }

    #[tokio::test]
    async fn a_dropped_store_keeps_every_acknowledged_message() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        let (epoch, _) = store.ensure_log("acme").await.unwrap();
        append_all(&store, "acme", 1..=500).await;
        // Like a crash: no close, no checkpoint; the old writer thread and its
        // connection stay alive and leaked while a new store opens the file.
        std::mem::forget(store);

        let store = Store::open(dir.path()).unwrap();
        let logs = store.load_logs(10_000, usize::MAX).unwrap();
        assert_eq!((logs[0].epoch.as_str(), logs[0].head), (&*epoch, 500));
        assert_eq!(logs[0].history.len(), 500);
        // And seq can only go on from the head.
        let repeat = store.append(message("acme", 500), noop()).await;
        assert!(matches!(repeat, Err(StoreError::Conflict(_))));
        store.append(message("acme", 501), noop()).await.unwrap();
    }

    #[tokio::test]
    async fn close_flushes_then_refuses() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        store.ensure_log("acme").await.unwrap();
        let pending: Vec<_> = (1..=100)
            .map(|seq| store.append(message("acme", seq), noop()))
            .collect();
        store.close().await;
        for result in futures_util::future::join_all(pending).await {
            result.unwrap();
        }
        let late = store.append(message("acme", 101), noop()).await;
        assert_eq!(late, Err(StoreError::Closed));
        assert_eq!(store.ensure_log("acme").await, Err(StoreError::Closed));
        assert_eq!(store.load_logs(1, usize::MAX), Err(StoreError::Closed));
        store.close().await;

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load_logs(1, usize::MAX).unwrap()[0].head, 100);
    }

    /// Channel logs (`tenant#channel`) load by the channel bounds, and a
    /// forgotten one is gone with its messages while the tenant's stays.
    #[tokio::test]
    async fn channel_logs_load_by_their_own_bounds_and_forget_deletes_them() {
        let dir = TempDir::new();
        let options = StoreOptions {
            channel_history: 3,
            ..StoreOptions::default()
        };
        let store = Store::open_with(dir.path(), options).unwrap();
        store.ensure_log("acme").await.unwrap();
        store.ensure_log("acme#task:1").await.unwrap();
        append_all(&store, "acme", 1..=10).await;
        append_all(&store, "acme#task:1", 1..=10).await;
        let logs = store.load_logs(10_000, usize::MAX).unwrap();
        let of = |name: &str| logs.iter().find(|l| l.tenant == name).unwrap();
        assert_eq!(of("acme").history.len(), 10);
        let channel = of("acme#task:1");
        assert_eq!(channel.head, 10);
        assert_eq!(
            channel.history.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [8, 9, 10]
        );
        assert!(
            channel.touched_ms >= 1_700_000_000_010,
            "the newest message's time"
        );

        store.forget_log("acme#task:1").unwrap();
        // A fresh log of the same name starts from seq 1 (queued after the forget).
        store.ensure_log("acme#task:1").await.unwrap();
        append_all(&store, "acme#task:1", 1..=1).await;
        let logs = store.load_logs(10_000, usize::MAX).unwrap();
        let channel = logs.iter().find(|l| l.tenant == "acme#task:1").unwrap();
        assert_eq!((channel.head, channel.history.len()), (1, 1));
        assert_eq!(logs.iter().find(|l| l.tenant == "acme").unwrap().head, 10);
    }

    /// The head is written to the log's row only before a trim (not at every
    /// commit): a log trimmed to nothing (`CHANNEL_HISTORY=0`) still
    /// continues from its head after a restart.
    #[tokio::test]
    async fn a_log_trimmed_to_nothing_keeps_its_head_across_a_reopen() {
        let dir = TempDir::new();
        let options = || StoreOptions {
            channel_history: 0,
            ..StoreOptions::default()
        };
        let store = Store::open_with(dir.path(), options()).unwrap();
        store.ensure_log("acme#run:1").await.unwrap();
        // The last commit trims every row: the head lives in the row alone.
        let total = u64::try_from(TRIM_EVERY).unwrap();
        append_all(&store, "acme#run:1", 1..=total).await;
        store.close().await;
        let store = Store::open_with(dir.path(), options()).unwrap();
        let logs = store.load_logs(10_000, usize::MAX).unwrap();
        assert_eq!((logs[0].head, logs[0].history.len()), (total, 0));
        let (_, head) = store.ensure_log("acme#run:1").await.unwrap();
        assert_eq!(head, total);
    }
}
