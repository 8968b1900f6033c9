//! Limits (SPEC §4.2–4.3): connections per user and in total, client frame
//! floods (4429), and slow consumers (4503) that must not hurt anyone else.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::json;
use tokio::sync::watch;

use crate::helpers::{accepted, seq_of, spawn_app_with, summary, Event, WsClient, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_user_limit_are_closed_with_4429() {
    let app = spawn_app_with(|s| s.max_connections_per_user = 2).await;
    let alice = app.user_token("alice");
    let (first, _) = app.connect_ready(&alice).await;
    let (_second, _) = app.connect_ready(&alice).await;

    let mut third = app.connect(&alice).await;
    match third.next_event().await {
        Event::Closed(code) => assert_eq!(code, Some(4429), "third tab of alice"),
        other => panic!("third tab of alice: expected a 4429 close, got {other:?}"),
    }
    // Other users are not affected.
    let (_bob, connected) = app.connect_ready(&app.user_token("bob")).await;
    assert_eq!(connected["user_id"], "bob");
    // The same user id in another tenant is another user.
    let (_acme_alice, _) = app
        .connect_ready(&app.token("alice", agentcast::auth::Role::User, "acme"))
        .await;

    // A freed slot can be used again.
    first.close().await;
    app.wait_for_stat("current_connections", |n| n == 3).await;
    app.connect_ready(&alice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_global_limit_are_closed_with_4429() {
    let app = spawn_app_with(|s| s.max_connections = 2).await;
    let (first, _) = app.connect_ready(&app.user_token("alice")).await;
    let (_second, _) = app.connect_ready(&app.user_token("bob")).await;

    let mut third = app.connect(&app.user_token("carol")).await;
    match third.next_event().await {
        Event::Closed(code) => assert_eq!(code, Some(4429), "third connection"),
        other => panic!("third connection: expected a 4429 close, got {other:?}"),
    }
    let stats = app.get_stats().await;
    assert_eq!(stats["current_connections"], 2, "{stats}");

    first.close().await;
    app.wait_for_stat("current_connections", |n| n == 1).await;
    let (_carol, connected) = app.connect_ready(&app.user_token("carol")).await;
    assert_eq!(connected["user_id"], "carol");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_frame_flood_is_closed_with_4429() {
    let app = spawn_app_with(|s| {
        s.client_frame_rate = 1.0;
        s.client_frame_burst = 5.0;
    })
    .await;
    let (mut flooder, _) = app.connect_ready(&app.user_token("flooder")).await;
    let (mut calm, _) = app.connect_ready(&app.user_token("calm")).await;

    // Far more than the burst, as fast as possible; sends may fail once the server closes.
    let ping = json!({"type": "ping"}).to_string();
    for _ in 0..60 {
        use futures_util::SinkExt;
        let sent = tokio::time::timeout(
            WAIT,
            flooder
                .ws
                .send(tokio_tungstenite::tungstenite::Message::text(ping.clone())),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            break;
        }
    }
    let before = flooder.expect_close(4429).await;
    assert!(
        before
            .iter()
            .all(|f| f["type"] == "pong" || f["type"] == "error"),
        "{}",
        summary(&before)
    );
    assert!(
        before.len() < 60,
        "every ping of the flood was answered: {}",
        before.len()
    );

    // The flood cost nobody else anything.
    calm.assert_alive().await;
    let receipt = app.broadcast("notification", json!({})).await;
    assert_eq!(receipt["recipients"], 1, "{receipt}");
    assert_eq!(calm.next_json().await["seq"], receipt["seq"]);
}

/// Enough bytes to fill every buffer between the server and a client that does
/// not read (its socket send buffer, the client's receive buffer) and then the
/// outbound queue, whatever the server does first.
pub(crate) fn bytes_to_overflow() -> usize {
    let max_of = |path: &str, fallback: usize| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.split_whitespace().last().and_then(|n| n.parse().ok()))
            .unwrap_or(fallback)
    };
    max_of("/proc/sys/net/ipv4/tcp_rmem", 6 << 20) + max_of("/proc/sys/net/ipv4/tcp_wmem", 4 << 20)
}

/// A client that stops reading while thousands of large messages flow is closed
/// with 4503; a client that reads receives every message; the slow one, when it
/// reads again, finds the frames that were on their way and then the close, and
/// a resume gives it everything it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_with_4503_and_nobody_else_notices() {
    const SEND_QUEUE: usize = 64;
    const BATCH: usize = 16;
    let app = spawn_app_with(|s| s.send_queue = SEND_QUEUE).await;
    let payload = "x".repeat(32 * 1024);
    let max_messages = bytes_to_overflow() / payload.len() + 4 * SEND_QUEUE;

    let (slow, connected) = app.connect_ready(&app.user_token("slow")).await;
    let epoch = connected["epoch"].as_str().unwrap().to_owned();
    let (mut fast, _) = app.connect_ready(&app.user_token("fast")).await;

    // The fast client reads in its own task and reports how far it got.
    let (fast_tx, mut fast_rx) = watch::channel(0usize);
    let fast_reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        loop {
            let frame = fast.next_json().await;
            seqs.push(seq_of(&frame));
            fast_tx.send_replace(seqs.len());
            if frame["type"] == "done" {
                return (fast, seqs);
            }
        }
    });

    // Publish in batches no larger than the queue, each time letting the fast
    // client catch up (so only the slow one can overflow), until the server
    // reports the slow consumer or enough bytes flowed to overflow any buffer.
    let admin = app.admin_token();
    let body = json!({"type": "notification", "data": {"pad": payload}});
    let mut published = Vec::new();
    while published.len() < max_messages {
        let batch = join_all((0..BATCH).map(|_| app.post_broadcast(&admin, &body))).await;
        for response in batch {
            published.push(seq_of(&accepted(response).await));
        }
        // (The watch `Ref` holds a lock the reader needs: drop it at once.)
        let caught_up = tokio::time::timeout(WAIT, fast_rx.wait_for(|n| *n >= published.len()))
            .await
            .map(|r| r.is_ok());
        assert_eq!(
            caught_up,
            Ok(true),
            "the fast client fell behind at {} messages",
            published.len()
        );
        if app.stat("slow_consumer_disconnects").await >= 1 {
            break;
        }
    }
    // The slow client reads again, at once (the server waits only a few seconds
    // for a closing socket to drain): the frames that were on their way, then 4503.
    let slow_reader = tokio::spawn(async move {
        let mut slow = slow;
        slow.expect_close(4503).await
    });
    published.sort_unstable();
    let done = seq_of(&app.broadcast("done", json!({})).await);
    published.push(done);

    let (_fast, fast_seqs) = tokio::time::timeout(WAIT, fast_reader)
        .await
        .expect("fast reader stuck")
        .unwrap();
    assert_eq!(
        fast_seqs.len(),
        published.len(),
        "the reading client lost or duplicated messages"
    );
    assert_eq!(
        fast_seqs, published,
        "the reading client got every message, in order"
    );

    let queued = slow_reader
        .await
        .expect("the slow client's reader panicked");
    let seqs: Vec<u64> = queued.iter().map(seq_of).collect();
    assert!(
        !seqs.is_empty(),
        "no frame reached the slow client before its close"
    );
    assert_eq!(
        seqs,
        published[..seqs.len()].to_vec(),
        "the slow client's frames are a gapless prefix: {}",
        summary(&queued)
    );
    assert!(
        seqs.len() < published.len(),
        "the slow client got everything: it was never slow"
    );

    assert_eq!(
        app.stat("slow_consumer_disconnects").await,
        1,
        "exactly one slow consumer"
    );
    app.wait_for_stat("current_connections", |n| n == 1).await;

    // After resume it has lost nothing.
    let since = *seqs.last().unwrap();
    let mut resumed: WsClient = app
        .connect_resume(&app.user_token("slow"), since, &epoch)
        .await;
    resumed.connected().await;
    let mut rest = Vec::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), resumed.next_json())
            .await
            .expect("resume stalled");
        if frame["type"] == "replay" {
            assert_eq!(frame["data"]["complete"], true, "{frame}");
            assert_eq!(frame["data"]["count"], rest.len() as u64, "{frame}");
            break;
        }
        rest.push(seq_of(&frame));
    }
    let mut all = seqs;
    all.extend(rest);
    assert_eq!(
        all, published,
        "slow client after resume: nothing lost, nothing twice"
    );
}
