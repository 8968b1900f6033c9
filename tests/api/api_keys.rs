//! API keys (SPEC §2): the life cycle, who may manage them, where a key may
//! publish (its own tenant, never a WebSocket), and the admins' security alerts.

use std::time::Duration;

use agentcast::auth::Role;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{accepted, assert_error, spawn_app, wait_until, TestApp, WsClient, WAIT};

const KEYS: &str = "/api/v1/api-keys";

/// Creates a key as `admin_token`; returns the 201 body `{id, name, key, created_at}`.
pub(crate) async fn create_key(app: &TestApp, admin_token: &str, name: &str) -> Value {
    let response = app
        .post_json(KEYS, Some(admin_token), &json!({"name": name}))
        .await;
    let status = response.status();
    let cache = response
        .headers()
        .get("cache-control")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = response.json().await.expect("create body is JSON");
    assert_eq!(status, 201, "create key {name}: {body}");
    assert_eq!(
        cache.as_deref(),
        Some("no-store"),
        "the key must not be cached"
    );
    body
}

pub(crate) async fn list_keys(app: &TestApp, token: &str) -> reqwest::Response {
    app.http
        .get(app.url(KEYS))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET api-keys failed")
}

pub(crate) async fn revoke_key(app: &TestApp, token: &str, id: &str) -> reqwest::Response {
    app.http
        .delete(app.url(&format!("{KEYS}/{id}")))
        .bearer_auth(token)
        .send()
        .await
        .expect("DELETE api-key failed")
}

/// A publish authorized by `X-API-Key` instead of `Authorization`.
async fn publish_with_header(
    app: &TestApp,
    path: &str,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    app.http
        .post(app.url(path))
        .header("x-api-key", key)
        .json(body)
        .send()
        .await
        .expect("POST with X-API-Key failed")
}

fn notification(text: &str) -> Value {
    json!({"type": "notification", "data": {"text": text}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_lives_creates_publishes_lists_and_dies_at_once() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let (mut alice, _) = app.connect_ready(&app.user_token("alice")).await;

    let created = create_key(&app, &admin, "deploy bot").await;
    let key = created["key"].as_str().expect("the key, shown once");
    let id = created["id"].as_str().expect("id");
    assert_eq!(created["name"], "deploy bot");
    assert!(created["created_at"].is_string(), "{created}");
    let random = key.strip_prefix("ak_").expect("keys start with ak_");
    assert!(
        random.len() >= 32 && random.chars().all(|c| c.is_ascii_alphanumeric()),
        "ak_ + 32+ base62 characters: {key}"
    );

    // Bearer and X-API-Key both publish, to the whole tenant and to one user.
    let receipt = accepted(app.post_broadcast(key, &notification("one")).await).await;
    let frame = alice.expect_type("notification").await;
    assert_eq!(frame["seq"], receipt["seq"]);
    let response =
        publish_with_header(&app, "/api/v1/ws/user/alice", key, &notification("two")).await;
    accepted(response).await;
    assert_eq!(
        alice.expect_type("notification").await["data"]["text"],
        "two"
    );
    let response = app
        .http
        .get(app.url("/api/v1/ws/user/alice"))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "presence with a key");
    assert_eq!(response.json::<Value>().await.unwrap()["connections"], 1);

    // The list shows it without any secret, with last_used_at once the use is written.
    let mut listed = Value::Null;
    let used = wait_until(WAIT, async || {
        let response = list_keys(&app, &admin).await;
        assert_eq!(response.status(), 200);
        listed = response.json().await.unwrap();
        listed["api_keys"][0]["last_used_at"].is_string()
    })
    .await;
    assert!(used, "last_used_at is set after a publish: {listed}");
    let keys = listed["api_keys"].as_array().expect("api_keys array");
    assert_eq!(keys.len(), 1, "{listed}");
    let entry = &keys[0];
    assert_eq!(entry["id"], id);
    assert_eq!(entry["name"], "deploy bot");
    let prefix = entry["prefix"].as_str().expect("prefix");
    assert!(key.starts_with(prefix) && prefix.len() < 16, "{prefix}");
    assert_eq!(entry["created_at"], created["created_at"]);
    let text = listed.to_string();
    assert!(
        !text.contains(key) && !text.contains(&random[8..]),
        "no key in the list: {text}"
    );
    assert!(
        entry.get("key").is_none()
            && entry.get("hash").is_none()
            && entry.get("key_hash").is_none()
    );

    // Revoked: refused at once, on both transports.
    let response = revoke_key(&app, &admin, id).await;
    assert_eq!(response.status(), 204);
    let response = app.post_broadcast(key, &notification("three")).await;
    assert_error(response, 401, "a revoked key (Bearer)").await;
    let response =
        publish_with_header(&app, "/api/v1/ws/broadcast", key, &notification("four")).await;
    assert_error(response, 401, "a revoked key (X-API-Key)").await;
    let response = revoke_key(&app, &admin, id).await;
    assert_error(response, 404, "revoking twice").await;
    let response = revoke_key(&app, &admin, "no-such-key").await;
    assert_error(response, 404, "revoking an unknown id").await;
    let response = list_keys(&app, &admin).await;
    assert_eq!(
        response.json::<Value>().await.unwrap()["api_keys"],
        json!([])
    );
    assert!(
        alice.assert_alive().await.is_empty(),
        "nothing after the revoke"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admin_tokens_manage_keys() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let user = app.user_token("alice");
    let created = create_key(&app, &admin, "ci").await;
    let key = created["key"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();

    for (who, token, status) in [
        ("user token", user.as_str(), 403),
        ("api key", key, 403),
        ("garbage", "nope", 401),
    ] {
        let response = app
            .post_json(KEYS, Some(token), &json!({"name": "x"}))
            .await;
        assert_error(response, status, &format!("create with {who}")).await;
        assert_error(
            list_keys(&app, token).await,
            status,
            &format!("list with {who}"),
        )
        .await;
        assert_error(
            revoke_key(&app, token, id).await,
            status,
            &format!("revoke with {who}"),
        )
        .await;
    }
    let response = app.post_json(KEYS, None, &json!({"name": "x"})).await;
    assert_error(response, 401, "create without a token").await;
    assert_error(app.get(KEYS).await, 401, "list without a token").await;
    // A key cannot stand in for a token elsewhere either.
    let response = app
        .http
        .get(app.url("/api/v1/auth/me"))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_error(response, 403, "me with an api key").await;

    // Bad bodies.
    let response = app
        .post_raw(KEYS, Some(&admin), Some("application/json"), "{nope")
        .await;
    assert_error(response, 400, "bad JSON").await;
    let response = app
        .post_raw(KEYS, Some(&admin), Some("text/plain"), r#"{"name":"x"}"#)
        .await;
    assert_error(response, 415, "text/plain").await;
    for (what, body) in [
        ("empty name", json!({"name": ""})),
        ("blank name", json!({"name": "   "})),
        ("long name", json!({"name": "n".repeat(101)})),
        ("control characters", json!({"name": "a\u{7}b"})),
        ("missing name", json!({})),
        ("unknown field", json!({"name": "x", "tenant": "acme"})),
    ] {
        let response = app.post_json(KEYS, Some(&admin), &body).await;
        assert_error(response, 422, what).await;
    }
    // Wrong methods.
    let response = app
        .http
        .put(app.url(KEYS))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_error(response, 405, "PUT api-keys").await;
    let response = app
        .http
        .delete(app.url(KEYS))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_error(response, 405, "DELETE api-keys without an id").await;
    let response = app
        .http
        .get(app.url(&format!("{KEYS}/{id}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_error(response, 405, "GET one api key").await;
    // The key still works after all that.
    accepted(app.post_broadcast(key, &notification("ok")).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_publishes_only_in_its_own_tenant() {
    let app = spawn_app().await;
    let acme_admin = app.token("boss", Role::Admin, "acme");
    let globex_admin = app.token("boss", Role::Admin, "globex");
    let key = create_key(&app, &acme_admin, "acme backend").await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut bob_acme, _) = app
        .connect_ready(&app.token("bob", Role::User, "acme"))
        .await;
    let (mut bob_globex, _) = app
        .connect_ready(&app.token("bob", Role::User, "globex"))
        .await;
    let (mut bob_default, _) = app.connect_ready(&app.user_token("bob")).await;

    let receipt = accepted(app.post_user(&key, "bob", &notification("to bob")).await).await;
    assert_eq!(
        receipt["recipients"], 1,
        "only acme's bob is addressed: {receipt}"
    );
    accepted(app.post_broadcast(&key, &notification("to all")).await).await;
    assert_eq!(
        bob_acme.expect_type("notification").await["data"]["text"],
        "to bob"
    );
    assert_eq!(
        bob_acme.expect_type("notification").await["data"]["text"],
        "to all"
    );
    let response = app.get_presence(&key, "bob").await;
    assert_eq!(response.json::<Value>().await.unwrap()["connections"], 1);

    // The request has no say in the tenant: only the key's counts.
    let response = app
        .http
        .post(app.url("/api/v1/ws/user/bob"))
        .header("x-api-key", &key)
        .header("x-tenant", "globex")
        .json(&notification("sneaky"))
        .send()
        .await
        .unwrap();
    accepted(response).await;
    assert_eq!(
        bob_acme.expect_type("notification").await["data"]["text"],
        "sneaky"
    );

    // Another tenant's admin sees nothing of the key and cannot revoke it.
    let listed = list_keys(&app, &globex_admin)
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(listed["api_keys"], json!([]));
    let acme_keys = list_keys(&app, &acme_admin)
        .await
        .json::<Value>()
        .await
        .unwrap();
    let id = acme_keys["api_keys"][0]["id"].as_str().unwrap().to_owned();
    assert_error(
        revoke_key(&app, &globex_admin, &id).await,
        404,
        "revoke from globex",
    )
    .await;
    accepted(app.post_broadcast(&key, &notification("still")).await).await;
    bob_acme.expect_type("notification").await;

    assert!(
        bob_globex.assert_alive().await.is_empty(),
        "globex received nothing"
    );
    assert!(
        bob_default.assert_alive().await.is_empty(),
        "default received nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_never_opens_a_websocket() {
    let app = spawn_app().await;
    let key = create_key(&app, &app.admin_token(), "ws probe").await["key"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut by_protocol = app.connect(&key).await;
    assert_eq!(
        by_protocol.protocol(),
        Some("token"),
        "the subprotocol is still answered"
    );
    by_protocol.expect_close(4401).await;

    let mut by_query = app.connect_query(&key).await;
    by_query.expect_close(4401).await;

    let mut request = app.ws_url("").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-api-key", key.parse().unwrap());
    let mut by_header = WsClient::open(request).await;
    by_header.expect_close(4401).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_are_warned_when_a_key_is_created_or_revoked() {
    let app = spawn_app().await;
    let boss = app.token("boss", Role::Admin, "acme");
    let (mut admin_ws, _) = app.connect_ready(&boss).await;
    let (mut other_admin_ws, _) = app
        .connect_ready(&app.token("deputy", Role::Admin, "acme"))
        .await;
    let (mut user_ws, _) = app
        .connect_ready(&app.token("carol", Role::User, "acme"))
        .await;
    let (mut foreign_admin_ws, _) = app
        .connect_ready(&app.token("boss", Role::Admin, "globex"))
        .await;

    let created = create_key(&app, &boss, "nightly export").await;
    for ws in [&mut admin_ws, &mut other_admin_ws] {
        let alert = ws.expect_type("system").await;
        assert_eq!(alert["data"]["level"], "warning", "{alert}");
        assert_eq!(alert["data"]["category"], "security", "{alert}");
        let message = alert["data"]["message"].as_str().unwrap();
        assert!(
            message.contains("nightly export") && message.contains("created"),
            "{message}"
        );
        assert!(
            !message.contains(created["key"].as_str().unwrap()),
            "no key in the alert"
        );
    }

    let id = created["id"].as_str().unwrap();
    assert_eq!(revoke_key(&app, &boss, id).await.status(), 204);
    for ws in [&mut admin_ws, &mut other_admin_ws] {
        let alert = ws.expect_type("system").await;
        assert_eq!(alert["data"]["level"], "warning");
        assert!(
            alert["data"]["message"]
                .as_str()
                .unwrap()
                .contains("revoked"),
            "{alert}"
        );
    }

    assert!(
        user_ws.assert_alive().await.is_empty(),
        "a user gets no security alert"
    );
    assert!(
        foreign_admin_ws.assert_alive().await.is_empty(),
        "another tenant's admin neither"
    );
    // Nothing else is pending for the admins.
    assert!(admin_ws
        .next_event_within(Duration::from_millis(100))
        .await
        .is_none());
}
