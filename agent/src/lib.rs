//! `outpost-agent`: the program installers put on field gateways.
//!
//! It reads sensors (serial frames from firmware using the Outpost frame
//! protocol, text lines, GPIO), keeps every reading in a local SQLite buffer
//! until the aggregator acknowledges it, and publishes compact protobuf
//! batches over MQTT (see `docs/architecture.md`).
//!
//! Built so far: [`monitor`], a diagnostic that decodes what a serial sensor
//! sends and prints it, so an installer can check the wiring before the
//! agent itself is configured. Sources, buffer and publisher follow.
#![forbid(unsafe_code)]

pub mod monitor;
