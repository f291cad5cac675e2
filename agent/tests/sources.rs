//! Sources against real pseudo-terminals (serial-frames, serial-lines), a
//! GPIO chip that does not exist, and embedded-hal-mock pins driven under
//! tokio's paused clock.
//!
//! Synchronisation is by polling the status board, the metrics or the
//! reading channel with a generous deadline; no test asserts timing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use embedded_hal::digital::{ErrorType, InputPin};
use embedded_hal_mock::eh1::digital::{Mock as PinMock, State as Level, Transaction};
use outpost_agent::metrics::{Metrics, SourceErrorLabels, SourceLabels};
use outpost_agent::reading::{Quality, Reading, Value};
use outpost_agent::sources::gpio::{run_pin, PinSettings, PollClock};
use outpost_agent::sources::{Emitter, SourceConfig, SourceContext, SourceError, Stop};
use outpost_agent::status::StatusBoard;
use outpost_proto::frame::{self, Body, DecodeError, Frame, FrameDecoder, MAX_WIRE_LEN};
use outpost_proto::pb::SourceState;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_serial::{SerialPort, SerialStream};
use tokio_util::sync::CancellationToken;

/// Generous: the machine may be loaded; nothing waits this long when it works.
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------- harness

struct Source {
    name: String,
    rx: mpsc::Receiver<Reading>,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
    status: StatusBoard,
    task: JoinHandle<()>,
}

fn parse(toml_text: &str) -> SourceConfig {
    let config: SourceConfig = toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}"));
    let mut problems = Vec::new();
    config.validate("sources[0]", &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    config
}

fn start(toml_text: &str) -> Source {
    start_with_capacity(toml_text, 64)
}

fn start_with_capacity(toml_text: &str, capacity: usize) -> Source {
    let config = parse(toml_text);
    let (tx, rx) = mpsc::channel(capacity);
    let cancel = CancellationToken::new();
    let metrics = Arc::new(Metrics::default());
    let status = StatusBoard::default();
    let name = config.name().to_owned();
    let task = config.spawn(SourceContext {
        tx,
        cancel: cancel.clone(),
        metrics: metrics.clone(),
        status: status.clone(),
    });
    Source {
        name,
        rx,
        cancel,
        metrics,
        status,
        task,
    }
}

impl Source {
    async fn next(&mut self) -> Reading {
        tokio::time::timeout(DEADLINE, self.rx.recv())
            .await
            .expect("timed out waiting for a reading")
            .expect("source ended")
    }

    async fn take(&mut self, n: usize) -> Vec<Reading> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.next().await);
        }
        v
    }

    fn state(&self) -> Option<SourceState> {
        self.status.snapshot().get(&self.name).map(|r| r.state)
    }

    fn last_error(&self) -> String {
        self.status
            .snapshot()
            .get(&self.name)
            .map(|r| r.last_error.clone())
            .unwrap_or_default()
    }

    fn errors(&self, kind: &str) -> u64 {
        self.metrics
            .source_errors
            .get_or_create(&SourceErrorLabels {
                source: self.name.clone(),
                kind: kind.to_owned(),
            })
            .get()
    }

    fn labels(&self) -> SourceLabels {
        SourceLabels {
            source: self.name.clone(),
        }
    }

    fn up(&self) -> i64 {
        self.metrics.source_up.get_or_create(&self.labels()).get()
    }

    fn reconnects(&self) -> u64 {
        self.metrics
            .source_reconnects
            .get_or_create(&self.labels())
            .get()
    }

    fn readings_metric(&self) -> u64 {
        self.metrics.readings.get_or_create(&self.labels()).get()
    }

    async fn wait_until(&self, what: &str, cond: impl Fn(&Source) -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !cond(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: state {:?}, last error {:?}, up {}",
                self.state(),
                self.last_error(),
                self.up()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_running(&self) {
        self.wait_until("running", |s| {
            s.state() == Some(SourceState::Running) && s.up() == 1
        })
        .await;
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("source did not stop")
            .expect("source task panicked");
        let state = self.status.snapshot().get(&self.name).map(|r| r.state);
        assert_eq!(state, Some(SourceState::Stopped));
    }
}

/// A pty pair: the test writes to `master`; the source opens `path`.
struct Pty {
    master: SerialStream,
    _slave: SerialStream,
    path: String,
}

fn pty() -> Pty {
    let (master, slave) = SerialStream::pair().expect("pty pair");
    let path = slave.name().expect("pty slave has a path");
    Pty {
        master,
        _slave: slave,
        path,
    }
}

impl Pty {
    async fn write(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).await.unwrap();
        self.master.flush().await.unwrap();
    }
}

fn wire(counter: u16, body: Body<'_>) -> Vec<u8> {
    let mut out = [0u8; MAX_WIRE_LEN];
    let n = Frame { counter, body }.encode(&mut out).unwrap();
    out[..n].to_vec()
}

fn reading(counter: u16, channel: u16, value: frame::Value) -> Vec<u8> {
    wire(
        counter,
        Body::Reading {
            channel,
            tick_ms: u32::from(counter) * 100,
            value,
        },
    )
}

/// `frame` with one bit flipped such that the CRC (not COBS) catches it.
fn with_crc_error(frame: &[u8]) -> Vec<u8> {
    for i in 1..frame.len() - 1 {
        for bit in 0..8 {
            let mut f = frame.to_vec();
            f[i] ^= 1 << bit;
            let mut d = FrameDecoder::new();
            let items: Vec<_> = d.feed(&f).collect();
            if let [Err(DecodeError::Crc { .. })] = items.as_slice() {
                return f;
            }
        }
    }
    panic!("no single bit flip gives a CRC error");
}

fn frames_config(path: &str, extra: &str) -> String {
    format!("type = \"serial-frames\"\nname = \"mcu\"\npath = \"{path}\"\n{extra}")
}

// ---------------------------------------------------------- serial-frames

#[tokio::test]
async fn serial_frames_names_values_noise_and_lost_frames() {
    let mut pty = pty();
    let mut s = start(&frames_config(
        &pty.path,
        "[[channels]]\nchannel = 1\nname = \"boiler_temp\"\nunit = \"degC\"\nscale = 0.1\noffset = -10.0\n",
    ));
    s.wait_running().await;

    let mut bytes = wire(
        0,
        Body::Hello {
            firmware: "test-fw/1",
            tick_ms: 0,
        },
    );
    bytes.extend(wire(
        1,
        Body::Descriptor {
            channel: 0,
            name: "temperature",
            unit: "degC",
        },
    ));
    bytes.extend(wire(
        2,
        Body::Descriptor {
            channel: 1,
            name: "overridden",
            unit: "",
        },
    ));
    bytes.extend(reading(3, 0, frame::Value::F32(21.5)));
    bytes.extend(reading(4, 1, frame::Value::I64(500)));
    bytes.extend(reading(5, 7, frame::Value::Bool(true)));
    bytes.extend([0x00, 0x13, 0x37, 0x42, 0x99, 0x00]); // line noise between frames
    bytes.extend(with_crc_error(&reading(6, 0, frame::Value::F32(99.0))));
    bytes.extend(reading(7, 0, frame::Value::F32(22.0)));
    bytes.extend(reading(10, 0, frame::Value::F32(23.0))); // 8 and 9 lost
    pty.write(&bytes).await;

    let got: Vec<(String, Value)> = s
        .take(5)
        .await
        .into_iter()
        .map(|r| (r.sensor, r.value))
        .collect();
    let want = [
        ("temperature", Value::F32(21.5)),
        ("boiler_temp", Value::F64(40.0)),
        ("ch7", Value::Bool(true)),
        ("temperature", Value::F32(22.0)),
        ("temperature", Value::F32(23.0)),
    ];
    let want: Vec<(String, Value)> = want
        .iter()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    assert_eq!(got, want);
    s.wait_until("errors counted", |s| {
        s.errors("crc") == 1 && s.errors("framing") == 1 && s.errors("lost_frames") == 3
    })
    .await;
    assert_eq!(s.readings_metric(), 5);
    let report = s.status.snapshot()[&s.name].clone();
    assert_eq!(report.readings, 5);
    assert_eq!(report.errors, 5);
    assert_eq!(s.reconnects(), 0);
    s.stop().await;
}

#[tokio::test]
async fn serial_frames_backpressure_loses_nothing() {
    let mut pty = pty();
    // A tiny channel: the source must wait for the reader, not drop.
    let mut s = start_with_capacity(&frames_config(&pty.path, ""), 4);
    s.wait_running().await;
    const N: u16 = 500;
    let writer = tokio::spawn(async move {
        for i in 0..N {
            pty.write(&reading(i, 0, frame::Value::I64(i64::from(i))))
                .await;
        }
        pty
    });
    let mut values = Vec::new();
    for _ in 0..N {
        tokio::time::sleep(Duration::from_micros(200)).await; // a slow consumer
        values.push(s.next().await.value);
    }
    let want: Vec<Value> = (0..N).map(|i| Value::Int(i64::from(i))).collect();
    assert_eq!(values, want);
    assert_eq!(s.errors("lost_frames"), 0);
    let _pty = writer.await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn serial_frames_tick_time_source() {
    let mut pty = pty();
    let mut s = start(&frames_config(&pty.path, "time-source = \"tick\""));
    s.wait_running().await;
    let mut bytes = wire(
        0,
        Body::Reading {
            channel: 0,
            tick_ms: u32::MAX - 99,
            value: frame::Value::F32(1.0),
        },
    );
    bytes.extend(wire(
        1,
        Body::Reading {
            channel: 0,
            tick_ms: 400,
            value: frame::Value::F32(2.0),
        },
    ));
    pty.write(&bytes).await;
    let r = s.take(2).await;
    assert_eq!(
        r[1].time_ms - r[0].time_ms,
        500,
        "tick delta across the wrap"
    );
    s.stop().await;
}

#[tokio::test]
async fn serial_port_missing_at_start_then_unplugged_and_replugged() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyOUTPOST");
    let link_str = link.to_str().unwrap().to_owned();
    let mut s = start(&frames_config(&link_str, ""));

    // Missing at start: retried, not fatal.
    s.wait_until("retrying while the port is missing", |s| {
        s.state() == Some(SourceState::Retrying) && s.up() == 0 && s.errors("open") >= 2
    })
    .await;
    assert!(s.last_error().contains("ttyOUTPOST"), "{}", s.last_error());

    // Plugged in (the udev by-id symlink appears).
    let mut first = pty();
    std::os::unix::fs::symlink(&first.path, &link).unwrap();
    s.wait_running().await;
    assert_eq!(s.reconnects(), 1);
    first.write(&reading(0, 0, frame::Value::F32(1.0))).await;
    assert_eq!(s.next().await.value, Value::F32(1.0));

    // Unplugged: the symlink goes and the device hangs up.
    std::fs::remove_file(&link).unwrap();
    drop(first);
    s.wait_until("retrying after the unplug", |s| {
        s.state() == Some(SourceState::Retrying) && s.up() == 0 && s.errors("io") >= 1
    })
    .await;

    // Replugged as a different pty behind the same stable name.
    let mut second = pty();
    std::os::unix::fs::symlink(&second.path, &link).unwrap();
    s.wait_running().await;
    assert_eq!(s.reconnects(), 2);
    second.write(&reading(0, 0, frame::Value::F32(2.0))).await;
    assert_eq!(s.next().await.value, Value::F32(2.0));
    s.stop().await;
}

#[tokio::test]
async fn source_stops_quietly_when_the_receiver_is_gone() {
    let mut pty = pty();
    let s = start(&frames_config(&pty.path, ""));
    s.wait_running().await;
    let Source {
        rx,
        task,
        status,
        name,
        ..
    } = s;
    drop(rx);
    pty.write(&reading(0, 0, frame::Value::F32(1.0))).await;
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("source did not stop")
        .unwrap();
    assert_eq!(status.snapshot()[&name].state, SourceState::Stopped);
}

#[tokio::test]
async fn a_missing_device_does_not_hold_up_other_sources() {
    let missing = start(&frames_config("/nonexistent/outpost/tty", ""));
    let mut pty = pty();
    let mut present = start(&frames_config(&pty.path, "").replace("\"mcu\"", "\"mcu2\""));
    present.wait_running().await;
    missing
        .wait_until("retrying", |s| s.state() == Some(SourceState::Retrying))
        .await;
    pty.write(&reading(0, 0, frame::Value::F32(5.0))).await;
    assert_eq!(present.next().await.value, Value::F32(5.0));
    assert_eq!(missing.state(), Some(SourceState::Retrying));
    missing.stop().await;
    present.stop().await;
}

#[tokio::test]
async fn cancellation_interrupts_the_retry_backoff() {
    let s = start(&frames_config("/nonexistent/outpost/tty", ""));
    s.wait_until("retrying", |s| s.errors("open") >= 3).await;
    s.stop().await;
}

// ----------------------------------------------------------- serial-lines

fn lines_config(path: &str, extra: &str) -> String {
    format!("type = \"serial-lines\"\nname = \"weather\"\npath = \"{path}\"\nbaud = 9600\n{extra}")
}

fn pairs(readings: &[Reading]) -> Vec<(String, Value)> {
    readings
        .iter()
        .map(|r| (r.sensor.clone(), r.value.clone()))
        .collect()
}

fn want(p: &[(&str, Value)]) -> Vec<(String, Value)> {
    p.iter().map(|(n, v)| (n.to_string(), v.clone())).collect()
}

#[tokio::test]
async fn serial_lines_kv_with_mapping_malformed_and_over_long_lines() {
    let mut pty = pty();
    let mut s = start(&lines_config(
        &pty.path,
        "format = \"kv\"\nfields = { temp = \"air_temperature\" }\ninclude = [\"temp\", \"hum\", \"state\"]\n",
    ));
    s.wait_running().await;
    let mut bytes = b"partial=1\n".to_vec(); // first line after open: discarded (resync)
    bytes.extend(b"temp=21.5 hum=40 ignored=1\r\n");
    bytes.extend(b"this is not kv\n");
    bytes.extend(b"temp=\xff\xfe\n");
    bytes.extend(vec![b'x'; 5000]);
    bytes.extend(b"\n");
    bytes.extend(b"temp=22.0,state=OK\n");
    pty.write(&bytes).await;
    let got = s.take(4).await;
    assert_eq!(
        pairs(&got),
        want(&[
            ("air_temperature", Value::F64(21.5)),
            ("hum", Value::Int(40)),
            ("air_temperature", Value::F64(22.0)),
            ("state", Value::Str("OK".into())),
        ])
    );
    s.wait_until("bad lines counted", |s| {
        s.errors("malformed_line") == 2 && s.errors("oversize") == 1
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn serial_lines_csv_with_skipped_columns_header_and_timestamps() {
    let mut pty = pty();
    let mut s = start(&lines_config(
        &pty.path,
        "format = \"csv\"\ncolumns = [\"temperature\", \"-\", \"pressure\", \"ts\"]\ntimestamp-field = \"ts\"\n",
    ));
    s.wait_running().await;
    let mut bytes = b"\n".to_vec();
    bytes.extend(b"temperature,humidity,pressure,ts\n"); // header: skipped
    bytes.extend(b"21.50,40.12,1013.00,1700000000\n");
    bytes.extend(b"1,2\n"); // wrong field count
    bytes.extend(b",40.00,1012.5,\r\n");
    pty.write(&bytes).await;
    let got = s.take(3).await;
    assert_eq!(
        pairs(&got),
        want(&[
            ("temperature", Value::F64(21.5)),
            ("pressure", Value::F64(1013.0)),
            ("pressure", Value::F64(1012.5)),
        ])
    );
    assert_eq!(got[0].time_ms, 1_700_000_000_000);
    assert_eq!(got[1].time_ms, 1_700_000_000_000);
    assert!(
        got[2].time_ms > 1_700_000_000_000,
        "receive time without a timestamp"
    );
    s.wait_until("bad line counted", |s| s.errors("malformed_line") == 1)
        .await;
    s.stop().await;
}

#[tokio::test]
async fn serial_lines_json_lines() {
    let mut pty = pty();
    let mut s = start(&lines_config(
        &pty.path,
        "format = \"json\"\nfields = { t = \"temp\" }\n",
    ));
    s.wait_running().await;
    let mut bytes = b"\n".to_vec();
    bytes.extend(br#"{"t":21.5,"door":true,"mode":"auto","n":null}"#);
    bytes.extend(b"\n{\"t\":\n");
    bytes.extend(br#"{"t":22,"err":NaN}"#); // not JSON
    bytes.extend(b"\n");
    bytes.extend(br#"{"t":23}"#);
    bytes.extend(b"\n");
    pty.write(&bytes).await;
    let got = s.take(4).await;
    assert_eq!(
        pairs(&got),
        want(&[
            ("door", Value::Bool(true)),
            ("mode", Value::Str("auto".into())),
            ("temp", Value::F64(21.5)),
            ("temp", Value::Int(23)),
        ])
    );
    assert!(got.iter().all(|r| r.quality == Quality::Good));
    s.wait_until("bad lines counted", |s| s.errors("malformed_line") == 2)
        .await;
    s.stop().await;
}

// -------------------------------------------------------------------- gpio

/// A mock pin that cancels the source after its last scripted read, so
/// `run_pin` stops exactly when the script is used up.
struct Scripted {
    mock: PinMock,
    left: usize,
    cancel: CancellationToken,
}

impl ErrorType for Scripted {
    type Error = <PinMock as ErrorType>::Error;
}

impl InputPin for Scripted {
    fn is_high(&mut self) -> Result<bool, Self::Error> {
        self.left -= 1;
        if self.left == 0 {
            self.cancel.cancel();
        }
        self.mock.is_high()
    }

    fn is_low(&mut self) -> Result<bool, Self::Error> {
        self.is_high().map(|h| !h)
    }
}

/// A clock whose polls come at once, 10 ms of tick apart: the loop runs
/// deterministically, whatever the machine's load.
struct Steps {
    next: u32,
}

impl PollClock for Steps {
    async fn next_poll(&mut self) -> u32 {
        tokio::task::yield_now().await;
        let t = self.next;
        self.next = self.next.wrapping_add(10);
        t
    }
}

fn settings(active_low: bool, debounce_ms: u64, heartbeat_ms: u64) -> PinSettings {
    PinSettings {
        sensor: "door_open".into(),
        active_low,
        debounce: Duration::from_millis(debounce_ms),
        heartbeat: Duration::from_millis(heartbeat_ms),
        poll_interval: Duration::from_millis(10),
    }
}

/// Runs `run_pin` over `levels` (one per poll, polls 10 ms apart from
/// `start_tick`); returns the reported levels and how `run_pin` ended.
async fn run_script(
    levels: &[Level],
    start_tick: u32,
    settings: &PinSettings,
) -> (Vec<bool>, Result<Stop, SourceError>) {
    let transactions: Vec<Transaction> = levels.iter().map(|&l| Transaction::get(l)).collect();
    let mut mock = PinMock::new(&transactions);
    let cancel = CancellationToken::new();
    let pin = Scripted {
        mock: mock.clone(),
        left: levels.len(),
        cancel: cancel.clone(),
    };
    let (tx, mut rx) = mpsc::channel(1024);
    let metrics = Arc::new(Metrics::default());
    let mut out = Emitter::new(
        "door",
        SourceContext {
            tx,
            cancel,
            metrics,
            status: StatusBoard::default(),
        },
    );
    let ended = run_pin(pin, &mut Steps { next: start_tick }, settings, &mut out).await;
    mock.done();
    let mut reported = Vec::new();
    while let Ok(r) = rx.try_recv() {
        assert_eq!(r.sensor, "door_open");
        match r.value {
            Value::Bool(b) => reported.push(b),
            other => panic!("not a bool: {other:?}"),
        }
    }
    (reported, ended)
}

use Level::{High as H, Low as L};

#[tokio::test]
async fn gpio_debounced_edges_become_bool_readings() {
    // Polls at 0, 10, 20 ... ms; debounce 20 ms.
    let levels = [L, L, L, H, L, H, H, H, H, L, L, L, L];
    let (reported, ended) = run_script(&levels, 0, &settings(false, 20, 0)).await;
    // low settles at 20; the 30 ms blip is ignored; high settles at 70
    // (held since 50); low settles at 110 (held since 90).
    assert_eq!(reported, [false, true, false]);
    assert_eq!(ended.unwrap(), Stop::Cancelled);
}

#[tokio::test]
async fn gpio_heartbeat_repeats_the_level() {
    let levels = [H; 31]; // 0 ..= 300 ms
    let (reported, _) = run_script(&levels, 0, &settings(false, 0, 100)).await;
    assert_eq!(reported, [true; 4], "at 0, 100, 200 and 300 ms");
}

#[tokio::test]
async fn gpio_debounce_across_the_tick_wrap() {
    // Ticks u32::MAX - 19, u32::MAX - 9, then wrapping to 0, 10, 20 ...
    let levels = [H, H, H, L, L, L, L];
    let (reported, _) = run_script(&levels, u32::MAX - 19, &settings(false, 20, 0)).await;
    assert_eq!(reported, [true, false]);
}

#[tokio::test]
async fn gpio_active_low_inverts() {
    let (reported, _) = run_script(&[L, L, H, H], 0, &settings(true, 0, 0)).await;
    assert_eq!(reported, [true, false]);
}

#[tokio::test]
async fn gpio_pin_error_ends_the_session_with_an_error() {
    let err = embedded_hal_mock::eh1::MockError::Io(std::io::ErrorKind::NotConnected);
    let mut mock = PinMock::new(&[Transaction::get(H), Transaction::get(H).with_error(err)]);
    let (tx, _rx) = mpsc::channel(8);
    let mut out = Emitter::new(
        "door",
        SourceContext {
            tx,
            cancel: CancellationToken::new(),
            metrics: Arc::new(Metrics::default()),
            status: StatusBoard::default(),
        },
    );
    let ended = run_pin(
        mock.clone(),
        &mut Steps { next: 0 },
        &settings(false, 0, 0),
        &mut out,
    )
    .await;
    mock.done();
    let err = ended.unwrap_err();
    assert_eq!(err.kind(), "io");
    assert!(err.to_string().contains("NotConnected"), "{err}");
}

#[tokio::test]
async fn gpio_missing_chip_is_retried_not_fatal() {
    let s = start(
        "type = \"gpio\"\nname = \"door\"\nsensor = \"door_open\"\nchip = \"/dev/gpiochip-outpost-test\"\nline = 17\nactive-low = true\n",
    );
    s.wait_until("retrying on a missing chip", |s| {
        s.state() == Some(SourceState::Retrying) && s.up() == 0 && s.errors("open") >= 2
    })
    .await;
    assert!(
        s.last_error().contains("gpiochip-outpost-test"),
        "{}",
        s.last_error()
    );
    s.stop().await;
}

// ------------------------------------------------------------------ config

#[test]
fn unknown_keys_in_a_source_table_are_rejected() {
    for text in [
        "type = \"serial-frames\"\nname = \"a\"\npath = \"/dev/x\"\nbaudrate = 9600\n",
        "type = \"serial-lines\"\nname = \"a\"\npath = \"/dev/x\"\nformt = \"kv\"\n",
        "type = \"gpio\"\nname = \"a\"\nsensor = \"s\"\nline = 1\ndebounse = \"5ms\"\n",
    ] {
        let err = toml::from_str::<SourceConfig>(text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
    let err = toml::from_str::<SourceConfig>("type = \"modbus\"\nname = \"a\"\n").unwrap_err();
    assert!(err.to_string().contains("modbus"), "{err}");
}

#[test]
fn validation_reports_every_problem_with_its_key() {
    let config: SourceConfig = toml::from_str(
        "type = \"serial-frames\"\nname = \"\"\npath = \"\"\nbaud = 0\ndata-bits = 9\nstop-bits = 3\n\
         [[channels]]\nchannel = 1\nname = \"\"\n[[channels]]\nchannel = 1\nscale = nan\n",
    )
    .unwrap();
    let mut problems = Vec::new();
    config.validate("sources[2]", &mut problems);
    for key in [
        "name",
        "path",
        "baud: must be > 0",
        "data-bits",
        "stop-bits",
        "channels[0].name",
        "channels[1].channel",
        "channels[1].scale",
    ] {
        let key = format!("sources[2].{key}");
        assert!(
            problems.iter().any(|p| p.starts_with(&key)),
            "{key} missing in {problems:?}"
        );
    }
}

#[test]
fn defaults_and_the_shipped_example_sources() {
    match parse(&frames_config("/dev/ttyUSB0", "")) {
        SourceConfig::SerialFrames(c) => {
            assert_eq!((c.baud, c.data_bits, c.stop_bits), (115_200, 8, 1));
            assert_eq!(c.parity, outpost_agent::sources::Parity::None);
            assert_eq!(
                c.time_source,
                outpost_agent::sources::serial::TimeSource::Receive
            );
        }
        other => panic!("{other:?}"),
    }
    #[derive(serde::Deserialize)]
    struct Example {
        sources: Vec<SourceConfig>,
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let example: Example = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        for (i, s) in example.sources.iter().enumerate() {
            let mut problems = Vec::new();
            s.validate(&format!("sources[{i}]"), &mut problems);
            assert!(problems.is_empty(), "{problems:?}");
        }
    }
}
