//! Channels (SPEC §4.4, issue 10): one resumable stream per task, run or
//! agent, inside a tenant. Per-channel seq and epoch, exactly its
//! subscribers, replay-then-`subscribed`-then-live under concurrent publishes,
//! authorization, limits, expiry, the slow-consumer rule, restarts.

use std::time::Duration;

use agentcast::auth::Role;
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::helpers::{
    accepted, assert_error, claims, seq_of, spawn_app, spawn_app_with, summary, wait_until,
    TestApp, WsClient, WAIT,
};

/// Publishes to `channel` as the `default` admin; returns the 202 body.
pub(crate) async fn publish(app: &TestApp, channel: &str, kind: &str, data: Value) -> Value {
    let response = app
        .post_json(
            &format!("/api/v1/ws/channel/{channel}"),
            Some(&app.admin_token()),
            &json!({"type": kind, "data": data}),
        )
        .await;
    accepted(response).await
}

/// Sends a subscribe and reads until its `subscribed`: the channel's frames
/// replayed before it, and its data. Frames of other streams are skipped.
pub(crate) async fn subscribe(
    client: &mut WsClient,
    channel: &str,
    since: Option<u64>,
    epoch: Option<&str>,
) -> (Vec<Value>, Value) {
    let mut data = json!({"channel": channel});
    if let Some(since) = since {
        data["since"] = since.into();
    }
    if let Some(epoch) = epoch {
        data["epoch"] = epoch.into();
    }
    client
        .send_json(&json!({"type": "subscribe", "data": data}))
        .await;
    let mut replayed = Vec::new();
    loop {
        let frame = client.next_json().await;
        match frame["type"].as_str() {
            Some("subscribed") if frame["data"]["channel"] == channel => {
                return (replayed, frame["data"].clone())
            }
            Some("error") => panic!("subscribe to {channel} refused: {frame}"),
            _ if frame["channel"] == channel => replayed.push(frame),
            _ => {}
        }
    }
}

/// The next frame of `channel`, skipping others.
async fn next_of(client: &mut WsClient, channel: &str) -> Value {
    loop {
        let frame = client.next_json().await;
        if frame["channel"] == channel {
            return frame;
        }
    }
}

/// The next frame, which must be an `error` with `code`.
async fn expect_error(client: &mut WsClient, code: &str) -> Value {
    let frame = client.expect_type("error").await;
    assert_eq!(frame["data"]["code"], code, "{frame}");
    frame["data"].clone()
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(seq_of).collect()
}

#[tokio::test]
async fn each_channel_has_its_own_seq_apart_from_the_tenant_log() {
    let app = spawn_app().await;
    for expected in 1..=3 {
        let body = publish(&app, "task:a", "log", json!({"message": "x"})).await;
        assert_eq!(body["seq"], expected);
        assert_eq!(body["channel"], "task:a");
        assert!(body["id"].is_string() && body["recipients"] == 0, "{body}");
    }
    assert_eq!(publish(&app, "task:b", "log", json!({})).await["seq"], 1);
    assert_eq!(app.broadcast("notification", json!({})).await["seq"], 1);
    assert_eq!(publish(&app, "task:a", "log", json!({})).await["seq"], 4);
    let info: Value = app
        .http
        .get(app.url("/api/v1/ws/channel/task:a"))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["channel"], "task:a");
    assert_eq!(info["seq"], 4);
    assert_eq!(info["subscribers"], 0);
    assert!(info["epoch"].as_str().is_some_and(|e| !e.is_empty()));
}

#[tokio::test]
async fn a_channel_message_reaches_exactly_its_subscribers() {
    let app = spawn_app().await;
    let (mut alice, _) = app.connect_ready(&app.user_token("alice")).await;
    let (mut bob, _) = app.connect_ready(&app.user_token("bob")).await;
    let (mut other_tenant, _) = app
        .connect_ready(&app.token("alice", Role::User, "acme"))
        .await;
    subscribe(&mut alice, "task:7f3a", None, None).await;
    subscribe(&mut other_tenant, "task:7f3a", None, None).await;
    subscribe(&mut bob, "task:other", None, None).await;

    let body = publish(&app, "task:7f3a", "tool_start", json!({"tool": "search"})).await;
    assert_eq!(body["recipients"], 1, "one subscriber in this tenant");
    let frame = alice.next_json().await;
    assert_eq!(frame["type"], "tool_start");
    assert_eq!(frame["channel"], "task:7f3a");
    assert_eq!(frame["seq"], 1);
    assert_eq!(frame["data"]["tool"], "search");
    assert!(frame["id"].is_string() && frame["ts"].is_string());
    // A tenant broadcast carries no channel and its own seq.
    app.broadcast("notification", json!({})).await;
    let broadcast = alice.next_json().await;
    assert_eq!(broadcast["type"], "notification");
    assert!(broadcast.get("channel").is_none(), "{broadcast}");

    let bob_saw = bob.assert_alive().await;
    assert_eq!(
        bob_saw.iter().filter(|f| f["type"] == "tool_start").count(),
        0,
        "bob is not subscribed: {}",
        summary(&bob_saw)
    );
    assert!(
        other_tenant.assert_alive().await.is_empty(),
        "the same name in another tenant is another stream"
    );
}

/// Publishes never stop while a client subscribes with `since`: every seq
/// arrives once, in order, replayed ones before `subscribed`, live ones after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_with_since_under_concurrent_publishing_has_no_gap_and_no_duplicate() {
    const TOTAL: u64 = 300;
    let app = spawn_app().await;
    for _ in 0..20 {
        publish(&app, "run:42", "output", json!({"text": "tok "})).await;
    }
    let publisher = {
        let url = app.url("/api/v1/ws/channel/run:42");
        let (http, token) = (app.http.clone(), app.admin_token());
        tokio::spawn(async move {
            for _ in 20..TOTAL {
                let response = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"type": "output", "data": {"text": "tok "}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
            }
        })
    };
    let (mut client, _) = app.connect_ready(&app.admin_token()).await;
    let (replayed, subscribed) = subscribe(&mut client, "run:42", Some(5), None).await;
    assert_eq!(subscribed["from"], 5);
    assert_eq!(subscribed["complete"], true);
    let head = subscribed["to"].as_u64().unwrap();
    assert_eq!(subscribed["count"], replayed.len());
    assert_eq!(seqs(&replayed), (6..=head).collect::<Vec<_>>());
    let mut live = Vec::new();
    while head + (live.len() as u64) < TOTAL {
        live.push(seq_of(&next_of(&mut client, "run:42").await));
    }
    assert_eq!(live, (head + 1..=TOTAL).collect::<Vec<_>>());
    publisher.await.unwrap();
}

#[tokio::test]
async fn subscribe_without_since_has_no_replay() {
    let app = spawn_app().await;
    for _ in 0..3 {
        publish(&app, "task:x", "log", json!({})).await;
    }
    let (mut client, _) = app.connect_ready(&app.user_token("u")).await;
    let (replayed, subscribed) = subscribe(&mut client, "task:x", None, None).await;
    assert!(replayed.is_empty());
    assert_eq!(
        (subscribed["from"].as_u64(), subscribed["to"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(
        (
            subscribed["count"].as_u64(),
            subscribed["complete"].as_bool()
        ),
        (Some(0), Some(true))
    );
    publish(&app, "task:x", "log", json!({})).await;
    assert_eq!(seq_of(&next_of(&mut client, "task:x").await), 4);
}

#[tokio::test]
async fn a_foreign_epoch_or_trimmed_history_is_complete_false() {
    let app = spawn_app_with(|s| s.channels.history = 5).await;
    for _ in 0..10 {
        publish(&app, "task:t", "log", json!({})).await;
    }
    let (mut client, _) = app.connect_ready(&app.user_token("u")).await;
    let (_, first) = subscribe(&mut client, "task:t", None, None).await;
    let epoch = first["epoch"].as_str().unwrap().to_owned();
    let (replayed, trimmed) = subscribe(&mut client, "task:t", Some(1), Some(&epoch)).await;
    assert_eq!(trimmed["complete"], false, "seqs 2..=5 are gone");
    assert_eq!(seqs(&replayed), [6, 7, 8, 9, 10]);
    let (replayed, foreign) = subscribe(&mut client, "task:t", Some(8), Some("another")).await;
    assert_eq!(foreign["complete"], false);
    assert!(replayed.is_empty());
    let (replayed, whole) = subscribe(&mut client, "task:t", Some(7), Some(&epoch)).await;
    assert_eq!(whole["complete"], true);
    assert_eq!(seqs(&replayed), [8, 9, 10]);
}

#[tokio::test]
async fn a_channel_is_forgotten_after_its_ttl_and_starts_a_new_epoch() {
    let app = spawn_app_with(|s| s.channels.ttl = Duration::from_secs(1)).await;
    let token = app.admin_token();
    for _ in 0..3 {
        publish(&app, "task:old", "log", json!({})).await;
    }
    let history = async |since: u64| -> Value {
        let response = app
            .http
            .get(app.url(&format!("/api/v1/channels/task:old/history?since={since}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    };
    let before = history(0).await;
    assert_eq!(before["head"], 3);
    assert_eq!(before["messages"].as_array().unwrap().len(), 3);
    assert!(
        wait_until(WAIT, async || history(0).await["head"] == 0).await,
        "the channel was never forgotten"
    );
    let after = history(0).await;
    assert!(after["messages"].as_array().unwrap().is_empty());
    assert_ne!(after["epoch"], before["epoch"], "a new epoch");
    assert_eq!(publish(&app, "task:old", "log", json!({})).await["seq"], 1);
}

/// With the Redis engine a 202 comes before the node delivers (from its
/// subscriber), so this waits for frames rather than pinging right after the
/// publish; a marker on a second channel, published after, arrives after
/// anything the first one would have delivered (one stream of deliveries).
#[tokio::test]
async fn unsubscribe_stops_delivery_and_a_second_subscribe_gives_no_duplicate() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_ready(&app.user_token("u")).await;
    subscribe(&mut client, "agent:a1", None, None).await;
    let (replayed, again) = subscribe(&mut client, "agent:a1", None, None).await;
    assert!(replayed.is_empty());
    assert_eq!(again["to"], 0);
    subscribe(&mut client, "agent:marker", None, None).await;
    publish(&app, "agent:a1", "log", json!({"n": 1})).await;
    publish(&app, "agent:marker", "log", json!({})).await;
    let frames = until_marker(&mut client).await;
    assert_eq!(
        seqs(&frames),
        [1],
        "one stream, not two: {}",
        summary(&frames)
    );

    client
        .send_json(&json!({"type": "unsubscribe", "data": {"channel": "agent:a1"}}))
        .await;
    let unsubscribed = client.expect_type("unsubscribed").await;
    assert_eq!(unsubscribed["data"]["channel"], "agent:a1");
    let body = publish(&app, "agent:a1", "log", json!({"n": 2})).await;
    assert_eq!(body["recipients"], 0);
    publish(&app, "agent:marker", "log", json!({})).await;
    let after = until_marker(&mut client).await;
    assert!(
        after.is_empty(),
        "nothing after unsubscribe: {}",
        summary(&after)
    );
}

/// The frames that arrive before the next one on `agent:marker`.
async fn until_marker(client: &mut WsClient) -> Vec<Value> {
    let mut before = Vec::new();
    loop {
        let frame = client.next_json().await;
        if frame["channel"] == "agent:marker" {
            return before;
        }
        before.push(frame);
    }
}

#[tokio::test]
async fn who_may_subscribe_claim_then_setting_and_forbidden_keeps_the_socket() {
    let app = spawn_app_with(|s| {
        s.channels.user_channels = agentcast::channels::Patterns::parse_list("task:*").unwrap()
    })
    .await;
    let with_claim = |channels: &[&str]| {
        let mut claims = claims("carol", Role::User, "default", 3600);
        claims.channels = Some(channels.iter().map(|c| c.to_string()).collect());
        app.mint(&claims)
    };
    // The claim wins over the setting.
    let (mut client, _) = app.connect_ready(&with_claim(&["run:*"])).await;
    client
        .send_json(&json!({"type": "subscribe", "data": {"channel": "task:1"}}))
        .await;
    let refused = expect_error(&mut client, "forbidden").await;
    assert_eq!(refused["channel"], "task:1");
    subscribe(&mut client, "run:9", None, None).await;
    client.assert_alive().await;

    let (mut nothing, _) = app.connect_ready(&with_claim(&[])).await;
    nothing
        .send_json(&json!({"type": "subscribe", "data": {"channel": "task:1"}}))
        .await;
    expect_error(&mut nothing, "forbidden").await;

    // Without a claim: USER_CHANNELS.
    let (mut plain, _) = app.connect_ready(&app.user_token("dave")).await;
    subscribe(&mut plain, "task:1", None, None).await;
    plain
        .send_json(&json!({"type": "subscribe", "data": {"channel": "run:9"}}))
        .await;
    expect_error(&mut plain, "forbidden").await;
    let (mut admin, _) = app.connect_ready(&app.admin_token()).await;
    subscribe(&mut admin, "run:9", None, None).await;

    // The history endpoint applies the same rule.
    let status = async |token: &str, channel: &str| {
        app.http
            .get(app.url(&format!("/api/v1/channels/{channel}/history")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(status(&app.user_token("dave"), "run:9").await, 403);
    assert_eq!(status(&app.user_token("dave"), "task:1").await, 200);
    assert_eq!(status(&with_claim(&["run:*"]), "run:9").await, 200);
    assert_eq!(status(&app.admin_token(), "anything:1").await, 200);
}

#[tokio::test]
async fn subscription_limits_and_malformed_frames_get_errors_and_the_socket_stays() {
    let app = spawn_app_with(|s| s.channels.max_subscriptions = 2).await;
    let (mut client, _) = app.connect_ready(&app.user_token("u")).await;
    subscribe(&mut client, "task:1", None, None).await;
    subscribe(&mut client, "task:2", None, None).await;
    client
        .send_json(&json!({"type": "subscribe", "data": {"channel": "task:3"}}))
        .await;
    assert_eq!(
        expect_error(&mut client, "too_many_subscriptions").await["channel"],
        "task:3"
    );
    // Subscribing again to one it has is not another subscription.
    subscribe(&mut client, "task:2", Some(0), None).await;
    for bad in [
        json!({"type": "subscribe", "data": {"channel": "task:*"}}),
        json!({"type": "subscribe", "data": {"channel": "Task:1"}}),
        json!({"type": "subscribe", "data": {}}),
        json!({"type": "subscribe", "data": {"channel": "task:1", "since": -1}}),
        json!({"type": "subscribe", "data": {"channel": "task:1", "since": "3"}}),
        json!({"type": "subscribe", "data": {"channel": "task:1", "since": 1.5}}),
        json!({"type": "subscribe", "data": {"channel": "task:1", "epoch": 7}}),
        json!({"type": "unsubscribe", "data": {"channel": 7}}),
    ] {
        client.send_json(&bad).await;
        expect_error(&mut client, "invalid_frame").await;
    }
    client.assert_alive().await;
    let stats = app.get_stats().await;
    assert_eq!(stats["subscriptions"], 2);
    assert!(stats["channels"].as_u64().unwrap() >= 2);
}

#[tokio::test]
async fn the_channel_endpoints_refuse_what_the_contract_refuses() {
    let app = spawn_app().await;
    let body = json!({"type": "log", "data": {}});
    let admin = app.admin_token();
    for bad in ["task", "Task:1", "task:a%20b", "task:*", "task%3A"] {
        let response = app
            .post_json(&format!("/api/v1/ws/channel/{bad}"), Some(&admin), &body)
            .await;
        assert_error(response, 422, bad).await;
    }
    let path = "/api/v1/ws/channel/task:1";
    assert_error(app.post_json(path, None, &body).await, 401, "no token").await;
    let user = app.user_token("u");
    assert_error(
        app.post_json(path, Some(&user), &body).await,
        403,
        "user token",
    )
    .await;
    let reserved = json!({"type": "subscribed", "data": {}});
    assert_error(
        app.post_json(path, Some(&admin), &reserved).await,
        422,
        "reserved",
    )
    .await;
    let bad_task = json!({"type": "task_update", "data": {"status": "nope"}});
    assert_error(
        app.post_json(path, Some(&admin), &bad_task).await,
        422,
        "same validation",
    )
    .await;
    let get = async |path: &str, token: Option<&str>| {
        let mut request = app.http.get(app.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    };
    assert_error(get(path, Some(&user)).await, 403, "info is for publishers").await;
    let history = "/api/v1/channels/task:1/history";
    assert_error(get(history, None).await, 401, "history without a token").await;
    for query in ["?limit=0", "?limit=1001", "?since=-1", "?since=x"] {
        let response = get(&format!("{history}{query}"), Some(&user)).await;
        assert_error(response, 422, query).await;
    }
    for i in 0..5 {
        publish(&app, "task:1", "log", json!({"i": i})).await;
    }
    let page: Value = get(&format!("{history}?since=1&limit=2"), Some(&user))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["channel"], "task:1");
    assert_eq!(page["head"], 5);
    assert_eq!(page["complete"], true);
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(seqs(messages), [2, 3]);
    assert_eq!(messages[0]["data"]["i"], 1);
    assert_eq!(messages[0]["channel"], "task:1");
}

/// A subscriber that stops reading while a channel streams is closed with
/// 4503; resubscribing with its last seq gives it every message it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_gets_4503_and_loses_nothing_after_resume() {
    const SEND_QUEUE: usize = 32;
    let app = spawn_app_with(|s| {
        s.send_queue = SEND_QUEUE;
        s.channels.history = 100_000;
        s.channels.history_bytes = 1 << 30;
    })
    .await;
    let payload = "x".repeat(32 * 1024);
    let max_messages = crate::limits::bytes_to_overflow() / payload.len() + 4 * SEND_QUEUE;
    let (mut slow, _) = app.connect_ready(&app.user_token("slow")).await;
    let (_, subscribed) = subscribe(&mut slow, "run:big", None, None).await;
    let epoch = subscribed["epoch"].as_str().unwrap().to_owned();
    let admin = app.admin_token();
    let url = app.url("/api/v1/ws/channel/run:big");
    let body = json!({"type": "output", "data": {"text": payload}});
    let mut published = 0u64;
    while (published as usize) < max_messages {
        let batch =
            join_all((0..16).map(|_| app.http.post(&url).bearer_auth(&admin).json(&body).send()))
                .await;
        for response in batch {
            accepted(response.unwrap()).await;
            published += 1;
        }
        if app.stat("slow_consumer_disconnects").await >= 1 {
            break;
        }
    }
    assert!(
        app.stat("slow_consumer_disconnects").await >= 1,
        "never overflowed"
    );
    let got = slow.expect_close(4503).await;
    let got: Vec<u64> = got
        .iter()
        .filter(|f| f["channel"] == "run:big")
        .map(seq_of)
        .collect();
    assert_eq!(
        got,
        (1..=got.len() as u64).collect::<Vec<_>>(),
        "in order before the close"
    );
    let last = got.last().copied().unwrap_or(0);
    let (mut again, _) = app.connect_ready(&app.user_token("slow")).await;
    let (replayed, resumed) = subscribe(&mut again, "run:big", Some(last), Some(&epoch)).await;
    assert_eq!(resumed["complete"], true);
    assert_eq!(seqs(&replayed), (last + 1..=published).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_survive_a_clean_restart() {
    let mut app = spawn_app().await;
    let (mut client, _) = app.connect_ready(&app.user_token("u")).await;
    // Told before the first publish: the epoch must outlive the restart.
    let (_, unborn) = subscribe(&mut client, "task:r", None, None).await;
    let epoch = unborn["epoch"].as_str().unwrap().to_owned();
    for _ in 0..5 {
        publish(&app, "task:r", "log", json!({})).await;
    }
    assert_eq!(seq_of(&next_of(&mut client, "task:r").await), 1);
    drop(client);
    app.shutdown().await.unwrap();
    let data_dir = app.settings.data_dir.clone();
    let app = spawn_app_with(move |s| s.data_dir = data_dir).await;
    let (mut client, _) = app.connect_ready(&app.user_token("u")).await;
    let (replayed, resumed) = subscribe(&mut client, "task:r", Some(1), Some(&epoch)).await;
    assert_eq!(resumed["epoch"], epoch.as_str());
    assert_eq!(resumed["complete"], true);
    assert_eq!(seqs(&replayed), [2, 3, 4, 5]);
    assert_eq!(publish(&app, "task:r", "log", json!({})).await["seq"], 6);
    assert_eq!(seq_of(&next_of(&mut client, "task:r").await), 6);
}

/// A `kill -9` while a channel is being published to: after a restart, every
/// acknowledged message is in its history, under the same epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_publishing_to_a_channel_loses_nothing_acknowledged() {
    use crate::durability::{token, Server};
    let data = crate::helpers::DataDir::new();
    let mut server = Server::start(&data.0);
    let admin = token("admin", Role::Admin);
    let http = reqwest::Client::new();
    let url = server.url("/api/v1/ws/channel/run:k9");
    let publishers: Vec<_> = (0..4)
        .map(|_| {
            let (http, url, admin) = (http.clone(), url.clone(), admin.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                loop {
                    let sent = http
                        .post(&url)
                        .bearer_auth(&admin)
                        .json(&json!({"type": "log", "data": {"message": "step"}}))
                        .send()
                        .await;
                    match sent {
                        Ok(response) if response.status() == 202 => {
                            let body: Value = response.json().await.unwrap_or_default();
                            if let Some(seq) = body["seq"].as_u64() {
                                acked.push(seq);
                            }
                        }
                        _ => return acked,
                    }
                }
            })
        })
        .collect();
    let first: Value = http
        .get(server.url("/api/v1/channels/run:k9/history?limit=1"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        wait_until(WAIT, async || {
            let body: Value = http
                .get(server.url("/api/v1/ws/channel/run:k9"))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body["seq"].as_u64().unwrap_or(0) >= 200
        })
        .await,
        "publishing never got going"
    );
    server.kill9();
    let mut acked: Vec<u64> = Vec::new();
    for publisher in publishers {
        acked.extend(publisher.await.unwrap());
    }
    acked.sort_unstable();
    let server = Server::start(&data.0);
    let history: Value = http
        .get(server.url("/api/v1/channels/run:k9/history?since=0&limit=1000"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(history["epoch"], first["epoch"], "the same epoch");
    let kept: std::collections::HashSet<u64> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(seq_of)
        .collect();
    let lost: Vec<u64> = acked
        .iter()
        .filter(|seq| **seq + 1000 > history["head"].as_u64().unwrap())
        .filter(|seq| !kept.contains(seq))
        .copied()
        .collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    assert!(history["head"].as_u64().unwrap() >= *acked.last().unwrap());
}
