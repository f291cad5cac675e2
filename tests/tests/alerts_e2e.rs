//! Sensor to operator with the real programs: `outpost-sim`'s ramp scenario
//! drives the temperature through 80 degC; `outpost-agent` reads the pty and
//! publishes to `outpost-aggregator`, whose threshold rule fires and
//! resolves; the notifications reach a webhook receiver in the test, signed,
//! in order, each once.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_tests::{binary, free_port, start_sim_pty, wait_until, Child, WebhookReceiver};

const LONG: Duration = Duration::from_secs(90);

const RULE: &str = r#"
[[rule]]
name = "boiler-overheat"
sensor = "temperature"
kind = "threshold"
above = 80
clear-below = 75
severity = "critical"
summary = "{device}: {sensor} is {value} (limit {threshold})"
"#;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[test]
fn the_ramp_scenario_fires_and_resolves_an_alert_at_the_webhook() {
    let started_ms = now_ms();
    let dir = tempfile::tempdir().unwrap();
    let hook = WebhookReceiver::start(200);
    let (mqtt, api) = (free_port(), free_port());
    let rules = dir.path().join("rules.d");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(rules.join("boiler.toml"), RULE).unwrap();
    let agg_cfg = dir.path().join("aggregator.toml");
    std::fs::write(
        &agg_cfg,
        format!(
            "[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{mqtt}\"\n[state]\npath = \"{}\"\n\
             [api]\nlisten = \"127.0.0.1:{api}\"\n[rules]\ndir = \"{}\"\n\
             [alerts]\ndefault-sinks = [\"ops\"]\n\
             [[alerts.sink]]\nname = \"ops\"\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"e2e-secret\"\n",
            dir.path().join("state.sqlite").display(),
            rules.display(),
            hook.url
        ),
    )
    .unwrap();
    let mut cmd = Command::new(binary("outpost-aggregator"));
    cmd.arg("--config").arg(&agg_cfg);
    let _aggregator = Child::spawn("outpost-aggregator", cmd);

    // 20 -> 90 -> 20 degC every 10 s: above 80 for about 1.4 s per period.
    let (_sim, pty) = start_sim_pty(&[
        "--rate",
        "20",
        "--channels",
        "1",
        "--scenario",
        "ramp",
        "--ramp-period",
        "10",
    ]);
    let agent_cfg = dir.path().join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "[device]\nid = \"boiler-7\"\n[mqtt]\nport = {mqtt}\nmax-reconnect-backoff = \"500ms\"\n\
             [buffer]\npath = \"{}\"\ncommit-interval = \"200ms\"\n\
             [[sources]]\ntype = \"serial-frames\"\nname = \"sim\"\npath = \"{pty}\"\n",
            dir.path().join("buffer.sqlite").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(binary("outpost-agent"));
    cmd.arg("--config").arg(&agent_cfg);
    let _agent = Child::spawn("outpost-agent", cmd);

    let got = wait_until(LONG, "a firing and its resolve at the webhook", || {
        let acc = hook.accepted();
        let firing = acc.iter().position(|r| r.json()["state"] == "firing")?;
        let fp = acc[firing].json()["fingerprint"].clone();
        acc[firing..]
            .iter()
            .any(|r| r.json()["state"] == "resolved" && r.json()["fingerprint"] == fp)
            .then_some(acc)
    });
    let notes: Vec<serde_json::Value> = got.iter().map(|r| r.json()).collect();
    let firing = notes.iter().find(|n| n["state"] == "firing").unwrap();
    let resolved = notes
        .iter()
        .find(|n| n["state"] == "resolved" && n["fingerprint"] == firing["fingerprint"])
        .unwrap();
    println!("webhook got: {firing}\n{resolved}");
    assert_eq!(firing["rule"], "boiler-overheat");
    assert_eq!(firing["device"], "boiler-7");
    assert_eq!(firing["sensor"], "temperature");
    assert_eq!(firing["severity"], "critical");
    assert!(firing["value"].as_f64().unwrap() > 80.0, "{firing}");
    assert!(resolved["value"].as_f64().unwrap() < 75.0, "{resolved}");
    assert_eq!(firing["threshold"], 80.0);
    // Event times are the simulator's readings' times: within this run.
    let (t_fire, t_res) = (
        firing["event_time_ms"].as_i64().unwrap(),
        resolved["event_time_ms"].as_i64().unwrap(),
    );
    assert!(
        t_fire >= started_ms - 1000 && t_fire <= now_ms(),
        "{firing}"
    );
    assert!(t_res > t_fire, "resolves after it fired");
    assert_eq!(resolved["active_since_ms"], firing["active_since_ms"]);
    assert!(resolved["number"].as_u64() > firing["number"].as_u64());
    // What the aggregator measured from computing the transition to the
    // receiver's 2xx (reported, not asserted: timing is not a test here).
    if let Some((_, m)) = outpost_tests::http_get(&format!("127.0.0.1:{api}"), "/metrics") {
        let sum =
            outpost_tests::metric_value(&m, "outpost_aggregator_notification_latency_seconds_sum");
        let count = outpost_tests::metric_value(
            &m,
            "outpost_aggregator_notification_latency_seconds_count",
        );
        if let (Some(sum), Some(count)) = (sum, count) {
            println!(
                "transition -> webhook 2xx: {count} notifications, mean {:.1} ms",
                sum / count.max(1.0) * 1000.0
            );
        }
    }
    // Signed, with the idempotency key, each notification once.
    let mut ids = std::collections::HashSet::new();
    for r in &got {
        let sig = &r.headers["x-outpost-signature"];
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64, "{sig}");
        assert_eq!(r.headers["x-outpost-idempotency-key"], r.json()["id"]);
        assert!(ids.insert(r.json()["id"].to_string()), "delivered twice");
    }
}
