//! Property tests: every frame kind and every batch round-trips; the frame
//! decoder recovers every valid frame from a stream with garbage in between.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use outpost_proto::batch::{self, BatchBuilder, Value as BValue};
use outpost_proto::frame::{
    Body, DecodedFrame, Frame, FrameDecoder, Value, MAX_NAME_LEN, MAX_UNIT_LEN, MAX_WIRE_LEN,
};
use outpost_proto::pb::Quality;
use proptest::prelude::*;

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<f32>()
            .prop_filter("NaN != NaN", |v| !v.is_nan())
            .prop_map(Value::F32),
        any::<f64>()
            .prop_filter("NaN != NaN", |v| !v.is_nan())
            .prop_map(Value::F64),
        any::<i64>().prop_map(Value::I64),
        any::<bool>().prop_map(Value::Bool),
    ]
}

/// Frames with owned strings (the strategy cannot hand out borrows).
#[derive(Debug, Clone)]
enum F {
    Reading(u16, u16, u32, Value),
    Descriptor(u16, u16, String, String),
    Hello(u16, String, u32),
}

impl F {
    fn frame(&self) -> Frame<'_> {
        match self {
            F::Reading(c, ch, t, v) => Frame {
                counter: *c,
                body: Body::Reading {
                    channel: *ch,
                    tick_ms: *t,
                    value: *v,
                },
            },
            F::Descriptor(c, ch, n, u) => Frame {
                counter: *c,
                body: Body::Descriptor {
                    channel: *ch,
                    name: n,
                    unit: u,
                },
            },
            F::Hello(c, fw, t) => Frame {
                counter: *c,
                body: Body::Hello {
                    firmware: fw,
                    tick_ms: *t,
                },
            },
        }
    }
    fn wire(&self) -> Vec<u8> {
        let mut out = [0u8; MAX_WIRE_LEN];
        let n = self.frame().encode(&mut out).unwrap();
        out[..n].to_vec()
    }
}

fn frame() -> impl Strategy<Value = F> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), any::<u32>(), value())
            .prop_map(|(c, ch, t, v)| F::Reading(c, ch, t, v)),
        (any::<u16>(), any::<u16>(), "\\PC{0,8}", "\\PC{0,4}")
            .prop_filter("limits", |(_, _, n, u)| n.len() <= MAX_NAME_LEN
                && u.len() <= MAX_UNIT_LEN)
            .prop_map(|(c, ch, n, u)| F::Descriptor(c, ch, n, u)),
        (any::<u16>(), "[ -~]{0,32}", any::<u32>()).prop_map(|(c, fw, t)| F::Hello(c, fw, t)),
    ]
}

fn is_subsequence(needle: &[DecodedFrame], hay: &[DecodedFrame]) -> bool {
    let mut it = hay.iter();
    needle.iter().all(|n| it.any(|h| h == n))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_frame_kind_round_trips(f in frame()) {
        let mut dec = FrameDecoder::new();
        let got: Vec<_> = dec.feed(&f.wire()).collect();
        prop_assert_eq!(got, vec![Ok(DecodedFrame::from(f.frame()))]);
    }

    #[test]
    fn decoder_recovers_every_frame_between_garbage(
        items in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..200), frame()), 1..20),
        chunk in 1usize..64,
    ) {
        let mut stream = Vec::new();
        for (garbage, f) in &items {
            stream.extend_from_slice(garbage);
            stream.extend(f.wire());
        }
        let mut dec = FrameDecoder::new();
        let mut ok = Vec::new();
        for c in stream.chunks(chunk) {
            ok.extend(dec.feed(c).filter_map(Result::ok));
        }
        let want: Vec<_> = items.iter().map(|(_, f)| DecodedFrame::from(f.frame())).collect();
        prop_assert!(is_subsequence(&want, &ok), "lost a valid frame: want {:?} got {:?}", want, ok);
        prop_assert!(dec.pending() <= outpost_proto::frame::MAX_FRAME_LEN);
    }

    #[test]
    fn decoder_never_panics_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let mut dec = FrameDecoder::new();
        let n = dec.feed(&bytes).count();
        let s = dec.stats();
        prop_assert_eq!(n as u64, s.frames + s.errors());
    }

    #[test]
    fn batches_round_trip(
        first_seq in 0u64..u64::MAX / 2,
        base in -1_000_000_000_000i64..4_000_000_000_000,
        rows in prop::collection::vec((1u64..5, -5_000i64..5_000, 0usize..6, value(), 0i32..3), 0..200),
    ) {
        let names = ["temp", "hum", "press", "door", "state", "x.y-z_1"];
        let mut b = BatchBuilder::new("dev-1").unwrap();
        let mut want = Vec::new();
        let (mut seq, mut t) = (first_seq, base);
        for (i, (dseq, dt, s, v, q)) in rows.iter().enumerate() {
            if i > 0 { seq += dseq; }
            t += dt;
            let v = match (s, v) {
                (4, _) => BValue::Str(format!("s{dseq}")),
                (_, v) => BValue::from(*v),
            };
            let q = Quality::try_from(*q).unwrap();
            b.push(seq, t, names[*s], &v, q).unwrap();
            want.push((names[*s].to_string(), seq, t, v, q));
        }
        let bytes = b.encode();
        let decoded = batch::decode(&bytes).unwrap();
        let got: Vec<_> = batch::readings(&decoded).unwrap()
            .map(|r| (r.sensor.to_string(), r.seq, r.time_ms, r.value.to_value(), r.quality))
            .collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn random_payloads_never_panic_the_batch_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(b) = batch::decode(&bytes) {
            if let Ok(it) = batch::readings(&b) {
                prop_assert_eq!(it.count(), b.keys.len());
            }
        }
    }
}
