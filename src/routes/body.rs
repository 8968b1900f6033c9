//! JSON request bodies: content type, a streaming size limit, and the 400/413/
//! 415/422 split of SPEC §3, for every endpoint that takes a body.

use serde::de::DeserializeOwned;
use warp::{Filter, Rejection};

use crate::error::ApiError;

/// Bytes past the limit read and thrown away before the 413 goes out. A
/// server that answers without reading the body closes a socket with unread
/// data, which resets the connection: the client, still writing, sees a
/// broken pipe instead of the 413. Bodies larger still are refused unread.
const DRAIN_BEYOND_LIMIT: usize = 1 << 20;

/// A JSON object body of at most `limit` bytes: 415 for another content type, 413 when
/// larger, 400 when empty or not JSON, 422 when JSON of the wrong shape.
pub fn json_body<T>(limit: usize) -> impl Filter<Extract = (T,), Error = Rejection> + Clone
where
    T: DeserializeOwned + Send + 'static,
{
    warp::header::optional::<String>("content-type")
        .and(warp::header::optional::<String>("content-length"))
        .and_then(
            move |content_type: Option<String>, length: Option<String>| async move {
                let is_json = content_type.as_deref().is_some_and(|ct| {
                    ct.split(';')
                        .next()
                        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
                });
                if !is_json {
                    return Err(warp::reject::custom(ApiError::UnsupportedMediaType));
                }
                if let Some(length) = length {
                    match length.trim().parse::<u64>() {
                        Ok(n) if n > limit.saturating_add(DRAIN_BEYOND_LIMIT) as u64 => {
                            return Err(warp::reject::custom(ApiError::PayloadTooLarge { limit }))
                        }
                        Ok(_) => {}
                        Err(_) => {
                            return Err(warp::reject::custom(ApiError::BadRequest(
                                "invalid Content-Length".into(),
                            )))
                        }
                    }
                }
                Ok(())
            },
        )
        .untuple_one()
        .and(warp::body::stream())
        .and_then(move |body| async move {
            let bytes = read_limited(body, limit)
                .await
                .map_err(warp::reject::custom)?;
            parse_body(&bytes).map_err(warp::reject::custom)
        })
}

/// Reads a body (sized or chunked), keeping at most `limit` bytes; a larger
/// one is drained (up to [`DRAIN_BEYOND_LIMIT`] more) and refused with 413.
async fn read_limited<S, B>(body: S, limit: usize) -> Result<Vec<u8>, ApiError>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    use futures_util::StreamExt;
    let mut body = std::pin::pin!(body);
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        let mut chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("cannot read body: {e}")))?;
        if bytes.len() + chunk.remaining() > limit {
            let mut drained = bytes.len() + chunk.remaining();
            drop(bytes);
            while drained <= limit.saturating_add(DRAIN_BEYOND_LIMIT) {
                match body.next().await {
                    Some(Ok(chunk)) => drained += chunk.remaining(),
                    _ => break,
                }
            }
            return Err(ApiError::PayloadTooLarge { limit });
        }
        // A Buf may hold its bytes in several slices.
        while chunk.has_remaining() {
            let slice = chunk.chunk();
            let n = slice.len();
            bytes.extend_from_slice(slice);
            chunk.advance(n);
        }
    }
    Ok(bytes)
}

/// 400 for a body that is not one JSON value (empty, malformed, or followed by
/// anything but whitespace), 422 for JSON of the wrong shape.
pub(crate) fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest("body is empty".into()));
    }
    // Syntax first, without building anything: deserializing `T` stops at the
    // first value of the wrong shape (`""` then a NUL byte is a string, not an
    // object) and would answer 422 for a body that is not JSON at all.
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map_err(|e| ApiError::BadRequest(format!("body is not valid JSON: {e}")))?;
    // serde also fills a struct from an array of its fields; a body is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::Unprocessable("body must be a JSON object".into()));
    }
    // The syntax is sound, so whatever fails now is the shape, even where
    // serde_json files it under syntax (an array longer than a struct's fields
    // is "trailing characters"): 422.
    serde_json::from_slice(bytes).map_err(|e| ApiError::Unprocessable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::Value;

    use super::*;

    /// The shape of a publish body.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Probe {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        data: Value,
    }

    fn parse(bytes: &[u8]) -> Result<Probe, ApiError> {
        parse_body(bytes)
    }

    #[test]
    fn bodies_map_to_400_or_422() {
        assert!(matches!(parse(b""), Err(ApiError::BadRequest(_))));
        assert!(matches!(parse(b"{nope"), Err(ApiError::BadRequest(_))));
        assert!(matches!(
            parse(br#"{"type": 5}"#),
            Err(ApiError::Unprocessable(_))
        ));
        assert!(matches!(
            parse(br#"{"type": "a", "extra": 1}"#),
            Err(ApiError::Unprocessable(_))
        ));
        assert!(matches!(
            parse(br#"["a", null]"#),
            Err(ApiError::Unprocessable(_))
        ));
        assert!(parse(b" \n{\"type\": \"a\"}\n").is_ok());
        // A value followed by anything but whitespace is not JSON (issue 8, finding 12).
        for garbage in [
            &b"\"\"\0"[..],
            b"{\"type\":\"a\"} x",
            b"{\"type\":\"a\"}{}",
            b"5 5",
        ] {
            assert!(
                matches!(parse(garbage), Err(ApiError::BadRequest(_))),
                "{:?}",
                String::from_utf8_lossy(garbage)
            );
        }
        // Valid JSON of the wrong shape is 422 whatever serde_json calls it.
        assert!(matches!(
            parse(br#"["", null, null]"#),
            Err(ApiError::Unprocessable(_))
        ));
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(parse(format!(r#"{{"type":"a","data":{deep}}}"#).as_bytes()).is_err());
    }
}
