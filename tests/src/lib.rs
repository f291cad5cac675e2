//! `outpost-tests`: end-to-end tests that run the real Outpost binaries
//! (`outpost-agent`, `outpost-aggregator`, `outpost-sim`) as child processes,
//! plus the support code they share and the one-command demo.
//!
//! The support code keeps tests honest on a loaded 2-core machine:
//! * [`binary`] builds the binaries (a no-op when fresh) and returns their
//!   paths, so `cargo test -p outpost-tests` never runs stale programs;
//! * [`Child`] kills and reaps its process on drop, even when a test panics;
//! * [`wait_until`] polls a condition up to a generous deadline instead of
//!   sleeping for a guessed time;
//! * [`free_port`] takes a port from `127.0.0.1:0`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The programs the tests run, with the package and features that build them.
const PROGRAMS: &[(&str, &str, &str)] = &[
    ("outpost-agent", "outpost-agent", ""),
    ("outpost-aggregator", "outpost-aggregator", ""),
    (
        "outpost-sim",
        "outpost-firmware-shim",
        "outpost-firmware-shim/sim",
    ),
];

/// Directory holding the binaries of the current profile (`target/debug`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

fn build_all() -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build").arg("--quiet");
    for (_, package, _) in PROGRAMS {
        cmd.args(["-p", package]);
    }
    let features: Vec<&str> = PROGRAMS
        .iter()
        .map(|p| p.2)
        .filter(|f| !f.is_empty())
        .collect();
    cmd.arg("--features").arg(features.join(","));
    for (name, _, _) in PROGRAMS {
        cmd.args(["--bin", name]);
    }
    if bin_dir().file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("cannot run cargo build: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "cargo build of the Outpost binaries failed: {status}"
        ))
    }
}

/// Root of the workspace (for example configs and rules under `deploy/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Path of one of the Outpost programs, built on first use (cargo makes that
/// a quick no-op when it is fresh).
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = BUILT.get_or_init(build_all) {
        panic!("{e}");
    }
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A free TCP port on 127.0.0.1 (bound, read, released). Another process may
/// take it in between; callers that start servers retry on bind failure.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Polls `cond` every 20 ms until it returns `Some`, or panics with `what`
/// after `timeout`. Deadlines are generous: the CI machine is a loaded 2-core box.
pub fn wait_until<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lines a child printed, collected by a background thread.
#[derive(Debug, Clone, Default)]
pub struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    /// Copy of every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Everything so far as one string.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    fn collect(&self, stream: impl Read + Send + 'static, echo: Option<String>) {
        let sink = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(prefix) = &echo {
                    eprintln!("[{prefix}] {line}");
                }
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
    }
}

/// A child process that is killed and reaped when dropped, with its stdout
/// and stderr collected line by line.
#[derive(Debug)]
pub struct Child {
    name: String,
    child: std::process::Child,
    /// Lines printed on stdout.
    pub stdout: Output,
    /// Lines printed on stderr.
    pub stderr: Output,
}

impl Child {
    /// Starts `cmd` with piped output. Set `OUTPOST_TEST_ECHO=1` to echo the
    /// child's output to the test's stderr while it runs.
    pub fn spawn(name: &str, cmd: Command) -> Child {
        Self::spawn_with(name, cmd, std::env::var_os("OUTPOST_TEST_ECHO").is_some())
    }

    /// Starts `cmd` with piped output, echoing every line to stderr prefixed
    /// with `[name]` when `echo` is set (the demo shows its children so).
    pub fn spawn_with(name: &str, mut cmd: Command, echo: bool) -> Child {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let echo = echo.then(|| name.to_string());
        let stdout = Output::default();
        let stderr = Output::default();
        if let Some(s) = child.stdout.take() {
            stdout.collect(s, echo.clone());
        }
        if let Some(s) = child.stderr.take() {
            stderr.collect(s, echo);
        }
        Child {
            name: name.to_string(),
            child,
            stdout,
            stderr,
        }
    }

    /// Process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let name = self.name.clone();
        wait_until(timeout, &format!("{name} to exit"), || self.try_wait())
    }

    /// Sends a signal (e.g. `"TERM"`, `"KILL"`) with `kill(1)`.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.id().to_string())
            .status();
    }

    /// Kills (SIGKILL) and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.kill();
        }
        if std::thread::panicking() {
            eprintln!("--- {} stderr ---\n{}", self.name, self.stderr.text());
        }
    }
}

/// Starts `outpost-sim` creating a pseudo-terminal, with extra `args`, and
/// returns it with the pty path it printed on its first stdout line.
pub fn start_sim_pty(args: &[&str]) -> (Child, String) {
    let mut cmd = Command::new(binary("outpost-sim"));
    cmd.arg("--pty").args(args);
    let sim = Child::spawn("outpost-sim", cmd);
    let out = sim.stdout.clone();
    let path = wait_until(
        Duration::from_secs(30),
        "outpost-sim to print its pty path",
        || out.lines().first().cloned(),
    );
    assert!(
        path.starts_with("/dev/"),
        "unexpected first line from outpost-sim: {path}"
    );
    (sim, path)
}

/// `GET path` on `addr` over plain HTTP/1.1; returns status and body, or
/// None when the server is not reachable (yet).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    ))
}

/// Sum of a Prometheus metric's samples (all label sets) in `/metrics` text.
pub fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// One request a [`WebhookReceiver`] got, and the status it answered.
#[derive(Debug, Clone)]
pub struct Received {
    /// Status answered.
    pub answered: u16,
    /// Header names in lower case.
    pub headers: std::collections::HashMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
}

impl Received {
    /// The body as JSON (Null when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A webhook receiver for end-to-end tests: a plain HTTP/1.1 server on a
/// free loopback port, on its own thread, that records every request and
/// answers the status set with [`WebhookReceiver::set_status`]. Stops when
/// dropped.
#[derive(Debug)]
pub struct WebhookReceiver {
    /// `http://127.0.0.1:PORT/hook`
    pub url: String,
    status: Arc<std::sync::atomic::AtomicU16>,
    got: Arc<Mutex<Vec<Received>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl WebhookReceiver {
    /// Starts answering `status`.
    pub fn start(status: u16) -> WebhookReceiver {
        use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let port = listener.local_addr().expect("the bound address").port();
        let status = Arc::new(AtomicU16::new(status));
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, g, sp) = (status.clone(), got.clone(), stop.clone());
        std::thread::spawn(move || {
            while !sp.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (st, g) = (st.clone(), g.clone());
                        std::thread::spawn(move || serve_webhook(conn, &st, &g));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        WebhookReceiver {
            url: format!("http://127.0.0.1:{port}/hook"),
            status,
            got,
            stop,
        }
    }

    /// Answers `status` from now on.
    pub fn set_status(&self, status: u16) {
        self.status
            .store(status, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every request so far.
    pub fn all(&self) -> Vec<Received> {
        self.got.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The requests answered with 2xx.
    pub fn accepted(&self) -> Vec<Received> {
        self.all()
            .into_iter()
            .filter(|r| (200..300).contains(&r.answered))
            .collect()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn serve_webhook(
    conn: std::net::TcpStream,
    status: &std::sync::atomic::AtomicU16,
    got: &Mutex<Vec<Received>>,
) {
    use std::io::{BufRead, BufReader, Write};
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut out = write_half;
    // Keep-alive: one request after the other on this connection.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = std::collections::HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
            return;
        }
        let answered = status.load(std::sync::atomic::Ordering::SeqCst);
        got.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Received {
                answered,
                headers,
                body,
            });
        let reply = format!("HTTP/1.1 {answered} X\r\nContent-Length: 0\r\n\r\n");
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// `GET path` on `addr` as JSON, when the server answers 200 with JSON.
pub fn get_json(addr: &str, path: &str) -> Option<serde_json::Value> {
    let (status, body) = http_get(addr, path)?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

/// An `outpost-aggregator` process with an embedded broker, its config and
/// state in a directory of the test's. Killed and reaped on drop.
#[derive(Debug)]
pub struct AggregatorProc {
    /// The process.
    pub child: Child,
    /// MQTT port of the embedded broker.
    pub mqtt: u16,
    /// `127.0.0.1:PORT` of the HTTP API.
    pub api: String,
    /// The config file it was started with.
    pub config: PathBuf,
}

impl AggregatorProc {
    /// Writes `dir/aggregator.toml` (embedded broker on `mqtt`, API on
    /// `api`, state in `dir/state.sqlite`, then `extra` TOML such as
    /// `[rules]` and `[alerts]` tables) and starts the aggregator; returns
    /// once `/healthz` answers.
    pub fn start(dir: &Path, mqtt: u16, api: u16, extra: &str) -> AggregatorProc {
        let config = dir.join("aggregator.toml");
        std::fs::write(
            &config,
            format!(
                "[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{mqtt}\"\n\
                 [state]\npath = \"{}\"\n[api]\nlisten = \"127.0.0.1:{api}\"\n{extra}",
                dir.join("state.sqlite").display()
            ),
        )
        .expect("write the aggregator config");
        Self::start_with(config, mqtt, api)
    }

    /// Starts the aggregator again with the same config (same state).
    pub fn restart(&mut self) {
        self.child.kill();
        *self = Self::start_with(self.config.clone(), self.mqtt, self.api_port());
    }

    fn api_port(&self) -> u16 {
        self.api
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("api port")
    }

    fn start_with(config: PathBuf, mqtt: u16, api: u16) -> AggregatorProc {
        let mut cmd = Command::new(binary("outpost-aggregator"));
        cmd.arg("--config").arg(&config);
        let child = Child::spawn("outpost-aggregator", cmd);
        let api = format!("127.0.0.1:{api}");
        wait_until(Duration::from_secs(60), "the aggregator's /healthz", || {
            http_get(&api, "/healthz").map(|_| ())
        });
        AggregatorProc {
            child,
            mqtt,
            api,
            config,
        }
    }

    /// `GET path` of the API as JSON.
    pub fn get(&self, path: &str) -> Option<serde_json::Value> {
        get_json(&self.api, path)
    }

    /// The registry entry of `device`, once it exists.
    pub fn device(&self, device: &str) -> Option<serde_json::Value> {
        self.get(&format!("/api/v1/devices/{device}"))
    }

    /// Sum of a metric's samples.
    pub fn metric(&self, name: &str) -> Option<f64> {
        metric_value(&http_get(&self.api, "/metrics")?.1, name)
    }
}

/// An `outpost-agent` process reading one serial-frames source, with its
/// config and buffer in a directory of the test's. Killed and reaped on drop.
#[derive(Debug)]
pub struct AgentProc {
    /// The process.
    pub child: Child,
    /// `127.0.0.1:PORT` of its `/metrics` and `/healthz`.
    pub http: String,
    /// The config file it was started with.
    pub config: PathBuf,
}

impl AgentProc {
    /// Writes `dir/agent.toml` (device `device`, broker on `mqtt`, buffer in
    /// `dir/buffer.sqlite` committing every 200 ms plus the `buffer` keys
    /// given (e.g. `max-rows = 500`), reconnect backoff up to 500 ms, one
    /// serial-frames source on `pty`, then `extra` TOML: keys without a
    /// table header go to that source (e.g. `time-source = "tick"`), then
    /// more tables) and starts the agent.
    pub fn start(
        dir: &Path,
        device: &str,
        mqtt: u16,
        pty: &str,
        buffer: &str,
        extra: &str,
    ) -> AgentProc {
        let http = free_port();
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[device]\nid = \"{device}\"\n[mqtt]\nport = {mqtt}\nmax-reconnect-backoff = \"500ms\"\n\
                 [buffer]\npath = \"{}\"\ncommit-interval = \"200ms\"\n{buffer}\n\
                 [metrics]\nlisten = \"127.0.0.1:{http}\"\n\
                 [[sources]]\ntype = \"serial-frames\"\nname = \"sim\"\npath = \"{pty}\"\n{extra}",
                dir.join("buffer.sqlite").display()
            ),
        )
        .expect("write the agent config");
        Self::start_with(config, http)
    }

    /// Starts the agent again with the same config (same buffer).
    pub fn restart(&mut self) {
        self.child.kill();
        let http = self
            .http
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("metrics port");
        *self = Self::start_with(self.config.clone(), http);
    }

    fn start_with(config: PathBuf, http: u16) -> AgentProc {
        let mut cmd = Command::new(binary("outpost-agent"));
        cmd.arg("--config").arg(&config);
        AgentProc {
            child: Child::spawn("outpost-agent", cmd),
            http: format!("127.0.0.1:{http}"),
            config,
        }
    }

    /// Sum of a metric's samples, when the agent answers.
    pub fn metric(&self, name: &str) -> Option<f64> {
        metric_value(&http_get(&self.http, "/metrics")?.1, name)
    }
}
