//! The fan-out core: tenants, their logs, and the connections of their users.
//!
//! A publish takes the tenant's lock, gets the next `seq`, serializes the message
//! once and hands it to the [`LogStore`] — still under the lock, so the store's
//! queue is in `seq` order. Once the store has committed it (at once in memory;
//! after the group commit with SQLite, on the store's writer thread) the
//! message is *committed* into the tenant: under the lock again it is pushed
//! into the in-memory history and the shared bytes into the outbox of every
//! addressed connection; only then is the publish answered 202. So no socket
//! and no replay ever shows a message the store could still lose.
//!
//! A connection registers under the same lock and takes its resume snapshot
//! there, from committed messages only. A message committed later finds the
//! connection registered and goes to its outbox, so every message is either
//! in its replay or in its outbox — never both, never neither.
//!
//! Locks: the tenant lock is never held while waiting for the store (the
//! append only queues, and fails at once when the queue is full), and the
//! writer thread takes it only to commit, holding nothing else, so the two
//! cannot deadlock.

pub mod analytics;
pub mod outbox;
pub mod session;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde_json::Value;

use crate::auth::Role;
use crate::log::{Appended, LogEntry, LogStore, Replay, TenantLog};
use crate::metrics::Metrics;
use crate::store::StoreError;
use analytics::{Analytics, Minute};
use outbox::Outbox;
use wire::{Envelope, Target};

/// Clone-able handle to the hub; all state sits behind it.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Tenants appear on first publish or connection and live as long as the process.
    tenants: RwLock<HashMap<Box<str>, Arc<Tenant>>>,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Where committed messages live beyond this process (or nowhere).
    logs: LogStore,
    /// Open connections across tenants, checked against `max_connections`.
    open: AtomicUsize,
    next_connection_id: AtomicU64,
}

/// The hub's share of the settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub history_size: usize,
    /// `HISTORY_BYTES`: frame text kept per tenant, beside `history_size`.
    pub history_bytes: usize,
    pub send_queue: usize,
    pub max_connections: usize,
    pub max_connections_per_user: usize,
}

#[derive(Debug, Default)]
struct Tenant {
    state: Mutex<Option<TenantState>>,
    /// The [`LogStore`] has this tenant's log (with our epoch): known once,
    /// so a publish costs no store round trip to check it.
    stored: AtomicBool,
}

#[derive(Debug)]
struct TenantState {
    log: TenantLog,
    connections: HashMap<u64, Connection>,
    /// user id -> ids of that user's connections (all tabs).
    users: HashMap<Arc<str>, Vec<u64>>,
    /// Per-minute counters for `GET /api/v1/analytics`.
    analytics: Analytics,
}

#[derive(Debug)]
struct Connection {
    outbox: Arc<Outbox>,
    role: Role,
}

/// The answer to an accepted publish (SPEC §3: 202 body).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Receipt {
    pub id: String,
    pub seq: u64,
    pub recipients: usize,
}

/// Why a publish was not accepted. Nothing of it reached a socket or the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The store refused or failed to commit it (queue full, disk full, i/o,
    /// closed): worth retrying later (503).
    #[error("the message log is unavailable: {0}")]
    Unavailable(StoreError),
    /// The store will never take it (e.g. a tenant name it cannot hold).
    #[error("{0}")]
    Invalid(String),
}

impl From<StoreError> for PublishError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Invalid(text) => PublishError::Invalid(text),
            other => PublishError::Unavailable(other),
        }
    }
}

/// Why a connection was not registered (closed with 4429).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many connections")]
    ServerFull,
    #[error("too many connections for this user")]
    UserFull,
}

/// A registered connection. Dropping it unregisters, on every exit path.
#[derive(Debug)]
pub struct Membership {
    hub: Hub,
    tenant: Arc<Tenant>,
    pub id: u64,
    pub user: Arc<str>,
    pub outbox: Arc<Outbox>,
}

/// What a connection sees of its tenant's log at registration.
#[derive(Debug)]
pub struct Snapshot {
    pub epoch: String,
    pub head: u64,
    /// Present when the client asked to resume.
    pub replay: Option<Replay>,
}

impl Hub {
    pub fn new(limits: Limits, metrics: Arc<Metrics>, logs: LogStore) -> Self {
        Hub {
            inner: Arc::new(Inner {
                tenants: RwLock::default(),
                limits,
                metrics,
                logs,
                open: AtomicUsize::new(0),
                next_connection_id: AtomicU64::new(1),
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Puts back the tenant logs found in the store at start (before serving).
    pub fn restore(&self, logs: Vec<(String, TenantLog)>) {
        let mut tenants = self
            .inner
            .tenants
            .write()
            .unwrap_or_else(|p| p.into_inner());
        for (name, log) in logs {
            let tenant = Tenant {
                state: Mutex::new(Some(TenantState::new(log))),
                stored: AtomicBool::new(true),
            };
            tenants.insert(name.into_boxed_str(), Arc::new(tenant));
        }
    }

    /// Appends a message to the tenant's log and, once the log has committed
    /// it, queues it for every addressed connection. `Ok` (the 202) means
    /// committed: in the store, in the history, in the outboxes.
    pub async fn publish(
        &self,
        tenant_name: &str,
        kind: &str,
        data: &Value,
        target: Target,
    ) -> Result<Receipt, PublishError> {
        let tenant = self.tenant(tenant_name);
        if !tenant.stored.load(Ordering::Acquire) {
            self.ensure_stored(&tenant, tenant_name).await?;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let (ts, ts_ms) = wire::timestamp_with_ms();
        let recipients = Arc::new(AtomicUsize::new(0));
        let (seq, committed) = {
            let mut guard = tenant.lock();
            let state = self.state(&mut guard);
            let seq = state.log.assign();
            let envelope = Arc::new(Envelope::encode(kind, data, &id, seq, &ts, target));
            let entry = LogEntry {
                tenant: tenant_name,
                kind,
                data,
                id: &id,
                ts_ms,
                envelope: &envelope,
            };
            let on_commit = || -> Box<dyn FnOnce() + Send> {
                let (tenant, envelope, recipients) =
                    (tenant.clone(), envelope.clone(), recipients.clone());
                let kind: Box<str> = kind.into();
                Box::new(move || {
                    if let Some(state) = tenant.lock().as_mut() {
                        recipients.store(state.commit(envelope, &kind), Ordering::Relaxed);
                    }
                })
            };
            match self.inner.logs.append(entry, on_commit) {
                Ok(Appended::Now) => {
                    recipients.store(state.commit(envelope, kind), Ordering::Relaxed);
                    (seq, None)
                }
                Ok(Appended::Queued(committed)) => (seq, Some(committed)),
                Err(error) => {
                    // Never queued, and the lock is still held: nobody saw it.
                    state.log.unassign(seq);
                    return Err(error.into());
                }
            }
        };
        if let Some(committed) = committed {
            // A failure leaves `seq` as a hole that nobody saw (no socket, no
            // replay, no head): this process never hands it out again. Only a
            // restart could, if no later seq committed — still unseen by anyone.
            committed.await?;
        }
        self.inner.metrics.messages_published.inc();
        Ok(Receipt {
            id,
            seq,
            recipients: recipients.load(Ordering::Relaxed),
        })
    }

    /// Creates the tenant's log in the store with the epoch memory already
    /// uses (connections may have been told it), then remembers that it exists.
    async fn ensure_stored(&self, tenant: &Tenant, name: &str) -> Result<(), PublishError> {
        let epoch = {
            let mut guard = tenant.lock();
            self.state(&mut guard).log.epoch().to_owned()
        };
        let (stored_epoch, stored_head) = self.inner.logs.ensure(name, &epoch).await?;
        let mut guard = tenant.lock();
        let log = &mut self.state(&mut guard).log;
        if stored_epoch != log.epoch() || stored_head > log.head() {
            tracing::warn!(
                tenant = name,
                "the store already had this log; adopting its epoch and head"
            );
            log.adopt(stored_epoch, stored_head);
        }
        tenant.stored.store(true, Ordering::Release);
        Ok(())
    }

    /// Registers a connection of `user` (acting as `role`) in `tenant`, with its
    /// resume snapshot when `resume` (since, epoch) is given.
    pub fn register(
        &self,
        tenant: &str,
        user: &str,
        role: Role,
        resume: Option<(u64, &str)>,
    ) -> Result<(Membership, Snapshot), Refusal> {
        let open = self.inner.open.fetch_add(1, Ordering::AcqRel);
        if open >= self.inner.limits.max_connections {
            self.inner.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::ServerFull);
        }
        let tenant = self.tenant(tenant);
        let mut guard = tenant.lock();
        let state = self.state(&mut guard);
        let tabs = state.users.get(user).map_or(0, Vec::len);
        if tabs >= self.inner.limits.max_connections_per_user {
            drop(guard);
            self.inner.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::UserFull);
        }
        // Share one allocation of the user id between the index and the membership.
        let user: Arc<str> = match state.users.get_key_value(user) {
            Some((existing, _)) => Arc::clone(existing),
            None => Arc::from(user),
        };
        let id = self
            .inner
            .next_connection_id
            .fetch_add(1, Ordering::Relaxed);
        let outbox = Arc::new(Outbox::new(self.inner.limits.send_queue));
        state.connections.insert(
            id,
            Connection {
                outbox: Arc::clone(&outbox),
                role,
            },
        );
        state.users.entry(Arc::clone(&user)).or_default().push(id);
        let snapshot = Snapshot {
            epoch: state.log.epoch().to_owned(),
            head: state.log.head(),
            replay: resume.map(|(since, epoch)| state.log.resume(since, epoch, &user, role)),
        };
        let replayed = snapshot.replay.as_ref().map_or(0, |r| r.entries.len());
        state
            .analytics
            .connection(state.connections.len(), replayed);
        drop(guard);
        self.inner.metrics.connections_total.inc();
        self.inner.metrics.connections_current.inc();
        let membership = Membership {
            hub: self.clone(),
            tenant,
            id,
            user,
            outbox,
        };
        Ok((membership, snapshot))
    }

    /// Open connections of `user` in `tenant` (on this node).
    pub fn presence(&self, tenant: &str, user: &str) -> usize {
        let tenants = self.inner.tenants.read().unwrap_or_else(|p| p.into_inner());
        let Some(tenant) = tenants.get(tenant) else {
            return 0;
        };
        let guard = tenant.lock();
        guard
            .as_ref()
            .and_then(|s| s.users.get(user))
            .map_or(0, Vec::len)
    }

    /// The tenant's per-minute counters for the last hour.
    pub fn analytics(&self, tenant: &str) -> Vec<Minute> {
        let tenants = self.inner.tenants.read().unwrap_or_else(|p| p.into_inner());
        match tenants.get(tenant) {
            Some(tenant) => tenant
                .lock()
                .as_ref()
                .map_or_else(|| Analytics::default().report(), |s| s.analytics.report()),
            None => Analytics::default().report(),
        }
    }

    /// Open connections on this node.
    pub fn open_connections(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    fn tenant(&self, name: &str) -> Arc<Tenant> {
        if let Some(tenant) = self
            .inner
            .tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Arc::clone(tenant);
        }
        let mut tenants = self
            .inner
            .tenants
            .write()
            .unwrap_or_else(|p| p.into_inner());
        // Memory logs need no store row; durable ones learn theirs on first publish.
        let stored = !self.inner.logs.is_durable();
        Arc::clone(tenants.entry(name.into()).or_insert_with(|| {
            Arc::new(Tenant {
                state: Mutex::default(),
                stored: AtomicBool::new(stored),
            })
        }))
    }

    /// The tenant's state, created on first use (so a tenant costs nothing until then).
    fn state<'a>(&self, guard: &'a mut MutexGuard<'_, Option<TenantState>>) -> &'a mut TenantState {
        guard.get_or_insert_with(|| {
            TenantState::new(TenantLog::new(
                self.inner.limits.history_size,
                self.inner.limits.history_bytes,
            ))
        })
    }
}

impl Tenant {
    fn lock(&self) -> MutexGuard<'_, Option<TenantState>> {
        // Every critical section leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TenantState {
    fn new(log: TenantLog) -> Self {
        TenantState {
            log,
            connections: HashMap::new(),
            users: HashMap::new(),
            analytics: Analytics::default(),
        }
    }

    /// A committed message of type `kind`: into the history, the addressed
    /// outboxes and the counters. Returns how many connections it addressed.
    fn commit(&mut self, envelope: Arc<Envelope>, kind: &str) -> usize {
        let recipients = self.fan_out(&envelope);
        self.log.push(envelope);
        self.analytics.message(kind, recipients);
        recipients
    }

    /// Queues `envelope` for its addressees; returns how many connections it addressed.
    fn fan_out(&self, envelope: &Arc<Envelope>) -> usize {
        match &envelope.target {
            Target::Broadcast => {
                for connection in self.connections.values() {
                    connection.outbox.push(envelope);
                }
                self.connections.len()
            }
            Target::User(user) => {
                let ids = self.users.get(&**user).map_or(&[][..], Vec::as_slice);
                for connection in ids.iter().filter_map(|id| self.connections.get(id)) {
                    connection.outbox.push(envelope);
                }
                ids.len()
            }
            Target::Admins => {
                let mut addressed = 0;
                for connection in self.connections.values().filter(|c| c.role == Role::Admin) {
                    connection.outbox.push(envelope);
                    addressed += 1;
                }
                addressed
            }
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut guard = self.tenant.lock();
        if let Some(state) = guard.as_mut() {
            state.connections.remove(&self.id);
            if let Some(ids) = state.users.get_mut(&self.user) {
                ids.retain(|id| *id != self.id);
                if ids.is_empty() {
                    state.users.remove(&self.user);
                }
            }
        }
        drop(guard);
        self.hub.inner.open.fetch_sub(1, Ordering::AcqRel);
        self.hub.inner.metrics.connections_current.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox::Taken;

    fn hub(per_user: usize, total: usize) -> Hub {
        let limits = Limits {
            history_size: 100,
            history_bytes: usize::MAX,
            send_queue: 16,
            max_connections: total,
            max_connections_per_user: per_user,
        };
        Hub::new(limits, Arc::new(Metrics::new()), LogStore::Memory)
    }

    fn data() -> Value {
        serde_json::json!({})
    }

    fn seqs(membership: &Membership) -> Vec<u64> {
        match membership.outbox.take() {
            Taken::Frames(frames) => frames.iter().map(|e| e.seq).collect(),
            Taken::Overflowed => panic!("overflowed"),
        }
    }

    #[tokio::test]
    async fn to_user_reaches_all_tabs_of_that_user_only() {
        let hub = hub(5, 100);
        let (a1, _) = hub.register("t", "alice", Role::User, None).unwrap();
        let (a2, _) = hub.register("t", "alice", Role::User, None).unwrap();
        let (b, _) = hub.register("t", "bob", Role::User, None).unwrap();
        let (other, _) = hub.register("t2", "alice", Role::User, None).unwrap();
        let receipt = hub
            .publish("t", "x", &data(), Target::User("alice".into()))
            .await
            .unwrap();
        assert_eq!(receipt.recipients, 2);
        assert_eq!(seqs(&a1), [1]);
        assert_eq!(seqs(&a2), [1]);
        assert!(seqs(&b).is_empty());
        assert!(seqs(&other).is_empty());
    }

    #[tokio::test]
    async fn to_admins_reaches_admin_connections_live_and_in_replay() {
        let hub = hub(5, 100);
        let (admin, snapshot) = hub.register("t", "root", Role::Admin, None).unwrap();
        let (user, _) = hub.register("t", "bob", Role::User, None).unwrap();
        let (other_tenant, _) = hub.register("t2", "root", Role::Admin, None).unwrap();
        let receipt = hub
            .publish("t", "system", &data(), Target::Admins)
            .await
            .unwrap();
        assert_eq!(receipt.recipients, 1);
        assert_eq!(seqs(&admin), [1]);
        assert!(seqs(&user).is_empty());
        assert!(seqs(&other_tenant).is_empty());

        let resume = Some((0, snapshot.epoch.as_str()));
        let (_, as_admin) = hub.register("t", "root", Role::Admin, resume).unwrap();
        let (_, as_user) = hub.register("t", "bob", Role::User, resume).unwrap();
        assert_eq!(as_admin.replay.unwrap().entries.len(), 1);
        assert!(as_user.replay.unwrap().entries.is_empty());
    }

    #[test]
    fn limits_refuse_and_unregister_frees_the_slot() {
        let hub = hub(1, 2);
        let (first, _) = hub.register("t", "alice", Role::User, None).unwrap();
        assert_eq!(
            hub.register("t", "alice", Role::User, None).unwrap_err(),
            Refusal::UserFull
        );
        let (_bob, _) = hub.register("t", "bob", Role::User, None).unwrap();
        assert_eq!(
            hub.register("t", "carol", Role::User, None).unwrap_err(),
            Refusal::ServerFull
        );
        assert_eq!(hub.presence("t", "alice"), 1);
        drop(first);
        assert_eq!(hub.presence("t", "alice"), 0);
        assert!(hub.register("t", "alice", Role::User, None).is_ok());
    }

    #[tokio::test]
    async fn registration_splits_history_and_live_without_overlap() {
        let hub = hub(5, 100);
        for _ in 0..3 {
            hub.publish("t", "x", &data(), Target::Broadcast)
                .await
                .unwrap();
        }
        let (_, first) = hub.register("t", "u", Role::User, None).unwrap();
        let (member, snapshot) = hub
            .register("t", "u", Role::User, Some((1, &first.epoch)))
            .unwrap();
        hub.publish("t", "x", &data(), Target::Broadcast)
            .await
            .unwrap();
        let replay = snapshot.replay.unwrap();
        assert!(replay.complete);
        assert_eq!(
            replay.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(seqs(&member), [4]);
    }

    mod durable {
        //! The hub over the SQLite store: commit before delivery, restart.

        use super::*;
        use crate::store::testing::TempDir;
        use crate::store::{Store, StoreOptions};

        fn open(dir: &TempDir) -> Store {
            Store::open_with(dir.path(), StoreOptions::default()).unwrap()
        }

        fn durable_hub(store: &Store, send_queue: usize) -> Hub {
            let limits = Limits {
                history_size: 100,
                history_bytes: usize::MAX,
                send_queue,
                max_connections: 100,
                max_connections_per_user: 5,
            };
            let hub = Hub::new(
                limits,
                Arc::new(Metrics::new()),
                LogStore::Sqlite(store.clone()),
            );
            let logs = LogStore::Sqlite(store.clone())
                .load(100, usize::MAX)
                .unwrap();
            hub.restore(logs);
            hub
        }

        fn replayed(snapshot: Snapshot) -> Vec<u64> {
            let replay = snapshot.replay.unwrap();
            assert!(replay.complete);
            replay.entries.iter().map(|e| e.seq).collect()
        }

        #[tokio::test]
        async fn targets_and_epoch_survive_a_restart() {
            let dir = TempDir::new();
            let store = open(&dir);
            let hub = durable_hub(&store, 16);
            // A connection first: the tenant's epoch exists before its log does.
            let (user, snapshot) = hub.register("t", "bob", Role::User, None).unwrap();
            let epoch = snapshot.epoch;
            let data = data();
            hub.publish("t", "x", &data, Target::Broadcast)
                .await
                .unwrap();
            hub.publish("t", "x", &data, Target::User("bob".into()))
                .await
                .unwrap();
            hub.publish("t", "x", &data, Target::User("carol".into()))
                .await
                .unwrap();
            let receipt = hub.publish("t", "x", &data, Target::Admins).await.unwrap();
            assert_eq!((receipt.seq, receipt.recipients), (4, 0));
            assert_eq!(seqs(&user), [1, 2]);
            drop(user);
            store.close().await;

            let store = open(&dir);
            let hub = durable_hub(&store, 16);
            let resume = Some((0, epoch.as_str()));
            let (_, bob) = hub.register("t", "bob", Role::User, resume).unwrap();
            assert_eq!((bob.epoch.as_str(), bob.head), (epoch.as_str(), 4));
            assert_eq!(replayed(bob), [1, 2]);
            let (_, carol) = hub.register("t", "carol", Role::User, resume).unwrap();
            assert_eq!(replayed(carol), [1, 3]);
            let (_, root) = hub.register("t", "root", Role::Admin, resume).unwrap();
            assert_eq!(replayed(root), [1, 4]);
            let next = hub
                .publish("t", "x", &data, Target::Broadcast)
                .await
                .unwrap();
            assert_eq!(next.seq, 5);
        }

        #[tokio::test]
        async fn a_closed_store_refuses_without_taking_a_seq_or_delivering() {
            let dir = TempDir::new();
            let store = open(&dir);
            let hub = durable_hub(&store, 16);
            let (member, _) = hub.register("t", "u", Role::User, None).unwrap();
            hub.publish("t", "x", &data(), Target::Broadcast)
                .await
                .unwrap();
            store.close().await;
            let refused = hub.publish("t", "x", &data(), Target::Broadcast).await;
            assert_eq!(
                refused.unwrap_err(),
                PublishError::Unavailable(StoreError::Closed)
            );
            assert_eq!(seqs(&member), [1]);
            let (_, snapshot) = hub.register("t", "u", Role::User, None).unwrap();
            assert_eq!(snapshot.head, 1);
            let guard = hub.tenant("t");
            let mut guard = guard.lock();
            assert_eq!(
                hub.state(&mut guard).log.assign(),
                2,
                "a refused seq is free again"
            );
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_publishes_reach_a_connection_in_seq_order() {
            let dir = TempDir::new();
            let store = open(&dir);
            let hub = durable_hub(&store, 10_000);
            let (member, _) = hub.register("t", "u", Role::User, None).unwrap();
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let hub = hub.clone();
                    tokio::spawn(async move {
                        let mut acked = Vec::new();
                        for _ in 0..50 {
                            let receipt = hub
                                .publish("t", "x", &data(), Target::Broadcast)
                                .await
                                .unwrap();
                            // Acknowledged means delivered to the outbox already.
                            assert_eq!(receipt.recipients, 1);
                            acked.push(receipt.seq);
                        }
                        acked
                    })
                })
                .collect();
            let mut acked = Vec::new();
            for task in tasks {
                acked.extend(task.await.unwrap());
            }
            acked.sort_unstable();
            assert_eq!(acked, (1..=400).collect::<Vec<_>>());
            assert_eq!(seqs(&member), acked, "in seq order, each once");
        }

        /// The snapshot of a registering connection holds committed messages
        /// only; one queued before it and committed after it reaches the new
        /// connection live, once.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_message_committed_after_the_snapshot_reaches_the_new_connection() {
            let dir = TempDir::new();
            let store = open(&dir);
            let hub = durable_hub(&store, 16);
            let (old, first) = hub.register("t", "u", Role::User, None).unwrap();
            hub.publish("t", "x", &data(), Target::Broadcast)
                .await
                .unwrap();
            // Another connection holds the write lock: the writer waits in BEGIN.
            let locker =
                rusqlite::Connection::open(dir.path().join(crate::store::FILE_NAME)).unwrap();
            locker.execute_batch("BEGIN IMMEDIATE").unwrap();
            let publishing = {
                let hub = hub.clone();
                tokio::spawn(async move { hub.publish("t", "x", &data(), Target::Broadcast).await })
            };
            let next_seq = || {
                let tenant = hub.tenant("t");
                let mut guard = tenant.lock();
                hub.state(&mut guard).log.next_seq()
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while next_seq() < 3 {
                assert!(std::time::Instant::now() < deadline, "seq 2 never assigned");
                tokio::task::yield_now().await;
            }
            let resume = Some((1, first.epoch.as_str()));
            let (member, snapshot) = hub.register("t", "u", Role::User, resume).unwrap();
            assert_eq!(snapshot.head, 1, "seq 2 is not committed yet");
            assert!(replayed(snapshot).is_empty());
            drop(locker);
            let receipt = publishing.await.unwrap().unwrap();
            assert_eq!((receipt.seq, receipt.recipients), (2, 2));
            assert_eq!(seqs(&member), [2]);
            assert_eq!(seqs(&old), [1, 2]);
        }
    }
}
