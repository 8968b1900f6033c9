//! The sink of the log: tenants, the connections of their users, and the
//! fan-out of committed messages to them.
//!
//! The hub never picks a `seq` nor holds a message the log has not
//! committed. [`Hub::publish`] hands a message to the [`Log`]; the log
//! commits it and calls [`Sink::deliver`] — in `seq` order, from its delivery
//! step (off the store's writer thread) — and the hub pushes the shared bytes
//! into the outbox of every addressed connection, under the tenant's lock,
//! which only registrations, departures and other deliveries take. So no
//! socket ever shows an uncommitted message, and no commit of another tenant
//! waits for this tenant's fan-out.
//!
//! A connection registers through [`Log::attach`], which runs the hub's
//! registration and takes the resume snapshot under the stream's cache lock:
//! a message committed later finds the connection registered, so every
//! message is either in its replay or in its outbox — never both, never
//! neither.
//!
//! Channels (SPEC §4.4) are streams of the log like the tenant's: a
//! connection subscribes through [`Membership::subscribe`], which registers
//! it in the tenant's index of that channel's subscribers and takes the
//! channel's snapshot under the channel's cache lock, by the same rule. A
//! channel message is queued for exactly the connections in that index, so
//! a publish costs O(subscribers), not O(connections).

pub mod analytics;
pub mod outbox;
pub mod session;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

use serde_json::Value;

use crate::auth::Role;
use crate::log::{Envelope, Log, LogError, Sink, Snapshot, StreamKey, Target};
use crate::metrics::Metrics;
use analytics::{Analytics, Minute};
use outbox::Outbox;

pub use crate::log::Receipt;

/// Clone-able handle to the hub; all state sits behind it.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Tenants appear on first delivery or connection and live as long as the process.
    tenants: RwLock<HashMap<Box<str>, Arc<Tenant>>>,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Seq, commit, history and resume: the streams the connections follow.
    log: Log,
    /// Open connections across tenants, checked against `max_connections`.
    open: AtomicUsize,
    /// Channel subscriptions across tenants.
    subscriptions: AtomicUsize,
    next_connection_id: AtomicU64,
}

/// The hub's share of the settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub send_queue: usize,
    pub max_connections: usize,
    pub max_connections_per_user: usize,
}

#[derive(Debug)]
struct Tenant {
    name: Box<str>,
    state: Mutex<TenantState>,
}

#[derive(Debug, Default)]
struct TenantState {
    connections: HashMap<u64, Connection>,
    /// user id -> ids of that user's connections (all tabs).
    users: HashMap<Arc<str>, Vec<u64>>,
    /// channel -> ids of the connections subscribed to it.
    channels: HashMap<Arc<str>, Vec<u64>>,
    /// Per-minute counters for `GET /api/v1/analytics`.
    analytics: Analytics,
}

#[derive(Debug)]
struct Connection {
    outbox: Arc<Outbox>,
    role: Role,
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
    role: Role,
    pub outbox: Arc<Outbox>,
    /// The channels it follows; boxed, so a connection without any costs
    /// one word, not a `Vec`'s three (idle connections are what we count).
    #[allow(clippy::box_collection)]
    subscriptions: Option<Box<Vec<Arc<str>>>>,
}

/// Why a subscribe was refused (an `error` frame; the socket stays open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("too many subscriptions on this connection")]
    TooMany,
}

/// The hub as the log sees it. Weak, so the log (which the hub owns) does
/// not keep the hub alive.
struct HubSink(Weak<Inner>);

impl Sink for HubSink {
    fn deliver(&self, stream: &StreamKey, envelope: &Arc<Envelope>) -> usize {
        let Some(inner) = self.0.upgrade() else {
            return 0;
        };
        let hub = Hub { inner };
        let tenant = hub.tenant(&stream.tenant);
        let mut state = tenant.lock();
        let recipients = match &stream.channel {
            None => state.fan_out(envelope),
            Some(channel) => state.fan_out_channel(channel, envelope),
        };
        state.analytics.message(&envelope.kind, recipients);
        drop(state);
        // Once per message, not per connection: one lookup of the type's counter.
        hub.inner.metrics.delivered(&envelope.kind, recipients);
        recipients
    }

    fn reset(&self, stream: &StreamKey) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        let tenant = Hub { inner }.tenant(&stream.tenant);
        let state = tenant.lock();
        match &stream.channel {
            None => state
                .connections
                .values()
                .for_each(|connection| connection.outbox.restart()),
            Some(channel) => state
                .subscribers(channel)
                .iter()
                .filter_map(|id| state.connections.get(id))
                .for_each(|connection| connection.outbox.restart()),
        }
    }

    fn addressed(&self, stream: &StreamKey, target: &Target) -> usize {
        let Some(inner) = self.0.upgrade() else {
            return 0;
        };
        let tenants = inner.tenants.read().unwrap_or_else(|p| p.into_inner());
        let Some(tenant) = tenants.get(&*stream.tenant) else {
            return 0;
        };
        let state = tenant.lock();
        if let Some(channel) = &stream.channel {
            return state.subscribers(channel).len();
        }
        match target {
            Target::Broadcast => state.connections.len(),
            Target::User(user) => state.users.get(&**user).map_or(0, Vec::len),
            Target::Admins => state
                .connections
                .values()
                .filter(|c| c.role == Role::Admin)
                .count(),
        }
    }
}

impl Hub {
    /// A hub over `log`; it becomes the log's sink.
    pub fn new(limits: Limits, metrics: Arc<Metrics>, log: Log) -> Self {
        let inner = Arc::new(Inner {
            tenants: RwLock::default(),
            limits,
            metrics,
            log,
            open: AtomicUsize::new(0),
            subscriptions: AtomicUsize::new(0),
            next_connection_id: AtomicU64::new(1),
        });
        inner
            .log
            .set_sink(Arc::new(HubSink(Arc::downgrade(&inner))));
        Hub { inner }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Publishes to the tenant's log. `Ok` (the 202) means committed and
    /// queued for every addressed connection.
    pub async fn publish(
        &self,
        tenant: &str,
        kind: &str,
        data: &Value,
        target: Target,
    ) -> Result<Receipt, LogError> {
        let receipt = self
            .inner
            .log
            .append(&StreamKey::tenant(tenant), kind, data, target)
            .await?;
        self.inner.metrics.published(kind);
        Ok(receipt)
    }

    /// Publishes to one channel of the tenant (its subscribers only).
    pub async fn publish_to_channel(
        &self,
        tenant: &str,
        channel: &str,
        kind: &str,
        data: &Value,
    ) -> Result<Receipt, LogError> {
        let key = StreamKey::channel(tenant, channel);
        let receipt = self
            .inner
            .log
            .append(&key, kind, data, Target::Broadcast)
            .await?;
        self.inner.metrics.published(kind);
        self.inner
            .metrics
            .channel_published(crate::channels::namespace(channel));
        Ok(receipt)
    }

    /// Before a connection to `tenant` attaches: see [`Log::prepare`].
    pub async fn prepare(&self, tenant: &str) {
        self.inner.log.prepare(&StreamKey::tenant(tenant)).await;
    }

    /// Before a subscription to (or a read of) a channel: see [`Log::prepare`].
    pub async fn prepare_channel(&self, tenant: &str, channel: &str) {
        let key = StreamKey::channel(tenant, channel);
        // Boxed, like the tenant's: a connection task keeps room for it.
        Box::pin(self.inner.log.prepare(&key)).await;
    }

    /// A channel's `(epoch, head)` and its subscribers on this node.
    pub fn channel_info(&self, tenant: &str, channel: &str) -> (String, u64, usize) {
        let key = StreamKey::channel(tenant, channel);
        let (epoch, head) = self.inner.log.head(&key);
        let tenants = self.inner.tenants.read().unwrap_or_else(|p| p.into_inner());
        let subscribers = tenants
            .get(tenant)
            .map_or(0, |t| t.lock().subscribers(channel).len());
        (epoch, head, subscribers)
    }

    /// A page of a channel's history.
    pub fn channel_history(
        &self,
        tenant: &str,
        channel: &str,
        since: u64,
        epoch: Option<&str>,
        limit: usize,
    ) -> crate::log::Page {
        let key = StreamKey::channel(tenant, channel);
        self.inner.log.page(&key, since, epoch, limit)
    }

    /// Channels this node holds, and its connections' subscriptions.
    pub fn channel_counts(&self) -> (usize, usize) {
        (
            self.inner.log.channel_count(),
            self.inner.subscriptions.load(Ordering::Acquire),
        )
    }

    /// Registers a connection of `user` (acting as `role`) in `tenant`, with its
    /// resume snapshot when `resume` (since, epoch) is given.
    pub fn register(
        &self,
        tenant_name: &str,
        user: &str,
        role: Role,
        resume: Option<(u64, &str)>,
    ) -> Result<(Membership, Snapshot), Refusal> {
        let resume = resume.map(|(since, epoch)| (since, Some(epoch)));
        let open = self.inner.open.fetch_add(1, Ordering::AcqRel);
        if open >= self.inner.limits.max_connections {
            self.inner.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::ServerFull);
        }
        let tenant = self.tenant(tenant_name);
        let join = || {
            let mut state = tenant.lock();
            let tabs = state.users.get(user).map_or(0, Vec::len);
            if tabs >= self.inner.limits.max_connections_per_user {
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
            Ok((id, user, outbox))
        };
        let key = StreamKey::tenant(tenant_name);
        let ((id, user, outbox), snapshot) =
            match self.inner.log.attach(&key, resume, user, role, join) {
                Ok(attached) => attached,
                Err(refusal) => {
                    self.inner.open.fetch_sub(1, Ordering::AcqRel);
                    return Err(refusal);
                }
            };
        let replayed = snapshot.replay.as_ref().map_or(0, |r| r.entries.len());
        {
            let mut state = tenant.lock();
            let open = state.connections.len();
            state.analytics.connection(open, replayed);
        }
        self.inner.metrics.connections_total.inc();
        self.inner.metrics.connections_current.inc();
        let membership = Membership {
            hub: self.clone(),
            tenant,
            id,
            user,
            role,
            outbox,
            subscriptions: None,
        };
        Ok((membership, snapshot))
    }

    /// Open connections of `user` in `tenant` (on this node).
    pub fn presence(&self, tenant: &str, user: &str) -> usize {
        let tenants = self.inner.tenants.read().unwrap_or_else(|p| p.into_inner());
        let Some(tenant) = tenants.get(tenant) else {
            return 0;
        };
        let state = tenant.lock();
        state.users.get(user).map_or(0, Vec::len)
    }

    /// This node's connection counts as presence fields (see
    /// [`crate::redis::presence_field`]): per tenant, its admins, each user.
    pub fn presence_counts(&self) -> std::collections::HashMap<String, u64> {
        use crate::redis::presence_field;
        let tenants: Vec<(Box<str>, Arc<Tenant>)> = self
            .inner
            .tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, tenant)| (name.clone(), Arc::clone(tenant)))
            .collect();
        let mut counts = std::collections::HashMap::new();
        for (name, tenant) in tenants {
            let state = tenant.lock();
            if state.connections.is_empty() {
                continue;
            }
            counts.insert(
                presence_field::tenant(&name),
                state.connections.len() as u64,
            );
            let admins = state
                .connections
                .values()
                .filter(|c| c.role == Role::Admin)
                .count();
            if admins > 0 {
                counts.insert(presence_field::admins(&name), admins as u64);
            }
            for (user, ids) in &state.users {
                counts.insert(presence_field::user(&name, user), ids.len() as u64);
            }
            for (channel, ids) in &state.channels {
                counts.insert(presence_field::channel(&name, channel), ids.len() as u64);
            }
        }
        counts
    }

    /// The tenant's per-minute counters for the last hour.
    pub fn analytics(&self, tenant: &str) -> Vec<Minute> {
        let tenants = self.inner.tenants.read().unwrap_or_else(|p| p.into_inner());
        match tenants.get(tenant) {
            Some(tenant) => tenant.lock().analytics.report(),
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
        Arc::clone(tenants.entry(name.into()).or_insert_with(|| {
            Arc::new(Tenant {
                name: name.into(),
                state: Mutex::default(),
            })
        }))
    }
}

impl Tenant {
    fn lock(&self) -> MutexGuard<'_, TenantState> {
        // Every critical section leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TenantState {
    fn subscribers(&self, channel: &str) -> &[u64] {
        self.channels.get(channel).map_or(&[][..], Vec::as_slice)
    }

    /// Queues a channel's message for its subscribers; returns how many.
    fn fan_out_channel(&self, channel: &str, envelope: &Arc<Envelope>) -> usize {
        let ids = self.subscribers(channel);
        for connection in ids.iter().filter_map(|id| self.connections.get(id)) {
            connection.outbox.push(envelope);
        }
        ids.len()
    }

    /// Takes connection `id` out of `channel`'s subscribers.
    fn leave_channel(&mut self, channel: &str, id: u64) {
        if let Some(ids) = self.channels.get_mut(channel) {
            ids.retain(|other| *other != id);
            if ids.is_empty() {
                self.channels.remove(channel);
            }
        }
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

impl Membership {
    /// Whether this connection follows `channel`.
    pub fn follows(&self, channel: &str) -> bool {
        self.subscriptions
            .as_ref()
            .is_some_and(|subs| subs.iter().any(|c| &**c == channel))
    }

    /// How many channels this connection follows.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.as_ref().map_or(0, |subs| subs.len())
    }

    /// Subscribes this connection to `channel`, with a replay from `resume`
    /// (since, and the epoch if the client gave one). Taken under the
    /// channel's cache lock with the registration, so every later message
    /// of the channel reaches the outbox and every earlier one is in the
    /// snapshot. Subscribing again first drops the old subscription and its
    /// queued frames: one stream, never two. Call [`Hub::prepare_channel`] first.
    pub fn subscribe(
        &mut self,
        channel: &str,
        resume: Option<(u64, Option<&str>)>,
        max: usize,
    ) -> Result<Snapshot, SubscribeError> {
        if self.follows(channel) {
            self.unsubscribe(channel);
        } else if self.subscription_count() >= max {
            return Err(SubscribeError::TooMany);
        }
        let name: Arc<str> = Arc::from(channel);
        let key = StreamKey::channel(&self.tenant.name, channel);
        let join = || {
            let mut state = self.tenant.lock();
            let ids = state.channels.entry(Arc::clone(&name)).or_default();
            ids.push(self.id);
            Ok::<_, SubscribeError>(())
        };
        let hub = self.hub.clone();
        let ((), snapshot) = hub
            .inner
            .log
            .attach(&key, resume, &self.user, self.role, join)?;
        self.subscriptions
            .get_or_insert_with(Box::default)
            .push(name);
        hub.inner.subscriptions.fetch_add(1, Ordering::AcqRel);
        hub.inner.metrics.channel_subscriptions.inc();
        Ok(snapshot)
    }

    /// Ends the subscription to `channel` (if any) and drops its frames
    /// still queued: none of that channel reaches the socket after this.
    /// Returns whether it was subscribed.
    pub fn unsubscribe(&mut self, channel: &str) -> bool {
        let Some(subs) = self.subscriptions.as_mut() else {
            return false;
        };
        let Some(at) = subs.iter().position(|c| &**c == channel) else {
            return false;
        };
        subs.swap_remove(at);
        if subs.is_empty() {
            self.subscriptions = None;
        }
        self.tenant.lock().leave_channel(channel, self.id);
        self.outbox.purge_channel(channel);
        self.hub.inner.subscriptions.fetch_sub(1, Ordering::AcqRel);
        self.hub.inner.metrics.channel_subscriptions.dec();
        true
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut state = self.tenant.lock();
        if let Some(subs) = self.subscriptions.take() {
            for channel in subs.iter() {
                state.leave_channel(channel, self.id);
            }
            self.hub
                .inner
                .subscriptions
                .fetch_sub(subs.len(), Ordering::AcqRel);
            self.hub
                .inner
                .metrics
                .channel_subscriptions
                .dec_by(subs.len() as i64);
        }
        state.connections.remove(&self.id);
        if let Some(ids) = state.users.get_mut(&self.user) {
            ids.retain(|id| *id != self.id);
            if ids.is_empty() {
                state.users.remove(&self.user);
            }
        }
        drop(state);
        self.hub.inner.open.fetch_sub(1, Ordering::AcqRel);
        self.hub.inner.metrics.connections_current.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Engine;
    use outbox::Taken;

    fn hub(per_user: usize, total: usize) -> Hub {
        let limits = Limits {
            send_queue: 16,
            max_connections: total,
            max_connections_per_user: per_user,
        };
        Hub::new(
            limits,
            Arc::new(Metrics::new()),
            Log::new(Engine::Memory, 100, usize::MAX),
        )
    }

    fn data() -> Value {
        serde_json::json!({})
    }

    fn seqs(membership: &Membership) -> Vec<u64> {
        match membership.outbox.take() {
            Taken::Frames(frames) => frames.iter().map(|e| e.seq).collect(),
            Taken::Overflowed => panic!("overflowed"),
            Taken::Restart => panic!("restarted"),
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

        async fn durable_hub(store: &Store, send_queue: usize) -> Hub {
            let limits = Limits {
                send_queue,
                max_connections: 100,
                max_connections_per_user: 5,
            };
            let log = Log::new(Engine::Sqlite(store.clone()), 100, usize::MAX);
            log.restore().await.unwrap();
            Hub::new(limits, Arc::new(Metrics::new()), log)
        }

        fn next_seq(hub: &Hub) -> u64 {
            hub.inner.log.next_seq(&StreamKey::tenant("t"))
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
            let hub = durable_hub(&store, 16).await;
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
            let hub = durable_hub(&store, 16).await;
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
            let hub = durable_hub(&store, 16).await;
            let (member, _) = hub.register("t", "u", Role::User, None).unwrap();
            hub.publish("t", "x", &data(), Target::Broadcast)
                .await
                .unwrap();
            store.close().await;
            let refused = hub.publish("t", "x", &data(), Target::Broadcast).await;
            assert_eq!(refused.unwrap_err(), LogError::Closed);
            assert_eq!(seqs(&member), [1]);
            let (_, snapshot) = hub.register("t", "u", Role::User, None).unwrap();
            assert_eq!(snapshot.head, 1);
            assert_eq!(next_seq(&hub), 2, "a refused seq is free again");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_publishes_reach_a_connection_in_seq_order() {
            let dir = TempDir::new();
            let store = open(&dir);
            let hub = durable_hub(&store, 10_000).await;
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
            let hub = durable_hub(&store, 16).await;
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
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while next_seq(&hub) < 3 {
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
