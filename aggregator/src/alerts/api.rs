//! Alert delivery over HTTP, merged into the API with
//! [`crate::api::router_with`] (so bearer auth and JSON errors apply):
//!
//! * `GET /api/v1/alerts/history?device=&rule=&since=&before=&limit=`:
//!   transitions newest first, each with its deliveries per sink. `since`
//!   is Unix ms or RFC 3339 (event time); `before` an id, for paging.
//! * `GET /api/v1/alerts/stream`: server-sent events, one `transition`
//!   event per recorded transition (committed ones only), `id:` = history
//!   id. A client reconnecting with `Last-Event-ID: N` first gets every
//!   transition after N (the history is the replay buffer), then live ones;
//!   without it, only new ones (an id above the newest, after a restored
//!   state file, also means new ones). A comment line every [`KEEP_ALIVE`] keeps
//!   proxies from closing an idle stream. The stream ends when the
//!   aggregator shuts down.
//! * `GET /api/v1/outbox?status=&sink=&limit=`: notifications, newest
//!   first (`status` = `pending`, `delivered` or `dead`), with totals.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::deliver::Wake;
use super::outbox::{HistoryEntry, HistoryQuery, Outbox, DEFAULT_LIST_LIMIT};
use crate::api::{ApiError, ApiState};
use crate::state::StateError;

/// Interval of the SSE keep-alive comment.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Transitions read per query while a stream catches up.
pub const STREAM_BATCH: usize = 100;

/// State of the alert routes.
#[derive(Clone)]
pub struct AlertsApi {
    /// Read-only connection (queries run in the blocking pool).
    pub outbox: Arc<Mutex<Outbox>>,
    /// Bumped after each commit that recorded transitions.
    pub wake: Wake,
    /// Ends the SSE streams (aggregator shutdown).
    pub cancel: CancellationToken,
}

impl std::fmt::Debug for AlertsApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertsApi").finish_non_exhaustive()
    }
}

impl AlertsApi {
    async fn query<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Outbox) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let outbox = self.outbox.clone();
        let r = tokio::task::spawn_blocking(move || {
            let o = outbox.lock().unwrap_or_else(PoisonError::into_inner);
            f(&o)
        })
        .await;
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                warn!(query = what, error = %e, "API outbox query failed");
                Err(ApiError::internal())
            }
            Err(e) => {
                warn!(query = what, error = %e, "API outbox query task failed");
                Err(ApiError::internal())
            }
        }
    }
}

/// The routes.
pub fn routes(a: AlertsApi) -> Router<ApiState> {
    Router::new()
        .route("/api/v1/alerts/history", get(history))
        .route("/api/v1/alerts/stream", get(stream))
        .route("/api/v1/outbox", get(outbox))
        .with_state(a)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryParams {
    device: Option<String>,
    rule: Option<String>,
    since: Option<String>,
    before: Option<i64>,
    limit: Option<usize>,
}

/// `since` as Unix ms: an integer, or an RFC 3339 time.
fn parse_since(s: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "since: {s:?} is neither Unix milliseconds nor an RFC 3339 time"
            ))
        })
}

async fn history(
    State(a): State<AlertsApi>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let q = HistoryQuery {
        device: p.device,
        rule: p.rule,
        since_ms: p.since.as_deref().map(parse_since).transpose()?,
        before_id: p.before,
        limit: p.limit.unwrap_or(DEFAULT_LIST_LIMIT),
    };
    let entries = a.query("alert history", move |o| o.history(&q)).await?;
    Ok(Json(serde_json::json!({ "transitions": entries })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboxParams {
    status: Option<String>,
    sink: Option<String>,
    limit: Option<usize>,
}

async fn outbox(
    State(a): State<AlertsApi>,
    params: Result<Query<OutboxParams>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if let Some(s) = &p.status {
        if !["pending", "delivered", "dead"].contains(&s.as_str()) {
            return Err(ApiError::bad_request(
                "status: must be pending, delivered or dead",
            ));
        }
    }
    let limit = p.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    let (totals, rows) = a
        .query("outbox", move |o| {
            Ok((
                o.totals()?,
                o.list(p.status.as_deref(), p.sink.as_deref(), limit)?,
            ))
        })
        .await?;
    Ok(Json(serde_json::json!({
        "totals": { "pending": totals.0, "delivered": totals.1, "dead": totals.2 },
        "notifications": rows,
    })))
}

fn event(e: &HistoryEntry) -> Event {
    let data = serde_json::to_string(e).unwrap_or_else(|_| "{}".to_owned());
    Event::default()
        .event("transition")
        .id(e.id.to_string())
        .data(data)
}

struct StreamState {
    api: AlertsApi,
    wake: tokio::sync::watch::Receiver<u64>,
    last: i64,
    buffered: std::collections::VecDeque<HistoryEntry>,
}

async fn stream(
    State(a): State<AlertsApi>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let resume = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| ApiError::bad_request("Last-Event-ID: must be a history id"))?,
        ),
    };
    // Subscribe before reading the position, so nothing committed in
    // between is missed.
    let wake = a.wake.subscribe();
    let newest = a
        .query("alert stream start", |o| o.last_history_id())
        .await?;
    // An id above the newest (the state file was replaced or restored from
    // a backup) would wait for ids to catch up: start live instead.
    let last = resume.map_or(newest, |id| id.min(newest));
    let st = StreamState {
        api: a,
        wake,
        last,
        buffered: Default::default(),
    };
    let events = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.buffered.pop_front() {
                st.last = e.id;
                return Some((Ok::<Event, Infallible>(event(&e)), st));
            }
            let after = st.last;
            match st
                .api
                .query("alert stream", move |o| {
                    o.history_after(after, STREAM_BATCH)
                })
                .await
            {
                Ok(v) if !v.is_empty() => {
                    st.buffered.extend(v);
                    continue;
                }
                Ok(_) => {}
                Err(_) => return None,
            }
            tokio::select! {
                _ = st.api.cancel.cancelled() => return None,
                r = st.wake.changed() => {
                    if r.is_err() {
                        return None;
                    }
                }
                // A transition committed by a writer that did not wake us
                // (none today) is still picked up.
                _ = tokio::time::sleep(KEEP_ALIVE) => {}
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_ms_or_rfc3339() {
        assert_eq!(parse_since("1700000000123").ok(), Some(1_700_000_000_123));
        assert_eq!(
            parse_since("2023-11-14T22:13:20.123Z").ok(),
            Some(1_700_000_000_123)
        );
        assert!(parse_since("yesterday").is_err());
    }
}
