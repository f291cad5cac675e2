//! Alert delivery through the running aggregator: readings published to the
//! embedded broker fire and resolve a rule; the notifications go through
//! the durable outbox to a real HTTP receiver in the test (down, then up;
//! with and without an aggregator restart in between), to an MQTT
//! subscriber, and to the SSE stream; a notification that cannot be
//! delivered within its max age is dead-lettered and shown by the API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod support;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use support::aggregator::{
    client, embedded_toml, free_port, get, metric, send_temperatures, wait, Agg, LONG,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
const SECRET: &str = "test-signing-secret";

const RULE: &str = r#"
[[rule]]
name = "boiler-hot"
sensor = "temperature"
kind = "threshold"
above = 80
clear-below = 75
severity = "critical"
summary = "{device} temperature {value} above {threshold}"
"#;

/// One request the receiver got, and what it answered.
#[derive(Debug, Clone)]
struct Req {
    answered: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Req {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A webhook receiver: answers `status` (changeable), records everything.
#[derive(Clone, Default)]
struct Receiver {
    status: Arc<AtomicU16>,
    got: Arc<Mutex<Vec<Req>>>,
}

impl Receiver {
    fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }
    fn all(&self) -> Vec<Req> {
        self.got.lock().unwrap().clone()
    }
    fn accepted(&self) -> Vec<Req> {
        self.all()
            .into_iter()
            .filter(|r| r.answered == 200)
            .collect()
    }
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let answered = r.status.load(Ordering::SeqCst);
    r.got.lock().unwrap().push(Req {
        answered,
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    v.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    });
    StatusCode::from_u16(answered).unwrap()
}

async fn start_receiver(status: u16) -> (SocketAddr, Receiver) {
    let r = Receiver::default();
    r.set(status);
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(r.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (addr, r)
}

/// Starts the aggregator with the rule above and `alerts` (TOML text).
async fn start(port: u16, dir: &Path, alerts: &str) -> Agg {
    let rules = dir.join("rules.d");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(rules.join("boiler.toml"), RULE).unwrap();
    support::aggregator::start(&embedded_toml(
        port,
        dir,
        &rules,
        &format!("[shutdown]\ngrace = \"1s\"\n{alerts}"),
    ))
    .await
}

const T0: i64 = 1_700_000_000_000;

/// Per device: fire (85), resolve (70), fire again (90): three
/// notifications each, in this order.
async fn fire_resolve_fire(c: &AsyncClient, devices: &[&str]) {
    for d in devices {
        send_temperatures(c, d, 1, T0, &[85.0]).await;
        send_temperatures(c, d, 2, T0 + 1000, &[70.0]).await;
        send_temperatures(c, d, 3, T0 + 2000, &[90.0]).await;
    }
}

fn hmac_hex(secret: &str, msg: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::sign(&key, msg)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn webhook_sink(url: &str, extra: &str) -> String {
    format!(
        "[alerts]\ndefault-sinks = [\"hook\"]\n[[alerts.sink]]\nname = \"hook\"\ntype = \"webhook\"\n\
         url = \"{url}\"\nsecret = \"{SECRET}\"\nheaders = {{ X-Team = \"ops\" }}\n\
         retry-initial = \"100ms\"\nretry-max = \"500ms\"\n{extra}"
    )
}

/// Checks what the receiver accepted: exactly `per_device` states per
/// device in order, each once, signed, with the idempotency key.
fn check_accepted(r: &Receiver, devices: &[&str], per_device: &[&str]) {
    let accepted = r.accepted();
    let mut ids = HashSet::new();
    let mut states: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for req in &accepted {
        let n = req.json();
        let id = n["id"].as_str().unwrap().to_owned();
        assert!(ids.insert(id.clone()), "{id} accepted twice");
        assert_eq!(req.headers["x-outpost-idempotency-key"], id);
        assert_eq!(req.headers["x-team"], "ops");
        let ts = &req.headers["x-outpost-timestamp"];
        let mut signed = format!("{ts}.").into_bytes();
        signed.extend_from_slice(&req.body);
        assert_eq!(
            req.headers["x-outpost-signature"],
            format!("sha256={}", hmac_hex(SECRET, &signed)),
            "signature of {id}"
        );
        assert_eq!(n["schema"], "outpost.alert.v1");
        assert_eq!(n["rule"], "boiler-hot");
        states
            .entry(n["device"].as_str().unwrap().to_owned())
            .or_default()
            .push((
                n["number"].as_u64().unwrap(),
                n["state"].as_str().unwrap().to_owned(),
            ));
    }
    assert_eq!(states.len(), devices.len(), "{states:?}");
    for d in devices {
        let got = &states[*d];
        let names: Vec<&str> = got.iter().map(|(_, s)| s.as_str()).collect();
        assert_eq!(names, per_device, "order of {d}'s notifications");
        assert!(
            got.windows(2).all(|w| w[0].0 < w[1].0),
            "transition numbers grow: {got:?}"
        );
    }
}

async fn receiver_down_then_up(restart: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (addr, r) = start_receiver(500).await;
    let port = free_port();
    let alerts = webhook_sink(&format!("http://{addr}/hook"), "");
    let agg = start(port, dir.path(), &alerts).await;
    let c = client(port, "dev").await;
    let devices = ["boiler-1", "boiler-2"];
    fire_resolve_fire(&c, &devices).await;
    let api = agg.api;
    // Six notifications queued; the receiver saw attempts and refused them.
    wait("six notifications pending", || {
        let v = get(api, "/api/v1/outbox?status=pending");
        (v["totals"]["pending"] == 6).then_some(())
    })
    .await;
    wait("retries against the failing receiver", || {
        (r.all().len() >= 4).then_some(())
    })
    .await;
    // Only the head of each alert is tried while it fails: never a resolve
    // before its firing.
    for req in r.all() {
        assert_eq!(req.json()["state"], "firing", "{:?}", req.json());
        assert_eq!(
            req.json()["number"].as_u64(),
            r.all()[0].json()["number"].as_u64()
        );
    }
    wait("the failures to be counted", || {
        let failed = metric(
            api,
            "outpost_aggregator_notifications_failed_total{sink=\"hook\"}",
        );
        (failed >= 4.0).then_some(())
    })
    .await;
    let agg = if restart {
        agg.stop().await;
        let before = r.all().len();
        let agg = start(port, dir.path(), &alerts).await;
        // The restarted aggregator picks the outbox up and keeps trying.
        wait("retries after the restart", || {
            (r.all().len() > before).then_some(())
        })
        .await;
        agg
    } else {
        agg
    };
    let api = agg.api;
    r.set(200);
    wait("all six notifications accepted", || {
        (r.accepted().len() >= 6).then_some(())
    })
    .await;
    wait("the outbox to empty", || {
        let v = get(api, "/api/v1/outbox?status=pending");
        (v["totals"]["pending"] == 0).then_some(())
    })
    .await;
    check_accepted(&r, &devices, &["firing", "resolved", "firing"]);
    // The history shows each transition delivered to the hook.
    let h = get(api, "/api/v1/alerts/history?device=boiler-1");
    let notified: Vec<&serde_json::Value> = h["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| !t["deliveries"].as_array().unwrap().is_empty())
        .collect();
    assert_eq!(notified.len(), 3, "{h}");
    for t in notified {
        let d = &t["deliveries"][0];
        assert_eq!(d["sink"], "hook");
        assert_eq!(d["status"], "delivered", "{t}");
        assert!(d["attempts"].as_u64().unwrap() >= 1);
    }
    if !restart {
        assert_eq!(
            metric(
                api,
                "outpost_aggregator_notifications_sent_total{sink=\"hook\"}"
            ),
            6.0
        );
    }
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_fails_then_recovers_gets_every_notification_once_in_order_signed() {
    receiver_down_then_up(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_queued_while_the_receiver_is_down_survive_an_aggregator_restart() {
    receiver_down_then_up(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_not_delivered_within_max_age_is_dead_lettered_counted_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, r) = start_receiver(503).await;
    let port = free_port();
    let alerts = webhook_sink(&format!("http://{addr}/hook"), "max-age = \"2s\"\n");
    let agg = start(port, dir.path(), &alerts).await;
    let api = agg.api;
    let c = client(port, "dev").await;
    send_temperatures(&c, "boiler-1", 1, T0, &[85.0]).await;
    let dead = wait("the notification to be dead-lettered", || {
        let v = get(api, "/api/v1/outbox?status=dead");
        (v["totals"]["dead"] == 1).then_some(v)
    })
    .await;
    let n = &dead["notifications"][0];
    assert_eq!(n["sink"], "hook");
    assert_eq!(n["rule"], "boiler-hot");
    assert_eq!(n["device"], "boiler-1");
    assert_eq!(n["state"], "firing");
    let err = n["last_error"].as_str().unwrap();
    assert!(err.contains("max-age") && err.contains("503"), "{err}");
    assert!(n["attempts"].as_u64().unwrap() >= 1, "{n}");
    // Counted once recorded: the API may show the row a moment earlier.
    wait(
        "the dead letter to be counted and the gauge to drop",
        || {
            let dead = metric(
                api,
                "outpost_aggregator_notifications_dead_lettered_total{sink=\"hook\"}",
            );
            let pending = metric(api, "outpost_aggregator_outbox_pending{sink=\"hook\"}");
            (dead == 1.0 && pending == 0.0).then_some(())
        },
    )
    .await;
    // Nothing more is tried once it is dead.
    let tries = r.all().len();
    r.set(200);
    send_temperatures(&c, "boiler-1", 2, T0 + 1000, &[70.0]).await;
    // The resolve (queued after the firing died) is delivered; the dead
    // firing is not sent again.
    wait("the resolve to arrive", || {
        (!r.accepted().is_empty()).then_some(())
    })
    .await;
    let accepted = r.accepted();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].json()["state"], "resolved");
    assert_eq!(r.all().len(), tries + 1);
    agg.stop().await;
}

type Lines = tokio::io::Lines<BufReader<tokio::net::TcpStream>>;

/// Opens the SSE stream; returns once the response headers arrived (the
/// server has taken its starting position).
async fn sse_open(api: SocketAddr, last_event_id: Option<i64>) -> Lines {
    let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
    let resume = last_event_id
        .map(|id| format!("Last-Event-ID: {id}\r\n"))
        .unwrap_or_default();
    // HTTP/1.0: the body is not chunked, it ends when the connection does.
    s.write_all(
        format!("GET /api/v1/alerts/stream HTTP/1.0\r\nHost: x\r\n{resume}\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut lines = BufReader::new(s).lines();
    let status = next_line(&mut lines).await;
    assert!(status.contains(" 200 "), "{status}");
    while !next_line(&mut lines).await.is_empty() {}
    lines
}

async fn next_line(lines: &mut Lines) -> String {
    tokio::time::timeout(LONG, lines.next_line())
        .await
        .expect("an SSE line within the deadline")
        .unwrap()
        .expect("the stream to stay open")
}

/// Reads SSE events until `n` transitions arrived: (id, data).
async fn sse_read(lines: &mut Lines, n: usize) -> Vec<(i64, serde_json::Value)> {
    let mut out = Vec::new();
    let (mut id, mut event) = (None, None);
    while out.len() < n {
        let line = next_line(lines).await;
        if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().parse::<i64>().unwrap());
        } else if let Some(v) = line.strip_prefix("event:") {
            event = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            assert_eq!(event.as_deref(), Some("transition"));
            out.push((id.take().unwrap(), serde_json::from_str(v.trim()).unwrap()));
        }
    }
    out
}

async fn sse(
    api: SocketAddr,
    last_event_id: Option<i64>,
    n: usize,
) -> Vec<(i64, serde_json::Value)> {
    let mut lines = sse_open(api, last_event_id).await;
    sse_read(&mut lines, n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sse_stream_shows_transitions_live_and_resumes_with_last_event_id() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let agg = start(port, dir.path(), "").await;
    let api = agg.api;
    let c = client(port, "dev").await;
    // Live: connect first, then fire and resolve.
    let mut stream = sse_open(api, None).await;
    send_temperatures(&c, "boiler-1", 1, T0, &[85.0]).await;
    send_temperatures(&c, "boiler-1", 2, T0 + 1000, &[70.0]).await;
    let got = sse_read(&mut stream, 2).await;
    drop(stream);
    let states: Vec<&str> = got
        .iter()
        .map(|(_, t)| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["firing", "resolved"]);
    assert_eq!(got[0].1["device"], "boiler-1");
    assert_eq!(got[0].1["deliveries"][0]["sink"], "log");
    assert!(got[0].0 < got[1].0, "ids grow");
    let last = got[1].0;
    // While disconnected: two more transitions. Resuming from `last`
    // replays exactly them.
    send_temperatures(&c, "boiler-1", 3, T0 + 2000, &[95.0]).await;
    send_temperatures(&c, "boiler-1", 4, T0 + 3000, &[60.0]).await;
    wait("two more transitions", || {
        let h = get(api, "/api/v1/alerts/history?rule=boiler-hot");
        (h["transitions"].as_array()?.len() >= 4).then_some(())
    })
    .await;
    let resumed = sse(api, Some(last), 2).await;
    let values: Vec<f64> = resumed
        .iter()
        .map(|(_, t)| t["value"].as_f64().unwrap())
        .collect();
    assert_eq!(values, [95.0, 60.0]);
    assert!(resumed.iter().all(|(id, _)| *id > last));
    // From the start: everything.
    let all = sse(api, Some(0), 4).await;
    assert_eq!(all[0].0, got[0].0);
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_send_critical_alerts_to_mqtt_and_webhook_with_repeats_while_firing() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, r) = start_receiver(200).await;
    let port = free_port();
    let alerts = format!(
        "{}repeat-interval = \"1s\"\n\
         [[alerts.sink]]\nname = \"bus\"\ntype = \"mqtt\"\n\
         [[alerts.route]]\nseverity = [\"critical\"]\nsinks = [\"hook\", \"bus\"]\n",
        webhook_sink(&format!("http://{addr}/hook"), "")
    );
    let agg = start(port, dir.path(), &alerts).await;
    let api = agg.api;
    // An MQTT subscriber on the aggregator's own broker.
    let mut o = MqttOptions::new("watcher", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    let (sub, mut el) = AsyncClient::new(o, 100);
    sub.subscribe("outpost/v1/alerts/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let got: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
    let subscribed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let got = got.clone();
        let subscribed = subscribed.clone();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subscribed.store(true, Ordering::SeqCst)
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => got
                        .lock()
                        .unwrap()
                        .push((p.topic.clone(), serde_json::from_slice(&p.payload).unwrap())),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }
    wait("the subscription", || {
        subscribed.load(Ordering::SeqCst).then_some(())
    })
    .await;
    let c = client(port, "dev").await;
    send_temperatures(&c, "boiler-1", 1, T0, &[85.0]).await;
    // Firing: once on MQTT, then repeats at the webhook every second.
    wait("two repeats at the webhook", || {
        let ids: Vec<String> = r
            .accepted()
            .iter()
            .map(|q| q.json()["id"].as_str().unwrap().to_owned())
            .collect();
        (ids.iter().filter(|i| i.contains("-r")).count() >= 2).then_some(())
    })
    .await;
    send_temperatures(&c, "boiler-1", 2, T0 + 1000, &[70.0]).await;
    let msgs = wait("firing and resolved on MQTT", || {
        let g = got.lock().unwrap().clone();
        (g.len() >= 2).then_some(g)
    })
    .await;
    assert_eq!(msgs[0].0, "outpost/v1/alerts/critical/boiler-hot");
    assert_eq!(msgs[0].1["state"], "firing");
    assert_eq!(msgs[1].1["state"], "resolved");
    assert_eq!(msgs[0].1["device"], "boiler-1");
    assert_eq!(msgs[0].1["value"], 85.0);
    let resolved_id = wait("the resolve at the webhook", || {
        r.accepted()
            .iter()
            .map(|q| q.json())
            .find(|n| n["state"] == "resolved")
            .map(|n| n["id"].as_str().unwrap().to_owned())
    })
    .await;
    // Repeats are numbered 1, 2, ... and all come before the resolve.
    let accepted: Vec<serde_json::Value> = r.accepted().iter().map(Req::json).collect();
    let pos = accepted
        .iter()
        .position(|n| n["id"] == resolved_id)
        .unwrap();
    for (i, n) in accepted[..pos].iter().enumerate() {
        assert_eq!(n["state"], "firing");
        assert_eq!(n["repeat"].as_u64().unwrap(), i as u64, "{n}");
    }
    // After the resolve, no more repeats: wait past two repeat intervals.
    let repeated = metric(
        api,
        "outpost_aggregator_notifications_repeated_total{sink=\"hook\"}",
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        metric(
            api,
            "outpost_aggregator_notifications_repeated_total{sink=\"hook\"}"
        ),
        repeated,
        "no repeat after the resolve"
    );
    assert_eq!(r.accepted().len(), pos + 1);
    // The MQTT sink does not repeat (no repeat-interval there).
    assert_eq!(got.lock().unwrap().len(), 2);
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_not_reused_after_a_restart_and_alerts_of_a_removed_rule_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, r) = start_receiver(200).await;
    let port = free_port();
    let alerts = webhook_sink(&format!("http://{addr}/hook"), "");
    let agg = start(port, dir.path(), &alerts).await;
    let c = client(port, "dev").await;
    // Episode 1 of boiler-1 (fire, resolve); boiler-2 fires and stays firing.
    send_temperatures(&c, "boiler-1", 1, T0, &[85.0]).await;
    send_temperatures(&c, "boiler-1", 2, T0 + 1000, &[70.0]).await;
    send_temperatures(&c, "boiler-2", 1, T0, &[99.0]).await;
    wait("three notifications", || {
        (r.accepted().len() >= 3).then_some(())
    })
    .await;
    agg.stop().await;

    // After a restart the engine no longer remembers boiler-1's resolved
    // alert; its next episode still gets new numbers, so new keys.
    let agg = start(port, dir.path(), &alerts).await;
    let c = client(port, "dev2").await;
    send_temperatures(&c, "boiler-1", 3, T0 + 2000, &[90.0]).await;
    wait("the second episode's firing", || {
        (r.accepted().len() >= 4).then_some(())
    })
    .await;
    let b1: Vec<(u64, String)> = r
        .accepted()
        .iter()
        .map(Req::json)
        .filter(|n| n["device"] == "boiler-1")
        .map(|n| {
            (
                n["number"].as_u64().unwrap(),
                n["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(b1.len(), 3, "{b1:?}");
    assert!(
        b1.windows(2).all(|w| w[0].0 < w[1].0),
        "numbers keep growing: {b1:?}"
    );
    let ids: HashSet<&String> = b1.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), 3, "no key reused: {b1:?}");
    agg.stop().await;

    // The rule is removed while the aggregator is stopped: both alerts that
    // were firing get a resolve at the next start.
    std::fs::write(dir.path().join("rules.d/boiler.toml"), "").unwrap();
    let toml = embedded_toml(
        port,
        dir.path(),
        &dir.path().join("rules.d"),
        &format!("[shutdown]\ngrace = \"1s\"\n{alerts}"),
    );
    let agg = support::aggregator::start(&toml).await;
    let resolves = wait("resolves of the removed rule's alerts", || {
        let v: Vec<serde_json::Value> = r
            .accepted()
            .iter()
            .map(Req::json)
            .filter(|n| {
                n["state"] == "resolved" && n["summary"].as_str().unwrap_or("").contains("removed")
            })
            .collect();
        (v.len() >= 2).then_some(v)
    })
    .await;
    let mut devices: Vec<&str> = resolves
        .iter()
        .map(|n| n["device"].as_str().unwrap())
        .collect();
    devices.sort();
    assert_eq!(devices, ["boiler-1", "boiler-2"]);
    assert!(resolves.iter().all(|n| n["active_since_ms"].is_i64()));
    agg.stop().await;
}
