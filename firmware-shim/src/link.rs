//! The firmware's end of the serial link: numbered frames onto a UART.
//!
//! [`FrameWriter`] owns the UART (any [`embedded_io::Write`]) and a
//! [`FrameEncoder`], which keeps the wrapping u16 frame counter and encodes
//! each frame into a stack buffer of [`MAX_WIRE_LEN`] bytes; the writer then
//! `write_all`s those bytes. Nothing here allocates.
//!
//! # Counter rules
//! * The first frame carries counter 0; every frame of any kind takes the
//!   next value, wrapping from `u16::MAX` to 0. Send [`FrameWriter::hello`]
//!   first after boot: the agent treats a hello as a restart of the counter.
//! * A frame that cannot be encoded ([`LinkError::Encode`], e.g. a name longer
//!   than `MAX_NAME_LEN`) consumes no counter value: nothing was sent.
//! * A frame whose write failed ([`LinkError::Io`]) does consume its value:
//!   part of it may be on the line, and the gap in the counter tells the
//!   agent that a frame was lost.

use core::fmt;

use embedded_io::Write;
use outpost_proto::frame::{Body, EncodeError, Frame, Value, MAX_WIRE_LEN};

/// A channel (sensor) as a descriptor frame names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channel<'a> {
    /// Channel id on this device, as in reading frames.
    pub id: u16,
    /// Sensor name, at most `MAX_NAME_LEN` bytes (e.g. `temperature`).
    pub name: &'a str,
    /// Unit, at most `MAX_UNIT_LEN` bytes, may be empty (e.g. `degC`).
    pub unit: &'a str,
}

impl<'a> Channel<'a> {
    /// A channel description.
    pub const fn new(id: u16, name: &'a str, unit: &'a str) -> Self {
        Channel { id, name, unit }
    }
}

/// Why a frame did not make it onto the UART.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkError<E> {
    /// The frame could not be encoded (a string field too long); nothing was
    /// written and the counter did not move.
    Encode(EncodeError),
    /// The UART write failed; the frame may be partly written.
    Io(E),
}

impl<E: fmt::Debug> fmt::Display for LinkError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Encode(e) => write!(f, "cannot encode frame: {e}"),
            LinkError::Io(e) => write!(f, "UART write failed: {e:?}"),
        }
    }
}

impl<E: fmt::Debug> core::error::Error for LinkError<E> {}

/// Numbers and encodes frames: the sans-IO half of [`FrameWriter`], for
/// callers that need the encoded bytes themselves (DMA transfers, the
/// simulator's noise injection).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrameEncoder {
    next_counter: u16,
}

impl FrameEncoder {
    /// An encoder whose first frame carries counter 0.
    pub const fn new() -> Self {
        FrameEncoder { next_counter: 0 }
    }

    /// An encoder whose first frame carries `counter`.
    pub const fn starting_at(counter: u16) -> Self {
        FrameEncoder {
            next_counter: counter,
        }
    }

    /// The counter the next frame will carry.
    pub const fn counter(&self) -> u16 {
        self.next_counter
    }

    /// Encodes `body` with the next counter into `out` (leading and trailing
    /// 0x00 included) and returns the bytes to send. The counter advances
    /// only if encoding succeeds. `out` of [`MAX_WIRE_LEN`] bytes always
    /// suffices.
    pub fn encode<'o>(
        &mut self,
        body: Body<'_>,
        out: &'o mut [u8],
    ) -> Result<&'o [u8], EncodeError> {
        let frame = Frame {
            counter: self.next_counter,
            body,
        };
        let n = frame.encode(out)?;
        self.next_counter = self.next_counter.wrapping_add(1);
        Ok(&out[..n])
    }
}

/// Writes numbered frames to a UART. See the module documentation for the
/// counter rules.
#[derive(Debug)]
pub struct FrameWriter<W> {
    uart: W,
    encoder: FrameEncoder,
}

impl<W: Write> FrameWriter<W> {
    /// A writer over `uart` whose first frame carries counter 0.
    pub fn new(uart: W) -> Self {
        Self::with_counter(uart, 0)
    }

    /// A writer whose first frame carries `counter` (e.g. to continue a
    /// sequence kept across a UART re-initialisation).
    pub fn with_counter(uart: W, counter: u16) -> Self {
        FrameWriter {
            uart,
            encoder: FrameEncoder::starting_at(counter),
        }
    }

    /// The counter the next frame will carry.
    pub fn counter(&self) -> u16 {
        self.encoder.counter()
    }

    /// Encodes `body` with the next counter and writes it. Returns the
    /// counter the frame carried.
    pub fn send(&mut self, body: Body<'_>) -> Result<u16, LinkError<W::Error>> {
        let counter = self.encoder.counter();
        let mut buf = [0u8; MAX_WIRE_LEN];
        let bytes = self
            .encoder
            .encode(body, &mut buf)
            .map_err(LinkError::Encode)?;
        self.uart.write_all(bytes).map_err(LinkError::Io)?;
        Ok(counter)
    }

    /// Sends the boot announcement: `firmware` (at most `MAX_FIRMWARE_LEN`
    /// bytes) and the tick at boot. Send it first, with counter 0.
    pub fn hello(&mut self, firmware: &str, tick_ms: u32) -> Result<u16, LinkError<W::Error>> {
        self.send(Body::Hello { firmware, tick_ms })
    }

    /// Sends a descriptor naming `channel`.
    pub fn describe(
        &mut self,
        channel: u16,
        name: &str,
        unit: &str,
    ) -> Result<u16, LinkError<W::Error>> {
        self.send(Body::Descriptor {
            channel,
            name,
            unit,
        })
    }

    /// Sends a descriptor for each channel, in order; stops at the first
    /// error.
    pub fn describe_all(&mut self, channels: &[Channel<'_>]) -> Result<(), LinkError<W::Error>> {
        for c in channels {
            self.describe(c.id, c.name, c.unit)?;
        }
        Ok(())
    }

    /// Sends one reading of `channel` taken at `tick_ms`.
    pub fn reading(
        &mut self,
        channel: u16,
        tick_ms: u32,
        value: Value,
    ) -> Result<u16, LinkError<W::Error>> {
        self.send(Body::Reading {
            channel,
            tick_ms,
            value,
        })
    }

    /// Flushes the UART (waits until the bytes are transmitted, if the UART
    /// implements it so).
    pub fn flush(&mut self) -> Result<(), LinkError<W::Error>> {
        self.uart.flush().map_err(LinkError::Io)
    }

    /// The UART.
    pub fn get_ref(&self) -> &W {
        &self.uart
    }

    /// The UART, mutably (e.g. to reconfigure it). Writing to it directly
    /// puts bytes between frames; the leading 0x00 of the next frame keeps
    /// the agent in sync.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.uart
    }

    /// Gives the UART back.
    pub fn into_inner(self) -> W {
        self.uart
    }
}

#[cfg(all(test, feature = "std"))]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use outpost_proto::frame::{DecodedBody, DecodedFrame, FrameDecoder, MAX_NAME_LEN};

    /// Decodes `bytes`, failing the test on any decode error.
    fn decode(bytes: &[u8]) -> Vec<DecodedFrame> {
        let mut d = FrameDecoder::new();
        let frames = d.feed(bytes).collect::<Result<Vec<_>, _>>().unwrap();
        assert_eq!(d.stats().errors(), 0);
        frames
    }

    /// Runs `f` against a writer over a 1 KiB slice; returns the bytes written.
    fn written(f: impl FnOnce(&mut FrameWriter<&mut [u8]>)) -> Vec<u8> {
        let mut buf = [0u8; 1024];
        let mut w = FrameWriter::new(&mut buf[..]);
        f(&mut w);
        let left = w.into_inner().len();
        buf[..buf.len() - left].to_vec()
    }

    #[test]
    fn frames_decode_with_consecutive_counters_from_zero() {
        let channels = [
            Channel::new(0, "temperature", "degC"),
            Channel::new(1, "door", ""),
        ];
        let bytes = written(|w| {
            assert_eq!(w.hello("fw-1.0", 5).unwrap(), 0);
            w.describe_all(&channels).unwrap();
            assert_eq!(w.reading(0, 1000, Value::F32(21.5)).unwrap(), 3);
            w.reading(1, 1001, Value::Bool(true)).unwrap();
            w.flush().unwrap();
            assert_eq!(w.counter(), 5);
        });
        let frames = decode(&bytes);
        let counters: Vec<u16> = frames.iter().map(|f| f.counter).collect();
        assert_eq!(counters, [0, 1, 2, 3, 4]);
        let bodies: Vec<DecodedBody> = frames.into_iter().map(|f| f.body).collect();
        assert_eq!(
            bodies,
            [
                DecodedBody::Hello {
                    firmware: "fw-1.0".into(),
                    tick_ms: 5
                },
                DecodedBody::Descriptor {
                    channel: 0,
                    name: "temperature".into(),
                    unit: "degC".into()
                },
                DecodedBody::Descriptor {
                    channel: 1,
                    name: "door".into(),
                    unit: String::new()
                },
                DecodedBody::Reading {
                    channel: 0,
                    tick_ms: 1000,
                    value: Value::F32(21.5)
                },
                DecodedBody::Reading {
                    channel: 1,
                    tick_ms: 1001,
                    value: Value::Bool(true)
                },
            ]
        );
    }

    #[test]
    fn counter_wraps_at_u16_max() {
        let mut buf = [0u8; 256];
        let mut w = FrameWriter::with_counter(&mut buf[..], u16::MAX - 1);
        for tick in 0..3 {
            w.reading(7, tick, Value::I64(-1)).unwrap();
        }
        assert_eq!(w.counter(), 1);
        let left = w.into_inner().len();
        let used = buf.len() - left;
        let counters: Vec<u16> = decode(&buf[..used]).iter().map(|f| f.counter).collect();
        assert_eq!(counters, [u16::MAX - 1, u16::MAX, 0]);
    }

    #[test]
    fn too_long_name_is_an_encode_error_and_consumes_no_counter() {
        let long = "n".repeat(MAX_NAME_LEN + 1);
        let bytes = written(|w| {
            let err = w.describe(0, &long, "").unwrap_err();
            assert!(
                matches!(
                    err,
                    LinkError::Encode(EncodeError::FieldTooLong { field: "name", .. })
                ),
                "{err:?}"
            );
            assert_eq!(w.counter(), 0);
            assert!(err.to_string().contains("name"));
        });
        assert!(
            bytes.is_empty(),
            "nothing written for a frame that failed to encode"
        );
    }

    #[test]
    fn full_uart_is_an_io_error_and_consumes_the_counter() {
        let mut buf = [0u8; 20];
        let mut w = FrameWriter::new(&mut buf[..]);
        w.reading(0, 0, Value::F32(1.0)).unwrap();
        let err = w
            .describe(0, "a-rather-long-sensor-name", "degC")
            .unwrap_err();
        assert!(
            matches!(err, LinkError::Io(embedded_io::SliceWriteError::Full)),
            "{err:?}"
        );
        assert_eq!(
            w.counter(),
            2,
            "the lost frame leaves a gap the agent can count"
        );
    }

    #[test]
    fn encoder_returns_exactly_the_wire_bytes() {
        let mut enc = FrameEncoder::new();
        let mut out = [0u8; MAX_WIRE_LEN];
        let bytes = enc
            .encode(
                Body::Hello {
                    firmware: "fw-1.0",
                    tick_ms: 0,
                },
                &mut out,
            )
            .unwrap();
        // Test vector V1 of docs/serial-protocol.md.
        assert_eq!(
            bytes,
            [
                0x00, 0x01, 0x09, 0x02, 0x06, 0x66, 0x77, 0x2d, 0x31, 0x2e, 0x30, 0x05, 0xb9, 0x24,
                0x01, 0x69, 0x00
            ]
        );
        assert_eq!(enc.counter(), 1);
    }
}
