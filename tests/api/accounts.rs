//! Accounts (SPEC §2): the bootstrap admin, signup, login, refresh and me,
//! every refusal of them, the failed-login limiter, and restart survival.

use std::net::IpAddr;

use agentcast::auth::Role;
use agentcast::config::Secret;
use serde_json::{json, Value};

use crate::helpers::{
    assert_error, claims, now_s, spawn_app, spawn_app_with, DataDir, TestApp, WAIT,
};

pub const SIGNUP: &str = "/api/v1/auth/signup";
pub const LOGIN: &str = "/api/v1/auth/login";
pub const REFRESH: &str = "/api/v1/auth/refresh";
pub const ME: &str = "/api/v1/auth/me";

/// The bootstrap admin's password in these tests.
pub const ADMIN_PASSWORD: &str = "admin-password-7Qx";

/// A server whose bootstrap admin has [`ADMIN_PASSWORD`].
pub async fn spawn_with_admin() -> TestApp {
    spawn_app_with(|s| s.accounts.admin_password = Some(Secret::new(ADMIN_PASSWORD))).await
}

/// Signs `username` up and returns the 201's `user`.
pub async fn signup(app: &TestApp, username: &str, password: &str) -> Value {
    let response = app
        .post_json(
            SIGNUP,
            None,
            &json!({"username": username, "password": password}),
        )
        .await;
    let status = response.status();
    let body: Value = response.json().await.expect("signup body is JSON");
    assert_eq!(status, 201, "signup {username}: {body}");
    body["user"].clone()
}

pub async fn login(app: &TestApp, username: &str, password: &str) -> reqwest::Response {
    app.post_json(
        LOGIN,
        None,
        &json!({"username": username, "password": password}),
    )
    .await
}

/// Logs in and returns the 200 body `{token, expires_at, user}`.
pub async fn login_ok(app: &TestApp, username: &str, password: &str) -> Value {
    let response = login(app, username, password).await;
    let status = response.status();
    let body: Value = response.json().await.expect("login body is JSON");
    assert_eq!(status, 200, "login {username}: {body}");
    body
}

/// An HTTP client whose connections come from `ip` (any 127.x address works on Linux).
fn client_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(IpAddr::from(ip))
        .timeout(WAIT)
        .build()
        .expect("build the HTTP client")
}

async fn login_from(
    app: &TestApp,
    client: &reqwest::Client,
    username: &str,
    password: &str,
) -> reqwest::Response {
    client
        .post(app.url(LOGIN))
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .expect("POST login failed")
}

pub(crate) async fn get_me(app: &TestApp, token: &str) -> reqwest::Response {
    app.http
        .get(app.url(ME))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET me failed")
}

/// `user` has exactly the public fields, and no secret.
fn assert_public_user(user: &Value, username: &str, role: &str) {
    assert_eq!(user["username"], username, "{user}");
    assert_eq!(user["role"], role, "{user}");
    assert_eq!(user["tenant"], "default", "{user}");
    assert!(
        user["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{user}"
    );
    let fields: Vec<&String> = user
        .as_object()
        .expect("user is an object")
        .keys()
        .collect();
    assert_eq!(fields, ["id", "role", "tenant", "username"], "{user}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_login_me_and_refresh_work_end_to_end() {
    let app = spawn_app().await;

    let user = signup(&app, "alice", "alice-password-1").await;
    assert_public_user(&user, "alice", "user");

    let session = login_ok(&app, "alice", "alice-password-1").await;
    assert_eq!(session["user"], user);
    let token = session["token"].as_str().expect("token").to_owned();
    let expires_in = session["expires_in"].as_u64().expect("expires_in");
    assert_eq!(expires_in, 12 * 3600, "TOKEN_TTL defaults to 12 h");
    let expires_at = session["expires_at"].as_str().expect("expires_at");
    let at =
        time::OffsetDateTime::parse(expires_at, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("expires_at {expires_at:?} is not RFC 3339: {e}"));
    let delta = at.unix_timestamp() - (now_s() + expires_in) as i64;
    assert!(delta.abs() <= 5, "expires_at is now + TTL: {expires_at}");

    let me = get_me(&app, &token).await;
    assert_eq!(me.status(), 200);
    assert_eq!(me.json::<Value>().await.unwrap()["user"], user);

    // The token opens the WebSocket as that account.
    let (client, connected) = app.connect_ready(&token).await;
    assert_eq!(connected["user_id"], user["id"]);
    assert_eq!(connected["tenant"], "default");
    client.close().await;

    let refreshed = app.post_json(REFRESH, Some(&token), &json!({})).await;
    assert_eq!(refreshed.status(), 200);
    assert_eq!(
        refreshed
            .headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    let refreshed: Value = refreshed.json().await.unwrap();
    assert_eq!(refreshed["user"], user);
    let new_token = refreshed["token"].as_str().expect("a fresh token");
    assert_eq!(get_me(&app, new_token).await.status(), 200);

    // A refresh needs no body at all.
    let response = app
        .http
        .post(app.url(REFRESH))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_admin_logs_in_and_may_publish() {
    let app = spawn_with_admin().await;

    let session = login_ok(&app, "admin", ADMIN_PASSWORD).await;
    assert_public_user(&session["user"], "admin", "admin");
    let token = session["token"].as_str().unwrap();

    let response = app
        .post_broadcast(token, &json!({"type": "notification", "data": {}}))
        .await;
    assert_eq!(response.status(), 202);
    // Its username is taken like any other.
    let response = app
        .post_json(
            SIGNUP,
            None,
            &json!({"username": "Admin", "password": "whatever-123"}),
        )
        .await;
    assert_error(response, 409, "signup as Admin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_username_is_409_in_any_case() {
    let app = spawn_app().await;
    signup(&app, "alice", "alice-password-1").await;

    for taken in ["alice", "ALICE", "Alice"] {
        let response = app
            .post_json(
                SIGNUP,
                None,
                &json!({"username": taken, "password": "other-password-2"}),
            )
            .await;
        let body = assert_error(response, 409, &format!("signup {taken}")).await;
        assert_eq!(body["error"]["code"], "conflict");
    }
    // The first account is unchanged.
    login_ok(&app, "alice", "alice-password-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weak_or_empty_passwords_and_bad_usernames_are_422() {
    let app = spawn_app().await;
    let long_password = "p".repeat(1025);
    let cases = [
        (
            "empty password",
            json!({"username": "alice", "password": ""}),
        ),
        (
            "short password",
            json!({"username": "alice", "password": "short"}),
        ),
        (
            "password over 1 KiB",
            json!({"username": "alice", "password": long_password}),
        ),
        (
            "empty username",
            json!({"username": "", "password": "alice-password-1"}),
        ),
        (
            "username with a space",
            json!({"username": "a b", "password": "alice-password-1"}),
        ),
        (
            "username too short",
            json!({"username": "ab", "password": "alice-password-1"}),
        ),
        (
            "username too long",
            json!({"username": "a".repeat(33), "password": "alice-password-1"}),
        ),
        (
            "username with a slash",
            json!({"username": "a/b", "password": "alice-password-1"}),
        ),
        ("missing password", json!({"username": "alice"})),
        ("wrong types", json!({"username": 5, "password": ["x"]})),
        (
            "unknown field",
            json!({"username": "alice", "password": "alice-password-1", "role": "admin"}),
        ),
        ("not an object", json!(["alice", "alice-password-1"])),
    ];
    for (what, body) in cases {
        let response = app.post_json(SIGNUP, None, &body).await;
        let error = assert_error(response, 422, what).await;
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            !message.contains("pppppppp"),
            "{what}: the message repeats the password: {message}"
        );
    }
    // Nothing was created.
    let response = login(&app, "alice", "alice-password-1").await;
    assert_error(response, 401, "login after refused signups").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_wrong_content_type_and_large_bodies_are_refused() {
    let app = spawn_app().await;
    for path in [SIGNUP, LOGIN] {
        for (what, body) in [
            ("empty", ""),
            ("not JSON", "{nope"),
            ("truncated", "{\"username\":"),
        ] {
            let response = app
                .post_raw(path, None, Some("application/json"), body)
                .await;
            assert_error(response, 400, &format!("{path} with {what} body")).await;
        }
        for content_type in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
        ] {
            let response = app
                .post_raw(
                    path,
                    None,
                    content_type,
                    r#"{"username":"alice","password":"alice-password-1"}"#,
                )
                .await;
            assert_error(
                response,
                415,
                &format!("{path} with Content-Type {content_type:?}"),
            )
            .await;
        }
        let big = json!({"username": "alice", "password": "x".repeat(9 * 1024)}).to_string();
        let response = app
            .post_raw(path, None, Some("application/json; charset=utf-8"), big)
            .await;
        assert_error(response, 413, &format!("{path} with 9 KiB")).await;
    }
    // Wrong methods.
    let response = app.get(SIGNUP).await;
    assert_error(response, 405, "GET signup").await;
    let response = app.get(LOGIN).await;
    assert_error(response, 405, "GET login").await;
    let response = app.post_json(ME, None, &json!({})).await;
    assert_error(response, 405, "POST me").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_off_is_403_and_login_still_works() {
    let app = spawn_app_with(|s| {
        s.accounts.signup = false;
        s.accounts.admin_password = Some(Secret::new(ADMIN_PASSWORD));
    })
    .await;

    let response = app
        .post_json(
            SIGNUP,
            None,
            &json!({"username": "alice", "password": "alice-password-1"}),
        )
        .await;
    let body = assert_error(response, 403, "signup while off").await;
    assert_eq!(body["error"]["code"], "forbidden");
    // Refused before the body is even read.
    let response = app
        .post_raw(SIGNUP, None, Some("application/json"), "{nope")
        .await;
    assert_error(response, 403, "bad body while signup is off").await;

    login_ok(&app, "admin", ADMIN_PASSWORD).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_user_and_wrong_password_get_the_same_401() {
    let app = spawn_app().await;
    signup(&app, "alice", "alice-password-1").await;

    let wrong = assert_error(
        login(&app, "alice", "wrong-password-1").await,
        401,
        "wrong password",
    )
    .await;
    let unknown = assert_error(
        login(&app, "nobody", "wrong-password-1").await,
        401,
        "unknown user",
    )
    .await;
    assert_eq!(wrong, unknown, "the two refusals are indistinguishable");
    for (what, username, password) in [
        ("empty password", "alice", ""),
        ("malformed username", "a b", "alice-password-1"),
        ("huge password", "alice", &"x".repeat(2000)),
    ] {
        let body = assert_error(login(&app, username, password).await, 401, what).await;
        assert_eq!(body, wrong, "{what}");
    }
    // Other tenants have no alice.
    let response = app
        .post_json(
            LOGIN,
            None,
            &json!({"username": "alice", "password": "alice-password-1", "tenant": "acme"}),
        )
        .await;
    assert_error(response, 401, "alice in tenant acme").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_is_429_per_username_and_per_ip() {
    let app = spawn_app().await;
    signup(&app, "alice", "alice-password-1").await;
    signup(&app, "bob", "bob-password-12").await;
    let attacker = client_from([127, 0, 0, 1]);
    let elsewhere = client_from([127, 0, 0, 2]);
    let bystander = client_from([127, 0, 0, 3]);

    for attempt in 1..=10 {
        let response = login_from(&app, &attacker, "alice", "guess-password").await;
        assert_error(response, 401, &format!("guess {attempt}")).await;
    }
    let response = login_from(&app, &attacker, "alice", "guess-password").await;
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a 429 carries Retry-After in seconds");
    assert!(
        (1..=900).contains(&retry_after),
        "Retry-After within the 15-minute window: {retry_after}"
    );
    let body = assert_error(response, 429, "the 11th guess").await;
    assert_eq!(body["error"]["code"], "rate_limited");

    // Even the right password: the username is locked from that address...
    let response = login_from(&app, &attacker, "alice", "alice-password-1").await;
    assert_error(response, 429, "right password from the attacker").await;
    // ...but not from another one (SPEC §2: nobody can lock an owner out).
    let response = login_from(&app, &elsewhere, "alice", "alice-password-1").await;
    assert_eq!(response.status(), 200, "alice from another address");
    // The attacker's address is locked for every username.
    let response = login_from(&app, &attacker, "bob", "bob-password-12").await;
    assert_error(response, 429, "bob from the attacker's address").await;
    // Another user from another address is not affected.
    let response = login_from(&app, &bystander, "bob", "bob-password-12").await;
    assert_eq!(response.status(), 200, "bob from elsewhere logs in");
    // Signup and tokens are not affected either.
    signup(&app, "carol", "carol-password-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_guesses_cannot_pass_the_limit() {
    let app = spawn_app().await;
    signup(&app, "alice", "alice-password-1").await;

    let guesses = (0..40).map(|_| login(&app, "alice", "guess-password"));
    let statuses: Vec<u16> = futures_util::future::join_all(guesses)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    let tried = statuses.iter().filter(|s| **s == 401).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(
        (tried, limited),
        (10, 30),
        "exactly 10 guesses reach the password check: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn me_and_refresh_need_a_valid_token_of_an_existing_account() {
    let app = spawn_app().await;
    signup(&app, "alice", "alice-password-1").await;
    let session = login_ok(&app, "alice", "alice-password-1").await;
    let user = &session["user"];
    let id = user["id"].as_str().unwrap();

    // Missing, garbage and expired tokens.
    let response = app.get(ME).await;
    assert_error(response, 401, "me without a token").await;
    let response = app.post_json(REFRESH, None, &json!({})).await;
    assert_error(response, 401, "refresh without a token").await;
    let expired = app.mint(&claims(id, Role::User, "default", -60));
    for (what, token) in [("garbage", "not-a-jwt"), ("expired", expired.as_str())] {
        assert_error(get_me(&app, token).await, 401, &format!("me with {what}")).await;
        let response = app.post_json(REFRESH, Some(token), &json!({})).await;
        assert_error(response, 401, &format!("refresh with {what}")).await;
    }
    // A valid token of no account here (deleted, or minted by `agentcast token`).
    let ghost = app.user_token("ghost");
    assert_error(get_me(&app, &ghost).await, 401, "me of a ghost").await;
    let response = app.post_json(REFRESH, Some(&ghost), &json!({})).await;
    assert_error(response, 401, "refresh of a ghost").await;
    // The right id in the wrong tenant is not that account either.
    let elsewhere = app.token(id, Role::User, "acme");
    assert_error(get_me(&app, &elsewhere).await, 401, "me in another tenant").await;

    // Refresh takes role and tenant from the account, not from the token.
    let forged_role = app.token(id, Role::Admin, "default");
    let response = app.post_json(REFRESH, Some(&forged_role), &json!({})).await;
    assert_eq!(response.status(), 200);
    let refreshed: Value = response.json().await.unwrap();
    assert_eq!(refreshed["user"]["role"], "user");
    let token = refreshed["token"].as_str().unwrap();
    let response = app
        .post_broadcast(token, &json!({"type": "notification", "data": {}}))
        .await;
    assert_error(response, 403, "a refreshed user token publishing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_accounts_and_api_keys() {
    let dir = DataDir::new();
    let mut first = spawn_app_with(|s| {
        s.data_dir = dir.0.clone();
        s.accounts.admin_password = Some(Secret::new(ADMIN_PASSWORD));
    })
    .await;
    let alice = signup(&first, "alice", "alice-password-1").await;
    let alice_token = login_ok(&first, "alice", "alice-password-1").await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let admin_token = login_ok(&first, "admin", ADMIN_PASSWORD).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = first
        .post_json(
            "/api/v1/api-keys",
            Some(&admin_token),
            &json!({"name": "ci"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let key = response.json::<Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    first.shutdown().await.expect("a clean stop");

    // Same folder, and a different ADMIN_PASSWORD: it only applies to an empty store.
    let second = spawn_app_with(|s| {
        s.data_dir = dir.0.clone();
        s.accounts.admin_password = Some(Secret::new("another-admin-password"));
    })
    .await;
    let session = login_ok(&second, "alice", "alice-password-1").await;
    assert_eq!(session["user"], alice);
    login_ok(&second, "admin", ADMIN_PASSWORD).await;
    let response = login(&second, "admin", "another-admin-password").await;
    assert_error(response, 401, "the new ADMIN_PASSWORD changes nothing").await;
    assert_eq!(
        get_me(&second, &alice_token).await.status(),
        200,
        "old tokens stay valid"
    );
    let response = second
        .post_broadcast(&key, &json!({"type": "notification", "data": {}}))
        .await;
    assert_eq!(response.status(), 202, "the key survived the restart");
    let response = second
        .post_json(
            SIGNUP,
            None,
            &json!({"username": "alice", "password": "alice-password-2"}),
        )
        .await;
    assert_error(response, 409, "alice is still taken").await;
}

/// Found by schemathesis (issue 11): `"tenant": null` logged in as if the
/// field were absent, where the document (and the publish body's rule) says
/// an optional field, when present, is of its type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_login_tenant_is_422_not_the_default_tenant() {
    let app = spawn_with_admin().await;
    let response = app
        .post_json(
            LOGIN,
            None,
            &json!({"username": "admin", "password": ADMIN_PASSWORD, "tenant": null}),
        )
        .await;
    let body = assert_error(response, 422, "tenant null").await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("null"),
        "{body}"
    );
    // The same login with the field absent, or a string, still works.
    login_ok(&app, "admin", ADMIN_PASSWORD).await;
    let response = app
        .post_json(
            LOGIN,
            None,
            &json!({"username": "admin", "password": ADMIN_PASSWORD, "tenant": "default"}),
        )
        .await;
    assert_eq!(response.status(), 200);
}
