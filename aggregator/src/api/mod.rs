//! The aggregator's HTTP API (axum): `/healthz`, `/metrics` and the
//! read-only device registry under `/api/v1/`. Routes and response shapes
//! are documented in `docs/aggregator.md` (HTTP API).
//!
//! Design:
//! - **Reads only.** The API never writes the store. Every store query runs
//!   in [`tokio::task::spawn_blocking`] on the one read-only
//!   [`StoreReader`] behind a mutex (SQLite is blocking and the connection
//!   is `Send`, not `Sync`), so a slow query never stalls a runtime worker.
//!   A poisoned mutex is recovered: a read-only connection has no half-done
//!   write to protect.
//! - **Auth** ([`auth`]): when a token is configured, every request whose
//!   path is `/api` or starts with `/api/` needs `Authorization: Bearer
//!   <token>`, compared in constant time. The check is a layer around the
//!   whole router that looks at the path, so it also covers unknown `/api/`
//!   paths (401, not 404: no probing of what exists) and the routes added
//!   through [`router_with`]. `/healthz` and `/metrics` stay open for probes
//!   and scrapers. The token never reaches a log or a `Debug` output.
//! - **Errors are JSON**, always: `{"error": "...", "status": 404}`. Our
//!   handlers return [`ApiError`]; axum's own plain-text or empty answers
//!   (unknown route 404, wrong method 405 with its `Allow` header, bad query
//!   400) are rewritten to the same shape by one outer layer, so an added
//!   route gets the same behaviour for free.
//! - **Logging**: one DEBUG line per request (method, path, status, time);
//!   INFO only for start and stop; WARN when a store query fails.
//! - **Shutdown**: [`serve`] stops accepting on cancellation and lets
//!   in-flight requests finish, for at most [`DRAIN_TIMEOUT`]
//!   ([`serve_with_drain`] takes another bound), then gives up on them: a
//!   client that never finishes sending its request would otherwise hold the
//!   shutdown forever (axum 0.7 has no header-read timeout). Long-lived
//!   responses (an SSE stream) should end on the same cancellation token.
//!
//! Limits: no TLS (bind to loopback, the default, or put a TLS-terminating
//! proxy in front; the token travels in clear otherwise), no rate limit on
//! failed tokens (use a long random token: [`MIN_TOKEN_LEN`]), no request
//! header timeout (axum 0.7's `serve` has none; a stalled client holds
//! one connection task until it goes away).

mod auth;
mod handlers;

use std::borrow::Cow;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::metrics::Metrics;
use crate::state::{StateError, StoreReader};

pub use handlers::{DEFAULT_DEAD_LETTER_LIMIT, MAX_DEAD_LETTER_LIMIT};

/// Default listen address: loopback only, so nothing is exposed until an
/// admin decides to.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT);
/// Default port of the API.
pub const DEFAULT_PORT: u16 = 8080;
/// Shortest bearer token `validate` accepts (there is no rate limit on
/// guesses, so a token must be long and random).
pub const MIN_TOKEN_LEN: usize = 16;
/// Largest plain-text error body the JSON-error layer reads and passes on
/// as the message; a longer one is replaced by the status's reason.
const MAX_ERROR_BODY: usize = 4 * 1024;
/// How long [`serve`] lets in-flight requests finish after cancellation.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Content type of `/metrics` by default (Prometheus text format 0.0.4).
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of `/metrics` for a scraper that accepts OpenMetrics (what
/// `Metrics::render` produces).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `[api]` in the aggregator config.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ApiConfig {
    /// Address the HTTP API listens on (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// Bearer token required on `/api/`; `None` leaves the API open (fine on
    /// loopback, not elsewhere).
    pub token: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: DEFAULT_LISTEN,
            token: None,
        }
    }
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ApiConfig {
    /// Appends every problem to `errors`, each prefixed with `key` (the path
    /// of this table in the config, e.g. `api`). Never mentions the token's
    /// value.
    pub fn validate(&self, key: &str, errors: &mut Vec<String>) {
        if let Some(token) = &self.token {
            if token.is_empty() {
                errors.push(format!(
                    "{key}.token: must not be empty (leave it out to disable auth)"
                ));
            } else if token.len() < MIN_TOKEN_LEN {
                errors.push(format!(
                    "{key}.token: must be at least {MIN_TOKEN_LEN} characters long"
                ));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                errors.push(format!(
                    "{key}.token: must be printable ASCII without spaces"
                ));
            }
        }
    }
}

/// What `/healthz` reports (ingest running, broker up, ...). Called on every
/// probe from the async runtime, so it must be cheap and must not block.
pub trait Health: Send + Sync + 'static {
    /// Whether the aggregator is healthy (`false` answers 503), and a JSON
    /// value describing the parts, served as `checks`.
    fn report(&self) -> (bool, serde_json::Value);
}

/// Everything the handlers need. Cheap to clone (all shared).
#[derive(Clone)]
pub struct ApiState {
    /// The read-only store connection; queries run in `spawn_blocking`.
    pub reader: Arc<Mutex<StoreReader>>,
    /// Rendered at `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Reported at `/healthz`.
    pub health: Arc<dyn Health>,
    /// Bearer token required on `/api/`, if any.
    pub token: Option<String>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// Why a store query gave no answer.
#[derive(Debug, thiserror::Error)]
enum QueryError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("store query task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl ApiState {
    /// Runs `f` on the store reader in the blocking pool (`what` names the
    /// query in the log). A failure is logged at WARN with its cause and
    /// answered 500 without it (the cause may name files).
    pub async fn query<T, F>(&self, what: &'static str, f: F) -> Result<T, ApiError>
    where
        F: FnOnce(&StoreReader) -> Result<T, StateError> + Send + 'static,
        T: Send + 'static,
    {
        let reader = Arc::clone(&self.reader);
        let result = tokio::task::spawn_blocking(move || {
            // A panic in an earlier query poisons the mutex; the connection
            // is read-only, so there is no half-done state to protect.
            let reader = reader.lock().unwrap_or_else(PoisonError::into_inner);
            f(&reader)
        })
        .await;
        let error = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => QueryError::from(e),
            Err(e) => QueryError::from(e),
        };
        warn!(query = what, error = %error, "API store query failed");
        Err(ApiError::internal())
    }
}

/// The API's routes with auth, JSON errors and request logging.
///
/// To add routes (alerts, rules, ...), use [`router_with`]: a route merged
/// onto the *result* of this function is outside the auth and JSON-error
/// layers.
pub fn router(state: ApiState) -> Router {
    router_with(state, Router::new())
}

/// [`router`] plus `extra` routes, which get the same layers: bearer auth
/// when their path is under `/api/`, JSON errors, request logging. `extra`
/// may use `State<ApiState>`, or carry its own state (`.with_state(..)`
/// before passing it). It must not set a fallback (axum panics on two).
pub fn router_with(state: ApiState, extra: Router<ApiState>) -> Router {
    let token = state.token.clone();
    let routes = Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/metrics", get(handlers::metrics))
        .route("/api/v1/devices", get(handlers::devices))
        .route("/api/v1/devices/:id", get(handlers::device))
        .route("/api/v1/dead-letters", get(handlers::dead_letters))
        .merge(extra)
        .with_state(state);
    let routes = match token {
        Some(token) => routes.layer(middleware::from_fn_with_state(
            auth::Token::new(token),
            auth::require_token,
        )),
        None => routes,
    };
    // Outermost: JSON errors (so a 401 or 405 from inside is covered), then
    // the log line, which sees the final status.
    routes
        .layer(middleware::map_response(json_errors))
        .layer(middleware::from_fn(log_request))
}

/// Binds `listen` and serves `router` until `cancel`, then drains for at
/// most [`DRAIN_TIMEOUT`]: see [`serve_with_drain`].
pub async fn serve(
    listen: SocketAddr,
    router: Router,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    serve_with_drain(listen, router, cancel, DRAIN_TIMEOUT).await
}

/// Binds `listen` and serves `router` until `cancel`, then drains: no new
/// connections, in-flight requests get up to `drain` to finish, after which
/// the server gives up on them (a client that never finishes sending its
/// request, or an endless stream, must not hold the shutdown). Returns the
/// bound address (port 0 picks one, for tests) and the server task, which
/// ends when the drain is done.
pub async fn serve_with_drain(
    listen: SocketAddr,
    router: Router,
    cancel: CancellationToken,
    drain: Duration,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    info!(addr = %local, "HTTP API listening");
    let task = tokio::spawn(async move {
        let server =
            axum::serve(listener, router).with_graceful_shutdown(cancel.clone().cancelled_owned());
        let deadline = async {
            cancel.cancelled().await;
            tokio::time::sleep(drain).await;
        };
        tokio::select! {
            result = server => match result {
                Ok(()) => info!(addr = %local, "HTTP API stopped"),
                Err(e) => error!(addr = %local, error = %e, "HTTP API server failed"),
            },
            () = deadline => warn!(
                addr = %local,
                drain = ?drain,
                "HTTP API stopped with requests still open after the drain time"
            ),
        }
    });
    Ok((local, task))
}

/// An error answer: `{"error": message, "status": code}` with that status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable, safe to show a client (no internals).
    pub message: Cow<'static, str>,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<Cow<'static, str>>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 500; the cause is logged by the caller, not shown.
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }

    fn body(&self) -> String {
        serde_json::json!({ "error": self.message, "status": self.status.as_u16() }).to_string()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = Response::new(Body::from(self.body()));
        *res.status_mut() = self.status;
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        res
    }
}

/// Rewrites an error response that is not JSON (axum's empty 404/405, its
/// plain-text extractor rejections) into the [`ApiError`] shape, keeping its
/// status and headers (`Allow`, `WWW-Authenticate`). A short plain-text body
/// becomes the message.
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(&res) {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .filter(|t| !t.is_empty());
    let message = text.unwrap_or_else(|| {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    });
    let error = ApiError::new(status, message);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(error.body()))
}

fn is_json(res: &Response) -> bool {
    res.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// One DEBUG line per request. The path only: a query string could carry
/// anything, and headers (the token) are never logged.
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let start = Instant::now();
    let res = next.run(req).await;
    debug!(
        %method,
        path,
        status = res.status().as_u16(),
        micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
        "HTTP request"
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_kebab_case() {
        let c: ApiConfig = toml::from_str("").unwrap();
        assert_eq!(c, ApiConfig::default());
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        let c: ApiConfig =
            toml::from_str("listen = \"0.0.0.0:9000\"\ntoken = \"0123456789abcdef\"").unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert!(toml::from_str::<ApiConfig>("bearer = \"x\"").is_err());
    }

    #[test]
    fn debug_redacts_the_token() {
        let c = ApiConfig {
            token: Some("s3cret-s3cret-s3cret".into()),
            ..ApiConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn validate_reports_every_problem_with_its_key() {
        let mut errors = Vec::new();
        ApiConfig::default().validate("api", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");

        // Port 0 is allowed: tests bind any port and read the bound address.
        let c = ApiConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: Some("short token".into()),
        };
        c.validate("api", &mut errors);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("api.token:") && errors[0].contains("16"));
        assert!(errors[1].starts_with("api.token:") && errors[1].contains("without spaces"));
        assert!(errors.iter().all(|e| !e.contains("short token")));

        let mut errors = Vec::new();
        let c = ApiConfig {
            token: Some(String::new()),
            ..ApiConfig::default()
        };
        c.validate("api", &mut errors);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("must not be empty"));
    }

    #[test]
    fn api_error_body_shape() {
        let body = ApiError::not_found("device \"x\" not found").body();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "device \"x\" not found");
        assert_eq!(v["status"], 404);
    }
}
