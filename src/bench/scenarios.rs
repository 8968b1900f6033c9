//! The runs themselves: connect, (publish, collect), measure, summarise.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fleet::{ConnReport, Fleet, Listen};
use super::publisher::{self, Address, HttpClient, Payload, Plan, PublishReport};
use super::report::{bytes, count, duration, ms, per_second, round3, Spread, Summary};
use super::server::{self, ProcProbe, ServerStats};
use super::{load_secret, BenchArgs, Clock, Identity, Minter, Nodes, Scenario};

/// How often the runner looks at the counters while it waits.
const POLL: Duration = Duration::from_millis(10);
/// How often it samples the server's RSS for the peak.
const RSS_POLL: Duration = Duration::from_millis(100);
/// Longest wait for the server to count the closed connections out.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Above this share of one core used by other processes, the figures are suspect.
const OTHER_LOAD_PERCENT: f64 = 10.0;
/// Above this share of one core the load generator, not the server, may be the limit.
const CLIENT_BUSY_PERCENT: f64 = 90.0;

/// A run, fully resolved from the flags.
pub struct Bench {
    scenario: Scenario,
    /// Where connections and publishes go.
    nodes: Nodes,
    clock: Clock,
    tenant: String,
    /// One per user; connection `i` logs in as `identities[i % len]`.
    identities: Vec<Identity>,
    /// Channel runs: connection `i` subscribes to `channels[i]`, `bench:<run>-<i>`.
    channels: Option<Arc<[Arc<str>]>>,
    admin_token: Arc<str>,
    server: ProcProbe,
    own: ProcProbe,
    /// One per connection node when `--node-pid`s were given.
    node_probes: Vec<ProcProbe>,
    /// For the stats endpoint, one per connection node.
    http: Vec<HttpClient>,
    conns: usize,
    messages: u64,
    rate: f64,
    duration: Duration,
    in_flight: usize,
    concurrency: usize,
    timeout: Duration,
    json: bool,
    summary: Summary,
    /// Why the run counts as failed (messages lost, misrouted, duplicated) once printed.
    verdict: Option<String>,
}

impl Bench {
    /// Resolves defaults, checks limits, mints the tokens.
    pub fn prepare(args: BenchArgs, open_files: u64) -> Result<Bench, String> {
        let clock = Clock(Instant::now());
        let scenario = args.scenario;
        let nodes = Nodes::parse(&args.url, args.publish_url.as_deref())?;
        match (scenario, args.conns, args.channels) {
            (Scenario::Stream, Some(_), _) => {
                return Err(
                    "--scenario stream opens one connection per channel: give --channels, not --conns"
                        .into(),
                )
            }
            (Scenario::Stream, _, _) | (_, _, None) => {}
            (_, _, Some(_)) => {
                return Err(
                    "--channels is for --scenario stream (channels gives each of --conns connections a channel of its own)"
                        .into(),
                )
            }
        }
        // Only one of the two is given (checked above): stream's is --channels.
        let conns = args.conns.or(args.channels).unwrap_or(match scenario {
            Scenario::Idle => 19_000,
            Scenario::Fanout | Scenario::Channels => 10_000,
            Scenario::Rate => 1_000,
            Scenario::ToUser => 2_000,
            Scenario::Publish => 1,
            Scenario::Stream => 200,
        });
        if conns == 0 {
            return Err("--conns and --channels must be at least 1".into());
        }
        let users = args.users.unwrap_or(match scenario {
            Scenario::ToUser => 500,
            _ => conns,
        });
        if !(args.rate.is_finite() && args.rate > 0.0) {
            return Err(format!("--rate must be above 0, not {}", args.rate));
        }
        let (messages, duration) = match scenario {
            Scenario::Idle => (0, args.duration.unwrap_or(Duration::from_secs(5))),
            Scenario::Rate => match args.messages {
                Some(m) => (m, Duration::from_secs_f64(m as f64 / args.rate)),
                None => {
                    let d = args.duration.unwrap_or(Duration::from_secs(10));
                    ((d.as_secs_f64() * args.rate).round() as u64, d)
                }
            },
            Scenario::Fanout => (args.messages.unwrap_or(200), Duration::ZERO),
            Scenario::ToUser => (args.messages.unwrap_or(20_000), Duration::ZERO),
            Scenario::Publish | Scenario::Channels => {
                (args.messages.unwrap_or(100_000), Duration::ZERO)
            }
            // --rate is per channel here: all channels together get rate × channels.
            Scenario::Stream => {
                let total = args.rate * conns as f64;
                match args.messages {
                    Some(m) => (m, Duration::from_secs_f64(m as f64 / total)),
                    None => {
                        let d = args.duration.unwrap_or(Duration::from_secs(60));
                        ((d.as_secs_f64() * total).round() as u64, d)
                    }
                }
            }
        };
        let in_flight = args.in_flight.unwrap_or(match scenario {
            Scenario::Channels => 64,
            // Enough slots to keep the rate with 10 ms per POST.
            Scenario::Stream => ((args.rate * conns as f64 / 100.0).ceil() as usize).max(64),
            _ => 8,
        });
        if conns == 0 || users == 0 || in_flight == 0 || args.connect_concurrency == 0 {
            return Err(
                "--conns, --channels, --users, --in-flight and --connect-concurrency must be at least 1"
                    .into(),
            );
        }
        // Every connection is a descriptor here, plus publishers and the runtime's own.
        let needed = (conns + in_flight * nodes.publish.len() + 64) as u64;
        if needed > open_files {
            return Err(format!(
                "{conns} connections need about {needed} open files but the limit is {open_files}: \
                 lower --conns or raise the hard limit (ulimit -Hn)"
            ));
        }

        let secret = load_secret(args.secret.as_deref(), &args.data_dir)?;
        let tenant = args.tenant.clone().unwrap_or_else(|| {
            let id = uuid::Uuid::new_v4().simple().to_string();
            format!("bench-{}", &id[..8])
        });
        let minter = Minter::new(&secret, tenant.clone());
        let identities = (0..users)
            .map(|u| {
                let user_id = format!("u{u}");
                let token = minter.mint(&user_id, "user")?;
                Ok(Identity {
                    user_id: user_id.into(),
                    token: token.into(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let admin_token = minter.mint("bench-admin", "admin")?.into();
        // A run id of its own, so runs in one --tenant never share a channel.
        let channels = matches!(scenario, Scenario::Channels | Scenario::Stream).then(|| {
            let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
            (0..conns)
                .map(|i| Arc::from(format!("bench:{run}-{i}")))
                .collect::<Arc<[Arc<str>]>>()
        });

        let mut summary = Summary::default();
        summary.set("scenario", scenario.name());
        summary.set("tenant", tenant.as_str());
        let per_user = conns.div_ceil(users);
        if per_user > 20 {
            summary.note(format!(
                "{per_user} connections per user: above the server's default MAX_CONNECTIONS_PER_USER (20), \
                 the extra ones are refused with 4429"
            ));
        }
        let server = ProcProbe::new(args.server_pid);
        let own = ProcProbe::own();
        match (server.cpus_allowed(), own.cpus_allowed()) {
            (Some(theirs), Some(ours)) if overlaps(&theirs, &ours) => summary.note(format!(
                "the server (CPUs {theirs}) and the bench (CPUs {ours}) may share a core; \
                 pin them apart (taskset -c 0 … serve, taskset -c 1 … bench) for figures that don't measure each other"
            )),
            (None, _) if args.server_pid.is_some() => {
                return Err(format!("no process {} to read /proc of", args.server_pid.unwrap_or(0)))
            }
            (None, _) => summary.note("no --server-pid: server memory and CPU figures are skipped"),
            _ => {}
        }

        let node_probes = node_probes(&args.node_pids, nodes.connect.len())?;

        Ok(Bench {
            scenario,
            http: nodes
                .connect
                .iter()
                .map(|node| HttpClient::new(node.clone()))
                .collect(),
            nodes,
            clock,
            tenant,
            identities,
            channels,
            admin_token,
            server,
            own,
            node_probes,
            conns,
            messages,
            rate: args.rate,
            duration,
            in_flight,
            concurrency: args.connect_concurrency,
            timeout: args.timeout,
            json: args.json,
            summary,
            verdict: None,
        })
    }

    pub async fn run(mut self) -> Result<(), String> {
        for (http, node) in self.http.iter_mut().zip(&self.nodes.connect) {
            http.connect()
                .await
                .map_err(|e| format!("cannot reach the server at {}: {e}", node.url))?;
        }
        eprintln!(
            "agentcast bench: {} against {}, tenant {}",
            self.scenario.name(),
            self.nodes.describe(),
            self.tenant
        );
        let stats = server::stats(&mut self.http).await;
        match self.scenario {
            Scenario::Idle => self.idle(stats).await?,
            _ => self.traffic(stats).await?,
        }
        self.summary.print(self.json);
        // A non-zero exit lets scripts and CI rely on "nothing lost" without parsing.
        self.verdict.map_or(Ok(()), Err)
    }

    /// Memory per idle connection and CPU per accepted connection.
    async fn idle(&mut self, stats: Option<ServerStats>) -> Result<(), String> {
        if let Some(stats) = stats.filter(|s| s.total_connections > 0) {
            self.summary.note(format!(
                "the server accepted {} connections before this run; memory they freed may be reused, \
                 so restart it for a true per-connection figure",
                count(stats.total_connections)
            ));
        }
        let start = self.snapshot();
        let fleet = self
            .connect(Listen {
                kind: Payload::Bench.kind(),
                channels: None,
            })
            .await?;
        let connected = fleet.progress.connected.load(Ordering::Relaxed);
        let connect_end = self.snapshot();
        self.note_other_load(&start, &connect_end);

        eprintln!("holding them for {}…", duration(nanos(self.duration)));
        let until = Instant::now() + self.duration;
        while fleet.progress.open() > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::time::sleep(left.min(RSS_POLL)).await;
        }
        let held = self.server.sample();
        let open = fleet.progress.open();
        self.summary.line(
            "idle",
            format!(
                "{} connections open after {}, {} dropped",
                count(open as u64),
                duration(nanos(self.duration)),
                count(connected.saturating_sub(open) as u64)
            ),
        );
        self.list_drops(&fleet);
        self.summary.set("conns_held", open as u64);
        if let (Some(before), Some(after_connect), Some(held)) =
            (start.server, connect_end.server, held)
        {
            let grown = held.rss_bytes as f64 - before.rss_bytes as f64;
            let per_conn = grown / open.max(1) as f64;
            self.summary.line(
                "server",
                format!(
                    "RSS {} -> {}: {} per idle connection",
                    bytes(before.rss_bytes as f64),
                    bytes(held.rss_bytes as f64),
                    bytes(per_conn)
                ),
            );
            let cpu = self.server.cpu_seconds(before, after_connect);
            let per_accept_us = cpu * 1e6 / connected.max(1) as f64;
            self.summary.line(
                "server",
                format!(
                    "CPU {cpu:.2} s for {} accepted connections: {per_accept_us:.0} µs per connection",
                    count(connected as u64)
                ),
            );
            self.summary
                .set("server_rss_before_bytes", before.rss_bytes);
            self.summary.set("server_rss_held_bytes", held.rss_bytes);
            self.summary
                .set("server_rss_per_conn_bytes", per_conn.round());
            self.summary.set("server_cpu_connect_s", round3(cpu));
            self.summary
                .set("server_cpu_per_conn_us", round3(per_accept_us));
        }

        eprintln!("closing…");
        fleet.close().await;
        self.drain(stats).await;
        if let Some(after) = self.server.sample() {
            self.summary.line(
                "server",
                format!(
                    "RSS after closing them all: {}",
                    bytes(after.rss_bytes as f64)
                ),
            );
            self.summary
                .set("server_rss_after_close_bytes", after.rss_bytes);
        }
        Ok(())
    }

    /// Every scenario but idle: publish, then count what arrived where and when.
    async fn traffic(&mut self, stats: Option<ServerStats>) -> Result<(), String> {
        let payload = match self.scenario {
            Scenario::Stream => Payload::Output,
            _ => Payload::Bench,
        };
        let fleet = self
            .connect(Listen {
                kind: payload.kind(),
                channels: self.channels.clone(),
            })
            .await?;
        // What each publish addresses: the connections open when publishing starts.
        let alive = fleet.progress.alive_by_target();
        let address = match (&self.channels, self.scenario) {
            (Some(channels), _) => Address::Channels(channels.clone()),
            (None, Scenario::ToUser) => Address::Users(
                self.identities
                    .iter()
                    .map(|id| id.user_id.clone())
                    .collect(),
            ),
            (None, _) => Address::Broadcast,
        };
        let broadcast = matches!(address, Address::Broadcast);
        let (rate, late_after) = match self.scenario {
            Scenario::Rate => (Some(self.rate), Duration::from_secs_f64(1.0 / self.rate)),
            // One tick of a channel: a send that late bunches that channel's frames.
            Scenario::Stream => (
                Some(self.rate * self.conns as f64),
                Duration::from_secs_f64(1.0 / self.rate),
            ),
            _ => (None, Duration::MAX),
        };
        let plan = Plan {
            address,
            payload,
            messages: self.messages,
            rate,
            late_after,
            in_flight: self.in_flight,
        };
        let stats_before = server::stats(&mut self.http).await.or(stats);
        let start = self.snapshot();
        let mut peak_rss = start.server.map_or(0, |s| s.rss_bytes);
        let mut last_rss_poll = Instant::now();

        match plan.rate {
            Some(rate) => eprintln!(
                "publishing {} messages at {rate}/s ({} in flight)…",
                count(plan.messages),
                plan.in_flight
            ),
            None => eprintln!(
                "publishing {} messages ({} in flight)…",
                count(plan.messages),
                plan.in_flight
            ),
        }
        let publishing = tokio::spawn(publisher::publish(
            self.nodes.publish.clone(),
            self.admin_token.clone(),
            plan.clone(),
            self.clock,
        ));
        while !publishing.is_finished() {
            self.watch_rss(&mut peak_rss, &mut last_rss_poll);
            tokio::time::sleep(POLL).await;
        }
        let published = publishing
            .await
            .map_err(|e| format!("the publisher failed: {e}"))??;

        let expected: u64 = if broadcast {
            published.accepted * alive.iter().sum::<u64>()
        } else {
            published
                .per_target
                .iter()
                .zip(&alive)
                .map(|(sent, open)| sent * open)
                .sum()
        };
        eprintln!("waiting for {} deliveries…", count(expected));
        let mut seen = 0;
        let mut last_progress = Instant::now();
        loop {
            let received = fleet.progress.received.load(Ordering::Relaxed);
            if received >= expected || fleet.progress.open() == 0 {
                break;
            }
            if received != seen {
                seen = received;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > self.timeout {
                break;
            }
            self.watch_rss(&mut peak_rss, &mut last_rss_poll);
            tokio::time::sleep(POLL).await;
        }
        let end = self.snapshot();
        let stats_after = server::stats(&mut self.http).await;
        if let Some(after) = end.server {
            peak_rss = peak_rss.max(after.rss_bytes);
        }
        self.list_drops(&fleet);
        let reports = fleet.close().await;
        let nodes = Tally::by_node(reports, &published, broadcast, self.nodes.connect.len());
        if nodes.len() > 1 {
            let cpu: Vec<Option<f64>> = self
                .node_probes
                .iter()
                .zip(start.nodes.iter().zip(&end.nodes))
                .map(|(probe, pair)| match pair {
                    (Some(before), Some(after)) => Some(probe.cpu_seconds(*before, *after)),
                    _ => None,
                })
                .collect();
            self.report_nodes(&nodes, &published, &cpu);
        }
        let tally = Tally::sum(nodes);

        self.report_publish(&published);
        self.report_deliveries(&tally, &published);
        let wall = end.at_ns - start.at_ns;
        if let (Some(before), Some(after)) = (start.server, end.server) {
            let cpu = self.server.cpu_seconds(before, after);
            let percent = cpu * 1e11 / wall.max(1) as f64;
            let per_delivery_us = cpu * 1e6 / tally.received.max(1) as f64;
            let per_publish_us = cpu * 1e6 / published.accepted.max(1) as f64;
            self.summary.line(
                "server",
                format!(
                    "CPU {cpu:.2} s ({percent:.0}% of a core over {}) = {per_delivery_us:.2} µs per delivery, \
                     {per_publish_us:.2} µs per publish; RSS {} -> peak {}, {} at the end",
                    duration(wall),
                    bytes(before.rss_bytes as f64),
                    bytes(peak_rss as f64),
                    bytes(after.rss_bytes as f64)
                ),
            );
            self.summary.set("server_cpu_s", round3(cpu));
            self.summary.set("server_cpu_percent", round3(percent));
            self.summary
                .set("server_cpu_per_delivery_us", round3(per_delivery_us));
            self.summary
                .set("server_cpu_per_publish_us", round3(per_publish_us));
            self.summary.set("server_rss_peak_bytes", peak_rss);
            self.summary.set("server_rss_end_bytes", after.rss_bytes);
        }
        if let (Some(before), Some(after)) = (stats_before, stats_after) {
            let sent = after.messages_sent.saturating_sub(before.messages_sent);
            let slow = after
                .slow_consumer_disconnects
                .saturating_sub(before.slow_consumer_disconnects);
            self.summary.line(
                "stats",
                format!(
                    "server counted messages_sent +{}, slow_consumer_disconnects +{slow}",
                    count(sent)
                ),
            );
            if sent < tally.received {
                self.summary.note(format!(
                    "the server's messages_sent grew by {} but the bench received {}",
                    count(sent),
                    count(tally.received)
                ));
            }
        }
        if let (Some(before), Some(after)) = (start.own, end.own) {
            let cpu = self.own.cpu_seconds(before, after);
            let percent = cpu * 1e11 / wall.max(1) as f64;
            self.summary.line(
                "client",
                format!("CPU {cpu:.2} s ({percent:.0}% of a core)"),
            );
            self.summary.set("client_cpu_percent", percent.round());
            if percent > CLIENT_BUSY_PERCENT {
                self.summary.note(format!(
                    "the bench itself used {percent:.0}% of a core: the figures may be limited by the load generator"
                ));
            }
        }
        self.note_other_load(&start, &end);
        self.drain(stats).await;
        Ok(())
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            at_ns: self.clock.now_ns(),
            server: self.server.sample(),
            own: self.own.sample(),
            nodes: self.node_probes.iter().map(ProcProbe::sample).collect(),
            machine_ticks: server::machine_busy_ticks(),
        }
    }

    /// Notes when other processes used the CPUs during a measured phase: on a
    /// shared machine a compile next door skews every figure.
    fn note_other_load(&mut self, start: &Snapshot, end: &Snapshot) {
        let (Some(s0), Some(s1), Some(o0), Some(o1), Some(m0), Some(m1)) = (
            start.server,
            end.server,
            start.own,
            end.own,
            start.machine_ticks,
            end.machine_ticks,
        ) else {
            return;
        };
        let ours =
            s1.cpu_ticks.saturating_sub(s0.cpu_ticks) + o1.cpu_ticks.saturating_sub(o0.cpu_ticks);
        let others = self
            .server
            .seconds(m1.saturating_sub(m0).saturating_sub(ours));
        let percent = others * 1e11 / (end.at_ns - start.at_ns).max(1) as f64;
        self.summary.set("other_load_percent", percent.round());
        if percent > OTHER_LOAD_PERCENT {
            self.summary.note(format!(
                "other processes used {percent:.0}% of a core while this was measured: the figures are likely pessimistic"
            ));
        }
    }

    /// Opens the connections (subscribed, in channel runs) and reports how that went.
    async fn connect(&mut self, listen: Listen) -> Result<Fleet, String> {
        eprintln!(
            "connecting {} WebSockets ({} users, {} handshakes in flight{})…",
            count(self.conns as u64),
            count(self.identities.len() as u64),
            self.concurrency,
            if listen.channels.is_some() {
                ", each subscribing to a channel of its own"
            } else {
                ""
            }
        );
        let started = self.clock.now_ns();
        let fleet = Fleet::open(
            &self.nodes.connect,
            &self.identities,
            self.conns,
            self.concurrency,
            self.clock,
            &listen,
        )
        .await;
        let took = self.clock.now_ns() - started;
        let connected = fleet.progress.connected.load(Ordering::Relaxed) as u64;
        let failed = fleet.progress.failed.load(Ordering::Relaxed) as u64;
        let rate = per_second(connected, took);
        self.summary.line(
            "connect",
            format!(
                "{}/{} open{} in {} ({rate:.0}/s), {} failed",
                count(connected),
                count(self.conns as u64),
                if listen.channels.is_some() {
                    " and subscribed, one channel each,"
                } else {
                    ""
                },
                duration(took),
                count(failed)
            ),
        );
        if self.nodes.connect.len() > 1 {
            let per_node = fleet.progress.connected_by_node();
            let text: Vec<String> = per_node.iter().map(|n| count(*n)).collect();
            self.summary
                .line("", format!("open per node: {}", text.join(" / ")));
            self.summary.set("conns_open_per_node", per_node);
        }
        let failures = fleet.progress.failures();
        for (why, n) in failures.iter().take(5) {
            self.summary
                .line("", format!("{} x {why}", count(*n as u64)));
        }
        self.summary.set("conns", self.conns as u64);
        self.summary.set("conns_open", connected);
        self.summary.set("connect_failed", failed);
        self.summary.set("connect_s", round3(took as f64 / 1e9));
        self.summary.set("connects_per_s", rate.round());
        if connected == 0 {
            let why = failures
                .first()
                .map_or("no reason recorded", |(why, _)| why.as_str());
            return Err(format!("no connection could be opened: {why}"));
        }
        Ok(fleet)
    }

    fn report_publish(&mut self, published: &PublishReport) {
        let took = published
            .last_done_ns
            .saturating_sub(published.first_send_ns);
        let rate = per_second(published.accepted, took);
        let mut text = format!(
            "{}/{} accepted in {} ({rate:.0}/s, {} in flight), {} failed",
            count(published.accepted),
            count(self.messages),
            duration(took),
            self.in_flight,
            count(published.failed())
        );
        if let Some(posts) = Spread::of(published.post_ns.clone()) {
            text.push_str(&format!("; POST {}", posts.describe()));
            posts.set(&mut self.summary, "post");
        }
        self.summary.line("publish", text);
        let mut errors: Vec<_> = published.errors.iter().collect();
        errors.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
        for (why, n) in errors.into_iter().take(5) {
            self.summary.line("", format!("{} x {why}", count(*n)));
        }
        if self.scenario == Scenario::Stream {
            self.report_pace(published, rate);
        }
        if self.scenario == Scenario::Rate {
            self.summary.line(
                "schedule",
                format!(
                    "target {}/s for {}; the latest send was {} behind schedule",
                    self.rate,
                    duration(nanos(self.duration)),
                    duration(published.max_lag_ns)
                ),
            );
            self.summary.set("rate_target", self.rate);
            self.summary
                .set("schedule_lag_max_ms", ms(published.max_lag_ns));
        }
        self.summary.set("messages", self.messages);
        self.summary.set("messages_accepted", published.accepted);
        self.summary.set("publish_failed", published.failed());
        self.summary.set("posts_per_s", rate.round());
    }

    /// Stream runs: the paced schedule against what the publishers achieved.
    /// `achieved`: accepted publishes per second over the publishing.
    fn report_pace(&mut self, published: &PublishReport, achieved: f64) {
        let channels = self.conns as f64;
        let target = self.rate * channels;
        let pace = Pace::judge(target, achieved, published.failed());
        self.summary.line(
            "schedule",
            format!(
                "target {}/s on each of {} channels = {}/s for {}: achieved {}/s{}; \
                 {} sends more than one channel tick ({}) late, the latest {} behind schedule",
                self.rate,
                count(self.conns as u64),
                count(target.round() as u64),
                duration(nanos(self.duration)),
                count(achieved.round() as u64),
                if pace.kept { "" } else { " (behind)" },
                count(published.late),
                duration(nanos(Duration::from_secs_f64(1.0 / self.rate))),
                duration(published.max_lag_ns)
            ),
        );
        if !pace.kept {
            self.summary.note(format!(
                "the publishers did not keep the rate: {}/s of {}/s ({:.0}%); raise --in-flight ({} now), \
                 or the server (or this machine) is the limit",
                count(achieved.round() as u64),
                count(target.round() as u64),
                pace.share * 100.0,
                self.in_flight
            ));
        }
        self.summary.set("channels", self.conns as u64);
        self.summary.set("rate_per_channel", self.rate);
        self.summary.set("rate_target", round3(target));
        self.summary.set("publishes_per_s", achieved.round());
        self.summary.set("kept_rate", pace.kept);
        self.summary.set("late_sends", published.late);
        self.summary
            .set("schedule_lag_max_ms", ms(published.max_lag_ns));
    }

    fn report_deliveries(&mut self, tally: &Tally, published: &PublishReport) {
        let took = tally.last_recv_ns.saturating_sub(published.first_send_ns);
        let rate = per_second(tally.received, took);
        self.summary.line(
            "deliver",
            format!(
                "{}/{} in {} = {} deliveries/s; lost {}, duplicate/out-of-order {}, misrouted {}",
                count(tally.received),
                count(tally.expected),
                duration(took),
                count(rate.round() as u64),
                count(tally.lost),
                count(tally.out_of_order),
                count(tally.misrouted)
            ),
        );
        let latency = Spread::of(tally.latencies.clone());
        if let Some(latency) = latency {
            let mut text = format!("publish->receive {}", latency.describe());
            if !matches!(self.scenario, Scenario::Rate | Scenario::Stream) {
                text.push_str(" (publishing as fast as possible: includes queueing)");
            }
            self.summary.line("latency", text);
            latency.set(&mut self.summary, "latency");
        }
        // What a subscriber waits beyond the publisher's own answer: the
        // delivery path's share of the latency.
        let channel_run = matches!(self.scenario, Scenario::Channels | Scenario::Stream);
        let posts = channel_run
            .then(|| Spread::of(published.post_ns.clone()))
            .flatten();
        if let (Some(latency), Some(posts)) = (latency, posts) {
            let beyond = latency.p99 as f64 / 1e6 - posts.p99 as f64 / 1e6;
            self.summary.line(
                "",
                format!(
                    "POST 202 p50 {}, p99 {}: receive p99 - 202 p99 = {beyond:+.3} ms",
                    duration(posts.p50),
                    duration(posts.p99)
                ),
            );
            self.summary
                .set("receive_minus_post_p99_ms", round3(beyond));
        }
        if tally.dropped_before > 0 {
            self.summary.note(format!(
                "{} connections closed before publishing began and are not counted",
                count(tally.dropped_before)
            ));
        }
        if tally.other > 0 {
            self.summary.note(format!(
                "{} frames that were not bench messages arrived",
                count(tally.other)
            ));
        }
        if tally.lost > 0 && tally.dropped_during > 0 {
            self.summary.note(format!(
                "{} connections were closed during the run: what they missed counts as lost (a real client would resume)",
                count(tally.dropped_during)
            ));
        }
        if tally.lost + tally.misrouted + tally.out_of_order > 0 {
            self.verdict = Some(format!(
                "delivery check failed: {} lost, {} misrouted, {} duplicate/out-of-order",
                tally.lost, tally.misrouted, tally.out_of_order
            ));
        }
        self.summary.set("deliveries_expected", tally.expected);
        self.summary.set("deliveries", tally.received);
        self.summary.set("lost", tally.lost);
        self.summary
            .set("duplicate_or_out_of_order", tally.out_of_order);
        self.summary.set("misrouted", tally.misrouted);
        self.summary.set("deliveries_per_s", rate.round());
        self.summary.set("server_recipients", published.recipients);
        if published.recipients != tally.expected {
            self.summary.note(format!(
                "the server's 202 answers addressed {} connections in total, the bench expected {}",
                count(published.recipients),
                count(tally.expected)
            ));
        }
    }

    /// One line and one JSON object per connection node: its connections, what
    /// they received against what was promised, the latency seen there, and
    /// the publishes it accepted (when publishes were spread over the nodes).
    /// `cpu`: each node's CPU seconds over the run, with `--node-pid`s.
    fn report_nodes(&mut self, nodes: &[Tally], published: &PublishReport, cpu: &[Option<f64>]) {
        let spread =
            self.nodes.publish.len() == self.nodes.connect.len() && self.nodes.publish.len() > 1;
        let mut figures = Vec::with_capacity(nodes.len());
        for (i, (tally, node)) in nodes.iter().zip(&self.nodes.connect).enumerate() {
            let mut text = format!(
                "{}: {} conns, {}/{} delivered, lost {}, duplicate/out-of-order {}, misrouted {}",
                node.url,
                count(tally.conns),
                count(tally.received),
                count(tally.expected),
                count(tally.lost),
                count(tally.out_of_order),
                count(tally.misrouted)
            );
            let mut figure = serde_json::json!({
                "url": node.url,
                "conns_open": tally.conns,
                "deliveries_expected": tally.expected,
                "deliveries": tally.received,
                "lost": tally.lost,
                "duplicate_or_out_of_order": tally.out_of_order,
                "misrouted": tally.misrouted,
            });
            if let Some(latency) = Spread::of(tally.latencies.clone()) {
                text.push_str(&format!("; latency {}", latency.describe()));
                figure["latency_p50_ms"] = ms(latency.p50).into();
                figure["latency_p99_ms"] = ms(latency.p99).into();
                figure["latency_max_ms"] = ms(latency.max).into();
            }
            if let Some(cpu) = cpu.get(i).copied().flatten() {
                let per_delivery_us = cpu * 1e6 / tally.received.max(1) as f64;
                text.push_str(&format!(
                    "; CPU {cpu:.2} s = {per_delivery_us:.2} µs per delivery"
                ));
                figure["server_cpu_s"] = round3(cpu).into();
                figure["server_cpu_per_delivery_us"] = round3(per_delivery_us).into();
            }
            if spread {
                let accepted = published.per_node.get(i).copied().unwrap_or(0);
                text.push_str(&format!("; published {}", count(accepted)));
                figure["messages_accepted"] = accepted.into();
            }
            self.summary.line(&format!("node {}", i + 1), text);
            figures.push(figure);
        }
        if !spread {
            let on = &self.nodes.publish[0].url;
            self.summary.line("", format!("every publish on {on}"));
            self.summary.set("publish_url", on.as_str());
        }
        self.summary.set("nodes", figures);
    }

    fn list_drops(&mut self, fleet: &Fleet) {
        for (why, n) in fleet.progress.drops().iter().take(5) {
            self.summary
                .line("dropped", format!("{} x {why}", count(*n as u64)));
        }
    }

    fn watch_rss(&self, peak: &mut u64, last: &mut Instant) {
        if self.server.enabled() && last.elapsed() >= RSS_POLL {
            *last = Instant::now();
            if let Some(sample) = self.server.sample() {
                *peak = (*peak).max(sample.rss_bytes);
            }
        }
    }

    /// Waits (bounded) until the server has counted our connections out, so a
    /// following run or RSS reading starts from a quiet server.
    async fn drain(&mut self, before: Option<ServerStats>) {
        let Some(before) = before else { return };
        let until = Instant::now() + DRAIN_TIMEOUT;
        while Instant::now() < until {
            match server::stats(&mut self.http).await {
                Some(now) if now.current_connections > before.current_connections => {
                    tokio::time::sleep(RSS_POLL).await;
                }
                _ => return,
            }
        }
        self.summary
            .note("the server still counted some of the closed connections as open after 5 s");
    }
}

/// Whether a paced run kept its rate.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pace {
    kept: bool,
    /// Achieved over target.
    share: f64,
}

impl Pace {
    /// Kept: no publish failed and at least 98% of the target rate was achieved
    /// (the last POSTs' answers end the window, so a kept rate reads about 100%).
    fn judge(target: f64, achieved: f64, failed: u64) -> Pace {
        let share = if target > 0.0 { achieved / target } else { 0.0 };
        Pace {
            kept: failed == 0 && share >= 0.98,
            share,
        }
    }
}

/// CPU and memory readings at one moment.
struct Snapshot {
    at_ns: u64,
    server: Option<server::ProcSample>,
    own: Option<server::ProcSample>,
    /// Each node's, with `--node-pid`s.
    nodes: Vec<Option<server::ProcSample>>,
    machine_ticks: Option<u64>,
}

/// A probe per connection node, from `--node-pid`: none, or one per `--url`,
/// each a process there is to read.
fn node_probes(pids: &[u32], nodes: usize) -> Result<Vec<ProcProbe>, String> {
    if pids.is_empty() {
        return Ok(Vec::new());
    }
    if pids.len() != nodes {
        return Err(format!(
            "{} --node-pid for {nodes} --url: give one per node, in --url order",
            pids.len()
        ));
    }
    let probes: Vec<ProcProbe> = pids.iter().map(|&pid| ProcProbe::new(Some(pid))).collect();
    match pids
        .iter()
        .zip(&probes)
        .find(|(_, probe)| probe.sample().is_none())
    {
        Some((pid, _)) => Err(format!("no process {pid} to read /proc of")),
        None => Ok(probes),
    }
}

/// What all connections received, against what the 202 answers promised.
#[derive(Debug, Default)]
struct Tally {
    /// Connections counted: open when publishing began.
    conns: u64,
    expected: u64,
    received: u64,
    lost: u64,
    misrouted: u64,
    out_of_order: u64,
    other: u64,
    last_recv_ns: u64,
    /// Connections closed before the first publish: nothing was addressed to them.
    dropped_before: u64,
    dropped_during: u64,
    latencies: Vec<u64>,
}

impl Tally {
    fn of(reports: Vec<ConnReport>, published: &PublishReport, broadcast: bool) -> Tally {
        let mut tally = Tally::default();
        for report in reports.into_iter().filter(|r| r.connected) {
            match report.dropped_ns {
                Some(at) if at < published.first_send_ns => {
                    tally.dropped_before += 1;
                    continue;
                }
                Some(_) => tally.dropped_during += 1,
                None => {}
            }
            tally.conns += 1;
            let expected = if broadcast {
                published.accepted
            } else {
                published
                    .per_target
                    .get(report.target)
                    .copied()
                    .unwrap_or(0)
            };
            tally.expected += expected;
            tally.received += report.received;
            tally.lost += expected.saturating_sub(report.received);
            tally.misrouted += report.misrouted;
            tally.out_of_order += report.out_of_order;
            tally.other += report.other;
            tally.last_recv_ns = tally.last_recv_ns.max(report.last_recv_ns);
            tally.latencies.extend(report.latencies_ns);
        }
        tally
    }

    /// One tally per node, from the reports of the connections on it.
    fn by_node(
        reports: Vec<ConnReport>,
        published: &PublishReport,
        broadcast: bool,
        nodes: usize,
    ) -> Vec<Tally> {
        let mut groups: Vec<Vec<ConnReport>> = (0..nodes.max(1)).map(|_| Vec::new()).collect();
        for report in reports {
            let node = report.node.min(groups.len() - 1);
            groups[node].push(report);
        }
        groups
            .into_iter()
            .map(|group| Tally::of(group, published, broadcast))
            .collect()
    }

    /// The end-to-end tally of all nodes together.
    fn sum(parts: Vec<Tally>) -> Tally {
        let mut total = Tally::default();
        for part in parts {
            total.conns += part.conns;
            total.expected += part.expected;
            total.received += part.received;
            total.lost += part.lost;
            total.misrouted += part.misrouted;
            total.out_of_order += part.out_of_order;
            total.other += part.other;
            total.last_recv_ns = total.last_recv_ns.max(part.last_recv_ns);
            total.dropped_before += part.dropped_before;
            total.dropped_during += part.dropped_during;
            total.latencies.extend(part.latencies);
        }
        total
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether two `Cpus_allowed_list` values (e.g. `0-1`, `1`, `0,2-3`) share a CPU.
fn overlaps(a: &str, b: &str) -> bool {
    let cpus = |list: &str| -> Vec<(u32, u32)> {
        list.split(',')
            .filter_map(|part| {
                let (lo, hi) = part
                    .trim()
                    .split_once('-')
                    .unwrap_or((part.trim(), part.trim()));
                Some((lo.parse().ok()?, hi.parse().ok()?))
            })
            .collect()
    };
    let (a, b) = (cpus(a), cpus(b));
    a.iter()
        .any(|&(lo, hi)| b.iter().any(|&(lo2, hi2)| lo <= hi2 && lo2 <= hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_overlap_when_they_share_a_cpu() {
        assert!(overlaps("0-1", "1"));
        assert!(overlaps("0,2-3", "3"));
        assert!(!overlaps("0", "1"));
        assert!(!overlaps("0-1", "2-3"));
    }

    #[test]
    fn tally_counts_loss_per_connection_and_skips_early_drops() {
        let published = PublishReport {
            accepted: 3,
            first_send_ns: 100,
            per_target: vec![3, 1],
            ..Default::default()
        };
        let conn = |target, received, dropped_ns| ConnReport {
            target,
            connected: true,
            received,
            dropped_ns,
            latencies_ns: vec![5; received as usize],
            ..Default::default()
        };
        let reports = vec![
            conn(0, 3, None),
            conn(1, 1, None),
            conn(0, 1, Some(150)),
            conn(1, 0, Some(50)),
        ];
        let users = Tally::of(reports, &published, false);
        assert_eq!((users.expected, users.received, users.lost), (7, 5, 2));
        assert_eq!((users.dropped_before, users.dropped_during), (1, 1));
        assert_eq!(users.latencies.len(), 5);

        let broadcast = Tally::of(vec![conn(0, 3, None), conn(1, 2, None)], &published, true);
        assert_eq!((broadcast.expected, broadcast.lost), (6, 1));
    }

    fn prepared(argv: &[&str]) -> Result<Bench, String> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let mut full = vec!["bench", "--secret", "bench-secret-bench-secret"];
        full.extend_from_slice(argv);
        let args = Cli::try_parse_from(full).map_err(|e| e.to_string())?.bench;
        Bench::prepare(args, 1 << 20)
    }

    #[test]
    fn channels_runs_give_every_connection_a_channel_of_its_own() {
        let bench = prepared(&["--scenario", "channels"]).unwrap();
        assert_eq!(
            (bench.conns, bench.messages, bench.in_flight),
            (10_000, 100_000, 64)
        );
        let channels = bench.channels.as_ref().unwrap();
        assert_eq!(channels.len(), 10_000);
        let run = channels[0].strip_suffix("-0").unwrap();
        assert_eq!(&*channels[9_999], format!("{run}-9999"));
        // SPEC §4.4's channel names: `<namespace>:<id>`.
        let id = run.strip_prefix("bench:").unwrap();
        assert!(
            id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{run}"
        );
        // A second run in the same tenant gets other channels.
        let again = prepared(&["--scenario", "channels", "--conns", "3", "--tenant", "t"]).unwrap();
        assert_eq!(again.channels.as_ref().unwrap().len(), 3);
        assert_ne!(again.channels.unwrap()[0], channels[0]);
        assert!(prepared(&["--scenario", "fanout"])
            .unwrap()
            .channels
            .is_none());
    }

    #[test]
    fn stream_runs_take_channels_rate_and_duration() {
        let bench = prepared(&["--scenario", "stream"]).unwrap();
        // 200 channels × 50/s × 60 s, and slots for 10 ms per POST at 10,000/s.
        assert_eq!((bench.conns, bench.identities.len()), (200, 200));
        assert_eq!(bench.messages, 600_000);
        assert_eq!(bench.duration, Duration::from_secs(60));
        assert_eq!(bench.in_flight, 100);
        let small = prepared(&[
            "--scenario",
            "stream",
            "--channels",
            "20",
            "--rate",
            "10",
            "--duration",
            "3s",
        ])
        .unwrap();
        assert_eq!(
            (small.conns, small.messages, small.in_flight),
            (20, 600, 64)
        );
        let counted = prepared(&[
            "--scenario",
            "stream",
            "--channels",
            "4",
            "--messages",
            "100",
        ]);
        assert_eq!(counted.unwrap().duration, Duration::from_millis(500));
        let error = |argv: &[&str]| prepared(argv).err().unwrap_or_default();
        assert!(error(&["--scenario", "stream", "--conns", "5"]).contains("--channels"));
        assert!(error(&["--scenario", "channels", "--channels", "5"]).contains("stream"));
        assert!(error(&["--scenario", "stream", "--channels", "0"]).contains("at least 1"));
        assert!(error(&["--scenario", "stream", "--rate", "0"]).contains("--rate"));
    }

    #[test]
    fn a_pace_is_kept_at_the_target_rate_with_nothing_failed() {
        assert!(Pace::judge(10_000.0, 10_004.0, 0).kept);
        assert!(Pace::judge(10_000.0, 9_850.0, 0).kept);
        let behind = Pace::judge(10_000.0, 7_500.0, 0);
        assert!(!behind.kept);
        assert!((behind.share - 0.75).abs() < 1e-9);
        assert!(!Pace::judge(10_000.0, 10_000.0, 3).kept);
        assert!(!Pace::judge(0.0, 0.0, 0).kept);
    }

    #[test]
    fn channel_tallies_hold_each_connection_to_its_channels_publishes() {
        // Three channels, one subscriber each: 2, 1 and 0 publishes accepted.
        let published = PublishReport {
            accepted: 3,
            first_send_ns: 100,
            per_target: vec![2, 1, 0],
            ..Default::default()
        };
        let conn = |target, received| ConnReport {
            target,
            connected: true,
            received,
            latencies_ns: vec![5; received as usize],
            ..Default::default()
        };
        let tally = Tally::of(vec![conn(0, 2), conn(1, 0), conn(2, 0)], &published, false);
        assert_eq!((tally.expected, tally.received, tally.lost), (3, 2, 1));
        // A connection whose target is out of range was addressed nothing.
        let stray = Tally::of(vec![conn(7, 0)], &published, false);
        assert_eq!((stray.expected, stray.lost), (0, 0));
    }

    #[test]
    fn node_pids_are_one_per_url_and_each_a_process_to_read() {
        assert!(node_probes(&[], 2).unwrap().is_empty());
        let me = std::process::id();
        assert_eq!(node_probes(&[me, me], 2).unwrap().len(), 2);
        assert!(node_probes(&[me], 2).unwrap_err().contains("one per node"));
        // Above the kernel's pid_max: no such process.
        let gone = node_probes(&[me, u32::MAX], 2).unwrap_err();
        assert!(gone.contains(&u32::MAX.to_string()), "{gone}");
    }

    #[test]
    fn tallies_per_node_count_each_nodes_connections_and_add_up_end_to_end() {
        let published = PublishReport {
            accepted: 4,
            first_send_ns: 100,
            ..Default::default()
        };
        let conn = |node, received: u64, latency| ConnReport {
            node,
            connected: true,
            received,
            last_recv_ns: 200 + latency,
            latencies_ns: vec![latency; received as usize],
            ..Default::default()
        };
        // Node 0: two connections, one missed a message; node 1: one complete;
        // node 2: one closed before publishing began.
        let mut early = conn(2, 0, 0);
        early.dropped_ns = Some(50);
        let reports = vec![conn(0, 4, 10), conn(1, 4, 30), conn(0, 3, 20), early];
        let nodes = Tally::by_node(reports, &published, true, 3);
        assert_eq!(nodes.len(), 3);
        let figures: Vec<_> = nodes
            .iter()
            .map(|t| (t.conns, t.expected, t.received, t.lost))
            .collect();
        assert_eq!(figures, [(2, 8, 7, 1), (1, 4, 4, 0), (0, 0, 0, 0)]);
        assert_eq!(nodes[2].dropped_before, 1);
        let p99 = |t: &Tally| Spread::of(t.latencies.clone()).map(|s| s.p99);
        assert_eq!((p99(&nodes[0]), p99(&nodes[1])), (Some(20), Some(30)));

        let total = Tally::sum(nodes);
        assert_eq!(
            (total.conns, total.expected, total.received, total.lost),
            (3, 12, 11, 1)
        );
        assert_eq!((total.dropped_before, total.latencies.len()), (1, 11));
        assert_eq!(total.last_recv_ns, 230);
    }
}
