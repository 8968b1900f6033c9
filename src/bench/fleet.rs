//! The receiving side: many authenticated WebSocket connections, each one task
//! that counts what it receives, checks it, and hands its tally back at the end.
//! In channel runs each connection first subscribes to its own channel (SPEC
//! §4.4) and only counts as open once the server has answered `subscribed`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::{round_robin, Clock, Endpoint, Identity};

/// Longest a connection may take from TCP connect to its `connected` frame.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a connection waits to send its Close frame when the run ends.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(500);
/// Loopback source addresses used: each has its own ephemeral port range, so
/// together they allow millions of connections to one server port.
const SOURCE_ADDRESSES: usize = 250;

/// Counters every connection updates, so the runner can watch a phase without
/// stopping the connections.
#[derive(Debug)]
pub struct Progress {
    pub connected: AtomicUsize,
    pub failed: AtomicUsize,
    /// Connections the server closed (or that broke) after their `connected` frame.
    pub dropped: AtomicUsize,
    /// `bench` messages received, all connections together.
    pub received: AtomicU64,
    /// Connections open now, per target index (user, or channel in channel
    /// runs): what a publish addresses.
    alive: Vec<AtomicU32>,
    /// Connections that received their `connected` frame, per node index.
    connected_by_node: Vec<AtomicUsize>,
    /// Why connections failed to open, with counts. Only failure paths lock it.
    failures: Mutex<BTreeMap<String, usize>>,
    /// Why open connections ended early, with counts.
    drops: Mutex<BTreeMap<String, usize>>,
}

impl Progress {
    fn new(targets: usize, nodes: usize) -> Progress {
        Progress {
            connected: AtomicUsize::new(0),
            connected_by_node: (0..nodes).map(|_| AtomicUsize::new(0)).collect(),
            failed: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            received: AtomicU64::new(0),
            alive: (0..targets).map(|_| AtomicU32::new(0)).collect(),
            failures: Mutex::default(),
            drops: Mutex::default(),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        let dropped = self.dropped.load(Ordering::Relaxed);
        self.connected
            .load(Ordering::Relaxed)
            .saturating_sub(dropped)
    }

    /// Open connections per target index (user, or channel), at this moment.
    pub fn alive_by_target(&self) -> Vec<u64> {
        self.alive
            .iter()
            .map(|n| u64::from(n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Connections that opened, per node index.
    pub fn connected_by_node(&self) -> Vec<u64> {
        self.connected_by_node
            .iter()
            .map(|n| n.load(Ordering::Relaxed) as u64)
            .collect()
    }

    /// Reasons connections failed to open, most frequent first.
    pub fn failures(&self) -> Vec<(String, usize)> {
        by_count(&self.failures)
    }

    /// Reasons open connections ended, most frequent first.
    pub fn drops(&self) -> Vec<(String, usize)> {
        by_count(&self.drops)
    }

    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *lock(&self.failures).entry(why).or_default() += 1;
    }

    fn drop_connection(&self, target: usize, why: String) {
        self.alive[target].fetch_sub(1, Ordering::Relaxed);
        self.dropped.fetch_add(1, Ordering::Relaxed);
        *lock(&self.drops).entry(why).or_default() += 1;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking connection task must not hide the others' errors.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn by_count(map: &Mutex<BTreeMap<String, usize>>) -> Vec<(String, usize)> {
    let mut list: Vec<_> = lock(map).iter().map(|(k, v)| (k.clone(), *v)).collect();
    list.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    list
}

/// What one connection saw, handed back when the fleet closes.
#[derive(Debug, Default)]
pub struct ConnReport {
    /// What addresses this connection: its user (an index into the
    /// identities), or in channel runs its channel (an index into the channels).
    pub target: usize,
    /// Index into the nodes (`--url`s): where it is connected.
    pub node: usize,
    pub connected: bool,
    /// When the server closed it (or it broke), on the run's clock.
    pub dropped_ns: Option<u64>,
    pub received: u64,
    /// Messages whose target was another user, or of another channel than the
    /// one this connection subscribed to (or of any channel when it subscribed
    /// to none).
    pub misrouted: u64,
    /// Messages whose `seq` was not above the previous one: duplicates or
    /// reordering (the channel's `seq` in channel runs: one channel per connection).
    pub out_of_order: u64,
    /// Frames that were not the run's messages (e.g. error frames).
    pub other: u64,
    pub last_recv_ns: u64,
    /// Publish-to-receive time of every message, in nanoseconds.
    pub latencies_ns: Vec<u64>,
    /// Highest `seq` seen so far.
    pub last_seq: u64,
}

/// What a receiver needs from one of the run's messages.
#[derive(Debug, PartialEq, Eq)]
struct BenchFrame<'a> {
    seq: u64,
    /// When the POST was sent, on the run's clock.
    sent_ns: u64,
    /// Who the publisher addressed, from `data.u`: the user of a user-addressed
    /// message, the channel of a channel message.
    target: Option<Cow<'a, str>>,
    /// The frame's own `channel` field (SPEC §4.2): set by the server on the
    /// messages of a channel, absent on those of the tenant log.
    channel: Option<Cow<'a, str>>,
}

impl<'a> BenchFrame<'a> {
    /// The frame's fields, or `None` for anything that is not a message of
    /// type `kind` stamped by the bench.
    fn read(text: &'a str, kind: &str) -> Option<BenchFrame<'a>> {
        Self::scan(text, kind).or_else(|| Self::parse(text, kind))
    }

    /// Reads the layout the server writes, without a JSON parser:
    /// `{"type":"<kind>","data":{<flat keys>},<flat keys: id, seq, ts, channel…>}`.
    /// Receiving is most of the bench's CPU and a full parse of every frame cost
    /// a fifth of it; anything unexpected (another order, an escape, a nested
    /// value) falls back to [`Self::parse`].
    fn scan(text: &'a str, kind: &str) -> Option<BenchFrame<'a>> {
        let mut rest = text
            .strip_prefix(r#"{"type":""#)?
            .strip_prefix(kind)?
            .strip_prefix(r#"","data":{"#)?;
        let (mut sent_ns, mut target) = (None, None);
        loop {
            let key;
            (key, rest) = take_string(rest)?;
            rest = rest.strip_prefix(':')?;
            if rest.starts_with('"') {
                let value;
                (value, rest) = take_string(rest)?;
                if key == "u" {
                    target = Some(Cow::Borrowed(value));
                }
            } else {
                let value;
                (value, rest) = take_number(rest)?;
                if key == "t" {
                    sent_ns = Some(value);
                }
            }
            match rest.as_bytes().first()? {
                b',' => rest = &rest[1..],
                b'}' => break,
                _ => return None,
            }
        }
        rest = rest.strip_prefix('}')?;
        // The envelope's fields, in whatever order the server writes them.
        let (mut seq, mut channel) = (None, None);
        loop {
            match rest.as_bytes().first()? {
                b',' => rest = &rest[1..],
                b'}' => break,
                _ => return None,
            }
            let key;
            (key, rest) = take_string(rest)?;
            rest = rest.strip_prefix(':')?;
            if rest.starts_with('"') {
                let value;
                (value, rest) = take_string(rest)?;
                if key == "channel" {
                    channel = Some(Cow::Borrowed(value));
                }
            } else {
                let value;
                (value, rest) = take_number(rest)?;
                if key == "seq" {
                    seq = Some(value);
                }
            }
        }
        Some(BenchFrame {
            seq: seq?,
            sent_ns: sent_ns?,
            target,
            channel,
        })
    }

    /// The slow path, for JSON laid out differently.
    fn parse(text: &'a str, kind: &str) -> Option<BenchFrame<'a>> {
        #[derive(Deserialize)]
        struct Incoming<'a> {
            #[serde(rename = "type", borrow)]
            kind: Cow<'a, str>,
            #[serde(default)]
            seq: u64,
            #[serde(borrow)]
            data: Stamp<'a>,
            #[serde(default, borrow)]
            channel: Option<Cow<'a, str>>,
        }
        #[derive(Deserialize)]
        struct Stamp<'a> {
            t: u64,
            #[serde(default, borrow)]
            u: Option<Cow<'a, str>>,
        }
        let incoming: Incoming<'a> = serde_json::from_str(text).ok()?;
        (incoming.kind == kind).then_some(BenchFrame {
            seq: incoming.seq,
            sent_ns: incoming.data.t,
            target: incoming.data.u,
            channel: incoming.channel,
        })
    }
}

/// A JSON string without escapes at the start of `text`, and what follows it.
fn take_string(text: &str) -> Option<(&str, &str)> {
    let body = text.strip_prefix('"')?;
    let end = body.find('"')?;
    let value = &body[..end];
    // An escape means the quote found may be escaped too: leave it to the parser.
    (!value.contains('\\')).then_some((value, &body[end + 1..]))
}

/// An unsigned integer at the start of `text`, and what follows it.
fn take_number(text: &str) -> Option<(u64, &str)> {
    let end = text
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(text.len());
    Some((text[..end].parse().ok()?, &text[end..]))
}

/// Who a connection is, for checking what it receives.
#[derive(Debug, Clone, Copy)]
struct Own<'a> {
    /// The `type` of the run's messages.
    kind: &'a str,
    user_id: &'a str,
    /// The channel it subscribed to, in channel runs.
    channel: Option<&'a str>,
}

impl Own<'_> {
    /// Whether a message belongs on this connection: a channel connection gets
    /// only its channel's messages, published to that channel; any other gets
    /// no channel's message, and a user-addressed one only if it is that user's.
    fn accepts(&self, frame: &BenchFrame<'_>) -> bool {
        let channel = frame.channel.as_deref();
        let target = frame.target.as_deref();
        match self.channel {
            Some(own) => channel == Some(own) && target.is_none_or(|t| t == own),
            None => channel.is_none() && target.is_none_or(|t| t == self.user_id),
        }
    }
}

impl ConnReport {
    fn observe(&mut self, text: &str, own: Own<'_>, clock: Clock, progress: &Progress) {
        let now = clock.now_ns();
        let Some(frame) = BenchFrame::read(text, own.kind) else {
            self.other += 1;
            return;
        };
        self.received += 1;
        progress.received.fetch_add(1, Ordering::Relaxed);
        self.last_recv_ns = now;
        self.latencies_ns.push(now.saturating_sub(frame.sent_ns));
        if !own.accepts(&frame) {
            self.misrouted += 1;
        }
        if frame.seq <= self.last_seq {
            self.out_of_order += 1;
        }
        self.last_seq = self.last_seq.max(frame.seq);
    }
}

/// What the connections of a fleet listen for.
#[derive(Debug, Clone)]
pub struct Listen {
    /// The `type` of the run's messages (`bench`; `output` in stream runs).
    pub kind: &'static str,
    /// Channel runs: connection `i` subscribes to `channels[i]` and counts as
    /// open only once the server has answered `subscribed`.
    pub channels: Option<Arc<[Arc<str>]>>,
}

/// The open connections of a run.
pub struct Fleet {
    pub progress: Arc<Progress>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<ConnReport>>,
}

impl Fleet {
    /// Opens `conns` connections, connection `i` as `identities[i % len]` to
    /// `nodes[i % len]` (subscribed to `listen.channels[i]` in channel runs),
    /// with at most `concurrency` handshakes in flight. Returns when every
    /// connection has received its `connected` frame (and `subscribed`) or failed.
    pub async fn open(
        nodes: &[Arc<Endpoint>],
        identities: &[Identity],
        conns: usize,
        concurrency: usize,
        clock: Clock,
        listen: &Listen,
    ) -> Fleet {
        let concurrency = concurrency.clamp(1, Semaphore::MAX_PERMITS);
        let targets = listen
            .channels
            .as_ref()
            .map_or(identities.len(), |channels| channels.len());
        let progress = Arc::new(Progress::new(targets, nodes.len()));
        let stop = CancellationToken::new();
        let urls: Vec<Arc<str>> = nodes
            .iter()
            .map(|node| format!("ws://{}/api/v1/ws/connect", node.authority).into())
            .collect();
        let permits = Arc::new(Semaphore::new(concurrency));
        let mut tasks = Vec::with_capacity(conns);
        for i in 0..conns {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let user = i % identities.len();
            let node = round_robin(i as u64, nodes.len());
            let channel = listen
                .channels
                .as_ref()
                .map(|channels| channels[i % channels.len()].clone());
            let conn = Connection {
                index: i,
                target: if channel.is_some() { i % targets } else { user },
                channel,
                kind: listen.kind,
                node,
                identity: identities[user].clone(),
                endpoint: nodes[node].clone(),
                url: urls[node].clone(),
                progress: progress.clone(),
                clock,
            };
            tasks.push(tokio::spawn(conn.run(permit, stop.clone())));
        }
        // Each task returns its permit once its handshake is settled either way, so
        // holding them all means every connection is open or has failed.
        let all = u32::try_from(concurrency).unwrap_or(u32::MAX);
        drop(permits.acquire_many(all).await);
        Fleet {
            progress,
            stop,
            tasks,
        }
    }

    /// Closes every connection and collects what each one saw.
    pub async fn close(self) -> Vec<ConnReport> {
        self.stop.cancel();
        let mut reports = Vec::with_capacity(self.tasks.len());
        for task in self.tasks {
            // A task that panicked has nothing to report; the others still count.
            if let Ok(report) = task.await {
                reports.push(report);
            }
        }
        reports
    }
}

struct Connection {
    index: usize,
    /// Index of what addresses it: its user, or its channel.
    target: usize,
    /// The channel it subscribes to, in channel runs.
    channel: Option<Arc<str>>,
    /// The `type` of the run's messages.
    kind: &'static str,
    node: usize,
    identity: Identity,
    endpoint: Arc<Endpoint>,
    url: Arc<str>,
    progress: Arc<Progress>,
    clock: Clock,
}

impl Connection {
    async fn run(self, permit: OwnedSemaphorePermit, stop: CancellationToken) -> ConnReport {
        let mut report = ConnReport {
            target: self.target,
            node: self.node,
            ..ConnReport::default()
        };
        let opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake()).await;
        // The counters are updated before the permit goes back: the opener reads
        // them as soon as it holds every permit.
        let mut ws = match opened {
            Ok(Ok(ws)) => ws,
            Ok(Err(why)) => {
                self.progress.fail(why);
                return report;
            }
            Err(_) => {
                let frames = match self.channel {
                    Some(_) => "connected and subscribed frames",
                    None => "connected frame",
                };
                self.progress
                    .fail(format!("no {frames} within {HANDSHAKE_TIMEOUT:?}"));
                return report;
            }
        };
        report.connected = true;
        self.progress.alive[self.target].fetch_add(1, Ordering::Relaxed);
        self.progress.connected.fetch_add(1, Ordering::Relaxed);
        self.progress.connected_by_node[self.node].fetch_add(1, Ordering::Relaxed);
        drop(permit);

        let own = Own {
            kind: self.kind,
            user_id: &self.identity.user_id,
            channel: self.channel.as_deref(),
        };
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        let ended = loop {
            tokio::select! {
                biased;
                () = &mut stopped => {
                    // A Close frame is polite; the socket is dropped right after anyway.
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(None)).await;
                    break None;
                }
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        report.observe(&text, own, self.clock, &self.progress);
                    }
                    Some(Ok(Message::Close(frame))) => break Some(close_reason(frame)),
                    // tungstenite answers Pings itself on the next read.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break Some(format!("read: {e}")),
                    None => break Some("the server closed the TCP connection".to_owned()),
                },
            }
        };
        if let Some(why) = ended {
            report.dropped_ns = Some(self.clock.now_ns());
            self.progress.drop_connection(self.target, why);
        }
        report
    }

    /// TCP connect from a spread source address, WebSocket upgrade with the token
    /// as subprotocol, then the `connected` frame that says the token was
    /// accepted; in channel runs then the subscription to its channel.
    async fn handshake(&self) -> Result<WebSocketStream<TcpStream>, String> {
        let addr = self.endpoint.addr;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| format!("socket: {e}"))?;
        if let Some(source) = source_address(self.index, addr.ip()) {
            socket
                .bind(SocketAddr::new(source, 0))
                .map_err(|e| format!("bind {source}: {e}"))?;
        }
        let stream = socket
            .connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;

        let mut request = (*self.url)
            .into_client_request()
            .map_err(|e| format!("request: {e}"))?;
        let protocol = HeaderValue::from_str(&format!("token, {}", self.identity.token))
            .map_err(|_| "the token is not a valid header value".to_owned())?;
        request
            .headers_mut()
            .insert(SEC_WEBSOCKET_PROTOCOL, protocol);
        let (mut ws, _response) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config()))
                .await
                .map_err(|e| format!("handshake: {e}"))?;

        // The upgrade succeeds even with a bad token (SPEC §4.1): the first frame
        // tells whether the connection is in.
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) if is_connected(&text) => break,
                Some(Ok(Message::Text(text))) => {
                    return Err(format!(
                        "first frame is not 'connected': {}",
                        preview(&text)
                    ))
                }
                Some(Ok(Message::Close(frame))) => return Err(close_reason(frame)),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("closed before the connected frame".to_owned()),
            }
        }
        if let Some(channel) = &self.channel {
            subscribe(&mut ws, channel).await?;
        }
        Ok(ws)
    }
}

/// Subscribes to `channel` (SPEC §4.4) and waits for the server's `subscribed`:
/// only then is every later publish to it addressed to this connection.
async fn subscribe(ws: &mut WebSocketStream<TcpStream>, channel: &str) -> Result<(), String> {
    let frame = serde_json::json!({"type": "subscribe", "data": {"channel": channel}});
    ws.send(Message::text(frame.to_string()))
        .await
        .map_err(|e| format!("send subscribe: {e}"))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => match subscribe_answer(&text, channel) {
                Some(answer) => return answer,
                None => continue,
            },
            Some(Ok(Message::Close(frame))) => {
                return Err(format!("subscribe: {}", close_reason(frame)))
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("closed before the subscribed frame".to_owned()),
        }
    }
}

/// What a frame received after a subscribe says about it: `subscribed` to
/// `channel` (done), an `error` (refused: its code and message), or `None` for
/// anything else (another channel's answer, a frame of another stream).
fn subscribe_answer(text: &str, channel: &str) -> Option<Result<(), String>> {
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        data: serde_json::Value,
    }
    let answer: Answer = serde_json::from_str(text).ok()?;
    match answer.kind.as_str() {
        "subscribed" if answer.data["channel"] == channel => Some(Ok(())),
        "error" => {
            let code = answer.data["code"].as_str().unwrap_or("no code");
            // Without the name, 10,000 refusals count as one reason, not 10,000.
            let message = answer.data["message"]
                .as_str()
                .unwrap_or("")
                .replace(channel, "<channel>");
            Some(Err(format!(
                "subscribe refused: {code}: {}",
                preview(&message)
            )))
        }
        _ => None,
    }
}

/// Slow path of the `connected` check, for servers that order fields differently.
fn is_connected(text: &str) -> bool {
    #[derive(Deserialize)]
    struct Kind<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
    }
    serde_json::from_str::<Kind<'_>>(text).is_ok_and(|k| k.kind == "connected")
}

/// Source address for connection `i`: spread over 127.0.0.1–250 when the server is
/// on loopback, the kernel's choice otherwise (127.0.0.x cannot reach elsewhere).
fn source_address(i: usize, server: IpAddr) -> Option<IpAddr> {
    match server {
        IpAddr::V4(ip) if ip.is_loopback() => {
            let host = u8::try_from(1 + i % SOURCE_ADDRESSES).expect("below 256");
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)))
        }
        _ => None,
    }
}

fn ws_config() -> WebSocketConfig {
    // tungstenite zero-fills its read buffer on every read; the 128 KiB default
    // would make 10k clients on one core measure memset instead of the server.
    // Writes (Pongs, the final Close) go out at once instead of being buffered.
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
}

fn close_reason(frame: Option<CloseFrame>) -> String {
    match frame {
        Some(frame) if frame.reason.is_empty() => format!("closed {}", u16::from(frame.code)),
        Some(frame) => format!(
            "closed {}: {}",
            u16::from(frame.code),
            preview(&frame.reason)
        ),
        None => "closed without a code".to_owned(),
    }
}

fn preview(text: &str) -> String {
    match text.char_indices().nth(120) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observe(report: &mut ConnReport, text: &str, user: &str) {
        let own = Own {
            kind: "bench",
            user_id: user,
            channel: None,
        };
        observe_as(report, text, own);
    }

    fn observe_as(report: &mut ConnReport, text: &str, own: Own<'_>) {
        let clock = Clock(std::time::Instant::now());
        report.observe(text, own, clock, &Progress::new(1, 1));
    }

    #[test]
    fn receivers_count_misrouted_and_out_of_order_messages() {
        let mut report = ConnReport::default();
        observe(
            &mut report,
            r#"{"type":"bench","data":{"t":0,"u":"u1"},"id":"a","seq":5,"ts":"x"}"#,
            "u1",
        );
        observe(
            &mut report,
            r#"{"type":"bench","data":{"t":0,"u":"u2"},"id":"b","seq":6,"ts":"x"}"#,
            "u1",
        );
        observe(
            &mut report,
            r#"{"type":"bench","data":{"t":0},"id":"c","seq":6,"ts":"x"}"#,
            "u1",
        );
        observe(
            &mut report,
            r#"{"type":"system","data":"hello","seq":7}"#,
            "u1",
        );
        // A channel's message on a connection that subscribed to none.
        observe(
            &mut report,
            r#"{"type":"bench","data":{"t":0},"id":"d","seq":8,"ts":"x","channel":"bench:r-1"}"#,
            "u1",
        );
        assert_eq!(report.received, 4);
        assert_eq!(report.misrouted, 2);
        assert_eq!(report.out_of_order, 1);
        assert_eq!(report.other, 1);
        assert_eq!(report.latencies_ns.len(), 4);
    }

    #[test]
    fn channel_receivers_take_only_their_channel_in_its_seq_order() {
        let own = Own {
            kind: "bench",
            user_id: "u1",
            channel: Some("bench:r-1"),
        };
        let mut report = ConnReport::default();
        let frame = |data: &str, seq: u64, channel: Option<&str>| {
            let channel = channel.map_or(String::new(), |c| format!(r#","channel":"{c}""#));
            format!(r#"{{"type":"bench","data":{data},"id":"x","seq":{seq},"ts":"x"{channel}}}"#)
        };
        let mine = r#"{"t":1,"i":0,"u":"bench:r-1"}"#;
        for (data, seq, channel) in [
            (mine, 1, Some("bench:r-1")),
            (mine, 2, Some("bench:r-1")),
            // A duplicate of seq 2.
            (mine, 2, Some("bench:r-1")),
            // Another channel's message, and one published to another channel
            // but labelled with this one.
            (r#"{"t":1,"i":1,"u":"bench:r-2"}"#, 3, Some("bench:r-2")),
            (r#"{"t":1,"i":1,"u":"bench:r-2"}"#, 4, Some("bench:r-1")),
            // A message of the tenant log.
            (r#"{"t":1,"i":2}"#, 90, None),
        ] {
            observe_as(&mut report, &frame(data, seq, channel), own);
        }
        // The subscription's answer is not a message.
        observe_as(
            &mut report,
            r#"{"type":"subscribed","data":{"channel":"bench:r-1","epoch":"e","from":0,"to":0,"count":0,"complete":true}}"#,
            own,
        );
        assert_eq!(report.received, 6);
        assert_eq!(report.misrouted, 3);
        assert_eq!(report.out_of_order, 1);
        assert_eq!(report.other, 1);
    }

    #[test]
    fn the_fast_scan_agrees_with_the_parser() {
        let frames = [
            (
                "bench",
                r#"{"type":"bench","data":{"i":4,"t":123,"u":"u9"},"id":"9096-ab58","seq":77,"ts":"2026-01-01T00:00:00.000Z"}"#,
            ),
            (
                "bench",
                r#"{"type":"bench","data":{"i":0,"t":5},"id":"x","seq":1,"ts":"2026-01-01T00:00:00.000Z"}"#,
            ),
            // Channel frames: the `channel` field anywhere among the envelope's.
            (
                "bench",
                r#"{"type":"bench","data":{"t":5,"i":0,"u":"bench:ab12-3"},"id":"x","seq":1,"ts":"2026-01-01T00:00:00.000Z","channel":"bench:ab12-3"}"#,
            ),
            (
                "bench",
                r#"{"type":"bench","data":{"t":5,"i":0},"channel":"run:42","id":"x","seq":9,"ts":"2026-01-01T00:00:00.000Z"}"#,
            ),
            (
                "output",
                r#"{"type":"output","data":{"text":"tok tok tok tok tok ","t":77,"i":3,"u":"bench:ab12-0"},"id":"y","seq":4,"ts":"2026-01-01T00:00:00.000Z","channel":"bench:ab12-0"}"#,
            ),
        ];
        for (kind, frame) in frames {
            assert_eq!(
                BenchFrame::scan(frame, kind),
                BenchFrame::parse(frame, kind),
                "{frame}"
            );
            assert!(BenchFrame::scan(frame, kind).is_some(), "{frame}");
        }
        let output = BenchFrame::read(frames[4].1, "output").unwrap();
        assert_eq!((output.seq, output.sent_ns), (4, 77));
        assert_eq!(output.channel.as_deref(), Some("bench:ab12-0"));
        assert_eq!(output.target.as_deref(), Some("bench:ab12-0"));
        // Only the run's own type counts.
        assert_eq!(BenchFrame::read(frames[4].1, "bench"), None);
        assert_eq!(
            BenchFrame::scan(
                r#"{"type":"bench","data":{"t":1,"u":"a\"b"},"id":"x","seq":1}"#,
                "bench"
            ),
            None
        );
        let spaced = r#"{"seq": 3, "data": {"u": "u\u0031", "t": 9}, "type": "bench", "channel": "a:\u0062"}"#;
        assert_eq!(
            BenchFrame::read(spaced, "bench"),
            Some(BenchFrame {
                seq: 3,
                sent_ns: 9,
                target: Some(Cow::Borrowed("u1")),
                channel: Some(Cow::Borrowed("a:b")),
            })
        );
        assert_eq!(
            BenchFrame::read(r#"{"type":"connected","data":{"seq":0}}"#, "bench"),
            None
        );
    }

    #[test]
    fn subscribe_answers_are_told_apart() {
        let channel = "bench:ab12-7";
        assert_eq!(
            subscribe_answer(
                r#"{"type":"subscribed","data":{"channel":"bench:ab12-7","epoch":"e","from":0,"to":0,"count":0,"complete":true}}"#,
                channel
            ),
            Some(Ok(()))
        );
        assert_eq!(
            subscribe_answer(
                r#"{"type":"subscribed","data":{"channel":"bench:ab12-8"}}"#,
                channel
            ),
            None
        );
        assert_eq!(
            subscribe_answer(r#"{"type":"pong","data":{"ts":"x"}}"#, channel),
            None
        );
        // The channel's name is left out so refusals of every channel add up.
        assert_eq!(
            subscribe_answer(
                r#"{"type":"error","data":{"code":"forbidden","message":"bench:ab12-7 is not allowed","channel":"bench:ab12-7"}}"#,
                channel
            ),
            Some(Err(
                "subscribe refused: forbidden: <channel> is not allowed".to_owned()
            ))
        );
        assert_eq!(subscribe_answer("not json", channel), None);
    }

    /// A stand-in for the server's side of SPEC §4.4, enough for the fleet:
    /// `connected`, then the answer to the subscribe (refused for `refuse`),
    /// then two messages of the channel, seq 1 and 2.
    async fn fake_channel_server(listener: tokio::net::TcpListener, refuse: &'static str) {
        use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                // The client offers `token, <jwt>`: the server answers `token`.
                // The error type is tungstenite's callback contract, not ours.
                #[allow(clippy::result_large_err)]
                let answer = |_: &Request, mut response: Response| {
                    response
                        .headers_mut()
                        .insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("token"));
                    Ok(response)
                };
                let mut ws = tokio_tungstenite::accept_hdr_async(stream, answer)
                    .await
                    .expect("handshake");
                let connected = r#"{"type":"connected","data":{"connection_id":"c","user_id":"u","tenant":"t","epoch":"e","seq":0,"heartbeat_s":25}}"#;
                ws.send(Message::text(connected)).await.expect("send");
                let Some(Ok(Message::Text(text))) = ws.next().await else {
                    return;
                };
                let frame: serde_json::Value = serde_json::from_str(&text).expect("json");
                assert_eq!(frame["type"], "subscribe");
                let channel = frame["data"]["channel"]
                    .as_str()
                    .expect("channel")
                    .to_owned();
                let mut replies = vec![];
                if channel == refuse {
                    replies.push(serde_json::json!({"type": "error", "data": {
                        "code": "forbidden", "message": format!("{channel} is not allowed"), "channel": channel}}));
                } else {
                    replies.push(serde_json::json!({"type": "subscribed", "data": {
                        "channel": channel, "epoch": "e", "from": 0, "to": 0, "count": 0, "complete": true}}));
                    for seq in 1..=2 {
                        replies.push(serde_json::json!({"type": "bench",
                            "data": {"t": 0, "i": seq, "u": channel},
                            "id": "x", "seq": seq, "ts": "x", "channel": channel}));
                    }
                }
                for reply in replies {
                    ws.send(Message::text(reply.to_string()))
                        .await
                        .expect("send");
                }
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    }

    #[tokio::test]
    async fn a_channel_fleet_subscribes_before_it_counts_as_open() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(fake_channel_server(listener, "bench:r-2"));
        let node = Arc::new(Endpoint {
            addr,
            authority: addr.to_string(),
            url: format!("http://{addr}"),
        });
        let identity = Identity {
            user_id: "u0".into(),
            token: "token-of-u0".into(),
        };
        let channels: Arc<[Arc<str>]> = ["bench:r-0", "bench:r-1", "bench:r-2"]
            .into_iter()
            .map(Arc::from)
            .collect();
        let listen = Listen {
            kind: "bench",
            channels: Some(channels),
        };
        let clock = Clock(std::time::Instant::now());
        let fleet = Fleet::open(&[node], &[identity], 3, 2, clock, &listen).await;
        let progress = fleet.progress.clone();
        assert_eq!(progress.connected.load(Ordering::Relaxed), 2);
        assert_eq!(
            progress.failures(),
            [(
                "subscribe refused: forbidden: <channel> is not allowed".to_owned(),
                1
            )]
        );
        assert_eq!(progress.alive_by_target(), [1, 1, 0]);
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while progress.received.load(Ordering::Relaxed) < 4 {
            assert!(std::time::Instant::now() < until, "the messages never came");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let reports = fleet.close().await;
        let seen: Vec<_> = reports
            .iter()
            .map(|r| {
                (
                    r.target,
                    r.connected,
                    r.received,
                    r.misrouted,
                    r.out_of_order,
                    r.other,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (0, true, 2, 0, 0, 0),
                (1, true, 2, 0, 0, 0),
                (2, false, 0, 0, 0, 0)
            ]
        );
    }

    #[test]
    fn sources_spread_over_loopback_only() {
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(
            source_address(0, loopback),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)))
        );
        assert_eq!(
            source_address(249, loopback),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 250)))
        );
        assert_eq!(
            source_address(250, loopback),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)))
        );
        assert_eq!(
            source_address(3, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
            None
        );
    }

    #[test]
    fn connected_frames_are_recognised_in_any_field_order() {
        assert!(is_connected(r#"{"data":{"seq":0},"type":"connected"}"#));
        assert!(!is_connected(r#"{"type":"error","data":{}}"#));
    }
}
