//! `[broker]`: the configuration of both broker modes, its defaults and its
//! validation. Every limit is a named constant here or a config key; secrets
//! (passwords) never reach `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default MQTT listener of the embedded broker.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:1883";
/// Default MQTT-over-TLS listener of the embedded broker (used only with
/// `tls`).
pub const DEFAULT_TLS_LISTEN: &str = "0.0.0.0:8883";
/// Default limit of simultaneous client connections (embedded).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Largest accepted `max-connections`.
pub const MAX_MAX_CONNECTIONS: usize = 1_000_000;
/// Default largest MQTT payload, both modes (a batch of 10,000 readings is
/// about 100 KB).
pub const DEFAULT_MAX_PAYLOAD_SIZE: usize = 1024 * 1024;
/// Smallest accepted `max-payload-size`.
pub const MIN_MAX_PAYLOAD_SIZE: usize = 1024;
/// Largest accepted `max-payload-size` (the MQTT limit is 256 MiB).
pub const MAX_MAX_PAYLOAD_SIZE: usize = 256 * 1024 * 1024;
/// Default size of one in-memory log segment per subscription filter
/// (embedded).
pub const DEFAULT_MAX_SEGMENT_SIZE: usize = 8 * 1024 * 1024;
/// Smallest accepted `max-segment-size` (rumqttd panics below 1 KiB).
pub const MIN_SEGMENT_SIZE: usize = 1024;
/// Largest accepted `max-segment-size`.
pub const MAX_SEGMENT_SIZE: usize = 1024 * 1024 * 1024;
/// Default number of log segments kept per subscription filter (embedded).
pub const DEFAULT_MAX_SEGMENT_COUNT: usize = 4;
/// Largest accepted `max-segment-count` (rumqttd panics below 1).
pub const MAX_SEGMENT_COUNT: usize = 1024;
/// Default time a new TCP connection has to send its MQTT CONNECT.
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `connection-timeout` (rumqttd stores it as u16 milliseconds).
pub const MAX_CONNECTION_TIMEOUT: Duration = Duration::from_millis(u16::MAX as u64);
/// Default external broker host.
pub const DEFAULT_HOST: &str = "127.0.0.1";
/// Default external broker port.
pub const DEFAULT_PORT: u16 = 1883;
/// Prefix of the default external client id; the partition index follows.
pub const DEFAULT_CLIENT_ID_PREFIX: &str = "outpost-aggregator-";
/// Default MQTT keep-alive towards an external broker.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Accepted keep-alive range (MQTT carries whole seconds in a u16).
pub const MIN_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// See [`MIN_KEEP_ALIVE`].
pub const MAX_KEEP_ALIVE: Duration = Duration::from_secs(u16::MAX as u64);
/// Default QoS of the aggregator's subscriptions on an external broker.
pub const DEFAULT_SUBSCRIBE_QOS: u8 = 1;
/// First reconnect delay towards an external broker; doubles (with jitter)
/// up to `max-reconnect-backoff`.
pub const MIN_RECONNECT_BACKOFF: Duration = Duration::from_millis(200);
/// Default ceiling of the reconnect delay.
pub const DEFAULT_MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(30);
/// Largest accepted `max-reconnect-backoff`.
pub const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(3600);

/// `[broker]`: where the aggregator's MQTT messages come from. The table is
/// internally tagged by `mode`; without a `[broker]` table the embedded
/// broker runs with its defaults.
///
/// ```toml
/// [broker]
/// mode = "embedded"          # or "external"
/// listen = "0.0.0.0:1883"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum BrokerConfig {
    /// rumqttd inside the aggregator process.
    Embedded(EmbeddedConfig),
    /// A client of an existing broker (Mosquitto, EMQX, HiveMQ).
    External(ExternalConfig),
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig::Embedded(EmbeddedConfig::default())
    }
}

impl BrokerConfig {
    /// Appends every problem to `errors`, each prefixed with its key path
    /// under `key` (e.g. `broker.partition.index: ...`).
    pub fn validate(&self, key: &str, errors: &mut Vec<String>) {
        match self {
            BrokerConfig::Embedded(c) => c.validate(key, errors),
            BrokerConfig::External(c) => c.validate(key, errors),
        }
    }

    /// `(index, count)` of this aggregator's device partition: `Some` in
    /// external mode (a count of 1 means it owns every device), `None` in
    /// embedded mode, where one aggregator owns every device. Filtering by
    /// partition is ingest's job; see [`super::partition_of`].
    pub fn partition(&self) -> Option<(u32, u32)> {
        match self {
            BrokerConfig::Embedded(_) => None,
            BrokerConfig::External(c) => Some((c.partition.index, c.partition.count)),
        }
    }
    /// Where a client on this machine reaches the broker: the embedded
    /// listener (loopback when it listens on every address), or the
    /// external broker. The MQTT alert sink's default.
    pub fn local_address(&self) -> (String, u16) {
        match self {
            BrokerConfig::Embedded(c) => {
                let ip = if c.listen.ip().is_unspecified() {
                    match c.listen {
                        std::net::SocketAddr::V4(_) => "127.0.0.1".to_owned(),
                        std::net::SocketAddr::V6(_) => "::1".to_owned(),
                    }
                } else {
                    c.listen.ip().to_string()
                };
                (ip, c.listen.port())
            }
            BrokerConfig::External(c) => (c.host.clone(), c.port),
        }
    }
}

/// `[broker] mode = "embedded"`: rumqttd in process.
///
/// Memory: rumqttd keeps, **per subscription filter**, an in-memory log of
/// at most `max-segment-count` segments of `max-segment-size` bytes
/// (payload + topic + 4 per message). A filter's log grows with traffic to
/// that budget and stays there (the RSS does not shrink back), then the
/// oldest segment is dropped; a consumer more than one budget behind loses
/// those messages (rumqttd logs a WARN "cursor jumped"). With the defaults
/// (8 MiB x 4) the telemetry filter and the status filter cost up to 32 MiB
/// each; every other distinct filter a client subscribes to (e.g. an
/// operator's `#`) costs the same again. Per-device ack filters use a small
/// fixed budget ([`super::embedded::ACK_SEGMENT_SIZE`] x
/// [`super::embedded::ACK_SEGMENT_COUNT`]).
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct EmbeddedConfig {
    /// MQTT (3.1.1) listener. Default [`DEFAULT_LISTEN`]. Port 0 is refused:
    /// rumqttd does not report the port it bound.
    pub listen: SocketAddr,
    /// Simultaneous client connections. Default [`DEFAULT_MAX_CONNECTIONS`].
    /// Past it rumqttd closes new connections without a CONNACK.
    pub max_connections: usize,
    /// Largest MQTT packet payload a client may send; a larger one closes
    /// its connection. Default [`DEFAULT_MAX_PAYLOAD_SIZE`].
    pub max_payload_size: usize,
    /// Bytes per in-memory log segment per subscription filter. Default
    /// [`DEFAULT_MAX_SEGMENT_SIZE`]; see the type's memory note.
    pub max_segment_size: usize,
    /// Segments kept per subscription filter. Default
    /// [`DEFAULT_MAX_SEGMENT_COUNT`]. `max-segment-size x max-segment-count`
    /// is the per-filter memory budget.
    pub max_segment_count: usize,
    /// Time a new connection has to send its CONNECT. Default
    /// [`DEFAULT_CONNECTION_TIMEOUT`], at most 65.535 s.
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
    /// MQTT-over-TLS listener, used only when `tls` is set. Default
    /// [`DEFAULT_TLS_LISTEN`].
    pub tls_listen: SocketAddr,
    /// TLS for the `tls-listen` listener. Not built in yet: a config with
    /// `tls` is reported as invalid (see [`super::BrokerError::TlsNotBuilt`]).
    pub tls: Option<EmbeddedTlsConfig>,
    /// Static `user = "password"` logins. Empty (the default): anonymous
    /// clients are accepted. Otherwise every client must log in; rumqttd
    /// closes a rejected login without a CONNACK return code.
    pub users: BTreeMap<String, String>,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_payload_size: DEFAULT_MAX_PAYLOAD_SIZE,
            max_segment_size: DEFAULT_MAX_SEGMENT_SIZE,
            max_segment_count: DEFAULT_MAX_SEGMENT_COUNT,
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            tls_listen: SocketAddr::from(([0, 0, 0, 0], 8883)),
            tls: None,
            users: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for EmbeddedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedConfig")
            .field("listen", &self.listen)
            .field("max_connections", &self.max_connections)
            .field("max_payload_size", &self.max_payload_size)
            .field("max_segment_size", &self.max_segment_size)
            .field("max_segment_count", &self.max_segment_count)
            .field("connection_timeout", &self.connection_timeout)
            .field("tls_listen", &self.tls_listen)
            .field("tls", &self.tls)
            // Names only: passwords never reach logs.
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl EmbeddedConfig {
    /// Per-filter memory budget in bytes (`max-segment-size x
    /// max-segment-count`).
    pub fn filter_budget(&self) -> usize {
        self.max_segment_size.saturating_mul(self.max_segment_count)
    }

    fn validate(&self, key: &str, e: &mut Vec<String>) {
        if self.listen.port() == 0 {
            e.push(format!(
                "{key}.listen: port 0 is not supported (rumqttd does not report the port it bound)"
            ));
        }
        if !(1..=MAX_MAX_CONNECTIONS).contains(&self.max_connections) {
            e.push(format!(
                "{key}.max-connections: must be between 1 and {MAX_MAX_CONNECTIONS}"
            ));
        }
        check_payload_size(key, self.max_payload_size, e);
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&self.max_segment_size) {
            e.push(format!(
                "{key}.max-segment-size: must be between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE} bytes"
            ));
        }
        if !(1..=MAX_SEGMENT_COUNT).contains(&self.max_segment_count) {
            e.push(format!(
                "{key}.max-segment-count: must be between 1 and {MAX_SEGMENT_COUNT}"
            ));
        }
        if self.connection_timeout < Duration::from_millis(1)
            || self.connection_timeout > MAX_CONNECTION_TIMEOUT
        {
            e.push(format!(
                "{key}.connection-timeout: must be between 1ms and {}ms",
                MAX_CONNECTION_TIMEOUT.as_millis()
            ));
        }
        if let Some(tls) = &self.tls {
            check_file(&format!("{key}.tls.cert-file"), &tls.cert_file, e);
            check_file(&format!("{key}.tls.key-file"), &tls.key_file, e);
            if let Some(ca) = &tls.ca_file {
                check_file(&format!("{key}.tls.ca-file"), ca, e);
            }
            if self.tls_listen == self.listen {
                e.push(format!(
                    "{key}.tls-listen: must differ from {key}.listen ({})",
                    self.listen
                ));
            }
            if self.tls_listen.port() == 0 {
                e.push(format!("{key}.tls-listen: port 0 is not supported"));
            }
            e.push(format!("{key}.tls: {}", super::BrokerError::TlsNotBuilt));
        }
        for name in self.users.keys() {
            if name.is_empty() {
                e.push(format!("{key}.users: a user name must not be empty"));
            }
        }
    }
}

/// `[broker.tls]` of the embedded broker (PEM files).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EmbeddedTlsConfig {
    /// Server certificate chain.
    pub cert_file: PathBuf,
    /// Server private key.
    pub key_file: PathBuf,
    /// CA for client certificates (mutual TLS), if any.
    pub ca_file: Option<PathBuf>,
}

/// `[broker] mode = "external"`: a rumqttc client of an existing broker.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExternalConfig {
    /// Broker host name or address. Default [`DEFAULT_HOST`].
    pub host: String,
    /// Broker port. Default [`DEFAULT_PORT`].
    pub port: u16,
    /// MQTT client id. Default `outpost-aggregator-{partition index}`.
    /// Must be stable (the broker keeps the session under it) and unique
    /// per aggregator (a second client with the same id kicks the first).
    pub client_id: Option<String>,
    /// Login, if the broker wants one.
    pub username: Option<String>,
    /// Password for `username`. Never logged.
    pub password: Option<String>,
    /// MQTT keep-alive. Default [`DEFAULT_KEEP_ALIVE`], 5 s to 65535 s.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Default `false`: the broker keeps the subscriptions and queues
    /// messages while the aggregator is away.
    pub clean_session: bool,
    /// TLS to the broker (PEM files), if any.
    pub tls: Option<ExternalTlsConfig>,
    /// Which devices this aggregator owns; see [`PartitionConfig`].
    pub partition: PartitionConfig,
    /// QoS of the telemetry and status subscriptions: 0, 1 (default) or 2.
    pub subscribe_qos: u8,
    /// Largest MQTT payload accepted from the broker. Default
    /// [`DEFAULT_MAX_PAYLOAD_SIZE`]. Set the broker's own limit (Mosquitto
    /// `message_size_limit`, EMQX `max_packet_size`) to the same value: a
    /// larger message makes the client drop the connection, and with a
    /// persistent session the broker redelivers it at every reconnect.
    pub max_payload_size: usize,
    /// Ceiling of the jittered exponential reconnect delay. Default
    /// [`DEFAULT_MAX_RECONNECT_BACKOFF`].
    #[serde(with = "humantime_serde")]
    pub max_reconnect_backoff: Duration,
}

impl Default for ExternalConfig {
    fn default() -> Self {
        ExternalConfig {
            host: DEFAULT_HOST.to_owned(),
            port: DEFAULT_PORT,
            client_id: None,
            username: None,
            password: None,
            keep_alive: DEFAULT_KEEP_ALIVE,
            clean_session: false,
            tls: None,
            partition: PartitionConfig::default(),
            subscribe_qos: DEFAULT_SUBSCRIBE_QOS,
            max_payload_size: DEFAULT_MAX_PAYLOAD_SIZE,
            max_reconnect_backoff: DEFAULT_MAX_RECONNECT_BACKOFF,
        }
    }
}

impl fmt::Debug for ExternalConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExternalConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("keep_alive", &self.keep_alive)
            .field("clean_session", &self.clean_session)
            .field("tls", &self.tls)
            .field("partition", &self.partition)
            .field("subscribe_qos", &self.subscribe_qos)
            .field("max_payload_size", &self.max_payload_size)
            .field("max_reconnect_backoff", &self.max_reconnect_backoff)
            .finish()
    }
}

impl ExternalConfig {
    /// The client id in use: `client-id`, or
    /// `outpost-aggregator-{partition index}`.
    pub fn client_id(&self) -> String {
        match &self.client_id {
            Some(id) => id.clone(),
            None => format!("{DEFAULT_CLIENT_ID_PREFIX}{}", self.partition.index),
        }
    }

    fn validate(&self, key: &str, e: &mut Vec<String>) {
        if self.host.trim().is_empty() {
            e.push(format!("{key}.host: must not be empty"));
        }
        if self.port == 0 {
            e.push(format!("{key}.port: must not be 0"));
        }
        if self.client_id.as_deref().is_some_and(str::is_empty) {
            e.push(format!(
                "{key}.client-id: must not be empty (a persistent session needs a stable id)"
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            e.push(format!("{key}.password: set without {key}.username"));
        }
        if self.keep_alive < MIN_KEEP_ALIVE || self.keep_alive > MAX_KEEP_ALIVE {
            e.push(format!(
                "{key}.keep-alive: must be between {}s and {}s",
                MIN_KEEP_ALIVE.as_secs(),
                MAX_KEEP_ALIVE.as_secs()
            ));
        }
        if let Some(tls) = &self.tls {
            check_file(&format!("{key}.tls.ca-file"), &tls.ca_file, e);
            match (&tls.client_cert, &tls.client_key) {
                (Some(c), Some(k)) => {
                    check_file(&format!("{key}.tls.client-cert"), c, e);
                    check_file(&format!("{key}.tls.client-key"), k, e);
                }
                (None, None) => {}
                _ => e.push(format!(
                    "{key}.tls: client-cert and client-key must be given together"
                )),
            }
        }
        let p = &self.partition;
        if p.count == 0 {
            e.push(format!("{key}.partition.count: must be at least 1"));
        } else if p.index >= p.count {
            e.push(format!(
                "{key}.partition.index: must be below {key}.partition.count ({})",
                p.count
            ));
        }
        if self.subscribe_qos > 2 {
            e.push(format!("{key}.subscribe-qos: must be 0, 1 or 2"));
        }
        check_payload_size(key, self.max_payload_size, e);
        if self.max_reconnect_backoff < MIN_RECONNECT_BACKOFF
            || self.max_reconnect_backoff > MAX_RECONNECT_BACKOFF
        {
            e.push(format!(
                "{key}.max-reconnect-backoff: must be between {}ms and {}s",
                MIN_RECONNECT_BACKOFF.as_millis(),
                MAX_RECONNECT_BACKOFF.as_secs()
            ));
        }
    }
}

/// `[broker.tls]` of the external client (PEM files).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExternalTlsConfig {
    /// CA that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// Client certificate for mutual TLS (with `client-key`).
    pub client_cert: Option<PathBuf>,
    /// Client private key for mutual TLS (with `client-cert`).
    pub client_key: Option<PathBuf>,
}

/// `[broker.partition]`: this aggregator owns the devices whose
/// [`super::partition_of`]`(device, count) == index`. Every aggregator of a
/// site uses the same `count` and its own `index`. Default `index = 0,
/// count = 1` (one aggregator owns everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PartitionConfig {
    /// This aggregator's partition, `0..count`.
    pub index: u32,
    /// Number of partitions (aggregators), at least 1.
    pub count: u32,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        PartitionConfig { index: 0, count: 1 }
    }
}

fn check_payload_size(key: &str, size: usize, e: &mut Vec<String>) {
    if !(MIN_MAX_PAYLOAD_SIZE..=MAX_MAX_PAYLOAD_SIZE).contains(&size) {
        e.push(format!(
            "{key}.max-payload-size: must be between {MIN_MAX_PAYLOAD_SIZE} and {MAX_MAX_PAYLOAD_SIZE} bytes"
        ));
    }
}

fn check_file(key: &str, path: &Path, e: &mut Vec<String>) {
    if !path.is_file() {
        e.push(format!("{key}: {} is not a readable file", path.display()));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wrapper {
        #[serde(default)]
        broker: BrokerConfig,
    }

    fn parse(s: &str) -> Result<BrokerConfig, String> {
        toml::from_str::<Wrapper>(s)
            .map(|w| w.broker)
            .map_err(|e| e.to_string())
    }

    fn problems(c: &BrokerConfig) -> Vec<String> {
        let mut e = Vec::new();
        c.validate("broker", &mut e);
        e
    }

    #[test]
    fn defaults_are_embedded_and_valid() {
        let c = parse("").unwrap();
        let BrokerConfig::Embedded(e) = &c else {
            panic!("not embedded: {c:?}")
        };
        assert_eq!(e.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(e.tls_listen, DEFAULT_TLS_LISTEN.parse().unwrap());
        assert_eq!(e.filter_budget(), 32 * 1024 * 1024);
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
        assert_eq!(c.partition(), None);
    }

    #[test]
    fn embedded_keys_parse() {
        let c = parse(
            r#"
            [broker]
            mode = "embedded"
            listen = "127.0.0.1:1884"
            max-connections = 50
            max-payload-size = 65536
            max-segment-size = 1048576
            max-segment-count = 2
            connection-timeout = "2s"
            users = { gw1 = "secret-1", gw2 = "secret-2" }
            "#,
        )
        .unwrap();
        let BrokerConfig::Embedded(e) = &c else {
            panic!()
        };
        assert_eq!(e.listen.port(), 1884);
        assert_eq!(e.max_connections, 50);
        assert_eq!(e.connection_timeout, Duration::from_secs(2));
        assert_eq!(e.users.len(), 2);
        assert!(problems(&c).is_empty());
        let dbg = format!("{c:?}");
        assert!(dbg.contains("gw1"), "{dbg}");
        assert!(!dbg.contains("secret"), "password leaked: {dbg}");
    }

    #[test]
    fn unknown_keys_and_modes_are_rejected() {
        let e = parse("[broker]\nmode = \"embedded\"\nlisten-on = \"x\"\n").unwrap_err();
        assert!(e.contains("unknown field `listen-on`"), "{e}");
        let e = parse("[broker]\nmode = \"cloud\"\n").unwrap_err();
        assert!(e.contains("cloud"), "{e}");
        let e = parse("[broker]\nmode = \"external\"\nhots = \"x\"\n").unwrap_err();
        assert!(e.contains("unknown field `hots`"), "{e}");
        let e = parse("[broker]\nmode = \"external\"\n[broker.partition]\nindex = 1\nsize = 2\n")
            .unwrap_err();
        assert!(e.contains("unknown field `size`"), "{e}");
    }

    #[test]
    fn embedded_limits_are_validated() {
        let c = BrokerConfig::Embedded(EmbeddedConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            max_connections: 0,
            max_payload_size: 10,
            max_segment_size: 100,
            max_segment_count: 0,
            connection_timeout: Duration::from_secs(100),
            ..EmbeddedConfig::default()
        });
        let p = problems(&c);
        for key in [
            "broker.listen:",
            "broker.max-connections:",
            "broker.max-payload-size:",
            "broker.max-segment-size:",
            "broker.max-segment-count:",
            "broker.connection-timeout:",
        ] {
            assert!(
                p.iter().any(|m| m.starts_with(key)),
                "{key} missing in {p:?}"
            );
        }
    }

    #[test]
    fn embedded_tls_is_reported_as_not_built() {
        let c = parse(
            r#"
            [broker]
            mode = "embedded"
            tls-listen = "0.0.0.0:1883"
            tls = { cert-file = "/nonexistent/cert.pem", key-file = "/nonexistent/key.pem" }
            "#,
        )
        .unwrap();
        let p = problems(&c);
        assert!(
            p.iter().any(|m| m.starts_with("broker.tls.cert-file:")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|m| m.starts_with("broker.tls.key-file:")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|m| m.starts_with("broker.tls-listen:")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("broker.tls:") && m.contains("use-rustls")),
            "{p:?}"
        );
    }

    #[test]
    fn external_keys_parse_and_password_is_redacted() {
        let c = parse(
            r#"
            [broker]
            mode = "external"
            host = "mqtt.example.net"
            port = 8883
            username = "aggregator"
            password = "hunter2"
            keep-alive = "20s"
            subscribe-qos = 1
            max-reconnect-backoff = "5s"
            partition = { index = 1, count = 3 }
            "#,
        )
        .unwrap();
        let BrokerConfig::External(x) = &c else {
            panic!()
        };
        assert_eq!(x.host, "mqtt.example.net");
        assert_eq!(x.port, 8883);
        assert!(!x.clean_session);
        assert_eq!(x.client_id(), "outpost-aggregator-1");
        assert_eq!(c.partition(), Some((1, 3)));
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "password leaked: {dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
    }

    #[test]
    fn external_problems_are_all_reported() {
        let c = BrokerConfig::External(ExternalConfig {
            host: " ".into(),
            port: 0,
            client_id: Some(String::new()),
            password: Some("x".into()),
            keep_alive: Duration::from_secs(1),
            partition: PartitionConfig { index: 2, count: 2 },
            subscribe_qos: 3,
            max_reconnect_backoff: Duration::from_millis(1),
            tls: Some(ExternalTlsConfig {
                ca_file: "/nonexistent/ca.pem".into(),
                client_cert: Some("/nonexistent/c.pem".into()),
                client_key: None,
            }),
            ..ExternalConfig::default()
        });
        let p = problems(&c);
        for key in [
            "broker.host:",
            "broker.port:",
            "broker.client-id:",
            "broker.password:",
            "broker.keep-alive:",
            "broker.partition.index:",
            "broker.subscribe-qos:",
            "broker.max-reconnect-backoff:",
            "broker.tls.ca-file:",
            "broker.tls:",
        ] {
            assert!(
                p.iter().any(|m| m.starts_with(key)),
                "{key} missing in {p:?}"
            );
        }
        let c = BrokerConfig::External(ExternalConfig {
            partition: PartitionConfig { index: 0, count: 0 },
            ..ExternalConfig::default()
        });
        assert!(problems(&c)
            .iter()
            .any(|m| m.starts_with("broker.partition.count:")));
    }
}
