//! `JWT_JWKS_URL` (issue 11): tokens of an external identity provider whose
//! keys come from a JWK set, served here by a [`Provider`] on 127.0.0.1:0 that
//! the test can change, fail (500, bad JSON, gone) and whose requests it
//! counts. Keys are generated per test binary (RSA 2048, P-256).
//!
//! Timings that are settings (the refresh period, the gap between fetches for
//! unknown `kid`s, the start wait) are made small where a test waits for them;
//! every wait is for an event (a request count, a status), bounded by `WAIT`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use agentcast::config::{ClaimPath, JwksSettings, Settings};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::helpers::{now_s, spawn_app_with, wait_until, TestApp, WAIT};

const ISSUER: &str = "https://idp.example";
const AUDIENCE: &str = "agentcast";

// ---- keys ---------------------------------------------------------------------

/// A signing key of the provider: its private half (PEM, for tokens) and its
/// public JWK without `kid`.
struct TestKey {
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

impl TestKey {
    /// The public JWK under `kid`.
    fn jwk(&self, kid: &str) -> Value {
        let mut jwk = self.jwk.clone();
        jwk["kid"] = kid.into();
        jwk
    }

    /// A token with this key's algorithm and `kid` in the header.
    fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
        self.sign_as(self.alg, kid, claims)
    }

    /// A token whose header says `alg` (which may lie about the key).
    fn sign_as(&self, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = kid.map(str::to_owned);
        let token = jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign");
        if alg == self.alg {
            return token;
        }
        // Same signature, another `alg` in the header.
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        let (_, rest) = token.split_once('.').unwrap();
        format!("{}.{rest}", b64(&serde_json::to_vec(&header).unwrap()))
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn rsa_key() -> TestKey {
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    use rsa::traits::PublicKeyParts;
    let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
    let pem = private.to_pkcs8_pem(LineEnding::LF).expect("RSA PEM");
    TestKey {
        alg: Algorithm::RS256,
        encoding: EncodingKey::from_rsa_pem(pem.as_bytes()).expect("RSA encoding key"),
        jwk: json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "n": b64(&private.n().to_bytes_be()),
            "e": b64(&private.e().to_bytes_be()),
        }),
    }
}

fn ec_key() -> TestKey {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let secret = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let point = secret.public_key().to_encoded_point(false);
    let pem = secret.to_pkcs8_pem(LineEnding::LF).expect("EC PEM");
    TestKey {
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_pem(pem.as_bytes()).expect("EC encoding key"),
        jwk: json!({
            "kty": "EC",
            "crv": "P-256",
            "x": b64(point.x().unwrap()),
            "y": b64(point.y().unwrap()),
        }),
    }
}

/// Two RSA and two P-256 keys, made once per test binary.
struct Keys {
    rsa: [TestKey; 2],
    ec: [TestKey; 2],
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        rsa: [rsa_key(), rsa_key()],
        ec: [ec_key(), ec_key()],
    })
}

/// Claims the server accepts from the provider: our issuer and audience, an hour.
fn claims(sub: &str, extra: Value) -> Value {
    let mut claims = json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now_s() + 3600});
    for (name, value) in extra.as_object().expect("extra claims are an object") {
        claims[name] = value.clone();
    }
    claims
}

fn admin(sub: &str) -> Value {
    claims(sub, json!({"role": "admin"}))
}

fn notification(text: &str) -> Value {
    json!({"type": "notification", "data": {"text": text}})
}

// ---- the provider -------------------------------------------------------------

/// What the provider answers.
#[derive(Clone)]
enum Answer {
    Keys(Vec<Value>),
    Status(u16),
    Body(&'static str),
    /// Takes the request and never answers.
    Hang,
}

/// A JWKS endpoint on 127.0.0.1:0 the test controls.
struct Provider {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    requests: Arc<AtomicUsize>,
    /// Tells the server to close its connections and its listener.
    stop_tx: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Provider {
    async fn start(keys: Vec<Value>) -> Provider {
        Provider::answering(Answer::Keys(keys)).await
    }

    async fn answering(answer: Answer) -> Provider {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(answer));
        let requests = Arc::new(AtomicUsize::new(0));
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(serve(listener, answer.clone(), requests.clone(), stop_rx));
        Provider {
            addr,
            answer,
            requests,
            stop_tx: Some(stop_tx),
            task: Some(task),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Gone: once this returns, its connections are closed and new ones refused.
    async fn stop(&mut self) {
        if let Some(stop_tx) = self.stop_tx.take() {
            let _ = stop_tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the provider stops")
                .expect("the provider task");
        }
    }

    /// Waits until `n` requests (in all) reached it.
    async fn wait_for_requests(&self, n: usize) {
        let seen = wait_until(WAIT, async || self.requests() >= n).await;
        assert!(
            seen,
            "the provider saw {} requests, not {n}",
            self.requests()
        );
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn serve(
    listener: TcpListener,
    answer: Arc<Mutex<Answer>>,
    requests: Arc<AtomicUsize>,
    mut stop_rx: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stop_rx => {
                // Kept-alive connections too: a pooled one would still answer.
                connections.shutdown().await;
                return;
            }
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let (answer, requests) = (answer.clone(), requests.clone());
        let service = hyper::service::service_fn(move |_request| {
            requests.fetch_add(1, Ordering::SeqCst);
            let answer = answer.lock().unwrap().clone();
            let (status, body) = match &answer {
                Answer::Keys(keys) => (200, json!({ "keys": keys }).to_string()),
                Answer::Status(status) => (*status, "{}".to_owned()),
                Answer::Body(body) => (200, (*body).to_owned()),
                Answer::Hang => (200, String::new()),
            };
            let response = hyper::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let hang = matches!(answer, Answer::Hang);
            async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                Ok::<_, Infallible>(response)
            }
        });
        connections.spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A server that takes the provider's tokens: our issuer and audience, the
/// JWKS refreshed hourly (tests that wait for the timer shorten it).
async fn spawn_with_jwks(provider: &Provider, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let url = provider.url();
    spawn_app_with(move |s| {
        s.jwt_jwks =
            Some(JwksSettings::new(&url, Duration::from_secs(3600)).expect("a loopback URL"));
        s.jwt_issuer = Some(ISSUER.into());
        s.jwt_audience = Some(AUDIENCE.into());
        tweak(s);
    })
    .await
}

fn jwks(s: &mut Settings) -> &mut JwksSettings {
    s.jwt_jwks.as_mut().expect("JWKS settings")
}

async fn status_of_broadcast(app: &TestApp, token: &str) -> u16 {
    app.post_broadcast(token, &notification("hi"))
        .await
        .status()
        .as_u16()
}

// ---- the tests ----------------------------------------------------------------

/// RS256 and ES256 tokens whose `kid` the set names are accepted on both
/// transports, and what an external admin publishes reaches an external user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_tokens_of_the_jwks_work_over_http_and_websocket() {
    let keys = keys();
    let provider = Provider::start(vec![keys.rsa[0].jwk("rsa-1"), keys.ec[0].jwk("ec-1")]).await;
    let app = spawn_with_jwks(&provider, |_| {}).await;

    let rs_admin = keys.rsa[0].sign(Some("rsa-1"), &admin("ext-admin"));
    let es_admin = keys.ec[0].sign(Some("ec-1"), &admin("ext-admin"));
    let es_user = keys.ec[0].sign(Some("ec-1"), &claims("ext-user", json!({})));
    let rs_user = keys.rsa[0].sign(Some("rsa-1"), &claims("ext-user", json!({})));

    let (mut es_socket, connected) = app.connect_ready(&es_user).await;
    assert_eq!(connected["user_id"], "ext-user", "{connected}");
    let (mut rs_socket, _) = app.connect_ready(&rs_user).await;
    for (alg, token) in [("RS256", &rs_admin), ("ES256", &es_admin)] {
        let response = app
            .post_broadcast(token, &notification(&format!("from {alg}")))
            .await;
        assert_eq!(response.status(), 202, "{alg} admin broadcast");
        for socket in [&mut es_socket, &mut rs_socket] {
            let frame = socket.expect_type("notification").await;
            assert_eq!(frame["data"]["text"], format!("from {alg}"));
        }
    }
    // A user token is a user: no broadcast.
    assert_eq!(status_of_broadcast(&app, &es_user).await, 403);
    // The set was fetched once, at start: known kids cost nothing.
    assert_eq!(provider.requests(), 1);
}

/// Rotation: a `kid` the cache lacks makes the server fetch the set once more
/// (a token of the new key works at once, on HTTP, on a new socket and in an
/// in-band refresh); a key dropped from the set works until the set is
/// fetched again, then no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_kid_is_fetched_on_demand_and_a_dropped_key_ends_with_the_next_fetch() {
    let keys = keys();
    let provider = Provider::start(vec![keys.rsa[0].jwk("2024-01")]).await;
    let app = spawn_with_jwks(&provider, |_| {}).await;
    let old = keys.rsa[0].sign(Some("2024-01"), &admin("ext-admin"));
    assert_eq!(status_of_broadcast(&app, &old).await, 202);
    assert_eq!(provider.requests(), 1);

    // The provider rotates: a new key, tokens signed with it.
    provider.answer(Answer::Keys(vec![
        keys.rsa[0].jwk("2024-01"),
        keys.ec[1].jwk("2024-02"),
    ]));
    let new = keys.ec[1].sign(Some("2024-02"), &admin("ext-admin"));
    assert_eq!(status_of_broadcast(&app, &new).await, 202);
    assert_eq!(provider.requests(), 2, "one fetch for the new kid");
    app.connect_ready(&new).await.0.assert_alive().await;
    assert_eq!(provider.requests(), 2, "the new kid is cached now");

    // The old key is dropped: cached, it still works until the next fetch.
    provider.answer(Answer::Keys(vec![keys.ec[1].jwk("2024-02")]));
    assert_eq!(status_of_broadcast(&app, &old).await, 202);
    assert_eq!(provider.requests(), 2, "a known kid fetches nothing");
    drop(app);

    // With a short timer, the next fetch drops the old key and adds a third.
    provider.answer(Answer::Keys(vec![
        keys.rsa[0].jwk("2024-01"),
        keys.ec[1].jwk("2024-02"),
    ]));
    let app = spawn_with_jwks(&provider, |s| {
        jwks(s).refresh = Duration::from_millis(200);
    })
    .await;
    assert_eq!(status_of_broadcast(&app, &old).await, 202);
    let (mut socket, _) = app.connect_ready(&new).await;
    provider.answer(Answer::Keys(vec![
        keys.ec[1].jwk("2024-02"),
        keys.rsa[1].jwk("2024-03"),
    ]));
    // Two timer fetches later (no token sent meanwhile), the first of them
    // has surely been stored.
    let before = provider.requests();
    provider.wait_for_requests(before + 2).await;
    let third = keys.rsa[1].sign(Some("2024-03"), &admin("ext-admin"));
    assert_eq!(status_of_broadcast(&app, &third).await, 202);
    socket.expect_type("notification").await;
    assert_eq!(status_of_broadcast(&app, &old).await, 401);
    // The in-band refresh of a socket takes the new key's token too.
    let mut later = admin("ext-admin");
    later["exp"] = (now_s() + 7200).into();
    let third_later = keys.rsa[1].sign(Some("2024-03"), &later);
    socket
        .send_json(&json!({"type": "refresh", "data": {"token": third_later}}))
        .await;
    let refreshed = socket.expect_type("refreshed").await;
    assert_eq!(refreshed["data"]["exp"], later["exp"]);
}

/// An in-band refresh with a token of a key the cache lacks waits for the
/// fetch, like a new connection would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_band_refresh_with_a_new_kid_fetches_the_set() {
    let keys = keys();
    let provider = Provider::start(vec![keys.rsa[0].jwk("a")]).await;
    let app = spawn_with_jwks(&provider, |_| {}).await;
    let first = keys.rsa[0].sign(Some("a"), &claims("ext-user", json!({})));
    let (mut socket, _) = app.connect_ready(&first).await;
    provider.answer(Answer::Keys(vec![
        keys.rsa[0].jwk("a"),
        keys.ec[0].jwk("b"),
    ]));
    let exp = now_s() + 7200;
    let second = keys.ec[0].sign(Some("b"), &claims("ext-user", json!({"exp": exp})));
    socket
        .send_json(&json!({"type": "refresh", "data": {"token": second}}))
        .await;
    let refreshed = socket.expect_type("refreshed").await;
    assert_eq!(refreshed["data"]["exp"], exp);
    assert_eq!(provider.requests(), 2);
}

/// Tokens with forged `kid`s, 50 at once and 50 more, on both transports:
/// the provider sees one fetch for all of them (plus the start's), and every
/// one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_kids_costs_the_provider_one_fetch() {
    let keys = keys();
    let provider = Provider::start(vec![keys.rsa[0].jwk("real")]).await;
    let app = spawn_with_jwks(&provider, |_| {}).await;
    let good = keys.rsa[0].sign(Some("real"), &admin("ext-admin"));
    assert_eq!(status_of_broadcast(&app, &good).await, 202);
    assert_eq!(provider.requests(), 1);

    let forged = |i: usize| {
        let kid = format!("forged-{i}-{}", uuid::Uuid::new_v4());
        keys.rsa[0].sign(Some(&kid), &admin("ext-admin"))
    };
    for wave in 0..2 {
        let statuses = futures_util::future::join_all((0..50).map(|i| {
            let token = forged(wave * 100 + i);
            let app = &app;
            async move { status_of_broadcast(app, &token).await }
        }))
        .await;
        assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
        for i in 0..5 {
            app.connect(&forged(wave * 100 + 50 + i))
                .await
                .expect_close(4401)
                .await;
        }
    }
    assert_eq!(
        provider.requests(),
        2,
        "the start's fetch and one for every unknown kid within the gap"
    );
    // Forged tokens of other algorithms never ask the provider.
    let mut header = Header::new(Algorithm::HS512);
    header.kid = Some("x".into());
    let hs = jsonwebtoken::encode(
        &header,
        &admin("ext-admin"),
        &EncodingKey::from_secret(b"whatever-whatever-whatever"),
    )
    .unwrap();
    assert_eq!(status_of_broadcast(&app, &hs).await, 401);
    assert_eq!(provider.requests(), 2);
    // Real tokens still work.
    assert_eq!(status_of_broadcast(&app, &good).await, 202);
}

/// Outages keep the cached keys: a 500, a body that is no key set, a set
/// without a usable key, and a provider gone (connection refused). Each
/// outage is made to happen by a token with an unknown `kid` (the gap
/// between such fetches is 0 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_the_provider_keeps_the_cached_keys() {
    let keys = keys();
    let mut provider = Provider::start(vec![keys.ec[0].jwk("k1")]).await;
    let app = spawn_with_jwks(&provider, |s| {
        jwks(s).min_refresh_gap = Duration::ZERO;
    })
    .await;
    let good = keys.ec[0].sign(Some("k1"), &admin("ext-admin"));
    let unknown = keys.ec[0].sign(Some("k-unknown"), &admin("ext-admin"));
    assert_eq!(status_of_broadcast(&app, &good).await, 202);

    for (what, answer) in [
        ("a 500", Answer::Status(500)),
        ("a 404", Answer::Status(404)),
        ("bad JSON", Answer::Body("{\"keys\": [")),
        ("no keys", Answer::Body("{\"keys\": []}")),
        (
            "only unusable keys",
            Answer::Keys(vec![json!({"kid": "k1", "kty": "oct", "k": "c2VjcmV0"})]),
        ),
    ] {
        provider.answer(answer);
        let before = provider.requests();
        assert_eq!(status_of_broadcast(&app, &unknown).await, 401, "{what}");
        assert_eq!(provider.requests(), before + 1, "{what}: one fetch");
        assert_eq!(status_of_broadcast(&app, &good).await, 202, "{what}");
        app.connect_ready(&good).await.0.assert_alive().await;
    }

    provider.stop().await;
    let before = provider.requests();
    assert_eq!(status_of_broadcast(&app, &unknown).await, 401, "gone");
    assert_eq!(provider.requests(), before, "gone: nothing answered");
    assert_eq!(status_of_broadcast(&app, &good).await, 202, "gone");
    app.connect_ready(&good).await.0.assert_alive().await;
}

/// A start with the provider down (500s) waits a bounded time, then serves:
/// `/health` is up, our own tokens work, external ones are refused until the
/// provider answers, and the first token with a `kid` after that fetches it.
/// A provider that takes the request and never answers: a token naming a new
/// `kid` waits for the fetch's timeout and is refused, tokens of cached keys
/// are decided meanwhile without waiting, and once the provider answers again
/// the new key is fetched and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_hangs_costs_only_tokens_with_a_new_kid_a_bounded_wait() {
    let keys = keys();
    let provider = Provider::start(vec![keys.rsa[0].jwk("rsa-1")]).await;
    let app = spawn_with_jwks(&provider, |s| {
        jwks(s).fetch_timeout = Duration::from_secs(2);
        jwks(s).min_refresh_gap = Duration::ZERO;
    })
    .await;
    let known = keys.rsa[0].sign(Some("rsa-1"), &admin("ext-admin"));
    let new = keys.rsa[1].sign(Some("rsa-2"), &admin("ext-admin"));
    provider.wait_for_requests(1).await;

    provider.answer(Answer::Hang);
    let waiting = {
        let (url, client, new) = (
            app.url("/api/v1/ws/broadcast"),
            app.http.clone(),
            new.clone(),
        );
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(new)
                .json(&notification("new kid"))
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        })
    };
    // The fetch for rsa-2 reached the provider, which holds it.
    provider.wait_for_requests(2).await;
    assert_eq!(
        status_of_broadcast(&app, &known).await,
        202,
        "a cached key is used while a fetch hangs"
    );
    let (_socket, connected) = app.connect_ready(&known).await;
    assert_eq!(connected["user_id"], "ext-admin");
    let status = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the hung fetch ends with its timeout")
        .expect("the request task");
    assert_eq!(
        status, 401,
        "a kid still unknown after the fetch is refused"
    );

    provider.answer(Answer::Keys(vec![
        keys.rsa[0].jwk("rsa-1"),
        keys.rsa[1].jwk("rsa-2"),
    ]));
    let recovered = wait_until(WAIT, async || status_of_broadcast(&app, &new).await == 202).await;
    assert!(
        recovered,
        "the new key works once the provider answers again"
    );
    assert_eq!(status_of_broadcast(&app, &known).await, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_with_the_provider_down_serves_and_loads_the_keys_later() {
    let keys = keys();
    let provider = Provider::answering(Answer::Status(503)).await;
    let app = spawn_with_jwks(&provider, |s| {
        jwks(s).start_wait = Duration::from_millis(600);
        jwks(s).min_refresh_gap = Duration::from_millis(300);
    })
    .await;
    let health = app.get("/health").await;
    assert_eq!(health.status(), 200);
    assert!(provider.requests() >= 2, "the start retried");
    assert_eq!(status_of_broadcast(&app, &app.admin_token()).await, 202);
    let external = keys.rsa[0].sign(Some("k1"), &admin("ext-admin"));
    assert_eq!(status_of_broadcast(&app, &external).await, 401);

    provider.answer(Answer::Keys(vec![keys.rsa[0].jwk("k1")]));
    // The 401 above used this gap's fetch: the next gap's fetches it.
    let accepted = wait_until(WAIT, async || {
        status_of_broadcast(&app, &external).await == 202
    })
    .await;
    assert!(accepted, "the keys were fetched once the provider answered");
}

/// A provider that refuses connections at start does not stop the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_with_the_provider_unreachable_is_bounded() {
    let mut provider = Provider::start(vec![]).await;
    provider.stop().await;
    // The start gives up on the provider after `start_wait` and serves.
    let app = tokio::time::timeout(
        WAIT,
        spawn_with_jwks(&provider, |s| {
            jwks(s).start_wait = Duration::from_millis(300);
        }),
    )
    .await
    .expect("the server starts without the provider's keys");
    assert_eq!(app.get("/health").await.status(), 200);
    let external = keys().rsa[0].sign(Some("k1"), &admin("ext-admin"));
    assert_eq!(status_of_broadcast(&app, &external).await, 401);
}

/// The algorithm is the key's: a header naming another one than the key the
/// `kid` picks is refused, whatever the signature; so is a token without a
/// `kid` (even with one key in the set) and a key whose JWK `alg` disagrees
/// with its type (skipped when loaded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_whose_alg_is_not_their_keys_are_refused() {
    let keys = keys();
    let mut mislabeled = keys.rsa[1].jwk("rsa-says-es");
    mislabeled["alg"] = "ES256".into();
    let provider = Provider::start(vec![
        keys.rsa[0].jwk("rsa"),
        keys.ec[0].jwk("ec"),
        mislabeled,
    ])
    .await;
    let app = spawn_with_jwks(&provider, |_| {}).await;
    let claims = admin("ext-admin");
    let public_n = keys.rsa[0].jwk["n"].as_str().unwrap().as_bytes().to_vec();
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some("rsa".into());
    for (what, token) in [
        (
            "ES256 token under an RSA kid",
            keys.ec[0].sign(Some("rsa"), &claims),
        ),
        (
            "RS256 token under an EC kid",
            keys.rsa[0].sign(Some("ec"), &claims),
        ),
        (
            "RS256 signature, header says RS384",
            keys.rsa[0].sign_as(Algorithm::RS384, Some("rsa"), &claims),
        ),
        (
            "RS256 signature, header says PS256",
            keys.rsa[0].sign_as(Algorithm::PS256, Some("rsa"), &claims),
        ),
        (
            "ES256 signature, header says ES384",
            keys.ec[0].sign_as(Algorithm::ES384, Some("ec"), &claims),
        ),
        ("no kid", keys.rsa[0].sign(None, &claims)),
        (
            "a key whose JWK alg disagrees",
            keys.rsa[1].sign(Some("rsa-says-es"), &claims),
        ),
        (
            "HS256 keyed with the public key",
            jsonwebtoken::encode(&hs_header, &claims, &EncodingKey::from_secret(&public_n))
                .unwrap(),
        ),
    ] {
        assert_eq!(status_of_broadcast(&app, &token).await, 401, "{what}");
        app.connect(&token).await.expect_close(4401).await;
    }
    let good = keys.rsa[0].sign(Some("rsa"), &claims);
    assert_eq!(status_of_broadcast(&app, &good).await, 202);
}

fn remove(claims: &mut Value, name: &str) {
    claims.as_object_mut().unwrap().remove(name);
}

/// `iss` and `aud` are required of JWKS tokens as of public-key ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_tokens_must_carry_the_configured_issuer_and_audience() {
    let keys = keys();
    let provider = Provider::start(vec![keys.ec[0].jwk("k")]).await;
    let app = spawn_with_jwks(&provider, |_| {}).await;
    let token = |change: &dyn Fn(&mut Value)| {
        let mut claims = admin("ext-admin");
        change(&mut claims);
        keys.ec[0].sign(Some("k"), &claims)
    };
    for (what, bad) in [
        ("no iss", token(&|c| remove(c, "iss"))),
        ("no aud", token(&|c| remove(c, "aud"))),
        (
            "another iss",
            token(&|c| c["iss"] = "https://evil.example".into()),
        ),
        ("another aud", token(&|c| c["aud"] = "billing".into())),
        ("expired", token(&|c| c["exp"] = (now_s() - 120).into())),
        ("no exp", token(&|c| remove(c, "exp"))),
    ] {
        assert_eq!(status_of_broadcast(&app, &bad).await, 401, "{what}");
        app.connect(&bad).await.expect_close(4401).await;
    }
    assert_eq!(status_of_broadcast(&app, &token(&|_| {})).await, 202);
}

/// `JWT_ROLE_CLAIM` / `JWT_TENANT_CLAIM`: Auth0-style (a pointer into
/// `app_metadata`, a plain claim name for the tenant) and Keycloak-style (a
/// role list, a namespaced tenant claim). An admin mapped so can broadcast in
/// its mapped tenant only; a user cannot; a token without the tenant is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_claims_map_to_role_and_tenant() {
    let keys = keys();
    let key = &keys.rsa[0];
    let provider = Provider::start(vec![key.jwk("k")]).await;
    let path = |raw: &str| Some(ClaimPath::parse("test", raw).unwrap());
    let app = spawn_with_jwks(&provider, |s| {
        s.jwt_role_claim = path("/app_metadata/role");
        s.jwt_tenant_claim = path("org_id");
    })
    .await;
    let token = |sub: &str, extra: Value| key.sign(Some("k"), &claims(sub, extra));
    let acme_admin = token(
        "a1",
        json!({"app_metadata": {"role": "admin"}, "org_id": "acme"}),
    );
    // The top-level `role` and `tenant` no longer count.
    let acme_user = token(
        "u1",
        json!({"app_metadata": {"role": "editor"}, "org_id": "acme", "role": "admin"}),
    );
    let globex_user = token("u2", json!({"org_id": "globex", "tenant": "acme"}));
    let globex_admin = token(
        "a2",
        json!({"app_metadata": {"role": "admin"}, "org_id": "globex"}),
    );

    let (mut acme_socket, connected) = app.connect_ready(&acme_user).await;
    assert_eq!(connected["tenant"], "acme", "{connected}");
    let (mut globex_socket, connected) = app.connect_ready(&globex_user).await;
    assert_eq!(connected["tenant"], "globex", "{connected}");

    assert_eq!(status_of_broadcast(&app, &acme_user).await, 403);
    let response = app
        .post_broadcast(&acme_admin, &notification("acme only"))
        .await;
    assert_eq!(response.status(), 202);
    let frame = acme_socket.expect_type("notification").await;
    assert_eq!(frame["data"]["text"], "acme only");
    let response = app
        .post_broadcast(&globex_admin, &notification("globex marker"))
        .await;
    assert_eq!(response.status(), 202);
    let frame = globex_socket.expect_type("notification").await;
    assert_eq!(
        frame["data"]["text"], "globex marker",
        "acme's broadcast never reached globex"
    );

    for (what, bad) in [
        (
            "no tenant",
            token("a3", json!({"app_metadata": {"role": "admin"}})),
        ),
        (
            "a tenant that is no tenant name",
            token("a4", json!({"org_id": "no spaces!"})),
        ),
        ("a numeric tenant", token("a5", json!({"org_id": 7}))),
    ] {
        assert_eq!(status_of_broadcast(&app, &bad).await, 401, "{what}");
        app.connect(&bad).await.expect_close(4401).await;
    }
    // Our own tokens are never mapped.
    assert_eq!(status_of_broadcast(&app, &app.admin_token()).await, 202);
    drop(app);

    let app = spawn_with_jwks(&provider, |s| {
        s.jwt_role_claim = path("/realm_access/roles");
        s.jwt_tenant_claim = path("/https:~1~1example.com~1tenant");
    })
    .await;
    let keycloak = |sub: &str, roles: Value| {
        token(
            sub,
            json!({"realm_access": {"roles": roles}, "https://example.com/tenant": "acme"}),
        )
    };
    let admin = keycloak("k1", json!(["offline_access", "admin"]));
    let user = keycloak("k2", json!(["offline_access", "uma_authorization"]));
    assert_eq!(status_of_broadcast(&app, &admin).await, 202);
    assert_eq!(status_of_broadcast(&app, &user).await, 403);
    let (_, connected) = app.connect_ready(&admin).await;
    assert_eq!(connected["tenant"], "acme", "{connected}");
}
