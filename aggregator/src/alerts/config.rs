//! `[alerts]`: sinks, routes and delivery options.
//!
//! ```toml
//! [alerts]
//! default-sinks = ["log"]          # where alerts no route matched go
//!
//! [[alerts.sink]]
//! name = "ops"                     # unique; [a-z0-9_-]
//! type = "webhook"                 # log | webhook | mqtt | alertmanager | email
//! url = "https://hooks.example.com/outpost"
//! secret = "..."                   # HMAC-SHA256 signing key
//! send-resolved = true
//! repeat-interval = "4h"           # re-notify while firing (off by default)
//! max-age = "24h"                  # then dead-letter
//!
//! [[alerts.route]]
//! severity = ["critical"]
//! labels = { site = "north" }
//! sinks = ["ops"]
//! continue = false
//! ```
//!
//! A sink is one flat table: the common keys ([`Delivery`]) and the keys of
//! its `type`, each set rejecting unknown keys. A sink named `log` of type
//! `log` exists even when not configured.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::rules::model::Severity;

/// Name of the implicit log sink.
pub const LOG_SINK: &str = "log";
/// Default time a notification may stay undelivered before it is
/// dead-lettered.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Default first retry delay (doubles per failed attempt, with jitter).
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Default longest retry delay.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(300);
/// Default time one delivery attempt may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of alerts a sink sends at the same time.
pub const DEFAULT_PARALLEL: usize = 4;
/// Default re-post interval of the Alertmanager sink (Prometheus re-sends
/// every minute; Alertmanager resolves an alert that is not re-posted).
pub const DEFAULT_ALERTMANAGER_REPEAT: Duration = Duration::from_secs(60);
/// Default MQTT topic prefix of the MQTT sink.
pub const DEFAULT_MQTT_TOPIC_PREFIX: &str = "outpost/v1/alerts";

/// A secret string (signing key, password): never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// A secret with this value.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The value, for the code that uses it (never log it).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `[alerts]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AlertsConfig {
    /// Sinks of alerts no route matched.
    pub default_sinks: Vec<String>,
    /// `[[alerts.sink]]`
    pub sink: Vec<SinkConfig>,
    /// `[[alerts.route]]`, tried in order.
    pub route: Vec<RouteConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            default_sinks: vec![LOG_SINK.to_owned()],
            sink: Vec::new(),
            route: Vec::new(),
        }
    }
}

/// `[[alerts.route]]`: every condition given must hold; an empty list
/// matches everything.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RouteConfig {
    /// Any of these severities.
    pub severity: Vec<Severity>,
    /// Rule name globs (`*`, `?`); any may match.
    pub rule: Vec<String>,
    /// Device id globs; any may match.
    pub device: Vec<String>,
    /// Label name -> value (`*`: present with any value); all must hold.
    pub labels: BTreeMap<String, String>,
    /// Sinks the alert goes to when this route matches.
    pub sinks: Vec<String>,
    /// Keep trying the following routes after a match (default: stop).
    #[serde(rename = "continue")]
    pub continue_: bool,
}

/// Delivery options every sink has.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Delivery {
    /// Also notify when an alert resolves.
    pub send_resolved: bool,
    /// Re-notify this often while an alert stays firing (off when unset;
    /// 1m for Alertmanager).
    #[serde(with = "humantime_serde")]
    pub repeat_interval: Option<Duration>,
    /// A notification not delivered this long after it was queued is
    /// dead-lettered.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// First retry delay; doubles per failed attempt (full jitter).
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Longest time one attempt may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Alerts sent at the same time (one alert's notifications are always
    /// sent one after the other, in order).
    pub parallel: usize,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            send_resolved: true,
            repeat_interval: None,
            max_age: DEFAULT_MAX_AGE,
            retry_initial: DEFAULT_RETRY_INITIAL,
            retry_max: DEFAULT_RETRY_MAX,
            timeout: DEFAULT_TIMEOUT,
            parallel: DEFAULT_PARALLEL,
        }
    }
}

/// Keys of [`Delivery`] (taken out of a sink table before its type's keys
/// are read).
const DELIVERY_KEYS: &[&str] = &[
    "send-resolved",
    "repeat-interval",
    "max-age",
    "retry-initial",
    "retry-max",
    "timeout",
    "parallel",
];

/// `[[alerts.sink]]`
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Unique name (routes refer to it; metrics and the outbox show it).
    pub name: String,
    /// Common options.
    pub delivery: Delivery,
    /// What it is.
    pub kind: SinkKind,
}

/// The sink types and their own keys.
#[derive(Debug, Clone)]
pub enum SinkKind {
    /// `type = "log"`
    Log,
    /// `type = "webhook"`
    Webhook(WebhookConfig),
    /// `type = "mqtt"`
    Mqtt(MqttSinkConfig),
    /// `type = "alertmanager"`
    Alertmanager(AlertmanagerConfig),
    /// `type = "email"`
    Email(EmailConfig),
}

impl SinkKind {
    /// The `type` name.
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkKind::Log => "log",
            SinkKind::Webhook(_) => "webhook",
            SinkKind::Mqtt(_) => "mqtt",
            SinkKind::Alertmanager(_) => "alertmanager",
            SinkKind::Email(_) => "email",
        }
    }
}

/// `type = "webhook"`: `POST url` with the JSON [`super::Notification`].
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WebhookConfig {
    /// `http://` or `https://` URL.
    pub url: String,
    /// When set, `X-Outpost-Signature: sha256=HEX(HMAC-SHA256(secret,
    /// "{timestamp}.{body}"))` with `X-Outpost-Timestamp: {timestamp}`.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// Extra request headers (e.g. an `Authorization` the receiver wants).
    /// Values are not logged.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// PEM file of CA certificates to trust instead of the system's (for
    /// `https://` to a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL's path and query often carry a token: only scheme and host.
        let shown = self
            .url
            .split_once("://")
            .map(|(scheme, rest)| {
                let host = rest.split(['/', '?', '#']).next().unwrap_or("");
                let host = host.rsplit('@').next().unwrap_or(host);
                format!("{scheme}://{host}/...")
            })
            .unwrap_or_else(|| "<invalid>".to_owned());
        f.debug_struct("WebhookConfig")
            .field("url", &shown)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// `type = "mqtt"`: JSON [`super::Notification`] at QoS 1 on
/// `{topic-prefix}/{severity}/{rule}`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MqttSinkConfig {
    /// Broker host; default: the aggregator's own broker (the embedded
    /// listener on loopback, or the external broker).
    #[serde(default)]
    pub host: Option<String>,
    /// Broker port; default as `host`.
    #[serde(default)]
    pub port: Option<u16>,
    /// Client id; default `outpost-alerts-{sink name}`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name, if the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Topic prefix (default [`DEFAULT_MQTT_TOPIC_PREFIX`]).
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// Publish retained (the last notification per rule and severity stays
    /// on the broker).
    #[serde(default)]
    pub retain: bool,
}

fn default_topic_prefix() -> String {
    DEFAULT_MQTT_TOPIC_PREFIX.to_owned()
}

impl fmt::Debug for MqttSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSinkConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("topic_prefix", &self.topic_prefix)
            .field("retain", &self.retain)
            .finish()
    }
}

/// `type = "alertmanager"`: `POST {url}/api/v2/alerts`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AlertmanagerConfig {
    /// Base URL of the Alertmanager, e.g. `http://127.0.0.1:9093`.
    pub url: String,
    /// Extra request headers (e.g. `Authorization` for a proxy in front).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// PEM CA file for `https://` to a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `generatorURL` of the alerts (a link back to the aggregator's API).
    #[serde(default)]
    pub generator_url: Option<String>,
}

impl fmt::Debug for AlertmanagerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertmanagerConfig")
            .field("url", &self.url)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("ca_file", &self.ca_file)
            .field("generator_url", &self.generator_url)
            .finish()
    }
}

/// How the e-mail sink secures its SMTP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SmtpTls {
    /// Plain connection, then STARTTLS, required (default; port 587).
    Starttls,
    /// STARTTLS when the server offers it, plain otherwise.
    Opportunistic,
    /// TLS from the first byte (SMTPS, port 465).
    Tls,
    /// No TLS at all (a local relay only).
    None,
}

/// `type = "email"`: one message per notification over SMTP.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EmailConfig {
    /// SMTP server.
    pub host: String,
    /// Port; default 587 (starttls, opportunistic), 465 (tls), 25 (none).
    #[serde(default)]
    pub port: Option<u16>,
    /// Connection security (default `starttls`).
    #[serde(default = "default_smtp_tls")]
    pub tls: SmtpTls,
    /// User name for SMTP AUTH.
    #[serde(default)]
    pub username: Option<String>,
    /// Password for SMTP AUTH.
    #[serde(default)]
    pub password: Option<Secret>,
    /// `From:` address.
    pub from: String,
    /// Recipients.
    pub to: Vec<String>,
    /// Subject template (see [`super::template`]).
    #[serde(default = "default_subject")]
    pub subject: String,
    /// Body template (plain text).
    #[serde(default = "default_body")]
    pub body: String,
    /// PEM CA file for a server with a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_smtp_tls() -> SmtpTls {
    SmtpTls::Starttls
}

/// Default e-mail subject template.
pub const DEFAULT_EMAIL_SUBJECT: &str = "[{state}] {severity}: {rule} on {device}: {summary}";
/// Default e-mail body template.
pub const DEFAULT_EMAIL_BODY: &str = "Alert {rule} is {state} on device {device}.\n\n\
{summary}\n\n\
Severity:  {severity}\n\
Sensor:    {sensor}\n\
Value:     {value}\n\
Threshold: {threshold}\n\
Event time: {event_time}\n\
Active since: {active_since}\n\
Labels:    {labels}\n\n\
Notification id: {id}\n";

fn default_subject() -> String {
    DEFAULT_EMAIL_SUBJECT.to_owned()
}

fn default_body() -> String {
    DEFAULT_EMAIL_BODY.to_owned()
}

impl fmt::Debug for EmailConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("from", &self.from)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

impl EmailConfig {
    /// The port to connect to.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            SmtpTls::Starttls | SmtpTls::Opportunistic => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        })
    }
}

impl<'de> Deserialize<'de> for SinkConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(d)?;
        let name = match table.remove("name") {
            Some(toml::Value::String(s)) => s,
            Some(_) => return Err(D::Error::custom("`name` must be a string")),
            None => return Err(D::Error::custom("missing field `name`")),
        };
        let ty = match table.remove("type") {
            Some(toml::Value::String(s)) => s,
            Some(_) => {
                return Err(D::Error::custom(format!(
                    "sink {name:?}: `type` must be a string"
                )))
            }
            None => {
                return Err(D::Error::custom(format!(
                    "sink {name:?}: missing field `type` (log, webhook, mqtt, alertmanager, email)"
                )))
            }
        };
        let mut common = toml::Table::new();
        for k in DELIVERY_KEYS {
            if let Some(v) = table.remove(*k) {
                common.insert((*k).to_owned(), v);
            }
        }
        let at = |e: toml::de::Error| D::Error::custom(format!("sink {name:?}: {}", e.message()));
        let mut delivery: Delivery = common.try_into().map_err(at)?;
        let kind = match ty.as_str() {
            "log" => {
                if let Some(k) = table.keys().next() {
                    return Err(D::Error::custom(format!(
                        "sink {name:?}: unknown field `{k}` for type \"log\""
                    )));
                }
                SinkKind::Log
            }
            "webhook" => SinkKind::Webhook(table.try_into().map_err(at)?),
            "mqtt" => SinkKind::Mqtt(table.try_into().map_err(at)?),
            "alertmanager" => {
                if delivery.repeat_interval.is_none() {
                    delivery.repeat_interval = Some(DEFAULT_ALERTMANAGER_REPEAT);
                }
                SinkKind::Alertmanager(table.try_into().map_err(at)?)
            }
            "email" => SinkKind::Email(table.try_into().map_err(at)?),
            other => {
                return Err(D::Error::custom(format!(
                "sink {name:?}: unknown type {other:?} (log, webhook, mqtt, alertmanager, email)"
            )))
            }
        };
        Ok(SinkConfig {
            name,
            delivery,
            kind,
        })
    }
}

fn valid_sink_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn check_url(key: &str, url: &str, e: &mut Vec<String>) {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') => {}
        _ => e.push(format!(
            "{key}: must be an http:// or https:// URL, got {url:?}"
        )),
    }
}

fn check_headers(key: &str, headers: &BTreeMap<String, String>, e: &mut Vec<String>) {
    for (k, v) in headers {
        if k.is_empty()
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            e.push(format!(
                "{key}: header name {k:?} is not a valid HTTP header name"
            ));
        }
        if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            e.push(format!(
                "{key}.{k}: header value must not contain CR, LF or NUL"
            ));
        }
    }
}

impl AlertsConfig {
    /// Every sink, the implicit `log` sink included.
    pub fn sinks(&self) -> Vec<SinkConfig> {
        let mut v = self.sink.clone();
        if !v.iter().any(|s| s.name == LOG_SINK) {
            v.push(SinkConfig {
                name: LOG_SINK.to_owned(),
                delivery: Delivery::default(),
                kind: SinkKind::Log,
            });
        }
        v
    }

    /// Appends every problem to `e`, each prefixed with its key path.
    pub fn validate(&self, key: &str, e: &mut Vec<String>) {
        let sinks = self.sinks();
        let known = |n: &str| sinks.iter().any(|s| s.name == n);
        let mut seen = std::collections::HashSet::new();
        for (i, s) in self.sink.iter().enumerate() {
            let k = format!("{key}.sink[{i}]");
            if !valid_sink_name(&s.name) {
                e.push(format!(
                    "{k}.name: {:?} must be 1-64 characters of a-z, 0-9, '-', '_'",
                    s.name
                ));
            }
            if !seen.insert(s.name.as_str()) {
                e.push(format!("{k}.name: {:?} is used by another sink", s.name));
            }
            if s.name == LOG_SINK && !matches!(s.kind, SinkKind::Log) {
                e.push(format!(
                    "{k}.name: \"log\" is reserved for a sink of type log"
                ));
            }
            let d = &s.delivery;
            if d.max_age < Duration::from_secs(1) {
                e.push(format!("{k}.max-age: must be at least 1s"));
            }
            if d.retry_initial < Duration::from_millis(10) {
                e.push(format!("{k}.retry-initial: must be at least 10ms"));
            }
            if d.retry_max < d.retry_initial {
                e.push(format!("{k}.retry-max: must be at least retry-initial"));
            }
            if d.timeout < Duration::from_millis(100) || d.timeout > Duration::from_secs(600) {
                e.push(format!("{k}.timeout: must be between 100ms and 10m"));
            }
            if d.parallel == 0 || d.parallel > 64 {
                e.push(format!("{k}.parallel: must be between 1 and 64"));
            }
            if let Some(r) = d.repeat_interval {
                if r < Duration::from_secs(1) {
                    e.push(format!("{k}.repeat-interval: must be at least 1s"));
                }
            }
            match &s.kind {
                SinkKind::Log => {}
                SinkKind::Webhook(w) => {
                    check_url(&format!("{k}.url"), &w.url, e);
                    check_headers(&format!("{k}.headers"), &w.headers, e);
                    if w.secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
                        e.push(format!(
                            "{k}.secret: must not be empty (leave it out to not sign)"
                        ));
                    }
                }
                SinkKind::Alertmanager(a) => {
                    check_url(&format!("{k}.url"), &a.url, e);
                    check_headers(&format!("{k}.headers"), &a.headers, e);
                    if !d.send_resolved {
                        e.push(format!(
                            "{k}.send-resolved: must be true for alertmanager (it would keep a resolved alert until it times out)"
                        ));
                    }
                }
                SinkKind::Mqtt(m) => {
                    if m.host.as_deref().is_some_and(str::is_empty) {
                        e.push(format!("{k}.host: must not be empty"));
                    }
                    if m.port == Some(0) {
                        e.push(format!("{k}.port: must not be 0"));
                    }
                    if m.topic_prefix.is_empty()
                        || m.topic_prefix.contains(['+', '#', '\0'])
                        || m.topic_prefix.ends_with('/')
                    {
                        e.push(format!(
                            "{k}.topic-prefix: must be a topic without wildcards or a trailing '/'"
                        ));
                    }
                }
                SinkKind::Email(m) => {
                    if m.host.is_empty() {
                        e.push(format!("{k}.host: must not be empty"));
                    }
                    if !m.from.contains('@') {
                        e.push(format!("{k}.from: {:?} is not an e-mail address", m.from));
                    }
                    if m.to.is_empty() {
                        e.push(format!("{k}.to: needs at least one recipient"));
                    }
                    for t in &m.to {
                        if !t.contains('@') {
                            e.push(format!("{k}.to: {t:?} is not an e-mail address"));
                        }
                    }
                    if m.password.is_some() && m.username.is_none() {
                        e.push(format!("{k}.username: needed with a password"));
                    }
                    for (field, t) in [("subject", &m.subject), ("body", &m.body)] {
                        if let Err(err) = super::template::Template::parse(t) {
                            e.push(format!("{k}.{field}: {err}"));
                        }
                    }
                }
            }
        }
        if self.default_sinks.is_empty() && self.route.is_empty() {
            e.push(format!(
                "{key}.default-sinks: must not be empty when there are no routes (alerts would go nowhere)"
            ));
        }
        for s in &self.default_sinks {
            if !known(s) {
                e.push(format!("{key}.default-sinks: no sink named {s:?}"));
            }
        }
        for (i, r) in self.route.iter().enumerate() {
            let k = format!("{key}.route[{i}]");
            if r.sinks.is_empty() {
                e.push(format!("{k}.sinks: must name at least one sink"));
            }
            for s in &r.sinks {
                if !known(s) {
                    e.push(format!("{k}.sinks: no sink named {s:?}"));
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AlertsConfig, String> {
        #[derive(Deserialize)]
        struct W {
            alerts: AlertsConfig,
        }
        let w: W = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut e = Vec::new();
        w.alerts.validate("alerts", &mut e);
        if e.is_empty() {
            Ok(w.alerts)
        } else {
            Err(e.join("\n"))
        }
    }

    #[test]
    fn a_flat_sink_table_with_common_and_own_keys() {
        let c = parse(
            r#"
            [alerts]
            default-sinks = ["ops"]
            [[alerts.sink]]
            name = "ops"
            type = "webhook"
            url = "http://127.0.0.1:9/hook"
            secret = "s3cret"
            max-age = "1h"
            send-resolved = false
            [[alerts.sink]]
            name = "am"
            type = "alertmanager"
            url = "http://127.0.0.1:9093"
            "#,
        )
        .unwrap();
        assert_eq!(c.sink.len(), 2);
        assert_eq!(c.sink[0].delivery.max_age, Duration::from_secs(3600));
        assert!(!c.sink[0].delivery.send_resolved);
        let SinkKind::Webhook(w) = &c.sink[0].kind else {
            panic!("not a webhook")
        };
        assert_eq!(w.secret.as_ref().unwrap().expose(), "s3cret");
        assert!(!format!("{:?}", c).contains("s3cret"));
        assert_eq!(
            c.sink[1].delivery.repeat_interval,
            Some(DEFAULT_ALERTMANAGER_REPEAT)
        );
        assert_eq!(c.sinks().len(), 3, "the implicit log sink is added");
    }

    #[test]
    fn unknown_keys_and_types_and_dangling_names_are_refused() {
        let e = parse(
            "[[alerts.sink]]\nname = \"x\"\ntype = \"webhook\"\nurl = \"http://a\"\nurll = 1\n",
        )
        .unwrap_err();
        assert!(e.contains("urll"), "{e}");
        let e = parse("[[alerts.sink]]\nname = \"x\"\ntype = \"pager\"\n").unwrap_err();
        assert!(e.contains("unknown type"), "{e}");
        let e = parse("[alerts]\ndefault-sinks = [\"nope\"]\n").unwrap_err();
        assert!(e.contains("no sink named \"nope\""), "{e}");
        let e = parse(
            "[[alerts.route]]\nsinks = [\"gone\"]\n[[alerts.sink]]\nname = \"Bad Name\"\ntype = \"log\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("alerts.route[0].sinks") && e.contains("alerts.sink[0].name"),
            "{e}"
        );
        let e = parse("[[alerts.sink]]\nname = \"w\"\ntype = \"webhook\"\nurl = \"ftp://x\"\n")
            .unwrap_err();
        assert!(e.contains("alerts.sink[0].url"), "{e}");
    }

    #[test]
    fn defaults_send_everything_to_the_log() {
        let c = parse("").unwrap_or_default();
        assert_eq!(c.default_sinks, vec!["log".to_owned()]);
        assert_eq!(c.sinks().len(), 1);
    }
}
