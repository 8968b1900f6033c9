//! Ordering, history and resume (SPEC §4.3): nothing lost, nothing twice.

use agentcast::auth::Role;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::helpers::{accepted, seq_of, spawn_app, spawn_app_with, summary, WsClient, WAIT};
use crate::publish::broadcast_n;

/// Reads a resumed connection up to and including its `replay` frame; returns
/// the replayed frames and the `replay` data.
pub(crate) async fn read_replay(client: &mut WsClient) -> (Vec<Value>, Value) {
    let mut replayed = Vec::new();
    loop {
        let frame = client.next_json().await;
        if frame["type"] == "replay" {
            return (replayed, frame["data"].clone());
        }
        assert_ne!(frame["type"], "connected", "a second connected frame");
        replayed.push(frame);
    }
}

/// The `replay` frame agrees with what came before it.
fn assert_replay_consistent(replay: &Value, replayed: &[Value], since: u64) {
    assert_eq!(
        replay["from"], since,
        "replay.from is the since asked for: {replay}"
    );
    assert_eq!(
        replay["count"],
        replayed.len() as u64,
        "replay.count counts the replayed frames: {replay} after {}",
        summary(replayed)
    );
    let to = replay["to"]
        .as_u64()
        .unwrap_or_else(|| panic!("replay.to: {replay}"));
    let seqs: Vec<u64> = replayed.iter().map(seq_of).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "replayed frames in seq order: {seqs:?}"
    );
    assert!(
        seqs.iter().all(|s| *s > since && *s <= to),
        "replayed seqs within (from, to]: {seqs:?}, {replay}"
    );
    assert!(replay["complete"].is_boolean(), "replay.complete: {replay}");
}

/// One task publishes without pause (broadcasts, to alice, to bob) while alice
/// reads, drops her connection, and resumes: her whole received sequence is
/// exactly the published one addressed to her.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_while_publishing_loses_nothing_and_duplicates_nothing() {
    const TOTAL: usize = 400;
    let app = spawn_app().await;
    let token = app.user_token("alice");
    let (mut first, connected) = app.connect_ready(&token).await;
    let epoch = connected["epoch"].as_str().unwrap().to_owned();
    assert_eq!(connected["seq"], 0);

    let (head_tx, mut head_rx) = watch::channel(0u64);
    let http = app.http.clone();
    let admin = app.admin_token();
    let broadcast_url = app.url("/api/v1/ws/broadcast");
    let alice_url = app.url("/api/v1/ws/user/alice");
    let bob_url = app.url("/api/v1/ws/user/bob");
    let publisher = tokio::spawn(async move {
        let mut for_alice = Vec::new();
        for i in 0..=TOTAL {
            let (url, kind, to_alice) = match i % 4 {
                _ if i == TOTAL => (&broadcast_url, "done", true),
                0 | 1 => (&broadcast_url, "notification", true),
                2 => (&alice_url, "notification", true),
                _ => (&bob_url, "notification", false),
            };
            let response = http
                .post(url)
                .bearer_auth(&admin)
                .json(&json!({"type": kind, "data": {"i": i}}))
                .send()
                .await
                .unwrap();
            let seq = seq_of(&accepted(response).await);
            if to_alice {
                for_alice.push(seq);
            }
            head_tx.send_replace(seq);
        }
        for_alice
    });

    // Alice reads a while, then her connection drops.
    let mut received = Vec::new();
    while received.len() < 50 {
        let frame = first.next_json().await;
        received.push(seq_of(&frame));
    }
    let since = *received.last().unwrap();
    drop(first);
    // Let the log move on so the resume has something to replay (bounded wait).
    // (The watch `Ref` holds a lock the publisher needs: drop it at once.)
    let moved = tokio::time::timeout(WAIT, head_rx.wait_for(|head| *head >= since + 12))
        .await
        .map(|r| r.is_ok());
    assert_eq!(moved, Ok(true), "the publisher stalled");

    let mut second = app.connect_resume(&token, since, &epoch).await;
    second.connected().await;
    let (replayed, replay) = read_replay(&mut second).await;
    assert_replay_consistent(&replay, &replayed, since);
    assert_eq!(replay["complete"], true, "{replay}");
    assert!(
        !replayed.is_empty(),
        "the log moved past since={since}, yet nothing was replayed: {replay}"
    );
    let to = replay["to"].as_u64().unwrap();
    let mut live = Vec::new();
    loop {
        let frame = second.next_json().await;
        live.push(seq_of(&frame));
        if frame["type"] == "done" {
            break;
        }
    }
    assert!(
        live.iter().all(|s| *s > to),
        "live frames all come after replay.to={to}: {live:?}"
    );

    let published = publisher.await.unwrap();
    received.extend(replayed.iter().map(seq_of));
    received.extend(live);
    assert_eq!(
        received.len(),
        published.len(),
        "received {} frames, {} were addressed to alice",
        received.len(),
        published.len()
    );
    assert_eq!(
        received, published,
        "the received sequence is the published one: no gap, no duplicate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_only_what_is_addressed_to_the_user() {
    let app = spawn_app().await;
    let (_, connected) = app.connect_ready(&app.user_token("alice")).await;
    let epoch = connected["epoch"].as_str().unwrap().to_owned();
    let b1 = app.broadcast("notification", json!({})).await;
    app.send_to_user("bob", "notification", json!({})).await;
    let a = app.send_to_user("alice", "notification", json!({})).await;
    let b2 = app.broadcast("notification", json!({})).await;

    let mut client = app
        .connect_resume(&app.user_token("alice"), 0, &epoch)
        .await;
    let connected = client.connected().await;
    assert_eq!(connected["seq"], 4, "{connected}");
    let (replayed, replay) = read_replay(&mut client).await;

    assert_replay_consistent(&replay, &replayed, 0);
    let seqs: Vec<u64> = replayed.iter().map(seq_of).collect();
    assert_eq!(seqs, [seq_of(&b1), seq_of(&a), seq_of(&b2)]);
    assert_eq!(
        replay,
        json!({"from": 0, "to": 4, "count": 3, "complete": true})
    );
    // Then live.
    let live = app.broadcast("notification", json!({})).await;
    assert_eq!(client.next_json().await["seq"], live["seq"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_at_the_head_replays_nothing_and_is_complete() {
    let app = spawn_app().await;
    broadcast_n(&app, 3).await;
    let (_, connected) = app.connect_ready(&app.user_token("alice")).await;
    let epoch = connected["epoch"].as_str().unwrap().to_owned();

    let mut client = app
        .connect_resume(&app.user_token("alice"), 3, &epoch)
        .await;
    client.connected().await;

    let (replayed, replay) = read_replay(&mut client).await;
    assert!(replayed.is_empty(), "{}", summary(&replayed));
    assert_eq!(
        replay,
        json!({"from": 3, "to": 3, "count": 0, "complete": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_a_foreign_epoch_is_incomplete() {
    let app = spawn_app().await;
    let seqs = broadcast_n(&app, 5).await;
    // The epoch of another tenant's log is foreign here too.
    let (_, other) = app
        .connect_ready(&app.token("zed", Role::User, "acme"))
        .await;
    let acme_epoch = other["epoch"].as_str().unwrap().to_owned();

    for epoch in ["not-the-epoch", acme_epoch.as_str()] {
        let mut client = app.connect_resume(&app.user_token("alice"), 2, epoch).await;
        client.connected().await;
        let (replayed, replay) = read_replay(&mut client).await;
        assert_replay_consistent(&replay, &replayed, 2);
        assert_eq!(replay["complete"], false, "epoch {epoch:?}: {replay}");
        // Live messages still follow.
        let live = app.broadcast("notification", json!({})).await;
        assert_eq!(
            client.next_json().await["seq"],
            live["seq"],
            "epoch {epoch:?}"
        );
    }
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_before_the_history_is_incomplete() {
    let app = spawn_app_with(|s| s.history_size = 5).await;
    let (_, connected) = app.connect_ready(&app.user_token("alice")).await;
    let epoch = connected["epoch"].as_str().unwrap().to_owned();
    broadcast_n(&app, 20).await;

    let mut client = app
        .connect_resume(&app.user_token("alice"), 2, &epoch)
        .await;
    client.connected().await;
    let (replayed, replay) = read_replay(&mut client).await;

    assert_replay_consistent(&replay, &replayed, 2);
    assert_eq!(
        replay["complete"], false,
        "seq 3..=15 are gone from a 5-message history: {replay}"
    );
    assert_eq!(replay["to"], 20, "{replay}");
    // Whatever is replayed is the tail of the history, without holes.
    let seqs: Vec<u64> = replayed.iter().map(seq_of).collect();
    if let (Some(first), Some(last)) = (seqs.first(), seqs.last()) {
        assert_eq!(*last, 20, "{seqs:?}");
        assert_eq!(seqs, (*first..=20).collect::<Vec<_>>());
        assert!(seqs.len() <= 5, "{seqs:?}");
    }

    // Within the history it is complete again.
    let mut client = app
        .connect_resume(&app.user_token("alice"), 15, &epoch)
        .await;
    client.connected().await;
    let (replayed, replay) = read_replay(&mut client).await;
    assert_eq!(
        replayed.iter().map(seq_of).collect::<Vec<_>>(),
        [16, 17, 18, 19, 20]
    );
    assert_eq!(
        replay,
        json!({"from": 15, "to": 20, "count": 5, "complete": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_since_gets_no_replay_frame() {
    let app = spawn_app().await;
    broadcast_n(&app, 3).await;
    let (mut client, _) = app.connect_ready(&app.user_token("alice")).await;
    let live = app.broadcast("notification", json!({})).await;
    let frame = client.next_json().await;
    assert_eq!(
        frame["seq"], live["seq"],
        "without since, only live messages follow `connected`: {frame}"
    );
}
