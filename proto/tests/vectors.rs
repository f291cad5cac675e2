//! Byte-exact test vectors of the serial frame format. The same vectors are
//! printed in docs/serial-protocol.md; this test checks the code against the
//! table below and the table against that document, so neither can drift.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use outpost_proto::frame::{crc32, Body, DecodedFrame, Frame, FrameDecoder, Value, MAX_WIRE_LEN};

fn unhex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

fn vectors() -> Vec<(
    &'static str,
    Frame<'static>,
    &'static str,
    &'static str,
    u32,
)> {
    vec![
        (
            "V1",
            Frame {
                counter: 0,
                body: Body::Hello {
                    firmware: "fw-1.0",
                    tick_ms: 0,
                },
            },
            "00 02 06 66 77 2d 31 2e 30 00",
            "00 01 09 02 06 66 77 2d 31 2e 30 05 b9 24 01 69 00",
            0x690124b9,
        ),
        (
            "V2",
            Frame {
                counter: 1,
                body: Body::Descriptor {
                    channel: 0,
                    name: "temperature",
                    unit: "degC",
                },
            },
            "01 01 00 0b 74 65 6d 70 65 72 61 74 75 72 65 04 64 65 67 43",
            "00 03 01 01 16 0b 74 65 6d 70 65 72 61 74 75 72 65 04 64 65 67 43 3e 5c fd 7b 00",
            0x7bfd5c3e,
        ),
        (
            "V3",
            Frame {
                counter: 2,
                body: Body::Reading {
                    channel: 0,
                    tick_ms: 1000,
                    value: Value::F32(21.5),
                },
            },
            "02 00 00 e8 07 00 00 00 ac 41",
            "00 02 02 01 03 e8 07 01 01 07 ac 41 60 e2 5c c9 00",
            0xc95ce260,
        ),
        (
            "V4",
            Frame {
                counter: 3,
                body: Body::Reading {
                    channel: 1,
                    tick_ms: 1500,
                    value: Value::I64(-42),
                },
            },
            "03 00 01 dc 0b 02 53",
            "00 02 03 0a 01 dc 0b 02 53 5f 67 67 31 00",
            0x3167675f,
        ),
        (
            "V5",
            Frame {
                counter: 4,
                body: Body::Reading {
                    channel: 2,
                    tick_ms: 2000,
                    value: Value::Bool(true),
                },
            },
            "04 00 02 d0 0f 03 01",
            "00 02 04 0a 02 d0 0f 03 01 fc 35 c1 62 00",
            0x62c135fc,
        ),
        (
            "V6",
            Frame {
                counter: 300,
                body: Body::Reading {
                    channel: 200,
                    tick_ms: 4_000_000_000,
                    value: Value::F64(-1.5e-3),
                },
            },
            "ac 02 00 c8 01 80 d0 ac f3 0e 01 fa 7e 6a bc 74 93 58 bf",
            "00 03 ac 02 15 c8 01 80 d0 ac f3 0e 01 fa 7e 6a bc 74 93 58 bf 18 40 07 e9 00",
            0xe9074018,
        ),
        (
            "V7",
            Frame {
                counter: 5,
                body: Body::Reading {
                    channel: 0,
                    tick_ms: 0,
                    value: Value::F32(0.0),
                },
            },
            "05 00 00 00 00 00 00 00 00",
            "00 02 05 01 01 01 01 01 01 01 05 e1 51 9e ac 00",
            0xac9e51e1,
        ),
    ]
}

#[test]
fn crc_is_the_standard_crc32() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
}

#[test]
fn frames_encode_to_the_documented_bytes() {
    for (name, frame, body, wire, crc) in vectors() {
        let mut out = [0u8; MAX_WIRE_LEN];
        let n = frame.encode(&mut out).expect("encodes");
        assert_eq!(out[..n], unhex(wire)[..], "{name}: wire bytes");
        let body_bytes = postcard::to_allocvec(&frame).expect("postcard");
        assert_eq!(body_bytes, unhex(body), "{name}: body bytes");
        assert_eq!(crc32(&body_bytes), crc, "{name}: crc");
    }
}

#[test]
fn documented_bytes_decode_to_the_frames() {
    let mut all = Vec::new();
    for (_, _, _, wire, _) in vectors() {
        all.extend(unhex(wire));
    }
    let mut dec = FrameDecoder::new();
    let got: Vec<_> = dec
        .feed(&all)
        .collect::<Result<_, _>>()
        .expect("all vectors decode");
    let want: Vec<DecodedFrame> = vectors()
        .into_iter()
        .map(|v| DecodedFrame::from(v.1))
        .collect();
    assert_eq!(got, want);
    assert_eq!(dec.stats().errors(), 0);
}

#[test]
fn the_document_shows_the_same_vectors() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/serial-protocol.md");
    let doc = std::fs::read_to_string(path).expect("docs/serial-protocol.md exists");
    for (name, _, body, wire, crc) in vectors() {
        let section = doc
            .split("\n### ")
            .find(|s| s.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing from docs/serial-protocol.md"));
        assert!(
            section.contains(&format!("body:  `{body}`")),
            "{name}: body line differs in docs"
        );
        assert!(
            section.contains(&format!("wire:  `{wire}`")),
            "{name}: wire line differs in docs"
        );
        assert!(
            section.contains(&format!("crc:   `{crc:#010x}`")),
            "{name}: crc line differs in docs"
        );
    }
}
