//! Builds the whole server from [`Settings`] and a bound listener, runs it until
//! the shutdown future resolves, then drains in order: stop accepting, close every
//! WebSocket with 1012, let in-flight HTTP requests finish, return. HTTP
//! connections and WebSocket sessions are both tracked by [`Shutdown`].
//!
//! Every request's body is read to its end, or the response says
//! `Connection: close` ([`finish_request_body`]): hyper closes a kept-alive
//! connection whose request body was left unread, without saying so, and most
//! refusals (401, 403, 404, 405, 415) happen before any route reads the body.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONNECTION, EXPECT};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::accounts::Accounts;
use crate::auth::Authenticator;
use crate::config::{ConfigError, RedisSettings, Settings, StoreSync};
use crate::directory::{Directory, DirectoryError};
use crate::hub::session::{self, SessionConfig};
use crate::hub::{Hub, Limits};
use crate::log::redis::RedisLog;
use crate::log::{ChannelBounds, Engine, Log, LogError, LogStoreKind};
use crate::metrics::Metrics;
use crate::redis::{Redis, RedisError};
use crate::routes::{self, PeerAddr, Shared};
use crate::shutdown::Shutdown;
use crate::store::{Durability, Store, StoreError, StoreOptions};

/// Pending connections the kernel keeps for us. warp's `run` uses 128, which made
/// bursts of handshakes stall for a second on SYN retransmits.
const LISTEN_BACKLOG: u32 = 4096;
/// Read buffer of each WebSocket: client frames are small (ping, refresh); larger
/// ones grow it for their own duration only.
const WS_READ_BUFFER: usize = 512;
/// Frames queued for a socket are gathered up to this size before a write.
const WS_WRITE_BUFFER: usize = 64 * 1024;
/// A client must send its request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of a request body no route read that are read and thrown away
/// so the connection stays usable; a longer body closes the connection.
const UNREAD_BODY_DRAIN: usize = 1 << 20;
/// Longest the rest of an unread request body is waited for before the
/// response goes out with `Connection: close`.
const UNREAD_BODY_WAIT: Duration = Duration::from_secs(5);
/// How long a starting node waits for its Redis (and its subscription).
const REDIS_START_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot load the logs: {0}")]
    Log(#[from] LogError),
    #[error("cannot use REDIS_URL: {0}")]
    Redis(RedisError),
    #[error("cannot create the first account: {0}")]
    Directory(#[from] DirectoryError),
}

/// Binds `addr` with a large accept backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves on `listener` until `stop` resolves, then drains within
/// `settings.shutdown_timeout`.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let auth = Arc::new(Authenticator::new(&settings)?);
    let store = open_store(&settings).await?;
    let mut metrics = Metrics::for_node(Some(&settings.node_id));
    let store_handle = store.clone();
    metrics.register_store_commit_failures(move || store_handle.commit_failures());
    let redis = match &settings.redis {
        Some(redis) => Some(connect_redis(redis, &settings.node_id).await?),
        None => None,
    };
    if redis.is_some() {
        metrics.register_redis_up();
    }
    let metrics = Arc::new(metrics);
    let engine = match (&redis, settings.log_store) {
        (Some(redis), _) => Engine::Redis(Box::new(RedisLog::new(redis.clone(), metrics.clone()))),
        (None, LogStoreKind::Sqlite) => Engine::Sqlite(store.clone()),
        (None, LogStoreKind::Memory) => Engine::Memory,
    };
    let channels = ChannelBounds::from(&settings.channels);
    let log = Log::with_channels(
        engine,
        settings.history_size,
        settings.history_bytes,
        channels,
    );
    restore_logs(&log).await?;
    if redis.is_some() && !log.wait_ready(REDIS_START_WAIT).await {
        return Err(AppError::Redis(RedisError(format!(
            "the Redis subscription did not come up within {REDIS_START_WAIT:?}"
        ))));
    }
    let log_handle = log.clone();
    let hub = Hub::new(
        Limits {
            send_queue: settings.send_queue,
            max_connections: settings.max_connections,
            max_connections_per_user: settings.max_connections_per_user,
        },
        metrics,
        log,
    );
    let shutdown = Shutdown::new();
    if let Some(jwks) = auth.jwks() {
        // Bounded: a provider still down after the wait leaves the cache
        // empty (a warning) and the timer or a token's `kid` tries again.
        jwks.load_at_start().await;
        tokio::spawn(
            jwks.clone()
                .refresh_periodically(shutdown.triggered_owned()),
        );
    }
    let sessions = Arc::new(SessionConfig {
        hub: hub.clone(),
        auth: auth.clone(),
        shutdown: shutdown.clone(),
        ping_interval: settings.ping_interval,
        idle_timeout: settings.idle_timeout,
        heartbeat: settings.heartbeat,
        leeway: settings.jwt_leeway,
        frame_rate: settings.client_frame_rate,
        frame_burst: settings.client_frame_burst,
        channels: settings.channels.clone(),
    });
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        // tungstenite's default is unbounded: a client that sends Pings or
        // frames and never reads would grow it forever (issue 8, finding 1).
        .max_write_buffer_size(session::write_buffer_limit(settings.max_message_bytes))
        .max_message_size(Some(settings.max_message_bytes))
        .max_frame_size(Some(settings.max_message_bytes));
    let directory = Directory::new(&store, redis.as_ref());
    let accounts = Arc::new(Accounts::new(directory.clone(), settings.accounts.clone()));
    let base_url = base_url(&listener)?;
    accounts
        .bootstrap_admin(&format!("{base_url}/login.html"))
        .await?;
    let shared = Arc::new(Shared {
        hub,
        auth,
        store: store.clone(),
        directory,
        accounts,
        sessions,
        ws_config,
        max_message_bytes: settings.max_message_bytes,
        channels: settings.channels.clone(),
        allowed_origins: settings.allowed_origins.clone(),
        metrics_token: settings.metrics_token.clone(),
        node: settings.node_id.clone(),
        log: log_handle,
        views: crate::views::Views::new(&store, redis.as_ref()),
        redis,
    });
    if let Some(redis) = &shared.redis {
        let hub = shared.hub.clone();
        tokio::spawn(crate::redis::presence::publish(
            redis.clone(),
            move || hub.presence_counts(),
            shutdown.triggered_owned(),
        ));
    }
    let service = warp::service(routes::all(shared));

    let mut stop = std::pin::pin!(stop);
    // Only now: the store is open and every tenant log loaded.
    tracing::info!(
        "agentcast {} ready on {base_url}",
        env!("CARGO_PKG_VERSION")
    );
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let handler = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let (mut parts, body) = request.into_parts();
            parts.extensions.insert(PeerAddr(peer));
            let expects_continue = parts.headers.contains_key(EXPECT);
            let body = SharedBody::new(body);
            let request = hyper::Request::from_parts(parts, body.clone());
            let response =
                hyper::service::Service::call(&TowerToHyperService::new(service.clone()), request);
            async move {
                let mut response = response.await?;
                finish_request_body(&body, expects_continue, &mut response).await;
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), handler)
            .with_upgrades();
        let stopping = shutdown.triggered_owned();
        shutdown.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stopping => {
                    // Finish the request in flight, then close instead of keeping alive.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }

    drop(listener);
    tracing::info!("draining: closing WebSockets with 1012");
    shutdown.trigger();
    let deadline = settings.shutdown_timeout;
    if !shutdown.wait_drained(deadline).await {
        tracing::warn!("drain did not finish within {deadline:?}; exiting anyway");
    } else {
        tracing::info!("drained");
    }
    // Last: every acknowledged write is committed and the WAL checkpointed.
    store.close().await;
    Ok(())
}

/// A request body the routes read through, while the accept loop keeps a
/// handle to it: whatever the routes leave unread is still there to drain
/// once the response is ready.
#[derive(Clone)]
struct SharedBody(Arc<Mutex<Option<Incoming>>>);

impl SharedBody {
    fn new(body: Incoming) -> SharedBody {
        SharedBody(Arc::new(Mutex::new(Some(body))))
    }

    /// The body as it is now, unless nothing is left of it.
    fn take_unread(&self) -> Option<Incoming> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.take().filter(|body| !body.is_end_stream())
    }
}

impl Body for SharedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // Never contended: the route polls it, and the accept loop only takes
        // it once the route has answered.
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        let slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// Before `response` goes out: reads and discards what the routes left of the
/// request body (at most [`UNREAD_BODY_DRAIN`] bytes within
/// [`UNREAD_BODY_WAIT`]), or, for a body longer, slower, or awaiting
/// `100 Continue`, marks the response `Connection: close`. Without either,
/// hyper drops the connection after the response without saying so, and a
/// client's next request on it fails (issue 8, finding 10).
async fn finish_request_body<B>(
    body: &SharedBody,
    expects_continue: bool,
    response: &mut hyper::Response<B>,
) {
    let Some(mut unread) = body.take_unread() else {
        return;
    };
    // A client waiting for `100 Continue` has not sent the body: asking for it
    // only to discard it would waste its upload. A chunked body has no
    // declared length: the byte count below bounds it.
    let declared_too_long = unread
        .size_hint()
        .upper()
        .is_some_and(|n| n > UNREAD_BODY_DRAIN as u64);
    let drained = !expects_continue
        && !declared_too_long
        && tokio::time::timeout(UNREAD_BODY_WAIT, async {
            let mut seen = 0usize;
            while let Some(frame) = unread.frame().await {
                let Ok(frame) = frame else { return false };
                if let Some(data) = frame.data_ref() {
                    seen = seen.saturating_add(data.len());
                    if seen > UNREAD_BODY_DRAIN {
                        return false;
                    }
                }
            }
            true
        })
        .await
        .unwrap_or(false);
    if !drained {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
}

/// Opens `DATA_DIR/agentcast.db` off the async threads.
async fn open_store(settings: &Settings) -> Result<Store, AppError> {
    let data_dir = settings.data_dir.clone();
    let options = StoreOptions {
        history_size: settings.history_size,
        history_bytes: settings.history_bytes,
        channel_history: settings.channels.history,
        channel_history_bytes: settings.channels.history_bytes,
        durability: match settings.store_sync {
            StoreSync::Full => Durability::Full,
            StoreSync::Normal => Durability::Normal,
        },
        wal_sync_interval: settings.store_sync_interval,
        ..StoreOptions::default()
    };
    tokio::task::spawn_blocking(move || Store::open_with(&data_dir, options))
        .await
        .map_err(|e| StoreError::Io(format!("store open task failed: {e}")))?
        .map_err(AppError::from)
}

/// Every stored tenant log with its newest `HISTORY_SIZE` messages (at most
/// `HISTORY_BYTES` of them), read off the async threads; resumes are served from them as if it never stopped.
async fn restore_logs(log: &Log) -> Result<(), AppError> {
    let started = std::time::Instant::now();
    let (tenants, messages) = log.restore().await?;
    tracing::info!(
        tenants,
        messages,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "tenant logs loaded"
    );
    Ok(())
}

/// The address a newcomer opens, for the log (`localhost` for a wildcard bind).
fn base_url(listener: &TcpListener) -> std::io::Result<String> {
    let addr = listener.local_addr()?;
    let host = if addr.ip().is_unspecified() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    };
    Ok(format!("http://{host}"))
}

/// Connects to the shared Redis, retrying for [`REDIS_START_WAIT`]: nodes
/// of a deployment often boot before (or while) their Redis does.
async fn connect_redis(settings: &RedisSettings, node: &str) -> Result<Redis, AppError> {
    let deadline = tokio::time::Instant::now() + REDIS_START_WAIT;
    loop {
        match Redis::connect(settings, node).await {
            Ok(redis) => {
                tracing::info!(node, prefix = %settings.prefix, "connected to redis");
                return Ok(redis);
            }
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(%error, "redis not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => return Err(AppError::Redis(error)),
        }
    }
}
