//! The fan-out core: tenants, their logs, and the connections of their users.
//!
//! A publish takes the tenant's lock, gets the next `seq`, serializes the message
//! once, appends it to the tenant log and pushes the shared bytes into the outbox
//! of every addressed connection. A connection registers under the same lock and
//! takes its resume snapshot there, so every message is either in its replay or
//! in its outbox — never both, never neither.

pub mod outbox;
pub mod session;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde_json::Value;

use crate::auth::Role;
use crate::log::{Replay, TenantLog};
use crate::metrics::Metrics;
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
    /// Open connections across tenants, checked against `max_connections`.
    open: AtomicUsize,
    next_connection_id: AtomicU64,
}

/// The hub's share of the settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub history_size: usize,
    pub send_queue: usize,
    pub max_connections: usize,
    pub max_connections_per_user: usize,
}

#[derive(Debug, Default)]
struct Tenant {
    state: Mutex<Option<TenantState>>,
}

#[derive(Debug)]
struct TenantState {
    log: TenantLog,
    connections: HashMap<u64, Connection>,
    /// user id -> ids of that user's connections (all tabs).
    users: HashMap<Arc<str>, Vec<u64>>,
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
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        Hub {
            inner: Arc::new(Inner {
                tenants: RwLock::default(),
                limits,
                metrics,
                open: AtomicUsize::new(0),
                next_connection_id: AtomicU64::new(1),
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Appends a message to the tenant's log and queues it for every addressed connection.
    pub fn publish(&self, tenant: &str, kind: &str, data: &Value, target: Target) -> Receipt {
        let id = uuid::Uuid::new_v4().to_string();
        let ts = wire::timestamp();
        let tenant = self.tenant(tenant);
        let mut guard = tenant.lock();
        let state = self.state(&mut guard);
        let envelope = Arc::new(Envelope::encode(
            kind,
            data,
            &id,
            state.log.next_seq(),
            &ts,
            target,
        ));
        let recipients = state.fan_out(&envelope);
        let seq = envelope.seq;
        state.log.push(envelope);
        drop(guard);
        self.inner.metrics.messages_published.inc();
        Receipt {
            id,
            seq,
            recipients,
        }
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
        Arc::clone(tenants.entry(name.into()).or_default())
    }

    /// The tenant's state, created on first use (so a tenant costs nothing until then).
    fn state<'a>(&self, guard: &'a mut MutexGuard<'_, Option<TenantState>>) -> &'a mut TenantState {
        guard.get_or_insert_with(|| TenantState {
            log: TenantLog::new(self.inner.limits.history_size),
            connections: HashMap::new(),
            users: HashMap::new(),
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
            send_queue: 16,
            max_connections: total,
            max_connections_per_user: per_user,
        };
        Hub::new(limits, Arc::new(Metrics::new()))
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

    #[test]
    fn to_user_reaches_all_tabs_of_that_user_only() {
        let hub = hub(5, 100);
        let (a1, _) = hub.register("t", "alice", Role::User, None).unwrap();
        let (a2, _) = hub.register("t", "alice", Role::User, None).unwrap();
        let (b, _) = hub.register("t", "bob", Role::User, None).unwrap();
        let (other, _) = hub.register("t2", "alice", Role::User, None).unwrap();
        let receipt = hub.publish("t", "x", &data(), Target::User("alice".into()));
        assert_eq!(receipt.recipients, 2);
        assert_eq!(seqs(&a1), [1]);
        assert_eq!(seqs(&a2), [1]);
        assert!(seqs(&b).is_empty());
        assert!(seqs(&other).is_empty());
    }

    #[test]
    fn to_admins_reaches_admin_connections_live_and_in_replay() {
        let hub = hub(5, 100);
        let (admin, snapshot) = hub.register("t", "root", Role::Admin, None).unwrap();
        let (user, _) = hub.register("t", "bob", Role::User, None).unwrap();
        let (other_tenant, _) = hub.register("t2", "root", Role::Admin, None).unwrap();
        let receipt = hub.publish("t", "system", &data(), Target::Admins);
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

    #[test]
    fn registration_splits_history_and_live_without_overlap() {
        let hub = hub(5, 100);
        for _ in 0..3 {
            hub.publish("t", "x", &data(), Target::Broadcast);
        }
        let (_, first) = hub.register("t", "u", Role::User, None).unwrap();
        let (member, snapshot) = hub
            .register("t", "u", Role::User, Some((1, &first.epoch)))
            .unwrap();
        hub.publish("t", "x", &data(), Target::Broadcast);
        let replay = snapshot.replay.unwrap();
        assert!(replay.complete);
        assert_eq!(
            replay.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(seqs(&member), [4]);
    }
}
