//! The store's tables, the connection settings every connection shares, and
//! the versioned migrations applied at start.
//!
//! The schema version lives in SQLite's own `PRAGMA user_version`. Migration
//! `n` moves the file from version `n - 1` to `n` inside one transaction that
//! also bumps the version, so a crash mid-migration leaves the previous
//! version intact and the next start simply runs it again. Released
//! migrations are never edited: a change is a new entry at the end.

use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

use super::{Durability, StoreError};

/// How long a statement waits for a lock held by another connection (a
/// reader checkpointing, another process opening the same file) before it
/// fails with [`StoreError::Busy`].
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Migrations, oldest first; entry `i` produces schema version `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: tenant logs, accounts, api keys, and the view tables of the next step.
    r#"
    -- One row per tenant log. `epoch` is created once and never changes: it
    -- names this history. `head` is the highest seq ever committed; it is
    -- raised in the same transaction as the messages, so it never goes back.
    CREATE TABLE logs (
        tenant     TEXT    NOT NULL PRIMARY KEY,
        epoch      TEXT    NOT NULL,
        head       INTEGER NOT NULL DEFAULT 0 CHECK (head >= 0),
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;

    -- The newest HISTORY_SIZE messages of each log (older rows are trimmed).
    -- `body` is the frame exactly as it goes on the socket.
    CREATE TABLE messages (
        tenant      TEXT    NOT NULL REFERENCES logs (tenant),
        seq         INTEGER NOT NULL CHECK (seq > 0),
        id          TEXT    NOT NULL,
        kind        TEXT    NOT NULL,
        target_user TEXT,
        ts_ms       INTEGER NOT NULL,
        body        TEXT    NOT NULL
    );
    CREATE UNIQUE INDEX messages_tenant_seq ON messages (tenant, seq);

    -- Accounts. Usernames compare case-insensitively (they are ASCII only),
    -- so "Alice" and "alice" cannot both exist in one tenant.
    CREATE TABLE users (
        id            TEXT    NOT NULL PRIMARY KEY,
        tenant        TEXT    NOT NULL,
        username      TEXT    NOT NULL COLLATE NOCASE,
        password_hash TEXT    NOT NULL,
        role          TEXT    NOT NULL CHECK (role IN ('admin', 'user')),
        created_at    INTEGER NOT NULL,
        UNIQUE (tenant, username)
    ) WITHOUT ROWID;

    -- API keys: only the SHA-256 of the key is kept; `prefix` lets a person
    -- recognise a key in a list. Revoked keys stay for the record.
    CREATE TABLE api_keys (
        id           TEXT    NOT NULL PRIMARY KEY,
        tenant       TEXT    NOT NULL,
        name         TEXT    NOT NULL,
        prefix       TEXT    NOT NULL,
        key_hash     BLOB    NOT NULL UNIQUE CHECK (length(key_hash) = 32),
        created_at   INTEGER NOT NULL,
        last_used_at INTEGER,
        revoked_at   INTEGER
    );
    CREATE INDEX api_keys_tenant ON api_keys (tenant, created_at);

    -- Views (SPEC §5): the latest task_update per task and the current agents.
    -- `visible_to` is the user the setting message was addressed to, NULL when
    -- it was a broadcast; `data` keeps the message's whole `data` object.
    CREATE TABLE tasks (
        tenant     TEXT    NOT NULL,
        task_id    TEXT    NOT NULL,
        status     TEXT    NOT NULL,
        query      TEXT,
        progress   REAL,
        seq        INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        visible_to TEXT,
        data       TEXT    NOT NULL DEFAULT '{}',
        PRIMARY KEY (tenant, task_id)
    ) WITHOUT ROWID;

    CREATE TABLE agents (
        tenant     TEXT    NOT NULL,
        agent_id   TEXT    NOT NULL,
        name       TEXT,
        seq        INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        data       TEXT    NOT NULL DEFAULT '{}',
        PRIMARY KEY (tenant, agent_id)
    ) WITHOUT ROWID;
    "#,
    // 2: messages addressed to a tenant's admins (Target::Admins) must stay
    // addressed to them after a restart; `target_user` alone cannot say so.
    // NULL: no role restriction (a broadcast, or a user's message).
    r#"
    ALTER TABLE messages ADD COLUMN target_role TEXT
        CHECK (target_role IS NULL OR target_role = 'admin');
    "#,
    // 3: the views (SPEC §5) get the same addressing as messages: an entry
    // set by a message to the admins is for admins only (`visible_role`), and
    // agents, like tasks, are visible to whom their message was addressed.
    // Lists are read newest first per tenant, hence the (tenant, seq) indexes.
    r#"
    ALTER TABLE tasks ADD COLUMN visible_role TEXT
        CHECK (visible_role IS NULL OR visible_role = 'admin');
    ALTER TABLE agents ADD COLUMN visible_to TEXT;
    ALTER TABLE agents ADD COLUMN visible_role TEXT
        CHECK (visible_role IS NULL OR visible_role = 'admin');
    CREATE INDEX tasks_by_seq ON tasks (tenant, seq);
    CREATE INDEX agents_by_seq ON agents (tenant, seq);
    "#,
];

/// The schema version this binary writes.
pub(crate) const VERSION: u32 = MIGRATIONS.len() as u32;

/// Settings for the one read-write connection.
///
/// [`Durability::Full`] is `synchronous = FULL`: in WAL mode every commit
/// then waits for the WAL to reach the disk (one fsync per commit). NORMAL
/// (the default) only fsyncs at checkpoints: still safe against `kill -9`
/// (the OS holds the written pages, and the file never corrupts), and the
/// store's WAL syncer (`sync.rs`) bounds what a power loss could drop to the
/// last sync interval. Group commit makes one fsync
/// cover a whole batch of publishes, which is what makes FULL affordable.
pub(crate) fn configure_writer(
    conn: &Connection,
    durability: Durability,
    wal_bound_pages: u32,
) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Io(format!(
            "could not switch the store to WAL mode (got {mode:?})"
        )));
    }
    let synchronous = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.execute_batch(
        "PRAGMA foreign_keys = ON;
         -- Cap the WAL file kept on disk after a checkpoint (bytes).
         PRAGMA journal_size_limit = 67108864;
         -- Up to 8 MiB of pages in memory: appends to many logs (channels)
         -- land all over the messages index, and the hot leaf of each log
         -- should stay cached. Not more: a commit after a page split in the
         -- middle of a B-tree (every few commits with many channels) walks
         -- the whole page cache (balance_nonroot renumbers pages through
         -- the pending-byte page, and the commit's cache truncation then
         -- scans every hash slot). At 32 MiB that walk was a fifth of the
         -- writer's time: 10,000 channels at 64 in flight went from 7.8k
         -- to 9.9k publishes/s at 8 MiB, one tenant log unchanged.
         PRAGMA cache_size = -8192;
         PRAGMA temp_store = MEMORY;",
    )?;
    // Checkpoints run on a thread of their own (`checkpoint.rs`); the
    // writer's automatic one only bounds the WAL.
    conn.pragma_update(None, "wal_autocheckpoint", wal_bound_pages)?;
    Ok(())
}

/// Settings for the read-only connections.
pub(crate) fn configure_reader(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;")?;
    Ok(())
}

/// Brings the file up to [`VERSION`], one transaction per migration.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: u32 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if found > VERSION {
        return Err(StoreError::TooNew {
            found,
            supported: VERSION,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = index as u32 + 1;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Another process may have migrated while we waited for the lock.
        let current: u32 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if current >= version {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!(version, "store schema migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_run_once_and_set_the_version() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let version: u32 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, VERSION);
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table'
                 AND name IN ('logs', 'messages', 'users', 'api_keys', 'tasks', 'agents')",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(tables, 6);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", VERSION + 1)
            .unwrap();
        assert!(matches!(migrate(&mut conn), Err(StoreError::TooNew { .. })));
    }
}
