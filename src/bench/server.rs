//! What the tool reads about the server besides its answers: RSS and CPU time
//! from `/proc/<pid>` (Linux), and the counters of `GET /api/v1/ws/stats`.

use std::process::Command;

use hyper::{Method, StatusCode};
use serde::Deserialize;

use super::publisher::HttpClient;

/// One reading of a process's memory and CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    pub rss_bytes: u64,
    /// User plus system time, in clock ticks.
    pub cpu_ticks: u64,
}

/// Reads RSS and CPU time of a process, when there is one to read.
#[derive(Debug)]
pub struct ProcProbe {
    pid: Option<u32>,
    ticks_per_second: u64,
}

impl ProcProbe {
    pub fn new(pid: Option<u32>) -> ProcProbe {
        ProcProbe {
            pid,
            ticks_per_second: ticks_per_second(),
        }
    }

    /// The bench process itself, to tell when the load generator is the bottleneck.
    pub fn own() -> ProcProbe {
        ProcProbe::new(Some(std::process::id()))
    }

    pub fn enabled(&self) -> bool {
        self.pid.is_some()
    }

    /// A reading now; `None` without a pid or when the process is gone.
    pub fn sample(&self) -> Option<ProcSample> {
        let pid = self.pid?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Some(ProcSample {
            rss_bytes: parse_rss(&status)?,
            cpu_ticks: parse_cpu_ticks(&stat)?,
        })
    }

    /// CPU seconds between two readings.
    pub fn cpu_seconds(&self, before: ProcSample, after: ProcSample) -> f64 {
        self.seconds(after.cpu_ticks.saturating_sub(before.cpu_ticks))
    }

    pub fn seconds(&self, ticks: u64) -> f64 {
        ticks as f64 / self.ticks_per_second as f64
    }

    /// The CPUs the process may run on (`Cpus_allowed_list`, e.g. `0` or `0-1`).
    pub fn cpus_allowed(&self) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
            .map(|list| list.trim().to_owned())
    }
}

/// CPU ticks the whole machine spent busy so far (all CPUs, from `/proc/stat`):
/// what neither the server nor the bench used was someone else's load.
pub fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_busy_ticks(stat.lines().next()?)
}

/// user + nice + system + irq + softirq + steal of the `cpu` line (idle and iowait excluded).
fn parse_busy_ticks(line: &str) -> Option<u64> {
    let fields: Vec<u64> = line
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    Some(field(0) + field(1) + field(2) + field(5) + field(6) + field(7))
}

/// `getconf CLK_TCK`, the unit of `/proc/<pid>/stat` times; 100 on every Linux
/// we know of, which is also the answer when `getconf` is missing.
fn ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .filter(|&ticks| ticks > 0)
        .unwrap_or(100)
}

/// `VmRSS:   12345 kB` from `/proc/<pid>/status`, in bytes.
fn parse_rss(status: &str) -> Option<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// utime + stime (fields 14 and 15) from `/proc/<pid>/stat`. The command name
/// (field 2) may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The counters of `GET /api/v1/ws/stats` the report uses.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct ServerStats {
    pub total_connections: u64,
    pub current_connections: u64,
    pub messages_sent: u64,
    pub messages_published: u64,
    pub slow_consumer_disconnects: u64,
}

#[derive(Deserialize)]
struct StatsBody {
    stats: ServerStats,
}

impl ServerStats {
    /// The counters of several nodes added up (each node counts its own).
    fn add(mut self, other: ServerStats) -> ServerStats {
        self.total_connections += other.total_connections;
        self.current_connections += other.current_connections;
        self.messages_sent += other.messages_sent;
        self.messages_published += other.messages_published;
        self.slow_consumer_disconnects += other.slow_consumer_disconnects;
        self
    }
}

/// The stats of every node now, added up; `None` if one does not answer them
/// (they are only a cross-check).
pub async fn stats(nodes: &mut [HttpClient]) -> Option<ServerStats> {
    let mut total = ServerStats::default();
    for node in nodes {
        total = total.add(node_stats(node).await?);
    }
    Some(total)
}

async fn node_stats(client: &mut HttpClient) -> Option<ServerStats> {
    match client
        .request(Method::GET, "/api/v1/ws/stats", None, None)
        .await
    {
        Ok((StatusCode::OK, body)) => serde_json::from_slice::<StatsBody>(&body)
            .ok()
            .map(|b| b.stats),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_are_read_after_the_command_name() {
        let stat =
            "4242 (agent cast) S 1 4242 4242 0 -1 4194560 900 0 0 0 125 37 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(162));
        let status = "Name:\tagentcast\nVmPeak:\t  9000 kB\nVmRSS:\t  5120 kB\nThreads:\t3\n";
        assert_eq!(parse_rss(status), Some(5120 * 1024));
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_and_iowait() {
        assert_eq!(
            parse_busy_ticks("cpu  100 2 30 5000 7 1 4 3 0 0"),
            Some(140)
        );
        assert_eq!(parse_busy_ticks("cpu0 100 2 30 5000 7 1 4 3 0 0"), None);
        assert!(machine_busy_ticks().is_some());
    }

    #[test]
    fn stats_of_several_nodes_add_up() {
        let node = |current, sent| ServerStats {
            current_connections: current,
            messages_sent: sent,
            total_connections: current,
            ..ServerStats::default()
        };
        let total = node(3, 30).add(node(2, 20));
        assert_eq!(
            (
                total.current_connections,
                total.messages_sent,
                total.total_connections
            ),
            (5, 50, 5)
        );
    }

    #[test]
    fn own_process_can_be_sampled() {
        let probe = ProcProbe::own();
        let sample = probe.sample().expect("/proc/self is readable on Linux");
        assert!(sample.rss_bytes > 0);
        assert!(probe.cpus_allowed().is_some());
    }
}
