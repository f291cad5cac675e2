//! Route handlers. Each one extracts and checks its input, runs its store
//! query through [`ApiState::query`] (blocking pool, one read-only
//! connection), and answers JSON or an [`ApiError`].

use std::collections::BTreeMap;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use outpost_proto::topics::validate_device_id;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState, METRICS_CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE};
use crate::state::{DeadLetterRecord, DeviceDetail, DeviceRecord};

/// Dead letters listed when the request gives no `limit`.
pub const DEFAULT_DEAD_LETTER_LIMIT: usize = 100;
/// Most dead letters one request lists; a larger `limit` is clamped to it.
pub const MAX_DEAD_LETTER_LIMIT: usize = 1000;

/// `GET /healthz`: `{"healthy": bool, "checks": ...}`, 200 or 503.
pub(super) async fn healthz(State(state): State<ApiState>) -> impl IntoResponse {
    let (healthy, checks) = state.health.report();
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({ "healthy": healthy, "checks": checks })),
    )
}

/// `GET /metrics`: the metrics as rendered by [`crate::metrics::Metrics::render`]
/// (OpenMetrics text, which the Prometheus 0.0.4 text parser also reads).
/// A scraper that accepts OpenMetrics (Prometheus does, by its `Accept`
/// header) gets that content type, so it parses counters by their
/// OpenMetrics names; anything else gets `text/plain; version=0.0.4`.
pub(super) async fn metrics(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let content_type = if accepts_openmetrics(&headers) {
        OPENMETRICS_CONTENT_TYPE
    } else {
        METRICS_CONTENT_TYPE
    };
    (
        [(header::CONTENT_TYPE, content_type)],
        state.metrics.render(),
    )
}

/// Whether an `Accept` header lists `application/openmetrics-text` with a
/// non-zero quality.
fn accepts_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            media.eq_ignore_ascii_case("application/openmetrics-text")
                && !parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                })
        })
}

/// Body of `GET /api/v1/devices`.
#[derive(Debug, Serialize)]
pub(super) struct DevicesBody {
    devices: Vec<DeviceRecord>,
}

/// `GET /api/v1/devices`: every known device, ordered by id.
pub(super) async fn devices(State(state): State<ApiState>) -> Result<Json<DevicesBody>, ApiError> {
    let devices = state.query("devices", |r| r.devices()).await?;
    Ok(Json(DevicesBody { devices }))
}

/// `GET /api/v1/devices/:id`: one device with its last values and recent
/// gaps; 400 for an id that cannot exist, 404 for an unknown one.
pub(super) async fn device(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeviceDetail>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::bad_request(e.body_text()))?;
    validate_device_id(&id)
        .map_err(|e| ApiError::bad_request(format!("invalid device id: {e}")))?;
    let lookup = id.clone();
    match state.query("device", move |r| r.device(&lookup)).await? {
        Some(detail) => Ok(Json(detail)),
        None => Err(ApiError::not_found(format!("device `{id}` not found"))),
    }
}

/// Query string of `GET /api/v1/dead-letters`. Unknown keys are refused
/// (400), so a typo does not silently list everything.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct DeadLetterParams {
    /// How many to list, newest first ([`DEFAULT_DEAD_LETTER_LIMIT`];
    /// clamped to [`MAX_DEAD_LETTER_LIMIT`]).
    limit: Option<usize>,
    /// Only this reason; empty means all.
    reason: Option<String>,
}

/// Body of `GET /api/v1/dead-letters`.
#[derive(Debug, Serialize)]
pub(super) struct DeadLettersBody {
    /// The limit applied (after clamping).
    limit: usize,
    /// Count of every dead letter stored, by reason (not filtered).
    counts: BTreeMap<String, u64>,
    /// Newest first.
    dead_letters: Vec<DeadLetterRecord>,
}

/// `GET /api/v1/dead-letters?limit=&reason=`.
pub(super) async fn dead_letters(
    State(state): State<ApiState>,
    params: Result<Query<DeadLetterParams>, QueryRejection>,
) -> Result<Json<DeadLettersBody>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = params
        .limit
        .unwrap_or(DEFAULT_DEAD_LETTER_LIMIT)
        .min(MAX_DEAD_LETTER_LIMIT);
    let reason = params.reason.filter(|r| !r.is_empty());
    let (dead_letters, counts) = state
        .query("dead_letters", move |r| {
            Ok((
                r.dead_letters(limit, reason.as_deref())?,
                r.dead_letter_counts()?,
            ))
        })
        .await?;
    Ok(Json(DeadLettersBody {
        limit,
        counts,
        dead_letters,
    }))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn accept(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn openmetrics_is_served_only_when_asked_for() {
        // What Prometheus 2.x/3.x sends.
        assert!(accepts_openmetrics(&accept(&[
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ])));
        assert!(accepts_openmetrics(&accept(&[
            "text/plain",
            "Application/OpenMetrics-Text"
        ])));
        assert!(!accepts_openmetrics(&accept(&[])));
        assert!(!accepts_openmetrics(&accept(&["*/*"])));
        assert!(!accepts_openmetrics(&accept(&["text/plain;version=0.0.4"])));
        assert!(!accepts_openmetrics(&accept(&[
            "application/openmetrics-text; q=0"
        ])));
    }
}
