//! The account endpoints (SPEC §2): signup, login, refresh, me; and the two
//! credential filters of the JWT-only endpoints ([`token_claims`],
//! [`admin_claims`]). The rules live in [`crate::accounts::Accounts`].
//!
//! Tokens are self-contained: a valid JWT opens a WebSocket and publishes until
//! its `exp` without a store lookup. `refresh` and `me` do look the account up,
//! so a token whose account is gone (or was never an account here, e.g. one
//! minted by `agentcast token`) gets 401 there and cannot be renewed: an
//! account's sessions end at most `TOKEN_TTL` after it is removed.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use warp::http::{HeaderMap, StatusCode};
use warp::{Filter, Rejection, Reply};

use super::body::json_body;
use super::{with_shared, PeerAddr, Shared};
use crate::auth::{AuthError, Claims, Credential};
use crate::error::ApiError;
use crate::store::User;

/// Largest body of the account and key endpoints: a password of
/// `MAX_PASSWORD_BYTES` (1 KiB) even with every character JSON-escaped fits.
pub const AUTH_BODY_LIMIT: usize = 8 * 1024;

/// `{username, password}` of a signup.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignupBody {
    username: String,
    password: String,
}

/// `{username, password}` of a login; `tenant` defaults to `default`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: String,
    #[serde(default, deserialize_with = "present_string")]
    tenant: Option<String>,
}

/// An optional field that, when present, is a string: `null` is no tenant
/// name (422), as `null` is no value of the publish body's optional fields.
fn present_string<'de, D: serde::Deserializer<'de>>(value: D) -> Result<Option<String>, D::Error> {
    String::deserialize(value).map(Some)
}

/// POST /api/v1/auth/signup
pub fn auth_signup(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "auth" / "signup")
        .and(warp::post())
        .and(signup_open(shared.clone()))
        .and(json_body::<SignupBody>(AUTH_BODY_LIMIT))
        .and(warp::ext::optional::<PeerAddr>())
        .and(warp::header::headers_cloned())
        .and(with_shared(shared))
        .and_then(signup)
}

/// POST /api/v1/auth/login
pub fn auth_login(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "auth" / "login")
        .and(warp::post())
        .and(json_body::<LoginBody>(AUTH_BODY_LIMIT))
        .and(warp::ext::optional::<PeerAddr>())
        .and(warp::header::headers_cloned())
        .and(with_shared(shared))
        .and_then(login)
}

/// POST /api/v1/auth/refresh
pub fn auth_refresh(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "auth" / "refresh")
        .and(warp::post())
        .and(token_claims(shared.clone()))
        .and(with_shared(shared))
        .and_then(refresh)
}

/// GET /api/v1/auth/me
pub fn auth_me(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "auth" / "me")
        .and(warp::get())
        .and(token_claims(shared.clone()))
        .and(with_shared(shared))
        .and_then(me)
}

async fn signup(
    body: SignupBody,
    peer: Option<PeerAddr>,
    headers: HeaderMap,
    shared: Arc<Shared>,
) -> Result<impl Reply, Rejection> {
    let ip = shared.accounts.client_ip(peer.map(|p| p.0), &headers);
    let user = shared
        .accounts
        .signup(ip, &body.username, &body.password)
        .await
        .map_err(warp::reject::custom)?;
    Ok(warp::reply::with_status(
        warp::reply::json(&json!({ "user": user })),
        StatusCode::CREATED,
    ))
}

async fn login(
    body: LoginBody,
    peer: Option<PeerAddr>,
    headers: HeaderMap,
    shared: Arc<Shared>,
) -> Result<impl Reply, Rejection> {
    let peer: Option<SocketAddr> = peer.map(|p| p.0);
    let ip = shared.accounts.client_ip(peer, &headers);
    let user = shared
        .accounts
        .login(ip, body.tenant.as_deref(), &body.username, &body.password)
        .await
        .map_err(|e| {
            if matches!(e, ApiError::Unauthorized(_)) {
                shared.hub.metrics().auth_failures.inc();
            }
            warp::reject::custom(e)
        })?;
    Ok(session(&shared, &user))
}

async fn refresh(claims: Claims, shared: Arc<Shared>) -> Result<impl Reply, Rejection> {
    // Role and tenant come from the account as it is now, not from the old token.
    let user = shared
        .accounts
        .account(&claims)
        .await
        .map_err(warp::reject::custom)?;
    Ok(session(&shared, &user))
}

async fn me(claims: Claims, shared: Arc<Shared>) -> Result<impl Reply, Rejection> {
    let user = shared
        .accounts
        .account(&claims)
        .await
        .map_err(warp::reject::custom)?;
    Ok(warp::reply::json(&json!({ "user": user })))
}

/// `{token, expires_at, expires_in, user}`: a fresh token for `user`, never cached.
fn session(shared: &Shared, user: &User) -> warp::reply::Response {
    let claims = shared.accounts.claims_for(user);
    let token = shared.auth.mint(&claims);
    let body = json!({
        "token": token,
        "expires_at": rfc3339(i64::try_from(claims.exp).unwrap_or(i64::MAX).saturating_mul(1000)),
        "expires_in": claims.exp.saturating_sub(claims.iat),
        "user": user,
    });
    no_store(warp::reply::json(&body).into_response())
}

/// 403 before the body is read when signup is off.
fn signup_open(shared: Arc<Shared>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::any()
        .and(with_shared(shared))
        .and_then(|shared: Arc<Shared>| async move {
            if shared.accounts.settings().signup {
                Ok(())
            } else {
                Err(warp::reject::custom(ApiError::Forbidden(
                    "signup is disabled on this server",
                )))
            }
        })
        .untuple_one()
}

/// The claims of a valid `Authorization: Bearer <jwt>`: 401 without one, 403
/// for an API key (keys only publish).
pub(super) fn token_claims(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (Claims,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(warp::header::optional::<String>("x-api-key"))
        .and(with_shared(shared))
        .and_then(
            |authorization: Option<String>, api_key: Option<String>, shared: Arc<Shared>| async move {
                let verdict = match Credential::from_headers(authorization.as_deref(), api_key.as_deref()) {
                    None => Err(ApiError::Unauthorized(AuthError::Missing)),
                    Some(Credential::ApiKey(_)) => Err(ApiError::Forbidden(
                        "api keys may only publish; this endpoint takes a token",
                    )),
                    Some(Credential::Token(token)) => {
                        shared.auth.verify(token).await.map_err(ApiError::Unauthorized)
                    }
                };
                verdict.map_err(|e| {
                    if matches!(e, ApiError::Unauthorized(_)) {
                        shared.hub.metrics().auth_failures.inc();
                    }
                    warp::reject::custom(e)
                })
            },
        )
}

/// [`token_claims`] of an admin: 403 for a user token.
pub(super) fn admin_claims(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (Claims,), Error = Rejection> + Clone {
    token_claims(shared).and_then(|claims: Claims| async move {
        if claims.is_admin() {
            Ok(claims)
        } else {
            Err(warp::reject::custom(ApiError::Forbidden(
                "admin role required",
            )))
        }
    })
}

/// A response holding a secret (a token, a key) must not be kept by any cache.
pub(super) fn no_store(mut response: warp::reply::Response) -> warp::reply::Response {
    response.headers_mut().insert(
        warp::http::header::CACHE_CONTROL,
        warp::http::HeaderValue::from_static("no-store"),
    );
    response
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds, like `ts`.
pub(super) fn rfc3339(ms: i64) -> Value {
    const FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .map_or(Value::Null, Value::String)
}
