//! `outpost-sim` writes real frames into a pseudo-terminal; the proto decoder
//! reads them back from the pty's path, with and without line noise.

use std::io::Read;
use std::time::{Duration, Instant};

use outpost_proto::frame::{DecodedBody, DecodedFrame, FrameDecoder};
use outpost_tests::start_sim_pty;

/// Reads from the pty until `enough` says so; panics after `timeout`.
fn read_frames(
    path: &str,
    timeout: Duration,
    mut enough: impl FnMut(&[DecodedFrame]) -> bool,
) -> (Vec<DecodedFrame>, FrameDecoder) {
    let mut port = serialport::new(path, 115_200)
        .timeout(Duration::from_millis(200))
        .open_native()
        .unwrap_or_else(|e| panic!("open {path}: {e}"));
    let mut dec = FrameDecoder::new();
    let mut frames = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while !enough(&frames) {
        assert!(
            Instant::now() < deadline,
            "timed out reading frames; stats {:?}",
            dec.stats()
        );
        match port.read(&mut buf) {
            Ok(n) => frames.extend(dec.feed(&buf[..n]).filter_map(Result::ok)),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("read {path}: {e}"),
        }
    }
    (frames, dec)
}

fn readings(frames: &[DecodedFrame]) -> Vec<(u16, f64)> {
    frames
        .iter()
        .filter_map(|f| match &f.body {
            DecodedBody::Reading { channel, value, .. } => {
                let v = match value {
                    outpost_proto::frame::Value::F32(v) => f64::from(*v),
                    outpost_proto::frame::Value::F64(v) => *v,
                    outpost_proto::frame::Value::I64(v) => *v as f64,
                    outpost_proto::frame::Value::Bool(b) => f64::from(u8::from(*b)),
                };
                Some((*channel, v))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn clean_line_delivers_every_frame_in_order() {
    let (_sim, path) = start_sim_pty(&["--rate", "50", "--channels", "3"]);
    let (frames, dec) = read_frames(&path, Duration::from_secs(60), |f| readings(f).len() >= 120);
    let r = readings(&frames);
    // Channels arrive round-robin within each tick, from the first tick on.
    for (i, (ch, _)) in r.iter().enumerate() {
        assert_eq!(*ch as usize, i % 3, "reading {i}");
    }
    // Steady scenario: plausible sensor values, not garbage.
    assert!(
        r.iter().all(|(_, v)| v.is_finite() && v.abs() < 10_000.0),
        "{r:?}"
    );
    // Nothing lost on a clean line: frame counters are contiguous from 0.
    let counters: Vec<u16> = frames.iter().map(|f| f.counter).collect();
    assert_eq!(counters, (0..counters.len() as u16).collect::<Vec<_>>());
    let names: Vec<_> = frames
        .iter()
        .filter_map(|f| match &f.body {
            DecodedBody::Descriptor { channel, name, .. } => Some((*channel, name.clone())),
            _ => None,
        })
        .collect();
    assert!(
        names.contains(&(0, "temperature".to_string())),
        "descriptors name the channels: {names:?}"
    );
    assert!(
        matches!(frames[0].body, DecodedBody::Hello { .. }),
        "hello frame at boot: {:?}",
        frames[0]
    );
    assert_eq!(dec.stats().errors(), 0, "clean line: {:?}", dec.stats());
}

#[test]
fn garbage_is_counted_and_valid_frames_still_decode() {
    let (_sim, path) = start_sim_pty(&[
        "--rate",
        "100",
        "--channels",
        "2",
        "--garbage",
        "0.3",
        "--seed",
        "7",
    ]);
    // Read until frame counter 800 has gone by: 801 frames were sent, about
    // 15% of them hit by a bit flip, the rest preceded by bursts of noise.
    let (frames, dec) = read_frames(&path, Duration::from_secs(60), |f| {
        f.last().is_some_and(|f| f.counter >= 800)
    });
    let stats = dec.stats();
    let decoded = frames.len();
    println!("garbage run: {decoded} of 801 frames decoded, decoder stats {stats:?}");
    assert!(
        stats.errors() >= 20,
        "corruption must be detected and counted: {stats:?}"
    );
    assert!(decoded > 500, "most frames survive the noise: {decoded}");
    assert!(decoded < 801, "some frames were corrupted: {decoded}");
    // Whatever decoded is genuine: counters strictly increase, channels and
    // values are what the simulator sends.
    assert!(
        frames.windows(2).all(|w| w[0].counter < w[1].counter),
        "counters increase"
    );
    let r = readings(&frames);
    assert!(
        r.iter()
            .all(|(ch, v)| *ch < 2 && v.is_finite() && v.abs() < 10_000.0),
        "no corrupt value decoded"
    );
}
