//! warp filters: one small function per endpoint, composed in [`all`], with one
//! `recover` that turns every rejection into the JSON error of SPEC §3.

mod accounts;
mod api_keys;
mod body;
mod channels;
mod openapi;
mod ops;
mod pages;
mod publish;
mod views;
mod ws;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use warp::{Filter, Reply};

use crate::accounts::Accounts;
use crate::auth::Authenticator;
use crate::config::Secret;
use crate::directory::Directory;
use crate::hub::session::SessionConfig;
use crate::hub::Hub;
use crate::store::Store;

/// What the handlers share; built once in [`crate::app`].
#[derive(Debug)]
pub struct Shared {
    pub hub: Hub,
    pub auth: Arc<Authenticator>,
    /// The durable tenant logs and views (`DATA_DIR/agentcast.db`).
    pub store: Store,
    /// Accounts and API keys: `store`, or the shared Redis in cluster mode.
    pub directory: Directory,
    /// Signup, login and the failed-login limiter, over `directory`.
    pub accounts: Arc<Accounts>,
    pub sessions: Arc<SessionConfig>,
    /// tungstenite settings of every upgraded socket (small buffers, frame limit).
    pub ws_config: WebSocketConfig,
    pub max_message_bytes: usize,
    /// `USER_CHANNELS` and the other channel settings.
    pub channels: crate::config::ChannelSettings,
    pub allowed_origins: Option<Vec<String>>,
    pub metrics_token: Option<Secret>,
    /// This node's `NODE_ID`, in stats.
    pub node: String,
    /// Whether the log is whole (with Redis: subscribed and caught up).
    pub log: crate::log::Log,
    /// Cluster mode's Redis, for `/health`.
    pub redis: Option<crate::redis::Redis>,
    /// Where the task and agent lists are read.
    pub views: crate::views::Views,
}

/// The peer address of the TCP connection, put into each request by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Every route, with JSON errors.
pub fn all(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    ops::health(shared.clone())
        .or(ops::stats(shared.clone()))
        .or(ops::metrics(shared.clone()))
        .or(ws::ws_connect(shared.clone()))
        .or(publish::broadcast_publish(shared.clone()))
        .or(publish::user_publish(shared.clone()))
        .or(publish::user_presence(shared.clone()))
        .or(channels::channel_publish(shared.clone()))
        .or(channels::channel_info(shared.clone()))
        .or(channels::channel_history(shared.clone()))
        .or(views::tasks_list(shared.clone()))
        .or(views::tasks_get(shared.clone()))
        .or(views::agents_list(shared.clone()))
        .or(views::analytics_get(shared.clone()))
        .or(accounts::auth_signup(shared.clone()))
        .or(accounts::auth_login(shared.clone()))
        .or(accounts::auth_refresh(shared.clone()))
        .or(accounts::auth_me(shared.clone()))
        .or(api_keys::api_keys_create(shared.clone()))
        .or(api_keys::api_keys_list(shared.clone()))
        .or(api_keys::api_keys_revoke(shared))
        .or(openapi::openapi_document())
        // Nested, not chained: one more link in the chain overflows rustc's
        // query depth limit when the connection future's layout is computed.
        .or(pages::pages().or(openapi::method_not_allowed()))
        .recover(crate::error::recover)
        .with(warp::reply::with::header(
            "x-content-type-options",
            "nosniff",
        ))
}

fn with_shared(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (Arc<Shared>,), Error = Infallible> + Clone {
    warp::any().map(move || shared.clone())
}
