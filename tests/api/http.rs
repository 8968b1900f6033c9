//! The small endpoints of SPEC §3 and the router's own errors (404, 405, 426).

use agentcast::config::Secret;
use serde_json::{json, Value};

use crate::helpers::{
    assert_error, content_type, spawn_app, spawn_app_with, wait_until, TestApp, WAIT,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_ok_with_version_and_uptime() {
    let app = spawn_app().await;

    let response = app.get("/health").await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("health body is JSON");
    assert_eq!(body["status"], "ok", "{body}");
    assert!(
        body["version"].as_str().is_some_and(|v| !v.is_empty()),
        "version: {body}"
    );
    assert!(
        body["uptime_s"].is_u64() || body["uptime_s"].is_f64(),
        "uptime_s: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_get_a_json_404() {
    let app = spawn_app().await;
    for path in [
        "/nope",
        "/api/v1/nope",
        "/api/v1/ws/nope",
        "/api/v1/ws/user/alice/extra",
    ] {
        let response = app.get(path).await;
        assert_error(response, 404, &format!("GET {path}")).await;
    }
    let response = app
        .post_json("/api/v1/nope", Some(&app.admin_token()), &json!({}))
        .await;
    assert_error(response, 404, "POST /api/v1/nope").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_get_a_json_405() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let cases = [
        (reqwest::Method::POST, "/health"),
        (reqwest::Method::DELETE, "/health"),
        (reqwest::Method::GET, "/api/v1/ws/broadcast"),
        (reqwest::Method::PUT, "/api/v1/ws/broadcast"),
        (reqwest::Method::DELETE, "/api/v1/ws/user/alice"),
        (reqwest::Method::PATCH, "/api/v1/ws/user/alice"),
        (reqwest::Method::POST, "/api/v1/ws/stats"),
        (reqwest::Method::POST, "/api/v1/ws/connect"),
        (reqwest::Method::DELETE, "/metrics"),
    ];
    for (method, path) in cases {
        let response = app
            .http
            .request(method.clone(), app.url(path))
            .bearer_auth(&admin)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body("{}")
            .send()
            .await
            .expect("request failed");
        assert_error(response, 405, &format!("{method} {path}")).await;
    }
}

/// Found by schemathesis (issue 11): a 405 did not say which methods the path
/// has; RFC 9110 asks for `Allow`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_405_lists_the_allowed_methods() {
    let app = spawn_app().await;
    let cases = [
        (reqwest::Method::DELETE, "/health", "GET"),
        (reqwest::Method::PUT, "/api/v1/ws/user/alice", "GET, POST"),
        (reqwest::Method::TRACE, "/api/v1/agents", "GET"),
        (reqwest::Method::GET, "/api/v1/api-keys/abc", "DELETE"),
        (reqwest::Method::HEAD, "/api/v1/ws/broadcast", "POST"),
    ];
    for (method, path, allow) in cases {
        let response = app
            .http
            .request(method.clone(), app.url(path))
            .bearer_auth(app.admin_token())
            .send()
            .await
            .expect("request failed");
        assert_eq!(response.status(), 405, "{method} {path}");
        let allowed = response.headers().get(reqwest::header::ALLOW);
        assert_eq!(
            allowed.and_then(|v| v.to_str().ok()),
            Some(allow),
            "{method} {path}"
        );
    }
    // The answer of a path that does not exist is still 404, without `Allow`.
    let response = app
        .http
        .delete(app.url("/api/v1/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert!(response.headers().get(reqwest::header::ALLOW).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_get_on_the_websocket_path_gets_426() {
    let app = spawn_app().await;

    let without_token = app.get("/api/v1/ws/connect").await;
    assert_error(without_token, 426, "GET /api/v1/ws/connect without Upgrade").await;

    let with_token = app
        .get(&format!(
            "/api/v1/ws/connect?token={}",
            app.user_token("alice")
        ))
        .await;
    assert_error(
        with_token,
        426,
        "GET /api/v1/ws/connect?token= without Upgrade",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_connections_and_delivered_frames() {
    let app = spawn_app().await;
    let stats = app.get_stats().await;
    for counter in ["total_connections", "current_connections", "messages_sent"] {
        assert_eq!(
            stats[counter], 0,
            "fresh server: stats.{counter} in {stats}"
        );
    }

    // Which control frames (connected, close…) count as delivered is up to the
    // server, and it may count a frame just after the client has read it. So
    // compare two identical rounds — two connections, broadcasts, closed — that
    // differ by one broadcast, each read once its connections are gone.
    let first = stats_round(&app, 1).await;
    let stats = app.get_stats().await;
    assert_eq!(stats["total_connections"], 2, "{stats}");
    let second = stats_round(&app, 2).await - first;
    assert_eq!(
        second,
        first + 2,
        "one more broadcast to two connections is two more frames delivered \
         (round with one broadcast: {first} frames, with two: {second})"
    );
    let stats = app.get_stats().await;
    assert_eq!(stats["total_connections"], 4, "{stats}");
    assert_eq!(stats["current_connections"], 0, "{stats}");
}

/// Two connections receive `broadcasts` messages and close; returns `messages_sent` after.
async fn stats_round(app: &TestApp, broadcasts: usize) -> u64 {
    let before = app.stat("total_connections").await;
    let (mut a, _) = app.connect_ready(&app.user_token("alice")).await;
    let (mut b, _) = app.connect_ready(&app.user_token("bob")).await;
    let stats = app.get_stats().await;
    assert_eq!(stats["total_connections"], before + 2, "{stats}");
    assert_eq!(stats["current_connections"], 2, "{stats}");
    for n in 0..broadcasts {
        app.broadcast("notification", json!({"n": n})).await;
        a.expect_type("notification").await;
        b.expect_type("notification").await;
    }
    a.close().await;
    app.wait_for_stat("current_connections", |n| n == 1).await;
    assert_eq!(
        app.stat("total_connections").await,
        before + 2,
        "closing does not change the total"
    );
    b.close().await;
    app.wait_for_stat("current_connections", |n| n == 0).await;
    app.stat("messages_sent").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_do_not_count_as_accepted() {
    let app = spawn_app().await;
    let mut bad = app.connect("not-a-token").await;
    bad.expect_close(4401).await;

    let stats = app.get_stats().await;
    assert_eq!(stats["total_connections"], 0, "{stats}");
    assert_eq!(stats["current_connections"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_with_latency_histograms() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_ready(&app.user_token("alice")).await;
    app.broadcast("notification", json!({})).await;
    client.expect_type("notification").await;

    let response = app.get("/metrics").await;

    assert_eq!(response.status(), 200);
    let content_type = content_type(&response);
    assert!(
        content_type.starts_with("text/plain")
            || content_type.starts_with("application/openmetrics-text"),
        "Content-Type {content_type:?}"
    );
    let text = response.text().await.unwrap();
    let samples: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert!(!samples.is_empty(), "no samples in /metrics:\n{text}");
    assert!(
        samples.iter().all(|l| l.starts_with("agentcast_")),
        "every metric is prefixed agentcast_:\n{text}"
    );

    for (what, name_part) in [
        ("publish latency", "publish"),
        ("delivery latency", "deliver"),
    ] {
        assert!(
            inf_bucket(&text, name_part).is_some(),
            "no {what} histogram (a *{name_part}*_bucket series with le=\"+Inf\"):\n{text}"
        );
    }
    // One publish was delivered: the +Inf bucket of each histogram counts it. The
    // server may record the delivery just after the client has read the frame.
    let mut last = String::new();
    let counted = wait_until(WAIT, async || {
        last = app.get("/metrics").await.text().await.unwrap();
        ["publish", "deliver"]
            .iter()
            .all(|part| inf_bucket(&last, part).is_some_and(|count| count >= 1.0))
    })
    .await;
    assert!(
        counted,
        "a histogram did not count the delivered publish:\n{last}"
    );
}

/// The count of the `+Inf` bucket of the histogram whose name contains `name_part`.
fn inf_bucket(text: &str, name_part: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.contains("_bucket{") && l.contains(name_part) && l.contains("le=\"+Inf\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_token_guards_metrics_when_set() {
    let app = spawn_app_with(|s| s.metrics_token = Some(Secret::new("metrics-secret"))).await;

    let anonymous = app.get("/metrics").await;
    assert_error(anonymous, 401, "GET /metrics without the metrics token").await;

    let wrong = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_error(wrong, 401, "GET /metrics with a wrong token").await;

    let right = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth("metrics-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    assert!(right.text().await.unwrap().contains("agentcast_"));
}
