//! [`Views`]: where `GET /api/v1/tasks`, `/tasks/:task_id` and `/agents` read the views of
//! SPEC §5, chosen at start like the log's engine. A single node reads its
//! SQLite store (the writer keeps the views there, in the log's
//! transaction); a cluster node (`REDIS_URL`) reads Redis, where the publish
//! script keeps them, so every node lists the same. Both give the same
//! entries for a [`Viewer`], newest first, at most `limit`.

use crate::redis::{Redis, RedisError};
use crate::store::{AgentEntry, Store, StoreError, TaskEntry, Viewer};

/// The store the views are read from. Cloning is cheap.
#[derive(Debug, Clone)]
pub enum Views {
    Sqlite(Store),
    Redis(Box<Redis>),
}

/// A view that could not be read (the route answers 503).
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Redis(#[from] RedisError),
}

impl Views {
    /// Redis in cluster mode, else the node's store.
    pub fn new(store: &Store, redis: Option<&Redis>) -> Views {
        match redis {
            Some(redis) => Views::Redis(Box::new(redis.clone())),
            None => Views::Sqlite(store.clone()),
        }
    }

    /// The newest `limit` tasks of the viewer's tenant it may see, newest first.
    pub async fn tasks(&self, viewer: Viewer, limit: usize) -> Result<Vec<TaskEntry>, ViewError> {
        Ok(match self {
            Views::Sqlite(store) => store.tasks(viewer, limit).await?,
            Views::Redis(redis) => crate::redis::views::tasks(redis, &viewer, limit).await?,
        })
    }

    /// One task of the viewer's tenant, `None` if there is none or the
    /// viewer may not see it (the two look the same to the caller).
    pub async fn task(
        &self,
        viewer: Viewer,
        task_id: &str,
    ) -> Result<Option<TaskEntry>, ViewError> {
        Ok(match self {
            Views::Sqlite(store) => store.task(viewer, task_id.to_owned()).await?,
            Views::Redis(redis) => crate::redis::views::task(redis, &viewer, task_id).await?,
        })
    }

    /// The newest `limit` agents of the viewer's tenant it may see, newest first.
    pub async fn agents(&self, viewer: Viewer, limit: usize) -> Result<Vec<AgentEntry>, ViewError> {
        Ok(match self {
            Views::Sqlite(store) => store.agents(viewer, limit).await?,
            Views::Redis(redis) => crate::redis::views::agents(redis, &viewer, limit).await?,
        })
    }
}
