//! The publishing side: admin POSTs over keep-alive HTTP/1.1 connections, one
//! connection per in-flight slot, each message stamped with its send time.
//! Paced plans (rate, stream) send message `i` at `i / rate` after the start;
//! with targets taken round robin that spreads each target's messages evenly
//! over the second, the targets' ticks interleaved instead of in bursts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use super::{round_robin, Clock, Endpoint};

/// Longest one request may take before it counts as failed and its connection is replaced.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One keep-alive HTTP/1.1 connection to the server, reopened after an error.
pub struct HttpClient {
    endpoint: Arc<Endpoint>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpClient {
    pub fn new(endpoint: Arc<Endpoint>) -> HttpClient {
        HttpClient {
            endpoint,
            sender: None,
        }
    }

    /// Opens the connection now, so the first request does not pay for it.
    pub async fn connect(&mut self) -> Result<(), String> {
        let stream = TcpStream::connect(self.endpoint.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.endpoint.addr))?;
        // Requests are small single writes; Nagle would only add delay.
        stream
            .set_nodelay(true)
            .map_err(|e| format!("nodelay: {e}"))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
        // Drives the socket; ends when the sender is dropped or the server closes.
        tokio::spawn(connection);
        self.sender = Some(sender);
        Ok(())
    }

    /// Sends one request and reads the whole answer.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), String> {
        let result =
            tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, path, bearer, body))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")));
        if result.is_err() {
            // The connection's state is unknown: start the next request on a fresh one.
            self.sender = None;
        }
        result
    }

    async fn exchange(
        &mut self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), String> {
        if self.sender.as_ref().is_none_or(SendRequest::is_closed) {
            self.connect().await?;
        }
        let sender = self.sender.as_mut().expect("connected above");
        sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.endpoint.authority);
        if let Some(token) = bearer {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| format!("request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("response: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}

/// Who message `i` goes to.
#[derive(Debug, Clone)]
pub enum Address {
    /// Every connection of the tenant.
    Broadcast,
    /// `users[i % users.len()]`.
    Users(Arc<[Arc<str>]>),
    /// The subscribers of `channels[i % channels.len()]` (SPEC §4.4).
    Channels(Arc<[Arc<str>]>),
}

impl Address {
    /// The users or channels messages go to round robin (none for broadcasts).
    fn targets(&self) -> &[Arc<str>] {
        match self {
            Address::Broadcast => &[],
            Address::Users(targets) | Address::Channels(targets) => targets,
        }
    }

    /// Message `i`'s path and the index of its target.
    fn route(&self, i: u64) -> (String, Option<usize>) {
        let targets = self.targets();
        if targets.is_empty() {
            return ("/api/v1/ws/broadcast".to_owned(), None);
        }
        let target = usize::try_from(i % targets.len() as u64).unwrap_or(0);
        let path = match self {
            Address::Channels(_) => format!("/api/v1/ws/channel/{}", targets[target]),
            _ => format!("/api/v1/ws/user/{}", targets[target]),
        };
        (path, Some(target))
    }
}

/// What a message carries besides the bench's stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// `{"type":"bench","data":{stamp}}`.
    Bench,
    /// A streamed model token as a run page gets it:
    /// `{"type":"output","data":{"text":"tok tok tok tok tok ",stamp}}`.
    Output,
}

/// The ~20 bytes of text of an `output` message.
const OUTPUT_TEXT: &str = "tok tok tok tok tok ";

impl Payload {
    /// The `type` the messages are published (and received) with.
    pub fn kind(self) -> &'static str {
        match self {
            Payload::Bench => "bench",
            Payload::Output => "output",
        }
    }

    /// The POST body of message `i`, sent at `sent_ns`: `t` stamps the send
    /// time, `i` the index, `u` the user or channel it was addressed to.
    fn body(self, sent_ns: u64, i: u64, target: Option<&str>) -> String {
        let text = match self {
            Payload::Bench => String::new(),
            Payload::Output => format!(r#""text":"{OUTPUT_TEXT}","#),
        };
        let target = target.map_or(String::new(), |t| format!(r#","u":"{t}""#));
        format!(
            r#"{{"type":"{}","data":{{{text}"t":{sent_ns},"i":{i}{target}}}}}"#,
            self.kind()
        )
    }
}

/// What to publish and how fast.
#[derive(Debug, Clone)]
pub struct Plan {
    pub address: Address,
    pub payload: Payload,
    pub messages: u64,
    /// Messages per second; `None` posts as fast as the slots allow.
    pub rate: Option<f64>,
    /// A paced send this far behind its schedule counts as late (one tick of
    /// a target in stream runs).
    pub late_after: Duration,
    pub in_flight: usize,
}

/// When message `i` of a plan paced at `rate` per second is due, after the start.
fn due(i: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(i as f64 / rate)
}

/// What the publishers saw, merged over all slots.
#[derive(Debug, Default)]
pub struct PublishReport {
    pub accepted: u64,
    /// Failed POSTs by reason ("HTTP 503: …", "connect: …").
    pub errors: BTreeMap<String, u64>,
    /// Sum of the `recipients` the 202 answers reported.
    pub recipients: u64,
    /// Accepted messages per target index (user- or channel-addressed plans only).
    pub per_target: Vec<u64>,
    /// Accepted messages per publish node (index into the nodes published on).
    pub per_node: Vec<u64>,
    /// First send and last answer, on the run's clock.
    pub first_send_ns: u64,
    pub last_done_ns: u64,
    /// Round-trip time of every POST.
    pub post_ns: Vec<u64>,
    /// How late the most delayed message of a paced plan was sent.
    pub max_lag_ns: u64,
    /// Paced sends more than the plan's `late_after` behind schedule.
    pub late: u64,
}

impl PublishReport {
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    fn merge(&mut self, other: PublishReport) {
        self.accepted += other.accepted;
        for (why, n) in other.errors {
            *self.errors.entry(why).or_default() += n;
        }
        self.recipients += other.recipients;
        add_counts(&mut self.per_target, other.per_target);
        add_counts(&mut self.per_node, other.per_node);
        if other.first_send_ns != 0 {
            self.first_send_ns = match self.first_send_ns {
                0 => other.first_send_ns,
                mine => mine.min(other.first_send_ns),
            };
        }
        self.last_done_ns = self.last_done_ns.max(other.last_done_ns);
        self.post_ns.extend(other.post_ns);
        self.max_lag_ns = self.max_lag_ns.max(other.max_lag_ns);
        self.late += other.late;
    }
}

/// Adds `theirs` to `mine` index by index, growing `mine` as needed.
fn add_counts(mine: &mut Vec<u64>, theirs: Vec<u64>) {
    if mine.len() < theirs.len() {
        mine.resize(theirs.len(), 0);
    }
    for (mine, theirs) in mine.iter_mut().zip(theirs) {
        *mine += theirs;
    }
}

/// The 202 answer of a publish.
#[derive(Deserialize)]
struct Accepted {
    #[serde(default)]
    recipients: u64,
}

/// Publishes the plan with `plan.in_flight` POSTs at a time, message `i` on
/// `nodes[i % len]`, and returns when every message has been answered (or has
/// failed).
pub async fn publish(
    nodes: Vec<Arc<Endpoint>>,
    admin_token: Arc<str>,
    plan: Plan,
    clock: Clock,
) -> Result<PublishReport, String> {
    // Connect every slot to every node first: the timing below is for publishing only.
    let mut clients = Vec::with_capacity(plan.in_flight.max(1));
    for _ in 0..plan.in_flight.max(1) {
        let mut per_node = Vec::with_capacity(nodes.len());
        for node in &nodes {
            let mut client = HttpClient::new(node.clone());
            client.connect().await?;
            per_node.push(client);
        }
        clients.push(per_node);
    }
    let next = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let plan = Arc::new(plan);
    let slots: Vec<_> = clients
        .into_iter()
        .map(|clients| {
            let slot = Slot {
                clients,
                plan: plan.clone(),
                token: admin_token.clone(),
                next: next.clone(),
                clock,
            };
            tokio::spawn(slot.run(start))
        })
        .collect();
    let mut report = PublishReport::default();
    for slot in slots {
        report.merge(
            slot.await
                .map_err(|e| format!("a publisher task failed: {e}"))?,
        );
    }
    Ok(report)
}

struct Slot {
    /// One keep-alive connection per node.
    clients: Vec<HttpClient>,
    plan: Arc<Plan>,
    token: Arc<str>,
    /// The next message index, shared by all slots: whichever is free takes it.
    next: Arc<AtomicU64>,
    clock: Clock,
}

impl Slot {
    async fn run(mut self, start: tokio::time::Instant) -> PublishReport {
        let mut report = PublishReport {
            per_node: vec![0; self.clients.len()],
            ..PublishReport::default()
        };
        report.per_target = vec![0; self.plan.address.targets().len()];
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.plan.messages {
                break;
            }
            if let Some(rate) = self.plan.rate {
                let due = start + due(i, rate);
                tokio::time::sleep_until(due).await;
                let lag = tokio::time::Instant::now().saturating_duration_since(due);
                report.max_lag_ns = report
                    .max_lag_ns
                    .max(lag.as_nanos().try_into().unwrap_or(u64::MAX));
                if lag > self.plan.late_after {
                    report.late += 1;
                }
            }
            let (path, target) = self.plan.address.route(i);
            let sent = self.clock.now_ns();
            if report.first_send_ns == 0 {
                report.first_send_ns = sent;
            }
            let named = target.map(|t| &*self.plan.address.targets()[t]);
            let body = self.plan.payload.body(sent, i, named);
            let node = round_robin(i, self.clients.len());
            let answer = self.clients[node]
                .request(Method::POST, &path, Some(&self.token), Some(body.into()))
                .await;
            let done = self.clock.now_ns();
            report.post_ns.push(done - sent);
            report.last_done_ns = done;
            match answer {
                Ok((StatusCode::ACCEPTED, body)) => {
                    report.accepted += 1;
                    report.per_node[node] += 1;
                    if let Ok(accepted) = serde_json::from_slice::<Accepted>(&body) {
                        report.recipients += accepted.recipients;
                    }
                    if let Some(target) = target {
                        report.per_target[target] += 1;
                    }
                }
                Ok((status, body)) => {
                    let why = format!(
                        "HTTP {}: {}",
                        status.as_u16(),
                        String::from_utf8_lossy(&body).trim()
                    );
                    *report.errors.entry(why).or_default() += 1;
                }
                Err(why) => *report.errors.entry(why).or_default() += 1,
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_merge_counts_and_keep_the_earliest_start() {
        let mut total = PublishReport::default();
        let mut a = PublishReport {
            accepted: 2,
            first_send_ns: 50,
            last_done_ns: 90,
            per_target: vec![1, 1],
            per_node: vec![2],
            ..Default::default()
        };
        a.errors.insert("HTTP 503: down".into(), 1);
        let mut b = PublishReport {
            accepted: 3,
            first_send_ns: 40,
            last_done_ns: 70,
            per_target: vec![2, 1],
            per_node: vec![1, 2],
            ..Default::default()
        };
        b.errors.insert("HTTP 503: down".into(), 2);
        total.merge(a);
        total.merge(b);
        assert_eq!(total.accepted, 5);
        assert_eq!(total.failed(), 3);
        assert_eq!(total.per_target, vec![3, 2]);
        assert_eq!(total.per_node, vec![3, 2]);
        assert_eq!((total.first_send_ns, total.last_done_ns), (40, 90));
    }

    fn names(names: &[&str]) -> Arc<[Arc<str>]> {
        names.iter().map(|&n| Arc::from(n)).collect()
    }

    #[test]
    fn messages_go_round_robin_to_users_and_channels() {
        assert_eq!(
            Address::Broadcast.route(7),
            ("/api/v1/ws/broadcast".to_owned(), None)
        );
        let users = Address::Users(names(&["u0", "u1"]));
        assert_eq!(users.route(3), ("/api/v1/ws/user/u1".to_owned(), Some(1)));
        let channels = Address::Channels(names(&["bench:r-0", "bench:r-1", "bench:r-2"]));
        assert_eq!(
            channels.route(4),
            ("/api/v1/ws/channel/bench:r-1".to_owned(), Some(1))
        );
        assert_eq!(channels.route(6).1, Some(0));
    }

    #[test]
    fn bodies_carry_the_stamp_and_the_target_as_json() {
        let bench: serde_json::Value =
            serde_json::from_str(&Payload::Bench.body(123, 4, Some("bench:r-1"))).unwrap();
        assert_eq!(
            bench,
            serde_json::json!({"type": "bench", "data": {"t": 123, "i": 4, "u": "bench:r-1"}})
        );
        let plain: serde_json::Value =
            serde_json::from_str(&Payload::Bench.body(5, 0, None)).unwrap();
        assert_eq!(
            plain,
            serde_json::json!({"type": "bench", "data": {"t": 5, "i": 0}})
        );
        let output: serde_json::Value =
            serde_json::from_str(&Payload::Output.body(9, 2, Some("bench:r-0"))).unwrap();
        assert_eq!(output["type"], "output");
        assert_eq!(output["data"]["text"], OUTPUT_TEXT);
        assert_eq!(
            (output["data"]["t"].as_u64(), output["data"]["i"].as_u64()),
            (Some(9), Some(2))
        );
        assert!((18..=24).contains(&OUTPUT_TEXT.len()));
    }

    #[test]
    fn a_paced_plan_spreads_each_channels_ticks_over_the_second() {
        // 4 channels at 50/s each: 200/s in all, one message every 5 ms, and
        // channel c's ticks every 20 ms starting at c × 5 ms, never in bursts.
        let (channels, per_channel) = (4_u64, 50.0);
        let rate = per_channel * channels as f64;
        let address = Address::Channels(names(&["c:0", "c:1", "c:2", "c:3"]));
        let mut ticks: Vec<Vec<Duration>> = vec![Vec::new(); channels as usize];
        for i in 0..(rate as u64) {
            let (_, target) = address.route(i);
            ticks[target.unwrap()].push(due(i, rate));
        }
        for (c, ticks) in ticks.iter().enumerate() {
            assert_eq!(ticks.len(), 50, "channel {c}: its rate within the second");
            let first = ticks[0].as_secs_f64();
            assert!(
                (first - c as f64 * 0.005).abs() < 1e-9,
                "channel {c} starts at {first}"
            );
            for pair in ticks.windows(2) {
                let gap = (pair[1] - pair[0]).as_secs_f64();
                assert!((gap - 0.020).abs() < 1e-9, "channel {c}: gap {gap}");
            }
            assert!(*ticks.last().unwrap() < Duration::from_secs(1));
        }
        for i in 1..(rate as u64) {
            let gap = (due(i, rate) - due(i - 1, rate)).as_secs_f64();
            assert!((gap - 0.005).abs() < 1e-9);
        }
    }
}
