//! Cluster mode across nodes (SPEC §5, §6, issue 9): the views every node
//! reads from Redis, a node killed with SIGKILL, a node that restarts into
//! the same log. The killed node is the real binary (a child process); the
//! others are servers in this process, on the same Redis and `JWT_SECRET`.

use std::time::Duration;

use agentcast::auth::Role;
use agentcast::config::Secret;
use serde_json::{json, Value};

use crate::durability::{self, Server, SECRET};
use crate::helpers::{get_view, seq_of, spawn_app_with, wait_until, DataDir, TestApp, WAIT};
use crate::redis_server::{spawn_node, RedisServer};
use crate::resume::read_replay;

/// SPEC §6: the connections of a node that died leave within 60 s.
const DEAD_NODE_LEAVES: Duration = Duration::from_secs(60);

/// A node of `redis` in this process, with the binary's `JWT_SECRET`.
async fn node(redis: &RedisServer, prefix: &str, name: &str) -> TestApp {
    spawn_node(redis, prefix, name, |s| s.jwt_secret = Secret::new(SECRET)).await
}

/// The binary as node `name` of `redis` in the key namespace `prefix`.
fn binary_node(redis: &RedisServer, prefix: &str, name: &str, data: &DataDir) -> Server {
    let url = redis.url();
    Server::start_with(
        &data.0,
        &[
            ("REDIS_URL", url.as_str()),
            ("REDIS_PREFIX", prefix),
            ("NODE_ID", name),
        ],
    )
}

/// Broadcasts on the binary node as the `default` admin; returns the seq.
async fn broadcast_on(server: &Server, http: &reqwest::Client, data: Value) -> u64 {
    let response = http
        .post(server.url("/api/v1/ws/broadcast"))
        .bearer_auth(durability::token("admin", Role::Admin))
        .json(&json!({"type": "n", "data": data}))
        .send()
        .await
        .expect("POST to the binary node");
    assert_eq!(response.status(), 202);
    seq_of(&response.json::<Value>().await.unwrap())
}

async fn presence(node: &TestApp, user: &str) -> u64 {
    let body: Value = node
        .get_presence(&node.admin_token(), user)
        .await
        .json()
        .await
        .unwrap();
    body["connections"].as_u64().unwrap_or(0)
}

/// A view's body without `updated_at` (the one field that differs between
/// two servers fed the same messages at different times).
fn without_times(mut body: Value) -> Value {
    for list in ["tasks", "agents"] {
        if let Some(entries) = body[list].as_array_mut() {
            for entry in entries {
                entry.as_object_mut().unwrap().remove("updated_at");
            }
        }
    }
    body
}

/// The same messages, in the same order, to `app` (seqs match on a fresh log).
async fn publish_views(app: &TestApp) {
    let task = |id: &str, status: &str| json!({"task_id": id, "status": status});
    app.broadcast(
        "task_update",
        json!({"task_id": "t1", "status": "queued", "query": "public", "progress": 0}),
    )
    .await;
    app.send_to_user(
        "alice",
        "task_update",
        json!({"task_id": "t2", "status": "running", "query": "alice's", "progress": 33.3}),
    )
    .await;
    // t3: alice's query, then bob's bare status: bob must not see her query.
    app.send_to_user(
        "alice",
        "task_update",
        json!({"task_id": "t3", "status": "running", "query": "secret"}),
    )
    .await;
    app.send_to_user("bob", "task_update", task("t3", "completed"))
        .await;
    app.broadcast(
        "task_update",
        json!({"task_id": "t1", "status": "running", "progress": 50}),
    )
    .await;
    let agent = |id: &str, action: &str, name: Option<&str>| {
        let mut data = json!({"agent_id": id, "action": action});
        if let Some(name) = name {
            data["name"] = name.into();
        }
        data
    };
    app.broadcast("agent_update", agent("a1", "registered", Some("Ann")))
        .await;
    app.send_to_user(
        "alice",
        "agent_update",
        agent("a2", "registered", Some("Al")),
    )
    .await;
    app.broadcast("agent_update", agent("a3", "registered", None))
        .await;
    app.broadcast("agent_update", agent("a1", "updated", None))
        .await;
    app.broadcast("agent_update", agent("a3", "deleted", None))
        .await;
    // Interleaved audiences, so a limited list of a user merges both indexes.
    for i in 0..12 {
        let data = task(&format!("m{i}"), "queued");
        match i % 3 {
            0 => app.broadcast("task_update", data).await,
            1 => app.send_to_user("alice", "task_update", data).await,
            _ => app.send_to_user("bob", "task_update", data).await,
        };
    }
    // Another tenant's task: nobody of `default` sees it.
    let other = app.token("boss", Role::Admin, "acme");
    let response = app
        .post_broadcast(
            &other,
            &json!({"type": "task_update", "data": task("t9", "queued")}),
        )
        .await;
    assert_eq!(response.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_are_the_same_on_every_node_and_as_on_a_single_node() {
    let redis = RedisServer::start().await;
    let a = node(&redis, "v1", "a").await;
    let b = node(&redis, "v1", "b").await;
    let single = spawn_app_with(|s| s.jwt_secret = Secret::new(SECRET)).await;
    publish_views(&a).await;
    publish_views(&single).await;

    let viewers = [
        ("admin", a.admin_token()),
        ("alice", a.user_token("alice")),
        ("bob", a.user_token("bob")),
        ("carol", a.user_token("carol")),
        ("acme", a.token("boss", Role::Admin, "acme")),
    ];
    let paths = [
        "/api/v1/tasks",
        "/api/v1/agents",
        "/api/v1/tasks?limit=1",
        "/api/v1/agents?limit=1",
        "/api/v1/tasks?limit=2",
        "/api/v1/tasks?limit=5",
    ];
    let mut seen = std::collections::HashMap::new();
    for (who, token) in &viewers {
        for path in paths {
            let on_a = get_view(&a, path, token).await;
            let on_b = get_view(&b, path, token).await;
            assert_eq!(on_a, on_b, "{who} {path}: node b differs from node a");
            let alone = get_view(&single, path, token).await;
            assert_eq!(
                without_times(on_a.clone()),
                without_times(alone),
                "{who} {path}: Redis differs from SQLite"
            );
            seen.insert((*who, path), on_a);
        }
    }
    let ids = |who: &str, path: &str, list: &str, id: &str| -> Vec<String> {
        seen[&(who, path)][list]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e[id].as_str().unwrap().to_owned())
            .collect()
    };
    let tasks = "/api/v1/tasks";
    let m = |ns: &[u32]| ns.iter().map(|n| format!("m{n}")).collect::<Vec<_>>();
    let newest_first = |mut own: Vec<String>, older: &[&str]| {
        own.reverse();
        own.extend(older.iter().map(|s| s.to_string()));
        own
    };
    assert_eq!(
        ids("admin", tasks, "tasks", "task_id"),
        newest_first(m(&(0..12).collect::<Vec<_>>()), &["t1", "t3", "t2"])
    );
    assert_eq!(
        ids("alice", tasks, "tasks", "task_id"),
        newest_first(m(&[0, 1, 3, 4, 6, 7, 9, 10]), &["t1", "t2"])
    );
    assert_eq!(
        ids("bob", tasks, "tasks", "task_id"),
        newest_first(m(&[0, 2, 3, 5, 6, 8, 9, 11]), &["t1", "t3"])
    );
    assert_eq!(
        ids("carol", tasks, "tasks", "task_id"),
        newest_first(m(&[0, 3, 6, 9]), &["t1"])
    );
    assert_eq!(
        ids("alice", "/api/v1/tasks?limit=5", "tasks", "task_id"),
        m(&[10, 9, 7, 6, 4])
    );
    assert_eq!(ids("acme", tasks, "tasks", "task_id"), ["t9"]);
    assert_eq!(
        ids("admin", "/api/v1/tasks?limit=1", "tasks", "task_id"),
        ["m11"]
    );
    let task_of = |who: &str, id: &str| -> Value {
        seen[&(who, tasks)]["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["task_id"] == id)
            .unwrap_or_else(|| panic!("{who} does not see {id}"))
            .clone()
    };
    let bob_t3 = &task_of("bob", "t3");
    assert_eq!(bob_t3["status"], "completed");
    assert!(
        bob_t3.get("query").is_none(),
        "alice's query shown to bob: {bob_t3}"
    );
    let alice_t2 = &task_of("alice", "t2");
    assert_eq!(alice_t2["query"], "alice's");
    assert_eq!(alice_t2["progress"], 33.3);
    let t1 = &task_of("carol", "t1");
    assert_eq!(
        (t1["query"].clone(), t1["progress"].clone()),
        (json!("public"), json!(50.0))
    );
    let agents = "/api/v1/agents";
    assert_eq!(ids("admin", agents, "agents", "agent_id"), ["a1", "a2"]);
    assert_eq!(ids("alice", agents, "agents", "agent_id"), ["a1", "a2"]);
    assert_eq!(ids("bob", agents, "agents", "agent_id"), ["a1"]);
    assert_eq!(seen[&("bob", agents)]["agents"][0]["name"], "Ann");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_read_while_redis_is_down_is_503() {
    let mut redis = RedisServer::start().await;
    let a = node(&redis, "v2", "a").await;
    a.broadcast("task_update", json!({"task_id": "t1", "status": "queued"}))
        .await;
    redis.kill();
    for path in ["/api/v1/tasks", "/api/v1/agents"] {
        let response = a
            .http
            .get(a.url(path))
            .bearer_auth(a.admin_token())
            .send()
            .await
            .unwrap();
        let body =
            crate::helpers::assert_error(response, 503, &format!("{path} with Redis down")).await;
        assert_eq!(body["error"]["code"], "unavailable");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_presence_and_the_others_keep_flowing() {
    let redis = RedisServer::start().await;
    let survivor = node(&redis, "k1", "survivor").await;
    let data = DataDir::new();
    let mut victim = binary_node(&redis, "k1", "victim", &data);
    let alice = durability::token("alice", Role::User);
    let mut on_victim = durability::connect(&victim, &alice, None).await;
    on_victim.connected().await;
    let _also_on_victim = {
        let mut tab = durability::connect(&victim, &alice, None).await;
        tab.connected().await;
        tab
    };
    let (mut on_survivor, _) = survivor.connect_ready(&survivor.user_token("alice")).await;
    assert!(
        wait_until(WAIT, async || presence(&survivor, "alice").await == 3).await,
        "presence counts alice's tabs on both nodes"
    );
    let body = survivor.send_to_user("alice", "n", json!({})).await;
    assert_eq!(body["recipients"], 3, "{body}");
    for tab in [&mut on_victim, &mut on_survivor] {
        assert_eq!(tab.expect_type("n").await["seq"], body["seq"]);
    }

    victim.kill9();
    assert!(
        wait_until(DEAD_NODE_LEAVES, async || presence(&survivor, "alice")
            .await
            == 1)
        .await,
        "the killed node's connections never left presence"
    );
    let body = survivor
        .send_to_user("alice", "n", json!({"after": true}))
        .await;
    assert_eq!(
        body["recipients"], 1,
        "recipients still count the dead node: {body}"
    );
    let frame = on_survivor.expect_type("n").await;
    assert_eq!(
        (frame["seq"].clone(), frame["data"]["after"].clone()),
        (body["seq"].clone(), json!(true)),
        "the survivor keeps flowing: {frame}"
    );
    let next = survivor.broadcast("n", json!({})).await;
    assert_eq!(on_survivor.expect_type("n").await["seq"], next["seq"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_rejoins_the_same_log() {
    let redis = RedisServer::start().await;
    let a = node(&redis, "r1", "a").await;
    let data = DataDir::new();
    let mut b = binary_node(&redis, "r1", "b", &data);
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .unwrap();
    let user = durability::token("u", Role::User);
    let mut on_b = durability::connect(&b, &user, None).await;
    let epoch = on_b.connected().await["epoch"].as_str().unwrap().to_owned();
    let first = seq_of(&a.broadcast("n", json!({"i": 0})).await);
    let last_seen = seq_of(&on_b.expect_type("n").await);
    assert_eq!(last_seen, first);

    b.kill9();
    drop(on_b);
    let mut missed = Vec::new();
    for i in 1..=3 {
        missed.push(seq_of(&a.broadcast("n", json!({"i": i})).await));
    }
    let b = binary_node(&redis, "r1", "b", &data);
    let mut resumed = durability::connect(&b, &user, Some((last_seen, &epoch))).await;
    let hello = resumed.connected().await;
    assert_eq!(
        hello["epoch"],
        epoch.as_str(),
        "the same log, the same epoch"
    );
    let (frames, replay) = read_replay(&mut resumed).await;
    let replayed: Vec<u64> = frames.iter().map(seq_of).collect();
    assert_eq!(replayed, missed, "exactly what it missed");
    assert_eq!(replay["complete"], true, "{replay}");

    let (mut on_a, _) = a.connect_ready(&a.user_token("u")).await;
    let from_a = seq_of(&a.broadcast("n", json!({"from": "a"})).await);
    let from_b = broadcast_on(&b, &http, json!({"from": "b"})).await;
    for tab in [&mut resumed, &mut on_a] {
        let got: Vec<u64> = [tab.expect_type("n").await, tab.expect_type("n").await]
            .iter()
            .map(seq_of)
            .collect();
        assert_eq!(
            got,
            [from_a, from_b],
            "both publishes reach tabs on both nodes"
        );
    }
}

/// Regression: `P:nodes` kept the heartbeat of every node that ever ran (a
/// default `NODE_ID` is new at each start), growing forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_of_dead_nodes_are_dropped_from_the_node_set() {
    let redis = RedisServer::start().await;
    redis.cli(&["ZADD", "h1:nodes", "1", "long-gone"]);
    let _a = node(&redis, "h1", "a").await;
    assert!(
        wait_until(WAIT, async || redis
            .cli(&["ZSCORE", "h1:nodes", "long-gone"])
            .trim()
            .is_empty())
        .await,
        "a heartbeat from 1970 is still in the node set"
    );
    assert!(
        !redis.cli(&["ZSCORE", "h1:nodes", "a"]).trim().is_empty(),
        "the live node's own heartbeat is there"
    );
}
