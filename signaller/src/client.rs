//! A small HTTP client for this server's REST API, for the load tool and the tests of this
//! workspace (the native peer's included). One request per connection: the callers are
//! scripts that create a room or read a snapshot, not hot paths.

use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// What can go wrong with one request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Not a `ws://host[:port]/...` URL.
    #[error("the signaller URL must look like ws://host:port/ws, not {0:?}")]
    Url(String),
    /// The TCP connection could not be made.
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        /// `host:port` tried.
        authority: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed (malformed answer, connection reset…).
    #[error("HTTP exchange with {authority} failed: {source}")]
    Http {
        /// `host:port` asked.
        authority: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// The request itself could not be built (bad method or path).
    #[error("invalid request: {0}")]
    Request(#[from] hyper::http::Error),
    /// No complete answer within the time limit.
    #[error("{method} {path}: no answer within {limit:?}")]
    Timeout {
        /// Method sent.
        method: String,
        /// Path asked.
        path: String,
        /// The limit.
        limit: Duration,
    },
}

/// `host:port` of the signaller behind a `ws://host[:port]/path` URL (port 80 if none), for
/// tools that are given the WebSocket URL and also need the REST API.
pub fn authority_of(url: &str) -> Result<String, ClientError> {
    let bad = || ClientError::Url(url.to_owned());
    let rest = url.strip_prefix("ws://").ok_or_else(bad)?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(bad());
    }
    Ok(if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    })
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: hyper::HeaderMap,
    /// Body, decoded as UTF-8 (lossily).
    pub body: String,
}

impl Response {
    /// A header's value as text ("" when absent or not text).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_str(&self.body)
    }
}

/// Sends one request to `authority` (`host:port`) and reads the whole answer, giving up
/// after `limit`. A body, if any, is sent as JSON.
pub async fn request(
    authority: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    limit: Duration,
) -> Result<Response, ClientError> {
    request_with_auth(authority, method, path, body, None, limit).await
}

/// [`request`] with `Authorization: Bearer <bearer>` (an operator secret, a broadcaster
/// token or a room-creation grant).
pub async fn request_with_auth(
    authority: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    bearer: Option<&str>,
    limit: Duration,
) -> Result<Response, ClientError> {
    tokio::time::timeout(limit, exchange(authority, method, path, body, bearer))
        .await
        .map_err(|_| ClientError::Timeout {
            method: method.to_owned(),
            path: path.to_owned(),
            limit,
        })?
}

async fn exchange(
    authority: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    bearer: Option<&str>,
) -> Result<Response, ClientError> {
    let http_err = |source| ClientError::Http {
        authority: authority.to_owned(),
        source,
    };
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|source| ClientError::Connect {
            authority: authority.to_owned(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    // The connection future drives the socket; it ends when the exchange is over.
    let driver = tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority);
    if body.is_some() {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    if let Some(bearer) = bearer {
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {bearer}"));
    }
    let request = builder.body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))?;
    let response = sender.send_request(request).await.map_err(http_err)?;
    let status = response.status().as_u16();
    let (parts, incoming) = response.into_parts();
    let bytes = incoming.collect().await.map_err(http_err)?.to_bytes();
    driver.abort();
    Ok(Response {
        status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_come_from_websocket_urls() {
        assert_eq!(authority_of("ws://127.0.0.1:9/ws").unwrap(), "127.0.0.1:9");
        assert_eq!(
            authority_of("ws://example.org/ws").unwrap(),
            "example.org:80"
        );
        for bad in ["http://x/ws", "ws:///ws", "127.0.0.1:9"] {
            assert!(
                matches!(authority_of(bad), Err(ClientError::Url(_))),
                "{bad}"
            );
        }
    }
}
