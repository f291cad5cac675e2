//! The systemd units in `deploy/systemd/`, checked against systemd and
//! against the rest of the deployment (docs/deploy.md):
//!
//! * `systemd_analyze_verify_accepts_the_units`: `systemd-analyze verify`
//!   (Debian package `systemd`) must print nothing about our units: no
//!   unknown key, no unparsable value, no missing executable. Skipped, with
//!   a message, where `systemd-analyze` is not installed.
//! * `units_agree_with_the_configs_and_the_package`: the config, state and
//!   rules paths of the units, the example configs (`deploy/*.toml`), the
//!   programs' built-in defaults and the `.deb` assets are the same; the stop
//!   timeouts cover the configs' shutdown grace periods.
//! * `exec_lines_accept_the_example_configs`: each unit's `ExecStartPre=`
//!   and `ExecStart=` command line, run with the built binary on the example
//!   config, parses and validates.
//! * `agent_speaks_sd_notify`, `aggregator_speaks_sd_notify`: `READY=1`,
//!   `WATCHDOG=1` at half `$WATCHDOG_USEC`, `STOPPING=1` on SIGTERM, which
//!   `Type=notify` and `WatchdogSec=` rely on.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use outpost_tests::{binary, free_port, workspace_root, Child};

const AGENT_UNIT: &str = "outpost-agent.service";
const AGGREGATOR_UNIT: &str = "outpost-aggregator.service";
/// Where the units (and the .deb) put the programs.
const BIN_DIR: &str = "/usr/bin";

/// One unit file: `(section, key, value)` in file order (keys may repeat).
struct Unit {
    name: &'static str,
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn load(name: &'static str) -> Unit {
        let path = workspace_root().join("deploy/systemd").join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let mut section = String::new();
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            assert!(
                !line.ends_with('\\'),
                "{name}:{}: line continuations are not supported by this test",
                n + 1
            );
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_string();
            } else if let Some((k, v)) = line.split_once('=') {
                entries.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
            } else {
                panic!("{name}:{}: not `key=value`: {line}", n + 1);
            }
        }
        Unit { name, entries }
    }

    fn values(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The one value of `key` in `[Service]`.
    fn service(&self, key: &str) -> &str {
        match self.values("Service", key).as_slice() {
            [v] => v,
            other => panic!("{}: expected one {key}=, found {other:?}", self.name),
        }
    }

    /// The argv of an `Exec*=` line (no prefixes or quoting in our units).
    fn exec(&self, key: &str) -> Vec<String> {
        let line = self.service(key);
        assert!(
            !line.starts_with(['-', '@', ':', '+', '!']) && !line.contains(['"', '\'']),
            "{}: {key}= uses prefixes or quoting this test does not handle: {line}",
            self.name
        );
        line.split_whitespace().map(str::to_string).collect()
    }

    /// The value that follows `flag` in the `Exec*=` line `key`.
    fn exec_flag(&self, key: &str, flag: &str) -> String {
        let argv = self.exec(key);
        let i = argv
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{}: {key}= has no {flag}: {argv:?}", self.name));
        argv.get(i + 1)
            .unwrap_or_else(|| panic!("{}: {key}= has no value after {flag}", self.name))
            .clone()
    }
}

/// A systemd time span of the forms our units use (`30s`, `500ms`, `2min`).
fn unit_duration(v: &str) -> Duration {
    parse_duration(v).unwrap_or_else(|| panic!("cannot read the time span {v:?}"))
}

/// `<integer><unit>` with unit `ms`, `s`, `m`/`min`, `h`: what both systemd
/// and the configs (humantime) accept in the simple cases used here.
fn parse_duration(v: &str) -> Option<Duration> {
    let split = v.find(|c: char| !c.is_ascii_digit())?;
    let n: u64 = v[..split].parse().ok()?;
    match v[split..].trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" | "sec" => Some(Duration::from_secs(n)),
        "m" | "min" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

/// The value of `key` in `[table]` of a simple TOML file (strings unquoted;
/// trailing comments dropped). Enough for the example configs' plain keys.
fn toml_value(file: &str, table: &str, key: &str) -> String {
    let path = workspace_root().join(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let header = format!("[{table}]");
    let mut inside = false;
    for line in text.lines() {
        let code = line.split(" #").next().unwrap_or("").trim();
        if code.starts_with('[') {
            inside = code == header;
            continue;
        }
        if !inside {
            continue;
        }
        if let Some((k, v)) = code.split_once('=') {
            if k.trim() == key {
                return v.trim().trim_matches('"').to_string();
            }
        }
    }
    panic!("{file}: no `{key}` in [{table}]");
}

/// The value of `pub const NAME: &str = "..."` in a source file of the
/// workspace: the programs' built-in defaults, which the tests crate cannot
/// import (it depends on neither program's library).
fn rust_str_const(file: &str, name: &str) -> String {
    let path = workspace_root().join(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let prefix = format!("pub const {name}: &str = \"");
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&prefix)?.split('"').next())
        .unwrap_or_else(|| panic!("{file}: no `{prefix}...\"` (renamed? update deploy_units.rs)"))
        .to_string()
}

/// Asserts that `manifest`'s `[package.metadata.deb]` assets install `src`
/// to `dest` (both as written in the manifest).
fn assert_deb_asset(manifest: &str, src: &str, dest: &str) {
    let path = workspace_root().join(manifest);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let asset = format!("[\"{src}\", \"{dest}\"");
    assert!(
        text.contains(&asset),
        "{manifest}: the .deb assets do not install {src} to {dest} (expected `{asset}, ...]`)"
    );
}

/// `/var/lib/<StateDirectory=>/`, with exactly one state directory.
fn state_dir(unit: &Unit) -> String {
    format!("/var/lib/{}/", unit.service("StateDirectory"))
}

/// `/etc/<ConfigurationDirectory=>/`.
fn config_dir(unit: &Unit) -> String {
    format!("/etc/{}/", unit.service("ConfigurationDirectory"))
}

/// What is common to both units; returns the config path they use.
fn check_common(unit: &Unit, program: &str, example: &str) -> String {
    assert_eq!(unit.service("Type"), "notify", "{}", unit.name);
    assert_eq!(unit.service("NotifyAccess"), "main", "{}", unit.name);
    assert!(unit_duration(unit.service("WatchdogSec")) >= Duration::from_secs(2));
    let bin = format!("{BIN_DIR}/{program}");
    assert_eq!(
        unit.exec("ExecStart")[0],
        bin,
        "{}: ExecStart binary",
        unit.name
    );
    assert_eq!(
        unit.exec("ExecStartPre")[0],
        bin,
        "{}: ExecStartPre binary",
        unit.name
    );
    let config = unit.exec_flag("ExecStart", "--config");
    assert_eq!(
        unit.exec_flag("ExecStartPre", "--check-config"),
        config,
        "{}: ExecStartPre must check the config ExecStart uses",
        unit.name
    );
    let file = Path::new(example)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or("");
    assert_eq!(
        config,
        format!("{}{file}", config_dir(unit)),
        "{}: the config is not {example}'s name in ConfigurationDirectory=",
        unit.name
    );
    let manifest = format!("{}/Cargo.toml", program.trim_start_matches("outpost-"));
    assert_deb_asset(&manifest, &format!("target/release/{program}"), "usr/bin/");
    assert_deb_asset(
        &manifest,
        &format!("../{example}"),
        config.trim_start_matches('/'),
    );
    config
}

#[test]
fn units_agree_with_the_configs_and_the_package() {
    // Agent.
    let agent = Unit::load(AGENT_UNIT);
    check_common(&agent, "outpost-agent", "deploy/agent.toml");
    let buffer = toml_value("deploy/agent.toml", "buffer", "path");
    assert!(
        buffer.starts_with(&state_dir(&agent)),
        "deploy/agent.toml: [buffer] path {buffer} is outside StateDirectory= {}",
        state_dir(&agent)
    );
    assert_eq!(
        rust_str_const("agent/src/buffer/mod.rs", "DEFAULT_PATH"),
        buffer,
        "the agent's default buffer path and deploy/agent.toml differ"
    );
    let grace = unit_duration(&toml_value("deploy/agent.toml", "shutdown", "grace"));
    let stop = unit_duration(agent.service("TimeoutStopSec"));
    assert!(
        stop >= grace + Duration::from_secs(15),
        "{AGENT_UNIT}: TimeoutStopSec={stop:?} < [shutdown] grace {grace:?} + 15s \
         (MQTT disconnect 3s, final commit, buffer close)"
    );
    // The buffer reads /proc/sys/kernel/random/boot_id to detect a reboot.
    assert!(
        !agent.values("Service", "ProcSubset").contains(&"pid"),
        "{AGENT_UNIT}: ProcSubset=pid hides the kernel boot id the buffer needs"
    );

    // Aggregator.
    let aggregator = Unit::load(AGGREGATOR_UNIT);
    check_common(&aggregator, "outpost-aggregator", "deploy/aggregator.toml");
    let state = toml_value("deploy/aggregator.toml", "state", "path");
    assert!(
        state.starts_with(&state_dir(&aggregator)),
        "deploy/aggregator.toml: [state] path {state} is outside StateDirectory= {}",
        state_dir(&aggregator)
    );
    assert_eq!(
        rust_str_const("aggregator/src/config.rs", "DEFAULT_STATE_PATH"),
        state,
        "the aggregator's default state path and deploy/aggregator.toml differ"
    );
    let rules = toml_value("deploy/aggregator.toml", "rules", "dir");
    assert!(
        rules.starts_with(&config_dir(&aggregator)),
        "deploy/aggregator.toml: [rules] dir {rules} is outside ConfigurationDirectory="
    );
    assert_eq!(
        rust_str_const("aggregator/src/config.rs", "DEFAULT_RULES_DIR"),
        rules,
        "the aggregator's default rules dir and deploy/aggregator.toml differ"
    );
    assert_deb_asset(
        "aggregator/Cargo.toml",
        "../deploy/rules.d/*.toml",
        &format!("{}/", rules.trim_start_matches('/')),
    );
    assert!(
        aggregator.service("ExecReload").ends_with("-HUP $MAINPID"),
        "{AGGREGATOR_UNIT}: reload must send SIGHUP (it reloads the rules)"
    );
    let grace = unit_duration(&toml_value("deploy/aggregator.toml", "shutdown", "grace"));
    let stop = unit_duration(aggregator.service("TimeoutStopSec"));
    assert!(
        stop >= grace * 2 + Duration::from_secs(20),
        "{AGGREGATOR_UNIT}: TimeoutStopSec={stop:?} < 2 x [shutdown] grace {grace:?} + 20s \
         (ingest drain, outbox delivery, broker stop 10s, HTTP drain 5s)"
    );
    let connections: u64 = toml_value("deploy/aggregator.toml", "broker", "max-connections")
        .parse()
        .expect("max-connections");
    let nofile: u64 = aggregator
        .service("LimitNOFILE")
        .parse()
        .expect("LimitNOFILE");
    assert!(
        nofile > connections,
        "{AGGREGATOR_UNIT}: LimitNOFILE={nofile} leaves no room above [broker] max-connections {connections}"
    );
}

/// Maps a unit's command line onto this checkout: the program to the built
/// binary, `/etc/outpost/X.toml` to `deploy/X.toml`.
fn local_command(unit: &Unit, key: &str) -> Command {
    let argv = unit.exec(key);
    let program = argv[0]
        .strip_prefix(&format!("{BIN_DIR}/"))
        .unwrap_or_else(|| {
            panic!(
                "{}: {key}= does not run a program from {BIN_DIR}",
                unit.name
            )
        });
    let mut cmd = Command::new(binary(program));
    let config_dir = config_dir(unit);
    for arg in &argv[1..] {
        match arg.strip_prefix(&config_dir) {
            Some(file) => cmd.arg(workspace_root().join("deploy").join(file)),
            None => cmd.arg(arg),
        };
    }
    cmd
}

#[test]
fn exec_lines_accept_the_example_configs() {
    for (name, example) in [
        (AGENT_UNIT, "agent.toml"),
        (AGGREGATOR_UNIT, "aggregator.toml"),
    ] {
        let unit = Unit::load(name);
        let example = workspace_root().join("deploy").join(example);
        // ExecStartPre as it is; ExecStart only parsed and checked (the
        // added --check-config makes the program validate and exit).
        let mut start = local_command(&unit, "ExecStart");
        start.arg("--check-config").arg(&example);
        for (key, mut cmd) in [
            ("ExecStartPre", local_command(&unit, "ExecStartPre")),
            ("ExecStart", start),
        ] {
            let out = cmd
                .output()
                .unwrap_or_else(|e| panic!("{name}: run {key}: {e}"));
            assert!(
                out.status.success(),
                "{name}: {key}= on the example config failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The `systemd-analyze` version, or `None` when it is not installed.
fn systemd_analyze_version() -> Option<u32> {
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(out) => {
            // "systemd 252 (252.38-1~deb12u1)"
            let text = String::from_utf8_lossy(&out.stdout);
            let version = text.split_whitespace().nth(1).and_then(|v| v.parse().ok());
            Some(version.unwrap_or_else(|| panic!("unexpected systemd-analyze --version: {text}")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run systemd-analyze: {e}"),
    }
}

/// `path` as the executable of a systemd command line: `%` (specifiers) and
/// `$` (variables) doubled, quoted when it holds anything but plain
/// path characters.
fn systemd_exec_path(path: &Path) -> String {
    let Some(s) = path.to_str() else {
        panic!("binary path is not UTF-8: {}", path.display())
    };
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._+-".contains(c))
    {
        return s.to_string();
    }
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('%', "%%")
        .replace('$', "$$");
    format!("\"{escaped}\"")
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    let Some(version) = systemd_analyze_version() else {
        eprintln!(
            "SKIPPED systemd_analyze_verify_accepts_the_units: systemd-analyze is not \
             installed (Debian package `systemd`); the units were not verified"
        );
        return;
    };
    // The units run /usr/bin/outpost-*, which verify insists exists. The
    // copies run the binaries just built instead: only the executable of
    // the Exec*= lines that name our programs changes. (`verify --root=DIR`
    // would need no rewriting, but it also looks up every unit ours pull in
    // (sysinit.target, ...) under DIR, i.e. a copy of the host's unit tree.)
    let dir = tempfile::tempdir().expect("temp dir");
    let mut copies = Vec::new();
    for name in [AGENT_UNIT, AGGREGATOR_UNIT] {
        let text = std::fs::read_to_string(workspace_root().join("deploy/systemd").join(name))
            .expect("read unit");
        let mut out = String::new();
        for line in text.lines() {
            let rewritten = line.split_once('=').and_then(|(key, value)| {
                if !key.trim().starts_with("Exec") {
                    return None;
                }
                let program = value.trim().strip_prefix(&format!("{BIN_DIR}/"))?;
                let (program, rest) = program.split_once(' ').unwrap_or((program, ""));
                if !program.starts_with("outpost-") {
                    return None;
                }
                Some(format!(
                    "{}={} {rest}",
                    key.trim(),
                    systemd_exec_path(&binary(program))
                ))
            });
            out.push_str(rewritten.as_deref().unwrap_or(line));
            out.push('\n');
        }
        let copy = dir.path().join(name);
        std::fs::write(&copy, out).expect("write unit copy");
        copies.push(copy);
    }

    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify");
    if version >= 250 {
        // Exit status about our units only, not the units they pull in.
        cmd.arg("--recursive-errors=no");
    }
    let out = cmd
        .args(&copies)
        .output()
        .expect("run systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every line verify prints about our units is a finding (warnings
    // included: an unknown key or a bad value is only "ignored" by systemd).
    // Lines about other units (the host's own, pulled in as dependencies)
    // are shown but are not ours to fix.
    let (ours, others): (Vec<&str>, Vec<&str>) = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .partition(|l| l.contains(AGENT_UNIT) || l.contains(AGGREGATOR_UNIT));
    for l in &others {
        eprintln!("systemd-analyze (not about our units, ignored): {l}");
    }
    assert!(
        ours.is_empty(),
        "systemd-analyze verify (systemd {version}) reports problems in our units:\n{}",
        ours.join("\n")
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify (systemd {version}) failed ({}):\n{text}",
        out.status
    );
    eprintln!("systemd-analyze verify (systemd {version}): {AGENT_UNIT}, {AGGREGATOR_UNIT} ok");
}

/// Messages received on the notify socket, with when they arrived.
type Notifications = Vec<(Instant, String)>;

/// Reads `socket` into `seen` until `done(seen)`; panics after `timeout`,
/// or when `child` has exited and nothing more arrives.
fn receive_until(
    name: &str,
    child: &mut Child,
    socket: &UnixDatagram,
    seen: &mut Notifications,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Notifications) -> bool,
) {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1024];
    while !done(seen) {
        assert!(
            Instant::now() < deadline,
            "{name}: timed out waiting for {what}; received {:?}",
            seen.iter().map(|(_, m)| m).collect::<Vec<_>>()
        );
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.extend(text.lines().map(|l| (Instant::now(), l.to_string())));
            }
            Err(_) => {
                if let Some(status) = child.try_wait() {
                    panic!("{name}: exited ({status}) while waiting for {what}");
                }
            }
        }
    }
}

/// When the `WATCHDOG=1` messages after `READY=1` arrived.
fn pings_after_ready(seen: &Notifications) -> Vec<Instant> {
    match seen.iter().position(|(_, m)| m == "READY=1") {
        Some(i) => seen[i..]
            .iter()
            .filter(|(_, m)| m == "WATCHDOG=1")
            .map(|(t, _)| *t)
            .collect(),
        None => Vec::new(),
    }
}

/// Runs `cmd` as systemd would run a `Type=notify` service with
/// `WatchdogSec=2s`, and checks what it sends to `$NOTIFY_SOCKET`: `READY=1`,
/// then `WATCHDOG=1` about every second, then `STOPPING=1` after SIGTERM
/// and a clean exit.
fn check_sd_notify(name: &str, dir: &Path, mut cmd: Command) {
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path)
        .unwrap_or_else(|e| panic!("bind {}: {e}", socket_path.display()));
    if let Err(e) = socket.set_read_timeout(Some(Duration::from_millis(200))) {
        panic!("notify socket timeout: {e}");
    }
    cmd.env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("WATCHDOG_PID");
    let mut child = Child::spawn(name, cmd);

    let mut seen = Notifications::new();
    receive_until(
        name,
        &mut child,
        &socket,
        &mut seen,
        "READY=1 and four WATCHDOG=1",
        Duration::from_secs(60),
        |s| pings_after_ready(s).len() >= 4,
    );
    // The mean period over three intervals: a stall followed by a catch-up
    // tick does not move it.
    let pings = pings_after_ready(&seen);
    let period = (pings[3] - pings[0]) / 3;
    assert!(
        period >= Duration::from_millis(500) && period < Duration::from_millis(1900),
        "{name}: WATCHDOG=1 every {period:?}, expected about 1s (half of WATCHDOG_USEC)"
    );
    child.signal("TERM");
    receive_until(
        name,
        &mut child,
        &socket,
        &mut seen,
        "STOPPING=1",
        Duration::from_secs(30),
        |s| s.iter().any(|(_, m)| m == "STOPPING=1"),
    );
    let status = child.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{name}: exit after SIGTERM: {status}");
}

#[test]
fn agent_speaks_sd_notify() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("agent.toml");
    // No sources and no broker: readiness needs neither.
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"notify-test\"\n[mqtt]\nport = {}\n\
             [buffer]\npath = \"{}\"\n[metrics]\nlisten = \"\"\n[shutdown]\ngrace = \"1s\"\n",
            free_port(),
            dir.path().join("buffer.sqlite").display()
        ),
    )
    .expect("write config");
    let mut cmd = Command::new(binary("outpost-agent"));
    cmd.arg("--config").arg(&config);
    check_sd_notify("outpost-agent", dir.path(), cmd);
}

#[test]
fn aggregator_speaks_sd_notify() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rules = dir.path().join("rules.d");
    std::fs::create_dir(&rules).expect("rules dir");
    let config = dir.path().join("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{}\"\n[api]\nlisten = \"127.0.0.1:{}\"\n\
             [state]\npath = \"{}\"\n[rules]\ndir = \"{}\"\n[shutdown]\ngrace = \"1s\"\n",
            free_port(),
            free_port(),
            dir.path().join("state.sqlite").display(),
            rules.display()
        ),
    )
    .expect("write config");
    let mut cmd = Command::new(binary("outpost-aggregator"));
    cmd.arg("--config").arg(&config);
    check_sd_notify("outpost-aggregator", dir.path(), cmd);
}
