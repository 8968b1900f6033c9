//! Issue 8, the store's findings: history bounded by bytes too (finding 13,
//! SPEC §4.3), in memory and in what a restart reloads; views that never show
//! a user the fields of a message addressed to someone else (finding 4, §5);
//! and the CLI papercuts (`token` without a secret, `admin reset-password`).

use serde_json::{json, Value};

use crate::helpers::{get_view, seq_of, spawn_app_with, DataDir, TestApp};
use crate::resume::read_replay;

/// `HISTORY_BYTES` of the byte-bound tests.
const HISTORY_BYTES: usize = 64 * 1024;

/// A server on `data_dir` keeping at most [`HISTORY_BYTES`] of history.
async fn bounded_app(data_dir: &DataDir) -> TestApp {
    let path = data_dir.0.clone();
    spawn_app_with(move |s| {
        s.data_dir = path;
        s.history_bytes = HISTORY_BYTES;
    })
    .await
}

/// Resumes as a user from `since` and returns the replayed seqs and the `replay` data.
async fn resume(app: &TestApp, since: u64, epoch: &str) -> (Vec<u64>, Value) {
    let mut client = app
        .connect_resume(&app.user_token("alice"), since, epoch)
        .await;
    let connected = client.connected().await;
    assert_eq!(connected["epoch"], epoch, "same epoch");
    let (frames, replay) = read_replay(&mut client).await;
    (frames.iter().map(seq_of).collect(), replay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_bytes_bounds_the_resume_before_history_size_and_after_a_restart() {
    let data_dir = DataDir::new();
    let mut app = bounded_app(&data_dir).await;
    let (_, connected) = app.connect_ready(&app.user_token("alice")).await;
    let epoch = connected["epoch"].as_str().unwrap().to_owned();
    // 40 frames of 4 KiB and a little envelope: 160 KiB, far under HISTORY_SIZE
    // (10,000) by count. 64 KiB hold 15 of them (16 would need frames of
    // exactly 4096 bytes, and the envelope adds ~100).
    let pad = "x".repeat(4096);
    let mut seqs = Vec::new();
    for i in 0..40 {
        seqs.push(seq_of(
            &app.broadcast("notification", json!({"i": i, "pad": pad}))
                .await,
        ));
    }
    let newest: Vec<u64> = seqs[seqs.len() - 15..].to_vec();

    let (replayed, replay) = resume(&app, 0, &epoch).await;
    assert_eq!(
        replay["complete"], false,
        "bytes trimming dropped the oldest: {replay}"
    );
    assert_eq!(
        replayed, newest,
        "only the newest that fit in HISTORY_BYTES"
    );
    // From the last one trimmed, nothing is missing.
    let (replayed, replay) = resume(&app, newest[0] - 1, &epoch).await;
    assert_eq!(replay["complete"], true, "{replay}");
    assert_eq!(replayed, newest);

    app.shutdown().await.expect("clean shutdown");
    let app = bounded_app(&data_dir).await;
    let (replayed, replay) = resume(&app, 0, &epoch).await;
    assert_eq!(replay["complete"], false, "after the restart too: {replay}");
    assert_eq!(replayed, newest, "the reload obeys HISTORY_BYTES");
    assert_eq!(replay["to"], *seqs.last().unwrap());
}

/// The entry of `list` whose `key` is `id`.
fn entry<'a>(body: &'a Value, list: &str, key: &str, id: &str) -> &'a Value {
    body[list]
        .as_array()
        .and_then(|entries| entries.iter().find(|e| e[key] == id))
        .unwrap_or_else(|| panic!("no {id} in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_never_show_bob_the_fields_of_a_message_to_alice() {
    let app = spawn_app_with(|_| {}).await;
    app.send_to_user(
        "alice",
        "task_update",
        json!({"task_id": "t1", "status": "running", "query": "alice's query", "progress": 40}),
    )
    .await;
    let seq = seq_of(
        &app.send_to_user(
            "bob",
            "task_update",
            json!({"task_id": "t1", "status": "completed"}),
        )
        .await,
    );
    app.send_to_user(
        "alice",
        "agent_update",
        json!({"agent_id": "a1", "action": "registered", "name": "alice's agent"}),
    )
    .await;
    app.send_to_user(
        "bob",
        "agent_update",
        json!({"agent_id": "a1", "action": "updated"}),
    )
    .await;

    let bob = app.user_token("bob");
    let tasks = get_view(&app, "/api/v1/tasks", &bob).await;
    let t1 = entry(&tasks, "tasks", "task_id", "t1");
    assert_eq!(
        (&t1["status"], &t1["seq"]),
        (&json!("completed"), &json!(seq)),
        "{t1}"
    );
    assert!(
        t1["query"].is_null() && t1["progress"].is_null(),
        "bob sees alice's fields: {t1}"
    );
    assert!(!tasks.to_string().contains("alice's"), "{tasks}");
    let agents = get_view(&app, "/api/v1/agents", &bob).await;
    let a1 = entry(&agents, "agents", "agent_id", "a1");
    assert!(a1["name"].is_null(), "bob sees alice's agent name: {a1}");
    assert!(!agents.to_string().contains("alice's"), "{agents}");

    // The admin sees the latest entry, all of it: what bob's message set.
    let admin = app.admin_token();
    let tasks = get_view(&app, "/api/v1/tasks", &admin).await;
    let t1 = entry(&tasks, "tasks", "task_id", "t1");
    assert_eq!(
        (&t1["status"], &t1["seq"]),
        (&json!("completed"), &json!(seq)),
        "{t1}"
    );
    assert_eq!(t1["data"], json!({"task_id": "t1", "status": "completed"}));
    let agents = get_view(&app, "/api/v1/agents", &admin).await;
    assert_eq!(
        entry(&agents, "agents", "agent_id", "a1")["data"]["action"],
        "updated"
    );
    // And alice no longer sees an entry bob's message set.
    let alice = get_view(&app, "/api/v1/tasks", &app.user_token("alice")).await;
    assert_eq!(alice["tasks"], json!([]), "{alice}");
}

/// Runs the real `agentcast` binary with `args` and no inherited environment
/// (so no `JWT_SECRET` or `DATA_DIR` of the caller leaks in), feeding `stdin`;
/// returns the exit status, stdout and stderr.
async fn agentcast(args: &[&str], stdin: &str) -> (std::process::ExitStatus, String, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_agentcast"))
            .args(&args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run agentcast");
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(stdin.as_bytes()).expect("write stdin");
        drop(input);
        let output = child.wait_with_output().expect("agentcast output");
        (
            output.status,
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .expect("the agentcast task")
}

#[tokio::test]
async fn token_refuses_without_a_secret_instead_of_making_one() {
    let data_dir = DataDir::new();
    let dir = data_dir.0.to_str().unwrap();
    let (status, stdout, stderr) =
        agentcast(&["token", "--sub", "alice", "--data-dir", dir], "").await;
    assert!(!status.success(), "token must refuse: {stdout}");
    assert!(stdout.is_empty(), "no token printed: {stdout}");
    let secret = data_dir.0.join("jwt_secret");
    assert!(
        stderr.contains(&secret.display().to_string())
            && stderr.contains("--data-dir")
            && stderr.contains("JWT_SECRET"),
        "says which secret it looked for and what chooses it: {stderr}"
    );
    assert!(!secret.exists(), "no new secret was created");
}

/// The status of a login as `admin` with `password`.
async fn login(app: &TestApp, password: &str) -> u16 {
    let body = json!({"username": "admin", "password": password});
    app.post_json("/api/v1/auth/login", None, &body)
        .await
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reset_password_works_on_a_running_servers_data_folder() {
    use agentcast::config::Secret;
    let data_dir = DataDir::new();
    let path = data_dir.0.clone();
    let old = "the-old-admin-password";
    let app = spawn_app_with(move |s| {
        s.data_dir = path;
        s.accounts.admin_password = Some(Secret::new(old));
    })
    .await;
    assert_eq!(login(&app, old).await, 200, "the bootstrap password first");

    let dir = data_dir.0.to_str().unwrap();
    let (status, stdout, stderr) = agentcast(
        &[
            "admin",
            "reset-password",
            "--username",
            "admin",
            "--data-dir",
            dir,
        ],
        "",
    )
    .await;
    assert!(status.success(), "reset-password failed: {stderr}");
    let new = stdout.trim();
    assert!(
        new.len() >= 16,
        "a random password printed once: {stdout:?}"
    );
    assert!(!stderr.contains(new), "the password only on stdout");
    assert_eq!(login(&app, new).await, 200, "the new password logs in");
    assert_eq!(login(&app, old).await, 401, "the old one no longer does");

    // From stdin, for scripts.
    let chosen = "chosen-by-the-operator";
    let (status, stdout, stderr) = agentcast(
        &[
            "admin",
            "reset-password",
            "--username",
            "admin",
            "--password-stdin",
            "--data-dir",
            dir,
        ],
        &format!("{chosen}\n"),
    )
    .await;
    assert!(
        status.success(),
        "reset-password --password-stdin failed: {stderr}"
    );
    assert!(
        !stdout.contains(chosen) && !stderr.contains(chosen),
        "{stdout} {stderr}"
    );
    assert_eq!(login(&app, chosen).await, 200);
    assert_eq!(login(&app, new).await, 401);

    let (status, _, stderr) = agentcast(
        &[
            "admin",
            "reset-password",
            "--username",
            "nobody",
            "--data-dir",
            dir,
        ],
        "",
    )
    .await;
    assert!(!status.success());
    assert!(stderr.contains("no account \"nobody\""), "{stderr}");
}
