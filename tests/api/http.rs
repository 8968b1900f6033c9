//! The small endpoints of SPEC §3 and the router's own errors (404, 405, 426).

use agentcast::config::Secret;
use serde_json::{json, Value};

use crate::helpers::{assert_error, spawn_app, spawn_app_with};

#[tokio::test]
async fn health_reports_ok_with_version_and_uptime() {
    let app = spawn_app().await;

    let response = app.get("/health").await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("health body is JSON");
    assert_eq!(body["status"], "ok", "{body}");
    assert!(body["version"].as_str().is_some_and(|v| !v.is_empty()), "version: {body}");
    assert!(body["uptime_s"].is_u64() || body["uptime_s"].is_f64(), "uptime_s: {body}");
}

#[tokio::test]
async fn unknown_paths_get_a_json_404() {
    let app = spawn_app().await;
    for path in ["/nope", "/api/v1/nope", "/api/v1/ws/nope", "/api/v1/ws/user/alice/extra"] {
        let response = app.get(path).await;
        assert_error(response, 404, &format!("GET {path}")).await;
    }
    let response = app.post_json("/api/v1/nope", Some(&app.admin_token()), &json!({})).await;
    assert_error(response, 404, "POST /api/v1/nope").await;
}

#[tokio::test]
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

#[tokio::test]
async fn plain_get_on_the_websocket_path_gets_426() {
    let app = spawn_app().await;

    let without_token = app.get("/api/v1/ws/connect").await;
    assert_error(without_token, 426, "GET /api/v1/ws/connect without Upgrade").await;

    let with_token = app.get(&format!("/api/v1/ws/connect?token={}", app.user_token("alice"))).await;
    assert_error(with_token, 426, "GET /api/v1/ws/connect?token= without Upgrade").await;
}

#[tokio::test]
async fn stats_count_connections_and_delivered_frames() {
    let app = spawn_app().await;
    let stats = app.get_stats().await;
    for counter in ["total_connections", "current_connections", "messages_sent"] {
        assert_eq!(stats[counter], 0, "fresh server: stats.{counter} in {stats}");
    }

    let (mut a, _) = app.connect_ready(&app.user_token("alice")).await;
    let (mut b, _) = app.connect_ready(&app.user_token("bob")).await;
    let stats = app.get_stats().await;
    assert_eq!(stats["total_connections"], 2, "{stats}");
    assert_eq!(stats["current_connections"], 2, "{stats}");

    // Whether the `connected` frames count as delivered is up to the server; measure
    // from after a first broadcast that both have received.
    app.broadcast("notification", json!({"n": 1})).await;
    a.expect_type("notification").await;
    b.expect_type("notification").await;
    let before = app.stat("messages_sent").await;
    app.broadcast("notification", json!({"n": 2})).await;
    a.expect_type("notification").await;
    b.expect_type("notification").await;
    let after = app.wait_for_stat("messages_sent", |sent| sent >= before + 2).await;
    assert_eq!(after, before + 2, "one broadcast to two connections is two frames delivered");

    b.close().await;
    app.wait_for_stat("current_connections", |n| n == 1).await;
    assert_eq!(app.stat("total_connections").await, 2, "closing does not change the total");

    let (_c, _) = app.connect_ready(&app.user_token("carol")).await;
    let stats = app.get_stats().await;
    assert_eq!(stats["total_connections"], 3, "{stats}");
    assert_eq!(stats["current_connections"], 2, "{stats}");
}

#[tokio::test]
async fn refused_connections_do_not_count_as_accepted() {
    let app = spawn_app().await;
    let mut bad = app.connect("not-a-token").await;
    bad.expect_close(4401).await;

    let stats = app.get_stats().await;
    assert_eq!(stats["total_connections"], 0, "{stats}");
    assert_eq!(stats["current_connections"], 0, "{stats}");
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_latency_histograms() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_ready(&app.user_token("alice")).await;
    app.broadcast("notification", json!({})).await;
    client.expect_type("notification").await;

    let response = app.get("/metrics").await;

    assert_eq!(response.status(), 200);
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/plain") || content_type.starts_with("application/openmetrics-text"),
        "Content-Type {content_type:?}"
    );
    let text = response.text().await.unwrap();
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    assert!(!samples.is_empty(), "no samples in /metrics:\n{text}");
    assert!(samples.iter().all(|l| l.starts_with("agentcast_")), "every metric is prefixed agentcast_:\n{text}");

    for (what, name_part) in [("publish latency", "publish"), ("delivery latency", "deliver")] {
        let buckets: Vec<&&str> =
            samples.iter().filter(|l| l.contains("_bucket{") && l.contains(name_part)).collect();
        assert!(!buckets.is_empty(), "no {what} histogram (a *{name_part}*_bucket series):\n{text}");
        // One publish was delivered: the +Inf bucket of each histogram counts it.
        let inf = buckets
            .iter()
            .find(|l| l.contains("le=\"+Inf\""))
            .unwrap_or_else(|| panic!("{what} histogram has no +Inf bucket:\n{text}"));
        let count: f64 = inf.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(count >= 1.0, "{what} histogram counted nothing: {inf}");
    }
}

#[tokio::test]
async fn metrics_token_guards_metrics_when_set() {
    let app = spawn_app_with(|s| s.metrics_token = Some(Secret::new("metrics-secret"))).await;

    let anonymous = app.get("/metrics").await;
    assert_error(anonymous, 401, "GET /metrics without the metrics token").await;

    let wrong = app.http.get(app.url("/metrics")).bearer_auth("nope").send().await.unwrap();
    assert_error(wrong, 401, "GET /metrics with a wrong token").await;

    let right = app.http.get(app.url("/metrics")).bearer_auth("metrics-secret").send().await.unwrap();
    assert_eq!(right.status(), 200);
    assert!(right.text().await.unwrap().contains("agentcast_"));
}
