//! The publish endpoints and presence (SPEC §3): validation, then the hub.

use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{json, Value};
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use super::body::json_body;
use super::{with_shared, Shared};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::hub::wire::RESERVED_TYPES;
use crate::log::Target;

/// POST /api/v1/ws/broadcast
pub fn broadcast_publish(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "ws" / "broadcast")
        .and(warp::post())
        .and(publisher(shared.clone()))
        .and(json_body(shared.max_message_bytes))
        .and(with_shared(shared))
        .then(
            |principal: Principal, body: PublishBody, shared: Arc<Shared>| async move {
                publish(
                    &shared,
                    &principal,
                    body,
                    Destination::Tenant(Target::Broadcast),
                )
                .await
            },
        )
}

/// POST /api/v1/ws/user/:userID
pub fn user_publish(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "ws" / "user" / String)
        .and(warp::post())
        .and(publisher(shared.clone()))
        .and(json_body(shared.max_message_bytes))
        .and(with_shared(shared))
        .and_then(|user: String, principal: Principal, body: PublishBody, shared: Arc<Shared>| async move {
            let user = user_id(&user)?;
            let to = Destination::Tenant(Target::User(user.into()));
            Ok::<_, Rejection>(publish(&shared, &principal, body, to).await)
        })
}

/// GET /api/v1/ws/user/:userID
pub fn user_presence(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "ws" / "user" / String)
        .and(warp::get())
        .and(publisher(shared.clone()))
        .and(with_shared(shared))
        .and_then(
            |user: String, principal: Principal, shared: Arc<Shared>| async move {
                let user = user_id(&user)?;
                let here = shared.hub.presence(principal.tenant(), &user);
                let elsewhere = match &shared.redis {
                    // Every node's connections (SPEC §6).
                    Some(redis) => crate::redis::presence::user_connections_elsewhere(
                        redis,
                        principal.tenant(),
                        &user,
                    )
                    .await
                    .map_err(|e| ApiError::from(crate::log::LogError::from(e)))?
                        as usize,
                    None => 0,
                };
                let connections = here.saturating_add(elsewhere);
                Ok::<_, Rejection>(warp::reply::json(&json!({
                    "user_id": user,
                    "online": connections > 0,
                    "connections": connections,
                })))
            },
        )
}

/// The caller, who must be allowed to publish (admin JWT or API key).
pub(super) fn publisher(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (Principal,), Error = Rejection> + Clone {
    caller(shared, true)
}

/// The caller of a read that users and keys may both make: any valid JWT,
/// or an API key.
pub(super) fn reader(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (Principal,), Error = Rejection> + Clone {
    caller(shared, false)
}

fn caller(
    shared: Arc<Shared>,
    publishing: bool,
) -> impl Filter<Extract = (Principal,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(warp::header::optional::<String>("x-api-key"))
        .and(with_shared(shared))
        .and_then(
            move |authorization: Option<String>, api_key: Option<String>, shared: Arc<Shared>| async move {
                let (authorization, api_key) = (authorization.as_deref(), api_key.as_deref());
                let auth = &shared.auth;
                let principal = if publishing {
                    auth.publisher(&shared.directory, authorization, api_key).await
                } else {
                    auth.principal(&shared.directory, authorization, api_key).await
                };
                principal.map_err(|e| {
                        if matches!(e, ApiError::Unauthorized(_)) {
                            shared.hub.metrics().auth_failures.inc();
                        }
                        warp::reject::custom(e)
                    })
            },
        )
}

/// The publish body *(fixed)*: `{"type": "...", "data": <JSON value>}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

/// Where a publish goes: the tenant's log (to whom in it), or one channel.
pub(super) enum Destination {
    Tenant(Target),
    Channel(String),
}

/// Validates, publishes, and answers 202 once the message is committed —
/// or 503 when the log could not take it (nothing of it was delivered).
pub(super) async fn publish(
    shared: &Shared,
    principal: &Principal,
    body: PublishBody,
    to: Destination,
) -> warp::reply::Response {
    let started = Instant::now();
    if let Err(e) = validate(&body.kind, &body.data) {
        return e.into_response();
    }
    let tenant = principal.tenant();
    let published = match &to {
        Destination::Tenant(target) => {
            let target = target.clone();
            shared
                .hub
                .publish(tenant, &body.kind, &body.data, target)
                .await
        }
        Destination::Channel(channel) => {
            shared
                .hub
                .publish_to_channel(tenant, channel, &body.kind, &body.data)
                .await
        }
    };
    let receipt = match published {
        Ok(receipt) => receipt,
        Err(error) => {
            tracing::warn!(tenant = principal.tenant(), %error, "publish refused");
            return ApiError::from(error).into_response();
        }
    };
    tracing::debug!(tenant = principal.tenant(), kind = %body.kind, seq = receipt.seq, recipients = receipt.recipients, "published");
    shared
        .hub
        .metrics()
        .publish_duration
        .observe(started.elapsed().as_secs_f64());
    let body = match &to {
        Destination::Tenant(_) => json!(receipt),
        Destination::Channel(channel) => json!({
            "id": receipt.id,
            "channel": channel,
            "seq": receipt.seq,
            "recipients": receipt.recipients,
        }),
    };
    warp::reply::with_status(warp::reply::json(&body), StatusCode::ACCEPTED).into_response()
}

/// A `userID` path segment: percent-decoded, 1-128 printable characters.
fn user_id(segment: &str) -> Result<String, Rejection> {
    let invalid = || {
        warp::reject::custom(ApiError::Unprocessable(
            "userID must be 1-128 printable characters".into(),
        ))
    };
    let decoded = percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| invalid())?;
    if decoded.is_empty() || decoded.len() > 128 || decoded.chars().any(char::is_control) {
        return Err(invalid());
    }
    Ok(decoded.into_owned())
}

/// The category of the server's own alerts (API key created or revoked): a
/// publish may not set it, or anyone could forge an alert on the api-keys page.
const SECURITY_CATEGORY: &str = "security";

/// The rules of SPEC §3 for `type` and the known types' `data`. An optional
/// field is absent or of its type: `null` is not a string, nor a number.
pub fn validate(kind: &str, data: &Value) -> Result<(), ApiError> {
    let fail = |message: &str| Err(ApiError::Unprocessable(message.to_owned()));
    let valid_type = kind.len() <= 64
        && kind.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.:-".contains(&b));
    if !valid_type {
        return fail("type must match ^[a-z][a-z0-9_.:-]{0,63}$");
    }
    if RESERVED_TYPES.contains(&kind) {
        return Err(ApiError::Unprocessable(format!(
            "type '{kind}' is reserved for the server"
        )));
    }
    let field = |name: &str| data.get(name);
    let non_empty_str = |name: &str| {
        field(name)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    let one_of = |name: &str, allowed: &[&str]| {
        field(name)
            .and_then(Value::as_str)
            .is_some_and(|s| allowed.contains(&s))
    };
    let optional_str = |name: &str| field(name).is_none_or(Value::is_string);
    match kind {
        "task_update" => {
            if !data.is_object() {
                return fail("data must be an object");
            }
            if !non_empty_str("task_id") {
                return fail("data.task_id must be a non-empty string");
            }
            // Every task of the view can be read back by its id.
            if !field("task_id")
                .and_then(Value::as_str)
                .is_some_and(super::views::valid_task_id)
            {
                return fail("data.task_id must be at most 256 bytes without control characters");
            }
            if !one_of("status", &["queued", "running", "completed", "failed"]) {
                return fail("data.status must be one of queued, running, completed, failed");
            }
            if !optional_str("query") {
                return fail("data.query must be a string");
            }
            let progress_ok = field("progress")
                .is_none_or(|v| v.as_f64().is_some_and(|p| (0.0..=100.0).contains(&p)));
            if !progress_ok {
                return fail("data.progress must be a number from 0 to 100");
            }
        }
        "agent_update" => {
            if !data.is_object() {
                return fail("data must be an object");
            }
            if !non_empty_str("agent_id") {
                return fail("data.agent_id must be a non-empty string");
            }
            if !one_of("action", &["registered", "updated", "deleted"]) {
                return fail("data.action must be one of registered, updated, deleted");
            }
            if !optional_str("name") {
                return fail("data.name must be a string");
            }
        }
        "system" => {
            if !data.is_object() {
                return fail("data must be an object");
            }
            if !non_empty_str("message") {
                return fail("data.message must be a non-empty string");
            }
            let level_ok = field("level").is_none_or(|v| {
                v.as_str()
                    .is_some_and(|l| ["info", "success", "warning", "error"].contains(&l))
            });
            if !level_ok {
                return fail("data.level must be one of info, success, warning, error");
            }
            let forged_alert = field("category")
                .and_then(Value::as_str)
                .is_some_and(|c| c.trim().eq_ignore_ascii_case(SECURITY_CATEGORY));
            if forged_alert {
                return fail("data.category 'security' is reserved for the server's own alerts");
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_types_name_the_bad_field() {
        let err = |kind: &str, data: Value| validate(kind, &data).unwrap_err().to_string();
        assert!(err("task_update", json!({"status": "running"})).contains("data.task_id"));
        assert!(
            err("task_update", json!({"task_id": "t", "status": "paused"})).contains("data.status")
        );
        assert!(err(
            "task_update",
            json!({"task_id": "t", "status": "running", "progress": 101})
        )
        .contains("data.progress"));
        assert!(
            err("agent_update", json!({"agent_id": "a", "action": "born"})).contains("data.action")
        );
        assert!(err("system", json!({"message": ""})).contains("data.message"));
        assert!(err("system", json!({"message": "m", "level": "loud"})).contains("data.level"));
        assert!(validate(
            "task_update",
            &json!({"task_id": "t", "status": "completed", "progress": 100})
        )
        .is_ok());
        assert!(validate("custom_event", &json!([1, 2])).is_ok());
    }

    #[test]
    fn null_is_not_a_value_of_an_optional_typed_field() {
        let task = |field: &str| {
            let mut data = json!({"task_id": "t", "status": "running"});
            data[field] = Value::Null;
            validate("task_update", &data)
        };
        for field in ["progress", "query"] {
            let error = task(field).unwrap_err();
            assert!(matches!(error, ApiError::Unprocessable(_)), "{field}");
            assert!(
                error.to_string().contains(&format!("data.{field}")),
                "{error}"
            );
        }
        let agent = json!({"agent_id": "a", "action": "updated", "name": null});
        assert!(validate("agent_update", &agent)
            .unwrap_err()
            .to_string()
            .contains("data.name"));
        let system = json!({"message": "m", "level": null});
        assert!(validate("system", &system)
            .unwrap_err()
            .to_string()
            .contains("data.level"));
    }

    #[test]
    fn the_security_category_is_the_servers_own() {
        for category in ["security", "Security", " SECURITY "] {
            let data = json!({"message": "key created", "level": "warning", "category": category});
            let error = validate("system", &data).unwrap_err();
            assert!(error.to_string().contains("data.category"), "{error}");
        }
        let other = json!({"message": "deploy", "level": "warning", "category": "deploys"});
        assert!(validate("system", &other).is_ok());
        // Other types pass their data through, as SPEC §3 says.
        assert!(validate("custom_event", &json!({"category": "security"})).is_ok());
    }

    /// Property tests of the publish body as clients control it: parsing then
    /// validation never panics, and every refusal is 400 (not JSON) or 422
    /// (JSON that breaks a rule) with the JSON error shape of SPEC §3. 413 and
    /// 415 come from the body filter before this point (`routes::body`).
    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::routes::body::parse_body;

        /// What the endpoint answers for `bytes`, short of the hub.
        fn check(bytes: &[u8]) -> Result<(), ApiError> {
            let body: PublishBody = parse_body(bytes)?;
            validate(&body.kind, &body.data)
        }

        /// The refusal as a client gets it: status and `{"error":{code,message}}`.
        fn assert_documented(error: ApiError, runtime: &tokio::runtime::Runtime) -> u16 {
            use http_body_util::BodyExt;
            let status = error.status().as_u16();
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status);
            let content_type = response.headers()[warp::http::header::CONTENT_TYPE].clone();
            assert_eq!(content_type, "application/json");
            let bytes = runtime
                .block_on(response.into_body().collect())
                .unwrap()
                .to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            let code = body["error"]["code"].as_str().unwrap();
            assert!(
                code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{code}"
            );
            assert!(!body["error"]["message"].as_str().unwrap().is_empty());
            status
        }

        /// Any JSON value, nested a few levels, with keys the validators look at.
        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                (-10.0..110.0f64).prop_map(Value::from),
                "[a-z_]{0,8}".prop_map(Value::from),
                any::<String>().prop_map(Value::from),
                prop::sample::select(
                    &[
                        "queued",
                        "running",
                        "completed",
                        "failed",
                        "registered",
                        "updated",
                        "deleted",
                        "info",
                        "warning",
                        "error",
                        "security",
                    ][..]
                )
                .prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                let key = prop_oneof![
                    prop::sample::select(
                        &[
                            "task_id", "status", "query", "progress", "agent_id", "action", "name",
                            "message", "level", "category",
                        ][..]
                    )
                    .prop_map(str::to_owned),
                    any::<String>(),
                ];
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                    prop::collection::btree_map(key, inner, 0..8)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn kind() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(
                    &[
                        "task_update",
                        "agent_update",
                        "system",
                        "notification",
                        "connected",
                        "error",
                    ][..]
                )
                .prop_map(str::to_owned),
                "[a-z][a-z0-9_.:-]{0,70}",
                any::<String>(),
            ]
        }

        fn runtime() -> tokio::runtime::Runtime {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn arbitrary_bytes_are_refused_as_documented(
                bytes in prop::collection::vec(any::<u8>(), 0..256)
            ) {
                let runtime = runtime();
                if let Err(error) = check(&bytes) {
                    let status = assert_documented(error, &runtime);
                    // 400 exactly when the body is not one JSON value.
                    // JSON by syntax: a digit after a number makes a longer
                    // number, maybe beyond f64 (`3.2e+2750`), which `Value`
                    // refuses but the grammar (and so the 400 rule) allows.
                    let is_json = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok();
                    prop_assert_eq!(status == 400, !is_json, "status {}", status);
                    prop_assert!(status == 400 || status == 422);
                }
            }

            #[test]
            fn arbitrary_json_bodies_are_accepted_or_refused_as_documented(
                kind in kind(),
                data in json_value(),
                with_data in any::<bool>(),
            ) {
                let runtime = runtime();
                let body = if with_data {
                    json!({"type": kind, "data": data})
                } else {
                    json!({"type": kind})
                };
                let bytes = serde_json::to_vec(&body).unwrap();
                match check(&bytes) {
                    Ok(()) => {
                        // Whatever the data, never a forged alert.
                        prop_assert!(!(kind == "system"
                            && body["data"]["category"].as_str().is_some_and(|c| c.trim().eq_ignore_ascii_case("security"))));
                    }
                    Err(error) => {
                        prop_assert_eq!(assert_documented(error, &runtime), 422);
                    }
                }
            }

            #[test]
            fn any_json_value_as_the_body_is_refused_as_documented(
                value in json_value(),
                garbage in prop::collection::vec(any::<u8>(), 0..4),
            ) {
                let runtime = runtime();
                let mut bytes = serde_json::to_vec(&value).unwrap();
                bytes.extend_from_slice(&garbage);
                if let Err(error) = check(&bytes) {
                    let status = assert_documented(error, &runtime);
                    // JSON by syntax: a digit after a number makes a longer
                    // number, maybe beyond f64 (`3.2e+2750`), which `Value`
                    // refuses but the grammar (and so the 400 rule) allows.
                    let is_json = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok();
                    prop_assert_eq!(status == 400, !is_json, "status {}", status);
                }
            }
        }
    }

    #[test]
    fn type_names_follow_the_pattern_and_reserved_ones_are_refused() {
        assert!(validate("a", &Value::Null).is_ok());
        assert!(validate("a.b:c-d_9", &Value::Null).is_ok());
        for bad in [
            "",
            "A",
            "9a",
            "a b",
            &"a".repeat(65),
            "connected",
            "pong",
            "error",
        ] {
            assert!(validate(bad, &Value::Null).is_err(), "{bad}");
        }
    }
}
