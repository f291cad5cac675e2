//! The real programs together: `outpost-sim` streams frames into a pty,
//! `outpost-agent` reads it and publishes through the embedded broker of
//! `outpost-aggregator`, whose acks empty the agent's buffer.

use std::process::Command;
use std::time::Duration;

use outpost_tests::{binary, free_port, http_get, metric_value, start_sim_pty, wait_until, Child};

const LONG: Duration = Duration::from_secs(90);

#[test]
fn simulator_agent_and_aggregator_deliver_everything_and_acks_empty_the_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, api, agent_http) = (free_port(), free_port(), free_port());
    let agg_cfg = dir.path().join("aggregator.toml");
    std::fs::write(
        &agg_cfg,
        format!(
            "[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{mqtt}\"\n[state]\npath = \"{}\"\n[api]\nlisten = \"127.0.0.1:{api}\"\n",
            dir.path().join("state.sqlite").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(binary("outpost-aggregator"));
    cmd.arg("--config").arg(&agg_cfg);
    let _aggregator = Child::spawn("outpost-aggregator", cmd);

    let (mut sim, pty) = start_sim_pty(&[
        "--rate",
        "20",
        "--channels",
        "3",
        "--scenario",
        "ramp",
        "--ramp-period",
        "10",
    ]);
    let agent_cfg = dir.path().join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "[device]\nid = \"e2e-1\"\nlabels = {{ site = \"lab\" }}\n[mqtt]\nport = {mqtt}\nmax-reconnect-backoff = \"500ms\"\n[buffer]\npath = \"{}\"\ncommit-interval = \"200ms\"\n[metrics]\nlisten = \"127.0.0.1:{agent_http}\"\n[[sources]]\ntype = \"serial-frames\"\nname = \"sim\"\npath = \"{pty}\"\n",
            dir.path().join("buffer.sqlite").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(binary("outpost-agent"));
    cmd.arg("--config").arg(&agent_cfg);
    let mut agent = Child::spawn("outpost-agent", cmd);

    let api_addr = format!("127.0.0.1:{api}");
    let device = wait_until(LONG, "300 readings of e2e-1 at the aggregator", || {
        let (status, body) = http_get(&api_addr, "/api/v1/devices/e2e-1")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (status == 200 && v["readings_total"].as_u64()? >= 300).then_some(v)
    });
    let sensors: Vec<&str> = device["last_values"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["sensor"].as_str())
        .collect();
    for s in ["temperature", "humidity", "pressure"] {
        assert!(sensors.contains(&s), "{s} in {sensors:?}");
    }
    assert_eq!(device["duplicates_total"], 0, "{device}");
    assert_eq!(device["gap_readings_total"], 0, "{device}");

    // Stop the sensor: every reading the agent buffered gets acknowledged
    // and deleted, and the aggregator has each of them exactly once.
    sim.kill();
    let agent_addr = format!("127.0.0.1:{agent_http}");
    let acked = wait_until(LONG, "the agent's buffer to empty", || {
        let (_, m) = http_get(&agent_addr, "/metrics")?;
        let rows = metric_value(&m, "outpost_agent_buffer_rows")?;
        let appended = metric_value(&m, "outpost_agent_buffer_appended_total")?;
        (rows == 0.0).then_some(appended)
    });
    let processed = wait_until(LONG, "the aggregator's count", || {
        let (_, body) = http_get(&api_addr, "/api/v1/devices/e2e-1")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let n = v["readings_total"].as_u64()?;
        (n as f64 >= acked).then_some(n)
    });
    assert_eq!(
        processed as f64, acked,
        "every buffered reading processed once"
    );
    agent.signal("TERM");
    let status = agent.wait_exit(LONG);
    assert!(status.success(), "agent exit: {status}");
    println!("sim -> agent -> aggregator: {processed} readings stored, processed once each, agent buffer empty");
}
