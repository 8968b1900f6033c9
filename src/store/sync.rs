//! The WAL syncer of `STORE_SYNC=normal` ([`super::Durability::Normal`]).
//!
//! With `synchronous = NORMAL` SQLite writes every commit into the WAL but
//! fsyncs the WAL only when a checkpoint runs (`checkpoint.rs`: while the
//! WAL grows, and not while it does not), so how much a power cut could take
//! back would depend on the traffic. This
//! thread bounds it by time: every `interval` it fsyncs the `-wal` file
//! itself (`fdatasync` of the same inode SQLite writes through; a commit's
//! frames are written before its `COMMIT` returns, so every commit
//! acknowledged before a sync started is on the disk when it ends). It runs
//! beside the writer thread, so group commit never waits for it. A crash or
//! `kill -9` loses nothing either way: the written frames are in the OS
//! already, and SQLite's WAL checksums make recovery stop at the last whole
//! commit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use super::StoreError;

/// Stops the syncer when dropped (with the last [`super::Store`] handle).
pub(crate) struct WalSync {
    _stop: mpsc::Sender<()>,
    /// fsyncs done, for tests and diagnostics.
    syncs: Arc<AtomicU64>,
}

impl WalSync {
    /// Starts syncing `wal` every `interval`.
    pub(crate) fn spawn(wal: PathBuf, interval: Duration) -> Result<WalSync, StoreError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let syncs = Arc::new(AtomicU64::new(0));
        let counter = syncs.clone();
        std::thread::Builder::new()
            .name("agentcast-wal-sync".into())
            .spawn(move || {
                // Only a timeout goes on; a dropped sender is the stop.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    match std::fs::File::open(&wal).and_then(|file| file.sync_data()) {
                        Ok(()) => {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        // No WAL yet, or checkpointed away at a clean stop.
                        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                        Err(error) => tracing::warn!(%error, "store: syncing the WAL failed"),
                    }
                }
            })?;
        Ok(WalSync { _stop: stop, syncs })
    }

    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::testing::TempDir;
    use super::super::{Durability, Store, StoreOptions};
    use super::*;

    fn open(dir: &TempDir, durability: Durability) -> Store {
        let options = StoreOptions {
            durability,
            wal_sync_interval: Duration::from_millis(10),
            ..StoreOptions::default()
        };
        Store::open_with(dir.path(), options).unwrap()
    }

    #[tokio::test]
    async fn normal_syncs_the_wal_on_its_interval_and_full_needs_no_syncer() {
        let dir = TempDir::new();
        let store = open(&dir, Durability::Normal);
        store.ensure_log("acme").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.wal_syncs() == Some(0) {
            assert!(Instant::now() < deadline, "the WAL was never synced");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(store.wal_syncs() > Some(0));
        store.close().await;
        let full = TempDir::new();
        assert_eq!(open(&full, Durability::Full).wal_syncs(), None);
    }
}
