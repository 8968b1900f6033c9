//! `GET /api/v1/tasks/:task_id` (SPEC §3): one entry of the task view, with
//! the list's shape and the list's visibility (SPEC §5); 404 for a task that
//! does not exist and for one the caller may not see, alike.

use agentcast::auth::Role;
use serde_json::{json, Value};

use crate::helpers::{accepted, assert_error, get_view, seq_of, spawn_app, TestApp};

/// `GET /api/v1/tasks/<segment>` as `token` (the segment goes into the URL as is).
async fn get_task(app: &TestApp, segment: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = app.http.get(app.url(&format!("/api/v1/tasks/{segment}")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("GET failed")
}

/// The entry of `id` in the caller's `GET /api/v1/tasks`.
async fn listed(app: &TestApp, token: &str, id: &str) -> Value {
    let list = get_view(app, "/api/v1/tasks", token).await;
    list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task_id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {list}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_the_entry_of_the_list_for_whoever_may_see_it() {
    let app = spawn_app().await;
    app.broadcast(
        "task_update",
        json!({"task_id": "t-public", "status": "queued", "query": "everyone's", "progress": 5}),
    )
    .await;
    let last = seq_of(
        &app.broadcast(
            "task_update",
            json!({"task_id": "t-public", "status": "running", "progress": 40}),
        )
        .await,
    );
    app.send_to_user(
        "alice",
        "task_update",
        json!({"task_id": "t-alice", "status": "running", "query": "alice's secret"}),
    )
    .await;

    let admin = app.admin_token();
    let alice = app.user_token("alice");
    let bob = app.user_token("bob");

    // Visible to the admin and to a user, as the list shows it.
    for token in [&admin, &alice, &bob] {
        let body = get_view(&app, "/api/v1/tasks/t-public", token).await;
        assert_eq!(body["task"], listed(&app, token, "t-public").await);
        let task = &body["task"];
        assert_eq!(task["status"], "running");
        assert_eq!(task["seq"], last);
        assert_eq!(
            task["query"], "everyone's",
            "kept from the earlier broadcast"
        );
        assert_eq!(task["progress"], 40.0);
        assert_eq!(task["data"]["progress"], 40);
        assert!(
            task["updated_at"].as_str().unwrap().ends_with('Z'),
            "{task}"
        );
    }

    // A task set by a message to alice: hers and the admins', nobody else's.
    let hers = get_view(&app, "/api/v1/tasks/t-alice", &alice).await;
    assert_eq!(hers["task"]["query"], "alice's secret");
    assert_eq!(hers["task"], listed(&app, &alice, "t-alice").await);
    let seen_by_admin = get_view(&app, "/api/v1/tasks/t-alice", &admin).await;
    assert_eq!(seen_by_admin["task"]["status"], "running");
    let refused = assert_error(get_task(&app, "t-alice", Some(&bob)).await, 404, "bob").await;
    assert_eq!(refused["error"]["code"], "not_found");
    assert!(
        !refused.to_string().contains("secret"),
        "nothing of alice's task leaks: {refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_shows_a_user_only_the_fields_their_messages_set() {
    let app = spawn_app().await;
    app.send_to_user(
        "alice",
        "task_update",
        json!({"task_id": "t1", "status": "running", "query": "alice's query", "progress": 30}),
    )
    .await;
    app.send_to_user(
        "bob",
        "task_update",
        json!({"task_id": "t1", "status": "completed"}),
    )
    .await;
    let bob = get_view(&app, "/api/v1/tasks/t1", &app.user_token("bob")).await;
    assert_eq!(bob["task"]["status"], "completed");
    assert!(bob["task"].get("query").is_none(), "{bob}");
    assert!(bob["task"].get("progress").is_none(), "{bob}");
    // The task is bob's now: alice no longer sees it.
    let alice = get_task(&app, "t1", Some(&app.user_token("alice"))).await;
    assert_error(alice, 404, "alice after bob's update").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_of_another_tenant_or_none_is_not_found() {
    let app = spawn_app().await;
    let acme_admin = app.token("boss", Role::Admin, "acme");
    accepted(
        app.post_broadcast(
            &acme_admin,
            &json!({"type": "task_update", "data": {"task_id": "t-acme", "status": "queued"}}),
        )
        .await,
    )
    .await;
    let found = get_view(&app, "/api/v1/tasks/t-acme", &acme_admin).await;
    assert_eq!(found["task"]["task_id"], "t-acme");

    for token in [app.admin_token(), app.user_token("alice")] {
        let other = assert_error(get_task(&app, "t-acme", Some(&token)).await, 404, "t-acme").await;
        assert_eq!(other["error"]["code"], "not_found");
        let unknown = assert_error(get_task(&app, "nope", Some(&token)).await, 404, "nope").await;
        assert_eq!(unknown["error"]["code"], "not_found");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_needs_a_token_and_a_sane_id() {
    let app = spawn_app().await;
    app.broadcast(
        "task_update",
        json!({"task_id": "run 7/α", "status": "queued"}),
    )
    .await;
    let token = app.user_token("alice");

    // Any task id a publish may use is found by its percent-encoded segment.
    let encoded = "run%207%2F%CE%B1";
    let body = get_view(&app, &format!("/api/v1/tasks/{encoded}"), &token).await;
    assert_eq!(body["task"]["task_id"], "run 7/α");

    assert_error(get_task(&app, encoded, None).await, 401, "no token").await;
    assert_error(
        get_task(&app, encoded, Some("not-a-token")).await,
        401,
        "forged",
    )
    .await;
    let key = format!("ak_{}", "x".repeat(40));
    assert_error(get_task(&app, encoded, Some(&key)).await, 403, "an api key").await;

    let long = "x".repeat(257);
    for bad in [long.as_str(), "a%00b", "a%0Ab", "%FF"] {
        let refused = assert_error(get_task(&app, bad, Some(&token)).await, 422, bad).await;
        assert_eq!(refused["error"]["code"], "validation_failed", "{bad}");
    }
    // 256 bytes is still an id (of no task).
    let longest = "x".repeat(256);
    assert_error(
        get_task(&app, &longest, Some(&token)).await,
        404,
        "256 bytes",
    )
    .await;

    let post = app
        .post_json("/api/v1/tasks/t1", Some(&token), &json!({}))
        .await;
    assert_error(post, 405, "POST").await;
}

/// Found by schemathesis (issue 11): a `task_update` could set a task id
/// that `GET /api/v1/tasks/:task_id` refuses (control characters, more than
/// 256 bytes), so a task of the list could not be read back. Such an id is
/// now refused at publish (422 naming `data.task_id`), and the longest one a
/// publish takes is found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_id_a_publish_accepts_can_be_read_back() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let too_long = "x".repeat(257);
    for bad in ["a\u{0}b", "\u{91}\u{5}", "line\nbreak", too_long.as_str()] {
        let response = app
            .post_broadcast(
                &admin,
                &json!({"type": "task_update", "data": {"task_id": bad, "status": "queued"}}),
            )
            .await;
        let body = assert_error(response, 422, &format!("task_id {bad:?}")).await;
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("data.task_id"), "{message}");
    }
    let listed_before = get_view(&app, "/api/v1/tasks", &admin).await;
    assert_eq!(
        listed_before["tasks"],
        json!([]),
        "nothing refused was kept"
    );

    let longest = "é".repeat(128); // 256 bytes
    app.broadcast(
        "task_update",
        json!({"task_id": longest, "status": "queued"}),
    )
    .await;
    let encoded: String = longest.bytes().map(|b| format!("%{b:02X}")).collect();
    let body = get_view(&app, &format!("/api/v1/tasks/{encoded}"), &admin).await;
    assert_eq!(body["task"]["task_id"], longest.as_str());
}
