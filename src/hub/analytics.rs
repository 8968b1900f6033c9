//! Per-minute counters of one tenant over the last hour, for
//! `GET /api/v1/analytics`: messages by type, deliveries, connections.
//!
//! Kept in memory, under the tenant lock the hub already holds when it
//! counts (commit and registration), so counting costs no extra lock. It is
//! bounded twice: [`MINUTES`] buckets per tenant, [`MAX_TYPES`] message types
//! per bucket (the rest count as `other`). A restart starts the counters over;
//! the durable state of a tenant is its log and its views.

use std::collections::{HashMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Minutes kept and reported.
pub const MINUTES: usize = 60;
/// Distinct message types counted per minute; more are summed as `other`.
pub const MAX_TYPES: usize = 32;
const OTHER: &str = "other";

/// The counters of one tenant.
#[derive(Debug, Default)]
pub struct Analytics {
    /// Oldest first; only minutes in which something happened.
    buckets: VecDeque<Bucket>,
}

#[derive(Debug, Clone, Default)]
struct Bucket {
    /// Minutes since the Unix epoch.
    minute: i64,
    messages: HashMap<Box<str>, u64>,
    deliveries: u64,
    connections: u64,
    peak_connections: u64,
}

/// One minute as the endpoint reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Minute {
    /// Start of the minute, RFC 3339 UTC.
    pub minute: String,
    /// Messages committed, by `type`.
    pub messages: HashMap<String, u64>,
    pub messages_total: u64,
    /// Frames queued for connections: live deliveries and replayed ones.
    pub deliveries: u64,
    /// Connections opened.
    pub connections: u64,
    /// Most connections open at once (as seen at each open).
    pub peak_connections: u64,
}

impl Analytics {
    /// A committed message of `kind` that addressed `recipients` connections.
    pub fn message(&mut self, kind: &str, recipients: usize) {
        let bucket = self.current();
        bucket.deliveries += recipients as u64;
        if let Some(n) = bucket.messages.get_mut(kind) {
            *n += 1;
        } else if bucket.messages.len() < MAX_TYPES {
            bucket.messages.insert(kind.into(), 1);
        } else {
            *bucket.messages.entry(OTHER.into()).or_default() += 1;
        }
    }

    /// A connection opened with `replayed` frames of history; `open` are
    /// the tenant's connections now, this one included.
    pub fn connection(&mut self, open: usize, replayed: usize) {
        let bucket = self.current();
        bucket.connections += 1;
        bucket.deliveries += replayed as u64;
        bucket.peak_connections = bucket.peak_connections.max(open as u64);
    }

    /// The last [`MINUTES`] minutes, oldest first, the current one last;
    /// minutes without activity are zeros.
    pub fn report(&self) -> Vec<Minute> {
        let now = current_minute();
        let first = now - MINUTES as i64 + 1;
        (first..=now)
            .map(|minute| {
                let bucket = self.buckets.iter().find(|b| b.minute == minute);
                let messages: HashMap<String, u64> = bucket
                    .map(|b| {
                        b.messages
                            .iter()
                            .map(|(k, v)| (k.to_string(), *v))
                            .collect()
                    })
                    .unwrap_or_default();
                Minute {
                    minute: rfc3339(minute),
                    messages_total: messages.values().sum(),
                    messages,
                    deliveries: bucket.map_or(0, |b| b.deliveries),
                    connections: bucket.map_or(0, |b| b.connections),
                    peak_connections: bucket.map_or(0, |b| b.peak_connections),
                }
            })
            .collect()
    }

    fn current(&mut self) -> &mut Bucket {
        let now = current_minute();
        if self.buckets.back().is_none_or(|b| b.minute < now) {
            while self
                .buckets
                .front()
                .is_some_and(|b| b.minute <= now - MINUTES as i64)
            {
                self.buckets.pop_front();
            }
            if self.buckets.len() == MINUTES {
                self.buckets.pop_front();
            }
            self.buckets.push_back(Bucket {
                minute: now,
                ..Bucket::default()
            });
        }
        // Just ensured: the newest bucket is this minute's (or a later one
        // if the clock stepped back; counting there is good enough).
        self.buckets
            .back_mut()
            .expect("a bucket was just pushed or already there")
    }
}

fn current_minute() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs() / 60).unwrap_or(0))
}

fn rfc3339(minute: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(minute * 60)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_the_current_minute_and_types_are_bounded() {
        let mut analytics = Analytics::default();
        analytics.message("task_update", 3);
        analytics.message("task_update", 0);
        analytics.connection(2, 5);
        for i in 0..MAX_TYPES + 10 {
            analytics.message(&format!("t{i}"), 0);
        }
        let report = analytics.report();
        assert_eq!(report.len(), MINUTES);
        let now = report.last().unwrap();
        assert_eq!(now.messages["task_update"], 2);
        assert_eq!(now.messages.len(), MAX_TYPES + 1, "capped, plus other");
        assert_eq!(now.messages["other"], 11);
        assert_eq!(now.messages_total, 2 + MAX_TYPES as u64 + 10);
        assert_eq!(
            (now.deliveries, now.connections, now.peak_connections),
            (8, 1, 2)
        );
        assert!(report[..MINUTES - 1].iter().all(|m| m.messages_total == 0));
        assert!(now.minute.ends_with(":00Z"), "{}", now.minute);
    }
}
