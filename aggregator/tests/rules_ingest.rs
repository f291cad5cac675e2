//! The rules engine inside the running aggregator: batches published to the
//! embedded broker drive a threshold rule to fire and resolve; a firing
//! alert survives a restart without a resolve/fire pair; rule files reload
//! on change, and a broken edit keeps the old rules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;

use rumqttc::AsyncClient;
use support::aggregator::{
    client, embedded_toml, free_port, get, metrics, send_temperatures, wait, Agg,
};

const RULE: &str = r#"
[[rule]]
name = "boiler-hot"
sensor = "temperature"
kind = "threshold"
above = 80
clear-below = 75
for = "2s"
severity = "critical"
summary = "{device} temperature {value} above {threshold}"
"#;

async fn start(port: u16, dir: &Path, rules: &Path) -> Agg {
    support::aggregator::start(&embedded_toml(port, dir, rules, "")).await
}

async fn send(c: &AsyncClient, first_seq: u64, t0: i64, values: &[f32]) {
    send_temperatures(c, "boiler-1", first_seq, t0, values).await;
}

fn firing(api: std::net::SocketAddr) -> Vec<serde_json::Value> {
    get(api, "/api/v1/alerts")["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing")
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_through_the_broker_fire_and_resolve_a_threshold_rule_and_state_survives_restart()
{
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.d");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(rules.join("boiler.toml"), RULE).unwrap();
    let port = free_port();
    let agg = start(port, dir.path(), &rules).await;
    let c = client(port, "dev").await;
    let t0 = 1_700_000_000_000i64;
    // 70, then 85 for 4 s: pending, then firing after `for = 2s` (event time).
    send(&c, 1, t0, &[70.0, 85.0, 85.0, 85.0, 85.0]).await;
    let api = agg.api;
    let alert = wait("the alert to fire", || firing(api).into_iter().next()).await;
    assert_eq!(alert["rule"], "boiler-hot");
    assert_eq!(alert["device"], "boiler-1");
    assert_eq!(
        alert["event_time_ms"],
        t0 + 3000,
        "fires 2 s after the first reading above 80"
    );
    assert!(
        alert["summary"]
            .as_str()
            .unwrap()
            .contains("boiler-1 temperature 85"),
        "{alert}"
    );
    agg.stop().await;

    // Restart: the alert is still firing, and no transition was emitted.
    let agg = start(port, dir.path(), &rules).await;
    let api = agg.api;
    assert_eq!(firing(api).len(), 1, "still firing after the restart");
    let m = metrics(api);
    assert!(
        !m.contains("outpost_aggregator_alert_transitions_total{state=\"resolved\"}"),
        "no resolve after restart: {m}"
    );
    assert!(
        !m.contains("outpost_aggregator_alert_transitions_total{state=\"firing\"}"),
        "no re-fire after restart: {m}"
    );

    // 78 is inside the hysteresis band: still firing. 74 resolves.
    let c = client(port, "dev2").await;
    send(&c, 6, t0 + 5000, &[78.0, 78.0, 74.0]).await;
    wait("the alert to resolve", || {
        firing(api).is_empty().then_some(())
    })
    .await;
    let m = metrics(api);
    assert!(
        m.contains("outpost_aggregator_alert_transitions_total{state=\"resolved\"} 1"),
        "{m}"
    );
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_files_reload_on_change_and_a_broken_edit_keeps_the_old_rules() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.d");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(rules.join("boiler.toml"), RULE).unwrap();
    let port = free_port();
    let agg = start(port, dir.path(), &rules).await;
    let api = agg.api;
    assert_eq!(
        get(api, "/api/v1/rules")["rules"].as_array().unwrap().len(),
        1
    );

    let second = RULE
        .replace("boiler-hot", "boiler-very-hot")
        .replace("above = 80", "above = 95")
        .replace("clear-below = 75", "clear-below = 90");
    std::fs::write(rules.join("more.toml"), second).unwrap();
    wait("the new rule to load", || {
        (get(api, "/api/v1/rules")["rules"].as_array()?.len() == 2).then_some(())
    })
    .await;

    std::fs::write(
        rules.join("more.toml"),
        "[[rule]]\nname = \"broken\"\nkind = \"threshold\"\nabove = \"hot\"\n",
    )
    .unwrap();
    let status = wait("the error to show", || {
        let v = get(api, "/api/v1/rules");
        (!v["errors"].as_array()?.is_empty()).then_some(v)
    })
    .await;
    assert_eq!(status["last_reload_ok"], false);
    assert_eq!(
        status["rules"].as_array().unwrap().len(),
        2,
        "the previous rules stay active"
    );
    assert!(
        status["errors"][0].as_str().unwrap().contains("more.toml:"),
        "{status}"
    );
    agg.stop().await;
}
