//! The WebSocket protocol of SPEC §4.1–4.2: the `connected` frame, client
//! frames, delivery order, and the close codes 1012, 1003, 1009, 4403, 4408.

use std::time::Duration;

use agentcast::auth::Role;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{seq_of, spawn_app, spawn_app_with, summary, wait_until, Event, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connected_frame_describes_the_connection_and_the_log_head() {
    let app = spawn_app().await;

    let (_first, first) = app.connect_ready(&app.user_token("alice")).await;
    assert_eq!(first["user_id"], "alice", "{first}");
    assert_eq!(first["tenant"], "default", "{first}");
    assert_eq!(first["seq"], 0, "empty log: {first}");
    assert_eq!(first["heartbeat_s"], 25, "{first}");
    assert!(
        first["epoch"].as_str().is_some_and(|e| !e.is_empty()),
        "epoch: {first}"
    );
    assert!(!first["connection_id"].is_null(), "connection_id: {first}");

    for _ in 0..3 {
        app.broadcast("notification", json!({})).await;
    }
    let (_second, second) = app
        .connect_ready(&app.token("bob", Role::User, "default"))
        .await;
    assert_eq!(second["seq"], 3, "seq is the tenant log's head: {second}");
    assert_eq!(second["epoch"], first["epoch"], "same log, same epoch");
    assert_ne!(
        second["connection_id"], first["connection_id"],
        "each connection has its own id"
    );

    let (_third, third) = app
        .connect_ready(&app.token("carol", Role::User, "acme"))
        .await;
    assert_eq!(third["seq"], 0, "another tenant has its own log: {third}");
    assert_eq!(third["tenant"], "acme");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ping_gets_a_pong_with_a_timestamp() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_ready(&app.user_token("alice")).await;

    client.send_json(&json!({"type": "ping"})).await;

    let pong = client.expect_type("pong").await;
    assert!(!pong["data"]["ts"].is_null(), "pong carries ts: {pong}");
    // Extra fields on a client frame are ignored.
    client
        .send_json(&json!({"type": "ping", "data": {"x": 1}, "extra": true}))
        .await;
    client.expect_type("pong").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_get_error_frames_and_the_connection_stays_open() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_ready(&app.user_token("alice")).await;
    // Deeper than any JSON parser's recursion limit, well within MAX_MESSAGE_BYTES.
    let deep = format!(
        r#"{{"type":"ping","data":{}{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let garbage = [
        "not json",
        "",
        "{",
        "[1,2,3]",
        "42",
        "null",
        "{}",
        r#"{"type":5}"#,
        r#"{"type":"subscribe","data":{}}"#,
        r#"{"type":"connected"}"#,
        r#"{"type":"PING"}"#,
        r#"{"type":"refresh"}"#,
        r#"{"type":"refresh","data":"x"}"#,
        &deep,
    ];
    for text in garbage {
        client.send_text(text).await;
        let text = &text[..text.len().min(40)];
        let frame = client.next_json().await;
        assert_eq!(
            frame["type"], "error",
            "frame {text:?}: expected an error frame, got {frame}"
        );
        let code = frame["data"]["code"].as_str().unwrap_or_default();
        assert!(
            !code.is_empty(),
            "frame {text:?}: error without code: {frame}"
        );
        assert!(
            frame["data"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "frame {text:?}: {frame}"
        );
    }
    client.assert_alive().await;
    // Still subscribed, too.
    let receipt = app.broadcast("notification", json!({})).await;
    assert_eq!(client.next_json().await["seq"], receipt["seq"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_frame_closes_with_1003() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_ready(&app.user_token("alice")).await;

    client.send(Message::binary(vec![1u8, 2, 3])).await;

    client.expect_close(1003).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_max_message_bytes_closes_with_1009() {
    let app = spawn_app_with(|s| s.max_message_bytes = 1024).await;
    let (mut client, _) = app.connect_ready(&app.user_token("alice")).await;

    // Just under the limit is fine.
    let padded = json!({"type": "ping", "pad": "x".repeat(900)}).to_string();
    assert!(padded.len() <= 1024);
    client.send_text(&padded).await;
    client.expect_type("pong").await;

    client
        .send_text(&json!({"type": "ping", "pad": "x".repeat(2000)}).to_string())
        .await;
    client.expect_close(1009).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_not_listed_is_closed_with_4403() {
    let app = spawn_app_with(|s| {
        s.allowed_origins = Some(vec![
            "https://app.example.com".to_owned(),
            "http://localhost:3000".to_owned(),
        ])
    })
    .await;
    let token = app.user_token("alice");

    let mut evil = app
        .connect_with_headers(&token, &[("Origin", "https://evil.example.com")])
        .await;
    match evil.next_event().await {
        Event::Closed(code) => assert_eq!(code, Some(4403)),
        other => panic!("origin not allowed: expected a 4403 close first, got {other:?}"),
    }
    let mut lookalike = app
        .connect_with_headers(&token, &[("Origin", "https://app.example.com.evil.net")])
        .await;
    lookalike.expect_close(4403).await;

    for origin in ["https://app.example.com", "http://localhost:3000"] {
        let mut good = app
            .connect_with_headers(&token, &[("Origin", origin)])
            .await;
        assert_eq!(
            good.connected().await["user_id"],
            "alice",
            "origin {origin}"
        );
    }
    // No Origin header (not a browser): allowed.
    let (_plain, connected) = app.connect_ready(&token).await;
    assert_eq!(connected["user_id"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_origin_is_allowed_when_none_are_configured() {
    let app = spawn_app().await;
    let mut client = app
        .connect_with_headers(
            &app.user_token("alice"),
            &[("Origin", "https://anything.example")],
        )
        .await;
    client.connected().await;
}

/// A client that never reads never answers the server's pings: closed with 4408.
/// A client that keeps reading (and so answers pings) stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_with_4408_and_a_live_one_stays() {
    let app = spawn_app_with(|s| {
        s.ping_interval = Duration::from_secs(1);
        s.idle_timeout = Duration::from_secs(2);
    })
    .await;
    let (mut silent, _) = app.connect_ready(&app.user_token("silent")).await;
    let (mut live, _) = app.connect_ready(&app.user_token("live")).await;

    // The live client reads continuously (tungstenite answers Pings while reading)
    // until told to stop; it hands its socket back.
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let mut pings = 0u32;
        loop {
            tokio::select! {
                _ = &mut stop_rx => return (live, pings, None),
                next = live.ws.next() => match next {
                    Some(Ok(Message::Ping(_))) => pings += 1,
                    Some(Ok(Message::Text(_) | Message::Pong(_) | Message::Binary(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Close(frame))) => return (live, pings, Some(format!("closed: {frame:?}"))),
                    Some(Err(e)) => return (live, pings, Some(format!("error: {e}"))),
                    None => return (live, pings, Some("ended".to_owned())),
                },
            }
        }
    });

    // The server drops the silent one: wait for that outcome, without reading it.
    let dropped = wait_until(WAIT + Duration::from_secs(5), async || {
        app.stat("current_connections").await == 1
    })
    .await;
    assert!(
        dropped,
        "the silent connection was not closed (current_connections never reached 1)"
    );

    stop_tx.send(()).unwrap();
    let (mut live, pings, ended) = reader.await.unwrap();
    assert_eq!(ended, None, "the live client was closed too");
    assert!(
        pings >= 1,
        "the server sends Ping frames every PING_INTERVAL"
    );
    live.assert_alive().await;

    silent.expect_close(4408).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seq_is_strictly_increasing_and_each_message_arrives_once() {
    let app = spawn_app().await;
    let (mut alice, _) = app.connect_ready(&app.user_token("alice")).await;
    let mut expected = Vec::new();
    for i in 0..60 {
        let receipt = match i % 3 {
            0 => app.broadcast("notification", json!({"i": i})).await,
            1 => {
                app.send_to_user("alice", "notification", json!({"i": i}))
                    .await
            }
            _ => {
                app.send_to_user("bob", "notification", json!({"i": i}))
                    .await
            }
        };
        if i % 3 != 2 {
            expected.push(seq_of(&receipt));
        }
    }
    let mut received = Vec::new();
    while received.len() < expected.len() {
        received.push(seq_of(&alice.next_json().await));
    }
    assert_eq!(
        received, expected,
        "alice gets her messages once each, in seq order"
    );
    assert!(received.windows(2).all(|w| w[0] < w[1]));
    // Nothing else is pending: the next frame is the pong.
    let extra = alice.assert_alive().await;
    assert!(
        extra.is_empty(),
        "unexpected extra frames: {}",
        summary(&extra)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_every_client_with_1012_and_serve_returns() {
    let mut app = spawn_app_with(|s| s.shutdown_timeout = Duration::from_secs(5)).await;
    let (mut alice, _) = app.connect_ready(&app.user_token("alice")).await;
    let (mut bob, _) = app
        .connect_ready(&app.token("bob", Role::User, "acme"))
        .await;
    let addr = app.addr;

    let served = app.shutdown();
    let closes = async {
        alice.expect_close(1012).await;
        bob.expect_close(1012).await;
    };
    let (served, ()) = tokio::join!(served, closes);

    served.expect("serve() returns Ok after the drain");
    // The listener is gone.
    let refused = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr)).await;
    assert!(
        matches!(refused, Ok(Err(_))),
        "the server still accepts TCP connections after serve() returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_no_clients_returns_promptly() {
    let mut app = spawn_app().await;
    // Outcome only: serve() returns (bounded by SHUTDOWN_TIMEOUT + WAIT in the helper).
    app.shutdown().await.expect("serve() returns Ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_client_is_unregistered() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let (client, _) = app.connect_ready(&app.user_token("alice")).await;
    client.close().await;
    let mut last = Value::Null;
    let gone = wait_until(WAIT, async || {
        last = app
            .get_presence(&admin, "alice")
            .await
            .json()
            .await
            .unwrap();
        last["connections"] == 0
    })
    .await;
    assert!(gone, "presence after close: {last}");
    let receipt = app.broadcast("notification", json!({})).await;
    assert_eq!(receipt["recipients"], 0, "{receipt}");

    // A connection dropped without a close frame is unregistered too.
    let (client, _) = app.connect_ready(&app.user_token("alice")).await;
    drop(client);
    app.wait_for_stat("current_connections", |n| n == 0).await;
}
