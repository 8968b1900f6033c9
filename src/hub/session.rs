//! One WebSocket connection, from registration to close.
//!
//! A session is a single loop over five sources — shutdown, its one timer (ping,
//! idle, token expiry), inbound frames, and either the pending flush or its
//! outbox — polled together so a socket that stops draining never hides a
//! shutdown, an overflow or an expiry. Frames taken from the outbox are written
//! into the socket's buffer together and flushed once. It runs over any
//! `AsyncRead + AsyncWrite` stream, so it can be driven without a network.

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
use super::{Hub, Membership, Refusal};
use crate::auth::{unix_now, Authenticator, Claims};
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

/// Runs an authenticated connection until it closes.
pub async fn run<S>(
    mut ws: WebSocketStream<S>,
    config: Arc<SessionConfig>,
    claims: Claims,
    resume: Option<Resume>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
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
    claims: Claims,
    /// When the current token (plus leeway) runs out: close 4401 unless refreshed.
    token_deadline: Instant,
    last_heard: Instant,
    next_ping: Instant,
    bucket: TokenBucket,
    /// History still to replay, then the `replay` summary frame.
    backlog: VecDeque<Arc<Envelope>>,
    replay_summary: Option<Utf8Bytes>,
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
                match ws.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(message))) => return Poll::Ready(Event::Inbound(message)),
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Event::ReadFailed(e)),
                    Poll::Ready(None) => return Poll::Ready(Event::PeerGone),
                    Poll::Pending => {}
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
                    {
                        if let Err(ending) = self.fill(ws) {
                            return Poll::Ready(Event::Ended(ending));
                        }
                    }
                    if !self.dirty {
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
                Event::Inbound(message) => self.on_message(ws, message),
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

    /// Writes the next frames into the socket buffer: replay first, then live.
    fn fill<S>(&mut self, ws: &mut WebSocketStream<S>) -> Result<(), Ending>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if !self.backlog.is_empty() {
            let n = self.backlog.len().min(REPLAY_CHUNK);
            for envelope in self.backlog.drain(..n) {
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
        match self.membership.outbox.take() {
            Taken::Overflowed => Err(Ending::Close(close::SLOW_CONSUMER, "slow consumer")),
            Taken::Frames(frames) => {
                for envelope in &frames {
                    write(ws, Message::Text(envelope.text.clone()))?;
                }
                self.unflushed_frames += frames.len() as u64;
                self.in_flight = frames;
                self.dirty = true;
                Ok(())
            }
        }
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

    fn on_message<S>(&mut self, ws: &mut WebSocketStream<S>, message: Message) -> Result<(), Ending>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.last_heard = Instant::now();
        match message {
            Message::Text(text) => {
                if !self.bucket.take(self.last_heard) {
                    return Err(Ending::Close(close::TOO_MANY, "too many frames"));
                }
                let reply = self.on_text(text.as_str());
                self.send_text(ws, reply)
            }
            Message::Binary(_) => Err(Ending::Close(
                close::BINARY,
                "binary frames are not supported",
            )),
            // tungstenite queued the pong; make sure it goes out.
            Message::Ping(_) => {
                self.dirty = true;
                Ok(())
            }
            Message::Pong(_) | Message::Frame(_) => Ok(()),
            Message::Close(_) => Err(Ending::PeerGone),
        }
    }

    /// The answer to one client text frame (SPEC §4.2).
    fn on_text(&mut self, text: &str) -> Utf8Bytes {
        let frame: ClientFrame = match serde_json::from_str(text) {
            Ok(frame) => frame,
            Err(_) => {
                return wire::error_frame(
                    "invalid_frame",
                    "frames must be JSON objects with a string \"type\"",
                )
            }
        };
        match frame.kind.as_str() {
            "ping" => wire::control("pong", json!({"ts": wire::timestamp()})),
            "refresh" => match self.refresh(&frame.data) {
                Ok(exp) => wire::control("refreshed", json!({"exp": exp})),
                Err((code, message)) => wire::error_frame(code, message),
            },
            other => {
                let shown: String = other.chars().take(64).collect();
                wire::error_frame("unknown_type", &format!("unknown frame type '{shown}'"))
            }
        }
    }

    /// Replaces the connection's token; the new one must be for the same user and
    /// tenant and expire later.
    fn refresh(&mut self, data: &serde_json::Value) -> Result<u64, (&'static str, &'static str)> {
        let token = data
            .get("token")
            .and_then(|t| t.as_str())
            .ok_or(("invalid_frame", "refresh needs data.token"))?;
        let claims = self
            .config
            .auth
            .verify(token)
            .map_err(|_| ("invalid_token", "token refused"))?;
        if claims.sub != self.claims.sub || claims.tenant != self.claims.tenant {
            return Err(("token_mismatch", "token is for another user or tenant"));
        }
        if claims.exp <= self.claims.exp {
            return Err((
                "token_not_later",
                "token does not expire later than the current one",
            ));
        }
        self.token_deadline = deadline_of(claims.exp, self.config.leeway);
        let exp = claims.exp;
        self.claims = claims;
        Ok(exp)
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
/// the rest for the next flush; the loop only feeds it when the last flush is done,
/// so the buffer holds at most one batch.
fn write<S>(ws: &mut WebSocketStream<S>, message: impl Into<Message>) -> Result<(), Ending>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.start_send_unpin(message.into())
        .map_err(|_| Ending::PeerGone)
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
    let remaining = (exp + leeway.as_secs()).saturating_sub(unix_now());
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
}
