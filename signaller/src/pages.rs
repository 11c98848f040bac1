//! The web pages: built into the binary, or read from a directory when one is configured.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::server::ServerState;

/// One of the pages the server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    /// `/`
    Landing,
    /// `/watch/{room}` (one page for every room; it reads the room from its address).
    Watch,
    /// `/dashboard`
    Dashboard,
}

impl Page {
    fn file(self) -> &'static str {
        match self {
            Self::Landing => "index.html",
            Self::Watch => "watch.html",
            Self::Dashboard => "dashboard.html",
        }
    }

    fn built_in(self) -> &'static str {
        match self {
            Self::Landing => include_str!("../../web/index.html"),
            Self::Watch => include_str!("../../web/watch.html"),
            Self::Dashboard => include_str!("../../web/dashboard.html"),
        }
    }
}

/// Where pages come from.
#[derive(Debug, Clone)]
pub(crate) struct Pages {
    dir: Option<PathBuf>,
}

impl Pages {
    /// Built-in pages, or pages read from `dir` on every request.
    pub(crate) fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    async fn serve(&self, page: Page) -> Response {
        let html: Cow<'static, str> = match &self.dir {
            None => page.built_in().into(),
            Some(dir) => {
                let path = dir.join(page.file());
                match tokio::task::spawn_blocking(move || std::fs::read_to_string(&path)).await {
                    Ok(Ok(html)) => html.into(),
                    Ok(Err(e)) => {
                        tracing::warn!("cannot read {} from the web directory: {e}", page.file());
                        return (
                            StatusCode::NOT_FOUND,
                            "This page is missing from the server's web directory.",
                        )
                            .into_response();
                    }
                    Err(e) => {
                        tracing::error!("reading a page failed: {e}");
                        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
                    }
                }
            }
        };
        (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            html,
        )
            .into_response()
    }
}

/// `GET /`
pub(crate) async fn landing(State(state): State<Arc<ServerState>>) -> Response {
    state.pages.serve(Page::Landing).await
}

/// `GET /watch/{room}`
pub(crate) async fn watch(State(state): State<Arc<ServerState>>) -> Response {
    state.pages.serve(Page::Watch).await
}

/// `GET /dashboard`
pub(crate) async fn dashboard(State(state): State<Arc<ServerState>>) -> Response {
    state.pages.serve(Page::Dashboard).await
}
