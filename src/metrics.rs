//! Counters, gauges and histograms: one set, read by `/api/v1/ws/stats` as JSON
//! and by `/metrics` in the Prometheus (OpenMetrics) text format.
//!
//! Names follow the Prometheus conventions: `agentcast_` first, base units in
//! the name (`_seconds`), counters registered without `_total` (the encoder
//! appends it to their samples), gauges never ending in `_total`. Labels are
//! bounded: a label whose value a client chooses (a message `type`, a channel
//! namespace) goes through [`BoundedLabel`], and no label ever holds a user,
//! channel or tenant id. The README's "Metrics" section lists every series;
//! `tests/api/metrics.rs` checks the names and that the dashboard and alert
//! rules in `deploy/` query only series that exist.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Count = Counter<u64, AtomicU64>;
type Labels = Vec<(String, String)>;

/// Values of a client-chosen label that get a series of their own, beyond
/// the preset ones; later values count as [`OTHER`], so clients naming types
/// or channels cannot grow the metrics.
pub const CUSTOM_LABELS: usize = 32;

/// The label value of everything past [`CUSTOM_LABELS`].
pub const OTHER: &str = "other";

/// Message types the server itself validates (SPEC §3): always labelled.
pub const KNOWN_TYPES: [&str; 3] = ["task_update", "agent_update", "system"];

/// A counter family over one label whose values clients choose: the preset
/// values and the first [`CUSTOM_LABELS`] others get their own series, the
/// rest share `other`. A lookup takes one short lock and allocates nothing
/// once the value has its counter.
#[derive(Debug)]
pub struct BoundedLabel {
    label: &'static str,
    family: Family<Labels, Count>,
    /// Counters by value: the preset ones, then at most `CUSTOM_LABELS` more.
    counters: Mutex<HashMap<Box<str>, Count>>,
    /// How many values [`counters`](Self::counters) may hold.
    limit: usize,
    /// Shared by every value past the limit.
    other: Count,
}

impl BoundedLabel {
    fn new(label: &'static str, preset: &[&str]) -> Self {
        let family = Family::<Labels, Count>::default();
        let counters: HashMap<Box<str>, Count> = preset
            .iter()
            .map(|value| {
                (
                    Box::from(*value),
                    family.get_or_create(&labels(label, value)).clone(),
                )
            })
            .collect();
        let other = family.get_or_create(&labels(label, OTHER)).clone();
        BoundedLabel {
            label,
            other,
            limit: counters.len() + CUSTOM_LABELS,
            counters: Mutex::new(counters),
            family,
        }
    }

    /// Adds `n` to the series of `value` (or of `other`; a value that is
    /// `other` itself takes no place of its own).
    pub fn inc_by(&self, value: &str, n: u64) {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(counter) = counters.get(value) {
            counter.inc_by(n);
        } else if counters.len() >= self.limit || value == OTHER {
            self.other.inc_by(n);
        } else {
            let counter = self
                .family
                .get_or_create(&labels(self.label, value))
                .clone();
            counter.inc_by(n);
            counters.insert(Box::from(value), counter);
        }
    }

    /// The series this family holds (preset, custom and `other`).
    pub fn series(&self) -> usize {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
            + 1
    }
}

fn labels(name: &str, value: &str) -> Labels {
    vec![(name.to_owned(), value.to_owned())]
}

/// Clone-able handles share the same atomics; [`Metrics`] is created once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    started: Instant,
    /// WebSocket connections ever accepted (authenticated and registered).
    pub connections_total: Count,
    /// WebSocket connections open now.
    pub connections_current: Gauge,
    /// Text frames written to clients (live, replayed and control frames).
    pub messages_sent: Count,
    /// Messages accepted by the publish endpoints (the stats' total; the
    /// metrics count them by type: see [`Metrics::published`]).
    pub messages_published: Count,
    published_by_type: BoundedLabel,
    /// Live messages queued for this node's connections, one per addressed
    /// connection, by type (see [`Metrics::delivered`]).
    delivered_by_type: BoundedLabel,
    /// Frames sent from history to resuming clients.
    pub messages_replayed: Count,
    /// Resumes (a tenant `since` on connect, a channel subscribe with
    /// `since`), complete or not: see [`Metrics::resumed`].
    resumes: Family<Labels, Count>,
    /// Connections closed with 4503 because their queue overflowed.
    pub slow_consumer_disconnects: Count,
    /// Refused credentials over HTTP (publish, login, `/metrics`…).
    pub auth_failures: Count,
    /// Refused credentials of WebSocket upgrades.
    pub ws_auth_failures: Count,
    /// Connections closed with 4429 (connection limits or frame flood).
    pub rate_limited: Count,
    /// From request to 202, in seconds.
    pub publish_duration: Histogram,
    /// From accepted publish to the frame written to a socket, in seconds.
    pub delivery_latency: Histogram,
    /// Failed Redis commands and lost subscriptions (cluster mode).
    pub redis_errors: Count,
    /// Times the Redis subscription was set up again.
    pub redis_reconnects: Count,
    /// Gaps in a stream's seq filled from the Redis history.
    pub redis_gap_fills: Count,
    /// From the publishing node's script call to this node's subscriber, in seconds.
    pub redis_pubsub_lag: Histogram,
    /// Whether Redis answered the last scrape's PING (1/0); registered in
    /// cluster mode only ([`Metrics::register_redis_up`]), where 0 means down.
    pub redis_up: Gauge,
    /// Whether the log is whole (1/0): with Redis, subscribed and caught up.
    pub log_ready: Gauge,
    /// Channels this node holds, and subscriptions of its connections.
    pub channels: Gauge,
    pub channel_subscriptions: Gauge,
    /// Messages published to channels, by namespace (see [`Metrics::channel_published`]).
    channel_messages: BoundedLabel,
}

/// Reads a counter kept elsewhere (the store's) at each scrape.
struct ReadCounter {
    name: &'static str,
    help: &'static str,
    read: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for ReadCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCounter")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Collector for ReadCounter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new((self.read)());
        let metric =
            encoder.encode_descriptor(self.name, self.help, None, counter.metric_type())?;
        counter.encode(metric)
    }
}

impl Metrics {
    /// Counts a message of type `kind` accepted for publishing.
    pub fn published(&self, kind: &str) {
        self.messages_published.inc();
        self.published_by_type.inc_by(kind, 1);
    }

    /// Counts a live message of type `kind` queued for `recipients` connections.
    pub fn delivered(&self, kind: &str, recipients: usize) {
        if recipients > 0 {
            self.delivered_by_type.inc_by(kind, recipients as u64);
        }
    }

    /// Counts a message published to a channel of `namespace`.
    pub fn channel_published(&self, namespace: &str) {
        self.channel_messages.inc_by(namespace, 1);
    }

    /// Counts a resume of a tenant log (`channel == false`) or a channel.
    pub fn resumed(&self, channel: bool, complete: bool) {
        let stream = if channel { "channel" } else { "tenant" };
        self.resumes
            .get_or_create(&resume_labels(stream, complete))
            .inc();
    }

    /// The series of the bounded families: `(types published, types
    /// delivered, channel namespaces)`, each at most the preset values,
    /// [`CUSTOM_LABELS`] and `other`.
    pub fn bounded_series(&self) -> (usize, usize, usize) {
        (
            self.published_by_type.series(),
            self.delivered_by_type.series(),
            self.channel_messages.series(),
        )
    }

    pub fn new() -> Self {
        Metrics::for_node(None)
    }

    /// Metrics whose every series carries `node="<NODE_ID>"` when given.
    pub fn for_node(node: Option<&str>) -> Self {
        let mut registry = match node {
            Some(node) => Registry::with_labels(
                [(
                    std::borrow::Cow::Borrowed("node"),
                    std::borrow::Cow::Owned(node.to_owned()),
                )]
                .into_iter(),
            ),
            None => Registry::default(),
        };
        let auth_failures = Family::<Labels, Count>::default();
        let resumes = Family::<Labels, Count>::default();
        for stream in ["tenant", "channel"] {
            for complete in [true, false] {
                let _ = resumes.get_or_create(&resume_labels(stream, complete));
            }
        }
        // Each on its own statement: the guard `get_or_create` returns holds
        // the family's lock until the statement ends, and a second insert
        // under it would deadlock.
        let http_auth_failures = auth_failures
            .get_or_create(&labels("transport", "http"))
            .clone();
        let ws_auth_failures = auth_failures
            .get_or_create(&labels("transport", "ws"))
            .clone();
        let build_info = Family::<Labels, Gauge>::default();
        build_info
            .get_or_create(&labels("version", env!("CARGO_PKG_VERSION")))
            .set(1);
        let m = Metrics {
            started: Instant::now(),
            connections_total: Count::default(),
            connections_current: Gauge::default(),
            messages_sent: Count::default(),
            messages_published: Count::default(),
            published_by_type: BoundedLabel::new("type", &KNOWN_TYPES),
            delivered_by_type: BoundedLabel::new("type", &KNOWN_TYPES),
            messages_replayed: Count::default(),
            resumes: resumes.clone(),
            slow_consumer_disconnects: Count::default(),
            auth_failures: http_auth_failures,
            ws_auth_failures,
            rate_limited: Count::default(),
            // 10 µs .. ~5 s
            publish_duration: Histogram::new(exponential_buckets(0.000_01, 2.5, 15)),
            delivery_latency: Histogram::new(exponential_buckets(0.000_01, 2.5, 15)),
            redis_errors: Count::default(),
            redis_reconnects: Count::default(),
            redis_gap_fills: Count::default(),
            // 1 ms .. ~16 s (the clocks of two nodes: milliseconds at best)
            redis_pubsub_lag: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            redis_up: Gauge::default(),
            log_ready: Gauge::default(),
            channels: Gauge::default(),
            channel_subscriptions: Gauge::default(),
            channel_messages: BoundedLabel::new("namespace", &[]),
            registry: Registry::default(),
        };
        m.log_ready.set(1);
        // Counters are registered without `_total`: the encoder adds it.
        registry.register(
            "agentcast_build_info",
            "The running version (always 1)",
            build_info,
        );
        registry.register(
            "agentcast_connections_accepted",
            "WebSocket connections accepted (authenticated and registered)",
            m.connections_total.clone(),
        );
        registry.register(
            "agentcast_connections_open",
            "WebSocket connections open now",
            m.connections_current.clone(),
        );
        registry.register(
            "agentcast_messages_sent",
            "Frames written to clients: live, replayed and control frames",
            m.messages_sent.clone(),
        );
        registry.register(
            "agentcast_messages_published",
            "Messages accepted for publishing, by type",
            m.published_by_type.family.clone(),
        );
        registry.register(
            "agentcast_messages_delivered",
            "Live messages queued for this node's connections, one per connection, by type",
            m.delivered_by_type.family.clone(),
        );
        registry.register(
            "agentcast_messages_replayed",
            "Frames replayed from history on resume",
            m.messages_replayed.clone(),
        );
        registry.register(
            "agentcast_resumes",
            "Resumes of a tenant log or a channel, by whether history reached back",
            resumes,
        );
        registry.register(
            "agentcast_slow_consumer_closes",
            "Connections closed 4503 on queue overflow",
            m.slow_consumer_disconnects.clone(),
        );
        registry.register(
            "agentcast_auth_failures",
            "Refused credentials, by transport (http or ws)",
            auth_failures,
        );
        registry.register(
            "agentcast_rate_limited_closes",
            "Connections refused or closed 4429 (connection limits, frame flood)",
            m.rate_limited.clone(),
        );
        registry.register(
            "agentcast_publish_duration_seconds",
            "Publish request to 202",
            m.publish_duration.clone(),
        );
        registry.register(
            "agentcast_delivery_latency_seconds",
            "Accepted publish to frame written to the socket",
            m.delivery_latency.clone(),
        );
        registry.register(
            "agentcast_log_ready",
            "Whether the log is whole: with Redis, subscribed and caught up (1/0)",
            m.log_ready.clone(),
        );
        registry.register(
            "agentcast_redis_errors",
            "Failed Redis commands and lost subscriptions",
            m.redis_errors.clone(),
        );
        registry.register(
            "agentcast_redis_reconnects",
            "Redis subscriptions set up again",
            m.redis_reconnects.clone(),
        );
        registry.register(
            "agentcast_redis_gap_fills",
            "Seq gaps filled from the Redis history",
            m.redis_gap_fills.clone(),
        );
        registry.register(
            "agentcast_redis_pubsub_lag_seconds",
            "Publishing node to this node's subscriber",
            m.redis_pubsub_lag.clone(),
        );
        registry.register(
            "agentcast_channels",
            "Channels held by this node",
            m.channels.clone(),
        );
        registry.register(
            "agentcast_channel_subscriptions",
            "Channel subscriptions of this node's connections",
            m.channel_subscriptions.clone(),
        );
        registry.register(
            "agentcast_channel_messages_published",
            "Messages accepted for channels, by namespace",
            m.channel_messages.family.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Cluster mode: adds `agentcast_redis_up` (without Redis it would read "down").
    pub fn register_redis_up(&mut self) {
        self.registry.register(
            "agentcast_redis_up",
            "Whether Redis answered a PING at this scrape (1/0)",
            self.redis_up.clone(),
        );
    }

    /// Adds `agentcast_store_commit_failures_total`, read from `read` at each
    /// scrape (the store counts its failed transactions itself).
    pub fn register_store_commit_failures(
        &mut self,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.registry.register_collector(Box::new(ReadCounter {
            name: "agentcast_store_commit_failures",
            help: "SQLite transactions that failed, refusing every write in them.",
            read: Box::new(read),
        }));
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The OpenMetrics text exposition of everything above.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(8192);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// The same in the classic Prometheus text format (0.0.4), for clients
    /// that do not ask for OpenMetrics: see [`classic_text`].
    pub fn encode_classic(&self) -> String {
        classic_text(&self.encode())
    }
}

/// Rewrites an OpenMetrics exposition in the classic text format. The sample
/// lines are the same; the metadata differs: a classic counter family is named
/// like its samples (`…_total`) where OpenMetrics names it without the suffix,
/// and the classic format has no `# UNIT` line and no `# EOF`. Without this,
/// `promtool check metrics` reports "no help text" for every counter.
fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let metadata = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match metadata {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                text.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

fn resume_labels(stream: &str, complete: bool) -> Labels {
    vec![
        ("stream".to_owned(), stream.to_owned()),
        ("complete".to_owned(), complete.to_string()),
    ]
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of `text` whose name is `name`.
    fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .collect()
    }

    #[test]
    fn a_flood_of_custom_types_and_namespaces_stays_within_the_bound() {
        let m = Metrics::new();
        for n in 0..1000 {
            m.published(&format!("custom_{n}"));
            m.delivered(&format!("custom_{n}"), 2);
            m.channel_published(&format!("ns{n}"));
        }
        m.published("task_update");
        let text = m.encode();
        let bound = KNOWN_TYPES.len() + CUSTOM_LABELS + 1;
        let published = samples(&text, "agentcast_messages_published_total");
        let delivered = samples(&text, "agentcast_messages_delivered_total");
        let namespaces = samples(&text, "agentcast_channel_messages_published_total");
        assert_eq!(published.len(), bound, "{published:#?}");
        assert_eq!(delivered.len(), bound, "{delivered:#?}");
        assert_eq!(namespaces.len(), CUSTOM_LABELS + 1, "{namespaces:#?}");
        assert_eq!(m.bounded_series(), (bound, bound, CUSTOM_LABELS + 1));
        // The first custom values have their own series, the rest is `other`;
        // nothing is lost from the totals.
        assert!(published.contains(&"agentcast_messages_published_total{type=\"custom_0\"} 1"));
        let other = 1000 - CUSTOM_LABELS;
        assert!(
            published.contains(
                &format!("agentcast_messages_published_total{{type=\"other\"}} {other}").as_str()
            ),
            "{published:#?}"
        );
        assert!(published.contains(&"agentcast_messages_published_total{type=\"task_update\"} 1"));
        assert!(delivered.contains(
            &format!(
                "agentcast_messages_delivered_total{{type=\"other\"}} {}",
                other * 2
            )
            .as_str()
        ));
        assert_eq!(m.messages_published.get(), 1001);
    }

    #[test]
    fn a_custom_type_named_other_shares_the_overflow_series() {
        let m = Metrics::new();
        m.published("other");
        for n in 0..CUSTOM_LABELS + 5 {
            m.published(&format!("t{n}"));
        }
        let text = m.encode();
        let published = samples(&text, "agentcast_messages_published_total");
        assert_eq!(
            published.len(),
            KNOWN_TYPES.len() + CUSTOM_LABELS + 1,
            "{published:#?}"
        );
    }

    #[test]
    fn labelled_families_show_before_any_traffic() {
        let text = Metrics::for_node(Some("n1")).encode();
        for series in [
            "agentcast_messages_published_total{node=\"n1\",type=\"system\"} 0",
            "agentcast_messages_delivered_total{node=\"n1\",type=\"other\"} 0",
            "agentcast_auth_failures_total{node=\"n1\",transport=\"ws\"} 0",
            "agentcast_resumes_total{node=\"n1\",stream=\"channel\",complete=\"false\"} 0",
            "agentcast_build_info{node=\"n1\",version=\"",
            "agentcast_log_ready{node=\"n1\"} 1",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
        assert!(
            !text.contains("agentcast_redis_up"),
            "redis_up is for cluster mode only"
        );
    }

    #[test]
    fn the_classic_format_names_counter_families_like_their_samples() {
        let m = Metrics::for_node(Some("n1"));
        m.published("task_update");
        let text = m.encode_classic();
        assert!(
            text.contains("# TYPE agentcast_messages_published_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP agentcast_messages_published_total "),
            "{text}"
        );
        assert!(
            text.contains("# TYPE agentcast_connections_open gauge\n"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT "),
            "{text}"
        );
        // The samples are untouched.
        let samples = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&text), samples(&m.encode()));
    }

    #[test]
    fn redis_up_and_store_failures_are_registered_on_request() {
        let mut m = Metrics::for_node(Some("n1"));
        m.register_redis_up();
        m.register_store_commit_failures(|| 7);
        m.redis_up.set(1);
        let text = m.encode();
        assert!(text.contains("agentcast_redis_up{node=\"n1\"} 1"), "{text}");
        assert!(
            text.contains("agentcast_store_commit_failures_total{node=\"n1\"} 7"),
            "{text}"
        );
    }
}
