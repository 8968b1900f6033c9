//! The views (SPEC §5) and analytics: latest task per id, current agents,
//! who sees what, tenants apart, and that they survive a restart.

use agentcast::auth::Role;
use serde_json::{json, Value};

use crate::helpers::{
    accepted, assert_error, get_view, seq_of, spawn_app, spawn_app_with, TestApp,
};

/// The `task_id`s (or `agent_id`s) of a list, in its order.
fn ids(body: &Value, list: &str, id: &str) -> Vec<String> {
    body[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} array in {body}"))
        .iter()
        .map(|entry| entry[id].as_str().unwrap().to_owned())
        .collect()
}

async fn task(app: &TestApp, to: Option<&str>, id: &str, status: &str) -> u64 {
    let data = json!({"task_id": id, "status": status, "query": format!("q-{id}")});
    let receipt = match to {
        Some(user) => app.send_to_user(user, "task_update", data).await,
        None => app.broadcast("task_update", data).await,
    };
    seq_of(&receipt)
}

async fn agent(app: &TestApp, id: &str, action: &str) {
    app.broadcast(
        "agent_update",
        json!({"agent_id": id, "action": action, "name": format!("agent {id}")}),
    )
    .await;
}

/// Publishes the same picture in tenant `default` for several tests.
async fn populate(app: &TestApp) {
    task(app, None, "t1", "queued").await;
    task(app, Some("alice"), "t2", "running").await;
    task(app, Some("bob"), "t3", "running").await;
    agent(app, "a1", "registered").await;
    agent(app, "a2", "registered").await;
    agent(app, "a1", "updated").await;
    agent(app, "a2", "deleted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_sees_its_tasks_and_no_other_tenants() {
    let app = spawn_app().await;
    populate(&app).await;
    let last = task(&app, None, "t1", "completed").await;
    let other_admin = app.token("boss", Role::Admin, "acme");
    accepted(
        app.post_broadcast(
            &other_admin,
            &json!({"type": "task_update", "data": {"task_id": "t9", "status": "queued"}}),
        )
        .await,
    )
    .await;

    let alice = get_view(&app, "/api/v1/tasks", &app.user_token("alice")).await;
    assert_eq!(ids(&alice, "tasks", "task_id"), ["t1", "t2"], "{alice}");
    let t1 = &alice["tasks"][0];
    assert_eq!(t1["status"], "completed");
    assert_eq!(t1["seq"], last);
    assert_eq!(t1["query"], "q-t1");
    assert!(t1["updated_at"].as_str().unwrap().ends_with('Z'), "{t1}");
    let bob = get_view(&app, "/api/v1/tasks", &app.user_token("bob")).await;
    assert_eq!(ids(&bob, "tasks", "task_id"), ["t1", "t3"]);
    let admin = get_view(&app, "/api/v1/tasks", &app.admin_token()).await;
    assert_eq!(ids(&admin, "tasks", "task_id"), ["t1", "t3", "t2"]);
    let limited = get_view(&app, "/api/v1/tasks?limit=2", &app.admin_token()).await;
    assert_eq!(ids(&limited, "tasks", "task_id"), ["t1", "t3"]);

    let acme_user = app.token("zed", Role::User, "acme");
    let acme = get_view(&app, "/api/v1/tasks", &acme_user).await;
    assert_eq!(ids(&acme, "tasks", "task_id"), ["t9"]);
    let acme_agents = get_view(&app, "/api/v1/agents", &acme_user).await;
    assert_eq!(acme_agents, json!({"agents": []}));

    let agents = get_view(&app, "/api/v1/agents", &app.user_token("carol")).await;
    assert_eq!(ids(&agents, "agents", "agent_id"), ["a1"], "{agents}");
    assert_eq!(agents["agents"][0]["name"], "agent a1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_refuse_bad_limits_missing_tokens_and_api_keys() {
    let app = spawn_app().await;
    let token = app.user_token("alice");
    for path in ["/api/v1/tasks", "/api/v1/agents"] {
        for bad in ["0", "1001", "abc", "-1", ""] {
            let response = app
                .http
                .get(app.url(&format!("{path}?limit={bad}")))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            assert_error(response, 422, &format!("{path}?limit={bad}")).await;
        }
        for path in [path, "/api/v1/analytics"] {
            assert_error(app.get(path).await, 401, path).await;
            let forged = app
                .http
                .get(app.url(path))
                .bearer_auth("not-a-token")
                .send()
                .await
                .unwrap();
            assert_error(forged, 401, path).await;
            // API keys only publish: a key is not a reader, whichever header carries it.
            let key = format!("ak_{}", "x".repeat(40));
            let by_bearer = app
                .http
                .get(app.url(path))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            assert_error(by_bearer, 403, path).await;
            let by_header = app
                .http
                .get(app.url(path))
                .header("x-api-key", &key)
                .send()
                .await
                .unwrap();
            assert_error(by_header, 403, path).await;
        }
        let post = app.post_json(path, Some(&token), &json!({})).await;
        assert_error(post, 405, path).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_survive_a_restart() {
    let mut app = spawn_app().await;
    populate(&app).await;
    let before = get_view(&app, "/api/v1/tasks", &app.admin_token()).await;
    app.shutdown().await.expect("clean shutdown");

    let data_dir = app.settings.data_dir.clone();
    let again = spawn_app_with(move |s| s.data_dir = data_dir).await;
    let after = get_view(&again, "/api/v1/tasks", &again.admin_token()).await;
    assert_eq!(after, before);
    let agents = get_view(&again, "/api/v1/agents", &again.user_token("alice")).await;
    assert_eq!(ids(&agents, "agents", "agent_id"), ["a1"]);
    // And they go on from there.
    task(&again, Some("alice"), "t2", "failed").await;
    let alice = get_view(&again, "/api/v1/tasks", &again.user_token("alice")).await;
    assert_eq!(ids(&alice, "tasks", "task_id"), ["t2", "t1"]);
    assert_eq!(alice["tasks"][0]["status"], "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_count_messages_deliveries_and_connections_per_minute() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_ready(&app.user_token("alice")).await;
    populate(&app).await;
    app.broadcast("notification", json!({})).await;
    // Everything published is delivered before we look.
    let last = seq_of(&app.broadcast("notification", json!({})).await);
    while seq_of(&client.next_json().await) < last {}

    let body = get_view(&app, "/api/v1/analytics", &app.user_token("alice")).await;
    let minutes = body["minutes"].as_array().expect("minutes");
    assert_eq!(minutes.len(), 60);
    let sum = |f: &dyn Fn(&Value) -> u64| minutes.iter().map(f).sum::<u64>();
    assert_eq!(
        sum(&|m| m["messages"]["task_update"].as_u64().unwrap_or(0)),
        3
    );
    assert_eq!(
        sum(&|m| m["messages"]["agent_update"].as_u64().unwrap_or(0)),
        4
    );
    assert_eq!(
        sum(&|m| m["messages"]["notification"].as_u64().unwrap_or(0)),
        2
    );
    assert_eq!(sum(&|m| m["messages_total"].as_u64().unwrap()), 9);
    // alice got the broadcasts and her task: 8 of the 9.
    assert_eq!(sum(&|m| m["deliveries"].as_u64().unwrap()), 8);
    assert_eq!(sum(&|m| m["connections"].as_u64().unwrap()), 1);

    let other = app.token("zed", Role::User, "acme");
    let acme = get_view(&app, "/api/v1/analytics", &other).await;
    let acme_total: u64 = acme["minutes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["messages_total"].as_u64().unwrap())
        .sum();
    assert_eq!(acme_total, 0, "another tenant's analytics are its own");
}
