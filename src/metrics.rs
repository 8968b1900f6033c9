//! Counters, gauges and histograms: one set, read by `/api/v1/ws/stats` as JSON
//! and by `/metrics` in the Prometheus text format.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Clone-able handles share the same atomics; [`Metrics`] is created once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    started: Instant,
    /// WebSocket connections ever accepted (authenticated and registered).
    pub connections_total: Counter<u64, AtomicU64>,
    /// WebSocket connections open now.
    pub connections_current: Gauge,
    /// Text frames written to clients.
    pub messages_sent: Counter<u64, AtomicU64>,
    /// Messages accepted by the publish endpoints.
    pub messages_published: Counter<u64, AtomicU64>,
    /// Frames sent from history to resuming clients.
    pub messages_replayed: Counter<u64, AtomicU64>,
    /// Connections closed with 4503 because their queue overflowed.
    pub slow_consumer_disconnects: Counter<u64, AtomicU64>,
    /// Refused credentials, HTTP and WebSocket.
    pub auth_failures: Counter<u64, AtomicU64>,
    /// Connections closed with 4429 (connection limits or frame flood).
    pub rate_limited: Counter<u64, AtomicU64>,
    /// From request to 202, in seconds.
    pub publish_duration: Histogram,
    /// From accepted publish to the frame written to a socket, in seconds.
    pub delivery_latency: Histogram,
    /// Failed Redis commands and lost subscriptions (cluster mode).
    pub redis_errors: Counter<u64, AtomicU64>,
    /// Times the Redis subscription was set up again.
    pub redis_reconnects: Counter<u64, AtomicU64>,
    /// Gaps in a stream's seq filled from the Redis history.
    pub redis_gap_fills: Counter<u64, AtomicU64>,
    /// From the publishing node's script call to this node's subscriber, in seconds.
    pub redis_pubsub_lag: Histogram,
    /// Channels this node holds, and subscriptions of its connections.
    pub channels: Gauge,
    pub channel_subscriptions: Gauge,
    /// Messages published to channels, by namespace (see [`Metrics::channel_published`]).
    channel_messages: Family<Vec<(String, String)>, Counter<u64, AtomicU64>>,
    /// The counters of the namespaces that have a label of their own (at
    /// most [`NAMESPACE_LABELS`]), so a publish finds its counter without
    /// building a label set.
    namespaces: std::sync::Mutex<std::collections::HashMap<String, Counter<u64, AtomicU64>>>,
}

/// Namespaces that get a label of their own; later ones count as `other`,
/// so clients naming channels cannot grow the metrics.
pub const NAMESPACE_LABELS: usize = 32;

impl Metrics {
    /// Counts a message published to a channel of `namespace`.
    pub fn channel_published(&self, namespace: &str) {
        let mut known = self.namespaces.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(counter) = known.get(namespace) {
            counter.inc();
            return;
        }
        let label = if known.len() < NAMESPACE_LABELS {
            namespace
        } else {
            "other"
        };
        let counter = self
            .channel_messages
            .get_or_create(&vec![("namespace".to_owned(), label.to_owned())])
            .clone();
        counter.inc();
        if label == namespace {
            known.insert(namespace.to_owned(), counter);
        }
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
        let m = Metrics {
            started: Instant::now(),
            connections_total: Counter::default(),
            connections_current: Gauge::default(),
            messages_sent: Counter::default(),
            messages_published: Counter::default(),
            messages_replayed: Counter::default(),
            slow_consumer_disconnects: Counter::default(),
            auth_failures: Counter::default(),
            rate_limited: Counter::default(),
            // 10 µs .. ~5 s
            publish_duration: Histogram::new(exponential_buckets(0.000_01, 2.5, 15)),
            delivery_latency: Histogram::new(exponential_buckets(0.000_01, 2.5, 15)),
            redis_errors: Counter::default(),
            redis_reconnects: Counter::default(),
            redis_gap_fills: Counter::default(),
            // 1 ms .. ~16 s (the clocks of two nodes: milliseconds at best)
            redis_pubsub_lag: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            channels: Gauge::default(),
            channel_subscriptions: Gauge::default(),
            channel_messages: Family::default(),
            namespaces: Default::default(),
            registry: Registry::default(),
        };
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
            m.channel_messages.clone(),
        );
        registry.register(
            "agentcast_connections",
            "WebSocket connections accepted",
            m.connections_total.clone(),
        );
        registry.register(
            "agentcast_current_connections",
            "WebSocket connections open now",
            m.connections_current.clone(),
        );
        registry.register(
            "agentcast_messages_sent",
            "Frames delivered to clients",
            m.messages_sent.clone(),
        );
        registry.register(
            "agentcast_messages_published",
            "Messages accepted for publishing",
            m.messages_published.clone(),
        );
        registry.register(
            "agentcast_messages_replayed",
            "Frames replayed from history on resume",
            m.messages_replayed.clone(),
        );
        registry.register(
            "agentcast_slow_consumer_disconnects",
            "Connections closed 4503 on queue overflow",
            m.slow_consumer_disconnects.clone(),
        );
        registry.register(
            "agentcast_auth_failures",
            "Refused credentials",
            m.auth_failures.clone(),
        );
        registry.register(
            "agentcast_rate_limited",
            "Connections closed 4429",
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
        Metrics { registry, ..m }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The Prometheus text exposition of everything above.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
