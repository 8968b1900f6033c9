//! GET /api/v1/ws/connect: the WebSocket handshake, finished by hand.
//!
//! warp's `Ws` gives every socket tungstenite's default 128 KiB read buffer,
//! zero-filled before each read; that alone is ~130 KiB per idle connection. So
//! we answer the handshake ourselves, take the raw `TcpStream` back from hyper
//! after the 101, and build the WebSocket with our own small buffers.
//!
//! A bad token still completes the upgrade (answering the `token` subprotocol, or
//! a browser would fail the handshake) and is then closed with 4401, so a page
//! can tell "log in again" from "server down".
//!
//! The query string is parsed here, not by warp's `query` filter: that filter
//! logs the whole query at debug when it fails to parse, token included.

use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use warp::http::{header, HeaderMap, HeaderValue, StatusCode};
use warp::{Filter, Rejection, Reply};

use super::{with_shared, Shared};
use crate::auth::{AuthError, Claims, Credential};
use crate::error::ApiError;
use crate::hub::session::{self, close, Resume};

/// Query parameters of the connect URL.
#[derive(Default)]
struct ConnectQuery {
    token: Option<String>,
    since: Option<String>,
    epoch: Option<String>,
}

impl std::fmt::Debug for ConnectQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectQuery")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("since", &self.since)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl ConnectQuery {
    /// Parses `a=b&c=d` (percent-encoded, `+` for space); unknown names and
    /// undecodable values are ignored. `since` and `epoch` take their first
    /// value; a repeated `token` is refused (no token), so no proxy or client
    /// can disagree with us about which one counts.
    fn parse(raw: &str) -> ConnectQuery {
        let mut query = ConnectQuery::default();
        let mut tokens = 0usize;
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (Some(name), Some(value)) = (decode(name), decode(value)) else {
                continue;
            };
            match name.as_str() {
                "token" => {
                    tokens = tokens.saturating_add(1);
                    query.token = (tokens == 1).then_some(value);
                }
                "since" => {
                    query.since.get_or_insert(value);
                }
                "epoch" => {
                    query.epoch.get_or_insert(value);
                }
                _ => {}
            }
        }
        query
    }
}

/// One form-encoded query component; `None` when it is not UTF-8.
fn decode(component: &str) -> Option<String> {
    let spaced = component.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// The outcome of checking a handshake, decided before the 101 is sent.
enum Admission {
    Accept(Claims, Option<Resume>),
    Refuse(u16, &'static str),
}

/// GET /api/v1/ws/connect
pub fn ws_connect(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / "v1" / "ws" / "connect")
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .and(
            warp::query::raw()
                .or(warp::any().map(String::new))
                .unify()
                .map(|raw: String| ConnectQuery::parse(&raw)),
        )
        .and(warp::ext::optional::<OnUpgrade>())
        .and(with_shared(shared))
        .and_then(
            |headers: HeaderMap,
             query: ConnectQuery,
             upgrade: Option<OnUpgrade>,
             shared: Arc<Shared>| async move {
                handshake(&headers, query, upgrade, shared)
                    .await
                    .map_err(warp::reject::custom)
            },
        )
}

async fn handshake(
    headers: &HeaderMap,
    query: ConnectQuery,
    upgrade: Option<OnUpgrade>,
    shared: Arc<Shared>,
) -> Result<warp::reply::Response, ApiError> {
    let wants_websocket = header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket");
    if !wants_websocket {
        return Err(ApiError::UpgradeRequired);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return Err(ApiError::BadRequest(
            "Sec-WebSocket-Version must be 13".into(),
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| ApiError::BadRequest("missing Sec-WebSocket-Key".into()))?;
    let upgrade =
        upgrade.ok_or_else(|| ApiError::Internal("connection cannot be upgraded".into()))?;

    let protocols: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let offered_token_protocol = protocols.first() == Some(&"token");
    let token = if offered_token_protocol {
        protocols.get(1).copied()
    } else {
        None
    };
    let token = token.or(query.token.as_deref());
    let admission = admit(&shared, headers, token, &query).await;

    let mut response = warp::reply::reply().into_response();
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
        .map_err(|_| ApiError::Internal("accept key is not a header value".into()))?;
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    if offered_token_protocol {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("token"),
        );
    }

    let tracked = shared.clone();
    tracked.sessions.shutdown.spawn(async move {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        // Our accept loop serves `TokioIo<TcpStream>`, so this is the raw socket;
        // anything else (e.g. warp's test harness) keeps hyper's wrapper.
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let stream = parts.io.into_inner();
                // `read_buf` is a view into hyper's 8 KiB read buffer: copy what the
                // client sent early and let the buffer go, or every connection keeps it.
                let early = (!parts.read_buf.is_empty()).then(|| parts.read_buf.to_vec());
                drop(parts.read_buf);
                let config = Some(shared.ws_config);
                let ws = match early {
                    None => WebSocketStream::from_raw_socket(stream, Role::Server, config).await,
                    Some(early) => {
                        WebSocketStream::from_partially_read(stream, early, Role::Server, config)
                            .await
                    }
                };
                serve_socket(ws, admission, &shared).await;
            }
            Err(upgraded) => {
                let io = TokioIo::new(upgraded);
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(shared.ws_config))
                    .await;
                serve_socket(ws, admission, &shared).await;
            }
        }
    });
    Ok(response)
}

async fn serve_socket<S>(mut ws: WebSocketStream<S>, admission: Admission, shared: &Shared)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match admission {
        Admission::Accept(claims, resume) => {
            session::run(ws, shared.sessions.clone(), Box::new(claims), resume).await
        }
        Admission::Refuse(code, reason) => session::close_socket(&mut ws, code, reason).await,
    }
}

/// Checks origin and token; the verdict is delivered as a close code after the 101.
async fn admit(
    shared: &Shared,
    headers: &HeaderMap,
    token: Option<&str>,
    query: &ConnectQuery,
) -> Admission {
    if let (Some(allowed), Some(origin)) = (&shared.allowed_origins, headers.get(header::ORIGIN)) {
        let origin = origin.to_str().unwrap_or("").trim_end_matches('/');
        if !allowed.iter().any(|a| a == origin) {
            return Admission::Refuse(close::FORBIDDEN, "origin not allowed");
        }
    }
    let verdict = match token.map(Credential::classify) {
        None => Err(AuthError::Missing),
        // A key publishes for a backend; it is never a browser session.
        Some(Credential::ApiKey(_)) => Err(AuthError::ApiKeyOnWebSocket),
        Some(Credential::Token(token)) => shared.auth.verify(token).await,
    };
    let claims = match verdict {
        Ok(claims) => claims,
        Err(e) => {
            shared.hub.metrics().ws_auth_failures.inc();
            tracing::debug!(reason = %e, "websocket token refused");
            let reason = if e == AuthError::Expired {
                "token expired"
            } else {
                "unauthorized"
            };
            return Admission::Refuse(close::UNAUTHORIZED, reason);
        }
    };
    let resume = match (&query.since, &query.epoch) {
        (Some(since), epoch) => since.parse::<u64>().ok().map(|since| Resume {
            since,
            epoch: epoch.clone().unwrap_or_default(),
        }),
        (None, _) => None,
    };
    Admission::Accept(claims, resume)
}

/// Whether a comma-separated header lists `token` (case-insensitive).
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::ConnectQuery;

    #[test]
    fn the_query_is_decoded_and_a_repeated_token_counts_as_none() {
        let q = ConnectQuery::parse("token=a%2Eb+c&since=5&since=6&epoch=e&x");
        assert_eq!(q.token.as_deref(), Some("a.b c"));
        assert_eq!(q.since.as_deref(), Some("5"));
        assert_eq!(q.epoch.as_deref(), Some("e"));
        assert_eq!(ConnectQuery::parse("token=a&token=b&token=c").token, None);
        assert_eq!(ConnectQuery::parse("token=%FF").token, None);
        assert_eq!(ConnectQuery::parse("").token, None);
        let shown = format!("{:?}", ConnectQuery::parse("token=secret"));
        assert!(!shown.contains("secret"), "{shown}");
    }
}
