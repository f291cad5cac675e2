//! The agent end to end with real components: readings written as serial
//! frames into a pseudo-terminal, the agent (the library `run`, or the real
//! binary where a SIGKILL is needed), a real rumqttd broker, and a responder
//! standing in for the aggregator that acks sequence numbers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use outpost_agent::config::Config;
use outpost_proto::batch::Value;
use outpost_proto::frame::{Body, Frame, Value as FValue, MAX_WIRE_LEN};
use serialport::{SerialPort, TTYPort};
use support::{agent_config, wait_until, Broker, Responder};
use tokio_util::sync::CancellationToken;

const LONG: Duration = Duration::from_secs(60);

/// The sensor end of a pty: writes frames like firmware would.
struct Sensor {
    master: TTYPort,
    _slave: TTYPort,
    path: String,
    counter: u16,
}

impl Sensor {
    fn new() -> Sensor {
        let (master, slave) = TTYPort::pair().expect("pty pair");
        let path = slave.name().expect("pty path");
        let mut s = Sensor {
            master,
            _slave: slave,
            path,
            counter: 0,
        };
        s.send(Body::Hello {
            firmware: "test-fw",
            tick_ms: 0,
        });
        s.send(Body::Descriptor {
            channel: 0,
            name: "level",
            unit: "m",
        });
        s
    }

    fn send(&mut self, body: Body<'_>) {
        let mut out = [0u8; MAX_WIRE_LEN];
        let n = Frame {
            counter: self.counter,
            body,
        }
        .encode(&mut out)
        .unwrap();
        self.counter = self.counter.wrapping_add(1);
        // Generous: a loaded machine may take a while to drain the pty.
        self.master.set_timeout(LONG).unwrap();
        self.master.write_all(&out[..n]).unwrap();
    }

    /// Like `reading`, but a full pty (nobody reading: the agent is dead)
    /// drops the frame as a real UART would.
    fn try_reading(&mut self, v: f32) {
        let mut out = [0u8; MAX_WIRE_LEN];
        let body = Body::Reading {
            channel: 0,
            tick_ms: 0,
            value: FValue::F32(v),
        };
        let n = Frame {
            counter: self.counter,
            body,
        }
        .encode(&mut out)
        .unwrap();
        self.counter = self.counter.wrapping_add(1);
        self.master.set_timeout(Duration::from_millis(50)).unwrap();
        let _ = self.master.write_all(&out[..n]);
    }

    fn reading(&mut self, v: f32) {
        self.send(Body::Reading {
            channel: 0,
            tick_ms: 0,
            value: FValue::F32(v),
        });
    }

    fn garbage(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    fn source_toml(&self) -> String {
        format!(
            "[[sources]]\ntype = \"serial-frames\"\nname = \"mcu\"\npath = \"{}\"\n",
            self.path
        )
    }
}

struct Agent {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    http: std::net::SocketAddr,
}

async fn start_agent(toml: &str) -> Agent {
    let config = Config::parse(toml, Path::new("test.toml")).expect("valid config");
    let cancel = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(outpost_agent::run(config, cancel.clone(), Some(tx)));
    let running = rx.await.expect("agent started");
    Agent {
        cancel,
        task,
        http: running.http_addr.expect("metrics endpoint"),
    }
}

impl Agent {
    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(LONG, self.task)
            .await
            .expect("agent stops")
            .unwrap()
            .unwrap();
    }
}

/// Reads one metric value from the agent's /metrics (sum over label sets).
fn metric(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let values: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn assert_contiguous(seqs: &[u64]) {
    for w in seqs.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "sequence numbers must be contiguous: {} then {}",
            w[0],
            w[1]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_reach_the_broker_as_batches_and_acks_empty_the_buffer() {
    let (_broker, ltx, lrx) = Broker::start();
    let responder = Responder::start(ltx, lrx);
    let dir = tempfile::tempdir().unwrap();
    let mut sensor = Sensor::new();
    let agent = start_agent(&agent_config(
        "gw-1",
        _broker.port,
        dir.path(),
        &sensor.source_toml(),
    ))
    .await;
    let before = outpost_agent::reading::now_ms();
    for i in 0..200 {
        sensor.reading(i as f32);
    }
    let r = responder.clone();
    let seen = blocking(move || {
        wait_until(LONG, "200 readings at the responder", || {
            let s = r.seen();
            (s.len() >= 200).then_some(s)
        })
    })
    .await;
    let after = outpost_agent::reading::now_ms();
    assert_eq!(seen.len(), 200, "each reading once");
    let values: Vec<Value> = seen.iter().map(|s| s.value.clone()).collect();
    assert_eq!(
        values,
        (0..200).map(|i| Value::F32(i as f32)).collect::<Vec<_>>()
    );
    assert!(seen
        .iter()
        .all(|s| s.sensor == "level" && s.device == "gw-1"));
    assert!(
        seen.iter()
            .all(|s| s.time_ms >= before - 1000 && s.time_ms <= after),
        "timestamps taken at read time"
    );
    assert_contiguous(&seen.iter().map(|s| s.seq).collect::<Vec<_>>());
    let http = agent.http;
    blocking(move || {
        wait_until(LONG, "acks to empty the buffer", || {
            (metric(http, "outpost_agent_buffer_rows")? == 0.0).then_some(())
        })
    })
    .await;
    assert!(
        responder
            .statuses
            .lock()
            .unwrap()
            .iter()
            .any(|(d, _)| d == "gw-1"),
        "birth status published"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_buffers_readings_and_delivers_all_in_order_afterwards() {
    let (mut broker, ltx, lrx) = Broker::start();
    let responder = Responder::start(ltx, lrx);
    let dir = tempfile::tempdir().unwrap();
    let mut sensor = Sensor::new();
    let agent = start_agent(&agent_config(
        "gw-2",
        broker.port,
        dir.path(),
        &sensor.source_toml(),
    ))
    .await;
    for i in 0..50 {
        sensor.reading(i as f32);
    }
    let r = responder.clone();
    blocking(move || wait_until(LONG, "first 50", || (r.seen().len() >= 50).then_some(()))).await;

    broker.down();
    for i in 50..300 {
        sensor.reading(i as f32);
    }
    let http = agent.http;
    blocking(move || {
        wait_until(LONG, "250 readings buffered during the outage", || {
            (metric(http, "outpost_agent_buffer_rows")? >= 250.0).then_some(())
        })
    })
    .await;
    assert!(
        responder.seen().len() < 300,
        "nothing can arrive while the broker is down"
    );
    broker.up();

    let r = responder.clone();
    blocking(move || {
        wait_until(LONG, "all 300 after the outage", || {
            (r.seq_counts().len() >= 300).then_some(())
        })
    })
    .await;
    blocking(move || {
        wait_until(LONG, "buffer empty", || {
            (metric(http, "outpost_agent_buffer_rows")? == 0.0).then_some(())
        })
    })
    .await;
    let counts = responder.seq_counts();
    let seqs: Vec<u64> = counts.keys().copied().collect();
    assert_eq!(seqs.len(), 300);
    assert_contiguous(&seqs);
    // In order: by sequence number, values are the order they were read.
    let seen = responder.seen();
    let mut by_seq: Vec<_> = seen.iter().map(|s| (s.seq, s.value.clone())).collect();
    by_seq.sort_by_key(|(s, _)| *s);
    by_seq.dedup_by_key(|(s, _)| *s);
    assert_eq!(
        by_seq.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
        (0..300).map(|i| Value::F32(i as f32)).collect::<Vec<_>>()
    );
    println!("outage: 300 readings, {} deliveries (resends after reconnect are dropped by the aggregator's dedup)", seen.len());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_acks_nothing_is_deleted_and_a_restart_resends_the_same_sequence_numbers() {
    let (broker, ltx, lrx) = Broker::start();
    let responder = Responder::start(ltx, lrx);
    responder.acking.store(false, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let mut sensor = Sensor::new();
    let toml = agent_config("gw-3", broker.port, dir.path(), &sensor.source_toml())
        .replace("ack-timeout = \"3s\"", "ack-timeout = \"600s\"");
    let agent = start_agent(&toml).await;
    for i in 0..40 {
        sensor.reading(i as f32);
    }
    let r = responder.clone();
    blocking(move || {
        wait_until(LONG, "40 readings published", || {
            (r.seen().len() >= 40).then_some(())
        })
    })
    .await;
    let first: Vec<_> = responder
        .seen()
        .iter()
        .map(|s| (s.seq, s.value.clone()))
        .collect();
    let http = agent.http;
    assert_eq!(
        metric(http, "outpost_agent_buffer_rows"),
        Some(40.0),
        "no ack: every row stays"
    );
    agent.stop().await;
    responder.seen.lock().unwrap().clear();

    responder.acking.store(true, Ordering::SeqCst);
    let agent = start_agent(&toml).await;
    let r = responder.clone();
    blocking(move || {
        wait_until(LONG, "the same 40 resent", || {
            (r.seen().len() >= 40).then_some(())
        })
    })
    .await;
    let again: Vec<_> = responder
        .seen()
        .iter()
        .map(|s| (s.seq, s.value.clone()))
        .collect();
    assert_eq!(
        again[..40],
        first[..],
        "same readings, same sequence numbers"
    );
    let http = agent.http;
    blocking(move || {
        wait_until(LONG, "buffer empty after acks", || {
            (metric(http, "outpost_agent_buffer_rows")? == 0.0).then_some(())
        })
    })
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_noise_is_counted_and_valid_frames_around_it_arrive() {
    let (broker, ltx, lrx) = Broker::start();
    let responder = Responder::start(ltx, lrx);
    let dir = tempfile::tempdir().unwrap();
    let mut sensor = Sensor::new();
    let agent = start_agent(&agent_config(
        "gw-4",
        broker.port,
        dir.path(),
        &sensor.source_toml(),
    ))
    .await;
    for i in 0..30 {
        sensor.reading(i as f32);
        sensor.garbage(&[0x13, 0x37, 0xde, 0xad, 0xbe, 0xef]);
        // A frame with a flipped bit: a CRC error, never a wrong value.
        let mut out = [0u8; MAX_WIRE_LEN];
        let n = Frame {
            counter: 9999,
            body: Body::Reading {
                channel: 0,
                tick_ms: 0,
                value: FValue::F32(1e9),
            },
        }
        .encode(&mut out)
        .unwrap();
        out[5] ^= 0x04;
        sensor.garbage(&out[..n]);
    }
    let r = responder.clone();
    let seen = blocking(move || {
        wait_until(LONG, "30 valid readings", || {
            let s = r.seen();
            (s.len() >= 30).then_some(s)
        })
    })
    .await;
    assert_eq!(
        seen.iter().map(|s| s.value.clone()).collect::<Vec<_>>(),
        (0..30).map(|i| Value::F32(i as f32)).collect::<Vec<_>>()
    );
    let http = agent.http;
    let errors = blocking(move || {
        wait_until(LONG, "errors counted", || {
            let e = metric(http, "outpost_agent_source_errors_total")?;
            (e >= 30.0).then_some(e)
        })
    })
    .await;
    println!("line noise: 30 valid readings arrived, {errors} source errors counted");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_buffer_file_is_moved_aside_and_the_agent_starts() {
    let (broker, ltx, lrx) = Broker::start();
    let responder = Responder::start(ltx, lrx);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("buffer.sqlite"),
        b"this is not a database, it is what a power cut left",
    )
    .unwrap();
    let mut sensor = Sensor::new();
    let agent = start_agent(&agent_config(
        "gw-5",
        broker.port,
        dir.path(),
        &sensor.source_toml(),
    ))
    .await;
    sensor.reading(7.0);
    let r = responder.clone();
    blocking(move || {
        wait_until(LONG, "a reading through the fresh buffer", || {
            (!r.seen().is_empty()).then_some(())
        })
    })
    .await;
    let moved: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".corrupt-"))
        .collect();
    assert!(
        !moved.is_empty(),
        "the corrupt file was kept for inspection"
    );
    agent.stop().await;
}

/// Kills and reaps the child when dropped, even when the test panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real binary, killed with SIGKILL at random moments while a sensor
/// streams: no committed reading is lost (a lost one would leave a gap in
/// the sequence numbers, since later readings get higher ones), and
/// sequence numbers continue across restarts.
#[test]
fn sigkill_mid_stream_loses_no_committed_reading() {
    let (broker, ltx, lrx) = Broker::start();
    let responder = Responder::start(ltx, lrx);
    let dir = tempfile::tempdir().unwrap();
    let mut sensor = Sensor::new();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        agent_config("gw-6", broker.port, dir.path(), &sensor.source_toml()),
    )
    .unwrap();
    let exe = env!("CARGO_BIN_EXE_outpost-agent");
    let spawn = || {
        KillOnDrop(
            Command::new(exe)
                .arg("--config")
                .arg(&cfg)
                .env("OUTPOST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start outpost-agent"),
        )
    };
    // The sensor streams one reading every 2 ms for the whole test.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut n = 0u32;
        while !stop2.load(Ordering::SeqCst) {
            sensor.try_reading(n as f32);
            n += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        (sensor, n)
    });
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for round in 0..5 {
        let mut child = spawn();
        let before = responder.seq_counts().len();
        let r = responder.clone();
        wait_until(LONG, "delivery to progress", || {
            (r.seq_counts().len() > before + 50).then_some(())
        });
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 700));
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        println!(
            "round {round}: SIGKILL with {} distinct readings delivered",
            responder.seq_counts().len()
        );
    }
    stop.store(true, Ordering::SeqCst);
    let (mut sensor, written) = writer.join().unwrap();
    let mut child = spawn();
    // A last reading written for sure (the stream above drops frames when the
    // pty is full while no agent reads, as a real UART would).
    sensor.reading(written as f32);
    let written = written + 1;
    let last = Value::F32((written - 1) as f32);
    let r = responder.clone();
    wait_until(LONG, "the last reading after the final restart", || {
        r.seen().iter().any(|s| s.value == last).then_some(())
    });
    child.0.kill().unwrap();
    child.0.wait().unwrap();

    let seen = responder.seen();
    let mut by_seq: Vec<(u64, Value)> = seen.iter().map(|s| (s.seq, s.value.clone())).collect();
    by_seq.sort_by_key(|(s, _)| *s);
    by_seq.dedup_by_key(|(s, _)| *s);
    let seqs: Vec<u64> = by_seq.iter().map(|(s, _)| *s).collect();
    assert_contiguous(&seqs);
    // Values strictly increase with the sequence number: nothing reordered,
    // no sequence number reused for a different reading once published.
    let vals: Vec<f32> = by_seq
        .iter()
        .map(|(_, v)| match v {
            Value::F32(f) => *f,
            _ => f32::NAN,
        })
        .collect();
    assert!(
        vals.windows(2).all(|w| w[0] < w[1]),
        "values increase with seq"
    );
    println!(
        "sigkill x5: {written} readings written, {} delivered (distinct seqs), {} deliveries in all; \
         the difference is readings read but not yet committed at a kill",
        seqs.len(),
        seen.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lines_from_a_pty_reach_the_broker_mapped_to_sensors() {
    let (broker, ltx, lrx) = Broker::start();
    let responder = Responder::start(ltx, lrx);
    let dir = tempfile::tempdir().unwrap();
    let (mut master, slave) = TTYPort::pair().expect("pty pair");
    let path = slave.name().unwrap();
    let sources = format!(
        "[[sources]]\ntype = \"serial-lines\"\nname = \"weather\"\npath = \"{path}\"\nformat = \"kv\"\nfields = {{ t = \"air_temp\", h = \"air_hum\" }}\n"
    );
    let agent = start_agent(&agent_config("gw-7", broker.port, dir.path(), &sources)).await;
    // The source drops the first line after opening (it may be cut in half);
    // send lines until the data arrives, then a known sequence.
    let r = responder.clone();
    let mut m2 = master.try_clone_native().unwrap();
    blocking(move || {
        wait_until(LONG, "the lines source to be reading", || {
            m2.write_all(b"t=0 h=0\n").unwrap();
            (!r.seen().is_empty()).then_some(())
        })
    })
    .await;
    let start = responder.seen().len();
    master
        .write_all(b"t=21.5 h=40\nthis line is garbage\nt=22.25 h=41\n")
        .unwrap();
    let r = responder.clone();
    let seen = blocking(move || {
        wait_until(LONG, "4 readings from 2 lines", || {
            // Skip the probe lines still queued in the pty.
            let s: Vec<_> = r.seen()[start..]
                .iter()
                .filter(|s| s.value != Value::Int(0))
                .cloned()
                .collect();
            (s.len() >= 4).then_some(s)
        })
    })
    .await;
    let got: Vec<(String, Value)> = seen
        .iter()
        .map(|s| (s.sensor.clone(), s.value.clone()))
        .collect();
    assert_eq!(
        got[..4],
        [
            ("air_temp".to_string(), Value::F64(21.5)),
            ("air_hum".to_string(), Value::Int(40)),
            ("air_temp".to_string(), Value::F64(22.25)),
            ("air_hum".to_string(), Value::Int(41)),
        ]
    );
    let seqs: Vec<u64> = responder.seen().iter().map(|s| s.seq).collect();
    assert_contiguous(&seqs);
    let http = agent.http;
    let malformed = blocking(move || {
        wait_until(LONG, "the malformed line counted", || {
            metric(http, "outpost_agent_source_errors_total").filter(|e| *e >= 1.0)
        })
    })
    .await;
    assert!(malformed >= 1.0);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_drops_the_oldest_counts_them_and_the_agent_keeps_running() {
    let (mut broker, ltx, lrx) = Broker::start();
    let responder = Responder::start(ltx, lrx);
    broker.down();
    let dir = tempfile::tempdir().unwrap();
    let mut sensor = Sensor::new();
    let toml = agent_config("gw-8", broker.port, dir.path(), &sensor.source_toml()).replace(
        "commit-interval = \"200ms\"",
        "commit-interval = \"200ms\"\nmax-rows = 500",
    );
    let agent = start_agent(&toml).await;
    for i in 0..2000 {
        sensor.reading(i as f32);
    }
    let http = agent.http;
    let dropped = blocking(move || {
        wait_until(LONG, "the overflow to be counted", || {
            let dropped = metric(http, "outpost_agent_buffer_dropped_total")?;
            (dropped >= 1500.0).then_some(dropped)
        })
    })
    .await;
    assert_eq!(dropped, 1500.0, "exactly the excess is dropped");
    assert_eq!(metric(agent.http, "outpost_agent_buffer_rows"), Some(500.0));
    broker.up();
    let r = responder.clone();
    let seen = blocking(move || {
        wait_until(LONG, "the 500 newest delivered", || {
            let s = r.seen();
            (s.len() >= 500).then_some(s)
        })
    })
    .await;
    // Drop-oldest: what survives is the newest 500, in order.
    assert_eq!(
        seen.iter().map(|s| s.value.clone()).collect::<Vec<_>>(),
        (1500..2000)
            .map(|i| Value::F32(i as f32))
            .collect::<Vec<_>>()
    );
    agent.stop().await;
}
