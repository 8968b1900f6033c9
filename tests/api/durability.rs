//! The durable log (issue 3, SPEC §6): what was acknowledged survives a clean
//! stop and a `kill -9`, `seq` never goes back or repeats under one epoch, and
//! a store that cannot commit gets 503, never a 202.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use agentcast::auth::Role;
use agentcast::config::LogStoreKind;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{
    accepted, assert_error, claims, ready_address, seq_of, sign, spawn_app, spawn_app_with,
    summary, with_token_protocol, DataDir, TestApp, WsClient, WAIT,
};
use crate::resume::read_replay;

/// A second server on the data folder of `app` (which must be shut down).
async fn restart(app: &TestApp) -> TestApp {
    let data_dir = app.settings.data_dir.clone();
    let log_store = app.settings.log_store;
    spawn_app_with(move |s| {
        s.data_dir = data_dir;
        s.log_store = log_store;
    })
    .await
}

/// Resumes as `token` from `since` and returns the replayed seqs and the `replay` data.
async fn resume(app: &TestApp, token: &str, since: u64, epoch: &str) -> (Vec<u64>, Value) {
    let mut client = app.connect_resume(token, since, epoch).await;
    let connected = client.connected().await;
    assert_eq!(connected["epoch"], epoch, "same epoch after the restart");
    let (frames, replay) = read_replay(&mut client).await;
    (frames.iter().map(seq_of).collect(), replay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_keeps_every_acknowledged_message_and_the_epoch() {
    let mut app = spawn_app().await;
    let alice = app.user_token("alice");
    let bob = app.user_token("bob");
    let (mut live, connected) = app.connect_ready(&alice).await;
    let epoch = connected["epoch"].as_str().unwrap().to_owned();
    let seen = seq_of(&app.broadcast("notification", json!({"i": 0})).await);
    assert_eq!(seq_of(&live.next_json().await), seen);
    drop(live);

    // What alice misses: broadcasts and messages to her and to bob.
    let mut for_alice = Vec::new();
    let mut for_bob = Vec::new();
    for i in 1..=30 {
        let receipt = match i % 3 {
            0 => {
                app.send_to_user("bob", "notification", json!({"i": i}))
                    .await
            }
            1 => {
                app.send_to_user("alice", "notification", json!({"i": i}))
                    .await
            }
            _ => app.broadcast("notification", json!({"i": i})).await,
        };
        let seq = seq_of(&receipt);
        if i % 3 != 0 {
            for_alice.push(seq);
        }
        if i % 3 != 1 {
            for_bob.push(seq);
        }
    }
    let head = *for_alice.last().max(for_bob.last()).unwrap();
    app.shutdown().await.expect("clean shutdown");

    let again = restart(&app).await;
    let (replayed, replay) = resume(&again, &alice, seen, &epoch).await;
    assert_eq!(replayed, for_alice, "alice gets exactly what she missed");
    assert_eq!(
        replay,
        json!({"from": seen, "to": head, "count": for_alice.len(), "complete": true})
    );
    let (replayed, replay) = resume(&again, &bob, 0, &epoch).await;
    let mut expected = vec![seen];
    expected.extend(&for_bob);
    assert_eq!(replayed, expected, "bob's view: {replay}");
    assert_eq!(replay["complete"], true);

    let next = again.broadcast("notification", json!({})).await;
    assert_eq!(seq_of(&next), head + 1, "seq goes on from the head");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_log_store_forgets_on_restart() {
    let mut app = spawn_app_with(|s| s.log_store = LogStoreKind::Memory).await;
    let (_, connected) = app.connect_ready(&app.user_token("alice")).await;
    let epoch = connected["epoch"].as_str().unwrap().to_owned();
    app.broadcast("notification", json!({})).await;
    app.shutdown().await.expect("clean shutdown");

    let again = restart(&app).await;
    let mut client = again
        .connect_resume(&again.user_token("alice"), 1, &epoch)
        .await;
    let connected = client.connected().await;
    assert_ne!(connected["epoch"], epoch.as_str(), "a new history");
    let (_, replay) = read_replay(&mut client).await;
    assert_eq!(replay["complete"], false, "{replay}");
}

/// Another connection holds the SQLite write lock: the writer cannot commit
/// (after its busy timeout), so publishes get 503 — and nothing is delivered.
/// Once the lock is gone, publishing works again with a fresh seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_commit_answers_503_never_202() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_ready(&app.user_token("alice")).await;
    let first = seq_of(&app.broadcast("notification", json!({})).await);
    assert_eq!(seq_of(&client.next_json().await), first);

    let locker = lock_store(&app.settings.data_dir);
    let response = app
        .post_broadcast(
            &app.admin_token(),
            &json!({"type": "notification", "data": {"lost": true}}),
        )
        .await;
    let body = assert_error(response, 503, "publish while the store is locked").await;
    assert_eq!(body["error"]["code"], "unavailable");
    drop(locker);

    let frames = client.assert_alive().await;
    assert!(
        frames.is_empty(),
        "a refused message was delivered: {}",
        summary(&frames)
    );
    let next = seq_of(&app.broadcast("notification", json!({})).await);
    assert!(next > first, "{next} after {first}");
    assert_eq!(seq_of(&client.next_json().await), next);
}

/// Holds an immediate (write) transaction on the store file until dropped.
fn lock_store(data_dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(data_dir.join("agentcast.db")).expect("open the store");
    conn.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    conn
}

// ---- kill -9 with the real binary ---------------------------------------------------

pub const SECRET: &str = "crash-test-secret-crash-test-secret";

/// The `agentcast` binary serving on a free port of 127.0.0.1 (also the
/// cluster tests' node that gets SIGKILL).
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Server {
    pub fn start(data_dir: &Path) -> Server {
        Server::start_with(data_dir, &[])
    }

    /// With extra environment, e.g. `REDIS_URL` and `NODE_ID`.
    pub fn start_with(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_agentcast"))
            .args(["serve", "--bind", "127.0.0.1", "--port", "0"])
            .env("DATA_DIR", data_dir)
            .env("JWT_SECRET", SECRET)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env_remove("LOG_STORE")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the agentcast binary");
        let stdout = child.stdout.take().expect("piped stdout");
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        // Reads the log until the end, so the pipe never fills up.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = ready_address(&line) {
                    let _ = addr_tx.send(addr);
                }
            }
        });
        // Start-up includes opening the store and loading history: allow more than WAIT.
        let addr = addr_rx
            .recv_timeout(WAIT * 3)
            .expect("the server logged no 'ready on' line");
        Server { child, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn kill9(&mut self) {
        // std's kill is SIGKILL on Unix: no drain, no checkpoint.
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap the killed server");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn token(sub: &str, role: Role) -> String {
    sign(
        Algorithm::HS256,
        SECRET,
        &claims(sub, role, "default", 3600),
    )
}

pub async fn connect(server: &Server, token: &str, resume: Option<(u64, &str)>) -> WsClient {
    let query = resume.map_or(String::new(), |(since, epoch)| {
        format!("?since={since}&epoch={epoch}")
    });
    let url = format!("ws://{}/api/v1/ws/connect{query}", server.addr);
    WsClient::open(with_token_protocol(
        url.into_client_request().unwrap(),
        token,
    ))
    .await
}

/// Publishers post in a loop from several tasks; the server is killed with
/// SIGKILL mid-flight. After a restart every acknowledged seq is in the
/// history, the epoch is the same, and the next seq is above all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_publishing_loses_nothing_acknowledged() {
    const PUBLISHERS: usize = 6;
    const KILL_AFTER: usize = 300;
    let dir = DataDir::new();
    let mut server = Server::start(&dir.0);
    let user = token("watcher", Role::User);
    let mut client = connect(&server, &user, None).await;
    let epoch = client.connected().await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();

    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let (count_tx, mut count_rx) = watch::channel(0usize);
    let count_tx = Arc::new(count_tx);
    let admin = token("admin", Role::Admin);
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (http, acked, count_tx) = (http.clone(), acked.clone(), count_tx.clone());
            let (url, admin) = (server.url("/api/v1/ws/broadcast"), admin.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    let sent = http
                        .post(&url)
                        .bearer_auth(&admin)
                        .json(&json!({"type": "notification", "data": {"p": p, "i": i}}))
                        .send()
                        .await;
                    // The server died: anything unanswered was never acknowledged.
                    let Ok(response) = sent else { return };
                    if response.status() != 202 {
                        return;
                    }
                    let Ok(body) = response.json::<Value>().await else {
                        return;
                    };
                    let seq = seq_of(&body);
                    let mut acked = acked.lock().unwrap();
                    acked.push(seq);
                    count_tx.send_replace(acked.len());
                }
            })
        })
        .collect();
    // (The watch `Ref` holds a lock the publishers need: drop it at once.)
    let reached = tokio::time::timeout(WAIT * 3, count_rx.wait_for(|n| *n >= KILL_AFTER))
        .await
        .map(|r| r.is_ok());
    assert_eq!(
        reached,
        Ok(true),
        "the publishers stalled before {KILL_AFTER} acks"
    );
    server.kill9();
    for publisher in publishers {
        tokio::time::timeout(WAIT * 2, publisher)
            .await
            .expect("a publisher hung after the kill")
            .unwrap();
    }
    drop(client);
    let mut acked = acked.lock().unwrap().clone();
    acked.sort_unstable();
    assert!(acked.len() >= KILL_AFTER);
    assert!(
        acked.windows(2).all(|w| w[0] < w[1]),
        "a seq was acknowledged twice"
    );

    let server = Server::start(&dir.0);
    let mut client = connect(&server, &user, Some((0, &epoch))).await;
    let connected = client.connected().await;
    assert_eq!(
        connected["epoch"],
        epoch.as_str(),
        "same epoch after kill -9"
    );
    let head = connected["seq"].as_u64().unwrap();
    let (frames, replay) = read_replay(&mut client).await;
    assert_eq!(replay["complete"], true, "{replay}");
    let replayed: Vec<u64> = frames.iter().map(seq_of).collect();
    assert!(
        replayed.windows(2).all(|w| w[0] < w[1]),
        "history in seq order, each once"
    );
    let missing: Vec<u64> = acked
        .iter()
        .filter(|seq| replayed.binary_search(seq).is_err())
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but lost after kill -9: {missing:?}"
    );
    let max_acked = *acked.last().unwrap();
    assert!(head >= max_acked, "head {head} below acked {max_acked}");

    let response = http
        .post(server.url("/api/v1/ws/broadcast"))
        .bearer_auth(&admin)
        .json(&json!({"type": "notification", "data": {}}))
        .send()
        .await
        .unwrap();
    let next = seq_of(&accepted(response).await);
    assert!(
        next > head && next > max_acked,
        "seq went back: {next} after head {head}"
    );
    assert_eq!(seq_of(&client.next_json().await), next);
}
