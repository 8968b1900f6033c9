//! The embedded pages of SPEC §7 over real HTTP: content types, ETag and 304,
//! gzip, the security headers, JSON 404s and no way out of `static/`.

use std::io::Read;

use serde_json::Value;

use crate::helpers::{assert_error, raw_http, spawn_app};

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
frame-ancestors 'none'; form-action 'self'";

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("{} has no {name} header", response.url()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_is_served_as_html_with_the_security_headers() {
    let app = spawn_app().await;
    for path in [
        "/",
        "/login.html",
        "/signup.html",
        "/dashboard.html",
        "/agents.html",
        "/tasks.html",
        "/task.html",
        "/analytics.html",
        "/settings.html",
        "/api-keys.html",
        "/static/ws-status.html",
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        assert_eq!(
            header(&response, "content-type"),
            "text/html; charset=utf-8",
            "{path}"
        );
        assert_eq!(header(&response, "content-security-policy"), CSP, "{path}");
        assert_eq!(header(&response, "x-frame-options"), "DENY", "{path}");
        assert_eq!(
            header(&response, "referrer-policy"),
            "no-referrer",
            "{path}"
        );
        assert_eq!(
            header(&response, "x-content-type-options"),
            "nosniff",
            "{path}"
        );
        assert_eq!(header(&response, "cache-control"), "no-cache", "{path}");
        let body = response.text().await.expect("page body");
        assert!(body.contains("<"), "{path}: {body}");
        assert!(!body.contains("<script>"), "{path} has an inline script");
        assert!(!body.contains(" style="), "{path} has an inline style");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assets_have_their_content_types() {
    let app = spawn_app().await;
    for (path, content_type) in [
        ("/static/js/websocket.js", "text/javascript; charset=utf-8"),
        ("/static/js/app.js", "text/javascript; charset=utf-8"),
        ("/static/css/app.css", "text/css; charset=utf-8"),
        ("/static/img/favicon.svg", "image/svg+xml"),
        (
            "/static/vendor/uplot-1.6.32/uPlot.iife.min.js",
            "text/javascript; charset=utf-8",
        ),
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        assert_eq!(header(&response, "content-type"), content_type, "{path}");
    }
    let vendored = app
        .get("/static/vendor/uplot-1.6.32/uPlot.iife.min.js")
        .await;
    assert!(
        header(&vendored, "cache-control").contains("immutable"),
        "versioned vendor files are cached for good"
    );
    let licence = app.get("/static/vendor/uplot-1.6.32/LICENSE").await;
    assert_eq!(licence.status(), 200, "the vendored licence ships too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_matching_if_none_match_gets_304_without_a_body() {
    let app = spawn_app().await;
    let first = app.get("/static/js/websocket.js").await;
    let etag = header(&first, "etag").to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");

    for tag in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"other\", {etag}"),
    ] {
        let again = app
            .http
            .get(app.url("/static/js/websocket.js"))
            .header("If-None-Match", &tag)
            .send()
            .await
            .expect("GET");
        assert_eq!(again.status(), 304, "If-None-Match: {tag}");
        assert_eq!(header(&again, "etag"), etag);
        assert!(again.bytes().await.expect("body").is_empty());
    }

    let stale = app
        .http
        .get(app.url("/static/js/websocket.js"))
        .header("If-None-Match", "\"stale\"")
        .send()
        .await
        .expect("GET");
    assert_eq!(stale.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_is_gzipped_when_the_client_accepts_it() {
    let app = spawn_app().await;
    let plain = app
        .get("/static/js/websocket.js")
        .await
        .bytes()
        .await
        .expect("plain body");

    let zipped = app
        .http
        .get(app.url("/static/js/websocket.js"))
        .header("Accept-Encoding", "br, gzip;q=0.8")
        .send()
        .await
        .expect("GET");
    assert_eq!(zipped.status(), 200);
    assert_eq!(header(&zipped, "content-encoding"), "gzip");
    assert!(header(&zipped, "vary").contains("accept-encoding"));
    let gz_etag = header(&zipped, "etag").to_owned();
    let bytes = zipped.bytes().await.expect("gzip body");
    assert!(bytes.len() < plain.len(), "gzip is smaller");
    let mut unzipped = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_end(&mut unzipped)
        .expect("valid gzip");
    assert_eq!(unzipped, plain.to_vec(), "gzip decodes to the file");

    // The gzip representation has its own validator, and it revalidates too.
    let again = app
        .http
        .get(app.url("/static/js/websocket.js"))
        .header("Accept-Encoding", "gzip")
        .header("If-None-Match", &gz_etag)
        .send()
        .await
        .expect("GET");
    assert_eq!(again.status(), 304);

    let refused = app
        .http
        .get(app.url("/static/js/websocket.js"))
        .header("Accept-Encoding", "gzip;q=0")
        .send()
        .await
        .expect("GET");
    assert!(refused.headers().get("content-encoding").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_gets_the_headers_only() {
    let app = spawn_app().await;
    let response = app
        .http
        .head(app.url("/dashboard.html"))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "content-type"),
        "text/html; charset=utf-8"
    );
    assert!(response.headers().get("etag").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_files_get_the_json_404() {
    let app = spawn_app().await;
    for path in [
        "/nope.html",
        "/static/js/nope.js",
        "/static/",
        "/favicon.ico",
        "/dashboard",
    ] {
        assert_error(app.get(path).await, 404, &format!("GET {path}")).await;
    }
    // A page's path with another method is 405, an unknown path stays 404.
    let post = app
        .http
        .post(app.url("/dashboard.html"))
        .send()
        .await
        .expect("POST");
    assert_error(post, 405, "POST /dashboard.html").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_path_leaves_the_static_folder() {
    let app = spawn_app().await;
    // Raw requests: reqwest would normalise the dot segments away.
    for path in [
        "/static/../Cargo.toml",
        "/static/js/../../Cargo.toml",
        "/static/%2e%2e/Cargo.toml",
        "/static/..%2fCargo.toml",
        "/static/.%2e/src/main.rs",
        "/..%2fCargo.toml",
        "/static//etc/passwd",
    ] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            app.addr
        );
        let (status, body) = raw_http(app.addr, request.as_bytes()).await;
        assert!(
            status == 404 || status == 400,
            "GET {path}: status {status}, body {body}"
        );
        assert!(!body.contains("[package]"), "GET {path} leaked Cargo.toml");
        let parsed: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: body is not JSON ({e}): {body}"));
        assert!(parsed["error"]["code"].is_string(), "GET {path}: {parsed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_reference_only_files_the_server_has() {
    let app = spawn_app().await;
    for page in [
        "/",
        "/login.html",
        "/signup.html",
        "/dashboard.html",
        "/agents.html",
        "/tasks.html",
        "/task.html",
        "/analytics.html",
        "/settings.html",
        "/api-keys.html",
    ] {
        let body = app.get(page).await.text().await.expect("page body");
        for attribute in ["src=\"", "href=\""] {
            for piece in body.split(attribute).skip(1) {
                let target = piece.split('"').next().unwrap_or("");
                if !target.starts_with('/') || target.starts_with("//") {
                    assert!(
                        !target.starts_with("http") && !target.starts_with("//"),
                        "{page} loads {target} from elsewhere"
                    );
                    continue;
                }
                let response = app.get(target).await;
                assert_eq!(response.status(), 200, "{page} links to {target}");
            }
        }
    }
}
