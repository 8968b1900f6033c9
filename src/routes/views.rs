//! The views (SPEC §3, §5): tasks (the list and one task), agents and
//! per-minute analytics of the caller's tenant. Any valid JWT of the tenant
//! may read them (an API key gets 403: keys only publish); a user sees the
//! entries set by broadcasts and by messages to them, an admin all of the
//! tenant's. Nothing crosses tenants: the tenant comes from the token. The
//! lists come from [`crate::views`] (SQLite, or Redis in cluster mode);
//! analytics are this node's own.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};
use warp::{Filter, Rejection, Reply};

use super::accounts::token_claims;
use super::{with_shared, Shared};
use crate::auth::Claims;
use crate::error::ApiError;
use crate::store::{AgentEntry, TaskEntry, Viewer};
use crate::views::ViewError;

/// Entries a list returns without `?limit=`.
const DEFAULT_LIMIT: usize = 100;
/// The most a list returns.
const MAX_LIMIT: usize = 1000;

/// GET /api/v1/tasks
pub fn tasks_list(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "tasks")
        .and(warp::get())
        .and(token_claims(shared.clone()))
        .and(limit())
        .and(with_shared(shared))
        .and_then(
            |claims: Claims, limit: usize, shared: Arc<Shared>| async move {
                let tasks = shared
                    .views
                    .tasks(viewer(&claims), limit)
                    .await
                    .map_err(unavailable)?;
                let tasks: Vec<TaskView> = tasks.into_iter().map(TaskView::from).collect();
                Ok::<_, Rejection>(warp::reply::json(&json!({ "tasks": tasks })))
            },
        )
}

/// GET /api/v1/tasks/:task_id
pub fn tasks_get(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "tasks" / String)
        .and(warp::get())
        .and(token_claims(shared.clone()))
        .and(with_shared(shared))
        .and_then(
            |segment: String, claims: Claims, shared: Arc<Shared>| async move {
                let task_id = task_id(&segment)?;
                let task = shared
                    .views
                    .task(viewer(&claims), &task_id)
                    .await
                    .map_err(unavailable)?
                    // Not there, or not the caller's to see: the same answer, so
                    // a user learns nothing of other users' tasks.
                    .ok_or_else(|| warp::reject::custom(ApiError::NotFound))?;
                Ok::<_, Rejection>(warp::reply::json(&json!({ "task": TaskView::from(task) })))
            },
        )
}

/// GET /api/v1/agents
pub fn agents_list(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "agents")
        .and(warp::get())
        .and(token_claims(shared.clone()))
        .and(limit())
        .and(with_shared(shared))
        .and_then(
            |claims: Claims, limit: usize, shared: Arc<Shared>| async move {
                let agents = shared
                    .views
                    .agents(viewer(&claims), limit)
                    .await
                    .map_err(unavailable)?;
                let agents: Vec<AgentView> = agents.into_iter().map(AgentView::from).collect();
                Ok::<_, Rejection>(warp::reply::json(&json!({ "agents": agents })))
            },
        )
}

/// GET /api/v1/analytics
pub fn analytics_get(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "analytics")
        .and(warp::get())
        .and(token_claims(shared.clone()))
        .and(with_shared(shared))
        .map(|claims: Claims, shared: Arc<Shared>| {
            let minutes = shared.hub.analytics(&claims.tenant);
            warp::reply::json(&json!({
                "tenant": claims.tenant,
                "minutes": minutes,
            }))
        })
}

/// `?limit=N`: 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent; else 422.
fn limit() -> impl Filter<Extract = (usize,), Error = Rejection> + Clone {
    warp::query::<HashMap<String, String>>().and_then(|query: HashMap<String, String>| async move {
        match query.get("limit") {
            None => Ok(DEFAULT_LIMIT),
            Some(text) => text
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    warp::reject::custom(ApiError::Unprocessable(format!(
                        "limit must be an integer from 1 to {MAX_LIMIT}"
                    )))
                }),
        }
    })
}

/// The longest task id `GET /api/v1/tasks/:task_id` looks up, in bytes; a
/// `task_update` may set no longer one (`publish::validate`).
const MAX_TASK_ID: usize = 256;

/// A `task_id` path segment: percent-decoded, 1-[`MAX_TASK_ID`] bytes of
/// printable characters; else 422 (like a bad `userID`).
fn task_id(segment: &str) -> Result<String, Rejection> {
    let invalid = || {
        warp::reject::custom(ApiError::Unprocessable(format!(
            "task_id must be 1-{MAX_TASK_ID} bytes of printable characters"
        )))
    };
    let decoded = percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| invalid())?;
    if !valid_task_id(&decoded) {
        return Err(invalid());
    }
    Ok(decoded.into_owned())
}

/// 1-[`MAX_TASK_ID`] bytes without control characters: the ids the view
/// stores, and so the ids one can look up.
pub(super) fn valid_task_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_TASK_ID && !id.chars().any(char::is_control)
}

fn viewer(claims: &Claims) -> Viewer {
    Viewer {
        tenant: claims.tenant.clone(),
        user: claims.sub.clone(),
        admin: claims.is_admin(),
    }
}

/// A view that cannot be read: the one mapping in [`ApiError`] (503).
fn unavailable(error: ViewError) -> Rejection {
    warp::reject::custom(ApiError::from(error))
}

/// A task as the list shows it.
#[derive(Serialize)]
struct TaskView {
    task_id: String,
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<f64>,
    seq: u64,
    updated_at: String,
    data: Value,
}

impl From<TaskEntry> for TaskView {
    fn from(task: TaskEntry) -> Self {
        TaskView {
            task_id: task.task_id,
            status: task.status,
            query: task.query,
            progress: task.progress,
            seq: task.seq,
            updated_at: rfc3339_ms(task.updated_at_ms),
            data: task.data,
        }
    }
}

/// An agent as the list shows it.
#[derive(Serialize)]
struct AgentView {
    agent_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    seq: u64,
    updated_at: String,
    data: Value,
}

impl From<AgentEntry> for AgentView {
    fn from(agent: AgentEntry) -> Self {
        AgentView {
            agent_id: agent.agent_id,
            name: agent.name,
            seq: agent.seq,
            updated_at: rfc3339_ms(agent.updated_at_ms),
            data: agent.data,
        }
    }
}

/// Unix milliseconds as `2026-11-22T10:00:00.123Z`, like the `ts` of frames.
fn rfc3339_ms(ms: i64) -> String {
    const FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".to_owned())
}
