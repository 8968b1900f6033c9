//! One WebSocket connection, from registration to close.
//!
//! A session is a single loop over five sources — shutdown, its one timer (ping,
//! idle, token expiry), inbound frames, and either the pending flush or its
//! outbox — polled together so a socket that stops draining never hides a
//! shutdown, an overflow or an expiry. Frames taken from the outbox are written
//! into the socket's buffer together, up to [`BATCH_BYTES`], and flushed once.
//! It runs over any `AsyncRead + AsyncWrite` stream, so it can be driven
//! without a network.
//!
//! What one socket may hold is bounded (SPEC §4.3): every client frame, control
//! frames included, takes a token from the frame-rate bucket, and the socket's
//! write buffer has a hard limit (`max_write_buffer_size`, set where the
//! `WebSocketConfig` is built); answers that would pass it close the socket
//! with 4503 instead of growing it. tungstenite keeps at most one pending Pong
//! reply once that limit is set, so unread Pongs cannot pile up either.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::outbox::Taken;
use super::wire::{self, ClientFrame};
use super::{Hub, Membership, Refusal, SubscribeError};
use crate::auth::{unix_now, Authenticator, Claims, Role};
use crate::config::ChannelSettings;
use crate::log::Envelope;
use crate::shutdown::Shutdown;

/// Close codes of SPEC §4.2.
pub mod close {
    pub const RESTART: u16 = 1012;
    pub const BINARY: u16 = 1003;
    pub const TOO_BIG: u16 = 1009;
    pub const PROTOCOL: u16 = 1002;
    pub const UNAUTHORIZED: u16 = 4401;
    pub const FORBIDDEN: u16 = 4403;
    pub const IDLE: u16 = 4408;
    pub const TOO_MANY: u16 = 4429;
    pub const SLOW_CONSUMER: u16 = 4503;
}

/// Replayed history is written in chunks this large, so a long resume neither
/// builds one huge buffer nor starves the loop.
const REPLAY_CHUNK: usize = 256;
/// A batch stops taking frames once it holds this many bytes (a frame is never
/// split, so a batch may pass it by one frame). Together with the replies
/// written while a flush is pending, this is what the socket's write buffer
/// must hold: see [`write_buffer_limit`].
pub const BATCH_BYTES: usize = 64 * 1024;
/// Fill-and-flush rounds a session runs in one turn before it yields.
const WRITE_ROUNDS: usize = 8;
/// How long a closing socket gets to take our close frame and answer it.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What every session shares; built once at start.
#[derive(Debug)]
pub struct SessionConfig {
    pub hub: Hub,
    pub auth: Arc<Authenticator>,
    pub shutdown: Shutdown,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// The ping period suggested to clients in `connected`.
    pub heartbeat: Duration,
    /// Tokens stay valid this long past `exp` (the same leeway as at connect).
    pub leeway: Duration,
    pub frame_rate: f64,
    pub frame_burst: f64,
    /// `USER_CHANNELS` and `MAX_SUBSCRIPTIONS` (the history bounds are the log's).
    pub channels: ChannelSettings,
}

/// A client's request to resume: `since` and `epoch` of the URL.
#[derive(Debug, Clone)]
pub struct Resume {
    pub since: u64,
    pub epoch: String,
}

/// Why the loop ended.
enum Ending {
    /// We close with this code and reason.
    Close(u16, &'static str),
    /// The peer closed (its close frame is answered by tungstenite) or vanished.
    PeerGone,
}

enum Event {
    Shutdown,
    Tick,
    Inbound(Message),
    ReadFailed(WsError),
    PeerGone,
    /// Writing queued frames into the socket failed in a way that ends the session.
    Ended(Ending),
    WriteFailed,
    Overflowed,
}

/// Runs an authenticated connection until it closes. The claims come boxed:
/// a future keeps room for its arguments as long as it lives, and the
/// session holds them too, so inline they would be paid for twice by every
/// connection.
pub async fn run<S>(
    mut ws: WebSocketStream<S>,
    config: Arc<SessionConfig>,
    claims: Box<Claims>,
    resume: Option<Resume>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    config.hub.prepare(&claims.tenant).await;
    let registered = config.hub.register(
        &claims.tenant,
        &claims.sub,
        claims.role,
        resume.as_ref().map(|r| (r.since, r.epoch.as_str())),
    );
    let (membership, snapshot) = match registered {
        Ok(registered) => registered,
        Err(refusal) => {
            config.hub.metrics().rate_limited.inc();
            let reason = match refusal {
                Refusal::ServerFull => "too many connections",
                Refusal::UserFull => "too many connections for this user",
            };
            close_socket(&mut ws, close::TOO_MANY, reason).await;
            return;
        }
    };
    tracing::debug!(connection = membership.id, user = %claims.sub, tenant = %claims.tenant, "connection open");

    let now = Instant::now();
    let mut session = Session {
        membership,
        token_deadline: deadline_of(claims.exp, config.leeway),
        claims,
        last_heard: now,
        next_ping: now + config.ping_interval,
        bucket: TokenBucket::new(config.frame_rate, config.frame_burst),
        backlog: VecDeque::new(),
        replay_summary: None,
        pending: VecDeque::new(),
        in_flight: VecDeque::new(),
        unflushed_frames: 0,
        dirty: false,
        config: Arc::clone(&config),
    };
    let connected = wire::control(
        "connected",
        json!({
            "connection_id": session.membership.id.to_string(),
            "user_id": session.claims.sub,
            "tenant": session.claims.tenant,
            "epoch": snapshot.epoch,
            "seq": snapshot.head,
            "heartbeat_s": config.heartbeat.as_secs(),
        }),
    );
    if let Some(replay) = snapshot.replay {
        config.hub.metrics().resumed(false, replay.complete);
        session.replay_summary = Some(wire::control(
            "replay",
            json!({"from": replay.from, "to": replay.to, "count": replay.entries.len(), "complete": replay.complete}),
        ));
        session.backlog = replay.entries.into();
    }
    let ending = match session.send_text(&mut ws, connected) {
        Ok(()) => session.drive(&mut ws).await,
        Err(ending) => ending,
    };
    let id = session.membership.id;
    match ending {
        Ending::Close(code, reason) => {
            if code == close::SLOW_CONSUMER {
                config.hub.metrics().slow_consumer_disconnects.inc();
            } else if code == close::TOO_MANY {
                config.hub.metrics().rate_limited.inc();
            }
            tracing::debug!(connection = id, code, reason, "connection closing");
            // Unregister first: a socket that takes its time to close gets no more messages.
            drop(session);
            close_socket(&mut ws, code, reason).await;
        }
        Ending::PeerGone => {
            drop(session);
            let _ = tokio::time::timeout(CLOSE_GRACE, ws.flush()).await;
            tracing::debug!(connection = id, "connection closed by peer");
        }
    }
}

/// Sends a close frame, then waits (bounded) for the peer to take it and answer,
/// so unread input never turns our close into a reset.
pub async fn close_socket<S>(ws: &mut WebSocketStream<S>, code: u16, reason: &'static str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let deadline = Instant::now() + CLOSE_GRACE;
    if tokio::time::timeout_at(deadline, ws.close(Some(frame)))
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::time::timeout_at(deadline, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

struct Session {
    config: Arc<SessionConfig>,
    membership: Membership,
    claims: Box<Claims>,
    /// When the current token (plus leeway) runs out: close 4401 unless refreshed.
    token_deadline: Instant,
    last_heard: Instant,
    next_ping: Instant,
    bucket: TokenBucket,
    /// History still to replay, then the `replay` summary frame.
    backlog: VecDeque<Arc<Envelope>>,
    replay_summary: Option<Utf8Bytes>,
    /// Live frames taken from the outbox that did not fit in the last batch.
    pending: VecDeque<Arc<Envelope>>,
    /// Live frames written but not yet flushed, for the delivery-latency histogram.
    in_flight: VecDeque<Arc<Envelope>>,
    unflushed_frames: u64,
    /// The socket holds written frames that still need a flush.
    dirty: bool,
}

impl Session {
    async fn drive<S>(&mut self, ws: &mut WebSocketStream<S>) -> Ending
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let shutdown = self.config.shutdown.clone();
        let mut shutdown = pin!(shutdown.triggered());
        let mut timer = pin!(tokio::time::sleep_until(self.next_deadline()));
        loop {
            let event = poll_fn(|cx| {
                if shutdown.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Shutdown);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Tick);
                }
                // No client frame is taken while a replay is being written:
                // a subscribe's replay must follow the one before it whole.
                let reading = self.backlog.is_empty() && self.replay_summary.is_none();
                if reading {
                    match ws.poll_next_unpin(cx) {
                        Poll::Ready(Some(Ok(message))) => {
                            return Poll::Ready(Event::Inbound(message))
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Event::ReadFailed(e)),
                        Poll::Ready(None) => return Poll::Ready(Event::PeerGone),
                        Poll::Pending => {}
                    }
                }
                // Write what is queued and flush it in this same turn, and go on
                // while more is queued: one wake-up per batch, not one per step.
                for _ in 0..WRITE_ROUNDS {
                    let outbox_ready = self.membership.outbox.poll_ready(cx).is_ready();
                    if self.dirty {
                        if outbox_ready && self.membership.outbox.is_overflowed() {
                            return Poll::Ready(Event::Overflowed);
                        }
                    } else if outbox_ready
                        || !self.backlog.is_empty()
                        || self.replay_summary.is_some()
                        || !self.pending.is_empty()
                    {
                        if let Err(ending) = self.fill(ws) {
                            return Poll::Ready(Event::Ended(ending));
                        }
                    }
                    if !self.dirty {
                        if !reading && self.backlog.is_empty() && self.replay_summary.is_none() {
                            // The replay is out: read again (nothing else
                            // would wake us for the frames waiting there).
                            cx.waker().wake_by_ref();
                        }
                        return Poll::Pending;
                    }
                    match ws.poll_flush_unpin(cx) {
                        Poll::Ready(Ok(())) => self.on_flushed(),
                        Poll::Ready(Err(_)) => return Poll::Ready(Event::WriteFailed),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                // Still more to write: yield so other sessions get their turn.
                cx.waker().wake_by_ref();
                Poll::Pending
            })
            .await;

            let step = match event {
                Event::Shutdown => Err(Ending::Close(close::RESTART, "server restarting")),
                Event::Tick => {
                    let step = self.on_tick(ws);
                    timer.as_mut().reset(self.next_deadline());
                    step
                }
                Event::Inbound(message) => match self.on_message(ws, message) {
                    // Boxed: every connection's task keeps room for its
                    // largest await, and most never subscribe or refresh.
                    Ok(Some(Work::Subscribe(request))) => {
                        Box::pin(self.subscribe(ws, request)).await
                    }
                    Ok(Some(Work::Refresh(token))) => Box::pin(self.refresh(ws, &token)).await,
                    Ok(None) => Ok(()),
                    Err(ending) => Err(ending),
                },
                Event::ReadFailed(error) => Err(read_failure(error)),
                Event::PeerGone | Event::WriteFailed => Err(Ending::PeerGone),
                Event::Ended(ending) => Err(ending),
                Event::Overflowed => Err(Ending::Close(close::SLOW_CONSUMER, "slow consumer")),
            };
            if let Err(ending) = step {
                return ending;
            }
        }
    }

    /// Writes the next batch into the socket buffer: replay first, then live.
    /// A batch ends at [`BATCH_BYTES`], so the buffer never holds a whole
    /// backlog or outbox; what is left waits for the next round.
    fn fill<S>(&mut self, ws: &mut WebSocketStream<S>) -> Result<(), Ending>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if !self.backlog.is_empty() {
            let mut bytes = 0;
            let mut n = 0;
            while n < REPLAY_CHUNK && bytes < BATCH_BYTES {
                let Some(envelope) = self.backlog.pop_front() else {
                    break;
                };
                bytes += envelope.text.len();
                n += 1;
                write(ws, Message::Text(envelope.text.clone()))?;
            }
            self.unflushed_frames += n as u64;
            self.config.hub.metrics().messages_replayed.inc_by(n as u64);
            self.dirty = true;
            return Ok(());
        }
        if let Some(summary) = self.replay_summary.take() {
            return self.send_text(ws, summary);
        }
        if self.pending.is_empty() {
            match self.membership.outbox.take() {
                Taken::Overflowed => {
                    return Err(Ending::Close(close::SLOW_CONSUMER, "slow consumer"))
                }
                Taken::Restart => return Err(Ending::Close(close::RESTART, "log restarted")),
                Taken::Frames(frames) => self.pending = frames,
            }
        }
        let mut bytes = 0;
        while bytes < BATCH_BYTES {
            let Some(envelope) = self.pending.pop_front() else {
                break;
            };
            bytes += envelope.text.len();
            write(ws, Message::Text(envelope.text.clone()))?;
            self.unflushed_frames += 1;
            self.in_flight.push_back(envelope);
            self.dirty = true;
        }
        if self.pending.is_empty() {
            // Drop rather than clear: an idle connection keeps no buffer.
            self.pending = VecDeque::new();
        }
        Ok(())
    }

    fn on_flushed(&mut self) {
        self.dirty = false;
        let metrics = self.config.hub.metrics();
        metrics
            .messages_sent
            .inc_by(std::mem::take(&mut self.unflushed_frames));
        if !self.in_flight.is_empty() {
            let now = std::time::Instant::now();
            for envelope in &self.in_flight {
                metrics
                    .delivery_latency
                    .observe(now.duration_since(envelope.published_at).as_secs_f64());
            }
            // Drop rather than clear: an idle connection keeps no buffer.
            self.in_flight = VecDeque::new();
        }
    }

    fn on_tick<S>(&mut self, ws: &mut WebSocketStream<S>) -> Result<(), Ending>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let now = Instant::now();
        if now >= self.token_deadline {
            return Err(Ending::Close(close::UNAUTHORIZED, "token expired"));
        }
        if now >= self.last_heard + self.config.idle_timeout {
            return Err(Ending::Close(close::IDLE, "idle timeout"));
        }
        if now >= self.next_ping {
            write(ws, Message::Ping(Default::default()))?;
            self.dirty = true;
            self.next_ping = now + self.config.ping_interval;
        }
        Ok(())
    }

    fn next_deadline(&self) -> Instant {
        self.token_deadline
            .min(self.next_ping)
            .min(self.last_heard + self.config.idle_timeout)
    }

    /// Handles one client frame; a subscribe that may go ahead, or a refresh,
    /// comes back (boxed: the connection task keeps room for it) to be awaited.
    fn on_message<S>(
        &mut self,
        ws: &mut WebSocketStream<S>,
        message: Message,
    ) -> Result<Option<Work>, Ending>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.last_heard = Instant::now();
        if let Message::Close(_) = message {
            return Err(Ending::PeerGone);
        }
        // Every frame costs a token, control frames too: a Ping is answered (a
        // Pong to write), so free Pings would be free work and free liveness.
        if !self.bucket.take(self.last_heard) {
            return Err(Ending::Close(close::TOO_MANY, "too many frames"));
        }
        match message {
            Message::Text(text) => self.on_text(ws, text.as_str()),
            Message::Binary(_) => Err(Ending::Close(
                close::BINARY,
                "binary frames are not supported",
            )),
            // tungstenite queued the pong; make sure it goes out.
            Message::Ping(_) => {
                self.dirty = true;
                Ok(None)
            }
            Message::Pong(_) | Message::Frame(_) | Message::Close(_) => Ok(None),
        }
    }

    /// Answers one client text frame, or hands back the work it asks for.
    fn on_text<S>(
        &mut self,
        ws: &mut WebSocketStream<S>,
        text: &str,
    ) -> Result<Option<Work>, Ending>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match answer(text) {
            Answer::Reply(reply) => self.send_text(ws, reply).map(|()| None),
            Answer::Refresh(token) => Ok(Some(Work::Refresh(token))),
            Answer::Subscribe(request) => {
                let channel = &request.channel;
                let allowed = crate::channels::may_subscribe(
                    self.claims.role == Role::Admin,
                    self.claims.channels.as_deref(),
                    &self.config.channels.user_channels,
                    channel,
                );
                let refusal = if !allowed {
                    Some(("forbidden", "this token may not subscribe to this channel"))
                } else if !self.membership.follows(channel)
                    && self.membership.subscription_count()
                        >= self.config.channels.max_subscriptions
                {
                    Some((
                        "too_many_subscriptions",
                        "too many subscriptions on this connection",
                    ))
                } else {
                    None
                };
                match refusal {
                    Some((code, message)) => {
                        let reply = wire::channel_error(code, message, channel);
                        self.send_text(ws, reply).map(|()| None)
                    }
                    None => Ok(Some(Work::Subscribe(request))),
                }
            }
            Answer::Unsubscribe(channel) => {
                self.membership.unsubscribe(&channel);
                self.pending
                    .retain(|envelope| envelope.channel.as_deref() != Some(&channel));
                let reply = wire::control("unsubscribed", json!({"channel": channel}));
                self.send_text(ws, reply).map(|()| None)
            }
        }
    }

    /// An in-band `refresh`: a valid token replaces the connection's claims
    /// and expiry. Its check may wait for one fetch of the provider's key set
    /// (a new `kid`, at most 5 s), while no frame is read or written.
    async fn refresh<S>(&mut self, ws: &mut WebSocketStream<S>, token: &str) -> Result<(), Ending>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let reply = match check_refresh(token, &self.config.auth, &self.claims).await {
            Ok(claims) => {
                let reply = wire::control("refreshed", json!({"exp": claims.exp}));
                self.token_deadline = deadline_of(claims.exp, self.config.leeway);
                *self.claims = claims;
                reply
            }
            Err((code, message)) => wire::error_frame(code, message),
        };
        self.send_text(ws, reply)
    }

    /// Subscribes to an allowed channel (SPEC §4.4): its replay goes out
    /// first, then `subscribed`, then (from the outbox) its live frames; no
    /// client frame is read until the replay is written.
    async fn subscribe<S>(
        &mut self,
        ws: &mut WebSocketStream<S>,
        request: Box<SubscribeRequest>,
    ) -> Result<(), Ending>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let hub = self.config.hub.clone();
        hub.prepare_channel(&self.claims.tenant, &request.channel)
            .await;
        let channel = &request.channel;
        let resubscribe = self.membership.follows(channel);
        let resume = request.since.map(|since| (since, request.epoch.as_deref()));
        let max = self.config.channels.max_subscriptions;
        let snapshot = match self.membership.subscribe(channel, resume, max) {
            Ok(snapshot) => snapshot,
            Err(SubscribeError::TooMany) => {
                let reply = wire::channel_error(
                    "too_many_subscriptions",
                    "too many subscriptions on this connection",
                    channel,
                );
                return self.send_text(ws, reply);
            }
        };
        if resubscribe {
            // The old subscription's frames not written yet are gone with it.
            self.pending
                .retain(|envelope| envelope.channel.as_deref() != Some(&**channel));
        }
        let (from, complete, entries) = match snapshot.replay {
            Some(replay) => {
                hub.metrics().resumed(true, replay.complete);
                (replay.from, replay.complete, replay.entries)
            }
            None => (snapshot.head, true, Vec::new()),
        };
        self.replay_summary = Some(wire::control(
            "subscribed",
            json!({
                "channel": channel,
                "epoch": snapshot.epoch,
                "from": from,
                "to": snapshot.head,
                "count": entries.len(),
                "complete": complete,
            }),
        ));
        debug_assert!(self.backlog.is_empty(), "no frame is read during a replay");
        self.backlog = entries.into();
        Ok(())
    }

    fn send_text<S>(&mut self, ws: &mut WebSocketStream<S>, text: Utf8Bytes) -> Result<(), Ending>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        write(ws, Message::Text(text))?;
        self.unflushed_frames += 1;
        self.dirty = true;
        Ok(())
    }
}

/// Buffers a frame in the socket. tungstenite writes through when it can and keeps
/// the rest for the next flush; the loop only feeds it a batch when the last flush
/// is done, so the buffer holds one batch plus the replies written meanwhile. A
/// full buffer means the client sends but does not read: 4503, never more memory.
fn write<S>(ws: &mut WebSocketStream<S>, message: impl Into<Message>) -> Result<(), Ending>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.start_send_unpin(message.into()).map_err(|e| match e {
        WsError::WriteBufferFull(_) => Ending::Close(close::SLOW_CONSUMER, "slow consumer"),
        _ => Ending::PeerGone,
    })
}

/// The hard limit of one socket's write buffer (`max_write_buffer_size`) for
/// frames of at most `max_message_bytes`: a batch ([`BATCH_BYTES`] plus its last
/// frame), room for the replies and Pongs written while that batch drains, and
/// the envelope fields around a message. Anything beyond is a client that does
/// not read.
pub fn write_buffer_limit(max_message_bytes: usize) -> usize {
    BATCH_BYTES
        .saturating_add(max_message_bytes.saturating_mul(2))
        .saturating_add(64 * 1024)
}

/// A well-formed `subscribe` frame, not yet authorized.
#[derive(Debug)]
struct SubscribeRequest {
    channel: String,
    since: Option<u64>,
    epoch: Option<String>,
}

/// What a client text frame asks for.
#[derive(Debug)]
enum Answer {
    /// The one frame to send back.
    Reply(Utf8Bytes),
    /// A `refresh` with this token, to be checked ([`check_refresh`]).
    Refresh(Box<str>),
    Subscribe(Box<SubscribeRequest>),
    Unsubscribe(String),
}

/// What a client frame leaves the session to await.
enum Work {
    Subscribe(Box<SubscribeRequest>),
    Refresh(Box<str>),
}

/// The longest epoch a client may send (ours are 32 hex digits).
const MAX_EPOCH_LEN: usize = 64;

/// The answer to a client text frame (SPEC §4.2, §4.4). Pure, so every frame
/// a client can send is tested without a socket.
fn answer(text: &str) -> Answer {
    let frame: ClientFrame = match serde_json::from_str(text) {
        Ok(frame) => frame,
        Err(_) => {
            let reply = wire::error_frame(
                "invalid_frame",
                "frames must be JSON objects with a string \"type\"",
            );
            return Answer::Reply(reply);
        }
    };
    match frame.kind.as_str() {
        "ping" => Answer::Reply(wire::control("pong", json!({"ts": wire::timestamp()}))),
        "refresh" => match frame.data.get("token").and_then(|t| t.as_str()) {
            Some(token) => Answer::Refresh(token.into()),
            None => Answer::Reply(wire::error_frame(
                "invalid_frame",
                "refresh needs data.token",
            )),
        },
        "subscribe" => match parse_subscribe(&frame.data) {
            Ok(request) => Answer::Subscribe(Box::new(request)),
            Err(reply) => Answer::Reply(reply),
        },
        "unsubscribe" => match channel_of(&frame.data) {
            Ok(channel) => Answer::Unsubscribe(channel.to_owned()),
            Err(reply) => Answer::Reply(reply),
        },
        other => {
            let shown: String = other.chars().take(64).collect();
            let message = format!("unknown frame type '{shown}'");
            Answer::Reply(wire::error_frame("unknown_type", &message))
        }
    }
}

/// `data.channel` of a subscribe or unsubscribe: a channel name, never a pattern.
fn channel_of(data: &serde_json::Value) -> Result<&str, Utf8Bytes> {
    match data.get("channel").and_then(|c| c.as_str()) {
        Some(name) if crate::channels::valid_name(name) => Ok(name),
        Some(name) => {
            let shown: String = name.chars().take(200).collect();
            Err(wire::channel_error(
                "invalid_frame",
                "data.channel must be a channel name such as task:7f3a (no wildcards)",
                &shown,
            ))
        }
        None => Err(wire::error_frame(
            "invalid_frame",
            "data.channel must be a channel name such as task:7f3a",
        )),
    }
}

fn parse_subscribe(data: &serde_json::Value) -> Result<SubscribeRequest, Utf8Bytes> {
    let channel = channel_of(data)?;
    let invalid = |message| wire::channel_error("invalid_frame", message, channel);
    let since = match data.get("since") {
        None | Some(serde_json::Value::Null) => None,
        Some(since) => Some(
            since
                .as_u64()
                .ok_or_else(|| invalid("data.since must be a non-negative integer"))?,
        ),
    };
    let epoch = match data.get("epoch") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(epoch)) if epoch.len() <= MAX_EPOCH_LEN => {
            Some(epoch.clone())
        }
        Some(_) => return Err(invalid("data.epoch must be a string of at most 64 bytes")),
    };
    Ok(SubscribeRequest {
        channel: channel.to_owned(),
        since,
        epoch,
    })
}

/// The claims of a refresh frame's token: it must be valid, for the same user,
/// tenant and role (a refresh is no way to change who one is or promote
/// oneself; a demoted admin reconnects with the new role), and expire later.
async fn check_refresh(
    token: &str,
    auth: &Authenticator,
    current: &Claims,
) -> Result<Claims, (&'static str, &'static str)> {
    let claims = auth
        .verify(token)
        .await
        .map_err(|_| ("invalid_token", "token refused"))?;
    if claims.sub != current.sub || claims.tenant != current.tenant || claims.role != current.role {
        return Err((
            "token_mismatch",
            "token is for another user, tenant or role",
        ));
    }
    if claims.exp <= current.exp {
        return Err((
            "token_not_later",
            "token does not expire later than the current one",
        ));
    }
    Ok(claims)
}

fn read_failure(error: WsError) -> Ending {
    use tokio_tungstenite::tungstenite::error::CapacityError;
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            Ending::Close(close::TOO_BIG, "frame too large")
        }
        WsError::Capacity(_) => Ending::Close(close::TOO_BIG, "frame too large"),
        WsError::Protocol(_) | WsError::Utf8(_) => Ending::Close(close::PROTOCOL, "protocol error"),
        _ => Ending::PeerGone,
    }
}

/// The instant a token with this `exp` (Unix seconds) stops being accepted.
fn deadline_of(exp: u64, leeway: Duration) -> Instant {
    // `exp` is the client's number: near u64::MAX a plain `+` wraps (or panics).
    let remaining = exp
        .saturating_add(leeway.as_secs())
        .saturating_sub(unix_now());
    // Far-future tokens: cap so the timer arithmetic never overflows.
    Instant::now() + Duration::from_secs(remaining.min(10 * 365 * 86_400))
}

/// Client frames allowed: `rate` per second sustained, `burst` at once.
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64) -> Self {
        TokenBucket {
            tokens: burst,
            rate,
            burst,
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_burst_then_rate() {
        let mut bucket = TokenBucket::new(10.0, 50.0);
        let start = Instant::now();
        assert!((0..50).all(|_| bucket.take(start)));
        assert!(!bucket.take(start));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(bucket.take(Instant::now()));
        assert!(!bucket.take(Instant::now()));
    }

    /// Every open connection is one of these futures: what it holds is
    /// what an idle connection costs (issue 10: at most 5 KiB each at 19k,
    /// RSS included, with channels that most connections never use).
    #[tokio::test]
    async fn the_connection_future_stays_small() {
        use crate::auth::Role;
        use crate::config::Settings;
        use crate::hub::{Hub, Limits};
        use crate::log::{Engine, Log};
        let settings = Settings::for_tests("/nonexistent");
        let limits = Limits {
            send_queue: 16,
            max_connections: 10,
            max_connections_per_user: 10,
        };
        let log = Log::new(Engine::Memory, 100, usize::MAX);
        let config = Arc::new(SessionConfig {
            hub: Hub::new(limits, Arc::new(crate::metrics::Metrics::new()), log),
            auth: Arc::new(Authenticator::new(&settings).unwrap()),
            shutdown: Shutdown::new(),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            heartbeat: Duration::from_secs(25),
            leeway: Duration::ZERO,
            frame_rate: 10.0,
            frame_burst: 50.0,
            channels: settings.channels.clone(),
        });
        let (socket, _peer) = tokio::io::duplex(64);
        let ws = WebSocketStream::from_raw_socket(
            socket,
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let claims = Claims::new("u", Role::User, "t", Duration::from_secs(60));
        let connection = run(ws, config, Box::new(claims), None);
        let size = std::mem::size_of_val(&connection);
        // 1,832 bytes before channels, 1,960 with them, 1,648 with the
        // claims boxed (debug build).
        assert!(size <= 1800, "the connection future is {size} bytes");
    }

    #[test]
    fn a_deadline_far_in_the_future_does_not_overflow() {
        let deadline = deadline_of(u64::MAX, Duration::from_secs(30));
        assert!(deadline > Instant::now() + Duration::from_secs(86_400));
    }

    /// Client frames (issue 8): whatever text a client sends, the handler gives
    /// exactly one answer of a documented type, never panics, and only a valid
    /// refresh for the same user, tenant and role replaces the claims.
    mod frames {
        use proptest::prelude::*;
        use serde_json::Value;

        use futures_util::FutureExt;

        use super::super::{answer, check_refresh, Answer};
        use crate::auth::{Authenticator, Claims, Role};
        use crate::config::Settings;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                ".{0,40}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                    prop::collection::btree_map(".{0,12}", inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        struct World {
            auth: Authenticator,
            current: Claims,
            /// Tokens a refresh may carry: good, other role, other user, older, garbage.
            tokens: Vec<String>,
        }

        fn world() -> World {
            let auth = Authenticator::new(&Settings::for_tests("/nonexistent")).unwrap();
            let hour = std::time::Duration::from_secs(3600);
            let current = Claims::new("u1", Role::Admin, "acme", hour);
            let later = |sub: &str, role, tenant: &str| {
                auth.mint(&Claims::new(sub, role, tenant, hour * 2))
            };
            let tokens = vec![
                later("u1", Role::Admin, "acme"),
                later("u1", Role::User, "acme"),
                later("u2", Role::Admin, "acme"),
                later("u1", Role::Admin, "other"),
                auth.mint(&current),
                "not.a.token".to_owned(),
                String::new(),
            ];
            World {
                auth,
                current,
                tokens,
            }
        }

        fn frame_text() -> impl Strategy<Value = String> {
            let kind = prop_oneof![
                Just(Value::from("ping")),
                Just(Value::from("refresh")),
                Just(Value::from("subscribe")),
                Just(Value::from("unsubscribe")),
                ".{0,80}".prop_map(Value::from),
                json_value(),
            ];
            let data = prop_oneof![
                json_value(),
                (
                    prop_oneof![Just("task:7f3a".to_owned()), "[a-z:*]{0,12}"],
                    json_value()
                )
                    .prop_map(
                        |(channel, since)| serde_json::json!({"channel": channel, "since": since})
                    ),
                (0..7usize).prop_map(|i| serde_json::json!({"token": i})),
            ];
            let object = (kind, data, any::<bool>()).prop_map(|(kind, data, with_data)| {
                let mut frame = serde_json::json!({"type": kind});
                if with_data {
                    frame["data"] = data;
                }
                frame.to_string()
            });
            prop_oneof![".{0,200}", json_value().prop_map(|v| v.to_string()), object]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn every_text_frame_gets_exactly_one_documented_answer(text in frame_text()) {
                let world = world();
                // `{"token": i}` stands for the i-th prepared token.
                let text = match serde_json::from_str::<Value>(&text) {
                    Ok(mut v) => match v["data"]["token"].as_u64() {
                        Some(i) => {
                            v["data"]["token"] = world.tokens[i as usize].clone().into();
                            v.to_string()
                        }
                        None => text,
                    },
                    Err(_) => text,
                };
                let (reply, refreshed) = match answer(&text) {
                    Answer::Reply(reply) => (reply, None),
                    // Our own tokens are checked without waiting.
                    Answer::Refresh(token) => {
                        let checked = check_refresh(&token, &world.auth, &world.current)
                            .now_or_never()
                            .expect("an HS256 token is checked at once");
                        match checked {
                            Ok(claims) => (
                                super::super::wire::control("refreshed", serde_json::json!({"exp": claims.exp})),
                                Some(claims),
                            ),
                            Err((code, message)) => (super::super::wire::error_frame(code, message), None),
                        }
                    }
                    // Well-formed channel frames: the session takes them on.
                    Answer::Subscribe(request) => {
                        prop_assert!(crate::channels::valid_name(&request.channel));
                        return Ok(());
                    }
                    Answer::Unsubscribe(channel) => {
                        prop_assert!(crate::channels::valid_name(&channel));
                        return Ok(());
                    }
                };
                let reply: Value = serde_json::from_str(reply.as_str()).expect("answers are JSON");
                let kind = reply["type"].as_str().expect("a string type");
                prop_assert!(["pong", "refreshed", "error"].contains(&kind), "{reply}");
                if kind == "error" {
                    prop_assert!(reply["data"]["code"].is_string() && reply["data"]["message"].is_string());
                }
                prop_assert_eq!(refreshed.is_some(), kind == "refreshed");
                if let Some(claims) = refreshed {
                    prop_assert_eq!(&claims.sub, &world.current.sub);
                    prop_assert_eq!(&claims.tenant, &world.current.tenant);
                    prop_assert_eq!(claims.role, world.current.role);
                    prop_assert!(claims.exp > world.current.exp);
                }
            }
        }
    }
}
