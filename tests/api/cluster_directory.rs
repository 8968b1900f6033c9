//! Accounts and API keys in cluster mode (SPEC §2, §6; issue 9): every node
//! shares one directory in Redis. A signup on one node logs in on all, a key
//! revoked on one node is refused by the next request on another, the
//! bootstrap admin is created once when nodes boot together, tenants stay
//! apart across nodes, and a Redis outage is a 503, never a 500 or a 401.

use std::time::Duration;

use agentcast::auth::Role;
use agentcast::config::Secret;
use serde_json::{json, Value};

use crate::accounts::{get_me, login, login_ok, signup, ADMIN_PASSWORD, SIGNUP};
use crate::api_keys::{create_key, list_keys, revoke_key};
use crate::cluster::two_nodes;
use crate::helpers::{accepted, assert_error, wait_until, DataDir};
use crate::logs::Binary;
use crate::redis_server::{spawn_node, RedisServer};

const PASSWORD: &str = "correct horse battery";

fn note(text: &str) -> Value {
    json!({"type": "notification", "data": {"text": text}})
}

/// Accounts in the directory of `prefix`, as Redis itself counts them.
fn accounts_in_redis(redis: &RedisServer, prefix: &str) -> u64 {
    let count = redis.cli(&["SCARD", &format!("{prefix}:users")]);
    count
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("SCARD: {count:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signup_on_one_node_logs_in_on_another() {
    let (_redis, a, b) = two_nodes("d1").await;
    let user = signup(&a, "alice", PASSWORD).await;
    let session = login_ok(&b, "Alice", PASSWORD).await;
    assert_eq!(session["user"], user, "the same account on node b");

    // A's token works on B's account endpoints (one directory, one secret).
    let on_a = login_ok(&a, "alice", PASSWORD).await;
    let token = on_a["token"].as_str().unwrap();
    let me = get_me(&b, token).await;
    assert_eq!(me.status(), 200);
    assert_eq!(me.json::<Value>().await.unwrap()["user"], user);

    // Names are unique across nodes, case-insensitively, as in SQLite.
    let taken = b
        .post_json(
            SIGNUP,
            None,
            &json!({"username": "ALICE", "password": PASSWORD}),
        )
        .await;
    assert_error(taken, 409, "alice signed up on a, ALICE on b").await;
    assert_eq!(
        login(&b, "alice", "wrong horse battery").await.status(),
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_made_on_one_node_publishes_on_another_and_its_revoke_is_immediate() {
    let (_redis, a, b) = two_nodes("d2").await;
    let (mut tab, _) = b.connect_ready(&b.user_token("alice")).await;
    let created = create_key(&a, &a.admin_token(), "deploy bot").await;
    let key = created["key"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();

    let receipt = accepted(b.post_broadcast(key, &note("from b")).await).await;
    assert_eq!(tab.expect_type("notification").await["seq"], receipt["seq"]);
    // Node b lists it, and sees its use (written by the lookup itself).
    let mut listed = Value::Null;
    let used = wait_until(Duration::from_secs(5), async || {
        listed = list_keys(&b, &b.admin_token()).await.json().await.unwrap();
        listed["api_keys"][0]["last_used_at"].is_string()
    })
    .await;
    assert!(used, "{listed}");
    assert_eq!(listed["api_keys"][0]["id"], id);
    assert!(!listed.to_string().contains(key), "never the key: {listed}");

    assert_eq!(revoke_key(&a, &a.admin_token(), id).await.status(), 204);
    // The very next request on the other node: no cache anywhere.
    assert_error(
        b.post_broadcast(key, &note("after revoke")).await,
        401,
        "a revoked key on another node",
    )
    .await;
    assert_error(
        a.post_broadcast(key, &note("after revoke")).await,
        401,
        "a revoked key on its own node",
    )
    .await;
    assert_eq!(revoke_key(&b, &b.admin_token(), id).await.status(), 404);
    let listed: Value = list_keys(&b, &b.admin_token()).await.json().await.unwrap();
    assert_eq!(listed["api_keys"], json!([]), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_booting_together_create_one_admin_with_the_configured_password() {
    let redis = RedisServer::start().await;
    let with_password = |s: &mut agentcast::config::Settings| {
        s.accounts.admin_password = Some(Secret::new(ADMIN_PASSWORD))
    };
    let (a, b, c) = tokio::join!(
        spawn_node(&redis, "d3", "a", with_password),
        spawn_node(&redis, "d3", "b", with_password),
        spawn_node(&redis, "d3", "c", with_password),
    );
    for node in [&a, &b, &c] {
        let session = login_ok(node, "admin", ADMIN_PASSWORD).await;
        assert_eq!(session["user"]["role"], "admin");
    }
    assert_eq!(accounts_in_redis(&redis, "d3"), 1, "one admin");
}

/// The password in a "created the first account" log line, if any.
fn generated_password(log: &str) -> Option<String> {
    let line = log
        .lines()
        .find(|l| l.contains("created the first account"))?;
    let start = line.find("password `")? + "password `".len();
    let end = start + line[start..].find('`')?;
    Some(line[start..end].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_three_binaries_booting_together_only_the_creator_prints_the_password() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let dirs: Vec<DataDir> = (0..3).map(|_| DataDir::new()).collect();
    let nodes: Vec<Binary> = std::thread::scope(|scope| {
        let starts: Vec<_> = dirs
            .iter()
            .enumerate()
            .map(|(i, dir)| {
                let (url, node) = (url.clone(), format!("n{i}"));
                scope.spawn(move || {
                    Binary::start(
                        &dir.0,
                        &[
                            ("REDIS_URL", url.as_str()),
                            ("REDIS_PREFIX", "d4"),
                            ("NODE_ID", node.as_str()),
                            ("JWT_SECRET", "a-shared-secret-of-the-three-nodes"),
                        ],
                    )
                })
            })
            .collect();
        starts.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let logs: Vec<String> = nodes
        .iter()
        .map(|n| n.output.lock().unwrap().clone())
        .collect();
    let printed: Vec<String> = logs.iter().filter_map(|l| generated_password(l)).collect();
    assert_eq!(printed.len(), 1, "exactly one node prints a password");
    assert_eq!(accounts_in_redis(&redis, "d4"), 1, "one admin");
    for node in &nodes {
        let response = node
            .http
            .post(format!("http://{}/api/v1/auth/login", node.addr))
            .json(&json!({"username": "admin", "password": printed[0]}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "the printed password works on every node"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_stay_apart_across_nodes() {
    let (_redis, a, b) = two_nodes("d5").await;
    let acme_admin = a.token("boss", Role::Admin, "acme");
    let globex_admin = b.token("boss", Role::Admin, "globex");
    let (mut acme_tab, _) = b.connect_ready(&b.token("u", Role::User, "acme")).await;
    let (mut globex_tab, _) = b.connect_ready(&b.token("u", Role::User, "globex")).await;

    // A key of acme, made on a, used on b: it publishes into acme only.
    let created = create_key(&a, &acme_admin, "acme bot").await;
    let key = created["key"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();
    accepted(b.post_broadcast(key, &note("acme by key")).await).await;
    assert_eq!(
        acme_tab.expect_type("notification").await["data"]["text"],
        "acme by key"
    );
    // Another tenant's admin neither sees nor revokes it, on any node.
    let listed: Value = list_keys(&b, &globex_admin).await.json().await.unwrap();
    assert_eq!(listed["api_keys"], json!([]), "{listed}");
    assert_eq!(revoke_key(&b, &globex_admin, id).await.status(), 404);

    // A broadcast of acme published on a.
    accepted(a.post_broadcast(&acme_admin, &note("acme by admin")).await).await;
    assert_eq!(
        acme_tab.expect_type("notification").await["data"]["text"],
        "acme by admin"
    );
    // globex's tab got neither; a globex publish still reaches it.
    accepted(b.post_broadcast(&globex_admin, &note("globex")).await).await;
    assert_eq!(
        globex_tab.expect_type("notification").await["data"]["text"],
        "globex",
        "nothing of acme came before globex's own message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_means_503_for_signup_login_me_and_keys_never_500_or_401() {
    let mut redis = RedisServer::start().await;
    let a = spawn_node(&redis, "d6", "a", |_| {}).await;
    signup(&a, "alice", PASSWORD).await;
    let token = login_ok(&a, "alice", PASSWORD).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = create_key(&a, &a.admin_token(), "bot").await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    redis.kill();

    let unavailable = |body: Value| assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let response = a
        .post_json(
            SIGNUP,
            None,
            &json!({"username": "bob", "password": PASSWORD}),
        )
        .await;
    unavailable(assert_error(response, 503, "signup with Redis down").await);
    unavailable(assert_error(login(&a, "alice", PASSWORD).await, 503, "login").await);
    unavailable(assert_error(get_me(&a, &token).await, 503, "me").await);
    let response = a.post_broadcast(&key, &note("x")).await;
    unavailable(assert_error(response, 503, "a key check with Redis down").await);
    let response = list_keys(&a, &a.admin_token()).await;
    unavailable(assert_error(response, 503, "key list").await);

    // Back with its data: the same accounts and keys, without a restart.
    redis.start_again().await;
    assert!(
        wait_until(Duration::from_secs(20), async || login(
            &a, "alice", PASSWORD
        )
        .await
        .status()
            == 200)
        .await,
        "logins recover by themselves"
    );
    accepted(a.post_broadcast(&key, &note("back")).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reset_password_changes_the_password_in_redis() {
    let redis = RedisServer::start().await;
    let a = spawn_node(&redis, "d7", "a", |s| {
        s.accounts.admin_password = Some(Secret::new(ADMIN_PASSWORD))
    })
    .await;
    // The admin exists once node a answers (it bootstraps before it accepts).
    login_ok(&a, "admin", ADMIN_PASSWORD).await;
    let b = spawn_node(&redis, "d7", "b", |_| {}).await;
    let chosen = "chosen-by-the-operator";
    let url = redis.url();
    let (status, stderr) = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let empty = DataDir::new();
        let mut child = Command::new(env!("CARGO_BIN_EXE_agentcast"))
            .args(["admin", "reset-password", "--username", "admin"])
            .arg("--password-stdin")
            .env_clear()
            .env("REDIS_URL", url)
            .env("REDIS_PREFIX", "d7")
            // No store here: the account is in Redis.
            .env("DATA_DIR", &empty.0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run agentcast");
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{chosen}").unwrap();
        drop(stdin);
        let output = child.wait_with_output().unwrap();
        (
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert!(status.success(), "reset-password on Redis failed: {stderr}");
    for node in [&a, &b] {
        assert_eq!(login(node, "admin", chosen).await.status(), 200);
        assert_eq!(login(node, "admin", ADMIN_PASSWORD).await.status(), 401);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_refused_while_redis_is_down_do_not_lock_the_account_out() {
    let mut redis = RedisServer::start().await;
    let a = spawn_node(&redis, "d8", "a", |_| {}).await;
    signup(&a, "alice", PASSWORD).await;
    redis.kill();
    // More unanswered logins than the limit of failures allows.
    for _ in 0..=a.settings.accounts.login_max_failures {
        assert_eq!(login(&a, "alice", PASSWORD).await.status(), 503);
    }
    redis.start_again().await;
    let mut status = 0;
    let recovered = wait_until(Duration::from_secs(20), async || {
        status = login(&a, "alice", PASSWORD).await.status().as_u16();
        status != 503
    })
    .await;
    assert!(recovered, "logins recover by themselves");
    assert_eq!(status, 200, "an outage is not a series of failed guesses");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_directory_makes_one_first_account_of_many_racing_and_keeps_its_rules() {
    use agentcast::directory::{DirectoryError, RedisDirectory};
    use agentcast::store::{hash_api_key, new_api_key};
    let server = RedisServer::start().await;
    let settings = agentcast::config::RedisSettings {
        url: Secret::new(server.url()),
        prefix: "d9".into(),
    };
    let redis = agentcast::redis::Redis::connect(&settings, "t")
        .await
        .unwrap();
    let directory = RedisDirectory::new(redis);
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g";

    let racers = (0..10).map(|i| {
        let directory = directory.clone();
        let name = format!("admin{i}");
        async move {
            directory
                .create_first_user("default", &name, hash, Role::Admin)
                .await
                .unwrap()
        }
    });
    let first: Vec<_> = futures_util::future::join_all(racers)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(first.len(), 1, "one first account of ten racing: {first:?}");
    assert_eq!(directory.count_users().await.unwrap(), 1);

    // Names: unique per tenant in any case, free in another tenant.
    let name = first[0].username.to_ascii_uppercase();
    let taken = directory
        .create_user("default", &name, hash, Role::User)
        .await;
    assert!(
        matches!(taken, Err(DirectoryError::Conflict(_))),
        "{taken:?}"
    );
    directory
        .create_user("acme", &name, hash, Role::User)
        .await
        .unwrap();
    let found = directory
        .user_by_name("default", &name)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (&found.user, found.password_hash.as_str()),
        (&first[0], hash)
    );
    assert_eq!(
        directory.user_by_id(&first[0].id).await.unwrap().as_ref(),
        Some(&first[0])
    );
    assert!(directory
        .user_by_name("default", "a b")
        .await
        .unwrap()
        .is_none());
    let bad = directory
        .create_user("default", "a b", hash, Role::User)
        .await;
    assert!(matches!(bad, Err(DirectoryError::Invalid(_))), "{bad:?}");

    // Keys: listed oldest first per tenant, revoked only by their tenant.
    let mut made = Vec::new();
    for name in ["one", "two", "three"] {
        let (key, key_hash, prefix) = new_api_key();
        let info = directory
            .create_api_key("acme", name, key_hash, &prefix)
            .await
            .unwrap();
        made.push((key, info));
    }
    made.sort_by(|a, b| (a.1.created_at_ms, &a.1.id).cmp(&(b.1.created_at_ms, &b.1.id)));
    let listed = directory.list_api_keys("acme").await.unwrap();
    let ids = |infos: &[agentcast::store::ApiKeyInfo]| -> Vec<String> {
        infos.iter().map(|k| k.id.clone()).collect()
    };
    let made_infos: Vec<_> = made.iter().map(|(_, info)| info.clone()).collect();
    assert_eq!(ids(&listed), ids(&made_infos));
    assert!(directory.list_api_keys("globex").await.unwrap().is_empty());
    let (key, info) = &made[0];
    let used = directory.use_api_key(hash_api_key(key)).await.unwrap();
    assert_eq!(used.map(|k| k.tenant), Some("acme".to_owned()));
    assert!(!directory.revoke_api_key("globex", &info.id).await.unwrap());
    assert!(directory.revoke_api_key("acme", &info.id).await.unwrap());
    assert!(!directory.revoke_api_key("acme", &info.id).await.unwrap());
    assert_eq!(
        directory.use_api_key(hash_api_key(key)).await.unwrap(),
        None
    );
    assert_eq!(directory.list_api_keys("acme").await.unwrap().len(), 2);
    let dump = server.cli(&["--scan", "--pattern", "d9:*"]);
    assert!(!dump.contains(key.as_str()), "never the key in a key name");
}
