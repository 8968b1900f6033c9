//! The identity provider's signing keys (`JWT_JWKS_URL`): fetched at start,
//! cached by `kid`, fetched again on a timer and when a token names a `kid`
//! the cache lacks.
//!
//! Only RS256 keys (`kty: RSA`, 2048 bits or more) and ES256 keys (`kty: EC`,
//! `crv: P-256`) are kept; each key's algorithm comes from its type and curve
//! (its `alg`, when present, must agree), so a token's header can never pick
//! a weaker one. Keys with another `use` than `sig`, `key_ops` without
//! `verify`, another type, curve or algorithm, or no `kid` are skipped, and
//! named (by `kid`) in a warning the first time a set skips them.
//!
//! Fetches are bounded (5 s in all, `JWKS_FETCH_TIMEOUT`; 1 MiB, 100 keys) and
//! single-flight: the timer and every token waiting for an unknown `kid` share
//! one fetch, which runs in a task of its own, so a caller that goes away
//! does not cancel it. Fetches for unknown `kid`s happen at most once per
//! [`JwksSettings::min_refresh_gap`]: tokens with forged `kid`s cost the
//! provider one request per gap, not one each. A failed fetch (refused,
//! timed out, non-2xx, too large, bad JSON, no usable key) keeps the keys
//! cached before it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::watch;
use tokio::time::Instant;

use super::VerifyingKey;
use crate::config::JwksSettings;

/// Largest key set body read.
const MAX_BODY: usize = 1 << 20;
/// Most keys kept from one set; the rest are skipped.
const MAX_KEYS: usize = 100;
/// Longest `kid` kept.
const MAX_KID: usize = 256;
/// Skipped keys named in a log line; the rest are counted.
const MAX_SKIPPED_NAMED: usize = 20;
/// Smallest RSA modulus accepted, in bytes (2048 bits).
const MIN_RSA_BYTES: usize = 256;
/// First pause between two start attempts; it doubles up to the last.
const START_RETRY_FIRST: Duration = Duration::from_millis(250);
const START_RETRY_MAX: Duration = Duration::from_secs(2);

/// The usable keys of one fetched set, by `kid`.
type KeySet = HashMap<String, Arc<VerifyingKey>>;

/// Clone-able handle on the cached key set and its refreshes.
#[derive(Clone)]
pub struct Jwks(Arc<Inner>);

struct Inner {
    url: reqwest::Url,
    client: reqwest::Client,
    settings: JwksSettings,
    /// Replaced whole by each successful fetch; never held across an await.
    keys: RwLock<Arc<KeySet>>,
    state: Mutex<FetchState>,
    /// Counts finished fetches (kept or not): waiters for an unknown `kid`
    /// wake when it moves.
    finished: watch::Sender<u64>,
}

#[derive(Default)]
struct FetchState {
    /// A fetch task is running: join it instead of starting another.
    running: bool,
    /// When the last fetch for an unknown `kid` started (the rate limit).
    last_on_demand: Option<Instant>,
    /// What the last set skipped, so a warning is logged once, not each fetch.
    last_skipped: Vec<String>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("host", &self.0.url.host_str())
            .field("keys", &self.cached_kids().len())
            .finish_non_exhaustive()
    }
}

/// Why a fetch kept the cached keys. The text never holds key material.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request failed: {0}")]
    Request(String),
    #[error("status {0}")]
    Status(u16),
    #[error("the key set is larger than 1 MiB")]
    TooLarge,
    #[error("not a JWK set: {0}")]
    BadJson(String),
    #[error("no usable RS256 or ES256 signing key in the set")]
    NoUsableKey,
}

impl Jwks {
    /// A handle with an empty cache; [`Jwks::load_at_start`] fills it.
    pub fn new(settings: &JwksSettings) -> Result<Jwks, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(settings.fetch_timeout)
            .timeout(settings.fetch_timeout)
            // A redirect could lead to plain http: the URL is the one used.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("agentcast/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let (finished, _) = watch::channel(0);
        Ok(Jwks(Arc::new(Inner {
            url: settings.url.clone(),
            client,
            settings: settings.clone(),
            keys: RwLock::new(Arc::new(KeySet::new())),
            state: Mutex::new(FetchState::default()),
            finished,
        })))
    }

    /// The cached key named `kid`.
    pub fn key(&self, kid: &str) -> Option<Arc<VerifyingKey>> {
        let keys = self.0.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.get(kid).cloned()
    }

    /// The `kid`s cached now, sorted (for logs and tests).
    pub fn cached_kids(&self) -> Vec<String> {
        let keys = self.0.keys.read().unwrap_or_else(|p| p.into_inner());
        let mut kids: Vec<String> = keys.keys().cloned().collect();
        kids.sort();
        kids
    }

    /// The first fetch: retried with backoff for `start_wait`, then the
    /// server starts anyway with no keys (a warning; `/health` is not
    /// affected), and the timer or the first token with a `kid` tries again.
    pub async fn load_at_start(&self) {
        let deadline = Instant::now() + self.0.settings.start_wait;
        let mut pause = START_RETRY_FIRST;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let error = match tokio::time::timeout(left, self.fetch_once()).await {
                Ok(Ok(())) => {
                    let kids = self.cached_kids();
                    tracing::info!(host = self.0.url.host_str(), ?kids, "JWKS loaded");
                    return;
                }
                Ok(Err(error)) => error.to_string(),
                Err(_) => "no answer in time".to_owned(),
            };
            if Instant::now() + pause >= deadline {
                tracing::warn!(
                    host = self.0.url.host_str(),
                    %error,
                    "JWKS not loaded at start; external tokens are refused until a later fetch \
                     succeeds"
                );
                return;
            }
            tracing::info!(host = self.0.url.host_str(), %error, "JWKS not reachable yet; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(START_RETRY_MAX);
        }
    }

    /// Fetches the key set every `refresh` until `stop` resolves.
    pub async fn refresh_periodically(self, stop: impl std::future::Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let period = self.0.settings.refresh;
        let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = &mut stop => return,
            }
            if let Some(mut done) = self.start_fetch(false) {
                let _ = done.changed().await;
            }
        }
    }

    /// A token names a `kid` the cache lacks: waits for a fetch, joining the
    /// one running or starting one unless one started less than
    /// `min_refresh_gap` ago (then returns at once: the caller's token is
    /// refused, the provider is not asked).
    pub async fn refresh_for_unknown_kid(&self) {
        if let Some(mut done) = self.start_fetch(true) {
            // The fetch bounds itself; this only guards against a lost task.
            let _ = tokio::time::timeout(self.0.settings.fetch_timeout * 2, done.changed()).await;
        }
    }

    /// Starts a fetch task unless one runs (then joins it) or, `on_demand`,
    /// the rate limit says no (then `None`). The receiver wakes when it ends.
    fn start_fetch(&self, on_demand: bool) -> Option<watch::Receiver<u64>> {
        // Subscribed before the state is read: a fetch seen running has not
        // announced its end yet, so this receiver will see it.
        let done = self.0.finished.subscribe();
        let mut state = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.running {
            return Some(done);
        }
        if on_demand {
            let now = Instant::now();
            let recent = state
                .last_on_demand
                .is_some_and(|last| now.duration_since(last) < self.0.settings.min_refresh_gap);
            if recent {
                return None;
            }
            state.last_on_demand = Some(now);
        }
        state.running = true;
        drop(state);
        let jwks = self.clone();
        tokio::spawn(async move {
            if let Err(error) = jwks.fetch_once().await {
                tracing::warn!(
                    host = jwks.0.url.host_str(),
                    %error,
                    "JWKS fetch failed; keeping the cached keys"
                );
            }
            jwks.0
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .running = false;
            jwks.0.finished.send_modify(|n| *n += 1);
        });
        Some(done)
    }

    /// One fetch; on success the cache becomes the new set.
    async fn fetch_once(&self) -> Result<(), FetchError> {
        let body = self.download().await?;
        let parsed = parse_key_set(&body)?;
        self.log_skipped(parsed.skipped, parsed.skipped_unnamed);
        if parsed.keys.is_empty() {
            return Err(FetchError::NoUsableKey);
        }
        let mut kids: Vec<&str> = parsed.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        tracing::debug!(host = self.0.url.host_str(), ?kids, "JWKS loaded");
        *self.0.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(parsed.keys);
        Ok(())
    }

    /// The body of the key set, at most [`MAX_BODY`] bytes.
    async fn download(&self) -> Result<Vec<u8>, FetchError> {
        let request = |e: reqwest::Error| FetchError::Request(without_url(e));
        let mut response = self
            .0
            .client
            .get(self.0.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(request)?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            return Err(FetchError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(request)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Skipped keys are a warning when the set of them changes, else debug.
    fn log_skipped(&self, skipped: Vec<String>, more: usize) {
        let mut state = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        if skipped.is_empty() {
            // Nothing to say.
        } else if skipped == state.last_skipped {
            tracing::debug!(?skipped, more, "JWKS keys skipped");
        } else {
            tracing::warn!(
                ?skipped,
                more,
                "JWKS keys skipped: only RS256 and ES256 (P-256) signing keys with a kid are used"
            );
        }
        state.last_skipped = skipped;
    }
}

/// A reqwest error's text without its URL (the log line names the host; the
/// URL could hold a query string): what failed, then its causes.
fn without_url(error: reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else if error.is_body() || error.is_decode() {
        "bad body"
    } else {
        "failed"
    }
    .to_owned();
    let mut cause = std::error::Error::source(&error);
    while let Some(source) = cause {
        text.push_str(": ");
        text.push_str(&source.to_string());
        cause = source.source();
    }
    text
}

/// The usable keys of a set, and the keys skipped: the first
/// [`MAX_SKIPPED_NAMED`] by `kid` (or index) and why, the rest counted.
#[derive(Default)]
pub struct ParsedSet {
    pub keys: KeySet,
    pub skipped: Vec<String>,
    pub skipped_unnamed: usize,
}

impl ParsedSet {
    fn skip(&mut self, name: &str, why: &str) {
        if self.skipped.len() < MAX_SKIPPED_NAMED {
            self.skipped.push(format!("{name}: {why}"));
        } else {
            self.skipped_unnamed += 1;
        }
    }
}

/// Parses a JWK set (`{"keys": [...]}`); one key that is no JWK or not usable
/// is skipped, never the set.
pub fn parse_key_set(body: &[u8]) -> Result<ParsedSet, FetchError> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet =
        serde_json::from_slice(body).map_err(|e| FetchError::BadJson(e.to_string()))?;
    let mut parsed = ParsedSet::default();
    for (index, value) in raw.keys.into_iter().enumerate() {
        let kid = value
            .get("kid")
            .and_then(|k| k.as_str())
            .map(|k| k.chars().take(64).collect::<String>());
        let name = kid.unwrap_or_else(|| format!("#{index}"));
        let jwk: Jwk = match serde_json::from_value(value) {
            Ok(jwk) => jwk,
            Err(_) => {
                parsed.skip(&name, "not a JWK");
                continue;
            }
        };
        match usable_key(&jwk) {
            Err(why) => parsed.skip(&name, why),
            Ok(_) if parsed.keys.len() == MAX_KEYS => parsed.skip(&name, "more than 100 keys"),
            Ok((kid, _)) if parsed.keys.contains_key(kid) => parsed.skip(&name, "kid repeated"),
            Ok((kid, key)) => {
                parsed.keys.insert(kid.to_owned(), Arc::new(key));
            }
        }
    }
    Ok(parsed)
}

/// The `kid` and key of a usable signing key, else why it is skipped.
fn usable_key(jwk: &Jwk) -> Result<(&str, VerifyingKey), &'static str> {
    let kid = jwk.common.key_id.as_deref().ok_or("no kid")?;
    if kid.is_empty() || kid.len() > MAX_KID {
        return Err("kid is empty or longer than 256 bytes");
    }
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(_) => return Err("use is not sig"),
    }
    if let Some(ops) = &jwk.common.key_operations {
        if !ops.iter().any(|op| matches!(op, KeyOperations::Verify)) {
            return Err("key_ops lacks verify");
        }
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            if modulus_len(&rsa.n) < MIN_RSA_BYTES {
                return Err("RSA key shorter than 2048 bits");
            }
            Algorithm::RS256
        }
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::EllipticCurve(_) => return Err("curve is not P-256"),
        _ => return Err("key type is not RSA or EC"),
    };
    match jwk.common.key_algorithm {
        None => {}
        Some(stated) if stated == KeyAlgorithm::from(alg) => {}
        Some(_) => return Err("alg is not RS256 (RSA) or ES256 (EC P-256)"),
    }
    let decoding = DecodingKey::from_jwk(jwk).map_err(|_| "key parameters are invalid")?;
    Ok((kid, VerifyingKey { alg, decoding }))
}

/// Bytes of a base64url modulus without its leading zeros (0 if it is not base64url).
fn modulus_len(n: &str) -> usize {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(n.trim_end_matches('='))
        .map(|bytes| bytes.iter().skip_while(|b| **b == 0).count())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A real 2048-bit modulus (the tests' RSA key) and P-256 point.
    const N: &str = "iUTNG8j3U2yKQR8XXIovnEmRp0Cgk7KMQOonxaND0jcR48btWCE4lyqkTghgXftX55JfaUeti_fw1oVLIr-tcaow1InnUpywJYob9iSug5lokclCqWuKkc9eTihEwdGu60qWSG2Xg_2eR7etbBfMiBj-h3JlnY0AQQyULWSyhcoQKiVnKVq2iSLQ6vgT_RpbTQe9my8eRFg8VUOvukjtX8konk-8gNQO2K6J_hQFdP_Jcekgq-kgk0UgtaZ8cjaRLNC-Kj2KrxIC71Ny-hY1FhsevewaFlxGu1cuQmqBv2Q_2_H_Y4tEUldLeO8icIpRwFCfaH_4mSfBOaObJaqVQQ";
    const X: &str = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
    const Y: &str = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";

    fn rsa(extra: serde_json::Value) -> serde_json::Value {
        let mut key = json!({"kty": "RSA", "n": N, "e": "AQAB"});
        key.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        key
    }

    fn ec(extra: serde_json::Value) -> serde_json::Value {
        let mut key = json!({"kty": "EC", "crv": "P-256", "x": X, "y": Y});
        key.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        key
    }

    fn parse(keys: Vec<serde_json::Value>) -> ParsedSet {
        parse_key_set(json!({ "keys": keys }).to_string().as_bytes()).expect("a set")
    }

    #[test]
    fn rsa_and_p256_signing_keys_are_kept_with_their_pinned_algorithm() {
        let set = parse(vec![
            rsa(json!({"kid": "r1", "use": "sig", "alg": "RS256"})),
            rsa(json!({"kid": "r2"})),
            ec(json!({"kid": "e1", "alg": "ES256", "key_ops": ["verify"]})),
        ]);
        assert!(set.skipped.is_empty(), "{:?}", set.skipped);
        let alg = |kid: &str| set.keys[kid].alg;
        assert_eq!(
            (alg("r1"), alg("r2"), alg("e1")),
            (Algorithm::RS256, Algorithm::RS256, Algorithm::ES256)
        );
    }

    #[test]
    fn keys_we_cannot_or_must_not_use_are_skipped_and_named() {
        let set = parse(vec![
            rsa(json!({"kid": "enc", "use": "enc"})),
            rsa(json!({"kid": "ps", "alg": "PS256"})),
            rsa(json!({"kid": "rs512", "alg": "RS512"})),
            rsa(json!({"kid": "claims-es", "alg": "ES256"})),
            rsa(json!({"kid": "short", "n": "AQAB"})),
            rsa(json!({})),
            ec(json!({"kid": "p384", "crv": "P-384"})),
            ec(json!({"kid": "ec-rs", "alg": "RS256"})),
            ec(json!({"kid": "sign-only", "key_ops": ["sign"]})),
            json!({"kid": "oct", "kty": "oct", "k": "c2VjcmV0"}),
            json!({"kid": "okp", "kty": "OKP", "crv": "Ed25519", "x": X}),
            json!({"kid": 7, "kty": "RSA"}),
            json!("not an object"),
            rsa(json!({"kid": "good"})),
            rsa(json!({"kid": "good"})),
        ]);
        assert_eq!(set.keys.keys().collect::<Vec<_>>(), ["good"]);
        assert_eq!(set.skipped.len(), 14, "{:?}", set.skipped);
        let joined = set.skipped.join("\n");
        for name in [
            "enc",
            "ps",
            "rs512",
            "claims-es",
            "short",
            "#5",
            "p384",
            "oct",
            "okp",
        ] {
            assert!(joined.contains(&format!("{name}:")), "{name} in {joined}");
        }
        assert!(joined.contains("good: kid repeated"), "{joined}");
        assert!(!joined.contains(N), "no key material in the log lines");
    }

    #[test]
    fn a_set_keeps_at_most_100_keys_and_names_20_it_skips() {
        let keys = (0..150)
            .map(|i| rsa(json!({"kid": format!("k{i}")})))
            .collect();
        let set = parse(keys);
        assert_eq!(set.keys.len(), 100);
        assert_eq!((set.skipped.len(), set.skipped_unnamed), (20, 30));
        assert_eq!(set.skipped[0], "k100: more than 100 keys");
    }

    #[test]
    fn a_body_that_is_no_key_set_is_an_error() {
        for body in [&b"not json"[..], b"{}", b"{\"keys\": {}}", b"[]"] {
            assert!(matches!(parse_key_set(body), Err(FetchError::BadJson(_))));
        }
    }
}
