//! `outpost-sim`: a simulated Outpost sensor device on a pty or serial port.
//! The logic lives in `outpost_firmware_shim::sim`; this opens the port,
//! wires signals and prints the summary. Run with `--help` for the flags.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use clap::{error::ErrorKind, CommandFactory as _, Parser as _};
use outpost_firmware_shim::sim::{self, cli::Args, cli::OutputChoice, Output, Summary};
use serialport::{SerialPort as _, TTYPort};

/// Longest wait at exit for queued frames to reach the port.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a write to the port may wait for room before the frame is
/// dropped (about one tick at the default rate, far less than a tick's
/// worth of queue at high rates).
const WRITE_TIMEOUT: Duration = Duration::from_millis(100);

/// A failure and the exit code it calls for.
enum Failure {
    /// Bad arguments, including unusable paths: exit code 2.
    Usage(anyhow::Error),
    /// Anything that went wrong while running: exit code 1.
    Runtime(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

fn main() -> ExitCode {
    let args = Args::parse(); // usage errors exit with code 2
    let settings = match args.validate() {
        Ok(s) => s,
        Err(e) => Args::command().error(ErrorKind::ValueValidation, e).exit(),
    };
    match run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            let _ = writeln!(io::stderr(), "outpost-sim: error: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            let _ = writeln!(io::stderr(), "outpost-sim: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(settings: sim::cli::Settings) -> Result<(), Failure> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while shutting down exits at once (code 1).
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&stop)))
            .context("cannot install signal handlers")?;
    }

    // Both ends of a pty stay open until we return: `_slave` keeps the
    // slave path valid while readers open and close it, the output thread
    // owns the master.
    let (writer, _slave, _link) = match &settings.output {
        OutputChoice::Pty { link } => {
            let (master, slave) =
                TTYPort::pair().context("cannot create a pseudo-terminal pair")?;
            let path = slave
                .name()
                .ok_or_else(|| anyhow!("the pseudo-terminal has no slave path"))?;
            let link = link
                .as_deref()
                .map(|l| LinkGuard::create(l, Path::new(&path)))
                .transpose()?;
            let mut stdout = io::stdout().lock();
            writeln!(stdout, "{path}")
                .and_then(|()| stdout.flush())
                .context("cannot print the pty path")?;
            (master, Some(slave), link)
        }
        OutputChoice::Port { path, baud } => {
            // Any failure to open the given path is a bad argument (exit 2):
            // missing, not a tty, no permission, busy.
            let port = serialport::new(path, *baud)
                .timeout(WRITE_TIMEOUT)
                .open_native()
                .map_err(|e| Failure::Usage(anyhow!("cannot open serial port {path}: {e}")))?;
            (port, None, None)
        }
    };

    let mut output = Output::spawn(writer).context("cannot start the writer thread")?;
    let verbose = settings.verbose;
    let result = sim::run(&settings.config, &mut output, &stop, |sample| {
        if verbose {
            let _ = writeln!(io::stderr(), "{sample}");
        }
    });
    let (output_stats, _writer) = output.finish(DRAIN_TIMEOUT);
    let device = result.context("simulation stopped")?;

    if !settings.linger.is_zero() {
        sim::sleep_until(Instant::now() + settings.linger, &stop);
    }
    let _ = writeln!(
        io::stderr(),
        "{}",
        Summary {
            device,
            output: output_stats
        }
    );
    Ok(())
}

/// A symlink to the pty's slave, removed when dropped (if it still points
/// there).
struct LinkGuard {
    link: PathBuf,
    target: PathBuf,
}

impl LinkGuard {
    fn create(link: &Path, target: &Path) -> Result<Self, Failure> {
        let usage = |e: anyhow::Error| Failure::Usage(e);
        match fs::symlink_metadata(link) {
            Ok(meta) if meta.file_type().is_symlink() => fs::remove_file(link)
                .with_context(|| format!("cannot replace the old symlink {}", link.display()))
                .map_err(usage)?,
            Ok(_) => {
                return Err(usage(anyhow!(
                    "--link {}: exists and is not a symlink",
                    link.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(usage(anyhow!("--link {}: {e}", link.display()))),
        }
        std::os::unix::fs::symlink(target, link)
            .with_context(|| {
                format!(
                    "--link: cannot create symlink {} -> {}",
                    link.display(),
                    target.display()
                )
            })
            .map_err(usage)?;
        Ok(LinkGuard {
            link: link.to_owned(),
            target: target.to_owned(),
        })
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        if fs::read_link(&self.link).is_ok_and(|t| t == self.target) {
            let _ = fs::remove_file(&self.link);
        }
    }
}
