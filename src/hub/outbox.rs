//! The bounded outbound queue of one connection.
//!
//! Publishers push under the tenant lock and never wait: when the queue holds
//! `SEND_QUEUE` messages the push is refused, the outbox is marked overflowed and
//! the session closes its socket with 4503. The session takes the whole queue at
//! once and writes it in one go, so a burst costs one wake-up and one write
//! instead of one per message. An idle outbox holds no allocation.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use crate::log::Envelope;

#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// The session task, woken when the queue goes from empty to non-empty.
    waker: AtomicWaker,
    capacity: usize,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Arc<Envelope>>,
    overflowed: bool,
    /// The log's history changed under this connection: close it with 1012.
    restart: bool,
}

/// What [`Outbox::take`] hands to the session.
pub enum Taken {
    Frames(VecDeque<Arc<Envelope>>),
    /// The queue overflowed: the connection must be closed with 4503.
    Overflowed,
    /// The stream started over (a new epoch): close with 1012 so the client resumes.
    Restart,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Outbox {
            state: Mutex::default(),
            waker: AtomicWaker::new(),
            capacity,
        }
    }

    /// Queues `envelope`; returns false (and marks the outbox) if it is full.
    pub fn push(&self, envelope: &Arc<Envelope>) -> bool {
        let mut state = self.lock();
        if state.overflowed || state.restart {
            return false;
        }
        if state.queue.len() >= self.capacity {
            state.overflowed = true;
            state.queue = VecDeque::new();
            drop(state);
            self.waker.wake();
            return false;
        }
        let was_empty = state.queue.is_empty();
        state.queue.push_back(Arc::clone(envelope));
        drop(state);
        if was_empty {
            self.waker.wake();
        }
        true
    }

    /// Drops what is queued and has the session close with 1012: nothing
    /// more of the old history reaches this connection.
    pub fn restart(&self) {
        let mut state = self.lock();
        state.restart = true;
        state.queue = VecDeque::new();
        drop(state);
        self.waker.wake();
    }

    /// Drops the queued frames of `channel` (after an unsubscribe).
    pub fn purge_channel(&self, channel: &str) {
        let mut state = self.lock();
        state
            .queue
            .retain(|envelope| envelope.channel.as_deref() != Some(channel));
    }

    /// Ready when there is something to take (frames, an overflow, a restart).
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        let state = self.lock();
        if state.overflowed || state.restart || !state.queue.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    pub fn is_overflowed(&self) -> bool {
        self.lock().overflowed
    }

    /// Takes everything queued, leaving an empty (unallocated) queue behind.
    pub fn take(&self) -> Taken {
        let mut state = self.lock();
        if state.overflowed {
            Taken::Overflowed
        } else if state.restart {
            Taken::Restart
        } else {
            Taken::Frames(std::mem::take(&mut state.queue))
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_is_sticky_and_drops_the_queue() {
        let outbox = Outbox::new(2);
        assert!(outbox.push(&Envelope::for_test(1)));
        assert!(outbox.push(&Envelope::for_test(2)));
        assert!(!outbox.push(&Envelope::for_test(3)));
        assert!(!outbox.push(&Envelope::for_test(4)));
        assert!(matches!(outbox.take(), Taken::Overflowed));
    }

    #[test]
    fn take_returns_everything_in_order() {
        let outbox = Outbox::new(8);
        for seq in 1..=3 {
            assert!(outbox.push(&Envelope::for_test(seq)));
        }
        let Taken::Frames(frames) = outbox.take() else {
            panic!("not overflowed")
        };
        assert_eq!(frames.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        let Taken::Frames(frames) = outbox.take() else {
            panic!("not overflowed")
        };
        assert!(frames.is_empty());
    }
}
