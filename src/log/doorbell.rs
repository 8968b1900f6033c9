//! How the store's writer thread wakes the delivery task: through the
//! runtime's I/O driver, not through a waker.
//!
//! A task woken by a waker from outside the runtime's threads is queued at
//! the tail of the runtime's global queue. Right after a fan-out that queue
//! holds most of the connection tasks it woke (a worker's own queue holds
//! only 256), so a delivery woken that way — and with it every publisher's
//! 202, and so the next publish — waits until every one of those
//! connections has written. Each connection task then finds only one
//! commit's messages per wake-up, and pays a socket write for them: issue 9
//! measured ~7 frames per write with SQLite against ~23 with the memory
//! engine. A readiness event is seen at the worker's next poll of the I/O
//! driver (every few dozen task polls under load), and the task it wakes
//! runs next.
//!
//! The bell is a byte on a socket pair, rung only when the task is about to
//! sleep ([`Door::arm`]), so a steady stream of commits costs no syscall.

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream as StdStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::UnixStream;

/// The writer thread's side.
#[derive(Debug)]
pub(super) struct Bell {
    armed: Arc<AtomicBool>,
    socket: StdStream,
}

/// The delivery task's side.
#[derive(Debug)]
pub(super) struct Door {
    armed: Arc<AtomicBool>,
    socket: UnixStream,
}

/// A connected bell and door. Call it inside the runtime.
pub(super) fn pair() -> std::io::Result<(Bell, Door)> {
    let (ring, listen) = StdStream::pair()?;
    // The writer thread never blocks on it: a full socket is a rung bell.
    ring.set_nonblocking(true)?;
    listen.set_nonblocking(true)?;
    let armed = Arc::new(AtomicBool::new(false));
    let bell = Bell {
        armed: Arc::clone(&armed),
        socket: ring,
    };
    let door = Door {
        armed,
        socket: UnixStream::from_std(listen)?,
    };
    Ok((bell, door))
}

impl Bell {
    /// Wakes the door's task if it is asleep (or about to sleep). Call it
    /// after making the task's work visible.
    pub(super) fn ring(&self) {
        // AcqRel on both sides: either this swap sees the door's arming, or
        // the door's swap sees this one and with it the work made visible
        // before it (see `Door::arm`).
        if self.armed.swap(false, Ordering::AcqRel) {
            // WouldBlock: unread bytes are there, the door is readable anyway.
            let _ = (&self.socket).write(&[1]);
        }
    }
}

impl Door {
    /// Asks for a ring; true when newly armed, and then the caller must look
    /// for work once more before [`Door::wait`]: what was made visible
    /// before a ring that did not see the arming is visible now.
    pub(super) fn arm(&self) -> bool {
        !self.armed.swap(true, Ordering::AcqRel)
    }

    /// Waits for a ring; false once the bell is gone.
    pub(super) async fn wait(&mut self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            if self.socket.readable().await.is_err() {
                return false;
            }
            let mut rung = false;
            loop {
                match self.socket.try_read(&mut buf) {
                    Ok(0) => return false,
                    Ok(_) => rung = true,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            }
            if rung {
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ring_from_another_thread_wakes_an_armed_door_and_an_unarmed_one_is_not_rung() {
        let (bell, mut door) = pair().unwrap();
        // Not armed: no byte is written, so nothing is readable.
        bell.ring();
        let mut probe = [0u8; 1];
        assert!(door.socket.try_read(&mut probe).is_err());
        assert!(door.arm());
        assert!(!door.arm(), "already armed");
        let ringer = std::thread::spawn(move || {
            bell.ring();
            bell
        });
        let bell = ringer.join().unwrap();
        let rung = tokio::time::timeout(std::time::Duration::from_secs(5), door.wait()).await;
        assert_eq!(rung.ok(), Some(true));
        drop(bell);
        let gone = tokio::time::timeout(std::time::Duration::from_secs(5), door.wait()).await;
        assert_eq!(gone.ok(), Some(false));
    }
}
