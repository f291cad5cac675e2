//! End-to-end with the real programs, from sensor to operator, including
//! faults on the alert side: the ramp scenario's alert matches what the
//! simulator sent; an aggregator killed while a webhook is failing delivers
//! every notification once after it recovers; a hostile serial line still
//! delivers valid readings and counts the corruption; a rule file edited
//! while running takes effect, and a broken edit is reported while the old
//! rules stay.
//!
//! Each test prints a `FAULT ...` line with its counts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outpost_tests::{
    free_port, start_sim_pty, wait_until, AgentProc, AggregatorProc, WebhookReceiver,
};

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

/// Aggregator config tables: rules from `rules`, every alert to a webhook
/// that retries quickly.
fn alerting(rules: &std::path::Path, hook: &str) -> String {
    format!(
        "[rules]\ndir = \"{}\"\n[alerts]\ndefault-sinks = [\"ops\"]\n\
         [[alerts.sink]]\nname = \"ops\"\ntype = \"webhook\"\nurl = \"{hook}\"\nsecret = \"e2e-secret\"\n\
         retry-initial = \"200ms\"\nretry-max = \"1s\"\n",
        rules.display()
    )
}

fn rules_dir(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let rules = dir.join("rules.d");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(rules.join("boiler.toml"), text).unwrap();
    rules
}

/// `(t_ms, value)` of every sample `outpost-sim --verbose` logged.
fn samples(sim_stderr: &[String]) -> Vec<(i64, f64)> {
    sim_stderr
        .iter()
        .filter_map(|l| {
            let t = l.split_whitespace().find_map(|w| w.strip_prefix("t_ms="))?;
            let v = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("temperature="))?;
            Some((t.parse().ok()?, v.parse().ok()?))
        })
        .collect()
}

#[test]
fn the_ramp_alert_carries_the_simulators_values_and_times() {
    let dir = tempfile::tempdir().unwrap();
    let hook = WebhookReceiver::start(200);
    let rules = rules_dir(dir.path(), RULE);
    let agg = AggregatorProc::start(
        dir.path(),
        free_port(),
        free_port(),
        &alerting(&rules, &hook.url),
    );
    let (sim, pty) = start_sim_pty(&[
        "--rate",
        "20",
        "--channels",
        "1",
        "--scenario",
        "ramp",
        "--ramp-period",
        "10",
        "--verbose",
    ]);
    // Tick time: the readings' timestamps are the firmware's ticks (anchored
    // once to the wall clock), so time differences are the simulator's.
    let _agent = AgentProc::start(
        dir.path(),
        "boiler-7",
        agg.mqtt,
        &pty,
        "",
        "time-source = \"tick\"\n",
    );
    let (firing, resolved) = wait_until(LONG, "a firing and its resolve", || {
        let notes: Vec<serde_json::Value> = hook.accepted().iter().map(|r| r.json()).collect();
        let f = notes.iter().find(|n| n["state"] == "firing")?.clone();
        let r = notes
            .iter()
            .find(|n| n["state"] == "resolved" && n["fingerprint"] == f["fingerprint"])?
            .clone();
        Some((f, r))
    });
    let log = samples(&sim.stderr.lines());
    // The first reading above 80 fired it; the first below 75 after that
    // resolved it (no `for`, no `clear-for`).
    let fire = log.iter().position(|(_, v)| *v > 80.0).unwrap();
    let clear = fire + log[fire..].iter().position(|(_, v)| *v < 75.0).unwrap();
    let (t_fire, v_fire) = log[fire];
    let (t_clear, v_clear) = log[clear];
    let fv = firing["value"].as_f64().unwrap();
    let rv = resolved["value"].as_f64().unwrap();
    assert!(
        (fv - v_fire).abs() < 0.01,
        "firing value {fv}, sim sent {v_fire}"
    );
    assert!(
        (rv - v_clear).abs() < 0.01,
        "resolve value {rv}, sim sent {v_clear}"
    );
    let de =
        resolved["event_time_ms"].as_i64().unwrap() - firing["event_time_ms"].as_i64().unwrap();
    assert!(
        (de - (t_clear - t_fire)).abs() <= 1,
        "event times {de} ms apart, the simulator's readings {} ms apart",
        t_clear - t_fire
    );
    assert_eq!(firing["device"], "boiler-7");
    assert_eq!(firing["active_since_ms"], firing["event_time_ms"]);
    println!(
        "FAULT none (happy path): fired at {fv} (sim {v_fire} at t={t_fire} ms), resolved at {rv} (sim {v_clear} at t={t_clear} ms), {de} ms apart"
    );
}

#[test]
fn an_aggregator_killed_while_the_webhook_fails_delivers_every_notification_once() {
    let dir = tempfile::tempdir().unwrap();
    let hook = WebhookReceiver::start(503);
    let rules = rules_dir(dir.path(), RULE);
    let mut agg = AggregatorProc::start(
        dir.path(),
        free_port(),
        free_port(),
        &alerting(&rules, &hook.url),
    );
    // 20 -> 90 -> 20 every 4 s: an episode (firing + resolve) per period.
    let (mut sim, pty) = start_sim_pty(&[
        "--rate",
        "20",
        "--channels",
        "1",
        "--scenario",
        "ramp",
        "--ramp-period",
        "4",
    ]);
    let agent = AgentProc::start(dir.path(), "boiler-9", agg.mqtt, &pty, "", "");
    wait_until(LONG, "four notifications queued and refused", || {
        let pending = agg.get("/api/v1/outbox?status=pending")?["totals"]["pending"].as_u64()?;
        (pending >= 4 && !hook.all().is_empty()).then_some(())
    });
    let refused_before = hook.all().len();
    agg.child.kill();
    agg.restart();
    // The restarted aggregator keeps failing against the 503 receiver...
    wait_until(LONG, "retries after the restart", || {
        (hook.all().len() > refused_before).then_some(())
    });
    // ...until it recovers. Stop the sensor so the set of transitions is final.
    sim.kill();
    wait_until(LONG, "the agent's buffer to empty", || {
        (agent.metric("outpost_agent_buffer_rows")? == 0.0).then_some(())
    });
    hook.set_status(200);
    wait_until(LONG, "the outbox to empty", || {
        let v = agg.get("/api/v1/outbox?status=pending")?;
        (v["totals"]["pending"].as_u64()? == 0).then_some(())
    });
    // Every notified transition in the history was accepted exactly once.
    let history = agg.get("/api/v1/alerts/history?limit=1000").unwrap();
    let expected: HashSet<String> = history["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| !t["deliveries"].as_array().unwrap().is_empty())
        .map(|t| format!("{}-{}", t["fingerprint"].as_str().unwrap(), t["number"]))
        .collect();
    let mut accepted: HashMap<String, usize> = HashMap::new();
    for r in hook.accepted() {
        *accepted
            .entry(r.json()["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let twice: Vec<_> = accepted.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "accepted more than once: {twice:?}");
    let got: HashSet<String> = accepted.keys().cloned().collect();
    assert_eq!(got, expected, "every notified transition arrived");
    assert!(expected.len() >= 4, "{expected:?}");
    // In order per alert: numbers grow in arrival order.
    let numbers: Vec<u64> = hook
        .accepted()
        .iter()
        .map(|r| r.json()["number"].as_u64().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
    println!(
        "FAULT aggregator SIGKILL during delivery: notifications={} refused_attempts={} delivered={} duplicates=0 lost=0",
        expected.len(),
        hook.all().len() - hook.accepted().len(),
        hook.accepted().len()
    );
}

#[test]
fn a_hostile_serial_line_still_delivers_valid_readings_and_counts_the_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let agg = AggregatorProc::start(dir.path(), free_port(), free_port(), "");
    let (mut sim, pty) = start_sim_pty(&[
        "--rate",
        "100",
        "--channels",
        "2",
        "--scenario",
        "ramp",
        "--garbage",
        "0.3",
    ]);
    let agent = AgentProc::start(dir.path(), "noisy-1", agg.mqtt, &pty, "", "");
    let device = wait_until(LONG, "500 readings through the noise", || {
        let d = agg.device("noisy-1")?;
        (d["readings_total"].as_u64()? >= 500).then_some(d)
    });
    let errors = wait_until(LONG, "the agent to count corrupt frames", || {
        let crc = agent.metric("outpost_agent_source_errors_total{source=\"sim\",kind=\"crc\"}")?;
        let all = agent.metric("outpost_agent_source_errors_total")?;
        (crc > 0.0 && all > 0.0).then_some(all)
    });
    // No invented value: everything that arrived is a value of the ramp.
    for v in device["last_values"].as_array().unwrap() {
        let x = v["value"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&x), "{v}");
    }
    assert_eq!(device["gap_readings_total"], 0, "{device}");
    // A clean stop makes the simulator print its summary (garbage events).
    sim.signal("TERM");
    sim.wait_exit(LONG);
    let summary = sim.stderr.text();
    println!(
        "FAULT hostile serial line (--garbage 0.3): aggregator readings={} agent source errors={errors} sim: {}",
        device["readings_total"],
        summary.lines().last().unwrap_or("")
    );
}

#[test]
fn a_rule_edited_while_running_takes_effect_and_a_broken_edit_keeps_the_old_rules() {
    let dir = tempfile::tempdir().unwrap();
    let hook = WebhookReceiver::start(200);
    // At first no rule can fire: the ramp never goes above 1000.
    let quiet = RULE
        .replace("above = 80", "above = 1000")
        .replace("clear-below = 75", "clear-below = 900");
    let rules = rules_dir(dir.path(), &quiet);
    let agg = AggregatorProc::start(
        dir.path(),
        free_port(),
        free_port(),
        &alerting(&rules, &hook.url),
    );
    let (_sim, pty) = start_sim_pty(&[
        "--rate",
        "20",
        "--channels",
        "1",
        "--scenario",
        "ramp",
        "--ramp-period",
        "6",
    ]);
    let _agent = AgentProc::start(dir.path(), "boiler-3", agg.mqtt, &pty, "", "");
    wait_until(LONG, "readings to flow", || {
        (agg.device("boiler-3")?["readings_total"].as_u64()? > 20).then_some(())
    });
    // Edit: the limit drops to 80; no restart.
    std::fs::write(rules.join("boiler.toml"), RULE).unwrap();
    let n = wait_until(LONG, "the edited rule to fire at the webhook", || {
        hook.accepted()
            .iter()
            .map(|r| r.json())
            .find(|n| n["state"] == "firing")
    });
    assert_eq!(n["threshold"], 80.0);
    // A broken edit: reported, and the working rule stays.
    std::fs::write(
        rules.join("boiler.toml"),
        "[[rule]]\nname = \"boiler-overheat\"\nkind = \"threshold\"\nabove = \"hot\"\n",
    )
    .unwrap();
    let status = wait_until(LONG, "the error at /api/v1/rules", || {
        let v = agg.get("/api/v1/rules")?;
        (!v["errors"].as_array()?.is_empty()).then_some(v)
    });
    assert_eq!(status["last_reload_ok"], false);
    assert_eq!(status["rules"][0]["name"], "boiler-overheat");
    assert!(
        status["errors"][0]
            .as_str()
            .unwrap()
            .contains("boiler.toml"),
        "{status}"
    );
    // The old rule keeps working: another episode fires after the bad edit.
    let firings = hook
        .accepted()
        .iter()
        .filter(|r| r.json()["state"] == "firing")
        .count();
    wait_until(LONG, "another firing under the kept rule", || {
        (hook
            .accepted()
            .iter()
            .filter(|r| r.json()["state"] == "firing")
            .count()
            > firings)
            .then_some(())
    });
    println!(
        "FAULT rule reload: edit applied without restart, broken edit reported ({}), old rule kept firing",
        status["errors"][0]
    );
}
