//! The test harness: a real server on port 0 per test, token minting, HTTP
//! request helpers and a WebSocket client that never waits unbounded.
//!
//! Every wait is bounded by [`WAIT`] and waits for an event (a frame, a close, a
//! counter reaching a value), never for a fixed time, so a loaded machine makes
//! tests slower, not flaky.
//!
//! With `AGENTCAST_TEST_REDIS=1` every server [`spawn_app_with`] starts is a
//! one-node cluster on a `redis-server` of its own ([`RedisServer`]), so the
//! single-node suites also run on the Redis engine (`scripts/test.sh` runs
//! the suites that are not about the SQLite store a second time that way).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Once;
use std::time::Duration;

use agentcast::auth::{Claims, Role};
use agentcast::config::Settings;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::redis_server::RedisServer;

/// The longest any single expected event may take on a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(10);

/// The admin of tenant `default` most tests publish as.
pub const ADMIN: &str = "admin";

static TRACING: Once = Once::new();

/// Logs stay quiet unless `TEST_LOG` is set (then `RUST_LOG` filters, default debug).
fn init_tracing() {
    TRACING.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("debug"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .init();
        }
    });
}

/// A running server and what a test needs to talk to it.
pub struct TestApp {
    pub addr: SocketAddr,
    pub settings: Settings,
    pub http: reqwest::Client,
    data_dir: PathBuf,
    shutdown_tx: Option<oneshot::Sender<()>>,
    serve_task: Option<JoinHandle<Result<(), agentcast::app::AppError>>>,
    /// The server's own Redis in `AGENTCAST_TEST_REDIS` mode (stopped with it).
    _redis: Option<RedisServer>,
}

/// A fresh data folder that outlives one server (restart and crash tests);
/// removed when dropped.
pub struct DataDir(pub PathBuf);

impl DataDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("agentcast-data-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).expect("create the data dir");
        DataDir(path)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The address in the real binary's "agentcast … ready on http://ADDR" log line
/// (pretty or JSON), for tests that run the binary itself.
pub fn ready_address(log: &str) -> Option<SocketAddr> {
    let rest = &log[log.find("ready on http://")? + "ready on http://".len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A server with the test defaults of [`Settings::for_tests`].
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// A server whose settings `tweak` adjusts first (small intervals, small limits…).
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    init_tracing();
    let data_dir = std::env::temp_dir().join(format!("agentcast-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&data_dir).expect("create the test data dir");
    let mut settings = Settings::for_tests(&data_dir);
    tweak(&mut settings);
    let redis = match settings.redis {
        None if redis_mode() => {
            let redis = RedisServer::start().await;
            redis.node("agentcast", "test-node")(&mut settings);
            Some(redis)
        }
        _ => None,
    };
    let listener =
        agentcast::app::bind(SocketAddr::new(settings.bind, settings.port)).expect("bind port 0");
    let addr = listener.local_addr().expect("bound address");
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let shutdown = async move {
        // A dropped sender (the TestApp went away) also stops the server.
        let _ = shutdown_rx.await;
    };
    let serve_task = tokio::spawn(agentcast::app::serve(settings.clone(), listener, shutdown));
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("build the HTTP client");
    TestApp {
        addr,
        settings,
        http,
        data_dir,
        shutdown_tx: Some(shutdown_tx),
        serve_task: Some(serve_task),
        _redis: redis,
    }
}

/// Whether servers run on a Redis of their own (`AGENTCAST_TEST_REDIS=1`).
pub fn redis_mode() -> bool {
    std::env::var_os("AGENTCAST_TEST_REDIS").is_some_and(|v| v == "1")
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.serve_task.take() {
            task.abort();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, query: &str) -> String {
        if query.is_empty() {
            format!("ws://{}/api/v1/ws/connect", self.addr)
        } else {
            format!("ws://{}/api/v1/ws/connect?{}", self.addr, query)
        }
    }

    /// Triggers the drain and waits (bounded) for `serve()` to return.
    pub async fn shutdown(&mut self) -> Result<(), agentcast::app::AppError> {
        self.shutdown_tx
            .take()
            .expect("shutdown triggered twice")
            .send(())
            .ok();
        let task = self.serve_task.take().expect("serve task already awaited");
        let limit = self.settings.shutdown_timeout + WAIT;
        tokio::time::timeout(limit, task)
            .await
            .unwrap_or_else(|_| panic!("serve() did not return within {limit:?} of the shutdown"))
            .expect("the serve task panicked")
    }

    // ---- tokens ---------------------------------------------------------------

    /// HS256 with the server's secret: a token the server must accept.
    pub fn mint(&self, claims: &Claims) -> String {
        sign(Algorithm::HS256, self.settings.jwt_secret.expose(), claims)
    }

    /// A token valid for an hour.
    pub fn token(&self, sub: &str, role: Role, tenant: &str) -> String {
        self.mint(&claims(sub, role, tenant, 3600))
    }

    /// A `user` token of tenant `default`.
    pub fn user_token(&self, sub: &str) -> String {
        self.token(sub, Role::User, "default")
    }

    /// The admin of tenant `default`.
    pub fn admin_token(&self) -> String {
        self.token(ADMIN, Role::Admin, "default")
    }

    // ---- HTTP -----------------------------------------------------------------

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("GET failed")
    }

    pub async fn post_json(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut request = self.http.post(self.url(path)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("POST failed")
    }

    /// POST with a raw body and an explicit Content-Type.
    pub async fn post_raw(
        &self,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut request = self.http.post(self.url(path)).body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(content_type) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        request.send().await.expect("POST failed")
    }

    pub async fn post_broadcast(&self, token: &str, body: &Value) -> reqwest::Response {
        self.post_json("/api/v1/ws/broadcast", Some(token), body)
            .await
    }

    pub async fn post_user(&self, token: &str, user: &str, body: &Value) -> reqwest::Response {
        self.post_json(&format!("/api/v1/ws/user/{user}"), Some(token), body)
            .await
    }

    pub async fn get_presence(&self, token: &str, user: &str) -> reqwest::Response {
        self.http
            .get(self.url(&format!("/api/v1/ws/user/{user}")))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET presence failed")
    }

    /// A broadcast as the `default` admin that must be accepted; returns the 202 body.
    pub async fn broadcast(&self, kind: &str, data: Value) -> Value {
        let response = self
            .post_broadcast(&self.admin_token(), &json!({"type": kind, "data": data}))
            .await;
        accepted(response).await
    }

    /// A to-user message as the `default` admin that must be accepted.
    pub async fn send_to_user(&self, user: &str, kind: &str, data: Value) -> Value {
        let response = self
            .post_user(
                &self.admin_token(),
                user,
                &json!({"type": kind, "data": data}),
            )
            .await;
        accepted(response).await
    }

    /// The `stats` object of `/api/v1/ws/stats`.
    pub async fn get_stats(&self) -> Value {
        let response = self.get("/api/v1/ws/stats").await;
        assert_eq!(response.status(), 200, "GET /api/v1/ws/stats");
        let body: Value = response.json().await.expect("stats body is JSON");
        body["stats"].clone()
    }

    /// One counter of the stats as a number (panics if absent).
    pub async fn stat(&self, name: &str) -> u64 {
        let stats = self.get_stats().await;
        stats[name]
            .as_u64()
            .unwrap_or_else(|| panic!("stats.{name} is not a number: {stats}"))
    }

    /// Polls a stats counter until `done` holds; returns its last value.
    pub async fn wait_for_stat(&self, name: &str, done: impl Fn(u64) -> bool) -> u64 {
        let mut last = 0;
        let reached = wait_until(WAIT, async || {
            last = self.stat(name).await;
            done(last)
        })
        .await;
        assert!(
            reached,
            "stats.{name} never reached the expected value (last: {last})"
        );
        last
    }

    // ---- WebSocket ------------------------------------------------------------

    /// A connection with the token in the subprotocol pair `token, <jwt>`.
    pub async fn connect(&self, token: &str) -> WsClient {
        WsClient::open(with_token_protocol(
            self.ws_url("").into_client_request().unwrap(),
            token,
        ))
        .await
    }

    /// A connection with the token in `?token=`.
    pub async fn connect_query(&self, token: &str) -> WsClient {
        WsClient::open(
            self.ws_url(&format!("token={token}"))
                .into_client_request()
                .unwrap(),
        )
        .await
    }

    /// A resuming connection: `?since=..&epoch=..`, token in the subprotocol.
    pub async fn connect_resume(&self, token: &str, since: u64, epoch: &str) -> WsClient {
        let request = self
            .ws_url(&format!("since={since}&epoch={epoch}"))
            .into_client_request()
            .unwrap();
        WsClient::open(with_token_protocol(request, token)).await
    }

    /// A connection with the token in the subprotocol and extra headers (e.g. `Origin`).
    pub async fn connect_with_headers(
        &self,
        token: &str,
        headers: &[(&'static str, &str)],
    ) -> WsClient {
        let mut request =
            with_token_protocol(self.ws_url("").into_client_request().unwrap(), token);
        for (name, value) in headers {
            request
                .headers_mut()
                .insert(*name, HeaderValue::from_str(value).unwrap());
        }
        WsClient::open(request).await
    }

    /// Connects and reads the `connected` frame; returns the client and its `data`.
    pub async fn connect_ready(&self, token: &str) -> (WsClient, Value) {
        let mut client = self.connect(token).await;
        let data = client.connected().await;
        (client, data)
    }
}

/// `Sec-WebSocket-Protocol: token, <jwt>`.
pub fn with_token_protocol(mut request: Request, token: &str) -> Request {
    let value =
        HeaderValue::from_str(&format!("token, {token}")).expect("a JWT is a valid header value");
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", value);
    request
}

/// Claims of `sub` that expire `ttl_s` seconds from now.
pub fn claims(sub: &str, role: Role, tenant: &str, ttl_s: i64) -> Claims {
    let now = now_s();
    Claims {
        sub: sub.to_owned(),
        exp: (now as i64 + ttl_s).max(0) as u64,
        iat: now,
        role,
        tenant: tenant.to_owned(),
        name: None,
        channels: None,
    }
}

/// Any serializable claims signed with `alg` and `secret` (for forgeries).
pub fn sign(alg: Algorithm, secret: &str, claims: &impl serde::Serialize) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signing test claims")
}

/// An unsigned token: header `{"alg":"none","typ":"JWT"}`, the payload of `claims`, empty signature.
pub fn none_alg_token(claims: &Claims) -> String {
    let payload = serde_json::to_vec(claims).unwrap();
    format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        base64url(&payload)
    )
}

/// Unpadded base64url, enough to forge token segments by hand.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Asserts a 202 and returns its body `{id, seq, recipients}`.
pub async fn accepted(response: reqwest::Response) -> Value {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(status, 202, "publish not accepted: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("202 body is not JSON ({e}): {text}"))
}

/// The response's `Content-Type` ("" when absent or not text).
pub fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Asserts the status and the SPEC §3 error body `{"error":{"code","message"}}`; returns the body.
pub async fn assert_error(response: reqwest::Response, status: u16, context: &str) -> Value {
    let actual = response.status().as_u16();
    let content_type = content_type(&response);
    let text = response.text().await.unwrap_or_default();
    assert_eq!(
        actual, status,
        "{context}: expected {status}, got {actual} with body {text:?}"
    );
    assert!(
        content_type.starts_with("application/json"),
        "{context}: error Content-Type is {content_type:?}, body {text:?}"
    );
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{context}: error body is not JSON ({e}): {text:?}"));
    assert_error_shape(&body, context);
    body
}

/// `{"error":{"code":"snake_case","message":"non-empty"}}`.
pub fn assert_error_shape(body: &Value, context: &str) {
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: no error.code in {body}"));
    assert!(
        !code.is_empty()
            && code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "{context}: error.code {code:?} is not snake_case"
    );
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: no error.message in {body}"));
    assert!(!message.is_empty(), "{context}: empty error.message");
}

/// Re-evaluates `check` (every 50 ms) until it holds or `limit` passes.
pub async fn wait_until(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A raw HTTP/1.1 exchange (for requests reqwest cannot make, e.g. chunked bodies).
/// Returns the status and the body text.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("write request");
        let mut bytes = Vec::new();
        // The request says `Connection: close`, so the server ends the stream.
        let _ = stream.read_to_end(&mut bytes).await;
        bytes
    };
    let bytes = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("raw HTTP exchange timed out");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status line in {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

// ---- the WebSocket client -------------------------------------------------------

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a read produced, control frames aside.
#[derive(Debug)]
pub enum Event {
    Json(Value),
    /// A close frame: its code (None when the frame carried none).
    Closed(Option<u16>),
    /// The stream ended, or failed, without a close frame.
    Ended(String),
}

/// One WebSocket connection to the server.
pub struct WsClient {
    pub ws: Socket,
    /// The 101 response (its headers: the answered subprotocol).
    pub response: Response,
}

impl WsClient {
    /// Performs the handshake; panics with the HTTP answer if the upgrade is refused.
    pub async fn open(request: Request) -> WsClient {
        let uri = redact(&request.uri().to_string());
        let outcome = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .unwrap_or_else(|_| panic!("WebSocket handshake to {uri} timed out"));
        match outcome {
            Ok((ws, response)) => WsClient { ws, response },
            Err(WsError::Http(response)) => {
                let body = response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned());
                panic!(
                    "upgrade refused: HTTP {} {:?} (expected 101)",
                    response.status(),
                    body
                )
            }
            Err(e) => panic!("WebSocket handshake to {uri} failed: {e}"),
        }
    }

    /// The subprotocol the server answered, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
    }

    /// The next text frame as JSON, a close, or the end; Ping/Pong frames are skipped.
    pub async fn next_event(&mut self) -> Event {
        self.next_event_within(WAIT)
            .await
            .unwrap_or_else(|| panic!("no frame from the server within {WAIT:?}"))
    }

    /// Like [`WsClient::next_event`], but `None` after `limit` without a frame.
    pub async fn next_event_within(&mut self, limit: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            return Some(match next {
                None => Event::Ended("stream ended".to_owned()),
                Some(Err(e)) => Event::Ended(e.to_string()),
                Some(Ok(Message::Text(text))) => match serde_json::from_str(text.as_str()) {
                    Ok(value) => Event::Json(value),
                    Err(e) => panic!("server sent a text frame that is not JSON ({e}): {text}"),
                },
                Some(Ok(Message::Close(frame))) => {
                    Event::Closed(frame.map(|f: CloseFrame| u16::from(f.code)))
                }
                Some(Ok(Message::Binary(bytes))) => {
                    panic!("server sent a binary frame of {} bytes", bytes.len())
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            });
        }
    }

    /// The next JSON frame; panics on a close or the end of the stream.
    pub async fn next_json(&mut self) -> Value {
        match self.next_event().await {
            Event::Json(value) => value,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next JSON frame, which must be of `kind`.
    pub async fn expect_type(&mut self, kind: &str) -> Value {
        let frame = self.next_json().await;
        assert_eq!(frame["type"], kind, "expected a {kind} frame, got {frame}");
        frame
    }

    /// Reads the `connected` frame and returns its `data`.
    pub async fn connected(&mut self) -> Value {
        self.expect_type("connected").await["data"].clone()
    }

    /// Reads until the close frame, asserts its code, and returns the JSON frames read before it.
    pub async fn expect_close(&mut self, code: u16) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            match self.next_event().await {
                Event::Json(value) => frames.push(value),
                Event::Closed(actual) => {
                    assert_eq!(actual, Some(code), "wrong close code (frames before it: {})", summary(&frames));
                    return frames;
                }
                Event::Ended(why) => panic!(
                    "expected close {code}, but the connection ended without a close frame: {why} (frames before it: {})",
                    summary(&frames)
                ),
            }
        }
    }

    /// Asserts that the connection is still open and served: a `ping` gets a `pong`
    /// (frames queued before the pong are returned).
    pub async fn assert_alive(&mut self) -> Vec<Value> {
        self.send_json(&json!({"type": "ping"})).await;
        let mut before = Vec::new();
        loop {
            match self.next_event().await {
                Event::Json(frame) if frame["type"] == "pong" => return before,
                Event::Json(frame) => before.push(frame),
                other => panic!("connection is not alive: expected a pong, got {other:?}"),
            }
        }
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send(Message::text(value.to_string())).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send(Message::text(text.to_owned())).await;
    }

    pub async fn send(&mut self, message: Message) {
        tokio::time::timeout(WAIT, self.ws.send(message))
            .await
            .expect("sending a frame timed out")
            .expect("sending a frame failed");
    }

    /// Closes from the client side (the server sees a normal close).
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(WAIT, self.ws.close(None)).await;
        // Drain until the server's answer so the server has seen the close.
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// Types and seqs of frames, for failure messages.
pub fn summary(frames: &[Value]) -> String {
    let parts: Vec<String> = frames
        .iter()
        .map(|f| match f["seq"].as_u64() {
            Some(seq) => format!("{}#{seq}", f["type"].as_str().unwrap_or("?")),
            None => f["type"].as_str().unwrap_or("?").to_owned(),
        })
        .collect();
    if parts.len() > 20 {
        format!(
            "{} frames: {} … {}",
            parts.len(),
            parts[..10].join(", "),
            parts[parts.len() - 5..].join(", ")
        )
    } else {
        format!("[{}]", parts.join(", "))
    }
}

fn redact(uri: &str) -> String {
    match uri.find("token=") {
        Some(i) => format!("{}token=…", &uri[..i]),
        None => uri.to_owned(),
    }
}

/// The `seq` of a delivered frame.
pub fn seq_of(frame: &Value) -> u64 {
    frame["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("frame without a numeric seq: {frame}"))
}

/// GET a view (`/api/v1/tasks`, `/api/v1/agents`, …) as `token`: 200 and its JSON.
pub async fn get_view(app: &TestApp, path: &str, token: &str) -> Value {
    let response = app
        .http
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET failed");
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(status, 200, "GET {path}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path} is not JSON ({e}): {text}"))
}
