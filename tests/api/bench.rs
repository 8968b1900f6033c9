//! The load tool's channel scenarios (issue 10) against the real binary: a
//! short `agentcast bench --scenario channels` and `--scenario stream` run
//! against a server process this test starts, checked through the figures of
//! its `--json` line, so the tool's own accounting (every 202 delivered once,
//! on its channel's connection only) is tested end to end.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::DataDir;
use crate::logs::Binary;

/// Longest a short bench run may take on a loaded 2-core machine (debug build).
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// What one `agentcast bench` run printed.
struct Run {
    status: ExitStatus,
    /// The `--json` line (the last line of stdout), or `Null` without one.
    figures: Value,
    output: String,
}

/// Runs `agentcast bench` against `server` (data folder `dir`, for its secret)
/// with `args`, bounded by [`RUN_LIMIT`].
fn bench(server: &Binary, dir: &Path, args: &[&str]) -> Run {
    let url = format!("http://{}", server.addr);
    let pid = server.child.id().to_string();
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentcast"));
    command
        .args(["bench", "--url", &url, "--server-pid", &pid, "--json"])
        .arg("--data-dir")
        .arg(dir)
        .args(["--timeout", "5s"])
        .args(args)
        .env_remove("JWT_SECRET")
        .env_remove("DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().expect("start agentcast bench");
    let bench_pid = child.id().to_string();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    let output = match done_rx.recv_timeout(RUN_LIMIT) {
        Ok(output) => output.expect("wait for agentcast bench"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &bench_pid]).status();
            panic!("agentcast bench {args:?} did not finish within {RUN_LIMIT:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let figures = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or(Value::Null);
    Run {
        status: output.status,
        figures,
        output: format!("{stderr}{stdout}"),
    }
}

/// A server process with a fresh data folder, logging at info (its "ready on"
/// line; nothing per request or per message).
fn server(env: &[(&str, &str)]) -> (DataDir, Binary) {
    let dir = DataDir::new();
    let mut env = env.to_vec();
    env.push(("RUST_LOG", "info"));
    let server = Binary::start(&dir.0, &env);
    (dir, server)
}

fn figure(run: &Run, key: &str) -> u64 {
    run.figures[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no figure {key} in {}\n{}", run.figures, run.output))
}

fn has_number(run: &Run, key: &str) -> bool {
    run.figures[key].is_number()
}

#[test]
fn channels_scenario_delivers_every_publish_once_on_its_channels_connection_only() {
    let (dir, server) = server(&[]);
    let run = bench(
        &server,
        &dir.0,
        &[
            "--scenario",
            "channels",
            "--conns",
            "50",
            "--messages",
            "1000",
            "--in-flight",
            "8",
        ],
    );
    assert!(run.status.success(), "{}", run.output);
    assert_eq!(run.figures["scenario"], "channels", "{}", run.output);
    assert_eq!(figure(&run, "conns_open"), 50);
    assert_eq!(figure(&run, "messages_accepted"), 1000);
    assert_eq!(figure(&run, "publish_failed"), 0);
    // One subscriber per channel: every publish is one delivery, on one connection.
    assert_eq!(figure(&run, "deliveries_expected"), 1000);
    assert_eq!(figure(&run, "deliveries"), 1000);
    assert_eq!(figure(&run, "server_recipients"), 1000);
    assert_eq!(figure(&run, "lost"), 0);
    assert_eq!(figure(&run, "misrouted"), 0);
    assert_eq!(figure(&run, "duplicate_or_out_of_order"), 0);
    for key in [
        "posts_per_s",
        "post_p50_ms",
        "post_p99_ms",
        "latency_p50_ms",
        "latency_p99_ms",
        "latency_max_ms",
        "receive_minus_post_p99_ms",
        "server_cpu_per_publish_us",
        "server_cpu_per_delivery_us",
    ] {
        assert!(has_number(&run, key), "no {key} in {}", run.figures);
    }
    assert!(run.output.contains("open and subscribed"), "{}", run.output);
}

#[test]
fn stream_scenario_paces_output_frames_and_loses_none() {
    let (dir, server) = server(&[]);
    // 10 channels × 20/s × 2 s: 400 frames, one every 5 ms.
    let run = bench(
        &server,
        &dir.0,
        &[
            "--scenario",
            "stream",
            "--channels",
            "10",
            "--rate",
            "20",
            "--duration",
            "2s",
        ],
    );
    assert!(run.status.success(), "{}", run.output);
    assert_eq!(run.figures["scenario"], "stream", "{}", run.output);
    assert_eq!(figure(&run, "channels"), 10);
    assert_eq!(figure(&run, "conns_open"), 10);
    assert_eq!(figure(&run, "messages"), 400);
    assert_eq!(figure(&run, "messages_accepted"), 400);
    assert_eq!(figure(&run, "deliveries_expected"), 400);
    assert_eq!(figure(&run, "deliveries"), 400);
    assert_eq!(figure(&run, "lost"), 0);
    assert_eq!(figure(&run, "misrouted"), 0);
    assert_eq!(figure(&run, "duplicate_or_out_of_order"), 0);
    assert_eq!(run.figures["rate_target"], 200.0);
    // Paced, not bursty: 400 sends cannot have taken much less than the 2 s.
    let achieved = run.figures["publishes_per_s"].as_f64().unwrap();
    assert!(achieved <= 220.0, "{}", run.figures);
    assert!(run.figures["kept_rate"].is_boolean(), "{}", run.figures);
    for key in [
        "late_sends",
        "schedule_lag_max_ms",
        "post_p50_ms",
        "post_p99_ms",
        "latency_p50_ms",
        "latency_p99_ms",
        "latency_max_ms",
        "receive_minus_post_p99_ms",
        "server_cpu_percent",
        "server_cpu_per_publish_us",
    ] {
        assert!(has_number(&run, key), "no {key} in {}", run.figures);
    }
    assert!(figure(&run, "server_rss_end_bytes") > 0);
}

#[test]
fn a_refused_subscription_fails_the_run_with_the_servers_reason() {
    // Users may only subscribe to task channels: every bench:… subscribe is refused.
    let (dir, server) = server(&[("USER_CHANNELS", "task:*")]);
    let run = bench(
        &server,
        &dir.0,
        &["--scenario", "channels", "--conns", "3", "--messages", "3"],
    );
    assert!(!run.status.success(), "{}", run.output);
    assert!(
        run.output.contains("subscribe refused: forbidden"),
        "{}",
        run.output
    );
}
