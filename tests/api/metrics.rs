//! The Prometheus metrics (issue 11): their names follow the conventions, the
//! labels a client chooses stay bounded, and every metric the Grafana
//! dashboard (`deploy/grafana/agentcast.json`) and the alert rules
//! (`deploy/prometheus/alerts.yml`) query is a series of a real server.

use std::collections::{BTreeMap, BTreeSet};

use agentcast::metrics::{CUSTOM_LABELS, KNOWN_TYPES};
use serde_json::{json, Value};

use crate::channels::{publish, subscribe};
use crate::helpers::{content_type, spawn_app, wait_until, TestApp, WAIT};
use crate::redis_server::{spawn_node, RedisServer};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/agentcast.json");
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");

/// The text of `/metrics`, in the classic text format (no `Accept`).
async fn scrape(app: &TestApp) -> String {
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200, "GET /metrics");
    response.text().await.expect("metrics body")
}

/// The text of `/metrics` in OpenMetrics, asked for as Prometheus does.
async fn scrape_openmetrics(app: &TestApp) -> String {
    let response = app
        .http
        .get(app.url("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200, "GET /metrics");
    let content_type = content_type(&response);
    assert!(
        content_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "{content_type}"
    );
    response.text().await.expect("metrics body")
}

/// A sample's labels, by name.
type Labels<'a> = BTreeMap<&'a str, &'a str>;

/// The sample lines of an exposition: `(name, labels, value)`.
fn samples(text: &str) -> Vec<(&str, Labels<'_>, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}').expect("labels end in }")),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').expect("label=value");
                    (key, value.trim_matches('"'))
                })
                .collect();
            (name, labels, value.parse().expect("a numeric value"))
        })
        .collect()
}

/// Families from the `# TYPE name type` lines.
fn families(text: &str) -> BTreeMap<&str, &str> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| rest.split_once(' ').expect("# TYPE name type"))
        .collect()
}

/// Every `agentcast_…` identifier in `text` (comment lines of YAML skipped).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(at) = rest.find("agentcast_") {
            let before = rest[..at].chars().next_back();
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                names.insert(tail[..end].to_owned());
            }
            rest = &tail[end..];
        }
    }
    names
}

/// Publishes, connects, subscribes and resumes, so every family has samples
/// that traffic creates (the channel namespaces, the histograms' counts).
async fn traffic(app: &TestApp) {
    let (mut client, connected) = app.connect_ready(&app.user_token("alice")).await;
    app.broadcast("task_update", json!({"task_id": "t1", "status": "running"}))
        .await;
    client.expect_type("task_update").await;
    publish(app, "task:t1", "notification", json!({"n": 1})).await;
    subscribe(&mut client, "task:t1", Some(0), None).await;
    let epoch = connected["epoch"].as_str().unwrap().to_owned();
    let mut resumed = app
        .connect_resume(&app.user_token("alice"), 0, &epoch)
        .await;
    resumed.expect_type("connected").await;
    // Delivery latency is recorded once the frame is flushed: wait for it.
    let mut last = String::new();
    let recorded = wait_until(WAIT, async || {
        last = scrape(app).await;
        samples(&last).iter().any(|(name, _, value)| {
            *name == "agentcast_delivery_latency_seconds_count" && *value >= 1.0
        })
    })
    .await;
    assert!(recorded, "no delivery recorded:\n{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_query_exists() {
    // Cluster mode: `agentcast_redis_up` exists only with a Redis.
    let redis = RedisServer::start().await;
    let app = spawn_node(&redis, "metrics", "node-1", |_| {}).await;
    traffic(&app).await;
    let text = scrape(&app).await;
    let series: BTreeSet<&str> = samples(&text).into_iter().map(|(name, ..)| name).collect();
    let histograms: BTreeSet<&str> = families(&text)
        .into_iter()
        .filter(|(_, kind)| *kind == "histogram")
        .map(|(name, _)| name)
        .collect();

    let dashboard = std::fs::read_to_string(DASHBOARD).expect("read the dashboard");
    let alerts = std::fs::read_to_string(ALERTS).expect("read the alert rules");
    for (file, text_of_file) in [(DASHBOARD, &dashboard), (ALERTS, &alerts)] {
        let queried = metric_names(text_of_file);
        // A parsing slip must not make this test pass on nothing.
        assert!(
            queried.len() >= 5,
            "{file} names only {queried:?}: the extraction is broken"
        );
        let missing: Vec<&String> = queried
            .iter()
            .filter(|name| !series.contains(name.as_str()) && !histograms.contains(name.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "{file} queries metrics /metrics does not have: {missing:?}\n{text}"
        );
    }
    // Every series carries the node's name.
    for (name, labels, _) in samples(&text) {
        assert_eq!(labels.get("node"), Some(&"node-1"), "{name} {labels:?}");
    }
    let redis_up = samples(&text)
        .into_iter()
        .find(|(name, ..)| *name == "agentcast_redis_up")
        .map(|(.., value)| value);
    assert_eq!(redis_up, Some(1.0), "Redis is up:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_grafana_json_with_node_and_datasource_variables() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("read the dashboard"))
            .expect("the dashboard is JSON");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(variable("datasource")["type"], "datasource");
    assert!(variable("node")["definition"]
        .as_str()
        .is_some_and(|d| d.starts_with("label_values(agentcast_") && d.ends_with(", node)")));
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate id: {panel}"
        );
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty(),
            "a panel without a query: {}",
            panel["title"]
        );
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            assert!(expr.contains("agentcast_"), "{expr}");
            assert!(
                expr.contains("node=~\"$node\""),
                "not filtered by $node: {expr}"
            );
        }
    }
    assert!(panels.len() >= 15, "{} panels", panels.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_names_follow_the_prometheus_conventions() {
    let app = spawn_app().await;
    traffic(&app).await;
    let text = scrape_openmetrics(&app).await;
    assert!(text.ends_with("# EOF\n"), "{text}");
    let families = families(&text);
    assert!(families.len() >= 20, "{families:?}");
    // Labels: the node, the bounded ones, the histogram buckets; never an id.
    let allowed_labels = [
        "node",
        "type",
        "namespace",
        "transport",
        "stream",
        "complete",
        "version",
        "le",
    ];
    // Each sample belongs to the family its name starts with, followed by
    // nothing or one of the suffixes the format defines.
    let mut own: BTreeMap<&str, Vec<(&str, Labels)>> = BTreeMap::new();
    for (name, labels, _) in samples(&text) {
        let family = families
            .keys()
            .filter(|family| {
                name.strip_prefix(**family)
                    .is_some_and(|rest| ["", "_total", "_bucket", "_sum", "_count"].contains(&rest))
            })
            .max_by_key(|family| family.len())
            .unwrap_or_else(|| panic!("sample {name} has no # TYPE"));
        own.entry(family)
            .or_default()
            .push((&name[family.len()..], labels));
    }
    for (family, kind) in &families {
        assert!(family.starts_with("agentcast_"), "{family}");
        assert!(
            family
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{family}"
        );
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} has no HELP"
        );
        for unit in [
            "_milliseconds",
            "_ms",
            "_microseconds",
            "_kilobytes",
            "_minutes",
        ] {
            assert!(!family.contains(unit), "{family}: base units only");
        }
        let samples = own
            .get(family)
            .unwrap_or_else(|| panic!("{family} has no sample"));
        let suffixes: BTreeSet<&str> = samples.iter().map(|(suffix, _)| *suffix).collect();
        match *kind {
            "counter" => {
                assert!(
                    !family.ends_with("_total"),
                    "{family}: the encoder adds _total"
                );
                assert_eq!(suffixes, BTreeSet::from(["_total"]), "{family}");
            }
            "gauge" => {
                for suffix in ["_total", "_count", "_sum", "_bucket"] {
                    assert!(!family.ends_with(suffix), "gauge {family} ends in {suffix}");
                }
                assert_eq!(suffixes, BTreeSet::from([""]), "{family}");
            }
            "histogram" => {
                assert!(
                    family.ends_with("_seconds") || family.ends_with("_bytes"),
                    "histogram {family} names its base unit"
                );
                assert_eq!(
                    suffixes,
                    BTreeSet::from(["_bucket", "_count", "_sum"]),
                    "{family}"
                );
            }
            other => panic!("{family} is a {other}: counters, gauges and histograms only"),
        }
        for (_, labels) in samples {
            for label in labels.keys() {
                assert!(
                    allowed_labels.contains(label),
                    "{family} has label {label}: labels are bounded"
                );
            }
        }
    }
    for renamed in [
        "agentcast_current_connections",
        "agentcast_connections_total",
    ] {
        assert!(!text.contains(renamed), "{renamed} was renamed:\n{text}");
    }
}

/// What `promtool check metrics` requires of the classic format: each
/// sample's family (a counter's or gauge's own name, a histogram's name
/// without `_bucket`, `_sum`, `_count`) has one HELP and one TYPE line, before
/// its samples. Before, the counters' were named as in OpenMetrics (without
/// `_total`), and promtool reported "no help text" for every counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_classic_text_format_gives_every_sample_its_help_and_type() {
    let app = spawn_app().await;
    traffic(&app).await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let content_type = content_type(&response);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let text = response.text().await.expect("metrics body");
    assert!(
        !text.contains("# EOF") && !text.contains("# UNIT "),
        "{text}"
    );

    let mut help: BTreeMap<&str, usize> = BTreeMap::new();
    let mut kinds: BTreeMap<&str, &str> = BTreeMap::new();
    let mut counters = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("# HELP name text");
            *help.entry(name).or_default() += 1;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            assert!(kinds.insert(name, kind).is_none(), "{name} typed twice");
        } else if !line.trim().is_empty() {
            let name = line.split(['{', ' ']).next().expect("a sample name");
            let family = match kinds.iter().find(|(family, kind)| {
                **kind == "histogram"
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| name.strip_suffix(suffix) == Some(**family))
            }) {
                Some((family, _)) => *family,
                None => name,
            };
            let kind = kinds
                .get(family)
                .unwrap_or_else(|| panic!("{name}: no # TYPE {family} before it\n{text}"));
            assert_eq!(help.get(family), Some(&1), "{name}: one # HELP {family}");
            if *kind == "counter" {
                assert!(family.ends_with("_total"), "{family}");
                counters += 1;
            }
        }
    }
    assert!(counters >= 10, "{counters} counter samples:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_custom_types_and_namespaces_keeps_the_label_sets_bounded() {
    let app = spawn_app().await;
    let flood = CUSTOM_LABELS + 8;
    for n in 0..flood {
        app.broadcast(&format!("custom_{n}"), json!({})).await;
        publish(&app, &format!("ns{n}:x"), "note", json!({})).await;
    }
    app.broadcast("system", json!({"message": "hi"})).await;
    let text = scrape(&app).await;
    let of = |family: &str| -> Vec<(String, f64)> {
        samples(&text)
            .into_iter()
            .filter(|(name, ..)| *name == family)
            .map(|(_, labels, value)| {
                let label = labels
                    .iter()
                    .find(|(k, _)| **k != "node")
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default();
                (label, value)
            })
            .collect()
    };
    let published = of("agentcast_messages_published_total");
    assert_eq!(
        published.len(),
        KNOWN_TYPES.len() + CUSTOM_LABELS + 1,
        "known types, {CUSTOM_LABELS} custom ones, other: {published:?}"
    );
    let value = |set: &[(String, f64)], label: &str| {
        set.iter()
            .find(|(l, _)| l == label)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {label} in {set:?}"))
    };
    assert_eq!(value(&published, "custom_0"), 1.0);
    assert_eq!(value(&published, "system"), 1.0);
    // Channel publishes count as published messages too (type "note").
    let total: f64 = published.iter().map(|(_, v)| v).sum();
    assert_eq!(total, (2 * flood + 1) as f64, "nothing lost: {published:?}");
    assert_eq!(
        value(&published, "other"),
        (flood - CUSTOM_LABELS + 1) as f64
    );

    let namespaces = of("agentcast_channel_messages_published_total");
    assert_eq!(namespaces.len(), CUSTOM_LABELS + 1, "{namespaces:?}");
    assert_eq!(value(&namespaces, "other"), (flood - CUSTOM_LABELS) as f64);
}

/// The value of the unlabelled-but-`node` series `name`.
fn value_of(text: &str, name: &str) -> Option<f64> {
    samples(text)
        .into_iter()
        .find(|(sample, ..)| *sample == name)
        .map(|(.., value)| value)
}

/// Another connection holds the SQLite write lock (as in `durability`): the
/// writer's transaction fails, the publish gets 503, and the metric the
/// `AgentcastStoreCommitFailures` alert watches counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_store_commit_is_counted() {
    let app = spawn_app().await;
    let name = "agentcast_store_commit_failures_total";
    assert_eq!(value_of(&scrape(&app).await, name), Some(0.0));

    let locker = rusqlite::Connection::open(app.settings.data_dir.join("agentcast.db"))
        .expect("open the store");
    locker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let response = app
        .post_broadcast(&app.admin_token(), &json!({"type": "note", "data": {}}))
        .await;
    assert_eq!(response.status(), 503);
    drop(locker);

    let failures = value_of(&scrape(&app).await, name);
    assert!(failures.is_some_and(|n| n >= 1.0), "{name}: {failures:?}");
}
