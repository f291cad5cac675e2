//! Process plumbing shared by both programs' `main.rs` (the aggregator
//! includes this file by path, as it does `notify.rs`: one piece of code,
//! no dependency between the two programs): logging set-up and the
//! SIGTERM/SIGINT -> cancellation bridge.

use tokio_util::sync::CancellationToken;

/// Installs the tracing subscriber on stderr: level from `OUTPOST_LOG`
/// (default `default_filter`), JSON lines when `json`, colour only when
/// stderr is a terminal (journald and pipes get plain text).
pub fn init_logging(json: bool, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Cancels `cancel` at the first SIGTERM or SIGINT (the start of a graceful
/// shutdown). Must be called inside a tokio runtime.
pub fn cancel_on_signals(cancel: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!("cannot install signal handlers; stop with SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        cancel.cancel();
    });
}
