//! `type = "alertmanager"`: every notification becomes one alert posted to
//! a Prometheus Alertmanager (`POST {url}/api/v2/alerts`, API v2
//! `postableAlerts`), so Outpost alerts are silenced, grouped, inhibited
//! and routed like Prometheus' own.
//!
//! # Mapping
//!
//! ```text
//! labels       n.labels, then alertname = rule, device, sensor (when not
//!              empty), severity (these four win over a label of that name)
//! annotations  summary, value, threshold (when present), outpost_id = n.id
//! startsAt     active_since (event time when absent)
//! endsAt       firing:   max(now, startsAt) + 4 x repeat-interval
//!              resolved: the resolve's event time (not before startsAt)
//! generatorURL the configured generator-url, when set
//! ```
//!
//! * **Identity.** Alertmanager identifies an alert by the hash of its
//!   labels. Our fingerprint hashes rule, device, sensor and labels: the
//!   same inputs, so one Outpost alert is one Alertmanager alert, its
//!   repeats and its resolve update that alert, and no fingerprint label is
//!   needed (it would only duplicate the information). The notification id
//!   is kept as the `outpost_id` annotation, which does not take part in
//!   the identity.
//! * **Label names.** Alertmanager 0.25 accepts only `[a-zA-Z_][a-zA-Z0-9_]*`
//!   and answers 400 otherwise; our rules also allow `.` and `-`. Every other
//!   character becomes `_` (and a leading digit gets a `_` in front). If two
//!   names become equal, the first in name order wins. Empty values are left
//!   out (Alertmanager treats them as absent).
//! * **Firing alerts time out like Prometheus'.** `endsAt` is set
//!   4 x `repeat-interval` ahead and the delivery worker re-posts a firing
//!   alert every `repeat-interval` (1 min by default), so the alert stays
//!   active while we keep sending and resolves by itself only if the
//!   aggregator stops for that long. A device clock ahead of ours cannot
//!   make `endsAt` fall before `startsAt` (which Alertmanager refuses).
//! * **Resolving** posts the same labels with `endsAt` = the resolve's event
//!   time; Alertmanager takes the explicit end time of a resolved alert
//!   over the earlier firing one, and no longer lists it as active.
//! * Any 2xx confirms the delivery; anything else is an error quoting the
//!   status and the start of the body (Alertmanager explains a 400 there).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::config::AlertmanagerConfig;
use super::http::{status_error, HttpClient};
use super::template::rfc3339_ms;
use super::{AlertSink, BuildError, Notification, SendError, SendFuture};
use crate::rules::model::AlertState;

/// Path of the Alertmanager API v2 endpoint alerts are posted to.
pub const ALERTS_PATH: &str = "/api/v2/alerts";
/// A firing alert's `endsAt` is this many repeat intervals ahead (as
/// Prometheus does with its evaluation interval).
pub const ENDS_AT_REPEATS: u32 = 4;

/// Posts notifications to one Alertmanager.
pub struct AlertmanagerSink {
    name: String,
    endpoint: String,
    headers: Vec<(String, String)>,
    generator_url: Option<String>,
    timeout: Duration,
    repeat_interval: Duration,
    client: HttpClient,
}

impl fmt::Debug for AlertmanagerSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertmanagerSink")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .field(
                "headers",
                &self.headers.iter().map(|h| &h.0).collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .field("repeat_interval", &self.repeat_interval)
            .finish_non_exhaustive()
    }
}

impl AlertmanagerSink {
    /// The sink `name` for `cfg`; each attempt is cut off after `timeout`;
    /// firing alerts are re-posted every `repeat_interval` by the delivery
    /// worker (which sets their `endsAt`). Fails when the CA file cannot be
    /// used.
    pub fn new(
        name: &str,
        cfg: &AlertmanagerConfig,
        timeout: Duration,
        repeat_interval: Duration,
    ) -> Result<AlertmanagerSink, BuildError> {
        let client = HttpClient::new(name, cfg.ca_file.as_deref())?;
        Ok(AlertmanagerSink {
            name: name.to_owned(),
            endpoint: format!("{}{ALERTS_PATH}", cfg.url.trim_end_matches('/')),
            headers: cfg
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            generator_url: cfg.generator_url.clone(),
            timeout,
            repeat_interval,
            client,
        })
    }

    async fn post(&self, n: &Notification) -> Result<(), SendError> {
        let alert = postable_alert(
            n,
            now_ms(),
            self.repeat_interval,
            self.generator_url.as_deref(),
        );
        let body = serde_json::to_vec(&[alert])
            .map_err(|e| SendError::new(format!("encoding the alert: {e}")))?;
        let (status, text) = self
            .client
            .post_json(&self.endpoint, &self.headers, body, self.timeout)
            .await?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(status_error(status, &text))
        }
    }
}

impl AlertSink for AlertmanagerSink {
    fn send<'a>(&'a self, n: &'a Notification) -> SendFuture<'a> {
        Box::pin(self.post(n))
    }
}

/// One element of Alertmanager's `postableAlerts`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct PostableAlert {
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    starts_at: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    ends_at: String,
    #[serde(rename = "generatorURL", skip_serializing_if = "Option::is_none")]
    generator_url: Option<String>,
}

/// The alert for `n` sent at `now_ms` (see the module comment).
fn postable_alert(
    n: &Notification,
    now_ms: i64,
    repeat_interval: Duration,
    generator_url: Option<&str>,
) -> PostableAlert {
    let mut labels = BTreeMap::new();
    for (k, v) in &n.labels {
        if !v.is_empty() {
            labels.entry(label_name(k)).or_insert_with(|| v.clone());
        }
    }
    labels.insert("alertname".to_owned(), n.rule.clone());
    labels.insert("device".to_owned(), n.device.clone());
    if !n.sensor.is_empty() {
        labels.insert("sensor".to_owned(), n.sensor.clone());
    }
    labels.insert("severity".to_owned(), n.severity_name().to_owned());

    let mut annotations = BTreeMap::new();
    annotations.insert("summary".to_owned(), n.summary.clone());
    if let Some(v) = n.value {
        annotations.insert("value".to_owned(), format!("{v}"));
    }
    if let Some(t) = n.threshold {
        annotations.insert("threshold".to_owned(), format!("{t}"));
    }
    annotations.insert("outpost_id".to_owned(), n.id.clone());

    let starts_ms = n.active_since_ms.unwrap_or(n.event_time_ms).max(0);
    let ends_ms = match n.state {
        AlertState::Resolved => n.event_time_ms.max(starts_ms),
        // Pending is never notified; should one arrive, it is not a resolve.
        AlertState::Firing | AlertState::Pending => {
            let ahead = repeat_interval.saturating_mul(ENDS_AT_REPEATS);
            let ahead_ms = i64::try_from(ahead.as_millis()).unwrap_or(i64::MAX);
            now_ms.max(starts_ms).saturating_add(ahead_ms)
        }
    };
    PostableAlert {
        labels,
        annotations,
        starts_at: rfc3339_ms(starts_ms),
        ends_at: rfc3339_ms(ends_ms),
        generator_url: generator_url.map(str::to_owned),
    }
}

/// `name` as an Alertmanager 0.25 label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
fn label_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::rules::model::Severity;

    const MIN: Duration = Duration::from_secs(60);

    fn n(state: AlertState) -> Notification {
        Notification {
            schema: super::super::SCHEMA.into(),
            id: "abc-3".into(),
            fingerprint: "abc".into(),
            number: 3,
            repeat: 0,
            state,
            rule: "boiler-overheat".into(),
            device: "gw-1".into(),
            sensor: "temp".into(),
            severity: Severity::Critical,
            labels: [
                ("site".to_owned(), "north".to_owned()),
                ("alertname".to_owned(), "mine".to_owned()),
                ("zone.name".to_owned(), "a".to_owned()),
                ("zone_name".to_owned(), "b".to_owned()),
                ("9lives".to_owned(), "c".to_owned()),
                ("empty".to_owned(), String::new()),
            ]
            .into(),
            summary: "temp 91.5 > 90".into(),
            value: Some(91.5),
            threshold: Some(90.0),
            event_time_ms: 1_700_000_000_123,
            processing_time_ms: 1_700_000_000_200,
            active_since_ms: Some(1_700_000_000_000),
            queued_ms: 1_700_000_000_250,
            history_id: 7,
        }
    }

    #[test]
    fn a_firing_alert_has_our_labels_annotations_and_ends_four_repeats_ahead() {
        let now = 1_700_000_100_000;
        let a = postable_alert(&n(AlertState::Firing), now, MIN, Some("http://x/y"));
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "labels": {
                    "alertname": "boiler-overheat",
                    "device": "gw-1",
                    "sensor": "temp",
                    "severity": "critical",
                    "site": "north",
                    "zone_name": "a",
                    "_9lives": "c",
                },
                "annotations": {
                    "summary": "temp 91.5 > 90",
                    "value": "91.5",
                    "threshold": "90",
                    "outpost_id": "abc-3",
                },
                "startsAt": "2023-11-14T22:13:20.000Z",
                "endsAt": "2023-11-14T22:19:00.000Z",
                "generatorURL": "http://x/y",
            })
        );
    }

    #[test]
    fn a_resolved_alert_ends_at_its_event_time_never_before_it_started() {
        let mut r = n(AlertState::Resolved);
        r.sensor.clear();
        r.value = None;
        r.threshold = None;
        let a = postable_alert(&r, 1_800_000_000_000, MIN, None);
        assert_eq!(a.ends_at, "2023-11-14T22:13:20.123Z");
        assert!(!a.labels.contains_key("sensor"));
        assert!(!a.annotations.contains_key("value"));
        let json = serde_json::to_value(&a).unwrap();
        assert!(json.get("generatorURL").is_none());
        r.event_time_ms = r.active_since_ms.unwrap() - 5_000;
        assert_eq!(
            postable_alert(&r, 0, MIN, None).ends_at,
            "2023-11-14T22:13:20.000Z"
        );
    }

    #[test]
    fn a_device_clock_ahead_does_not_put_the_end_before_the_start() {
        let f = n(AlertState::Firing);
        let a = postable_alert(&f, 1_000, MIN, None);
        assert_eq!(a.starts_at, "2023-11-14T22:13:20.000Z");
        assert_eq!(a.ends_at, "2023-11-14T22:17:20.000Z");
        let mut old = f.clone();
        old.active_since_ms = None;
        old.event_time_ms = -5;
        let a = postable_alert(&old, 0, MIN, None);
        assert_eq!(a.starts_at, "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn label_names_are_made_valid_for_alertmanager() {
        assert_eq!(label_name("site"), "site");
        assert_eq!(label_name("a.b-c"), "a_b_c");
        assert_eq!(label_name("1x"), "_1x");
        assert_eq!(label_name(""), "_");
        assert_eq!(label_name("é"), "_");
    }

    #[test]
    fn the_endpoint_and_debug_output() {
        let cfg = AlertmanagerConfig {
            url: "http://127.0.0.1:9093/".to_owned(),
            headers: [("Authorization".to_owned(), "Bearer t0p".to_owned())].into(),
            ca_file: None,
            generator_url: None,
        };
        let s = AlertmanagerSink::new("am", &cfg, MIN, MIN).unwrap();
        assert_eq!(s.endpoint, "http://127.0.0.1:9093/api/v2/alerts");
        let d = format!("{s:?}");
        assert!(d.contains("Authorization") && !d.contains("t0p"), "{d}");
    }
}
