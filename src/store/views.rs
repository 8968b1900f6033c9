//! The views of SPEC §5, kept in the same transaction as the log: the latest
//! `task_update` per task and the current agents of each tenant, each entry
//! with the `seq` that set it and who may see it.
//!
//! The writer applies a [`ViewUpdate`] right after inserting its message (in
//! one savepoint), so a view never shows a message the log lost, and never
//! misses one the log kept: after a `kill -9` both are as of the last commit.
//! Visibility copies the message's addressing: a broadcast is everyone's, a
//! message to a user is that user's, one to the admins is theirs; admins see
//! every entry of their tenant.
//!
//! An update that leaves a field out keeps the entry's old value only when
//! everyone who may see the new entry could see the old one (same audience,
//! or the old one was a broadcast, or the new one is for admins): otherwise
//! bob would read a `query` or `name` that only alice's message set (SPEC §5,
//! issue 8 finding 4). So an entry shows the fields of its latest message,
//! filled in from earlier messages of the same or a broader audience only.

use rusqlite::{params, Connection};
use serde_json::Value;

use super::{Store, StoreError, StoredMessage};

/// What a published message changes in the views. Built by the log from the
/// message's `type` and `data` (already validated by the publish route); the
/// fields the lists show are read from `data` by SQLite itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewUpdate {
    /// A `task_update`: the task's entry becomes this message's `data`.
    Task { task_id: String, data: String },
    /// An `agent_update` with action `registered` or `updated`.
    AgentUpsert { agent_id: String, data: String },
    /// An `agent_update` with action `deleted`.
    AgentDelete { agent_id: String },
}

/// Who is reading a view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Viewer {
    pub tenant: String,
    pub user: String,
    /// Admins see every entry of their tenant.
    pub admin: bool,
}

/// One task as `GET /api/v1/tasks` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEntry {
    pub task_id: String,
    pub status: String,
    pub query: Option<String>,
    pub progress: Option<f64>,
    /// The seq of the message that set this state.
    pub seq: u64,
    pub updated_at_ms: i64,
    /// That message's whole `data` object.
    pub data: Value,
}

/// One agent as `GET /api/v1/agents` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEntry {
    pub agent_id: String,
    pub name: Option<String>,
    pub seq: u64,
    pub updated_at_ms: i64,
    pub data: Value,
}

impl ViewUpdate {
    /// The update a message of `kind` with `data` makes, if any. Data that
    /// lacks the identifying field changes nothing (the publish route
    /// refuses it anyway; other callers may be less strict).
    pub fn of(kind: &str, data: &Value) -> Option<ViewUpdate> {
        let text = |field: &str| {
            data.get(field)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        match kind {
            "task_update" => {
                text("status")?;
                Some(ViewUpdate::Task {
                    task_id: text("task_id")?,
                    data: data.to_string(),
                })
            }
            "agent_update" => {
                let agent_id = text("agent_id")?;
                match text("action")?.as_str() {
                    "deleted" => Some(ViewUpdate::AgentDelete { agent_id }),
                    _ => Some(ViewUpdate::AgentUpsert {
                        agent_id,
                        data: data.to_string(),
                    }),
                }
            }
            _ => None,
        }
    }

    /// Applies the update of `message` inside the writer's transaction. A
    /// later `seq` always wins, so replaying an old message changes nothing.
    pub(crate) fn apply(
        &self,
        conn: &Connection,
        message: &StoredMessage,
    ) -> Result<(), StoreError> {
        let (visible_to, visible_role) = message.target.columns();
        let seq = i64::try_from(message.seq).unwrap_or(i64::MAX);
        match self {
            ViewUpdate::Task { task_id, data } => {
                conn.prepare_cached(
                    "INSERT INTO tasks (tenant, task_id, status, query, progress, seq, updated_at,
                                        visible_to, visible_role, data)
                     VALUES (?1, ?2, json_extract(?3, '$.status'), json_extract(?3, '$.query'),
                             json_extract(?3, '$.progress'), ?4, ?5, ?6, ?7, ?3)
                     ON CONFLICT (tenant, task_id) DO UPDATE SET
                        status = excluded.status,
                        query = CASE WHEN (tasks.visible_to IS NULL AND tasks.visible_role IS NULL)
                                       OR excluded.visible_role IS NOT NULL
                                       OR tasks.visible_to = excluded.visible_to
                                     THEN coalesce(excluded.query, tasks.query)
                                     ELSE excluded.query END,
                        progress = CASE WHEN (tasks.visible_to IS NULL AND tasks.visible_role IS NULL)
                                          OR excluded.visible_role IS NOT NULL
                                          OR tasks.visible_to = excluded.visible_to
                                        THEN coalesce(excluded.progress, tasks.progress)
                                        ELSE excluded.progress END,
                        seq = excluded.seq,
                        updated_at = excluded.updated_at,
                        visible_to = excluded.visible_to,
                        visible_role = excluded.visible_role,
                        data = excluded.data
                     WHERE excluded.seq > tasks.seq",
                )?
                .execute(params![
                    message.tenant,
                    task_id,
                    data,
                    seq,
                    message.ts_ms,
                    visible_to,
                    visible_role
                ])?;
            }
            ViewUpdate::AgentUpsert { agent_id, data } => {
                conn.prepare_cached(
                    "INSERT INTO agents (tenant, agent_id, name, seq, updated_at,
                                         visible_to, visible_role, data)
                     VALUES (?1, ?2, json_extract(?3, '$.name'), ?4, ?5, ?6, ?7, ?3)
                     ON CONFLICT (tenant, agent_id) DO UPDATE SET
                        name = CASE WHEN (agents.visible_to IS NULL AND agents.visible_role IS NULL)
                                      OR excluded.visible_role IS NOT NULL
                                      OR agents.visible_to = excluded.visible_to
                                    THEN coalesce(excluded.name, agents.name)
                                    ELSE excluded.name END,
                        seq = excluded.seq,
                        updated_at = excluded.updated_at,
                        visible_to = excluded.visible_to,
                        visible_role = excluded.visible_role,
                        data = excluded.data
                     WHERE excluded.seq > agents.seq",
                )?
                .execute(params![
                    message.tenant,
                    agent_id,
                    data,
                    seq,
                    message.ts_ms,
                    visible_to,
                    visible_role
                ])?;
            }
            ViewUpdate::AgentDelete { agent_id } => {
                conn.prepare_cached("DELETE FROM agents WHERE tenant = ?1 AND agent_id = ?2")?
                    .execute(params![message.tenant, agent_id])?;
            }
        }
        Ok(())
    }
}

/// The visibility rule of SPEC §5 as SQL: `?2` is 1 for an admin, `?3` the user.
const VISIBLE: &str = "(?2 OR ((visible_to IS NULL OR visible_to = ?3) AND visible_role IS NULL))";

impl Store {
    /// The newest `limit` tasks of the viewer's tenant it may see, newest first.
    pub async fn tasks(&self, viewer: Viewer, limit: usize) -> Result<Vec<TaskEntry>, StoreError> {
        self.read(move |conn| {
            let sql = format!(
                "SELECT task_id, status, query, progress, seq, updated_at, data FROM tasks
                 WHERE tenant = ?1 AND {VISIBLE} ORDER BY seq DESC LIMIT ?4"
            );
            let mut statement = conn.prepare_cached(&sql)?;
            let rows = statement.query_map(
                params![viewer.tenant, viewer.admin, viewer.user, to_limit(limit)],
                task_entry,
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// One task of the viewer's tenant, if it exists and the viewer may see
    /// it: the same entry [`Store::tasks`] would list (`None` either way, so
    /// a user cannot tell another user's task from no task).
    pub async fn task(
        &self,
        viewer: Viewer,
        task_id: String,
    ) -> Result<Option<TaskEntry>, StoreError> {
        self.read(move |conn| {
            let sql = format!(
                "SELECT task_id, status, query, progress, seq, updated_at, data FROM tasks
                 WHERE tenant = ?1 AND task_id = ?4 AND {VISIBLE}"
            );
            let mut statement = conn.prepare_cached(&sql)?;
            let mut rows = statement.query_map(
                params![viewer.tenant, viewer.admin, viewer.user, task_id],
                task_entry,
            )?;
            Ok(rows.next().transpose()?)
        })
        .await
    }

    /// The newest `limit` agents of the viewer's tenant it may see, newest first.
    pub async fn agents(
        &self,
        viewer: Viewer,
        limit: usize,
    ) -> Result<Vec<AgentEntry>, StoreError> {
        self.read(move |conn| {
            let sql = format!(
                "SELECT agent_id, name, seq, updated_at, data FROM agents
                 WHERE tenant = ?1 AND {VISIBLE} ORDER BY seq DESC LIMIT ?4"
            );
            let mut statement = conn.prepare_cached(&sql)?;
            let rows = statement.query_map(
                params![viewer.tenant, viewer.admin, viewer.user, to_limit(limit)],
                |row| {
                    Ok(AgentEntry {
                        agent_id: row.get(0)?,
                        name: row.get(1)?,
                        seq: u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
                        updated_at_ms: row.get(3)?,
                        data: parse(row.get::<_, String>(4)?),
                    })
                },
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}

/// A row of `SELECT task_id, status, query, progress, seq, updated_at, data`.
fn task_entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<TaskEntry> {
    Ok(TaskEntry {
        task_id: row.get(0)?,
        status: row.get(1)?,
        query: row.get(2)?,
        progress: row.get(3)?,
        seq: u64::try_from(row.get::<_, i64>(4)?).unwrap_or(0),
        updated_at_ms: row.get(5)?,
        data: parse(row.get::<_, String>(6)?),
    })
}

fn to_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Stored `data` is always JSON we wrote; an unreadable one shows as null.
fn parse(text: String) -> Value {
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::super::testing::TempDir;
    use super::super::StoredTarget;
    use super::*;
    use serde_json::json;

    fn message(seq: u64, target: StoredTarget, kind: &str, data: Value) -> StoredMessage {
        StoredMessage {
            tenant: "acme".into(),
            seq,
            target,
            kind: kind.into(),
            body: "{}".into(),
            id: format!("id-{seq}"),
            ts_ms: 1_700_000_000_000 + seq as i64,
            view: ViewUpdate::of(kind, &data),
        }
    }

    fn viewer(user: &str, admin: bool) -> Viewer {
        Viewer {
            tenant: "acme".into(),
            user: user.into(),
            admin,
        }
    }

    #[tokio::test]
    async fn views_follow_the_log_with_its_visibility() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        store.ensure_log("acme").await.unwrap();
        let task = |id: &str, status: &str| json!({"task_id": id, "status": status});
        let messages = [
            message(
                1,
                StoredTarget::Broadcast,
                "task_update",
                json!({"task_id": "t1", "status": "queued", "query": "q", "progress": 0}),
            ),
            message(
                2,
                StoredTarget::User("bob".into()),
                "task_update",
                task("t2", "running"),
            ),
            message(3, StoredTarget::Admins, "task_update", task("t3", "failed")),
            message(
                4,
                StoredTarget::Broadcast,
                "task_update",
                json!({"task_id": "t1", "status": "running", "progress": 50}),
            ),
            message(
                5,
                StoredTarget::Broadcast,
                "agent_update",
                json!({"agent_id": "a1", "action": "registered", "name": "Ann"}),
            ),
            message(
                6,
                StoredTarget::Broadcast,
                "agent_update",
                json!({"agent_id": "a2", "action": "registered"}),
            ),
            message(
                7,
                StoredTarget::Broadcast,
                "agent_update",
                json!({"agent_id": "a1", "action": "updated"}),
            ),
            message(
                8,
                StoredTarget::Broadcast,
                "agent_update",
                json!({"agent_id": "a2", "action": "deleted"}),
            ),
            message(
                9,
                StoredTarget::Broadcast,
                "notification",
                json!({"task_id": "t9"}),
            ),
        ];
        for m in messages {
            store.append(m, Box::new(|| {})).await.unwrap();
        }
        let ids = |tasks: Vec<TaskEntry>| tasks.into_iter().map(|t| t.task_id).collect::<Vec<_>>();
        let alice = store.tasks(viewer("alice", false), 100).await.unwrap();
        assert_eq!(alice.len(), 1);
        let t1 = &alice[0];
        assert_eq!((t1.status.as_str(), t1.seq), ("running", 4));
        assert_eq!((t1.query.as_deref(), t1.progress), (Some("q"), Some(50.0)));
        assert_eq!(
            ids(store.tasks(viewer("bob", false), 100).await.unwrap()),
            ["t1", "t2"]
        );
        assert_eq!(
            ids(store.tasks(viewer("root", true), 100).await.unwrap()),
            ["t1", "t3", "t2"]
        );
        assert_eq!(
            ids(store.tasks(viewer("root", true), 1).await.unwrap()),
            ["t1"]
        );
        let other = Viewer {
            tenant: "globex".into(),
            ..viewer("root", true)
        };
        assert!(store.tasks(other.clone(), 100).await.unwrap().is_empty());

        // One entry: the same as the list's, under the same rule.
        let one = |viewer: Viewer, id: &str| store.task(viewer, id.to_owned());
        assert_eq!(
            one(viewer("alice", false), "t1").await.unwrap().as_ref(),
            Some(t1)
        );
        assert_eq!(
            one(viewer("alice", false), "t2").await.unwrap(),
            None,
            "bob's"
        );
        assert_eq!(
            one(viewer("alice", false), "t3").await.unwrap(),
            None,
            "the admins'"
        );
        assert!(one(viewer("bob", false), "t2").await.unwrap().is_some());
        assert!(one(viewer("root", true), "t3").await.unwrap().is_some());
        assert_eq!(
            one(viewer("root", true), "t9").await.unwrap(),
            None,
            "no task"
        );
        assert_eq!(one(other, "t1").await.unwrap(), None, "another tenant");

        let agents = store.agents(viewer("alice", false), 100).await.unwrap();
        assert_eq!(agents.len(), 1);
        assert_eq!(
            (
                agents[0].agent_id.as_str(),
                agents[0].name.as_deref(),
                agents[0].seq
            ),
            ("a1", Some("Ann"), 7)
        );
    }

    #[tokio::test]
    async fn fields_are_kept_only_from_messages_of_the_same_or_a_broader_audience() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        store.ensure_log("acme").await.unwrap();
        let to = |user: &str| StoredTarget::User(user.into());
        let messages = [
            // t1: alice's query and progress, then bob's bare status.
            message(
                1,
                to("alice"),
                "task_update",
                json!({"task_id": "t1", "status": "running", "query": "secret", "progress": 40}),
            ),
            message(
                2,
                to("bob"),
                "task_update",
                json!({"task_id": "t1", "status": "done"}),
            ),
            // t2: a broadcast query is everyone's; alice's own one stays hers.
            message(
                3,
                StoredTarget::Broadcast,
                "task_update",
                json!({"task_id": "t2", "status": "queued", "query": "public"}),
            ),
            message(
                4,
                to("carol"),
                "task_update",
                json!({"task_id": "t2", "status": "running"}),
            ),
            message(
                5,
                to("dave"),
                "task_update",
                json!({"task_id": "t3", "status": "running", "progress": 10}),
            ),
            message(
                6,
                to("dave"),
                "task_update",
                json!({"task_id": "t3", "status": "running"}),
            ),
            // a1: alice's agent name, then a bare update to bob.
            message(
                7,
                to("alice"),
                "agent_update",
                json!({"agent_id": "a1", "action": "registered", "name": "Alice's bot"}),
            ),
            message(
                8,
                to("bob"),
                "agent_update",
                json!({"agent_id": "a1", "action": "updated"}),
            ),
            // a2: admins' name, then a broadcast update: the name stays with the admins.
            message(
                9,
                StoredTarget::Admins,
                "agent_update",
                json!({"agent_id": "a2", "action": "registered", "name": "ops"}),
            ),
            message(
                10,
                StoredTarget::Broadcast,
                "agent_update",
                json!({"agent_id": "a2", "action": "updated"}),
            ),
        ];
        for m in messages {
            store.append(m, Box::new(|| {})).await.unwrap();
        }
        let task = |tasks: &[TaskEntry], id: &str| {
            let t = tasks.iter().find(|t| t.task_id == id).unwrap().clone();
            (t.status, t.query, t.progress, t.seq)
        };
        let bob = store.tasks(viewer("bob", false), 100).await.unwrap();
        assert_eq!(task(&bob, "t1"), ("done".into(), None, None, 2));
        assert_eq!(bob.len(), 1, "t2 is carol's now, t3 dave's");
        let admin = store.tasks(viewer("root", true), 100).await.unwrap();
        assert_eq!(task(&admin, "t1"), ("done".into(), None, None, 2));
        let carol = store.tasks(viewer("carol", false), 100).await.unwrap();
        assert_eq!(
            task(&carol, "t2"),
            ("running".into(), Some("public".into()), None, 4)
        );
        let dave = store.tasks(viewer("dave", false), 100).await.unwrap();
        assert_eq!(task(&dave, "t3"), ("running".into(), None, Some(10.0), 6));

        let name = |agents: Vec<AgentEntry>, id: &str| {
            agents
                .into_iter()
                .find(|a| a.agent_id == id)
                .map(|a| a.name)
        };
        let bob = store.agents(viewer("bob", false), 100).await.unwrap();
        assert_eq!(name(bob.clone(), "a1"), Some(None), "not alice's name");
        assert_eq!(name(bob, "a2"), Some(None), "not the admins' name");
        let admin = store.agents(viewer("root", true), 100).await.unwrap();
        assert_eq!(name(admin, "a1"), Some(None));
    }

    #[tokio::test]
    async fn a_refused_message_changes_no_view() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        store.ensure_log("acme").await.unwrap();
        let data = json!({"task_id": "t1", "status": "queued"});
        store
            .append(
                message(1, StoredTarget::Broadcast, "task_update", data),
                Box::new(|| {}),
            )
            .await
            .unwrap();
        let repeat = message(
            1,
            StoredTarget::Broadcast,
            "task_update",
            json!({"task_id": "t1", "status": "failed"}),
        );
        assert!(store.append(repeat, Box::new(|| {})).await.is_err());
        let tasks = store.tasks(viewer("u", false), 10).await.unwrap();
        assert_eq!(tasks[0].status, "queued");
    }
}
