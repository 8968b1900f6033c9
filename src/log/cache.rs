//! [`StreamLog`]: the in-memory side of one stream — its epoch, committed
//! head and history (bounded by count and by bytes), and the resume rule of SPEC §4.3. It only ever
//! holds committed messages; connections are served from it.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{Envelope, Replay};
use crate::auth::Role;

/// One stream's committed messages, newest `capacity` of them.
#[derive(Debug)]
pub struct StreamLog {
    /// Random id of this history; a client holding another epoch cannot resume.
    epoch: String,
    /// The highest committed `seq` (0 before the first commit): what a
    /// connection is told is the head, and the last entry of `history`.
    head: u64,
    /// The newest messages, oldest first: at most `capacity` of them and at
    /// most `max_bytes` of frame text (`HISTORY_SIZE`, `HISTORY_BYTES`),
    /// whichever is reached first; the newest one is kept whatever its size.
    history: VecDeque<Arc<Envelope>>,
    capacity: usize,
    max_bytes: usize,
    /// Frame text held in `history`, kept beside it so a push trims in O(1).
    bytes: usize,
}

impl StreamLog {
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        let epoch = uuid::Uuid::new_v4().simple().to_string();
        StreamLog::with_epoch(epoch, capacity, max_bytes)
    }

    pub fn with_epoch(epoch: String, capacity: usize, max_bytes: usize) -> Self {
        StreamLog {
            epoch,
            head: 0,
            history: VecDeque::new(),
            capacity,
            max_bytes,
            bytes: 0,
        }
    }

    /// A log rebuilt from its engine: its epoch, committed head and newest
    /// messages (oldest first, seqs increasing; older ones beyond `capacity`
    /// or `max_bytes` are dropped).
    pub fn restore(
        epoch: String,
        head: u64,
        history: impl IntoIterator<Item = Arc<Envelope>>,
        capacity: usize,
        max_bytes: usize,
    ) -> Self {
        let mut log = StreamLog::with_epoch(epoch, capacity, max_bytes);
        for envelope in history {
            log.push(envelope);
        }
        // The head row may be above the newest kept message (trimmed or holes).
        log.head = log.head.max(head);
        log
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    /// The newest messages after `since`, oldest first, at most `limit` of
    /// them, for the history endpoint of a channel (whose messages are for
    /// every subscriber); `complete` as in [`StreamLog::resume`].
    pub fn page(&self, since: u64, epoch: &str, limit: usize) -> Replay {
        let mut page = self.resume(since, epoch, "", crate::auth::Role::Admin);
        page.entries.truncate(limit);
        page
    }

    /// Messages kept in history.
    pub fn len(&self) -> usize {
        self.history.len()
    }

    /// Frame text kept in history, in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.history.is_empty()
    }

    /// Adds a committed message. Seqs arrive increasing but not necessarily
    /// consecutive: a failed append leaves a hole that no client ever sees
    /// (not live, not in a replay, not as a head), so resume is unaffected.
    /// Returns false (and keeps nothing) for a seq not above the head.
    pub fn push(&mut self, envelope: Arc<Envelope>) -> bool {
        debug_assert!(envelope.seq > self.head, "seq must grow");
        if envelope.seq <= self.head {
            return false;
        }
        self.head = envelope.seq;
        if self.capacity == 0 {
            // A live-only channel (`CHANNEL_HISTORY=0`) keeps nothing.
            return true;
        }
        self.bytes = self.bytes.saturating_add(envelope.text.len());
        self.history.push_back(envelope);
        // Never below one message: the newest stays even if it alone is over.
        while self.history.len() > 1
            && (self.history.len() > self.capacity || self.bytes > self.max_bytes)
        {
            if let Some(oldest) = self.history.pop_front() {
                self.bytes = self.bytes.saturating_sub(oldest.text.len());
            }
        }
        true
    }

    /// Takes the engine's word for this log's epoch and head, when they
    /// differ from what memory believed (a log the engine created otherwise).
    /// A different epoch is a different history: the cached one goes.
    pub fn adopt(&mut self, epoch: String, head: u64) {
        if epoch != self.epoch {
            self.epoch = epoch;
            self.history.clear();
            self.bytes = 0;
        }
        self.head = self.head.max(head);
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
        if epoch != self.epoch || since > self.head || self.capacity == 0 {
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
    use crate::log::Target;

    fn publish(log: &mut StreamLog, target: Target) {
        let data = serde_json::json!({});
        let seq = log.head() + 1;
        log.push(Arc::new(Envelope::encode(
            "t", &data, "id", seq, "ts", target,
        )));
    }

    #[test]
    fn resume_replays_only_what_is_addressed_after_since() {
        let mut log = StreamLog::new(100, usize::MAX);
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
        let mut log = StreamLog::new(3, usize::MAX);
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

    #[test]
    fn a_failed_seq_is_a_hole_that_resume_steps_over() {
        let mut log = StreamLog::new(100, usize::MAX);
        // seq 2 failed in the engine: 1 and 3 committed.
        log.push(Envelope::for_test(1));
        log.push(Envelope::for_test(3));
        let epoch = log.epoch().to_owned();
        let replay = log.resume(0, &epoch, "u", Role::User);
        assert!(replay.complete);
        assert_eq!(replay.to, 3);
        assert_eq!(
            replay.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 3]
        );
        // A client that saw 1 resumes without waiting for 2.
        assert!(log.resume(1, &epoch, "u", Role::User).complete);
    }

    /// A broadcast whose frame text is `len` bytes or a little more.
    fn sized(seq: u64, len: usize) -> Arc<Envelope> {
        Envelope::for_test_with(seq, &serde_json::json!({ "pad": "x".repeat(len) }))
    }

    #[test]
    fn history_is_bounded_by_bytes_before_count() {
        let frame = sized(10, 4096).text.len();
        // Room for 10 frames by count, 4 by bytes.
        let mut log = StreamLog::new(10, 4 * frame + frame / 2);
        for seq in 1..=40 {
            log.push(sized(seq, 4096));
        }
        assert_eq!(log.len(), 4);
        assert_eq!(log.bytes(), 4 * frame);
        let epoch = log.epoch().to_owned();
        let replay = log.resume(0, &epoch, "u", Role::User);
        assert!(!replay.complete, "bytes trimming lost seqs 1..=36");
        assert_eq!(
            replay.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [37, 38, 39, 40]
        );
        assert!(log.resume(36, &epoch, "u", Role::User).complete);
        // The count bound still holds when it is the smaller one.
        let mut log = StreamLog::new(2, usize::MAX);
        for seq in 1..=5 {
            log.push(sized(seq, 10));
        }
        assert_eq!(log.len(), 2);
    }

    #[test]
    fn the_newest_message_stays_even_above_the_byte_bound() {
        let mut log = StreamLog::new(10, 100);
        log.push(sized(1, 10));
        log.push(sized(2, 500));
        assert_eq!(log.len(), 1);
        let epoch = log.epoch().to_owned();
        let replay = log.resume(1, &epoch, "u", Role::User);
        assert!(replay.complete);
        assert_eq!(replay.entries.len(), 1);
        log.adopt("other".into(), 2);
        assert_eq!((log.len(), log.bytes()), (0, 0));
    }

    #[test]
    fn restore_obeys_the_byte_bound() {
        let frame = sized(10, 1000).text.len();
        let log = StreamLog::restore(
            "e".into(),
            20,
            (1..=20).map(|s| sized(s, 1000)),
            100,
            3 * frame,
        );
        assert_eq!((log.head(), log.len(), log.bytes()), (20, 3, 3 * frame));
        assert!(!log.resume(0, "e", "u", Role::User).complete);
        assert!(log.resume(17, "e", "u", Role::User).complete);
    }

    #[test]
    fn restore_continues_above_the_stored_head() {
        let log = StreamLog::restore(
            "e".into(),
            9,
            (5..=7).map(Envelope::for_test),
            2,
            usize::MAX,
        );
        assert_eq!((log.epoch(), log.head(), log.len()), ("e", 9, 2));
        assert!(!log.resume(4, "e", "u", Role::User).complete);
        assert!(log.resume(5, "e", "u", Role::User).complete);
    }

    #[test]
    fn adopting_the_engines_epoch_drops_the_cached_history() {
        let mut log = StreamLog::new(10, usize::MAX);
        log.push(Envelope::for_test(1));
        let epoch = log.epoch().to_owned();
        log.adopt(epoch.clone(), 0);
        assert_eq!(
            (log.len(), log.head()),
            (1, 1),
            "same epoch: nothing changes"
        );
        log.adopt("stored".into(), 7);
        assert_eq!((log.epoch(), log.head(), log.len()), ("stored", 7, 0));
    }
}
