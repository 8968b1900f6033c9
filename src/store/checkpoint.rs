//! The checkpointer: copies committed pages from the WAL into the database
//! file on a connection of its own, beside the writer thread.
//!
//! SQLite's automatic checkpoint runs inside the `COMMIT` that pushes the WAL
//! past its threshold, so the writer thread copied pages and waited for two
//! fsyncs (the WAL's, then the database's) while every publish queued behind
//! it: with appends spread over many channels, every few hundred commits.
//! This thread runs a PASSIVE checkpoint every [`BUSY_INTERVAL`] instead
//! (every [`IDLE_INTERVAL`] while the WAL does not grow); PASSIVE takes no
//! lock a writer waits for, so commits go on meanwhile.
//!
//! A concurrent checkpoint cannot empty the WAL by itself: the writer keeps
//! appending while it copies, and the WAL only starts over from its beginning
//! when a write transaction finds every frame copied. So the writer keeps an
//! automatic checkpoint of its own, at [`WAL_BOUND_PAGES`]: that bounds the
//! WAL, and when it runs most of the WAL has been copied here already, so it
//! has little left to do.
//!
//! Measured with the load tool (server pinned to one core, interleaved runs,
//! medians of 3, against the writer checkpointing every 1000 pages by
//! itself): `stream --channels 200 --rate 50` 5.9k -> 7.2k publishes/s and
//! POST p99 51 -> 29 ms; `channels --conns 10000 --in-flight 64` POST p99
//! 38 -> 15 ms at the same rate; one tenant log (`to-user`) unchanged.
//!
//! Checkpoints change nothing that is acknowledged: a frame is copied only
//! once it is committed, and marked copied only after the database file is
//! synced (this connection has the writer's `synchronous` setting).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::schema::BUSY_TIMEOUT;
use super::{Durability, StoreError};

/// How often the checkpointer copies what the WAL gained while it grows...
pub(crate) const BUSY_INTERVAL: Duration = Duration::from_millis(20);

/// ...and how often it looks while it does not.
pub(crate) const IDLE_INTERVAL: Duration = Duration::from_millis(500);

/// The writer's own automatic checkpoint, in pages of the WAL (about 40 MiB):
/// the WAL's bound when the checkpointer never catches up under sustained
/// writes. At SQLite's default (1000) the writer still checkpointed every
/// few hundred commits of the stream scenario.
pub(crate) const WAL_BOUND_PAGES: u32 = 10_000;

/// The running checkpointer; the writer thread owns it and stops it before
/// its own last checkpoint (see [`Checkpointer::stop`]).
pub(crate) struct Checkpointer {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
    /// Checkpoints that copied at least one page, for tests and diagnostics.
    copies: Arc<AtomicU64>,
}

impl Checkpointer {
    /// Opens a connection of its own to the database at `path` and starts
    /// checkpointing.
    pub(crate) fn spawn(path: PathBuf, durability: Durability) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // For opening the WAL while another connection recovers it; a
        // PASSIVE checkpoint itself never waits.
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // The checkpoint syncs the WAL before it copies and the database
        // before it marks the frames copied: never with fewer syncs than
        // the writer's.
        let synchronous = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", synchronous)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let copies = Arc::new(AtomicU64::new(0));
        let counter = copies.clone();
        let thread = std::thread::Builder::new()
            .name("agentcast-checkpoint".into())
            .spawn(move || {
                let mut last = Progress::default();
                let mut interval = IDLE_INTERVAL;
                // Only a timeout goes on; a dropped sender is the stop.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    let now = match checkpoint(&conn) {
                        Ok(progress) => progress,
                        Err(error) => {
                            tracing::warn!(%error, "store: checkpoint failed");
                            interval = IDLE_INTERVAL;
                            continue;
                        }
                    };
                    // A WAL that started over has fewer frames than before.
                    let restarted = now.frames < last.frames;
                    if now.copied > if restarted { 0 } else { last.copied } {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    interval = if now.frames != last.frames {
                        BUSY_INTERVAL
                    } else {
                        IDLE_INTERVAL
                    };
                    last = now;
                }
            })?;
        Ok(Checkpointer {
            stop,
            thread,
            copies,
        })
    }

    /// The count of checkpoints that copied pages, read by the store.
    pub(crate) fn copies(&self) -> Arc<AtomicU64> {
        self.copies.clone()
    }

    /// Stops the thread and waits for a checkpoint under way to end: a
    /// PASSIVE checkpoint here would make the writer's final TRUNCATE one
    /// give up (it does not wait for another checkpoint), leaving the WAL
    /// full after a clean stop.
    pub(crate) fn stop(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            tracing::error!("store: the checkpointer panicked");
        }
    }
}

/// Frames in the WAL, and how many of them are copied into the database.
#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    frames: i64,
    copied: i64,
}

/// One PASSIVE checkpoint (it copies what no reader still needs).
fn checkpoint(conn: &Connection) -> Result<Progress, StoreError> {
    // (busy, frames in the WAL, frames copied); -1, -1 when not in WAL mode.
    let (_, frames, copied): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?;
    Ok(Progress {
        frames: frames.max(0),
        copied: copied.max(0),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use futures_util::StreamExt;

    use super::super::testing::TempDir;
    use super::super::{Store, StoreOptions, StoredMessage, StoredTarget};
    use super::*;

    fn message(seq: u64) -> StoredMessage {
        StoredMessage {
            tenant: "acme".to_owned(),
            seq,
            target: StoredTarget::Broadcast,
            kind: "output".to_owned(),
            // About four to a page.
            body: format!(
                r#"{{"type":"output","seq":{seq},"data":"{}"}}"#,
                "x".repeat(900)
            ),
            id: format!("id-{seq}"),
            ts_ms: 1_700_000_000_000 + i64::try_from(seq).unwrap(),
            view: None,
        }
    }

    /// Appends 200 at a time until the checkpointer has copied pages (so it
    /// is busy); the last `seq` appended.
    async fn append_until_checkpointed(store: &Store) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seq = 0;
        while store.background_checkpoints() == 0 {
            assert!(
                Instant::now() < deadline,
                "no checkpoint after {seq} appends"
            );
            let appends: Vec<_> = (seq + 1..=seq + 200)
                .map(|seq| store.append(message(seq), Box::new(|| {})))
                .collect();
            seq += 200;
            for result in futures_util::future::join_all(appends).await {
                result.expect("append");
            }
        }
        seq
    }

    fn wal_bytes(dir: &TempDir) -> u64 {
        std::fs::metadata(dir.path().join("agentcast.db-wal")).map_or(0, |m| m.len())
    }

    #[tokio::test]
    async fn the_checkpointer_copies_the_wal_while_the_writer_appends() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        store.ensure_log("acme").await.unwrap();
        let seq = append_until_checkpointed(&store).await;
        store.close().await;
        let reopened = Store::open(dir.path()).unwrap();
        let logs = reopened.load_logs(10, 1 << 20).unwrap();
        assert_eq!(logs[0].head, seq, "every acknowledged append is there");
    }

    /// A clean stop checkpoints the whole WAL into the database (the README
    /// says a backup after it needs `agentcast.db` alone): the checkpointer
    /// is stopped first, as its PASSIVE checkpoint would make the writer's
    /// final one give up.
    #[tokio::test]
    async fn a_clean_stop_under_writes_leaves_an_empty_wal() {
        for round in 0..5 {
            let dir = TempDir::new();
            let store = Store::open(dir.path()).unwrap();
            store.ensure_log("acme").await.unwrap();
            // Write until the checkpointer is busy, then stop in the middle.
            let seq = append_until_checkpointed(&store).await;
            let last: Vec<_> = (seq + 1..=seq + 2000)
                .map(|seq| store.append(message(seq), Box::new(|| {})))
                .collect();
            store.close().await;
            for result in futures_util::future::join_all(last).await {
                result.expect("queued before the stop, so committed");
            }
            assert_eq!(
                wal_bytes(&dir),
                0,
                "round {round}: the WAL after a clean stop"
            );
        }
    }

    /// The checkpointer alone never catches up with a writer that does not
    /// pause, so the WAL would grow for as long as the writes go on: the
    /// writer's own checkpoint at the bound is what starts it over.
    #[tokio::test]
    async fn the_wal_stays_bounded_under_writes_that_never_pause() {
        let dir = TempDir::new();
        let bound_pages: u32 = 32;
        let options = StoreOptions {
            wal_bound_pages: bound_pages,
            ..StoreOptions::default()
        };
        let store = Store::open_with(dir.path(), options).unwrap();
        store.ensure_log("acme").await.unwrap();
        // Writes worth well over ten times the bound, all queued at once, so
        // the writer's queue never runs dry: each batch begins the moment the
        // last one committed, before any checkpoint could copy it.
        let appends: Vec<_> = (1..=8000)
            .map(|seq| store.append(message(seq), Box::new(|| {})))
            .collect();
        let mut largest = 0;
        let mut done = futures_util::stream::iter(appends).buffered(8192);
        while let Some(result) = done.next().await {
            result.expect("append");
            largest = largest.max(wal_bytes(&dir));
        }
        // A page in the WAL is its 4096 bytes and a 24-byte frame header. The
        // bound is checked after each commit, and one batch (1024 appends)
        // is about 250 pages; the writer's checkpoint may also be skipped for
        // a commit or two while the checkpointer holds the checkpoint lock.
        let frame = 4096 + 24;
        let allowed = 2 * (u64::from(bound_pages) + 250) * frame;
        assert!(
            largest <= allowed,
            "the WAL reached {largest} bytes, bound {bound_pages} pages (without the bound: 8.7 MB)"
        );
    }
}
