//! The aggregator's TOML configuration: parsing, defaults and validation.
//! Every table rejects unknown keys; [`Config::validate`] reports every
//! problem at once with its key path. Secrets have hand-written `Debug`s in
//! their own modules.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::config_file::ConfigError;
use crate::config_file::{self, Validate};

use crate::alerts::config::AlertsConfig;
use crate::api::ApiConfig;
use crate::ingest::broker::BrokerConfig;

/// Default path of the aggregator's SQLite state.
pub const DEFAULT_STATE_PATH: &str = "/var/lib/outpost-aggregator/state.sqlite";
/// Largest telemetry payload accepted by default (a batch of 10,000
/// readings is about 100 KB).
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// The whole aggregator configuration. Every table is optional: an empty
/// file runs an embedded broker on 0.0.0.0:1883 and the API on
/// 127.0.0.1:8080.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Where messages come from.
    pub broker: BrokerConfig,
    /// Durable state (marks, registry, dead letters).
    pub state: StateConfig,
    /// Ingest tuning.
    pub ingest: IngestConfig,
    /// HTTP API.
    pub api: ApiConfig,
    /// Rule files.
    pub rules: RulesConfig,
    /// Shutdown behaviour.
    pub shutdown: ShutdownConfig,
    /// Alert sinks and routes.
    pub alerts: AlertsConfig,
}

/// `[state]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StateConfig {
    /// SQLite file.
    pub path: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            path: PathBuf::from(DEFAULT_STATE_PATH),
        }
    }
}

/// Default rule directory.
pub const DEFAULT_RULES_DIR: &str = "/etc/outpost/rules.d";

/// `[rules]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RulesConfig {
    /// Directory of `*.toml` rule files, reloaded on change and on SIGHUP.
    pub dir: PathBuf,
    /// A reading older than its series' latest timestamp by more than this
    /// is counted and skipped; within it, it is applied as of the latest.
    #[serde(with = "humantime_serde")]
    pub lateness: Duration,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            dir: PathBuf::from(DEFAULT_RULES_DIR),
            lateness: Duration::from_secs(5),
        }
    }
}

/// `[ingest]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct IngestConfig {
    /// Telemetry payloads larger than this go to the dead-letter table.
    pub max_payload: usize,
    /// How often marks and the registry are committed and acks sent. Acks
    /// wait for the commit; shorter = lower ack latency, more commits.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Commit early when this many batches are waiting for their ack.
    pub flush_batches: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_payload: DEFAULT_MAX_PAYLOAD,
            flush_interval: Duration::from_millis(50),
            flush_batches: 2000,
        }
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ShutdownConfig {
    /// On SIGTERM: how long to keep processing what the broker already
    /// delivered before the final commit.
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

    /// Every problem, each prefixed with its key path.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        self.broker.validate("broker", &mut e);
        self.api.validate("api", &mut e);
        self.alerts.validate("alerts", &mut e);
        if self.state.path.as_os_str().is_empty() {
            e.push("state.path: must not be empty".into());
        }
        if self.ingest.max_payload < 1024 || self.ingest.max_payload > 64 * 1024 * 1024 {
            e.push("ingest.max-payload: must be between 1 KiB and 64 MiB".into());
        }
        if self.ingest.flush_interval.is_zero()
            || self.ingest.flush_interval > Duration::from_secs(10)
        {
            e.push("ingest.flush-interval: must be between 1ms and 10s".into());
        }
        if self.rules.lateness > Duration::from_secs(3600) {
            e.push("rules.lateness: must be at most 1h".into());
        }
        if self.ingest.flush_batches == 0 {
            e.push("ingest.flush-batches: must be at least 1".into());
        }
        e
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_is_valid() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/aggregator.toml"
        ));
        let c = Config::load(path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.rules.dir, PathBuf::from(DEFAULT_RULES_DIR));
        assert_eq!(c.ingest.flush_interval, Duration::from_millis(50));
    }

    #[test]
    fn an_empty_file_runs_with_defaults() {
        let c = Config::parse("", Path::new("a.toml")).unwrap();
        assert_eq!(c.state.path, PathBuf::from(DEFAULT_STATE_PATH));
        assert_eq!(c.broker.partition(), None);
    }

    #[test]
    fn problems_are_reported_with_key_paths() {
        let err = Config::parse(
            "[ingest]\nflush-batches = 0\nmax-payload = 10\n",
            Path::new("a.toml"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("ingest.flush-batches") && msg.contains("ingest.max-payload"),
            "{msg}"
        );
        let err =
            Config::parse("[ingest]\nflush-every = \"1s\"\n", Path::new("a.toml")).unwrap_err();
        assert!(err.to_string().contains("flush-every"), "{err}");
    }
}
