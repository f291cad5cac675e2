//! `outpost-firmware-shim`: the device end of the Outpost serial link.
//!
//! Sensor firmware links this crate to send its readings to the Outpost agent
//! over a UART (or USB CDC). It is `no_std` without an allocator when built
//! with `--no-default-features`, and takes its hardware as `embedded-hal` 1.0
//! and `embedded-io` 0.7 traits. Main types:
//!
//! * [`link::FrameWriter`] owns the UART ([`embedded_io::Write`]), numbers
//!   frames with the wrapping u16 counter and writes hello, descriptor and
//!   reading frames encoded by `outpost_proto::frame` (the same encoder the
//!   protocol's test vectors check). [`link::FrameEncoder`] is its sans-IO
//!   half: counter plus encoding into a caller's buffer.
//! * [`sampler::DigitalInput`] samples an [`embedded_hal::digital::InputPin`]
//!   with debouncing and a heartbeat, on a clock passed in;
//!   [`sampler::Debouncer`] is the pure state machine behind it.
//! * `sim` (feature `sim`): the logic of `outpost-sim`, a simulated device
//!   (scenarios, frame/line formatting, line-noise injection, a non-blocking
//!   output) used by the demo, the end-to-end tests and the benchmarks.
//!
//! In the data flow: sensor -> **MCU firmware (this crate)** -> frames on the
//! UART -> agent (`FrameDecoder`) -> MQTT -> aggregator. The wire format is
//! described in `docs/serial-protocol.md`.
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod link;
pub mod sampler;

#[cfg(feature = "sim")]
pub mod sim;

pub use link::{Channel, FrameEncoder, FrameWriter, LinkError};
pub use outpost_proto::frame::{EncodeError, Value, MAX_WIRE_LEN};
pub use sampler::{Debouncer, DigitalInput, PollError};
