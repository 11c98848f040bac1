//! The web pages and the browser client: built into the binary from `web/` (see
//! `build.rs`; `scripts/build-client` puts the wasm client in `web/pkg/`), or read from a
//! directory on every request when `web_dir` is configured (for working on the pages).
//!
//! Routes: `/` (landing and "Go live"), `/watch/{room}` and `/watch` (the player; it reads
//! the room from its address and explains a missing or unknown one), `/dashboard`, and
//! `/assets/{path}` for every other file under `web/` (scripts, styles, `pkg/`).

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::server::ServerState;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/web_files.rs"));
}

/// The wasm file `scripts/build-client` produces; its absence means the client is not built.
const CLIENT_WASM: &str = "pkg/treecast_client_bg.wasm";

/// Where pages come from.
#[derive(Debug, Clone)]
pub(crate) struct Pages {
    dir: Option<PathBuf>,
}

impl Pages {
    /// Built-in pages, or pages read from `dir` on every request.
    pub(crate) fn new(dir: Option<PathBuf>) -> Self {
        let pages = Self { dir };
        if !pages.client_built() {
            tracing::warn!(
                "the browser client is not built: pages load but cannot broadcast or play; \
                 run scripts/build-client (scripts/run does) and rebuild the signaller"
            );
        }
        pages
    }

    fn client_built(&self) -> bool {
        match &self.dir {
            None => embedded::FILES.iter().any(|(p, _)| *p == CLIENT_WASM),
            Some(dir) => dir.join(CLIENT_WASM).is_file(),
        }
    }

    /// The contents of `web/<path>`, if there is such a file.
    async fn file(&self, path: &str) -> Result<Cow<'static, [u8]>, Response> {
        let missing = crate::api::not_found_response;
        if !is_safe(path) {
            return Err(missing());
        }
        match &self.dir {
            None => embedded::FILES
                .iter()
                .find(|(p, _)| *p == path)
                .map(|(_, bytes)| Cow::Borrowed(*bytes))
                .ok_or_else(missing),
            Some(dir) => {
                let full = dir.join(path);
                match tokio::task::spawn_blocking(move || std::fs::read(full)).await {
                    Ok(Ok(bytes)) => Ok(Cow::Owned(bytes)),
                    Ok(Err(_)) => Err(missing()),
                    Err(e) => {
                        tracing::error!("reading a web file failed: {e}");
                        Err(StatusCode::INTERNAL_SERVER_ERROR.into_response())
                    }
                }
            }
        }
    }

    async fn serve(&self, path: &str) -> Response {
        match self.file(path).await {
            Ok(bytes) => (
                [
                    (header::CONTENT_TYPE, content_type(path)),
                    (header::CACHE_CONTROL, "no-cache"),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                ],
                bytes,
            )
                .into_response(),
            Err(response) => response,
        }
    }
}

/// Only plain relative paths below `web/`: no `..`, no hidden files, no odd characters.
fn is_safe(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 200
        && path.split('/').all(|part| {
            !part.is_empty()
                && !part.starts_with('.')
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}

/// `GET /`
pub(crate) async fn landing(State(state): State<Arc<ServerState>>) -> Response {
    state.pages.serve("index.html").await
}

/// `GET /watch/{room}` and `GET /watch`
pub(crate) async fn watch(State(state): State<Arc<ServerState>>) -> Response {
    state.pages.serve("watch.html").await
}

/// `GET /dashboard`
pub(crate) async fn dashboard(State(state): State<Arc<ServerState>>) -> Response {
    state.pages.serve("dashboard.html").await
}

/// `GET /assets/{*path}`: scripts, styles and the wasm client.
pub(crate) async fn asset(
    State(state): State<Arc<ServerState>>,
    Path(path): Path<String>,
) -> Response {
    state.pages.serve(&path).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_paths_are_served() {
        assert!(is_safe("client.js"));
        assert!(is_safe("pkg/treecast_client_bg.wasm"));
        for bad in [
            "",
            "../Cargo.toml",
            "a/../b",
            "/etc/passwd",
            ".gitignore",
            "a//b",
            "a b",
        ] {
            assert!(!is_safe(bad), "{bad}");
        }
    }

    #[test]
    fn the_pages_are_embedded() {
        for page in ["index.html", "watch.html", "dashboard.html", "client.js"] {
            assert!(
                embedded::FILES.iter().any(|(p, _)| *p == page),
                "{page} missing"
            );
        }
        assert_eq!(content_type("pkg/x.wasm"), "application/wasm");
    }
}
