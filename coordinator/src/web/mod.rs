//! The coordinator's HTTP face, read-only: a dashboard at `/` (its page and script embedded in
//! the binary), Prometheus metrics at `/metrics` and the job's status as JSON at `/api/status`,
//! which the dashboard polls. Nothing here changes the job. With
//! `server.http_require_token`, `/metrics` and `/api/status` want the job token as
//! `Authorization: Bearer <token>`; the page and its script hold no data and are served to
//! anyone who reaches the port (docs/SECURITY.md). Layout: `api` (the JSON view),
//! `exposition` (the Prometheus text), `dashboard.html` and `dashboard.js` (the page).
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use crate::service::Shared;
use crate::CoordinatorError;

mod api;
mod exposition;

const PAGE: &str = include_str!("dashboard.html");
const SCRIPT: &str = include_str!("dashboard.js");

/// Binds `server.http_listen`; `None` when it is empty (the server is off).
pub(crate) async fn bind(addr: &str) -> Result<Option<TcpListener>, CoordinatorError> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| CoordinatorError::HttpListen { addr: addr.to_string(), source })?;
    Ok(Some(listener))
}

/// The running HTTP server; dropping it stops the server.
pub(crate) struct WebServer {
    handle: AbortHandle,
}

impl Drop for WebServer {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

#[derive(Clone)]
struct Web {
    shared: Shared,
    require_token: bool,
}

/// Serves the dashboard, metrics and status on `listener` until the returned handle is dropped.
pub(crate) fn spawn(listener: TcpListener, shared: Shared, require_token: bool) -> WebServer {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            require_token,
            "watch the run: dashboard at http://{addr}/, Prometheus metrics at http://{addr}/metrics"
        );
    }
    let app = Router::new()
        .route("/", get(page))
        .route("/dashboard.js", get(script))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .with_state(Web { shared, require_token });
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "the HTTP server stopped");
        }
    });
    WebServer { handle: task.abort_handle() }
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything the page uses comes from this server: no CDN, no inline script.
            (header::CONTENT_SECURITY_POLICY, "default-src 'self'; style-src 'self' 'unsafe-inline'"),
        ],
        PAGE,
    )
        .into_response()
}

async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT).into_response()
}

async fn metrics(State(web): State<Web>, headers: HeaderMap) -> Response {
    let status = match web.snapshot(&headers) {
        Ok(status) => status,
        Err(refused) => return refused,
    };
    match exposition::encode(&status) {
        Ok(text) => {
            ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                .into_response()
        }
        Err(err) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode the metrics: {err}\n")).into_response()
        }
    }
}

/// `GET /api/status[?since=N]`: the status, with the metrics history from point `N` on.
async fn status(State(web): State<Web>, headers: HeaderMap, uri: Uri) -> Response {
    let status = match web.snapshot(&headers) {
        Ok(status) => status,
        Err(refused) => return refused,
    };
    let since = match api::since(uri.query()) {
        Ok(since) => since,
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    let body = api::view(&status, since).to_string();
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body).into_response()
}

impl Web {
    /// The job's status, or the 401 answer when a token is required and the request lacks it.
    #[allow(clippy::result_large_err)] // the error is the HTTP answer itself
    fn snapshot(&self, headers: &HeaderMap) -> Result<mtl_proto::v1::JobStatus, Response> {
        let state = self.shared.lock();
        if self.require_token {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if state.check_token(given.trim()).is_err() {
                drop(state);
                let mut refused = (
                    StatusCode::UNAUTHORIZED,
                    "the job token is missing or wrong: send it as `Authorization: Bearer <token>` \
                     (server.http_require_token)\n",
                )
                    .into_response();
                refused
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"mtl\""));
                return Err(refused);
            }
        }
        Ok(state.status(Instant::now()))
    }
}
