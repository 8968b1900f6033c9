//! What the real binary writes to its log (SPEC §1, §2): never a password, a
//! token, an API key or the JWT secret, even at `RUST_LOG=debug`; the one
//! exception is the generated bootstrap admin password, printed once. Nor the
//! password of a `rediss://` REDIS_URL, tried against a real TLS `redis-server`.
//!
//! These tests run `agentcast` itself (`CARGO_BIN_EXE_agentcast`) so they see
//! exactly what an operator's log would hold, from every crate.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{ready_address, with_token_protocol, DataDir, WsClient, WAIT};

/// A running `agentcast` process and everything it has written so far (also
/// used by `hardening_ws` to watch the process's memory).
pub(crate) struct Binary {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) output: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    pub(crate) http: reqwest::Client,
}

impl Binary {
    /// Starts the binary on a free port with `env` (and nothing inherited), and
    /// waits (bounded) for its "ready on" line.
    pub(crate) fn start(data_dir: &Path, env: &[(&str, &str)]) -> Binary {
        let mut command = Command::new(env!("CARGO_BIN_EXE_agentcast"));
        command
            .env_clear()
            .env("BIND", "127.0.0.1")
            .env("PORT", "0")
            .env("DATA_DIR", data_dir)
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .env("SHUTDOWN_TIMEOUT", "5s")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("start the agentcast binary");
        let output = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            capture(child.stdout.take().expect("stdout"), output.clone()),
            capture(child.stderr.take().expect("stderr"), output.clone()),
        ];
        let deadline = Instant::now() + WAIT;
        let addr = loop {
            if let Some(addr) = ready_address(&output.lock().unwrap()) {
                break addr;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "agentcast exited with {status} before it was ready:\n{}",
                    output.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agentcast was not ready within {WAIT:?}:\n{}",
                output.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(WAIT)
            .build()
            .expect("build the HTTP client");
        Binary {
            child,
            addr,
            output,
            readers,
            http,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/api/v1/ws/connect{}", self.addr, query)
    }

    async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> reqwest::Response {
        let mut request = self.http.post(self.url(path)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("POST to the binary failed")
    }

    /// Logs in and returns the token.
    async fn login(&self, username: &str, password: &str) -> String {
        let response = self
            .post(
                "/api/v1/auth/login",
                None,
                &json!({"username": username, "password": password}),
            )
            .await;
        assert_eq!(response.status(), 200, "login {username}");
        let body: Value = response.json().await.unwrap();
        body["token"].as_str().expect("token").to_owned()
    }

    /// SIGTERM, then waits (bounded) for the exit and the end of its output.
    pub(crate) fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid}");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for agentcast") {
                assert!(status.success(), "agentcast exited with {status}");
                break;
            }
            assert!(Instant::now() < deadline, "agentcast ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let output = self.output.lock().unwrap().clone();
        output
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        // A failed test must not leave the process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Appends everything `stream` yields to `output`, line by line.
fn capture(
    stream: impl Read + Send + 'static,
    output: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut output = output.lock().unwrap();
            output.push_str(&line);
            output.push('\n');
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_token_or_key_appears_in_the_debug_log() {
    let dir = DataDir::new();
    let admin_password = "Adm1nSecretPw9xQ";
    let jwt_secret = "JwtSecretValue0123456789abcdefXYZ";
    let alice_password = "AliceSecretPw4kR";
    let wrong_password = "WrongSecretPw7nT";
    // People type their password into the username field.
    let password_as_username = "TypoSecretPw3vB";
    let server = Binary::start(
        &dir.0,
        &[
            ("ADMIN_PASSWORD", admin_password),
            ("JWT_SECRET", jwt_secret),
        ],
    );

    // Accounts: signup, a failed login, logins, refresh, me.
    let response = server
        .post(
            "/api/v1/auth/signup",
            None,
            &json!({"username": "alice", "password": alice_password}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let response = server
        .post(
            "/api/v1/auth/login",
            None,
            &json!({"username": "alice", "password": wrong_password}),
        )
        .await;
    assert_eq!(response.status(), 401);
    let response = server
        .post(
            "/api/v1/auth/login",
            None,
            &json!({"username": password_as_username, "password": "x"}),
        )
        .await;
    assert_eq!(response.status(), 401);
    let alice_token = server.login("alice", alice_password).await;
    let admin_token = server.login("admin", admin_password).await;
    let response = server
        .post("/api/v1/auth/refresh", Some(&alice_token), &json!({}))
        .await;
    assert_eq!(response.status(), 200);
    let refreshed: Value = response.json().await.unwrap();
    let refreshed_token = refreshed["token"].as_str().unwrap().to_owned();
    let response = server
        .http
        .get(server.url("/api/v1/auth/me"))
        .bearer_auth(&refreshed_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // A key: created, used on both transports, offered to the WebSocket.
    let response = server
        .post(
            "/api/v1/api-keys",
            Some(&admin_token),
            &json!({"name": "ci"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let key = response.json::<Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let notification = json!({"type": "notification", "data": {"text": "hi"}});
    let response = server
        .post("/api/v1/ws/broadcast", Some(&key), &notification)
        .await;
    assert_eq!(response.status(), 202);
    let response = server
        .http
        .post(server.url("/api/v1/ws/broadcast"))
        .header("x-api-key", &key)
        .json(&notification)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);

    // WebSockets: the token in the subprotocol and in the URL, an in-band
    // refresh, and the key and a garbage token refused.
    let request = server.ws_url("").into_client_request().unwrap();
    let mut by_protocol = WsClient::open(with_token_protocol(request, &alice_token)).await;
    by_protocol.connected().await;
    by_protocol
        .send_json(&json!({"type": "refresh", "data": {"token": refreshed_token}}))
        .await;
    // `refreshed`, or an `error` if both tokens share their `exp` second.
    let answer = by_protocol.next_json().await;
    assert!(
        answer["type"] == "refreshed" || answer["type"] == "error",
        "{answer}"
    );
    let request = server
        .ws_url(&format!("?token={admin_token}"))
        .into_client_request()
        .unwrap();
    let mut by_query = WsClient::open(request).await;
    by_query.connected().await;
    let request = server
        .ws_url(&format!("?token={key}"))
        .into_client_request()
        .unwrap();
    WsClient::open(request).await.expect_close(4401).await;
    let request = server
        .ws_url(&format!("?token={alice_token}x"))
        .into_client_request()
        .unwrap();
    WsClient::open(request).await.expect_close(4401).await;
    by_protocol.close().await;
    by_query.close().await;

    let output = server.stop();

    // Debug logging was on and saw all of it.
    for expected in [
        "connection open",
        "published",
        "api key created",
        "account created",
    ] {
        assert!(
            output.contains(expected),
            "no {expected:?} in the log:\n{output}"
        );
    }
    let mut secrets = vec![
        ("the admin password", admin_password.to_owned()),
        ("the JWT secret", jwt_secret.to_owned()),
        ("alice's password", alice_password.to_owned()),
        ("a wrong password", wrong_password.to_owned()),
        (
            "a password typed as username",
            password_as_username.to_owned(),
        ),
        ("the API key", key.clone()),
        ("the API key's random part", key[3..].to_owned()),
    ];
    for (what, token) in [
        ("alice's token", &alice_token),
        ("the admin's token", &admin_token),
        ("the refreshed token", &refreshed_token),
    ] {
        secrets.push((what, token.clone()));
        let signature = token.rsplit('.').next().unwrap().to_owned();
        secrets.push((what, signature));
    }
    for (what, secret) in secrets {
        assert!(
            !output.contains(&secret),
            "{what} appears in the log:\n{output}"
        );
    }
}

/// The generated password from the log line "… password `…` …".
fn generated_password(output: &str) -> Option<String> {
    let line = output
        .lines()
        .find(|l| l.contains("created the first account"))?;
    let rest = &line[line.find("password `")? + "password `".len()..];
    Some(rest[..rest.find('`')?].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_admin_password_is_logged_once_as_a_warning_and_works() {
    let dir = DataDir::new();
    let jwt_secret = "JwtSecretValue0123456789abcdefXYZ";

    let first = Binary::start(&dir.0, &[("JWT_SECRET", jwt_secret)]);
    // The accept loop starts after the bootstrap: any answer means it is done.
    let health = first.http.get(first.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let password = generated_password(&first.output.lock().unwrap())
        .expect("the generated admin password is in the log");
    assert!(password.len() >= 16, "a strong password: {password:?}");
    let line = first
        .output
        .lock()
        .unwrap()
        .lines()
        .find(|l| l.contains("created the first account"))
        .unwrap()
        .to_owned();
    assert!(
        line.contains("WARN"),
        "a warning, visible at the default level: {line}"
    );
    assert!(
        line.contains("/login.html"),
        "it says where to log in: {line}"
    );
    first.login("admin", &password).await;
    let first_output = first.stop();
    assert_eq!(
        first_output.matches(password.as_str()).count(),
        1,
        "printed exactly once:\n{first_output}"
    );

    let second = Binary::start(&dir.0, &[("JWT_SECRET", jwt_secret)]);
    second.login("admin", &password).await;
    let second_output = second.stop();
    assert!(
        !second_output.contains(&password) && !second_output.contains("created the first account"),
        "a restart prints no password:\n{second_output}"
    );
}

/// Issue 8, finding 6: a connect query that does not parse (a repeated `token`
/// or `since`) once made warp log the raw query, token included, at debug. At
/// `RUST_LOG=trace`, every library's lines included, no token's signature
/// appears: not from the query, the subprotocol, a refresh frame or a bearer header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_appears_in_the_trace_log_even_from_queries_that_do_not_parse() {
    let dir = DataDir::new();
    let secret = "JwtSecretValue0123456789abcdefXYZ";
    let server = Binary::start(&dir.0, &[("JWT_SECRET", secret), ("RUST_LOG", "trace")]);
    let mint = |sub: &str, ttl: i64| {
        let claims = crate::helpers::claims(sub, agentcast::auth::Role::Admin, "default", ttl);
        crate::helpers::sign(jsonwebtoken::Algorithm::HS256, secret, &claims)
    };
    let first = mint("alice", 600);
    let second = mint("alice", 1200);
    let third = mint("bob", 600);
    let server_request = |query: &str| server.ws_url(query).into_client_request().unwrap();

    // A repeated token: refused, and nothing logs the query.
    let mut repeated = WsClient::open(server_request(&format!("?token=a&token={first}"))).await;
    repeated.expect_close(4401).await;
    // A repeated `since` (the token itself is good). Connected, no resume, is
    // what it gets; the log is what this test is about.
    let mut since =
        WsClient::open(server_request(&format!("?token={first}&since=x&since=2"))).await;
    let since_answer = format!("{:?}", since.next_event().await);
    since.close().await;
    // A percent-encoded token, then an in-band refresh: a token inside a frame.
    let encoded = first.replace('.', "%2E");
    let mut by_query = WsClient::open(server_request(&format!("?token={encoded}"))).await;
    by_query.connected().await;
    by_query
        .send_json(&json!({"type": "refresh", "data": {"token": second}}))
        .await;
    by_query.expect_type("refreshed").await;
    by_query.close().await;
    let mut by_protocol = WsClient::open(with_token_protocol(server_request(""), &third)).await;
    by_protocol.connected().await;
    by_protocol.close().await;
    // Bearer headers on HTTP.
    let response = server
        .post(
            "/api/v1/ws/broadcast",
            Some(&third),
            &json!({"type": "notification", "data": {}}),
        )
        .await;
    assert_eq!(response.status(), 202);

    let output = server.stop();
    assert!(output.contains("TRACE"), "trace logging was on:\n{output}");
    for (what, token) in [("first", &first), ("second", &second), ("third", &third)] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            !output.contains(signature),
            "the {what} token's signature appears in the log:\n{output}"
        );
    }
    assert!(since_answer.contains("connected"), "{since_answer}");
}

/// At the default level, a library's debug lines stay off: the cap that
/// keeps tungstenite's frame traces out of a trace log once turned its debug
/// lines on at `info` (two per WebSocket close, every connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_info_log_holds_no_debug_line_of_a_library_after_websocket_closes() {
    let dir = DataDir::new();
    let secret = "JwtSecretValue0123456789abcdefXYZ";
    let server = Binary::start(&dir.0, &[("JWT_SECRET", secret), ("RUST_LOG", "info")]);
    let claims = crate::helpers::claims("alice", agentcast::auth::Role::User, "default", 600);
    let token = crate::helpers::sign(jsonwebtoken::Algorithm::HS256, secret, &claims);
    for _ in 0..3 {
        let request = server
            .ws_url(&format!("?token={token}"))
            .into_client_request()
            .unwrap();
        let mut client = WsClient::open(request).await;
        client.connected().await;
        client.close().await;
    }
    let output = server.stop();
    assert!(output.contains(" INFO "), "info logging was on:\n{output}");
    assert!(
        !output.contains("DEBUG") && !output.contains("close frame"),
        "debug lines at RUST_LOG=info:\n{output}"
    );
}

/// `rediss://` end to end: a TLS-only `redis-server` with a password and a
/// certificate of a CA made here (trusted through `SSL_CERT_FILE`, which the
/// system CA loading honours); the node connects, reports `redis: ok`,
/// accepts a publish (the script ran over TLS), and at `RUST_LOG=trace` its
/// log never holds the URL's password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_url_works_over_tls_and_its_password_is_never_logged() {
    let dir = DataDir::new();
    let tls = dir.0.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(&tls)
            .output()
            .expect("run openssl (apt-get install openssl)");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let subject = |cn: &str| format!("/CN={cn}");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        &subject("agentcast test CA"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "redis.key",
        "-out",
        "redis.csr",
        "-subj",
        &subject("localhost"),
    ]);
    std::fs::write(tls.join("san.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "redis.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-out",
        "redis.crt",
        "-extfile",
        "san.ext",
    ]);

    let redis_password = "RedisTlsPw5mQ8zK";
    let port = crate::redis_server::free_port();
    let mut redis = KillOnDrop(
        Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
            .args([
                "--tls-cert-file",
                "redis.crt",
                "--tls-key-file",
                "redis.key",
            ])
            .args([
                "--tls-ca-cert-file",
                "ca.crt",
                "--requirepass",
                redis_password,
            ])
            .current_dir(&tls)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)"),
    );
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server's TLS port never opened"
        );
        assert!(redis.0.try_wait().unwrap().is_none(), "redis-server exited");
        std::thread::sleep(Duration::from_millis(20));
    }

    let admin_password = "Adm1nSecretPw9xQ";
    let url = format!("rediss://:{redis_password}@localhost:{port}");
    let ca = tls.join("ca.crt");
    let server = Binary::start(
        &dir.0,
        &[
            ("ADMIN_PASSWORD", admin_password),
            ("JWT_SECRET", "JwtSecretValue0123456789abcdefXYZ"),
            ("REDIS_URL", &url),
            ("NODE_ID", "tls-node"),
            ("SSL_CERT_FILE", ca.to_str().unwrap()),
            ("RUST_LOG", "trace"),
        ],
    );
    let health: Value = server
        .http
        .get(server.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["redis"], "ok", "{health}");
    let token = server.login("admin", admin_password).await;
    let response = server
        .post(
            "/api/v1/ws/broadcast",
            Some(&token),
            &json!({"type": "notification", "data": {"over": "tls"}}),
        )
        .await;
    assert_eq!(response.status(), 202);

    let output = server.stop();
    drop(redis);
    assert!(output.contains("TRACE"), "trace logging was on:\n{output}");
    assert!(
        !output.contains(redis_password),
        "the REDIS_URL password appears in the log:\n{output}"
    );
}

/// A child process killed (and reaped) when the test ends, passed or failed.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
