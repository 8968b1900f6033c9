//! The read side of the views in Redis (SPEC §5): `GET /api/v1/tasks` (and
//! `/tasks/:task_id`) and `GET /api/v1/agents` of a cluster node, with the same entries, order
//! (newest `seq` first) and `limit` as the SQLite store gives a single node.
//!
//! The publish script ([`publish.lua`](../log/publish.lua)) writes each entry
//! (a hash) and three kinds of index, all sorted sets id -> seq: the index of
//! every entry, which admins read; `INDEX:b`, the entries a broadcast set;
//! `INDEX:u:USER`, those a message to USER set. A user may see exactly the
//! entries of the last two (SPEC §5: set by a broadcast or addressed to
//! them), so a user's list is their merge, newest first. One read script does
//! the merge and fetches the entries atomically, so a list is a snapshot,
//! like SQLite's: no entry twice, none missed while it moves.
//!
//! Like the SQLite store's tables, the views are not trimmed: one entry per
//! task id and per agent id (until `deleted`), which the publishers choose.
//!
//! Bounded: a read touches at most `limit` ids of each index it reads and
//! `limit` entries (`limit` is at most 1000, see `routes::views`), however
//! many entries of others the tenant has; nothing is scanned and filtered.

use std::sync::LazyLock;

use redis::Script;
use serde_json::Value;

use super::{Redis, RedisError};
use crate::store::{AgentEntry, TaskEntry, Viewer};

/// The newest `ARGV[1]` entries: of index `KEYS[1]` for an admin
/// (`ARGV[3]` = `admin`), else of `KEYS[2]` and `KEYS[3]` merged by seq.
/// Each as `{id, status, query, progress, name, seq, ts, data}` of the hash
/// `ARGV[2] .. id` (a missing field is nil).
const READ: &str = r"
local limit = tonumber(ARGV[1])
local ids = {}
if ARGV[3] == 'admin' then
  ids = redis.call('ZREVRANGE', KEYS[1], 0, limit - 1)
else
  local a = redis.call('ZREVRANGE', KEYS[2], 0, limit - 1, 'WITHSCORES')
  local b = redis.call('ZREVRANGE', KEYS[3], 0, limit - 1, 'WITHSCORES')
  local i, j = 1, 1
  while #ids < limit and (i <= #a or j <= #b) do
    if j > #b or (i <= #a and tonumber(a[i + 1]) > tonumber(b[j + 1])) then
      ids[#ids + 1] = a[i]
      i = i + 2
    else
      ids[#ids + 1] = b[j]
      j = j + 2
    end
  end
end
local out = {}
for _, id in ipairs(ids) do
  local entry = redis.call('HMGET', ARGV[2] .. id,
    'status', 'query', 'progress', 'name', 'seq', 'ts', 'data')
  table.insert(entry, 1, id)
  out[#out + 1] = entry
end
return out
";

/// Hashed once; `EVALSHA`, loaded on first use by redis-rs.
static READ_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(READ));

/// One entry as the read script returns it.
type Row = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<u64>,
    Option<i64>,
    Option<String>,
);

/// The newest `limit` tasks of the viewer's tenant it may see, newest first.
pub async fn tasks(
    redis: &Redis,
    viewer: &Viewer,
    limit: usize,
) -> Result<Vec<TaskEntry>, RedisError> {
    let rows = read(redis, viewer, ("tasks", "task"), limit).await?;
    Ok(rows
        .into_iter()
        .filter_map(|(task_id, status, query, progress, _, seq, ts, data)| {
            Some(TaskEntry {
                task_id,
                status: status?,
                query,
                progress: progress.and_then(|p| p.parse().ok()),
                seq: seq?,
                updated_at_ms: ts.unwrap_or(0),
                data: parse(data),
            })
        })
        .collect())
}

/// `status, query, progress, seq, ts, data, to, role` of a task's hash.
type TaskFields = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<u64>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// One task of the viewer's tenant, if it exists and the viewer may see it
/// (`GET /api/v1/tasks/:task_id`): the entry the list would show. The entry's
/// hash records whom its message addressed (`to`, `role`, written by the
/// publish script), which decides like the audience indexes do: an admin
/// sees every entry, a user one a broadcast or a message to them set. One
/// `HMGET` reads the fields and the audience together, so they agree.
pub async fn task(
    redis: &Redis,
    viewer: &Viewer,
    task_id: &str,
) -> Result<Option<TaskEntry>, RedisError> {
    let key = redis.keys().view_entry(&viewer.tenant, "task", task_id);
    let mut commands = redis.commands();
    let (status, query, progress, seq, ts, data, to, role): TaskFields = redis::cmd("HMGET")
        .arg(&key)
        .arg(&[
            "status", "query", "progress", "seq", "ts", "data", "to", "role",
        ])
        .query_async(&mut commands)
        .await?;
    let to = to.unwrap_or_default();
    let visible = viewer.admin
        || (role.unwrap_or_default().is_empty() && (to.is_empty() || to == viewer.user));
    if !visible {
        return Ok(None);
    }
    Ok(status.zip(seq).map(|(status, seq)| TaskEntry {
        task_id: task_id.to_owned(),
        status,
        query,
        progress: progress.and_then(|p| p.parse().ok()),
        seq,
        updated_at_ms: ts.unwrap_or(0),
        data: parse(data),
    }))
}

/// The newest `limit` agents of the viewer's tenant it may see, newest first.
pub async fn agents(
    redis: &Redis,
    viewer: &Viewer,
    limit: usize,
) -> Result<Vec<AgentEntry>, RedisError> {
    let rows = read(redis, viewer, ("agents", "agent"), limit).await?;
    Ok(rows
        .into_iter()
        .filter_map(|(agent_id, _, _, _, name, seq, ts, data)| {
            Some(AgentEntry {
                agent_id,
                name,
                seq: seq?,
                updated_at_ms: ts.unwrap_or(0),
                data: parse(data),
            })
        })
        .collect())
}

/// Runs the read script over the indexes of `kind` (`(index, entry)`:
/// `("tasks", "task")` or `("agents", "agent")`).
async fn read(
    redis: &Redis,
    viewer: &Viewer,
    (index, entry): (&str, &str),
    limit: usize,
) -> Result<Vec<Row>, RedisError> {
    let keys = redis.keys();
    let all = keys.view_index(&viewer.tenant, index);
    let mut invocation = READ_SCRIPT.prepare_invoke();
    invocation
        .key(&all)
        .key(keys.view_audience(&viewer.tenant, index, None))
        .key(keys.view_audience(&viewer.tenant, index, Some(&viewer.user)))
        .arg(limit.max(1))
        .arg(keys.view_entry(&viewer.tenant, entry, ""))
        .arg(if viewer.admin { "admin" } else { "" });
    let mut commands = redis.commands();
    Ok(invocation.invoke_async(&mut commands).await?)
}

/// Stored `data` is always JSON the publish wrote; an unreadable one shows
/// as null (as in the SQLite store).
fn parse(text: Option<String>) -> Value {
    text.and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}
