//! Command line of `outpost-aggregator`. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use outpost_aggregator::config::Config;
use tokio_util::sync::CancellationToken;

/// Outpost aggregator: embedded MQTT broker (or a client of an existing
/// one), ingest with dedup and acks, device registry, HTTP API.
#[derive(Debug, Parser)]
#[command(name = "outpost-aggregator", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML); see deploy/aggregator.toml. Without one,
    /// defaults apply (embedded broker on 0.0.0.0:1883, API on 127.0.0.1:8080).
    #[arg(long, short, env = "OUTPOST_AGGREGATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Only parse and validate this configuration file, report every problem, and exit
    /// (0 valid, 2 invalid).
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Rule file tools.
    Rules {
        #[command(subcommand)]
        action: RulesAction,
    },
}

#[derive(Debug, Subcommand)]
enum RulesAction {
    /// Parse and validate every rule file in DIR; print each error as
    /// file:line:column: message; exit 1 on errors.
    Check {
        /// Rule directory (e.g. /etc/outpost/rules.d).
        dir: PathBuf,
    },
    /// Run rule unit tests (input series -> expected alerts) on a virtual
    /// clock; exit 1 when any fails.
    Test {
        /// Test files (*.test.toml).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn rules_command(action: RulesAction) -> ExitCode {
    match action {
        RulesAction::Check { dir } => match outpost_aggregator::rules::compile::check_dir(&dir) {
            Ok(n) => {
                println!("{}: {n} rules ok", dir.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in &errors {
                    println!("{e}");
                }
                eprintln!("{}: {} error(s)", dir.display(), errors.len());
                ExitCode::from(1)
            }
        },
        RulesAction::Test { files } => {
            match outpost_aggregator::rules::tests::run_files(&files, &mut std::io::stdout().lock())
            {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Rules { action }) = cli.command {
        return rules_command(action);
    }
    if let Some(path) = cli.check_config {
        return match Config::load(&path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        };
    }
    outpost_aggregator::process::init_logging(
        matches!(cli.log_format, LogFormat::Json),
        "info,rumqttd=warn",
    );
    let config = match &cli.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let cancel = CancellationToken::new();
        outpost_aggregator::process::cancel_on_signals(cancel.clone());
        outpost_aggregator::run(config, cancel, None).await
    });
    // rumqttd's threads have no shutdown API; leaving main ends them.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            // A sink that cannot be built (bad URL, unreadable CA file) is
            // a configuration error.
            if e.downcast_ref::<outpost_aggregator::alerts::BuildError>()
                .is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
