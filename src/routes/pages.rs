//! The embedded pages and assets of SPEC §7: `/` and `/<page>.html` from the top
//! of `static/`, everything else under `/static/<path>`.
//!
//! Files are compiled into the binary by rust-embed (in debug builds they are read
//! from disk, so editing a page needs no rebuild). Each file is prepared once —
//! content type, an `ETag` from rust-embed's SHA-256, and a gzip copy for text —
//! and kept in a cache owned by the filter; the cache is bounded because the file
//! set is fixed at compile time. Every response carries the strict CSP and the
//! usual security headers, so a page can never run inline script or load from
//! another origin. A path that names no file is rejected as not found and gets
//! the JSON 404 of SPEC §3 from the one `recover`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;
use rust_embed::RustEmbed;
use warp::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use warp::path::FullPath;
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::error::ApiError;

#[derive(RustEmbed)]
#[folder = "static/"]
struct StaticFiles;

/// Only what the pages themselves serve: no inline script or style, no other
/// origin, no plugins, no framing, forms post to us only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

/// Longest relative path we look up; every real file name is far shorter.
const MAX_PATH: usize = 200;
/// Text smaller than this is sent as is: gzip's header would eat the gain.
const MIN_GZIP_BYTES: usize = 256;

/// GET|HEAD `/`, `/<page>.html`, `/static/<path>`
pub fn pages() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let assets = Arc::new(Assets::default());
    warp::path::full()
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and_then(move |path: FullPath, method: Method, headers: HeaderMap| {
            let assets = assets.clone();
            async move {
                // The path decides first, so an unknown path is a 404 whatever the method.
                let name = asset_name(path.as_str()).ok_or_else(warp::reject::not_found)?;
                let file = assets.get(&name).ok_or_else(warp::reject::not_found)?;
                if method != Method::GET && method != Method::HEAD {
                    return Err(warp::reject::custom(ApiError::MethodNotAllowed));
                }
                Ok::<_, Rejection>(respond(&file, &headers, method == Method::HEAD))
            }
        })
}

/// The file a request path names, relative to `static/`; `None` for anything
/// that is not a plain file path (`..`, hidden files, percent-escapes, backslashes).
fn asset_name(path: &str) -> Option<String> {
    if path == "/" {
        return Some("index.html".to_owned());
    }
    let name = match path.strip_prefix("/static/") {
        Some(rest) => rest,
        // Pages live at the root: one segment ending in `.html`.
        None => path
            .strip_prefix('/')
            .filter(|p| !p.contains('/') && p.ends_with(".html"))?,
    };
    let plain = |segment: &str| {
        !segment.is_empty()
            && !segment.starts_with('.')
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    (name.len() <= MAX_PATH && name.split('/').all(plain)).then(|| name.to_owned())
}

/// One file, ready to send.
#[derive(Debug)]
struct Prepared {
    /// rust-embed's SHA-256 of the content: decides whether a cached copy is stale
    /// (in debug builds the file on disk may change under a running server).
    hash: [u8; 32],
    content_type: HeaderValue,
    cache_control: HeaderValue,
    /// Quoted strong validators of the plain and the gzip representation.
    etag: HeaderValue,
    etag_gzip: HeaderValue,
    body: Bytes,
    gzip: Option<Bytes>,
}

/// The prepared files, filled on first request of each.
#[derive(Debug, Default)]
struct Assets {
    prepared: Mutex<HashMap<String, Arc<Prepared>>>,
}

impl Assets {
    fn get(&self, name: &str) -> Option<Arc<Prepared>> {
        let file = StaticFiles::get(name)?;
        let hash = file.metadata.sha256_hash();
        // A poisoned lock only means another request panicked mid-insert; the map is still valid.
        let mut prepared = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = prepared.get(name).filter(|p| p.hash == hash) {
            return Some(hit.clone());
        }
        let fresh = Arc::new(prepare(name, file));
        prepared.insert(name.to_owned(), fresh.clone());
        Some(fresh)
    }
}

fn prepare(name: &str, file: rust_embed::EmbeddedFile) -> Prepared {
    let hash = file.metadata.sha256_hash();
    let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
    let (content_type, compressible) = content_type(name, file.metadata.mimetype());
    let body = match file.data {
        std::borrow::Cow::Borrowed(bytes) => Bytes::from_static(bytes),
        std::borrow::Cow::Owned(bytes) => Bytes::from(bytes),
    };
    let gzip = (compressible && body.len() >= MIN_GZIP_BYTES)
        .then(|| gzip(&body))
        .flatten()
        .filter(|gz| gz.len() < body.len());
    Prepared {
        hash,
        content_type: HeaderValue::from_str(&content_type)
            .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream")),
        cache_control: HeaderValue::from_static(cache_control(name)),
        etag: quoted(&hex),
        etag_gzip: quoted(&format!("{hex}-gz")),
        body,
        gzip,
    }
}

fn quoted(tag: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{tag}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

/// Our own answer for the types the pages use (with a charset for text, which
/// mime-guess leaves out); anything else gets mime-guess's.
fn content_type(name: &str, guessed: &str) -> (String, bool) {
    let extension = name.rsplit_once('.').map_or("", |(_, ext)| ext);
    let known = match extension {
        "html" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "txt" | "md" => "text/plain; charset=utf-8",
        "ico" => "image/x-icon",
        "png" => "image/png",
        "woff2" => "font/woff2",
        _ => guessed,
    };
    let compressible = known.starts_with("text/")
        || known.starts_with("application/json")
        || known == "image/svg+xml";
    (known.to_owned(), compressible)
}

/// Pages and our own scripts keep their URLs across releases, so a browser
/// revalidates them each time (a cheap 304 thanks to the ETag). Vendored files
/// carry their version in the path and never change under it.
fn cache_control(name: &str) -> &'static str {
    if name.starts_with("vendor/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    }
}

fn gzip(body: &[u8]) -> Option<Bytes> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(body.len() / 3), Compression::best());
    encoder.write_all(body).ok()?;
    encoder.finish().ok().map(Bytes::from)
}

fn respond(file: &Prepared, request: &HeaderMap, head_only: bool) -> Response {
    let gzip = file.gzip.as_ref().filter(|_| accepts_gzip(request));
    let etag = if gzip.is_some() {
        &file.etag_gzip
    } else {
        &file.etag
    };
    let not_modified = if_none_match(request, &[&file.etag, &file.etag_gzip]);

    let mut response = Response::default();
    let h = response.headers_mut();
    h.insert(header::ETAG, etag.clone());
    h.insert(header::CACHE_CONTROL, file.cache_control.clone());
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    security_headers(h);
    if not_modified {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        return response;
    }
    h.insert(header::CONTENT_TYPE, file.content_type.clone());
    let body = match gzip {
        Some(gz) => {
            h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            gz.clone()
        }
        None => file.body.clone(),
    };
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    if !head_only {
        *response.body_mut() = body.into();
    }
    response
}

fn security_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// Whether `Accept-Encoding` lists gzip (or `*`) with a non-zero weight.
fn accepts_gzip(request: &HeaderMap) -> bool {
    request
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let weight = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .map_or(Some(1.0), |q| q.trim().parse::<f32>().ok());
            (name.eq_ignore_ascii_case("gzip") || name == "*") && weight.is_some_and(|q| q > 0.0)
        })
}

/// `If-None-Match` names one of our validators (weak comparison, as RFC 9110
/// asks for this header), or is `*`.
fn if_none_match(request: &HeaderMap, ours: &[&HeaderValue]) -> bool {
    request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim())
        .any(|tag| {
            let tag = tag.strip_prefix("W/").unwrap_or(tag);
            tag == "*" || ours.iter().any(|o| o.as_bytes() == tag.as_bytes())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_files_and_nothing_else() {
        assert_eq!(asset_name("/").as_deref(), Some("index.html"));
        assert_eq!(asset_name("/tasks.html").as_deref(), Some("tasks.html"));
        assert_eq!(
            asset_name("/static/js/websocket.js").as_deref(),
            Some("js/websocket.js")
        );
        for bad in [
            "/static/../Cargo.toml",
            "/static/js/../../Cargo.toml",
            "/static/%2e%2e/Cargo.toml",
            "/static/.hidden",
            "/static/",
            "/static//js/app.js",
            "/static/js\\app.js",
            "/js/websocket.js",
            "/tasks",
            "/api/v1/ws/stats",
        ] {
            assert_eq!(asset_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn gzip_is_taken_only_when_offered_with_weight() {
        let with = |value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(value));
            accepts_gzip(&h)
        };
        assert!(with("gzip, deflate, br"));
        assert!(with("br;q=1.0, gzip;q=0.5"));
        assert!(with("*"));
        assert!(!with("gzip;q=0"));
        assert!(!with("br, identity"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn every_page_of_the_spec_is_embedded() {
        for page in [
            "index.html",
            "login.html",
            "signup.html",
            "dashboard.html",
            "agents.html",
            "tasks.html",
            "task.html",
            "analytics.html",
            "settings.html",
            "api-keys.html",
            "ws-status.html",
            "js/websocket.js",
        ] {
            assert!(StaticFiles::get(page).is_some(), "{page} is missing");
        }
    }
}
