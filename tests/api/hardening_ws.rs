//! Regression tests of the WebSocket and token findings of issue 8: a Ping
//! flood that grew memory (1), issuer and audience of external tokens (5),
//! `exp` near `u64::MAX` (7), a refresh that changed the role (8) and `nbf` (11).
//!
//! The flood test runs the real binary (as `logs` does) and watches its VmRSS,
//! so it sees the memory an operator would see.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use agentcast::auth::Role;
use agentcast::config::Settings;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::helpers::{claims, now_s, sign, spawn_app, spawn_app_with, DataDir, TestApp, WAIT};
use crate::logs::Binary;

/// A client Ping frame with the largest payload a control frame may carry
/// (125 bytes), masked with a zero key (legal, and the payload stays readable).
fn masked_ping() -> Vec<u8> {
    let mut frame = vec![0x89, 0x80 | 125, 0, 0, 0, 0];
    frame.extend(std::iter::repeat_n(b'p', 125));
    frame
}

/// Opens a WebSocket by hand and reads exactly the 101 response, nothing more.
fn raw_websocket(addr: SocketAddr, token: &str) -> TcpStream {
    upgrade(TcpStream::connect(addr).expect("connect"), addr, token)
}

/// The WebSocket handshake over `stream`, reading exactly the 101 response.
fn upgrade(mut stream: TcpStream, addr: SocketAddr, token: &str) -> TcpStream {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    let request = format!(
        "GET /api/v1/ws/connect?token={token} HTTP/1.1\r\nHost: {addr}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).expect("read the 101"),
            1,
            "EOF in the handshake"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "not upgraded: {head}");
    stream
}

/// Resident memory of process `pid` in KiB (Linux `/proc/<pid>/status`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status")
}

/// Finding 1: five sockets of one user send Pings as fast as they can and never
/// read. Every client frame costs a frame-rate token, and the bytes held per
/// socket are bounded, so the server closes them (4429, or the TCP connection
/// ends) and its memory stays put. Before the fix the sockets stayed open and
/// the process grew by hundreds of MiB within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_that_never_reads_is_closed_and_memory_stays_bounded() {
    const SOCKETS: usize = 5;
    // How long a socket may keep flooding before the test calls it "not closed".
    const FLOOD_LIMIT: Duration = Duration::from_secs(20);
    const GROWTH_LIMIT_KIB: u64 = 64 * 1024;

    let dir = DataDir::new();
    let secret = "JwtSecretValue0123456789abcdefXYZ";
    let server = Binary::start(&dir.0, &[("JWT_SECRET", secret), ("RUST_LOG", "info")]);
    let pid = server.child.id();
    let claims = crate::helpers::claims("flooder", agentcast::auth::Role::User, "default", 3600);
    let token = crate::helpers::sign(jsonwebtoken::Algorithm::HS256, secret, &claims);
    let sockets: Vec<TcpStream> = (0..SOCKETS)
        .map(|_| raw_websocket(server.addr, &token))
        .collect();
    let baseline = rss_kib(pid);

    let burst: Vec<u8> = masked_ping().repeat(512);
    let flooders: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            let burst = burst.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                while started.elapsed() < FLOOD_LIMIT {
                    if socket.write_all(&burst).is_err() {
                        return true;
                    }
                }
                false
            })
        })
        .collect();
    let mut peak = baseline;
    while !flooders.iter().all(|f| f.is_finished()) {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    peak = peak.max(rss_kib(pid));
    let closed = flooders
        .into_iter()
        .map(|f| f.join().unwrap())
        .filter(|&closed| closed)
        .count();
    eprintln!(
        "ping flood: RSS baseline {baseline} KiB, peak {peak} KiB, growth {} KiB; {closed}/{SOCKETS} sockets closed",
        peak - baseline
    );
    assert_eq!(
        closed, SOCKETS,
        "every flooding socket is closed by the server"
    );
    assert!(
        peak - baseline < GROWTH_LIMIT_KIB,
        "RSS grew by {} KiB (baseline {baseline} KiB, peak {peak} KiB)",
        peak - baseline
    );
    // The server is still fine.
    let health = server
        .http
        .get(format!("http://{}/health", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    server.stop();
}

/// HS256 token for arbitrary claims signed with the app's secret.
fn sign_for(app: &TestApp, claims: &Value) -> String {
    sign(Algorithm::HS256, app.settings.jwt_secret.expose(), claims)
}

fn notification() -> Value {
    json!({"type": "notification", "data": {"text": "hi"}})
}

/// Finding 11: a token valid only in an hour is refused on both transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_not_yet_valid_is_refused_with_401_and_4401() {
    let app = spawn_app().await;
    let now = now_s();
    let later = sign_for(
        &app,
        &json!({"sub": "admin", "role": "admin", "exp": now + 7200, "nbf": now + 3600}),
    );
    let response = app.post_broadcast(&later, &notification()).await;
    assert_eq!(response.status(), 401, "a publish with a future nbf");
    app.connect(&later).await.expect_close(4401).await;
    app.connect_query(&later).await.expect_close(4401).await;

    // A `nbf` already passed is fine.
    let valid = sign_for(
        &app,
        &json!({"sub": "admin", "role": "admin", "exp": now + 7200, "nbf": now - 5}),
    );
    assert_eq!(
        app.post_broadcast(&valid, &notification()).await.status(),
        202
    );
    app.connect_ready(&valid).await.0.assert_alive().await;
}

/// Finding 7: `exp` near `u64::MAX` once wrapped in the session's deadline (a
/// debug build panicked the task): the socket must stay open and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_near_u64_max_connects_and_stays_open() {
    let app = spawn_app_with(|s| s.jwt_leeway = Duration::from_secs(30)).await;
    for exp in [u64::MAX, u64::MAX - 29, u64::MAX - 30, u64::MAX / 2] {
        let token = sign_for(&app, &json!({"sub": "alice", "exp": exp}));
        let (mut client, _) = app.connect_ready(&token).await;
        client.assert_alive().await;
        client.assert_alive().await;
        client.close().await;
    }
    let admin = sign_for(
        &app,
        &json!({"sub": "admin", "role": "admin", "exp": u64::MAX}),
    );
    assert_eq!(
        app.post_broadcast(&admin, &notification()).await.status(),
        202
    );
}

/// Finding 8: a refresh may not change the role; the error leaves the
/// connection as it was, and a proper refresh still works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_with_another_role_is_refused_and_a_proper_one_still_works() {
    let app = spawn_app().await;
    let current = claims("boss", Role::Admin, "default", 600);
    let (mut client, _) = app.connect_ready(&app.mint(&current)).await;

    let demoted = app.mint(&claims("boss", Role::User, "default", 1200));
    client
        .send_json(&json!({"type": "refresh", "data": {"token": demoted}}))
        .await;
    let error = client.expect_type("error").await;
    assert_eq!(error["data"]["code"], "token_mismatch", "{error}");

    let promoted_user = claims("pleb", Role::User, "default", 600);
    let (mut user, _) = app.connect_ready(&app.mint(&promoted_user)).await;
    let promoted = app.mint(&claims("pleb", Role::Admin, "default", 1200));
    user.send_json(&json!({"type": "refresh", "data": {"token": promoted}}))
        .await;
    let error = user.expect_type("error").await;
    assert_eq!(error["data"]["code"], "token_mismatch", "{error}");

    let longer = claims("boss", Role::Admin, "default", 1800);
    client
        .send_json(&json!({"type": "refresh", "data": {"token": app.mint(&longer)}}))
        .await;
    let refreshed = client.expect_type("refreshed").await;
    assert_eq!(refreshed["data"]["exp"], longer.exp, "{refreshed}");
    client.assert_alive().await;
}

/// Finding 5, our own tokens: without `JWT_AUDIENCE` an `aud` is ignored, not
/// refused; with it, an `aud` present must match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hs256_token_with_aud_is_accepted_unless_it_names_another_audience() {
    let exp = now_s() + 600;
    let app = spawn_app().await;
    let with_aud = sign_for(
        &app,
        &json!({"sub": "admin", "role": "admin", "exp": exp, "aud": "anything"}),
    );
    assert_eq!(
        app.post_broadcast(&with_aud, &notification())
            .await
            .status(),
        202
    );
    app.connect_ready(&with_aud).await.0.assert_alive().await;

    let app = spawn_app_with(|s| s.jwt_audience = Some("agentcast".into())).await;
    let admin = |aud: Value| {
        let mut claims = json!({"sub": "admin", "role": "admin", "exp": exp});
        if !aud.is_null() {
            claims["aud"] = aud;
        }
        sign_for(&app, &claims)
    };
    for (aud, status) in [
        (json!("agentcast"), 202),
        (Value::Null, 202),
        (json!("other-app"), 401),
        (json!(["other-app"]), 401),
    ] {
        let response = app
            .post_broadcast(&admin(aud.clone()), &notification())
            .await;
        assert_eq!(response.status(), status, "aud {aud}");
    }
    app.connect(&admin(json!("other-app")))
        .await
        .expect_close(4401)
        .await;
}

/// A 2048-bit RSA key made for these tests only (`openssl genpkey`), standing
/// in for an external identity provider.
const TEST_RSA_PRIVATE: &str = r"-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCJRM0byPdTbIpB
Hxdcii+cSZGnQKCTsoxA6ifFo0PSNxHjxu1YITiXKqROCGBd+1fnkl9pR62L9/DW
hUsiv61xqjDUiedSnLAlihv2JK6DmWiRyUKpa4qRz15OKETB0a7rSpZIbZeD/Z5H
t61sF8yIGP6HcmWdjQBBDJQtZLKFyhAqJWcpWraJItDq+BP9GltNB72bLx5EWDxV
Q6+6SO1fySieT7yA1A7Yron+FAV0/8lx6SCr6SCTRSC1pnxyNpEs0L4qPYqvEgLv
U3L6FjUWGx697BoWXEa7Vy5CaoG/ZD/b8f9ji0RSV0t47yJwilHAUJ9of/iZJ8E5
o5slqpVBAgMBAAECggEABPtYwFHmXAI78EobFHI1cSQgY6QOT93yhiaZY+xdeUMj
ZJNjKMgn4CCdjvFx4edN1Os0iEMgMszAUmDLDctMFax6EjShDxf9spcVFbVWGhOW
vnfB8hkjkdAnWYnPmQMtqH9v/dfwYEtzk6HAawRgGW5iynKl6nZkFHhK5mzZp85U
dAO+oMAx3zhAaMjE47vSPNEoZbPnyenAn3UTSSnXICH4bz6w7WnMEEyaj0GLQdTj
zyrvOgZs10AEuy36p5guAhgTMmaNt6YjdO1eV5hv38uahgZN2KcJh5oNzU4K1Ra6
/NhBfpUupTH1AX0GuSolxXU5sf8csy1hcz0SR6k36wKBgQDA/wAudQ5OKPDykrdf
Itdnq4bb8UhApB/j0JLMhuVtC0W6+5bJ+MA3PZ9TqOORzECf17p42ZzaNFk4Uwul
cyOvHh5dTwqswmH/agOzDIh0ZPCW7aVaUy9lh947kExdLUgvwPQ8ZFsCikXeIMJb
k4mvaCj7nGBDWFwbl8zTB4pArwKBgQC2FJNQAcII+F8dCS2+pY20VDxZ9MfC5iz8
of/BN64qf1cTvZ3cFEvd1oHoehhy3YYaXcZtKsERnODS5Dk8icYhlX7YfZYyje8g
vEagPApWtFf4YbRHAVg8PedVdlh2yV8ODWdPoki362nuj6e455BvlcYcGtKfiMq3
6qYhbSClDwKBgA3tGJ1BkxOuvpwyXAsAX5y6ctPCGF2ZujddIIqjnUB+FL0GVH4k
dfJGfw2xXSJzI6KlFW6M/VV9e4al72wz37pOKRDAmFuY9ytQAg5UdDA57GZnpYvb
/sqLwEx6ABilINVZTgZhk3OeeKYrpPqorcG7eWGWihex84uGK6B6pc4/AoGBAJpz
/7Zpl1gWoFA4HgbP1tG2du9z9hQ9PsIbBaG4gtRn6szDF2q+CNEoilBTafPeOEib
bZvjHZ28LvaWRHs2/8wzTUOF3OgLgGKLc3mvFLISD2GSN+PXnyqS9G6JkmdJUInS
EuX5aqghWV3VnFf8jogpS8FBe5N67UNwF/bY5E0/AoGBAJ6pYNu9b7s6l0N8c28K
xt0THOjzmDZDMbKDRlQkAramrld02xGNzsYTbjciKAye+J3zWDcIw0mCQOaE6t1+
jmSV7F5C0ThRAjon/RSL8w1qCplzz6LdTMXJW1gwufXhVUel6KS5xHFYH9o/D69t
tAyBxQRI/1Is4a/fgl0qBjup
-----END PRIVATE KEY-----
";
const TEST_RSA_PUBLIC: &str = r"-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAiUTNG8j3U2yKQR8XXIov
nEmRp0Cgk7KMQOonxaND0jcR48btWCE4lyqkTghgXftX55JfaUeti/fw1oVLIr+t
caow1InnUpywJYob9iSug5lokclCqWuKkc9eTihEwdGu60qWSG2Xg/2eR7etbBfM
iBj+h3JlnY0AQQyULWSyhcoQKiVnKVq2iSLQ6vgT/RpbTQe9my8eRFg8VUOvukjt
X8konk+8gNQO2K6J/hQFdP/Jcekgq+kgk0UgtaZ8cjaRLNC+Kj2KrxIC71Ny+hY1
FhsevewaFlxGu1cuQmqBv2Q/2/H/Y4tEUldLeO8icIpRwFCfaH/4mSfBOaObJaqV
QQIDAQAB
-----END PUBLIC KEY-----
";

fn rs256(claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(TEST_RSA_PRIVATE.as_bytes()).expect("the test RSA key");
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, &key).expect("sign RS256")
}

/// Finding 5, external tokens: with `JWT_PUBLIC_KEY` only tokens naming our
/// issuer and audience are accepted; tokens of the same provider for another
/// application, or without `iss`/`aud`, are refused on both transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_tokens_must_carry_the_configured_issuer_and_audience() {
    let app = spawn_app_with(|s| {
        s.jwt_public_key = Some(TEST_RSA_PUBLIC.to_owned());
        s.jwt_issuer = Some("https://idp.example".into());
        s.jwt_audience = Some("agentcast".into());
    })
    .await;
    let exp = now_s() + 600;
    let token = |iss: Option<&str>, aud: Option<&str>| {
        let mut claims = json!({"sub": "ext-admin", "role": "admin", "exp": exp});
        if let Some(iss) = iss {
            claims["iss"] = iss.into();
        }
        if let Some(aud) = aud {
            claims["aud"] = aud.into();
        }
        rs256(&claims)
    };
    let good = token(Some("https://idp.example"), Some("agentcast"));
    assert_eq!(
        app.post_broadcast(&good, &notification()).await.status(),
        202
    );
    app.connect_ready(&good).await.0.assert_alive().await;

    for (what, bad) in [
        (
            "another issuer",
            token(Some("https://evil.example"), Some("agentcast")),
        ),
        (
            "another audience",
            token(Some("https://idp.example"), Some("billing")),
        ),
        ("no issuer", token(None, Some("agentcast"))),
        ("no audience", token(Some("https://idp.example"), None)),
    ] {
        let response = app.post_broadcast(&bad, &notification()).await;
        assert_eq!(response.status(), 401, "{what}");
        app.connect(&bad).await.expect_close(4401).await;
    }
}

/// Finding 5, settings: a public key without issuer and audience does not start,
/// with one line naming both settings.
#[test]
fn a_public_key_without_issuer_and_audience_is_a_configuration_error() {
    let mut settings = Settings::for_tests("/nonexistent");
    settings.jwt_public_key = Some(TEST_RSA_PUBLIC.to_owned());
    for (issuer, audience) in [(None, None), (Some("i"), None), (None, Some("a"))] {
        settings.jwt_issuer = issuer.map(str::to_owned);
        settings.jwt_audience = audience.map(str::to_owned);
        let error = settings.validate().expect_err("refused").to_string();
        assert!(
            error.contains("JWT_ISSUER") && error.contains("JWT_AUDIENCE") && !error.contains('\n'),
            "{error}"
        );
        assert!(agentcast::auth::Authenticator::new(&settings).is_err());
    }
    settings.jwt_issuer = Some("i".into());
    settings.jwt_audience = Some("a".into());
    settings.validate().expect("valid with both");
}

/// Finding 1, the slower path: answers to text frames within the frame rate
/// (here made unlimited) pile up for a client that never reads. The socket's
/// write buffer is bounded, so the server closes it as a slow consumer (4503)
/// instead of growing; before the fix the connection stayed open and grew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_to_a_client_that_never_reads_end_in_a_slow_consumer_close() {
    let app = spawn_app_with(|s| {
        s.client_frame_rate = 1e9;
        s.client_frame_burst = 1e9;
        s.max_message_bytes = 256;
    })
    .await;
    // A small receive buffer, so the kernel holds little of what we never read.
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4096).unwrap();
    let tcp = tcp.connect(app.addr).await.unwrap().into_std().unwrap();
    tcp.set_nonblocking(false).unwrap();
    let socket = upgrade(tcp, app.addr, &app.user_token("reader-never"));
    // Each frame is answered by an `error` naming its (64-character) type.
    let payload = format!(r#"{{"type":"{}"}}"#, "x".repeat(64));
    let mut frame = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload.as_bytes());
    let burst = frame.repeat(1024);
    let flooder = std::thread::spawn(move || {
        let mut socket = socket;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if socket.write_all(&burst).is_err() {
                return true;
            }
        }
        false
    });
    let closed = crate::helpers::wait_until(Duration::from_secs(30), async || {
        app.stat("slow_consumer_disconnects").await == 1
    })
    .await;
    assert!(
        closed,
        "the server closed the socket as a slow consumer (4503)"
    );
    let ended = tokio::task::spawn_blocking(move || flooder.join().unwrap())
        .await
        .unwrap();
    assert!(ended, "the server ended the connection");
}
