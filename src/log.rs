//! Tenant logs: each tenant's `seq` counter, `epoch` and bounded history, and
//! the resume rule of SPEC §4.3.
//!
//! This is the in-memory engine. A durable store (SQLite) and a shared one
//! (Redis) take its place behind the same calls — `append`, `head`, `resume` —
//! so the hub never learns which one it talks to.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::auth::Role;
use crate::hub::wire::Envelope;

/// One tenant's ordered log.
#[derive(Debug)]
pub struct TenantLog {
    /// Random id of this history; a client holding another epoch cannot resume.
    epoch: String,
    /// The last `seq` handed out (0 before the first publish).
    head: u64,
    /// The newest `capacity` messages, oldest first.
    history: VecDeque<Arc<Envelope>>,
    capacity: usize,
}

/// What a resuming connection gets: the frames to replay and the summary frame.
#[derive(Debug)]
pub struct Replay {
    pub entries: Vec<Arc<Envelope>>,
    pub from: u64,
    pub to: u64,
    pub complete: bool,
}

impl TenantLog {
    pub fn new(capacity: usize) -> Self {
        TenantLog {
            epoch: uuid::Uuid::new_v4().simple().to_string(),
            head: 0,
            history: VecDeque::new(),
            capacity,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    /// The next `seq`; the caller encodes the envelope with it and [`TenantLog::push`]es it.
    pub fn next_seq(&self) -> u64 {
        self.head + 1
    }

    pub fn push(&mut self, envelope: Arc<Envelope>) {
        debug_assert_eq!(envelope.seq, self.head + 1, "seq must grow by one");
        self.head = envelope.seq;
        if self.history.len() == self.capacity {
            self.history.pop_front();
        }
        self.history.push_back(envelope);
    }

    /// Everything addressed to `user` after `since`, if `epoch` is this log's.
    /// `complete` is false when the epoch differs or history no longer reaches back
    /// to `since`: the client must then reload its state over REST.
    pub fn resume(&self, since: u64, epoch: &str, user: &str, role: Role) -> Replay {
        let mut replay = Replay {
            entries: Vec::new(),
            from: since,
            to: self.head,
            complete: false,
        };
        if epoch != self.epoch || since > self.head {
            return replay;
        }
        let oldest = self.history.front().map_or(self.head + 1, |e| e.seq);
        replay.complete = since + 1 >= oldest;
        // History is ordered by seq, so skip straight to the first entry after `since`.
        let start = self.history.partition_point(|e| e.seq <= since);
        replay.entries = self
            .history
            .range(start..)
            .filter(|e| e.target.addresses(user, role))
            .cloned()
            .collect();
        replay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::wire::Target;

    fn publish(log: &mut TenantLog, target: Target) {
        let data = serde_json::json!({});
        let seq = log.next_seq();
        log.push(Arc::new(Envelope::encode(
            "t", &data, "id", seq, "ts", target,
        )));
    }

    #[test]
    fn resume_replays_only_what_is_addressed_after_since() {
        let mut log = TenantLog::new(100);
        publish(&mut log, Target::Broadcast);
        publish(&mut log, Target::User("bob".into()));
        publish(&mut log, Target::User("alice".into()));
        publish(&mut log, Target::Broadcast);
        let epoch = log.epoch().to_owned();
        let replay = log.resume(1, &epoch, "alice", Role::User);
        assert!(replay.complete);
        assert_eq!((replay.from, replay.to), (1, 4));
        assert_eq!(
            replay.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [3, 4]
        );
    }

    #[test]
    fn resume_is_incomplete_past_history_or_with_another_epoch() {
        let mut log = TenantLog::new(3);
        for _ in 0..10 {
            publish(&mut log, Target::Broadcast);
        }
        let epoch = log.epoch().to_owned();
        let old = log.resume(2, &epoch, "u", Role::User);
        assert!(!old.complete);
        assert_eq!(
            old.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [8, 9, 10]
        );
        assert!(log.resume(7, &epoch, "u", Role::User).complete);
        let foreign = log.resume(9, "other", "u", Role::User);
        assert!(!foreign.complete);
        assert!(foreign.entries.is_empty());
        assert!(log.resume(10, &epoch, "u", Role::User).complete);
        assert!(!log.resume(11, &epoch, "u", Role::User).complete);
    }
}
