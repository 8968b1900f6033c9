//! The load tool, `agentcast bench` (SPEC §9).
//!
//! It drives a running server through its public API only, the way real clients
//! do, and measures what the performance issue asks for:
//!
//! - **idle**: memory per idle authenticated connection (the server's RSS delta
//!   divided by the connections held open) and the server CPU spent per accepted
//!   connection (handshake, JWT check, registration).
//! - **fanout**: broadcasts to many connections as fast as the publishers can
//!   post them: deliveries per second, messages lost, server CPU per delivery.
//! - **rate**: broadcasts at a fixed rate: publish-to-receive latency p50/p99/max.
//! - **to-user**: user-addressed sends with several POSTs in flight: POSTs per
//!   second, lost and misrouted messages (a connection receiving a message
//!   addressed to another user).
//! - **publish**: the publish path itself (issue 3): broadcasts with
//!   `--in-flight` POSTs at a time and one watching connection (default):
//!   acknowledged publishes per second and POST latency p50/p99, which is
//!   where the store's group commit shows (compare `LOG_STORE=sqlite` with
//!   `LOG_STORE=memory` on the same machine).
//! - **channels**: channel publishes (SPEC §4.4, issue 10): each connection
//!   subscribes to a channel of its own, then publishes go round robin over the
//!   channels with `--in-flight` POSTs at a time: acknowledged publishes per
//!   second, POST and publish-to-receive latency, lost, misrouted (a frame of
//!   another channel, or on a connection not subscribed to its channel) and
//!   duplicated frames per channel `seq`, server CPU per publish and per delivery.
//! - **stream**: what a page watching a run sees: `--channels` channels with
//!   one subscriber each, small `output` frames (a streamed token) at `--rate`
//!   per channel per second for `--duration`, paced: lost, duplicated,
//!   publish-to-receive against the POST's own 202 latency, whether the
//!   publishers kept the rate, server CPU per message and RSS.
//!
//! How: every connection is a real WebSocket authenticated with an HS256 token
//! the tool mints with the server's secret, in a fresh tenant per run so runs and
//! other traffic never mix. Connections come from 127.0.0.x source addresses so
//! the ephemeral port range never limits the count. Publishers are admin POSTs
//! over keep-alive HTTP/1.1 connections, one per in-flight slot. Each message
//! carries the time it was posted (nanoseconds since the tool started, one
//! monotonic clock for both sides), its target user, and gets a `seq` from the
//! server; receivers check the target, the `seq` order and the latency, and
//! count per connection, so "lost" is exact: what the 202 answers promised
//! minus what arrived, per connection (per channel in channel runs, where
//! connection `i` is the one subscriber of channel `bench:<run>-<i>`). Server RSS and CPU come from
//! `/proc/<pid>/status` and `/proc/<pid>/stat` when `--server-pid` is given.
//!
//! Several `--url`s (the nodes of a cluster): connection `i` goes to node
//! `i mod n` and so does message `i` (or every message to `--publish-url`);
//! the report adds per-node figures (connections, deliveries, lost, latency of
//! what arrived on that node) to the end-to-end ones, which stay as with one
//! node, and the stats cross-check adds up every node's counters.
//!
//! Every wait is bounded: a phase that stops making progress ends and reports
//! what is missing instead of hanging. The exit status is non-zero when a
//! message was lost, misrouted or duplicated, so scripts need not parse output.
//! The summary also says when its own figures are suspect: the bench near a
//! full core (the load generator is the limit), other processes using the CPUs,
//! a server that is not fresh (idle RSS), both sides allowed on the same CPU.
//!
//! On a 2-core machine pin the two sides apart so they don't measure each other:
//!
//! ```text
//! JWT_SECRET=… taskset -c 0 agentcast serve &
//! JWT_SECRET=… taskset -c 1 agentcast bench --scenario idle --conns 19000 --server-pid $!
//! ```
//!
//! The tool is a client of the server, not a part of it: it is a module of the
//! `agentcast` binary, not of the server's library, and uses none of the
//! server's modules (its only `agentcast::` path is the leaf `units`, which
//! parses its duration flags), so it measures the contract and cannot lean on
//! internals; `agentcast bench` only calls [`main`].

mod fleet;
mod publisher;
mod report;
mod scenarios;
mod server;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// Flags of `agentcast bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value = "fanout")]
    pub scenario: Scenario,

    /// Server address (http://host:port); the WebSocket uses the same one. Several
    /// nodes of a cluster: repeat the flag or separate them with commas; connections
    /// go round robin over them, and so do publishes unless --publish-url is given.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8080")]
    pub url: Vec<String>,

    /// Publish on this node only (http://host:port) instead of round robin over --url.
    #[arg(long)]
    pub publish_url: Option<String>,

    /// WebSocket connections to open [default: idle 19000, fanout 10000, rate 1000, to-user 2000,
    /// publish 1, channels 10000 (one channel each)]; stream: see --channels.
    #[arg(long)]
    pub conns: Option<usize>,

    /// Channels of the stream scenario, one subscriber connection each [default: 200].
    #[arg(long)]
    pub channels: Option<usize>,

    /// Messages to publish [default: fanout 200, to-user 20000, publish 100000, channels 100000,
    /// rate: rate × duration, stream: rate × channels × duration].
    #[arg(long)]
    pub messages: Option<u64>,

    /// Broadcasts per second in the rate scenario; messages per second on each
    /// channel in the stream scenario.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,

    /// How long idle connections are held before measuring (idle, default 5s), or how
    /// long to publish (rate, default 10s; stream, default 60s).
    #[arg(long, value_parser = agentcast::units::parse_duration)]
    pub duration: Option<Duration>,

    /// Distinct users the connections belong to, round robin [default: one per
    /// connection; to-user 500]. Mind the server's MAX_CONNECTIONS_PER_USER (20).
    #[arg(long)]
    pub users: Option<usize>,

    /// POSTs in flight, each on its own keep-alive HTTP/1.1 connection [default: 8;
    /// channels 64; stream enough for 10 ms per POST at the target rate, at least 64].
    #[arg(long)]
    pub in_flight: Option<usize>,

    /// WebSocket handshakes in flight while connecting.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,

    /// Process id of the server: enables its RSS and CPU figures (from /proc).
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// With several --urls: the process id of each node, in --url order
    /// (repeat the flag or separate with commas): adds each node's CPU per
    /// delivery to its figures.
    #[arg(long = "node-pid", value_delimiter = ',')]
    pub node_pids: Vec<u32>,

    /// The server's HS256 secret; unset reads DATA_DIR/jwt_secret.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// The server's data folder, for its generated jwt_secret.
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Tenant to run in [default: a fresh bench-<random> per run, so runs never mix].
    #[arg(long)]
    pub tenant: Option<String>,

    /// Deliveries still missing after this long without progress are reported lost.
    #[arg(long, default_value = "10s", value_parser = agentcast::units::parse_duration)]
    pub timeout: Duration,

    /// Also print the figures as one JSON line (the last line of the output).
    #[arg(long)]
    pub json: bool,
}

/// The measurements the tool knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Hold connections open: server memory and CPU per connection.
    Idle,
    /// Broadcast as fast as possible: deliveries/s, lost, CPU per delivery.
    Fanout,
    /// Broadcast at --rate for --duration: publish-to-receive latency.
    Rate,
    /// Messages to single users, --in-flight at a time: POSTs/s, lost, misrouted.
    ToUser,
    /// Broadcasts as fast as --in-flight POSTs allow, one watcher: acks/s, POST p50/p99.
    Publish,
    /// A channel per connection, publishes round robin over them: acks/s, lost, misrouted.
    Channels,
    /// Paced `output` frames on --channels channels: lost, latency against the 202's.
    Stream,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Fanout => "fanout",
            Scenario::Rate => "rate",
            Scenario::ToUser => "to-user",
            Scenario::Publish => "publish",
            Scenario::Channels => "channels",
            Scenario::Stream => "stream",
        }
    }
}

/// Runs `agentcast bench` on its own runtime and prints the summary.
pub fn main(args: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    // Every connection is a file descriptor and the default soft limit is often 1024.
    let nofile = rlimit::increase_nofile_limit(u64::MAX)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async move {
        let bench = scenarios::Bench::prepare(args, nofile)?;
        bench.run().await
    });
    // Connection tasks of a failed run must not hold the process open.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(result?)
}

/// Where the server is.
#[derive(Debug)]
struct Endpoint {
    addr: SocketAddr,
    /// `host:port` as given, for the `Host` header and the WebSocket URL.
    authority: String,
    /// The URL as given, for the report.
    url: String,
}

/// The nodes of a run: connections go round robin over `connect`, publishes
/// over `publish` (all of `connect`, or the one `--publish-url`).
#[derive(Debug)]
struct Nodes {
    connect: Vec<Arc<Endpoint>>,
    publish: Vec<Arc<Endpoint>>,
}

impl Nodes {
    fn parse(urls: &[String], publish_url: Option<&str>) -> Result<Nodes, String> {
        let connect = urls
            .iter()
            .map(|url| url.trim())
            .filter(|url| !url.is_empty())
            .map(|url| Endpoint::parse(url).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        if connect.is_empty() {
            return Err("--url names no server".into());
        }
        let publish = match publish_url.map(str::trim).filter(|url| !url.is_empty()) {
            Some(url) => vec![Arc::new(Endpoint::parse(url)?)],
            None => connect.clone(),
        };
        Ok(Nodes { connect, publish })
    }

    /// The URLs connections go to, for messages.
    fn describe(&self) -> String {
        let urls: Vec<&str> = self.connect.iter().map(|e| e.url.as_str()).collect();
        urls.join(", ")
    }
}

/// Which of `nodes` item `i` (a connection, a message) goes to: round robin.
fn round_robin(i: u64, nodes: usize) -> usize {
    let nodes = u64::try_from(nodes.max(1)).unwrap_or(u64::MAX);
    usize::try_from(i % nodes).unwrap_or(0)
}

impl Endpoint {
    fn parse(url: &str) -> Result<Endpoint, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("invalid --url '{url}': {e}"))?;
        match uri.scheme_str() {
            None | Some("http") | Some("ws") => {}
            Some(other) => {
                return Err(format!(
                    "--url '{url}': only http:// is supported, not {other}://"
                ))
            }
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("--url '{url}' has no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let addrs: Vec<SocketAddr> = (host.trim_matches(['[', ']']), port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve '{host}': {e}"))?
            .collect();
        // Prefer IPv4: the 127.0.0.x source spreading only exists there.
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| format!("'{host}' resolves to no address"))?;
        Ok(Endpoint {
            addr,
            authority: format!("{host}:{port}"),
            url: url.to_owned(),
        })
    }
}

/// One monotonic clock for the whole run: publishers stamp messages with it and
/// receivers read it, so latency needs no clock synchronisation.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A user the connections log in as.
#[derive(Debug, Clone)]
struct Identity {
    user_id: Arc<str>,
    token: Arc<str>,
}

/// The claims the server reads (SPEC §2), minted here rather than through
/// `agentcast::auth` so the tool only depends on the wire contract.
#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    role: &'a str,
    tenant: &'a str,
}

/// Mints HS256 tokens with the server's secret.
struct Minter {
    key: EncodingKey,
    header: Header,
    tenant: String,
    iat: u64,
}

impl Minter {
    fn new(secret: &str, tenant: String) -> Minter {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Minter {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::new(Algorithm::HS256),
            tenant,
            iat,
        }
    }

    fn mint(&self, sub: &str, role: &str) -> Result<String, String> {
        // Long enough for any run; the server checks `exp` at connect and at expiry.
        let claims = Claims {
            sub,
            exp: self.iat + 12 * 3600,
            iat: self.iat,
            role,
            tenant: &self.tenant,
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key)
            .map_err(|e| format!("cannot sign a token: {e}"))
    }
}

/// The secret as the server resolves it: the given one, else the generated
/// `DATA_DIR/jwt_secret` (trimmed). Never creates one: a new secret would not
/// match the server's.
fn load_secret(given: Option<&str>, data_dir: &std::path::Path) -> Result<String, String> {
    if let Some(secret) = given.filter(|s| !s.is_empty()) {
        return Ok(secret.to_owned());
    }
    let path = data_dir.join("jwt_secret");
    match std::fs::read_to_string(&path) {
        Ok(secret) if !secret.trim().is_empty() => Ok(secret.trim().to_owned()),
        Ok(_) => Err(format!("{} is empty", path.display())),
        Err(e) => Err(format!(
            "no secret: pass --secret or JWT_SECRET, or --data-dir of the server ({}: {e})",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_keeps_host_and_port() {
        let endpoint = Endpoint::parse("http://127.0.0.1:18080").unwrap();
        assert_eq!(endpoint.addr, "127.0.0.1:18080".parse().unwrap());
        assert_eq!(endpoint.authority, "127.0.0.1:18080");
        assert!(Endpoint::parse("https://127.0.0.1:8443").is_err());
        assert!(Endpoint::parse("not a url").is_err());
    }

    #[test]
    fn several_urls_are_spread_round_robin_and_publish_url_picks_one() {
        let urls = [
            "http://127.0.0.1:8081".to_owned(),
            " http://127.0.0.1:8082 ".to_owned(),
            String::new(),
            "http://127.0.0.1:8083".to_owned(),
        ];
        let nodes = Nodes::parse(&urls, None).unwrap();
        let ports: Vec<u16> = nodes.connect.iter().map(|e| e.addr.port()).collect();
        assert_eq!(ports, [8081, 8082, 8083]);
        assert_eq!(nodes.publish.len(), 3);
        assert_eq!(
            nodes.describe(),
            "http://127.0.0.1:8081, http://127.0.0.1:8082, http://127.0.0.1:8083"
        );
        let mut per_node = [0; 3];
        for i in 0..10 {
            per_node[round_robin(i, 3)] += 1;
        }
        assert_eq!(per_node, [4, 3, 3]);
        assert_eq!(round_robin(7, 1), 0);

        let one = Nodes::parse(&urls, Some("http://127.0.0.1:8082")).unwrap();
        assert_eq!(one.connect.len(), 3);
        let publish: Vec<u16> = one.publish.iter().map(|e| e.addr.port()).collect();
        assert_eq!(publish, [8082]);
        assert!(Nodes::parse(&[String::new()], None).is_err());
        assert!(Nodes::parse(&urls, Some("https://x:1")).is_err());
    }

    #[test]
    fn the_url_flag_takes_commas_and_repeats_and_keeps_its_default() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let urls = |argv: &[&str]| Cli::try_parse_from(argv).unwrap().bench.url;
        assert_eq!(urls(&["bench"]), ["http://127.0.0.1:8080"]);
        assert_eq!(urls(&["bench", "--url", "http://a:1"]), ["http://a:1"]);
        assert_eq!(
            urls(&[
                "bench",
                "--url",
                "http://a:1,http://b:2",
                "--url",
                "http://c:3"
            ]),
            ["http://a:1", "http://b:2", "http://c:3"]
        );
    }

    #[test]
    fn minted_tokens_carry_the_claims_the_server_reads() {
        let minter = Minter::new("bench-secret-bench-secret", "bench-t".to_owned());
        let token = minter.mint("u7", "admin").unwrap();
        let key = jsonwebtoken::DecodingKey::from_secret(b"bench-secret-bench-secret");
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &key,
            &jsonwebtoken::Validation::new(Algorithm::HS256),
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "u7");
        assert_eq!(data.claims["role"], "admin");
        assert_eq!(data.claims["tenant"], "bench-t");
    }

    #[test]
    fn secret_file_is_trimmed_and_never_created() {
        let dir = std::env::temp_dir().join(format!("agentcast-bench-{}", uuid::Uuid::new_v4()));
        assert!(load_secret(None, &dir).is_err());
        assert!(!dir.exists());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("jwt_secret"), "abcdefghijklmnopq\n").unwrap();
        assert_eq!(load_secret(None, &dir).unwrap(), "abcdefghijklmnopq");
        assert_eq!(
            load_secret(Some("given-secret"), &dir).unwrap(),
            "given-secret"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
