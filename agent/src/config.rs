//! The agent's TOML configuration: parsing, defaults and validation.
//!
//! Every table rejects unknown keys (a typo is an error, not a silently
//! ignored setting). [`Config::validate`] reports every problem at once, each
//! with its key path (`mqtt.port: must not be 0`). Secrets never reach logs:
//! [`MqttConfig`] has a hand-written `Debug`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::config_file::ConfigError;
use crate::config_file::{self, Validate};

use crate::buffer::BufferConfig;
use crate::sources::deadband::DeadbandConfig;
use crate::sources::SourceConfig;

/// Default MQTT port.
pub const DEFAULT_MQTT_PORT: u16 = 1883;
/// Default address of the metrics/health HTTP endpoint (loopback only).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9184";
/// Largest batch the publisher builds, in readings (the aggregator's payload
/// limit must allow it: 10,000 readings is about 100 KB).
pub const MAX_BATCH_READINGS: usize = 10_000;

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Who this gateway is.
    pub device: DeviceConfig,
    /// Broker connection.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// Local buffer.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// Batching of readings into MQTT messages.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Metrics and health endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Shutdown behaviour.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Sensor sources.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Per-sensor deadband (report by exception), keyed by sensor name.
    #[serde(default)]
    pub deadband: HashMap<String, DeadbandConfig>,
}

/// `[device]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DeviceConfig {
    /// Device id, `[A-Za-z0-9_.-]{1,64}`; also the default MQTT client id.
    pub id: String,
    /// Labels sent in the status message (site, zone, ...).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `[mqtt]`
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct MqttConfig {
    /// Broker host name or address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id; defaults to the device id. Must be stable: the session
    /// (`clean_session = false`) is tied to it.
    pub client_id: Option<String>,
    /// User name for the broker.
    pub username: Option<String>,
    /// Password for the broker (never logged).
    pub password: Option<String>,
    /// MQTT keep-alive.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Resend from the oldest unacknowledged reading when the aggregator's
    /// ack has not advanced for this long while batches are in flight.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Batches published and not yet acknowledged, at most.
    pub max_inflight_batches: usize,
    /// Interval of the periodic status message (besides birth and will).
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    /// Upper bound of the jittered exponential reconnect backoff.
    #[serde(with = "humantime_serde")]
    pub max_reconnect_backoff: Duration,
    /// TLS to the broker; plain TCP when absent.
    pub tls: Option<TlsConfig>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: DEFAULT_MQTT_PORT,
            client_id: None,
            username: None,
            password: None,
            keep_alive: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(30),
            max_inflight_batches: 8,
            status_interval: Duration::from_secs(60),
            max_reconnect_backoff: Duration::from_secs(30),
            tls: None,
        }
    }
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("keep_alive", &self.keep_alive)
            .field("ack_timeout", &self.ack_timeout)
            .field("max_inflight_batches", &self.max_inflight_batches)
            .field("status_interval", &self.status_interval)
            .field("max_reconnect_backoff", &self.max_reconnect_backoff)
            .field("tls", &self.tls)
            .finish()
    }
}

/// `[mqtt.tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate, for brokers that require mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key: Option<PathBuf>,
}

/// `[batch]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct BatchConfig {
    /// Readings per batch at most.
    pub max_readings: usize,
    /// How long a partial batch may wait for more readings before it is sent.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_readings: 500,
            linger: Duration::from_millis(200),
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct MetricsConfig {
    /// Address of `/metrics` and `/healthz`; empty string disables them.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: DEFAULT_METRICS_LISTEN.into(),
        }
    }
}

impl MetricsConfig {
    /// The parsed address, or None when disabled.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT: how long to wait for in-flight batches to be
    /// acknowledged before disconnecting (they stay buffered either way).
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: Duration::from_secs(5),
        }
    }
}

impl Validate for Config {
    fn problems(&self) -> Vec<String> {
        self.validate()
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        config_file::load(path)
    }

    /// Parses and validates config text; `path` is used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        config_file::parse(text, path)
    }

    /// Every problem in the configuration, each prefixed with its key path.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if let Err(err) = outpost_proto::topics::validate_device_id(&self.device.id) {
            e.push(format!("device.id: {err}"));
        }
        for (k, v) in &self.device.labels {
            if k.is_empty() || v.is_empty() {
                e.push(format!(
                    "device.labels.{k}: labels need a non-empty name and value"
                ));
            }
        }
        let m = &self.mqtt;
        if m.host.trim().is_empty() {
            e.push("mqtt.host: must not be empty".into());
        }
        if m.port == 0 {
            e.push("mqtt.port: must not be 0".into());
        }
        if let Some(id) = &m.client_id {
            if id.is_empty() || id.len() > 256 {
                e.push("mqtt.client-id: must be 1 to 256 characters".into());
            }
        }
        if m.password.is_some() && m.username.is_none() {
            e.push("mqtt.password: set mqtt.username too".into());
        }
        if m.keep_alive < Duration::from_secs(5) || m.keep_alive > Duration::from_secs(65_535) {
            e.push("mqtt.keep-alive: must be between 5s and 65535s".into());
        }
        if m.ack_timeout < Duration::from_secs(1) {
            e.push("mqtt.ack-timeout: must be at least 1s".into());
        }
        if m.max_inflight_batches == 0 || m.max_inflight_batches > 1000 {
            e.push("mqtt.max-inflight-batches: must be between 1 and 1000".into());
        }
        if m.status_interval < Duration::from_secs(1) {
            e.push("mqtt.status-interval: must be at least 1s".into());
        }
        if m.max_reconnect_backoff < Duration::from_millis(100) {
            e.push("mqtt.max-reconnect-backoff: must be at least 100ms".into());
        }
        if let Some(tls) = &m.tls {
            if tls.client_cert.is_some() != tls.client_key.is_some() {
                e.push("mqtt.tls: client-cert and client-key go together".into());
            }
            for (key, p) in [
                ("ca-file", Some(&tls.ca_file)),
                ("client-cert", tls.client_cert.as_ref()),
                ("client-key", tls.client_key.as_ref()),
            ] {
                if let Some(p) = p {
                    if !p.is_file() {
                        e.push(format!(
                            "mqtt.tls.{key}: {} is not a readable file",
                            p.display()
                        ));
                    }
                }
            }
        }
        self.buffer.validate("buffer", &mut e);
        if self.batch.max_readings == 0 || self.batch.max_readings > MAX_BATCH_READINGS {
            e.push(format!(
                "batch.max-readings: must be between 1 and {MAX_BATCH_READINGS}"
            ));
        }
        if self.batch.linger > Duration::from_secs(60) {
            e.push("batch.linger: must be at most 60s".into());
        }
        if !self.metrics.listen.is_empty() && self.metrics.addr().is_none() {
            e.push(format!(
                "metrics.listen: {:?} is not an address like 127.0.0.1:9184",
                self.metrics.listen
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            let key = format!("sources[{i}]");
            if !names.insert(s.name().to_owned()) {
                e.push(format!(
                    "{key}.name: {:?} is used by another source",
                    s.name()
                ));
            }
            s.validate(&key, &mut e);
        }
        for (sensor, d) in &self.deadband {
            if !(d.delta.is_finite() && d.delta >= 0.0) {
                e.push(format!(
                    "deadband.{sensor}.delta: must be a finite number >= 0"
                ));
            }
        }
        e
    }

    /// The MQTT client id (explicit, or the device id).
    pub fn client_id(&self) -> &str {
        self.mqtt.client_id.as_deref().unwrap_or(&self.device.id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_is_valid() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.toml"));
        let c = Config::load(path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.device.id, "pumphouse-07");
        assert_eq!(c.sources.len(), 3);
        assert_eq!(c.client_id(), "pumphouse-07");
    }

    #[test]
    fn minimal_config_gets_working_defaults() {
        let c = Config::parse("[device]\nid = \"gw\"\n", Path::new("x.toml")).unwrap();
        assert_eq!(c.mqtt.port, DEFAULT_MQTT_PORT);
        assert_eq!(c.batch.max_readings, 500);
        assert_eq!(c.metrics.listen, DEFAULT_METRICS_LISTEN);
    }

    #[test]
    fn every_problem_is_reported_with_its_key_path() {
        let text = r#"
[device]
id = "bad id"
[mqtt]
port = 0
password = "secret"
max-inflight-batches = 0
[batch]
max-readings = 0
[metrics]
listen = "nowhere"
"#;
        let err = Config::parse(text, Path::new("agent.toml")).unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}")
        };
        for key in [
            "device.id",
            "mqtt.port",
            "mqtt.password",
            "mqtt.max-inflight-batches",
            "batch.max-readings",
            "metrics.listen",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(key)),
                "{key} missing in {problems:?}"
            );
        }
        assert!(
            !err.to_string().contains("secret"),
            "secrets never in messages"
        );
    }

    #[test]
    fn unknown_keys_are_errors_with_a_location() {
        let err = Config::parse(
            "[device]\nid = \"gw\"\n[mqtt]\nhots = \"x\"\n",
            Path::new("a.toml"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("hots") && msg.contains("line 4"), "{msg}");
    }

    #[test]
    fn debug_output_redacts_the_password() {
        let c = Config::parse(
            "[device]\nid = \"gw\"\n[mqtt]\nusername = \"u\"\npassword = \"hunter2\"\n",
            Path::new("a.toml"),
        )
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2") && dbg.contains("<redacted>"));
    }
}
