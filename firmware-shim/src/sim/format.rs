//! Turns the simulated values into bytes on the line: Outpost frames or one
//! of the text formats the agent's `serial-lines` source reads, with the
//! line noise of [`Garbage`] applied per item (frame or line).

use core::fmt;

use outpost_proto::frame::{Body, EncodeError, Value, MAX_WIRE_LEN};

use super::garbage::{Garbage, GarbageStats};
use super::scenario::ChannelSpec;
use crate::link::FrameEncoder;

/// Decimal places of values in the text formats.
pub const TEXT_DECIMALS: usize = 2;

/// What the simulator writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Outpost serial frames (COBS, postcard, CRC-32): a hello frame at
    /// start, descriptor frames for every channel at start and then
    /// periodically, and one F32 reading frame per channel per tick.
    Frames,
    /// One line per tick: `name=value` pairs separated by spaces,
    /// e.g. `temperature=21.50 humidity=40.12`.
    Lines,
    /// One line per tick: the values only, comma-separated, in channel
    /// order; a channel that does not report leaves its field empty.
    Csv,
    /// One JSON object per tick and line: `{"temperature":21.50,...}`.
    Json,
}

/// Encodes items into a byte buffer, numbering frames and adding noise.
#[derive(Debug, Clone)]
pub struct Emitter {
    format: Format,
    encoder: FrameEncoder,
    garbage: Garbage,
    /// Text line being built (reused).
    line: String,
    items: u64,
    readings: u64,
}

impl Emitter {
    /// An emitter for `format` whose items go through `garbage`.
    pub fn new(format: Format, garbage: Garbage) -> Self {
        Emitter {
            format,
            encoder: FrameEncoder::new(),
            garbage,
            line: String::new(),
            items: 0,
            readings: 0,
        }
    }

    /// The format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The counter the next frame will carry.
    pub fn counter(&self) -> u16 {
        self.encoder.counter()
    }

    /// Frames (or lines) emitted so far.
    pub fn items(&self) -> u64 {
        self.items
    }

    /// Readings emitted so far (one per channel value, in any format).
    pub fn readings(&self) -> u64 {
        self.readings
    }

    /// Corruption events so far.
    pub fn garbage(&self) -> GarbageStats {
        self.garbage.stats()
    }

    /// Frames format: appends a hello frame. Text formats: nothing.
    pub fn hello(
        &mut self,
        firmware: &str,
        tick_ms: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        self.frame(Body::Hello { firmware, tick_ms }, out)
    }

    /// Frames format: appends a descriptor frame per channel (channel id =
    /// index). Text formats: nothing.
    pub fn describe(
        &mut self,
        channels: &[ChannelSpec],
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        for (id, c) in channels.iter().enumerate() {
            let channel = channel_id(id)?;
            self.frame(
                Body::Descriptor {
                    channel,
                    name: &c.name,
                    unit: &c.unit,
                },
                out,
            )?;
        }
        Ok(())
    }

    /// Appends the readings of one tick: a frame per reporting channel, or
    /// one text line (nothing when no channel reports).
    pub fn readings_at(
        &mut self,
        tick_ms: u32,
        channels: &[ChannelSpec],
        values: &[Option<f64>],
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let reporting = values.iter().flatten().count() as u64;
        match self.format {
            Format::Frames => {
                for (id, v) in values.iter().enumerate() {
                    if let Some(v) = *v {
                        let body = Body::Reading {
                            channel: channel_id(id)?,
                            tick_ms,
                            value: Value::F32(v as f32),
                        };
                        self.frame(body, out)?;
                    }
                }
            }
            Format::Lines | Format::Csv | Format::Json if reporting > 0 => {
                self.line.clear();
                // Writing into a String cannot fail.
                let _ = write_text(&mut self.line, self.format, channels, values);
                self.line.push('\n');
                let line = core::mem::take(&mut self.line);
                self.item(line.as_bytes(), 0..line.len() - 1, out);
                self.line = line;
            }
            Format::Lines | Format::Csv | Format::Json => {}
        }
        self.readings += reporting;
        Ok(())
    }

    fn frame(&mut self, body: Body<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        if self.format != Format::Frames {
            return Ok(());
        }
        let mut buf = [0u8; MAX_WIRE_LEN];
        let bytes = self.encoder.encode(body, &mut buf)?;
        // Bit flips stay between the delimiters: only this frame is damaged.
        self.item(bytes, 1..bytes.len() - 1, out);
        Ok(())
    }

    fn item(&mut self, bytes: &[u8], flippable: core::ops::Range<usize>, out: &mut Vec<u8>) {
        self.garbage.write(bytes, flippable, out);
        self.items += 1;
    }
}

/// Channel index as a frame's channel id.
fn channel_id(index: usize) -> Result<u16, EncodeError> {
    // Config validation keeps the channel count within u16; this only
    // guards the invariant.
    u16::try_from(index).map_err(|_| EncodeError::FieldTooLong {
        field: "channel",
        max: u16::MAX as usize,
    })
}

/// Writes the text form of one tick (without the newline) in a text
/// `format`; `Frames` is written like `Lines`. Channels that do not report
/// are left out (`Csv`: left empty).
pub fn write_text(
    f: &mut impl fmt::Write,
    format: Format,
    channels: &[ChannelSpec],
    values: &[Option<f64>],
) -> fmt::Result {
    const D: usize = TEXT_DECIMALS;
    let pairs = channels.iter().zip(values);
    match format {
        Format::Frames | Format::Lines => {
            let mut sep = "";
            for (c, v) in pairs {
                if let Some(v) = v {
                    write!(f, "{sep}{}={v:.D$}", c.name)?;
                    sep = " ";
                }
            }
        }
        Format::Csv => {
            for (i, (_, v)) in pairs.enumerate() {
                if i > 0 {
                    f.write_char(',')?;
                }
                if let Some(v) = v {
                    write!(f, "{v:.D$}")?;
                }
            }
        }
        Format::Json => {
            // Names are restricted to [A-Za-z0-9_.-]: no escaping needed.
            f.write_char('{')?;
            let mut sep = "";
            for (c, v) in pairs {
                if let Some(v) = v {
                    write!(f, "{sep}\"{}\":{v:.D$}", c.name)?;
                    sep = ",";
                }
            }
            f.write_char('}')?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use outpost_proto::frame::{DecodedBody, FrameDecoder};

    fn channels() -> Vec<ChannelSpec> {
        (0..3).map(ChannelSpec::default_for).collect()
    }

    fn text(format: Format, values: &[Option<f64>]) -> String {
        let mut e = Emitter::new(format, Garbage::new(0.0, 0));
        let mut out = Vec::new();
        e.hello("x", 0, &mut out).unwrap();
        e.describe(&channels(), &mut out).unwrap();
        e.readings_at(0, &channels(), values, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn text_formats() {
        let all = [Some(21.5), Some(40.123), Some(1013.0)];
        assert_eq!(
            text(Format::Lines, &all),
            "temperature=21.50 humidity=40.12 pressure=1013.00\n"
        );
        assert_eq!(text(Format::Csv, &all), "21.50,40.12,1013.00\n");
        assert_eq!(
            text(Format::Json, &all),
            "{\"temperature\":21.50,\"humidity\":40.12,\"pressure\":1013.00}\n"
        );
        let some = [None, Some(40.0), Some(1013.0)];
        assert_eq!(
            text(Format::Lines, &some),
            "humidity=40.00 pressure=1013.00\n"
        );
        assert_eq!(text(Format::Csv, &some), ",40.00,1013.00\n");
        assert_eq!(
            text(Format::Json, &some),
            "{\"humidity\":40.00,\"pressure\":1013.00}\n"
        );
        assert_eq!(text(Format::Lines, &[None, None, None]), "");
    }

    #[test]
    fn frames_decode_to_the_values() {
        let mut e = Emitter::new(Format::Frames, Garbage::new(0.0, 0));
        let mut out = Vec::new();
        e.hello("outpost-sim/test", 0, &mut out).unwrap();
        e.describe(&channels(), &mut out).unwrap();
        e.readings_at(
            1000,
            &channels(),
            &[Some(21.5), None, Some(1013.25)],
            &mut out,
        )
        .unwrap();
        assert_eq!((e.items(), e.readings(), e.counter()), (6, 2, 6));
        let mut d = FrameDecoder::new();
        let frames: Vec<_> = d.feed(&out).map(|f| f.unwrap()).collect();
        let counters: Vec<u16> = frames.iter().map(|f| f.counter).collect();
        assert_eq!(counters, [0, 1, 2, 3, 4, 5]);
        assert_eq!(
            frames[0].body,
            DecodedBody::Hello {
                firmware: "outpost-sim/test".into(),
                tick_ms: 0
            }
        );
        assert_eq!(
            frames[2].body,
            DecodedBody::Descriptor {
                channel: 1,
                name: "humidity".into(),
                unit: "%".into()
            }
        );
        assert_eq!(
            frames[4].body,
            DecodedBody::Reading {
                channel: 0,
                tick_ms: 1000,
                value: Value::F32(21.5)
            }
        );
        assert_eq!(
            frames[5].body,
            DecodedBody::Reading {
                channel: 2,
                tick_ms: 1000,
                value: Value::F32(1013.25)
            }
        );
    }
}
