//! Regression tests of issue 8's HTTP and account findings: account lockout
//! from many addresses (2), the signup limit and argon2 permits (3), forged
//! security alerts (9), error responses lost on keep-alive connections (10),
//! and loose body validation (12).
//!
//! Different client addresses are real: Linux routes all of 127.0.0.0/8 to
//! loopback, so a client bound to 127.0.0.N is seen by the server as 127.0.0.N.

use std::net::IpAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use agentcast::config::Secret;
use serde_json::{json, Value};

use crate::accounts::{ADMIN_PASSWORD, LOGIN, SIGNUP};
use crate::helpers::{assert_error, assert_error_shape, spawn_app, spawn_app_with, TestApp, WAIT};

/// An HTTP client whose connections come from 127.0.0.`last`.
fn client_from(last: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(IpAddr::from([127, 0, 0, last]))
        .timeout(WAIT)
        .build()
        .expect("build the HTTP client")
}

async fn post_from(
    app: &TestApp,
    client: &reqwest::Client,
    path: &str,
    body: &Value,
) -> reqwest::Response {
    client
        .post(app.url(path))
        .json(body)
        .send()
        .await
        .expect("POST failed")
}

async fn login_from(app: &TestApp, from: u8, username: &str, password: &str) -> reqwest::Response {
    let body = json!({"username": username, "password": password});
    post_from(app, &client_from(from), LOGIN, &body).await
}

fn retry_after(response: &reqwest::Response) -> u64 {
    response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a 429 carries Retry-After in seconds")
}

// ---- finding 2: nobody can lock an account ------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_from_ten_addresses_do_not_lock_the_admin_out() {
    let app =
        spawn_app_with(|s| s.accounts.admin_password = Some(Secret::new(ADMIN_PASSWORD))).await;
    for from in 2..=11 {
        let response = login_from(&app, from, "admin", "wrong-password-1").await;
        assert_error(response, 401, &format!("guess from 127.0.0.{from}")).await;
    }
    // The owner, from an address that has not failed.
    let response = login_from(&app, 12, "admin", ADMIN_PASSWORD).await;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(
        status, 200,
        "the admin logs in from a fresh address: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_failures_from_one_address_are_429_for_that_address() {
    let app =
        spawn_app_with(|s| s.accounts.admin_password = Some(Secret::new(ADMIN_PASSWORD))).await;
    for attempt in 1..=10 {
        let response = login_from(&app, 2, "admin", "wrong-password-1").await;
        assert_error(response, 401, &format!("guess {attempt}")).await;
    }
    let response = login_from(&app, 2, "admin", ADMIN_PASSWORD).await;
    let wait = retry_after(&response);
    assert!((1..=900).contains(&wait), "Retry-After {wait}");
    assert_error(
        response,
        429,
        "the right password from the guessing address",
    )
    .await;
    let response = login_from(&app, 3, "admin", ADMIN_PASSWORD).await;
    assert_eq!(response.status(), 200, "another address is not blocked");
}

// ---- finding 3: signups are limited and never starve logins ---------------------

async fn signup_from(app: &TestApp, from: u8, username: &str) -> reqwest::Response {
    let body = json!({"username": username, "password": "signup-password-1"});
    post_from(app, &client_from(from), SIGNUP, &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sixth_signup_from_one_address_is_429() {
    let app = spawn_app_with(|_| {}).await;
    assert_eq!(app.settings.accounts.signups_per_hour, 5, "the default");
    for n in 1..=5 {
        let response = signup_from(&app, 2, &format!("user{n}")).await;
        assert_eq!(response.status(), 201, "signup {n}");
    }
    let response = signup_from(&app, 2, "user6").await;
    let wait = retry_after(&response);
    assert!((1..=3600).contains(&wait), "Retry-After {wait}");
    assert_error(response, 429, "the sixth signup").await;
    let response = signup_from(&app, 3, "user6").await;
    assert_eq!(response.status(), 201, "another address still signs up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_completes_while_a_signup_flood_is_in_flight() {
    let app = spawn_app_with(|s| {
        s.accounts.admin_password = Some(Secret::new(ADMIN_PASSWORD));
        s.accounts.signups_per_hour = 100;
    })
    .await;
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(64);
    let flood: Vec<_> = (0..24u8)
        .map(|n| {
            let client = client_from(20 + n % 8);
            let url = app.url(SIGNUP);
            let started_tx = started_tx.clone();
            tokio::spawn(async move {
                let _ = started_tx.send(()).await;
                let body =
                    json!({"username": format!("flood{n}"), "password": "signup-password-1"});
                client
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    for _ in 0..flood.len() {
        started_rx.recv().await.expect("a flood task started");
    }
    let response = login_from(&app, 2, "admin", ADMIN_PASSWORD).await;
    assert_eq!(
        response.status(),
        200,
        "the login went through during the flood"
    );
    let still_running = flood.iter().filter(|task| !task.is_finished()).count();
    let statuses: Vec<u16> = futures_util::future::join_all(flood)
        .await
        .into_iter()
        .map(|r| r.expect("task").map_or(0, |s| s))
        .collect();
    assert!(
        statuses.iter().all(|s| [201, 503].contains(s)),
        "signups were answered: {statuses:?} ({still_running} still running at the login)"
    );
}

// ---- finding 9: nobody forges a security alert ------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_security_alert_is_422() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let forged = json!({"type": "system", "data": {
        "message": "API key 'deploy' created by admin", "level": "warning", "category": "security",
    }});
    for path in [
        "/api/v1/ws/broadcast".to_owned(),
        format!("/api/v1/ws/user/{}", "alice"),
    ] {
        let response = app.post_json(&path, Some(&admin), &forged).await;
        let body = assert_error(response, 422, &format!("forged alert to {path}")).await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("data.category"), "{message}");
    }
    // Other categories still pass, and so do the server's own alerts.
    app.broadcast(
        "system",
        json!({"message": "deploy done", "level": "info", "category": "deploys"}),
    )
    .await;
    let mut socket = app.connect(&admin).await;
    socket.connected().await;
    let response = app
        .post_json("/api/v1/api-keys", Some(&admin), &json!({"name": "deploy"}))
        .await;
    assert_eq!(response.status(), 201, "key created");
    let alert = socket.expect_type("system").await;
    assert_eq!(alert["data"]["category"], "security", "{alert}");
}

// ---- finding 12: loose validation ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_optional_fields_are_422_naming_the_field() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let cases = [
        (
            "task_update",
            json!({"task_id": "t1", "status": "running", "progress": null}),
            "data.progress",
        ),
        (
            "task_update",
            json!({"task_id": "t1", "status": "running", "query": null}),
            "data.query",
        ),
        (
            "agent_update",
            json!({"agent_id": "a1", "action": "updated", "name": null}),
            "data.name",
        ),
        (
            "system",
            json!({"message": "m", "level": null}),
            "data.level",
        ),
    ];
    for (kind, data, field) in cases {
        let response = app
            .post_broadcast(&admin, &json!({"type": kind, "data": data}))
            .await;
        let body = assert_error(response, 422, &format!("{kind} with {field}: null")).await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(field),
            "{kind}: the message names {field}: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_value_followed_by_garbage_is_400() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let bodies: [&[u8]; 4] = [
        b"\"\"\0",
        br#"{"type":"a"} x"#,
        br#"{"type":"a"}{"type":"b"}"#,
        b"{\"type\":\"a\"}\0",
    ];
    for body in bodies {
        let response = app
            .post_raw(
                "/api/v1/ws/broadcast",
                Some(&admin),
                Some("application/json"),
                body.to_vec(),
            )
            .await;
        assert_error(
            response,
            400,
            &format!("{:?}", String::from_utf8_lossy(body)),
        )
        .await;
    }
    // Valid JSON of the wrong shape stays 422.
    let response = app
        .post_raw(
            "/api/v1/ws/broadcast",
            Some(&admin),
            Some("application/json"),
            br#"["a", null, null]"#.to_vec(),
        )
        .await;
    assert_error(response, 422, "an array body").await;
}

// ---- finding 10: every error reaches the client on a keep-alive connection --------

/// One HTTP/1.1 response read off a kept-alive connection.
struct RawResponse {
    status: u16,
    /// Lowercased header lines.
    head: String,
    body: String,
}

impl RawResponse {
    fn closes(&self) -> bool {
        self.head.contains("\r\nconnection: close")
    }
}

/// Reads exactly one response (Content-Length or chunked) from `stream`.
async fn read_response(stream: &mut TcpStream) -> Result<RawResponse, String> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) => return Err(format!("closed before a response ({} bytes)", bytes.len())),
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read failed before a response: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    let chunked = head.contains("\r\ntransfer-encoding: chunked");
    let length: Option<usize> = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok());
    let complete = |body: &[u8]| match length {
        Some(n) => body.len() >= n,
        None if chunked => body.ends_with(b"0\r\n\r\n"),
        None => false,
    };
    while !complete(&bytes[head_end..]) {
        match stream.read(&mut chunk).await {
            Ok(0) if length.is_none() && !chunked => break,
            Ok(0) => return Err("closed within the body".into()),
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read failed within the body: {e}")),
        }
    }
    let body = String::from_utf8_lossy(&bytes[head_end..]).into_owned();
    Ok(RawResponse { status, head, body })
}

/// Sends `head` (without its blank line) with a `Content-Length` for `body`,
/// then the body 50 ms later, as a slow client or a busy proxy does.
async fn send_late_body(stream: &mut TcpStream, head: &str, body: &[u8]) {
    let head = format!("{head}\r\nContent-Length: {}\r\n\r\n", body.len());
    stream
        .write_all(head.as_bytes())
        .await
        .expect("write the head");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    // The server may have answered and closed already: then the read says so.
    let _ = stream.write_all(body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_answered_and_keep_the_connection_usable() {
    let app = spawn_app().await;
    let host = format!("Host: {}", app.addr);
    let admin = format!("Authorization: Bearer {}", app.admin_token());
    let user = format!("Authorization: Bearer {}", app.user_token("alice"));
    let json = "Content-Type: application/json";
    let message = br#"{"type":"notification","data":{"n":1}}"#.to_vec();
    let too_large = format!(
        r#"{{"type":"notification","data":"{}"}}"#,
        "x".repeat(app.settings.max_message_bytes + 1024)
    )
    .into_bytes();
    let bad_login = br#"{"username":"admin","password":"wrong-password-1"}"#.to_vec();
    let cases: Vec<(&str, String, Vec<u8>, u16)> = vec![
        ("no token", format!("POST /api/v1/ws/broadcast HTTP/1.1\r\n{host}\r\n{json}"), message.clone(), 401),
        ("forged token", format!("POST /api/v1/ws/broadcast HTTP/1.1\r\n{host}\r\nAuthorization: Bearer a.b.c\r\n{json}"), message.clone(), 401),
        ("user token on publish", format!("POST /api/v1/ws/broadcast HTTP/1.1\r\n{host}\r\n{user}\r\n{json}"), message.clone(), 403),
        ("user token on api-keys", format!("POST /api/v1/api-keys HTTP/1.1\r\n{host}\r\n{user}\r\n{json}"), br#"{"name":"k"}"#.to_vec(), 403),
        ("unknown path", format!("POST /api/v1/nowhere HTTP/1.1\r\n{host}\r\n{admin}\r\n{json}"), message.clone(), 404),
        ("wrong method", format!("PUT /api/v1/ws/broadcast HTTP/1.1\r\n{host}\r\n{admin}\r\n{json}"), message.clone(), 405),
        ("plain text", format!("POST /api/v1/ws/broadcast HTTP/1.1\r\n{host}\r\n{admin}\r\nContent-Type: text/plain"), message.clone(), 415),
        ("malformed JSON", format!("POST /api/v1/ws/broadcast HTTP/1.1\r\n{host}\r\n{admin}\r\n{json}"), b"{\"type\":".to_vec(), 400),
        ("garbage after JSON", format!("POST /api/v1/ws/user/alice HTTP/1.1\r\n{host}\r\n{admin}\r\n{json}"), b"{\"type\":\"a\"} x".to_vec(), 400),
        ("too large", format!("POST /api/v1/ws/broadcast HTTP/1.1\r\n{host}\r\n{admin}\r\n{json}"), too_large, 413),
        ("reserved type", format!("POST /api/v1/ws/broadcast HTTP/1.1\r\n{host}\r\n{admin}\r\n{json}"), br#"{"type":"pong"}"#.to_vec(), 422),
        ("wrong password", format!("POST /api/v1/auth/login HTTP/1.1\r\n{host}\r\n{json}"), bad_login, 401),
        ("accepted publish", format!("POST /api/v1/ws/broadcast HTTP/1.1\r\n{host}\r\n{admin}\r\n{json}"), message.clone(), 202),
    ];
    let mut failures = Vec::new();
    for (what, head, body, status) in &cases {
        let exchange = async {
            let mut stream = TcpStream::connect(app.addr).await.expect("connect");
            send_late_body(&mut stream, head, body).await;
            let first = read_response(&mut stream).await?;
            if first.status != *status {
                return Err(format!(
                    "expected {status}, got {}: {}",
                    first.status, first.body
                ));
            }
            if first.status >= 400 {
                let error: Value = serde_json::from_str(&first.body)
                    .map_err(|e| format!("error body is not JSON ({e}): {}", first.body))?;
                assert_error_shape(&error, what);
            }
            if first.closes() {
                // Said so: the client knows not to reuse the connection.
                return Ok(());
            }
            let again = format!("GET /health HTTP/1.1\r\n{host}\r\n\r\n");
            stream
                .write_all(again.as_bytes())
                .await
                .map_err(|e| format!("second request not sent: {e}"))?;
            let second = read_response(&mut stream)
                .await
                .map_err(|e| format!("no answer to the next request on the connection: {e}"))?;
            if second.status != 200 {
                return Err(format!("next request got {}", second.status));
            }
            Ok::<_, String>(())
        };
        match tokio::time::timeout(WAIT, exchange).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{what}: {e}")),
            Err(_) => failures.push(format!("{what}: timed out")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_long_to_discard_gets_connection_close() {
    let app = spawn_app().await;
    let heads = [
        // Declared far past what the server discards; never sent.
        format!(
            "POST /api/v1/ws/broadcast HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            app.addr,
            64 << 20
        ),
        // Waiting for `100 Continue` before sending the body.
        format!(
            "POST /api/v1/ws/broadcast HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n",
            app.addr
        ),
    ];
    for head in heads {
        let exchange = async {
            let mut stream = TcpStream::connect(app.addr).await.expect("connect");
            stream
                .write_all(head.as_bytes())
                .await
                .expect("write the head");
            read_response(&mut stream).await
        };
        let response = tokio::time::timeout(WAIT, exchange)
            .await
            .expect("answered in time")
            .unwrap_or_else(|e| panic!("{head:?}: {e}"));
        assert_eq!(response.status, 401, "{head:?}: {}", response.body);
        assert!(
            response.closes(),
            "{head:?}: the connection will not be reused, and the response says so: {}",
            response.head
        );
    }
}
