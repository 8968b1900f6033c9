//! Identity: token claims, the keys built once at start, and the checks that
//! turn a credential into a [`Principal`].
//!
//! The algorithm is pinned by configuration (HS256 with our secret, plus RS256 or
//! ES256 when `JWT_PUBLIC_KEY` is set), never taken from the token: a token whose
//! header names anything else, `none` included, is refused. API keys and stored
//! accounts plug in behind [`Authenticator::publisher`] in a later step.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Settings};
use crate::error::ApiError;

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
            exp: now + ttl.as_secs(),
            iat: now,
            role,
            tenant: tenant.into(),
            name: None,
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
}

impl Principal {
    pub fn tenant(&self) -> &str {
        match self {
            Principal::User(claims) => &claims.tenant,
        }
    }
}

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
}

/// Keys and validation rules, built once from the settings.
pub struct Authenticator {
    hs_encoding: EncodingKey,
    hs_decoding: DecodingKey,
    hs_validation: Validation,
    /// The external identity provider's public key and its pinned algorithm.
    external: Option<(DecodingKey, Validation)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "external",
                &self.external.as_ref().map(|(_, v)| v.algorithms.clone()),
            )
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(settings: &Settings) -> Result<Self, ConfigError> {
        let secret = settings.jwt_secret.expose().as_bytes();
        let leeway = settings.jwt_leeway.as_secs();
        let external = match &settings.jwt_public_key {
            None => None,
            Some(value) => Some(external_key(value, leeway)?),
        };
        Ok(Authenticator {
            hs_encoding: EncodingKey::from_secret(secret),
            hs_decoding: DecodingKey::from_secret(secret),
            hs_validation: validation(Algorithm::HS256, leeway),
            external,
        })
    }

    /// Checks signature, pinned algorithm, `exp` and the claims' shape.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > 8 * 1024 {
            return Err(AuthError::Invalid);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        let (key, rules) = match (header.alg, &self.external) {
            (Algorithm::HS256, _) => (&self.hs_decoding, &self.hs_validation),
            (alg, Some((key, rules))) if rules.algorithms == [alg] => (key, rules),
            _ => return Err(AuthError::Invalid),
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, key, rules).map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid,
            })?;
        check_claims(&data.claims)?;
        Ok(data.claims)
    }

    /// Signs `claims` with the HS256 secret.
    pub fn mint(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.hs_encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// The principal allowed to publish with this `Authorization` header value.
    /// Admin JWTs only for now; API keys join here.
    pub fn publisher(&self, authorization: Option<&str>) -> Result<Principal, ApiError> {
        let token = bearer(authorization).ok_or(ApiError::Unauthorized(AuthError::Missing))?;
        let claims = self.verify(token).map_err(ApiError::Unauthorized)?;
        if !claims.is_admin() {
            return Err(ApiError::Forbidden("admin role required"));
        }
        Ok(Principal::User(claims))
    }
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
    rules.set_required_spec_claims(&["exp", "sub"]);
    rules
}

/// `JWT_PUBLIC_KEY` holds a PEM, or the path of one.
fn external_key(value: &str, leeway: u64) -> Result<(DecodingKey, Validation), ConfigError> {
    let pem = if value.trim_start().starts_with("-----BEGIN") {
        value.as_bytes().to_vec()
    } else {
        std::fs::read(value).map_err(|e| {
            ConfigError::Invalid(format!("cannot read JWT_PUBLIC_KEY file '{value}': {e}"))
        })?
    };
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, validation(Algorithm::RS256, leeway)));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((key, validation(Algorithm::ES256, leeway)));
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

    #[test]
    fn minted_token_verifies() {
        let auth = auth();
        let claims = Claims::new("u1", Role::Admin, "acme", Duration::from_secs(60));
        assert_eq!(auth.verify(&auth.mint(&claims)), Ok(claims));
    }

    #[test]
    fn other_algorithms_and_none_are_refused() {
        let auth = auth();
        let claims = Claims::new("u1", Role::User, "default", Duration::from_secs(60));
        let secret = Settings::for_tests("/x").jwt_secret;
        let key = EncodingKey::from_secret(secret.expose().as_bytes());
        let hs512 = jsonwebtoken::encode(&Header::new(Algorithm::HS512), &claims, &key).unwrap();
        assert_eq!(auth.verify(&hs512), Err(AuthError::Invalid));
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
                .unwrap()
                .split('.')
                .nth(1)
                .unwrap()
        );
        assert_eq!(auth.verify(&none), Err(AuthError::Invalid));
    }

    #[test]
    fn expired_and_expless_tokens_are_refused() {
        let auth = auth();
        let mut claims = Claims::new("u1", Role::User, "default", Duration::ZERO);
        claims.exp = unix_now() - 5;
        assert_eq!(auth.verify(&auth.mint(&claims)), Err(AuthError::Expired));
        let key =
            EncodingKey::from_secret(Settings::for_tests("/x").jwt_secret.expose().as_bytes());
        let no_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "u1"}),
            &key,
        )
        .unwrap();
        assert_eq!(auth.verify(&no_exp), Err(AuthError::Invalid));
    }

    #[test]
    fn bearer_header_is_parsed() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }
}
