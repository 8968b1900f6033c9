//! API keys (SPEC §2), for the admins of a tenant: create (the key is shown
//! once), list (never a secret), revoke (at once). Each create and revoke is
//! also a `system` warning to the tenant's admins: the security alerts of the
//! api-keys page.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use super::accounts::{admin_claims, no_store, rfc3339, AUTH_BODY_LIMIT};
use super::body::json_body;
use super::{with_shared, Shared};
use crate::auth::Claims;
use crate::directory::DirectoryError;
use crate::error::ApiError;
use crate::log::Target;
use crate::store::{new_api_key, ApiKeyInfo};

/// `{name}` of a new key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
}

/// POST /api/v1/api-keys
pub fn api_keys_create(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "api-keys")
        .and(warp::post())
        .and(admin_claims(shared.clone()))
        .and(json_body::<NewKey>(AUTH_BODY_LIMIT))
        .and(with_shared(shared))
        .and_then(create)
}

/// GET /api/v1/api-keys
pub fn api_keys_list(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "api-keys")
        .and(warp::get())
        .and(admin_claims(shared.clone()))
        .and(with_shared(shared))
        .and_then(list)
}

/// DELETE /api/v1/api-keys/:id
pub fn api_keys_revoke(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "api-keys" / String)
        .and(warp::delete())
        .and(admin_claims(shared.clone()))
        .and(with_shared(shared))
        .and_then(revoke)
}

async fn create(
    claims: Claims,
    body: NewKey,
    shared: Arc<Shared>,
) -> Result<impl Reply, Rejection> {
    let (key, hash, prefix) = new_api_key();
    let info = shared
        .directory
        .create_api_key(&claims.tenant, &body.name, hash, &prefix)
        .await
        .map_err(reject)?;
    tracing::info!(tenant = %info.tenant, key_id = %info.id, prefix = %info.prefix, by = %claims.sub, "api key created");
    alert_admins(
        &shared,
        &info.tenant,
        format!(
            "API key \"{}\" ({}…) was created by {}",
            info.name,
            info.prefix,
            who(&claims)
        ),
    )
    .await;
    let body = json!({
        "id": info.id,
        "name": info.name,
        "key": key,
        "prefix": info.prefix,
        "created_at": rfc3339(info.created_at_ms),
    });
    let response = warp::reply::with_status(warp::reply::json(&body), StatusCode::CREATED);
    Ok(no_store(response.into_response()))
}

async fn list(claims: Claims, shared: Arc<Shared>) -> Result<impl Reply, Rejection> {
    let keys = shared
        .directory
        .list_api_keys(&claims.tenant)
        .await
        .map_err(reject)?;
    let keys: Vec<_> = keys.iter().map(public_view).collect();
    Ok(warp::reply::json(&json!({ "api_keys": keys })))
}

async fn revoke(id: String, claims: Claims, shared: Arc<Shared>) -> Result<impl Reply, Rejection> {
    // Looked up first for the alert's text; the revoke itself decides.
    let known = shared
        .directory
        .list_api_keys(&claims.tenant)
        .await
        .map_err(reject)?
        .into_iter()
        .find(|k| k.id == id);
    let Some(info) = known else {
        return Err(warp::reject::custom(ApiError::NotFound));
    };
    if !shared
        .directory
        .revoke_api_key(&claims.tenant, &id)
        .await
        .map_err(reject)?
    {
        return Err(warp::reject::custom(ApiError::NotFound));
    }
    tracing::info!(tenant = %info.tenant, key_id = %info.id, prefix = %info.prefix, by = %claims.sub, "api key revoked");
    alert_admins(
        &shared,
        &info.tenant,
        format!(
            "API key \"{}\" ({}…) was revoked by {}",
            info.name,
            info.prefix,
            who(&claims)
        ),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

fn reject(error: DirectoryError) -> Rejection {
    warp::reject::custom(ApiError::from(error))
}

/// A key as listed: never the key, never its hash.
fn public_view(info: &ApiKeyInfo) -> serde_json::Value {
    json!({
        "id": info.id,
        "name": info.name,
        "prefix": info.prefix,
        "created_at": rfc3339(info.created_at_ms),
        "last_used_at": info.last_used_at_ms.map(rfc3339),
    })
}

/// The acting admin, for the alert: the display name, else the user id.
fn who(claims: &Claims) -> &str {
    claims.name.as_deref().unwrap_or(&claims.sub)
}

/// A `system` warning to every admin connection of `tenant`. Kept to this one
/// call so the hub's publish API can change (e.g. become async) in one place.
async fn alert_admins(shared: &Shared, tenant: &str, message: String) {
    // `category` lets a page tell these security alerts from other warnings.
    let data = json!({ "message": message, "level": "warning", "category": "security" });
    // The key change itself is committed; an alert the log cannot take now
    // is logged instead of failing the request.
    if let Err(error) = shared
        .hub
        .publish(tenant, "system", &data, Target::Admins)
        .await
    {
        tracing::warn!(tenant, %error, "api key alert not published");
    }
}
