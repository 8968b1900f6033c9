//! The publishing side: admin POSTs over keep-alive HTTP/1.1 connections, one
//! connection per in-flight slot, each message stamped with its send time.

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
}

/// What to publish and how fast.
#[derive(Debug, Clone)]
pub struct Plan {
    pub address: Address,
    pub messages: u64,
    /// Messages per second; `None` posts as fast as the slots allow.
    pub rate: Option<f64>,
    pub in_flight: usize,
}

/// What the publishers saw, merged over all slots.
#[derive(Debug, Default)]
pub struct PublishReport {
    pub accepted: u64,
    /// Failed POSTs by reason ("HTTP 503: …", "connect: …").
    pub errors: BTreeMap<String, u64>,
    /// Sum of the `recipients` the 202 answers reported.
    pub recipients: u64,
    /// Accepted messages per user index (user-addressed plans only).
    pub per_user: Vec<u64>,
    /// Accepted messages per publish node (index into the nodes published on).
    pub per_node: Vec<u64>,
    /// First send and last answer, on the run's clock.
    pub first_send_ns: u64,
    pub last_done_ns: u64,
    /// Round-trip time of every POST.
    pub post_ns: Vec<u64>,
    /// How late the most delayed message of a rate plan was sent.
    pub max_lag_ns: u64,
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
        add_counts(&mut self.per_user, other.per_user);
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
        if let Address::Users(users) = &self.plan.address {
            report.per_user = vec![0; users.len()];
        }
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.plan.messages {
                break;
            }
            if let Some(rate) = self.plan.rate {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due).await;
                let lag = tokio::time::Instant::now().saturating_duration_since(due);
                report.max_lag_ns = report
                    .max_lag_ns
                    .max(lag.as_nanos().try_into().unwrap_or(u64::MAX));
            }
            let (path, target) = match &self.plan.address {
                Address::Broadcast => ("/api/v1/ws/broadcast".to_owned(), None),
                Address::Users(users) => {
                    let user = usize::try_from(i).unwrap_or(usize::MAX) % users.len();
                    (format!("/api/v1/ws/user/{}", users[user]), Some(user))
                }
            };
            let sent = self.clock.now_ns();
            if report.first_send_ns == 0 {
                report.first_send_ns = sent;
            }
            let body = match (&self.plan.address, target) {
                (Address::Users(users), Some(user)) => {
                    format!(
                        r#"{{"type":"bench","data":{{"t":{sent},"i":{i},"u":"{}"}}}}"#,
                        users[user]
                    )
                }
                _ => format!(r#"{{"type":"bench","data":{{"t":{sent},"i":{i}}}}}"#),
            };
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
                    if let Some(user) = target {
                        report.per_user[user] += 1;
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
            per_user: vec![1, 1],
            per_node: vec![2],
            ..Default::default()
        };
        a.errors.insert("HTTP 503: down".into(), 1);
        let mut b = PublishReport {
            accepted: 3,
            first_send_ns: 40,
            last_done_ns: 70,
            per_user: vec![2, 1],
            per_node: vec![1, 2],
            ..Default::default()
        };
        b.errors.insert("HTTP 503: down".into(), 2);
        total.merge(a);
        total.merge(b);
        assert_eq!(total.accepted, 5);
        assert_eq!(total.failed(), 3);
        assert_eq!(total.per_user, vec![3, 2]);
        assert_eq!(total.per_node, vec![3, 2]);
        assert_eq!((total.first_send_ns, total.last_done_ns), (40, 90));
    }
}
