//! Loading a TOML configuration file: read, parse (unknown keys are errors
//! with line and column), then validate (every problem, each with its key
//! path). Shared by both programs (the aggregator includes this file by
//! path, as it does `notify.rs`).

use std::path::{Path, PathBuf};

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid TOML, or a key/type that does not belong.
    #[error("{path}: {message}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// Parser message (with line and column).
        message: String,
    },
    /// Parsed, but values are not usable: every problem, one per line.
    #[error("{path}: invalid configuration:\n  {}", problems.join("\n  "))]
    Invalid {
        /// File path.
        path: PathBuf,
        /// One entry per problem, each starting with its key path.
        problems: Vec<String>,
    },
}

/// A configuration that can check itself.
pub trait Validate {
    /// Every problem, each prefixed with its key path; empty when usable.
    fn problems(&self) -> Vec<String>;
}

/// Reads, parses and validates a config file.
pub fn load<T: serde::de::DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates config text; `path` is used in messages.
pub fn parse<T: serde::de::DeserializeOwned + Validate>(
    text: &str,
    path: &Path,
) -> Result<T, ConfigError> {
    let config: T = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let problems = config.problems();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }
}
