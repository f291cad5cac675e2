//! The serial frame: what sensor firmware sends to the agent over a UART.
//!
//! # Format (byte-exact description and test vectors in `docs/serial-protocol.md`)
//!
//! ```text
//! on the wire:  0x00  COBS( body || crc32_le(body) )  0x00
//! body:         postcard encoding of `Frame` (varints, little-endian floats)
//! ```
//!
//! * `body` is at most [`MAX_BODY_LEN`] bytes; the COBS-encoded part between
//!   the delimiters at most [`MAX_FRAME_LEN`] bytes. A reader that sees more
//!   than that before a 0x00 discards everything up to the next 0x00 and
//!   counts one oversize error.
//! * The CRC is CRC-32/ISO-HDLC (the zlib/Ethernet CRC), over `body` only,
//!   appended little-endian. postcard happily decodes a bit-flipped body into
//!   wrong values, so the CRC is what makes line noise detectable.
//! * Writers send a 0x00 *before* every frame as well as after it. Noise
//!   between frames (an unplugged, replugged or badly grounded line) then
//!   costs at most the frame it lands in, never the next good one as well.
//!   Readers ignore empty frames (two 0x00 in a row).
//!
//! # Invariants
//! * Encoding never allocates and never panics: every length is checked
//!   against the caller's buffer and the limits below (`no_std`, no alloc).
//! * Decoding (std only, [`FrameDecoder`]) never panics on any input and
//!   resynchronises at the next 0x00 after garbage.

use serde::{Deserialize, Serialize};

/// Longest channel name a descriptor frame may carry, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 32;
/// Longest unit string a descriptor frame may carry, in bytes of UTF-8.
pub const MAX_UNIT_LEN: usize = 16;
/// Longest firmware identification string in a hello frame.
pub const MAX_FIRMWARE_LEN: usize = 32;
/// Longest postcard body of any valid frame, CRC excluded. The largest frame
/// is a descriptor: counter (3) + kind (1) + channel (3) + name (1 + 32) +
/// unit (1 + 16) = 57 bytes; the limit leaves headroom for future fields.
pub const MAX_BODY_LEN: usize = 80;
/// Length of the CRC-32 trailer.
pub const CRC_LEN: usize = 4;
/// Longest COBS-encoded frame between two 0x00 delimiters.
pub const MAX_FRAME_LEN: usize = MAX_BODY_LEN + CRC_LEN + 1;
/// Buffer size that holds any encoded frame including both delimiters.
pub const MAX_WIRE_LEN: usize = MAX_FRAME_LEN + 2;
/// The frame delimiter.
pub const DELIMITER: u8 = 0x00;

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// CRC-32/ISO-HDLC of `bytes`, as appended to every frame body.
pub fn crc32(bytes: &[u8]) -> u32 {
    CRC32.checksum(bytes)
}

/// A sensor value as firmware reports it.
///
/// The variant order is part of the wire format (postcard encodes the index).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// 0: IEEE-754 single, 4 bytes little-endian.
    F32(f32),
    /// 1: IEEE-754 double, 8 bytes little-endian.
    F64(f64),
    /// 2: signed integer, zigzag varint.
    I64(i64),
    /// 3: boolean, one byte 0x00 or 0x01.
    Bool(bool),
}

/// What a frame carries. The variant order is part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Body<'a> {
    /// 0: one reading of one channel.
    Reading {
        /// Channel (sensor) id on this device.
        channel: u16,
        /// Firmware tick in milliseconds (wraps at 2^32, ~49.7 days).
        tick_ms: u32,
        /// The value read.
        value: Value,
    },
    /// 1: names a channel, so the agent can label its readings.
    Descriptor {
        /// Channel id this descriptor is for.
        channel: u16,
        /// Sensor name, at most [`MAX_NAME_LEN`] bytes.
        #[serde(borrow)]
        name: &'a str,
        /// Unit (e.g. "degC"), at most [`MAX_UNIT_LEN`] bytes, may be empty.
        #[serde(borrow)]
        unit: &'a str,
    },
    /// 2: sent once at boot; the frame counter restarts after it.
    Hello {
        /// Firmware identification, at most [`MAX_FIRMWARE_LEN`] bytes.
        #[serde(borrow)]
        firmware: &'a str,
        /// Firmware tick at boot.
        tick_ms: u32,
    },
}

/// One serial frame: a wrapping counter plus a body.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Frame<'a> {
    /// Incremented (wrapping) by one for every frame the firmware sends, of
    /// any kind, so the reader can count frames lost on the line.
    pub counter: u16,
    /// The payload.
    #[serde(borrow)]
    pub body: Body<'a>,
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// A string field is longer than its limit.
    FieldTooLong {
        /// Which field.
        field: &'static str,
        /// Its limit in bytes.
        max: usize,
    },
    /// The output buffer is smaller than the encoded frame.
    BufferTooSmall,
}

impl core::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            EncodeError::FieldTooLong { field, max } => {
                write!(f, "frame field `{field}` is longer than {max} bytes")
            }
            EncodeError::BufferTooSmall => f.write_str("output buffer too small for frame"),
        }
    }
}

impl Frame<'_> {
    fn check_limits(&self) -> Result<(), EncodeError> {
        let check = |field: &'static str, s: &str, max: usize| {
            if s.len() > max {
                Err(EncodeError::FieldTooLong { field, max })
            } else {
                Ok(())
            }
        };
        match self.body {
            Body::Reading { .. } => Ok(()),
            Body::Descriptor { name, unit, .. } => {
                check("name", name, MAX_NAME_LEN)?;
                check("unit", unit, MAX_UNIT_LEN)
            }
            Body::Hello { firmware, .. } => check("firmware", firmware, MAX_FIRMWARE_LEN),
        }
    }

    /// Encodes the frame as it goes on the wire, leading and trailing 0x00
    /// included, into `out`. Returns the number of bytes written.
    ///
    /// Needs no allocator; `out` of [`MAX_WIRE_LEN`] bytes always suffices.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        self.check_limits()?;
        let mut body = [0u8; MAX_BODY_LEN + CRC_LEN];
        let used = postcard::to_slice(self, &mut body[..MAX_BODY_LEN])
            .map_err(|_| EncodeError::BufferTooSmall)?
            .len();
        let crc = crc32(&body[..used]).to_le_bytes();
        body[used..used + CRC_LEN].copy_from_slice(&crc);
        let raw = &body[..used + CRC_LEN];

        if out.len() < 2 {
            return Err(EncodeError::BufferTooSmall);
        }
        out[0] = DELIMITER;
        let end = out.len() - 1;
        let n = cobs::try_encode(raw, &mut out[1..end]).map_err(|_| EncodeError::BufferTooSmall)?;
        out[1 + n] = DELIMITER;
        Ok(n + 2)
    }
}

/// Number of frames lost between two consecutive counters, assuming fewer
/// than 65,536 were lost (the counter wraps at 2^16).
pub fn frames_lost(previous: u16, current: u16) -> u16 {
    current.wrapping_sub(previous).wrapping_sub(1)
}

#[cfg(feature = "std")]
pub use decoder::{DecodeError, DecodedBody, DecodedFrame, DecoderStats, FrameDecoder, Frames};

#[cfg(feature = "std")]
mod decoder {
    use super::{Body, Frame, Value, CRC_LEN, DELIMITER, MAX_FRAME_LEN};

    /// A frame decoded from the line, owning its strings.
    #[derive(Debug, Clone, PartialEq)]
    pub struct DecodedFrame {
        /// The firmware's wrapping frame counter.
        pub counter: u16,
        /// The payload.
        pub body: DecodedBody,
    }

    /// Owned counterpart of [`Body`].
    #[derive(Debug, Clone, PartialEq)]
    pub enum DecodedBody {
        /// A reading.
        Reading {
            /// Channel id.
            channel: u16,
            /// Firmware tick in ms.
            tick_ms: u32,
            /// The value.
            value: Value,
        },
        /// A channel descriptor.
        Descriptor {
            /// Channel id.
            channel: u16,
            /// Sensor name.
            name: String,
            /// Unit.
            unit: String,
        },
        /// Firmware boot announcement.
        Hello {
            /// Firmware identification.
            firmware: String,
            /// Tick at boot.
            tick_ms: u32,
        },
    }

    impl From<Frame<'_>> for DecodedFrame {
        fn from(f: Frame<'_>) -> Self {
            let body = match f.body {
                Body::Reading {
                    channel,
                    tick_ms,
                    value,
                } => DecodedBody::Reading {
                    channel,
                    tick_ms,
                    value,
                },
                Body::Descriptor {
                    channel,
                    name,
                    unit,
                } => DecodedBody::Descriptor {
                    channel,
                    name: name.to_owned(),
                    unit: unit.to_owned(),
                },
                Body::Hello { firmware, tick_ms } => DecodedBody::Hello {
                    firmware: firmware.to_owned(),
                    tick_ms,
                },
            };
            DecodedFrame {
                counter: f.counter,
                body,
            }
        }
    }

    /// Why bytes between two delimiters are not a frame. Each is counted in
    /// [`DecoderStats`]; none stops the decoder.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum DecodeError {
        /// More than [`MAX_FRAME_LEN`] bytes arrived without a delimiter.
        #[error("oversize frame: more than {MAX_FRAME_LEN} bytes without a 0x00 delimiter")]
        Oversize,
        /// The bytes are not valid COBS.
        #[error("invalid COBS encoding ({len} bytes)")]
        Cobs {
            /// Bytes between the delimiters.
            len: usize,
        },
        /// Too short to hold a body and a CRC.
        #[error("frame too short ({len} bytes)")]
        TooShort {
            /// Decoded length.
            len: usize,
        },
        /// The CRC does not match the body: line noise.
        #[error("CRC mismatch: frame says {expected:#010x}, body gives {actual:#010x}")]
        Crc {
            /// CRC carried by the frame.
            expected: u32,
            /// CRC computed over the body.
            actual: u32,
        },
        /// CRC good but the body is not a frame this decoder knows (for
        /// example a newer firmware's frame kind).
        #[error("undecodable frame body: {0}")]
        Body(String),
    }

    /// Counters of what the decoder saw, for metrics.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct DecoderStats {
        /// Frames decoded.
        pub frames: u64,
        /// Oversize runs discarded.
        pub oversize: u64,
        /// Invalid COBS or too short.
        pub framing_errors: u64,
        /// CRC mismatches.
        pub crc_errors: u64,
        /// CRC good, body undecodable.
        pub body_errors: u64,
        /// Bytes that did not end up in a decoded frame.
        pub discarded_bytes: u64,
    }

    impl DecoderStats {
        /// All errors of any kind.
        pub fn errors(&self) -> u64 {
            self.oversize + self.framing_errors + self.crc_errors + self.body_errors
        }
    }

    /// Streaming decoder: feed it bytes as they come off the port, in chunks
    /// of any size; it yields frames and errors. Memory is bounded by
    /// [`MAX_FRAME_LEN`].
    #[derive(Debug, Default)]
    pub struct FrameDecoder {
        buf: Vec<u8>,
        /// True while discarding an oversize run up to the next delimiter.
        skipping: bool,
        stats: DecoderStats,
    }

    impl FrameDecoder {
        /// A decoder with empty state.
        pub fn new() -> Self {
            FrameDecoder {
                buf: Vec::with_capacity(MAX_FRAME_LEN),
                skipping: false,
                stats: DecoderStats::default(),
            }
        }

        /// What the decoder has seen so far.
        pub fn stats(&self) -> DecoderStats {
            self.stats
        }

        /// Bytes held while waiting for a delimiter.
        pub fn pending(&self) -> usize {
            self.buf.len()
        }

        /// Feeds `bytes`; the returned iterator yields every frame (or error)
        /// they complete. Bytes after the last delimiter are kept for the
        /// next call. Dropping the iterator early keeps the unread bytes
        /// unprocessed (they are processed by the next `feed`).
        pub fn feed<'d, 'b>(&'d mut self, bytes: &'b [u8]) -> Frames<'d, 'b> {
            Frames {
                decoder: self,
                input: bytes,
            }
        }

        /// Processes the bytes between two delimiters.
        fn finish_frame(&mut self) -> Option<Result<DecodedFrame, DecodeError>> {
            if self.skipping {
                self.skipping = false;
                self.buf.clear();
                return None; // already reported when the run became oversize
            }
            if self.buf.is_empty() {
                return None; // 0x00 0x00: an empty frame, the leading delimiter
            }
            let result = self.decode_buf();
            match &result {
                Ok(_) => self.stats.frames += 1,
                Err(e) => {
                    self.stats.discarded_bytes += self.buf.len() as u64;
                    match e {
                        DecodeError::Cobs { .. } | DecodeError::TooShort { .. } => {
                            self.stats.framing_errors += 1
                        }
                        DecodeError::Crc { .. } => self.stats.crc_errors += 1,
                        DecodeError::Body(_) => self.stats.body_errors += 1,
                        DecodeError::Oversize => self.stats.oversize += 1,
                    }
                }
            }
            self.buf.clear();
            Some(result)
        }

        fn decode_buf(&self) -> Result<DecodedFrame, DecodeError> {
            let mut raw = [0u8; MAX_FRAME_LEN];
            let len = self.buf.len();
            let report =
                cobs::decode(&self.buf, &mut raw).map_err(|_| DecodeError::Cobs { len })?;
            let n = report.frame_size();
            if n <= CRC_LEN {
                return Err(DecodeError::TooShort { len: n });
            }
            let (body, crc) = raw[..n].split_at(n - CRC_LEN);
            let expected = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
            let actual = super::crc32(body);
            if expected != actual {
                return Err(DecodeError::Crc { expected, actual });
            }
            let (frame, rest): (Frame<'_>, &[u8]) =
                postcard::take_from_bytes(body).map_err(|e| DecodeError::Body(e.to_string()))?;
            if !rest.is_empty() {
                return Err(DecodeError::Body(format!(
                    "{} trailing bytes after frame",
                    rest.len()
                )));
            }
            Ok(frame.into())
        }
    }

    /// Iterator returned by [`FrameDecoder::feed`].
    #[derive(Debug)]
    pub struct Frames<'d, 'b> {
        decoder: &'d mut FrameDecoder,
        input: &'b [u8],
    }

    impl Iterator for Frames<'_, '_> {
        type Item = Result<DecodedFrame, DecodeError>;

        fn next(&mut self) -> Option<Self::Item> {
            let d = &mut *self.decoder;
            while let Some((&byte, rest)) = self.input.split_first() {
                self.input = rest;
                if byte == DELIMITER {
                    if let Some(item) = d.finish_frame() {
                        return Some(item);
                    }
                    continue;
                }
                if d.skipping {
                    d.stats.discarded_bytes += 1;
                    continue;
                }
                if d.buf.len() == MAX_FRAME_LEN {
                    d.stats.discarded_bytes += d.buf.len() as u64 + 1;
                    d.stats.oversize += 1;
                    d.buf.clear();
                    d.skipping = true;
                    return Some(Err(DecodeError::Oversize));
                }
                d.buf.push(byte);
            }
            None
        }
    }
}

#[cfg(all(test, feature = "std"))]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn wire(f: &Frame<'_>) -> Vec<u8> {
        let mut out = [0u8; MAX_WIRE_LEN];
        let n = f.encode(&mut out).unwrap();
        out[..n].to_vec()
    }

    #[test]
    fn reading_round_trips() {
        let f = Frame {
            counter: 7,
            body: Body::Reading {
                channel: 3,
                tick_ms: 123_456,
                value: Value::F32(21.5),
            },
        };
        let bytes = wire(&f);
        assert_eq!(bytes[0], 0);
        assert_eq!(*bytes.last().unwrap(), 0);
        assert!(
            !bytes[1..bytes.len() - 1].contains(&0),
            "COBS leaves no zero inside"
        );
        let mut d = FrameDecoder::new();
        let got: Vec<_> = d.feed(&bytes).collect();
        assert_eq!(got, vec![Ok(DecodedFrame::from(f))]);
    }

    #[test]
    fn field_limits_are_enforced_without_panic() {
        let long = "x".repeat(MAX_NAME_LEN + 1);
        let f = Frame {
            counter: 0,
            body: Body::Descriptor {
                channel: 1,
                name: &long,
                unit: "",
            },
        };
        let mut out = [0u8; MAX_WIRE_LEN];
        assert_eq!(
            f.encode(&mut out),
            Err(EncodeError::FieldTooLong {
                field: "name",
                max: MAX_NAME_LEN
            })
        );
        let ok = Frame {
            counter: 0,
            body: Body::Descriptor {
                channel: 1,
                name: "t",
                unit: "degC",
            },
        };
        let mut small = [0u8; 4];
        assert_eq!(ok.encode(&mut small), Err(EncodeError::BufferTooSmall));
    }

    #[test]
    fn largest_frame_fits_max_wire_len() {
        let name = "n".repeat(MAX_NAME_LEN);
        let unit = "u".repeat(MAX_UNIT_LEN);
        let f = Frame {
            counter: u16::MAX,
            body: Body::Descriptor {
                channel: u16::MAX,
                name: &name,
                unit: &unit,
            },
        };
        let bytes = wire(&f);
        assert!(bytes.len() <= MAX_WIRE_LEN);
        let mut d = FrameDecoder::new();
        assert_eq!(d.feed(&bytes).next(), Some(Ok(DecodedFrame::from(f))));
    }

    #[test]
    fn flipped_bit_is_a_crc_error_and_next_frame_survives() {
        let a = Frame {
            counter: 1,
            body: Body::Reading {
                channel: 1,
                tick_ms: 10,
                value: Value::I64(-5),
            },
        };
        let b = Frame {
            counter: 2,
            body: Body::Reading {
                channel: 1,
                tick_ms: 20,
                value: Value::Bool(true),
            },
        };
        let mut bytes = wire(&a);
        bytes[3] ^= 0x10;
        if bytes[3] == 0 {
            bytes[3] = 0x55;
        }
        bytes.extend(wire(&b));
        let mut d = FrameDecoder::new();
        let got: Vec<_> = d.feed(&bytes).collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].is_err());
        assert_eq!(got[1], Ok(DecodedFrame::from(b)));
        assert_eq!(d.stats().frames, 1);
        assert_eq!(d.stats().errors(), 1);
    }

    #[test]
    fn oversize_run_is_reported_once_and_decoder_recovers() {
        let mut bytes = vec![0x41u8; 1000];
        let f = Frame {
            counter: 9,
            body: Body::Hello {
                firmware: "fw-1.2",
                tick_ms: 0,
            },
        };
        bytes.extend(wire(&f));
        let mut d = FrameDecoder::new();
        let got: Vec<_> = d.feed(&bytes).collect();
        assert_eq!(
            got,
            vec![Err(DecodeError::Oversize), Ok(DecodedFrame::from(f))]
        );
        assert_eq!(d.stats().oversize, 1);
        assert!(d.pending() == 0);
    }

    #[test]
    fn frames_split_across_feeds() {
        let f = Frame {
            counter: 3,
            body: Body::Reading {
                channel: 2,
                tick_ms: 99,
                value: Value::F64(1.25),
            },
        };
        let bytes = wire(&f);
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in bytes.chunks(1) {
            got.extend(d.feed(b));
        }
        assert_eq!(got, vec![Ok(DecodedFrame::from(f))]);
    }

    #[test]
    fn lost_frames_wrap() {
        assert_eq!(frames_lost(5, 6), 0);
        assert_eq!(frames_lost(5, 9), 3);
        assert_eq!(frames_lost(u16::MAX, 0), 0);
        assert_eq!(frames_lost(u16::MAX - 1, 1), 2);
    }
}
