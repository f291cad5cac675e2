//! `cargo run -p outpost-tests --bin outpost-demo`: the whole local system in
//! one command. It builds the programs, then starts in a temporary directory:
//! the aggregator with its embedded broker, `outpost-sim` creating a
//! pseudo-terminal with a ramp scenario (with a little line noise), and an
//! agent reading that pty. Every few seconds it prints what the aggregator
//! knows about the device; Ctrl-C stops everything (children are killed and
//! reaped).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_tests::{binary, free_port, http_get, metric_value, start_sim_pty, Child};

const DEVICE: &str = "demo-pumphouse";
const REPORT_EVERY: Duration = Duration::from_secs(5);

fn main() {
    eprintln!("outpost-demo: building the Outpost programs (the first run takes a few minutes)...");
    let aggregator_bin = binary("outpost-aggregator");
    let agent_bin = binary("outpost-agent");
    let dir = tempfile::tempdir().expect("temporary directory");
    let (mqtt, api, agent_http) = (free_port(), free_port(), free_port());

    let agg_cfg = dir.path().join("aggregator.toml");
    std::fs::write(
        &agg_cfg,
        format!(
            "[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{mqtt}\"\n[state]\npath = \"{}\"\n[api]\nlisten = \"127.0.0.1:{api}\"\n[rules]\ndir = \"{}\"\n",
            dir.path().join("aggregator.sqlite").display(),
            outpost_tests::workspace_root().join("deploy/rules.d").display()
        ),
    )
    .expect("write aggregator config");
    let mut cmd = Command::new(aggregator_bin);
    cmd.arg("--config")
        .arg(&agg_cfg)
        .env("OUTPOST_LOG", "info,rumqttd=warn");
    let mut aggregator = Child::spawn_with("aggregator", cmd, true);

    let (sim, pty) = start_sim_pty(&[
        "--scenario",
        "ramp",
        "--rate",
        "2",
        "--ramp-period",
        "60",
        "--garbage",
        "0.02",
    ]);
    let agent_cfg = dir.path().join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "[device]\nid = \"{DEVICE}\"\nlabels = {{ site = \"demo\" }}\n[mqtt]\nport = {mqtt}\nmax-reconnect-backoff = \"1s\"\n[buffer]\npath = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{agent_http}\"\n[[sources]]\ntype = \"serial-frames\"\nname = \"sim\"\npath = \"{pty}\"\n",
            dir.path().join("agent-buffer.sqlite").display()
        ),
    )
    .expect("write agent config");
    let mut cmd = Command::new(agent_bin);
    cmd.arg("--config").arg(&agent_cfg);
    let mut agent = Child::spawn_with("agent", cmd, true);
    let _sim = sim;

    eprintln!();
    eprintln!("outpost-demo: running. Sensor: outpost-sim on {pty} (ramp 20 -> 90 -> 20 over 60 s, 2% line noise)");
    eprintln!("  aggregator API:   http://127.0.0.1:{api}/api/v1/devices   http://127.0.0.1:{api}/api/v1/devices/{DEVICE}");
    eprintln!("  alerts and rules: http://127.0.0.1:{api}/api/v1/alerts   http://127.0.0.1:{api}/api/v1/rules   (rules: deploy/rules.d)");
    eprintln!("  alert delivery:   http://127.0.0.1:{api}/api/v1/alerts/history   http://127.0.0.1:{api}/api/v1/outbox   (live: curl -N http://127.0.0.1:{api}/api/v1/alerts/stream)");
    eprintln!(
        "  aggregator:       http://127.0.0.1:{api}/metrics   http://127.0.0.1:{api}/healthz"
    );
    eprintln!("  agent:            http://127.0.0.1:{agent_http}/metrics   http://127.0.0.1:{agent_http}/healthz");
    eprintln!("  MQTT broker:      127.0.0.1:{mqtt}");
    eprintln!("Ctrl-C stops everything.");
    eprintln!();

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).expect("install signal handler");
    }
    let api_addr = format!("127.0.0.1:{api}");
    let agent_addr = format!("127.0.0.1:{agent_http}");
    let mut next_report = Instant::now() + REPORT_EVERY;
    loop {
        for (name, child) in [("aggregator", &mut aggregator), ("agent", &mut agent)] {
            if let Some(status) = child.try_wait() {
                eprintln!("outpost-demo: {name} exited ({status}); stopping");
                return;
            }
        }
        if stop.load(Ordering::Relaxed) {
            eprintln!("outpost-demo: stopping");
            break;
        }
        if Instant::now() >= next_report {
            next_report = Instant::now() + REPORT_EVERY;
            report(&api_addr, &agent_addr);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One summary line of what flows: the aggregator's view of the device and
/// the agent's buffer.
fn report(api: &str, agent: &str) {
    let device = http_get(api, &format!("/api/v1/devices/{DEVICE}"))
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok());
    let Some(d) = device.filter(|d| d.get("readings_total").is_some()) else {
        eprintln!("[demo] waiting for the first readings...");
        return;
    };
    let values: Vec<String> = d["last_values"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .map(|v| format!("{}={}", v["sensor"].as_str().unwrap_or("?"), v["value"]))
                .collect()
        })
        .unwrap_or_default();
    let metrics = http_get(agent, "/metrics")
        .map(|(_, m)| m)
        .unwrap_or_default();
    let buffered = metric_value(&metrics, "outpost_agent_buffer_rows").unwrap_or(f64::NAN);
    let noise = metric_value(&metrics, "outpost_agent_source_errors_total").unwrap_or(0.0);
    eprintln!(
        "[demo] {DEVICE}: {} readings processed, online={}, agent buffer {buffered} rows, {noise} line errors caught | {}",
        d["readings_total"],
        d["online"],
        values.join(" ")
    );
}
