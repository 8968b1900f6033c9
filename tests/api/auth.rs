//! WebSocket authentication (SPEC §2, §4.1, §4.2): both token transports, the
//! 4401 close for bad tokens and at `exp`, and the in-band refresh.

use std::time::Duration;

use agentcast::auth::Role;
use futures_util::SinkExt;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{
    claims, none_alg_token, now_s, sign, spawn_app, with_token_protocol, Event, TestApp, WsClient,
};

/// Bad tokens of every kind, with a name for failure messages.
fn bad_tokens(app: &TestApp) -> Vec<(&'static str, String)> {
    let secret = app.settings.jwt_secret.expose().to_owned();
    let alice = claims("alice", Role::User, "default", 3600);
    vec![
        ("garbage", "not-a-jwt".to_owned()),
        (
            "another secret",
            sign(
                Algorithm::HS256,
                "another-secret-another-secret-another",
                &alice,
            ),
        ),
        ("alg none", none_alg_token(&alice)),
        (
            "HS384 with the right secret",
            sign(Algorithm::HS384, &secret, &alice),
        ),
        (
            "HS512 with the right secret",
            sign(Algorithm::HS512, &secret, &alice),
        ),
        (
            "expired",
            app.mint(&claims("alice", Role::User, "default", -60)),
        ),
        (
            "without exp",
            sign(Algorithm::HS256, &secret, &json!({"sub": "alice"})),
        ),
        (
            "without sub",
            sign(Algorithm::HS256, &secret, &json!({"exp": now_s() + 3600})),
        ),
        (
            "empty sub",
            sign(
                Algorithm::HS256,
                &secret,
                &json!({"sub": "", "exp": now_s() + 3600}),
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subprotocol_transport_is_answered_with_token() {
    let app = spawn_app().await;

    let mut client = app.connect(&app.user_token("alice")).await;

    assert_eq!(
        client.protocol(),
        Some("token"),
        "the server answers the `token` subprotocol"
    );
    let connected = client.connected().await;
    assert_eq!(connected["user_id"], "alice");
    assert_eq!(connected["tenant"], "default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_transport_works_without_a_subprotocol() {
    let app = spawn_app().await;

    let mut client = app.connect_query(&app.user_token("alice")).await;

    assert_eq!(
        client.protocol(),
        None,
        "no subprotocol was offered, none is answered"
    );
    let connected = client.connected().await;
    assert_eq!(connected["user_id"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_another_tenant_connects_into_that_tenant() {
    let app = spawn_app().await;
    let (_client, connected) = app
        .connect_ready(&app.token("alice", Role::Admin, "acme"))
        .await;
    assert_eq!(connected["tenant"], "acme");
    assert_eq!(connected["user_id"], "alice");
}

/// The upgrade completes (answering `token` when it was offered) and the first
/// thing the client sees is a 4401 close, never a `connected` frame.
async fn assert_refused_after_upgrade(mut client: WsClient, what: &str, offered_protocol: bool) {
    if offered_protocol {
        assert_eq!(
            client.protocol(),
            Some("token"),
            "{what}: the 101 must answer the `token` subprotocol"
        );
    }
    match client.next_event().await {
        Event::Closed(code) => assert_eq!(code, Some(4401), "{what}: close code"),
        other => panic!("{what}: expected a 4401 close right after the upgrade, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_closed_with_4401_after_the_upgrade_on_both_transports() {
    let app = spawn_app().await;
    for (what, token) in bad_tokens(&app) {
        let client = app.connect(&token).await;
        assert_refused_after_upgrade(client, &format!("subprotocol, token {what}"), true).await;
        let client = app.connect_query(&token).await;
        assert_refused_after_upgrade(client, &format!("query, token {what}"), false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_token_is_closed_with_4401() {
    let app = spawn_app().await;

    let client = WsClient::open(app.ws_url("").into_client_request().unwrap()).await;
    assert_refused_after_upgrade(client, "no token at all", false).await;

    let client = WsClient::open(app.ws_url("token=").into_client_request().unwrap()).await;
    assert_refused_after_upgrade(client, "empty ?token=", false).await;

    // The `token` subprotocol alone, without the JWT beside it.
    let mut request = app.ws_url("").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "token".parse().unwrap());
    let client = WsClient::open(request).await;
    assert_refused_after_upgrade(client, "subprotocol `token` without a JWT", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_token_beside_a_valid_one_never_lets_its_user_in() {
    let app = spawn_app().await;
    // A forged subprotocol token (mallory) beside a valid query token (alice):
    // which transport wins is the server's choice, so a 4401 or a connection as
    // alice are both fine; a connection as mallory is not.
    let forged = sign(
        Algorithm::HS256,
        "another-secret-another-secret-another",
        &claims("mallory", Role::Admin, "default", 3600),
    );
    let request = with_token_protocol(
        app.ws_url(&format!("token={}", app.user_token("alice")))
            .into_client_request()
            .unwrap(),
        &forged,
    );
    let mut client = WsClient::open(request).await;
    match client.next_event().await {
        Event::Closed(code) => assert_eq!(code, Some(4401)),
        Event::Json(frame) => {
            assert_eq!(frame["type"], "connected", "{frame}");
            assert_eq!(
                frame["data"]["user_id"], "alice",
                "connected as the forged token's user: {frame}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_with_4401_at_its_tokens_exp() {
    let app = spawn_app().await;
    let token = app.mint(&claims("alice", Role::User, "default", 2));

    let (mut client, _) = app.connect_ready(&token).await;

    // Messages flow until then; the close follows at exp (bounded wait).
    app.broadcast("notification", json!({})).await;
    client.expect_type("notification").await;
    client.expect_close(4401).await;
}

/// Sleeps until the wall clock is past `exp_s + margin_s` (a deadline, not a guess:
/// the point is to be past an expiry).
async fn sleep_past(exp_s: u64, margin_s: u64) {
    let target = std::time::UNIX_EPOCH + Duration::from_secs(exp_s + margin_s);
    if let Ok(left) = target.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_band_refresh_extends_the_connection_to_the_new_exp() {
    let app = spawn_app().await;
    let short = claims("alice", Role::User, "default", 2);
    let (mut client, _) = app.connect_ready(&app.mint(&short)).await;
    let longer = claims("alice", Role::User, "default", 8);

    client
        .send_json(&json!({"type": "refresh", "data": {"token": app.mint(&longer)}}))
        .await;

    let refreshed = client.expect_type("refreshed").await;
    assert_eq!(
        refreshed["data"]["exp"], longer.exp,
        "refreshed carries the new exp: {refreshed}"
    );
    // Past the old exp the connection is still served…
    sleep_past(short.exp, 2).await;
    client.assert_alive().await;
    // …and the new exp is enforced in turn.
    client.expect_close(4401).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_gets_an_error_frame_and_the_old_exp_stands() {
    let app = spawn_app().await;
    let secret = app.settings.jwt_secret.expose().to_owned();
    let current = claims("alice", Role::User, "default", 5);
    let (mut client, _) = app.connect_ready(&app.mint(&current)).await;
    let mut earlier = claims("alice", Role::User, "default", 3);
    earlier.exp = earlier.exp.min(current.exp - 1);
    let attempts: Vec<(&str, Value)> = vec![
        (
            "another sub",
            json!({"token": app.mint(&claims("bob", Role::User, "default", 3600))}),
        ),
        (
            "another tenant",
            json!({"token": app.mint(&claims("alice", Role::User, "acme", 3600))}),
        ),
        ("an earlier exp", json!({"token": app.mint(&earlier)})),
        (
            "an expired token",
            json!({"token": app.mint(&claims("alice", Role::User, "default", -60))}),
        ),
        (
            "a forged token",
            json!({"token": sign(Algorithm::HS256, "another-secret-another-secret-another", &claims("alice", Role::User, "default", 3600))}),
        ),
        (
            "alg none",
            json!({"token": none_alg_token(&claims("alice", Role::User, "default", 3600))}),
        ),
        (
            "HS512",
            json!({"token": sign(Algorithm::HS512, &secret, &claims("alice", Role::User, "default", 3600))}),
        ),
        ("garbage", json!({"token": "garbage"})),
        ("a non-string token", json!({"token": 5})),
        ("no token", json!({})),
    ];
    for (what, data) in attempts {
        client
            .send_json(&json!({"type": "refresh", "data": data}))
            .await;
        let frame = client.next_json().await;
        assert_eq!(
            frame["type"], "error",
            "refresh with {what}: expected an error frame, got {frame}"
        );
        assert!(
            frame["data"]["code"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
            "refresh with {what}: {frame}"
        );
        assert!(
            frame["data"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "refresh with {what}: {frame}"
        );
    }
    // Nothing above extended the connection: it still closes at the original exp.
    client.assert_alive().await;
    client.expect_close(4401).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_is_not_a_way_in_for_an_unauthenticated_socket() {
    let app = spawn_app().await;
    // The server closes a bad-token connection at once: a refresh sent right
    // after the upgrade must not turn it into a working connection.
    let mut client = app.connect("garbage").await;
    let refresh =
        json!({"type": "refresh", "data": {"token": app.user_token("alice")}}).to_string();
    // The socket may already be closing: a failed send is fine.
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        client.ws.send(Message::text(refresh)),
    )
    .await;
    let mut saw_connected = false;
    loop {
        match client.next_event().await {
            Event::Json(frame) => saw_connected |= frame["type"] == "connected",
            Event::Closed(code) => {
                assert_eq!(code, Some(4401));
                break;
            }
            Event::Ended(_) => break,
        }
    }
    assert!(
        !saw_connected,
        "a refresh turned a refused socket into a connection"
    );
}
