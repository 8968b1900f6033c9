//! Identity: token claims, the keys built once at start, and the checks that
//! turn a credential into a [`Principal`].
//!
//! The algorithm is pinned by configuration, never taken from the token: HS256
//! with our secret, plus RS256 or ES256 for an external identity provider,
//! pinned by `JWT_PUBLIC_KEY` (a PEM) or, with `JWT_JWKS_URL`, by the JWK the
//! token's `kid` names ([`jwks`]: its type and curve, and its `alg` when
//! present). A token whose header names another algorithm than its key's,
//! `none` included, is refused; with a JWKS a token without `kid` is refused
//! too, even when the set holds one key. `exp` is required, `nbf` honoured,
//! both with the configured leeway. External tokens must name `JWT_ISSUER` and
//! `JWT_AUDIENCE` (a provider signs for many applications); our own HS256
//! tokens carry no `aud`, and one that does must match `JWT_AUDIENCE` when it
//! is set (unset: `aud` is ignored, not refused). `JWT_ROLE_CLAIM` and
//! `JWT_TENANT_CLAIM` map an external token's claims onto `role` and `tenant`
//! ([`mapping`]).
//!
//! [`Authenticator::verify`] is async: a token naming a `kid` the cached key
//! set lacks waits for one rate-limited, shared fetch of the set and is
//! checked once more; every other token is decided without waiting.
//!
//! API keys (`ak_…`, SPEC §2) are the other credential: they are looked up by
//! their SHA-256 hash in the directory (SQLite, or the shared Redis in cluster
//! mode, with no cache: a key revoked on any node fails on the next request),
//! authorize the publish endpoints of their own tenant only, and never open a
//! WebSocket.

pub mod jwks;
pub mod mapping;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Settings, EXTERNAL_NEEDS_ISS_AUD};
use crate::directory::Directory;
use crate::error::ApiError;
use crate::store::{hash_api_key, looks_like_api_key};
use jwks::Jwks;
use mapping::ClaimMapping;

/// What a token lets its holder do inside its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    #[default]
    User,
}

/// The claims agentcast reads from a JWT (SPEC §2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default)]
    pub role: Role,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The channels a user may subscribe to (SPEC §4.4): exact names or
    /// prefixes ending in `*`; absent: the setting `USER_CHANNELS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Box<[String]>>,
}

fn default_tenant() -> String {
    "default".to_owned()
}

impl Claims {
    /// Claims for `sub` valid for `ttl` from now.
    pub fn new(
        sub: impl Into<String>,
        role: Role,
        tenant: impl Into<String>,
        ttl: Duration,
    ) -> Self {
        let now = unix_now();
        Claims {
            sub: sub.into(),
            exp: now.saturating_add(ttl.as_secs()),
            iat: now,
            role,
            tenant: tenant.into(),
            name: None,
            channels: None,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// Who is calling a publish endpoint.
#[derive(Debug, Clone)]
pub enum Principal {
    /// An admin (or user) JWT.
    User(Claims),
    /// An API key: its id (never the key) and the tenant it was made in, which
    /// is the only tenant it may publish to.
    ApiKey { id: String, tenant: String },
}

impl Principal {
    pub fn tenant(&self) -> &str {
        match self {
            Principal::User(claims) => &claims.tenant,
            Principal::ApiKey { tenant, .. } => tenant,
        }
    }
}

/// A credential as the request presented it, before any check.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    Token(&'a str),
    ApiKey(&'a str),
}

impl std::fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::Token(_) => "Token(***)",
            Credential::ApiKey(_) => "ApiKey(***)",
        })
    }
}

impl<'a> Credential<'a> {
    /// `Authorization: Bearer <jwt | ak_…>`, else `X-API-Key: ak_…`.
    pub fn from_headers(authorization: Option<&'a str>, api_key: Option<&'a str>) -> Option<Self> {
        if let Some(token) = bearer(authorization) {
            return Some(Credential::classify(token));
        }
        let key = api_key.map(str::trim).filter(|k| !k.is_empty())?;
        Some(Credential::ApiKey(key))
    }

    /// A bearer value starting with `ak_` is an API key, anything else a JWT.
    pub fn classify(value: &'a str) -> Self {
        if value.starts_with(API_KEY_PREFIX) {
            Credential::ApiKey(value)
        } else {
            Credential::Token(value)
        }
    }
}

/// What every API key starts with.
pub const API_KEY_PREFIX: &str = "ak_";

/// Why a credential was refused. The text is safe to show: it never echoes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials")]
    Missing,
    #[error("invalid token")]
    Invalid,
    #[error("token expired")]
    Expired,
    #[error("token claims are invalid: {0}")]
    BadClaims(&'static str),
    #[error("invalid username or password")]
    BadLogin,
    #[error("invalid api key")]
    InvalidApiKey,
    #[error("api keys cannot open a websocket; use a token")]
    ApiKeyOnWebSocket,
    #[error("no account for this token")]
    UnknownAccount,
}

/// Keys and validation rules, built once from the settings.
pub struct Authenticator {
    hs_encoding: EncodingKey,
    hs_decoding: DecodingKey,
    hs_validation: Validation,
    /// The external identity provider's keys and rules.
    external: Option<External>,
}

/// What external tokens are checked with.
struct External {
    keys: ExternalKeys,
    /// The rules of RS256 and ES256 tokens: iss, aud, exp, sub required.
    rs256: Validation,
    es256: Validation,
    mapping: ClaimMapping,
}

enum ExternalKeys {
    /// `JWT_PUBLIC_KEY`: one key, whatever the token's `kid`.
    Pem(Arc<VerifyingKey>),
    /// `JWT_JWKS_URL`: the key the token's `kid` names.
    Jwks(Jwks),
}

/// A provider's public key and the one algorithm it verifies.
pub struct VerifyingKey {
    pub alg: Algorithm,
    pub decoding: DecodingKey,
}

/// The outcome of checking a token against the keys cached now.
enum Verdict {
    Checked(Result<Claims, AuthError>),
    /// Signed by the provider with a `kid` the cached set lacks.
    UnknownKid,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let external = self.external.as_ref().map(|external| match &external.keys {
            ExternalKeys::Pem(key) => format!("{:?} public key", key.alg),
            ExternalKeys::Jwks(jwks) => format!("{jwks:?}"),
        });
        f.debug_struct("Authenticator")
            .field("external", &external)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Keys and rules from `settings`; with `JWT_JWKS_URL` the key set starts
    /// empty ([`Jwks::load_at_start`] fills it).
    pub fn new(settings: &Settings) -> Result<Self, ConfigError> {
        let secret = settings.jwt_secret.expose().as_bytes();
        let leeway = settings.jwt_leeway.as_secs();
        let audience = settings.jwt_audience.as_deref();
        let keys = match (&settings.jwt_public_key, &settings.jwt_jwks) {
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "JWT_PUBLIC_KEY and JWT_JWKS_URL are both set: use one".to_owned(),
                ))
            }
            (Some(pem), None) => Some(ExternalKeys::Pem(Arc::new(external_key(pem)?))),
            (None, Some(jwks)) => {
                crate::config::jwks_url(jwks.url.as_str())?;
                let jwks = Jwks::new(jwks).map_err(|e| {
                    ConfigError::Invalid(format!("cannot build the JWKS client: {e}"))
                })?;
                Some(ExternalKeys::Jwks(jwks))
            }
        };
        let external = match keys {
            None => None,
            Some(keys) => {
                let (Some(issuer), Some(audience)) = (settings.jwt_issuer.as_deref(), audience)
                else {
                    return Err(ConfigError::Invalid(EXTERNAL_NEEDS_ISS_AUD.to_owned()));
                };
                let rules = |alg| {
                    let mut rules = validation(alg, leeway);
                    rules.set_issuer(&[issuer]);
                    rules.set_audience(&[audience]);
                    rules.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
                    rules
                };
                Some(External {
                    keys,
                    rs256: rules(Algorithm::RS256),
                    es256: rules(Algorithm::ES256),
                    mapping: ClaimMapping {
                        role: settings.jwt_role_claim.clone(),
                        tenant: settings.jwt_tenant_claim.clone(),
                    },
                })
            }
        };
        let mut hs_validation = validation(Algorithm::HS256, leeway);
        match audience {
            Some(audience) => hs_validation.set_audience(&[audience]),
            None => hs_validation.validate_aud = false,
        }
        Ok(Authenticator {
            hs_encoding: EncodingKey::from_secret(secret),
            hs_decoding: DecodingKey::from_secret(secret),
            hs_validation,
            external,
        })
    }

    /// The provider's key set when `JWT_JWKS_URL` is set, for the start-up
    /// fetch and the refresh timer.
    pub fn jwks(&self) -> Option<&Jwks> {
        match &self.external.as_ref()?.keys {
            ExternalKeys::Jwks(jwks) => Some(jwks),
            ExternalKeys::Pem(_) => None,
        }
    }

    /// Checks signature, pinned algorithm, `exp` and the claims' shape. A
    /// token naming a `kid` the cached key set lacks waits for a fetch of the
    /// set (shared, and at most one per `min_refresh_gap`) and is checked once
    /// more; every other token is decided at once.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        match self.check(token) {
            Verdict::Checked(result) => result,
            Verdict::UnknownKid => {
                if let Some(jwks) = self.jwks() {
                    jwks.refresh_for_unknown_kid().await;
                }
                match self.check(token) {
                    Verdict::Checked(result) => result,
                    Verdict::UnknownKid => Err(AuthError::Invalid),
                }
            }
        }
    }

    /// [`Authenticator::verify`] against the keys held now.
    fn check(&self, token: &str) -> Verdict {
        if token.is_empty() {
            return Verdict::Checked(Err(AuthError::Missing));
        }
        if token.len() > 8 * 1024 {
            return Verdict::Checked(Err(AuthError::Invalid));
        }
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Verdict::Checked(Err(AuthError::Invalid));
        };
        if header.alg == Algorithm::HS256 {
            let result =
                jsonwebtoken::decode::<Claims>(token, &self.hs_decoding, &self.hs_validation)
                    .map_err(decode_error)
                    .and_then(|data| check_claims(&data.claims).map(|()| data.claims));
            return Verdict::Checked(result);
        }
        let Some(external) = &self.external else {
            return Verdict::Checked(Err(AuthError::Invalid));
        };
        let rules = match header.alg {
            Algorithm::RS256 => &external.rs256,
            Algorithm::ES256 => &external.es256,
            _ => return Verdict::Checked(Err(AuthError::Invalid)),
        };
        let key = match &external.keys {
            ExternalKeys::Pem(key) => key.clone(),
            ExternalKeys::Jwks(jwks) => {
                // Strict: no `kid`, no key, even when the set holds only one.
                let Some(kid) = header.kid.as_deref() else {
                    return Verdict::Checked(Err(AuthError::Invalid));
                };
                match jwks.key(kid) {
                    Some(key) => key,
                    None => return Verdict::UnknownKid,
                }
            }
        };
        // The key's algorithm, never the header's alone.
        if key.alg != header.alg {
            return Verdict::Checked(Err(AuthError::Invalid));
        }
        Verdict::Checked(external.decode(token, &key.decoding, rules))
    }

    /// Signs `claims` with the HS256 secret.
    pub fn mint(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.hs_encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// The principal allowed to publish with these headers: an admin JWT, or an
    /// active API key (its tenant comes from the directory, never from the request).
    pub async fn publisher(
        &self,
        directory: &Directory,
        authorization: Option<&str>,
        api_key: Option<&str>,
    ) -> Result<Principal, ApiError> {
        let principal = self.principal(directory, authorization, api_key).await?;
        if let Principal::User(claims) = &principal {
            if !claims.is_admin() {
                return Err(ApiError::Forbidden("admin role required"));
            }
        }
        Ok(principal)
    }

    /// The principal behind these headers: any valid JWT, or an active API
    /// key (for endpoints that both may read, like a channel's history).
    pub async fn principal(
        &self,
        directory: &Directory,
        authorization: Option<&str>,
        api_key: Option<&str>,
    ) -> Result<Principal, ApiError> {
        match Credential::from_headers(authorization, api_key) {
            None => Err(ApiError::Unauthorized(AuthError::Missing)),
            Some(Credential::ApiKey(key)) => api_key_principal(directory, key).await,
            Some(Credential::Token(token)) => self
                .verify(token)
                .await
                .map(Principal::User)
                .map_err(ApiError::Unauthorized),
        }
    }
}

/// The active key `key`, noting its use; 401 for a malformed, unknown or
/// revoked key, 503 when the directory cannot answer (never a 401 then). The
/// lookup is by SHA-256 hash, so no comparison of the secret itself can leak
/// timing.
async fn api_key_principal(directory: &Directory, key: &str) -> Result<Principal, ApiError> {
    if !looks_like_api_key(key) {
        return Err(ApiError::Unauthorized(AuthError::InvalidApiKey));
    }
    let info = directory
        .use_api_key(hash_api_key(key))
        .await?
        .ok_or(ApiError::Unauthorized(AuthError::InvalidApiKey))?;
    Ok(Principal::ApiKey {
        id: info.id,
        tenant: info.tenant,
    })
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let value = authorization?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn validation(alg: Algorithm, leeway: u64) -> Validation {
    let mut rules = Validation::new(alg);
    rules.leeway = leeway;
    rules.validate_exp = true;
    rules.validate_nbf = true;
    rules.set_required_spec_claims(&["exp", "sub"]);
    rules
}

impl External {
    /// Checks the token with `key` and `rules`, maps the provider's claims
    /// onto ours, then the claims' shape.
    fn decode(
        &self,
        token: &str,
        key: &DecodingKey,
        rules: &Validation,
    ) -> Result<Claims, AuthError> {
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, key, rules)
                .map_err(decode_error)?;
        let mut claims = data.claims;
        self.mapping.apply(&mut claims)?;
        let claims: Claims = serde_json::from_value(serde_json::Value::Object(claims))
            .map_err(|_| AuthError::Invalid)?;
        check_claims(&claims)?;
        Ok(claims)
    }
}

fn decode_error(error: jsonwebtoken::errors::Error) -> AuthError {
    match error.kind() {
        jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
        _ => AuthError::Invalid,
    }
}

/// `JWT_PUBLIC_KEY` holds a PEM, or the path of one.
fn external_key(value: &str) -> Result<VerifyingKey, ConfigError> {
    let pem = if value.trim_start().starts_with("-----BEGIN") {
        value.as_bytes().to_vec()
    } else {
        std::fs::read(value).map_err(|e| {
            ConfigError::Invalid(format!("cannot read JWT_PUBLIC_KEY file '{value}': {e}"))
        })?
    };
    if let Ok(decoding) = DecodingKey::from_rsa_pem(&pem) {
        return Ok(VerifyingKey {
            alg: Algorithm::RS256,
            decoding,
        });
    }
    if let Ok(decoding) = DecodingKey::from_ec_pem(&pem) {
        return Ok(VerifyingKey {
            alg: Algorithm::ES256,
            decoding,
        });
    }
    Err(ConfigError::Invalid(
        "JWT_PUBLIC_KEY is neither an RSA nor an EC (P-256) public key in PEM".to_owned(),
    ))
}

fn check_claims(claims: &Claims) -> Result<(), AuthError> {
    if claims.sub.is_empty() || claims.sub.len() > 128 || claims.sub.chars().any(char::is_control) {
        return Err(AuthError::BadClaims(
            "sub must be 1-128 printable characters",
        ));
    }
    if !valid_tenant(&claims.tenant) {
        return Err(AuthError::BadClaims(
            "tenant must be 1-64 of [A-Za-z0-9_.-]",
        ));
    }
    if claims.name.as_ref().is_some_and(|n| n.len() > 256) {
        return Err(AuthError::BadClaims("name is longer than 256 bytes"));
    }
    if let Some(channels) = &claims.channels {
        crate::channels::check_claim(channels).map_err(AuthError::BadClaims)?;
    }
    Ok(())
}

pub fn valid_tenant(tenant: &str) -> bool {
    (1..=64).contains(&tenant.len())
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Compares two secrets without stopping at the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random base62 string of `len` characters from the OS-seeded thread RNG.
pub fn random_token(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(&Settings::for_tests("/nonexistent")).unwrap()
    }

    #[tokio::test]
    async fn minted_token_verifies() {
        let auth = auth();
        let claims = Claims::new("u1", Role::Admin, "acme", Duration::from_secs(60));
        assert_eq!(auth.verify(&auth.mint(&claims)).await, Ok(claims));
    }

    #[tokio::test]
    async fn other_algorithms_and_none_are_refused() {
        let auth = auth();
        let claims = Claims::new("u1", Role::User, "default", Duration::from_secs(60));
        let secret = Settings::for_tests("/x").jwt_secret;
        let key = EncodingKey::from_secret(secret.expose().as_bytes());
        let hs512 = jsonwebtoken::encode(&Header::new(Algorithm::HS512), &claims, &key).unwrap();
        assert_eq!(auth.verify(&hs512).await, Err(AuthError::Invalid));
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
                .unwrap()
                .split('.')
                .nth(1)
                .unwrap()
        );
        assert_eq!(auth.verify(&none).await, Err(AuthError::Invalid));
    }

    #[tokio::test]
    async fn expired_and_expless_tokens_are_refused() {
        let auth = auth();
        let mut claims = Claims::new("u1", Role::User, "default", Duration::ZERO);
        claims.exp = unix_now() - 5;
        assert_eq!(
            auth.verify(&auth.mint(&claims)).await,
            Err(AuthError::Expired)
        );
        let key =
            EncodingKey::from_secret(Settings::for_tests("/x").jwt_secret.expose().as_bytes());
        let no_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "u1"}),
            &key,
        )
        .unwrap();
        assert_eq!(auth.verify(&no_exp).await, Err(AuthError::Invalid));
    }

    #[test]
    fn bearer_header_is_parsed() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn api_keys_are_told_from_tokens() {
        let key = "ak_0123456789abcdefghijklmnopqrstuvwxyz";
        assert_eq!(
            Credential::from_headers(Some(&format!("Bearer {key}")), None),
            Some(Credential::ApiKey(key))
        );
        assert_eq!(
            Credential::from_headers(None, Some(key)),
            Some(Credential::ApiKey(key))
        );
        assert_eq!(
            Credential::from_headers(Some("Bearer eyJ.x.y"), Some(key)),
            Some(Credential::Token("eyJ.x.y")),
            "Authorization wins"
        );
        assert_eq!(Credential::from_headers(None, Some("  ")), None);
        assert!(!format!("{:?}", Credential::ApiKey(key)).contains("0123"));
    }
}
