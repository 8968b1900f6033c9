//! The OpenAPI document (issue 11, `GET /api/v1/openapi.json`) kept honest
//! against the server, both ways:
//!
//! - the routes the server has are the `/// METHOD /path` doc lines of the
//!   filter functions in `src/routes/*.rs` (STYLE.md); every one of them is a
//!   filter composed in `routes::all`, and every filter composed there has
//!   one. That set must be the document's set of operations;
//! - every documented operation, requested with the document's own examples
//!   against a real server, gets a success status the document lists (so it
//!   exists and is not the router's 404/405), with the documented content type
//!   and a body of the documented schema;
//! - on a documented path, every method the document does not list gets 405
//!   with an `Allow` header listing the ones it does.
//!
//! The rule for the pages (not API, not in the document, as its description
//! says): `src/routes/pages.rs` serves `GET|HEAD` of `/`, `/<page>.html` and
//! `/static/<path>`, and no path of the document has one of those forms.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use reqwest::Method;
use serde_json::{json, Value};

use crate::accounts::{login_ok, spawn_with_admin, ADMIN_PASSWORD};
use crate::helpers::{assert_error, content_type, spawn_app, TestApp};

/// The methods an operation of the document may have.
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn document_text() -> String {
    let path = manifest_dir().join("src/routes/openapi.json");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn document() -> Value {
    serde_json::from_str(&document_text()).expect("src/routes/openapi.json is JSON")
}

/// `(METHOD, /path/{param})` of every operation of the document.
fn documented_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if method != "parameters" {
                operations.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    operations
}

/// What `#/components/...` points at (panics for a dangling pointer).
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(pointer) => {
            let target = doc
                .pointer(pointer.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("dangling $ref {pointer}"));
            resolve(doc, target)
        }
        None => value,
    }
}

// ---- the routes of the source ----------------------------------------------------

/// One `/// METHOD /path` doc line of a filter function.
#[derive(Debug)]
struct RouteLine {
    file: String,
    methods: Vec<String>,
    /// As written (`:param`, query string dropped), or the whole rest of the
    /// line for the pages.
    path: String,
    function: String,
}

/// The `/// METHOD /path` doc lines of `src/routes/*.rs`, each with the
/// `pub fn` it documents.
fn route_lines() -> Vec<RouteLine> {
    let dir = manifest_dir().join("src/routes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read src/routes")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    let mut routes = Vec::new();
    for file in files {
        let name = file.file_stem().unwrap().to_string_lossy().into_owned();
        let source = std::fs::read_to_string(&file).expect("read a route file");
        let lines: Vec<&str> = source.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(rest) = line.trim_start().strip_prefix("/// ") else {
                continue;
            };
            let Some((verbs, path)) = rest.split_once(' ') else {
                continue;
            };
            let methods: Vec<String> = verbs.split('|').map(str::to_owned).collect();
            if !methods.iter().all(|m| METHODS.contains(&m.as_str())) {
                continue;
            }
            assert!(
                path.starts_with('/') || path.starts_with('`'),
                "{name}.rs:{}: a route doc line names a path: {line}",
                i + 1
            );
            // The function this line documents: the next `pub fn`, before any
            // other item.
            let function = lines[i + 1..]
                .iter()
                .map(|l| l.trim_start())
                .find(|l| !l.starts_with("///") && !l.starts_with("#["))
                .and_then(|l| l.strip_prefix("pub fn "))
                .and_then(|l| l.split('(').next())
                .unwrap_or_else(|| {
                    panic!("{name}.rs:{}: `{line}` is not on a `pub fn` filter", i + 1)
                });
            routes.push(RouteLine {
                file: name.clone(),
                methods,
                path: path.split('?').next().unwrap_or(path).to_owned(),
                function: function.to_owned(),
            });
        }
    }
    routes
}

/// `module::function` of every filter `routes::all` composes.
fn composed_filters() -> BTreeSet<String> {
    let source = std::fs::read_to_string(manifest_dir().join("src/routes/mod.rs"))
        .expect("read src/routes/mod.rs");
    let start = source.find("pub fn all(").expect("routes::all");
    let end = start + source[start..].find(".recover(").expect("all() recovers");
    let body = &source[start..end];
    let mut filters = BTreeSet::new();
    for (i, _) in body.match_indices("::") {
        let before = body[..i]
            .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or("");
        let after: String = body[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let called = body[i + 2 + after.len()..].starts_with('(');
        // `Arc<Shared>` and the like are types, not filters.
        if called
            && !before.is_empty()
            && before.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            filters.insert(format!("{before}::{after}"));
        }
    }
    filters
}

/// `/api/v1/ws/user/:userID` as the document writes it: `/api/v1/ws/user/{userID}`.
fn openapi_path(path: &str) -> String {
    path.split('/')
        .map(|segment| match segment.strip_prefix(':') {
            Some(name) => format!("{{{name}}}"),
            None => segment.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Whether a path is one the pages serve: `/`, `/<page>.html`, `/static/...`.
fn is_page_path(path: &str) -> bool {
    path == "/" || path.ends_with(".html") || path.starts_with("/static/")
}

#[test]
fn every_route_in_the_source_is_documented_and_nothing_else() {
    let doc = document();
    let routes = route_lines();

    // Every doc line is on a filter that `all` composes, and the other way round;
    // the one exception is no route: the 405 (with `Allow`) of a method a
    // documented path does not list.
    let mut composed = composed_filters();
    assert!(
        composed.remove("openapi::method_not_allowed"),
        "{composed:?}"
    );
    let documented_filters: BTreeSet<String> = routes
        .iter()
        .map(|r| format!("{}::{}", r.file, r.function))
        .collect();
    assert_eq!(
        documented_filters, composed,
        "the filters with a `/// METHOD /path` doc line (left) are not the ones routes::all composes (right)"
    );

    // The pages: one filter, the three forms the document's rule names.
    let (pages, api): (Vec<&RouteLine>, Vec<&RouteLine>) =
        routes.iter().partition(|r| r.file == "pages");
    assert_eq!(pages.len(), 1, "{pages:?}");
    assert_eq!(pages[0].methods, ["GET", "HEAD"], "{pages:?}");
    assert_eq!(
        pages[0].path, "`/`, `/<page>.html`, `/static/<path>`",
        "the pages serve other paths than the rule of the document names: update both"
    );
    let description = doc["info"]["description"].as_str().unwrap_or("");
    for form in ["`/`", "`/<page>.html`", "`/static/<path>`"] {
        assert!(
            description.contains(form),
            "info.description states the pages rule ({form}): {description}"
        );
    }

    let in_source: BTreeSet<(String, String)> = api
        .iter()
        .flat_map(|r| {
            assert!(
                !is_page_path(&r.path),
                "{}::{} serves a page-like path outside pages.rs: {}",
                r.file,
                r.function,
                r.path
            );
            r.methods.iter().map(|m| (m.clone(), openapi_path(&r.path)))
        })
        .collect();
    let in_document = documented_operations(&doc);
    let undocumented: Vec<_> = in_source.difference(&in_document).collect();
    let unserved: Vec<_> = in_document.difference(&in_source).collect();
    assert!(
        undocumented.is_empty(),
        "routes of src/routes/*.rs missing from src/routes/openapi.json: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "operations of src/routes/openapi.json that no filter of src/routes/*.rs serves: {unserved:?}"
    );
    for (_, path) in &in_document {
        assert!(!is_page_path(path), "a page path in the document: {path}");
    }
}

// ---- the document itself -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_served_as_the_file_and_is_openapi_3_1() {
    let app = spawn_app().await;
    let response = app.get("/api/v1/openapi.json").await;
    assert_eq!(response.status(), 200);
    let content_type = content_type(&response);
    assert_eq!(content_type, "application/json");
    let served = response.bytes().await.unwrap();
    assert!(
        served == document_text().as_bytes(),
        "the served document is not src/routes/openapi.json"
    );

    let doc: Value = serde_json::from_slice(&served).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(doc["info"]["title"].is_string());
    assert!(!documented_operations(&doc).is_empty());
}

/// Every `$ref` resolves, operation ids are unique, each operation says who
/// may call it and lists the statuses its kind of endpoint can return; every
/// error is the one `Error` schema; every example fits its schema.
#[test]
fn the_document_is_consistent() {
    let doc = document();
    check_refs(&doc, &doc);
    let error_schema = json!({"$ref": "#/components/schemas/Error"});
    let mut ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let what = format!("{} {path}", method.to_ascii_uppercase());
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: operationId"));
            assert!(ids.insert(id.to_owned()), "{what}: operationId {id} twice");
            assert!(op["security"].is_array(), "{what}: says who may call it");
            let responses = op["responses"].as_object().unwrap();
            let statuses: BTreeSet<&str> = responses.keys().map(String::as_str).collect();
            assert!(
                statuses.iter().any(|s| s.starts_with('2') || *s == "101"),
                "{what}: a success status"
            );
            let secured = op["security"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s.as_object().is_some_and(|s| !s.is_empty()));
            if secured {
                assert!(statuses.contains("401"), "{what}: 401 for no credentials");
            }
            if op.get("requestBody").is_some() {
                for status in ["400", "413", "415", "422"] {
                    assert!(statuses.contains(status), "{what}: {status} for a bad body");
                }
            }
            for (status, response) in responses {
                let response = resolve(&doc, response);
                // The one error status with another body: /health's 503 is the
                // health report saying `degraded` (SPEC §3).
                let health_report = path == "/health" && status == "503";
                if (status.starts_with('4') || status.starts_with('5')) && !health_report {
                    let schema = &response["content"]["application/json"]["schema"];
                    assert_eq!(schema, &error_schema, "{what} {status}: the Error body");
                }
                if status == "429" {
                    assert!(
                        response["headers"]["Retry-After"].is_object(),
                        "{what}: 429 has Retry-After"
                    );
                }
                for (media, content) in response["content"].as_object().into_iter().flatten() {
                    if let Some(example) = content.get("example") {
                        if media == "application/json" {
                            let problems = validate(&doc, &content["schema"], example);
                            assert!(problems.is_empty(), "{what} {status} example: {problems:?}");
                        }
                    }
                }
            }
            if let Some(body) = op.get("requestBody") {
                let content = &body["content"]["application/json"];
                let problems = validate(&doc, &content["schema"], &content["example"]);
                assert!(problems.is_empty(), "{what} request example: {problems:?}");
            }
        }
    }
}

fn check_refs(doc: &Value, value: &Value) {
    match value {
        Value::Object(map) => {
            if map.contains_key("$ref") {
                resolve(doc, value);
            }
            map.values().for_each(|v| check_refs(doc, v));
        }
        Value::Array(items) => items.iter().for_each(|v| check_refs(doc, v)),
        _ => {}
    }
}

/// What of `value` breaks `schema`: the subset of JSON Schema the document
/// uses (`$ref`, `type`, `required`, `properties`, `additionalProperties`,
/// `items`, `enum`, `const`, `not`, `oneOf`, numeric bounds, `minLength`; not
/// `pattern`: no regex engine here, schemathesis checks those).
fn validate(doc: &Value, schema: &Value, value: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    check(doc, schema, value, "$", &mut problems);
    problems
}

fn check(doc: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    let mut fail = |what: String| problems.push(format!("{at}: {what}"));
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let fits = types.iter().any(|t| match *t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_u64() || value.is_i64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            _ => false,
        });
        if !fits {
            fail(format!("{value} is not of type {types:?}"));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            fail(format!("{value} is not one of {allowed:?}"));
        }
    }
    if let Some(constant) = schema.get("const") {
        if constant != value {
            fail(format!("{value} is not {constant}"));
        }
    }
    if let (Some(min), Some(n)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if n < min {
            fail(format!("{n} < {min}"));
        }
    }
    if let (Some(max), Some(n)) = (
        schema.get("maximum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if n > max {
            fail(format!("{n} > {max}"));
        }
    }
    if let (Some(min), Some(s)) = (
        schema.get("minLength").and_then(Value::as_u64),
        value.as_str(),
    ) {
        if (s.chars().count() as u64) < min {
            fail(format!("{s:?} is shorter than {min}"));
        }
    }
    if let Some(barred) = schema.get("not") {
        if validate(doc, barred, value).is_empty() {
            fail(format!("{value} is what `not` bars"));
        }
    }
    if let Some(branches) = schema.get("oneOf").and_then(Value::as_array) {
        let fitting = branches
            .iter()
            .filter(|b| validate(doc, b, value).is_empty())
            .count();
        if fitting != 1 {
            fail(format!("{value} fits {fitting} branches of oneOf, not one"));
        }
    }
    if let Some(object) = value.as_object() {
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = name.as_str().unwrap_or_default();
            if !object.contains_key(name) {
                fail(format!("no `{name}`"));
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (name, field) in object {
            match properties.and_then(|p| p.get(name)) {
                Some(property) => check(doc, property, field, &format!("{at}.{name}"), problems),
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        problems.push(format!("{at}: `{name}` is not a property"))
                    }
                    Some(extra @ Value::Object(_)) => {
                        check(doc, extra, field, &format!("{at}.{name}"), problems)
                    }
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            check(doc, items, item, &format!("{at}[{i}]"), problems);
        }
    }
}

// ---- every operation against a real server -------------------------------------------

/// One operation of the document, ready to be sent.
struct Operation {
    method: Method,
    path: String,
    op: Value,
    /// Path-level and operation-level parameters, resolved.
    parameters: Vec<Value>,
}

fn operations(doc: &Value) -> Vec<Operation> {
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let shared: Vec<Value> = item["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| resolve(doc, p).clone())
            .collect();
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let mut parameters = shared.clone();
            parameters.extend(
                op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| resolve(doc, p).clone()),
            );
            operations.push(Operation {
                method: Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap(),
                path: path.clone(),
                op: op.clone(),
                parameters,
            });
        }
    }
    operations
}

impl Operation {
    fn id(&self) -> &str {
        self.op["operationId"].as_str().unwrap_or("?")
    }

    /// The path with each `{param}` replaced by `values[param]`, else its example.
    fn url_path(&self, values: &BTreeMap<&str, String>) -> String {
        let mut path = self.path.clone();
        for parameter in self.parameters.iter().filter(|p| p["in"] == "path") {
            let name = parameter["name"].as_str().unwrap();
            let value = values.get(name).cloned().unwrap_or_else(|| {
                parameter["example"]
                    .as_str()
                    .unwrap_or_else(|| {
                        panic!("{}: path parameter {name} has an example", self.id())
                    })
                    .to_owned()
            });
            let encoded: String = percent_encode(&value);
            path = path.replace(&format!("{{{name}}}"), &encoded);
        }
        let query: Vec<String> = self
            .parameters
            .iter()
            .filter(|p| p["in"] == "query")
            .filter_map(|p| {
                let example = p.get("example")?;
                let text = example
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| example.to_string());
                Some(format!("{}={}", p["name"].as_str()?, percent_encode(&text)))
            })
            .collect();
        if query.is_empty() {
            path
        } else {
            format!("{path}?{}", query.join("&"))
        }
    }

    /// The statuses the document lists for this operation.
    fn statuses(&self) -> BTreeSet<u16> {
        self.op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .map(|s| s.parse().unwrap())
            .collect()
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What every operation is sent with: an admin's account token (so `me` and
/// `refresh` find the account), a task for `getTask`, a key for `revokeApiKey`.
struct Context {
    token: String,
    path_values: BTreeMap<&'static str, String>,
}

async fn context(app: &TestApp) -> Context {
    let token = login_ok(app, "admin", ADMIN_PASSWORD).await["token"]
        .as_str()
        .expect("a token")
        .to_owned();
    // getTask's example task exists.
    app.broadcast(
        "task_update",
        json!({"task_id": "7f3a", "status": "running"}),
    )
    .await;
    // revokeApiKey revokes a real key.
    let created = app
        .post_json(
            "/api/v1/api-keys",
            Some(&token),
            &json!({"name": "to revoke"}),
        )
        .await;
    assert_eq!(created.status(), 201);
    let key: Value = created.json().await.unwrap();
    let mut path_values = BTreeMap::new();
    path_values.insert("id", key["id"].as_str().unwrap().to_owned());
    Context { token, path_values }
}

/// The success an operation must answer when called with the document's
/// examples: the lowest 2xx it lists, or, for the WebSocket without an
/// upgrade, its documented 426.
fn expected_status(operation: &Operation) -> u16 {
    let statuses = operation.statuses();
    statuses
        .iter()
        .copied()
        .find(|s| (200..300).contains(s))
        .unwrap_or_else(|| {
            assert!(
                statuses.contains(&426),
                "{}: no 2xx; only the WebSocket may do without one",
                operation.id()
            );
            426
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_answers_as_documented() {
    let doc = document();
    let app = spawn_with_admin().await;
    let context = context(&app).await;
    let mut operations = operations(&doc);
    // The login example logs in the account the signup example creates.
    operations.sort_by_key(|o| o.id() != "signup");

    for operation in &operations {
        let what = format!(
            "{} {} ({})",
            operation.method,
            operation.path,
            operation.id()
        );
        let url = app.url(&operation.url_path(&context.path_values));
        let mut request = app.http.request(operation.method.clone(), &url);
        if operation.op["security"].as_array().is_some_and(|s| {
            s.iter()
                .all(|r| r.as_object().is_some_and(|r| !r.is_empty()))
        }) {
            request = request.bearer_auth(&context.token);
        }
        if let Some(body) = operation.op.get("requestBody") {
            let example = &body["content"]["application/json"]["example"];
            assert!(
                !example.is_null(),
                "{what}: the request body has an example"
            );
            request = request.json(example);
        }
        let response = request.send().await.expect("request failed");
        let status = response.status().as_u16();
        let content_type = content_type(&response);
        let text = response.text().await.unwrap_or_default();
        assert_eq!(
            status,
            expected_status(operation),
            "{what}: the document's example request got {status}: {text}"
        );

        let documented = resolve(&doc, &operation.op["responses"][status.to_string()]);
        match documented["content"].as_object() {
            None => assert!(text.is_empty(), "{what}: {status} has no body: {text:?}"),
            Some(content) => {
                let media = content_type.split(';').next().unwrap_or("").trim();
                let described = content.get(media).unwrap_or_else(|| {
                    panic!("{what}: {status} as {content_type:?} is not documented")
                });
                if media == "application/json" {
                    let body: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
                    let problems = validate(&doc, &described["schema"], &body);
                    assert!(problems.is_empty(), "{what}: {problems:?} in {body}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_a_documented_path_does_not_list_get_405() {
    let doc = document();
    let app = spawn_app().await;
    let admin = app.admin_token();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let listed: BTreeSet<String> = item
            .as_object()
            .unwrap()
            .keys()
            .filter(|m| *m != "parameters")
            .map(|m| m.to_ascii_uppercase())
            .collect();
        // Any operation of the path gives the path parameters' examples.
        let operation = operations(&doc)
            .into_iter()
            .find(|o| &o.path == path)
            .unwrap();
        let url = app.url(&operation.url_path(&BTreeMap::new()));
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
            if listed.contains(method) {
                continue;
            }
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let response = app
                .http
                .request(method.clone(), &url)
                .bearer_auth(&admin)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body("{}")
                .send()
                .await
                .expect("request failed");
            let allow = response
                .headers()
                .get(reqwest::header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(", ").map(str::to_owned).collect::<BTreeSet<_>>());
            assert_eq!(allow.as_ref(), Some(&listed), "{method} {path}: Allow");
            assert_error(response, 405, &format!("{method} {path}")).await;
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} method/path pairs checked");
}

/// The rule's other half: the pages answer on their paths (they exist, and
/// are not JSON API), so leaving them out of the document is the rule, not a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_the_document_leaves_out_are_pages() {
    let app = spawn_app().await;
    for (path, media) in [
        ("/", "text/html"),
        ("/tasks.html", "text/html"),
        ("/static/js/websocket.js", "text/javascript"),
    ] {
        assert!(is_page_path(path));
        let response = app.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        let content_type = content_type(&response);
        assert!(
            content_type.starts_with(media),
            "GET {path}: {content_type}"
        );
    }
}
