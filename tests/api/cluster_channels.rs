//! Channels across nodes (issue 10): a channel message published on any node
//! reaches its subscribers on every node once, in the channel's seq order; a
//! subscribe on another node resumes with `since`; a Redis outage is 503,
//! then recovery.

use std::time::Duration;

use serde_json::{json, Value};

use crate::channels::subscribe;
use crate::cluster::two_nodes;
use crate::helpers::{seq_of, wait_until, TestApp, WsClient};

async fn publish_on(node: &TestApp, channel: &str, i: u64) -> reqwest::Response {
    node.post_json(
        &format!("/api/v1/ws/channel/{channel}"),
        Some(&node.admin_token()),
        &json!({"type": "output", "data": {"i": i}}),
    )
    .await
}

/// The seqs of the next `count` frames of `channel`.
async fn channel_seqs(tab: &mut WsClient, channel: &str, count: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.len() < count {
        let frame: Value = tab.next_json().await;
        if frame["channel"] == channel {
            seqs.push(seq_of(&frame));
        }
    }
    seqs
}

#[tokio::test]
async fn a_channel_message_on_either_node_reaches_subscribers_on_both_once_in_order() {
    let (_redis, a, b) = two_nodes("ch1").await;
    let (mut on_a, _) = a.connect_ready(&a.user_token("u")).await;
    let (mut on_b, _) = b.connect_ready(&b.user_token("v")).await;
    let (mut not_subscribed, _) = b.connect_ready(&b.user_token("w")).await;
    let (_, sa) = subscribe(&mut on_a, "run:1", None, None).await;
    let (_, sb) = subscribe(&mut on_b, "run:1", None, None).await;
    assert_eq!(sa["epoch"], sb["epoch"], "one channel, one epoch");
    for i in 0..20 {
        let node = if i % 2 == 0 { &a } else { &b };
        assert_eq!(publish_on(node, "run:1", i).await.status(), 202);
    }
    let expected: Vec<u64> = (1..=20).collect();
    assert_eq!(channel_seqs(&mut on_a, "run:1", 20).await, expected);
    assert_eq!(channel_seqs(&mut on_b, "run:1", 20).await, expected);
    assert!(on_a.assert_alive().await.is_empty(), "no duplicate");
    assert!(not_subscribed.assert_alive().await.is_empty());
    // Subscribers count over both nodes (presence is up to a second old).
    let info = async || -> Value {
        a.http
            .get(a.url("/api/v1/ws/channel/run:1"))
            .bearer_auth(a.admin_token())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(10), async || info().await
            ["subscribers"]
            == 2)
        .await,
        "subscribers over both nodes: {}",
        info().await
    );
}

#[tokio::test]
async fn a_subscribe_on_another_node_resumes_with_since() {
    let (_redis, a, b) = two_nodes("ch2").await;
    let (mut on_a, _) = a.connect_ready(&a.user_token("u")).await;
    let (_, subscribed) = subscribe(&mut on_a, "task:9", None, None).await;
    let epoch = subscribed["epoch"].as_str().unwrap().to_owned();
    for i in 0..5 {
        assert_eq!(publish_on(&a, "task:9", i).await.status(), 202);
    }
    assert_eq!(channel_seqs(&mut on_a, "task:9", 2).await, [1, 2]);
    drop(on_a);
    // b never held the channel: it learns it from Redis.
    let (mut on_b, _) = b.connect_ready(&b.user_token("u")).await;
    let (replayed, resumed) = subscribe(&mut on_b, "task:9", Some(2), Some(&epoch)).await;
    assert_eq!(resumed["complete"], true, "{resumed}");
    assert_eq!(resumed["epoch"], epoch.as_str());
    let seqs: Vec<u64> = replayed.iter().map(seq_of).collect();
    assert_eq!(seqs, [3, 4, 5]);
    assert_eq!(publish_on(&a, "task:9", 5).await.status(), 202);
    assert_eq!(channel_seqs(&mut on_b, "task:9", 1).await, [6]);
}

#[tokio::test]
async fn redis_down_is_503_for_channels_then_they_recover_with_the_same_epoch() {
    let (mut redis, a, b) = two_nodes("ch3").await;
    let (mut on_b, _) = b.connect_ready(&b.user_token("u")).await;
    let (_, subscribed) = subscribe(&mut on_b, "run:r", None, None).await;
    assert_eq!(publish_on(&a, "run:r", 0).await.status(), 202);
    assert_eq!(channel_seqs(&mut on_b, "run:r", 1).await, [1]);
    redis.kill();
    assert_eq!(
        publish_on(&a, "run:r", 1).await.status(),
        503,
        "never a 202"
    );
    redis.start_again().await;
    for node in [&a, &b] {
        assert!(
            wait_until(Duration::from_secs(20), async || node
                .get("/health")
                .await
                .status()
                == 200)
            .await,
            "the node recovers by itself"
        );
    }
    let response = publish_on(&a, "run:r", 2).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["seq"], 2, "seq continues");
    assert_eq!(
        channel_seqs(&mut on_b, "run:r", 1).await,
        [2],
        "the open subscription gets it"
    );
    let (_, again) = subscribe(&mut on_b, "run:r", Some(2), subscribed["epoch"].as_str()).await;
    assert_eq!(again["complete"], true);
    assert_eq!(again["epoch"], subscribed["epoch"]);
}
