//! The publish endpoints and presence (SPEC §3): the 202 receipt, who receives
//! what, and every documented error of a publish request.

use agentcast::auth::Role;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

use crate::helpers::{
    accepted, assert_error, claims, none_alg_token, raw_http, seq_of, sign, spawn_app, TestApp,
    WAIT,
};

const BROADCAST: &str = "/api/v1/ws/broadcast";

fn is_uuid(value: &Value) -> bool {
    value
        .as_str()
        .is_some_and(|s| uuid::Uuid::parse_str(s).is_ok())
}

/// A delivered frame has the fixed fields of SPEC §4.2 and `ts` in RFC 3339 UTC with milliseconds.
fn assert_delivered(frame: &Value, kind: &str, data: &Value, receipt: &Value) {
    assert_eq!(frame["type"], kind, "{frame}");
    assert_eq!(&frame["data"], data, "{frame}");
    assert_eq!(
        frame["id"], receipt["id"],
        "frame id is the 202 id: {frame}"
    );
    assert_eq!(
        frame["seq"], receipt["seq"],
        "frame seq is the 202 seq: {frame}"
    );
    let ts = frame["ts"]
        .as_str()
        .unwrap_or_else(|| panic!("ts is not a string: {frame}"));
    let bytes = ts.as_bytes();
    assert!(
        ts.len() == 24
            && ts.ends_with('Z')
            && bytes[10] == b'T'
            && bytes[19] == b'.'
            && bytes[20..23].iter().all(u8::is_ascii_digit),
        "ts {ts:?} is not RFC 3339 UTC with milliseconds (e.g. 2026-01-01T00:00:00.000Z)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_connection_of_the_tenant_with_a_receipt() {
    let app = spawn_app().await;
    let (mut alice1, _) = app.connect_ready(&app.user_token("alice")).await;
    let (mut alice2, _) = app.connect_ready(&app.user_token("alice")).await;
    let (mut bob, _) = app.connect_ready(&app.user_token("bob")).await;
    let (mut carol, _) = app
        .connect_ready(&app.token("carol", Role::User, "other"))
        .await;
    let data = json!({"text": "hello", "nested": {"n": [1, 2, 3]}});

    let receipt = app.broadcast("notification", data.clone()).await;

    assert!(is_uuid(&receipt["id"]), "id is a uuid: {receipt}");
    assert_eq!(receipt["seq"], 1, "first message of the tenant: {receipt}");
    assert_eq!(
        receipt["recipients"], 3,
        "three connections in tenant default: {receipt}"
    );
    for client in [&mut alice1, &mut alice2, &mut bob] {
        let frame = client.next_json().await;
        assert_delivered(&frame, "notification", &data, &receipt);
    }
    // carol is in another tenant: her next frame is her own tenant's message.
    let other = app.token("admin-other", Role::Admin, "other");
    let theirs = accepted(
        app.post_broadcast(
            &other,
            &json!({"type": "notification", "data": {"t": "other"}}),
        )
        .await,
    )
    .await;
    assert_eq!(theirs["seq"], 1, "tenants have their own seq: {theirs}");
    assert_eq!(theirs["recipients"], 1);
    let frame = carol.next_json().await;
    assert_eq!(
        frame["data"]["t"], "other",
        "carol got another tenant's message: {frame}"
    );

    let second = app.broadcast("notification", json!({})).await;
    assert_eq!(second["seq"], 2, "{second}");
    assert_ne!(second["id"], receipt["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_user_reaches_every_tab_of_that_user_and_nobody_else() {
    let app = spawn_app().await;
    let mut alice = Vec::new();
    for _ in 0..3 {
        alice.push(app.connect_ready(&app.user_token("alice")).await.0);
    }
    let (mut bob, _) = app.connect_ready(&app.user_token("bob")).await;
    // Same user id in another tenant: a different person.
    let (mut other_alice, _) = app
        .connect_ready(&app.token("alice", Role::User, "other"))
        .await;
    let data = json!({"for": "alice"});

    let receipt = app
        .send_to_user("alice", "notification", data.clone())
        .await;

    assert!(is_uuid(&receipt["id"]), "{receipt}");
    assert_eq!(receipt["recipients"], 3, "alice has three tabs: {receipt}");
    for tab in &mut alice {
        let frame = tab.next_json().await;
        assert_delivered(&frame, "notification", &data, &receipt);
    }
    // A broadcast after it: bob's next frame must be the broadcast, not alice's message.
    let sentinel = app
        .broadcast("notification", json!({"sentinel": true}))
        .await;
    let frame = bob.next_json().await;
    assert_eq!(
        frame["seq"], sentinel["seq"],
        "bob received a message for alice: {frame}"
    );
    let other = app.token("admin-other", Role::Admin, "other");
    accepted(
        app.post_broadcast(
            &other,
            &json!({"type": "notification", "data": {"sentinel": "other"}}),
        )
        .await,
    )
    .await;
    let frame = other_alice.next_json().await;
    assert_eq!(
        frame["data"]["sentinel"], "other",
        "alice of another tenant received it: {frame}"
    );

    let nobody = app.send_to_user("nobody", "notification", json!({})).await;
    assert_eq!(nobody["recipients"], 0, "{nobody}");
    assert_eq!(
        seq_of(&nobody),
        seq_of(&sentinel) + 1,
        "a message to an offline user still takes a seq"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_reports_whether_a_user_is_online_and_with_how_many_connections() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let (_tab1, _) = app.connect_ready(&app.user_token("alice")).await;
    let (tab2, _) = app.connect_ready(&app.user_token("alice")).await;

    let response = app.get_presence(&admin, "alice").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"user_id": "alice", "online": true, "connections": 2})
    );

    let response = app.get_presence(&admin, "nobody").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"user_id": "nobody", "online": false, "connections": 0})
    );

    tab2.close().await;
    let mut last = Value::Null;
    let dropped = crate::helpers::wait_until(WAIT, async || {
        last = app
            .get_presence(&admin, "alice")
            .await
            .json()
            .await
            .unwrap();
        last["connections"] == 1
    })
    .await;
    assert!(dropped, "presence did not drop to one connection: {last}");
    assert_eq!(last["online"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_presence_need_credentials() {
    let app = spawn_app().await;
    let body = json!({"type": "notification", "data": {}});
    for path in [BROADCAST, "/api/v1/ws/user/alice"] {
        let response = app.post_json(path, None, &body).await;
        assert_error(response, 401, &format!("POST {path} without a token")).await;
        let response = app.post_json(path, Some("garbage"), &body).await;
        assert_error(response, 401, &format!("POST {path} with a garbage token")).await;
        let response = app
            .http
            .post(app.url(path))
            .header(
                reqwest::header::AUTHORIZATION,
                format!("Basic {}", app.admin_token()),
            )
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_error(
            response,
            401,
            &format!("POST {path} with a non-Bearer scheme"),
        )
        .await;
    }
    let response = app.get("/api/v1/ws/user/alice").await;
    assert_error(response, 401, "GET presence without a token").await;
    let response = app.get_presence("garbage", "alice").await;
    assert_error(response, 401, "GET presence with a garbage token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_token_is_forbidden_on_admin_endpoints() {
    let app = spawn_app().await;
    let user = app.user_token("alice");
    let body = json!({"type": "notification", "data": {}});

    assert_error(
        app.post_broadcast(&user, &body).await,
        403,
        "user token: broadcast",
    )
    .await;
    assert_error(
        app.post_user(&user, "bob", &body).await,
        403,
        "user token: to-user",
    )
    .await;
    assert_error(
        app.post_user(&user, "alice", &body).await,
        403,
        "user token: to self",
    )
    .await;
    assert_error(
        app.get_presence(&user, "bob").await,
        403,
        "user token: presence",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_unsigned_tokens_are_refused_with_401() {
    let app = spawn_app().await;
    let secret = app.settings.jwt_secret.expose().to_owned();
    let admin = claims("admin", Role::Admin, "default", 3600);
    let forged = [
        (
            "another secret",
            sign(
                Algorithm::HS256,
                "another-secret-another-secret-another",
                &admin,
            ),
        ),
        ("alg none", none_alg_token(&admin)),
        (
            "HS384 with the right secret",
            sign(Algorithm::HS384, &secret, &admin),
        ),
        (
            "HS512 with the right secret",
            sign(Algorithm::HS512, &secret, &admin),
        ),
        (
            "expired",
            app.mint(&claims("admin", Role::Admin, "default", -60)),
        ),
        (
            "without exp",
            sign(
                Algorithm::HS256,
                &secret,
                &json!({"sub": "admin", "role": "admin", "tenant": "default"}),
            ),
        ),
        (
            "without sub",
            sign(
                Algorithm::HS256,
                &secret,
                &json!({"exp": crate::helpers::now_s() + 3600, "role": "admin"}),
            ),
        ),
        ("truncated signature", {
            let token = app.admin_token();
            token[..token.len() - 4].to_owned()
        }),
        ("tampered payload", {
            // The signature of a user token over an admin payload.
            let user = app.user_token("admin");
            let admin = app.admin_token();
            let mut parts: Vec<&str> = admin.split('.').collect();
            parts[2] = user.split('.').nth(2).unwrap();
            parts.join(".")
        }),
    ];
    let body = json!({"type": "notification", "data": {}});
    for (what, token) in &forged {
        assert_error(
            app.post_broadcast(token, &body).await,
            401,
            &format!("broadcast, token {what}"),
        )
        .await;
        assert_error(
            app.post_user(token, "bob", &body).await,
            401,
            &format!("to-user, token {what}"),
        )
        .await;
        assert_error(
            app.get_presence(token, "bob").await,
            401,
            &format!("presence, token {what}"),
        )
        .await;
    }
    // The real thing works, so the refusals above are about the tokens.
    accepted(app.post_broadcast(&app.admin_token(), &body).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_empty_json_is_400() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let mut wrong = Vec::new();
    for body in [
        "",
        "{",
        "{\"type\":",
        "not json",
        "{\"type\":\"a\",\"data\":}",
        "{\"type\":\"a\"}}",
    ] {
        for path in [BROADCAST, "/api/v1/ws/user/alice"] {
            let response = app
                .post_raw(path, Some(&admin), Some("application/json"), body)
                .await;
            if response.status() != 400 {
                wrong.push(format!(
                    "POST {path} {body:?} -> {} {}",
                    response.status(),
                    response.text().await.unwrap()
                ));
                continue;
            }
            assert_error(response, 400, &format!("POST {path} with body {body:?}")).await;
        }
    }
    assert!(
        wrong.is_empty(),
        "expected 400 for each malformed body:\n{}",
        wrong.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_type_other_than_json_is_415() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let body = r#"{"type":"notification","data":{}}"#;
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/xml",
        "text/json",
    ] {
        let response = app
            .post_raw(BROADCAST, Some(&admin), Some(content_type), body)
            .await;
        assert_error(response, 415, &format!("Content-Type {content_type}")).await;
    }
    // Parameters are allowed.
    let response = app
        .post_raw(
            BROADCAST,
            Some(&admin),
            Some("application/json; charset=utf-8"),
            body,
        )
        .await;
    accepted(response).await;
}

/// A publish body of exactly `len` bytes.
fn body_of_len(len: usize) -> String {
    let empty = r#"{"type":"notification","data":{"pad":""}}"#;
    let body = format!(
        r#"{{"type":"notification","data":{{"pad":"{}"}}}}"#,
        "x".repeat(len - empty.len())
    );
    assert_eq!(body.len(), len);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_max_message_bytes_is_413() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let limit = app.settings.max_message_bytes;

    let at_limit = app
        .post_raw(
            BROADCAST,
            Some(&admin),
            Some("application/json"),
            body_of_len(limit),
        )
        .await;
    accepted(at_limit).await;

    for len in [limit + 1, 4 * limit] {
        for path in [BROADCAST, "/api/v1/ws/user/alice"] {
            let response = app
                .post_raw(
                    path,
                    Some(&admin),
                    Some("application/json"),
                    body_of_len(len),
                )
                .await;
            assert_error(
                response,
                413,
                &format!("POST {path} with {len} bytes (limit {limit})"),
            )
            .await;
        }
    }
}

/// A request with `Transfer-Encoding: chunked`: no length up front.
fn chunked_publish(app: &TestApp, body: &str) -> String {
    let mut request = format!(
        "POST {BROADCAST} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        app.addr,
        app.admin_token()
    );
    for chunk in body.as_bytes().chunks(8192) {
        request.push_str(&format!(
            "{:x}\r\n{}\r\n",
            chunk.len(),
            std::str::from_utf8(chunk).unwrap()
        ));
    }
    request.push_str("0\r\n\r\n");
    request
}

/// The limit holds for bodies without a Content-Length too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_is_413() {
    let app = spawn_app().await;
    let request = chunked_publish(&app, &body_of_len(app.settings.max_message_bytes + 1));

    let (status, body) = raw_http(app.addr, request.as_bytes()).await;

    assert_eq!(status, 413, "chunked body over the limit: {body}");
    crate::helpers::assert_error_shape(
        &serde_json::from_str(&body).expect("413 body is JSON"),
        "chunked 413",
    );
}

/// A small chunked body (what `curl -T -` or a streaming client sends) is an ordinary publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_chunked_body_is_accepted() {
    let app = spawn_app().await;
    let request = chunked_publish(&app, r#"{"type":"notification","data":{"n":1}}"#);

    let (status, body) = raw_http(app.addr, request.as_bytes()).await;

    assert_eq!(status, 202, "small chunked body: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_type_must_match_the_pattern() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let too_long = format!("a{}", "b".repeat(64));
    let invalid: Vec<Value> = vec![
        json!(""),
        json!("Notification"),
        json!("1abc"),
        json!("_abc"),
        json!("has space"),
        json!("ünïcode"),
        json!("a/b"),
        json!(too_long),
        json!(5),
        json!(null),
        json!({"nested": "x"}),
    ];
    for kind in invalid {
        let response = app
            .post_broadcast(&admin, &json!({"type": kind, "data": {}}))
            .await;
        let body = assert_error(response, 422, &format!("type {kind}")).await;
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("type"),
            "the message names the field `type`: {message:?}"
        );
    }
    let missing = app.post_broadcast(&admin, &json!({"data": {}})).await;
    let body = assert_error(missing, 422, "no type").await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("type"),
        "{body}"
    );

    let longest = format!("a{}", "b".repeat(63));
    for kind in ["a", "x9", "custom_event", "a.b:c-d_e", longest.as_str()] {
        let response = app
            .post_broadcast(&admin, &json!({"type": kind, "data": {}}))
            .await;
        accepted(response).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_own_types_cannot_be_published() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    for kind in ["connected", "pong", "replay", "refreshed", "error"] {
        let body = json!({"type": kind, "data": {}});
        let response = app.post_broadcast(&admin, &body).await;
        assert_error(response, 422, &format!("broadcast of reserved type {kind}")).await;
        let response = app.post_user(&admin, "alice", &body).await;
        assert_error(response, 422, &format!("to-user of reserved type {kind}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_types_are_validated_naming_the_field() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let cases = [
        ("task_update", json!({"status": "queued"}), "task_id"),
        (
            "task_update",
            json!({"task_id": "", "status": "queued"}),
            "task_id",
        ),
        (
            "task_update",
            json!({"task_id": 7, "status": "queued"}),
            "task_id",
        ),
        ("task_update", json!({"task_id": "t1"}), "status"),
        (
            "task_update",
            json!({"task_id": "t1", "status": "done"}),
            "status",
        ),
        (
            "task_update",
            json!({"task_id": "t1", "status": 1}),
            "status",
        ),
        (
            "task_update",
            json!({"task_id": "t1", "status": "running", "progress": 101}),
            "progress",
        ),
        (
            "task_update",
            json!({"task_id": "t1", "status": "running", "progress": -1}),
            "progress",
        ),
        (
            "task_update",
            json!({"task_id": "t1", "status": "running", "progress": "50"}),
            "progress",
        ),
        (
            "task_update",
            json!({"task_id": "t1", "status": "running", "query": 5}),
            "query",
        ),
        ("task_update", json!("not an object"), "data"),
        ("agent_update", json!({"action": "registered"}), "agent_id"),
        (
            "agent_update",
            json!({"agent_id": "", "action": "registered"}),
            "agent_id",
        ),
        ("agent_update", json!({"agent_id": "a1"}), "action"),
        (
            "agent_update",
            json!({"agent_id": "a1", "action": "created"}),
            "action",
        ),
        (
            "agent_update",
            json!({"agent_id": "a1", "action": "updated", "name": 3}),
            "name",
        ),
        ("system", json!({}), "message"),
        ("system", json!({"message": ""}), "message"),
        ("system", json!({"message": 5}), "message"),
        (
            "system",
            json!({"message": "hi", "level": "critical"}),
            "level",
        ),
        ("system", json!({"message": "hi", "level": 1}), "level"),
    ];
    for (kind, data, field) in cases {
        let response = app
            .post_broadcast(&admin, &json!({"type": kind, "data": data}))
            .await;
        let body = assert_error(response, 422, &format!("{kind} with data {data}")).await;
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{kind} with data {data}: message {message:?} does not name `{field}`"
        );
    }
    // A missing `data` on a validated type is a missing field too.
    let response = app
        .post_broadcast(&admin, &json!({"type": "task_update"}))
        .await;
    assert_error(response, 422, "task_update without data").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_known_types_and_custom_types_are_delivered_as_sent() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_ready(&app.user_token("alice")).await;
    let messages = [
        ("task_update", json!({"task_id": "t1", "status": "queued"})),
        (
            "task_update",
            json!({"task_id": "t1", "status": "running", "progress": 0, "query": "q"}),
        ),
        (
            "task_update",
            json!({"task_id": "t1", "status": "running", "progress": 42.5}),
        ),
        (
            "task_update",
            json!({"task_id": "t1", "status": "completed", "progress": 100}),
        ),
        ("task_update", json!({"task_id": "t2", "status": "failed"})),
        (
            "agent_update",
            json!({"agent_id": "a1", "action": "registered", "name": "Scout"}),
        ),
        (
            "agent_update",
            json!({"agent_id": "a1", "action": "updated"}),
        ),
        (
            "agent_update",
            json!({"agent_id": "a1", "action": "deleted"}),
        ),
        (
            "system",
            json!({"message": "deploy at noon", "level": "warning"}),
        ),
        ("system", json!({"message": "hello"})),
        ("system", json!({"message": "ok", "level": "success"})),
        (
            "custom_event",
            json!([1, "two", {"three": 3.5}, null, true]),
        ),
        ("notification", json!("just a string")),
        ("notification", json!(null)),
    ];
    for (kind, data) in &messages {
        let receipt = app.broadcast(kind, data.clone()).await;
        let frame = client.next_json().await;
        assert_eq!(frame["type"], *kind, "{frame}");
        assert_eq!(frame["seq"], receipt["seq"], "{frame}");
        if *kind == "system" && data.get("level").is_none() {
            // `level` defaults to info: absent or filled in, never anything else.
            let level = &frame["data"]["level"];
            assert!(level.is_null() || level == "info", "default level: {frame}");
            assert_eq!(frame["data"]["message"], data["message"]);
        } else {
            assert_eq!(&frame["data"], data, "data passes through unchanged");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_json_of_the_wrong_shape_is_422() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    for body in [
        "[]",
        "[{\"type\":\"a\",\"data\":{}}]",
        "\"notification\"",
        "5",
        "true",
        "{}",
    ] {
        let response = app
            .post_raw(BROADCAST, Some(&admin), Some("application/json"), body)
            .await;
        assert_error(response, 422, &format!("body {body}")).await;
    }
}

/// Unknown top-level fields are valid JSON: ignored (202) or refused as a rule (422), never a 400 or 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_ignored_or_a_422() {
    let app = spawn_app().await;
    let response = app
        .post_broadcast(
            &app.admin_token(),
            &json!({"type": "notification", "data": {}, "extra": 1}),
        )
        .await;
    match response.status().as_u16() {
        202 => {}
        422 => {
            assert_error(response, 422, "unknown field").await;
        }
        other => panic!(
            "unknown top-level field: status {other}, body {}",
            response.text().await.unwrap()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_bodies_are_refused_and_the_server_stays_up() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let depth = 5_000;
    let body = format!(
        r#"{{"type":"notification","data":{}{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let response = app
        .post_raw(BROADCAST, Some(&admin), Some("application/json"), body)
        .await;
    let status = response.status().as_u16();
    assert!(
        [400, 413, 422].contains(&status),
        "nested body: status {status}"
    );
    assert_error(response, status, "deeply nested body").await;
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_user_ids_get_a_client_error() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let body = json!({"type": "notification", "data": {}});
    let long = "u".repeat(300);
    for user in [long.as_str(), "%00", "bad%0Aid"] {
        let response = app.post_user(&admin, user, &body).await;
        let status = response.status().as_u16();
        assert!(
            [400, 404, 422].contains(&status),
            "POST to user {user:?}: status {status}"
        );
        assert_error(response, status, &format!("POST to user {user:?}")).await;
        let response = app.get_presence(&admin, user).await;
        let status = response.status().as_u16();
        assert!(
            [400, 404, 422].contains(&status),
            "presence of {user:?}: status {status}"
        );
        assert_error(response, status, &format!("presence of {user:?}")).await;
    }
}

/// `userID` is a path segment: a user id with characters a URL escapes is found by its decoded form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_ids_in_the_path_are_percent_decoded() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    for user in ["jane doe", "a.b-c_d@example.com", "zoë"] {
        let (mut client, connected) = app.connect_ready(&app.user_token(user)).await;
        assert_eq!(connected["user_id"], user);
        let escaped: String = user
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let receipt = accepted(
            app.post_user(
                &admin,
                &escaped,
                &json!({"type": "notification", "data": {}}),
            )
            .await,
        )
        .await;
        assert_eq!(
            receipt["recipients"], 1,
            "POST /api/v1/ws/user/{escaped} must address {user:?}: {receipt}"
        );
        assert_eq!(client.next_json().await["seq"], receipt["seq"]);
        let presence: Value = app
            .get_presence(&admin, &escaped)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            presence,
            json!({"user_id": user, "online": true, "connections": 1})
        );
    }
}

/// An admin acts in its own tenant only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_for_publish_and_presence() {
    let app = spawn_app().await;
    let (mut alice_a, _) = app
        .connect_ready(&app.token("alice", Role::User, "tenant-a"))
        .await;
    let (mut bob_b, _) = app
        .connect_ready(&app.token("bob", Role::User, "tenant-b"))
        .await;
    let admin_a = app.token("admin-a", Role::Admin, "tenant-a");
    let admin_b = app.token("admin-b", Role::Admin, "tenant-b");
    let body = json!({"type": "notification", "data": {"from": "b"}});

    // B's admin addresses alice and everyone: none of it reaches tenant A.
    let to_alice = accepted(app.post_user(&admin_b, "alice", &body).await).await;
    assert_eq!(
        to_alice["recipients"], 0,
        "alice is not in tenant B: {to_alice}"
    );
    let broadcast_b = accepted(app.post_broadcast(&admin_b, &body).await).await;
    assert_eq!(
        broadcast_b["recipients"], 1,
        "only bob is in tenant B: {broadcast_b}"
    );
    assert_eq!(bob_b.next_json().await["seq"], broadcast_b["seq"]);

    // B's admin cannot see A's presence.
    let presence: Value = app
        .get_presence(&admin_b, "alice")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        presence,
        json!({"user_id": "alice", "online": false, "connections": 0})
    );
    let presence: Value = app
        .get_presence(&admin_a, "alice")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        presence,
        json!({"user_id": "alice", "online": true, "connections": 1})
    );

    // alice's next frame is A's own message: nothing from B came before it.
    let own = accepted(
        app.post_broadcast(
            &admin_a,
            &json!({"type": "notification", "data": {"from": "a"}}),
        )
        .await,
    )
    .await;
    let frame = alice_a.next_json().await;
    assert_eq!(
        frame["data"]["from"], "a",
        "tenant A received a message of tenant B: {frame}"
    );
    assert_eq!(frame["seq"], own["seq"]);
    assert_eq!(own["seq"], 1, "tenant A's log is its own: {own}");

    // An unknown tenant's admin is just an admin of an empty tenant.
    let admin_c: String = app.token("admin-c", Role::Admin, "tenant-c");
    let receipt = accepted(app.post_broadcast(&admin_c, &body).await).await;
    assert_eq!(receipt["recipients"], 0);
}

/// Shared with the other modules: broadcasts `n` notifications and returns their seqs.
pub async fn broadcast_n(app: &TestApp, n: usize) -> Vec<u64> {
    let mut seqs = Vec::with_capacity(n);
    for i in 0..n {
        seqs.push(seq_of(
            &app.broadcast("notification", json!({"i": i})).await,
        ));
    }
    seqs
}

/// A barrage of bad requests and bad sockets: each gets its error, and a client
/// connected all along notices nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_does_not_disturb_other_clients() {
    let app = spawn_app().await;
    let (mut bystander, _) = app.connect_ready(&app.user_token("bystander")).await;
    let admin = app.admin_token();

    for body in ["", "{", "[]", "{\"type\":\"connected\",\"data\":{}}"] {
        let response = app
            .post_raw(BROADCAST, Some(&admin), Some("application/json"), body)
            .await;
        assert!(
            response.status().is_client_error(),
            "body {body:?}: {}",
            response.status()
        );
    }
    // The server may answer 413 and close without reading the body: keep that
    // connection out of the client's pool, or the next request races the close.
    let response = app
        .http
        .post(app.url(BROADCAST))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .header("connection", "close")
        .body(body_of_len(200_000))
        .send()
        .await
        .expect("POST failed");
    assert_eq!(response.status(), 413);
    let response = app
        .post_broadcast("forged", &json!({"type": "notification", "data": {}}))
        .await;
    assert_eq!(response.status(), 401);
    let response = app
        .post_broadcast(
            &app.user_token("bystander"),
            &json!({"type": "notification", "data": {}}),
        )
        .await;
    assert_eq!(response.status(), 403);
    for _ in 0..5 {
        let mut bad = app.connect("forged").await;
        bad.expect_close(4401).await;
    }
    let mut rude = app.connect(&app.user_token("rude")).await;
    rude.connected().await;
    rude.send(tokio_tungstenite::tungstenite::Message::binary(vec![
        0u8;
        16
    ]))
    .await;
    rude.expect_close(1003).await;
    let (status, _) = raw_http(
        app.addr,
        b"GARBAGE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!((400..500).contains(&status), "garbage method: {status}");

    // Nothing was published, and the bystander is served as before.
    assert!(
        bystander.assert_alive().await.is_empty(),
        "the bystander received something"
    );
    let receipt = app.broadcast("notification", json!({})).await;
    assert_eq!(receipt["seq"], 1, "a refused publish took a seq: {receipt}");
    assert_eq!(receipt["recipients"], 1, "{receipt}");
    assert_eq!(bystander.next_json().await["seq"], 1);
    assert_eq!(app.get("/health").await.status(), 200);
}
