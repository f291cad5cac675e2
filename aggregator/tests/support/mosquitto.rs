//! Test support: a real Mosquitto broker as a child process on a free
//! loopback port, for the external-broker mode. Killed **and reaped** on
//! drop, also when the test panics. A missing `mosquitto` binary fails the
//! test with a clear message (CI installs it): these tests never skip.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long Mosquitto may take to accept connections (a loaded CI box).
pub const START_DEADLINE: Duration = Duration::from_secs(60);

/// A port that was free a moment ago: bind 127.0.0.1:0, read it, release it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// The Mosquitto binary: `$MOSQUITTO`, `/usr/sbin/mosquitto`, or `mosquitto`
/// on `PATH`. Panics with instructions when there is none.
pub fn mosquitto_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MOSQUITTO") {
        return PathBuf::from(p);
    }
    let mut candidates = vec![PathBuf::from("/usr/sbin/mosquitto")];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("mosquitto")));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "mosquitto is not installed (looked at $MOSQUITTO, /usr/sbin/mosquitto and PATH). \
                 The external-broker tests need it and do not skip: \
                 `apt-get install -y mosquitto` (CI installs it)."
            )
        })
}

/// A running Mosquitto, listening on `127.0.0.1:port` only, anonymous,
/// without persistence.
pub struct Mosquitto {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts on a free port.
    pub fn start() -> Mosquitto {
        Self::start_on(free_port())
    }

    /// Starts on `port` (e.g. the port of a broker that was just killed),
    /// retrying while the port is still held, until [`START_DEADLINE`].
    pub fn start_on(port: u16) -> Mosquitto {
        let bin = mosquitto_binary();
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 persistence false\n\
                 log_dest stderr\n\
                 log_type error\n\
                 log_type warning\n\
                 log_type notice\n"
            ),
        )
        .expect("write mosquitto.conf");
        let log = dir.path().join("mosquitto.log");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let out = open_log(&log);
            let err = out.try_clone().expect("clone log file");
            let mut child = Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
            let exited = loop {
                if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                    return Mosquitto {
                        port,
                        child: Some(child),
                        dir,
                    };
                }
                if let Some(status) = child.try_wait().expect("try_wait mosquitto") {
                    break status;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "mosquitto did not accept connections on {addr} within {START_DEADLINE:?}; log:\n{}",
                        read_log(&log)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            assert!(
                Instant::now() < deadline,
                "mosquitto kept exiting ({exited}) on {addr}; log:\n{}",
                read_log(&log)
            );
            // Most likely the port is still held: try again shortly.
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Mosquitto's output so far.
    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("mosquitto.log"))
    }

    /// SIGKILL (like a crash) and reap. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn open_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open mosquitto log")
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log: {e})"))
}
