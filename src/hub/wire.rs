//! What travels on the socket besides published messages (whose
//! [`Envelope`](crate::log::Envelope) the log owns): the server's own frames and the client frames
//! it understands.

use serde::Deserialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::log::timestamp_with_ms;

/// A frame the server itself sends: `{"type": .., "data": ..}`.
pub fn control(kind: &str, data: Value) -> Utf8Bytes {
    Utf8Bytes::from(serde_json::json!({"type": kind, "data": data}).to_string())
}

pub fn error_frame(code: &str, message: &str) -> Utf8Bytes {
    control(
        "error",
        serde_json::json!({"code": code, "message": message}),
    )
}

/// An error about one channel's subscribe or unsubscribe: it names the channel.
pub fn channel_error(code: &str, message: &str, channel: &str) -> Utf8Bytes {
    control(
        "error",
        serde_json::json!({"code": code, "message": message, "channel": channel}),
    )
}

/// Types the server sends on its own; nobody may publish them.
pub const RESERVED_TYPES: [&str; 7] = [
    "connected",
    "pong",
    "replay",
    "refreshed",
    "error",
    "subscribed",
    "unsubscribed",
];

/// A frame from the client, parsed just enough to dispatch on `type`.
#[derive(Debug, Deserialize)]
pub struct ClientFrame {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub data: Value,
}

/// Now as RFC 3339 UTC with milliseconds, e.g. `2026-11-22T10:00:00.123Z`.
pub fn timestamp() -> String {
    timestamp_with_ms().0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_is_rfc3339_millis_utc() {
        let ts = timestamp();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z'));
        assert!(
            time::OffsetDateTime::parse(&ts, &time::format_description::well_known::Rfc3339)
                .is_ok()
        );
    }
}
