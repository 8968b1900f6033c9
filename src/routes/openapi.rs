//! GET /api/v1/openapi.json: the OpenAPI 3.1 document of every HTTP endpoint.
//!
//! The document is a file beside this one, compiled into the binary, so the
//! running server always describes itself as it was built. It is written by
//! hand and kept honest by `tests/api/openapi.rs` (every route in it, nothing
//! else) and by the schemathesis run of `scripts/test.sh`.

use warp::http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use warp::http::HeaderValue;
use warp::{Filter, Rejection, Reply};

use crate::error::ApiError;

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// GET /api/v1/openapi.json
pub fn openapi_document() -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "openapi.json")
        .and(warp::get())
        .map(|| {
            let reply = warp::reply::with_header(DOCUMENT, CONTENT_TYPE, "application/json");
            // Revalidated on each use: it changes with every release.
            warp::reply::with_header(reply, CACHE_CONTROL, "no-cache")
        })
}

/// 405 with `Allow` for a method the document does not list on one of its
/// paths (RFC 9110 asks a 405 to say what is allowed). Last in the route
/// chain, so it is reached only when no route took the request; every other
/// request is rejected as not found, which loses to any other rejection.
/// The table comes from the document, which `tests/api/openapi.rs` keeps
/// equal to the routes.
pub fn method_not_allowed(
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    let table = std::sync::Arc::new(AllowTable::from_document(DOCUMENT));
    warp::path::full().and(warp::method()).and_then(
        move |path: warp::path::FullPath, method: warp::http::Method| {
            let table = table.clone();
            async move {
                let allowed = table
                    .allowed(path.as_str())
                    .ok_or_else(warp::reject::not_found)?;
                if allowed.split(", ").any(|m| m == method.as_str()) {
                    // Listed: the route itself answered (and was rejected for another reason).
                    return Err(warp::reject::not_found());
                }
                let mut response = ApiError::MethodNotAllowed.into_response();
                if let Ok(value) = HeaderValue::from_str(allowed) {
                    response.headers_mut().insert(ALLOW, value);
                }
                Ok(response)
            }
        },
    )
}

/// The documented paths (`{param}` matching one non-empty segment) and the
/// methods of each, as an `Allow` value.
#[derive(Debug, Default)]
struct AllowTable {
    paths: Vec<(Vec<String>, String)>,
}

impl AllowTable {
    fn from_document(document: &str) -> AllowTable {
        let parsed: serde_json::Value = match serde_json::from_str(document) {
            Ok(parsed) => parsed,
            Err(error) => {
                tracing::error!(%error, "the embedded OpenAPI document is not JSON");
                return AllowTable::default();
            }
        };
        let paths = parsed["paths"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(path, item)| {
                let segments = path.split('/').map(str::to_owned).collect();
                let methods: Vec<String> = item
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(method, _)| method.to_ascii_uppercase())
                    .filter(|method| method != "PARAMETERS")
                    .collect();
                (segments, methods.join(", "))
            })
            .collect();
        AllowTable { paths }
    }

    /// The `Allow` value of the documented path `path` matches, if any.
    fn allowed(&self, path: &str) -> Option<&str> {
        let segments: Vec<&str> = path.split('/').collect();
        self.paths
            .iter()
            .find(|(template, _)| {
                template.len() == segments.len()
                    && template.iter().zip(&segments).all(|(t, s)| {
                        if t.starts_with('{') && t.ends_with('}') {
                            !s.is_empty()
                        } else {
                            t == s
                        }
                    })
            })
            .map(|(_, allowed)| allowed.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_paths_match_with_their_parameters() {
        let table = AllowTable::from_document(DOCUMENT);
        assert_eq!(table.allowed("/api/v1/ws/user/alice"), Some("GET, POST"));
        assert_eq!(table.allowed("/api/v1/api-keys"), Some("GET, POST"));
        assert_eq!(table.allowed("/api/v1/api-keys/abc"), Some("DELETE"));
        assert_eq!(table.allowed("/health"), Some("GET"));
        for unknown in [
            "/",
            "/api/v1/ws/user/",
            "/api/v1/ws/user/a/b",
            "/nope",
            "/tasks.html",
        ] {
            assert_eq!(table.allowed(unknown), None, "{unknown}");
        }
    }
}
