//! The message types the log owns: who a message is for ([`Target`]) and the
//! serialized-once [`Envelope`] every engine, cache and connection shares.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::Role;

/// Who a published message is for, inside its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Broadcast,
    User(Box<str>),
    /// Every admin connection of the tenant (the security alerts of API keys).
    Admins,
}

impl Target {
    pub fn addresses(&self, user: &str, role: Role) -> bool {
        match self {
            Target::Broadcast => true,
            Target::User(id) => &**id == user,
            Target::Admins => role == Role::Admin,
        }
    }
}

/// A committed message, serialized once (after its engine chose the `seq`):
/// every connection it reaches gets a clone of the same bytes (a reference
/// count, not a copy).
#[derive(Debug)]
pub struct Envelope {
    pub seq: u64,
    pub target: Target,
    /// The message `type`, for the per-minute analytics.
    pub kind: Box<str>,
    pub text: Utf8Bytes,
    /// When the publish was accepted, for the delivery-latency histogram.
    pub published_at: Instant,
    /// The channel of a channel's message (SPEC §4.4); `None` in a tenant log.
    pub channel: Option<Arc<str>>,
}

/// The JSON shape of a delivered message (SPEC §4.2).
#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    data: &'a Value,
    id: &'a str,
    seq: u64,
    ts: &'a str,
    /// Last, after `ts`: [`Envelope::frame_around_seq`] finds the seq before it.
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
}

impl Envelope {
    pub fn encode(kind: &str, data: &Value, id: &str, seq: u64, ts: &str, target: Target) -> Self {
        Envelope::encode_in(None, kind, data, id, seq, ts, target)
    }

    /// [`Envelope::encode`] for a message of `channel` (its frame names it).
    pub fn encode_in(
        channel: Option<&Arc<str>>,
        kind: &str,
        data: &Value,
        id: &str,
        seq: u64,
        ts: &str,
        target: Target,
    ) -> Self {
        let wire = Wire {
            kind,
            data,
            id,
            seq,
            ts,
            channel: channel.map(|c| &**c),
        };
        let text =
            serde_json::to_string(&wire).expect("JSON values and plain strings always serialize");
        Envelope {
            seq,
            target,
            kind: kind.into(),
            text: Utf8Bytes::from(text),
            published_at: Instant::now(),
            channel: channel.cloned(),
        }
    }

    /// The frame of a message whose `seq` an engine chooses later (the Redis
    /// script): the text before the seq and the text after it.
    pub fn frame_around_seq(
        channel: Option<&str>,
        kind: &str,
        data: &Value,
        id: &str,
        ts: &str,
    ) -> (String, String) {
        let wire = Wire {
            kind,
            data,
            id,
            seq: 0,
            ts,
            channel,
        };
        let mut text =
            serde_json::to_string(&wire).expect("JSON values and plain strings always serialize");
        // `seq` follows `data` and `id` and precedes `ts`, a plain timestamp,
        // and the channel, whose name holds no `"`: the last match is the field.
        const MARK: &str = ",\"seq\":0,";
        let at = text.rfind(MARK).expect("the seq field is always written");
        let tail = text.split_off(at + MARK.len() - 1);
        text.truncate(at + MARK.len() - 2);
        (text, tail)
    }

    /// A broadcast with empty data, for unit tests of the queues and logs.
    #[cfg(test)]
    pub fn for_test(seq: u64) -> Arc<Self> {
        Envelope::for_test_with(seq, &serde_json::json!({}))
    }

    /// A broadcast of `data`, for unit tests of the queues and logs.
    #[cfg(test)]
    pub fn for_test_with(seq: u64, data: &Value) -> Arc<Self> {
        Arc::new(Envelope::encode(
            "t",
            data,
            "id",
            seq,
            "ts",
            Target::Broadcast,
        ))
    }
}

/// Now as RFC 3339 UTC with milliseconds (e.g. `2026-11-22T10:00:00.123Z`)
/// and as Unix milliseconds (what the store keeps).
pub fn timestamp_with_ms() -> (String, i64) {
    const FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let now = time::OffsetDateTime::now_utc();
    let ms = i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    let text = now
        .format(FORMAT)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_owned());
    (text, ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_the_fixed_fields() {
        let data = serde_json::json!({"task_id": "t1"});
        let env = Envelope::encode(
            "task_update",
            &data,
            "id-1",
            7,
            "2026-01-01T00:00:00.000Z",
            Target::Broadcast,
        );
        let parsed: Value = serde_json::from_str(env.text.as_str()).unwrap();
        assert_eq!(parsed["type"], "task_update");
        assert_eq!(parsed["data"]["task_id"], "t1");
        assert_eq!(parsed["id"], "id-1");
        assert_eq!(parsed["seq"], 7);
        assert_eq!(parsed["ts"], "2026-01-01T00:00:00.000Z");
    }

    #[test]
    fn a_frame_split_around_its_seq_is_the_frame_with_that_seq() {
        let data = serde_json::json!({"text": "a \"seq\":0, b", "seq": 0});
        let (head, tail) = Envelope::frame_around_seq(None, "x", &data, "id-1", "ts");
        let whole = Envelope::encode("x", &data, "id-1", 42, "ts", Target::Broadcast);
        assert_eq!(format!("{head}42{tail}"), whole.text.as_str());
        let channel: Arc<str> = Arc::from("task:7");
        let (head, tail) = Envelope::frame_around_seq(Some(&channel), "x", &data, "id-1", "ts");
        let whole = Envelope::encode_in(
            Some(&channel),
            "x",
            &data,
            "id-1",
            42,
            "ts",
            Target::Broadcast,
        );
        assert_eq!(format!("{head}42{tail}"), whole.text.as_str());
        let parsed: Value = serde_json::from_str(whole.text.as_str()).unwrap();
        assert_eq!(
            (parsed["channel"].as_str(), parsed["seq"].as_u64()),
            (Some("task:7"), Some(42))
        );
    }
}
