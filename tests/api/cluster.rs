//! Cluster mode (SPEC §6, issue 9): several nodes over one real `redis-server`
//! that the tests start, stop, kill and restart empty.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{wait_until, TestApp, WsClient, WAIT};
use crate::redis_server::{spawn_node, RedisServer};

/// Frames of `kind` until `count` arrived.
async fn frames(tab: &mut WsClient, kind: &str, count: usize) -> Vec<Value> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let frame = tab.next_json().await;
        if frame["type"] == kind {
            seen.push(frame);
        }
    }
    seen
}

/// A Redis and two nodes of it, `a` and `b`, in the key namespace `prefix`.
pub(crate) async fn two_nodes(prefix: &str) -> (RedisServer, TestApp, TestApp) {
    let redis = RedisServer::start().await;
    let a = spawn_node(&redis, prefix, "a", |_| {}).await;
    let b = spawn_node(&redis, prefix, "b", |_| {}).await;
    (redis, a, b)
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

#[tokio::test]
async fn a_broadcast_on_one_node_reaches_a_tab_on_another_once() {
    let (_redis, a, b) = two_nodes("t1").await;
    let (mut tab_a, _) = a.connect_ready(&a.user_token("alice")).await;
    let (mut tab_b, _) = b.connect_ready(&b.user_token("bob")).await;
    let body = a.broadcast("note", json!({"n": 1})).await;
    assert_eq!(body["seq"], 1);
    for tab in [&mut tab_a, &mut tab_b] {
        let frame = tab.expect_type("note").await;
        assert_eq!(frame["seq"], 1);
        assert_eq!(frame["data"]["n"], 1);
    }
    // Exactly once: nothing else follows.
    assert!(tab_b.assert_alive().await.is_empty());
    assert!(tab_a.assert_alive().await.is_empty());
}

#[tokio::test]
async fn a_user_message_reaches_every_tab_on_every_node_and_presence_counts_them_all() {
    let (_redis, a, b) = two_nodes("t2").await;
    let (mut alice_a, _) = a.connect_ready(&a.user_token("alice")).await;
    let (mut alice_b, _) = b.connect_ready(&b.user_token("alice")).await;
    let (mut bob_b, _) = b.connect_ready(&b.user_token("bob")).await;
    for node in [&a, &b] {
        // Each node counts its own tabs at once and the other's once written.
        assert!(
            wait_until(WAIT, async || presence(node, "alice").await == 2).await,
            "presence on every node counts alice's tabs on both nodes"
        );
    }
    let body = b.send_to_user("alice", "note", json!({})).await;
    assert_eq!(body["recipients"], 2, "{body}");
    for tab in [&mut alice_a, &mut alice_b] {
        assert_eq!(tab.expect_type("note").await["seq"], body["seq"]);
    }
    assert!(
        bob_b.assert_alive().await.is_empty(),
        "bob got alice's message"
    );
    drop(alice_b);
    assert!(
        wait_until(WAIT, async || presence(&a, "alice").await == 1).await,
        "a closed tab leaves presence on the other node"
    );
}

#[tokio::test]
async fn concurrent_publishes_on_three_nodes_arrive_in_the_same_order_everywhere() {
    let redis = RedisServer::start().await;
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(spawn_node(&redis, "t3", name, |_| {}).await);
    }
    let mut tabs = Vec::new();
    for node in &nodes {
        tabs.push(node.connect_ready(&node.user_token("u")).await.0);
    }
    const EACH: usize = 30;
    let publishes = nodes.iter().flat_map(|node| {
        (0..EACH).map(move |i| async move { node.broadcast("n", json!({"i": i})).await })
    });
    let receipts = futures_util::future::join_all(publishes).await;
    let mut seqs: Vec<u64> = receipts
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=(3 * EACH) as u64).collect::<Vec<_>>());
    let mut orders = Vec::new();
    for tab in &mut tabs {
        let ids: Vec<(u64, String)> = frames(tab, "n", 3 * EACH)
            .await
            .iter()
            .map(|f| {
                (
                    f["seq"].as_u64().unwrap(),
                    f["id"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert!(
            ids.windows(2).all(|w| w[1].0 == w[0].0 + 1),
            "in seq order, no gap"
        );
        orders.push(ids);
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "one sequence on every node"
    );
}

#[tokio::test]
async fn a_client_resumes_on_another_node() {
    let (_redis, a, b) = two_nodes("t4").await;
    let (tab, connected) = a.connect_ready(&a.user_token("u")).await;
    drop(tab);
    for i in 0..5 {
        a.broadcast("n", json!({"i": i})).await;
    }
    let epoch = connected["epoch"].as_str().unwrap().to_owned();
    let mut resumed = b.connect_resume(&b.user_token("u"), 0, &epoch).await;
    resumed.connected().await;
    let mut replayed = Vec::new();
    loop {
        let frame = resumed.next_json().await;
        if frame["type"] == "replay" {
            assert_eq!(frame["data"]["count"], replayed.len(), "{frame}");
            break;
        }
        replayed.push(frame["seq"].as_u64().unwrap());
    }
    // Every acknowledged message is in the replay, not some of them live:
    // node b catches up with Redis before it attaches the connection.
    assert_eq!(replayed, [1, 2, 3, 4, 5]);
}

/// A node whose pub/sub link is being re-made (or just slow) still tells a
/// new connection every message acknowledged before it connected: the
/// `connected` head and the resume come from Redis's head, not from what
/// the subscription has delivered so far.
#[tokio::test]
async fn a_connection_sees_every_acknowledged_message_while_its_node_resubscribes() {
    let (redis, a, b) = two_nodes("t8").await;
    let (_tab, connected) = b.connect_ready(&b.user_token("u")).await;
    let epoch = connected["epoch"].as_str().unwrap().to_owned();
    for round in 1..=3u64 {
        // Node b loses its subscription; it re-subscribes after a backoff.
        redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        let receipt = a.broadcast("n", json!({"round": round})).await;
        let seq = receipt["seq"].as_u64().unwrap();
        let (_fresh, fresh) = b.connect_ready(&b.user_token("v")).await;
        assert_eq!(fresh["seq"], seq, "round {round}: {fresh}");
        let mut resumed = b.connect_resume(&b.user_token("w"), seq - 1, &epoch).await;
        resumed.connected().await;
        let frame = resumed.next_json().await;
        assert_eq!(
            frame["seq"], seq,
            "round {round}: replayed, not missed: {frame}"
        );
        let summary = resumed.next_json().await;
        assert_eq!(summary["type"], "replay", "{summary}");
        assert_eq!(summary["data"]["complete"], true, "{summary}");
    }
}

#[tokio::test]
async fn redis_down_means_503_and_degraded_then_recovery_with_the_same_epoch() {
    let mut redis = RedisServer::start().await;
    let a = spawn_node(&redis, "t5", "a", |_| {}).await;
    let (mut tab, connected) = a.connect_ready(&a.user_token("u")).await;
    a.broadcast("n", json!({})).await;
    let first = tab.expect_type("n").await;
    redis.kill();
    let response = a
        .post_broadcast(&a.admin_token(), &json!({"type": "n", "data": {}}))
        .await;
    assert_eq!(response.status(), 503, "never a 202 while Redis is down");
    let health = a.get("/health").await;
    assert_eq!(health.status(), 503);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["redis"], "down");

    redis.start_again().await;
    assert!(
        wait_until(Duration::from_secs(20), async || a
            .get("/health")
            .await
            .status()
            == 200)
        .await,
        "the node recovers by itself"
    );
    let body = a.broadcast("n", json!({})).await;
    assert_eq!(
        body["seq"], 2,
        "seq continues after a restart with the data"
    );
    let second = tab.expect_type("n").await;
    assert_eq!(second["seq"], 2, "the connection that stayed open gets it");
    assert_eq!(first["seq"], 1);
    let _ = connected;
}

#[tokio::test]
async fn redis_back_empty_closes_old_connections_with_1012_and_resume_is_incomplete() {
    let mut redis = RedisServer::start().await;
    let a = spawn_node(&redis, "t6", "a", |_| {}).await;
    let (mut tab, connected) = a.connect_ready(&a.user_token("u")).await;
    let old_epoch = connected["epoch"].as_str().unwrap().to_owned();
    a.broadcast("n", json!({})).await;
    tab.expect_type("n").await;
    redis.restart_empty().await;
    tab.expect_close(1012).await;
    let mut resumed = a.connect_resume(&a.user_token("u"), 1, &old_epoch).await;
    let hello = resumed.connected().await;
    assert_ne!(hello["epoch"], old_epoch.as_str(), "a new epoch");
    let replay = resumed.expect_type("replay").await;
    assert_eq!(replay["data"]["complete"], false, "{replay}");
    // And it is not deaf: the next publish reaches it.
    let body = a.broadcast("n", json!({})).await;
    assert_eq!(resumed.expect_type("n").await["seq"], body["seq"]);
}

#[tokio::test]
async fn killed_redis_connections_lose_no_acknowledged_message() {
    let (redis, a, b) = two_nodes("t7").await;
    let (mut tab, _) = b.connect_ready(&b.user_token("u")).await;
    let mut acknowledged = Vec::new();
    for i in 0..40 {
        if i % 10 == 5 {
            redis.kill_clients();
        }
        let response = a
            .post_broadcast(&a.admin_token(), &json!({"type": "n", "data": {"i": i}}))
            .await;
        if response.status() == 202 {
            let body: Value = response.json().await.unwrap();
            acknowledged.push(body["seq"].as_u64().unwrap());
        } else {
            assert_eq!(response.status(), 503);
        }
    }
    assert!(!acknowledged.is_empty());
    let last = *acknowledged.last().unwrap();
    let mut seen = Vec::new();
    while seen.last().is_none_or(|s| *s < last) {
        match tab.next_event().await {
            crate::helpers::Event::Json(frame) if frame["type"] == "n" => {
                seen.push(frame["seq"].as_u64().unwrap())
            }
            crate::helpers::Event::Json(_) => {}
            other => panic!("the tab should stay connected: {other:?}"),
        }
    }
    for seq in acknowledged {
        assert!(
            seen.contains(&seq),
            "acknowledged {seq} never arrived: {seen:?}"
        );
    }
    assert!(
        seen.windows(2).all(|w| w[1] > w[0]),
        "in order, once: {seen:?}"
    );
}
